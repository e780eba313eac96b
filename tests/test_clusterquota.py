"""
Tests for L{portal.relay.clusterquota} and the quota indexes of L{portal.relay.cluster}'s directory:
what each source address and identity holds in the whole cluster, counted from the watched copy of
the C{owners/} and C{ports/} records, on an in-memory etcd (L{tests.fakeetcd}).
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from portal.relay.cluster import (
    ClusterDirectory,
    Member,
    NameClaim,
    PortClaim,
    ownerRecord,
    parseOwnerRecord,
    parsePortRecord,
    portRecord,
)
from portal.relay.clusterquota import LiveIndex, SourceIndex, recordSource
from portal.relay.sourcequota import ISharedHoldings, OverQuota, SourceQuota
from portal.trust.identity import Identity
from tests.fakeetcd import FakeEtcd

DOMAIN = "quota.test"
PREFIX = f"portal/{DOMAIN}/".encode()


class RecordSourceTests(SynchronousTestCase):
    """
    The C{source} field of a record is read tolerantly.
    """

    def test_valid(self) -> None:
        """
        An IPv4 address and an IPv6 /64 are sources.
        """
        self.assertEqual(recordSource("10.0.0.2"), "10.0.0.2")
        self.assertEqual(recordSource("2001:db8::/64"), "2001:db8::/64")

    def test_unknown(self) -> None:
        """
        A missing, empty, overlong, unprintable or non-string source is unknown (L{None}).
        """
        for value in [None, "", "x" * 65, "a\nb", 7, ["10.0.0.2"], {"a": 1}, True]:
            self.assertIsNone(recordSource(value), value)


class RecordTests(SynchronousTestCase):
    """
    C{owners/} and C{ports/} records carry the source; records of older members, without it, and
    records with a malformed one still parse, with an unknown source.
    """

    def test_ownerRoundTrip(self) -> None:
        """
        An ownership parses back as written, with or without a source.
        """
        for claim in [NameClaim("alice", 1234.5, "10.0.0.2"), NameClaim("bob", 7.0)]:
            self.assertEqual(parseOwnerRecord(ownerRecord(claim)), claim)

    def test_portRoundTrip(self) -> None:
        """
        A port claim with a source parses back as written.
        """
        claim = PortClaim("udp", 9000, "alice", "db", "m1", None, "2001:db8::/64")
        self.assertEqual(parsePortRecord("udp", 9000, portRecord(claim)), claim)

    def test_olderRecords(self) -> None:
        """
        Records written before the source was recorded parse with an unknown source.
        """
        self.assertEqual(
            parseOwnerRecord(b'{"owner": "alice", "until": 12.5}'), NameClaim("alice", 12.5)
        )
        self.assertEqual(
            parsePortRecord("tcp", 9000, b'{"owner":"a","name":"n","member":"m","until":null}'),
            PortClaim("tcp", 9000, "a", "n", "m"),
        )

    def test_badSource(self) -> None:
        """
        A malformed source makes the source unknown, not the record invalid.
        """
        claim = parseOwnerRecord(b'{"owner": "alice", "until": 12.5, "source": 4}')
        self.assertEqual(claim, NameClaim("alice", 12.5))
        port = parsePortRecord(
            "tcp", 9000, b'{"owner":"a","name":"n","member":"m","until":null,"source":[]}'
        )
        self.assertEqual(port, PortClaim("tcp", 9000, "a", "n", "m"))

    def test_malformedOwners(self) -> None:
        """
        An C{owners/} record without an owner is malformed (L{None}); a malformed C{until} reads as
        a reservation that has ended.
        """
        for value in [b"", b"[]", b"{}", b'{"owner": 3}', b"\xff"]:
            self.assertIsNone(parseOwnerRecord(value), value)
        for until in [b'"soon"', b"true", b"1e999", b"null"]:
            claim = parseOwnerRecord(b'{"owner": "a", "until": ' + until + b"}")
            self.assertEqual(claim, NameClaim("a", 0.0), until)


class SourceIndexTests(SynchronousTestCase):
    """
    L{SourceIndex} counts each source's records while they are held.
    """

    def setUp(self) -> None:
        """
        An index whose records are held while live or until their C{until} on a fake clock.
        """
        self.clock = Clock()
        self.index: SourceIndex[str, str] = SourceIndex(
            lambda key, until: until is None or self.clock.seconds() < until
        )

    def test_provides(self) -> None:
        """
        L{SourceIndex} provides L{ISharedHoldings}.
        """
        self.assertTrue(verifyObject(ISharedHoldings, self.index))

    def test_counts(self) -> None:
        """
        Records count for their own source; replacing a record moves it; a deleted one is gone.
        """
        self.index.put("k1", "10.0.0.2", "a", None)
        self.index.put("k2", "10.0.0.2", "b", 10.0)
        self.index.put("k3", "10.0.0.3", "c", None)
        self.assertEqual(self.index.heldBy("10.0.0.2"), {"a", "b"})
        self.assertEqual(self.index.upperBound("10.0.0.2"), 2)
        self.index.put("k2", "10.0.0.3", "b", None)
        self.assertEqual(self.index.heldBy("10.0.0.2"), {"a"})
        self.assertEqual(self.index.heldBy("10.0.0.3"), {"b", "c"})
        self.index.drop("k1")
        self.assertEqual(self.index.heldBy("10.0.0.2"), set())
        self.assertEqual(self.index.upperBound("10.0.0.2"), 0)

    def test_unknownSource(self) -> None:
        """
        A record without a source counts for nobody, and replaces what its key counted before.
        """
        self.index.put("k1", "10.0.0.2", "a", None)
        self.index.put("k1", None, "a", None)
        self.assertEqual(self.index.heldBy("10.0.0.2"), set())
        self.assertEqual(len(self.index), 0)

    def test_reservationsEnd(self) -> None:
        """
        A reserved record counts until its reservation ends, then is forgotten.
        """
        self.index.put("k1", "10.0.0.2", "a", 10.0)
        self.clock.advance(9.9)
        self.assertEqual(self.index.heldBy("10.0.0.2"), {"a"})
        self.clock.advance(0.1)
        self.assertEqual(self.index.heldBy("10.0.0.2"), set())
        self.assertEqual(self.index.upperBound("10.0.0.2"), 0)

    def test_sweep(self) -> None:
        """
        L{SourceIndex.sweep} forgets the ended reservations of every source.
        """
        self.index.put("k1", "10.0.0.2", "a", 10.0)
        self.index.put("k2", "10.0.0.3", "b", 20.0)
        self.index.put("k3", "10.0.0.4", "c", None)
        self.clock.advance(15)
        self.assertEqual(self.index.sweep(), 1)
        self.assertEqual(len(self.index), 2)


class LiveIndexTests(SynchronousTestCase):
    """
    L{LiveIndex} counts the ports an identity holds live on other members.
    """

    def test_liveElsewhere(self) -> None:
        """
        Live ports on other members count; this member's own, reserved ones, those of another kind
        and the lease's own port (moving here) do not.
        """
        index = LiveIndex()
        index.put("tcp", 9000, "alice", "a", "m2", True)
        index.put("tcp", 9001, "alice", "b", "m3", True)
        index.put("tcp", 9002, "alice", "c", "m1", True)
        index.put("tcp", 9003, "alice", "d", "m2", False)
        index.put("udp", 9000, "alice", "e", "m2", True)
        self.assertEqual(index.liveElsewhere("tcp", "alice", "x", "m1"), 2)
        self.assertEqual(index.liveElsewhere("tcp", "alice", "a", "m1"), 1)
        index.put("tcp", 9001, "alice", "b", "m3", False)
        self.assertEqual(index.liveElsewhere("tcp", "alice", "x", "m1"), 1)
        index.drop("tcp", 9000)
        self.assertEqual(index.liveElsewhere("tcp", "alice", "x", "m1"), 0)
        self.assertEqual(index.liveElsewhere("udp", "alice", "x", "m1"), 1)


def member(name: str) -> Member:
    """
    @return: A member with a fresh identity.
    """
    identity = Identity.generate()
    return Member(identity.id, identity.publicKey, f"10.0.0.{name}:4017", name)


class DirectoryQuotaTests(SynchronousTestCase):
    """
    Two members, A and B, on one etcd: what one claims counts at the other, from its watch.
    """

    def setUp(self) -> None:
        """
        Join A and B.
        """
        self.etcd = FakeEtcd()
        self.clock = Clock()
        self.clock.advance(1000)
        self.a = self.directory("1")
        self.b = self.directory("2")

    def directory(self, name: str) -> ClusterDirectory:
        """
        @return: A directory of a new member that joined the cluster.
        """
        d = ClusterDirectory(self.etcd, self.clock, DOMAIN, member(name))  # type: ignore[arg-type]
        self.successResultOf(d.start())
        self.addCleanup(d.stop)
        return d

    def test_namesCountedElsewhere(self) -> None:
        """
        Names A claims from a source count for that source at B, live or reserved, until their
        reservation ends; a name live on a member counts past its record's C{until}.
        """
        self.assertIsNone(self.successResultOf(self.a.claimOwnership("n1", "al", 50, "10.0.0.2")))
        self.assertIsNone(self.successResultOf(self.a.claimOwnership("n2", "bo", 50, "10.0.0.2")))
        self.assertIsNone(self.successResultOf(self.a.claimOwnership("n3", "al", 50, "10.0.0.3")))
        self.assertEqual(self.b.nameQuota.heldBy("10.0.0.2"), {("al", "n1"), ("bo", "n2")})
        self.assertEqual(self.b.nameQuota.heldBy("10.0.0.3"), {("al", "n3")})
        self.successResultOf(self.a.announce("n1"))
        self.successResultOf(self.a.release("n2", "bo", 30))
        self.clock.advance(60)
        self.assertEqual(self.b.nameQuota.heldBy("10.0.0.2"), {("al", "n1")})
        self.successResultOf(self.a.release("n1", "al", 30))
        self.assertEqual(self.b.nameQuota.heldBy("10.0.0.2"), {("al", "n1")})
        self.clock.advance(30)
        self.assertEqual(self.b.nameQuota.heldBy("10.0.0.2"), set())

    def test_portsCountedElsewhere(self) -> None:
        """
        Ports A claims from a source count for it at B while live or reserved; a port freed, or
        whose member died, no longer counts.
        """
        self.assertIsNone(self.successResultOf(self.a.claimPort("tcp", 9000, "al", "x", "s")))
        self.assertIsNone(self.successResultOf(self.a.claimPort("udp", 9000, "al", "x", "s")))
        self.assertIsNone(self.successResultOf(self.a.claimPort("tcp", 9001, "al", "y", "s")))
        self.assertEqual(
            self.b.portQuota.heldBy("s"),
            {("tcp", "al", "x"), ("udp", "al", "x"), ("tcp", "al", "y")},
        )
        self.assertEqual(self.b.livePortsElsewhere("tcp", "al", "z"), 2)
        self.assertEqual(self.a.livePortsElsewhere("tcp", "al", "z"), 0)
        self.successResultOf(self.a.releasePort("tcp", 9001, "al", "y", self.clock.seconds() + 5))
        self.assertEqual(self.b.livePortsElsewhere("tcp", "al", "z"), 1)
        self.assertIn(("tcp", "al", "y"), self.b.portQuota.heldBy("s"))
        self.clock.advance(5)
        self.assertNotIn(("tcp", "al", "y"), self.b.portQuota.heldBy("s"))
        self.successResultOf(self.a.releasePort("udp", 9000, "al", "x", None))
        self.assertEqual(self.b.portQuota.heldBy("s"), {("tcp", "al", "x")})
        self.etcd.expire(self.a._lease)
        self.assertEqual(self.b.portQuota.heldBy("s"), set())
        self.assertEqual(self.b.livePortsElsewhere("tcp", "al", "z"), 0)

    def test_readAtJoin(self) -> None:
        """
        A member that joins later counts what the cluster holds from the records it reads.
        """
        self.successResultOf(self.a.claimOwnership("n1", "al", 50, "10.0.0.2"))
        self.successResultOf(self.a.claimPort("tcp", 9000, "al", "n1", "10.0.0.2"))
        c = self.directory("3")
        self.assertEqual(c.nameQuota.heldBy("10.0.0.2"), {("al", "n1")})
        self.assertEqual(c.portQuota.heldBy("10.0.0.2"), {("tcp", "al", "n1")})
        self.assertEqual(c.livePortsElsewhere("tcp", "al", "other"), 1)

    def test_olderMembersRecords(self) -> None:
        """
        Records of a member that predates the source field count for no source (and still hold
        their name or port).
        """
        self.successResultOf(
            self.etcd.put(PREFIX + b"owners/old", b'{"owner": "al", "until": 99999}')
        )
        self.successResultOf(
            self.etcd.put(
                PREFIX + b"ports/tcp/9000",
                b'{"owner":"al","name":"old","member":"gone","until":null}',
            )
        )
        self.assertEqual(len(self.b.nameQuota), 0)
        self.assertEqual(len(self.b.portQuota), 0)
        self.assertIsNotNone(self.b.portClaim("tcp", 9000))
        self.assertEqual(self.b.livePortsElsewhere("tcp", "al", "x"), 1)

    def test_malformedRecordsLogged(self) -> None:
        """
        A malformed C{owners/} or C{ports/} record is logged and ignored: it replaces what its key
        counted before, and the watch goes on.
        """
        self.successResultOf(self.a.claimOwnership("n1", "al", 50, "10.0.0.2"))
        self.successResultOf(self.a.claimPort("tcp", 9000, "al", "n1", "10.0.0.2"))
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.successResultOf(self.etcd.put(PREFIX + b"owners/n1", b"{not json"))
        self.successResultOf(self.etcd.put(PREFIX + b"ports/tcp/9000", b'{"owner": 1}'))
        self.assertEqual(self.b.nameQuota.heldBy("10.0.0.2"), set())
        self.assertEqual(self.b.portQuota.heldBy("10.0.0.2"), set())
        logged = [e["log_format"] for e in events if "malformed" in e.get("log_format", "")]
        self.assertEqual(len(logged), 4)  # Both members, both records.
        self.successResultOf(self.a.claimOwnership("n2", "al", 50, "10.0.0.2"))
        self.assertEqual(self.b.nameQuota.heldBy("10.0.0.2"), {("al", "n2")})

    def test_releaseKeepsSource(self) -> None:
        """
        A name released on its member stays counted for the source that registered it.
        """
        self.successResultOf(self.a.claimOwnership("n1", "al", 50, "10.0.0.2"))
        self.successResultOf(self.a.release("n1", "al", 3600))
        self.clock.advance(100)
        self.assertEqual(self.b.nameQuota.heldBy("10.0.0.2"), {("al", "n1")})

    def test_clusterQuotaRefuses(self) -> None:
        """
        A source quota given the cluster's counts refuses at B what the source holds at A, saying
        how many it holds and may hold; what it holds already costs nothing, and another source
        is not affected.
        """
        for name in ["n1", "n2"]:
            self.successResultOf(self.a.claimOwnership(name, "al", 50, "10.0.0.2"))
        quota: SourceQuota[tuple[str, str]] = SourceQuota(2, lambda thing: False, "lease names")
        quota.shared = self.b.nameQuota
        error = self.assertRaises(OverQuota, quota.check, "10.0.0.2", [("al", "n3")])
        self.assertEqual((error.held, error.limit), (2, 2))
        self.assertIn("already holds 2 lease names in this relay cluster", str(error))
        self.assertIn("at most 2", str(error))
        quota.check("10.0.0.2", [("al", "n1"), ("al", "n2")])
        quota.check("10.0.0.3", [("al", "n3"), ("al", "n4")])

    def test_namesPerIdentityCounted(self) -> None:
        """
        The names an identity claims at A count for it at B (C{ownerNames}), whatever source
        they came from, while live or reserved; records of older members (no source) count too,
        and a malformed record counts for no one.
        """
        self.successResultOf(self.a.claimOwnership("n1", "al", 50, "10.0.0.2"))
        self.successResultOf(self.a.claimOwnership("n2", "al", 50, "10.0.0.3"))
        self.successResultOf(self.a.claimOwnership("n3", "bo", 50, "10.0.0.2"))
        self.successResultOf(
            self.etcd.put(PREFIX + b"owners/old", b'{"owner": "al", "until": 99999}')
        )
        self.assertEqual(self.b.ownerNames.heldBy("al"), {"n1", "n2", "old"})
        self.assertEqual(self.b.ownerNames.heldBy("bo"), {"n3"})
        self.assertEqual(self.a.ownerNames.heldBy("al"), {"n1", "n2", "old"})
        self.successResultOf(self.etcd.put(PREFIX + b"owners/old", b"{not json"))
        self.successResultOf(self.a.announce("n1"))
        self.successResultOf(self.a.release("n2", "al", 30))
        self.clock.advance(60)
        self.assertEqual(self.b.ownerNames.heldBy("al"), {"n1"})
        self.assertEqual(self.b.ownerNames.heldBy("bo"), set())
        self.assertEqual(self.directory("3").ownerNames.heldBy("al"), {"n1"})

    def test_leasesPerIdentityRefused(self) -> None:
        """
        A lease table given the cluster's names per identity refuses at B a name beyond
        C{maxPerOwner} when the identity holds the rest at A, saying so; a name the identity holds
        already (its tunnel moved to B) costs nothing, and another identity is not affected.
        """
        from portal.relay.leases import LeaseTable, TooManyLeases

        for name in ["n1", "n2"]:
            self.successResultOf(self.a.claimOwnership(name, "al", 50, "10.0.0.2"))
        table = LeaseTable(self.clock, maxPerOwner=2)
        table.shared = self.b.ownerNames
        error = self.assertRaises(TooManyLeases, table.register, "n3", "al", object())
        self.assertIn("already holds 2 names in this relay cluster", str(error))
        self.assertIn("at most 2 are allowed", str(error))
        table.register("n1", "al", object())
        table.register("m1", "bo", object())
        table.register("m2", "bo", object())
        self.assertRaises(TooManyLeases, table.register, "m3", "bo", object())
        # Once A's names are no longer held, B takes new ones.
        self.successResultOf(self.a.release("n2", "al", 0))
        self.clock.advance(1)
        table.register("n3", "al", object())
