"""
Tests for L{portal.relay.store} and L{portal.relay.sqlitestore}: the lease stores.
"""

from __future__ import annotations

import os
import sqlite3
import stat

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from portal.relay.sqlitestore import STORE_FILE, SQLiteLeaseStore
from portal.relay.store import (
    ILeaseStore,
    MemoryLeaseStore,
    NameRecord,
    PortRecord,
    StoreDamaged,
    StoreError,
)

ALICE = "a" * 52
BOB = "b" * 52


class FailingStore(MemoryLeaseStore):
    """
    A L{MemoryLeaseStore} whose writes raise L{StoreError} while C{broken} is set, as a store on
    a full or failing disk does.

    @ivar broken: Whether writes fail.
    @ivar message: The error's message.
    """

    def __init__(self, broken: bool = True, message: str = "disk full") -> None:
        """
        @param broken: Whether writes fail from the start.
        @param message: The error's message.
        """
        super().__init__()
        self.broken = broken
        self.message = message

    def _check(self) -> None:
        """
        @raise StoreError: While broken.
        """
        if self.broken:
            raise StoreError(self.message)

    def claimName(self, record: NameRecord, now: float) -> NameRecord:
        """
        Claim a name, unless broken.
        """
        self._check()
        return super().claimName(record, now)

    def dropName(self, name: str, owner: str) -> None:
        """
        Drop a name, unless broken.
        """
        self._check()
        super().dropName(name, owner)

    def claimPort(self, record: PortRecord, now: float) -> PortRecord:
        """
        Claim a port, unless broken.
        """
        self._check()
        return super().claimPort(record, now)

    def dropPort(self, kind: str, port: int, identity: str, name: str) -> None:
        """
        Drop a port, unless broken.
        """
        self._check()
        super().dropPort(kind, port, identity, name)


class StoreContractMixin:
    """
    What every L{ILeaseStore} does; a test case mixes this in with a C{makeStore} method.
    """

    def makeStore(self) -> ILeaseStore:
        """
        @return: A new, empty store.
        """
        raise NotImplementedError()

    def setUp(self) -> None:
        """
        Make the store.
        """
        self.store = self.makeStore()

    def test_interface(self) -> None:
        """
        The store provides L{ILeaseStore}.
        """
        self.assertTrue(verifyObject(ILeaseStore, self.store))

    def test_claimFreeName(self) -> None:
        """
        A name nobody holds is claimed, and the record is saved.
        """
        record = NameRecord("web", ALICE, 10.0, 70.0, 3670.0)
        self.assertEqual(self.store.claimName(record, 10.0), record)
        self.assertEqual(list(self.store.names()), [record])

    def test_claimHeldName(self) -> None:
        """
        A name another owner holds is refused, and the answer is that owner's record; the same
        owner's claim replaces its record.
        """
        alice = NameRecord("web", ALICE, 10.0, 70.0, 3670.0)
        self.store.claimName(alice, 10.0)
        bob = NameRecord("web", BOB, 20.0, 80.0, 80.0)
        self.assertEqual(self.store.claimName(bob, 3669.0), alice)
        renewed = NameRecord("web", ALICE, 10.0, 90.0, 3690.0)
        self.assertEqual(self.store.claimName(renewed, 30.0), renewed)
        self.assertEqual(list(self.store.names()), [renewed])

    def test_claimAfterOwnershipEnds(self) -> None:
        """
        Once a record's ownership has ended, another owner's claim replaces it.
        """
        self.store.claimName(NameRecord("web", ALICE, 10.0, 70.0, 3670.0), 10.0)
        bob = NameRecord("web", BOB, 3670.0, 3730.0, 3730.0)
        self.assertEqual(self.store.claimName(bob, 3670.0), bob)
        self.assertEqual(list(self.store.names()), [bob])

    def test_dropName(self) -> None:
        """
        A name's record is dropped only by its owner.
        """
        self.store.claimName(NameRecord("web", ALICE, 10.0, 70.0, 3670.0), 10.0)
        self.store.dropName("web", BOB)
        self.assertEqual(len(list(self.store.names())), 1)
        self.store.dropName("web", ALICE)
        self.store.dropName("unknown", ALICE)
        self.assertEqual(list(self.store.names()), [])

    def test_claimPort(self) -> None:
        """
        A port is claimed by one key at a time while live or reserved; a reservation that has
        ended can be taken by another key; records are kept per kind.
        """
        live = PortRecord("tcp", 9000, ALICE, "ssh", 10.0)
        self.assertEqual(self.store.claimPort(live, 10.0), live)
        bob = PortRecord("tcp", 9000, BOB, "x", 20.0)
        self.assertEqual(self.store.claimPort(bob, 20.0), live)
        reserved = PortRecord("tcp", 9000, ALICE, "ssh", 10.0, 30.0, 90.0)
        self.assertEqual(self.store.claimPort(reserved, 30.0), reserved)
        self.assertEqual(self.store.claimPort(bob, 89.0), reserved)
        self.assertEqual(self.store.claimPort(bob, 90.0), bob)
        udp = PortRecord("udp", 9000, ALICE, "ssh", 10.0)
        self.assertEqual(self.store.claimPort(udp, 90.0), udp)
        self.assertEqual(list(self.store.ports("tcp")), [bob])
        self.assertEqual(list(self.store.ports("udp")), [udp])

    def test_dropPort(self) -> None:
        """
        A port's record is dropped only for the key it is assigned to.
        """
        self.store.claimPort(PortRecord("tcp", 9000, ALICE, "ssh", 10.0), 10.0)
        self.store.dropPort("tcp", 9000, ALICE, "web")
        self.store.dropPort("udp", 9000, ALICE, "ssh")
        self.assertEqual(len(list(self.store.ports("tcp"))), 1)
        self.store.dropPort("tcp", 9000, ALICE, "ssh")
        self.assertEqual(list(self.store.ports("tcp")), [])


class MemoryLeaseStoreTests(StoreContractMixin, SynchronousTestCase):
    """
    L{MemoryLeaseStore} keeps the store's contract.
    """

    def makeStore(self) -> ILeaseStore:
        """
        @return: A L{MemoryLeaseStore}.
        """
        return MemoryLeaseStore()


class SQLiteLeaseStoreContractTests(StoreContractMixin, SynchronousTestCase):
    """
    L{SQLiteLeaseStore} keeps the store's contract.
    """

    def makeStore(self) -> ILeaseStore:
        """
        @return: A L{SQLiteLeaseStore} in a new directory, closed when the test ends.
        """
        directory = self.mktemp()
        os.makedirs(directory)
        store = SQLiteLeaseStore.open(os.path.join(directory, STORE_FILE))
        self.addCleanup(store.close)
        return store


class SQLiteLeaseStoreTests(SynchronousTestCase):
    """
    What L{SQLiteLeaseStore} adds: a private WAL database, records that survive reopening, one
    statement per change, and damage detected instead of ignored.
    """

    def setUp(self) -> None:
        """
        A directory for the store.
        """
        directory = self.mktemp()
        os.makedirs(directory)
        self.path = os.path.join(directory, STORE_FILE)

    def open(self) -> SQLiteLeaseStore:
        """
        @return: The store at C{self.path}, closed when the test ends.
        """
        store = SQLiteLeaseStore.open(self.path)
        self.addCleanup(store.close)
        return store

    def filled(self) -> None:
        """
        Create the store with one name and one port, and close it.
        """
        store = SQLiteLeaseStore.open(self.path)
        store.claimName(NameRecord("web", ALICE, 10.0, 70.0, 3670.0), 10.0)
        store.claimPort(PortRecord("udp", 9000, ALICE, "web", 10.0, 20.0, 3620.0), 20.0)
        store.close()

    def test_privateWAL(self) -> None:
        """
        A new store is a file only its owner can read, in WAL mode.
        """
        self.open()
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        with sqlite3.connect(self.path) as db:
            self.assertEqual(db.execute("PRAGMA journal_mode").fetchone(), ("wal",))

    def test_reopened(self) -> None:
        """
        Records survive closing and reopening the store.
        """
        self.filled()
        store = self.open()
        self.assertEqual(list(store.names()), [NameRecord("web", ALICE, 10.0, 70.0, 3670.0)])
        self.assertEqual(
            list(store.ports("udp")), [PortRecord("udp", 9000, ALICE, "web", 10.0, 20.0, 3620.0)]
        )

    def test_oneStatementPerChange(self) -> None:
        """
        A claim is one statement on one row, however many rows the store holds: no table is
        rewritten.
        """
        store = self.open()
        for i in range(200):
            store.claimName(NameRecord(f"n{i}", ALICE, 0.0, 60.0, 60.0), 0.0)
        statements: list[str] = []
        store._db.set_trace_callback(statements.append)
        store.claimName(NameRecord("web", BOB, 0.0, 60.0, 60.0), 0.0)
        store.dropName("n5", ALICE)
        self.assertEqual(len(statements), 2)
        self.assertTrue(statements[0].startswith("INSERT INTO names"))
        self.assertTrue(statements[1].startswith("DELETE FROM names WHERE name = 'n5'"))

    def assertDamaged(self, *fragments: str) -> None:
        """
        Opening the store fails with L{StoreDamaged}, naming the file, how to recover, and each of
        C{fragments}.
        """
        error = self.assertRaises(StoreDamaged, SQLiteLeaseStore.open, self.path)
        message = str(error)
        self.assertIn(self.path, message)
        self.assertIn(f"sqlite3 {self.path} '.restore BACKUP'", message)
        self.assertIn("move it and its -wal/-shm files aside", message)
        for fragment in fragments:
            self.assertIn(fragment, message)
        self.assertIsInstance(error, StoreError)

    def test_garbage(self) -> None:
        """
        A file overwritten with garbage is damaged.
        """
        self.filled()
        with open(self.path, "r+b") as f:
            f.write(b"\x00garbage" * 100)
        self.assertDamaged("file is not a database")

    def test_emptied(self) -> None:
        """
        A store truncated to nothing is damaged (SQLite alone would take it for a new database).
        """
        self.filled()
        os.truncate(self.path, 0)
        self.assertDamaged("the file is empty")

    def test_truncated(self) -> None:
        """
        A store cut short is damaged.
        """
        store = SQLiteLeaseStore.open(self.path)
        for i in range(2000):
            store.claimName(NameRecord(f"name-{i}", ALICE, 0.0, 60.0, 60.0), 0.0)
        store.close()
        os.truncate(self.path, os.path.getsize(self.path) // 2)
        self.assertDamaged("is damaged")

    def test_otherDatabase(self) -> None:
        """
        An SQLite database that is not a lease store is refused, with the tables it has.
        """
        with sqlite3.connect(self.path) as db:
            db.execute("CREATE TABLE stuff (x)")
        db.close()
        self.assertDamaged("not a Portal lease store (tables: stuff)")

    def test_otherSchema(self) -> None:
        """
        A lease store of another schema version is refused.
        """
        self.filled()
        with sqlite3.connect(self.path) as db:
            db.execute("UPDATE meta SET value = '99' WHERE key = 'schema'")
        db.close()
        self.assertDamaged("has schema 99, this relay reads schema 1")

    def test_unreadable(self) -> None:
        """
        A directory where the store should be cannot be opened.
        """
        os.makedirs(self.path)
        self.assertDamaged("cannot be opened")

    def test_writeFailure(self) -> None:
        """
        A write SQLite refuses raises L{StoreError} naming the file.
        """
        store = self.open()
        store._db.execute("PRAGMA query_only = ON")
        error = self.assertRaises(
            StoreError, store.claimName, NameRecord("web", ALICE, 0.0, 60.0, 60.0), 0.0
        )
        self.assertIn(self.path, str(error))
