"""
Tests for L{portal.forwarding.splice}.
"""

from __future__ import annotations

from typing import TypeVar

from twisted.internet.interfaces import (
    IConsumer,
    IHalfCloseableDescriptor,
    IHalfCloseableProtocol,
    IProducer,
    IPushProducer,
)
from twisted.internet.testing import StringTransport, StringTransportWithDisconnection
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import directlyProvides, implementer
from zope.interface.verify import verifyObject

from portal.forwarding.splice import (
    SpliceProtocol,
    closeWriteSide,
    pauseReading,
    resumeReading,
    splice,
)


# Only the declaration matters: closeWriteSide asks the class whether it is a half-closeable descriptor.
@implementer(IHalfCloseableDescriptor)
class HalfCloseableTransport(StringTransport):  # type: ignore[misc]
    """
    A TCP-like transport that can shut down its writing direction alone; like TCP, its
    C{loseConnection} only starts closing (C{disconnecting}), the protocol hears of it later.

    @ivar writeClosed: Whether L{loseWriteConnection} was called.
    """

    writeClosed = False

    def loseWriteConnection(self) -> None:
        """
        Record the half-close, as TCP's C{shutdown(SHUT_WR)} would.
        """
        self.writeClosed = True


class CountingTransport(StringTransport):
    """
    A transport that counts how often it was paused as a producer.

    @ivar pauses: The number of L{pauseProducing} calls.
    """

    pauses = 0

    def pauseProducing(self) -> None:
        """
        Count, then pause.
        """
        self.pauses += 1
        super().pauseProducing()


@implementer(IConsumer)
class BoundedConsumer:
    """
    A transport with a bounded write buffer: like TCP's, it pauses its producer once more than
    C{limit} bytes are waiting and resumes it when the reader drains it.

    @ivar buffered: Bytes written and not yet drained.
    @ivar delivered: Bytes drained so far.
    @ivar highWater: The most bytes ever buffered at once.
    """

    producer: IPushProducer | None = None
    disconnecting = False

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.buffered = 0
        self.delivered = 0
        self.highWater = 0
        self._paused = False

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        """
        Remember the producer that fills this buffer.
        """
        self.producer = IPushProducer(producer)

    def unregisterProducer(self) -> None:
        """
        Forget the producer.
        """
        self.producer = None

    def write(self, data: bytes) -> None:
        """
        Buffer C{data}; pause the producer once the buffer is over the limit.
        """
        self.buffered += len(data)
        self.highWater = max(self.highWater, self.buffered)
        if self.buffered > self.limit and not self._paused and self.producer is not None:
            self._paused = True
            self.producer.pauseProducing()

    def drain(self) -> None:
        """
        The slow reader took everything: resume the producer.
        """
        self.delivered += self.buffered
        self.buffered = 0
        if self._paused and self.producer is not None:
            self._paused = False
            self.producer.resumeProducing()

    def loseConnection(self) -> None:
        """
        Record the close.
        """
        self.disconnecting = True


_T = TypeVar("_T", bound=StringTransport)


def connected(transport: _T) -> tuple[SpliceProtocol, _T]:
    """
    @param transport: The transport to connect to.
    @return: A splice end connected to C{transport}, and C{transport}.
    """
    protocol = SpliceProtocol()
    if isinstance(transport, StringTransportWithDisconnection):
        transport.protocol = protocol
    protocol.makeConnection(transport)
    return protocol, transport


def connectedPair() -> tuple[
    SpliceProtocol,
    StringTransportWithDisconnection,
    SpliceProtocol,
    StringTransportWithDisconnection,
]:
    """
    @return: Two unpaired splice ends, each with its L{StringTransportWithDisconnection}.
    """
    a, at = connected(StringTransportWithDisconnection())
    b, bt = connected(StringTransportWithDisconnection())
    return a, at, b, bt


def producerOf(transport: StringTransport) -> IPushProducer:
    """
    @param transport: A consumer transport.
    @return: Its registered streaming producer.
    """
    producer = transport.producer
    assert producer is not None
    return producer  # type: ignore[no-any-return]


class ForwardingTests(SynchronousTestCase):
    """
    Bytes flow between spliced ends in both directions, in order.
    """

    def test_bufferedBytesFirst(self) -> None:
        """
        Bytes each side received before pairing reach the other side right after the given prefix and
        before anything received later.
        """
        a, at, b, bt = connectedPair()
        a.dataReceived(b"a1")
        a.dataReceived(b"a2")
        b.dataReceived(b"b1")
        splice(a, b, aFirst=b"<to a>", bFirst=b"<to b>")
        self.assertEqual(bt.value(), b"<to b>a1a2")
        self.assertEqual(at.value(), b"<to a>b1")
        a.dataReceived(b"a3")
        self.assertEqual(bt.value(), b"<to b>a1a2a3")

    def test_prefixWithoutBufferedBytes(self) -> None:
        """
        A prefix is written even when the other side buffered nothing, and nothing is written to a side
        that has neither.
        """
        a, at, b, bt = connectedPair()
        splice(a, b, bFirst=b"header")
        self.assertEqual(bt.value(), b"header")
        self.assertEqual(at.value(), b"")

    def test_bothWays(self) -> None:
        """
        After pairing, what one side receives is written to the other's transport, in both directions.
        """
        a, at, b, bt = connectedPair()
        splice(a, b)
        a.dataReceived(b"ping")
        b.dataReceived(b"pong")
        a.dataReceived(b"!")
        self.assertEqual(bt.value(), b"ping!")
        self.assertEqual(at.value(), b"pong")

    def test_peers(self) -> None:
        """
        Each end knows the other as its peer, and both are half-closeable protocols.
        """
        a, at, b, bt = connectedPair()
        splice(a, b)
        self.assertIs(a.peer, b)
        self.assertIs(b.peer, a)
        self.assertTrue(verifyObject(IHalfCloseableProtocol, a))

    def test_takePending(self) -> None:
        """
        L{SpliceProtocol.takePending} returns the bytes held so far once and forgets them.
        """
        a, at = connected(StringTransportWithDisconnection())
        a.dataReceived(b"x")
        a.dataReceived(b"y")
        self.assertEqual(a.takePending(), b"xy")
        self.assertEqual(a.takePending(), b"")


class BackpressureTests(SynchronousTestCase):
    """
    Each transport is the other's streaming producer, so a slow reader pauses the fast writer.
    """

    def test_producersRegistered(self) -> None:
        """
        Each transport is registered as the other's streaming producer.
        """
        a, at, b, bt = connectedPair()
        splice(a, b)
        self.assertIs(at.producer, bt)
        self.assertIs(bt.producer, at)
        self.assertTrue(at.streaming)
        self.assertTrue(bt.streaming)

    def test_fullBufferPausesOtherSide(self) -> None:
        """
        When one transport's write buffer is full (it pauses its producer), the other side stops being
        read until the buffer drains.
        """
        a, at, b, bt = connectedPair()
        splice(a, b)
        producerOf(bt).pauseProducing()
        self.assertEqual(at.producerState, "paused")
        self.assertEqual(bt.producerState, "producing")
        producerOf(bt).resumeProducing()
        self.assertEqual(at.producerState, "producing")
        producerOf(at).pauseProducing()
        self.assertEqual(bt.producerState, "paused")
        self.assertEqual(at.producerState, "producing")

    def test_spliceResumesBothSides(self) -> None:
        """
        A side paused while it waited for its peer (as the accepting side is) reads again once spliced.
        """
        a, at, b, bt = connectedPair()
        pauseReading(at)
        self.assertEqual(at.producerState, "paused")
        splice(a, b)
        self.assertEqual(at.producerState, "producing")
        self.assertEqual(bt.producerState, "producing")

    def test_pauseWithoutProducer(self) -> None:
        """
        L{pauseReading} and L{resumeReading} do nothing on a transport that is not a producer.
        """
        consumer = BoundedConsumer(1)
        pauseReading(consumer)  # type: ignore[arg-type]
        resumeReading(consumer)  # type: ignore[arg-type]

    def test_memoryBounded(self) -> None:
        """
        A fast sender into a slow reader is paused each time the reader's buffer passes its limit, so
        the relay never holds much more than one buffer plus one read, and every byte still arrives.
        """
        limit = 64 * 1024
        chunk = b"x" * (64 * 1024)
        total = 10 * 1024 * 1024
        fast, fastTransport = connected(CountingTransport())
        slow, _ = connected(StringTransportWithDisconnection())
        consumer = BoundedConsumer(limit)
        slow.transport = consumer  # type: ignore[assignment]
        splice(fast, slow)
        self.assertIs(consumer.producer, fastTransport)
        sent = 0
        while sent < total:
            if fastTransport.producerState == "paused":
                # The reactor would not read from a paused transport; the slow reader catches up.
                consumer.drain()
                continue
            fast.dataReceived(chunk)
            sent += len(chunk)
        consumer.drain()
        self.assertEqual(consumer.delivered, total)
        self.assertGreater(fastTransport.pauses, 0)
        self.assertLessEqual(consumer.highWater, limit + len(chunk))


class HalfCloseTests(SynchronousTestCase):
    """
    A half-close on one side becomes a half-close of the other where the transport supports it.
    """

    def test_halfCloseableTransport(self) -> None:
        """
        When one side stops sending, a TCP-like peer transport loses its producer and is half-closed,
        and neither side is fully closed while the other direction still flows.
        """
        a, at = connected(HalfCloseableTransport())
        b, bt = connected(HalfCloseableTransport())
        splice(a, b)
        a.readConnectionLost()
        self.assertTrue(bt.writeClosed)
        self.assertFalse(bt.disconnecting)
        self.assertFalse(at.disconnecting)
        self.assertFalse(at.writeClosed)
        # Nothing more will be produced into b's transport; a's still takes b's bytes.
        self.assertIsNone(bt.producer)
        self.assertIs(at.producer, bt)
        b.dataReceived(b"reply")
        self.assertEqual(at.value(), b"reply")

    def test_bothDirectionsFinished(self) -> None:
        """
        Once both directions have been half-closed in turn, both transports are closed.
        """
        a, at = connected(HalfCloseableTransport())
        b, bt = connected(HalfCloseableTransport())
        splice(a, b)
        a.readConnectionLost()
        b.writeConnectionLost()
        self.assertFalse(bt.disconnecting)
        b.readConnectionLost()
        self.assertTrue(at.writeClosed)
        self.assertTrue(bt.disconnecting)
        a.writeConnectionLost()
        self.assertTrue(at.disconnecting)

    def test_tlsTransportIsClosed(self) -> None:
        """
        A peer transport that cannot half-close (Twisted's TLS) is closed after its pending writes
        instead.
        """
        a, at = connected(HalfCloseableTransport())
        b, bt = connected(StringTransport())
        splice(a, b)
        a.readConnectionLost()
        self.assertTrue(bt.disconnecting)
        # Twisted's TLS sends close_notify only once its producer is gone.
        self.assertIsNone(bt.producer)

    def test_forwardedAttributesIgnored(self) -> None:
        """
        A transport whose instance claims half-close support (as a TLS wrapper forwarding attributes to
        the socket under it would) is closed, not half-closed: only the class is trusted.
        """
        transport = StringTransport()
        calls: list[str] = []
        transport.loseWriteConnection = lambda: calls.append("half")  # type: ignore[attr-defined]
        directlyProvides(transport, IHalfCloseableDescriptor)
        closeWriteSide(transport)
        self.assertEqual(calls, [])
        self.assertTrue(transport.disconnecting)

    def test_closeWriteSideHalfCloses(self) -> None:
        """
        L{closeWriteSide} half-closes a transport whose class is a half-closeable descriptor.
        """
        transport = HalfCloseableTransport()
        closeWriteSide(transport)
        self.assertTrue(transport.writeClosed)
        self.assertFalse(transport.disconnecting)

    def test_unpairedHalfCloseCloses(self) -> None:
        """
        A side that stops sending before it is paired is closed: there is nobody to forward to.
        """
        a, at = connected(HalfCloseableTransport())
        a.readConnectionLost()
        self.assertTrue(at.disconnecting)


class CloseTests(SynchronousTestCase):
    """
    A full close on either side closes the other.
    """

    def test_closeClosesPeer(self) -> None:
        """
        When one side's connection is lost, the peer's transport drops its producer and closes, and the
        peer's own loss does not loop back.
        """
        a, at, b, bt = connectedPair()
        splice(a, b)
        at.loseConnection()
        self.assertFalse(at.connected)
        self.assertFalse(bt.connected)
        self.assertIsNone(bt.producer)
        # Both let go of each other: no reference cycle for the cyclic garbage collector.
        self.assertIsNone(a.peer)
        self.assertIsNone(b.peer)

    def test_closeOtherDirection(self) -> None:
        """
        Closing works the same from the second side of the pair.
        """
        a, at, b, bt = connectedPair()
        splice(a, b)
        b.connectionLost(Failure(ConnectionError("reset")))
        self.assertFalse(at.connected)
        self.assertIsNone(at.producer)

    def test_spliceAfterLost(self) -> None:
        """
        Pairing with a side whose connection was already lost delivers its buffered bytes and closes
        the other side.
        """
        a, at, b, bt = connectedPair()
        a.dataReceived(b"last words")
        at.loseConnection()
        splice(a, b)
        self.assertEqual(bt.value(), b"last words")
        self.assertFalse(bt.connected)

    def test_spliceAfterLostSecond(self) -> None:
        """
        The same holds when the second argument is the side already lost.
        """
        a, at, b, bt = connectedPair()
        b.connectionLost(Failure(ConnectionError("gone")))
        splice(a, b, aFirst=b"hi")
        self.assertEqual(at.value(), b"hi")
        self.assertFalse(at.connected)

    def test_spliceAfterHalfClose(self) -> None:
        """
        Pairing with a side that already stopped sending (and is closing) delivers its buffered bytes,
        then half-closes the other side's TCP-like transport.
        """
        a, at = connected(HalfCloseableTransport())
        b, bt = connected(HalfCloseableTransport())
        b.dataReceived(b"request")
        b.readConnectionLost()
        self.assertTrue(bt.disconnecting)
        splice(a, b)
        self.assertEqual(at.value(), b"request")
        self.assertTrue(at.writeClosed)
        self.assertFalse(at.disconnecting)
