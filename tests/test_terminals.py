"""
Tests for L{portal.gateway.terminals}: terminal ids derived from keys, and the SQLite store.
"""

from __future__ import annotations

import os
import sqlite3
import stat

from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from twisted.trial.unittest import SynchronousTestCase

from portal.gateway.terminals import (
    SCHEMA_VERSION,
    AmbiguousTerminal,
    InvalidPublicKey,
    InvalidTerminalName,
    RevokedTerminal,
    StoreError,
    TerminalStore,
    UnknownTerminal,
    canonicalPublicKey,
    terminalId,
    validateName,
)


def p256Key() -> ec.EllipticCurvePrivateKey:
    """
    @return: A new P-256 private key.
    """
    return ec.generate_private_key(ec.SECP256R1())


def spki(key: ec.EllipticCurvePrivateKey, compressed: bool = False) -> bytes:
    """
    @return: C{key}'s public key as a DER SubjectPublicKeyInfo, as WebCrypto exports it.
    """
    if not compressed:
        return key.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    # A SubjectPublicKeyInfo holding the compressed point: the uncompressed one's header, with
    # the BIT STRING and SEQUENCE lengths shortened by the 32 bytes of Y.
    point = key.public_key().public_bytes(Encoding.X962, PublicFormat.CompressedPoint)
    full = key.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    header = bytearray(full[: len(full) - 65])
    header[1] -= 32
    header[-2] -= 32
    return bytes(header) + point


class TerminalIdTests(SynchronousTestCase):
    """
    Tests for L{terminalId} and L{canonicalPublicKey}.
    """

    def test_sameKeySameId(self) -> None:
        """
        The id is a function of the key: the same key gives the same id, another key another.
        """
        key = p256Key()
        self.assertEqual(terminalId(spki(key)), terminalId(spki(key)))
        self.assertNotEqual(terminalId(spki(key)), terminalId(spki(p256Key())))

    def test_form(self) -> None:
        """
        The id is the unpadded lowercase base32 of the SHA-256 of the canonical key: 52
        characters, usable in a header or a DNS label.
        """
        import base64
        import hashlib

        key = spki(p256Key())
        expected = base64.b32encode(hashlib.sha256(key).digest()).decode().rstrip("=").lower()
        self.assertEqual(terminalId(key), expected)
        self.assertEqual(len(expected), 52)

    def test_compressedSameId(self) -> None:
        """
        The same key sent with a compressed point has the same canonical form and id.
        """
        key = p256Key()
        compressed = spki(key, compressed=True)
        self.assertNotEqual(compressed, spki(key))
        self.assertEqual(canonicalPublicKey(compressed), spki(key))
        self.assertEqual(terminalId(compressed), terminalId(spki(key)))

    def test_otherKeysRefused(self) -> None:
        """
        Only DER P-256 public keys are terminal keys.
        """
        other = ec.generate_private_key(ec.SECP384R1()).public_key()
        edwards = ed25519.Ed25519PrivateKey.generate().public_key()
        for key in [
            b"",
            b"garbage",
            spki(p256Key())[:-1],
            other.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo),
            edwards.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo),
        ]:
            self.assertRaises(InvalidPublicKey, terminalId, key)


class ValidateNameTests(SynchronousTestCase):
    """
    Tests for L{validateName}.
    """

    def test_stripped(self) -> None:
        """
        Surrounding white space is dropped; other printable text, any script, is kept.
        """
        self.assertEqual(validateName("  work laptop "), "work laptop")
        self.assertEqual(validateName("Ännas Telefon"), "Ännas Telefon")

    def test_refused(self) -> None:
        """
        Empty names, names longer than 64 characters and control characters are refused.
        """
        for name in ["", "   ", "x" * 65, "a\nb", "a\rb", "a\x00", "a\x7f"]:
            self.assertRaises(InvalidTerminalName, validateName, name)
        self.assertEqual(validateName("x" * 64), "x" * 64)


class TerminalStoreTests(SynchronousTestCase):
    """
    Tests for L{TerminalStore}.
    """

    def setUp(self) -> None:
        """
        Open a store in a new directory.
        """
        self.directory = os.path.join(self.mktemp(), "state")
        self.path = os.path.join(self.directory, "terminals.sqlite3")
        self.store = TerminalStore.open(self.path)
        self.addCleanup(lambda: self.store.close())

    def reopen(self) -> TerminalStore:
        """
        Close the store and open its file again, like a restarted tunnel.
        """
        self.store.close()
        self.store = TerminalStore.open(self.path)
        return self.store

    def test_filePrivate(self) -> None:
        """
        The store's file has mode 0600 and its new directory mode 0700, whatever the umask.
        """
        self.store.close()
        os.remove(self.path)
        old = os.umask(0)
        try:
            self.store = TerminalStore.open(self.path)
        finally:
            os.umask(old)
        self.store.add(spki(p256Key()), "laptop", 1.0)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(self.directory).st_mode), 0o700)

    def test_addAndGet(self) -> None:
        """
        A paired terminal is recorded under the id of its key, with its name, canonical key,
        creation and last-seen times, not revoked.
        """
        key = spki(p256Key())
        terminal = self.store.add(key, "laptop", 100.0)
        self.assertEqual(terminal.id, terminalId(key))
        self.assertEqual(terminal.name, "laptop")
        self.assertEqual(terminal.publicKey, key)
        self.assertEqual((terminal.created, terminal.lastSeen, terminal.revoked), (100, 100, None))
        self.assertEqual(self.store.get(terminal.id), terminal)
        self.assertIsNone(self.store.get("a" * 52))
        self.assertEqual(terminal.shortId, terminal.id[:12])

    def test_addAgainRenames(self) -> None:
        """
        The same key pairing again keeps its record (and creation time) and takes the new name.
        """
        key = spki(p256Key())
        self.store.add(key, "old", 100.0)
        terminal = self.store.add(key, "new", 200.0)
        self.assertEqual((terminal.name, terminal.created, terminal.lastSeen), ("new", 100, 200))
        self.assertEqual(len(self.store.list()), 1)

    def test_addRevokedRefused(self) -> None:
        """
        A revoked key cannot pair again.
        """
        key = spki(p256Key())
        terminal = self.store.add(key, "laptop", 100.0)
        self.store.revoke(terminal.id, 150.0)
        self.assertRaises(RevokedTerminal, self.store.add, key, "laptop", 200.0)
        self.assertEqual(self.store.get(terminal.id).revoked, 150.0)  # type: ignore[union-attr]

    def test_addChecks(self) -> None:
        """
        Bad keys and names are refused and nothing is stored.
        """
        self.assertRaises(InvalidPublicKey, self.store.add, b"nope", "laptop", 1.0)
        self.assertRaises(InvalidTerminalName, self.store.add, spki(p256Key()), "", 1.0)
        self.assertEqual(self.store.list(), [])

    def test_list(self) -> None:
        """
        L{TerminalStore.list} gives every terminal, revoked ones too, oldest first.
        """
        first = self.store.add(spki(p256Key()), "one", 10.0)
        second = self.store.add(spki(p256Key()), "two", 20.0)
        self.store.revoke(first.id, 30.0)
        self.assertEqual([t.name for t in self.store.list()], ["one", "two"])
        self.assertEqual([t.revoked for t in self.store.list()], [30.0, None])
        self.assertEqual(self.store.list()[1], second)

    def test_find(self) -> None:
        """
        A terminal is found by its id or a prefix of at least 4 characters, in any case.
        """
        terminal = self.store.add(spki(p256Key()), "laptop", 1.0)
        for given in [terminal.id, terminal.shortId, terminal.id[:4].upper(), f" {terminal.id}"]:
            self.assertEqual(self.store.find(given), terminal)

    def test_findUnknown(self) -> None:
        """
        A prefix no id has, a short prefix, and text that is not base32 are unknown terminals.
        """
        terminal = self.store.add(spki(p256Key()), "laptop", 1.0)
        other = "a" if terminal.id[0] != "a" else "b"
        for given in [other * 12, terminal.id[:3], "%%%%", "____", terminal.id + "x"]:
            self.assertRaises(UnknownTerminal, self.store.find, given)

    def test_findAmbiguous(self) -> None:
        """
        A prefix shared by two ids is refused as ambiguous; a longer one finds the terminal.
        """
        for id, name in [("zzzz" + "a" * 48, "x"), ("zzzz" + "b" * 48, "y")]:
            self.store._db.execute(
                "INSERT INTO terminals VALUES (?, ?, ?, 1.0, 1.0, NULL)", (id, name, b"k")
            )
        self.assertRaises(AmbiguousTerminal, self.store.find, "zzzz")
        self.assertEqual(self.store.find("zzzzb").name, "y")

    def test_rename(self) -> None:
        """
        Renaming changes the stored name; bad names are refused.
        """
        terminal = self.store.add(spki(p256Key()), "laptop", 1.0)
        renamed = self.store.rename(terminal.shortId, " phone ")
        self.assertEqual(renamed.name, "phone")
        self.assertEqual(self.store.get(terminal.id).name, "phone")  # type: ignore[union-attr]
        self.assertRaises(InvalidTerminalName, self.store.rename, terminal.id, "\n")
        self.assertRaises(UnknownTerminal, self.store.rename, "zzzz", "x")

    def test_revoke(self) -> None:
        """
        Revoking records when; revoking again keeps the first time.
        """
        terminal = self.store.add(spki(p256Key()), "laptop", 1.0)
        self.assertEqual(self.store.revoke(terminal.shortId, 5.0).revoked, 5.0)
        self.assertEqual(self.store.revoke(terminal.id, 9.0).revoked, 5.0)
        self.assertEqual(self.store.get(terminal.id).revoked, 5.0)  # type: ignore[union-attr]
        self.assertRaises(UnknownTerminal, self.store.revoke, "zzzz", 1.0)

    def test_touch(self) -> None:
        """
        L{TerminalStore.touch} records when the terminal was last seen.
        """
        terminal = self.store.add(spki(p256Key()), "laptop", 1.0)
        self.store.touch(terminal.id, 42.0)
        self.assertEqual(self.store.get(terminal.id).lastSeen, 42.0)  # type: ignore[union-attr]

    def test_persists(self) -> None:
        """
        Terminals, names and revocations survive closing and reopening the store.
        """
        kept = self.store.add(spki(p256Key()), "laptop", 1.0)
        revoked = self.store.add(spki(p256Key()), "phone", 2.0)
        self.store.rename(kept.id, "desk")
        self.store.revoke(revoked.id, 3.0)
        store = self.reopen()
        self.assertEqual(
            [(t.id, t.name, t.revoked) for t in store.list()],
            [(kept.id, "desk", None), (revoked.id, "phone", 3.0)],
        )
        self.assertEqual(store.get(kept.id).publicKey, kept.publicKey)  # type: ignore[union-attr]

    def test_seenByOtherConnection(self) -> None:
        """
        A revocation made through another connection to the same file (the C{portal terminals}
        command while no tunnel listens) is seen at once.
        """
        terminal = self.store.add(spki(p256Key()), "laptop", 1.0)
        other = TerminalStore.open(self.path)
        self.addCleanup(other.close)
        other.revoke(terminal.id, 2.0)
        self.assertEqual(self.store.get(terminal.id).revoked, 2.0)  # type: ignore[union-attr]

    def test_schemaVersion(self) -> None:
        """
        The schema version is recorded; a store from a newer version is refused, not changed.
        """
        self.store.close()
        db = sqlite3.connect(self.path)
        self.assertEqual(db.execute("PRAGMA user_version").fetchone()[0], SCHEMA_VERSION)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        db.commit()
        db.close()
        error = self.assertRaises(StoreError, TerminalStore.open, self.path)
        self.assertIn("upgrade Portal", str(error))
        db = sqlite3.connect(self.path)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        db.commit()
        db.close()
        self.store = TerminalStore.open(self.path)

    def test_notAStore(self) -> None:
        """
        A file that is not SQLite is refused with a message naming it.
        """
        path = os.path.join(self.directory, "garbage")
        with open(path, "wb") as f:
            f.write(b"this is not a database, not even close" * 100)
        os.chmod(path, 0o600)
        error = self.assertRaises(StoreError, TerminalStore.open, path)
        self.assertIn(path, str(error))

    def test_permissionsTooOpen(self) -> None:
        """
        A store other users may read or write is refused, with the command that fixes it.
        """
        self.store.close()
        os.chmod(self.path, 0o640)
        error = self.assertRaises(StoreError, TerminalStore.open, self.path)
        self.assertIn(f"chmod 600 {self.path}", str(error))
        os.chmod(self.path, 0o600)
        self.store = TerminalStore.open(self.path)

    def test_cannotCreate(self) -> None:
        """
        A store that cannot be created (a file stands where its directory should) is refused.
        """
        blocker = os.path.join(self.directory, "file")
        with open(blocker, "w"):
            pass
        error = self.assertRaises(
            StoreError, TerminalStore.open, os.path.join(blocker, "terminals.sqlite3")
        )
        self.assertIn("cannot open the terminal store", str(error))
