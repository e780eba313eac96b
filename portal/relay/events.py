"""
The relay's recent events: a log observer keeping the last relay log events, formatted, for the
operator's dashboard.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import attrs
from twisted.logger import ILogObserver, LogEvent, LogLevel, formatEvent
from zope.interface import implementer

#: Events kept.
MAX_EVENTS = 100

#: Only events from these namespaces are kept: the relay's own.
NAMESPACE = "portal.relay."


@attrs.frozen
class RecentEvent:
    """
    One log event, as the dashboard shows it.

    @ivar time: When it was logged (seconds since the epoch, from the event).
    @ivar level: Its level name (C{info}, C{warn}, C{error}, ...).
    @ivar namespace: The logger's namespace, for example C{portal.relay.public.VisitorProtocol}.
    @ivar text: The formatted message.
    """

    time: float
    level: str
    namespace: str
    text: str

    def toJSON(self) -> dict[str, Any]:
        """
        @return: The event as a JSON object.
        """
        return attrs.asdict(self)


@implementer(ILogObserver)
class RecentEvents:
    """
    Keeps the last L{MAX_EVENTS} relay events at level info or above, newest last.
    """

    def __init__(self, limit: int = MAX_EVENTS) -> None:
        """
        @param limit: How many events to keep.
        """
        self._events: deque[RecentEvent] = deque(maxlen=limit)

    def __call__(self, event: LogEvent) -> None:
        """
        Keep C{event} if it is the relay's and not debug.

        @param event: A log event.
        """
        namespace = event.get("log_namespace", "")
        level = event.get("log_level")
        if not namespace.startswith(NAMESPACE) or level is None or level < LogLevel.info:
            return
        text = formatEvent(event)
        failure = event.get("log_failure")
        if failure is not None:
            text = f"{text}: {failure.getErrorMessage()}"
        self._events.append(
            RecentEvent(
                time=float(event.get("log_time", 0.0)),
                level=level.name,
                namespace=namespace,
                text=text,
            )
        )

    def recent(self, count: int = MAX_EVENTS) -> list[RecentEvent]:
        """
        @param count: At most this many.
        @return: The last C{count} events, newest last.
        """
        events = list(self._events)
        return events[-count:] if count else []
