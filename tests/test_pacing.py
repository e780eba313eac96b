"""
Tests for L{portal.forwarding.pacing}: bandwidth caps on a clock, and the userspace splice paced by
them.
"""

from __future__ import annotations

from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from portal.forwarding.pacing import MIN_BURST, QUANTUM, BandwidthCaps, burstFor
from portal.forwarding.splice import SpliceProtocol, splice


class BandwidthCapsTests(SynchronousTestCase):
    """
    L{BandwidthCaps} gives each stream a L{Pacer} over the buckets of its lease, identity and
    source.
    """

    def test_noCaps(self) -> None:
        """
        Without a cap no stream is paced.
        """
        self.assertIsNone(BandwidthCaps(Clock()).pacer("app", "id", "10.0.0.1"))

    def test_sharedPerKey(self) -> None:
        """
        Streams of one source share its bucket: bytes spent by one delay the other; a stream of
        another source is not delayed. Closing the pacers lets go of the buckets.
        """
        clock = Clock()
        caps = BandwidthCaps(clock, perSource=100_000)
        first = caps.pacer("app", "id", "10.0.0.1")
        second = caps.pacer("other", "id2", "10.0.0.1")
        third = caps.pacer("app", "id", "10.0.0.2")
        assert first is not None and second is not None and third is not None
        first.spend(MIN_BURST + 50_000)
        self.assertAlmostEqual(second.debt(), 0.5)
        self.assertEqual(second.allowance(), 0)
        self.assertEqual(third.debt(), 0.0)
        self.assertEqual(third.allowance(), MIN_BURST)
        clock.advance(second.delay())
        self.assertGreaterEqual(second.allowance(), QUANTUM)
        for pacer in (first, second, third):
            pacer.close()
            pacer.close()
        self.assertEqual(len(caps._kinds["source"]), 1)

    def test_slowestCapWins(self) -> None:
        """
        A stream under several caps waits for the slowest.
        """
        clock = Clock()
        caps = BandwidthCaps(clock, perLease=1_000_000, perIdentity=200_000, perSource=2_000_000)
        pacer = caps.pacer("app", "id", "10.0.0.1")
        assert pacer is not None
        pacer.spend(burstFor(200_000) + 200_000)
        self.assertAlmostEqual(pacer.debt(), 1.0)

    def test_burst(self) -> None:
        """
        Buckets hold a tenth of a second, at least L{MIN_BURST} bytes.
        """
        self.assertEqual(burstFor(1000), MIN_BURST)
        self.assertEqual(burstFor(10_000_000), 1_000_000)

    def test_badRate(self) -> None:
        """
        A negative rate is refused.
        """
        self.assertRaises(ValueError, BandwidthCaps, Clock(), -1.0)


class Side(SpliceProtocol):
    """
    A splice end with nothing of its own.
    """


class PacedSpliceTests(SynchronousTestCase):
    """
    The userspace splice with a pacer stops reading a side whose bytes put the buckets in debt,
    until the debt is paid, without undoing or being undone by backpressure.
    """

    def setUp(self) -> None:
        """
        Splice two in-memory ends under a 100 kB/s cap on the lease.
        """
        self.clock = Clock()
        self.caps = BandwidthCaps(self.clock, perLease=100_000)
        pacer = self.caps.pacer("app", None, "10.0.0.1")
        assert pacer is not None
        self.a, self.b = Side(), Side()
        self.aTransport, self.bTransport = StringTransport(), StringTransport()
        self.a.makeConnection(self.aTransport)
        self.b.makeConnection(self.bTransport)
        splice(self.a, self.b, pacer=pacer)

    def test_producer(self) -> None:
        """
        The paced producer is a push producer.
        """
        assert self.a.paced is not None
        self.assertTrue(verifyObject(IPushProducer, self.a.paced))

    def test_debtPausesReading(self) -> None:
        """
        Bytes beyond the burst are forwarded, then the side that read them is paused until the
        debt is paid; the other side keeps reading.
        """
        self.a.dataReceived(b"x" * (MIN_BURST + 50_000))
        self.assertEqual(len(self.bTransport.value()), MIN_BURST + 50_000)
        self.assertEqual(self.aTransport.producerState, "paused")
        self.assertEqual(self.bTransport.producerState, "producing")
        self.clock.advance(0.49)
        self.assertEqual(self.aTransport.producerState, "paused")
        self.clock.advance(0.01)
        self.assertEqual(self.aTransport.producerState, "producing")

    def test_backpressureAndDebt(self) -> None:
        """
        A side paused by both the other side's full buffer and the caps reads again only once
        both have let go, in either order.
        """
        self.a.dataReceived(b"x" * (MIN_BURST + 50_000))
        producer = self.bTransport.producer
        producer.pauseProducing()
        producer.resumeProducing()
        self.assertEqual(self.aTransport.producerState, "paused")
        producer.pauseProducing()
        self.clock.advance(1)
        self.assertEqual(self.aTransport.producerState, "paused")
        producer.resumeProducing()
        self.assertEqual(self.aTransport.producerState, "producing")

    def test_closeReleases(self) -> None:
        """
        When a side is lost, the pending resumption is cancelled and the buckets are let go.
        """
        self.a.dataReceived(b"x" * (MIN_BURST + 50_000))
        self.a.connectionLost()
        self.b.connectionLost()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(10)
        # Nobody holds the (now full) bucket: the next stream's close forgets it.
        pacer = self.caps.pacer("app", None, "10.0.0.1")
        assert pacer is not None
        pacer.close()
        self.assertEqual(len(self.caps._kinds["lease"]), 0)

    def test_averageRate(self) -> None:
        """
        A side that always has 16 KiB to read, whenever it may, moves the cap's rate on average.
        """
        moved = 0
        while self.clock.seconds() < 10:
            if self.aTransport.producerState == "producing":
                self.a.dataReceived(b"x" * 16384)
                moved += 16384
            self.clock.advance(0.01)
        rate = (moved - MIN_BURST) / 10
        self.assertLess(abs(rate - 100_000) / 100_000, 0.03)
