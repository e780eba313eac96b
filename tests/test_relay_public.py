"""
Tests for the relay's public listener and data sessions: L{portal.relay.public}, L{portal.relay.data},
L{portal.relay.router.DataPool} and L{portal.relay.control.ControlDispatch}, all in memory.
"""

from __future__ import annotations

import attrs
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IHalfCloseableDescriptor, IProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import CertificateOptions
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, StringTransportWithDisconnection
from twisted.logger import formatEvent, globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from benchmarks.attacker import clientHello
from portal.relay.admission import Rate
from portal.relay.control import ControlDispatch, ControlFactory, _TLSDispatch
from portal.relay.data import RelayDataSession
from portal.relay.public import PublicFactory, VisitorProtocol
from portal.relay.router import HANDSHAKES_WAITING_PER_SOURCE, DataPool, RelayLimits, Router
from portal.relay.site import httpSite, relaySite
from portal.trust.identity import Identity
from portal.trust.localca import LocalCA
from portal.wire.attach import (
    ACK,
    MAGIC,
    NONCE_LENGTH,
    StreamHeader,
    attachProof,
    decodeStreamHeader,
)
from portal.wire.clienthello import INTERNAL_ERROR, UNRECOGNIZED_NAME, alertRecord

_VISITOR_ADDRESS = IPv4Address("TCP", "203.0.113.5", 40000)
_TUNNEL_ADDRESS = IPv4Address("TCP", "198.51.100.7", 50000)
_KEY = b"d" * 32


class ClosingTransport(StringTransportWithDisconnection):
    """
    A string transport that, like a real one, is marked C{disconnecting} and tells its protocol when it
    is closed, and (like TCP and TLS transports) ignores L{unregisterProducer} without a producer.
    """

    def loseConnection(self) -> None:
        """
        Mark the transport closing, then deliver C{connectionLost}.
        """
        self.disconnecting = True
        super().loseConnection()

    def unregisterProducer(self) -> None:
        """
        Forget the producer, if there is one.
        """
        if self.producer is not None:
            super().unregisterProducer()


# Only the declaration matters: closeWriteSide asks the class whether it is a half-closeable descriptor.
@implementer(IHalfCloseableDescriptor)
class HalfCloseableTransport(ClosingTransport):  # type: ignore[misc]
    """
    A TCP-like L{ClosingTransport} that can also shut down only its writing direction.

    @ivar writeClosed: Whether L{loseWriteConnection} was called.
    """

    writeClosed = False

    def loseWriteConnection(self) -> None:
        """
        Record the half-close.
        """
        self.writeClosed = True


def connect(
    protocol: IProtocol, peer: IPv4Address, kind: type[ClosingTransport] = ClosingTransport
) -> ClosingTransport:
    """
    Connect C{protocol} to a new in-memory transport.

    @param protocol: The protocol.
    @param peer: The remote address the transport reports.
    @param kind: The transport class.
    @return: The transport.
    """
    transport = kind(peerAddress=peer)
    transport.protocol = protocol
    protocol.makeConnection(transport)
    return transport


class RecordingOwner:
    """
    A control session stand-in that records how many data sessions a pool asked for.

    @ivar requested: The C{count} of every L{requestData} call.
    """

    def __init__(self) -> None:
        self.requested: list[int] = []

    def requestData(self, count: int) -> None:
        """
        Record the request.

        @param count: How many visitors are waiting.
        """
        self.requested.append(count)


@attrs.define
class LeaseHolder:
    """
    What the lease table holds for a live lease: something with the tunnel's data pool.
    """

    pool: DataPool


class RecordingSite(Protocol):
    """
    The relay's own site, recording what it is given.

    @ivar received: Bytes received.
    @ivar lost: Whether the connection was lost.
    """

    def __init__(self) -> None:
        self.received = b""
        self.lost = False

    def dataReceived(self, data: bytes) -> None:
        """
        Record C{data}.
        """
        self.received += data

    def connectionLost(self, reason: Failure | None = None) -> None:
        """
        Record the loss.
        """
        self.lost = True


class RecordingSiteFactory(Factory):
    """
    Builds L{RecordingSite}s and keeps them.

    @ivar built: The protocols built, in order.
    """

    def __init__(self) -> None:
        self.built: list[RecordingSite] = []

    def buildProtocol(self, addr: object) -> RecordingSite:
        """
        @return: A new recording site.
        """
        site = RecordingSite()
        site.factory = self
        self.built.append(site)
        return site


class RelayHarness(SynchronousTestCase):
    """
    A router with a lease C{app} whose tunnel has a data pool, plus helpers to connect visitors and data
    sessions to it.
    """

    limits = RelayLimits(
        maxIdleData=2,
        maxWaiting=2,
        dataWaitTimeout=5.0,
        helloTimeout=3.0,
        maxHelloReads=8,
        attachTimeout=4.0,
    )

    def setUp(self) -> None:
        """
        Build the router, register the lease and its pool, and watch log events.
        """
        self.clock = Clock()
        self.router = Router(Identity.generate(), self.clock, limits=self.limits)
        self.owner = RecordingOwner()
        self.pool = DataPool(self.owner, _KEY, self.limits)
        self.sessionId = self.router.newSessionId()
        self.router.sessions[self.sessionId] = self.pool
        self.router.leases.register("app", "owner-id", LeaseHolder(self.pool))
        self.site = RecordingSiteFactory()
        self.factory = PublicFactory(self.router, self.site)
        self.events = EventLoggingObserver.createWithCleanup(
            self,  # type: ignore[arg-type]
            globalLogPublisher,
        )
        key, chain = LocalCA.loadOrCreate(self.mktemp(), "Portal relay").issue(["localhost"])
        self.tlsOptions = CertificateOptions(
            privateKey=key, certificate=chain[0], extraCertChain=chain[1:]
        )
        self.controlFactory = ControlFactory(self.router, self.tlsOptions)

    def visitor(
        self, kind: type[ClosingTransport] = ClosingTransport
    ) -> tuple[VisitorProtocol, ClosingTransport]:
        """
        @param kind: The transport class.
        @return: A new connected visitor protocol and its transport.
        """
        protocol = self.factory.buildProtocol(_VISITOR_ADDRESS)
        return protocol, connect(protocol, _VISITOR_ADDRESS, kind)

    def dataConnection(
        self, kind: type[ClosingTransport] = ClosingTransport
    ) -> tuple[ControlDispatch, ClosingTransport]:
        """
        Open a connection to the control port and send the data session L{MAGIC}.

        @param kind: The transport class.
        @return: The dispatcher (whose C{chosen} is the data session) and its transport.
        """
        dispatch, transport = self.controlConnection(kind)
        dispatch.dataReceived(MAGIC)
        return dispatch, transport

    def controlConnection(
        self, kind: type[ClosingTransport] = ClosingTransport
    ) -> tuple[ControlDispatch, ClosingTransport]:
        """
        Open a connection to the control port and send nothing yet.

        @param kind: The transport class.
        @return: The dispatcher and its transport.
        """
        dispatch = self.controlFactory.buildProtocol(_TUNNEL_ADDRESS)
        # ControlDispatch's peek timer would otherwise use the global reactor.
        dispatch.callLater = self.clock.callLater  # type: ignore[method-assign, assignment]
        return dispatch, connect(dispatch, _TUNNEL_ADDRESS, kind)

    def attached(
        self, kind: type[ClosingTransport] = ClosingTransport
    ) -> tuple[RelayDataSession, ControlDispatch, ClosingTransport]:
        """
        Open a data session and attach it to the pool with a valid proof.

        @param kind: The transport class.

        @return: The data session, its dispatcher and its transport, holding what was written after the
            nonce and ACK (a stream header when a visitor was waiting).
        """
        dispatch, transport = self.dataConnection(kind)
        session = dispatch.chosen
        assert isinstance(session, RelayDataSession)
        dispatch.dataReceived(attachProof(_KEY, session.nonce, self.sessionId))
        written = transport.value()
        self.assertEqual(written[: NONCE_LENGTH + 1], session.nonce + ACK)
        transport.clear()
        transport.write(written[NONCE_LENGTH + 1 :])
        return session, dispatch, transport

    def assertRefused(self, transport: ClosingTransport, alert: int) -> None:
        """
        Assert the transport got exactly one fatal alert and was closed.

        @param transport: A visitor's transport.
        @param alert: The expected alert description.
        """
        self.assertEqual(transport.value(), alertRecord(alert))
        self.assertTrue(transport.disconnecting)

    def assertLogged(self, *fragments: str) -> None:
        """
        Assert some log event, formatted, mentions every one of C{fragments}.

        @param fragments: Substrings to look for.
        """
        texts = [formatEvent(event) for event in self.events]
        for text in texts:
            if all(fragment in text for fragment in fragments):
                return
        self.fail(f"no log event mentions {fragments!r}; events: {texts!r}")

    def assertSpliced(
        self, visitor: ClosingTransport, session: ClosingTransport, nonce: bytes, hello: bytes
    ) -> StreamHeader:
        """
        Assert the data session got a valid stream header for the visitor followed by exactly the
        ClientHello, and the visitor reads again.

        @return: The decoded stream header.
        """
        decoded = decodeStreamHeader(_KEY, nonce, session.value())
        assert decoded is not None
        header, used = decoded
        self.assertEqual(session.value()[used:], hello)
        self.assertEqual(header.hostname, "app.localhost")
        self.assertEqual((header.peerHost, header.peerPort), ("203.0.113.5", 40000))
        self.assertEqual(visitor.producerState, "producing")
        self.assertFalse(visitor.disconnecting)
        return header


class UnroutableVisitorTests(RelayHarness):
    """
    Visitors that cannot be routed get a TLS alert, a close and a log event, never a silent close.
    """

    def test_unknownName(self) -> None:
        """
        A ClientHello for a name with no lease gets an C{unrecognized_name} alert, the connection is
        closed, and a log event names the hostname.
        """
        visitor, transport = self.visitor()
        visitor.dataReceived(clientHello("nope.localhost"))
        self.assertRefused(transport, UNRECOGNIZED_NAME)
        self.assertLogged("nope.localhost", "203.0.113.5")
        self.assertEqual(self.router.counters["unknown"], 1)

    def test_foreignDomain(self) -> None:
        """
        A name outside both the relay's and the tunnel domain is unrecognised too.
        """
        visitor, transport = self.visitor()
        visitor.dataReceived(clientHello("app.example.com"))
        self.assertRefused(transport, UNRECOGNIZED_NAME)
        self.assertLogged("app.example.com")

    def test_malformed(self) -> None:
        """
        Bytes that are not a ClientHello (plain HTTP) get an C{internal_error} alert, a close and a log
        event.
        """
        visitor, transport = self.visitor()
        visitor.dataReceived(b"GET / HTTP/1.1\r\n\r\n")
        self.assertRefused(transport, INTERNAL_ERROR)
        self.assertLogged("malformed ClientHello")
        self.assertEqual(self.site.built, [])

    def test_noServerName(self) -> None:
        """
        A ClientHello without SNI gets an C{unrecognized_name} alert and a log event.
        """
        visitor, transport = self.visitor()
        visitor.dataReceived(clientHello(None))
        self.assertRefused(transport, UNRECOGNIZED_NAME)
        self.assertLogged("no server name")

    def test_slowClient(self) -> None:
        """
        A client that has not completed its ClientHello within C{helloTimeout} gets an alert and is
        closed; before that it is left alone.
        """
        visitor, transport = self.visitor()
        hello = clientHello("app.localhost")
        visitor.dataReceived(hello[:20])
        self.clock.advance(self.limits.helloTimeout - 0.1)
        self.assertFalse(transport.disconnecting)
        self.assertEqual(transport.value(), b"")
        self.clock.advance(0.1)
        self.assertRefused(transport, INTERNAL_ERROR)
        self.assertLogged("no complete ClientHello")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_silentClient(self) -> None:
        """
        A client that sends nothing at all is timed out the same way.
        """
        _, transport = self.visitor()
        self.clock.advance(self.limits.helloTimeout)
        self.assertRefused(transport, INTERNAL_ERROR)

    def test_tooManyReads(self) -> None:
        """
        A client still short of a complete ClientHello after C{maxHelloReads} reads gets an alert, a
        close and a log event, bounding the parsing work a dripping client causes.
        """
        visitor, transport = self.visitor()
        hello = clientHello("app.localhost")
        for index in range(self.limits.maxHelloReads):
            visitor.dataReceived(hello[index : index + 1])
        self.assertEqual(transport.value(), b"")
        visitor.dataReceived(hello[self.limits.maxHelloReads :])
        self.assertRefused(transport, INTERNAL_ERROR)
        self.assertLogged("still incomplete")
        self.assertEqual(self.owner.requested, [])

    def test_leavesMidHello(self) -> None:
        """
        A client that disconnects before its ClientHello is complete leaves no timer behind and is sent
        nothing.
        """
        visitor, transport = self.visitor()
        visitor.dataReceived(clientHello("app.localhost")[:20])
        transport.loseConnection()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(transport.value(), b"")
        self.assertEqual(self.owner.requested, [])

    def test_badVisitorDoesNotAffectOthers(self) -> None:
        """
        A malformed visitor on the same router is refused while a good visitor connected alongside it
        is still spliced.
        """
        session, _, sessionTransport = self.attached()
        bad, badTransport = self.visitor()
        good, goodTransport = self.visitor()
        hello = clientHello("app.localhost")
        good.dataReceived(hello[:30])
        bad.dataReceived(b"\x16\x03\x01\x00\x05\x02garbage")
        good.dataReceived(hello[30:])
        self.assertRefused(badTransport, INTERNAL_ERROR)
        self.assertEqual(len(self.pool), 0)
        self.assertIs(good.peer, session)
        decoded = decodeStreamHeader(_KEY, session.nonce, sessionTransport.value())
        assert decoded is not None
        self.assertEqual(sessionTransport.value()[decoded[1] :], hello)
        self.assertFalse(goodTransport.disconnecting)


class SplicedVisitorTests(RelayHarness):
    """
    A visitor for a live lease is spliced to an idle data session of its tunnel.
    """

    def test_idleSession(self) -> None:
        """
        With an idle data session, the session receives an authenticated stream header naming the
        hostname and the visitor's address, then exactly the ClientHello; then bytes flow both ways.
        """
        session, dispatch, sessionTransport = self.attached()
        visitor, visitorTransport = self.visitor()
        hello = clientHello("app.localhost")
        visitor.dataReceived(hello)
        header = self.assertSpliced(visitorTransport, sessionTransport, session.nonce, hello)
        self.assertEqual(session.streamId, header.streamId)
        self.assertEqual(len(self.pool), 0)
        self.assertEqual(self.router.counters["routed"], 1)
        sessionTransport.clear()
        visitor.dataReceived(b"client application data")
        dispatch.dataReceived(b"server application data")
        self.assertEqual(sessionTransport.value(), b"client application data")
        self.assertEqual(visitorTransport.value(), b"server application data")
        self.assertIs(visitorTransport.producer, sessionTransport)
        self.assertIs(sessionTransport.producer, visitorTransport)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_dripped(self) -> None:
        """
        A ClientHello that arrives one byte at a time is still routed when C{maxHelloReads} allows that
        many reads, and the session gets it whole.
        """
        hello = clientHello("app.localhost")
        self.router.limits = attrs.evolve(self.limits, maxHelloReads=len(hello))
        session, _, sessionTransport = self.attached()
        visitor, visitorTransport = self.visitor()
        for index in range(len(hello)):
            self.assertEqual(sessionTransport.value(), b"")
            visitor.dataReceived(hello[index : index + 1])
        self.assertSpliced(visitorTransport, sessionTransport, session.nonce, hello)

    def test_drippedWithinReadLimit(self) -> None:
        """
        With the harness's small C{maxHelloReads}, a ClientHello whose first reads are a byte each and
        whose last read is the rest still routes.
        """
        hello = clientHello("app.localhost")
        session, _, sessionTransport = self.attached()
        visitor, visitorTransport = self.visitor()
        reads = self.limits.maxHelloReads
        for index in range(reads - 1):
            visitor.dataReceived(hello[index : index + 1])
        visitor.dataReceived(hello[reads - 1 :])
        self.assertSpliced(visitorTransport, sessionTransport, session.nonce, hello)

    def test_caseAndTrailingDot(self) -> None:
        """
        SNI is compared case-insensitively and without a trailing dot.
        """
        session, _, sessionTransport = self.attached()
        visitor, visitorTransport = self.visitor()
        hello = clientHello("APP.LocalHost.")
        visitor.dataReceived(hello)
        self.assertSpliced(visitorTransport, sessionTransport, session.nonce, hello)

    def test_bytesAfterHello(self) -> None:
        """
        Bytes sent in the same read as the ClientHello follow it on the data session.
        """
        session, _, sessionTransport = self.attached()
        visitor, visitorTransport = self.visitor()
        hello = clientHello("app.localhost")
        visitor.dataReceived(hello + b"early data")
        self.assertSpliced(visitorTransport, sessionTransport, session.nonce, hello + b"early data")

    def test_streamIdsDiffer(self) -> None:
        """
        Each spliced visitor gets its own stream number.
        """
        first, _, firstTransport = self.attached()
        second, _, secondTransport = self.attached()
        hello = clientHello("app.localhost")
        for _ in range(2):
            visitor, _ = self.visitor()
            visitor.dataReceived(hello)
        self.assertNotEqual(first.streamId, second.streamId)
        self.assertEqual({first.streamId, second.streamId}, {1, 2})

    def test_backpressure(self) -> None:
        """
        Visitor and data session transports are each other's streaming producers: a full buffer on one
        pauses reading from the other.
        """
        _, _, sessionTransport = self.attached()
        visitor, visitorTransport = self.visitor()
        visitor.dataReceived(clientHello("app.localhost"))
        self.assertIs(sessionTransport.producer, visitorTransport)
        self.assertIs(visitorTransport.producer, sessionTransport)
        self.assertTrue(sessionTransport.streaming)
        self.assertTrue(visitorTransport.streaming)
        # What each transport does when its write buffer fills, and when it drains:
        visitorTransport.pauseProducing()
        self.assertEqual(visitorTransport.producerState, "paused")
        self.assertEqual(sessionTransport.producerState, "producing")
        visitorTransport.resumeProducing()
        sessionTransport.pauseProducing()
        self.assertEqual(sessionTransport.producerState, "paused")
        self.assertEqual(visitorTransport.producerState, "producing")

    def test_halfClose(self) -> None:
        """
        A visitor that stops sending half-closes the data session (through the control port's
        dispatcher) and still gets the tunnel's reply; then the tunnel's half-close reaches the
        visitor.
        """
        _, dispatch, sessionTransport = self.attached(HalfCloseableTransport)
        visitor, visitorTransport = self.visitor(HalfCloseableTransport)
        assert isinstance(sessionTransport, HalfCloseableTransport)
        assert isinstance(visitorTransport, HalfCloseableTransport)
        visitor.dataReceived(clientHello("app.localhost"))
        visitor.readConnectionLost()
        self.assertTrue(sessionTransport.writeClosed)
        self.assertFalse(sessionTransport.disconnecting)
        self.assertFalse(visitorTransport.disconnecting)
        dispatch.dataReceived(b"response")
        self.assertEqual(visitorTransport.value(), b"response")
        dispatch.writeConnectionLost()
        dispatch.readConnectionLost()
        self.assertTrue(visitorTransport.writeClosed)
        self.assertTrue(sessionTransport.disconnecting)

    def test_visitorCloses(self) -> None:
        """
        When the visitor goes away, the data session is closed.
        """
        _, _, sessionTransport = self.attached()
        visitor, visitorTransport = self.visitor()
        visitor.dataReceived(clientHello("app.localhost"))
        visitorTransport.loseConnection()
        self.assertTrue(sessionTransport.disconnecting)
        self.assertFalse(sessionTransport.connected)

    def test_sessionCloses(self) -> None:
        """
        When the tunnel closes the data session, the visitor is closed.
        """
        _, _, sessionTransport = self.attached()
        visitor, visitorTransport = self.visitor()
        visitor.dataReceived(clientHello("app.localhost"))
        sessionTransport.loseConnection()
        self.assertTrue(visitorTransport.disconnecting)
        self.assertEqual(len(self.pool), 0)


class WaitingVisitorTests(RelayHarness):
    """
    A visitor for a live lease with no idle data session waits, paused, for one.
    """

    def test_waitsPaused(self) -> None:
        """
        Without an idle data session the visitor is paused and the tunnel is asked for as many
        sessions as visitors wait.
        """
        hello = clientHello("app.localhost")
        first, firstTransport = self.visitor()
        first.dataReceived(hello)
        self.assertEqual(firstTransport.producerState, "paused")
        self.assertEqual(self.owner.requested, [1])
        second, _ = self.visitor()
        second.dataReceived(hello)
        self.assertEqual(self.owner.requested, [1, 2])
        self.assertEqual(self.pool.waiting, 2)
        self.assertEqual(self.pool.counters["waited"], 2)
        self.assertEqual(firstTransport.value(), b"")
        self.assertFalse(firstTransport.disconnecting)

    def test_pairedWhenSessionAttaches(self) -> None:
        """
        A data session that attaches later is paired with the first waiting visitor, which resumes;
        it never enters the idle pool.
        """
        hello = clientHello("app.localhost")
        visitor, visitorTransport = self.visitor()
        visitor.dataReceived(hello)
        visitor.dataReceived(b"more")
        session, _, sessionTransport = self.attached()
        self.assertSpliced(visitorTransport, sessionTransport, session.nonce, hello + b"more")
        self.assertEqual(len(self.pool), 0)
        self.assertEqual(self.pool.waiting, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_firstComeFirstServed(self) -> None:
        """
        Waiting visitors are paired in the order they arrived.
        """
        hello = clientHello("app.localhost")
        first, firstTransport = self.visitor()
        first.dataReceived(hello)
        second, secondTransport = self.visitor()
        second.dataReceived(hello)
        session, _, _ = self.attached()
        self.assertIs(first.peer, session)
        self.assertIsNone(second.peer)
        self.assertEqual(secondTransport.producerState, "paused")
        self.assertEqual(firstTransport.producerState, "producing")

    def test_noSessionInTime(self) -> None:
        """
        A visitor that gets no data session within C{dataWaitTimeout} is closed with a log event and
        leaves the waiting line, so a later session goes idle.
        """
        visitor, transport = self.visitor()
        visitor.dataReceived(clientHello("app.localhost"))
        self.clock.advance(self.limits.dataWaitTimeout - 0.1)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(transport.disconnecting)
        self.assertLogged("no data session")
        self.assertEqual(self.pool.waiting, 0)
        self.assertEqual(self.router.counters["timeouts"], 1)
        self.attached()
        self.assertEqual(len(self.pool), 1)

    def test_helloTimerReplaced(self) -> None:
        """
        Once routed, the hello timer no longer applies: only C{dataWaitTimeout} counts.
        """
        self.assertLess(self.limits.helloTimeout, self.limits.dataWaitTimeout)
        visitor, transport = self.visitor()
        visitor.dataReceived(clientHello("app.localhost"))
        self.clock.advance(self.limits.helloTimeout)
        self.assertFalse(transport.disconnecting)
        self.assertEqual(transport.value(), b"")

    def test_tooManyWaiting(self) -> None:
        """
        Past C{maxWaiting} waiting visitors, a new one gets an alert and is closed, and the tunnel is
        not asked for more.
        """
        hello = clientHello("app.localhost")
        for _ in range(self.limits.maxWaiting):
            visitor, _ = self.visitor()
            visitor.dataReceived(hello)
        extra, extraTransport = self.visitor()
        extra.dataReceived(hello)
        self.assertRefused(extraTransport, INTERNAL_ERROR)
        self.assertLogged("too many visitors")
        self.assertEqual(self.owner.requested, [1, 2])
        self.assertEqual(self.router.counters["refused"], 1)
        self.assertEqual(self.pool.waiting, self.limits.maxWaiting)

    def test_visitorLeavesWhileWaiting(self) -> None:
        """
        A visitor that disconnects while waiting leaves the line, so the next session goes idle.
        """
        visitor, transport = self.visitor()
        visitor.dataReceived(clientHello("app.localhost"))
        transport.loseConnection()
        self.assertEqual(self.pool.waiting, 0)
        self.attached()
        self.assertEqual(len(self.pool), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_controlSessionEnds(self) -> None:
        """
        When the control session ends, waiting visitors and idle sessions are closed, and a session that
        attaches afterwards is refused.
        """
        _, _, idleTransport = self.attached()
        otherPool = DataPool(RecordingOwner(), _KEY, self.limits)
        self.router.leases.register("other", "owner-id", LeaseHolder(otherPool))
        waiter, waiterTransport = self.visitor()
        waiter.dataReceived(clientHello("other.localhost"))
        self.pool.close()
        otherPool.close()
        self.assertTrue(idleTransport.disconnecting)
        self.assertTrue(waiterTransport.disconnecting)
        dispatch, transport = self.dataConnection()
        session = dispatch.chosen
        assert isinstance(session, RelayDataSession)
        dispatch.dataReceived(attachProof(_KEY, session.nonce, self.sessionId))
        self.assertTrue(transport.disconnecting)


class RelayDataSessionTests(RelayHarness):
    """
    Data sessions authenticate with a nonce-bound proof before they enter the idle pool.
    """

    def test_nonceOnConnect(self) -> None:
        """
        A data session writes its fresh nonce as soon as it is chosen, and nonces differ per connection.
        """
        first, firstTransport = self.dataConnection()
        second, _ = self.dataConnection()
        assert isinstance(first.chosen, RelayDataSession)
        assert isinstance(second.chosen, RelayDataSession)
        self.assertEqual(firstTransport.value(), first.chosen.nonce)
        self.assertEqual(len(first.chosen.nonce), NONCE_LENGTH)
        self.assertNotEqual(first.chosen.nonce, second.chosen.nonce)

    def test_validProof(self) -> None:
        """
        A correct proof is acknowledged and the session enters the idle pool.
        """
        self.attached()
        self.assertEqual(len(self.pool), 1)

    def test_proofDripped(self) -> None:
        """
        A proof that arrives one byte at a time is accepted.
        """
        dispatch, transport = self.dataConnection()
        session = dispatch.chosen
        assert isinstance(session, RelayDataSession)
        for byte in attachProof(_KEY, session.nonce, self.sessionId):
            dispatch.dataReceived(bytes([byte]))
        self.assertEqual(transport.value(), session.nonce + ACK)
        self.assertEqual(len(self.pool), 1)

    def test_wrongMAC(self) -> None:
        """
        A proof with the wrong key is refused: the session is closed, logged, and not pooled.
        """
        dispatch, transport = self.dataConnection()
        session = dispatch.chosen
        assert isinstance(session, RelayDataSession)
        dispatch.dataReceived(attachProof(b"x" * 32, session.nonce, self.sessionId))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), session.nonce)
        self.assertLogged("failed authentication", "198.51.100.7")
        self.assertEqual(len(self.pool), 0)

    def test_unknownSession(self) -> None:
        """
        A proof for a session id the relay does not know is refused.
        """
        dispatch, transport = self.dataConnection()
        session = dispatch.chosen
        assert isinstance(session, RelayDataSession)
        dispatch.dataReceived(attachProof(_KEY, session.nonce, b"u" * 16))
        self.assertTrue(transport.disconnecting)
        self.assertLogged("failed authentication")
        self.assertEqual(len(self.pool), 0)

    def test_replayedProof(self) -> None:
        """
        A proof captured on one connection is refused on another, which has a different nonce.
        """
        dispatch, _ = self.dataConnection()
        session = dispatch.chosen
        assert isinstance(session, RelayDataSession)
        proof = attachProof(_KEY, session.nonce, self.sessionId)
        dispatch.dataReceived(proof)
        replay, replayTransport = self.dataConnection()
        replay.dataReceived(proof)
        self.assertTrue(replayTransport.disconnecting)
        self.assertLogged("failed authentication")
        self.assertEqual(len(self.pool), 1)

    def test_noProofInTime(self) -> None:
        """
        A data session that does not attach within C{attachTimeout} is closed and logged.
        """
        _, transport = self.dataConnection()
        self.clock.advance(self.limits.attachTimeout - 0.1)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(transport.disconnecting)
        self.assertLogged("no attach within")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_attachedSessionHasNoTimer(self) -> None:
        """
        An attached idle session is not timed out by the attach timer.
        """
        _, _, transport = self.attached()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(self.limits.attachTimeout * 10)
        self.assertFalse(transport.disconnecting)

    def test_dataWithProof(self) -> None:
        """
        Bytes after the proof in the same read (before any stream was assigned) close the session.
        """
        dispatch, transport = self.dataConnection()
        session = dispatch.chosen
        assert isinstance(session, RelayDataSession)
        dispatch.dataReceived(attachProof(_KEY, session.nonce, self.sessionId) + b"x")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(len(self.pool), 0)

    def test_dataOnIdleSession(self) -> None:
        """
        An idle session that sends data is closed, logged, and leaves the pool.
        """
        _, dispatch, transport = self.attached()
        dispatch.dataReceived(b"unexpected")
        self.assertTrue(transport.disconnecting)
        self.assertLogged("idle data session")
        self.assertEqual(len(self.pool), 0)

    def test_idleSessionCloses(self) -> None:
        """
        An idle session that the tunnel closes leaves the pool, so no visitor is paired with it.
        """
        _, _, transport = self.attached()
        transport.loseConnection()
        self.assertEqual(len(self.pool), 0)
        visitor, visitorTransport = self.visitor()
        visitor.dataReceived(clientHello("app.localhost"))
        self.assertEqual(visitorTransport.producerState, "paused")
        self.assertEqual(self.owner.requested, [1])

    def test_maxIdleData(self) -> None:
        """
        Sessions beyond C{maxIdleData} are acknowledged but closed instead of pooled.
        """
        for _ in range(self.limits.maxIdleData):
            self.attached()
        dispatch, transport = self.dataConnection()
        session = dispatch.chosen
        assert isinstance(session, RelayDataSession)
        dispatch.dataReceived(attachProof(_KEY, session.nonce, self.sessionId))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(len(self.pool), self.limits.maxIdleData)
        self.assertLogged("surplus data session")

    def test_halfCloseWhileIdle(self) -> None:
        """
        An idle session whose tunnel stops sending is closed and leaves the pool.
        """
        _, dispatch, transport = self.attached()
        dispatch.readConnectionLost()
        self.assertTrue(transport.disconnecting)
        self.assertEqual(len(self.pool), 0)


class _DescriptorTransport(ClosingTransport):
    """
    A transport with a descriptor, as Twisted's TCP transport has.
    """

    _shouldShutdown = True

    def fileno(self) -> int:
        return 42


class HandOffTests(RelayHarness):
    """
    L{VisitorProtocol.handOff} gives the visitor's socket to another worker of the relay.
    """

    def test_handedOff(self) -> None:
        """
        C{send} gets the descriptor and every byte read so far; the visitor's transport is then
        closed without shutting the connection down (the other worker holds it).
        """
        visitor, transport = self.visitor(_DescriptorTransport)
        hello = clientHello("elsewhere.localhost")
        visitor.dataReceived(hello[:20])
        sent: list[tuple[int, bytes]] = []
        self.assertTrue(visitor.handOff(lambda fd, prefix: sent.append((fd, prefix)) or True))
        self.assertEqual(sent, [(42, hello[:20])])
        self.assertTrue(transport.disconnecting)
        self.assertFalse(transport._shouldShutdown)
        self.assertEqual(transport.value(), b"")

    def test_notSent(self) -> None:
        """
        When C{send} cannot send, nothing changes: the visitor stays with this worker.
        """
        visitor, transport = self.visitor(_DescriptorTransport)
        visitor.dataReceived(b"\x16\x03\x01")
        self.assertFalse(visitor.handOff(lambda fd, prefix: False))
        self.assertFalse(transport.disconnecting)
        self.assertTrue(transport._shouldShutdown)


class ControlDispatchTests(RelayHarness):
    """
    The control port tells TLS control sessions from plain data sessions by their first bytes.
    """

    def test_tls(self) -> None:
        """
        A connection starting with a TLS handshake record goes to TLS, which answers the ClientHello;
        inside, a dispatcher tells control sessions from TLS data sessions (see
        L{tests.test_rawtcp}).
        """
        dispatch, transport = self.controlConnection()
        dispatch.dataReceived(clientHello("localhost"))
        self.assertIsInstance(dispatch.chosen, TLSMemoryBIOProtocol)
        assert isinstance(dispatch.chosen, TLSMemoryBIOProtocol)
        self.assertIsInstance(dispatch.chosen.wrappedProtocol, _TLSDispatch)
        self.assertEqual(transport.value()[:1], b"\x16")
        self.assertFalse(transport.disconnecting)
        transport.loseConnection()
        self.clock.advance(0)  # The handshake pacer's turn ends.
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_overHelloRateBeforeTLS(self) -> None:
        """
        A TLS connection from a source that has no L{Hello} left in its bucket is refused before the
        handshake (the costliest part of a control session): it gets a fatal alert, no TLS, and the
        refusal is counted as C{hello_rate_source} and logged. Another source still gets TLS, and
        a plain data session from the refused source is not refused; once its bucket refills, the
        source is served again.
        """
        rate = self.router.admission.limits.perSource.hello
        for _ in range(int(rate.burst)):
            self.router.admission.rate("hello", "198.51.100.7")
        dispatch, transport = self.controlConnection()
        dispatch.dataReceived(clientHello("localhost"))
        self.assertIsNone(dispatch.chosen)
        self.assertRefused(transport, INTERNAL_ERROR)
        self.assertEqual(self.router.refusals.counts, {"hello_rate_source": 1})
        self.assertLogged("refused 198.51.100.7", "refused before the TLS handshake")
        other = self.controlFactory.buildProtocol(IPv4Address("TCP", "198.51.100.8", 50000))
        otherTransport = connect(other, IPv4Address("TCP", "198.51.100.8", 50000))
        other.dataReceived(clientHello("localhost"))
        self.assertIsInstance(other.chosen, TLSMemoryBIOProtocol)
        otherTransport.loseConnection()
        data, _ = self.dataConnection()
        self.assertIsInstance(data.chosen, RelayDataSession)
        self.clock.advance(1 / rate.perSecond)
        again, againTransport = self.controlConnection()
        again.dataReceived(clientHello("localhost"))
        self.assertIsInstance(again.chosen, TLSMemoryBIOProtocol)
        againTransport.loseConnection()

    def test_magic(self) -> None:
        """
        A connection starting with L{MAGIC} becomes a data session.
        """
        dispatch, _ = self.dataConnection()
        self.assertIsInstance(dispatch.chosen, RelayDataSession)

    def test_magicSplit(self) -> None:
        """
        L{MAGIC} split across reads is recognised once complete, and not before.
        """
        dispatch, transport = self.controlConnection()
        for byte in MAGIC[:-1]:
            dispatch.dataReceived(bytes([byte]))
            self.assertIsNone(dispatch.chosen)
            self.assertEqual(transport.value(), b"")
        dispatch.dataReceived(MAGIC[-1:])
        assert isinstance(dispatch.chosen, RelayDataSession)
        self.assertEqual(transport.value(), dispatch.chosen.nonce)

    def test_garbage(self) -> None:
        """
        First bytes that are neither TLS nor L{MAGIC} are refused: the connection is closed and logged.
        """
        dispatch, transport = self.controlConnection()
        dispatch.dataReceived(b"GET / HTTP/1.0\r\n")
        self.assertIsNone(dispatch.chosen)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")
        self.assertLogged("refused connection", "198.51.100.7")

    def test_wrongMagicAfterPrefix(self) -> None:
        """
        A connection that starts like L{MAGIC} but then differs is refused.
        """
        dispatch, transport = self.controlConnection()
        dispatch.dataReceived(MAGIC[:3])
        dispatch.dataReceived(b"X")
        self.assertTrue(transport.disconnecting)
        self.assertIsNone(dispatch.chosen)

    def test_partialMagicTimesOut(self) -> None:
        """
        A connection that sends part of L{MAGIC} and stops is closed after C{attachTimeout}.
        """
        dispatch, transport = self.controlConnection()
        dispatch.dataReceived(MAGIC[:2])
        self.clock.advance(self.limits.attachTimeout)
        self.assertTrue(transport.disconnecting)
        self.assertLogged("no protocol recognised")


class RelaySiteTests(RelayHarness):
    """
    The relay's own hostname is served by the relay's site.
    """

    def test_relayDomain(self) -> None:
        """
        A ClientHello for the relay's own hostname connects the site protocol to the visitor's
        transport and gives it the buffered ClientHello, then later bytes.
        """
        visitor, transport = self.visitor()
        hello = clientHello("LocalHost.")
        visitor.dataReceived(hello[:10])
        visitor.dataReceived(hello[10:])
        [site] = self.site.built
        self.assertIs(site.transport, transport)
        self.assertEqual(site.received, hello)
        visitor.dataReceived(b"more")
        self.assertEqual(site.received, hello + b"more")
        self.clock.advance(0)  # The handshake pacer's turn ends.
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.owner.requested, [])

    def test_sitePaced(self) -> None:
        """
        The relay terminates its own site's TLS, so ClientHellos for its name take turns in the
        relay's TLS handshake pacer: a second one in the same turn of the reactor waits, reading
        nothing, counted as delayed, and reaches the site on a later turn with what it sent.
        """
        first, _ = self.visitor()
        first.dataReceived(clientHello("localhost"))
        second, transport = self.visitor()
        hello = clientHello("localhost")
        second.dataReceived(hello)
        self.assertEqual(len(self.site.built), 1)
        self.assertEqual(transport.producerState, "paused")
        self.assertEqual(self.router.counters["handshakes_delayed"], 1)
        self.clock.advance(0)
        self.clock.advance(0.001)
        self.assertEqual(len(self.site.built), 2)
        self.assertEqual(self.site.built[1].received, hello)
        self.assertEqual(transport.producerState, "producing")

    def test_siteWaitingClosed(self) -> None:
        """
        A visitor of the site that goes away while waiting leaves the pacer's queue.
        """
        self.visitor()[0].dataReceived(clientHello("localhost"))
        second, transport = self.visitor()
        second.dataReceived(clientHello("localhost"))
        self.assertEqual(self.router.handshakes.waiting, 1)
        transport.loseConnection()
        self.assertEqual(self.router.handshakes.waiting, 0)
        self.clock.advance(0)
        self.clock.advance(1)
        self.assertEqual(len(self.site.built), 1)

    def test_siteWaitedTooLong(self) -> None:
        """
        A visitor of the site still waiting when the attach timeout ends is refused as
        C{handshake_wait}.
        """
        bucket = self.router.handshakes._bucket
        bucket.rate = 0.001
        while bucket.take():
            pass
        waiting, transport = self.visitor()
        waiting.dataReceived(clientHello("localhost"))
        self.clock.advance(self.limits.attachTimeout)
        self.assertRefused(transport, INTERNAL_ERROR)
        self.assertEqual(self.router.refusals.counts, {"handshake_wait": 1})
        self.assertEqual(self.router.handshakes.waiting, 0)

    def test_siteQueueFull(self) -> None:
        """
        Beyond the pacer's queue, a ClientHello for the relay's own name is refused before the
        handshake (C{handshake_queue}).
        """
        self.patch(self.router.handshakes, "maxWaiting", 1)
        self.visitor()[0].dataReceived(clientHello("localhost"))
        self.visitor()[0].dataReceived(clientHello("localhost"))
        refused, transport = self.visitor()
        refused.dataReceived(clientHello("localhost"))
        self.assertRefused(transport, INTERNAL_ERROR)
        self.assertEqual(self.router.refusals.counts, {"handshake_queue": 1})

    def test_siteConnectionLost(self) -> None:
        """
        When the visitor goes away the site is told.
        """
        visitor, transport = self.visitor()
        visitor.dataReceived(clientHello("localhost"))
        [site] = self.site.built
        transport.loseConnection()
        self.assertTrue(site.lost)

    def test_siteHalfClose(self) -> None:
        """
        A half-close from a visitor of the site closes the connection (the site cannot half-close).
        """
        visitor, transport = self.visitor()
        visitor.dataReceived(clientHello("localhost"))
        visitor.readConnectionLost()
        self.assertTrue(transport.disconnecting)
        self.assertTrue(self.site.built[0].lost)

    def test_alpnHTTP11Only(self) -> None:
        """
        The relay's own sites let TLS negotiate HTTP/1.1 only: their channel speaks no HTTP/2, and a
        browser or curl offered C{h2} sent HTTP/2 to it.
        """
        for site in (relaySite(self.router), httpSite(self.router)):
            self.assertEqual(site.acceptableProtocols(), [b"http/1.1"])


class ControlHandshakePacingTests(RelayHarness):
    """
    The control port starts at most L{RelayLimits.handshakeRate} TLS handshakes a second; the rest
    wait, reading nothing, in a bounded queue served source by source.
    """

    limits = attrs.evolve(RelayHarness.limits, handshakeRate=Rate(10.0, 2.0), handshakeQueue=3)

    def tlsFrom(self, host: str, port: int = 50000) -> tuple[ControlDispatch, ClosingTransport]:
        """
        Open a control-port connection from C{host} and send a ClientHello.

        @return: The dispatcher and its transport.
        """
        address = IPv4Address("TCP", host, port)
        dispatch = self.controlFactory.buildProtocol(address)
        dispatch.callLater = self.clock.callLater  # type: ignore[method-assign, assignment]
        transport = connect(dispatch, address)
        # A turn of the reactor of its own (the pacer starts one handshake per turn; see
        # test_oneHandshakePerTurn).
        self.clock.advance(0)
        dispatch.dataReceived(clientHello("localhost"))
        return dispatch, transport

    def test_oneHandshakePerTurn(self) -> None:
        """
        Of two ClientHellos in one turn of the reactor, only the first shakes hands at once, even
        with tokens left; the second does on a later turn, without waiting 1/rate.
        """
        dispatches = []
        for port in (50000, 50001):
            address = IPv4Address("TCP", "198.51.100.7", port)
            dispatch = self.controlFactory.buildProtocol(address)
            dispatch.callLater = self.clock.callLater  # type: ignore[method-assign, assignment]
            connect(dispatch, address)
            dispatches.append(dispatch)
        for dispatch in dispatches:
            dispatch.dataReceived(clientHello("localhost"))
        self.assertIsInstance(dispatches[0].chosen, TLSMemoryBIOProtocol)
        self.assertIsNone(dispatches[1].chosen)
        self.clock.advance(0)
        self.clock.advance(0.0001)
        self.assertIsInstance(dispatches[1].chosen, TLSMemoryBIOProtocol)

    def test_burstThenWait(self) -> None:
        """
        The burst shakes hands at once; the next connection waits paused, with nothing written,
        counted and shown as waiting, and shakes hands when its turn comes 1/rate later.
        """
        for _ in range(2):
            dispatch, _ = self.tlsFrom("198.51.100.7")
            self.assertIsInstance(dispatch.chosen, TLSMemoryBIOProtocol)
        waiting, transport = self.tlsFrom("198.51.100.7")
        self.assertIsNone(waiting.chosen)
        self.assertEqual((transport.producerState, transport.value()), ("paused", b""))
        self.assertEqual(self.router.counters["handshakes_delayed"], 1)
        self.assertEqual(self.router.gauges()["handshakes_waiting"], 1)
        self.clock.advance(0.1)
        self.assertIsInstance(waiting.chosen, TLSMemoryBIOProtocol)
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual(transport.value()[:1], b"\x16")
        self.assertEqual(self.router.gauges()["handshakes_waiting"], 0)
        self.assertEqual(self.router.gauges()["handshakes_waiting_peak"], 1)

    def test_fairBetweenSources(self) -> None:
        """
        A source with several connections waiting does not make another source's one wait behind
        all of them.
        """
        for _ in range(2):
            self.tlsFrom("198.51.100.7")
        flood = [self.tlsFrom("198.51.100.7", 50001 + i)[0] for i in range(2)]
        user, _ = self.tlsFrom("198.51.100.8")
        self.clock.advance(0.1)
        self.assertIsInstance(flood[0].chosen, TLSMemoryBIOProtocol)
        self.assertIsNone(user.chosen)
        self.clock.advance(0.1)
        self.assertIsInstance(user.chosen, TLSMemoryBIOProtocol)
        self.assertIsNone(flood[1].chosen)

    def test_queueFull(self) -> None:
        """
        Beyond the queue, a TLS connection is refused before the handshake with a fatal alert,
        counted and logged as C{handshake_queue}.
        """
        for _ in range(2 + 3):
            self.tlsFrom("198.51.100.7")
        refused, transport = self.tlsFrom("198.51.100.9")
        self.assertIsNone(refused.chosen)
        self.assertRefused(transport, INTERNAL_ERROR)
        self.assertEqual(self.router.refusals.counts, {"handshake_queue": 1})
        self.assertLogged("refused 198.51.100.9", "TLS handshakes waiting")

    def test_oneSourceCannotFillTheQueue(self) -> None:
        """
        One source has at most L{HANDSHAKES_WAITING_PER_SOURCE} connections waiting; beyond, its
        next is refused (C{handshake_queue}) while another source still waits its turn.
        """
        self.patch(self.router.handshakes, "maxWaiting", 100)
        self.patch(self.router.handshakes, "maxWaitingPerKey", 2)
        for port in range(2 + 2):
            self.tlsFrom("198.51.100.7", 50000 + port)
        _, refused = self.tlsFrom("198.51.100.7", 50010)
        self.assertRefused(refused, INTERNAL_ERROR)
        waiting, transport = self.tlsFrom("198.51.100.8")
        self.assertFalse(transport.disconnecting)
        self.assertIsNotNone(waiting._waiting)
        self.assertEqual(HANDSHAKES_WAITING_PER_SOURCE, self.routerDefaultsPerSource())

    def routerDefaultsPerSource(self) -> int | None:
        """
        @return: What a relay with default limits allows one source to have waiting.
        """
        return Router(Identity.generate(), self.clock).handshakes.maxWaitingPerKey

    def test_closedWhileWaiting(self) -> None:
        """
        A connection that closes while waiting leaves the queue; the next one gets its turn.
        """
        for _ in range(2):
            self.tlsFrom("198.51.100.7")
        gone, goneTransport = self.tlsFrom("198.51.100.7")
        after, _ = self.tlsFrom("198.51.100.8")
        goneTransport.loseConnection()
        self.assertEqual(self.router.handshakes.waiting, 1)
        self.clock.advance(0.1)
        self.assertIsNone(gone.chosen)
        self.assertIsInstance(after.chosen, TLSMemoryBIOProtocol)

    def test_waitedTooLong(self) -> None:
        """
        A connection still waiting when the attach timeout ends is refused as C{handshake_wait}.
        """
        self.router.handshakes._bucket.rate = 0.01
        for _ in range(2):
            self.tlsFrom("198.51.100.7")[1].loseConnection()
        waiting, transport = self.tlsFrom("198.51.100.7")
        self.clock.advance(self.limits.attachTimeout)
        self.assertIsNone(waiting.chosen)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.router.refusals.counts, {"handshake_wait": 1})
        self.assertEqual(self.router.handshakes.waiting, 0)

    def test_dataSessionsNotPaced(self) -> None:
        """
        Plain data sessions (one per visitor) never wait behind TLS handshakes.
        """
        for _ in range(4):
            self.tlsFrom("198.51.100.7")
        data, _ = self.dataConnection()
        self.assertIsInstance(data.chosen, RelayDataSession)

    def test_bytesWhileWaitingBounded(self) -> None:
        """
        A waiting connection that keeps sending is closed past L{ControlDispatch.maxWaitingPeek}
        bytes, and leaves the queue.
        """
        for _ in range(2):
            self.tlsFrom("198.51.100.7")
        waiting, transport = self.tlsFrom("198.51.100.7")
        waiting.dataReceived(b"\x00" * ControlDispatch.maxWaitingPeek)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.router.handshakes.waiting, 0)
