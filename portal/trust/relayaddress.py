"""
Where a relay is and which identity it must prove: C{HOST:PORT[#RELAYID]} as given to C{--relay},
C{--via} and registries, parsed into a L{RelayAddress} with the hops on the path to it. C{--relay}
may list several control addresses of one relay cluster, C{A,B,C}: the tunnel holds its lease
through one of them at a time and moves on to the next when that one cannot be reached.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from portal.trust.identity import looksLikeIdentityId


class ConfigError(ValueError):
    """
    A tunnel option is malformed; the message says which and why.
    """


def parsePort(text: str, what: str) -> int:
    """
    Parse a TCP port number.

    @raise ConfigError: When it is not one.
    """
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ConfigError(f"{what}: {text!r} is not a port number (1-65535)")
    return int(text)


def parseHostPort(text: str, what: str) -> tuple[str, int]:
    """
    Split C{HOST:PORT} (C{[v6]:PORT} for IPv6).

    @raise ConfigError: When malformed.
    """
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not host or ":" not in host or not rest.startswith(":"):
            raise ConfigError(f"{what}: {text!r} is not [IPV6]:PORT")
        return host, parsePort(rest[1:], what)
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"{what}: {text!r} is not HOST:PORT")
    if ":" in host:
        raise ConfigError(f"{what}: {text!r}: write an IPv6 address in brackets, [{host}]:{port}")
    return host, parsePort(port, what)


@attrs.frozen
class RelayAddress:
    """
    A relay's control address, the identity the user expects it to have, and the relays the tunnel
    reaches it through.

    @ivar host: Host name or address.
    @ivar port: Control port.
    @ivar expectedId: The relay identity given as C{HOST:PORT#RELAYID}, if any.
    @ivar via: The hop relays on the path to this relay, first hop first (C{--via}); empty for a
        direct connection. Each is checked and pinned like a relay.
    @ivar alternatives: Other control addresses of the same relay cluster (C{--relay A,B}), each
        with the same C{via}, tried in turn after this one when it cannot be reached; each member
        proves its own identity and is pinned under its own address.
    """

    host: str
    port: int
    expectedId: str | None = None
    via: tuple[RelayAddress, ...] = ()
    alternatives: tuple[RelayAddress, ...] = ()

    @property
    def choices(self) -> tuple[RelayAddress, ...]:
        """
        This address and its alternatives, in the order they are tried, each without alternatives.
        """
        if not self.alternatives:
            return (self,)
        return (attrs.evolve(self, alternatives=()), *self.alternatives)

    @property
    def address(self) -> str:
        """
        C{HOST:PORT}, the key relays are pinned under.
        """
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def path(self) -> str:
        """
        The chain for humans: C{A:4017 -> B:4017 -> C:4017}, or just the address when direct.
        """
        return " -> ".join([*(hop.address for hop in self.via), self.address])


def parseRelay(text: str, flag: str = "--relay") -> RelayAddress:
    """
    Parse C{HOST:PORT[#RELAYID]}; the port defaults to 4017.

    @param text: The relay as given.
    @param flag: The option it was given with (C{--relay} or C{--via}), for messages.
    @return: The parsed address.
    @raise ConfigError: When malformed.
    """
    spec, _, relayId = text.partition("#")
    if spec.isdigit() or not spec:
        raise ConfigError(f"{flag} {text!r}: expected HOST:PORT[#RELAYID]")
    if ":" not in spec or (spec.startswith("[") and spec.endswith("]")):
        spec = f"{spec}:4017"
    host, port = parseHostPort(spec, flag)
    relayId = relayId.lower()
    if relayId and not looksLikeIdentityId(relayId):
        raise ConfigError(f"{flag} {text!r}: RELAYID must be the relay's 52-character identity id")
    return RelayAddress(host.lower(), port, relayId or None)


def parseChain(relay: str, via: Sequence[str] = ()) -> RelayAddress:
    """
    Parse a relay, its alternative addresses and the hops on the path to it.

    @param relay: The relay, C{HOST:PORT[#RELAYID]}, or several addresses of one relay cluster
        separated by commas (the first is tried first).
    @param via: The hop relays, first hop first, each C{HOST:PORT[#RELAYID]}.
    @return: The relay's address with its path and alternatives.
    @raise ConfigError: When an address is malformed, given twice, or a relay occurs twice on the
        path.
    """
    targets = [parseRelay(part.strip()) for part in relay.split(",")]
    addresses = [target.address for target in targets]
    for address in addresses:
        if addresses.count(address) > 1:
            raise ConfigError(f"--relay {relay!r}: {address} is listed twice")
    hops = tuple(parseRelay(hop, "--via") for hop in via)
    seen = set(addresses)
    for hop in hops:
        if hop.address in seen:
            raise ConfigError(
                f"--via {hop.address}: a relay may occur only once on the path to "
                f"{targets[0].address}"
            )
        seen.add(hop.address)
    first, *others = (attrs.evolve(target, via=hops) for target in targets)
    return attrs.evolve(first, alternatives=tuple(others))
