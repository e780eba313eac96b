"""
Tests for L{portal.wire.attach}.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct

from twisted.trial.unittest import SynchronousTestCase

from portal.wire.attach import (
    ATTACH_LENGTH,
    MAC_LENGTH,
    MAX_HEADER_LENGTH,
    NONCE_LENGTH,
    SESSION_ID_LENGTH,
    AttachError,
    StreamHeader,
    attachProof,
    checkAttachProof,
    decodeStreamHeader,
    encodeStreamHeader,
)

_KEY = b"k" * 32
_OTHER_KEY = b"K" * 32
_NONCE = b"n" * NONCE_LENGTH
_OTHER_NONCE = b"N" * NONCE_LENGTH
_SESSION = b"s" * SESSION_ID_LENGTH
_OTHER_SESSION = b"S" * SESSION_ID_LENGTH
_HEADER = StreamHeader(streamId=7, hostname="app.localhost", peerHost="203.0.113.9", peerPort=51234)


def _splitProof(proof: bytes) -> tuple[bytes, bytes]:
    """
    @param proof: An attach proof.
    @return: Its session id and its MAC.
    """
    return proof[:SESSION_ID_LENGTH], proof[SESSION_ID_LENGTH:]


def _frame(key: bytes, nonce: bytes, body: bytes) -> bytes:
    """
    Frame an arbitrary body the way L{encodeStreamHeader} does, with a valid MAC.

    @param key: The data key.
    @param nonce: The data session's nonce.
    @param body: The header body, well formed or not.
    @return: Length, body and MAC.
    """
    tag = hmac.new(key, b"stream\0" + nonce + body, hashlib.sha256).digest()
    return struct.pack("!H", len(body)) + body + tag


class AttachProofTests(SynchronousTestCase):
    """
    Tests for L{attachProof} and L{checkAttachProof}.
    """

    def test_roundTrip(self) -> None:
        """
        A proof made with the session's key, nonce and id is accepted, and is the session id followed by
        its MAC.
        """
        proof = attachProof(_KEY, _NONCE, _SESSION)
        self.assertEqual(len(proof), ATTACH_LENGTH)
        sessionId, tag = _splitProof(proof)
        self.assertEqual(sessionId, _SESSION)
        self.assertEqual(len(tag), MAC_LENGTH)
        self.assertTrue(checkAttachProof(_KEY, _NONCE, sessionId, tag))

    def test_wrongKey(self) -> None:
        """
        A proof made under another control session's key is refused.
        """
        sessionId, tag = _splitProof(attachProof(_OTHER_KEY, _NONCE, _SESSION))
        self.assertFalse(checkAttachProof(_KEY, _NONCE, sessionId, tag))

    def test_wrongNonce(self) -> None:
        """
        A proof made for another connection's nonce (a replay) is refused.
        """
        sessionId, tag = _splitProof(attachProof(_KEY, _OTHER_NONCE, _SESSION))
        self.assertFalse(checkAttachProof(_KEY, _NONCE, sessionId, tag))

    def test_wrongSession(self) -> None:
        """
        A MAC made for one session id does not prove another.
        """
        _, tag = _splitProof(attachProof(_KEY, _NONCE, _SESSION))
        self.assertFalse(checkAttachProof(_KEY, _NONCE, _OTHER_SESSION, tag))

    def test_truncatedTag(self) -> None:
        """
        A shortened or empty MAC is refused rather than compared as a prefix.
        """
        _, tag = _splitProof(attachProof(_KEY, _NONCE, _SESSION))
        self.assertFalse(checkAttachProof(_KEY, _NONCE, _SESSION, tag[:-1]))
        self.assertFalse(checkAttachProof(_KEY, _NONCE, _SESSION, b""))


class StreamHeaderTests(SynchronousTestCase):
    """
    Tests for L{encodeStreamHeader} and L{decodeStreamHeader}.
    """

    def test_roundTrip(self) -> None:
        """
        A header decodes to what was encoded and reports how many bytes it used, leaving the visitor's
        bytes after it untouched.
        """
        encoded = encodeStreamHeader(_KEY, _NONCE, _HEADER)
        result = decodeStreamHeader(_KEY, _NONCE, encoded + b"\x16\x03\x01rest")
        self.assertEqual(result, (_HEADER, len(encoded)))

    def test_nonAsciiHostname(self) -> None:
        """
        A hostname outside ASCII survives the round trip (JSON escapes it).
        """
        header = StreamHeader(streamId=1, hostname="bücher.localhost", peerHost="::1", peerPort=1)
        encoded = encodeStreamHeader(_KEY, _NONCE, header)
        self.assertEqual(decodeStreamHeader(_KEY, _NONCE, encoded), (header, len(encoded)))

    def test_everyPrefixIsIncomplete(self) -> None:
        """
        Every proper prefix of an encoded header asks for more bytes instead of failing.
        """
        encoded = encodeStreamHeader(_KEY, _NONCE, _HEADER)
        for end in range(len(encoded)):
            self.assertIsNone(decodeStreamHeader(_KEY, _NONCE, encoded[:end]), end)

    def test_tamperedByte(self) -> None:
        """
        Changing any byte of the body or the MAC makes the header fail authentication.
        """
        encoded = encodeStreamHeader(_KEY, _NONCE, _HEADER)
        for index in range(2, len(encoded)):
            tampered = bytearray(encoded)
            tampered[index] ^= 0x01
            self.assertRaises(AttachError, decodeStreamHeader, _KEY, _NONCE, bytes(tampered))

    def test_replayedWithAnotherNonce(self) -> None:
        """
        A header captured on one data session is refused on another, whose nonce differs.
        """
        encoded = encodeStreamHeader(_KEY, _OTHER_NONCE, _HEADER)
        self.assertRaises(AttachError, decodeStreamHeader, _KEY, _NONCE, encoded)

    def test_wrongKey(self) -> None:
        """
        A header authenticated under another key is refused.
        """
        encoded = encodeStreamHeader(_OTHER_KEY, _NONCE, _HEADER)
        self.assertRaises(AttachError, decodeStreamHeader, _KEY, _NONCE, encoded)

    def test_oversizeLength(self) -> None:
        """
        A length above L{MAX_HEADER_LENGTH} is refused from the two length bytes alone, before the
        relay would buffer that much.
        """
        for length in (MAX_HEADER_LENGTH + 1, 0xFFFF):
            error = self.assertRaises(
                AttachError, decodeStreamHeader, _KEY, _NONCE, struct.pack("!H", length)
            )
            self.assertIn(str(length), str(error))

    def test_maximumLengthWaits(self) -> None:
        """
        A length of exactly L{MAX_HEADER_LENGTH} is allowed and waits for its body.
        """
        self.assertIsNone(
            decodeStreamHeader(_KEY, _NONCE, struct.pack("!H", MAX_HEADER_LENGTH) + b"{")
        )

    def test_malformedJSON(self) -> None:
        """
        Bodies with a valid MAC that are not JSON, lack fields, have fields of the wrong shape or nest too
        deeply for the JSON parser raise L{AttachError} rather than another exception.
        """
        bodies = [
            b"not json",
            b"\xff\xfe",
            b"[]",
            b"{}",
            json.dumps({"stream": 1, "host": "a"}).encode(),
            json.dumps({"stream": "x", "host": "a", "peer": ["h", 1]}).encode(),
            json.dumps({"stream": 1, "host": "a", "peer": ["h"]}).encode(),
            json.dumps({"stream": 1, "host": "a", "peer": 5}).encode(),
            json.dumps({"stream": 1, "host": "a", "peer": ["h", "port"]}).encode(),
            json.dumps({"stream": None, "host": "a", "peer": ["h", 1]}).encode(),
            b"[" * 2000 + b"]" * 2000,
        ]
        for body in bodies:
            framed = _frame(_KEY, _NONCE, body)
            self.assertRaises(AttachError, decodeStreamHeader, _KEY, _NONCE, framed)

    def test_hostileFrameIsWellFormed(self) -> None:
        """
        The L{_frame} helper used above builds frames the decoder accepts when the body is valid, so the
        malformed-body cases fail on the body and not on the framing.
        """
        body = json.dumps({"stream": 3, "host": "h", "peer": ["p", 9]}).encode()
        framed = _frame(_KEY, _NONCE, body)
        self.assertEqual(
            decodeStreamHeader(_KEY, _NONCE, framed),
            (StreamHeader(streamId=3, hostname="h", peerHost="p", peerPort=9), len(framed)),
        )
