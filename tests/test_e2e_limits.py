"""
End-to-end tests of the relay's limits with real C{twistd portal-relay} and C{portal expose}
processes on 127.0.0.1: a flood of idle connections from one source address (127.0.0.2) to every
listener, a UDP flood from many ports of one address, and bandwidth caps measured on both
forwarding paths. Loopback addresses are separate sources: each client socket is bound to one.
"""

from __future__ import annotations

import os
import resource
import socket
import ssl
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.internet.threads import deferToThread
from twisted.protocols.wire import Echo
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.server import Site

from tests.realprocesses import (
    WAIT,
    freePortRange,
    homeDir,
    listenLocal,
    startExpose,
    startRelay,
    tlsRequest,
    waitForLease,
)
from tests.test_e2e import _metrics, _Page
from tests.test_relay_public import clientHello

#: The flooding source and the visitor's source.
ATTACKER, VISITOR = "127.0.0.2", "127.0.0.3"
#: Idle connections the attacker opens to each listener.
FLOOD = 1000
#: Bytes the bandwidth tests download, and the cap they set (bytes per second).
DOWNLOAD, CAP = 5 * 1024 * 1024, 1024 * 1024
#: Bytes received before the rate is measured (past the buckets' burst and the socket buffers'
#: first fill).
WARMUP = 512 * 1024


def _needDescriptors(count: int) -> None:
    """
    Raise this process's soft descriptor limit to hold C{count} more sockets, or skip.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = count + 1024
    if soft >= wanted:
        return
    if hard != resource.RLIM_INFINITY and hard < wanted:
        raise SkipTest(f"the descriptor limit ({hard}) is too low for {count} sockets")
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def _openIdle(port: int, count: int, first: bytes = b"") -> list[socket.socket]:
    """
    Open C{count} connections from L{ATTACKER} to 127.0.0.1:C{port}, send C{first} on each (if
    any), and keep them open, sending nothing more.

    @return: The sockets (the relay may already have closed some).
    """
    held = []
    for _ in range(count):
        s = socket.socket()
        held.append(s)
        s.settimeout(WAIT)
        s.bind((ATTACKER, 0))
        s.connect(("127.0.0.1", port))
        if first:
            try:
                s.sendall(first)
            except OSError:
                pass  # Refused over the cap and already closed.
    return held


def _httpGet(port: int, path: str, source: str) -> bytes:
    """
    GET C{path} over plain HTTP from C{source}.

    @return: The whole response.
    """
    with socket.create_connection(("127.0.0.1", port), WAIT, (source, 0)) as s:
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode())
        return _readAll(s)


def _readAll(s: socket.socket) -> bytes:
    """
    @return: Everything read from C{s} until the far end closes.
    """
    chunks = []
    while chunk := s.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _echo(port: int, data: bytes, source: str) -> bytes:
    """
    Send C{data} from C{source} to an echo service at 127.0.0.1:C{port} and read it back.
    """
    with socket.create_connection(("127.0.0.1", port), WAIT, (source, 0)) as s:
        s.sendall(data)
        received = b""
        while len(received) < len(data):
            chunk = s.recv(65536)
            if not chunk:
                break
            received += chunk
        return received


def _hostPort(url: str) -> tuple[str, int]:
    """
    @return: The host and port of a lease URL.
    """
    parts = urlsplit(url)
    assert parts.hostname and parts.port, url
    return parts.hostname, parts.port


def _rate(chunks: Iterator[bytes]) -> tuple[int, float]:
    """
    Read a download to its end and measure its steady rate.

    @param chunks: The download's chunks.
    @return: The bytes read, and the rate (bytes per second) from the moment L{WARMUP} bytes had
        arrived to the end.
    """
    total = 0
    started = startedAt = 0.0
    for chunk in chunks:
        total += len(chunk)
        if not startedAt and total >= WARMUP:
            started, startedAt = total, time.monotonic()
    return total, (total - started) / (time.monotonic() - startedAt)


def _recvAll(s: Any) -> Iterator[bytes]:
    """
    @return: The chunks read from C{s} until the far end closes.
    """
    while chunk := s.recv(65536):
        yield chunk


def _downloadTLS(url: str, cafile: str) -> tuple[int, float]:
    """
    Connect to a stream lease over TLS and read what the service sends until it closes.

    @return: See L{_rate}.
    """
    host, port = _hostPort(url)
    context = ssl.create_default_context(cafile=cafile)
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as raw:
        with context.wrap_socket(raw, server_hostname=host) as tls:
            tls.sendall(b"go")
            return _rate(_recvAll(tls))


def _downloadTCP(url: str) -> tuple[int, float]:
    """
    Connect to a raw TCP lease and read what the service sends until it closes.

    @return: See L{_rate}.
    """
    with socket.create_connection(_hostPort(url), timeout=WAIT) as s:
        s.sendall(b"go")
        return _rate(_recvAll(s))


class _Sender(Protocol):
    """
    Sends L{DOWNLOAD} bytes on the first bytes received, then closes.
    """

    def dataReceived(self, data: bytes) -> None:
        """
        Send the download once.
        """
        assert self.transport is not None
        if not getattr(self, "_sent", False):
            self._sent = True
            self.transport.write(b"\0" * DOWNLOAD)
            self.transport.loseConnection()


class _UDPEcho(DatagramProtocol):
    """
    Sends every datagram back.
    """

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        """
        Echo.
        """
        assert self.transport is not None
        self.transport.write(datagram, addr)


def _udpFlood(port: int, count: int) -> list[socket.socket]:
    """
    Send one byte to 127.0.0.1:C{port} from each of C{count} sockets of L{ATTACKER} (each its own
    port), keeping them open so that no port is reused.

    @return: The sockets.
    """
    held = []
    for _ in range(count):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        held.append(s)
        s.bind((ATTACKER, 0))
        s.sendto(b"x", ("127.0.0.1", port))
    return held


def _answered(sockets: list[socket.socket]) -> int:
    """
    Wait a second for echoes, then count the sockets that got one.
    """
    time.sleep(1.0)
    answered = 0
    for s in sockets:
        s.setblocking(False)
        try:
            s.recv(16)
        except BlockingIOError:
            continue
        answered += 1
    return answered


def _udpRoundTrip(port: int, payload: bytes, source: str) -> bytes:
    """
    Send a datagram from C{source} and wait for one back (retrying, since UDP may drop).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((source, 0))
        s.settimeout(2)
        for _ in range(int(WAIT / 2)):
            s.sendto(payload, ("127.0.0.1", port))
            try:
                return s.recvfrom(65535)[0]
            except TimeoutError:
                continue
    raise TimeoutError(f"no answer from UDP port {port}")


def _closeAll(sockets: list[socket.socket]) -> None:
    """
    Close sockets.
    """
    for s in sockets:
        s.close()


class ConnectionFloodTests(TestCase):
    """
    1,000 idle connections from one address to each of the relay's listeners do not stop a visitor
    from another address.
    """

    timeout = 300

    @inlineCallbacks
    def test_idleFloodOnEveryListener(self) -> Any:
        """
        With 127.0.0.2 holding (or trying to hold) 1,000 idle connections to the public port (half
        of them stalled after a ClientHello for the relay's own hostname), the HTTP listener, a raw
        TCP lease port and the control port, a visitor from 127.0.0.3 still gets the stream
        lease's page, the relay's own pages over TLS and over HTTP, and its echo over the raw TCP
        port; a new tunnel still registers. The relay refused the excess per source (counted in
        /metrics) and holds at most the per-source cap on each visitor listener (the tunnels' own
        attached data sessions on the control port do not count against their address).
        """
        _needDescriptors(4 * FLOOD + 100)
        state = os.path.join(homeDir(self, "relay"), "state")
        low, high = freePortRange(2)
        relay, publicPort, controlPort = yield startRelay(
            self,
            state,
            public="tcp:0:interface=127.0.0.1:backlog=1024",
            control="tcp:0:interface=127.0.0.1:backlog=1024",
            extra=[
                "--http",
                "tcp:0:interface=127.0.0.1:backlog=1024",
                "--tcp-ports",
                f"{low}-{high}",
                # The caps are what this test is about: idle connections are accepted at once
                # (see test_idleConnectionsDeferred for the default).
                "--defer-accept",
                "0",
            ],
        )
        httpMatch = yield relay.waitFor(r"http listening on 127\.0\.0\.1:(\d+)")
        httpPort = int(httpMatch.group(1))
        relayCA = os.path.join(state, "tls", "ca.pem")
        page = yield listenLocal(self, Site(_Page()))
        echo = yield listenLocal(self, Factory.forProtocol(Echo))
        stream = startExpose(self, homeDir(self, "stream"), controlPort, [str(page)])
        streamLease = yield waitForLease(stream)
        raw = startExpose(self, homeDir(self, "raw"), controlPort, [str(echo), "--tcp"])
        rawLease = yield waitForLease(raw)
        rawPort = _hostPort(rawLease["url"])[1]

        siteHello = clientHello("localhost")
        held: list[socket.socket] = []
        self.addCleanup(_closeAll, held)
        # The raw TCP port first: its admitted visitors are forwarded (the tunnel opens a data
        # session for each), which takes a while; the idle ones last, so that they are still held
        # (10 s ClientHello and header timeouts) while the visitor comes.
        for port, first in (
            (rawPort, b""),
            (controlPort, b""),
            (httpPort, b""),
            (publicPort, b""),
            (publicPort, siteHello),
        ):
            count = FLOOD // 2 if port == publicPort else FLOOD
            sockets = yield deferToThread(_openIdle, port, count, first)
            held.extend(sockets)

        host, port = _hostPort(streamLease["url"])
        request = f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
        response, _ = yield deferToThread(
            tlsRequest, port, host, request, streamLease["ca"], VISITOR
        )
        self.assertTrue(response.startswith(b"HTTP/1.1 200"), response[:100])
        health = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        response, _ = yield deferToThread(
            tlsRequest, publicPort, "localhost", health, relayCA, VISITOR
        )
        self.assertTrue(response.endswith(b"ok\n"), response)
        response = yield deferToThread(_httpGet, httpPort, "/healthz", VISITOR)
        self.assertTrue(response.endswith(b"ok\n"), response)
        reply = yield deferToThread(_echo, rawPort, b"still here", VISITOR)
        self.assertEqual(reply, b"still here")
        late = startExpose(self, homeDir(self, "late"), controlPort, [str(page)])
        lateLease = yield waitForLease(late)
        self.assertIn("url", lateLease)

        metrics = yield deferToThread(_metrics, publicPort, relayCA)
        refused = metrics['portal_refusals_total{reason="connections_per_source"}']
        # public, HTTP, raw TCP and control each refused what was over 256 (less any that timed
        # out and made room).
        self.assertGreater(refused, 4 * (FLOOD - 256) - 300)
        for listener in ("public", "http", "tcp"):
            name = f'portal_relay_listener_connections_open{{listener="{listener}"}}'
            self.assertLessEqual(metrics[name], 256 + 10, listener)

    @inlineCallbacks
    def test_idleConnectionsDeferred(self) -> Any:
        """
        By default (C{--defer-accept 5}) the kernel keeps connections that have sent nothing from
        the relay: 200 idle connections from 127.0.0.2 to the public, control and HTTP listeners
        are not accepted (the relay's gauges count none, nothing is refused), while connections
        that sent their first bytes are accepted at once (a stalled ClientHello for the relay's
        own name is counted on the public listener), and a visitor gets the relay's page.
        """
        state = os.path.join(homeDir(self, "relay"), "state")
        relay, publicPort, controlPort = yield startRelay(
            self, state, extra=["--http", "tcp:0:interface=127.0.0.1"]
        )
        httpMatch = yield relay.waitFor(r"http listening on 127\.0\.0\.1:(\d+)")
        httpPort = int(httpMatch.group(1))
        relayCA = os.path.join(state, "tls", "ca.pem")
        held: list[socket.socket] = []
        self.addCleanup(_closeAll, held)
        started = time.monotonic()
        for port in (publicPort, controlPort, httpPort):
            sockets = yield deferToThread(_openIdle, port, 200)
            held.extend(sockets)
        stalled = yield deferToThread(_openIdle, publicPort, 3, clientHello("localhost"))
        held.extend(stalled)
        metrics = yield deferToThread(_metrics, publicPort, relayCA)
        # The deferral is at least 5 s: these figures were read before it could end.
        self.assertLess(time.monotonic() - started, 5)
        # The stalled ClientHellos and this test's own request for /metrics.
        self.assertEqual(
            metrics['portal_relay_listener_connections_open{listener="public"}'], 3 + 1
        )
        self.assertEqual(metrics['portal_relay_listener_connections_open{listener="http"}'], 0)
        self.assertEqual(metrics['portal_relay_listener_connections_open{listener="control"}'], 0)
        self.assertNotIn('portal_refusals_total{reason="connections_per_source"}', metrics)
        response = yield deferToThread(_httpGet, httpPort, "/healthz", VISITOR)
        self.assertTrue(response.endswith(b"ok\n"), response)


class UDPFloodTests(TestCase):
    """
    A UDP flood from many ports of one address leaves another address's flow working.
    """

    timeout = 120

    @inlineCallbacks
    def test_floodFromManyPorts(self) -> Any:
        """
        2,000 one-byte datagrams from 2,000 ports of 127.0.0.2 get at most 64 flows (the
        per-source cap; only those ports get an echo), the rest are refused and counted; a visitor
        from 127.0.0.3 gets its echo.
        """
        _needDescriptors(2100)
        udp = reactor.listenUDP(0, _UDPEcho(), interface="127.0.0.1")
        self.addCleanup(udp.stopListening)
        state = os.path.join(homeDir(self, "relay"), "state")
        low, high = freePortRange(2)
        _, publicPort, controlPort = yield startRelay(
            self, state, extra=["--udp-ports", f"{low}-{high}"]
        )
        tunnel = startExpose(
            self, homeDir(self, "tunnel"), controlPort, [str(udp.getHost().port), "--udp"]
        )
        lease = yield waitForLease(tunnel)
        port = _hostPort(lease["url"])[1]
        held = yield deferToThread(_udpFlood, port, 2000)
        self.addCleanup(_closeAll, held)
        reply = yield deferToThread(_udpRoundTrip, port, b"mine", VISITOR)
        self.assertEqual(reply, b"mine")
        answered = yield deferToThread(_answered, held)
        metrics = yield deferToThread(_metrics, publicPort, os.path.join(state, "tls", "ca.pem"))
        self.assertTrue(0 < answered <= 64, answered)
        # UDP may lose some of the flood's datagrams; every one that arrived beyond 64 is refused.
        self.assertGreater(metrics['portal_refusals_total{reason="udp_flows_per_source"}'], 1500)


class BandwidthTests(TestCase):
    """
    A bandwidth cap per lease, measured on the kernel splice (stream mode) and on the userspace
    splice (raw TCP mode's sealed stream, which the relay opens in Python).
    """

    timeout = 120

    @inlineCallbacks
    def test_capMeasured(self) -> Any:
        """
        With C{--bandwidth-per-lease 1M}, a 5 MiB download through a stream lease and through a raw
        TCP lease each arrive whole at 1 MiB/s, within 10%, once past the burst.
        """
        state = os.path.join(homeDir(self, "relay"), "state")
        low, high = freePortRange(2)
        _, _, controlPort = yield startRelay(
            self,
            state,
            extra=["--tcp-ports", f"{low}-{high}", "--bandwidth-per-lease", "1M"],
        )
        service = yield listenLocal(self, Factory.forProtocol(_Sender))
        stream = startExpose(self, homeDir(self, "stream"), controlPort, [str(service)])
        streamLease = yield waitForLease(stream)
        raw = startExpose(self, homeDir(self, "raw"), controlPort, [str(service), "--tcp"])
        rawLease = yield waitForLease(raw)
        total, rate = yield deferToThread(_downloadTLS, streamLease["url"], streamLease["ca"])
        self.assertEqual(total, DOWNLOAD)
        self.assertLess(abs(rate - CAP) / CAP, 0.10, f"kernel splice: {rate:.0f} B/s")
        total, rate = yield deferToThread(_downloadTCP, rawLease["url"])
        self.assertEqual(total, DOWNLOAD)
        self.assertLess(abs(rate - CAP) / CAP, 0.10, f"userspace splice: {rate:.0f} B/s")
