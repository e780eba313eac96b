"""
Rate limiting of repeated log events: datagram drops and refusals can come thousands a second, their
log lines must not.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime


class LogThrottle:
    """
    Lets one log event per key through every C{interval} seconds and counts the ones held back.

    @ivar interval: Least seconds between two events for one key.
    """

    def __init__(self, clock: IReactorTime, interval: float) -> None:
        """
        @param clock: The source of the current time.
        @param interval: Least seconds between two events for one key.
        """
        self._clock = clock
        self.interval = interval
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def due(self, key: str = "") -> int | None:
        """
        Ask whether an event for C{key} may be logged now.

        @param key: What the event is about (a drop reason, for example).
        @return: L{None} when the event must be held back (it is counted); otherwise the number of
            events for C{key} held back since the last one that was logged.
        """
        now = self._clock.seconds()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._held[key] = self._held.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._held.pop(key, 0)
