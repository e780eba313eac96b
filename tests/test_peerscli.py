"""
Tests for C{portal peers add|list|remove} (L{portal.cli.peers}), in this process through
L{portal.cli.main}, and once as a real process.
"""

from __future__ import annotations

import json
import os
import sys
from io import StringIO
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SynchronousTestCase, TestCase

from portal.cli.main import main
from portal.gateway.contacts import ContactList
from portal.trust.identity import Identity
from portal.trust.localca import LocalCA


class PeersCommandTests(SynchronousTestCase):
    """
    Tests for C{portal peers}, run in this process.
    """

    def setUp(self) -> None:
        """
        A configuration directory for C{--identity}.
        """
        self.directory = os.path.abspath(self.mktemp())
        self.identity = os.path.join(self.directory, "identity.json")
        self.peer = Identity.generate()

    def portal(self, *args: str) -> tuple[int, str, str]:
        """
        Run C{portal ARGS --identity ...}.

        @return: The exit code, the output and the error output.
        """
        out, err = StringIO(), StringIO()
        with self.assertRaises(SystemExit) as exit:
            main([*args, "--identity", self.identity], out, err)
        code = exit.exception.code
        assert isinstance(code, int)
        return code, out.getvalue(), err.getvalue()

    def test_addListRemove(self) -> None:
        """
        A peer added is listed with its full id, name and URLs, and is gone once removed; the
        list lives beside the identity file.
        """
        code, out, err = self.portal(
            "peers", "add", self.peer.id, "--name", "Bob", "--url", "https://Bob.example:8443/"
        )
        self.assertEqual(code, 0, err)
        self.assertIn(f"added peer Bob ({self.peer.shortId})", out)
        contacts = ContactList(os.path.join(self.directory, "peers.json"))
        contact = contacts.get(self.peer.id)
        assert contact is not None
        self.assertEqual(contact.urls, ("https://bob.example:8443",))
        code, out, err = self.portal("peers", "list")
        self.assertEqual(code, 0, err)
        self.assertIn("Bob", out)
        self.assertIn(self.peer.id, out)
        self.assertIn("https://bob.example:8443", out)
        code, out, err = self.portal("peers", "list", "--json")
        self.assertEqual(
            json.loads(out),
            {"id": self.peer.id, "name": "Bob", "urls": ["https://bob.example:8443"], "ca": False},
        )
        code, out, err = self.portal("peers", "remove", self.peer.id)
        self.assertEqual(code, 0, err)
        self.assertIn("removed peer Bob", out)
        code, out, err = self.portal("peers", "list")
        self.assertIn("no peers", out)

    def test_addWithCA(self) -> None:
        """
        C{--ca FILE} stores the peer's CA; an unreadable or non-certificate file fails with 1.
        """
        ca = LocalCA.loadOrCreate(os.path.join(self.directory, "bob-ca"), "Bob")
        code, out, err = self.portal("peers", "add", self.peer.id, "--ca", ca.certPath)
        self.assertEqual(code, 0, err)
        self.assertIn("its own CA", out)
        contact = ContactList(os.path.join(self.directory, "peers.json")).get(self.peer.id)
        assert contact is not None and contact.ca is not None
        self.assertIn("BEGIN CERTIFICATE", contact.ca)
        other = Identity.generate()
        code, out, err = self.portal("peers", "add", other.id, "--ca", self.identity)
        self.assertEqual(code, 1)
        self.assertIn("--ca", err)
        code, out, err = self.portal("peers", "add", other.id, "--ca", "/nonexistent/ca.pem")
        self.assertEqual(code, 1)
        self.assertIn("No such file", err)

    def test_addTwice(self) -> None:
        """
        Adding a contact again fails (1) unless C{--replace} is given, which changes the fields
        given and keeps the others.
        """
        code, out, err = self.portal("peers", "add", self.peer.id, "--url", "https://b.example")
        self.assertEqual(code, 0, err)
        code, out, err = self.portal("peers", "add", self.peer.id, "--name", "B")
        self.assertEqual(code, 1)
        self.assertIn("--replace", err)
        code, out, err = self.portal("peers", "add", self.peer.id, "--name", "B", "--replace")
        self.assertEqual(code, 0, err)
        self.assertIn("changed peer B", out)
        ca = LocalCA.loadOrCreate(os.path.join(self.directory, "bob-ca"), "Bob")
        code, out, err = self.portal("peers", "add", self.peer.id, "--replace", "--ca", ca.certPath)
        self.assertEqual(code, 0, err)
        contact = ContactList(os.path.join(self.directory, "peers.json")).get(self.peer.id)
        assert contact is not None
        self.assertEqual((contact.name, contact.urls), ("B", ("https://b.example",)))
        self.assertIsNotNone(contact.ca)
        code, out, err = self.portal(
            "peers", "add", self.peer.id, "--replace", "--url", "https://c.example"
        )
        contact = ContactList(os.path.join(self.directory, "peers.json")).get(self.peer.id)
        assert contact is not None
        self.assertEqual((contact.name, contact.urls), ("B", ("https://c.example",)))
        self.assertIsNotNone(contact.ca)

    def test_removeUnknown(self) -> None:
        """
        Removing a peer that is not a contact fails with 1.
        """
        code, out, err = self.portal("peers", "remove", self.peer.id)
        self.assertEqual(code, 1)
        self.assertIn("is not a contact", err)

    def test_usageErrors(self) -> None:
        """
        A short id, a missing id, a bad URL or name, or no subcommand exits 2 with a one-line
        reason, and changes nothing.
        """
        for args, reason in [
            (("peers", "add", self.peer.shortId), "short id"),
            (("peers", "remove", self.peer.shortId), "short id"),
            (("peers", "add", "x" * 52), "not an identity id"),
            (("peers", "add"), "needs the peer's IDENTITY-ID"),
            (("peers", "remove"), "needs the peer's IDENTITY-ID"),
            (("peers", "add", self.peer.id, "--url", "http://bob.example"), "https://"),
            (("peers", "add", self.peer.id, "--url", "https://b.example/api"), "origin only"),
            (("peers", "add", self.peer.id, "--name", "a\tb"), "control characters"),
            (("peers", "add", self.peer.id, "extra"), "Wrong number of arguments"),
            (("peers",), "expected 'portal peers add'"),
            (("peers", "bogus"), "bogus"),
        ]:
            code, out, err = self.portal(*args)
            self.assertEqual(code, 2, (args, out, err))
            self.assertIn(reason, err)
            self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertFalse(os.path.exists(os.path.join(self.directory, "peers.json")))


class PeersProcessTests(TestCase):
    """
    C{portal peers} as a real process, with the default configuration directory.
    """

    timeout = 60

    @inlineCallbacks
    def test_addListRemove(self) -> Any:
        """
        C{python -m portal peers add}, C{list} and C{remove} work on
        C{$XDG_CONFIG_HOME/portal/peers.json} (mode 0600) and exit 0.
        """
        home = os.path.abspath(self.mktemp())
        os.makedirs(home)
        env = dict(os.environ, HOME=home, XDG_CONFIG_HOME=os.path.join(home, ".config"))
        peer = Identity.generate()

        def portal(*args: str) -> Any:
            return getProcessOutputAndValue(sys.executable, ["-m", "portal", *args], env=env)

        out, err, code = yield portal("peers", "add", peer.id, "--name", "Bob")
        self.assertEqual(code, 0, err)
        path = os.path.join(home, ".config", "portal", "peers.json")
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        out, err, code = yield portal("peers", "list", "--json")
        self.assertEqual(json.loads(out)["id"], peer.id)
        out, err, code = yield portal("peers", "remove", peer.id)
        self.assertEqual(code, 0, err)
        out, err, code = yield portal("peers", "remove", peer.id)
        self.assertEqual(code, 1)
