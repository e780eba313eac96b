"""
End-to-end tests of UDP mode with real C{twistd portal-relay} and C{portal expose --udp} processes on
127.0.0.1.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from typing import Any
from urllib.parse import urlsplit

from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks, succeed
from twisted.internet.protocol import DatagramProtocol, Factory
from twisted.internet.threads import deferToThread
from twisted.names import dns, server
from twisted.names.common import ResolverBase
from twisted.protocols.wire import Echo
from twisted.trial.unittest import SkipTest, TestCase

from portal.forwarding.udpbuffers import enlargeBuffers
from tests.realprocesses import (
    WAIT,
    freePortRange,
    listenLocal,
    restartRelay,
    startExpose,
    startRelay,
    waitForLease,
)
from tests.test_e2e import _metrics
from tests.test_e2e_tcp import _exchange


class _Echo(DatagramProtocol):
    """
    Sends every datagram back to its sender.
    """

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        """
        Echo.
        """
        assert self.transport is not None
        self.transport.write(datagram, addr)


class _Addresses(ResolverBase):
    """
    Answers A queries for C{<n>.portal.test} with C{10.0.0.<n>}, and nothing else.
    """

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any = None) -> Any:
        """
        Answer one query.
        """
        label, _, rest = name.decode().partition(".")
        if type != dns.A or rest != "portal.test" or not label.isdigit():
            return succeed(([], [], []))
        record = dns.RRHeader(name, dns.A, cls, 60, dns.Record_A(f"10.0.0.{int(label)}"))
        return succeed(([record], [], []))


def _address(url: str) -> tuple[str, int]:
    """
    @return: The host and port of a C{udp://HOST:PORT} URL.
    """
    parts = urlsplit(url)
    assert parts.scheme == "udp" and parts.hostname and parts.port, url
    return parts.hostname, parts.port


def _roundTrip(port: int, payload: bytes) -> bytes:
    """
    Send one datagram to the public port and wait for one back.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(WAIT)
        s.sendto(payload, ("127.0.0.1", port))
        data, _ = s.recvfrom(65535)
    return data


def _burst(port: int, datagrams: list[bytes]) -> list[bytes]:
    """
    Send datagrams to the public port as fast as the socket takes them, then read as many back, or
    what came until a read waited L{WAIT} seconds.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        s.settimeout(WAIT)
        for datagram in datagrams:
            s.sendto(datagram, ("127.0.0.1", port))
        replies: list[bytes] = []
        try:
            while len(replies) < len(datagrams):
                replies.append(s.recvfrom(65535)[0])
        except TimeoutError:
            pass
        return replies


def _dig(dig: str, port: int, name: str) -> str:
    """
    Ask C{dig} for the A record of C{name} through the public port.
    """
    result = subprocess.run(
        [dig, "@127.0.0.1", "-p", str(port), "+short", "+tries=3", "+time=5", name, "A"],
        capture_output=True,
        timeout=WAIT,
        text=True,
    )
    return result.stdout.strip()


class UDPEndToEndTests(TestCase):
    """
    C{portal expose PORT --udp} through a relay started with C{--udp-ports}.
    """

    timeout = 120

    @inlineCallbacks
    def startPair(self, service: int, extra: tuple[str, ...] = ()) -> Any:
        """
        Start a relay with a fresh UDP port range and a UDP tunnel to the local C{service} port.

        @return: A L{Deferred} firing with (relay, tunnel, lease, public port, range, control port,
            state directory).
        """
        root = os.path.abspath(self.mktemp())
        low, high = freePortRange(4)
        state = os.path.join(root, "relay", "state")
        relay, self.publicPort, controlPort = yield startRelay(
            self, state, extra=["--udp-ports", f"{low}-{high}"]
        )
        self.relayCA = os.path.join(state, "tls", "ca.pem")
        home = os.path.join(root, "tunnel")
        os.makedirs(home)
        tunnel = startExpose(self, home, controlPort, [str(service), "--udp", *extra])
        lease = yield waitForLease(tunnel)
        host, port = _address(lease["url"])
        self.assertEqual(host, "localhost")
        self.assertTrue(low <= port <= high, (port, low, high))
        return relay, tunnel, lease, port, (low, high), controlPort, state

    def listenUDP(self, protocol: DatagramProtocol, buffers: bool = False) -> int:
        """
        Listen with C{protocol} on a loopback UDP port the OS picks, until the test ends.

        @param buffers: Ask for socket buffers that hold a burst (the default receive buffer holds
            about 90 datagrams, and this process also runs the test).
        """
        port = reactor.listenUDP(0, protocol, interface="127.0.0.1", maxPacketSize=65535)
        if buffers:
            enlargeBuffers(port)
        self.addCleanup(port.stopListening)
        return int(port.getHost().port)

    @inlineCallbacks
    def test_echoAndLargeDatagram(self) -> Any:
        """
        A datagram comes back from a UDP echo service, and 9,000- and 60,000-byte ones arrive whole
        and come back whole, as sealed UDP between relay and tunnel (the relay's counters say so). A
        65,507-byte one, the largest UDP payload, is too large to seal into one datagram: it goes over
        the control session, and also arrives whole.
        """
        service = self.listenUDP(_Echo())
        _, _, lease, port, *_ = yield self.startPair(service)
        self.assertEqual(lease["target"], f"127.0.0.1:{service}")
        reply = yield deferToThread(_roundTrip, port, b"hello portal")
        self.assertEqual(reply, b"hello portal")
        for size in (9000, 60000):
            payload = os.urandom(size)
            reply = yield deferToThread(_roundTrip, port, payload)
            self.assertEqual(reply, payload)
        metrics = yield deferToThread(_metrics, self.publicPort, self.relayCA)
        self.assertEqual(metrics["portal_relay_udp_to_tunnel_total"], 3)
        self.assertEqual(metrics["portal_relay_udp_from_tunnel_total"], 3)
        self.assertEqual(metrics["portal_relay_udp_over_control_total"], 0)
        payload = os.urandom(65507)
        reply = yield deferToThread(_roundTrip, port, payload)
        self.assertEqual(reply, payload)
        metrics = yield deferToThread(_metrics, self.publicPort, self.relayCA)
        self.assertEqual(metrics["portal_relay_udp_over_control_total"], 1)

    @inlineCallbacks
    def test_burstArrivesInOrder(self) -> Any:
        """
        A burst of 300 datagrams (relay and tunnel read it many at a time and send on in groups,
        L{portal.forwarding.udpbatch}), of two sizes and a few empty ones, comes back whole, each
        once and in order.
        """
        service = self.listenUDP(_Echo(), buffers=True)
        _, _, _, port, *_ = yield self.startPair(service)
        reply = yield deferToThread(_roundTrip, port, b"first")
        self.assertEqual(reply, b"first")
        burst = [
            b"" if i % 97 == 0 else i.to_bytes(4, "big") * (300 if i % 50 else 75)
            for i in range(1, 301)
        ]
        replies = yield deferToThread(_burst, port, burst)
        self.assertEqual(replies, burst)

    @inlineCallbacks
    def test_dnsTwoVisitors(self) -> Any:
        """
        A real DNS server (Twisted names) behind the tunnel answers C{dig} through the public port,
        and two visitors asking at once each get their own answer.
        """
        dig = shutil.which("dig")
        if dig is None:
            raise SkipTest("dig is not installed (.ci/run installs dnsutils)")
        factory = server.DNSServerFactory(clients=[_Addresses()])
        service = self.listenUDP(dns.DNSDatagramProtocol(factory))
        _, _, _, port, *_ = yield self.startPair(service)
        answers = yield gatherResults(
            [deferToThread(_dig, dig, port, f"{n}.portal.test") for n in (7, 42)]
        )
        self.assertEqual(answers, ["10.0.0.7", "10.0.0.42"])

    @inlineCallbacks
    def test_relayRestartKeepsPort(self) -> Any:
        """
        After a relay restart the tunnel gets the same public UDP port back, and it works.
        """
        service = self.listenUDP(_Echo())
        relay, tunnel, lease, port, (low, high), controlPort, state = yield self.startPair(service)
        again = yield restartRelay(
            self, relay, state, controlPort, ["--udp-ports", f"{low}-{high}"], tunnel
        )
        self.assertEqual(again["url"], lease["url"])
        reply = yield deferToThread(_roundTrip, port, b"again")
        self.assertEqual(reply, b"again")

    @inlineCallbacks
    def test_disabledOnRelay(self) -> Any:
        """
        A relay without C{--udp-ports} refuses UDP mode: the tunnel exits 1 with the reason.
        """
        root = os.path.abspath(self.mktemp())
        _, _, controlPort = yield startRelay(self, os.path.join(root, "relay", "state"))
        home = os.path.join(root, "tunnel")
        os.makedirs(home)
        tunnel = startExpose(self, home, controlPort, ["5353", "--udp"])
        code = yield tunnel.ended
        self.assertEqual(code, 1)
        self.assertIn("udp mode is disabled on this relay", tunnel.output())


class TCPAndUDPEndToEndTests(TestCase):
    """
    C{--tcp --udp}: one lease, one TARGET port number served over both, each with its own line.
    """

    timeout = 120

    @inlineCallbacks
    def test_bothOnOnePort(self) -> Any:
        """
        A service with a TCP and a UDP echo on the same port number answers through the relay's
        C{tcp://} and C{udp://} ports, which the tunnel printed as two lease events.
        """
        tcpPort = yield listenLocal(self, Factory.forProtocol(Echo))
        udp = reactor.listenUDP(tcpPort, _Echo(), interface="127.0.0.1", maxPacketSize=65535)
        self.addCleanup(udp.stopListening)
        root = os.path.abspath(self.mktemp())
        low, high = freePortRange(4)
        _, _, controlPort = yield startRelay(
            self,
            os.path.join(root, "relay", "state"),
            extra=["--tcp-ports", f"{low}-{high}", "--udp-ports", f"{low}-{high}"],
        )
        home = os.path.join(root, "tunnel")
        os.makedirs(home)
        tunnel = startExpose(self, home, controlPort, [f"127.0.0.1:{tcpPort}", "--tcp", "--udp"])
        first = yield waitForLease(tunnel)
        after = next(i for i, line in enumerate(tunnel.lines) if '"event": "lease"' in line)
        second = yield waitForLease(tunnel, after=after + 1)
        urls = {
            urlsplit(event["url"]).scheme: urlsplit(event["url"]).port for event in (first, second)
        }
        self.assertEqual(set(urls), {"tcp", "udp"})
        reply = yield deferToThread(_exchange, urls["tcp"], b"over tcp", 0, 8)
        self.assertEqual(reply, b"over tcp")
        reply = yield deferToThread(_roundTrip, urls["udp"], b"over udp")
        self.assertEqual(reply, b"over udp")
