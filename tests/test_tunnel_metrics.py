"""
Tests for the tunnel's metrics (L{portal.tunnel.metrics}), C{portal expose --metrics} and
C{--log-format}.
"""

from __future__ import annotations

from twisted.internet.error import CannotListenError
from twisted.internet.testing import EventLoggingObserver, MemoryReactor, RaisingMemoryReactor
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from portal.cli.exposeoptions import TunnelOptions
from portal.gateway.loopback import EndpointAddressError
from portal.tap.tunnel import Options as TwistdTunnelOptions
from portal.tunnel.config import parseMetricsAddress
from portal.tunnel.metrics import MetricsService, TunnelMetrics, metricsSite
from tests.metricstext import metricValues


def get(metrics: TunnelMetrics, path: bytes) -> tuple[int, bytes]:
    """
    GET C{path} from the metrics site.

    @return: The status and body.
    """
    resource = metricsSite(metrics).resource.getChildWithDefault(path, DummyRequest([path]))
    request = DummyRequest([path])
    body = resource.render(request)
    return request.responseCode or 200, body


class TunnelMetricsTests(SynchronousTestCase):
    """
    L{TunnelMetrics} follows the reporter's events.
    """

    def test_leases(self) -> None:
        """
        A lease makes its relay live, a disconnection makes it not; C{/healthz} is 200 only with a
        live relay; every event is counted by kind.
        """
        metrics = TunnelMetrics(lambda: 7)
        self.assertEqual(get(metrics, b"healthz")[0], 503)
        metrics.observe({"event": "lease", "relay": "a:4017", "url": "https://x.localhost"})
        metrics.observe({"event": "lease", "relay": "b:4017", "url": "https://x.localhost"})
        metrics.observe({"event": "disconnected", "relay": "a:4017", "message": "lost"})
        self.assertEqual(metrics.liveRelays, {"b:4017"})
        self.assertEqual(get(metrics, b"healthz"), (200, b"ok: live on 1 relays\n"))
        status, body = get(metrics, b"metrics")
        values = metricValues(body.decode())
        self.assertEqual(values["portal_tunnel_relays_live"], 1)
        self.assertEqual(values["portal_tunnel_streams_total"], 7)
        self.assertIn('portal_tunnel_events_total{event="lease"} 2.0', body.decode())
        metrics.observe({"event": "fatal", "relay": "", "message": "stopping"})
        self.assertEqual(metrics.liveRelays, set())

    def test_requests(self) -> None:
        """
        Routed HTTP requests are counted by status class, their bytes summed and their duration
        observed.
        """
        metrics = TunnelMetrics()
        for status, size, ms in ((200, 100, 5.0), (404, 10, 1.0), (201, 1, 2000.0)):
            metrics.observe({"event": "request", "status": status, "bytes": size, "ms": ms})
        body = metrics.render().decode()
        values = metricValues(body)
        self.assertIn('portal_tunnel_requests_total{status="2xx"} 2.0', body)
        self.assertIn('portal_tunnel_requests_total{status="4xx"} 1.0', body)
        self.assertEqual(values["portal_tunnel_response_bytes_total"], 111)
        self.assertEqual(values["portal_tunnel_request_seconds_count"], 3)
        self.assertAlmostEqual(values["portal_tunnel_request_seconds_sum"], 2.006)


class MetricsListenerTests(SynchronousTestCase):
    """
    The listener's address and service.
    """

    def test_loopbackOnly(self) -> None:
        """
        C{--metrics} takes a port or a loopback address; any other address is refused with the
        reason.
        """
        self.assertEqual(parseMetricsAddress("9090"), ("127.0.0.1", 9090))
        self.assertEqual(parseMetricsAddress("[::1]:9090"), ("::1", 9090))
        e = self.assertRaises(EndpointAddressError, parseMetricsAddress, "0.0.0.0:9090")
        self.assertIn("never listens on a public interface", str(e))

    def test_service(self) -> None:
        """
        The service listens on the loopback address while running and stops listening after.
        """
        reactor = MemoryReactor()
        service = MetricsService(reactor, TunnelMetrics(), ("127.0.0.1", 9090))
        service.startService()
        ((port, _, _, interface),) = reactor.tcpServers
        self.assertEqual((port, interface), (9090, "127.0.0.1"))
        self.assertIsNotNone(service.port)
        service.stopService()
        self.assertIsNone(service.port)

    def test_cannotListen(self) -> None:
        """
        A listener that cannot start is logged with the address and the reason; the tunnel runs on
        without it.
        """
        events = EventLoggingObserver.createWithCleanup(
            self,  # type: ignore[arg-type]
            globalLogPublisher,
        )
        reactor = RaisingMemoryReactor(listenException=CannotListenError("127.0.0.1", 9090, "busy"))
        service = MetricsService(reactor, TunnelMetrics(), ("127.0.0.1", 9090))
        service.startService()
        self.assertIsNone(service.port)
        texts = [formatEvent(e) for e in events if e["log_level"] == LogLevel.error]
        self.assertEqual(len(texts), 1)
        self.assertIn("tunnel metrics: cannot listen on 127.0.0.1:9090", texts[0])
        self.assertIn("busy", texts[0])
        self.assertIsNone(self.successResultOf(service.stopService()))

    def test_options(self) -> None:
        """
        C{portal expose --metrics} is parsed to an address; a public address or an unknown log
        format is a usage error; under twistd C{--log-format json} points at twistd's C{--logger}.
        """
        options = TunnelOptions()
        options.parseOptions(["8000", "--metrics", "9191", "--log-format", "json"])
        self.assertEqual(options.tunnelConfig.metrics, ("127.0.0.1", 9191))
        self.assertEqual(options.tunnelConfig.logFormat, "json")
        for argv, message in [
            (["8000", "--metrics", "192.0.2.1:9090"], "loopback"),
            (["8000", "--log-format", "xml"], "expected text or json"),
        ]:
            e = self.assertRaises(usage.UsageError, TunnelOptions().parseOptions, argv)
            self.assertIn(message, str(e))
        e = self.assertRaises(
            usage.UsageError, TwistdTunnelOptions().parseOptions, ["8000", "--log-format", "json"]
        )
        self.assertIn("twistd --logger portal.cli.jsonlog.observer", str(e))
