"""
Tests for L{portal.forwarding.sources}.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.trial.unittest import SynchronousTestCase

from portal.forwarding.sources import peerSource, sourceKey


class SourceKeyTests(SynchronousTestCase):
    """
    L{sourceKey} counts IPv4 addresses alone and IPv6 addresses by /64.
    """

    def test_ipv4(self) -> None:
        """
        An IPv4 address is its own source.
        """
        self.assertEqual(sourceKey("127.0.0.2"), "127.0.0.2")
        self.assertNotEqual(sourceKey("127.0.0.2"), sourceKey("127.0.0.3"))

    def test_ipv6Slash64(self) -> None:
        """
        IPv6 addresses in one /64 are one source; another /64 is another.
        """
        self.assertEqual(sourceKey("2001:db8:1:2::1"), "2001:db8:1:2::/64")
        self.assertEqual(sourceKey("2001:db8:1:2:ffff:1:2:3"), sourceKey("2001:db8:1:2::1"))
        self.assertNotEqual(sourceKey("2001:db8:1:3::1"), sourceKey("2001:db8:1:2::1"))
        self.assertEqual(sourceKey("fe80::1%eth0"), "fe80::/64")

    def test_ipv4Mapped(self) -> None:
        """
        An IPv4-mapped IPv6 address (a dual-stack socket) counts as its IPv4 address.
        """
        self.assertEqual(sourceKey("::ffff:192.0.2.7"), "192.0.2.7")

    def test_notAnAddress(self) -> None:
        """
        Anything else is its own source.
        """
        self.assertEqual(sourceKey("/run/socket"), "/run/socket")

    def test_peerSource(self) -> None:
        """
        L{peerSource} takes Twisted addresses and address tuples.
        """
        self.assertEqual(peerSource(IPv4Address("TCP", "10.0.0.1", 5)), "10.0.0.1")
        self.assertEqual(peerSource(IPv6Address("TCP", "2001:db8::9", 5)), "2001:db8::/64")
        self.assertEqual(peerSource(("2001:db8::9", 5, 0, 0)), "2001:db8::/64")
        self.assertEqual(peerSource(UNIXAddress(b"/x")), str(UNIXAddress(b"/x")))
