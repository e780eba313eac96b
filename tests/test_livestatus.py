"""
Tests for L{portal.cli.livestatus}: the live status of tunnels on a terminal.
"""

from __future__ import annotations

import io

from rich.console import Console
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from portal.cli.livestatus import RATE_WINDOW, REFRESH, LiveStatus
from portal.tunnel.report import Reporter


class LiveStatusTests(SynchronousTestCase):
    """
    Tests for L{LiveStatus}, fed by a L{Reporter}.
    """

    def setUp(self) -> None:
        """
        A status drawing on a fake terminal, fed by a reporter whose lines go above it.
        """
        self.clock = Clock()
        self.screen = io.StringIO()
        self.console = Console(file=self.screen, force_terminal=True, width=140, color_system=None)
        self.status = LiveStatus(self.clock, self.console)
        self.reporter = Reporter(self.status.lineWriter(), clock=self.clock)
        self.reporter.listeners.append(self.status.listenerFor(""))

    def rendered(self) -> str:
        """
        @return: The status table as text.
        """
        console = Console(file=io.StringIO(), width=140, color_system=None)
        console.print(self.status.table())
        assert isinstance(console.file, io.StringIO)
        return console.file.getvalue()

    def test_counts(self) -> None:
        """
        Each relay's row has its URL and state; requests, their rate, errors (5xx) and connections
        are counted; the rate covers the last L{RATE_WINDOW} seconds.
        """
        self.reporter.lease("https://a.localhost:8443", "r:4017", "127.0.0.1:8000", None)
        for status in (200, 200, 502):
            self.reporter.request("GET", "/", status, 1, 1.0, "/", "127.0.0.1:8000", "203.0.113.9")
        self.reporter.connection("203.0.113.9", "127.0.0.1:8000", 10, 20, 1.0)
        self.clock.advance(0)
        [(key, relay)] = self.status.relays.items()
        self.assertEqual(key, ("", "r:4017"))
        self.assertEqual(
            (relay.state, relay.urls, relay.requests, relay.errors, relay.connections),
            ("live", ["https://a.localhost:8443"], 3, 1, 1),
        )
        text = self.rendered()
        self.assertIn("https://a.localhost:8443", text)
        self.assertIn("0.3", text)
        self.clock.advance(RATE_WINDOW)
        self.assertIn("0.0", self.rendered())

    def test_states(self) -> None:
        """
        A lost relay is shown reconnecting, an unreachable one unreachable (counted as an error).
        """
        self.reporter.lease("https://a.localhost:8443", "r:4017", "127.0.0.1:8000", None)
        self.reporter.state("disconnected", "r:4017", "lost the relay; reconnecting")
        self.assertEqual(self.status.relays[("", "r:4017")].state, "reconnecting")
        self.reporter.state("unreachable", "s:4017", "cannot reach the relay")
        self.assertEqual(self.status.relays[("", "s:4017")].state, "unreachable")
        self.assertEqual(self.status.relays[("", "s:4017")].errors, 1)

    def test_drawsAndPrintsAbove(self) -> None:
        """
        Started, the status is redrawn every L{REFRESH} seconds on the terminal, and the reporter's
        lines are printed there too; stopped, it stops redrawing.
        """
        self.status.start()
        self.reporter.lease("https://a.localhost:8443", "r:4017", "127.0.0.1:8000", None)
        self.clock.advance(REFRESH)
        screen = self.screen.getvalue()
        self.assertIn("Forwarding https://a.localhost:8443 -> 127.0.0.1:8000", screen)
        self.assertIn("connections", screen)
        self.status.stop()
        before = self.screen.getvalue()
        self.clock.advance(REFRESH * 4)
        self.assertEqual(self.screen.getvalue(), before)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_tunnelsByName(self) -> None:
        """
        With several named tunnels (C{portal start}), each counts its own requests and the table
        has a tunnel column.
        """
        web = Reporter(io.StringIO())
        web.listeners.append(self.status.listenerFor("web"))
        api = Reporter(io.StringIO())
        api.listeners.append(self.status.listenerFor("api"))
        web.lease("https://web.localhost", "r:4017", "127.0.0.1:3000", None)
        api.lease("https://api.localhost", "r:4017", "127.0.0.1:3001", None)
        web.request("GET", "/", 200, 1, 1.0, "/", "127.0.0.1:3000")
        self.assertEqual(self.status.relays[("web", "r:4017")].requests, 1)
        self.assertEqual(self.status.relays[("api", "r:4017")].requests, 0)
        self.assertIn("tunnel", self.rendered())
