"""
Tests for L{portal.gateway.pairing}: pairing codes and the limit on wrong attempts, with a fake
clock.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from portal.gateway.pairing import (
    ATTEMPT_WINDOW,
    ATTEMPTS_PER_ADDRESS,
    ATTEMPTS_TOTAL,
    CODE_ALPHABET,
    CODE_TTL,
    AttemptLimiter,
    PairingCodes,
    TooManyAttempts,
    WrongCode,
    addressKey,
    normalizeCode,
)


class NormalizeCodeTests(SynchronousTestCase):
    """
    Tests for L{normalizeCode} and L{addressKey}.
    """

    def test_typedForms(self) -> None:
        """
        Case, the dash, spaces and the look-alike letters I, L and O do not matter.
        """
        for typed in ["abcd-1234", "ABCD1234", " abcd 1234 ", "ABCD-I234", "abcd-l234"]:
            self.assertEqual(normalizeCode(typed), "ABCD1234")
        self.assertEqual(normalizeCode("o0o0-0000"), "00000000")

    def test_addressKey(self) -> None:
        """
        IPv4 visitors are counted per address, IPv6 ones per /64, IPv4-mapped ones as IPv4.
        """
        self.assertEqual(addressKey("192.0.2.1"), "192.0.2.1")
        self.assertEqual(addressKey("2001:db8::1"), "2001:db8::/64")
        self.assertEqual(addressKey("2001:db8::ffff:1"), addressKey("2001:db8::2"))
        self.assertNotEqual(addressKey("2001:db8:0:1::1"), addressKey("2001:db8::1"))
        self.assertEqual(addressKey("::ffff:192.0.2.1"), "192.0.2.1")
        self.assertEqual(addressKey("unix"), "unix")


class PairingCodesTests(SynchronousTestCase):
    """
    Tests for L{PairingCodes}.
    """

    def setUp(self) -> None:
        """
        Make codes on a fake clock.
        """
        self.clock = Clock()
        self.clock.advance(1000)
        self.codes = PairingCodes(self.clock)

    def test_issue(self) -> None:
        """
        A code is 8 characters of the alphabet shown as XXXX-XXXX, expires after 10 minutes,
        and carries the name the owner gave.
        """
        issued = self.codes.issue("phone")
        self.assertRegex(issued.code, f"^[{CODE_ALPHABET}]{{4}}-[{CODE_ALPHABET}]{{4}}$")
        self.assertEqual(issued.expiresAt, 1000 + CODE_TTL)
        self.assertEqual(CODE_TTL, 600)
        self.assertEqual(issued.name, "phone")
        self.assertNotEqual(self.codes.issue().code, issued.code)

    def test_redeem(self) -> None:
        """
        A code is accepted as typed, in any case and without its dash.
        """
        issued = self.codes.issue("phone")
        self.assertEqual(self.codes.redeem(issued.code.lower().replace("-", ""), "h"), issued)

    def test_singleUse(self) -> None:
        """
        A code is accepted once.
        """
        issued = self.codes.issue()
        self.codes.redeem(issued.code, "h")
        self.assertRaises(WrongCode, self.codes.redeem, issued.code, "h")

    def test_expiry(self) -> None:
        """
        A code is accepted until its expiry, and not at or after it.
        """
        early = self.codes.issue()
        late = self.codes.issue()
        self.clock.advance(CODE_TTL - 0.001)
        self.codes.redeem(early.code, "h")
        self.clock.advance(0.001)
        self.assertRaises(WrongCode, self.codes.redeem, late.code, "h")
        self.assertEqual(len(self.codes), 0)

    def test_customTTL(self) -> None:
        """
        The lifetime can be chosen.
        """
        codes = PairingCodes(self.clock, ttl=5)
        issued = codes.issue()
        self.clock.advance(5)
        self.assertRaises(WrongCode, codes.redeem, issued.code, "h")

    def test_wrongCode(self) -> None:
        """
        A code that was never issued is refused and leaves the issued ones alone.
        """
        issued = self.codes.issue()
        error = self.assertRaises(WrongCode, self.codes.redeem, "0000-0000", "h")
        self.assertIn("portal pair", str(error))
        self.codes.redeem(issued.code, "h")

    def test_outstandingBounded(self) -> None:
        """
        Only the newest codes are kept; issuing more forgets the oldest.
        """
        codes = PairingCodes(self.clock, maxOutstanding=2)
        first, second, third = codes.issue(), codes.issue(), codes.issue()
        self.assertEqual(len(codes), 2)
        self.assertRaises(WrongCode, codes.redeem, first.code, "h")
        codes.redeem(second.code, "h")
        codes.redeem(third.code, "h")

    def test_wrongAttemptsLimitedPerAddress(self) -> None:
        """
        After 5 wrong codes in a minute an address is refused, even with a right code, while
        other addresses may still try; a minute after its first wrong attempt it may try again.
        """
        issued = self.codes.issue()
        for _ in range(ATTEMPTS_PER_ADDRESS):
            self.assertRaises(WrongCode, self.codes.redeem, "0000-0000", "192.0.2.1")
            self.clock.advance(1)
        error = self.assertRaises(TooManyAttempts, self.codes.redeem, issued.code, "192.0.2.1")
        self.assertEqual(error.retryAfter, ATTEMPT_WINDOW - ATTEMPTS_PER_ADDRESS)
        self.assertRaises(TooManyAttempts, self.codes.check, "192.0.2.1")
        self.assertRaises(WrongCode, self.codes.redeem, "0000-0000", "192.0.2.2")
        self.clock.advance(ATTEMPT_WINDOW - ATTEMPTS_PER_ADDRESS)
        self.assertEqual(self.codes.redeem(issued.code, "192.0.2.1"), issued)

    def test_rightCodesNotCounted(self) -> None:
        """
        Only wrong attempts count: an address may redeem any number of right codes.
        """
        for _ in range(ATTEMPTS_PER_ADDRESS * 2):
            self.codes.redeem(self.codes.issue().code, "192.0.2.1")

    def test_ipv6SlashSixtyFour(self) -> None:
        """
        Wrong attempts from addresses of one IPv6 /64 are counted together.
        """
        for i in range(ATTEMPTS_PER_ADDRESS):
            self.assertRaises(WrongCode, self.codes.redeem, "0000-0000", f"2001:db8::{i + 1}")
        self.assertRaises(TooManyAttempts, self.codes.check, "2001:db8::ffff")
        self.codes.check("2001:db8:0:1::1")

    def test_totalCap(self) -> None:
        """
        After 30 wrong codes in a minute from any addresses, everyone is refused for the rest of
        the minute.
        """
        issued = self.codes.issue()
        for i in range(ATTEMPTS_TOTAL):
            self.assertRaises(WrongCode, self.codes.redeem, "0000-0000", f"198.51.100.{i}")
        error = self.assertRaises(TooManyAttempts, self.codes.redeem, issued.code, "192.0.2.9")
        self.assertIn("recently", str(error))
        self.assertEqual(error.retryAfter, ATTEMPT_WINDOW)
        self.clock.advance(ATTEMPT_WINDOW)
        self.codes.redeem(issued.code, "192.0.2.9")


class AttemptLimiterTests(SynchronousTestCase):
    """
    Tests for L{AttemptLimiter} on its own.
    """

    def test_slidingWindow(self) -> None:
        """
        Attempts leave the count one by one as they age out of the window.
        """
        clock = Clock()
        limiter = AttemptLimiter(clock, perAddress=2, total=100, window=10)
        limiter.failed("a")
        clock.advance(5)
        limiter.failed("a")
        self.assertRaises(TooManyAttempts, limiter.check, "a")
        clock.advance(5)
        limiter.check("a")
        limiter.failed("a")
        self.assertRaises(TooManyAttempts, limiter.check, "a")

    def test_memoryBounded(self) -> None:
        """
        Addresses whose attempts aged out are forgotten.
        """
        clock = Clock()
        limiter = AttemptLimiter(clock, window=10)
        for i in range(20):
            limiter.failed(f"10.0.0.{i}")
        clock.advance(10)
        limiter.check("10.0.0.1")
        self.assertEqual(limiter._byAddress, {})
        self.assertEqual(len(limiter._all), 0)
