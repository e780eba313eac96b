"""
Tests for L{portal.trust.proofofwork} and the proof of work of L{portal.trust.challenge}'s
registration challenges.
"""

from __future__ import annotations

import hashlib
import os

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from portal.trust.challenge import (
    ChallengeIssuer,
    UnknownChallenge,
    WorkInsufficient,
    WorkRequired,
    signRegistration,
)
from portal.trust.identity import Identity
from portal.trust.proofofwork import (
    MAX_BITS,
    POW_DOMAIN,
    SOLUTION_LENGTH,
    leadingZeroBits,
    solutionBits,
    solve,
)


def solveExactly(nonce: bytes, bits: int) -> bytes:
    """
    Find a solution that proves exactly C{bits} bits, no more: one that meets a lower difficulty
    but not the next.

    @param nonce: The challenge nonce.
    @param bits: The work it must prove.
    @return: The solution.
    """
    counter = 0
    while True:
        solution = solve(nonce, bits, start=counter)
        if solutionBits(nonce, solution) == bits:
            return solution
        counter = int.from_bytes(solution, "big") + 1


class LeadingZeroBitsTests(SynchronousTestCase):
    """
    Tests for L{leadingZeroBits}.
    """

    def test_counts(self) -> None:
        """
        Zero bits are counted from the most significant bit of the first byte, across bytes.
        """
        self.assertEqual(leadingZeroBits(b"\x80\x00"), 0)
        self.assertEqual(leadingZeroBits(b"\x01\x00"), 7)
        self.assertEqual(leadingZeroBits(b"\x00\x40"), 9)
        self.assertEqual(leadingZeroBits(b"\x00\x00"), 16)


class SolveTests(SynchronousTestCase):
    """
    Tests for L{solve} and L{solutionBits}.
    """

    def test_solutionMeetsDifficulty(self) -> None:
        """
        A solution found for C{bits} proves at least C{bits}, checked against the hash as
        specified: sha256 of the domain, the nonce and the solution.
        """
        nonce = os.urandom(32)
        for bits in (0, 1, 8, 12):
            solution = solve(nonce, bits)
            self.assertEqual(len(solution), SOLUTION_LENGTH)
            digest = hashlib.sha256(POW_DOMAIN + nonce + solution).digest()
            self.assertGreaterEqual(leadingZeroBits(digest), bits)
            self.assertEqual(solutionBits(nonce, solution), leadingZeroBits(digest))

    def test_boundToNonce(self) -> None:
        """
        A solution proves its work for its own nonce only: for another nonce it is a random try.
        """
        nonce = os.urandom(32)
        solution = solveExactly(nonce, 14)
        others = [solutionBits(os.urandom(32), solution) for _ in range(16)]
        self.assertLess(min(others), 14)

    def test_malformedLength(self) -> None:
        """
        A solution of another length proves nothing, whatever its hash.
        """
        self.assertEqual(solutionBits(b"n", b""), -1)
        self.assertEqual(solutionBits(b"n", b"\0" * (SOLUTION_LENGTH + 1)), -1)

    def test_difficultyBounds(self) -> None:
        """
        Difficulties outside 0 to L{MAX_BITS} are refused.
        """
        self.assertRaises(ValueError, solve, b"n", -1)
        self.assertRaises(ValueError, solve, b"n", MAX_BITS + 1)


class ChallengeWorkTests(SynchronousTestCase):
    """
    A registration challenge issued with a proof-of-work difficulty is redeemed only with a
    solution meeting it, once.
    """

    def setUp(self) -> None:
        """
        An issuer on a fake clock and a tunnel identity.
        """
        self.issuer = ChallengeIssuer("relay-id", Clock())
        self.identity = Identity.generate()

    def redeem(self, nonce: bytes, solution: bytes | None) -> None:
        """
        Redeem C{nonce} for the name C{app}, correctly signed, with C{solution}.
        """
        signature = signRegistration(self.identity, "relay-id", nonce, ["app"])
        self.issuer.redeem(nonce, ["app"], self.identity.publicKey, signature, solution)

    def test_solved(self) -> None:
        """
        A solution meeting the challenge's difficulty is accepted.
        """
        nonce = self.issuer.issue(["app"], work=10)
        self.redeem(nonce, solve(nonce, 10))

    def test_noWorkAsked(self) -> None:
        """
        A challenge issued without work needs no solution.
        """
        nonce = self.issuer.issue(["app"])
        self.redeem(nonce, None)

    def test_missing(self) -> None:
        """
        A registration without the work the challenge asked for is refused, saying how much.
        """
        nonce = self.issuer.issue(["app"], work=10)
        error = self.assertRaises(WorkRequired, self.redeem, nonce, None)
        self.assertEqual(error.bits, 10)
        self.assertIn("10 bits", str(error))

    def test_tooEasy(self) -> None:
        """
        A solution for a lower difficulty than the challenge's is refused.
        """
        nonce = self.issuer.issue(["app"], work=12)
        error = self.assertRaises(WorkInsufficient, self.redeem, nonce, solveExactly(nonce, 9))
        self.assertIn("proves 9 bits", str(error))

    def test_wrong(self) -> None:
        """
        A solution found for another nonce, or a malformed one, is refused.
        """
        nonce = self.issuer.issue(["app"], work=12)
        other = os.urandom(32)
        solution = solveExactly(other, 12)
        # The same solution proves less than 12 bits for this nonce (else pick again).
        while solutionBits(nonce, solution) >= 12:
            other = os.urandom(32)
            solution = solveExactly(other, 12)
        self.assertRaises(WorkInsufficient, self.redeem, nonce, solution)
        nonce = self.issuer.issue(["app"], work=12)
        error = self.assertRaises(WorkInsufficient, self.redeem, nonce, b"short")
        self.assertIn("malformed", str(error))

    def test_replayed(self) -> None:
        """
        A challenge and its solution are used up by one registration: replayed, they are refused.
        """
        nonce = self.issuer.issue(["app"], work=10)
        solution = solve(nonce, 10)
        self.redeem(nonce, solution)
        self.assertRaises(UnknownChallenge, self.redeem, nonce, solution)

    def test_workChecked(self) -> None:
        """
        Difficulties outside 0 to L{MAX_BITS} are not issued.
        """
        self.assertRaises(ValueError, self.issuer.issue, ["app"], work=MAX_BITS + 1)
