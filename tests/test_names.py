"""
Tests for L{portal.trust.names}.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from portal.trust.names import (
    InvalidName,
    leaseHostname,
    leaseLabel,
    normaliseHostname,
    stableLabel,
    validateLabel,
)


class ValidateLabelTests(SynchronousTestCase):
    """
    Tests for L{validateLabel}.
    """

    def test_valid(self) -> None:
        """
        Letters, digits and inner hyphens up to 63 characters are accepted and lowercased.
        """
        for label, expected in [
            ("a", "a"),
            ("myapp", "myapp"),
            ("My-App", "my-app"),
            ("123", "123"),
            ("a1-b2", "a1-b2"),
            ("xn--bcher-kva", "xn--bcher-kva"),
            ("x" * 63, "x" * 63),
        ]:
            self.assertEqual(validateLabel(label), expected)

    def test_invalid(self) -> None:
        """
        Empty, too long, hyphen-edged labels and labels with other characters are refused.
        """
        for label in [
            "",
            "x" * 64,
            "-a",
            "a-",
            "-",
            "foo_bar",
            "foo.bar",
            "foo bar",
            "caf\u00e9",
            "\u212a",  # Kelvin sign, which Unicode lowercases to "k"
            "a\n",
        ]:
            self.assertRaises(InvalidName, validateLabel, label)

    def test_message(self) -> None:
        """
        The error names the label and says it is not a DNS label, and why.
        """
        error = self.assertRaises(InvalidName, validateLabel, "Foo_bar")
        self.assertTrue(str(error).startswith("lease name 'Foo_bar' is not a DNS label: "))
        self.assertIsInstance(error, ValueError)

    def test_notAString(self) -> None:
        """
        A value that is not a string is refused with L{InvalidName}.
        """
        self.assertRaises(InvalidName, validateLabel, 5)

    @given(st.from_regex(r"\A[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z"))
    def test_validProperty(self, label: str) -> None:
        """
        Every string matching the DNS label grammar is accepted and returned lowercased.
        """
        self.assertEqual(validateLabel(label), label.lower())


class StableLabelTests(SynchronousTestCase):
    """
    Tests for L{stableLabel}.
    """

    def test_known(self) -> None:
        """
        The label is the first 16 lowercase base32 characters of the SHA-256 of id, newline, target.
        """
        self.assertEqual(stableLabel("abc", "8000"), "6iaj5cfidfn7igfd")

    def test_dependsOnBoth(self) -> None:
        """
        Changing the identity or the target changes the label.
        """
        self.assertNotEqual(stableLabel("abc", "8000"), stableLabel("abd", "8000"))
        self.assertNotEqual(stableLabel("abc", "8000"), stableLabel("abc", "8001"))

    def test_unambiguous(self) -> None:
        """
        Moving characters between identity and target changes the label.
        """
        self.assertNotEqual(stableLabel("ab", "c8000"), stableLabel("abc", "8000"))

    @given(st.text(), st.text())
    def test_alwaysValidAndDeterministic(self, identityId: str, target: str) -> None:
        """
        For any identity and target the label is a valid 16-character label, the same every time.
        """
        label = stableLabel(identityId, target)
        self.assertEqual(len(label), 16)
        self.assertEqual(validateLabel(label), label)
        self.assertEqual(stableLabel(identityId, target), label)


class HostnameTests(SynchronousTestCase):
    """
    Tests for L{normaliseHostname}, L{leaseLabel} and L{leaseHostname}.
    """

    def test_normalise(self) -> None:
        """
        Hostnames are lowercased and lose one trailing dot.
        """
        self.assertEqual(normaliseHostname("Foo.Example.COM."), "foo.example.com")
        self.assertEqual(normaliseHostname("foo.example.com"), "foo.example.com")

    def test_leaseLabel(self) -> None:
        """
        A hostname of one label under the tunnel domain gives that label.
        """
        self.assertEqual(leaseLabel("myapp.localhost", "localhost"), "myapp")

    def test_leaseLabelTrailingDot(self) -> None:
        """
        A fully qualified hostname with a trailing dot gives the same label, as does a domain with one.
        """
        self.assertEqual(leaseLabel("myapp.localhost.", "localhost"), "myapp")
        self.assertEqual(leaseLabel("myapp.localhost", "localhost."), "myapp")

    def test_leaseLabelCase(self) -> None:
        """
        Hostname and domain are compared case-insensitively and the label is lowercased.
        """
        self.assertEqual(leaseLabel("MyApp.Tunnel.Example.COM", "tunnel.example.com"), "myapp")
        self.assertEqual(leaseLabel("myapp.tunnel.example.com", "TUNNEL.example.com"), "myapp")

    def test_leaseLabelNested(self) -> None:
        """
        A hostname with more than one label under the tunnel domain gives C{None}.
        """
        self.assertIsNone(leaseLabel("a.myapp.localhost", "localhost"))

    def test_leaseLabelOtherDomain(self) -> None:
        """
        Hostnames outside the tunnel domain, or merely ending with the same characters, give C{None}.
        """
        self.assertIsNone(leaseLabel("myapp.example.com", "localhost"))
        self.assertIsNone(leaseLabel("myapplocalhost", "localhost"))
        self.assertIsNone(leaseLabel("localhost", "localhost"))
        self.assertIsNone(leaseLabel(".localhost", "localhost"))

    def test_leaseLabelInvalid(self) -> None:
        """
        A hostname whose first label is not a valid lease name gives C{None}.
        """
        self.assertIsNone(leaseLabel("my_app.localhost", "localhost"))
        self.assertIsNone(leaseLabel("-x.localhost", "localhost"))

    def test_leaseHostname(self) -> None:
        """
        The lease hostname is the lowercased label under the normalised domain.
        """
        self.assertEqual(leaseHostname("MyApp", "Localhost."), "myapp.localhost")

    def test_leaseHostnameInvalid(self) -> None:
        """
        An invalid label cannot be made into a hostname.
        """
        self.assertRaises(InvalidName, leaseHostname, "a.b", "localhost")

    @given(st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z"))
    def test_roundTrip(self, label: str) -> None:
        """
        L{leaseLabel} recovers every valid label from its L{leaseHostname}.
        """
        self.assertEqual(leaseLabel(leaseHostname(label, "localhost"), "localhost"), label)
