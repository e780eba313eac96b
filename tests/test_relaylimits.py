"""
Tests for the relay's connection caps and timeouts: every listener under
L{portal.forwarding.connlimit}, the header and idle timeouts of its own pages, refusals in
C{/metrics}, and the options that set them.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from portal.forwarding.connlimit import LimitedFactory
from portal.relay.admission import Rate
from portal.relay.data import RelayDataSession
from portal.relay.public import PublicFactory
from portal.relay.router import DataPool, RelayLimits, Router
from portal.relay.service import RelayConfig, RelayService
from portal.relay.site import httpSite
from portal.tap.relay import Options
from portal.trust.identity import Identity
from portal.wire.attach import MAGIC, attachProof
from portal.wire.clienthello import INTERNAL_ERROR, alertRecord
from tests.test_relay_public import _KEY, _TUNNEL_ADDRESS, LeaseHolder, RelayHarness, clientHello
from tests.test_relay_public import connect as connectTransport


def address(host: str, port: int = 40000) -> IPv4Address:
    """
    @return: A TCP address of C{host}.
    """
    return IPv4Address("TCP", host, port)


def connect(factory: Any, host: str) -> StringTransport:
    """
    Connect a new protocol of C{factory} from C{host} to an in-memory transport.

    @return: The transport.
    """
    peer = address(host)
    protocol = factory.buildProtocol(peer)
    transport = StringTransport(peerAddress=peer)
    protocol.makeConnection(transport)
    transport.protocol = protocol
    return transport


class ListenerCapsTests(SynchronousTestCase):
    """
    Every listener of a started relay is under its connection caps.
    """

    def setUp(self) -> None:
        """
        Start a relay on a memory reactor with small caps and every listener on.
        """
        self.reactor = MemoryReactorClock()
        limits = RelayLimits(
            maxConnections=6, maxConnectionsPerSource=2, maxControlConnectionsPerSource=3
        )
        config = RelayConfig(stateDir=os.path.abspath(self.mktemp()), http="tcp:0", limits=limits)
        self.service = RelayService(config, self.reactor)
        self.service.startService()
        self.successResultOf(self.service.whenListening())
        router = self.service.router
        assert router is not None
        self.router = router
        # public, control, http, in the order they listen.
        self.factories = [server[1] for server in self.reactor.tcpServers]

    def test_everyListenerLimited(self) -> None:
        """
        The public, control and HTTP listeners listen with L{LimitedFactory}s on their own
        limiters; the public one wraps the L{PublicFactory}.
        """
        public, control, http = self.factories
        for factory, name in ((public, "public"), (control, "control"), (http, "http")):
            self.assertIsInstance(factory, LimitedFactory)
            self.assertIs(factory.limiter, self.router.limiters[name])
        self.assertIsInstance(public.wrapped, PublicFactory)
        self.assertEqual(self.router.limiters["control"].maxPerSource, 3)

    def test_publicOverCapGetsAlert(self) -> None:
        """
        A third connection from one source to the public port gets a TLS internal_error alert and
        is closed at once; a visitor from another source is admitted.
        """
        public = self.factories[0]
        first = connect(public, "127.0.0.2")
        connect(public, "127.0.0.2")
        third = connect(public, "127.0.0.2")
        self.assertEqual(third.value(), alertRecord(INTERNAL_ERROR))
        self.assertTrue(third.disconnecting)
        self.assertFalse(first.disconnecting)
        other = connect(public, "127.0.0.3")
        self.assertFalse(other.disconnecting)
        self.assertEqual(self.router.refusals.counts, {"connections_per_source": 1})

    def test_totalAcrossListeners(self) -> None:
        """
        The total cap counts the connections of every listener.
        """
        public, control, http = self.factories
        for host in ("10.0.0.1", "10.0.0.2"):
            connect(public, host)
            connect(control, host)
            connect(http, host)
        # No reply on the control port: no protocol, Twisted closes the socket at once.
        self.assertIsNone(control.buildProtocol(address("10.0.0.3")))
        self.assertEqual(self.router.refusals.counts, {"connections_total": 1})

    def test_metrics(self) -> None:
        """
        C{/metrics} shows open connections per listener and refusals by reason.
        """
        public, _, http = self.factories
        for _ in range(3):
            connect(public, "127.0.0.2")
        transport = connect(http, "127.0.0.4")
        transport.protocol.dataReceived(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        body = transport.value().decode()
        self.assertIn('portal_refusals_total{reason="connections_per_source"} 1', body)
        self.assertIn('portal_relay_listener_connections_open{listener="public"} 2', body)
        self.assertIn("portal_relay_connections_open 3", body)


class VouchTests(RelayHarness):
    """
    Connections on the control port that prove who they are stop counting against their source.
    """

    def test_attachedDataSession(self) -> None:
        """
        A data session counts against its address until its attach checks, then only in the
        total, until it closes.
        """
        limiter = self.router.limiters["control"]
        wrapper = self.router.limited("control", self.controlFactory).buildProtocol(_TUNNEL_ADDRESS)
        assert wrapper is not None
        transport = connectTransport(wrapper, _TUNNEL_ADDRESS)
        self.assertEqual(limiter.bySource, {"198.51.100.7": 1})
        wrapper.dataReceived(MAGIC)
        session = wrapper.inner  # The dispatcher left the chain once it chose.
        assert isinstance(session, RelayDataSession)
        wrapper.dataReceived(attachProof(_KEY, session.nonce, self.sessionId))
        self.assertEqual(limiter.bySource, {})
        self.assertEqual((limiter.vouched, limiter.open, self.router.connections.count), (1, 1, 1))
        transport.loseConnection()
        self.assertEqual((limiter.vouched, self.router.connections.count), (0, 0))

    def test_failedAttach(self) -> None:
        """
        A data session whose attach fails keeps counting against its address until it closes.
        """
        limiter = self.router.limiters["control"]
        wrapper = self.router.limited("control", self.controlFactory).buildProtocol(_TUNNEL_ADDRESS)
        assert wrapper is not None
        connectTransport(wrapper, _TUNNEL_ADDRESS)
        wrapper.dataReceived(MAGIC)
        session = wrapper.inner  # The dispatcher left the chain once it chose.
        assert isinstance(session, RelayDataSession)
        wrapper.dataReceived(attachProof(b"x" * 32, session.nonce, self.sessionId))
        self.assertEqual((limiter.vouched, self.router.connections.count), (0, 0))
        self.assertEqual(self.router.refusals.counts, {"data_session": 1})


class StreamIdleTests(RelayHarness):
    """
    Streams paired by a data pool with a clock are closed when idle, and counted.
    """

    def test_idleStreamClosedAndCounted(self) -> None:
        """
        A paired stream silent for two readings of L{RelayLimits.streamIdleTimeout} is closed on
        both sides and counted as C{stream_idle_timeout}; bytes keep it open before that.
        """
        limits = RelayLimits(streamIdleTimeout=30.0)
        self.pool = DataPool(
            self.owner, _KEY, limits, clock=self.clock, refusals=self.router.refusals
        )
        self.router.sessions[self.sessionId] = self.pool
        self.router.leases.register("app", "owner-id", LeaseHolder(self.pool))
        visitor, visitorTransport = self.visitor()
        visitor.dataReceived(clientHello("app.localhost"))
        session, _, sessionTransport = self.attached()
        self.assertIs(visitor.peer, session)
        for _ in range(5):
            visitor.dataReceived(b"x")
            self.clock.advance(30)
        # The last byte came at 120 s; the readings at 150 s and 180 s see none after it.
        self.clock.advance(29)
        self.assertFalse(visitorTransport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(visitorTransport.disconnecting and sessionTransport.disconnecting)
        self.assertEqual(self.router.refusals.counts, {"stream_idle_timeout": 1})


class SiteTimeoutTests(SynchronousTestCase):
    """
    The relay's own pages give each request's headers a deadline and close silent connections.
    """

    def setUp(self) -> None:
        """
        The HTTP listener's site on a clock, with a 5 s header and a 20 s idle timeout.
        """
        self.clock = Clock()
        limits = RelayLimits(siteHeaderTimeout=5.0, siteIdleTimeout=20.0)
        self.router = Router(Identity.generate(), self.clock, limits=limits)
        self.site = httpSite(self.router)

    def test_slowHeadersAborted(self) -> None:
        """
        A client dripping a header byte every second (resetting the idle timeout) is aborted at
        the header deadline, and the refusal is counted.
        """
        transport = connect(self.site, "127.0.0.2")
        for byte in b"GET /healthz HTTP/1.1\r\n"[:4]:
            transport.protocol.dataReceived(bytes([byte]))
            self.clock.advance(1)
            self.assertFalse(transport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.router.refusals.counts, {"http_header_timeout": 1})

    def test_deadlineAfterEachResponse(self) -> None:
        """
        Headers in time are answered; the next request's headers get a new deadline.
        """
        transport = connect(self.site, "127.0.0.2")
        self.clock.advance(4)
        transport.protocol.dataReceived(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIn(b"ok", transport.value())
        self.clock.advance(4.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(transport.disconnecting)

    def test_pipelined(self) -> None:
        """
        Two pipelined requests are both answered, and the deadline then runs for a third.
        """
        transport = connect(self.site, "127.0.0.2")
        request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        transport.protocol.dataReceived(request + request)
        self.assertEqual(transport.value().count(b"ok\n"), 2)
        self.clock.advance(4.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(transport.disconnecting)

    def test_idleTimeout(self) -> None:
        """
        With headers in time and a longer header deadline, a connection silent for the idle
        timeout is closed and counted.
        """
        router = Router(
            Identity.generate(),
            self.clock,
            limits=RelayLimits(siteHeaderTimeout=100.0, siteIdleTimeout=20.0),
        )
        transport = connect(httpSite(router), "127.0.0.2")
        self.clock.advance(19.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(router.refusals.counts, {"http_idle_timeout": 1})


class LimitOptionsTests(SynchronousTestCase):
    """
    C{twistd portal-relay}'s limit options reach L{RelayLimits}.
    """

    def test_defaults(self) -> None:
        """
        Without options the limits are the defaults sized for a 20,000-descriptor process, and
        no bandwidth cap.
        """
        options = Options()
        options.parseOptions([])
        self.assertEqual(options.config().limits, RelayLimits())
        self.assertEqual(RelayLimits().maxConnections, 16384)
        self.assertEqual(RelayLimits().deferAccept, 5.0)
        self.assertEqual(RelayLimits().handshakeRate, Rate(200.0, 20.0))
        self.assertEqual(RelayLimits().handshakeQueue, 1024)
        self.assertEqual(RelayLimits().tcpVisitorRate, Rate(20.0, 20.0))
        options = Options()
        options.parseOptions(["--defer-accept", "0"])
        self.assertEqual(options.config().limits.deferAccept, 0.0)

    def test_handshakeOptions(self) -> None:
        """
        C{--handshake-rate} and C{--handshake-queue} set the control port's handshake pacing.
        """
        options = Options()
        options.parseOptions(
            [
                "--handshake-rate",
                "50/5",
                "--handshake-queue",
                "64",
                "--tcp-visitor-rate",
                "30/3",
                "--tcp-visitor-queue",
                "7",
            ]
        )
        limits = options.config().limits
        self.assertEqual((limits.handshakeRate, limits.handshakeQueue), (Rate(50.0, 5.0), 64))
        self.assertEqual((limits.tcpVisitorRate, limits.tcpVisitorQueue), (Rate(30.0, 3.0), 7))

    def test_options(self) -> None:
        """
        Every connection, timeout, flow and bandwidth option sets its field.
        """
        options = Options()
        options.parseOptions(
            [
                "--max-connections=100",
                "--max-connections-per-source=7",
                "--max-control-connections-per-source=9",
                "--site-header-timeout=3",
                "--site-idle-timeout=4",
                "--defer-accept=2.5",
                "--max-udp-flows-per-source=5",
                "--stream-idle-timeout=600",
                "--bandwidth-per-lease=1M",
                "--bandwidth-per-identity=512KB/s",
                "--bandwidth-per-source=1000",
            ]
        )
        limits = options.config().limits
        self.assertEqual(
            (
                limits.maxConnections,
                limits.maxConnectionsPerSource,
                limits.maxControlConnectionsPerSource,
                limits.siteHeaderTimeout,
                limits.siteIdleTimeout,
                limits.deferAccept,
                limits.maxUDPFlowsPerSource,
                limits.streamIdleTimeout,
                limits.bandwidthPerLease,
                limits.bandwidthPerIdentity,
                limits.bandwidthPerSource,
            ),
            (100, 7, 9, 3.0, 4.0, 2.5, 5, 600.0, 1024.0**2, 512.0 * 1024, 1000.0),
        )

    def test_badValues(self) -> None:
        """
        Caps must be positive; a bandwidth must be a finite number of 0 or more with a known suffix.
        """
        for flag, value in (
            ("--max-connections", "0"),
            ("--max-connections-per-source", "-1"),
            ("--site-header-timeout", "0"),
            ("--defer-accept", "-1"),
            ("--defer-accept", "inf"),
            ("--defer-accept", "soon"),
            ("--handshake-rate", "0/1"),
            ("--handshake-rate", "fast"),
            ("--handshake-queue", "0"),
            ("--tcp-visitor-rate", "-5/1"),
            ("--tcp-visitor-queue", "0"),
            ("--bandwidth-per-lease", "-1"),
            ("--bandwidth-per-lease", "fast"),
            ("--bandwidth-per-lease", "1T"),
            ("--bandwidth-per-lease", "inf"),
        ):
            self.assertRaises(usage.UsageError, Options().parseOptions, [flag, value])
