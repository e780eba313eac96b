"""
Tests for L{portal.forwarding.writethrough}: writes go to the socket at once while nothing is
buffered, and take Twisted's buffered path in every other case, in order.
"""

from __future__ import annotations

import errno
from typing import Any

from twisted.internet import main, tcp
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from portal.forwarding.writethrough import WriteThroughServer


class _FakeSocket:
    """
    A socket whose C{send} takes at most C{room} bytes (C{None}: everything) or raises C{error}.
    """

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.room: int | None = None
        self.error: OSError | None = None

    def fileno(self) -> int:
        return 99

    def setblocking(self, flag: bool) -> None:
        pass

    closed = False

    def shutdown(self, how: int) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def send(self, data: Any) -> int:
        if self.error is not None:
            raise self.error
        data = bytes(data)
        if self.room is not None:
            data = data[: self.room]
            self.room -= len(data)
        self.sent.append(data)
        return len(data)


class _Lost(Protocol):
    reason: Any = None

    def connectionLost(self, reason: Any = None) -> None:
        self.reason = reason


class _Keeper:
    def __init__(self) -> None:
        self.kept: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.kept.append(data)


class _PullProducer:
    def __init__(self) -> None:
        self.resumed = 0

    def resumeProducing(self) -> None:
        self.resumed += 1

    def stopProducing(self) -> None:
        pass


class _OnFakeSocket(SynchronousTestCase):
    """
    A L{WriteThroughServer} on a fake socket and a memory reactor.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.socket = _FakeSocket()
        self.protocol = _Lost()
        port: Any = None
        socket: Any = self.socket
        self.transport = WriteThroughServer(
            socket, self.protocol, ("127.0.0.2", 4000), port, 1, self.reactor
        )
        self.protocol.makeConnection(self.transport)

    def writing(self) -> bool:
        """
        @return: Whether the transport waits for its socket to be writable.
        """
        return self.transport in self.reactor.getWriters()


class WriteThroughTests(_OnFakeSocket):
    """
    L{WriteThroughServer.write}.
    """

    def test_sentAtOnce(self) -> None:
        """
        With nothing buffered, a write is sent within the call and the transport does not wait
        for writability.
        """
        self.transport.write(b"hello")
        self.assertEqual(self.socket.sent, [b"hello"])
        self.assertFalse(self.writing())

    def test_remainderBuffered(self) -> None:
        """
        What the socket does not take is buffered and sent when it is writable, before later
        writes, which are buffered behind it.
        """
        self.socket.room = 3
        self.transport.write(b"hello")
        self.transport.write(b" world")
        self.assertEqual(self.socket.sent, [b"hel"])
        self.assertTrue(self.writing())
        self.socket.room = None
        self.assertIsNone(self.transport.doWrite())
        self.assertEqual(b"".join(self.socket.sent), b"hello world")
        self.assertFalse(self.writing())
        self.transport.write(b"!")
        self.assertEqual(self.socket.sent[-1], b"!")

    def test_wouldBlock(self) -> None:
        """
        A socket that takes nothing (EAGAIN) leaves the whole write buffered.
        """
        self.socket.error = BlockingIOError(errno.EAGAIN, "again")
        self.transport.write(b"hello")
        self.assertTrue(self.writing())
        self.socket.error = None
        self.transport.doWrite()
        self.assertEqual(self.socket.sent, [b"hello"])

    def test_brokenSocket(self) -> None:
        """
        A send that fails raises nothing from C{write}: the data is buffered and the reactor's
        write attempt meets the error and reports the connection lost.
        """
        self.socket.error = BrokenPipeError(errno.EPIPE, "broken pipe")
        self.transport.write(b"hello")
        self.assertTrue(self.writing())
        self.assertIs(self.transport.doWrite(), main.CONNECTION_LOST)

    def test_writeSequence(self) -> None:
        """
        A sequence is sent as one write.
        """
        self.transport.writeSequence([b"a", b"b", b"c"])
        self.assertEqual(self.socket.sent, [b"abc"])
        self.assertFalse(self.writing())

    def test_bufferedCases(self) -> None:
        """
        Closing, half-closed, aborted and TLS transports, pull producers and writes larger than
        C{SEND_LIMIT} take Twisted's buffered path.
        """
        cases: dict[str, Any] = {
            "disconnecting": lambda t: setattr(t, "disconnecting", True),
            "aborting": lambda t: setattr(t, "_aborting", True),
            "half-closing": lambda t: setattr(t, "_writeDisconnecting", True),
            # Under startTLS, Twisted's write goes to the TLS protocol (here one that keeps it).
            "tls": lambda t: (setattr(t, "TLS", True), setattr(t, "protocol", _Keeper())),
            "pull producer": lambda t: t.registerProducer(_PullProducer(), False),
        }
        for name, prepare in cases.items():
            self.setUp()
            prepare(self.transport)
            self.transport.write(b"hello")
            self.assertEqual(self.socket.sent, [], name)
        self.setUp()
        self.transport.write(b"x" * (tcp.Server.SEND_LIMIT + 1))
        self.assertEqual(self.socket.sent, [])
        self.assertTrue(self.writing())

    def test_pullProducerDriven(self) -> None:
        """
        A pull producer is still asked for more by the reactor's write events (writing through
        would leave nothing to drive it).
        """
        producer = _PullProducer()
        self.transport.registerProducer(producer, False)
        self.transport.write(b"chunk")
        self.assertTrue(self.writing())
        before = producer.resumed
        self.transport.doWrite()
        self.assertEqual(self.socket.sent, [b"chunk"])
        self.assertEqual(producer.resumed, before + 1)

    def test_streamingProducerNotPaused(self) -> None:
        """
        A streaming producer whose writes all went out is never paused.
        """
        paused = []

        class Streaming(_PullProducer):
            def pauseProducing(self) -> None:
                paused.append(True)

        self.transport.bufferSize = 4
        self.transport.registerProducer(Streaming(), True)
        self.transport.write(b"more than four bytes")
        self.assertEqual(self.socket.sent, [b"more than four bytes"])
        self.assertEqual(paused, [])


class CloseThroughTests(_OnFakeSocket):
    """
    L{WriteThroughServer.loseConnection}: with nothing buffered, the connection closes on the
    reactor's next turn without waiting for writability; otherwise as Twisted does.
    """

    def test_closedNextTurn(self) -> None:
        """
        Nothing buffered: the transport stops reading, never waits for writability, and the
        connection is lost cleanly on the next turn (socket closed, protocol told).
        """
        self.transport.write(b"bye")
        self.transport.loseConnection()
        self.assertFalse(self.writing())
        self.assertNotIn(self.transport, self.reactor.getReaders())
        self.assertIsNone(self.protocol.reason)
        self.reactor.advance(0)
        self.assertEqual(self.socket.sent, [b"bye"])
        self.assertTrue(self.socket.closed)
        self.assertTrue(self.protocol.reason.check(ConnectionDone))

    def test_writtenAfterwardsFlushedFirst(self) -> None:
        """
        Bytes written after C{loseConnection} (buffered, as on a closing Twisted transport) are
        sent before the connection closes.
        """
        self.transport.loseConnection()
        self.transport.write(b"late")
        self.reactor.advance(0)
        self.assertFalse(self.socket.closed)
        self.assertTrue(self.writing())
        self.assertIs(self.transport.doWrite(), main.CONNECTION_DONE)
        self.assertEqual(self.socket.sent, [b"late"])

    def test_bufferedDrainsFirst(self) -> None:
        """
        With bytes buffered, C{loseConnection} waits for writability as Twisted does.
        """
        self.socket.room = 1
        self.transport.write(b"hello")
        self.transport.loseConnection()
        self.reactor.advance(0)
        self.assertFalse(self.socket.closed)
        self.socket.room = None
        self.assertIs(self.transport.doWrite(), main.CONNECTION_DONE)
        self.assertEqual(b"".join(self.socket.sent), b"hello")

    def test_lostMeanwhile(self) -> None:
        """
        A connection lost before the next turn is not lost twice.
        """
        self.transport.loseConnection()
        reason = Failure(ConnectionDone())
        self.transport.connectionLost(reason)
        self.assertIs(self.protocol.reason, reason)
        self.reactor.advance(0)
        self.assertIs(self.protocol.reason, reason)


class SharedKeysTests(SynchronousTestCase):
    """
    The transports' attribute names fit the interpreter's shared instance keys (issue 16: memory
    per idle connection).
    """

    def test_laterNamesShared(self) -> None:
        """
        Names a relay's connection sets only later (a producer registered, its buffer taken over by
        the kernel splice) do not give each connection an instance dictionary of its own (about
        0.8 KB each): doing so on 200 connections allocates well under 200 bytes per connection.
        """
        import tracemalloc

        from portal.forwarding.kernelsplice import takeUnsent

        reactor = MemoryReactorClock()
        transports = []
        for _ in range(200):
            port: Any = None
            socket: Any = _FakeSocket()
            transports.append(
                WriteThroughServer(socket, _Lost(), ("127.0.0.2", 4000), port, 1, reactor)
            )
        producer = _PullProducer()
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        before = tracemalloc.get_traced_memory()[0]
        for transport in transports:
            transport.registerProducer(producer, True)
            transport.unregisterProducer()
            takeUnsent(transport)
        grown = tracemalloc.get_traced_memory()[0] - before
        self.assertLess(grown / len(transports), 200)

    def test_logTextsMadeWhenAsked(self) -> None:
        """
        The transport keeps no log prefix or C{repr} text per connection, and makes them as
        Twisted's server transport does when asked.
        """
        reactor = MemoryReactorClock()
        factory: Any = None
        port: Any = tcp.Port(4443, factory, reactor=reactor)
        port._realPortNumber = 4443
        socket: Any = _FakeSocket()
        transport = WriteThroughServer(socket, _Lost(), ("127.0.0.2", 4000), port, 7, reactor)
        self.assertNotIn("logstr", vars(transport))
        self.assertNotIn("repstr", vars(transport))
        self.assertEqual(transport.logPrefix(), "_Lost,7,127.0.0.2")
        self.assertEqual(repr(transport), "<_Lost #7 on 4443>")
        socket = _FakeSocket()
        twisted = tcp.Server(socket, _Lost(), ("127.0.0.2", 4000), port, 7, reactor)
        self.assertEqual(transport.logPrefix(), twisted.logPrefix())
        self.assertEqual(repr(transport), repr(twisted))
