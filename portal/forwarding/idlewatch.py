"""
Idle timeouts for spliced streams: a stream that moves no byte in either direction for a while is
closed (HAProxy's C{timeout tunnel}).

Forwarding must stay cheap, so moving bytes only advances a counter the stream already keeps (bytes
forwarded by the userspace splice, bytes moved by the kernel splice). One timer per L{IdleSweep}
(per relay, not per stream: a timer costs about 0.5 KB, and a relay holds many idle streams, issue
16) reads every watched counter every C{timeout} seconds and closes the streams whose counter has
not changed since the reading before. A watch's first reading only records its counter, so a silent
stream is closed after more than C{timeout} and at most C{2 * timeout} seconds after its last byte
(or its start).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger


class IdleWatch:
    """
    One stream watched by an L{IdleSweep}: closed once when C{activity()} has not changed between
    two of the sweep's readings.
    """

    __slots__ = ("_sweep", "_activity", "_close", "_seen", "_fresh")

    def __init__(
        self, sweep: IdleSweep, activity: Callable[[], int], close: Callable[[], None]
    ) -> None:
        """
        @param sweep: The sweep that reads C{activity}.
        @param activity: Returns a counter that grows while the stream moves bytes.
        @param close: Called once when the counter did not change between two readings.
        """
        self._sweep = sweep
        self._activity = activity
        self._close = close
        self._seen = 0
        self._fresh = True

    def _stale(self) -> bool:
        """
        Read the counter.

        @return: Whether it stood still since the previous reading (never at the first).
        """
        now = self._activity()
        if self._fresh or now != self._seen:
            self._fresh = False
            self._seen = now
            return False
        return True

    def stop(self) -> None:
        """
        The stream ended: stop watching.
        """
        self._sweep._forget(self)


class IdleSweep:
    """
    Watches many streams for idleness with one timer, running only while some stream is watched.

    @ivar timeout: Seconds between two readings of the activity counters.
    """

    __slots__ = ("_clock", "timeout", "_onIdle", "_watches", "_call")

    _log = Logger()

    def __init__(
        self, clock: IReactorTime, timeout: float, onIdle: Callable[[], None] = lambda: None
    ) -> None:
        """
        @param clock: Schedules the readings.
        @param timeout: Seconds between two readings; positive.
        @param onIdle: Called just before each idle stream is closed (to log and count it).
        @raise ValueError: If C{timeout} is not positive.
        """
        if not timeout > 0:
            raise ValueError(f"an idle timeout must be positive, not {timeout}")
        self._clock = clock
        self.timeout = timeout
        self._onIdle = onIdle
        # An insertion-ordered set: streams are read, and closed, in the order they were watched.
        self._watches: dict[IdleWatch, None] = {}
        self._call: Any = None

    def __len__(self) -> int:
        """
        @return: The number of streams watched.
        """
        return len(self._watches)

    def watch(self, activity: Callable[[], int], close: Callable[[], None]) -> IdleWatch:
        """
        Start watching one stream.

        @param activity: The stream's byte counter.
        @param close: Closes the stream.
        @return: The watch; stop it when the stream ends.
        """
        watch = IdleWatch(self, activity, close)
        self._watches[watch] = None
        if self._call is None:
            self._call = self._clock.callLater(self.timeout, self._read)
        return watch

    def _forget(self, watch: IdleWatch) -> None:
        """
        Stop watching one stream; with none left, stop the timer.
        """
        self._watches.pop(watch, None)
        if not self._watches and self._call is not None:
            call, self._call = self._call, None
            if call.active():
                call.cancel()

    def _read(self) -> None:
        """
        Read every counter, close the streams that stood still, and read again later while any
        stream is watched.
        """
        self._call = None
        idle = [watch for watch in self._watches if watch._stale()]
        for watch in idle:
            # An earlier close may have ended (and stopped) this stream too.
            if watch in self._watches:
                self._forget(watch)
                # One stream's failure to close must not leave the others unwatched.
                try:
                    self._onIdle()
                    watch._close()
                except Exception:
                    self._log.failure("closing an idle stream failed")
        if self._watches and self._call is None:
            self._call = self._clock.callLater(self.timeout, self._read)


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
    _sweep: IdleSweep = attrs.field(
        init=False,
        eq=False,
        repr=False,
        default=attrs.Factory(
            lambda self: IdleSweep(self.clock, self.timeout, self.onIdle), takes_self=True
        ),
    )

    def watch(self, activity: Callable[[], int], close: Callable[[], None]) -> IdleWatch:
        """
        Start watching one stream, with the one timer of all this policy's streams.

        @param activity: The stream's byte counter.
        @param close: Closes the stream.
        @return: The watch; stop it when the stream ends.
        """
        return self._sweep.watch(activity, close)
