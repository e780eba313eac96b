"""
Keeping every lease hostname's ACME certificate issued and renewed.

L{AcmeCertificates} is told each lease hostname once a relay has granted it (the CA's validation
connection must reach the tunnel through the relay). For each one it uses the stored certificate if
there is a valid one, orders one otherwise, and renews it in the background at two thirds of its
lifetime (or C{--acme-renew-before} before expiry), each hostname with its own state machine
(L{portal.tunnel.acme.lifecycle}). A new certificate is swapped in for new
handshakes only: open connections keep theirs. A failed order is reported with the CA's problem
detail and retried with backoff, while the previous certificate (or, before the first one, the local
CA's) keeps serving.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import attrs
from OpenSSL.crypto import X509, PKey
from twisted.application.service import Service
from twisted.internet.defer import CancelledError
from twisted.logger import Logger
from twisted.python.failure import Failure

from portal.trust.acmechallenge import PendingChallenges
from portal.trust.acmestore import (
    CertificateStore,
    accountKeyPath,
    directoryName,
    loadOrCreateAccountKey,
)
from portal.trust.localca import CertificateError, normalizeHostname
from portal.tunnel.acme.client import AcmeCA, ICertificateAuthority, describeProblem
from portal.tunnel.acme.lifecycle import (
    CertificateLifecycle,
    HostnameCertificate,
    certificateMachine,
)
from portal.tunnel.acme.settings import AcmeSettings
from portal.tunnel.report import Reporter


@attrs.frozen
class _Hostname:
    """
    One hostname's certificate: what its machine works on, and the machine.
    """

    core: HostnameCertificate
    machine: CertificateLifecycle


class AcmeCertificates(Service):
    """
    The ACME certificates of a tunnel's lease hostnames, one L{certificateMachine} each.

    @ivar challenges: The TLS-ALPN-01 challenges being answered, for the stream handler.
    @ivar directory: The ACME directory, for messages.
    """

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        authority: ICertificateAuthority,
        store: CertificateStore,
        reporter: Reporter,
        onChange: Callable[[str], None],
        renewBefore: float | None = None,
        directory: str = "",
    ) -> None:
        """
        @param reactor: The clock (C{seconds}, C{callLater}).
        @param authority: Orders certificates.
        @param store: Where certificates are kept.
        @param reporter: Where C{acme-*} events go.
        @param onChange: Called with a hostname when its certificate changes (to drop cached TLS
            contexts).
        @param renewBefore: Seconds before expiry to renew, or L{None} for two thirds of the
            lifetime.
        @param directory: The ACME directory URL, for messages.
        """
        self._reactor = reactor
        self._authority = authority
        self._store = store
        self._reporter = reporter
        self._onChange = onChange
        self._renewBefore = renewBefore
        self.directory = directory
        self.challenges = PendingChallenges()
        self._hostnames: dict[str, _Hostname] = {}

    def certificateFor(self, hostname: str) -> tuple[PKey, list[X509]] | None:
        """
        @param hostname: A lease hostname.
        @return: Its ACME certificate's key and chain, or L{None} when it has none (yet, or any
            more): the local CA's then serves.
        """
        entry = self._hostnames.get(normalizeHostname(hostname))
        if entry is None or entry.core.current is None:
            return None
        return entry.core.current.privateKey, entry.core.current.chain

    def describe(self, hostname: str) -> str:
        """
        @param hostname: A lease hostname.
        @return: C{"acme"} when it has an ACME certificate, else C{"local-ca"}.
        """
        return "local-ca" if self.certificateFor(hostname) is None else "acme"

    def want(self, hostname: str) -> None:
        """
        Make sure a lease hostname gets a certificate: use the stored one or order one. Called
        each time a relay grants the lease; only the first call for a hostname does anything.

        @param hostname: The lease hostname.
        """
        name = normalizeHostname(hostname)
        if name in self._hostnames or not self.running:
            return
        core = HostnameCertificate(
            name=name,
            clock=self._reactor,
            authority=self._authority,
            challenges=self.challenges,
            reporter=self._reporter,
            directory=self.directory,
            renewBefore=self._renewBefore,
            onChange=self._onChange,
            onDue=lambda: self._give(entry, entry.machine.due),
            onExpired=lambda: entry.machine.expired(),
        )
        entry = self._hostnames[name] = _Hostname(core, certificateMachine(core))
        try:
            stored = self._store.load(name)
        except CertificateError as e:
            self._log.warn(
                "the stored ACME certificate of {hostname} is unusable ({error}); ordering a new one",
                hostname=name,
                error=str(e),
            )
            stored = None
        if stored is None or stored.notAfter <= core.now():
            self._give(entry, entry.machine.order)
        else:
            entry.machine.useStored(stored)

    def lifecycle(self, hostname: str) -> str | None:
        """
        @param hostname: A lease hostname.
        @return: The state of its certificate's machine, or L{None} for a hostname never wanted.
        """
        entry = self._hostnames.get(normalizeHostname(hostname))
        return None if entry is None else entry.machine.state()

    def _give(self, entry: _Hostname, input: Callable[[], None]) -> None:
        """
        Give a machine an input that may start an order, then watch the order it started.
        """
        input()
        order = entry.core.takeStarted()
        if order is None:
            return

        def received(chainPEM: bytes) -> None:
            certificate = self._store.save(entry.core.name, chainPEM, entry.core.keyPEM)
            entry.machine.issued(certificate)

        def failed(failure: Failure) -> None:
            if failure.check(CancelledError) and not self.running:
                return
            entry.machine.failed(
                describeProblem(
                    failure.value or Exception(failure.getErrorMessage()), self.directory
                )
            )

        order.addCallback(received)
        order.addErrback(failed)

    def stopService(self) -> Any:
        """
        Stop every timer and order under way.
        """
        super().stopService()
        for entry in self._hostnames.values():
            entry.machine.stop()
        return None


def acmeCertificates(
    reactor: Any,
    settings: AcmeSettings,
    identityPath: str,
    identityShortId: str,
    reporter: Reporter,
    onChange: Callable[[str], None],
) -> AcmeCertificates:
    """
    Build the ACME certificates service of a tunnel: its account key beside the identity file
    (created on first use), its certificates under the identity's state directory, and an L{AcmeCA}
    for the settings' directory.

    @param reactor: The reactor (time and threads).
    @param settings: The C{--acme} options.
    @param identityPath: The identity file.
    @param identityShortId: The identity's short id, for the certificates' directory.
    @param reporter: Where C{acme-*} events go.
    @param onChange: Called with a hostname when its certificate changes.
    @return: The service (not started).
    @raise CertificateError: If the account key cannot be used.
    """
    configDir = os.path.dirname(os.path.abspath(identityPath))
    store = CertificateStore(
        os.path.join(configDir, "acme", identityShortId, directoryName(settings.directory))
    )
    accountKey = loadOrCreateAccountKey(accountKeyPath(identityPath))
    authority = AcmeCA(
        reactor, settings.directory, accountKey, email=settings.email, caFile=settings.caFile
    )
    return AcmeCertificates(
        reactor,
        authority,
        store,
        reporter,
        onChange,
        renewBefore=settings.renewBefore,
        directory=settings.directory,
    )
