"""
Tests for L{portal.tunnel.inspector}: what the request inspector keeps and how its API answers.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from portal.tunnel.config import DEFAULT_INSPECT, ConfigError, buildConfig
from portal.tunnel.inspector import (
    BODY_CAP,
    MAX_RECORDS,
    Capture,
    Finished,
    Inspector,
    InspectorPage,
    public,
)


def record(inspector: Inspector, capture: Capture | None = None, **kw: Any) -> dict[str, Any]:
    """
    Add a finished exchange with defaults for what C{kw} does not give.
    """
    arguments: dict[str, Any] = {
        "client": "203.0.113.9",
        "method": b"GET",
        "path": b"/a",
        "version": "1.1",
        "requestHeaders": [(b"Host", b"app.localhost"), (b"Cookie", b"__Host-ptl-session=x")],
        "status": 200,
        "ms": 1.5,
        "route": "/",
        "upstream": ("127.0.0.1", 3000, False),
        "upstreamPath": "/a",
        "capture": capture or Capture(),
    }
    arguments.update(kw)
    return inspector.add(**arguments)


class CaptureTests(SynchronousTestCase):
    """
    Tests for L{Capture} and the records L{Inspector} makes of it.
    """

    def test_capAndTruncation(self) -> None:
        """
        Bodies are kept up to L{BODY_CAP}; the record gives the full size and says it was cut.
        """
        capture = Capture()
        capture.request(b"x" * BODY_CAP)
        capture.request(b"y" * 10)
        capture.response(b"ok")
        kept = record(Inspector(Clock()), capture)
        self.assertEqual(kept["requestBody"]["size"], BODY_CAP + 10)
        self.assertTrue(kept["requestBody"]["truncated"])
        self.assertEqual(len(kept["requestBody"]["data"]), BODY_CAP)
        self.assertEqual(
            kept["responseBody"], {"data": "ok", "encoding": "text", "size": 2, "truncated": False}
        )

    def test_binaryAsHex(self) -> None:
        """
        A body that is not UTF-8 is shown as hex.
        """
        capture = Capture()
        capture.response(b"\xff\x00")
        kept = record(Inspector(Clock()), capture)
        self.assertEqual(kept["responseBody"]["encoding"], "hex")
        self.assertEqual(kept["responseBody"]["data"], "ff00")

    def test_credentialsRedacted(self) -> None:
        """
        Cookies and other credentials are shown as C{[redacted]}, and not replayed.
        """
        kept = record(Inspector(Clock()))
        self.assertIn(["Cookie", "[redacted]"], kept["requestHeaders"])
        self.assertNotIn(b"__Host", json.dumps(public(kept)).encode())
        self.assertEqual(kept["_replay"]["headers"], [(b"Host", b"app.localhost")])

    def test_bounded(self) -> None:
        """
        At most L{MAX_RECORDS} records are kept, the oldest forgotten first.
        """
        inspector = Inspector(Clock())
        for _ in range(MAX_RECORDS + 5):
            record(inspector)
        self.assertEqual(len(inspector.records), MAX_RECORDS)
        self.assertIsNone(inspector.find(1))
        self.assertIsNotNone(inspector.find(MAX_RECORDS + 5))

    def test_madeWhenAsked(self) -> None:
        """
        C{keep} (what the proxy calls for every exchange) only keeps what it is given; the record
        is made when first asked for, once, with the time the exchange was kept, and equals the
        record C{add} makes at once.
        """
        clock = Clock()
        clock.advance(1_700_000_000)
        inspector = Inspector(clock)
        capture = Capture()
        capture.request(b"hello")
        capture.head([(b"Content-Type", b"text/plain")])
        capture.response(b"world")
        arguments: dict[str, Any] = {
            "client": "203.0.113.9",
            "method": b"POST",
            "path": b"/a",
            "version": "1.1",
            "requestHeaders": [(b"Host", b"app.localhost")],
            "status": 201,
            "ms": 2.25,
            "route": "/",
            "upstream": ("127.0.0.1", 3000, False),
            "upstreamPath": "/a",
            "capture": capture,
        }
        inspector.keep(Finished(**arguments))
        [kept] = inspector._kept
        self.assertIsNone(kept._record)
        clock.advance(5)
        eager = Inspector(Clock()).add(**arguments)
        made = inspector.find(1)
        assert made is not None
        self.assertIs(inspector.records[0], made)
        self.assertEqual(made["time"], "2023-11-14T22:13:20Z")
        self.assertEqual({**made, "time": None}, {**eager, "time": None})
        self.assertEqual(made["requestBody"]["data"], "hello")
        self.assertEqual([r["id"] for r in inspector.since(0)], [1])
        self.assertEqual(inspector.since(1), [])


class PageTests(SynchronousTestCase):
    """
    Tests for L{InspectorPage}'s API.
    """

    def setUp(self) -> None:
        """
        An inspector with one record, served for the host C{127.0.0.1:4040}.
        """
        self.inspector = Inspector(Clock())
        record(self.inspector)
        self.page = InspectorPage(Clock(), self.inspector, ["127.0.0.1:4040"])

    def get(self, path: str, host: bytes = b"127.0.0.1:4040", method: bytes = b"GET") -> Any:
        """
        @return: The response code and body of a request.
        """
        request = DummyRequest(path.lstrip("/").split("/"))
        request.path = path.encode()
        request.method = method
        request.requestHeaders.setRawHeaders(b"host", [host])
        body = self.page.render(request)
        return request.responseCode or 200, body

    def test_listAndDetail(self) -> None:
        """
        The list gives summaries (no headers or bodies); a record by id has everything.
        """
        code, body = self.get("/api/requests")
        [summary] = json.loads(body)["requests"]
        self.assertEqual((code, summary["path"], summary["client"]), (200, "/a", "203.0.113.9"))
        self.assertNotIn("requestHeaders", summary)
        code, body = self.get("/api/requests/1")
        self.assertEqual(json.loads(body)["requestHeaders"][0], ["Host", "app.localhost"])
        code, _ = self.get("/api/requests/9")
        self.assertEqual(code, 404)

    def test_foreignHost(self) -> None:
        """
        A request for another host (a DNS rebinding page) is refused.
        """
        code, _ = self.get("/api/requests", host=b"evil.example:4040")
        self.assertEqual(code, 421)

    def test_replayNeedsJSON(self) -> None:
        """
        A replay must be a JSON POST, which another site's page cannot send without a preflight.
        """
        code, body = self.get("/api/requests/1/replay", method=b"POST")
        self.assertEqual(code, 415)
        code, _ = self.get("/api/requests/1/replay")
        self.assertEqual(code, 405)

    def test_page(self) -> None:
        """
        C{/} is the HTML page, with a Content-Security-Policy.
        """
        request = DummyRequest([b""])
        request.path = b"/"
        request.requestHeaders.setRawHeaders(b"host", [b"127.0.0.1:4040"])
        body = self.page.render(request)
        self.assertIn(b"Portal inspector", body)
        self.assertTrue(request.responseHeaders.getRawHeaders(b"content-security-policy"))


class OptionTests(SynchronousTestCase):
    """
    C{--inspect} and C{--no-inspect}.
    """

    def test_defaults(self) -> None:
        """
        Routed HTTP mode inspects on 127.0.0.1:4040 (or the next free port); other modes do not.
        """
        config = buildConfig("3000", http=True)
        self.assertEqual((config.inspect, config.inspectFixed), (DEFAULT_INSPECT, False))
        self.assertIsNone(buildConfig("3000").inspect)
        self.assertIsNone(buildConfig("3000", http=True, noInspect=True).inspect)

    def test_address(self) -> None:
        """
        C{--inspect} takes PORT, HOST:PORT, or port 0 for one the system picks; it needs routed
        HTTP mode and contradicts C{--no-inspect}.
        """
        self.assertEqual(
            buildConfig("3000", http=True, inspect="4141").inspect, ("127.0.0.1", 4141)
        )
        self.assertEqual(
            buildConfig("3000", http=True, inspect="[::1]:4141").inspect, ("::1", 4141)
        )
        config = buildConfig("3000", http=True, inspect="127.0.0.1:0")
        self.assertEqual((config.inspect, config.inspectFixed), (("127.0.0.1", 0), True))
        self.assertRaises(ConfigError, buildConfig, "3000", inspect="4141")
        self.assertRaises(
            ConfigError, buildConfig, "3000", http=True, inspect="4141", noInspect=True
        )
