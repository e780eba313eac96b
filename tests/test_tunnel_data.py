"""
Tests for L{portal.tunnel.data}: the tunnel's stream data sessions and their pool.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import IProtocol, IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from portal.forwarding.sealedstream import SealedConnection
from portal.tunnel.data import (
    ATTACH_TIMEOUT,
    MAX_EXTRA,
    MAX_FAILURES_IN_A_ROW,
    RETRY_DELAY,
    DataSessionPool,
    TunnelDataSession,
)
from portal.wire.attach import (
    ACK,
    MAGIC,
    MAX_HEADER_LENGTH,
    NONCE_LENGTH,
    StreamHeader,
    attachProof,
    encodeStreamHeader,
)
from portal.wire.seal import Direction
from portal.wire.streamseal import StreamOpener, StreamSealer, streamKeys

KEY = b"k" * 32
SECRET = b"t" * 32
SESSION_ID = b"s" * 16
HEADER = StreamHeader(streamId=7, hostname="app.localhost", peerHost="192.0.2.1", peerPort=54321)


class RecordingProtocol(Protocol):
    """
    The protocol a stream is handed to; records what it gets.

    @ivar received: Bytes received, in order.
    @ivar lost: The reasons given to L{connectionLost}.
    """

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.lost: list[Failure | None] = []

    def dataReceived(self, data: bytes) -> None:
        """
        Record bytes.
        """
        self.received.append(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        """
        Record the close.
        """
        self.lost.append(reason)


class RecordingHandler:
    """
    A stream handler that builds L{RecordingProtocol}s and remembers the headers it was given.

    @ivar headers: Every header, in order.
    @ivar protocols: Every protocol built, in order.
    """

    def __init__(self) -> None:
        self.headers: list[StreamHeader] = []
        self.protocols: list[RecordingProtocol] = []

    def __call__(self, header: StreamHeader) -> IProtocol:
        """
        Record C{header} and build a protocol for its stream.
        """
        self.headers.append(header)
        protocol = RecordingProtocol()
        self.protocols.append(protocol)
        return protocol


class FakePool:
    """
    What a lone L{TunnelDataSession} needs from its pool, recorded.

    @ivar usedSessions: Sessions that reported a stream.
    @ivar lostSessions: Sessions that reported a close before a stream.
    """

    def __init__(self) -> None:
        self.handler = RecordingHandler()
        self.tls = False
        self.usedSessions: list[TunnelDataSession] = []
        self.lostSessions: list[TunnelDataSession] = []

    def used(self, session: TunnelDataSession) -> None:
        """
        Record a used session.
        """
        self.usedSessions.append(session)

    def lost(self, session: TunnelDataSession) -> None:
        """
        Record a lost session.
        """
        self.lostSessions.append(session)


def captureLogs(testCase: SynchronousTestCase) -> EventLoggingObserver:
    """
    Capture log events for the duration of a test.

    @return: The observer holding the events.
    """
    observer = EventLoggingObserver()
    globalLogPublisher.addObserver(observer)
    testCase.addCleanup(globalLogPublisher.removeObserver, observer)
    return observer


class TunnelDataSessionTests(SynchronousTestCase):
    """
    Tests for L{TunnelDataSession}, the tunnel's side of the attach and the stream header.
    """

    def setUp(self) -> None:
        """
        Connect a data session to a string transport, and capture log events.
        """
        self.pool = FakePool()
        self.session = TunnelDataSession(self.pool, SESSION_ID, KEY)  # type: ignore[arg-type]
        self.transport = StringTransport()
        self.session.makeConnection(self.transport)
        self.nonce = os.urandom(NONCE_LENGTH)
        self.events = captureLogs(self)

    def attach(self) -> None:
        """
        Play the relay's part of the attach: nonce, then ACK.
        """
        self.session.dataReceived(self.nonce)
        self.session.dataReceived(ACK)

    def assertClosedWith(self, text: str) -> None:
        """
        Check that the session closed its connection and logged why.
        """
        self.assertTrue(self.transport.disconnecting)
        reasons = [e.get("reason", "") for e in self.events]
        self.assertTrue(any(text in r for r in reasons), reasons)

    def test_magic(self) -> None:
        """
        A new data session announces itself with L{MAGIC}, and nothing else.
        """
        self.assertEqual(self.transport.value(), MAGIC)

    def test_attachProof(self) -> None:
        """
        The relay's nonce is answered with the session id and its proof under the data key.
        """
        self.transport.clear()
        self.session.dataReceived(self.nonce[:5])
        self.assertEqual(self.transport.value(), b"")
        self.session.dataReceived(self.nonce[5:])
        self.assertEqual(self.transport.value(), attachProof(KEY, self.nonce, SESSION_ID))
        self.assertEqual(self.session.nonce, self.nonce)
        self.assertNoResult(self.session.attached)

    def test_attached(self) -> None:
        """
        The relay's ACK fires C{attached} with the session.
        """
        self.attach()
        self.assertIs(self.successResultOf(self.session.attached), self.session)
        self.assertFalse(self.transport.disconnecting)

    def test_notAcknowledged(self) -> None:
        """
        Anything but the ACK after the nonce closes the session with a log event.
        """
        self.session.dataReceived(self.nonce + b"\x02")
        self.assertClosedWith("did not acknowledge")
        self.assertNoResult(self.session.attached)

    def test_stream(self) -> None:
        """
        A stream header is decoded and given to the pool's handler; the stream's protocol gets the same
        transport and the bytes after the header, then later bytes.
        """
        self.attach()
        self.session.dataReceived(encodeStreamHeader(KEY, self.nonce, HEADER) + b"first")
        self.assertEqual(self.pool.handler.headers, [HEADER])
        self.assertEqual(self.pool.usedSessions, [self.session])
        [protocol] = self.pool.handler.protocols
        self.assertIs(protocol.transport, self.transport)
        self.session.dataReceived(b"second")
        self.assertEqual(protocol.received, [b"first", b"second"])

    def test_sealedStream(self) -> None:
        """
        In raw TCP mode the stream after the header is sealed: the stream's protocol gets the opened
        bytes, a sealed transport in front of the data session, and its writes go out sealed under
        the stream's tunnel-to-relay key.
        """
        self.session = TunnelDataSession(self.pool, SESSION_ID, KEY, SECRET)  # type: ignore[arg-type]
        self.transport = StringTransport()
        self.session.makeConnection(self.transport)
        self.attach()
        relayToTunnel, tunnelToRelay = streamKeys(SECRET, self.nonce)
        sealer = StreamSealer(relayToTunnel, Direction.RELAY_TO_TUNNEL)
        self.session.dataReceived(
            encodeStreamHeader(KEY, self.nonce, HEADER) + sealer.seal(b"first")
        )
        [protocol] = self.pool.handler.protocols
        self.assertIsInstance(protocol.transport, SealedConnection)
        self.assertEqual(protocol.received, [b"first"])
        self.transport.clear()
        assert protocol.transport is not None
        protocol.transport.write(b"reply")
        sealed = self.transport.value()
        self.assertEqual(
            StreamOpener(tunnelToRelay, Direction.TUNNEL_TO_RELAY).openFrame(sealed),
            (b"reply", len(sealed)),
        )

    def test_headerWithoutPayload(self) -> None:
        """
        A header with no bytes after it hands over the stream without delivering empty data.
        """
        self.attach()
        self.session.dataReceived(encodeStreamHeader(KEY, self.nonce, HEADER))
        [protocol] = self.pool.handler.protocols
        self.assertEqual(protocol.received, [])
        self.assertIs(protocol.transport, self.transport)

    def test_oneChunk(self) -> None:
        """
        Nonce, ACK, header and payload all arriving at once are each handled in turn.
        """
        header = encodeStreamHeader(KEY, self.nonce, HEADER)
        self.session.dataReceived(self.nonce + ACK + header + b"payload")
        self.assertTrue(self.session.attached.called)
        self.assertEqual(self.pool.handler.headers, [HEADER])
        self.assertEqual(self.pool.handler.protocols[0].received, [b"payload"])

    def test_byteByByte(self) -> None:
        """
        Nonce, ACK and header split into single bytes still attach and start the stream.
        """
        data = self.nonce + ACK + encodeStreamHeader(KEY, self.nonce, HEADER) + b"x"
        for i in range(len(data)):
            self.session.dataReceived(data[i : i + 1])
        self.assertEqual(self.pool.handler.headers, [HEADER])
        self.assertEqual(self.pool.handler.protocols[0].received, [b"x"])
        self.assertFalse(self.transport.disconnecting)

    def test_tamperedHeader(self) -> None:
        """
        A stream header whose MAC does not verify closes the session with a log event, and no stream
        starts.
        """
        self.attach()
        header = bytearray(encodeStreamHeader(KEY, self.nonce, HEADER))
        header[5] ^= 1
        self.session.dataReceived(bytes(header))
        self.assertClosedWith("failed authentication")
        self.assertEqual(self.pool.handler.headers, [])

    def test_headerForAnotherNonce(self) -> None:
        """
        A header authenticated for another data session's nonce is refused: headers cannot be replayed.
        """
        self.attach()
        self.session.dataReceived(encodeStreamHeader(KEY, os.urandom(NONCE_LENGTH), HEADER))
        self.assertClosedWith("failed authentication")
        self.assertEqual(self.pool.handler.headers, [])

    def test_headerUnderAnotherKey(self) -> None:
        """
        A header authenticated with another control session's key is refused.
        """
        self.attach()
        self.session.dataReceived(encodeStreamHeader(b"x" * 32, self.nonce, HEADER))
        self.assertClosedWith("failed authentication")

    def test_headerTooLong(self) -> None:
        """
        A header length beyond the limit closes the session without waiting for the bytes.
        """
        self.attach()
        self.session.dataReceived((MAX_HEADER_LENGTH + 1).to_bytes(2, "big"))
        self.assertClosedWith("exceeds")

    def test_streamClosed(self) -> None:
        """
        Once a stream started, the connection's close goes to the stream's protocol, not the pool.
        """
        self.attach()
        self.session.dataReceived(encodeStreamHeader(KEY, self.nonce, HEADER))
        reason = Failure(ConnectionDone())
        self.session.connectionLost(reason)
        self.assertEqual(self.pool.handler.protocols[0].lost, [reason])
        self.assertEqual(self.pool.lostSessions, [])

    def test_lostBeforeAttach(self) -> None:
        """
        A connection closed before the ACK fails C{attached} and leaves the pool.
        """
        self.session.dataReceived(self.nonce)
        self.session.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(self.session.attached, ConnectionDone)
        self.assertEqual(self.pool.lostSessions, [self.session])

    def test_lostWhileIdle(self) -> None:
        """
        An idle attached session that closes leaves the pool.
        """
        self.attach()
        self.session.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.pool.lostSessions, [self.session])


class DataSessionPoolTests(SynchronousTestCase):
    """
    Tests for L{DataSessionPool} against a memory reactor.
    """

    size = 3

    def setUp(self) -> None:
        """
        Make a pool whose data sessions connect through a memory reactor, and capture log events.
        """
        self.reactor = MemoryReactorClock()
        self.handler = RecordingHandler()
        self.pool = DataSessionPool(self.reactor, self.endpoint, self.handler, size=self.size)
        self.events = captureLogs(self)
        self.connected: dict[int, tuple[TunnelDataSession, StringTransport]] = {}

    def endpoint(self) -> IStreamClientEndpoint:
        """
        @return: An endpoint to the relay through the memory reactor.
        """
        return TCP4ClientEndpoint(self.reactor, "192.0.2.9", 4017)

    @property
    def attempts(self) -> int:
        """
        How many connections the pool has started.
        """
        return len(self.reactor.tcpClients)

    def accept(self, index: int) -> tuple[TunnelDataSession, StringTransport]:
        """
        Complete the TCP connection of attempt C{index}.

        @return: The data session and its transport.
        """
        factory: Any = self.reactor.tcpClients[index][2]
        wrapper = factory.buildProtocol(IPv4Address("TCP", "192.0.2.9", 4017))
        transport = StringTransport()
        wrapper.makeConnection(transport)
        session: TunnelDataSession = wrapper._wrappedProtocol
        self.assertIsInstance(session, TunnelDataSession)
        self.connected[index] = (session, transport)
        return session, transport

    def attach(self, index: int, nonce: bytes | None = None) -> TunnelDataSession:
        """
        Complete the connection of attempt C{index} and the relay's part of its attach.

        @return: The attached session.
        """
        session, transport = self.accept(index)
        self.assertEqual(transport.value(), MAGIC)
        session.dataReceived((nonce or os.urandom(NONCE_LENGTH)) + ACK)
        return session

    def refuse(self, index: int) -> None:
        """
        Fail the TCP connection of attempt C{index}.
        """
        factory = self.reactor.tcpClients[index][2]
        factory.clientConnectionFailed(
            self.reactor.connectors[index], Failure(ConnectionRefusedError())
        )

    def startStream(self, session: TunnelDataSession) -> None:
        """
        Have the relay pair C{session} with a visitor.
        """
        session.dataReceived(encodeStreamHeader(KEY, session.nonce, HEADER))

    def test_nothingBeforeStart(self) -> None:
        """
        Without a control session the pool opens nothing, even when asked for more.
        """
        self.pool.want(2)
        self.assertEqual(self.attempts, 0)

    def test_startFills(self) -> None:
        """
        Starting the pool opens C{size} data sessions, bound to the control session.
        """
        self.pool.start(SESSION_ID, KEY)
        self.assertEqual(self.attempts, self.size)
        session, transport = self.accept(0)
        nonce = os.urandom(NONCE_LENGTH)
        session.dataReceived(nonce)
        self.assertEqual(transport.value(), MAGIC + attachProof(KEY, nonce, SESSION_ID))

    def test_attachedAreIdle(self) -> None:
        """
        Attached sessions count as idle, and a full pool opens no more.
        """
        self.pool.start(SESSION_ID, KEY)
        for i in range(self.size):
            self.attach(i)
        self.assertEqual(self.pool.idle, self.size)
        self.assertEqual(self.attempts, self.size)

    def test_usedReplaced(self) -> None:
        """
        A data session that gets a stream is handed to the handler and replaced by a new one.
        """
        self.pool.start(SESSION_ID, KEY)
        sessions = [self.attach(i) for i in range(self.size)]
        self.startStream(sessions[0])
        self.assertEqual(self.handler.headers, [HEADER])
        self.assertEqual(self.pool.idle, self.size - 1)
        self.assertEqual(self.attempts, self.size + 1)

    def test_want(self) -> None:
        """
        The relay asking for C{n} more data sessions opens C{n} beyond the pool size.
        """
        self.pool.start(SESSION_ID, KEY)
        self.pool.want(2)
        self.assertEqual(self.attempts, self.size + 2)

    def test_wantNotCumulative(self) -> None:
        """
        Repeated requests give the number of visitors waiting, not an increment.
        """
        self.pool.start(SESSION_ID, KEY)
        self.pool.want(2)
        self.pool.want(2)
        self.pool.want(1)
        self.assertEqual(self.attempts, self.size + 2)

    def test_wantBounded(self) -> None:
        """
        However many visitors wait, at most L{MAX_EXTRA} sessions are opened beyond the pool size.
        """
        self.pool.start(SESSION_ID, KEY)
        self.pool.want(MAX_EXTRA * 10)
        self.assertEqual(self.attempts, self.size + MAX_EXTRA)

    def test_extraNotReplaced(self) -> None:
        """
        Sessions opened at the relay's request are not replaced once used: the pool returns to its size.
        """
        self.pool.start(SESSION_ID, KEY)
        self.pool.want(1)
        sessions = [self.attach(i) for i in range(self.size + 1)]
        self.startStream(sessions[0])
        self.assertEqual(self.attempts, self.size + 1)
        self.assertEqual(self.pool.idle, self.size)
        self.startStream(sessions[1])
        self.assertEqual(self.attempts, self.size + 2)

    def test_stop(self) -> None:
        """
        Stopping the pool closes its idle sessions and opens no more.
        """
        self.pool.start(SESSION_ID, KEY)
        for i in range(self.size):
            self.attach(i)
        self.pool.stop()
        self.assertEqual(self.pool.idle, 0)
        self.assertTrue(all(t.disconnecting for (_, t) in self.connected.values()))
        self.pool.want(2)
        self.assertEqual(self.attempts, self.size)

    def test_stopLeavesStreams(self) -> None:
        """
        Stopping the pool does not close data sessions already carrying a stream.
        """
        self.pool.start(SESSION_ID, KEY)
        session = self.attach(0)
        self.startStream(session)
        self.pool.stop()
        self.assertFalse(self.connected[0][1].disconnecting)

    def test_attachedAfterStop(self) -> None:
        """
        A session that finishes its attach after the pool stopped is closed, not kept idle.
        """
        self.pool.start(SESSION_ID, KEY)
        self.pool.stop()
        self.attach(0)
        self.assertTrue(self.connected[0][1].disconnecting)
        self.assertEqual(self.pool.idle, 0)

    def test_restartWhileOpening(self) -> None:
        """
        A new control session fills the pool at once with sessions bound to it, even while sessions of
        the previous one are still connecting; those are closed when they attach.
        """
        self.pool.start(SESSION_ID, KEY)
        self.pool.stop()
        newSessionId = b"n" * 16
        self.pool.start(newSessionId, KEY)
        self.assertEqual(self.attempts, 2 * self.size)
        for i in range(2 * self.size):
            self.attach(i)
        self.assertEqual(self.pool.idle, self.size)
        for i in range(self.size):
            self.assertTrue(self.connected[i][1].disconnecting)
        self.assertEqual(self.attempts, 2 * self.size)

    def test_staleFailureIgnored(self) -> None:
        """
        A session of an ended control session that fails to connect neither schedules a retry nor
        changes the count of sessions opening for the new one.
        """
        self.pool.start(SESSION_ID, KEY)
        self.pool.stop()
        self.pool.start(b"n" * 16, KEY)
        self.refuse(0)
        self.reactor.advance(RETRY_DELAY)
        self.assertEqual(self.attempts, 2 * self.size)
        for i in range(self.size, 2 * self.size):
            self.attach(i)
        self.assertEqual(self.pool.idle, self.size)
        self.pool.want(1)
        self.assertEqual(self.attempts, 2 * self.size + 1)

    def test_lostIdle(self) -> None:
        """
        An idle session the relay closes leaves the pool.
        """
        self.pool.start(SESSION_ID, KEY)
        session = self.attach(0)
        session.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.pool.idle, 0)

    def test_retryAfterConnectFailure(self) -> None:
        """
        A data session that cannot connect is logged, and the pool tries again after L{RETRY_DELAY}.
        """
        self.pool.start(SESSION_ID, KEY)
        self.refuse(0)
        self.assertEqual(self.attempts, self.size)
        self.assertTrue(
            any("could not open a data session" in e["log_format"] for e in self.events)
        )
        self.reactor.advance(RETRY_DELAY - 0.1)
        self.assertEqual(self.attempts, self.size)
        self.reactor.advance(0.1)
        self.assertEqual(self.attempts, self.size + 1)

    def test_oneRetryForManyFailures(self) -> None:
        """
        Several failures at once schedule one retry, which refills the pool.
        """
        self.pool.start(SESSION_ID, KEY)
        for i in range(self.size):
            self.refuse(i)
        self.assertEqual(len(self.reactor.getDelayedCalls()), 1)
        self.reactor.advance(RETRY_DELAY)
        self.assertEqual(self.attempts, 2 * self.size)

    def test_stuckAsksForANewControlSession(self) -> None:
        """
        After L{MAX_FAILURES_IN_A_ROW} failures in a row with the control session up, the pool
        calls C{onStuck} (once) and schedules no retry: the new control session restarts it. A
        success in between starts the count again.
        """
        stuck: list[bool] = []
        self.pool = DataSessionPool(
            self.reactor,
            self.endpoint,
            self.handler,
            size=self.size,
            onStuck=lambda: stuck.append(True),
        )
        self.pool.start(SESSION_ID, KEY)
        attempt = 0
        for _ in range(MAX_FAILURES_IN_A_ROW - 1):
            self.refuse(attempt)
            attempt += 1
            if attempt == self.attempts:
                self.reactor.advance(RETRY_DELAY)
        self.assertEqual(stuck, [])
        self.attach(attempt)
        attempt += 1
        for _ in range(MAX_FAILURES_IN_A_ROW):
            while attempt >= self.attempts:
                self.reactor.advance(RETRY_DELAY)
            self.refuse(attempt)
            attempt += 1
        self.assertEqual(stuck, [True])
        self.assertTrue(
            any("reconnecting the control session" in e["log_format"] for e in self.events)
        )

    def test_retryCancelledByStop(self) -> None:
        """
        Stopping the pool cancels a pending retry.
        """
        self.pool.start(SESSION_ID, KEY)
        self.refuse(0)
        self.pool.stop()
        self.reactor.advance(RETRY_DELAY)
        self.assertEqual(self.attempts, self.size)

    def test_refusedAttach(self) -> None:
        """
        A session the relay closes before acknowledging it counts as a failure and is retried.
        """
        self.pool.start(SESSION_ID, KEY)
        session, transport = self.accept(0)
        session.dataReceived(os.urandom(NONCE_LENGTH))
        session.connectionLost(Failure(ConnectionDone()))
        self.reactor.advance(RETRY_DELAY)
        self.assertEqual(self.attempts, self.size + 1)

    def test_attachTimeout(self) -> None:
        """
        A session not acknowledged within L{ATTACH_TIMEOUT} is closed and retried.
        """
        self.pool.start(SESSION_ID, KEY)
        for i in range(1, self.size):
            self.attach(i)
        session, transport = self.accept(0)
        self.reactor.advance(ATTACH_TIMEOUT - 0.1)
        self.assertFalse(transport.disconnecting)
        self.reactor.advance(0.1)
        self.assertTrue(transport.disconnecting)
        session.connectionLost(Failure(ConnectionDone()))
        self.reactor.advance(RETRY_DELAY)
        self.assertEqual(self.attempts, self.size + 1)
        self.attach(self.size)
        self.assertEqual(self.pool.idle, self.size)

    def test_connectTimeout(self) -> None:
        """
        A connection attempt that never completes is abandoned after L{ATTACH_TIMEOUT} and retried.
        """
        self.pool.start(SESSION_ID, KEY)
        self.reactor.advance(ATTACH_TIMEOUT)
        self.assertTrue(all(c.stoppedConnecting for c in self.reactor.connectors))
        self.reactor.advance(RETRY_DELAY)
        self.assertEqual(self.attempts, 2 * self.size)
