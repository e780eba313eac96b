"""
Reading Prometheus text in tests: metric values by sample, through prometheus-client's parser.
"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def metricValues(text: str) -> dict[str, float]:
    """
    @param text: A C{/metrics} response body.
    @return: The value of every sample (counters with their C{_total} suffix, histograms as
        C{_bucket}, C{_count} and C{_sum}), by sample name, with its labels as the text format
        writes them: C{portal_relay_leases}, C{portal_refusals_total{reason="udp_flows"}}.
    """
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{name}="{value}"' for name, value in sample.labels.items())
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values
