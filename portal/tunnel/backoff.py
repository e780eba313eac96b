"""
How long a tunnel waits before redialling a relay: exponential backoff with jitter and a cap (Twisted's
L{backoffPolicy}), where a session that did not stay up for a stable period counts as a failure too.

L{ClientService} forgets its failures as soon as a connection is made. A relay that accepts the
connection and then drops it (a crash loop, a refusal, a dead path found by heartbeats) would then be
redialled at the initial delay forever. L{StableBackoff} keeps counting such short sessions and resets
only once a session has been up for L{STABLE_AFTER} seconds.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from twisted.application.internet import backoffPolicy
from twisted.internet.interfaces import IReactorTime

#: First redial delay, in seconds (plus jitter).
INITIAL_DELAY = 0.5
#: Longest redial delay, in seconds (plus jitter).
MAX_DELAY = 30.0
#: Growth of the delay per failure.
FACTOR = 1.5
#: Seconds a session must stay up before its failures are forgotten.
STABLE_AFTER = 60.0


class StableBackoff:
    """
    A L{ClientService} retry policy that counts sessions shorter than C{stableAfter} as failures.

    Call L{up} when a session is established (the lease is registered) and L{down} when any
    connection ends.
    """

    def __init__(
        self,
        clock: IReactorTime,
        initialDelay: float = INITIAL_DELAY,
        maxDelay: float = MAX_DELAY,
        factor: float = FACTOR,
        stableAfter: float = STABLE_AFTER,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        """
        @param clock: Where time comes from.
        @param jitter: Noise added to every delay, C{[0, 1)} seconds by default.
        """
        self._clock = clock
        self._policy = backoffPolicy(initialDelay, maxDelay, factor, jitter)
        self._stableAfter = stableAfter
        self._since: float | None = None
        #: Sessions in a row that ended before they were stable.
        self.unstable = 0

    def up(self) -> None:
        """
        A session was established.
        """
        self._since = self._clock.seconds()

    def down(self) -> None:
        """
        A connection ended: forget earlier failures if its session was up for the stable period,
        count it as one if not (also when it never got as far as L{up}).
        """
        since, self._since = self._since, None
        stable = since is not None and self._clock.seconds() - since >= self._stableAfter
        self.unstable = 0 if stable else self.unstable + 1

    def __call__(self, failedAttempts: int) -> float:
        """
        @param failedAttempts: Failed connection attempts since the last connection was made (what
            L{ClientService} counts).
        @return: Seconds to wait before the next attempt.
        """
        return self._policy(failedAttempts + self.unstable)
