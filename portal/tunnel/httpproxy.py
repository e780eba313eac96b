"""
Routed HTTP mode: an HTTP/1.1 reverse proxy inside the tunnel's TLS.

Each visitor connection is parsed with C{httptools} (llhttp, in C); every request goes to the route
whose prefix is the longest match of its normalised path (L{portal.gateway.routes}). Upstream connections are
persistent and pooled per target. Bodies stream both ways with backpressure (each side's transport is the
other's producer while an exchange runs); C{Connection: Upgrade} answered with C{101} becomes a raw
two-way splice (WebSocket). Pipelined requests are answered in order.

Routes to HTTP/2 upstreams (C{h2c://}, C{h2://}) and gRPC calls go on a stream of a multiplexed
HTTP/2 connection instead (L{H2Exchange} over L{portal.tunnel.h2upstream}).

With C{--app}, each request first goes through the app gateway (L{portal.gateway.access.Gateway}):
it picks the app by host, and either answers itself (401, 403, the gateway's own pages, ...; nothing
reaches the app, no upstream connection is opened) or admits the request with its headers edited
(visitors' C{X-Ptl-*} headers and credentials removed, the app's identity headers added). The body is
held in the socket while the gateway decides, or read whole first (up to
L{portal.gateway.access.MAX_BODY}) when the gateway needs it.
"""

from __future__ import annotations

import html
import re
import typing
from collections import deque
from typing import Any, cast

import attrs
import httptools
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.error import TimeoutError
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.ssl import CertificateOptions
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from portal.forwarding.quietconnect import connectQuietly
from portal.forwarding.splice import IForwardingTransport, noDelay, pauseReading, resumeReading
from portal.forwarding.tcpendpoint import tcpEndpoint
from portal.gateway.access import MAX_BODY, Admitted, Gateway, page
from portal.gateway.basicauth import BasicAuth
from portal.gateway.caller import GatewayRequest, GatewayResponse
from portal.gateway.routes import Match, RouteTable, Upstream, isGRPC
from portal.tunnel.h2upstream import (
    H2UpstreamConnection,
    H2UpstreamPool,
    H2UpstreamStream,
    requestHeaders,
)
from portal.tunnel.inspector import Capture, Finished, Inspector
from portal.tunnel.report import Reporter
from portal.tunnel.tlswrapper import closePromptly
from portal.wire.attach import StreamHeader
from portal.wire.httpheaders import HOP_BY_HOP

#: Seconds to connect to an upstream.
CONNECT_TIMEOUT = 10.0
#: Seconds an upstream may take to start its response.
RESPONSE_TIMEOUT = 60.0
#: Seconds a visitor connection with no request in flight may stay silent.
IDLE_TIMEOUT = 120.0
#: Idle upstream connections kept per target: enough for the requests in flight of a few HTTP/2
#: visitors (each request has an upstream connection of its own while it runs; a browser opens up
#: to 100 streams on a connection), so that busy multiplexed visitors do not open and close an
#: upstream connection per request.
MAX_IDLE_PER_UPSTREAM = 256
#: Body bytes of one exchange after which the two transports are linked as each other's producers.
LINK_THRESHOLD = 64 * 1024
#: Largest request head (request line and headers) accepted.
MAX_HEAD_BYTES = 64 * 1024
#: An RFC 9110 token.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_STATUS = {
    101: b"Switching Protocols",
    200: b"OK",
    204: b"No Content",
    304: b"Not Modified",
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    413: b"Content Too Large",
    421: b"Misdirected Request",
    500: b"Internal Server Error",
    502: b"Bad Gateway",
    504: b"Gateway Timeout",
}


def _connectionTokens(headers: list[tuple[bytes, bytes]]) -> set[bytes]:
    """
    @return: The lowercased tokens of every C{Connection} header.
    """
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b","))
    return tokens


def _endToEnd(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """
    @return: C{headers} without hop-by-hop headers and those named in C{Connection}.
    """
    drop = HOP_BY_HOP | _connectionTokens(headers)
    return [(n, v) for n, v in headers if n.lower() not in drop]


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """
    @return: The first value of header C{name} (lowercase), or L{None}.
    """
    for n, v in headers:
        if n.lower() == name:
            return v
    return None


def _forwardedValue(value: bytes) -> bytes:
    """
    @return: C{value} as a C{Forwarded} parameter value (RFC 7239): a token when it is one, else a
        quoted string, so that a visitor's C{Host} cannot add parameters.
    """
    if _TOKEN.fullmatch(value):
        return value
    return b'"%s"' % value.replace(b"\\", b"\\\\").replace(b'"', b'\\"')


def gatewayRequest(exchange: Exchange, header: StreamHeader) -> GatewayRequest:
    """
    @param exchange: A request whose head is complete.
    @param header: The stream header of the visitor's connection.
    @return: What the app gateway sees of it (without its body): the C{Host} header (HTTP/2's
        C{:authority} arrives as one) is the authority.
    """
    return GatewayRequest(
        method=exchange.method,
        authority=_header(exchange.headers, b"host") or b"",
        path=exchange.url,
        headers=tuple((name.lower(), value) for name, value in exchange.headers),
        peer=(header.peerHost, header.peerPort),
    )


def tooLarge() -> GatewayResponse:
    """
    @return: The gateway's answer to a body it should hold whole and that is over
        L{MAX_BODY}.
    """
    return page(
        413,
        f"The request body is larger than the {MAX_BODY // 1024} KiB the gateway reads before "
        "deciding whether it may reach the app.",
    )


def _chunk(data: bytes) -> bytes:
    """
    @return: C{data} as one chunk of a chunked body.
    """
    return b"%x\r\n%s\r\n" % (len(data), data)


class ExchangeVisitor(typing.Protocol):
    """
    What an L{UpstreamConnection} needs of the visitor side of an exchange: L{VisitorHTTP} for HTTP/1.1,
    L{portal.tunnel.http2.H2Visitor} for one HTTP/2 request.
    """

    framesBodies: bool
    transport: Any
    _proxy: HTTPProxy
    _lost: bool
    _closeAfter: bool

    def writeHead(
        self, exchange: Exchange, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]
    ) -> None:
        """
        Send the response head.
        """

    def writeBody(self, exchange: Exchange, data: bytes, payload: int | None = None) -> None:
        """
        Send response body bytes.
        """

    def finished(self, exchange: Exchange) -> None:
        """
        The exchange is complete.
        """

    def upgraded(self, upstream: UpstreamConnection) -> None:
        """
        The upstream accepted an upgrade.
        """

    def requestHead(self, exchange: Exchange) -> bytes:
        """
        The request head to send upstream.
        """

    def requestHeaders(self, exchange: Exchange) -> list[tuple[bytes, bytes]]:
        """
        The request headers to send upstream.
        """

    def writeTrailers(self, exchange: Exchange, trailers: list[tuple[bytes, bytes]]) -> None:
        """
        Send the response's trailers with its end (HTTP/2 visitors only).
        """

    def pendingBody(self, exchange: Exchange) -> bytes:
        """
        Body bytes held until the upstream was connected.
        """

    def _respondLocally(self, exchange: Exchange, status: int, message: str) -> None:
        """
        Answer with a page of the tunnel's own.
        """


class Exchange:
    """
    One request and its response.
    """

    def __init__(self, client: str = "", capture: Capture | None = None) -> None:
        """
        @param client: The visitor's address, as the relay reported it.
        @param capture: Where the request inspector collects this exchange, when it runs.
        """
        self.client = client
        self.capture = capture
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.method = b""
        self.version = "1.1"
        self.keepAlive = True
        self.upgrade = False
        self.headComplete = False
        self.match: Match | None = None
        self.body: list[bytes] = []
        #: Bytes in L{body}.
        self.held = 0
        self.bodyDone = False
        self.chunkedUpstream = False
        self.upstream: UpstreamConnection | H2Exchange | None = None
        self.started = 0.0
        self.status = 0
        self.sent = 0
        self.headBytes = 0
        #: The app's routes, once the gateway admitted the request (C{--app}).
        self.table: RouteTable | None = None
        #: Whether the gateway admitted the request.
        self.admitted = False
        #: Headers the gateway adds, sent after the proxy's own filtering.
        self.gatewayHeaders: list[tuple[bytes, bytes]] = []
        #: Whether the whole body is read before the gateway decides.
        self.buffering = False
        #: Whether the gateway's decision waits for the end of the body.
        self.awaitingBody = False

    def forwardBody(self, data: bytes) -> bool:
        """
        Send a piece of the request body upstream (chunk-framed if need be), or hold it until the
        upstream connection is made.

        @return: Whether it went upstream.
        """
        upstream = self.upstream
        if upstream is not None and upstream.ready:
            upstream.sendBody(self, data)
            return True
        self.body.append(data)
        self.held += len(data)
        return False

    def endBody(self) -> None:
        """
        The request body is complete: end the chunked framing upstream if it was sent that way.
        """
        self.bodyDone = True
        upstream = self.upstream
        if upstream is not None and upstream.ready:
            upstream.endBody(self)


class HTTPProxy:
    """
    What every visitor connection of one routed-HTTP tunnel shares: the routes, the upstream pool, the
    reporter, and with C{--app} the app gateway.

    @ivar table: The routes of C{--http-route} (L{None} with C{--app}: each app has its own).
    @ivar gateway: The app gateway, or L{None} without C{--app}.
    @ivar tables: Each app's routes, by app name.
    @ivar basicAuth: The HTTP Basic authentication every request must pass, or L{None}.
    @ivar inspector: The request inspector every finished exchange goes to, or L{None}; it may be
        set after construction.
    """

    inspector: Inspector | None = None

    def __init__(
        self,
        reactor: Any,
        table: RouteTable | None,
        reporter: Reporter | None,
        gateway: Gateway | None = None,
        basicAuth: BasicAuth | None = None,
    ) -> None:
        self.reactor = reactor
        self.basicAuth = basicAuth
        self.table = table
        self.reporter = reporter
        self.pool = UpstreamPool(reactor)
        self.gateway = gateway
        self.tables = (
            {}
            if gateway is None
            else {name: RouteTable(app.routes) for name, app in gateway.apps.items()}
        )

    def tableFor(self, exchange: Exchange) -> RouteTable:
        """
        @return: The routes for C{exchange}: its app's, or the tunnel's.
        """
        table = exchange.table or self.table
        assert table is not None, "with --app a request is routed only once admitted"
        return table

    def admit(self, exchange: Exchange, admitted: Admitted) -> None:
        """
        Apply the gateway's decision to a request it admitted: its app's routes, and its headers
        edited.
        """
        exchange.admitted = True
        exchange.table = self.tables[admitted.app.name]
        exchange.headers = admitted.edits.stripped(exchange.headers)
        exchange.gatewayHeaders = list(admitted.edits.add)

    def newCapture(self) -> Capture | None:
        """
        @return: A capture for a new exchange while the inspector runs, else L{None}.
        """
        return None if self.inspector is None else Capture()

    def authorize(self, exchange: Exchange, header: StreamHeader) -> GatewayResponse | None:
        """
        Check a request's credentials (C{--basic-auth}) before it is routed; the C{Authorization}
        header that passed is not forwarded.

        @return: L{None} to route the request, else the answer to send instead.
        """
        if self.basicAuth is None:
            return None
        refusal = self.basicAuth.check(exchange.headers, header.peerHost)
        if refusal is None:
            exchange.headers = [h for h in exchange.headers if h[0].lower() != b"authorization"]
        return refusal

    def protocolFor(self, header: StreamHeader) -> VisitorHTTP:
        """
        @param header: The stream header of the visitor's data session.
        @return: The protocol serving the decrypted visitor stream.
        """
        return VisitorHTTP(self, header)

    def logRequest(self, exchange: Exchange) -> None:
        """
        Report one finished request (method, path, status, bytes, milliseconds, route).
        """
        if self.reporter is None:
            return
        route = exchange.match.route if exchange.match else None
        self.reporter.request(
            method=exchange.method.decode("latin-1"),
            path=exchange.url.decode("latin-1"),
            status=exchange.status,
            bytes=exchange.sent,
            ms=(self.reactor.seconds() - exchange.started) * 1000,
            route=route.prefix if route else None,
            upstream=route.upstream.authority if route else None,
            client=exchange.client or None,
        )
        if self.inspector is not None and exchange.capture is not None:
            upstream = route.upstream if route else None
            self.inspector.keep(
                Finished(
                    client=exchange.client,
                    method=exchange.method,
                    path=exchange.url,
                    version=exchange.version,
                    requestHeaders=exchange.headers,
                    status=exchange.status,
                    ms=(self.reactor.seconds() - exchange.started) * 1000,
                    route=route.prefix if route else None,
                    upstream=None
                    if upstream is None
                    else (upstream.host, upstream.port, upstream.tls),
                    upstreamPath=exchange.match.upstreamPath if exchange.match else None,
                    capture=exchange.capture,
                )
            )


class ExchangeAnswers:
    """
    What both kinds of visitor (L{VisitorHTTP}, L{portal.tunnel.http2.H2Visitor}) do alike: build the
    upstream request and answer with a page of the tunnel's own.

    Subclasses provide C{_header} (the stream header), C{_closeAfter}, C{writeHead}, C{writeBody} and
    C{finished}.
    """

    _header: StreamHeader
    _closeAfter: bool

    def writeHead(
        self, exchange: Exchange, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]
    ) -> None:
        """
        Send the response head.
        """
        raise NotImplementedError()

    def writeBody(self, exchange: Exchange, data: bytes, payload: int | None = None) -> None:
        """
        Send response body bytes.
        """
        raise NotImplementedError()

    def finished(self, exchange: Exchange) -> None:
        """
        The exchange is complete.
        """
        raise NotImplementedError()

    def requestHead(self, exchange: Exchange) -> bytes:
        """
        The request head to send upstream over HTTP/1.1: L{requestHeaders}, framed.
        """
        match = exchange.match
        assert match is not None
        headers = self.requestHeaders(exchange)
        if exchange.chunkedUpstream:
            headers.append((b"Transfer-Encoding", b"chunked"))
        lines = [b"%s %s HTTP/1.1" % (exchange.method, match.upstreamPath.encode("latin-1"))]
        lines += [b"%s: %s" % (n, v) for n, v in headers]
        return b"\r\n".join(lines) + b"\r\n\r\n"

    def requestHeaders(self, exchange: Exchange) -> list[tuple[bytes, bytes]]:
        """
        The request headers to send upstream: hop-by-hop headers removed, forwarding headers added.
        """
        match = exchange.match
        assert match is not None
        headers = _endToEnd(exchange.headers)
        if exchange.upgrade:
            headers += [(b"Connection", b"Upgrade")]
            upgrade = _header(exchange.headers, b"upgrade")
            if upgrade is not None:
                headers.append((b"Upgrade", upgrade))
        peer = self._header.peerHost.encode("latin-1")
        host = _header(exchange.headers, b"host") or b""
        if match.route.rewriteHost:
            # The visitor's Host still travels in X-Forwarded-Host and Forwarded.
            headers = [(n, v) for n, v in headers if n.lower() != b"host"]
            headers.append((b"Host", match.route.upstream.authority.encode("latin-1")))
        forwardedFor = _header(exchange.headers, b"x-forwarded-for")
        headers = [
            (n, v)
            for n, v in headers
            if n.lower() not in (b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host")
        ]
        headers.append((b"X-Forwarded-For", forwardedFor + b", " + peer if forwardedFor else peer))
        headers.append((b"X-Forwarded-Proto", b"https"))
        if host:
            headers.append((b"X-Forwarded-Host", host))
        forNode = b'"[%s]"' % peer if b":" in peer else peer
        hostParam = b"host=%s;" % _forwardedValue(host) if host else b""
        headers.append((b"Forwarded", b"for=%s;%sproto=https" % (forNode, hostParam)))
        if match.strippedPrefix is not None:
            headers.append((b"X-Forwarded-Prefix", match.strippedPrefix.encode("latin-1")))
        # After the filtering above, so that a visitor's Connection header cannot remove them.
        headers += exchange.gatewayHeaders
        return headers

    def writeTrailers(self, exchange: Exchange, trailers: list[tuple[bytes, bytes]]) -> None:
        """
        Send the response's trailers with its end. Only visitors that frame bodies themselves
        (HTTP/2) are asked; an HTTP/1.1 visitor gets them in its chunked body (L{H2Exchange}).
        """
        raise NotImplementedError()

    def pendingBody(self, exchange: Exchange) -> bytes:
        """
        Body bytes held while the upstream connection was being made, framed for upstream.
        """
        held, exchange.body = exchange.body, []
        exchange.held = 0
        data = b"".join(_chunk(b) for b in held) if exchange.chunkedUpstream else b"".join(held)
        if exchange.bodyDone and exchange.chunkedUpstream:
            data += b"0\r\n\r\n"
        return data

    def _respondLocally(self, exchange: Exchange, status: int, message: str) -> None:
        """
        Answer with a small page of our own (404, 502, 504).
        """
        reason = _STATUS.get(status, b"Error")
        body = (
            f"<!doctype html><meta charset=utf-8><title>{status}</title>"
            f"<h1>{status} {reason.decode()}</h1><p>{html.escape(message)}</p>"
            "<p><small>portal tunnel</small></p>\n"
        ).encode()
        self._respondWith(
            exchange,
            GatewayResponse(status, ((b"Content-Type", b"text/html; charset=utf-8"),), body),
        )

    def _respondWith(self, exchange: Exchange, response: GatewayResponse) -> None:
        """
        Answer with a response of the tunnel's own (a page, or the app gateway's answer).
        """
        if not exchange.bodyDone or exchange.upgrade:
            # The request body was not read, or the parser stopped at an upgrade: the connection
            # cannot be reused.
            self._closeAfter = True
        headers = [
            (name, value)
            for name, value in response.headers
            if name.lower() not in (b"content-length", b"connection", b"transfer-encoding")
        ]
        headers.append((b"Content-Length", b"%d" % len(response.body)))
        if exchange.capture is not None:
            exchange.capture.head(headers)
            exchange.capture.response(response.body)
        self.writeHead(exchange, response.status, _STATUS.get(response.status, b"Error"), headers)
        self.writeBody(exchange, response.body if exchange.method != b"HEAD" else b"")
        self.finished(exchange)


class VisitorHTTP(ExchangeAnswers, Protocol, TimeoutMixin):
    """
    The visitor's side: parses requests and writes responses, in order. A connection with no request
    in flight is closed after L{IDLE_TIMEOUT} seconds without bytes from the visitor.

    @cvar framesBodies: Whether the visitor's protocol delimits bodies itself (HTTP/2); HTTP/1.1
        visitors get chunked or close-delimited bodies when the upstream gives no length.
    """

    framesBodies = False

    _log = Logger()

    def __init__(self, proxy: HTTPProxy, header: StreamHeader) -> None:
        self._proxy = proxy
        self._header = header
        # TimeoutMixin schedules on the global reactor unless told otherwise.
        self.callLater = proxy.reactor.callLater  # type: ignore[method-assign]
        self._parser = httptools.HttpRequestParser(self)
        self._parsing: Exchange | None = None
        self._current: Exchange | None = None
        self._queue: deque[Exchange] = deque()
        self._raw: UpstreamConnection | None = None
        self._upgradeBuffer: list[bytes] | None = None
        self._lost = False
        self._closeAfter = False
        self._refused = False
        self._connecting = False
        self._headBytes = 0

    # Transport events.

    def connectionMade(self) -> None:
        """
        Start the idle timer.
        """
        self.setTimeout(IDLE_TIMEOUT)

    def timeoutConnection(self) -> None:
        """
        Close an idle keep-alive connection; one with a request in flight (a long poll, an event
        stream) is left alone.
        """
        if self._current is not None or self._raw is not None:
            self.setTimeout(IDLE_TIMEOUT)
            return
        self._log.info("closing idle connection from {peer}", peer=self._header.peerHost)
        assert self.transport is not None
        closePromptly(self.transport)

    def dataReceived(self, data: bytes) -> None:
        """
        Feed the parser, or pass bytes on once the connection was upgraded.
        """
        self.resetTimeout()
        if self._raw is not None:
            assert self._raw.transport is not None
            self._raw.transport.write(data)
            return
        if self._upgradeBuffer is not None:
            self._upgradeBuffer.append(data)
            return
        if self._refused:
            # The parser stopped at an error; the connection is closing.
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            self._upgradeBuffer = [data[e.args[0] :]]
        except httptools.HttpParserError as e:
            # An error raised by a callback (the head size check) arrives wrapped: report it.
            cause = e.__context__ if isinstance(e.__context__, httptools.HttpParserError) else e
            self._badRequest(f"malformed request: {cause}")

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """
        Drop what is in flight.
        """
        self._lost = True
        self.setTimeout(None)
        for exchange in [self._current, *self._queue]:
            if exchange is not None and exchange.upstream is not None:
                exchange.upstream.abandon()
        if self._raw is not None and self._raw.transport is not None:
            self._raw.transport.loseConnection()

    # Parser callbacks.

    def on_message_begin(self) -> None:
        """
        A new request: answer it now, or after those before it (pipelining).
        """
        exchange = Exchange(self._header.peerHost, self._proxy.newCapture())
        exchange.started = self._proxy.reactor.seconds()
        self._parsing = exchange
        self._headBytes = 0
        if self._current is None:
            self._current = exchange
        else:
            self._queue.append(exchange)
            assert self.transport is not None
            pauseReading(self.transport)

    def on_url(self, url: bytes) -> None:
        """
        Accumulate the request target.
        """
        assert self._parsing is not None
        self._parsing.url += url
        self._checkHeadSize(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        """
        Accumulate a header.
        """
        assert self._parsing is not None
        self._parsing.headers.append((name, value))
        self._checkHeadSize(len(name) + len(value) + 4)

    def _checkHeadSize(self, more: int) -> None:
        """
        Refuse request heads larger than L{MAX_HEAD_BYTES}.
        """
        self._headBytes += more
        if self._headBytes > MAX_HEAD_BYTES:
            raise httptools.HttpParserError("request head too large")

    def on_headers_complete(self) -> None:
        """
        The head is complete: start the exchange if it is first in line.
        """
        exchange = self._parsing
        assert exchange is not None
        parser = self._parser
        exchange.method = parser.get_method()
        exchange.version = parser.get_http_version()
        exchange.keepAlive = parser.should_keep_alive()
        exchange.upgrade = parser.should_upgrade()
        exchange.headComplete = True
        length = _header(exchange.headers, b"content-length")
        exchange.chunkedUpstream = length is None and (
            _header(exchange.headers, b"transfer-encoding") is not None
        )
        # Known now, so that a local answer given before on_message_complete keeps the connection.
        exchange.bodyDone = not exchange.chunkedUpstream and int(length or 0) == 0
        if exchange is self._current:
            self._start(exchange)

    def on_body(self, body: bytes) -> None:
        """
        Forward (or hold) a piece of the request body.
        """
        exchange = self._parsing
        assert exchange is not None
        if exchange.capture is not None:
            exchange.capture.request(body)
        if exchange.buffering:
            # Read whole for the gateway, within its limit.
            exchange.body.append(body)
            exchange.held += len(body)
            if exchange.held > MAX_BODY and not exchange.status:
                self._refused = True
                self._respondWith(exchange, tooLarge())
            return
        exchange.forwardBody(body)

    def on_message_complete(self) -> None:
        """
        The request body is complete: the gateway may decide now if it waited for it.
        """
        exchange = self._parsing
        assert exchange is not None
        exchange.endBody()
        if exchange.awaitingBody and not exchange.status:
            exchange.awaitingBody = False
            self._admit(exchange)

    # Exchanges.

    def _start(self, exchange: Exchange) -> None:
        """
        Route the request and get an upstream connection for it; with C{--app}, ask the gateway
        first.
        """
        refusal = None if exchange.admitted else self._proxy.authorize(exchange, self._header)
        if refusal is not None:
            self._respondWith(exchange, refusal)
            return
        if self._proxy.gateway is not None and not exchange.admitted:
            self._admit(exchange)
            return
        table = self._proxy.tableFor(exchange)
        match = table.match(exchange.url.decode("latin-1"))
        if match is None:
            prefixes = ", ".join(html.escape(p) for p in table.prefixes())
            self._respondLocally(exchange, 404, f"No route for this path. Routes: {prefixes}")
            return
        exchange.match = match
        transport = self.transport
        assert transport is not None
        idle = self._proxy.pool.takeIdle(match.route.upstream, exchange)
        if idle is not None:
            # The common case with keep-alive: no Deferred, no pause.
            exchange.upstream = idle
            idle.begin(self, exchange)
            return
        # Hold the request body in the socket, not in memory, until the upstream is connected.
        pauseReading(transport)
        self._connecting = True
        d = self._proxy.pool.get(match.route.upstream, exchange)

        def connected(upstream: UpstreamConnection | H2Exchange) -> None:
            self._connecting = False
            if self._lost or exchange.status:
                # Gone, or already answered (a malformed body): the request was never sent.
                self._proxy.pool.release(upstream, reusable=True)
                return
            exchange.upstream = upstream
            upstream.begin(self, exchange)
            if not self._queue:
                resumeReading(transport)

        def failed(failure: Failure) -> None:
            self._connecting = False
            if self._lost or exchange.status:
                return
            target = match.route.upstream.authority
            if failure.check(TimeoutError, CancelledError):
                self._respondLocally(
                    exchange, 504, f"Route {match.route.prefix} -> {target}: no answer in time."
                )
            else:
                self._respondLocally(
                    exchange,
                    502,
                    f"Route {match.route.prefix} -> {target}: {failure.getErrorMessage()}",
                )

        d.addCallbacks(connected, failed)

    def _admit(self, exchange: Exchange) -> None:
        """
        Ask the app gateway about a request, holding its body meanwhile: in the socket, or read
        whole first when the gateway needs it (L{Gateway.wantsBody}).
        """
        gateway = self._proxy.gateway
        assert gateway is not None and self.transport is not None
        request = gatewayRequest(exchange, self._header)
        if not exchange.buffering and gateway.wantsBody(request):
            length = _header(exchange.headers, b"content-length")
            if (length is not None and int(length) > MAX_BODY) or exchange.held > MAX_BODY:
                self._refused = True
                self._respondWith(exchange, tooLarge())
                return
            exchange.buffering = True
            if not exchange.bodyDone:
                exchange.awaitingBody = True
                expect = _header(exchange.headers, b"expect") or b""
                if expect.lower() == b"100-continue" and exchange.version == "1.1":
                    self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                return
        if exchange.buffering:
            request = attrs.evolve(request, body=b"".join(exchange.body))
        else:
            # Hold the request body in the socket, not in memory, until the gateway decided.
            pauseReading(self.transport)
            self._connecting = True
        gateway.decide(request, self._header.hostname).addCallback(self._decided, exchange)

    def _decided(self, decision: Admitted | GatewayResponse, exchange: Exchange) -> None:
        """
        The gateway decided: answer as it said, or forward the request as it edited it.
        """
        transport = self.transport
        assert transport is not None
        self._connecting = False
        if self._lost or exchange.status:
            return
        if isinstance(decision, GatewayResponse):
            self._respondWith(exchange, decision)
            return
        self._proxy.admit(exchange, decision)
        self._start(exchange)
        if not self._connecting and not self._queue and not self._lost:
            resumeReading(transport)

    def writeHead(
        self, exchange: Exchange, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]
    ) -> None:
        """
        Write a response head to the visitor.
        """
        exchange.status = status
        keep = exchange.keepAlive and not self._closeAfter
        if not keep:
            self._closeAfter = True
        lines = [b"HTTP/1.1 %d %s" % (status, reason)]
        lines += [b"%s: %s" % (n, v) for n, v in headers]
        if status != 101:
            lines.append(b"Connection: keep-alive" if keep else b"Connection: close")
        assert self.transport is not None
        self.transport.write(b"\r\n".join(lines) + b"\r\n\r\n")

    def writeBody(self, exchange: Exchange, data: bytes, payload: int | None = None) -> None:
        """
        Write response body bytes to the visitor.

        @param payload: How many of C{data}'s bytes are body (without chunk framing), for the log.
        """
        exchange.sent += len(data) if payload is None else payload
        assert self.transport is not None
        self.transport.write(data)

    def finished(self, exchange: Exchange) -> None:
        """
        An exchange is complete: log it, then go on with the next one or close.
        """
        self._proxy.logRequest(exchange)
        if exchange is not self._current:
            return
        self._current = None
        transport = self.transport
        assert transport is not None
        if self._closeAfter or self._lost:
            closePromptly(transport)
            return
        if self._queue:
            self._current = self._queue.popleft()
            if self._current.headComplete:
                self._start(self._current)
        if not self._queue and not self._connecting:
            resumeReading(transport)

    def upgraded(self, upstream: UpstreamConnection) -> None:
        """
        The upstream accepted an upgrade: pass raw bytes both ways from now on.
        """
        self._raw = upstream
        upstream.link()
        held, self._upgradeBuffer = self._upgradeBuffer or [], None
        assert upstream.transport is not None
        for data in held:
            if data:
                upstream.transport.write(data)

    def _badRequest(self, reason: str) -> None:
        """
        A request the parser refused: 400 and close.
        """
        self._log.info(
            "bad request from {peer}: {reason}", peer=self._header.peerHost, reason=reason
        )
        self._closeAfter = True
        self._refused = True
        current = self._current
        if current is not None and (current is not self._parsing or current.bodyDone):
            # The bad request waits behind one still being answered: finish that one, then close.
            self._queue.clear()
            return
        exchange = current or Exchange(self._header.peerHost, self._proxy.newCapture())
        if exchange.status:
            assert self.transport is not None
            closePromptly(self.transport)
            return
        if exchange.upstream is not None:
            # Its head (and part of its body) went upstream: that connection cannot be reused.
            exchange.upstream.abandon()
        self._respondLocally(exchange, 400, reason)


def answerFailure(
    visitor: ExchangeVisitor, exchange: Exchange, upstream: Upstream, status: int, message: str
) -> None:
    """
    An upstream broke an exchange: answer C{status} with a page naming the route if nothing was
    answered yet, else cut the visitor off (a truncated response must not look whole).
    """
    match = exchange.match
    assert match is not None
    if not exchange.status:
        visitor._respondLocally(
            exchange, status, f"Route {match.route.prefix} -> {upstream.authority}: {message}"
        )
    elif visitor.transport is not None:
        closePromptly(visitor.transport)


class UpstreamConnection(Protocol):
    """
    One persistent connection to an upstream; carries one exchange at a time.
    """

    _log = Logger()

    def __init__(self, pool: UpstreamPool, upstream: Upstream) -> None:
        self._pool = pool
        self.upstream = upstream
        self._visitor: ExchangeVisitor | None = None
        self._exchange: Exchange | None = None
        self._parser: Any = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._chunked = False
        self._untilClose = False
        self._raw = False
        self._timer: Any = None
        self._interim = False
        self._linked = False
        self._bodyBytes = 0
        self.lost = False

    def connectionMade(self) -> None:
        """
        Send small writes at once.
        """
        noDelay(self.transport)

    @property
    def ready(self) -> bool:
        """
        Whether request body bytes can be written now.
        """
        return self.transport is not None

    def sendBody(self, exchange: Exchange, data: bytes) -> None:
        """
        Write a piece of C{exchange}'s request body, chunk-framed if the request is sent that way.
        """
        assert self.transport is not None
        self.bodyProgress(len(data))
        self.transport.write(_chunk(data) if exchange.chunkedUpstream else data)

    def endBody(self, exchange: Exchange) -> None:
        """
        C{exchange}'s request body is complete: end the chunked framing if it was sent that way.
        """
        if exchange.chunkedUpstream and self.transport is not None:
            self.transport.write(b"0\r\n\r\n")

    def begin(self, visitor: ExchangeVisitor, exchange: Exchange) -> None:
        """
        Send C{exchange}'s request and stream its body; responses go back to C{visitor}.
        """
        self._visitor = visitor
        self._exchange = exchange
        self._parser = httptools.HttpResponseParser(self)
        self._headers = []
        transport = cast(IForwardingTransport, self.transport)
        visitorTransport = cast(IForwardingTransport, visitor.transport)
        assert transport is not None and visitorTransport is not None
        transport.write(visitor.requestHead(exchange) + visitor.pendingBody(exchange))
        self._linked = False
        self._bodyBytes = 0
        self._timer = self._pool.reactor.callLater(RESPONSE_TIMEOUT, self._timedOut)

    def link(self) -> None:
        """
        Make each side's transport the producer of what the other consumes, so a slow reader on
        either side pauses the writer. Done once a body grows past L{LINK_THRESHOLD} (small exchanges
        need no flow control: what they can buffer is bounded), and for upgraded connections.
        """
        if self._linked or self._visitor is None:
            return
        self._linked = True
        transport = cast(IForwardingTransport, self.transport)
        visitorTransport = cast(IForwardingTransport, self._visitor.transport)
        transport.registerProducer(visitorTransport, True)
        visitorTransport.registerProducer(transport, True)

    def bodyProgress(self, count: int) -> None:
        """
        Count body bytes of this exchange (both directions); link producers past the threshold.
        """
        self._bodyBytes += count
        if self._bodyBytes > LINK_THRESHOLD:
            self.link()

    def _endExchange(self) -> None:
        """
        Undo the producer links of the finished exchange.
        """
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if not self._linked:
            return
        self._linked = False
        visitor = self._visitor
        if visitor is not None and visitor.transport is not None and not visitor._lost:
            cast(IForwardingTransport, visitor.transport).unregisterProducer()
            resumeReading(visitor.transport)
        if self.transport is not None and not self.lost:
            cast(IForwardingTransport, self.transport).unregisterProducer()
            resumeReading(self.transport)

    def _timedOut(self) -> None:
        """
        No response head in time: 504, and this connection is not reused.
        """
        self._timer = None
        exchange, visitor = self._exchange, self._visitor
        if exchange is None or visitor is None or exchange.status:
            return
        self._endExchange()
        self._exchange = None
        assert self.transport is not None
        self.transport.loseConnection()
        match = exchange.match
        assert match is not None
        visitor._respondLocally(
            exchange,
            504,
            f"Route {match.route.prefix} -> {self.upstream.authority}: no response in "
            f"{RESPONSE_TIMEOUT:.0f} s.",
        )

    def abandon(self) -> None:
        """
        The visitor went away mid-exchange: this connection's state is unknown, close it.
        """
        self._endExchange()
        self._exchange = None
        if self.transport is not None:
            self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        """
        Parse the response, or pass raw bytes after an upgrade.
        """
        visitor = self._visitor
        if self._raw:
            if visitor is not None and visitor.transport is not None:
                visitor.transport.write(data)
            return
        if self._parser is None or self._exchange is None:
            # Bytes from an idle connection: it cannot be trusted any more.
            assert self.transport is not None
            self.transport.loseConnection()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            rest = data[e.args[0] :]
            self._raw = True
            if visitor is not None:
                visitor.upgraded(self)
                if rest and visitor.transport is not None:
                    visitor.transport.write(rest)
        except httptools.HttpParserError as e:
            self._log.warn(
                "bad response from {upstream}: {error}",
                upstream=self.upstream.authority,
                error=str(e),
            )
            self._fail("the upstream sent a malformed response")

    def on_header(self, name: bytes, value: bytes) -> None:
        """
        Accumulate a response header.
        """
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        """
        Write the response head to the visitor, choosing the framing.
        """
        exchange, visitor = self._exchange, self._visitor
        assert exchange is not None and visitor is not None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        status = self._parser.get_status_code()
        headers = _endToEnd(self._headers)
        reason = _STATUS.get(status, b"Status")
        if 100 <= status < 200 and status != 101:
            # An interim response (100 Continue, 103 Early Hints): pass it on; the real one follows.
            self._interim = True
            lines = [b"HTTP/1.1 %d %s" % (status, reason)] + [b"%s: %s" % h for h in headers]
            assert visitor.transport is not None
            visitor.transport.write(b"\r\n".join(lines) + b"\r\n\r\n")
            self._headers = []
            return
        if exchange.upgrade and status != 101:
            # The visitor's parser stopped at the upgrade request: this connection ends here.
            visitor._closeAfter = True
        if status == 101 and exchange.upgrade:
            upgrade = _header(self._headers, b"upgrade") or b""
            visitor.writeHead(
                exchange,
                101,
                reason,
                headers + [(b"Connection", b"Upgrade"), (b"Upgrade", upgrade)],
            )
            # llhttp calls on_message_complete before raising HttpParserUpgrade: mark the
            # connection raw now so that the exchange is not completed and the connection is not
            # pooled (and this visitor is not forgotten) while it carries the upgraded stream.
            self._raw = True
            # Its only chance to be reported: the splice that follows is not an HTTP exchange.
            visitor._proxy.logRequest(exchange)
            return
        noBody = exchange.method == b"HEAD" or status in (204, 304) or 100 <= status < 200
        length = _header(self._headers, b"content-length")
        codings = _header(self._headers, b"transfer-encoding") or b""
        self._chunked = self._untilClose = False
        if not noBody and length is None:
            # Without a length the body ends with its last chunk, or else when the upstream closes.
            self._untilClose = codings.split(b",")[-1].strip().lower() != b"chunked"
            if visitor.framesBodies:
                pass  # HTTP/2 ends each response with its own frames.
            elif exchange.version == "1.1":
                self._chunked = True
                headers.append((b"Transfer-Encoding", b"chunked"))
            else:
                visitor._closeAfter = True
        if exchange.capture is not None:
            exchange.capture.head(headers)
        visitor.writeHead(exchange, status, reason, headers)
        if exchange.method == b"HEAD":
            self._complete()

    def on_body(self, body: bytes) -> None:
        """
        Stream a piece of the response body to the visitor.
        """
        exchange, visitor = self._exchange, self._visitor
        if exchange is None or visitor is None:
            return
        self.bodyProgress(len(body))
        if exchange.capture is not None:
            exchange.capture.response(body)
        visitor.writeBody(exchange, _chunk(body) if self._chunked else body, len(body))

    def on_message_complete(self) -> None:
        """
        The response is complete (an interim response is not).
        """
        if self._interim:
            self._interim = False
            return
        if self._exchange is not None and not self._raw:
            self._complete()

    def _complete(self) -> None:
        """
        Finish the exchange; keep the connection for the next one when the upstream allows.
        """
        exchange, visitor = self._exchange, self._visitor
        if exchange is None or visitor is None:
            return
        if self._chunked:
            visitor.writeBody(exchange, b"0\r\n\r\n", 0)
        reusable = bool(self._parser.should_keep_alive()) and exchange.bodyDone
        self._endExchange()
        self._exchange = None
        self._visitor = None
        self._parser = None
        self._pool.release(self, reusable)
        visitor.finished(exchange)

    def _fail(self, message: str) -> None:
        """
        The upstream broke the exchange: 502 if nothing was answered yet, else cut the visitor off.
        """
        exchange, visitor = self._exchange, self._visitor
        self._exchange = None
        self._endExchange()
        if self.transport is not None:
            self.transport.loseConnection()
        if exchange is None or visitor is None:
            return
        answerFailure(visitor, exchange, self.upstream, 502, message)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """
        A close ends a response without length; otherwise it is an error mid-exchange.
        """
        self.lost = True
        self._pool.forget(self)
        visitor = self._visitor
        if self._raw:
            if visitor is not None and visitor.transport is not None:
                closePromptly(visitor.transport)
            return
        if self._exchange is None:
            return
        if self._untilClose and self._exchange.status:
            self._complete()
            return
        self._fail("the upstream closed the connection")


class H2Exchange:
    """
    One exchange forwarded over HTTP/2 (L{portal.tunnel.h2upstream}), seen by the visitor as its
    upstream connection is: the request body goes out on the stream as it arrives, the response comes
    back as it arrives, the stream is the push producer of the visitor's transport (so a slow visitor
    holds back the server's window). Trailers end the response of an HTTP/2 visitor; an HTTP/1.1
    visitor gets them in the trailer section of a chunked body (a response with a length drops them).

    @ivar upstream: The upstream, as the pool keys it (C{http2} set).
    """

    _log = Logger()

    def __init__(self, connection: H2UpstreamConnection, upstream: Upstream) -> None:
        self._connection = connection
        self.upstream = upstream
        self._stream: H2UpstreamStream | None = None
        self._visitor: ExchangeVisitor | None = None
        self._exchange: Exchange | None = None
        self._chunked = False
        self._trailers: list[tuple[bytes, bytes]] = []
        self._producing = False

    @property
    def ready(self) -> bool:
        """
        Whether request body bytes can be sent now.
        """
        return self._stream is not None and not self._stream.done

    def begin(self, visitor: ExchangeVisitor, exchange: Exchange) -> None:
        """
        Open a stream for C{exchange} and send what the visitor sent of its body so far.
        """
        self._visitor, self._exchange = visitor, exchange
        match = exchange.match
        assert match is not None and visitor.transport is not None
        headers = visitor.requestHeaders(exchange)
        authority = _header(headers, b"host") or self.upstream.authority.encode("latin-1")
        scheme = b"https" if self.upstream.tls else b"http"
        path = match.upstreamPath.encode("latin-1")
        stream = self._connection.openStream(
            requestHeaders(exchange.method, scheme, authority, path, headers), self
        )
        self._stream = stream
        stream.writer = visitor.transport
        visitor.transport.registerProducer(stream, True)
        self._producing = True
        held, exchange.body = exchange.body, []
        exchange.held = 0
        for data in held:
            stream.sendBody(data)
        if exchange.bodyDone:
            stream.endBody()

    def sendBody(self, exchange: Exchange, data: bytes) -> None:
        """
        Send a piece of the request body on the stream.
        """
        if self._stream is not None:
            self._stream.sendBody(data)

    def endBody(self, exchange: Exchange) -> None:
        """
        The request body is complete: end the stream's request side.
        """
        if self._stream is not None:
            self._stream.endBody()

    def abandon(self) -> None:
        """
        The visitor went away: reset the stream; the connection's other streams go on.
        """
        stream = self._stream
        self._end()
        if stream is not None:
            stream.cancel()

    def responseHead(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        """
        Write the response head to the visitor, choosing an HTTP/1.1 visitor's framing.
        """
        exchange, visitor = self._exchange, self._visitor
        if exchange is None or visitor is None:
            return
        noBody = exchange.method == b"HEAD" or status in (204, 304)
        if not noBody and not visitor.framesBodies and _header(headers, b"content-length") is None:
            if exchange.version == "1.1":
                self._chunked = True
                headers.append((b"Transfer-Encoding", b"chunked"))
            else:
                visitor._closeAfter = True
        if exchange.capture is not None:
            exchange.capture.head(headers)
        visitor.writeHead(exchange, status, _STATUS.get(status, b"Status"), headers)

    def responseBody(self, data: bytes) -> None:
        """
        Stream a piece of the response body to the visitor.
        """
        exchange, visitor = self._exchange, self._visitor
        if exchange is None or visitor is None:
            return
        if exchange.capture is not None:
            exchange.capture.response(data)
        visitor.writeBody(exchange, _chunk(data) if self._chunked else data, len(data))

    def responseTrailers(self, trailers: list[tuple[bytes, bytes]]) -> None:
        """
        Keep the trailers for the end of the response.
        """
        self._trailers = trailers

    def responseEnded(self) -> None:
        """
        The response is complete: its trailers, then the end.
        """
        exchange, visitor = self._exchange, self._visitor
        self._end()
        if exchange is None or visitor is None:
            return
        if visitor.framesBodies:
            visitor.writeTrailers(exchange, self._trailers)
        elif self._chunked:
            fields = b"".join(b"%s: %s\r\n" % field for field in self._trailers)
            visitor.writeBody(exchange, b"0\r\n" + fields + b"\r\n", 0)
        visitor.finished(exchange)

    def responseFailed(self, status: int, message: str) -> None:
        """
        The stream failed: answer 502 or 504 if nothing was answered yet, else cut the visitor off.
        """
        exchange, visitor = self._exchange, self._visitor
        self._end()
        if exchange is None or visitor is None:
            return
        match = exchange.match
        assert match is not None
        self._log.warn(
            "route {prefix} -> {upstream} (HTTP/2): {message}",
            prefix=match.route.prefix,
            upstream=self.upstream.authority,
            message=message,
        )
        answerFailure(visitor, exchange, self.upstream, status, message)

    def _end(self) -> None:
        """
        The exchange is over: the stream stops producing for the visitor's transport.
        """
        visitor = self._visitor
        self._exchange = None
        if self._producing and visitor is not None and not visitor._lost:
            self._producing = False
            if visitor.transport is not None:
                cast(IForwardingTransport, visitor.transport).unregisterProducer()


class UpstreamPool:
    """
    Persistent upstream connections: HTTP/1.1 ones, idle ones kept per target; HTTP/2 ones
    (L{H2UpstreamPool}) for C{h2c://} and C{h2://} targets and for gRPC requests.
    """

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self._idle: dict[Upstream, list[UpstreamConnection]] = {}
        self.opened = 0
        self.http2 = H2UpstreamPool(reactor)

    def takeIdle(
        self, upstream: Upstream, exchange: Exchange | None = None
    ) -> UpstreamConnection | None:
        """
        @param exchange: The request, if its kind may choose HTTP/2 (a gRPC request).
        @return: An idle connection to C{upstream}, or L{None} (always for HTTP/2).
        """
        if _overHTTP2(upstream, exchange) is not None:
            return None
        idle = self._idle.get(upstream)
        while idle:
            connection = idle.pop()
            if not connection.lost:
                return connection
        return None

    def get(
        self, upstream: Upstream, exchange: Exchange | None = None
    ) -> Deferred[UpstreamConnection | H2Exchange]:
        """
        @param exchange: The request, if its kind may choose HTTP/2 (a gRPC request).
        @return: An idle connection to C{upstream}, or a new one (within L{CONNECT_TIMEOUT}); or for
            HTTP/2 a stream's exchange on a (possibly new) multiplexed connection.
        """
        http2 = _overHTTP2(upstream, exchange)
        if http2 is not None:
            exchanges = self.http2.connection(http2).addCallback(H2Exchange, http2)
            return cast("Deferred[UpstreamConnection | H2Exchange]", exchanges)
        idle = self._idle.get(upstream)
        while idle:
            connection = idle.pop()
            if not connection.lost:
                return succeed(connection)
        endpoint: Any = tcpEndpoint(self.reactor, upstream.host, upstream.port, CONNECT_TIMEOUT)
        if upstream.tls:
            endpoint = wrapClientTLS(CertificateOptions(verify=False), endpoint)
        self.opened += 1
        d: Deferred[UpstreamConnection | H2Exchange] = connectQuietly(
            endpoint, UpstreamConnection(self, upstream)
        )
        d.addTimeout(CONNECT_TIMEOUT, self.reactor)
        return d

    def release(self, connection: UpstreamConnection | H2Exchange, reusable: bool) -> None:
        """
        Keep a connection whose exchange finished cleanly, or close it; an HTTP/2 exchange that
        never began needs nothing.
        """
        if isinstance(connection, H2Exchange):
            return
        idle = self._idle.setdefault(connection.upstream, [])
        if reusable and not connection.lost and len(idle) < MAX_IDLE_PER_UPSTREAM:
            idle.append(connection)
        elif connection.transport is not None:
            connection.transport.loseConnection()

    def forget(self, connection: UpstreamConnection) -> None:
        """
        A connection closed: it is not idle any more.
        """
        idle = self._idle.get(connection.upstream)
        if idle and connection in idle:
            idle.remove(connection)


def _overHTTP2(upstream: Upstream, exchange: Exchange | None) -> Upstream | None:
    """
    @return: The upstream as the HTTP/2 pool keys it when the request goes over HTTP/2 (the target
        was written C{h2c://} or C{h2://}, or the request is a gRPC call), else L{None}.
    """
    if upstream.http2:
        return upstream
    if exchange is not None and isGRPC(exchange.headers):
        return attrs.evolve(upstream, http2=True)
    return None
