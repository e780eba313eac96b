"""
Tests for L{portal.forwarding.idlewatch} and the userspace splice's idle timeout.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransportWithDisconnection
from twisted.trial.unittest import SynchronousTestCase

from portal.forwarding.idlewatch import IdlePolicy, IdleSweep
from portal.forwarding.splice import SpliceProtocol, splice


class IdleWatchTests(SynchronousTestCase):
    """
    An L{IdleSweep}'s watch calls back once when its counter stood still over a whole timeout.
    """

    def setUp(self) -> None:
        """
        A watch with a 10 s timeout over a counter the test moves.
        """
        self.clock = Clock()
        self.counter = 0
        self.idle: list[float] = []
        self.sweep = IdleSweep(self.clock, 10.0)
        self.watch = self.sweep.watch(
            lambda: self.counter, lambda: self.idle.append(self.clock.seconds())
        )

    def test_silentClosedAfterOneToTwoTimeouts(self) -> None:
        """
        A stream whose last byte moved at 5 s is idle at the second reading after it, 20 s.
        """
        self.clock.advance(5)
        self.counter += 1
        self.clock.advance(5)
        self.assertEqual(self.idle, [])
        self.clock.advance(9.9)
        self.assertEqual(self.idle, [])
        self.clock.advance(0.1)
        self.assertEqual(self.idle, [20.0])
        self.clock.advance(100)
        self.assertEqual(self.idle, [20.0])

    def test_activityKeepsOpen(self) -> None:
        """
        Bytes in every period keep the stream open for as long as they come.
        """
        for _ in range(100):
            self.counter += 1
            self.clock.advance(9)
        self.assertEqual(self.idle, [])

    def test_stop(self) -> None:
        """
        A stopped watch schedules nothing and never calls back.
        """
        self.watch.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(100)
        self.assertEqual(self.idle, [])

    def test_badTimeout(self) -> None:
        """
        A timeout that is not positive is refused.
        """
        self.assertRaises(ValueError, IdleSweep, self.clock, 0)

    def test_oneTimerForAllStreams(self) -> None:
        """
        However many streams are watched, one timer reads them all; it stops with the last watch.
        """
        watches = [self.sweep.watch(lambda: 0, lambda: None) for _ in range(100)]
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        for watch in [self.watch, *watches]:
            watch.stop()
        self.assertEqual(len(self.sweep), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_lateWatchGetsAWholeTimeout(self) -> None:
        """
        A stream watched just before a reading is not closed at that reading, which only records
        its counter: it is idle at the next one, more than a timeout after it started.
        """
        self.clock.advance(9.9)
        idle: list[float] = []
        self.sweep.watch(lambda: 0, lambda: idle.append(self.clock.seconds()))
        self.clock.advance(0.1)
        self.assertEqual(idle, [])
        self.clock.advance(10)
        self.assertEqual(idle, [20.0])

    def test_onIdleBeforeClose(self) -> None:
        """
        The sweep's C{onIdle} is called once per idle stream, just before the stream is closed;
        a stream closed by another's close is not closed twice.
        """
        events: list[str] = []
        sweep = IdleSweep(self.clock, 10.0, lambda: events.append("idle"))
        second = sweep.watch(lambda: 0, lambda: events.append("second closed"))

        def closeBoth() -> None:
            events.append("first closed")
            second.stop()

        sweep.watch(lambda: 0, closeBoth)
        # The first watch went in after the second; the sweep reads in watch order.
        self.clock.advance(10)
        self.clock.advance(10)
        self.assertEqual(events, ["idle", "second closed", "idle", "first closed"])
        self.assertEqual(len(sweep), 0)

    def test_stopDuringClose(self) -> None:
        """
        A stream that stops a later-watched stream as it closes (a splice closing both its ends)
        leaves that one closed only once, by the stop.
        """
        events: list[str] = []
        sweep = IdleSweep(self.clock, 10.0, lambda: events.append("idle"))
        later: list[object] = []

        def closeFirst() -> None:
            events.append("first closed")
            for watch in later:
                watch.stop()  # type: ignore[attr-defined]

        sweep.watch(lambda: 0, closeFirst)
        later.append(sweep.watch(lambda: 0, lambda: events.append("second closed")))
        self.clock.advance(10)
        self.clock.advance(10)
        self.assertEqual(events, ["idle", "first closed"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_failedCloseKeepsWatching(self) -> None:
        """
        A stream whose close raises is logged; the other idle streams are closed all the same and
        the streams left are still read.
        """
        closed: list[str] = []

        def broken() -> None:
            raise RuntimeError("cannot close")

        self.watch.stop()
        sweep = self.sweep
        sweep.watch(lambda: 0, broken)
        sweep.watch(lambda: 0, lambda: closed.append("second"))
        self.clock.advance(10)
        self.counter += 1
        sweep.watch(lambda: self.counter, lambda: closed.append("third"))
        self.clock.advance(10)
        self.assertEqual(closed, ["second"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.clock.advance(10)
        self.assertEqual(closed, ["second", "third"])


class Side(SpliceProtocol):
    """
    A splice end with nothing of its own.
    """


class IdleSpliceTests(SynchronousTestCase):
    """
    A userspace splice with an idle policy closes both ends when no byte moves either way.
    """

    def setUp(self) -> None:
        """
        Splice two in-memory ends with a 10 s idle timeout.
        """
        self.clock = Clock()
        self.told: list[str] = []
        self.a, self.b = Side(), Side()
        self.aTransport = StringTransportWithDisconnection()
        self.bTransport = StringTransportWithDisconnection()
        for side, transport in ((self.a, self.aTransport), (self.b, self.bTransport)):
            transport.protocol = side
            side.makeConnection(transport)
        policy = IdlePolicy(self.clock, 10.0, lambda: self.told.append("idle"))
        splice(self.a, self.b, idle=policy)

    def test_bytesEitherWayKeepOpen(self) -> None:
        """
        Bytes in either direction count as activity.
        """
        for i in range(10):
            (self.a if i % 2 else self.b).dataReceived(b"x")
            self.clock.advance(10)
        self.assertFalse(self.aTransport.disconnecting or self.bTransport.disconnecting)

    def test_silentClosed(self) -> None:
        """
        After two silent readings both ends are closed, once, after the policy's C{onIdle}, and
        the watch is stopped.
        """
        self.a.dataReceived(b"x")
        self.clock.advance(10)
        self.assertEqual(self.told, [])
        self.clock.advance(10)
        self.assertEqual(self.told, ["idle"])
        self.assertFalse(self.aTransport.connected or self.bTransport.connected)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_closedStreamStopsWatch(self) -> None:
        """
        A stream that ends on its own leaves no timer behind.
        """
        self.aTransport.loseConnection()
        self.assertEqual(self.clock.getDelayedCalls(), [])
