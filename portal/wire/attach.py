"""
Framing of stream data sessions: plain TCP with an authenticated attach (DESIGN.md section 7).

A data session is a TCP connection from the tunnel to the relay's control port::

    tunnel -> relay   MAGIC                                   (5 bytes, never 0x16 so it is not TLS)
    relay  -> tunnel  nonce                                   (16 random bytes, fresh per connection)
    tunnel -> relay   sessionId + HMAC(key, "attach" nonce sessionId)   (16 + 32 bytes)
    relay  -> tunnel  ACK                                     (1 byte; the session is now idle in the pool)
    ...
    relay  -> tunnel  length + header + HMAC(key, "stream" nonce header)   (when a visitor is paired)
    both ways         the visitor's bytes (TLS the tunnel terminates)

C{key} is exported from the TLS control session (L{portal.wire.control.EXPORTER_DATA_KEY}); it never crosses a
link. The nonce makes every proof single-use, so a captured attach or header cannot be replayed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct

import attrs

MAGIC = b"PTLD\x01"
NONCE_LENGTH = 16
SESSION_ID_LENGTH = 16
MAC_LENGTH = 32
ACK = b"\x01"
ATTACH_LENGTH = SESSION_ID_LENGTH + MAC_LENGTH
#: Largest encoded stream header accepted.
MAX_HEADER_LENGTH = 4096
_LENGTH = struct.Struct("!H")


class AttachError(Exception):
    """
    A data session sent something that is not a valid attach or stream header.
    """


@attrs.frozen
class StreamHeader:
    """
    What the relay tells the tunnel about the visitor paired with a data session.

    @ivar streamId: The relay's number for this stream, for logs on both sides.
    @ivar hostname: The SNI hostname the visitor asked for.
    @ivar peerHost: The visitor's address.
    @ivar peerPort: The visitor's port.
    """

    streamId: int
    hostname: str
    peerHost: str
    peerPort: int


def _mac(key: bytes, *parts: bytes) -> bytes:
    """
    HMAC-SHA256 over the concatenation of C{parts}.

    @param key: The session's data key.
    @param parts: Byte strings, concatenated in order.
    @return: The 32-byte tag.
    """
    return hmac.new(key, b"".join(parts), hashlib.sha256).digest()


def attachProof(key: bytes, nonce: bytes, sessionId: bytes, binding: bytes = b"") -> bytes:
    """
    The tunnel's answer to the relay's attach nonce.

    @param key: The data key of the control session C{sessionId}.
    @param nonce: The relay's nonce for this connection.
    @param sessionId: The control session the data session belongs to.
    @param binding: For a TLS data session, its own exporter value
        (L{portal.wire.control.EXPORTER_DATA_SESSION}), so that the proof is only good on this TLS session;
        empty for a plain one.
    @return: C{sessionId} followed by its MAC, L{ATTACH_LENGTH} bytes.
    """
    return sessionId + _mac(key, b"attach\0", nonce, sessionId, binding)


def checkAttachProof(
    key: bytes, nonce: bytes, sessionId: bytes, tag: bytes, binding: bytes = b""
) -> bool:
    """
    Verify an attach proof in constant time.

    @param key: The data key of the claimed control session.
    @param nonce: The nonce the relay sent on this connection.
    @param sessionId: The claimed control session.
    @param tag: The MAC the tunnel sent.
    @param binding: The TLS data session's exporter value as the relay sees it, or empty.
    @return: Whether the proof is valid.
    """
    return hmac.compare_digest(_mac(key, b"attach\0", nonce, sessionId, binding), tag)


def encodeStreamHeader(key: bytes, nonce: bytes, header: StreamHeader) -> bytes:
    """
    Encode and authenticate a stream header.

    @param key: The data key.
    @param nonce: The nonce of the data session it is sent on.
    @param header: What to send.
    @return: The framed header.
    """
    body = json.dumps(
        {
            "stream": header.streamId,
            "host": header.hostname,
            "peer": [header.peerHost, header.peerPort],
        },
        separators=(",", ":"),
    ).encode("ascii")
    return _LENGTH.pack(len(body)) + body + _mac(key, b"stream\0", nonce, body)


def decodeStreamHeader(key: bytes, nonce: bytes, data: bytes) -> tuple[StreamHeader, int] | None:
    """
    Decode a stream header from the start of C{data}.

    @param key: The data key.
    @param nonce: The nonce of this data session.
    @param data: Bytes received so far after the attach.
    @return: The header and the number of bytes it used, or L{None} when more bytes are needed.
    @raise AttachError: When the header is too long, fails authentication, or is not well formed.
    """
    if len(data) < _LENGTH.size:
        return None
    (length,) = _LENGTH.unpack_from(data)
    if length > MAX_HEADER_LENGTH:
        raise AttachError(f"stream header of {length} bytes exceeds {MAX_HEADER_LENGTH}")
    end = _LENGTH.size + length + MAC_LENGTH
    if len(data) < end:
        return None
    body = data[_LENGTH.size : _LENGTH.size + length]
    tag = data[_LENGTH.size + length : end]
    if not hmac.compare_digest(_mac(key, b"stream\0", nonce, body), tag):
        raise AttachError("stream header failed authentication")
    try:
        fields = json.loads(body)
        peerHost, peerPort = fields["peer"]
        header = StreamHeader(
            streamId=int(fields["stream"]),
            hostname=str(fields["host"]),
            peerHost=str(peerHost),
            peerPort=int(peerPort),
        )
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise AttachError(f"malformed stream header: {e}")
    return header, end
