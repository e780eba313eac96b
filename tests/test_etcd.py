"""
Tests for L{portal.relay.etcd}: the pure encoding helpers, and the client against a real etcd.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase, TestCase

from portal.relay.etcd import (
    EtcdClient,
    EtcdUnavailable,
    WatchEvent,
    decode,
    encode,
    parseClusterURL,
    prefixEnd,
    watchEvents,
)
from tests.etcdprocess import freePort, startEtcd
from tests.realprocesses import pollUntil


class HelperTests(SynchronousTestCase):
    """
    The gateway's encodings and the C{--cluster} syntax.
    """

    def test_parseClusterURL(self) -> None:
        """
        C{etcd://A:1,B:2} gives one gateway URL per endpoint, in order.
        """
        self.assertEqual(
            parseClusterURL("etcd://127.0.0.1:2379,etcd.example:2380"),
            ["http://127.0.0.1:2379", "http://etcd.example:2380"],
        )

    def test_parseClusterURLRefusesMalformed(self) -> None:
        """
        Another scheme, a missing port or a path is refused with the value in the message.
        """
        for bad in ["http://a:1", "etcd://a", "etcd://a:x", "etcd://a:1/path", "etcd://"]:
            with self.assertRaises(ValueError) as e:
                parseClusterURL(bad)
            self.assertIn(repr(bad), str(e.exception))

    def test_encodeDecode(self) -> None:
        """
        Bytes travel base64-encoded; an absent field is empty.
        """
        self.assertEqual(decode(encode(b"\x00name\xff")), b"\x00name\xff")
        self.assertEqual(decode(None), b"")

    def test_prefixEnd(self) -> None:
        """
        The range end of a prefix is the prefix with its last byte incremented, skipping 0xff.
        """
        self.assertEqual(prefixEnd(b"portal/names/"), b"portal/names0")
        self.assertEqual(prefixEnd(b"a\xff"), b"b")
        self.assertEqual(prefixEnd(b"\xff"), b"\0")

    def test_watchEvents(self) -> None:
        """
        A watch message's events become L{WatchEvent}s; deletes carry no value.
        """
        message = {
            "result": {
                "events": [
                    {"kv": {"key": encode(b"k"), "value": encode(b"v"), "mod_revision": "7"}},
                    {"type": "DELETE", "kv": {"key": encode(b"k"), "mod_revision": "8"}},
                ]
            }
        }
        self.assertEqual(
            watchEvents(message),
            [WatchEvent("put", b"k", b"v", 7), WatchEvent("delete", b"k", b"", 8)],
        )


class RealEtcdTests(TestCase):
    """
    L{EtcdClient} against a real single-node etcd.
    """

    timeout = 60

    @inlineCallbacks
    def setUp(self) -> Any:
        """
        Start etcd and a client on it.
        """
        nodes = yield startEtcd(self)
        self.client = EtcdClient([nodes[0].clientURL], reactor)
        self.addCleanup(self.client.close)

    @inlineCallbacks
    def test_putGetDelete(self) -> Any:
        """
        A put key reads back with its revision; a deleted one is absent.
        """
        revision = yield ensureDeferred(self.client.put(b"k", b"v"))
        kv = yield ensureDeferred(self.client.get(b"k"))
        self.assertEqual((kv.value, kv.modRevision, kv.version), (b"v", revision, 1))
        yield ensureDeferred(self.client.delete(b"k"))
        self.assertIsNone((yield ensureDeferred(self.client.get(b"k"))))

    @inlineCallbacks
    def test_createIsExclusive(self) -> Any:
        """
        Of two creates of one key, the first wins and the second sees the winner's value.
        """
        first = yield ensureDeferred(self.client.create(b"names/blog", b"alice"))
        second = yield ensureDeferred(self.client.create(b"names/blog", b"mallory"))
        self.assertEqual(first, (True, None))
        self.assertFalse(second[0])
        self.assertEqual(second[1].value, b"alice")

    @inlineCallbacks
    def test_replaceComparesRevision(self) -> Any:
        """
        A replace with a stale revision fails and changes nothing; with the current one it succeeds.
        """
        yield ensureDeferred(self.client.put(b"k", b"1"))
        kv = yield ensureDeferred(self.client.get(b"k"))
        yield ensureDeferred(self.client.put(b"k", b"2"))
        stale = yield ensureDeferred(self.client.replace(b"k", kv.modRevision, b"3"))
        self.assertFalse(stale[0])
        self.assertEqual(stale[1].value, b"2")
        current = stale[1]
        done = yield ensureDeferred(self.client.replace(b"k", current.modRevision, b"4"))
        self.assertTrue(done[0])
        self.assertFalse((yield ensureDeferred(self.client.deleteIf(b"k", current.modRevision))))
        latest = yield ensureDeferred(self.client.get(b"k"))
        self.assertTrue((yield ensureDeferred(self.client.deleteIf(b"k", latest.modRevision))))

    @inlineCallbacks
    def test_getPrefix(self) -> Any:
        """
        A prefix range returns exactly the keys under it, with the store's revision.
        """
        for key in [b"p/a", b"p/b", b"q/c"]:
            yield ensureDeferred(self.client.put(key, b"x"))
        kvs, revision = yield ensureDeferred(self.client.getPrefix(b"p/"))
        self.assertEqual([kv.key for kv in kvs], [b"p/a", b"p/b"])
        self.assertGreaterEqual(revision, max(kv.modRevision for kv in kvs))

    @inlineCallbacks
    def test_leaseKeysVanishOnRevoke(self) -> Any:
        """
        A key attached to an etcd lease lives while the lease is kept alive and goes with it.
        """
        lease = yield ensureDeferred(self.client.grant(30))
        yield ensureDeferred(self.client.put(b"live/blog", b"member-a", lease=lease))
        ttl = yield ensureDeferred(self.client.keepAlive(lease))
        self.assertGreater(ttl, 0)
        kv = yield ensureDeferred(self.client.get(b"live/blog"))
        self.assertEqual(kv.lease, lease)
        yield ensureDeferred(self.client.revoke(lease))
        self.assertIsNone((yield ensureDeferred(self.client.get(b"live/blog"))))
        self.assertEqual((yield ensureDeferred(self.client.keepAlive(lease))), 0)

    @inlineCallbacks
    def test_watchSeesChanges(self) -> Any:
        """
        A watch on a prefix delivers puts and deletes under it, and nothing else; cancel ends it.
        """
        events: list[WatchEvent] = []
        _, revision = yield ensureDeferred(self.client.getPrefix(b"w/"))
        watch = self.client.watchPrefix(b"w/", revision + 1, events.append)
        yield ensureDeferred(self.client.put(b"w/a", b"1"))
        yield ensureDeferred(self.client.put(b"other", b"1"))
        yield ensureDeferred(self.client.delete(b"w/a"))
        yield pollUntil(lambda: len(events) >= 2, "two watch events", timeout=10)
        self.assertEqual([(e.kind, e.key) for e in events], [("put", b"w/a"), ("delete", b"w/a")])
        watch.cancel()
        yield watch.done.addErrback(lambda f: None)

    @inlineCallbacks
    def test_failover(self) -> Any:
        """
        With a dead endpoint first in the list, requests go to the next one.
        """
        live = self.client.endpoints[0]
        client = EtcdClient([f"http://127.0.0.1:{freePort()}", live], reactor)
        self.addCleanup(client.close)
        yield ensureDeferred(client.put(b"k", b"v"))
        self.assertEqual(client.endpoints[client._current], live)


class KeptAliveFailoverTests(TestCase):
    """
    An endpoint that goes away while the client holds a kept-alive connection to it.
    """

    timeout = 60

    @inlineCallbacks
    def test_keptAliveConnectionToDeadEndpoint(self) -> Any:
        """
        After the endpoint the client last used stops, the next request fails over to the next
        endpoint instead of failing with the dead connection's error.
        """
        first = (yield startEtcd(self))[0]
        second = (yield startEtcd(self))[0]
        client = EtcdClient([first.clientURL, second.clientURL], reactor, timeout=5)
        self.addCleanup(client.close)
        yield ensureDeferred(client.put(b"k", b"first"))
        self.assertEqual(client._current, 0)
        yield first.process.stop()
        yield ensureDeferred(client.put(b"k", b"second"))
        self.assertEqual(client._current, 1)
        kv = yield ensureDeferred(client.get(b"k"))
        self.assertEqual(kv.value, b"second")


class UnavailableTests(TestCase):
    """
    A client with no reachable endpoint.
    """

    def test_unavailable(self) -> Deferred[Any]:
        """
        When no endpoint answers, requests fail with L{EtcdUnavailable} naming the last one tried.
        """
        client = EtcdClient([f"http://127.0.0.1:{freePort()}"], reactor, timeout=2)
        self.addCleanup(client.close)
        d = self.assertFailure(ensureDeferred(client.get(b"k")), EtcdUnavailable)
        d.addCallback(lambda e: self.assertIn("etcd unavailable", str(e)))
        return d
