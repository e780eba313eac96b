"""
An in-memory stand-in for L{portal.relay.etcd.EtcdClient}: keys with revisions, etcd leases,
compare-and-set transactions and prefix watches, all synchronous, for deterministic unit tests of
the cluster's directory.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred

from portal.relay.etcd import EtcdUnavailable, KeyValue, WatchEvent


@attrs.define
class _Entry:
    value: bytes
    modRevision: int
    lease: int


class FakeWatch:
    """
    A watch of a prefix on L{FakeEtcd}.

    @ivar done: Fires when the watch is cancelled.
    """

    def __init__(self, etcd: FakeEtcd, prefix: bytes, deliver: Callable[[WatchEvent], None]):
        self._etcd = etcd
        self.prefix = prefix
        self.deliver = deliver
        self.done: Deferred[None] = Deferred()

    def cancel(self) -> None:
        """
        Stop watching.
        """
        if self in self._etcd.watches:
            self._etcd.watches.remove(self)
            self.done.callback(None)


class FakeEtcd:
    """
    One etcd shared by several members' clients.

    @ivar available: While L{False}, every request fails with L{EtcdUnavailable}.
    @ivar holdEvents: While L{True}, watch events are queued in L{held} instead of delivered (a
        member whose copy is behind).
    """

    def __init__(self) -> None:
        self.keys: dict[bytes, _Entry] = {}
        self.revision = 1
        self.watches: list[FakeWatch] = []
        self.available = True
        self.holdEvents = False
        self.held: list[tuple[FakeWatch, WatchEvent]] = []
        self._leases: set[int] = set()
        self._nextLease = 100

    def _check(self) -> None:
        if not self.available:
            raise EtcdUnavailable("etcd unavailable (fake)")

    def _notify(self, kind: str, key: bytes, value: bytes) -> None:
        event = WatchEvent(kind, key, value, self.revision)
        for watch in list(self.watches):
            if key.startswith(watch.prefix):
                if self.holdEvents:
                    self.held.append((watch, event))
                else:
                    watch.deliver(event)

    def release(self) -> None:
        """
        Deliver the held watch events and stop holding them.
        """
        self.holdEvents = False
        held, self.held = self.held, []
        for watch, event in held:
            watch.deliver(event)

    def _set(self, key: bytes, value: bytes, lease: int) -> None:
        self.revision += 1
        self.keys[key] = _Entry(value, self.revision, lease)
        self._notify("put", key, value)

    def _delete(self, key: bytes) -> None:
        if key in self.keys:
            self.revision += 1
            del self.keys[key]
            self._notify("delete", key, b"")

    def _kv(self, key: bytes) -> KeyValue | None:
        entry = self.keys.get(key)
        if entry is None:
            return None
        return KeyValue(key, entry.value, entry.modRevision, 1, entry.lease)

    async def get(self, key: bytes) -> KeyValue | None:
        """
        @return: The key, or L{None}.
        """
        self._check()
        return self._kv(key)

    async def getPrefix(self, prefix: bytes) -> tuple[list[KeyValue], int]:
        """
        @return: Every key under C{prefix} and the revision.
        """
        self._check()
        kvs = [self._kv(k) for k in sorted(self.keys) if k.startswith(prefix)]
        return [kv for kv in kvs if kv is not None], self.revision

    async def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        """
        Set a key.
        """
        self._check()
        self._set(key, value, lease)
        return self.revision

    async def create(
        self, key: bytes, value: bytes, lease: int = 0
    ) -> tuple[bool, KeyValue | None]:
        """
        Set a key when absent.
        """
        self._check()
        if key in self.keys:
            return False, self._kv(key)
        self._set(key, value, lease)
        return True, None

    async def replace(
        self, key: bytes, modRevision: int, value: bytes, lease: int = 0
    ) -> tuple[bool, KeyValue | None]:
        """
        Set a key unchanged since C{modRevision}.
        """
        self._check()
        entry = self.keys.get(key)
        if entry is None or entry.modRevision != modRevision:
            return False, self._kv(key)
        self._set(key, value, lease)
        return True, None

    async def deleteIf(self, key: bytes, modRevision: int) -> bool:
        """
        Delete a key unchanged since C{modRevision}.
        """
        self._check()
        entry = self.keys.get(key)
        if entry is None or entry.modRevision != modRevision:
            return False
        self._delete(key)
        return True

    async def delete(self, key: bytes) -> None:
        """
        Delete a key.
        """
        self._check()
        self._delete(key)

    async def grant(self, ttl: int) -> int:
        """
        @return: A new etcd lease.
        """
        self._check()
        self._nextLease += 1
        self._leases.add(self._nextLease)
        return self._nextLease

    async def keepAlive(self, lease: int) -> int:
        """
        @return: 10 while the lease lives, else 0.
        """
        self._check()
        return 10 if lease in self._leases else 0

    async def revoke(self, lease: int) -> None:
        """
        End an etcd lease and delete its keys.
        """
        self._check()
        self.expire(lease)

    def expire(self, lease: int) -> None:
        """
        End an etcd lease (its member died) and delete its keys.
        """
        self._leases.discard(lease)
        for key in [k for k, e in self.keys.items() if e.lease == lease]:
            self._delete(key)

    def watchPrefix(
        self, prefix: bytes, startRevision: int, deliver: Callable[[WatchEvent], None]
    ) -> Any:
        """
        Watch C{prefix} (from now: the fake keeps no history).
        """
        watch = FakeWatch(self, prefix, deliver)
        self.watches.append(watch)
        return watch
