"""
The tunnel's metrics (C{portal expose --metrics ADDR}): a loopback-only listener with C{/metrics} in
the Prometheus text format and C{/healthz}, for a local Prometheus agent or a container health check.

The metrics follow what the tunnel reports (L{portal.tunnel.report.Reporter}'s events: leases,
reconnections, requests of routed HTTP mode) and the streams its data sessions carried. The tunnel
never listens on a public interface, so the listener's address must be a loopback one.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

import portal
from portal.gateway.loopback import loopbackEndpoint
from portal.tunnel.service import TunnelService

#: Events after which a relay's lease is no longer live.
LEASE_ENDS = frozenset({"disconnected", "dropped", "replaced", "fatal"})

#: Buckets of the request duration histogram, in seconds.
REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _TunnelCollector(Collector):
    """
    Reads the tunnel's live relays and stream count when the registry is collected.
    """

    def __init__(self, metrics: TunnelMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        """
        @return: The live relays gauge, the streams counter and the version.
        """
        metrics = self._metrics
        yield GaugeMetricFamily(
            "portal_tunnel_relays_live",
            "Relays on which this tunnel holds a live lease.",
            value=len(metrics.liveRelays),
        )
        yield CounterMetricFamily(
            "portal_tunnel_streams",
            "Visitor streams the tunnel's data sessions carried.",
            value=metrics.streams(),
        )
        info = GaugeMetricFamily(
            "portal_tunnel_info", "The tunnel's software version (always 1).", labels=["version"]
        )
        info.add_metric([portal.__version__], 1)
        yield info


class TunnelMetrics:
    """
    One tunnel's metrics registry, fed by its reporter's events.

    @ivar registry: The registry C{/metrics} renders.
    @ivar liveRelays: The relays with a live lease now.
    """

    def __init__(self, streams: Any = None) -> None:
        """
        @param streams: Returns how many visitor streams the tunnel carried so far (L{None}: 0).
        """
        self.registry = CollectorRegistry(auto_describe=True)
        self.liveRelays: set[str] = set()
        self.streams = streams or (lambda: 0)
        self.events = Counter(
            "portal_tunnel_events",
            "Events the tunnel reported, by kind (lease, disconnected, reconnected, unreachable, ...).",
            ["event"],
            registry=self.registry,
        )
        self.requests = Counter(
            "portal_tunnel_requests",
            "Requests proxied in routed HTTP mode, by status class (2xx, 4xx, ...).",
            ["status"],
            registry=self.registry,
        )
        self.responseBytes = Counter(
            "portal_tunnel_response_bytes",
            "Response body bytes sent to visitors in routed HTTP mode.",
            registry=self.registry,
        )
        self.requestSeconds = Histogram(
            "portal_tunnel_request_seconds",
            "Seconds from a request's first byte to its last response byte (routed HTTP mode).",
            buckets=REQUEST_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_TunnelCollector(self))
        ProcessCollector(namespace="portal_tunnel", registry=self.registry)

    def observe(self, event: dict[str, Any]) -> None:
        """
        Count one reported event (a L{portal.tunnel.report.Reporter} listener).

        @param event: The event, as the reporter prints it with C{--json}.
        """
        kind = str(event.get("event", "unknown"))
        self.events.labels(kind).inc()
        relay = event.get("relay")
        if kind == "lease" and relay:
            self.liveRelays.add(str(relay))
        elif kind in LEASE_ENDS:
            if relay:
                self.liveRelays.discard(str(relay))
            else:
                self.liveRelays.clear()
        elif kind == "request":
            self.requests.labels(f"{int(event.get('status', 0)) // 100}xx").inc()
            self.responseBytes.inc(max(0, int(event.get("bytes", 0))))
            self.requestSeconds.observe(max(0.0, float(event.get("ms", 0.0)) / 1000))

    def render(self) -> bytes:
        """
        @return: Every metric in the Prometheus text format.
        """
        return generate_latest(self.registry)


class _Metrics(Resource):
    """
    C{/metrics}.
    """

    isLeaf = True

    def __init__(self, metrics: TunnelMetrics) -> None:
        super().__init__()
        self._metrics = metrics

    def render_GET(self, request: Request) -> bytes:
        """
        @return: The metrics text.
        """
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        return self._metrics.render()


class _Health(Resource):
    """
    C{/healthz}: 200 while the tunnel holds a live lease on some relay, else 503.
    """

    isLeaf = True

    def __init__(self, metrics: TunnelMetrics) -> None:
        super().__init__()
        self._metrics = metrics

    def render_GET(self, request: Request) -> bytes:
        """
        @return: C{ok}, or why not.
        """
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        live = len(self._metrics.liveRelays)
        if live:
            return f"ok: live on {live} relays\n".encode()
        request.setResponseCode(503)
        return b"no live lease\n"


def metricsSite(metrics: TunnelMetrics) -> Site:
    """
    @param metrics: The tunnel's metrics.
    @return: The site of the metrics listener: C{/metrics} and C{/healthz}.
    """
    root = Resource()
    root.putChild(b"metrics", _Metrics(metrics))
    root.putChild(b"healthz", _Health(metrics))
    return Site(root)


class MetricsService(Service):
    """
    Listens for scrapes on a loopback address while running.

    @ivar port: The listening port, once listening.
    """

    _log = Logger()
    port: IListeningPort | None = None

    def __init__(self, reactor: Any, metrics: TunnelMetrics, address: tuple[str, int]) -> None:
        """
        @param reactor: The reactor to listen with.
        @param metrics: What to serve.
        @param address: A loopback address and port (L{portal.tunnel.config.parseMetricsAddress}).
        """
        self._reactor = reactor
        self._metrics = metrics
        self._address = address
        self._listening: Deferred[IListeningPort] | None = None

    def startService(self) -> None:
        """
        Start listening; a failure is logged (the tunnel runs on without metrics).
        """
        super().startService()
        host, port = self._address
        endpoint = serverFromString(self._reactor, loopbackEndpoint(host, port))
        self._listening = endpoint.listen(metricsSite(self._metrics))
        self._listening.addCallbacks(self._listened, self._failed)

    def _listened(self, port: IListeningPort) -> IListeningPort:
        """
        Record and log the port.
        """
        self.port = port
        address = port.getHost()
        self._log.info(
            "tunnel metrics on http://{host}:{port}/metrics",
            host=getattr(address, "host", ""),
            port=getattr(address, "port", 0),
        )
        return port

    def _failed(self, failure: Any) -> None:
        """
        Log why the metrics listener could not start.
        """
        self._log.error(
            "tunnel metrics: cannot listen on {address}: {error}",
            address=f"{self._address[0]}:{self._address[1]}",
            error=failure.getErrorMessage(),
        )

    def stopService(self) -> Deferred[Any]:
        """
        Stop listening.
        """
        super().stopService()
        port, self.port = self.port, None
        if port is None:
            return succeed(None)
        return maybeDeferred(port.stopListening)


def addMetrics(tunnel: TunnelService, address: tuple[str, int]) -> MetricsService:
    """
    Give a tunnel its metrics listener: the metrics follow the tunnel's reporter and streams, and
    the listener runs while the tunnel does.

    @param tunnel: The tunnel, not started yet.
    @param address: A loopback address and port (L{portal.tunnel.config.parseMetricsAddress}).
    @return: The listener's service, a child of C{tunnel}.
    """
    metrics = TunnelMetrics(lambda: tunnel.streamHandler.streams)
    tunnel.reporter.listeners.append(metrics.observe)
    service = MetricsService(tunnel.reactor, metrics, address)
    service.setServiceParent(tunnel)
    return service
