"""
Tests for L{portal.forwarding.kernelsplice}.

The kernel path moves bytes between real sockets, so these tests use the real reactor, with no network:
each connection is a C{socketpair(AF_UNIX, SOCK_STREAM)} (C{os.splice} works on unix stream sockets, and
Twisted's unix server transport is a L{twisted.internet.tcp.Server}). The inner end of each pair is what
the relay would hold and is handed to L{KernelSplice}; the outer end plays the visitor or the data session.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import socket
from collections.abc import Callable, Generator
from typing import Any

import attrs
from twisted.internet import reactor as _globalReactor
from twisted.internet import tcp
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks, succeed
from twisted.internet.error import ConnectionAborted
from twisted.internet.interfaces import IAddress, IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import FailTest, SynchronousTestCase, TestCase
from zope.interface import implementer

from portal.forwarding import kernelsplice
from portal.forwarding.idlewatch import IdlePolicy
from portal.forwarding.kernelsplice import CHUNK, KernelSplice, canSplice
from portal.forwarding.pacing import BandwidthCaps, Pacer, burstFor

#: The real reactor (typed loosely: it provides IReactorSocket, IReactorFDSet and IReactorTime).
reactor: Any = _globalReactor

#: Seconds any single wait may take before the test fails.
TIMEOUT = 10.0

#: What the relay writes to the data session before the visitor's bytes in these tests.
HEADER = b"HEADER"

_Gen = Generator[Deferred[Any], Any, None]

if not hasattr(os, "splice"):
    skip = "os.splice is Linux-only"


@implementer(IHalfCloseableProtocol)
class Recorder(Protocol):
    """
    A protocol that counts and hashes what it receives and lets a test wait for byte counts, for the
    end of the incoming stream (half-close) and for the end of the connection.

    @ivar count: Bytes received so far.
    @ivar digest: SHA-256 of the bytes received so far.
    @ivar received: The bytes received, while fewer than C{keep} (for exact comparisons of small
        exchanges without holding bulk transfers in memory).
    @ivar readLost: Whether the peer half-closed (L{readConnectionLost} was called).
    @ivar lostReason: Why the connection ended, once it has.
    """

    keep = 1 << 16

    def __init__(self) -> None:
        self.count = 0
        self.digest = hashlib.sha256()
        self.received = b""
        self.readLost = False
        self.lostReason: Failure | None = None
        self._byteWaiters: list[tuple[int, Deferred[None]]] = []
        self._readLostWaiters: list[Deferred[None]] = []
        self._lostWaiters: list[Deferred[None]] = []

    def dataReceived(self, data: bytes) -> None:
        """
        Count, hash and (while small) keep C{data}; fire byte-count waiters that are satisfied.

        @param data: Bytes read from the transport.
        """
        self.count += len(data)
        self.digest.update(data)
        if len(self.received) < self.keep:
            self.received += data
        ready = [(n, d) for n, d in self._byteWaiters if self.count >= n]
        self._byteWaiters = [(n, d) for n, d in self._byteWaiters if self.count < n]
        for _, d in ready:
            d.callback(None)

    def readConnectionLost(self) -> None:
        """
        The peer shut down its writing direction.
        """
        self.readLost = True
        waiters, self._readLostWaiters = self._readLostWaiters, []
        for d in waiters:
            d.callback(None)

    def writeConnectionLost(self) -> None:
        """
        Our own writing direction was shut down; nothing to record.
        """

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """
        The connection ended.

        @param reason: Why.
        """
        self.lostReason = reason
        waiters, self._lostWaiters = self._lostWaiters, []
        for d in waiters:
            d.callback(None)
        byteWaiters, self._byteWaiters = self._byteWaiters, []
        for n, d in byteWaiters:
            d.errback(
                FailTest(f"connection lost after {self.count} of {n} bytes: {reason.value!r}")
            )

    @property
    def tcpTransport(self) -> tcp.Connection:
        """
        @return: The transport, typed as the socket transport it is once connected.
        """
        assert isinstance(self.transport, tcp.Connection)
        return self.transport

    def whenReceived(self, n: int) -> Deferred[None]:
        """
        @param n: A byte count.
        @return: A Deferred that fires once C{n} bytes in total have arrived (and fails if the
            connection ends first, or after L{TIMEOUT} seconds).
        """
        if self.count >= n:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._byteWaiters.append((n, d))
        return d.addTimeout(TIMEOUT, reactor)

    def whenReadLost(self) -> Deferred[None]:
        """
        @return: A Deferred that fires once the peer half-closed (or after L{TIMEOUT} seconds, failing).
        """
        if self.readLost:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._readLostWaiters.append(d)
        return d.addTimeout(TIMEOUT, reactor)

    def whenLost(self) -> Deferred[None]:
        """
        @return: A Deferred that fires once the connection ended (or after L{TIMEOUT} seconds, failing);
            the reason is in L{lostReason}.
        """
        if self.lostReason is not None:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._lostWaiters.append(d)
        return d.addTimeout(TIMEOUT, reactor)


class _ThisProtocol(Factory):
    """
    A factory that hands out one given protocol (for adopting one socket).
    """

    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        """
        @param addr: Ignored.
        @return: The protocol given to the constructor.
        """
        return self._protocol


def adopt(sock: socket.socket, protocol: Recorder) -> tcp.Connection:
    """
    Give a connected unix stream socket to the reactor, and close the original (Twisted keeps a dup).

    @param sock: A connected socket.
    @param protocol: The protocol to run on it.
    @return: The new transport.
    """
    sock.setblocking(False)
    reactor.adoptStreamConnection(sock.fileno(), socket.AF_UNIX, _ThisProtocol(protocol))
    sock.close()
    return protocol.tcpTransport


def buffered(transport: tcp.Connection) -> int:
    """
    @param transport: A Twisted TCP transport.
    @return: How many bytes it has accepted from its protocol and not yet given to the kernel.
    """
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


def waitUntil(condition: Callable[[], bool], what: str) -> Deferred[None]:
    """
    Poll C{condition} on the reactor until it holds, for at most L{TIMEOUT} seconds.

    @param condition: What to wait for.
    @param what: A description for the failure message.
    @return: A Deferred that fires when C{condition()} is true, or fails with L{FailTest} at the deadline.
    """
    deadline = reactor.seconds() + TIMEOUT

    @inlineCallbacks
    def poll() -> _Gen:
        while not condition():
            if reactor.seconds() > deadline:
                raise FailTest(f"timed out waiting until {what}")
            yield deferLater(reactor, 0.005, lambda: None)

    return poll()


@attrs.frozen
class Rig:
    """
    A visitor connection and a data connection, the inner ends joined by a kernel splice.

    @ivar visitorOuter: The visitor's side.
    @ivar visitorInner: The relay's end of the visitor connection (spliced).
    @ivar dataOuter: The data session's side (the tunnel).
    @ivar dataInner: The relay's end of the data connection (spliced).
    @ivar splice: The splice, not started by L{KernelSpliceTestCase.rig} unless asked.
    """

    visitorOuter: Recorder
    visitorInner: Recorder
    dataOuter: Recorder
    dataInner: Recorder
    splice: KernelSplice

    @property
    def protocols(self) -> tuple[Recorder, Recorder, Recorder, Recorder]:
        """
        @return: All four protocols.
        """
        return (self.visitorOuter, self.visitorInner, self.dataOuter, self.dataInner)


class KernelSpliceTestCase(TestCase):
    """
    Builds spliced socket pairs on the real reactor and tears everything down after each test.
    """

    def rig(
        self,
        toB: bytes = HEADER,
        start: bool = True,
        early: bytes = b"",
        unsent: tuple[bytes, bytes] = (b"", b""),
        pacer: Pacer | None = None,
        idle: IdlePolicy | None = None,
    ) -> Rig:
        """
        Make the two socket pairs, adopt all four ends, and join the inner ends.

        @param toB: The splice's prefix toward the data session.
        @param start: Whether to start the splice.
        @param early: Bytes the visitor sends before the relay's end is adopted (they wait in the socket).
        @param unsent: Bytes the relay's protocols write to the visitor and to the data session just
            before the splice is made (they wait in Twisted's write buffers).
        @param pacer: The splice's bandwidth pacer, if any.
        @param idle: The splice's idle policy, if any.
        @return: The rig; everything in it is closed when the test ends.
        """
        visitorOuterSock, visitorInnerSock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        dataOuterSock, dataInnerSock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        if early:
            visitorOuterSock.sendall(early)
        protocols = [Recorder() for _ in range(4)]
        for sock, protocol in zip(
            (visitorOuterSock, visitorInnerSock, dataOuterSock, dataInnerSock),
            protocols,
            strict=True,
        ):
            adopt(sock, protocol)
        visitorOuter, visitorInner, dataOuter, dataInner = protocols
        visitorInner.tcpTransport.write(unsent[0])
        dataInner.tcpTransport.write(unsent[1])
        splice = KernelSplice(
            reactor,
            visitorInner.tcpTransport,
            dataInner.tcpTransport,
            toB=toB,
            pacer=pacer,
            idle=idle,
        )
        rig = Rig(visitorOuter, visitorInner, dataOuter, dataInner, splice)
        self.addCleanup(self.tearDownRig, rig)
        if start:
            splice.start()
        return rig

    def tearDownRig(self, rig: Rig) -> Deferred[Any]:
        """
        Drop the splice (if still running) and every connection, and wait until all four are gone, so
        the reactor is left clean.

        @param rig: The rig to tear down.
        @return: A Deferred that fires once every protocol saw C{connectionLost}.
        """
        if not rig.splice.finished:
            rig.splice.abort(Failure(Exception("test over")))
        for protocol in rig.protocols:
            if protocol.lostReason is None:
                protocol.tcpTransport.abortConnection()
        return gatherResults([protocol.whenLost() for protocol in rig.protocols])


class CanSpliceTests(KernelSpliceTestCase):
    """
    Tests for L{canSplice}.
    """

    def test_unixStreamTransports(self) -> None:
        """
        Adopted unix stream sockets get Twisted's unix server transport, a L{tcp.Connection}, which the
        kernel path accepts.
        """
        rig = self.rig(start=False)
        a, b = rig.visitorInner.tcpTransport, rig.dataInner.tcpTransport
        self.assertIsInstance(a, tcp.Connection)
        self.assertTrue(canSplice(a, b))

    def test_notTCP(self) -> None:
        """
        A transport that is not a Twisted socket transport (here a L{StringTransport}) is refused.
        """
        rig = self.rig(start=False)
        self.assertFalse(canSplice(rig.visitorInner.tcpTransport, StringTransport()))
        self.assertFalse(canSplice(StringTransport()))

    def test_disconnecting(self) -> None:
        """
        A transport that has started closing (C{loseConnection} called, buffer still flushing) is
        refused.
        """
        rig = self.rig(start=False)
        rig.dataInner.tcpTransport.write(b"bye")
        rig.dataInner.tcpTransport.loseConnection()
        self.assertTrue(rig.dataInner.tcpTransport.disconnecting)
        self.assertFalse(canSplice(rig.visitorInner.tcpTransport, rig.dataInner.tcpTransport))

    def test_disconnected(self) -> Deferred[None]:
        """
        A transport whose connection is over is refused.
        """
        rig = self.rig(start=False)
        rig.dataInner.tcpTransport.abortConnection()
        d = rig.dataInner.whenLost()
        d.addCallback(
            lambda _: self.assertFalse(
                canSplice(rig.visitorInner.tcpTransport, rig.dataInner.tcpTransport)
            )
        )
        return d

    def test_unsentBytes(self) -> None:
        """
        Bytes still in a transport's Twisted write buffer do not prevent the kernel path (the splice
        sends them first, see L{KernelSpliceTests.test_unsentBytesGoFirst}).
        """
        rig = self.rig(start=False)
        rig.dataInner.tcpTransport.write(b"ACK")
        self.assertEqual(buffered(rig.dataInner.tcpTransport), 3)
        self.assertTrue(canSplice(rig.visitorInner.tcpTransport, rig.dataInner.tcpTransport))


class KernelSpliceTests(KernelSpliceTestCase):
    """
    Tests for L{KernelSplice} moving bytes between real sockets.
    """

    @inlineCallbacks
    def test_prefixFirst(self) -> _Gen:
        """
        The data session receives the prefix, then the visitor's bytes (including bytes that were
        already waiting in the socket before the splice started); its replies reach the visitor.
        """
        rig = self.rig(early=b"early ")
        rig.visitorOuter.tcpTransport.write(b"hello")
        yield rig.dataOuter.whenReceived(len(b"HEADERearly hello"))
        self.assertEqual(rig.dataOuter.received, b"HEADERearly hello")
        rig.dataOuter.tcpTransport.write(b"world")
        yield rig.visitorOuter.whenReceived(len(b"world"))
        self.assertEqual(rig.visitorOuter.received, b"world")
        self.assertFalse(rig.splice.finished)
        # Nothing reached the relay's protocols: the bytes never went through Python.
        self.assertEqual((rig.visitorInner.count, rig.dataInner.count), (0, 0))

    @inlineCallbacks
    def test_unsentBytesGoFirst(self) -> _Gen:
        """
        Bytes the relay wrote just before pairing, still in Twisted's write buffers, are taken out of
        Twisted and sent first: before the prefix and the visitor's bytes toward the data session, and
        before the data session's bytes toward the visitor.
        """
        rig = self.rig(start=False, unsent=(b"WELCOME ", b"ACK "))
        rig.splice.start()
        self.assertEqual(buffered(rig.visitorInner.tcpTransport), 0)
        self.assertEqual(buffered(rig.dataInner.tcpTransport), 0)
        rig.visitorOuter.tcpTransport.write(b"hello")
        rig.dataOuter.tcpTransport.write(b"world")
        yield rig.dataOuter.whenReceived(len(b"ACK HEADERhello"))
        yield rig.visitorOuter.whenReceived(len(b"WELCOME world"))
        self.assertEqual(rig.dataOuter.received, b"ACK HEADERhello")
        self.assertEqual(rig.visitorOuter.received, b"WELCOME world")

    def test_bulkBothWays(self) -> Deferred[None]:
        """
        16 MiB each way, sent concurrently, arrive complete and unchanged in both directions.
        """
        return self.bulk(16 << 20)

    def test_bulkOneRound(self) -> Deferred[None]:
        """
        The bulk exchange also completes when every readiness event allows a single splice round, so
        each direction keeps coming back through the writable destination.
        """
        self.patch(kernelsplice, "MAX_ROUNDS", 1)
        return self.bulk(4 << 20)

    @inlineCallbacks
    def test_paced(self) -> _Gen:
        """
        Under a bandwidth cap both directions together move at the cap's rate (after the burst),
        in bounded chunks, intact; when the splice ends the caps are let go.
        """
        rate = 4 << 20
        caps = BandwidthCaps(reactor, perLease=rate)
        size = 1 << 20
        started = reactor.seconds()
        rig = yield self.bulk(size, caps.pacer("app", None, "127.0.0.1"))
        elapsed = reactor.seconds() - started
        expected = (2 * size - burstFor(rate)) / rate
        self.assertGreater(elapsed, expected * 0.9)
        self.assertLess(elapsed, expected * 1.5 + 0.2)
        rig.visitorOuter.tcpTransport.loseConnection()
        rig.dataOuter.tcpTransport.loseConnection()
        yield gatherResults([rig.visitorInner.whenLost(), rig.dataInner.whenLost()])
        self.assertTrue(rig.splice.finished)
        self.assertEqual(caps._kinds["lease"]._holders, {})

    @inlineCallbacks
    def test_idle(self) -> _Gen:
        """
        With an idle policy, a splice that moved bytes and then fell silent is aborted (both
        connections) after between one and two timeouts, once, telling the policy first.
        """
        told: list[float] = []
        rig = self.rig(idle=IdlePolicy(reactor, 0.2, lambda: told.append(reactor.seconds())))
        started = reactor.seconds()
        rig.visitorOuter.tcpTransport.write(b"hello")
        yield rig.dataOuter.whenReceived(len(HEADER) + 5)
        # Unix stream sockets: the outer ends see the relay's ends close as an end of stream.
        yield gatherResults(
            [
                rig.visitorInner.whenLost(),
                rig.dataInner.whenLost(),
                rig.visitorOuter.whenReadLost(),
                rig.dataOuter.whenReadLost(),
            ]
        )
        self.assertEqual(len(told), 1)
        self.assertGreaterEqual(told[0] - started, 0.2)
        self.assertTrue(rig.splice.finished)

    @inlineCallbacks
    def bulk(self, size: int, pacer: Pacer | None = None) -> _Gen:
        """
        Send C{size} random bytes each way at once and check both arrive intact.

        @param size: Bytes per direction.
        @param pacer: The splice's bandwidth pacer, if any.
        @return: A Deferred that fires with the rig when both directions were checked.
        """
        toData, toVisitor = os.urandom(size), os.urandom(size)
        rig = self.rig(pacer=pacer)
        rig.visitorOuter.tcpTransport.write(toData)
        rig.dataOuter.tcpTransport.write(toVisitor)
        yield gatherResults(
            [
                rig.dataOuter.whenReceived(len(HEADER) + size),
                rig.visitorOuter.whenReceived(size),
            ]
        )
        self.assertEqual(rig.dataOuter.count, len(HEADER) + size)
        self.assertEqual(rig.visitorOuter.count, size)
        self.assertEqual(
            rig.dataOuter.digest.hexdigest(), hashlib.sha256(HEADER + toData).hexdigest()
        )
        self.assertEqual(rig.visitorOuter.digest.hexdigest(), hashlib.sha256(toVisitor).hexdigest())
        return rig

    @inlineCallbacks
    def test_halfClose(self) -> _Gen:
        """
        The visitor's half-close reaches the data session after all its bytes, the other direction
        keeps working, and once the data session half-closes too the splice finishes and closes both
        relay-side connections.
        """
        rig = self.rig()
        rig.visitorOuter.tcpTransport.write(b"request")
        rig.visitorOuter.tcpTransport.loseWriteConnection()
        yield rig.dataOuter.whenReadLost()
        self.assertEqual(rig.dataOuter.received, b"HEADERrequest")
        self.assertFalse(rig.splice.finished)

        rig.dataOuter.tcpTransport.write(b"response")
        yield rig.visitorOuter.whenReceived(len(b"response"))
        self.assertEqual(rig.visitorOuter.received, b"response")
        self.assertFalse(rig.visitorOuter.readLost)

        rig.dataOuter.tcpTransport.loseWriteConnection()
        yield rig.visitorOuter.whenReadLost()
        yield gatherResults([rig.visitorInner.whenLost(), rig.dataInner.whenLost()])
        self.assertTrue(rig.splice.finished)
        self.assertEqual(rig.splice.directions[0].pipe, None)
        self.assertEqual(rig.splice.directions[1].pipe, None)
        self.assertUnlinked(rig.splice)
        # Both ends were closed without a shutdown(SHUT_RDWR) that would change nothing.
        for inner in (rig.visitorInner, rig.dataInner):
            transport: Any = inner.transport
            self.assertFalse(transport._shouldShutdown)
        self.assertEqual(self.flushLoggedErrors(), [])

    def assertUnlinked(self, kernelSplice: KernelSplice) -> None:
        """
        A finished splice's ends no longer refer to it or to their directions, nor does it keep
        its idle watch: no reference cycle is left for the cyclic garbage collector.
        """
        for end in (kernelSplice._a, kernelSplice._b):
            for name in ("_owner", "outgoing", "incoming"):
                self.assertFalse(hasattr(end, name), name)
        self.assertIsNone(kernelSplice._watch)

    @inlineCallbacks
    def test_abruptClose(self) -> _Gen:
        """
        When the data session closes outright while the visitor is still sending, the splice aborts
        and the visitor's connection is closed too, without logging an error.
        """
        rig = self.rig()
        rig.visitorOuter.tcpTransport.write(os.urandom(32 << 20))
        yield rig.dataOuter.whenReceived(1 << 20)
        rig.dataOuter.tcpTransport.abortConnection()
        yield gatherResults(
            [
                rig.visitorOuter.whenLost(),
                rig.visitorInner.whenLost(),
                rig.dataInner.whenLost(),
            ]
        )
        self.assertTrue(rig.splice.finished)
        # The splice dropped both relay-side connections (it did not wait for the visitor to finish).
        for protocol in (rig.visitorInner, rig.dataInner):
            assert protocol.lostReason is not None
            self.assertTrue(protocol.lostReason.check(ConnectionAborted))
        self.assertEqual(rig.splice.directions[0].pipe, None)
        self.assertEqual(rig.splice.directions[1].pipe, None)
        self.assertEqual(self.flushLoggedErrors(), [])

    @inlineCallbacks
    def test_slowReaderBackpressure(self) -> _Gen:
        """
        A data session that stops reading stops the splice reading from the visitor: the relay holds
        at most one pipe's worth (L{CHUNK}), the rest stays with the sender; once it reads again,
        everything arrives intact.
        """
        size = 64 << 20
        payload = os.urandom(size)
        rig = self.rig()
        rig.dataOuter.tcpTransport.pauseProducing()
        rig.visitorOuter.tcpTransport.write(payload)
        direction = rig.splice._a.outgoing

        yield waitUntil(
            lambda: rig.splice._a._reading is False and direction.pending > 0,
            "the visitor-to-data direction is paused with bytes in its pipe",
        )
        self.assertLessEqual(direction.pending, CHUNK)
        # The sender still holds most of the payload: the relay did not read it all into memory.
        self.assertGreater(buffered(rig.visitorOuter.tcpTransport), size * 3 // 4)
        self.assertEqual(rig.dataOuter.count, 0)

        rig.dataOuter.tcpTransport.resumeProducing()
        yield rig.dataOuter.whenReceived(len(HEADER) + size)
        self.assertEqual(rig.dataOuter.count, len(HEADER) + size)
        self.assertEqual(
            rig.dataOuter.digest.hexdigest(), hashlib.sha256(HEADER + payload).hexdigest()
        )

    @inlineCallbacks
    def test_idleHoldsNoPipe(self) -> _Gen:
        """
        An idle spliced connection holds no pipe; a direction borrows one from the pool only while its
        bytes are in flight, and gives it back once they are delivered.
        """
        rig = self.rig()
        self.assertIsNone(rig.splice.directions[0].pipe)
        self.assertIsNone(rig.splice.directions[1].pipe)
        yield rig.dataOuter.whenReceived(len(HEADER))
        self.assertIsNone(rig.splice.directions[0].pipe)
        self.assertIsNone(rig.splice.directions[1].pipe)

        rig.visitorOuter.tcpTransport.write(b"x")
        yield rig.dataOuter.whenReceived(len(HEADER) + 1)
        self.assertEqual(rig.dataOuter.received, HEADER + b"x")
        self.assertIsNone(rig.splice.directions[0].pipe)
        self.assertIsNone(rig.splice.directions[1].pipe)
        self.assertGreaterEqual(len(kernelsplice.pipes), 1)

    @inlineCallbacks
    def test_lastRoundDelivers(self) -> _Gen:
        """
        Bytes read in the last splice round of a readiness event are delivered even if the source then
        goes quiet (a request waiting for its reply must not stall in the pipe).
        """
        self.patch(kernelsplice, "MAX_ROUNDS", 1)
        rig = self.rig()
        rig.visitorOuter.tcpTransport.write(b"ping")
        yield rig.dataOuter.whenReceived(len(HEADER + b"ping"))
        self.assertEqual(rig.dataOuter.received, HEADER + b"ping")
        rig.dataOuter.tcpTransport.write(b"pong")
        yield rig.visitorOuter.whenReceived(len(b"pong"))
        self.assertEqual(rig.visitorOuter.received, b"pong")

        rig.visitorOuter.tcpTransport.loseWriteConnection()
        yield rig.dataOuter.whenReadLost()


class PipePoolTests(SynchronousTestCase):
    """
    The shared pool of empty pipes.
    """

    def test_reuse(self) -> None:
        """
        A pipe given back is the next one taken: no new pipe is created.
        """
        pool = kernelsplice.PipePool(keep=2)
        pipe = pool.take()
        self.addCleanup(kernelsplice.discard, pipe)
        pool.give(pipe)
        self.assertEqual(len(pool), 1)
        self.assertEqual(pool.take(), pipe)
        self.assertEqual(len(pool), 0)

    def test_bounded(self) -> None:
        """
        At most C{keep} empty pipes are kept; the rest are closed.
        """
        pool = kernelsplice.PipePool(keep=1)
        first, second = pool.take(), pool.take()
        pool.give(first)
        pool.give(second)
        self.assertEqual(len(pool), 1)
        self.addCleanup(kernelsplice.discard, pool.take())
        self.assertRaises(OSError, os.fstat, second[0])

    def test_nonBlockingAndSized(self) -> None:
        """
        New pipes are non-blocking and, where the system allows, sized to L{kernelsplice.CHUNK}.
        """
        pool = kernelsplice.PipePool()
        r, w = pool.take()
        self.addCleanup(kernelsplice.discard, (r, w))
        self.assertFalse(os.get_blocking(r))
        self.assertFalse(os.get_blocking(w))
        self.assertEqual(fcntl.fcntl(w, fcntl.F_GETPIPE_SZ), kernelsplice.CHUNK)
