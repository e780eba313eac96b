"""
A fair pacer for costly work that arrives in bursts: at most C{rate} starts a second (a token
bucket of C{burst}), the rest waiting in a bounded queue, served round robin between keys.

The relay paces the TLS handshakes it does itself (control sessions, tunnels' TLS data sessions, its
own site): one costs a millisecond or more of the relay's only thread, and a few hundred started at
once (a flood of new control sessions, a restart's reconnections) would hold every visitor's
connection for that long. Paced, the handshakes take turns with everything else, and a burst is
spread over time instead of stalling the reactor; with C{perTurn}, at most that many start in one
turn of the reactor (the events of one poll), even from a full bucket, so that the burst the bucket
allows after a quiet spell is spread too (twenty handshakes let through at once held visitors for
twenty milliseconds at the start of benchmark scenario 9's attacks). Queued work is served one key
at a time in turn, so a source with a hundred waiting delays another source's one by at most one
turn per waiting source. The model is HAProxy's C{maxsslrate} (new TLS sessions a second, the excess
waiting in the accept queue), with fairness between source addresses that HAProxy leaves to the
kernel.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from portal.forwarding.tokenbucket import TokenBucket

#: Seconds the queue's timer waits at least.
MIN_WAIT = 1e-4


class PacerFull(Exception):
    """
    The queue holds as many waiting starts as it may.
    """


class Waiting:
    """
    A start waiting in a L{FairPacer}'s queue.

    @ivar key: What it waits under (a source address).
    """

    __slots__ = ("_pacer", "key", "_start", "cancelled")

    def __init__(self, pacer: FairPacer, key: Hashable, start: Callable[[], None]) -> None:
        self._pacer = pacer
        self.key = key
        self._start = start
        self.cancelled = False

    def cancel(self) -> None:
        """
        Leave the queue (the connection went away); does nothing once started or cancelled.
        """
        if not self.cancelled:
            self.cancelled = True
            self._pacer._left(self)


class FairPacer:
    """
    Lets at most C{rate} starts a second through (C{burst} at once after a quiet spell) and queues the
    rest, at most C{maxWaiting} in all, served round robin between keys as tokens come.

    @ivar rate: Starts a second.
    @ivar burst: Starts let through at once after a quiet spell.
    @ivar maxWaiting: Most starts waiting at once.
    @ivar maxWaitingPerKey: Most starts of one key waiting at once, or L{None}.
    @ivar perTurn: Most starts in one turn of the reactor, or L{None}.
    @ivar waiting: Starts waiting now.
    @ivar peakWaiting: Most starts that waited at once since this pacer was made.
    @ivar delayed: Starts that had to wait, in all.
    """

    _log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        rate: float,
        burst: float,
        maxWaiting: int,
        maxWaitingPerKey: int | None = None,
        perTurn: int | None = None,
    ) -> None:
        """
        @param clock: The source of time, and of the timer that serves the queue.
        @param rate: Starts a second; positive.
        @param burst: Starts let through at once; positive.
        @param maxWaiting: Most starts waiting at once; at least 1.
        @param maxWaitingPerKey: Most starts of one key waiting at once (L{None}: as many as the
            queue holds), so that one key cannot fill the queue for all the others.
        @param perTurn: Most starts in one turn of the reactor (L{None}: as many as there are
            tokens); the others wait for a later turn. A turn ends when a C{callLater(0)} made in
            it runs, which the reactor does before it polls again.
        @raise ValueError: For a rate, burst, queue size or turn size out of range.
        """
        if maxWaiting < 1:
            raise ValueError(f"a pacer's queue must hold at least 1, not {maxWaiting}")
        if perTurn is not None and perTurn < 1:
            raise ValueError(f"a pacer must start at least 1 per turn, not {perTurn}")
        self._clock = clock
        self._bucket = TokenBucket(clock, rate, burst)
        self.rate = self._bucket.rate
        self.burst = self._bucket.burst
        self.maxWaiting = maxWaiting
        self.maxWaitingPerKey = maxWaitingPerKey
        # Each key's queue, in the order keys take turns (a dict keeps insertion order).
        self._queues: dict[Hashable, deque[Waiting]] = {}
        self.waiting = 0
        self.peakWaiting = 0
        self.delayed = 0
        self._timer: IDelayedCall | None = None
        self.perTurn = perTurn
        self._startedThisTurn = 0
        self._turnEnds: IDelayedCall | None = None

    def enter(self, key: Hashable, start: Callable[[], None]) -> Waiting | None:
        """
        Ask to start now.

        @param key: Whose start this is (fairness is between keys).
        @param start: Called, later, when the start is let through, unless cancelled first.
        @return: L{None} when the caller may start at once (C{start} is not called), else the
            L{Waiting} entry whose C{start} will be called in turn.
        @raise PacerFull: When the queue is full; nothing is queued.
        """
        if not self.waiting and not self._turnFull() and self._bucket.take():
            self._started()
            return None
        if self.waiting >= self.maxWaiting:
            raise PacerFull(f"{self.waiting} starts are waiting already")
        queue = self._queues.get(key)
        if (
            queue is not None
            and self.maxWaitingPerKey is not None
            and len(queue) >= self.maxWaitingPerKey
        ):
            raise PacerFull(f"{len(queue)} starts of the same key are waiting already")
        entry = Waiting(self, key, start)
        if queue is None:
            queue = self._queues[key] = deque()
        queue.append(entry)
        self.waiting += 1
        self.delayed += 1
        self.peakWaiting = max(self.peakWaiting, self.waiting)
        self._schedule()
        return entry

    def _left(self, entry: Waiting) -> None:
        """
        Take a cancelled entry out of its key's queue.
        """
        queue = self._queues.get(entry.key)
        if queue is None:
            return
        try:
            queue.remove(entry)
        except ValueError:
            return
        self.waiting -= 1
        if not queue:
            del self._queues[entry.key]
        if not self.waiting and self._timer is not None and self._timer.active():
            self._timer.cancel()
            self._timer = None

    def _schedule(self) -> None:
        """
        Make sure the timer that serves the queue will run when the next token is there.
        """
        if self._timer is not None and self._timer.active():
            return
        # Never less than MIN_WAIT: with float time, a wait a rounding error long could leave the
        # bucket a hair short of a token when the timer fires, and fire it again at once.
        self._timer = self._clock.callLater(max(MIN_WAIT, self._bucket.delay(1.0)), self._serve)

    def _serve(self) -> None:
        """
        Let through as many waiting starts as there are tokens, one key at a time in turn.
        """
        self._timer = None
        started: list[Waiting] = []
        while self._queues and not self._turnFull() and self._bucket.take():
            key = next(iter(self._queues))
            queue = self._queues.pop(key)
            entry = queue.popleft()
            if queue:
                self._queues[key] = queue  # To the back of the line.
            self.waiting -= 1
            entry.cancelled = True  # Started: no longer cancellable.
            started.append(entry)
            self._started()
        if self._queues:
            self._schedule()
        for entry in started:
            try:
                entry._start()
            except Exception:
                self._log.failure("a paced start failed")

    def _turnFull(self) -> bool:
        """
        @return: Whether this turn of the reactor has had its L{perTurn} starts.
        """
        return self.perTurn is not None and self._startedThisTurn >= self.perTurn

    def _started(self) -> None:
        """
        Count a start against this turn; the first of a turn marks the turn's end.
        """
        if self.perTurn is None:
            return
        self._startedThisTurn += 1
        if self._turnEnds is None:
            self._turnEnds = self._clock.callLater(0, self._nextTurn)

    def _nextTurn(self) -> None:
        """
        A new turn of the reactor: its starts are not counted yet.
        """
        self._turnEnds = None
        self._startedThisTurn = 0

    def stop(self) -> None:
        """
        Forget every waiting start (the relay is stopping) and the timers.
        """
        for queue in self._queues.values():
            for entry in queue:
                entry.cancelled = True
        self._queues.clear()
        self.waiting = 0
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._turnEnds is not None and self._turnEnds.active():
            self._turnEnds.cancel()
        self._turnEnds = None
        self._startedThisTurn = 0

    def __repr__(self) -> str:
        return f"<FairPacer {self.rate:g}/s burst {self.burst:g}, {self.waiting} waiting>"


class KeyedPacer:
    """
    A L{FairPacer} per key: at most C{rate} starts a second for each key (a source address) after
    a burst, the rest of that key waiting in its own queue of at most C{maxWaiting}, so that one
    key starting too much waits alone and every other key keeps its own rate.

    A pacer whose key has nothing waiting and a full bucket (unused for C{burst / rate} seconds) is
    the same as a new one and is forgotten: each start looks at the key looked at longest ago, and
    all are looked at once more than C{maxKeys} are kept (a flood from many addresses, each once,
    leaves few behind).

    @ivar delayed: Starts that had to wait, in all keys.
    """

    def __init__(
        self,
        clock: IReactorTime,
        rate: float,
        burst: float,
        maxWaiting: int,
        maxKeys: int = 1024,
    ) -> None:
        """
        @param clock: The source of time and timers.
        @param rate: Starts a second per key; positive.
        @param burst: Starts let through at once per key; positive.
        @param maxWaiting: Most starts waiting per key; at least 1.
        @param maxKeys: Idle keys kept before they are forgotten.
        @raise ValueError: For a rate, burst or queue size out of range.
        """
        FairPacer(clock, rate, burst, maxWaiting)  # Checks the arguments.
        self._clock = clock
        self._rate = rate
        self._burst = burst
        self._maxWaiting = maxWaiting
        self._maxKeys = maxKeys
        self._pacers: dict[Hashable, FairPacer] = {}

    @property
    def waiting(self) -> int:
        """
        Starts waiting now, in all keys.
        """
        return sum(pacer.waiting for pacer in self._pacers.values())

    @property
    def delayed(self) -> int:
        """
        Starts that had to wait, in all keys (of the keys still kept).
        """
        return sum(pacer.delayed for pacer in self._pacers.values())

    def __len__(self) -> int:
        """
        @return: The keys with a pacer.
        """
        return len(self._pacers)

    def enter(self, key: Hashable, start: Callable[[], None]) -> Waiting | None:
        """
        Ask to start now, under C{key}'s rate (see L{FairPacer.enter}).

        @raise PacerFull: When C{key} has C{maxWaiting} starts waiting.
        """
        pacer = self._pacers.get(key)
        if pacer is None:
            if len(self._pacers) >= self._maxKeys:
                self._forgetIdle()
            pacer = self._pacers[key] = FairPacer(
                self._clock, self._rate, self._burst, self._maxWaiting
            )
        try:
            return pacer.enter(key, start)
        finally:
            self._sweepOne()

    def _sweepOne(self) -> None:
        """
        Look at the key that has gone longest without a look: forget its pacer if it is idle (nothing
        waiting, a full bucket: the same as a new one), else send it to the back of the line. One key
        per start keeps the idle ones few without a timer, whatever number of addresses came once.
        """
        if len(self._pacers) < 2:
            return
        key = next(iter(self._pacers))
        pacer = self._pacers.pop(key)
        if pacer.waiting or not pacer._bucket.full():
            self._pacers[key] = pacer

    def _forgetIdle(self) -> None:
        """
        Forget the pacers of keys with nothing waiting and a full bucket.
        """
        for key, pacer in list(self._pacers.items()):
            if not pacer.waiting and pacer._bucket.full():
                del self._pacers[key]

    def stop(self) -> None:
        """
        Forget every waiting start and every timer.
        """
        for pacer in self._pacers.values():
            pacer.stop()
        self._pacers.clear()
