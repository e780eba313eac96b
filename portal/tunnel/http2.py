"""
HTTP/2 for visitors of routed HTTP mode.

When the visitor's TLS handshake negotiates C{h2} (the tunnel offers it with C{--alpn h2,http/1.1}), the
connection is served by twisted.web's HTTP/2 implementation (the C{h2} package), and each request is
forwarded over the same pooled HTTP/1.1 upstream connections as the HTTP/1.1 path
(L{portal.tunnel.httpproxy.UpstreamConnection}). Responses stream to the visitor with HTTP/2 flow
control as backpressure. Request bodies are collected by twisted.web before the request is forwarded
(twisted.web's resource model), so HTTP/2 uploads are not streamed; HTTP/1.1 uploads are.
"""

from __future__ import annotations

from typing import Any, cast

from twisted.internet.defer import CancelledError
from twisted.internet.error import TimeoutError
from twisted.internet.interfaces import IProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web._http2 import H2Connection
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from portal.attach import StreamHeader
from portal.splice import IForwardingTransport
from portal.tunnel.httpproxy import (
    IDLE_TIMEOUT,
    Exchange,
    ExchangeAnswers,
    HTTPProxy,
    UpstreamConnection,
    VisitorHTTP,
)


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
        The request body is already complete: nothing to pause.
        """

    def resumeProducing(self) -> None:
        """
        Nothing to resume.
        """

    def stopProducing(self) -> None:
        """
        Nothing to stop.
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
        self._exchange: Exchange | None = None
        request.notifyFinish().addErrback(self._gone)

    def start(self) -> None:
        """
        Route the request and forward it.
        """
        request = self._request
        exchange = self._exchange = Exchange()
        exchange.started = self._proxy.reactor.seconds()
        exchange.method = request.method
        exchange.url = request.uri
        headers = [
            (name, value)
            for name, values in request.requestHeaders.getAllRawHeaders()
            for value in values
            if name.lower() not in (b"content-length", b"transfer-encoding")
        ]
        assert request.content is not None
        body = request.content.read()
        if body or exchange.method in (b"POST", b"PUT", b"PATCH"):
            headers.append((b"Content-Length", b"%d" % len(body)))
        exchange.headers = headers
        exchange.body = [body] if body else []
        exchange.bodyDone = True
        exchange.headComplete = True
        exchange.version = "2"
        match = self._proxy.table.match(exchange.url.decode("latin-1"))
        if match is None:
            prefixes = ", ".join(self._proxy.table.prefixes())
            self._respondLocally(exchange, 404, f"No route for this path. Routes: {prefixes}")
            return
        exchange.match = match
        idle = self._proxy.pool.takeIdle(match.route.upstream)
        if idle is not None:
            exchange.upstream = idle
            idle.begin(self, exchange)
            return
        d = self._proxy.pool.get(match.route.upstream)

        def connected(upstream: UpstreamConnection) -> None:
            if self._lost or exchange.status:
                self._proxy.pool.release(upstream, reusable=True)
                return
            exchange.upstream = upstream
            upstream.begin(self, exchange)

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


class _Proxied(Resource):
    """
    Every HTTP/2 request, whatever its path, goes to the routes.
    """

    isLeaf = True

    def __init__(self, proxy: HTTPProxy, header: StreamHeader) -> None:
        super().__init__()
        self._proxy = proxy
        self._header = header

    def render(self, request: Request) -> Any:
        """
        Forward the request; the response is written as it streams in.
        """
        H2Visitor(self._proxy, self._header, request).start()
        return NOT_DONE_YET


class _QuietSite(Site):
    """
    A site that writes no access log (the tunnel reports each request itself).
    """

    def log(self, request: Any) -> None:
        """
        No access log.
        """


class _H2Channel(H2Connection):
    """
    twisted.web's HTTP/2 connection, closed when idle as an HTTP/1.1 visitor's is: after
    L{IDLE_TIMEOUT} seconds without frames and with no request in flight. (twisted.web's own timeout
    also closes connections with streams in flight: a slow upstream, a long poll, an event stream.)
    """

    def timeoutConnection(self) -> None:
        """
        Close the connection unless a request is in flight.
        """
        if self.streams:
            self.setTimeout(self.timeOut)
            return
        super().timeoutConnection()


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
        site = _QuietSite(_Proxied(self._proxy, self._header), reactor=reactor)
        site.displayTracebacks = False
        channel = _H2Channel(reactor)
        # twisted.web's H2Connection declares these None; its Site-built channels get them set too.
        configure: Any = channel
        configure.site = site
        configure.factory = site
        configure.requestFactory = site.requestFactory
        configure.timeOut = IDLE_TIMEOUT
        configure.callLater = reactor.callLater
        return channel

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """
        Pass the close on.
        """
        if self._inner is not None:
            self._inner.connectionLost(reason)
