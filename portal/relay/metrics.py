"""
The relay's Prometheus metrics, through C{prometheus-client}: histograms the relay's parts observe as
things happen, and the router's counters and gauges, read when C{/metrics} is scraped.

Every counter in the router's counter table is exported as C{portal_relay_<name>_total}, so a counter
added anywhere in the relay appears without being declared here; L{COUNTER_HELP} only describes them.
The names are listed in C{docs/operator-guide.md}.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.internet.interfaces import IReactorTime

import portal

#: What the relay's counters count (a counter missing here is exported with a generic description).
COUNTER_HELP: dict[str, str] = {
    "visitors": "Connections accepted on the public TLS listener.",
    "routed": "Visitors routed to a tunnel by the SNI of their ClientHello.",
    "unknown": "Visitors refused: no live lease for their SNI.",
    "refused": "Visitors refused: too many waiting for a data session.",
    "timeouts": "Visitors dropped: no data session within the data wait timeout.",
    "kernel_spliced": "Visitor connections moved with os.splice.",
    "python_spliced": "Visitor connections moved in Python.",
    "waited": "Visitors who waited for a data session (none was idle).",
    "tcp_visitors": "Connections accepted on raw TCP lease ports.",
    "bytes_to_tunnels": "Bytes read from visitors and sent to tunnels.",
    "bytes_to_visitors": "Bytes read from tunnels and sent to visitors.",
    "admin_refused": "Requests for the operator's dashboard data refused: no or a wrong token.",
    "forwarded": "Visitors forwarded to the cluster member holding their lease (--cluster).",
    "plain_data_sessions": "Data sessions attached over plain TCP (stream, routed HTTP, raw TCP).",
    "tls_data_sessions": "Data sessions attached inside TLS (a multi-hop chain's).",
    "member_links_refused": "Member links from other cluster members refused (--cluster).",
    "handed_off": "TLS visitors handed by their socket to the worker holding their lease (--workers).",
    "adopted": "TLS visitors another worker handed over by their socket (--workers).",
    "handed_off_at_accept": "TLS visitors handed to the worker holding their lease as they were "
    "accepted, from their ClientHello peeked at (--workers; counted in handed_off too).",
    "tcp_handed_off": "Raw TCP visitors handed by their socket to the worker holding the port "
    "(--workers).",
    "tcp_adopted": "Raw TCP visitors another worker handed over by their socket (--workers).",
    "udp_forwarded": "UDP datagrams relayed to the cluster member holding their lease (--cluster).",
    "udp_forward_replies": "UDP replies from the holding cluster member sent to visitors (--cluster).",
    "tcp_visitors_delayed": "Raw TCP visitors that waited for their turn to reach the tunnel "
    "(--tcp-visitor-rate).",
    "handshakes_delayed": "Control-port connections that waited for their TLS handshake "
    "(--handshake-rate).",
}

#: What the relay's gauges measure.
GAUGE_HELP: dict[str, str] = {
    "leases": "Lease names recorded (live or reserved).",
    "live_leases": "Leases held by a connected tunnel.",
    "control_sessions": "Tunnels connected (control sessions past Hello).",
    "idle_data_sessions": "Idle data sessions, over all tunnels.",
    "waiting_visitors": "Visitors waiting for a data session.",
    "open_visitors": "Visitor connections open.",
    "hops_open": "Multi-hop connections open through this relay.",
    "connections_open": "Connections open on all the relay's listeners together.",
    "pow_difficulty_bits": "The proof of work registrations need now, in bits (0 while quiet).",
    "handshakes_waiting": "Control-port connections waiting for their TLS handshake now.",
    "handshakes_waiting_peak": "Most control-port connections that waited for their TLS handshake "
    "at once since the relay started.",
    "uptime_seconds": "Seconds since the relay started.",
}

#: Buckets of the latency histograms, in seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _RouterCollector(Collector):
    """
    Reads the router's counters and gauges when the registry is collected.
    """

    def __init__(
        self,
        counters: Callable[[], Mapping[str, int]],
        gauges: Callable[[], Mapping[str, float]],
        refusals: Callable[[], Mapping[str, int]],
        listeners: Callable[[], Mapping[str, int]],
    ) -> None:
        self._counters = counters
        self._gauges = gauges
        self._refusals = refusals
        self._listeners = listeners

    def collect(self) -> Iterator[Metric]:
        """
        @return: One counter family per router counter, one gauge family per gauge, the limits'
            refusals by reason, the connections open per listener, and the version as
            C{portal_relay_info}.
        """
        for name, value in sorted(self._counters().items()):
            help = COUNTER_HELP.get(name, f"Relay counter {name}.")
            yield CounterMetricFamily(f"portal_relay_{name}", help, value=value)
        for name, gauge in sorted(self._gauges().items()):
            help = GAUGE_HELP.get(name, f"Relay gauge {name}.")
            yield GaugeMetricFamily(f"portal_relay_{name}", help, value=gauge)
        refusals = CounterMetricFamily(
            "portal_refusals",
            "Connections, datagrams and requests the relay's limits refused, by reason.",
            labels=["reason"],
        )
        for reason, count in sorted(self._refusals().items()):
            refusals.add_metric([reason], count)
        yield refusals
        listeners = GaugeMetricFamily(
            "portal_relay_listener_connections_open",
            "Connections open on each listener (public, control, http, tcp).",
            labels=["listener"],
        )
        for listener, count in sorted(self._listeners().items()):
            listeners.add_metric([listener], count)
        yield listeners
        info = GaugeMetricFamily(
            "portal_relay_info", "The relay's software version (always 1).", labels=["version"]
        )
        info.add_metric([portal.__version__], 1)
        yield info


class RelayMetrics:
    """
    One relay's metrics registry (not the process-wide default, so that several relays in one process,
    as in tests, keep apart).

    @ivar clock: Where the observed durations are measured.
    @ivar registry: The registry C{/metrics} renders.
    @ivar dataWait: Seconds a routed visitor waited for a data session (0 when one was idle).
    @ivar firstByte: Seconds from accepting a visitor to the first byte from its tunnel.
    @ivar registration: Seconds from a registration challenge to the lease being granted.
    """

    def __init__(self, clock: IReactorTime) -> None:
        """
        @param clock: Where the observed durations are measured.
        """
        self.clock = clock
        self.registry = CollectorRegistry(auto_describe=True)
        self.dataWait = Histogram(
            "portal_relay_data_wait_seconds",
            "Seconds a routed visitor waited for a data session from its tunnel (0 when one was idle).",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.firstByte = Histogram(
            "portal_relay_first_byte_seconds",
            "Seconds from accepting a visitor connection to the first byte its tunnel sent back.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registration = Histogram(
            "portal_relay_registration_seconds",
            "Seconds from a tunnel's registration challenge to its leases being granted.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        ProcessCollector(namespace="portal_relay", registry=self.registry)

    def watch(
        self,
        counters: Callable[[], Mapping[str, int]],
        gauges: Callable[[], Mapping[str, float]],
        refusals: Callable[[], Mapping[str, int]],
        listeners: Callable[[], Mapping[str, int]],
    ) -> None:
        """
        Export counters and gauges read at each scrape.

        @param counters: Returns the current counters by name (exported as C{portal_relay_<name>_total}).
        @param gauges: Returns the current gauges by name (exported as C{portal_relay_<name>}).
        @param refusals: Returns what the relay's limits refused, by reason (exported as
            C{portal_refusals_total{reason="..."}}).
        @param listeners: Returns the connections open per listener (exported as
            C{portal_relay_listener_connections_open{listener="..."}}).
        """
        self.registry.register(_RouterCollector(counters, gauges, refusals, listeners))

    def since(self, start: float) -> float:
        """
        @param start: A time read from L{clock}.
        @return: Seconds from C{start} to now (never negative).
        """
        return max(0.0, self.clock.seconds() - start)

    def render(self) -> bytes:
        """
        @return: Every metric in the Prometheus text format.
        """
        return generate_latest(self.registry)
