"""
Tests for the control protocol: L{portal.wire.control}, the relay's L{portal.relay.control} and the tunnel's
L{portal.tunnel.control}, run over real TLS in memory.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from typing import Any

from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import CertificateOptions
from twisted.internet.task import Clock, LoopingCall
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.protocols import amp
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.test.iosim import FakeTransport, IOPump, connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase

import portal.relay.control
from portal.relay.control import RelayControlProtocol
from portal.relay.leases import LeaseTable
from portal.relay.router import RelayLimits, Router
from portal.relay.store import MemoryLeaseStore
from portal.trust import relayhello
from portal.trust.challenge import signRegistration
from portal.trust.identity import Identity
from portal.trust.localca import LocalCA
from portal.trust.pinning import KnownRelays
from portal.tunnel.config import RelayAddress, buildConfig
from portal.tunnel.control import (
    COMMAND_TIMEOUT,
    HEARTBEAT_INTERVAL,
    HEARTBEAT_TIMEOUT,
    TunnelControlProtocol,
)
from portal.tunnel.report import Reporter
from portal.wire.control import (
    CAPABILITIES,
    EXPORTER_LENGTH,
    MAX_VERSION,
    MIN_VERSION,
    Challenge,
    GoingAway,
    Heartbeat,
    Hello,
    LeaseUnknown,
    NotAuthenticated,
    Register,
    RegistrationRefused,
    Renew,
    TryAgain,
    Unregister,
    UnsupportedVersion,
    helloSignatureMessage,
    negotiateVersion,
)
from tests.test_store import FailingStore

RELAY_HOST = "relay.example"
RELAY_PORT = 4017
RELAY_ADDRESS = f"{RELAY_HOST}:{RELAY_PORT}"
LABEL = "app"


class FakePool:
    """
    Records what a tunnel control session asks of its data session pool.

    @ivar started: C{(sessionId, key)} of every L{start} call.
    @ivar sealSecrets: The raw TCP secret of every L{start} call (L{None} outside raw TCP mode).
    @ivar wanted: The count of every L{want} call.
    """

    def __init__(self) -> None:
        self.started: list[tuple[bytes, bytes]] = []
        self.sealSecrets: list[bytes | None] = []
        self.wanted: list[int] = []

    def start(self, sessionId: bytes, key: bytes, sealSecret: bytes | None = None) -> None:
        """
        Record a pool start.
        """
        self.started.append((sessionId, key))
        self.sealSecrets.append(sealSecret)

    def want(self, count: int) -> None:
        """
        Record a request for more data sessions.
        """
        self.wanted.append(count)


class FakeTunnel:
    """
    What the control protocol reads of L{portal.tunnel.service.TunnelService}: its configuration.

    @ivar config: A stream-mode configuration; tests may replace it.
    """

    def __init__(self) -> None:
        self.config = buildConfig("8000")


class FakeLink:
    """
    A stand-in for L{portal.tunnel.service.RelayLink} that records what the control protocol tells it.

    @ivar registrations: C{(protocol, hostnames, port)} of every L{registered} call.
    @ivar lost: Every protocol passed to L{controlLost}.
    @ivar fatals: Every message passed to L{fatal}.
    """

    flag = "--relay"

    def __init__(
        self,
        reactor: Clock,
        identity: Identity,
        pinsPath: str,
        label: str = LABEL,
        expectedId: str | None = None,
        mode: str = "stream",
    ) -> None:
        self.reactor = reactor
        self.identity = identity
        self.label = label
        self.labels = [label]
        self.mode = mode
        self.tcpAddresses: list[tuple[str, int] | None] = []
        self.reporter = Reporter(io.StringIO())
        self.pins = KnownRelays(pinsPath)
        self.relay = RelayAddress(RELAY_HOST, RELAY_PORT, expectedId)
        self.pool = FakePool()
        self.tunnel = FakeTunnel()
        self.registrations: list[tuple[TunnelControlProtocol, list[str], int]] = []
        self.lost: list[TunnelControlProtocol] = []
        self.fatals: list[str] = []

    def registered(
        self,
        protocol: TunnelControlProtocol,
        hostnames: list[str],
        port: int,
        tcp: tuple[str, int] | None = None,
    ) -> None:
        """
        Record a registration, and the public TCP address of a raw TCP one.
        """
        self.registrations.append((protocol, hostnames, port))
        self.tcpAddresses.append(tcp)

    def controlLost(self, protocol: TunnelControlProtocol) -> None:
        """
        Record a lost control session.
        """
        self.lost.append(protocol)

    def fatal(self, message: str) -> None:
        """
        Record a fatal error.
        """
        self.fatals.append(message)


class ForeignSignature:
    """
    A relay identity that signs something other than what the relay protocol asks it to sign, as a
    man in the middle replaying a signature made on another TLS session would.

    @ivar publicKey: The real identity's public key.
    """

    def __init__(self, identity: Identity, sign: Callable[[Identity, bytes], bytes]) -> None:
        self._identity = identity
        self._sign = sign
        self.publicKey = identity.publicKey
        self.id = identity.id

    def sign(self, message: bytes) -> bytes:
        """
        Sign with the replacement signing function.
        """
        return self._sign(self._identity, message)


class Connection:
    """
    Both ends of one control session over TLS in memory.

    @ivar relay: The relay's control protocol.
    @ivar tunnel: The tunnel's (or test client's) protocol inside TLS.
    @ivar relayTLS: The relay's TLS protocol.
    @ivar tunnelTLS: The tunnel's TLS protocol.
    @ivar pump: Moves bytes between them.
    """

    def __init__(
        self, relayTLS: TLSMemoryBIOProtocol, tunnelTLS: TLSMemoryBIOProtocol, pump: IOPump
    ) -> None:
        self.relayTLS = relayTLS
        self.tunnelTLS = tunnelTLS
        self.relay: Any = relayTLS.wrappedProtocol
        self.tunnel: Any = tunnelTLS.wrappedProtocol
        self.pump = pump

    @property
    def relayTransport(self) -> FakeTransport:
        """
        The relay's in-memory TCP transport.
        """
        transport: FakeTransport = self.pump.serverIO
        return transport

    @property
    def tunnelTransport(self) -> FakeTransport:
        """
        The tunnel's in-memory TCP transport.
        """
        transport: FakeTransport = self.pump.clientIO
        return transport

    def flush(self) -> None:
        """
        Move bytes and run due timers until both sides are quiet.
        """
        self.pump.flush()

    def drop(self) -> None:
        """
        Lose the TCP connection under the control session, as a network failure would.
        """
        self.tunnelTransport.loseConnection()
        self.flush()


class ControlTestCase(SynchronousTestCase):
    """
    A relay router on a fake clock and a way to connect control sessions to it over in-memory TLS.
    """

    #: Names are reserved from their first second: these tests are about the protocol (the rule
    #: that a name must be held for a while first is tested in test_leases and below).
    limits = RelayLimits(reserveAfter=0.0)

    def setUp(self) -> None:
        """
        Make the relay (identity, router, server certificate) and a tunnel identity.
        """
        self.clock = Clock()
        self.relayIdentity = Identity.generate()
        self.router = Router(self.relayIdentity, self.clock, limits=self.limits)
        key, chain = LocalCA.loadOrCreate(self.mktemp(), "test").issue(["localhost"])
        self.serverOptions = CertificateOptions(
            privateKey=key, certificate=chain[0], extraCertChain=chain[1:]
        )
        self.tunnelIdentity = Identity.generate()
        self.pinsPath = os.path.join(self.mktemp(), "known_relays.json")

    def makeLink(self, identity: Identity | None = None, **kw: Any) -> FakeLink:
        """
        Make a fake relay link for a tunnel.

        @param identity: The tunnel's identity (default the test's tunnel identity).
        @param kw: More L{FakeLink} arguments.
        """
        return FakeLink(self.clock, identity or self.tunnelIdentity, self.pinsPath, **kw)

    def connect(
        self,
        clientProtocol: Callable[[], Protocol],
        serverProtocol: Callable[[], Protocol] | None = None,
    ) -> Connection:
        """
        Connect a client protocol to a new relay control protocol over TLS, and run the exchange until
        it is quiet.

        @param clientProtocol: Builds the protocol inside the client's TLS.
        @param serverProtocol: Builds the protocol inside the relay's TLS, by default a
            L{RelayControlProtocol}.
        """
        serverFactory = TLSMemoryBIOFactory(
            self.serverOptions,
            False,
            Factory.forProtocol(serverProtocol or (lambda: RelayControlProtocol(self.router))),
            clock=self.clock,
        )
        clientFactory = TLSMemoryBIOFactory(
            CertificateOptions(verify=False),
            True,
            Factory.forProtocol(clientProtocol),
            clock=self.clock,
        )
        tunnelTLS, relayTLS, pump = connectedServerAndClient(
            lambda: serverFactory.buildProtocol(None),
            lambda: clientFactory.buildProtocol(None),
            greet=False,
            clock=self.clock,
        )
        connection = Connection(relayTLS, tunnelTLS, pump)
        connection.flush()
        return connection

    def connectTunnel(self, link: FakeLink) -> Connection:
        """
        Run a tunnel control session for C{link} against the relay.

        @param link: The tunnel's fake link.
        """
        return self.connect(lambda: TunnelControlProtocol(link))  # type: ignore[arg-type]

    def assertRegistered(self, link: FakeLink, connection: Connection) -> None:
        """
        Check that C{link}'s label is registered and routed to C{connection}'s relay protocol.
        """
        self.assertEqual(link.fatals, [])
        self.assertEqual(
            [(p, h) for (p, h, _) in link.registrations],
            [(connection.tunnel, [f"{link.label}.localhost"])],
        )
        lease = self.router.leases.route(link.label)
        self.assertIsNotNone(lease)
        assert lease is not None
        self.assertIs(lease.holder, connection.relay)
        self.assertEqual(lease.owner, link.identity.id)


class NegotiateVersionTests(SynchronousTestCase):
    """
    Tests for L{negotiateVersion}.
    """

    def test_sameRange(self) -> None:
        """
        A peer speaking exactly our range gets our highest version.
        """
        self.assertEqual(negotiateVersion(MIN_VERSION, MAX_VERSION), MAX_VERSION)

    def test_newerPeer(self) -> None:
        """
        A peer that also speaks later versions is offered our highest, so neighbouring versions
        interoperate.
        """
        self.assertEqual(negotiateVersion(MIN_VERSION, MAX_VERSION + 5), MAX_VERSION)

    def test_olderPeerOverlapping(self) -> None:
        """
        A peer whose range starts below ours but reaches it gets the highest version it speaks.
        """
        self.assertEqual(negotiateVersion(MIN_VERSION - 1, MIN_VERSION), MIN_VERSION)

    def test_tooNew(self) -> None:
        """
        A peer speaking only versions after ours is refused with both ranges named.
        """
        e = self.assertRaises(
            UnsupportedVersion, negotiateVersion, MAX_VERSION + 1, MAX_VERSION + 3
        )
        self.assertIn(f"{MAX_VERSION + 1}..{MAX_VERSION + 3}", str(e))
        self.assertIn(f"{MIN_VERSION}..{MAX_VERSION}", str(e))

    def test_tooOld(self) -> None:
        """
        A peer speaking only versions before ours is refused.
        """
        self.assertRaises(UnsupportedVersion, negotiateVersion, 0, MIN_VERSION - 1)

    def test_emptyRange(self) -> None:
        """
        An inverted range (minimum above maximum) shares no version with anyone.
        """
        self.assertRaises(UnsupportedVersion, negotiateVersion, MAX_VERSION, MIN_VERSION - 1)


class HandshakeTests(ControlTestCase):
    """
    A full control session between L{TunnelControlProtocol} and L{RelayControlProtocol} over TLS.
    """

    def test_registers(self) -> None:
        """
        After the handshake the tunnel is told its lease hostname and the relay routes the label to
        this control session.
        """
        link = self.makeLink()
        connection = self.connectTunnel(link)
        self.assertRegistered(link, connection)
        self.assertEqual(connection.tunnel.hostnames, [f"{LABEL}.localhost"])
        self.assertEqual(connection.tunnel.relayId, self.relayIdentity.id)
        self.assertEqual(connection.relay.owner, self.tunnelIdentity.id)
        self.assertEqual(connection.relay.names, {LABEL})

    def test_severalNames(self) -> None:
        """
        A link with several labels (one per C{--app}) registers them all in one registration, and
        the relay routes each to this control session.
        """
        link = self.makeLink()
        link.labels = ["alpha", "beta"]
        connection = self.connectTunnel(link)
        self.assertEqual(link.fatals, [])
        self.assertEqual(
            [h for (_, h, _) in link.registrations], [["alpha.localhost", "beta.localhost"]]
        )
        for name in ("alpha", "beta"):
            lease = self.router.leases.route(name)
            assert lease is not None
            self.assertIs(lease.holder, connection.relay)
        self.assertEqual(connection.relay.names, {"alpha", "beta"})

    def test_publicPort(self) -> None:
        """
        The relay's public port reaches the link with the registration, for the printed URL.
        """
        self.router.publicPort = 8443
        link = self.makeLink()
        self.connectTunnel(link)
        self.assertEqual([port for (_, _, port) in link.registrations], [8443])

    def test_dataKeyShared(self) -> None:
        """
        The pool is started with this session's id and the data key, which both sides export from
        the TLS session independently and agree on.
        """
        link = self.makeLink()
        connection = self.connectTunnel(link)
        relayPool = connection.relay.pool
        assert relayPool is not None
        self.assertEqual(len(link.pool.started), 1)
        sessionId, key = link.pool.started[0]
        self.assertEqual(key, relayPool.key)
        self.assertEqual(len(key), EXPORTER_LENGTH)
        self.assertEqual(sessionId, connection.relay.sessionId)
        self.assertIs(self.router.sessions[sessionId], relayPool)

    def test_dataKeyPerSession(self) -> None:
        """
        Two control sessions get different session ids and different data keys.
        """
        first = self.makeLink()
        second = self.makeLink(Identity.generate(), label="other")
        self.connectTunnel(first)
        self.connectTunnel(second)
        (firstId, firstKey), (secondId, secondKey) = first.pool.started + second.pool.started
        self.assertNotEqual(firstId, secondId)
        self.assertNotEqual(firstKey, secondKey)
        self.assertEqual(set(self.router.sessions), {firstId, secondId})

    def test_pinsOnFirstUse(self) -> None:
        """
        A relay met for the first time is pinned in the known relays file, and the user is told.
        """
        link = self.makeLink()
        self.connectTunnel(link)
        self.assertEqual(KnownRelays(self.pinsPath).pinned(RELAY_ADDRESS), self.relayIdentity.id)
        pinned = [e for e in link.reporter.events if e["event"] == "pinned"]
        self.assertEqual(len(pinned), 1)
        self.assertEqual(pinned[0]["relay"], RELAY_ADDRESS)
        self.assertEqual(pinned[0]["relayId"], self.relayIdentity.id)

    def test_alreadyPinned(self) -> None:
        """
        A relay presenting the identity already pinned is accepted without a new C{pinned} event.
        """
        KnownRelays(self.pinsPath).check(RELAY_ADDRESS, self.relayIdentity.id)
        link = self.makeLink()
        connection = self.connectTunnel(link)
        self.assertRegistered(link, connection)
        self.assertEqual([e for e in link.reporter.events if e["event"] == "pinned"], [])

    def test_helloCancelsTimeout(self) -> None:
        """
        Once the tunnel said Hello the relay's Hello timeout no longer applies.
        """
        link = self.makeLink()
        connection = self.connectTunnel(link)
        self.clock.advance(self.router.limits.helloTimeout + 1)
        connection.flush()
        self.assertFalse(connection.relayTransport.disconnecting)
        self.assertEqual(link.lost, [])

    def test_requestData(self) -> None:
        """
        The relay asking for data sessions makes the tunnel's pool open that many.
        """
        link = self.makeLink()
        connection = self.connectTunnel(link)
        connection.relay.requestData(3)
        connection.flush()
        self.assertEqual(link.pool.wanted, [3])

    def test_unregister(self) -> None:
        """
        A clean stop ends the lease at once; the name stays reserved for its owner.
        """
        link = self.makeLink()
        connection = self.connectTunnel(link)
        d = connection.tunnel.unregister()
        connection.flush()
        self.successResultOf(d)
        self.assertIsNone(self.router.leases.route(LABEL))
        self.assertEqual(self.router.leases.ownerOf(LABEL), self.tunnelIdentity.id)
        self.assertEqual(connection.relay.names, set())

    def test_noStreamMode(self) -> None:
        """
        A relay that does not offer stream mode is a fatal error, and nothing is registered.
        """
        self.patch(portal.relay.control, "CAPABILITIES", ())
        link = self.makeLink()
        self.connectTunnel(link)
        self.assertEqual(len(link.fatals), 1)
        self.assertIn("stream mode", link.fatals[0])
        self.assertIsNone(self.router.leases.ownerOf(LABEL))


class RelayAuthenticationTests(ControlTestCase):
    """
    The tunnel checks the relay's identity on each TLS session: signature, pin, explicit id.
    """

    def assertRefused(self, link: FakeLink, connection: Connection) -> str:
        """
        Check that the tunnel gave up with one fatal error, registered nothing and closed.

        @return: The fatal error's message.
        """
        self.assertEqual(len(link.fatals), 1)
        self.assertEqual(link.registrations, [])
        self.assertEqual(link.pool.started, [])
        self.assertIsNone(self.router.leases.ownerOf(link.label))
        self.assertEqual(link.lost, [connection.tunnel])
        self.assertEqual(self.router.sessions, {})
        return link.fatals[0]

    def test_pinMismatch(self) -> None:
        """
        A relay presenting another identity than the one pinned for its address is refused loudly,
        with the file and what to do named in the message.
        """
        otherId = Identity.generate().id
        KnownRelays(self.pinsPath).check(RELAY_ADDRESS, otherId)
        link = self.makeLink()
        connection = self.connectTunnel(link)
        message = self.assertRefused(link, connection)
        self.assertIn(self.pinsPath, message)
        self.assertIn(otherId, message)
        self.assertIn(self.relayIdentity.id, message)
        self.assertIn("remove its entry", message)
        self.assertEqual(KnownRelays(self.pinsPath).pinned(RELAY_ADDRESS), otherId)

    def test_expectedIdMatches(self) -> None:
        """
        A relay presenting the identity given with C{--relay host:port#RELAYID} is accepted and pinned.
        """
        link = self.makeLink(expectedId=self.relayIdentity.id)
        connection = self.connectTunnel(link)
        self.assertRegistered(link, connection)
        self.assertEqual(KnownRelays(self.pinsPath).pinned(RELAY_ADDRESS), self.relayIdentity.id)

    def test_expectedIdMismatch(self) -> None:
        """
        A relay presenting another identity than the one given on the command line is refused.
        """
        expectedId = Identity.generate().id
        link = self.makeLink(expectedId=expectedId)
        connection = self.connectTunnel(link)
        message = self.assertRefused(link, connection)
        self.assertIn(expectedId, message)
        self.assertIn("--relay", message)
        self.assertIsNone(KnownRelays(self.pinsPath).pinned(RELAY_ADDRESS))

    def test_signatureForAnotherSession(self) -> None:
        """
        A genuine relay signature made over another TLS session's exporter value (what a man in the
        middle could relay) does not authenticate this session.
        """
        self.router.identity = ForeignSignature(  # type: ignore[assignment]
            self.relayIdentity,
            lambda identity, message: identity.sign(helloSignatureMessage(b"\0" * 32)),
        )
        link = self.makeLink()
        connection = self.connectTunnel(link)
        message = self.assertRefused(link, connection)
        self.assertIn("does not match this connection", message)
        self.assertIsNone(KnownRelays(self.pinsPath).pinned(RELAY_ADDRESS))

    def test_garbageSignature(self) -> None:
        """
        A relay whose Hello signature is not a signature at all is refused.
        """
        self.router.identity = ForeignSignature(  # type: ignore[assignment]
            self.relayIdentity, lambda identity, message: b"garbage"
        )
        link = self.makeLink()
        connection = self.connectTunnel(link)
        message = self.assertRefused(link, connection)
        self.assertIn("does not match this connection", message)

    def test_keyOfAnotherIdentity(self) -> None:
        """
        A relay presenting someone else's public key cannot authenticate with its own signature.
        """
        impostor = Identity.generate()
        self.router.identity = ForeignSignature(  # type: ignore[assignment]
            self.relayIdentity, lambda identity, message: impostor.sign(message)
        )
        link = self.makeLink()
        connection = self.connectTunnel(link)
        self.assertIn("does not match this connection", self.assertRefused(link, connection))

    def test_corruptPinFile(self) -> None:
        """
        A known relays file that cannot be read stops the tunnel with the file's problem, rather than
        reconnecting forever.
        """
        link = self.makeLink()
        os.makedirs(os.path.dirname(self.pinsPath))
        with open(self.pinsPath, "w") as f:
            f.write("{not json")
        connection = self.connectTunnel(link)
        message = self.assertRefused(link, connection)
        self.assertIn(self.pinsPath, message)
        self.assertIn("not a valid known relays file", message)


class FailureTests(ControlTestCase):
    """
    Failures that reconnecting may cure close the control session without stopping the tunnel.
    """

    def test_silentRelay(self) -> None:
        """
        A relay that never answers Hello is given up on after L{COMMAND_TIMEOUT}, with an error event
        and a closed connection so the link reconnects.
        """
        link = self.makeLink()
        connection = self.connect(
            lambda: TunnelControlProtocol(link),  # type: ignore[arg-type]
            Protocol,
        )
        self.assertEqual(link.lost, [])
        self.clock.advance(COMMAND_TIMEOUT)
        connection.flush()
        self.assertEqual(link.fatals, [])
        self.assertEqual(link.lost, [connection.tunnel])
        self.assertTrue(connection.tunnelTransport.disconnected)
        errors = [e for e in link.reporter.events if e["event"] == "error"]
        self.assertEqual(len(errors), 1)
        self.assertEqual(errors[0]["relay"], RELAY_ADDRESS)

    def test_renewalRefused(self) -> None:
        """
        A renewal the relay refuses for another reason than an unknown lease closes the control
        session, so the link reconnects and registers afresh.
        """
        link = self.makeLink()
        connection = self.connectTunnel(link)
        connection.relay.owner = None
        self.clock.advance(self.router.limits.leaseTTL / 3)
        connection.flush()
        self.assertEqual(link.fatals, [])
        self.assertEqual(link.lost, [connection.tunnel])
        self.assertIsNone(self.router.leases.route(LABEL))
        self.assertEqual(self.router.leases.ownerOf(LABEL), self.tunnelIdentity.id)


class RetryTests(ControlTestCase):
    """
    Refusals the relay marks as temporary are retried on the same session with backoff.
    """

    def withoutTakeover(self) -> None:
        """
        Make the tunnels of this test offer no C{takeover} capability, as older versions do.
        """
        self.patch(relayhello, "CAPABILITIES", tuple(c for c in CAPABILITIES if c != "takeover"))

    def test_retriesUntilOtherSessionGone(self) -> None:
        """
        A tunnel without the C{takeover} capability (an older version) whose name is live on another
        session of its identity reports C{retrying} (not a fatal error), and registers once that
        session is gone.
        """
        self.withoutTakeover()
        first = self.makeLink()
        firstConnection = self.connectTunnel(first)
        second = self.makeLink()
        secondConnection = self.connectTunnel(second)
        self.assertEqual(second.fatals, [])
        self.assertEqual(second.registrations, [])
        self.assertEqual([e["event"] for e in second.reporter.events][-1], "retrying")
        firstConnection.drop()
        self.clock.advance(1.0)
        secondConnection.flush()
        self.assertRegistered(second, secondConnection)

    def test_retryStopsWithConnection(self) -> None:
        """
        A scheduled registration retry is cancelled when the control session closes.
        """
        self.withoutTakeover()
        self.connectTunnel(self.makeLink())
        second = self.makeLink()
        secondConnection = self.connectTunnel(second)
        retry = secondConnection.tunnel._retry
        self.assertTrue(retry.active())
        secondConnection.drop()
        self.assertFalse(retry.active())
        self.assertIsNone(secondConnection.tunnel._retry)


class TakeoverTests(ControlTestCase):
    """
    A second tunnel of the same identity on the same name (capability C{takeover}).
    """

    def test_alreadyRunning(self) -> None:
        """
        Without C{--takeover} the second tunnel stops with a message saying one already runs and
        how to replace it; the first keeps its lease.
        """
        first = self.makeLink()
        firstConnection = self.connectTunnel(first)
        second = self.makeLink()
        self.connectTunnel(second)
        self.assertEqual(second.registrations, [])
        [message] = second.fatals
        self.assertIn("already running: name 'app' is served by another tunnel", message)
        self.assertIn("--takeover", message)
        self.assertRegistered(first, firstConnection)

    def test_takeover(self) -> None:
        """
        With C{--takeover} the second tunnel gets the lease at once; the first, on its next renewal,
        finds the lease gone and stops as already running elsewhere.
        """
        first = self.makeLink()
        firstConnection = self.connectTunnel(first)
        second = self.makeLink()
        second.tunnel.config = buildConfig("8000", takeover=True)
        secondConnection = self.connectTunnel(second)
        self.assertRegistered(second, secondConnection)
        self.clock.advance(self.router.leases.ttl / 3)
        firstConnection.flush()
        self.assertEqual(len(first.fatals), 1)
        self.assertIn("already running", first.fatals[0])
        lease = self.router.leases.route(second.label)
        assert lease is not None
        self.assertIs(lease.holder, secondConnection.relay)


class NameTakenTests(ControlTestCase):
    """
    A lease name belongs to the identity that registered it first.
    """

    def test_secondIdentityRefused(self) -> None:
        """
        Another identity asking for a name already leased gets a fatal error saying it is taken, and
        the first lease keeps routing.
        """
        first = self.makeLink()
        firstConnection = self.connectTunnel(first)
        second = self.makeLink(Identity.generate())
        self.connectTunnel(second)
        self.assertEqual(len(second.fatals), 1)
        self.assertIn("taken", second.fatals[0])
        self.assertEqual(second.registrations, [])
        self.assertRegistered(first, firstConnection)

    def test_reservedAfterDisconnect(self) -> None:
        """
        A name whose tunnel went away stays reserved: another identity still cannot take it.
        """
        first = self.makeLink()
        firstConnection = self.connectTunnel(first)
        firstConnection.drop()
        second = self.makeLink(Identity.generate())
        self.connectTunnel(second)
        self.assertEqual(len(second.fatals), 1)
        self.assertIn("taken", second.fatals[0])
        self.assertEqual(self.router.leases.ownerOf(LABEL), self.tunnelIdentity.id)


class ClientTestCase(ControlTestCase):
    """
    A bare AMP client connected to the relay over TLS, sending commands one at a time.
    """

    def setUp(self) -> None:
        """
        Connect a bare AMP client over TLS.
        """
        super().setUp()
        self.connection = self.connect(amp.AMP)
        self.client: amp.AMP = self.connection.tunnel

    def call(self, command: type[amp.Command], **kw: Any) -> Any:
        """
        Send a command from the client and run the exchange.

        @return: The answer, or the L{Failure}.
        """
        results: list[Any] = []
        self.client.callRemote(command, **kw).addBoth(results.append)
        self.connection.flush()
        self.assertEqual(len(results), 1, "no answer")
        return results[0]

    def assertRefusedWith(self, result: Any, exception: type[Exception], text: str) -> None:
        """
        Check that a command failed with C{exception} and a message containing C{text}.
        """
        self.assertIsInstance(result, Failure)
        self.assertTrue(result.check(exception), result)
        self.assertIn(text, result.getErrorMessage())

    def hello(self, capabilities: tuple[str, ...] = ("stream",)) -> None:
        """
        Say Hello.
        """
        result = self.call(
            Hello,
            minVersion=MIN_VERSION,
            maxVersion=MAX_VERSION,
            capabilities=list(capabilities),
            software="t",
        )
        self.assertNotIsInstance(result, Failure)

    def challenge(self, names: list[str]) -> bytes:
        """
        Get a registration challenge for C{names}.
        """
        result = self.call(Challenge, names=names)
        self.assertNotIsInstance(result, Failure)
        nonce: bytes = result["nonce"]
        return nonce

    def register(
        self,
        names: list[str],
        nonce: bytes,
        signature: bytes | None = None,
        identity: Identity | None = None,
        mode: str = "stream",
    ) -> Any:
        """
        Send a registration, signed correctly unless C{signature} is given.
        """
        identity = identity or self.tunnelIdentity
        if signature is None:
            signature = signRegistration(identity, self.relayIdentity.id, nonce, names)
        return self.call(
            Register,
            publicKey=identity.publicKey,
            names=names,
            nonce=nonce,
            signature=signature,
            mode=mode,
        )


class RefusalTests(ClientTestCase):
    """
    The relay's responders refuse bad registrations through the AMP layer with a clear message.
    """

    def test_registers(self) -> None:
        """
        A correctly signed registration succeeds, as a baseline for the refusals.
        """
        self.hello()
        result = self.register([LABEL], self.challenge([LABEL]))
        self.assertEqual(result["hostnames"], [f"{LABEL}.localhost"])
        self.assertEqual(result["expiresIn"], self.router.limits.leaseTTL)

    def test_unsupportedVersion(self) -> None:
        """
        A Hello with no common version fails with L{UnsupportedVersion}.
        """
        result = self.call(
            Hello,
            minVersion=MAX_VERSION + 1,
            maxVersion=MAX_VERSION + 2,
            capabilities=["stream"],
            software="t",
        )
        self.assertRefusedWith(result, UnsupportedVersion, "no common protocol version")

    def test_capabilitiesIntersected(self) -> None:
        """
        The relay answers with the capabilities both sides know, and its own identity's key.
        """
        result = self.call(
            Hello,
            minVersion=MIN_VERSION,
            maxVersion=MAX_VERSION,
            capabilities=["future", "stream"],
            software="t",
        )
        self.assertEqual(result["capabilities"], ["stream"])
        self.assertEqual(result["relayKey"], self.relayIdentity.publicKey)
        self.assertEqual(result["version"], MAX_VERSION)

    def test_challengeBeforeHello(self) -> None:
        """
        A challenge asked for before Hello is refused.
        """
        result = self.call(Challenge, names=[LABEL])
        self.assertRefusedWith(result, RegistrationRefused, "Hello must come first")

    def test_registerBeforeHello(self) -> None:
        """
        A registration before Hello is refused.
        """
        result = self.register([LABEL], b"n" * 32, signature=b"s")
        self.assertRefusedWith(result, RegistrationRefused, "Hello must come first")
        self.assertIsNone(self.router.leases.ownerOf(LABEL))

    def test_invalidLabel(self) -> None:
        """
        A name that is not a DNS label is refused when the challenge is asked for, and when registered.
        """
        self.hello()
        result = self.call(Challenge, names=["Bad_Name"])
        self.assertRefusedWith(result, RegistrationRefused, "not a DNS label")
        nonce = self.challenge([LABEL])
        result = self.register(["Bad_Name"], nonce)
        self.assertRefusedWith(result, RegistrationRefused, "not a DNS label")

    def test_noNames(self) -> None:
        """
        A challenge for no names is refused.
        """
        self.hello()
        self.assertRefusedWith(self.call(Challenge, names=[]), RegistrationRefused, "no lease name")

    def test_tooManyNames(self) -> None:
        """
        A challenge for more names than one registration may hold is refused.
        """
        self.hello()
        names = [f"n{i}" for i in range(self.router.limits.maxNamesPerRegister + 1)]
        self.assertRefusedWith(self.call(Challenge, names=names), RegistrationRefused, "at most")

    def test_otherMode(self) -> None:
        """
        A registration for a mode this relay does not offer is refused.
        """
        self.hello()
        result = self.register([LABEL], self.challenge([LABEL]), mode="quic")
        self.assertRefusedWith(result, RegistrationRefused, "quic mode is not supported")

    def test_disabledMode(self) -> None:
        """
        A mode this relay knows but was not started with is refused with a message saying so.
        """
        self.hello()
        for mode in ("udp", "tcp+udp", "stream+udp", "tcp"):
            result = self.register([LABEL], self.challenge([LABEL]), mode=mode)
            refused = "tcp" if "tcp" in mode else "udp"
            self.assertRefusedWith(
                result, RegistrationRefused, f"{refused} mode is disabled on this relay"
            )

    def test_wrongSignature(self) -> None:
        """
        A registration signed by another key than the one presented is refused.
        """
        self.hello()
        nonce = self.challenge([LABEL])
        signature = signRegistration(Identity.generate(), self.relayIdentity.id, nonce, [LABEL])
        result = self.register([LABEL], nonce, signature=signature)
        self.assertRefusedWith(result, RegistrationRefused, "signature is not valid")
        self.assertIsNone(self.router.leases.ownerOf(LABEL))

    def test_replayedNonce(self) -> None:
        """
        A registration replayed with the same nonce and signature is refused: challenges are single
        use.
        """
        self.hello()
        nonce = self.challenge([LABEL])
        self.assertNotIsInstance(self.register([LABEL], nonce), Failure)
        self.assertRefusedWith(self.register([LABEL], nonce), TryAgain, "already used")

    def test_unknownNonce(self) -> None:
        """
        A nonce this relay never issued is refused.
        """
        self.hello()
        result = self.register([LABEL], os.urandom(32))
        self.assertRefusedWith(result, TryAgain, "unknown to this relay")

    def test_nonceForOtherNames(self) -> None:
        """
        A challenge issued for other names cannot register this one, even correctly signed.
        """
        self.hello()
        nonce = self.challenge(["other"])
        result = self.register([LABEL], nonce)
        self.assertRefusedWith(result, RegistrationRefused, "issued for names ['other']")
        self.assertIsNone(self.router.leases.ownerOf(LABEL))

    def test_signedForAnotherRelay(self) -> None:
        """
        A signature made for another relay's identity is refused, so registrations cannot be moved
        between relays.
        """
        self.hello()
        nonce = self.challenge([LABEL])
        signature = signRegistration(self.tunnelIdentity, Identity.generate().id, nonce, [LABEL])
        result = self.register([LABEL], nonce, signature=signature)
        self.assertRefusedWith(result, RegistrationRefused, self.relayIdentity.id)
        self.assertIsNone(self.router.leases.ownerOf(LABEL))

    def test_expiredChallenge(self) -> None:
        """
        A challenge answered after its lifetime is refused.
        """
        self.hello()
        nonce = self.challenge([LABEL])
        self.clock.advance(self.router.challenges.ttl + 1)
        self.assertRefusedWith(self.register([LABEL], nonce), TryAgain, "expired")

    def test_allOrNone(self) -> None:
        """
        A registration that hits the per-identity limit part way registers none of its names.
        """
        self.router.leases.maxPerOwner = 2
        self.hello()
        names = ["one", "two", "three"]
        self.assertRefusedWith(self.register(names, self.challenge(names)), RegistrationRefused, "")
        for name in names:
            self.assertIsNone(self.router.leases.route(name))
        self.assertEqual(self.connection.relay.names, set())

    def test_liveOnAnotherSessionOfSameIdentity(self) -> None:
        """
        A name live on another control session of the same identity is not moved (which would make two
        tunnels take it from each other in turn): the registration is told to try again later.
        """
        self.hello()
        self.register([LABEL], self.challenge([LABEL]))
        first = self.connection
        self.connection = self.connect(amp.AMP)
        self.client = self.connection.tunnel
        self.hello()
        result = self.register([LABEL], self.challenge([LABEL]))
        self.assertRefusedWith(result, TryAgain, "another tunnel of this identity")
        lease = self.router.leases.route(LABEL)
        assert lease is not None
        self.assertIs(lease.holder, first.relay)

    def test_staleUnregisterKeepsNewHolder(self) -> None:
        """
        After a lease lapsed and another session of the same identity took it, an Unregister from the
        old session does not end the new session's lease.
        """
        self.hello()
        self.register([LABEL], self.challenge([LABEL]))
        old = self.connection
        self.clock.advance(self.router.leases.ttl / 2)
        # The old session's path stays alive (a heartbeat), but its lease is not renewed.
        self.assertEqual(self.call(Heartbeat), {})
        self.clock.advance(self.router.leases.ttl / 2 + 1)
        self.connection = self.connect(amp.AMP)
        self.client = self.connection.tunnel
        self.hello()
        self.assertNotIsInstance(self.register([LABEL], self.challenge([LABEL])), Failure)
        new = self.connection
        self.connection, self.client = old, old.tunnel
        self.assertNotIsInstance(self.call(Unregister, names=[LABEL]), Failure)
        lease = self.router.leases.route(LABEL)
        assert lease is not None
        self.assertIs(lease.holder, new.relay)

    def test_renewalSaved(self) -> None:
        """
        A renewal is written to the lease store at once, so a crash does not shorten the
        reservation.
        """
        store = MemoryLeaseStore()
        self.router.leases = LeaseTable(self.clock, ttl=self.limits.leaseTTL, store=store)
        self.hello()
        self.register([LABEL], self.challenge([LABEL]))
        self.clock.advance(10)
        self.assertNotIsInstance(self.call(Renew, names=[LABEL]), Failure)
        [record] = store.names()
        self.assertEqual(record.expiresAt, self.clock.seconds() + self.limits.leaseTTL)

    def test_storeFailureRetried(self) -> None:
        """
        When the lease store cannot be written, the registration is refused as one to try again,
        nothing is registered, and the error is logged for the operator.
        """
        broken = FailingStore(message="lease store /state/leases.sqlite3: disk I/O error")
        self.router.leases = LeaseTable(self.clock, store=broken)
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.hello()
        failure = self.register([LABEL], self.challenge([LABEL]))
        self.assertIsInstance(failure, Failure)
        failure.trap(TryAgain)
        self.assertEqual(failure.getErrorMessage(), "the relay cannot record leases at the moment")
        self.assertIsNone(self.router.leases.ownerOf(LABEL))
        self.assertIn(
            "registration failed: lease store /state/leases.sqlite3: disk I/O error",
            [formatEvent(event) for event in events],
        )

    def test_droppedAtOnceNotReserved(self) -> None:
        """
        With the relay's default rule, a name registered and released at once is free for another
        identity straight away.
        """
        self.router.leases = LeaseTable(self.clock, reserveAfter=RelayLimits().reserveAfter)
        self.hello()
        self.register([LABEL], self.challenge([LABEL]))
        self.assertNotIsInstance(self.call(Unregister, names=[LABEL]), Failure)
        self.assertIsNone(self.router.leases.ownerOf(LABEL))
        self.router.leases.register(LABEL, Identity.generate().id, object())

    def test_sessionBelongsToOneIdentity(self) -> None:
        """
        Once one identity registered on a control session another cannot register on it too.
        """
        self.hello()
        self.register([LABEL], self.challenge([LABEL]))
        other = Identity.generate()
        result = self.register(["other"], self.challenge(["other"]), identity=other)
        self.assertRefusedWith(result, RegistrationRefused, "another identity")
        self.assertIsNone(self.router.leases.ownerOf("other"))

    def test_renewBeforeRegister(self) -> None:
        """
        A renewal before any registration is refused as not authenticated.
        """
        self.hello()
        result = self.call(Renew, names=[LABEL])
        self.assertRefusedWith(result, NotAuthenticated, "register first")

    def test_renewUnknownName(self) -> None:
        """
        Renewing or releasing a name this session does not hold is refused.
        """
        self.hello()
        self.register([LABEL], self.challenge([LABEL]))
        self.assertRefusedWith(self.call(Renew, names=["other"]), LeaseUnknown, "other")
        self.assertRefusedWith(self.call(Unregister, names=["other"]), LeaseUnknown, "other")


class RenewalTests(ControlTestCase):
    """
    The tunnel renews its lease while connected; the lease outlives a lost connection as a reservation.
    """

    limits = RelayLimits(leaseTTL=30.0, reserveAfter=0.0)

    def test_renewals(self) -> None:
        """
        The tunnel renews every third of the lease lifetime, so the lease stays live long past its
        original expiry.
        """
        link = self.makeLink()
        connection = self.connectTunnel(link)
        lease = self.router.leases.route(LABEL)
        assert lease is not None
        originalExpiry = lease.expiresAt
        for _ in range(10):
            self.clock.advance(self.limits.leaseTTL / 3)
            connection.flush()
            self.assertIsNotNone(self.router.leases.route(LABEL))
        self.assertGreater(self.clock.seconds(), originalExpiry + self.limits.leaseTTL)
        self.assertEqual(lease.expiresAt, self.clock.seconds() + self.limits.leaseTTL)
        self.assertEqual(link.fatals, [])
        self.assertEqual(link.lost, [])

    def test_lapsesWithoutRenewal(self) -> None:
        """
        Without renewals (the tunnel's connection is silent) the lease stops routing after its lifetime.
        """
        link = self.makeLink()
        connection = self.connectTunnel(link)
        renewal = connection.tunnel._renewal
        assert renewal is not None
        renewal.stop()
        self.clock.advance(self.limits.leaseTTL + 1)
        self.assertIsNone(self.router.leases.route(LABEL))
        self.assertEqual(self.router.leases.ownerOf(LABEL), self.tunnelIdentity.id)

    def test_connectionLostDetaches(self) -> None:
        """
        When the control connection is lost the lease stops routing but stays owned; the tunnel stops
        renewing and tells the link.
        """
        link = self.makeLink()
        connection = self.connectTunnel(link)
        sessionId = connection.relay.sessionId
        connection.drop()
        self.assertIsNone(self.router.leases.route(LABEL))
        self.assertEqual(self.router.leases.ownerOf(LABEL), self.tunnelIdentity.id)
        self.assertNotIn(sessionId, self.router.sessions)
        self.assertEqual(link.lost, [connection.tunnel])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_reconnectTakesNameBack(self) -> None:
        """
        The same identity reconnecting on a new control session registers its name again.
        """
        link = self.makeLink()
        first = self.connectTunnel(link)
        first.drop()
        link.registrations.clear()
        self.clock.advance(5)
        second = self.connectTunnel(link)
        self.assertRegistered(link, second)
        self.assertNotEqual(first.relay.sessionId, second.relay.sessionId)
        self.assertEqual([s for (s, _) in link.pool.started][-1], second.relay.sessionId)

    def test_relayForgotLease(self) -> None:
        """
        A relay that no longer knows the lease when it is renewed gets a fresh registration, and the
        tunnel keeps a single renewal timer.
        """
        link = self.makeLink()
        connection = self.connectTunnel(link)
        self.router.leases.release(LABEL, self.tunnelIdentity.id)
        self.clock.advance(self.limits.leaseTTL / 3)
        connection.flush()
        self.assertEqual(len(link.registrations), 2)
        self.assertIsNotNone(self.router.leases.route(LABEL))
        self.assertEqual(link.fatals, [])
        renewals = [
            call
            for call in self.clock.getDelayedCalls()
            if isinstance(call.func, LoopingCall) and call.func.f == connection.tunnel._renew
        ]
        self.assertEqual(len(renewals), 1)
        connection.drop()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class HelloTimeoutTests(ControlTestCase):
    """
    A control session that never says Hello is dropped.
    """

    def test_timeout(self) -> None:
        """
        The relay closes a control session that sent no Hello within C{helloTimeout} seconds.
        """
        protocol = RelayControlProtocol(self.router)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.clock.advance(self.router.limits.helloTimeout - 0.5)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.5)
        self.assertTrue(transport.disconnecting)

    def test_timeoutOverTLS(self) -> None:
        """
        Over TLS too, a client that completes the handshake but never says Hello is disconnected.
        """
        connection = self.connect(Protocol)
        self.assertFalse(connection.tunnelTransport.disconnected)
        self.clock.advance(self.router.limits.helloTimeout)
        connection.flush()
        self.assertTrue(connection.tunnelTransport.disconnected)
        self.assertTrue(connection.relayTransport.disconnected)

    def test_connectionLostCancelsTimer(self) -> None:
        """
        A control session that closes before its Hello leaves no timer behind.
        """
        protocol = RelayControlProtocol(self.router)
        protocol.makeConnection(StringTransport())
        protocol.connectionLost(Failure(Exception("gone")))
        self.assertEqual(self.clock.getDelayedCalls(), [])


class LivenessTests(ControlTestCase):
    """
    Heartbeats: the tunnel checks the path every L{HEARTBEAT_INTERVAL} seconds and redials a dead one;
    the relay closes a session that stays silent for C{controlIdleTimeout}.
    """

    def events(self, link: FakeLink) -> list[str]:
        """
        @return: The names of the events C{link}'s reporter printed.
        """
        return [event["event"] for event in link.reporter.events]

    def test_heartbeatsKeepSessionAlive(self) -> None:
        """
        A tunnel that heartbeats keeps its control session well past the relay's idle timeout, and its
        heartbeats are answered (no dead-path report).
        """
        link = self.makeLink()
        connection = self.connectTunnel(link)
        self.assertRegistered(link, connection)
        for _ in range(int(3 * self.limits.controlIdleTimeout / HEARTBEAT_INTERVAL)):
            self.clock.advance(HEARTBEAT_INTERVAL)
            connection.flush()
        self.assertFalse(connection.relayTransport.disconnecting)
        self.assertFalse(connection.tunnelTransport.disconnecting)
        self.assertNotIn("dead-path", self.events(link))

    def test_deadPathRedialled(self) -> None:
        """
        A heartbeat unanswered for L{HEARTBEAT_TIMEOUT} seconds aborts the control session (so the link
        redials) and says so.
        """
        link = self.makeLink()
        connection = self.connectTunnel(link)
        self.assertRegistered(link, connection)
        # The path dies: nothing is pumped from here on.
        self.clock.advance(HEARTBEAT_INTERVAL)
        self.assertFalse(connection.tunnelTransport.disconnecting)
        self.clock.advance(HEARTBEAT_TIMEOUT)
        self.assertTrue(connection.tunnelTransport.disconnecting)
        self.assertIn("dead-path", self.events(link))
        self.assertEqual(link.fatals, [])

    def test_noHeartbeatsWithoutCapability(self) -> None:
        """
        A relay that does not offer C{heartbeat} (an older version) is never sent L{Heartbeat}.
        """
        self.patch(portal.relay.control, "CAPABILITIES", ("stream", "tcp", "udp"))
        link = self.makeLink()
        connection = self.connectTunnel(link)
        self.assertRegistered(link, connection)
        self.assertIsNone(connection.tunnel._heartbeat)
        self.clock.advance(HEARTBEAT_INTERVAL + HEARTBEAT_TIMEOUT)
        self.assertFalse(connection.tunnelTransport.disconnecting)


class SilenceTests(ClientTestCase):
    """
    The relay closes a control session that stays silent for C{controlIdleTimeout} seconds.
    """

    def test_silentSessionClosed(self) -> None:
        """
        A control session that sends nothing for C{controlIdleTimeout} seconds is closed by the relay;
        its lease is detached but stays reserved for its owner.
        """
        self.hello()
        self.register([LABEL], self.challenge([LABEL]))
        self.clock.advance(self.limits.controlIdleTimeout - 1)
        self.assertFalse(self.connection.relayTransport.disconnecting)
        self.clock.advance(1)
        self.connection.flush()
        self.assertTrue(self.connection.relayTransport.disconnected)
        self.assertIsNone(self.router.leases.route(LABEL))
        self.assertEqual(self.router.leases.ownerOf(LABEL), self.tunnelIdentity.id)
        self.assertEqual(self.router.controls, set())

    def test_anyTrafficResetsSilence(self) -> None:
        """
        Every command from the tunnel restarts the relay's silence timer.
        """
        self.hello()
        self.clock.advance(self.limits.controlIdleTimeout - 1)
        self.assertEqual(self.call(Heartbeat), {})
        self.clock.advance(self.limits.controlIdleTimeout - 1)
        self.assertFalse(self.connection.relayTransport.disconnecting)


class GoingAwayTests(ControlTestCase):
    """
    A relay that shuts down tells its tunnels, and refuses new control sessions meanwhile.
    """

    def test_tunnelTold(self) -> None:
        """
        L{RelayControlProtocol.goingAway} reaches a tunnel that understands it, which reports it and
        does not stop.
        """
        link = self.makeLink()
        connection = self.connectTunnel(link)
        connection.relay.goingAway(7.0)
        connection.flush()
        [event] = [e for e in link.reporter.events if e["event"] == "relay-leaving"]
        self.assertIn("open connections get 7 s", event["message"])
        self.assertEqual(link.fatals, [])

    def test_notSentWithoutCapability(self) -> None:
        """
        L{GoingAway} is sent only to a tunnel that listed C{goaway} in its L{Hello}.
        """
        relay = self.connect(amp.AMP).relay
        sent: list[Any] = []
        self.patch(relay, "callRemote", lambda *a, **kw: sent.append(a))
        relay.hello(MIN_VERSION, MAX_VERSION, ["stream"], "t")
        relay.goingAway(7.0)
        self.assertEqual(sent, [])
        relay.hello(MIN_VERSION, MAX_VERSION, ["stream", "goaway"], "t")
        relay.goingAway(7.0)
        self.assertEqual(sent, [(GoingAway,)])

    def test_helloRefusedWhileClosing(self) -> None:
        """
        A new control session while the relay shuts down is told to try again, and the tunnel closes
        it to redial with backoff rather than stopping.
        """
        self.router.closing = True
        link = self.makeLink()
        connection = self.connectTunnel(link)
        self.assertEqual(link.fatals, [])
        self.assertEqual(link.registrations, [])
        self.assertTrue(connection.tunnelTransport.disconnected)
        [event] = [e for e in link.reporter.events if e["event"] == "retrying"]
        self.assertIn("shutting down", event["message"])
