"""
JSON logs for operators: one JSON object per line, with stable field names (C{docs/operator-guide.md},
"Logs").

C{portal expose --log-format json} writes the tunnel's log this way to standard error; a relay (or
a tunnel) under twistd gets it with C{twistd --logger portal.cli.jsonlog.observer ...}, on standard
output.

Each line holds C{time} (ISO 8601, UTC), C{level}, C{logger} (the namespace), C{message} (the
formatted text), C{fields} (the event's own fields, for example C{peer}, C{reason}, C{name}) and,
for a failure, C{error} (its traceback).
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import IO, Any

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogEvent,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
)
from zope.interface import implementer

#: Keys of a log event that Twisted (or its legacy log module) adds: not the event's own fields.
_NOT_FIELDS = frozenset({"format", "message", "isError", "system", "time", "why", "failure"})


def _jsonable(value: Any) -> Any:
    """
    @return: C{value} if JSON can hold it as it is, else its C{str}.
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return str(value)


def eventAsJSON(event: LogEvent) -> dict[str, Any]:
    """
    @param event: A Twisted log event.
    @return: The JSON object a log line holds for it.
    """
    level = event.get("log_level") or LogLevel.info
    record: dict[str, Any] = {
        "time": datetime.fromtimestamp(float(event.get("log_time", 0.0)), UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z"),
        "level": level.name,
        "logger": event.get("log_namespace", ""),
        "message": formatEvent(event),
        "fields": {
            key: _jsonable(value)
            for key, value in event.items()
            if not key.startswith("log_") and key not in _NOT_FIELDS
        },
    }
    failure = event.get("log_failure")
    if failure is not None:
        record["error"] = failure.getTraceback()
    return record


@implementer(ILogObserver)
class JSONLineObserver:
    """
    Writes each log event as one line of JSON.
    """

    def __init__(self, stream: IO[str]) -> None:
        """
        @param stream: Where the lines go.
        """
        self._stream = stream

    def __call__(self, event: LogEvent) -> None:
        """
        Write C{event}.

        @param event: A log event.
        """
        self._stream.write(json.dumps(eventAsJSON(event), sort_keys=True) + "\n")
        self._stream.flush()


def jsonLogObserver(stream: IO[str], level: LogLevel = LogLevel.info) -> ILogObserver:
    """
    @param stream: Where the lines go.
    @param level: The lowest level written.
    @return: An observer writing events at C{level} and above as JSON lines.
    """
    return FilteringLogObserver(
        JSONLineObserver(stream), [LogLevelFilterPredicate(defaultLogLevel=level)]
    )


def observer() -> ILogObserver:
    """
    The observer factory for C{twistd --logger portal.cli.jsonlog.observer}: info and above, as JSON
    lines on standard output.

    @return: The observer.
    """
    return jsonLogObserver(sys.stdout)
