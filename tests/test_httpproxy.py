"""
Tests for L{portal.tunnel.httpproxy}: the routed HTTP reverse proxy, entirely in memory.

The visitor is a L{VisitorHTTP} on a L{StringTransport}. Upstream connections are real
L{UpstreamConnection}s on L{StringTransport}s, handed out by L{FakePool}, so each test decides
when an upstream connects (or fails to) and what it answers.
"""

from __future__ import annotations

import io
import json
from typing import Any

import httptools
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import ConnectionDone, ConnectionRefusedError, TimeoutError
from twisted.internet.interfaces import IProtocol
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from portal.gateway.routes import RouteTable, Upstream, isGRPC, parseRoute
from portal.tunnel.httpproxy import (
    IDLE_TIMEOUT,
    LINK_THRESHOLD,
    MAX_HEAD_BYTES,
    MAX_IDLE_PER_UPSTREAM,
    RESPONSE_TIMEOUT,
    Exchange,
    H2Exchange,
    HTTPProxy,
    UpstreamConnection,
    UpstreamPool,
    VisitorHTTP,
)
from portal.tunnel.report import Reporter
from portal.wire.attach import StreamHeader

HEADER = StreamHeader(1, "app.localhost", "203.0.113.9", 5555)
API = Upstream("127.0.0.1", 3001, False, "")
APP = Upstream("127.0.0.1", 5173, False, "")
OK_HELLO = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"


class Message:
    """
    One HTTP message as a test reads it back.

    @ivar method: The request method (requests only).
    @ivar url: The request target (requests only).
    @ivar status: The status code (responses only).
    @ivar headers: The headers, in order, as sent.
    @ivar body: The body, with any chunked framing removed.
    @ivar complete: Whether the message ended (a close-delimited body never does here).
    """

    def __init__(self) -> None:
        self.method = b""
        self.url = b""
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = b""
        self.complete = False

    def values(self, name: bytes) -> list[bytes]:
        """
        @param name: A lowercase header name.
        @return: Every value of that header, in order.
        """
        return [v for n, v in self.headers if n.lower() == name]

    def header(self, name: bytes) -> bytes | None:
        """
        @param name: A lowercase header name.
        @return: The only value of that header, or L{None}; fails if it appears twice.
        """
        values = self.values(name)
        assert len(values) <= 1, f"{name!r} appears {len(values)} times"
        return values[0] if values else None

    def names(self) -> set[bytes]:
        """
        @return: The lowercase names of all headers.
        """
        return {n.lower() for n, _ in self.headers}


class _Collector:
    """
    C{httptools} callbacks that build L{Message}s.
    """

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.parser: Any = None

    def on_message_begin(self) -> None:
        """
        Start a message.
        """
        self.messages.append(Message())

    def on_url(self, url: bytes) -> None:
        """
        Accumulate the request target.
        """
        self.messages[-1].url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        """
        Record a header.
        """
        self.messages[-1].headers.append((name, value))

    def on_headers_complete(self) -> None:
        """
        Record the method or status.
        """
        if isinstance(self.parser, httptools.HttpRequestParser):
            self.messages[-1].method = self.parser.get_method()
        else:
            self.messages[-1].status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        """
        Accumulate the body.
        """
        self.messages[-1].body += body

    def on_message_complete(self) -> None:
        """
        Mark the message complete.
        """
        self.messages[-1].complete = True


def parseRequests(data: bytes) -> list[Message]:
    """
    Parse the requests an upstream received, checking their framing.

    @param data: Bytes written to the upstream's transport.
    @return: The requests.
    """
    collector = _Collector()
    collector.parser = httptools.HttpRequestParser(collector)
    collector.parser.feed_data(data)
    return collector.messages


def parseResponses(data: bytes) -> list[Message]:
    """
    Parse the responses a visitor received, checking their framing (not for HEAD, which
    C{httptools} cannot know about).

    @param data: Bytes written to the visitor's transport.
    @return: The responses.
    """
    collector = _Collector()
    collector.parser = httptools.HttpResponseParser(collector)
    collector.parser.feed_data(data)
    return collector.messages


def splitHead(data: bytes) -> tuple[bytes, list[tuple[bytes, bytes]], bytes]:
    """
    Split one message head off C{data} without interpreting its framing.

    @return: The start line, the headers, and the bytes after the head.
    """
    head, sep, rest = data.partition(b"\r\n\r\n")
    assert sep, f"no complete head in {data!r}"
    start, *lines = head.split(b"\r\n")
    headers = []
    for line in lines:
        name, _, value = line.partition(b":")
        headers.append((name, value.strip()))
    return start, headers, rest


def transportOf(protocol: IProtocol | VisitorHTTP | UpstreamConnection) -> StringTransport:
    """
    @return: The L{StringTransport} a protocol of these tests is connected to.
    """
    transport = getattr(protocol, "transport", None)
    assert isinstance(transport, StringTransport)
    return transport


def closeUpstream(connection: UpstreamConnection) -> None:
    """
    The upstream closes its connection cleanly.
    """
    transportOf(connection).loseConnection()
    connection.connectionLost(Failure(ConnectionDone()))


class FakePool(UpstreamPool):
    """
    An upstream pool whose connections the test makes.

    Idle connections are kept and taken as by the real pool; L{get} returns a Deferred that the
    test fires with L{connect} or fails with L{fail}.

    @ivar gets: The upstream of every L{get}, in order.
    @ivar waiting: The L{get}s not answered yet.
    @ivar taken: Every idle connection taken again, in order.
    @ivar released: Every L{release}, with its C{reusable} flag.
    @ivar forgotten: Every connection passed to L{forget}.
    """

    def __init__(self, reactor: Any) -> None:
        super().__init__(reactor)
        self.gets: list[Upstream] = []
        self.waiting: list[tuple[Upstream, Deferred[UpstreamConnection | H2Exchange]]] = []
        self.taken: list[UpstreamConnection] = []
        self.released: list[tuple[UpstreamConnection | H2Exchange, bool]] = []
        self.forgotten: list[UpstreamConnection] = []

    @property
    def idle(self) -> list[UpstreamConnection]:
        """
        The idle connections, to any upstream.
        """
        return [c for connections in self._idle.values() for c in connections]

    def takeIdle(
        self, upstream: Upstream, exchange: Exchange | None = None
    ) -> UpstreamConnection | None:
        """
        Take an idle connection as the real pool does, and record it.
        """
        connection = super().takeIdle(upstream, exchange)
        if connection is not None:
            self.taken.append(connection)
        return connection

    def get(
        self, upstream: Upstream, exchange: Exchange | None = None
    ) -> Deferred[UpstreamConnection | H2Exchange]:
        """
        An idle connection to C{upstream}, or a Deferred for the test to fire; HTTP/2 exchanges
        come from the real HTTP/2 pool (L{UpstreamPool.http2}).
        """
        self.gets.append(upstream)
        if upstream.http2 or (exchange is not None and isGRPC(exchange.headers)):
            return super().get(upstream, exchange)
        connection = self.takeIdle(upstream)
        if connection is not None:
            return succeed(connection)
        d: Deferred[UpstreamConnection | H2Exchange] = Deferred()
        self.waiting.append((upstream, d))
        return d

    def connect(self) -> UpstreamConnection:
        """
        Answer the oldest waiting L{get} with a new connection on a L{StringTransport}.

        @return: The connection.
        """
        upstream, d = self.waiting.pop(0)
        connection = UpstreamConnection(self, upstream)
        connection.makeConnection(StringTransport())
        d.callback(connection)
        return connection

    def fail(self, error: Exception) -> None:
        """
        Fail the oldest waiting L{get} with C{error}.
        """
        _, d = self.waiting.pop(0)
        d.errback(Failure(error))

    def release(self, connection: UpstreamConnection | H2Exchange, reusable: bool) -> None:
        """
        Record the release, then keep or close the connection as the real pool does.
        """
        self.released.append((connection, reusable))
        super().release(connection, reusable)

    def forget(self, connection: UpstreamConnection) -> None:
        """
        Record a closed connection, then stop offering it.
        """
        self.forgotten.append(connection)
        super().forget(connection)


class ProxyTestCase(SynchronousTestCase):
    """
    A proxy with the routes C{/api=3001,strip} and C{/=5173}, a L{FakePool} and a JSON reporter.
    """

    routes = ["/api=3001,strip", "/=5173"]

    def setUp(self) -> None:
        """
        Build the proxy and capture log events.
        """
        self.clock = MemoryReactorClock()
        self.out = io.StringIO()
        table = RouteTable([parseRoute(r) for r in self.routes])
        self.proxy = HTTPProxy(self.clock, table, Reporter(self.out, asJSON=True))
        self.pool = FakePool(self.clock)
        self.proxy.pool = self.pool
        self.events = EventLoggingObserver.createWithCleanup(
            self,  # type: ignore[arg-type]
            globalLogPublisher,
        )

    def visit(self, data: bytes = b"") -> tuple[VisitorHTTP, StringTransport]:
        """
        Connect a visitor and send C{data}.

        @return: The visitor's protocol and transport.
        """
        visitor = self.proxy.protocolFor(HEADER)
        transport = StringTransport()
        visitor.makeConnection(transport)
        if data:
            visitor.dataReceived(data)
        return visitor, transport

    def responseTimers(self) -> list[Any]:
        """
        @return: Pending upstream response timeouts (the visitors' idle timers are not counted).
        """
        return [
            call
            for call in self.clock.getDelayedCalls()
            if getattr(call.func, "__name__", "") == "_timedOut"
        ]

    def requestLog(self) -> list[dict[str, Any]]:
        """
        @return: The C{request} events the reporter printed, as JSON.
        """
        events = [json.loads(line) for line in self.out.getvalue().splitlines()]
        return [e for e in events if e["event"] == "request"]

    def sentUpstream(self, connection: UpstreamConnection) -> list[Message]:
        """
        @return: The requests C{connection} has sent so far.
        """
        return parseRequests(transportOf(connection).value())


class RoutingTests(ProxyTestCase):
    """
    Requests go to the route with the longest matching prefix.
    """

    def test_stripPrefix(self) -> None:
        """
        C{/api/users?x=1} goes to the C{/api} upstream as C{/users?x=1}, with C{X-Forwarded-Prefix}.
        """
        self.visit(b"GET /api/users?x=1 HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
        self.assertEqual(self.pool.gets, [API])
        upstream = self.pool.connect()
        self.assertTrue(transportOf(upstream).value().startswith(b"GET /users?x=1 HTTP/1.1\r\n"))
        [request] = self.sentUpstream(upstream)
        self.assertEqual(request.url, b"/users?x=1")
        self.assertEqual(request.header(b"x-forwarded-prefix"), b"/api")
        self.assertTrue(request.complete)

    def test_rootUnchanged(self) -> None:
        """
        Any other path goes to the C{/} upstream exactly as sent, without C{X-Forwarded-Prefix}.
        """
        self.visit(b"GET /static/app.js?v=2 HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
        self.assertEqual(self.pool.gets, [APP])
        [request] = self.sentUpstream(self.pool.connect())
        self.assertEqual(request.method, b"GET")
        self.assertEqual(request.url, b"/static/app.js?v=2")
        self.assertNotIn(b"x-forwarded-prefix", request.names())

    def test_prefixIsASegment(self) -> None:
        """
        C{/apiary} does not match the prefix C{/api}: it goes to C{/}.
        """
        self.visit(b"GET /apiary HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
        self.assertEqual(self.pool.gets, [APP])


class NoRootRouteTests(ProxyTestCase):
    """
    A table without C{/}: some paths match no route.
    """

    routes = ["/api=3001,strip", "/admin=4000"]

    def test_notFound(self) -> None:
        """
        A path no route matches gets a local 404 page naming the prefixes, and no upstream is asked.
        """
        _, transport = self.visit(b"GET /other HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
        [response] = parseResponses(transport.value())
        self.assertEqual(response.status, 404)
        self.assertIn(b"/api", response.body)
        self.assertIn(b"/admin", response.body)
        self.assertEqual(response.header(b"content-length"), b"%d" % len(response.body))
        self.assertEqual(self.pool.gets, [])
        self.assertFalse(transport.disconnecting)

    def test_notFoundThenRouted(self) -> None:
        """
        After a 404 the same connection goes on serving requests that match.
        """
        visitor, transport = self.visit(b"GET /other HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
        visitor.dataReceived(b"GET /admin/x HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
        upstream = self.pool.connect()
        self.assertEqual(upstream.upstream.port, 4000)
        upstream.dataReceived(OK_HELLO)
        self.assertEqual([r.status for r in parseResponses(transport.value())], [404, 200])


class HeaderRewritingTests(ProxyTestCase):
    """
    Hop-by-hop headers stay on their hop; forwarding headers say who the visitor is.
    """

    request = (
        b"GET /page HTTP/1.1\r\n"
        b"Host: app.localhost\r\n"
        b"Connection: close, X-Secret\r\n"
        b"Keep-Alive: timeout=5\r\n"
        b"TE: trailers\r\n"
        b"Trailer: X-Checksum\r\n"
        b"Upgrade: h2c\r\n"
        b"Proxy-Authorization: Basic Zm9vOmJhcg==\r\n"
        b"X-Secret: hop\r\n"
        b"X-Forwarded-For: 1.2.3.4\r\n"
        b"X-Forwarded-Proto: http\r\n"
        b"X-Forwarded-Host: evil.example\r\n"
        b"Accept: */*\r\n"
        b"\r\n"
    )

    def test_requestHopByHop(self) -> None:
        """
        Hop-by-hop request headers, and those named in C{Connection}, are not forwarded; the others
        and C{Host} are.
        """
        self.visit(self.request)
        [request] = self.sentUpstream(self.pool.connect())
        for name in [
            b"connection",
            b"keep-alive",
            b"te",
            b"trailer",
            b"upgrade",
            b"proxy-authorization",
            b"x-secret",
        ]:
            self.assertNotIn(name, request.names())
        self.assertEqual(request.header(b"host"), b"app.localhost")
        self.assertEqual(request.header(b"accept"), b"*/*")

    def test_forwardingHeaders(self) -> None:
        """
        C{X-Forwarded-For} gets the visitor's address appended; C{X-Forwarded-Proto},
        C{X-Forwarded-Host} and C{Forwarded} are set by the proxy, replacing what the visitor sent.
        """
        self.visit(self.request)
        [request] = self.sentUpstream(self.pool.connect())
        self.assertEqual(request.header(b"x-forwarded-for"), b"1.2.3.4, 203.0.113.9")
        self.assertEqual(request.header(b"x-forwarded-proto"), b"https")
        self.assertEqual(request.header(b"x-forwarded-host"), b"app.localhost")
        self.assertEqual(
            request.header(b"forwarded"), b"for=203.0.113.9;host=app.localhost;proto=https"
        )

    def test_forwardedForFirstHop(self) -> None:
        """
        Without an C{X-Forwarded-For} from the visitor, it is just the visitor's address.
        """
        self.visit(b"GET / HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
        [request] = self.sentUpstream(self.pool.connect())
        self.assertEqual(request.header(b"x-forwarded-for"), b"203.0.113.9")

    def test_forwardedHostQuoted(self) -> None:
        """
        A C{Host} that is not a token (a port, or characters like C{;} and C{"}) is a quoted string
        in C{Forwarded}, so a visitor cannot add parameters such as a forged C{for=}.
        """
        self.visit(b'GET / HTTP/1.1\r\nHost: app.localhost:8443;for=1.2.3.4;x="y\r\n\r\n')
        [request] = self.sentUpstream(self.pool.connect())
        self.assertEqual(
            request.header(b"forwarded"),
            b'for=203.0.113.9;host="app.localhost:8443;for=1.2.3.4;x=\\"y";proto=https',
        )

    def test_responseHopByHop(self) -> None:
        """
        Hop-by-hop response headers, and those named in the upstream's C{Connection}, are not
        passed to the visitor, who gets the proxy's own C{Connection} instead.
        """
        _, transport = self.visit(self.request)
        upstream = self.pool.connect()
        upstream.dataReceived(
            b"HTTP/1.1 200 OK\r\n"
            b"Connection: keep-alive, X-Internal\r\n"
            b"Keep-Alive: timeout=5\r\n"
            b"X-Internal: 1\r\n"
            b"Proxy-Authenticate: Basic\r\n"
            b"Trailer: X-Checksum\r\n"
            b"Upgrade: h2c\r\n"
            b"X-Kept: yes\r\n"
            b"Content-Length: 2\r\n"
            b"\r\n"
            b"ok"
        )
        [response] = parseResponses(transport.value())
        for name in [b"keep-alive", b"x-internal", b"proxy-authenticate", b"trailer", b"upgrade"]:
            self.assertNotIn(name, response.names())
        self.assertEqual(response.header(b"connection"), b"close")
        self.assertEqual(response.header(b"x-kept"), b"yes")
        self.assertEqual(response.body, b"ok")


class ResponseFramingTests(ProxyTestCase):
    """
    Each response reaches the visitor with framing the visitor's HTTP version understands.
    """

    def test_contentLength(self) -> None:
        """
        A body with C{Content-Length} passes through with the same C{Content-Length}.
        """
        _, transport = self.visit(b"GET / HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
        upstream = self.pool.connect()
        upstream.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhello")
        upstream.dataReceived(b" world")
        [response] = parseResponses(transport.value())
        self.assertEqual(response.status, 200)
        self.assertEqual(response.header(b"content-length"), b"11")
        self.assertNotIn(b"transfer-encoding", response.names())
        self.assertEqual(response.body, b"hello world")
        self.assertTrue(response.complete)
        self.assertEqual(self.pool.released, [(upstream, True)])

    def test_chunked(self) -> None:
        """
        A chunked body is decoded and chunked again for an HTTP/1.1 visitor, arriving in pieces.
        """
        _, transport = self.visit(b"GET / HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
        upstream = self.pool.connect()
        data = (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        )
        for i in range(0, len(data), 7):
            upstream.dataReceived(data[i : i + 7])
        [response] = parseResponses(transport.value())
        self.assertEqual(response.values(b"transfer-encoding"), [b"chunked"])
        self.assertEqual(response.body, b"hello world")
        self.assertTrue(response.complete)
        self.assertEqual(self.pool.released, [(upstream, True)])

    def test_closeDelimitedToHTTP11(self) -> None:
        """
        An HTTP/1.0 body without length reaches an HTTP/1.1 visitor chunked; the upstream's close
        ends the exchange cleanly and the visitor's connection stays open.
        """
        _, transport = self.visit(b"GET / HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
        upstream = self.pool.connect()
        upstream.dataReceived(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nsome")
        upstream.dataReceived(b" more")
        self.assertEqual(self.requestLog(), [])
        closeUpstream(upstream)
        [response] = parseResponses(transport.value())
        self.assertEqual(response.header(b"transfer-encoding"), b"chunked")
        self.assertEqual(response.body, b"some more")
        self.assertTrue(response.complete)
        self.assertFalse(transport.disconnecting)
        self.assertEqual([e["status"] for e in self.requestLog()], [200])
        self.assertNotIn(upstream, self.pool.idle)

    def test_closeDelimitedToHTTP10(self) -> None:
        """
        An HTTP/1.0 visitor gets a body without length as it is, and its connection is closed
        once the upstream's close ends the body.
        """
        _, transport = self.visit(b"GET / HTTP/1.0\r\nHost: app.localhost\r\n\r\n")
        upstream = self.pool.connect()
        upstream.dataReceived(b"HTTP/1.0 200 OK\r\n\r\nsome")
        upstream.dataReceived(b" more")
        self.assertFalse(transport.disconnecting)
        closeUpstream(upstream)
        [response] = parseResponses(transport.value())
        self.assertEqual(response.header(b"connection"), b"close")
        self.assertNotIn(b"transfer-encoding", response.names())
        self.assertNotIn(b"content-length", response.names())
        self.assertEqual(response.body, b"some more")
        self.assertTrue(transport.disconnecting)
        self.assertEqual([e["status"] for e in self.requestLog()], [200])

    def test_chunkedToHTTP10(self) -> None:
        """
        An HTTP/1.0 visitor gets a chunked body decoded and delimited by the close of its
        connection, which follows the end of the upstream's body.
        """
        _, transport = self.visit(b"GET / HTTP/1.0\r\nHost: app.localhost\r\n\r\n")
        upstream = self.pool.connect()
        upstream.dataReceived(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        )
        start, headers, body = splitHead(transport.value())
        self.assertEqual(start, b"HTTP/1.1 200 OK")
        self.assertNotIn(b"transfer-encoding", {n.lower() for n, _ in headers})
        self.assertEqual(body, b"abc")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.pool.released, [(upstream, True)])

    def test_head(self) -> None:
        """
        The response to C{HEAD} ends after its head even though it has a C{Content-Length}, and the
        upstream connection serves the next request.
        """
        visitor, transport = self.visit(b"HEAD / HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
        upstream = self.pool.connect()
        upstream.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
        start, headers, rest = splitHead(transport.value())
        self.assertEqual(start, b"HTTP/1.1 200 OK")
        self.assertIn((b"Content-Length", b"1234"), headers)
        self.assertEqual(rest, b"")
        self.assertEqual(self.pool.released, [(upstream, True)])
        self.assertEqual([e["method"] for e in self.requestLog()], ["HEAD"])

        transport.clear()
        visitor.dataReceived(b"GET / HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
        self.assertEqual(self.pool.waiting, [])
        upstream.dataReceived(OK_HELLO)
        [response] = parseResponses(transport.value())
        self.assertEqual(response.body, b"hello")

    def test_noContent(self) -> None:
        """
        204 and 304 responses have no body, and complete at the end of their head.
        """
        upstream = None
        for status in [b"204 No Content", b"304 Not Modified"]:
            _, transport = self.visit(b"GET / HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
            upstream = upstream or self.pool.connect()
            upstream.dataReceived(b"HTTP/1.1 " + status + b"\r\nETag: x\r\n\r\n")
            start, headers, rest = splitHead(transport.value())
            self.assertEqual(start, b"HTTP/1.1 " + status)
            self.assertNotIn(b"transfer-encoding", {n.lower() for n, _ in headers})
            self.assertEqual(rest, b"")
        self.assertEqual([e["status"] for e in self.requestLog()], [204, 304])
        self.assertEqual(len(self.pool.released), 2)


class RequestBodyTests(ProxyTestCase):
    """
    Request bodies reach the upstream intact, however they arrive.
    """

    def test_contentLengthInPieces(self) -> None:
        """
        A C{Content-Length} body sent in pieces reaches the upstream whole, with its length.
        """
        visitor, _ = self.visit(
            b"POST /api/upload HTTP/1.1\r\nHost: app.localhost\r\nContent-Length: 11\r\n\r\n"
        )
        upstream = self.pool.connect()
        for piece in [b"he", b"llo ", b"world"]:
            visitor.dataReceived(piece)
        [request] = self.sentUpstream(upstream)
        self.assertEqual(request.method, b"POST")
        self.assertEqual(request.url, b"/upload")
        self.assertEqual(request.header(b"content-length"), b"11")
        self.assertEqual(request.body, b"hello world")
        self.assertTrue(request.complete)

    def test_chunked(self) -> None:
        """
        A chunked body is decoded and chunked again upstream.
        """
        visitor, _ = self.visit(
            b"POST /api/upload HTTP/1.1\r\nHost: app.localhost\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        upstream = self.pool.connect()
        [request] = self.sentUpstream(upstream)
        self.assertFalse(request.complete)
        data = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        for i in range(0, len(data), 4):
            visitor.dataReceived(data[i : i + 4])
        [request] = self.sentUpstream(upstream)
        self.assertEqual(request.values(b"transfer-encoding"), [b"chunked"])
        self.assertEqual(request.body, b"hello world")
        self.assertTrue(request.complete)

    def test_heldUntilConnected(self) -> None:
        """
        Body bytes that arrive before the upstream is connected are held and sent after the head.
        """
        visitor, _ = self.visit(
            b"POST /api/upload HTTP/1.1\r\nHost: app.localhost\r\nContent-Length: 11\r\n\r\nhello"
        )
        visitor.dataReceived(b" wor")
        upstream = self.pool.connect()
        visitor.dataReceived(b"ld")
        [request] = self.sentUpstream(upstream)
        self.assertEqual(request.body, b"hello world")
        self.assertTrue(request.complete)

    def test_chunkedHeldUntilConnected(self) -> None:
        """
        A whole chunked body received before the upstream is connected is sent after the head,
        with its last chunk.
        """
        self.visit(
            b"POST /api/upload HTTP/1.1\r\nHost: app.localhost\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        )
        [request] = self.sentUpstream(self.pool.connect())
        self.assertEqual(request.body, b"hello")
        self.assertTrue(request.complete)

    def test_pausedWhileConnecting(self) -> None:
        """
        The visitor's transport is paused while the upstream connection is made, and resumed once
        it is.
        """
        _, transport = self.visit(b"GET / HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
        self.assertEqual(transport.producerState, "paused")
        self.pool.connect()
        self.assertEqual(transport.producerState, "producing")


class KeepAliveTests(ProxyTestCase):
    """
    Visitor and upstream connections are persistent unless one side says otherwise.
    """

    def test_reuse(self) -> None:
        """
        Two requests in turn on one visitor connection use the same upstream connection, which is
        released as reusable after each.
        """
        visitor, transport = self.visit(b"GET /api/a HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
        upstream = self.pool.connect()
        upstream.dataReceived(OK_HELLO)
        self.assertEqual(self.pool.released, [(upstream, True)])
        visitor.dataReceived(b"GET /api/b HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
        self.assertEqual(self.pool.gets, [API])
        self.assertEqual(self.pool.taken, [upstream])
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual([r.url for r in self.sentUpstream(upstream)], [b"/a", b"/b"])
        upstream.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nbye")
        responses = parseResponses(transport.value())
        self.assertEqual([r.body for r in responses], [b"hello", b"bye"])
        self.assertEqual([r.header(b"connection") for r in responses], [b"keep-alive"] * 2)
        self.assertEqual(self.pool.released, [(upstream, True), (upstream, True)])
        self.assertFalse(transport.disconnecting)

    def test_visitorClose(self) -> None:
        """
        C{Connection: close} from the visitor gets C{Connection: close} back and the visitor's
        connection is closed after the response; the upstream connection is still reusable.
        """
        _, transport = self.visit(
            b"GET / HTTP/1.1\r\nHost: app.localhost\r\nConnection: close\r\n\r\n"
        )
        upstream = self.pool.connect()
        self.assertNotIn(b"connection", self.sentUpstream(upstream)[0].names())
        self.assertFalse(transport.disconnecting)
        upstream.dataReceived(OK_HELLO)
        [response] = parseResponses(transport.value())
        self.assertEqual(response.header(b"connection"), b"close")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.pool.released, [(upstream, True)])

    def test_upstreamClose(self) -> None:
        """
        An upstream that says C{Connection: close} is not reused; the next request gets a new
        connection, and the visitor's connection stays open.
        """
        visitor, transport = self.visit(b"GET / HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
        upstream = self.pool.connect()
        upstream.dataReceived(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello"
        )
        self.assertEqual(self.pool.released, [(upstream, False)])
        self.assertTrue(transportOf(upstream).disconnecting)
        [response] = parseResponses(transport.value())
        self.assertEqual(response.header(b"connection"), b"keep-alive")
        self.assertFalse(transport.disconnecting)
        visitor.dataReceived(b"GET / HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
        self.assertEqual(len(self.pool.waiting), 1)
        self.assertIsNot(self.pool.connect(), upstream)

    def test_idleUpstreamData(self) -> None:
        """
        An idle upstream connection that sends anything is closed rather than trusted later.
        """
        self.visit(b"GET / HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
        upstream = self.pool.connect()
        upstream.dataReceived(OK_HELLO)
        upstream.dataReceived(b"HTTP/1.1 200 OK\r\n")
        self.assertTrue(transportOf(upstream).disconnecting)
        upstream.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.pool.idle, [])


class PipeliningTests(ProxyTestCase):
    """
    Pipelined requests are answered one after the other, in order.
    """

    def test_inOrder(self) -> None:
        """
        Of two requests in one segment, the second is sent upstream only once the first response
        is complete, so the second upstream can never answer first and responses stay in order.
        """
        _, transport = self.visit(
            b"GET /api/first HTTP/1.1\r\nHost: app.localhost\r\n\r\n"
            b"GET /second HTTP/1.1\r\nHost: app.localhost\r\n\r\n"
        )
        self.assertEqual(self.pool.gets, [API])
        first = self.pool.connect()
        self.assertEqual(self.pool.gets, [API])
        first.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfir")
        self.assertEqual(self.pool.gets, [API])
        first.dataReceived(b"st")
        self.assertEqual(self.pool.gets, [API, APP])
        second = self.pool.connect()
        self.assertEqual([r.url for r in self.sentUpstream(second)], [b"/second"])
        second.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond")
        responses = parseResponses(transport.value())
        self.assertEqual([r.body for r in responses], [b"first", b"second"])
        self.assertEqual([e["path"] for e in self.requestLog()], ["/api/first", "/second"])

    def test_pausedWhileQueued(self) -> None:
        """
        The visitor's transport stays paused while a pipelined request waits, including while the
        upstream for it is being connected, and resumes when nothing is pending.
        """
        _, transport = self.visit(
            b"GET /api/first HTTP/1.1\r\nHost: app.localhost\r\n\r\n"
            b"GET /second HTTP/1.1\r\nHost: app.localhost\r\n\r\n"
        )
        first = self.pool.connect()
        self.assertEqual(transport.producerState, "paused")
        first.dataReceived(OK_HELLO)
        self.assertEqual(self.pool.gets, [API, APP])
        self.assertEqual(transport.producerState, "paused")
        self.pool.connect()
        self.assertEqual(transport.producerState, "producing")

    def test_pipelinedBody(self) -> None:
        """
        The body of a queued request is held and sent after its head when its turn comes.
        """
        _, transport = self.visit(
            b"GET /api/first HTTP/1.1\r\nHost: app.localhost\r\n\r\n"
            b"POST /api/second HTTP/1.1\r\nHost: app.localhost\r\nContent-Length: 4\r\n\r\nbody"
        )
        upstream = self.pool.connect()
        upstream.dataReceived(OK_HELLO)
        requests = self.sentUpstream(upstream)
        self.assertEqual(
            [(r.url, r.body) for r in requests], [(b"/first", b""), (b"/second", b"body")]
        )


class ErrorTests(ProxyTestCase):
    """
    Failures get an explanatory response where one is still possible, and stay contained.
    """

    def assertLocalResponse(self, transport: StringTransport, status: int, text: bytes) -> Message:
        """
        Check that the visitor got one local response with C{status} whose page contains C{text}.

        @return: The response.
        """
        [response] = parseResponses(transport.value())
        self.assertEqual(response.status, status)
        self.assertIn(text, response.body)
        self.assertTrue(response.complete)
        self.assertEqual(response.header(b"content-type"), b"text/html; charset=utf-8")
        return response

    def test_refused(self) -> None:
        """
        A refused upstream connection gets a 502 page naming the route and its target, and the
        visitor's connection stays usable.
        """
        visitor, transport = self.visit(b"GET /api/x HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
        self.pool.fail(ConnectionRefusedError())
        self.assertLocalResponse(transport, 502, b"Route /api -&gt; 127.0.0.1:3001")
        self.assertFalse(transport.disconnecting)
        self.assertEqual(transport.producerState, "producing")
        visitor.dataReceived(b"GET /api/y HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
        self.pool.connect().dataReceived(OK_HELLO)
        self.assertEqual([r.status for r in parseResponses(transport.value())], [502, 200])

    def test_connectTimeout(self) -> None:
        """
        A connection attempt that times out or is cancelled gets a 504 naming the route.
        """
        for error in [TimeoutError(), CancelledError()]:
            _, transport = self.visit(b"GET /api/x HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
            self.pool.fail(error)
            self.assertLocalResponse(transport, 504, b"Route /api -&gt; 127.0.0.1:3001")

    def test_failedWithBody(self) -> None:
        """
        When the upstream is unreachable before the request body was read, the visitor's
        connection is closed after the 502, since its unread body is in the way.
        """
        _, transport = self.visit(
            b"POST /api/x HTTP/1.1\r\nHost: app.localhost\r\nContent-Length: 10\r\n\r\nabc"
        )
        self.pool.fail(ConnectionRefusedError())
        response = self.assertLocalResponse(transport, 502, b"127.0.0.1:3001")
        self.assertEqual(response.header(b"connection"), b"close")
        self.assertTrue(transport.disconnecting)

    def test_responseTimeout(self) -> None:
        """
        An upstream that sends no response head within L{RESPONSE_TIMEOUT} gets the visitor a 504,
        and its connection is closed, not reused.
        """
        _, transport = self.visit(b"GET /api/x HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
        upstream = self.pool.connect()
        self.clock.advance(RESPONSE_TIMEOUT - 1)
        self.assertEqual(transport.value(), b"")
        self.clock.advance(1)
        self.assertLocalResponse(transport, 504, b"no response in")
        self.assertTrue(transportOf(upstream).disconnecting)
        upstream.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(parseResponses(transport.value())), 1)
        self.assertEqual(self.pool.idle, [])
        self.assertFalse(transport.disconnecting)

    def test_noTimeoutOnceAnswered(self) -> None:
        """
        A response head cancels the response timeout: a slow body is not cut off.
        """
        _, transport = self.visit(b"GET / HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
        upstream = self.pool.connect()
        upstream.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhe")
        self.clock.advance(RESPONSE_TIMEOUT * 2)
        upstream.dataReceived(b"llo")
        [response] = parseResponses(transport.value())
        self.assertEqual(response.body, b"hello")
        self.assertEqual(self.responseTimers(), [])

    def test_closedMidHead(self) -> None:
        """
        An upstream that closes in the middle of its response head gets the visitor a 502.
        """
        _, transport = self.visit(b"GET /api/x HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
        upstream = self.pool.connect()
        upstream.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Le")
        closeUpstream(upstream)
        self.assertLocalResponse(transport, 502, b"closed the connection")
        self.assertEqual(self.responseTimers(), [])

    def test_malformedResponse(self) -> None:
        """
        A malformed response head gets the visitor a 502 and closes the upstream connection.
        """
        _, transport = self.visit(b"GET /api/x HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
        upstream = self.pool.connect()
        upstream.dataReceived(b"SMTP ready\r\n\r\n")
        self.assertLocalResponse(transport, 502, b"malformed response")
        self.assertTrue(transportOf(upstream).disconnecting)

    def test_closedMidBody(self) -> None:
        """
        An upstream that closes in the middle of a body makes the proxy close the visitor's
        connection, so the visitor sees a truncated response rather than a complete one.
        """
        _, transport = self.visit(b"GET /api/x HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
        upstream = self.pool.connect()
        upstream.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
        closeUpstream(upstream)
        [response] = parseResponses(transport.value())
        self.assertEqual(response.body, b"hello")
        self.assertFalse(response.complete)
        self.assertTrue(transport.disconnecting)

    def test_closedMidChunkedBody(self) -> None:
        """
        An upstream that closes in the middle of a chunked body makes the proxy close the visitor's
        connection without the last chunk.
        """
        _, transport = self.visit(b"GET /api/x HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
        upstream = self.pool.connect()
        upstream.dataReceived(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
        )
        closeUpstream(upstream)
        [response] = parseResponses(transport.value())
        self.assertFalse(response.complete)
        self.assertTrue(transport.disconnecting)

    def test_malformedRequest(self) -> None:
        """
        A request the parser refuses gets a 400 with C{Connection: close}, then the connection is
        closed and a log event says why.
        """
        _, transport = self.visit(b"GARBAGE / HTTP/1.1\r\n\r\n")
        response = self.assertLocalResponse(transport, 400, b"malformed request")
        self.assertEqual(response.header(b"connection"), b"close")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.pool.gets, [])
        self.assertTrue(any("bad request" in e["log_format"] for e in self.events))

    def test_headTooLarge(self) -> None:
        """
        A request head over L{MAX_HEAD_BYTES} is refused with a 400 and a log event, and never
        reaches an upstream.
        """
        _, transport = self.visit(
            b"GET / HTTP/1.1\r\nHost: app.localhost\r\nX-Big: "
            + b"a" * MAX_HEAD_BYTES
            + b"\r\n\r\n"
        )
        self.assertLocalResponse(transport, 400, b"request head too large")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.pool.gets, [])
        [event] = [e for e in self.events if "bad request" in e["log_format"]]
        self.assertEqual(event["reason"], "malformed request: request head too large")

    def test_urlTooLarge(self) -> None:
        """
        A request target over L{MAX_HEAD_BYTES}, even in several segments, is refused with a 400.
        """
        visitor, transport = self.visit(b"GET /" + b"a" * (MAX_HEAD_BYTES // 2))
        visitor.dataReceived(b"a" * (MAX_HEAD_BYTES // 2 + 1))
        self.assertLocalResponse(transport, 400, b"request head too large")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.pool.gets, [])

    def test_malformedPipelined(self) -> None:
        """
        A malformed request behind one still being answered does not disturb that answer: it is
        completed, then the connection is closed.
        """
        visitor, transport = self.visit(
            b"GET /api/ok HTTP/1.1\r\nHost: app.localhost\r\n\r\nGARBAGE / HTTP/1.1\r\n\r\n"
        )
        visitor.dataReceived(b"GET /more HTTP/1.1\r\n\r\n")
        upstream = self.pool.connect()
        self.assertFalse(transport.disconnecting)
        upstream.dataReceived(OK_HELLO)
        [response] = parseResponses(transport.value())
        self.assertEqual(response.status, 200)
        self.assertEqual(response.body, b"hello")
        self.assertEqual(response.header(b"connection"), b"close")
        self.assertTrue(transport.disconnecting)
        self.assertEqual([e["status"] for e in self.requestLog()], [200])
        self.assertEqual(self.pool.gets, [API])

    def test_malformedBodyInFlight(self) -> None:
        """
        A malformed chunked body after its head went upstream gets a 400 and a close; the upstream
        connection is abandoned, and its late answer goes nowhere.
        """
        visitor, transport = self.visit(
            b"POST /api/x HTTP/1.1\r\nHost: app.localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        upstream = self.pool.connect()
        visitor.dataReceived(b"zz\r\n")
        self.assertLocalResponse(transport, 400, b"malformed request")
        self.assertTrue(transport.disconnecting)
        self.assertTrue(transportOf(upstream).disconnecting)
        written = transport.value()
        upstream.dataReceived(OK_HELLO)
        self.assertEqual(transport.value(), written)
        self.assertNotIn(upstream, self.pool.idle)
        self.assertEqual(self.responseTimers(), [])

    def test_nothingAfterRefusal(self) -> None:
        """
        Bytes that follow a malformed request are ignored: one 400, one log event.
        """
        visitor, transport = self.visit(b"GARBAGE / HTTP/1.1\r\n\r\n")
        visitor.dataReceived(b"GET / HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
        self.assertEqual([r.status for r in parseResponses(transport.value())], [400])
        self.assertEqual(len([e for e in self.events if "bad request" in e["log_format"]]), 1)
        self.assertEqual(self.pool.gets, [])

    def test_malformedBodyWhileConnecting(self) -> None:
        """
        A malformed body while the upstream is still connecting gets a 400; the connection made
        afterwards is handed back unused instead of getting the request.
        """
        visitor, transport = self.visit(
            b"POST /api/x HTTP/1.1\r\nHost: app.localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"zz\r\n"
        )
        self.assertLocalResponse(transport, 400, b"malformed request")
        self.assertTrue(transport.disconnecting)
        upstream = self.pool.connect()
        self.assertEqual(transportOf(upstream).value(), b"")
        self.assertEqual(self.pool.released, [(upstream, True)])

    def test_otherVisitorsUnaffected(self) -> None:
        """
        A visitor whose request fails, in any of several ways, leaves another visitor of the same
        proxy untouched.
        """
        _, bad = self.visit(b"GARBAGE\r\n\r\n")
        _, refused = self.visit(b"GET /api/x HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
        self.pool.fail(ConnectionRefusedError())
        _, good = self.visit(b"GET /api/y HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
        _, cut = self.visit(b"GET /api/z HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
        goodUpstream = self.pool.connect()
        cutUpstream = self.pool.connect()
        closeUpstream(cutUpstream)
        goodUpstream.dataReceived(OK_HELLO)
        self.assertEqual([r.status for r in parseResponses(bad.value())], [400])
        self.assertEqual([r.status for r in parseResponses(refused.value())], [502])
        self.assertEqual([r.status for r in parseResponses(cut.value())], [502])
        [response] = parseResponses(good.value())
        self.assertEqual((response.status, response.body), (200, b"hello"))
        self.assertFalse(good.disconnecting)

    def test_visitorGoneWhileConnecting(self) -> None:
        """
        When the visitor leaves before its upstream connection is made, the connection is handed
        back to the pool unused.
        """
        visitor, _ = self.visit(b"GET /api/x HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
        visitor.connectionLost(Failure(ConnectionDone()))
        upstream = self.pool.connect()
        self.assertEqual(transportOf(upstream).value(), b"")
        self.assertEqual(self.pool.released, [(upstream, True)])

    def test_visitorGoneMidExchange(self) -> None:
        """
        When the visitor leaves while its request is being answered, the upstream connection is
        closed, not reused.
        """
        visitor, _ = self.visit(b"GET /api/x HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
        upstream = self.pool.connect()
        upstream.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhel")
        visitor.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(transportOf(upstream).disconnecting)
        upstream.dataReceived(b"lo")
        closeUpstream(upstream)
        self.assertEqual(self.pool.idle, [])


class BackpressureTests(ProxyTestCase):
    """
    Once an exchange's bodies pass L{LINK_THRESHOLD}, each transport is the other's producer
    until the exchange ends; smaller exchanges are bounded anyway and stay unlinked.
    """

    def assertLinked(self, visitor: StringTransport, upstream: StringTransport) -> None:
        """
        Check that each transport is registered as the other's streaming producer.
        """
        self.assertIs(upstream.producer, visitor)
        self.assertTrue(upstream.streaming)
        self.assertIs(visitor.producer, upstream)
        self.assertTrue(visitor.streaming)

    def assertUnlinked(self, visitor: StringTransport, upstream: StringTransport) -> None:
        """
        Check that neither transport has a producer.
        """
        self.assertIsNone(upstream.producer)
        self.assertIsNone(visitor.producer)

    def test_smallUnlinked(self) -> None:
        """
        An exchange with small bodies never links the transports.
        """
        _, transport = self.visit(b"GET / HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
        upstream = self.pool.connect()
        upstream.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel")
        self.assertUnlinked(transport, transportOf(upstream))
        upstream.dataReceived(b"lo")
        self.assertUnlinked(transport, transportOf(upstream))

    def test_largeResponse(self) -> None:
        """
        A response body past the threshold links the transports until it is complete; then they
        are unlinked and both read again, and the next exchange starts unlinked.
        """
        visitor, transport = self.visit(b"GET / HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
        upstream = self.pool.connect()
        upstreamTransport = transportOf(upstream)
        size = LINK_THRESHOLD + 1
        upstream.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (size + 1))
        upstream.dataReceived(b"x" * size)
        self.assertLinked(transport, upstreamTransport)
        upstreamTransport.pauseProducing()
        upstream.dataReceived(b"x")
        self.assertUnlinked(transport, upstreamTransport)
        self.assertEqual(upstreamTransport.producerState, "producing")
        [response] = parseResponses(transport.value())
        self.assertEqual(len(response.body), size + 1)
        visitor.dataReceived(b"GET / HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
        self.assertUnlinked(transport, upstreamTransport)
        upstream.dataReceived(OK_HELLO)
        self.assertEqual(len(parseResponses(transport.value())), 2)

    def test_largeRequest(self) -> None:
        """
        A request body past the threshold links the transports too.
        """
        size = LINK_THRESHOLD + 1
        visitor, transport = self.visit(
            b"POST / HTTP/1.1\r\nHost: app.localhost\r\nContent-Length: %d\r\n\r\n" % size
        )
        upstream = self.pool.connect()
        visitor.dataReceived(b"x" * (size - 1))
        self.assertUnlinked(transport, transportOf(upstream))
        visitor.dataReceived(b"x")
        self.assertLinked(transport, transportOf(upstream))
        upstream.dataReceived(OK_HELLO)
        self.assertUnlinked(transport, transportOf(upstream))
        self.assertEqual(len(self.sentUpstream(upstream)[0].body), size)

    def test_unlinkedAfterFailure(self) -> None:
        """
        An upstream close in the middle of a large body unlinks the visitor's transport.
        """
        _, transport = self.visit(b"GET / HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
        upstream = self.pool.connect()
        upstream.dataReceived(
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (2 * LINK_THRESHOLD)
        )
        upstream.dataReceived(b"x" * (LINK_THRESHOLD + 1))
        self.assertLinked(transport, transportOf(upstream))
        closeUpstream(upstream)
        self.assertIsNone(transport.producer)
        self.assertTrue(transport.disconnecting)

    def test_unlinkedWhenVisitorLeaves(self) -> None:
        """
        A visitor leaving in the middle of a large body unlinks the upstream's transport and
        closes it.
        """
        visitor, transport = self.visit(b"GET / HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
        upstream = self.pool.connect()
        upstream.dataReceived(
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (2 * LINK_THRESHOLD)
        )
        upstream.dataReceived(b"x" * (LINK_THRESHOLD + 1))
        visitor.connectionLost(Failure(ConnectionDone()))
        self.assertIsNone(transportOf(upstream).producer)
        self.assertTrue(transportOf(upstream).disconnecting)


class UpgradeTests(ProxyTestCase):
    """
    C{Connection: Upgrade} requests answered with 101 become a raw two-way splice.
    """

    request = (
        b"GET /ws HTTP/1.1\r\nHost: app.localhost\r\nConnection: Upgrade\r\n"
        b"Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    switching = (
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
    )

    def test_forwarded(self) -> None:
        """
        The upgrade request goes upstream with C{Connection: Upgrade} and C{Upgrade: websocket},
        and bytes after it are held until the upstream agrees.
        """
        self.visit(self.request + b"early")
        upstream = self.pool.connect()
        start, headers, rest = splitHead(transportOf(upstream).value())
        self.assertEqual(start, b"GET /ws HTTP/1.1")
        self.assertIn((b"Connection", b"Upgrade"), headers)
        self.assertIn((b"Upgrade", b"websocket"), headers)
        self.assertIn((b"Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ=="), headers)
        self.assertEqual(rest, b"")

    def test_splice(self) -> None:
        """
        After a 101 the visitor gets the 101 head, then raw bytes flow both ways unchanged,
        including those that came right after the request and right after the 101 head.
        """
        visitor, transport = self.visit(self.request + b"early")
        upstream = self.pool.connect()
        upstreamTransport = transportOf(upstream)
        upstreamTransport.clear()
        upstream.dataReceived(self.switching + b"\x81\x02hi")
        start, headers, rest = splitHead(transport.value())
        self.assertEqual(start, b"HTTP/1.1 101 Switching Protocols")
        self.assertIn((b"Connection", b"Upgrade"), headers)
        self.assertIn((b"Upgrade", b"websocket"), headers)
        self.assertNotIn((b"Connection", b"keep-alive"), headers)
        self.assertEqual(rest, b"\x81\x02hi")
        self.assertEqual(upstreamTransport.value(), b"early")

        transport.clear()
        upstreamTransport.clear()
        visitor.dataReceived(b"GET / HTTP/1.1\r\n\r\n\x00\xff")
        upstream.dataReceived(b"HTTP/1.1 200 OK\r\n\r\n\xff")
        self.assertEqual(upstreamTransport.value(), b"GET / HTTP/1.1\r\n\r\n\x00\xff")
        self.assertEqual(transport.value(), b"HTTP/1.1 200 OK\r\n\r\n\xff")

    def test_spliceNotPooled(self) -> None:
        """
        The upstream connection of a splice stays linked to the visitor for backpressure and is
        never handed back to the pool; the request is logged once with status 101.
        """
        _, transport = self.visit(self.request)
        upstream = self.pool.connect()
        upstream.dataReceived(self.switching)
        self.assertEqual(self.pool.released, [])
        self.assertEqual(self.pool.idle, [])
        self.assertIs(transport.producer, transportOf(upstream))
        self.assertIs(transportOf(upstream).producer, transport)
        self.assertEqual([e["status"] for e in self.requestLog()], [101])

    def test_closeUpstream(self) -> None:
        """
        The upstream closing a splice closes the visitor's connection.
        """
        _, transport = self.visit(self.request)
        upstream = self.pool.connect()
        upstream.dataReceived(self.switching)
        closeUpstream(upstream)
        self.assertTrue(transport.disconnecting)

    def test_closeVisitor(self) -> None:
        """
        The visitor closing a splice closes the upstream connection.
        """
        visitor, _ = self.visit(self.request)
        upstream = self.pool.connect()
        upstream.dataReceived(self.switching)
        visitor.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(transportOf(upstream).disconnecting)

    def test_refused(self) -> None:
        """
        An upstream answering an upgrade with 400 gets the visitor that 400, then the visitor's
        connection is closed; the held bytes never reach the upstream.
        """
        _, transport = self.visit(self.request + b"early")
        upstream = self.pool.connect()
        upstreamTransport = transportOf(upstream)
        upstreamTransport.clear()
        upstream.dataReceived(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 3\r\n\r\nno!")
        [response] = parseResponses(transport.value())
        self.assertEqual((response.status, response.body), (400, b"no!"))
        self.assertEqual(response.header(b"connection"), b"close")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(upstreamTransport.value(), b"")


class InterimResponseTests(ProxyTestCase):
    """
    1xx responses other than 101 are passed on, and the final response follows.
    """

    def test_continue(self) -> None:
        """
        C{100 Continue} then C{200 OK} reach the visitor as two heads, and the exchange completes
        once, with one request event.
        """
        visitor, transport = self.visit(
            b"POST /api/x HTTP/1.1\r\nHost: app.localhost\r\nExpect: 100-continue\r\n"
            b"Content-Length: 4\r\n\r\n"
        )
        upstream = self.pool.connect()
        upstream.dataReceived(b"HTTP/1.1 100 Continue\r\n\r\n")
        start, headers, rest = splitHead(transport.value())
        self.assertTrue(start.startswith(b"HTTP/1.1 100 "), start)
        self.assertEqual((headers, rest), ([], b""))
        visitor.dataReceived(b"data")
        self.assertEqual(self.sentUpstream(upstream)[0].body, b"data")
        upstream.dataReceived(OK_HELLO)
        responses = parseResponses(transport.value())
        self.assertEqual([r.status for r in responses], [100, 200])
        self.assertEqual(responses[1].body, b"hello")
        self.assertEqual([e["status"] for e in self.requestLog()], [200])
        self.assertEqual(self.pool.released, [(upstream, True)])

    def test_earlyHintsInOneSegment(self) -> None:
        """
        A 103 and the final response in one segment are both passed on, in order.
        """
        _, transport = self.visit(b"GET / HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
        upstream = self.pool.connect()
        upstream.dataReceived(
            b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n" + OK_HELLO
        )
        responses = parseResponses(transport.value())
        self.assertEqual([r.status for r in responses], [103, 200])
        self.assertEqual(responses[0].header(b"link"), b"</s.css>; rel=preload")
        self.assertEqual(len(self.requestLog()), 1)


class RequestLogTests(ProxyTestCase):
    """
    Every request is reported once, as a JSON C{request} event.
    """

    def test_fields(self) -> None:
        """
        The event has the method, the path as sent, the status, the body bytes, the duration, the
        route prefix and its target, and the visitor's address the relay reported.
        """
        self.visit(b"GET /api/users?x=1 HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
        self.clock.advance(0.25)
        self.pool.connect().dataReceived(OK_HELLO)
        [event] = self.requestLog()
        self.assertEqual(
            event,
            {
                "event": "request",
                "client": "203.0.113.9",
                "method": "GET",
                "path": "/api/users?x=1",
                "status": 200,
                "bytes": 5,
                "ms": 250.0,
                "route": "/api",
                "upstream": "127.0.0.1:3001",
            },
        )

    def test_oneEach(self) -> None:
        """
        Each of several requests, whatever its outcome, is reported exactly once, in order.
        """
        visitor, _ = self.visit(b"GET /a HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
        upstream = self.pool.connect()
        upstream.dataReceived(OK_HELLO)
        visitor.dataReceived(b"HEAD /b HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
        upstream.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n")
        visitor.dataReceived(b"GET /api/c HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
        self.pool.fail(ConnectionRefusedError())
        visitor.dataReceived(b"GET /d HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
        upstream.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.assertEqual(
            [(e["method"], e["path"], e["status"]) for e in self.requestLog()],
            [("GET", "/a", 200), ("HEAD", "/b", 200), ("GET", "/api/c", 502), ("GET", "/d", 204)],
        )

    def test_noRoute(self) -> None:
        """
        A request no route matches is reported with its 404 and no route.
        """
        self.proxy.table = RouteTable([parseRoute("/api=3001")])
        self.visit(b"GET /x HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
        [event] = self.requestLog()
        self.assertEqual((event["status"], event["route"], event["upstream"]), (404, None, None))


class IdleTimeoutTests(ProxyTestCase):
    """
    Keep-alive visitor connections do not stay open forever.
    """

    def test_idleClosed(self) -> None:
        """
        A visitor connection with no request in flight is closed after C{IDLE_TIMEOUT} seconds of
        silence, with a log event.
        """
        _, transport = self.visit()
        self.clock.advance(IDLE_TIMEOUT - 1)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(transport.disconnecting)
        self.assertTrue(any("idle" in e.get("log_format", "") for e in self.events))

    def test_requestInFlightKept(self) -> None:
        """
        A long response (an event stream, a long poll) is not cut off by the idle timer, and the
        timer starts again once the response is complete.
        """
        _, transport = self.visit(b"GET /events HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
        upstream = self.pool.connect()
        upstream.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        self.clock.advance(IDLE_TIMEOUT * 3)
        self.assertFalse(transport.disconnecting)
        upstream.dataReceived(b"0\r\n\r\n")
        self.clock.advance(IDLE_TIMEOUT * 2)
        self.assertTrue(transport.disconnecting)

    def test_bytesExcludeFraming(self) -> None:
        """
        The request log counts body bytes, not chunk framing.
        """
        self.visit(b"GET / HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
        upstream = self.pool.connect()
        upstream.dataReceived(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        )
        [entry] = self.requestLog()
        self.assertEqual(entry["bytes"], 5)


class HostRewriteTests(ProxyTestCase):
    """
    A route with the C{host} option sends the target's authority as C{Host}.
    """

    routes = ["/dev=5173,host", "/=3000"]

    def test_rewritten(self) -> None:
        """
        The upstream of a C{host} route sees C{Host: 127.0.0.1:5173}; the visitor's host is still in
        C{X-Forwarded-Host}.
        """
        self.visit(b"GET /dev/x HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
        [request] = self.sentUpstream(self.pool.connect())
        self.assertEqual(request.values(b"host"), [b"127.0.0.1:5173"])
        self.assertEqual(request.header(b"x-forwarded-host"), b"app.localhost")

    def test_passedThrough(self) -> None:
        """
        Other routes pass the visitor's C{Host} through unchanged.
        """
        self.visit(b"GET /x HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
        [request] = self.sentUpstream(self.pool.connect())
        self.assertEqual(request.values(b"host"), [b"app.localhost"])


class UpstreamPoolTests(SynchronousTestCase):
    """
    L{UpstreamPool} keeps finished connections for reuse, up to L{MAX_IDLE_PER_UPSTREAM} per target.
    """

    def test_idleLimit(self) -> None:
        """
        Released connections are kept idle up to the limit; one more is closed instead, and a
        connection released as not reusable is closed too.
        """
        pool = UpstreamPool(MemoryReactorClock())
        connections = []
        for _ in range(MAX_IDLE_PER_UPSTREAM + 1):
            connection = UpstreamConnection(pool, API)
            connection.makeConnection(StringTransport())
            connections.append(connection)
        for connection in connections:
            pool.release(connection, reusable=True)
        closed = [c for c in connections if transportOf(c).disconnecting]
        self.assertEqual(closed, connections[-1:])
        spare = UpstreamConnection(pool, APP)
        spare.makeConnection(StringTransport())
        pool.release(spare, reusable=False)
        self.assertTrue(transportOf(spare).disconnecting)
        taken = [pool.takeIdle(API) for _ in range(MAX_IDLE_PER_UPSTREAM)]
        self.assertEqual(set(taken), set(connections[:-1]))
        self.assertIsNone(pool.takeIdle(API))
        self.assertIsNone(pool.takeIdle(APP))
