"""
Tests for L{portal.tunnel.targetcheck}: the startup check of a tunnel's local targets.
"""

from __future__ import annotations

import io
import json

from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from portal.tunnel.config import buildConfig
from portal.tunnel.report import Reporter
from portal.tunnel.targetcheck import CHECK_TIMEOUT, checkTargets, reportTargets, targetsOf


class TargetsOfTests(SynchronousTestCase):
    """
    Tests for L{targetsOf}.
    """

    def test_modes(self) -> None:
        """
        Stream and raw TCP modes check the target; routed HTTP mode every route's upstream, once
        each; UDP mode has nothing to check over TCP.
        """
        self.assertEqual(targetsOf(buildConfig("8000")), [("127.0.0.1", 8000)])
        self.assertEqual(targetsOf(buildConfig("h:22", tcp=True)), [("h", 22)])
        routed = buildConfig(
            "3000", http=True, httpRoutes=["/api=3001", "/v2=127.0.0.1:3001", "/s=https://h:443"]
        )
        self.assertEqual(
            sorted(targetsOf(routed)), [("127.0.0.1", 3000), ("127.0.0.1", 3001), ("h", 443)]
        )
        self.assertEqual(targetsOf(buildConfig("53", udp=True)), [])


class CheckTargetsTests(SynchronousTestCase):
    """
    Tests for L{checkTargets} and L{reportTargets}, on a memory reactor.
    """

    def setUp(self) -> None:
        """
        A memory reactor.
        """
        self.reactor = MemoryReactorClock()

    def connectors(self) -> dict[int, object]:
        """
        @return: The factory of each connection attempt, by port.
        """
        return {port: factory for _, port, factory, _, _ in self.reactor.tcpClients}

    def test_acceptedRefusedAndSilent(self) -> None:
        """
        A target that accepts gives no problem (and is disconnected); one that refuses, and one
        that does not answer within L{CHECK_TIMEOUT}, are each described once.
        """
        config = buildConfig("3000", http=True, httpRoutes=["/api=3001", "/x=3002"])
        d = checkTargets(self.reactor, config)
        factories = self.connectors()
        transport = StringTransport()
        factories[3000].buildProtocol(None).makeConnection(transport)  # type: ignore[attr-defined]
        factories[3001].clientConnectionFailed(None, Failure(ConnectionRefusedError()))  # type: ignore[attr-defined]
        self.assertNoResult(d)
        self.reactor.advance(CHECK_TIMEOUT)
        problems = self.successResultOf(d)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(len(problems), 2)
        self.assertIn(
            "127.0.0.1:3001 does not accept connections (Connection was refused", problems[0]
        )
        self.assertIn("127.0.0.1:3002 does not accept connections", problems[1])

    def test_reported(self) -> None:
        """
        Each problem is a C{target-down} event, on standard error in text mode.
        """
        out = io.StringIO()
        reporter = Reporter(out, asJSON=True)
        d = reportTargets(self.reactor, buildConfig("3000"), reporter)
        [factory] = self.connectors().values()
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))  # type: ignore[attr-defined]
        # HostnameEndpoint gives up on its last address on its next timed step.
        self.reactor.advance(1)
        self.successResultOf(d)
        [event] = [json.loads(line) for line in out.getvalue().splitlines()]
        self.assertEqual(event["event"], "target-down")
        self.assertIn("127.0.0.1:3000", event["message"])
        self.assertIn("target-down", Reporter.ERRORS)
