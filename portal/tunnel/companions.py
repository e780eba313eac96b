"""
What runs beside a tunnel started from the command line (C{portal expose}, C{portal start},
C{twistd portal-tunnel}): the startup check of its targets, the C{--give-up-after} watch, the
C{--metrics} listener, and in routed HTTP mode the request inspector.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred

from portal.tunnel.giveup import giveUpUnlessReached
from portal.tunnel.inspector import startInspector
from portal.tunnel.metrics import addMetrics
from portal.tunnel.service import TunnelService
from portal.tunnel.targetcheck import reportTargets


def startCompanions(reactor: Any, tunnel: TunnelService) -> None:
    """
    Start, once the reactor runs, what runs beside C{tunnel}.

    @param reactor: The reactor.
    @param tunnel: The tunnel.
    """
    config = tunnel.config
    if config.metrics is not None:
        # A child of the tunnel: it listens while the tunnel runs.
        addMetrics(tunnel, config.metrics)
    reactor.callWhenRunning(reportTargets, reactor, config, tunnel.reporter)
    reactor.callWhenRunning(giveUpUnlessReached, reactor, tunnel)
    proxy = getattr(tunnel, "httpProxy", None)
    if config.inspect is not None and proxy is not None:
        reactor.callWhenRunning(
            lambda: Deferred.fromCoroutine(
                startInspector(
                    reactor, proxy, tunnel.reporter, config.inspect, not config.inspectFixed
                )
            )
        )
