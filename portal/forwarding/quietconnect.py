"""
Connecting a protocol through an endpoint without log noise: Twisted's C{connectProtocol} uses a
factory that logs C{Starting factory <...OneShotFactory object at 0x...>} and C{Stopping factory}
lines for every connection, which a tunnel opens for each visitor and each data session.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProtocol, IStreamClientEndpoint
from twisted.internet.protocol import Factory


class _QuietFactory(Factory):
    """
    A factory that hands out one given protocol and logs nothing when started or stopped.
    """

    noisy = False

    def __init__(self, protocol: IProtocol) -> None:
        """
        @param protocol: The protocol to connect.
        """
        self._protocol: IProtocol | None = protocol

    def buildProtocol(self, addr: Any) -> Any:
        """
        @return: The protocol given (once: the factory lets go of it, as the connector keeps the
            factory for the connection's life).
        """
        protocol, self._protocol = self._protocol, None
        return protocol


def connectQuietly(endpoint: IStreamClientEndpoint, protocol: IProtocol) -> Deferred[Any]:
    """
    Like C{twisted.internet.endpoints.connectProtocol}, without the factory's log lines.

    @param endpoint: Where to connect.
    @param protocol: The protocol to connect.
    @return: A L{Deferred} firing with C{protocol} once connected.
    """
    connecting: Deferred[Any] = endpoint.connect(_QuietFactory(protocol))
    return connecting
