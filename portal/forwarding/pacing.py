"""
Bandwidth caps: the bytes of a stream paced by token buckets shared per lease, per identity and per
source address (L{BandwidthCaps}), on both forwarding paths.

A L{Pacer} is one stream's view of its buckets (both directions count against the same buckets).
The userspace splice spends what it has read and, when a bucket is in debt, stops reading the side
that read it until the debt is paid (L{PacedProducer}, which keeps that pause apart from the
backpressure pause of the other side's transport). The kernel splice asks L{Pacer.allowance} before
each C{os.splice} call, moves at most that much, and waits for L{Pacer.delay} when it is nothing: bytes
move in bounded chunks paced by the buckets.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from zope.interface import implementer

from portal.forwarding.tokenbucket import KeyedBuckets, TokenBucket

#: Fewest bytes a paced direction waits for before it reads again (unless the burst is smaller):
#: pacing in tiny chunks would cost a system call per few bytes.
QUANTUM = 16 * 1024
#: Fewest bytes a bucket holds (its burst); larger rates hold a tenth of a second.
MIN_BURST = 64 * 1024


def burstFor(rate: float) -> float:
    """
    The burst of a bandwidth cap's buckets.

    @param rate: Bytes per second.
    @return: A tenth of a second of C{rate}, at least L{MIN_BURST} bytes.
    """
    return max(float(MIN_BURST), rate / 10)


class Pacer:
    """
    The token buckets one stream's bytes are counted against.

    @ivar clock: The buckets' clock, which schedules the end of a pause.
    """

    def __init__(
        self, clock: IReactorTime, buckets: Sequence[TokenBucket], release: Any = None
    ) -> None:
        """
        @param clock: The buckets' clock, which schedules the end of a pause.
        @param buckets: The buckets; at least one.
        @param release: Called once by L{close}, to let go of shared buckets.
        """
        self.clock = clock
        self._buckets = tuple(buckets)
        self._release = release
        self._quantum = min([QUANTUM] + [int(b.burst) for b in self._buckets])

    def spend(self, amount: int) -> None:
        """
        Count bytes moved.

        @param amount: Bytes.
        """
        for bucket in self._buckets:
            bucket.spend(amount)

    def allowance(self) -> int:
        """
        @return: Bytes that may be moved now: what every bucket holds, or 0 when some bucket holds
            less than a quantum (then wait L{delay}).
        """
        allowed = min(bucket.tokens for bucket in self._buckets)
        return int(allowed) if allowed >= self._quantum else 0

    def delay(self) -> float:
        """
        @return: Seconds until every bucket holds a quantum (0 if they do now).
        """
        return max(bucket.delay(self._quantum) for bucket in self._buckets)

    def debt(self) -> float:
        """
        @return: Seconds until every bucket is out of debt (0 if none is in debt).
        """
        return max(bucket.delay() for bucket in self._buckets)

    def close(self) -> None:
        """
        The stream ended: let go of the buckets (once).
        """
        release, self._release = self._release, None
        if release is not None:
            release()


class BandwidthCaps:
    """
    Bytes per second per lease, per identity and per source address, each shared by every stream
    of its key.

    @ivar perLease: Bytes per second of one lease's streams together; 0 for no cap.
    @ivar perIdentity: Bytes per second of one identity's streams together; 0 for no cap.
    @ivar perSource: Bytes per second of one source address's streams together; 0 for no cap.
    """

    def __init__(
        self,
        clock: IReactorTime,
        perLease: float = 0.0,
        perIdentity: float = 0.0,
        perSource: float = 0.0,
    ) -> None:
        """
        @param clock: The buckets' clock.
        @param perLease: Bytes per second of one lease's streams together; 0 for no cap.
        @param perIdentity: Bytes per second of one identity's streams together; 0 for no cap.
        @param perSource: Bytes per second of one source address's streams together; 0 for no cap.
        @raise ValueError: If a rate is negative or not finite.
        """
        self._clock = clock
        self.perLease = perLease
        self.perIdentity = perIdentity
        self.perSource = perSource
        self._kinds: dict[str, KeyedBuckets] = {}
        for kind, rate in (("lease", perLease), ("identity", perIdentity), ("source", perSource)):
            if rate < 0 or rate != rate:
                raise ValueError(f"bandwidth per {kind} must be 0 or more, not {rate}")
            if rate > 0:
                self._kinds[kind] = KeyedBuckets(clock, rate, burstFor(rate))

    def pacer(self, lease: str, identity: str | None, source: str) -> Pacer | None:
        """
        The pacer of a new stream.

        @param lease: The lease's name (or hostname).
        @param identity: The lease owner's identity id, if known.
        @param source: The visitor's source address (L{portal.forwarding.sources.sourceKey}).
        @return: A L{Pacer} holding the stream's buckets until it is closed, or L{None} when no
            cap applies.
        """
        keys = {"lease": lease, "identity": identity, "source": source}
        held = [(buckets, keys[kind]) for kind, buckets in self._kinds.items() if keys[kind]]
        if not held:
            return None

        def release() -> None:
            for buckets, key in held:
                buckets.release(key)

        return Pacer(self._clock, [buckets.acquire(key) for buckets, key in held], release)


@implementer(IPushProducer)
class PacedProducer:
    """
    Stands for a transport as the producer registered with the other side of a userspace splice:
    reading stops while the other side's buffer is full (backpressure) I{or} while the stream's
    buckets are in debt, and resumes only when neither holds.
    """

    _wake: IDelayedCall | None = None
    _full = False
    _stopped = False

    def __init__(self, transport: Any, pacer: Pacer) -> None:
        """
        @param transport: The transport read from (a push producer).
        @param pacer: The stream's pacer.
        """
        self._transport = transport
        self._pacer = pacer

    def pauseProducing(self) -> None:
        """
        The other side's buffer is full: stop reading.
        """
        self._full = True
        self._transport.pauseProducing()

    def resumeProducing(self) -> None:
        """
        The other side's buffer drained: read again, unless the buckets are in debt.
        """
        self._full = False
        if self._wake is None:
            self._transport.resumeProducing()

    def stopProducing(self) -> None:
        """
        The other side is gone.
        """
        self.cancel()
        self._stopped = True
        self._transport.stopProducing()

    def spent(self, amount: int) -> None:
        """
        Bytes were read and forwarded: count them, and stop reading until the debt is paid.

        @param amount: Bytes.
        """
        self._pacer.spend(amount)
        delay = self._pacer.debt()
        if delay > 0 and self._wake is None and not self._stopped:
            self._transport.pauseProducing()
            self._wake = self._pacer.clock.callLater(delay, self._paid)

    def _paid(self) -> None:
        """
        The debt is paid: read again unless the other side is still full.
        """
        self._wake = None
        if not self._full and not self._stopped:
            self._transport.resumeProducing()

    def cancel(self) -> None:
        """
        Forget a pending resumption (the stream is closing).
        """
        if self._wake is not None:
            if self._wake.active():
                self._wake.cancel()
            self._wake = None

    def close(self) -> None:
        """
        The stream ended: forget a pending resumption and let go of the buckets.
        """
        self.cancel()
        self._stopped = True
        self._pacer.close()
