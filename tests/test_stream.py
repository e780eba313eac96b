"""
Tests for L{portal.tunnel.stream}: answering an ACME CA's TLS-ALPN-01 validation connections, and
only those, inside the tunnel's TLS server.
"""

from __future__ import annotations

import os

from cryptography import x509
from OpenSSL import SSL
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from portal.trust.acmechallenge import ACME_IDENTIFIER_OID, ACME_TLS_1, PendingChallenges
from portal.trust.localca import LocalCA, SNIServerConnectionCreator
from portal.tunnel.addressrules import AddressRules
from portal.tunnel.config import Target
from portal.tunnel.stream import CHALLENGE_HANDSHAKE_TIMEOUT, StreamHandler
from portal.wire.attach import StreamHeader
from tests.test_localca import HandshakeRecorder, VerifyingClientCreator, tlsHandshake

HOST = "blog.portal.test"
HEADER = StreamHeader(streamId=7, hostname=HOST, peerHost="192.0.2.1", peerPort=4444)


class ChallengeDispatchTests(SynchronousTestCase):
    """
    Tests for the TLS-ALPN-01 dispatch of L{StreamHandler}.
    """

    def setUp(self) -> None:
        """
        A stream handler with a local CA's certificates, offering http/1.1, and the pending
        challenges of C{--acme}.
        """
        self.reactor = MemoryReactorClock()
        self.ca = LocalCA.loadOrCreate(os.path.join(self.mktemp(), "ca"), "Test")
        creator = SNIServerConnectionCreator(lambda hostname: self.ca.issue([hostname or HOST]))
        self.challenges = PendingChallenges()
        self.handler = StreamHandler(
            self.reactor, Target("127.0.0.1", 8000), creator, challenges=self.challenges
        )

    def connect(self, alpn: list[bytes]) -> tuple[VerifyingClientCreator, HandshakeRecorder]:
        """
        Run a stream for L{HEADER} with a TLS client offering C{alpn}, in memory.

        @return: The client's connection creator (its connection) and its application protocol.
        """
        client = VerifyingClientCreator(None, HOST.encode(), alpn)
        _, recorder = tlsHandshake(lambda: self.handler(HEADER), client)
        return client, recorder

    def hasAcmeIdentifier(self, client: VerifyingClientCreator) -> bool:
        """
        @return: Whether the server presented a certificate with C{id-pe-acmeIdentifier}.
        """
        peer = client.connection.get_peer_certificate(as_cryptography=True)
        assert peer is not None
        try:
            peer.extensions.get_extension_for_oid(ACME_IDENTIFIER_OID)
        except x509.ExtensionNotFound:
            return False
        return True

    def test_validationAnswered(self) -> None:
        """
        With a pending challenge, a ClientHello offering C{acme-tls/1} gets the challenge
        certificate and C{acme-tls/1}; the tunnel closes after the handshake and never connects to
        the service.
        """
        self.challenges.add(HOST, "token.thumbprint")
        client, recorder = self.connect([ACME_TLS_1])
        self.assertTrue(recorder.handshakeDone)
        self.assertEqual(client.connection.get_alpn_proto_negotiated(), ACME_TLS_1)
        self.assertTrue(self.hasAcmeIdentifier(client))
        self.assertIsNotNone(recorder.lostReason)
        self.assertEqual(self.reactor.tcpClients, [])

    def test_visitorDuringChallenge(self) -> None:
        """
        With a pending challenge, a visitor that does not offer C{acme-tls/1} gets the usual
        certificate and protocol, and is forwarded to the service.
        """
        self.challenges.add(HOST, "token.thumbprint")
        client, recorder = self.connect([b"http/1.1"])
        self.assertTrue(recorder.handshakeDone)
        self.assertEqual(client.connection.get_alpn_proto_negotiated(), b"http/1.1")
        self.assertFalse(self.hasAcmeIdentifier(client))
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_noPendingChallenge(self) -> None:
        """
        Without a pending challenge, a ClientHello offering C{acme-tls/1} is an ordinary visitor:
        no challenge certificate, no C{acme-tls/1}.
        """
        client, recorder = self.connect([ACME_TLS_1])
        self.assertTrue(recorder.handshakeDone)
        self.assertEqual(client.connection.get_alpn_proto_negotiated(), b"")
        self.assertFalse(self.hasAcmeIdentifier(client))
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_otherHostname(self) -> None:
        """
        A challenge pending for another hostname changes nothing for this one.
        """
        self.challenges.add("other.portal.test", "token.thumbprint")
        client, recorder = self.connect([ACME_TLS_1])
        self.assertTrue(recorder.handshakeDone)
        self.assertFalse(self.hasAcmeIdentifier(client))

    def test_addressRulesSpareValidation(self) -> None:
        """
        C{--allow-ip} does not stop the CA's validation connection (it only gets the challenge
        certificate), while a visitor from the same address, not offering C{acme-tls/1}, is
        refused as usual.
        """
        self.handler.addressRules = AddressRules.parse(allow=["198.51.100.0/24"])
        self.challenges.add(HOST, "token.thumbprint")
        client, recorder = self.connect([ACME_TLS_1])
        self.assertTrue(recorder.handshakeDone)
        self.assertTrue(self.hasAcmeIdentifier(client))
        client, recorder = self.connect([b"http/1.1"])
        self.assertFalse(recorder.handshakeDone)
        self.assertEqual(self.handler.refused, 1)
        self.assertEqual(self.reactor.tcpClients, [])

    def test_handshakeTimeout(self) -> None:
        """
        A validation connection that sends its ClientHello but never finishes the handshake is
        aborted after L{CHALLENGE_HANDSHAKE_TIMEOUT} seconds.
        """
        self.challenges.add(HOST, "token.thumbprint")
        context = SSL.Context(SSL.TLS_METHOD)
        context.set_alpn_protos([ACME_TLS_1])
        connection = SSL.Connection(context, None)
        connection.set_connect_state()
        connection.set_tlsext_host_name(HOST.encode())
        self.assertRaises(SSL.WantReadError, connection.do_handshake)
        clientHello = connection.bio_read(65536)
        protocol = self.handler(HEADER)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(clientHello)
        self.assertNotEqual(transport.value(), b"")
        self.reactor.advance(CHALLENGE_HANDSHAKE_TIMEOUT - 0.5)
        self.assertFalse(transport.disconnecting)
        self.reactor.advance(0.5)
        self.assertTrue(transport.disconnecting)
        self.flushLoggedErrors()

    def test_notAClientHello(self) -> None:
        """
        During a challenge, bytes that are not a ClientHello are refused with a TLS alert.
        """
        self.challenges.add(HOST, "token.thumbprint")
        protocol = self.handler(HEADER)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(b"GET / HTTP/1.1\r\n\r\n")
        self.assertEqual(transport.value()[:1], b"\x15")
        self.assertTrue(transport.disconnecting)
