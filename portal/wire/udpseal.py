"""
Framing and sealing of UDP datagrams between relay and tunnel (DESIGN.md section 7).

UDP travels as UDP: each visitor datagram becomes exactly one sealed datagram between relay and tunnel,
and back. A sealed datagram is a short header, sent in clear but authenticated as associated data,
followed by the ChaCha20-Poly1305 ciphertext of the payload and its 16-byte tag::

    offset  size  field
         0     1  type: version (high 4 bits, L{VERSION}) and kind (low 4 bits, L{Kind})
         1     8  session id: which tunnel session, hence which key (L{SESSION_ID_LENGTH})
         9     4  flow id: unsigned big-endian, one per visitor address
        13     8  packet counter: unsigned big-endian, 0, 1, 2, ... per key and direction
        21     n  ciphertext of the n-byte payload
      21+n    16  Poly1305 tag

L{OVERHEAD} is 37 bytes, so a payload of up to L{MAX_PAYLOAD} (65,470) bytes fits the largest UDP
payload over IPv4, L{MAX_DATAGRAM} (65,507) bytes. Nothing caps datagrams at a path MTU; larger ones
are fragmented by IP.

The AEAD nonce is never sent: both ends build it from the direction and the counter, and each direction
has its own key (the construction shared with raw TCP mode, L{portal.wire.seal}). The
receiver (L{Opener}) keeps a sliding window of recently seen counters (as IPsec does, RFC 4303 section
3.4.3 and RFC 6479), so datagrams reordered within the window are accepted once each, and duplicates or
datagrams older than the window are dropped. Every drop is counted by reason.

The keys come from a secret exported from the TLS control session (L{deriveKeys}); it never crosses a
link. This module is pure: no I/O, no clock.
"""

from __future__ import annotations

import enum
import struct
from typing import ClassVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from portal.wire import seal
from portal.wire.seal import (
    KEY_LENGTH,
    MAX_COUNTER,
    TAG_LENGTH,
    CounterExhausted,
    Direction,
    NonceCounter,
)

__all__ = [
    "KEY_LENGTH",
    "MAX_COUNTER",
    "TAG_LENGTH",
    "CounterExhausted",
    "Direction",
    "deriveKeys",
]

#: Format version, the high 4 bits of the type byte.
VERSION = 1
#: Length of a session id on the wire.
SESSION_ID_LENGTH = 8
#: Largest UDP payload over IPv4: 65,535 - 20 (IP header) - 8 (UDP header).
MAX_DATAGRAM = 65507
#: Largest flow id.
MAX_FLOW_ID = 2**32 - 1
#: Default size of the receiver's replay window, in packets.
REPLAY_WINDOW = 1024

_HEADER = struct.Struct("!B8sIQ")

#: Length of the clear header.
HEADER_LENGTH = _HEADER.size
#: Bytes a sealed datagram adds to its payload: the header and the tag.
OVERHEAD = HEADER_LENGTH + TAG_LENGTH
#: Largest payload whose sealed datagram fits in L{MAX_DATAGRAM} bytes.
MAX_PAYLOAD = MAX_DATAGRAM - OVERHEAD

#: Names the protocol in the keys' labels (L{portal.wire.seal.deriveKeys}).
_PROTOCOL = b"portal-udp-v1"


class Kind(enum.IntEnum):
    """
    What a sealed datagram carries.

    @cvar DATA: One visitor datagram of flow C{flowId}.
    @cvar KEEPALIVE: Nothing the far end forwards; sent to hold NAT mappings open. By convention its
        flow id is 0 and its payload empty.
    @cvar CLOSE: The sender has forgotten flow C{flowId}.
    """

    DATA = 1
    KEEPALIVE = 2
    CLOSE = 3


#: Type byte on the wire -> kind.
_KINDS = {(VERSION << 4) | kind: kind for kind in Kind}
_KIND_VALUES = frozenset(Kind)


class SealError(Exception):
    """
    A datagram was refused by L{Opener.open}; it must be dropped.

    @cvar reason: The key under which L{Opener.dropped} counts refusals of this type.
    """

    reason: ClassVar[str] = "error"


class MalformedDatagram(SealError):
    """
    The datagram is too short to be sealed, or its version or kind is unknown.
    """

    reason = "malformed"


class WrongSession(SealError):
    """
    The datagram names a session id other than the opener's.
    """

    reason = "session"


class ForgedDatagram(SealError):
    """
    The datagram fails authentication: tampered, forged, sealed under another key or for the other
    direction.
    """

    reason = "forged"


class ReplayedDatagram(SealError):
    """
    A datagram with this counter has already been opened.
    """

    reason = "replayed"


class OldDatagram(SealError):
    """
    The datagram's counter is older than the replay window, so it can no longer be told apart from a
    replay.
    """

    reason = "old"


class PayloadTooLarge(ValueError):
    """
    A payload is longer than L{MAX_PAYLOAD}; sealed, it would not fit in one UDP datagram.
    """


def deriveKeys(secret: bytes, sessionId: bytes) -> tuple[bytes, bytes]:
    """
    Derive the two directions' keys of a session with HKDF-SHA256.

    @param secret: At least L{KEY_LENGTH} bytes both ends share and nobody else knows, exported from
        the TLS control session.
    @param sessionId: The session's L{SESSION_ID_LENGTH}-byte id; part of each key's label, so two
        sessions never share a key even if given the same secret.
    @return: The relay-to-tunnel key and the tunnel-to-relay key, L{KEY_LENGTH} bytes each.
    @raise ValueError: When C{secret} is too short or C{sessionId} has the wrong length.
    """
    _checkSessionId(sessionId)
    return seal.deriveKeys(secret, _PROTOCOL, sessionId)


def _checkSessionId(sessionId: bytes) -> None:
    """
    @param sessionId: A would-be session id.
    @raise ValueError: When it is not L{SESSION_ID_LENGTH} bytes.
    """
    if len(sessionId) != SESSION_ID_LENGTH:
        raise ValueError(f"session id must be {SESSION_ID_LENGTH} bytes, not {len(sessionId)}")


class Sealer:
    """
    Seals the datagrams one end sends in one direction of one session.

    @ivar sessionId: The session id written into every header.
    @ivar direction: The direction of the datagrams this sealer makes.
    """

    def __init__(
        self, key: bytes, sessionId: bytes, direction: Direction, *, counter: int = 0
    ) -> None:
        """
        @param key: The L{KEY_LENGTH}-byte key of C{direction}, from L{deriveKeys}.
        @param sessionId: The session's L{SESSION_ID_LENGTH}-byte id.
        @param direction: Which way the sealed datagrams travel.
        @param counter: The first packet counter to use; a fresh key starts at 0.
        @raise ValueError: When the key or session id has the wrong length.
        """
        _checkSessionId(sessionId)
        self._aead = ChaCha20Poly1305(key)
        self.sessionId = sessionId
        self.direction = Direction(direction)
        self._counter = NonceCounter(counter)

    @property
    def counter(self) -> int:
        """
        The packet counter the next datagram will carry, which is the number sealed so far when the
        sealer started at 0.
        """
        return self._counter.value

    def seal(self, kind: Kind, flowId: int, payload: bytes) -> bytes:
        """
        Seal one payload into one datagram, using the next packet counter.

        @param kind: What the datagram carries.
        @param flowId: The flow it belongs to, 0 to L{MAX_FLOW_ID}.
        @param payload: At most L{MAX_PAYLOAD} bytes.
        @return: The datagram, C{len(payload) + }L{OVERHEAD} bytes.
        @raise PayloadTooLarge: When C{payload} is longer than L{MAX_PAYLOAD}.
        @raise CounterExhausted: When every counter has been used; the session needs new keys.
        @raise ValueError: When C{kind} or C{flowId} is out of range.
        """
        if len(payload) > MAX_PAYLOAD:
            raise PayloadTooLarge(
                f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD} bytes, the most a "
                f"{MAX_DATAGRAM}-byte UDP datagram can carry after {OVERHEAD} bytes of overhead"
            )
        if kind not in _KIND_VALUES:
            raise ValueError(f"unknown datagram kind {kind!r}")
        if not 0 <= flowId <= MAX_FLOW_ID:
            raise ValueError(f"flow id {flowId!r} is not between 0 and {MAX_FLOW_ID}")
        counter = self._counter.take()
        header = _HEADER.pack((VERSION << 4) | kind, self.sessionId, flowId, counter)
        return header + self._aead.encrypt(seal.nonce(self.direction, counter), payload, header)


class Opener:
    """
    Authenticates and opens the datagrams one end receives in one direction of one session, refusing
    malformed, foreign, forged, replayed and too old ones.

    @ivar sessionId: The session id every datagram must carry.
    @ivar direction: The direction of the datagrams this opener accepts.
    @ivar window: How many packet counters, up to and including the highest seen, the replay window
        covers.
    @ivar opened: How many datagrams were opened.
    @ivar dropped: How many datagrams were refused, by L{SealError.reason}: C{"malformed"},
        C{"session"}, C{"forged"}, C{"replayed"} and C{"old"}.
    """

    def __init__(
        self, key: bytes, sessionId: bytes, direction: Direction, *, window: int = REPLAY_WINDOW
    ) -> None:
        """
        @param key: The L{KEY_LENGTH}-byte key of C{direction}, from L{deriveKeys}.
        @param sessionId: The session's L{SESSION_ID_LENGTH}-byte id.
        @param direction: Which way the datagrams travel.
        @param window: The size of the replay window, in packets.
        @raise ValueError: When the key or session id has the wrong length or C{window} is not
            positive.
        """
        _checkSessionId(sessionId)
        if window < 1:
            raise ValueError(f"replay window must be at least 1 packet, not {window}")
        self._aead = ChaCha20Poly1305(key)
        self.sessionId = sessionId
        self.direction = Direction(direction)
        self.window = window
        self._mask = (1 << window) - 1
        # The highest counter opened (-1 before the first) and a bitmap of the window below it:
        # bit i is set when counter (highest - i) has been opened.
        self._highest = -1
        self._seen = 0
        self.opened = 0
        self.dropped = {
            error.reason: 0
            for error in (
                MalformedDatagram,
                WrongSession,
                ForgedDatagram,
                ReplayedDatagram,
                OldDatagram,
            )
        }

    def open(self, datagram: bytes) -> tuple[Kind, int, bytes]:
        """
        Authenticate and open one datagram, and remember its counter.

        Checks that need no cryptography come first, so junk, foreign sessions and replays cost little;
        the replay window moves only for datagrams that authenticate.

        @param datagram: A received UDP payload.
        @return: The datagram's kind, flow id and payload.
        @raise SealError: The datagram must be dropped, for the reason its subclass names; the refusal
            has been counted in L{dropped}.
        """
        try:
            return self._open(datagram)
        except SealError as e:
            self.dropped[e.reason] += 1
            raise

    def _open(self, datagram: bytes) -> tuple[Kind, int, bytes]:
        """
        L{open} without the counting.

        @param datagram: A received UDP payload.
        @return: The datagram's kind, flow id and payload.
        @raise SealError: The datagram must be dropped.
        """
        if len(datagram) < OVERHEAD:
            raise MalformedDatagram(
                f"{len(datagram)} bytes is shorter than the {OVERHEAD}-byte minimum"
            )
        typeByte, sessionId, flowId, counter = _HEADER.unpack_from(datagram)
        kind = _KINDS.get(typeByte)
        if kind is None:
            raise MalformedDatagram(f"unknown version or kind 0x{typeByte:02x}")
        if sessionId != self.sessionId:
            raise WrongSession(f"datagram for session {sessionId.hex()}")
        age = self._highest - counter
        if age >= 0:
            if age >= self.window:
                raise OldDatagram(f"counter {counter} is older than the replay window")
            if (self._seen >> age) & 1:
                raise ReplayedDatagram(f"counter {counter} was already opened")
        view = memoryview(datagram)
        try:
            payload = self._aead.decrypt(
                seal.nonce(self.direction, counter), view[HEADER_LENGTH:], view[:HEADER_LENGTH]
            )
        except InvalidTag:
            raise ForgedDatagram(f"counter {counter} failed authentication")
        if age >= 0:
            self._seen |= 1 << age
        else:
            shift = -age
            self._seen = 1 if shift >= self.window else ((self._seen << shift) | 1) & self._mask
            self._highest = counter
        self.opened += 1
        return kind, flowId, payload
