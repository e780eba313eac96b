"""
Tests for L{portal.forwarding.pacer}.
"""

from __future__ import annotations

from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from portal.forwarding.pacer import FairPacer, KeyedPacer, PacerFull


class FairPacerTests(SynchronousTestCase):
    """
    L{FairPacer} lets C{rate} starts a second through after a burst, queues the rest fairly and
    refuses beyond its queue.
    """

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.started: list[str] = []

    def starter(self, name: str):  # type: ignore[no-untyped-def]
        """
        @return: A start callable that records C{name}.
        """
        return lambda: self.started.append(name)

    def test_burstThenQueue(self) -> None:
        """
        The first C{burst} starts go at once (L{None}); later ones wait and start one per 1/rate.
        """
        pacer = FairPacer(self.clock, rate=10, burst=2, maxWaiting=10)
        self.assertIsNone(pacer.enter("a", self.starter("x")))
        self.assertIsNone(pacer.enter("a", self.starter("x")))
        waiting = [pacer.enter("a", self.starter(f"w{i}")) for i in range(3)]
        self.assertNotIn(None, waiting)
        self.assertEqual((pacer.waiting, pacer.delayed, self.started), (3, 3, []))
        self.clock.advance(0.1)
        self.assertEqual(self.started, ["w0"])
        self.clock.advance(0.1)
        self.clock.advance(0.1)
        self.assertEqual(self.started, ["w0", "w1", "w2"])
        self.assertEqual(pacer.waiting, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_noOvertaking(self) -> None:
        """
        While starts wait, a new one waits too even if a token has come back: it does not overtake
        the queue.
        """
        pacer = FairPacer(self.clock, rate=10, burst=1, maxWaiting=10)
        self.assertIsNone(pacer.enter("a", self.starter("first")))
        self.assertIsNotNone(pacer.enter("a", self.starter("queued")))
        self.clock.advance(0.05)
        self.assertIsNotNone(pacer.enter("b", self.starter("later")))
        self.clock.advance(0.05)
        self.assertEqual(self.started, ["queued"])
        self.clock.advance(0.1)
        self.assertEqual(self.started, ["queued", "later"])

    def test_roundRobinBetweenKeys(self) -> None:
        """
        Waiting starts are served one key at a time in turn: a key with many waiting does not delay
        another key's one by more than one turn.
        """
        pacer = FairPacer(self.clock, rate=100, burst=1, maxWaiting=100)
        pacer.enter("flood", self.starter("first"))
        for i in range(20):
            pacer.enter("flood", self.starter(f"flood{i}"))
        pacer.enter("user", self.starter("user"))
        self.clock.pump([0.01, 0.01, 0.015])
        self.assertEqual(self.started, ["flood0", "user", "flood1"])

    def test_full(self) -> None:
        """
        Beyond C{maxWaiting} waiting, L{FairPacer.enter} raises L{PacerFull} and queues nothing.
        """
        pacer = FairPacer(self.clock, rate=1, burst=1, maxWaiting=2)
        pacer.enter("a", self.starter("now"))
        pacer.enter("a", self.starter("w1"))
        pacer.enter("b", self.starter("w2"))
        self.assertRaises(PacerFull, pacer.enter, "c", self.starter("refused"))
        self.assertEqual(pacer.waiting, 2)
        self.clock.pump([1.0, 1.0, 1.0])
        self.assertEqual(self.started, ["w1", "w2"])
        self.assertEqual(pacer.peakWaiting, 2)

    def test_fullPerKey(self) -> None:
        """
        With C{maxWaitingPerKey}, one key cannot take more of the queue; other keys still can.
        """
        pacer = FairPacer(self.clock, rate=1, burst=1, maxWaiting=10, maxWaitingPerKey=2)
        pacer.enter("a", self.starter("now"))
        pacer.enter("a", self.starter("a1"))
        pacer.enter("a", self.starter("a2"))
        self.assertRaises(PacerFull, pacer.enter, "a", self.starter("refused"))
        self.assertIsNotNone(pacer.enter("b", self.starter("b1")))
        self.assertEqual(pacer.waiting, 3)

    def test_cancel(self) -> None:
        """
        A cancelled entry never starts and frees its place; cancelling the last one stops the
        timer; cancelling twice, or after the start, does nothing.
        """
        pacer = FairPacer(self.clock, rate=1, burst=1, maxWaiting=1)
        pacer.enter("a", self.starter("now"))
        entry = pacer.enter("a", self.starter("gone"))
        assert entry is not None
        entry.cancel()
        entry.cancel()
        self.assertEqual((pacer.waiting, self.clock.getDelayedCalls()), (0, []))
        later = pacer.enter("b", self.starter("later"))
        assert later is not None
        self.clock.advance(1.0)
        later.cancel()
        self.assertEqual(self.started, ["later"])
        self.assertEqual(pacer.waiting, 0)

    def test_cancelOneOfMany(self) -> None:
        """
        Cancelling one waiting entry leaves the others of its key in order.
        """
        pacer = FairPacer(self.clock, rate=10, burst=1, maxWaiting=10)
        pacer.enter("a", self.starter("now"))
        entries = [pacer.enter("a", self.starter(f"w{i}")) for i in range(3)]
        assert entries[1] is not None
        entries[1].cancel()
        self.clock.pump([0.1] * 3)
        self.assertEqual(self.started, ["w0", "w2"])

    def test_failingStartLogged(self) -> None:
        """
        A start that raises is logged and does not stop the others started in the same turn.
        """
        events: list[dict[str, object]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        pacer = FairPacer(self.clock, rate=10, burst=2, maxWaiting=10)
        self.assertIsNone(pacer.enter("a", self.starter("now")))
        self.assertIsNone(pacer.enter("a", self.starter("now")))

        def boom() -> None:
            raise RuntimeError("boom")

        pacer.enter("a", boom)
        pacer.enter("b", self.starter("after"))
        self.clock.advance(0.2)
        self.assertEqual(self.started, ["after"])
        failures = [e for e in events if e.get("log_level") == LogLevel.critical]
        self.assertEqual(len(failures), 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_stop(self) -> None:
        """
        L{FairPacer.stop} forgets the waiting starts and the timer.
        """
        pacer = FairPacer(self.clock, rate=1, burst=1, maxWaiting=5)
        pacer.enter("a", self.starter("now"))
        entry = pacer.enter("a", self.starter("never"))
        assert entry is not None
        pacer.stop()
        self.clock.advance(10)
        entry.cancel()
        self.assertEqual((self.started, pacer.waiting, self.clock.getDelayedCalls()), ([], 0, []))

    def test_invalid(self) -> None:
        """
        A queue of less than one, a rate or burst that is not positive, or fewer than one start per
        turn, is refused.
        """
        self.assertRaises(ValueError, FairPacer, self.clock, 1, 1, 0)
        self.assertRaises(ValueError, FairPacer, self.clock, 0, 1, 1)
        self.assertRaises(ValueError, FairPacer, self.clock, 1, -1, 1)
        self.assertRaises(ValueError, FairPacer, self.clock, 1, 1, 1, perTurn=0)

    def test_onePerTurn(self) -> None:
        """
        With C{perTurn=1}, a full bucket still lets one start through per turn of the reactor (a
        C{callLater(0)} ends the turn): the others of the turn wait and start one per later turn,
        with no wait for tokens.
        """
        pacer = FairPacer(self.clock, rate=10, burst=3, maxWaiting=10, perTurn=1)
        self.assertIsNone(pacer.enter("a", self.starter("now")))
        self.assertIsNotNone(pacer.enter("b", self.starter("b")))
        self.assertIsNotNone(pacer.enter("c", self.starter("c")))
        self.assertEqual((self.started, pacer.waiting), ([], 2))
        self.clock.advance(0)
        self.assertEqual(self.started, [])
        self.clock.advance(0.0001)
        self.assertEqual(self.started, ["b"])
        self.clock.advance(0)
        self.clock.advance(0.0001)
        self.assertEqual(self.started, ["b", "c"])
        self.assertEqual(pacer.waiting, 0)
        self.clock.advance(0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_turnStartedByTheQueueIsFull(self) -> None:
        """
        A start from the queue counts against its turn: a newcomer in that turn (here, one that
        comes while the queued start runs) waits behind it even when tokens remain.
        """
        pacer = FairPacer(self.clock, rate=10, burst=3, maxWaiting=10, perTurn=1)
        entered: list[object] = []

        def startB() -> None:
            self.started.append("b")
            entered.append(pacer.enter("c", self.starter("c")))

        pacer.enter("a", self.starter("now"))
        pacer.enter("b", startB)
        self.clock.advance(0)
        self.clock.advance(0.0001)
        self.assertEqual(self.started, ["b"])
        self.assertIsNotNone(entered[0])
        self.clock.advance(0)
        self.clock.advance(0.0001)
        self.assertEqual(self.started, ["b", "c"])

    def test_perTurnStillRated(self) -> None:
        """
        The turn limit adds to the rate, never raises it: with an empty bucket, starts wait for
        tokens as before.
        """
        pacer = FairPacer(self.clock, rate=10, burst=1, maxWaiting=10, perTurn=5)
        self.assertIsNone(pacer.enter("a", self.starter("now")))
        self.assertIsNotNone(pacer.enter("a", self.starter("w")))
        self.clock.advance(0)
        self.clock.advance(0.05)
        self.assertEqual(self.started, [])
        self.clock.advance(0.05)
        self.assertEqual(self.started, ["w"])

    def test_stopForgetsTheTurn(self) -> None:
        """
        L{FairPacer.stop} cancels the call that ends the turn.
        """
        pacer = FairPacer(self.clock, rate=10, burst=3, maxWaiting=10, perTurn=1)
        pacer.enter("a", self.starter("now"))
        pacer.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class KeyedPacerTests(SynchronousTestCase):
    """
    L{KeyedPacer} paces each key on its own.
    """

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.started: list[str] = []

    def test_eachKeyItsOwnRate(self) -> None:
        """
        A key over its rate waits; another key still starts at once, with its own burst.
        """
        pacer = KeyedPacer(self.clock, rate=10, burst=1, maxWaiting=5)
        self.assertIsNone(pacer.enter("flood", lambda: None))
        waiting = pacer.enter("flood", lambda: self.started.append("flood"))
        self.assertIsNotNone(waiting)
        self.assertIsNone(pacer.enter("user", lambda: None))
        self.assertEqual((pacer.waiting, pacer.delayed, len(pacer)), (1, 1, 2))
        self.clock.advance(0.1)
        self.assertEqual(self.started, ["flood"])

    def test_fullPerKey(self) -> None:
        """
        Each key has its own queue of C{maxWaiting}.
        """
        pacer = KeyedPacer(self.clock, rate=1, burst=1, maxWaiting=1)
        pacer.enter("a", lambda: None)
        pacer.enter("a", lambda: None)
        self.assertRaises(PacerFull, pacer.enter, "a", lambda: None)
        pacer.enter("b", lambda: None)
        self.assertIsNotNone(pacer.enter("b", lambda: None))

    def test_idleKeysForgotten(self) -> None:
        """
        Beyond C{maxKeys}, keys with nothing waiting and a full bucket are forgotten; a key that
        started recently (its bucket not full again) is kept.
        """
        pacer = KeyedPacer(self.clock, rate=1, burst=1, maxWaiting=5, maxKeys=2)
        pacer.enter("busy", lambda: None)
        pacer.enter("busy", lambda: None)
        pacer.enter("idle", lambda: None)
        self.clock.advance(0.5)
        self.clock.advance(0.6)
        pacer.enter("new", lambda: None)
        self.assertEqual(len(pacer), 2)
        self.assertEqual(pacer.waiting, 0)

    def test_manyAddressesOnceEach(self) -> None:
        """
        Keys that started once and went quiet are forgotten as later starts come, without a timer:
        a thousand addresses once each leave a handful of pacers, not a thousand.
        """
        pacer = KeyedPacer(self.clock, rate=10, burst=1, maxWaiting=5)
        for i in range(1000):
            pacer.enter(f"198.51.100.{i}", lambda: None)
            self.clock.advance(0.01)
        self.assertLess(len(pacer), 20)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop(self) -> None:
        """
        L{KeyedPacer.stop} forgets every key, waiting start and timer.
        """
        pacer = KeyedPacer(self.clock, rate=1, burst=1, maxWaiting=5)
        pacer.enter("a", lambda: None)
        pacer.enter("a", lambda: self.started.append("never"))
        pacer.stop()
        self.clock.advance(5)
        self.assertEqual((self.started, len(pacer), self.clock.getDelayedCalls()), ([], 0, []))

    def test_invalid(self) -> None:
        """
        The same arguments as L{FairPacer}'s are refused.
        """
        self.assertRaises(ValueError, KeyedPacer, self.clock, 0, 1, 1)
        self.assertRaises(ValueError, KeyedPacer, self.clock, 1, 1, 0)
