"""
Certificates for the tenant's own TLS, which the tunnel terminates.

The relay only routes visitors' TLS by its SNI; the tunnel holds the keys and
terminates it (see the trust model in the design).  By default the tunnel
issues its certificates from a L{LocalCA}, a certificate authority kept on
this machine per identity (like mkcert), so that a user trusts one file once
(C{curl --cacert ca.pem}).  A user may instead give their own certificate and
key files, read by L{loadKeyPair}.  L{SNIServerConnectionCreator} turns either
source into TLS server connections, picking a certificate by the SNI hostname
each visitor asks for.
"""

from __future__ import annotations

import datetime
import os
from collections import OrderedDict
from typing import TYPE_CHECKING, Callable, Sequence, TypeGuard, Union

import attrs
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    PrivateKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from OpenSSL.crypto import X509, PKey
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer

from portal.trust.privatefiles import PRIVATE_FILE_MODE, makePrivateDirectories, writeFileAtomically

if TYPE_CHECKING:
    from OpenSSL.SSL import _NoOverlappingProtocols

CA_CERTIFICATE_NAME = "ca.pem"
"""
The name of the CA certificate file inside a L{LocalCA}'s directory.
"""

CA_KEY_NAME = "ca-key.pem"
"""
The name of the CA private key file inside a L{LocalCA}'s directory.
"""

CA_ORGANIZATION = "Portal local CA"
"""
The organization name in every local CA's subject.
"""

CA_VALIDITY = datetime.timedelta(days=3650)
"""
How long a newly created local CA is valid: ten years.
"""

LEAF_VALIDITY = datetime.timedelta(days=397)
"""
How long an issued certificate is valid: the most that browsers accept.
"""

LEAF_BACKDATE = datetime.timedelta(hours=1)
"""
How far before the time of issue an issued certificate becomes valid, to allow for clock skew.
"""

SERVER_CIPHERS = b"ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL"
"""
The TLS 1.2 cipher suites servers offer: forward secret AEAD suites only.
TLS 1.3 suites are configured separately by OpenSSL and are all acceptable.
"""


_TLSPrivateKey = Union[
    ec.EllipticCurvePrivateKey,
    rsa.RSAPrivateKey,
    dsa.DSAPrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
]
"""
The private key types that can sign certificates and serve TLS through pyOpenSSL.
"""


class CertificateError(Exception):
    """
    A certificate or key file is missing, unreadable, corrupt, or does not belong with its
    partner; the message says which file and what to do.
    """


@attrs.frozen
class LocalCA:
    """
    A certificate authority kept on this machine that issues the tunnel's server certificates.

    @ivar certPath: The path of the CA certificate, which users add to their trust store
        (C{curl --cacert <certPath>}).
    @ivar certificate: The CA certificate.
    @ivar privateKey: The CA's private key, which signs issued certificates.
    """

    certPath: str
    certificate: x509.Certificate
    privateKey: CertificateIssuerPrivateKeyTypes = attrs.field(repr=False)

    @classmethod
    def loadOrCreate(
        cls,
        directory: str,
        commonName: str,
        now: datetime.datetime | None = None,
    ) -> LocalCA:
        """
        Load the local CA kept in C{directory}, creating it there first if there is none.

        A new CA is an ECDSA P-256 key with a self-signed certificate valid for ten years. The
        key file is written with mode 0600 and the directory created with mode 0700, each file
        atomically.  Existing files are never replaced: if they cannot be used the error says so.

        @param directory: The directory holding C{ca.pem} and C{ca-key.pem}.
        @param commonName: The common name of a newly created CA's subject.
        @param now: The current time (UTC); the system clock when L{None}.
        @return: The loaded or created CA.
        @raise CertificateError: If only one of the two files exists, or either is unreadable,
            corrupt, not a CA certificate, or does not match the other.
        """
        certPath = os.path.join(directory, CA_CERTIFICATE_NAME)
        keyPath = os.path.join(directory, CA_KEY_NAME)
        certExists = os.path.lexists(certPath)
        keyExists = os.path.lexists(keyPath)
        if certExists and keyExists:
            return cls._load(certPath, keyPath)
        if certExists or keyExists:
            present, absent = (certPath, keyPath) if certExists else (keyPath, certPath)
            raise CertificateError(
                f"the local CA in {directory} is incomplete: {present} exists but {absent} "
                f"does not. Restore the missing file, or remove the directory to create a new "
                f"CA (clients that trusted the old one will then need the new {certPath})."
            )
        return cls._create(directory, certPath, keyPath, commonName, _utcNow(now))

    @classmethod
    def _load(cls, certPath: str, keyPath: str) -> LocalCA:
        """
        Load an existing CA from its two files.

        @param certPath: The CA certificate file.
        @param keyPath: The CA private key file.
        @return: The CA.
        @raise CertificateError: If either file is unusable or they do not match.
        """
        certificates = _loadCertificates(certPath)
        if len(certificates) != 1:
            raise CertificateError(
                f"{certPath} holds {len(certificates)} certificates; a local CA file holds "
                f"exactly one."
            )
        [certificate] = certificates
        try:
            constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
        except x509.ExtensionNotFound:
            isCA = False
        else:
            isCA = constraints.value.ca
        if not isCA:
            raise CertificateError(f"{certPath} is not a CA certificate.")
        privateKey = _loadPrivateKey(keyPath)
        if not _isIssuerKey(privateKey):
            raise CertificateError(f"{keyPath} holds a key that cannot sign certificates.")
        if not _sameKey(certificate, privateKey):
            raise CertificateError(
                f"the private key in {keyPath} does not belong to the certificate in {certPath}."
            )
        return cls(certPath=certPath, certificate=certificate, privateKey=privateKey)

    @classmethod
    def _create(
        cls,
        directory: str,
        certPath: str,
        keyPath: str,
        commonName: str,
        now: datetime.datetime,
    ) -> LocalCA:
        """
        Create a new CA and write its files.

        @param directory: The directory for the files.
        @param certPath: Where to write the certificate.
        @param keyPath: Where to write the private key.
        @param commonName: The common name of the CA's subject.
        @param now: The current time (UTC).
        @return: The new CA.
        """
        privateKey = ec.generate_private_key(ec.SECP256R1())
        publicKey = privateKey.public_key()
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, commonName),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, CA_ORGANIZATION),
            ]
        )
        certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(publicKey)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - LEAF_BACKDATE)
            .not_valid_after(now + CA_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(publicKey), critical=False)
            .sign(privateKey, hashes.SHA256())
        )
        makePrivateDirectories(directory)
        writeFileAtomically(
            keyPath,
            privateKey.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            PRIVATE_FILE_MODE,
        )
        writeFileAtomically(certPath, certificate.public_bytes(serialization.Encoding.PEM), 0o644)
        return cls(certPath=certPath, certificate=certificate, privateKey=privateKey)

    def issue(
        self,
        hostnames: Sequence[str],
        now: datetime.datetime | None = None,
    ) -> tuple[PKey, list[X509]]:
        """
        Issue a server certificate for some hostnames, with a new ECDSA P-256 key.

        The certificate names every hostname as a DNS subject alternative name and the first
        one as its common name, allows only server authentication, and is valid from an hour
        before C{now} for 397 days (but never beyond the CA itself).

        @param hostnames: The DNS names the certificate is for; at least one.  They are
            lowercased and any trailing dot is removed.
        @param now: The current time (UTC); the system clock when L{None}.
        @return: The new private key and the certificate chain: the new certificate, then the
            CA certificate.
        @raise ValueError: If C{hostnames} is empty or holds an empty name.
        """
        names = [normalizeHostname(hostname) for hostname in hostnames]
        if not names:
            raise ValueError("a certificate needs at least one hostname")
        if not all(names):
            raise ValueError(f"empty hostname in {list(hostnames)!r}")
        names = list(dict.fromkeys(names))
        now = _utcNow(now)
        privateKey = ec.generate_private_key(ec.SECP256R1())
        publicKey = privateKey.public_key()
        # A common name is at most 64 characters; longer names live in the SAN only, and a
        # certificate with an empty subject must mark its SAN critical (RFC 5280, 4.2.1.6).
        if len(names[0]) <= 64:
            subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
        else:
            subject = x509.Name([])
        try:
            caKeyIdentifier = self.certificate.extensions.get_extension_for_class(
                x509.SubjectKeyIdentifier
            ).value
        except x509.ExtensionNotFound:
            authorityKeyIdentifier = x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self.privateKey.public_key()
            )
        else:
            authorityKeyIdentifier = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                caKeyIdentifier
            )
        certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.certificate.subject)
            .public_key(publicKey)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - LEAF_BACKDATE)
            .not_valid_after(min(now + LEAF_VALIDITY, self.certificate.not_valid_after_utc))
            .add_extension(
                x509.SubjectAlternativeName([x509.DNSName(name) for name in names]),
                critical=len(subject) == 0,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(authorityKeyIdentifier, critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(publicKey), critical=False)
            .sign(self.privateKey, _signatureHash(self.privateKey))
        )
        return (
            PKey.from_cryptography_key(privateKey),
            [X509.from_cryptography(certificate), X509.from_cryptography(self.certificate)],
        )


def loadKeyPair(certFile: str, keyFile: str) -> tuple[PKey, list[X509]]:
    """
    Load a user's own certificate and private key (C{--cert} and C{--key}).

    @param certFile: A PEM file with the server certificate first, optionally followed by
        the intermediate certificates of its chain.
    @param keyFile: A PEM file with the certificate's unencrypted private key.
    @return: The private key and the certificate chain, server certificate first.
    @raise CertificateError: If a file is missing, unreadable or corrupt, the key is
        encrypted, or the key does not belong to the first certificate.
    """
    return parseKeyPair(_readFile(certFile), _readFile(keyFile), certFile, keyFile)


def parseKeyPair(
    certData: bytes, keyData: bytes, certFile: str, keyFile: str
) -> tuple[PKey, list[X509]]:
    """
    Parse a certificate chain and its private key, as L{loadKeyPair} reads them.

    @param certData: PEM certificates, the server certificate first.
    @param keyData: The PEM unencrypted private key.
    @param certFile: Where C{certData} came from, for messages.
    @param keyFile: Where C{keyData} came from, for messages.
    @return: The private key and the certificate chain, server certificate first.
    @raise CertificateError: If either is corrupt, the key is encrypted, or the key does not
        belong to the first certificate.
    """
    certificates = _parseCertificates(certData, certFile)
    privateKey = _parsePrivateKey(keyData, keyFile)
    if not _isIssuerKey(privateKey):
        raise CertificateError(f"the private key in {keyFile} is of a type TLS cannot use.")
    if not _sameKey(certificates[0], privateKey):
        raise CertificateError(
            f"the private key in {keyFile} does not belong to the first certificate in "
            f"{certFile}; the certificate file must start with the server certificate for "
            f"that key."
        )
    return (
        PKey.from_cryptography_key(privateKey),
        [X509.from_cryptography(certificate) for certificate in certificates],
    )


@implementer(IOpenSSLServerConnectionCreator)
class SNIServerConnectionCreator:
    """
    Create TLS server connections that present a certificate chosen by the SNI hostname.

    Each hostname's certificate comes from a callable, asked once per hostname: the TLS
    context built from it is cached (least recently used first out, up to a bound), and the
    default context, for clients that send no SNI, is kept for good.  Visitors choose the
    hostname, so that callable must refuse (raise for) hostnames it does not serve; the
    handshake then fails with an C{unrecognized_name} alert and the refusal is logged.

    Connections accept TLS 1.2 and later, without compression.  ALPN picks the first of the
    server's protocols that the client offers; a client that offers ALPN but none of those
    protocols is served with no protocol negotiated, and one that offers no ALPN likewise.
    Idle connections release their buffers (C{SSL_MODE_RELEASE_BUFFERS}).
    """

    _log = Logger()

    def __init__(
        self,
        certificateFor: Callable[[str | None], tuple[PKey, list[X509]]],
        alpn: Sequence[bytes] = (b"http/1.1",),
        cacheSize: int = 1024,
    ) -> None:
        """
        @param certificateFor: Called with a lowercased SNI hostname without a trailing dot,
            or with L{None} for clients that send no SNI; returns the private key and
            certificate chain (server certificate first) to present, or raises to refuse.
        @param alpn: The application protocols the server speaks, most preferred first; empty
            to do no ALPN.
        @param cacheSize: How many hostnames' contexts to keep.
        """
        self._certificateFor = certificateFor
        self._alpn = tuple(alpn)
        self._cacheSize = cacheSize
        self._contexts: OrderedDict[str, SSL.Context] = OrderedDict()
        self._defaultContext: SSL.Context | None = None
        # Connections start on a context without a certificate: the protocol version is
        # chosen from its settings, then the server name callback swaps in the context with
        # the certificate, whether or not the client sent SNI.
        self._initialContext = self._configuredContext()
        self._initialContext.set_tlsext_servername_callback(self._selectContext)

    def serverConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        """
        Create a server connection that picks its certificate by SNI during the handshake.

        @param tlsProtocol: The protocol the connection is for.
        @return: A new connection in server mode, with memory BIOs.
        """
        connection = SSL.Connection(self._initialContext, None)
        connection.set_accept_state()
        connection.set_app_data(tlsProtocol)
        return connection

    def forget(self, hostname: str | None) -> None:
        """
        Drop the cached context of a hostname, so that the next handshake for it asks
        C{certificateFor} again: how a renewed certificate is swapped in.  Connections already
        made keep the context they were made with.

        @param hostname: The hostname, or L{None} for the default context.
        """
        if hostname is None:
            self._defaultContext = None
        else:
            self._contexts.pop(normalizeHostname(hostname), None)

    def _selectContext(self, connection: SSL.Connection) -> None:
        """
        Switch a connection to the context for its SNI hostname, or to the default context,
        once its ClientHello has been received.

        @param connection: The connection being handshaken.
        """
        serverName = connection.get_servername()
        try:
            hostname = None
            if serverName is not None:
                hostname = normalizeHostname(serverName.decode("ascii")) or None
            connection.set_context(self._contextFor(hostname))
        except Exception:
            self._log.failure("refusing TLS for server name {serverName!r}", serverName=serverName)
            # pyOpenSSL turns an exception here into a fatal unrecognized_name alert.
            raise

    def _contextFor(self, hostname: str | None) -> SSL.Context:
        """
        Get the context for a hostname, from the cache or newly made.

        @param hostname: The normalized SNI hostname, or L{None} for the default.
        @return: The context presenting that hostname's certificate.
        """
        if hostname is None:
            if self._defaultContext is None:
                self._defaultContext = self._certifiedContext(None)
            return self._defaultContext
        context = self._contexts.get(hostname)
        if context is not None:
            self._contexts.move_to_end(hostname)
            return context
        context = self._certifiedContext(hostname)
        self._contexts[hostname] = context
        while len(self._contexts) > self._cacheSize:
            self._contexts.popitem(last=False)
        return context

    def _certifiedContext(self, hostname: str | None) -> SSL.Context:
        """
        Make a server context with the certificate for a hostname.

        @param hostname: The normalized SNI hostname, or L{None} for the default.
        @return: The new context.
        """
        privateKey, chain = self._certificateFor(hostname)
        # pyOpenSSL deprecates passing its own key and certificate objects to contexts.
        key = privateKey.to_cryptography_key()
        if not _isIssuerKey(key):
            raise CertificateError(f"the private key for {hostname!r} cannot serve TLS.")
        certificates = [certificate.to_cryptography() for certificate in chain]
        context = self._configuredContext()
        context.use_privatekey(key)
        context.use_certificate(certificates[0])
        for certificate in certificates[1:]:
            context.add_extra_chain_cert(certificate)
        context.check_privatekey()
        return context

    def _configuredContext(self) -> SSL.Context:
        """
        Make a server context with this creator's settings and no certificate.

        @return: The new context.
        """
        context = SSL.Context(SSL.TLS_METHOD)
        context.set_min_proto_version(SSL.TLS1_2_VERSION)
        context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE)
        context.set_cipher_list(SERVER_CIPHERS)
        # An idle connection gives its read and write buffers (about 34 KiB) back to OpenSSL's
        # allocator: a tunnel holds a TLS connection per idle visitor.
        context.set_mode(SSL.MODE_RELEASE_BUFFERS)
        if self._alpn:
            context.set_alpn_select_callback(self._selectProtocol)
        return context

    def _selectProtocol(
        self, connection: SSL.Connection, offered: list[bytes]
    ) -> bytes | _NoOverlappingProtocols:
        """
        Choose the application protocol: the first of ours that the client offered.

        @param connection: The connection negotiating.
        @param offered: The protocols the client offered.
        @return: The chosen protocol, or L{SSL.NO_OVERLAPPING_PROTOCOLS} if none fits.
        """
        for protocol in self._alpn:
            if protocol in offered:
                return protocol
        return SSL.NO_OVERLAPPING_PROTOCOLS


def _utcNow(now: datetime.datetime | None) -> datetime.datetime:
    """
    Get the current time.

    @param now: The time given by the caller, or L{None} to read the system clock.
    @return: C{now}, or the system clock's time, in UTC.
    """
    if now is None:
        return datetime.datetime.now(datetime.UTC)
    return now


def normalizeHostname(hostname: str) -> str:
    """
    Put a hostname in the form certificates and caches use.

    @param hostname: A DNS name, in any case, perhaps with a trailing dot.
    @return: The name lowercased without a trailing dot.
    """
    return hostname.lower().removesuffix(".")


def _signatureHash(privateKey: CertificateIssuerPrivateKeyTypes) -> hashes.SHA256 | None:
    """
    Choose the hash for signing certificates with a key.

    @param privateKey: The signing key.
    @return: SHA-256, or L{None} for EdDSA keys, which hash internally.
    """
    if isinstance(privateKey, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
        return None
    return hashes.SHA256()


def _isIssuerKey(privateKey: object) -> TypeGuard[_TLSPrivateKey]:
    """
    Tell whether a key can sign certificates (and so serve TLS).

    @param privateKey: The key.
    @return: L{True} for the key types that can sign certificates and serve TLS.
    """
    return isinstance(
        privateKey,
        (
            ec.EllipticCurvePrivateKey,
            rsa.RSAPrivateKey,
            dsa.DSAPrivateKey,
            ed25519.Ed25519PrivateKey,
            ed448.Ed448PrivateKey,
        ),
    )


def _sameKey(certificate: x509.Certificate, privateKey: PrivateKeyTypes) -> bool:
    """
    Tell whether a private key belongs to a certificate.

    @param certificate: The certificate.
    @param privateKey: The private key.
    @return: L{True} if the certificate's public key is the private key's.
    """
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return certificate.public_key().public_bytes(*spki) == privateKey.public_key().public_bytes(
        *spki
    )


def _readFile(path: str) -> bytes:
    """
    Read a whole certificate or key file.

    @param path: The file.
    @return: Its contents.
    @raise CertificateError: If it is missing or cannot be read.
    """
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise CertificateError(f"{path} does not exist.")
    except OSError as e:
        raise CertificateError(f"cannot read {path}: {e.strerror or e}.")


def _loadCertificates(path: str) -> list[x509.Certificate]:
    """
    Load the certificates in a PEM file.

    @param path: The file.
    @return: Its certificates, in file order; at least one.
    @raise CertificateError: If it is missing, unreadable, or holds no valid PEM certificate.
    """
    return _parseCertificates(_readFile(path), path)


def _parseCertificates(data: bytes, path: str) -> list[x509.Certificate]:
    """
    Parse the certificates of a PEM file.

    @param data: The file's contents.
    @param path: The file, for messages.
    @return: Its certificates, in file order; at least one.
    @raise CertificateError: If it holds no valid PEM certificate.
    """
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise CertificateError(f"{path} does not hold valid PEM certificates: {e}.")
    if not certificates:
        raise CertificateError(f"{path} holds no certificate.")
    return certificates


def _loadPrivateKey(path: str) -> PrivateKeyTypes:
    """
    Load an unencrypted private key from a PEM file.

    @param path: The file.
    @return: The key.
    @raise CertificateError: If it is missing, unreadable, encrypted, or not a PEM key.
    """
    return _parsePrivateKey(_readFile(path), path)


def _parsePrivateKey(data: bytes, path: str) -> PrivateKeyTypes:
    """
    Parse an unencrypted PEM private key.

    @param data: The file's contents.
    @param path: The file, for messages.
    @return: The key.
    @raise CertificateError: If it is encrypted or not a PEM key.
    """
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise CertificateError(
            f"the private key in {path} is encrypted; give an unencrypted key (for example "
            f"`openssl pkey -in {path} -out key.pem`)."
        )
    except ValueError as e:
        raise CertificateError(f"{path} does not hold a valid PEM private key: {e}.")
    except UnsupportedAlgorithm as e:
        raise CertificateError(f"the private key in {path} uses an unsupported algorithm: {e}.")
