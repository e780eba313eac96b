"""
The relay's adaptive proof-of-work difficulty: free while registrations are rare, rising with their
rate (the idea of Tor's onion-service proof-of-work defence, with a simpler controller).

The recent registration rate is an exponentially decaying count of registration challenges issued,
divided by its time constant: a burst is forgotten after a few time constants. While the rate is at
or below C{quietRate} a challenge asks for no work. Above it, the difficulty starts at C{baseBits}
and gains C{stepBits} for every doubling of the rate, up to C{maxBits}: each doubling of a flood
multiplies the work of each of its registrations by C{2 ** stepBits}.
"""

from __future__ import annotations

import math

import attrs
from twisted.internet.interfaces import IReactorTime

from portal.trust.proofofwork import MAX_BITS


def _checkBits(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    """
    An C{attrs} validator: a number of bits a relay may ask for.

    @raise ValueError: If C{value} is outside 0 to L{MAX_BITS}.
    """
    if not 0 <= value <= MAX_BITS:
        raise ValueError(f"{attribute.name} must be 0 to {MAX_BITS} bits, not {value}")


def _checkPositive(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    """
    An C{attrs} validator: a positive finite number.

    @raise ValueError: If C{value} is not one.
    """
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{attribute.name} must be a positive number, not {value}")


@attrs.frozen
class DifficultyPolicy:
    """
    How the proof-of-work difficulty follows the registration rate.

    @ivar quietRate: Registrations a second (over the whole relay) that need no work.
    @ivar window: Seconds, the time constant of the rate estimate.
    @ivar baseBits: The difficulty just above C{quietRate}.
    @ivar stepBits: Bits added for each doubling of the rate.
    @ivar maxBits: The highest difficulty; 0 turns the proof of work off.
    """

    quietRate: float = attrs.field(default=2.0, validator=_checkPositive)
    window: float = attrs.field(default=10.0, validator=_checkPositive)
    baseBits: int = attrs.field(default=12, validator=_checkBits)
    stepBits: int = attrs.field(default=2, validator=_checkBits)
    maxBits: int = attrs.field(default=22, validator=_checkBits)


class AdaptiveDifficulty:
    """
    The current proof-of-work difficulty of one relay.
    """

    def __init__(self, clock: IReactorTime, policy: DifficultyPolicy | None = None) -> None:
        """
        @param clock: The source of the current time.
        @param policy: How the difficulty follows the rate.
        """
        self._clock = clock
        self.policy = policy or DifficultyPolicy()
        self._count = 0.0
        self._stamp = clock.seconds()

    def _decayed(self) -> float:
        """
        @return: The decaying count of registrations, as of now.
        """
        now = self._clock.seconds()
        elapsed = now - self._stamp
        if elapsed > 0:
            self._count *= math.exp(-elapsed / self.policy.window)
            self._stamp = now
        return self._count

    def note(self) -> None:
        """
        Count one registration attempt (a registration challenge issued).
        """
        self._count = self._decayed() + 1.0

    @property
    def rate(self) -> float:
        """
        The estimated registrations a second, now.
        """
        return self._decayed() / self.policy.window

    def current(self) -> int:
        """
        @return: The difficulty in bits a registration challenge issued now asks for.
        """
        policy = self.policy
        rate = self.rate
        if policy.maxBits == 0 or rate <= policy.quietRate:
            return 0
        doublings = math.floor(math.log2(rate / policy.quietRate))
        return min(policy.maxBits, policy.baseBits + policy.stepBits * doublings)
