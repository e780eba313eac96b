"""
End to end for routed HTTP mode: real C{twistd portal-relay} and C{portal expose --http-route ...}
processes, real local services (twisted.web, a C{websockets} server) and real clients (curl, Python's
C{http.client} and C{ssl}, the C{websockets} client), all on 127.0.0.1 with ports the OS chose.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import random
import socket
import ssl
import threading
from collections.abc import Iterator
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from tests.realprocesses import (
    WAIT,
    WatchedProcess,
    curl,
    curlProgram,
    homeDir,
    listenLocal,
    requestEvents,
    rss,
    spawn,
    startExpose,
    startRelay,
    waitForLease,
)

#: Size of the large download and upload.
BIG = 256 * 1024 * 1024
#: Size of one piece of the large bodies.
PIECE = 1 << 18
#: Seed of the pseudo-random download body.
DOWNLOAD_SEED = 256
#: Seed of the pseudo-random upload body.
UPLOAD_SEED = 652
#: Largest growth of the tunnel's resident memory allowed while 256 MB pass through it.
RSS_LIMIT = 64 * 1024 * 1024


def _pieces(seed: int, total: int) -> Iterator[bytes]:
    """
    A deterministic pseudo-random body, piece by piece.

    @param seed: Selects the body.
    @param total: Its length.
    @return: Pieces of at most L{PIECE} bytes.
    """
    rng = random.Random(seed)
    left = total
    while left > 0:
        piece = rng.randbytes(min(PIECE, left))
        left -= len(piece)
        yield piece


def _sha256(seed: int, total: int) -> str:
    """
    @return: The sha256 of the body L{_pieces} makes for C{seed} and C{total}.
    """
    digest = hashlib.sha256()
    for piece in _pieces(seed, total):
        digest.update(piece)
    return digest.hexdigest()


def _hostPort(url: str) -> tuple[str, int]:
    """
    Split C{https://host:port}.
    """
    host, _, port = url.removeprefix("https://").partition(":")
    return host, int(port)


class _Echo(Resource):
    """
    Answers every request with JSON naming this service and echoing the request line and headers it
    received, so tests can see what the tunnel forwarded.
    """

    isLeaf = True

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def render(self, request: Any) -> bytes:
        """
        @return: C{{"service", "method", "uri", "headers"}} as JSON; header names lowercase, each
            with the list of its values.
        """
        headers = {
            name.decode().lower(): [v.decode() for v in values]
            for name, values in request.requestHeaders.getAllRawHeaders()
        }
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(
            {
                "service": self.name,
                "method": request.method.decode(),
                "uri": request.uri.decode(),
                "headers": headers,
            }
        ).encode()


class _Download(Resource):
    """
    Streams the L{BIG}-byte body of L{DOWNLOAD_SEED} with a C{Content-Length}, as fast as the
    connection takes it (a pull producer: one piece each time the transport's buffer drains).
    """

    isLeaf = True

    def render_GET(self, request: Any) -> Any:
        """
        Start streaming.
        """
        request.setHeader(b"content-type", b"application/octet-stream")
        request.setHeader(b"content-length", b"%d" % BIG)
        pieces = _pieces(DOWNLOAD_SEED, BIG)
        done = []

        class Producer:
            def resumeProducing(self) -> None:
                piece = next(pieces, None)
                if piece is None:
                    if not done:
                        done.append(True)
                        request.unregisterProducer()
                        request.finish()
                    return
                request.write(piece)

            def stopProducing(self) -> None:
                done.append(True)

        request.registerProducer(Producer(), False)
        return NOT_DONE_YET


class _HashSink:
    """
    The body file of a L{_HashingRequest}: hashes what is written instead of keeping it.
    """

    def __init__(self) -> None:
        self.digest = hashlib.sha256()
        self.length = 0

    def write(self, data: bytes) -> None:
        """
        Hash C{data}.
        """
        self.digest.update(data)
        self.length += len(data)

    def tell(self) -> int:
        """
        @return: Bytes written.
        """
        return self.length

    def seek(self, offset: int, whence: int = 0) -> None:
        """
        Nothing to rewind.
        """

    def read(self, size: int = -1) -> bytes:
        """
        @return: Nothing; the body was not kept.
        """
        return b""

    def close(self) -> None:
        """
        Nothing to release.
        """


class _HashingRequest(Request):
    """
    A request whose body is hashed as it arrives (256 MB are never held in memory or on disk).
    """

    def gotLength(self, length: int | None) -> None:
        """
        Hash the body, whatever its framing.
        """
        self.content = _HashSink()


class _Upload(Resource):
    """
    Answers a request with C{LENGTH SHA256} of the body it received.
    """

    isLeaf = True

    def render_POST(self, request: Any) -> bytes:
        """
        @return: The length and hex sha256 of the body.
        """
        sink = request.content
        return b"%d %s" % (sink.length, sink.digest.hexdigest().encode())


class _Events(Resource):
    """
    A server-sent event stream: writes event C{one}, waits until L{firstSeen} fires (the client got
    that event through the tunnel), then writes event C{two} and ends.  If the client has not got
    the first event after L{GIVE_UP} seconds, the second event says C{timeout} instead.

    @ivar firstSeen: Fired by the client with C{b"two"} once it has the first event.
    """

    isLeaf = True
    GIVE_UP = 10.0

    def __init__(self) -> None:
        super().__init__()
        self.firstSeen: Deferred[bytes] = Deferred()
        self.giveUp: Any = None

    def render_GET(self, request: Any) -> Any:
        """
        Write the first event and keep the response open.
        """
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", b"no-cache")
        request.write(b"event: tick\ndata: one\n\n")
        gone: list[Failure] = []
        request.notifyFinish().addErrback(gone.append)
        self.giveUp = reactor.callLater(self.GIVE_UP, _fireOnce, self.firstSeen, b"timeout")

        def second(word: bytes) -> None:
            if self.giveUp.active():
                self.giveUp.cancel()
            if not gone:
                request.write(b"event: tick\ndata: %s\n\n" % word)
                request.finish()

        self.firstSeen.addCallback(second)
        return NOT_DONE_YET

    def stop(self) -> None:
        """
        Cancel the give-up timer if it is still pending.
        """
        if self.giveUp is not None and self.giveUp.active():
            self.giveUp.cancel()


def _fireOnce(d: Deferred[bytes], value: bytes) -> None:
    """
    Fire C{d} with C{value} unless it has fired already.
    """
    if not d.called:
        d.callback(value)


class _CountingSite(Site):
    """
    A site that counts the TCP connections it accepted.

    @ivar connections: Connections accepted so far.
    """

    connections = 0

    def buildProtocol(self, addr: Any) -> Any:
        """
        Count, then build the usual HTTP channel.
        """
        self.connections += 1
        return super().buildProtocol(addr)


class _Connection(http.client.HTTPSConnection):
    """
    An C{http.client} HTTPS connection to the relay on 127.0.0.1 that sends the lease's hostname as
    SNI and C{Host} (C{*.localhost} names need not resolve on every system) and verifies the
    certificate against the tunnel's CA.
    """

    def __init__(self, url: str, cafile: str, timeout: float = 60) -> None:
        host, port = _hostPort(url)
        super().__init__(
            host, port, timeout=timeout, context=ssl.create_default_context(cafile=cafile)
        )

    def connect(self) -> None:
        """
        Connect to 127.0.0.1 and handshake for the lease's hostname.
        """
        raw = socket.create_connection(("127.0.0.1", self.port), self.timeout)
        self.sock = self._context.wrap_socket(raw, server_hostname=self.host)


def _download(url: str, cafile: str, tunnelPid: int) -> tuple[int, int, str, int]:
    """
    GET C{/download} (after a small warm-up request on the same connection), pausing 1 ms every
    4 MB, while watching the tunnel's resident memory.

    @return: The status, bytes received, their sha256, and the tunnel's largest RSS growth.
    """
    connection = _Connection(url, cafile)
    try:
        connection.request("GET", "/hello")
        connection.getresponse().read()
        baseline = peak = rss(tunnelPid)
        connection.request("GET", "/download")
        response = connection.getresponse()
        digest = hashlib.sha256()
        received = 0
        while data := response.read(1 << 16):
            digest.update(data)
            received += len(data)
            if received % (1 << 22) < len(data):
                peak = max(peak, rss(tunnelPid))
                threading.Event().wait(0.001)
        return response.status, received, digest.hexdigest(), peak - baseline
    finally:
        connection.close()


def _upload(
    url: str, cafile: str, tunnelPid: int, total: int, chunked: bool
) -> tuple[int, bytes, int]:
    """
    POST C{total} bytes of the L{UPLOAD_SEED} body to C{/upload}, with a C{Content-Length} or
    chunked, while watching the tunnel's resident memory.

    @return: The status, the response body, and the tunnel's largest RSS growth.
    """
    connection = _Connection(url, cafile)
    baseline = rss(tunnelPid)
    peak = [baseline]

    def body() -> Iterator[bytes]:
        for index, piece in enumerate(_pieces(UPLOAD_SEED, total)):
            if index % 16 == 0:
                peak[0] = max(peak[0], rss(tunnelPid))
            yield piece

    try:
        headers = {"Content-Type": "application/octet-stream"}
        if chunked:
            headers["Transfer-Encoding"] = "chunked"
        else:
            headers["Content-Length"] = str(total)
        connection.request("POST", "/upload", body=body(), headers=headers, encode_chunked=chunked)
        response = connection.getresponse()
        return response.status, response.read(), peak[0] - baseline
    finally:
        connection.close()


def _get(connection: http.client.HTTPSConnection, path: str) -> tuple[int, bytes, str]:
    """
    GET C{path} on an open connection.

    @return: The status, the body, and the C{Connection} header of the response.
    """
    connection.request("GET", path)
    response = connection.getresponse()
    return response.status, response.read(), response.getheader("Connection", "")


def _sequential(url: str, cafile: str, count: int) -> tuple[list[tuple[int, str]], int]:
    """
    Send C{count} GETs one after another on one client connection.

    @return: Each response's status and echoed URI, and how many TCP connections the client opened.
    """
    connection = _Connection(url, cafile)
    sockets = []
    answers = []
    try:
        for index in range(count):
            status, body, _ = _get(connection, f"/page/{index}")
            answers.append((status, json.loads(body)["uri"]))
            if connection.sock not in sockets:
                sockets.append(connection.sock)
    finally:
        connection.close()
    return answers, len(sockets)


def _events(url: str, cafile: str, firstSeen: Deferred[bytes]) -> tuple[int, str, str, str]:
    """
    Read the event stream at C{/events}: wait for the first event, tell the service (fire
    C{firstSeen} in the reactor thread), then read to the end.

    @return: The status, the content type, the first event, and the rest of the stream.
    """
    connection = _Connection(url, cafile, timeout=30)
    try:
        connection.request("GET", "/events", headers={"Accept": "text/event-stream"})
        response = connection.getresponse()
        first = b""
        while not first.endswith(b"\n\n"):
            line = response.readline()
            if not line:
                break
            first += line
        reactor.callFromThread(_fireOnce, firstSeen, b"two")
        rest = response.read()
        return (
            response.status,
            response.getheader("Content-Type", ""),
            first.decode(),
            rest.decode(),
        )
    finally:
        connection.close()


def _webSocket(url: str, cafile: str, messages: list[str | bytes]) -> tuple[Any, list[Any]]:
    """
    Open a WebSocket at C{/ws/chat} with the C{websockets} client, send each message and read its
    echo.

    @return: The first message the server sent (the path it saw), and the echoes.
    """
    from websockets.sync.client import connect

    host, port = _hostPort(url)
    raw = socket.create_connection(("127.0.0.1", port), timeout=30)
    with connect(
        f"wss://{host}:{port}/ws/chat",
        sock=raw,
        ssl=ssl.create_default_context(cafile=cafile),
        server_hostname=host,
        open_timeout=30,
        close_timeout=10,
    ) as websocket:
        greeting = websocket.recv(timeout=30)
        echoes = []
        for message in messages:
            websocket.send(message)
            echoes.append(websocket.recv(timeout=30))
        return greeting, echoes


class RoutedHTTPEndToEndTests(TestCase):
    """
    C{portal expose --http-route ...} through a real relay: routing, forwarding headers, large
    bodies both ways, WebSocket, server-sent events, upstream keep-alive, error pages and ALPN.
    """

    timeout = 120

    def _service(self, factory: Any) -> Any:
        """
        Listen with C{factory} on a loopback port the OS picks.

        @return: A L{Deferred} firing with the port number.
        """
        return listenLocal(self, factory)

    @inlineCallbacks
    def _closedPort(self) -> Any:
        """
        @return: A loopback port nothing listens on (the OS gave it out, then it was closed).
        """
        port = yield serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(Factory())
        number = port.getHost().port
        yield port.stopListening()
        return number

    @inlineCallbacks
    def _relay(self) -> Any:
        """
        Start a relay.

        @return: Its control port.
        """
        _, _, controlPort = yield startRelay(self, os.path.join(homeDir(self, "relay"), "state"))
        self._controlPort = controlPort
        return controlPort

    def _expose(self, controlPort: int, *arguments: str) -> WatchedProcess:
        """
        Start C{portal expose ARGUMENTS --relay 127.0.0.1:PORT --identity ... --json} with a fresh
        identity; ARGUMENTS are routes (C{--http-route}), or C{PORT --http}.

        @return: The watcher.
        """
        return startExpose(
            self, homeDir(self, "tunnel"), controlPort, arguments, "portal expose (routed)"
        )

    @inlineCallbacks
    def _routed(self, *arguments: str) -> Any:
        """
        A relay and a routed tunnel with C{arguments}, once its lease is live.

        @return: C{(tunnel, lease)}.
        """
        controlPort = yield self._relay()
        tunnel = self._expose(controlPort, *arguments)
        lease = yield waitForLease(tunnel)
        return tunnel, lease

    @inlineCallbacks
    def test_longestPrefixRoutingAndForwardingHeaders(self) -> Any:
        """
        With C{/api} (strip) and C{/} routes, curl reaches each local service; the C{/api} service sees
        the path without the prefix and C{X-Forwarded-Prefix}, C{X-Forwarded-For} and
        C{X-Forwarded-Proto}; hop-by-hop headers are not forwarded; the tunnel logs each request with
        its route.  A tunnel whose only route is C{/api} answers other paths with a 404 naming it.
        """
        apiPort = yield self._service(Site(_Echo("api")))
        sitePort = yield self._service(Site(_Echo("site")))
        tunnel, lease = yield self._routed(
            "--http-route", f"/api={apiPort},strip", "--http-route", f"/={sitePort}"
        )
        code, status, body, version, err = yield curl(
            lease, "/api/users/7?full=1", "--http1.1", "-H", "Keep-Alive: timeout=5"
        )
        self.assertEqual((code, status, version), (0, 200, "1.1"), err)
        api = json.loads(body)
        self.assertEqual(api["service"], "api")
        self.assertEqual(api["uri"], "/users/7?full=1")
        headers = api["headers"]
        self.assertEqual(headers["x-forwarded-prefix"], ["/api"])
        self.assertEqual(headers["x-forwarded-for"], ["127.0.0.1"])
        self.assertEqual(headers["x-forwarded-proto"], ["https"])
        self.assertEqual(headers["x-forwarded-host"], [lease["url"].removeprefix("https://")])
        self.assertNotIn("keep-alive", headers)

        # The exact prefix, a longer name sharing its first letters, and the root go where they
        # should.
        for path, service, uri in [
            ("/api", "api", "/"),
            ("/apiary/x", "site", "/apiary/x"),
            ("/", "site", "/"),
            ("/docs/index.html", "site", "/docs/index.html"),
        ]:
            code, status, body, _, err = yield curl(lease, path, "--http1.1")
            self.assertEqual((code, status), (0, 200), err)
            answer = json.loads(body)
            self.assertEqual((answer["service"], answer["uri"]), (service, uri), path)
            if service == "site":
                self.assertNotIn("x-forwarded-prefix", answer["headers"])
        # The tunnel reports a request once its response is written: wait for the last one.
        yield tunnel.waitFor(r'"path": "/docs/index\.html"')
        routes = [(e["path"], e["route"], e["status"]) for e in requestEvents(tunnel)]
        self.assertIn(("/api/users/7?full=1", "/api", 200), routes)
        self.assertIn(("/docs/index.html", "/", 200), routes)

        # Without a '/' route some paths match nothing.
        onlyApi = self._expose(self._controlPort, "--http-route", f"/api={apiPort}")
        onlyLease = yield waitForLease(onlyApi)
        code, status, body, _, err = yield curl(onlyLease, "/elsewhere", "--http1.1")
        self.assertEqual((code, status), (0, 404), err)
        self.assertIn(b"/api", body)
        self.assertIn(b"No route", body)
        code, status, body, _, err = yield curl(onlyLease, "/api/x", "--http1.1")
        self.assertEqual((code, status, json.loads(body)["uri"]), (0, 200, "/api/x"), err)

    @inlineCallbacks
    def test_256MBEachWay(self) -> Any:
        """
        A 256 MB download (C{Content-Length}) and a 256 MB upload (C{Content-Length}), plus a chunked
        16 MB upload, pass through the tunnel intact (sha256), while the tunnel's resident memory
        grows by less than 64 MB: bodies stream with backpressure, never buffered whole.
        """
        root = Resource()
        root.putChild(b"hello", _Echo("big"))
        root.putChild(b"download", _Download())
        root.putChild(b"upload", _Upload())
        site = Site(root)
        site.requestFactory = _HashingRequest
        port = yield self._service(site)
        tunnel, lease = yield self._routed("--http-route", f"/={port}")
        pid = tunnel.transport.pid
        expected = yield deferToThread(_sha256, DOWNLOAD_SEED, BIG)
        status, received, got, growth = yield deferToThread(
            _download, lease["url"], lease["ca"], pid
        )
        self.assertEqual((status, received), (200, BIG))
        self.assertEqual(got, expected)
        self.assertLess(growth, RSS_LIMIT)

        expected = yield deferToThread(_sha256, UPLOAD_SEED, BIG)
        status, body, growth = yield deferToThread(
            _upload, lease["url"], lease["ca"], pid, BIG, False
        )
        self.assertEqual((status, body), (200, f"{BIG} {expected}".encode()))
        self.assertLess(growth, RSS_LIMIT)

        small = 16 * 1024 * 1024
        expected = yield deferToThread(_sha256, UPLOAD_SEED, small)
        status, body, _ = yield deferToThread(_upload, lease["url"], lease["ca"], pid, small, True)
        self.assertEqual((status, body), (200, f"{small} {expected}".encode()))

    @inlineCallbacks
    def test_webSocketEcho(self) -> Any:
        """
        A WebSocket opened with the C{websockets} client through a stripped C{/ws} route reaches a
        C{websockets} echo server (which sees the path C{/chat}); text and binary messages, small and
        large, come back unchanged.
        """
        try:
            from websockets.sync.server import serve
        except ImportError:
            raise SkipTest("the websockets library is needed (pip install -e .[test])")

        def echo(websocket: Any) -> None:
            websocket.send(websocket.request.path)
            for message in websocket:
                websocket.send(message)

        server = serve(echo, "127.0.0.1", 0)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()

        def stop() -> Any:
            server.shutdown()
            return deferToThread(thread.join, 10)

        self.addCleanup(stop)
        wsPort = server.socket.getsockname()[1]
        sitePort = yield self._service(Site(_Echo("site")))
        _, lease = yield self._routed(
            "--http-route", f"/ws={wsPort},strip", "--http-route", f"/={sitePort}"
        )
        messages: list[str | bytes] = [
            "hello",
            b"\x00\x01\x02\xff binary",
            "caf\u00e9 \u2603",
            random.Random(3).randbytes(300_000),
            "x" * 70_000,
            b"",
        ]
        greeting, echoes = yield deferToThread(_webSocket, lease["url"], lease["ca"], messages)
        self.assertEqual(greeting, "/chat")
        self.assertEqual(echoes, messages)
        self.assertEqual([type(e) for e in echoes], [type(m) for m in messages])

    @inlineCallbacks
    def test_serverSentEventsStream(self) -> Any:
        """
        A server-sent event reaches the client through the tunnel while the response is still open:
        the service writes its second event only once the client has the first, so a proxy that
        held the stream until the end would see the service give up (C{data: timeout}).
        """
        events = _Events()
        self.addCleanup(events.stop)
        port = yield self._service(Site(events))
        _, lease = yield self._routed("--http-route", f"/={port}")
        status, contentType, first, rest = yield deferToThread(
            _events, lease["url"], lease["ca"], events.firstSeen
        )
        self.assertEqual((status, contentType), (200, "text/event-stream"))
        self.assertEqual(first, "event: tick\ndata: one\n\n")
        self.assertEqual(rest, "event: tick\ndata: two\n\n")

    @inlineCallbacks
    def test_keepAliveAndBadGateway(self) -> Any:
        """
        Twenty requests one after another on one visitor connection reach the local service over a
        single upstream connection; a route whose target port is closed answers 502 with a page
        naming the route and its target, and the visitor's connection still serves the next request.
        """
        site = _CountingSite(_Echo("counted"))
        port = yield self._service(site)
        closed = yield self._closedPort()
        _, lease = yield self._routed(
            "--http-route", f"/gone={closed}", "--http-route", f"/={port}"
        )
        # The tunnel's startup check of its targets connected once already, before the lease.
        before = site.connections
        answers, clientConnections = yield deferToThread(_sequential, lease["url"], lease["ca"], 20)
        self.assertEqual(answers, [(200, f"/page/{i}") for i in range(20)])
        self.assertEqual(clientConnections, 1)
        self.assertEqual(site.connections - before, 1)

        def badGateway() -> Any:
            connection = _Connection(lease["url"], lease["ca"])
            try:
                failed = _get(connection, "/gone/page")
                after = _get(connection, "/still/here")
                return failed, after
            finally:
                connection.close()

        (status, body, _), after = yield deferToThread(badGateway)
        self.assertEqual(status, 502)
        self.assertIn(b"/gone", body)
        self.assertIn(f"127.0.0.1:{closed}".encode(), body)
        self.assertEqual((after[0], json.loads(after[1])["uri"]), (200, "/still/here"))

    @inlineCallbacks
    def test_closedWithoutTheVisitorsCloseNotify(self) -> Any:
        """
        A visitor that never closes its side (no close_notify, the socket kept open) still has its
        connection closed by the tunnel once the answer is sent: after a C{Connection: close}
        response over HTTP/1.1, and after an HTTP/2 protocol error (C{GOAWAY}), the relay's socket
        reports the end (TLS close_notify, then TCP's) within seconds, not at an idle timeout.
        """
        port = yield self._service(Site(_Echo("linger")))
        _, lease = yield self._routed(f"{port}", "--http")
        host, public = _hostPort(lease["url"])

        def lingering(alpn: str, request: bytes) -> tuple[bytes, bool]:
            """
            Send C{request}, read the answer up to the tunnel's close_notify, then wait up to 10 s
            (the tunnel's idle timeout is longer) for the end of the TCP connection.

            @return: The answer, and whether the TCP connection ended.
            """
            context = ssl.create_default_context(cafile=lease["ca"])
            context.set_alpn_protocols([alpn])
            raw = socket.create_connection(("127.0.0.1", public), 10)
            tls = context.wrap_socket(raw, server_hostname=host)
            try:
                tls.sendall(request)
                answer = b""
                while chunk := tls.recv(65536):  # Ends at the tunnel's close_notify.
                    answer += chunk
                # Our own close_notify is never sent: watch the TCP connection under TLS.
                under = socket.socket(fileno=os.dup(tls.fileno()))
                try:
                    under.settimeout(10)
                    while under.recv(65536):
                        pass
                except TimeoutError:
                    return answer, False
                finally:
                    under.close()
                return answer, True
            finally:
                tls.close()

        answer, ended = yield deferToThread(
            lingering,
            "http/1.1",
            f"GET /once HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode(),
        )
        self.assertTrue(answer.startswith(b"HTTP/1.1 200"), answer[:100])
        self.assertTrue(ended)
        # A PING on stream 3: a protocol error, answered with GOAWAY.
        badPing = b"\x00\x00\x08\x06\x00\x00\x00\x00\x03" + b"12345678"
        preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
        answer, ended = yield deferToThread(lingering, "h2", preface + badPing)
        self.assertIn(b"\x07\x00\x00\x00\x00\x00", answer)  # A GOAWAY frame's type and flags.
        self.assertTrue(ended)

    @inlineCallbacks
    def test_http2UploadStreams(self) -> Any:
        """
        An upload by curl over HTTP/2 from its standard input reaches the local service while curl is
        still waiting for the rest of its input (twisted.web on its own would hold the body until its
        end, and this test would time out), and arrives intact (sha256).
        """
        first, rest = b"a" * (1024 * 1024), b"b" * (3 * 1024 * 1024)
        reached: Deferred[None] = Deferred()

        class Sink(_HashSink):
            def write(self, data: bytes) -> None:
                super().write(data)
                if self.length >= len(first) and not reached.called:
                    reached.callback(None)

        class Watched(Request):
            def gotLength(self, length: int | None) -> None:
                self.content = Sink()

        root = Resource()
        root.putChild(b"upload", _Upload())
        site = Site(root)
        site.requestFactory = Watched
        port = yield self._service(site)
        _, lease = yield self._routed("--http-route", f"/={port}")
        host, publicPort = _hostPort(lease["url"])
        curl = spawn(
            self,
            "curl",
            [
                curlProgram(),
                "-sS",
                "--http2",
                "--max-time",
                "60",
                "--cacert",
                lease["ca"],
                "--resolve",
                f"{host}:{publicPort}:127.0.0.1",
                "-X",
                "POST",
                "-T",
                "-",
                "-w",
                "\n%{http_code} %{http_version}\n",
                lease["url"] + "/upload",
            ],
            os.path.abspath(self.mktemp()),
        )
        assert curl.transport is not None
        curl.transport.write(first)
        yield reached.addTimeout(WAIT, reactor)
        curl.transport.write(rest)
        curl.transport.closeStdin()
        exitCode = yield curl.ended
        self.assertEqual(exitCode, 0, curl.output())
        expected = hashlib.sha256(first + rest).hexdigest()
        self.assertEqual(curl.lines[-2:], [f"{len(first + rest)} {expected}", "200 2"])

    @inlineCallbacks
    def test_curlHTTP11AndHTTP2(self) -> Any:
        """
        Routed mode offers h2 by default: curl C{--http2} gets HTTP/2 (the tunnel's HTTP/2 server,
        forwarded over the same upstream pool), including a streamed upload, and C{--http1.1} gets
        HTTP/1.1; with C{--alpn http/1.1} curl C{--http2} falls back to HTTP/1.1; an unknown
        protocol is a usage error.
        """
        port = yield self._service(Site(_Echo("single")))
        tunnel, lease = yield self._routed(str(port), "--http")
        code, status, body, version, err = yield curl(lease, "/one", "--http1.1")
        self.assertEqual((code, status, version), (0, 200, "1.1"), err)
        self.assertEqual(json.loads(body)["uri"], "/one")
        code, status, body, version, err = yield curl(lease, "/three?q=1", "--http2")
        self.assertEqual((code, status, version), (0, 200, "2"), err)
        self.assertEqual(json.loads(body)["uri"], "/three?q=1")

        _, h1lease = yield self._routed(str(port), "--http", "--alpn", "http/1.1")
        code, status, body, version, err = yield curl(h1lease, "/two", "--http2")
        self.assertEqual((code, status, version), (0, 200, "1.1"), err)
        self.assertEqual(json.loads(body)["uri"], "/two")

        refused = self._expose(self._controlPort, "--http-route", f"/={port}", "--alpn", "h3")
        exitCode = yield refused.ended
        self.assertEqual(exitCode, 2, refused.output())
        self.assertIn("h2,http/1.1", refused.output())
