"""
One relay's link: a reconnecting control session (L{ClientService}) with its pool of data sessions,
and the user-facing reports of its state.

Its lifecycle is an automat machine (L{linkMachine}; table in C{docs/lifecycles.md}): C{stopped} ->
C{connecting} -> C{hello} (connected; TLS and L{Hello} under way) -> C{registering} (the relay proved
its identity) -> C{live} (leases granted) -> C{draining} (the relay said it is going away) ->
C{backingOff} (the session ended or an attempt failed; L{ClientService} redials after the
L{StableBackoff} delay) -> C{connecting} again, until C{stopped}.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from automat import TypeMachine, TypeMachineBuilder
from twisted.application.internet import ClientService
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from portal.trust.relayaddress import RelayAddress
from portal.trust.relayhello import FatalRelayError, RelayAuthenticationFailed, relayTLSOptions
from portal.tunnel.backoff import StableBackoff
from portal.tunnel.control import TunnelControlProtocol
from portal.tunnel.data import ATTACH_TIMEOUT, DataSessionPool
from portal.tunnel.handledinputs import HandledInputs
from portal.tunnel.hop import HOP_TIMEOUT, HopFailed, chainEndpoint
from portal.tunnel.interfaces import IRelayLink, ITunnel
from portal.wire.control import modeParts


@implementer(IStreamClientEndpoint)
class _ReportingEndpoint:
    """
    An endpoint that tells C{onFailure} about each failed connection attempt.
    """

    def __init__(
        self,
        endpoint: IStreamClientEndpoint,
        onFailure: Callable[[Failure], None],
        onAttempt: Callable[[], None] = lambda: None,
    ) -> None:
        self._endpoint = endpoint
        self._onFailure = onFailure
        self._onAttempt = onAttempt

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        """
        Connect through the wrapped endpoint, reporting the attempt and a failure.
        """
        self._onAttempt()
        d = self._endpoint.connect(factory)

        def failed(failure: Failure) -> Failure:
            self._onFailure(failure)
            return failure

        d.addErrback(failed)
        connecting: Deferred[IProtocol] = d
        return connecting


@implementer(IStreamClientEndpoint)
class _CurrentRelay:
    """
    Connects to the link's relay as it is at each attempt: with several addresses of one relay
    cluster (C{--relay A,B}), the one the link is trying now.
    """

    def __init__(self, link: RelayLink) -> None:
        self._link = link

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        """
        Connect with TLS to the link's current relay address.
        """
        return self._link.tlsEndpoint().connect(factory)


@implementer(IRelayLink)
class RelayLink(Service):
    """
    Keeps one relay connected: control session with reconnect and backoff, data session pool, and the
    user-facing reports of its state.

    @ivar relay: The relay's address the link uses now: with several addresses of one relay
        cluster (C{--relay A,B}, L{RelayAddress.alternatives}), the link moves on to the next after
        an attempt to reach this one failed, and stays with an address while it works.
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
        self._choices = relay.choices
        self._choice = 0
        self.relay = self._choices[0]
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
        self._machine = linkMachine(self)
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
            onStuck=self._poolStuck,
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
        return _ReportingEndpoint(_CurrentRelay(self), self._unreachable, self._machine.dialling)

    def startService(self) -> None:
        """
        Connect, and keep reconnecting with backoff.
        """
        super().startService()
        self._machine.start()

    @property
    def lifecycle(self) -> str:
        """
        The lifecycle state: C{stopped}, C{connecting}, C{hello}, C{registering}, C{live},
        C{draining} or C{backingOff}.
        """
        return self._machine.state()

    def _startClient(self) -> None:
        """
        Start the L{ClientService} that dials the relay and redials it with backoff.
        """
        factory = Factory.forProtocol(self._newSession)
        self._client = ClientService(
            self.controlEndpoint(),
            factory,
            retryPolicy=self.backoff,
            clock=self.reactor,
        )
        self._client.startService()

    def _newSession(self) -> TunnelControlProtocol:
        """
        A connection to the relay was made: a control session starts on it.

        @return: Its protocol, which tells the lifecycle when the relay's L{Hello} checked out and
            when the relay is going away.
        """
        protocol = TunnelControlProtocol(self)
        protocol.onHello = self._machine.helloed
        protocol.onGoingAway = self._machine.goingAway
        self._machine.connected()
        return protocol

    def stopService(self) -> Deferred[None]:
        """
        End the leases cleanly and disconnect.

        @return: A L{Deferred} that fires once the relay answered L{Unregister} (or did not in
            time) and the connection is closed.
        """
        super().stopService()
        self._machine.stop()
        stopped: Deferred[None] = Deferred.fromCoroutine(self._disconnect())
        return stopped

    async def _disconnect(self) -> None:
        """
        See L{stopService}.
        """
        if self.protocol is not None:
            await self.protocol.unregister()
        if self._client is not None:
            await self._client.stopService()

    def _unreachable(self, failure: Failure) -> None:
        """
        A connection attempt failed: with other addresses of the relay, the next attempt goes to
        the next one.
        """
        self._machine.attemptFailed(failure)
        fatal = failure.check(FatalRelayError, RelayAuthenticationFailed)
        if len(self._choices) > 1 and self.running and not fatal:
            failed = self.relay
            self._choice = (self._choice + 1) % len(self._choices)
            self.relay = self._choices[self._choice]
            self.reporter.state(
                "alternative",
                failed.address,
                f"cannot reach {failed.address}; trying {self.relay.address}, another address of "
                f"this relay, next",
                next=self.relay.address,
            )

    def _reportUnreachable(self, failure: Failure) -> None:
        """
        Say that an attempt failed, once per outage (L{ClientService} keeps retrying), or stop the
        tunnel when a hop relay said it will never forward it or has the wrong identity.
        """
        if failure.check(FatalRelayError, RelayAuthenticationFailed):
            self.fatal(failure.getErrorMessage())
            return
        if not self._reportedUnreachable:
            self._reportedUnreachable = True
            message = failure.getErrorMessage().rstrip(".")
            # A hop's failure names the hop relay at fault; this relay may be fine.
            what = message if failure.check(HopFailed) else f"cannot reach the relay: {message}"
            self.reporter.state("unreachable", self.relay.address, f"{what}; retrying with backoff")

    def registered(
        self,
        protocol: TunnelControlProtocol,
        hostnames: list[str],
        port: int,
        tcp: tuple[str, int] | None = None,
        udp: tuple[str, int] | None = None,
    ) -> None:
        """
        The relay accepted our leases.

        @param protocol: The control session.
        @param hostnames: The lease hostnames.
        @param port: The relay's public TLS port.
        @param tcp: In raw TCP mode, the host and port of the lease's public TCP port.
        @param udp: In UDP mode, the host and port of the lease's public UDP port.
        """
        self._machine.registered(protocol, hostnames, port, tcp, udp)

    def _announce(
        self,
        protocol: TunnelControlProtocol,
        hostnames: list[str],
        port: int,
        tcp: tuple[str, int] | None,
        udp: tuple[str, int] | None,
    ) -> None:
        """
        The relay accepted our leases: tell the user where the service is (see L{registered}).

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
            if self.tunnel.acme is not None:
                # First: a stored certificate is then already on the Forwarding line.
                self.tunnel.acme.want(hostname)
            self.reporter.lease(
                url,
                self.relay.address,
                target,
                self.tunnel.caPath,
                self.tunnel.certificateKind(hostname),
                config.acme.directory if config.acme else None,
            )

    def controlLost(self, protocol: TunnelControlProtocol) -> None:
        """
        The control session closed.

        @param protocol: Its protocol.
        """
        self._machine.lost(protocol)

    def _poolStuck(self) -> None:
        """
        Data sessions keep failing while the control session is up: close the control session;
        the L{ClientService} reconnects (with backoff), and the new session gets a new pool.
        """
        protocol = self.protocol
        if protocol is not None and protocol.transport is not None:
            protocol.transport.loseConnection()

    def _dropSession(self, protocol: TunnelControlProtocol, report: bool) -> None:
        """
        The control session closed: count it for the backoff and stop the pool; the
        L{ClientService} reconnects.

        @param report: Whether to tell the user (not once the link is stopping).
        """
        self.backoff.down()
        if protocol is self.protocol:
            self.protocol = None
            self.pool.stop()
            if report:
                self.reporter.state(
                    "disconnected", self.relay.address, "lost the relay; reconnecting"
                )

    def fatal(self, message: str) -> None:
        """
        Something reconnecting cannot fix happened: stop the tunnel.
        """
        self.tunnel.fatal(message, self.relay.address)


class LinkInputs(Protocol):
    """
    The inputs of a relay link's lifecycle (L{linkMachine}).
    """

    def start(self) -> None:
        """
        The link's service started.
        """

    def dialling(self) -> None:
        """
        The L{ClientService} started a connection attempt.
        """

    def attemptFailed(self, failure: Failure) -> None:
        """
        A connection attempt failed (TCP, a hop, or TLS).
        """

    def connected(self) -> None:
        """
        A connection was made: a control session starts on it.
        """

    def helloed(self) -> None:
        """
        The relay's L{Hello} checked out (identity proven, pinned): registration starts.
        """

    def registered(
        self,
        protocol: TunnelControlProtocol,
        hostnames: list[str],
        port: int,
        tcp: tuple[str, int] | None,
        udp: tuple[str, int] | None,
    ) -> None:
        """
        The relay granted the leases.
        """

    def goingAway(self, deadline: float) -> None:
        """
        The relay said it is shutting down.
        """

    def lost(self, protocol: TunnelControlProtocol) -> None:
        """
        A control session closed.
        """

    def stop(self) -> None:
        """
        The link's service stopped.
        """

    def state(self) -> str:
        """
        @return: The name of the current state.
        """


def _buildLinkMachine() -> TypeMachine[LinkInputs, RelayLink]:
    """
    Describe the relay link lifecycle; see the module docstring.
    """
    builder = TypeMachineBuilder(LinkInputs, RelayLink)
    stopped = builder.state("stopped")
    connecting = builder.state("connecting")
    hello = builder.state("hello")
    registering = builder.state("registering")
    live = builder.state("live")
    draining = builder.state("draining")
    backingOff = builder.state("backingOff")
    states = {
        "stopped": stopped,
        "connecting": connecting,
        "hello": hello,
        "registering": registering,
        "live": live,
        "draining": draining,
        "backingOff": backingOff,
    }
    running = [connecting, hello, registering, live, draining, backingOff]
    sessions = [hello, registering, live, draining]
    #: (state, input) pairs given a transition below; the rest are ignored (see the end).
    handled = HandledInputs(states)
    on = handled.on

    @stopped.upon(LinkInputs.start).to(connecting)
    def startClient(inputs: LinkInputs, link: RelayLink) -> None:
        link._startClient()

    on(stopped, "start")
    backingOff.upon(LinkInputs.dialling).to(connecting).returns(None)
    on(backingOff, "dialling")

    @connecting.upon(LinkInputs.attemptFailed).to(backingOff)
    @backingOff.upon(LinkInputs.attemptFailed).loop()
    def unreachable(inputs: LinkInputs, link: RelayLink, failure: Failure) -> None:
        link._reportUnreachable(failure)

    on(connecting, "attemptFailed")
    on(backingOff, "attemptFailed")
    for state in (connecting, backingOff):
        state.upon(LinkInputs.connected).to(hello).returns(None)
        on(state, "connected")
    hello.upon(LinkInputs.helloed).to(registering).returns(None)
    on(hello, "helloed")

    def announce(
        inputs: LinkInputs,
        link: RelayLink,
        protocol: TunnelControlProtocol,
        hostnames: list[str],
        port: int,
        tcp: tuple[str, int] | None,
        udp: tuple[str, int] | None,
    ) -> None:
        link._announce(protocol, hostnames, port, tcp, udp)

    for state in (connecting, backingOff, hello, registering, live):
        state.upon(LinkInputs.registered).to(live)(announce)
        on(state, "registered")
    # A registration that completes after the relay said it is leaving, or after the link
    # stopped, is reported; it changes nothing.
    for state in (draining, stopped):
        state.upon(LinkInputs.registered).loop()(announce)
        on(state, "registered")

    for state in sessions:
        state.upon(LinkInputs.goingAway).to(draining).returns(None)
        on(state, "goingAway")

    @hello.upon(LinkInputs.lost).to(backingOff)
    @registering.upon(LinkInputs.lost).to(backingOff)
    @live.upon(LinkInputs.lost).to(backingOff)
    @draining.upon(LinkInputs.lost).to(backingOff)
    @connecting.upon(LinkInputs.lost).to(backingOff)
    @backingOff.upon(LinkInputs.lost).loop()
    def dropSession(inputs: LinkInputs, link: RelayLink, protocol: TunnelControlProtocol) -> None:
        link._dropSession(protocol, report=True)

    for state in running:
        on(state, "lost")

    @stopped.upon(LinkInputs.lost).loop()
    def dropQuietly(inputs: LinkInputs, link: RelayLink, protocol: TunnelControlProtocol) -> None:
        link._dropSession(protocol, report=False)

    on(stopped, "lost")

    @connecting.upon(LinkInputs.stop).to(stopped)
    @hello.upon(LinkInputs.stop).to(stopped)
    @registering.upon(LinkInputs.stop).to(stopped)
    @live.upon(LinkInputs.stop).to(stopped)
    @draining.upon(LinkInputs.stop).to(stopped)
    @backingOff.upon(LinkInputs.stop).to(stopped)
    def stopPool(inputs: LinkInputs, link: RelayLink) -> None:
        link.pool.stop()

    for state in running:
        on(state, "stop")

    # Everything else is late or repeated news: it changes nothing.
    handled.ignoreTheRest(LinkInputs)
    return builder.build()


#: The relay link lifecycle, built once; each link runs its own instance.
linkMachine = _buildLinkMachine()
