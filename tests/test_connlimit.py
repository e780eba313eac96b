"""
Tests for L{portal.forwarding.connlimit} and L{portal.forwarding.refusals}.
"""

from __future__ import annotations

import resource

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from portal.forwarding.connlimit import (
    ConnectionLimiter,
    LimitedFactory,
    OpenConnections,
    fitToDescriptors,
    vouchFor,
)
from portal.forwarding.refusals import Refusals


@implementer(IHalfCloseableProtocol)
class Recorder(Protocol):
    """
    Records what it is told.
    """

    def __init__(self) -> None:
        self.events: list[object] = []

    def connectionMade(self) -> None:
        """
        Record the connection.
        """
        self.events.append("made")

    def dataReceived(self, data: bytes) -> None:
        """
        Record bytes.
        """
        self.events.append(data)

    def readConnectionLost(self) -> None:
        """
        Record a half-close.
        """
        self.events.append("readLost")

    def writeConnectionLost(self) -> None:
        """
        Record the end of writing.
        """
        self.events.append("writeLost")

    def connectionLost(self, reason: Failure | None = None) -> None:
        """
        Record the close.
        """
        self.events.append("lost")


class Nobody(Factory):
    """
    A factory that refuses every connection.
    """

    def buildProtocol(self, addr: object) -> None:  # type: ignore[override]
        """
        @return: L{None}.
        """
        return None


def v4(host: str, port: int = 1234) -> IPv4Address:
    """
    @return: A TCP IPv4 address.
    """
    return IPv4Address("TCP", host, port)


class LimitedFactoryTests(SynchronousTestCase):
    """
    L{LimitedFactory} admits connections under the caps and refuses the rest at once.
    """

    def setUp(self) -> None:
        """
        A listener capped at 2 per source, in a process capped at 3.
        """
        self.clock = Clock()
        self.refusals = Refusals(self.clock)
        self.total = OpenConnections(3)
        self.limiter = ConnectionLimiter("public", 2, self.total, self.refusals)
        self.factory = LimitedFactory(Factory.forProtocol(Recorder), self.limiter, reply=b"ALERT")

    def connect(self, address: object) -> tuple[Protocol, StringTransport]:
        """
        Build and connect a protocol for a connection from C{address}.
        """
        protocol = self.factory.buildProtocol(address)  # type: ignore[arg-type]
        assert protocol is not None
        transport = StringTransport(peerAddress=address)  # type: ignore[arg-type]
        protocol.makeConnection(transport)
        return protocol, transport

    def test_innerGetsRealTransport(self) -> None:
        """
        An admitted connection's protocol is connected to the transport itself and gets every
        event, half-closes included.
        """
        wrapper, transport = self.connect(v4("10.0.0.1"))
        inner = wrapper.inner  # type: ignore[attr-defined]
        self.assertIs(inner.transport, transport)
        wrapper.dataReceived(b"x")
        wrapper.readConnectionLost()  # type: ignore[attr-defined]
        wrapper.writeConnectionLost()  # type: ignore[attr-defined]
        wrapper.connectionLost(Failure(Exception()))
        self.assertEqual(inner.events, ["made", b"x", "readLost", "writeLost", "lost"])

    def test_perSourceCap(self) -> None:
        """
        A third connection from one source is refused with the reply and closed; another source
        is admitted; closing one connection frees a place.
        """
        first, _ = self.connect(v4("10.0.0.1"))
        self.connect(v4("10.0.0.1"))
        refused, transport = self.connect(v4("10.0.0.1"))
        self.assertEqual(transport.value(), b"ALERT")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.refusals.counts, {"connections_per_source": 1})
        _, other = self.connect(v4("10.0.0.2"))
        self.assertFalse(other.disconnecting)
        first.connectionLost(Failure(Exception()))
        _, again = self.connect(v4("10.0.0.1"))
        self.assertFalse(again.disconnecting)
        self.assertEqual(self.limiter.bySource, {"10.0.0.1": 2, "10.0.0.2": 1})

    def test_refusedWithoutReply(self) -> None:
        """
        Without a reply to send, a refused connection gets no protocol: Twisted closes its socket
        without building a transport. The refusal is counted all the same.
        """
        factory = LimitedFactory(Factory.forProtocol(Recorder), self.limiter)
        self.assertIsNotNone(factory.buildProtocol(v4("10.0.0.1")))
        self.assertIsNotNone(factory.buildProtocol(v4("10.0.0.1")))
        self.assertIsNone(factory.buildProtocol(v4("10.0.0.1")))
        self.assertEqual(self.refusals.counts, {"connections_per_source": 1})

    def test_vouch(self) -> None:
        """
        A connection vouched for (found through its transport, or a TLS transport over it) frees
        its place in the per-source count but still counts in the total until it closes.
        """
        wrapper, transport = self.connect(v4("10.0.0.1"))
        self.connect(v4("10.0.0.1"))
        transport.protocol = wrapper
        inner = wrapper.inner  # type: ignore[attr-defined]

        class TLS:
            """
            A transport wrapping the TCP one, as TLS does.
            """

            def __init__(self) -> None:
                self.transport = transport

        self.assertTrue(vouchFor(TLS()))
        self.assertTrue(vouchFor(inner.transport))
        self.assertEqual(self.limiter.bySource, {"10.0.0.1": 1})
        self.assertEqual((self.limiter.vouched, self.limiter.open, self.total.count), (1, 2, 2))
        _, third = self.connect(v4("10.0.0.1"))
        self.assertFalse(third.disconnecting)
        wrapper.connectionLost(Failure(Exception()))
        self.assertEqual((self.limiter.vouched, self.total.count), (0, 2))
        self.assertEqual(self.limiter.bySource, {"10.0.0.1": 2})
        self.assertFalse(vouchFor(StringTransport()))

    def test_ipv6Slash64(self) -> None:
        """
        IPv6 connections from one /64 share the per-source cap.
        """
        self.connect(IPv6Address("TCP", "2001:db8::1", 1))
        self.connect(IPv6Address("TCP", "2001:db8::2", 1))
        _, transport = self.connect(IPv6Address("TCP", "2001:db8::ffff", 1))
        self.assertTrue(transport.disconnecting)
        _, other = self.connect(IPv6Address("TCP", "2001:db8:0:1::1", 1))
        self.assertFalse(other.disconnecting)

    def test_totalCap(self) -> None:
        """
        The total cap is shared by every listener: a connection on another listener is refused
        once it is reached, and counted under its own reason.
        """
        other = LimitedFactory(
            Factory.forProtocol(Recorder),
            ConnectionLimiter("control", 10, self.total, self.refusals),
        )
        for host in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):
            self.connect(v4(host))
        # No reply on that listener: no protocol, the socket is closed at once.
        self.assertIsNone(other.buildProtocol(v4("10.0.0.4")))
        self.assertEqual(self.refusals.counts, {"connections_total": 1})
        self.assertEqual(self.total.count, 3)

    def test_wrappedRefusesToo(self) -> None:
        """
        When the wrapped factory builds no protocol, the place is given back.
        """
        wrapped = LimitedFactory(Nobody(), self.limiter)
        self.assertIsNone(wrapped.buildProtocol(v4("10.0.0.1")))
        self.assertEqual(self.total.count, 0)
        self.assertEqual(self.limiter.bySource, {})

    def test_badCaps(self) -> None:
        """
        Caps below 1 are refused.
        """
        self.assertRaises(ValueError, OpenConnections, 0)
        self.assertRaises(ValueError, ConnectionLimiter, "x", 0, self.total, self.refusals)


class RefusalsTests(SynchronousTestCase):
    """
    L{Refusals} counts every refusal and logs one per reason and interval.
    """

    def test_countsAndThrottles(self) -> None:
        """
        A flood of refusals is counted in full and logged once per interval, the next event saying
        how many were not logged.
        """
        clock = Clock()
        refusals = Refusals(clock, interval=10.0)
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        for _ in range(1000):
            refusals.refuse("connections_total", "refused {source}", source="10.0.0.1")
        refusals.refuse("udp_flows_per_source", "refused flow")
        clock.advance(10)
        refusals.refuse("connections_total", "refused {source}", source="10.0.0.1")
        self.assertEqual(refusals.counts, {"connections_total": 1001, "udp_flows_per_source": 1})
        mine = [e for e in events if e.get("log_namespace", "").endswith("Refusals")]
        self.assertEqual([e["unlogged"] for e in mine], [0, 0, 999])
        self.assertEqual(mine[0]["refusal"], "connections_total")
        self.assertEqual(
            refusals.metricLines(),
            [
                'portal_refusals_total{reason="connections_total"} 1001',
                'portal_refusals_total{reason="udp_flows_per_source"} 1',
            ],
        )


class FitToDescriptorsTests(SynchronousTestCase):
    """
    L{fitToDescriptors} keeps the total cap under the descriptor limit.
    """

    def test_fits(self) -> None:
        """
        A cap above the soft limit less the reserve is lowered to it; a lower cap is kept.
        """
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.assertEqual(fitToDescriptors(10), 10)
        if soft != resource.RLIM_INFINITY:
            limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            self.assertEqual(fitToDescriptors(10**9, reserved=100), limit - 100)
