"""
The relay's end of a stream data session: authenticate the attach, wait idle in the pool, then splice.
"""

from __future__ import annotations

import os

from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from portal.forwarding.connlimit import vouchFor
from portal.forwarding.sealedstream import SealedConnection, sealedStream
from portal.forwarding.splice import SpliceProtocol, noDelay
from portal.relay.interfaces import IDataSession
from portal.relay.router import DataPool, Router
from portal.wire.attach import (
    ACK,
    ATTACH_LENGTH,
    MAGIC,
    NONCE_LENGTH,
    SESSION_ID_LENGTH,
    checkAttachProof,
)
from portal.wire.control import EXPORTER_DATA_SESSION, exportKeyingMaterial
from portal.wire.seal import Direction


@implementer(IDataSession)
class RelayDataSession(SpliceProtocol, TimeoutMixin):
    """
    A data session the tunnel opened to the control port, after the L{MAGIC} prefix was seen.

    @ivar nonce: The fresh nonce this session's attach and stream header are bound to.
    @ivar streamId: The stream it carries, once paired.
    @ivar tls: Whether the session runs inside TLS (through a chain of hops); its attach proof is then
        bound to the TLS session's exporter value.
    """

    _log = Logger()
    _pool: DataPool | None = None
    _sealed: SealedConnection | None = None
    streamId: int | None = None

    def __init__(self, router: Router, tls: bool = False) -> None:
        super().__init__()
        self._router = router
        self.tls = tls
        # TimeoutMixin would use the global reactor; time comes from the router's clock.
        # Replacing callLater is TimeoutMixin's documented hook; mypy-zope wrongly keeps "self" in
        # the signature of a method read from an interface-typed object, hence "assignment".
        self.callLater = router.clock.callLater  # type: ignore[method-assign, assignment]
        self.nonce = os.urandom(NONCE_LENGTH)
        self._buffer = b""
        self._attached = False

    def connectionMade(self) -> None:
        """
        Send the nonce and start the attach timer.
        """
        assert self.transport is not None
        noDelay(self.transport)
        self.transport.write(self.nonce)
        self.setTimeout(self._router.limits.attachTimeout)

    def seal(self, secret: bytes) -> SpliceProtocol:
        """
        Carry the rest of this session sealed (raw TCP mode), once the stream header is written.

        @param secret: The control session's raw TCP secret.
        @return: The splice end that stands for the tunnel's side of the stream, to splice with the
            visitor.
        """
        end = SpliceProtocol()
        self._sealed = sealedStream(
            end, secret, self.nonce, Direction.RELAY_TO_TUNNEL, self.streamId
        )
        self._sealed.makeConnection(self.transport)
        return end

    def dataReceived(self, data: bytes) -> None:
        """
        Open sealed frames in raw TCP mode; otherwise as any splice end.

        @param data: Bytes from the tunnel.
        """
        if self._sealed is not None:
            self._sealed.dataReceived(data)
        else:
            super().dataReceived(data)

    def readConnectionLost(self) -> None:
        """
        The tunnel closed its side: the sealed stream decides whether it ended or was cut.
        """
        if self._sealed is not None:
            self._sealed.readConnectionLost()
        else:
            super().readConnectionLost()

    def unsplicedDataReceived(self, data: bytes) -> None:
        """
        Read the magic and the attach proof; an attached idle session must stay silent.

        @param data: Bytes from the tunnel.
        """
        if self._attached:
            self._fail("tunnel sent data on an idle data session")
            return
        self._buffer += data
        if len(self._buffer) < len(MAGIC) + ATTACH_LENGTH:
            if not MAGIC.startswith(self._buffer[: len(MAGIC)]):
                self._fail("bad data session magic")
            return
        if not self._buffer.startswith(MAGIC):
            self._fail("bad data session magic")
            return
        proof = self._buffer[len(MAGIC) : len(MAGIC) + ATTACH_LENGTH]
        if len(self._buffer) > len(MAGIC) + ATTACH_LENGTH:
            self._fail("tunnel sent data before a stream was assigned")
            return
        self._buffer = b""
        sessionId, tag = proof[:SESSION_ID_LENGTH], proof[SESSION_ID_LENGTH:]
        pool = self._router.sessions.get(sessionId)
        binding = exportKeyingMaterial(self.transport, EXPORTER_DATA_SESSION) if self.tls else b""
        if pool is None or not checkAttachProof(pool.key, self.nonce, sessionId, tag, binding):
            self._fail("data session attach failed authentication")
            return
        self.setTimeout(None)
        self._attached = True
        self._pool = pool
        # An authenticated data session no longer counts against its address's connection cap.
        vouchFor(self.transport)
        assert self.transport is not None
        peer = self.transport.getPeer()
        self._log.debug(
            "data session attached from {peer} ({kind})",
            peer=f"{getattr(peer, 'host', peer)}:{getattr(peer, 'port', '')}",
            kind="TLS" if self.tls else "plain",
        )
        self.transport.write(ACK)
        pool.offer(self)

    def _fail(self, reason: str) -> None:
        """
        Log and close.

        @param reason: Why the session is refused.
        """
        assert self.transport is not None
        peer = self.transport.getPeer()
        self._router.refusals.refuse(
            "data_session",
            "refused data session from {peer}: {reason}",
            peer=getattr(peer, "host", str(peer)),
            reason=reason,
        )
        self.setTimeout(None)
        self.transport.loseConnection()

    def timeoutConnection(self) -> None:
        """
        The tunnel did not authenticate in time.
        """
        self._fail(f"no attach within {self._router.limits.attachTimeout} seconds")

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """
        Leave the idle pool, close the visitor if paired.

        @param reason: Why.
        """
        self.setTimeout(None)
        if self._sealed is not None:
            self._sealed.connectionLost(reason)
            return
        if self._pool is not None and self.peer is None:
            self._pool.forget(self)
        super().connectionLost(reason)
