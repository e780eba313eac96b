"""
The relay's routing state: leases, live control sessions, and the pairing of visitors with data sessions.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Protocol, cast

import attrs
from twisted.internet.interfaces import IDelayedCall, IProtocolFactory, IReactorTime
from twisted.logger import Logger

from portal.forwarding.connlimit import ConnectionLimiter, LimitedFactory, OpenConnections
from portal.forwarding.idlewatch import IdlePolicy
from portal.forwarding.kernelsplice import joinEnds
from portal.forwarding.meter import ByteMeter
from portal.forwarding.pacer import FairPacer
from portal.forwarding.pacing import BandwidthCaps
from portal.forwarding.refusals import Refusals
from portal.forwarding.sources import sourceKey
from portal.forwarding.splice import SpliceProtocol, pauseReading, splice
from portal.relay.admission import Admission, AdmissionLimits, Rate
from portal.relay.cluster import ICluster
from portal.relay.events import RecentEvents
from portal.relay.hop import HopForwarder
from portal.relay.interfaces import IDataSession, ILeasePorts, IUDPMode, IWaitingVisitor
from portal.relay.leases import LeaseTable
from portal.relay.metrics import RelayMetrics
from portal.relay.store import ILeaseClaims, LocalClaims
from portal.trust.challenge import ChallengeIssuer
from portal.trust.identity import Identity
from portal.trust.names import leaseLabel, normaliseHostname
from portal.wire.attach import StreamHeader, encodeStreamHeader
from portal.wire.control import modeParts


class RequestsData(Protocol):
    """
    What a L{DataPool} needs from its control session: a way to ask the tunnel for more data sessions.
    """

    def requestData(self, count: int) -> None:
        """
        Ask the tunnel to open C{count} more data sessions.
        """


#: Control-port connections of one source address that may wait for their TLS handshake at once
#: (L{Router.handshakes}): one address cannot fill the queue for every other.
HANDSHAKES_WAITING_PER_SOURCE = 32

#: Control-port TLS handshakes started in one turn of the reactor (L{Router.handshakes}): a
#: handshake costs the relay about a millisecond, and the burst the rate allows, started in one
#: turn, held every visitor's events of that turn for as many milliseconds.
HANDSHAKES_PER_TURN = 1


@attrs.frozen
class RelayLimits:
    """
    Limits a relay enforces per tunnel and per visitor.

    @ivar maxIdleData: Idle data sessions kept per control session; more are closed.
    @ivar maxWaiting: Visitors that may wait for a data session per control session; more are refused.
    @ivar dataWaitTimeout: Seconds a visitor waits for a data session before it is dropped.
    @ivar helloTimeout: Seconds a client has to send a complete ClientHello.
    @ivar maxHelloReads: Reads a ClientHello may take. The parser re-reads the buffer on every read, so
        this bounds the work a client dripping bytes can cause (a real client needs one to a few).
    @ivar attachTimeout: Seconds a new data session has to authenticate.
    @ivar controlIdleTimeout: Seconds a control session may stay silent (tunnels send heartbeats far
        more often); a silent session is closed and its leases detached (they stay reserved).
    @ivar leaseTTL: Seconds a lease lives without renewal.
    @ivar reservation: Seconds a lapsed lease's name (or public port) stays reserved for its owner.
    @ivar reserveAfter: Seconds a name (or public port) must have been held before it earns that
        reservation; one registered and dropped sooner is free when its lease ends.
    @ivar maxLeasesPerIdentity: Names one identity may hold on this relay.
    @ivar maxNamesPerRegister: Names one registration may ask for.
    @ivar maxConnections: Connections open at once on all the relay's listeners together (public,
        control, HTTP, raw TCP ports); lowered at start to fit the descriptor limit.
    @ivar maxConnectionsPerSource: Connections open at once from one source address (IPv4 /32, IPv6
        /64) on each visitor listener: public, HTTP, and each kind of raw TCP port together.
    @ivar maxControlConnectionsPerSource: Connections open at once from one source address on the
        control port that have not proved who they are: a data session stops counting once
        attached, a member link once its proof checks, a control session once it registered.
    @ivar siteHeaderTimeout: Seconds a connection to the relay's own pages (its hostname on the
        public port, and the HTTP listener) has to send complete request headers, from its start
        (the TLS handshake included) and again after each response.
    @ivar siteIdleTimeout: Seconds a connection to the relay's own pages may stay silent.
    @ivar deferAccept: Seconds the kernel holds a connection to the public, control and HTTP
        listeners that has sent nothing before the relay accepts it (C{TCP_DEFER_ACCEPT}; 0 for
        none): idle connections cost the relay nothing until then.
    @ivar maxUDPFlowsPerSource: UDP flows one source address may have on each lease's UDP port.
    @ivar streamIdleTimeout: Seconds a spliced stream (visitor and data session) may move no byte
        either way before both are closed (it is closed after between one and two of them).
    @ivar bandwidthPerLease: Bytes per second all streams of one lease name may move together (both
        directions); 0 for no cap.
    @ivar bandwidthPerIdentity: Bytes per second all streams of one identity's leases may move
        together; 0 for no cap.
    @ivar bandwidthPerSource: Bytes per second all streams of one visitor source address may move
        together; 0 for no cap.
    @ivar admission: Rate limits, quotas per source address and proof of work on registrations.
    @ivar handshakeRate: TLS handshakes a second the relay starts on its control port, and the
        burst it starts at once after a quiet spell (HAProxy's C{maxsslrate}); the rest wait their
        turn, source address by source address (L{portal.forwarding.pacer}).
    @ivar handshakeQueue: Control-port connections that may wait for their TLS handshake at once;
        more are refused before the handshake.
    @ivar tcpVisitorRate: New visitors a second from one source address that a raw TCP lease port
        passes to its tunnel (each costs the tunnel a data session and a connection to its service
        the moment it is accepted, whether or not it ever sends a byte), and the burst passed at
        once; the source's next visitors wait their turn, paused.
    @ivar tcpVisitorQueue: Visitors from one source address that may wait for their turn on a raw
        TCP lease port; more are refused.
    """

    maxIdleData: int = 64
    maxWaiting: int = 256
    dataWaitTimeout: float = 10.0
    helloTimeout: float = 10.0
    maxHelloReads: int = 64
    attachTimeout: float = 10.0
    controlIdleTimeout: float = 60.0
    leaseTTL: float = 60.0
    reservation: float = 3600.0
    reserveAfter: float = 600.0
    maxLeasesPerIdentity: int = 100
    maxNamesPerRegister: int = 16
    maxConnections: int = 16384
    maxConnectionsPerSource: int = 256
    maxControlConnectionsPerSource: int = 256
    siteHeaderTimeout: float = 10.0
    siteIdleTimeout: float = 30.0
    deferAccept: float = 5.0
    maxUDPFlowsPerSource: int = 64
    streamIdleTimeout: float = 3600.0
    bandwidthPerLease: float = 0.0
    bandwidthPerIdentity: float = 0.0
    bandwidthPerSource: float = 0.0
    admission: AdmissionLimits = attrs.field(factory=AdmissionLimits)
    handshakeRate: Rate = Rate(200.0, 20.0)
    handshakeQueue: int = 1024
    tcpVisitorRate: Rate = Rate(20.0, 20.0)
    tcpVisitorQueue: int = 256


class OnRouterClock:
    """
    For a protocol with L{TimeoutMixin <twisted.protocols.policies.TimeoutMixin>} timers and a
    C{_router}: its timers run on the router's clock rather than the global reactor. A method
    rather than a bound method stored on each connection (issue 16's memory per connection); put
    it before C{TimeoutMixin} among the bases.
    """

    _router: Router

    def callLater(self, period: float, func: Callable[[], object]) -> IDelayedCall:
        """
        @param period: Seconds from now.
        @param func: What to call.
        @return: The scheduled call.
        """
        return self._router.clock.callLater(period, func)


class DataPool:
    """
    The idle data sessions of one control session, and the visitors waiting for one.

    @ivar key: The data key exported from the control session's TLS.
    """

    _log = Logger()

    def __init__(
        self,
        owner: RequestsData,
        key: bytes,
        limits: RelayLimits,
        reactor: Any = None,
        counters: dict[str, int] | None = None,
        bandwidth: BandwidthCaps | None = None,
        clock: IReactorTime | None = None,
        refusals: Refusals | None = None,
        metrics: RelayMetrics | None = None,
    ) -> None:
        """
        @param owner: The control session, asked for more data sessions when they run out.
        @param key: The data key exported from the control session's TLS.
        @param limits: The relay's limits.
        @param reactor: The reactor, to move paired plain-TCP connections in the kernel
            (L{portal.forwarding.kernelsplice}); L{None} keeps every splice in Python.
        @param counters: Where to count pairings by path (the router's metrics).
        @param bandwidth: The relay's bandwidth caps, which pace every stream paired here.
        @param clock: Times the idle timeout of every stream paired here
            (L{RelayLimits.streamIdleTimeout}); L{None} for no idle timeout.
        @param refusals: Where streams closed for being idle are counted and logged.
        @param metrics: Where to observe visitors' waits and times to first byte.
        """
        self._idlePolicy: IdlePolicy | None = None
        if clock is not None:
            self._idlePolicy = IdlePolicy(clock, limits.streamIdleTimeout, self._streamIdle)
        self._refusals = refusals
        self._bandwidth = bandwidth
        self._owner = owner
        self._reactor = reactor
        #: Pairings by path, shared with the router's counters when it passes them.
        self.counters: dict[str, int] = counters if counters is not None else {}
        self.counters.setdefault("kernel_spliced", 0)
        self.counters.setdefault("python_spliced", 0)
        self.counters.setdefault("sealed_spliced", 0)
        self.key = key
        self._limits = limits
        self._idle: dict[IDataSession, None] = {}
        self._waiting: dict[IWaitingVisitor, StreamHeader] = {}
        self._metrics = metrics
        #: Visitors paired with a data session of this pool.
        self.paired = 0
        # When each waiting visitor started waiting, for the data wait histogram.
        self._since: dict[IWaitingVisitor, float] = {}
        self._closed = False
        #: Raw TCP mode: the secret its streams are sealed under (L{portal.wire.streamseal}), exported
        #: from the control session; L{None} in stream mode, whose payload is the visitor's TLS.
        self.sealSecret: bytes | None = None

    def __len__(self) -> int:
        """
        @return: The number of idle data sessions.
        """
        return len(self._idle)

    @property
    def waiting(self) -> int:
        """
        The number of visitors waiting for a data session.
        """
        return len(self._waiting)

    def offer(self, session: IDataSession) -> None:
        """
        A data session finished its attach: pair it with a waiting visitor, or keep it idle.

        @param session: The authenticated data session.
        """
        assert session.transport is not None
        if self._closed:
            session.transport.loseConnection()
            return
        if self._waiting:
            visitor = next(iter(self._waiting))
            header = self._waiting.pop(visitor)
            since = self._since.pop(visitor, None)
            if self._metrics is not None and since is not None:
                self._metrics.dataWait.observe(self._metrics.since(since))
            self._pair(visitor, session, header)
            return
        if len(self._idle) >= self._limits.maxIdleData:
            self._log.info(
                "closing surplus data session: {limit} already idle", limit=len(self._idle)
            )
            session.transport.loseConnection()
            return
        self._idle[session] = None

    def forget(self, session: IDataSession) -> None:
        """
        An idle data session closed.

        @param session: The closed session.
        """
        self._idle.pop(session, None)

    def route(self, visitor: IWaitingVisitor, header: StreamHeader) -> bool:
        """
        Pair a visitor with an idle data session, or make it wait (paused) and ask the tunnel for more.

        @param visitor: The visitor, with its ClientHello buffered.
        @param header: What the tunnel is told about the visitor.
        @return: C{False} if the visitor was refused because too many are waiting.
        """
        if self._idle:
            session = next(iter(self._idle))
            del self._idle[session]
            if self._metrics is not None:
                self._metrics.dataWait.observe(0.0)
            self._pair(visitor, session, header)
            return True
        if len(self._waiting) >= self._limits.maxWaiting:
            return False
        assert visitor.transport is not None
        pauseReading(visitor.transport)
        self.counters["waited"] = self.counters.get("waited", 0) + 1
        self._waiting[visitor] = header
        if self._metrics is not None:
            self._since[visitor] = self._metrics.clock.seconds()
        visitor.setTimeout(self._limits.dataWaitTimeout)
        self._owner.requestData(len(self._waiting))
        return True

    def abandon(self, visitor: IWaitingVisitor) -> None:
        """
        A waiting visitor left or timed out.

        @param visitor: The visitor.
        """
        self._waiting.pop(visitor, None)
        self._since.pop(visitor, None)

    def _meters(self, visitor: IWaitingVisitor) -> tuple[ByteMeter, ByteMeter]:
        """
        Meters for a paired visitor's bytes: towards the tunnel, and back (whose first byte ends the
        visitor's time to first byte).

        @return: The meter of bytes read from the visitor, and of bytes read from the data session.
        """
        metrics = self._metrics
        acceptedAt = getattr(visitor, "acceptedAt", None)
        onFirstByte: Callable[[], None] | None = None
        if metrics is not None and acceptedAt is not None:

            def onFirstByte() -> None:
                metrics.firstByte.observe(metrics.since(acceptedAt))

        return (
            ByteMeter(self.counters, "bytes_to_tunnels"),
            ByteMeter(self.counters, "bytes_to_visitors", onFirstByte),
        )

    def _pair(self, visitor: IWaitingVisitor, session: IDataSession, header: StreamHeader) -> None:
        """
        Send the stream header on C{session} and splice it to C{visitor}.
        """
        visitor.setTimeout(None)
        visitor.pool = None
        session.paired(header.streamId)
        self.paired += 1
        toTunnel, toVisitor = self._meters(visitor)
        prefix = encodeStreamHeader(self.key, session.nonce, header)
        pacer = None
        if self._bandwidth is not None:
            pacer = self._bandwidth.pacer(
                header.hostname, getattr(self._owner, "owner", None), sourceKey(header.peerHost)
            )
        # Both ends are splice protocols (what IWaitingVisitor and IDataSession describe).
        visitorEnd = cast(SpliceProtocol, visitor)
        if self.sealSecret is not None:
            # Raw TCP mode: the header goes as it is, the visitor's bytes sealed after it.
            assert session.transport is not None
            session.transport.write(prefix)
            sealed = session.seal(self.sealSecret)
            visitorEnd.meter, sealed.meter = toTunnel, toVisitor
            splice(visitorEnd, sealed, pacer=pacer, idle=self._idlePolicy)
            self.counters["sealed_spliced"] += 1
        elif joinEnds(
            self._reactor,
            visitorEnd,
            cast(SpliceProtocol, session),
            toB=prefix,
            pacer=pacer,
            idle=self._idlePolicy,
            meters=(toTunnel, toVisitor),
        ):
            self.counters["kernel_spliced"] += 1
        else:
            self.counters["python_spliced"] += 1

    def _streamIdle(self) -> None:
        """
        A stream moved nothing for the idle timeout and is being closed: count and log it.
        """
        if self._refusals is not None:
            self._refusals.refuse(
                "stream_idle_timeout",
                "closing a stream that moved no byte for {timeout} s",
                timeout=self._limits.streamIdleTimeout,
            )

    def close(self) -> None:
        """
        The control session ended: close idle data sessions and drop waiting visitors.
        """
        self._closed = True
        idle, self._idle = self._idle, {}
        waiting, self._waiting = self._waiting, {}
        self._since.clear()
        for session in idle:
            assert session.transport is not None
            session.transport.loseConnection()
        for visitor in waiting:
            assert visitor.transport is not None
            visitor.transport.loseConnection()


#: SNI hostnames whose lease label L{Router.poolFor} remembers (the table is emptied when full).
LABELS_REMEMBERED = 4096


class Router:
    """
    Everything the relay's listeners share.

    @ivar identity: The relay's own identity.
    @ivar relayDomain: The relay's own hostname (served by the relay itself).
    @ivar tunnelDomain: Lease hostnames are C{<label>.<tunnelDomain>}.
    @ivar leases: The lease table.
    @ivar challenges: Registration challenges.
    @ivar sessions: Live control sessions' data pools by session id.
    @ivar controls: Live control sessions.
    @ivar visitors: Open visitor connections (public TLS and raw TCP), which a graceful shutdown lets
        finish.
    @ivar publicPort: The port visitors use, once the public listener is up.
    @ivar refusals: Everything a limit refused, counted by reason (C{/metrics}) and logged.
    @ivar connections: Connections open on all listeners, and their cap.
    @ivar limiters: The connection caps of each listener: C{"public"}, C{"control"}, C{"http"} and
        C{"tcp"} (all raw TCP lease ports together).
    @ivar bandwidth: Bandwidth caps per lease, identity and source address, or L{None} when the
        limits set none.
    @ivar startedAt: When the router was made (the relay's start), by its clock.
    @ivar metrics: The relay's Prometheus metrics.
    @ivar events: The relay's recent log events (an observer the service adds to the log publisher).
    """

    _log = Logger()

    def __init__(
        self,
        identity: Identity,
        clock: IReactorTime,
        relayDomain: str = "localhost",
        tunnelDomain: str = "localhost",
        limits: RelayLimits | None = None,
    ) -> None:
        self.identity = identity
        self.clock = clock
        self.relayDomain = normaliseHostname(relayDomain)
        self.tunnelDomain = normaliseHostname(tunnelDomain)
        #: Lease labels of recent SNI hostnames (L{poolFor}), at most L{LABELS_REMEMBERED}.
        self._labels: dict[str, str | None] = {}
        self.limits = limits or RelayLimits()
        self.leases = LeaseTable(
            clock,
            ttl=self.limits.leaseTTL,
            reservation=self.limits.reservation,
            maxPerOwner=self.limits.maxLeasesPerIdentity,
            reserveAfter=self.limits.reserveAfter,
        )
        self.challenges = ChallengeIssuer(identity.id, clock)
        self.refusals = Refusals(clock)
        self.bandwidth: BandwidthCaps | None = None
        limits = self.limits
        if limits.bandwidthPerLease or limits.bandwidthPerIdentity or limits.bandwidthPerSource:
            self.bandwidth = BandwidthCaps(
                clock,
                perLease=limits.bandwidthPerLease,
                perIdentity=limits.bandwidthPerIdentity,
                perSource=limits.bandwidthPerSource,
            )
        self.connections = OpenConnections(self.limits.maxConnections)
        perSource = self.limits.maxConnectionsPerSource
        self.limiters = {
            name: ConnectionLimiter(name, maximum, self.connections, self.refusals)
            for name, maximum in (
                ("public", perSource),
                ("control", self.limits.maxControlConnectionsPerSource),
                ("http", perSource),
                ("tcp", perSource),
            )
        }
        #: The registration gate.
        self.admission = Admission(
            clock, self.limits.admission, self.refusals, self._nameHeld, self._portHeld
        )
        #: Paces the TLS handshakes of new control-port connections.
        self.handshakes = FairPacer(
            clock,
            self.limits.handshakeRate.perSecond,
            self.limits.handshakeRate.burst,
            self.limits.handshakeQueue,
            maxWaitingPerKey=HANDSHAKES_WAITING_PER_SOURCE,
            perTurn=HANDSHAKES_PER_TURN,
        )
        self.sessions: dict[bytes, DataPool] = {}
        self.controls: set[Any] = set()
        self.visitors: set[Any] = set()
        #: The relay is shutting down: no new control sessions.
        self.closing = False
        self.publicPort = 0
        #: The port the control listener is bound to, once it listens.
        self.controlPort = 0
        #: Raw TCP mode's public ports, when the relay offers the mode (C{--tcp-ports}).
        self.tcp: ILeasePorts | None = None
        #: UDP mode, when the relay offers it (C{--udp-ports}).
        self.udp: IUDPMode | None = None
        #: Multi-hop forwarding; with no allowed destination (no C{--allow-hop}) it refuses every hop.
        self.hops = HopForwarder(clock, ())
        #: Move paired connections with os.splice where possible (see L{portal.forwarding.kernelsplice}).
        self.kernelSplice = True
        #: Called after a control session changed leases (a relay cluster publishes routes on it).
        self.onLeasesChanged: Callable[[], None] = lambda: None
        #: The relay cluster this relay is a member of (C{--cluster}), or L{None}.
        self.cluster: ICluster | None = None
        #: Where ownership of lease names is decided beyond the lease table: nowhere for a relay
        #: on its own, the cluster's shared store for a member.
        self.claims: ILeaseClaims = LocalClaims()
        self._nextStream = 0
        self.counters = {
            "visitors": 0,
            "routed": 0,
            "unknown": 0,
            "refused": 0,
            "timeouts": 0,
            "kernel_spliced": 0,
            "python_spliced": 0,
            "sealed_spliced": 0,
            "waited": 0,
            "tcp_visitors": 0,
            "bytes_to_tunnels": 0,
            "bytes_to_visitors": 0,
            "admin_refused": 0,
        }
        self.startedAt = clock.seconds()
        self.metrics = RelayMetrics(clock)
        self.events = RecentEvents()
        self.metrics.watch(
            self.allCounters, self.gauges, self.limitRefusals, self.listenerConnections
        )

    def allCounters(self) -> dict[str, int]:
        """
        @return: Every counter of the relay by name: the router's, multi-hop forwarding's (prefixed
            C{hops_}) and UDP mode's.
        """
        counters = dict(self.counters)
        counters.update({f"hops_{name}": n for name, n in self.hops.counters.items()})
        if self.udp is not None:
            counters.update(self.udp.counters)
        return counters

    def limitRefusals(self) -> dict[str, int]:
        """
        @return: What the relay's limits refused, by reason (L{refusals}).
        """
        return dict(self.refusals.counts)

    def listenerConnections(self) -> dict[str, int]:
        """
        @return: Connections open on each listener (L{limiters}).
        """
        return {name: limiter.open for name, limiter in self.limiters.items()}

    def gauges(self) -> dict[str, float]:
        """
        @return: The relay's current levels by name (leases, sessions, visitors, uptime).
        """
        pools = list(self.sessions.values())
        return {
            "leases": len(self.leases),
            "live_leases": sum(1 for lease in self.leases.records() if lease.holder is not None),
            "control_sessions": len(self.sessions),
            "idle_data_sessions": sum(len(pool) for pool in pools),
            "waiting_visitors": sum(pool.waiting for pool in pools),
            "open_visitors": len(self.visitors),
            "hops_open": self.hops.openCount,
            "connections_open": self.connections.count,
            "pow_difficulty_bits": self.admission.difficulty.current(),
            "handshakes_waiting": self.handshakes.waiting,
            "handshakes_waiting_peak": self.handshakes.peakWaiting,
            "uptime_seconds": self.clock.seconds() - self.startedAt,
        }

    def limited(
        self, listener: str, factory: IProtocolFactory, reply: bytes = b""
    ) -> LimitedFactory:
        """
        Put a listener's factory under its connection caps.

        @param listener: A key of L{limiters}.
        @param factory: The listener's factory.
        @param reply: Bytes sent to a refused connection before it is closed.
        @return: The factory to listen with.
        """
        return LimitedFactory(factory, self.limiters[listener], reply)

    def _nameHeld(self, key: tuple[str, str]) -> bool:
        """
        @param key: C{(identity, name)}.
        @return: Whether the identity still owns the name (live or reserved).
        """
        identity, name = key
        return self.leases.ownerOf(name) == identity

    def _portHeld(self, key: tuple[str, str, str]) -> bool:
        """
        @param key: C{(kind, identity, name)}, kind C{"tcp"} or C{"udp"}.
        @return: Whether the lease still has a public port of that kind (live or reserved).
        """
        kind, identity, name = key
        ports = self.tcp if kind == "tcp" else (self.udp.ports if self.udp is not None else None)
        return ports is not None and ports.allocator.portFor(identity, name) is not None

    def newSessionId(self) -> bytes:
        """
        @return: A fresh random control session id.
        """
        return os.urandom(16)

    def nextStreamId(self) -> int:
        """
        @return: A new stream number, for logs.
        """
        self._nextStream += 1
        return self._nextStream

    def labelOf(self, hostname: str) -> str | None:
        """
        L{leaseLabel} of this relay's tunnel domain, remembered for the last
        L{LABELS_REMEMBERED} hostnames asked about.

        @param hostname: A normalised SNI hostname.
        @return: The lease name C{hostname} refers to, or L{None} when it names no lease.
        """
        labels = self._labels
        if hostname in labels:
            return labels[hostname]
        # Checking a hostname is a tenth of what handing a visitor to another worker costs; a
        # flood of made-up names only empties the table now and then.
        label = leaseLabel(hostname, self.tunnelDomain)
        if len(labels) >= LABELS_REMEMBERED:
            labels.clear()
        labels[hostname] = label
        return label

    def poolFor(self, hostname: str) -> DataPool | None:
        """
        Find the data pool of the tunnel serving C{hostname}.

        @param hostname: A normalised SNI hostname.
        @return: The pool, or L{None} when no live lease has that name.
        """
        label = self.labelOf(hostname)
        if label is None:
            return None
        lease = self.leases.route(label)
        if lease is None:
            return None
        holder = lease.holder
        if "stream" not in modeParts(getattr(holder, "mode", "stream")):
            # A raw TCP lease's name does not route TLS visitors: its data sessions carry raw bytes.
            return None
        return getattr(holder, "pool", None)
