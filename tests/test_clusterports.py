"""
Tests for L{portal.relay.clusterports} and the C{ports/} records of L{portal.relay.cluster}: raw TCP
ports handed out cluster-wide, on an in-memory etcd (L{tests.fakeetcd}).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import CannotListenError, ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransportWithDisconnection
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from portal.relay.cluster import (
    ClusterDirectory,
    Member,
    PortClaim,
    parsePortRecord,
    portRecord,
)
from portal.relay.clusterports import ClusterPorts
from portal.relay.clusterudp import ForwardedUDPPort
from portal.relay.interfaces import IPortClaims
from portal.relay.leaseports import LeasePorts, PortLease
from portal.relay.memberlink import MemberLinks
from portal.relay.ports import PortAllocator, PortLimitReached, PortRange, PortsExhausted
from portal.relay.router import Router
from portal.relay.store import StoreError
from portal.relay.udp import MAX_PACKET_SIZE
from portal.trust.identity import Identity
from portal.wire.handoff import Handoff
from tests.fakeetcd import FakeEtcd

DOMAIN = "cluster.test"


class _Port:
    """
    A listening port on a L{_Machine}.
    """

    def __init__(self, machine: _Machine, port: int, factory: Any) -> None:
        self._machine = machine
        self.port = port
        self.factory = factory
        self.maxPacketSize = 0

    def stopListening(self) -> Deferred[None]:
        """
        Unbind at once.
        """
        self._machine.bound.pop(self.port, None)
        return succeed(None)


class _Machine:
    """
    The TCP (or UDP) ports of one member's machine: binding a bound port fails as it would.
    """

    def __init__(self) -> None:
        self.bound: dict[int, _Port] = {}

    def listenTCP(self, port: int, factory: Any, interface: str = "") -> _Port:
        """
        Bind C{port}.

        @raise CannotListenError: When it is bound already.
        """
        if port in self.bound:
            raise CannotListenError(interface, port, OSError("address in use"))
        listening = self.bound[port] = _Port(self, port, factory)
        return listening

    def listenUDP(
        self, port: int, protocol: Any, interface: str = "", maxPacketSize: int = 8192
    ) -> _Port:
        """
        Bind UDP C{port} (the protocol is kept as the port's C{factory}).

        @raise CannotListenError: When it is bound already.
        """
        listening = self.listenTCP(port, protocol, interface)
        listening.maxPacketSize = maxPacketSize
        return listening


class _Node:
    """
    One cluster member: its directory, router, allocator, raw TCP lease ports and cluster ports.

    @ivar source: The source address its leases register from (it is their control session).
    """

    source: str | None = None

    def __init__(self, etcd: FakeEtcd, clock: Clock, name: str, grace: float | None) -> None:
        self.identity = Identity.generate()
        self.member = Member(self.identity.id, self.identity.publicKey, f"10.0.0.{name}:4017", name)
        self.directory = ClusterDirectory(etcd, clock, DOMAIN, self.member)  # type: ignore[arg-type]
        self.router = Router(self.identity, clock, tunnelDomain=DOMAIN)
        self.machine = _Machine()
        self.allocator = PortAllocator(PortRange(9000, 9002), clock, reservation=100.0, grace=grace)

        def listen(lease: PortLease, interface: str) -> Any:
            return self.machine.listenTCP(lease.port, None, interface)

        self.tcp = LeasePorts("tcp", self.allocator, listen)
        self.router.tcp = self.tcp
        self.links = MemberLinks(self.router, self.directory, self.identity, None)
        self.ports = ClusterPorts(self.links, self.tcp, self.machine)

    def open(self, owner: str, name: str) -> Deferred[PortLease]:
        """
        Open the raw TCP port of lease C{name} of C{owner} on this member.
        """
        coroutine = self.tcp.open(self.router, owner, name, f"{name}.{DOMAIN}", self)
        return Deferred.fromCoroutine(coroutine)


class PortRecordTests(SynchronousTestCase):
    """
    The C{ports/} records' values.
    """

    def test_roundTrip(self) -> None:
        """
        A live and a reserved claim parse back as written.
        """
        for claim in [
            PortClaim("tcp", 9000, "alice", "db", "m1"),
            PortClaim("tcp", 9001, "bob", "web", "m2", 1234.5),
        ]:
            self.assertEqual(parsePortRecord("tcp", claim.port, portRecord(claim)), claim)

    def test_malformed(self) -> None:
        """
        A malformed record is ignored (L{None}).
        """
        for value in [
            b"",
            b"[]",
            b'{"owner":"a","name":"n"}',
            b'{"owner":1,"name":"n","member":"m"}',
            b'{"owner":"a","name":"n","member":"m","until":"soon"}',
            b'{"owner":"a","name":"n","member":"m","until":true}',
        ]:
            self.assertIsNone(parsePortRecord("tcp", 9000, value))


class ClusterPortsTests(SynchronousTestCase):
    """
    Two members, A and B, on one etcd, each with the raw TCP range 9000-9002.
    """

    def setUp(self) -> None:
        """
        Join A and B and hook their cluster ports.
        """
        self.etcd = FakeEtcd()
        self.clock = Clock()
        self.clock.advance(1000)
        self.a = self.node("1")
        self.b = self.node("2")

    def node(self, name: str, grace: float | None = None) -> _Node:
        """
        @return: A member that joined the cluster, its cluster ports installed.
        """
        node = _Node(self.etcd, self.clock, name, grace)
        self.successResultOf(node.directory.start())
        node.ports.install()
        self.addCleanup(node.directory.stop)
        return node

    def test_provides(self) -> None:
        """
        L{ClusterPorts} provides L{IPortClaims}.
        """
        self.assertTrue(verifyObject(IPortClaims, self.a.ports))

    def test_twoMembersNeverShareAPort(self) -> None:
        """
        Leases registered on two members get different ports; each port's record names its lease
        and the member holding it.
        """
        alice = self.successResultOf(self.a.open("alice", "db"))
        bob = self.successResultOf(self.b.open("bob", "web"))
        self.assertEqual((alice.port, bob.port), (9000, 9001))
        self.assertEqual(
            self.b.directory.portClaim("tcp", 9000),
            PortClaim("tcp", 9000, "alice", "db", self.a.member.id),
        )
        self.assertEqual(
            self.a.directory.portClaim("tcp", 9001),
            PortClaim("tcp", 9001, "bob", "web", self.b.member.id),
        )

    def test_everyMemberListensOnEveryLivePort(self) -> None:
        """
        Each member listens on its own lease's port and forwards the other's; a port that ends
        stops being forwarded.
        """
        self.successResultOf(self.a.open("alice", "db"))
        self.successResultOf(self.b.open("bob", "web"))
        self.assertEqual(sorted(self.a.machine.bound), [9000, 9001])
        self.assertEqual(sorted(self.b.machine.bound), [9000, 9001])
        self.assertEqual(sorted(self.a.ports.forwarding), [9001])
        self.assertEqual(sorted(self.b.ports.forwarding), [9000])
        self.successResultOf(self.a.tcp.close("alice", "db"))
        self.assertEqual(sorted(self.b.machine.bound), [9001])
        self.assertEqual(self.b.ports.forwarding, {})

    def test_identityPortLimitAcrossMembers(self) -> None:
        """
        An identity's ports live on other members count towards its limit of live ports: it is
        refused at B what it holds at A, with a message saying so; a port that stops being live
        there (reserved) no longer counts.
        """
        self.a.allocator.maxPerIdentity = self.b.allocator.maxPerIdentity = 2
        self.successResultOf(self.a.open("alice", "x"))
        self.successResultOf(self.a.open("alice", "y"))
        failure = self.failureResultOf(self.b.open("alice", "z"), PortLimitReached)
        self.assertEqual(
            failure.getErrorMessage(),
            "identity already holds 2 live ports in this relay cluster, the most allowed; "
            "close a tunnel before opening 'z'",
        )
        self.successResultOf(self.a.tcp.close("alice", "y"))
        self.assertEqual(self.successResultOf(self.b.open("alice", "z")).port, 9002)

    def test_recordsNameTheSource(self) -> None:
        """
        A port's record names the source address of the control session holding its lease, and
        counts for that source at the other member.
        """
        self.a.source = "10.0.0.7"
        self.successResultOf(self.a.open("alice", "db"))
        claim = self.b.directory.portClaim("tcp", 9000)
        self.assertEqual(
            claim, PortClaim("tcp", 9000, "alice", "db", self.a.member.id, None, "10.0.0.7")
        )
        self.assertEqual(self.b.directory.portQuota.heldBy("10.0.0.7"), {("tcp", "alice", "db")})

    def test_raceWithAStaleCopy(self) -> None:
        """
        A member whose copy of the directory is behind allocates a port another member just
        claimed: etcd's compare-and-set refuses it, and the member takes the next port.
        """
        self.etcd.holdEvents = True
        self.successResultOf(self.a.open("alice", "db"))
        self.assertIsNone(self.b.directory.portClaim("tcp", 9000))
        bob = self.successResultOf(self.b.open("bob", "web"))
        self.assertEqual(bob.port, 9001)
        self.assertEqual(self.b.allocator.owner(9000), None)
        self.assertEqual(self.b.allocator.portFor("bob", "web"), 9001)
        self.etcd.release()
        self.assertEqual(sorted(self.b.ports.forwarding), [9000])

    def test_reservationHoldsInTheCluster(self) -> None:
        """
        A port whose lease ended stays reserved for it in the cluster: another identity on another
        member does not get it until the reservation ends.
        """
        self.successResultOf(self.a.open("alice", "db"))
        self.successResultOf(self.a.tcp.close("alice", "db"))
        claim = self.b.directory.portClaim("tcp", 9000)
        assert claim is not None
        self.assertEqual(claim.until, self.clock.seconds() + 100.0)
        bob = self.successResultOf(self.b.open("bob", "web"))
        self.assertEqual(bob.port, 9001)
        self.clock.advance(101)
        carol = self.successResultOf(self.b.open("carol", "x"))
        self.assertEqual(carol.port, 9000)

    def test_ownReservationGivenUpUnderPressure(self) -> None:
        """
        When the range is full of this member's own reservations, the oldest past its grace period
        is given up here, and the cluster lets this member give its port to the newcomer; another
        member's reservations still hold.
        """
        a = self.node("3", grace=0.0)
        for name in ["x", "y", "z"]:
            self.successResultOf(a.open("alice", name))
            self.clock.advance(1)
            self.successResultOf(a.tcp.close("alice", name))
        self.failureResultOf(self.b.open("bob", "web"), PortsExhausted)
        newcomer = self.successResultOf(a.open("carol", "db"))
        self.assertEqual(newcomer.port, 9000)
        self.assertEqual(
            self.b.directory.portClaim("tcp", 9000),
            PortClaim("tcp", 9000, "carol", "db", a.member.id),
        )

    def test_portFollowsTheLeaseToAnotherMember(self) -> None:
        """
        A tunnel that moves from A to B gets its port back on B (live or reserved), and A then
        forwards the port to B.
        """
        self.successResultOf(self.a.open("alice", "db"))
        self.successResultOf(self.a.tcp.close("alice", "db"))
        moved = self.successResultOf(self.b.open("alice", "db"))
        self.assertEqual(moved.port, 9000)
        self.assertEqual(
            self.a.directory.portClaim("tcp", 9000),
            PortClaim("tcp", 9000, "alice", "db", self.b.member.id),
        )
        self.assertEqual(sorted(self.a.ports.forwarding), [9000])

    def test_takeoverClosesTheForwardingListener(self) -> None:
        """
        A lease live on A that a new session of its owner takes to B: B stops forwarding the port
        and listens on it for the lease; A, whose old listener still holds the port, forwards it
        once that listener closes.
        """
        self.successResultOf(self.a.open("alice", "db"))
        self.assertEqual(sorted(self.b.ports.forwarding), [9000])
        moved = self.successResultOf(self.b.open("alice", "db"))
        self.assertEqual(moved.port, 9000)
        self.assertEqual(self.b.ports.forwarding, {})
        self.assertIsNone(self.b.machine.bound[9000].factory)
        self.assertEqual(self.a.ports.forwarding, {})
        self.successResultOf(self.a.tcp.close("alice", "db"))
        self.assertEqual(sorted(self.a.ports.forwarding), [9000])
        # A's release did not turn B's live record into a reservation.
        claim = self.b.directory.portClaim("tcp", 9000)
        assert claim is not None
        self.assertEqual((claim.member, claim.until), (self.b.member.id, None))

    def test_deadMemberFreesItsPorts(self) -> None:
        """
        When a member's etcd lease ends (it died), its port records go with it: the others stop
        forwarding and may hand the port out.
        """
        self.successResultOf(self.a.open("alice", "db"))
        self.assertEqual(sorted(self.b.ports.forwarding), [9000])
        self.etcd.expire(self.a.directory._lease)
        self.assertEqual(self.b.ports.forwarding, {})
        bob = self.successResultOf(self.b.open("bob", "web"))
        self.assertEqual(bob.port, 9000)

    def test_lapsedMemberWritesItsPortsAgain(self) -> None:
        """
        A member whose etcd lease lapsed (its keep-alives did not arrive in time) loses its port
        records with it, and writes them again when it rejoins; the other member forwards again.
        """
        self.successResultOf(self.a.open("alice", "db"))
        self.etcd.expire(self.a.directory._lease)
        self.assertIsNone(self.b.directory.portClaim("tcp", 9000))
        self.assertEqual(self.b.ports.forwarding, {})
        self.clock.advance(10)
        self.assertEqual(
            self.b.directory.portClaim("tcp", 9000),
            PortClaim("tcp", 9000, "alice", "db", self.a.member.id),
        )
        self.assertEqual(sorted(self.b.ports.forwarding), [9000])

    def test_etcdAway(self) -> None:
        """
        With etcd away, opening a port fails with L{StoreError} (the registration is retried) and
        the allocator keeps no live port for the lease.
        """
        self.etcd.available = False
        self.failureResultOf(self.a.open("alice", "db"), StoreError)
        self.assertIsNone(self.a.allocator.portFor("alice", "db"))
        self.assertEqual(self.a.allocator.live, 0)
        self.assertEqual(self.a.machine.bound, {})

    def test_exhaustedByOtherMembers(self) -> None:
        """
        When every port of the range is held by other members, the allocation fails with a reason
        that says so.
        """
        for name in ["x", "y", "z"]:
            self.successResultOf(self.a.open("alice", name))
        failure = self.failureResultOf(self.b.open("bob", "web"), PortsExhausted)
        self.assertIn("held by other members of the cluster", str(failure.value))

    def test_udpPortsClaimedAndForwarded(self) -> None:
        """
        UDP ports are claimed in the cluster too (two members never give one port to two leases),
        and each member binds the UDP port another member holds, with a forwarding protocol, next
        to its TCP forwarding (both follow the port records); a port that ends stops being
        forwarded.
        """
        udp = {}
        for node in (self.a, self.b):
            machine = _Machine()
            allocator = PortAllocator(PortRange(9000, 9002), self.clock, kind="udp")
            ports = LeasePorts(
                "udp",
                allocator,
                lambda lease, interface, machine=machine: machine.listenUDP(lease.port, None),
            )
            cluster = ClusterPorts(node.links, ports, machine)
            cluster.install()
            udp[node] = (ports, machine, cluster)
        opened = [
            self.successResultOf(
                Deferred.fromCoroutine(
                    udp[node][0].open(node.router, owner, "voice", f"voice.{DOMAIN}", node)
                )
            ).port
            for node, owner in [(self.a, "alice"), (self.b, "bob")]
        ]
        self.assertEqual(opened, [9000, 9001])
        self.assertEqual(sorted(udp[self.a][1].bound), [9000, 9001])
        self.assertEqual(sorted(udp[self.b][1].bound), [9000, 9001])
        forwarder = udp[self.a][2].udpForwarders[9001]
        self.assertIsInstance(forwarder, ForwardedUDPPort)
        self.assertIs(udp[self.a][1].bound[9001].factory, forwarder)
        self.assertEqual(udp[self.a][1].bound[9001].maxPacketSize, MAX_PACKET_SIZE)
        claim = self.a.directory.portClaim("udp", 9001)
        assert claim is not None
        self.assertEqual(claim.member, self.b.member.id)
        self.assertEqual(self.a.ports.forwarding, {})
        # The TCP ports still follow the records with the UDP ports hooked after them.
        self.successResultOf(self.b.open("carol", "db"))
        self.assertEqual(sorted(self.a.ports.forwarding), [9000])
        self.successResultOf(udp[self.b][0].close("bob", "voice"))
        self.assertEqual(sorted(udp[self.a][1].bound), [9000])
        self.assertEqual(udp[self.a][2].udpForwarders, {})

    def test_listenFailureReleasesTheClaim(self) -> None:
        """
        A port claimed in the cluster that cannot be bound here is released there again (reserved
        for the lease, as on a single relay), and the lease gets no port.
        """
        self.a.machine.bound[9000] = _Port(self.a.machine, 9000, None)
        self.failureResultOf(self.a.open("alice", "db"), CannotListenError)
        claim = self.b.directory.portClaim("tcp", 9000)
        assert claim is not None
        self.assertEqual(claim.until, self.a.allocator.reservedUntil("alice", "db"))
        self.assertIsNotNone(claim.until)
        self.assertEqual(self.b.ports.forwarding, {})

    def test_forwardedVisitor(self) -> None:
        """
        A visitor of a port B forwards is handed to the member links with the holding member, the
        lease's hostname and the visitor's address.
        """
        self.successResultOf(self.a.open("alice", "db"))
        forwarded: list[tuple[Any, ...]] = []
        self.b.links.forwardPort = lambda *args: forwarded.append(args)  # type: ignore[method-assign]
        factory = self.b.machine.bound[9000].factory
        visitor = factory.buildProtocol(IPv4Address("TCP", "198.51.100.4", 999))
        transport = StringTransportWithDisconnection(
            peerAddress=IPv4Address("TCP", "198.51.100.4", 999)
        )
        transport.protocol = visitor
        visitor.makeConnection(transport)
        [(protocol, member, port, hostname, peer)] = forwarded
        self.assertEqual(
            (member, port, hostname, peer),
            (self.a.member, 9000, f"db.{DOMAIN}", ("198.51.100.4", 999)),
        )
        self.assertEqual(transport.producerState, "paused")
        self.assertEqual(self.b.router.counters["forwarded"], 1)
        self.assertIn(protocol, self.b.router.visitors)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertNotIn(protocol, self.b.router.visitors)


class AllocatorHookTests(SynchronousTestCase):
    """
    L{PortAllocator}'s cluster hooks, alone.
    """

    def test_reservationTakenInTheClusterIsForgotten(self) -> None:
        """
        A port reserved here for a lease, which the cluster has since given to another lease, is
        not handed back to it: the lease gets the next port the cluster leaves free.
        """
        clock = Clock()
        allocator = PortAllocator(PortRange(9000, 9002), clock, reservation=100.0)
        self.assertEqual(allocator.allocate("alice", "db"), 9000)
        allocator.release("alice", "db")
        elsewhere = {9000: ("bob", "web")}
        allocator.heldElsewhere = lambda port, key: elsewhere.get(port, key) != key
        self.assertEqual(allocator.allocate("alice", "db"), 9001)
        self.assertIsNone(allocator.reservedUntil("alice", "db"))

    def test_clusterPortPreferred(self) -> None:
        """
        A lease the cluster holds a port for gets that port, not the lowest free one.
        """
        allocator = PortAllocator(PortRange(9000, 9002), Clock())
        allocator.heldElsewhere = lambda port, key: False
        allocator.clusterPortOf = lambda key: 9002 if key == ("alice", "db") else None
        self.assertEqual(allocator.allocate("alice", "db"), 9002)
        self.assertEqual(allocator.allocate("bob", "web"), 9000)

    def test_abandon(self) -> None:
        """
        An abandoned allocation frees its port at once, with no reservation.
        """
        allocator = PortAllocator(PortRange(9000, 9001), Clock(), reservation=100.0)
        self.assertEqual(allocator.allocate("alice", "db"), 9000)
        self.assertEqual(allocator.abandon("alice", "db"), 9000)
        self.assertIsNone(allocator.abandon("alice", "db"))
        self.assertEqual((allocator.live, allocator.reserved), (0, 0))
        self.assertEqual(allocator.allocate("bob", "web"), 9000)


class _HandoffSender:
    """
    Records the visitors a worker hands over, and whether it could.

    @ivar sent: C{(memberId, fd, handoff)} of each visitor handed over.
    """

    def __init__(self, succeeds: bool) -> None:
        self.succeeds = succeeds
        self.sent: list[tuple[str, int, Handoff]] = []

    def send(self, memberId: str, fd: int, handoff: Handoff) -> bool:
        """
        Record the visitor; say whether it was sent.
        """
        self.sent.append((memberId, fd, handoff))
        return self.succeeds


class _DescriptorTransport(StringTransportWithDisconnection):
    """
    An in-memory transport with a descriptor, as Twisted's TCP transport has.
    """

    _shouldShutdown = True

    def fileno(self) -> int:
        return 42


class WorkerHandoffTests(SynchronousTestCase):
    """
    C{--workers}: a worker that accepts a visitor of a raw TCP port another worker of its relay
    holds hands the visitor's socket to it, with the port.
    """

    def setUp(self) -> None:
        self.etcd = FakeEtcd()
        self.clock = Clock()
        self.clock.advance(1000)
        self.a = _Node(self.etcd, self.clock, "1", None)
        self.b = _Node(self.etcd, self.clock, "2", None)
        for node in (self.a, self.b):
            self.successResultOf(node.directory.start())
            node.ports.install()
            self.addCleanup(node.directory.stop)
        self.successResultOf(self.a.open("alice", "db"))
        self.forwarded: list[tuple[Any, ...]] = []
        self.b.links.forwardPort = lambda *args: self.forwarded.append(args)  # type: ignore[method-assign]

    def visit(self) -> tuple[Any, _DescriptorTransport]:
        """
        Connect a visitor to B's forwarding listener on A's port.
        """
        peer = IPv4Address("TCP", "198.51.100.4", 999)
        visitor = self.b.machine.bound[9000].factory.buildProtocol(peer)
        transport = _DescriptorTransport(peerAddress=peer)
        transport.protocol = visitor
        visitor.makeConnection(transport)
        return visitor, transport

    def test_handedOver(self) -> None:
        """
        The socket goes to the holding member with the port, and this worker closes its copy
        without shutting the connection down; no member link is opened.
        """
        sender = _HandoffSender(True)
        self.b.links.handoff = sender  # type: ignore[assignment]
        visitor, transport = self.visit()
        self.assertEqual(sender.sent, [(self.a.member.id, 42, Handoff(tcpPort=9000))])
        self.assertEqual(self.forwarded, [])
        self.assertFalse(transport.connected)
        self.assertFalse(transport._shouldShutdown)
        self.assertEqual(self.b.router.counters["tcp_handed_off"], 1)
        self.assertNotIn("forwarded", self.b.router.counters)
        self.assertNotIn(visitor, self.b.router.visitors)

    def test_memberLinkFallback(self) -> None:
        """
        When the socket cannot be handed over (not a worker of this relay, or it is away), the
        visitor goes over a member link as before.
        """
        sender = _HandoffSender(False)
        self.b.links.handoff = sender  # type: ignore[assignment]
        _, transport = self.visit()
        self.assertEqual(len(sender.sent), 1)
        [(_, member, port, _, _)] = self.forwarded
        self.assertEqual((member, port), (self.a.member, 9000))
        self.assertTrue(transport.connected)
        self.assertTrue(transport._shouldShutdown)
        self.assertEqual(self.b.router.counters["forwarded"], 1)
        self.assertNotIn("tcp_handed_off", self.b.router.counters)
