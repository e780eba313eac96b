"""
Tests for L{portal.forwarding.idlewatch} and the userspace splice's idle timeout.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransportWithDisconnection
from twisted.trial.unittest import SynchronousTestCase

from portal.forwarding.idlewatch import IdlePolicy, IdleWatch
from portal.forwarding.splice import SpliceProtocol, splice


class IdleWatchTests(SynchronousTestCase):
    """
    L{IdleWatch} calls back once when its counter stood still over a whole timeout.
    """

    def setUp(self) -> None:
        """
        A watch with a 10 s timeout over a counter the test moves.
        """
        self.clock = Clock()
        self.counter = 0
        self.idle: list[float] = []
        self.watch = IdleWatch(
            self.clock, 10.0, lambda: self.counter, lambda: self.idle.append(self.clock.seconds())
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
        self.assertRaises(ValueError, IdleWatch, self.clock, 0, lambda: 0, lambda: None)


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
