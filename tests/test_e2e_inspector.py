"""
End to end: the request inspector of a real routed-HTTP C{portal expose}, read through its JSON API and
in headless Chromium, which also replays a request from the page; a screenshot of the page is saved.
"""

from __future__ import annotations

import json
import os
from typing import Any
from urllib.request import Request, urlopen

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase
from twisted.web.server import Site

from tests.realprocesses import (
    CHROMIUM_FLAGS,
    RecordingApp,
    browserTools,
    curl,
    evaluate,
    homeDir,
    listenLocal,
    openBrowser,
    pollUntil,
    readDOM,
    startRelay,
    startTunnel,
    waitForLease,
)


def _call(url: str, data: bytes | None = None, headers: dict[str, str] | None = None) -> Any:
    """
    GET (or POST C{data} to) C{url}.

    @return: The status and the decoded JSON body.
    """
    request = Request(url, data=data, headers=headers or {})
    try:
        with urlopen(request, timeout=20) as response:
            return response.status, json.load(response)
    except Exception as e:
        if hasattr(e, "code"):
            return e.code, json.load(e)
        raise


class InspectorEndToEndTests(TestCase):
    """
    ngrok's inspector, Portal's way.
    """

    timeout = 180

    @inlineCallbacks
    def test_inspectAndReplay(self) -> Any:
        """
        A request through the tunnel is listed by the API (client, route, bodies, credentials
        redacted) and appears in the page in Chromium; the page's replay reaches the upstream
        again; the API refuses a foreign Host and a non-JSON replay; a screenshot is saved.
        """
        chromium, _ = browserTools()
        relayState = os.path.join(homeDir(self, "relay"), "state")
        _, _, controlPort = yield startRelay(self, relayState)
        app = RecordingApp("app")
        port = yield listenLocal(self, Site(app))
        tunnel = startTunnel(
            self,
            homeDir(self, "tunnel"),
            controlPort,
            str(port),
            ["--http", "--inspect", "127.0.0.1:0"],
        )
        match = yield tunnel.waitFor(r'^\{.*"event": "inspector".*\}$')
        inspector = json.loads(match.group(0))["url"]
        lease = yield waitForLease(tunnel)
        code, status, _, _, err = yield curl(
            lease, "/hello?x=1", "-d", "ping", "-H", "Cookie: secret=1"
        )
        self.assertEqual((code, status), (0, 200), err)

        status, listed = yield pollUntil(
            lambda: deferToThread(_call, f"{inspector}/api/requests").addCallback(
                lambda answer: answer if answer[1]["requests"] else None
            ),
            "the request in the inspector",
        )
        self.assertEqual(status, 200)
        [summary] = listed["requests"]
        self.assertEqual(
            (summary["method"], summary["path"], summary["status"], summary["client"]),
            ("POST", "/hello?x=1", 200, "127.0.0.1"),
        )
        status, record = yield deferToThread(_call, f"{inspector}/api/requests/{summary['id']}")
        self.assertEqual(record["requestBody"]["data"], "ping")
        # curl speaks HTTP/2 (ALPN), whose header names are lower case.
        headers = [[name.lower(), value] for name, value in record["requestHeaders"]]
        self.assertIn(["cookie", "[redacted]"], headers)
        self.assertEqual(json.loads(record["responseBody"]["data"])["uri"], "/hello?x=1")

        status, _ = yield deferToThread(
            _call, f"{inspector}/api/requests", None, {"Host": "evil.example"}
        )
        self.assertEqual(status, 421)
        status, _ = yield deferToThread(
            _call, f"{inspector}/api/requests/1/replay", b"{}", {"Content-Type": "text/plain"}
        )
        self.assertEqual(status, 415)
        self.assertEqual(len(app.seen), 1)

        browserHome = homeDir(self, "browser")
        devtools = yield openBrowser(self, chromium, browserHome, inspector + "/")
        yield pollUntil(
            lambda: readDOM(devtools, inspector).addCallback(lambda dom: "/hello?x=1" in dom),
            "the request in the page",
        )
        yield evaluate(
            devtools,
            inspector,
            f"detail({summary['id']}).then(() => document.getElementById('replay').click())",
        )
        yield pollUntil(lambda: len(app.seen) == 2, "the replay at the upstream")
        self.assertEqual([uri for uri, _ in app.seen], ["/hello?x=1", "/hello?x=1"])
        status, listed = yield deferToThread(_call, f"{inspector}/api/requests")
        self.assertEqual(listed["requests"][-1]["replayOf"], summary["id"])

        screenshot = os.path.abspath("inspector.png")
        out, err, code = yield getProcessOutputAndValue(
            chromium,
            [
                *CHROMIUM_FLAGS,
                f"--user-data-dir={browserHome}/shot",
                "--window-size=1280,800",
                "--virtual-time-budget=3000",
                f"--screenshot={screenshot}",
                inspector + "/",
            ],
            env=dict(os.environ, HOME=browserHome),
        )
        self.assertEqual(code, 0, err)
        self.assertGreater(os.path.getsize(screenshot), 10_000)
