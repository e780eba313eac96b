"""
HTTP/2 for visitors of routed HTTP mode.

When the visitor's TLS handshake negotiates C{h2} (the tunnel offers it with C{--alpn
h2,http/1.1}), the connection is served by L{H2Server}, a lean server protocol on the connection
state of L{portal.wire.h2server}, and each request (L{H2Visitor}, one per stream) is forwarded over
the same pooled HTTP/1.1 upstream connections as the HTTP/1.1 path
(L{portal.tunnel.httpproxy.UpstreamConnection}), or on a stream of an HTTP/2 upstream
(L{portal.tunnel.httpproxy.H2Exchange}), whose trailers end the visitor's stream. A request is
forwarded as soon as the frames that carried its headers are handled; its body follows frame by
frame, and the stream's flow-control window stays closed while the upstream cannot take more.
Responses stream back with HTTP/2 flow control as backpressure: what a window cannot take waits on
its stream, and the upstream is paused meanwhile.

Request heads are checked in one pass (L{readRequestHead}); a malformed one resets its own stream.
The server keeps what a visitor could abuse bounded: the connection's own limits
(L{portal.wire.h2server}: 100 concurrent streams, 64 KiB of headers, frame sizes, body lengths
against C{content-length}, flow control: request bodies held while upstreams cannot take them are
bounded by the connection's window, 1 MiB), a token bucket on stream resets, the visitor's and
those its malformed requests cause (HTTP/2 Rapid Reset, CVE-2023-44487, and its "MadeYouReset"
variant), a cap on what it writes while the visitor does not read (L{MAX_PAUSED_OUTPUT}: PING and
SETTINGS floods), and the idle timeout of the HTTP/1.1 path. There is no priority scheduling: each
stream sends what its window allows as its response arrives.

With C{--app} each request is first put to the app gateway, as on the HTTP/1.1 path
(L{portal.tunnel.httpproxy}): meanwhile its body is held with the stream's window closed, or read
whole (up to L{portal.gateway.access.MAX_BODY}) when the gateway needs it.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Iterable
from typing import Any, cast

import attrs
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionLost, TimeoutError
from twisted.internet.interfaces import IProtocol, IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from portal.forwarding.splice import IForwardingTransport, noDelay
from portal.gateway.access import MAX_BODY, Admitted
from portal.gateway.caller import GatewayResponse
from portal.tunnel.httpproxy import (
    IDLE_TIMEOUT,
    Exchange,
    ExchangeAnswers,
    H2Exchange,
    HTTPProxy,
    UpstreamConnection,
    VisitorHTTP,
    gatewayRequest,
    tooLarge,
)
from portal.tunnel.tlswrapper import closePromptly
from portal.wire import h2server
from portal.wire.attach import StreamHeader
from portal.wire.h2server import ErrorCode, ProtocolError, ServerConnection, StreamStateError
from portal.wire.httpheaders import HOP_BY_HOP

#: Bytes the server may write while its transport is paused (the visitor does not read) before it
#: gives up on the connection: control frames a visitor can provoke (PING and SETTINGS
#: acknowledgements) and response heads. Response bodies wait on their streams meanwhile.
MAX_PAUSED_OUTPUT = 64 * 1024

#: Stream resets a visitor may send in a burst, and how many more it earns per second (HTTP/2
#: Rapid Reset, CVE-2023-44487); twisted.web's values.
RESET_BURST = 1000
RESET_RATE = 33.0

#: Seconds a connection closed for idleness has to go before it is aborted.
ABORT_TIMEOUT = 15
#: Seconds a connection closed for an error or after the visitor's C{GOAWAY} has to go (its
#: C{GOAWAY} and TLS close_notify sent, its TCP connection closing) before it is aborted.
CLOSE_GRACE = 1.0

#: Response header names HTTP/2 forbids (RFC 9113 8.2.2), dropped from upstream responses.
_CONNECTION_SPECIFIC = HOP_BY_HOP - {b"proxy-authenticate", b"proxy-authorization", b"trailer"}

#: Well-formed request fields an HTTP/2 connection remembers (L{readRequestHead}), and the
#: largest (name and value) it remembers: at most 8 KiB a connection (a browser sends 10 to 20
#: regular fields, most of them short).
CHECKED_FIELDS = 32
CHECKED_FIELD_SIZE = 256

#: A request header name: a lowercase token (RFC 9110 5.1, RFC 9113 8.2.1).
_FIELD_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+")
#: A method: a token.
_METHOD = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
#: A request target: visible ASCII, which the HTTP/1.1 request line can carry.
_TARGET = re.compile(rb"[\x21-\x7e]+")
#: What a field value must not contain (NUL, CR, LF) or start or end with (RFC 9113 8.2.1).
_BAD_VALUE = re.compile(rb"[\x00\r\n]|\A[ \t]|[ \t]\Z")
#: The request pseudo-headers forwarded (C{:protocol} belongs to CONNECT, which is refused).
_PSEUDO = frozenset({b":method", b":scheme", b":authority", b":path"})
#: Header names an HTTP/2 request must not carry (RFC 9113 8.2.2).
_FORBIDDEN = frozenset(
    {b"connection", b"proxy-connection", b"keep-alive", b"transfer-encoding", b"upgrade"}
)


class MalformedRequest(Exception):
    """
    A request head HTTP/2 forbids or the proxy cannot forward; the argument says why.
    """


@attrs.frozen
class RequestHead:
    """
    A request head read from HTTP/2 fields, as it goes on upstream.

    @ivar method: The method.
    @ivar path: The request target (C{:path}).
    @ivar headers: The regular headers in order, without C{content-length}; C{host} first when it
        came as C{:authority}; C{cookie} fields joined into one at the end (RFC 9113 8.2.3).
    @ivar length: The C{content-length}, if it gave one.
    @ivar expectContinue: Whether it asked for C{100 Continue}.
    """

    method: bytes
    path: bytes
    headers: list[tuple[bytes, bytes]]
    length: int | None
    expectContinue: bool


def readRequestHead(
    fields: Iterable[tuple[bytes, bytes]], checked: set[tuple[bytes, bytes]] | None = None
) -> RequestHead:
    """
    Check a request's HTTP/2 fields in one pass, as C{h2}'s validation does (RFC 9113 8.2, 8.3),
    and more strictly where the request goes on as HTTP/1.1: names are tokens, the method is a
    token, the target visible ASCII.

    @param fields: The decoded fields, pseudo-headers included, in order.
    @param checked: Regular fields found well-formed before on the same connection, forwarded
        without their checks again (a browser repeats most of its fields, its cookies and
        C{user-agent} among them, from request to request); well-formed ones found here are added,
        up to L{CHECKED_FIELDS} fields of at most L{CHECKED_FIELD_SIZE} bytes.
    @return: The head to forward.
    @raise MalformedRequest: When the head is malformed or cannot be forwarded (CONNECT).
    """
    pseudo: dict[bytes, bytes] = {}
    headers: list[tuple[bytes, bytes]] = []
    cookies: list[bytes] = []
    lengths: list[bytes] = []
    host: bytes | None = None
    expectContinue = regular = False
    for field in fields:
        if checked is not None and field in checked:
            regular = True
            headers.append(field)
            continue
        name, value = field
        if value and _BAD_VALUE.search(value) is not None:
            raise MalformedRequest("a field value with NUL, CR, LF or surrounding whitespace")
        if name[:1] == b":":
            if regular:
                raise MalformedRequest("a pseudo-header after a regular header")
            if name not in _PSEUDO or name in pseudo:
                raise MalformedRequest("an unknown or repeated pseudo-header")
            pseudo[name] = value
            continue
        regular = True
        if _FIELD_NAME.fullmatch(name) is None:
            raise MalformedRequest("a header name that is not a lowercase token")
        if name in _FORBIDDEN:
            raise MalformedRequest("a connection-specific header")
        if name == b"content-length":
            lengths.append(value)
            continue
        if name == b"cookie":
            cookies.append(value)
            continue
        if name == b"host":
            if host is not None:
                raise MalformedRequest("two host headers")
            host = value
        elif name == b"te":
            if value.lower() != b"trailers":
                raise MalformedRequest("te other than trailers")
        elif name == b"expect":
            expectContinue = value.lower() == b"100-continue"
        elif (
            checked is not None
            and len(checked) < CHECKED_FIELDS
            and len(name) + len(value) <= CHECKED_FIELD_SIZE
        ):
            # Only fields whose checks have no effect beyond passing (not host, te or expect).
            checked.add(field)
        headers.append((name, value))
    method = pseudo.get(b":method")
    path = pseudo.get(b":path")
    authority = pseudo.get(b":authority")
    if method is None or _METHOD.fullmatch(method) is None:
        raise MalformedRequest("no :method, or one that is not a token")
    if method == b"CONNECT":
        raise MalformedRequest("CONNECT")
    if b":scheme" not in pseudo:
        raise MalformedRequest("no :scheme")
    if path is None or _TARGET.fullmatch(path) is None:
        raise MalformedRequest("no :path, or one with other than visible ASCII")
    if authority is not None:
        if host is None:
            headers.insert(0, (b"host", authority))
        elif host != authority:
            raise MalformedRequest("host and :authority differ")
    elif host is None:
        raise MalformedRequest("neither :authority nor host")
    if cookies:
        headers.append((b"cookie", b"; ".join(cookies)))
    length = None
    if lengths:
        length = _contentLength(lengths)
        if length is None:
            raise MalformedRequest("an invalid content-length")
    return RequestHead(method, path, headers, length, expectContinue)


def _responseHead(status: int, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """
    @return: A response head in HTTP/2 form: C{:status} first, names lowercased, connection-specific
        headers dropped.
    """
    head = [(b":status", b"%d" % status)]
    for name, value in headers:
        lower = name.lower()
        if lower not in _CONNECTION_SPECIFIC:
            head.append((lower, value))
    return head


def _responseLength(headers: list[tuple[bytes, bytes]]) -> int | None:
    """
    @return: The C{Content-Length} of a response head, or L{None} if it has none (or several).
    """
    found = None
    for name, value in headers:
        if name.lower() == b"content-length":
            if found is not None or not value.isdigit():
                return None
            found = int(value)
    return found


def _contentLength(values: list[bytes]) -> int | None:
    """
    @return: The request's length from its C{content-length} values, or L{None} when they are not
        all the same decimal number.
    """
    first = values[0]
    if not first.isdigit() or len(first) > 18 or any(v != first for v in values):
        return None
    return int(first)


class H2Visitor(ExchangeAnswers):
    """
    One HTTP/2 stream: a request forwarded as an L{UpstreamConnection} (or L{H2Exchange}) forwards any
    visitor's, and what that upstream sees as the visitor's transport. Response bytes written to it
    go out on the stream as far as the flow-control windows allow and wait on the stream otherwise,
    with the upstream paused (it registers as this stream's producer). Pausing it (the upstream
    cannot take more of the body) holds the body frames that come after, unacknowledged, so that
    the visitor's window for this stream closes.

    @ivar streamID: The stream's id.
    @ivar length: The request's C{content-length}, if it gave one.
    """

    framesBodies = True
    _closeAfter = False

    def __init__(
        self,
        server: H2Server,
        streamID: int,
        method: bytes,
        path: bytes,
        headers: list[tuple[bytes, bytes]],
        length: int | None,
    ) -> None:
        proxy = server.proxy
        self._server = server
        self._proxy = proxy
        self._header = server.header
        self.streamID = streamID
        self.transport = self
        self.length = length
        self._lost = False
        self._done = False
        #: Whether this side of the stream is over (ended, reset, or the connection gone).
        self._closed = False
        exchange = self._exchange = Exchange(server.header.peerHost, proxy.newCapture())
        exchange.method = method
        exchange.url = path
        exchange.headers = headers
        #: The response head, kept until the first body bytes or the end go with it.
        self._head: list[tuple[bytes, bytes]] | None = None
        self._trailers: list[tuple[bytes, bytes]] = []
        #: Body bytes still to come when the response gave its length, else L{None}.
        self._remaining: int | None = None
        #: Response bytes waiting for the flow-control window, and whether the end waits behind them.
        self._pending: deque[bytes] = deque()
        self._ending = False
        self._producer: Any = None
        self._producerPaused = False
        #: Whether body frames are held (the upstream cannot take more), and the frames held (with
        #: their flow-controlled size; L{None} for the end of the body).
        self._holding = False
        self._held: deque[tuple[bytes | None, int]] = deque()

    # The request.

    def start(self) -> None:
        """
        Route the request and forward it; its body follows as it arrives (L{bodyChunk}).
        """
        exchange = self._exchange
        if self._lost or self._closed or exchange is None:
            return
        exchange.started = self._proxy.reactor.seconds()
        if exchange.bodyDone:
            # The whole body (if any) came with the headers.
            held = exchange.held
            if held or exchange.method in (b"POST", b"PUT", b"PATCH"):
                exchange.headers.append((b"Content-Length", b"%d" % held))
        elif self.length is not None:
            exchange.headers.append((b"Content-Length", b"%d" % self.length))
        else:
            exchange.chunkedUpstream = True
        exchange.headComplete = True
        exchange.version = "2"
        refusal = self._proxy.authorize(exchange, self._header)
        if refusal is not None:
            self._respondWith(exchange, refusal)
            return
        if self._proxy.gateway is not None:
            self._admit(exchange)
            return
        self._route(exchange)

    def _admit(self, exchange: Exchange) -> None:
        """
        Ask the app gateway about the request; its body is held meanwhile (the stream's window
        closes once L{bodyChunk} holds some), or read whole first when the gateway needs it.
        """
        gateway = self._proxy.gateway
        assert gateway is not None
        request = gatewayRequest(exchange, self._header)
        if not exchange.buffering and gateway.wantsBody(request):
            if (self.length or 0) > MAX_BODY or exchange.held > MAX_BODY:
                self._respondWith(exchange, tooLarge())
                return
            exchange.buffering = True
            # Body frames that came before this may have closed the window.
            self.transport.resumeProducing()
            if not exchange.bodyDone:
                exchange.awaitingBody = True
                return
        if exchange.buffering:
            request = attrs.evolve(request, body=b"".join(exchange.body))
        gateway.decide(request, self._header.hostname).addCallback(self._decided, exchange)

    def _decided(self, decision: Admitted | GatewayResponse, exchange: Exchange) -> None:
        """
        The gateway decided: answer as it said, or forward the request as it edited it.
        """
        if self._lost or self._closed or exchange.status:
            return
        if isinstance(decision, GatewayResponse):
            self._respondWith(exchange, decision)
            return
        self._proxy.admit(exchange, decision)
        self._route(exchange)

    def _route(self, exchange: Exchange) -> None:
        """
        Route the request and forward it.
        """
        table = self._proxy.tableFor(exchange)
        match = table.match(exchange.url.decode("latin-1"))
        if match is None:
            prefixes = ", ".join(table.prefixes())
            self._respondLocally(exchange, 404, f"No route for this path. Routes: {prefixes}")
            return
        exchange.match = match
        idle = self._proxy.pool.takeIdle(match.route.upstream, exchange)
        if idle is not None:
            self._begin(idle, exchange)
            return
        d = self._proxy.pool.get(match.route.upstream, exchange)

        def connected(upstream: UpstreamConnection | H2Exchange) -> None:
            if self._lost or exchange.status:
                self._proxy.pool.release(upstream, reusable=True)
                return
            self._begin(upstream, exchange)

        def failed(failure: Failure) -> None:
            if self._lost or exchange.status:
                return
            target = match.route.upstream.authority
            timedOut = failure.check(TimeoutError, CancelledError) is not None
            status = 504 if timedOut else 502
            message = "no answer in time." if timedOut else failure.getErrorMessage()
            self._respondLocally(
                exchange, status, f"Route {match.route.prefix} -> {target}: {message}"
            )

        d.addCallbacks(connected, failed)

    def _begin(self, upstream: UpstreamConnection | H2Exchange, exchange: Exchange) -> None:
        """
        Send the request head (and any body held so far) upstream, then let the body flow.
        """
        exchange.upstream = upstream
        upstream.begin(self, exchange)
        self.transport.resumeProducing()

    def bodyChunk(self, data: bytes) -> None:
        """
        A DATA frame of the request body: forward it, or hold it (and close the stream's window)
        until the upstream is connected. Once a response started the rest of the body is dropped,
        except on an HTTP/2 upstream's stream, which is full duplex (a bidirectional gRPC call
        answers each message as it comes).
        """
        exchange = self._exchange
        if exchange is None or self._lost or exchange.bodyDone:
            return
        upstream = exchange.upstream
        if exchange.status and not (isinstance(upstream, H2Exchange) and upstream.ready):
            return
        if exchange.capture is not None:
            exchange.capture.request(data)
        if exchange.buffering:
            # Read whole for the gateway, within its limit.
            exchange.body.append(data)
            exchange.held += len(data)
            if exchange.held > MAX_BODY:
                self._respondWith(exchange, tooLarge())
            return
        if not exchange.forwardBody(data):
            self.transport.pauseProducing()

    def bodyComplete(self) -> None:
        """
        The request body ended (C{END_STREAM}): the gateway may decide now if it waited for it.
        """
        exchange = self._exchange
        if exchange is not None and not exchange.bodyDone:
            exchange.endBody()
            if exchange.awaitingBody and not exchange.status:
                exchange.awaitingBody = False
                self._admit(exchange)

    # Frames from the visitor (L{H2Server}).

    def dataFrame(self, data: bytes, flowControlled: int) -> None:
        """
        A DATA frame of the request body: forwarded and its window given back, or held unacknowledged
        while the body is paused.
        """
        if self._holding:
            self._held.append((data, flowControlled))
            return
        if data:
            self.bodyChunk(data)
        self._server.conn.acknowledgeReceivedData(flowControlled, self.streamID)

    def requestEnded(self) -> None:
        """
        C{END_STREAM} from the visitor: the body is complete (after what is held).
        """
        if self._holding:
            self._held.append((None, 0))
        else:
            self.bodyComplete()

    def reset(self, reason: Failure) -> None:
        """
        The visitor reset the stream, or the connection is gone.
        """
        self._closed = True
        self._pending.clear()
        self._releaseHeld()
        self._gone(reason)

    def _gone(self, reason: Failure) -> None:
        """
        The visitor reset the stream or closed the connection: an upstream still answering (even
        mid-body) is abandoned, its state unknown.
        """
        self._lost = True
        exchange = self._exchange
        if exchange is not None and exchange.upstream is not None and not self._done:
            exchange.upstream.abandon()

    # The response (from the upstream).

    def writeHead(
        self, exchange: Exchange, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]
    ) -> None:
        """
        Keep the response head; it goes out with the first body bytes or the end. When an HTTP/1.1
        upstream gives the body's length, C{END_STREAM} goes on its last DATA frame (a response
        from an HTTP/2 upstream may still have trailers to end with).
        """
        exchange.status = status
        self._head = _responseHead(status, headers)
        if (
            isinstance(exchange.upstream, UpstreamConnection)
            and exchange.method != b"HEAD"
            and status >= 200
            and status not in (204, 304)
        ):
            self._remaining = _responseLength(headers)

    def writeBody(self, exchange: Exchange, data: bytes, payload: int | None = None) -> None:
        """
        Stream response bytes.
        """
        exchange.sent += len(data) if payload is None else payload
        if data and not self._closed:
            remaining = self._remaining
            if remaining is not None:
                remaining = self._remaining = remaining - len(data)
                self._ending = remaining <= 0
            self._send(data)
            self._server.flush()

    def writeTrailers(self, exchange: Exchange, trailers: list[tuple[bytes, bytes]]) -> None:
        """
        End the response with C{trailers} (a C{HEADERS} frame with C{END_STREAM}) instead of an
        empty C{DATA} frame, as gRPC needs for its C{grpc-status}; a response with neither body nor
        trailers ends with its head (gRPC's "Trailers-Only").
        """
        self._trailers = [(name.lower(), value) for name, value in trailers]

    def finished(self, exchange: Exchange) -> None:
        """
        The response is complete: end the stream once what waits for the window is sent.
        """
        self._done = True
        self._proxy.logRequest(exchange)
        if self._closed or self._lost:
            return
        self._ending = True
        self._drain()
        self._server.flush()

    def upgraded(self, upstream: UpstreamConnection) -> None:
        """
        HTTP/2 has no C{Upgrade}; requests carry none (RFC 9113 8.2.2), so this cannot happen.
        """
        upstream.abandon()

    def _send(self, data: bytes) -> None:
        """
        Send response bytes (with the head before the first), or queue them behind what waits.
        """
        if self._head is not None:
            self._sendHead(False)
        self._pending.append(data)
        self._drain()

    def _sendHead(self, endStream: bool) -> None:
        """
        Send the response head.
        """
        head, self._head = self._head, None
        assert head is not None
        self._server.conn.sendHeaders(self.streamID, head, endStream=endStream)

    def _drain(self) -> None:
        """
        Send what waits as far as the windows allow (nothing while the visitor does not read), end
        the stream when all of it went and the response is complete, and pause the upstream while
        something is left.
        """
        server = self._server
        conn = server.conn
        pending = self._pending
        streamID = self.streamID
        if server.paused:
            pass
        elif pending:
            try:
                window = conn.localFlowControlWindow(streamID)
                frame = conn.maxOutboundFrameSize
                while pending and window > 0:
                    chunk = pending[0]
                    size = min(window, frame)
                    if len(chunk) <= size:
                        pending.popleft()
                        if not pending and self._ending and not self._trailers:
                            # The last piece: it ends the stream.
                            conn.sendData(streamID, chunk, endStream=True)
                            self._close()
                            return
                    else:
                        pending[0] = chunk[size:]
                        chunk = chunk[:size]
                    conn.sendData(streamID, chunk)
                    window -= len(chunk)
            except StreamStateError:
                # The visitor closed its side of the stream (a reset on its way): nothing more goes.
                self._close()
                return
        if not pending and self._ending:
            self._end()
            return
        producer = self._producer
        if producer is not None:
            if pending and not self._producerPaused:
                self._producerPaused = True
                producer.pauseProducing()
            elif not pending and self._producerPaused:
                self._producerPaused = False
                producer.resumeProducing()

    def _end(self) -> None:
        """
        End the stream: with its head when nothing else came, with its trailers when it has some.
        """
        conn = self._server.conn
        try:
            if self._head is not None and not self._trailers:
                self._sendHead(True)
            else:
                if self._head is not None:
                    self._sendHead(False)
                if self._trailers:
                    conn.sendHeaders(self.streamID, self._trailers, endStream=True)
                else:
                    conn.endStream(self.streamID)
        except StreamStateError:
            pass  # Reset by the visitor meanwhile: nothing to end.
        self._close()

    def _close(self) -> None:
        """
        This side of the stream is over: the connection forgets it (frames still coming for it get a
        reset, L{H2Server}).
        """
        self._closed = True
        self._pending.clear()
        self._producer = None
        self._releaseHeld()
        self._server.forget(self.streamID)

    def _releaseHeld(self) -> None:
        """
        Drop the body frames held, giving back their share of the connection's window.
        """
        held = self._held
        if held:
            size = sum(flowControlled for _, flowControlled in held)
            held.clear()
            self._holding = False
            if size:
                self._server.conn.acknowledgeReceivedData(size, self.streamID)

    def windowOpened(self) -> None:
        """
        The visitor gave window (or its transport can take writes again): send what waits.
        """
        if self._pending and not self._closed:
            self._drain()

    # What the upstream sees as the visitor's transport.

    def write(self, data: bytes) -> None:
        """
        Response bytes from the upstream; nothing before the response head (an interim response in
        HTTP/1.1 form has no place in HTTP/2).
        """
        exchange = self._exchange
        if data and not self._closed and exchange is not None and exchange.status:
            self._send(data)
            self._server.flush()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        """
        Let the stream's flow control pause the upstream.
        """
        if not self._closed:
            self._producer = producer
            self._producerPaused = False

    def unregisterProducer(self) -> None:
        """
        The exchange ended.
        """
        self._producer = None
        self._producerPaused = False

    def pauseProducing(self) -> None:
        """
        The upstream cannot take more of the request body: hold the frames that come, so that the
        visitor's window for this stream closes.
        """
        self._holding = True

    def resumeProducing(self) -> None:
        """
        Pass on what the stream held back and open its window again.
        """
        if not self._holding:
            return
        self._holding = False
        held = self._held
        acknowledged = 0
        while held and not self._holding:
            data, flowControlled = held.popleft()
            if data is None:
                self.bodyComplete()
            else:
                acknowledged += flowControlled
                self.bodyChunk(data)
        if acknowledged:
            self._server.conn.acknowledgeReceivedData(acknowledged, self.streamID)
        self._server.flush()

    def stopProducing(self) -> None:
        """
        The upstream went away: L{H2Visitor} answers or resets the stream.
        """

    def loseConnection(self) -> None:
        """
        Reset the stream (the other streams of the connection go on), so that the visitor does not
        take a truncated body for a whole one.
        """
        if self._closed:
            return
        try:
            self._server.conn.resetStream(self.streamID, ErrorCode.INTERNAL_ERROR)
        except StreamStateError:
            pass
        self._close()
        self._server.flush()


@implementer(IPushProducer)
class H2Server(Protocol, TimeoutMixin):
    """
    One visitor's HTTP/2 connection: its state (L{ServerConnection}), a L{H2Visitor} per request
    stream. It is the push producer of its transport: while the transport is paused (the visitor
    does not read), response bodies wait on their streams and at most L{MAX_PAUSED_OUTPUT} bytes of
    other frames are written. The connection is closed with C{GOAWAY} after L{IDLE_TIMEOUT} seconds
    without frames and with no request in flight, as an HTTP/1.1 visitor's is.

    @ivar conn: The connection's HTTP/2 state.
    @ivar streams: The streams whose response is not over, by id.
    @ivar paused: Whether the transport asked for a pause.
    """

    _log = Logger()

    def __init__(self, proxy: HTTPProxy, header: StreamHeader) -> None:
        self.proxy = proxy
        self.header = header
        reactor = proxy.reactor
        self._reactor = reactor
        # TimeoutMixin schedules on the global reactor unless told otherwise.
        self.callLater = reactor.callLater  # type: ignore[method-assign]
        self.conn = ServerConnection()
        self.streams: dict[int, H2Visitor] = {}
        self.paused = False
        self._pausedOutput = 0
        #: Requests whose headers came in the frames being handled, started once all are handled.
        self._starting: list[H2Visitor] = []
        self._resetTokens = float(RESET_BURST)
        self._resetStamp = reactor.seconds()
        self._aborting: Any = None
        self._lost = False
        self._producing = False
        self._checkedFields: set[tuple[bytes, bytes]] = set()

    def connectionMade(self) -> None:
        """
        Send the server's preface (its SETTINGS) and start the idle timer.
        """
        noDelay(self.transport)
        # Let the visitor's transport pause the server when its buffer fills.
        cast(IForwardingTransport, self.transport).registerProducer(self, True)
        self._producing = True
        self.setTimeout(IDLE_TIMEOUT)
        self.conn.initiateConnection()
        self.flush()

    def flush(self) -> None:
        """
        Write the frames the connection queued; a visitor that makes the server write more than
        L{MAX_PAUSED_OUTPUT} bytes while it reads nothing is cut off.
        """
        data = self.conn.dataToSend()
        if not data or self._lost:
            return
        transport = self.transport
        assert transport is not None
        if self.paused:
            self._pausedOutput += len(data)
            if self._pausedOutput > MAX_PAUSED_OUTPUT:
                self._log.warn(
                    "HTTP/2 visitor {peer} reads nothing and was sent {count} bytes meanwhile: "
                    "closing the connection",
                    peer=self.header.peerHost,
                    count=self._pausedOutput,
                )
                cast(Any, transport).abortConnection()
                self._loseStreams(Failure(ConnectionLost("the visitor does not read")))
                return
        transport.write(data)

    def dataReceived(self, data: bytes) -> None:
        """
        Handle the visitor's frames; then start the requests whose headers they carried (with
        whatever body came in the same frames), and write the answers in one go.
        """
        if self._lost:
            return
        try:
            events = self.conn.receiveData(data)
        except ProtocolError as e:
            self._log.warn(
                "HTTP/2 protocol error from {peer}: {error}",
                peer=self.header.peerHost,
                error=str(e) or type(e).__name__,
            )
            self.flush()  # The GOAWAY queued.
            self._terminate(Failure(ConnectionLost("HTTP/2 protocol error")))
            return
        self.resetTimeout()
        streams = self.streams
        for event in events:
            kind = type(event)
            if kind is h2server.RequestReceived:
                self._requestReceived(cast(h2server.RequestReceived, event))
            elif kind is h2server.DataReceived:
                received = cast(h2server.DataReceived, event)
                visitor = streams.get(received.streamID)
                if visitor is not None:
                    visitor.dataFrame(received.data, received.flowControlled)
                else:
                    self._dataAfterEnd(received)
            elif kind is h2server.StreamEnded:
                visitor = streams.get(cast(h2server.StreamEnded, event).streamID)
                if visitor is not None:
                    visitor.requestEnded()
            elif kind is h2server.StreamReset:
                self._streamReset(cast(h2server.StreamReset, event))
                if self._lost:
                    return
            elif kind is h2server.WindowUpdated:
                streamID = cast(h2server.WindowUpdated, event).streamID
                if streamID:
                    visitor = streams.get(streamID)
                    if visitor is not None:
                        visitor.windowOpened()
                else:
                    self._windowsOpened()
            elif kind is h2server.WindowsChanged:
                # SETTINGS_INITIAL_WINDOW_SIZE may have opened every stream's window.
                self._windowsOpened()
            elif kind is h2server.ConnectionTerminated:
                if not streams:
                    self._leave()
                    return
        starting = self._starting
        if starting:
            self._starting = []
            for visitor in starting:
                visitor.start()
        self.flush()

    def _requestReceived(self, event: h2server.RequestReceived) -> None:
        """
        A request's headers: checked (L{readRequestHead}; a malformed one resets its stream), then
        its stream is set up, to be started once the frames being handled are all handled.
        """
        streamID = event.streamID
        try:
            head = readRequestHead(event.headers, self._checkedFields)
        except MalformedRequest as e:
            self._refuse(streamID, str(e))
            return
        visitor = H2Visitor(self, streamID, head.method, head.path, head.headers, head.length)
        self.streams[streamID] = visitor
        self._starting.append(visitor)
        if head.expectContinue:
            self.conn.sendHeaders(streamID, [(b":status", b"100")])

    def _refuse(self, streamID: int, what: str) -> None:
        """
        Reset a request stream the proxy cannot forward (RFC 9113 8.1.1), with a log event. The
        reset is paid from the visitor's reset tokens: malformed requests cost a stream reset each
        too (the "MadeYouReset" variant of Rapid Reset).
        """
        self._log.warn(
            "HTTP/2 request from {peer} refused: {what}", peer=self.header.peerHost, what=what
        )
        try:
            self.conn.resetStream(streamID, ErrorCode.PROTOCOL_ERROR)
        except StreamStateError:
            pass
        self._spendResetToken()

    def _dataAfterEnd(self, event: h2server.DataReceived) -> None:
        """
        A DATA frame for a stream whose response already ended (an answer given before the whole
        body came, such as a 502 or an upstream's early 413): discarded, its window given back, and
        the stream reset with C{NO_ERROR} (RFC 9113 8.1) so the client stops sending.
        """
        streamID = event.streamID
        self.conn.acknowledgeReceivedData(event.flowControlled, streamID)
        try:
            self.conn.resetStream(streamID, ErrorCode.NO_ERROR)
        except StreamStateError:
            pass  # Already closed both ways.

    def _streamReset(self, event: h2server.StreamReset) -> None:
        """
        The visitor reset a stream, or broke the rules within it (the server reset it): its request
        is abandoned. Resets are paid from a token bucket (L{RESET_BURST}, L{RESET_RATE}), the
        server's as well as the visitor's (the "MadeYouReset" variant); a visitor that empties it
        (HTTP/2 Rapid Reset) gets C{GOAWAY} with C{ENHANCE_YOUR_CALM} and loses the connection.
        """
        if event.remote:
            what = f"stream reset with code {event.code}"
        else:
            what = f"stream reset: {event.reason}"
            self._log.warn(
                "HTTP/2 stream {stream} from {peer} reset: {what}",
                stream=event.streamID,
                peer=self.header.peerHost,
                what=event.reason,
            )
        visitor = self.streams.pop(event.streamID, None)
        if visitor is not None:
            visitor.reset(Failure(ConnectionLost(what)))
        self._spendResetToken()

    def _spendResetToken(self) -> None:
        """
        Pay for one stream reset; when the bucket is empty, C{GOAWAY} with C{ENHANCE_YOUR_CALM}.
        """
        now = self._reactor.seconds()
        # A wall clock: a step backwards must not drain the bucket.
        elapsed = max(0.0, now - self._resetStamp)
        self._resetStamp = now
        tokens = min(float(RESET_BURST), self._resetTokens + elapsed * RESET_RATE)
        if tokens < 1:
            self._log.warn(
                "HTTP/2 visitor {peer} resets streams too fast: closing the connection",
                peer=self.header.peerHost,
            )
            self.conn.closeConnection(ErrorCode.ENHANCE_YOUR_CALM)
            self.flush()
            self._terminate(Failure(ConnectionLost("too many stream resets")))
            return
        self._resetTokens = tokens - 1

    def _windowsOpened(self) -> None:
        """
        The connection's window opened, or every stream's: send what waits, stream by stream.
        """
        for visitor in list(self.streams.values()):
            visitor.windowOpened()

    def forget(self, streamID: int) -> None:
        """
        A stream's response is over (or it was reset): frames that still come for it are answered
        as RFC 9113 says for closed streams (L{ServerConnection}). The last one to end after the
        visitor's C{GOAWAY} closes the connection.
        """
        self.streams.pop(streamID, None)
        if not self.streams and self.conn.remoteGoingAway and not self._lost:
            self._leave()

    def _leave(self) -> None:
        """
        The visitor sent C{GOAWAY} and no stream is left: close the connection.
        """
        self.conn.closeConnection(ErrorCode.NO_ERROR)
        self.flush()
        self._terminate(Failure(ConnectionLost("the visitor sent GOAWAY")))

    def timeoutConnection(self) -> None:
        """
        Close the connection with C{GOAWAY} unless a request is in flight (a slow upstream, a long
        poll, an event stream); abort it if it is not gone L{ABORT_TIMEOUT} seconds later.
        """
        if self.streams:
            self.setTimeout(IDLE_TIMEOUT)
            return
        self._log.info("closing idle HTTP/2 connection from {peer}", peer=self.header.peerHost)
        self.conn.closeConnection(ErrorCode.NO_ERROR)
        self.flush()
        self._aborting = self.callLater(ABORT_TIMEOUT, self._abort)
        self._close()

    def _close(self) -> None:
        """
        Close the transport after what was written, without waiting for the visitor's close_notify
        (L{closePromptly}). This server stops being its producer first: TLS would wait for it to
        go away before sending close_notify.
        """
        transport = self.transport
        assert transport is not None
        if self._producing:
            self._producing = False
            cast(IForwardingTransport, transport).unregisterProducer()
        closePromptly(transport)

    def _abort(self) -> None:
        """
        The connection closed for idleness is still there: abort it.
        """
        self._aborting = None
        if self.transport is not None:
            cast(Any, self.transport).abortConnection()

    def _terminate(self, reason: Failure) -> None:
        """
        Close the connection (after what was written) and give up every stream.
        """
        self._close()
        if self._aborting is None:
            # The TCP connection closes once close_notify is sent; a visitor that reads nothing
            # would keep it open with unsent bytes.
            self._aborting = self.callLater(CLOSE_GRACE, self._abort)
        self._loseStreams(reason)

    def _loseStreams(self, reason: Failure) -> None:
        """
        The connection is over: every request in flight is abandoned.
        """
        self._lost = True
        self._starting = []
        streams, self.streams = self.streams, {}
        for visitor in streams.values():
            visitor.reset(reason)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """
        Abandon the requests in flight and stop the timers.
        """
        self.setTimeout(None)
        if self._aborting is not None and self._aborting.active():
            self._aborting.cancel()
        self._aborting = None
        self._loseStreams(reason)

    # The transport's producer.

    def pauseProducing(self) -> None:
        """
        The visitor does not read: response bodies wait on their streams.
        """
        self.paused = True

    def resumeProducing(self) -> None:
        """
        The transport can take writes again: send what waits.
        """
        if not self.paused:
            return
        self.paused = False
        self._pausedOutput = 0
        self._windowsOpened()
        self.flush()

    def stopProducing(self) -> None:
        """
        The transport is going away (L{connectionLost} follows).
        """
        self.paused = True


class RoutedHTTP(Protocol):
    """
    The protocol inside the visitor's TLS in routed mode: HTTP/2 when the handshake negotiated C{h2},
    HTTP/1.1 (L{VisitorHTTP}) otherwise. It decides on the first application bytes, when the handshake
    is done.
    """

    _inner: IProtocol | None = None

    def __init__(self, proxy: HTTPProxy, header: StreamHeader) -> None:
        self._proxy = proxy
        self._header = header

    def dataReceived(self, data: bytes) -> None:
        """
        Choose the protocol on the first bytes, then pass everything on.
        """
        inner = self._inner
        if inner is None:
            negotiated = getattr(self.transport, "negotiatedProtocol", None)
            assert self.transport is not None
            if negotiated == b"h2":
                inner = H2Server(self._proxy, self._header)
                self._inner = inner
                inner.makeConnection(self.transport)
            else:
                inner = self._inner = VisitorHTTP(self._proxy, self._header)
                inner.makeConnection(self.transport)
        inner.dataReceived(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """
        Pass the close on.
        """
        if self._inner is not None:
            self._inner.connectionLost(reason)
