"""
Tests for L{portal.relay.cluster}: members' directories kept in a real etcd.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred, inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase, TestCase

from portal.relay.cluster import ClusterDirectory, Member, memberRecord, parseMemberRecord
from portal.relay.etcd import EtcdClient, EtcdUnavailable
from portal.trust.identity import Identity
from tests.etcdprocess import startEtcd
from tests.realprocesses import pollUntil


def member(name: str, port: int) -> Member:
    """
    @return: A member with a fresh identity.
    """
    identity = Identity.generate()
    return Member(identity.id, identity.publicKey, f"127.0.0.1:{port}", name)


class RecordTests(SynchronousTestCase):
    """
    Member records.
    """

    def test_roundTrip(self) -> None:
        """
        A record parses back into the member it was written for.
        """
        m = member("a", 4017)
        self.assertEqual(parseMemberRecord(m.id, memberRecord(m)), m)

    def test_malformed(self) -> None:
        """
        A malformed record is ignored (L{None}), not an exception in the watch.
        """
        for value in [b"", b"{}", b'{"key":"zz","address":"a","name":"n"}', b"[1]"]:
            self.assertIsNone(parseMemberRecord("x", value))


class DirectoryTests(TestCase):
    """
    Two members' directories on one real etcd.
    """

    timeout = 60

    @inlineCallbacks
    def setUp(self) -> Any:
        """
        Start etcd.
        """
        self.nodes = yield startEtcd(self)

    def directory(self, name: str, port: int, ttl: int = 10) -> ClusterDirectory:
        """
        @return: A directory for a new member, stopped at cleanup.
        """
        client = EtcdClient([self.nodes[0].clientURL], reactor, timeout=2)
        self.addCleanup(client.close)
        d = ClusterDirectory(client, reactor, "portal.test", member(name, port), ttl=ttl)
        self.addCleanup(d.stop)
        return d

    @inlineCallbacks
    def test_routesSeenByOtherMembers(self) -> Any:
        """
        A name one member announces is routed to it by the other; a withdrawn one is not.
        """
        a, b = self.directory("a", 1), self.directory("b", 2)
        yield a.start()
        yield b.start()
        self.assertEqual({m.id for m in b.members()}, {a.me.id, b.me.id})
        yield a.announce("blog")
        holder = yield pollUntil(lambda: b.holderOf("blog"), "b sees blog on a", timeout=10)
        self.assertEqual(holder, a.me)
        yield a.withdraw("blog")
        yield pollUntil(lambda: b.holderOf("blog") is None, "blog withdrawn", timeout=10)

    @inlineCallbacks
    def test_leavingMemberLosesRoutes(self) -> Any:
        """
        When a member stops, its routes and record are gone for the others at once.
        """
        a, b = self.directory("a", 1), self.directory("b", 2)
        yield a.start()
        yield b.start()
        yield a.announce("blog")
        yield pollUntil(lambda: b.holderOf("blog"), "b sees blog", timeout=10)
        yield a.stop()
        yield pollUntil(lambda: b.member(a.me.id) is None, "a gone", timeout=10)
        self.assertIsNone(b.holderOf("blog"))

    @inlineCallbacks
    def test_deadMemberExpires(self) -> Any:
        """
        A member that stops renewing (it died) loses its routes within its TTL.
        """
        a, b = self.directory("a", 1, ttl=2), self.directory("b", 2)
        yield a.start()
        yield b.start()
        yield a.announce("blog")
        yield pollUntil(lambda: b.holderOf("blog"), "b sees blog", timeout=10)
        a._stopped = True
        if a._timer is not None and a._timer.active():
            a._timer.cancel()
        yield pollUntil(lambda: b.holderOf("blog") is None, "blog expired", timeout=10)

    @inlineCallbacks
    def test_etcdAwayKeepsRoutes(self) -> Any:
        """
        With etcd stopped, the directory still routes what it knew and says it is unavailable;
        when etcd returns, it is available again.
        """
        a, b = self.directory("a", 1, ttl=3), self.directory("b", 2, ttl=3)
        yield a.start()
        yield b.start()
        yield a.announce("blog")
        yield pollUntil(lambda: b.holderOf("blog"), "b sees blog", timeout=10)
        node = self.nodes[0]
        assert node.process is not None
        yield node.process.stop()
        yield pollUntil(lambda: not b.available, "b notices etcd is away", timeout=10)
        self.assertEqual(b.holderOf("blog"), a.me)
        yield self.assertFailure(b.announce("other"), EtcdUnavailable)
        from tests.etcdprocess import startNode

        yield startNode(self, node, f"{node.name}={node.peerURL}")
        yield pollUntil(lambda: a.available and b.available, "available again", timeout=20)
        yield pollUntil(lambda: b.holderOf("blog") == a.me, "blog still routed", timeout=10)

    @inlineCallbacks
    def test_startFailsWithoutEtcd(self) -> Any:
        """
        Joining with etcd unreachable fails with L{EtcdUnavailable}.
        """
        node = self.nodes[0]
        assert node.process is not None
        yield node.process.stop()
        d = self.directory("a", 1)
        yield self.assertFailure(ensureDeferred(d._join()), EtcdUnavailable)
