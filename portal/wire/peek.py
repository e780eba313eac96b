"""
Peek-then-dispatch: buffer the first bytes of a connection until they say which protocol should serve it,
then hand the connection (transport and buffered bytes) to that protocol.

Shaped like L{twisted.protocols.haproxy._wrapper.HAProxyProtocolWrapper}: the wrapper forwards every later
event to the chosen one, unless it can leave the connection's chain (L{PeekingProtocol.leaveChain}).
"""

from __future__ import annotations

from twisted.internet.interfaces import IHalfCloseableProtocol, IProtocol, ITransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer


class RefuseConnection(Exception):
    """
    Raised by L{PeekingProtocol.choose} when the first bytes fit no protocol; the message is logged.

    @ivar reply: Bytes to send before closing (for example a TLS alert).
    """

    def __init__(self, reason: str, reply: bytes = b"") -> None:
        super().__init__(reason)
        self.reply = reply


def passReadConnectionLost(protocol: IProtocol | None, transport: ITransport | None) -> None:
    """
    Pass a half-close on to the protocol a wrapper serves with, or close the transport when that
    protocol cannot half-close.

    @param protocol: The protocol the connection is handed to.
    @param transport: The connection's transport.
    """
    halfCloseable = IHalfCloseableProtocol(protocol, None)
    if halfCloseable is not None:
        halfCloseable.readConnectionLost()
    else:
        assert transport is not None
        transport.loseConnection()


def passWriteConnectionLost(protocol: IProtocol | None) -> None:
    """
    Pass the end of the writing direction on to the protocol a wrapper serves with, if it can
    half-close.

    @param protocol: The protocol the connection is handed to.
    """
    halfCloseable = IHalfCloseableProtocol(protocol, None)
    if halfCloseable is not None:
        halfCloseable.writeConnectionLost()


@implementer(IHalfCloseableProtocol)
class PeekingProtocol(Protocol, TimeoutMixin):
    """
    Buffers received bytes until L{choose} picks a protocol, then delegates to it.

    @cvar maxPeek: Most bytes buffered before giving up.
    @cvar peekTimeout: Seconds a client may take to send enough bytes to decide.
    @ivar chosen: The protocol serving the connection, once chosen.
    """

    maxPeek = 4096
    peekTimeout: float | None = 10.0
    chosen: IProtocol | None = None
    _log = Logger()

    def __init__(self) -> None:
        self._peeked = b""

    def connectionMade(self) -> None:
        """
        Start the timer for the first bytes.
        """
        self.setTimeout(self.peekTimeout)

    def choose(self, data: bytes) -> IProtocol | None:
        """
        Decide which protocol serves this connection.

        @param data: All bytes received so far.
        @return: The protocol (not yet connected), or L{None} to wait for more bytes.
        @raise RefuseConnection: When no protocol fits.
        """
        raise NotImplementedError()

    def dataReceived(self, data: bytes) -> None:
        """
        Forward to the chosen protocol, or buffer and try to choose one.

        @param data: Bytes from the transport.
        """
        chosen = self.chosen
        if chosen is not None:
            chosen.dataReceived(data)
            return
        self._peeked += data
        try:
            chosen = self.choose(self._peeked)
        except RefuseConnection as e:
            self.refuse(str(e), e.reply)
            return
        if chosen is None:
            if self.peekedTooMuch():
                self.refuse(f"sent {len(self._peeked)} bytes without a recognisable start")
            return
        self.setTimeout(None)
        self.chosen = chosen
        data, self._peeked = self._peeked, b""
        assert self.transport is not None
        chosen.makeConnection(self.transport)
        if data:
            chosen.dataReceived(data)
        self.leaveChain(chosen)

    def leaveChain(self, chosen: IProtocol) -> bool:
        """
        Once C{chosen} serves the connection, take this wrapper out of the chain of protocols the
        transport calls: the transport's protocol, when it is this wrapper, becomes C{chosen}; a
        wrapper holding this one that can swap what it holds (C{replaceInner(old, new)}, as the
        connection limiter's does) holds C{chosen} instead. Every later event then reaches C{chosen}
        without this wrapper, which is freed (issue 16: about 0.2 KB per idle data session at the
        relay). Otherwise it stays and forwards.

        @param chosen: The protocol now serving the connection.
        @return: Whether this wrapper left the chain.
        """
        transport = self.transport
        holder = getattr(transport, "protocol", None)
        if holder is self:
            transport.protocol = chosen  # type: ignore[union-attr]
            return True
        replaceInner = getattr(holder, "replaceInner", None)
        if replaceInner is not None:
            left: bool = replaceInner(self, chosen)
            return left
        return False

    def peekedTooMuch(self) -> bool:
        """
        @return: Whether more bytes were buffered than a decision may need (L{maxPeek}).
        """
        return len(self._peeked) > self.maxPeek

    def refuse(self, reason: str, reply: bytes = b"") -> None:
        """
        Log why the connection is refused, send C{reply} and close.

        @param reason: A human-readable reason.
        @param reply: Bytes to send first.
        """
        self.setTimeout(None)
        assert self.transport is not None
        peer = self.transport.getPeer()
        self._log.info(
            "refused connection from {peer}: {reason}",
            peer=getattr(peer, "host", peer),
            reason=reason,
        )
        if reply:
            self.transport.write(reply)
        self.transport.loseConnection()

    def timeoutConnection(self) -> None:
        """
        The client sent too little for too long.
        """
        self.refuse(f"no protocol recognised within {self.peekTimeout} seconds")

    def readConnectionLost(self) -> None:
        """
        Pass a half-close on, or close when the chosen protocol cannot half-close.
        """
        passReadConnectionLost(self.chosen, self.transport)

    def writeConnectionLost(self) -> None:
        """
        Pass the end of our writing direction on to the chosen protocol.
        """
        passWriteConnectionLost(self.chosen)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """
        Stop the timer and tell the chosen protocol.

        @param reason: Why the connection closed.
        """
        self.setTimeout(None)
        if self.chosen is not None:
            self.chosen.connectionLost(reason)
