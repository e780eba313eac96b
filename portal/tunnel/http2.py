"""
HTTP/2 for visitors of routed HTTP mode.

When the visitor's TLS handshake negotiates C{h2} (the tunnel offers it with C{--alpn h2,http/1.1}), the
connection is served by twisted.web's HTTP/2 implementation (the C{h2} package), and each request is
forwarded over the same pooled HTTP/1.1 upstream connections as the HTTP/1.1 path
(L{portal.tunnel.httpproxy.UpstreamConnection}), or on a stream of an HTTP/2 upstream
(L{portal.tunnel.httpproxy.H2Exchange}), whose trailers end the visitor's stream
(L{_TrailingConnection}). Responses stream to the visitor with HTTP/2 flow
control as backpressure. Request bodies stream too: L{StreamingRequest} takes over from twisted.web's
C{Request} as soon as the request's headers are in (twisted.web would collect the whole body and only
then render), forwards each DATA frame upstream as it arrives, and holds the stream's flow-control
window closed while the upstream cannot take more.

With C{--app} each request is first put to the app gateway, as on the HTTP/1.1 path
(L{portal.tunnel.httpproxy}): meanwhile its body is held with the stream's window closed, or read
whole (up to L{portal.gateway.access.MAX_BODY}) when the gateway needs it.
"""

from __future__ import annotations

from functools import partial
from typing import Any, cast

import attrs
import h2.config
import h2.connection
from h2.errors import ErrorCodes
from h2.exceptions import H2Error, StreamClosedError
from twisted.internet.defer import CancelledError
from twisted.internet.error import TimeoutError
from twisted.internet.interfaces import IProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web._http2 import H2Connection
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from portal.forwarding.splice import IForwardingTransport
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
from portal.wire.attach import StreamHeader


class _RequestSink:
    """
    What an L{UpstreamConnection} treats as the visitor's transport, for one HTTP/2 request: writes go
    to the request, producers are registered with it (so HTTP/2 flow control pauses the upstream).
    """

    connected = True
    disconnecting = False

    def __init__(self, request: Request) -> None:
        self._request = request

    def write(self, data: bytes) -> None:
        """
        Write response bytes.
        """
        if not self._request.finished:
            self._request.write(data)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        """
        Let the stream's flow control pause the upstream.
        """
        if not self._request.finished:
            self._request.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        """
        The exchange ended.
        """
        if not self._request.finished:
            self._request.unregisterProducer()

    def pauseProducing(self) -> None:
        """
        The upstream cannot take more of the request body: stop giving the visitor flow-control
        window for this stream.
        """
        channel: Any = None if self._request.finished else self._request.channel
        if channel is not None:
            channel.pauseProducing()

    def resumeProducing(self) -> None:
        """
        Pass on what the stream held back and open its window again.
        """
        channel: Any = None if self._request.finished else self._request.channel
        if channel is not None and not channel.producing:
            channel.resumeProducing()

    def stopProducing(self) -> None:
        """
        The upstream went away: L{H2Visitor} answers or resets the stream.
        """

    def loseConnection(self) -> None:
        """
        Reset the stream (the other streams of the connection go on), so that the visitor does not
        take a truncated body for a whole one: C{Request.loseConnection} would end it cleanly.
        """
        channel: Any = self._request.channel  # An H2Stream, which can reset itself.
        if not self._request.finished and channel is not None:
            channel.abortConnection()


class H2Visitor(ExchangeAnswers):
    """
    One HTTP/2 request, seen by an L{UpstreamConnection} as its visitor.
    """

    framesBodies = True
    _closeAfter = False

    def __init__(self, proxy: HTTPProxy, header: StreamHeader, request: Request) -> None:
        self._proxy = proxy
        self._header = header
        self._request = request
        self.transport = _RequestSink(request)
        self._lost = False
        self._done = False
        self._exchange: Exchange | None = Exchange(header.peerHost, proxy.newCapture())
        #: The request's C{content-length}, if it gave one.
        self.length: int | None = None
        request.notifyFinish().addErrback(self._gone)

    def start(self) -> None:
        """
        Route the request and forward it; its body follows as it arrives (L{bodyChunk}).
        """
        request = self._request
        if self._lost or request.finished:
            return
        exchange = self._exchange
        assert exchange is not None
        exchange.started = self._proxy.reactor.seconds()
        exchange.method = request.method
        exchange.url = request.uri
        exchange.headers = [
            (name, value)
            for name, values in request.requestHeaders.getAllRawHeaders()
            for value in values
            if name.lower() not in (b"content-length", b"transfer-encoding")
        ]
        if exchange.bodyDone:
            # The whole body (if any) came with the headers.
            held = sum(len(b) for b in exchange.body)
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
        if self._lost or exchange.status or self._request.finished:
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

    def _gone(self, reason: Failure) -> None:
        """
        The visitor reset the stream or closed the connection: an upstream still answering (even
        mid-body) is abandoned, its state unknown.
        """
        self._lost = True
        exchange = self._exchange
        if exchange is not None and exchange.upstream is not None and not self._done:
            exchange.upstream.abandon()

    def writeHead(
        self, exchange: Exchange, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]
    ) -> None:
        """
        Set the response status and headers (HTTP/2 sends them with the first body frame or the end).
        """
        exchange.status = status
        request = self._request
        request.setResponseCode(status, reason)
        request.defaultContentType = None
        for name, value in headers:
            if name.lower() not in (b"connection", b"transfer-encoding"):
                request.responseHeaders.addRawHeader(name, value)

    def writeBody(self, exchange: Exchange, data: bytes, payload: int | None = None) -> None:
        """
        Stream response bytes.
        """
        exchange.sent += len(data) if payload is None else payload
        if data and not self._request.finished and not self._lost:
            self._request.write(data)

    def writeTrailers(self, exchange: Exchange, trailers: list[tuple[bytes, bytes]]) -> None:
        """
        End the response with C{trailers} (a C{HEADERS} frame with C{END_STREAM}) instead of an
        empty C{DATA} frame, as gRPC needs for its C{grpc-status}; a response with neither body nor
        trailers ends with its head.
        """
        request = self._request
        stream: Any = request.channel  # twisted.web's H2Stream
        if stream is None or request.finished or self._lost:
            return
        channel: _H2Channel = stream._conn
        if trailers:
            channel.conn.trailers[stream.streamID] = trailers
        elif not request.startedWriting:
            channel.conn.headersOnly.add(stream.streamID)

    def finished(self, exchange: Exchange) -> None:
        """
        The response is complete.
        """
        self._done = True
        self._proxy.logRequest(exchange)
        if not self._request.finished and not self._lost:
            self._request.finish()

    def upgraded(self, upstream: UpstreamConnection) -> None:
        """
        HTTP/2 has no C{Upgrade}; requests carry none (RFC 9113 8.2.2), so this cannot happen.
        """
        upstream.abandon()


class StreamingRequest(Request):
    """
    One HTTP/2 request, forwarded as soon as its headers are in (twisted.web would collect the whole
    body first): L{gotLength}, which twisted.web's C{H2Stream} calls once it has read the headers,
    starts an L{H2Visitor}; each DATA frame then goes to L{H2Visitor.bodyChunk} and C{END_STREAM} to
    L{H2Visitor.bodyComplete}. Nothing of the body is kept here, and twisted.web's resource rendering
    (and its form parsing of the body) never runs.
    """

    visitor: H2Visitor | None = None

    def __init__(
        self, channel: Any, queued: Any = False, *, proxy: HTTPProxy, header: StreamHeader
    ) -> None:
        super().__init__(channel, queued)
        self._proxy = proxy
        self._header = header

    def gotLength(self, length: int | None) -> None:
        """
        The headers are in (C{content-length}, if any, is C{length}): start forwarding once the
        frames being handled are all handled (L{_H2Channel.startSoon}), when the stream is set up.
        """
        visitor = self.visitor
        if visitor is None:
            stream: Any = self.channel
            self.method = stream.command
            self.uri = stream.path
            self.clientproto = b"HTTP/2"
            visitor = self.visitor = H2Visitor(self._proxy, self._header, self)
            stream._conn.startSoon(visitor)
        visitor.length = length

    def handleContentChunk(self, data: bytes) -> None:
        """
        Forward a piece of the body.
        """
        if self.visitor is not None and not self.finished:
            self.visitor.bodyChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        """
        The body ended.
        """
        if self.visitor is not None:
            self.visitor.bodyComplete()


class _QuietSite(Site):
    """
    A site that writes no access log (the tunnel reports each request itself).
    """

    def log(self, request: Any) -> None:
        """
        No access log.
        """


class _TrailingConnection(h2.connection.H2Connection):
    """
    twisted.web's HTTP/2 state machine, ending a stream with its response's trailers when it has
    some, and a response without body or trailers with its C{HEADERS} frame (gRPC's
    "Trailers-Only" answer: its C{grpc-status} is in that frame). twisted.web knows no trailers and
    ends every stream with an empty C{DATA} frame.

    @ivar trailers: Trailers to end each stream with, by stream id (L{H2Visitor.writeTrailers}).
    @ivar headersOnly: Streams whose response head is to end them.
    """

    def __init__(self, config: h2.config.H2Configuration) -> None:
        super().__init__(config=config)
        self.trailers: dict[int, list[tuple[bytes, bytes]]] = {}
        self.headersOnly: set[int] = set()
        self._endedByHeaders: set[int] = set()

    def send_headers(
        self,
        stream_id: int,
        headers: Any,
        end_stream: bool = False,
        priority_weight: int | None = None,
        priority_depends_on: int | None = None,
        priority_exclusive: bool | None = None,
    ) -> None:
        """
        Send a head; one of L{headersOnly} ends its stream.
        """
        if stream_id in self.headersOnly:
            self.headersOnly.discard(stream_id)
            self._endedByHeaders.add(stream_id)
            end_stream = True
        super().send_headers(
            stream_id,
            headers,
            end_stream,
            priority_weight,
            priority_depends_on,
            priority_exclusive,
        )

    def end_stream(self, stream_id: int) -> None:
        """
        End the stream: with its trailers if it has some, not at all if its head ended it, else as
        C{h2} does.
        """
        if stream_id in self._endedByHeaders:
            self._endedByHeaders.discard(stream_id)
            return
        trailers = self.trailers.pop(stream_id, None)
        if trailers:
            self.send_headers(stream_id, trailers, end_stream=True)
        else:
            super().end_stream(stream_id)

    def forget(self, streamID: int) -> None:
        """
        A stream is done: drop what was kept for its end (it was reset before).
        """
        self.trailers.pop(streamID, None)
        self.headersOnly.discard(streamID)
        self._endedByHeaders.discard(streamID)


class _H2Channel(H2Connection):
    """
    twisted.web's HTTP/2 connection, closed when idle as an HTTP/1.1 visitor's is: after
    L{IDLE_TIMEOUT} seconds without frames and with no request in flight. (twisted.web's own timeout
    also closes connections with streams in flight: a slow upstream, a long poll, an event stream.)
    """

    conn: _TrailingConnection

    def __init__(self, reactor: Any) -> None:
        super().__init__(reactor)
        self.conn = _TrailingConnection(self.conn.config)
        #: Streams L{_sendPrioritisedData} blocked for want of flow-control window.
        self._parked: set[int] = set()
        #: Requests whose headers came in the frames L{dataReceived} is handling, to start once
        #: those frames are all handled.
        self._starting: list[H2Visitor] = []
        self._host: Any = None

    def getHost(self) -> Any:
        """
        @return: The local address of the visitor's transport, asked of the kernel once per
            connection rather than once per request (twisted.web's C{Request} asks for it).
        """
        host = self._host
        if host is None:
            host = self._host = super().getHost()
        return host

    def _requestDone(self, streamID: int) -> None:
        """
        A stream is done: forget trailers it did not send (it was reset).
        """
        self.conn.forget(streamID)
        super()._requestDone(streamID)

    def timeoutConnection(self) -> None:
        """
        Close the connection unless a request is in flight.
        """
        if self.streams:
            self.setTimeout(self.timeOut)
            return
        super().timeoutConnection()

    def _sendPrioritisedData(self, *args: Any) -> None:
        """
        twisted.web's send loop, with flow-control stalls parked: twisted.web leaves a stream whose
        window ran out while it still has data queued in the priority tree, and its loop then runs
        every reactor turn (sending nothing, a core at 100%) until the visitor opens the window.
        Such streams are blocked here; L{dataReceived} unblocks them when the window opens.
        """
        super()._sendPrioritisedData(*args)
        parked = self._parked
        for streamID, queue in self._outboundStreamQueues.items():
            # Blocked again even if parked: new response data unblocks a stream in twisted.web.
            if queue and self._window(streamID) <= 0:
                self.priority.block(streamID)
                parked.add(streamID)

    def dataReceived(self, data: bytes) -> None:
        """
        Frames from the visitor; afterwards, the requests whose headers they carried are started
        (with whatever body came in the same frames), and streams parked by
        L{_sendPrioritisedData} whose window opened again (C{WINDOW_UPDATE} or a larger
        C{SETTINGS_INITIAL_WINDOW_SIZE}) go back to the send loop, which is woken if it was
        waiting.
        """
        super().dataReceived(data)
        starting = self._starting
        if starting:
            self._starting = []
            for visitor in starting:
                visitor.start()
        if not self._parked:
            return
        opened = False
        for streamID in list(self._parked):
            if streamID not in self._outboundStreamQueues:
                self._parked.discard(streamID)  # Finished or reset meanwhile.
            elif self._window(streamID) > 0:
                self._parked.discard(streamID)
                self.priority.unblock(streamID)
                opened = True
        sending = self._sendingDeferred
        if opened and sending is not None:
            self._sendingDeferred = None
            sending.callback(None)

    def startSoon(self, visitor: H2Visitor) -> None:
        """
        Start C{visitor}'s request once the frames being handled are all handled (its stream is
        set up by then, and any body that came with the headers is held).
        """
        self._starting.append(visitor)

    def _canSendNow(self, streamID: int, length: int) -> bool:
        """
        @return: Whether C{length} bytes of C{streamID} can go out at once, in order and within
            flow control: nothing of the stream is queued, the transport is not paused, no control
            frame waits, and the stream's window and the frame size allow them.
        """
        queue = self._outboundStreamQueues.get(streamID)
        return (
            queue is not None
            and not queue
            and self._consumerBlocked is None
            and not self._bufferedControlFrames
            and length <= self.conn.max_outbound_frame_size
            and length <= self._window(streamID)
        )

    def writeDataToStream(self, streamID: int, data: bytes) -> None:
        """
        Send a piece of a response at once when nothing is ahead of it and flow control allows
        (the common case: a small response), so that it leaves with the headers in the same TLS
        write; otherwise queue it for twisted.web's send loop, which sends a frame per reactor turn
        in priority order.
        """
        if not data or not self._canSendNow(streamID, len(data)):
            super().writeDataToStream(streamID, data)
            return
        self.conn.send_data(streamID, data)
        self._tryToWriteControlData()  # Writes at once: nothing is buffered or blocked.
        if self._window(streamID) <= 0:
            self.streams[streamID].flowControlBlocked()

    def endRequest(self, streamID: int) -> None:
        """
        End a response at once when nothing of it is queued (with C{END_STREAM} on an empty DATA
        frame, as twisted.web's send loop does), and forget the stream; otherwise queue the end
        behind the data.
        """
        if not self._canSendNow(streamID, 0):
            super().endRequest(streamID)
            return
        try:
            self.conn.end_stream(streamID)
        except StreamClosedError:
            pass  # Reset by the visitor meanwhile: nothing to end.
        else:
            self._tryToWriteControlData()
        self._requestDone(streamID)

    def _window(self, streamID: int) -> int:
        """
        @return: How much C{streamID} may send now (0 once the stream is closed).
        """
        try:
            window: int = self.conn.local_flow_control_window(streamID)
        except H2Error:
            return 0
        return window

    def _requestDataReceived(self, event: Any) -> None:
        """
        A DATA frame. One for a stream whose response already ended (an answer given before the
        whole body came, such as a 502 or an upstream's early 413) is discarded, its window given back,
        and the stream reset with C{NO_ERROR} (RFC 9113 8.1) so the client stops sending; twisted.web
        would look the stream up and fail the whole connection.
        """
        if event.stream_id in self.streams:
            super()._requestDataReceived(event)
            return
        self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        self._resetFinished(event.stream_id)

    def _requestEnded(self, event: Any) -> None:
        """
        C{END_STREAM}; ignored for a stream whose response already ended.
        """
        if event.stream_id in self.streams:
            super()._requestEnded(event)

    def _resetFinished(self, streamID: int) -> None:
        """
        Ask the client to stop sending the body of an answered request.
        """
        try:
            self.conn.reset_stream(streamID, ErrorCodes.NO_ERROR)
        except H2Error:
            return  # Already closed both ways.
        self._tryToWriteControlData()


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
                inner = self._h2Channel()
                self._inner = inner
                inner.makeConnection(self.transport)
                # Let the visitor's transport pause the channel when its buffer fills, as
                # twisted.web's own ALPN switch does.
                cast(IForwardingTransport, self.transport).registerProducer(inner, True)
            else:
                inner = self._inner = VisitorHTTP(self._proxy, self._header)
                inner.makeConnection(self.transport)
        inner.dataReceived(data)

    def _h2Channel(self) -> _H2Channel:
        """
        @return: twisted.web's HTTP/2 channel, running on the proxy's reactor: built through
            C{Site.buildProtocol} it would schedule its send loop on the global reactor.
        """
        reactor = self._proxy.reactor
        site = _QuietSite(Resource(), reactor=reactor)
        site.displayTracebacks = False
        channel = _H2Channel(reactor)
        # twisted.web's H2Connection declares these None; its Site-built channels get them set too.
        configure: Any = channel
        configure.site = site
        configure.factory = site
        configure.requestFactory = partial(StreamingRequest, proxy=self._proxy, header=self._header)
        configure.timeOut = IDLE_TIMEOUT
        configure.callLater = reactor.callLater
        return channel

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """
        Pass the close on.
        """
        if self._inner is not None:
            self._inner.connectionLost(reason)
