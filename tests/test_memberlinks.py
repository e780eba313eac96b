"""
Tests for L{portal.relay.memberlink}: the holding member's check of a member link, in memory.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransportWithDisconnection
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from portal.relay.cluster import ICluster, Member
from portal.relay.etcd import EtcdUnavailable
from portal.relay.leaseports import LeasePorts
from portal.relay.memberlink import MemberLinks, MemberVisitor
from portal.relay.ports import PortAllocator, PortRange
from portal.relay.router import Router
from portal.relay.store import ClaimsUnavailable, ILeaseClaims
from portal.trust.identity import Identity
from portal.wire.attach import StreamHeader
from portal.wire.clienthello import UNRECOGNIZED_NAME, alertRecord
from portal.wire.memberlink import ACK, MAGIC, MemberHeader, encodeMemberHeader, pairKey
from tests.test_relay_public import clientHello


class FakeDirectory:
    """
    A cluster directory with fixed members and routes.
    """

    def __init__(self, me: Member, members: list[Member], live: dict[str, str]) -> None:
        self.me = me
        self._members = {m.id: m for m in members}
        self._live = live
        self.available = True

    def member(self, memberId: str) -> Member | None:
        """
        @return: The member with that id.
        """
        return self._members.get(memberId)

    def members(self) -> list[Member]:
        """
        @return: Every member.
        """
        return list(self._members.values())

    def holderOf(self, name: str) -> Member | None:
        """
        @return: The member holding C{name}.
        """
        holder = self._live.get(name)
        return None if holder is None else self._members.get(holder)


def asMember(identity: Identity, name: str) -> Member:
    """
    @return: C{identity} as a cluster member.
    """
    return Member(identity.id, identity.publicKey, "127.0.0.1:4017", name)


def _openLink(
    router: Router, links: MemberLinks
) -> tuple[MemberVisitor, StringTransportWithDisconnection, bytes]:
    """
    Open a member link to A (C{router}) from 127.0.0.9.

    @return: A's protocol for the link, its transport, and the nonce it sent.
    """
    visitor = MemberVisitor(router, links)
    transport = StringTransportWithDisconnection(peerAddress=IPv4Address("TCP", "127.0.0.9", 5555))
    transport.protocol = visitor
    visitor.makeConnection(transport)
    nonce = transport.value()
    transport.clear()
    return visitor, transport, nonce


class MemberVisitorTests(SynchronousTestCase):
    """
    Member A receiving links from B (a member) and M (not one).
    """

    def setUp(self) -> None:
        """
        A's router and links; B is a member, M is not.
        """
        self.a, self.b, self.m = Identity.generate(), Identity.generate(), Identity.generate()
        self.clock = Clock()
        self.router = Router(self.a, self.clock, tunnelDomain="cluster.test")
        self.directory = FakeDirectory(
            asMember(self.a, "a"),
            [asMember(self.a, "a"), asMember(self.b, "b")],
            {"blog": self.a.id},
        )
        self.links = MemberLinks(self.router, self.directory, self.a, None)  # type: ignore[arg-type]
        self.router.cluster = self.links

    def connect(self) -> tuple[MemberVisitor, StringTransportWithDisconnection, bytes]:
        """
        @return: A's protocol for a new link, its transport, and the nonce it sent.
        """
        return _openLink(self.router, self.links)

    def header(self, sender: Identity, hostname: str = "blog.cluster.test") -> MemberHeader:
        """
        @return: A link header from C{sender} for a visitor at 198.51.100.4:999.
        """
        return MemberHeader(sender.id, sender.publicKey, hostname, "198.51.100.4", 999)

    def test_provides(self) -> None:
        """
        L{MemberLinks} provides L{ICluster}.
        """
        self.assertTrue(verifyObject(ICluster, self.links))

    def test_memberAccepted(self) -> None:
        """
        A valid link from a member is acknowledged, and the visitor's real address is used.
        """
        visitor, transport, nonce = self.connect()
        key = pairKey(self.b.privateKey, self.a.publicKey)
        visitor.dataReceived(MAGIC + encodeMemberHeader(key, self.a.id, nonce, self.header(self.b)))
        self.assertEqual(transport.value(), ACK)
        self.assertTrue(transport.connected)
        self.assertEqual(visitor.visitorAddress(), ("198.51.100.4", 999))

    def test_nonMemberRefused(self) -> None:
        """
        A link from an identity that is not a member is closed without an ACK.
        """
        visitor, transport, nonce = self.connect()
        key = pairKey(self.m.privateKey, self.a.publicKey)
        visitor.dataReceived(MAGIC + encodeMemberHeader(key, self.a.id, nonce, self.header(self.m)))
        self.assertEqual(transport.value(), b"")
        self.assertFalse(transport.connected)
        self.assertEqual(self.router.counters["member_links_refused"], 1)

    def test_forgedProofRefused(self) -> None:
        """
        A link naming member B but proven with M's key (or for another nonce) is refused.
        """
        visitor, transport, nonce = self.connect()
        key = pairKey(self.m.privateKey, self.a.publicKey)
        visitor.dataReceived(MAGIC + encodeMemberHeader(key, self.a.id, nonce, self.header(self.b)))
        self.assertFalse(transport.connected)
        visitor, transport, nonce = self.connect()
        key = pairKey(self.b.privateKey, self.a.publicKey)
        replay = encodeMemberHeader(key, self.a.id, b"\0" * 16, self.header(self.b))
        visitor.dataReceived(MAGIC + replay)
        self.assertFalse(transport.connected)

    def test_otherHostnameRefused(self) -> None:
        """
        A link opened for one hostname that carries a ClientHello for another is refused with
        C{unrecognized_name}: a member cannot use a link to reach leases it did not name.
        """
        visitor, transport, nonce = self.connect()
        key = pairKey(self.b.privateKey, self.a.publicKey)
        data = MAGIC + encodeMemberHeader(key, self.a.id, nonce, self.header(self.b))
        visitor.dataReceived(data + clientHello("other.cluster.test"))
        self.assertEqual(transport.value(), ACK + alertRecord(UNRECOGNIZED_NAME))
        self.assertFalse(transport.connected)

    def test_holderElsewhere(self) -> None:
        """
        A lease held by this member is not "elsewhere"; one held by B is; a name outside the
        tunnel domain is nobody's.
        """
        self.assertIsNone(self.links.holderElsewhere("blog.cluster.test"))
        self.directory._live["shop"] = self.b.id
        holder = self.links.holderElsewhere("shop.cluster.test")
        assert holder is not None
        self.assertEqual(holder.id, self.b.id)
        self.assertIsNone(self.links.holderElsewhere("shop.example.com"))

    def test_claimsUnavailable(self) -> None:
        """
        The links are the cluster's L{ILeaseClaims}: a claim etcd cannot answer fails with
        L{ClaimsUnavailable}, which is all the registration path knows of etcd.
        """
        self.assertTrue(verifyObject(ILeaseClaims, self.links))

        async def unreachable(
            name: str, owner: str, hold: float, source: str | None = None
        ) -> str | None:
            raise EtcdUnavailable("etcd unavailable (connection refused)")

        self.directory.claimOwnership = unreachable  # type: ignore[attr-defined]
        failure = self.failureResultOf(self.links.claim(["shop"], "owner"), ClaimsUnavailable)
        self.assertIn("connection refused", failure.getErrorMessage())

    def test_mayRegister(self) -> None:
        """
        Registrations are refused with the reason while the store is away.
        """
        self.assertIsNone(self.links.mayRegister())
        self.directory.available = False
        self.assertEqual(self.links.mayRegister(), "cluster store unavailable")


class _Holder:
    """
    A control session holding a raw TCP lease, with a pool that records what it is given.
    """

    def __init__(self) -> None:
        self.pool = self
        self.routed: list[tuple[object, StreamHeader]] = []

    def route(self, visitor: object, header: StreamHeader) -> bool:
        """
        Record a visitor routed to the pool.

        @return: C{True}: the visitor is taken.
        """
        self.routed.append((visitor, header))
        return True

    def abandon(self, visitor: object) -> None:
        """
        Forget a visitor that left.
        """
        self.routed = [(v, h) for v, h in self.routed if v is not visitor]


class RawPortLinkTests(SynchronousTestCase):
    """
    Member A receiving a link from B for a raw TCP lease A holds on port 9000.
    """

    def setUp(self) -> None:
        """
        A's router with the raw TCP lease "db" of alice live on port 9000.
        """
        self.a, self.b = Identity.generate(), Identity.generate()
        self.clock = Clock()
        self.router = Router(self.a, self.clock, tunnelDomain="cluster.test")
        directory = FakeDirectory(
            asMember(self.a, "a"), [asMember(self.a, "a"), asMember(self.b, "b")], {}
        )
        self.links = MemberLinks(self.router, directory, self.a, None)  # type: ignore[arg-type]
        self.router.cluster = self.links
        allocator = PortAllocator(PortRange(9000, 9001), self.clock)
        self.ports = LeasePorts("tcp", allocator, lambda lease, interface: _Listening())
        self.router.tcp = self.ports
        self.holder = _Holder()
        self.router.leases.register("db", "alice", self.holder)
        opening = Deferred.fromCoroutine(
            self.ports.open(self.router, "alice", "db", "db.cluster.test", self.holder)
        )
        self.assertEqual(self.successResultOf(opening).port, 9000)

    def link(self, port: int, hostname: str = "db.cluster.test") -> tuple[Any, Any]:
        """
        Open a link from B for a visitor of C{port}, with the visitor's first bytes.

        @return: A's protocol and its transport.
        """
        visitor, transport, nonce = _openLink(self.router, self.links)
        header = MemberHeader(
            self.b.id, self.b.publicKey, hostname, "198.51.100.4", 999, tcpPort=port
        )
        key = pairKey(self.b.privateKey, self.a.publicKey)
        visitor.dataReceived(MAGIC + encodeMemberHeader(key, self.a.id, nonce, header) + b"PING")
        return visitor, transport

    def test_routedToTheLeasePool(self) -> None:
        """
        A link naming the lease's port is acknowledged and its visitor routed to the lease's pool
        with the visitor's real address and no ClientHello read; its first bytes wait for the
        data session.
        """
        visitor, transport = self.link(9000)
        self.assertEqual(transport.value(), ACK)
        self.assertTrue(transport.connected)
        [(routed, header)] = self.holder.routed
        self.assertIs(routed, visitor)
        self.assertEqual(
            (header.hostname, header.peerHost, header.peerPort),
            ("db.cluster.test", "198.51.100.4", 999),
        )
        self.assertEqual(visitor.takePending(), b"PING")
        self.assertEqual(self.router.counters["tcp_visitors"], 1)
        self.assertIn(visitor, self.ports.leases[("alice", "db")].visitors)

    def test_unknownPortRefused(self) -> None:
        """
        A link naming a port no lease holds here, or the lease's port with another hostname, is
        closed without a TLS alert (a raw visitor is no TLS client).
        """
        for port, hostname in [(9001, "db.cluster.test"), (9000, "other.cluster.test")]:
            _, transport = self.link(port, hostname)
            self.assertEqual(transport.value(), ACK)
            self.assertFalse(transport.connected)
        self.assertEqual(self.holder.routed, [])

    def test_lapsedLeaseRefused(self) -> None:
        """
        A link for the port of a lease that is no longer live here is closed.
        """
        self.router.leases.detach(self.holder)
        _, transport = self.link(9000)
        self.assertFalse(transport.connected)
        self.assertEqual(self.holder.routed, [])


class _Listening:
    """
    A listening port that listens nowhere.
    """

    def stopListening(self) -> None:
        """
        Nothing to stop.
        """
