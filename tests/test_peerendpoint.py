"""
Tests for L{portal.gateway.peerendpoint}: an app's call through the local peer endpoint is signed
and forwarded to the peer, whose gateway (here a resource running the real L{PeerAuthenticator})
accepts it; all in memory, with L{treq.testing} agents and test clocks.
"""

from __future__ import annotations

import json
import os
from io import StringIO
from typing import Any

import treq
from OpenSSL import SSL
from treq.testing import RequestTraversalAgent, StubTreq
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import CertificateOptions
from twisted.internet.task import Clock, Cooperator
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test.iosim import connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase
from twisted.web._newclient import ResponseNeverReceived
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from twisted.web.test.requesthelper import DummyRequest

from portal.gateway.caller import AuthenticationFailed, Caller, GatewayRequest
from portal.gateway.contacts import Contact, ContactList
from portal.gateway.loopback import EndpointAddressError
from portal.gateway.peerendpoint import (
    PeerEndpointResource,
    PeerEndpointService,
    PeerTLSPolicy,
    connectHost,
    parseEndpointAddress,
)
from portal.gateway.signatures import PeerAuthenticator
from portal.trust.identity import Identity
from portal.trust.localca import LocalCA
from portal.tunnel.report import Reporter
from tests.test_localca import HandshakeRecorder
from tests.test_signatures import NOW, FakeContacts


class FakePeerGateway(Resource):
    """
    The peer's side: what its gateway does with a request, as far as peers go.  Answers 200 with
    the caller and what it received, or the authenticator's refusal.

    @ivar received: The L{GatewayRequest}s received.
    """

    isLeaf = True

    def __init__(self, authenticator: PeerAuthenticator) -> None:
        super().__init__()
        self.authenticator = authenticator
        self.received: list[GatewayRequest] = []
        self.pending: list[Request] = []
        self.stream = False

    def render(self, request: Request) -> int:
        """
        Authenticate the request, and answer.
        """
        assert request.content is not None
        host = request.getHeader(b"host")
        assert host is not None
        gatewayRequest = GatewayRequest(
            request.method,
            host,
            request.uri,
            tuple(
                (name.lower(), value)
                for name, values in request.requestHeaders.getAllRawHeaders()
                for value in values
            ),
            request.content.read(),
        )
        self.received.append(gatewayRequest)

        def accepted(caller: Caller | None) -> None:
            assert caller is not None
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"x-peer", b"bob")
            request.setHeader(b"connection", b"keep-alive")
            if self.stream:
                request.write(b"part 1;")
                self.pending.append(request)
                return
            request.write(
                json.dumps(
                    {"caller": [caller.type, caller.id, caller.name], "path": request.uri.decode()}
                ).encode()
            )
            request.finish()

        def refused(failure: Failure) -> None:
            failure.trap(AuthenticationFailed)
            request.setResponseCode(failure.value.status)
            request.write(failure.value.message.encode())
            request.finish()

        self.authenticator.authenticate(gatewayRequest).addCallbacks(accepted, refused)
        return NOT_DONE_YET


class HangingAgent:
    """
    An agent whose requests never get an answer.

    @ivar cancelled: How many requests were cancelled.
    """

    cancelled = 0

    def request(self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None):
        """
        @return: A L{Deferred} that never fires by itself.
        """

        def cancel(d: Deferred[Any]) -> None:
            self.cancelled += 1

        return Deferred(cancel)


class PeerEndpointTests(SynchronousTestCase):
    """
    Tests for L{PeerEndpointResource}: Alice's app calls Bob through Alice's endpoint.
    """

    def setUp(self) -> None:
        """
        Alice and Bob are each other's contacts; Bob's tunnel is C{https://bob.example:8443}.
        """
        self.alice = Identity.generate()
        self.bob = Identity.generate()
        self.clock = Clock()
        self.clock.advance(NOW)
        peerClock = Clock()
        peerClock.advance(NOW)
        self.bobAuthenticator = PeerAuthenticator(
            FakeContacts([Contact.create(self.alice.id, "Alice")]), peerClock, {"bob.example"}
        )
        self.peer = FakePeerGateway(self.bobAuthenticator)
        self.peerAgent = RequestTraversalAgent(self.peer)
        self.agents: dict[str, Any] = {}
        self.bobContact = Contact.create(self.bob.id, "Bob", ["https://bob.example:8443"])
        self.contacts = FakeContacts([self.bobContact])
        self.endpoint = PeerEndpointResource(
            self.alice,
            self.contacts,
            lambda contact: self.agents.get(contact.id, self.peerAgent),
            self.clock,
            cooperator=Cooperator(scheduler=lambda f: self.clock.callLater(0, f)),
        )
        self.app = StubTreq(self.endpoint)

    def pump(self) -> None:
        """
        Move everything along: the app's connection, the peer's, and the clocks' immediate calls.
        """
        for _ in range(20):
            self.clock.advance(0)
            self.peerAgent.flush()
            self.app.flush()

    def call(
        self,
        path: str,
        method: str = "GET",
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        host: str = "127.0.0.1:8790",
    ) -> tuple[int, dict[bytes, list[bytes]], bytes]:
        """
        Make an app's request to the endpoint.

        @return: The response's status, headers and body.
        """
        d = self.app.request(method, f"http://{host}{path}", data=body, headers=headers)
        self.pump()
        response = self.successResultOf(d)
        content = self.app.content(response)
        self.pump()
        return (
            response.code,
            dict(response.headers.getAllRawHeaders()),
            self.successResultOf(content),
        )

    def test_signsAndForwards(self) -> None:
        """
        A call to C{/peer/<id>/<path>} reaches the peer at its URL with the path and query, the
        body and the app's own headers, signed so that the peer's authenticator sees Alice.
        """
        status, headers, body = self.call(
            f"/peer/{self.bob.id}/inbox?page=2",
            "POST",
            b'{"hello": "bob"}',
            {"Content-Type": "application/json", "X-Custom": "kept"},
        )
        self.assertEqual(status, 200, body)
        answer = json.loads(body)
        self.assertEqual(answer["caller"], ["peer", self.alice.id, "Alice"])
        self.assertEqual(answer["path"], "/inbox?page=2")
        [received] = self.peer.received
        self.assertEqual(received.method, b"POST")
        self.assertEqual(received.authority, b"bob.example:8443")
        self.assertEqual(received.body, b'{"hello": "bob"}')
        self.assertEqual(received.header(b"x-custom"), b"kept")
        self.assertEqual(received.header(b"content-type"), b"application/json")
        self.assertEqual(headers[b"X-Peer"], [b"bob"])

    def test_pathForms(self) -> None:
        """
        C{/peer/<id>} alone is the peer's C{/}; a query right after the id is kept; percent
        escapes are passed on as they are.
        """
        for path, expected in (
            (f"/peer/{self.bob.id}", "/"),
            (f"/peer/{self.bob.id}/", "/"),
            (f"/peer/{self.bob.id}?q=1", "/?q=1"),
            (f"/peer/{self.bob.id}/a%2Fb/c%20d", "/a%2Fb/c%20d"),
        ):
            status, _, body = self.call(path)
            self.assertEqual(status, 200, body)
            self.assertEqual(json.loads(body)["path"], expected)

    def test_appCannotForge(self) -> None:
        """
        Signature headers the app sends are replaced by the tunnel's own, and hop-by-hop headers
        (including those its C{Connection} names) are not forwarded; the peer's hop-by-hop
        response headers do not reach the app.
        """
        status, headers, body = self.call(
            f"/peer/{self.bob.id}/x",
            headers={
                "Signature": "portal=:AAAA:",
                "Portal-Peer-Key": ":AAAA:",
                "Content-Digest": "sha-256=:AAAA:",
                "Connection": "x-drop",
                "X-Drop": "secret",
                "Proxy-Authorization": "Basic eDp5",
            },
        )
        self.assertEqual(status, 200, body)
        [received] = self.peer.received
        self.assertEqual(len([v for k, v in received.headers if k == b"signature"]), 1)
        for name in (b"x-drop", b"proxy-authorization"):
            self.assertIsNone(received.header(name), name)
        # The agent's own Connection header, not the app's.
        self.assertNotIn(b"x-drop", received.header(b"connection") or b"")
        self.assertNotIn(b"Connection", headers)
        self.assertEqual(headers[b"X-Peer"], [b"bob"])

    def test_streams(self) -> None:
        """
        The peer's response reaches the app as it comes: its headers and first bytes before the
        peer has finished.
        """
        self.peer.stream = True
        d = self.app.get(f"http://127.0.0.1:8790/peer/{self.bob.id}/events")
        self.pump()
        response = self.successResultOf(d)
        chunks: list[bytes] = []
        done = treq.collect(response, chunks.append)
        self.pump()
        self.assertEqual(b"".join(chunks), b"part 1;")
        self.assertNoResult(done)
        [pending] = self.peer.pending
        pending.write(b"part 2")
        pending.finish()
        self.pump()
        self.successResultOf(done)
        self.assertEqual(b"".join(chunks), b"part 1;part 2")

    def test_unknownPeer(self) -> None:
        """
        An identity that is not a contact is a 404 saying how to add it; nothing is sent.
        """
        stranger = Identity.generate()
        status, _, body = self.call(f"/peer/{stranger.id}/x")
        self.assertEqual(status, 404)
        self.assertIn(b"is not a contact", body)
        self.assertIn(b"portal peers add " + stranger.id.encode(), body)
        self.assertEqual(self.peer.received, [])

    def test_shortIdOrOtherPath(self) -> None:
        """
        A short id is a 404 asking for the full id; a path outside C{/peer/} is a 404.
        """
        status, _, body = self.call(f"/peer/{self.bob.shortId}/x")
        self.assertEqual(status, 404)
        self.assertIn(b"short id", body)
        status, _, body = self.call("/other")
        self.assertEqual(status, 404)
        self.assertIn(b"/peer/<identity-id>/<path>", body)
        self.assertEqual(self.peer.received, [])

    def test_notASCII(self) -> None:
        """
        A path or method that cannot be sent as they are (not ASCII, a fragment) is a 400; nothing
        is sent.
        """
        for method, uri in (
            (b"GET", f"/peer/{self.bob.id}/caf\xc3\xa9".encode("latin-1")),
            (b"GET", f"/peer/{self.bob.id}/a#b".encode()),
            (b"G\xc3T", f"/peer/{self.bob.id}/a".encode()),
        ):
            request = DummyRequest([])
            request.method, request.uri = method, uri
            request.client = IPv4Address("TCP", "127.0.0.1", 40000)
            body = self.endpoint.render(request)
            self.assertEqual(request.responseCode, 400, uri)
            self.assertIn(b"ASCII", body)
        self.assertEqual(self.peer.received, [])

    def test_noURL(self) -> None:
        """
        A contact without a URL cannot be called: 502, saying how to give one.
        """
        self.contacts._contacts[self.bob.id] = Contact.create(self.bob.id, "Bob")
        status, _, body = self.call(f"/peer/{self.bob.id}/x")
        self.assertEqual(status, 502)
        self.assertIn(b"--url", body)

    def test_browserRefused(self) -> None:
        """
        Requests from web pages are refused: with an C{Origin}, a cross-site C{Sec-Fetch-Site}, or
        a C{Host} that is not a loopback name (DNS rebinding).  A C{Sec-Fetch-Site: none} (typed
        by the user) and a C{localhost} Host are served.
        """
        path = f"/peer/{self.bob.id}/x"
        for headers, host in (
            ({"Origin": "https://evil.example"}, "127.0.0.1:8790"),
            ({"Sec-Fetch-Site": "cross-site"}, "127.0.0.1:8790"),
            ({}, "evil.example:8790"),
        ):
            status, _, body = self.call(path, headers=headers, host=host)
            self.assertEqual(status, 403, (headers, host))
        self.assertEqual(self.peer.received, [])
        self.assertEqual(self.call(path, headers={"Sec-Fetch-Site": "none"})[0], 200)
        self.assertEqual(self.call(path, host="localhost:8790")[0], 200)

    def test_bodyTooLarge(self) -> None:
        """
        A body over the limit is refused with 413 and not sent.
        """
        self.endpoint.maxBody = 10
        status, _, body = self.call(f"/peer/{self.bob.id}/x", "POST", b"x" * 11)
        self.assertEqual(status, 413)
        self.assertEqual(self.peer.received, [])

    def test_peerRefusalPassedOn(self) -> None:
        """
        When the peer refuses the call (Alice is not its contact), its answer reaches the app.
        """
        self.bobAuthenticator.contacts = FakeContacts()
        status, _, body = self.call(f"/peer/{self.bob.id}/x")
        self.assertEqual(status, 403)
        self.assertIn(b"is not a contact of this Portal", body)

    def test_failover(self) -> None:
        """
        When a URL cannot be connected to, the next is tried, signed for its own authority.
        """
        self.contacts._contacts[self.bob.id] = Contact.create(
            self.bob.id, "Bob", ["https://down.example", "https://bob.example:8443"]
        )
        peerAgent = self.peerAgent
        tried: list[bytes] = []

        class Failing:
            def request(self, method: bytes, uri: bytes, *args: Any) -> Deferred[Any]:
                tried.append(uri)
                if uri.startswith(b"https://down.example/"):
                    return fail(ConnectionRefusedError())
                return peerAgent.request(method, uri, *args)

        self.agents[self.bob.id] = Failing()
        status, _, body = self.call(f"/peer/{self.bob.id}/x")
        self.assertEqual(status, 200, body)
        self.assertEqual(tried, [b"https://down.example/x", b"https://bob.example:8443/x"])
        self.assertEqual(self.peer.received[0].authority, b"bob.example:8443")

    def test_allDown(self) -> None:
        """
        When no URL can be connected to, the app gets a 502 naming each URL's error.
        """

        class Refusing:
            def request(self, *args: Any) -> Deferred[Any]:
                return fail(ConnectionRefusedError())

        self.agents[self.bob.id] = Refusing()
        status, _, body = self.call(f"/peer/{self.bob.id}/x")
        self.assertEqual(status, 502)
        self.assertIn(b"cannot reach Bob", body)
        self.assertIn(b"https://bob.example:8443", body)

    def test_timeout(self) -> None:
        """
        A peer that does not answer in time is a 504, and the request to it is cancelled.
        """
        hanging = HangingAgent()
        self.agents[self.bob.id] = hanging
        d = self.app.get(f"http://127.0.0.1:8790/peer/{self.bob.id}/x")
        self.pump()
        self.assertNoResult(d)
        self.clock.advance(30)
        self.pump()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 504)
        self.assertEqual(hanging.cancelled, 1)

    def test_tlsFailure(self) -> None:
        """
        A TLS failure (the peer's certificate is not trusted) is a 502 saying to give the peer's
        CA.
        """

        class Untrusted:
            def request(self, *args: Any) -> Deferred[Any]:
                reason = Failure(SSL.Error([("SSL routines", "", "certificate verify failed")]))
                return fail(ResponseNeverReceived([reason]))

        self.agents[self.bob.id] = Untrusted()
        status, _, body = self.call(f"/peer/{self.bob.id}/x")
        self.assertEqual(status, 502)
        self.assertIn(b"TLS to Bob", body)
        self.assertIn(b"--ca FILE", body)


class AddressTests(SynchronousTestCase):
    """
    Tests for L{parseEndpointAddress} and L{connectHost}.
    """

    def test_loopback(self) -> None:
        """
        Loopback addresses are accepted; a bare port means 127.0.0.1, port 0 the OS's choice.
        """
        self.assertEqual(parseEndpointAddress("8790"), ("127.0.0.1", 8790))
        self.assertEqual(parseEndpointAddress("127.0.0.1:0"), ("127.0.0.1", 0))
        self.assertEqual(parseEndpointAddress("127.0.0.2:80"), ("127.0.0.2", 80))
        self.assertEqual(parseEndpointAddress("[::1]:8790"), ("::1", 8790))
        self.assertEqual(parseEndpointAddress("localhost:1"), ("127.0.0.1", 1))

    def test_notLoopback(self) -> None:
        """
        Any other address is refused, saying why; so are malformed addresses.
        """
        for text in ("0.0.0.0:8790", "192.168.1.2:80", "[::]:8790", "example.com:80"):
            e = self.assertRaises(EndpointAddressError, parseEndpointAddress, text)
            self.assertIn("loopback", str(e))
        for text in ("", "127.0.0.1", "127.0.0.1:99999", "[::1]", "x:y"):
            self.assertRaises(EndpointAddressError, parseEndpointAddress, text)

    def test_connectHost(self) -> None:
        """
        Names under C{.localhost} are reached at C{localhost}; other hosts as they are.
        """
        self.assertEqual(connectHost("Bob.localhost"), "localhost")
        self.assertEqual(connectHost("localhost"), "localhost")
        self.assertEqual(connectHost("bob.example"), "bob.example")


class PeerEndpointServiceTests(SynchronousTestCase):
    """
    Tests for L{PeerEndpointService}.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.out = StringIO()
        self.contacts = ContactList(os.path.join(self.mktemp(), "peers.json"))

    def test_listensOnLoopbackAndReports(self) -> None:
        """
        The service listens on 127.0.0.1 only, and reports a C{peer-endpoint} event with its URL.
        """
        service = PeerEndpointService(
            self.reactor,
            Identity.generate(),
            self.contacts,
            "127.0.0.1:8790",
            Reporter(self.out, asJSON=True),
        )
        service.startService()
        [(port, _, _, interface)] = self.reactor.tcpServers
        self.assertEqual((port, interface), (8790, "127.0.0.1"))
        self.assertEqual(self.successResultOf(service.whenListening()), "http://127.0.0.1:8790")
        event = json.loads(self.out.getvalue())
        self.assertEqual(event["event"], "peer-endpoint")
        self.assertEqual(event["url"], "http://127.0.0.1:8790")
        self.successResultOf(service.stopService())
        self.assertIsNone(service.url)

    def test_ipv6(self) -> None:
        """
        C{[::1]:PORT} listens on ::1.
        """
        service = PeerEndpointService(self.reactor, Identity.generate(), self.contacts, "[::1]:0")
        d = service.whenListening()
        service.startService()
        self.assertEqual(self.reactor.tcpServers[0][3], "::1")
        self.assertEqual(self.successResultOf(d), "http://[::1]:0")

    def test_refusesOtherAddresses(self) -> None:
        """
        A non-loopback address is refused before anything listens.
        """
        self.assertRaises(
            EndpointAddressError,
            PeerEndpointService,
            self.reactor,
            Identity.generate(),
            self.contacts,
            "0.0.0.0:8790",
        )
        self.assertEqual(self.reactor.tcpServers, [])


class PeerTLSPolicyTests(SynchronousTestCase):
    """
    Tests for L{PeerTLSPolicy}, through TLS handshakes in memory against a tunnel's certificate
    from its local CA.
    """

    def setUp(self) -> None:
        directory = self.mktemp()
        self.ca = LocalCA.loadOrCreate(os.path.join(directory, "ca"), "Bob")
        self.otherCA = LocalCA.loadOrCreate(os.path.join(directory, "other"), "Mallory")

    def pem(self, ca: LocalCA) -> str:
        """
        @return: The CA's certificate file's contents.
        """
        with open(ca.certPath) as f:
            return f.read()

    def handshake(self, policy: PeerTLSPolicy, hostname: bytes) -> HandshakeRecorder:
        """
        Connect to a server presenting a certificate for C{bob.localhost} from L{ca}.

        @return: The client's application protocol after the handshake.
        """
        key, chain = self.ca.issue(["bob.localhost"])
        server = CertificateOptions(privateKey=key, certificate=chain[0], extraCertChain=chain[1:])
        address = IPv4Address("TCP", "127.0.0.1", 8443)
        serverFactory = TLSMemoryBIOFactory(server, False, Factory.forProtocol(Protocol))
        clientFactory = TLSMemoryBIOFactory(
            policy.creatorForNetloc(hostname, 8443), True, Factory.forProtocol(HandshakeRecorder)
        )
        client, _, pump = connectedServerAndClient(
            lambda: serverFactory.buildProtocol(address),
            lambda: clientFactory.buildProtocol(address),
            greet=False,
        )
        recorder = client.wrappedProtocol
        pump.flush()
        return recorder

    def test_trustsPeerCA(self) -> None:
        """
        With the peer's CA, the handshake with its tunnel completes.
        """
        self.assertTrue(
            self.handshake(PeerTLSPolicy(self.pem(self.ca)), b"bob.localhost").handshakeDone
        )

    def test_otherCARefused(self) -> None:
        """
        A certificate from another CA (someone in the middle, the relay) is refused.
        """
        recorder = self.handshake(PeerTLSPolicy(self.pem(self.otherCA)), b"bob.localhost")
        self.assertFalse(recorder.handshakeDone)
        assert recorder.lostReason is not None
        self.assertTrue(recorder.lostReason.check(SSL.Error))

    def test_wrongHostnameRefused(self) -> None:
        """
        A certificate for another hostname, even from the peer's CA, is refused.
        """
        recorder = self.handshake(PeerTLSPolicy(self.pem(self.ca)), b"carol.localhost")
        self.assertFalse(recorder.handshakeDone)

    def test_systemTrustByDefault(self) -> None:
        """
        Without a CA, the system's CAs are trusted, which do not include a local CA.
        """
        self.assertFalse(self.handshake(PeerTLSPolicy(None), b"bob.localhost").handshakeDone)
