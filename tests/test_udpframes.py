"""
Tests for L{portal.wire.udpframes}: the frames of a UDP member link.
"""

from __future__ import annotations

import struct
from ipaddress import ip_address

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from portal.relay.udp import MAX_PACKET_SIZE
from portal.wire.clienthello import MalformedClientHello, parseClientHello
from portal.wire.udpframes import (
    MAX_BODY,
    MAX_DATAGRAM,
    Frame,
    FrameError,
    FrameReader,
    encodeFrame,
    parseFrame,
)

_ADDRESSES = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
)


class EncodeTests(SynchronousTestCase):
    """
    L{encodeFrame} and L{parseFrame} together.
    """

    def test_roundTrip(self) -> None:
        """
        IPv4 and IPv6 visitors, an empty and the largest datagram, parse back as they were sent.
        """
        for host, port, payload in [
            ("192.0.2.1", 40001, b"hello"),
            ("2001:db8::7", 1, b""),
            ("127.0.0.3", 65535, b"x" * MAX_DATAGRAM),
            ("::ffff:192.0.2.1", 53, b"\0\1"),
        ]:
            data = encodeFrame(host, port, payload)
            self.assertEqual(parseFrame(data), (Frame(host, port, payload), len(data)))

    def test_limitIsTheRelaysPacketSize(self) -> None:
        """
        A frame carries the largest datagram the relay reads from a UDP port, no more.
        """
        self.assertEqual(MAX_DATAGRAM, MAX_PACKET_SIZE)

    @given(_ADDRESSES, st.integers(1, 65535), st.binary(max_size=300), st.data())
    def test_streamRoundTrip(
        self, host: str, port: int, payload: bytes, data: st.DataObject
    ) -> None:
        """
        Frames cut into pieces anywhere come out of a L{FrameReader} whole and in order.
        """
        frames = [Frame(host, port, payload), Frame("10.0.0.1", 7, b"second")]
        stream = b"".join(encodeFrame(f.host, f.port, f.payload) for f in frames)
        cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
        reader = FrameReader()
        got = []
        start = 0
        for cut in [*cuts, len(stream)]:
            got.extend(reader.feed(stream[start:cut]))
            start = cut
        # The address comes back as the socket API writes it (inet_ntop), the same address.
        self.assertEqual(
            [(ip_address(f.host), f.port, f.payload) for f in got],
            [(ip_address(f.host), f.port, f.payload) for f in frames],
        )
        self.assertEqual(reader.buffered, 0)

    def test_neverAClientHello(self) -> None:
        """
        A frame starts with a zero byte (the high byte of its length), so a member that does not
        know UDP links, and reads a link's first frame as a visitor's ClientHello, refuses it at
        once instead of waiting for more.
        """
        for host in ["192.0.2.1", "2001:db8::1"]:
            frame = encodeFrame(host, 9, b"\x16" * MAX_DATAGRAM)
            self.assertEqual(frame[:1], b"\x00")
            self.assertRaises(MalformedClientHello, parseClientHello, frame)

    def test_refusedWhenEncoding(self) -> None:
        """
        A datagram over the limit, a port out of range or a host that is no IP literal is not
        framed.
        """
        for host, port, payload in [
            ("192.0.2.1", 1, b"x" * (MAX_DATAGRAM + 1)),
            ("192.0.2.1", 0, b""),
            ("192.0.2.1", 65536, b""),
            ("example.com", 1, b""),
            ("fe80::1%eth0", 1, b""),
        ]:
            self.assertRaises(FrameError, encodeFrame, host, port, payload)


class ParseTests(SynchronousTestCase):
    """
    L{parseFrame} and L{FrameReader} refusing what is not a frame.
    """

    def test_truncated(self) -> None:
        """
        Every strict prefix of a frame is incomplete, never an error and never a frame.
        """
        for data in [encodeFrame("192.0.2.1", 9, b"payload"), encodeFrame("2001:db8::1", 9, b"")]:
            for cut in range(len(data)):
                self.assertIsNone(parseFrame(data[:cut]))
                self.assertEqual(FrameReader().feed(data[:cut]), [])

    def test_oversizeRefusedFromItsLength(self) -> None:
        """
        A length over the largest frame is refused as soon as its four bytes arrive, before the
        body is buffered; so is an IPv4 frame whose payload is over the limit.
        """
        reader = FrameReader()
        with self.assertRaises(FrameError) as caught:
            reader.feed(struct.pack("!I", MAX_BODY + 1))
        self.assertIn("over", caught.exception.reason)
        self.assertRaises(FrameError, FrameReader().feed, b"\xff\xff\xff\xff")
        body = b"\x04" + bytes(4) + b"\x00\x09" + b"x" * (MAX_DATAGRAM + 1)
        self.assertRaises(FrameError, parseFrame, struct.pack("!I", len(body)) + body)

    def test_badFamily(self) -> None:
        """
        An address family other than 4 or 6 is refused.
        """
        for family in [0, 5, 41, 255]:
            body = bytes([family]) + bytes(16) + b"\x00\x09payload"
            with self.assertRaises(FrameError) as caught:
                parseFrame(struct.pack("!I", len(body)) + body)
            self.assertIn("family", caught.exception.reason)

    def test_tooShortForTheAddress(self) -> None:
        """
        A frame too short for its family's address and port, or for any address, is refused.
        """
        for body in [b"", b"\x04", b"\x04" + bytes(5), b"\x06" + bytes(10)]:
            self.assertRaises(FrameError, parseFrame, struct.pack("!I", len(body)) + body)

    def test_portZero(self) -> None:
        """
        Port 0 is no visitor's port.
        """
        body = b"\x04" + bytes(4) + b"\x00\x00"
        self.assertRaises(FrameError, parseFrame, struct.pack("!I", len(body)) + body)

    def test_garbage(self) -> None:
        """
        A TLS alert (what a member that does not know UDP links answers) and text are refused.
        """
        for data in [b"\x15\x03\x03\x00\x02\x02\x50", b"GET / HTTP/1.1\r\n"]:
            self.assertRaises(FrameError, FrameReader().feed, data)

    def test_framesBeforeAnErrorAreNotReturned(self) -> None:
        """
        Bytes holding good frames then garbage raise: the link is closed on them.
        """
        data = encodeFrame("192.0.2.1", 9, b"ok") + b"\x00\x00\x00\x01\x09"
        self.assertRaises(FrameError, FrameReader().feed, data)
