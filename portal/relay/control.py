"""
The relay's control port: TLS + AMP control sessions and plain-TCP data sessions on one listener.

A control session's lifecycle is an automat machine (L{controlMachine}; table in
C{docs/lifecycles.md}): C{greeting} (waiting for L{Hello}, at most C{helloTimeout}) -> C{open}
(data pool and session id; leases are registered, renewed and released here) -> C{closed}; or, for
a hop, C{open} -> C{hopping} (connecting to the destination) -> C{hopped} (the connection is a
splice now, no AMP) -> C{closed}.
"""

from __future__ import annotations

from typing import Any, Protocol, cast

from automat import TypeMachine, TypeMachineBuilder
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IProtocol,
    ITCPTransport,
    ITransport,
)
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.protocols.policies import TimeoutMixin
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

import portal
from portal.forwarding.connlimit import vouchFor
from portal.forwarding.pacer import PacerFull, Waiting
from portal.forwarding.sources import peerSource
from portal.forwarding.splice import pauseReading, resumeReading
from portal.relay.data import RelayDataSession
from portal.relay.hop import HopInbound
from portal.relay.interfaces import ILeasePorts
from portal.relay.leases import LeaseError
from portal.relay.memberlink import MemberLinks, MemberVisitor
from portal.relay.ports import PortAllocationError
from portal.relay.router import DataPool, OnRouterClock, Router
from portal.relay.store import ClaimsUnavailable, StoreError
from portal.relay.udpsession import UDPSession
from portal.trust.challenge import (
    PURPOSE_HOP,
    PURPOSE_REGISTER,
    BadSignature,
    ChallengeError,
    ChallengeMismatch,
    ExpiredChallenge,
    UnknownChallenge,
    WorkInsufficient,
    WorkRequired,
)
from portal.trust.identity import identityId
from portal.trust.names import InvalidName, leaseHostname, validateLabel
from portal.wire.attach import MAGIC
from portal.wire.clienthello import INTERNAL_ERROR, alertRecord
from portal.wire.control import (
    CAPABILITIES,
    EXPORTER_DATA_KEY,
    EXPORTER_HELLO,
    EXPORTER_TCP_KEY,
    EXPORTER_UDP_KEY,
    MODES,
    Challenge,
    Datagram,
    FlowClosed,
    GoingAway,
    Heartbeat,
    Hello,
    Hop,
    HopRefused,
    LeaseUnknown,
    NameInUse,
    NotAuthenticated,
    Register,
    RegistrationRefused,
    Renew,
    RequestData,
    TryAgain,
    Unregister,
    UnsupportedVersion,
    exportKeyingMaterial,
    helloSignatureMessage,
    modeParts,
    negotiateVersion,
)
from portal.wire.memberlink import MAGIC as MEMBER_MAGIC
from portal.wire.peek import PeekingProtocol, RefuseConnection

TLS_HANDSHAKE = 0x16

#: Refusal reasons (metric labels) of challenge errors at registration.
_CHALLENGE_REASONS: dict[type[ChallengeError], str] = {
    UnknownChallenge: "challenge_unknown",
    ExpiredChallenge: "challenge_expired",
    ChallengeMismatch: "challenge_mismatch",
    BadSignature: "bad_signature",
    WorkRequired: "work_required",
    WorkInsufficient: "work_insufficient",
}


#: The longest a control session over its request rate goes unread (L{RelayControlProtocol._holdOff}),
#: far below L{RelayLimits.controlIdleTimeout<portal.relay.router.RelayLimits>}.
MAX_HOLD_OFF = 8.0

#: Most requests of one read a control session gets answered before it yields
#: (L{RelayControlProtocol.ampBoxReceived}): a read may carry a hundred pipelined requests (a burst
#: of challenges), which answered in one go held every other connection of the relay for 5-10 ms.
MAX_REQUESTS_PER_READ = 8
#: How long such a session yields, letting the reactor serve everything else first. Not 0: a
#: session resumed in the very next turn, over and over, kept its TLS layer's answers from being
#: flushed (seen end to end).
YIELD_SECONDS = 0.001


def _socketOf(transport: Any) -> Any:
    """
    @param transport: A control session's transport: the TLS protocol over the socket.
    @return: The socket's transport under it (or C{transport} itself if it has none).
    """
    return getattr(transport, "transport", None) or transport


class RelayControlProtocol(amp.AMP, TimeoutMixin):
    """
    The relay's side of one control session. A session silent for
    L{RelayLimits.controlIdleTimeout<portal.relay.router.RelayLimits>} is closed: tunnels send
    L{Heartbeat}s far more often, so silence means a dead path.

    @ivar pool: This session's data pool, once L{Hello} is done.
    @ivar owner: The identity id that registered on this session.
    @ivar names: Lease names registered on this session.
    @ivar mode: The mode of this session's leases (L{portal.wire.control.MODES}); C{"stream"} until a
        registration says otherwise.
    @ivar source: The tunnel's source address as limits count it (IPv4 /32, IPv6 /64).
    """

    pool: DataPool | None = None
    owner: str | None = None
    mode = "stream"
    source = ""
    udpSession: UDPSession | None = None
    _helloTimer: IDelayedCall | None = None
    _challengedAt: float | None = None
    _hopPending: Deferred[HopInbound] | None = None
    _strikes = 0
    _resumeCall: IDelayedCall | None = None
    #: Requests answered since this session last read from its transport.
    _readRequests = 0
    _log = Logger()

    def __init__(self, router: Router) -> None:
        super().__init__()
        self._router = router
        self.names: set[str] = set()
        self.sessionId = b""
        #: Capabilities negotiated in L{Hello}.
        self.capabilities: frozenset[str] = frozenset()
        # See ControlDispatch.
        self.callLater = router.clock.callLater  # type: ignore[method-assign, assignment]
        self._machine = controlMachine(self)

    @property
    def lifecycle(self) -> str:
        """
        The lifecycle state: C{greeting}, C{open}, C{hopping}, C{hopped} or C{closed}.
        """
        return self._machine.state()

    def connectionMade(self) -> None:
        """
        Give the tunnel a bounded time to say L{Hello}, and start watching for silence.
        """
        super().connectionMade()
        assert self.transport is not None
        self.source = peerSource(self.transport.getPeer())
        self._router.controls.add(self)
        self._helloTimer = self._router.clock.callLater(
            self._router.limits.helloTimeout, self._machine.helloTimedOut
        )
        self.setTimeout(self._router.limits.controlIdleTimeout)

    def dataReceived(self, data: bytes) -> None:
        """
        Anything from the tunnel shows the path is alive.
        """
        self.resetTimeout()
        self._readRequests = 0
        super().dataReceived(data)

    def ampBoxReceived(self, box: Any) -> None:
        """
        Handle one box; after L{MAX_REQUESTS_PER_READ} from one read, yield for L{YIELD_SECONDS}
        (AMP's parser stops between boxes while paused; the rest are parsed when it resumes).

        @param box: The box.
        """
        super().ampBoxReceived(box)
        self._readRequests += 1
        if (
            self._readRequests >= MAX_REQUESTS_PER_READ
            and self._resumeCall is None
            and self.transport is not None
            and not self.paused
        ):
            self.paused = True
            _socketOf(self.transport).pauseProducing()
            self._resumeCall = self._router.clock.callLater(YIELD_SECONDS, self._resume)

    def timeoutConnection(self) -> None:
        """
        Nothing from the tunnel for too long: the path is dead. Close the session; its leases are
        detached but stay reserved for their owner, who gets them back on reconnecting.
        """
        self._log.info(
            "control session of {identity} silent for {seconds:.0f} s; closing it",
            identity=(self.owner or "an unregistered tunnel")[:12],
            seconds=self._router.limits.controlIdleTimeout,
        )
        # Inside TLS: the transport is the TLS protocol, which can abort.
        cast(ITCPTransport, self.transport).abortConnection()

    def _cancelHelloTimer(self) -> None:
        """
        Stop waiting for L{Hello}.
        """
        if self._helloTimer is not None:
            self._helloTimer.cancel()
            self._helloTimer = None

    def _dropSilent(self) -> None:
        """
        No L{Hello} in time: drop the connection.
        """
        self._helloTimer = None
        self._log.info("control session sent no Hello in time; closing")
        assert self.transport is not None
        self.transport.loseConnection()

    def _rate(self, command: str) -> None:
        """
        Take a token for C{command} from this session's source (L{Admission.rate
        <portal.relay.admission.Admission.rate>}); over the rate, also stop reading this session
        for a while (L{_holdOff}).

        @raise TryAgain: Over the rate.
        """
        try:
            self._router.admission.rate(command, self.source)
        except TryAgain:
            self._holdOff(command)
            raise
        self._strikes = 0

    def _holdOff(self, command: str) -> None:
        """
        A request over its rate: read nothing more from this session for the time one request takes
        to earn, doubled with each refusal in a row, at most L{MAX_HOLD_OFF} seconds. Requests already
        sent wait in the kernel's buffers (and the ones in AMP's buffer stay unparsed), so a flood
        pipelined on one session costs the relay one refusal per hold-off instead of one per request,
        and a client that waits as told loses nothing.

        @param command: The refused command (its per-source rate sets the first hold-off).
        """
        self._strikes += 1
        if self._resumeCall is not None or self.transport is None:
            return
        rate = self._router.admission.limits.perSource.of(command)
        delay = min(MAX_HOLD_OFF, 2 ** min(self._strikes - 1, 20) / rate.perSecond)
        # AMP's parser stops between boxes while paused (IntNStringReceiver checks it); the TLS
        # layer has no pauseProducing of its own, so the socket under it is paused.
        self.paused = True
        _socketOf(self.transport).pauseProducing()
        self._resumeCall = self._router.clock.callLater(delay, self._resume)

    def _resume(self) -> None:
        """
        The hold-off is over: read again, starting with the requests already buffered.
        """
        self._resumeCall = None
        if self.transport is None:
            return
        self.paused = False
        _socketOf(self.transport).resumeProducing()
        self.dataReceived(b"")

    def _refused(
        self, reason: str, exception: type[Exception], message: str, **fields: Any
    ) -> Exception:
        """
        Count and log a refusal of this session's request (see L{portal.relay.admission}).

        @param reason: The metric's reason label.
        @param exception: The AMP error to answer with.
        @param message: What the tunnel is told.
        @param fields: More log fields.
        @return: The exception to raise.
        """
        self._router.admission.refuse(reason, self.source, message, **fields)
        return exception(message)

    @Hello.responder
    def hello(
        self, minVersion: int, maxVersion: int, capabilities: list[str], software: str
    ) -> dict[str, object]:
        """
        Negotiate, prove the relay's identity on this TLS session, and open the data pool.
        """
        router = self._router
        # Before the lifecycle moves on: a refused Hello leaves the Hello timer running.
        self._rate("hello")
        self._machine.helloed()
        try:
            version = negotiateVersion(minVersion, maxVersion)
        except UnsupportedVersion as e:
            raise self._refused("unsupported_version", UnsupportedVersion, str(e))
        if router.closing:
            raise self._refused("shutting_down", TryAgain, "the relay is shutting down")
        self.capabilities = frozenset(c for c in CAPABILITIES if c in capabilities)
        if self.pool is None:
            self.sessionId = router.newSessionId()
            key = exportKeyingMaterial(self.transport, EXPORTER_DATA_KEY)
            self.pool = DataPool(
                self,
                key,
                router.limits,
                router.clock if router.kernelSplice else None,
                router.counters,
                router.bandwidth,
                router.clock,
                router.refusals,
                router.metrics,
            )
            router.sessions[self.sessionId] = self.pool
        exporter = exportKeyingMaterial(self.transport, EXPORTER_HELLO)
        assert self.transport is not None
        peer = self.transport.getPeer()
        self._log.debug(
            "control session from {peer}: Hello, protocol {version}",
            peer=f"{getattr(peer, 'host', peer)}:{getattr(peer, 'port', '')}",
            version=version,
        )
        return {
            "version": version,
            "capabilities": [c for c in CAPABILITIES if c in capabilities],
            "relayKey": router.identity.publicKey,
            "signature": router.identity.sign(helloSignatureMessage(exporter)),
            "sessionId": self.sessionId,
            "tunnelDomain": router.tunnelDomain,
            "publicPort": router.publicPort,
            "leaseTTL": router.limits.leaseTTL,
            "software": f"portal-relay/{portal.__version__}",
        }

    def _checkNames(self, names: list[str]) -> list[str]:
        """
        Validate requested lease names.

        @raise RegistrationRefused: When a name is invalid or too many are asked for.
        """
        if not names:
            raise self._refused("invalid_names", RegistrationRefused, "no lease name given")
        if len(names) > self._router.limits.maxNamesPerRegister:
            raise self._refused(
                "invalid_names",
                RegistrationRefused,
                f"at most {self._router.limits.maxNamesPerRegister} names per registration",
            )
        try:
            return [validateLabel(n) for n in names]
        except InvalidName as e:
            raise self._refused("invalid_names", RegistrationRefused, str(e))

    @Challenge.responder
    def challenge(self, names: list[str], purpose: str | None = None) -> dict[str, object]:
        """
        Issue a registration challenge for C{names}, or a hop challenge (no names).
        """
        # AMP passes an optional argument that was not sent as None.
        purpose = purpose or PURPOSE_REGISTER
        if self.pool is None:
            raise self._refused("hello_first", RegistrationRefused, "Hello must come first")
        admission = self._router.admission
        self._rate("challenge")
        work = 0
        if purpose == PURPOSE_HOP:
            if names:
                raise self._refused(
                    "invalid_names", RegistrationRefused, "a hop challenge names no lease"
                )
        elif purpose == PURPOSE_REGISTER:
            names = self._checkNames(names)
            work = admission.challengeWork()
        else:
            raise self._refused(
                "invalid_purpose",
                RegistrationRefused,
                f"unknown challenge purpose {purpose[:40]!r}",
            )
        nonce = self._router.challenges.issue(names, purpose, work)
        if purpose == PURPOSE_REGISTER:
            self._challengedAt = self._router.clock.seconds()
        response: dict[str, object] = {"nonce": nonce, "expiresIn": self._router.challenges.ttl}
        if "pow" in self.capabilities:
            response["work"] = work
        return response

    @Hop.responder
    def hop(
        self, host: str, port: int, publicKey: bytes, nonce: bytes, signature: bytes
    ) -> Deferred[HopInbound]:
        """
        Check a signed hop request and connect to its destination; once connected, this session
        becomes a splice to it (see L{portal.relay.hop}).
        """
        if self.pool is None:
            raise HopRefused("Hello must come first")
        if self.names or self._hopPending is not None:
            raise HopRefused("this control session is in use; open a new one for a hop")
        router = self._router
        assert self.transport is not None
        peer = self.transport.getPeer()
        try:
            router.challenges.redeemHop(nonce, host, port, publicKey, signature)
        except (UnknownChallenge, ExpiredChallenge) as e:
            raise TryAgain(f"{e}; ask for a new challenge")
        except ChallengeError as e:
            self._log.warn(
                "hop refused from {peer}: {reason}", peer=getattr(peer, "host", peer), reason=str(e)
            )
            raise HopRefused(str(e))
        d = self._hopPending = router.hops.open(peer, identityId(publicKey), host, port)
        self._machine.hopStarted()

        def connected(inbound: HopInbound) -> HopInbound:
            self._hopPending = None
            return self._machine.hopConnected(inbound)

        def failed(failure: Failure) -> Failure:
            self._hopPending = None
            self._machine.hopFailed()
            if failure.check(CancelledError):
                # The control session closed while connecting: nobody is left to tell.
                return Failure(HopRefused("the control session closed"))
            return failure

        return d.addCallbacks(connected, failed)

    def _becomeHop(self, inbound: HopInbound) -> HopInbound:
        """
        The hop's destination accepted: this session carries no leases and no data sessions from
        now on; nor AMP, so it gets no GoingAway, and its silence is the hop's business (an idle
        pooled data session may be silent for long).

        @return: C{inbound}, the protocol AMP hands the connection to.
        """
        self._closePool()
        self.setTimeout(None)
        self._router.controls.discard(self)
        return inbound

    def _closePool(self) -> None:
        """
        Forget this session's data pool: no data session can attach to it any more.
        """
        if self.pool is not None:
            self._router.sessions.pop(self.sessionId, None)
            self.pool.close()

    @Register.responder
    def register(
        self,
        publicKey: bytes,
        names: list[str],
        nonce: bytes,
        signature: bytes,
        mode: str,
        proof: bytes | None = None,
        takeover: bool | None = None,
    ) -> dict[str, object] | Deferred[dict[str, object]]:
        """
        Check the rate limits, the identity lists, the quotas of the tunnel's address, the proof of
        work and the signed challenge, cheapest first, and register the leases, all or none; in raw
        TCP mode, open the lease's public port too. A name live on another session of the same
        identity is moved here with C{takeover}, refused with L{NameInUse} without it (capability
        C{takeover}), or answered L{TryAgain} for a tunnel without the capability.
        """
        router = self._router
        if self.pool is None:
            raise self._refused("hello_first", RegistrationRefused, "Hello must come first")
        admission = router.admission
        self._rate("register")
        if mode not in MODES:
            raise self._refused(
                "invalid_mode", RegistrationRefused, f"{mode} mode is not supported by this relay"
            )
        modes = modeParts(mode)
        for kind, offered in (("tcp", router.tcp), ("udp", router.udp)):
            if kind in modes and offered is None:
                raise self._refused(
                    "invalid_mode", RegistrationRefused, f"{kind} mode is disabled on this relay"
                )
        if "tcp" in modes and "sealed-tcp" not in self.capabilities:
            raise self._refused(
                "invalid_mode",
                RegistrationRefused,
                "raw TCP mode needs a tunnel that seals its data sessions (capability sealed-tcp): "
                "upgrade the tunnel",
            )
        if self.names and mode != self.mode:
            raise self._refused(
                "invalid_mode",
                RegistrationRefused,
                f"this control session holds {self.mode} mode leases",
            )
        if modes != {"stream"} and (len(names) != 1 or self.names - set(names)):
            # One public port set per session: flows and their ids belong to the session.
            raise self._refused(
                "invalid_mode",
                RegistrationRefused,
                f"{mode} mode registers exactly one name per control session",
            )
        names = self._checkNames(names)
        unavailable = router.claims.mayRegister()
        if unavailable is not None:
            raise self._refused("cluster_unavailable", TryAgain, unavailable)
        owner = identityId(publicKey)
        admission.checkIdentity(self.source, owner)
        admission.checkQuota(self.source, owner, names, modes & {"tcp", "udp"})
        try:
            router.challenges.redeem(nonce, names, publicKey, signature, proof)
        except (UnknownChallenge, ExpiredChallenge) as e:
            raise self._refused(
                _CHALLENGE_REASONS[type(e)], TryAgain, f"{e}; ask for a new challenge"
            )
        except WorkRequired as e:
            if "pow" in self.capabilities:
                raise self._refused("work_required", RegistrationRefused, str(e))
            # An older tunnel: it cannot do the work, but can retry once the relay is quiet.
            raise self._refused(
                "work_required",
                TryAgain,
                f"{e}, which this tunnel's version cannot do; retry later, or upgrade the "
                f"tunnel to one that speaks the 'pow' capability",
            )
        except ChallengeError as e:
            raise self._refused(
                _CHALLENGE_REASONS.get(type(e), "bad_challenge"), RegistrationRefused, str(e)
            )
        if self.owner is not None and self.owner != owner:
            raise self._refused(
                "session_identity",
                RegistrationRefused,
                "this control session belongs to another identity",
            )
        for name in names:
            current = router.leases.ownerOf(name)
            if current is not None and current != owner:
                raise self._refused(
                    "name_taken",
                    RegistrationRefused,
                    f"name {name!r} is taken by another identity",
                    identity=owner[:12],
                )
            live = router.leases.route(name)
            if live is not None and live.holder is not self:
                if "takeover" not in self.capabilities:
                    raise self._refused(
                        "name_live_elsewhere",
                        TryAgain,
                        f"name {name!r} is served by another tunnel of this identity; it can be "
                        f"taken over when that tunnel stops or its lease lapses (within "
                        f"{router.leases.ttl:.0f} s)",
                    )
                if not takeover:
                    raise self._refused(
                        "name_live_elsewhere",
                        NameInUse,
                        f"name {name!r} is served by another tunnel of this identity",
                    )
                self._log.info(
                    "lease {name} taken over by another session of {identity}",
                    name=name,
                    identity=owner[:12],
                )
        registered: list[str] = []
        try:
            for name in names:
                router.leases.register(name, owner, self)
                registered.append(name)
        except (LeaseError, StoreError) as e:
            # All or none: give back what this call took (the names stay reserved for the owner).
            for name in registered:
                router.leases.release(name, owner)
            if registered:
                router.onLeasesChanged()
            if isinstance(e, StoreError):
                self._log.error("registration failed: {error}", error=str(e))
                raise self._refused(
                    "lease_store", TryAgain, "the relay cannot record leases at the moment"
                )
            raise self._refused("names_per_identity", RegistrationRefused, str(e))
        admission.names.add(self.source, [(owner, name) for name in names])
        self.owner = owner
        self.mode = mode
        self.names.update(names)
        # A tunnel that proved its key no longer counts against its address's connection cap.
        vouchFor(self.transport)
        router.onLeasesChanged()
        for name in names:
            self._log.info(
                "lease {name} registered by {identity} ({mode} mode)",
                name=name,
                identity=owner[:12],
                mode=mode,
            )
        response: dict[str, object] = {
            "hostnames": [leaseHostname(n, router.tunnelDomain) for n in names],
            "expiresIn": router.leases.ttl,
        }
        return Deferred.fromCoroutine(self._claim(owner, names, mode, response))

    def _registered(
        self, owner: str, names: list[str], mode: str, response: dict[str, object]
    ) -> dict[str, object] | Deferred[dict[str, object]]:
        """
        The names are registered: in raw modes, open their public ports.
        """
        if mode == "stream":
            self._observeRegistration()
            return response
        assert self.pool is not None
        if "tcp" in modeParts(mode):
            self.pool.sealSecret = exportKeyingMaterial(self.transport, EXPORTER_TCP_KEY)
        return Deferred.fromCoroutine(self._openPorts(owner, names[0], modeParts(mode), response))

    async def _claim(
        self, owner: str, names: list[str], mode: str, response: dict[str, object]
    ) -> dict[str, object]:
        """
        Claim the names where ownership is decided beyond this relay's lease table
        (L{Router.claims<portal.relay.router.Router.claims>}: nothing to ask for a relay on its
        own, a compare-and-set each in a cluster's shared store) before they count as registered;
        give them back here when another identity holds one elsewhere, or when that store cannot
        be reached.
        """
        router = self._router
        try:
            taken = await router.claims.claim(names, owner, self.source)
        except ClaimsUnavailable as e:
            self._giveBack(owner, names)
            self._log.warn("registration deferred: {error}", error=e)
            raise TryAgain("cluster store unavailable") from None
        if taken is not None:
            self._giveBack(owner, names)
            self._log.info(
                "refused name {name} to {identity}: taken in the cluster",
                name=taken,
                identity=owner[:12],
            )
            raise RegistrationRefused(f"name {taken!r} is taken by another identity")
        router.claims.sync()
        result = self._registered(owner, names, mode, response)
        if isinstance(result, Deferred):
            return await result
        return result

    def _giveBack(self, owner: str, names: list[str]) -> None:
        """
        Release names registered here whose cluster claim failed.
        """
        for name in names:
            self.names.discard(name)
            self._router.leases.release(name, owner)
        self._router.onLeasesChanged()

    async def _openPorts(
        self, owner: str, name: str, modes: frozenset[str], response: dict[str, object]
    ) -> dict[str, object]:
        """
        Open the public TCP and/or UDP port of a raw lease; without them, the lease is given back.

        @return: C{response} with the ports and the host visitors reach them at.
        @raise RegistrationRefused: When a port cannot be opened.
        """
        router = self._router
        hostname = leaseHostname(name, router.tunnelDomain)
        response = {**response, "publicHost": router.relayDomain}
        opened: list[ILeasePorts] = []

        def giveBack() -> None:
            for ports in opened:
                ports.close(owner, name, self)
            self.names.discard(name)
            router.leases.release(name, owner)
            router.onLeasesChanged()

        try:
            if "tcp" in modes:
                assert router.tcp is not None
                router.admission.takePort(self.source, owner, name, "tcp")
                lease = await router.tcp.open(router, owner, name, hostname, self)
                opened.append(router.tcp)
                response["tcpPort"] = lease.port
            if "udp" in modes:
                assert router.udp is not None
                if self.udpSession is None:
                    secret = exportKeyingMaterial(self.transport, EXPORTER_UDP_KEY)
                    self.udpSession = router.udp.newSession(self, secret)
                router.admission.takePort(self.source, owner, name, "udp")
                lease = await router.udp.ports.open(router, owner, name, hostname, self)
                response["udpPort"] = lease.port
                response["udpSession"] = self.udpSession.sessionId
        except RegistrationRefused:
            giveBack()
            raise
        except (PortAllocationError, CannotListenError, StoreError) as e:
            giveBack()
            if isinstance(e, StoreError):
                self._log.error("registration failed: {error}", error=str(e))
                raise self._refused(
                    "lease_store", TryAgain, "the relay cannot record ports at the moment"
                ) from None
            reason = e.args[0] if isinstance(e, PortAllocationError) else f"cannot listen: {e}"
            raise self._refused(
                "no_port", RegistrationRefused, f"no public port for {name!r}: {reason}"
            ) from None
        router.onLeasesChanged()
        self._observeRegistration()
        return response

    def _observeRegistration(self) -> None:
        """
        Leases were granted: observe the time since their challenge was issued.
        """
        if self._challengedAt is not None:
            metrics = self._router.metrics
            metrics.registration.observe(metrics.since(self._challengedAt))
            self._challengedAt = None

    def _closePort(self, name: str) -> None:
        """
        The lease on C{name} ended: close its public TCP and UDP ports, if it has them.
        """
        if self.owner is None:
            return
        router = self._router
        modes = modeParts(self.mode)
        if "tcp" in modes and router.tcp is not None:
            router.tcp.close(self.owner, name, self)
        if "udp" in modes and router.udp is not None:
            router.udp.ports.close(self.owner, name, self)
        router.onLeasesChanged()

    @Heartbeat.responder
    def heartbeat(self) -> dict[str, object]:
        """
        The tunnel checks the path: answer at once (receiving it already reset the silence timer).
        """
        return {}

    def goingAway(self, deadline: float) -> None:
        """
        Tell the tunnel that this relay is shutting down, if it understands L{GoingAway}.

        @param deadline: Seconds open connections get before they are closed.
        """
        if "goaway" in self.capabilities:
            self.callRemote(GoingAway, deadline=deadline)

    @Datagram.responder
    def datagram(self, flowId: int, payload: bytes) -> dict[str, object]:
        """
        A datagram from the tunnel over the control session (UDP fallback).
        """
        if self.udpSession is not None and self._router.udp is not None:
            self._router.udp.fromTunnel(self.udpSession, flowId, payload)
        return {}

    @FlowClosed.responder
    def flowClosed(self, flowId: int) -> dict[str, object]:
        """
        The tunnel forgot a flow.
        """
        if self.udpSession is not None and self._router.udp is not None:
            self._router.udp.closeFlow(self.udpSession, flowId)
        return {}

    def _ownNames(self, names: list[str]) -> None:
        """
        @raise NotAuthenticated: Before a registration.
        @raise LeaseUnknown: When a name is not held by this session.
        """
        if self.owner is None:
            raise NotAuthenticated("register first")
        unknown = [n for n in names if n not in self.names]
        if unknown:
            raise LeaseUnknown(f"this session holds no lease on {', '.join(unknown)}")

    @Renew.responder
    def renew(self, names: list[str]) -> dict[str, object]:
        """
        Extend this session's leases.
        """
        self._ownNames(names)
        assert self.owner is not None
        for name in names:
            try:
                self._router.leases.renew(name, self.owner, self)
            except LeaseError as e:
                self.names.discard(name)
                self._closePort(name)
                raise LeaseUnknown(str(e))
        self._router.onLeasesChanged()
        return {"expiresIn": self._router.leases.ttl}

    @Unregister.responder
    def unregister(self, names: list[str]) -> dict[str, object]:
        """
        End this session's leases on C{names}.
        """
        self._ownNames(names)
        assert self.owner is not None
        for name in names:
            self.names.discard(name)
            self._closePort(name)
            live = self._router.leases.route(name)
            if live is not None and live.holder is not self:
                # Another session of this identity serves it now; this session's word is stale.
                continue
            self._router.leases.release(name, self.owner)
            self._log.info("lease {name} released", name=name)
        self._router.onLeasesChanged()
        return {}

    def requestData(self, count: int) -> None:
        """
        Ask the tunnel for C{count} more data sessions.

        @param count: How many visitors are waiting.
        """
        self.callRemote(RequestData, count=count)

    def makeConnection(self, transport: ITransport) -> None:
        """
        Connect without AMP's info line per connection: a flood of control connections must not be
        a flood of log lines (what a session does is logged, and refusals are rate-limited).
        """
        amp.BinaryBoxProtocol.makeConnection(self, transport)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """
        Detach this session's leases (they stay owned until expiry plus reservation) and close its pool.

        @param reason: Why.
        """
        self.setTimeout(None)
        if self._resumeCall is not None:
            self._resumeCall.cancel()
            self._resumeCall = None
        self._machine.lost()
        router = self._router
        router.controls.discard(self)
        self._closePool()
        for lease in router.leases.detach(self):
            self._log.info("lease {name} detached: control session closed", name=lease.name)
        router.claims.sync()
        for name in self.names:
            self._closePort(name)
        if self.udpSession is not None and router.udp is not None:
            router.udp.forget(self.udpSession)
        # Not AMP.connectionLost: it logs a line per connection (see makeConnection).
        amp.BinaryBoxProtocol.connectionLost(self, reason)
        self.transport = None


class ControlInputs(Protocol):
    """
    The inputs of a relay control session's lifecycle (L{controlMachine}).
    """

    def helloed(self) -> None:
        """
        The tunnel said L{Hello}.
        """

    def helloTimedOut(self) -> None:
        """
        No L{Hello} came within C{helloTimeout}.
        """

    def hopStarted(self) -> None:
        """
        A checked hop request: the relay is connecting to its destination.
        """

    def hopConnected(self, inbound: HopInbound) -> HopInbound:
        """
        The hop's destination accepted.

        @return: C{inbound}, to which AMP hands the connection.
        @raise HopRefused: When the session closed meanwhile (the hop is abandoned).
        """

    def hopFailed(self) -> None:
        """
        The hop's destination could not be reached (or the wait was cancelled).
        """

    def lost(self) -> None:
        """
        The connection closed.
        """

    def state(self) -> str:
        """
        @return: The name of the current state.
        """


def _buildControlMachine() -> TypeMachine[ControlInputs, RelayControlProtocol]:
    """
    Describe the control session lifecycle; see the module docstring.
    """
    builder = TypeMachineBuilder(ControlInputs, RelayControlProtocol)
    greeting = builder.state("greeting")
    opened = builder.state("open")
    hopping = builder.state("hopping")
    hopped = builder.state("hopped")
    closed = builder.state("closed")
    states = {
        "greeting": greeting,
        "open": opened,
        "hopping": hopping,
        "hopped": hopped,
        "closed": closed,
    }

    @greeting.upon(ControlInputs.helloed).to(opened)
    @greeting.upon(ControlInputs.lost).to(closed)
    def stopWaiting(inputs: ControlInputs, session: RelayControlProtocol) -> None:
        session._cancelHelloTimer()

    @greeting.upon(ControlInputs.helloTimedOut).to(closed)
    def dropSilent(inputs: ControlInputs, session: RelayControlProtocol) -> None:
        session._dropSilent()

    opened.upon(ControlInputs.hopStarted).to(hopping).returns(None)
    opened.upon(ControlInputs.lost).to(closed).returns(None)

    @hopping.upon(ControlInputs.hopConnected).to(hopped)
    def becomeHop(
        inputs: ControlInputs, session: RelayControlProtocol, inbound: HopInbound
    ) -> HopInbound:
        return session._becomeHop(inbound)

    hopping.upon(ControlInputs.hopFailed).to(opened).returns(None)

    @hopping.upon(ControlInputs.lost).to(closed)
    def cancelHop(inputs: ControlInputs, session: RelayControlProtocol) -> None:
        if session._hopPending is not None:
            session._hopPending.cancel()

    hopped.upon(ControlInputs.lost).to(closed).returns(None)

    @greeting.upon(ControlInputs.hopConnected).loop()
    @opened.upon(ControlInputs.hopConnected).loop()
    @hopped.upon(ControlInputs.hopConnected).loop()
    @closed.upon(ControlInputs.hopConnected).loop()
    def abandonHop(
        inputs: ControlInputs, session: RelayControlProtocol, inbound: HopInbound
    ) -> HopInbound:
        session._router.hops.abandon(inbound)
        raise HopRefused("the control session closed")

    # Everything else is late or repeated news (a second Hello, a timer or a hop result after the
    # session moved on): it changes nothing.
    ignored = {
        "greeting": ["hopStarted", "hopFailed"],
        "open": ["helloed", "helloTimedOut", "hopFailed"],
        "hopping": ["helloed", "helloTimedOut", "hopStarted"],
        "hopped": ["helloed", "helloTimedOut", "hopStarted", "hopFailed"],
        "closed": ["helloed", "helloTimedOut", "hopStarted", "hopFailed", "lost"],
    }
    for name, state in states.items():
        state.upon(ControlInputs.state).loop().returns(name)
        for input in ignored[name]:
            state.upon(getattr(ControlInputs, input)).loop().returns(None)
    return builder.build()


#: The control session lifecycle, built once; each session runs its own instance.
controlMachine = _buildControlMachine()


class ControlDispatch(OnRouterClock, PeekingProtocol):
    """
    Tells a TLS control session (first byte 0x16) from a plain data session (L{MAGIC}).
    """

    maxPeek = len(MAGIC)
    #: Bytes a connection waiting for its turn to shake hands may have sent (a ClientHello, with
    #: room to spare); more closes it.
    maxWaitingPeek = 16384
    #: The reason label of a refusal by rate (see L{choose}), counted and logged by L{Admission
    #: <portal.relay.admission.Admission>} with the rate limits it enforces.
    _refusal: str | None = None
    #: This connection's place in the queue for a TLS handshake, while it waits.
    _waiting: Waiting | None = None
    #: Its turn has come: the TLS handshake may start.
    _turn = False

    def __init__(self, router: Router, tlsFactory: TLSMemoryBIOFactory) -> None:
        super().__init__()
        self._router = router
        self._tlsFactory = tlsFactory
        self.peekTimeout = router.limits.attachTimeout

    def choose(self, data: bytes) -> IProtocol | None:
        """
        @param data: The first bytes of the connection.
        @return: A TLS-wrapped L{RelayControlProtocol} or a L{RelayDataSession}; L{None} while a
            TLS connection waits for its turn to shake hands (L{Router.handshakes
            <portal.relay.router.Router.handshakes>}), reading nothing more meanwhile.
        """
        if data[0] == TLS_HANDSHAKE:
            assert self.transport is not None
            peer = self.transport.getPeer()
            if self._turn:
                return self._tlsFactory.buildProtocol(peer)
            if self._waiting is not None:
                return None
            source = peerSource(peer)
            if not self._router.admission.mayHello(source):
                self._refusal = "hello_rate_source"
                raise RefuseConnection(
                    "too many hello requests from your address: refused before the TLS handshake",
                    alertRecord(INTERNAL_ERROR),
                )
            try:
                self._waiting = self._router.handshakes.enter(source, self._yourTurn)
            except PacerFull:
                self._refusal = "handshake_queue"
                raise RefuseConnection(
                    "too many TLS handshakes waiting: refused before the TLS handshake",
                    alertRecord(INTERNAL_ERROR),
                )
            if self._waiting is None:
                return self._tlsFactory.buildProtocol(peer)
            self._router.counters["handshakes_delayed"] = (
                self._router.counters.get("handshakes_delayed", 0) + 1
            )
            pauseReading(self.transport)
            return None
        if data.startswith(MAGIC):
            return RelayDataSession(self._router)
        cluster = self._router.cluster
        if isinstance(cluster, MemberLinks) and data.startswith(MEMBER_MAGIC):
            return MemberVisitor(self._router, cluster)
        if MAGIC.startswith(data) or MEMBER_MAGIC.startswith(data):
            return None
        raise RefuseConnection("neither TLS nor a Portal data session")

    def peekedTooMuch(self) -> bool:
        """
        @return: Whether more bytes were buffered than a decision needs, or, while the connection
            waits for its TLS handshake, than L{maxWaitingPeek}.
        """
        if self._waiting is not None:
            return len(self._peeked) > self.maxWaitingPeek
        return super().peekedTooMuch()

    def timeoutConnection(self) -> None:
        """
        Nothing recognisable arrived in time, or the connection waited that long for its turn to
        shake hands (counted and logged as C{handshake_wait}).
        """
        if self._waiting is not None:
            self._waiting.cancel()
            self._waiting = None
            self._refusal = "handshake_wait"
            self.refuse(f"waited {self.peekTimeout} seconds for its TLS handshake")
            return
        super().timeoutConnection()

    def _yourTurn(self) -> None:
        """
        The pacer lets this connection's TLS handshake start: read again and start it.
        """
        self._waiting = None
        self._turn = True
        assert self.transport is not None
        resumeReading(self.transport)
        super().dataReceived(b"")

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """
        Leave the handshake queue, if waiting, and stop as the peeking protocol does.

        @param reason: Why the connection closed.
        """
        if self._waiting is not None:
            self._waiting.cancel()
            self._waiting = None
        super().connectionLost(reason)

    def refuse(self, reason: str, reply: bytes = b"") -> None:
        """
        Count and log the refusal in the relay's refusals (rate-limited), then close.

        @param reason: Why.
        @param reply: Bytes to send first.
        """
        self.setTimeout(None)
        assert self.transport is not None
        if self._refusal is not None:
            self._router.admission.refuse(
                self._refusal, peerSource(self.transport.getPeer()), reason
            )
            self.transport.write(reply)
            self.transport.loseConnection()
            return
        self._router.refusals.refuse(
            "control_unrecognised",
            "refused connection from {peer}: {reason}",
            peer=getattr(self.transport.getPeer(), "host", ""),
            reason=reason,
        )
        if reply:
            self.transport.write(reply)
        self.transport.loseConnection()


class _TLSDispatch(PeekingProtocol):
    """
    Inside TLS: tells a control session (an AMP box, first byte 0) from a TLS data session (L{MAGIC}: a
    data session through a chain of hops, TLS end to end to this relay).
    """

    maxPeek = len(MAGIC)

    def __init__(self, router: Router) -> None:
        super().__init__()
        self._router = router
        self.peekTimeout = router.limits.attachTimeout
        # See ControlDispatch.
        self.callLater = router.clock.callLater  # type: ignore[method-assign, assignment]

    def choose(self, data: bytes) -> IProtocol | None:
        """
        @param data: The first decrypted bytes.
        @return: A L{RelayControlProtocol} or a TLS L{RelayDataSession}.
        """
        if data[:1] == b"\0":
            return RelayControlProtocol(self._router)
        if data.startswith(MAGIC):
            return RelayDataSession(self._router, tls=True)
        if MAGIC.startswith(data):
            return None
        raise RefuseConnection("neither a control session nor a Portal data session inside TLS")


class _ControlSessionFactory(Factory):
    """
    Builds, inside TLS, the protocol that tells control sessions from TLS data sessions.
    """

    noisy = False

    def __init__(self, router: Router) -> None:
        self._router = router

    def buildProtocol(self, addr: IAddress | None) -> _TLSDispatch:
        """
        @return: A new dispatcher inside TLS.
        """
        return _TLSDispatch(self._router)


class ControlFactory(Factory):
    """
    The control listener's factory.
    """

    noisy = False

    def __init__(self, router: Router, tlsOptions: Any) -> None:
        self._router = router
        self._tlsFactory = TLSMemoryBIOFactory(
            tlsOptions, False, _ControlSessionFactory(router), clock=router.clock
        )

    def buildProtocol(self, addr: IAddress | None) -> ControlDispatch:
        """
        @return: A dispatcher for one new connection.
        """
        return ControlDispatch(self._router, self._tlsFactory)
