"""
Tests for UDP mode on both ends, over an in-memory UDP reactor: the relay's sessions, lease ports
and tunnel-facing socket (L{portal.relay.udpmode}) and the tunnel's socket to the relay
(L{portal.tunnel.udpmode}).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort, IReactorTime, IReactorUDP, IUDPTransport
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from portal.relay.ports import PortAllocator, PortRange
from portal.relay.router import Router
from portal.relay.udp import MAX_PACKET_SIZE, PublicUDP
from portal.relay.udpmode import (
    DROP_LOG_INTERVAL,
    PATH_TIMEOUT,
    RELAY_FLOW_IDLE,
    UDPMode,
    UDPSession,
)
from portal.trust.identity import Identity
from portal.tunnel import udpmode as tunnelmode
from portal.tunnel.udpmode import KEEPALIVE_INTERVAL, PATH_CHECK, TunnelUDP
from portal.wire.control import Datagram, FlowClosed, FlowOpened
from portal.wire.udpseal import (
    HEADER_LENGTH,
    MAX_PAYLOAD,
    SESSION_ID_LENGTH,
    Direction,
    Kind,
    Opener,
    Sealer,
    deriveKeys,
)

_SECRET = b"s" * 32
_OTHER_SECRET = b"t" * 32
_OWNER = "id1"
_LABEL = "game"
_ALICE = ("192.0.2.1", 40001)
_BOB = ("192.0.2.2", 40002)
_TUNNEL = ("198.51.100.9", 50000)
_ELSEWHERE = ("198.51.100.10", 50001)
_RELAY = ("203.0.113.5", 8443)
_TARGET = ("127.0.0.1", 5353)
_SESSION_ID = b"S" * SESSION_ID_LENGTH
_RELAY_NAMESPACE = "portal.relay.udpmode.UDPMode"
_TUNNEL_NAMESPACE = "portal.tunnel.udpmode.TunnelUDP"

#: What a sealed datagram opens to: kind, flow id, payload.
Opened = tuple[Kind, int, bytes]


@implementer(IUDPTransport, IListeningPort)
class FakeUDPPort:
    """
    A UDP port of L{UDPReactor}, connected or not, in the style of Twisted's
    C{twisted.names.test.test_util.MemoryDatagramTransport}: records what is written to it and
    lets a test deliver datagrams to its protocol.

    @ivar number: The port number it pretends to be bound to.
    @ivar protocol: The protocol it delivers datagrams to.
    @ivar connectedTo: The (host, port) passed to C{connect}, or C{None}.
    @ivar written: Every (datagram, address) written, oldest first; the address is C{None} on a
        connected port.
    @ivar listening: Whether C{stopListening} has not been called yet.
    @ivar failWith: An exception for L{write} to raise instead of recording, or C{None}.
    """

    def __init__(self, reactor: UDPReactor, number: int, protocol: DatagramProtocol) -> None:
        """
        @param reactor: The reactor that opened the port.
        @param number: The port number.
        @param protocol: The protocol.
        """
        self._reactor = reactor
        self.number = number
        self.protocol = protocol
        self.connectedTo: tuple[str, int] | None = None
        self.written: list[tuple[bytes, Any]] = []
        self.listening = True
        self.failWith: Exception | None = None

    def connect(self, host: str, port: int) -> None:
        """
        Connect to a peer: from now on only its datagrams arrive and writes take no address.

        @param host: The peer's IP address literal.
        @param port: The peer's port.
        """
        if self.connectedTo is not None:
            raise RuntimeError("already connected")
        self.connectedTo = (host, port)

    def write(self, packet: bytes, addr: Any = None) -> None:
        """
        Record a datagram, or raise L{failWith}; like Twisted's port, a connected port takes no
        other address and an unconnected one needs one.

        @param packet: The datagram.
        @param addr: Where to.
        """
        if self.connectedTo is not None:
            assert addr in (None, self.connectedTo), "a connected port writes to its peer only"
        else:
            assert addr is not None, "an unconnected port needs an address"
        if self.failWith is not None:
            raise self.failWith
        self.written.append((packet, addr))

    def receive(self, datagram: bytes, addr: Any = None) -> None:
        """
        Deliver a datagram to the protocol.

        @param datagram: The datagram.
        @param addr: Where it came from; the connected peer when C{None}.
        """
        sender = addr if addr is not None else self.connectedTo
        assert sender is not None, "an unconnected port needs a sender"
        self.protocol.datagramReceived(datagram, sender)

    def startListening(self) -> None:
        """
        Unused: the port listens from the start.
        """

    def stopListening(self) -> Deferred[None]:
        """
        Close the port as Twisted's does: the protocol is stopped in a later reactor turn.

        @return: A L{Deferred} that fires once the protocol is stopped.
        """
        stopped: Deferred[None] = Deferred()
        if not self.listening:
            stopped.callback(None)
            return stopped
        self.listening = False

        def lost() -> None:
            self.protocol.doStop()
            stopped.callback(None)

        self._reactor.callLater(0, lost)
        return stopped

    def getHost(self) -> IPv4Address:
        """
        @return: The address the port pretends to be bound to.
        """
        return IPv4Address("UDP", "127.0.0.1", self.number)

    def setBroadcastAllowed(self, enabled: bool) -> None:
        """
        Unused.

        @param enabled: Unused.
        """

    def getBroadcastAllowed(self) -> bool:
        """
        @return: C{False}.
        """
        return False


@implementer(IReactorUDP)
class UDPReactor(Clock):
    """
    An L{IReactorUDP} and L{IReactorTime} provider: time from L{Clock}, UDP ports in memory.

    @ivar ports: Every port opened, oldest first.
    @ivar listenCalls: The (port, interface, maxPacketSize) of every C{listenUDP} call.
    """

    def __init__(self) -> None:
        """
        Start with no ports.
        """
        super().__init__()
        self.ports: list[FakeUDPPort] = []
        self.listenCalls: list[tuple[int, str, int]] = []

    def listenUDP(
        self, port: int, protocol: DatagramProtocol, interface: str = "", maxPacketSize: int = 8192
    ) -> FakeUDPPort:
        """
        Pretend to bind a UDP port, a new number each time C{port} is 0, and start the protocol.

        @return: The port.
        """
        self.listenCalls.append((port, interface, maxPacketSize))
        fake = FakeUDPPort(self, port or 40000 + len(self.ports), protocol)
        self.ports.append(fake)
        protocol.makeConnection(fake)
        return fake

    def portAt(self, number: int) -> FakeUDPPort:
        """
        @param number: A port number.
        @return: The latest port opened with that number.
        """
        return [port for port in self.ports if port.number == number][-1]

    def wait(self, seconds: float, step: float = 1.0) -> None:
        """
        Let time pass in small steps, as a running reactor would, so that periodic calls see each
        interval pass rather than one long delay.

        @param seconds: How long.
        @param step: The largest step.
        """
        end = self.seconds() + seconds
        while self.seconds() + step < end:
            self.advance(step)
        self.advance(end - self.seconds())


class FakeControl:
    """
    A control session as UDP mode sees it, on either end.

    @ivar calls: The (command, arguments) of every C{callRemote}, oldest first.
    @ivar udpSession: The relay's UDP session of this control session, as the relay's control
        session holds it.
    """

    udpSession: UDPSession | None = None

    def __init__(self) -> None:
        """
        Start with no calls.
        """
        self.calls: list[tuple[type, dict[str, Any]]] = []

    def callRemote(self, command: type, **kw: Any) -> None:
        """
        Record a command; UDP mode's commands need no answer.

        @param command: The command.
        @param kw: Its arguments.
        """
        self.calls.append((command, kw))

    def take(self) -> list[tuple[type, dict[str, Any]]]:
        """
        @return: The calls since the last L{take}.
        """
        calls, self.calls = self.calls, []
        return calls


def tamper(datagram: bytes, offset: int, mask: int = 0x01) -> bytes:
    """
    @param datagram: A sealed datagram.
    @param offset: Which byte to change.
    @param mask: The bits of that byte to flip.
    @return: The changed datagram.
    """
    changed = bytearray(datagram)
    changed[offset] ^= mask
    return bytes(changed)


class FakesTests(SynchronousTestCase):
    """
    The fakes provide the interfaces UDP mode uses.
    """

    def test_interfaces(self) -> None:
        """
        L{UDPReactor} provides L{IReactorUDP} and L{IReactorTime}, and its ports provide
        L{IUDPTransport} and L{IListeningPort}.
        """
        reactor = UDPReactor()
        self.assertTrue(verifyObject(IReactorUDP, reactor))
        self.assertTrue(verifyObject(IReactorTime, reactor))
        port = reactor.listenUDP(0, DatagramProtocol())
        self.assertTrue(verifyObject(IUDPTransport, port))
        self.assertTrue(verifyObject(IListeningPort, port))


class UDPModeTests(SynchronousTestCase):
    """
    Tests for L{UDPMode}, L{UDPSession} and L{portal.relay.udpmode.TunnelSide}: one session with
    one lease's public port, and a tunnel played with its own sealer and opener.
    """

    def setUp(self) -> None:
        """
        Build UDP mode on a fake reactor with its tunnel-facing socket listening, a session for a
        fake control session, and the lease's public port open; watch log events.
        """
        self.reactor = UDPReactor()
        self.reactor.advance(1000)
        self.allocator = PortAllocator(PortRange(30000, 30002), self.reactor)
        self.mode = UDPMode(self.reactor, self.allocator, "127.0.0.1")
        self.tunnelPort = self.reactor.listenUDP(
            8443, self.mode.tunnelSide, maxPacketSize=MAX_PACKET_SIZE
        )
        self.control = FakeControl()
        self.session = self.mode.newSession(self.control, _SECRET)
        self.control.udpSession = self.session
        toTunnel, toRelay = deriveKeys(_SECRET, self.session.sessionId)
        self.tunnelSealer = Sealer(toRelay, self.session.sessionId, Direction.TUNNEL_TO_RELAY)
        self.tunnelOpener = Opener(toTunnel, self.session.sessionId, Direction.RELAY_TO_TUNNEL)
        self.router = Router(Identity.generate(), self.reactor)
        self.router.leases.register(_LABEL, _OWNER, self.control)
        self.lease = self.successResultOf(
            Deferred.fromCoroutine(
                self.mode.ports.open(
                    self.router, _OWNER, _LABEL, f"{_LABEL}.localhost", self.control
                )
            )
        )
        self.publicPort = self.reactor.portAt(self.lease.port)
        self.events = EventLoggingObserver.createWithCleanup(
            self,  # type: ignore[arg-type]
            globalLogPublisher,
        )

    def fromTunnel(
        self, kind: Kind, flowId: int = 0, payload: bytes = b"", address: tuple[str, int] = _TUNNEL
    ) -> bytes:
        """
        Send a datagram sealed by the tunnel to the relay's tunnel-facing socket.

        @return: The sealed datagram.
        """
        datagram = self.tunnelSealer.seal(kind, flowId, payload)
        self.tunnelPort.receive(datagram, address)
        return datagram

    def visit(self, payload: bytes, visitor: tuple[str, int] = _ALICE) -> None:
        """
        Send a visitor's datagram to the lease's public port.
        """
        self.publicPort.receive(payload, visitor)

    def toTunnel(self) -> list[tuple[Opened, Any]]:
        """
        Open what the relay sent to tunnels since the last call, as the tunnel would.

        @return: Each datagram's (kind, flow id, payload) and the address it went to.
        """
        written, self.tunnelPort.written = self.tunnelPort.written, []
        return [(self.tunnelOpener.open(datagram), address) for datagram, address in written]

    def toVisitors(self) -> list[tuple[bytes, Any]]:
        """
        @return: What the public port wrote to visitors since the last call.
        """
        written, self.publicPort.written = self.publicPort.written, []
        return written

    def dropEvents(self) -> list[dict[str, Any]]:
        """
        @return: The warnings UDP mode logged about dropped datagrams.
        """
        return [
            event
            for event in self.events
            if event.get("log_namespace") == _RELAY_NAMESPACE
            and event["log_level"] == LogLevel.warn
        ]

    def pathUp(self) -> None:
        """
        Send a keepalive from the tunnel, and discard the relay's answer.
        """
        self.fromTunnel(Kind.KEEPALIVE)
        self.toTunnel()

    def test_newSession(self) -> None:
        """
        Each session gets its own random id of the sealed header's length and is found by it; its
        sealer and opener use the keys derived from the secret and that id.
        """
        other = self.mode.newSession(FakeControl(), _SECRET)
        self.assertEqual(len(self.session.sessionId), SESSION_ID_LENGTH)
        self.assertNotEqual(other.sessionId, self.session.sessionId)
        self.assertIs(self.mode.sessions[self.session.sessionId], self.session)
        self.assertIs(self.mode.sessions[other.sessionId], other)
        self.assertIs(self.session.control, self.control)
        self.assertIsNone(self.session.address)
        sealed = self.session.sealer.seal(Kind.DATA, 3, b"x")
        self.assertEqual(self.tunnelOpener.open(sealed), (Kind.DATA, 3, b"x"))
        self.assertEqual(
            self.session.opener.open(self.tunnelSealer.seal(Kind.DATA, 4, b"y")),
            (Kind.DATA, 4, b"y"),
        )

    def test_publicPort(self) -> None:
        """
        A lease's public port is the first free one of the range, on the configured interface,
        read with buffers for the largest datagram; its protocol is the session's public side.
        """
        self.assertEqual(self.lease.port, 30000)
        self.assertEqual(self.reactor.listenCalls[-1], (30000, "127.0.0.1", MAX_PACKET_SIZE))
        self.assertIsInstance(self.publicPort.protocol, PublicUDP)
        self.assertIs(self.session.public, self.publicPort.protocol)

    def test_keepaliveAnswered(self) -> None:
        """
        A keepalive from the tunnel is answered with a sealed keepalive to its address, and
        teaches the session that address and when it was heard.
        """
        self.reactor.advance(5)
        self.fromTunnel(Kind.KEEPALIVE)
        self.assertEqual(self.toTunnel(), [((Kind.KEEPALIVE, 0, b""), _TUNNEL)])
        self.assertEqual(self.session.address, _TUNNEL)
        self.assertEqual(self.session.heard, 1005)
        self.assertEqual(self.control.calls, [])
        self.assertEqual(self.mode.counters["udp_dropped"], 0)

    def test_addressFollowsTunnel(self) -> None:
        """
        When the tunnel's address changes (a NAT rebinding), its next authenticated datagram moves
        the relay's datagrams to the new address.
        """
        self.pathUp()
        self.fromTunnel(Kind.KEEPALIVE, address=_ELSEWHERE)
        self.assertEqual(self.toTunnel(), [((Kind.KEEPALIVE, 0, b""), _ELSEWHERE)])
        self.visit(b"ping")
        self.assertEqual(self.toTunnel(), [((Kind.DATA, 1, b"ping"), _ELSEWHERE)])

    def test_addressNormalised(self) -> None:
        """
        The tunnel's address is kept as (host, port), even when the socket reports an IPv6
        address with flow info and scope id.
        """
        datagram = self.tunnelSealer.seal(Kind.KEEPALIVE, 0, b"")
        self.tunnelPort.receive(datagram, ("2001:db8::9", 50000, 0, 0))
        self.assertEqual(self.session.address, ("2001:db8::9", 50000))
        self.assertEqual(self.toTunnel(), [((Kind.KEEPALIVE, 0, b""), ("2001:db8::9", 50000))])

    def test_dataReachesVisitor(self) -> None:
        """
        A DATA datagram from the tunnel goes, unsealed, to the visitor of its flow.
        """
        self.visit(b"one", _ALICE)
        self.visit(b"two", _BOB)
        self.fromTunnel(Kind.DATA, 2, b"to bob")
        self.fromTunnel(Kind.DATA, 1, b"to alice")
        self.assertEqual(self.toVisitors(), [(b"to bob", _BOB), (b"to alice", _ALICE)])
        self.assertEqual(self.mode.counters["udp_from_tunnel"], 2)

    def test_dataTeachesAddress(self) -> None:
        """
        A DATA datagram, not only a keepalive, teaches the tunnel's address and keeps the path
        fresh; it is not answered.
        """
        self.visit(b"one")
        self.control.take()
        self.fromTunnel(Kind.DATA, 1, b"reply")
        self.assertEqual(self.tunnelPort.written, [])
        self.assertEqual(self.session.address, _TUNNEL)
        self.reactor.advance(PATH_TIMEOUT - 1)
        self.fromTunnel(Kind.DATA, 1, b"reply")
        self.reactor.advance(PATH_TIMEOUT - 1)
        self.visit(b"two")
        self.assertEqual(self.toTunnel(), [((Kind.DATA, 1, b"two"), _TUNNEL)])
        self.assertEqual(self.control.calls, [])

    def test_visitorSealedToTunnel(self) -> None:
        """
        With a live path, a visitor's datagram goes sealed to the tunnel's learned address; its
        flow is announced over the control session once, with the visitor's address.
        """
        self.pathUp()
        self.visit(b"ping")
        self.visit(b"again")
        self.assertEqual(
            self.toTunnel(),
            [((Kind.DATA, 1, b"ping"), _TUNNEL), ((Kind.DATA, 1, b"again"), _TUNNEL)],
        )
        self.assertEqual(
            self.control.calls, [(FlowOpened, {"flowId": 1, "host": _ALICE[0], "port": _ALICE[1]})]
        )
        self.assertEqual(self.mode.counters["udp_to_tunnel"], 2)
        self.assertEqual(self.mode.counters["udp_over_control"], 0)

    def test_eachFlowAnnounced(self) -> None:
        """
        Each visitor address is its own flow, announced with its own address.
        """
        self.pathUp()
        self.visit(b"a", _ALICE)
        self.visit(b"b", _BOB)
        self.visit(b"c", _ALICE)
        self.assertEqual(
            self.control.calls,
            [
                (FlowOpened, {"flowId": 1, "host": _ALICE[0], "port": _ALICE[1]}),
                (FlowOpened, {"flowId": 2, "host": _BOB[0], "port": _BOB[1]}),
            ],
        )
        self.assertEqual(
            [opened for opened, _ in self.toTunnel()],
            [(Kind.DATA, 1, b"a"), (Kind.DATA, 2, b"b"), (Kind.DATA, 1, b"c")],
        )

    def test_overControlBeforeKeepalive(self) -> None:
        """
        Before any keepalive from the tunnel, a visitor's datagram goes over the control session,
        after its flow's announcement.
        """
        self.visit(b"ping")
        self.assertEqual(
            self.control.calls,
            [
                (FlowOpened, {"flowId": 1, "host": _ALICE[0], "port": _ALICE[1]}),
                (Datagram, {"flowId": 1, "payload": b"ping"}),
            ],
        )
        self.assertEqual(self.tunnelPort.written, [])
        self.assertEqual(self.mode.counters["udp_over_control"], 1)
        self.assertEqual(self.mode.counters["udp_to_tunnel"], 0)

    def test_overControlAfterPathTimeout(self) -> None:
        """
        L{PATH_TIMEOUT} seconds after the tunnel's last authenticated datagram, visitors'
        datagrams go over the control session; the next keepalive brings the path back.
        """
        self.pathUp()
        self.visit(b"first")
        self.toTunnel()
        self.control.take()
        self.reactor.advance(PATH_TIMEOUT - 0.5)
        self.visit(b"still")
        self.assertEqual(self.toTunnel(), [((Kind.DATA, 1, b"still"), _TUNNEL)])
        self.reactor.advance(0.5)
        self.visit(b"late")
        self.assertEqual(self.tunnelPort.written, [])
        self.assertEqual(self.control.take(), [(Datagram, {"flowId": 1, "payload": b"late"})])
        self.pathUp()
        self.visit(b"back")
        self.assertEqual(self.toTunnel(), [((Kind.DATA, 1, b"back"), _TUNNEL)])
        self.assertEqual(self.control.calls, [])

    def test_oversizedOverControl(self) -> None:
        """
        A datagram too large to seal into one goes over the control session even with a live
        path; one of L{MAX_PAYLOAD} bytes still goes sealed.
        """
        self.pathUp()
        largest = b"x" * MAX_PAYLOAD
        self.visit(largest)
        self.assertEqual(self.toTunnel(), [((Kind.DATA, 1, largest), _TUNNEL)])
        self.control.take()
        tooLarge = b"y" * (MAX_PAYLOAD + 1)
        self.visit(tooLarge)
        self.assertEqual(self.tunnelPort.written, [])
        self.assertEqual(self.control.take(), [(Datagram, {"flowId": 1, "payload": tooLarge})])
        self.assertEqual(self.mode.counters["udp_over_control"], 1)

    def assertDropped(self, reason: str, address: tuple[str, int] = _ELSEWHERE) -> None:
        """
        Check that exactly one datagram was dropped, without an answer, a delivery, or a change
        of the tunnel's address, and that the drop was logged with its reason and sender.

        @param reason: The reason the log event must give.
        @param address: The sender the log event must name.
        """
        self.assertEqual(self.mode.counters["udp_dropped"], 1)
        self.assertEqual(self.tunnelPort.written, [])
        self.assertEqual(self.publicPort.written, [])
        self.assertIsNone(self.session.address)
        [event] = self.dropEvents()
        self.assertEqual((event["reason"], event["address"]), (reason, address))
        self.assertIn("dropped a UDP datagram", formatEvent(event))

    def test_forgedDropped(self) -> None:
        """
        A datagram with a tampered byte is dropped and counted, and teaches nothing.
        """
        self.visit(b"ping")
        datagram = self.tunnelSealer.seal(Kind.DATA, 1, b"reply")
        self.tunnelPort.receive(tamper(datagram, HEADER_LENGTH), _ELSEWHERE)
        self.assertDropped("forged")
        self.assertEqual(self.mode.counters["udp_from_tunnel"], 0)

    def test_tamperedHeaderDropped(self) -> None:
        """
        The header is authenticated too: a datagram whose flow id was changed to another live
        flow's is dropped.
        """
        self.visit(b"ping")
        self.visit(b"ping", _BOB)
        datagram = self.tunnelSealer.seal(Kind.DATA, 1, b"reply")
        self.tunnelPort.receive(tamper(datagram, 1 + SESSION_ID_LENGTH + 3, 0x03), _ELSEWHERE)
        self.assertDropped("forged")

    def test_replayedDropped(self) -> None:
        """
        A datagram received a second time is dropped: only the first is delivered.
        """
        self.visit(b"ping")
        datagram = self.fromTunnel(Kind.DATA, 1, b"reply")
        self.tunnelPort.receive(datagram, _ELSEWHERE)
        self.assertEqual(self.toVisitors(), [(b"reply", _ALICE)])
        self.assertEqual(self.session.address, _TUNNEL)
        self.assertEqual(self.mode.counters["udp_dropped"], 1)
        [event] = self.dropEvents()
        self.assertEqual((event["reason"], event["address"]), ("replayed", _ELSEWHERE))

    def test_replayedKeepaliveNotAnswered(self) -> None:
        """
        A replayed keepalive is not answered, so the relay answers each keepalive at most once.
        """
        datagram = self.fromTunnel(Kind.KEEPALIVE)
        self.tunnelPort.receive(datagram, _TUNNEL)
        self.assertEqual(len(self.toTunnel()), 1)
        self.assertEqual(self.mode.counters["udp_dropped"], 1)

    def test_unknownSessionDropped(self) -> None:
        """
        A datagram naming a session the relay does not have is dropped.
        """
        _, toRelay = deriveKeys(_SECRET, _SESSION_ID)
        stranger = Sealer(toRelay, _SESSION_ID, Direction.TUNNEL_TO_RELAY)
        self.tunnelPort.receive(stranger.seal(Kind.KEEPALIVE, 0, b""), _ELSEWHERE)
        self.assertDropped("unknown session")

    def test_wrongKeyDropped(self) -> None:
        """
        A datagram naming this session but sealed under another session's keys is dropped.
        """
        _, toRelay = deriveKeys(_OTHER_SECRET, self.session.sessionId)
        other = Sealer(toRelay, self.session.sessionId, Direction.TUNNEL_TO_RELAY)
        self.tunnelPort.receive(other.seal(Kind.KEEPALIVE, 0, b""), _ELSEWHERE)
        self.assertDropped("forged")

    def test_otherSessionDatagramDropped(self) -> None:
        """
        A datagram of one session relabelled with another live session's id does not open as
        that session's.
        """
        other = self.mode.newSession(FakeControl(), _SECRET)
        datagram = bytearray(self.tunnelSealer.seal(Kind.KEEPALIVE, 0, b""))
        datagram[1 : 1 + SESSION_ID_LENGTH] = other.sessionId
        self.tunnelPort.receive(bytes(datagram), _ELSEWHERE)
        self.assertDropped("forged")
        self.assertIsNone(other.address)

    def test_reflectedDropped(self) -> None:
        """
        The relay's own datagram sent back to it does not open: each direction has its own key.
        """
        self.tunnelPort.receive(self.session.sealer.seal(Kind.KEEPALIVE, 0, b""), _ELSEWHERE)
        self.assertDropped("forged")

    def test_tooShortDropped(self) -> None:
        """
        A datagram shorter than a header is dropped before any lookup.
        """
        self.tunnelPort.receive(b"\x12" + self.session.sessionId[:4], _ELSEWHERE)
        self.assertDropped("too short")

    def test_truncatedDropped(self) -> None:
        """
        A datagram with a whole header but no room for a tag is dropped as malformed.
        """
        datagram = self.tunnelSealer.seal(Kind.KEEPALIVE, 0, b"")
        self.tunnelPort.receive(datagram[: HEADER_LENGTH + 1], _ELSEWHERE)
        self.assertDropped("malformed")

    def test_dropLogRateLimited(self) -> None:
        """
        Drops are all counted, but logged at most once per L{DROP_LOG_INTERVAL}; each event says
        how many drops went unlogged since the last.
        """
        for _ in range(3):
            self.tunnelPort.receive(b"junk", _ELSEWHERE)
        self.assertEqual(len(self.dropEvents()), 1)
        self.reactor.advance(DROP_LOG_INTERVAL - 1)
        self.tunnelPort.receive(b"junk", _ELSEWHERE)
        self.assertEqual(len(self.dropEvents()), 1)
        self.reactor.advance(1)
        self.tunnelPort.receive(b"junk", _ELSEWHERE)
        first, second = self.dropEvents()
        self.assertEqual((first["unlogged"], second["unlogged"]), (0, 3))
        self.assertEqual(self.mode.counters["udp_dropped"], 5)

    def test_sendFailureCounted(self) -> None:
        """
        An answer the tunnel-facing socket refuses is counted as a drop, not raised.
        """
        self.tunnelPort.failWith = OSError("network unreachable")
        self.fromTunnel(Kind.KEEPALIVE)
        self.assertEqual(self.mode.counters["udp_dropped"], 1)
        [event] = self.dropEvents()
        self.assertEqual(event["reason"], "send failed: network unreachable")

    def test_closeDatagramForgetsFlow(self) -> None:
        """
        A CLOSE datagram from the tunnel forgets the flow on the public side and in the session:
        replies to it are not delivered, and the visitor's next datagram opens and announces a new
        flow.
        """
        self.pathUp()
        self.visit(b"ping")
        self.control.take()
        self.fromTunnel(Kind.CLOSE, 1)
        public = self.session.public
        assert public is not None
        self.assertIsNone(public.flowAddress(1))
        self.assertEqual(self.session.announced, set())
        self.fromTunnel(Kind.DATA, 1, b"late")
        self.assertEqual(self.publicPort.written, [])
        self.visit(b"again")
        self.assertEqual(
            self.control.calls, [(FlowOpened, {"flowId": 2, "host": _ALICE[0], "port": _ALICE[1]})]
        )

    def test_closeFlowForgetsFlow(self) -> None:
        """
        L{UDPMode.closeFlow} (the tunnel's L{FlowClosed}) forgets the flow on the public side and in
        the session, so the visitor's next datagram opens and announces a new flow.
        """
        self.visit(b"ping")
        self.control.take()
        self.mode.closeFlow(self.session, 1)
        public = self.session.public
        assert public is not None
        self.assertEqual(public.flows, 0)
        self.assertEqual(self.session.announced, set())
        self.mode.fromTunnel(self.session, 1, b"late")
        self.assertEqual(self.publicPort.written, [])
        self.visit(b"again")
        self.assertEqual(
            self.control.take()[0],
            (FlowOpened, {"flowId": 2, "host": _ALICE[0], "port": _ALICE[1]}),
        )

    def test_fromTunnelOverControl(self) -> None:
        """
        L{UDPMode.fromTunnel} (the tunnel's L{Datagram}) goes to the flow's visitor like a sealed
        DATA datagram.
        """
        self.visit(b"ping")
        self.mode.fromTunnel(self.session, 1, b"reply")
        self.assertEqual(self.toVisitors(), [(b"reply", _ALICE)])

    def test_idleFlowClosed(self) -> None:
        """
        A visitor flow idle for L{RELAY_FLOW_IDLE} seconds (and at most a quarter more) is
        forgotten on the relay and in the session, and the tunnel is told with L{FlowClosed}; the
        visitor's next datagram is a new flow, announced again.
        """
        self.visit(b"ping")
        self.control.take()
        self.reactor.wait(RELAY_FLOW_IDLE)
        self.assertEqual(self.control.calls, [])
        self.reactor.wait(RELAY_FLOW_IDLE / 4)
        self.assertEqual(self.control.take(), [(FlowClosed, {"flowId": 1})])
        self.assertEqual(self.session.announced, set())
        self.visit(b"again")
        self.assertEqual(
            self.control.take()[0],
            (FlowOpened, {"flowId": 2, "host": _ALICE[0], "port": _ALICE[1]}),
        )

    def test_forget(self) -> None:
        """
        After L{UDPMode.forget}, the session's datagrams are dropped as from an unknown session;
        forgetting it again is harmless.
        """
        self.mode.forget(self.session)
        self.assertNotIn(self.session.sessionId, self.mode.sessions)
        self.fromTunnel(Kind.KEEPALIVE, address=_ELSEWHERE)
        self.assertDropped("unknown session")
        self.mode.forget(self.session)

    def test_closePortStopsPublic(self) -> None:
        """
        Closing the lease's port stops its public side at once (flows forgotten, later datagrams
        dropped), tells the tunnel to forget the flows (once) and stops listening.
        """
        self.pathUp()
        self.visit(b"ping")
        self.toTunnel()
        self.control.take()
        public = self.session.public
        assert public is not None
        closed = self.mode.ports.close(_OWNER, _LABEL, self.control)
        self.assertFalse(self.publicPort.listening)
        self.assertEqual(public.flows, 0)
        self.visit(b"after")
        self.fromTunnel(Kind.DATA, 1, b"late")
        self.assertEqual(public.dropped["stopped"], 1)
        self.assertEqual(self.toTunnel(), [])
        self.assertEqual(self.control.take(), [(FlowClosed, {"flowId": 1})])
        self.assertIsNone(self.session.public)
        self.reactor.advance(0)
        self.successResultOf(closed)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertNotIn((_OWNER, _LABEL), self.mode.ports.leases)

    def test_reopenedPortAnnouncesFlows(self) -> None:
        """
        A port reopened on the same session (a re-registration) numbers flows from 1 again; since
        the tunnel was told the old flows closed, the new visitor's flow is announced afresh.
        """
        self.pathUp()
        self.visit(b"old", _ALICE)
        self.toTunnel()
        self.control.take()
        self.mode.ports.close(_OWNER, _LABEL, self.control)
        self.reactor.advance(0)
        self.control.take()
        lease = self.successResultOf(
            Deferred.fromCoroutine(
                self.mode.ports.open(
                    self.router, _OWNER, _LABEL, f"{_LABEL}.localhost", self.control
                )
            )
        )
        self.reactor.portAt(lease.port).receive(b"new", _BOB)
        calls = self.control.take()
        self.assertEqual(calls[0][0], FlowOpened)
        self.assertEqual(calls[0][1]["flowId"], 1)
        self.assertEqual(calls[0][1]["host"], _BOB[0])


class TunnelUDPTests(SynchronousTestCase):
    """
    Tests for L{TunnelUDP}: keepalives, the path check and fallback, sealed datagrams both ways,
    and stopping; the relay is played with its own sealer and opener.
    """

    def setUp(self) -> None:
        """
        Start a tunnel's UDP side on a fake reactor with a fake control session, and keep the
        first datagram it sent; watch log events.
        """
        self.reactor = UDPReactor()
        self.reactor.advance(1000)
        self.events = EventLoggingObserver.createWithCleanup(
            self,  # type: ignore[arg-type]
            globalLogPublisher,
        )
        self.control = FakeControl()
        self.udp = TunnelUDP(
            self.reactor, self.control, _RELAY, _SESSION_ID, _SECRET, _TARGET, idleTimeout=60.0
        )
        toTunnel, toRelay = deriveKeys(_SECRET, _SESSION_ID)
        self.relaySealer = Sealer(toTunnel, _SESSION_ID, Direction.RELAY_TO_TUNNEL)
        self.relayOpener = Opener(toRelay, _SESSION_ID, Direction.TUNNEL_TO_RELAY)
        self.udp.start()
        self.socket = self.reactor.ports[0]
        self.firstSent = self.sent()

    def sent(self) -> list[Opened]:
        """
        Open what the tunnel sent to the relay since the last call, as the relay would.

        @return: Each datagram's (kind, flow id, payload).
        """
        written, self.socket.written = self.socket.written, []
        self.assertEqual([address for _, address in written], [None] * len(written))
        return [self.relayOpener.open(datagram) for datagram, _ in written]

    def fromRelay(self, kind: Kind, flowId: int = 0, payload: bytes = b"") -> bytes:
        """
        Send a datagram sealed by the relay to the tunnel's socket.

        @return: The sealed datagram.
        """
        datagram = self.relaySealer.seal(kind, flowId, payload)
        self.socket.receive(datagram)
        return datagram

    def logged(self, level: LogLevel) -> list[str]:
        """
        @param level: A log level.
        @return: The text of every event L{TunnelUDP} logged at that level.
        """
        return [
            formatEvent(event)
            for event in self.events
            if event.get("log_namespace") == _TUNNEL_NAMESPACE and event["log_level"] == level
        ]

    def answer(self) -> None:
        """
        Answer with a keepalive from the relay, and discard what the tunnel sent so far.
        """
        self.fromRelay(Kind.KEEPALIVE)
        self.sent()

    def test_start(self) -> None:
        """
        L{TunnelUDP.start} opens a socket able to read the largest datagram, connects it to the
        relay's address and sends one sealed keepalive at once.
        """
        self.assertEqual(self.reactor.listenCalls, [(0, "", MAX_PACKET_SIZE)])
        self.assertEqual(self.socket.connectedTo, _RELAY)
        self.assertEqual(self.firstSent, [(Kind.KEEPALIVE, 0, b"")])
        self.assertFalse(self.udp.pathUp)

    def test_keepaliveInterval(self) -> None:
        """
        Keepalives follow every L{KEEPALIVE_INTERVAL} seconds, whether the relay answers or not.
        """
        self.reactor.advance(KEEPALIVE_INTERVAL - 0.5)
        self.assertEqual(self.sent(), [])
        self.reactor.advance(0.5)
        self.assertEqual(self.sent(), [(Kind.KEEPALIVE, 0, b"")])
        self.fromRelay(Kind.KEEPALIVE)
        self.reactor.wait(3 * KEEPALIVE_INTERVAL)
        self.assertEqual(self.sent(), [(Kind.KEEPALIVE, 0, b"")] * 3)

    def test_noAnswerFallsBack(self) -> None:
        """
        With no answer within L{PATH_CHECK} seconds, one warning says datagrams go over the
        control session, and replies from the local service go there as L{Datagram}.
        """
        self.reactor.advance(PATH_CHECK - 0.5)
        self.assertEqual(self.logged(LogLevel.warn), [])
        self.reactor.advance(0.5)
        [warning] = self.logged(LogLevel.warn)
        self.assertIn("no answer from the relay over UDP within 3 s", warning)
        self.assertIn("over the control session", warning)
        self.assertFalse(self.udp.pathUp)
        self.udp.toRelay(1, b"reply")
        self.assertEqual(self.control.calls, [(Datagram, {"flowId": 1, "payload": b"reply"})])
        self.reactor.wait(10 * KEEPALIVE_INTERVAL)
        self.assertEqual(len(self.logged(LogLevel.warn)), 1)
        self.assertEqual(self.sent(), [(Kind.KEEPALIVE, 0, b"")] * 10)

    def test_overControlBeforeAnswer(self) -> None:
        """
        Before the relay answers, replies already go over the control session.
        """
        self.udp.toRelay(1, b"early")
        self.assertEqual(self.control.calls, [(Datagram, {"flowId": 1, "payload": b"early"})])
        self.assertEqual(self.sent(), [])

    def test_answerInTime(self) -> None:
        """
        An answer within L{PATH_CHECK} seconds brings the path up with nothing logged, and replies
        go sealed.
        """
        self.reactor.advance(PATH_CHECK / 2)
        self.answer()
        self.assertTrue(self.udp.pathUp)
        self.assertEqual(self.udp.heard, 1000 + PATH_CHECK / 2)
        self.reactor.advance(PATH_CHECK)
        self.assertEqual(self.logged(LogLevel.warn) + self.logged(LogLevel.info), [])
        self.udp.toRelay(4, b"reply")
        self.assertEqual(self.sent(), [(Kind.DATA, 4, b"reply")])
        self.assertEqual(self.control.calls, [])

    def test_answerAfterFallBack(self) -> None:
        """
        After a fallback, a sealed keepalive from the relay brings the path up again, says so once,
        and replies go as sealed DATA datagrams.
        """
        self.reactor.advance(PATH_CHECK)
        self.answer()
        self.assertTrue(self.udp.pathUp)
        [info] = self.logged(LogLevel.info)
        self.assertIn("answers over UDP again", info)
        self.fromRelay(Kind.KEEPALIVE)
        self.assertEqual(len(self.logged(LogLevel.info)), 1)
        self.udp.toRelay(3, b"reply")
        self.assertEqual(self.sent(), [(Kind.DATA, 3, b"reply")])
        self.assertEqual(self.control.calls, [])

    def test_dataDelivered(self) -> None:
        """
        A sealed DATA datagram from the relay goes to the local service on its flow's own socket,
        and the service's reply goes back sealed with the flow's id.
        """
        self.fromRelay(Kind.DATA, 7, b"query")
        flowSocket = self.reactor.ports[1]
        self.assertIs(self.udp.flows.socketFor(7), flowSocket)
        self.assertEqual(self.reactor.listenCalls[1], (0, "127.0.0.1", MAX_PACKET_SIZE))
        self.assertEqual(flowSocket.connectedTo, _TARGET)
        self.assertEqual(flowSocket.written, [(b"query", None)])
        flowSocket.receive(b"answer")
        self.assertEqual(self.sent(), [(Kind.DATA, 7, b"answer")])
        self.assertEqual(self.control.calls, [])

    def test_closeDatagram(self) -> None:
        """
        A sealed CLOSE datagram from the relay closes the flow and its socket.
        """
        self.fromRelay(Kind.DATA, 7, b"query")
        flowSocket = self.reactor.ports[1]
        self.fromRelay(Kind.CLOSE, 7)
        self.assertEqual(self.udp.flows.flows, 0)
        self.assertFalse(flowSocket.listening)
        self.assertEqual(self.control.calls, [])

    def test_idleFlowClosed(self) -> None:
        """
        A flow that goes idle in the tunnel is reported to the relay with L{FlowClosed}.
        """
        self.fromRelay(Kind.DATA, 7, b"query")
        self.reactor.wait(60.0 * 1.25 + 1)
        self.assertIn((FlowClosed, {"flowId": 7}), self.control.calls)
        self.assertEqual(self.udp.flows.flows, 0)

    def assertDropped(self, reason: str) -> None:
        """
        Check that exactly one datagram was dropped for C{reason}, and that it neither brought
        the path up nor reached the local service.

        @param reason: The key it was counted under.
        """
        self.assertEqual(self.udp.dropped, {reason: 1})
        self.assertFalse(self.udp.pathUp)
        self.assertEqual(self.udp.flows.flows, 0)
        self.assertEqual(len(self.reactor.ports), 1)

    def test_forgedDropped(self) -> None:
        """
        A datagram with a tampered byte is dropped and counted; the path stays down.
        """
        datagram = self.relaySealer.seal(Kind.DATA, 7, b"query")
        self.socket.receive(tamper(datagram, HEADER_LENGTH))
        self.assertDropped("forged")
        self.reactor.advance(PATH_CHECK)
        self.assertEqual(len(self.logged(LogLevel.warn)), 1)

    def test_forgedKeepaliveDropped(self) -> None:
        """
        A keepalive with a tampered tag does not bring the path up.
        """
        datagram = self.relaySealer.seal(Kind.KEEPALIVE, 0, b"")
        self.socket.receive(tamper(datagram, -1))
        self.assertDropped("forged")

    def test_reflectedDropped(self) -> None:
        """
        The tunnel's own keepalive reflected back does not open, so it cannot fake an answer.
        """
        self.reactor.advance(KEEPALIVE_INTERVAL)
        [(keepalive, _)] = self.socket.written
        self.socket.receive(keepalive)
        self.assertDropped("forged")

    def test_replayedDropped(self) -> None:
        """
        A datagram received twice is delivered once.
        """
        datagram = self.fromRelay(Kind.DATA, 7, b"query")
        self.socket.receive(datagram)
        self.assertEqual(self.udp.dropped, {"replayed": 1})
        self.assertEqual(self.reactor.ports[1].written, [(b"query", None)])

    def test_wrongSessionDropped(self) -> None:
        """
        A datagram of another session is dropped.
        """
        otherId = b"O" * SESSION_ID_LENGTH
        other = Sealer(deriveKeys(_SECRET, otherId)[0], otherId, Direction.RELAY_TO_TUNNEL)
        self.socket.receive(other.seal(Kind.KEEPALIVE, 0, b""))
        self.assertDropped("session")

    def test_tooShortDropped(self) -> None:
        """
        A datagram too short to be sealed is dropped.
        """
        self.socket.receive(b"\x12" + _SESSION_ID)
        self.assertDropped("malformed")

    def test_pathTimeout(self) -> None:
        """
        With no answer for L{tunnelmode.PATH_TIMEOUT} seconds, the next keepalive finds the path
        lost: a warning says so and replies go over the control session again.
        """
        self.answer()
        self.reactor.wait(tunnelmode.PATH_TIMEOUT)
        self.assertTrue(self.udp.pathUp)
        self.reactor.wait(KEEPALIVE_INTERVAL)
        self.assertFalse(self.udp.pathUp)
        [warning] = self.logged(LogLevel.warn)
        self.assertIn("no answer from the relay over UDP for 31 s", warning)
        self.sent()
        self.udp.toRelay(2, b"reply")
        self.assertEqual(self.control.calls, [(Datagram, {"flowId": 2, "payload": b"reply"})])
        self.assertEqual(self.sent(), [])
        self.answer()
        self.assertTrue(self.udp.pathUp)

    def test_warnsAgainAfterRecovery(self) -> None:
        """
        Each change is logged: a fallback, the recovery, and a later loss of the path again.
        """
        self.reactor.advance(PATH_CHECK)
        self.answer()
        self.reactor.wait(tunnelmode.PATH_TIMEOUT + KEEPALIVE_INTERVAL)
        self.assertFalse(self.udp.pathUp)
        first, second = self.logged(LogLevel.warn)
        self.assertIn("within 3 s", first)
        self.assertIn("for 31 s", second)
        self.assertEqual(len(self.logged(LogLevel.info)), 1)

    def test_answersKeepPathUp(self) -> None:
        """
        A path the relay keeps answering stays up indefinitely.
        """
        for _ in range(10):
            self.answer()
            self.reactor.wait(KEEPALIVE_INTERVAL)
        self.assertTrue(self.udp.pathUp)
        self.assertEqual(self.logged(LogLevel.warn), [])

    def test_oversizedOverControl(self) -> None:
        """
        A reply too large to seal into one datagram goes over the control session even with a
        live path; one of L{MAX_PAYLOAD} bytes still goes sealed.
        """
        self.answer()
        largest = b"x" * MAX_PAYLOAD
        self.udp.toRelay(1, largest)
        self.assertEqual(self.sent(), [(Kind.DATA, 1, largest)])
        tooLarge = b"y" * (MAX_PAYLOAD + 1)
        self.udp.toRelay(1, tooLarge)
        self.assertEqual(self.sent(), [])
        self.assertEqual(self.control.calls, [(Datagram, {"flowId": 1, "payload": tooLarge})])

    def test_connectionRefused(self) -> None:
        """
        An ICMP refusal from the relay's UDP port takes the path down at once.
        """
        self.answer()
        self.udp.connectionRefused()
        self.assertFalse(self.udp.pathUp)
        [warning] = self.logged(LogLevel.warn)
        self.assertIn("refused", warning)
        self.udp.toRelay(1, b"reply")
        self.assertEqual(self.control.calls, [(Datagram, {"flowId": 1, "payload": b"reply"})])

    def test_sendFailureCounted(self) -> None:
        """
        A datagram the socket refuses to send is counted, not raised.
        """
        self.answer()
        self.socket.failWith = OSError("network unreachable")
        self.udp.toRelay(1, b"reply")
        self.reactor.advance(KEEPALIVE_INTERVAL)
        self.assertEqual(self.udp.dropped, {"send": 2})

    def test_stop(self) -> None:
        """
        L{TunnelUDP.stop} closes the socket and every flow's socket, and nothing is sent or
        scheduled afterwards: no keepalive, no path check.
        """
        self.fromRelay(Kind.DATA, 7, b"query")
        flowSocket = self.reactor.ports[1]
        self.udp.stop()
        self.assertFalse(self.socket.listening)
        self.assertFalse(flowSocket.listening)
        self.reactor.advance(0)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.reactor.wait(10 * KEEPALIVE_INTERVAL)
        self.assertEqual(self.socket.written, [])
        self.assertEqual(self.logged(LogLevel.warn), [])

    def test_stopBeforePathCheck(self) -> None:
        """
        Stopped before the path check, the tunnel logs no fallback and sends nothing more.
        """
        self.udp.stop()
        self.reactor.advance(0)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.reactor.wait(PATH_CHECK + KEEPALIVE_INTERVAL)
        self.assertEqual(self.logged(LogLevel.warn), [])
        self.assertEqual(self.socket.written, [])


class TunnelUDPOverControlTests(SynchronousTestCase):
    """
    L{TunnelUDP} with C{overControl} (a relay reached through hops): no UDP to the relay at all.
    """

    def test_noSocketDatagramsOverControl(self) -> None:
        """
        Starting opens no UDP socket and schedules no keepalive; replies from the local service go
        to the relay as L{Datagram} over the control session; stopping leaves nothing behind.
        """
        reactor = UDPReactor()
        control = FakeControl()
        udp = TunnelUDP(
            reactor, control, ("", 4017), _SESSION_ID, _SECRET, _TARGET, overControl=True
        )
        udp.start()
        self.assertEqual(reactor.ports, [])
        self.assertEqual(reactor.getDelayedCalls(), [])
        self.assertFalse(udp.pathUp)
        udp.toRelay(3, b"answer")
        self.assertEqual(control.take(), [(Datagram, {"flowId": 3, "payload": b"answer"})])
        udp.stop()
        self.assertEqual(reactor.getDelayedCalls(), [])
