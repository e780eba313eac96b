"""
Proof that a terminal holds its key: single-use nonces, and signatures over them bound to the app's
host.

The tunnel hands out random nonces (C{/.portal/session/challenge}); a terminal answers one by
signing L{proofMessage} with its ECDSA P-256 key, which names what the proof is for (pairing or a
session), the host the terminal is talking to, and the nonce.  Each nonce is accepted once, for a
short time.  The message is plain text so that the pairing page's script builds it in one line:

    portal-terminal-v1\\n<purpose>\\n<host>\\n<nonce>\\n

Signatures are in WebCrypto's form (IEEE P1363: the 32-byte C{r} then the 32-byte C{s}), which
the command-line terminal produces too.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
from collections import OrderedDict

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.hazmat.primitives.serialization import load_der_public_key
from twisted.internet.interfaces import IReactorTime

#: First line of every proof message.
PROOF_DOMAIN = "portal-terminal-v1"

#: A proof made to pair a new terminal.
PURPOSE_PAIR = "pair"

#: A proof made to get a fresh session.
PURPOSE_SESSION = "session"

#: Seconds a nonce may be answered after it is issued.
NONCE_TTL = 60.0

#: Most nonces remembered at once; issuing more forgets the oldest.
MAX_OUTSTANDING_NONCES = 10000

#: Random bytes in a nonce.
NONCE_BYTES = 32

#: Length of a P-256 signature in IEEE P1363 form.
SIGNATURE_LENGTH = 64

#: Longest host name (with port) a proof may name.
MAX_AUTHORITY_LENGTH = 300


_BASE64URL = re.compile(r"[A-Za-z0-9_-]*={0,2}")


class ProofError(Exception):
    """
    A proof of possession was refused; the message says why.
    """


class UnknownNonce(ProofError):
    """
    The nonce was never issued here, was already answered, or was forgotten to make room.
    """


class ExpiredNonce(ProofError):
    """
    The nonce was answered after its lifetime.
    """


class BadProof(ProofError):
    """
    The signature does not verify with the terminal's key for this purpose, host and nonce.
    """


def encode(data: bytes) -> str:
    """
    @param data: Bytes to put in a JSON document.
    @return: Their unpadded base64url form, as the pairing page's script writes it.
    """
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def decode(text: str) -> bytes:
    """
    @param text: Unpadded (or padded) base64url.
    @return: The bytes it encodes.
    @raise ValueError: If it is not base64url.
    """
    if not isinstance(text, str) or _BASE64URL.fullmatch(text) is None:
        raise ValueError("not base64url")
    raw = text.encode("ascii").rstrip(b"=")
    try:
        return base64.b64decode(raw + b"=" * (-len(raw) % 4), altchars=b"-_", validate=True)
    except binascii.Error:
        raise ValueError("not base64url")


def normalizeAuthority(authority: bytes) -> str:
    """
    Put the host a request was sent to in the form proofs name it.

    @param authority: The request's C{Host} or C{:authority}, e.g. C{b"app.example:8443"}.
    @return: It in lower case.
    @raise ValueError: If it is empty, too long, or not printable ASCII without spaces.
    """
    if not 0 < len(authority) <= MAX_AUTHORITY_LENGTH:
        raise ValueError("the request has no usable Host")
    text = authority.decode("ascii", "replace")
    if not all("!" <= c <= "~" for c in text):
        raise ValueError("the request's Host is not printable ASCII")
    return text.lower()


def proofMessage(purpose: str, authority: str, nonce: str) -> bytes:
    """
    Encode what a terminal signs.

    @param purpose: L{PURPOSE_PAIR} or L{PURPOSE_SESSION}.
    @param authority: The host (and port) the terminal sends the proof to, see
        L{normalizeAuthority}; the browser's C{location.host}.
    @param nonce: The nonce, in the base64url form it was issued in.
    @return: The message: L{PROOF_DOMAIN}, C{purpose}, C{authority} and C{nonce}, each followed
        by a newline (none of them can hold one).
    """
    for field in (purpose, authority, nonce):
        if "\n" in field or not field.isascii():
            raise ValueError(f"{field!r} cannot be part of a proof")
    return f"{PROOF_DOMAIN}\n{purpose}\n{authority}\n{nonce}\n".encode("ascii")


def p1363FromDER(signature: bytes) -> bytes:
    """
    @param signature: A DER ECDSA P-256 signature, as C{cryptography} makes them.
    @return: The same signature in IEEE P1363 form (WebCrypto's).
    """
    r, s = decode_dss_signature(signature)
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def verifyProof(publicKey: bytes, signature: bytes, message: bytes) -> bool:
    """
    Check a terminal's signature.

    @param publicKey: The terminal's DER SubjectPublicKeyInfo (a P-256 key).
    @param signature: Its signature over the SHA-256 of C{message}, in IEEE P1363 form.
    @param message: The signed message, see L{proofMessage}.
    @return: Whether the signature is valid; C{False} also for a malformed key or signature.
    """
    if len(signature) != SIGNATURE_LENGTH:
        return False
    try:
        key = load_der_public_key(publicKey)
    except (ValueError, TypeError):
        return False
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        return False
    r = int.from_bytes(signature[:32], "big")
    s = int.from_bytes(signature[32:], "big")
    try:
        key.verify(encode_dss_signature(r, s), message, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        return False
    return True


class NonceBook:
    """
    Issues nonces and accepts each once, within its lifetime.

    Nonces are kept in issue order, which (with a fixed lifetime) is also expiry order, so pruning
    and dropping the oldest are cheap; at most L{maxOutstanding} are remembered, whoever asks for
    them.
    """

    def __init__(
        self,
        clock: IReactorTime,
        ttl: float = NONCE_TTL,
        maxOutstanding: int = MAX_OUTSTANDING_NONCES,
    ) -> None:
        """
        @param clock: The source of the current time.
        @param ttl: Seconds a nonce may be answered.
        @param maxOutstanding: Most nonces remembered at once.
        """
        self._clock = clock
        self.ttl = ttl
        self.maxOutstanding = maxOutstanding
        self._nonces: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        """
        @return: The number of nonces remembered (expired ones until they are pruned).
        """
        return len(self._nonces)

    def _prune(self, now: float) -> None:
        """
        Forget expired nonces.
        """
        while self._nonces:
            expiresAt = next(iter(self._nonces.values()))
            if now <= expiresAt:
                break
            self._nonces.popitem(last=False)

    def issue(self) -> str:
        """
        @return: A fresh random nonce, base64url.
        """
        now = self._clock.seconds()
        self._prune(now)
        while len(self._nonces) >= self.maxOutstanding:
            self._nonces.popitem(last=False)
        nonce = encode(secrets.token_bytes(NONCE_BYTES))
        self._nonces[nonce] = now + self.ttl
        return nonce

    def take(self, nonce: str) -> None:
        """
        Use up a nonce.

        @param nonce: A nonce from L{issue}.
        @raise UnknownNonce: If it was not issued here, was already used, or was forgotten.
        @raise ExpiredNonce: If its lifetime has ended.
        """
        expiresAt = self._nonces.pop(nonce, None)
        if expiresAt is None:
            raise UnknownNonce("the challenge is unknown or was already used; ask for a new one")
        if self._clock.seconds() > expiresAt:
            raise ExpiredNonce(
                f"the challenge expired (challenges are valid for {self.ttl:g} seconds); "
                f"ask for a new one"
            )
