"""
Tests for L{portal.relay.udp}.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import MessageLengthError
from twisted.internet.interfaces import IUDPTransport
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from portal.forwarding.refusals import Refusals
from portal.relay import udp
from portal.relay.udp import (
    DROP_REASONS,
    FLOW_LIMIT_LOG_INTERVAL,
    MAX_PACKET_SIZE,
    PublicUDP,
)
from portal.wire.udpseal import MAX_DATAGRAM

ALICE = ("192.0.2.1", 40001)
BOB = ("192.0.2.2", 40002)
CAROL = ("198.51.100.3", 40003)
DAVE = ("198.51.100.4", 40004)

#: The idle timeout the tests use, and the sweep interval it implies.
IDLE = 60.0
SWEEP = IDLE / 4


@implementer(IUDPTransport)
class RecordingUDPTransport:
    """
    An L{IUDPTransport} that records what is written to it, like Twisted's
    C{twisted.names.test.test_util.MemoryDatagramTransport}, and can be told to fail writes.

    @ivar written: The (datagram, address) pairs written, oldest first.
    @ivar failWith: An exception for L{write} to raise instead of recording, or C{None}.
    """

    def __init__(self, protocol: PublicUDP) -> None:
        """
        @param protocol: The protocol to stop when the port stops listening.
        """
        self._protocol = protocol
        self.written: list[tuple[bytes, tuple[Any, ...]]] = []
        self.failWith: Exception | None = None

    def write(self, packet: bytes, addr: Any = None) -> None:
        """
        Record a datagram, or raise L{failWith}.

        @param packet: The datagram.
        @param addr: Where to.
        """
        if self.failWith is not None:
            raise self.failWith
        self.written.append((packet, addr))

    def connect(self, host: str, port: int) -> None:
        """
        Not used: the public port is not connected.

        @param host: Unused.
        @param port: Unused.
        """
        raise NotImplementedError("the public port is never connected")

    def getHost(self) -> IPv4Address:
        """
        @return: A made-up local address.
        """
        return IPv4Address("UDP", "0.0.0.0", 9000)

    def stopListening(self) -> Deferred[None]:
        """
        Stop the protocol as a real port does.

        @return: An already fired L{Deferred}.
        """
        self._protocol.doStop()
        return succeed(None)

    def setBroadcastAllowed(self, enabled: bool) -> None:
        """
        Not used.

        @param enabled: Unused.
        """

    def getBroadcastAllowed(self) -> bool:
        """
        @return: C{False}.
        """
        return False


class PublicUDPTests(SynchronousTestCase):
    """
    Tests for L{PublicUDP}: flows, replies, limits, idle expiry and stopping.
    """

    def setUp(self) -> None:
        """
        Build a port with a 60 second idle timeout and at most three flows on a fake clock,
        connected to a recording transport, recording what it forwards and closes, and watch log
        events.
        """
        self.clock = Clock()
        self.clock.advance(1000)
        self.forwarded: list[tuple[int, bytes]] = []
        self.closed: list[int] = []
        self.closedAt: dict[int, float] = {}
        self.port = self.makePort(maxFlows=3)
        self.transport = RecordingUDPTransport(self.port)
        self.port.makeConnection(self.transport)
        self.events = EventLoggingObserver.createWithCleanup(
            self,  # type: ignore[arg-type]
            globalLogPublisher,
        )

    def makePort(self, **kwargs: Any) -> PublicUDP:
        """
        @param kwargs: Keyword arguments for L{PublicUDP}, beyond the defaults here.
        @return: A port named C{"game"} on the test clock, forwarding to C{self.forwarded} and
            reporting closed flows to C{self.closed} and C{self.closedAt}.
        """
        kwargs.setdefault("idleTimeout", IDLE)
        return PublicUDP(
            self.clock,
            lambda flowId, data: self.forwarded.append((flowId, data)),
            name="game",
            onFlowClosed=self.flowClosed,
            **kwargs,
        )

    def flowClosed(self, flowId: int) -> None:
        """
        Record a flow closed for being idle, and when.

        @param flowId: The flow.
        """
        self.closed.append(flowId)
        self.closedAt[flowId] = self.clock.seconds()

    def advanceBy(self, seconds: float, step: float = 0.25) -> None:
        """
        Advance the clock in small steps, so that callbacks see the time they were due.

        @param seconds: How far.
        @param step: How far each step.
        """
        end = self.clock.seconds() + seconds
        while self.clock.seconds() + step < end:
            self.clock.advance(step)
        self.clock.advance(end - self.clock.seconds())

    def limitEvents(self) -> list[dict[str, Any]]:
        """
        @return: The log events about refused new flows.
        """
        return [event for event in self.events if "refused" in event]

    def test_transport(self) -> None:
        """
        The fake transport provides L{IUDPTransport}.
        """
        self.assertTrue(verifyObject(IUDPTransport, self.transport))

    def test_initialState(self) -> None:
        """
        A new port has no flows, counts nothing, every drop reason is at zero, and runs no timer.
        """
        self.assertEqual(self.port.flows, 0)
        self.assertEqual(self.port.received, 0)
        self.assertEqual(self.port.sent, 0)
        self.assertEqual(
            self.port.dropped,
            {
                "too_many_flows": 0,
                "too_many_flows_per_source": 0,
                "flow_ids_exhausted": 0,
                "unknown_flow": 0,
                "send_failed": 0,
                "stopped": 0,
            },
        )
        self.assertEqual(set(DROP_REASONS), set(self.port.dropped))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.port.name, "game")
        self.assertEqual(self.port.idleTimeout, IDLE)
        self.assertEqual(self.port.maxFlows, 3)

    def test_perSourceLimit(self) -> None:
        """
        A source sending from many ports gets at most C{maxFlowsPerSource} flows; its other
        datagrams are dropped and counted (in L{Refusals} when given); another source still opens
        a flow, and a forgotten flow frees a place.
        """
        refusals = Refusals(self.clock)
        port = self.makePort(maxFlows=100, maxFlowsPerSource=2, refusals=refusals)
        port.makeConnection(RecordingUDPTransport(port))
        for sourcePort in range(1000, 1050):
            port.datagramReceived(b"x", ("192.0.2.1", sourcePort))
        self.assertEqual(port.flows, 2)
        self.assertEqual(port.dropped["too_many_flows_per_source"], 48)
        self.assertEqual(refusals.counts, {"udp_flows_per_source": 48})
        port.datagramReceived(b"y", ("192.0.2.2", 1000))
        self.assertEqual(port.flows, 3)
        self.assertEqual(self.forwarded[-1], (3, b"y"))
        port.closeFlow(1)
        port.datagramReceived(b"z", ("192.0.2.1", 2000))
        self.assertEqual(self.forwarded[-1], (4, b"z"))

    def test_totalLimitCounted(self) -> None:
        """
        New flows over C{maxFlows} are counted in L{Refusals} as C{udp_flows} (and logged here).
        """
        refusals = Refusals(self.clock)
        port = self.makePort(maxFlows=2, refusals=refusals)
        port.makeConnection(RecordingUDPTransport(port))
        for host in ("192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4"):
            port.datagramReceived(b"x", (host, 1000))
        self.assertEqual(refusals.counts, {"udp_flows": 2})
        self.assertEqual(port.dropped["too_many_flows"], 2)

    def test_perSourceIPv6(self) -> None:
        """
        IPv6 visitors in one /64 are one source; without L{Refusals} the refusal is logged here.
        """
        port = self.makePort(maxFlows=100, maxFlowsPerSource=1)
        port.makeConnection(RecordingUDPTransport(port))
        port.datagramReceived(b"x", ("2001:db8::1", 1, 0, 0))
        port.datagramReceived(b"x", ("2001:db8::2", 1, 0, 0))
        port.datagramReceived(b"x", ("2001:db8:0:1::2", 1, 0, 0))
        self.assertEqual(port.flows, 2)
        self.assertEqual(port.dropped["too_many_flows_per_source"], 1)
        [event] = [e for e in self.events if e.get("source") == "2001:db8::/64"]
        self.assertEqual(event["maximum"], 1)

    def test_defaults(self) -> None:
        """
        By default flows last 60 idle seconds and at most 1024 are live.
        """
        port = PublicUDP(self.clock, lambda flowId, data: None, name="x")
        self.assertEqual(port.idleTimeout, 60.0)
        self.assertEqual(port.maxFlows, 1024)

    def test_maxPacketSize(self) -> None:
        """
        The C{maxPacketSize} callers must listen with holds the largest UDP datagram.
        """
        self.assertEqual(MAX_PACKET_SIZE, 65535)

    def test_badArguments(self) -> None:
        """
        An idle timeout that is not a positive finite number, or fewer than one flow, is refused.
        """
        for idleTimeout in [0.0, -1.0, float("nan"), float("inf")]:
            self.assertRaises(ValueError, self.makePort, idleTimeout=idleTimeout)
        self.assertRaises(ValueError, self.makePort, maxFlows=0)

    def test_twoVisitors(self) -> None:
        """
        Two visitors get different flow ids, from 1 up, and their datagrams are forwarded with
        them.
        """
        self.port.datagramReceived(b"from alice", ALICE)
        self.port.datagramReceived(b"from bob", BOB)
        self.assertEqual(self.forwarded, [(1, b"from alice"), (2, b"from bob")])
        self.assertEqual(self.port.flows, 2)
        self.assertEqual(self.port.received, 2)
        self.assertEqual(self.port.flowAddress(1), ALICE)
        self.assertEqual(self.port.flowAddress(2), BOB)

    def test_sameVisitor(self) -> None:
        """
        A visitor keeps its flow id for every datagram while its flow is live.
        """
        self.port.datagramReceived(b"one", ALICE)
        self.port.datagramReceived(b"x", BOB)
        self.port.datagramReceived(b"two", ALICE)
        self.port.datagramReceived(b"three", ALICE)
        self.assertEqual(self.forwarded, [(1, b"one"), (2, b"x"), (1, b"two"), (1, b"three")])
        self.assertEqual(self.port.flows, 2)
        self.assertEqual(self.port.received, 4)

    def test_samePortOtherHost(self) -> None:
        """
        Visitors are told apart by host and port together.
        """
        self.port.datagramReceived(b"a", ("192.0.2.1", 5000))
        self.port.datagramReceived(b"b", ("192.0.2.2", 5000))
        self.port.datagramReceived(b"c", ("192.0.2.1", 5001))
        self.assertEqual(self.forwarded, [(1, b"a"), (2, b"b"), (3, b"c")])

    def test_replies(self) -> None:
        """
        The tunnel's datagram for a flow is written to that flow's visitor.
        """
        self.port.datagramReceived(b"a", ALICE)
        self.port.datagramReceived(b"b", BOB)
        self.assertTrue(self.port.fromTunnel(2, b"to bob"))
        self.assertTrue(self.port.fromTunnel(1, b"to alice"))
        self.assertEqual(self.transport.written, [(b"to bob", BOB), (b"to alice", ALICE)])
        self.assertEqual(self.port.sent, 2)

    def test_unknownFlow(self) -> None:
        """
        A datagram from the tunnel for a flow that is not live is dropped and counted.
        """
        self.port.datagramReceived(b"a", ALICE)
        self.assertFalse(self.port.fromTunnel(2, b"nobody"))
        self.assertFalse(self.port.fromTunnel(0, b"nobody"))
        self.assertEqual(self.transport.written, [])
        self.assertEqual(self.port.dropped["unknown_flow"], 2)
        self.assertEqual(self.port.sent, 0)

    def test_flowAddressUnknown(self) -> None:
        """
        L{PublicUDP.flowAddress} of a flow that is not live is C{None}.
        """
        self.assertIsNone(self.port.flowAddress(1))
        self.port.datagramReceived(b"a", ALICE)
        self.assertIsNone(self.port.flowAddress(2))

    def test_emptyDatagram(self) -> None:
        """
        An empty datagram is a datagram: it opens a flow and is forwarded, and an empty reply is
        written.
        """
        self.port.datagramReceived(b"", ALICE)
        self.assertEqual(self.forwarded, [(1, b"")])
        self.assertEqual(self.port.received, 1)
        self.assertTrue(self.port.fromTunnel(1, b""))
        self.assertEqual(self.transport.written, [(b"", ALICE)])

    def test_largeDatagrams(self) -> None:
        """
        Datagrams of 9,000 bytes and of the largest UDP payload pass whole, both ways.
        """
        for size in [9000, MAX_DATAGRAM]:
            payload = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
            self.port.datagramReceived(payload, ALICE)
            self.assertEqual(self.forwarded[-1], (1, payload))
            self.port.fromTunnel(1, payload)
            self.assertEqual(self.transport.written[-1], (payload, ALICE))

    def test_ipv6(self) -> None:
        """
        An IPv6 visitor's flow is keyed on (host, port), whether its address comes with flow info
        and scope id or not; replies go to the address as first received.
        """
        long = ("2001:db8::1", 5000, 0, 0)
        self.port.datagramReceived(b"a", long)
        self.port.datagramReceived(b"b", ("2001:db8::1", 5000))
        self.port.datagramReceived(b"c", ("2001:db8::1", 5001, 0, 0))
        self.assertEqual(self.forwarded, [(1, b"a"), (1, b"b"), (2, b"c")])
        self.assertEqual(self.port.flowAddress(1), ("2001:db8::1", 5000))
        self.assertEqual(self.port.flowAddress(2), ("2001:db8::1", 5001))
        self.assertTrue(self.port.fromTunnel(1, b"reply"))
        self.assertEqual(self.transport.written, [(b"reply", long)])

    def test_sendFailure(self) -> None:
        """
        A reply the socket refuses is dropped and counted, and not counted as sent.
        """
        self.port.datagramReceived(b"a", ALICE)
        for error in [OSError(105, "No buffer space available"), MessageLengthError()]:
            self.transport.failWith = error
            self.assertFalse(self.port.fromTunnel(1, b"reply"))
        self.assertEqual(self.port.dropped["send_failed"], 2)
        self.assertEqual(self.port.sent, 0)
        self.transport.failWith = None
        self.assertTrue(self.port.fromTunnel(1, b"reply"))
        self.assertEqual(self.port.sent, 1)

    def test_idleExpiry(self) -> None:
        """
        A flow with no datagram is forgotten, and C{onFlowClosed} called, between C{idleTimeout}
        and 1.25 times C{idleTimeout} after its last datagram, and not before.
        """
        start = self.clock.seconds()
        self.port.datagramReceived(b"a", ALICE)
        self.advanceBy(IDLE - 0.25)
        self.assertEqual(self.closed, [])
        self.assertEqual(self.port.flowAddress(1), ALICE)
        self.advanceBy(IDLE * 0.25 + 0.25)
        self.assertEqual(self.closed, [1])
        self.assertTrue(start + IDLE <= self.closedAt[1] <= start + IDLE * 1.25)
        self.assertEqual(self.port.flows, 0)
        self.assertIsNone(self.port.flowAddress(1))
        self.assertFalse(self.port.fromTunnel(1, b"late"))
        self.assertEqual(self.port.dropped["unknown_flow"], 1)

    def test_idleExpiryBounds(self) -> None:
        """
        Whenever in a sweep interval a flow's last datagram came, the flow is forgotten no sooner
        than C{idleTimeout} and no later than 1.25 times C{idleTimeout} after it.
        """
        self.port = self.makePort(maxFlows=100)
        self.port.makeConnection(self.transport)
        last: dict[int, float] = {}
        for n in range(40):
            host = ("192.0.2.9", 1000 + n)
            self.port.datagramReceived(b"x", host)
            last[n + 1] = self.clock.seconds()
            # 40 steps of 0.75 s cover two sweep intervals at many offsets, and hit some sweeps.
            self.clock.advance(0.75)
        self.advanceBy(IDLE * 2)
        self.assertEqual(sorted(self.closed), sorted(last))
        for flowId, when in last.items():
            self.assertTrue(
                when + IDLE <= self.closedAt[flowId] <= when + IDLE * 1.25,
                f"flow {flowId} last active at {when} closed at {self.closedAt[flowId]}",
            )

    def test_visitorActivityRefreshes(self) -> None:
        """
        Datagrams from the visitor keep its flow alive for as long as they come.
        """
        self.port.datagramReceived(b"a", ALICE)
        for _ in range(10):
            self.advanceBy(IDLE - 1)
            self.port.datagramReceived(b"again", ALICE)
        self.assertEqual(self.closed, [])
        self.assertEqual({flowId for flowId, _ in self.forwarded}, {1})
        last = self.clock.seconds()
        self.advanceBy(IDLE * 1.25)
        self.assertEqual(self.closed, [1])
        self.assertTrue(last + IDLE <= self.closedAt[1])

    def test_tunnelActivityRefreshes(self) -> None:
        """
        Datagrams from the tunnel to the visitor keep the flow alive too.
        """
        self.port.datagramReceived(b"a", ALICE)
        for _ in range(10):
            self.advanceBy(IDLE - 1)
            self.assertTrue(self.port.fromTunnel(1, b"reply"))
        self.assertEqual(self.closed, [])
        last = self.clock.seconds()
        self.advanceBy(IDLE * 1.25)
        self.assertEqual(self.closed, [1])
        self.assertTrue(last + IDLE <= self.closedAt[1])

    def test_failedReplyRefreshes(self) -> None:
        """
        A datagram from the tunnel keeps the flow alive even if the socket refuses it: the flow
        is in use.
        """
        self.port.datagramReceived(b"a", ALICE)
        self.transport.failWith = OSError(105, "No buffer space available")
        for _ in range(4):
            self.advanceBy(IDLE - 1)
            self.port.fromTunnel(1, b"reply")
        self.assertEqual(self.closed, [])

    def test_onlyIdleFlowsExpire(self) -> None:
        """
        An idle flow is forgotten while a busy one lives on.
        """
        self.port.datagramReceived(b"a", ALICE)
        self.port.datagramReceived(b"b", BOB)
        for _ in range(8):
            self.advanceBy(SWEEP)
            self.port.datagramReceived(b"b", BOB)
        self.assertEqual(self.closed, [1])
        self.assertEqual(self.port.flowAddress(2), BOB)
        self.assertEqual(self.port.flows, 1)

    def test_newFlowAfterExpiry(self) -> None:
        """
        A visitor whose flow expired gets a new flow id, never the old one.
        """
        self.port.datagramReceived(b"a", ALICE)
        self.advanceBy(IDLE * 1.25)
        self.assertEqual(self.closed, [1])
        self.port.datagramReceived(b"again", ALICE)
        self.assertEqual(self.forwarded, [(1, b"a"), (2, b"again")])
        self.assertFalse(self.port.fromTunnel(1, b"old"))
        self.assertTrue(self.port.fromTunnel(2, b"new"))
        self.assertEqual(self.transport.written, [(b"new", ALICE)])

    def test_lateReactor(self) -> None:
        """
        When the reactor runs the sweep late, the sweep intervals it missed count as idle: a flow
        that was idle at the last sweep is forgotten at once.
        """
        self.port.datagramReceived(b"a", ALICE)
        self.clock.advance(SWEEP)
        self.assertEqual(self.closed, [])
        self.clock.advance(IDLE * 10)
        self.assertEqual(self.closed, [1])

    def test_lateReactorAfterActivity(self) -> None:
        """
        A late sweep does not forget a flow that was active since the sweep before it.
        """
        self.port.datagramReceived(b"a", ALICE)
        self.clock.advance(SWEEP)
        self.port.datagramReceived(b"b", ALICE)
        self.clock.advance(IDLE * 10)
        self.assertEqual(self.closed, [])
        self.assertEqual(self.port.flows, 1)

    def test_oneTimer(self) -> None:
        """
        However many flows are live, the port runs one timer, and none once every flow is gone.
        """
        self.port = self.makePort(maxFlows=100)
        self.port.makeConnection(self.transport)
        for n in range(50):
            self.port.datagramReceived(b"x", ("192.0.2.9", 1000 + n))
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.advanceBy(IDLE * 1.25)
        self.assertEqual(len(self.closed), 50)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.port.datagramReceived(b"x", ALICE)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.assertTrue(self.port.closeFlow(51))
        self.advanceBy(SWEEP)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_onFlowClosedFails(self) -> None:
        """
        An exception from C{onFlowClosed} is logged; other flows are still reported and expiry
        goes on.
        """
        calls: list[int] = []

        def flowClosed(flowId: int) -> None:
            calls.append(flowId)
            raise RuntimeError("tunnel gone")

        self.port = PublicUDP(
            self.clock,
            lambda flowId, data: None,
            name="game",
            idleTimeout=IDLE,
            onFlowClosed=flowClosed,
        )
        self.port.makeConnection(self.transport)
        self.port.datagramReceived(b"a", ALICE)
        self.port.datagramReceived(b"b", BOB)
        self.advanceBy(IDLE * 1.25)
        self.assertEqual(sorted(calls), [1, 2])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)
        self.port.datagramReceived(b"c", CAROL)
        self.advanceBy(IDLE * 1.25)
        self.assertEqual(calls[-1], 3)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_noOnFlowClosed(self) -> None:
        """
        Without C{onFlowClosed}, idle flows are still forgotten.
        """
        port = PublicUDP(self.clock, lambda flowId, data: None, name="x", idleTimeout=IDLE)
        port.datagramReceived(b"a", ALICE)
        self.advanceBy(IDLE * 1.25)
        self.assertEqual(port.flows, 0)

    def test_maxFlows(self) -> None:
        """
        A datagram from a new visitor while C{maxFlows} flows are live is dropped and counted;
        the live flows carry on both ways.
        """
        for visitor in [ALICE, BOB, CAROL]:
            self.port.datagramReceived(b"hi", visitor)
        self.port.datagramReceived(b"me too", DAVE)
        self.assertEqual(self.port.dropped["too_many_flows"], 1)
        self.assertEqual(self.port.flows, 3)
        self.assertEqual([flowId for flowId, _ in self.forwarded], [1, 2, 3])
        self.assertEqual(self.port.received, 3)
        self.port.datagramReceived(b"still here", ALICE)
        self.assertEqual(self.forwarded[-1], (1, b"still here"))
        self.assertTrue(self.port.fromTunnel(3, b"to carol"))
        self.assertEqual(self.transport.written, [(b"to carol", CAROL)])

    def test_maxFlowsFreed(self) -> None:
        """
        Once a flow is gone, a new visitor gets a flow again.
        """
        for visitor in [ALICE, BOB, CAROL]:
            self.port.datagramReceived(b"hi", visitor)
        self.port.datagramReceived(b"refused", DAVE)
        self.port.closeFlow(2)
        self.port.datagramReceived(b"welcome", DAVE)
        self.assertEqual(self.forwarded[-1], (4, b"welcome"))
        self.assertEqual(self.port.flowAddress(4), DAVE)
        self.assertEqual(self.port.dropped["too_many_flows"], 1)

    def test_maxFlowsLogged(self) -> None:
        """
        Refusing a new visitor for want of a flow is logged as a warning naming the lease, the
        limit and the visitor.
        """
        for visitor in [ALICE, BOB, CAROL]:
            self.port.datagramReceived(b"hi", visitor)
        self.assertEqual(self.limitEvents(), [])
        self.port.datagramReceived(b"me too", DAVE)
        [event] = self.limitEvents()
        self.assertEqual(event["log_level"], LogLevel.warn)
        self.assertEqual(event["name"], "game")
        self.assertEqual(event["maxFlows"], 3)
        self.assertEqual(event["refused"], 1)
        self.assertEqual((event["host"], event["port"]), DAVE)
        self.assertEqual(
            formatEvent(event),
            "UDP port for game has 3 live flows, the most allowed; refused 1 new visitor "
            "datagram(s), the latest from 198.51.100.4 port 40004",
        )

    def test_maxFlowsLogRateLimited(self) -> None:
        """
        Refusals are logged at most once every L{FLOW_LIMIT_LOG_INTERVAL} seconds of clock time;
        the next event counts every refusal since the last.
        """
        self.assertEqual(FLOW_LIMIT_LOG_INTERVAL, 10.0)
        for visitor in [ALICE, BOB, CAROL]:
            self.port.datagramReceived(b"hi", visitor)
        for n in range(100):
            self.port.datagramReceived(b"flood", ("203.0.113.1", 2000 + n))
            self.clock.advance(0.099)
        self.assertEqual(len(self.limitEvents()), 1)
        self.clock.advance(FLOW_LIMIT_LOG_INTERVAL - 0.099 * 100)
        self.port.datagramReceived(b"flood", ("203.0.113.1", 3000))
        events = self.limitEvents()
        self.assertEqual(len(events), 2)
        self.assertEqual(events[1]["refused"], 100)
        self.assertEqual((events[1]["host"], events[1]["port"]), ("203.0.113.1", 3000))
        self.assertEqual(self.port.dropped["too_many_flows"], 101)

    def test_maxFlowsLogAgainLater(self) -> None:
        """
        A refusal long after the last event is logged at once, counting only itself.
        """
        for visitor in [ALICE, BOB, CAROL]:
            self.port.datagramReceived(b"hi", visitor)
        self.port.datagramReceived(b"refused", DAVE)
        self.clock.advance(FLOW_LIMIT_LOG_INTERVAL)
        self.port.datagramReceived(b"refused", DAVE)
        self.assertEqual([event["refused"] for event in self.limitEvents()], [1, 1])

    def test_flowIdsExhausted(self) -> None:
        """
        Once every flow id up to the largest has been used, new visitors are refused, counted and
        logged once, even when no flow is live; flow ids are never reused.
        """
        self.patch(udp, "MAX_FLOW_ID", 2)
        self.port.datagramReceived(b"a", ALICE)
        self.port.datagramReceived(b"b", BOB)
        self.port.datagramReceived(b"c", CAROL)
        self.assertEqual([flowId for flowId, _ in self.forwarded], [1, 2])
        self.port.closeFlow(1)
        self.port.closeFlow(2)
        self.port.datagramReceived(b"a", ALICE)
        self.port.datagramReceived(b"d", DAVE)
        self.assertEqual(len(self.forwarded), 2)
        self.assertEqual(self.port.flows, 0)
        self.assertEqual(self.port.dropped["flow_ids_exhausted"], 3)
        self.assertEqual(self.port.dropped["too_many_flows"], 0)
        exhausted = [event for event in self.events if "every flow id" in event["log_format"]]
        self.assertEqual(len(exhausted), 1)
        self.assertEqual(exhausted[0]["name"], "game")

    def test_largestFlowId(self) -> None:
        """
        Flow ids go up to 2**32 - 1, the largest that fits the 4 bytes L{portal.wire.udpseal} carries.
        """
        self.assertEqual(udp.MAX_FLOW_ID, 2**32 - 1)

    def test_closeFlow(self) -> None:
        """
        L{PublicUDP.closeFlow} forgets a live flow without calling C{onFlowClosed}; the visitor's
        next datagram opens a new flow.
        """
        self.port.datagramReceived(b"a", ALICE)
        self.port.datagramReceived(b"b", BOB)
        self.assertTrue(self.port.closeFlow(1))
        self.assertEqual(self.port.flows, 1)
        self.assertIsNone(self.port.flowAddress(1))
        self.assertFalse(self.port.fromTunnel(1, b"late"))
        self.assertEqual(self.port.dropped["unknown_flow"], 1)
        self.port.datagramReceived(b"again", ALICE)
        self.assertEqual(self.forwarded[-1], (3, b"again"))
        self.advanceBy(IDLE * 1.25)
        self.assertEqual(sorted(self.closed), [2, 3])

    def test_closeUnknownFlow(self) -> None:
        """
        Closing a flow that is not live changes nothing.
        """
        self.port.datagramReceived(b"a", ALICE)
        self.assertFalse(self.port.closeFlow(2))
        self.assertTrue(self.port.closeFlow(1))
        self.assertFalse(self.port.closeFlow(1))
        self.assertEqual(self.port.flows, 0)

    def test_stop(self) -> None:
        """
        L{PublicUDP.stop} forgets every flow without calling C{onFlowClosed}, stops the sweep,
        and makes the port drop every datagram, counted as C{"stopped"}.
        """
        self.port.datagramReceived(b"a", ALICE)
        self.port.datagramReceived(b"b", BOB)
        self.port.stop()
        self.assertEqual(self.port.flows, 0)
        self.assertIsNone(self.port.flowAddress(1))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.port.datagramReceived(b"after", ALICE)
        self.port.datagramReceived(b"after", CAROL)
        self.assertFalse(self.port.fromTunnel(1, b"after"))
        self.assertEqual(len(self.forwarded), 2)
        self.assertEqual(self.transport.written, [])
        self.assertEqual(self.port.dropped["stopped"], 3)
        self.assertEqual(self.port.received, 2)
        self.assertEqual(self.port.flows, 0)
        self.advanceBy(IDLE * 2)
        self.assertEqual(self.closed, [])
        self.port.stop()
        self.assertEqual(self.port.dropped["stopped"], 3)

    def test_stopListening(self) -> None:
        """
        When the port stops listening, the protocol stops too.
        """
        self.port.datagramReceived(b"a", ALICE)
        self.transport.stopListening()
        self.assertEqual(self.port.flows, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.port.datagramReceived(b"after", ALICE)
        self.assertEqual(self.port.dropped["stopped"], 1)

    def test_stopInOnFlowClosed(self) -> None:
        """
        C{onFlowClosed} may stop the port: every flow expired by that sweep is still reported,
        and no timer is left running.
        """
        calls: list[int] = []

        def flowClosed(flowId: int) -> None:
            calls.append(flowId)
            port.stop()

        port = PublicUDP(
            self.clock,
            lambda flowId, data: None,
            name="game",
            idleTimeout=IDLE,
            onFlowClosed=flowClosed,
        )
        port.datagramReceived(b"a", ALICE)
        port.datagramReceived(b"b", BOB)
        self.advanceBy(SWEEP)
        port.datagramReceived(b"c", CAROL)
        self.advanceBy(IDLE)
        self.assertEqual(sorted(calls), [1, 2])
        self.assertEqual(port.flows, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_notListening(self) -> None:
        """
        A datagram from the tunnel before the port listens is dropped and counted.
        """
        port = self.makePort()
        self.assertFalse(port.fromTunnel(1, b"early"))
        self.assertEqual(port.dropped["stopped"], 1)
