"""
What a tunnel is told to do: parsed targets, relay addresses and the tunnel's configuration.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import attrs

from portal.gateway.appjson import App, AppError, loadApp
from portal.gateway.basicauth import (
    Credential,
    CredentialError,
    loadCredentialsFile,
    parseCredential,
)
from portal.gateway.loopback import EndpointAddressError, parseLoopbackAddress
from portal.gateway.routes import Route, RouteError, RouteTable, Upstream, parseRoute
from portal.trust.identity import defaultIdentityPath
from portal.trust.relayaddress import (
    ConfigError as ConfigError,
)
from portal.trust.relayaddress import (
    RelayAddress as RelayAddress,
)
from portal.trust.relayaddress import (
    parseChain,
    parseHostPort,
    parsePort,
    parseRelay,
)
from portal.tunnel.acme.settings import AcmeSettings, parseAcme
from portal.tunnel.addressrules import SERVE_ALL, AddressRules

#: The relay a tunnel uses when given none: one on this machine.
DEFAULT_RELAY = "localhost:4017"

#: Levels of C{--log-level}, most verbose first.
LOG_LEVELS = ("debug", "info", "warn", "error", "critical")
#: The level of log events a tunnel prints without C{--log-level}.
DEFAULT_LOG_LEVEL = "warn"

#: Seconds after which a tunnel none of whose relays was ever reached stops (C{--give-up-after}).
DEFAULT_GIVE_UP_AFTER = 60.0

#: Where the request inspector listens by default (the next ports are tried when it is taken).
DEFAULT_INSPECT = ("127.0.0.1", 4040)

#: Relays a tunnel holds leases on from a registry, unless C{--max-relays} says otherwise.
DEFAULT_MAX_RELAYS = 2
#: Most relays C{--max-relays} may ask for.
MAX_MAX_RELAYS = 16


@attrs.frozen
class Target:
    """
    The local service a tunnel forwards to.

    @ivar host: Host name or address.
    @ivar port: TCP port.
    @ivar tls: Whether the tunnel speaks TLS to it (an C{https://} target).
    """

    host: str
    port: int
    tls: bool = False

    def __str__(self) -> str:
        """
        @return: The target as users write it, scheme included when it is TLS.
        """
        hostport = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        return f"https://{hostport}" if self.tls else hostport


def parseTarget(text: str) -> Target:
    """
    Parse a TARGET: C{PORT}, C{HOST:PORT}, or C{http(s)://HOST:PORT}; a bare port means 127.0.0.1.

    @param text: The target as given.
    @return: The parsed target.
    @raise ConfigError: When malformed.
    """
    tls = False
    rest = text
    for scheme, isTLS in (("http://", False), ("https://", True)):
        if text.lower().startswith(scheme):
            rest, tls = text[len(scheme) :].rstrip("/"), isTLS
            break
    else:
        if "://" in text:
            raise ConfigError(f"target {text!r}: only http:// and https:// schemes are supported")
    if rest.isdigit():
        return Target("127.0.0.1", parsePort(rest, "target"), tls)
    host, port = parseHostPort(rest, "target")
    return Target(host, port, tls)


def _alpn(value: str) -> tuple[bytes, ...]:
    """
    Parse a comma-separated ALPN list.

    @raise ConfigError: When empty or malformed.
    """
    protocols = tuple(p.strip().encode("ascii", "replace") for p in value.split(",") if p.strip())
    if not protocols or any(len(p) > 255 for p in protocols):
        raise ConfigError(f"--alpn {value!r}: expected a comma-separated list like h2,http/1.1")
    return protocols


@attrs.frozen
class TunnelConfig:
    """
    A tunnel's whole configuration.

    @ivar target: The local service.
    @ivar relays: The relays to hold leases on.
    @ivar name: The requested lease label, or L{None} for a stable derived one.
    @ivar alpn: Protocols offered to visitors, most preferred first.
    @ivar certFile: The user's certificate file, or L{None} to use the local CA.
    @ivar keyFile: The user's key file.
    @ivar identityPath: The identity file.
    @ivar json: Print JSON event lines instead of text.
    @ivar poolSize: Idle data sessions kept open per relay.
    @ivar routes: Routed HTTP mode's routes; empty in stream mode.
    @ivar proxyProtocol: C{"v1"} or C{"v2"} to start each target connection with a PROXY protocol
        header (stream and raw TCP modes), or L{None}.
    @ivar tcp: Raw TCP mode: the relay gives the lease a public TCP port and the tunnel forwards each
        connection's bytes to the target as they are.
    @ivar udpTarget: UDP mode's local UDP service, or L{None} without UDP mode.
    @ivar udpIdleTimeout: Seconds a UDP flow may be idle before its local socket is closed.
    @ivar udpMaxFlows: Most UDP flows (visitor addresses) at once.
    @ivar udpMaxFlowsPerSource: Most UDP flows at once from one visitor source address (IPv4 /32,
        IPv6 /64).
    @ivar registry: The relay registry (a file or an http(s) URL) to pick relays from, or L{None}.
    @ivar maxRelays: How many registry relays to hold leases on (besides L{relays}).
    @ivar apps: The gateway apps of C{--app} (routed HTTP mode, one lease name per app); empty
        without C{--app}.
    @ivar addressRules: Which visitor addresses are served (C{--allow-ip}, C{--deny-ip}).
    @ivar giveUpAfter: Seconds after which the tunnel stops if none of its C{--relay}s was ever
        reached; 0 to keep trying.
    @ivar takeover: Move the leases from another running tunnel of the same identity
        (C{--takeover}) instead of stopping.
    @ivar inspect: Where the request inspector listens (routed HTTP mode), or L{None} for none.
    @ivar inspectFixed: Whether L{inspect} was given (C{--inspect}): then only that port is tried.
    @ivar logLevel: The least level of log events printed (one of L{LOG_LEVELS}).
    @ivar basicAuth: Routed HTTP mode's users (C{--basic-auth}, C{--basic-auth-file}); empty for
        no HTTP Basic authentication.
    @ivar acme: With C{--acme}, how to get certificates from an ACME CA; else L{None}.
    @ivar metrics: Where the tunnel serves its metrics (C{--metrics}, a loopback address), or
        L{None} for nowhere.
    @ivar logFormat: How log lines are written: C{text} or C{json} (C{--log-format}).
    """

    target: Target | None
    relays: tuple[RelayAddress, ...] = (parseRelay(DEFAULT_RELAY),)
    name: str | None = None
    alpn: tuple[bytes, ...] = (b"http/1.1",)
    certFile: str | None = None
    keyFile: str | None = None
    identityPath: str = attrs.field(factory=defaultIdentityPath)
    json: bool = False
    poolSize: int = 4
    routes: tuple[Route, ...] = ()
    proxyProtocol: str | None = None
    tcp: bool = False
    udpTarget: Target | None = None
    udpIdleTimeout: float = 60.0
    udpMaxFlows: int = 1024
    udpMaxFlowsPerSource: int = 64
    registry: str | None = None
    maxRelays: int = DEFAULT_MAX_RELAYS
    apps: tuple[App, ...] = ()
    addressRules: AddressRules = SERVE_ALL
    basicAuth: tuple[Credential, ...] = ()
    logLevel: str = DEFAULT_LOG_LEVEL
    giveUpAfter: float = DEFAULT_GIVE_UP_AFTER
    takeover: bool = False
    inspect: tuple[str, int] | None = None
    inspectFixed: bool = False
    acme: AcmeSettings | None = None
    metrics: tuple[str, int] | None = None
    logFormat: str = "text"

    @property
    def mode(self) -> str:
        """
        The registration mode asked of relays (L{portal.wire.control.MODES}): C{stream}, C{tcp}, C{udp},
        or one of the first two with C{+udp}.
        """
        parts = []
        if self.tcp:
            parts.append("tcp")
        elif self.target is not None or self.routes or self.apps:
            parts.append("stream")
        if self.udpTarget is not None:
            parts.append("udp")
        return "+".join(parts)

    def describeTarget(self, label: str | None = None) -> str:
        """
        What the tunnel forwards to, for humans and for the stable label: the target in stream mode,
        C{PREFIX=TARGET} for each route in routed HTTP mode, the app and its routes with C{--app}.

        @param label: With C{--app}, the lease label whose app to describe (default: every app).
        """
        if self.apps:
            return ", ".join(app.describe() for app in self.apps if label in (None, app.name))
        if self.routes:
            return " ".join(
                f"{r.prefix}={_h2scheme(r.upstream)}{r.upstream.authority}{r.upstream.basePath}"
                f"{',strip' if r.strip else ''}{',host' if r.rewriteHost else ''}"
                for r in self.routes
            )
        if self.target is None and self.udpTarget is not None:
            return f"udp {self.udpTarget}"
        return str(self.target)

    @property
    def configDir(self) -> str:
        """
        The directory holding the identity, the known relays and the local CA.
        """
        return os.path.dirname(os.path.abspath(self.identityPath))


def parseMetricsAddress(text: str) -> tuple[str, int]:
    """
    Parse C{--metrics}.

    @param text: C{PORT}, C{HOST:PORT} or C{[IPV6]:PORT}, on a loopback address.
    @return: The address and port.
    @raise portal.gateway.loopback.EndpointAddressError: If malformed or not on loopback.
    """
    return parseLoopbackAddress(
        text,
        "the tunnel's metrics listener",
        "a tunnel never listens on a public interface (scrape it from this machine)",
    )


def buildConfig(
    target: str | None,
    relays: Sequence[str] = (),
    name: str | None = None,
    alpn: str | None = None,
    certFile: str | None = None,
    keyFile: str | None = None,
    identityPath: str | None = None,
    json: bool = False,
    poolSize: int = 4,
    http: bool = False,
    httpRoutes: Sequence[str] = (),
    proxyProtocol: str | None = None,
    tcp: bool = False,
    udp: bool = False,
    udpAddr: str | None = None,
    udpIdleTimeout: float = 60.0,
    udpMaxFlows: int = 1024,
    udpMaxFlowsPerSource: int = 64,
    via: Sequence[Sequence[str]] = (),
    registry: str | None = None,
    maxRelays: int | None = None,
    apps: Sequence[str] = (),
    allowIPs: Sequence[str] = (),
    denyIPs: Sequence[str] = (),
    basicAuth: Sequence[str] = (),
    basicAuthFiles: Sequence[str] = (),
    logLevel: str | None = None,
    giveUpAfter: float = DEFAULT_GIVE_UP_AFTER,
    takeover: bool = False,
    inspect: str | None = None,
    noInspect: bool = False,
    acme: str | None = None,
    acmeEmail: str | None = None,
    acmeCA: str | None = None,
    acmeRenewBefore: str | None = None,
    metrics: str | None = None,
    logFormat: str | None = None,
) -> TunnelConfig:
    """
    Build a L{TunnelConfig} from command-line strings.

    @param via: For each of C{relays}, in order, the hop relays on the path to it (C{--via}, first
        hop first); missing entries mean direct connections.
    @param apps: The C{app.json} files of C{--app}; they are read and checked here.
    @param allowIPs: The networks of C{--allow-ip}.
    @param denyIPs: The networks of C{--deny-ip}.
    @param basicAuth: The C{USER:PASS} of C{--basic-auth}.
    @param basicAuthFiles: The files of C{--basic-auth-file}; they are read and checked here.
    @param logLevel: The level of C{--log-level}, or L{None} for L{DEFAULT_LOG_LEVEL}.
    @param giveUpAfter: The seconds of C{--give-up-after} (0: never give up).
    @param takeover: C{--takeover}.
    @param inspect: C{--inspect ADDR}: PORT or HOST:PORT of the request inspector.
    @param noInspect: C{--no-inspect}.
    @param acme: C{--acme}, with C{acmeEmail}, C{acmeCA} and C{acmeRenewBefore} its companions
        (L{portal.tunnel.acme.settings.parseAcme}).
    @param metrics: C{--metrics ADDR}: PORT or HOST:PORT on a loopback address.
    @param logFormat: C{--log-format}: C{text} or C{json}, or L{None} for text.
    @raise ConfigError: For any malformed or inconsistent option.
    """
    if (certFile is None) != (keyFile is None):
        raise ConfigError("--cert and --key must be given together")
    if not 0 < poolSize <= 64:
        raise ConfigError("--pool-size must be between 1 and 64")
    if name is not None:
        from portal.trust.names import InvalidName, validateLabel

        try:
            name = validateLabel(name)
        except InvalidName as e:
            raise ConfigError(f"--name: {e}")
    loadedApps = _loadApps(apps, target, name, http, httpRoutes, tcp, udp, proxyProtocol)
    routes: list[Route] = []
    try:
        routes = [parseRoute(r) for r in httpRoutes]
        if target is not None and (http or routes):
            if any(r.prefix == "/" for r in routes):
                raise ConfigError(
                    f"TARGET {target!r} would be the '/' route, but --http-route gives one already"
                )
            routes.append(parseRoute(f"/={target}"))
        if routes:
            RouteTable(routes)  # Rejects duplicate prefixes.
    except RouteError as e:
        raise ConfigError(f"--http-route: {e}")
    if proxyProtocol is not None:
        from portal.wire.proxyheader import parseVersion

        try:
            proxyProtocol = parseVersion(proxyProtocol)
        except ValueError as e:
            raise ConfigError(f"--proxy-protocol {e}")
        if routes:
            raise ConfigError(
                "--proxy-protocol: routed HTTP mode passes the visitor's address in "
                "X-Forwarded-For and Forwarded instead"
            )
        if target is not None and target.startswith("https://"):
            raise ConfigError("--proxy-protocol: not available with an https:// target yet")
    udpTarget = None
    if udpAddr is not None and not udp:
        raise ConfigError("--udp-addr needs --udp")
    if udp:
        if not 0 < udpIdleTimeout <= 86400:
            raise ConfigError("--udp-idle-timeout must be between 0 and 86400 seconds")
        if not 0 < udpMaxFlows <= 65536:
            raise ConfigError("--udp-max-flows must be between 1 and 65536")
        if not 0 < udpMaxFlowsPerSource <= 65536:
            raise ConfigError("--udp-max-flows-per-source must be between 1 and 65536")
        service = udpAddr if udpAddr is not None else target
        if service is None:
            raise ConfigError("--udp: missing TARGET or --udp-addr (the local UDP service)")
        if "://" in service:
            raise ConfigError(f"--udp: {service!r} must be PORT or HOST:PORT (no scheme)")
        udpTarget = parseTarget(service)
        if udpAddr is None and not tcp:
            # TARGET is the UDP service; there is no TCP side.
            target = None
            if http or httpRoutes:
                raise ConfigError("--udp without --udp-addr uses TARGET as the UDP service")
    if tcp:
        if http or httpRoutes:
            raise ConfigError(
                "--tcp forwards raw bytes: it cannot be combined with --http or --http-route"
            )
        if target is not None and "://" in target:
            raise ConfigError(f"--tcp: TARGET {target!r} must be PORT or HOST:PORT (no scheme)")
        for given, flag in ((alpn, "--alpn"), (certFile, "--cert")):
            if given is not None:
                raise ConfigError(f"{flag}: raw TCP mode does not terminate TLS; the service does")
    if alpn is None:
        # Routed mode speaks HTTP/2 itself; in stream mode the target would have to (h2c).
        alpn = "h2,http/1.1" if routes or loadedApps else "http/1.1"
    if routes or loadedApps:
        if any(p not in (b"h2", b"http/1.1") for p in _alpn(alpn)):
            raise ConfigError(
                "--alpn: routed HTTP mode speaks HTTP/1.1 and HTTP/2 to visitors (h2,http/1.1)"
            )
    elif target is None and udpTarget is None and not loadedApps:
        raise ConfigError("missing TARGET (a port, HOST:PORT or http(s)://HOST:PORT) or --app")
    elif http:
        raise ConfigError("--http needs a TARGET")
    if logLevel is not None and logLevel.lower() not in LOG_LEVELS:
        raise ConfigError(f"--log-level {logLevel!r}: expected one of {', '.join(LOG_LEVELS)}")
    if not 0 <= giveUpAfter <= 86400:
        raise ConfigError("--give-up-after must be between 0 (never) and 86400 seconds")
    inspectAt: tuple[str, int] | None = None
    if inspect is not None and noInspect:
        raise ConfigError("--inspect and --no-inspect contradict each other")
    if inspect is not None and not (routes or loadedApps):
        raise ConfigError("--inspect: the request inspector is for routed HTTP mode (--http)")
    if inspect is not None:
        host, _, port = inspect.rpartition(":")
        if port == "0":
            # An OS-chosen port (tests, several tunnels): the inspector line says which.
            inspectAt = (host.strip("[]") or "127.0.0.1", 0)
        elif inspect.isdigit():
            inspectAt = ("127.0.0.1", parsePort(inspect, "--inspect"))
        else:
            inspectAt = parseHostPort(inspect, "--inspect")
    elif (routes or loadedApps) and not noInspect:
        inspectAt = DEFAULT_INSPECT
    credentials = _credentials(basicAuth, basicAuthFiles, bool(routes), bool(loadedApps))
    acmeSettings = parseAcme(acme, acmeEmail, acmeCA, acmeRenewBefore)
    if acmeSettings is not None:
        if certFile is not None:
            raise ConfigError(
                "--acme and --cert both say where the certificate comes from; give one"
            )
        if tcp or (target is None and not routes and not loadedApps):
            raise ConfigError(
                "--acme: only modes where the tunnel terminates TLS (stream, routed HTTP, --app) "
                "use certificates"
            )
    metricsAt = None
    if metrics is not None:
        try:
            metricsAt = parseMetricsAddress(metrics)
        except EndpointAddressError as e:
            raise ConfigError(f"--metrics {e}")
    if logFormat is not None and logFormat not in ("text", "json"):
        raise ConfigError(f"--log-format {logFormat!r}: expected text or json")
    if maxRelays is not None and registry is None:
        raise ConfigError("--max-relays needs --registry")
    if maxRelays is not None and not 0 < maxRelays <= MAX_MAX_RELAYS:
        raise ConfigError(f"--max-relays must be between 1 and {MAX_MAX_RELAYS}")
    if len(via) > len(relays):
        raise ConfigError("--via: each --via must come before the --relay it leads to")
    paths = [*via, *([()] * (len(relays) - len(via)))]
    # With a registry, only the relays given explicitly are added to those it picks.
    parsedRelays = tuple(parseChain(r, hops) for r, hops in zip(relays, paths, strict=True)) or (
        () if registry else (parseRelay(DEFAULT_RELAY),)
    )
    addresses = [choice.address for r in parsedRelays for choice in r.choices]
    if len(set(addresses)) != len(addresses):
        raise ConfigError("--relay: the same relay is given twice")
    return TunnelConfig(
        target=None if routes or target is None else parseTarget(target),
        routes=tuple(RouteTable(routes).routes) if routes else (),
        relays=parsedRelays,
        name=name,
        alpn=_alpn(alpn),
        certFile=certFile,
        keyFile=keyFile,
        identityPath=identityPath or defaultIdentityPath(),
        json=json,
        poolSize=poolSize,
        proxyProtocol=proxyProtocol,
        tcp=tcp,
        udpTarget=udpTarget,
        udpIdleTimeout=udpIdleTimeout,
        udpMaxFlows=udpMaxFlows,
        udpMaxFlowsPerSource=udpMaxFlowsPerSource,
        registry=registry or None,
        maxRelays=DEFAULT_MAX_RELAYS if maxRelays is None else maxRelays,
        apps=loadedApps,
        addressRules=AddressRules.parse(allowIPs, denyIPs),
        basicAuth=credentials,
        logLevel=DEFAULT_LOG_LEVEL if logLevel is None else logLevel.lower(),
        giveUpAfter=giveUpAfter,
        takeover=takeover,
        inspect=inspectAt,
        inspectFixed=inspect is not None,
        acme=acmeSettings,
        metrics=metricsAt,
        logFormat=logFormat or "text",
    )


def _credentials(
    basicAuth: Sequence[str], files: Sequence[str], routed: bool, apps: bool
) -> tuple[Credential, ...]:
    """
    Read the users of C{--basic-auth} and C{--basic-auth-file}.

    @param routed: Whether the tunnel is in routed HTTP mode (C{--http}, C{--http-route}).
    @param apps: Whether it publishes C{--app} apps.
    @raise ConfigError: For a malformed credential or file, or outside routed HTTP mode.
    """
    if not basicAuth and not files:
        return ()
    if apps:
        raise ConfigError(
            "--basic-auth: the app gateway decides access itself (public, private and peer paths "
            "in app.json)"
        )
    if not routed:
        raise ConfigError(
            "--basic-auth needs routed HTTP mode (--http or --http-route): in stream mode the "
            "tunnel does not read HTTP"
        )
    try:
        credentials = [parseCredential(c) for c in basicAuth]
        for path in files:
            credentials.extend(loadCredentialsFile(path))
    except CredentialError as e:
        raise ConfigError(str(e))
    return tuple(credentials)


def _loadApps(
    apps: Sequence[str],
    target: str | None,
    name: str | None,
    http: bool,
    httpRoutes: Sequence[str],
    tcp: bool,
    udp: bool,
    proxyProtocol: str | None,
) -> tuple[App, ...]:
    """
    Read the C{app.json} files of C{--app}, and check that nothing else says what to publish.

    @param apps: The files, in the order given.
    @return: The apps.
    @raise ConfigError: If a file is not a valid app, two apps have the same name, or C{--app} is
        combined with TARGET, C{--http}, C{--http-route}, C{--name}, C{--tcp}, C{--udp} or
        C{--proxy-protocol}.
    """
    if not apps:
        return ()
    if target is not None:
        raise ConfigError(
            f"--app: TARGET {target!r} cannot be combined with --app (the routes come from the "
            "app.json)"
        )
    if http or httpRoutes:
        raise ConfigError(
            "--app: cannot be combined with --http or --http-route (the routes come from the "
            "app.json)"
        )
    if name is not None:
        raise ConfigError("--name: with --app each app's name, in its app.json, is its lease label")
    if tcp or udp:
        raise ConfigError(
            "--app: the app gateway is routed HTTP mode; --tcp and --udp do not apply"
        )
    if proxyProtocol is not None:
        raise ConfigError(
            "--proxy-protocol: routed HTTP mode passes the visitor's address in "
            "X-Forwarded-For and Forwarded instead"
        )
    loaded: list[App] = []
    for path in apps:
        try:
            app = loadApp(path)
        except AppError as e:
            raise ConfigError(f"--app {path}: {e}")
        for other in loaded:
            if other.name == app.name:
                raise ConfigError(
                    f"--app {path}: the name {app.name!r} is already the name of --app "
                    f"{other.source}; each app needs its own"
                )
        loaded.append(app)
    return tuple(loaded)


def _h2scheme(upstream: Upstream) -> str:
    """
    @return: C{h2c://} or C{h2://} for an HTTP/2 upstream, else nothing (an HTTP/1.1 upstream is
        described as before, which keeps its routes' stable labels).
    """
    if not upstream.http2:
        return ""
    return "h2://" if upstream.tls else "h2c://"
