"""
Tests for raw TCP mode: sealed streams on the relay's data sessions, TLS data sessions (through a chain
of hops) bound to their own TLS session, the relay's public TCP ports (L{portal.relay.rawtcp}) and raw
TCP registrations on the control protocol.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError, ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import CertificateOptions
from twisted.internet.testing import (
    EventLoggingObserver,
    MemoryReactorClock,
    StringTransportWithDisconnection,
)
from twisted.logger import formatEvent, globalLogPublisher
from twisted.protocols import amp
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test.iosim import IOPump, connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase

import portal.relay.control
import portal.relay.data
from portal.relay.admission import Rate
from portal.relay.control import ControlFactory, RelayControlProtocol
from portal.relay.data import RelayDataSession
from portal.relay.ports import PortAllocator, PortRange
from portal.relay.rawtcp import RawVisitor, tcpPorts
from portal.relay.router import DataPool, RelayLimits, Router
from portal.trust.challenge import signRegistration
from portal.trust.identity import Identity
from portal.trust.localca import LocalCA
from portal.tunnel.data import TunnelDataSession
from portal.wire.attach import MAGIC, NONCE_LENGTH, attachProof, decodeStreamHeader
from portal.wire.control import (
    EXPORTER_DATA_SESSION,
    EXPORTER_LENGTH,
    Hello,
    RegistrationRefused,
    exportKeyingMaterial,
)
from portal.wire.seal import Direction
from portal.wire.streamseal import StreamOpener, StreamSealer, streamKeys
from tests.test_control import LABEL, ControlTestCase
from tests.test_store import FailingStore
from tests.test_tunnel_data import FakePool, captureLogs

_KEY = b"k" * 32
_SECRET = b"t" * 32
_SESSION = b"s" * 16


class RecordingPort:
    """
    A listening port that records whether it was stopped.

    @ivar stopped: Whether L{stopListening} was called.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.stopped = False

    def stopListening(self) -> None:
        """
        Record the stop.
        """
        self.stopped = True

    def getHost(self) -> IPv4Address:
        """
        @return: Where the port pretends to listen.
        """
        return IPv4Address("TCP", "127.0.0.1", self.port)


class PortsReactor(MemoryReactorClock):
    """
    A memory reactor whose TCP listeners are L{RecordingPort}s, and that cannot listen on C{busy}
    ports, as when another program holds them.
    """

    def __init__(self) -> None:
        super().__init__()
        self.busy: set[int] = set()
        self.listening: dict[int, tuple[Any, RecordingPort]] = {}

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        """
        Record a listener, or fail for a busy port.
        """
        if port in self.busy:
            raise CannotListenError(interface, port, OSError("Address already in use"))
        listening = RecordingPort(port)
        self.listening[port] = (factory, listening)
        return listening


class OwnerStub:
    """
    A control session as a L{DataPool} and a L{portal.relay.leaseports.PortLease} see it.

    @ivar requested: Counts passed to L{requestData}.
    """

    mode = "tcp"

    def __init__(self, router: Router) -> None:
        self.requested: list[int] = []
        self.pool = DataPool(self, _KEY, router.limits)
        self.pool.sealSecret = _SECRET

    def requestData(self, count: int) -> None:
        """
        Record a request for data sessions.
        """
        self.requested.append(count)


def relayOptions() -> CertificateOptions:
    """
    @return: TLS options for the relay's control port, from a fresh local CA.
    """
    key, chain = LocalCA.loadOrCreate(os.path.abspath("ca"), "test").issue(["localhost"])
    return CertificateOptions(privateKey=key, certificate=chain[0], extraCertChain=chain[1:])


def connectOverTLS(router: Router, clock: Any, protocol: Protocol) -> IOPump:
    """
    Connect C{protocol}, inside in-memory TLS, to the relay's control port, and run until quiet.

    @return: The pump between the two ends.
    """
    server = ControlFactory(router, relayOptions())
    client = TLSMemoryBIOFactory(
        CertificateOptions(verify=False), True, Factory.forProtocol(lambda: protocol), clock=clock
    )
    _, _, pump = connectedServerAndClient(
        lambda: server.buildProtocol(None),
        lambda: client.buildProtocol(None),
        greet=False,
        clock=clock,
    )
    pump.flush()
    return pump


def tlsDataSession(
    router: Router, clock: Any, tunnelPool: Any, sessionId: bytes = _SESSION
) -> tuple[TunnelDataSession, IOPump]:
    """
    Connect a tunnel data session over in-memory TLS to the relay's control port.

    @return: The tunnel's data session and the pump between the two ends.
    """
    session = TunnelDataSession(tunnelPool, sessionId, _KEY)
    return session, connectOverTLS(router, clock, session)


def offerIdleSession(
    router: Router, owner: OwnerStub
) -> tuple[RelayDataSession, StringTransportWithDisconnection, bytes]:
    """
    Offer an attached plain data session of C{router} to C{owner}'s pool.

    @return: The session, its transport (cleared after the nonce) and its attach nonce.
    """
    session = RelayDataSession(router)
    sessionTransport = StringTransportWithDisconnection()
    sessionTransport.protocol = session
    session.makeConnection(sessionTransport)
    nonce = sessionTransport.value()[:NONCE_LENGTH]
    sessionTransport.clear()
    owner.pool.offer(session)
    return session, sessionTransport, nonce


class TLSDataSessionTests(SynchronousTestCase):
    """
    A data session inside TLS (through a chain of hops) attaches only with a proof bound to that TLS
    session.
    """

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.router = Router(Identity.generate(), self.clock)
        self.owner = OwnerStub(self.router)
        self.router.sessions[_SESSION] = self.owner.pool
        self.events = captureLogs(self)

    def reasons(self) -> list[str]:
        """
        @return: The C{reason} of every log event so far.
        """
        return [str(e.get("reason", "")) for e in self.events]

    def plainDataSession(
        self,
    ) -> tuple[Any, StringTransportWithDisconnection, RelayDataSession]:
        """
        Open a plain data session to the relay's control port, up to the relay's nonce.

        @return: The control port's dispatcher, its transport and the relay's data session.
        """
        dispatch = ControlFactory(self.router, relayOptions()).buildProtocol(None)
        transport = StringTransportWithDisconnection()
        transport.protocol = dispatch
        dispatch.makeConnection(transport)
        dispatch.dataReceived(MAGIC)
        relaySession = dispatch.chosen
        assert isinstance(relaySession, RelayDataSession)
        return dispatch, transport, relaySession

    def test_boundProofAttaches(self) -> None:
        """
        A tunnel data session that binds its proof to the TLS session attaches and waits in the pool
        as a TLS session.
        """
        tunnelPool = FakePool()
        tunnelPool.tls = True
        session, _ = tlsDataSession(self.router, self.clock, tunnelPool)
        self.assertTrue(session.attached.called)
        self.assertEqual(len(self.owner.pool), 1)
        (relaySession,) = self.owner.pool._idle
        self.assertTrue(relaySession.tls)

    def test_unboundProofRefused(self) -> None:
        """
        A proof without the TLS binding (as a man in the middle who terminates the data session's TLS
        and forwards the attach would send on his own TLS session) fails authentication.
        """
        tunnelPool = FakePool()
        session, pump = tlsDataSession(self.router, self.clock, tunnelPool)
        self.assertEqual(len(self.owner.pool), 0)
        self.failureResultOf(session.attached, ConnectionDone)
        self.assertIn("data session attach failed authentication", self.reasons())

    def test_proofForAnotherTLSSession(self) -> None:
        """
        A proof bound to one TLS session does not attach another.
        """
        tunnelPool = FakePool()
        tunnelPool.tls = True
        first, _ = tlsDataSession(self.router, self.clock, tunnelPool)
        binding = exportKeyingMaterial(first.transport, EXPORTER_DATA_SESSION)
        dispatch, transport, relaySession = self.plainDataSession()
        # Pretend this plain connection ran inside TLS: its binding differs from the first one's.
        relaySession.tls = True
        self.patch(
            portal.relay.data,
            "exportKeyingMaterial",
            lambda transport, label: b"other session".ljust(32, b"\0"),
        )
        dispatch.dataReceived(attachProof(_KEY, relaySession.nonce, _SESSION, binding))
        self.assertFalse(transport.connected)
        self.assertEqual(len(self.owner.pool), 1)

    def test_poolAcceptsBoth(self) -> None:
        """
        A pool accepts TLS data sessions (inside a chain every data session is TLS to the last relay)
        as well as plain ones, in raw TCP mode too: the stream is sealed either way.
        """
        tunnelPool = FakePool()
        tunnelPool.tls = True
        tlsDataSession(self.router, self.clock, tunnelPool)
        dispatch, transport, relaySession = self.plainDataSession()
        dispatch.dataReceived(attachProof(_KEY, relaySession.nonce, _SESSION))
        self.assertTrue(transport.connected)
        self.assertEqual(sorted(s.tls for s in self.owner.pool._idle), [False, True])

    def test_controlSessionInsideTLS(self) -> None:
        """
        An AMP box inside TLS still reaches the relay's control protocol.
        """
        client = amp.AMP()
        pump = connectOverTLS(self.router, self.clock, client)
        d = client.callRemote(
            Hello, minVersion=1, maxVersion=1, capabilities=["stream", "tcp"], software="test"
        )
        pump.flush()
        response = self.successResultOf(d)
        self.assertEqual(response["capabilities"], ["stream", "tcp"])
        self.assertEqual(response["relayKey"], self.router.identity.publicKey)

    def test_garbageInsideTLS(self) -> None:
        """
        Inside TLS, bytes that are neither an AMP box nor L{MAGIC} close the connection with a log.
        """
        client = Protocol()
        pump = connectOverTLS(self.router, self.clock, client)
        assert client.transport is not None
        client.transport.write(b"GET / HTTP/1.1\r\n")
        pump.flush()
        self.assertTrue(
            any("neither a control session nor a Portal data session" in r for r in self.reasons()),
            self.reasons(),
        )


class LeasePortsTests(SynchronousTestCase):
    """
    L{portal.relay.leaseports.LeasePorts} of raw TCP mode: a public port per live raw TCP lease, visitors routed to the lease's data pool.
    """

    def setUp(self) -> None:
        self.reactor = PortsReactor()
        self.router = Router(Identity.generate(), self.reactor)
        self.allocator = PortAllocator(PortRange(20000, 20002), self.reactor, reservation=100.0)
        self.ports = tcpPorts(self.reactor, self.allocator, "127.0.0.1")
        self.owner = OwnerStub(self.router)
        self.router.leases.register(LABEL, "id1", self.owner)
        self.events = captureLogs(self)

    def open(self, holder: Any = None, name: str = LABEL) -> int:
        """
        Open the port of C{name} for C{holder} (default the test's owner).
        """
        d = Deferred.fromCoroutine(
            self.ports.open(self.router, "id1", name, f"{name}.localhost", holder or self.owner)
        )
        return self.successResultOf(d).port

    def visit(self, port: int) -> tuple[RawVisitor, StringTransportWithDisconnection]:
        """
        Connect a visitor to a public port.
        """
        factory, _ = self.reactor.listening[port]
        visitor = factory.buildProtocol(IPv4Address("TCP", "198.51.100.7", 5555))
        transport = StringTransportWithDisconnection(
            peerAddress=IPv4Address("TCP", "198.51.100.7", 5555)
        )
        transport.protocol = visitor
        visitor.makeConnection(transport)
        return visitor, transport

    def test_firstFreePortOnInterface(self) -> None:
        """
        The lease gets the first port of the range, listened on the configured interface.
        """
        self.assertEqual(self.open(), 20000)
        self.assertEqual(list(self.reactor.listening), [20000])
        self.assertEqual(self.allocator.owner(20000), ("id1", LABEL))

    def test_visitorWaitsForDataSession(self) -> None:
        """
        A visitor with no idle data session is paused, waits, and the tunnel is asked for one.
        """
        port = self.open()
        visitor, transport = self.visit(port)
        self.assertEqual(transport.producerState, "paused")
        self.assertEqual(self.owner.requested, [1])
        self.assertEqual(self.owner.pool.waiting, 1)
        self.reactor.advance(self.router.limits.dataWaitTimeout)
        self.assertFalse(transport.connected)
        self.assertEqual(self.owner.pool.waiting, 0)

    def idleSession(self) -> tuple[RelayDataSession, StringTransportWithDisconnection, bytes]:
        """
        Offer an attached plain data session to the lease's pool.

        @return: See L{offerIdleSession}.
        """
        return offerIdleSession(self.router, self.owner)

    def test_visitorPairedWithHeader(self) -> None:
        """
        A visitor is spliced to an idle data session, which gets a stream header with the visitor's
        address and the lease hostname; the visitor's bytes follow sealed under the stream's
        relay-to-tunnel key, and the tunnel's sealed reply reaches the visitor opened.
        """
        session, sessionTransport, nonce = self.idleSession()
        port = self.open()
        visitor, transport = self.visit(port)
        visitor.dataReceived(b"PING\r\n")
        decoded = decodeStreamHeader(_KEY, nonce, sessionTransport.value())
        assert decoded is not None
        header, used = decoded
        self.assertEqual(
            (header.hostname, header.peerHost, header.peerPort),
            (f"{LABEL}.localhost", "198.51.100.7", 5555),
        )
        relayToTunnel, tunnelToRelay = streamKeys(_SECRET, nonce)
        opener = StreamOpener(relayToTunnel, Direction.RELAY_TO_TUNNEL)
        sealed = sessionTransport.value()[used:]
        self.assertNotIn(b"PING", sealed)
        self.assertEqual(opener.openFrame(sealed), (b"PING\r\n", len(sealed)))
        sealer = StreamSealer(tunnelToRelay, Direction.TUNNEL_TO_RELAY)
        session.dataReceived(sealer.seal(b"+PONG\r\n"))
        self.assertEqual(transport.value(), b"+PONG\r\n")
        self.assertEqual(self.router.counters["tcp_visitors"], 1)
        self.assertEqual(self.owner.pool.counters["sealed_spliced"], 1)

    def test_visitorHalfClosePassedOn(self) -> None:
        """
        A visitor's half-close reaches the tunnel as the stream's end frame, and the reply still
        reaches the visitor; once the tunnel ends its side too, the visitor is half-closed and the data
        session closed.
        """
        session, sessionTransport, nonce = self.idleSession()
        visitor, transport = self.visit(self.open())
        visitor.dataReceived(b"request")
        visitor.readConnectionLost()
        relayToTunnel, tunnelToRelay = streamKeys(_SECRET, nonce)
        buffer = bytearray(sessionTransport.value()[self.headerLength(sessionTransport, nonce) :])
        opener = StreamOpener(relayToTunnel, Direction.RELAY_TO_TUNNEL)
        payloads = []
        while (opened := opener.openFrame(buffer)) is not None:
            payloads.append(opened[0])
            del buffer[: opened[1]]
        self.assertEqual(payloads, [b"request", b""])
        self.assertTrue(opener.ended)
        self.assertTrue(sessionTransport.connected)
        sealer = StreamSealer(tunnelToRelay, Direction.TUNNEL_TO_RELAY)
        session.dataReceived(sealer.seal(b"reply") + sealer.end())
        self.assertEqual(transport.value(), b"reply")
        self.assertFalse(sessionTransport.connected)

    def headerLength(self, transport: StringTransportWithDisconnection, nonce: bytes) -> int:
        """
        @return: The length of the stream header at the start of what C{transport} holds.
        """
        decoded = decodeStreamHeader(_KEY, nonce, transport.value())
        assert decoded is not None
        return decoded[1]

    def test_notLiveRefused(self) -> None:
        """
        A visitor arriving after the lease lapsed (its session still connected) is closed, and the
        sweep closes the port and keeps it reserved for the lease.
        """
        port = self.open()
        self.router.leases.detach(self.owner)
        _, transport = self.visit(port)
        self.assertFalse(transport.connected)
        self.assertTrue(self.ports.sweep())
        self.assertTrue(self.reactor.listening[port][1].stopped)
        self.assertEqual(self.allocator.portFor("id1", LABEL), port)
        self.assertEqual(self.allocator.live, 0)

    def test_closeClosesVisitors(self) -> None:
        """
        Closing a lease's port stops listening and closes its open visitors (their pending bytes
        are flushed first: loseConnection, not abort).
        """
        port = self.open()
        _, first = self.visit(port)
        _, second = self.visit(port)
        self.successResultOf(self.ports.close("id1", LABEL))
        self.assertTrue(self.reactor.listening[port][1].stopped)
        self.assertFalse(first.connected or second.connected)
        self.assertNotIn(("id1", LABEL), self.ports.leases)

    def test_sticky(self) -> None:
        """
        After its port closed, the lease gets the same port again, while another lease gets the
        next one.
        """
        port = self.open()
        self.ports.close("id1", LABEL)
        other = OwnerStub(self.router)
        self.router.leases.register("other", "id1", other)
        self.assertEqual(self.open(other, "other"), 20001)
        self.assertEqual(self.open(), port)

    def test_sameHolderSamePort(self) -> None:
        """
        Opening again for the same session (a re-registration) keeps the listener.
        """
        port = self.open()
        self.assertEqual(self.open(), port)
        self.assertEqual(len(self.reactor.listening), 1)
        self.assertFalse(self.reactor.listening[port][1].stopped)

    def test_takeover(self) -> None:
        """
        Another session of the owner taking the lease over gets the same port; the old listener and
        its visitors are closed first.
        """
        port = self.open()
        _, old = self.visit(port)
        newHolder = OwnerStub(self.router)
        oldListener = self.reactor.listening[port][1]
        self.assertEqual(self.open(newHolder), port)
        self.assertTrue(oldListener.stopped)
        self.assertFalse(old.connected)
        self.assertIs(self.ports.leases[("id1", LABEL)].holder, newHolder)

    def test_closeOtherHolderIgnored(self) -> None:
        """
        A stale session closing a port it no longer holds changes nothing.
        """
        port = self.open()
        self.successResultOf(self.ports.close("id1", LABEL, holder=object()))
        self.assertFalse(self.reactor.listening[port][1].stopped)

    def test_busyPort(self) -> None:
        """
        A port another program holds fails with L{CannotListenError} and is not left live.
        """
        self.reactor.busy.add(20000)
        d = Deferred.fromCoroutine(self.ports.open(self.router, "id1", LABEL, "h", self.owner))
        self.failureResultOf(d, CannotListenError)
        self.assertEqual(self.allocator.live, 0)

    def test_closeAllKeepsAssignments(self) -> None:
        """
        At relay shutdown every port closes, and the assignments stay live for the saved state.
        """
        port = self.open()
        self.successResultOf(self.ports.closeAll())
        self.assertTrue(self.reactor.listening[port][1].stopped)
        self.assertEqual(self.allocator.live, 1)


class RawVisitorPacingTests(SynchronousTestCase):
    """
    A raw TCP lease port passes at most L{RelayLimits.tcpVisitorRate} new visitors a second from one
    source address to its tunnel; that source's next ones wait, paused, in a bounded queue.
    """

    def setUp(self) -> None:
        self.reactor = PortsReactor()
        limits = RelayLimits(tcpVisitorRate=Rate(10.0, 2.0), tcpVisitorQueue=3)
        self.router = Router(Identity.generate(), self.reactor, limits=limits)
        allocator = PortAllocator(PortRange(20000, 20002), self.reactor, reservation=100.0)
        self.ports = tcpPorts(self.reactor, allocator, "127.0.0.1")
        self.owner = OwnerStub(self.router)
        self.router.leases.register(LABEL, "id1", self.owner)
        self.events = captureLogs(self)
        d = Deferred.fromCoroutine(
            self.ports.open(self.router, "id1", LABEL, f"{LABEL}.localhost", self.owner)
        )
        self.port = self.successResultOf(d).port

    def visit(self, host: str = "198.51.100.7") -> tuple[RawVisitor, Any]:
        """
        Connect a visitor from C{host}.
        """
        factory, _ = self.reactor.listening[self.port]
        address = IPv4Address("TCP", host, 5555)
        visitor = factory.buildProtocol(address)
        transport = StringTransportWithDisconnection(peerAddress=address)
        transport.protocol = visitor
        visitor.makeConnection(transport)
        # The listener's connection caps wrap the visitor (portal.forwarding.connlimit).
        return getattr(visitor, "inner", visitor), transport

    def test_burstThenTurns(self) -> None:
        """
        The burst is routed at once (waiting for data sessions the tunnel is asked for); the next
        visitor waits, paused and not routed, counted, and is routed 1/rate later.
        """
        self.visit()
        self.visit()
        self.assertEqual(self.owner.pool.waiting, 2)
        asked = sum(self.owner.requested)
        waiting, transport = self.visit()
        self.assertIsNone(waiting.pool)
        self.assertEqual((self.owner.pool.waiting, sum(self.owner.requested)), (2, asked))
        self.assertEqual(transport.producerState, "paused")
        self.assertEqual(self.router.counters["tcp_visitors_delayed"], 1)
        self.reactor.advance(0.1)
        self.assertIsNotNone(waiting.pool)
        self.assertEqual(self.owner.pool.waiting, 3)
        self.assertGreater(sum(self.owner.requested), asked)

    def test_eachSourceItsOwnRate(self) -> None:
        """
        A source over its rate waits alone: another source's visitors still go at once, with their
        own burst.
        """
        self.visit()
        self.visit()
        first, _ = self.visit()
        second, _ = self.visit()
        others = [self.visit("203.0.113.9")[0] for _ in range(2)]
        self.assertEqual([o.pool is not None for o in others], [True, True])
        self.reactor.advance(0.1)
        self.assertIsNotNone(first.pool)
        self.assertIsNone(second.pool)

    def test_queueFull(self) -> None:
        """
        Beyond the queue a visitor is closed at once, counted and logged as C{tcp_visitor_queue}.
        """
        for _ in range(2 + 3):
            self.visit()
        _, transport = self.visit()
        self.assertFalse(transport.connected)
        self.assertEqual(self.router.refusals.counts, {"tcp_visitor_queue": 1})
        _, another = self.visit("203.0.113.9")
        self.assertTrue(another.connected)

    def test_closedWhileWaiting(self) -> None:
        """
        A visitor that leaves while waiting gives up its turn.
        """
        self.visit()
        self.visit()
        gone, goneTransport = self.visit()
        after, _ = self.visit()
        goneTransport.loseConnection()
        self.reactor.advance(0.1)
        self.assertIsNone(gone.pool)
        self.assertIsNotNone(after.pool)

    def test_waitedTooLong(self) -> None:
        """
        A visitor still waiting its turn after the data wait timeout is closed, counted as
        C{tcp_visitor_wait}, and leaves the queue.
        """
        self.visit()
        self.visit()
        lease = self.ports.leases[("id1", LABEL)]
        lease.pacer()._pacers["198.51.100.7"]._bucket.rate = 0.01
        waiting, transport = self.visit()
        self.reactor.advance(self.router.limits.dataWaitTimeout)
        self.assertFalse(transport.connected)
        self.assertIsNone(waiting.pool)
        self.assertEqual(self.router.refusals.counts["tcp_visitor_wait"], 1)
        self.assertEqual(lease.pacer().waiting, 0)

    def test_portClosed(self) -> None:
        """
        Closing the port closes the visitors waiting their turn, and the queue's timer.
        """
        self.visit()
        self.visit()
        _, transport = self.visit()
        self.successResultOf(self.ports.close("id1", LABEL))
        self.assertFalse(transport.connected)
        self.assertEqual(
            [c for c in self.reactor.getDelayedCalls() if c.active() and "serve" in repr(c)], []
        )


class RawTCPRegistrationTests(ControlTestCase):
    """
    Raw TCP registrations over the control protocol.
    """

    def setUp(self) -> None:
        super().setUp()
        self.reactor = PortsReactor()
        self.allocator = PortAllocator(PortRange(20000, 20001), self.clock, maxPerIdentity=1)
        self.router.tcp = tcpPorts(self.reactor, self.allocator, "127.0.0.1")

    def test_registersWithPort(self) -> None:
        """
        A tcp mode registration opens a public port; the tunnel learns the relay's host and port,
        and both ends seal the streams under the same secret, exported from the control session.
        """
        link = self.makeLink(mode="tcp")
        connection = self.connectTunnel(link)
        self.assertEqual(link.fatals, [])
        self.assertEqual(link.tcpAddresses, [("localhost", 20000)])
        self.assertEqual(list(self.reactor.listening), [20000])
        secret = connection.relay.pool.sealSecret
        self.assertEqual(link.pool.sealSecrets, [secret])
        assert secret is not None
        self.assertEqual(len(secret), EXPORTER_LENGTH)
        self.assertNotEqual(secret, connection.relay.pool.key)
        self.assertEqual(connection.relay.mode, "tcp")

    def test_noSNIRoute(self) -> None:
        """
        A raw TCP lease's hostname does not route TLS visitors to its raw data sessions.
        """
        self.connectTunnel(self.makeLink(mode="tcp"))
        self.assertIsNotNone(self.router.leases.route(LABEL))
        self.assertIsNone(self.router.poolFor(f"{LABEL}.localhost"))

    def test_oneNamePerSession(self) -> None:
        """
        A second raw lease on the same control session is refused: a session's public ports, flows
        and flow ids belong to one lease.
        """
        link = self.makeLink(mode="tcp")
        connection = self.connectTunnel(link)
        self.assertEqual(link.fatals, [])
        nonce = self.router.challenges.issue(["second"])
        error = self.assertRaises(
            RegistrationRefused,
            connection.relay.register,
            publicKey=self.tunnelIdentity.publicKey,
            names=["second"],
            nonce=nonce,
            signature=signRegistration(
                self.tunnelIdentity, self.relayIdentity.id, nonce, ["second"]
            ),
            mode="tcp",
        )
        self.assertIn("exactly one name per control session", str(error))
        self.assertIsNone(self.router.leases.route("second"))

    def test_disabled(self) -> None:
        """
        A relay without C{--tcp-ports} refuses tcp mode with a clear, fatal error.
        """
        self.router.tcp = None
        link = self.makeLink(mode="tcp")
        self.connectTunnel(link)
        self.assertEqual(len(link.fatals), 1)
        self.assertIn("tcp mode is disabled on this relay", link.fatals[0])
        self.assertIsNone(self.router.leases.route(LABEL))

    def test_relayWithoutSealing(self) -> None:
        """
        A relay that offers raw TCP mode but not sealed data sessions (an older version, whose raw
        TCP data sessions are TLS) is a fatal error naming the missing capability; nothing is
        registered.
        """
        self.patch(portal.relay.control, "CAPABILITIES", ("stream", "tcp", "udp"))
        link = self.makeLink(mode="tcp")
        self.connectTunnel(link)
        self.assertEqual(len(link.fatals), 1)
        self.assertIn("capability sealed-tcp", link.fatals[0])
        self.assertIsNone(self.router.leases.ownerOf(LABEL))

    def test_tunnelWithoutSealing(self) -> None:
        """
        A control session whose tunnel did not say it seals raw TCP data sessions (an older version)
        is refused raw TCP mode with a reason, before any challenge is spent or port opened.
        """
        relay = RelayControlProtocol(self.router)
        relay.pool = OwnerStub(self.router).pool
        relay.capabilities = frozenset({"stream", "tcp"})
        error = self.assertRaises(
            RegistrationRefused,
            relay.register,
            publicKey=self.tunnelIdentity.publicKey,
            names=[LABEL],
            nonce=b"n" * 16,
            signature=b"",
            mode="tcp",
        )
        self.assertIn("needs a tunnel that seals its data sessions", str(error))
        self.assertEqual(list(self.reactor.listening), [])

    def test_portLimit(self) -> None:
        """
        An identity over its port limit is refused, and the name it asked for is given back.
        """
        self.connectTunnel(self.makeLink(mode="tcp"))
        link = self.makeLink(mode="tcp", label="second")
        self.connectTunnel(link)
        self.assertEqual(len(link.fatals), 1)
        self.assertIn("no public port", link.fatals[0])
        self.assertIsNone(self.router.leases.route("second"))

    def test_storeFailureGivesLeaseBack(self) -> None:
        """
        When the lease store cannot record the port, the registration is refused as one to try
        again (not a fatal error), counted and logged as a C{lease_store} refusal, the store's
        error is logged for the operator, and the name is given back.
        """
        broken = FailingStore(message="lease store /state/leases.sqlite3: disk I/O error")
        self.allocator = PortAllocator(PortRange(20000, 20001), self.clock, store=broken)
        self.router.tcp = tcpPorts(self.reactor, self.allocator, "127.0.0.1")
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        link = self.makeLink(mode="tcp")
        self.connectTunnel(link)
        self.assertEqual(link.fatals, [])
        self.assertIsNone(self.router.leases.route(LABEL))
        self.assertEqual(self.reactor.listening, {})
        self.assertEqual(self.router.refusals.counts.get("lease_store"), 1)
        self.assertIn(
            "registration failed: lease store /state/leases.sqlite3: disk I/O error",
            [formatEvent(event) for event in events],
        )
        self.assertEqual([e["refusal"] for e in events if "refusal" in e], ["lease_store"])

    def test_connectionLostClosesPort(self) -> None:
        """
        When the control session goes, the port closes and stays reserved; a new session of the
        same identity gets it back.
        """
        connection = self.connectTunnel(self.makeLink(mode="tcp"))
        listener = self.reactor.listening[20000][1]
        connection.drop()
        self.assertTrue(listener.stopped)
        self.assertEqual(self.allocator.live, 0)
        self.assertEqual(self.allocator.portFor(self.tunnelIdentity.id, LABEL), 20000)
        self.clock.advance(self.limits.leaseTTL + 1)
        link = self.makeLink(mode="tcp")
        self.connectTunnel(link)
        self.assertEqual(link.tcpAddresses, [("localhost", 20000)])

    def test_unregisterClosesPort(self) -> None:
        """
        A clean stop closes the port at once.
        """
        connection = self.connectTunnel(self.makeLink(mode="tcp"))
        d = connection.tunnel.unregister()
        connection.flush()
        self.successResultOf(d)
        self.assertTrue(self.reactor.listening[20000][1].stopped)
