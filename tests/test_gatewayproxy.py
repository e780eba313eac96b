"""
Tests for the app gateway inside the routed HTTP proxy (L{portal.tunnel.httpproxy},
L{portal.tunnel.http2}), entirely in memory: refused requests never open an upstream connection, and
admitted ones reach the app with their headers rewritten, over HTTP/1.1 and HTTP/2.

The proxy and its L{tests.test_httpproxy.FakePool} are those of the proxy's own tests, with a
L{Gateway} for two apps (C{app} and C{other}) and the fake authenticators of
L{tests.test_access}.
"""

from __future__ import annotations

import copy
from typing import Any

from portal.gateway.access import DECISION_TIMEOUT, MAX_BODY, Gateway
from portal.gateway.appjson import parseApp
from portal.gateway.caller import AuthenticationFailed, Caller
from portal.gateway.routes import Upstream
from portal.tunnel import http2, httpproxy
from portal.tunnel.httpproxy import HTTPProxy
from portal.tunnel.report import Reporter
from tests.test_access import FakeAuthenticator, FakePages
from tests.test_appjson import EXAMPLE
from tests.test_http2 import AUTHORITY, H2Client, H2TestCase, Response
from tests.test_httpproxy import OK_HELLO, ProxyTestCase, parseResponses

#: The upstreams of the app C{app}: C{/} and C{/api} (stripped).
APP_ROOT = Upstream("127.0.0.1", 5173, False, "")
APP_API = Upstream("127.0.0.1", 3001, False, "")
#: The upstream of the app C{other}.
OTHER_ROOT = Upstream("127.0.0.1", 4000, False, "")
TERMINAL = Caller("terminal", "term-1", "Laptop")
PEER = Caller("peer", "p" * 52, "Alice")
IDENTITY = "q3wat5w3yickabcdefghijklmnopqrstuvwxyz234567abcdefgh"


def appData(name: str, routes: dict[str, str]) -> dict[str, Any]:
    """
    @return: L{EXAMPLE} (C{""} private with the three identity headers, C{/public/} public,
        C{/friends/} peer) named C{name} with C{routes}.
    """
    data = copy.deepcopy(EXAMPLE)
    data.update(name=name, routes=routes)
    return data


class GatewayProxyMixin:
    """
    Builds a proxy whose gateway serves C{app.localhost} (the visitors' SNI) and
    C{other.localhost}, with a terminal and a peer authenticator.
    """

    pool: Any
    clock: Any
    out: Any

    def setUpGateway(self) -> None:
        """
        Replace the test case's proxy by one with a gateway, keeping its pool.
        """
        self.terminals = FakeAuthenticator("terminal", {b"t1": TERMINAL})
        self.peers = FakeAuthenticator("peer", {b"p1": PEER})
        self.signer = FakeAuthenticator("signature", {b"s1": PEER}, needsBody=True)
        apps = [
            parseApp(appData("app", {"/": "5173", "/api": "3001,strip"})),
            parseApp(appData("other", {"/": "4000"})),
        ]
        self.gateway = Gateway(apps, IDENTITY, [self.terminals, self.peers, self.signer])
        self.proxy = HTTPProxy(self.clock, None, Reporter(self.out, asJSON=True), self.gateway)
        self.proxy.pool = self.pool


class HTTP11Tests(GatewayProxyMixin, ProxyTestCase):
    """
    The gateway on the HTTP/1.1 path.
    """

    def setUp(self) -> None:
        """
        Build the proxy with its gateway.
        """
        super().setUp()
        self.setUpGateway()

    def get(self, path: bytes, *headers: bytes, host: bytes = b"app.localhost") -> bytes:
        """
        @return: A GET request for C{path} with C{Host} and C{headers} (each C{b"Name: value"}).
        """
        lines = [b"GET %s HTTP/1.1" % path, b"Host: " + host, *headers]
        return b"\r\n".join(lines) + b"\r\n\r\n"

    def test_refusedNeverConnects(self) -> None:
        """
        An anonymous request for a private path gets 401 with the pairing page and is reported;
        no upstream connection is asked for, and the connection stays open for the next request.
        """
        _, transport = self.visit(self.get(b"/notes"))
        [response] = parseResponses(transport.value())
        self.assertEqual(response.status, 401)
        self.assertIn(b"https://app.localhost/.portal/pair", response.body)
        self.assertEqual(response.header(b"content-length"), b"%d" % len(response.body))
        self.assertEqual(response.header(b"connection"), b"keep-alive")
        self.assertEqual(self.pool.gets, [])
        self.assertFalse(transport.disconnecting)
        [event] = self.requestLog()
        self.assertEqual((event["path"], event["status"], event["route"]), ("/notes", 401, None))

    def test_refusedBodyNeverSent(self) -> None:
        """
        A refused request with a body gets its answer and the connection is closed (the body was
        not read); nothing reaches an upstream.
        """
        _, transport = self.visit(
            b"POST /notes HTTP/1.1\r\nHost: app.localhost\r\nContent-Length: 6\r\n\r\nsecret"
        )
        [response] = parseResponses(transport.value())
        self.assertEqual(response.status, 401)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.pool.gets, [])

    def test_publicHeaders(self) -> None:
        """
        A public path reaches the app's route; the app sees C{X-Ptl-Client-Type: public}, empty
        id and name, and none of the visitor's own C{X-Ptl-*} headers (whatever their case).
        """
        self.visit(
            self.get(
                b"/public/page?x=1",
                b"X-Ptl-Client-Id: forged",
                b"x-ptl-client-type: terminal",
                b"X-PTL-Extra: x",
                b"Accept: */*",
            )
        )
        self.assertEqual(self.pool.gets, [APP_ROOT])
        [request] = self.sentUpstream(self.pool.connect())
        self.assertEqual(request.url, b"/public/page?x=1")
        self.assertEqual(request.header(b"x-ptl-client-type"), b"public")
        self.assertEqual(request.header(b"x-ptl-client-id"), b"")
        self.assertEqual(request.header(b"x-ptl-client-name"), b"")
        self.assertNotIn(b"x-ptl-extra", request.names())
        self.assertEqual(request.header(b"accept"), b"*/*")
        self.assertEqual(request.header(b"x-forwarded-for"), b"203.0.113.9")

    def test_terminal(self) -> None:
        """
        A terminal reaches a private path; its credentials (header and cookie) are removed, other
        cookies kept, its identity headers added.
        """
        self.visit(
            self.get(
                b"/api/notes",
                b"X-Fake-Terminal: t1",
                b"Cookie: theme=dark; terminal=secret; lang=en",
            )
        )
        self.assertEqual(self.pool.gets, [APP_API])
        [request] = self.sentUpstream(self.pool.connect())
        self.assertEqual(request.url, b"/notes")
        self.assertEqual(request.header(b"x-ptl-client-type"), b"terminal")
        self.assertEqual(request.header(b"x-ptl-client-id"), b"term-1")
        self.assertEqual(request.header(b"x-ptl-client-name"), b"Laptop")
        self.assertNotIn(b"x-fake-terminal", request.names())
        self.assertEqual(request.header(b"cookie"), b"theme=dark; lang=en")

    def test_connectionCannotDropIdentity(self) -> None:
        """
        A visitor naming an identity header in C{Connection} (which removes the headers it names)
        cannot keep it from the app.
        """
        self.visit(self.get(b"/public/", b"Connection: keep-alive, X-Ptl-Client-Type"))
        [request] = self.sentUpstream(self.pool.connect())
        self.assertEqual(request.header(b"x-ptl-client-type"), b"public")

    def test_forbidden(self) -> None:
        """
        A peer asking for a private path gets 403; no upstream connection is asked for.
        """
        _, transport = self.visit(self.get(b"/", b"X-Fake-Peer: p1"))
        self.assertEqual([r.status for r in parseResponses(transport.value())], [403])
        self.assertEqual(self.pool.gets, [])

    def test_pendingDecision(self) -> None:
        """
        While an authenticator has not answered, no upstream is asked for and the visitor's
        transport is paused; the body is held, and follows the head once the request is admitted.
        """
        visitor, transport = self.visit(
            b"POST /api/x HTTP/1.1\r\nHost: app.localhost\r\nX-Fake-Terminal: wait\r\n"
            b"Content-Length: 4\r\n\r\nbo"
        )
        self.assertEqual(self.pool.gets, [])
        self.assertEqual(transport.producerState, "paused")
        visitor.dataReceived(b"dy")
        self.terminals.pending[0].callback(TERMINAL)
        self.assertEqual(self.pool.gets, [APP_API])
        [request] = self.sentUpstream(self.pool.connect())
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual(request.body, b"body")
        self.assertEqual(request.header(b"x-ptl-client-type"), b"terminal")

    def test_pendingThenRefused(self) -> None:
        """
        An authenticator that fails later refuses the request then.
        """
        _, transport = self.visit(self.get(b"/", b"X-Fake-Terminal: wait"))
        self.terminals.pending[0].errback(AuthenticationFailed(401, "revoked"))
        [response] = parseResponses(transport.value())
        self.assertEqual(response.status, 401)
        self.assertIn(b"revoked", response.body)
        self.assertEqual(self.pool.gets, [])

    def test_decisionTimeout(self) -> None:
        """
        An authenticator that never answers does not hold the request forever: 504 after
        L{DECISION_TIMEOUT} seconds, and nothing reaches an upstream.
        """
        self.gateway.clock = self.clock
        _, transport = self.visit(self.get(b"/", b"X-Fake-Terminal: wait"))
        self.clock.advance(DECISION_TIMEOUT)
        [response] = parseResponses(transport.value())
        self.assertEqual(response.status, 504)
        self.assertEqual(self.pool.gets, [])

    def test_visitorGoneWhileDeciding(self) -> None:
        """
        A visitor that leaves while the gateway decides gets nothing sent upstream.
        """
        visitor, _ = self.visit(self.get(b"/", b"X-Fake-Terminal: wait"))
        visitor.connectionLost()
        self.terminals.pending[0].callback(TERMINAL)
        self.assertEqual(self.pool.gets, [])

    def test_signedBodyBuffered(self) -> None:
        """
        A request carrying the credentials of an authenticator that needs the body is read whole
        (a C{100 Continue} answers C{Expect}), the authenticator gets the body, and the body then
        goes upstream.
        """
        visitor, transport = self.visit(
            b"POST /friends/x HTTP/1.1\r\nHost: app.localhost\r\nX-Fake-Signature: s1\r\n"
            b"Expect: 100-continue\r\nContent-Length: 6\r\n\r\n"
        )
        self.assertEqual(transport.value(), b"HTTP/1.1 100 Continue\r\n\r\n")
        self.assertEqual(self.signer.seen, [])
        self.assertEqual(transport.producerState, "producing")
        visitor.dataReceived(b"sig")
        visitor.dataReceived(b"ned")
        [seen] = self.signer.seen
        self.assertEqual(seen.body, b"signed")
        [request] = self.sentUpstream(self.pool.connect())
        self.assertEqual(request.body, b"signed")
        self.assertEqual(request.header(b"x-ptl-client-type"), b"peer")
        self.assertNotIn(b"x-fake-signature", request.names())

    def test_signedChunkedBody(self) -> None:
        """
        A chunked body is read whole too, and forwarded chunked.
        """
        self.visit(
            b"POST /friends/x HTTP/1.1\r\nHost: app.localhost\r\nX-Fake-Signature: s1\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
        )
        self.assertEqual(self.signer.seen[0].body, b"abcde")
        [request] = self.sentUpstream(self.pool.connect())
        self.assertEqual(request.body, b"abcde")
        self.assertTrue(request.complete)

    def test_bodyTooLarge(self) -> None:
        """
        A body the gateway must read whole and that announces more than L{MAX_BODY} gets 413 at
        once and the connection closes; the authenticator is not asked.
        """
        _, transport = self.visit(
            b"POST /api/x HTTP/1.1\r\nHost: app.localhost\r\nX-Fake-Signature: s1\r\n"
            b"Content-Length: %d\r\n\r\n" % (MAX_BODY + 1)
        )
        [response] = parseResponses(transport.value())
        self.assertEqual(response.status, 413)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.signer.seen, [])
        self.assertEqual(self.pool.gets, [])

    def test_chunkedBodyTooLarge(self) -> None:
        """
        A chunked body that grows past the limit gets 413 then; what follows is ignored.
        """
        self.patch(httpproxy, "MAX_BODY", 4)
        visitor, transport = self.visit(
            b"POST /api/x HTTP/1.1\r\nHost: app.localhost\r\nX-Fake-Signature: s1\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"
        )
        self.assertEqual(transport.value(), b"")
        visitor.dataReceived(b"3\r\ndef\r\n")
        [response] = parseResponses(transport.value())
        self.assertEqual(response.status, 413)
        self.assertTrue(transport.disconnecting)
        visitor.dataReceived(b"3\r\nghi\r\n0\r\n\r\n")
        self.assertEqual(self.signer.seen, [])
        self.assertEqual(self.pool.gets, [])

    def test_localPaths(self) -> None:
        """
        C{/.portal/} paths never reach the app: 404 without pages, the pages' answer with them.
        """
        _, transport = self.visit(self.get(b"/.portal/pair"))
        self.assertEqual([r.status for r in parseResponses(transport.value())], [404])
        self.gateway.pages = FakePages()
        _, transport = self.visit(self.get(b"/public/../.portal/pair"))
        [response] = parseResponses(transport.value())
        self.assertEqual((response.status, response.body), (200, b"/public/../.portal/pair"))
        self.assertEqual(self.pool.gets, [])

    def test_appByHost(self) -> None:
        """
        The request's host picks the app (and its routes); a host that is no app gets 421.
        """
        self.visit(self.get(b"/public/", host=b"other.localhost:8443"))
        self.assertEqual(self.pool.gets, [OTHER_ROOT])
        _, transport = self.visit(self.get(b"/public/", host=b"evil.example"))
        self.assertEqual([r.status for r in parseResponses(transport.value())], [421])
        self.assertEqual(self.pool.gets, [OTHER_ROOT])

    def test_pipelined(self) -> None:
        """
        Pipelined requests are answered in order, refused ones by the gateway and admitted ones
        by the app.
        """
        visitor, transport = self.visit(self.get(b"/secret") + self.get(b"/public/"))
        upstream = self.pool.connect()
        upstream.dataReceived(OK_HELLO)
        self.assertEqual([r.status for r in parseResponses(transport.value())], [401, 200])

    def test_upgradeRefused(self) -> None:
        """
        A refused WebSocket upgrade gets its answer and the connection closes.
        """
        _, transport = self.visit(self.get(b"/ws", b"Connection: Upgrade", b"Upgrade: websocket"))
        self.assertEqual([r.status for r in parseResponses(transport.value())], [401])
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.pool.gets, [])


class HTTP2Tests(GatewayProxyMixin, H2TestCase):
    """
    The gateway on the HTTP/2 path.
    """

    def setUp(self) -> None:
        """
        Build the proxy with its gateway.
        """
        super().setUp()
        self.setUpGateway()

    def open(
        self, path: bytes, headers: list[tuple[bytes, bytes]], method: bytes = b"GET"
    ) -> tuple[H2Client, int]:
        """
        Open a stream without ending it.

        @return: The client and the stream ID.
        """
        _, _, client = self.connectH2()
        streamID: int = client.conn.get_next_available_stream_id()
        client.conn.send_headers(
            streamID,
            [
                (b":method", method),
                (b":path", path),
                (b":authority", AUTHORITY),
                (b":scheme", b"https"),
                *headers,
            ],
        )
        client.responses[streamID] = Response()
        client.flush()
        return client, streamID

    def test_refusedNeverConnects(self) -> None:
        """
        An anonymous request for a private path gets 401 with the pairing page; no upstream
        connection is asked for.
        """
        client, streamID = self.get(b"/notes")
        response = client.responses[streamID]
        self.assertEqual(response.status, 401)
        self.assertIn(b"/.portal/pair", response.body)
        self.assertEqual(response.header(b"www-authenticate"), b'Portal realm="portal"')
        self.assertTrue(response.ended)
        self.assertEqual(self.pool.gets, [])

    def test_publicHeaders(self) -> None:
        """
        A public path reaches the app, which sees C{X-Ptl-Client-Type: public} and none of the
        visitor's C{X-Ptl-*} headers.
        """
        _, _, client = self.connectH2()
        streamID = client.request(
            b"GET",
            b"/public/x",
            [(b"x-ptl-client-id", b"forged"), (b"x-ptl-client-type", b"terminal")],
        )
        client.flush()
        upstream = self.pool.connect()
        self.assertEqual(upstream.upstream, APP_ROOT)
        [request] = self.sentUpstream(upstream)
        self.assertEqual(request.header(b"x-ptl-client-type"), b"public")
        self.assertEqual(request.header(b"x-ptl-client-id"), b"")
        upstream.dataReceived(OK_HELLO)
        client.flush()
        self.assertEqual(client.responses[streamID].body, b"hello")

    def test_terminalCookies(self) -> None:
        """
        A terminal's credentials leave the request; cookie crumbs become one C{Cookie} header.
        """
        _, _, client = self.connectH2()
        client.request(
            b"GET",
            b"/api/x",
            [
                (b"x-fake-terminal", b"t1"),
                (b"cookie", b"theme=dark"),
                (b"cookie", b"terminal=secret"),
                (b"cookie", b"lang=en"),
            ],
        )
        client.flush()
        upstream = self.pool.connect()
        self.assertEqual(upstream.upstream, APP_API)
        [request] = self.sentUpstream(upstream)
        self.assertEqual(request.header(b"x-ptl-client-name"), b"Laptop")
        self.assertEqual(request.header(b"cookie"), b"theme=dark; lang=en")
        self.assertNotIn(b"x-fake-terminal", request.names())

    def test_signedBodyBuffered(self) -> None:
        """
        A signed request's body is read whole before the decision, then sent upstream.
        """
        client, streamID = self.open(b"/friends/x", [(b"x-fake-signature", b"s1")], method=b"POST")
        client.conn.send_data(streamID, b"sig")
        client.flush()
        self.assertEqual(self.signer.seen, [])
        self.assertEqual(self.pool.gets, [])
        client.conn.send_data(streamID, b"ned", end_stream=True)
        client.flush()
        self.assertEqual(self.signer.seen[0].body, b"signed")
        [request] = self.sentUpstream(self.pool.connect())
        self.assertEqual(request.body, b"signed")
        self.assertTrue(request.complete)

    def test_bodyTooLarge(self) -> None:
        """
        A signed request announcing more than L{MAX_BODY} gets 413 without being read.
        """
        client, streamID = self.open(
            b"/api/x",
            [(b"x-fake-signature", b"s1"), (b"content-length", b"%d" % (MAX_BODY + 1))],
            method=b"POST",
        )
        self.assertEqual(client.responses[streamID].status, 413)
        self.assertEqual(self.pool.gets, [])

    def test_bodyGrowsTooLarge(self) -> None:
        """
        A signed request whose body grows past the limit gets 413 then.
        """
        self.patch(http2, "MAX_BODY", 4)
        client, streamID = self.open(b"/api/x", [(b"x-fake-signature", b"s1")], method=b"POST")
        client.conn.send_data(streamID, b"abc")
        client.flush()
        self.assertEqual(client.responses[streamID].status, 0)
        client.conn.send_data(streamID, b"def")
        client.flush()
        self.assertEqual(client.responses[streamID].status, 413)
        self.assertEqual(self.signer.seen, [])
        self.assertEqual(self.pool.gets, [])

    def test_bodyHeldWhileDeciding(self) -> None:
        """
        A body arriving while an authenticator decides is held, and follows the head upstream.
        """
        client, streamID = self.open(b"/api/x", [(b"x-fake-terminal", b"wait")], method=b"POST")
        client.conn.send_data(streamID, b"body", end_stream=True)
        client.flush()
        self.assertEqual(self.pool.gets, [])
        self.terminals.pending[0].callback(TERMINAL)
        [request] = self.sentUpstream(self.pool.connect())
        self.assertEqual(request.body, b"body")
