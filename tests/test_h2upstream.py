"""
Tests for L{portal.tunnel.h2upstream} and its use by the proxy (L{portal.tunnel.httpproxy.H2Exchange}),
entirely in memory.

The upstream is an HTTP/2 server state machine from the C{h2} library (L{H2Server}); the client is a
real L{H2UpstreamConnection} on a L{StringTransport}, and L{Link.flush} carries bytes both ways until
neither side has more to say. Visitors are those of L{tests.test_httpproxy} (HTTP/1.1) and
L{tests.test_http2} (HTTP/2).
"""

from __future__ import annotations

from typing import Any

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    DataReceived,
    RequestReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
)
from hyperframe.frame import GoAwayFrame
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from portal.gateway.routes import Upstream
from portal.tunnel.h2upstream import (
    IDLE_TIMEOUT,
    RESPONSE_TIMEOUT,
    WINDOW,
    H2UpstreamConnection,
    H2UpstreamPool,
    H2UpstreamStream,
    requestHeaders,
)
from tests.test_http2 import H2TestCase, Response
from tests.test_httpproxy import parseResponses

#: The upstream of the client-level tests.
GRPC = Upstream("127.0.0.1", 50051, False, "", http2=True)
#: A gRPC request's content type.
GRPC_TYPE = (b"content-type", b"application/grpc")


class H2Server:
    """
    An HTTP/2 server (the C{h2} library's state machine) that records what it receives.

    @ivar conn: Its C{h2} connection.
    @ivar heads: Request headers by stream id.
    @ivar bodies: Request body bytes by stream id.
    @ivar ended: Streams whose request side ended.
    @ivar resets: Error codes of C{RST_STREAM}s received, by stream id.
    @ivar acknowledge: Whether received body bytes are given back to the client's window at once.
    """

    def __init__(self) -> None:
        self.conn = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        self.conn.initiate_connection()
        self.heads: dict[int, list[tuple[bytes, bytes]]] = {}
        self.bodies: dict[int, bytes] = {}
        self.ended: set[int] = set()
        self.resets: dict[int, int] = {}
        self.acknowledge = True
        self.unacknowledged: dict[int, int] = {}

    def receive(self, data: bytes) -> None:
        """
        Feed the client's bytes and record what they mean.
        """
        for event in self.conn.receive_data(data):
            if isinstance(event, RequestReceived):
                self.heads[event.stream_id] = list(event.headers)
                self.bodies[event.stream_id] = b""
            elif isinstance(event, DataReceived):
                self.bodies[event.stream_id] += event.data
                if self.acknowledge:
                    self.conn.acknowledge_received_data(
                        event.flow_controlled_length, event.stream_id
                    )
                else:
                    held = self.unacknowledged.get(event.stream_id, 0)
                    self.unacknowledged[event.stream_id] = held + event.flow_controlled_length
            elif isinstance(event, StreamEnded):
                self.ended.add(event.stream_id)
            elif isinstance(event, StreamReset):
                self.resets[event.stream_id] = event.error_code

    def giveBack(self, streamID: int) -> None:
        """
        Give the client back the window of what C{streamID} received so far.
        """
        self.conn.acknowledge_received_data(self.unacknowledged.pop(streamID, 0), streamID)

    def respond(
        self,
        streamID: int,
        body: bytes = b"",
        trailers: list[tuple[bytes, bytes]] | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
        end: bool = True,
    ) -> None:
        """
        Answer C{streamID}: 200 with C{headers}, C{body} and C{trailers}, ended unless C{end} is
        false.
        """
        head = [(b":status", b"200"), *(headers or [])]
        self.conn.send_headers(streamID, head, end_stream=end and not body and not trailers)
        if body:
            self.conn.send_data(streamID, body, end_stream=end and not trailers)
        if trailers:
            self.conn.send_headers(streamID, trailers, end_stream=True)


class Receiver:
    """
    An L{portal.tunnel.h2upstream.IResponseReceiver} that records what it is told.
    """

    def __init__(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = b""
        self.trailers: list[tuple[bytes, bytes]] = []
        self.ended = False
        self.failure: tuple[int, str] | None = None

    def responseHead(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        """
        Record the head.
        """
        self.status, self.headers = status, headers

    def responseBody(self, data: bytes) -> None:
        """
        Record body bytes.
        """
        self.body += data

    def responseTrailers(self, trailers: list[tuple[bytes, bytes]]) -> None:
        """
        Record the trailers.
        """
        self.trailers = trailers

    def responseEnded(self) -> None:
        """
        Record the end.
        """
        self.ended = True

    def responseFailed(self, status: int, message: str) -> None:
        """
        Record the failure.
        """
        self.failure = (status, message)


class Writer:
    """
    A request body's writer, recording whether it is paused.
    """

    paused = False

    def pauseProducing(self) -> None:
        """
        Paused.
        """
        self.paused = True

    def resumeProducing(self) -> None:
        """
        Resumed.
        """
        self.paused = False


class Link:
    """
    An L{H2UpstreamConnection} on a L{StringTransport} and an L{H2Server}, carrying bytes between
    them on request.
    """

    def __init__(self, pool: H2UpstreamPool, clock: MemoryReactorClock) -> None:
        self.server = H2Server()
        self.client = H2UpstreamConnection(pool, GRPC, clock)
        self.transport = StringTransport()
        self.client.makeConnection(self.transport)

    def flush(self) -> None:
        """
        Carry bytes both ways until neither side has more.
        """
        for _ in range(1000):
            outgoing = self.transport.value()
            self.transport.clear()
            if outgoing:
                self.server.receive(outgoing)
            incoming = self.server.conn.data_to_send()
            if incoming:
                self.client.dataReceived(incoming)
            if not outgoing and not incoming:
                return
        raise AssertionError("the HTTP/2 exchange never went quiet")


class FakeH2Pool(H2UpstreamPool):
    """
    An HTTP/2 pool whose connections are L{Link}s made on request.

    @ivar links: Every link made, in order.
    """

    def __init__(self, clock: MemoryReactorClock) -> None:
        super().__init__(clock)
        self.clock = clock
        self.links: list[Link] = []
        self.asked: list[Upstream] = []

    def connection(self, upstream: Upstream) -> Deferred[H2UpstreamConnection]:
        """
        The open link, or a new one.
        """
        self.asked.append(upstream)
        for link in self.links:
            if link.client.canOpen():
                return succeed(link.client)
        link = Link(self, self.clock)
        self.links.append(link)
        link.flush()
        return succeed(link.client)


class ClientTestCase(SynchronousTestCase):
    """
    One connection to an L{H2Server}.
    """

    def setUp(self) -> None:
        """
        Connect, exchange the prefaces.
        """
        self.clock = MemoryReactorClock()
        self.pool = FakeH2Pool(self.clock)
        self.pool.connection(GRPC)
        self.link = self.pool.links[0]
        self.server = self.link.server

    def open(
        self, path: bytes = b"/pkg.Echo/Unary", headers: list[tuple[bytes, bytes]] | None = None
    ) -> tuple[H2UpstreamStream, Receiver]:
        """
        Open a stream with a request for C{path}.

        @return: The stream and its receiver.
        """
        receiver = Receiver()
        head = requestHeaders(b"POST", b"http", b"app.localhost", path, headers or [GRPC_TYPE])
        stream = self.link.client.openStream(head, receiver)
        self.link.flush()
        return stream, receiver


class RequestHeadersTests(SynchronousTestCase):
    """
    Tests for L{requestHeaders}.
    """

    def test_form(self) -> None:
        """
        Pseudo-headers come first; names are lowercased; C{host}, hop-by-hop headers and the
        visitor's C{te} are dropped; C{te: trailers} is always sent.
        """
        head = requestHeaders(
            b"POST",
            b"http",
            b"app.localhost",
            b"/pkg.Echo/Unary",
            [
                (b"Content-Type", b"application/grpc"),
                (b"Host", b"app.localhost"),
                (b"Connection", b"keep-alive"),
                (b"TE", b"gzip"),
                (b"Transfer-Encoding", b"chunked"),
                (b"Grpc-Timeout", b"1S"),
            ],
        )
        self.assertEqual(
            head,
            [
                (b":method", b"POST"),
                (b":scheme", b"http"),
                (b":authority", b"app.localhost"),
                (b":path", b"/pkg.Echo/Unary"),
                (b"content-type", b"application/grpc"),
                (b"grpc-timeout", b"1S"),
                (b"te", b"trailers"),
            ],
        )


class StreamTests(ClientTestCase):
    """
    Requests and responses on one stream.
    """

    def test_headersBodyTrailers(self) -> None:
        """
        The request's head reaches the server; the response's head (without pseudo-headers),
        body, trailers and end reach the receiver, in that order.
        """
        stream, receiver = self.open()
        stream.endBody()
        self.link.flush()
        self.assertIn((b":path", b"/pkg.Echo/Unary"), self.server.heads[1])
        self.assertIn(1, self.server.ended)
        self.server.respond(1, b"\x00\x00\x00\x00\x02hi", [(b"grpc-status", b"0")], [GRPC_TYPE])
        self.link.flush()
        self.assertEqual(receiver.status, 200)
        self.assertEqual(receiver.headers, [GRPC_TYPE])
        self.assertEqual(receiver.body, b"\x00\x00\x00\x00\x02hi")
        self.assertEqual(receiver.trailers, [(b"grpc-status", b"0")])
        self.assertTrue(receiver.ended)
        self.assertIsNone(receiver.failure)

    def test_bodyStreams(self) -> None:
        """
        Request body pieces reach the server as they are sent, before the body ends; the response
        body reaches the receiver before the response ends.
        """
        stream, receiver = self.open()
        stream.sendBody(b"one")
        self.link.flush()
        self.assertEqual(self.server.bodies[1], b"one")
        self.assertNotIn(1, self.server.ended)
        stream.sendBody(b"two")
        stream.endBody()
        self.link.flush()
        self.assertEqual(self.server.bodies[1], b"onetwo")
        self.assertIn(1, self.server.ended)
        self.server.respond(1, b"partial", end=False)
        self.link.flush()
        self.assertEqual(receiver.body, b"partial")
        self.assertFalse(receiver.ended)

    def test_endOnce(self) -> None:
        """
        Ending the request body twice (the body was complete when the stream opened, and the
        visitor's parser says so again) sends C{END_STREAM} once: the stream stays open for the
        response.
        """
        stream, receiver = self.open()
        stream.endBody()
        stream.endBody()
        self.link.flush()
        self.assertIn(1, self.server.ended)
        self.assertEqual(self.server.resets, {})
        self.server.respond(1, b"ok")
        self.link.flush()
        self.assertEqual((receiver.body, receiver.ended), (b"ok", True))

    def test_concurrentStreams(self) -> None:
        """
        Streams share the connection; each gets its own response.
        """
        first, firstReceiver = self.open(b"/a")
        second, secondReceiver = self.open(b"/b")
        self.assertEqual((first.streamID, second.streamID), (1, 3))
        self.server.respond(3, b"second")
        self.server.respond(1, b"first")
        self.link.flush()
        self.assertEqual((firstReceiver.body, secondReceiver.body), (b"first", b"second"))
        self.assertEqual(self.pool.links, [self.link])

    def test_largeRequestFlowControl(self) -> None:
        """
        A request body larger than the server's window stops at the window, with its writer
        paused; each window the server gives back lets more through, and the writer resumes once
        everything went.
        """
        self.server.acknowledge = False
        stream, _ = self.open()
        writer = Writer()
        stream.writer = writer
        body = bytes(range(256)) * 1024  # 256 KiB
        stream.sendBody(body)
        stream.endBody()
        self.link.flush()
        self.assertEqual(len(self.server.bodies[1]), 65535)
        self.assertTrue(writer.paused)
        self.assertNotIn(1, self.server.ended)
        for _ in range(10):
            self.server.giveBack(1)
            self.link.flush()
        self.assertEqual(self.server.bodies[1], body)
        self.assertIn(1, self.server.ended)
        self.assertFalse(writer.paused)

    def test_largeResponseFlowControl(self) -> None:
        """
        The client gives each stream a window of L{WINDOW} bytes. While the stream is paused (the
        visitor's side is full), what it receives is not given back: the server can send one window
        and no more. Resuming gives it back.
        """
        stream, receiver = self.open()
        self.assertEqual(self.server.conn.local_flow_control_window(1), WINDOW)
        stream.pauseProducing()
        self.server.respond(1, end=False)
        for _ in range(WINDOW // 16384):
            self.server.conn.send_data(1, b"x" * 16384)
        self.link.flush()
        self.assertEqual(len(receiver.body), WINDOW)
        self.assertEqual(self.server.conn.local_flow_control_window(1), 0)
        stream.resumeProducing()
        self.link.flush()
        self.assertEqual(self.server.conn.local_flow_control_window(1), WINDOW)

    def test_reset(self) -> None:
        """
        A stream the server resets fails with 502 naming the code, and is logged; the
        connection's other streams go on.
        """
        _, receiver = self.open(b"/a")
        _, other = self.open(b"/b")
        self.server.conn.reset_stream(1, ErrorCodes.REFUSED_STREAM)
        self.server.respond(3, b"fine")
        self.link.flush()
        self.assertEqual(receiver.failure, (502, "the upstream reset the stream (REFUSED_STREAM)"))
        self.assertEqual(other.body, b"fine")
        self.assertTrue(other.ended)
        self.assertTrue(self.link.client.canOpen())

    def test_goAway(self) -> None:
        """
        After C{GOAWAY} the streams the server did not take fail with 502, those it took finish,
        no new stream goes to the connection, and it closes once the last stream ended.
        """
        _, taken = self.open(b"/a")
        _, dropped = self.open(b"/b")
        goAway = GoAwayFrame(0, error_code=0, last_stream_id=1)
        self.link.client.dataReceived(goAway.serialize())
        self.link.flush()
        self.assertEqual(dropped.failure, (502, "the upstream refused the stream (GOAWAY)"))
        self.assertFalse(self.link.client.canOpen())
        self.assertFalse(self.link.transport.disconnecting)
        self.server.respond(1, b"done")
        self.link.flush()
        self.assertTrue(taken.ended)
        self.assertTrue(self.link.transport.disconnecting)

    def test_cancel(self) -> None:
        """
        Cancelling a stream (the visitor left) resets it with C{CANCEL}, and the receiver hears
        nothing more of it.
        """
        stream, receiver = self.open()
        stream.cancel()
        self.link.flush()
        self.assertEqual(self.server.resets, {1: ErrorCodes.CANCEL})
        self.assertFalse(receiver.ended)
        self.assertIsNone(receiver.failure)

    def test_responseTimeout(self) -> None:
        """
        No response head within L{RESPONSE_TIMEOUT}: 504, and the stream is reset.
        """
        _, receiver = self.open()
        self.clock.advance(RESPONSE_TIMEOUT - 1)
        self.assertIsNone(receiver.failure)
        self.clock.advance(1)
        self.link.flush()
        self.assertEqual(receiver.failure, (504, f"no response in {RESPONSE_TIMEOUT:.0f} s"))
        self.assertEqual(self.server.resets, {1: ErrorCodes.CANCEL})

    def test_timerStopsAtHead(self) -> None:
        """
        A response whose head came in time is not cut off later, however long its body takes.
        """
        _, receiver = self.open()
        self.server.respond(1, b"slow", end=False)
        self.link.flush()
        self.clock.advance(RESPONSE_TIMEOUT * 2)
        self.assertIsNone(receiver.failure)

    def test_connectionLost(self) -> None:
        """
        Streams open when the connection closes fail with 502, and the pool forgets it.
        """
        _, receiver = self.open()
        self.pool._connections[GRPC] = [self.link.client]
        self.link.client.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(receiver.failure, (502, "the upstream closed the connection"))
        self.assertEqual(self.pool._connections[GRPC], [])
        self.assertFalse(self.link.client.canOpen())

    def test_notHTTP2(self) -> None:
        """
        A server that answers in HTTP/1.1 fails the streams with 502 saying so at once, and the
        connection closes.
        """
        clock = MemoryReactorClock()
        client = H2UpstreamConnection(H2UpstreamPool(clock), GRPC, clock)
        transport = StringTransport()
        client.makeConnection(transport)
        receiver = Receiver()
        client.openStream(requestHeaders(b"GET", b"http", b"h", b"/", []), receiver)
        client.dataReceived(b"HT")
        self.assertIsNone(receiver.failure)
        client.dataReceived(b"TP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        assert receiver.failure is not None
        self.assertEqual(receiver.failure[0], 502)
        self.assertIn("does not speak HTTP/2", receiver.failure[1])
        self.assertTrue(transport.disconnecting)
        self.assertFalse(client.canOpen())

    def test_idleTimeout(self) -> None:
        """
        A connection without a stream for L{IDLE_TIMEOUT} seconds says C{GOAWAY} and closes; one
        with a stream is kept.
        """
        stream, _ = self.open()
        self.clock.advance(IDLE_TIMEOUT)
        self.assertFalse(self.link.transport.disconnecting)
        self.server.respond(1)
        self.link.flush()
        self.clock.advance(IDLE_TIMEOUT)
        self.assertTrue(self.link.transport.disconnecting)
        self.assertIn(b"\x07", self.link.transport.value()[3:4])  # A GOAWAY frame.


class PoolTests(SynchronousTestCase):
    """
    Tests for L{H2UpstreamPool}.
    """

    def test_oneConnectionWhileConnecting(self) -> None:
        """
        Requests that come while the connection is being made wait for it instead of opening
        more; a connection that fails to come fails them all.
        """
        clock = MemoryReactorClock()
        pool = H2UpstreamPool(clock)
        first, second = pool.connection(GRPC), pool.connection(GRPC)
        self.assertEqual(pool.opened, 1)
        results: list[Any] = []
        first.addBoth(results.append)
        second.addBoth(results.append)
        clock.advance(30)
        self.assertEqual(len(results), 2)
        self.assertTrue(all(isinstance(r, Failure) for r in results))


class ProxyTests(H2TestCase):
    """
    Visitors' requests through L{portal.tunnel.httpproxy.H2Exchange}.
    """

    routes = ["/api=h2c://127.0.0.1:3001,strip", "/=5173"]

    def setUp(self) -> None:
        """
        The proxy's HTTP/2 pool is a L{FakeH2Pool}.
        """
        super().setUp()
        self.h2pool = FakeH2Pool(self.clock)
        self.pool.http2 = self.h2pool

    def flush(self, client: Any = None) -> None:
        """
        Carry bytes between the proxy and the upstream server (and the HTTP/2 visitor).
        """
        for _ in range(5):
            for link in self.h2pool.links:
                link.flush()
            if client is not None:
                client.flush()

    def test_grpcDetected(self) -> None:
        """
        A gRPC request on a route written as a bare port goes upstream over HTTP/2; the response's
        trailers reach the HTTP/2 visitor as trailers.
        """
        _, _, client = self.connectH2()
        streamID = client.request(b"POST", b"/pkg.Echo/Unary", [GRPC_TYPE], b"\x00\x00\x00\x00\x00")
        self.flush(client)
        self.assertEqual(self.h2pool.asked, [Upstream("127.0.0.1", 5173, False, "", http2=True)])
        server = self.h2pool.links[0].server
        self.assertIn((b":path", b"/pkg.Echo/Unary"), server.heads[1])
        self.assertEqual(server.bodies[1], b"\x00\x00\x00\x00\x00")
        server.respond(1, b"\x00\x00\x00\x00\x01z", [(b"grpc-status", b"0")], [GRPC_TYPE])
        self.flush(client)
        response = client.responses[streamID]
        self.assertEqual(response.status, 200)
        self.assertEqual(response.body, b"\x00\x00\x00\x00\x01z")
        self.assertTrue(response.ended)
        [trailers] = [e for e in client.events if isinstance(e, TrailersReceived)]
        self.assertEqual(trailers.headers, [(b"grpc-status", b"0")])
        [logged] = self.requestLog()
        self.assertEqual(logged["status"], 200)

    def test_fullDuplex(self) -> None:
        """
        An HTTP/2 visitor's request body keeps flowing to an HTTP/2 upstream after the response
        started (a bidirectional gRPC call answers each message as it comes).
        """
        _, _, client = self.connectH2()
        streamID = client.conn.get_next_available_stream_id()
        head = [(b":method", b"POST"), (b":path", b"/pkg.Echo/Bidi")]
        head += [(b":authority", b"app.localhost"), (b":scheme", b"https"), GRPC_TYPE]
        client.conn.send_headers(streamID, head)
        client.responses[streamID] = Response()
        client.conn.send_data(streamID, b"one")
        self.flush(client)
        server = self.h2pool.links[0].server
        server.respond(1, b"eno", end=False)
        self.flush(client)
        self.assertEqual(client.responses[streamID].body, b"eno")
        client.conn.send_data(streamID, b"two", end_stream=True)
        self.flush(client)
        self.assertEqual(server.bodies[1], b"onetwo")
        self.assertIn(1, server.ended)
        server.conn.send_data(1, b"owt")
        server.conn.send_headers(1, [(b"grpc-status", b"0")], end_stream=True)
        self.flush(client)
        self.assertEqual(client.responses[streamID].body, b"enoowt")
        self.assertTrue(client.responses[streamID].ended)

    def test_trailersOnly(self) -> None:
        """
        A response that is only a head (gRPC's Trailers-Only error) reaches the HTTP/2 visitor as
        one C{HEADERS} frame ending the stream, its C{grpc-status} with it.
        """
        _, _, client = self.connectH2()
        streamID = client.request(b"POST", b"/pkg.Echo/Fail", [GRPC_TYPE], b"x")
        self.flush(client)
        server = self.h2pool.links[0].server
        server.respond(1, headers=[GRPC_TYPE, (b"grpc-status", b"5")])
        self.flush(client)
        response = client.responses[streamID]
        self.assertEqual(response.header(b"grpc-status"), b"5")
        self.assertTrue(response.ended)
        kinds = [type(e) for e in client.events if getattr(e, "stream_id", None) == streamID]
        self.assertEqual(kinds, [ResponseReceived, StreamEnded])

    def test_http11VisitorTranslated(self) -> None:
        """
        An HTTP/1.1 visitor to an C{h2c://} route gets the response with a chunked body whose
        trailer section carries the trailers; its request body went up as DATA frames.
        """
        _, transport = self.visit(
            b"POST /api/x HTTP/1.1\r\nHost: app.localhost\r\nContent-Length: 4\r\n\r\nbody"
        )
        self.flush()
        server = self.h2pool.links[0].server
        self.assertIn((b":path", b"/x"), server.heads[1])
        self.assertEqual(server.bodies[1], b"body")
        self.assertIn(1, server.ended)
        server.respond(1, b"hello", [(b"grpc-status", b"0")])
        self.flush()
        raw = transport.value()
        self.assertIn(b"Transfer-Encoding: chunked", raw)
        self.assertTrue(raw.endswith(b"5\r\nhello\r\n0\r\ngrpc-status: 0\r\n\r\n"))
        [response] = parseResponses(raw)
        self.assertEqual((response.status, response.body), (200, b"hello"))

    def test_resetIs502(self) -> None:
        """
        A stream the upstream resets before answering gets the visitor a 502 page naming the route,
        and a log event.
        """
        _, transport = self.visit(b"GET /api/x HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
        self.flush()
        server = self.h2pool.links[0].server
        server.conn.reset_stream(1, ErrorCodes.INTERNAL_ERROR)
        self.flush()
        [response] = parseResponses(transport.value())
        self.assertEqual(response.status, 502)
        self.assertIn(b"reset the stream (INTERNAL_ERROR)", response.body)
        self.assertTrue(
            any("HTTP/2" in e.get("log_format", "") for e in self.events),
        )

    def test_visitorGoneCancels(self) -> None:
        """
        An HTTP/2 visitor that resets its stream cancels the upstream stream; the connection stays
        for others.
        """
        _, _, client = self.connectH2()
        streamID = client.request(b"POST", b"/pkg.Echo/Unary", [GRPC_TYPE], b"x")
        self.flush(client)
        client.conn.reset_stream(streamID, ErrorCodes.CANCEL)
        self.flush(client)
        link = self.h2pool.links[0]
        self.assertEqual(link.server.resets, {1: ErrorCodes.CANCEL})
        self.assertTrue(link.client.canOpen())
