"""
Tests for L{portal.forwarding.logthrottle}.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from portal.forwarding.logthrottle import LogThrottle


class LogThrottleTests(SynchronousTestCase):
    """
    L{LogThrottle} lets one event per key through every interval and counts the rest.
    """

    def test_oncePerInterval(self) -> None:
        """
        The first event is due; the next ones within the interval are held back and counted, and
        the first one after it reports how many were held.
        """
        clock = Clock()
        throttle = LogThrottle(clock, 10.0)
        self.assertEqual(throttle.due(), 0)
        self.assertIsNone(throttle.due())
        clock.advance(9.9)
        self.assertIsNone(throttle.due())
        clock.advance(0.1)
        self.assertEqual(throttle.due(), 2)
        self.assertIsNone(throttle.due())

    def test_keysIndependent(self) -> None:
        """
        Each key has its own interval and count.
        """
        clock = Clock()
        throttle = LogThrottle(clock, 10.0)
        self.assertEqual(throttle.due("refused"), 0)
        self.assertEqual(throttle.due("stopped"), 0)
        self.assertIsNone(throttle.due("refused"))
        clock.advance(10)
        self.assertEqual(throttle.due("stopped"), 0)
        self.assertEqual(throttle.due("refused"), 1)
