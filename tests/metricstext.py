"""
Reading Prometheus text in tests: metric values by sample name, through prometheus-client's parser.
"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def metricValues(text: str) -> dict[str, float]:
    """
    @param text: A C{/metrics} response body.
    @return: The value of every sample without labels, by sample name (counters with their
        C{_total} suffix, histograms as C{_count} and C{_sum}).
    """
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.labels:
                values[sample.name] = sample.value
    return values
