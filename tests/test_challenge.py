"""
Tests for L{portal.trust.challenge}.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from portal.trust.challenge import (
    CHALLENGE_TTL,
    BadSignature,
    ChallengeError,
    ChallengeIssuer,
    ChallengeMismatch,
    ExpiredChallenge,
    UnknownChallenge,
    hopMessage,
    registrationMessage,
    signHop,
    signRegistration,
)
from portal.trust.identity import Identity


class RegistrationMessageTests(SynchronousTestCase):
    """
    Tests for L{registrationMessage}.
    """

    def setUp(self) -> None:
        """
        Make a tunnel public key to sign with.
        """
        self.publicKey = Identity.generate().publicKey

    def test_prefix(self) -> None:
        """
        The message starts with the versioned domain separator.
        """
        message = registrationMessage("relay", b"n" * 32, ["a"], self.publicKey)
        self.assertTrue(message.startswith(b"portal-register-v1\0"))

    def test_namesOrderIrrelevant(self) -> None:
        """
        The names are sorted, so their order does not change the message.
        """
        self.assertEqual(
            registrationMessage("relay", b"n", ["b", "a"], self.publicKey),
            registrationMessage("relay", b"n", ["a", "b"], self.publicKey),
        )

    def test_unambiguous(self) -> None:
        """
        Different splits of the same characters between fields or names give different messages.
        """
        messages = {
            registrationMessage("relay", b"n", ["ab"], self.publicKey),
            registrationMessage("relay", b"n", ["a", "b"], self.publicKey),
            registrationMessage("relayn", b"", ["ab"], self.publicKey),
            registrationMessage("relay", b"n", ["a\nb"], self.publicKey),
            registrationMessage("relay", b"n", ["a", "b"], self.publicKey[:-1]),
            registrationMessage("otherrelay", b"n", ["a", "b"], self.publicKey),
        }
        self.assertEqual(len(messages), 6)

    def test_singleStringRefused(self) -> None:
        """
        A bare string for the names is a type error, not a list of its characters.
        """
        self.assertRaises(TypeError, registrationMessage, "relay", b"n", "ab", self.publicKey)


class ChallengeIssuerTests(SynchronousTestCase):
    """
    Tests for L{ChallengeIssuer}.
    """

    def setUp(self) -> None:
        """
        Make a relay's issuer on a fake clock and a tunnel identity.
        """
        self.clock = Clock()
        self.relayId = Identity.generate().id
        self.issuer = ChallengeIssuer(self.relayId, self.clock)
        self.tunnel = Identity.generate()

    def answer(self, nonce: bytes, names: list[str]) -> bytes:
        """
        Sign a challenge from L{issuer} as the tunnel.

        @param nonce: The challenge.
        @param names: The names registered.
        @return: The signature.
        """
        return signRegistration(self.tunnel, self.relayId, nonce, names)

    def test_nonce(self) -> None:
        """
        Each challenge is 32 fresh random bytes.
        """
        first = self.issuer.issue(["a"])
        second = self.issuer.issue(["a"])
        self.assertEqual(len(first), 32)
        self.assertNotEqual(first, second)

    def test_success(self) -> None:
        """
        A correct signature over the issued challenge and names is accepted.
        """
        nonce = self.issuer.issue(["web", "api"])
        signature = self.answer(nonce, ["api", "web"])
        self.issuer.redeem(nonce, ["web", "api"], self.tunnel.publicKey, signature)
        self.assertEqual(len(self.issuer), 0)

    def test_successAtExpiry(self) -> None:
        """
        A challenge can still be redeemed exactly at the end of its lifetime.
        """
        nonce = self.issuer.issue(["web"])
        self.clock.advance(CHALLENGE_TTL)
        self.issuer.redeem(nonce, ["web"], self.tunnel.publicKey, self.answer(nonce, ["web"]))

    def test_replay(self) -> None:
        """
        A challenge redeemed once cannot be redeemed again.
        """
        nonce = self.issuer.issue(["web"])
        signature = self.answer(nonce, ["web"])
        self.issuer.redeem(nonce, ["web"], self.tunnel.publicKey, signature)
        error = self.assertRaises(
            UnknownChallenge,
            self.issuer.redeem,
            nonce,
            ["web"],
            self.tunnel.publicKey,
            signature,
        )
        self.assertIn("already used", str(error))

    def test_neverIssued(self) -> None:
        """
        A nonce this issuer never issued is unknown.
        """
        nonce = b"x" * 32
        self.assertRaises(
            UnknownChallenge,
            self.issuer.redeem,
            nonce,
            ["web"],
            self.tunnel.publicKey,
            self.answer(nonce, ["web"]),
        )

    def test_failureConsumes(self) -> None:
        """
        A failed attempt uses up the challenge, so a correct answer afterwards is refused.
        """
        nonce = self.issuer.issue(["web"])
        self.assertRaises(
            BadSignature,
            self.issuer.redeem,
            nonce,
            ["web"],
            self.tunnel.publicKey,
            b"garbage",
        )
        self.assertRaises(
            UnknownChallenge,
            self.issuer.redeem,
            nonce,
            ["web"],
            self.tunnel.publicKey,
            self.answer(nonce, ["web"]),
        )

    def test_expired(self) -> None:
        """
        A challenge redeemed after its lifetime is refused as expired.
        """
        nonce = self.issuer.issue(["web"])
        self.clock.advance(CHALLENGE_TTL + 0.1)
        error = self.assertRaises(
            ExpiredChallenge,
            self.issuer.redeem,
            nonce,
            ["web"],
            self.tunnel.publicKey,
            self.answer(nonce, ["web"]),
        )
        self.assertIn("expired", str(error))

    def test_customTTL(self) -> None:
        """
        The lifetime given to the issuer is the one applied.
        """
        issuer = ChallengeIssuer(self.relayId, self.clock, ttl=5)
        nonce = issuer.issue(["web"])
        self.clock.advance(6)
        self.assertRaises(
            ExpiredChallenge,
            issuer.redeem,
            nonce,
            ["web"],
            self.tunnel.publicKey,
            self.answer(nonce, ["web"]),
        )

    def test_wrongRelay(self) -> None:
        """
        A signature made for another relay's identity is refused by this relay.
        """
        relayA = Identity.generate().id
        issuerB = ChallengeIssuer(Identity.generate().id, self.clock)
        nonce = issuerB.issue(["web"])
        signature = signRegistration(self.tunnel, relayA, nonce, ["web"])
        error = self.assertRaises(
            BadSignature, issuerB.redeem, nonce, ["web"], self.tunnel.publicKey, signature
        )
        self.assertIn("relay", str(error))

    def test_wrongKey(self) -> None:
        """
        A signature by one key presented with another public key is refused.
        """
        other = Identity.generate()
        nonce = self.issuer.issue(["web"])
        signature = signRegistration(other, self.relayId, nonce, ["web"])
        self.assertRaises(
            BadSignature,
            self.issuer.redeem,
            nonce,
            ["web"],
            self.tunnel.publicKey,
            signature,
        )

    def test_garbageKey(self) -> None:
        """
        A malformed public key is refused as a bad signature.
        """
        nonce = self.issuer.issue(["web"])
        self.assertRaises(
            BadSignature,
            self.issuer.redeem,
            nonce,
            ["web"],
            b"not a key",
            self.answer(nonce, ["web"]),
        )

    def test_namesMismatch(self) -> None:
        """
        Registering other names than the challenge was issued for is refused, naming both sets.
        """
        nonce = self.issuer.issue(["web"])
        error = self.assertRaises(
            ChallengeMismatch,
            self.issuer.redeem,
            nonce,
            ["admin"],
            self.tunnel.publicKey,
            self.answer(nonce, ["admin"]),
        )
        self.assertIn("web", str(error))
        self.assertIn("admin", str(error))

    def test_signedOtherNames(self) -> None:
        """
        A signature over other names than those registered is refused.
        """
        nonce = self.issuer.issue(["web"])
        self.assertRaises(
            BadSignature,
            self.issuer.redeem,
            nonce,
            ["web"],
            self.tunnel.publicKey,
            self.answer(nonce, ["admin"]),
        )

    def test_errorsAreChallengeErrors(self) -> None:
        """
        Every refusal is a L{ChallengeError}.
        """
        for cls in [UnknownChallenge, ExpiredChallenge, ChallengeMismatch, BadSignature]:
            self.assertTrue(issubclass(cls, ChallengeError))

    def test_maxOutstanding(self) -> None:
        """
        Issuing beyond C{maxOutstanding} forgets the oldest challenges and keeps the newest.
        """
        issuer = ChallengeIssuer(self.relayId, self.clock, maxOutstanding=3)
        nonces = [issuer.issue(["web"]) for _ in range(5)]
        self.assertEqual(len(issuer), 3)
        for nonce in nonces[:2]:
            self.assertRaises(
                UnknownChallenge,
                issuer.redeem,
                nonce,
                ["web"],
                self.tunnel.publicKey,
                self.answer(nonce, ["web"]),
            )
        for nonce in nonces[2:]:
            issuer.redeem(nonce, ["web"], self.tunnel.publicKey, self.answer(nonce, ["web"]))

    def test_pruneExpired(self) -> None:
        """
        Issuing a challenge forgets those that have expired.
        """
        for _ in range(4):
            self.issuer.issue(["web"])
        self.clock.advance(CHALLENGE_TTL + 1)
        self.issuer.issue(["web"])
        self.assertEqual(len(self.issuer), 1)

    def test_invalidMaxOutstanding(self) -> None:
        """
        An issuer must be allowed at least one outstanding challenge.
        """
        self.assertRaises(ValueError, ChallengeIssuer, self.relayId, self.clock, maxOutstanding=0)


class HopChallengeTests(SynchronousTestCase):
    """
    Tests for hop challenges: L{hopMessage}, L{signHop} and L{ChallengeIssuer.redeemHop}.
    """

    def setUp(self) -> None:
        """
        Make a relay's issuer and a tunnel identity.
        """
        self.clock = Clock()
        self.relay = Identity.generate()
        self.issuer = ChallengeIssuer(self.relay.id, self.clock)
        self.tunnel = Identity.generate()

    def test_domainSeparated(self) -> None:
        """
        The hop message has its own domain string, so a registration signature over the same fields
        never verifies as a hop signature.
        """
        message = hopMessage("relay", b"n", "b.example", 4017, self.tunnel.publicKey)
        self.assertTrue(message.startswith(b"portal-hop-v1\0"))
        nonce = self.issuer.issue([], "hop")
        signature = signRegistration(self.tunnel, self.relay.id, nonce, [])
        self.assertRaises(
            BadSignature,
            self.issuer.redeemHop,
            nonce,
            "b.example",
            4017,
            self.tunnel.publicKey,
            signature,
        )

    def test_unambiguous(self) -> None:
        """
        Moving characters between the host and port fields changes the message.
        """
        key = self.tunnel.publicKey
        self.assertNotEqual(
            hopMessage("r", b"n", "b1", 23, key), hopMessage("r", b"n", "b", 123, key)
        )

    def test_success(self) -> None:
        """
        A hop challenge signed for this relay and destination is accepted once; a replay is unknown.
        """
        nonce = self.issuer.issue([], "hop")
        signature = signHop(self.tunnel, self.relay.id, nonce, "b.example", 4017)
        self.issuer.redeemHop(nonce, "b.example", 4017, self.tunnel.publicKey, signature)
        self.assertRaises(
            UnknownChallenge,
            self.issuer.redeemHop,
            nonce,
            "b.example",
            4017,
            self.tunnel.publicKey,
            signature,
        )

    def test_otherDestination(self) -> None:
        """
        A signature for another destination (host or port) is refused.
        """
        for host, port in [("c.example", 4017), ("b.example", 4018)]:
            nonce = self.issuer.issue([], "hop")
            signature = signHop(self.tunnel, self.relay.id, nonce, "b.example", 4017)
            error = self.assertRaises(
                BadSignature,
                self.issuer.redeemHop,
                nonce,
                host,
                port,
                self.tunnel.publicKey,
                signature,
            )
            self.assertIn(f"{host}:{port}", str(error))

    def test_otherRelay(self) -> None:
        """
        A hop signed for another relay's id is refused.
        """
        nonce = self.issuer.issue([], "hop")
        signature = signHop(self.tunnel, Identity.generate().id, nonce, "b.example", 4017)
        self.assertRaises(
            BadSignature,
            self.issuer.redeemHop,
            nonce,
            "b.example",
            4017,
            self.tunnel.publicKey,
            signature,
        )

    def test_purposesDoNotMix(self) -> None:
        """
        A registration challenge cannot be redeemed for a hop, nor a hop challenge for a
        registration; the attempt uses the challenge up.
        """
        nonce = self.issuer.issue(["app"])
        signature = signHop(self.tunnel, self.relay.id, nonce, "b.example", 4017)
        error = self.assertRaises(
            ChallengeMismatch,
            self.issuer.redeemHop,
            nonce,
            "b.example",
            4017,
            self.tunnel.publicKey,
            signature,
        )
        self.assertIn("not a hop", str(error))
        self.assertEqual(len(self.issuer), 0)
        nonce = self.issuer.issue([], "hop")
        signature = signRegistration(self.tunnel, self.relay.id, nonce, [])
        self.assertRaises(
            ChallengeMismatch, self.issuer.redeem, nonce, [], self.tunnel.publicKey, signature
        )

    def test_expired(self) -> None:
        """
        A hop challenge redeemed after its lifetime is refused as expired.
        """
        nonce = self.issuer.issue([], "hop")
        signature = signHop(self.tunnel, self.relay.id, nonce, "b.example", 4017)
        self.clock.advance(CHALLENGE_TTL + 1)
        self.assertRaises(
            ExpiredChallenge,
            self.issuer.redeemHop,
            nonce,
            "b.example",
            4017,
            self.tunnel.publicKey,
            signature,
        )
