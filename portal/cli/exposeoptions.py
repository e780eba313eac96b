"""
Command-line options shared by C{portal expose} and C{twistd portal-tunnel}.
"""

from __future__ import annotations

from twisted.python import usage

from portal.cli.flagsanywhere import FlagsAnywhere
from portal.tunnel.config import ConfigError, TunnelConfig, buildConfig


class TunnelOptions(FlagsAnywhere):
    """
    C{TARGET [[--via HOST:PORT[#RELAYID]]... --relay HOST:PORT[#RELAYID]]... [--name LABEL]
    [--alpn LIST] [--cert F --key F] [--identity PATH] [--json]}.

    The C{--via} options given before a C{--relay} are that relay's path, first hop first.

    @ivar tunnelConfig: The parsed configuration, after L{postOptions}.
    """

    synopsis = "TARGET [options] | --app app.json [--app app.json]... [options]"
    longdesc = (
        "Publish a local service through Portal relays. TARGET is PORT, HOST:PORT or "
        "http(s)://HOST:PORT; a bare port means 127.0.0.1. Without --relay the relay on this "
        "machine (localhost:4017) is used. The --via options before a --relay are the relays "
        "the tunnel reaches that relay through, first hop first. Instead of TARGET, each --app "
        "publishes an app of the app gateway under its own name (see docs/app-json.md)."
    )
    optFlags = [
        ["json", None, "Print one JSON object per event instead of text."],
        ["http", None, "Routed HTTP mode with TARGET as the one route '/'."],
        ["tcp", None, "Raw TCP mode: the relay gives a public TCP port (tcp://HOST:PORT)."],
        [
            "no-inspect",
            None,
            "Routed HTTP mode: do not start the request inspector.",
        ],
        [
            "takeover",
            None,
            "Move the lease names from another running tunnel of the same identity to this one "
            "(that tunnel then stops) instead of stopping with 'already running'.",
        ],
        [
            "udp",
            None,
            "UDP mode: the relay gives a public UDP port (udp://HOST:PORT) for the UDP service "
            "TARGET, or --udp-addr.",
        ],
    ]
    optParameters = [
        ["name", None, None, "Lease label to ask for (default: derived from identity and target)."],
        [
            "alpn",
            None,
            None,
            "Protocols offered to visitors (default: h2,http/1.1 in routed HTTP mode, "
            "http/1.1 otherwise).",
        ],
        ["cert", None, None, "Certificate chain file (PEM) to present instead of the local CA's."],
        ["key", None, None, "Private key file (PEM) for --cert."],
        ["identity", None, None, "Identity file (default ~/.config/portal/identity.json)."],
        ["pool-size", None, 4, "Idle data sessions kept open per relay.", int],
        [
            "udp-addr",
            None,
            None,
            "Local UDP service for --udp, PORT or HOST:PORT (default: TARGET); TARGET is then "
            "also published over TCP.",
        ],
        ["udp-idle-timeout", None, 60.0, "Seconds a UDP flow may be idle (default 60).", float],
        ["udp-max-flows", None, 1024, "Most UDP flows (visitor addresses) at once.", int],
        [
            "udp-max-flows-per-source",
            None,
            64,
            "Most UDP flows at once from one visitor source address (IPv4, or IPv6 /64).",
            int,
        ],
        [
            "proxy-protocol",
            None,
            None,
            "Start each connection to the target with a PROXY protocol header (v1 or v2) "
            "carrying the visitor's address (stream and raw TCP modes).",
        ],
        [
            "registry",
            None,
            None,
            "Relay registry, an http(s) URL or a file: hold leases on --max-relays of its relays, "
            "chosen by rendezvous hashing on the identity (added to any --relay).",
        ],
        [
            "max-relays",
            None,
            None,
            "How many registry relays to hold leases on (default 2).",
            int,
        ],
        [
            "log-level",
            None,
            None,
            "Print log events at this level and above on standard error: debug, info, warn, "
            "error or critical (default warn).",
        ],
        [
            "give-up-after",
            None,
            60.0,
            "Stop (exit status 1) if none of the --relay relays was reached in this many seconds; "
            "0 keeps trying. A relay reached once is retried for as long as the tunnel runs.",
            float,
        ],
        [
            "inspect",
            None,
            None,
            "Routed HTTP mode: serve the request inspector on PORT or HOST:PORT (default "
            "127.0.0.1:4040, or the next free port).",
        ],
        [
            "acme",
            None,
            None,
            "Get browser-trusted certificates from an ACME CA (TLS-ALPN-01 through the relay): "
            "a directory URL, letsencrypt or letsencrypt-staging.",
        ],
        ["acme-email", None, None, "Contact address for the ACME account (with --acme)."],
        [
            "acme-ca",
            None,
            None,
            "CA certificates (PEM) to verify a private ACME server's HTTPS with (with --acme).",
        ],
        [
            "acme-renew-before",
            None,
            None,
            "Renew this long before expiry, like 30d or 12h (default: at two thirds of the "
            "certificate's lifetime).",
        ],
        [
            "metrics",
            None,
            None,
            "Serve /metrics (Prometheus) and /healthz on this loopback address, PORT or HOST:PORT.",
        ],
        ["log-format", None, "text", "Log lines on standard error as text or json."],
    ]

    tunnelConfig: TunnelConfig

    def __init__(self) -> None:
        super().__init__()
        self["relays"] = []
        self["via"] = []
        self["pending-via"] = []
        self["http-routes"] = []
        self["apps"] = []
        self["allow-ips"] = []
        self["deny-ips"] = []
        self["basic-auths"] = []
        self["basic-auth-files"] = []

    def opt_relay(self, relay: str) -> None:
        """
        A relay to hold a lease on, HOST:PORT[#RELAYID] (repeatable; default localhost:4017); a
        relay cluster's control addresses separated by commas, tried in turn.
        """
        self["relays"].append(relay)
        self["via"].append(tuple(self["pending-via"]))
        self["pending-via"] = []

    def opt_via(self, relay: str) -> None:
        """
        Reach the next --relay through this relay, HOST:PORT[#RELAYID] (repeatable: first hop first).
        """
        self["pending-via"].append(relay)

    def opt_http_route(self, route: str) -> None:
        """
        PREFIX=TARGET[,strip][,host] route of routed HTTP mode (repeatable; longest prefix wins).
        """
        self["http-routes"].append(route)

    def opt_app(self, path: str) -> None:
        """
        app.json of an app gateway app, published under its own lease name (repeatable: one lease
        and one URL per app).
        """
        self["apps"].append(path)

    def opt_allow_ip(self, network: str) -> None:
        """
        Serve only visitors from this network, CIDR or one address (repeatable; the address the
        relay reports, in every mode).
        """
        self["allow-ips"].append(network)

    def opt_deny_ip(self, network: str) -> None:
        """
        Refuse visitors from this network, CIDR or one address (repeatable; checked before
        --allow-ip).
        """
        self["deny-ips"].append(network)

    def opt_basic_auth(self, credential: str) -> None:
        """
        USER:PASS a visitor must give (HTTP Basic authentication, routed HTTP mode; repeatable).
        Visible to other local users in the process list: prefer --basic-auth-file.
        """
        self["basic-auths"].append(credential)

    def opt_basic_auth_file(self, path: str) -> None:
        """
        File of USER:BCRYPT-HASH lines (htpasswd -nB USER) for HTTP Basic authentication
        (repeatable).
        """
        self["basic-auth-files"].append(path)

    def parseArgs(self, target: str | None = None) -> None:
        """
        @param target: The local service to publish.
        """
        self["target"] = target

    def refuseDanglingVia(self) -> None:
        """
        @raise usage.UsageError: When the last C{--via} is not followed by the C{--relay} it leads to.
        """
        if self["pending-via"]:
            raise usage.UsageError(
                f"--via {self['pending-via'][-1]}: a --via must be followed by the --relay it "
                f"leads to (--via HOP --relay RELAY)"
            )

    def postOptions(self) -> None:
        """
        Build the configuration.
        """
        self.refuseDanglingVia()
        try:
            self.tunnelConfig = buildConfig(
                self["target"],
                relays=self["relays"],
                name=self["name"],
                alpn=self["alpn"],
                certFile=self["cert"],
                keyFile=self["key"],
                identityPath=self["identity"],
                json=bool(self["json"]),
                poolSize=self["pool-size"],
                http=bool(self["http"]),
                httpRoutes=self["http-routes"],
                proxyProtocol=self["proxy-protocol"],
                tcp=bool(self["tcp"]),
                udp=bool(self["udp"]),
                udpAddr=self["udp-addr"],
                udpIdleTimeout=self["udp-idle-timeout"],
                udpMaxFlows=self["udp-max-flows"],
                udpMaxFlowsPerSource=self["udp-max-flows-per-source"],
                via=self["via"],
                registry=self["registry"],
                maxRelays=self["max-relays"],
                apps=self["apps"],
                allowIPs=self["allow-ips"],
                denyIPs=self["deny-ips"],
                basicAuth=self["basic-auths"],
                basicAuthFiles=self["basic-auth-files"],
                logLevel=self["log-level"],
                giveUpAfter=self["give-up-after"],
                takeover=bool(self["takeover"]),
                inspect=self["inspect"],
                noInspect=bool(self["no-inspect"]),
                acme=self["acme"],
                acmeEmail=self["acme-email"],
                acmeCA=self["acme-ca"],
                acmeRenewBefore=self["acme-renew-before"],
                metrics=self["metrics"],
                logFormat=self["log-format"],
            )
        except ConfigError as e:
            raise usage.UsageError(str(e))
