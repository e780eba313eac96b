"""
Tests for L{portal.relay.clusterudp}: the forwarding member's side of UDP member links, in memory
(a memory reactor for the link's connection, a string transport for the link, a fake UDP port).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import (
    EventLoggingObserver,
    MemoryReactorClock,
    StringTransportWithDisconnection,
)
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from portal.relay.cluster import Member, PortClaim
from portal.relay.clusterudp import (
    LINK_RETRY,
    MAX_QUEUED_BYTES,
    MAX_QUEUED_FRAMES,
    ForwardedUDPPort,
    UDPLinkClient,
)
from portal.relay.memberlink import MemberLinks, MemberVisitor
from portal.relay.router import Router
from portal.relay.udplink import BAD_FRAME, LINK_IDLE_TIMEOUT
from portal.trust.identity import Identity, identityId
from portal.wire.clienthello import INTERNAL_ERROR, alertRecord
from portal.wire.control import Datagram, FlowOpened
from portal.wire.memberlink import ACK, MAGIC, checkMemberHeader, pairKey, parseMemberHeader
from portal.wire.udpframes import Frame, FrameReader, encodeFrame
from tests.test_memberlinks import FakeDirectory, asMember
from tests.test_udplink import Holder
from tests.test_udpmode import UDPReactor

_ALICE = ("198.51.100.4", 4001)
_BOB = ("198.51.100.5", 4002)
_NONCE = b"N" * 16


class ForwardedUDPPortTests(SynchronousTestCase):
    """
    Member B forwards UDP port 30000, whose lease "voice" member A holds live.
    """

    def setUp(self) -> None:
        """
        B's router and member links on a memory reactor, and B's socket on port 30000.
        """
        self.a, self.b, self.c = Identity.generate(), Identity.generate(), Identity.generate()
        self.reactor = MemoryReactorClock()
        self.reactor.advance(1000)
        self.router = Router(self.b, self.reactor, tunnelDomain="cluster.test")
        self.memberA = asMember(self.a, "a")
        self.directory = FakeDirectory(
            asMember(self.b, "b"),
            [self.memberA, asMember(self.b, "b"), asMember(self.c, "c")],
            {},
        )
        self.links = MemberLinks(self.router, self.directory, self.b, self.reactor)  # type: ignore[arg-type]
        self.claim: PortClaim | None = PortClaim("udp", 30000, "alice", "voice", self.a.id)
        self.forwarder = ForwardedUDPPort(self.links, 30000, lambda port: self.claim)
        self.udp = UDPReactor().listenUDP(30000, self.forwarder)
        self.events = EventLoggingObserver.createWithCleanup(
            self,  # type: ignore[arg-type]
            globalLogPublisher,
        )

    def connect(self) -> tuple[Any, StringTransportWithDisconnection]:
        """
        Complete the latest connection B started.

        @return: The link's connected protocol and its transport.
        """
        host, port, factory, _, _ = self.reactor.tcpClients[-1]
        protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        transport = StringTransportWithDisconnection()
        transport.protocol = protocol
        protocol.makeConnection(transport)
        return protocol, transport

    def attach(self) -> tuple[Any, StringTransportWithDisconnection]:
        """
        Complete the latest connection and attach as A would: check B's header, send the ACK.

        @return: The link's protocol and its transport, past the attach.
        """
        protocol, transport = self.connect()
        self.assertEqual(transport.value(), MAGIC)
        transport.clear()
        protocol.dataReceived(_NONCE)
        parsed = parseMemberHeader(transport.value())
        assert parsed is not None
        header, body, tag, used = parsed
        key = pairKey(self.a.privateKey, self.b.publicKey)
        self.assertTrue(checkMemberHeader(key, self.a.id, _NONCE, body, tag))
        self.assertEqual(
            (header.fromId, header.hostname, header.udpPort, header.tcpPort),
            (self.b.id, "voice.cluster.test", 30000, None),
        )
        self.assertEqual(used, len(transport.value()))
        transport.clear()
        protocol.dataReceived(ACK)
        return protocol, transport

    def test_firstDatagramOpensOneLink(self) -> None:
        """
        The first datagram opens a link to the holding member's control port; datagrams wait
        while it attaches, then cross it in order, each framed with its visitor's address.
        """
        self.udp.receive(b"one", _ALICE)
        self.udp.receive(b"two", _BOB)
        [(host, port, _, _, _)] = self.reactor.tcpClients
        self.assertEqual((host, port), ("127.0.0.1", 4017))
        _, transport = self.attach()
        self.assertEqual(
            FrameReader().feed(transport.value()),
            [Frame(*_ALICE, b"one"), Frame(*_BOB, b"two")],
        )
        transport.clear()
        self.udp.receive(b"three", _ALICE)
        self.assertEqual(FrameReader().feed(transport.value()), [Frame(*_ALICE, b"three")])
        self.assertEqual(len(self.reactor.tcpClients), 1)
        self.assertEqual(self.router.counters["udp_forwarded"], 3)

    def test_workerSendsTheRelayIdentity(self) -> None:
        """
        A worker of a relay (C{--workers}), whose member id has a suffix, names the relay's
        identity in the link's header, the id of the key it sends, as the holder checks.
        """
        me = Member(f"{self.b.id}-w0", self.b.publicKey, "127.0.0.1:4018", "b-w0")
        self.directory.me = me
        self.udp.receive(b"one", _ALICE)
        protocol, transport = self.connect()
        transport.clear()
        protocol.dataReceived(_NONCE)
        parsed = parseMemberHeader(transport.value())
        assert parsed is not None
        header = parsed[0]
        self.assertEqual((header.fromId, header.fromKey), (self.b.id, self.b.publicKey))
        self.assertEqual(identityId(header.fromKey), header.fromId)

    def test_queueBounded(self) -> None:
        """
        While the link connects, at most L{MAX_QUEUED_FRAMES} frames and L{MAX_QUEUED_BYTES}
        bytes wait; more are dropped and counted.
        """
        for index in range(MAX_QUEUED_FRAMES + 6):
            self.udp.receive(b"x", ("198.51.100.4", 1000 + index))
        self.assertEqual(self.router.counters["udp_link_dropped_queue_full"], 6)
        _, transport = self.attach()
        self.assertEqual(len(FrameReader().feed(transport.value())), MAX_QUEUED_FRAMES)

        link = self.forwarder.link
        assert link is not None
        link.close()
        self.reactor.advance(LINK_RETRY)
        big = b"y" * 60000
        for _ in range(MAX_QUEUED_BYTES // len(big) + 1):
            self.udp.receive(big, _ALICE)
        self.assertEqual(self.router.counters["udp_link_dropped_queue_full"], 7)

    def test_repliesSentFromThePort(self) -> None:
        """
        The holder's frames are sent to the visitors they name, from the forwarded port.
        """
        self.udp.receive(b"ping", _ALICE)
        protocol, _ = self.attach()
        protocol.dataReceived(encodeFrame(*_ALICE, b"pong") + encodeFrame(*_BOB, b"hi")[:5])
        self.assertEqual(self.udp.written, [(b"pong", _ALICE)])
        protocol.dataReceived(encodeFrame(*_BOB, b"hi")[5:])
        self.assertEqual(self.udp.written[1:], [(b"hi", _BOB)])
        self.assertEqual(self.router.counters["udp_forward_replies"], 2)

    def test_badFrameFromTheHolderClosesTheLink(self) -> None:
        """
        A bad frame from the holder closes the link, with a refusal counted and logged; a new
        link is opened no sooner than L{LINK_RETRY} seconds after the last.
        """
        self.udp.receive(b"ping", _ALICE)
        protocol, transport = self.attach()
        protocol.dataReceived(b"\x00\x00\x00\x09\x07" + b"z" * 8)
        self.assertFalse(transport.connected)
        self.assertIsNone(self.forwarder.link)
        self.assertEqual(self.router.refusals.counts[BAD_FRAME], 1)
        self.assertTrue(any(e.get("refusal") == BAD_FRAME for e in self.events))
        self.udp.receive(b"again", _ALICE)
        self.assertEqual(self.router.counters["udp_link_dropped_retry_wait"], 1)
        self.reactor.advance(LINK_RETRY)
        self.udp.receive(b"again", _ALICE)
        self.assertEqual(len(self.reactor.tcpClients), 2)

    def test_oldHolderRefusesCleanly(self) -> None:
        """
        A holder that does not know C{udpPort} takes the link for a TLS visitor and answers its
        first frame with a TLS alert: the link is closed as for any bad frame, and nothing is
        sent to the visitor.
        """
        self.udp.receive(b"ping", _ALICE)
        protocol, transport = self.connect()
        protocol.dataReceived(_NONCE)
        protocol.dataReceived(ACK + alertRecord(INTERNAL_ERROR))
        self.assertFalse(transport.connected)
        self.assertEqual(self.router.refusals.counts[BAD_FRAME], 1)
        self.assertEqual(self.udp.written, [])

    def test_holderUnreachable(self) -> None:
        """
        A holder that cannot be reached: what waited is dropped and counted, a warning logged,
        and the next datagram opens a new link.
        """
        self.udp.receive(b"one", _ALICE)
        self.udp.receive(b"two", _ALICE)
        _, _, factory, _, _ = self.reactor.tcpClients[-1]
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        self.assertIsNone(self.forwarder.link)
        self.assertEqual(self.router.counters["udp_link_dropped_link_failed"], 2)
        self.assertTrue(any("could not open a UDP link" in e["log_format"] for e in self.events))
        self.reactor.advance(LINK_RETRY)
        self.udp.receive(b"three", _ALICE)
        self.assertEqual(len(self.reactor.tcpClients), 2)

    def test_attachTimeout(self) -> None:
        """
        A holder that connects but never acknowledges fails the link after the attach timeout.
        """
        self.udp.receive(b"one", _ALICE)
        _, transport = self.connect()
        self.reactor.advance(self.router.limits.attachTimeout)
        self.assertFalse(transport.connected)
        self.assertIsNone(self.forwarder.link)
        self.assertEqual(self.router.counters["udp_link_dropped_link_failed"], 1)

    def test_congestedDropped(self) -> None:
        """
        While the link's socket asks for no more, datagrams are dropped and counted.
        """
        self.udp.receive(b"one", _ALICE)
        _, transport = self.attach()
        transport.clear()
        link = self.forwarder.link
        assert isinstance(link, UDPLinkClient)
        link.pauseProducing()
        self.udp.receive(b"lost", _ALICE)
        self.assertEqual(transport.value(), b"")
        self.assertEqual(self.router.counters["udp_link_dropped_congested"], 1)
        link.resumeProducing()
        self.udp.receive(b"found", _ALICE)
        self.assertEqual(FrameReader().feed(transport.value()), [Frame(*_ALICE, b"found")])

    def test_idleLinkClosed(self) -> None:
        """
        A link that carries nothing either way for the idle timeout is closed; a reply keeps it
        open.
        """
        self.udp.receive(b"one", _ALICE)
        protocol, transport = self.attach()
        self.reactor.advance(LINK_IDLE_TIMEOUT - 1)
        protocol.dataReceived(encodeFrame(*_ALICE, b"reply"))
        self.reactor.advance(LINK_IDLE_TIMEOUT - 1)
        self.assertTrue(transport.connected)
        self.reactor.advance(1)
        self.assertFalse(transport.connected)
        self.assertIsNone(self.forwarder.link)

    def test_notLiveDropped(self) -> None:
        """
        A datagram for a port no member holds live any more opens no link.
        """
        self.claim = None
        self.udp.receive(b"one", _ALICE)
        self.assertEqual(self.reactor.tcpClients, [])
        self.assertEqual(self.router.counters["udp_link_dropped_not_live"], 1)

    def test_holderChangedClosesTheLink(self) -> None:
        """
        When the lease moves to another member, the link to the old holder is closed, and the
        next datagram opens one to the new holder.
        """
        self.udp.receive(b"one", _ALICE)
        _, transport = self.attach()
        self.forwarder.checkHolder()
        self.assertTrue(transport.connected)
        self.claim = PortClaim("udp", 30000, "alice", "voice", self.c.id)
        self.forwarder.checkHolder()
        self.assertFalse(transport.connected)
        self.reactor.advance(LINK_RETRY)
        self.udp.receive(b"two", _ALICE)
        self.assertEqual(len(self.reactor.tcpClients), 2)

    def test_stoppedPortClosesTheLink(self) -> None:
        """
        Once the port stops listening (the lease ended, or came here), its link is closed.
        """
        self.udp.receive(b"one", _ALICE)
        _, transport = self.attach()
        self.forwarder.doStop()
        self.assertFalse(transport.connected)


class LinkEndsTests(SynchronousTestCase):
    """
    Both ends of a UDP member link together, in memory: member B forwards port 30000 to member
    A, which holds the UDP lease "voice" on it.
    """

    def setUp(self) -> None:
        """
        A with UDP mode and the lease's port open; B with its forwarding socket on the port.
        """
        holder = self.holder = Holder()
        self.bReactor = MemoryReactorClock()
        bRouter = Router(holder.b, self.bReactor, tunnelDomain="cluster.test")
        directory = FakeDirectory(
            asMember(holder.b, "b"), [asMember(holder.a, "a"), asMember(holder.b, "b")], {}
        )
        self.bRouter = bRouter
        links = MemberLinks(bRouter, directory, holder.b, self.bReactor)  # type: ignore[arg-type]
        claim = PortClaim("udp", 30000, "alice", "voice", holder.a.id)
        self.forwarder = ForwardedUDPPort(links, 30000, lambda port: claim)
        self.udp = UDPReactor().listenUDP(30000, self.forwarder)

    def connect(self) -> iosim.IOPump:
        """
        Join B's pending connection to a new member link protocol at A.

        @return: The pump between them.
        """
        host, port, factory, _, _ = self.bReactor.tcpClients[-1]
        client = factory.buildProtocol(IPv4Address("TCP", host, port))
        server = MemberVisitor(self.holder.router, self.holder.links)
        return iosim.connect(
            server,
            iosim.makeFakeServer(server),
            client,
            iosim.makeFakeClient(client),
            greet=False,
        )

    def test_roundTrip(self) -> None:
        """
        Datagrams at B reach A's tunnel as flows of their visitors' real addresses, and the
        tunnel's answers leave B's port for those visitors.
        """
        self.udp.receive(b"ping", _ALICE)
        self.udp.receive(b"hello", _BOB)
        pump = self.connect()
        pump.flush()
        calls = self.holder.control.take()
        self.assertEqual(
            [(kw["host"], kw["port"]) for command, kw in calls if command is FlowOpened],
            [_ALICE, _BOB],
        )
        self.assertEqual(
            [kw["payload"] for command, kw in calls if command is Datagram], [b"ping", b"hello"]
        )
        self.holder.mode.fromTunnel(self.holder.session, 2, b"to bob")
        self.holder.mode.fromTunnel(self.holder.session, 1, b"to alice")
        pump.flush()
        self.assertEqual(self.udp.written, [(b"to bob", _BOB), (b"to alice", _ALICE)])
        self.assertEqual(self.holder.publicPort.written, [])
        self.assertEqual(self.bRouter.counters["udp_forward_replies"], 2)
