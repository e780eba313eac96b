"""
Tests for L{portal.relay.memberlink}: the holding member's check of a member link, in memory.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransportWithDisconnection
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from portal.relay.cluster import ICluster, Member
from portal.relay.etcd import EtcdUnavailable
from portal.relay.memberlink import MemberLinks, MemberVisitor
from portal.relay.router import Router
from portal.relay.store import ClaimsUnavailable, ILeaseClaims
from portal.trust.identity import Identity
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
        visitor = MemberVisitor(self.router, self.links)
        transport = StringTransportWithDisconnection(
            peerAddress=IPv4Address("TCP", "127.0.0.9", 5555)
        )
        transport.protocol = visitor
        visitor.makeConnection(transport)
        nonce = transport.value()
        transport.clear()
        return visitor, transport, nonce

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

        async def unreachable(name: str, owner: str, hold: float) -> str | None:
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
