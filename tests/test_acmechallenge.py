"""
Tests for L{portal.trust.acmechallenge}: the TLS-ALPN-01 challenge certificate and the pending
challenges' TLS server.
"""

from __future__ import annotations

import datetime
import hashlib

from cryptography import x509
from cryptography.x509.oid import ExtensionOID
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from portal.trust.acmechallenge import (
    ACME_IDENTIFIER_OID,
    ACME_TLS_1,
    PendingChallenges,
    challengeCertificate,
)
from portal.trust.localca import SNIServerConnectionCreator
from tests import test_localca
from tests.test_localca import VerifyingClientCreator

KEY_AUTHORIZATION = "token-abc.thumbprint-xyz"


class ChallengeCertificateTests(SynchronousTestCase):
    """
    Tests for L{challengeCertificate}.
    """

    def setUp(self) -> None:
        """
        Build a challenge certificate for C{blog.portal.test}.
        """
        self.now = datetime.datetime(2026, 12, 7, 8, 0, tzinfo=datetime.UTC)
        key, chain = challengeCertificate("Blog.Portal.Test.", KEY_AUTHORIZATION, self.now)
        self.key = key
        self.chain = chain
        self.certificate = chain[0].to_cryptography()

    def test_acmeIdentifier(self) -> None:
        """
        The certificate carries a critical C{id-pe-acmeIdentifier} extension whose value is the DER
        OCTET STRING of the SHA-256 of the key authorization (RFC 8737, section 3).
        """
        extension = self.certificate.extensions.get_extension_for_oid(ACME_IDENTIFIER_OID)
        self.assertTrue(extension.critical)
        assert isinstance(extension.value, x509.UnrecognizedExtension)
        digest = hashlib.sha256(KEY_AUTHORIZATION.encode()).digest()
        self.assertEqual(extension.value.value, b"\x04\x20" + digest)
        self.assertEqual(ACME_IDENTIFIER_OID.dotted_string, "1.3.6.1.5.5.7.1.31")

    def test_subjectAlternativeName(self) -> None:
        """
        The only subject alternative name is the hostname, normalised.
        """
        names = self.certificate.extensions.get_extension_for_oid(
            ExtensionOID.SUBJECT_ALTERNATIVE_NAME
        ).value
        assert isinstance(names, x509.SubjectAlternativeName)
        self.assertEqual(list(names), [x509.DNSName("blog.portal.test")])

    def test_selfSignedWithItsKey(self) -> None:
        """
        The certificate is self-signed, for the returned key, and valid now.
        """
        self.assertEqual(len(self.chain), 1)
        self.assertEqual(self.certificate.issuer, self.certificate.subject)
        self.certificate.verify_directly_issued_by(self.certificate)
        self.assertEqual(self.certificate.public_key(), self.key.to_cryptography_key().public_key())
        self.assertLess(self.certificate.not_valid_before_utc, self.now)
        self.assertGreater(self.certificate.not_valid_after_utc, self.now)

    def test_freshKeys(self) -> None:
        """
        Every challenge certificate has a key of its own.
        """
        other, _ = challengeCertificate("blog.portal.test", KEY_AUTHORIZATION, self.now)
        self.assertNotEqual(
            other.to_cryptography_key().public_key(), self.key.to_cryptography_key().public_key()
        )


class PendingChallengesTests(SynchronousTestCase):
    """
    Tests for L{PendingChallenges}, with real TLS handshakes in memory.
    """

    handshake = test_localca.SNIServerConnectionCreatorTests.handshake

    def test_interface(self) -> None:
        """
        The creator provides L{IOpenSSLServerConnectionCreator}.
        """
        self.assertTrue(verifyObject(IOpenSSLServerConnectionCreator, PendingChallenges().creator))

    def test_pending(self) -> None:
        """
        A hostname is pending from L{PendingChallenges.add} to L{PendingChallenges.remove}, in
        any case and with or without a trailing dot.
        """
        pending = PendingChallenges()
        self.assertFalse(pending.isPending("blog.portal.test"))
        pending.add("Blog.portal.test.", KEY_AUTHORIZATION)
        self.assertTrue(pending.isPending("blog.portal.test"))
        pending.remove("blog.portal.test")
        self.assertFalse(pending.isPending("blog.portal.test"))
        pending.remove("blog.portal.test")

    def test_answersWithChallengeCertificate(self) -> None:
        """
        A client offering C{acme-tls/1} for a pending hostname gets the challenge certificate and
        C{acme-tls/1} negotiated.
        """
        pending = PendingChallenges()
        pending.add("blog.portal.test", KEY_AUTHORIZATION)
        client = VerifyingClientCreator(None, b"blog.portal.test", [ACME_TLS_1])
        creator = pending.creator
        assert isinstance(creator, SNIServerConnectionCreator)
        _, recorder = self.handshake(creator, client)
        self.assertTrue(recorder.handshakeDone)
        self.assertEqual(client.connection.get_alpn_proto_negotiated(), ACME_TLS_1)
        peer = client.connection.get_peer_certificate(as_cryptography=True)
        assert peer is not None
        extension = peer.extensions.get_extension_for_oid(ACME_IDENTIFIER_OID)
        assert isinstance(extension.value, x509.UnrecognizedExtension)
        self.assertEqual(
            extension.value.value, b"\x04\x20" + hashlib.sha256(KEY_AUTHORIZATION.encode()).digest()
        )

    def test_newChallengeReplacesOld(self) -> None:
        """
        A second challenge for the same hostname is presented instead of the first, even after a
        handshake cached the first.
        """
        pending = PendingChallenges()
        creator = pending.creator
        assert isinstance(creator, SNIServerConnectionCreator)
        digests = []
        for authorization in ["first.x", "second.y"]:
            pending.add("blog.portal.test", authorization)
            client = VerifyingClientCreator(None, b"blog.portal.test", [ACME_TLS_1])
            self.handshake(creator, client)
            peer = client.connection.get_peer_certificate(as_cryptography=True)
            assert peer is not None
            value = peer.extensions.get_extension_for_oid(ACME_IDENTIFIER_OID).value
            assert isinstance(value, x509.UnrecognizedExtension)
            digests.append(value.value[2:])
        self.assertEqual(
            digests, [hashlib.sha256(a.encode()).digest() for a in ["first.x", "second.y"]]
        )

    def test_refusesWithoutPendingChallenge(self) -> None:
        """
        A hostname without a pending challenge (never added, or removed) gets no certificate: the
        handshake fails.
        """
        pending = PendingChallenges()
        pending.add("blog.portal.test", KEY_AUTHORIZATION)
        creator = pending.creator
        assert isinstance(creator, SNIServerConnectionCreator)
        for hostname in [b"other.portal.test", None]:
            client = VerifyingClientCreator(None, hostname, [ACME_TLS_1])
            _, recorder = self.handshake(creator, client)
            self.assertFalse(recorder.handshakeDone)
        self.handshake(creator, VerifyingClientCreator(None, b"blog.portal.test", [ACME_TLS_1]))
        pending.remove("blog.portal.test")
        client = VerifyingClientCreator(None, b"blog.portal.test", [ACME_TLS_1])
        _, recorder = self.handshake(creator, client)
        self.assertFalse(recorder.handshakeDone)
        self.flushLoggedErrors()
