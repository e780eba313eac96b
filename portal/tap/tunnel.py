"""
C{twistd portal-tunnel}: the tunnel under twistd, with the same options as C{portal expose}.
"""

from __future__ import annotations

import sys

from twisted.logger import Logger

from portal.cli.exposeoptions import TunnelOptions
from portal.tunnel.report import Reporter
from portal.tunnel.service import TunnelService

_log = Logger()


class Options(TunnelOptions):
    """
    Options of C{twistd portal-tunnel}: those of C{portal expose}.
    """


def makeService(options: Options) -> TunnelService:
    """
    Build the tunnel service for C{twistd}; an unrecoverable error stops the reactor.

    @param options: Parsed options.
    @return: The tunnel service.
    """
    from twisted.internet import reactor

    def fatal(message: str) -> None:
        _log.critical("portal-tunnel stopping: {message}", message=message)
        if reactor.running:
            reactor.stop()

    config = options.tunnelConfig
    return TunnelService(config, reactor, Reporter(sys.stdout, config.json, clock=reactor), fatal)
