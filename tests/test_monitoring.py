"""
Tests for the monitoring examples in C{docs/monitoring/}: every metric the Grafana dashboard and the
Prometheus rules name exists in what a relay's and a tunnel's C{/metrics} serve, and every relay
metric is listed in the operator guide.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from portal.relay.metrics import COUNTER_HELP
from portal.relay.ports import PortAllocator, parsePortRange
from portal.relay.router import Router
from portal.relay.udpmode import UDPMode
from portal.trust.identity import Identity
from portal.tunnel.metrics import TunnelMetrics

DOCS = Path(__file__).resolve().parent.parent / "docs"
MONITORING = DOCS / "monitoring"

#: A Portal metric name in an expression or a document.
METRIC = re.compile(r"\bportal_(?:relay_|tunnel_|refusals)[a-z0-9_]*")


def servedNames() -> tuple[set[str], set[str]]:
    """
    @return: The sample names a relay (with UDP mode) and a tunnel serve (counters with C{_total},
        histograms with C{_bucket}, C{_sum} and C{_count}), and the names of their metric families.
    """
    clock = Clock()
    router = Router(Identity.generate(), clock)
    router.udp = UDPMode(clock, PortAllocator(parsePortRange("40000-40001", "--udp-ports"), clock))
    # A labelled family has samples once something is counted under a label.
    router.refusals.count("connections_per_source")
    tunnel = TunnelMetrics()
    tunnel.observe({"event": "lease", "relay": "r:4017"})
    tunnel.observe({"event": "request", "status": 200, "bytes": 1, "ms": 1.0})
    samples: set[str] = set()
    families: set[str] = set()
    for text in (router.metrics.render(), tunnel.render()):
        for family in text_string_to_metric_families(text.decode()):
            families.add(family.name)
            samples.update(sample.name for sample in family.samples)
    return samples, families


def expressions() -> list[str]:
    """
    @return: Every PromQL expression of the Grafana dashboard and the rules file.
    """
    found = []
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    for panel in dashboard["panels"]:
        found.extend(target["expr"] for target in panel["targets"])
    for line in (MONITORING / "portal-rules.yml").read_text().splitlines():
        key, _, value = line.strip().partition(": ")
        if key == "expr":
            found.append(value)
    return found


class MonitoringExamplesTests(SynchronousTestCase):
    """
    The dashboard and rules name only metrics that exist.
    """

    def test_namedMetricsExist(self) -> None:
        """
        Every C{portal_*} name in the dashboard's and the rules' expressions is served.
        """
        samples, _ = servedNames()
        named = {name for expression in expressions() for name in METRIC.findall(expression)}
        self.assertGreater(len(named), 20)
        self.assertEqual(sorted(named - samples), [])

    def test_scrapeJobs(self) -> None:
        """
        The scrape configuration has the two jobs the dashboard selects, on C{/metrics}.
        """
        text = (MONITORING / "prometheus.yml").read_text()
        for job in ("portal-relay", "portal-tunnel"):
            self.assertIn(f"job_name: {job}", text)
            self.assertIn(f'job="{job}"', "\n".join(expressions()))
        self.assertIn("rule_files:\n  - portal-rules.yml", text)

    def test_operatorGuideListsMetrics(self) -> None:
        """
        The operator guide names every metric family a relay and a tunnel serve (process metrics and
        prometheus-client's C{_created} timestamps aside), and no metric that does not exist.
        """
        _, families = servedNames()
        guide = (DOCS / "operator-guide.md").read_text()
        # "portal_relay_process_*" and "portal_relay_<name>_total" are patterns, not names.
        listed = {name for name in METRIC.findall(guide) if not name.endswith("_")}
        portal = {
            name for name in families if "_process_" not in name and not name.endswith("_created")
        }
        counters = {f"{name}_total" for name in portal}
        missing = sorted(
            name for name in portal if name not in listed and f"{name}_total" not in listed
        )
        self.assertEqual(missing, [])
        samples, _ = servedNames()
        # Counters the relay describes but only creates when first counted (cluster mode's).
        described = {f"portal_relay_{name}_total" for name in COUNTER_HELP}
        self.assertEqual(sorted(listed - samples - portal - counters - described), [])
