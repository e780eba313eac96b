"""
Two-way forwarding between two connected transports.

A splice joins two protocols that each already have a transport: bytes received on one side are written to
the other, each transport is registered as the other's streaming producer (so a slow reader pauses the fast
writer and memory per connection stays bounded by the transports' own write buffers), a half-close on one
side becomes a half-close of the other where the transport supports it, and a full close on either side
closes the other once its pending writes are flushed.

The model is L{twisted.protocols.portforward}, with the accepting side paused until the other side exists.
"""

from __future__ import annotations

from typing import Any, cast

from twisted.internet.interfaces import (
    IConsumer,
    IHalfCloseableDescriptor,
    IHalfCloseableProtocol,
    IPushProducer,
    ITransport,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from portal.forwarding.idlewatch import IdlePolicy, IdleWatch
from portal.forwarding.meter import ByteMeter
from portal.forwarding.pacing import PacedProducer, Pacer


class IForwardingTransport(ITransport, IConsumer, IPushProducer):
    """
    What a splice needs of each transport: TCP, TLS and iosim transports are also consumers and
    push producers, which L{ITransport} does not say.  Only used to type L{SpliceProtocol}'s
    transport.
    """


class IHalfCloseableTransport(Interface):
    """
    A transport other than a TCP connection that can end its writing direction while reading on (TCP
    says so with L{IHalfCloseableDescriptor}).
    """

    def loseWriteConnection() -> None:
        """
        End the writing direction; the far end sees a half-close.
        """


class BrokenStream(Exception):
    """
    The reason a splice end lost its connection when what it received may be cut short or forged (a
    sealed stream that failed to open, L{portal.forwarding.sealedstream}): the other side is aborted,
    not closed cleanly, so that its client does not take a cut stream for a whole one.
    """


def _transportOf(end: SpliceProtocol) -> IForwardingTransport:
    """
    Get the transport of a splice end, which is connected before anything uses it.

    @param end: A connected splice end.
    @return: Its transport.
    """
    transport = end.transport
    assert transport is not None, f"{end!r} is not connected"
    return cast(IForwardingTransport, transport)


def noDelay(transport: object) -> None:
    """
    Turn off Nagle's algorithm where the transport has it: a forwarder must not hold back small writes
    (a TLS handshake is a few small writes each way, and Nagle with delayed ACKs adds ~40 ms).

    @param transport: Any transport; those without C{setTcpNoDelay} are left alone.
    """
    setTcpNoDelay = getattr(transport, "setTcpNoDelay", None)
    if setTcpNoDelay is not None:
        try:
            setTcpNoDelay(True)
        except OSError:
            pass


def pauseReading(transport: ITransport) -> None:
    """
    Stop reading from C{transport} until L{resumeReading}.

    @param transport: A transport that is also a push producer (TCP, TLS and iosim transports are).
    """
    pause = getattr(transport, "pauseProducing", None)
    if pause is not None:
        pause()


def resumeReading(transport: ITransport) -> None:
    """
    Resume reading from C{transport} after L{pauseReading}.

    @param transport: A transport that is also a push producer.
    """
    resume = getattr(transport, "resumeProducing", None)
    if resume is not None:
        resume()


def closeWriteSide(transport: Any) -> None:
    """
    Half-close C{transport} if it can (TCP), otherwise close it after its buffered writes (TLS, whose
    Twisted implementation has no half-close).

    @param transport: The transport whose writing direction is finished.
    """
    # Only a real descriptor can half-close: a TLS wrapper forwards unknown attributes (such as
    # loseWriteConnection, even zope.interface's __provides__) to the socket under it, which would end
    # the stream without close_notify: ask the class, not the instance.
    transportType = type(transport)
    if IHalfCloseableDescriptor.implementedBy(
        transportType
    ) or IHalfCloseableTransport.implementedBy(transportType):
        transport.loseWriteConnection()
    else:
        transport.loseConnection()


@implementer(IHalfCloseableProtocol)
class SpliceProtocol(Protocol):
    """
    One end of a splice.

    Before L{splice} pairs it, a subclass decides what to do with received bytes by overriding
    L{unsplicedDataReceived} (the default buffers them). Once paired, every byte goes straight to the peer.

    @ivar peer: The other end, once spliced.
    @ivar meter: Counts the bytes this end reads and forwards to its peer, when set.
    """

    peer: SpliceProtocol | None = None
    #: Paces this side's reading by bandwidth caps, when the splice has a pacer.
    paced: PacedProducer | None = None
    #: Closes the splice when it stays silent, when it has an idle policy (shared by both ends).
    idle: IdleWatch | None = None
    #: Bytes read from this side and forwarded to the peer.
    forwarded = 0
    meter: ByteMeter | None = None
    _readClosed = False
    _writeClosed = False
    _lost = False

    def __init__(self) -> None:
        self._pending: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        """
        Forward C{data} to the peer, or hand it to L{unsplicedDataReceived} before pairing.

        @param data: Bytes read from this side's transport.
        """
        peer = self.peer
        if peer is not None:
            if self.meter is not None:
                self.meter.count(len(data))
            _transportOf(peer).write(data)
            self.forwarded += len(data)
            if self.paced is not None:
                self.paced.spent(len(data))
        else:
            self.unsplicedDataReceived(data)

    def unsplicedDataReceived(self, data: bytes) -> None:
        """
        Hold bytes that arrive before the splice is made; they are written to the peer first.

        @param data: Bytes read before pairing.
        """
        self._pending.append(data)

    def takePending(self) -> bytes:
        """
        Return and forget the bytes held by L{unsplicedDataReceived}.

        @return: The buffered bytes.
        """
        data = b"".join(self._pending)
        self._pending = []
        return data

    def readConnectionLost(self) -> None:
        """
        This side will send no more: half-close the peer's writing direction.
        """
        self._readClosed = True
        if self.peer is not None:
            # Nothing more will be produced into the peer's transport; a TLS transport waits for its
            # producer to go away before it sends close_notify.
            peerTransport = _transportOf(self.peer)
            peerTransport.unregisterProducer()
            closeWriteSide(peerTransport)
        self._maybeClose()

    def writeConnectionLost(self) -> None:
        """
        This side's writing direction was shut down by us; close fully once reading is done too.
        """
        self._writeClosed = True
        self._maybeClose()

    def _maybeClose(self) -> None:
        """
        Close the transport when both directions are finished, or when unpaired and the reader is gone.
        """
        if self._readClosed and (self._writeClosed or self.peer is None):
            _transportOf(self).loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """
        Close the peer once its pending writes are flushed (abort it when this side's stream was
        broken, L{BrokenStream}), and drop the producer links.

        @param reason: Why this side closed.
        """
        self._lost = True
        if self.paced is not None:
            self.paced.close()
        if self.idle is not None:
            self.idle.stop()
        peer = self.peer
        # Neither side needs the other once it is lost: dropping the link breaks the reference
        # cycle between the two, so that they are freed at once rather than by the cyclic
        # garbage collector (whose full collections stall the process).
        self.peer = None
        if peer is not None and not peer._lost:
            peerTransport = _transportOf(peer)
            peerTransport.unregisterProducer()
            abort = getattr(peerTransport, "abortConnection", None)
            if reason.check(BrokenStream) and abort is not None:
                abort()
            else:
                peerTransport.loseConnection()


def splice(
    a: SpliceProtocol,
    b: SpliceProtocol,
    aFirst: bytes = b"",
    bFirst: bytes = b"",
    pacer: Pacer | None = None,
    idle: IdlePolicy | None = None,
) -> None:
    """
    Pair two connected splice ends and start forwarding in both directions.

    Bytes either side buffered before pairing are written to the other first, each after the given prefix.
    Both transports are resumed (unless already closing): callers pause the side that was waiting for
    the other.

    @param a: One connected end.
    @param b: The other connected end.
    @param aFirst: Bytes to write to C{a} before anything C{b} buffered.
    @param bFirst: Bytes to write to C{b} before anything C{a} buffered.
    @param pacer: Paces the bytes of both directions by bandwidth caps (L{portal.forwarding.pacing}),
        or L{None}.
    @param idle: Closes both ends when no byte moves either way for its timeout
        (L{portal.forwarding.idlewatch}), or L{None}.
    """
    a.peer = b
    b.peer = a
    aTransport, bTransport = _transportOf(a), _transportOf(b)
    toB = bFirst + a.takePending()
    toA = aFirst + b.takePending()
    if toB:
        bTransport.write(toB)
    if toA:
        aTransport.write(toA)
    # Each transport produces the bytes the other consumes: a full write buffer on one pauses reads on
    # the other.
    aProducer: Any = aTransport
    bProducer: Any = bTransport
    if pacer is not None:
        a.paced = aProducer = PacedProducer(aTransport, pacer)
        b.paced = bProducer = PacedProducer(bTransport, pacer)
    aTransport.registerProducer(bProducer, True)
    bTransport.registerProducer(aProducer, True)
    if idle is not None and not (a._lost or b._lost):

        def close() -> None:
            for side in (a, b):
                if not side._lost:
                    _transportOf(side).loseConnection()

        a.idle = b.idle = idle.watch(lambda: a.forwarded + b.forwarded, close)
    for this, other in ((a, b), (b, a)):
        if this._lost:
            _transportOf(other).unregisterProducer()
            _transportOf(other).loseConnection()
        elif this._readClosed:
            _transportOf(other).unregisterProducer()
            closeWriteSide(_transportOf(other))
    # A side that already stopped reading is closing: resuming it would break the producer contract.
    for side in (a, b):
        if not (side._lost or side._readClosed):
            resumeReading(_transportOf(side))
