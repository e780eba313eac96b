"""
A tunnel for measuring the relay alone: it holds a real lease through the real control protocol
(L{portal.tunnel.service.TunnelService}), but serves each stream data session on a blocking thread with
the benchmark sink (L{benchmarks.workload.serve}), which terminates TLS exactly as it does on the direct
path. So the difference between the direct path and this one is the relay hop.

C{python -m benchmarks.benchtunnel --relay HOST:PORT --identity FILE --name LABEL --cert F --key F}
prints the tunnel's JSON events (one is the C{lease} event with the URL).
"""

from __future__ import annotations

import socket
import ssl
import sys
import threading
from typing import Any

from twisted.internet import reactor
from twisted.python import usage

from benchmarks.workload import recvExact, serve, serverContext
from portal.tunnel.config import buildConfig
from portal.tunnel.report import Reporter
from portal.tunnel.service import TunnelService
from portal.wire.attach import MAC_LENGTH, MAGIC, NONCE_LENGTH, attachProof, decodeStreamHeader


class BlockingDataPool:
    """
    Keeps C{size} data sessions attached, each waiting on its own thread; a stream is served on that
    thread by the sink, and a replacement session is opened at once.
    """

    def __init__(self, host: str, port: int, size: int, context: ssl.SSLContext) -> None:
        self._address = (host, port)
        self._size = size
        self._context = context
        self._session: tuple[bytes, bytes] | None = None
        self._generation = 0
        threading.stack_size(256 * 1024)

    def start(self, sessionId: bytes, key: bytes, sealSecret: bytes | None = None) -> None:
        """
        A control session is up: open the pool's data sessions (stream mode only, so C{sealSecret},
        raw TCP mode's secret, is always L{None}).
        """
        self._session = (sessionId, key)
        self._generation += 1
        for _ in range(self._size):
            self._spawn()

    def stop(self) -> None:
        """
        The control session ended: open no more.
        """
        self._session = None
        self._generation += 1

    def want(self, count: int) -> None:
        """
        The relay has visitors waiting: open more.
        """
        for _ in range(min(count, 64)):
            self._spawn()

    def _spawn(self) -> None:
        """
        Open one data session on a new thread.
        """
        if self._session is not None:
            threading.Thread(
                target=self._run, args=(self._session, self._generation), daemon=True
            ).start()

    def _run(self, session: tuple[bytes, bytes], generation: int) -> None:
        """
        Attach, wait for a stream header, then serve the stream with the sink.
        """
        sessionId, key = session
        try:
            sock = socket.create_connection(self._address, timeout=30)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(MAGIC)
            nonce = recvExact(sock, NONCE_LENGTH)
            sock.sendall(attachProof(key, nonce, sessionId))
            if recvExact(sock, 1) != b"\x01":
                sock.close()
                return
            sock.settimeout(None)
            length = recvExact(sock, 2)
            rest = recvExact(sock, int.from_bytes(length, "big") + MAC_LENGTH)
            if decodeStreamHeader(key, nonce, length + rest) is None:
                sock.close()
                return
        except (OSError, ConnectionError):
            return
        serve(sock, self._context, onHandshake=lambda: self._replace(generation))

    def _replace(self, generation: int) -> None:
        """
        Open a replacement data session, once the stream's handshake is done (off the measured path;
        the real tunnel also replaces sessions asynchronously).
        """
        if generation == self._generation:
            reactor.callFromThread(self._spawn)


class Options(usage.Options):
    """
    Options of the bench tunnel.
    """

    optParameters = [
        ["relay", None, None, "Relay control address HOST:PORT."],
        ["identity", None, None, "Identity file."],
        ["name", None, "bench", "Lease label."],
        ["cert", None, None, "Sink certificate (PEM)."],
        ["key", None, None, "Sink key (PEM)."],
        ["pool-size", None, 8, "Idle data sessions.", int],
    ]


def main(argv: list[str]) -> None:
    """
    Run the bench tunnel until killed.
    """
    options = Options()
    options.parseOptions(argv)
    config = buildConfig(
        "1",
        relays=[options["relay"]],
        name=options["name"],
        identityPath=options["identity"],
        json=True,
    )

    def fatal(message: str) -> None:
        print(f"fatal: {message}", flush=True)
        reactor.stop()

    tunnel = TunnelService(config, reactor, Reporter(sys.stdout, True), fatal)
    context = serverContext(options["cert"], options["key"])
    for link in tunnel.links:
        pool: Any = BlockingDataPool(
            link.relay.host, link.relay.port, options["pool-size"], context
        )
        link.pool = pool
    reactor.callWhenRunning(tunnel.startService)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1:])
