"""
Tests for L{portal.relay.admission}: rates, the refusal log and counts, and rate parsing. The gate
at work in control sessions is tested in L{tests.test_control}.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from portal.forwarding.refusals import Refusals
from portal.relay.admission import (
    Admission,
    AdmissionLimits,
    CommandRates,
    Rate,
    RateError,
    parseRate,
)
from portal.tap.relay import Options
from portal.tunnel.control import MAX_WORK
from portal.wire.control import TryAgain


class ParseRateTests(SynchronousTestCase):
    """
    Tests for L{parseRate}.
    """

    def test_parsed(self) -> None:
        """
        C{PER_SECOND/BURST} and C{PER_SECOND} alone are read, and written back the same way.
        """
        self.assertEqual(parseRate("2/20"), Rate(2.0, 20.0))
        self.assertEqual(parseRate("0.5/3"), Rate(0.5, 3.0))
        self.assertEqual(parseRate("5"), Rate(5.0, 5.0))
        self.assertEqual(str(Rate(2.0, 20.0)), "2/20")

    def test_malformed(self) -> None:
        """
        Anything but one or two positive numbers is refused with a message naming the option.
        """
        for text in ("", "a/b", "1/2/3", "0/5", "-1/5", "1/inf", "nan"):
            error = self.assertRaises(RateError, parseRate, text, "--hello-rate")
            self.assertIn("--hello-rate", str(error))


class AdmissionRateTests(SynchronousTestCase):
    """
    L{Admission.rate} limits each command per source address and in total.
    """

    def setUp(self) -> None:
        """
        A gate on a fake clock: 1 Hello a second per source with a burst of 3, 10 in total with a
        burst of 5.
        """
        self.clock = Clock()
        limits = AdmissionLimits(
            perSource=CommandRates(Rate(1.0, 3.0), Rate(1.0, 3.0), Rate(1.0, 3.0)),
            total=CommandRates(Rate(10.0, 5.0), Rate(10.0, 5.0), Rate(10.0, 5.0)),
        )
        self.refusals = Refusals(self.clock)
        self.admission = Admission(
            self.clock, limits, self.refusals, lambda key: True, lambda key: True
        )
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def test_perSource(self) -> None:
        """
        A source gets its burst, then is refused with C{TRY_AGAIN} and the time to wait; another
        source is not affected; after a second the first source gets one more.
        """
        for _ in range(3):
            self.admission.rate("hello", "10.0.0.2")
        error = self.assertRaises(TryAgain, self.admission.rate, "hello", "10.0.0.2")
        self.assertIn("too many hello requests from your address", str(error))
        self.assertIn("retry in 1 s", str(error))
        self.admission.rate("hello", "10.0.0.3")
        self.clock.advance(1)
        self.admission.rate("hello", "10.0.0.2")
        self.assertEqual(self.refusals.counts, {"hello_rate_source": 1})

    def test_commandsApart(self) -> None:
        """
        Each command has its own buckets: Hellos used up do not stop a challenge.
        """
        for _ in range(3):
            self.admission.rate("hello", "10.0.0.2")
        self.admission.rate("challenge", "10.0.0.2")

    def test_total(self) -> None:
        """
        Over the total limit every source is refused, however few requests it sent.
        """
        for source in range(5):
            self.admission.rate("register", f"10.0.0.{source}")
        error = self.assertRaises(TryAgain, self.admission.rate, "register", "10.0.1.1")
        self.assertIn("this relay is receiving too many register requests", str(error))
        self.assertEqual(self.refusals.counts, {"register_rate_total": 1})

    def test_floodLogsBounded(self) -> None:
        """
        A flood of refusals is counted in full but logged once per reason and interval, the next
        event saying how many were not logged.
        """
        for _ in range(1003):
            try:
                self.admission.rate("challenge", "10.0.0.2")
            except TryAgain:
                pass
        self.assertEqual(self.refusals.counts, {"challenge_rate_source": 1000})
        refused = [e for e in self.events if e.get("refusal") == "challenge_rate_source"]
        self.assertEqual(len(refused), 1)
        self.assertEqual(refused[0]["source"], "10.0.0.2")
        self.clock.advance(60)
        for _ in range(3):
            self.admission.rate("challenge", "10.0.0.9")
        self.assertRaises(TryAgain, self.admission.rate, "challenge", "10.0.0.9")
        refused = [e for e in self.events if e.get("refusal") == "challenge_rate_source"]
        self.assertEqual([e["unlogged"] for e in refused], [0, 999])


class RelayOptionsTests(SynchronousTestCase):
    """
    C{twistd portal-relay}'s options for the registration gate.
    """

    def test_defaults(self) -> None:
        """
        Without options the relay runs with the default limits, open to every identity.
        """
        options = Options()
        options.parseOptions([])
        config = options.config()
        self.assertEqual(config.limits.admission, AdmissionLimits())
        self.assertFalse(config.inviteOnly)

    def test_set(self) -> None:
        """
        Every rate, quota and proof-of-work option reaches the relay's limits, and the
        configuration stays a hashable value.
        """
        options = Options()
        options.parseOptions(
            [
                "--hello-rate",
                "5/50",
                "--challenge-rate",
                "3",
                "--register-rate-total",
                "10/20",
                "--max-names-per-source",
                "7",
                "--max-ports-per-source",
                "2",
                "--pow-quiet-rate",
                "0.5",
                "--pow-max-bits",
                "8",
                "--invite-only",
            ]
        )
        config = options.config()
        admission = config.limits.admission
        self.assertEqual(admission.perSource.hello, Rate(5.0, 50.0))
        self.assertEqual(admission.perSource.challenge, Rate(3.0, 3.0))
        self.assertEqual(admission.total.register, Rate(10.0, 20.0))
        self.assertEqual(admission.total.hello, AdmissionLimits().total.hello)
        hash(config)
        self.assertEqual((admission.maxNamesPerSource, admission.maxPortsPerSource), (7, 2))
        self.assertEqual(admission.difficulty.quietRate, 0.5)
        self.assertEqual((admission.difficulty.baseBits, admission.difficulty.maxBits), (8, 8))
        self.assertTrue(config.inviteOnly)

    def test_refused(self) -> None:
        """
        A malformed rate, a quota below 1 and a difficulty above what tunnels spend are usage
        errors.
        """
        for argv in (
            ["--hello-rate", "fast"],
            ["--register-rate-total", "0/1"],
            ["--max-names-per-source", "0"],
            ["--pow-max-bits", str(MAX_WORK + 1)],
            ["--pow-max-bits", "-1"],
        ):
            self.assertRaises(usage.UsageError, Options().parseOptions, argv)
