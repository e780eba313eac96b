"""
Kernel splice: move bytes between two TCP sockets through a pipe with C{os.splice}, so the relay's hot
path does no per-byte work in Python (DESIGN.md section 7).

Once a visitor and a data session are paired, the relay takes both sockets away from their Twisted
transports and registers one L{_End} per socket with the reactor. Each direction moves
C{socket -> pipe -> socket}; the pipe is the only buffer, so a slow reader stops reads on the other side
(bounded memory), an end of stream is passed on as C{shutdown(SHUT_WR)} once the pipe is empty
(half-close), and any error aborts both connections. When both directions have ended, both transports
are closed through Twisted, so protocols see C{connectionLost} as usual.

Linux only; L{canSplice} says when it applies, and the caller falls back to L{portal.forwarding.splice}.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from typing import Any, cast

from twisted.internet import tcp
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IReadDescriptor, IWriteDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from portal.forwarding.idlewatch import IdlePolicy, IdleWatch
from portal.forwarding.meter import ByteMeter
from portal.forwarding.pacing import Pacer
from portal.forwarding.splice import SpliceProtocol, splice

#: Bytes moved per splice call, and the pipe size asked for.
CHUNK = 1 << 20
#: Splice calls per readiness event before yielding to the reactor (fairness between connections).
MAX_ROUNDS = 16
_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_AGAIN = (errno.EAGAIN, errno.EWOULDBLOCK)


def canSplice(*transports: Any) -> bool:
    """
    Whether the kernel path can join these transports.

    @param transports: Twisted transports.
    @return: True when C{os.splice} exists and every transport is a plain, connected TCP transport.
    """
    if not hasattr(os, "splice"):
        return False
    for transport in transports:
        if not isinstance(transport, tcp.Connection):
            return False
        if not transport.connected or transport.disconnecting:
            return False
    return True


def takeUnsent(transport: tcp.Connection) -> bytes:
    """
    Take the bytes Twisted has accepted for C{transport} but not sent yet, so that the kernel path sends
    them first (for example a data session's attach ACK, written just before pairing).

    This reads L{twisted.internet.abstract.FileDescriptor}'s write buffer attributes, which have been
    stable for many years; L{canSplice} only accepts transports that have them.

    @param transport: A TCP transport about to be taken over.
    @return: The unsent bytes, now removed from Twisted's buffer.
    """
    unsent = bytes(transport.dataBuffer[transport.offset :]) + b"".join(transport._tempDataBuffer)
    transport.dataBuffer = b""
    transport.offset = 0
    transport._tempDataBuffer = []
    transport._tempDataLen = 0
    return unsent


class PipePool:
    """
    Empty pipes, kept for reuse: a direction borrows one only while bytes are in flight, so idle
    connections hold none and a new connection costs no C{pipe2}/C{fcntl}/C{close} calls.

    @ivar keep: Most empty pipes kept; more are closed.
    """

    def __init__(self, keep: int = 256) -> None:
        self.keep = keep
        self._free: list[tuple[int, int]] = []

    def __len__(self) -> int:
        """
        @return: The number of empty pipes kept.
        """
        return len(self._free)

    def take(self) -> tuple[int, int]:
        """
        @return: An empty non-blocking pipe C{(read end, write end)}, sized to L{CHUNK} where allowed.
        """
        if self._free:
            return self._free.pop()
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(w, _F_SETPIPE_SZ, CHUNK)
        except OSError:
            pass  # Above /proc/sys/fs/pipe-max-size: keep the default size.
        return r, w

    def give(self, pipe: tuple[int, int]) -> None:
        """
        Take back an I{empty} pipe.
        """
        if len(self._free) < self.keep:
            self._free.append(pipe)
        else:
            discard(pipe)


def discard(pipe: tuple[int, int]) -> None:
    """
    Close both ends of a pipe.
    """
    for fd in pipe:
        os.close(fd)


#: The pipes every kernel splice of this process shares.
pipes = PipePool()


class _Direction:
    """
    Bytes flowing from one socket to the other through a pipe.

    @ivar pending: Bytes in the pipe not yet written to the destination.
    @ivar eof: The source sent its end of stream.
    @ivar done: End of stream passed on and the pipe drained.
    @ivar wake: While paced: the call that reads again once the buckets allow it.
    """

    # Slots: a relay keeps two directions per spliced connection, idle ones included (issue 16).
    __slots__ = (
        "source",
        "meter",
        "destination",
        "prefix",
        "_pool",
        "pacer",
        "moved",
        "pipe",
        "pending",
        "eof",
        "done",
        "wake",
    )

    def __init__(
        self,
        source: _End,
        destination: _End,
        prefix: bytes,
        pool: PipePool,
        pacer: Pacer | None = None,
        meter: ByteMeter | None = None,
    ) -> None:
        self.source = source
        self.meter = meter
        self.destination = destination
        self.prefix = prefix
        self._pool = pool
        self.pacer = pacer
        #: Bytes moved from the source, for the idle watch.
        self.moved = 0
        self.pipe: tuple[int, int] | None = None
        self.pending = 0
        self.eof = False
        self.done = False
        self.wake: Any = None

    def _release(self) -> None:
        """
        Give the (empty) pipe back to the pool.
        """
        if self.pipe is not None:
            self._pool.give(self.pipe)
            self.pipe = None

    def close(self) -> None:
        """
        Let go of the pipe: back to the pool when empty, closed when bytes are stuck in it.
        """
        if self.pipe is not None:
            if self.pending:
                discard(self.pipe)
                self.pipe = None
            else:
                self._release()

    def pump(self) -> bool:
        """
        Move what can be moved now.

        @return: True when the caller should be called again (more may be readable); readiness
            registration is updated here.
        @raise OSError: On a socket error other than "would block".
        """
        source, destination = self.source, self.destination
        for _ in range(MAX_ROUNDS):
            if self.prefix:
                try:
                    sent = os.write(destination.fd, self.prefix)
                except BlockingIOError:
                    sent = 0
                self.prefix = self.prefix[sent:]
                if self.prefix:
                    destination.wantWrite(self)
                    source.pauseRead(self)
                    return False
            if self.pending:
                assert self.pipe is not None
                try:
                    moved = os.splice(self.pipe[0], destination.fd, self.pending, flags=_FLAGS)
                except BlockingIOError:
                    moved = 0
                self.pending -= moved
                if self.pending:
                    destination.wantWrite(self)
                    source.pauseRead(self)
                    return False
            self._release()
            destination.doneWriting(self)
            if self.eof:
                if not self.done:
                    self.done = True
                    destination.shutdownWrite()
                    source.pauseRead(self)
                return False
            limit = CHUNK
            if self.pacer is not None:
                limit = min(CHUNK, self.pacer.allowance())
                if not limit:
                    # Over the bandwidth cap: read again when the buckets hold a quantum.
                    source.pauseRead(self)
                    source.paceLater(self, self.pacer.delay())
                    return False
            self.pipe = self._pool.take()
            try:
                moved = os.splice(source.fd, self.pipe[1], limit, flags=_FLAGS)
            except BlockingIOError:
                # Nothing to read: the pipe goes back, so idle connections hold none.
                self._release()
                source.resumeRead(self)
                return False
            if moved == 0:
                self.eof = True
                self._release()
            else:
                self.pending += moved
                self.moved += moved
                if self.pacer is not None:
                    self.pacer.spend(moved)
                if self.meter is not None:
                    self.meter.count(moved)
        if self.pending or self.eof:
            # Out of rounds with bytes in the pipe (or an EOF to pass on): come back when the
            # destination is writable, not only if the source happens to send more.
            destination.wantWrite(self)
        source.resumeRead(self)
        return True


@implementer(IReadDescriptor, IWriteDescriptor)
class _End:
    """
    One socket of a kernel splice, as the reactor sees it.
    """

    __slots__ = ("_owner", "transport", "fd", "outgoing", "incoming", "_reading", "_writing")

    _owner: KernelSplice

    def __init__(self, owner: KernelSplice, transport: tcp.Connection) -> None:
        self._owner = owner
        self.transport = transport
        self.fd = transport.fileno()
        self.outgoing: _Direction
        self.incoming: _Direction
        self._reading = False
        self._writing = False

    def fileno(self) -> int:
        """
        @return: The socket's descriptor.
        """
        return self.fd

    def logPrefix(self) -> str:
        """
        @return: A prefix for log events.
        """
        return "KernelSplice"

    def doRead(self) -> None:
        """
        The socket is readable: move bytes to the other socket.
        """
        self._owner.run(self.outgoing)

    def doWrite(self) -> None:
        """
        The socket is writable: drain what waits for it.
        """
        self._owner.run(self.incoming)

    def connectionLost(self, reason: Failure) -> None:
        """
        The reactor saw an error or hang-up on the socket.
        """
        self._owner.abort(reason)

    def pauseRead(self, direction: _Direction) -> None:
        """
        Stop reading (the pipe toward the other socket is full, or the stream ended).
        """
        if self._reading:
            self._reading = False
            self._owner.reactor.removeReader(self)

    def resumeRead(self, direction: _Direction) -> None:
        """
        Read again.
        """
        if not self._reading and not direction.eof:
            self._reading = True
            self._owner.reactor.addReader(self)

    def wantWrite(self, direction: _Direction) -> None:
        """
        Wait until the socket is writable.
        """
        if not self._writing:
            self._writing = True
            self._owner.reactor.addWriter(self)

    def doneWriting(self, direction: _Direction) -> None:
        """
        Nothing waits to be written.
        """
        if self._writing:
            self._writing = False
            self._owner.reactor.removeWriter(self)

    def paceLater(self, direction: _Direction, delay: float) -> None:
        """
        Pump C{direction} again after C{delay} seconds (it waits for its bandwidth caps), unless
        already scheduled.
        """
        if direction.wake is None:
            direction.wake = self._owner.reactor.callLater(delay, self._owner.wake, direction)

    def shutdownWrite(self) -> None:
        """
        Pass an end of stream on.
        """
        try:
            self.transport.socket.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def unregister(self) -> None:
        """
        Leave the reactor.
        """
        self.pauseRead(self.outgoing)
        self.doneWriting(self.incoming)


class KernelSplice:
    """
    Joins two TCP transports in the kernel.

    @ivar reactor: The reactor watching the sockets.
    @ivar finished: Whether both directions ended or the splice was aborted.
    """

    __slots__ = ("reactor", "finished", "_pacer", "_idlePolicy", "_watch", "_a", "_b", "directions")

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        a: tcp.Connection,
        b: tcp.Connection,
        toB: bytes = b"",
        pool: PipePool = pipes,
        pacer: Pacer | None = None,
        idle: IdlePolicy | None = None,
        meters: tuple[ByteMeter | None, ByteMeter | None] = (None, None),
    ) -> None:
        """
        @param reactor: The reactor both transports belong to.
        @param a: One transport (the visitor).
        @param b: The other (the data session).
        @param toB: Bytes to write to C{b} before anything read from C{a}.
        @param pool: Where pipes are borrowed from.
        @param pacer: Paces the bytes of both directions by bandwidth caps, in chunks of at most
            what its buckets allow (L{portal.forwarding.pacing}); L{None} for no cap.
        @param idle: Aborts both connections when no byte moves either way for its timeout; L{None}
            for no idle timeout.
        @param meters: Meters for the bytes read from C{a} (towards C{b}) and from C{b} (towards C{a}).
        """
        self.reactor = reactor
        self.finished = False
        self._pacer = pacer
        self._idlePolicy = idle
        self._watch: IdleWatch | None = None
        self._a = _End(self, a)
        self._b = _End(self, b)
        toA = takeUnsent(a)
        toB = takeUnsent(b) + toB
        self._a.outgoing = self._b.incoming = _Direction(
            self._a, self._b, toB, pool, pacer, meters[0]
        )
        self._b.outgoing = self._a.incoming = _Direction(
            self._b, self._a, toA, pool, pacer, meters[1]
        )
        #: Both directions, from C{a} to C{b} and back (kept once the ends let go of them).
        self.directions = (self._a.outgoing, self._b.outgoing)

    def start(self) -> None:
        """
        Take both sockets from Twisted and start moving bytes.
        """
        for end in (self._a, self._b):
            end.transport.stopReading()
            end.transport.stopWriting()
        if self._idlePolicy is not None:
            self._watch = self._idlePolicy.watch(self._moved, self._idle)
        self.run(self._a.outgoing)
        self.run(self._b.outgoing)

    def _moved(self) -> int:
        """
        @return: Bytes moved so far both ways, for the idle watch.
        """
        return self.directions[0].moved + self.directions[1].moved

    def _idle(self) -> None:
        """
        No byte moved either way for the idle timeout: drop both connections.
        """
        self.abort(Failure(ConnectionDone("idle stream")))

    def run(self, direction: _Direction) -> None:
        """
        Pump one direction; finish or abort as the result says.
        """
        if self.finished:
            return
        try:
            direction.pump()
        except OSError as e:
            self.abort(Failure(e))
            return
        if self._a.outgoing.done and self._b.outgoing.done:
            self._finish()

    def wake(self, direction: _Direction) -> None:
        """
        A paced direction may read again.
        """
        direction.wake = None
        if self.finished:
            return
        direction.source.resumeRead(direction)
        self.run(direction)

    def _release(self) -> None:
        """
        Leave the reactor, close the pipes and let go of the bandwidth caps.
        """
        self.finished = True
        for end in (self._a, self._b):
            end.unregister()
            end.outgoing.close()
            wake, end.outgoing.wake = end.outgoing.wake, None
            if wake is not None and wake.active():
                wake.cancel()
        if self._pacer is not None:
            self._pacer.close()
        if self._watch is not None:
            self._watch.stop()
            # Its callbacks refer to this splice.
            self._watch = None
        # The ends refer to their directions (which refer back) and to this splice; out of the
        # reactor, nothing calls them again. Unlinking them lets everything be freed at once
        # rather than by the cyclic garbage collector (whose full collections stall the process).
        for end in (self._a, self._b):
            del end.outgoing, end.incoming, end._owner

    def _finish(self) -> None:
        """
        Both directions ended cleanly: close both connections through Twisted.
        """
        self._release()
        for end in (self._a, self._b):
            # Both directions ended: each socket read its peer's end and sent its own, so Twisted's
            # shutdown(SHUT_RDWR) before closing would change nothing (a system call less each).
            end.transport._shouldShutdown = False
            end.transport.loseConnection()

    def abort(self, reason: Failure) -> None:
        """
        A socket failed: drop both connections.

        @param reason: Why.
        """
        if self.finished:
            return
        self._log.debug("kernel splice aborted: {error}", error=reason.getErrorMessage())
        self._release()
        for end in (self._a, self._b):
            end.transport.abortConnection()


def joinEnds(
    reactor: Any,
    a: SpliceProtocol,
    b: SpliceProtocol,
    toB: bytes = b"",
    pacer: Pacer | None = None,
    idle: IdlePolicy | None = None,
    meters: tuple[ByteMeter | None, ByteMeter | None] = (None, None),
) -> bool:
    """
    Join two connected splice ends: in the kernel when both are plain TCP connections and a reactor
    is given, otherwise with L{portal.forwarding.splice.splice}.

    Bytes C{a} buffered before the join are written to C{b} after C{toB}.

    @param reactor: The reactor of both transports, or L{None} to keep the splice in Python.
    @param a: One end (the visitor).
    @param b: The other end.
    @param toB: Bytes to write to C{b} first.
    @param pacer: Paces both directions by bandwidth caps (L{portal.forwarding.pacing}), or
        L{None}.
    @param idle: Closes both ends when no byte moves either way for its timeout, or L{None}.
    @param meters: Meters for the bytes read from C{a} (towards C{b}) and from C{b} (towards C{a}),
        whichever way they are moved.
    @return: Whether the kernel moves the bytes.
    """
    if reactor is not None and canSplice(a.transport, b.transport):
        # Each side closes the other if Twisted reports it lost.
        a.peer, b.peer = b, a
        first = toB + a.takePending()
        # canSplice accepted both transports, so they are plain TCP connections.
        KernelSplice(
            reactor,
            cast(tcp.Connection, a.transport),
            cast(tcp.Connection, b.transport),
            toB=first,
            pacer=pacer,
            idle=idle,
            meters=meters,
        ).start()
        return True
    a.meter, b.meter = meters
    splice(a, b, bFirst=toB, pacer=pacer, idle=idle)
    return False
