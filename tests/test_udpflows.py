"""
Tests for L{portal.tunnel.udpflows}, over an in-memory UDP reactor.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import CannotListenError, MessageLengthError
from twisted.internet.interfaces import IListeningPort, IReactorTime, IReactorUDP, IUDPTransport
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from portal.tunnel.addressrules import AddressRules
from portal.tunnel.control import TunnelControlProtocol
from portal.tunnel.udpflows import (
    DROP_REASONS,
    MAX_HELD_DATAGRAMS,
    MAX_PACKET_SIZE,
    FlowTable,
    localInterface,
)

_TARGET = ("127.0.0.1", 5353)
_NAMESPACE = "portal.tunnel.udpflows.FlowTable"


@implementer(IUDPTransport, IListeningPort)
class FakeUDPPort:
    """
    A UDP port of L{FakeUDPReactor}: records how it was opened, connected, written to and
    closed, and lets a test inject datagrams from its peer.

    @ivar number: The port number it pretends to be bound to.
    @ivar protocol: The protocol it delivers datagrams to.
    @ivar interface: The interface C{listenUDP} was asked to bind.
    @ivar maxPacketSize: The C{maxPacketSize} C{listenUDP} was given.
    @ivar connectedTo: The (host, port) passed to C{connect}, or C{None}.
    @ivar written: Every datagram written, in order.
    @ivar listening: Whether C{stopListening} has not been called yet.
    """

    def __init__(
        self,
        reactor: FakeUDPReactor,
        number: int,
        protocol: DatagramProtocol,
        interface: str,
        maxPacketSize: int,
    ) -> None:
        """
        @param reactor: The reactor that opened the port.
        @param number: The port number.
        @param protocol: The protocol.
        @param interface: The interface to pretend to be bound to.
        @param maxPacketSize: The largest datagram C{write} accepts.
        """
        self._reactor = reactor
        self.number = number
        self.protocol = protocol
        self.interface = interface
        self.maxPacketSize = maxPacketSize
        self.connectedTo: tuple[str, int] | None = None
        self.written: list[bytes] = []
        self.listening = True

    def connect(self, host: str, port: int) -> None:
        """
        Connect to a peer, failing with the reactor's C{connectError} if it has one.
        """
        if self.connectedTo is not None:
            raise RuntimeError("already connected")
        if self._reactor.connectError is not None:
            raise self._reactor.connectError
        self.connectedTo = (host, port)

    def write(self, packet: bytes, addr: Any = None) -> None:
        """
        Record a datagram sent to the connected peer, refusing it as the real port would if it is
        too long.
        """
        if not self.listening:
            raise AssertionError("write after stopListening")
        if self.connectedTo is None or addr is not None:
            raise AssertionError("the flow table writes only on connected sockets")
        if len(packet) > self.maxPacketSize:
            raise MessageLengthError("message too long")
        self.written.append(packet)

    def reply(self, datagram: bytes) -> None:
        """
        Deliver a datagram from the connected peer to the protocol.

        @param datagram: The datagram.
        """
        assert self.connectedTo is not None
        self.protocol.datagramReceived(datagram, self.connectedTo)

    def lose(self) -> None:
        """
        Close the port as the reactor does when it loses it, as Twisted's epoll reactor does when
        a datagram is refused: the protocol is stopped, and C{stopListening} is not called.
        """
        assert self.listening
        self.listening = False
        self.protocol.doStop()

    def startListening(self) -> None:
        """
        Unused: the port listens from the start.
        """

    def stopListening(self) -> Deferred[None]:
        """
        Close the port.
        """
        if self.listening:
            self.listening = False
            self.protocol.doStop()
        return succeed(None)

    def getHost(self) -> IPv4Address | IPv6Address:
        """
        @return: The address the port pretends to be bound to.
        """
        if ":" in self.interface:
            return IPv6Address("UDP", self.interface, self.number)
        return IPv4Address("UDP", self.interface, self.number)

    def setBroadcastAllowed(self, enabled: bool) -> None:
        """
        Unused.
        """

    def getBroadcastAllowed(self) -> bool:
        """
        @return: C{False}.
        """
        return False


@implementer(IReactorUDP)
class FakeUDPReactor(Clock):
    """
    An L{IReactorUDP} and L{IReactorTime} provider, in the style of the memory reactor of
    C{twisted.names.test.test_util}: time from L{Clock}, UDP ports in memory.

    @ivar ports: Every port opened, in order.
    @ivar listenCalls: The (port, interface, maxPacketSize) of every C{listenUDP} call.
    @ivar listenError: An exception for C{listenUDP} to raise, or C{None}.
    @ivar connectError: An exception for ports' C{connect} to raise, or C{None}.
    """

    def __init__(self) -> None:
        """
        Start with no ports.
        """
        super().__init__()
        self.ports: list[FakeUDPPort] = []
        self.listenCalls: list[tuple[int, str, int]] = []
        self.listenError: Exception | None = None
        self.connectError: Exception | None = None

    def listenUDP(
        self, port: int, protocol: DatagramProtocol, interface: str = "", maxPacketSize: int = 8192
    ) -> FakeUDPPort:
        """
        Pretend to bind a UDP port, a new number each time when C{port} is 0, and connect the
        protocol to it.
        """
        self.listenCalls.append((port, interface, maxPacketSize))
        if self.listenError is not None:
            raise self.listenError
        fake = FakeUDPPort(
            self, port or 40000 + len(self.ports), protocol, interface, maxPacketSize
        )
        self.ports.append(fake)
        protocol.makeConnection(fake)
        return fake


class FakesTests(SynchronousTestCase):
    """
    The fakes provide the interfaces the flow table uses.
    """

    def test_interfaces(self) -> None:
        """
        L{FakeUDPReactor} provides L{IReactorUDP} and L{IReactorTime}, and its ports provide
        L{IUDPTransport}.
        """
        reactor = FakeUDPReactor()
        self.assertTrue(verifyObject(IReactorUDP, reactor))
        self.assertTrue(verifyObject(IReactorTime, reactor))
        port = reactor.listenUDP(0, DatagramProtocol())
        self.assertTrue(verifyObject(IUDPTransport, port))
        self.assertTrue(verifyObject(IListeningPort, port))


class LocalInterfaceTests(SynchronousTestCase):
    """
    Tests for L{localInterface}.
    """

    def test_choices(self) -> None:
        """
        Loopback targets are reached from the loopback address of their family, others from the
        wildcard address of their family.
        """
        for host, interface in [
            ("127.0.0.1", "127.0.0.1"),
            ("127.0.0.53", "127.0.0.1"),
            ("192.0.2.7", "0.0.0.0"),
            ("::1", "::1"),
            ("2001:db8::5", "::"),
            ("fe80::1%lo", "::"),
        ]:
            self.assertEqual(localInterface(host), interface, host)

    def test_notAnAddress(self) -> None:
        """
        A host name is refused.
        """
        self.assertRaises(ValueError, localInterface, "localhost")


class FlowTableTests(SynchronousTestCase):
    """
    Tests for L{FlowTable}.
    """

    def setUp(self) -> None:
        """
        Make a table of at most three flows to a local IPv4 service, idle timeout 60 seconds,
        recording what it sends and which flows it closes, and capture log events.
        """
        self.reactor = FakeUDPReactor()
        self.sent: list[tuple[int, bytes]] = []
        self.closed: list[tuple[int, float]] = []
        self.table = self.makeTable()
        self.events = EventLoggingObserver.createWithCleanup(
            self,  # type: ignore[arg-type]
            globalLogPublisher,
        )

    def makeTable(self, target: tuple[str, int] = _TARGET, **kw: Any) -> FlowTable:
        """
        @param target: The local service's address.
        @param kw: Keyword arguments for L{FlowTable}, overriding the defaults of L{setUp}.
        @return: A table on the fake reactor that records into C{self.sent} and C{self.closed}
            (with the time of each closing).
        """
        arguments: dict[str, Any] = {
            "idleTimeout": 60.0,
            "maxFlows": 3,
            "onFlowClosed": lambda flowId: self.closed.append((flowId, self.reactor.seconds())),
        }
        arguments.update(kw)
        return FlowTable(
            self.reactor,
            target,
            lambda flowId, data: self.sent.append((flowId, data)),
            **arguments,
        )

    def port(self, flowId: int, table: FlowTable | None = None) -> FakeUDPPort:
        """
        @param flowId: An open flow's id.
        @param table: The table, by default C{self.table}.
        @return: The flow's fake port.
        """
        port = (table or self.table).socketFor(flowId)
        assert isinstance(port, FakeUDPPort), port
        return port

    def warnings(self, reason: str) -> list[dict[str, Any]]:
        """
        @param reason: A drop reason.
        @return: The warnings the table logged for drops for that reason.
        """
        return [
            event
            for event in self.events
            if event.get("log_namespace") == _NAMESPACE
            and event.get("reason") == reason
            and event["log_level"] == LogLevel.warn
        ]

    def timeOfClose(self, step: float = 0.5, limit: float = 1000.0) -> float:
        """
        Advance the clock in small steps until the table closes a flow for being idle.

        @param step: Seconds per step.
        @param limit: Time after which to give up.
        @return: When the first flow was closed.
        """
        while not self.closed:
            self.assertLess(self.reactor.seconds(), limit, "no flow was closed")
            self.reactor.advance(step)
        return self.closed[0][1]

    def test_initialState(self) -> None:
        """
        A new table has no flows, counts nothing, has no timer and holds its settings.
        """
        self.assertEqual(self.table.flows, 0)
        self.assertEqual((self.table.received, self.table.sent), (0, 0))
        self.assertEqual(self.table.dropped, dict.fromkeys(DROP_REASONS, 0))
        self.assertEqual(
            set(DROP_REASONS),
            {
                "too_many_flows",
                "too_many_flows_per_source",
                "refused",
                "stopped",
                "open_failed",
                "write_failed",
                "address_refused",
                "unannounced",
            },
        )
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertEqual(self.table.target, _TARGET)
        self.assertEqual(self.table.interface, "127.0.0.1")
        self.assertEqual((self.table.idleTimeout, self.table.maxFlows), (60.0, 3))
        self.assertEqual(self.table.maxFlowsPerSource, 64)
        self.assertIsNone(self.table.socketFor(1))

    def test_defaults(self) -> None:
        """
        By default flows close after a minute of silence, at most 1024 are open, and no callback
        is needed.
        """
        table = FlowTable(self.reactor, _TARGET, lambda flowId, data: None)
        self.assertEqual((table.idleTimeout, table.maxFlows), (60.0, 1024))
        table.deliver(1, b"x")
        self.reactor.advance(75)
        self.assertEqual(table.flows, 0)
        self.assertFalse(self.reactor.ports[0].listening)

    def test_firstDatagramOpensSocket(self) -> None:
        """
        A flow's first datagram opens a socket on an ephemeral port of the loopback interface,
        with room for the largest datagram, connected to the target, and is written to it.
        """
        self.table.deliver(7, b"hello")
        self.assertEqual(self.reactor.listenCalls, [(0, "127.0.0.1", MAX_PACKET_SIZE)])
        self.assertGreaterEqual(MAX_PACKET_SIZE, 65507)
        [port] = self.reactor.ports
        self.assertIs(self.table.socketFor(7), port)
        self.assertEqual(port.connectedTo, _TARGET)
        self.assertEqual(port.written, [b"hello"])
        self.assertTrue(port.listening)
        self.assertEqual((self.table.flows, self.table.received, self.table.sent), (1, 1, 0))

    def test_sameFlowReusesSocket(self) -> None:
        """
        Later datagrams of a flow go out on the socket its first one opened.
        """
        self.table.deliver(7, b"one")
        self.table.deliver(7, b"two")
        self.table.deliver(7, b"three")
        [port] = self.reactor.ports
        self.assertEqual(port.written, [b"one", b"two", b"three"])
        self.assertEqual((self.table.flows, self.table.received), (1, 3))

    def test_twoFlowsTwoSockets(self) -> None:
        """
        Two flows get two sockets, and each socket's replies are sent with its own flow's id.
        """
        self.table.deliver(1, b"from one")
        self.table.deliver(2, b"from two")
        first, second = self.reactor.ports
        self.assertIsNot(first, second)
        self.assertEqual((self.table.socketFor(1), self.table.socketFor(2)), (first, second))
        self.assertEqual((first.written, second.written), ([b"from one"], [b"from two"]))
        second.reply(b"to two")
        first.reply(b"to one")
        second.reply(b"to two again")
        self.assertEqual(self.sent, [(2, b"to two"), (1, b"to one"), (2, b"to two again")])
        self.assertEqual((self.table.flows, self.table.received, self.table.sent), (2, 2, 3))

    def test_emptyDatagrams(self) -> None:
        """
        Empty datagrams are forwarded both ways.
        """
        self.table.deliver(1, b"")
        self.assertEqual(self.port(1).written, [b""])
        self.port(1).reply(b"")
        self.assertEqual(self.sent, [(1, b"")])
        self.assertEqual((self.table.received, self.table.sent), (1, 1))

    def test_largestDatagrams(self) -> None:
        """
        Datagrams of the largest UDP payload are forwarded both ways.
        """
        big = b"x" * 65507
        self.table.deliver(1, big)
        self.assertEqual(self.port(1).written, [big])
        self.port(1).reply(big)
        self.assertEqual(self.sent, [(1, big)])

    def test_idleExpiry(self) -> None:
        """
        A flow silent since it opened closes its socket and is reported to C{onFlowClosed} once,
        by the first sweep at least C{idleTimeout} seconds later, and not before.
        """
        self.table.deliver(5, b"x")
        port = self.port(5)
        self.reactor.advance(59.5)
        self.assertTrue(port.listening)
        self.assertEqual(self.closed, [])
        self.assertEqual(self.timeOfClose(), 75.0)
        self.assertEqual(self.closed, [(5, 75.0)])
        self.assertFalse(port.listening)
        self.assertEqual(self.table.flows, 0)
        self.assertIsNone(self.table.socketFor(5))
        self.reactor.advance(1000)
        self.assertEqual(self.closed, [(5, 75.0)])

    def test_idleExpiryBounds(self) -> None:
        """
        Whenever a flow's last datagram comes relative to the sweeps, the flow closes between
        C{idleTimeout} and 1.25 times C{idleTimeout} after it; just before a sweep, exactly at the
        first sweep C{idleTimeout} later.
        """
        for offset in [0.5, 7.5, 14.5, 15.0, 20.0]:
            self.closed.clear()
            self.table.deliver(1, b"open")
            start = self.reactor.seconds()
            self.reactor.advance(offset)
            self.table.deliver(1, b"last")
            last = start + offset
            closedAt = self.timeOfClose()
            self.assertGreaterEqual(closedAt, last + 60, offset)
            self.assertLessEqual(closedAt, last + 75, offset)
            if offset == 14.5:
                self.assertEqual(closedAt, start + 75)
            self.assertEqual(self.closed, [(1, closedAt)])

    def test_visitorDatagramPostponesExpiry(self) -> None:
        """
        Each datagram from the visitor restarts the flow's idle time.
        """
        self.table.deliver(1, b"a")
        for _ in range(10):
            self.reactor.advance(50)
            self.table.deliver(1, b"b")
        self.assertEqual(self.closed, [])
        self.assertEqual(len(self.reactor.ports), 1)
        # The first sweep at least 60 seconds after the last datagram, at 500.
        self.assertEqual(self.timeOfClose(), 570)

    def test_replyPostponesExpiry(self) -> None:
        """
        Each reply from the local service restarts the flow's idle time.
        """
        self.table.deliver(1, b"a")
        port = self.port(1)
        for _ in range(10):
            self.reactor.advance(50)
            port.reply(b"b")
        self.assertEqual(self.closed, [])
        self.assertTrue(port.listening)
        # The first sweep at least 60 seconds after the last reply, at 500.
        self.assertEqual(self.timeOfClose(), 570)

    def test_otherFlowsDoNotPostponeExpiry(self) -> None:
        """
        Traffic on one flow does not keep another open.
        """
        self.table.deliver(1, b"a")
        self.table.deliver(2, b"a")
        for _ in range(16):
            self.reactor.advance(5)
            self.table.deliver(2, b"b")
            self.port(2).reply(b"c")
        self.assertEqual(self.closed, [(1, 75.0)])
        self.assertEqual(self.table.flows, 1)
        self.assertTrue(self.port(2).listening)

    def test_datagramAfterExpiryOpensNewSocket(self) -> None:
        """
        A datagram for a flow that expired opens a new socket, which expires in turn.
        """
        self.table.deliver(1, b"a")
        self.reactor.advance(75)
        self.assertEqual(self.closed, [(1, 75.0)])
        self.table.deliver(1, b"b")
        old, new = self.reactor.ports
        self.assertFalse(old.listening)
        self.assertTrue(new.listening)
        self.assertIs(self.table.socketFor(1), new)
        self.assertEqual((old.written, new.written), ([b"a"], [b"b"]))
        new.reply(b"c")
        self.assertEqual(self.sent, [(1, b"c")])
        self.reactor.advance(75)
        self.assertEqual(self.closed, [(1, 75.0), (1, 150.0)])
        self.assertFalse(new.listening)

    def test_sweepOnlyWhileFlowsOpen(self) -> None:
        """
        The idle sweep starts with the first flow and stops when the last one closes, however it
        closes.
        """
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.table.deliver(1, b"a")
        self.table.deliver(2, b"a")
        self.assertEqual(len(self.reactor.getDelayedCalls()), 1)
        self.table.close(1)
        self.assertEqual(len(self.reactor.getDelayedCalls()), 1)
        self.reactor.advance(75)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.table.deliver(3, b"a")
        self.assertEqual(len(self.reactor.getDelayedCalls()), 1)
        self.table.close(3)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_lateSweep(self) -> None:
        """
        A sweep that runs late, as when the reactor was busy, counts every interval that passed:
        flows idle long enough close at once.
        """
        self.table.deliver(1, b"a")
        self.reactor.advance(74)
        self.assertEqual(self.table.flows, 1)
        self.table.deliver(2, b"a")
        self.reactor.advance(1000)
        self.assertEqual(self.closed, [(1, 1074.0), (2, 1074.0)])

    def test_sweepInterval(self) -> None:
        """
        The sweep runs every quarter of the idle timeout.
        """
        self.table.deliver(1, b"a")
        [call] = self.reactor.getDelayedCalls()
        self.assertEqual(call.getTime(), 15.0)
        self.reactor.advance(15)
        [call] = self.reactor.getDelayedCalls()
        self.assertEqual(call.getTime(), 30.0)

    def test_maxFlows(self) -> None:
        """
        While C{maxFlows} flows are open, a datagram of a new flow is dropped and counted, opens
        no socket, and a warning is logged; the open flows keep working, and the new flow opens
        once another closes.
        """
        for flowId in [1, 2, 3]:
            self.table.deliver(flowId, b"a")
        self.table.deliver(4, b"refused")
        self.assertEqual(len(self.reactor.ports), 3)
        self.assertIsNone(self.table.socketFor(4))
        self.assertEqual(self.table.flows, 3)
        self.assertEqual(self.table.dropped["too_many_flows"], 1)
        self.assertEqual(self.table.received, 4)
        [event] = self.warnings("too_many_flows")
        self.assertEqual((event["flowId"], event["maxFlows"]), (4, 3))
        self.assertEqual(
            formatEvent(event),
            "UDP flow 4: new UDP flow refused: 3 flows are open, the most allowed "
            "(0 similar drops not logged)",
        )
        self.table.deliver(2, b"b")
        self.assertEqual(self.port(2).written, [b"a", b"b"])
        self.port(3).reply(b"c")
        self.assertEqual(self.sent, [(3, b"c")])
        self.table.close(1)
        self.table.deliver(4, b"d")
        self.assertEqual(self.port(4).written, [b"d"])
        self.assertEqual(self.table.flows, 3)
        self.assertEqual(self.table.dropped, dict.fromkeys(DROP_REASONS, 0) | {"too_many_flows": 1})

    def test_perSourceAfterDatagram(self) -> None:
        """
        When the relay names a flow's source after its first datagram, a flow beyond
        C{maxFlowsPerSource} for that source is closed (its socket too), counted, logged and
        reported to the relay; another source's flow stays, and a closed flow frees a place.
        """
        table = self.makeTable(maxFlows=10, maxFlowsPerSource=2)
        for flowId in [1, 2, 3, 4]:
            table.deliver(flowId, b"a")
        table.noteSource(1, "192.0.2.1")
        table.noteSource(2, "192.0.2.1")
        port3 = self.port(3, table)
        table.noteSource(3, "192.0.2.1")
        table.noteSource(4, "192.0.2.2")
        self.assertEqual(table.flows, 3)
        self.assertIsNone(table.socketFor(3))
        self.assertFalse(port3.listening)
        self.assertEqual([flowId for flowId, _ in self.closed], [3])
        self.assertEqual(table.dropped["too_many_flows_per_source"], 1)
        [event] = self.warnings("too_many_flows_per_source")
        self.assertEqual(event["source"], "192.0.2.1")
        table.close(1)
        table.deliver(5, b"b")
        table.noteSource(5, "192.0.2.1")
        self.assertEqual(self.port(5, table).written, [b"b"])

    def test_perSourceBeforeDatagram(self) -> None:
        """
        A source named before the flow's first datagram is checked when the datagram comes: over
        the limit, the datagram is dropped and no socket is opened. IPv6 sources count by /64.
        """
        table = self.makeTable(maxFlows=10, maxFlowsPerSource=1)
        table.noteSource(1, "2001:db8::1")
        table.noteSource(2, "2001:db8::2")
        table.deliver(1, b"a")
        table.deliver(2, b"b")
        self.assertEqual(table.flows, 1)
        self.assertIsNone(table.socketFor(2))
        self.assertEqual(table.dropped["too_many_flows_per_source"], 1)

    def test_earlySourcesBounded(self) -> None:
        """
        Sources named for flows that never send are kept for at most C{maxFlows} flows.
        """
        table = self.makeTable(maxFlows=3)
        for flowId in range(100):
            table.noteSource(flowId, "192.0.2.1")
        self.assertEqual(len(table._earlySources), 3)

    def test_dropLogRateLimited(self) -> None:
        """
        Drops for one reason are logged at most once per C{logInterval}; the next warning says
        how many went unlogged, and every drop is counted.
        """
        self.assertEqual(FlowTable.logInterval, 60.0)
        for flowId in [1, 2, 3]:
            self.table.deliver(flowId, b"a")
        for flowId in range(4, 104):
            self.table.deliver(flowId, b"x")
            for open in [1, 2, 3]:
                self.port(open).reply(b"keep")
            self.reactor.advance(1)
        self.assertEqual(self.table.flows, 3)
        self.assertEqual(self.table.dropped["too_many_flows"], 100)
        events = self.warnings("too_many_flows")
        self.assertEqual([(e["flowId"], e["suppressed"]) for e in events], [(4, 0), (64, 59)])
        self.assertIn("(59 similar drops not logged)", formatEvent(events[1]))

    def test_refused(self) -> None:
        """
        A refusal from the local service's port is counted and logged, and the flow stays open
        on the same socket, so datagrams reach the service once it listens.
        """
        self.table.deliver(1, b"a")
        port = self.port(1)
        port.protocol.connectionRefused()
        self.assertEqual(self.table.dropped["refused"], 1)
        self.assertIs(self.table.socketFor(1), port)
        self.assertTrue(port.listening)
        self.assertEqual(self.table.flows, 1)
        [event] = self.warnings("refused")
        self.assertEqual(
            formatEvent(event),
            "UDP flow 1: local UDP service at 127.0.0.1:5353 refused a datagram (is it listening?) "
            "(0 similar drops not logged)",
        )
        self.table.deliver(1, b"b")
        port.reply(b"c")
        self.assertEqual(port.written, [b"a", b"b"])
        self.assertEqual(self.sent, [(1, b"c")])
        self.assertEqual(len(self.reactor.ports), 1)

    def test_refusedRateLimited(self) -> None:
        """
        Refusals are logged at most once per C{logInterval}, whichever flow they hit, and all
        are counted.
        """
        self.table.deliver(1, b"a")
        self.table.deliver(2, b"a")
        self.port(1).protocol.connectionRefused()
        self.port(2).protocol.connectionRefused()
        self.reactor.advance(59)
        self.port(1).protocol.connectionRefused()
        self.assertEqual(len(self.warnings("refused")), 1)
        self.reactor.advance(1)
        self.port(2).protocol.connectionRefused()
        self.assertEqual(self.table.dropped["refused"], 4)
        events = self.warnings("refused")
        self.assertEqual([(e["flowId"], e["suppressed"]) for e in events], [(1, 0), (2, 2)])
        self.assertIn("(2 similar drops not logged)", formatEvent(events[1]))

    def test_refusalDoesNotRefresh(self) -> None:
        """
        A refusal is not traffic: it does not keep a flow open.
        """
        self.table.deliver(1, b"a")
        for _ in range(7):
            self.reactor.advance(10)
            self.port(1).protocol.connectionRefused()
        self.assertEqual(self.timeOfClose(), 75.0)

    def test_socketLost(self) -> None:
        """
        When the reactor closes a flow's socket, as Twisted's epoll reactor does on a refusal, it
        is counted and logged as a refusal and the flow is kept: its next datagram opens a new
        socket, whose replies go back on the flow, and its idle time runs on.
        """
        self.table.deliver(1, b"a")
        lost = self.port(1)
        self.reactor.advance(30)
        lost.lose()
        self.assertEqual(self.table.dropped["refused"], 1)
        [event] = self.warnings("refused")
        self.assertEqual(
            formatEvent(event),
            "UDP flow 1: local UDP service at 127.0.0.1:5353 refused a datagram (is it listening?); "
            "the flow's socket was closed (0 similar drops not logged)",
        )
        self.assertEqual(self.table.flows, 1)
        self.assertIsNone(self.table.socketFor(1))
        self.table.deliver(1, b"b")
        self.assertEqual(self.reactor.listenCalls, [(0, "127.0.0.1", MAX_PACKET_SIZE)] * 2)
        port = self.port(1)
        self.assertIsNot(port, lost)
        self.assertEqual((lost.written, port.written), ([b"a"], [b"b"]))
        self.assertEqual(port.connectedTo, _TARGET)
        port.reply(b"c")
        self.assertEqual(self.sent, [(1, b"c")])
        self.assertEqual(self.table.received, 2)
        self.assertEqual(self.timeOfClose(), 105.0)
        self.assertFalse(port.listening)

    def test_socketLostUnused(self) -> None:
        """
        A flow whose socket was lost, and which got no datagram since, still expires, and can be
        closed and stopped.
        """
        self.table.deliver(1, b"a")
        self.table.deliver(2, b"a")
        self.table.deliver(3, b"a")
        self.port(1).lose()
        self.port(2).lose()
        self.port(3).lose()
        self.table.close(2)
        self.reactor.advance(75)
        self.assertEqual(sorted(self.closed), [(1, 75.0), (3, 75.0)])
        self.table.deliver(4, b"a")
        self.port(4).lose()
        self.table.stop()
        self.assertEqual(self.table.flows, 0)
        self.assertEqual(self.table.dropped["refused"], 4)

    def test_socketLostReopenFails(self) -> None:
        """
        When a flow's socket cannot be opened again, the datagram is dropped and counted and the
        flow is kept; a later datagram opens the socket, which is watched for loss again.
        """
        self.table.deliver(1, b"a")
        self.port(1).lose()
        self.reactor.listenError = CannotListenError("127.0.0.1", 0, OSError("no fds"))
        self.table.deliver(1, b"b")
        self.reactor.listenError = None
        self.reactor.connectError = OSError(101, "Network is unreachable")
        self.table.deliver(1, b"c")
        self.assertEqual(self.table.dropped["open_failed"], 2)
        self.assertEqual(self.table.flows, 1)
        self.assertIsNone(self.table.socketFor(1))
        self.reactor.connectError = None
        self.table.deliver(1, b"d")
        self.assertEqual(self.port(1).written, [b"d"])
        self.assertEqual(self.table.dropped["refused"], 1)
        self.port(1).lose()
        self.assertEqual(self.table.dropped["refused"], 2)
        self.assertIsNone(self.table.socketFor(1))

    def test_close(self) -> None:
        """
        L{FlowTable.close} closes a flow's socket without calling C{onFlowClosed}; the flow's
        next datagram opens a new socket, and closing an unknown flow does nothing.
        """
        self.table.deliver(1, b"a")
        self.table.deliver(2, b"a")
        port = self.port(1)
        self.table.close(1)
        self.assertFalse(port.listening)
        self.assertIsNone(self.table.socketFor(1))
        self.assertEqual(self.table.flows, 1)
        self.assertTrue(self.port(2).listening)
        self.table.close(1)
        self.table.close(99)
        self.assertEqual(self.table.dropped["refused"], 0)
        self.table.deliver(1, b"b")
        self.assertIsNot(self.table.socketFor(1), port)
        self.assertEqual(self.port(1).written, [b"b"])
        self.reactor.advance(75)
        self.assertEqual(sorted(self.closed), [(1, 75.0), (2, 75.0)])

    def test_closedFlowIgnoresItsSocket(self) -> None:
        """
        A datagram or refusal arriving on a closed flow's socket is neither sent nor counted.
        """
        self.table.deliver(1, b"a")
        port = self.port(1)
        self.table.close(1)
        port.protocol.datagramReceived(b"late", _TARGET)
        port.protocol.connectionRefused()
        self.assertEqual(self.sent, [])
        self.assertEqual(self.table.sent, 0)
        self.assertEqual(self.table.dropped["refused"], 0)

    def test_stop(self) -> None:
        """
        L{FlowTable.stop} closes every socket without calling C{onFlowClosed} and stops the
        sweep; later datagrams are dropped and counted, and open nothing.
        """
        self.table.deliver(1, b"a")
        self.table.deliver(2, b"a")
        self.table.stop()
        self.assertEqual([port.listening for port in self.reactor.ports], [False, False])
        self.assertEqual(self.table.flows, 0)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.table.deliver(1, b"b")
        self.table.deliver(3, b"b")
        self.assertEqual(len(self.reactor.ports), 2)
        self.assertEqual(self.table.dropped["stopped"], 2)
        self.assertEqual(self.table.dropped["refused"], 0)
        self.assertEqual(self.table.received, 4)
        self.table.close(1)
        self.table.stop()
        self.reactor.advance(1000)
        self.assertEqual(self.closed, [])

    def test_ipv6Target(self) -> None:
        """
        For an IPv6 target, flows' sockets are bound to an IPv6 interface, so they can reach it,
        and connected to it.
        """
        table = self.makeTable(("::1", 5353))
        table.deliver(1, b"a")
        self.assertEqual(self.reactor.listenCalls, [(0, "::1", MAX_PACKET_SIZE)])
        port = self.port(1, table)
        self.assertEqual(port.connectedTo, ("::1", 5353))
        self.assertEqual(port.written, [b"a"])
        port.reply(b"b")
        self.assertEqual(self.sent, [(1, b"b")])
        other = self.makeTable(("2001:db8::5", 53))
        other.deliver(1, b"a")
        self.assertEqual(self.reactor.listenCalls[-1], (0, "::", MAX_PACKET_SIZE))
        self.assertEqual(self.port(1, other).connectedTo, ("2001:db8::5", 53))

    def test_nonLoopbackIPv4Target(self) -> None:
        """
        For an IPv4 target that is not loopback, flows' sockets are bound to every IPv4
        interface, so the system picks a source address that reaches it.
        """
        table = self.makeTable(("192.0.2.7", 53))
        table.deliver(1, b"a")
        self.assertEqual(self.reactor.listenCalls, [(0, "0.0.0.0", MAX_PACKET_SIZE)])
        self.assertEqual(self.port(1, table).connectedTo, ("192.0.2.7", 53))

    def test_invalidArguments(self) -> None:
        """
        A target that is not an IP address literal and port, a non-positive idle timeout and
        fewer than one flow are refused.
        """
        cases: list[tuple[tuple[str, int], dict[str, Any]]] = [
            (("localhost", 53), {}),
            (("127.0.0.1", 0), {}),
            (("127.0.0.1", 65536), {}),
            (_TARGET, {"idleTimeout": 0}),
            (_TARGET, {"idleTimeout": -1.0}),
            (_TARGET, {"maxFlows": 0}),
        ]
        for target, kw in cases:
            self.assertRaises(ValueError, self.makeTable, target, **kw)

    def test_listenFailure(self) -> None:
        """
        When a flow's socket cannot be opened, the datagram is dropped, counted and logged, and
        the flow's next datagram tries again.
        """
        self.reactor.listenError = CannotListenError("127.0.0.1", 0, OSError("no fds"))
        self.table.deliver(1, b"a")
        self.assertEqual(self.table.flows, 0)
        self.assertEqual(self.table.dropped["open_failed"], 1)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        [event] = self.warnings("open_failed")
        self.assertIn("could not open a UDP socket", formatEvent(event))
        self.reactor.listenError = None
        self.table.deliver(1, b"b")
        self.assertEqual(self.port(1).written, [b"b"])

    def test_connectFailure(self) -> None:
        """
        When a flow's socket cannot be connected, it is closed and the datagram is dropped,
        counted and logged.
        """
        self.reactor.connectError = OSError(101, "Network is unreachable")
        self.table.deliver(1, b"a")
        [port] = self.reactor.ports
        self.assertFalse(port.listening)
        self.assertEqual(self.table.flows, 0)
        self.assertEqual(self.table.dropped["open_failed"], 1)
        self.assertEqual(self.table.dropped["refused"], 0)
        [event] = self.warnings("open_failed")
        self.assertIn("Network is unreachable", formatEvent(event))

    def test_writeFailure(self) -> None:
        """
        A datagram the socket refuses, such as one too long, is dropped, counted and logged, and
        the flow stays open.
        """
        self.table.deliver(1, b"a")
        self.table.deliver(1, b"x" * (MAX_PACKET_SIZE + 1))
        self.assertEqual(self.table.dropped["write_failed"], 1)
        self.assertEqual(len(self.warnings("write_failed")), 1)
        self.table.deliver(1, b"b")
        self.assertEqual(self.port(1).written, [b"a", b"b"])

    def test_onFlowClosedFailure(self) -> None:
        """
        An exception from C{onFlowClosed} is logged, and the other idle flows still close and
        the sweep goes on.
        """

        def onFlowClosed(flowId: int) -> None:
            self.closed.append((flowId, self.reactor.seconds()))
            raise ZeroDivisionError()

        table = self.makeTable(onFlowClosed=onFlowClosed)
        table.deliver(1, b"a")
        table.deliver(2, b"a")
        self.reactor.advance(75)
        self.assertEqual(sorted(self.closed), [(1, 75.0), (2, 75.0)])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 2)
        table.deliver(3, b"a")
        self.reactor.advance(75)
        self.assertEqual(self.closed[-1], (3, 150.0))
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_sweepFailureLogged(self) -> None:
        """
        An unexpected exception in the idle sweep, here from closing a socket, is logged, and the
        next flow starts the sweep again.
        """
        self.table.deliver(1, b"a")

        def stopListening() -> Deferred[None]:
            raise RuntimeError("cannot close")

        self.port(1).stopListening = stopListening  # type: ignore[method-assign]
        self.reactor.advance(75)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        [event] = [e for e in self.events if e.get("log_namespace") == _NAMESPACE]
        self.assertEqual(
            (event["log_level"], event["log_format"]), (LogLevel.critical, "idle sweep failed")
        )
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.table.deliver(2, b"a")
        self.reactor.advance(75)
        self.assertEqual(self.closed, [(2, 150.0)])

    def test_reopenFromOnFlowClosed(self) -> None:
        """
        C{onFlowClosed} may send on the flow it was told about, opening it again; the sweep
        keeps exactly one timer and expires the new flow in turn.
        """

        def onFlowClosed(flowId: int) -> None:
            self.closed.append((flowId, self.reactor.seconds()))
            if len(self.closed) == 1:
                table.deliver(flowId, b"again")

        table = self.makeTable(onFlowClosed=onFlowClosed)
        table.deliver(1, b"a")
        self.reactor.advance(75)
        self.assertEqual(table.flows, 1)
        self.assertEqual(self.port(1, table).written, [b"again"])
        self.assertEqual(len(self.reactor.getDelayedCalls()), 1)
        self.reactor.advance(75)
        self.assertEqual(self.closed, [(1, 75.0), (1, 150.0)])
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_stopFromOnFlowClosed(self) -> None:
        """
        C{onFlowClosed} may stop the table; the remaining flows close without further callbacks
        and no timer is left.
        """

        def onFlowClosed(flowId: int) -> None:
            self.closed.append((flowId, self.reactor.seconds()))
            table.stop()

        table = self.makeTable(onFlowClosed=onFlowClosed)
        table.deliver(1, b"a")
        table.deliver(2, b"a")
        self.reactor.advance(75)
        self.assertEqual(len(self.closed), 1)
        self.assertEqual([port.listening for port in self.reactor.ports], [False, False])
        self.assertEqual(self.reactor.getDelayedCalls(), [])


class FlowOpenedTests(SynchronousTestCase):
    """
    The tunnel's C{FlowOpened} responder tells its flow table the flow's source.
    """

    def test_noteSource(self) -> None:
        """
        C{FlowOpened} for two flows of one source, over a per-source limit of 1, closes the
        second flow in the table.
        """
        closed: list[int] = []
        table = FlowTable(
            FakeUDPReactor(),
            _TARGET,
            lambda flowId, data: None,
            maxFlowsPerSource=1,
            onFlowClosed=closed.append,
        )

        class UDP:
            """
            What the responder uses of the tunnel's UDP side.
            """

            flows = table

        protocol = TunnelControlProtocol(None)  # type: ignore[arg-type]
        protocol.udp = UDP()  # type: ignore[assignment]
        table.deliver(1, b"a")
        table.deliver(2, b"b")
        protocol.flowOpened(1, "192.0.2.1", 1000)
        protocol.flowOpened(2, "192.0.2.1", 1001)
        self.assertEqual((table.flows, closed), (1, [2]))


class ScreenedFlowTests(SynchronousTestCase):
    """
    Tests for L{FlowTable} with address rules (C{screen}): no datagram reaches the service before
    the relay's C{FlowOpened} has said who sent it and the rules have admitted that visitor.
    """

    def setUp(self) -> None:
        """
        Make a table that refuses visitors from 203.0.113.0/24.
        """
        self.reactor = FakeUDPReactor()
        self.sent: list[tuple[int, bytes]] = []
        rules = AddressRules.parse(deny=["203.0.113.0/24"])
        self.table = FlowTable(
            self.reactor,
            _TARGET,
            lambda flowId, data: self.sent.append((flowId, data)),
            maxFlows=2,
            screen=rules.refusal,
        )

    def written(self, flowId: int) -> list[bytes]:
        """
        @return: What flow C{flowId}'s socket sent to the service (nothing without a socket).
        """
        port = self.table.socketFor(flowId)
        return [] if port is None else port.written  # type: ignore[attr-defined]

    def test_heldUntilAdmitted(self) -> None:
        """
        Datagrams of a flow not announced yet are held, with no socket opened, and go to the
        service in order once its visitor is admitted.
        """
        self.table.deliver(1, b"a")
        self.table.deliver(1, b"b")
        self.assertIsNone(self.table.socketFor(1))
        self.assertEqual(self.reactor.ports, [])
        self.table.announce(1, "198.51.100.7")
        self.assertEqual(self.written(1), [b"a", b"b"])
        self.table.deliver(1, b"c")
        self.assertEqual(self.written(1), [b"a", b"b", b"c"])

    def test_refused(self) -> None:
        """
        A refused visitor's held and later datagrams are dropped and counted; no socket is opened.
        """
        self.table.deliver(2, b"a")
        self.table.announce(2, "203.0.113.9")
        self.table.deliver(2, b"b")
        self.assertIsNone(self.table.socketFor(2))
        self.assertEqual(self.table.dropped["address_refused"], 2)
        self.assertEqual(self.table.flows, 0)

    def test_mappedAddress(self) -> None:
        """
        An IPv4-mapped IPv6 visitor address is judged as its IPv4 address.
        """
        self.table.announce(3, "::ffff:203.0.113.9")
        self.table.deliver(3, b"a")
        self.assertIsNone(self.table.socketFor(3))
        self.assertEqual(self.table.dropped["address_refused"], 1)

    def test_holdLimits(self) -> None:
        """
        At most L{MAX_HELD_DATAGRAMS} datagrams per flow and C{maxFlows} flows are held; the rest
        are dropped as C{unannounced} and never delivered.
        """
        for i in range(MAX_HELD_DATAGRAMS + 2):
            self.table.deliver(1, b"%d" % i)
        self.assertEqual(self.table.dropped["unannounced"], 2)
        self.table.deliver(2, b"x")
        self.table.deliver(3, b"y")  # Pushes out flow 1's held datagrams.
        self.assertEqual(self.table.dropped["unannounced"], 2 + MAX_HELD_DATAGRAMS)
        self.table.announce(1, "198.51.100.7")
        self.assertIsNone(self.table.socketFor(1))
        self.table.announce(3, "198.51.100.8")
        self.assertEqual(self.written(3), [b"y"])

    def test_closeForgets(self) -> None:
        """
        A flow the relay closed must be announced again (its id may come back for a new visitor).
        """
        self.table.announce(1, "198.51.100.7")
        self.table.deliver(1, b"a")
        self.table.close(1)
        self.table.deliver(1, b"b")
        self.assertIsNone(self.table.socketFor(1))
        self.table.announce(1, "203.0.113.1")
        self.assertEqual(self.table.dropped["address_refused"], 1)

    def test_withoutRules(self) -> None:
        """
        Without C{screen}, datagrams go to the service at once and announcements change nothing.
        """
        table = FlowTable(self.reactor, _TARGET, lambda flowId, data: None)
        table.deliver(1, b"a")
        table.announce(1, "203.0.113.9")
        table.deliver(1, b"b")
        port = table.socketFor(1)
        self.assertEqual(port.written, [b"a", b"b"])  # type: ignore[union-attr]
