"""
The client endpoint for a TCP host and port: straight to an IP literal, through the resolver for a
name.

Twisted's C{HostnameEndpoint} hands even an IP literal to the resolver, which runs C{getaddrinfo} on
a thread of the reactor's pool and builds its connection attempts in C{Deferred}s: on the path of
every new visitor (the tunnel's connection to its target, each replacement data session to the
relay) that is a thread hand-off, and contention for the GIL with that thread, that a direct
C{connectTCP} does not need (issue 16's profile: about a tenth of the tunnel's time per connection,
and as much again waiting for the GIL in OpenSSL calls).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint


def tcpEndpoint(reactor: Any, host: str, port: int, timeout: float) -> IStreamClientEndpoint:
    """
    A client endpoint to C{host}:C{port}.

    @param reactor: The reactor (TCP, time; name resolution for a hostname).
    @param host: An IPv4 or IPv6 literal (connected to directly), or a hostname (resolved by
        L{HostnameEndpoint}, which tries each address it gets).
    @param port: The TCP port.
    @param timeout: Seconds a connection attempt may take.
    @return: A L{TCP4ClientEndpoint} or L{TCP6ClientEndpoint} for an IP literal, else a
        L{HostnameEndpoint}.
    """
    if isIPAddress(host):
        return TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
    if isIPv6Address(host):
        return TCP6ClientEndpoint(reactor, host, port, timeout=timeout)
    return HostnameEndpoint(reactor, host, port, timeout=timeout)
