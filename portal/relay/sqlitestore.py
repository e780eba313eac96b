"""
The relay's default L{ILeaseStore}: an SQLite database in the state directory.

One row per lease name and one per public port; every change is one statement in its own
transaction, so that the cost of a registration does not grow with the number of names.  The
database runs in WAL mode with C{synchronous=NORMAL}: a commit is a small append to the write-ahead
log, and a crash of the relay loses nothing committed (a power cut may lose the last few commits,
never the file).

A database that exists but cannot be read, is not a Portal lease store, or fails SQLite's quick
check raises L{StoreDamaged} with a message naming the file and how to recover: the relay stops
rather than start empty over it (every name would go to whoever registered first).
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable
from typing import Any

from zope.interface import implementer

from portal.relay.store import ILeaseStore, NameRecord, PortRecord, StoreDamaged, StoreError

#: The store's file name in the state directory.
STORE_FILE = "leases.sqlite3"

#: The schema version written in the C{meta} table.
SCHEMA_VERSION = 1

_SCHEMA = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID",
    "CREATE TABLE names (name TEXT PRIMARY KEY, owner TEXT NOT NULL, since REAL NOT NULL,"
    " expiresAt REAL NOT NULL, ownedUntil REAL NOT NULL) WITHOUT ROWID",
    "CREATE TABLE ports (kind TEXT NOT NULL, port INTEGER NOT NULL, identity TEXT NOT NULL,"
    " name TEXT NOT NULL, since REAL NOT NULL, reservedAt REAL, reservedUntil REAL,"
    " PRIMARY KEY (kind, port)) WITHOUT ROWID",
)

_CLAIM_NAME = (
    "INSERT INTO names (name, owner, since, expiresAt, ownedUntil) VALUES (?, ?, ?, ?, ?)"
    " ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, since = excluded.since,"
    " expiresAt = excluded.expiresAt, ownedUntil = excluded.ownedUntil"
    " WHERE names.owner = excluded.owner OR names.ownedUntil <= ?"
)

_CLAIM_PORT = (
    "INSERT INTO ports (kind, port, identity, name, since, reservedAt, reservedUntil)"
    " VALUES (?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (kind, port) DO UPDATE SET identity = excluded.identity,"
    " name = excluded.name, since = excluded.since, reservedAt = excluded.reservedAt,"
    " reservedUntil = excluded.reservedUntil"
    " WHERE (ports.identity = excluded.identity AND ports.name = excluded.name)"
    " OR ports.reservedUntil <= ?"
)


def recoveryAdvice(path: str) -> str:
    """
    Tell an operator what to do about a damaged store.

    @param path: The store's file.
    @return: One sentence naming the two ways out.
    """
    return (
        f"restore it from a backup (stop the relay, then: sqlite3 {path} '.restore BACKUP'), "
        f"or move it and its -wal/-shm files aside and start once with --new-lease-store, with "
        f"no saved leases (every name and port becomes free to whoever registers first)"
    )


@implementer(ILeaseStore)
class SQLiteLeaseStore:
    """
    An L{ILeaseStore} in one SQLite database file.

    @ivar path: The database file.
    """

    def __init__(self, connection: sqlite3.Connection, path: str) -> None:
        """
        Use L{open} rather than this.

        @param connection: An open connection to a checked store, in autocommit mode.
        @param path: The database file, for messages.
        """
        self._db = connection
        self.path = path

    @classmethod
    def open(cls, path: str) -> SQLiteLeaseStore:
        """
        Open the store at C{path}, creating it if the file does not exist.

        @param path: The database file.
        @return: The store.
        @raise StoreDamaged: If the file exists but is not a readable, intact Portal lease store.
        @raise StoreError: If a new store cannot be created.
        """
        existed = os.path.exists(path)
        try:
            if existed and os.path.getsize(path) == 0:
                # SQLite takes an empty file for a new database; for a store that once held
                # leases, that is truncation.
                raise sqlite3.DatabaseError("the file is empty (truncated?)")
            if not existed:
                # Created here so that it is private from the start; SQLite gives its -wal and
                # -shm files the same mode.
                os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            db = sqlite3.connect(path, isolation_level=None)
        except (sqlite3.Error, OSError) as e:
            raise StoreDamaged(
                f"lease store {path} cannot be opened ({e}); {recoveryAdvice(path)}"
            ) from e
        try:
            if existed:
                cls._check(db, path)
            else:
                db.execute("PRAGMA journal_mode = WAL")
                db.execute("BEGIN")
                for statement in _SCHEMA:
                    db.execute(statement)
                db.execute(
                    "INSERT INTO meta (key, value) VALUES ('schema', ?)", (str(SCHEMA_VERSION),)
                )
                db.execute("COMMIT")
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")
        except sqlite3.Error as e:
            db.close()
            if existed:
                raise StoreDamaged(
                    f"lease store {path} is damaged ({e}); {recoveryAdvice(path)}"
                ) from e
            raise StoreError(f"cannot create lease store {path}: {e}") from e
        except BaseException:
            db.close()
            raise
        return cls(db, path)

    @staticmethod
    def _check(db: sqlite3.Connection, path: str) -> None:
        """
        Check that an existing file is an intact store of a schema this relay reads.

        @param db: A connection to it.
        @param path: The file, for messages.
        @raise StoreDamaged: If it is not.
        @raise sqlite3.Error: If SQLite cannot read it.
        """
        problems = [row[0] for row in db.execute("PRAGMA quick_check")]
        if problems != ["ok"]:
            raise StoreDamaged(
                f"lease store {path} is damaged ({'; '.join(problems[:3])}); {recoveryAdvice(path)}"
            )
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
        if not {"meta", "names", "ports"} <= tables:
            raise StoreDamaged(
                f"{path} is an SQLite database but not a Portal lease store (tables: "
                f"{', '.join(sorted(tables)) or 'none'}); {recoveryAdvice(path)}"
            )
        row = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        if row is None or row[0] != str(SCHEMA_VERSION):
            raise StoreDamaged(
                f"lease store {path} has schema {row[0] if row else 'none'}, this relay reads "
                f"schema {SCHEMA_VERSION}; run the relay version that wrote it, or "
                f"{recoveryAdvice(path)}"
            )

    def _run(self, statement: str, parameters: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        """
        Run one statement.

        @raise StoreError: If SQLite fails, naming the file.
        """
        try:
            return self._db.execute(statement, parameters)
        except sqlite3.Error as e:
            raise StoreError(f"lease store {self.path}: {e}") from e

    def names(self) -> Iterable[NameRecord]:
        """
        @return: Every name record.
        """
        rows = self._run("SELECT name, owner, since, expiresAt, ownedUntil FROM names").fetchall()
        return [NameRecord(*row) for row in rows]

    def claimName(self, record: NameRecord, now: float) -> NameRecord:
        """
        Save C{record} unless another owner holds the name (see L{ILeaseStore.claimName}).

        @return: The record saved for the name afterwards.
        """
        cursor = self._run(
            _CLAIM_NAME,
            (record.name, record.owner, record.since, record.expiresAt, record.ownedUntil, now),
        )
        if cursor.rowcount == 1:
            return record
        row = self._run(
            "SELECT name, owner, since, expiresAt, ownedUntil FROM names WHERE name = ?",
            (record.name,),
        ).fetchone()
        return NameRecord(*row) if row is not None else record

    def dropName(self, name: str, owner: str) -> None:
        """
        Forget C{name} if C{owner} holds its record.
        """
        self._run("DELETE FROM names WHERE name = ? AND owner = ?", (name, owner))

    def ports(self, kind: str) -> Iterable[PortRecord]:
        """
        @return: Every port record of C{kind}.
        """
        rows = self._run(
            "SELECT kind, port, identity, name, since, reservedAt, reservedUntil FROM ports"
            " WHERE kind = ?",
            (kind,),
        ).fetchall()
        return [PortRecord(*row) for row in rows]

    def claimPort(self, record: PortRecord, now: float) -> PortRecord:
        """
        Save C{record} unless the port is held for another key (see L{ILeaseStore.claimPort}).

        @return: The record saved for the port afterwards.
        """
        cursor = self._run(
            _CLAIM_PORT,
            (
                record.kind,
                record.port,
                record.identity,
                record.name,
                record.since,
                record.reservedAt,
                record.reservedUntil,
                now,
            ),
        )
        if cursor.rowcount == 1:
            return record
        row = self._run(
            "SELECT kind, port, identity, name, since, reservedAt, reservedUntil FROM ports"
            " WHERE kind = ? AND port = ?",
            (record.kind, record.port),
        ).fetchone()
        return PortRecord(*row) if row is not None else record

    def dropPort(self, kind: str, port: int, identity: str, name: str) -> None:
        """
        Forget the record of C{port} if it is assigned to (C{identity}, C{name}).
        """
        self._run(
            "DELETE FROM ports WHERE kind = ? AND port = ? AND identity = ? AND name = ?",
            (kind, port, identity, name),
        )

    def close(self) -> None:
        """
        Close the database (its WAL is checkpointed into the main file).
        """
        self._db.close()
