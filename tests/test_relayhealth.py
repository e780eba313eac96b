"""
Tests for L{portal.registry.health}: health checks against a relay control protocol over TLS in memory
(a memory reactor's connections completed with L{twisted.test.iosim}).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import CertificateOptions
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test.iosim import ConnectionCompleter, IOPump
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

import portal.relay.control
from portal.registry.document import RegistryEntry
from portal.registry.health import HEALTH_TIMEOUT, Health, checkRelay
from portal.relay.control import RelayControlProtocol
from portal.relay.router import Router
from portal.trust.identity import Identity
from portal.trust.localca import LocalCA
from portal.trust.relayhello import relayTLSOptions
from portal.wire.control import helloSignatureMessage
from tests.test_control import ForeignSignature

PORT = 4017


@implementer(IStreamClientEndpoint)
class MemoryTLSEndpoint:
    """
    What L{portal.registry.health.controlEndpoint} builds (the same TLS options over a
    L{HostnameEndpoint}), with the TLS layer on the test's clock: L{wrapClientTLS} would use the
    global reactor to flush small writes.
    """

    def __init__(self, reactor: MemoryReactorClock, host: str, port: int) -> None:
        self._reactor = reactor
        self._endpoint = HostnameEndpoint(reactor, host, port)

    def connect(self, factory: Any) -> Any:
        """
        Connect over TLS.

        @return: A L{Deferred} firing with C{factory}'s protocol.
        """
        tls = TLSMemoryBIOFactory(relayTLSOptions(), True, factory, clock=self._reactor)
        return self._endpoint.connect(tls).addCallback(lambda protocol: protocol.wrappedProtocol)


class CheckRelayTests(SynchronousTestCase):
    """
    L{checkRelay} connects, says Hello, verifies the relay's identity on the session and measures the
    latency, within a timeout.
    """

    def setUp(self) -> None:
        """
        A relay listening with TLS on the memory reactor.
        """
        self.reactor = MemoryReactorClock()
        self.relayIdentity = Identity.generate()
        self.router = Router(self.relayIdentity, self.reactor)
        key, chain = LocalCA.loadOrCreate(self.mktemp(), "test").issue(["localhost"])
        self.serverOptions = CertificateOptions(
            privateKey=key, certificate=chain[0], extraCertChain=chain[1:]
        )
        self.relayProtocols: list[Any] = []
        self.serverProtocol: Any = lambda: RelayControlProtocol(self.router)

        def build() -> Protocol:
            protocol = self.serverProtocol()
            self.relayProtocols.append(protocol)
            return protocol

        self.reactor.listenTCP(
            PORT,
            TLSMemoryBIOFactory(
                self.serverOptions, False, Factory.forProtocol(build), clock=self.reactor
            ),
        )
        self.completer = ConnectionCompleter(self.reactor)

    def entry(self, relayId: str | None = None) -> RegistryEntry:
        """
        @return: The registry's entry for the relay (with another id, if given).
        """
        return RegistryEntry("127.0.0.1", PORT, relayId or self.relayIdentity.id, frozenset())

    def start(self, entry: RegistryEntry | None = None, **kw: Any) -> list[Health]:
        """
        Start a health check; its result is appended to the returned list.
        """
        entry = entry or self.entry()
        endpoint = MemoryTLSEndpoint(self.reactor, entry.host, entry.port)
        results: list[Health] = []
        checkRelay(self.reactor, entry, endpoint=endpoint, **kw).addCallback(results.append)
        # HostnameEndpoint starts its connection attempt on the next turn.
        self.reactor.advance(0)
        return results

    def connect(self) -> IOPump:
        """
        Complete the pending TCP connection to the relay.
        """
        pump = self.completer.succeedOnce(greet=False)
        assert pump is not None
        return pump

    def test_healthy(self) -> None:
        """
        A relay proving the registry's id is healthy; the connection is closed afterwards.
        """
        results = self.start()
        pump = self.connect()
        pump.flush()
        [health] = results
        self.assertEqual(health.reason, "ok")
        self.assertTrue(health.ok)
        self.assertEqual(health.relayId, self.relayIdentity.id)
        self.assertIn("stream", health.capabilities)
        self.assertTrue(health.software and health.software.startswith("portal-relay/"))
        pump.flush()
        self.assertTrue(pump.clientIO.disconnected)

    def test_latency(self) -> None:
        """
        The latency is the time from the start to the Hello answer, on the reactor's clock.
        """
        results = self.start()
        self.reactor.advance(0.125)
        pump = self.connect()
        self.reactor.advance(0.125)
        pump.flush()
        [health] = results
        self.assertTrue(health.ok)
        self.assertEqual(health.latency, 0.25)

    def test_identityMismatch(self) -> None:
        """
        A relay proving another identity than the registry lists is unhealthy, with both ids named.
        """
        listed = Identity.generate().id
        results = self.start(self.entry(listed))
        self.connect().flush()
        [health] = results
        self.assertFalse(health.ok)
        self.assertEqual(
            health.reason,
            f"the relay proved identity {self.relayIdentity.id}, but the registry lists {listed}",
        )
        self.assertEqual(health.relayId, self.relayIdentity.id)

    def test_signatureForAnotherSession(self) -> None:
        """
        A signature that does not cover this TLS session (a man in the middle) is unhealthy.
        """
        self.router.identity = ForeignSignature(  # type: ignore[assignment]
            self.relayIdentity,
            lambda identity, message: identity.sign(helloSignatureMessage(b"\0" * 32)),
        )
        results = self.start()
        self.connect().flush()
        [health] = results
        self.assertFalse(health.ok)
        self.assertIn(
            "signature of relay 127.0.0.1:4017 does not match this connection", health.reason
        )
        self.assertIsNone(health.relayId)

    def test_missingMode(self) -> None:
        """
        A relay without a capability for a mode asked for is unhealthy.
        """
        self.patch(portal.relay.control, "CAPABILITIES", ("stream",))
        results = self.start(modes=["stream", "udp", "tcp"])
        self.connect().flush()
        [health] = results
        self.assertFalse(health.ok)
        self.assertEqual(health.reason, "the relay does not speak tcp, udp mode")

    def test_refused(self) -> None:
        """
        A relay that refuses the connection is unhealthy, saying so.
        """
        results = self.start()
        self.completer.failOnce()
        # HostnameEndpoint notices its last attempt failed at the next attempt interval.
        self.reactor.advance(1)
        [health] = results
        self.assertFalse(health.ok)
        self.assertTrue(health.reason.startswith("cannot connect: "), health.reason)
        self.assertIn("refused", health.reason)
        self.assertIsNone(health.latency)

    def test_silentRelay(self) -> None:
        """
        A relay that accepts the connection but never answers Hello is unhealthy after the timeout,
        not before, and the connection is aborted.
        """
        self.serverProtocol = Protocol
        results = self.start()
        pump = self.connect()
        pump.flush()
        self.reactor.advance(HEALTH_TIMEOUT - 0.5)
        self.assertEqual(results, [])
        self.reactor.advance(0.5)
        [health] = results
        self.assertEqual(health, Health(False, f"no answer within {HEALTH_TIMEOUT:g} s"))
        pump.flush()
        self.assertTrue(pump.clientIO.disconnected)

    def test_noConnection(self) -> None:
        """
        A connection that never completes is given up after the timeout.
        """
        results = self.start(timeout=3.0)
        self.reactor.advance(3.0)
        [health] = results
        self.assertEqual(health, Health(False, "no answer within 3 s"))
