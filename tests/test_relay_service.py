"""
Tests for L{portal.relay.service}: the relay's state directory and lease persistence.
"""

from __future__ import annotations

import json
import os

from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from portal.registry.document import RegistryError
from portal.relay.service import DRAIN_POLL, RelayConfig, RelayService
from portal.tap.relay import Options
from portal.trust.identity import Identity


class RelayStateTests(SynchronousTestCase):
    """
    What the relay keeps in C{--state-dir}.
    """

    def _service(self, stateDir: str, clock: Clock) -> RelayService:
        """
        A relay service on C{stateDir} whose router is built but which listens nowhere.
        """
        service = RelayService(RelayConfig(stateDir=stateDir), clock)
        service.router, _ = service._buildRouter()
        return service

    def test_identityAndCertificateKept(self) -> None:
        """
        The relay creates its identity and TLS CA on first start, private files 0600, and reuses them.
        """
        stateDir = os.path.abspath(self.mktemp())
        clock = Clock()
        first = self._service(stateDir, clock)
        second = self._service(stateDir, clock)
        assert first.router is not None and second.router is not None
        self.assertEqual(first.router.identity.id, second.router.identity.id)
        for name in ("identity.json", os.path.join("tls", "ca-key.pem")):
            self.assertEqual(os.stat(os.path.join(stateDir, name)).st_mode & 0o777, 0o600)
        self.assertEqual(os.stat(stateDir).st_mode & 0o777, 0o700)

    def test_leaseOwnershipSurvivesRestart(self) -> None:
        """
        Registrations are saved (coalesced, one second later); after a restart the name still belongs
        to its owner, detached until the owner's tunnel registers again.
        """
        stateDir = os.path.abspath(self.mktemp())
        clock = Clock()
        clock.advance(1000)
        first = self._service(stateDir, clock)
        assert first.router is not None
        holder = object()
        first.router.leases.register("app", "owner-a", holder)
        first.router.onLeasesChanged()
        first.router.onLeasesChanged()
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        clock.advance(1.0)
        self.assertTrue(os.path.exists(os.path.join(stateDir, "leases.json")))
        second = self._service(stateDir, clock)
        assert second.router is not None
        self.assertEqual(second.router.leases.ownerOf("app"), "owner-a")
        self.assertIsNone(second.router.leases.route("app"))

    def test_unreadableLeaseFileIgnored(self) -> None:
        """
        A corrupt lease file is logged and ignored rather than stopping the relay.
        """
        stateDir = os.path.abspath(self.mktemp())
        os.makedirs(stateDir)
        with open(os.path.join(stateDir, "leases.json"), "w") as f:
            f.write("{not json")
        service = self._service(stateDir, Clock())
        assert service.router is not None
        self.assertEqual(len(service.router.leases), 0)
        self.assertEqual(len(self.flushLoggedErrors()), 0)


class RelayStartTests(SynchronousTestCase):
    """
    A relay whose listeners cannot start does not keep running.
    """

    def test_listenFailureStopsReactor(self) -> None:
        """
        When a listener fails before the reactor runs (as under twistd), the failure is logged and the
        reactor is stopped as soon as it runs.
        """
        reactor = MemoryReactorClock()
        config = RelayConfig(stateDir=os.path.abspath(self.mktemp()), public="tcp:notaport")
        service = RelayService(config, reactor)
        service.startService()
        self.failureResultOf(service.whenListening(), ValueError)
        self.assertIn(reactor.stop, [hook for hook, _, _ in reactor.whenRunningHooks])
        self.assertTrue(self.flushLoggedErrors())


class RelayOptionsTests(SynchronousTestCase):
    """
    C{twistd portal-relay} options.
    """

    def test_defaults(self) -> None:
        """
        Without options the relay listens on the design's default ports for the C{localhost} domains.
        """
        options = Options()
        options.parseOptions([])
        config = options.config()
        self.assertEqual(
            (config.public, config.control, config.http), ("tcp:8443", "tcp:4017", None)
        )
        self.assertEqual((config.domain, config.tunnelDomain), ("localhost", "localhost"))

    def test_limits(self) -> None:
        """
        Limit options reach the relay's L{RelayLimits}; non-positive values are usage errors.
        """
        options = Options()
        options.parseOptions(["--lease-ttl", "30", "--max-idle-data", "8"])
        self.assertEqual(options.config().limits.leaseTTL, 30.0)
        self.assertEqual(options.config().limits.maxIdleData, 8)
        self.assertRaises(usage.UsageError, Options().parseOptions, ["--lease-ttl", "0"])

    def test_livenessOptions(self) -> None:
        """
        C{--control-idle-timeout} and C{--shutdown-grace} reach the configuration; both must be
        positive.
        """
        options = Options()
        options.parseOptions(["--control-idle-timeout", "90", "--shutdown-grace", "3"])
        self.assertEqual(options.config().limits.controlIdleTimeout, 90.0)
        self.assertEqual(options.config().shutdownGrace, 3.0)
        for flag in ("--control-idle-timeout", "--shutdown-grace"):
            self.assertRaises(usage.UsageError, Options().parseOptions, [flag, "0"])

    def test_badEndpoint(self) -> None:
        """
        A malformed endpoint description is a usage error naming the option.
        """
        error = self.assertRaises(
            usage.UsageError, Options().parseOptions, ["--control", "tcp:notaport"]
        )
        self.assertIn("--control", str(error))

    def test_udpPorts(self) -> None:
        """
        C{--udp-ports LO-HI} turns UDP mode on with that range; a bad range is a usage error.
        """
        options = Options()
        options.parseOptions(["--udp-ports", "30000-30003"])
        config = options.config()
        self.assertEqual((config.udpPorts.low, config.udpPorts.high), (30000, 30003))
        self.assertIsNone(config.tcpPorts)
        error = self.assertRaises(usage.UsageError, Options().parseOptions, ["--udp-ports", "9-1"])
        self.assertTrue(str(error).startswith("--udp-ports 9-1:"), str(error))

    def test_tcpPorts(self) -> None:
        """
        C{--tcp-ports LO-HI} turns raw TCP mode on with that range; without it the mode is off.
        """
        options = Options()
        options.parseOptions(["--tcp-ports", "20000-20009", "--max-ports-per-identity", "3"])
        config = options.config()
        self.assertEqual((config.tcpPorts.low, config.tcpPorts.high), (20000, 20009))
        self.assertEqual(config.maxPortsPerIdentity, 3)
        options = Options()
        options.parseOptions([])
        self.assertIsNone(options.config().tcpPorts)

    def test_badTCPPorts(self) -> None:
        """
        A malformed range is a usage error naming the option.
        """
        for text in ("20000", "9000-8000", "0-10", "1-70000", "a-b"):
            error = self.assertRaises(
                usage.UsageError, Options().parseOptions, ["--tcp-ports", text]
            )
            self.assertTrue(str(error).startswith(f"--tcp-ports {text}:"), str(error))

    def test_allowHop(self) -> None:
        """
        C{--allow-hop HOST:PORT} (repeatable) lists the hop destinations, lowercased and without
        duplicates; C{--max-hops-per-identity} sets the limit (256 by default); without
        C{--allow-hop} the list is empty, so the relay forwards no hops.
        """
        options = Options()
        options.parseOptions(
            [
                "--allow-hop",
                "Relay-B.example:4017",
                "--allow-hop",
                "[::1]:4018",
                "--allow-hop",
                "relay-b.example:4017",
                "--max-hops-per-identity",
                "8",
            ]
        )
        config = options.config()
        self.assertEqual(config.allowHops, (("relay-b.example", 4017), ("::1", 4018)))
        self.assertEqual(config.maxHopsPerIdentity, 8)
        options = Options()
        options.parseOptions([])
        self.assertEqual(
            (options.config().allowHops, options.config().maxHopsPerIdentity), ((), 256)
        )

    def test_badAllowHop(self) -> None:
        """
        A malformed C{--allow-hop} is a usage error naming the option.
        """
        for text in ("relay", "relay:0", "::1:4017"):
            error = self.assertRaises(
                usage.UsageError, Options().parseOptions, ["--allow-hop", text]
            )
            self.assertIn(f"--allow-hop {text!r}", str(error))
        self.assertRaises(
            usage.UsageError, Options().parseOptions, ["--max-hops-per-identity", "0"]
        )


class FakeVisitor:
    """
    An open visitor connection, as the router tracks it.
    """

    def __init__(self) -> None:
        self.transport = StringTransport()


class FakeControl:
    """
    A control session that records L{goingAway}.
    """

    def __init__(self) -> None:
        self.transport = StringTransport()
        self.told: list[float] = []

    def goingAway(self, deadline: float) -> None:
        """
        Record the deadline.
        """
        self.told.append(deadline)


class GracefulShutdownTests(SynchronousTestCase):
    """
    Stopping the relay (SIGTERM under twistd) stops accepting, tells the tunnels, lets open
    connections finish up to a deadline, then closes the rest.
    """

    def setUp(self) -> None:
        """
        Start a relay on a memory reactor, with one tunnel and one visitor connected.
        """
        self.reactor = MemoryReactorClock()
        config = RelayConfig(
            stateDir=os.path.abspath(self.mktemp()), http="tcp:0", shutdownGrace=5.0
        )
        self.service = RelayService(config, self.reactor)
        self.service.startService()
        self.successResultOf(self.service.whenListening())
        router = self.service.router
        assert router is not None
        self.router = router
        self.control = FakeControl()
        self.visitor = FakeVisitor()
        router.controls.add(self.control)
        router.visitors.add(self.visitor)
        #: Listeners stopped, in order.
        self.stopped: list[str] = []
        for name, port in self.service.ports.items():
            self.patch(port, "stopListening", lambda name=name: self.stopped.append(name))

    def test_stopsAcceptingAndTellsTunnels(self) -> None:
        """
        At once: the public and HTTP listeners stop and every tunnel is told the deadline; the
        control listener stays up (visitors already in still need data sessions) but new control
        sessions are refused.
        """
        stopping = self.service.stopService()
        self.assertNoResult(stopping)
        self.assertEqual(sorted(self.stopped), ["http", "public"])
        self.assertTrue(self.router.closing)
        self.assertEqual(self.control.told, [5.0])
        self.assertFalse(self.visitor.transport.disconnecting)

    def test_finishesWhenConnectionsClose(self) -> None:
        """
        When the last open connection closes within the grace period, the relay finishes stopping:
        control listener closed, control sessions closed, nothing aborted.
        """
        stopping = self.service.stopService()
        self.reactor.advance(2.0)
        self.assertNoResult(stopping)
        self.router.visitors.discard(self.visitor)
        self.reactor.advance(DRAIN_POLL)
        self.successResultOf(stopping)
        self.assertIn("control", self.stopped)
        self.assertTrue(self.control.transport.disconnecting)
        self.assertFalse(self.visitor.transport.disconnecting)

    def test_deadline(self) -> None:
        """
        Connections still open at the deadline are closed, and the relay finishes stopping.
        """
        stopping = self.service.stopService()
        self.reactor.advance(5.0 - DRAIN_POLL)
        self.assertNoResult(stopping)
        self.assertFalse(self.visitor.transport.disconnecting)
        self.reactor.advance(DRAIN_POLL)
        self.successResultOf(stopping)
        self.assertTrue(self.visitor.transport.disconnecting)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_noConnectionsNoWait(self) -> None:
        """
        With no open connection the relay stops at once.
        """
        self.router.visitors.clear()
        self.successResultOf(self.service.stopService())


class HopRegistryTests(SynchronousTestCase):
    """
    C{--allow-hop-registry}: the relays of a registry are allowed hop destinations too.
    """

    def _start(self, registry: bytes, allowHops: tuple[tuple[str, int], ...] = ()) -> RelayService:
        """
        Start a relay on a memory reactor with a registry file holding C{registry}.
        """
        path = os.path.abspath(self.mktemp())
        with open(path, "wb") as f:
            f.write(registry)
        config = RelayConfig(
            stateDir=os.path.abspath(self.mktemp()), allowHops=allowHops, allowHopRegistry=path
        )
        service = RelayService(config, MemoryReactorClock())
        service.startService()
        return service

    def test_registryRelaysAllowed(self) -> None:
        """
        Every registry relay's control address is allowed, besides the C{--allow-hop} ones.
        """
        relays = [
            {"address": "relay-b.example:4017", "id": Identity.generate().id, "modes": ["stream"]},
            {"address": "[2001:db8::7]:4018", "id": Identity.generate().id, "modes": ["tcp"]},
        ]
        registry = json.dumps({"version": 1, "relays": relays}).encode()
        service = self._start(registry, allowHops=(("relay-c.example", 4017),))
        self.successResultOf(service.whenListening())
        assert service.router is not None
        self.assertEqual(
            service.router.hops.allowed,
            {("relay-b.example", 4017), ("2001:db8::7", 4018), ("relay-c.example", 4017)},
        )

    def test_badRegistryStopsStart(self) -> None:
        """
        A registry that cannot be read stops the relay with the registry's error, rather than
        starting with a different allow list than the operator asked for.
        """
        service = self._start(b"{not json")
        failure = self.failureResultOf(service.whenListening(), RegistryError)
        self.assertIn("not valid JSON", failure.getErrorMessage())
        self.assertTrue(self.flushLoggedErrors(RegistryError))

    def test_option(self) -> None:
        """
        C{--allow-hop-registry} reaches the configuration; without it there is none.
        """
        options = Options()
        options.parseOptions(["--allow-hop-registry", "relays.json"])
        self.assertEqual(options.config().allowHopRegistry, "relays.json")
        options = Options()
        options.parseOptions([])
        self.assertIsNone(options.config().allowHopRegistry)
