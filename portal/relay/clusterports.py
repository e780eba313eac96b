"""
Raw TCP and UDP ports across a relay cluster (docs/cluster.md): a port is given to one lease in the
whole cluster, and every member listens on every live port.

A member that registers a raw TCP lease allocates a port from its own allocator as before, skipping
the ports the cluster holds for other leases, then claims it in etcd with one compare-and-set
(L{ClusterDirectory.claimPort}); the record lives on the member's etcd lease, so a dead member's
ports free with its routes. Every member follows the C{ports/} records through the directory's watch
and listens on each port live on another member; a visitor there is forwarded to the holding member
over a member link (L{MemberLinks.forwardPort}), which seals its bytes towards the tunnel like those
of a visitor of its own port. The forwarding member only splices bytes.

The workers of one relay (C{--workers}) are members of the cluster too, on one address: each
binds every raw TCP and UDP port with C{SO_REUSEPORT}, the holding worker for its lease and the
others to forward, and a worker that accepts a visitor for a raw TCP port another worker of the
relay holds hands it the socket itself (L{portal.relay.handoff}), with the member link as the
fallback; a UDP port's datagrams go over UDP member links, as between machines.

UDP ports are claimed the same way, so that no two members hand one port to two leases, and every
member binds every UDP port live on another member too: its datagrams go to the holding member over
a UDP member link (L{portal.relay.clusterudp.ForwardedUDPPort}), and the answers come back to the
visitor from the same port.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IAddress, IListeningPort
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from portal.forwarding.boundedreads import boundAccepts, listenUDP
from portal.forwarding.reuseport import listenSharedTCP, listenSharedUDP
from portal.forwarding.splice import SpliceProtocol, noDelay, pauseReading
from portal.forwarding.udpbuffers import enlargeBuffers
from portal.relay.cluster import ClusterDirectory, PortClaim
from portal.relay.clusterudp import ForwardedUDPPort
from portal.relay.etcd import EtcdError, EtcdUnavailable
from portal.relay.handoff import giveSocket
from portal.relay.interfaces import IPortClaims
from portal.relay.leaseports import LeasePorts
from portal.relay.memberlink import MemberLinks
from portal.relay.ports import Key
from portal.relay.store import StoreError
from portal.relay.udp import MAX_PACKET_SIZE
from portal.trust.names import leaseHostname
from portal.wire.handoff import Handoff


class ForwardedPortVisitor(SpliceProtocol, TimeoutMixin):
    """
    A visitor of a raw TCP port whose lease another member holds: paused, and forwarded there.
    """

    _log = Logger()

    def __init__(self, ports: ClusterPorts, port: int) -> None:
        super().__init__()
        self._ports = ports
        self._port = port
        router = ports.links.router
        self.callLater = router.clock.callLater  # type: ignore[method-assign, assignment]

    def connectionMade(self) -> None:
        """
        Find the member holding the port's lease now and forward the visitor there.
        """
        assert self.transport is not None
        noDelay(self.transport)
        pauseReading(self.transport)
        links = self._ports.links
        router = links.router
        peer = self.transport.getPeer()
        address = (str(getattr(peer, "host", "")), int(getattr(peer, "port", 0)))
        claim = self._ports.holding(self._port)
        member = None if claim is None else links.directory.member(claim.member)
        if claim is None or member is None:
            self.refuse(f"TCP port {self._port} is not live on any member")
            return
        handoff = links.handoff
        holder = member.id
        if handoff is not None and giveSocket(
            self.transport, lambda fd: handoff.send(holder, fd, Handoff(tcpPort=self._port))
        ):
            # Another worker of this relay, on this machine: it gets the socket itself.
            router.counters["tcp_handed_off"] = router.counters.get("tcp_handed_off", 0) + 1
            self._log.debug(
                "handed a raw TCP visitor of port {port} to worker {member}",
                port=self._port,
                member=member.nodeName,
            )
            return
        router.visitors.add(self)
        router.counters["tcp_visitors"] += 1
        router.counters["forwarded"] = router.counters.get("forwarded", 0) + 1
        self.setTimeout(router.limits.dataWaitTimeout)
        hostname = leaseHostname(claim.name, router.tunnelDomain)
        links.forwardPort(self, member, self._port, hostname, address)

    def refuse(self, reason: str) -> None:
        """
        Count and log the refusal, then close.

        @param reason: Why, for the log.
        """
        self.setTimeout(None)
        assert self.transport is not None
        peer = self.transport.getPeer()
        self._ports.links.router.refusals.refuse(
            "cluster_forward",
            "refused TCP visitor {peer} on port {port}: {reason}",
            peer=getattr(peer, "host", str(peer)),
            port=self._port,
            reason=reason,
        )
        self._pending = []
        self.transport.loseConnection()

    def timeoutConnection(self) -> None:
        """
        The holding member did not take the visitor in time.
        """
        self.refuse("the holding member did not take the visitor in time")

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """
        Stop the timer; leave the relay's visitors.
        """
        self.setTimeout(None)
        self._ports.links.router.visitors.discard(self)
        super().connectionLost(reason)


class _ForwardedPortFactory(Factory):
    """
    Builds L{ForwardedPortVisitor}s for one port.
    """

    noisy = False

    def __init__(self, ports: ClusterPorts, port: int) -> None:
        self._ports = ports
        self._port = port

    def buildProtocol(self, addr: IAddress | None) -> ForwardedPortVisitor:
        """
        @return: A visitor protocol for the port.
        """
        return ForwardedPortVisitor(self._ports, self._port)


@implementer(IPortClaims)
class ClusterPorts:
    """
    This member's raw ports of one kind in the cluster: claims in etcd for its own leases, and
    forwarding listeners (raw TCP) or sockets (UDP) on the ports of leases other members hold.

    @ivar links: The member links (and through them the router and the directory).
    @ivar leasePorts: The member's lease ports of this kind.
    @ivar kind: C{"tcp"} or C{"udp"}.
    @ivar forwarding: The forwarding listeners, by port.
    @ivar udpForwarders: The protocols of the forwarding UDP sockets, by port.
    """

    _log = Logger()

    def __init__(
        self,
        links: MemberLinks,
        leasePorts: LeasePorts,
        reactor: Any,
        forward: bool = True,
        shared: bool = False,
    ) -> None:
        """
        @param links: The member links.
        @param leasePorts: The lease ports (their claims and allocator are hooked here).
        @param reactor: Provides C{listenTCP} (C{adoptStreamPort} when C{shared}) and C{listenUDP}
            for UDP ports.
        @param forward: Whether to listen on the ports other members hold and forward their
            visitors; without, ports are only claimed.
        @param shared: Bind the forwarding TCP listeners and UDP sockets with C{SO_REUSEPORT}
            (C{--workers}: the worker holding a port's lease and the other workers all listen on
            it).
        """
        self._shared = shared
        self.links = links
        self.leasePorts = leasePorts
        self.kind = leasePorts.kind
        self._forward = forward
        self._reactor = reactor
        self._directory: ClusterDirectory = links.directory
        self.forwarding: dict[int, IListeningPort] = {}
        self.udpForwarders: dict[int, ForwardedUDPPort] = {}
        self._notifyBefore: Callable[[], None] | None = None
        self._closing: dict[int, Deferred[Any]] = {}

    def install(self) -> None:
        """
        Hook into the allocator, the lease ports and the directory, and listen on the ports other
        members hold now.
        """
        allocator = self.leasePorts.allocator
        allocator.heldElsewhere = self.heldElsewhere
        allocator.clusterPortOf = self.portOf
        allocator.liveElsewhere = self.liveElsewhere
        self.leasePorts.claims = self
        if self._forward:
            # The TCP and the UDP ports both follow the port records.
            self._notifyBefore = self._directory.onPortsChanged
            self._directory.onPortsChanged = self._portsChanged
            self.reconcile()

    def _portsChanged(self) -> None:
        """
        The port records changed: tell whoever followed them before this, then reconcile.
        """
        if self._notifyBefore is not None:
            self._notifyBefore()
        self.reconcile()

    def _now(self) -> float:
        """
        @return: The current time by the router's clock.
        """
        return self.links.router.clock.seconds()

    def heldElsewhere(self, port: int, key: Key) -> bool:
        """
        @return: Whether the cluster holds C{port}, live or reserved, for another lease than C{key}.
            This member's own reservations do not count: its allocator keeps them (and may give
            one up when the range is full).
        """
        claim = self._directory.portClaim(self.kind, port)
        if claim is None or claim.key == key or not claim.heldAt(self._now()):
            return False
        return not (claim.member == self._directory.me.id and claim.until is not None)

    def liveElsewhere(self, key: Key) -> int:
        """
        @return: How many ports of this kind the identity of C{key} holds live on other members,
            besides the lease C{key}'s own.
        """
        return self._directory.livePortsElsewhere(self.kind, *key)

    def portOf(self, key: Key) -> int | None:
        """
        @return: The port the cluster holds for the lease C{key}, live or reserved, if any.
        """
        now = self._now()
        for claim in self._directory.portClaims(self.kind):
            if claim.key == key and claim.heldAt(now):
                return claim.port
        return None

    def holding(self, port: int) -> PortClaim | None:
        """
        @return: The record of C{port} when its lease is live on another member, else L{None}.
        """
        claim = self._directory.portClaim(self.kind, port)
        if claim is None or claim.until is not None or claim.member == self._directory.me.id:
            return None
        return claim

    def claim(
        self, kind: str, port: int, owner: str, name: str, source: str | None = None
    ) -> Deferred[bool]:
        """
        Claim C{port} in etcd for the lease; once it is the lease's, close this member's forwarding
        listener on it, if any, so that the lease's own listener can bind it.

        @return: A L{Deferred} firing with whether the port is the lease's.
        """

        async def claiming() -> bool:
            try:
                other = await self._directory.claimPort(kind, port, owner, name, source)
            except (EtcdUnavailable, EtcdError) as e:
                raise StoreError(f"cluster store: {e}") from None
            if other is not None:
                return False
            await self._stopForwarding(port)
            return True

        return Deferred.fromCoroutine(claiming())

    def released(self, kind: str, port: int, owner: str, name: str, until: float | None) -> None:
        """
        The lease ended here and its listener is closed: reserve the port in etcd until C{until}
        (unless the lease is live here again), then listen again where other members hold ports.
        """
        if (owner, name) not in self.leasePorts.leases:

            def failed(failure: Failure) -> None:
                failure.trap(EtcdUnavailable, EtcdError)
                self._log.warn(
                    "could not record in the cluster that {kind} port {port} ended: {error}",
                    kind=kind,
                    port=port,
                    error=failure.getErrorMessage(),
                )

            Deferred.fromCoroutine(
                self._directory.releasePort(kind, port, owner, name, until)
            ).addErrback(failed)
        if self._forward:
            self.reconcile()

    async def _stopForwarding(self, port: int) -> None:
        """
        Close the forwarding listener on C{port} and wait until the port is unbound.
        """
        listening = self.forwarding.pop(port, None)
        self.udpForwarders.pop(port, None)
        if listening is not None:
            self._log.info(
                "stopped forwarding {kind} port {port}: its lease is here",
                kind=self.kind.upper(),
                port=port,
            )
            closing = maybeDeferred(listening.stopListening)
            self._closing[port] = closing
            try:
                await closing
            finally:
                if self._closing.get(port) is closing:
                    del self._closing[port]
        elif port in self._closing:
            await self._closing[port]

    def reconcile(self) -> None:
        """
        Listen on every port whose lease another member holds live, and stop listening on those
        that are no longer.
        """
        if not self._forward:
            return
        wanted = {
            claim.port
            for claim in self._directory.portClaims(self.kind)
            if self.holding(claim.port) is not None
        }
        own = {lease.port for lease in self.leasePorts.leases.values()}
        for port in sorted(set(self.forwarding) - wanted):
            listening = self.forwarding.pop(port)
            self.udpForwarders.pop(port, None)
            closing = maybeDeferred(listening.stopListening)
            self._closing[port] = closing
            closing.addBoth(self._closed, port, closing)
            self._log.info(
                "stopped forwarding {kind} port {port}", kind=self.kind.upper(), port=port
            )
        for forwarder in self.udpForwarders.values():
            forwarder.checkHolder()
        for port in sorted(wanted - set(self.forwarding) - own - set(self._closing)):
            self._listen(port)

    def _closed(self, result: object, port: int, closing: Deferred[Any]) -> None:
        """
        A forwarding listener is unbound: it may be wanted again.
        """
        if self._closing.get(port) is closing:
            del self._closing[port]
            self.reconcile()

    def _listen(self, port: int) -> None:
        """
        Listen on C{port} to forward its visitors.
        """
        router = self.links.router
        interface = self.leasePorts.interface
        forwarder = None
        try:
            if self.kind == "udp":
                forwarder = ForwardedUDPPort(self.links, port, self.holding)
                listening = (listenSharedUDP if self._shared else listenUDP)(
                    self._reactor,
                    port,
                    forwarder,
                    interface=interface,
                    maxPacketSize=MAX_PACKET_SIZE,
                )
                enlargeBuffers(listening)
            else:
                factory = router.limited("tcp", _ForwardedPortFactory(self, port))
                if self._shared:
                    listening = listenSharedTCP(self._reactor, port, interface, factory)
                else:
                    listening = self._reactor.listenTCP(port, factory, interface=interface)
                boundAccepts(listening)
        except CannotListenError as e:
            self._log.warn(
                "cannot forward {kind} port {port} held by another member: {error}",
                kind=self.kind.upper(),
                port=port,
                error=str(e),
            )
            return
        self.forwarding[port] = listening
        if forwarder is not None:
            self.udpForwarders[port] = forwarder
        self._log.info(
            "forwarding {kind} port {port} to the member holding it",
            kind=self.kind.upper(),
            port=port,
        )

    def stop(self) -> Deferred[Any]:
        """
        Close every forwarding listener (relay shutdown).
        """
        if self._forward and self._directory.onPortsChanged == self._portsChanged:
            self._directory.onPortsChanged = self._notifyBefore
        listening, self.forwarding = list(self.forwarding.values()), {}
        self.udpForwarders = {}
        return gatherResults([maybeDeferred(p.stopListening) for p in listening])
