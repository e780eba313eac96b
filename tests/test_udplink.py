"""
Tests for L{portal.relay.udplink} and the UDP links of L{portal.relay.memberlink.MemberVisitor}:
the holding member's end of a UDP member link, in memory (a fake UDP reactor and a string
transport for the link).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.testing import EventLoggingObserver, StringTransportWithDisconnection
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from portal.relay.leaseports import PortLease
from portal.relay.memberlink import MemberLinks, MemberVisitor
from portal.relay.ports import PortAllocator, PortRange
from portal.relay.router import Router
from portal.relay.udp import IReplyPath
from portal.relay.udplink import BAD_FRAME, LINK_IDLE_TIMEOUT, HolderUDPLink
from portal.relay.udpmode import UDPMode
from portal.trust.identity import Identity
from portal.wire.control import Datagram, FlowOpened
from portal.wire.memberlink import ACK, MAGIC, MemberHeader, encodeMemberHeader, pairKey
from portal.wire.udpframes import Frame, FrameReader, encodeFrame
from tests.test_memberlinks import FakeDirectory, _openLink, asMember
from tests.test_udpmode import FakeControl, UDPReactor

_ALICE = ("198.51.100.4", 4001)
_BOB = ("2001:db8::5", 4002)


class Holder:
    """
    Member A, holding the UDP lease "voice" of alice on port 30000 (at most two flows per source
    address), in a cluster with member B: its router and member links, UDP mode on a fake
    reactor, a fake control session for the lease, and the lease's port open.
    """

    def __init__(self) -> None:
        """
        Build A and open the lease's port.
        """
        self.a, self.b = Identity.generate(), Identity.generate()
        self.reactor = UDPReactor()
        self.reactor.advance(1000)
        self.router = Router(self.a, self.reactor, tunnelDomain="cluster.test")
        directory = FakeDirectory(
            asMember(self.a, "a"), [asMember(self.a, "a"), asMember(self.b, "b")], {}
        )
        self.links = MemberLinks(self.router, directory, self.a, None)  # type: ignore[arg-type]
        self.router.cluster = self.links
        allocator = PortAllocator(PortRange(30000, 30001), self.reactor)
        self.mode = UDPMode(
            self.reactor,
            allocator,
            "127.0.0.1",
            maxFlowsPerSource=2,
            refusals=self.router.refusals,
        )
        self.router.udp = self.mode
        self.control = FakeControl()
        self.session = self.mode.newSession(self.control, b"s" * 32)
        self.control.udpSession = self.session
        self.router.leases.register("voice", "alice", self.control)
        opening = Deferred.fromCoroutine(
            self.mode.ports.open(self.router, "alice", "voice", "voice.cluster.test", self.control)
        )
        leases: list[PortLease] = []
        opening.addCallback(leases.append)
        [self.lease] = leases
        assert self.lease.port == 30000
        self.publicPort = self.reactor.portAt(30000)


class HolderUDPLinkTests(SynchronousTestCase):
    """
    Member A (L{Holder}) receiving UDP links from member B, which forwards the datagrams its own
    socket on port 30000 receives.
    """

    def setUp(self) -> None:
        """
        Build A; watch log events.
        """
        holder = Holder()
        self.a, self.b, self.reactor = holder.a, holder.b, holder.reactor
        self.router, self.links, self.mode = holder.router, holder.links, holder.mode
        self.control, self.session = holder.control, holder.session
        self.lease, self.publicPort = holder.lease, holder.publicPort
        self.events = EventLoggingObserver.createWithCleanup(
            self,  # type: ignore[arg-type]
            globalLogPublisher,
        )

    def link(
        self, *frames: bytes, port: int = 30000, hostname: str = "voice.cluster.test"
    ) -> tuple[MemberVisitor, StringTransportWithDisconnection]:
        """
        Open a UDP link from B for C{port}, sending C{frames} right after the header.

        @return: A's protocol for the link and its transport (the ACK already read from it).
        """
        visitor, transport, nonce = _openLink(self.router, self.links)
        header = MemberHeader(self.b.id, self.b.publicKey, hostname, "", 0, udpPort=port)
        key = pairKey(self.b.privateKey, self.a.publicKey)
        visitor.dataReceived(
            MAGIC + encodeMemberHeader(key, self.a.id, nonce, header) + b"".join(frames)
        )
        self.assertEqual(transport.value(), ACK)
        transport.clear()
        return visitor, transport

    def toTunnel(self) -> list[tuple[type, dict[str, Any]]]:
        """
        @return: What the relay told the tunnel (over the control session: the tunnel has no
            UDP path yet) since the last call.
        """
        return self.control.take()

    def test_framesBecomeFlows(self) -> None:
        """
        Each frame reaches the tunnel as a datagram of a flow whose visitor is the address the
        frame names (IPv4 and IPv6), as for a visitor of A's own port.
        """
        self.link(encodeFrame(*_ALICE, b"ping"), encodeFrame(*_BOB, b""))
        self.assertEqual(
            self.toTunnel(),
            [
                (FlowOpened, {"flowId": 1, "host": _ALICE[0], "port": _ALICE[1]}),
                (Datagram, {"flowId": 1, "payload": b"ping"}),
                (FlowOpened, {"flowId": 2, "host": _BOB[0], "port": _BOB[1]}),
                (Datagram, {"flowId": 2, "payload": b""}),
            ],
        )

    def test_repliesGoOverTheLink(self) -> None:
        """
        The tunnel's replies to a forwarded visitor go back over the link, framed with the
        visitor's address, and not out of A's socket; a visitor of A's own port is answered from
        the socket as before.
        """
        visitor, transport = self.link(encodeFrame(*_ALICE, b"ping"))
        self.publicPort.receive(b"direct", ("192.0.2.9", 7))
        self.mode.fromTunnel(self.session, 1, b"pong")
        self.mode.fromTunnel(self.session, 2, b"back")
        self.assertEqual(FrameReader().feed(transport.value()), [Frame(*_ALICE, b"pong")])
        self.assertEqual(self.publicPort.written, [(b"back", ("192.0.2.9", 7))])
        self.assertTrue(verifyObject(IReplyPath, visitor._udpLink))

    def test_perSourceLimitAppliesToForwardedVisitors(self) -> None:
        """
        Forwarded visitors count against A's flows per source address: a third port of one
        source gets no flow (a refusal is counted), another source still does.
        """
        self.link(
            *[encodeFrame(_ALICE[0], port, b"flood") for port in (1, 2, 3)],
            encodeFrame("198.51.100.5", 9, b"hello"),
        )
        opened = [kw for command, kw in self.toTunnel() if command is FlowOpened]
        self.assertEqual(
            [(kw["host"], kw["port"]) for kw in opened],
            [(_ALICE[0], 1), (_ALICE[0], 2), ("198.51.100.5", 9)],
        )
        self.assertEqual(self.router.refusals.counts["udp_flows_per_source"], 1)

    def test_badFrameClosesTheLink(self) -> None:
        """
        A frame that is not one closes the link with a refusal counted and logged; the flows
        of A's own visitors go on.
        """
        self.publicPort.receive(b"direct", ("192.0.2.9", 7))
        _, transport = self.link(encodeFrame(*_ALICE, b"ping"), b"\x00\x00\x00\x07\x05garbage")
        self.assertFalse(transport.connected)
        self.assertEqual(self.router.refusals.counts[BAD_FRAME], 1)
        self.assertTrue(
            any(e.get("refusal") == BAD_FRAME and "family" in e["reason"] for e in self.events)
        )
        self.mode.fromTunnel(self.session, 1, b"still here")
        self.assertEqual(self.publicPort.written, [(b"still here", ("192.0.2.9", 7))])
        self.publicPort.receive(b"more", ("192.0.2.9", 7))
        self.assertIn((Datagram, {"flowId": 1, "payload": b"more"}), self.toTunnel())

    def test_oversizeFrameClosesTheLink(self) -> None:
        """
        A length over the largest frame closes the link at once.
        """
        _, transport = self.link(b"\x7f\xff\xff\xff")
        self.assertFalse(transport.connected)
        self.assertEqual(self.router.refusals.counts[BAD_FRAME], 1)

    def test_unknownPortRefused(self) -> None:
        """
        A link for a port no UDP lease holds here, or for the lease's port under another
        hostname, is closed and nothing reaches the tunnel.
        """
        for port, hostname in [(30001, "voice.cluster.test"), (30000, "other.cluster.test")]:
            _, transport = self.link(encodeFrame(*_ALICE, b"x"), port=port, hostname=hostname)
            self.assertFalse(transport.connected)
        self.assertEqual(self.toTunnel(), [])
        self.assertEqual(self.router.refusals.counts["member_link"], 2)

    def test_noUDPModeRefused(self) -> None:
        """
        A member without UDP mode refuses a UDP link.
        """
        self.router.udp = None
        _, transport = self.link(encodeFrame(*_ALICE, b"x"))
        self.assertFalse(transport.connected)
        self.assertEqual(self.toTunnel(), [])

    def test_lapsedLeaseRefused(self) -> None:
        """
        A link for the port of a lease no longer live here is refused.
        """
        self.router.leases.detach(self.control)
        _, transport = self.link(encodeFrame(*_ALICE, b"x"))
        self.assertFalse(transport.connected)
        self.assertEqual(self.router.refusals.counts["lease_not_live"], 1)

    def test_congestedRepliesDropped(self) -> None:
        """
        While the link's socket asks for no more, replies are dropped and counted; once it
        drains they flow again.
        """
        visitor, transport = self.link(encodeFrame(*_ALICE, b"ping"))
        link = visitor._udpLink
        assert link is not None
        link.pauseProducing()
        self.mode.fromTunnel(self.session, 1, b"lost")
        self.assertEqual(transport.value(), b"")
        self.assertEqual(self.router.counters["udp_link_dropped_congested"], 1)
        link.resumeProducing()
        self.mode.fromTunnel(self.session, 1, b"found")
        self.assertEqual(FrameReader().feed(transport.value()), [Frame(*_ALICE, b"found")])

    def test_idleLinkClosed(self) -> None:
        """
        A link with no frame either way for the idle timeout is closed, not sooner.
        """
        visitor, transport = self.link(encodeFrame(*_ALICE, b"ping"))
        self.reactor.advance(LINK_IDLE_TIMEOUT - 1)
        self.mode.fromTunnel(self.session, 1, b"pong")
        self.reactor.advance(LINK_IDLE_TIMEOUT - 1)
        self.assertTrue(transport.connected)
        self.reactor.advance(1)
        self.assertFalse(transport.connected)
        link = visitor._udpLink
        assert isinstance(link, HolderUDPLink)
        self.assertTrue(link.closed)

    def test_leasePortClosedEndsTheLink(self) -> None:
        """
        The link is one of the lease port's visitors, not one a graceful shutdown waits for: it
        closes with the port (the lease ended or moved).
        """
        visitor, transport = self.link(encodeFrame(*_ALICE, b"ping"))
        self.assertNotIn(visitor, self.router.visitors)
        self.assertIn(visitor, self.lease.visitors)
        self.mode.ports.close("alice", "voice")
        self.assertFalse(transport.connected)

    def test_stoppedPortEndsTheLink(self) -> None:
        """
        A frame for a port that stopped taking datagrams closes the link.
        """
        visitor, transport = self.link(encodeFrame(*_ALICE, b"ping"))
        link = visitor._udpLink
        assert link is not None
        self.lease.visitors.clear()
        self.session.public.stop()  # type: ignore[union-attr]
        visitor.dataReceived(encodeFrame(*_ALICE, b"again"))
        self.assertFalse(transport.connected)
        self.assertEqual(
            [kw for command, kw in self.toTunnel() if command is Datagram],
            [{"flowId": 1, "payload": b"ping"}],
        )
