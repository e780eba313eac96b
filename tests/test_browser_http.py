"""
A real browser through routed HTTP mode: headless Chromium loads a page through relay and tunnel whose
script calls a second route, and the test reads the DOM.

WebSocket through the tunnel is tested end to end with the C{websockets} library
(L{tests.test_e2e_http}). A WebSocket opened by Chromium inside this test lost the echo now and then
under heavy load (the echo server sent it; the page never received it); that is an open bug of issue 4,
not hidden behind a retry here.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from tests.realprocesses import (
    browserTools,
    dumpDOM,
    listenLocal,
    spawn,
    startRelay,
    trustCA,
    waitForLease,
)

PAGE = b"""<!doctype html>
<meta charset="utf-8"><title>routed</title>
<p id="api">api: waiting</p>
<script>
fetch("/api/hello").then(r => r.text()).then(t => {
  document.getElementById("api").textContent = "api: " + t;
});
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


class ChromiumRoutedHTTPTests(TestCase):
    """
    Headless Chromium through relay and a routed-HTTP tunnel.
    """

    timeout = 120

    @inlineCallbacks
    def test_pageCallsSecondRoute(self) -> Any:
        """
        The page from route '/' fetches from route '/api' (stripped); the DOM Chromium renders shows the
        answer, and the tunnel logged both requests with their routes.
        """
        chromium, certutil = browserTools()
        pagePort = yield listenLocal(self, Site(_Leaf(PAGE, b"text/html; charset=utf-8")))
        apiPort = yield listenLocal(self, Site(_Leaf(b"hello from the api route", b"text/plain")))
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
                f"/={pagePort}",
                "--http-route",
                f"/api={apiPort},strip",
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
        yield tunnel.waitFor(r'"event": "request".*"path": "/api/hello".*"route": "/api"')
        yield tunnel.waitFor(r'"event": "request".*"path": "/".*"route": "/"')
