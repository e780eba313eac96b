"""
Tests for L{portal.trust.acmestore}: the ACME account key and the stored certificates.
"""

from __future__ import annotations

import datetime
import os
import stat

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.trial.unittest import SynchronousTestCase

from portal.trust.acmestore import (
    CertificateStore,
    accountKeyPath,
    directoryName,
    loadOrCreateAccountKey,
)
from portal.trust.localca import CertificateError

_ISSUER_KEY = ec.generate_private_key(ec.SECP256R1())
_ISSUER = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test ACME intermediate")])


def issueFromCSR(
    csrPEM: bytes,
    notBefore: datetime.datetime,
    notAfter: datetime.datetime,
    hostname: str | None = None,
) -> bytes:
    """
    Sign a CSR's key as a test ACME CA would.

    @param csrPEM: The CSR.
    @param notBefore: The certificate's start.
    @param notAfter: Its end.
    @param hostname: The name to certify; the CSR's first DNS name when L{None}.
    @return: The PEM chain: the certificate, then the test issuer.
    """
    csr = x509.load_pem_x509_csr(csrPEM)
    if hostname is None:
        names = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        hostname = names.get_values_for_type(x509.DNSName)[0]
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(_ISSUER)
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(notBefore)
        .not_valid_after(notAfter)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=True)
        .sign(_ISSUER_KEY, hashes.SHA256())
    )
    issuer = (
        x509.CertificateBuilder()
        .subject_name(_ISSUER)
        .issuer_name(_ISSUER)
        .public_key(_ISSUER_KEY.public_key())
        .serial_number(1)
        .not_valid_before(notBefore)
        .not_valid_after(notAfter)
        .sign(_ISSUER_KEY, hashes.SHA256())
    )
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (certificate, issuer))


def keyAndCSR(hostname: str) -> tuple[bytes, bytes]:
    """
    @return: A new P-256 key (PEM) and a CSR (PEM) for C{hostname} with it.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    keyPEM = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return keyPEM, csr.public_bytes(serialization.Encoding.PEM)


NOW = datetime.datetime(2026, 12, 7, 8, 0, tzinfo=datetime.UTC)


class AccountKeyTests(SynchronousTestCase):
    """
    Tests for L{accountKeyPath} and L{loadOrCreateAccountKey}.
    """

    def test_besideTheIdentity(self) -> None:
        """
        The account key file is beside the identity file, named after it.
        """
        self.assertEqual(
            accountKeyPath("/home/a/.config/portal/identity.json"),
            "/home/a/.config/portal/identity.acme-account.pem",
        )

    def test_createdPrivateThenReused(self) -> None:
        """
        The key is created once with mode 0600 and loaded again afterwards.
        """
        path = os.path.join(self.mktemp(), "identity.acme-account.pem")
        key = loadOrCreateAccountKey(path)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(key.curve.name, "secp256r1")
        again = loadOrCreateAccountKey(path)
        self.assertEqual(again.private_numbers(), key.private_numbers())

    def test_openPermissionsRefused(self) -> None:
        """
        A key file others may read is refused, with the path in the message.
        """
        path = os.path.join(self.mktemp(), "identity.acme-account.pem")
        loadOrCreateAccountKey(path)
        os.chmod(path, 0o644)
        e = self.assertRaises(CertificateError, loadOrCreateAccountKey, path)
        self.assertIn(path, str(e))

    def test_corruptRefused(self) -> None:
        """
        A file that is not a P-256 PEM key is refused and left alone.
        """
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"not a key")
        os.chmod(path, 0o600)
        self.assertRaises(CertificateError, loadOrCreateAccountKey, path)
        with open(path, "rb") as f:
            self.assertEqual(f.read(), b"not a key")


class CertificateStoreTests(SynchronousTestCase):
    """
    Tests for L{CertificateStore}.
    """

    def setUp(self) -> None:
        """
        An empty store.
        """
        self.store = CertificateStore(os.path.join(self.mktemp(), "acme", "id", "dir"))

    def test_directoryName(self) -> None:
        """
        Each ACME directory gets its own, readable, file name.
        """
        production = directoryName("https://acme-v02.api.letsencrypt.org/directory")
        staging = directoryName("https://acme-staging-v02.api.letsencrypt.org/directory")
        self.assertTrue(production.startswith("acme-v02.api.letsencrypt.org-"))
        self.assertNotEqual(production, staging)
        self.assertNotEqual(
            directoryName("https://127.0.0.1:1/dir"), directoryName("https://127.0.0.1:2/dir")
        )

    def test_emptyStore(self) -> None:
        """
        A hostname with nothing stored loads as L{None}.
        """
        self.assertIsNone(self.store.load("blog.portal.test"))

    def test_saveAndLoad(self) -> None:
        """
        A saved certificate loads again with its key, chain and validity; the key file has mode
        0600 and the directories 0700.
        """
        keyPEM, csrPEM = keyAndCSR("blog.portal.test")
        notAfter = NOW + datetime.timedelta(days=90)
        chainPEM = issueFromCSR(csrPEM, NOW, notAfter)
        saved = self.store.save("blog.portal.test", chainPEM, keyPEM)
        loaded = self.store.load("Blog.Portal.Test")
        assert loaded is not None
        self.assertEqual(loaded.notBefore, NOW)
        self.assertEqual(loaded.notAfter, notAfter)
        self.assertEqual(loaded.lifetime, datetime.timedelta(days=90))
        self.assertEqual(loaded.serial, saved.serial)
        self.assertEqual(len(loaded.chain), 2)
        base = os.path.join(self.store.directory, "blog.portal.test")
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(base, "key.pem")).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(base).st_mode), 0o700)
        self.assertEqual(stat.S_IMODE(os.stat(self.store.directory).st_mode), 0o700)

    def test_saveRefusesOtherHostname(self) -> None:
        """
        A certificate that does not name the hostname is refused and nothing is stored.
        """
        keyPEM, csrPEM = keyAndCSR("blog.portal.test")
        chainPEM = issueFromCSR(csrPEM, NOW, NOW + datetime.timedelta(days=1), "evil.test")
        self.assertRaises(CertificateError, self.store.save, "blog.portal.test", chainPEM, keyPEM)
        self.assertIsNone(self.store.load("blog.portal.test"))

    def test_saveRefusesOtherKey(self) -> None:
        """
        A certificate for another key than the one given is refused.
        """
        _, csrPEM = keyAndCSR("blog.portal.test")
        otherKey, _ = keyAndCSR("blog.portal.test")
        chainPEM = issueFromCSR(csrPEM, NOW, NOW + datetime.timedelta(days=1))
        self.assertRaises(CertificateError, self.store.save, "blog.portal.test", chainPEM, otherKey)

    def test_loadRefusesOpenKey(self) -> None:
        """
        A stored key that others may read is refused.
        """
        keyPEM, csrPEM = keyAndCSR("blog.portal.test")
        self.store.save(
            "blog.portal.test", issueFromCSR(csrPEM, NOW, NOW + datetime.timedelta(days=1)), keyPEM
        )
        os.chmod(os.path.join(self.store.directory, "blog.portal.test", "key.pem"), 0o644)
        self.assertRaises(CertificateError, self.store.load, "blog.portal.test")
