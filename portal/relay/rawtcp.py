"""
Raw TCP mode on the relay: a public TCP port per live lease, each visitor spliced to one of the lease
tunnel's TLS data sessions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import IAddress, IListeningPort
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from portal.attach import StreamHeader
from portal.relay.ports import PortAllocator
from portal.splice import SpliceProtocol, noDelay

if TYPE_CHECKING:
    from portal.relay.router import DataPool, Router


class RawVisitor(SpliceProtocol, TimeoutMixin):
    """
    One connection to a lease's public TCP port: routed at once to the lease's data pool, where it waits
    (paused) for a data session if none is idle.

    @ivar pool: The data pool this visitor waits in, while it waits.
    """

    pool: DataPool | None = None
    _log = Logger()

    def __init__(self, lease: TCPLease) -> None:
        super().__init__()
        self._lease = lease
        # Replacing callLater is TimeoutMixin's documented hook; mypy-zope wrongly keeps "self" in
        # the signature of a method read from an interface-typed object, hence "assignment".
        self.callLater = lease.router.clock.callLater  # type: ignore[method-assign, assignment]

    def connectionMade(self) -> None:
        """
        Route the visitor to the tunnel holding the lease.
        """
        lease = self._lease
        router = lease.router
        router.counters["tcp_visitors"] += 1
        assert self.transport is not None
        noDelay(self.transport)
        peer = self.transport.getPeer()
        peerHost = str(getattr(peer, "host", ""))
        pool = lease.livePool()
        if pool is None:
            self._log.info(
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
            self._log.info(
                "refused TCP visitor {peer} on port {port}: too many visitors waiting",
                peer=peerHost,
                port=lease.port,
            )
            self.transport.loseConnection()

    def timeoutConnection(self) -> None:
        """
        No data session came in time: drop the visitor.
        """
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
        self._lease.visitors.discard(self)
        if self.pool is not None:
            self.pool.abandon(self)
            self.pool = None
        super().connectionLost(reason)


class _RawVisitorFactory(Factory):
    """
    Builds L{RawVisitor}s for one lease's public port.
    """

    noisy = False

    def __init__(self, lease: TCPLease) -> None:
        self._lease = lease

    def buildProtocol(self, addr: IAddress | None) -> RawVisitor:
        """
        @return: A visitor protocol for the lease.
        """
        return RawVisitor(self._lease)


class TCPLease:
    """
    The public TCP port of one live lease.

    @ivar router: The relay's router.
    @ivar owner: The identity holding the lease.
    @ivar name: The lease name.
    @ivar hostname: The lease hostname, told to the tunnel with each stream.
    @ivar holder: The control session holding the lease.
    @ivar port: The public port number.
    @ivar visitors: Open visitor connections.
    """

    listening: IListeningPort | None = None

    def __init__(
        self, router: Router, owner: str, name: str, hostname: str, holder: Any, port: int
    ) -> None:
        self.router = router
        self.owner = owner
        self.name = name
        self.hostname = hostname
        self.holder = holder
        self.port = port
        self.visitors: set[RawVisitor] = set()

    def livePool(self) -> DataPool | None:
        """
        @return: The holder's data pool while the lease is live and still held by it, else L{None}.
        """
        lease = self.router.leases.route(self.name)
        if lease is None or lease.holder is not self.holder:
            return None
        pool: DataPool | None = getattr(self.holder, "pool", None)
        return pool

    def close(self) -> Deferred[None]:
        """
        Stop listening and close every visitor (their pending bytes are flushed first).

        @return: A L{Deferred} that fires when the port is closed.
        """
        visitors, self.visitors = self.visitors, set()
        for visitor in visitors:
            assert visitor.transport is not None
            visitor.transport.loseConnection()
        listening, self.listening = self.listening, None
        stopped = listening.stopListening() if listening is not None else None
        return stopped if stopped is not None else succeed(None)


class TCPPorts:
    """
    The relay's raw TCP leases: a port from the allocator and a listener for each live one.

    @ivar allocator: Public port assignments (sticky per identity and lease name).
    @ivar interface: The address the public ports are bound to.
    @ivar leases: Open lease ports by (identity, name).
    """

    _log = Logger()

    def __init__(self, reactor: Any, allocator: PortAllocator, interface: str = "") -> None:
        self._reactor = reactor
        self.allocator = allocator
        self.interface = interface
        self.leases: dict[tuple[str, str], TCPLease] = {}

    async def open(self, router: Router, owner: str, name: str, hostname: str, holder: Any) -> int:
        """
        Give C{name} of C{owner} its public port and listen on it for C{holder}.

        @return: The port number.
        @raise portal.relay.ports.PortAllocationError: When no port can be given.
        @raise twisted.internet.error.CannotListenError: When the port cannot be bound.
        """
        key = (owner, name)
        current = self.leases.get(key)
        if current is not None:
            if current.holder is holder:
                return current.port
            # Another session of the owner took the lease over: its port moves with it.
            del self.leases[key]
            await current.close()
        port = self.allocator.allocate(owner, name)
        lease = TCPLease(router, owner, name, hostname, holder, port)
        try:
            lease.listening = self._reactor.listenTCP(
                port, _RawVisitorFactory(lease), interface=self.interface
            )
        except Exception:
            self.allocator.release(owner, name)
            raise
        self.leases[key] = lease
        self._log.info(
            "tcp port {port} open for lease {name} of {identity}",
            port=port,
            name=name,
            identity=owner[:12],
        )
        return port

    def close(self, owner: str, name: str, holder: Any = None) -> Deferred[None]:
        """
        The lease of C{name} ended: close its port and visitors; the port stays reserved for it.

        @param holder: Only close if this control session holds the port (L{None}: whoever does).
        @return: A L{Deferred} that fires when the port is closed.
        """
        key = (owner, name)
        lease = self.leases.get(key)
        if lease is None or (holder is not None and lease.holder is not holder):
            return succeed(None)
        del self.leases[key]
        self.allocator.release(owner, name)
        self._log.info(
            "tcp port {port} closed: lease {name} ended ({visitors} visitors closed)",
            port=lease.port,
            name=name,
            visitors=len(lease.visitors),
        )
        return lease.close()

    def sweep(self) -> bool:
        """
        Close the ports of leases that lapsed while their control session stayed connected.

        @return: Whether any port was closed.
        """
        lapsed = [lease for lease in self.leases.values() if lease.livePool() is None]
        for lease in lapsed:
            self.close(lease.owner, lease.name)
        return bool(lapsed)

    def closeAll(self) -> Deferred[Any]:
        """
        Close every port (relay shutdown); assignments stay for the next start.
        """
        leases, self.leases = list(self.leases.values()), {}
        return gatherResults([lease.close() for lease in leases])
