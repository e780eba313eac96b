"""
End to end: raw TCP leases on a relay with C{--workers 2} (docs/cluster.md). Both workers bind the
lease's public port (C{SO_REUSEPORT}), the kernel spreads its visitors over them, and the worker
without the tunnel hands each of its visitors' sockets to the one with it.
"""

from __future__ import annotations

import re
import socket
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.protocol import Factory
from twisted.internet.threads import deferToThread
from twisted.protocols.wire import Echo
from twisted.trial.unittest import TestCase

from tests.etcdprocess import startWorkerRelay
from tests.realprocesses import (
    freePortRange,
    homeDir,
    listenLocal,
    pollUntil,
    startExpose,
    waitForLease,
)
from tests.test_e2e_cluster import _tcpPort, echoAt

#: Visitors in a row on the lease's port: enough that the kernel gives both workers some.
VISITS = 40

#: The relay's cap on connections open at once from one source address.
PER_SOURCE = 4


def holdOpen(port: int, count: int) -> list[socket.socket]:
    """
    Open C{count} connections to C{port} on 127.0.0.1, each echoed once (so each is served).

    @return: The open connections; the caller closes them.
    @raise AssertionError: When one is not echoed.
    """
    held: list[socket.socket] = []
    try:
        for index in range(count):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            held.append(s)
            s.settimeout(5)
            line = f"held {index}\n".encode()
            s.sendall(line)
            reply = b""
            while len(reply) < len(line):
                chunk = s.recv(len(line) - len(reply))
                if not chunk:
                    raise AssertionError(f"held connection {index} closed: {reply!r}")
                reply += chunk
    except BaseException:
        for s in held:
            s.close()
        raise
    return held


class WorkersRawTCPTests(TestCase):
    """
    C{--workers 2 --tcp-ports LO-HI}: a raw TCP echo tunnel served by both workers.
    """

    timeout = 180

    @inlineCallbacks
    def test_rawPortServedByBothWorkers(self) -> Any:
        """
        Many new connections in a row to the tunnel's public port are all echoed; the worker
        without the tunnel hands some of them to the one with it (by their socket, not over a
        member link), which adopts them; the per-source connection cap still counts the visitors
        handed over, and frees their places when they close.
        """
        low, high = freePortRange(2)
        relay, _, control, _ = yield startWorkerRelay(
            self,
            [
                "--tcp-ports",
                f"{low}-{high}",
                "--max-connections-per-source",
                str(PER_SOURCE),
            ],
        )
        echo = yield listenLocal(self, Factory.forProtocol(Echo))
        tunnel = startExpose(self, homeDir(self, "alice"), control, [f"127.0.0.1:{echo}", "--tcp"])
        lease = yield waitForLease(tunnel)
        port = _tcpPort(lease["url"])
        self.assertTrue(low <= port <= high, (port, low, high))
        # The other worker listens on the port too once the cluster's watch reaches it.
        yield relay.waitFor(rf"forwarding TCP port {port} to the member holding it")
        handed = rf"handed a raw TCP visitor of port {port} to worker (\S+)"
        adopted = f"adopted a raw TCP visitor of port {port} from another worker"

        for index in range(VISITS):
            line = f"visit {index}\n".encode()
            reply = yield deferToThread(echoAt, "127.0.0.1", port, line)
            self.assertEqual(reply, line, f"visit {index}")
        handedOff = yield pollUntil(
            lambda: [m for m in map(re.compile(handed).search, relay.lines) if m],
            "a visitor handed to the holding worker",
            timeout=10,
        )
        # Both workers accepted some: the one without the tunnel handed its visitors over, and the
        # one with it served the rest itself.
        self.assertLess(len(handedOff), VISITS, relay.output())
        self.assertEqual({m.group(1) for m in handedOff}, {handedOff[0].group(1)})
        yield pollUntil(
            lambda: relay.output().count(adopted) == len(handedOff),
            "every visitor handed over adopted",
            timeout=10,
        )
        self.assertNotIn("forwarded a visitor for", relay.output())

        # The per-source cap counts the visitors handed over: with PER_SOURCE open, every new one
        # is refused, whichever worker the kernel gives it to.
        held = yield deferToThread(holdOpen, port, PER_SOURCE)
        try:
            before = len([line for line in relay.lines if re.search(handed, line)])
            for index in range(10):
                reply = yield deferToThread(echoAt, "127.0.0.1", port, b"over the cap\n")
                self.assertIsNone(reply, f"visitor {index} over the cap was served")
            yield relay.waitFor(
                r"refused a connection from 127\.0\.0\.1 on the tcp listener: it has "
                rf"{PER_SOURCE} open"
            )
            # Some of those refused were accepted by the worker without the tunnel, handed over,
            # and refused by the holder's cap.
            yield pollUntil(
                lambda: len([line for line in relay.lines if re.search(handed, line)]) > before,
                "a visitor over the cap handed over",
                timeout=10,
            )
        finally:
            for s in held:
                s.close()
        # Their places are free again once they close.
        reply = yield pollUntil(
            lambda: deferToThread(echoAt, "127.0.0.1", port, b"again\n"),
            "a visitor served once the held ones closed",
            timeout=20,
        )
        self.assertEqual(reply, b"again\n")
        yield relay.stop()
