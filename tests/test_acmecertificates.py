"""
Tests for L{portal.tunnel.acme.certificates}: ordering, storing, renewal scheduling and retries on a
clock, with a fake certificate authority.
"""

from __future__ import annotations

import datetime
import io
import os
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from portal.trust.acmechallenge import PendingChallenges
from portal.trust.acmestore import CertificateStore
from portal.tunnel.acme.certificates import AcmeCertificates
from portal.tunnel.acme.client import AcmeCA, AcmeProblem, ICertificateAuthority
from portal.tunnel.acme.lifecycle import (
    MIN_RENEWAL_DELAY,
    RETRY_INITIAL,
    RETRY_MAX,
    renewalTime,
    retryDelay,
)
from portal.tunnel.report import Reporter
from tests.test_acmestore import NOW, issueFromCSR, keyAndCSR

HOST = "blog.portal.test"
DAY = 86400.0


@implementer(ICertificateAuthority)
class FakeAuthority:
    """
    A certificate authority whose orders the test completes by hand.

    @ivar orders: C{(hostname, csrPEM, Deferred)} of every order, oldest first.
    @ivar cancelled: The hostnames of cancelled orders.
    """

    def __init__(self) -> None:
        self.orders: list[tuple[str, bytes, Deferred[bytes]]] = []
        self.cancelled: list[str] = []

    def issue(self, hostname: str, csrPEM: bytes, pending: PendingChallenges) -> Deferred[bytes]:
        """
        Record the order.
        """
        d: Deferred[bytes] = Deferred(lambda _: self.cancelled.append(hostname))
        self.orders.append((hostname, csrPEM, d))
        return d

    def complete(self, clock: Clock, lifetime: float) -> None:
        """
        Issue the last order: valid from now for C{lifetime} seconds.
        """
        _, csrPEM, d = self.orders[-1]
        start = datetime.datetime.fromtimestamp(clock.seconds(), datetime.UTC)
        d.callback(issueFromCSR(csrPEM, start, start + datetime.timedelta(seconds=lifetime)))


class RenewalTimeTests(SynchronousTestCase):
    """
    Tests for L{renewalTime} and L{retryDelay}.
    """

    def test_twoThirds(self) -> None:
        """
        Without a renew-before, renewal is two thirds into the lifetime.
        """
        self.assertEqual(
            renewalTime(NOW, NOW + datetime.timedelta(days=90), None),
            NOW + datetime.timedelta(days=60),
        )

    def test_renewBefore(self) -> None:
        """
        A renew-before shorter than the lifetime counts back from expiry; a longer one falls back
        to two thirds.
        """
        end = NOW + datetime.timedelta(days=90)
        self.assertEqual(renewalTime(NOW, end, 10 * DAY), end - datetime.timedelta(days=10))
        self.assertEqual(renewalTime(NOW, end, 90 * DAY), NOW + datetime.timedelta(days=60))

    def test_backoff(self) -> None:
        """
        Retries wait L{RETRY_INITIAL}, doubling per failure, up to L{RETRY_MAX}.
        """
        self.assertEqual(
            [retryDelay(n) for n in (1, 2, 3)],
            [RETRY_INITIAL, RETRY_INITIAL * 2, RETRY_INITIAL * 4],
        )
        self.assertEqual(retryDelay(30), RETRY_MAX)


class AcmeCertificatesTests(SynchronousTestCase):
    """
    Tests for L{AcmeCertificates} on a clock.
    """

    def setUp(self) -> None:
        """
        A started service with a fake authority, an empty store, a JSON reporter, and a record of
        certificate changes.
        """
        self.clock = Clock()
        self.clock.advance(NOW.timestamp())
        self.authority = FakeAuthority()
        self.storeDir = os.path.join(self.mktemp(), "store")
        self.out = io.StringIO()
        self.reporter = Reporter(self.out, asJSON=True)
        self.changed: list[str] = []
        self.service = self.makeService()

    def makeService(self, renewBefore: float | None = None) -> AcmeCertificates:
        """
        @return: A started L{AcmeCertificates} on the test's clock, store and reporter.
        """
        service = AcmeCertificates(
            self.clock,
            self.authority,
            CertificateStore(self.storeDir),
            self.reporter,
            self.changed.append,
            renewBefore=renewBefore,
            directory="https://ca.test/dir",
        )
        service.startService()
        self.addCleanup(service.stopService)
        return service

    def events(self, name: str) -> list[dict[str, Any]]:
        """
        @return: The reported events called C{name}.
        """
        return [e for e in self.reporter.events if e["event"] == name]

    def test_interfaces(self) -> None:
        """
        The fake and the real certificate authorities provide L{ICertificateAuthority}.
        """
        self.assertTrue(verifyObject(ICertificateAuthority, self.authority))
        real = AcmeCA(self.clock, "https://ca.test/dir", ec.generate_private_key(ec.SECP256R1()))
        self.assertTrue(verifyObject(ICertificateAuthority, real))

    def test_localCAUntilIssued(self) -> None:
        """
        A wanted hostname is ordered at once; it has no ACME certificate (the local CA's serves)
        until the order completes, then it has one, the change is announced, and C{acme-issued}
        is reported.
        """
        self.service.want(HOST)
        self.service.want(HOST)
        self.assertEqual(len(self.authority.orders), 1)
        self.assertEqual(self.authority.orders[0][0], HOST)
        self.assertEqual([e["hostname"] for e in self.events("acme-ordering")], [HOST])
        self.assertIsNone(self.service.certificateFor(HOST))
        self.assertEqual(self.service.describe(HOST), "local-ca")
        self.authority.complete(self.clock, 90 * DAY)
        self.assertIsNotNone(self.service.certificateFor(HOST))
        self.assertEqual(self.service.describe(HOST), "acme")
        self.assertEqual(self.changed, [HOST])
        [issued] = self.events("acme-issued")
        self.assertFalse(issued["stored"])

    def test_renewalAtTwoThirds(self) -> None:
        """
        An issued certificate is renewed at two thirds of its lifetime, not before; the renewal
        swaps in the new certificate and reports C{acme-renewed}.
        """
        self.service.want(HOST)
        self.authority.complete(self.clock, 90 * DAY)
        first = self.service.certificateFor(HOST)
        self.clock.advance(60 * DAY - 1)
        self.assertEqual(len(self.authority.orders), 1)
        self.clock.advance(1)
        self.assertEqual(len(self.authority.orders), 2)
        self.assertEqual(self.events("acme-ordering")[-1]["renewal"], True)
        self.assertEqual(self.service.certificateFor(HOST), first)
        self.authority.complete(self.clock, 90 * DAY)
        self.assertNotEqual(self.service.certificateFor(HOST), first)
        self.assertEqual(len(self.events("acme-renewed")), 1)
        self.assertEqual(self.changed, [HOST, HOST])

    def test_renewBefore(self) -> None:
        """
        With a renew-before, renewal is that long before expiry, and never sooner than
        L{MIN_RENEWAL_DELAY} after issuance.
        """
        service = self.makeService(renewBefore=10 * DAY)
        service.want(HOST)
        self.authority.complete(self.clock, 90 * DAY)
        self.clock.advance(80 * DAY - 1)
        self.assertEqual(len(self.authority.orders), 1)
        self.clock.advance(1)
        self.assertEqual(len(self.authority.orders), 2)
        # A lifetime just longer than the renew-before would renew at once: wait the minimum.
        self.authority.complete(self.clock, 10 * DAY + 1)
        self.clock.advance(MIN_RENEWAL_DELAY - 0.5)
        self.assertEqual(len(self.authority.orders), 2)
        self.clock.advance(0.5)
        self.assertEqual(len(self.authority.orders), 3)

    def test_failureRetriedWithBackoff(self) -> None:
        """
        A failed first order reports C{acme-failed} with the CA's problem, keeps the local CA's
        certificate, and is retried after L{RETRY_INITIAL}, then twice as long.
        """
        self.service.want(HOST)
        self.authority.orders[-1][2].errback(
            Failure(AcmeProblem("the CA refused: no such name (dns)"))
        )
        [failed] = self.events("acme-failed")
        self.assertEqual(failed["problem"], "the CA refused: no such name (dns)")
        self.assertIn("the local CA's certificate keeps serving", failed["message"])
        self.assertIn("no such name (dns)", self.out.getvalue())
        self.assertIsNone(self.service.certificateFor(HOST))
        self.clock.advance(RETRY_INITIAL - 1)
        self.assertEqual(len(self.authority.orders), 1)
        self.clock.advance(1)
        self.assertEqual(len(self.authority.orders), 2)
        self.authority.orders[-1][2].errback(Failure(AcmeProblem("again")))
        self.clock.advance(RETRY_INITIAL * 2 - 1)
        self.assertEqual(len(self.authority.orders), 2)
        self.clock.advance(1)
        self.assertEqual(len(self.authority.orders), 3)
        self.authority.complete(self.clock, 90 * DAY)
        self.assertEqual(self.service.describe(HOST), "acme")
        self.flushLoggedErrors()

    def test_failedRenewalKeepsServing(self) -> None:
        """
        A failed renewal keeps the current certificate, warns with its expiry, and retries; a
        certificate that expires before any renewal succeeds stops serving at its expiry.
        """
        self.service.want(HOST)
        self.authority.complete(self.clock, 3 * RETRY_INITIAL)
        current = self.service.certificateFor(HOST)
        self.clock.advance(2 * RETRY_INITIAL)
        self.authority.orders[-1][2].errback(Failure(AcmeProblem("rate limited")))
        [failed] = self.events("acme-failed")
        self.assertIsNotNone(failed["expires"])
        self.assertIn("the current certificate keeps serving", failed["message"])
        self.assertEqual(self.service.certificateFor(HOST), current)
        self.clock.advance(RETRY_INITIAL)
        self.assertEqual(len(self.authority.orders), 3)
        self.authority.orders[-1][2].errback(Failure(AcmeProblem("rate limited")))
        self.clock.advance(1)
        self.assertIsNone(self.service.certificateFor(HOST))
        self.assertEqual(self.changed[-1], HOST)

    def test_lifecycle(self) -> None:
        """
        A hostname's machine goes ordering, waitingRetry, ordering, serving, renewing,
        servingRetry, stopped as its orders fail and succeed; the end of an order cancelled by
        the stop is ignored.
        """
        self.assertIsNone(self.service.lifecycle(HOST))
        self.service.want(HOST)
        seen = [self.service.lifecycle(HOST)]
        self.authority.orders[-1][2].errback(Failure(AcmeProblem("no")))
        seen.append(self.service.lifecycle(HOST))
        self.clock.advance(RETRY_INITIAL)
        seen.append(self.service.lifecycle(HOST))
        self.authority.complete(self.clock, 90 * DAY)
        seen.append(self.service.lifecycle(HOST))
        self.clock.advance(60 * DAY)
        seen.append(self.service.lifecycle(HOST))
        self.authority.orders[-1][2].errback(Failure(AcmeProblem("no")))
        seen.append(self.service.lifecycle(HOST))
        self.clock.advance(RETRY_INITIAL)
        self.service.stopService()
        seen.append(self.service.lifecycle(HOST))
        self.assertEqual(
            seen,
            [
                "ordering",
                "waitingRetry",
                "ordering",
                "serving",
                "renewing",
                "servingRetry",
                "stopped",
            ],
        )
        self.assertEqual(self.authority.cancelled, [HOST])
        self.flushLoggedErrors()

    def test_stopWhileRetrying(self) -> None:
        """
        Stopping while a failed renewal waits for its retry (and the certificate's expiry)
        cancels both timers; the certificate stays until then.
        """
        self.service.want(HOST)
        self.authority.complete(self.clock, 3 * RETRY_INITIAL)
        self.clock.advance(2 * RETRY_INITIAL)
        self.authority.orders[-1][2].errback(Failure(AcmeProblem("rate limited")))
        self.assertEqual(len(self.clock.getDelayedCalls()), 2)
        self.service.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.flushLoggedErrors()

    def test_storedCertificateReused(self) -> None:
        """
        After a restart, a stored certificate still valid is served at once without an order, and
        its renewal is scheduled from its own dates.
        """
        self.service.want(HOST)
        self.authority.complete(self.clock, 90 * DAY)
        self.clock.advance(DAY)
        self.service.stopService()
        restarted = self.makeService()
        restarted.want(HOST)
        self.assertEqual(len(self.authority.orders), 1)
        self.assertEqual(restarted.describe(HOST), "acme")
        self.assertTrue(self.events("acme-issued")[-1]["stored"])
        self.clock.advance(59 * DAY)
        self.assertEqual(len(self.authority.orders), 2)

    def test_expiredStoredCertificateReordered(self) -> None:
        """
        A stored certificate that has expired is not served; a new one is ordered.
        """
        keyPEM, csrPEM = keyAndCSR(HOST)
        old = NOW - datetime.timedelta(days=100)
        CertificateStore(self.storeDir).save(
            HOST, issueFromCSR(csrPEM, old, old + datetime.timedelta(days=90)), keyPEM
        )
        self.service.want(HOST)
        self.assertEqual(len(self.authority.orders), 1)
        self.assertIsNone(self.service.certificateFor(HOST))

    def test_unusableStoredCertificateReordered(self) -> None:
        """
        A stored certificate that cannot be used (its key readable by others) is not served; a
        new one is ordered, and its files replace the old ones.
        """
        keyPEM, csrPEM = keyAndCSR(HOST)
        store = CertificateStore(self.storeDir)
        store.save(HOST, issueFromCSR(csrPEM, NOW, NOW + datetime.timedelta(days=90)), keyPEM)
        os.chmod(os.path.join(self.storeDir, HOST, "key.pem"), 0o644)
        self.service.want(HOST)
        self.assertEqual(len(self.authority.orders), 1)
        self.assertIsNone(self.service.certificateFor(HOST))
        self.authority.complete(self.clock, 90 * DAY)
        self.assertEqual(self.service.describe(HOST), "acme")
        self.assertIsNotNone(store.load(HOST))
        self.flushLoggedErrors()

    def test_stopCancels(self) -> None:
        """
        Stopping cancels the order under way and every timer.
        """
        self.service.want(HOST)
        self.service.stopService()
        self.assertEqual(self.authority.cancelled, [HOST])
        self.assertEqual(self.events("acme-failed"), [])
        self.assertEqual(self.clock.getDelayedCalls(), [])
