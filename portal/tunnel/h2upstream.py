"""
HTTP/2 to the upstreams of routed HTTP mode: a client on the C{h2} package.

A route whose target is written C{h2c://HOST:PORT} (cleartext, with prior knowledge, RFC 9113
section 3.3) or C{h2://HOST:PORT} (TLS, ALPN C{h2}), and every gRPC request whatever its route's
scheme (L{portal.gateway.routes.isGRPC}), goes upstream over HTTP/2. One connection per upstream
carries every stream; another opens only while the open ones are full (the server's
C{SETTINGS_MAX_CONCURRENT_STREAMS}) or going away (C{GOAWAY}).

Flow control holds both ways. Request body bytes are sent as the stream's and the connection's
windows allow; what does not fit waits in the stream, and the visitor is paused (its producer,
L{H2UpstreamStream.writer}) until a C{WINDOW_UPDATE} drains it. Response body bytes are passed on as
they arrive and given back to the server's window only while the visitor's side keeps up: the stream
is a push producer, and while it is paused the bytes it received stay unacknowledged, so the server
can send at most a window more.

What the proxy does with the response is its L{IResponseReceiver}'s business: this module knows
nothing of visitors. Errors (a reset stream, C{GOAWAY}, a broken connection, a server that does not
speak HTTP/2, no response in time) reach the receiver as L{IResponseReceiver.responseFailed} with
the status the visitor should get (502, 504) and a one-line reason, and are logged.
"""

from __future__ import annotations

import typing
from collections import deque
from typing import Any

from h2.config import H2Configuration
from h2.connection import ConnectionState, H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import H2Error, ProtocolError
from h2.settings import SettingCodes
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.ssl import CertificateOptions
from twisted.logger import Logger
from twisted.python.failure import Failure

from portal.forwarding.quietconnect import connectQuietly
from portal.forwarding.splice import noDelay
from portal.gateway.routes import Upstream
from portal.wire.httpheaders import HOP_BY_HOP

#: Seconds to connect to an upstream (TCP, and TLS for C{h2://}).
CONNECT_TIMEOUT = 10.0
#: Seconds an upstream may take to start its response on a stream.
RESPONSE_TIMEOUT = 60.0
#: Bytes of response body a stream may receive ahead of the visitor (its flow-control window); the
#: connection's window is four times as large. HTTP/2's default (64 KiB) costs a round trip per
#: window on a fast stream.
WINDOW = 1024 * 1024
#: Seconds a connection with no open stream is kept before it is closed with C{GOAWAY}.
IDLE_TIMEOUT = 60.0

#: The type of a C{SETTINGS} frame, the first frame a server sends.
_SETTINGS = 0x04

#: Request headers never sent over HTTP/2 (RFC 9113 section 8.2.2), besides the hop-by-hop ones;
#: C{host} becomes C{:authority}.
_NOT_SENT = HOP_BY_HOP | {b"host", b"http2-settings"}


class IResponseReceiver(typing.Protocol):
    """
    What an L{H2UpstreamStream} reports its response to, in this order: one head, body pieces,
    trailers (if the server sent any), the end; or, at any point before the end, one failure.
    """

    def responseHead(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        """
        The response's status and headers (pseudo-headers removed, hop-by-hop headers dropped).
        """

    def responseBody(self, data: bytes) -> None:
        """
        A piece of the response body.
        """

    def responseTrailers(self, trailers: list[tuple[bytes, bytes]]) -> None:
        """
        The response's trailers (gRPC's C{grpc-status}, C{grpc-message}).
        """

    def responseEnded(self) -> None:
        """
        The response is complete.
        """

    def responseFailed(self, status: int, message: str) -> None:
        """
        The stream failed: C{status} (502, 504) is what the visitor should get if nothing was
        answered yet, C{message} says why.
        """


class IBodyWriter(typing.Protocol):
    """
    Whoever writes a stream's request body (the visitor's side), paused while the stream's
    flow-control window is full.
    """

    def pauseProducing(self) -> None:
        """
        Stop giving request body bytes.
        """

    def resumeProducing(self) -> None:
        """
        Give request body bytes again.
        """


def requestHeaders(
    method: bytes, scheme: bytes, authority: bytes, path: bytes, headers: list[tuple[bytes, bytes]]
) -> list[tuple[bytes, bytes]]:
    """
    Put a request's head in HTTP/2 form.

    @param method: The request method.
    @param scheme: C{https} or C{http}, for C{:scheme}.
    @param authority: The C{Host} to send, as C{:authority}.
    @param path: The request-target in origin form.
    @param headers: The request's headers, end to end (the proxy dropped the hop-by-hop ones).
    @return: The pseudo-headers, then the headers lowercased without those HTTP/2 forbids; C{te:
        trailers} is sent whatever the visitor sent, as gRPC servers expect it.
    """
    out = [
        (b":method", method),
        (b":scheme", scheme),
        (b":authority", authority),
        (b":path", path),
    ]
    out += [(n.lower(), v) for n, v in headers if n.lower() not in _NOT_SENT]
    out.append((b"te", b"trailers"))
    return out


def _responseHeaders(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """
    @return: C{headers} without pseudo-headers and hop-by-hop headers.
    """
    return [(n, v) for n, v in headers if not n.startswith(b":") and n.lower() not in HOP_BY_HOP]


class H2UpstreamStream:
    """
    One request on an L{H2UpstreamConnection}, and the push producer of its response body.

    @ivar streamID: The HTTP/2 stream id.
    @ivar writer: Who writes the request body, paused while the stream cannot send; or L{None}.
    @ivar done: Whether the stream ended, failed or was cancelled.
    """

    def __init__(
        self, connection: H2UpstreamConnection, streamID: int, receiver: IResponseReceiver
    ) -> None:
        self._connection = connection
        self.streamID = streamID
        self._receiver = receiver
        self.writer: IBodyWriter | None = None
        self.done = False
        self._outbound: deque[bytes] = deque()
        #: Whether the request body is complete (L{endBody}); C{END_STREAM} follows what is queued.
        self._ending = False
        self._endSent = False
        self._writerPaused = False
        self._paused = False
        self._unacknowledged = 0
        self._headed = False
        self._timer: Any = connection.clock.callLater(RESPONSE_TIMEOUT, self._timedOut)

    # The request body.

    def sendBody(self, data: bytes) -> None:
        """
        Send a piece of the request body, or queue it (pausing the writer) until the window opens.
        """
        if self.done or self._ending or not data:
            return
        self._outbound.append(data)
        self.drain()

    def endBody(self) -> None:
        """
        The request body is complete: end the stream once what is queued went out.
        """
        if self.done or self._ending:
            return
        self._ending = True
        self.drain()

    def drain(self) -> None:
        """
        Send what the flow-control windows allow; pause the writer while something is left, resume
        it once everything went.
        """
        if self.done:
            return
        h2 = self._connection.h2
        try:
            while self._outbound:
                room = min(h2.local_flow_control_window(self.streamID), h2.max_outbound_frame_size)
                if room <= 0:
                    break
                data = self._outbound.popleft()
                if len(data) > room:
                    self._outbound.appendleft(data[room:])
                    data = data[:room]
                h2.send_data(self.streamID, data)
            if not self._outbound and self._ending and not self._endSent:
                self._endSent = True
                h2.end_stream(self.streamID)
        except H2Error:
            # The server closed its side or reset the stream: its events say what happened.
            self._outbound.clear()
        self._connection.flush()
        writer = self.writer
        if self._outbound and not self._writerPaused and writer is not None:
            self._writerPaused = True
            writer.pauseProducing()
        elif not self._outbound and self._writerPaused and writer is not None:
            self._writerPaused = False
            writer.resumeProducing()

    def cancel(self) -> None:
        """
        The visitor went away: reset the stream (C{CANCEL}); the connection's other streams go on.
        """
        if self.done:
            return
        self._finish()
        self._connection.reset(self.streamID, ErrorCodes.CANCEL)

    # IPushProducer, for the visitor's side: while paused, received bytes stay unacknowledged.

    def pauseProducing(self) -> None:
        """
        The visitor cannot take more: stop giving the server window.
        """
        self._paused = True

    def resumeProducing(self) -> None:
        """
        The visitor caught up: give back the window of what was received meanwhile.
        """
        self._paused = False
        held, self._unacknowledged = self._unacknowledged, 0
        if held and not self.done:
            self._connection.acknowledge(self.streamID, held)

    def stopProducing(self) -> None:
        """
        The visitor's side closed.
        """
        self.cancel()

    # Events from the connection.

    def headReceived(self, headers: list[tuple[bytes, bytes]]) -> None:
        """
        The response head arrived.
        """
        self._cancelTimer()
        self._headed = True
        status = next((int(v) for n, v in headers if n == b":status"), 502)
        self._receiver.responseHead(status, _responseHeaders(headers))

    def dataReceived(self, data: bytes, flowControlled: int) -> None:
        """
        A DATA frame: pass it on; give its window back now, or once the visitor caught up.
        """
        if self.done:
            return
        if data:
            self._receiver.responseBody(data)
        if self._paused:
            self._unacknowledged += flowControlled
        elif flowControlled:
            self._connection.acknowledge(self.streamID, flowControlled)

    def trailersReceived(self, headers: list[tuple[bytes, bytes]]) -> None:
        """
        The response's trailers arrived.
        """
        if not self.done:
            self._receiver.responseTrailers(_responseHeaders(headers))

    def ended(self) -> None:
        """
        The server ended the stream: the response is complete (if it had a head).
        """
        if self.done:
            return
        if not self._headed:
            self.failed(502, "the upstream ended the stream without a response")
            return
        self._finish()
        self._receiver.responseEnded()

    def failed(self, status: int, message: str) -> None:
        """
        The stream cannot complete: tell the receiver once.
        """
        if self.done:
            return
        self._finish()
        self._receiver.responseFailed(status, message)

    def _timedOut(self) -> None:
        """
        No response head in L{RESPONSE_TIMEOUT} seconds: 504, and the stream is reset.
        """
        self._timer = None
        if self.done:
            return
        self._connection.log.warn(
            "upstream {upstream}: no response in {seconds:.0f} s on stream {stream}",
            upstream=self._connection.upstream.authority,
            seconds=RESPONSE_TIMEOUT,
            stream=self.streamID,
        )
        self.failed(504, f"no response in {RESPONSE_TIMEOUT:.0f} s")
        self._connection.reset(self.streamID, ErrorCodes.CANCEL)

    def _cancelTimer(self) -> None:
        """
        Stop the response timer.
        """
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _finish(self) -> None:
        """
        Forget the stream: no more events reach the receiver, the writer is not paused any more.
        """
        self.done = True
        self._cancelTimer()
        self._outbound.clear()
        self._connection.forgetStream(self.streamID)
        if self._writerPaused and self.writer is not None:
            self._writerPaused = False
            self.writer.resumeProducing()


class H2UpstreamConnection(Protocol):
    """
    One HTTP/2 connection to an upstream, carrying many streams.

    @ivar upstream: Where it goes.
    @ivar clock: The reactor's clock, for timeouts.
    @ivar h2: The C{h2} state machine.
    @ivar lost: Whether the connection closed.
    @ivar goingAway: Whether the server sent C{GOAWAY} (no new streams go here).
    """

    log = Logger()

    def __init__(self, pool: H2UpstreamPool, upstream: Upstream, clock: Any) -> None:
        self._pool = pool
        self.upstream = upstream
        self.clock = clock
        self.h2 = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self._streams: dict[int, H2UpstreamStream] = {}
        self.lost = False
        self.goingAway = False
        self._idleTimer: Any = None
        #: The first bytes received, until there are enough to check the first frame's type.
        self._first: bytes | None = b""

    def connectionMade(self) -> None:
        """
        Send the connection preface and settings (each stream's window, and the connection's, is
        L{WINDOW}); start the idle timer.
        """
        noDelay(self.transport)
        self.h2.initiate_connection()
        self.h2.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: WINDOW})
        self.h2.increment_flow_control_window(WINDOW * 4 - self.h2.inbound_flow_control_window)
        self.flush()
        self._idle()

    def canOpen(self) -> bool:
        """
        @return: Whether a new stream may open here now.
        """
        if self.lost or self.goingAway:
            return False
        limit = self.h2.remote_settings.max_concurrent_streams
        return bool(self.h2.open_outbound_streams < limit)

    def openStream(
        self, headers: list[tuple[bytes, bytes]], receiver: IResponseReceiver
    ) -> H2UpstreamStream:
        """
        Send a request's headers on a new stream; its body follows with
        L{H2UpstreamStream.sendBody} and L{H2UpstreamStream.endBody}.

        @param headers: The request head, in HTTP/2 form (L{requestHeaders}).
        @param receiver: Where the response goes.
        @return: The stream.
        """
        if self._idleTimer is not None and self._idleTimer.active():
            self._idleTimer.cancel()
        self._idleTimer = None
        streamID = self.h2.get_next_available_stream_id()
        stream = self._streams[streamID] = H2UpstreamStream(self, streamID, receiver)
        self.h2.send_headers(streamID, headers)
        self.flush()
        return stream

    def flush(self) -> None:
        """
        Write what the state machine has to send.
        """
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.lost:
            self.transport.write(data)

    def acknowledge(self, streamID: int, count: int) -> None:
        """
        Give the server back C{count} bytes of window on C{streamID} and on the connection.
        """
        try:
            self.h2.acknowledge_received_data(count, streamID)
        except H2Error:
            return  # The stream closed meanwhile: the connection's window was not at stake.
        self.flush()

    def reset(self, streamID: int, code: ErrorCodes) -> None:
        """
        Reset one stream, if it is still open.
        """
        try:
            self.h2.reset_stream(streamID, code)
        except H2Error:
            return
        self.flush()

    def forgetStream(self, streamID: int) -> None:
        """
        A stream is done; with none left, the idle timer starts (or, after C{GOAWAY}, the
        connection closes).
        """
        self._streams.pop(streamID, None)
        if self._streams:
            return
        if self.goingAway and self.transport is not None:
            self.transport.loseConnection()
        else:
            self._idle()

    def _idle(self) -> None:
        """
        Close the connection after L{IDLE_TIMEOUT} seconds without a stream.
        """
        if self._idleTimer is None or not self._idleTimer.active():
            self._idleTimer = self.clock.callLater(IDLE_TIMEOUT, self._closeIdle)

    def _closeIdle(self) -> None:
        """
        Idle for too long: C{GOAWAY} and close.
        """
        self._idleTimer = None
        if self._streams or self.lost:
            return
        self._pool.forget(self)
        self.h2.close_connection()
        self.flush()
        assert self.transport is not None
        self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        """
        Frames from the server: dispatch their events to the streams. The first frame must be
        C{SETTINGS} (RFC 9113 section 3.4): a server that answers otherwise (in HTTP/1.1, say) is
        refused at once instead of when its "frame" would be complete.
        """
        if self._first is not None:
            self._first += data
            if len(self._first) < 4:
                return
            first, self._first = self._first, None
            if first[3] != _SETTINGS:
                self._broken(f"its first bytes are {first[:16]!r}, not an HTTP/2 SETTINGS frame")
                return
            data = first
        try:
            events = self.h2.receive_data(data)
        except ProtocolError as e:
            self._broken(str(e) or type(e).__name__)
            return
        for event in events:
            self._event(event)
        self.flush()

    def _broken(self, error: str) -> None:
        """
        The server does not speak HTTP/2, or broke the protocol: fail every stream, close.
        """
        self.log.warn(
            "upstream {upstream} does not speak HTTP/2: {error}",
            upstream=self.upstream.authority,
            error=error,
        )
        self.goingAway = True
        self._pool.forget(self)
        self.flush()
        self._failAll(502, "the upstream does not speak HTTP/2 or broke the protocol")
        if self.transport is not None:
            self.transport.loseConnection()

    def _event(self, event: Any) -> None:
        """
        Handle one C{h2} event.
        """
        stream = self._streams.get(getattr(event, "stream_id", 0) or 0)
        if isinstance(event, ResponseReceived) and stream is not None:
            stream.headReceived(event.headers)
        elif isinstance(event, DataReceived):
            if stream is not None:
                stream.dataReceived(event.data, event.flow_controlled_length)
            elif event.flow_controlled_length:
                # A stream we reset: its bytes still count against the connection's window.
                self.acknowledge(event.stream_id, event.flow_controlled_length)
        elif isinstance(event, TrailersReceived) and stream is not None:
            stream.trailersReceived(event.headers)
        elif isinstance(event, StreamEnded) and stream is not None:
            stream.ended()
        elif isinstance(event, StreamReset) and stream is not None:
            self.log.info(
                "upstream {upstream} reset stream {stream}: {code}",
                upstream=self.upstream.authority,
                stream=event.stream_id,
                code=_codeName(event.error_code),
            )
            stream.failed(502, f"the upstream reset the stream ({_codeName(event.error_code)})")
        elif isinstance(event, (WindowUpdated, RemoteSettingsChanged)):
            for each in list(self._streams.values()):
                each.drain()
        elif isinstance(event, ConnectionTerminated):
            self._goAway(event)

    def _goAway(self, event: ConnectionTerminated) -> None:
        """
        C{GOAWAY}: no new streams here; those the server did not take fail, the others finish.
        """
        self.goingAway = True
        self._pool.forget(self)
        last = event.last_stream_id if event.last_stream_id is not None else 0
        self.log.info(
            "upstream {upstream} going away ({code}, last stream {last})",
            upstream=self.upstream.authority,
            code=_codeName(event.error_code),
            last=last,
        )
        for streamID, stream in list(self._streams.items()):
            if streamID > last:
                stream.failed(502, "the upstream refused the stream (GOAWAY)")
        if self._streams:
            # h2 takes GOAWAY for the end of the connection and refuses every later frame, but
            # the server still answers the streams it took (RFC 9113 section 6.8): go on reading.
            self.h2.state_machine.state = ConnectionState.CLIENT_OPEN
        if not self._streams and self.transport is not None:
            self.transport.loseConnection()

    def _failAll(self, status: int, message: str) -> None:
        """
        Fail every open stream.
        """
        for stream in list(self._streams.values()):
            stream.failed(status, message)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """
        The connection closed: streams still open fail.
        """
        self.lost = True
        if self._idleTimer is not None and self._idleTimer.active():
            self._idleTimer.cancel()
        self._idleTimer = None
        self._pool.forget(self)
        self._failAll(502, "the upstream closed the connection")


def _codeName(code: Any) -> str:
    """
    @return: An HTTP/2 error code's name (C{CANCEL}), or its number when it has none.
    """
    return getattr(code, "name", None) or str(code)


class H2UpstreamPool:
    """
    HTTP/2 connections to upstreams: one per upstream while it has room for another stream.

    @ivar opened: How many connections were opened, for tests and measurements.
    """

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self._connections: dict[Upstream, list[H2UpstreamConnection]] = {}
        self._waiting: dict[Upstream, list[Deferred[H2UpstreamConnection]]] = {}
        self.opened = 0

    def connection(self, upstream: Upstream) -> Deferred[H2UpstreamConnection]:
        """
        @return: A connection to C{upstream} that can open a stream now: an open one, the one
            being made, or a new one (within L{CONNECT_TIMEOUT}).
        """
        for connection in self._connections.get(upstream, []):
            if connection.canOpen():
                return succeed(connection)
        waiting = self._waiting.get(upstream)
        if waiting is not None:
            d: Deferred[H2UpstreamConnection] = Deferred()
            waiting.append(d)
            return d
        endpoint: Any = HostnameEndpoint(
            self.reactor, upstream.host, upstream.port, timeout=CONNECT_TIMEOUT
        )
        if upstream.tls:
            endpoint = wrapClientTLS(
                CertificateOptions(verify=False, acceptableProtocols=[b"h2"]), endpoint
            )
        self.opened += 1
        self._waiting[upstream] = []
        connecting: Deferred[H2UpstreamConnection] = connectQuietly(
            endpoint, H2UpstreamConnection(self, upstream, self.reactor)
        )
        connecting.addTimeout(CONNECT_TIMEOUT, self.reactor)

        def done(result: H2UpstreamConnection | Failure) -> H2UpstreamConnection | Failure:
            waiters = self._waiting.pop(upstream, [])
            if isinstance(result, H2UpstreamConnection) and not result.lost:
                self._connections.setdefault(upstream, []).append(result)
            for waiter in waiters:
                if isinstance(result, Failure):
                    waiter.errback(result)
                else:
                    waiter.callback(result)
            return result

        return connecting.addBoth(done)

    def forget(self, connection: H2UpstreamConnection) -> None:
        """
        A connection closed or is going away: no new streams go to it.
        """
        connections = self._connections.get(connection.upstream)
        if connections and connection in connections:
            connections.remove(connection)
