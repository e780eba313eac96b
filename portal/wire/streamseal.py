"""
Raw TCP mode's sealed data sessions (DESIGN.md section 7).

A raw TCP visitor's bytes may be plaintext, so on a data session they travel sealed: after the attach and
the stream header (L{portal.wire.attach}), each direction is a sequence of AES-GCM frames::

    offset  size  field
         0     1  type: version (high 4 bits, L{VERSION}) and kind (low 4 bits, L{Kind})
         1     3  n, the payload length: unsigned big-endian, at most L{MAX_PAYLOAD}
         4     n  ciphertext of the payload
       4+n    16  GCM tag

The 4-byte header is the associated data. Keys are per stream and per direction (L{streamKeys}: HKDF over
a secret exported from the control session and the data session's attach nonce, which the relay picks
fresh for every connection), and the nonce is the direction and the frame's counter
(L{portal.wire.seal}): 0, 1, 2, ... in each direction, never sent. A receiver therefore expects exactly
the next counter: a tampered, forged, replayed, reordered, dropped or foreign frame fails authentication.

A sender ends its direction with an L{END<Kind.END>} frame (empty payload), so the receiver can tell a
half-close (an authenticated end) from a truncation (the connection closed before it, L{TruncatedStream}).
Nothing may follow an end. Every error closes the stream. This module is pure: no I/O, no clock.
"""

from __future__ import annotations

import enum
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from portal.wire import seal
from portal.wire.attach import NONCE_LENGTH
from portal.wire.seal import TAG_LENGTH, Direction, NonceCounter

#: Format version, the high 4 bits of the type byte.
VERSION = 1
#: Largest payload of one frame; a sender splits longer writes, a receiver refuses longer frames.
MAX_PAYLOAD = 256 * 1024
#: Length of a frame's header.
HEADER_LENGTH = 4
#: Bytes a frame adds to its payload: the header and the tag.
OVERHEAD = HEADER_LENGTH + TAG_LENGTH

_HEADER = struct.Struct("!I")
#: Names the protocol in the keys' labels (L{portal.wire.seal.deriveKeys}).
_PROTOCOL = b"portal-tcp-v1"


class Kind(enum.IntEnum):
    """
    What a frame carries.

    @cvar DATA: Payload bytes of the stream.
    @cvar END: The sender has finished this direction (a half-close); its payload is empty.
    """

    DATA = 1
    END = 2


_TYPES = {(VERSION << 4) | kind: kind for kind in Kind}


class StreamSealError(Exception):
    """
    What was received is not the sealed stream the sender sent; the stream must be closed.
    """


class MalformedFrame(StreamSealError):
    """
    A frame's version or kind is unknown, or an end frame carries a payload.
    """


class FrameTooLarge(StreamSealError):
    """
    A frame's header announces more than L{MAX_PAYLOAD} bytes.
    """


class ForgedFrame(StreamSealError):
    """
    A frame fails authentication: tampered, forged, replayed, out of order, after a lost frame, or
    sealed under another key or for the other direction.
    """


class DataAfterEnd(StreamSealError):
    """
    Bytes arrived after the sender's end frame.
    """


class TruncatedStream(StreamSealError):
    """
    The connection ended before the sender's end frame: what arrived may be only part of the stream.
    """


def streamKeys(secret: bytes, attachNonce: bytes) -> tuple[bytes, bytes]:
    """
    Derive the two directions' keys of the stream carried by one data session.

    @param secret: The control session's exported raw TCP secret
        (L{portal.wire.control.EXPORTER_TCP_KEY}).
    @param attachNonce: The data session's attach nonce (L{NONCE_LENGTH} bytes, fresh per
        connection and chosen by the relay), so that every stream has keys of its own.
    @return: The relay-to-tunnel key and the tunnel-to-relay key.
    @raise ValueError: When the secret is too short or the nonce has the wrong length.
    """
    if len(attachNonce) != NONCE_LENGTH:
        raise ValueError(f"attach nonce must be {NONCE_LENGTH} bytes, not {len(attachNonce)}")
    return seal.deriveKeys(secret, _PROTOCOL, attachNonce)


class _OneDirection:
    """
    The state both ends keep for one direction of one stream: its key and its frame counter.
    """

    def __init__(self, key: bytes, direction: Direction) -> None:
        """
        @param key: The direction's key, from L{streamKeys}.
        @param direction: Which way the frames travel.
        """
        self._aead = AESGCM(key)
        self._direction = Direction(direction)
        self._counter = NonceCounter()


class StreamSealer(_OneDirection):
    """
    Seals what one end sends in one direction of one stream.

    @ivar ended: Whether the end frame has been made; nothing can be sealed after it.
    """

    ended = False

    def _frame(self, kind: Kind, payload: bytes | memoryview) -> bytes:
        """
        Seal one frame with the next counter.

        @param kind: What the frame carries.
        @param payload: At most L{MAX_PAYLOAD} bytes.
        @return: The frame.
        """
        header = _HEADER.pack(((VERSION << 4 | kind) << 24) | len(payload))
        counter = self._counter.take()
        return header + self._aead.encrypt(seal.nonce(self._direction, counter), payload, header)

    def seal(self, data: bytes) -> bytes:
        """
        Seal bytes of the stream, in frames of at most L{MAX_PAYLOAD} bytes.

        @param data: The next bytes of this direction.
        @return: The frames; nothing for no bytes.
        @raise ValueError: After L{end}.
        @raise portal.wire.seal.CounterExhausted: When the key has sealed its last frame.
        """
        if self.ended:
            raise ValueError("this direction of the stream has ended")
        if len(data) <= MAX_PAYLOAD:
            return self._frame(Kind.DATA, data) if data else b""
        view = memoryview(data)
        return b"".join(
            self._frame(Kind.DATA, view[start : start + MAX_PAYLOAD])
            for start in range(0, len(data), MAX_PAYLOAD)
        )

    def end(self) -> bytes:
        """
        End this direction: the receiver takes it as a half-close, not a truncation.

        @return: The end frame.
        @raise ValueError: When already ended.
        """
        if self.ended:
            raise ValueError("this direction of the stream has ended")
        self.ended = True
        return self._frame(Kind.END, b"")


class StreamOpener(_OneDirection):
    """
    Authenticates and opens what one end receives in one direction of one stream, frame by frame,
    refusing anything but the exact sequence the sender sealed.

    @ivar ended: Whether the sender's end frame has been opened.
    """

    ended = False

    def openFrame(self, data: bytes | bytearray) -> tuple[bytes, int] | None:
        """
        Open the first frame of C{data}.

        @param data: Received bytes not yet used, starting at a frame boundary.
        @return: The frame's payload (empty for the end frame, after which L{ended} is true) and the
            number of bytes of C{data} it used; L{None} when C{data} does not yet hold a whole frame.
        @raise StreamSealError: When the stream must be closed, for the reason its subclass names.
        """
        if self.ended:
            if data:
                raise DataAfterEnd(f"{len(data)} bytes after the end of the stream")
            return None
        if len(data) < HEADER_LENGTH:
            return None
        (word,) = _HEADER.unpack_from(data)
        kind = _TYPES.get(word >> 24)
        length = word & 0xFFFFFF
        if kind is None:
            raise MalformedFrame(f"unknown frame version or kind 0x{word >> 24:02x}")
        if length > MAX_PAYLOAD:
            raise FrameTooLarge(f"frame of {length} bytes exceeds {MAX_PAYLOAD}")
        if kind is Kind.END and length:
            raise MalformedFrame(f"end frame with a {length}-byte payload")
        end = HEADER_LENGTH + length + TAG_LENGTH
        if len(data) < end:
            return None
        counter = self._counter.value
        view = memoryview(data)
        try:
            payload = self._aead.decrypt(
                seal.nonce(self._direction, counter), view[HEADER_LENGTH:end], view[:HEADER_LENGTH]
            )
        except InvalidTag:
            raise ForgedFrame(f"frame {counter} failed authentication")
        finally:
            view.release()
        self._counter.take()
        if kind is Kind.END:
            self.ended = True
        return payload, end

    def finish(self) -> None:
        """
        The connection ended: check that the sender ended the stream first.

        @raise TruncatedStream: When it did not.
        """
        if not self.ended:
            raise TruncatedStream(
                f"connection closed after {self._counter.value} frames, before the end of the stream"
            )
