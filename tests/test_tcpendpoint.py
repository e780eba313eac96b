"""
Tests for L{portal.forwarding.tcpendpoint}.
"""

from __future__ import annotations

import socket
from collections.abc import Generator
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.error import ConnectError, ConnectingCancelledError, ConnectionRefusedError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from portal.forwarding.quietconnect import connectQuietly
from portal.forwarding.tcpendpoint import _ClientFactoryFor, _LeanConnector, tcpEndpoint


class TCPEndpointTests(SynchronousTestCase):
    """
    L{tcpEndpoint} connects straight to IP literals and resolves names.
    """

    def test_ipv4Literal(self) -> None:
        """
        An IPv4 literal gets a L{TCP4ClientEndpoint}, which asks the reactor for the connection at
        once, with the timeout given, and runs no resolver.
        """
        reactor = MemoryReactorClock()
        endpoint = tcpEndpoint(reactor, "127.0.0.1", 8000, 7.0)
        self.assertIsInstance(endpoint, TCP4ClientEndpoint)
        self.assertTrue(verifyObject(IStreamClientEndpoint, endpoint))
        endpoint.connect(Factory.forProtocol(Protocol))
        [(host, port, _, timeout, _)] = reactor.tcpClients
        self.assertEqual((host, port, timeout), ("127.0.0.1", 8000, 7.0))

    def test_ipv6Literal(self) -> None:
        """
        An IPv6 literal, scoped or not, gets a L{TCP6ClientEndpoint} that connects at once.
        """
        for literal in ("::1", "fe80::1%lo"):
            reactor = MemoryReactorClock()
            endpoint = tcpEndpoint(reactor, literal, 443, 3.0)
            self.assertIsInstance(endpoint, TCP6ClientEndpoint)
            endpoint.connect(Factory.forProtocol(Protocol))
            [(host, port, _, timeout, _)] = reactor.tcpClients
            self.assertEqual((host, port, timeout), (literal, 443, 3.0))

    def test_hostname(self) -> None:
        """
        A name (C{localhost} included) gets a L{HostnameEndpoint}, which resolves it and tries
        each address it gets.
        """
        for name in ("localhost", "service.example", "127.0.0.1.example"):
            endpoint = tcpEndpoint(MemoryReactorClock(), name, 80, 5.0)
            self.assertIsInstance(endpoint, HostnameEndpoint)


class _Recorder(Protocol):
    """
    A client protocol that records whether it was connected and what it received.
    """

    def __init__(self) -> None:
        self.made = False
        self.received = b""
        self.gotData: Deferred[None] = Deferred()
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        """
        Note the connection.
        """
        self.made = True

    def dataReceived(self, data: bytes) -> None:
        """
        Record bytes.
        """
        self.received += data
        if not self.gotData.called:
            self.gotData.callback(None)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """
        Note the end.
        """
        self.lost.callback(None)


class _Greeter(Protocol):
    """
    A server protocol that says hello and closes.
    """

    def connectionMade(self) -> None:
        """
        Greet and close.
        """
        assert self.transport is not None
        self.transport.write(b"hello")
        self.transport.loseConnection()


class LeanConnectTests(TestCase):
    """
    On a real reactor, an IP literal's endpoint connects the protocol straight to the transport,
    with no wrapper left behind, and reports failures and cancellation as Twisted's TCP endpoints
    do. Real sockets on 127.0.0.1.
    """

    def listen(self) -> int:
        """
        @return: The port of a greeting server on 127.0.0.1, stopped after the test.
        """
        port = reactor.listenTCP(0, Factory.forProtocol(_Greeter), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return int(port.getHost().port)

    @inlineCallbacks
    def test_connectsProtocolDirectly(self) -> Generator[Deferred[Any], Any, None]:
        """
        The Deferred fires with the protocol, already connected, whose transport's protocol is
        the protocol itself; the connector keeps no protocol or Deferred.
        """
        port = self.listen()
        protocol = _Recorder()
        d = connectQuietly(tcpEndpoint(reactor, "127.0.0.1", port, 5.0), protocol)
        d.addTimeout(5, reactor)
        connected = yield d
        self.assertIs(connected, protocol)
        self.assertTrue(protocol.made)
        assert protocol.transport is not None
        transport: Any = protocol.transport
        self.assertIs(transport.protocol, protocol)
        self.assertIsNone(transport.connector.whenConnected)
        self.assertIsNone(transport.connector.factory._factory._protocol)
        yield protocol.gotData.addTimeout(5, reactor)
        yield protocol.lost.addTimeout(5, reactor)
        self.assertEqual(protocol.received, b"hello")

    @inlineCallbacks
    def test_refused(self) -> Generator[Deferred[Any], Any, None]:
        """
        A refused connection fails the Deferred with L{ConnectionRefusedError}.
        """
        # A port bound but not listening refuses connections.
        probe = socket.socket()
        self.addCleanup(probe.close)
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
        d = connectQuietly(tcpEndpoint(reactor, "127.0.0.1", free, 5.0), _Recorder())
        d.addTimeout(5, reactor)
        yield self.assertFailure(d, ConnectionRefusedError)

    @inlineCallbacks
    def test_connectedReadsOnly(self) -> Generator[Deferred[Any], Any, None]:
        """
        Once connected, the transport is registered for reading and no longer for writing, and
        its protocol's writes go out without it (the transport writes through).
        """
        port = self.listen()
        protocol = _Recorder()
        d = connectQuietly(tcpEndpoint(reactor, "127.0.0.1", port, 5.0), protocol)
        d.addTimeout(5, reactor)
        yield d
        transport: Any = protocol.transport
        self.assertIn(transport, reactor.getReaders())
        self.assertNotIn(transport, reactor.getWriters())
        transport.write(b"hi")
        self.assertNotIn(transport, reactor.getWriters())
        yield protocol.lost.addTimeout(5, reactor)

    def test_immediateFailureReportedLater(self) -> None:
        """
        A connection attempt the kernel refuses within C{connect} (an unreachable broadcast
        address) fails the Deferred on the reactor's next turn, not within the call.
        """
        clock = MemoryReactorClock()
        connector = _LeanConnector(
            "255.255.255.255", 9, _ClientFactoryFor(Factory.forProtocol(Protocol)), 5.0, None, clock
        )
        d = connector.whenConnected
        assert d is not None
        connector.connect()
        self.assertNoResult(d)
        clock.advance(0)
        self.failureResultOf(d, ConnectError)

    def test_cancel(self) -> None:
        """
        Cancelling the Deferred before the connection is made stops the attempt and fails it
        with L{ConnectingCancelledError}.
        """
        port = self.listen()
        protocol = _Recorder()
        d = connectQuietly(tcpEndpoint(reactor, "127.0.0.1", port, 5.0), protocol)
        d.cancel()
        self.failureResultOf(d, ConnectingCancelledError)
        self.assertFalse(protocol.made)
