"""
Raw TCP mode's sealed stream on a data session, as a Twisted protocol wrapper.

L{SealedConnection} sits between a data session's connection and the protocol that serves the stream
(a splice end): it is the connection's protocol and the inner protocol's transport, as
L{twisted.protocols.tls.TLSMemoryBIOProtocol} is. What the inner protocol writes is sealed into frames
(L{portal.wire.streamseal}); what arrives is opened frame by frame and handed on.

- A half-close of the inner protocol's writing direction (C{loseWriteConnection}) sends the
  authenticated end frame; the far end passes it on as C{readConnectionLost}. The data session's own
  connection is closed once both directions have ended, so a half-close works over any connection, TLS
  (in a chain of hops) included.
- Anything that fails to open, and a connection that ends before the far end's end frame (a
  truncation), aborts the connection; the inner protocol loses its connection with a
  L{BrokenStream} reason, on which a splice aborts its other side instead of closing it cleanly, so
  the visitor or target never takes a cut stream for a whole one.
- Pausing the inner protocol's transport pauses reading from the connection and holds frames already
  received until it resumes.
"""

from __future__ import annotations

from typing import Any, cast

from twisted.internet.interfaces import (
    IConsumer,
    IHalfCloseableProtocol,
    IProtocol,
    IPushProducer,
    ITCPTransport,
    ITransport,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from portal.forwarding.splice import BrokenStream, IHalfCloseableTransport
from portal.wire.seal import Direction
from portal.wire.streamseal import (
    StreamOpener,
    StreamSealer,
    StreamSealError,
    TruncatedStream,
    streamKeys,
)


@implementer(ITransport, IConsumer, IPushProducer, IHalfCloseableTransport, IHalfCloseableProtocol)
class SealedConnection(Protocol):
    """
    The sealed stream of one data session: protocol of the connection, transport of C{inner}.

    @ivar streamId: The stream's number, for log events.
    """

    _log = Logger()
    _paused = False
    _producing = False
    _eof = False
    _readEnded = False
    _closing = False
    _delivering = False
    _error: StreamSealError | None = None

    def __init__(
        self, inner: IProtocol, sealer: StreamSealer, opener: StreamOpener, streamId: int | None
    ) -> None:
        """
        @param inner: The protocol serving the stream; connected to this wrapper as its transport.
        @param sealer: Seals what C{inner} writes.
        @param opener: Opens what the far end sent.
        @param streamId: The stream's number, for log events.
        """
        self._inner = inner
        self._sealer = sealer
        self._opener = opener
        self.streamId = streamId
        self._buffer = bytearray()

    # The connection's side.

    def connectionMade(self) -> None:
        """
        Connect the inner protocol, with this wrapper as its transport.
        """
        self._inner.makeConnection(self)

    def dataReceived(self, data: bytes) -> None:
        """
        Open the frames that are complete, unless the inner protocol is paused.

        @param data: Sealed bytes from the far end.
        """
        if self._error is not None:
            return
        self._buffer += data
        self._deliver()

    def readConnectionLost(self) -> None:
        """
        The far end closed the connection: once the frames before it are handed on, a clean close
        after its end frame, a truncation before it.
        """
        self._eof = True
        self._deliver()

    def writeConnectionLost(self) -> None:
        """
        Nothing to do: this wrapper never half-closes the connection itself (an end frame does).
        """

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """
        Tell the inner protocol; a connection that ended before the far end's end frame, and not by
        this side's choice, is a truncation.

        @param reason: Why the connection ended.
        """
        if self._error is None and not self._closing and not self._opener.ended:
            self._error = self._truncation()
            self._logBroken(self._error)
        if self._error is not None:
            reason = Failure(BrokenStream(str(self._error)))
        self._inner.connectionLost(reason)

    def _truncation(self) -> TruncatedStream:
        """
        @return: The error of a stream whose connection ended before the far end's end frame.
        """
        try:
            self._opener.finish()
        except TruncatedStream as e:
            return e
        raise AssertionError("the stream ended")

    def _deliver(self) -> None:
        """
        Open and hand on complete frames while the inner protocol is not paused.
        """
        if self._delivering:
            # The inner protocol paused and resumed while handling a payload: the loop goes on.
            return
        self._delivering = True
        try:
            while not self._paused and self._error is None:
                try:
                    opened = self._opener.openFrame(self._buffer)
                except StreamSealError as e:
                    self._broken(e)
                    return
                if opened is None:
                    if self._eof:
                        self._atEOF()
                    return
                payload, used = opened
                del self._buffer[:used]
                if payload:
                    self._inner.dataReceived(payload)
                if self._opener.ended and not self._readEnded:
                    self._readEnded = True
                    self._farEndEnded()
        finally:
            self._delivering = False

    def _atEOF(self) -> None:
        """
        Every frame before the connection's end has been handed on: close, or abort if the far end's
        end frame was not among them.
        """
        if self._opener.ended:
            self.loseConnection()
        else:
            self._broken(self._truncation())

    def _farEndEnded(self) -> None:
        """
        The far end's end frame arrived: a half-close for the inner protocol.
        """
        if IHalfCloseableProtocol.providedBy(self._inner):
            self._inner.readConnectionLost()
        else:
            self.loseConnection()
        self._finishIfDone()

    def _broken(self, error: StreamSealError) -> None:
        """
        What arrived is not the far end's stream: abort the connection.

        @param error: Why.
        """
        self._error = error
        self._logBroken(error)
        self._closing = True
        # TCP and TLS connections can abort.
        cast(ITCPTransport, self.transport).abortConnection()

    def _logBroken(self, error: StreamSealError) -> None:
        """
        Log why the stream is closed.

        @param error: Why.
        """
        self._log.warn(
            "sealed stream {stream} closed: {reason}", stream=self.streamId, reason=str(error)
        )

    def _finishIfDone(self) -> None:
        """
        Close the connection once both directions have ended.
        """
        if self._sealer.ended and self._opener.ended and not self._closing:
            self._closing = True
            assert self.transport is not None
            self.transport.loseConnection()

    # The inner protocol's transport.

    def write(self, data: bytes) -> None:
        """
        Seal and send bytes; after the end of this direction they are dropped, as TCP drops writes
        after C{loseConnection}.

        @param data: Bytes of the stream.
        """
        if self._sealer.ended or self._closing:
            return
        assert self.transport is not None
        self.transport.write(self._sealer.seal(data))

    def writeSequence(self, data: Any) -> None:
        """
        Seal and send several pieces as one.

        @param data: An iterable of byte strings.
        """
        self.write(b"".join(data))

    def loseWriteConnection(self) -> None:
        """
        End this direction with the end frame: the far end sees a half-close.
        """
        if self._sealer.ended or self._closing:
            return
        assert self.transport is not None
        self.transport.write(self._sealer.end())
        if IHalfCloseableProtocol.providedBy(self._inner):
            self._inner.writeConnectionLost()
        self._finishIfDone()

    def loseConnection(self) -> None:
        """
        End this direction (the far end sees the end frame, not a truncation) and close the
        connection after what is buffered.
        """
        if self._closing:
            return
        assert self.transport is not None
        if not self._sealer.ended:
            self.transport.write(self._sealer.end())
        self._closing = True
        self.transport.loseConnection()

    def abortConnection(self) -> None:
        """
        Close the connection at once, without an end frame: the far end sees a truncation.
        """
        self._closing = True
        # TCP and TLS connections can abort.
        cast(ITCPTransport, self.transport).abortConnection()

    def getPeer(self) -> Any:
        """
        @return: The data session's peer address.
        """
        assert self.transport is not None
        return self.transport.getPeer()

    def getHost(self) -> Any:
        """
        @return: The data session's local address.
        """
        assert self.transport is not None
        return self.transport.getHost()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        """
        Let C{producer} be paused when the connection's write buffer is full.

        @param producer: What writes into this transport.
        @param streaming: Whether it is a push producer.
        """
        assert self.transport is not None
        self._producing = True
        self.transport.registerProducer(producer, streaming)  # type: ignore[attr-defined]

    def unregisterProducer(self) -> None:
        """
        Forget the producer, if there is one (a splice end may ask twice).
        """
        assert self.transport is not None
        if self._producing:
            self._producing = False
            self.transport.unregisterProducer()  # type: ignore[attr-defined]

    def pauseProducing(self) -> None:
        """
        Stop handing on frames, and stop reading the connection.
        """
        self._paused = True
        assert self.transport is not None
        self.transport.pauseProducing()  # type: ignore[attr-defined]

    def resumeProducing(self) -> None:
        """
        Read the connection again and hand on the frames held meanwhile.
        """
        self._paused = False
        assert self.transport is not None
        self.transport.resumeProducing()  # type: ignore[attr-defined]
        self._deliver()

    def stopProducing(self) -> None:
        """
        Stop for good: close the connection.
        """
        assert self.transport is not None
        self.transport.stopProducing()  # type: ignore[attr-defined]


def sealedStream(
    inner: IProtocol, secret: bytes, attachNonce: bytes, sending: Direction, streamId: int | None
) -> SealedConnection:
    """
    Build the sealed stream of one data session for one end.

    @param inner: The protocol serving the stream at this end.
    @param secret: The control session's raw TCP secret (L{portal.wire.control.EXPORTER_TCP_KEY}).
    @param attachNonce: The data session's attach nonce.
    @param sending: The direction this end sends in (the relay sends relay-to-tunnel).
    @param streamId: The stream's number, for log events.
    @return: The wrapper, to connect to the data session's transport.
    """
    relayToTunnel, tunnelToRelay = streamKeys(secret, attachNonce)
    receiving = (
        Direction.TUNNEL_TO_RELAY
        if sending == Direction.RELAY_TO_TUNNEL
        else Direction.RELAY_TO_TUNNEL
    )
    keys = {Direction.RELAY_TO_TUNNEL: relayToTunnel, Direction.TUNNEL_TO_RELAY: tunnelToRelay}
    return SealedConnection(
        inner,
        StreamSealer(keys[sending], sending),
        StreamOpener(keys[receiving], receiving),
        streamId,
    )
