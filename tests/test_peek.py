"""
Tests for L{portal.wire.peek}: a peeking protocol hands the connection to the protocol it chooses
and, where the chain allows, leaves it.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IProtocol
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from portal.forwarding.connlimit import ConnectionLimiter, LimitedFactory, OpenConnections
from portal.forwarding.refusals import Refusals
from portal.wire.peek import PeekingProtocol, RefuseConnection

_PEER = IPv4Address("TCP", "198.51.100.9", 4000)


class _Served(Protocol):
    """
    Records what reaches the chosen protocol.
    """

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.lost: list[Failure] = []

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost.append(reason)


class _Peeker(PeekingProtocol):
    """
    Chooses L{_Served} once it has seen C{b"go"}; refuses anything else.
    """

    peekTimeout = None

    def __init__(self) -> None:
        super().__init__()
        self.served = _Served()

    def choose(self, data: bytes) -> IProtocol | None:
        if data.startswith(b"go"):
            return self.served
        if b"go".startswith(data):
            return None
        raise RefuseConnection("not go")


class _Holder(Protocol):
    """
    A wrapper that forwards to an inner protocol and cannot swap it.
    """

    def __init__(self, inner: IProtocol) -> None:
        self.inner = inner

    def makeConnection(self, transport: Any) -> None:
        self.transport = transport
        self.inner.makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        self.inner.dataReceived(data)


def _connect(protocol: IProtocol) -> StringTransport:
    """
    Connect C{protocol} to an in-memory transport whose C{protocol} is C{protocol}, as Twisted's
    TCP transports' is.
    """
    transport = StringTransport(peerAddress=_PEER)
    transport.protocol = protocol  # type: ignore[attr-defined]
    protocol.makeConnection(transport)
    return transport


class LeaveChainTests(SynchronousTestCase):
    """
    L{PeekingProtocol.leaveChain}.
    """

    def test_transportProtocolReplaced(self) -> None:
        """
        When the peeker is the transport's protocol, the chosen protocol takes its place once chosen,
        and gets the peeked bytes first.
        """
        peeker = _Peeker()
        transport = _connect(peeker)
        peeker.dataReceived(b"g")
        self.assertIs(transport.protocol, peeker)  # type: ignore[attr-defined]
        peeker.dataReceived(b"o!")
        self.assertIs(transport.protocol, peeker.served)  # type: ignore[attr-defined]
        self.assertEqual(peeker.served.received, [b"go!"])
        self.assertIs(peeker.served.transport, transport)

    def test_limitedWrapperSwapsInner(self) -> None:
        """
        Under the connection limiter's wrapper, the wrapper holds the chosen protocol instead of the
        peeker: later bytes reach it directly, and closing the connection still releases the
        source's count and tells the chosen protocol.
        """
        peeker = _Peeker()
        factory = Factory.forProtocol(lambda: peeker)
        limiter = ConnectionLimiter(
            "control", 4, OpenConnections(10), Refusals(MemoryReactorClock())
        )
        wrapper: Any = LimitedFactory(factory, limiter).buildProtocol(_PEER)
        transport = _connect(wrapper)
        self.assertEqual(limiter.bySource, {"198.51.100.9": 1})
        wrapper.dataReceived(b"go")
        self.assertIs(wrapper.inner, peeker.served)
        wrapper.dataReceived(b"more")
        self.assertEqual(peeker.served.received, [b"go", b"more"])
        wrapper.connectionLost(Failure(Exception("closed")))
        self.assertEqual(limiter.bySource, {})
        self.assertEqual(len(peeker.served.lost), 1)
        self.assertIs(transport.protocol, wrapper)  # type: ignore[attr-defined]

    def test_otherHolderKeepsPeeker(self) -> None:
        """
        A holder that cannot swap what it holds keeps the peeker, which forwards every later event.
        """
        peeker = _Peeker()
        holder = _Holder(peeker)
        transport = _connect(holder)
        holder.dataReceived(b"go")
        self.assertIs(holder.inner, peeker)
        self.assertIs(transport.protocol, holder)  # type: ignore[attr-defined]
        holder.dataReceived(b"on")
        self.assertEqual(peeker.served.received, [b"go", b"on"])

    def test_swapOnlyWhatIsHeld(self) -> None:
        """
        The limiter's wrapper swaps its inner protocol only for the one it holds.
        """
        factory = Factory.forProtocol(_Served)
        limiter = ConnectionLimiter(
            "control", 4, OpenConnections(10), Refusals(MemoryReactorClock())
        )
        wrapper: Any = LimitedFactory(factory, limiter).buildProtocol(_PEER)
        inner = wrapper.inner
        self.assertFalse(wrapper.replaceInner(_Served(), _Served()))
        self.assertIs(wrapper.inner, inner)

    def test_refusedStays(self) -> None:
        """
        A refused connection chooses nothing and leaves nothing: the peeker closes it.
        """
        peeker = _Peeker()
        transport = _connect(peeker)
        peeker.dataReceived(b"no")
        self.assertIs(transport.protocol, peeker)  # type: ignore[attr-defined]
        self.assertTrue(transport.disconnecting)
        self.assertEqual(peeker.served.received, [])
