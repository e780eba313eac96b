"""
TCP transports that send at once what is written while nothing waits in their buffer.

Twisted's TCP transports buffer every write and send it on the reactor's next turn: C{startWriting}
(one C{epoll_ctl}), a wake-up, C{send}, then C{stopWriting} (another C{epoll_ctl}). For a
connection that moves one message at a time (an attach line, a spliced read, a TLS flight) that is
three system calls and a reactor turn more than the one C{send} it needs; a profile of the tunnel's
new-connection path counted 28 C{epoll_ctl} per visitor (issue 16). L{WriteThrough} sends a write
directly when the transport's buffer is empty, as asyncio's transports do, and buffers only what the
kernel did not take: the rest of the transport (producers, half-close, C{loseConnection} draining
its buffer) sees a buffer that was empty and stays empty, or one holding the remainder. Writes take
the buffered path as before when something is buffered already (order), when the connection is
closing, half-closed or aborted, under C{startTLS}, with a pull producer registered (Twisted drives
those from its write events), and above C{SEND_LIMIT} bytes (the remainder would be copied).

Errors are never raised from C{write}: a send that fails leaves the data buffered, and the
reactor's next write attempt meets the same error and loses the connection the usual way.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.internet import main, tcp
from twisted.python.failure import Failure


class WriteThrough:
    """
    Mixed in before a Twisted TCP transport class (L{tcp.Server}, L{tcp.Client}).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        base: Any = super()
        base.__init__(*args, **kwargs)
        # CPython 3.11 makes room in a class's shared keys for fewer new names with every instance
        # made, and gives an instance setting a name that finds no room a dictionary of its own
        # (about 0.8 KB): names a connection only sets later (a producer registered, a write
        # buffered, the buffer taken over by the relay's kernel splice) are set here, to their
        # class defaults, so that every instance's names are in the keys (issue 16: memory per
        # idle connection, 0.9 KB of the relay's per visitor).
        this: Any = self
        this.producer = None
        this.streamingProducer = False
        this.producerPaused = False
        this.dataBuffer = b""
        this.offset = 0

    def write(self, data: bytes) -> None:
        """
        Send C{data} now if nothing is buffered; buffer what the kernel does not take.
        """
        this: Any = self
        if (
            data
            and len(data) <= this.SEND_LIMIT
            and not this._tempDataLen
            and not this.dataBuffer
            and this.connected
            and not this.disconnecting
            and not this._aborting
            and not this._writeDisconnected
            and not this._writeDisconnecting
            and not this.TLS
            and (this.producer is None or this.streamingProducer)
        ):
            try:
                sent = this.socket.send(data)
            except OSError:
                sent = 0  # Blocked, or broken: the buffered path meets it again.
            if sent == len(data):
                return
            data = data[sent:]
        base: Any = super()
        base.write(data)

    def loseConnection(self) -> None:
        """
        Close: at once (on the reactor's next turn) when nothing is buffered and no producer waits
        to be asked for more; otherwise after the buffer drains, as Twisted does.

        Twisted registers the socket for writing, wakes up to send nothing, and only then closes:
        two C{epoll_ctl}, an empty C{send} and a reactor turn more for every connection closed
        with an empty buffer.
        """
        this: Any = self
        if (
            this.connected
            and not this.disconnecting
            and not this._tempDataLen
            and not this.dataBuffer
            and not this._aborting
            and not this._writeDisconnected
            and not this._writeDisconnecting
            and not this.TLS
            and (this.producer is None or (this.streamingProducer and not this.producerPaused))
        ):
            this.stopReading()
            this.disconnecting = True
            this.reactor.callLater(0, self._closeNow)
            return
        base: Any = super()
        base.loseConnection()

    def _closeNow(self) -> None:
        """
        Close after L{loseConnection}, unless the connection was lost meanwhile; what was written
        since is sent first (Twisted's way: the buffer drains, then the connection closes).
        """
        this: Any = self
        if this.disconnected or not hasattr(this, "socket"):
            return
        if this._tempDataLen or this.dataBuffer:
            this.startWriting()
            return
        this.stopWriting()
        this.connectionLost(Failure(main.CONNECTION_DONE))

    def writeSequence(self, iovec: Iterable[bytes]) -> None:
        """
        Write the chunks of C{iovec} as one, through L{write}.
        """
        chunks = list(iovec)
        if chunks:
            self.write(b"".join(chunks))


class WriteThroughServer(WriteThrough, tcp.Server):
    """
    An accepted TCP connection that writes through (see L{WriteThrough}).

    Its log prefix and C{repr} are made when asked for, not kept: Twisted's server transport formats
    both texts for every connection it accepts and keeps them (about 150 bytes per connection, twice
    per relayed visitor: issue 16's memory per idle connection). Made later, they name the
    protocol serving the connection then.
    """

    @property
    def logstr(self) -> str:
        """
        The log prefix: protocol, session number and peer host, as Twisted's.
        """
        this: Any = self
        return f"{this._getLogPrefix(this.protocol)},{this.sessionno},{this.hostname}"

    @logstr.setter
    def logstr(self, value: str) -> None:
        """
        Twisted's constructor sets it: made when asked for instead.
        """

    @property
    def repstr(self) -> str:
        """
        The C{repr}: protocol class, session number and the listening port's number, as
        Twisted's.
        """
        this: Any = self
        port = this.server._realPortNumber if this.server is not None else None
        return f"<{type(this.protocol).__name__} #{this.sessionno} on {port}>"

    @repstr.setter
    def repstr(self, value: str) -> None:
        """
        Twisted's constructor sets it: made when asked for instead.
        """
