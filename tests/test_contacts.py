"""
Tests for L{portal.gateway.contacts}.
"""

from __future__ import annotations

import json
import os
import stat

from twisted.trial.unittest import SynchronousTestCase

from portal.gateway.contacts import (
    Contact,
    ContactList,
    ContactsError,
    InvalidContact,
    contactsPath,
    isShortId,
    parsePeerURL,
    validateIdentityId,
    validateName,
)
from portal.trust.identity import Identity
from portal.trust.localca import LocalCA


class IdentityIdTests(SynchronousTestCase):
    """
    Tests for L{validateIdentityId} and L{isShortId}.
    """

    def test_fullId(self) -> None:
        """
        A full identity id is accepted, lowercased and stripped.
        """
        identity = Identity.generate()
        self.assertEqual(validateIdentityId(identity.id), identity.id)
        self.assertEqual(validateIdentityId(f" {identity.id.upper()} "), identity.id)

    def test_shortIdRefused(self) -> None:
        """
        A short id (or any other prefix of an id) is refused with a message that says so and
        asks for the full id.
        """
        identity = Identity.generate()
        for prefix in (identity.shortId, identity.id[:51], identity.id[:1]):
            e = self.assertRaises(InvalidContact, validateIdentityId, prefix)
            self.assertIn("short id", str(e))
            self.assertIn("full 52-character identity id", str(e))

    def test_notAnId(self) -> None:
        """
        Text that cannot be an identity id is refused: wrong characters, too long, or a last
        character that a 256-bit hash cannot produce.
        """
        identity = Identity.generate()
        for text in ("", "not an id!", identity.id + "a", identity.id[:51] + "b", "1" * 52):
            e = self.assertRaises(InvalidContact, validateIdentityId, text)
            self.assertIn("not an identity id", str(e))

    def test_isShortId(self) -> None:
        """
        L{isShortId} recognises the 12-character form humans are shown.
        """
        identity = Identity.generate()
        self.assertTrue(isShortId(identity.shortId))
        self.assertFalse(isShortId(identity.id))
        self.assertFalse(isShortId("ABCDEFGHIJKL"))


class FieldTests(SynchronousTestCase):
    """
    Tests for L{parsePeerURL}, L{validateName} and L{Contact.create}.
    """

    def test_urls(self) -> None:
        """
        Peer URLs are normalised to C{https://host[:port]}: lowercase host, no default port, no
        trailing slash.
        """
        self.assertEqual(parsePeerURL("https://App.Peer.Example/"), "https://app.peer.example")
        self.assertEqual(parsePeerURL("https://a.example:443"), "https://a.example")
        self.assertEqual(parsePeerURL("https://x.localhost:8443"), "https://x.localhost:8443")
        self.assertEqual(parsePeerURL("https://[::1]:8443"), "https://[::1]:8443")

    def test_badURLs(self) -> None:
        """
        Plain http, paths, queries, fragments, user information and malformed hosts or ports are
        refused, each with the URL in the message.
        """
        for text in (
            "http://a.example",
            "https://a.example/api",
            "https://a.example?x",
            "https://a.example/#f",
            "https://user@a.example",
            "https://a.example:99999",
            "https://a.example:0",
            "https://",
            "https://a_b!.example",
            "a.example",
        ):
            e = self.assertRaises(InvalidContact, parsePeerURL, text)
            self.assertIn(repr(text), str(e))

    def test_names(self) -> None:
        """
        Names are stripped; control characters and names over 64 characters are refused.
        """
        self.assertEqual(validateName("  Alice "), "Alice")
        self.assertRaises(InvalidContact, validateName, "a\nb")
        self.assertRaises(InvalidContact, validateName, "x" * 65)

    def test_createChecksEveryField(self) -> None:
        """
        L{Contact.create} normalises and de-duplicates the URLs and refuses a malformed CA.
        """
        identity = Identity.generate()
        contact = Contact.create(
            identity.id, "Bob", ["https://B.example/", "https://b.example", "https://c.example"]
        )
        self.assertEqual(contact.urls, ("https://b.example", "https://c.example"))
        self.assertEqual(contact.label, f"Bob ({identity.shortId})")
        self.assertRaises(InvalidContact, Contact.create, identity.id, ca="not a certificate")
        self.assertRaises(InvalidContact, Contact.create, identity.shortId)


class ContactListTests(SynchronousTestCase):
    """
    Tests for L{ContactList}.
    """

    def setUp(self) -> None:
        """
        A contact list in a new directory.
        """
        self.directory = self.mktemp()
        self.path = contactsPath(self.directory)
        self.contacts = ContactList(self.path)

    def test_noFile(self) -> None:
        """
        Without a file there are no contacts, and looking one up creates nothing.
        """
        self.assertEqual(self.contacts.contacts(), [])
        self.assertIsNone(self.contacts.get(Identity.generate().id))
        self.assertFalse(os.path.exists(self.path))

    def test_addGetRemove(self) -> None:
        """
        A contact added can be looked up by its full id, in a new L{ContactList} too, and is gone
        once removed.
        """
        identity = Identity.generate()
        ca = LocalCA.loadOrCreate(os.path.join(self.directory, "ca"), "test CA")
        with open(ca.certPath) as f:
            pem = f.read()
        contact = Contact.create(identity.id, "Bob", ["https://b.example"], pem)
        self.assertFalse(self.contacts.add(contact))
        self.assertEqual(self.contacts.get(identity.id), contact)
        self.assertEqual(ContactList(self.path).get(identity.id), contact)
        self.assertIsNone(self.contacts.get(identity.shortId))
        self.assertEqual(self.contacts.remove(identity.id), contact)
        self.assertIsNone(self.contacts.get(identity.id))
        self.assertIsNone(ContactList(self.path).get(identity.id))

    def test_filePrivateAndVersioned(self) -> None:
        """
        The file has mode 0600 and holds a version 1 JSON document listing the peers.
        """
        identity = Identity.generate()
        self.contacts.add(Contact.create(identity.id, "Bob"))
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        with open(self.path) as f:
            document = json.load(f)
        self.assertEqual(document["version"], 1)
        self.assertEqual(
            document["peers"], [{"id": identity.id, "name": "Bob", "urls": [], "ca": None}]
        )

    def test_addExisting(self) -> None:
        """
        Adding an id that is a contact already is refused unless C{replace} is given.
        """
        identity = Identity.generate()
        self.contacts.add(Contact.create(identity.id, "Bob"))
        e = self.assertRaises(
            ContactsError, self.contacts.add, Contact.create(identity.id, "Robert")
        )
        self.assertIn("--replace", str(e))
        self.assertTrue(self.contacts.add(Contact.create(identity.id, "Robert"), replace=True))
        self.assertEqual(self.contacts.get(identity.id), Contact.create(identity.id, "Robert"))

    def test_update(self) -> None:
        """
        L{ContactList.update} changes the fields given and keeps the others; it fails for an
        identity that is not a contact.
        """
        identity = Identity.generate()
        self.contacts.add(Contact.create(identity.id, "Bob", ["https://b.example"]))
        changed = self.contacts.update(identity.id, urls=("https://c.example",))
        self.assertEqual(changed, Contact.create(identity.id, "Bob", ["https://c.example"]))
        changed = self.contacts.update(identity.id, name="Robert")
        self.assertEqual(changed.urls, ("https://c.example",))
        self.assertEqual(ContactList(self.path).get(identity.id), changed)
        self.assertRaises(ContactsError, self.contacts.update, Identity.generate().id, name="X")

    def test_removeUnknown(self) -> None:
        """
        Removing an identity that is not a contact fails with a message naming it.
        """
        identity = Identity.generate()
        e = self.assertRaises(ContactsError, self.contacts.remove, identity.id)
        self.assertIn(identity.id, str(e))

    def test_seesChangesByOthers(self) -> None:
        """
        A running lookup sees contacts that another L{ContactList} (another process, such as
        C{portal peers}) added or removed, without being told.
        """
        identity = Identity.generate()
        self.assertIsNone(self.contacts.get(identity.id))
        other = ContactList(self.path)
        other.add(Contact.create(identity.id, "Bob"))
        self.assertIsNotNone(self.contacts.get(identity.id))
        other.remove(identity.id)
        self.assertIsNone(self.contacts.get(identity.id))

    def test_openPermissionsRefused(self) -> None:
        """
        A contact list others may change is refused: they could make themselves contacts.
        """
        self.contacts.add(Contact.create(Identity.generate().id))
        os.chmod(self.path, 0o666)
        e = self.assertRaises(ContactsError, ContactList(self.path).contacts)
        self.assertIn("chmod 600", str(e))

    def test_corruptFile(self) -> None:
        """
        A file that is not a valid contact list is reported, never silently emptied; a peer with a
        short id in the file is refused as well.
        """
        os.makedirs(self.directory)
        for content in (
            b"{",
            b"[]",
            b'{"version": 2, "peers": []}',
            b'{"version": 1}',
            b'{"version": 1, "peers": [{"id": "abcdefghijkl"}]}',
        ):
            with open(self.path, "wb") as f:
                f.write(content)
            os.chmod(self.path, 0o600)
            self.assertRaises(ContactsError, ContactList(self.path).contacts)
            self.assertRaises(
                ContactsError, ContactList(self.path).add, Contact.create(Identity.generate().id)
            )
            with open(self.path, "rb") as f:
                self.assertEqual(f.read(), content)
