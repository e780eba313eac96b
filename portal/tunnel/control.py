"""
The tunnel's side of a control session: check the relay's identity, register leases, renew them, and
open data sessions when the relay asks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, ITCPTransport
from twisted.internet.protocol import connectionDone
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure

from portal.trust.challenge import signRegistration
from portal.trust.proofofwork import solve
from portal.trust.relayhello import (
    FatalRelayError,
    RelayAuthenticationFailed,
    checkHello,
    helloArguments,
)
from portal.tunnel.interfaces import IRelayLink
from portal.tunnel.udpmode import TunnelUDP
from portal.wire.control import (
    EXPORTER_DATA_KEY,
    EXPORTER_TCP_KEY,
    EXPORTER_UDP_KEY,
    Challenge,
    Datagram,
    FlowClosed,
    FlowOpened,
    GoingAway,
    Heartbeat,
    Hello,
    LeaseUnknown,
    NameInUse,
    Register,
    RegistrationRefused,
    Renew,
    RequestData,
    TryAgain,
    Unregister,
    UnsupportedVersion,
    exportKeyingMaterial,
    modeParts,
)

#: Seconds any control command may take.
COMMAND_TIMEOUT = 30.0
#: Longest wait between registration attempts the relay asked to retry.
MAX_RETRY_DELAY = 30.0
#: Seconds between heartbeats on a control session.
HEARTBEAT_INTERVAL = 10.0
#: Seconds a heartbeat may go unanswered before the path counts as dead and is redialled.
HEARTBEAT_TIMEOUT = 10.0
#: The most proof-of-work bits this tunnel spends on a registration (about 10 s of one core); a relay
#: asking for more is retried later, as it is under heavy load.
MAX_WORK = 24
#: Proofs of work up to this many bits (tens of milliseconds) are solved in the reactor's thread;
#: harder ones in the reactor's thread pool.
INLINE_WORK = 16


class TunnelControlProtocol(amp.AMP):
    """
    One control session from the tunnel to a relay.

    @ivar relayId: The relay's verified identity id.
    @ivar hostnames: The lease hostnames registered on this session.
    """

    _log = Logger()
    relayId: str | None = None
    udp: TunnelUDP | None = None
    _capabilities: frozenset[str] = frozenset()
    _renewal: LoopingCall | None = None
    _heartbeat: LoopingCall | None = None
    _retry: IDelayedCall | None = None
    _retryDelay = 1.0

    def __init__(self, link: IRelayLink) -> None:
        super().__init__()
        self._link = link
        self.hostnames: list[str] = []
        self._names: list[str] = []
        #: Called once the relay's L{Hello} checked out (the link's lifecycle moves on).
        self.onHello: Callable[[], None] = lambda: None
        #: Called with the deadline when the relay says it is going away.
        self.onGoingAway: Callable[[float], None] = lambda deadline: None

    def _call(self, command: type[amp.Command], **kw: Any) -> Any:
        """
        Send a command with a timeout.
        """
        d = self.callRemote(command, **kw)
        d.addTimeout(COMMAND_TIMEOUT, self._link.reactor)
        return d

    def connectionMade(self) -> None:
        """
        Start the handshake: Hello, relay identity check, challenge, register.
        """
        super().connectionMade()
        d = self._call(Hello, **helloArguments())
        d.addCallback(self._helloed)
        d.addCallback(lambda _: Deferred.fromCoroutine(self._register()))
        d.addErrback(self._failed)

    def _helloed(self, response: dict[str, Any]) -> None:
        """
        Verify that the relay holds its identity key on this very TLS session, and pin it.
        """
        link = self._link
        relayId = checkHello(
            self.transport, response, link.relay, link.pins, link.reporter, flag=link.flag
        )
        for mode in sorted(modeParts(link.mode)):
            if mode not in response["capabilities"]:
                raise FatalRelayError(f"the relay does not offer {mode} mode")
        if "tcp" in modeParts(link.mode) and "sealed-tcp" not in response["capabilities"]:
            raise FatalRelayError(
                "the relay runs raw TCP mode over TLS data sessions (an older version); this tunnel "
                "seals them instead (capability sealed-tcp): upgrade the relay"
            )
        self.relayId = relayId
        self._sessionId = response["sessionId"]
        self._dataKey = exportKeyingMaterial(self.transport, EXPORTER_DATA_KEY)
        self._tunnelDomain = response["tunnelDomain"]
        self._publicPort = response["publicPort"]
        self._leaseTTL = response["leaseTTL"]
        self._capabilities = frozenset(response["capabilities"])
        if "heartbeat" in response["capabilities"]:
            self._heartbeat = LoopingCall(self._beat)
            self._heartbeat.clock = link.reactor
            self._heartbeat.start(HEARTBEAT_INTERVAL, now=False)
        self.onHello()

    def _beat(self) -> None:
        """
        Send a heartbeat; no answer in L{HEARTBEAT_TIMEOUT} means the path is dead: abort the
        session so that the link redials (the relay keeps the leases reserved meanwhile).
        """
        d = self.callRemote(Heartbeat)
        d.addTimeout(HEARTBEAT_TIMEOUT, self._link.reactor)

        def failed(failure: Failure) -> None:
            if not failure.check(defer.TimeoutError):
                return
            link = self._link
            link.reporter.state(
                "dead-path",
                link.relay.address,
                f"no heartbeat answer from the relay in {HEARTBEAT_TIMEOUT:.0f} s; redialling",
            )
            # Inside TLS: the transport is the TLS protocol, which can abort.
            cast(ITCPTransport, self.transport).abortConnection()

        d.addErrback(failed)

    @GoingAway.responder
    def goingAway(self, deadline: float) -> dict[str, object]:
        """
        The relay is shutting down: say so; the link reconnects with backoff once it closes.
        """
        link = self._link
        link.reporter.state(
            "relay-leaving",
            link.relay.address,
            f"the relay is shutting down (open connections get {deadline:.0f} s); "
            "reconnecting with backoff",
        )
        self.onGoingAway(deadline)
        return {}

    async def _register(self) -> None:
        """
        Sign a fresh challenge and register the lease names.
        """
        link = self._link
        names = list(link.labels)
        challenge = await self._call(Challenge, names=names)
        signature = signRegistration(link.identity, self.relayId or "", challenge["nonce"], names)
        extra: dict[str, Any] = {}
        work = challenge.get("work") or 0
        if work:
            extra["proof"] = await self._solve(challenge["nonce"], work)
        if "takeover" in self._capabilities:
            extra["takeover"] = link.tunnel.config.takeover
        response = await self._call(
            Register,
            publicKey=link.identity.publicKey,
            names=names,
            nonce=challenge["nonce"],
            signature=signature,
            mode=link.mode,
            **extra,
        )
        self._names = names
        self.hostnames = response["hostnames"]
        interval = max(1.0, min(self._leaseTTL, response["expiresIn"]) / 3)
        if self._renewal is not None and self._renewal.running:
            self._renewal.stop()
        self._renewal = LoopingCall(self._renew)
        self._renewal.clock = link.reactor
        self._renewal.start(interval, now=False)
        modes = modeParts(link.mode)
        addresses: dict[str, tuple[str, int]] = {}
        if "tcp" in modes:
            addresses["tcp"] = (response["publicHost"], response["tcpPort"])
        if "udp" in modes:
            addresses["udp"] = (response["publicHost"], response["udpPort"])
            if self.udp is None:
                secret = exportKeyingMaterial(self.transport, EXPORTER_UDP_KEY)
                await self._startUDP(response["udpSession"], secret)
        link.registered(self, self.hostnames, self._publicPort, **addresses)
        sealSecret = (
            exportKeyingMaterial(self.transport, EXPORTER_TCP_KEY) if "tcp" in modes else None
        )
        link.pool.start(self._sessionId, self._dataKey, sealSecret)

    async def _solve(self, nonce: bytes, work: int) -> bytes:
        """
        Solve the proof of work a busy relay asked for with a registration challenge.

        @param nonce: The challenge nonce.
        @param work: The difficulty in bits.
        @return: The solution.
        @raise TryAgain: When the relay asks for more than L{MAX_WORK} bits.
        """
        if work > MAX_WORK:
            raise TryAgain(
                f"the relay is under heavy load and asks for a proof of work of {work} bits, more "
                f"than this tunnel spends ({MAX_WORK})"
            )
        self._log.info("the relay asks for a proof of work of {bits} bits; solving", bits=work)
        if work <= INLINE_WORK:
            return solve(nonce, work)
        reactor = self._link.reactor
        solution: bytes = await deferToThreadPool(
            reactor, reactor.getThreadPool(), solve, nonce, work
        )
        return solution

    async def _startUDP(self, sessionId: bytes, secret: bytes) -> None:
        """
        Open the UDP socket to the relay for this session.
        """
        link = self._link
        assert link.udpTarget is not None
        # Through a chain, UDP straight to the relay would show it the tunnel's address: datagrams
        # go over this control session only.
        overControl = bool(link.relay.via)
        host = "" if overControl else await link.reactor.resolve(link.relay.host)
        self.udp = TunnelUDP(
            link.reactor,
            self,
            (host, link.relay.port),
            sessionId,
            secret,
            link.udpTarget,
            idleTimeout=link.tunnel.config.udpIdleTimeout,
            maxFlows=link.tunnel.config.udpMaxFlows,
            maxFlowsPerSource=link.tunnel.config.udpMaxFlowsPerSource,
            overControl=overControl,
            screen=link.tunnel.config.addressRules.refusal
            if link.tunnel.config.addressRules
            else None,
        )
        self.udp.start()

    @Datagram.responder
    def datagram(self, flowId: int, payload: bytes) -> dict[str, object]:
        """
        A visitor's datagram over the control session (UDP fallback, or too large to seal).
        """
        if self.udp is not None:
            self.udp.flows.deliver(flowId, payload)
        return {}

    @FlowOpened.responder
    def flowOpened(self, flowId: int, host: str, port: int) -> dict[str, object]:
        """
        A new visitor address on the lease's UDP port: the address rules decide whether its
        datagrams reach the service.
        """
        self._log.info("udp flow {flow} from {host}:{port}", flow=flowId, host=host, port=port)
        if self.udp is not None:
            # The source first: a flow the rules admit opens at once, and is counted against it.
            self.udp.flows.noteSource(flowId, host)
            self.udp.flows.announce(flowId, host)
        return {}

    @FlowClosed.responder
    def flowClosed(self, flowId: int) -> dict[str, object]:
        """
        The relay forgot a flow: close its local socket.
        """
        if self.udp is not None:
            self.udp.flows.close(flowId)
        return {}

    def _renew(self) -> Any:
        """
        Extend the leases; a relay that no longer knows them gets a fresh registration.
        """
        d = self._call(Renew, names=self._names)

        def failed(failure: Failure) -> None:
            if failure.check(LeaseUnknown):
                self._log.warn("relay forgot our lease; registering again")
                Deferred.fromCoroutine(self._register()).addErrback(self._failed)
                return
            self._log.warn("renewal failed: {error}", error=failure.getErrorMessage())
            assert self.transport is not None
            self.transport.loseConnection()

        d.addErrback(failed)
        return None

    def _failed(self, failure: Failure) -> None:
        """
        Handshake or registration failed: fatal errors stop the tunnel, a L{TryAgain} refusal is retried
        on this session with backoff, the rest reconnect.
        """
        link = self._link
        # The control protocol runs inside TLS: its transport is the TLS protocol, which says
        # whether it is still connected (ITransport does not).
        transport = cast(TLSMemoryBIOProtocol, self.transport)
        if failure.check(TryAgain) and self.relayId is None:
            # Refused at Hello (the relay is shutting down): reconnect with backoff.
            link.reporter.state(
                "retrying", link.relay.address, f"the relay said: {failure.getErrorMessage()}"
            )
            transport.loseConnection()
            return
        if failure.check(TryAgain) and transport.connected:
            delay = self._retryDelay
            self._retryDelay = min(MAX_RETRY_DELAY, delay * 2)
            link.reporter.state(
                "retrying",
                link.relay.address,
                f"the relay cannot register the lease yet: {failure.getErrorMessage()} "
                f"(retrying in {delay:.0f} s)",
            )
            self._retry = link.reactor.callLater(delay, self._retryRegister)
            return
        if failure.check(FatalRelayError, RelayAuthenticationFailed, UnsupportedVersion):
            link.fatal(failure.getErrorMessage())
        elif failure.check(RegistrationRefused):
            link.fatal(f"the relay refused the lease: {failure.getErrorMessage()}")
        elif failure.check(NameInUse):
            link.fatal(
                f"already running: {failure.getErrorMessage()} on this relay; stop that tunnel, "
                "or start this one with --takeover to move the lease here"
            )
        else:
            link.reporter.state(
                "error", link.relay.address, f"control session failed: {failure.getErrorMessage()}"
            )
        transport.loseConnection()

    def _retryRegister(self) -> None:
        """
        Ask for a fresh challenge and register again.
        """
        self._retry = None
        Deferred.fromCoroutine(self._register()).addErrback(self._failed)

    @RequestData.responder
    def requestData(self, count: int) -> dict[str, object]:
        """
        Visitors are waiting at the relay: open more data sessions.
        """
        self._link.pool.want(count)
        return {}

    def unregister(self) -> Any:
        """
        End our leases on a clean stop.

        @return: A L{Deferred} that fires when the relay answered or after a short timeout.
        """
        d = self.callRemote(Unregister, names=self._names)
        d.addTimeout(2.0, self._link.reactor)
        d.addErrback(lambda f: None)
        return d

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """
        Stop renewing; the link reconnects.
        """
        for loop in (self._renewal, self._heartbeat):
            if loop is not None and loop.running:
                loop.stop()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self.udp is not None:
            self.udp.stop()
            self.udp = None
        self._link.controlLost(self)
        super().connectionLost(reason)
