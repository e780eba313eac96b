"""
Tests for L{portal.wire.streamseal} and the construction it shares with UDP mode, L{portal.wire.seal}.
"""

from __future__ import annotations

import struct

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from portal.wire import seal, udpseal
from portal.wire.seal import KEY_LENGTH, MAX_COUNTER, CounterExhausted, Direction, NonceCounter
from portal.wire.streamseal import (
    HEADER_LENGTH,
    MAX_PAYLOAD,
    OVERHEAD,
    DataAfterEnd,
    ForgedFrame,
    FrameTooLarge,
    MalformedFrame,
    StreamOpener,
    StreamSealer,
    StreamSealError,
    TruncatedStream,
    streamKeys,
)

_SECRET = bytes(range(32))
_NONCE = b"n" * 16
_R2T = Direction.RELAY_TO_TUNNEL
_T2R = Direction.TUNNEL_TO_RELAY

#: Deterministic hypothesis runs: the same examples every time, nothing stored between runs.
_deterministic = settings(derandomize=True, database=None, deadline=None, max_examples=60)


def _pair(nonce: bytes = _NONCE, direction: Direction = _R2T) -> tuple[StreamSealer, StreamOpener]:
    """
    @return: A sealer and the matching opener for one direction of one stream.
    """
    relayToTunnel, tunnelToRelay = streamKeys(_SECRET, nonce)
    key = relayToTunnel if direction == _R2T else tunnelToRelay
    return StreamSealer(key, direction), StreamOpener(key, direction)


def _openAll(opener: StreamOpener, data: bytes, chunks: list[int] | None = None) -> bytes:
    """
    Feed C{data} to C{opener} in pieces (of the given sizes, then the rest), opening every whole
    frame, as a connection would.

    @return: The payload opened.
    """
    buffer = bytearray()
    out = []
    pieces = []
    position = 0
    for size in chunks or []:
        pieces.append(data[position : position + size])
        position += size
    pieces.append(data[position:])
    for piece in pieces:
        buffer += piece
        while True:
            opened = opener.openFrame(buffer)
            if opened is None:
                break
            payload, used = opened
            del buffer[:used]
            out.append(payload)
    return b"".join(out)


def _frames(sealer: StreamSealer, parts: list[bytes]) -> list[bytes]:
    """
    @return: The frames of each part, one list entry per part.
    """
    return [sealer.seal(part) for part in parts]


class SealTests(SynchronousTestCase):
    """
    The shared construction: keys per direction and context, nonces from direction and counter.
    """

    def test_directionsAndContextsDiffer(self) -> None:
        """
        The two directions' keys differ, and so do the keys of two contexts or two protocols under one
        secret.
        """
        a, b = seal.deriveKeys(_SECRET, b"p", b"one")
        self.assertNotEqual(a, b)
        self.assertEqual(len(a), KEY_LENGTH)
        self.assertNotIn(a, seal.deriveKeys(_SECRET, b"p", b"two"))
        self.assertNotIn(a, seal.deriveKeys(_SECRET, b"q", b"one"))

    def test_udpKeysUnchanged(self) -> None:
        """
        UDP mode's keys are still derived with its own protocol label, so relays and tunnels of the
        previous version agree on them.
        """
        sessionId = b"s" * udpseal.SESSION_ID_LENGTH
        self.assertEqual(
            udpseal.deriveKeys(_SECRET, sessionId),
            seal.deriveKeys(_SECRET, b"portal-udp-v1", sessionId),
        )

    def test_shortSecretRefused(self) -> None:
        """
        A secret shorter than a key is refused.
        """
        self.assertRaises(ValueError, seal.deriveKeys, b"x" * 31, b"p", b"c")

    def test_nonce(self) -> None:
        """
        The nonce is the direction byte, three zero bytes and the big-endian counter.
        """
        self.assertEqual(seal.nonce(_T2R, 258), b"\x02\0\0\0" + (258).to_bytes(8, "big"))

    def test_counterOnceEach(self) -> None:
        """
        A counter hands out 0, 1, 2 ... and refuses to go past L{MAX_COUNTER}.
        """
        counter = NonceCounter()
        self.assertEqual([counter.take() for _ in range(3)], [0, 1, 2])
        self.assertEqual(counter.value, 3)
        last = NonceCounter(MAX_COUNTER)
        self.assertEqual(last.take(), MAX_COUNTER)
        self.assertRaises(CounterExhausted, last.take)


class StreamKeysTests(SynchronousTestCase):
    """
    L{streamKeys}: per stream and per direction.
    """

    def test_perStream(self) -> None:
        """
        Two attach nonces give four different keys.
        """
        keys = set(streamKeys(_SECRET, _NONCE) + streamKeys(_SECRET, b"m" * 16))
        self.assertEqual(len(keys), 4)

    def test_nonceLength(self) -> None:
        """
        An attach nonce of the wrong length is refused.
        """
        self.assertRaises(ValueError, streamKeys, _SECRET, b"short")


class StreamSealTests(SynchronousTestCase):
    """
    Sealing and opening one direction of a stream, and everything that must close it.
    """

    def test_roundTrip(self) -> None:
        """
        Frames open to the bytes sealed, then the end frame sets C{ended}.
        """
        sealer, opener = _pair()
        data = sealer.seal(b"hello ") + sealer.seal(b"world") + sealer.end()
        self.assertEqual(_openAll(opener, data), b"hello world")
        self.assertTrue(opener.ended)
        opener.finish()

    def test_frameLayout(self) -> None:
        """
        A frame is a 4-byte header (version 1, kind, 24-bit length), the ciphertext and a 16-byte tag;
        nothing is sealed for no bytes.
        """
        sealer, _ = _pair()
        frame = sealer.seal(b"abc")
        self.assertEqual(len(frame), 3 + OVERHEAD)
        self.assertEqual(frame[:HEADER_LENGTH], b"\x11\x00\x00\x03")
        self.assertEqual(sealer.seal(b""), b"")
        self.assertEqual(sealer.end()[:HEADER_LENGTH], b"\x12\x00\x00\x00")

    def test_incomplete(self) -> None:
        """
        Part of a frame opens nothing and uses nothing.
        """
        sealer, opener = _pair()
        frame = sealer.seal(b"abcdef")
        for cut in range(len(frame)):
            self.assertIsNone(opener.openFrame(frame[:cut]))
        self.assertEqual(opener.openFrame(frame), (b"abcdef", len(frame)))

    def test_largeWriteSplit(self) -> None:
        """
        A write longer than L{MAX_PAYLOAD} becomes several frames, none over the bound.
        """
        sealer, opener = _pair()
        data = bytes(range(256)) * (MAX_PAYLOAD * 2 // 256 + 3)
        sealed = sealer.seal(data)
        self.assertEqual(len(sealed), len(data) + 3 * OVERHEAD)
        buffer = bytearray(sealed)
        sizes = []
        while buffer:
            opened = opener.openFrame(buffer)
            assert opened is not None
            sizes.append(len(opened[0]))
            del buffer[: opened[1]]
        self.assertEqual(sizes, [MAX_PAYLOAD, MAX_PAYLOAD, len(data) - 2 * MAX_PAYLOAD])

    def test_maxPayloadAccepted(self) -> None:
        """
        A frame of exactly L{MAX_PAYLOAD} bytes opens.
        """
        sealer, opener = _pair()
        data = b"m" * MAX_PAYLOAD
        self.assertEqual(_openAll(opener, sealer.seal(data)), data)

    def test_oversizedHeaderRefused(self) -> None:
        """
        A header announcing more than L{MAX_PAYLOAD} bytes is refused as soon as the header is in,
        before the receiver buffers the frame.
        """
        _, opener = _pair()
        header = struct.pack("!I", (0x11 << 24) | (MAX_PAYLOAD + 1))
        self.assertRaises(FrameTooLarge, opener.openFrame, header)

    def test_oversizedFrameRefused(self) -> None:
        """
        A correctly sealed frame with too large a payload (from a sender that ignores the bound) is
        refused.
        """
        key = streamKeys(_SECRET, _NONCE)[0]
        header = struct.pack("!I", (0x11 << 24) | (MAX_PAYLOAD + 1))
        body = AESGCM(key).encrypt(seal.nonce(_R2T, 0), b"x" * (MAX_PAYLOAD + 1), header)
        self.assertRaises(FrameTooLarge, StreamOpener(key, _R2T).openFrame, header + body)

    def test_unknownKindOrVersion(self) -> None:
        """
        A frame type with an unknown version or kind is refused.
        """
        for typeByte in (0x13, 0x21, 0x01, 0xFF):
            _, opener = _pair()
            self.assertRaises(MalformedFrame, opener.openFrame, bytes([typeByte]) + b"\0\0\0")

    def test_endWithPayloadRefused(self) -> None:
        """
        An end frame announcing a payload is refused.
        """
        _, opener = _pair()
        self.assertRaises(MalformedFrame, opener.openFrame, b"\x12\x00\x00\x01")

    def test_everyByteTampered(self) -> None:
        """
        Changing any single byte of a frame (header, ciphertext or tag) closes the stream: at once, or
        (for a length made longer, which leaves the receiver waiting for more) when the connection
        ends before the frame is complete.
        """
        sealer, _ = _pair()
        frame = sealer.seal(b"attack at dawn")
        for position in range(len(frame)):
            _, opener = _pair()
            tampered = bytearray(frame)
            tampered[position] ^= 0x01
            with self.assertRaises(StreamSealError):
                _openAll(opener, bytes(tampered))
                opener.finish()

    def test_replay(self) -> None:
        """
        A frame sent again is refused: the receiver expects the next counter.
        """
        sealer, opener = _pair()
        first = sealer.seal(b"pay 10")
        self.assertEqual(_openAll(opener, first), b"pay 10")
        self.assertRaises(ForgedFrame, _openAll, opener, first)

    def test_reorder(self) -> None:
        """
        Two frames swapped are refused.
        """
        sealer, opener = _pair()
        one, two = _frames(sealer, [b"one", b"two"])
        self.assertRaises(ForgedFrame, _openAll, opener, two + one)

    def test_dropped(self) -> None:
        """
        A frame left out is detected at the next one.
        """
        sealer, opener = _pair()
        one, _, three = _frames(sealer, [b"one", b"two", b"three"])
        self.assertRaises(ForgedFrame, _openAll, opener, one + three)

    def test_truncation(self) -> None:
        """
        A connection that ends before the end frame is a truncation; one that ends after it is not.
        """
        sealer, opener = _pair()
        _openAll(opener, sealer.seal(b"partial"))
        self.assertRaises(TruncatedStream, opener.finish)
        _openAll(opener, sealer.end())
        opener.finish()

    def test_dataAfterEnd(self) -> None:
        """
        Anything after the end frame is refused, even a validly sealed frame.
        """
        sealer, opener = _pair()
        relayToTunnel = streamKeys(_SECRET, _NONCE)[0]
        more = StreamSealer(relayToTunnel, _R2T)
        more.seal(b"x")
        _openAll(opener, sealer.end())
        self.assertRaises(DataAfterEnd, opener.openFrame, more.seal(b"y"))
        self.assertIsNone(opener.openFrame(b""))

    def test_sealAfterEnd(self) -> None:
        """
        A sealer refuses to seal or end again after its end frame.
        """
        sealer, _ = _pair()
        sealer.end()
        self.assertRaises(ValueError, sealer.seal, b"late")
        self.assertRaises(ValueError, sealer.end)

    def test_wrongKey(self) -> None:
        """
        Frames sealed under another stream's key do not open.
        """
        sealer, _ = _pair(nonce=b"m" * 16)
        _, opener = _pair()
        self.assertRaises(ForgedFrame, _openAll, opener, sealer.seal(b"elsewhere"))

    def test_reflected(self) -> None:
        """
        A frame sent back to its sender (the other direction's opener, even under the same key) does
        not open.
        """
        key = streamKeys(_SECRET, _NONCE)[0]
        frame = StreamSealer(key, _R2T).seal(b"echo")
        self.assertRaises(ForgedFrame, _openAll, StreamOpener(key, _T2R), frame)


class StreamSealPropertyTests(SynchronousTestCase):
    """
    Properties of the framing over arbitrary writes, cuts and changes.
    """

    @_deterministic
    @given(
        parts=st.lists(st.binary(max_size=3000), max_size=8),
        chunks=st.lists(st.integers(min_value=0, max_value=500), max_size=10),
    )
    def test_roundTripAnyChunking(self, parts: list[bytes], chunks: list[int]) -> None:
        """
        Whatever the writes and however the bytes are cut on the way, the receiver opens exactly what
        was sent, then the end.
        """
        sealer, opener = _pair()
        data = b"".join(_frames(sealer, parts)) + sealer.end()
        self.assertEqual(_openAll(opener, data, chunks), b"".join(parts))
        self.assertTrue(opener.ended)

    @_deterministic
    @given(
        parts=st.lists(st.binary(min_size=1, max_size=200), min_size=1, max_size=5),
        data=st.data(),
    )
    def test_anyChangeDetected(self, parts: list[bytes], data: st.DataObject) -> None:
        """
        Flipping any bits of any byte of a sealed stream (end frame included) makes the receiver
        refuse it before it has opened the changed frame's payload.
        """
        sealer, opener = _pair()
        sealed = bytearray(b"".join(_frames(sealer, parts)) + sealer.end())
        position = data.draw(st.integers(min_value=0, max_value=len(sealed) - 1))
        sealed[position] ^= data.draw(st.integers(min_value=1, max_value=255))
        with self.assertRaises(StreamSealError):
            _openAll(opener, bytes(sealed))
            opener.finish()

    @_deterministic
    @given(
        parts=st.lists(st.binary(min_size=1, max_size=200), min_size=1, max_size=5),
        data=st.data(),
    )
    def test_anyTruncationDetected(self, parts: list[bytes], data: st.DataObject) -> None:
        """
        A stream cut anywhere before the end of its end frame is never taken as complete: what was
        opened is a prefix of what was sent, and L{StreamOpener.finish} reports the truncation.
        """
        sealer, opener = _pair()
        sealed = b"".join(_frames(sealer, parts)) + sealer.end()
        cut = data.draw(st.integers(min_value=0, max_value=len(sealed) - 1))
        opened = _openAll(opener, sealed[:cut])
        self.assertTrue(b"".join(parts).startswith(opened))
        self.assertRaises(TruncatedStream, opener.finish)

    @_deterministic
    @given(parts=st.lists(st.binary(max_size=100), min_size=2, max_size=6), data=st.data())
    def test_anyReplayOrReorderDetected(self, parts: list[bytes], data: st.DataObject) -> None:
        """
        Any sequence of whole frames other than the one sent (a frame repeated, left out or moved) is
        refused unless it is a prefix of what was sent.
        """
        sealer, opener = _pair()
        frames = _frames(sealer, [p for p in parts if p]) + [sealer.end()]
        order = data.draw(st.lists(st.integers(0, len(frames) - 1), min_size=1, max_size=8))
        if order == list(range(len(order))):
            return
        with self.assertRaises(StreamSealError):
            _openAll(opener, b"".join(frames[i] for i in order))
