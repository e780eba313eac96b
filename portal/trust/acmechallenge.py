"""
The TLS-ALPN-01 challenge (RFC 8737): the certificate a tunnel presents to an ACME CA's validation
connection, and the pending challenges it answers.

An ACME CA checks that the tunnel controls a hostname by connecting to it on port 443 (through the
relay, which routes the connection by its SNI like any visitor's) with the single ALPN protocol
C{acme-tls/1}. The tunnel answers with a self-signed certificate for that hostname carrying a
critical C{id-pe-acmeIdentifier} extension: the SHA-256 of the challenge's key authorization. The
connection is closed after the handshake; nothing reaches the tenant's service.

L{challengeCertificate} builds that certificate; L{PendingChallenges} holds the ones being validated
and makes the TLS server connections that present them (with L{SNIServerConnectionCreator}, so the
TLS settings are the tenant's).
"""

from __future__ import annotations

import datetime
import hashlib

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL.crypto import X509, PKey
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import Logger

from portal.trust.localca import SNIServerConnectionCreator, normalizeHostname

ACME_TLS_1 = b"acme-tls/1"
"""
The ALPN protocol name of a TLS-ALPN-01 validation connection (RFC 8737, section 6.2).
"""

ACME_IDENTIFIER_OID = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31")
"""
C{id-pe-acmeIdentifier} (RFC 8737, section 6.1): the extension holding the key authorization's hash.
"""

CHALLENGE_VALIDITY = datetime.timedelta(days=7)
"""
How long a challenge certificate is valid (CAs do not check; a short, sane period).
"""


def challengeCertificate(
    hostname: str, keyAuthorization: str, now: datetime.datetime | None = None
) -> tuple[PKey, list[X509]]:
    """
    Build the self-signed certificate that answers a TLS-ALPN-01 challenge for C{hostname}.

    It has a fresh P-256 key, the hostname as its only DNS subject alternative name, and a critical
    C{id-pe-acmeIdentifier} extension whose value is the DER OCTET STRING of the SHA-256 digest of
    the key authorization (RFC 8737, section 3).

    @param hostname: The name being validated.
    @param keyAuthorization: The challenge's key authorization (C{token.thumbprint}).
    @param now: The current time (UTC); the system clock when L{None}.
    @return: The private key and the one-certificate chain.
    """
    name = normalizeHostname(hostname)
    if now is None:
        now = datetime.datetime.now(datetime.UTC)
    digest = hashlib.sha256(keyAuthorization.encode("ascii")).digest()
    # The extension's value is an ASN.1 OCTET STRING of 32 bytes: tag 4, length 32, the digest.
    octetString = b"\x04\x20" + digest
    privateKey = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ACME TLS-ALPN-01 challenge")])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(privateKey.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + CHALLENGE_VALIDITY)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.UnrecognizedExtension(ACME_IDENTIFIER_OID, octetString), critical=True)
        .sign(privateKey, hashes.SHA256())
    )
    return PKey.from_cryptography_key(privateKey), [X509.from_cryptography(certificate)]


class UnknownChallenge(KeyError):
    """
    A TLS-ALPN-01 connection asked for a hostname with no pending challenge.
    """


class PendingChallenges:
    """
    The TLS-ALPN-01 challenges a tunnel is answering right now, by hostname.

    L{creator} makes TLS server connections that present a pending challenge's certificate for the
    connection's SNI and negotiate only C{acme-tls/1}; a hostname without a pending challenge is
    refused (an C{unrecognized_name} alert).

    @ivar creator: The connection creator for validation connections.
    """

    _log = Logger()

    def __init__(self) -> None:
        self._certificates: dict[str, tuple[PKey, list[X509]]] = {}
        self._creator = SNIServerConnectionCreator(self._certificateFor, alpn=(ACME_TLS_1,))
        self.creator: IOpenSSLServerConnectionCreator = self._creator

    def add(self, hostname: str, keyAuthorization: str) -> None:
        """
        Start answering a challenge for C{hostname} (replacing any earlier one for it).

        @param hostname: The name being validated.
        @param keyAuthorization: The challenge's key authorization.
        """
        name = normalizeHostname(hostname)
        self._certificates[name] = challengeCertificate(name, keyAuthorization)
        self._creator.forget(name)
        self._log.info("answering the TLS-ALPN-01 challenge for {hostname}", hostname=name)

    def remove(self, hostname: str) -> None:
        """
        Stop answering the challenge for C{hostname}, if there is one.

        @param hostname: The name that was validated.
        """
        name = normalizeHostname(hostname)
        self._certificates.pop(name, None)
        self._creator.forget(name)

    def isPending(self, hostname: str) -> bool:
        """
        @param hostname: A hostname, as the visitor's SNI gave it.
        @return: Whether a challenge for it is being answered.
        """
        return normalizeHostname(hostname) in self._certificates

    def _certificateFor(self, hostname: str | None) -> tuple[PKey, list[X509]]:
        """
        The challenge certificate for a validation connection's SNI.

        @param hostname: The normalised SNI hostname, or L{None}.
        @return: The pending challenge's key and certificate.
        @raise UnknownChallenge: When no challenge is pending for it.
        """
        if hostname is None or hostname not in self._certificates:
            raise UnknownChallenge(f"no TLS-ALPN-01 challenge pending for {hostname!r}")
        return self._certificates[hostname]
