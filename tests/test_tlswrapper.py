"""
Tests for L{portal.tunnel.tlswrapper}: the TLS wrapper with its per-connection set-up done once.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import CertificateOptions
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory
from twisted.test.iosim import connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import providedBy

from portal.trust.localca import LocalCA, SNIServerConnectionCreator
from portal.tunnel.tlswrapper import (
    GROWN_ABOVE,
    LeanTLSTransport,
    closePromptly,
    renewMemoryBIOs,
)

ADDRESS = IPv4Address("TCP", "127.0.0.1", 443)


class _Recorder(Protocol):
    """
    An application protocol that counts how often it was connected and keeps what it read.
    """

    def __init__(self) -> None:
        self.made = 0
        self.received = b""

    def connectionMade(self) -> None:
        """
        Count the connection.
        """
        self.made += 1

    def dataReceived(self, data: bytes) -> None:
        """
        Keep the bytes.
        """
        self.received += data


class LeanTLSTransportTests(SynchronousTestCase):
    """
    L{LeanTLSTransport} serves TLS as L{BufferingTLSTransport} does.
    """

    def setUp(self) -> None:
        """
        A server factory building L{LeanTLSTransport}s with a local CA's certificate.
        """
        ca = LocalCA.loadOrCreate(os.path.join(self.mktemp(), "ca"), "Alice")
        pair = ca.issue(["a.localhost"])
        self.clock = MemoryReactorClock()
        self.creator = SNIServerConnectionCreator(lambda hostname: pair)
        self.server = _Recorder()
        self.factory = TLSMemoryBIOFactory(
            self.creator, False, Factory.forProtocol(Protocol), clock=self.clock
        )
        self.factory.protocol = LeanTLSTransport

    def test_handshakeAndBytesBothWays(self) -> None:
        """
        A client completes the handshake and bytes cross both ways; the application protocol is
        connected once and the wrapper registered with its factory once, until it is lost.
        """
        client, clientTLS, serverTLS, pump = self.connectedPair()
        pump.flush()
        clientTLS.write(b"ping")
        serverTLS.write(b"pong")
        self.clock.advance(0)  # The buffering transport writes on the next turn.
        pump.flush()
        self.assertEqual((self.server.received, client.received), (b"ping", b"pong"))
        self.assertEqual((self.server.made, client.made), (1, 1))
        self.assertEqual(list(self.factory.protocols), [serverTLS])
        clientTLS.loseConnection()
        pump.flush()
        self.assertEqual(list(self.factory.protocols), [])

    def test_providesWhatTheTransportProvides(self) -> None:
        """
        The wrapper provides the same interfaces, in the same order, as Twisted's own wrapper on the
        same kind of transport.
        """
        lean = LeanTLSTransport(self.factory, _Recorder())
        lean.makeConnection(StringTransport(peerAddress=ADDRESS))
        stock = BufferingTLSTransport(self.factory, _Recorder())
        stock.makeConnection(StringTransport(peerAddress=ADDRESS))
        self.assertEqual(list(providedBy(lean)), list(providedBy(stock)))
        self.assertTrue(set(providedBy(StringTransport())) <= set(providedBy(lean)))

    def test_notConnectingTheWrapped(self) -> None:
        """
        Told not to, the wrapper does not connect its application protocol, but still starts the
        handshake's wait for the client.
        """
        wrapped = _Recorder()
        lean = LeanTLSTransport(self.factory, wrapped, _connectWrapped=False)
        lean.makeConnection(StringTransport(peerAddress=ADDRESS))
        self.assertEqual(wrapped.made, 0)
        self.assertIsNotNone(lean.getHandle())

    def connectedPair(self) -> tuple[_Recorder, Any, Any, Any]:
        """
        Connect a TLS client, in memory, to a L{LeanTLSTransport} serving C{self.server}.

        @return: The client's recording protocol, the client's and the server's TLS protocols,
            and the pump between them.
        """
        client = _Recorder()
        clientFactory = TLSMemoryBIOFactory(
            CertificateOptions(verify=False), True, Factory.forProtocol(Protocol), clock=self.clock
        )
        clientTLS, serverTLS, pump = connectedServerAndClient(
            lambda: LeanTLSTransport(self.factory, self.server),
            lambda: clientFactory.protocol(clientFactory, client),
            greet=False,
        )
        return client, clientTLS, serverTLS, pump

    def test_memoryBIOsRenewedAfterHandshake(self) -> None:
        """
        Once the handshake is done and both memory BIOs are empty, the connection gets new ones,
        once; bytes go on crossing both ways through them.
        """
        client, clientTLS, serverTLS, pump = self.connectedPair()
        connection = serverTLS.getHandle()
        handshakeBIOs = (connection._into_ssl, connection._from_ssl)
        pump.flush()
        clientTLS.write(b"ping")
        self.clock.advance(0)
        pump.flush()
        self.assertFalse(serverTLS._grownBIOs)
        renewed = (connection._into_ssl, connection._from_ssl)
        self.assertNotEqual(renewed[0], handshakeBIOs[0])
        self.assertNotEqual(renewed[1], handshakeBIOs[1])
        for _ in range(3):
            clientTLS.write(b"ping")
            serverTLS.write(b"pong")
            self.clock.advance(0)
            pump.flush()
        self.assertEqual((self.server.received, client.received), (b"ping" * 4, b"pong" * 3))
        self.assertEqual((connection._into_ssl, connection._from_ssl), renewed)

    def test_renewOnlyEmptyBIOs(self) -> None:
        """
        L{renewMemoryBIOs} leaves a connection whose incoming BIO holds bytes, and an object
        without memory BIOs, as they are.
        """
        connection = self.creator.serverConnectionForTLS(LeanTLSTransport(self.factory, Protocol()))
        into = connection._into_ssl
        connection.bio_write(b"\x16\x03\x01")
        self.assertFalse(renewMemoryBIOs(connection))
        self.assertEqual(connection._into_ssl, into)
        self.assertFalse(renewMemoryBIOs(object()))
        fresh = self.creator.serverConnectionForTLS(LeanTLSTransport(self.factory, Protocol()))
        self.assertTrue(renewMemoryBIOs(fresh))

    def test_memoryBIOsRenewedAfterLargeTransfers(self) -> None:
        """
        A read or a write larger than L{GROWN_ABOVE} marks the memory BIOs as grown without
        renewing them (a bulk transfer is not slowed down); the next small read renews them.
        """
        client, clientTLS, serverTLS, pump = self.connectedPair()
        connection = serverTLS.getHandle()
        pump.flush()

        def send(toServer: bytes, toClient: bytes = b"") -> tuple[Any, Any]:
            clientTLS.write(toServer)
            if toClient:
                serverTLS.write(toClient)
            self.clock.advance(0)
            pump.flush()
            return (connection._into_ssl, connection._from_ssl)

        afterHandshake = send(b"x")
        self.assertFalse(serverTLS._grownBIOs)
        big = os.urandom(GROWN_ABOVE * 16)
        self.assertEqual(send(big), afterHandshake)
        self.assertTrue(serverTLS._grownBIOs)
        afterUpload = send(b"y")
        self.assertFalse(serverTLS._grownBIOs)
        self.assertNotEqual(afterUpload[0], afterHandshake[0])
        self.assertEqual(send(b"", big), afterUpload)
        self.assertTrue(serverTLS._grownBIOs)
        afterDownload = send(b"z")
        self.assertFalse(serverTLS._grownBIOs)
        self.assertNotEqual(afterDownload[1], afterUpload[1])
        self.assertEqual(self.server.received, b"x" + big + b"yz")
        self.assertEqual(client.received, big)


class _Producer:
    """
    A push producer that does nothing.
    """

    def pauseProducing(self) -> None:
        """
        Nothing to pause.
        """

    def resumeProducing(self) -> None:
        """
        Nothing to resume.
        """

    def stopProducing(self) -> None:
        """
        Nothing to stop.
        """


class PromptCloseTests(LeanTLSTransportTests):
    """
    L{LeanTLSTransport.loseConnectionPromptly} and L{closePromptly}: close_notify, then the TCP
    connection, without waiting for the peer's close_notify.
    """

    def test_twistedWaitsForThePeer(self) -> None:
        """
        Twisted's C{loseConnection} sends close_notify and keeps the TCP connection open until the
        peer answers with its own: what a visitor that never answers exploits.
        """
        _, _, serverTLS, pump = self.connectedPair()
        pump.flush()
        serverTLS.loseConnection()
        self.assertFalse(serverTLS.transport.disconnecting)

    def test_closesAfterCloseNotify(self) -> None:
        """
        After L{LeanTLSTransport.loseConnectionPromptly} the TCP connection is closing at once;
        the client still gets what was written before, then the end.
        """
        client, clientTLS, serverTLS, pump = self.connectedPair()
        pump.flush()
        serverTLS.write(b"last words")
        serverTLS.loseConnectionPromptly()
        self.assertTrue(serverTLS.transport.disconnecting)
        pump.flush()
        self.assertEqual(client.received, b"last words")
        self.assertFalse(clientTLS.connected)
        self.assertEqual(list(self.factory.protocols), [])

    def test_waitsForTheProducer(self) -> None:
        """
        While a producer is registered (a response still streaming), nothing closes; once it goes
        away, what it wrote, close_notify and the end of the TCP connection follow.
        """
        client, _, serverTLS, pump = self.connectedPair()
        pump.flush()
        serverTLS.registerProducer(_Producer(), True)
        serverTLS.write(b"tail")
        serverTLS.loseConnectionPromptly()
        self.assertFalse(serverTLS.transport.disconnecting)
        serverTLS.unregisterProducer()
        self.assertTrue(serverTLS.transport.disconnecting)
        pump.flush()
        self.assertEqual(client.received, b"tail")

    def test_closePromptly(self) -> None:
        """
        L{closePromptly} closes a lean TLS transport promptly and any other transport with its
        C{loseConnection}.
        """
        _, _, serverTLS, pump = self.connectedPair()
        pump.flush()
        closePromptly(serverTLS)
        self.assertTrue(serverTLS.transport.disconnecting)
        plain = StringTransport()
        closePromptly(plain)
        self.assertTrue(plain.disconnecting)
