"""
Refusals: every connection, datagram or request a limit turns away is counted by reason (for
C{/metrics}) and logged, with the log lines of a flood rate-limited per reason by L{LogThrottle}.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from portal.forwarding.logthrottle import LogThrottle

#: Least seconds between two log events for one refusal reason.
REFUSAL_LOG_INTERVAL = 10.0


class Refusals:
    """
    Counts refusals by reason and logs them, at most one event per reason every C{interval} seconds
    (each event says how many were not logged since the last).

    @ivar counts: Refusals by reason, since start.
    """

    _log = Logger()

    def __init__(self, clock: IReactorTime, interval: float = REFUSAL_LOG_INTERVAL) -> None:
        """
        @param clock: The source of time for the log rate limit.
        @param interval: Least seconds between two log events for one reason.
        """
        self.counts: dict[str, int] = {}
        self._throttle = LogThrottle(clock, interval)

    def refuse(self, label: str, format: str, /, **fields: Any) -> None:
        """
        Count a refusal and log it unless an event for C{label} was logged less than the interval
        ago.

        @param label: The refusal's reason as a short label (C{"connections_per_source"}): the
            metric's C{reason} and the event's C{refusal}.
        @param format: The event's format string, using the C{fields}. The event also gets
            C{refusal} (the reason's label) and C{unlogged} (refusals for this reason held back
            since the last event).
        @param fields: The event's fields.
        """
        self.count(label)
        unlogged = self._throttle.due(label)
        if unlogged is None:
            return
        self._log.warn(
            format + " ({unlogged} more refused for this reason and not logged)",
            refusal=label,
            unlogged=unlogged,
            **fields,
        )

    def count(self, label: str) -> None:
        """
        Count a refusal that its refuser logs itself (in its own words, rate-limited).

        @param label: The refusal's reason as a short label.
        """
        self.counts[label] = self.counts.get(label, 0) + 1

    def metricLines(self, name: str = "portal_refusals_total") -> list[str]:
        """
        The counts in the Prometheus text format, one line per reason.

        @param name: The metric's name.
        @return: Lines like C{portal_refusals_total{reason="connections_total"} 3}, sorted.
        """
        return [
            f'{name}{{reason="{reason}"}} {count}' for reason, count in sorted(self.counts.items())
        ]
