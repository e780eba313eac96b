"""
A real browser through routed HTTP mode: headless Chromium loads a page through relay and tunnel whose
script calls a second route and opens a WebSocket through a third, and the test reads the DOM.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import serverFromString
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from tests.realprocesses import browserTools, dumpDOM, spawn, startRelay, trustCA, waitForLease

PAGE = b"""<!doctype html>
<meta charset="utf-8"><title>routed</title>
<p id="api">api: waiting</p><p id="ws">ws: waiting</p>
<script>
// A request the server holds until the WebSocket result is reported: headless Chromium's virtual time
// waits for pending requests (not for WebSocket frames), so the DOM is dumped only after the echo.
fetch("/api/wait");
fetch("/api/hello").then(r => r.text()).then(t => {
  document.getElementById("api").textContent = "api: " + t;
});
const ws = new WebSocket("wss://" + location.host + "/ws/echo");
ws.onopen = () => ws.send("ping through portal");
ws.onmessage = (e) => {
  document.getElementById("ws").textContent = "ws: " + e.data;
  fetch("/api/report?ws=" + encodeURIComponent(e.data));
};
ws.onerror = () => { document.getElementById("ws").textContent = "ws: error"; };
</script>
"""

#: Keep the page alive until its requests are done (virtual time waits for pending requests).
VIRTUAL_TIME = ["--virtual-time-budget=15000"]


class _Leaf(Resource):
    """
    A fixed response.
    """

    isLeaf = True

    def __init__(self, body: bytes, contentType: bytes) -> None:
        super().__init__()
        self._body = body
        self._type = contentType

    def render_GET(self, request: Any) -> bytes:
        """
        @return: The body.
        """
        request.setHeader(b"content-type", self._type)
        return self._body


class _Report(Resource):
    """
    C{/report?ws=...}: the page's WebSocket result; C{/wait}: answered once it came (or after 20 s).
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.reported: Deferred[bytes] = Deferred()
        self._waiting: list[Any] = []

    def render_GET(self, request: Any) -> Any:
        """
        Record a report, or hold a wait request until there is one.
        """
        if request.path.endswith(b"/report"):
            if not self.reported.called:
                self.reported.callback(request.args.get(b"ws", [b""])[0])
            for held in self._waiting:
                held.write(b"done")
                held.finish()
            self._waiting.clear()
            return b"ok"
        if request.path.endswith(b"/wait") and not self.reported.called:
            self._waiting.append(request)
            timer = reactor.callLater(20, self._release, request)
            request.notifyFinish().addBoth(lambda _: timer.active() and timer.cancel())
            return NOT_DONE_YET
        return b"hello from the api route"

    def _release(self, request: Any) -> None:
        """
        Give up holding a wait request.
        """
        if request in self._waiting:
            self._waiting.remove(request)
            request.write(b"timeout")
            request.finish()


def _echoServer() -> tuple[Any, int]:
    """
    A WebSocket echo server on a loopback port, on its own thread.

    @return: The server (call C{shutdown()}) and its port.
    """
    from websockets.sync.server import serve

    def echo(connection: Any) -> None:
        for message in connection:
            connection.send(message)

    server = serve(echo, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.socket.getsockname()[1]


class ChromiumRoutedHTTPTests(TestCase):
    """
    Headless Chromium through relay and a routed-HTTP tunnel.
    """

    timeout = 120

    @inlineCallbacks
    def test_pageApiAndWebSocket(self) -> Any:
        """
        The page from route '/' fetches from route '/api' and echoes over a WebSocket on route '/ws'; the
        DOM Chromium renders shows both results, so routing, streaming and the upgrade splice work for a
        real browser.
        """
        chromium, certutil = browserTools()
        try:
            server, wsPort = _echoServer()
        except ImportError:
            raise SkipTest("the websockets package is needed (test extra)")
        self.addCleanup(server.shutdown)
        page = yield serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(
            Site(_Leaf(PAGE, b"text/html; charset=utf-8"))
        )
        self.addCleanup(page.stopListening)
        report = _Report()
        api = yield serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(Site(report))
        self.addCleanup(api.stopListening)

        root = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(root, "relay"))
        _, _, controlPort = yield startRelay(self, os.path.join(root, "relay", "state"))
        home = os.path.join(root, "tunnel")
        os.makedirs(home)
        tunnel = spawn(
            self,
            "portal expose --http-route",
            [
                sys.executable,
                "-m",
                "portal",
                "expose",
                "--http-route",
                f"/={page.getHost().port}",
                "--http-route",
                f"/api={api.getHost().port},strip",
                "--http-route",
                f"/ws={wsPort},strip",
                "--relay",
                f"127.0.0.1:{controlPort}",
                "--identity",
                os.path.join(home, "identity.json"),
                "--json",
            ],
            home,
        )
        lease = yield waitForLease(tunnel)

        browserHome = os.path.join(root, "browser")
        yield trustCA(self, certutil, browserHome, lease["ca"])
        out, err, code = yield dumpDOM(chromium, browserHome, lease["url"] + "/", VIRTUAL_TIME)
        self.assertIn(b"api: hello from the api route", out, err[-2000:])
        self.assertIn(b"ws: ping through portal", out, err[-2000:])
        self.assertTrue(report.reported.called)
        self.assertEqual(self.successResultOf(report.reported), b"ping through portal")
        yield tunnel.waitFor(r'"event": "request".*"path": "/api/hello"')
