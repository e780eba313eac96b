"""
A real browser through routed HTTP mode: headless Chromium loads a page through relay and tunnel whose
script calls a second route and opens a WebSocket through a third, and the test reads the DOM over the
DevTools protocol.

The browser runs in real time rather than with C{--dump-dom --virtual-time-budget}: under virtual time
Chromium held the page's WebSocket message back until its pending fetches ended (the echo server
received it only once a held request was released), which looked like a lost echo.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from tests.realprocesses import (
    WAIT,
    browserTools,
    listenLocal,
    openBrowser,
    readDOM,
    startExpose,
    startRelay,
    trustCA,
    waitForLease,
)

PAGE = b"""<!doctype html>
<meta charset="utf-8"><title>routed</title>
<p id="api">api: waiting</p><p id="ws">ws: waiting</p>
<script>
const api = fetch("/api/hello").then(r => r.text()).then(t => {
  document.getElementById("api").textContent = "api: " + t;
});
const echoed = new Promise((resolve) => {
  const ws = new WebSocket("wss://" + location.host + "/ws/echo");
  ws.onopen = () => ws.send("ping through portal");
  ws.onmessage = (e) => {
    document.getElementById("ws").textContent = "ws: " + e.data;
    resolve();
  };
  ws.onerror = () => { document.getElementById("ws").textContent = "ws: error"; resolve(); };
});
Promise.all([api, echoed]).then(() => fetch("/api/report"));
</script>
"""


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


class _API(Resource):
    """
    C{/hello} answers; C{/report} (the page saying it is done) fires L{reported}.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.reported: Deferred[None] = Deferred()

    def render_GET(self, request: Any) -> bytes:
        """
        Answer, and note the page's report.
        """
        if request.path.endswith(b"/report"):
            if not self.reported.called:
                self.reported.callback(None)
            return b"ok"
        return b"hello from the api route"


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
        The page from route '/' fetches from route '/api' (stripped) and echoes over a WebSocket on route
        '/ws' (stripped); the DOM Chromium rendered shows both results, and the tunnel logged the
        requests with their routes and the upgrade as 101.
        """
        chromium, certutil = browserTools()
        try:
            server, wsPort = _echoServer()
        except ImportError:
            raise SkipTest("the websockets package is needed (test extra)")
        self.addCleanup(server.shutdown)
        pagePort = yield listenLocal(self, Site(_Leaf(PAGE, b"text/html; charset=utf-8")))
        api = _API()
        apiPort = yield listenLocal(self, Site(api))
        root = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(root, "relay"))
        _, _, controlPort = yield startRelay(self, os.path.join(root, "relay", "state"))
        home = os.path.join(root, "tunnel")
        os.makedirs(home)
        tunnel = startExpose(
            self,
            home,
            controlPort,
            [
                "--http-route",
                f"/={pagePort}",
                "--http-route",
                f"/api={apiPort},strip",
                "--http-route",
                f"/ws={wsPort},strip",
            ],
        )
        lease = yield waitForLease(tunnel)
        browserHome = os.path.join(root, "browser")
        yield trustCA(self, certutil, browserHome, lease["ca"])
        devtools = yield openBrowser(self, chromium, browserHome, lease["url"] + "/")
        yield api.reported.addTimeout(WAIT, reactor)
        dom = yield readDOM(devtools, lease["url"])
        self.assertIn("api: hello from the api route", dom)
        self.assertIn("ws: ping through portal", dom)
        yield tunnel.waitFor(r'"event": "request".*"path": "/api/hello".*"route": "/api"')
        yield tunnel.waitFor(r'"event": "request".*"path": "/ws/echo".*"status": 101')
        yield tunnel.waitFor(r'"event": "request".*"path": "/".*"route": "/"')
