"""
Tests for L{portal.relay.store.ILeaseClaims}: L{LocalClaims}, and the registration path of
L{portal.relay.control.RelayControlProtocol} asking whichever claims the router runs on.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from portal.relay.store import ClaimsUnavailable, ILeaseClaims, LocalClaims, UnavailableClaims
from portal.wire.control import RegistrationRefused, TryAgain
from tests.test_control import LABEL, ClientTestCase


class LocalClaimsTests(SynchronousTestCase):
    """
    A relay on its own decides ownership in its lease table: its claims always agree.
    """

    def test_interface(self) -> None:
        """
        L{LocalClaims} provides L{ILeaseClaims}.
        """
        self.assertTrue(verifyObject(ILeaseClaims, LocalClaims()))

    def test_agrees(self) -> None:
        """
        Registrations may always be decided, and every claim succeeds at once.
        """
        claims = LocalClaims()
        self.assertIsNone(claims.mayRegister())
        self.assertIsNone(self.successResultOf(claims.claim(["a", "b"], "owner")))
        claims.sync()


class UnavailableClaimsTests(SynchronousTestCase):
    """
    A relay that cannot decide yet (a cluster member still joining) refuses with the reason.
    """

    def test_refuses(self) -> None:
        """
        Registrations are refused with the reason, and a claim fails with L{ClaimsUnavailable}.
        """
        claims = UnavailableClaims("cluster store unavailable: the relay is starting")
        self.assertTrue(verifyObject(ILeaseClaims, claims))
        self.assertEqual(claims.mayRegister(), "cluster store unavailable: the relay is starting")
        failure = self.failureResultOf(claims.claim(["a"], "owner"), ClaimsUnavailable)
        self.assertIn("starting", failure.getErrorMessage())
        claims.sync()


@implementer(ILeaseClaims)
class _FakeClaims:
    """
    Claims decided by the test: C{answer} is what every claim gives (a L{Deferred}).
    """

    def __init__(self) -> None:
        self.unavailable: str | None = None
        self.answer: Deferred[str | None] = succeed(None)
        self.claimed: list[tuple[list[str], str]] = []
        self.syncs = 0

    def mayRegister(self) -> str | None:
        return self.unavailable

    def claim(
        self, names: list[str], owner: str, source: str | None = None
    ) -> Deferred[str | None]:
        self.claimed.append((list(names), owner))
        return self.answer

    def sync(self) -> None:
        self.syncs += 1


class RegistrationClaimsTests(ClientTestCase):
    """
    A registration counts only once the router's claims agree; the registration path knows
    nothing else of where ownership is decided.
    """

    def setUp(self) -> None:
        super().setUp()
        self.claims = _FakeClaims()
        self.router.claims = self.claims
        self.hello()

    def registerLabel(self) -> Any:
        """
        Register L{LABEL} with a fresh challenge.
        """
        return self.register([LABEL], self.challenge([LABEL]))

    def test_claimed(self) -> None:
        """
        When the claim succeeds the name is registered, and the live leases are published.
        """
        result = self.registerLabel()
        self.assertNotIsInstance(result, Failure)
        self.assertEqual(self.claims.claimed, [([LABEL], self.tunnelIdentity.id)])
        self.assertIsNotNone(self.router.leases.route(LABEL))
        self.assertGreaterEqual(self.claims.syncs, 1)

    def test_takenElsewhere(self) -> None:
        """
        A name another identity holds where ownership is decided is refused, and given back here.
        """
        self.claims.answer = succeed(LABEL)
        result = self.registerLabel()
        self.assertRefusedWith(result, RegistrationRefused, "is taken by another identity")
        self.assertIsNone(self.router.leases.route(LABEL))
        self.assertNotIn(LABEL, self.connection.relay.names)

    def test_unavailable(self) -> None:
        """
        When the store that decides cannot be reached, the tunnel is told to try again and the
        name is given back.
        """
        self.claims.answer = fail(ClaimsUnavailable("cluster store unavailable: refused"))
        result = self.registerLabel()
        self.assertRefusedWith(result, TryAgain, "cluster store unavailable")
        self.assertIsNone(self.router.leases.route(LABEL))

    def test_mayNotRegister(self) -> None:
        """
        While registrations cannot be decided, they are refused before any claim, with the reason,
        and counted.
        """
        self.claims.unavailable = "cluster store unavailable"
        result = self.registerLabel()
        self.assertRefusedWith(result, TryAgain, "cluster store unavailable")
        self.assertEqual(self.claims.claimed, [])
        self.assertEqual(self.router.refusals.counts, {"cluster_unavailable": 1})
