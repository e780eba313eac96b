"""
Tests for L{portal.gateway.proof}: nonces, proof messages and signature checks.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from portal.gateway.proof import (
    NONCE_TTL,
    PURPOSE_PAIR,
    PURPOSE_SESSION,
    ExpiredNonce,
    NonceBook,
    UnknownNonce,
    decode,
    encode,
    normalizeAuthority,
    p1363FromDER,
    proofMessage,
    verifyProof,
)


class TerminalKey:
    """
    A P-256 key that signs the way terminals do.
    """

    def __init__(self) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        self.publicKey = self._key.public_key().public_bytes(
            Encoding.DER, PublicFormat.SubjectPublicKeyInfo
        )

    @classmethod
    def generate(cls) -> TerminalKey:
        """
        @return: A new key.
        """
        return cls()

    def sign(self, message: bytes) -> bytes:
        """
        @return: A P1363 signature of C{message}.
        """
        return p1363FromDER(self._key.sign(message, ec.ECDSA(hashes.SHA256())))


class EncodingTests(SynchronousTestCase):
    """
    Tests for L{encode}, L{decode} and L{normalizeAuthority}.
    """

    def test_roundTrip(self) -> None:
        """
        Bytes survive base64url without padding; padded input is read too.
        """
        for data in [b"", b"\x00", b"\xff\xfe", bytes(range(256))]:
            self.assertEqual(decode(encode(data)), data)
            self.assertNotIn("=", encode(data))
        self.assertEqual(encode(b"\xfb\xff"), "-_8")
        self.assertEqual(decode("-_8="), b"\xfb\xff")

    def test_decodeRefuses(self) -> None:
        """
        Standard base64's C{+} and C{/}, other characters, and non-strings are refused.
        """
        for text in ["ab+c", "ab/c", "a b", "abc!", "é"]:
            self.assertRaises(ValueError, decode, text)
        self.assertRaises(ValueError, decode, b"abcd")  # type: ignore[arg-type]

    def test_authority(self) -> None:
        """
        The host is lowercased; empty, spaced or non-ASCII hosts are refused.
        """
        self.assertEqual(normalizeAuthority(b"App.Example:8443"), "app.example:8443")
        for bad in [b"", b"a b", b"a\nb", b"\xc3\xa9", b"x" * 301]:
            self.assertRaises(ValueError, normalizeAuthority, bad)


class ProofMessageTests(SynchronousTestCase):
    """
    Tests for L{proofMessage}.
    """

    def test_format(self) -> None:
        """
        The message is the domain, purpose, host and nonce, each ending with a newline, as the
        pairing page's script builds it.
        """
        self.assertEqual(
            proofMessage(PURPOSE_SESSION, "app.example:8443", "bm9uY2U"),
            b"portal-terminal-v1\nsession\napp.example:8443\nbm9uY2U\n",
        )

    def test_distinct(self) -> None:
        """
        Different purposes, hosts or nonces give different messages; newlines are refused.
        """
        messages = {
            proofMessage(PURPOSE_PAIR, "a", "n"),
            proofMessage(PURPOSE_SESSION, "a", "n"),
            proofMessage(PURPOSE_PAIR, "b", "n"),
            proofMessage(PURPOSE_PAIR, "a", "m"),
        }
        self.assertEqual(len(messages), 4)
        self.assertRaises(ValueError, proofMessage, PURPOSE_PAIR, "a\nb", "n")
        self.assertRaises(ValueError, proofMessage, PURPOSE_PAIR, "a", "n\n")


class VerifyProofTests(SynchronousTestCase):
    """
    Tests for L{verifyProof} and L{p1363FromDER}.
    """

    def setUp(self) -> None:
        """
        Make a key and a message.
        """
        self.key = TerminalKey.generate()
        self.message = proofMessage(PURPOSE_SESSION, "app.example", "nonce")

    def test_valid(self) -> None:
        """
        A P1363 signature by the key over the message verifies.
        """
        signature = self.key.sign(self.message)
        self.assertEqual(len(signature), 64)
        self.assertTrue(verifyProof(self.key.publicKey, signature, self.message))

    def test_wrongKey(self) -> None:
        """
        Another key's signature does not verify.
        """
        other = TerminalKey.generate()
        self.assertFalse(verifyProof(self.key.publicKey, other.sign(self.message), self.message))

    def test_otherMessage(self) -> None:
        """
        A signature over another host, nonce or purpose does not verify.
        """
        for other in [
            proofMessage(PURPOSE_SESSION, "evil.example", "nonce"),
            proofMessage(PURPOSE_SESSION, "app.example", "other"),
            proofMessage(PURPOSE_PAIR, "app.example", "nonce"),
        ]:
            self.assertFalse(verifyProof(self.key.publicKey, self.key.sign(other), self.message))

    def test_malformed(self) -> None:
        """
        DER signatures, truncated ones, zeros and bad keys are refused without raising.
        """
        der = ec.generate_private_key(ec.SECP256R1()).sign(self.message, ec.ECDSA(hashes.SHA256()))
        signature = self.key.sign(self.message)
        for key, sig in [
            (self.key.publicKey, der),
            (self.key.publicKey, signature[:-1]),
            (self.key.publicKey, b"\x00" * 64),
            (b"not a key", signature),
            (self.key.publicKey[:-1], signature),
        ]:
            self.assertFalse(verifyProof(key, sig, self.message))

    def test_p1363(self) -> None:
        """
        L{p1363FromDER} gives r and s as 32 big-endian bytes each.
        """
        from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

        self.assertEqual(
            p1363FromDER(encode_dss_signature(1, 2)),
            (1).to_bytes(32, "big") + (2).to_bytes(32, "big"),
        )


class NonceBookTests(SynchronousTestCase):
    """
    Tests for L{NonceBook}.
    """

    def setUp(self) -> None:
        """
        Make a nonce book on a fake clock.
        """
        self.clock = Clock()
        self.nonces = NonceBook(self.clock)

    def test_fresh(self) -> None:
        """
        Nonces are 32 random bytes in base64url, all different.
        """
        first, second = self.nonces.issue(), self.nonces.issue()
        self.assertEqual(len(decode(first)), 32)
        self.assertNotEqual(first, second)

    def test_singleUse(self) -> None:
        """
        A nonce is accepted once.
        """
        nonce = self.nonces.issue()
        self.nonces.take(nonce)
        self.assertRaises(UnknownNonce, self.nonces.take, nonce)

    def test_unknown(self) -> None:
        """
        A nonce never issued is refused.
        """
        self.assertRaises(UnknownNonce, self.nonces.take, encode(b"\x00" * 32))

    def test_expiry(self) -> None:
        """
        A nonce is accepted for 60 seconds, and refused as expired after that.
        """
        nonce, late = self.nonces.issue(), self.nonces.issue()
        self.clock.advance(NONCE_TTL)
        self.nonces.take(nonce)
        self.clock.advance(0.001)
        self.assertRaises(ExpiredNonce, self.nonces.take, late)

    def test_bounded(self) -> None:
        """
        At most C{maxOutstanding} nonces are kept, the newest; expired ones are pruned.
        """
        nonces = NonceBook(self.clock, ttl=10, maxOutstanding=2)
        first, second, third = nonces.issue(), nonces.issue(), nonces.issue()
        self.assertEqual(len(nonces), 2)
        self.assertRaises(UnknownNonce, nonces.take, first)
        nonces.take(third)
        self.clock.advance(11)
        nonces.issue()
        self.assertEqual(len(nonces), 1)
        self.assertRaises(UnknownNonce, nonces.take, second)
