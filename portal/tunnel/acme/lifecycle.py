"""
The lifecycle of one lease hostname's ACME certificate, as an automat machine
(L{certificateMachine}; table and picture in C{docs/lifecycles.md}).

```
                 useStored                       due (renewal time)
   idle ─────────────────────────► serving ──────────────────────────► renewing
    │ order                          ▲  ▲ issued                        │  │ failed
    ▼                        issued  │  └───────────────────────────────┘  ▼
   ordering ─────────────────────────┘                               servingRetry
    │ failed  ▲ due (retry)                                    due ──► renewing
    ▼         │                                                expired │
   waitingRetry ◄──────────────────────────────────────────────────────┘
                 (from renewing, expired goes to ordering)
   every state ── stop ──► stopped (timers and the order under way cancelled)
```

In C{idle}, C{ordering} and C{waitingRetry} the local CA's certificate serves; in C{serving},
C{renewing} and C{servingRetry} the ACME certificate does. The machine's outputs do the reporting,
the timers and start the orders; what ends an order (C{issued}, C{failed}) comes from
L{portal.tunnel.acme.certificates.AcmeCertificates}, which stores the certificate first. Any other
input in a state is late news and is ignored.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Any, ClassVar, Protocol

import attrs
from automat import TypeMachine, TypeMachineBuilder
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from portal.trust.acmechallenge import PendingChallenges
from portal.trust.acmestore import StoredCertificate
from portal.tunnel.acme.client import ICertificateAuthority
from portal.tunnel.handledinputs import HandledInputs
from portal.tunnel.report import Reporter

RETRY_INITIAL = 300.0
"""
Seconds before the first retry of a failed order; each further failure doubles it.  Let's
Encrypt allows five failed validations per hostname and hour: this stays below.
"""

RETRY_MAX = 4 * 3600.0
"""
The longest wait between two attempts.
"""

MIN_RENEWAL_DELAY = 10.0
"""
The fewest seconds between an issuance and the renewal it schedules, whatever
C{--acme-renew-before} says (a renew-before longer than the lifetime falls back to two thirds).
"""


def renewalTime(
    notBefore: datetime.datetime, notAfter: datetime.datetime, renewBefore: float | None
) -> datetime.datetime:
    """
    When to renew a certificate.

    @param notBefore: When it became valid.
    @param notAfter: When it expires.
    @param renewBefore: Seconds before expiry to renew, or L{None}.
    @return: C{renewBefore} seconds before C{notAfter} when given and shorter than the lifetime;
        else two thirds into the lifetime.
    """
    lifetime = notAfter - notBefore
    if renewBefore is not None and datetime.timedelta(seconds=renewBefore) < lifetime:
        return notAfter - datetime.timedelta(seconds=renewBefore)
    return notBefore + lifetime * 2 / 3


def retryDelay(failures: int) -> float:
    """
    @param failures: Failed attempts in a row, at least one.
    @return: Seconds to wait before the next attempt: L{RETRY_INITIAL}, doubled per further
        failure, at most L{RETRY_MAX}.
    """
    return min(RETRY_INITIAL * 2.0 ** (failures - 1), RETRY_MAX)


def describeWait(seconds: float) -> str:
    """
    @return: A duration for humans (C{45 s}, C{12 min}, C{3.5 h}, C{20 days}).
    """
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} days"


def iso(when: datetime.datetime) -> str:
    """
    @return: C{when} as ISO 8601 in UTC, to the second.
    """
    return when.astimezone(datetime.UTC).replace(microsecond=0).isoformat()


class CertificateLifecycle(Protocol):
    """
    The inputs of one hostname's certificate machine.
    """

    def useStored(self, certificate: StoredCertificate) -> None:
        """
        A valid certificate was found in the store: serve it.
        """

    def order(self) -> None:
        """
        There is no usable certificate: order one.
        """

    def due(self) -> None:
        """
        The renewal or retry timer fired: order again.
        """

    def issued(self, certificate: StoredCertificate) -> None:
        """
        The order under way gave this certificate (already stored).
        """

    def failed(self, problem: str) -> None:
        """
        The order under way failed.

        @param problem: Why, in one sentence with the CA's detail.
        """

    def expired(self) -> None:
        """
        The serving certificate expired with no renewal.
        """

    def stop(self) -> None:
        """
        The tunnel stops: cancel the timers and the order under way.
        """

    def state(self) -> str:
        """
        @return: The name of the current state.
        """


@attrs.define
class HostnameCertificate:
    """
    What the machine of one hostname works on: its certificate, timers and order.

    @ivar name: The hostname.
    @ivar clock: The reactor's clock.
    @ivar authority: Orders certificates.
    @ivar challenges: Where challenge certificates go while the CA validates.
    @ivar reporter: Where C{acme-*} events go.
    @ivar directory: The ACME directory, for messages.
    @ivar renewBefore: C{--acme-renew-before} in seconds, or L{None}.
    @ivar onChange: Called with the hostname when the serving certificate changes.
    @ivar onDue: Called when the renewal or retry timer fires.
    @ivar onExpired: Called when the serving certificate expires while renewals fail.
    @ivar current: The ACME certificate serving, or L{None} while the local CA's serves.
    @ivar keyPEM: The private key of the order under way.
    @ivar failures: Failed orders in a row.
    @ivar timer: The renewal or retry timer.
    @ivar expiry: The expiry timer, while renewals fail.
    @ivar ordering: The order under way.
    @ivar started: An order started by the last input, for L{takeStarted}.
    """

    name: str
    clock: Any
    authority: ICertificateAuthority
    challenges: PendingChallenges
    reporter: Reporter
    directory: str
    renewBefore: float | None
    onChange: Callable[[str], None]
    onDue: Callable[[], None]
    onExpired: Callable[[], None]
    current: StoredCertificate | None = None
    keyPEM: bytes = b""
    failures: int = 0
    timer: Any = None
    expiry: Any = None
    ordering: Deferred[bytes] | None = None
    started: Deferred[bytes] | None = None
    log: ClassVar[Logger] = Logger()

    def now(self) -> datetime.datetime:
        """
        @return: The clock's time, as an aware UTC datetime.
        """
        return datetime.datetime.fromtimestamp(self.clock.seconds(), datetime.UTC)

    def install(self, certificate: StoredCertificate | None) -> None:
        """
        Serve C{certificate} (or the local CA's) for new handshakes from now on.
        """
        self.current = certificate
        self.onChange(self.name)

    def setTimer(self, delay: float) -> None:
        """
        Fire C{onDue} after C{delay} seconds, replacing the timer set before.
        """
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = self.clock.callLater(delay, self.onDue)

    def cancelTimers(self) -> None:
        """
        Cancel the renewal, retry and expiry timers.
        """
        for timer in (self.timer, self.expiry):
            if timer is not None and timer.active():
                timer.cancel()
        self.timer = self.expiry = None

    def scheduleRenewal(self, afterIssue: bool) -> None:
        """
        Set the renewal timer of the current certificate.

        @param afterIssue: Whether it was just issued (the renewal is then at least
            L{MIN_RENEWAL_DELAY} seconds away).
        """
        assert self.current is not None
        due = renewalTime(self.current.notBefore, self.current.notAfter, self.renewBefore)
        delay = (due - self.now()).total_seconds()
        if afterIssue:
            delay = max(delay, MIN_RENEWAL_DELAY)
        self.setTimer(max(delay, 0.0))
        self.log.info(
            "ACME certificate of {hostname}: renewal due in {delay:.0f} s",
            hostname=self.name,
            delay=delay,
        )

    def startOrder(self, renewal: bool) -> Deferred[bytes]:
        """
        Report and start an order: a new P-256 key, a CSR for the hostname, the authority.

        @param renewal: Whether a certificate serves already.
        @return: The order.
        """
        self.timer = None
        self.reporter.state(
            "acme-ordering",
            "",
            f"{self.name}: {'renewing' if renewal else 'ordering'} a certificate from "
            f"{self.directory}"
            + ("" if renewal else " (the local CA's serves until it is issued)"),
            hostname=self.name,
            renewal=renewal,
        )
        key = ec.generate_private_key(ec.SECP256R1())
        self.keyPEM = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([]))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(self.name)]), critical=False)
            .sign(key, hashes.SHA256())
        )
        self.ordering = self.started = self.authority.issue(
            self.name, csr.public_bytes(serialization.Encoding.PEM), self.challenges
        )
        return self.ordering

    def takeStarted(self) -> Deferred[bytes] | None:
        """
        @return: The order the last input started, if it started one (once): the caller watches
            it outside the machine, so that an order ending at once is not an input given while
            the machine is still in a transition.
        """
        started, self.started = self.started, None
        return started

    def reportIssued(self, event: str, stored: bool) -> None:
        """
        Report the certificate now serving.

        @param event: C{acme-issued} or C{acme-renewed}.
        @param stored: Whether it came from the store rather than the CA.
        """
        certificate = self.current
        assert certificate is not None
        if stored:
            message = f"using the stored ACME certificate, valid until {iso(certificate.notAfter)}"
        else:
            message = (
                f"{'renewed' if event == 'acme-renewed' else 'issued'} a certificate by "
                f"{self.directory}, valid until {iso(certificate.notAfter)}"
            )
        self.reporter.state(
            event,
            "",
            f"{self.name}: {message}",
            hostname=self.name,
            notAfter=iso(certificate.notAfter),
            serial=f"{certificate.serial:x}",
            stored=stored,
        )

    def retryAfterFailure(self, problem: str) -> None:
        """
        Report a failed order once, with what keeps serving, and set the retry timer (and, when
        the serving certificate expires before the retry, the expiry timer).
        """
        self.ordering = None
        self.failures += 1
        delay = retryDelay(self.failures)
        current = self.current
        now = self.now()
        expires: str | None = None
        if current is not None:
            expires = iso(current.notAfter)
            left = max((current.notAfter - now).total_seconds(), 0.0)
            serving = (
                f"the current certificate keeps serving; it expires at {expires}, in "
                f"{describeWait(left)}"
            )
            if left <= delay and (self.expiry is None or not self.expiry.active()):
                self.expiry = self.clock.callLater(left, self.onExpired)
        else:
            serving = "the local CA's certificate keeps serving"
        self.reporter.state(
            "acme-failed",
            "",
            f"{self.name}: cannot get a certificate from {self.directory}: {problem}. {serving}; "
            f"retrying in {describeWait(delay)}",
            hostname=self.name,
            problem=problem,
            retryIn=delay,
            expires=expires,
        )
        self.log.warn(
            "ACME order for {hostname} failed: {problem}", hostname=self.name, problem=problem
        )
        self.setTimer(delay)

    def succeeded(self, certificate: StoredCertificate) -> None:
        """
        An order gave C{certificate}: serve it and schedule its renewal.
        """
        self.ordering = None
        self.failures = 0
        if self.expiry is not None and self.expiry.active():
            self.expiry.cancel()
        self.expiry = None
        self.install(certificate)


def _buildMachine() -> TypeMachine[CertificateLifecycle, HostnameCertificate]:
    """
    Describe the certificate lifecycle; see the module docstring.
    """
    machine = TypeMachineBuilder(CertificateLifecycle, HostnameCertificate)
    states = {
        name: machine.state(name)
        for name in (
            "idle",
            "ordering",
            "waitingRetry",
            "serving",
            "renewing",
            "servingRetry",
            "stopped",
        )
    }
    idle, ordering, waitingRetry = states["idle"], states["ordering"], states["waitingRetry"]
    serving, renewing, servingRetry = states["serving"], states["renewing"], states["servingRetry"]
    stopped = states["stopped"]
    #: (state, input) pairs given a transition below; the rest are ignored (see the end).
    handled = HandledInputs(states)
    on = handled.on

    @idle.upon(CertificateLifecycle.useStored).to(serving)
    def serveStored(
        inputs: CertificateLifecycle, core: HostnameCertificate, certificate: StoredCertificate
    ) -> None:
        core.install(certificate)
        core.reportIssued("acme-issued", stored=True)
        core.scheduleRenewal(afterIssue=False)

    on(idle, "useStored")

    @idle.upon(CertificateLifecycle.order).to(ordering)
    @waitingRetry.upon(CertificateLifecycle.due).to(ordering)
    def orderFirst(inputs: CertificateLifecycle, core: HostnameCertificate) -> None:
        core.startOrder(renewal=False)

    on(idle, "order")
    on(waitingRetry, "due")

    @serving.upon(CertificateLifecycle.due).to(renewing)
    @servingRetry.upon(CertificateLifecycle.due).to(renewing)
    def orderRenewal(inputs: CertificateLifecycle, core: HostnameCertificate) -> None:
        core.startOrder(renewal=True)

    on(serving, "due")
    on(servingRetry, "due")

    @ordering.upon(CertificateLifecycle.issued).to(serving)
    @renewing.upon(CertificateLifecycle.issued).to(serving)
    def serveIssued(
        inputs: CertificateLifecycle, core: HostnameCertificate, certificate: StoredCertificate
    ) -> None:
        # A renewal replaces a serving certificate; a first order (or one after an expiry) none.
        event = "acme-issued" if core.current is None else "acme-renewed"
        core.succeeded(certificate)
        core.reportIssued(event, stored=False)
        core.scheduleRenewal(afterIssue=True)

    on(ordering, "issued")
    on(renewing, "issued")

    @ordering.upon(CertificateLifecycle.failed).to(waitingRetry)
    @renewing.upon(CertificateLifecycle.failed).to(servingRetry)
    def retryLater(inputs: CertificateLifecycle, core: HostnameCertificate, problem: str) -> None:
        core.retryAfterFailure(problem)

    on(ordering, "failed")
    on(renewing, "failed")

    @servingRetry.upon(CertificateLifecycle.expired).to(waitingRetry)
    @renewing.upon(CertificateLifecycle.expired).to(ordering)
    def serveLocalCA(inputs: CertificateLifecycle, core: HostnameCertificate) -> None:
        core.expiry = None
        core.install(None)

    on(servingRetry, "expired")
    on(renewing, "expired")

    @idle.upon(CertificateLifecycle.stop).to(stopped)
    @ordering.upon(CertificateLifecycle.stop).to(stopped)
    @waitingRetry.upon(CertificateLifecycle.stop).to(stopped)
    @serving.upon(CertificateLifecycle.stop).to(stopped)
    @renewing.upon(CertificateLifecycle.stop).to(stopped)
    @servingRetry.upon(CertificateLifecycle.stop).to(stopped)
    def cancelAll(inputs: CertificateLifecycle, core: HostnameCertificate) -> None:
        core.cancelTimers()
        if core.ordering is not None:
            order, core.ordering = core.ordering, None
            order.cancel()

    for state in (idle, ordering, waitingRetry, serving, renewing, servingRetry):
        on(state, "stop")

    # Everything else is late or repeated news (the end of an order cancelled by the stop, a
    # timer that fired as it was replaced): it changes nothing.
    handled.ignoreTheRest(CertificateLifecycle)
    return machine.build()


#: The certificate lifecycle, built once; each hostname runs its own instance.
certificateMachine = _buildMachine()
