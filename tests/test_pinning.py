"""
Tests for L{portal.trust.pinning}.
"""

from __future__ import annotations

import json
import os
import stat

from twisted.trial.unittest import SynchronousTestCase

from portal.trust.pinning import KnownRelays, RelayIdentityChanged

ADDRESS = "127.0.0.1:4017"
RELAY_ID = "relay-id-one"
OTHER_ID = "relay-id-two"


class KnownRelaysTests(SynchronousTestCase):
    """
    Tests for L{KnownRelays}.
    """

    def setUp(self) -> None:
        """
        Choose a known relays file, in directories that do not exist yet.
        """
        self.base = self.mktemp()
        self.path = os.path.join(self.base, "config", "portal", "known_relays.json")

    def writeFile(self, content: bytes) -> None:
        """
        Write the known relays file.

        @param content: What to write in it.
        """
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, "wb") as f:
            f.write(content)

    def test_missingFile(self) -> None:
        """
        A missing file means no relay is pinned, and reading it creates nothing.
        """
        known = KnownRelays(self.path)
        self.assertIsNone(known.pinned(ADDRESS))
        self.assertFalse(os.path.exists(self.base))

    def test_firstUsePins(self) -> None:
        """
        The first identity seen for an address is pinned and saved, so a new instance
        reads it back.
        """
        self.assertTrue(KnownRelays(self.path).check(ADDRESS, RELAY_ID))
        self.assertEqual(KnownRelays(self.path).pinned(ADDRESS), RELAY_ID)
        with open(self.path) as f:
            self.assertEqual(json.load(f), {"version": 1, "relays": {ADDRESS: RELAY_ID}})

    def test_fileModes(self) -> None:
        """
        The file is readable by its owner only, and so are the directories created for it.
        """
        KnownRelays(self.path).check(ADDRESS, RELAY_ID)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        for directory in [os.path.dirname(self.path), os.path.join(self.base, "config")]:
            self.assertEqual(stat.S_IMODE(os.stat(directory).st_mode), 0o700)
        self.assertEqual(os.listdir(os.path.dirname(self.path)), ["known_relays.json"])

    def test_sameIdentity(self) -> None:
        """
        The pinned identity is accepted again, without changing the file.
        """
        known = KnownRelays(self.path)
        known.check(ADDRESS, RELAY_ID)
        before = os.stat(self.path).st_mtime_ns
        self.assertFalse(known.check(ADDRESS, RELAY_ID))
        self.assertFalse(KnownRelays(self.path).check(ADDRESS, RELAY_ID))
        self.assertEqual(os.stat(self.path).st_mtime_ns, before)

    def test_changedIdentity(self) -> None:
        """
        A different identity at a pinned address is refused with a message naming the
        address, both identities, the file, and how to accept the change; the pin stays.
        """
        KnownRelays(self.path).check(ADDRESS, RELAY_ID)
        known = KnownRelays(self.path)
        error = self.assertRaises(RelayIdentityChanged, known.check, ADDRESS, OTHER_ID)
        self.assertEqual(
            str(error),
            f"relay {ADDRESS} presented identity {OTHER_ID} but {RELAY_ID} is pinned for it "
            f"in {self.path}. If the relay's key was changed on purpose, remove its entry "
            f"from that file or pass --relay {ADDRESS}#{OTHER_ID}; otherwise someone may be "
            f"impersonating the relay.",
        )
        self.assertEqual(
            (error.address, error.presentedId, error.expectedId, error.path),
            (ADDRESS, OTHER_ID, RELAY_ID, self.path),
        )
        self.assertEqual(known.pinned(ADDRESS), RELAY_ID)

    def test_otherAddresses(self) -> None:
        """
        Each address has its own pin, and addresses are compared without regard to case.
        """
        known = KnownRelays(self.path)
        self.assertTrue(known.check(ADDRESS, RELAY_ID))
        self.assertTrue(known.check("relay.example:4017", OTHER_ID))
        self.assertEqual(known.pinned("Relay.Example:4017"), OTHER_ID)
        self.assertEqual(known.pinned(ADDRESS), RELAY_ID)
        self.assertRaises(RelayIdentityChanged, known.check, "RELAY.example:4017", RELAY_ID)

    def test_removedEntry(self) -> None:
        """
        Removing an entry from the file, as the error message advises, lets the next check
        pin the new identity, without a new instance.
        """
        known = KnownRelays(self.path)
        known.check(ADDRESS, RELAY_ID)
        self.writeFile(json.dumps({"version": 1, "relays": {}}).encode())
        self.assertTrue(known.check(ADDRESS, OTHER_ID))
        self.assertEqual(known.pinned(ADDRESS), OTHER_ID)

    def test_expectedIdentityMismatch(self) -> None:
        """
        An identity given on the command line that the relay does not present is refused,
        with a message saying it came from the command line, and nothing is pinned.
        """
        known = KnownRelays(self.path)
        error = self.assertRaises(
            RelayIdentityChanged, known.check, ADDRESS, OTHER_ID, expectedId=RELAY_ID
        )
        message = str(error)
        self.assertIn(f"presented identity {OTHER_ID}", message)
        self.assertIn(f"--relay {ADDRESS}#{RELAY_ID}", message)
        self.assertIn("command line", message)
        self.assertIsNone(error.path)
        self.assertIsNone(known.pinned(ADDRESS))

    def test_expectedIdentityPins(self) -> None:
        """
        An identity given on the command line that the relay presents is pinned, and
        checking it again changes nothing.
        """
        known = KnownRelays(self.path)
        self.assertTrue(known.check(ADDRESS, RELAY_ID, expectedId=RELAY_ID))
        self.assertEqual(KnownRelays(self.path).pinned(ADDRESS), RELAY_ID)
        self.assertFalse(known.check(ADDRESS, RELAY_ID, expectedId=RELAY_ID))
        self.assertFalse(known.check(ADDRESS, RELAY_ID))

    def test_expectedIdentityReplacesPin(self) -> None:
        """
        An identity given on the command line overrides a different pinned identity when the
        relay presents it, and becomes the pin.
        """
        known = KnownRelays(self.path)
        known.check(ADDRESS, RELAY_ID)
        self.assertTrue(known.check(ADDRESS, OTHER_ID, expectedId=OTHER_ID))
        self.assertEqual(KnownRelays(self.path).pinned(ADDRESS), OTHER_ID)
        self.assertRaises(RelayIdentityChanged, known.check, ADDRESS, RELAY_ID)

    def test_corruptFile(self) -> None:
        """
        A file that is not valid JSON is reported with its path, and left as it was.
        """
        self.writeFile(b"{not json")
        error = self.assertRaises(ValueError, KnownRelays, self.path)
        self.assertIn(self.path, str(error))
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), b"{not json")

    def test_wrongShape(self) -> None:
        """
        Valid JSON that is not a known relays file, or of another version, is reported with
        its path.
        """
        for document in [
            [],
            {"relays": {}},
            {"version": 2, "relays": {}},
            {"version": 1, "relays": []},
            {"version": 1, "relays": {ADDRESS: 7}},
        ]:
            self.writeFile(json.dumps(document).encode())
            error = self.assertRaises(ValueError, KnownRelays, self.path)
            self.assertIn(self.path, str(error))

    def test_corruptAfterLoad(self) -> None:
        """
        A file corrupted after it was first read is reported on the next check rather than
        overwritten.
        """
        known = KnownRelays(self.path)
        known.check(ADDRESS, RELAY_ID)
        self.writeFile(b"garbage")
        self.assertRaises(ValueError, known.check, "other:4017", OTHER_ID)
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), b"garbage")
