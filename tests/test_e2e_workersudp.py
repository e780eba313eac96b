"""
End to end: UDP leases on a relay with C{--workers 2} (docs/cluster.md). Both workers bind the
lease's public UDP port (C{SO_REUSEPORT}), the kernel spreads its visitors over them, and the worker
without the tunnel forwards its visitors' datagrams over a UDP member link to the one with it. The
tunnel's own sealed datagrams reach the worker holding its control session, whatever port they come
from. And the workers do not outlive the first one, even killed with SIGKILL.
"""

from __future__ import annotations

import os
import signal
import socket
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.etcdprocess import startWorkerRelay
from tests.realprocesses import (
    freePortRange,
    homeDir,
    pollUntil,
    startExpose,
    waitForLease,
)
from tests.test_e2e import _metrics
from tests.test_e2e_cluster import _tcpPort, datagramFrom
from tests.test_e2e_udp import _Echo

#: Visitors (source ports) on the lease's port: enough that the kernel gives both workers some.
VISITORS = 40

#: Malformed datagrams sent to the relay's tunnel-facing UDP socket, each from its own port.
STRAYS = 20


def sendStrays(port: int, count: int) -> None:
    """
    Send C{count} datagrams too short to be sealed ones to 127.0.0.1:C{port}, each from a new port.
    """
    for _ in range(count):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            s.sendto(b"x", ("127.0.0.1", port))


def gone(pid: int) -> bool:
    """
    @return: Whether process C{pid} has ended (it no longer exists, or is a zombie nobody reaped).
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


class WorkersUDPTests(TestCase):
    """
    C{--workers 2 --udp-ports LO-HI}: a UDP echo tunnel served by both workers.
    """

    timeout = 180

    @inlineCallbacks
    def test_udpPortServedByBothWorkers(self) -> Any:
        """
        Datagrams from many source ports to the tunnel's public UDP port are all echoed, from the
        port they were sent to; the worker without the tunnel forwards its share over a UDP member
        link (its C{udp_forwarded} counter), the one with it gets them all to the tunnel as sealed
        UDP (none over the control session). Datagrams to the tunnel-facing UDP socket from
        127.0.0.1, whatever their source port, all reach the worker holding the control sessions
        from 127.0.0.1. When the first worker is killed with SIGKILL, the other ends too.
        """
        low, high = freePortRange(2)
        relay, public, control, state = yield startWorkerRelay(
            self,
            [
                "--udp-ports",
                f"{low}-{high}",
            ],
        )
        echo = reactor.listenUDP(0, _Echo(), interface="127.0.0.1", maxPacketSize=65535)
        self.addCleanup(echo.stopListening)
        tunnel = startExpose(
            self, homeDir(self, "alice"), control, [f"127.0.0.1:{echo.getHost().port}", "--udp"]
        )
        lease = yield waitForLease(tunnel)
        port = _tcpPort(lease["url"], "udp")
        self.assertTrue(low <= port <= high, (port, low, high))
        # The other worker binds the port too once the cluster's watch reaches it.
        yield relay.waitFor(rf"forwarding UDP port {port} to the member holding it")

        for index in range(VISITORS):
            payload = f"visitor {index}".encode()
            answer = yield deferToThread(datagramFrom, "127.0.0.1", ("127.0.0.1", port), payload)
            self.assertEqual(
                answer, (payload, ("127.0.0.1", port)), f"visitor {index}; relay:\n{relay.output()}"
            )
        self.assertIn(f"opening a UDP link for port {port} to member", relay.output())

        yield deferToThread(sendStrays, control, STRAYS)
        cafiles = [
            os.path.join(state, "tls", "ca.pem"),
            os.path.join(state, "worker-1", "tls", "ca.pem"),
        ]
        views: dict[str, dict[str, float]] = {}

        def bothWorkers() -> Any:
            def seen(metrics: dict[str, float]) -> bool:
                if metrics.get("portal_relay_udp_forwarded_total", 0) > 0:
                    views["forwarding"] = metrics
                elif metrics.get("portal_relay_udp_to_tunnel_total", 0) > 0:
                    views["holding"] = metrics
                return len(views) == 2 and views["holding"].get(
                    "portal_relay_udp_dropped_total", 0
                ) + views["forwarding"].get("portal_relay_udp_dropped_total", 0) == float(STRAYS)

            return deferToThread(_metrics, public, *cafiles).addCallback(seen)

        yield pollUntil(bothWorkers, "both workers' metrics, every stray counted", timeout=30)
        holding, forwarding = views["holding"], views["forwarding"]
        # Both workers got some of the visitors: the one without the tunnel forwarded its share.
        self.assertLess(forwarding["portal_relay_udp_forwarded_total"], VISITORS)
        self.assertEqual(
            forwarding["portal_relay_udp_forward_replies_total"],
            forwarding["portal_relay_udp_forwarded_total"],
        )
        # The holder reached the tunnel over UDP, and the tunnel answered over UDP: its keepalives
        # reach the worker holding its control session.
        self.assertEqual(holding["portal_relay_udp_to_tunnel_total"], VISITORS)
        self.assertEqual(holding["portal_relay_udp_from_tunnel_total"], VISITORS)
        self.assertEqual(holding["portal_relay_udp_over_control_total"], 0)
        # Every stray from 127.0.0.1 reached the worker holding 127.0.0.1's control sessions,
        # whatever its source port.
        self.assertEqual(holding["portal_relay_udp_dropped_total"], STRAYS)
        self.assertEqual(forwarding.get("portal_relay_udp_dropped_total", 0), 0)
        self.assertNotIn("unknown session", relay.output())
        self.assertNotIn("seems blocked", tunnel.output())

        # SIGKILL the first worker: the other ends too (SIGTERM from the kernel), within seconds.
        started = yield relay.waitFor(r"started worker 1 \(pid (\d+)\)")
        worker = int(started.group(1))
        self.assertFalse(gone(worker))
        assert relay.transport is not None
        os.kill(relay.transport.pid, signal.SIGKILL)
        yield pollUntil(lambda: gone(worker), "worker 1 ended", timeout=15)
        yield relay.ended
