"""
Tests for L{portal.relay.service}: the relay's state directory and lease persistence.
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.error import CannotListenError
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from portal.registry.document import RegistryError
from portal.relay.etcd import EtcdUnavailable
from portal.relay.ports import PortRange
from portal.relay.router import RelayLimits
from portal.relay.service import DRAIN_POLL, RelayConfig, RelayService
from portal.relay.sqlitestore import STORE_FILE
from portal.relay.statelock import StateDirectoryLocked
from portal.relay.store import StoreDamaged
from portal.tap.relay import Options, exitIfStartFailed
from portal.trust.identity import Identity


class RelayStateTests(SynchronousTestCase):
    """
    What the relay keeps in C{--state-dir}.
    """

    def _service(self, stateDir: str, clock: Clock) -> RelayService:
        """
        A relay service on C{stateDir} whose router is built but which listens nowhere; it is
        stopped (store closed, directory unlocked) when the test ends, unless stopped before.
        """
        service = RelayService(RelayConfig(stateDir=stateDir), clock)
        service.router, _ = service._buildRouter()
        self.addCleanup(service.stopService)
        return service

    def test_identityAndCertificateKept(self) -> None:
        """
        The relay creates its identity and TLS CA on first start, private files 0600, and reuses them.
        """
        stateDir = os.path.abspath(self.mktemp())
        clock = Clock()
        first = self._service(stateDir, clock)
        first.stopService()
        second = self._service(stateDir, clock)
        assert first.router is not None and second.router is not None
        self.assertEqual(first.router.identity.id, second.router.identity.id)
        for name in ("identity.json", os.path.join("tls", "ca-key.pem"), STORE_FILE):
            self.assertEqual(os.stat(os.path.join(stateDir, name)).st_mode & 0o777, 0o600)
        self.assertEqual(os.stat(stateDir).st_mode & 0o777, 0o700)

    def test_leaseOwnershipSurvivesRestart(self) -> None:
        """
        A registration is in the store at once; after a restart the name still belongs to its
        owner, detached until the owner's tunnel registers again.
        """
        stateDir = os.path.abspath(self.mktemp())
        clock = Clock()
        clock.advance(1000)
        first = self._service(stateDir, clock)
        assert first.router is not None
        first.router.leases.register("app", "owner-a", object())
        self.assertEqual(clock.getDelayedCalls(), [])
        first.stopService()
        second = self._service(stateDir, clock)
        assert second.router is not None
        self.assertEqual(second.router.leases.ownerOf("app"), "owner-a")
        self.assertIsNone(second.router.leases.route("app"))

    def test_reservationRules(self) -> None:
        """
        The relay's lease table and port allocators get the reservation rules of its limits: a
        name (or port) held less than C{reserveAfter} is not reserved, and port reservations have
        the lease lifetime as their grace period.
        """
        config = RelayConfig(
            stateDir=os.path.abspath(self.mktemp()),
            tcpPorts=PortRange(9000, 9001),
            limits=RelayLimits(leaseTTL=30.0, reservation=100.0, reserveAfter=50.0),
        )
        service = RelayService(config, Clock())
        router, _ = service._buildRouter()
        self.addCleanup(service.stopService)
        self.assertEqual(
            (router.leases.ttl, router.leases.reservation, router.leases.reserveAfter),
            (30.0, 100.0, 50.0),
        )
        assert router.tcp is not None
        allocator = router.tcp.allocator
        self.assertEqual(
            (allocator.reservation, allocator.reserveAfter, allocator.grace, allocator.kind),
            (100.0, 50.0, 30.0, "tcp"),
        )

    def test_portsSurviveRestart(self) -> None:
        """
        A raw TCP lease's port is in the store at once, and reserved for its key after a restart.
        """
        stateDir = os.path.abspath(self.mktemp())
        config = RelayConfig(stateDir=stateDir, tcpPorts=PortRange(9000, 9009))
        first = RelayService(config, Clock())
        router, _ = first._buildRouter()
        assert router.tcp is not None
        self.assertEqual(router.tcp.allocator.allocate("owner-a", "ssh"), 9000)
        first.stopService()
        second = RelayService(config, Clock())
        router, _ = second._buildRouter()
        self.addCleanup(second.stopService)
        assert router.tcp is not None
        self.assertEqual(router.tcp.allocator.portFor("owner-a", "ssh"), 9000)
        self.assertIsNone(router.tcp.allocator.owner(9000))

    def test_leasesJSONMigrated(self) -> None:
        """
        An earlier relay's C{leases.json} is imported into the store at start and renamed, so
        that its names keep their owners.
        """
        stateDir = os.path.abspath(self.mktemp())
        os.makedirs(stateDir)
        clock = Clock()
        clock.advance(1000)
        with open(os.path.join(stateDir, "leases.json"), "w") as f:
            json.dump({"version": 1, "leases": {"app": {"owner": "a" * 52, "expiresAt": 990}}}, f)
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        service = self._service(stateDir, clock)
        assert service.router is not None
        self.assertEqual(service.router.leases.ownerOf("app"), "a" * 52)
        self.assertFalse(os.path.exists(os.path.join(stateDir, "leases.json")))
        self.assertTrue(os.path.exists(os.path.join(stateDir, "leases.json.migrated")))
        self.assertIn(
            f"imported 1 lease names from {stateDir}/leases.json into the lease store (renamed "
            f"to {stateDir}/leases.json.migrated)",
            [formatEvent(event) for event in events],
        )


class RelayStartTests(SynchronousTestCase):
    """
    A relay that cannot start says why in one line, is marked failed and does not keep running.
    """

    def start(self, config: RelayConfig, reactor: Any = None) -> RelayService:
        """
        Start a relay service on a memory reactor; it is stopped when the test ends.
        """
        service = RelayService(config, reactor or MemoryReactorClock())
        service.startService()
        self.addCleanup(service.stopService)
        return service

    def assertOneLine(self, service: RelayService, events: list[Any], reason: str) -> None:
        """
        The service failed to start, logging C{reason} in one critical event and no traceback,
        and stops the reactor as soon as it runs.
        """
        self.assertIsNotNone(service.startFailure)
        critical = [event for event in events if event["log_level"] == LogLevel.critical]
        self.assertEqual(
            [formatEvent(event) for event in critical], [f"portal-relay cannot start: {reason}"]
        )
        self.assertEqual(self.flushLoggedErrors(), [])
        reactor = service._reactor
        self.assertIn(reactor.stop, [hook for hook, _, _ in reactor.whenRunningHooks])

    def test_listenFailureStopsReactor(self) -> None:
        """
        When a listener fails before the reactor runs (as under twistd) for a reason that looks
        like a bug, the failure is logged with its traceback and the reactor is stopped as soon as
        it runs.
        """
        reactor = MemoryReactorClock()
        config = RelayConfig(stateDir=os.path.abspath(self.mktemp()), public="tcp:notaport")
        service = self.start(config, reactor)
        self.failureResultOf(service.whenListening(), ValueError)
        self.assertIn(reactor.stop, [hook for hook, _, _ in reactor.whenRunningHooks])
        self.assertTrue(self.flushLoggedErrors())
        self.assertIsNotNone(service.startFailure)

    def test_busyPort(self) -> None:
        """
        A port that cannot be bound stops the relay with one line naming it, without a traceback.
        """
        reactor = MemoryReactorClock()

        def busy(port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
            """
            Fail as a port another program holds does.
            """
            raise CannotListenError(interface, port, OSError(98, "Address already in use"))

        self.patch(reactor, "listenTCP", busy)
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        config = RelayConfig(
            stateDir=os.path.abspath(self.mktemp()), public="tcp:8443:interface=127.0.0.1"
        )
        service = self.start(config, reactor)
        self.failureResultOf(service.whenListening(), CannotListenError)
        self.assertOneLine(
            service,
            list(events),
            "Couldn't listen on 127.0.0.1:8443: [Errno 98] Address already in use.",
        )

    def test_damagedStore(self) -> None:
        """
        A damaged lease store stops the relay with one line naming the file and how to recover;
        the file is left as it was.
        """
        stateDir = os.path.abspath(self.mktemp())
        os.makedirs(stateDir)
        path = os.path.join(stateDir, STORE_FILE)
        with open(path, "wb") as f:
            f.write(b"garbage" * 1000)
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        service = self.start(RelayConfig(stateDir=stateDir))
        failure = self.failureResultOf(service.whenListening(), StoreDamaged)
        self.assertOneLine(service, list(events), failure.getErrorMessage())
        self.assertIn(path, failure.getErrorMessage())
        self.assertIsNone(service.router)
        with open(path, "rb") as f:
            self.assertEqual(f.read(), b"garbage" * 1000)

    def test_missingStore(self) -> None:
        """
        A relay that has run before (its identity exists) whose lease store is missing stops
        with one line naming the file and how to recover, rather than start over an empty one;
        with C{newLeaseStore} (C{--new-lease-store}) it starts on a new store.
        """
        stateDir = os.path.abspath(self.mktemp())
        first = self.start(RelayConfig(stateDir=stateDir))
        self.successResultOf(first.whenListening())
        self.successResultOf(first.stopService())
        os.remove(os.path.join(stateDir, STORE_FILE))
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        service = self.start(RelayConfig(stateDir=stateDir))
        failure = self.failureResultOf(service.whenListening(), StoreDamaged)
        self.assertOneLine(service, list(events), failure.getErrorMessage())
        self.assertIn(os.path.join(stateDir, STORE_FILE), failure.getErrorMessage())
        self.assertIn("--new-lease-store", failure.getErrorMessage())
        self.assertFalse(os.path.exists(os.path.join(stateDir, STORE_FILE)))
        self.successResultOf(service.stopService())
        again = self.start(RelayConfig(stateDir=stateDir, newLeaseStore=True))
        self.successResultOf(again.whenListening())
        self.assertTrue(os.path.exists(os.path.join(stateDir, STORE_FILE)))

    def test_lockedStateDirectory(self) -> None:
        """
        A second relay on a state directory in use stops with one line naming the process that
        holds it, and leaves the first one's state alone.
        """
        config = RelayConfig(stateDir=os.path.abspath(self.mktemp()))
        first = self.start(config)
        self.successResultOf(first.whenListening())
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        second = self.start(config)
        failure = self.failureResultOf(second.whenListening(), StateDirectoryLocked)
        self.assertIn(f"(process {os.getpid()})", failure.getErrorMessage())
        self.assertOneLine(second, list(events), failure.getErrorMessage())
        assert first.router is not None
        first.router.leases.register("app", "owner-a", object())
        self.assertEqual(first.router.leases.ownerOf("app"), "owner-a")

    def test_etcdUnavailable(self) -> None:
        """
        A cluster member that cannot reach etcd at start stops with one line saying so.
        """
        unavailable = EtcdUnavailable("etcd unavailable (connection refused)")
        self.patch(RelayService, "_joinCluster", lambda self, router, control: fail(unavailable))
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        config = RelayConfig(stateDir=os.path.abspath(self.mktemp()), cluster="etcd://127.0.0.1:1")
        service = self.start(config)
        self.failureResultOf(service.whenListening(), EtcdUnavailable)
        self.assertOneLine(service, list(events), "etcd unavailable (connection refused)")

    def test_nothingBeforeJoining(self) -> None:
        """
        A cluster member reads no visitor from its public port and refuses registrations ("cluster
        store unavailable") until it has joined the cluster; then it reads visitors.
        """
        joined: Deferred[None] = Deferred()
        self.patch(RelayService, "_joinCluster", lambda self, router, control: joined)
        reading: list[str] = []
        original = RelayService._listen

        def listen(service: RelayService, description: str, factory: Any, steer: bool = False):
            d = original(service, description, factory, steer)

            def record(port: Any) -> Any:
                if factory.limiter.listener == "public":
                    port.stopReading = lambda: reading.append("stop")
                    port.startReading = lambda: reading.append("start")
                return port

            return d.addCallback(record)

        self.patch(RelayService, "_listen", listen)
        config = RelayConfig(stateDir=os.path.abspath(self.mktemp()), cluster="etcd://127.0.0.1:1")
        service = self.start(config)
        self.assertNoResult(service.whenListening())
        self.assertEqual(reading, ["stop"])
        assert service.router is not None
        self.assertIn("cluster store unavailable", service.router.claims.mayRegister() or "")
        joined.callback(None)
        self.successResultOf(service.whenListening())
        self.assertEqual(reading, ["stop", "start"])

    def test_exitIfStartFailed(self) -> None:
        """
        Under twistd, a relay that could not start ends the process with exit code 1 once the
        reactor has shut down; one that started is left to exit as twistd does.
        """
        exits: list[int] = []
        self.patch(os, "_exit", exits.append)
        config = RelayConfig(stateDir=os.path.abspath(self.mktemp()))
        started = self.start(config)
        exitIfStartFailed(started)
        self.assertEqual(exits, [])
        failed = self.start(config)
        self.flushLoggedErrors()
        exitIfStartFailed(failed)
        self.assertEqual(exits, [1])


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

    def test_reserveAfter(self) -> None:
        """
        C{--reserve-after} reaches the limits (ten minutes by default) and must be positive.
        """
        options = Options()
        options.parseOptions([])
        self.assertEqual(options.config().limits.reserveAfter, 600.0)
        options.parseOptions(["--reserve-after", "90"])
        self.assertEqual(options.config().limits.reserveAfter, 90.0)
        self.assertRaises(usage.UsageError, Options().parseOptions, ["--reserve-after", "0"])

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
        A registry that cannot be read stops the relay with the registry's error in one line,
        rather than starting with a different allow list than the operator asked for.
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        service = self._start(b"{not json")
        failure = self.failureResultOf(service.whenListening(), RegistryError)
        self.assertIn("not valid JSON", failure.getErrorMessage())
        self.assertIn(
            f"portal-relay cannot start: {failure.getErrorMessage()}",
            [formatEvent(event) for event in events],
        )

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
