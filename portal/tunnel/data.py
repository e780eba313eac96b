"""
The tunnel's pool of pre-opened stream data sessions to one relay.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProtocol, IStreamClientEndpoint
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from portal.forwarding.quietconnect import connectQuietly
from portal.forwarding.sealedstream import sealedStream
from portal.forwarding.splice import noDelay
from portal.wire.attach import (
    ACK,
    MAGIC,
    NONCE_LENGTH,
    AttachError,
    StreamHeader,
    attachProof,
    decodeStreamHeader,
)
from portal.wire.control import EXPORTER_DATA_SESSION, exportKeyingMaterial
from portal.wire.seal import Direction

#: Seconds a data session may take to connect and attach.
ATTACH_TIMEOUT = 10.0
#: Most data sessions opened beyond the pool size at the relay's request.
MAX_EXTRA = 64
#: Seconds to wait before opening data sessions again after one failed to connect.
RETRY_DELAY = 1.0


class TunnelDataSession(Protocol):
    """
    One data session: attach, wait idle for a stream header, then hand the connection to the stream
    handler.

    @ivar nonce: The relay's nonce, once received.
    """

    _log = Logger()
    nonce = b""
    _delegate: IProtocol | None = None
    _idle = False

    def __init__(
        self, pool: DataSessionPool, sessionId: bytes, key: bytes, sealSecret: bytes | None = None
    ) -> None:
        """
        @param pool: The pool this session belongs to.
        @param sessionId: The control session it attaches to.
        @param key: That control session's data key.
        @param sealSecret: In raw TCP mode, the control session's secret the stream is sealed under
            (L{portal.wire.streamseal}); L{None} in stream mode.
        """
        self._pool = pool
        self._sessionId = sessionId
        self._key = key
        self._sealSecret = sealSecret
        self._buffer = b""
        self.attached: Deferred[TunnelDataSession] = Deferred()

    def connectionMade(self) -> None:
        """
        Announce a data session.
        """
        assert self.transport is not None
        noDelay(self.transport)
        self.transport.write(MAGIC)

    def dataReceived(self, data: bytes) -> None:
        """
        Run the attach, then read the stream header, then forward to the stream's protocol.

        @param data: Bytes from the relay.
        """
        if self._delegate is not None:
            self._delegate.dataReceived(data)
            return
        assert self.transport is not None
        self._buffer += data
        if not self.nonce:
            if len(self._buffer) < NONCE_LENGTH:
                return
            self.nonce, self._buffer = self._buffer[:NONCE_LENGTH], self._buffer[NONCE_LENGTH:]
            # A TLS data session binds its proof to its own TLS session (see portal.wire.attach).
            binding = (
                exportKeyingMaterial(self.transport, EXPORTER_DATA_SESSION)
                if self._pool.tls
                else b""
            )
            self.transport.write(attachProof(self._key, self.nonce, self._sessionId, binding))
        if not self._idle:
            if not self._buffer:
                return
            if self._buffer[:1] != ACK:
                self._fail("relay did not acknowledge the data session")
                return
            self._buffer = self._buffer[1:]
            self._idle = True
            self.attached.callback(self)
        if not self._buffer:
            return
        try:
            decoded = decodeStreamHeader(self._key, self.nonce, self._buffer)
        except AttachError as e:
            self._fail(str(e))
            return
        if decoded is None:
            return
        header, used = decoded
        rest, self._buffer = self._buffer[used:], b""
        self._pool.used(self)
        delegate = self._pool.handler(header)
        if self._sealSecret is not None:
            delegate = sealedStream(
                delegate, self._sealSecret, self.nonce, Direction.TUNNEL_TO_RELAY, header.streamId
            )
        self._delegate = delegate
        delegate.makeConnection(self.transport)
        if rest:
            delegate.dataReceived(rest)

    def _fail(self, reason: str) -> None:
        """
        Log a protocol error and close.
        """
        self._log.warn("data session closed: {reason}", reason=reason)
        assert self.transport is not None
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """
        Pass the close to the stream, or leave the pool.

        @param reason: Why.
        """
        if self._delegate is not None:
            self._delegate.connectionLost(reason)
            return
        if not self.attached.called:
            self.attached.errback(reason or Failure(AttachError("closed before attach")))
        self._pool.lost(self)


#: Data sessions in a row that may fail before the pool asks for a new control session.
MAX_FAILURES_IN_A_ROW = 8


class DataSessionPool:
    """
    Keeps C{size} idle data sessions open to one relay while a control session is up, replaces each one a
    visitor uses, and opens more when the relay asks.

    @ivar handler: Builds the protocol serving a stream, from its header.
    @ivar tls: Whether C{endpoint} connects with TLS (through a chain of hops): attach proofs are then
        bound to each data session's TLS.
    """

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        endpoint: Callable[[], IStreamClientEndpoint],
        handler: Callable[[StreamHeader], IProtocol],
        size: int = 4,
        tls: bool = False,
        timeout: float = ATTACH_TIMEOUT,
        onStuck: Callable[[], None] | None = None,
    ) -> None:
        """
        @param reactor: Time, for timeouts and retries.
        @param endpoint: Makes the endpoint of each new data session.
        @param handler: Builds the protocol serving a stream, from its header.
        @param size: Idle data sessions to keep.
        @param tls: Whether C{endpoint} connects with TLS.
        @param timeout: Seconds a data session may take to connect and attach (longer through a
            chain of hops).
        @param onStuck: Called when L{MAX_FAILURES_IN_A_ROW} data sessions in a row failed while
            the control session is up: the relay does not know this control session on the
            connections data sessions reach (a relay worker restarted beside others moves where
            an address's connections land), and only a new control session can fix that.
        """
        self._reactor = reactor
        self.tls = tls
        self._timeout = timeout
        self._endpoint = endpoint
        self.handler = handler
        self.size = size
        self._session: tuple[bytes, bytes, bytes | None] | None = None
        self._idle: set[TunnelDataSession] = set()
        self._opening = 0
        self._extra = 0
        self._retry: Any = None
        self._onStuck = onStuck
        self._failures = 0

    @property
    def idle(self) -> int:
        """
        The number of attached idle data sessions.
        """
        return len(self._idle)

    def start(self, sessionId: bytes, key: bytes, sealSecret: bytes | None = None) -> None:
        """
        A control session is up: fill the pool with data sessions bound to it.

        @param sessionId: The control session id.
        @param key: Its data key.
        @param sealSecret: In raw TCP mode, its secret the streams are sealed under.
        """
        self._session = (sessionId, key, sealSecret)
        self._failures = 0
        self._fill()

    def stop(self) -> None:
        """
        The control session is gone: close idle data sessions and open no more.
        """
        self._session = None
        self._extra = 0
        # Sessions still opening belong to the ended control session: they are closed when they
        # finish and must not hold back the next control session's pool.
        self._opening = 0
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        idle, self._idle = self._idle, set()
        for session in idle:
            assert session.transport is not None
            session.transport.loseConnection()

    def want(self, count: int) -> None:
        """
        The relay has C{count} visitors waiting: open that many beyond the pool size (bounded).

        @param count: Visitors waiting.
        """
        self._extra = min(MAX_EXTRA, max(self._extra, count))
        self._fill()

    def used(self, session: TunnelDataSession) -> None:
        """
        A data session got a stream: open a replacement.
        """
        self._idle.discard(session)
        if self._extra:
            self._extra -= 1
        self._fill()

    def lost(self, session: TunnelDataSession) -> None:
        """
        An idle or attaching data session closed.
        """
        self._idle.discard(session)

    def _fill(self) -> None:
        """
        Open data sessions until the pool (and the relay's extra request) is covered.
        """
        if self._session is None or self._retry is not None:
            return
        while len(self._idle) + self._opening < self.size + self._extra:
            self._open(*self._session)

    def _open(self, sessionId: bytes, key: bytes, sealSecret: bytes | None) -> None:
        """
        Connect and attach one data session.
        """
        self._opening += 1
        protocol = TunnelDataSession(self, sessionId, key, sealSecret)
        d = connectQuietly(self._endpoint(), protocol)
        d.addCallback(lambda p: p.attached)
        d.addTimeout(self._timeout, self._reactor)

        def current() -> bool:
            return self._session is not None and self._session[0] == sessionId

        def attached(session: TunnelDataSession) -> None:
            if not current():
                assert session.transport is not None
                session.transport.loseConnection()
                return
            self._opening -= 1
            self._failures = 0
            self._idle.add(session)

        def failed(failure: Failure) -> None:
            if protocol.transport is not None:
                protocol.transport.loseConnection()
            if not current():
                return
            self._opening -= 1
            self._log.warn(
                "could not open a data session: {error}", error=failure.getErrorMessage()
            )
            self._failures += 1
            if self._failures >= MAX_FAILURES_IN_A_ROW and self._onStuck is not None:
                self._failures = 0
                self._log.warn(
                    "{count} data sessions in a row failed while the control session is up; "
                    "reconnecting the control session",
                    count=MAX_FAILURES_IN_A_ROW,
                )
                self._onStuck()
                return
            if self._retry is None:
                self._retry = self._reactor.callLater(RETRY_DELAY, self._retryNow)

        d.addCallbacks(attached, failed)

    def _retryNow(self) -> None:
        """
        Try to fill the pool again after a failure.
        """
        self._retry = None
        self._fill()
