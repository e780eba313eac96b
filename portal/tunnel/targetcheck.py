"""
The startup check of a tunnel's local targets: a TCP connection to each (the stream or raw TCP target,
every route's upstream), so that a service that is not listening is reported when the tunnel starts
rather than only as visitors' closed connections. A warning, never a reason to stop: the service may
come up later.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.protocol import Protocol

from portal.forwarding.quietconnect import connectQuietly
from portal.tunnel.config import TunnelConfig
from portal.tunnel.report import Reporter

#: Seconds the check waits for each target to accept.
CHECK_TIMEOUT = 3.0


def targetsOf(config: TunnelConfig) -> list[tuple[str, int]]:
    """
    @return: The TCP services a tunnel forwards to, each once, in the order configured (UDP
        services are not checked: nothing answers a UDP probe reliably).
    """
    found: list[tuple[str, int]] = []
    if config.target is not None:
        found.append((config.target.host, config.target.port))
    routes = [*config.routes, *(route for app in config.apps for route in app.routes)]
    found.extend((route.upstream.host, route.upstream.port) for route in routes)
    return list(dict.fromkeys(found))


async def _problem(reactor: Any, host: str, port: int) -> str | None:
    """
    @return: Why C{host:port} does not accept a TCP connection, or L{None} when it does.
    """
    endpoint = HostnameEndpoint(reactor, host, port, timeout=CHECK_TIMEOUT)
    connecting = connectQuietly(endpoint, Protocol())
    connecting.addTimeout(CHECK_TIMEOUT, reactor)
    try:
        protocol = await connecting
    except Exception as e:
        return str(e).rstrip(".") or type(e).__name__
    if protocol.transport is not None:
        protocol.transport.loseConnection()
    return None


def checkTargets(reactor: Any, config: TunnelConfig) -> Deferred[list[str]]:
    """
    Try a connection to each of the tunnel's TCP targets.

    @param reactor: The reactor (TCP, time and name resolution).
    @param config: The tunnel's configuration.
    @return: A L{Deferred} firing with one sentence per target that did not accept.
    """
    targets = targetsOf(config)

    async def one(host: str, port: int) -> str | None:
        problem = await _problem(reactor, host, port)
        if problem is None:
            return None
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return (
            f"the local service {where} does not accept connections ({problem}); visitors' "
            "connections to it will be closed until it does"
        )

    checks = [Deferred.fromCoroutine(one(host, port)) for host, port in targets]
    return gatherResults(checks).addCallback(lambda found: [p for p in found if p])


def reportTargets(reactor: Any, config: TunnelConfig, reporter: Reporter) -> Deferred[None]:
    """
    Check the tunnel's targets and report each one that does not accept as a C{target-down}
    event (standard error in text mode).

    @return: A L{Deferred} firing once every check has ended.
    """

    def report(problems: list[str]) -> None:
        for problem in problems:
            reporter.state("target-down", "", problem)

    return checkTargets(reactor, config).addCallback(report)
