"""
C{--give-up-after SECONDS}: a tunnel none of whose relays was ever reached stops with exit status 1
after that long, instead of retrying a mistyped or dead address forever. Once a relay has been
reached (a lease was live), the tunnel keeps retrying it for as long as it runs: the relay was right,
only its path or its process is down.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IDelayedCall

from portal.tunnel.service import TunnelService


def giveUpUnlessReached(reactor: Any, tunnel: TunnelService) -> IDelayedCall | None:
    """
    Stop C{tunnel} (as a fatal error) if, C{config.giveUpAfter} seconds from now, none of its
    relays given by C{--relay} has given it a lease; when some have and others not, say so once.
    Relays from a registry are left to the relay pool, which replaces those that stay down.

    @param reactor: The reactor (time).
    @param tunnel: The tunnel, started or about to be.
    @return: The pending check, or L{None} when there is nothing to check (C{--give-up-after 0},
        or no C{--relay}).
    """
    seconds = tunnel.config.giveUpAfter
    relays = [relay.address for relay in tunnel.config.relays]
    if not seconds or not relays:
        return None

    def check() -> None:
        reached = tunnel.reporter.leasedRelays
        missing = [relay for relay in relays if relay not in reached]
        if not tunnel.running or not missing:
            return
        if len(missing) == len(relays):
            tunnel.fatal(
                f"never reached {_listed(missing)} in {seconds:g} s; giving up (check the address, "
                "or --give-up-after 0 to keep trying)"
            )
            return
        for relay in missing:
            tunnel.reporter.state(
                "unreached",
                relay,
                f"never reached this relay in {seconds:g} s; the others serve, and it is still "
                "retried",
            )

    pending: IDelayedCall = reactor.callLater(seconds, check)
    return pending


def _listed(relays: list[str]) -> str:
    """
    @return: The relays for a sentence.
    """
    return relays[0] if len(relays) == 1 else "any of " + ", ".join(relays)
