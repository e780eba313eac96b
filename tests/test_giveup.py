"""
Tests for L{portal.tunnel.giveup}: C{--give-up-after}.
"""

from __future__ import annotations

import io
import os
import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from portal.tunnel.config import ConfigError, TunnelConfig, buildConfig
from portal.tunnel.giveup import giveUpUnlessReached
from portal.tunnel.report import Reporter
from tests.realprocesses import homeDir, spawn


class _Tunnel:
    """
    What L{giveUpUnlessReached} uses of a L{portal.tunnel.service.TunnelService}.
    """

    def __init__(self, config: TunnelConfig) -> None:
        self.config = config
        self.reporter = Reporter(io.StringIO(), asJSON=True)
        self.running = True
        self.fatals: list[str] = []

    def fatal(self, message: str, relay: str = "") -> None:
        """
        Record a fatal error.
        """
        self.fatals.append(message)


class GiveUpTests(SynchronousTestCase):
    """
    Tests for L{giveUpUnlessReached}.
    """

    def setUp(self) -> None:
        """
        A clock.
        """
        self.clock = Clock()

    def test_neverReached(self) -> None:
        """
        A tunnel none of whose relays gave a lease in time stops, naming them.
        """
        tunnel = _Tunnel(buildConfig("8000", relays=["a:1", "b:2"], giveUpAfter=5))
        giveUpUnlessReached(self.clock, tunnel)  # type: ignore[arg-type]
        self.clock.advance(4.9)
        self.assertEqual(tunnel.fatals, [])
        self.clock.advance(0.1)
        self.assertEqual(len(tunnel.fatals), 1)
        self.assertIn("never reached any of a:1, b:2 in 5 s; giving up", tunnel.fatals[0])

    def test_reached(self) -> None:
        """
        A tunnel whose relay gave a lease (even one since lost) keeps running.
        """
        tunnel = _Tunnel(buildConfig("8000", relays=["a:1"], giveUpAfter=5))
        giveUpUnlessReached(self.clock, tunnel)  # type: ignore[arg-type]
        tunnel.reporter.lease("https://x.localhost", "a:1", "127.0.0.1:8000", None)
        self.clock.advance(5)
        self.assertEqual(tunnel.fatals, [])

    def test_someReached(self) -> None:
        """
        When some relays gave a lease and others not, the others are reported and the tunnel runs.
        """
        tunnel = _Tunnel(buildConfig("8000", relays=["a:1", "b:2"], giveUpAfter=5))
        giveUpUnlessReached(self.clock, tunnel)  # type: ignore[arg-type]
        tunnel.reporter.lease("https://x.localhost", "a:1", "127.0.0.1:8000", None)
        self.clock.advance(5)
        self.assertEqual(tunnel.fatals, [])
        self.assertEqual(
            [(e["event"], e["relay"]) for e in tunnel.reporter.events][-1], ("unreached", "b:2")
        )

    def test_nothingToCheck(self) -> None:
        """
        With C{--give-up-after 0}, or relays from a registry only, nothing is scheduled.
        """
        self.assertIsNone(
            giveUpUnlessReached(self.clock, _Tunnel(buildConfig("8000", giveUpAfter=0)))  # type: ignore[arg-type]
        )
        self.assertIsNone(
            giveUpUnlessReached(self.clock, _Tunnel(buildConfig("8000", registry="r.json")))  # type: ignore[arg-type]
        )

    def test_bounds(self) -> None:
        """
        The option is between 0 and a day; the default is 60 s.
        """
        self.assertEqual(buildConfig("8000").giveUpAfter, 60.0)
        for bad in (-1, 86401):
            self.assertRaises(ConfigError, buildConfig, "8000", giveUpAfter=bad)


class GiveUpEndToEndTests(TestCase):
    """
    A real C{portal expose} whose relay never answers.
    """

    timeout = 60

    @inlineCallbacks
    def test_exitsOne(self) -> Any:
        """
        C{portal expose --relay CLOSED --give-up-after 1} exits 1 with the reason.
        """
        listening = yield serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(Factory())
        closed = listening.getHost().port
        yield listening.stopListening()
        home = homeDir(self, "tunnel")
        argv = [sys.executable, "-m", "portal", "expose", "8000", "--relay", f"127.0.0.1:{closed}"]
        argv += ["--identity", os.path.join(home, "identity.json"), "--give-up-after", "1"]
        tunnel = spawn(self, "portal expose", argv, home)
        code = yield tunnel.ended
        self.assertEqual(code, 1, tunnel.output())
        self.assertIn(f"never reached 127.0.0.1:{closed} in 1 s; giving up", tunnel.output())
