"""
Tests for L{portal.tunnel.acme.client}: the TLS-ALPN-01 challenge type and the messages made of the
CA's problems. Orders against a real ACME server are in L{tests.test_e2e_acme}.
"""

from __future__ import annotations

from typing import Any

import josepy as jose
import requests
from acme import challenges, errors, messages
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from portal.trust.acmechallenge import PendingChallenges
from portal.tunnel.acme.client import (
    BAD_NONCE_ATTEMPTS,
    NETWORK_TIMEOUT,
    ORDER_TIMEOUT,
    POLL_SLICE,
    TLSALPN01,
    AcmeCA,
    AcmeProblem,
    _retryBadNonce,
    _tlsALPN01,
    describeProblem,
)

DIRECTORY = "https://ca.test/dir"


def _authorization(challengeType: str, error: messages.Error | None = None) -> Any:
    """
    @return: An authorization resource for C{blog.portal.test} with one challenge of this type.
    """
    challenge = messages.ChallengeBody.from_json(
        {
            "type": challengeType,
            "url": "https://ca.test/chall/1",
            "status": "invalid" if error else "pending",
            "token": "c2l4dGVlbi1ieXRlLXRvaw",
            **({"error": error.to_json()} if error else {}),
        }
    )
    body = messages.Authorization(
        identifier=messages.Identifier(typ=messages.IDENTIFIER_FQDN, value="blog.portal.test"),
        challenges=[challenge],
        status=messages.STATUS_INVALID if error else messages.STATUS_PENDING,
    )
    return messages.AuthorizationResource(body=body, uri="https://ca.test/authz/1")


class ChallengeTypeTests(SynchronousTestCase):
    """
    The C{tls-alpn-01} challenge as the library parses it with L{TLSALPN01} registered.
    """

    def test_parsed(self) -> None:
        """
        A C{tls-alpn-01} challenge from the CA parses as L{TLSALPN01}; its key authorization is the
        token and the account key's thumbprint, and its answer is an empty object.
        """
        key = jose.JWKEC(key=ec.generate_private_key(ec.SECP256R1()))
        found = _tlsALPN01(_authorization("tls-alpn-01"))
        self.assertIsInstance(found.chall, TLSALPN01)
        assert isinstance(found.chall, challenges.KeyAuthorizationChallenge)
        thumbprint = jose.b64encode(key.thumbprint()).decode()
        self.assertEqual(found.chall.key_authorization(key), f"c2l4dGVlbi1ieXRlLXRvaw.{thumbprint}")
        self.assertNotIn("keyAuthorization", found.chall.response(key).to_partial_json())

    def test_noTLSALPN01(self) -> None:
        """
        A CA that offers no C{tls-alpn-01} challenge is a clear problem naming what it offers.
        """
        e = self.assertRaises(AcmeProblem, _tlsALPN01, _authorization("http-01"))
        self.assertIn("no tls-alpn-01 challenge for blog.portal.test (only http-01)", str(e))


class DescribeProblemTests(SynchronousTestCase):
    """
    Tests for L{describeProblem}: one sentence, with the CA's own detail.
    """

    def test_validationFailed(self) -> None:
        """
        A failed validation names the hostname and gives the CA's detail and problem type.
        """
        error = messages.Error.with_code("connection", detail="127.0.0.2: connection refused")
        message = describeProblem(
            errors.ValidationError([_authorization("tls-alpn-01", error)]), DIRECTORY
        )
        self.assertEqual(
            message,
            "the CA could not validate the challenge: blog.portal.test: "
            "127.0.0.2: connection refused (connection)",
        )

    def test_refused(self) -> None:
        """
        A problem document from the CA (a rate limit, a CAA record) gives its detail and type.
        """
        error = messages.Error.with_code("rateLimited", detail="too many certificates")
        self.assertEqual(
            describeProblem(error, DIRECTORY),
            "the CA refused: too many certificates (rateLimited)",
        )
        caa = messages.Error.with_code("caa", detail="CAA record forbids issuance")
        self.assertIn("CAA record forbids issuance (caa)", describeProblem(caa, DIRECTORY))

    def test_unreachable(self) -> None:
        """
        A network failure names the directory; a certificate failure says to use C{--acme-ca}.
        """
        message = describeProblem(requests.exceptions.ConnectionError("refused"), DIRECTORY)
        self.assertEqual(message, f"cannot reach the ACME server at {DIRECTORY}: refused")
        message = describeProblem(requests.exceptions.SSLError("bad certificate"), DIRECTORY)
        self.assertIn("--acme-ca", message)

    def test_timeouts(self) -> None:
        """
        The CA taking too long to validate, and no answer in time, are said as such.
        """
        self.assertIn(
            "did not finish validating", describeProblem(errors.TimeoutError(), DIRECTORY)
        )
        self.assertIn("did not answer in time", describeProblem(DeferredTimeout(), DIRECTORY))


class _ThreadlessClock(Clock):
    """
    A clock that is also the reactor threads report back to (at once, in the test's thread).
    """

    def callFromThread(self, f: Any, *args: Any) -> None:
        """
        Call C{f} now.
        """
        f(*args)


class _FakePool:
    """
    A thread pool that runs calls at once, except those of functions named in C{hang}, which never
    return.

    @ivar calls: The names of the functions called, in order.
    """

    def __init__(self, hang: set[str]) -> None:
        self.hang = hang
        self.calls: list[str] = []

    def callInThreadWithCallback(self, onResult: Any, f: Any, *args: Any) -> None:
        """
        Run C{f} and report its result, unless it hangs.
        """
        # AcmeCA runs every call through _retryBadNonce: name the call it wraps.
        name = getattr(args[0], "__name__", repr(args[0]))
        self.calls.append(name)
        if name in self.hang:
            return
        try:
            result = f(*args)
        except Exception as e:
            onResult(False, Failure(e))
        else:
            onResult(True, result)


class _SlowValidationClient:
    """
    An ACME client whose CA never finishes validating: each poll takes L{POLL_SLICE} seconds of
    the clock and times out.
    """

    def __init__(self, clock: Clock, pending: PendingChallenges) -> None:
        self.clock = clock
        self.pending = pending
        self.sawPending: list[bool] = []

    def new_order(self, csrPEM: bytes) -> Any:
        """
        @return: An order with one pending tls-alpn-01 authorization.
        """
        return messages.OrderResource(
            body=messages.Order(), authorizations=[_authorization("tls-alpn-01")], csr_pem=csrPEM
        )

    def answer_challenge(self, challenge: Any, response: Any) -> None:
        """
        Record whether the challenge is being answered while the CA is told to validate.
        """
        self.sawPending.append(self.pending.isPending("blog.portal.test"))

    def poll_authorizations(self, order: Any, deadline: Any) -> Any:
        """
        Take a slice of time and time out.
        """
        self.clock.advance(POLL_SLICE)
        raise errors.TimeoutError()


class BadNonceTests(SynchronousTestCase):
    """
    Calls the CA refuses with C{badNonce} are made again, a bounded number of times.
    """

    def refusing(self, refusals: int) -> tuple[Any, list[int]]:
        """
        @return: A function that fails with C{badNonce} C{refusals} times, then returns 7, and the
            list its calls are counted in.
        """
        calls: list[int] = []

        def call() -> int:
            calls.append(1)
            if len(calls) <= refusals:
                raise messages.Error.with_code("badNonce", detail="stale")
            return 7

        return call, calls

    def test_retried(self) -> None:
        """
        A call refused for its nonce fewer than L{BAD_NONCE_ATTEMPTS} times succeeds.
        """
        call, calls = self.refusing(BAD_NONCE_ATTEMPTS - 1)
        self.assertEqual(_retryBadNonce(call), 7)
        self.assertEqual(len(calls), BAD_NONCE_ATTEMPTS)

    def test_bounded(self) -> None:
        """
        After L{BAD_NONCE_ATTEMPTS} refusals the CA's error is raised; other errors are not
        retried.
        """
        call, calls = self.refusing(BAD_NONCE_ATTEMPTS)
        e = self.assertRaises(messages.Error, _retryBadNonce, call)
        self.assertEqual((e.code, len(calls)), ("badNonce", BAD_NONCE_ATTEMPTS))

        def refused() -> None:
            calls.append(1)
            raise messages.Error.with_code("rateLimited", detail="too many")

        del calls[:]
        self.assertRaises(messages.Error, _retryBadNonce, refused)
        self.assertEqual(len(calls), 1)


class AcmeCATimeoutTests(SynchronousTestCase):
    """
    L{AcmeCA}'s limits on how long the CA may take, on a clock with a fake thread pool.
    """

    def test_unansweredServer(self) -> None:
        """
        When the directory and account requests never come back, the order fails after three
        network timeouts with a message saying the server did not answer.
        """
        clock = _ThreadlessClock()
        pool = _FakePool({"_connect"})
        ca = AcmeCA(clock, DIRECTORY, ec.generate_private_key(ec.SECP256R1()), threadPool=pool)
        d = ca.issue("blog.portal.test", b"csr", PendingChallenges())
        clock.advance(NETWORK_TIMEOUT * 3 - 1)
        self.assertNoResult(d)
        clock.advance(1)
        failure = self.failureResultOf(d, AcmeProblem)
        self.assertIn(f"the ACME server at {DIRECTORY} did not answer in time", str(failure.value))

    def test_validationTimeout(self) -> None:
        """
        The challenge is answered while the CA validates; the CA is polled in slices of
        L{POLL_SLICE} seconds, for L{ORDER_TIMEOUT} seconds in all; then the order fails with a
        clear message and the challenge is no longer answered.
        """
        clock = _ThreadlessClock()
        pool = _FakePool(set())
        pending = PendingChallenges()
        ca = AcmeCA(clock, DIRECTORY, ec.generate_private_key(ec.SECP256R1()), threadPool=pool)
        client = _SlowValidationClient(clock, pending)
        ca._client = client  # type: ignore[assignment]
        d = ca.issue("blog.portal.test", b"csr", pending)
        failure = self.failureResultOf(d, AcmeProblem)
        self.assertIn("did not finish validating within 120 s", str(failure.value))
        self.assertEqual(client.sawPending, [True])
        self.assertFalse(pending.isPending("blog.portal.test"))
        self.assertEqual(pool.calls.count("poll_authorizations"), ORDER_TIMEOUT / POLL_SLICE)
