"""
Raw TCP mode on the relay: a public TCP port per live lease, each visitor spliced to one of the lease
tunnel's data sessions, its stream sealed (L{portal.forwarding.sealedstream}).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IAddress, IListeningPort, IProtocolFactory
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from portal.forwarding.boundedreads import boundAccepts
from portal.forwarding.pacer import PacerFull, Waiting
from portal.forwarding.reuseport import listenSharedTCP
from portal.forwarding.sources import sourceKey
from portal.forwarding.splice import SpliceProtocol, noDelay, pauseReading, resumeReading
from portal.relay.interfaces import IWaitingVisitor
from portal.relay.leaseports import LeasePorts, PortLease
from portal.relay.ports import PortAllocator
from portal.wire.attach import StreamHeader

if TYPE_CHECKING:
    from portal.relay.router import DataPool


@implementer(IWaitingVisitor)
class RawVisitor(SpliceProtocol, TimeoutMixin):
    """
    One connection to a lease's public TCP port: routed at once to the lease's data pool, where it waits
    (paused) for a data session if none is idle.

    @ivar pool: The data pool this visitor waits in, while it waits.
    @ivar acceptedAt: When the connection was accepted, by the router's clock.
    """

    pool: DataPool | None = None
    acceptedAt: float | None = None
    #: This visitor's place in the port's queue (L{PortLease.pacer}), while it waits its turn.
    _waiting: Waiting | None = None
    _log = Logger()

    def __init__(self, lease: PortLease) -> None:
        super().__init__()
        self._lease = lease
        # Replacing callLater is TimeoutMixin's documented hook; mypy-zope wrongly keeps "self" in
        # the signature of a method read from an interface-typed object, hence "assignment".
        self.callLater = lease.router.clock.callLater  # type: ignore[method-assign, assignment]

    def connectionMade(self) -> None:
        """
        Route the visitor to the tunnel holding the lease, at once or, over its source address's
        rate of new visitors to this port, when its turn comes (paused meanwhile).
        """
        lease = self._lease
        router = lease.router
        router.counters["tcp_visitors"] += 1
        self.acceptedAt = router.clock.seconds()
        router.visitors.add(self)
        assert self.transport is not None
        noDelay(self.transport)
        peerHost = str(getattr(self.transport.getPeer(), "host", ""))
        if lease.livePool() is None:
            self._route()
            return
        lease.visitors.add(self)
        try:
            self._waiting = lease.pacer().enter(sourceKey(peerHost), self._yourTurn)
        except PacerFull:
            router.refusals.refuse(
                "tcp_visitor_queue",
                "refused TCP visitor {peer} on port {port}: {waiting} visitors from its address "
                "are waiting for their turn, the most allowed",
                peer=peerHost,
                port=lease.port,
                waiting=router.limits.tcpVisitorQueue,
            )
            self.transport.loseConnection()
            return
        if self._waiting is None:
            self._route()
            return
        router.counters["tcp_visitors_delayed"] = router.counters.get("tcp_visitors_delayed", 0) + 1
        pauseReading(self.transport)
        self.setTimeout(router.limits.dataWaitTimeout)

    def _yourTurn(self) -> None:
        """
        The port's pacer lets this visitor through: route it.
        """
        self._waiting = None
        self.setTimeout(None)
        assert self.transport is not None
        resumeReading(self.transport)
        self._route()

    def _route(self) -> None:
        """
        Pass the visitor to the lease's data pool, or refuse it.
        """
        lease = self._lease
        router = lease.router
        assert self.transport is not None
        peer = self.transport.getPeer()
        peerHost = str(getattr(peer, "host", ""))
        pool = lease.livePool()
        if pool is None:
            router.refusals.refuse(
                "lease_not_live",
                "refused TCP visitor {peer} on port {port}: lease {name} is not live",
                peer=peerHost,
                port=lease.port,
                name=lease.name,
            )
            self.transport.loseConnection()
            return
        lease.visitors.add(self)
        header = StreamHeader(
            streamId=router.nextStreamId(),
            hostname=lease.hostname,
            peerHost=peerHost,
            peerPort=int(getattr(peer, "port", 0)),
        )
        self.pool = pool
        if not pool.route(self, header):
            self.pool = None
            router.counters["refused"] += 1
            router.refusals.refuse(
                "visitors_waiting",
                "refused TCP visitor {peer} on port {port}: too many visitors waiting",
                peer=peerHost,
                port=lease.port,
            )
            self.transport.loseConnection()

    def timeoutConnection(self) -> None:
        """
        Its turn, or a data session, did not come in time: drop the visitor.
        """
        if self._waiting is not None:
            self._waiting.cancel()
            self._waiting = None
            self._lease.router.refusals.refuse(
                "tcp_visitor_wait",
                "refused TCP visitor on port {port}: its turn did not come within {timeout} s",
                port=self._lease.port,
                timeout=self._lease.router.limits.dataWaitTimeout,
            )
            assert self.transport is not None
            self.transport.loseConnection()
            return
        self._lease.router.counters["timeouts"] += 1
        self._log.warn(
            "no data session from the tunnel within {timeout}s; dropping TCP visitor",
            timeout=self._lease.router.limits.dataWaitTimeout,
        )
        if self.pool is not None:
            self.pool.abandon(self)
            self.pool = None
        assert self.transport is not None
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """
        Leave the waiting line and the lease's visitors; close the data session if paired.

        @param reason: Why.
        """
        self.setTimeout(None)
        if self._waiting is not None:
            self._waiting.cancel()
            self._waiting = None
        self._lease.visitors.discard(self)
        self._lease.router.visitors.discard(self)
        if self.pool is not None:
            self.pool.abandon(self)
            self.pool = None
        super().connectionLost(reason)


class _RawVisitorFactory(Factory):
    """
    Builds L{RawVisitor}s for one lease's public port.
    """

    noisy = False

    def __init__(self, lease: PortLease) -> None:
        self._lease = lease

    def buildProtocol(self, addr: IAddress | None) -> RawVisitor:
        """
        @return: A visitor protocol for the lease.
        """
        return RawVisitor(self._lease)


def tcpPorts(
    reactor: Any, allocator: PortAllocator, interface: str = "", shared: bool = False
) -> LeasePorts:
    """
    The relay's raw TCP lease ports: each listens with L{RawVisitor}s.

    @param reactor: Provides C{listenTCP} (and C{adoptStreamPort} when C{shared}).
    @param allocator: The raw TCP port allocator.
    @param interface: The address to bind.
    @param shared: Bind each port with C{SO_REUSEPORT}, for the other workers of the relay
        (C{--workers}) to listen on it too (L{portal.forwarding.reuseport.listenSharedTCP}).
    """

    def listen(lease: PortLease, interface: str) -> IListeningPort:
        factory = visitorFactory(lease)
        listening: IListeningPort
        if shared:
            listening = listenSharedTCP(reactor, lease.port, interface, factory)
        else:
            listening = reactor.listenTCP(lease.port, factory, interface=interface)
        boundAccepts(listening)
        return listening

    return LeasePorts("tcp", allocator, listen, interface)


def visitorFactory(lease: PortLease) -> IProtocolFactory:
    """
    @return: The factory of C{lease}'s listener: L{RawVisitor}s under the relay's connection caps
        for raw TCP ports (L{Router.limited <portal.relay.router.Router.limited>}).
    """
    return lease.router.limited("tcp", _RawVisitorFactory(lease))


def handedOverFactory(ports: LeasePorts, port: int) -> IProtocolFactory | None:
    """
    The factory for a visitor of raw TCP port C{port} that another worker accepted and handed over
    (L{portal.relay.handoff}): the one this worker's own listener on the port uses, so that the
    visitor is served, counted and capped exactly as if this worker had accepted it.

    @param ports: This worker's raw TCP lease ports.
    @param port: The port the visitor connected to.
    @return: The factory, or L{None} when no lease here listens on that port (a lease that is
        no longer live is refused by its L{RawVisitor}, as at its listener).
    """
    for lease in ports.leases.values():
        if lease.port == port and lease.listening is not None:
            return visitorFactory(lease)
    return None
