"""
Tests for the relay's side of multi-hop chains: the L{Hop} responder of
L{portal.relay.control.RelayControlProtocol} and L{portal.relay.hop.HopForwarder}, over TLS in memory.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProtocolFactory
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import globalLogPublisher
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from portal.relay.hop import HopForwarder, HopOutbound, parseDestination
from portal.relay.site import Metrics
from portal.trust.challenge import signHop
from portal.trust.identity import Identity
from portal.trust.relayhello import helloArguments
from portal.wire.control import (
    Challenge,
    Hello,
    Hop,
    HopLimit,
    HopRefused,
    HopUnreachable,
    TryAgain,
)
from tests.metricstext import metricValues
from tests.test_control import ControlTestCase

DESTINATION = ("relay-b.example", 4017)
#: The local address of the relay's outbound connection in these tests.
OUTBOUND_LOCAL = IPv4Address("TCP", "10.0.0.1", 50123)


class Received(Protocol):
    """
    Records the bytes of a hop's stream, at the tunnel's end after the switch.

    @ivar data: Everything received.
    @ivar lost: Whether the connection was lost.
    """

    def __init__(self) -> None:
        self.data = b""
        self.lost = False

    def dataReceived(self, data: bytes) -> None:
        """
        Record C{data}.
        """
        self.data += data

    def connectionLost(self, reason: Failure | None = None) -> None:
        """
        Record the loss.
        """
        self.lost = True


class ReceivedFactory(ClientFactory):
    """
    Builds one L{Received} for AMP's protocol switch.
    """

    protocol = Received


class PendingEndpoint:
    """
    An endpoint whose connections the test completes (or never completes).

    @ivar attempts: C{(host, port, factory, deferred)} of each attempt.
    @ivar cancelled: Destinations whose attempt was cancelled.
    """

    def __init__(self) -> None:
        self.attempts: list[tuple[str, int, IProtocolFactory, Deferred[Any]]] = []
        self.cancelled: list[tuple[str, int]] = []

    def endpointFor(self, host: str, port: int) -> Any:
        """
        @return: An endpoint recording its attempt to C{host}:C{port}.
        """
        pending = self

        class _Endpoint:
            def connect(self, factory: IProtocolFactory) -> Deferred[Any]:
                d: Deferred[Any] = Deferred(lambda _: pending.cancelled.append((host, port)))
                pending.attempts.append((host, port, factory, d))
                return d

        return _Endpoint()

    def succeed(self, index: int = -1) -> tuple[HopOutbound, StringTransport]:
        """
        Complete an attempt with a L{StringTransport}.

        @return: The outbound protocol and its transport.
        """
        _, _, factory, d = self.attempts[index]
        protocol = factory.buildProtocol(None)
        assert isinstance(protocol, HopOutbound)
        transport = StringTransport(
            hostAddress=OUTBOUND_LOCAL, peerAddress=IPv4Address("TCP", "10.0.0.2", 4017)
        )
        protocol.makeConnection(transport)
        d.callback(protocol)
        return protocol, transport


class ParseDestinationTests(SynchronousTestCase):
    """
    Tests for L{parseDestination}, the parser of C{--allow-hop}.
    """

    def test_forms(self) -> None:
        """
        C{HOST:PORT} and C{[IPV6]:PORT} parse; the host is lowercased.
        """
        self.assertEqual(parseDestination("Relay-B.example:4017"), ("relay-b.example", 4017))
        self.assertEqual(parseDestination("[::1]:4018"), ("::1", 4018))
        self.assertEqual(parseDestination("127.0.0.1:1"), ("127.0.0.1", 1))

    def test_malformed(self) -> None:
        """
        A missing or bad port, an empty host, or an unbracketed IPv6 address is refused.
        """
        for text in ["relay", "relay:", ":4017", "relay:0", "relay:65536", "::1:4017", "[::1]"]:
            self.assertRaises(ValueError, parseDestination, text)


class HopTestCase(ControlTestCase):
    """
    A relay that allows hops to L{DESTINATION}, with a bare AMP client connected over TLS.
    """

    maxPerIdentity = 256

    def setUp(self) -> None:
        """
        Give the relay a hop forwarder on fake outbound endpoints, and connect a client.
        """
        super().setUp()
        self.outbound = PendingEndpoint()
        self.router.hops = HopForwarder(
            self.clock,
            [DESTINATION],
            maxPerIdentity=self.maxPerIdentity,
            connectTimeout=10.0,
            endpointFor=self.outbound.endpointFor,
        )
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def client(self) -> tuple[Any, amp.AMP]:
        """
        Connect a bare AMP client and say Hello.

        @return: The connection and the client.
        """
        connection = self.connect(amp.AMP)
        client: amp.AMP = connection.tunnel
        self.call(connection, client, Hello, **helloArguments())
        return connection, client

    def call(self, connection: Any, client: amp.AMP, command: Any, *a: Any, **kw: Any) -> Any:
        """
        Send a command and run the exchange.

        @return: The answer, the L{Failure}, or L{None} while unanswered.
        """
        results: list[Any] = []
        client.callRemote(command, *a, **kw).addBoth(results.append)
        connection.flush()
        return results[0] if results else None

    def askHop(
        self,
        connection: Any,
        client: amp.AMP,
        destination: tuple[str, int] = DESTINATION,
        identity: Identity | None = None,
        nonce: bytes | None = None,
        signedFor: tuple[str, int] | None = None,
    ) -> tuple[Deferred[Any], ReceivedFactory, bytes]:
        """
        Get a hop challenge (unless C{nonce} is given) and send a signed L{Hop}.

        @param signedFor: The destination the signature is made for (default C{destination}).
        @return: The Hop answer's L{Deferred}, the switch factory, and the nonce.
        """
        identity = identity or self.tunnelIdentity
        if nonce is None:
            nonce = self.call(connection, client, Challenge, names=[], purpose="hop")["nonce"]
        assert nonce is not None
        host, port = signedFor or destination
        signature = signHop(identity, self.relayIdentity.id, nonce, host, port)
        factory = ReceivedFactory()
        # AMP logs and drops the connection on an error no errback takes when it arrives.
        d: Deferred[Any] = Deferred()
        client.callRemote(
            Hop,
            factory,
            host=destination[0],
            port=destination[1],
            publicKey=identity.publicKey,
            nonce=nonce,
            signature=signature,
        ).chainDeferred(d)
        connection.flush()
        return d, factory, nonce

    def result(self, d: Deferred[Any]) -> Any:
        """
        @return: What C{d} fired with, or L{None} if it has not fired; a failure is consumed.
        """
        results: list[Any] = []
        d.addBoth(lambda r: results.append(r) or (None if isinstance(r, Failure) else r))
        return results[0] if results else None

    def assertFailed(self, d: Deferred[Any], exception: type[Exception], text: str) -> None:
        """
        Check that C{d} failed with C{exception} and a message containing C{text}.
        """
        result = self.result(d)
        self.assertIsInstance(result, Failure)
        self.assertTrue(result.check(exception), result)
        self.assertIn(text, result.getErrorMessage())

    def logged(self, text: str) -> list[dict[str, Any]]:
        """
        @return: The log events whose format contains C{text}.
        """
        return [e for e in self.events if text in e.get("log_format", "")]


class HopAllowedTests(HopTestCase):
    """
    An allowed, correctly signed hop is connected, switched and spliced.
    """

    def test_spliced(self) -> None:
        """
        The relay connects to the destination and answers only then; after the switch, bytes flow
        both ways between the client's TLS session and the outbound connection, and the hop is
        logged with the outbound connection's local address and, at the end, the bytes each way.
        """
        connection, client = self.client()
        d, factory, _ = self.askHop(connection, client)
        self.assertEqual([(h, p) for h, p, _, _ in self.outbound.attempts], [DESTINATION])
        self.assertFalse(d.called)
        outbound, transport = self.outbound.succeed()
        connection.flush()
        self.assertNotIsInstance(self.result(d), Failure)
        received = client.innerProtocol
        self.assertIsInstance(received, Received)
        assert received is not None
        received.transport.write(b"tunnel TLS to B")  # type: ignore[union-attr]
        connection.flush()
        self.assertEqual(transport.value(), b"tunnel TLS to B")
        outbound.dataReceived(b"B answers")
        connection.flush()
        self.assertEqual(received.data, b"B answers")  # type: ignore[attr-defined]
        [opened] = self.logged("opened")
        self.assertEqual(opened["local"], "10.0.0.1:50123")
        self.assertEqual(opened["destination"], "relay-b.example:4017")
        self.assertEqual(opened["identity"], self.tunnelIdentity.id[:12])
        self.assertEqual(self.router.hops.openFor(self.tunnelIdentity.id), 1)
        # The destination closes: the client's TLS session closes, the slot is given back.
        transport.loseConnection()
        outbound.connectionLost(Failure(Exception("closed")))
        connection.flush()
        self.assertTrue(received.lost)  # type: ignore[attr-defined]
        self.assertEqual(self.router.hops.openFor(self.tunnelIdentity.id), 0)
        [closed] = self.logged("closed:")
        self.assertEqual((closed["up"], closed["down"]), (15, 9))
        for event in self.logged("hop"):
            self.assertNotIn(b"tunnel TLS", repr(event).encode())

    def test_dataPoolClosed(self) -> None:
        """
        A session that became a hop no longer takes data sessions: its pool is gone from the router.
        """
        connection, client = self.client()
        relay = connection.relay
        self.assertIn(relay.sessionId, self.router.sessions)
        d, _, _ = self.askHop(connection, client)
        self.outbound.succeed()
        connection.flush()
        self.assertNotIsInstance(self.result(d), Failure)
        self.assertNotIn(relay.sessionId, self.router.sessions)

    def test_metrics(self) -> None:
        """
        C{/metrics} shows the hops open and the hop counters.
        """
        connection, client = self.client()
        d, _, _ = self.askHop(connection, client)
        self.outbound.succeed()
        connection.flush()
        self.assertNotIsInstance(self.result(d), Failure)
        text = Metrics(self.router).render_GET(DummyRequest([b"metrics"])).decode()
        values = metricValues(text)
        self.assertEqual(values["portal_relay_hops_open"], 1)
        self.assertEqual(values["portal_relay_hops_opened_total"], 1)
        self.assertEqual(values["portal_relay_hops_refused_total"], 0)

    def test_silentHopKept(self) -> None:
        """
        A hop is no control session any more: it may stay silent past the relay's control idle
        timeout (an idle pooled data session does), and a relay shutting down sends it no
        L{GoingAway}, which would corrupt the spliced bytes.
        """
        connection, client = self.client()
        relay = connection.relay
        d, _, _ = self.askHop(connection, client)
        self.outbound.succeed()
        connection.flush()
        self.assertNotIsInstance(self.result(d), Failure)
        self.assertNotIn(relay, self.router.controls)
        self.clock.advance(self.router.limits.controlIdleTimeout * 2)
        connection.flush()
        self.assertFalse(connection.relayTransport.disconnecting)

    def test_destinationCaseInsensitive(self) -> None:
        """
        The allow list compares host names without regard to case.
        """
        connection, client = self.client()
        d, _, _ = self.askHop(connection, client, destination=("RELAY-B.example", 4017))
        self.assertEqual(len(self.outbound.attempts), 1)

    def test_backpressure(self) -> None:
        """
        Each side of the splice is the other's producer: a full outbound connection pauses reading
        from the client's connection, and a full client connection pauses the outbound one.
        """
        connection, client = self.client()
        d, _, _ = self.askHop(connection, client)
        outbound, transport = self.outbound.succeed()
        connection.flush()
        self.assertEqual(transport.producerState, "producing")
        self.assertTrue(transport.streaming)
        paused: list[str] = []
        self.patch(connection.relayTransport, "pauseProducing", lambda: paused.append("in"))
        # The outbound connection's buffer is full: it pauses its producer (the client's side).
        transport.producer.pauseProducing()
        self.assertEqual(paused, ["in"])
        # The client's connection is full: the relay stops reading from the destination.
        connection.relayTransport.producer.pauseProducing()
        self.assertEqual(transport.producerState, "paused")
        connection.relayTransport.producer.resumeProducing()
        self.assertEqual(transport.producerState, "producing")

    def test_outboundPausedUntilSwitch(self) -> None:
        """
        The outbound connection is not read from until it is spliced.
        """
        connection, client = self.client()
        self.askHop(connection, client)
        _, _, factory, d = self.outbound.attempts[0]
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.assertEqual(transport.producerState, "paused")


class HopRefusalTests(HopTestCase):
    """
    Hops that are not allowed, badly signed or replayed are refused with clear errors.
    """

    def test_notAllowed(self) -> None:
        """
        A destination not on the allow list is refused (HOP_REFUSED), and nothing is connected.
        """
        connection, client = self.client()
        d, _, _ = self.askHop(connection, client, destination=("relay-c.example", 4017))
        self.assertFailed(d, HopRefused, "destination relay-c.example:4017 is not allowed")
        self.assertEqual(self.outbound.attempts, [])
        self.assertEqual(self.logged("hop refused")[0]["destination"], "relay-c.example:4017")

    def test_otherPortNotAllowed(self) -> None:
        """
        The port is part of the allowed destination.
        """
        connection, client = self.client()
        d, _, _ = self.askHop(connection, client, destination=("relay-b.example", 4018))
        self.assertFailed(d, HopRefused, "not allowed")

    def test_noHops(self) -> None:
        """
        A relay without allowed destinations forwards no hops.
        """
        self.router.hops = HopForwarder(self.clock, [])
        connection, client = self.client()
        d, _, _ = self.askHop(connection, client)
        self.assertFailed(d, HopRefused, "this relay does not forward hops")

    def test_badSignature(self) -> None:
        """
        A hop signed for another destination is refused, and nothing is connected.
        """
        connection, client = self.client()
        d, _, _ = self.askHop(connection, client, signedFor=("relay-b.example", 4018))
        self.assertFailed(d, HopRefused, "signature is not valid")
        self.assertEqual(self.outbound.attempts, [])

    def test_replayedNonce(self) -> None:
        """
        A hop challenge is used up by its first use: using it again is a retryable refusal.
        """
        connection, client = self.client()
        d, _, nonce = self.askHop(connection, client)
        self.outbound.succeed()
        connection.flush()
        connection2, client2 = self.client()
        d2, _, _ = self.askHop(connection2, client2, nonce=nonce)
        self.assertFailed(d2, TryAgain, "unknown to this relay or was already used")
        self.assertEqual(len(self.outbound.attempts), 1)

    def test_registrationChallengeRefused(self) -> None:
        """
        A registration challenge cannot be spent on a hop.
        """
        connection, client = self.client()
        nonce = self.call(connection, client, Challenge, names=["app"])["nonce"]
        d, _, _ = self.askHop(connection, client, nonce=nonce)
        self.assertFailed(d, HopRefused, "not a hop")

    def test_hopChallengeNamesNoLease(self) -> None:
        """
        A hop challenge asked for with names is refused.
        """
        connection, client = self.client()
        result = self.call(connection, client, Challenge, names=["app"], purpose="hop")
        self.assertIsInstance(result, Failure)
        self.assertIn("names no lease", result.getErrorMessage())

    def test_beforeHello(self) -> None:
        """
        A hop before Hello is refused.
        """
        connection = self.connect(amp.AMP)
        d: Deferred[Any] = Deferred()
        connection.tunnel.callRemote(
            Hop,
            ReceivedFactory(),
            host=DESTINATION[0],
            port=DESTINATION[1],
            publicKey=self.tunnelIdentity.publicKey,
            nonce=b"n" * 32,
            signature=b"s",
        ).chainDeferred(d)
        connection.flush()
        self.assertFailed(d, HopRefused, "Hello must come first")


class HopConnectTests(HopTestCase):
    """
    The relay's outbound connection: failures, timeout, and the control session closing meanwhile.
    """

    def test_unreachable(self) -> None:
        """
        A refused outbound connection is a retryable HOP_UNREACHABLE naming the destination.
        """
        connection, client = self.client()
        d, _, _ = self.askHop(connection, client)
        self.outbound.attempts[0][3].errback(ConnectionRefusedError("refused"))
        connection.flush()
        self.assertFailed(d, HopUnreachable, "cannot connect to relay-b.example:4017")
        self.assertEqual(self.router.hops.openFor(self.tunnelIdentity.id), 0)

    def test_connectTimeout(self) -> None:
        """
        An outbound connection that does not complete within the timeout is cancelled and refused
        as unreachable; the identity's slot is given back.
        """
        connection, client = self.client()
        d, _, _ = self.askHop(connection, client)
        self.clock.advance(9.9)
        connection.flush()
        self.assertFalse(d.called)
        self.assertEqual(self.router.hops.openFor(self.tunnelIdentity.id), 1)
        self.clock.advance(0.1)
        connection.flush()
        self.assertEqual(self.outbound.cancelled, [DESTINATION])
        self.assertFailed(d, HopUnreachable, "no connection to relay-b.example:4017 within 10 s")
        self.assertEqual(self.router.hops.openFor(self.tunnelIdentity.id), 0)

    def test_controlClosedWhileConnecting(self) -> None:
        """
        When the control session closes while the relay connects, the attempt is cancelled and the
        slot given back.
        """
        connection, client = self.client()
        self.askHop(connection, client)
        connection.drop()
        self.assertEqual(self.outbound.cancelled, [DESTINATION])
        self.assertEqual(self.router.hops.openFor(self.tunnelIdentity.id), 0)
        self.flushLoggedErrors()

    def test_hopAfterRegisterRefused(self) -> None:
        """
        A control session holding leases cannot become a hop.
        """
        from portal.trust.challenge import signRegistration
        from portal.wire.control import Register

        connection, client = self.client()
        nonce = self.call(connection, client, Challenge, names=["app"])["nonce"]
        self.call(
            connection,
            client,
            Register,
            publicKey=self.tunnelIdentity.publicKey,
            names=["app"],
            nonce=nonce,
            signature=signRegistration(self.tunnelIdentity, self.relayIdentity.id, nonce, ["app"]),
            mode="stream",
        )
        d, _, _ = self.askHop(connection, client)
        self.assertFailed(d, HopRefused, "in use")


class HopLimitTests(HopTestCase):
    """
    The per-identity limit on open hops.
    """

    maxPerIdentity = 2

    def test_limit(self) -> None:
        """
        An identity gets at most C{maxPerIdentity} hops open or opening at once (HOP_LIMIT beyond);
        closing one frees its slot; other identities are not affected.
        """
        hops = []
        for _ in range(2):
            connection, client = self.client()
            d, _, _ = self.askHop(connection, client)
            hops.append((connection, d))
        self.outbound.succeed(0)
        hops[0][0].flush()
        connection, client = self.client()
        d, _, _ = self.askHop(connection, client)
        self.assertFailed(d, HopLimit, "2 hops open")
        other = Identity.generate()
        connection, client = self.client()
        d, _, _ = self.askHop(connection, client, identity=other)
        self.assertEqual(len(self.outbound.attempts), 3)
        # The open hop's tunnel side closes: its slot is free again.
        hops[0][0].drop()
        self.assertEqual(self.router.hops.openFor(self.tunnelIdentity.id), 1)
        connection, client = self.client()
        d, _, _ = self.askHop(connection, client)
        self.assertFalse(d.called)
        self.assertEqual(len(self.outbound.attempts), 4)
