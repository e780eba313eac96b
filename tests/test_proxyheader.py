"""
Tests for L{portal.wire.proxyheader}.

Every header built here is read back with Twisted's own PROXY protocol parsers, through C{feed}
with trailing payload so that the header's end (its CRLF, or version 2's length field) is checked
too. Twisted's version 2 parser writes IPv6 hosts uncompressed (C{0:0:0:0:0:ffff:c000:201}), so
hosts are compared as L{ipaddress} values, not strings.
"""

from __future__ import annotations

import ipaddress
from typing import Literal

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import IAddress
from twisted.protocols.haproxy._info import ProxyInfo
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.trial.unittest import SynchronousTestCase

from portal.wire.proxyheader import V2_SIGNATURE, localHeader, parseVersion, proxyHeader

_PAYLOAD = b"GET / HTTP/1.1\r\n\r\n"

_IP = ipaddress.IPv4Address | ipaddress.IPv6Address


def _address(
    ip: _IP, port: int, transport: Literal["TCP", "UDP"] = "TCP"
) -> IPv4Address | IPv6Address:
    """
    @param ip: An IPv4 or IPv6 address.
    @param port: A port.
    @param transport: C{"TCP"} or C{"UDP"}.
    @return: The Twisted address of the matching class.
    """
    if isinstance(ip, ipaddress.IPv4Address):
        return IPv4Address(transport, str(ip), port)
    return IPv6Address(transport, str(ip), port)


def _feedV1(header: bytes) -> ProxyInfo:
    """
    Read C{header} with Twisted's version 1 parser, followed by a payload.

    @param header: A version 1 header.
    @return: What the parser read; it has also checked that exactly C{header} was consumed.
    """
    info, remaining = V1Parser().feed(header + _PAYLOAD)
    assert info is not None
    assert remaining == _PAYLOAD, remaining
    return info


def _feedV2(header: bytes) -> ProxyInfo:
    """
    Read C{header} with Twisted's version 2 parser, followed by a payload.

    @param header: A version 2 header.
    @return: What the parser read; it has also checked that the length field covers exactly
        C{header}.
    """
    info, remaining = V2Parser().feed(header + _PAYLOAD)
    assert info is not None
    assert remaining == _PAYLOAD, remaining
    return info


class _AddressAssertions(SynchronousTestCase):
    """
    An assertion on addresses read back by Twisted's parsers.
    """

    def assertSameAddress(
        self,
        parsed: IAddress | None,
        expectedClass: type[IPv4Address] | type[IPv6Address],
        transport: str,
        host: str | _IP,
        port: int,
    ) -> None:
        """
        Fail unless C{parsed} is an address of C{expectedClass} for C{transport}, C{host} (compared
        as an IP address, not as text) and C{port}.
        """
        self.assertIsInstance(parsed, expectedClass)
        assert isinstance(parsed, (IPv4Address, IPv6Address))
        self.assertEqual(parsed.type, transport)
        self.assertEqual(ipaddress.ip_address(parsed.host), ipaddress.ip_address(host))
        self.assertEqual(parsed.port, port)


class ParseVersionTests(SynchronousTestCase):
    """
    Tests for L{parseVersion}.
    """

    def test_accepted(self) -> None:
        """
        C{v1}, C{v2}, their upper-case forms and the bare digits name the two versions.
        """
        for text, expected in [
            ("v1", "v1"),
            ("V1", "v1"),
            ("1", "v1"),
            ("v2", "v2"),
            ("V2", "v2"),
            ("2", "v2"),
        ]:
            self.assertEqual(parseVersion(text), expected, text)

    def test_refused(self) -> None:
        """
        Anything else is a L{ValueError} whose message names the text and the accepted versions,
        ready to follow C{--proxy-protocol}.
        """
        e = self.assertRaises(ValueError, parseVersion, "v3")
        self.assertEqual(str(e), "v3: expected v1 or v2")
        for text in ["", "v", "3", "v12", " v1", "v1 ", "version1", "TCP4"]:
            self.assertRaises(ValueError, parseVersion, text)


class V1HeaderTests(_AddressAssertions):
    """
    Tests for version 1 (text) headers.
    """

    def test_specExample(self) -> None:
        """
        The spec's own example line is built byte for byte.
        """
        header = proxyHeader(
            "v1",
            IPv4Address("TCP", "192.168.0.1", 56324),
            IPv4Address("TCP", "192.168.0.11", 443),
        )
        self.assertEqual(header, b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n")

    def test_tcp4(self) -> None:
        """
        An IPv4 pair is a C{TCP4} line that Twisted reads back to the same addresses and ports.
        """
        header = proxyHeader(
            "v1", IPv4Address("TCP", "203.0.113.7", 0), IPv4Address("TCP", "127.0.0.1", 65535)
        )
        self.assertTrue(header.startswith(b"PROXY TCP4 "))
        info = _feedV1(header)
        self.assertSameAddress(info.source, IPv4Address, "TCP", "203.0.113.7", 0)
        self.assertSameAddress(info.destination, IPv4Address, "TCP", "127.0.0.1", 65535)

    def test_tcp6(self) -> None:
        """
        An IPv6 pair is a C{TCP6} line with compressed hexadecimal addresses that Twisted reads
        back to the same addresses and ports.
        """
        header = proxyHeader(
            "v1",
            IPv6Address("TCP", "2001:0DB8:0000:0000:0000:0000:0000:0001", 51000),
            IPv6Address("TCP", "::1", 8080),
        )
        self.assertEqual(header, b"PROXY TCP6 2001:db8::1 ::1 51000 8080\r\n")
        info = _feedV1(header)
        self.assertSameAddress(info.source, IPv6Address, "TCP", "2001:db8::1", 51000)
        self.assertSameAddress(info.destination, IPv6Address, "TCP", "::1", 8080)

    def test_mixedFamilies(self) -> None:
        """
        An IPv4 address paired with an IPv6 one is sent IPv4-mapped in a C{TCP6} line, as
        hexadecimal groups (the spec's IPv6 form), whichever side it is on.
        """
        v4 = IPv4Address("TCP", "192.0.2.1", 1234)
        v6 = IPv6Address("TCP", "2001:db8::1", 443)
        header = proxyHeader("v1", v4, v6)
        self.assertEqual(header, b"PROXY TCP6 ::ffff:c000:201 2001:db8::1 1234 443\r\n")
        info = _feedV1(header)
        self.assertSameAddress(info.source, IPv6Address, "TCP", "::ffff:192.0.2.1", 1234)
        self.assertSameAddress(info.destination, IPv6Address, "TCP", "2001:db8::1", 443)

        header = proxyHeader("v1", v6, v4)
        self.assertEqual(header, b"PROXY TCP6 2001:db8::1 ::ffff:c000:201 443 1234\r\n")

    def test_compression(self) -> None:
        """
        IPv6 addresses are written as RFC 5952 recommends: lower case, no leading zeros, the
        longest run of two or more zero groups as C{::} (the first on a tie), never a lone zero.
        """
        cases = [
            ("::", "::"),
            ("1::", "1::"),
            ("1:0:0:2:0:0:3:4", "1::2:0:0:3:4"),
            ("1:0:0:2:0:0:0:3", "1:0:0:2::3"),
            ("1:0:2:3:4:5:6:7", "1:0:2:3:4:5:6:7"),
            ("ABCD:0DB8:0:0:0:0:0:0001", "abcd:db8::1"),
        ]
        for written, expected in cases:
            header = proxyHeader("v1", IPv6Address("TCP", written, 1), IPv6Address("TCP", "::1", 2))
            self.assertEqual(header, f"PROXY TCP6 {expected} ::1 1 2\r\n".encode(), written)

    def test_zoneDropped(self) -> None:
        """
        An IPv6 zone identifier, which the protocol cannot carry, is left out.
        """
        header = proxyHeader(
            "v1", IPv6Address("TCP", "fe80::1%eth0", 1), IPv6Address("TCP", "fe80::2", 2)
        )
        self.assertEqual(header, b"PROXY TCP6 fe80::1 fe80::2 1 2\r\n")

    def test_longestLine(self) -> None:
        """
        The longest possible C{TCP6} line is the 104 bytes the spec says receivers must accept.
        """
        widest = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
        header = proxyHeader(
            "v1", IPv6Address("TCP", widest, 65535), IPv6Address("TCP", widest, 65535)
        )
        self.assertEqual(len(header), 104)
        self.assertSameAddress(_feedV1(header).source, IPv6Address, "TCP", widest, 65535)

    def test_unknown(self) -> None:
        """
        The header for an unknown visitor is the spec's short C{UNKNOWN} form. (Twisted's version 1
        parser refuses this form, so it is checked byte for byte only.)
        """
        self.assertEqual(localHeader("v1"), b"PROXY UNKNOWN\r\n")
        self.assertEqual(localHeader("1"), b"PROXY UNKNOWN\r\n")

    def test_noUDP(self) -> None:
        """
        Version 1 cannot announce UDP; asking for it is a L{ValueError} pointing to version 2.
        """
        e = self.assertRaises(
            ValueError,
            proxyHeader,
            "v1",
            IPv4Address("UDP", "192.0.2.1", 53),
            IPv4Address("UDP", "127.0.0.1", 53),
            "UDP",
        )
        self.assertIn("v1 cannot carry UDP", str(e))
        self.assertIn("v2", str(e))


class V2HeaderTests(_AddressAssertions):
    """
    Tests for version 2 (binary) headers.
    """

    def test_specLayout(self) -> None:
        """
        A TCP over IPv4 header is, byte for byte, the spec's signature, version 2 and command
        PROXY, family C{0x11}, a length of 12, both addresses and both ports in network order.
        """
        header = proxyHeader(
            "v2",
            IPv4Address("TCP", "192.168.0.1", 56324),
            IPv4Address("TCP", "192.168.0.11", 443),
        )
        expected = bytes.fromhex(
            "0D0A0D0A000D0A515549540A"  # signature
            "21"  # version 2, PROXY
            "11"  # AF_INET, STREAM
            "000C"  # 12 address bytes
            "C0A80001"  # 192.168.0.1
            "C0A8000B"  # 192.168.0.11
            "DC04"  # 56324
            "01BB"  # 443
        )
        self.assertEqual(header, expected)
        self.assertEqual(V2_SIGNATURE, expected[:12])

    def test_families(self) -> None:
        """
        Each address family and transport gets the spec's family-and-protocol byte and address
        length, and Twisted reads the addresses, ports and transport back.
        """
        cases: list[tuple[str, str, Literal["TCP", "UDP"], int, int]] = [
            ("198.51.100.9", "10.0.0.1", "TCP", 0x11, 12),
            ("198.51.100.9", "10.0.0.1", "UDP", 0x12, 12),
            ("2001:db8::9", "fd00::1", "TCP", 0x21, 36),
            ("2001:db8::9", "fd00::1", "UDP", 0x22, 36),
        ]
        for source, destination, transport, familyProtocol, length in cases:
            sourceIP = ipaddress.ip_address(source)
            destinationIP = ipaddress.ip_address(destination)
            header = proxyHeader(
                "v2", _address(sourceIP, 40000), _address(destinationIP, 5353), transport
            )
            self.assertEqual(header[12], 0x21)
            self.assertEqual(header[13], familyProtocol)
            self.assertEqual(int.from_bytes(header[14:16], "big"), length)
            self.assertEqual(len(header), 16 + length)
            info = _feedV2(header)
            expectedClass = IPv4Address if sourceIP.version == 4 else IPv6Address
            self.assertSameAddress(info.source, expectedClass, transport, source, 40000)
            self.assertSameAddress(info.destination, expectedClass, transport, destination, 5353)

    def test_mixedFamilies(self) -> None:
        """
        An IPv4 address paired with an IPv6 one is sent IPv4-mapped in an IPv6 header, whichever
        side it is on.
        """
        v4 = IPv4Address("TCP", "192.0.2.1", 1234)
        v6 = IPv6Address("TCP", "2001:db8::1", 443)
        header = proxyHeader("v2", v4, v6)
        self.assertEqual(header[13], 0x21)
        self.assertEqual(header[16:32], bytes.fromhex("00000000000000000000ffffc0000201"))
        info = _feedV2(header)
        self.assertSameAddress(info.source, IPv6Address, "TCP", "::ffff:192.0.2.1", 1234)
        self.assertSameAddress(info.destination, IPv6Address, "TCP", "2001:db8::1", 443)

        info = _feedV2(proxyHeader("v2", v6, v4, "UDP"))
        self.assertSameAddress(info.source, IPv6Address, "UDP", "2001:db8::1", 443)
        self.assertSameAddress(info.destination, IPv6Address, "UDP", "::ffff:192.0.2.1", 1234)

    def test_local(self) -> None:
        """
        The header for an unknown visitor is the signature, version 2 and command LOCAL, family
        unspecified and no addresses; Twisted reads it as carrying no addresses.
        """
        header = localHeader("v2")
        self.assertEqual(header, V2_SIGNATURE + b"\x20\x00\x00\x00")
        info = _feedV2(header)
        self.assertIsNone(info.source)
        self.assertIsNone(info.destination)
        self.assertEqual(localHeader("2"), header)


class BadInputTests(SynchronousTestCase):
    """
    Malformed input is a L{ValueError} saying what is wrong.
    """

    def test_badAddresses(self) -> None:
        """
        A host that is not an IP literal of its address's family, a port outside 0-65535, or an
        address that is not IPv4 or IPv6 is refused in both versions, naming the culprit.
        """
        good = IPv4Address("TCP", "127.0.0.1", 80)
        cases: list[tuple[object, str]] = [
            (IPv4Address("TCP", "localhost", 80), "host 'localhost' is not an IPv4 address"),
            (IPv4Address("TCP", "::1", 80), "host '::1' is not an IPv4 address"),
            (IPv4Address("TCP", "1.2.3", 80), "host '1.2.3' is not an IPv4 address"),
            (IPv4Address("TCP", "010.0.0.1", 80), "host '010.0.0.1' is not an IPv4 address"),
            (IPv4Address("TCP", "", 80), "host '' is not an IPv4 address"),
            (IPv6Address("TCP", "127.0.0.1", 80), "host '127.0.0.1' is not an IPv6 address"),
            (IPv6Address("TCP", "example.com", 80), "host 'example.com' is not an IPv6 address"),
            (IPv4Address("TCP", "127.0.0.1", -1), "port -1 is not in 0-65535"),
            (IPv4Address("TCP", "127.0.0.1", 65536), "port 65536 is not in 0-65535"),
            (IPv6Address("TCP", "::1", 70000), "port 70000 is not in 0-65535"),
            (UNIXAddress(b"/tmp/socket"), "is not an IPv4 or IPv6 address"),
        ]
        for version in ["v1", "v2"]:
            for bad, message in cases:
                e = self.assertRaises(ValueError, proxyHeader, version, bad, good)
                self.assertTrue(str(e).startswith("source "), str(e))
                self.assertIn(message, str(e))
                e = self.assertRaises(ValueError, proxyHeader, version, good, bad)
                self.assertTrue(str(e).startswith("destination "), str(e))
                self.assertIn(message, str(e))

    def test_badVersion(self) -> None:
        """
        An unknown version is refused by both builders.
        """
        address = IPv4Address("TCP", "127.0.0.1", 80)
        e = self.assertRaises(ValueError, proxyHeader, "v3", address, address)
        self.assertEqual(str(e), "v3: expected v1 or v2")
        self.assertRaises(ValueError, localHeader, "v3")

    def test_badTransport(self) -> None:
        """
        A transport other than TCP or UDP is refused.
        """
        address = IPv4Address("TCP", "127.0.0.1", 80)
        e = self.assertRaises(ValueError, proxyHeader, "v2", address, address, "SCTP")
        self.assertIn("'SCTP'", str(e))


_ports = st.integers(min_value=0, max_value=65535)


class RoundTripPropertyTests(_AddressAssertions):
    """
    Property tests: any pair of addresses and ports survives Twisted's parsers.
    """

    def _expected(self, ip: _IP, other: _IP) -> tuple[type[IPv4Address] | type[IPv6Address], _IP]:
        """
        @param ip: An address sent in a header.
        @param other: The other address in the same header.
        @return: The Twisted address class and address a parser should read back for C{ip}.
        """
        if ip.version == other.version == 4:
            return IPv4Address, ip
        if isinstance(ip, ipaddress.IPv4Address):
            return IPv6Address, ipaddress.IPv6Address(f"::ffff:{ip}")
        return IPv6Address, ip

    @given(st.ip_addresses(), _ports, st.ip_addresses(), _ports)
    @settings(derandomize=True)
    def test_v1(self, source: _IP, sourcePort: int, destination: _IP, destinationPort: int) -> None:
        """
        Version 1 lines are ASCII, at most 104 bytes with IPv6 written without dotted quads, and
        read back by Twisted to the same addresses and ports.
        """
        header = proxyHeader(
            "v1", _address(source, sourcePort), _address(destination, destinationPort)
        )
        self.assertLessEqual(len(header), 104)
        header.decode("ascii")
        if header.startswith(b"PROXY TCP6 "):
            self.assertNotIn(b".", header)
        info = _feedV1(header)
        sourceClass, sourceIP = self._expected(source, destination)
        destinationClass, destinationIP = self._expected(destination, source)
        self.assertSameAddress(info.source, sourceClass, "TCP", sourceIP, sourcePort)
        self.assertSameAddress(
            info.destination, destinationClass, "TCP", destinationIP, destinationPort
        )

    @given(
        st.ip_addresses(),
        _ports,
        st.ip_addresses(),
        _ports,
        st.sampled_from(["TCP", "UDP"]),
    )
    @settings(derandomize=True)
    def test_v2(
        self,
        source: _IP,
        sourcePort: int,
        destination: _IP,
        destinationPort: int,
        transport: Literal["TCP", "UDP"],
    ) -> None:
        """
        Version 2 headers are read back by Twisted to the same addresses, ports and transport,
        with a length field covering exactly the header.
        """
        header = proxyHeader(
            "v2",
            _address(source, sourcePort, transport),
            _address(destination, destinationPort, transport),
            transport,
        )
        info = _feedV2(header)
        sourceClass, sourceIP = self._expected(source, destination)
        destinationClass, destinationIP = self._expected(destination, source)
        self.assertSameAddress(info.source, sourceClass, transport, sourceIP, sourcePort)
        self.assertSameAddress(
            info.destination, destinationClass, transport, destinationIP, destinationPort
        )
