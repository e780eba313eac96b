"""
Tests for L{portal.tunnel.http2}: routed HTTP for visitors whose TLS handshake negotiated C{h2},
entirely in memory.

The visitor is an HTTP/2 client state machine from the C{h2} library talking to a L{RoutedHTTP} on a
L{StringTransport} that says which protocol ALPN chose. Upstream connections are real
L{UpstreamConnection}s handed out by L{tests.test_httpproxy.FakePool}, as in the HTTP/1.1 tests.
"""

from __future__ import annotations

import struct
from typing import Any, cast

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    InformationalResponseReceived,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamEnded,
    StreamReset,
)
from h2.utilities import HeaderValidationFlags, validate_headers
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.base import DelayedCall
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from portal.tunnel import http2
from portal.tunnel.http2 import (
    H2Server,
    MalformedRequest,
    RequestHead,
    RoutedHTTP,
    readRequestHead,
)
from portal.tunnel.httpproxy import IDLE_TIMEOUT, LINK_THRESHOLD, RESPONSE_TIMEOUT, VisitorHTTP
from portal.wire import h2server
from tests.test_httpproxy import (
    API,
    APP,
    HEADER,
    OK_HELLO,
    ProxyTestCase,
    parseResponses,
    transportOf,
)

#: The visitor's C{:authority}.
AUTHORITY = b"app.localhost"


class NegotiatedTransport(StringTransport):
    """
    A L{StringTransport} that says which application protocol the TLS handshake negotiated (ALPN), as
    L{twisted.protocols.tls.TLSMemoryBIOProtocol} does.

    @ivar negotiatedProtocol: C{b"h2"}, C{b"http/1.1"}, or L{None} when ALPN chose nothing.
    """

    def __init__(self, negotiatedProtocol: bytes | None) -> None:
        super().__init__()
        self.negotiatedProtocol = negotiatedProtocol


class Response:
    """
    One HTTP/2 response as the client received it.

    @ivar headers: The response headers, pseudo-headers included, in order.
    @ivar body: The body received so far.
    @ivar ended: Whether the server ended the stream.
    @ivar reset: The error code of a C{RST_STREAM} from the server, or L{None}.
    @ivar unacknowledged: Flow-controlled bytes received and not yet given back with
        C{WINDOW_UPDATE}.
    """

    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = b""
        self.ended = False
        self.reset: int | None = None
        self.unacknowledged = 0

    @property
    def status(self) -> int:
        """
        The C{:status}, or 0 before the headers arrived.
        """
        value = self.header(b":status")
        return int(value) if value is not None else 0

    def header(self, name: bytes) -> bytes | None:
        """
        @param name: A lowercase header name.
        @return: The only value of that header, or L{None}; fails if it appears twice.
        """
        values = [v for n, v in self.headers if n == name]
        assert len(values) <= 1, f"{name!r} appears {len(values)} times"
        return values[0] if values else None


class H2Client:
    """
    An HTTP/2 client (the C{h2} library's state machine) connected to a L{RoutedHTTP} through a
    L{NegotiatedTransport}, with the proxy's clock running the calls due as the client flushes.

    @ivar conn: The client's C{h2} connection.
    @ivar events: Every event the client saw, in order.
    @ivar responses: The responses by stream ID.
    """

    def __init__(
        self, server: RoutedHTTP, transport: NegotiatedTransport, clock: MemoryReactorClock
    ) -> None:
        self._server = server
        self._transport = transport
        self._clock = clock
        self.conn = H2Connection(config=H2Configuration(client_side=True, header_encoding=None))
        self.conn.initiate_connection()
        self.events: list[Event] = []
        self.responses: dict[int, Response] = {}

    def request(
        self,
        method: bytes,
        path: bytes,
        headers: list[tuple[bytes, bytes]] | None = None,
        body: bytes = b"",
    ) -> int:
        """
        Send a request on a new stream (not yet flushed).

        @return: The stream ID.
        """
        streamID = self.openStream(method, path, headers, end=not body)
        if body:
            self.conn.send_data(streamID, body, end_stream=True)
        return streamID

    def openStream(
        self,
        method: bytes,
        path: bytes,
        headers: list[tuple[bytes, bytes]] | None = None,
        end: bool = False,
    ) -> int:
        """
        Send a request's headers on a new stream (not yet flushed), ending the stream with them
        only if C{end}.

        @return: The stream ID.
        """
        streamID: int = self.conn.get_next_available_stream_id()
        self.conn.send_headers(
            streamID,
            [
                (b":method", method),
                (b":path", path),
                (b":authority", AUTHORITY),
                (b":scheme", b"https"),
                *(headers or []),
            ],
            end_stream=end,
        )
        self.responses[streamID] = Response()
        return streamID

    def _turn(self) -> bool:
        """
        Run the calls due now, as one reactor iteration does: calls they schedule wait for the next
        turn. (C{Clock.advance(0)} runs until nothing is due, which would never happen with a send
        loop that reschedules itself with C{callLater(0)} every turn, as twisted.web's does.)

        @return: Whether any call was due.
        """
        now = self._clock.seconds()
        due = [
            cast(DelayedCall, call)
            for call in self._clock.getDelayedCalls()
            if call.getTime() <= now
        ]
        for call in due:
            if call.active():
                func, args, kw = call.func, call.args, call.kw
                call.cancel()  # Takes it off the clock; it runs now.
                func(*args, **kw)
        return bool(due)

    def flush(self) -> None:
        """
        Exchange bytes and run due calls until neither side has anything more to send.
        """
        silent = 0
        for _ in range(1000):
            outgoing = self.conn.data_to_send()
            if outgoing:
                self._server.dataReceived(outgoing)
            incoming = self._transport.value()
            self._transport.clear()
            if incoming:
                self.receive(incoming)
            silent = 0 if outgoing or incoming else silent + 1
            if (not self._turn() and silent) or silent > 2:
                return
        raise AssertionError("the HTTP/2 exchange never went quiet")

    def acknowledge(self, streamID: int) -> None:
        """
        Give back the flow-control window for the body bytes of C{streamID} read so far.
        """
        response = self.responses[streamID]
        self.conn.acknowledge_received_data(response.unacknowledged, streamID)
        response.unacknowledged = 0

    def receive(self, data: bytes) -> None:
        """
        Feed the server's bytes to the client and record what they mean.
        """
        for event in self.conn.receive_data(data):
            self.events.append(event)
            if isinstance(event, ResponseReceived):
                self.responses[event.stream_id].headers += event.headers
            elif isinstance(event, DataReceived):
                self.responses[event.stream_id].body += event.data
                self.responses[event.stream_id].unacknowledged += event.flow_controlled_length
            elif isinstance(event, StreamEnded):
                self.responses[event.stream_id].ended = True
            elif isinstance(event, StreamReset):
                self.responses[event.stream_id].reset = event.error_code


class H2TestCase(ProxyTestCase):
    """
    A proxy as in L{ProxyTestCase}, visited over HTTP/2.
    """

    def connectH2(self) -> tuple[RoutedHTTP, NegotiatedTransport, H2Client]:
        """
        Connect a visitor whose handshake negotiated C{h2} and exchange the connection prefaces.

        @return: The server's protocol, its transport, and the client.
        """
        routed = RoutedHTTP(self.proxy, HEADER)
        transport = NegotiatedTransport(b"h2")
        routed.makeConnection(transport)
        client = H2Client(routed, transport, self.clock)
        client.flush()
        return routed, transport, client

    def get(self, path: bytes) -> tuple[H2Client, int]:
        """
        Connect over HTTP/2 and send C{GET path}.

        @return: The client and the request's stream ID.
        """
        _, _, client = self.connectH2()
        streamID = client.request(b"GET", path)
        client.flush()
        return client, streamID

    def assertRefusedAlone(
        self, client: H2Client, transport: NegotiatedTransport, streamID: int
    ) -> None:
        """
        The request on C{streamID} reached no upstream, its stream was reset with
        C{PROTOCOL_ERROR} and the refusal logged; the connection goes on: a next request on it is
        answered.
        """
        self.assertEqual(self.pool.gets, [])
        self.assertEqual(client.responses[streamID].reset, ErrorCodes.PROTOCOL_ERROR)
        self.assertTrue([e for e in self.events if "refused" in e["log_format"]])
        self.assertServesNext(client, transport)

    def assertServesNext(self, client: H2Client, transport: NegotiatedTransport) -> None:
        """
        The connection goes on: a next request on it is answered, and it stays open.
        """
        again = client.request(b"GET", b"/api/y")
        client.flush()
        self.pool.connect().dataReceived(OK_HELLO)
        client.flush()
        self.assertEqual(client.responses[again].body, b"hello")
        self.assertFalse(transport.disconnecting)


class DispatchTests(H2TestCase):
    """
    L{RoutedHTTP} serves HTTP/2 when ALPN chose C{h2} and HTTP/1.1 otherwise.
    """

    def test_h2(self) -> None:
        """
        With C{h2} negotiated, the client's preface is answered by an L{H2Server} with the server's
        SETTINGS, and the server is the transport's producer (backpressure).
        """
        routed, transport, client = self.connectH2()
        self.assertIsInstance(routed._inner, H2Server)
        self.assertIs(transport.producer, routed._inner)
        self.assertTrue(any(isinstance(e, RemoteSettingsChanged) for e in client.events))
        self.assertFalse(any(isinstance(e, ConnectionTerminated) for e in client.events))

    def assertHTTP11(self, transport: StringTransport) -> None:
        """
        Check that a L{RoutedHTTP} on C{transport} serves an HTTP/1.1 request through the routes.
        """
        routed = RoutedHTTP(self.proxy, HEADER)
        routed.makeConnection(transport)
        routed.dataReceived(b"GET /api/x HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
        self.assertIsInstance(routed._inner, VisitorHTTP)
        self.assertEqual(self.pool.gets, [API])
        upstream = self.pool.connect()
        [request] = self.sentUpstream(upstream)
        self.assertEqual(request.url, b"/x")
        upstream.dataReceived(OK_HELLO)
        [response] = parseResponses(transport.value())
        self.assertEqual((response.status, response.body), (200, b"hello"))

    def test_noALPN(self) -> None:
        """
        When ALPN chose nothing (the visitor offered none), the connection speaks HTTP/1.1.
        """
        self.assertHTTP11(NegotiatedTransport(None))

    def test_http11(self) -> None:
        """
        When ALPN chose C{http/1.1}, the connection speaks HTTP/1.1.
        """
        self.assertHTTP11(NegotiatedTransport(b"http/1.1"))

    def test_noTLSAttribute(self) -> None:
        """
        A transport that knows nothing of ALPN gets HTTP/1.1.
        """
        self.assertHTTP11(StringTransport())

    def test_connectionLostPassedOn(self) -> None:
        """
        The close of the visitor's connection reaches the inner protocol, which abandons the request
        in flight.
        """
        routed, transport, client = self.connectH2()
        client.request(b"GET", b"/api/x")
        client.flush()
        upstream = self.pool.connect()
        routed.connectionLost()
        self.assertTrue(transportOf(upstream).disconnecting)

    def test_connectionLostBeforeData(self) -> None:
        """
        A connection closed before any application bytes has no inner protocol and nothing to do.
        """
        routed = RoutedHTTP(self.proxy, HEADER)
        routed.makeConnection(NegotiatedTransport(b"h2"))
        routed.connectionLost()
        self.assertEqual(self.pool.gets, [])


class ExchangeTests(H2TestCase):
    """
    HTTP/2 requests are forwarded as HTTP/1.1 requests; the responses come back as HTTP/2.
    """

    def test_get(self) -> None:
        """
        A GET reaches the upstream as an HTTP/1.1 request with C{Host} from C{:authority} and the
        forwarding headers; its response reaches the client with status, headers and body, the
        stream ends, and the request is reported once.
        """
        client, streamID = self.get(b"/api/users?x=1")
        self.assertEqual(self.pool.gets, [API])
        upstream = self.pool.connect()
        [request] = self.sentUpstream(upstream)
        self.assertEqual(request.method, b"GET")
        self.assertEqual(request.url, b"/users?x=1")
        self.assertEqual(request.header(b"host"), AUTHORITY)
        self.assertEqual(request.header(b"x-forwarded-for"), b"203.0.113.9")
        self.assertEqual(request.header(b"x-forwarded-proto"), b"https")
        self.assertEqual(request.header(b"x-forwarded-host"), AUTHORITY)
        self.assertEqual(request.header(b"x-forwarded-prefix"), b"/api")
        self.assertEqual(
            request.header(b"forwarded"), b"for=203.0.113.9;host=app.localhost;proto=https"
        )
        self.assertFalse({n for n in request.names() if n.startswith(b":")})
        self.assertNotIn(b"content-length", request.names())
        self.assertTrue(request.complete)

        upstream.dataReceived(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\nhello"
        )
        client.flush()
        response = client.responses[streamID]
        self.assertEqual(response.status, 200)
        self.assertEqual(response.header(b"content-type"), b"text/plain")
        self.assertEqual(response.header(b"content-length"), b"5")
        self.assertEqual(response.body, b"hello")
        self.assertTrue(response.ended)
        self.assertIsNone(response.reset)
        self.assertEqual(self.pool.released, [(upstream, True)])
        [event] = self.requestLog()
        self.assertEqual(
            {k: event[k] for k in ("method", "path", "status", "bytes", "route", "upstream")},
            {
                "method": "GET",
                "path": "/api/users?x=1",
                "status": 200,
                "bytes": 5,
                "route": "/api",
                "upstream": "127.0.0.1:3001",
            },
        )

    def test_chunkedResponse(self) -> None:
        """
        A chunked upstream body without length streams to the client as it arrives, without chunk
        framing, and the stream ends with the last chunk.
        """
        client, streamID = self.get(b"/page")
        upstream = self.pool.connect()
        upstream.dataReceived(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
        )
        client.flush()
        response = client.responses[streamID]
        self.assertEqual(response.status, 200)
        self.assertIsNone(response.header(b"transfer-encoding"))
        self.assertIsNone(response.header(b"content-length"))
        self.assertEqual(response.body, b"hello")
        self.assertFalse(response.ended)
        upstream.dataReceived(b"6\r\n world\r\n0\r\n\r\n")
        client.flush()
        self.assertEqual(response.body, b"hello world")
        self.assertTrue(response.ended)
        self.assertEqual(self.pool.released, [(upstream, True)])
        self.assertEqual(self.requestLog()[0]["bytes"], 11)

    def test_closeDelimitedResponse(self) -> None:
        """
        A body that ends when the upstream closes ends the stream cleanly when it does.
        """
        client, streamID = self.get(b"/page")
        upstream = self.pool.connect()
        upstream.dataReceived(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nsome")
        client.flush()
        self.assertFalse(client.responses[streamID].ended)
        transportOf(upstream).loseConnection()
        upstream.connectionLost()
        client.flush()
        response = client.responses[streamID]
        self.assertEqual(response.body, b"some")
        self.assertTrue(response.ended)
        self.assertIsNone(response.reset)

    def test_post(self) -> None:
        """
        A POST body reaches the upstream whole, with one C{Content-Length} of its own.
        """
        _, _, client = self.connectH2()
        body = b'{"name": "x"}'
        streamID = client.request(
            b"POST",
            b"/api/items",
            [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))],
            body,
        )
        client.flush()
        upstream = self.pool.connect()
        [request] = self.sentUpstream(upstream)
        self.assertEqual(request.method, b"POST")
        self.assertEqual(request.url, b"/items")
        self.assertEqual(request.header(b"content-length"), b"%d" % len(body))
        self.assertEqual(request.header(b"content-type"), b"application/json")
        self.assertEqual(request.body, body)
        self.assertTrue(request.complete)
        upstream.dataReceived(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
        client.flush()
        self.assertEqual(client.responses[streamID].status, 201)
        self.assertTrue(client.responses[streamID].ended)

    def test_emptyPost(self) -> None:
        """
        A POST without a body says C{Content-Length: 0} upstream, so the upstream does not wait for
        one.
        """
        _, _, client = self.connectH2()
        client.request(b"POST", b"/api/ping")
        client.flush()
        [request] = self.sentUpstream(self.pool.connect())
        self.assertEqual(request.header(b"content-length"), b"0")
        self.assertEqual(request.body, b"")

    def test_head(self) -> None:
        """
        A HEAD response's length passes through and the stream ends without a body.
        """
        _, _, client = self.connectH2()
        streamID = client.request(b"HEAD", b"/file")
        client.flush()
        upstream = self.pool.connect()
        upstream.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
        client.flush()
        response = client.responses[streamID]
        self.assertEqual(response.status, 200)
        self.assertEqual(response.body, b"")
        self.assertTrue(response.ended)
        self.assertEqual(self.pool.released, [(upstream, True)])

    def test_concurrentStreams(self) -> None:
        """
        Two streams in flight use two upstream connections, and each response reaches its own
        stream whatever the order of the answers.
        """
        _, _, client = self.connectH2()
        first = client.request(b"GET", b"/api/a")
        second = client.request(b"GET", b"/b")
        client.flush()
        self.assertEqual(self.pool.gets, [API, APP])
        api, app = self.pool.connect(), self.pool.connect()
        app.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nbbb")
        client.flush()
        api.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\naaa")
        client.flush()
        self.assertEqual(client.responses[first].body, b"aaa")
        self.assertEqual(client.responses[second].body, b"bbb")
        self.assertTrue(client.responses[first].ended and client.responses[second].ended)
        self.assertEqual([e["path"] for e in self.requestLog()], ["/b", "/api/a"])

    def test_reuse(self) -> None:
        """
        A request after a finished one takes the idle upstream connection again.
        """
        _, _, client = self.connectH2()
        client.request(b"GET", b"/api/a")
        client.flush()
        upstream = self.pool.connect()
        upstream.dataReceived(OK_HELLO)
        client.flush()
        streamID = client.request(b"GET", b"/api/b")
        client.flush()
        self.assertEqual(self.pool.taken, [upstream])
        self.assertEqual([r.url for r in self.sentUpstream(upstream)], [b"/a", b"/b"])
        upstream.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nbye")
        client.flush()
        self.assertEqual(client.responses[streamID].body, b"bye")


class FlowControlTests(H2TestCase):
    """
    The client's HTTP/2 flow control paces the upstream.
    """

    def test_windowPausesUpstream(self) -> None:
        """
        A response larger than the stream's flow-control window pauses the upstream connection once
        the window is used up, and resumes it as the client opens the window again.
        """
        client, streamID = self.get(b"/big")
        upstream = self.pool.connect()
        size = LINK_THRESHOLD + 70_000
        upstream.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        upstream.dataReceived(b"x" * (size - 10))
        client.flush()
        response = client.responses[streamID]
        self.assertEqual(len(response.body), client.conn.local_settings.initial_window_size)
        self.assertEqual(transportOf(upstream).producerState, "paused")
        for _ in range(5):
            client.acknowledge(streamID)
            client.flush()
            if transportOf(upstream).producerState == "producing":
                break
        self.assertEqual(transportOf(upstream).producerState, "producing")
        upstream.dataReceived(b"y" * 10)
        for _ in range(5):
            client.acknowledge(streamID)
            client.flush()
        self.assertTrue(response.ended)
        self.assertEqual(response.body, b"x" * (size - 10) + b"y" * 10)
        self.assertEqual(self.pool.released, [(upstream, True)])
        self.assertIsNone(transportOf(upstream).producer)


class StallTests(H2TestCase):
    """
    A visitor that stops opening its window costs no CPU.
    """

    def sendLoops(self) -> list[DelayedCall]:
        """
        @return: Calls scheduled on the proxy's clock other than the idle timer (a send loop, as
            twisted.web's reschedules itself every turn while a stream waits for its window).
        """
        return [
            cast(DelayedCall, call)
            for call in self.clock.getDelayedCalls()
            if getattr(call.func, "__name__", "") != "__timedOut"
        ]

    def test_stalledStreamDoesNotSpin(self) -> None:
        """
        While a stream's window is used up with data still queued, nothing is scheduled (twisted.web
        alone reschedules its send loop every reactor turn); when the client opens the window the
        rest is sent.
        """
        client, streamID = self.get(b"/big")
        upstream = self.pool.connect()
        size = 100_000
        upstream.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        upstream.dataReceived(b"x" * size)
        client.flush()
        response = client.responses[streamID]
        self.assertEqual(len(response.body), client.conn.local_settings.initial_window_size)
        self.assertEqual(self.sendLoops(), [])
        for _ in range(5):
            client.acknowledge(streamID)
            client.flush()
        self.assertEqual(response.body, b"x" * size)
        self.assertTrue(response.ended)

    def test_moreDataKeepsStalledStreamParked(self) -> None:
        """
        Response bytes that arrive while the stream is stalled (twisted.web unblocks a stream it is
        given data for) do not start anything spinning either.
        """
        client, streamID = self.get(b"/big")
        upstream = self.pool.connect()
        upstream.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
        upstream.dataReceived(b"x" * 70_000)
        client.flush()
        upstream.dataReceived(b"y" * 30_000)
        client.flush()
        self.assertEqual(self.sendLoops(), [])
        response = client.responses[streamID]
        for _ in range(5):
            client.acknowledge(streamID)
            client.flush()
        self.assertEqual(response.body, b"x" * 70_000 + b"y" * 30_000)
        self.assertTrue(response.ended)


class UploadTests(H2TestCase):
    """
    Request bodies stream upstream as their DATA frames arrive, paced by HTTP/2 flow control.
    """

    def startUpload(
        self, headers: list[tuple[bytes, bytes]], path: bytes = b"/api/upload"
    ) -> tuple[H2Client, int]:
        """
        Open a POST stream without ending it.

        @return: The client and the stream ID.
        """
        _, _, client = self.connectH2()
        streamID = client.openStream(b"POST", path, headers)
        client.flush()
        return client, streamID

    def test_bodyStreams(self) -> None:
        """
        With C{content-length}, the upstream gets the head and each DATA frame as it comes, before
        the body ends; the length passes through.
        """
        client, streamID = self.startUpload([(b"content-length", b"10")])
        upstream = self.pool.connect()
        client.conn.send_data(streamID, b"01234")
        client.flush()
        [request] = self.sentUpstream(upstream)
        self.assertEqual(request.header(b"content-length"), b"10")
        self.assertEqual(request.body, b"01234")
        self.assertFalse(request.complete)
        client.conn.send_data(streamID, b"56789", end_stream=True)
        client.flush()
        [request] = self.sentUpstream(upstream)
        self.assertEqual(request.body, b"0123456789")
        self.assertTrue(request.complete)
        upstream.dataReceived(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
        client.flush()
        self.assertEqual(client.responses[streamID].status, 201)
        self.assertTrue(client.responses[streamID].ended)

    def test_noLengthIsChunked(self) -> None:
        """
        Without C{content-length}, the body goes upstream chunked, one chunk per DATA frame, and
        ends with the last chunk when the stream ends.
        """
        client, streamID = self.startUpload([])
        upstream = self.pool.connect()
        client.conn.send_data(streamID, b"abc")
        client.flush()
        self.assertIn(b"\r\n\r\n3\r\nabc\r\n", transportOf(upstream).value())
        client.conn.send_data(streamID, b"de", end_stream=True)
        client.flush()
        [request] = self.sentUpstream(upstream)
        self.assertEqual(request.header(b"transfer-encoding"), b"chunked")
        self.assertIsNone(request.header(b"content-length"))
        self.assertEqual(request.body, b"abcde")
        self.assertTrue(request.complete)

    def test_heldWhileConnecting(self) -> None:
        """
        Body bytes that come before the upstream is connected are held with the stream's window
        closed (so what is held is bounded by one window), and go upstream after the head once it
        connects.
        """
        # Windows of the protocol's default size, so that acknowledging what this test sends
        # gives window back (the server's own are larger).
        self.patch(h2server, "INITIAL_WINDOW", 65_535)
        self.patch(h2server, "CONNECTION_WINDOW", 65_535)
        client, streamID = self.startUpload([(b"content-length", b"%d" % 60_000)])
        for part in (b"a", b"b"):
            for _ in range(2):
                client.conn.send_data(streamID, part * 10_000)
            client.flush()
        # Without the hold, the server would have given back more than half the window by now.
        window = client.conn.local_flow_control_window(streamID)
        self.assertEqual(window, client.conn.remote_settings.initial_window_size - 40_000)
        upstream = self.pool.connect()
        client.flush()
        [request] = self.sentUpstream(upstream)
        self.assertEqual(request.body, b"a" * 20_000 + b"b" * 20_000)
        self.assertGreater(client.conn.local_flow_control_window(streamID), window)

    def test_upstreamBackpressure(self) -> None:
        """
        Once the body is past L{LINK_THRESHOLD}, an upstream that cannot take more pauses the stream:
        what the client sends then is held and its window stays closed; when the upstream drains,
        the held bytes go upstream and the window opens again.
        """
        # Windows of the protocol's default size, so that acknowledging what this test sends
        # gives window back (the server's own are larger).
        self.patch(h2server, "INITIAL_WINDOW", 65_535)
        self.patch(h2server, "CONNECTION_WINDOW", 65_535)
        size = LINK_THRESHOLD + 40_000
        client, streamID = self.startUpload([(b"content-length", b"%d" % size)])
        upstream = self.pool.connect()
        sent = 0
        while sent <= LINK_THRESHOLD:
            client.conn.send_data(streamID, b"x" * 16_000)
            sent += 16_000
            client.flush()
        transport = transportOf(upstream)
        self.assertIsNotNone(transport.producer)
        transport.producer.pauseProducing()  # The upstream's socket buffer is full.
        before = len(transport.value())
        window = client.conn.local_flow_control_window(streamID)
        client.conn.send_data(streamID, b"y" * 16_000)
        client.flush()
        self.assertEqual(len(transport.value()), before)
        self.assertEqual(client.conn.local_flow_control_window(streamID), window - 16_000)
        transport.producer.resumeProducing()
        client.flush()
        self.assertEqual(len(transport.value()), before + 16_000)
        self.assertGreater(client.conn.local_flow_control_window(streamID), window - 16_000)

    def test_earlyAnswer(self) -> None:
        """
        An upstream that answers before the body ended (here 413) gets its answer to the client;
        DATA the client still sends is discarded and the stream reset with C{NO_ERROR}, and the
        connection goes on serving other streams.
        """
        client, streamID = self.startUpload([(b"content-length", b"100000")])
        upstream = self.pool.connect()
        client.conn.send_data(streamID, b"z" * 1000)
        client.flush()
        upstream.dataReceived(
            b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 3\r\nConnection: close\r\n\r\nbig"
        )
        client.flush()
        response = client.responses[streamID]
        self.assertEqual((response.status, response.body, response.ended), (413, b"big", True))
        client.conn.send_data(streamID, b"z" * 1000)
        client.flush()
        self.assertEqual(response.reset, ErrorCodes.NO_ERROR)
        other = client.request(b"GET", b"/api/again")
        client.flush()
        self.pool.connect().dataReceived(OK_HELLO)
        client.flush()
        self.assertEqual(client.responses[other].body, b"hello")
        self.assertFalse([e for e in client.events if isinstance(e, ConnectionTerminated)])


class ErrorTests(H2TestCase):
    """
    Failures get an explanatory response where one is still possible, and stay within their stream.
    """

    def assertLocalResponse(self, response: Response, status: int, text: bytes) -> None:
        """
        Check that C{response} is a complete local page with C{status} containing C{text}.
        """
        self.assertEqual(response.status, status)
        self.assertEqual(response.header(b"content-type"), b"text/html; charset=utf-8")
        self.assertEqual(response.header(b"content-length"), b"%d" % len(response.body))
        self.assertIn(text, response.body)
        self.assertTrue(response.ended)

    def test_refused(self) -> None:
        """
        A refused upstream connection gets a 502 page naming the route and its target, and the
        HTTP/2 connection goes on serving requests.
        """
        _, transport, client = self.connectH2()
        streamID = client.request(b"GET", b"/api/x")
        client.flush()
        self.pool.fail(ConnectionRefusedError())
        client.flush()
        self.assertLocalResponse(
            client.responses[streamID], 502, b"Route /api -&gt; 127.0.0.1:3001"
        )
        self.assertEqual(self.requestLog()[0]["status"], 502)
        self.assertServesNext(client, transport)

    def test_upstreamClosedBeforeAnswer(self) -> None:
        """
        An upstream that closes before answering gets a 502.
        """
        client, streamID = self.get(b"/api/x")
        upstream = self.pool.connect()
        upstream.connectionLost()
        client.flush()
        self.assertLocalResponse(client.responses[streamID], 502, b"closed the connection")

    def test_upstreamClosedMidBody(self) -> None:
        """
        An upstream that closes in the middle of a body with a length resets the stream, not the
        connection.
        """
        _, transport, client = self.connectH2()
        streamID = client.request(b"GET", b"/api/x")
        client.flush()
        upstream = self.pool.connect()
        upstream.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
        client.flush()
        upstream.connectionLost()
        client.flush()
        response = client.responses[streamID]
        self.assertEqual(response.body, b"hello")
        self.assertFalse(response.ended)
        self.assertIsNotNone(response.reset)
        self.assertFalse(transport.disconnecting)

    def test_upstreamClosedMidChunkedBody(self) -> None:
        """
        An upstream that closes before the last chunk resets the stream: a body without length would
        otherwise look complete to the client.
        """
        client, streamID = self.get(b"/api/x")
        upstream = self.pool.connect()
        upstream.dataReceived(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
        )
        client.flush()
        upstream.connectionLost()
        client.flush()
        response = client.responses[streamID]
        self.assertEqual(response.body, b"hello")
        self.assertFalse(response.ended)
        self.assertIsNotNone(response.reset)

    def test_responseTimeout(self) -> None:
        """
        An upstream that does not answer in L{RESPONSE_TIMEOUT} seconds gets a 504, on the proxy's
        clock; the HTTP/2 connection, idle meanwhile, stays open for more requests.
        """
        _, transport, client = self.connectH2()
        streamID = client.request(b"GET", b"/api/x")
        client.flush()
        upstream = self.pool.connect()
        self.clock.advance(RESPONSE_TIMEOUT)
        client.flush()
        self.assertLocalResponse(client.responses[streamID], 504, b"no response in 60 s")
        self.assertTrue(transportOf(upstream).disconnecting)
        self.assertServesNext(client, transport)


class NoRootRouteTests(H2TestCase):
    """
    A table without C{/}: some paths match no route.
    """

    routes = ["/api=3001,strip", "/admin=4000"]

    def test_notFound(self) -> None:
        """
        A path no route matches gets a local 404 page naming the prefixes, and no upstream is asked.
        """
        client, streamID = self.get(b"/other")
        response = client.responses[streamID]
        self.assertEqual(response.status, 404)
        self.assertIn(b"/api", response.body)
        self.assertIn(b"/admin", response.body)
        self.assertEqual(response.header(b"content-length"), b"%d" % len(response.body))
        self.assertTrue(response.ended)
        self.assertEqual(self.pool.gets, [])
        self.assertEqual(self.requestLog()[0]["status"], 404)


class ResetTests(H2TestCase):
    """
    A stream the client resets gives up its upstream connection, whose state is then unknown.
    """

    def test_resetMidResponse(self) -> None:
        """
        A reset after the response started closes the upstream connection, which is not reused;
        the HTTP/2 connection stays open.
        """
        _, transport, client = self.connectH2()
        streamID = client.request(b"GET", b"/api/x")
        client.flush()
        upstream = self.pool.connect()
        upstream.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
        client.flush()
        self.assertEqual(client.responses[streamID].body, b"hello")
        client.conn.reset_stream(streamID, ErrorCodes.CANCEL)
        client.flush()
        self.assertTrue(transportOf(upstream).disconnecting)
        upstream.dataReceived(b"world")
        upstream.connectionLost()
        client.flush()
        self.assertEqual(self.pool.idle, [])
        self.assertNotIn((upstream, True), self.pool.released)
        self.assertFalse(transport.disconnecting)

    def test_resetMidResponseLinked(self) -> None:
        """
        A reset once the exchange is large enough to link producers also closes the upstream
        connection, and leaves it with no producer registered.
        """
        client, streamID = self.get(b"/api/big")
        upstream = self.pool.connect()
        size = LINK_THRESHOLD * 4
        upstream.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        upstream.dataReceived(b"x" * (LINK_THRESHOLD + 1))
        client.flush()
        self.assertIsNotNone(transportOf(upstream).producer)
        client.conn.reset_stream(streamID, ErrorCodes.CANCEL)
        client.flush()
        self.assertTrue(transportOf(upstream).disconnecting)
        self.assertIsNone(transportOf(upstream).producer)
        self.assertEqual(self.pool.released, [])

    def test_resetBeforeResponse(self) -> None:
        """
        A reset while the upstream has not answered closes the upstream connection.
        """
        _, _, client = self.connectH2()
        streamID = client.request(b"GET", b"/api/x")
        client.flush()
        upstream = self.pool.connect()
        client.conn.reset_stream(streamID, ErrorCodes.CANCEL)
        client.flush()
        self.assertTrue(transportOf(upstream).disconnecting)
        self.assertEqual(self.responseTimers(), [])

    def test_resetWhileConnecting(self) -> None:
        """
        A reset before the upstream connection is made leaves that new connection unused, idle in
        the pool.
        """
        _, _, client = self.connectH2()
        streamID = client.request(b"GET", b"/api/x")
        client.flush()
        client.conn.reset_stream(streamID, ErrorCodes.CANCEL)
        client.flush()
        upstream = self.pool.connect()
        self.assertEqual(transportOf(upstream).value(), b"")
        self.assertEqual(self.pool.idle, [upstream])

    def test_resetAfterResponse(self) -> None:
        """
        A connection whose exchange finished before the stream's end was processed is kept for
        reuse.
        """
        client, streamID = self.get(b"/api/x")
        upstream = self.pool.connect()
        upstream.dataReceived(OK_HELLO)
        client.flush()
        self.assertTrue(client.responses[streamID].ended)
        self.assertEqual(self.pool.idle, [upstream])
        self.assertFalse(transportOf(upstream).disconnecting)


class ClockTests(H2TestCase):
    """
    The HTTP/2 server runs on the proxy's reactor, not the global one, and closes idle
    connections as the HTTP/1.1 path does.
    """

    def test_sendLoopOnProxyClock(self) -> None:
        """
        Response bytes are sent when the proxy's clock runs, and nothing is left waiting on the
        global reactor.
        """
        from twisted.internet import reactor

        before = list(reactor.getDelayedCalls())
        client, streamID = self.get(b"/api/x")
        self.pool.connect().dataReceived(OK_HELLO)
        client.flush()
        self.assertEqual(client.responses[streamID].body, b"hello")
        self.assertEqual(list(reactor.getDelayedCalls()), before)

    def test_idleTimeout(self) -> None:
        """
        An HTTP/2 connection with no request in flight is closed with C{GOAWAY} after
        L{IDLE_TIMEOUT} seconds without frames.
        """
        _, transport, client = self.connectH2()
        self.clock.advance(IDLE_TIMEOUT - 1)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(1)
        client.receive(transport.value())
        [goaway] = [e for e in client.events if isinstance(e, ConnectionTerminated)]
        self.assertEqual(goaway.error_code, ErrorCodes.NO_ERROR)
        self.assertTrue(transport.disconnecting)

    def test_silentStreamKeepsConnection(self) -> None:
        """
        A response that stays silent for longer than L{IDLE_TIMEOUT} (a long poll, an event stream)
        keeps its connection; once it ends, the idle timeout applies again.
        """
        _, transport, client = self.connectH2()
        streamID = client.request(b"GET", b"/events")
        client.flush()
        upstream = self.pool.connect()
        upstream.dataReceived(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
        )
        client.flush()
        for _ in range(3):
            self.clock.advance(IDLE_TIMEOUT)
        self.assertFalse(transport.disconnecting)
        self.assertFalse(transportOf(upstream).disconnecting)
        upstream.dataReceived(b"3\r\nbye\r\n0\r\n\r\n")
        client.flush()
        self.assertEqual(client.responses[streamID].body, b"hellobye")
        self.assertTrue(client.responses[streamID].ended)
        self.clock.advance(IDLE_TIMEOUT)
        self.assertTrue(transport.disconnecting)


class CountingTransport(NegotiatedTransport):
    """
    A L{NegotiatedTransport} that counts how often its local address is asked for.

    @ivar hostAsked: The number of L{getHost} calls.
    """

    hostAsked = 0

    def getHost(self) -> Any:
        """
        Count the call and answer as L{StringTransport} does.
        """
        self.hostAsked += 1
        return super().getHost()


class FastPathTests(H2TestCase):
    """
    The common case (a small response to a request whose headers came in whole) takes no extra
    reactor turns: the request is forwarded as soon as its frames are handled, and its response
    leaves in the same turn as the upstream's answer, headers, body and end together.
    """

    def test_requestForwardedWithoutTurn(self) -> None:
        """
        A request is routed and sent upstream while the frames that carried it are handled, before
        any call on the clock runs.
        """
        routed, _, client = self.connectH2()
        client.request(b"GET", b"/api/x")
        routed.dataReceived(client.conn.data_to_send())
        self.assertEqual(self.pool.gets, [API])
        [request] = self.sentUpstream(self.pool.connect())
        self.assertEqual(request.url, b"/x")

    def test_smallResponseAtOnce(self) -> None:
        """
        A small response is written whole (headers, body, end of stream) as the upstream's answer
        arrives, with no send-loop turn in between, and the stream is forgotten.
        """
        routed, transport, client = self.connectH2()
        streamID = client.request(b"GET", b"/api/x")
        client.flush()
        self.pool.connect().dataReceived(OK_HELLO)
        client.receive(transport.value())  # No clock call has run since the answer.
        response = client.responses[streamID]
        self.assertEqual((response.status, response.body, response.ended), (200, b"hello", True))
        server: Any = routed._inner
        self.assertEqual(server.streams, {})

    def test_largeResponseInFrames(self) -> None:
        """
        A piece of a response larger than a frame goes out at once (the window allows it) in
        frames no larger than the client's maximum frame size, and the stream ends after its last
        byte.
        """
        _, transport, client = self.connectH2()
        streamID = client.request(b"GET", b"/api/x")
        client.flush()
        body = b"y" * 40_000
        self.pool.connect().dataReceived(
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        client.receive(transport.value())  # No clock call has run since the answer.
        response = client.responses[streamID]
        self.assertEqual((response.body, response.ended), (body, True))
        frames = [len(e.data) for e in client.events if isinstance(e, DataReceived) and e.data]
        self.assertEqual(sum(frames), len(body))
        self.assertLessEqual(max(frames), client.conn.max_inbound_frame_size)
        self.assertGreater(len(frames), 2)

    def test_responseAfterQueuedDataWaits(self) -> None:
        """
        Once a stream has data queued (its window ran out), later pieces queue behind it rather
        than overtaking it, and the end of the stream comes last.
        """
        _, transport, client = self.connectH2()
        client.conn.update_settings({0x4: 10})  # SETTINGS_INITIAL_WINDOW_SIZE
        streamID = client.request(b"GET", b"/api/x")
        client.flush()
        upstream = self.pool.connect()
        upstream.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 30\r\n\r\n" + b"a" * 15)
        upstream.dataReceived(b"b" * 15)
        client.flush()
        response = client.responses[streamID]
        self.assertEqual(response.body, b"a" * 10)
        self.assertFalse(response.ended)
        for _ in range(10):
            if response.ended:
                break
            client.conn.increment_flow_control_window(10, streamID)
            client.flush()
        self.assertEqual((response.body, response.ended), (b"a" * 15 + b"b" * 15, True))

    def test_hostNeverAsked(self) -> None:
        """
        The local address is never asked of the transport (twisted.web's C{Request} asked for it
        once per request).
        """
        routed = RoutedHTTP(self.proxy, HEADER)
        transport = CountingTransport(b"h2")
        routed.makeConnection(transport)
        client = H2Client(routed, transport, self.clock)
        client.flush()
        upstream = None
        for _ in range(3):
            streamID = client.request(b"GET", b"/api/x")
            client.flush()
            upstream = upstream or self.pool.connect()  # Then kept alive and reused.
            upstream.dataReceived(OK_HELLO)
            client.flush()
            self.assertTrue(client.responses[streamID].ended)
        self.assertEqual(transport.hostAsked, 0)


class SmugglingTests(H2TestCase):
    """
    A request body can never be read upstream as another request.
    """

    def test_getBodyWithoutLengthIsChunked(self) -> None:
        """
        A GET whose headers do not end the stream and that gives no C{content-length} goes upstream
        chunked, so that DATA that follows (here shaped as a second request) is its body; twisted.web
        took such a GET for one without body (C{Content-Length: 0}) and the DATA went upstream raw.
        """
        _, _, client = self.connectH2()
        streamID = client.openStream(b"GET", b"/api/x")
        client.flush()
        upstream = self.pool.connect()
        smuggled = b"GET /admin HTTP/1.1\r\nHost: app.localhost\r\n\r\n"
        client.conn.send_data(streamID, smuggled, end_stream=True)
        client.flush()
        [request] = self.sentUpstream(upstream)
        self.assertEqual(request.url, b"/x")
        self.assertEqual(request.header(b"transfer-encoding"), b"chunked")
        self.assertIsNone(request.header(b"content-length"))
        self.assertEqual(request.body, smuggled)
        self.assertTrue(request.complete)

    def test_differingLengthsRefused(self) -> None:
        """
        A request with two C{content-length} values that differ as text (C{h2} reads both as 3; it
        refuses lengths that are not numbers itself) is refused with a stream reset and a log event
        before any upstream is asked; the connection serves other requests.
        """
        _, transport, client = self.connectH2()
        streamID = client.request(
            b"POST", b"/api/x", [(b"content-length", b"3"), (b"content-length", b"03")], b"abc"
        )
        client.flush()
        self.assertFalse(client.responses[streamID].status)
        self.assertRefusedAlone(client, transport, streamID)

    def test_bodyShorterThanLength(self) -> None:
        """
        A body that ends before its C{content-length} is a stream error (RFC 9113 8.1.1): that
        stream is reset with C{PROTOCOL_ERROR} and a log event, no upstream is asked, and the
        connection serves other requests.
        """
        _, transport, client = self.connectH2()
        streamID = client.request(b"POST", b"/api/x", [(b"content-length", b"30")], b"abc")
        client.flush()
        self.assertEqual(self.pool.gets, [])
        self.assertEqual(client.responses[streamID].reset, ErrorCodes.PROTOCOL_ERROR)
        self.assertTrue(
            [e for e in self.events if e.get("what") == "less DATA than content-length"]
        )
        self.assertServesNext(client, transport)

    def test_bodyLongerThanLength(self) -> None:
        """
        A body that goes beyond its C{content-length} resets its stream with C{PROTOCOL_ERROR} at the
        first byte too many; the connection serves other requests.
        """
        _, transport, client = self.connectH2()
        streamID = client.request(b"POST", b"/api/x", [(b"content-length", b"2")], b"abc")
        client.flush()
        self.assertEqual(self.pool.gets, [])
        self.assertEqual(client.responses[streamID].reset, ErrorCodes.PROTOCOL_ERROR)
        self.assertTrue(
            [e for e in self.events if e.get("what") == "more DATA than content-length"]
        )
        self.assertServesNext(client, transport)


def goAwayFrame(code: int) -> bytes:
    """
    @return: A client's C{GOAWAY} frame with C{code}, made by hand so that the test client's own
        state machine stays open to read the responses still coming.
    """
    return struct.pack(">BHBBLLL", 0, 8, 0x7, 0, 0, 0, code)


class ClosingTests(H2TestCase):
    """
    How connections end: after the visitor's C{GOAWAY} once its streams are done, and with an abort
    L{http2.CLOSE_GRACE} seconds after the server's own C{GOAWAY} when TLS does not close.
    """

    def test_visitorGoAwayLetsStreamsFinish(self) -> None:
        """
        The visitor's C{GOAWAY} with a request in flight leaves the connection open: the response
        comes whole, then the server answers with C{GOAWAY} C{NO_ERROR} and closes, aborting the
        transport L{http2.CLOSE_GRACE} seconds later if it is still there.
        """
        routed, transport, client = self.connectH2()
        streamID = client.request(b"GET", b"/api/x")
        client.flush()
        routed.dataReceived(goAwayFrame(0))
        client.flush()
        self.assertFalse(transport.disconnecting)
        self.pool.connect().dataReceived(OK_HELLO)
        client.flush()
        self.assertEqual(client.responses[streamID].body, b"hello")
        self.assertTrue(client.responses[streamID].ended)
        [goaway] = [e for e in client.events if isinstance(e, ConnectionTerminated)]
        self.assertEqual(goaway.error_code, ErrorCodes.NO_ERROR)
        self.assertTrue(transport.disconnecting)
        self.assertFalse(transport.disconnected)
        self.clock.advance(http2.CLOSE_GRACE)
        self.assertTrue(transport.disconnected)

    def test_visitorGoAwayIdle(self) -> None:
        """
        The visitor's C{GOAWAY} with nothing in flight closes the connection at once.
        """
        routed, transport, client = self.connectH2()
        routed.dataReceived(goAwayFrame(0))
        client.flush()
        self.assertTrue(transport.disconnecting)
        # No longer the transport's producer, which TLS would wait for before its close_notify.
        self.assertIsNone(transport.producer)

    def test_protocolErrorAborts(self) -> None:
        """
        After a protocol error the server sends C{GOAWAY} and closes; a transport still there
        L{http2.CLOSE_GRACE} seconds later (TLS waiting for a close_notify the visitor never sends)
        is aborted.
        """
        routed, transport, client = self.connectH2()
        routed.dataReceived(struct.pack(">BHBBL", 0, 8, 0x6, 0, 3) + b"12345678")
        client.receive(transport.value())
        [goaway] = [e for e in client.events if isinstance(e, ConnectionTerminated)]
        self.assertEqual(goaway.error_code, ErrorCodes.PROTOCOL_ERROR)
        self.assertTrue(transport.disconnecting)
        self.assertIsNone(transport.producer)
        self.clock.advance(http2.CLOSE_GRACE - 0.1)
        self.assertFalse(transport.disconnected)
        self.clock.advance(0.1)
        self.assertTrue(transport.disconnected)
        self.assertTrue([e for e in self.events if "protocol error" in e["log_format"]])


class AbuseTests(H2TestCase):
    """
    A visitor cannot make the server spend without bound: resets are rate-limited, and what it
    provokes while reading nothing is capped.
    """

    def test_rapidReset(self) -> None:
        """
        A visitor that opens and resets streams faster than the token bucket allows (HTTP/2 Rapid
        Reset, CVE-2023-44487) gets C{GOAWAY} with C{ENHANCE_YOUR_CALM}, loses the connection,
        and a log event says why; resets within the burst are served.
        """
        self.patch(http2, "RESET_BURST", 3)
        _, transport, client = self.connectH2()
        for _ in range(3):
            streamID = client.request(b"GET", b"/api/x")
            client.conn.reset_stream(streamID, ErrorCodes.CANCEL)
        client.flush()
        self.assertFalse(transport.disconnecting)
        streamID = client.request(b"GET", b"/api/x")
        client.conn.reset_stream(streamID, ErrorCodes.CANCEL)
        client.flush()
        [goaway] = [e for e in client.events if isinstance(e, ConnectionTerminated)]
        self.assertEqual(goaway.error_code, ErrorCodes.ENHANCE_YOUR_CALM)
        self.assertTrue(transport.disconnecting)
        self.assertTrue([e for e in self.events if "too fast" in e["log_format"]])

    def test_resetsRefill(self) -> None:
        """
        The bucket refills with time: a visitor resetting at a sustainable pace keeps its
        connection.
        """
        self.patch(http2, "RESET_BURST", 2)
        _, transport, client = self.connectH2()
        for _ in range(10):
            streamID = client.request(b"GET", b"/api/x")
            client.conn.reset_stream(streamID, ErrorCodes.CANCEL)
            client.flush()
            self.clock.advance(1)
        self.assertFalse(transport.disconnecting)

    def test_pausedOutputCapped(self) -> None:
        """
        While the transport is paused (the visitor reads nothing), PINGs it keeps sending make the
        server write at most L{http2.MAX_PAUSED_OUTPUT} bytes of acknowledgements; past that the
        connection is aborted, with a log event.
        """
        routed, transport, client = self.connectH2()
        server: Any = routed._inner
        server.pauseProducing()
        for i in range(100):
            client.conn.ping(b"%08d" % i)
        routed.dataReceived(client.conn.data_to_send())
        self.assertFalse(transport.disconnecting)
        for i in range(http2.MAX_PAUSED_OUTPUT // 17):
            client.conn.ping(b"%08d" % i)
        routed.dataReceived(client.conn.data_to_send())
        self.assertTrue(transport.disconnecting)
        self.assertTrue([e for e in self.events if "reads nothing" in e["log_format"]])

    def test_bodyWaitsWhilePaused(self) -> None:
        """
        A response that comes while the transport is paused waits on its stream, and goes out when
        the transport resumes.
        """
        routed, transport, client = self.connectH2()
        streamID = client.request(b"GET", b"/api/x")
        client.flush()
        server: Any = routed._inner
        server.pauseProducing()
        self.pool.connect().dataReceived(OK_HELLO)
        client.receive(transport.value())
        transport.clear()
        response = client.responses[streamID]
        self.assertEqual((response.body, response.ended), (b"", False))
        server.resumeProducing()
        client.receive(transport.value())
        self.assertEqual((response.status, response.body, response.ended), (200, b"hello", True))


class ContinueTests(H2TestCase):
    """
    C{Expect: 100-continue} is answered at once.
    """

    def test_expectContinue(self) -> None:
        """
        A request with C{expect: 100-continue} gets an interim C{100} head before the upstream
        answers.
        """
        _, _, client = self.connectH2()
        client.openStream(
            b"POST", b"/api/x", [(b"expect", b"100-continue"), (b"content-length", b"2")]
        )
        client.flush()
        [interim] = [e for e in client.events if isinstance(e, InformationalResponseReceived)]
        self.assertEqual(dict(interim.headers)[b":status"], b"100")


#: A well-formed request head, as a client sends it.
GOOD_HEAD = [
    (b":method", b"GET"),
    (b":path", b"/a?b=c"),
    (b":scheme", b"https"),
    (b":authority", AUTHORITY),
    (b"user-agent", b"h2load nghttp2/1.52.0"),
]


#: Header names and values for property tests of L{readRequestHead}: well-formed, special and bad.
_NAMES = st.one_of(
    st.sampled_from(
        [b"host", b"te", b"connection", b":method", b":path", b"x-a", b"X-A", b"cookie"]
        + [b"content-length", b"expect", b"user-agent", b""]
    ),
    st.binary(max_size=3),
)
_VALUES = st.one_of(
    st.sampled_from([b"x", b"3", b"", b" a", b"a\r\n", b"trailers", b"100-continue", AUTHORITY]),
    st.binary(max_size=3),
)


class ReadRequestHeadTests(SynchronousTestCase):
    """
    L{readRequestHead} checks a request's HTTP/2 fields in one pass and puts them in the form they
    go upstream in.
    """

    def test_wellFormed(self) -> None:
        """
        A well-formed head gives its method and target, C{host} from C{:authority} first, the
        regular headers in order, cookies joined into one, and its length apart.
        """
        head = readRequestHead(
            [
                *GOOD_HEAD,
                (b"cookie", b"a=1"),
                (b"content-length", b"12"),
                (b"cookie", b"b=2"),
                (b"expect", b"100-continue"),
            ]
        )
        self.assertEqual((head.method, head.path, head.length), (b"GET", b"/a?b=c", 12))
        self.assertTrue(head.expectContinue)
        self.assertEqual(
            head.headers,
            [
                (b"host", AUTHORITY),
                (b"user-agent", b"h2load nghttp2/1.52.0"),
                (b"expect", b"100-continue"),
                (b"cookie", b"a=1; b=2"),
            ],
        )

    def test_hostKept(self) -> None:
        """
        A C{host} that agrees with C{:authority} is kept as it came, not doubled.
        """
        head = readRequestHead([*GOOD_HEAD, (b"host", AUTHORITY)])
        self.assertEqual([v for n, v in head.headers if n == b"host"], [AUTHORITY])

    def test_malformed(self) -> None:
        """
        Every head HTTP/2 forbids (RFC 9113 8.2, 8.3), and every one whose parts the HTTP/1.1
        request line or header block could not carry, is refused with a reason.
        """
        cases = {
            "uppercase name": [*GOOD_HEAD, (b"User-Agent", b"x")],
            "space in name": [*GOOD_HEAD, (b"x y", b"1")],
            "colon in name": [*GOOD_HEAD, (b"x:y", b"1")],
            "empty name": [*GOOD_HEAD, (b"", b"1")],
            "CR LF in value": [*GOOD_HEAD, (b"x", b"a\r\nHost: evil")],
            "NUL in value": [*GOOD_HEAD, (b"x", b"a\x00b")],
            "leading space": [*GOOD_HEAD, (b"x", b" a")],
            "trailing tab": [*GOOD_HEAD, (b"x", b"a\t")],
            "connection": [*GOOD_HEAD, (b"connection", b"close")],
            "transfer-encoding": [*GOOD_HEAD, (b"transfer-encoding", b"chunked")],
            "upgrade": [*GOOD_HEAD, (b"upgrade", b"websocket")],
            "keep-alive": [*GOOD_HEAD, (b"keep-alive", b"1")],
            "te gzip": [*GOOD_HEAD, (b"te", b"gzip")],
            "pseudo after regular": [*GOOD_HEAD, (b":path", b"/b")],
            "repeated pseudo": [(b":path", b"/b"), *GOOD_HEAD],
            "unknown pseudo": [(b":status", b"200"), *GOOD_HEAD],
            "no method": GOOD_HEAD[1:],
            "method with space": [(b":method", b"GET /x"), *GOOD_HEAD[1:]],
            "CONNECT": [(b":method", b"CONNECT"), (b":authority", AUTHORITY)],
            "no scheme": [h for h in GOOD_HEAD if h[0] != b":scheme"],
            "no path": [h for h in GOOD_HEAD if h[0] != b":path"],
            "empty path": [(b":path", b""), *[h for h in GOOD_HEAD if h[0] != b":path"]],
            "space in path": [(b":path", b"/a b"), *[h for h in GOOD_HEAD if h[0] != b":path"]],
            "no authority or host": [h for h in GOOD_HEAD if h[0] != b":authority"],
            "host differs": [*GOOD_HEAD, (b"host", b"evil.example")],
            "two hosts": [*GOOD_HEAD[:3], (b"host", b"a"), (b"host", b"a")],
            "signed length": [*GOOD_HEAD, (b"content-length", b"+3")],
            "lengths differ": [*GOOD_HEAD, (b"content-length", b"3"), (b"content-length", b"4")],
        }
        for what, fields in cases.items():
            with self.subTest(what):
                self.assertRaises(MalformedRequest, readRequestHead, fields)

    def test_checkedFieldsRemembered(self) -> None:
        """
        With a connection's set of checked fields, the well-formed regular fields of a head are
        remembered (not C{host}, C{te}, C{expect}, C{cookie} or C{content-length}, whose checks do
        more than pass, nor fields over L{http2.CHECKED_FIELD_SIZE} bytes, nor more than
        L{http2.CHECKED_FIELDS}); a remembered field still counts as a regular header, so that a
        pseudo-header after it is refused.
        """
        checked: set[tuple[bytes, bytes]] = set()
        big = (b"x-big", b"v" * http2.CHECKED_FIELD_SIZE)
        fields = [
            *GOOD_HEAD,
            (b"user-agent", b"browser/1"),
            (b"te", b"trailers"),
            (b"expect", b"100-continue"),
            (b"cookie", b"a=b"),
            (b"content-length", b"0"),
            big,
        ]
        first = readRequestHead(fields, checked)
        self.assertEqual(checked, {GOOD_HEAD[-1], (b"user-agent", b"browser/1")})
        self.assertEqual(readRequestHead(fields, checked), first)
        self.assertRaises(
            MalformedRequest,
            readRequestHead,
            [*GOOD_HEAD[:2], (b"user-agent", b"browser/1"), *GOOD_HEAD[2:4]],
            checked,
        )
        many = [(b"x-%d" % n, b"1") for n in range(2 * http2.CHECKED_FIELDS)]
        readRequestHead([*GOOD_HEAD, *many], checked)
        self.assertEqual(len(checked), http2.CHECKED_FIELDS)

    @settings(max_examples=500)
    @given(st.lists(st.lists(st.tuples(_NAMES, _VALUES), max_size=4), min_size=1, max_size=4))
    def test_checkedFieldsChangeNothing(self, extras: list[list[tuple[bytes, bytes]]]) -> None:
        """
        Heads read one after another with a connection's set of checked fields give the same heads,
        or the same refusals, as each read alone.
        """
        checked: set[tuple[bytes, bytes]] = set()
        for extra in extras:
            for fields in ([*GOOD_HEAD, *extra], [*extra, *GOOD_HEAD]):
                try:
                    alone: RequestHead | str = readRequestHead(fields)
                except MalformedRequest as e:
                    alone = str(e)
                try:
                    remembered: RequestHead | str = readRequestHead(fields, checked)
                except MalformedRequest as e:
                    remembered = str(e)
                self.assertEqual(remembered, alone)

    @settings(max_examples=2000)
    @given(st.data())
    def test_noLaxerThanH2(self, data: st.DataObject) -> None:
        """
        Whatever L{readRequestHead} accepts, C{h2}'s own request validation accepts too: heads
        built from a mostly well-formed base (pseudo-headers sometimes reordered, dropped or given
        bad values) with arbitrary fields inserted anywhere.
        """

        def pick(good: bytes, bad: list[bytes]) -> bytes:
            # Mostly the good value (hypothesis favours the first of a sample), so that most heads
            # are well-formed but for the extras.
            return data.draw(st.sampled_from([good] * 6 + bad))

        fields = [
            (b":method", pick(b"GET", [b"POST", b"CONNECT", b"G T", b""])),
            (b":path", pick(b"/a?b", [b"/", b"", b"/a b", b"*"])),
            (b":scheme", pick(b"https", [b"http", b""])),
            (b":authority", pick(AUTHORITY, [b"a.b:1", b" a", b""])),
        ]
        if data.draw(st.sampled_from([False] * 7 + [True])):
            fields = data.draw(st.permutations(fields))
        fields = [f for f in fields if data.draw(st.sampled_from([True] * 15 + [False]))]
        names = st.one_of(
            st.sampled_from(
                [b"host", b"te", b"connection", b":method", b":path", b":status", b":protocol"]
                + [b"keep-alive", b"content-length", b"cookie", b"x-a", b"X-A", b"a:b", b""]
            ),
            st.binary(max_size=4),
        )
        values = st.one_of(
            st.sampled_from(
                [b"x", b"GET", b"/", AUTHORITY, b"trailers", b"3", b"", b" a", b"a\r\n"]
            ),
            st.binary(max_size=4),
        )
        for extra in data.draw(st.lists(st.tuples(names, values), max_size=2)):
            fields.insert(data.draw(st.integers(0, len(fields))), extra)
        try:
            readRequestHead(fields)
        except MalformedRequest:
            return
        flags = HeaderValidationFlags(
            is_client=False, is_trailer=False, is_response_header=False, is_push_promise=False
        )
        list(validate_headers(fields, flags))


class MalformedRequestTests(H2TestCase):
    """
    A malformed request resets its own stream, not the connection.
    """

    def test_refusedWithReset(self) -> None:
        """
        A request with CR LF in a header value is refused with a C{PROTOCOL_ERROR} reset and a log
        event, no upstream is asked, and the connection serves the next request.
        """
        _, transport, client = self.connectH2()
        client.conn.config.validate_outbound_headers = False
        client.conn.config.normalize_outbound_headers = False
        streamID = client.request(b"GET", b"/api/x", [(b"x-a", b"1\r\nHost: evil")])
        client.flush()
        self.assertRefusedAlone(client, transport, streamID)

    def test_refusalsSpendResetTokens(self) -> None:
        """
        Refusals are paid from the reset token bucket: a flood of malformed requests (each making
        the server reset a stream) ends with C{ENHANCE_YOUR_CALM} as a reset flood does.
        """
        self.patch(http2, "RESET_BURST", 3)
        _, transport, client = self.connectH2()
        client.conn.config.validate_outbound_headers = False
        for _ in range(4):
            client.request(b"GET", b"/api/x", [(b"te", b"gzip")])
        client.flush()
        [goaway] = [e for e in client.events if isinstance(e, ConnectionTerminated)]
        self.assertEqual(goaway.error_code, ErrorCodes.ENHANCE_YOUR_CALM)
        self.assertTrue(transport.disconnecting)


class EndStreamTests(H2TestCase):
    """
    A response whose length the upstream gave ends on its last DATA frame.
    """

    def test_endOnLastData(self) -> None:
        """
        With C{Content-Length}, the stream ends with the frame that carries the last body bytes
        (no empty DATA frame after it); a chunked body ends on an empty frame after its last chunk.
        """
        client, streamID = self.get(b"/api/x")
        upstream = self.pool.connect()
        upstream.dataReceived(OK_HELLO)
        client.flush()
        [data] = [e for e in client.events if isinstance(e, DataReceived)]
        self.assertEqual(data.data, b"hello")
        self.assertIsNotNone(data.stream_ended)
        self.assertTrue(client.responses[streamID].ended)
        streamID = client.request(b"GET", b"/api/y")
        client.flush()
        upstream.dataReceived(  # Kept alive and taken again.
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        )
        client.flush()
        frames = [e for e in client.events if isinstance(e, DataReceived)][1:]
        self.assertEqual([f.data for f in frames], [b"hello", b""])
        self.assertIsNone(frames[0].stream_ended)
        self.assertTrue(client.responses[streamID].ended)
