"""
Public ports of raw TCP and UDP leases: a port from the allocator and a listener for each live lease,
closed when the lease ends.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, gatherResults, maybeDeferred, succeed
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from zope.interface import implementer

from portal.forwarding.pacer import KeyedPacer
from portal.relay.interfaces import ILeasePorts, IPortClaims, IPortLease
from portal.relay.ports import PortAllocationError, PortAllocator

if TYPE_CHECKING:
    from portal.relay.router import DataPool, Router


@implementer(IPortLease)
class PortLease:
    """
    The public port of one live lease.

    @ivar router: The relay's router.
    @ivar owner: The identity holding the lease.
    @ivar name: The lease name.
    @ivar hostname: The lease hostname, told to the tunnel with each stream.
    @ivar holder: The control session holding the lease.
    @ivar port: The public port number.
    @ivar listening: The listener, while open.
    @ivar visitors: Open visitor connections (raw TCP mode).
    @ivar onClose: Called when the port closes (UDP mode stops its flows).
    """

    listening: IListeningPort | None = None
    onClose: Callable[[], None] | None = None
    _pacer: KeyedPacer | None = None

    def __init__(
        self, router: Router, owner: str, name: str, hostname: str, holder: Any, port: int
    ) -> None:
        self.router = router
        self.owner = owner
        self.name = name
        self.hostname = hostname
        self.holder = holder
        self.port = port
        self.visitors: set[Any] = set()

    def pacer(self) -> KeyedPacer:
        """
        @return: What paces this port's new visitors to the tunnel, source address by source
            address (raw TCP mode: L{RelayLimits.tcpVisitorRate
            <portal.relay.router.RelayLimits>}), made on first use.
        """
        if self._pacer is None:
            limits = self.router.limits
            self._pacer = KeyedPacer(
                self.router.clock,
                limits.tcpVisitorRate.perSecond,
                limits.tcpVisitorRate.burst,
                limits.tcpVisitorQueue,
            )
        return self._pacer

    def live(self) -> bool:
        """
        @return: Whether the lease is live and still held by L{holder}.
        """
        lease = self.router.leases.route(self.name)
        return lease is not None and lease.holder is self.holder

    def livePool(self) -> DataPool | None:
        """
        @return: The holder's data pool while the lease is live, else L{None}.
        """
        if not self.live():
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
            visitor.transport.loseConnection()
        if self._pacer is not None:
            self._pacer.stop()
        if self.onClose is not None:
            self.onClose()
        listening, self.listening = self.listening, None
        stopped = listening.stopListening() if listening is not None else None
        return stopped if stopped is not None else succeed(None)


@implementer(ILeasePorts)
class LeasePorts:
    """
    One kind of public lease port (raw TCP or UDP): a port from the allocator and a listener for
    each live lease.

    @ivar kind: C{"tcp"} or C{"udp"}, for logs.
    @ivar allocator: Public port assignments (sticky per identity and lease name).
    @ivar interface: The address the public ports are bound to.
    @ivar leases: Open lease ports by (identity, name).
    @ivar claims: In a relay cluster, where a port is claimed before it is used (L{None}: this
        relay's ports are its own).
    """

    _log = Logger()
    claims: IPortClaims | None = None
    #: How many ports the cluster may refuse in a row (a race with another member) before the
    #: allocation gives up.
    CLAIM_ATTEMPTS = 5

    def __init__(
        self,
        kind: str,
        allocator: PortAllocator,
        listen: Callable[[PortLease, str], IListeningPort],
        interface: str = "",
    ) -> None:
        """
        @param kind: C{"tcp"} or C{"udp"}.
        @param allocator: The port allocator.
        @param listen: Listens on C{lease.port} at the given interface for a lease, and returns the
            listener; raises L{twisted.internet.error.CannotListenError} when it cannot.
        @param interface: The address to bind.
        """
        self.kind = kind
        self.allocator = allocator
        self.interface = interface
        self._listen = listen
        self.leases: dict[tuple[str, str], PortLease] = {}

    async def open(
        self, router: Router, owner: str, name: str, hostname: str, holder: Any
    ) -> PortLease:
        """
        Give C{name} of C{owner} its public port and listen on it for C{holder}.

        @return: The lease's port.
        @raise portal.relay.ports.PortAllocationError: When no port can be given.
        @raise twisted.internet.error.CannotListenError: When the port cannot be bound.
        """
        key = (owner, name)
        current = self.leases.get(key)
        if current is not None:
            if current.holder is holder:
                return current
            # Another session of the owner took the lease over: its port moves with it.
            del self.leases[key]
            await current.close()
        port = await self._allocate(owner, name, getattr(holder, "source", None))
        lease = PortLease(router, owner, name, hostname, holder, port)
        try:
            lease.listening = self._listen(lease, self.interface)
        except Exception:
            self.allocator.release(owner, name)
            if self.claims is not None:
                until = self.allocator.reservedUntil(owner, name)
                self.claims.released(self.kind, port, owner, name, until)
            raise
        self.leases[key] = lease
        self._log.info(
            "{kind} port {port} open for lease {name} of {identity}",
            kind=self.kind,
            port=port,
            name=name,
            identity=owner[:12],
        )
        return lease

    async def _allocate(self, owner: str, name: str, source: str | None) -> int:
        """
        Allocate a port for the lease and, in a cluster, claim it there (naming C{source}, the
        address the lease registered from); a port the cluster gives to another lease (another
        member was quicker) is left and the next one tried.

        @return: The port.
        @raise PortAllocationError: When no port can be given.
        """
        claims = self.claims
        for _ in range(self.CLAIM_ATTEMPTS):
            port = self.allocator.allocate(owner, name)
            if claims is None:
                return port
            try:
                claimed = await claims.claim(self.kind, port, owner, name, source)
            except Exception:
                self.allocator.abandon(owner, name)
                raise
            if claimed:
                return port
            self.allocator.abandon(owner, name)
            self._log.info(
                "{kind} port {port} went to another lease in the cluster; trying another",
                kind=self.kind,
                port=port,
            )
        raise PortAllocationError("the cluster gave every port tried to other leases; try again")

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
            "{kind} port {port} closed: lease {name} ended ({visitors} visitors closed)",
            kind=self.kind,
            port=lease.port,
            name=name,
            visitors=len(lease.visitors),
        )
        closed = lease.close()
        claims = self.claims
        if claims is not None:
            until = self.allocator.reservedUntil(owner, name)
            port = lease.port

            def released(result: None) -> None:
                claims.released(self.kind, port, owner, name, until)

            closed.addCallback(released)
        return closed

    def sweep(self) -> bool:
        """
        Close the ports of leases that lapsed while their control session stayed connected.

        @return: Whether any port was closed.
        """
        lapsed = [lease for lease in self.leases.values() if not lease.live()]
        for lease in lapsed:
            self.close(lease.owner, lease.name)
        return bool(lapsed)

    def stopAccepting(self) -> Deferred[Any]:
        """
        Stop listening on every raw TCP port but leave its open visitors be (a graceful shutdown
        lets them finish). UDP ports keep carrying datagrams until L{closeAll}: a flow has no end
        to wait for.
        """
        stops = []
        if self.kind == "tcp":
            for lease in self.leases.values():
                listening, lease.listening = lease.listening, None
                if listening is not None:
                    stops.append(maybeDeferred(listening.stopListening))
        return gatherResults(stops)

    def closeAll(self) -> Deferred[Any]:
        """
        Close every port (relay shutdown); assignments stay for the next start.
        """
        leases, self.leases = list(self.leases.values()), {}
        return gatherResults([lease.close() for lease in leases])
