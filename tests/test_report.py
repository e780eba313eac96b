"""
Tests for L{portal.tunnel.report}.
"""

from __future__ import annotations

import io
import json

from twisted.trial.unittest import SynchronousTestCase

from portal.tunnel.report import Reporter


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
