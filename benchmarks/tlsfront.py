"""
The full-path baseline: a Twisted TLS server in front of a plain TCP service, built from the tunnel's own
stream handler (L{portal.tunnel.stream.StreamHandler}), so that it differs from the Portal path only by
the relay and the data session.

C{python -m benchmarks.tlsfront TARGET_PORT CERT KEY} prints C{listening PORT}.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory

from portal.trust.localca import SNIServerConnectionCreator, loadKeyPair
from portal.tunnel.config import Target
from portal.tunnel.stream import StreamHandler
from portal.wire.attach import StreamHeader


class _Front(Factory):
    """
    Serves each connection as the tunnel serves a stream.
    """

    def __init__(self, handler: StreamHandler) -> None:
        self._handler = handler

    def buildProtocol(self, addr: Any) -> Any:
        """
        @return: The tunnel's TLS-terminating stream protocol.
        """
        return self._handler(StreamHeader(0, "", str(getattr(addr, "host", "")), 0))


def main(argv: list[str]) -> None:
    """
    Run until killed.
    """
    targetPort, certFile, keyFile = int(argv[0]), argv[1], argv[2]
    pair = loadKeyPair(certFile, keyFile)
    creator = SNIServerConnectionCreator(lambda hostname: pair, alpn=(b"http/1.1",))
    handler = StreamHandler(reactor, Target("127.0.0.1", targetPort), creator)

    def listen() -> None:
        d = serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(_Front(handler))
        d.addCallback(lambda port: print(f"listening {port.getHost().port}", flush=True))

    reactor.callWhenRunning(listen)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1:])
