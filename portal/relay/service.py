"""
The relay as a Twisted service: its state directory (locked, with the lease store), its listeners,
and a clean stop; a relay that cannot start says why in one line and is marked failed.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import (
    Deferred,
    fail,
    inlineCallbacks,
    maybeDeferred,
    succeed,
)
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.internet.ssl import CertificateOptions
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, LogPublisher, globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from portal.forwarding.boundedreads import boundAccepts, deferAccept, listenUDP, readAtAccept
from portal.forwarding.connlimit import fitToDescriptors
from portal.forwarding.heap import freezeStartupHeap
from portal.forwarding.reuseport import bindingTogether, listenReusePort, listenSharedUDP
from portal.forwarding.udpbuffers import enlargeBuffers
from portal.registry.document import RegistryError, loadRegistry
from portal.relay.cluster import DEFAULT_TTL, ClusterDirectory, Member
from portal.relay.clusterports import ClusterPorts
from portal.relay.control import ControlFactory
from portal.relay.earlyhandoff import EarlyHandoff, peekAtAccept
from portal.relay.etcd import EtcdClient, EtcdError, EtcdUnavailable, parseClusterURL
from portal.relay.handoff import HandoffReceiver, HandoffSender, handoffPath
from portal.relay.hop import MAX_HOPS_PER_IDENTITY, HopForwarder, formatDestination
from portal.relay.identitylists import IdentityListError, IdentityLists
from portal.relay.interfaces import ILeasePorts, IUDPMode
from portal.relay.leaseports import LeasePorts
from portal.relay.leases import LeaseTable
from portal.relay.memberlink import MemberLinks
from portal.relay.migration import LEASES_JSON, importJSONState
from portal.relay.ports import PortAllocator, PortRange
from portal.relay.public import PublicFactory
from portal.relay.rawtcp import handedOverFactory, tcpPorts
from portal.relay.router import RelayLimits, Router
from portal.relay.site import httpSite, relaySite
from portal.relay.sqlitestore import STORE_FILE, SQLiteLeaseStore
from portal.relay.statelock import StateDirectoryLocked, StateLock, lockStateDirectory
from portal.relay.store import ILeaseStore, StoreDamaged, StoreError, UnavailableClaims
from portal.relay.udp import MAX_PACKET_SIZE
from portal.relay.udpmode import UDPMode
from portal.relay.workers import Workers
from portal.trust.identity import loadOrCreateIdentity
from portal.trust.localca import LocalCA
from portal.wire.clienthello import INTERNAL_ERROR, alertRecord
from portal.wire.handoff import Handoff

#: Seconds between checks for open connections while a stopping relay drains.
DRAIN_POLL = 0.1

#: Installs a handler for a signal: C{installSignal(signal.SIGHUP, handler)}; the handler runs in
#: the reactor thread.
SignalInstaller = Callable[[int, Callable[[], None]], None]


def signalInstaller(reactor: Any) -> SignalInstaller:
    """
    The real signal hook for a relay process.

    @param reactor: The reactor handlers are run in.
    @return: A L{SignalInstaller} that installs a process signal handler.
    """

    def install(signum: int, handler: Callable[[], None]) -> None:
        signal.signal(signum, lambda *_: reactor.callFromThread(handler))

    return install


#: Failures that stop a relay at start with their message alone: the operator's to fix, not bugs.
START_ERRORS = (
    CannotListenError,
    StoreError,
    StateDirectoryLocked,
    RegistryError,
    EtcdError,
    EtcdUnavailable,
    OSError,
)


def defaultStateDir() -> str:
    """
    @return: C{$XDG_STATE_HOME/portal-relay}, or C{~/.local/state/portal-relay}.
    """
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state"
    )
    return os.path.join(base, "portal-relay")


@attrs.frozen
class RelayConfig:
    """
    What a relay is told on its command line.

    @ivar public: Endpoint description of the public TLS listener.
    @ivar control: Endpoint description of the control listener.
    @ivar http: Endpoint description of the plain-HTTP listener, or L{None}.
    @ivar stateDir: Where the relay keeps its identity, TLS key and leases.
    @ivar domain: The relay's own hostname.
    @ivar tunnelDomain: The domain lease names live under.
    @ivar limits: The relay's limits.
    @ivar kernelSplice: Move paired connections with C{os.splice} where the platform allows.
    @ivar tcpPorts: The public ports of raw TCP leases, or L{None} to turn raw TCP mode off.
    @ivar udpPorts: The public ports of UDP leases, or L{None} to turn UDP mode off.
    @ivar maxPortsPerIdentity: Most public ports of each kind one identity may hold at once.
    @ivar shutdownGrace: Seconds a stopping relay lets open connections finish.
    @ivar allowHops: Destinations tunnels may hop to through this relay, C{(host, port)} as written
        (C{--allow-hop}); none means the relay forwards no hops.
    @ivar allowHopRegistry: A registry (path or URL, L{portal.registry.document}) whose relays' control
        addresses are allowed hop destinations too (C{--allow-hop-registry}), read at start.
    @ivar maxHopsPerIdentity: Hops one identity may have open through this relay at once.
    @ivar cluster: C{etcd://HOST:PORT[,...]}: join the relay cluster these etcd endpoints hold
        (C{--cluster}, docs/cluster.md), or L{None} for a relay of its own.
    @ivar nodeName: This member's name in the cluster (C{--node-name}; the short identity id by
        default).
    @ivar nodeAddress: Where other members reach this member's control port, C{HOST:PORT}
        (C{--node-address}; the control listener's address by default).
    @ivar clusterTTL: Seconds this member's routes outlive it in etcd.
    @ivar workers: Member processes on this machine sharing the public and control ports
        (C{--workers}); more than one needs C{cluster}.
    @ivar workerIndex: Which worker this process is (C{--worker-index}, set by the first worker when
        it starts the others), or L{None} for the first.
    @ivar workerArgs: The C{portal-relay} command line, for the first worker to start the others.
    @ivar freezeHeap: Once listening, leave the objects of the started relay out of garbage
        collections (L{portal.forwarding.heap}); the relay's own process only, not a test's.
    @ivar newLeaseStore: Start on a new, empty lease store even though the relay has run before
        (its identity exists) and its store is missing; otherwise that stops the relay.
    @ivar inviteOnly: Only identities listed in the state directory's C{invited-identities} file may
        register (L{portal.relay.identitylists}).
    @ivar adminToken: The token that shows the operator's view of the dashboard (the per-lease table
        and recent events), or L{None} for the public view only.
    """

    public: str = "tcp:8443"
    control: str = "tcp:4017"
    http: str | None = None
    stateDir: str = attrs.field(factory=defaultStateDir)
    domain: str = "localhost"
    tunnelDomain: str = "localhost"
    limits: RelayLimits = attrs.field(factory=RelayLimits)
    kernelSplice: bool = True
    tcpPorts: PortRange | None = None
    udpPorts: PortRange | None = None
    maxPortsPerIdentity: int = 10
    shutdownGrace: float = 10.0
    allowHops: tuple[tuple[str, int], ...] = ()
    allowHopRegistry: str | None = None
    maxHopsPerIdentity: int = MAX_HOPS_PER_IDENTITY
    cluster: str | None = None
    nodeName: str | None = None
    nodeAddress: str | None = None
    clusterTTL: int = DEFAULT_TTL
    workers: int = 1
    workerIndex: int | None = None
    # The command line may hold the admin token: kept out of repr (and so out of logs).
    workerArgs: tuple[str, ...] = attrs.field(default=(), repr=False)
    inviteOnly: bool = False
    newLeaseStore: bool = False
    freezeHeap: bool = False
    adminToken: str | None = attrs.field(default=None, repr=False)


#: The listen backlog of a C{tcp:} listener whose description gives none (Twisted's default is 50;
#: nginx uses 511, HAProxy its maxconn). Connections held back by the kernel's deferred accept
#: (L{RelayLimits.deferAccept<portal.relay.router.RelayLimits>}) wait in this queue; past it, SYN
#: cookies take over and the kernel hands connections on at once.
DEFAULT_BACKLOG = 1024


def withBacklog(description: str, backlog: int = DEFAULT_BACKLOG) -> str:
    """
    @param description: A listening endpoint description.
    @return: C{description} with C{:backlog=N} added when it is a C{tcp:} or C{tcp6:} one without
        a backlog of its own; any other, unchanged.
    """
    kind = description.split(":", 1)[0]
    if kind not in ("tcp", "tcp6") or "backlog=" in description:
        return description
    return f"{description}:backlog={backlog}"


class RelayService(Service):
    """
    Starts the relay's listeners (public first, so its port can be told to tunnels) and keeps leases on
    disk so that names stay owned across a relay restart.

    @ivar router: The relay's routing state, once started.
    @ivar ports: The listening ports by listener name.
    """

    _log = Logger()
    router: Router | None = None

    def __init__(
        self,
        config: RelayConfig,
        reactor: Any,
        installSignal: SignalInstaller | None = None,
        logPublisher: LogPublisher | None = None,
    ) -> None:
        """
        @param config: The relay's configuration.
        @param reactor: The reactor.
        @param installSignal: Installs the SIGHUP handler that reloads the identity lists
            (L{signalInstaller} in a relay process); L{None} installs none.
        @param logPublisher: Where the relay's recent events (for the dashboard) are collected from;
            the global log publisher by default.
        """
        self.config = config
        self._reactor = reactor
        self._installSignal = installSignal
        self._logPublisher = logPublisher if logPublisher is not None else globalLogPublisher
        self.ports: dict[str, IListeningPort] = {}
        #: Why the relay could not start, once it failed to (twistd exits 1 then).
        self.startFailure: Failure | None = None
        self._lock: StateLock | None = None
        self._store: ILeaseStore | None = None
        self._expiry: LoopingCall | None = None
        self._listening: Failure | bool = False
        self._listeningWaiters: list[Deferred[None]] = []
        self._directory: ClusterDirectory | None = None
        self._clusterPorts: ClusterPorts | None = None
        self._clusterUDP: ClusterPorts | None = None
        self._etcd: EtcdClient | None = None
        self._clusterSync: LoopingCall | None = None
        self._workers: Workers | None = None
        self._handoffReceiver: HandoffReceiver | None = None
        self._listsDir = config.stateDir

    def whenListening(self) -> Deferred[None]:
        """
        @return: A L{Deferred} that fires when every listener is up, or fails with why one could not.
        """
        if self._listening is True:
            return succeed(None)
        if isinstance(self._listening, Failure):
            return fail(self._listening)
        d: Deferred[None] = Deferred()
        self._listeningWaiters.append(d)
        return d

    def _listened(self, result: Failure | bool) -> None:
        """
        Record the outcome of starting the listeners and tell the waiters.
        """
        self._listening = result
        waiters, self._listeningWaiters = self._listeningWaiters, []
        for d in waiters:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(None)

    def _buildRouter(self) -> tuple[Router, CertificateOptions]:
        """
        Lock the state directory, then load or create the relay's identity, lease store (importing
        the JSON files of an earlier relay once) and TLS certificate from it.

        @raise StateDirectoryLocked: If another relay holds the state directory.
        @raise StoreError: If the lease store (or a JSON file to import) is damaged or unreadable.
        """
        config = self.config
        os.makedirs(config.stateDir, mode=0o700, exist_ok=True)
        self._lock = lockStateDirectory(config.stateDir)
        # The workers of one relay (--workers) are one relay to tunnels: they share the first
        # worker's identity, each with a state directory of its own under the first one's.
        identityDir = (
            config.stateDir if config.workerIndex is None else os.path.dirname(config.stateDir)
        )
        identity, created = loadOrCreateIdentity(os.path.join(identityDir, "identity.json"))
        if created:
            self._log.info("created relay identity {id}", id=identity.id)
        limits = config.limits
        fitted = fitToDescriptors(limits.maxConnections)
        if fitted < limits.maxConnections:
            self._log.warn(
                "at most {fitted} connections open at once, not {asked}: the descriptor limit "
                "(ulimit -n) is too low for more",
                fitted=fitted,
                asked=limits.maxConnections,
            )
            limits = attrs.evolve(limits, maxConnections=fitted)
        router = Router(
            identity,
            self._reactor,
            relayDomain=config.domain,
            tunnelDomain=config.tunnelDomain,
            limits=limits,
        )
        storePath = os.path.join(config.stateDir, STORE_FILE)
        if (
            not created
            and config.workerIndex is None
            and not config.newLeaseStore
            and not os.path.exists(storePath)
            and not os.path.exists(os.path.join(config.stateDir, LEASES_JSON))
        ):
            # A relay that has run before always has its store (or, before there was one, the
            # JSON file it is imported from): starting on an empty one would give every name to
            # whoever registers it first.
            raise StoreDamaged(
                f"lease store {storePath} is missing, but this relay has run before (its "
                f"identity is in {identityDir}): if the file was moved or the disk was not "
                f"mounted, put it back; to start with no lease records (every name free to "
                f"whoever registers it first), start once with --new-lease-store"
            )
        store = self._store = SQLiteLeaseStore.open(storePath)
        router.leases = LeaseTable(
            self._reactor,
            ttl=limits.leaseTTL,
            reservation=limits.reservation,
            maxPerOwner=limits.maxLeasesPerIdentity,
            reserveAfter=limits.reserveAfter,
            store=store,
        )
        self._log.info(
            "lease store {path}: {count} lease names", path=storePath, count=len(router.leases)
        )
        # Every worker (--workers) reads the operator's lists, next to the relay's identity.
        self._listsDir = identityDir
        router.admission.lists = IdentityLists.load(identityDir, config.inviteOnly)
        self._logLists(router.admission.lists)
        router.kernelSplice = config.kernelSplice
        router.hops = HopForwarder(self._reactor, config.allowHops, config.maxHopsPerIdentity)
        if config.allowHops:
            self._log.info(
                "forwarding hops to {destinations} (at most {limit} per identity)",
                destinations=", ".join(formatDestination(*d) for d in config.allowHops),
                limit=config.maxHopsPerIdentity,
            )
        allocators = {}
        if config.tcpPorts is not None:
            allocators["tcp"] = self._allocator("tcp", config.tcpPorts, store)
            # The interface is the public listener's, known once it listens (see _start).
            # With --workers, every worker binds each port (SO_REUSEPORT; portal.relay.clusterports).
            router.tcp = tcpPorts(self._reactor, allocators["tcp"], shared=config.workers > 1)
        if config.udpPorts is not None:
            allocators["udp"] = self._allocator("udp", config.udpPorts, store)
            router.udp = UDPMode(
                self._reactor,
                allocators["udp"],
                maxFlowsPerSource=limits.maxUDPFlowsPerSource,
                refusals=router.refusals,
                # With --workers, every worker binds each port (SO_REUSEPORT), as for raw TCP.
                shared=config.workers > 1,
            )
        for migrated in importJSONState(config.stateDir, router.leases, allocators):
            self._log.info(
                "imported {count} {what} from {path} into the lease store (renamed to "
                "{path}.migrated)",
                count=migrated.count,
                what=migrated.what,
                path=migrated.path,
            )
        ca = LocalCA.loadOrCreate(os.path.join(config.stateDir, "tls"), "Portal relay")
        key, chain = ca.issue(sorted({config.domain, "localhost"}))
        options = CertificateOptions(privateKey=key, certificate=chain[0], extraCertChain=chain[1:])
        return router, options

    def _logLists(self, lists: IdentityLists) -> None:
        """
        Say which identity lists are in force.
        """
        self._log.info(
            "identity lists: {denied} denied; {mode}",
            denied=len(lists.denied),
            mode=f"invite only, {len(lists.invited)} invited" if lists.inviteOnly else "open",
        )

    def reloadLists(self) -> None:
        """
        Read the deny and invite lists again (on SIGHUP) and close the control sessions of
        identities they now refuse; a list that cannot be read leaves the previous ones in force.
        The first of several workers (C{--workers}) passes the signal on to the others.
        """
        if self._workers is not None:
            self._workers.signal("HUP")
        router = self.router
        if router is None:
            return
        try:
            lists = IdentityLists.load(self._listsDir, self.config.inviteOnly)
        except IdentityListError as e:
            self._log.error(
                "identity lists not reloaded, the previous ones stay in force: {error}",
                error=str(e),
            )
            return
        router.admission.lists = lists
        self._logLists(lists)
        for protocol in list(router.controls):
            owner: str | None = getattr(protocol, "owner", None)
            refusal = lists.refusal(owner) if owner is not None else None
            if owner is not None and refusal is not None:
                self._log.info(
                    "closing the control session of {identity}: {reason}",
                    identity=owner[:12],
                    reason=refusal[0],
                )
                protocol.transport.abortConnection()

    def _leasePorts(self) -> dict[str, ILeasePorts]:
        """
        @return: The relay's lease ports by kind, for the modes it offers.
        """
        router = self.router
        found: dict[str, ILeasePorts] = {}
        if router is not None and router.tcp is not None:
            found["tcp"] = router.tcp
        if router is not None and router.udp is not None:
            found["udp"] = router.udp.ports
        return found

    def _allocator(self, kind: str, portRange: PortRange, store: ILeaseStore) -> PortAllocator:
        """
        The port allocator of C{kind} (C{"tcp"} or C{"udp"}) on the store, with the assignments
        saved before a restart coming back as reservations (so reconnecting tunnels get their
        ports again).
        """
        limits = self.config.limits
        allocator = PortAllocator(
            portRange,
            self._reactor,
            reservation=limits.reservation,
            maxPerIdentity=self.config.maxPortsPerIdentity,
            reserveAfter=limits.reserveAfter,
            # A tunnel that reconnects within a lease's lifetime always gets its port back.
            grace=limits.leaseTTL,
            store=store,
            kind=kind,
        )
        self._log.info(
            "{kind} ports {range}: {count} reserved from the lease store",
            kind=kind,
            range=str(portRange),
            count=allocator.reserved,
        )
        return allocator

    def startService(self) -> None:
        """
        Start listening.
        """
        super().startService()
        self._start().addErrback(self._startFailed)

    @inlineCallbacks
    def _start(self) -> Any:
        """
        Listen on the public port, then the control port, then the HTTP port.
        """
        router, tlsOptions = self._buildRouter()
        self.router = router
        if self.config.cluster is not None:
            # Until this member has joined, it cannot tell who owns a name.
            router.claims = UnavailableClaims("cluster store unavailable: the relay is starting")
        if self._installSignal is not None:
            self._installSignal(signal.SIGHUP, self.reloadLists)
        self._logPublisher.addObserver(router.events)
        config = self.config
        if config.allowHopRegistry is not None:
            registry = yield loadRegistry(self._reactor, config.allowHopRegistry)
            added = {(entry.host, entry.port) for entry in registry.relays}
            router.hops.allowed = router.hops.allowed | added
            self._log.info(
                "forwarding hops to the {count} relays of {source} too",
                count=len(added),
                source=registry.source,
            )
        site = TLSMemoryBIOFactory(
            tlsOptions, False, relaySite(router, config.adminToken), clock=self._reactor
        )
        publicFactory = router.limited(
            "public", PublicFactory(router, site), alertRecord(INTERNAL_ERROR)
        )
        public = yield self._listen(config.public, publicFactory)
        self.ports["public"] = public
        router.publicPort = public.getHost().port
        for kind, leasePorts in self._leasePorts().items():
            # Lease ports are bound where the public listener is (all interfaces, or the one given).
            leasePorts.interface = getattr(public.getHost(), "host", "")
            self._log.info(
                "{kind} mode on: ports {range} on {interface}",
                kind=kind,
                range=str(leasePorts.allocator.portRange),
                interface=leasePorts.interface or "*",
            )
        self._announce("public", public)
        if config.cluster is not None:
            # Visitors the kernel hands this member before it knows the cluster's routes (a
            # worker restarted beside others on a shared port) wait in the listen queue.
            getattr(public, "stopReading", lambda: None)()
        together: AbstractContextManager[None] = nullcontext()
        if config.workers > 1:
            # The control listener and the tunnel-facing UDP socket must take the same position
            # in their groups, for the steering program to send a tunnel's datagrams where its
            # control session is: no other worker binds in between.
            together = bindingTogether(os.path.join(self._rootStateDir(), "bind.lock"))
        with together:
            control = yield self._listen(
                config.control,
                router.limited("control", ControlFactory(router, tlsOptions)),
                steer=True,
            )
            if router.udp is not None:
                self._listenTunnelSide(router.udp, control)
        self.ports["control"] = control
        router.controlPort = getattr(control.getHost(), "port", 0)
        self._announce("control", control)
        if router.udp is not None:
            self._announce("udp-tunnels", self.ports["udp-tunnels"])
        memberPort = control
        if config.workers > 1:
            # Other members must reach this very process: the shared control port would steer
            # their links to whichever worker their address picks.
            host = getattr(control.getHost(), "host", "") or "127.0.0.1"
            if host in ("0.0.0.0", "::"):
                host = "127.0.0.1"
            memberPort = (
                yield serverFromString(self._reactor, withBacklog(f"tcp:0:interface={host}"))
                .listen(router.limited("control", ControlFactory(router, tlsOptions)))
                .addCallback(self._clientFirst)
            )
            self.ports["member"] = memberPort
            self._announce("member", memberPort)
        if config.cluster is not None:
            yield self._joinCluster(router, memberPort)
            if config.workers > 1:
                self._startHandoff(router, publicFactory)
            getattr(public, "startReading", lambda: None)()
        if config.http:
            http = (
                yield serverFromString(self._reactor, withBacklog(config.http))
                .listen(router.limited("http", httpSite(router)))
                .addCallback(self._clientFirst)
            )
            self.ports["http"] = http
            self._announce("http", http)
        self._expiry = LoopingCall(self._expire)
        self._expiry.clock = self._reactor
        self._expiry.start(60.0, now=False)
        self._log.info(
            "portal-relay {id} serving {domain}; leases under {tunnelDomain}",
            id=router.identity.id,
            domain=router.relayDomain,
            tunnelDomain=router.tunnelDomain,
        )
        if config.workers > 1 and config.workerIndex is None:
            self._startWorkers(public, control)
        if config.freezeHeap:
            frozen = freezeStartupHeap()
            self._log.debug("{count} objects of the started relay left out of GC", count=frozen)
        self._listened(True)

    def _rootStateDir(self) -> str:
        """
        @return: The first worker's state directory (this one's, without C{--workers}).
        """
        config = self.config
        return config.stateDir if config.workerIndex is None else os.path.dirname(config.stateDir)

    def _listenTunnelSide(self, mode: IUDPMode, control: IListeningPort) -> None:
        """
        Listen for tunnels' sealed datagrams on the control port's number, over UDP; with
        C{--workers}, on a socket the workers share, steered by source address like the control
        port, so that a tunnel's datagrams reach the worker holding its control session.
        """
        address = control.getHost()
        port = getattr(address, "port", 0)
        interface = getattr(address, "host", "")
        workers = self.config.workers
        if workers > 1:
            tunnelSide = listenSharedUDP(
                self._reactor,
                port,
                mode.tunnelSide,
                interface=interface,
                maxPacketSize=MAX_PACKET_SIZE,
                steerWorkers=workers,
                coalesced=True,
            )
        else:
            tunnelSide = listenUDP(
                self._reactor,
                port,
                mode.tunnelSide,
                interface=interface,
                maxPacketSize=MAX_PACKET_SIZE,
                coalesced=True,
            )
        enlargeBuffers(tunnelSide)
        self.ports["udp-tunnels"] = tunnelSide

    def _clientFirst(self, port: Any) -> Any:
        """
        Prepare a listener whose clients speak first (public, control, HTTP, member): bounded
        accept batches and the kernel's deferred accept (L{RelayLimits.deferAccept
        <portal.relay.router.RelayLimits>}), with each connection read right after its accept.

        @return: C{port}.
        """
        boundAccepts(port)
        assert self.router is not None
        if deferAccept(port, self.router.limits.deferAccept):
            # The first bytes are in when a connection is handed over: read them at once.
            readAtAccept(port)
        return port

    def _listen(self, description: str, factory: Any, steer: bool = False) -> Deferred[Any]:
        """
        Listen on an endpoint description; with C{--workers}, on a port the workers share
        (connections to the control port steered by source address, so that a tunnel's control
        and data sessions reach the same worker).
        """
        workers = self.config.workers
        if workers > 1:
            return maybeDeferred(
                listenReusePort,
                self._reactor,
                withBacklog(description),
                factory,
                workers if steer else None,
            ).addCallback(self._clientFirst)
        listening: Deferred[Any] = serverFromString(self._reactor, withBacklog(description)).listen(
            factory
        )
        return listening.addCallback(self._clientFirst)

    def _startHandoff(self, router: Router, publicFactory: IProtocolFactory) -> None:
        """
        With C{--workers}: receive visitors the other workers hand over by their socket, and hand
        them this worker's visitors of leases live on another worker (L{portal.relay.handoff}):
        TLS visitors of the public port, and visitors of raw TCP lease ports.
        """
        config = self.config
        index = config.workerIndex or 0
        root = self._rootStateDir()
        tcp = router.tcp

        def portFactory(port: int) -> IProtocolFactory | None:
            return handedOverFactory(tcp, port) if isinstance(tcp, LeasePorts) else None

        def adopted(handoff: Handoff) -> None:
            counter = "adopted" if handoff.tcpPort is None else "tcp_adopted"
            router.counters[counter] = router.counters.get(counter, 0) + 1

        receiver = HandoffReceiver(
            self._reactor,
            handoffPath(root, index),
            publicFactory,
            onAdopted=adopted,
            portFactory=portFactory,
            refusals=router.refusals,
        )
        receiver.start()
        self._handoffReceiver = receiver
        links = router.cluster
        assert isinstance(links, MemberLinks)
        links.handoff = HandoffSender(root, router.identity.id, index)
        # Visitors of leases on another worker leave as they are accepted, from their ClientHello
        # peeked at in the socket, before this worker builds anything for them.
        peekAtAccept(self.ports["public"], EarlyHandoff(router, links))

    def _startWorkers(self, public: IListeningPort, control: IListeningPort) -> None:
        """
        Start the other workers: the same command line, on the ports this worker bound, each with
        a state directory of its own under this one's.
        """
        config = self.config
        commands: dict[int, Sequence[str]] = {
            index: workerCommand(
                config.workerArgs,
                index,
                public=_sameAddress(config.public, public),
                control=_sameAddress(config.control, control),
                stateDir=os.path.join(config.stateDir, f"worker-{index}"),
            )
            for index in range(1, config.workers)
        }
        self._workers = Workers(self._reactor, commands)
        self._workers.start()

    @inlineCallbacks
    def _joinCluster(self, router: Router, control: IListeningPort) -> Any:
        """
        Join the relay cluster: publish this member in etcd, follow the directory, and forward
        visitors of leases other members hold.
        """
        config = self.config
        assert config.cluster is not None
        address = control.getHost()
        nodeAddress = (config.nodeAddress if config.workers == 1 else None) or (
            f"{getattr(address, 'host', '127.0.0.1')}:{getattr(address, 'port', 0)}"
        )
        identity = router.identity
        nodeName = config.nodeName or identity.shortId
        if config.workers > 1:
            nodeName = f"{nodeName}-w{config.workerIndex or 0}"
        memberId = identity.id
        if config.workers > 1:
            memberId = f"{identity.id}-w{config.workerIndex or 0}"
        me = Member(memberId, identity.publicKey, nodeAddress, nodeName)
        client = EtcdClient(parseClusterURL(config.cluster), self._reactor)
        directory = ClusterDirectory(
            client, self._reactor, router.tunnelDomain, me, ttl=config.clusterTTL
        )
        yield directory.start()
        self._directory = directory
        self._etcd = client
        links = MemberLinks(router, directory, identity, self._reactor)
        router.cluster = links
        router.claims = links
        # The quotas per source, and the names per identity, count what each source (identity)
        # holds on every member.
        router.admission.names.shared = directory.nameQuota
        router.admission.ports.shared = directory.portQuota
        router.leases.shared = directory.ownerNames
        notifyBefore = router.onLeasesChanged

        def changed() -> None:
            notifyBefore()
            links.sync()

        router.onLeasesChanged = changed
        if isinstance(router.tcp, LeasePorts):
            # Raw TCP ports are given out cluster-wide, and every member listens on all of them.
            self._clusterPorts = ClusterPorts(
                links, router.tcp, self._reactor, shared=config.workers > 1
            )
            self._clusterPorts.install()
        if router.udp is not None and isinstance(router.udp.ports, LeasePorts):
            # UDP ports too; their datagrams go to the holding member over UDP member links.
            self._clusterUDP = ClusterPorts(
                links, router.udp.ports, self._reactor, shared=config.workers > 1
            )
            self._clusterUDP.install()
        # Leases also end by lapsing; a sync now and then publishes that.
        self._clusterSync = LoopingCall(self._syncCluster, links)
        self._clusterSync.clock = self._reactor
        self._clusterSync.start(1.0, now=False)
        self._log.info(
            "joined relay cluster {cluster} as {node} ({address}); {count} members",
            cluster=config.cluster,
            node=me.nodeName,
            address=nodeAddress,
            count=len(directory.members()),
        )

    def _syncCluster(self, links: MemberLinks) -> None:
        """
        Publish this member's live leases; listen again on cluster ports a listener could not bind.
        """
        links.sync()
        for clusterPorts in (self._clusterPorts, self._clusterUDP):
            if clusterPorts is not None:
                clusterPorts.reconcile()

    def _announce(self, name: str, port: IListeningPort) -> None:
        """
        Log where a listener is, in a form tests and operators can read.
        """
        address = port.getHost()
        self._log.info(
            "portal-relay {listener} listening on {host}:{port}",
            listener=name,
            host=getattr(address, "host", ""),
            port=getattr(address, "port", 0),
        )

    def _expire(self) -> None:
        """
        Forget names whose reservation has run out; close the ports of lapsed raw TCP leases.
        """
        if self.router is None:
            return
        self.router.leases.expire()
        for ports in self._leasePorts().values():
            ports.sweep()
        self.router.admission.sweep()

    def _startFailed(self, failure: Failure) -> None:
        """
        The relay could not start: say why in one line (a traceback only for what looks like a
        bug), mark the service failed and stop, since a relay without its listeners or its state
        is useless.
        """
        if failure.check(*START_ERRORS):
            self._log.critical("portal-relay cannot start: {reason}", reason=str(failure.value))
        else:
            self._log.failure("portal-relay could not start", failure)
        self.startFailure = failure
        self._listened(failure)
        # twistd starts services before the reactor runs: stop as soon as it does.
        if self._reactor.running:
            self._reactor.stop()
        else:
            self._reactor.callWhenRunning(self._reactor.stop)

    @inlineCallbacks
    def stopService(self) -> Any:
        """
        Shut down gracefully: stop accepting visitors and new tunnels, tell the tunnels (L{GoingAway}),
        let open connections finish for up to L{RelayConfig.shutdownGrace} seconds, close what is
        left, then close the lease store (every change is in it already) and unlock the state
        directory.
        """
        super().stopService()
        if self._expiry is not None and self._expiry.running:
            self._expiry.stop()
        router = self.router
        if router is not None:
            # The control port stays open while draining, for the data sessions of visitors who
            # are already in; new control sessions are refused (see RelayControlProtocol.hello).
            router.closing = True
        for name in ("public", "http"):
            port = self.ports.pop(name, None)
            if port is not None:
                yield port.stopListening()
        for leasePorts in self._leasePorts().values():
            yield leasePorts.stopAccepting()
        for clusterPorts in (self._clusterPorts, self._clusterUDP):
            if clusterPorts is not None:
                yield clusterPorts.stop()
        if router is not None and self.startFailure is None:
            yield self._drain(router, self.config.shutdownGrace)
        for leasePorts in self._leasePorts().values():
            yield leasePorts.closeAll()
        for port in self.ports.values():
            yield port.stopListening()
        self.ports.clear()
        if router is not None:
            for protocol in list(router.controls):
                protocol.transport.loseConnection()
        if self._handoffReceiver is not None:
            self._handoffReceiver.stop()
            self._handoffReceiver = None
        if self._workers is not None:
            yield self._workers.stop()
        if self._clusterSync is not None and self._clusterSync.running:
            self._clusterSync.stop()
        if self._directory is not None:
            yield self._directory.stop()
        if self._etcd is not None:
            yield self._etcd.close()
        if self._store is not None:
            self._store.close()
            self._store = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        if router is not None:
            self._logPublisher.removeObserver(router.events)

    def _drain(self, router: Router, grace: float) -> Deferred[None]:
        """
        Tell every tunnel that this relay is going away, then wait until no visitor connection is
        open, or C{grace} seconds, whichever comes first; close the visitors left then.

        @return: A L{Deferred} that fires when the relay may close the rest.
        """
        self._log.info(
            "portal-relay shutting down: accepting nothing new; {visitors} open connections get "
            "up to {grace:.0f} s to finish",
            visitors=len(router.visitors),
            grace=grace,
        )
        for protocol in list(router.controls):
            protocol.goingAway(grace)
        drained: Deferred[None] = Deferred()
        deadline = self._reactor.seconds() + grace

        def check() -> None:
            if router.visitors and self._reactor.seconds() < deadline:
                return
            if router.visitors:
                self._log.info(
                    "closing {visitors} connections still open after {grace:.0f} s",
                    visitors=len(router.visitors),
                    grace=grace,
                )
                for visitor in list(router.visitors):
                    visitor.transport.abortConnection()
            poll.stop()
            drained.callback(None)

        poll = LoopingCall(check)
        poll.clock = self._reactor
        poll.start(DRAIN_POLL, now=True)
        return drained


def _sameAddress(description: str, port: IListeningPort) -> str:
    """
    @return: C{description} with the port number the listener got (for C{tcp:0}).
    """
    parts = description.split(":")
    parts[1] = str(getattr(port.getHost(), "port", parts[1]))
    return ":".join(parts)


def workerCommand(
    args: tuple[str, ...],
    index: int,
    public: str,
    control: str,
    stateDir: str,
    parent: int | None = None,
) -> list[str]:
    """
    The command line of worker C{index}: C{twistd -n portal-relay} with the first worker's
    options, its listeners' actual ports, its own state directory and C{--worker-index}, which
    ends when the first worker does (L{portal.relay.workers.dieWithParent}).

    @param args: The first worker's C{portal-relay} options.
    @param parent: The first worker's process id (default: this process's).
    @return: The argv.
    """
    replaced = {"--public": public, "--control": control, "--state-dir": stateDir}
    out: list[str] = []
    skip = False
    for i, arg in enumerate(args):
        if skip:
            skip = False
            continue
        name, eq, _ = arg.partition("=")
        if name in replaced or name == "--worker-index":
            if not eq and i + 1 < len(args):
                skip = True
            continue
        out.append(arg)
    for name, value in replaced.items():
        out += [name, value]
    parent = os.getpid() if parent is None else parent
    return [
        sys.executable,
        "-c",
        f"from portal.relay.workers import dieWithParent; dieWithParent({parent:d}); "
        "from twisted.scripts.twistd import run; run()",
        "-n",
        "--pidfile=",
        "portal-relay",
        *out,
        "--worker-index",
        str(index),
    ]
