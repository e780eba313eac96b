"""
Twisted's TLS wrapper with its per-connection set-up done once.

C{TLSMemoryBIOProtocol.makeConnection} declares that the wrapper provides what its transport
provides with one C{directlyProvides} call per interface (each replacing the one before) and then
once more for all of them, in C{ProtocolWrapper.makeConnection}, which also connects and registers
the protocol a second time: a dozen zope declarations, each normalising its interface list, for
every visitor a tunnel serves (issue 16's profile: 2-4% of the tunnel's own work per new TLS
visitor). L{LeanTLSTransport} ends in the same state with one declaration, one connection and
one registration.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.protocol import Protocol
from twisted.protocols.tls import BufferingTLSTransport
from zope.interface import directlyProvides, providedBy


class LeanTLSTransport(BufferingTLSTransport):
    """
    L{BufferingTLSTransport} (what L{twisted.protocols.tls.TLSMemoryBIOFactory} builds) whose
    C{makeConnection} declares the transport's interfaces once, and connects and registers itself
    once.
    """

    def makeConnection(self, transport: Any) -> None:
        """
        Create the TLS connection, provide what C{transport} provides, connect the wrapped
        protocol (unless told not to) and start the handshake, as
        L{twisted.protocols.tls.TLSMemoryBIOProtocol.makeConnection} does.

        @param transport: The transport to wrap.
        """
        self._tlsConnection = self.factory._creatorCallable(self)
        self._appSendBuffer = []
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        if self._connectWrapped:
            self.wrappedProtocol.makeConnection(self)
        self._checkHandshakeStatus()
