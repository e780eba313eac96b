"""
Tests for L{portal.forwarding.tcpendpoint}.
"""

from __future__ import annotations

from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from portal.forwarding.tcpendpoint import tcpEndpoint


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
