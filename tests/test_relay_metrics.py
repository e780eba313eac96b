"""
Tests for the relay's metrics: L{portal.relay.metrics}, the histograms the data pool and control
sessions observe, the byte meters of L{portal.forwarding.meter} in both splices, and C{/metrics}.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from portal.forwarding.meter import ByteMeter
from portal.relay.router import DataPool
from portal.relay.site import Metrics
from portal.wire.control import Challenge
from tests.metricstext import metricValues
from tests.test_control import LABEL, ClientTestCase
from tests.test_kernelsplice import KernelSpliceTestCase
from tests.test_relay_public import _KEY, LeaseHolder, RelayHarness, clientHello


class ByteMeterTests(SynchronousTestCase):
    """
    L{ByteMeter} adds to a shared counter and reports the first byte once.
    """

    def test_countsAndFirstByte(self) -> None:
        """
        Counts add up in the shared table; the first-byte callback runs once, on the first non-empty
        count.
        """
        counters: dict[str, int] = {}
        firsts: list[int] = []
        meter = ByteMeter(counters, "bytes", lambda: firsts.append(counters["bytes"]))
        self.assertEqual(counters, {"bytes": 0})
        meter.count(0)
        self.assertEqual(firsts, [])
        meter.count(5)
        meter.count(7)
        self.assertEqual(counters["bytes"], 12)
        self.assertEqual(firsts, [5])


class KernelSpliceMeterTests(KernelSpliceTestCase):
    """
    The kernel splice tells its meters what it moved, without the bytes passing through Python.
    """

    @inlineCallbacks
    def test_metered(self) -> Any:
        """
        Bytes moved each way are counted in their own counter (the prefix is not the visitor's and is
        not counted); the first byte back is reported.
        """
        counters: dict[str, int] = {}
        firsts: list[str] = []
        rig = self.rig(start=False)
        rig.splice._a.outgoing.meter = ByteMeter(counters, "up")
        rig.splice._b.outgoing.meter = ByteMeter(counters, "down", lambda: firsts.append("down"))
        rig.splice.start()
        rig.visitorOuter.tcpTransport.write(b"hello")
        yield rig.dataOuter.whenReceived(len(b"HEADERhello"))
        self.assertEqual(firsts, [])
        rig.dataOuter.tcpTransport.write(b"world!")
        yield rig.visitorOuter.whenReceived(len(b"world!"))
        self.assertEqual(counters, {"up": 5, "down": 6})
        self.assertEqual(firsts, ["down"])


class PoolMetricsTests(RelayHarness):
    """
    A data pool made with the router's metrics observes each visitor's wait and time to first byte,
    and counts the bytes it moves.
    """

    def setUp(self) -> None:
        """
        Replace the harness's pool by one that reports to the router's counters and metrics.
        """
        super().setUp()
        self.pool = DataPool(
            self.owner,
            _KEY,
            self.limits,
            counters=self.router.counters,
            metrics=self.router.metrics,
        )
        self.router.sessions[self.sessionId] = self.pool
        self.router.leases.release("app", "owner-id")
        self.router.leases.register("app", "owner-id", LeaseHolder(self.pool))

    def values(self) -> dict[str, float]:
        """
        @return: The relay's metrics, as C{/metrics} renders them.
        """
        text = Metrics(self.router).render_GET(DummyRequest([b"metrics"])).decode()
        return metricValues(text)

    def test_waitAndFirstByte(self) -> None:
        """
        A visitor that waits 0.25 s for a data session is observed with that wait; its time to first
        byte runs from its acceptance to the first byte from the tunnel; bytes are counted each way.
        """
        hello = clientHello("app.localhost")
        visitor, visitorTransport = self.visitor()
        self.clock.advance(0.5)
        visitor.dataReceived(hello)
        self.clock.advance(0.25)
        session, _, _ = self.attached()
        visitor.dataReceived(b"request")
        self.clock.advance(0.125)
        session.dataReceived(b"response!")
        self.assertEqual(visitorTransport.value(), b"response!")
        values = self.values()
        self.assertEqual(values["portal_relay_data_wait_seconds_count"], 1)
        self.assertEqual(values["portal_relay_data_wait_seconds_sum"], 0.25)
        self.assertEqual(values["portal_relay_first_byte_seconds_count"], 1)
        self.assertEqual(values["portal_relay_first_byte_seconds_sum"], 0.875)
        self.assertEqual(values["portal_relay_bytes_to_visitors_total"], len(b"response!"))
        self.assertEqual(values["portal_relay_bytes_to_tunnels_total"], len(b"request"))
        session.dataReceived(b"more")
        self.assertEqual(self.values()["portal_relay_first_byte_seconds_count"], 1)

    def test_idleSessionNoWait(self) -> None:
        """
        A visitor paired with an idle data session waited 0 s, observed as such.
        """
        self.attached()
        visitor, _ = self.visitor()
        visitor.dataReceived(clientHello("app.localhost"))
        values = self.values()
        self.assertEqual(values["portal_relay_data_wait_seconds_count"], 1)
        self.assertEqual(values["portal_relay_data_wait_seconds_sum"], 0)
        self.assertEqual(self.pool.paired, 1)

    def test_abandonedNotObserved(self) -> None:
        """
        A visitor that leaves while waiting is not observed as a wait.
        """
        visitor, transport = self.visitor()
        visitor.dataReceived(clientHello("app.localhost"))
        transport.loseConnection()
        self.attached()
        self.assertEqual(self.values()["portal_relay_data_wait_seconds_count"], 0)

    def test_countersAndGauges(self) -> None:
        """
        C{/metrics} keeps the names of the relay's former hand-written metrics, exports every
        counter of the router's table (one added later too), and has typed, described families.
        """
        self.router.counters["refused_example"] = 3
        visitor, _ = self.visitor()
        visitor.dataReceived(clientHello("app.localhost"))
        text = Metrics(self.router).render_GET(DummyRequest([b"metrics"])).decode()
        values = metricValues(text)
        for name in (
            "portal_relay_leases",
            "portal_relay_control_sessions",
            "portal_relay_idle_data_sessions",
            "portal_relay_hops_open",
            "portal_relay_visitors_total",
            "portal_relay_routed_total",
            "portal_relay_unknown_total",
            "portal_relay_refused_total",
            "portal_relay_timeouts_total",
            "portal_relay_kernel_spliced_total",
            "portal_relay_python_spliced_total",
            "portal_relay_waited_total",
            "portal_relay_hops_opened_total",
        ):
            self.assertIn(name, values)
        self.assertEqual(values["portal_relay_refused_example_total"], 3)
        self.assertEqual(values["portal_relay_waiting_visitors"], 1)
        self.assertEqual(values["portal_relay_open_visitors"], 1)
        self.assertEqual(values["portal_relay_live_leases"], 1)
        self.assertIn("# TYPE portal_relay_visitors_total counter", text)
        self.assertIn("# TYPE portal_relay_data_wait_seconds histogram", text)
        self.assertIn('portal_relay_info{version="0.1.0"} 1.0', text)

    def test_limitRefusals(self) -> None:
        """
        What the relay's limits refused (the router's refusals) is exported by reason as
        C{portal_refusals_total}; before any refusal the family is there, empty.
        """
        text = Metrics(self.router).render_GET(DummyRequest([b"metrics"])).decode()
        self.assertIn("# TYPE portal_refusals_total counter", text)
        self.assertNotIn("portal_refusals_total{", text)
        for reason in ("connections_per_source", "connections_per_source", "register_rate"):
            self.router.refusals.count(reason)
        text = Metrics(self.router).render_GET(DummyRequest([b"metrics"])).decode()
        self.assertIn('portal_refusals_total{reason="connections_per_source"} 2.0', text)
        self.assertIn('portal_refusals_total{reason="register_rate"} 1.0', text)

    def test_uptime(self) -> None:
        """
        The uptime gauge runs from the router's creation by its clock.
        """
        self.clock.advance(42)
        self.assertEqual(self.values()["portal_relay_uptime_seconds"], 42)


class RegistrationMetricsTests(ClientTestCase):
    """
    The registration histogram runs from a registration challenge to the leases being granted.
    """

    def test_registrationTime(self) -> None:
        """
        A registration answered 1.5 s after its challenge is observed as 1.5 s; a hop challenge or a
        refused registration observes nothing.
        """
        self.hello()
        nonce = self.challenge([LABEL])
        self.clock.advance(1.5)
        self.register([LABEL], nonce)
        self.call(Challenge, names=[], purpose="hop")
        self.register([LABEL], nonce)
        values = metricValues(self.router.metrics.render().decode())
        self.assertEqual(values["portal_relay_registration_seconds_count"], 1)
        self.assertEqual(values["portal_relay_registration_seconds_sum"], 1.5)
