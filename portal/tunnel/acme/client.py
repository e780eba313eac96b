"""
Ordering a certificate from an ACME CA (RFC 8555) with the TLS-ALPN-01 challenge (RFC 8737).

L{AcmeCA} drives certbot's C{acme} library, which is synchronous (C{requests}), from Twisted: every
call that talks to the CA runs in the reactor's thread pool with C{deferToThreadPool}, under a
timeout, while the steps that touch the tunnel (starting and stopping to answer a challenge) run in
the reactor thread. The reactor never blocks on the network.

The CA's problems come back as L{AcmeProblem}, whose message is the CA's own problem detail.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Any, TypeVar

import josepy as jose
import requests
from acme import challenges, client, errors, messages
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet.defer import CancelledError, Deferred, DeferredLock
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from portal import __version__
from portal.trust.acmechallenge import PendingChallenges

NETWORK_TIMEOUT = 30.0
"""
Seconds one request to the ACME server may take.
"""

ORDER_TIMEOUT = 120.0
"""
Seconds the CA may take to validate the challenges and issue the certificate of one order.
"""

TLS_ALPN_01 = "tls-alpn-01"
"""
The ACME challenge type of RFC 8737.
"""

BAD_NONCE_ATTEMPTS = 3
"""
How many times one call to the library is made while the CA answers C{badNonce} (the library
itself retries each request once more); CAs may reject any nonce (RFC 8555, section 6.5), and
pebble rejects 5% of them on purpose.
"""

POLL_SLICE = 5.0
"""
Seconds one call into the library's polling loops may take (see L{AcmeCA._poll}).
"""

_T = TypeVar("_T")


class TLSALPN01Response(challenges.KeyAuthorizationChallengeResponse):
    """
    The answer to a C{tls-alpn-01} challenge: an empty object (the key authorization is not sent;
    the CA finds its hash in the challenge certificate).
    """

    typ = TLS_ALPN_01


class TLSALPN01(challenges.KeyAuthorizationChallenge):
    """
    A C{tls-alpn-01} challenge (RFC 8737). Certbot's C{acme} library dropped its own class for it in
    version 4; this one restores the parsing, and L{challengeCertificate} does the rest.
    """

    response_cls = TLSALPN01Response
    typ = TLS_ALPN_01

    def validation(self, account_key: jose.JWK, **kwargs: Any) -> str:
        """
        @param account_key: The account key.
        @return: The key authorization, whose hash the challenge certificate carries.
        """
        return self.key_authorization(account_key)


if TLS_ALPN_01 not in challenges.Challenge.TYPES:
    # The library parses a challenge type it knows nothing about as UnrecognizedChallenge.
    challenges.ChallengeResponse.register(TLSALPN01Response)
    challenges.Challenge.register(TLSALPN01)


class AcmeProblem(Exception):
    """
    The ACME CA refused, failed, or could not be reached; the message says why, with the CA's own
    problem detail when there is one.
    """


class ICertificateAuthority(Interface):
    """
    Something that issues certificates for lease hostnames.
    """

    def issue(hostname: str, csrPEM: bytes, pending: PendingChallenges) -> Deferred[bytes]:
        """
        Order a certificate for C{hostname}, answering its challenges through C{pending}.

        @param hostname: The hostname, a lease hostname of the tunnel.
        @param csrPEM: The certificate signing request (PEM) for the certificate's key.
        @param pending: Where to put the challenge while the CA validates it.
        @return: A L{Deferred} firing with the PEM certificate chain, server certificate first, or
            failing with L{AcmeProblem}.
        """


@implementer(ICertificateAuthority)
class AcmeCA:
    """
    An ACME CA reached with certbot's C{acme} library, from a thread pool.

    The account is registered (or found again: the CA knows it by its key) on the first order and
    reused for the next ones. Orders run one at a time.
    """

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        directory: str,
        accountKey: ec.EllipticCurvePrivateKey,
        email: str | None = None,
        caFile: str | None = None,
        threadPool: Any = None,
    ) -> None:
        """
        @param reactor: The reactor (time and threads).
        @param directory: The ACME directory URL.
        @param accountKey: The account key (P-256).
        @param email: The contact address given to the CA.
        @param caFile: CA certificates (PEM) to verify the ACME server's HTTPS with, instead of the
            system's.
        @param threadPool: The thread pool for the blocking calls; the reactor's when L{None}.
        """
        self._reactor = reactor
        self.directory = directory
        self._key = jose.JWKEC(key=accountKey)
        self._email = email
        self._caFile = caFile
        self._threadPool = threadPool
        self._client: client.ClientV2 | None = None
        # The library's client is not safe to use from two threads at once: one order at a time.
        self._lock = DeferredLock()

    def _blocking(self, timeout: float, function: Callable[..., _T], *args: Any) -> Deferred[_T]:
        """
        Run a blocking call in the thread pool.

        @param timeout: Seconds after which the returned L{Deferred} fails (the thread itself stops
            at its own request timeout).
        @return: A L{Deferred} firing with the call's result.
        """
        pool = self._threadPool or self._reactor.getThreadPool()
        d: Deferred[_T] = deferToThreadPool(self._reactor, pool, _retryBadNonce, function, *args)
        d.addTimeout(timeout, self._reactor)
        return d

    def _connect(self) -> client.ClientV2:
        """
        Read the directory and register the account (blocking; runs in the thread pool).

        @return: A client whose network layer signs as the account.
        """
        network = client.ClientNetwork(
            self._key,
            alg=jose.ES256,
            user_agent=f"portal-tunnel/{__version__} acme-python",
            timeout=int(NETWORK_TIMEOUT),
        )
        if self._caFile is not None:
            # requests takes a CA bundle's path where acme's annotation says bool.
            network.verify_ssl = self._caFile  # type: ignore[assignment]
        acme = client.ClientV2(client.ClientV2.get_directory(self.directory, network), network)
        registration = messages.NewRegistration.from_data(
            email=self._email, terms_of_service_agreed=True
        )
        try:
            acme.new_account(registration)
        except errors.ConflictError as e:
            # The CA knows this key already: use that account.
            network.account = messages.RegistrationResource(
                uri=e.location, body=messages.Registration()
            )
        return acme

    async def _issue(self, hostname: str, csrPEM: bytes, pending: PendingChallenges) -> bytes:
        """
        See L{issue}.
        """
        acme = self._client
        if acme is None:
            acme = self._client = await self._blocking(NETWORK_TIMEOUT * 3, self._connect)
        order = await self._blocking(NETWORK_TIMEOUT, acme.new_order, csrPEM)
        answering: list[str] = []
        try:
            for authorization in order.authorizations:
                if authorization.body.status == messages.STATUS_VALID:
                    continue
                name = authorization.body.identifier.value
                challenge = _tlsALPN01(authorization)
                chall = challenge.chall
                assert isinstance(chall, challenges.KeyAuthorizationChallenge)
                pending.add(name, chall.key_authorization(self._key))
                answering.append(name)
                await self._blocking(
                    NETWORK_TIMEOUT,
                    acme.answer_challenge,
                    challenge,
                    chall.response(self._key),
                )
            order = await self._poll(acme, order)
        finally:
            for name in answering:
                pending.remove(name)
        if not order.fullchain_pem:
            raise AcmeProblem(f"the ACME server issued no certificate for {hostname}")
        return order.fullchain_pem.encode("ascii")

    async def _poll(
        self, acme: client.ClientV2, order: messages.OrderResource
    ) -> messages.OrderResource:
        """
        Wait for the CA to validate the order's challenges, then finalize it and wait for the
        certificate, for at most L{ORDER_TIMEOUT} seconds in all.

        The library polls in a loop that sleeps; each call here is given only L{POLL_SLICE}
        seconds of it, so that no thread of the pool (which the reactor joins when it stops) stays
        busy for long.

        @return: The order, with its certificate chain.
        @raise errors.TimeoutError: When the CA takes longer.
        """
        deadline = self._reactor.seconds() + ORDER_TIMEOUT
        timeout = POLL_SLICE + NETWORK_TIMEOUT * 2
        authorized = await self._sliced(deadline, timeout, acme.poll_authorizations, order)
        assert authorized is not None
        finalized = await self._sliced(
            deadline, timeout, acme.finalize_order, authorized, once=True
        )
        if finalized is None:
            finalized = await self._sliced(deadline, timeout, acme.poll_finalization, authorized)
        assert finalized is not None
        return finalized

    async def _sliced(
        self,
        deadline: float,
        timeout: float,
        poll: Callable[[messages.OrderResource, datetime.datetime], messages.OrderResource],
        order: messages.OrderResource,
        once: bool = False,
    ) -> messages.OrderResource | None:
        """
        Call one of the library's polling methods with a deadline L{POLL_SLICE} seconds away,
        again and again while it times out, until C{deadline} (the reactor's time).

        @param once: Make one call only, and return L{None} if it times out.
        @return: What C{poll} returned (L{None} only with C{once}).
        @raise errors.TimeoutError: When C{deadline} passes first.
        """
        while True:
            until = datetime.datetime.now() + datetime.timedelta(seconds=POLL_SLICE)
            try:
                return await self._blocking(timeout, poll, order, until)
            except errors.TimeoutError:
                if once:
                    return None
                if self._reactor.seconds() >= deadline:
                    raise

    def issue(self, hostname: str, csrPEM: bytes, pending: PendingChallenges) -> Deferred[bytes]:
        """
        Order a certificate: new order, answer each TLS-ALPN-01 challenge, wait for validation and
        issuance, download the chain.

        @param hostname: The hostname.
        @param csrPEM: The CSR (PEM).
        @param pending: Where the challenge certificates go while the CA validates.
        @return: A L{Deferred} firing with the PEM chain, or failing with L{AcmeProblem}.
        """
        d: Deferred[bytes] = self._lock.run(
            lambda: Deferred.fromCoroutine(self._issue(hostname, csrPEM, pending))
        )
        d.addErrback(_raiseProblem, self.directory)
        return d


def _retryBadNonce(function: Callable[..., _T], *args: Any) -> _T:
    """
    Call C{function}, again while the CA refuses its nonce, at most L{BAD_NONCE_ATTEMPTS} times
    (blocking; runs in the thread pool).

    @return: What C{function} returned.
    @raise messages.Error: The CA's last refusal, or any other.
    """
    for attempt in range(1, BAD_NONCE_ATTEMPTS + 1):
        try:
            return function(*args)
        except messages.Error as e:
            if e.code != "badNonce" or attempt == BAD_NONCE_ATTEMPTS:
                raise
    raise AssertionError("unreachable")


def _tlsALPN01(authorization: messages.AuthorizationResource) -> messages.ChallengeBody:
    """
    Find the TLS-ALPN-01 challenge of an authorization.

    @raise AcmeProblem: When the CA offers none.
    """
    offered = []
    for challenge in authorization.body.challenges:
        chall = challenge.chall
        if chall.typ == TLS_ALPN_01 and isinstance(chall, challenges.KeyAuthorizationChallenge):
            return challenge
        offered.append(challenge.chall.typ)
    raise AcmeProblem(
        f"the ACME server offers no tls-alpn-01 challenge for "
        f"{authorization.body.identifier.value} (only {', '.join(offered) or 'none'})"
    )


def describeProblem(error: BaseException, directory: str) -> str:
    """
    Say in one sentence why an order failed, with the CA's problem detail.

    @param error: What the order raised.
    @param directory: The ACME directory, for messages about reaching it.
    @return: The sentence.
    """
    if isinstance(error, AcmeProblem):
        return str(error)
    if isinstance(error, errors.ValidationError):
        details = []
        for authorization in error.failed_authzrs:
            for challenge in authorization.body.challenges:
                if challenge.error is not None:
                    details.append(
                        f"{authorization.body.identifier.value}: {_problem(challenge.error)}"
                    )
        return "the CA could not validate the challenge: " + "; ".join(details)
    if isinstance(error, errors.IssuanceError):
        return f"the CA refused to issue: {_problem(error.error)}"
    if isinstance(error, messages.Error):
        return f"the CA refused: {_problem(error)}"
    if isinstance(error, errors.TimeoutError):
        return f"the CA did not finish validating within {ORDER_TIMEOUT:.0f} s"
    if isinstance(error, requests.exceptions.SSLError):
        return (
            f"cannot verify the ACME server's certificate at {directory} (give its CA with "
            f"--acme-ca): {error}"
        )
    if isinstance(error, requests.exceptions.RequestException):
        return f"cannot reach the ACME server at {directory}: {error}"
    if isinstance(error, errors.Error):
        return f"ACME error: {error}"
    from twisted.internet.defer import TimeoutError as DeferredTimeout

    if isinstance(error, DeferredTimeout):
        return f"the ACME server at {directory} did not answer in time"
    return f"{type(error).__name__}: {error}"


def _problem(error: messages.Error) -> str:
    """
    @return: An ACME problem document as C{detail (type)}, with its subproblems.
    """
    text = error.detail or error.description or "no detail"
    if error.code:
        text += f" ({error.code})"
    for sub in error.subproblems or ():
        text += f"; {sub.detail or sub.code}"
    return text


def _raiseProblem(failure: Failure, directory: str) -> bytes:
    """
    Turn whatever an order raised into an L{AcmeProblem} with a clear message.

    @raise AcmeProblem: Always (a cancellation is passed on as it is).
    """
    failure.trap(Exception)
    error = failure.value
    assert error is not None
    if isinstance(error, CancelledError):
        raise error
    if isinstance(error, AcmeProblem):
        raise error
    raise AcmeProblem(describeProblem(error, directory)) from error
