"""
Tests for L{portal.trust.localca}.
"""

from __future__ import annotations

import datetime
import os
import stat
import sys
from collections.abc import Callable

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from OpenSSL import SSL
from OpenSSL._util import lib
from OpenSSL.crypto import X509, PKey
from service_identity import VerificationError as HostnameMismatch
from service_identity.pyopenssl import verify_hostname
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import (
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
    IProtocol,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.test.iosim import connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from portal.trust.localca import (
    CertificateError,
    LocalCA,
    SNIServerConnectionCreator,
    loadKeyPair,
)

NOW = datetime.datetime(2030, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)


def privateKeyPEM(key: PKey) -> bytes:
    """
    Serialize a private key as unencrypted PKCS#8 PEM.

    @param key: The key.
    @return: The PEM bytes.
    """
    return key.to_cryptography_key().private_bytes(  # type: ignore[union-attr]
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def certificatePEM(certificate: X509) -> bytes:
    """
    Serialize a certificate as PEM.

    @param certificate: The certificate.
    @return: The PEM bytes.
    """
    return certificate.to_cryptography().public_bytes(serialization.Encoding.PEM)


def verifyServerCertificate(
    ca: LocalCA, chain: list[X509], hostname: str, now: datetime.datetime = NOW
) -> None:
    """
    Verify a certificate chain for a hostname, with a CA as the only trust root, as a
    web PKI client would.

    @param ca: The trusted CA.
    @param chain: The server certificate, then any intermediates.
    @param hostname: The name the client asked for.
    @param now: The time of verification.
    @raise VerificationError: If the chain is not valid for C{hostname}.
    """
    verifier = (
        PolicyBuilder()
        .store(Store([ca.certificate]))
        .time(now)
        .build_server_verifier(x509.DNSName(hostname))
    )
    certificates = [certificate.to_cryptography() for certificate in chain]
    verifier.verify(certificates[0], certificates[1:])


class LocalCATests(SynchronousTestCase):
    """
    Tests for L{LocalCA}.
    """

    def setUp(self) -> None:
        """
        Choose a directory for the CA that does not exist yet.
        """
        self.directory = os.path.join(self.mktemp(), "ca")

    def test_createThenLoad(self) -> None:
        """
        The first call creates a CA; a later call loads the same one from its files.
        """
        created = LocalCA.loadOrCreate(self.directory, "Alice", now=NOW)
        loaded = LocalCA.loadOrCreate(self.directory, "Alice")
        self.assertEqual(created.certPath, os.path.join(self.directory, "ca.pem"))
        self.assertEqual(loaded.certPath, created.certPath)
        self.assertEqual(
            loaded.certificate.public_bytes(serialization.Encoding.DER),
            created.certificate.public_bytes(serialization.Encoding.DER),
        )
        with open(created.certPath, "rb") as f:
            self.assertEqual(x509.load_pem_x509_certificate(f.read()), created.certificate)

    def test_fileModes(self) -> None:
        """
        The key file is readable by its owner only, and so is the directory created for it.
        """
        LocalCA.loadOrCreate(self.directory, "Alice")
        keyMode = stat.S_IMODE(os.stat(os.path.join(self.directory, "ca-key.pem")).st_mode)
        directoryMode = stat.S_IMODE(os.stat(self.directory).st_mode)
        self.assertEqual(keyMode, 0o600)
        self.assertEqual(directoryMode, 0o700)
        self.assertEqual(sorted(os.listdir(self.directory)), ["ca-key.pem", "ca.pem"])

    def test_caCertificate(self) -> None:
        """
        A new CA is a self-signed ECDSA P-256 CA for one level of certificates, named after
        its user, valid for ten years, with no name constraints.
        """
        ca = LocalCA.loadOrCreate(self.directory, "Alice", now=NOW)
        certificate = ca.certificate
        self.assertEqual(certificate.subject, certificate.issuer)
        certificate.verify_directly_issued_by(certificate)
        self.assertEqual(
            certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value, "Alice"
        )
        self.assertEqual(
            certificate.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value,
            "Portal local CA",
        )
        publicKey = certificate.public_key()
        assert isinstance(publicKey, ec.EllipticCurvePublicKey)
        self.assertIsInstance(publicKey.curve, ec.SECP256R1)
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
        self.assertTrue(constraints.critical)
        self.assertEqual(constraints.value, x509.BasicConstraints(ca=True, path_length=0))
        usage = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
        self.assertTrue(usage.key_cert_sign)
        self.assertTrue(usage.crl_sign)
        self.assertEqual(
            certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value,
            x509.SubjectKeyIdentifier.from_public_key(publicKey),
        )
        self.assertRaises(
            x509.ExtensionNotFound,
            certificate.extensions.get_extension_for_class,
            x509.NameConstraints,
        )
        self.assertEqual(certificate.not_valid_after_utc - NOW, datetime.timedelta(days=3650))

    def test_corruptCertificate(self) -> None:
        """
        A corrupt CA certificate is reported, and the file is left as it was.
        """
        ca = LocalCA.loadOrCreate(self.directory, "Alice")
        with open(ca.certPath, "wb") as f:
            f.write(b"not a certificate")
        error = self.assertRaises(CertificateError, LocalCA.loadOrCreate, self.directory, "Alice")
        self.assertIn(ca.certPath, str(error))
        with open(ca.certPath, "rb") as f:
            self.assertEqual(f.read(), b"not a certificate")

    def test_corruptKey(self) -> None:
        """
        A corrupt CA key is reported, and the file is left as it was.
        """
        LocalCA.loadOrCreate(self.directory, "Alice")
        keyPath = os.path.join(self.directory, "ca-key.pem")
        with open(keyPath, "wb") as f:
            f.write(b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n")
        error = self.assertRaises(CertificateError, LocalCA.loadOrCreate, self.directory, "Alice")
        self.assertIn(keyPath, str(error))

    def test_missingKey(self) -> None:
        """
        A CA certificate without its key is reported rather than replaced by a new CA.
        """
        ca = LocalCA.loadOrCreate(self.directory, "Alice")
        keyPath = os.path.join(self.directory, "ca-key.pem")
        os.remove(keyPath)
        error = self.assertRaises(CertificateError, LocalCA.loadOrCreate, self.directory, "Alice")
        self.assertIn(keyPath, str(error))
        self.assertEqual(os.listdir(self.directory), ["ca.pem"])
        with open(ca.certPath, "rb") as f:
            self.assertEqual(x509.load_pem_x509_certificate(f.read()), ca.certificate)

    def test_mismatchedKey(self) -> None:
        """
        A CA key that does not belong to the CA certificate is reported.
        """
        LocalCA.loadOrCreate(self.directory, "Alice")
        other = os.path.join(self.mktemp(), "other")
        LocalCA.loadOrCreate(other, "Bob")
        with open(os.path.join(other, "ca-key.pem"), "rb") as f:
            otherKey = f.read()
        with open(os.path.join(self.directory, "ca-key.pem"), "wb") as f:
            f.write(otherKey)
        error = self.assertRaises(CertificateError, LocalCA.loadOrCreate, self.directory, "Alice")
        self.assertIn("does not belong", str(error))

    def test_notACA(self) -> None:
        """
        A certificate that is not a CA's, with its matching key, is refused as a local CA.
        """
        ca = LocalCA.loadOrCreate(self.directory, "Alice")
        key, chain = ca.issue(["a.localhost"])
        leafDirectory = os.path.join(self.mktemp(), "leaf")
        os.makedirs(leafDirectory)
        with open(os.path.join(leafDirectory, "ca.pem"), "wb") as f:
            f.write(certificatePEM(chain[0]))
        with open(os.path.join(leafDirectory, "ca-key.pem"), "wb") as f:
            f.write(privateKeyPEM(key))
        error = self.assertRaises(CertificateError, LocalCA.loadOrCreate, leafDirectory, "Alice")
        self.assertIn("not a CA certificate", str(error))

    def test_issueVerifies(self) -> None:
        """
        An issued certificate chain verifies against the CA for its hostname and for no other.
        """
        ca = LocalCA.loadOrCreate(self.directory, "Alice", now=NOW)
        key, chain = ca.issue(["a.localhost"], now=NOW)
        verifyServerCertificate(ca, chain, "a.localhost")
        self.assertRaises(VerificationError, verifyServerCertificate, ca, chain, "b.localhost")

    def test_issueNotTrustedByAnotherCA(self) -> None:
        """
        An issued certificate does not verify against a different local CA.
        """
        ca = LocalCA.loadOrCreate(self.directory, "Alice", now=NOW)
        other = LocalCA.loadOrCreate(os.path.join(self.mktemp(), "other"), "Bob", now=NOW)
        key, chain = ca.issue(["a.localhost"], now=NOW)
        self.assertRaises(VerificationError, verifyServerCertificate, other, chain, "a.localhost")

    def test_issueContents(self) -> None:
        """
        An issued certificate has a new P-256 key, every hostname (normalized) as a DNS
        name, the first as its common name, server authentication only, no CA powers, the
        CA's key identifier, and is valid from an hour ago for 397 days.
        """
        ca = LocalCA.loadOrCreate(self.directory, "Alice", now=NOW)
        key, chain = ca.issue(["A.Localhost.", "b.localhost", "a.localhost"], now=NOW)
        self.assertIsInstance(key, PKey)
        self.assertEqual(len(chain), 2)
        leaf = chain[0].to_cryptography()
        self.assertEqual(chain[1].to_cryptography(), ca.certificate)
        privateKey = key.to_cryptography_key()
        assert isinstance(privateKey, ec.EllipticCurvePrivateKey)
        self.assertIsInstance(privateKey.curve, ec.SECP256R1)
        self.assertEqual(leaf.public_key(), privateKey.public_key())
        self.assertEqual(
            leaf.extensions.get_extension_for_class(
                x509.SubjectAlternativeName
            ).value.get_values_for_type(x509.DNSName),
            ["a.localhost", "b.localhost"],
        )
        self.assertEqual(
            leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value, "a.localhost"
        )
        self.assertEqual(
            list(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value),
            [ExtendedKeyUsageOID.SERVER_AUTH],
        )
        self.assertFalse(leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
        caKeyIdentifier = ca.certificate.extensions.get_extension_for_class(
            x509.SubjectKeyIdentifier
        ).value.digest
        self.assertEqual(
            leaf.extensions.get_extension_for_class(
                x509.AuthorityKeyIdentifier
            ).value.key_identifier,
            caKeyIdentifier,
        )
        self.assertEqual(leaf.not_valid_before_utc, NOW - datetime.timedelta(hours=1))
        self.assertEqual(leaf.not_valid_after_utc, NOW + datetime.timedelta(days=397))

    def test_issueFreshKeys(self) -> None:
        """
        Each issued certificate has its own key and serial number.
        """
        ca = LocalCA.loadOrCreate(self.directory, "Alice")
        key1, chain1 = ca.issue(["a.localhost"])
        key2, chain2 = ca.issue(["a.localhost"])
        self.assertNotEqual(privateKeyPEM(key1), privateKeyPEM(key2))
        self.assertNotEqual(chain1[0].get_serial_number(), chain2[0].get_serial_number())

    def test_issueLongHostname(self) -> None:
        """
        A first hostname too long for a common name goes in a critical subject alternative
        name with an empty subject, and the certificate still verifies.
        """
        hostname = ("x" * 60) + ".example.localhost"
        ca = LocalCA.loadOrCreate(self.directory, "Alice", now=NOW)
        key, chain = ca.issue([hostname], now=NOW)
        leaf = chain[0].to_cryptography()
        self.assertEqual(len(leaf.subject), 0)
        self.assertTrue(
            leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).critical
        )
        verifyServerCertificate(ca, chain, hostname)

    def test_issueNotBeyondCA(self) -> None:
        """
        A certificate issued shortly before the CA expires expires with the CA.
        """
        ca = LocalCA.loadOrCreate(self.directory, "Alice", now=NOW)
        later = NOW + datetime.timedelta(days=3600)
        key, chain = ca.issue(["a.localhost"], now=later)
        self.assertEqual(
            chain[0].to_cryptography().not_valid_after_utc, ca.certificate.not_valid_after_utc
        )

    def test_issueNoHostnames(self) -> None:
        """
        Issuing a certificate for no hostname, or for an empty one, is refused.
        """
        ca = LocalCA.loadOrCreate(self.directory, "Alice")
        self.assertRaises(ValueError, ca.issue, [])
        self.assertRaises(ValueError, ca.issue, ["a.localhost", "."])


class LoadKeyPairTests(SynchronousTestCase):
    """
    Tests for L{loadKeyPair}.
    """

    def setUp(self) -> None:
        """
        Issue a certificate to load from files.
        """
        self.directory = self.mktemp()
        os.makedirs(self.directory)
        self.ca = LocalCA.loadOrCreate(os.path.join(self.directory, "ca"), "Alice")
        self.key, self.chain = self.ca.issue(["a.localhost"])
        self.certFile = os.path.join(self.directory, "cert.pem")
        self.keyFile = os.path.join(self.directory, "key.pem")
        self.writeFile(
            self.certFile,
            b"".join(certificatePEM(certificate) for certificate in self.chain),
        )
        self.writeFile(self.keyFile, privateKeyPEM(self.key))

    def writeFile(self, path: str, content: bytes) -> None:
        """
        Write a file.

        @param path: The file.
        @param content: What to write in it.
        """
        with open(path, "wb") as f:
            f.write(content)

    def test_goodPair(self) -> None:
        """
        A certificate chain file and its key load as the key and the chain, in order.
        """
        key, chain = loadKeyPair(self.certFile, self.keyFile)
        self.assertEqual(privateKeyPEM(key), privateKeyPEM(self.key))
        self.assertEqual(
            [certificate.to_cryptography() for certificate in chain],
            [certificate.to_cryptography() for certificate in self.chain],
        )

    def test_singleCertificate(self) -> None:
        """
        A certificate file may hold just the server certificate.
        """
        self.writeFile(self.certFile, certificatePEM(self.chain[0]))
        key, chain = loadKeyPair(self.certFile, self.keyFile)
        self.assertEqual(len(chain), 1)

    def test_mismatchedKey(self) -> None:
        """
        A key that does not belong to the first certificate is refused, naming both files.
        """
        otherKey, otherChain = self.ca.issue(["a.localhost"])
        self.writeFile(self.keyFile, privateKeyPEM(otherKey))
        error = self.assertRaises(CertificateError, loadKeyPair, self.certFile, self.keyFile)
        self.assertIn(self.keyFile, str(error))
        self.assertIn(self.certFile, str(error))

    def test_missingCertificateFile(self) -> None:
        """
        A missing certificate file is reported by name.
        """
        os.remove(self.certFile)
        error = self.assertRaises(CertificateError, loadKeyPair, self.certFile, self.keyFile)
        self.assertIn(self.certFile, str(error))

    def test_missingKeyFile(self) -> None:
        """
        A missing key file is reported by name.
        """
        os.remove(self.keyFile)
        error = self.assertRaises(CertificateError, loadKeyPair, self.certFile, self.keyFile)
        self.assertIn(self.keyFile, str(error))

    def test_corruptCertificateFile(self) -> None:
        """
        A certificate file with no certificate in it is reported by name.
        """
        self.writeFile(self.certFile, b"hello")
        error = self.assertRaises(CertificateError, loadKeyPair, self.certFile, self.keyFile)
        self.assertIn(self.certFile, str(error))

    def test_encryptedKey(self) -> None:
        """
        An encrypted key is refused with a hint to decrypt it.
        """
        privateKey = self.key.to_cryptography_key()
        assert isinstance(privateKey, ec.EllipticCurvePrivateKey)
        self.writeFile(
            self.keyFile,
            privateKey.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"secret"),
            ),
        )
        error = self.assertRaises(CertificateError, loadKeyPair, self.certFile, self.keyFile)
        self.assertIn("encrypted", str(error))


@implementer(IHandshakeListener)
class HandshakeRecorder(Protocol):
    """
    A client application protocol that records whether the TLS handshake completed and
    why the connection was lost.

    @ivar handshakeDone: Whether the handshake completed.
    @ivar lostReason: Why the connection was lost, once it was.
    """

    handshakeDone = False
    lostReason: Failure | None = None

    def handshakeCompleted(self) -> None:
        """
        Record that the handshake completed.
        """
        self.handshakeDone = True

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:  # noqa: B008
        """
        Record why the connection was lost.

        @param reason: Why.
        """
        self.lostReason = reason


@implementer(IOpenSSLClientConnectionCreator)
class VerifyingClientCreator:
    """
    Create pyOpenSSL client connections that trust one CA file, require the server's chain
    to verify against it, and may send SNI and offer ALPN protocols.

    @ivar connection: The last connection created.
    """

    connection: SSL.Connection

    def __init__(
        self,
        caPath: str | None,
        serverName: bytes | None,
        alpn: list[bytes] | None = None,
        maximumVersion: int | None = None,
    ) -> None:
        """
        @param caPath: The trusted CA certificate file, or L{None} to verify nothing.
        @param serverName: The SNI to send, or L{None} to send none.
        @param alpn: The ALPN protocols to offer, or L{None} to offer none.
        @param maximumVersion: The highest TLS version to offer, or L{None} for the default.
        """
        self.caPath = caPath
        self.serverName = serverName
        self.alpn = alpn
        self.maximumVersion = maximumVersion

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        """
        Create a client connection.

        @param tlsProtocol: The protocol the connection is for.
        @return: The connection.
        """
        context = SSL.Context(SSL.TLS_METHOD)
        if self.caPath is not None:
            context.load_verify_locations(self.caPath)
            context.set_verify(SSL.VERIFY_PEER)
        if self.maximumVersion is not None:
            context.set_max_proto_version(self.maximumVersion)
        if self.alpn is not None:
            context.set_alpn_protos(self.alpn)
        self.connection = SSL.Connection(context, None)
        self.connection.set_connect_state()
        if self.serverName is not None:
            self.connection.set_tlsext_host_name(self.serverName)
        self.connection.set_app_data(tlsProtocol)
        return self.connection


ADDRESS = IPv4Address("TCP", "127.0.0.1", 443)


def tlsHandshake(
    buildServer: Callable[[], IProtocol], client: VerifyingClientCreator
) -> tuple[TLSMemoryBIOProtocol, HandshakeRecorder]:
    """
    Connect a TLS client to a server protocol in memory and run until neither has more to send.

    @param buildServer: Builds the server's protocol.
    @param client: The client's connection creator.
    @return: The client's TLS protocol and its application protocol.
    """
    clientFactory = TLSMemoryBIOFactory(client, True, Factory.forProtocol(HandshakeRecorder))
    clientProtocol, serverProtocol, pump = connectedServerAndClient(
        buildServer, lambda: clientFactory.buildProtocol(ADDRESS), greet=False
    )
    assert isinstance(clientProtocol, TLSMemoryBIOProtocol)
    # The TLS protocol lets go of its application protocol when the connection is lost.
    recorder = clientProtocol.wrappedProtocol
    assert isinstance(recorder, HandshakeRecorder)
    pump.flush()
    return clientProtocol, recorder


class SNIServerConnectionCreatorTests(SynchronousTestCase):
    """
    Tests for L{SNIServerConnectionCreator}, through real TLS handshakes in memory.
    """

    def setUp(self) -> None:
        """
        Create a local CA and a certificate source that records what it is asked for.
        """
        self.ca = LocalCA.loadOrCreate(os.path.join(self.mktemp(), "ca"), "Alice")
        self.requested: list[str | None] = []

    def certificateFor(self, hostname: str | None) -> tuple[PKey, list[X509]]:
        """
        Issue a certificate for a hostname, or for C{default.localhost} without one.

        @param hostname: The SNI hostname, or L{None}.
        @return: The key and chain.
        """
        self.requested.append(hostname)
        return self.ca.issue([hostname or "default.localhost"])

    def handshake(
        self, creator: SNIServerConnectionCreator, client: VerifyingClientCreator
    ) -> tuple[TLSMemoryBIOProtocol, HandshakeRecorder]:
        """
        Connect a client to a server using C{creator} in memory and run the handshake.

        @param creator: The server's connection creator.
        @param client: The client's connection creator.
        @return: The client's TLS protocol and its application protocol.
        """
        serverFactory = TLSMemoryBIOFactory(creator, False, Factory.forProtocol(Protocol))
        return tlsHandshake(lambda: serverFactory.buildProtocol(ADDRESS), client)

    def assertServedFor(self, client: VerifyingClientCreator, hostname: str) -> None:
        """
        Assert that a client's handshake completed, having verified the server's chain
        against the CA, and that the server's certificate is for C{hostname}.

        @param client: The client, after its handshake.
        @param hostname: The hostname the certificate must be valid for.
        """
        verify_hostname(client.connection, hostname)
        peer = client.connection.get_peer_certificate(as_cryptography=True)
        assert peer is not None
        self.assertEqual(
            peer.extensions.get_extension_for_class(
                x509.SubjectAlternativeName
            ).value.get_values_for_type(x509.DNSName),
            [hostname],
        )
        chain = client.connection.get_verified_chain(as_cryptography=True)
        assert chain is not None
        self.assertEqual(chain[-1], self.ca.certificate)

    def test_interface(self) -> None:
        """
        L{SNIServerConnectionCreator} provides L{IOpenSSLServerConnectionCreator}.
        """
        creator = SNIServerConnectionCreator(self.certificateFor)
        self.assertTrue(verifyObject(IOpenSSLServerConnectionCreator, creator))

    def test_connectionForProtocol(self) -> None:
        """
        A connection is in server mode and carries its TLS protocol as application data,
        as Twisted's own connection creators do.
        """
        creator = SNIServerConnectionCreator(self.certificateFor)
        protocol = object()
        connection = creator.serverConnectionForTLS(protocol)  # type: ignore[arg-type]
        self.assertIs(connection.get_app_data(), protocol)
        self.assertEqual(self.requested, [])

    def test_certificatePerServerName(self) -> None:
        """
        Each client gets a certificate, verified against the local CA, for the server name
        it sent.
        """
        creator = SNIServerConnectionCreator(self.certificateFor)
        for hostname in ["a.localhost", "b.localhost"]:
            client = VerifyingClientCreator(self.ca.certPath, hostname.encode("ascii"))
            clientProtocol, recorder = self.handshake(creator, client)
            self.assertTrue(recorder.handshakeDone)
            self.assertServedFor(client, hostname)
            self.assertRaises(HostnameMismatch, verify_hostname, client.connection, "c.localhost")

    def test_forget(self) -> None:
        """
        After L{SNIServerConnectionCreator.forget}, the next handshake for that hostname asks for
        its certificate again (how a renewed certificate is swapped in); other hostnames stay
        cached.
        """
        creator = SNIServerConnectionCreator(self.certificateFor)
        for hostname in [b"a.localhost", b"b.localhost"]:
            self.handshake(creator, VerifyingClientCreator(self.ca.certPath, hostname))
        creator.forget("A.localhost.")
        for hostname in [b"a.localhost", b"b.localhost"]:
            self.handshake(creator, VerifyingClientCreator(self.ca.certPath, hostname))
        self.assertEqual(self.requested, ["a.localhost", "b.localhost", "a.localhost"])

    def test_releaseBuffers(self) -> None:
        """
        Connections release an idle connection's buffers (C{SSL_MODE_RELEASE_BUFFERS}), from the
        context they start on, and so do the contexts their server name switches them to; a
        handshake still completes.
        """
        creator = SNIServerConnectionCreator(self.certificateFor)
        client = VerifyingClientCreator(self.ca.certPath, b"a.localhost")
        self.assertTrue(self.handshake(creator, client)[1].handshakeDone)
        connection = creator.serverConnectionForTLS(object())  # type: ignore[arg-type]
        # Setting no mode bits returns the mode in force (pyOpenSSL has no getter).
        self.assertTrue(lib.SSL_set_mode(connection._ssl, 0) & SSL.MODE_RELEASE_BUFFERS)
        context = creator._contextFor("a.localhost")
        self.assertTrue(lib.SSL_CTX_set_mode(context._context, 0) & SSL.MODE_RELEASE_BUFFERS)

    def test_cachedPerHostname(self) -> None:
        """
        The certificate for a hostname is asked for once, however many clients ask for it.
        """
        creator = SNIServerConnectionCreator(self.certificateFor)
        for hostname in [b"a.localhost", b"b.localhost", b"a.localhost", b"b.localhost"]:
            client = VerifyingClientCreator(self.ca.certPath, hostname)
            self.assertTrue(self.handshake(creator, client)[1].handshakeDone)
        self.assertEqual(self.requested, ["a.localhost", "b.localhost"])

    def test_cacheBounded(self) -> None:
        """
        The cache keeps only the most recently used hostnames, up to its size.
        """
        creator = SNIServerConnectionCreator(self.certificateFor, cacheSize=2)
        for hostname in [b"a.localhost", b"b.localhost", b"a.localhost", b"c.localhost"]:
            client = VerifyingClientCreator(self.ca.certPath, hostname)
            self.assertTrue(self.handshake(creator, client)[1].handshakeDone)
        self.assertEqual(self.requested, ["a.localhost", "b.localhost", "c.localhost"])
        for hostname in [b"a.localhost", b"b.localhost"]:
            client = VerifyingClientCreator(self.ca.certPath, hostname)
            self.assertTrue(self.handshake(creator, client)[1].handshakeDone)
        self.assertEqual(
            self.requested, ["a.localhost", "b.localhost", "c.localhost", "b.localhost"]
        )

    def test_serverNameNormalized(self) -> None:
        """
        The server name is lowercased and loses its trailing dot before it is looked up.
        """
        creator = SNIServerConnectionCreator(self.certificateFor)
        client = VerifyingClientCreator(self.ca.certPath, b"A.Localhost.")
        self.assertTrue(self.handshake(creator, client)[1].handshakeDone)
        self.assertEqual(self.requested, ["a.localhost"])
        self.assertServedFor(client, "a.localhost")

    def test_noServerName(self) -> None:
        """
        A client that sends no server name gets the default certificate, asked for once.
        """
        creator = SNIServerConnectionCreator(self.certificateFor)
        for _ in range(2):
            client = VerifyingClientCreator(self.ca.certPath, None)
            self.assertTrue(self.handshake(creator, client)[1].handshakeDone)
            self.assertServedFor(client, "default.localhost")
        self.assertEqual(self.requested, [None])

    def test_untrustedCertificate(self) -> None:
        """
        A client that trusts another CA refuses the server's certificate, which shows that
        the clients in these tests really verify the chain.
        """
        other = LocalCA.loadOrCreate(os.path.join(self.mktemp(), "other"), "Bob")
        creator = SNIServerConnectionCreator(self.certificateFor)
        client = VerifyingClientCreator(other.certPath, b"a.localhost")
        clientProtocol, recorder = self.handshake(creator, client)
        self.assertFalse(recorder.handshakeDone)
        assert recorder.lostReason is not None
        recorder.lostReason.trap(SSL.Error)
        self.assertIn("certificate verify failed", str(recorder.lostReason.value))

    def test_refusedServerName(self) -> None:
        """
        When the certificate source refuses a hostname the handshake fails with an
        C{unrecognized_name} alert and the refusal is logged.
        """

        def certificateFor(hostname: str | None) -> tuple[PKey, list[X509]]:
            raise KeyError(hostname)

        self.patch(sys, "excepthook", lambda *args: None)
        creator = SNIServerConnectionCreator(certificateFor)
        client = VerifyingClientCreator(self.ca.certPath, b"unknown.localhost")
        clientProtocol, recorder = self.handshake(creator, client)
        self.assertFalse(recorder.handshakeDone)
        assert recorder.lostReason is not None
        recorder.lostReason.trap(SSL.Error)
        self.assertIn("unrecognized name", str(recorder.lostReason.value))
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)

    def test_tls12(self) -> None:
        """
        A client limited to TLS 1.2 completes the handshake.
        """
        creator = SNIServerConnectionCreator(self.certificateFor)
        client = VerifyingClientCreator(
            self.ca.certPath, b"a.localhost", maximumVersion=SSL.TLS1_2_VERSION
        )
        self.assertTrue(self.handshake(creator, client)[1].handshakeDone)
        self.assertEqual(client.connection.get_protocol_version_name(), "TLSv1.2")
        self.assertServedFor(client, "a.localhost")

    def test_alpnServerPreference(self) -> None:
        """
        ALPN picks the first of the server's protocols that the client offers, whatever the
        client's order.
        """
        for serverProtocols, expected in [
            ((b"http/1.1",), b"http/1.1"),
            ((b"h2", b"http/1.1"), b"h2"),
            ((b"http/1.1", b"h2"), b"http/1.1"),
        ]:
            creator = SNIServerConnectionCreator(self.certificateFor, alpn=serverProtocols)
            client = VerifyingClientCreator(
                self.ca.certPath, b"a.localhost", alpn=[b"h2", b"http/1.1"]
            )
            clientProtocol, recorder = self.handshake(creator, client)
            self.assertTrue(recorder.handshakeDone)
            self.assertEqual(clientProtocol.negotiatedProtocol, expected)

    def test_alpnDefault(self) -> None:
        """
        By default the server speaks HTTP/1.1 only.
        """
        creator = SNIServerConnectionCreator(self.certificateFor)
        client = VerifyingClientCreator(self.ca.certPath, b"a.localhost", alpn=[b"h2"])
        clientProtocol, recorder = self.handshake(creator, client)
        self.assertTrue(recorder.handshakeDone)
        self.assertIsNone(clientProtocol.negotiatedProtocol)
        client = VerifyingClientCreator(self.ca.certPath, b"a.localhost", alpn=[b"http/1.1"])
        clientProtocol, recorder = self.handshake(creator, client)
        self.assertEqual(clientProtocol.negotiatedProtocol, b"http/1.1")

    def test_alpnNoOverlap(self) -> None:
        """
        A client offering none of the server's protocols completes the handshake with no
        protocol negotiated.
        """
        creator = SNIServerConnectionCreator(self.certificateFor, alpn=(b"h2", b"http/1.1"))
        client = VerifyingClientCreator(self.ca.certPath, b"a.localhost", alpn=[b"foo"])
        clientProtocol, recorder = self.handshake(creator, client)
        self.assertTrue(recorder.handshakeDone)
        self.assertIsNone(clientProtocol.negotiatedProtocol)

    def test_alpnNotOffered(self) -> None:
        """
        A client offering no ALPN completes the handshake with no protocol negotiated.
        """
        creator = SNIServerConnectionCreator(self.certificateFor)
        client = VerifyingClientCreator(self.ca.certPath, b"a.localhost")
        clientProtocol, recorder = self.handshake(creator, client)
        self.assertTrue(recorder.handshakeDone)
        self.assertIsNone(clientProtocol.negotiatedProtocol)

    def test_alpnDisabled(self) -> None:
        """
        A server with no ALPN protocols negotiates none, whatever the client offers.
        """
        creator = SNIServerConnectionCreator(self.certificateFor, alpn=())
        client = VerifyingClientCreator(self.ca.certPath, b"a.localhost", alpn=[b"http/1.1"])
        clientProtocol, recorder = self.handshake(creator, client)
        self.assertTrue(recorder.handshakeDone)
        self.assertIsNone(clientProtocol.negotiatedProtocol)
