"""
Tests for L{portal.relay.difficulty}.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from portal.relay.difficulty import AdaptiveDifficulty, DifficultyPolicy


class AdaptiveDifficultyTests(SynchronousTestCase):
    """
    The difficulty is 0 while registrations are rare and rises by C{stepBits} per doubling of the
    rate above C{quietRate}, up to C{maxBits}, and falls again when the rate does.
    """

    def setUp(self) -> None:
        """
        A difficulty on a fake clock: quiet at 1 a second, 10 s window, 8 bits then 2 per doubling,
        at most 14.
        """
        self.clock = Clock()
        self.policy = DifficultyPolicy(
            quietRate=1.0, window=10.0, baseBits=8, stepBits=2, maxBits=14
        )
        self.difficulty = AdaptiveDifficulty(self.clock, self.policy)

    def steady(self, perSecond: int, seconds: int) -> None:
        """
        Note C{perSecond} registrations in every second for C{seconds} seconds.
        """
        for _ in range(seconds):
            for _ in range(perSecond):
                self.difficulty.note()
            self.clock.advance(1)

    def test_quiet(self) -> None:
        """
        At the quiet rate no work is asked.
        """
        self.assertEqual(self.difficulty.current(), 0)
        self.steady(1, 60)
        self.assertLessEqual(self.difficulty.rate, 1.0)
        self.assertEqual(self.difficulty.current(), 0)

    def test_rises(self) -> None:
        """
        A sustained rate of 2, 3, 6 a second (measured as about 1.9, 2.85, 5.7: between 1 and 2
        times the quiet rate, 2 and 4, 4 and 8) asks for 8, 10, 12 bits; far above, C{maxBits}.
        """
        seen = []
        for perSecond in (2, 3, 6, 1000):
            self.difficulty = AdaptiveDifficulty(self.clock, self.policy)
            self.steady(perSecond, 100)
            seen.append(self.difficulty.current())
        self.assertEqual(seen, [8, 10, 12, 14])

    def test_falls(self) -> None:
        """
        After a flood stops, the difficulty returns to 0 within a few windows.
        """
        self.steady(100, 20)
        self.assertEqual(self.difficulty.current(), 14)
        self.clock.advance(30)
        self.assertGreater(self.difficulty.current(), 0)
        self.clock.advance(40)
        self.assertEqual(self.difficulty.current(), 0)

    def test_off(self) -> None:
        """
        With C{maxBits} 0 no work is ever asked.
        """
        self.difficulty = AdaptiveDifficulty(self.clock, DifficultyPolicy(maxBits=0))
        self.steady(1000, 5)
        self.assertEqual(self.difficulty.current(), 0)

    def test_policyChecked(self) -> None:
        """
        A policy with a rate that is not positive or bits out of range is refused.
        """
        self.assertRaises(ValueError, DifficultyPolicy, quietRate=0)
        self.assertRaises(ValueError, DifficultyPolicy, window=-1)
        self.assertRaises(ValueError, DifficultyPolicy, maxBits=33)
        self.assertRaises(ValueError, DifficultyPolicy, baseBits=-1)
