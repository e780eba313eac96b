"""
Idle timeouts for spliced streams: a stream that moves no byte in either direction for a while is
closed (HAProxy's C{timeout tunnel}).

Forwarding must stay cheap, so moving bytes only advances a counter the stream already keeps (bytes
forwarded by the userspace splice, bytes moved by the kernel splice); one timer per stream reads it
every C{timeout} seconds and closes the stream when it has not changed since the last reading. A
silent stream is therefore closed between C{timeout} and C{2 * timeout} seconds after its last byte.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.interfaces import IReactorTime


class IdleWatch:
    """
    Calls C{onIdle} once when C{activity()} has not changed over a whole C{timeout}.

    @ivar timeout: Seconds between two readings of the activity counter.
    """

    __slots__ = ("_clock", "timeout", "_activity", "_onIdle", "_seen", "_call")

    def __init__(
        self,
        clock: IReactorTime,
        timeout: float,
        activity: Callable[[], int],
        onIdle: Callable[[], None],
    ) -> None:
        """
        Start watching.

        @param clock: Schedules the readings.
        @param timeout: Seconds between two readings; positive.
        @param activity: Returns a counter that grows while the stream moves bytes.
        @param onIdle: Called once when the counter did not change between two readings.
        @raise ValueError: If C{timeout} is not positive.
        """
        if not timeout > 0:
            raise ValueError(f"an idle timeout must be positive, not {timeout}")
        self._clock = clock
        self.timeout = timeout
        self._activity = activity
        self._onIdle = onIdle
        self._seen = activity()
        self._call: Any = clock.callLater(timeout, self._check)

    def _check(self) -> None:
        """
        Read the counter: close the stream if it stood still, otherwise read it again later.
        """
        now = self._activity()
        if now != self._seen:
            self._seen = now
            self._call = self._clock.callLater(self.timeout, self._check)
            return
        self._call = None
        self._onIdle()

    def stop(self) -> None:
        """
        The stream ended: stop watching.
        """
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()


@attrs.frozen
class IdlePolicy:
    """
    How the streams of a splice are watched for idleness.

    @ivar clock: Schedules the readings.
    @ivar timeout: Seconds between two readings (a silent stream is closed after between one and
        two of them).
    @ivar onIdle: Called just before an idle stream is closed (to log and count it).
    """

    clock: IReactorTime
    timeout: float
    onIdle: Callable[[], None] = lambda: None

    def watch(self, activity: Callable[[], int], close: Callable[[], None]) -> IdleWatch:
        """
        Start watching one stream.

        @param activity: The stream's byte counter.
        @param close: Closes the stream.
        @return: The watch; stop it when the stream ends.
        """

        def idle() -> None:
            self.onIdle()
            close()

        return IdleWatch(self.clock, self.timeout, activity, idle)
