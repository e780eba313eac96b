"""
Tests for L{portal.tunnel.backoff}.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from portal.tunnel.backoff import StableBackoff


class StableBackoffTests(SynchronousTestCase):
    """
    Redial delays grow exponentially up to a cap, with jitter, and short sessions count as failures
    until a session stays up for the stable period.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.backoff = StableBackoff(
            self.clock,
            initialDelay=1.0,
            maxDelay=8.0,
            factor=2.0,
            stableAfter=60.0,
            jitter=lambda: 0,
        )

    def test_exponentialWithCap(self) -> None:
        """
        Each failed attempt doubles the delay, never past the cap.
        """
        self.assertEqual([self.backoff(n) for n in range(1, 7)], [2.0, 4.0, 8.0, 8.0, 8.0, 8.0])

    def test_jitterAdded(self) -> None:
        """
        The jitter is added to every delay.
        """
        backoff = StableBackoff(self.clock, initialDelay=1.0, factor=2.0, jitter=lambda: 0.25)
        self.assertEqual(backoff(1), 2.25)

    def test_defaultJitterBounded(self) -> None:
        """
        The default jitter adds between 0 and 1 second.
        """
        backoff = StableBackoff(self.clock, initialDelay=1.0, factor=2.0)
        for _ in range(100):
            self.assertTrue(2.0 <= backoff(1) < 3.0)

    def test_shortSessionsKeepGrowing(self) -> None:
        """
        A relay that accepts and drops again and again is redialled later each time, although every
        connection succeeded (L{ClientService} passes 1 after each).
        """
        delays = []
        for _ in range(4):
            self.backoff.up()
            self.clock.advance(5)
            self.backoff.down()
            delays.append(self.backoff(1))
        self.assertEqual(delays, [4.0, 8.0, 8.0, 8.0])

    def test_stableSessionResets(self) -> None:
        """
        A session that stayed up for the stable period forgets the earlier failures.
        """
        for _ in range(3):
            self.backoff.up()
            self.backoff.down()
        self.assertEqual(self.backoff(1), 8.0)
        self.backoff.up()
        self.clock.advance(60)
        self.backoff.down()
        self.assertEqual(self.backoff(1), 2.0)

    def test_downWithoutUp(self) -> None:
        """
        A connection that ends before its session was established (the relay refused the Hello, or
        the TLS handshake failed) counts as a failure.
        """
        self.backoff.down()
        self.assertEqual(self.backoff(1), 4.0)
        self.backoff.down()
        self.assertEqual(self.backoff(1), 8.0)
