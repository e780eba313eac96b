"""
Tests for L{portal.tunnel.report}.
"""

from __future__ import annotations

import io
import json
import time

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from portal.tunnel.report import MAX_EVENTS, Reporter


class ReporterTests(SynchronousTestCase):
    """
    What the tunnel prints for its user.
    """

    def test_forwardingLine(self) -> None:
        """
        A live lease prints the C{Forwarding URL -> TARGET} line and a hint naming the CA file.
        """
        out = io.StringIO()
        Reporter(out).lease("https://a.localhost:8443", "r:4017", "127.0.0.1:8000", "/ca.pem")
        lines = out.getvalue().splitlines()
        self.assertEqual(lines[0], "Forwarding https://a.localhost:8443 -> 127.0.0.1:8000")
        self.assertIn("curl --cacert /ca.pem https://a.localhost:8443/", lines[1])

    def test_certificateKind(self) -> None:
        """
        The C{Forwarding} line says which certificate the URL has: the local CA's until the ACME
        CA issues one, then the ACME CA's; the JSON event carries it as C{certificate}.
        """
        out = io.StringIO()
        reporter = Reporter(out)
        url, target, acme = "https://a.portal.test", "127.0.0.1:8000", "https://ca.test/dir"
        reporter.lease(url, "r:4017", target, "/ca.pem", "local-ca", acme)
        reporter.lease(url, "r:4017", target, "/ca.pem", "acme", acme)
        lines = out.getvalue().splitlines()
        self.assertIn("local CA /ca.pem", lines[1])
        self.assertEqual(lines[2], f"  (until the ACME CA {acme} issues one)")
        self.assertEqual(lines[4], f"  (certificate from the ACME CA {acme})")
        self.assertNotIn("local CA", "\n".join(lines[3:]))
        json = io.StringIO()
        Reporter(json, asJSON=True).lease(url, "r:4017", target, "/ca.pem", "acme", acme)
        self.assertIn('"certificate": "acme"', json.getvalue())

    def test_acmeFailedIsAnError(self) -> None:
        """
        In text mode C{acme-failed} goes to the error stream; the other ACME events do not.
        """
        out, err = io.StringIO(), io.StringIO()
        reporter = Reporter(out, err=err)
        reporter.state("acme-failed", "", "a.portal.test: cannot get a certificate")
        reporter.state("acme-issued", "", "a.portal.test: issued")
        self.assertEqual(err.getvalue(), "a.portal.test: cannot get a certificate\n")
        self.assertEqual(out.getvalue(), "a.portal.test: issued\n")

    def test_jsonLines(self) -> None:
        """
        With JSON on, every event, errors included, is one JSON object per line on the output stream.
        """
        out, err = io.StringIO(), io.StringIO()
        reporter = Reporter(out, asJSON=True, err=err)
        reporter.lease("https://a.localhost:8443", "r:4017", "127.0.0.1:8000", None)
        reporter.state("fatal", "r:4017", "boom")
        events = [json.loads(line) for line in out.getvalue().splitlines()]
        self.assertEqual([e["event"] for e in events], ["lease", "fatal"])
        self.assertEqual(events[0]["url"], "https://a.localhost:8443")
        self.assertEqual(events[1], {"event": "fatal", "relay": "r:4017", "message": "boom"})
        self.assertEqual(err.getvalue(), "")

    def test_errorsToErrorStream(self) -> None:
        """
        In text mode errors go to the error stream, prefixed with the relay when there is one; other
        state changes go to the output stream.
        """
        out, err = io.StringIO(), io.StringIO()
        reporter = Reporter(out, err=err)
        reporter.state("unreachable", "r:4017", "cannot reach the relay")
        reporter.state("fatal", "", "no identity")
        reporter.state("reconnected", "r:4017", "reconnected to the relay")
        self.assertEqual(err.getvalue(), "[r:4017] cannot reach the relay\nno identity\n")
        self.assertEqual(out.getvalue(), "[r:4017] reconnected to the relay\n")

    def test_eventsBounded(self) -> None:
        """
        Only the last L{MAX_EVENTS} events are kept, so a tunnel logging every request does not grow.
        """
        reporter = Reporter(io.StringIO())
        for i in range(MAX_EVENTS + 10):
            reporter.request("GET", f"/{i}", 200, 1, 1.0, "/", "127.0.0.1:1")
        self.assertEqual(len(reporter.events), MAX_EVENTS)
        self.assertEqual(reporter.events[-1]["path"], f"/{MAX_EVENTS + 9}")

    def test_requestLinesBatched(self) -> None:
        """
        With a clock, request lines are written once per reactor turn, and a state change written in
        between comes after the request lines before it.
        """
        out = io.StringIO()
        clock = Clock()
        reporter = Reporter(out, clock=clock)
        reporter.request("GET", "/a", 200, 1, 1.0, "/", "127.0.0.1:1")
        reporter.request("GET", "/b", 200, 1, 1.0, "/", "127.0.0.1:1")
        self.assertEqual(out.getvalue(), "")
        clock.advance(0)
        self.assertEqual(len(out.getvalue().splitlines()), 2)
        reporter.request("GET", "/c", 200, 1, 1.0, "/", "127.0.0.1:1")
        reporter.state("reconnected", "r:1", "reconnected to the relay")
        lines = out.getvalue().splitlines()
        self.assertTrue(lines[2].startswith("GET /c 200"))
        self.assertEqual(lines[3], "[r:1] reconnected to the relay")
        clock.advance(0)
        self.assertEqual(len(out.getvalue().splitlines()), 4)

    def test_timeAndClient(self) -> None:
        """
        With a clock, every JSON event has its time (UTC, milliseconds), and request events the
        visitor's address; with timestamps, text lines start with the local time.
        """
        out = io.StringIO()
        clock = Clock()
        clock.advance(1_700_000_000.25)
        reporter = Reporter(out, asJSON=True, clock=clock)
        reporter.request("GET", "/", 200, 1, 1.0, "/", "127.0.0.1:1", client="203.0.113.9")
        reporter.state("reconnected", "r:1", "reconnected to the relay")
        clock.advance(0)
        events = [json.loads(line) for line in out.getvalue().splitlines()]
        self.assertEqual([e["time"] for e in events], ["2023-11-14T22:13:20.250+00:00"] * 2)
        self.assertEqual(events[0]["client"], "203.0.113.9")
        text = io.StringIO()
        reporter = Reporter(text, clock=clock, timestamps=True)
        reporter.request("GET", "/", 200, 1, 1.0, "/", "127.0.0.1:1", client="203.0.113.9")
        reporter.lease("https://a.localhost:8443", "r:4017", "127.0.0.1:8000", "/ca.pem")
        lines = text.getvalue().splitlines()
        stamp = time.strftime("%H:%M:%S", time.localtime(clock.seconds()))
        self.assertEqual(lines[0], f"{stamp} 203.0.113.9 GET / 200 1 B 1.0 ms [/ -> 127.0.0.1:1]")
        self.assertEqual(lines[1], f"{stamp} Forwarding https://a.localhost:8443 -> 127.0.0.1:8000")
        self.assertTrue(lines[2].startswith("  (certificate"))

    def test_timeAcrossSeconds(self) -> None:
        """
        Each event's time is its own to the millisecond, also when the second changes between
        two events (the texts of a second are reused within it).
        """
        out = io.StringIO()
        clock = Clock()
        clock.advance(1_700_000_000.998)
        reporter = Reporter(out, asJSON=True, clock=clock, timestamps=True)
        text = io.StringIO()
        local = Reporter(text, clock=clock, timestamps=True)
        stamps = []
        for step in (0, 0.0015, 0.001, 1.25):
            clock.advance(step)
            reporter.state("reconnected", "r:1", "again")
            local.state("reconnected", "r:1", "again")
            stamps.append(time.strftime("%H:%M:%S", time.localtime(int(clock.seconds()))))
        times = [json.loads(line)["time"] for line in out.getvalue().splitlines()]
        self.assertEqual(
            times,
            [
                "2023-11-14T22:13:20.998+00:00",
                "2023-11-14T22:13:20.999+00:00",
                "2023-11-14T22:13:21.000+00:00",
                "2023-11-14T22:13:22.250+00:00",
            ],
        )
        self.assertEqual([line.split(" ")[0] for line in text.getvalue().splitlines()], stamps)
