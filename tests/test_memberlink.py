"""
Tests for L{portal.wire.memberlink}: member-to-member link headers.
"""

from __future__ import annotations

import os

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from portal.trust.identity import Identity
from portal.wire.memberlink import (
    MAX_HEADER_LENGTH,
    MemberHeader,
    MemberLinkError,
    checkMemberHeader,
    encodeMemberHeader,
    pairKey,
    parseMemberHeader,
)

A = Identity.generate()
B = Identity.generate()
C = Identity.generate()


def header(hostname: str = "blog.portal.test") -> MemberHeader:
    """
    @return: A header as member B sends it.
    """
    return MemberHeader(B.id, B.publicKey, hostname, "203.0.113.7", 40123)


class PairKeyTests(SynchronousTestCase):
    """
    The static ECDH key two members share.
    """

    def test_symmetric(self) -> None:
        """
        Both members compute the same key; a third member computes another.
        """
        self.assertEqual(pairKey(A.privateKey, B.publicKey), pairKey(B.privateKey, A.publicKey))
        self.assertNotEqual(pairKey(A.privateKey, B.publicKey), pairKey(C.privateKey, A.publicKey))

    def test_badPoint(self) -> None:
        """
        A public key that is not a point is refused with L{MemberLinkError}.
        """
        self.assertRaises(MemberLinkError, pairKey, A.privateKey, b"\x02" + b"\xff" * 32)


class HeaderTests(SynchronousTestCase):
    """
    Encoding, parsing and checking a member header.
    """

    def test_roundTrip(self) -> None:
        """
        A encodes what B's header says and accepts B's HMAC for its own nonce.
        """
        nonce = os.urandom(16)
        data = encodeMemberHeader(pairKey(B.privateKey, A.publicKey), A.id, nonce, header())
        parsed = parseMemberHeader(data + b"\x16\x03\x01")
        assert parsed is not None
        got, body, tag, used = parsed
        self.assertEqual(got, header())
        self.assertEqual(used, len(data))
        key = pairKey(A.privateKey, got.fromKey)
        self.assertTrue(checkMemberHeader(key, A.id, nonce, body, tag))

    def test_refusedOnAnotherLink(self) -> None:
        """
        A proof for one nonce (a replay on a new link), for another member, or under a key a
        third member made, does not check.
        """
        nonce = os.urandom(16)
        data = encodeMemberHeader(pairKey(B.privateKey, A.publicKey), A.id, nonce, header())
        parsed = parseMemberHeader(data)
        assert parsed is not None
        got, body, tag, _ = parsed
        key = pairKey(A.privateKey, got.fromKey)
        self.assertFalse(checkMemberHeader(key, A.id, os.urandom(16), body, tag))
        self.assertFalse(checkMemberHeader(key, C.id, nonce, body, tag))
        forged = encodeMemberHeader(pairKey(C.privateKey, A.publicKey), A.id, nonce, header())
        parsedForged = parseMemberHeader(forged)
        assert parsedForged is not None
        self.assertFalse(checkMemberHeader(key, A.id, nonce, parsedForged[1], parsedForged[2]))

    def test_tamperedBody(self) -> None:
        """
        Changing one byte of the header breaks the HMAC (or the parse).
        """
        nonce = os.urandom(16)
        key = pairKey(B.privateKey, A.publicKey)
        data = bytearray(encodeMemberHeader(key, A.id, nonce, header()))
        data[10] ^= 0x01
        try:
            parsed = parseMemberHeader(bytes(data))
        except MemberLinkError:
            return
        assert parsed is not None
        self.assertFalse(checkMemberHeader(key, A.id, nonce, parsed[1], parsed[2]))

    @given(st.integers(min_value=0, max_value=200))
    def test_incomplete(self, cut: int) -> None:
        """
        Any strict prefix of a header parses as incomplete (L{None}).
        """
        data = encodeMemberHeader(b"k" * 32, A.id, b"n" * 16, header())
        self.assertIsNone(parseMemberHeader(data[: min(cut, len(data) - 1)]))

    def test_refusesBadLengthsAndFields(self) -> None:
        """
        A zero or oversized length, non-JSON and wrong field types are refused.
        """
        for data in [
            b"\x00\x00",
            (MAX_HEADER_LENGTH + 1).to_bytes(2, "big"),
            b"\x00\x03abc" + b"t" * 32,
            b"\x00\x02{}" + b"t" * 32,
        ]:
            self.assertRaises(MemberLinkError, parseMemberHeader, data)
        body = b'{"from":"x","key":"00","hostname":"h","peer":["a",true]}'
        data = len(body).to_bytes(2, "big") + body + b"t" * 32
        self.assertRaises(MemberLinkError, parseMemberHeader, data)

    def test_oversizedHeaderRefusedWhenEncoding(self) -> None:
        """
        A header longer than the limit is not encoded.
        """
        self.assertRaises(
            MemberLinkError,
            encodeMemberHeader,
            b"k" * 32,
            A.id,
            b"n" * 16,
            header("x" * MAX_HEADER_LENGTH),
        )


class RawPortHeaderTests(SynchronousTestCase):
    """
    Headers that name a raw TCP lease's port.
    """

    def test_roundTrip(self) -> None:
        """
        A header naming a TCP port parses back with the port; one without has none.
        """
        raw = MemberHeader(B.id, B.publicKey, "db.portal.test", "203.0.113.7", 40123, 9001)
        for sent in [raw, header()]:
            data = encodeMemberHeader(b"k" * 32, A.id, b"n" * 16, sent)
            parsed = parseMemberHeader(data)
            assert parsed is not None
            self.assertEqual(parsed[0], sent)

    def test_badPortRefused(self) -> None:
        """
        A TCP port that is not a port number (0, too large, a boolean, a string) is refused.
        """
        for port in ["0", "65536", "true", '"9000"']:
            body = (
                b'{"from":"x","key":"00","hostname":"h","peer":["a",1],"tcpPort":'
                + port.encode()
                + b"}"
            )
            data = len(body).to_bytes(2, "big") + body + b"t" * 32
            self.assertRaises(MemberLinkError, parseMemberHeader, data)


class UDPPortHeaderTests(SynchronousTestCase):
    """
    Headers that open a UDP link for a lease's port.
    """

    def test_roundTrip(self) -> None:
        """
        A header naming a UDP port parses back with the port, and no TCP port.
        """
        sent = MemberHeader(B.id, B.publicKey, "voice.portal.test", "", 0, udpPort=9002)
        parsed = parseMemberHeader(encodeMemberHeader(b"k" * 32, A.id, b"n" * 16, sent))
        assert parsed is not None
        self.assertEqual(parsed[0], sent)
        self.assertIsNone(parsed[0].tcpPort)

    def test_bothPortsRefused(self) -> None:
        """
        A header naming a TCP and a UDP port is neither encoded nor accepted.
        """
        both = MemberHeader(B.id, B.publicKey, "x.portal.test", "", 0, tcpPort=1, udpPort=2)
        self.assertRaises(MemberLinkError, encodeMemberHeader, b"k" * 32, A.id, b"n" * 16, both)
        body = b'{"from":"x","key":"00","hostname":"h","peer":["a",1],"tcpPort":1,"udpPort":2}'
        data = len(body).to_bytes(2, "big") + body + b"t" * 32
        self.assertRaises(MemberLinkError, parseMemberHeader, data)

    def test_badPortRefused(self) -> None:
        """
        A UDP port that is not a port number is refused.
        """
        for port in ["0", "65536", "false", '"53"', "null"]:
            body = (
                b'{"from":"x","key":"00","hostname":"h","peer":["a",1],"udpPort":'
                + port.encode()
                + b"}"
            )
            data = len(body).to_bytes(2, "big") + body + b"t" * 32
            if port == "null":
                # JSON null is the field's absence.
                parsed = parseMemberHeader(data)
                assert parsed is not None
                self.assertIsNone(parsed[0].udpPort)
                continue
            self.assertRaises(MemberLinkError, parseMemberHeader, data)
