"""
The tunnel as a Twisted service: one L{RelayLink} per relay, each a reconnecting control session
(L{ClientService}) with its pool of data sessions.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Sequence
from typing import Any

from OpenSSL.crypto import X509, PKey
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from portal.gateway.access import Gateway
from portal.gateway.basicauth import BasicAuth
from portal.gateway.caller import Authenticator, GatewayPages
from portal.gateway.contacts import ContactList, contactsPath
from portal.gateway.peerendpoint import DEFAULT_ADDRESS, PeerEndpointService
from portal.gateway.routes import RouteTable
from portal.gateway.signatures import PeerAuthenticator
from portal.gateway.terminalaccess import TerminalAccess
from portal.trust.identity import Identity, loadOrCreateIdentity
from portal.trust.localca import LocalCA, SNIServerConnectionCreator, loadKeyPair
from portal.trust.names import stableLabel
from portal.trust.pinning import KnownRelays
from portal.tunnel.acme.certificates import AcmeCertificates, acmeCertificates
from portal.tunnel.config import ConfigError, Target, TunnelConfig
from portal.tunnel.http2 import RoutedHTTP
from portal.tunnel.httpproxy import HTTPProxy
from portal.tunnel.interfaces import ITunnel
from portal.tunnel.link import RelayLink
from portal.tunnel.localcontrol import LocalControlService, socketPath
from portal.tunnel.relaypool import RelayPool
from portal.tunnel.report import Reporter
from portal.tunnel.stream import StreamHandler
from portal.wire.attach import StreamHeader


def resolveUDPTarget(target: Target) -> tuple[str, int]:
    """
    The local UDP service's address as an IP literal (a connected UDP socket needs one), IPv4 first.

    @raise ConfigError: When the host name does not resolve.
    """
    try:
        infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_DGRAM)
    except OSError as e:
        raise ConfigError(f"--udp: cannot resolve {target.host!r}: {e}")
    infos.sort(key=lambda info: info[0] != socket.AF_INET)
    return str(infos[0][4][0]), target.port


@implementer(ITunnel)
class TunnelService(MultiService):
    """
    A tunnel: the identity, the certificates, and a L{RelayLink} per relay.

    @ivar label: The (first) lease label asked for on every relay.
    @ivar labels: Every lease label asked for on every relay: one per C{--app}, else L{label}.
    @ivar caPath: The local CA certificate file, when the local CA issues the certificates.
    @ivar servedHostnames: Lease hostnames relays gave us.
    @ivar gateway: With C{--app}, the app gateway; else L{None}. Its C{authenticators} list and
        C{pages} may be set after construction too (they are read for every request).
    """

    _log = Logger()
    gateway: Gateway | None = None
    #: With C{--acme}, the lease hostnames' ACME certificates.
    acme: AcmeCertificates | None = None

    def __init__(
        self,
        config: TunnelConfig,
        reactor: Any,
        reporter: Reporter,
        onFatal: Callable[[str], None],
        authenticators: Sequence[Authenticator] = (),
        gatewayPages: GatewayPages | None = None,
    ) -> None:
        """
        Load (or create) the identity and the certificates; raises L{portal.trust.identity.IdentityError} or
        L{portal.trust.localca.CertificateError} with a message for the user.

        @param authenticators: With C{--app}, what says who is calling (paired terminals, peers),
            asked in this order; without any, private and peer paths always answer 401.
        @param gatewayPages: With C{--app}, the gateway's own pages under C{/.portal/} (pairing);
            without them such paths answer 404.
        """
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.reporter = reporter
        self._onFatal = onFatal
        self.identity: Identity
        self.identity, created = loadOrCreateIdentity(config.identityPath)
        if created:
            self._log.info(
                "created identity {id} in {path}", id=self.identity.id, path=config.identityPath
            )
        self.labels = [app.name for app in config.apps] or [
            config.name or stableLabel(self.identity.id, config.describeTarget())
        ]
        self.label = self.labels[0]
        #: The https URLs of the live leases, for pairing instructions.
        self.publicURLs: set[str] = set()
        self.terminals: TerminalAccess | None = None
        if config.apps:
            # Paired terminals: the store in the state directory, their authenticator and pages,
            # and the local control socket `portal pair` and `portal terminals` talk to.
            self.terminals = TerminalAccess.open(reactor, config.configDir)
            self.gateway = Gateway(
                config.apps,
                self.identity.id,
                [self.terminals.authenticator, *authenticators],
                gatewayPages or self.terminals.pages,
                clock=reactor,
            )
            LocalControlService(
                reactor,
                socketPath(config.configDir),
                self.terminals,
                lambda: sorted(self.publicURLs),
                lambda: self.caPath,
            ).setServiceParent(self)
        self.pins = KnownRelays(os.path.join(config.configDir, "known_relays.json"))
        self.servedHostnames: set[str] = set()
        self.caPath: str | None = None
        self._keyPair: tuple[PKey, list[X509]] | None = None
        self._ca: LocalCA | None = None
        self.udpTarget = resolveUDPTarget(config.udpTarget) if config.udpTarget else None
        if config.tcp or config.target is None and not (config.routes or config.apps):
            # Raw TCP mode terminates no TLS: the bytes go to the target as they came.
            self.streamHandler = StreamHandler(
                reactor,
                config.target,
                None,
                proxyProtocol=config.proxyProtocol,
                addressRules=config.addressRules,
                reporter=reporter,
            )
        else:
            self.streamHandler = self._tlsStreamHandler()
        self.links = [RelayLink(self, relay) for relay in config.relays]
        for link in self.links:
            link.setServiceParent(self)
        if self.gateway is not None:
            # Peers: the contact list next to the identity, their signatures checked after the
            # terminals' sessions, and the loopback endpoint apps call peers through.
            contacts = ContactList(contactsPath(config.configDir))
            self.gateway.authenticators.insert(
                1, PeerAuthenticator(contacts, reactor, self.servedHostnames)
            )
            PeerEndpointService(
                reactor, self.identity, contacts, DEFAULT_ADDRESS, reporter
            ).setServiceParent(self)
        if config.registry is not None:
            # Adds a link per registry relay it picks.
            RelayPool(self, config.registry, config.maxRelays).setServiceParent(self)
        self.stopped: Deferred[None] = Deferred()

    def stopService(self) -> Deferred[None]:
        """
        Stop the relay links and the control socket, then close the terminal store.
        """
        stopped: Deferred[None] = Deferred.fromCoroutine(self._stop())
        return stopped

    async def _stop(self) -> None:
        """
        See L{stopService}.
        """
        await super().stopService()
        if self.terminals is not None:
            self.terminals.close()

    def _tlsStreamHandler(self) -> StreamHandler:
        """
        The stream handler of stream and routed HTTP modes: the visitor's TLS ends here, with the
        user's certificate or one from the identity's local CA.
        """
        config = self.config
        if config.certFile and config.keyFile:
            self._keyPair = loadKeyPair(config.certFile, config.keyFile)
        else:
            self._ca = LocalCA.loadOrCreate(
                os.path.join(config.configDir, "ca", self.identity.shortId),
                f"Portal local CA {self.identity.shortId}",
            )
            self.caPath = self._ca.certPath
        creator = SNIServerConnectionCreator(self._certificateFor, alpn=config.alpn)
        if config.acme is not None:
            self.acme = acmeCertificates(
                self.reactor,
                config.acme,
                config.identityPath,
                self.identity.shortId,
                self.reporter,
                creator.forget,
            )
            self.acme.setServiceParent(self)
        inner = None
        if config.routes or config.apps:
            table = RouteTable(config.routes) if config.routes else None
            basicAuth = BasicAuth(config.basicAuth, self.reactor) if config.basicAuth else None
            proxy = self.httpProxy = HTTPProxy(
                self.reactor, table, self.reporter, self.gateway, basicAuth
            )

            def inner(header: StreamHeader) -> RoutedHTTP:
                return RoutedHTTP(proxy, header)

        return StreamHandler(
            self.reactor,
            config.target,
            creator,
            inner,
            config.proxyProtocol,
            config.addressRules,
            self.reporter,
            challenges=None if self.acme is None else self.acme.challenges,
        )

    def _certificateFor(self, hostname: str | None) -> tuple[PKey, list[X509]]:
        """
        The key and chain to present for C{hostname}: the user's own, or one the local CA issues for
        a hostname a relay gave us.

        @raise ValueError: For a hostname this tunnel does not serve.
        """
        if self._keyPair is not None:
            return self._keyPair
        assert self._ca is not None
        if hostname is None:
            hostname = min(self.servedHostnames, default="localhost")
        elif hostname not in self.servedHostnames:
            raise ValueError(f"{hostname!r} is not a hostname of this tunnel")
        elif self.acme is not None:
            issued = self.acme.certificateFor(hostname)
            if issued is not None:
                return issued
        return self._ca.issue([hostname])

    def certificateKind(self, hostname: str) -> str:
        """
        @param hostname: A lease hostname.
        @return: Which certificate it presents now: C{"file"} (C{--cert}), C{"acme"}, or
            C{"local-ca"}.
        """
        if self._keyPair is not None:
            return "file"
        if self.acme is not None:
            return self.acme.describe(hostname)
        return "local-ca"

    def fatal(self, message: str, relay: str = "") -> None:
        """
        Report an unrecoverable error and ask the runner to stop.

        @param message: What went wrong and what to do.
        @param relay: The relay concerned, if one is.
        """
        self.reporter.state("fatal", relay, message)
        self._onFatal(f"{relay}: {message}" if relay else message)
