"""
Connection limits for listeners: a cap on the connections open in total (every listener of the
process shares it: descriptors are a process resource) and a cap per source address (L{sourceKey}:
IPv4 /32, IPv6 /64) per listener.

L{LimitedFactory} wraps a listener's factory. Over a cap, the connection is closed at once (after an
optional reply, such as a TLS alert) and the refusal is counted by reason in L{Refusals}. An admitted
connection is served by the wrapped factory's protocol with the I{real} transport (only the
protocol events pass through L{_Admitted}), so the kernel splice and producers see the TCP
transport itself; the wrapper counts the connection until it is lost.

A connection that proves who it is (a tunnel's data session after its attach, another relay's
member link after its proof) is vouched for (L{vouchFor}): it stops counting against its source,
so that a busy tunnel's data sessions are not capped like an anonymous client's connections, but
it still counts in the total.

Twisted's L{twisted.protocols.policies.LimitConnectionsByPeer} counts per host only (no /64, no
total, no reply, no count of refusals) and L{twisted.protocols.policies.WrappingFactory} would put
a wrapper between the protocol and its transport, which the kernel splice cannot take over.
"""

from __future__ import annotations

import resource

from twisted.internet.interfaces import (
    IAddress,
    IHalfCloseableProtocol,
    IProtocol,
    IProtocolFactory,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from portal.forwarding.refusals import Refusals
from portal.forwarding.sources import peerSource
from portal.wire.peek import passReadConnectionLost, passWriteConnectionLost

#: Descriptors kept for everything that is not an accepted connection (listeners, pipes of the
#: kernel splice, UDP sockets, files) when the total cap is fitted to the descriptor limit.
RESERVED_DESCRIPTORS = 1024


class OpenConnections:
    """
    The connections open on every limited listener of the process, and their cap.

    @ivar maximum: Most connections open at once.
    @ivar count: Connections open now.
    """

    def __init__(self, maximum: int) -> None:
        """
        @param maximum: Most connections open at once; at least 1.
        @raise ValueError: If C{maximum} is less than 1.
        """
        if maximum < 1:
            raise ValueError(f"the connection cap must be at least 1, not {maximum}")
        self.maximum = maximum
        self.count = 0


class ConnectionLimiter:
    """
    The caps of one listener: the process's total, and connections per source address.

    @ivar listener: The listener's name, for logs (C{"public"}, C{"control"}, C{"http"}, C{"tcp"}).
    @ivar maxPerSource: Most connections open at once from one source on this listener.
    @ivar total: The process-wide count and cap.
    @ivar bySource: Open connections per source on this listener, except those vouched for.
    """

    def __init__(
        self, listener: str, maxPerSource: int, total: OpenConnections, refusals: Refusals
    ) -> None:
        """
        @param listener: The listener's name, for logs.
        @param maxPerSource: Most connections open at once from one source; at least 1.
        @param total: The process-wide count and cap.
        @param refusals: Where refusals are counted and logged.
        @raise ValueError: If C{maxPerSource} is less than 1.
        """
        if maxPerSource < 1:
            raise ValueError(
                f"the per-source connection cap must be at least 1, not {maxPerSource}"
            )
        self.listener = listener
        self.maxPerSource = maxPerSource
        self.total = total
        self.refusals = refusals
        self.bySource: dict[str, int] = {}
        #: Connections open that were vouched for (they count in no source).
        self.vouched = 0

    @property
    def open(self) -> int:
        """
        Connections open on this listener, vouched for or not.
        """
        return sum(self.bySource.values()) + self.vouched

    def admit(self, source: str) -> bool:
        """
        Count a new connection from C{source}, unless a cap is reached (the refusal is then counted
        and logged).

        @param source: The connection's L{sourceKey}.
        @return: Whether the connection may stay open; if so, L{release} must be called when it
            closes.
        """
        held = self.bySource.get(source, 0)
        if self.total.count >= self.total.maximum:
            self.refusals.refuse(
                "connections_total",
                "refused a connection from {source} on the {listener} listener: {maximum} "
                "connections are open, the most allowed",
                source=source,
                listener=self.listener,
                maximum=self.total.maximum,
            )
            return False
        if held >= self.maxPerSource:
            self.refusals.refuse(
                "connections_per_source",
                "refused a connection from {source} on the {listener} listener: it has "
                "{maximum} open, the most allowed per source address",
                source=source,
                listener=self.listener,
                maximum=self.maxPerSource,
            )
            return False
        self.bySource[source] = held + 1
        self.total.count += 1
        return True

    def release(self, source: str) -> None:
        """
        A connection admitted by L{admit} closed.

        @param source: The connection's L{sourceKey}.
        """
        if self._uncount(source):
            self.total.count -= 1

    def vouch(self, source: str) -> None:
        """
        A connection admitted by L{admit} proved who it is: it no longer counts against its source
        (it still counts in the total until L{released}).

        @param source: The connection's L{sourceKey}.
        """
        self._uncount(source)
        self.vouched += 1

    def released(self) -> None:
        """
        A connection vouched for closed.
        """
        self.vouched -= 1
        self.total.count -= 1

    def _uncount(self, source: str) -> bool:
        """
        Stop counting one connection against C{source}.

        @return: Whether one was counted.
        """
        held = self.bySource.get(source, 0)
        if held <= 0:
            return False
        if held == 1:
            del self.bySource[source]
        else:
            self.bySource[source] = held - 1
        return True


class _Refused(Protocol):
    """
    Serves a connection over a cap: writes the reply (if any) and closes.
    """

    def __init__(self, reply: bytes) -> None:
        self._reply = reply

    def connectionMade(self) -> None:
        """
        Reply and close at once.
        """
        assert self.transport is not None
        if self._reply:
            self.transport.write(self._reply)
        self.transport.loseConnection()


@implementer(IHalfCloseableProtocol)
class _Admitted(Protocol):
    """
    Counts an admitted connection until it is lost, passing every event to the protocol serving it,
    which is connected to the real transport.
    """

    _vouched = False

    def __init__(self, inner: IProtocol, limiter: ConnectionLimiter, source: str) -> None:
        self.inner = inner
        self._limiter = limiter
        self._source = source

    def vouch(self) -> None:
        """
        The connection proved who it is: stop counting it against its source.
        """
        if not self._vouched and self.connected:
            self._vouched = True
            self._limiter.vouch(self._source)

    def replaceInner(self, old: IProtocol, new: IProtocol) -> bool:
        """
        Pass every later event to C{new} instead of C{old}, when C{old} is the inner protocol (a
        peeking wrapper leaving the chain once it has chosen, L{portal.wire.peek.PeekingProtocol}).

        @return: Whether C{new} is now the inner protocol.
        """
        if self.inner is not old:
            return False
        self.inner = new
        return True

    def makeConnection(self, transport: ITransport) -> None:
        """
        Connect the inner protocol to the transport itself.
        """
        self.transport = transport
        self.connected = 1
        self.inner.makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        """
        Pass bytes on.
        """
        self.inner.dataReceived(data)

    def readConnectionLost(self) -> None:
        """
        Pass a half-close on, or close when the inner protocol cannot half-close.
        """
        passReadConnectionLost(self.inner, self.transport)

    def writeConnectionLost(self) -> None:
        """
        Pass the end of the writing direction on.
        """
        passWriteConnectionLost(self.inner)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """
        Stop counting the connection and tell the inner protocol.
        """
        self.connected = 0
        if self._vouched:
            self._limiter.released()
        else:
            self._limiter.release(self._source)
        self.inner.connectionLost(reason)

    def logPrefix(self) -> str:
        """
        @return: The inner protocol's class name, for Twisted's log prefix.
        """
        return type(self.inner).__name__


class LimitedFactory(Factory):
    """
    Wraps a listener's factory with a L{ConnectionLimiter}.

    @ivar wrapped: The factory that serves admitted connections.
    @ivar limiter: The caps.
    """

    noisy = False

    def __init__(
        self, wrapped: IProtocolFactory, limiter: ConnectionLimiter, reply: bytes = b""
    ) -> None:
        """
        @param wrapped: The factory that serves admitted connections.
        @param limiter: The caps.
        @param reply: Bytes written to a refused connection before it is closed (a TLS alert on a
            TLS listener: the client then sees an error rather than a reset).
        """
        self.wrapped = wrapped
        self.limiter = limiter
        self._reply = reply

    def doStart(self) -> None:
        """
        Start the wrapped factory too.
        """
        self.wrapped.doStart()
        super().doStart()

    def doStop(self) -> None:
        """
        Stop the wrapped factory too.
        """
        self.wrapped.doStop()
        super().doStop()

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        """
        Admit the connection and build its protocol, or refuse it.

        @param addr: The peer's address (listening ports always give one).
        @return: L{_Admitted} around the wrapped factory's protocol; for a refused connection,
            L{_Refused} to send the reply, or L{None} without one (Twisted then closes the socket
            at once, without building a transport: the cheapest refusal a flood can get).
        """
        assert addr is not None
        source = peerSource(addr)
        if not self.limiter.admit(source):
            return _Refused(self._reply) if self._reply else None
        inner = self.wrapped.buildProtocol(addr)
        if inner is None:
            self.limiter.release(source)
            return None
        return _Admitted(inner, self.limiter, source)


def vouchFor(transport: object) -> bool:
    """
    Vouch for the connection under C{transport}: it proved who it is, so it stops counting against
    its source address (see L{ConnectionLimiter.vouch}).

    @param transport: The transport of a protocol served by a L{LimitedFactory}: the TCP transport
        itself, or a TLS transport wrapping it.
    @return: Whether a limited connection was found (and vouched for).
    """
    for _ in range(4):
        protocol = getattr(transport, "protocol", None)
        if isinstance(protocol, _Admitted):
            protocol.vouch()
            return True
        transport = getattr(transport, "transport", None)
        if transport is None:
            break
    return False


def fitToDescriptors(maximum: int, reserved: int = RESERVED_DESCRIPTORS) -> int:
    """
    Fit a total connection cap to the process's descriptor limit, raising the soft limit to the
    hard one first where it is lower.

    @param maximum: The cap asked for.
    @param reserved: Descriptors kept for everything but accepted connections.
    @return: C{maximum}, or the soft limit less C{reserved} (at least 1) if that is lower.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return maximum
    return max(1, min(maximum, soft - reserved))
