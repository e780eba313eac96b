"""
Tests for L{portal.gateway.terminalclient}: the command-line terminal's key file, and pairing and
session renewal against the terminal pages served in memory (L{treq.testing.StubTreq}).
"""

from __future__ import annotations

import json
import os
import stat

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from treq.testing import StubTreq
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import URI, BrowserLikePolicyForHTTPS

from portal.gateway.proof import PURPOSE_SESSION, proofMessage, verifyProof
from portal.gateway.sessions import SESSION_TTL
from portal.gateway.terminalaccess import TerminalAccess
from portal.gateway.terminalclient import (
    KEYS_DIRNAME,
    MAX_ANSWER,
    REQUEST_TIMEOUT,
    AppURL,
    Session,
    TerminalClientError,
    TerminalKey,
    _AppEndpoints,
    defaultKeyPath,
    httpClient,
    isLocalhost,
    join,
    openSession,
    parseAppURL,
)
from tests.gatewaystub import GatewayStub

APP = "https://app.localhost:8443"


class AppURLTests(SynchronousTestCase):
    """
    Tests for L{parseAppURL} and L{defaultKeyPath}.
    """

    def test_forms(self) -> None:
        """
        The app's URL, with or without the pairing page's path, gives its origin and the host
        proofs are bound to (no port for 443, as in the C{Host} header).
        """
        for text in [APP, APP + "/", APP + "/.portal/pair", "HTTPS://App.Localhost:8443/x?y#z"]:
            self.assertEqual(
                parseAppURL(text), AppURL("https://app.localhost:8443", "app.localhost:8443")
            )
        self.assertEqual(
            parseAppURL("https://app.example:443/"), AppURL("https://app.example", "app.example")
        )
        self.assertEqual(parseAppURL("https://[::1]:8443").authority, "[::1]:8443")

    def test_refused(self) -> None:
        """
        Only https URLs with a host are apps.
        """
        for text in ["http://app.example", "app.example", "https://", "ftp://x", "https://a:b"]:
            self.assertRaises(TerminalClientError, parseAppURL, text)

    def test_keyPath(self) -> None:
        """
        Each app has its own key file under C{terminal-keys/} in the config directory, named
        after its host, with nothing that could leave the directory.
        """
        self.assertEqual(
            defaultKeyPath("/c", parseAppURL(APP)),
            os.path.join("/c", KEYS_DIRNAME, "app.localhost_8443.pem"),
        )
        self.assertEqual(parseAppURL("https://[::1]:1").keyName, "___1__1.pem")


class TerminalKeyTests(SynchronousTestCase):
    """
    Tests for L{TerminalKey}.
    """

    def setUp(self) -> None:
        """
        A key path in a new directory.
        """
        self.path = os.path.join(self.mktemp(), "keys", "app.pem")

    def test_saveLoad(self) -> None:
        """
        A saved key loads back as the same key, from a 0600 file in a 0700 directory.
        """
        key = TerminalKey.generate()
        key.save(self.path)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.dirname(self.path)).st_mode), 0o700)
        loaded = TerminalKey.load(self.path)
        self.assertEqual(loaded.publicKey, key.publicKey)
        self.assertEqual(loaded.id, key.id)

    def test_signs(self) -> None:
        """
        The key signs in the form the tunnel verifies.
        """
        key = TerminalKey.generate()
        message = proofMessage(PURPOSE_SESSION, "a", "n")
        self.assertTrue(verifyProof(key.publicKey, key.sign(message), message))

    def test_loadOrCreate(self) -> None:
        """
        The key is made once and reused.
        """
        key, created = TerminalKey.loadOrCreate(self.path)
        self.assertTrue(created)
        again, created = TerminalKey.loadOrCreate(self.path)
        self.assertFalse(created)
        self.assertEqual(again.id, key.id)

    def test_neverReplaced(self) -> None:
        """
        Saving over an existing key is refused.
        """
        TerminalKey.generate().save(self.path)
        self.assertRaises(TerminalClientError, TerminalKey.generate().save, self.path)

    def test_tooOpen(self) -> None:
        """
        A key file others may read is refused, with the fix.
        """
        TerminalKey.generate().save(self.path)
        os.chmod(self.path, 0o644)
        error = self.assertRaises(TerminalClientError, TerminalKey.load, self.path)
        self.assertIn("chmod 600", str(error))

    def test_notAKey(self) -> None:
        """
        A file without a P-256 private key is refused.
        """
        os.makedirs(os.path.dirname(self.path))
        other = ec.generate_private_key(ec.SECP384R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        for content in [b"garbage", other]:
            with open(self.path, "wb") as f:
                f.write(content)
            os.chmod(self.path, 0o600)
            self.assertRaises(TerminalClientError, TerminalKey.load, self.path)

    def test_missing(self) -> None:
        """
        A missing key file is L{FileNotFoundError}.
        """
        self.assertRaises(FileNotFoundError, TerminalKey.load, self.path)

    def test_caCertificate(self) -> None:
        """
        An unreadable or non-certificate CA file is refused with a message.
        """
        self.assertRaises(TerminalClientError, httpClient, Clock(), self.path)
        os.makedirs(os.path.dirname(self.path))
        with open(self.path, "w") as f:
            f.write("not a certificate")
        self.assertRaises(TerminalClientError, httpClient, Clock(), self.path)


class AppEndpointsTests(SynchronousTestCase):
    """
    Tests for where the command-line terminal connects.
    """

    def test_isLocalhost(self) -> None:
        """
        C{localhost} and names under it are loopback names; others are not.
        """
        for host in ["localhost", "app.localhost", "A.B.LOCALHOST", "app.localhost."]:
            self.assertTrue(isLocalhost(host), host)
        for host in ["localhost.example", "applocalhost", "example.com", "127.0.0.1"]:
            self.assertFalse(isLocalhost(host), host)

    def test_localhostLoopback(self) -> None:
        """
        An app under C{.localhost} (Portal's default tunnel domain) is reached on 127.0.0.1,
        whatever the system resolver says, with TLS for the app's own name.
        """
        reactor = MemoryReactor()
        endpoint = _AppEndpoints(reactor, BrowserLikePolicyForHTTPS()).endpointForURI(
            URI.fromBytes(b"https://app.localhost:8443/.portal/pair")
        )
        endpoint.connect(Factory.forProtocol(Protocol))
        ((host, port, *_),) = reactor.tcpClients
        self.assertEqual((host, port), ("127.0.0.1", 8443))

    def test_otherNames(self) -> None:
        """
        Other apps are reached at the addresses their names resolve to.
        """
        endpoint = _AppEndpoints(MemoryReactor(), BrowserLikePolicyForHTTPS()).endpointForURI(
            URI.fromBytes(b"https://app.example/")
        )
        inner = endpoint._wrappedEndpoint  # type: ignore[attr-defined]
        self.assertIsInstance(inner, HostnameEndpoint)
        self.assertEqual((inner._hostBytes, inner._port), (b"app.example", 443))


class JoinTests(SynchronousTestCase):
    """
    Tests for L{join} and L{openSession} against the pages in memory.
    """

    def setUp(self) -> None:
        """
        A tunnel's terminals behind an in-memory gateway, and a command-line terminal's key.
        """
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.access = TerminalAccess.open(self.clock, self.mktemp())
        self.addCleanup(self.access.close)
        self.gateway = GatewayStub(self.access.pages, self.access.authenticator)
        self.http = StubTreq(self.gateway)
        self.app = parseAppURL(APP)
        self.key = TerminalKey.generate()

    def caller(self, session: Session) -> object:
        """
        @return: What the app is told about a request carrying C{session}'s cookie.
        """
        response = self.successResultOf(
            self.http.get(APP + "/private", headers={b"cookie": [session.cookie.encode()]})
        )
        return json.loads(self.successResultOf(response.content()))["caller"]

    def test_join(self) -> None:
        """
        Joining with a code pairs the key as a terminal (the name given wins only without the
        owner's), and the session it gets makes requests come from that terminal.
        """
        code = self.access.issueCode().code
        session = self.successResultOf(
            join(self.clock, self.http, self.app, self.key, code, "build box")
        )
        self.assertEqual(session.terminal, self.key.id)
        self.assertEqual(session.name, "build box")
        self.assertEqual(session.expires, 1_700_000_000 + SESSION_TTL)
        self.assertTrue(session.cookie.startswith("__Host-ptl-session=1." + self.key.id))
        self.assertEqual(self.caller(session), ["terminal", self.key.id])
        self.assertEqual([t.id for t in self.access.list()], [self.key.id])
        self.assertEqual(self.gateway.requests[0].path, b"/.portal/session/challenge")
        self.assertEqual(self.gateway.requests[1].header(b"content-type"), b"application/json")

    def test_joinRefused(self) -> None:
        """
        A wrong code fails with the tunnel's message.
        """
        failure = self.failureResultOf(
            join(self.clock, self.http, self.app, self.key, "0000-0000"), TerminalClientError
        )
        self.assertIn("wrong pairing code", failure.getErrorMessage())

    def test_session(self) -> None:
        """
        A paired key gets fresh sessions; a copied cookie alone expires, the key renews.
        """
        first = self.successResultOf(
            join(self.clock, self.http, self.app, self.key, self.access.issueCode().code)
        )
        self.clock.advance(SESSION_TTL)
        response = self.successResultOf(
            self.http.get(APP + "/private", headers={b"cookie": [first.cookie.encode()]})
        )
        self.assertEqual(response.code, 401)
        second = self.successResultOf(openSession(self.clock, self.http, self.app, self.key))
        self.assertEqual(second.expires, 1_700_000_000 + 2 * SESSION_TTL)
        self.assertEqual(self.caller(second), ["terminal", self.key.id])

    def test_sessionRevoked(self) -> None:
        """
        A revoked terminal's renewal fails, saying so.
        """
        self.successResultOf(
            join(self.clock, self.http, self.app, self.key, self.access.issueCode().code)
        )
        self.access.revoke(self.key.id)
        failure = self.failureResultOf(
            openSession(self.clock, self.http, self.app, self.key), TerminalClientError
        )
        self.assertIn("revoked", failure.getErrorMessage())

    def test_sessionNotPaired(self) -> None:
        """
        An unpaired key's renewal fails.
        """
        failure = self.failureResultOf(
            openSession(self.clock, self.http, self.app, self.key), TerminalClientError
        )
        self.assertIn("no terminal", failure.getErrorMessage())

    def test_otherHost(self) -> None:
        """
        Proofs name the app's host: a gateway that sees another host refuses them.
        """
        self.gateway.authority = b"elsewhere.example:8443"
        failure = self.failureResultOf(
            join(self.clock, self.http, self.app, self.key, self.access.issueCode().code),
            TerminalClientError,
        )
        self.assertIn("signature", failure.getErrorMessage())

    def test_notPortal(self) -> None:
        """
        A server that does not answer with the pages' JSON is reported as such.
        """
        from twisted.web.resource import NoResource

        http = StubTreq(NoResource())
        failure = self.failureResultOf(
            join(self.clock, http, self.app, self.key, "x"), TerminalClientError
        )
        self.assertIn("404", failure.getErrorMessage())

    def test_answerTooLarge(self) -> None:
        """
        An answer larger than the terminal endpoints ever give is refused, not read whole.
        """
        from twisted.web.resource import Resource

        class Huge(Resource):
            isLeaf = True

            def render_POST(self, request: object) -> bytes:
                return b"x" * (MAX_ANSWER + 1)

        failure = self.failureResultOf(
            join(self.clock, StubTreq(Huge()), self.app, self.key, "x"), TerminalClientError
        )
        self.assertIn(f"more than {MAX_ANSWER} bytes", failure.getErrorMessage())

    def test_unreachable(self) -> None:
        """
        A failure to connect is reported with its reason; a certificate the client does not
        trust, with the hint to give the tunnel's local CA.
        """
        from twisted.internet.defer import fail
        from twisted.python.failure import Failure
        from twisted.web.client import ResponseNeverReceived

        class Broken:
            def post(self, *a: object, **k: object) -> object:
                error = Exception("[('SSL routines', '', 'certificate verify failed')]")
                return fail(ResponseNeverReceived([Failure(error)]))

        failure = self.failureResultOf(
            join(self.clock, Broken(), self.app, self.key, "x"), TerminalClientError
        )
        self.assertIn(f"cannot reach {APP}: [('SSL routines'", failure.getErrorMessage())
        self.assertIn("--cacert", failure.getErrorMessage())

    def test_timeout(self) -> None:
        """
        An app that does not answer in time fails the exchange.
        """
        from twisted.internet.defer import Deferred

        class Silent:
            def post(self, *a: object, **k: object) -> Deferred[None]:
                return Deferred()

        d = join(self.clock, Silent(), self.app, self.key, "x")
        self.clock.advance(REQUEST_TIMEOUT)
        failure = self.failureResultOf(d, TerminalClientError)
        self.assertIn("did not answer", failure.getErrorMessage())
