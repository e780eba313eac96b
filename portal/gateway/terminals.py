"""
Paired terminals: the owner's devices, each known by a key only it holds, kept in a small SQLite store.

A terminal's id is derived from its public key (an ECDSA P-256 key: a browser's WebCrypto key or a
command-line terminal's key file), never chosen: the same key always has the same id, and nobody can
claim an id without the key.  The store lives in one file in the tunnel's state directory, readable
by its owner only (mode 0600), so terminal records, renames and revocations survive tunnel restarts.

The store is used from the reactor thread: every call is one short indexed query on a local file.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import sqlite3
import stat
from collections.abc import Iterator

import attrs
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_der_public_key,
)

from portal.trust.identity import ID_ALPHABET
from portal.trust.privatefiles import PRIVATE_FILE_MODE, makePrivateDirectories

#: The file name of the store in the tunnel's state directory.
STORE_FILENAME = "terminals.sqlite3"

#: Version of the store's schema, kept in SQLite's C{user_version}.
SCHEMA_VERSION = 1

#: Longest terminal name, in characters.
MAX_NAME_LENGTH = 64

#: Number of characters of a terminal id shown to humans.
SHORT_ID_LENGTH = 12

#: Shortest id prefix accepted where a terminal is named by the owner (C{revoke ID}).
MIN_PREFIX_LENGTH = 4

_SCHEMA = """
CREATE TABLE IF NOT EXISTS terminals (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    public_key BLOB NOT NULL,
    created REAL NOT NULL,
    last_seen REAL NOT NULL,
    revoked REAL
)
"""


class TerminalError(Exception):
    """
    A terminal operation was refused; the message says why, for the owner.
    """


class InvalidPublicKey(TerminalError):
    """
    A public key is not a DER SubjectPublicKeyInfo of an ECDSA P-256 key.
    """


class InvalidTerminalName(TerminalError):
    """
    A terminal name is empty, too long, or holds control characters.
    """


class UnknownTerminal(TerminalError):
    """
    No terminal has this id (or id prefix).
    """


class AmbiguousTerminal(TerminalError):
    """
    An id prefix names more than one terminal.
    """


class RevokedTerminal(TerminalError):
    """
    The terminal was revoked: its key is refused for good.
    """


class StoreError(TerminalError):
    """
    The store's file cannot be opened or is not a terminal store.
    """


def canonicalPublicKey(publicKey: bytes) -> bytes:
    """
    Check a terminal's public key and put it in canonical form.

    @param publicKey: A DER SubjectPublicKeyInfo of an ECDSA P-256 key, as WebCrypto's
        C{exportKey("spki", ...)} gives it (the point may be compressed or not).
    @return: The key's DER SubjectPublicKeyInfo with the point uncompressed: the one encoding
        every form of the same key maps to.
    @raise InvalidPublicKey: If it is anything else.
    """
    try:
        key = load_der_public_key(publicKey)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise InvalidPublicKey("the public key is not a DER SubjectPublicKeyInfo")
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise InvalidPublicKey("the public key is not an ECDSA P-256 key")
    return key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def terminalId(publicKey: bytes) -> str:
    """
    Derive a terminal's id from its public key.

    @param publicKey: The key, see L{canonicalPublicKey}.
    @return: The lowercase, unpadded RFC 4648 base32 encoding of the SHA-256 of the key's canonical
        SubjectPublicKeyInfo: 52 characters from C{[a-z2-7]}, like an identity id.
    @raise InvalidPublicKey: If C{publicKey} is not a P-256 key.
    """
    digest = hashlib.sha256(canonicalPublicKey(publicKey)).digest()
    return base64.b32encode(digest).decode("ascii").rstrip("=").lower()


def validateName(name: str) -> str:
    """
    Check a terminal name given by the owner or by the pairing device.

    @param name: The name.
    @return: The name without surrounding white space.
    @raise InvalidTerminalName: If it is empty, longer than L{MAX_NAME_LENGTH} characters, or
        holds control or other non-printable characters.
    """
    name = name.strip()
    if not name:
        raise InvalidTerminalName("a terminal name may not be empty")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidTerminalName(f"a terminal name may have at most {MAX_NAME_LENGTH} characters")
    if not name.isprintable():
        raise InvalidTerminalName("a terminal name may not hold control characters")
    return name


@attrs.frozen
class Terminal:
    """
    One paired terminal.

    @ivar id: Its id, see L{terminalId}.
    @ivar name: Its human name.
    @ivar publicKey: Its key's canonical DER SubjectPublicKeyInfo.
    @ivar created: When it paired (seconds since the epoch).
    @ivar lastSeen: When it last paired or renewed a session.
    @ivar revoked: When the owner revoked it, or L{None} while it may be used.
    """

    id: str
    name: str
    publicKey: bytes = attrs.field(repr=False)
    created: float
    lastSeen: float
    revoked: float | None = None

    @property
    def shortId(self) -> str:
        """
        The first L{SHORT_ID_LENGTH} characters of L{id}, shown to humans.
        """
        return self.id[:SHORT_ID_LENGTH]


def _row(row: tuple[str, str, bytes, float, float, float | None]) -> Terminal:
    """
    Make a L{Terminal} from a row of the C{terminals} table.
    """
    return Terminal(row[0], row[1], bytes(row[2]), row[3], row[4], row[5])


_COLUMNS = "id, name, public_key, created, last_seen, revoked"


class TerminalStore:
    """
    The paired terminals of a tunnel, in an SQLite file.
    """

    def __init__(self, connection: sqlite3.Connection, path: str) -> None:
        """
        Use L{open} instead.

        @param connection: An open connection to a store.
        @param path: Its file, for messages.
        """
        self._db = connection
        self.path = path

    @classmethod
    def open(cls, path: str) -> TerminalStore:
        """
        Open the store at C{path}, creating it (mode 0600, in a 0700 directory if the directory
        is new) when there is none.

        @param path: The store's file, usually L{STORE_FILENAME} in the state directory.
        @return: The open store.
        @raise StoreError: If the file cannot be created or opened, may be accessed by other
            users, or is not a terminal store of a version this code reads.
        """
        try:
            makePrivateDirectories(os.path.dirname(os.path.abspath(path)))
            # Create the file with its final mode before SQLite opens it: SQLite gives its journal
            # files the mode of the database file.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, PRIVATE_FILE_MODE)
            try:
                mode = stat.S_IMODE(os.fstat(fd).st_mode)
            finally:
                os.close(fd)
            if os.name == "posix" and mode & 0o077:
                # Whoever can write it could add terminals.
                raise StoreError(
                    f"the terminal store {path} has mode {mode:04o}, so other users may read "
                    f"or change it; run 'chmod 600 {path}'"
                )
            connection = sqlite3.connect(path, timeout=5.0, isolation_level=None)
        except (OSError, sqlite3.Error) as e:
            raise StoreError(f"cannot open the terminal store {path}: {e}")
        store = cls(connection, path)
        try:
            store._migrate()
        except sqlite3.DatabaseError as e:
            connection.close()
            raise StoreError(f"{path} is not a terminal store ({e})")
        except StoreError:
            connection.close()
            raise
        return store

    def _migrate(self) -> None:
        """
        Create the schema of a new store, or check an existing store's version.

        @raise StoreError: If the store was written by a newer version.
        """
        with self._transaction():
            (version,) = self._db.execute("PRAGMA user_version").fetchone()
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"the terminal store {self.path} has schema version {version}; this Portal "
                    f"reads version {SCHEMA_VERSION} (upgrade Portal)"
                )
            self._db.execute(_SCHEMA)
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """
        Run a block in one SQLite transaction that takes the write lock at its start, so that
        another process using the store (C{portal terminals} next to a running tunnel) sees all of
        the block or none of it.  Nested blocks join the outer transaction.
        """
        if self._db.in_transaction:
            yield
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def close(self) -> None:
        """
        Close the store's file.
        """
        self._db.close()

    def add(self, publicKey: bytes, name: str, now: float) -> Terminal:
        """
        Record a newly paired terminal.

        Pairing a key that is already a terminal (a device pairing again) keeps its record and
        gives it the new name.

        @param publicKey: Its public key, see L{canonicalPublicKey}.
        @param name: Its name, see L{validateName}.
        @param now: The current time.
        @return: The terminal.
        @raise InvalidPublicKey: If the key is not a P-256 key.
        @raise InvalidTerminalName: If the name is not acceptable.
        @raise RevokedTerminal: If this key's terminal was revoked.
        """
        canonical = canonicalPublicKey(publicKey)
        id = terminalId(canonical)
        name = validateName(name)
        with self._transaction():
            existing = self.get(id)
            if existing is not None and existing.revoked is not None:
                raise RevokedTerminal(f"terminal {existing.shortId} was revoked")
            if existing is None:
                self._db.execute(
                    f"INSERT INTO terminals ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, NULL)",
                    (id, name, canonical, now, now),
                )
            else:
                self._db.execute(
                    "UPDATE terminals SET name = ?, last_seen = ? WHERE id = ?", (name, now, id)
                )
        terminal = self.get(id)
        assert terminal is not None
        return terminal

    def get(self, id: str) -> Terminal | None:
        """
        @param id: A full terminal id.
        @return: The terminal with this id, revoked or not, or L{None}.
        """
        row = self._db.execute(f"SELECT {_COLUMNS} FROM terminals WHERE id = ?", (id,)).fetchone()
        return None if row is None else _row(row)

    def find(self, prefix: str) -> Terminal:
        """
        Find a terminal by its id or a prefix of it, as the owner types it.

        @param prefix: At least L{MIN_PREFIX_LENGTH} characters of an id (case-insensitive).
        @return: The one terminal whose id starts with C{prefix}.
        @raise UnknownTerminal: If none does, or the prefix is too short or not base32.
        @raise AmbiguousTerminal: If several do.
        """
        prefix = prefix.strip().lower()
        if len(prefix) < MIN_PREFIX_LENGTH or not set(prefix) <= ID_ALPHABET:
            raise UnknownTerminal(
                f"{prefix!r} is not a terminal id (give at least {MIN_PREFIX_LENGTH} of its "
                f"characters, as 'portal terminals list' shows them)"
            )
        # Base32 characters hold no LIKE wildcards, so the prefix can be matched as it is.
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM terminals WHERE id LIKE ? ORDER BY created LIMIT 2",
            (prefix + "%",),
        ).fetchall()
        if not rows:
            raise UnknownTerminal(f"no terminal has an id starting with {prefix!r}")
        if len(rows) > 1:
            raise AmbiguousTerminal(
                f"several terminals have an id starting with {prefix!r}; give more of it"
            )
        return _row(rows[0])

    def list(self) -> list[Terminal]:
        """
        @return: Every terminal, revoked ones included, oldest first.
        """
        rows = self._db.execute(f"SELECT {_COLUMNS} FROM terminals ORDER BY created, id")
        return [_row(row) for row in rows]

    def rename(self, prefix: str, name: str) -> Terminal:
        """
        Give a terminal a new name.

        @param prefix: Its id or a unique prefix, see L{find}.
        @param name: The new name, see L{validateName}.
        @return: The renamed terminal.
        @raise UnknownTerminal: See L{find}.
        @raise AmbiguousTerminal: See L{find}.
        @raise InvalidTerminalName: If the name is not acceptable.
        """
        name = validateName(name)
        with self._transaction():
            terminal = self.find(prefix)
            self._db.execute("UPDATE terminals SET name = ? WHERE id = ?", (name, terminal.id))
        return attrs.evolve(terminal, name=name)

    def revoke(self, prefix: str, now: float) -> Terminal:
        """
        Revoke a terminal: from now on its sessions and its key are refused.  Revoking a revoked
        terminal changes nothing.

        @param prefix: Its id or a unique prefix, see L{find}.
        @param now: The current time.
        @return: The revoked terminal.
        @raise UnknownTerminal: See L{find}.
        @raise AmbiguousTerminal: See L{find}.
        """
        with self._transaction():
            terminal = self.find(prefix)
            if terminal.revoked is not None:
                return terminal
            self._db.execute("UPDATE terminals SET revoked = ? WHERE id = ?", (now, terminal.id))
        return attrs.evolve(terminal, revoked=now)

    def touch(self, id: str, now: float) -> None:
        """
        Record that a terminal was seen (it renewed its session).

        @param id: Its full id.
        @param now: The current time.
        """
        self._db.execute("UPDATE terminals SET last_seen = ? WHERE id = ?", (now, id))
