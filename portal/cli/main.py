"""
The C{portal} command: C{expose}, C{start} (tunnels from C{portal.toml}), C{identity show|new}, C{peers}, C{relays}, C{demo}, and C{pair} and
C{terminals} (L{portal.cli.terminals}).

Exit codes: 0 after a clean stop, 2 for usage errors (with a one-line reason), 1 for anything else.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Sequence
from typing import Any, TextIO, cast

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)
from twisted.python import usage

import portal
from portal.cli.exposeoptions import TunnelOptions
from portal.cli.helptext import TidyHelp
from portal.cli.jsonlog import jsonLogObserver
from portal.cli.peers import PeersOptions, peersCommand
from portal.cli.startoptions import StartOptions
from portal.cli.terminals import (
    PairOptions,
    TerminalsOptions,
    pairCommand,
    runCommand,
    terminalsCommand,
)
from portal.trust.identity import (
    Identity,
    IdentityError,
    defaultIdentityPath,
    loadIdentity,
    loadOrCreateIdentity,
    saveIdentity,
)
from portal.trust.localca import CertificateError
from portal.tunnel.config import TunnelConfig
from portal.tunnel.report import Reporter

USAGE_ERROR = 2
FAILURE = 1


class IdentityOptions(TidyHelp):
    """
    C{portal identity show|new [--identity PATH] [--force]}.
    """

    synopsis = "show|new [--identity PATH] [--force]"
    optFlags = [["force", None, "With new: replace an existing identity (its leases are lost)."]]
    optParameters = [
        ["identity", None, None, "Identity file (default ~/.config/portal/identity.json)."]
    ]

    def parseArgs(self, action: str | None = None) -> None:
        """
        @param action: C{show} or C{new}.
        """
        if action not in ("show", "new"):
            raise usage.UsageError("expected 'portal identity show' or 'portal identity new'")
        self["action"] = action


class DemoOptions(TidyHelp):
    """
    C{portal demo}: a relay, a tunnel and a sample site, all in this process on loopback.
    """

    optParameters = [
        [
            "public",
            None,
            "tcp:8443:interface=127.0.0.1",
            "Endpoint of the relay's public listener.",
        ],
        [
            "control",
            None,
            "tcp:4017:interface=127.0.0.1",
            "Endpoint of the relay's control listener.",
        ],
        ["state-dir", None, None, "The demo relay's state directory."],
        ["identity", None, None, "Identity file (default ~/.config/portal/identity.json)."],
    ]
    optFlags = [["json", None, "Print JSON event lines."]]


class RelaysOptions(TidyHelp):
    """
    C{portal relays --registry URL|FILE [--json]}.
    """

    synopsis = "--registry URL|FILE [--cacert FILE] [--json]"
    longdesc = (
        "Check every relay of a registry: a health check of its control port (its identity proof "
        "and latency) and, when the registry gives its URL, its signed descriptor."
    )
    optParameters = [
        ["registry", None, None, "Relay registry: an http(s) URL or a file."],
        [
            "cacert",
            None,
            None,
            "CA certificate (PEM) to trust for the https:// registry and descriptors, such as a "
            "relay's own CA (STATE_DIR/tls/ca.pem); default: the system's CAs.",
        ],
    ]
    optFlags = [["json", None, "Print one JSON object per relay instead of a table."]]

    def postOptions(self) -> None:
        """
        A registry is required.
        """
        if not self["registry"]:
            raise usage.UsageError("portal relays needs --registry URL|FILE")
        if self["cacert"] and self["registry"].lower().startswith("http://"):
            raise usage.UsageError("--cacert: the registry is fetched over plain http://")


class PortalOptions(TidyHelp):
    """
    The C{portal} command line.
    """

    longdesc = (
        "Publish local services through Portal relays. 'portal COMMAND --help' describes a "
        "command; the documentation is in docs/user-guide.md."
    )
    subCommands = [
        ["expose", None, TunnelOptions, "Publish a local service through relays."],
        ["start", None, StartOptions, "Start the tunnels of a portal.toml configuration file."],
        ["identity", None, IdentityOptions, "Show or create this machine's identity."],
        ["peers", None, PeersOptions, "Add, list or remove the peers who may call your apps."],
        ["relays", None, RelaysOptions, "List a registry's relays with their health."],
        ["demo", None, DemoOptions, "Run a relay, a tunnel and a sample site on loopback."],
        ["pair", None, PairOptions, "Pair a device with your tunnel, or pair this machine."],
        ["terminals", None, TerminalsOptions, "List, rename or revoke paired terminals."],
        ["version", None, TidyHelp, "Print the version."],
    ]

    def commands(self) -> str:
        """
        @return: The commands, for messages.
        """
        names = [str(command[0]) for command in cast(Any, self.subCommands)]
        return ", ".join(names[:-1]) + " or " + names[-1]

    def getSynopsis(self) -> str:
        """
        @return: C{Usage: portal COMMAND [options]}, or C{Usage: portal} as the start of a
            command's own synopsis.
        """
        return "Usage: portal" if self.subCommand else "Usage: portal COMMAND [options]"

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        """
        Parse, naming the commands when the one given is unknown.
        """
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            if str(e).startswith("Unknown command"):
                raise usage.UsageError(f"{e}; the commands are {self.commands()}")
            raise

    def postOptions(self) -> None:
        """
        A subcommand is required.
        """
        if self.subCommand is None:
            raise usage.UsageError(f"expected a command: {self.commands()}")


def _startLogging(err: TextIO, level: LogLevel) -> None:
    """
    Send log events at C{level} and above to C{err} as text.
    """
    observer = FilteringLogObserver(
        textFileLogObserver(err), [LogLevelFilterPredicate(defaultLogLevel=level)]
    )
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


def identityCommand(options: IdentityOptions, out: TextIO) -> int:
    """
    Run C{portal identity show|new}.

    @return: The exit code.
    """
    path = options["identity"] or defaultIdentityPath()
    if options["action"] == "new":
        identity = Identity.generate()
        saveIdentity(identity, path, overwrite=bool(options["force"]))
        out.write(f"created identity {identity.id}\n  file: {path}\n")
        return 0
    if not os.path.exists(path):
        out.write(
            f"no identity yet at {path}; 'portal identity new' or 'portal expose' creates one\n"
        )
        return FAILURE
    identity = loadIdentity(path)
    out.write(
        f"identity {identity.id}\n  short id: {identity.shortId}\n"
        f"  public key: {identity.publicKey.hex()}\n  file: {path}\n"
    )
    return 0


def runUntilStopped(reactor: Any, services: Sequence[Any], onStart: Any = None) -> Deferred[None]:
    """
    Start services, and stop them when the reactor shuts down (Ctrl-C, SIGTERM).

    @return: A L{Deferred} that never fires by itself; the runner stops the reactor.
    """
    for service in services:
        service.startService()

    def stopAll() -> Any:
        from twisted.internet.defer import gatherResults

        return gatherResults(
            [ensureDeferred(_maybeDeferred(s.stopService)) for s in reversed(services)]
        )

    reactor.addSystemEventTrigger("before", "shutdown", stopAll)
    return Deferred()


async def _maybeDeferred(f: Any) -> None:
    """
    Await C{f()} if it returns a L{Deferred}.
    """
    result = f()
    if isinstance(result, Deferred):
        await result


def _stopOnFatal(reactor: Any) -> tuple[list[int], Any]:
    """
    A fatal-error callback for a service: it records exit status 1 and stops the reactor (the reporter
    has already told the user: stderr in text mode, a JSON line with C{--json}).

    @return: A one-element list holding the exit status, and the callback.
    """
    exit = [0]

    def fatal(message: str) -> None:
        exit[0] = FAILURE
        if reactor.running:
            reactor.stop()

    return exit, fatal


def exposeCommand(options: TunnelOptions, out: TextIO, err: TextIO) -> int:
    """
    Run C{portal expose} until interrupted.

    @return: The exit code.
    """
    return runTunnels([options.tunnelConfig], out, err)


def startCommand(options: StartOptions, out: TextIO, err: TextIO) -> int:
    """
    Run C{portal start}: the chosen tunnels of the configuration file, in this process, until
    interrupted; a fatal error in any of them stops them all.

    @return: The exit code.
    """
    return runTunnels(list(options.tunnelConfigs.values()), out, err, list(options.tunnelConfigs))


def runTunnels(
    configs: Sequence[TunnelConfig],
    out: TextIO,
    err: TextIO,
    names: Sequence[str] = (),
) -> int:
    """
    Run one tunnel per configuration until interrupted, or until one of them fails. On a terminal,
    and without C{--json}, a live status is drawn below the lines (L{portal.cli.livestatus}).

    @param names: The tunnels' names (C{portal start}), for the live status.
    @return: The exit code.
    """
    from twisted.internet import reactor

    from portal.forwarding import leanpoll
    from portal.forwarding.heap import freezeStartupHeap
    from portal.tunnel.companions import startCompanions
    from portal.tunnel.config import LOG_LEVELS
    from portal.tunnel.service import TunnelService

    status = None
    if out.isatty() and not any(config.json for config in configs):
        from rich.console import Console

        from portal.cli.livestatus import LiveStatus

        status = LiveStatus(reactor, Console(file=out))
        # Lines (and log events) are printed above the status, not across it.
        out = err = status.lineWriter()
        reactor.callWhenRunning(status.start)
        reactor.addSystemEventTrigger("after", "shutdown", status.stop)
    # One log for the process: the most verbose level any of the tunnels asks for.
    level = min((config.logLevel for config in configs), key=LOG_LEVELS.index)
    if any(config.logFormat == "json" for config in configs):
        globalLogBeginner.beginLoggingTo(
            [jsonLogObserver(err, LogLevel.levelWithName(level))], redirectStandardIO=False
        )
    else:
        _startLogging(err, LogLevel.levelWithName(level))
    exit, fatal = _stopOnFatal(reactor)
    tunnels = []
    for index, config in enumerate(configs):
        reporter = Reporter(out, config.json, err, reactor, timestamps=True)
        if status is not None:
            reporter.listeners.append(status.listenerFor(names[index] if names else ""))
        tunnels.append(TunnelService(config, reactor, reporter, fatal))
    reactor.callWhenRunning(runUntilStopped, reactor, tunnels)
    for tunnel in tunnels:
        startCompanions(reactor, tunnel)
    # Once started, the process's heap can leave the garbage collector's scans.
    reactor.callWhenRunning(freezeStartupHeap)
    # Events skip Twisted's legacy log context (the tunnel logs with twisted.logger only).
    leanpoll.install(reactor)
    reactor.run()
    return exit[0]


def relaysCommand(options: RelaysOptions, out: TextIO, err: TextIO) -> int:
    """
    Run C{portal relays}: load the registry, check every relay, print the result.

    @return: The exit code: 0 when the registry loaded (whatever the relays' health), 1 when it
        could not be loaded.
    """
    import treq
    from twisted.web.client import Agent

    from portal.cli.relays import HTTPSWithCA, formatJSON, formatTable, surveyRegistry
    from portal.gateway.terminalclient import TerminalClientError, httpClient
    from portal.registry.document import RegistryError, loadRegistry

    _startLogging(err, LogLevel.warn)

    async def run(reactor: Any) -> int:
        http = None
        if options["cacert"]:
            # The same verifying client as a command-line terminal's: TLS checked against the CA,
            # *.localhost names on 127.0.0.1.
            try:
                http = HTTPSWithCA(
                    httpClient(reactor, options["cacert"]), treq.client.HTTPClient(Agent(reactor))
                )
            except TerminalClientError as e:
                err.write(f"portal: --cacert: {e}\n")
                return FAILURE
        try:
            registry = await loadRegistry(reactor, options["registry"], http)
        except RegistryError as e:
            err.write(f"portal: cannot load the registry {e}\n")
            return FAILURE
        statuses = await surveyRegistry(reactor, registry, http=http)
        out.write(formatJSON(statuses) if options["json"] else formatTable(registry, statuses))
        out.flush()
        return 0

    return runCommand(run, err)


def demoCommand(options: DemoOptions, out: TextIO, err: TextIO) -> int:
    """
    Run a relay, a tunnel and a sample site in one process on loopback until interrupted.

    @return: The exit code.
    """
    from twisted.internet import reactor
    from twisted.internet.address import IPv4Address
    from twisted.internet.endpoints import serverFromString
    from twisted.web.server import Site

    from portal.cli.demo import SampleSite
    from portal.relay.service import RelayConfig, RelayService, defaultStateDir
    from portal.trust.names import stableLabel
    from portal.tunnel.config import buildConfig
    from portal.tunnel.service import TunnelService

    _startLogging(err, LogLevel.warn)
    exit, fatal = _stopOnFatal(reactor)

    # The relay keeps the default state directory, like `twistd portal-relay`: its identity stays the
    # one the tunnel pinned, so the demo can be run again (and mixed with a hand-started relay).
    stateDir = options["state-dir"] or defaultStateDir()
    relay = RelayService(
        RelayConfig(public=options["public"], control=options["control"], stateDir=stateDir),
        reactor,
    )

    async def start() -> None:
        relay.startService()
        await relay.whenListening()
        site = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(
            Site(SampleSite())
        )
        # The demo's control listener is TCP on 127.0.0.1; getHost() is only typed as IAddress.
        controlPort = cast(IPv4Address, relay.ports["control"].getHost()).port
        identityPath = options["identity"] or defaultIdentityPath()
        identity, _ = loadOrCreateIdentity(identityPath)
        config = buildConfig(
            str(site.getHost().port),
            relays=[f"127.0.0.1:{controlPort}"],
            # The sample site's port changes every run; the demo's URL should not.
            name=stableLabel(identity.id, "portal demo"),
            identityPath=identityPath,
            json=bool(options["json"]),
        )
        out.write(f"Sample site on http://127.0.0.1:{site.getHost().port}/ (Ctrl-C to stop)\n")
        reporter = Reporter(out, config.json, err, reactor, timestamps=True)
        tunnel = TunnelService(config, reactor, reporter, fatal)
        tunnel.startService()

        async def stop() -> None:
            # The tunnel first: stopping the relay under a live tunnel would tell it the relay is
            # leaving, and it would say it reconnects.
            await _maybeDeferred(tunnel.stopService)
            await _maybeDeferred(relay.stopService)
            await _maybeDeferred(site.stopListening)
            if not config.json:
                out.write("Stopped.\n")
                out.flush()

        reactor.addSystemEventTrigger("before", "shutdown", lambda: ensureDeferred(stop()))

    def started() -> None:
        d = ensureDeferred(start())

        def failed(failure: Any) -> None:
            err.write(f"portal: demo could not start: {failure.getErrorMessage()}\n")
            fatal("demo could not start")

        d.addErrback(failed)

    reactor.callWhenRunning(started)
    reactor.run()
    return exit[0]


def main(
    argv: Sequence[str] | None = None, out: TextIO = sys.stdout, err: TextIO = sys.stderr
) -> None:
    """
    Entry point of the C{portal} console script.

    @param argv: Arguments without the program name (default C{sys.argv[1:]}).
    """
    options = PortalOptions()
    try:
        options.parseOptions(list(sys.argv[1:] if argv is None else argv))
    except usage.UsageError as e:
        err.write(f"portal: error: {e}\n")
        sys.exit(USAGE_ERROR)
    command = options.subCommand
    sub = options.subOptions
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        if command == "version":
            out.write(f"portal {portal.__version__}\n")
            code = 0
        elif command == "identity":
            code = identityCommand(sub, out)
        elif command == "expose":
            code = exposeCommand(sub, out, err)
        elif command == "start":
            code = startCommand(sub, out, err)
        elif command == "relays":
            code = relaysCommand(sub, out, err)
        elif command == "pair":
            _startLogging(err, LogLevel.warn)
            code = runCommand(lambda reactor: pairCommand(reactor, sub, out, err), err)
        elif command == "terminals":
            _startLogging(err, LogLevel.warn)
            code = runCommand(lambda reactor: terminalsCommand(reactor, sub, out, err), err)
        elif command == "peers":
            code = peersCommand(sub, out, err)
        else:
            code = demoCommand(sub, out, err)
    except (IdentityError, CertificateError, ValueError) as e:
        err.write(f"portal: {e}\n")
        code = FAILURE
    sys.exit(code)
