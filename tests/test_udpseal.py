"""
Tests for L{portal.wire.udpseal}.
"""

from __future__ import annotations

import hashlib
import hmac

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from portal.wire.udpseal import (
    HEADER_LENGTH,
    KEY_LENGTH,
    MAX_COUNTER,
    MAX_DATAGRAM,
    MAX_FLOW_ID,
    MAX_PAYLOAD,
    OVERHEAD,
    REPLAY_WINDOW,
    SESSION_ID_LENGTH,
    TAG_LENGTH,
    CounterExhausted,
    Direction,
    ForgedDatagram,
    Kind,
    MalformedDatagram,
    OldDatagram,
    Opener,
    PayloadTooLarge,
    ReplayedDatagram,
    Sealer,
    SealError,
    WrongSession,
    deriveKeys,
)

_KEY = b"k" * KEY_LENGTH
_OTHER_KEY = b"K" * KEY_LENGTH
_SESSION = b"s" * SESSION_ID_LENGTH
_OTHER_SESSION = b"S" * SESSION_ID_LENGTH
_SECRET = bytes(range(32))
_R2T = Direction.RELAY_TO_TUNNEL
_T2R = Direction.TUNNEL_TO_RELAY
_REASONS = {"malformed", "session", "forged", "replayed", "old"}

#: Deterministic hypothesis runs: the same examples every time, nothing stored between runs.
_deterministic = settings(derandomize=True, database=None, deadline=None)


def _pair(
    key: bytes = _KEY,
    sessionId: bytes = _SESSION,
    direction: Direction = _R2T,
    window: int = REPLAY_WINDOW,
) -> tuple[Sealer, Opener]:
    """
    @return: A sealer and an opener of the same key, session and direction.
    """
    return Sealer(key, sessionId, direction), Opener(key, sessionId, direction, window=window)


def _reason(opener: Opener, datagram: bytes) -> str:
    """
    @return: The reason C{opener} refuses C{datagram}.
    @raise AssertionError: When it opens it.
    """
    try:
        opener.open(datagram)
    except SealError as e:
        return e.reason
    raise AssertionError("datagram was accepted")


def _flip(datagram: bytes, index: int, bit: int) -> bytes:
    """
    @return: C{datagram} with one bit flipped.
    """
    changed = bytearray(datagram)
    changed[index] ^= 1 << bit
    return bytes(changed)


def _hkdfSha256(secret: bytes, info: bytes) -> bytes:
    """
    HKDF-SHA256 (RFC 5869) with no salt and 32 bytes of output, written out independently of
    C{cryptography}.
    """
    prk = hmac.new(b"\0" * 32, secret, hashlib.sha256).digest()
    return hmac.new(prk, info + b"\x01", hashlib.sha256).digest()


class LayoutTests(SynchronousTestCase):
    """
    Sizes and the wire layout documented in L{portal.wire.udpseal}.
    """

    def test_sizes(self) -> None:
        """
        The header is 21 bytes, the overhead 37, and the largest payload fills a 65,507-byte UDP
        datagram exactly.
        """
        self.assertEqual(HEADER_LENGTH, 21)
        self.assertEqual(TAG_LENGTH, 16)
        self.assertEqual(OVERHEAD, 37)
        self.assertEqual(MAX_DATAGRAM, 65507)
        self.assertEqual(MAX_PAYLOAD, 65470)

    def test_layout(self) -> None:
        """
        A datagram is the type byte, session id, flow id and counter, then the ChaCha20-Poly1305
        ciphertext under the nonce direction || 3 zero bytes || counter, with the header as associated
        data.
        """
        sealer = Sealer(_KEY, _SESSION, _T2R, counter=0x0102030405060708)
        datagram = sealer.seal(Kind.DATA, 0x0A0B0C0D, b"payload")
        header = b"\x11" + _SESSION + b"\x0a\x0b\x0c\x0d" + b"\x01\x02\x03\x04\x05\x06\x07\x08"
        nonce = b"\x02\x00\x00\x00" + b"\x01\x02\x03\x04\x05\x06\x07\x08"
        self.assertEqual(
            datagram, header + ChaCha20Poly1305(_KEY).encrypt(nonce, b"payload", header)
        )

    def test_typeBytes(self) -> None:
        """
        The type byte is the version, 1, in the high 4 bits and the kind in the low 4 bits.
        """
        sealer = Sealer(_KEY, _SESSION, _R2T)
        self.assertEqual(
            [sealer.seal(kind, 0, b"")[0] for kind in (Kind.DATA, Kind.KEEPALIVE, Kind.CLOSE)],
            [0x11, 0x12, 0x13],
        )


class SealerTests(SynchronousTestCase):
    """
    Tests for L{Sealer}.
    """

    def test_countsUp(self) -> None:
        """
        Successive datagrams carry counters 0, 1, 2, whatever their kind.
        """
        sealer = Sealer(_KEY, _SESSION, _R2T)
        counters = [
            int.from_bytes(sealer.seal(kind, 0, b"x")[13:21], "big")
            for kind in (Kind.DATA, Kind.KEEPALIVE, Kind.DATA)
        ]
        self.assertEqual(counters, [0, 1, 2])
        self.assertEqual(sealer.counter, 3)

    def test_overheadExact(self) -> None:
        """
        A sealed datagram is exactly L{OVERHEAD} bytes longer than its payload.
        """
        sealer = Sealer(_KEY, _SESSION, _R2T)
        for size in (0, 1, 1350, 1351, MAX_PAYLOAD):
            self.assertEqual(len(sealer.seal(Kind.DATA, 1, b"\0" * size)), size + OVERHEAD)

    def test_payloadTooLarge(self) -> None:
        """
        A payload one byte over L{MAX_PAYLOAD} is refused with an error naming the limit, and no counter
        is used up.
        """
        sealer = Sealer(_KEY, _SESSION, _R2T)
        e = self.assertRaises(PayloadTooLarge, sealer.seal, Kind.DATA, 1, b"\0" * (MAX_PAYLOAD + 1))
        self.assertIn(str(MAX_PAYLOAD), str(e))
        self.assertIsInstance(e, ValueError)
        self.assertEqual(sealer.counter, 0)

    def test_counterExhausted(self) -> None:
        """
        The last counter, 2**64 - 1, is used and opens; after it the sealer refuses to seal.
        """
        sealer = Sealer(_KEY, _SESSION, _R2T, counter=MAX_COUNTER)
        opener = Opener(_KEY, _SESSION, _R2T)
        self.assertEqual(opener.open(sealer.seal(Kind.DATA, 1, b"last")), (Kind.DATA, 1, b"last"))
        self.assertRaises(CounterExhausted, sealer.seal, Kind.DATA, 1, b"more")
        self.assertRaises(CounterExhausted, sealer.seal, Kind.KEEPALIVE, 0, b"")

    def test_flowIdRange(self) -> None:
        """
        Flow ids from 0 to 2**32 - 1 are sealed; others are refused without using a counter.
        """
        sealer, opener = _pair()
        for flowId in (0, MAX_FLOW_ID):
            self.assertEqual(opener.open(sealer.seal(Kind.DATA, flowId, b"x"))[1], flowId)
        for flowId in (-1, MAX_FLOW_ID + 1):
            self.assertRaises(ValueError, sealer.seal, Kind.DATA, flowId, b"x")
        self.assertEqual(sealer.counter, 2)

    def test_unknownKind(self) -> None:
        """
        A kind outside L{Kind} is refused.
        """
        sealer = Sealer(_KEY, _SESSION, _R2T)
        self.assertRaises(ValueError, sealer.seal, 0, 1, b"x")
        self.assertRaises(ValueError, sealer.seal, 4, 1, b"x")
        self.assertEqual(sealer.counter, 0)

    def test_badArguments(self) -> None:
        """
        A key that is not 32 bytes or a session id that is not 8 bytes is refused by both sealer and
        opener; so is an empty replay window.
        """
        for cls in (Sealer, Opener):
            self.assertRaises(ValueError, cls, b"k" * 31, _SESSION, _R2T)
            self.assertRaises(ValueError, cls, _KEY, b"s" * 7, _R2T)
            self.assertRaises(ValueError, cls, _KEY, b"s" * 16, _R2T)
        self.assertRaises(ValueError, Opener, _KEY, _SESSION, _R2T, window=0)


class RoundTripTests(SynchronousTestCase):
    """
    What one end seals, the other opens.
    """

    def test_kindsAndSizes(self) -> None:
        """
        DATA, KEEPALIVE and CLOSE datagrams with empty, small, 1,351-byte and maximum-size payloads
        open to what was sealed; the largest fills a 65,507-byte datagram.
        """
        sealer, opener = _pair()
        sizes = (0, 1, 1351, MAX_PAYLOAD)
        for kind in Kind:
            for size in sizes:
                payload = bytes(i % 251 for i in range(size))
                datagram = sealer.seal(kind, 7, payload)
                if size == MAX_PAYLOAD:
                    self.assertEqual(len(datagram), MAX_DATAGRAM)
                self.assertEqual(opener.open(datagram), (kind, 7, payload))
        self.assertEqual(opener.opened, len(Kind) * len(sizes))
        self.assertEqual(opener.dropped, dict.fromkeys(_REASONS, 0))

    def test_bothDirections(self) -> None:
        """
        With keys from L{deriveKeys}, the relay's sealer pairs with the tunnel's opener and the
        tunnel's sealer with the relay's opener.
        """
        relayToTunnel, tunnelToRelay = deriveKeys(_SECRET, _SESSION)
        relaySealer = Sealer(relayToTunnel, _SESSION, _R2T)
        tunnelOpener = Opener(relayToTunnel, _SESSION, _R2T)
        tunnelSealer = Sealer(tunnelToRelay, _SESSION, _T2R)
        relayOpener = Opener(tunnelToRelay, _SESSION, _T2R)
        self.assertEqual(
            tunnelOpener.open(relaySealer.seal(Kind.DATA, 3, b"request")),
            (Kind.DATA, 3, b"request"),
        )
        self.assertEqual(
            relayOpener.open(tunnelSealer.seal(Kind.DATA, 3, b"response")),
            (Kind.DATA, 3, b"response"),
        )
        self.assertEqual(
            relayOpener.open(tunnelSealer.seal(Kind.KEEPALIVE, 0, b"")), (Kind.KEEPALIVE, 0, b"")
        )


class RefusalTests(SynchronousTestCase):
    """
    L{Opener.open} refuses and counts malformed, foreign, forged, replayed and too old datagrams.
    """

    def test_droppedStartsAtZero(self) -> None:
        """
        A new opener has counted nothing, under each of the five reasons.
        """
        opener = Opener(_KEY, _SESSION, _R2T)
        self.assertEqual(opener.dropped, dict.fromkeys(_REASONS, 0))
        self.assertEqual(opener.opened, 0)

    def test_tooShort(self) -> None:
        """
        Anything shorter than the header and tag is malformed.
        """
        sealer, opener = _pair()
        datagram = sealer.seal(Kind.DATA, 1, b"")
        for length in range(OVERHEAD):
            self.assertRaises(MalformedDatagram, opener.open, datagram[:length])
        self.assertEqual(opener.dropped["malformed"], OVERHEAD)
        self.assertEqual(opener.open(datagram), (Kind.DATA, 1, b""))

    def test_unknownVersionOrKind(self) -> None:
        """
        A type byte with another version or an unknown kind is malformed.
        """
        sealer, opener = _pair()
        datagram = sealer.seal(Kind.DATA, 1, b"x")
        for typeByte in (0x00, 0x01, 0x10, 0x14, 0x21, 0xFF):
            self.assertRaises(MalformedDatagram, opener.open, bytes([typeByte]) + datagram[1:])
        self.assertEqual(opener.dropped["malformed"], 6)

    def test_tamperEveryBit(self) -> None:
        """
        Flipping any one bit of a datagram makes it refused. A changed session id is counted as a
        foreign session and a changed version, or a kind no longer known, as malformed; every other
        change (kind, flow id, counter, ciphertext, tag) as forged. The untouched datagram still opens.
        """
        sealer, opener = _pair()
        datagram = sealer.seal(Kind.DATA, 0x01020304, b"some payload")
        expected = dict.fromkeys(_REASONS, 0)
        for index in range(len(datagram)):
            for bit in range(8):
                changed = _flip(datagram, index, bit)
                if index == 0:
                    reason = "forged" if changed[0] in (0x12, 0x13) else "malformed"
                elif index <= SESSION_ID_LENGTH:
                    reason = "session"
                else:
                    reason = "forged"
                self.assertEqual((index, bit, _reason(opener, changed)), (index, bit, reason))
                expected[reason] += 1
        self.assertEqual(opener.dropped, expected)
        self.assertEqual(expected["forged"], 1 + 8 * (len(datagram) - 1 - SESSION_ID_LENGTH))
        self.assertEqual(opener.open(datagram), (Kind.DATA, 0x01020304, b"some payload"))

    def test_truncatedOrExtended(self) -> None:
        """
        A datagram with its last byte cut off, or a byte added, is forged.
        """
        sealer, opener = _pair()
        datagram = sealer.seal(Kind.DATA, 1, b"payload")
        self.assertRaises(ForgedDatagram, opener.open, datagram[:-1])
        self.assertRaises(ForgedDatagram, opener.open, datagram + b"\0")
        self.assertEqual(opener.dropped["forged"], 2)

    def test_wrongKey(self) -> None:
        """
        A datagram sealed under another key is forged.
        """
        sealer = Sealer(_OTHER_KEY, _SESSION, _R2T)
        opener = Opener(_KEY, _SESSION, _R2T)
        self.assertRaises(ForgedDatagram, opener.open, sealer.seal(Kind.DATA, 1, b"x"))
        self.assertEqual(opener.dropped["forged"], 1)

    def test_wrongSession(self) -> None:
        """
        A datagram naming another session id is refused as foreign before any decryption, even under
        the right key.
        """
        sealer = Sealer(_KEY, _OTHER_SESSION, _R2T)
        opener = Opener(_KEY, _SESSION, _R2T)
        self.assertRaises(WrongSession, opener.open, sealer.seal(Kind.DATA, 1, b"x"))
        self.assertEqual(opener.dropped["session"], 1)

    def test_wrongDirectionSameKey(self) -> None:
        """
        Under one key, a datagram sealed for relay to tunnel does not open as tunnel to relay, and the
        other way round: the direction is part of the nonce.
        """
        for sent, received in ((_R2T, _T2R), (_T2R, _R2T)):
            datagram = Sealer(_KEY, _SESSION, sent).seal(Kind.DATA, 1, b"x")
            opener = Opener(_KEY, _SESSION, received)
            self.assertRaises(ForgedDatagram, opener.open, datagram)
            self.assertEqual(Opener(_KEY, _SESSION, sent).open(datagram), (Kind.DATA, 1, b"x"))

    def test_reflected(self) -> None:
        """
        With keys from L{deriveKeys}, a datagram the relay sealed for the tunnel and that comes back to
        the relay is forged.
        """
        relayToTunnel, tunnelToRelay = deriveKeys(_SECRET, _SESSION)
        datagram = Sealer(relayToTunnel, _SESSION, _R2T).seal(Kind.DATA, 1, b"x")
        relayOpener = Opener(tunnelToRelay, _SESSION, _T2R)
        self.assertRaises(ForgedDatagram, relayOpener.open, datagram)

    def test_replay(self) -> None:
        """
        The same datagram opens once; every later copy is a replay, also after newer datagrams.
        """
        sealer, opener = _pair()
        first = sealer.seal(Kind.DATA, 1, b"first")
        self.assertEqual(opener.open(first), (Kind.DATA, 1, b"first"))
        self.assertRaises(ReplayedDatagram, opener.open, first)
        opener.open(sealer.seal(Kind.DATA, 1, b"second"))
        self.assertRaises(ReplayedDatagram, opener.open, first)
        self.assertEqual(opener.dropped["replayed"], 2)
        self.assertEqual(opener.opened, 2)

    def test_replayedKeepalive(self) -> None:
        """
        Keepalives are protected from replay like data.
        """
        sealer, opener = _pair()
        keepalive = sealer.seal(Kind.KEEPALIVE, 0, b"")
        opener.open(keepalive)
        self.assertRaises(ReplayedDatagram, opener.open, keepalive)

    def test_outOfOrderWithinWindow(self) -> None:
        """
        Datagrams delivered in reverse order across the whole window each open once, and each is a
        replay the second time.
        """
        sealer, opener = _pair()
        datagrams = [sealer.seal(Kind.DATA, i, b"%d" % i) for i in range(REPLAY_WINDOW)]
        for i in reversed(range(REPLAY_WINDOW)):
            self.assertEqual(opener.open(datagrams[i]), (Kind.DATA, i, b"%d" % i))
        for datagram in datagrams:
            self.assertRaises(ReplayedDatagram, opener.open, datagram)
        self.assertEqual(opener.opened, REPLAY_WINDOW)
        self.assertEqual(opener.dropped["replayed"], REPLAY_WINDOW)

    def test_olderThanWindow(self) -> None:
        """
        Once counter 1024 has opened, counter 0 is older than the 1024-packet window and refused, while
        counter 1 is the oldest still accepted.
        """
        sealer, opener = _pair()
        datagrams = [sealer.seal(Kind.DATA, 1, b"") for _ in range(REPLAY_WINDOW + 1)]
        opener.open(datagrams[REPLAY_WINDOW])
        self.assertRaises(OldDatagram, opener.open, datagrams[0])
        self.assertEqual(opener.open(datagrams[1]), (Kind.DATA, 1, b""))
        self.assertEqual(opener.dropped["old"], 1)

    def test_farJump(self) -> None:
        """
        After a jump of far more than the window (counter 2**63), everything before the window is too
        old, and the window still catches replays.
        """
        opener = Opener(_KEY, _SESSION, _R2T)
        opener.open(Sealer(_KEY, _SESSION, _R2T).seal(Kind.DATA, 1, b""))
        far = Sealer(_KEY, _SESSION, _R2T, counter=2**63).seal(Kind.DATA, 1, b"")
        opener.open(far)
        self.assertRaises(
            OldDatagram, opener.open, Sealer(_KEY, _SESSION, _R2T).seal(Kind.DATA, 1, b"")
        )
        self.assertRaises(ReplayedDatagram, opener.open, far)
        justInside = Sealer(_KEY, _SESSION, _R2T, counter=2**63 - REPLAY_WINDOW + 1)
        self.assertEqual(opener.open(justInside.seal(Kind.DATA, 2, b"")), (Kind.DATA, 2, b""))

    def test_forgeryDoesNotMoveWindow(self) -> None:
        """
        A forged datagram with a counter far ahead does not move the window: older genuine datagrams
        still open afterwards.
        """
        sealer, opener = _pair()
        genuine = sealer.seal(Kind.DATA, 1, b"genuine")
        ahead = Sealer(_KEY, _SESSION, _R2T, counter=10 * REPLAY_WINDOW).seal(Kind.DATA, 1, b"x")
        forged = ahead[:-1] + bytes([ahead[-1] ^ 1])
        self.assertRaises(ForgedDatagram, opener.open, forged)
        self.assertEqual(opener.open(genuine), (Kind.DATA, 1, b"genuine"))

    def test_forgeryDoesNotMarkSeen(self) -> None:
        """
        A forged datagram carrying a counter inside the window does not mark it seen: the genuine
        datagram with that counter still opens.
        """
        sealer, opener = _pair()
        first, second = sealer.seal(Kind.DATA, 1, b"a"), sealer.seal(Kind.DATA, 1, b"b")
        opener.open(second)
        self.assertRaises(ForgedDatagram, opener.open, _flip(first, len(first) - 1, 0))
        self.assertEqual(opener.open(first), (Kind.DATA, 1, b"a"))


class DeriveKeysTests(SynchronousTestCase):
    """
    Tests for L{deriveKeys}.
    """

    def test_knownAnswer(self) -> None:
        """
        The keys are HKDF-SHA256 with no salt, 32 bytes, and info the direction's label followed by the
        session id; recomputed here from RFC 5869 without C{cryptography}.
        """
        self.assertEqual(
            deriveKeys(_SECRET, _SESSION),
            (
                _hkdfSha256(_SECRET, b"portal-udp-v1 relay->tunnel key\0" + _SESSION),
                _hkdfSha256(_SECRET, b"portal-udp-v1 tunnel->relay key\0" + _SESSION),
            ),
        )

    def test_distinct(self) -> None:
        """
        The two directions get different 32-byte keys, and another session id or another secret gives
        other keys; the same inputs give the same keys.
        """
        relayToTunnel, tunnelToRelay = deriveKeys(_SECRET, _SESSION)
        self.assertEqual(len(relayToTunnel), KEY_LENGTH)
        self.assertEqual(len(tunnelToRelay), KEY_LENGTH)
        self.assertNotEqual(relayToTunnel, tunnelToRelay)
        self.assertEqual(deriveKeys(_SECRET, _SESSION), (relayToTunnel, tunnelToRelay))
        otherSession = deriveKeys(_SECRET, _OTHER_SESSION)
        otherSecret = deriveKeys(bytes(32), _SESSION)
        keys = {relayToTunnel, tunnelToRelay, *otherSession, *otherSecret}
        self.assertEqual(len(keys), 6)

    def test_badArguments(self) -> None:
        """
        A secret shorter than 32 bytes or a session id that is not 8 bytes is refused.
        """
        self.assertRaises(ValueError, deriveKeys, b"\0" * 31, _SESSION)
        self.assertRaises(ValueError, deriveKeys, _SECRET, b"s" * 16)


_kinds = st.sampled_from(list(Kind))
_flowIds = st.integers(0, MAX_FLOW_ID)
_messages = st.lists(
    st.tuples(_kinds, _flowIds, st.binary(max_size=300)), min_size=1, max_size=REPLAY_WINDOW
)


class PropertyTests(SynchronousTestCase):
    """
    Properties of sealing and opening over random payloads, flow ids and delivery orders.
    """

    @given(_messages.flatmap(lambda m: st.tuples(st.just(m), st.permutations(range(len(m))))))
    @_deterministic
    def test_permutedDelivery(self, case: tuple[list[tuple[Kind, int, bytes]], list[int]]) -> None:
        """
        Up to a window of datagrams delivered in any order each open once to what was sealed; a second
        delivery of each is a replay.
        """
        messages, order = case
        sealer, opener = _pair()
        datagrams = [sealer.seal(*message) for message in messages]
        for i in order:
            self.assertEqual(opener.open(datagrams[i]), messages[i])
        for i in order:
            self.assertRaises(ReplayedDatagram, opener.open, datagrams[i])
        self.assertEqual(opener.opened, len(messages))
        self.assertEqual(opener.dropped["replayed"], len(messages))

    @given(
        st.integers(1, 16),
        st.integers(1, 48).flatmap(lambda n: st.lists(st.integers(0, n - 1), max_size=100)),
    )
    @_deterministic
    def test_windowModel(self, window: int, deliveries: list[int]) -> None:
        """
        For any window size and any delivery sequence, with repeats, of counters, the opener agrees
        with a model: a counter opens when it has not opened before and is within C{window} of the
        highest opened; otherwise it is a replay or too old.
        """
        sealer, opener = _pair(window=window)
        datagrams = [
            sealer.seal(Kind.DATA, i, b"%d" % i) for i in range(max(deliveries, default=0) + 1)
        ]
        seen: set[int] = set()
        highest = -1
        for counter in deliveries:
            if counter <= highest - window:
                self.assertRaises(OldDatagram, opener.open, datagrams[counter])
            elif counter in seen:
                self.assertRaises(ReplayedDatagram, opener.open, datagrams[counter])
            else:
                self.assertEqual(
                    opener.open(datagrams[counter]), (Kind.DATA, counter, b"%d" % counter)
                )
                seen.add(counter)
                highest = max(highest, counter)
        self.assertEqual(opener.opened, len(seen))
        self.assertEqual(
            opener.opened + opener.dropped["replayed"] + opener.dropped["old"], len(deliveries)
        )

    @given(st.binary(max_size=200))
    @_deterministic
    def test_junk(self, datagram: bytes) -> None:
        """
        Random bytes never open and never raise anything but L{SealError}.
        """
        opener = Opener(_KEY, _SESSION, _R2T)
        self.assertRaises(SealError, opener.open, datagram)
        self.assertEqual(sum(opener.dropped.values()), 1)

    @given(_kinds, _flowIds, st.binary(max_size=2000), st.integers(0, 2**64 - 1))
    @_deterministic
    def test_roundTripAnyCounter(
        self, kind: Kind, flowId: int, payload: bytes, counter: int
    ) -> None:
        """
        Any payload, flow id and kind, sealed with any counter, opens to itself in both directions.
        """
        for direction in Direction:
            datagram = Sealer(_KEY, _SESSION, direction, counter=counter).seal(
                kind, flowId, payload
            )
            self.assertEqual(len(datagram), len(payload) + OVERHEAD)
            opener = Opener(_KEY, _SESSION, direction)
            self.assertEqual(opener.open(datagram), (kind, flowId, payload))
