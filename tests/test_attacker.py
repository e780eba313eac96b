"""
Tests for L{benchmarks.attacker}, the attacker of the benchmark's "service under attack" scenario:
its loops stay within their bounds and count what the relay did to them, on an in-memory reactor.
"""

from __future__ import annotations

import json

import attrs
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from benchmarks.attacker import AttackPlan, IdleFlood, _reason, clientHello
from portal.wire.clienthello import parseClientHello


def _accept(reactor: MemoryReactorClock, index: int) -> tuple[object, StringTransport]:
    """
    Complete the C{index}-th connection attempt on C{reactor}.

    @return: The protocol and its transport.
    """
    factory = reactor.tcpClients[index][2]
    protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


class IdleFloodTests(SynchronousTestCase):
    """
    L{IdleFlood} holds at most its number of connections, opens at most its rate and budget, and
    tells connections the relay refused at once from those it held and timed out.
    """

    def setUp(self) -> None:
        """
        A flood of at most 3 connections, 10 a second, 5 attempts in all, sending C{hello}.
        """
        self.reactor = MemoryReactorClock()
        self.flood = IdleFlood(self.reactor, "127.0.0.2", 8443, b"hello", 3, 10, 5)
        self.flood.start()

    def test_pacedFromItsSource(self) -> None:
        """
        One connection is tried per tick of 0.1 s at 10 a second, each from the flood's source
        address to the port, until the 3 wanted are under way.
        """
        self.assertEqual(len(self.reactor.tcpClients), 1)
        self.reactor.advance(0.1)
        self.reactor.advance(0.1)
        self.reactor.advance(0.1)
        self.assertEqual(len(self.reactor.tcpClients), 3)
        host, port, _, _, bindAddress = self.reactor.tcpClients[0]
        self.assertEqual((host, port, bindAddress), ("127.0.0.1", 8443, ("127.0.0.2", 0)))

    def test_firstBytes(self) -> None:
        """
        Each connection sends the flood's first bytes and then nothing.
        """
        _, transport = _accept(self.reactor, 0)
        self.assertEqual(transport.value(), b"hello")

    def test_refusedAndHeld(self) -> None:
        """
        A connection closed within a second counts as refused at once and is replaced; one open
        for a second or more counts as held, and when the relay closes it, as closed after
        holding, with how long it was held.
        """
        refused, _ = _accept(self.reactor, 0)
        refused.connectionLost(Failure(ConnectionError()))  # type: ignore[attr-defined]
        self.reactor.advance(0.1)
        held, _ = _accept(self.reactor, 1)
        self.reactor.advance(2.0)
        held.connectionLost(Failure(ConnectionError()))  # type: ignore[attr-defined]
        report = self.flood.stop()
        self.assertEqual(report["refusedAtOnce"], 1)
        self.assertEqual(report["maxHeld"], 1)
        self.assertEqual(report["closedAfterHolding"], 1)
        self.assertAlmostEqual(report["closedAfterSecondsMedian"], 2.0, places=6)

    def test_budget(self) -> None:
        """
        However often the relay closes them, no more than the budget of attempts is made.
        """
        for index in range(20):
            self.reactor.advance(0.1)
            if index < len(self.reactor.tcpClients):
                protocol, _ = _accept(self.reactor, index)
                protocol.connectionLost(Failure(ConnectionError()))  # type: ignore[attr-defined]
        self.assertEqual(len(self.reactor.tcpClients), 5)
        self.assertEqual(self.flood.stop()["attempts"], 5)

    def test_stopClosesAll(self) -> None:
        """
        Stopping aborts every open connection, reports those held at the end, and counts no
        closing of its own as the relay's.
        """
        _, transport = _accept(self.reactor, 0)
        self.reactor.advance(1.5)
        report = self.flood.stop()
        self.assertTrue(transport.disconnecting)
        self.assertEqual(report["heldAtEnd"], 1)
        self.assertEqual(report["closedAfterHolding"], 0)


class HelpersTests(SynchronousTestCase):
    """
    The attacker's small helpers.
    """

    def test_clientHelloNamesTheRelay(self) -> None:
        """
        The stalled ClientHello is a real one, whose SNI is the relay's own hostname.
        """
        hello = parseClientHello(clientHello("relay.example"))
        self.assertEqual(hello.serverName, "relay.example")

    def test_reasonIsCountable(self) -> None:
        """
        A refusal is counted by its first clause, without the varying details after it.
        """
        self.assertEqual(
            _reason(RuntimeError("too many challenge requests; try again in 0.3 s")),
            "too many challenge requests",
        )
        self.assertEqual(_reason(ValueError()), "ValueError")

    def test_planRoundTrip(self) -> None:
        """
        A plan crosses to the attacker process as JSON and comes back equal.
        """
        plan = AttackPlan(
            seconds=3, publicPort=1, controlPort=2, httpPort=3, tcpPort=None, udpPort=4
        )
        self.assertEqual(AttackPlan(**json.loads(json.dumps(attrs.asdict(plan)))), plan)
