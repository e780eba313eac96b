"""
Tests for L{portal.trust.identity}.
"""

from __future__ import annotations

import json
import os
import re
import stat

from twisted.trial.unittest import SynchronousTestCase

from portal.trust.identity import (
    Identity,
    IdentityError,
    defaultIdentityPath,
    identityId,
    loadIdentity,
    loadOrCreateIdentity,
    looksLikeIdentityId,
    saveIdentity,
    shortId,
    verifySignature,
)


def _mode(path: str) -> int:
    """
    Read the permission bits of a file.

    @param path: The file.
    @return: Its mode without the file type bits.
    """
    return stat.S_IMODE(os.stat(path).st_mode)


class IdentityTests(SynchronousTestCase):
    """
    Tests for L{Identity}, L{identityId}, L{shortId} and L{verifySignature}.
    """

    def test_idFormat(self) -> None:
        """
        The id is 52 lowercase base32 characters, which is a valid DNS label.
        """
        identity = Identity.generate()
        self.assertEqual(len(identity.publicKey), 33)
        self.assertRegex(identity.id, r"\A[a-z2-7]{52}\Z")
        self.assertEqual(identity.id, identityId(identity.publicKey))

    def test_shortId(self) -> None:
        """
        The short id is the first 12 characters of the id.
        """
        identity = Identity.generate()
        self.assertEqual(identity.shortId, identity.id[:12])
        self.assertEqual(shortId(identity.id), identity.id[:12])

    def test_distinctIdentities(self) -> None:
        """
        Two generated identities have different keys and ids.
        """
        self.assertNotEqual(Identity.generate().id, Identity.generate().id)

    def test_reprHidesPrivateKey(self) -> None:
        """
        The C{repr} of an identity names its id and does not contain its private key.
        """
        identity = Identity.generate()
        text = repr(identity)
        self.assertIn(identity.id, text)
        self.assertNotIn(identity.privateKey.secret.hex(), text)

    def test_signVerify(self) -> None:
        """
        A signature made by an identity verifies with its public key and the same message.
        """
        identity = Identity.generate()
        signature = identity.sign(b"hello")
        self.assertTrue(verifySignature(identity.publicKey, signature, b"hello"))

    def test_verifyOtherMessage(self) -> None:
        """
        A signature does not verify for another message.
        """
        identity = Identity.generate()
        signature = identity.sign(b"hello")
        self.assertFalse(verifySignature(identity.publicKey, signature, b"hullo"))

    def test_verifyOtherKey(self) -> None:
        """
        A signature does not verify with another identity's public key.
        """
        signature = Identity.generate().sign(b"hello")
        self.assertFalse(verifySignature(Identity.generate().publicKey, signature, b"hello"))

    def test_verifyGarbageSignature(self) -> None:
        """
        A malformed signature gives C{False} instead of raising.
        """
        identity = Identity.generate()
        for signature in [b"", b"garbage", b"\x30\x00", b"\x00" * 72]:
            self.assertFalse(verifySignature(identity.publicKey, signature, b"hello"))

    def test_verifyGarbageKey(self) -> None:
        """
        A malformed public key gives C{False} instead of raising, as does an uncompressed key.
        """
        identity = Identity.generate()
        signature = identity.sign(b"hello")
        uncompressed = identity.privateKey.public_key.format(compressed=False)
        for key in [b"", b"\x02" + b"\x00" * 32, b"\x05" * 33, b"short", uncompressed]:
            self.assertFalse(verifySignature(key, signature, b"hello"))

    def test_looksLikeIdentityId(self) -> None:
        """
        A real id has the form of one; a short id, upper case, a character outside base32 or one
        too many does not.
        """
        fullId = Identity.generate().id
        self.assertTrue(looksLikeIdentityId(fullId))
        for text in [shortId(fullId), fullId.upper(), fullId[:-1] + "1", fullId + "a", ""]:
            self.assertFalse(looksLikeIdentityId(text), text)


class IdentityFileTests(SynchronousTestCase):
    """
    Tests for L{saveIdentity}, L{loadIdentity}, L{loadOrCreateIdentity} and L{defaultIdentityPath}.
    """

    def setUp(self) -> None:
        """
        Choose an identity file path inside a directory that does not exist yet.
        """
        self.base = os.path.abspath(self.mktemp())
        os.mkdir(self.base)
        self.directory = os.path.join(self.base, "config", "portal")
        self.path = os.path.join(self.directory, "identity.json")

    def writeDocument(self, document: object, mode: int = 0o600) -> None:
        """
        Write an identity file by hand.

        @param document: The JSON document to write.
        @param mode: The file's permission bits.
        """
        os.makedirs(self.directory, exist_ok=True)
        with open(self.path, "w") as f:
            json.dump(document, f)
        os.chmod(self.path, mode)

    def validDocument(self) -> dict[str, object]:
        """
        Describe a fresh identity as L{saveIdentity} would write it.

        @return: The document.
        """
        identity = Identity.generate()
        return {
            "version": 1,
            "type": "secp256k1",
            "privateKey": identity.privateKey.secret.hex(),
            "publicKey": identity.publicKey.hex(),
            "id": identity.id,
        }

    def test_roundTrip(self) -> None:
        """
        An identity saved and loaded again has the same key and id.
        """
        identity = Identity.generate()
        saveIdentity(identity, self.path)
        loaded = loadIdentity(self.path)
        self.assertEqual(loaded.privateKey.secret, identity.privateKey.secret)
        self.assertEqual(loaded.id, identity.id)

    def test_fileFormat(self) -> None:
        """
        The file is a version 1 secp256k1 JSON document recording the keys and the id.
        """
        identity = Identity.generate()
        saveIdentity(identity, self.path)
        with open(self.path) as f:
            document = json.load(f)
        self.assertEqual(
            document,
            {
                "version": 1,
                "type": "secp256k1",
                "privateKey": identity.privateKey.secret.hex(),
                "publicKey": identity.publicKey.hex(),
                "id": identity.id,
            },
        )

    def test_modes(self) -> None:
        """
        The file has mode 0600 and the directories created for it mode 0700, whatever the umask.
        """
        oldUmask = os.umask(0o022)
        self.addCleanup(os.umask, oldUmask)
        saveIdentity(Identity.generate(), self.path)
        self.assertEqual(_mode(self.path), 0o600)
        self.assertEqual(_mode(self.directory), 0o700)
        self.assertEqual(_mode(os.path.dirname(self.directory)), 0o700)

    def test_existingDirectoryUntouched(self) -> None:
        """
        An existing parent directory keeps its mode.
        """
        os.makedirs(self.directory)
        os.chmod(self.directory, 0o755)
        saveIdentity(Identity.generate(), self.path)
        self.assertEqual(_mode(self.directory), 0o755)

    def test_noTemporaryFilesLeft(self) -> None:
        """
        After saving, only the identity file is in its directory.
        """
        saveIdentity(Identity.generate(), self.path)
        self.assertEqual(os.listdir(self.directory), ["identity.json"])

    def test_noOverwrite(self) -> None:
        """
        Saving over an existing file is refused without C{overwrite}, and the file is kept.
        """
        first = Identity.generate()
        saveIdentity(first, self.path)
        error = self.assertRaises(IdentityError, saveIdentity, Identity.generate(), self.path)
        self.assertIn("already exists", str(error))
        self.assertEqual(loadIdentity(self.path).id, first.id)
        self.assertEqual(os.listdir(self.directory), ["identity.json"])

    def test_overwrite(self) -> None:
        """
        With C{overwrite=True} an existing file is replaced, still with mode 0600.
        """
        saveIdentity(Identity.generate(), self.path)
        second = Identity.generate()
        saveIdentity(second, self.path, overwrite=True)
        self.assertEqual(loadIdentity(self.path).id, second.id)
        self.assertEqual(_mode(self.path), 0o600)

    def test_missing(self) -> None:
        """
        Loading a missing file says there is no identity file there.
        """
        error = self.assertRaises(IdentityError, loadIdentity, self.path)
        self.assertIn("No identity file", str(error))
        self.assertIn(self.path, str(error))

    def test_groupReadable(self) -> None:
        """
        A file readable by its group is refused with its mode and the C{chmod 600} fix.
        """
        self.writeDocument(self.validDocument(), mode=0o640)
        error = self.assertRaises(IdentityError, loadIdentity, self.path)
        self.assertIn("0640", str(error))
        self.assertIn(f"chmod 600 {self.path}", str(error))

    def test_worldReadable(self) -> None:
        """
        A file readable by everyone is refused with the C{chmod 600} fix.
        """
        self.writeDocument(self.validDocument(), mode=0o644)
        error = self.assertRaises(IdentityError, loadIdentity, self.path)
        self.assertIn("0644", str(error))
        self.assertIn(f"chmod 600 {self.path}", str(error))

    def test_corruptJSON(self) -> None:
        """
        A file that is not JSON is refused, and not replaced.
        """
        os.makedirs(self.directory)
        with open(self.path, "w") as f:
            f.write("{not json")
        os.chmod(self.path, 0o600)
        error = self.assertRaises(IdentityError, loadIdentity, self.path)
        self.assertIn("not valid JSON", str(error))
        self.assertRaises(IdentityError, loadOrCreateIdentity, self.path)
        with open(self.path) as f:
            self.assertEqual(f.read(), "{not json")

    def test_notAnObject(self) -> None:
        """
        A JSON document that is not an object is refused.
        """
        self.writeDocument([1, 2, 3])
        self.assertRaises(IdentityError, loadIdentity, self.path)

    def test_wrongVersion(self) -> None:
        """
        A file of another format version is refused.
        """
        document = self.validDocument()
        document["version"] = 2
        self.writeDocument(document)
        error = self.assertRaises(IdentityError, loadIdentity, self.path)
        self.assertIn("version", str(error))

    def test_wrongType(self) -> None:
        """
        A file holding another type of key is refused.
        """
        document = self.validDocument()
        document["type"] = "ed25519"
        self.writeDocument(document)
        error = self.assertRaises(IdentityError, loadIdentity, self.path)
        self.assertIn("ed25519", str(error))

    def test_badPrivateKey(self) -> None:
        """
        A private key that is not 32 bytes of hex within the curve order is refused.
        """
        for bad in ["zz" * 32, "00" * 31, "00" * 32, "ff" * 32, 12]:
            document = self.validDocument()
            document["privateKey"] = bad
            del document["publicKey"], document["id"]
            self.writeDocument(document)
            error = self.assertRaises(IdentityError, loadIdentity, self.path)
            self.assertIn("private key", str(error))

    def test_mismatchedPublicKey(self) -> None:
        """
        A recorded public key that does not belong to the private key is refused.
        """
        document = self.validDocument()
        document["publicKey"] = Identity.generate().publicKey.hex()
        self.writeDocument(document)
        error = self.assertRaises(IdentityError, loadIdentity, self.path)
        self.assertIn("publicKey", str(error))

    def test_mismatchedId(self) -> None:
        """
        A recorded id that does not belong to the private key is refused.
        """
        document = self.validDocument()
        document["id"] = Identity.generate().id
        self.writeDocument(document)
        error = self.assertRaises(IdentityError, loadIdentity, self.path)
        self.assertIn("id", str(error))

    def test_loadOrCreate(self) -> None:
        """
        L{loadOrCreateIdentity} creates an identity the first time and loads the same one after.
        """
        created, wasCreated = loadOrCreateIdentity(self.path)
        self.assertTrue(wasCreated)
        self.assertEqual(_mode(self.path), 0o600)
        loaded, wasCreated = loadOrCreateIdentity(self.path)
        self.assertFalse(wasCreated)
        self.assertEqual(loaded.id, created.id)

    def test_loadOrCreateRefusesBadFile(self) -> None:
        """
        L{loadOrCreateIdentity} reports an unusable existing file instead of replacing it.
        """
        self.writeDocument(self.validDocument(), mode=0o644)
        with open(self.path) as f:
            before = f.read()
        self.assertRaises(IdentityError, loadOrCreateIdentity, self.path)
        with open(self.path) as f:
            self.assertEqual(f.read(), before)

    def test_saveError(self) -> None:
        """
        A path that cannot be written gives an L{IdentityError} naming the path.
        """
        blocker = os.path.join(self.base, "config")
        with open(blocker, "w") as f:
            f.write("a file where a directory should be")
        error = self.assertRaises(IdentityError, saveIdentity, Identity.generate(), self.path)
        self.assertIn(self.path, str(error))
        self.assertIn("Cannot write", str(error))

    def test_defaultPathXDG(self) -> None:
        """
        The default path is under C{$XDG_CONFIG_HOME} when that is set.
        """
        self.patch(os, "environ", {**os.environ, "XDG_CONFIG_HOME": "/xdg/config"})
        self.assertEqual(defaultIdentityPath(), "/xdg/config/portal/identity.json")

    def test_defaultPathHome(self) -> None:
        """
        Without C{$XDG_CONFIG_HOME} the default path is under C{~/.config}, not the working directory.
        """
        environ = {k: v for k, v in os.environ.items() if k != "XDG_CONFIG_HOME"}
        environ["HOME"] = "/home/someone"
        self.patch(os, "environ", environ)
        self.assertEqual(defaultIdentityPath(), "/home/someone/.config/portal/identity.json")

    def test_defaultPathRelativeXDG(self) -> None:
        """
        A relative C{$XDG_CONFIG_HOME} is ignored, as the XDG specification requires.
        """
        self.patch(os, "environ", {"XDG_CONFIG_HOME": "relative", "HOME": "/home/someone"})
        self.assertTrue(re.match(r"/home/someone/\.config/", defaultIdentityPath()))
