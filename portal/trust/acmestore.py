"""
Where a tunnel keeps what ACME gives it: the account key and the certificates.

One ACME account key per identity, in a private file beside the identity file
(C{identity.json} -> C{identity.acme-account.pem}, mode 0600). Certificates and their P-256 keys
per hostname, under the identity's state directory:
C{acme/<identity short id>/<directory>/<hostname>/fullchain.pem} and C{key.pem} (0600), where
C{<directory>} names the ACME directory (its host and a hash of its URL), so that certificates from
a staging CA are never served in place of a production one. A restart reuses them.
"""

from __future__ import annotations

import datetime
import hashlib
import os
from urllib.parse import urlsplit

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from OpenSSL.crypto import X509, PKey

from portal.trust.localca import CertificateError, normalizeHostname, parseKeyPair
from portal.trust.privatefiles import (
    PRIVATE_FILE_MODE,
    makePrivateDirectories,
    openPrivateFile,
    writeFileAtomically,
)

ACCOUNT_KEY_SUFFIX = ".acme-account.pem"
"""
What replaces the identity file's extension to name the ACME account key beside it.
"""

CHAIN_NAME = "fullchain.pem"
"""
A stored certificate's chain file (server certificate first).
"""

KEY_NAME = "key.pem"
"""
A stored certificate's private key file (mode 0600).
"""


def accountKeyPath(identityPath: str) -> str:
    """
    @param identityPath: The identity file.
    @return: The ACME account key file beside it.
    """
    return os.path.splitext(os.path.abspath(identityPath))[0] + ACCOUNT_KEY_SUFFIX


def loadOrCreateAccountKey(path: str) -> ec.EllipticCurvePrivateKey:
    """
    Load the ACME account key, creating it (P-256, mode 0600) if there is none.

    @param path: The key file (L{accountKeyPath}).
    @return: The key.
    @raise CertificateError: If the file exists but is unreadable, readable by others, or not a
        P-256 key.
    """
    try:
        with openPrivateFile(path) as f:
            data = f.read()
    except FileNotFoundError:
        key = ec.generate_private_key(ec.SECP256R1())
        makePrivateDirectories(os.path.dirname(path))
        try:
            writeFileAtomically(path, _pem(key), PRIVATE_FILE_MODE, overwrite=False)
        except FileExistsError:
            # Another tunnel of this identity created it meanwhile: use that one.
            return loadOrCreateAccountKey(path)
        return key
    except OSError as e:
        raise CertificateError(f"cannot use the ACME account key {path}: {e}")
    try:
        loaded = serialization.load_pem_private_key(data, password=None)
    except (TypeError, ValueError) as e:
        raise CertificateError(f"{path} does not hold an unencrypted PEM key: {e}")
    if not isinstance(loaded, ec.EllipticCurvePrivateKey) or loaded.curve.name != "secp256r1":
        raise CertificateError(f"{path} does not hold a P-256 key; remove it to make a new one")
    return loaded


def directoryName(directoryURL: str) -> str:
    """
    A file name for an ACME directory: its host, and the start of the SHA-256 of its URL.

    @param directoryURL: The directory URL.
    @return: For example C{acme-v02.api.letsencrypt.org-1a2b3c4d5e6f}.
    """
    host = urlsplit(directoryURL).hostname or "acme"
    safe = "".join(c if c.isalnum() or c in ".-" else "_" for c in host)
    return f"{safe}-{hashlib.sha256(directoryURL.encode()).hexdigest()[:12]}"


@attrs.frozen
class StoredCertificate:
    """
    A certificate from the ACME CA, with its key.

    @ivar hostname: The hostname it is for.
    @ivar privateKey: Its private key.
    @ivar chain: The certificate, then the CA's intermediates.
    @ivar notBefore: When it becomes valid (UTC).
    @ivar notAfter: When it expires (UTC).
    """

    hostname: str
    privateKey: PKey = attrs.field(repr=False)
    chain: list[X509]
    notBefore: datetime.datetime
    notAfter: datetime.datetime

    @classmethod
    def fromPEM(
        cls, hostname: str, chainPEM: bytes, keyPEM: bytes, chainFile: str, keyFile: str
    ) -> StoredCertificate:
        """
        Check and parse a certificate chain and its key.

        @param hostname: The hostname the certificate must name.
        @param chainPEM: The PEM chain, server certificate first.
        @param keyPEM: The PEM private key.
        @param chainFile: Where the chain is (or goes), for messages.
        @param keyFile: Where the key is (or goes), for messages.
        @return: The certificate.
        @raise CertificateError: If either does not parse, they do not match, or the certificate
            does not name C{hostname}.
        """
        privateKey, chain = parseKeyPair(chainPEM, keyPEM, chainFile, keyFile)
        leaf = chain[0].to_cryptography()
        try:
            names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            dnsNames: list[str] = []
        else:
            dnsNames = [normalizeHostname(n) for n in names.get_values_for_type(x509.DNSName)]
        if hostname not in dnsNames:
            raise CertificateError(f"{chainFile} is not a certificate for {hostname}")
        return cls(hostname, privateKey, chain, leaf.not_valid_before_utc, leaf.not_valid_after_utc)

    @property
    def lifetime(self) -> datetime.timedelta:
        """
        @return: How long the certificate is valid in all.
        """
        return self.notAfter - self.notBefore

    @property
    def serial(self) -> int:
        """
        @return: The certificate's serial number.
        """
        return self.chain[0].to_cryptography().serial_number


class CertificateStore:
    """
    The ACME certificates of one identity from one ACME directory, one directory per hostname.

    @ivar directory: Where they are.
    """

    def __init__(self, directory: str) -> None:
        """
        @param directory: Where they are (see the module's docstring).
        """
        self.directory = directory

    def _paths(self, hostname: str) -> tuple[str, str]:
        """
        @return: The chain file and key file of C{hostname}.
        """
        base = os.path.join(self.directory, normalizeHostname(hostname))
        return os.path.join(base, CHAIN_NAME), os.path.join(base, KEY_NAME)

    def load(self, hostname: str) -> StoredCertificate | None:
        """
        Read the stored certificate of a hostname.

        @param hostname: The hostname.
        @return: The certificate, or L{None} when none is stored.
        @raise CertificateError: If the stored files are unreadable, readable by others (the key),
            corrupt, or not for this hostname.
        """
        chainFile, keyFile = self._paths(hostname)
        try:
            with open(chainFile, "rb") as f:
                chainPEM = f.read()
            with openPrivateFile(keyFile) as f:
                keyPEM = f.read()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise CertificateError(f"cannot read the stored certificate of {hostname}: {e}")
        return StoredCertificate.fromPEM(
            normalizeHostname(hostname), chainPEM, keyPEM, chainFile, keyFile
        )

    def save(self, hostname: str, chainPEM: bytes, keyPEM: bytes) -> StoredCertificate:
        """
        Check and store a newly issued certificate and its key, replacing any earlier one.

        @param hostname: The hostname.
        @param chainPEM: The PEM chain from the CA, server certificate first.
        @param keyPEM: The PEM private key.
        @return: The certificate as stored.
        @raise CertificateError: If they do not parse, match, or name the hostname.
        @raise OSError: If they cannot be written.
        """
        chainFile, keyFile = self._paths(hostname)
        stored = StoredCertificate.fromPEM(
            normalizeHostname(hostname), chainPEM, keyPEM, chainFile, keyFile
        )
        makePrivateDirectories(os.path.dirname(chainFile))
        writeFileAtomically(keyFile, keyPEM, PRIVATE_FILE_MODE)
        writeFileAtomically(chainFile, chainPEM, 0o644)
        return stored


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """
    @return: C{key} as unencrypted PKCS#8 PEM.
    """
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
