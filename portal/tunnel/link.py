"""
One relay's link: a reconnecting control session (L{ClientService}) with its pool of data sessions,
and the user-facing reports of its state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.internet import ClientService
from twisted.application.service import Service
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from portal.trust.relayaddress import RelayAddress
from portal.trust.relayhello import FatalRelayError, RelayAuthenticationFailed, relayTLSOptions
from portal.tunnel.backoff import StableBackoff
from portal.tunnel.control import TunnelControlProtocol
from portal.tunnel.data import ATTACH_TIMEOUT, DataSessionPool
from portal.tunnel.hop import HOP_TIMEOUT, chainEndpoint
from portal.tunnel.interfaces import IRelayLink, ITunnel
from portal.wire.control import modeParts


@implementer(IStreamClientEndpoint)
class _ReportingEndpoint:
    """
    An endpoint that tells C{onFailure} about each failed connection attempt.
    """

    def __init__(
        self, endpoint: IStreamClientEndpoint, onFailure: Callable[[Failure], None]
    ) -> None:
        self._endpoint = endpoint
        self._onFailure = onFailure

    def connect(self, factory: Any) -> Any:
        """
        Connect through the wrapped endpoint, reporting a failure.
        """
        d = self._endpoint.connect(factory)

        def failed(failure: Failure) -> Failure:
            self._onFailure(failure)
            return failure

        d.addErrback(failed)
        return d


@implementer(IRelayLink)
class RelayLink(Service):
    """
    Keeps one relay connected: control session with reconnect and backoff, data session pool, and the
    user-facing reports of its state.

    @ivar relay: The relay's address.
    @ivar pool: The data session pool.
    @ivar protocol: The live control protocol, if any.
    """

    _log = Logger()
    protocol: TunnelControlProtocol | None = None
    _client: ClientService | None = None
    #: The option the relay was given with, for messages about its identity.
    flag = "--relay"

    def __init__(self, tunnel: ITunnel, relay: RelayAddress) -> None:
        self.tunnel = tunnel
        self.relay = relay
        self.reactor = tunnel.reactor
        self.identity = tunnel.identity
        self.label = tunnel.label
        self.labels = tunnel.labels
        self.reporter = tunnel.reporter
        self.pins = tunnel.pins
        self.mode = tunnel.config.mode
        self.udpTarget = tunnel.udpTarget
        self._wasLive = False
        self._reportedUnreachable = False
        self.backoff = StableBackoff(self.reactor)
        # Inside a chain, the hop relays must see only ciphertext and the last relay must not tell
        # data sessions by their TCP peer: TLS. (Raw TCP mode seals its streams in any case.)
        tls = bool(relay.via)
        self.pool = DataSessionPool(
            self.reactor,
            self.tlsEndpoint if tls else self.dataEndpoint,
            tunnel.streamHandler,
            size=tunnel.config.poolSize,
            tls=tls,
            timeout=ATTACH_TIMEOUT + HOP_TIMEOUT * len(relay.via),
        )

    def dataEndpoint(self) -> IStreamClientEndpoint:
        """
        @return: A plain stream to the relay's control port, for data sessions: TCP, or through the
            relay's C{--via} hops (L{portal.tunnel.hop.chainEndpoint}).
        """
        return chainEndpoint(self.reactor, self.relay, self.identity, self.pins, self.reporter)

    def tlsEndpoint(self) -> IStreamClientEndpoint:
        """
        @return: A TLS endpoint to the relay's control port (L{relayTLSOptions}), over
            L{dataEndpoint}: for the control session, and for a chain's data sessions. Inside a chain
            this TLS runs end to end through the hop relays.
        """
        return wrapClientTLS(relayTLSOptions(), self.dataEndpoint())

    def controlEndpoint(self) -> IStreamClientEndpoint:
        """
        @return: The TLS endpoint of L{tlsEndpoint}, reporting failed attempts.
        """
        return _ReportingEndpoint(self.tlsEndpoint(), self._unreachable)

    def startService(self) -> None:
        """
        Connect, and keep reconnecting with backoff.
        """
        super().startService()
        factory = Factory.forProtocol(lambda: TunnelControlProtocol(self))
        self._client = ClientService(
            self.controlEndpoint(),
            factory,
            retryPolicy=self.backoff,
            clock=self.reactor,
        )
        self._client.startService()

    @inlineCallbacks
    def stopService(self) -> Any:
        """
        End the leases cleanly and disconnect.
        """
        super().stopService()
        self.pool.stop()
        if self.protocol is not None:
            yield self.protocol.unregister()
        if self._client is not None:
            yield self._client.stopService()

    def _unreachable(self, failure: Failure) -> None:
        """
        A connection attempt failed: say so once per outage (L{ClientService} keeps retrying), or
        stop the tunnel when a hop relay said it will never forward it or has the wrong identity.
        """
        if failure.check(FatalRelayError, RelayAuthenticationFailed) and self.running:
            self.fatal(failure.getErrorMessage())
            return
        if not self._reportedUnreachable and self.running:
            self._reportedUnreachable = True
            self.reporter.state(
                "unreachable",
                self.relay.address,
                f"cannot reach the relay: {failure.getErrorMessage()}; retrying with backoff",
            )

    def registered(
        self,
        protocol: TunnelControlProtocol,
        hostnames: list[str],
        port: int,
        tcp: tuple[str, int] | None = None,
        udp: tuple[str, int] | None = None,
    ) -> None:
        """
        The relay accepted our leases: tell the user where the service is.

        @param hostnames: The lease hostnames.
        @param port: The relay's public TLS port.
        @param tcp: In raw TCP mode, the host and port of the lease's public TCP port.
        @param udp: In UDP mode, the host and port of the lease's public UDP port.
        """
        newSession = protocol is not self.protocol
        self.protocol = protocol
        self._reportedUnreachable = False
        self.tunnel.servedHostnames.update(hostnames)
        if newSession:
            self.backoff.up()
        if self._wasLive and newSession:
            self.reporter.state("reconnected", self.relay.address, "reconnected to the relay")
        self._wasLive = True
        config = self.tunnel.config
        for scheme, address, target in (
            ("tcp", tcp, config.describeTarget()),
            ("udp", udp, str(config.udpTarget)),
        ):
            if address is not None:
                host, publicPort = address
                host = f"[{host}]" if ":" in host else host
                self.reporter.lease(
                    f"{scheme}://{host}:{publicPort}", self.relay.address, target, None
                )
        if tcp is not None or "stream" not in modeParts(self.mode):
            return
        for hostname in hostnames:
            url = f"https://{hostname}" if port == 443 else f"https://{hostname}:{port}"
            target = config.describeTarget(hostname.partition(".")[0] if config.apps else None)
            self.tunnel.publicURLs.add(url)
            self.reporter.lease(url, self.relay.address, target, self.tunnel.caPath)

    def controlLost(self, protocol: TunnelControlProtocol) -> None:
        """
        The control session closed: stop the pool; the L{ClientService} reconnects.
        """
        self.backoff.down()
        if protocol is self.protocol:
            self.protocol = None
            self.pool.stop()
            if self.running:
                self.reporter.state(
                    "disconnected", self.relay.address, "lost the relay; reconnecting"
                )

    def fatal(self, message: str) -> None:
        """
        Something reconnecting cannot fix happened: stop the tunnel.
        """
        self.tunnel.fatal(message, self.relay.address)
