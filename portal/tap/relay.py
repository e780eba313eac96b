"""
C{twistd portal-relay}: command-line options and service construction for the relay.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import attrs
from twisted.internet.endpoints import serverFromString
from twisted.python import usage

from portal.forwarding import leanpoll
from portal.forwarding.reuseport import ReusePortError, parseTCPDescription
from portal.relay.admission import (
    COMMANDS,
    AdmissionLimits,
    CommandRates,
    RateError,
    parseRate,
)
from portal.relay.difficulty import DifficultyPolicy
from portal.relay.etcd import parseClusterURL
from portal.relay.hop import MAX_HOPS_PER_IDENTITY, HopDestinationError, parseDestination
from portal.relay.ports import PortRangeError, parsePortRange
from portal.relay.router import RelayLimits
from portal.relay.service import RelayConfig, RelayService, defaultStateDir, signalInstaller
from portal.trust.relayaddress import ConfigError, parseHostPort
from portal.tunnel.control import MAX_WORK

_ADMISSION = AdmissionLimits()
_LIMITS = RelayLimits()
_DIFFICULTY = DifficultyPolicy()


def _positive(kind: type) -> Any:
    """
    A coercer for a positive number option.
    """

    def coerce(value: str) -> Any:
        try:
            number = kind(value)
        except ValueError:
            raise usage.UsageError(f"{value!r} is not a number")
        if number <= 0:
            raise usage.UsageError(f"{value!r} must be positive")
        return number

    coerce.coerceDoc = "Must be positive."  # type: ignore[attr-defined]
    return coerce


def _nonNegative(kind: type) -> Any:
    """
    A coercer for a finite number option that may be 0.
    """

    def coerce(value: str) -> Any:
        try:
            number = kind(value)
        except ValueError:
            raise usage.UsageError(f"{value!r} is not a number")
        if not 0 <= number < float("inf"):
            raise usage.UsageError(f"{value!r} must be 0 or more")
        return number

    coerce.coerceDoc = "Must be 0 or more."  # type: ignore[attr-defined]
    return coerce


_SUFFIXES = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}


def _bandwidth(value: str) -> float:
    """
    Parse a bandwidth: bytes per second, with an optional K, M or G suffix (powers of 1024, like
    frp's C{bandwidthLimit}), C{B} and C{/s} allowed after it; 0 means no cap.

    @param value: The option's text, such as C{1M}, C{512KB/s} or C{250000}.
    @return: Bytes per second.
    @raise usage.UsageError: If it is not a non-negative number with a known suffix.
    """
    text = value.strip().upper().removesuffix("/S").removesuffix("B")
    suffix = text[-1:] if text[-1:] in _SUFFIXES else ""
    number = text[: len(text) - len(suffix)]
    try:
        rate = float(number) * _SUFFIXES[suffix]
    except ValueError:
        raise usage.UsageError(f"{value!r} is not a bandwidth (bytes per second, like 1M)")
    if not rate >= 0 or rate == float("inf"):
        raise usage.UsageError(f"{value!r} must be a finite bandwidth of 0 or more")
    return rate


_bandwidth.coerceDoc = "Bytes per second, K/M/G suffixes allowed; 0 for no cap."  # type: ignore[attr-defined]


class Options(usage.Options):
    """
    Options of C{twistd portal-relay}.
    """

    synopsis = "[options]"
    longdesc = (
        "Run a Portal relay: route visitors' TLS by SNI to the tunnels holding leases, without "
        "decrypting it."
    )
    optParameters = [
        ["domain", None, "localhost", "The relay's own hostname (dashboard, API, metrics)."],
        ["tunnel-domain", None, "localhost", "Lease hostnames are <label>.<tunnel-domain>."],
        ["public", None, "tcp:8443", "Endpoint of the public TLS listener."],
        ["control", None, "tcp:4017", "Endpoint of the control listener tunnels connect to."],
        ["http", None, None, "Endpoint of the plain-HTTP listener (off unless given)."],
        ["state-dir", None, None, "Directory for the relay's identity, TLS key and leases."],
        [
            "admin-token",
            None,
            None,
            "A secret that shows the operator's view of the dashboard (per-lease table, recent "
            "events) to requests bearing it; see also --admin-token-file.",
        ],
        [
            "tcp-ports",
            None,
            None,
            "Port range LO-HI for raw TCP leases (raw TCP mode is off without it).",
        ],
        ["udp-ports", None, None, "Port range LO-HI for UDP leases (UDP mode is off without it)."],
        [
            "cluster",
            None,
            None,
            "Join a relay cluster: etcd://HOST:PORT[,HOST:PORT...] (docs/cluster.md).",
        ],
        [
            "workers",
            None,
            1,
            "Member processes sharing the public and control ports (SO_REUSEPORT); more than one "
            "needs --cluster.",
            _positive(int),
        ],
        ["worker-index", None, None, "Set by the first worker on the others; not for users.", int],
        [
            "cluster-ttl",
            None,
            10,
            "Seconds a dead member's routes outlive it in the cluster.",
            _positive(int),
        ],
        [
            "node-name",
            None,
            None,
            "This member's name in the cluster (default: the short relay id).",
        ],
        [
            "node-address",
            None,
            None,
            "HOST:PORT where other members reach this member's control port (default: the control listener's address).",
        ],
        ["lease-ttl", None, 60.0, "Seconds a lease lives without renewal.", _positive(float)],
        [
            "reservation",
            None,
            3600.0,
            "Seconds a lapsed lease name stays reserved for its owner.",
            _positive(float),
        ],
        [
            "reserve-after",
            None,
            600.0,
            "Seconds a lease name (or public port) must be held before it is reserved for its "
            "owner after it lapses; one dropped sooner is free at once.",
            _positive(float),
        ],
        [
            "max-leases-per-identity",
            None,
            100,
            "Lease names one identity may hold.",
            _positive(int),
        ],
        [
            "data-wait-timeout",
            None,
            10.0,
            "Seconds a visitor waits for a tunnel data session.",
            _positive(float),
        ],
        ["max-idle-data", None, 64, "Idle data sessions kept per tunnel.", _positive(int)],
        [
            "control-idle-timeout",
            None,
            60.0,
            "Seconds a tunnel's control session may stay silent before it is closed (tunnels "
            "send heartbeats every 10 s).",
            _positive(float),
        ],
        [
            "shutdown-grace",
            None,
            10.0,
            "Seconds a stopping relay (SIGTERM) lets open connections finish.",
            _positive(float),
        ],
        [
            "max-ports-per-identity",
            None,
            10,
            "Public TCP/UDP ports one identity may hold at once.",
            _positive(int),
        ],
        [
            "max-hops-per-identity",
            None,
            MAX_HOPS_PER_IDENTITY,
            "Hops one identity may have open through this relay at once.",
            _positive(int),
        ],
        [
            "max-connections",
            None,
            16384,
            "Connections open at once on all listeners together (lowered to fit the descriptor "
            "limit).",
            _positive(int),
        ],
        [
            "max-connections-per-source",
            None,
            256,
            "Connections open at once from one source address (IPv4, or IPv6 /64) on each visitor "
            "listener (public, HTTP, raw TCP ports).",
            _positive(int),
        ],
        [
            "max-control-connections-per-source",
            None,
            256,
            "Connections open at once from one source address on the control port that have not "
            "proved who they are (attached data sessions and registered tunnels do not count).",
            _positive(int),
        ],
        [
            "site-header-timeout",
            None,
            10.0,
            "Seconds a connection to the relay's own pages has to send complete request headers "
            "(TLS handshake included).",
            _positive(float),
        ],
        [
            "defer-accept",
            None,
            5.0,
            "Seconds the kernel holds a new connection to the public, control and HTTP listeners "
            "until its first byte before the relay accepts it (TCP_DEFER_ACCEPT); 0 for none.",
            _nonNegative(float),
        ],
        [
            "handshake-rate",
            None,
            str(_LIMITS.handshakeRate),
            "TLS handshakes a second the relay starts on its control port, PER_SECOND/BURST (token "
            "bucket); more wait their turn, source address by source address.",
        ],
        [
            "handshake-queue",
            None,
            _LIMITS.handshakeQueue,
            "Control-port connections that may wait for their TLS handshake at once; more are "
            "refused before the handshake.",
            _positive(int),
        ],
        [
            "tcp-visitor-rate",
            None,
            str(_LIMITS.tcpVisitorRate),
            "New visitors a second from one source address that a raw TCP lease port passes to "
            "its tunnel, PER_SECOND/BURST (token bucket); the source's next ones wait their turn.",
        ],
        [
            "tcp-visitor-queue",
            None,
            _LIMITS.tcpVisitorQueue,
            "Visitors from one source address that may wait for their turn on a raw TCP lease "
            "port; more are refused.",
            _positive(int),
        ],
        [
            "site-idle-timeout",
            None,
            30.0,
            "Seconds a connection to the relay's own pages may stay silent.",
            _positive(float),
        ],
        [
            "max-udp-flows-per-source",
            None,
            64,
            "UDP flows (visitor ports) one source address may have on a lease's UDP port.",
            _positive(int),
        ],
        [
            "stream-idle-timeout",
            None,
            3600.0,
            "Seconds a spliced stream may move no byte either way before it is closed.",
            _positive(float),
        ],
        [
            "bandwidth-per-lease",
            None,
            0.0,
            "Bytes per second one lease name's streams may move, both directions together "
            "(K, M, G suffixes: powers of 1024; 0: no cap).",
            _bandwidth,
        ],
        [
            "bandwidth-per-identity",
            None,
            0.0,
            "Bytes per second all streams of one identity's leases may move (0: no cap).",
            _bandwidth,
        ],
        [
            "bandwidth-per-source",
            None,
            0.0,
            "Bytes per second all streams of one visitor source address may move (0: no cap).",
            _bandwidth,
        ],
        [
            "admin-token-file",
            None,
            None,
            "A file holding the admin token (its first line), instead of --admin-token.",
        ],
        [
            "allow-hop-registry",
            None,
            None,
            "Also forward hops to every relay of this registry (a path or http(s) URL, read at "
            "start).",
        ],
        *[
            [
                f"{command}-rate{suffix}",
                None,
                str(rates.of(command)),
                f"{command.capitalize()} requests {scope}, PER_SECOND/BURST (token bucket).",
            ]
            for suffix, scope, rates in (
                ("", "per source address (IPv4 /32, IPv6 /64)", _ADMISSION.perSource),
                ("-total", "over all sources", _ADMISSION.total),
            )
            for command in COMMANDS
        ],
        [
            "max-names-per-source",
            None,
            _ADMISSION.maxNamesPerSource,
            "Lease names (live or reserved) one source address may hold.",
            _positive(int),
        ],
        [
            "max-ports-per-source",
            None,
            _ADMISSION.maxPortsPerSource,
            "Public TCP/UDP ports (live or reserved) one source address may hold.",
            _positive(int),
        ],
        [
            "pow-quiet-rate",
            None,
            _DIFFICULTY.quietRate,
            "Registrations a second (whole relay) below which no proof of work is asked.",
            _positive(float),
        ],
        [
            "pow-max-bits",
            None,
            _DIFFICULTY.maxBits,
            f"Most proof-of-work bits a registration is asked for under load (0 turns it off; at "
            f"most {MAX_WORK}).",
            int,
        ],
    ]
    optFlags: list[list[str | None]] = [
        [
            "no-kernel-splice",
            None,
            "Forward in Python (producer/consumer) instead of with os.splice.",
        ],
        [
            "new-lease-store",
            None,
            "Start with an empty lease store although this relay has run before and its store "
            "is missing (otherwise the relay refuses to start, so that no name changes owner).",
        ],
        [
            "invite-only",
            None,
            "Only identities listed in STATE_DIR/invited-identities may register (reread on "
            "SIGHUP, like STATE_DIR/denied-identities).",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["allow-hop"] = []

    def opt_allow_hop(self, destination: str) -> None:
        """
        Forward tunnels' hops to DESTINATION, HOST:PORT as tunnels write it (usually another relay's
        control port; repeatable). Without it the relay forwards no hops.
        """
        try:
            self["allow-hop"].append(parseDestination(destination))
        except HopDestinationError as e:
            raise usage.UsageError(str(e))

    def parseOptions(self, options: Any = None) -> None:
        """
        Keep the command line, for the first worker to start the others with it.
        """
        import sys

        self.rawArgs = tuple(sys.argv[1:] if options is None else options)
        super().parseOptions(options)

    def postOptions(self) -> None:
        """
        Check the port ranges, rates and endpoint descriptions; read the admin token file.
        """
        if self["workers"] > 1:
            if self["cluster"] is None:
                raise usage.UsageError(
                    "--workers needs --cluster etcd://HOST:PORT: the workers coordinate through etcd"
                )
            for name in ("public", "control"):
                try:
                    parseTCPDescription(self[name])
                except ReusePortError as e:
                    raise usage.UsageError(f"--{name} {e}")
        for option in ("handshake-rate", "tcp-visitor-rate"):
            try:
                self[f"{option}-parsed"] = parseRate(self[option], f"--{option}")
            except RateError as e:
                raise usage.UsageError(str(e))
        for scope in ("", "-total"):
            for command in COMMANDS:
                option = f"{command}-rate{scope}"
                try:
                    self[f"{option}-parsed"] = parseRate(self[option], f"--{option}")
                except RateError as e:
                    raise usage.UsageError(str(e))
        if not 0 <= self["pow-max-bits"] <= MAX_WORK:
            raise usage.UsageError(
                f"--pow-max-bits {self['pow-max-bits']}: must be 0 to {MAX_WORK} (tunnels spend "
                f"at most {MAX_WORK} bits)"
            )
        self["admin"] = readAdminToken(self["admin-token"], self["admin-token-file"])
        for kind in ("tcp", "udp"):
            self[f"{kind}-range"] = None
            if self[f"{kind}-ports"] is not None:
                try:
                    self[f"{kind}-range"] = parsePortRange(self[f"{kind}-ports"], f"--{kind}-ports")
                except PortRangeError as e:
                    raise usage.UsageError(str(e))
        if self["cluster"] is not None:
            try:
                parseClusterURL(self["cluster"])
            except ValueError as e:
                raise usage.UsageError(str(e))
        if self["node-address"] is not None:
            try:
                parseHostPort(self["node-address"], "--node-address")
            except ConfigError as e:
                raise usage.UsageError(str(e))
        for name in ("public", "control", "http"):
            if self[name] is None:
                continue
            try:
                # Parsing only: the endpoint is built again, with the reactor, at start.
                serverFromString(None, self[name])
            except (ValueError, KeyError, TypeError) as e:
                raise usage.UsageError(
                    f"--{name} {self[name]!r} is not an endpoint description: {e}"
                )

    def config(self) -> RelayConfig:
        """
        @return: The relay configuration these options describe.
        """
        return RelayConfig(
            public=self["public"],
            control=self["control"],
            http=self["http"],
            stateDir=self["state-dir"] or defaultStateDir(),
            domain=self["domain"],
            tunnelDomain=self["tunnel-domain"],
            kernelSplice=not self["no-kernel-splice"],
            tcpPorts=self["tcp-range"],
            udpPorts=self["udp-range"],
            maxPortsPerIdentity=self["max-ports-per-identity"],
            shutdownGrace=self["shutdown-grace"],
            allowHops=tuple(dict.fromkeys(self["allow-hop"])),
            allowHopRegistry=self["allow-hop-registry"],
            maxHopsPerIdentity=self["max-hops-per-identity"],
            cluster=self["cluster"],
            nodeName=self["node-name"],
            nodeAddress=self["node-address"],
            clusterTTL=self["cluster-ttl"],
            workers=self["workers"],
            workerIndex=self["worker-index"],
            workerArgs=getattr(self, "rawArgs", ()),
            adminToken=self["admin"],
            limits=RelayLimits(
                leaseTTL=self["lease-ttl"],
                reservation=self["reservation"],
                reserveAfter=self["reserve-after"],
                maxLeasesPerIdentity=self["max-leases-per-identity"],
                dataWaitTimeout=self["data-wait-timeout"],
                maxIdleData=self["max-idle-data"],
                controlIdleTimeout=self["control-idle-timeout"],
                maxConnections=self["max-connections"],
                maxConnectionsPerSource=self["max-connections-per-source"],
                maxControlConnectionsPerSource=self["max-control-connections-per-source"],
                siteHeaderTimeout=self["site-header-timeout"],
                siteIdleTimeout=self["site-idle-timeout"],
                deferAccept=self["defer-accept"],
                handshakeRate=self["handshake-rate-parsed"],
                handshakeQueue=self["handshake-queue"],
                tcpVisitorRate=self["tcp-visitor-rate-parsed"],
                tcpVisitorQueue=self["tcp-visitor-queue"],
                maxUDPFlowsPerSource=self["max-udp-flows-per-source"],
                streamIdleTimeout=self["stream-idle-timeout"],
                bandwidthPerLease=self["bandwidth-per-lease"],
                bandwidthPerIdentity=self["bandwidth-per-identity"],
                bandwidthPerSource=self["bandwidth-per-source"],
                admission=AdmissionLimits(
                    perSource=CommandRates(*(self[f"{c}-rate-parsed"] for c in COMMANDS)),
                    total=CommandRates(*(self[f"{c}-rate-total-parsed"] for c in COMMANDS)),
                    maxNamesPerSource=self["max-names-per-source"],
                    maxPortsPerSource=self["max-ports-per-source"],
                    difficulty=DifficultyPolicy(
                        quietRate=self["pow-quiet-rate"],
                        baseBits=min(_DIFFICULTY.baseBits, self["pow-max-bits"]),
                        maxBits=self["pow-max-bits"],
                    ),
                ),
            ),
            inviteOnly=self["invite-only"],
            newLeaseStore=bool(self["new-lease-store"]),
        )


def exitIfStartFailed(service: RelayService) -> None:
    """
    End the process with exit code 1 if the relay could not start (twistd itself exits 0 whatever
    happened); the reason is already logged, in one line.

    Run after the reactor has shut down, when nothing is left to clean up.

    @param service: The relay service.
    """
    if service.startFailure is not None:
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            if stream is not None:
                stream.flush()
        os._exit(1)


#: The shortest admin token accepted: it is a password to a page that names tenants and visitors.
MIN_ADMIN_TOKEN = 16


def readAdminToken(token: str | None, path: str | None) -> str | None:
    """
    The admin token from C{--admin-token} or the first line of C{--admin-token-file}.

    @return: The token, or L{None} when neither is given.
    @raise usage.UsageError: When both are given, the file cannot be read, or the token is shorter
        than L{MIN_ADMIN_TOKEN} characters.
    """
    if token is not None and path is not None:
        raise usage.UsageError("give --admin-token or --admin-token-file, not both")
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                token = f.readline().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise usage.UsageError(f"--admin-token-file {path!r}: {e}")
    if token is None:
        return None
    if len(token) < MIN_ADMIN_TOKEN or any(c.isspace() for c in token):
        raise usage.UsageError(
            f"the admin token must be at least {MIN_ADMIN_TOKEN} characters without spaces "
            "(for example: openssl rand -hex 16)"
        )
    return token


def makeService(options: Options) -> RelayService:
    """
    Build the relay service for C{twistd}; if it cannot start, the process exits 1.

    @param options: Parsed options.
    @return: The relay service.
    """
    from twisted.internet import reactor

    # The relay's own process: its started heap can leave the garbage collector's scans.
    config = attrs.evolve(options.config(), freezeHeap=True)
    # Every event of every connection skips Twisted's legacy log context (the relay logs with
    # twisted.logger only).
    leanpoll.install(reactor)
    service = RelayService(config, reactor, signalInstaller(reactor))
    reactor.addSystemEventTrigger("after", "shutdown", exitIfStartFailed, service)
    return service
