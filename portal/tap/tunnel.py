"""
C{twistd portal-tunnel}: the tunnel under twistd, with the same options as C{portal expose}, or the
tunnels of a C{portal.toml} with C{--config PATH [NAME...] | --all} as C{portal start}.
"""

from __future__ import annotations

import signal
import sys
from typing import Any

from twisted.application.service import IService, MultiService
from twisted.logger import Logger
from twisted.python import usage

from portal.cli.startoptions import StartOptions
from portal.forwarding import leanpoll
from portal.forwarding.heap import freezeStartupHeap
from portal.tunnel.companions import startCompanions
from portal.tunnel.config import DEFAULT_LOG_LEVEL
from portal.tunnel.report import Reporter
from portal.tunnel.service import TunnelService

_log = Logger()


class Options(StartOptions):
    """
    Options of C{twistd portal-tunnel}: C{TARGET} and those of C{portal expose}, or C{--config PATH
    [NAME...] | --all} and those of C{portal start}.
    """

    synopsis = (
        "TARGET [options of portal expose] | --config PATH [NAME...] | --all [options of portal "
        "expose, overriding the file]"
    )
    targetWithoutConfig = True

    def postOptions(self) -> None:
        """
        Build the configurations; refuse C{--log-level} and C{--log-format}, as twistd sets up
        logging itself.
        """
        super().postOptions()
        if any(c.logLevel != DEFAULT_LOG_LEVEL for c in self.tunnelConfigs.values()):
            raise usage.UsageError(
                "--log-level is for portal expose and portal start; under twistd, its own "
                "logging options (--logger, --logfile) apply"
            )
        if any(c.logFormat != "text" for c in self.tunnelConfigs.values()):
            raise usage.UsageError(
                "--log-format: under twistd, use twistd --logger portal.cli.jsonlog.observer"
            )


def makeService(options: Options, reactor: Any = None) -> IService:
    """
    Build the tunnel service (a L{TunnelService}, or a L{MultiService} of them for several tunnels
    of a configuration file) for C{twistd}; an unrecoverable error stops the reactor.

    @param options: Parsed options.
    @param reactor: The reactor (default the global one, as under twistd).
    @return: The service.
    """
    if reactor is None:
        from twisted.internet import reactor

    def fatal(message: str) -> None:
        _log.critical("portal-tunnel stopping: {message}", message=message)
        if reactor.running:
            reactor.stop()

    tunnels = [
        TunnelService(
            config,
            reactor,
            Reporter(sys.stdout, config.json, clock=reactor, timestamps=True),
            fatal,
        )
        for config in options.tunnelConfigs.values()
    ]
    reactor.callWhenRunning(stopCleanlyOnSignals, reactor)
    # Once started, the process's heap can leave the garbage collector's scans.
    reactor.callWhenRunning(freezeStartupHeap)
    # Events skip Twisted's legacy log context (the tunnel logs with twisted.logger only).
    leanpoll.install(reactor)
    for tunnel in tunnels:
        startCompanions(reactor, tunnel)
    if len(tunnels) == 1:
        return tunnels[0]
    parent = MultiService()
    for tunnel in tunnels:
        tunnel.setServiceParent(parent)
    return parent


def stopCleanlyOnSignals(reactor: Any) -> None:
    """
    Make SIGTERM and SIGINT a clean stop with exit status 0, as for C{portal expose}: twistd would
    otherwise kill itself with the same signal once stopped (exit status 143 or 130), which a
    supervisor reads as a failure. Called once the reactor runs, after it installed its own
    handlers.

    @param reactor: The running reactor.
    """

    def stop(number: int, frame: Any) -> None:
        _log.info("portal-tunnel stopping on signal {number}", number=number)
        reactor.callFromThread(reactor.stop)

    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, stop)
