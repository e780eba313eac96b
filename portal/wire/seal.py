"""
The AEAD construction shared by UDP mode's datagrams (L{portal.wire.udpseal}) and raw TCP mode's data
sessions (L{portal.wire.streamseal}): keys per direction derived with HKDF, counter nonces.

Keys come from a secret both ends export from their TLS control session (a channel binding); it never
crosses a link. L{deriveKeys} expands it, with HKDF-SHA256, into one key per direction; the label names
the protocol and the direction, and a context (a session id, a data session's attach nonce) makes the
keys of two sessions or streams differ even under the same secret.

The 12-byte AEAD nonce is never sent; both ends build it from the direction and a counter::

    direction (1 byte, L{Direction}) || 3 zero bytes || counter (8 bytes, big-endian)

A sender consumes each counter once (L{NonceCounter}), starting at 0 for a fresh key, so no key and
nonce pair is ever used twice; the direction in the nonce also keeps a message reflected back to its
sender from opening. This module is pure: no I/O, no clock.
"""

from __future__ import annotations

import enum
import struct
from typing import Protocol

from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

#: Length of a key, and the least length of the secret given to L{deriveKeys}.
KEY_LENGTH = 32
#: Length of the authentication tag both AEADs append.
TAG_LENGTH = 16
#: Largest counter; a L{NonceCounter} refuses to go past it.
MAX_COUNTER = 2**64 - 1

_NONCE = struct.Struct("!B3xQ")


class Direction(enum.IntEnum):
    """
    Which way a message travels; part of the nonce, so each direction has its own nonce space.
    """

    RELAY_TO_TUNNEL = 1
    TUNNEL_TO_RELAY = 2


class CounterExhausted(Exception):
    """
    Every counter of a key has been used; sealing more under it would reuse a nonce.
    """


class AEAD(Protocol):
    """
    What this module needs of an AEAD: C{cryptography}'s C{ChaCha20Poly1305} and C{AESGCM} fit.
    """

    def encrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes:
        """
        @return: The ciphertext of C{data} followed by its tag.
        """

    def decrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes:
        """
        @return: The plaintext.
        @raise cryptography.exceptions.InvalidTag: When authentication fails.
        """


def deriveKeys(secret: bytes, protocol: bytes, context: bytes) -> tuple[bytes, bytes]:
    """
    Derive the two directions' keys with HKDF-SHA256.

    @param secret: At least L{KEY_LENGTH} bytes both ends share and nobody else knows, exported from
        the TLS control session.
    @param protocol: Names the protocol and its version (C{b"portal-udp-v1"}); part of each key's
        label, so that two protocols never share a key.
    @param context: What the keys belong to (a session id, an attach nonce); part of each key's label,
        so that two sessions or streams never share a key even if given the same secret.
    @return: The relay-to-tunnel key and the tunnel-to-relay key, L{KEY_LENGTH} bytes each.
    @raise ValueError: When C{secret} is too short.
    """
    if len(secret) < KEY_LENGTH:
        raise ValueError(f"secret must be at least {KEY_LENGTH} bytes, not {len(secret)}")

    def expand(direction: bytes) -> bytes:
        return HKDF(
            algorithm=SHA256(), length=KEY_LENGTH, salt=None, info=protocol + direction + context
        ).derive(secret)

    return expand(b" relay->tunnel key\0"), expand(b" tunnel->relay key\0")


def nonce(direction: Direction, counter: int) -> bytes:
    """
    The AEAD nonce of message C{counter} in C{direction}.

    @param direction: Which way the message travels.
    @param counter: Its counter, 0 to L{MAX_COUNTER}.
    @return: 12 bytes.
    """
    return _NONCE.pack(direction, counter)


class NonceCounter:
    """
    The counters one sender uses under one key: 0, 1, 2, ..., each once.
    """

    def __init__(self, start: int = 0) -> None:
        """
        @param start: The first counter to use; a fresh key starts at 0.
        """
        self._next = start

    @property
    def value(self) -> int:
        """
        The counter L{take} returns next, which is the number taken so far when started at 0.
        """
        return self._next

    def take(self) -> int:
        """
        Use the next counter: whatever the caller does with it, it is never returned again.

        @return: The counter.
        @raise CounterExhausted: When every counter has been used; the key must be replaced.
        """
        counter = self._next
        if counter > MAX_COUNTER:
            raise CounterExhausted("every counter of this key has been used")
        self._next = counter + 1
        return counter
