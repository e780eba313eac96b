"""
Tests for L{portal.gateway.basicauth}: C{--basic-auth} and C{--basic-auth-file}.
"""

from __future__ import annotations

import base64

import bcrypt
from twisted.internet.task import Clock
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from portal.cli.exposeoptions import TunnelOptions
from portal.gateway.basicauth import (
    MAX_REMEMBERED,
    WINDOW,
    WRONG_PER_ADDRESS,
    BasicAuth,
    Credential,
    CredentialError,
    loadCredentialsFile,
    parseCredential,
    parseCredentialsFile,
)
from portal.tunnel.config import ConfigError, buildConfig

#: A bcrypt hash of "s3cret" with the fewest rounds, to keep the tests fast.
HASHED = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)).decode()


def authorization(user: str, password: str) -> list[tuple[bytes, bytes]]:
    """
    @return: Request headers carrying C{user} and C{password} in a Basic C{Authorization}.
    """
    token = base64.b64encode(f"{user}:{password}".encode())
    return [(b"host", b"x"), (b"Authorization", b"Basic " + token)]


class ParseTests(SynchronousTestCase):
    """
    Tests for L{parseCredential} and L{parseCredentialsFile}.
    """

    def test_credential(self) -> None:
        """
        C{USER:PASS} keeps the user and only a digest of the pair; the password may hold colons.
        """
        credential = parseCredential("alice:pa:ss")
        self.assertEqual(credential.user, "alice")
        self.assertNotIn(b"pa:ss", repr(credential).encode())
        for bad in ("alice", ":pass", "alice:"):
            self.assertRaises(CredentialError, parseCredential, bad)

    def test_file(self) -> None:
        """
        A file holds C{USER:BCRYPT-HASH} lines, with comments and blank lines skipped.
        """
        credentials = parseCredentialsFile(f"# users\n\nbob:{HASHED}\n", "users")
        self.assertEqual(credentials, (Credential("bob", hashed=HASHED.encode()),))

    def test_badFile(self) -> None:
        """
        A line that is not C{USER:BCRYPT-HASH} is refused with its line number; so is a file
        without entries, or one that cannot be read.
        """
        with self.assertRaises(CredentialError) as raised:
            parseCredentialsFile(f"bob:{HASHED}\ncarol:plaintext\n", "users")
        self.assertIn("users:2: expected USER:BCRYPT-HASH", str(raised.exception))
        self.assertRaises(CredentialError, parseCredentialsFile, "# nobody\n", "users")
        self.assertRaises(CredentialError, loadCredentialsFile, self.mktemp())


class BasicAuthTests(SynchronousTestCase):
    """
    Tests for L{BasicAuth.check}.
    """

    def setUp(self) -> None:
        """
        Users alice (given in clear) and bob (a hashed entry).
        """
        self.clock = Clock()
        self.auth = BasicAuth(
            [parseCredential("alice:wonderland"), Credential("bob", hashed=HASHED.encode())],
            self.clock,
        )

    def test_noCredentials(self) -> None:
        """
        A request without credentials gets 401 with a Basic challenge, and is not counted as wrong.
        """
        response = self.auth.check([(b"host", b"x")], "192.0.2.1")
        assert response is not None
        self.assertEqual(response.status, 401)
        self.assertIn(
            (b"www-authenticate", b'Basic realm="portal", charset="UTF-8"'), response.headers
        )
        for _ in range(WRONG_PER_ADDRESS + 1):
            self.auth.check([], "192.0.2.1")
        self.assertIsNone(self.auth.check(authorization("alice", "wonderland"), "192.0.2.1"))

    def test_rightCredentials(self) -> None:
        """
        A user given in clear and a user of a file both pass with their passwords.
        """
        self.assertIsNone(self.auth.check(authorization("alice", "wonderland"), "192.0.2.1"))
        self.assertIsNone(self.auth.check(authorization("bob", "s3cret"), "192.0.2.1"))

    def test_wrongCredentials(self) -> None:
        """
        A wrong password, an unknown user, another user's password, a malformed header, another
        scheme or two headers get 401.
        """
        for headers in (
            authorization("alice", "wonderlan"),
            authorization("bob", "wonderland"),
            authorization("carol", "s3cret"),
            [(b"authorization", b"Basic !!!")],
            [(b"authorization", b"Bearer abc")],
            [(b"authorization", base64.b64encode(b"alice"))],
            authorization("alice", "wonderland") + authorization("alice", "wonderland"),
        ):
            response = self.auth.check(headers, f"192.0.2.{len(headers)}")
            assert response is not None, headers
            self.assertEqual(response.status, 401)

    def test_tooManyWrong(self) -> None:
        """
        After L{WRONG_PER_ADDRESS} wrong attempts an address gets 429 with Retry-After, even with
        the right password, until the window has passed; other addresses are not affected.
        """
        for _ in range(WRONG_PER_ADDRESS):
            self.auth.check(authorization("alice", "nope"), "192.0.2.1")
        response = self.auth.check(authorization("alice", "wonderland"), "192.0.2.1")
        assert response is not None
        self.assertEqual(response.status, 429)
        self.assertIn((b"retry-after", b"%d" % WINDOW), response.headers)
        self.assertIsNone(self.auth.check(authorization("alice", "wonderland"), "192.0.2.2"))
        self.clock.advance(WINDOW)
        self.assertIsNone(self.auth.check(authorization("alice", "wonderland"), "192.0.2.1"))

    def test_remembered(self) -> None:
        """
        Credentials that passed are not checked again; at most L{MAX_REMEMBERED} are kept, the
        least recently used forgotten first.
        """
        bob = authorization("bob", "s3cret")
        self.assertIsNone(self.auth.check(bob, "192.0.2.1"))
        # The same credentials written with more spaces: each a new header value that passes.
        token = base64.b64encode(b"alice:wonderland")
        alices = [
            [(b"authorization", b"Basic" + b" " * n + token)] for n in range(1, MAX_REMEMBERED + 1)
        ]
        for headers in alices:
            self.assertIsNone(self.auth.check(headers, "192.0.2.1"))
        self.auth._verified = lambda values: None  # type: ignore[method-assign]
        self.assertIsNone(self.auth.check(alices[-1], "192.0.2.1"))
        response = self.auth.check(bob, "192.0.2.1")
        assert response is not None
        self.assertEqual(response.status, 401)


class OptionsTests(SynchronousTestCase):
    """
    C{--basic-auth} and C{--basic-auth-file} on the command line.
    """

    def test_routedHTTP(self) -> None:
        """
        In routed HTTP mode, the credentials of both options are in the configuration.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(f"bob:{HASHED}\n")
        options = TunnelOptions()
        options.parseOptions(
            ["8000", "--http", "--basic-auth", "alice:x", "--basic-auth-file", path]
        )
        self.assertEqual([c.user for c in options.tunnelConfig.basicAuth], ["alice", "bob"])

    def test_otherModes(self) -> None:
        """
        Outside routed HTTP mode, and with C{--app}, the options are refused.
        """
        for extra in ({}, {"tcp": True}, {"udp": True}):
            with self.assertRaises(ConfigError) as raised:
                buildConfig("8000", basicAuth=["a:b"], **extra)  # type: ignore[arg-type]
            self.assertIn("needs routed HTTP mode", str(raised.exception))
        with self.assertRaises(UsageError):
            TunnelOptions().parseOptions(["8000", "--http", "--basic-auth", "nocolon"])
