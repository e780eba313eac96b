"""
Relays from a registry (C{portal expose --registry URL|FILE --max-relays N}): the tunnel ranks the
registry's relays by rendezvous hashing on its identity, health-checks them in rank order and holds a
lease on each of the first N healthy ones; one that stays without a live lease for L{REPLACE_AFTER}
seconds is replaced by the next healthy relay in rank order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from portal.registry.document import (
    Registry,
    RegistryEntry,
    RegistryError,
    loadRegistry,
    rank,
)
from portal.registry.health import Health, checkRelay
from portal.tunnel.config import RelayAddress
from portal.tunnel.control import TunnelControlProtocol
from portal.tunnel.interfaces import ITunnel
from portal.tunnel.link import RelayLink
from portal.wire.control import modeParts

#: Seconds a registry relay the tunnel holds may stay without a live lease (unreachable, or not
#: registering) before it is replaced by the next healthy relay in rank order.
REPLACE_AFTER = 60.0
#: Seconds between two looks at the held relays.
CHECK_INTERVAL = 5.0
#: Seconds before searching the registry again after a search found too few healthy relays.
SEARCH_INTERVAL = 30.0


class PoolLink(RelayLink):
    """
    A L{RelayLink} to a registry relay. It records since when it has had no live lease, and an error
    reconnecting cannot fix drops this relay from the pool instead of stopping the tunnel.

    @ivar entry: The relay's registry entry; its id is the identity the relay must prove.
    @ivar downSince: When the link last had no live lease (when it started, or lost its control
        session), or L{None} while its lease is live.
    """

    flag = "--registry"
    downSince: float | None = None

    def __init__(self, tunnel: ITunnel, entry: RegistryEntry, pool: RelayPool) -> None:
        super().__init__(tunnel, RelayAddress(entry.host, entry.port, entry.id))
        self.entry = entry
        self._pool = pool

    def startService(self) -> None:
        """
        Connect; the link has no live lease yet.
        """
        self.downSince = self.reactor.seconds()
        super().startService()

    def registered(
        self,
        protocol: TunnelControlProtocol,
        hostnames: list[str],
        port: int,
        tcp: tuple[str, int] | None = None,
        udp: tuple[str, int] | None = None,
    ) -> None:
        """
        The lease is live.
        """
        self.downSince = None
        super().registered(protocol, hostnames, port, tcp, udp)

    def controlLost(self, protocol: TunnelControlProtocol) -> None:
        """
        The control session closed: the lease is down from now.
        """
        if protocol is self.protocol and self.downSince is None:
            self.downSince = self.reactor.seconds()
        super().controlLost(protocol)

    def fatal(self, message: str) -> None:
        """
        This relay cannot serve the tunnel (it refused the lease, failed to prove its identity, ...):
        the pool drops it and finds another.
        """
        self._pool.refused(self, message)


class RelayPool(Service):
    """
    Holds leases on up to L{count} relays of a registry, as L{PoolLink}s added to the tunnel.

    @ivar tunnel: The tunnel the links belong to.
    @ivar source: The registry's file or URL.
    @ivar count: How many registry relays to hold (C{--max-relays}).
    @ivar links: The links to registry relays, in the order they were added.
    @ivar candidates: The registry relays offering the tunnel's modes, best first for this tunnel's
        identity (empty until the registry is loaded).
    """

    _log = Logger()
    _loop: LoopingCall | None = None

    def __init__(
        self,
        tunnel: ITunnel,
        source: str,
        count: int,
        load: Callable[[Any, str], Deferred[Registry]] = loadRegistry,
        check: Callable[[Any, RegistryEntry, list[str]], Deferred[Health]] = checkRelay,
    ) -> None:
        """
        @param tunnel: The tunnel.
        @param source: The registry's file or URL.
        @param count: How many registry relays to hold.
        @param load: Loads a registry (L{loadRegistry}'s signature).
        @param check: Health-checks a relay (L{checkRelay}'s signature).
        """
        self.tunnel = tunnel
        self.source = source
        self.count = count
        self._load = load
        self._check = check
        self.links: list[PoolLink] = []
        self.candidates: list[RegistryEntry] = []
        self._refused: set[str] = set()
        self._skipReported: dict[str, str] = {}
        self._nextSearch = 0.0
        self._degradedReported: int | None = None

    def startService(self) -> None:
        """
        Load the registry, then pick relays and keep looking after them.
        """
        super().startService()
        Deferred.fromCoroutine(self._start()).addErrback(self._crashed)

    def stopService(self) -> None:
        """
        Stop looking after the relays (the tunnel stops their links).
        """
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def _crashed(self, failure: Failure) -> None:
        """
        A bug: log it.
        """
        self._log.failure("relay registry pool failed", failure)

    async def _start(self) -> None:
        """
        Load the registry (a fatal error when it cannot be), keep the relays offering the tunnel's
        modes that are not given with C{--relay}, rank them, and start the looking-after loop.
        """
        tunnel = self.tunnel
        try:
            registry = await self._load(tunnel.reactor, self.source)
        except RegistryError as e:
            tunnel.fatal(f"cannot load the registry {e}")
            return
        if not self.running:
            return
        mode = tunnel.config.mode
        needed = modeParts(mode)
        explicit = {choice.address for relay in tunnel.config.relays for choice in relay.choices}
        usable = [e for e in registry.relays if needed <= e.modes and e.address not in explicit]
        if not usable:
            tunnel.fatal(
                f"the registry {self.source} lists no relay offering {mode} mode"
                + (" besides those given with --relay" if explicit else "")
            )
            return
        self.candidates = rank(tunnel.identity.id, usable)
        tunnel.reporter.state(
            "registry",
            "",
            f"registry {self.source}: {len(usable)} of its {len(registry.relays)} relays offer "
            f"{mode} mode; holding leases on up to {self.count}",
            relays=len(registry.relays),
            usable=len(usable),
        )
        self._loop = LoopingCall(self._maintain)
        self._loop.clock = tunnel.reactor
        self._loop.start(CHECK_INTERVAL, now=True)

    def _maintain(self) -> Deferred[None]:
        """
        One look at the held relays (run by the loop, which waits for it to finish).
        """
        d = Deferred.fromCoroutine(self._maintainOnce())
        d.addErrback(self._crashed)
        return d

    async def _maintainOnce(self) -> None:
        """
        Replace the held relays that have had no live lease for L{REPLACE_AFTER} seconds, and fill
        vacancies, with the best healthy relays not held yet. A stale relay is kept while no
        replacement is healthy (it may come back).
        """
        clock = self.tunnel.reactor
        now = clock.seconds()
        stale = [
            link
            for link in self.links
            if link.downSince is not None and now - link.downSince >= REPLACE_AFTER
        ]
        wanted = self.count - len(self.links) + len(stale)
        if wanted <= 0 or now < self._nextSearch:
            return
        found = await self._search(wanted)
        if not self.running:
            return
        # During the search a stale relay may have come back, or been dropped.
        stale = [link for link in stale if link in self.links and link.downSince is not None]
        room = self.count - len(self.links) + len(stale)
        for entry, health in found[:room]:
            if stale:
                old = stale.pop(0)
                self._drop(old)
                self.tunnel.reporter.state(
                    "replaced",
                    old.relay.address,
                    f"no live lease for {REPLACE_AFTER:.0f} s; replacing this relay with "
                    f"{entry.address}",
                    replacement=entry.address,
                )
            self._hold(entry, health)
        working = len(self.links) - len(stale)
        if working < self.count:
            self._nextSearch = clock.seconds() + SEARCH_INTERVAL
            if working != self._degradedReported:
                self._degradedReported = working
                self.tunnel.reporter.state(
                    "degraded",
                    "",
                    f"{working} of {self.count} registry relays working; no other relay in the "
                    f"registry is healthy (looking again every {SEARCH_INTERVAL:.0f} s)",
                    working=working,
                    wanted=self.count,
                )
        else:
            self._degradedReported = None
        if not self.links and not self.tunnel.config.relays and not self._searchable():
            self.tunnel.fatal(f"no relay in the registry {self.source} can serve this tunnel")

    def _searchable(self) -> list[RegistryEntry]:
        """
        @return: The candidates not held and not dropped, best first.
        """
        held = {link.entry.id for link in self.links}
        return [e for e in self.candidates if e.id not in held and e.id not in self._refused]

    async def _search(self, wanted: int) -> list[tuple[RegistryEntry, Health]]:
        """
        Health-check candidates in rank order, as many at once as are still wanted, until enough
        are healthy or none is left.

        @param wanted: How many healthy relays to find.
        @return: The healthy ones found, best first, with their health.
        """
        pending = self._searchable()
        modes = sorted(modeParts(self.tunnel.config.mode))
        found: list[tuple[RegistryEntry, Health]] = []
        while pending and len(found) < wanted and self.running:
            batch, pending = pending[: wanted - len(found)], pending[wanted - len(found) :]
            healths = await gatherResults(
                [self._check(self.tunnel.reactor, entry, modes) for entry in batch]
            )
            for entry, health in zip(batch, healths, strict=True):
                if health.ok:
                    self._skipReported.pop(entry.id, None)
                    found.append((entry, health))
                elif self._skipReported.get(entry.id) != health.reason:
                    self._skipReported[entry.id] = health.reason
                    self.tunnel.reporter.state(
                        "skipped",
                        entry.address,
                        f"skipping the registry relay: {health.reason}",
                        relayId=entry.id,
                    )
        return found

    def _hold(self, entry: RegistryEntry, health: Health) -> None:
        """
        Start a link to a healthy relay.
        """
        link = PoolLink(self.tunnel, entry, self)
        self.links.append(link)
        self.tunnel.links.append(link)
        latency = None if health.latency is None else round(health.latency * 1000, 1)
        position = self.candidates.index(entry) + 1
        self.tunnel.reporter.state(
            "selected",
            entry.address,
            f"selected from the registry (rank {position} of {len(self.candidates)}, "
            f"health check {latency} ms)",
            relayId=entry.id,
            rank=position,
            latencyMs=latency,
        )
        link.setServiceParent(self.tunnel)

    def _drop(self, link: PoolLink) -> None:
        """
        Stop a link and forget it (its lease is released if it is live).
        """
        self.links.remove(link)
        self.tunnel.links.remove(link)
        stopped = link.disownServiceParent()
        if isinstance(stopped, Deferred):
            stopped.addErrback(self._crashed)

    def refused(self, link: PoolLink, message: str) -> None:
        """
        A held relay cannot serve this tunnel: drop it for the rest of this run, and look for another
        at the next look.

        @param link: Its link.
        @param message: Why, for the user.
        """
        if link not in self.links:
            return
        self._refused.add(link.entry.id)
        self.tunnel.reporter.state(
            "dropped",
            link.relay.address,
            f"dropping the registry relay: {message}",
            relayId=link.entry.id,
        )
        self._drop(link)
        self._nextSearch = 0.0
