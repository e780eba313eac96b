"""
Tests for L{portal.forwarding.tokenbucket}.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from portal.forwarding.tokenbucket import KeyedBuckets, TokenBucket


class TokenBucketTests(SynchronousTestCase):
    """
    L{TokenBucket} refills at its rate up to its burst, on the clock it is given.
    """

    def test_startsFull(self) -> None:
        """
        A new bucket holds its burst: that many single tokens are taken at once, the next is refused.
        """
        bucket = TokenBucket(Clock(), rate=1.0, burst=3.0)
        self.assertEqual([bucket.take() for _ in range(4)], [True, True, True, False])

    def test_refillsAtRate(self) -> None:
        """
        Tokens come back at C{rate} per second of clock time, never above C{burst}.
        """
        clock = Clock()
        bucket = TokenBucket(clock, rate=2.0, burst=4.0)
        self.assertTrue(bucket.take(4))
        clock.advance(0.4)
        self.assertFalse(bucket.take(1))
        clock.advance(0.1)
        self.assertTrue(bucket.take(1))
        clock.advance(100)
        self.assertEqual(bucket.tokens, 4.0)

    def test_takeIsAllOrNothing(self) -> None:
        """
        A refused L{TokenBucket.take} leaves the tokens in the bucket.
        """
        bucket = TokenBucket(Clock(), rate=1.0, burst=5.0)
        self.assertFalse(bucket.take(6))
        self.assertEqual(bucket.tokens, 5.0)

    def test_spendIntoDebt(self) -> None:
        """
        L{TokenBucket.spend} may leave the bucket in debt; L{TokenBucket.delay} says how long until
        the debt (and any further amount) is paid.
        """
        clock = Clock()
        bucket = TokenBucket(clock, rate=1000.0, burst=100.0)
        bucket.spend(600)
        self.assertEqual(bucket.tokens, -500.0)
        self.assertAlmostEqual(bucket.delay(), 0.5)
        self.assertAlmostEqual(bucket.delay(100), 0.6)
        clock.advance(0.5)
        self.assertEqual(bucket.delay(), 0.0)
        self.assertFalse(bucket.full())
        clock.advance(0.2)
        self.assertTrue(bucket.full())

    def test_averageRate(self) -> None:
        """
        Spending whenever the bucket is out of debt moves C{rate} tokens a second on average, plus
        the burst once.
        """
        clock = Clock()
        bucket = TokenBucket(clock, rate=1000.0, burst=100.0)
        spent = 0
        while clock.seconds() < 10:
            bucket.spend(64)
            spent += 64
            clock.advance(bucket.delay())
        self.assertLessEqual(abs(spent - (10 * 1000 + 100)), 64)

    def test_badArguments(self) -> None:
        """
        A rate or burst that is not a positive finite number is refused.
        """
        for rate, burst in ((0, 1), (1, 0), (-1, 1), (float("inf"), 1), (1, float("nan"))):
            self.assertRaises(ValueError, TokenBucket, Clock(), rate, burst)


class KeyedBucketsTests(SynchronousTestCase):
    """
    L{KeyedBuckets} keeps one bucket per key, while held and until it is full again.
    """

    def test_takePerKey(self) -> None:
        """
        Each key has its own bucket.
        """
        buckets = KeyedBuckets(Clock(), rate=1.0, burst=2.0)
        self.assertEqual([buckets.take("a") for _ in range(3)], [True, True, False])
        self.assertTrue(buckets.take("b"))
        self.assertEqual(len(buckets), 2)

    def test_hasTakesNothing(self) -> None:
        """
        L{KeyedBuckets.has} says whether a key's bucket holds tokens without taking any; a key never
        seen has a full bucket (and gets none made).
        """
        clock = Clock()
        buckets = KeyedBuckets(clock, rate=1.0, burst=2.0)
        self.assertTrue(buckets.has("a"))
        self.assertEqual(len(buckets), 0)
        buckets.take("a")
        self.assertTrue(buckets.has("a"))
        self.assertFalse(buckets.has("a", 2.0))
        buckets.take("a")
        self.assertFalse(buckets.has("a"))
        self.assertFalse(buckets.has("a"))
        clock.advance(1.0)
        self.assertTrue(buckets.has("a"))
        self.assertTrue(buckets.take("a"))
        self.assertFalse(buckets.take("a"))

    def test_acquireShares(self) -> None:
        """
        Holders of one key share one bucket; it is kept after the last release until it is full,
        so a reconnect does not refill it.
        """
        clock = Clock()
        buckets = KeyedBuckets(clock, rate=10.0, burst=10.0)
        first = buckets.acquire("lease")
        second = buckets.acquire("lease")
        self.assertIs(first, second)
        first.spend(10)
        buckets.release("lease")
        buckets.release("lease")
        self.assertIs(buckets.acquire("lease"), first)
        buckets.release("lease")
        clock.advance(1)
        self.assertTrue(first.full())
        # Full and unheld: forgotten at the next release.
        buckets.acquire("lease")
        buckets.release("lease")
        self.assertEqual(len(buckets), 0)

    def test_unheldBounded(self) -> None:
        """
        At most C{maxKeys} unheld buckets are kept: full ones go first, then the oldest, down to
        half; held buckets are never forgotten.
        """
        buckets = KeyedBuckets(Clock(), rate=1.0, burst=1.0, maxKeys=4)
        held = buckets.acquire("held")
        for key in range(10):
            buckets.take(key)
        self.assertLessEqual(len(buckets), 1 + 4)
        self.assertIs(buckets.acquire("held"), held)
        # The newest key survived: its bucket is still empty.
        self.assertFalse(buckets.take(9))

    def test_badMaxKeys(self) -> None:
        """
        C{maxKeys} below 1 is refused.
        """
        self.assertRaises(ValueError, KeyedBuckets, Clock(), 1.0, 1.0, 0)
