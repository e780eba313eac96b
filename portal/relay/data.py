"""
The relay's end of a stream data session: authenticate the attach, wait idle in the pool, then splice.

Its lifecycle is an automat machine (L{sessionMachine}; table in C{docs/lifecycles.md}):
C{attaching} (nonce sent, attach proof awaited, timer running) -> C{idle} (in its control session's
pool) -> C{paired} (carrying one visitor's stream) -> C{closed}; a bad or late attach, or data on an
idle session, closes it from C{attaching} or C{idle}.
"""

from __future__ import annotations

import os
from typing import Protocol

from automat import TypeMachine, TypeMachineBuilder
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from portal.forwarding.connlimit import vouchFor
from portal.forwarding.sealedstream import SealedConnection, sealedStream
from portal.forwarding.splice import SpliceProtocol, noDelay
from portal.relay.interfaces import IDataSession
from portal.relay.router import DataPool, OnRouterClock, Router
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


class DataSessionInputs(Protocol):
    """
    The inputs of a relay data session's lifecycle (L{sessionMachine}).
    """

    def received(self, data: bytes) -> None:
        """
        Bytes from the tunnel before the session is spliced.
        """

    def attached(self, pool: DataPool) -> None:
        """
        The attach proof checked out for C{pool}'s control session.
        """

    def refused(self, reason: str) -> None:
        """
        The session broke the protocol or the attach failed: close it.
        """

    def timedOut(self) -> None:
        """
        The attach timer fired.
        """

    def paired(self) -> None:
        """
        The pool paired the session with a visitor (its C{streamId} is set).
        """

    def lost(self) -> None:
        """
        The connection closed.
        """

    def state(self) -> str:
        """
        @return: The name of the current state.
        """


@implementer(IDataSession)
class RelayDataSession(OnRouterClock, SpliceProtocol, TimeoutMixin):
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
        self.nonce = os.urandom(NONCE_LENGTH)
        self._buffer = b""
        self._machine = sessionMachine(self)

    @property
    def lifecycle(self) -> str:
        """
        The lifecycle state: C{attaching}, C{idle}, C{paired} or C{closed}.
        """
        return self._machine.state()

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
        Bytes before the splice: the magic and the attach proof; an attached idle session must stay
        silent.

        @param data: Bytes from the tunnel.
        """
        self._machine.received(data)

    def paired(self, streamId: int) -> None:
        """
        The pool paired this session with a visitor.

        @param streamId: The stream it carries.
        """
        # Set at once: the pool seals the stream under it right after (raw TCP mode), and the
        # machine runs an input given while it runs an output (the pool pairs a session it was
        # offered from the attached output) only once that output is done.
        self.streamId = streamId
        self._machine.paired()

    def _readAttach(self, data: bytes) -> None:
        """
        Buffer the magic and the attach proof, and check the proof once complete.

        @param data: Bytes from the tunnel.
        """
        self._buffer += data
        if len(self._buffer) < len(MAGIC) + ATTACH_LENGTH:
            if not MAGIC.startswith(self._buffer[: len(MAGIC)]):
                self._machine.refused("bad data session magic")
            return
        if not self._buffer.startswith(MAGIC):
            self._machine.refused("bad data session magic")
            return
        proof = self._buffer[len(MAGIC) : len(MAGIC) + ATTACH_LENGTH]
        if len(self._buffer) > len(MAGIC) + ATTACH_LENGTH:
            self._machine.refused("tunnel sent data before a stream was assigned")
            return
        self._buffer = b""
        sessionId, tag = proof[:SESSION_ID_LENGTH], proof[SESSION_ID_LENGTH:]
        pool = self._router.sessions.get(sessionId)
        binding = exportKeyingMaterial(self.transport, EXPORTER_DATA_SESSION) if self.tls else b""
        if pool is None or not checkAttachProof(pool.key, self.nonce, sessionId, tag, binding):
            self._machine.refused("data session attach failed authentication")
            return
        self._machine.attached(pool)

    def _offer(self, pool: DataPool) -> None:
        """
        The attach checked out: acknowledge it and wait in C{pool}.
        """
        self.setTimeout(None)
        self._pool = pool
        # An authenticated data session no longer counts against its address's connection cap.
        vouchFor(self.transport)
        assert self.transport is not None
        kind = "tls_data_sessions" if self.tls else "plain_data_sessions"
        self._router.counters[kind] = self._router.counters.get(kind, 0) + 1
        if self.tls:
            # A chain's data sessions are logged; plain ones attach once per visitor, and twistd
            # writes debug events too: a line per visitor cost the relay 4% of its time per new
            # connection (issue 16). /metrics counts them (portal_relay_python_spliced_total,
            # portal_relay_kernel_spliced_total) once paired.
            peer = self.transport.getPeer()
            self._log.debug(
                "data session attached from {peer} (TLS)",
                peer=f"{getattr(peer, 'host', peer)}:{getattr(peer, 'port', '')}",
            )
        self.transport.write(ACK)
        pool.offer(self)

    def _leavePool(self) -> None:
        """
        No visitor may be paired with this session any more.
        """
        if self._pool is not None:
            self._pool.forget(self)

    def _refuse(self, reason: str) -> None:
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
        self._machine.timedOut()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """
        Leave the idle pool, close the visitor if paired.

        @param reason: Why.
        """
        self._machine.lost()
        if self._sealed is not None:
            self._sealed.connectionLost(reason)
            return
        super().connectionLost(reason)


def _buildSessionMachine() -> TypeMachine[DataSessionInputs, RelayDataSession]:
    """
    Describe the data session lifecycle; see the module docstring.
    """
    builder = TypeMachineBuilder(DataSessionInputs, RelayDataSession)
    attaching = builder.state("attaching")
    idle = builder.state("idle")
    paired = builder.state("paired")
    closed = builder.state("closed")

    @attaching.upon(DataSessionInputs.received).loop()
    def readAttach(inputs: DataSessionInputs, session: RelayDataSession, data: bytes) -> None:
        session._readAttach(data)

    @attaching.upon(DataSessionInputs.attached).to(idle)
    def offer(inputs: DataSessionInputs, session: RelayDataSession, pool: DataPool) -> None:
        session._offer(pool)

    @attaching.upon(DataSessionInputs.refused).to(closed)
    def refuse(inputs: DataSessionInputs, session: RelayDataSession, reason: str) -> None:
        session._refuse(reason)

    @idle.upon(DataSessionInputs.refused).to(closed)
    def refuseIdle(inputs: DataSessionInputs, session: RelayDataSession, reason: str) -> None:
        session._leavePool()
        session._refuse(reason)

    @idle.upon(DataSessionInputs.received).to(closed)
    def talkative(inputs: DataSessionInputs, session: RelayDataSession, data: bytes) -> None:
        session._leavePool()
        session._refuse("tunnel sent data on an idle data session")

    @attaching.upon(DataSessionInputs.timedOut).to(closed)
    def late(inputs: DataSessionInputs, session: RelayDataSession) -> None:
        session._refuse(f"no attach within {session._router.limits.attachTimeout} seconds")

    # A pool may pair a session offered to it directly (the attach is the offerer's business).
    @attaching.upon(DataSessionInputs.paired).to(paired)
    @idle.upon(DataSessionInputs.paired).to(paired)
    def carry(inputs: DataSessionInputs, session: RelayDataSession) -> None:
        session.setTimeout(None)

    @attaching.upon(DataSessionInputs.lost).to(closed)
    @paired.upon(DataSessionInputs.lost).to(closed)
    def gone(inputs: DataSessionInputs, session: RelayDataSession) -> None:
        session.setTimeout(None)

    @idle.upon(DataSessionInputs.lost).to(closed)
    def goneIdle(inputs: DataSessionInputs, session: RelayDataSession) -> None:
        session.setTimeout(None)
        session._leavePool()

    # Late news for a session that is already spliced or closed changes nothing.
    for state in (paired, closed):
        state.upon(DataSessionInputs.received).loop().returns(None)
        state.upon(DataSessionInputs.refused).loop().returns(None)
        state.upon(DataSessionInputs.timedOut).loop().returns(None)
        state.upon(DataSessionInputs.attached).loop().returns(None)
    idle.upon(DataSessionInputs.timedOut).loop().returns(None)
    idle.upon(DataSessionInputs.attached).loop().returns(None)
    paired.upon(DataSessionInputs.paired).loop().returns(None)
    closed.upon(DataSessionInputs.paired).loop().returns(None)
    closed.upon(DataSessionInputs.lost).loop().returns(None)
    for state, name in (
        (attaching, "attaching"),
        (idle, "idle"),
        (paired, "paired"),
        (closed, "closed"),
    ):
        state.upon(DataSessionInputs.state).loop().returns(name)
    return builder.build()


#: The data session lifecycle, built once; each session runs its own instance.
sessionMachine = _buildSessionMachine()
