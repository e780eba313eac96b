"""
Token buckets on an injected clock: rate limits for requests (one token each) and bandwidth caps (one
token per byte).

A bucket holds up to C{burst} tokens and gains C{rate} tokens a second. L{TokenBucket.take} is all or
nothing (a request is allowed or refused); L{TokenBucket.spend} always succeeds and may leave the
bucket in debt, which L{TokenBucket.delay} turns into the time to wait (bytes already read must be
forwarded; the reader is paused until the debt is paid). The bucket reads the clock only when asked,
so an idle bucket costs nothing.

L{KeyedBuckets} holds one bucket per key (a source address, an identity, a lease name) for the
users that hold it, counted, so that a key's bucket lives exactly as long as something uses it.
"""

from __future__ import annotations

import math
from collections.abc import Hashable

from twisted.internet.interfaces import IReactorTime


class TokenBucket:
    """
    A token bucket.

    @ivar rate: Tokens gained per second.
    @ivar burst: Most tokens held.
    """

    def __init__(self, clock: IReactorTime, rate: float, burst: float) -> None:
        """
        @param clock: The source of the current time.
        @param rate: Tokens gained per second; positive.
        @param burst: Most tokens held, and the tokens a new bucket starts with; positive.
        @raise ValueError: If C{rate} or C{burst} is not a positive finite number.
        """
        for name, value in (("rate", rate), ("burst", burst)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"token bucket {name} must be a positive number, not {value}")
        self._clock = clock
        self.rate = float(rate)
        self.burst = float(burst)
        self._tokens = self.burst
        self._stamp = clock.seconds()

    def _refill(self) -> float:
        """
        Add the tokens gained since the last call.

        @return: The tokens now in the bucket (negative while in debt).
        """
        now = self._clock.seconds()
        elapsed = now - self._stamp
        self._stamp = now
        if elapsed > 0:
            self._tokens = min(self.burst, self._tokens + elapsed * self.rate)
        return self._tokens

    @property
    def tokens(self) -> float:
        """
        The tokens in the bucket now; negative while in debt.
        """
        return self._refill()

    def take(self, amount: float = 1.0) -> bool:
        """
        Take C{amount} tokens if the bucket has them.

        @param amount: Tokens wanted.
        @return: Whether they were taken; if not, the bucket is unchanged.
        """
        if self._refill() >= amount:
            self._tokens -= amount
            return True
        return False

    def spend(self, amount: float) -> None:
        """
        Take C{amount} tokens whether or not the bucket has them, leaving it in debt if not.

        @param amount: Tokens used (bytes already moved, for example).
        """
        self._refill()
        self._tokens -= amount

    def delay(self, amount: float = 0.0) -> float:
        """
        How long until the bucket holds C{amount} tokens more than nothing (it is out of debt).

        @param amount: Tokens wanted after the debt is paid; 0 to ask only about the debt.
        @return: Seconds to wait; 0 when they are there now.
        """
        missing = amount - self._refill()
        return max(0.0, missing / self.rate)

    def full(self) -> bool:
        """
        @return: Whether the bucket holds C{burst} tokens (it has been unused for a while).
        """
        return self._refill() >= self.burst


class KeyedBuckets:
    """
    One L{TokenBucket} per key: for rate limits per source address or identity (L{take}), and for
    bandwidth shared by every connection of a key (L{acquire} and L{release}).

    A bucket is kept while someone holds it, and after that until it is full again (so closing and
    reopening a connection does not refill it). At most C{maxKeys} unheld buckets are kept: beyond
    that, full ones are forgotten first, then the oldest.

    @ivar rate: Tokens gained per second by each bucket.
    @ivar burst: Most tokens each bucket holds.
    @ivar maxKeys: Most buckets nobody holds that are kept.
    """

    def __init__(
        self, clock: IReactorTime, rate: float, burst: float, maxKeys: int = 65536
    ) -> None:
        """
        @param clock: The source of the current time.
        @param rate: Tokens gained per second by each bucket.
        @param burst: Most tokens each bucket holds.
        @param maxKeys: Most buckets nobody holds that are kept.
        @raise ValueError: If C{rate} or C{burst} is not a positive finite number, or C{maxKeys}
            is less than 1.
        """
        # A throwaway bucket checks the arguments now rather than at the first use.
        TokenBucket(clock, rate, burst)
        if maxKeys < 1:
            raise ValueError(f"maxKeys must be at least 1, not {maxKeys}")
        self._clock = clock
        self.rate = rate
        self.burst = burst
        self.maxKeys = maxKeys
        self._buckets: dict[Hashable, TokenBucket] = {}
        self._holders: dict[Hashable, int] = {}

    def __len__(self) -> int:
        """
        @return: The number of keys with a bucket.
        """
        return len(self._buckets)

    def _bucket(self, key: Hashable) -> TokenBucket:
        """
        @return: The bucket of C{key}, created full if there is none.
        """
        bucket = self._buckets.get(key)
        if bucket is None:
            self._prune()
            bucket = self._buckets[key] = TokenBucket(self._clock, self.rate, self.burst)
        return bucket

    def take(self, key: Hashable, amount: float = 1.0) -> bool:
        """
        Take C{amount} tokens from the bucket of C{key} if it has them (a request rate limit).

        @param key: What the bucket limits (a source address, say).
        @param amount: Tokens wanted.
        @return: Whether they were taken.
        """
        return self._bucket(key).take(amount)

    def has(self, key: Hashable, amount: float = 1.0) -> bool:
        """
        Whether the bucket of C{key} holds C{amount} tokens now, taking none (a key without a
        bucket has a full one).

        @param key: What the bucket limits.
        @param amount: Tokens wanted.
        """
        bucket = self._buckets.get(key)
        return bucket is None or bucket.tokens >= amount

    def acquire(self, key: Hashable) -> TokenBucket:
        """
        Hold the bucket of C{key} until L{release}.

        @param key: What the bucket limits.
        @return: The bucket, shared with every other holder of C{key}.
        """
        bucket = self._bucket(key)
        self._holders[key] = self._holders.get(key, 0) + 1
        return bucket

    def release(self, key: Hashable) -> None:
        """
        Let go of the bucket of C{key}; once nobody holds it, it may be forgotten when full.

        @param key: A key given to L{acquire}.
        """
        holders = self._holders.get(key, 0) - 1
        if holders > 0:
            self._holders[key] = holders
        else:
            self._holders.pop(key, None)
            bucket = self._buckets.get(key)
            if bucket is not None and bucket.full():
                del self._buckets[key]

    def _prune(self) -> None:
        """
        Before adding a bucket: if C{maxKeys} unheld buckets are kept, forget the full ones, and if
        that leaves more than half of C{maxKeys}, the oldest down to half (so a flood of new keys
        costs amortised constant time per key).
        """
        unheld = len(self._buckets) - len(self._holders)
        if unheld < self.maxKeys:
            return
        for key in [k for k, b in self._buckets.items() if k not in self._holders and b.full()]:
            del self._buckets[key]
            unheld -= 1
        target = self.maxKeys // 2
        for key in list(self._buckets):
            if unheld <= target:
                break
            if key not in self._holders:
                del self._buckets[key]
                unheld -= 1
