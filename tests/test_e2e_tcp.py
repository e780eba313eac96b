"""
End-to-end tests of raw TCP mode with real C{twistd portal-relay} and C{portal expose --tcp}
processes on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import struct
import subprocess
import threading
from typing import Any
from urllib.parse import urlsplit

from twisted.internet.defer import inlineCallbacks
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.threads import deferToThread
from twisted.protocols.haproxy._wrapper import HAProxyWrappingFactory
from twisted.protocols.wire import Echo
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, TestCase
from zope.interface import implementer

from tests.realprocesses import (
    WAIT,
    freePortRange,
    listenLocal,
    pollUntil,
    restartRelay,
    spawn,
    startExpose,
    startRelay,
    terminate,
    waitForLease,
)
from tests.test_e2e import _PeerAddress

#: Bytes sent each way in the large transfer test.
LARGE = 64 * 1024 * 1024


def _address(url: str) -> tuple[str, int]:
    """
    @return: The host and port of a C{tcp://HOST:PORT} URL.
    """
    parts = urlsplit(url)
    assert parts.scheme == "tcp" and parts.hostname and parts.port, url
    return parts.hostname, parts.port


def _exchange(port: int, data: bytes, source: int = 0, expect: int | None = None) -> bytes:
    """
    Connect to the public port, send C{data} and read C{expect} bytes, or until the far end closes.
    """
    with socket.socket() as s:
        s.settimeout(WAIT)
        s.bind(("127.0.0.1", source))
        s.connect(("127.0.0.1", port))
        s.sendall(data)
        received = b""
        while expect is None or len(received) < expect:
            chunk = s.recv(65536)
            if not chunk:
                break
            received += chunk
    return received


def _echoRoundTrip(port: int, size: int) -> tuple[str, str, int]:
    """
    Stream C{size} random bytes to an echo service through the public port while reading the echo
    back in parallel.

    @return: The sha256 of what was sent, of what came back, and the number of bytes that came back.
    """
    sent = hashlib.sha256()
    received = hashlib.sha256()
    count = 0
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as s:

        def send() -> None:
            remaining = size
            while remaining:
                block = os.urandom(min(remaining, 1 << 20))
                sent.update(block)
                s.sendall(block)
                remaining -= len(block)

        sender = threading.Thread(target=send)
        sender.start()
        while count < size:
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            received.update(chunk)
            count += len(chunk)
        sender.join()
    return sent.hexdigest(), received.hexdigest(), count


#: Bytes the half-close test sends before shutting down its writing direction.
REQUEST = 3 * 1024 * 1024
#: Bytes of the reply the half-close test's service sends once it has read everything.
REPLY = 5 * 1024 * 1024


@implementer(IHalfCloseableProtocol)
class _DigestAfterEOF(Protocol):
    """
    Reads until the client half-closes, then answers with the sha256 of everything it read followed by
    L{REPLY} bytes (a pattern), and closes: a service that needs half-close to answer at all.
    """

    def connectionMade(self) -> None:
        """
        Start hashing.
        """
        self._digest = hashlib.sha256()

    def dataReceived(self, data: bytes) -> None:
        """
        Hash what arrives.
        """
        self._digest.update(data)

    def readConnectionLost(self) -> None:
        """
        The client is done: answer, then close.
        """
        assert self.transport is not None
        self.transport.write(self._digest.hexdigest().encode() + b"\n")
        self.transport.write(_pattern(REPLY))
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        """
        Nothing to do: the answer was the last thing written.
        """


def _pattern(size: int) -> bytes:
    """
    @return: C{size} bytes of a known pattern.
    """
    return (bytes(range(256)) * (size // 256 + 1))[:size]


def _halfCloseExchange(port: int) -> tuple[str, bytes, bytes]:
    """
    Send L{REQUEST} random bytes, shut down the writing direction, and read the reply until EOF.

    @return: The sha256 of what was sent, the digest line the service sent back, and the rest of the
        reply.
    """
    data = os.urandom(REQUEST)
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        received = bytearray()
        while True:
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            received += chunk
    line, _, rest = bytes(received).partition(b"\n")
    return hashlib.sha256(data).hexdigest(), line, rest


class _Sink(Protocol):
    """
    Counts the bytes it reads and records the end of its connection in its factory.
    """

    def __init__(self, factory: _SinkFactory) -> None:
        self._factory = factory

    def dataReceived(self, data: bytes) -> None:
        """
        Count.
        """
        self._factory.received += len(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """
        Record the end.
        """
        self._factory.closed += 1


class _SinkFactory(Factory):
    """
    Builds L{_Sink}s and keeps their counts.

    @ivar received: Bytes read by all sinks.
    @ivar closed: Sink connections that ended.
    """

    def __init__(self) -> None:
        self.received = 0
        self.closed = 0

    def buildProtocol(self, addr: Any) -> _Sink:
        """
        @return: A sink counting into this factory.
        """
        return _Sink(self)


def _sendThenReset(port: int, size: int) -> None:
    """
    Send C{size} bytes, then close with a TCP reset (C{SO_LINGER} 0) instead of a FIN.
    """
    s = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    s.sendall(os.urandom(size))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


class RawTCPEndToEndTests(TestCase):
    """
    C{portal expose HOST:PORT --tcp} through a relay started with C{--tcp-ports}.
    """

    timeout = 180

    @inlineCallbacks
    def startPair(self, target: str, extra: tuple[str, ...] = (), count: int = 4) -> Any:
        """
        Start a relay with a fresh port range and a raw TCP tunnel to C{target}.

        @return: A L{Deferred} firing with (relay, tunnel, lease event, public port, port range,
            control port, state directory).
        """
        root = os.path.abspath(self.mktemp())
        low, high = freePortRange(count)
        state = os.path.join(root, "relay", "state")
        relay, _, controlPort = yield startRelay(
            self, state, extra=["--tcp-ports", f"{low}-{high}"]
        )
        home = os.path.join(root, "tunnel")
        os.makedirs(home)
        tunnel = startExpose(self, home, controlPort, [target, "--tcp", *extra])
        lease = yield waitForLease(tunnel)
        host, port = _address(lease["url"])
        self.assertEqual(host, "localhost")
        self.assertTrue(low <= port <= high, (port, low, high))
        return relay, tunnel, lease, port, (low, high), controlPort, state

    @inlineCallbacks
    def test_echoBothWays64MB(self) -> Any:
        """
        A line comes back from an echo service, then 64 MiB of random bytes are echoed whole: the
        sha256 of what came back equals that of what was sent. The lease line names the target and
        has no CA (raw TCP mode terminates no TLS).
        """
        echo = yield listenLocal(self, Factory.forProtocol(Echo))
        _, _, lease, port, *_ = yield self.startPair(f"127.0.0.1:{echo}")
        self.assertEqual(lease["target"], f"127.0.0.1:{echo}")
        self.assertIsNone(lease["ca"])
        reply = yield deferToThread(_exchange, port, b"hello portal\n", 0, 13)
        self.assertEqual(reply, b"hello portal\n")
        sent, received, count = yield deferToThread(_echoRoundTrip, port, LARGE)
        self.assertEqual(count, LARGE)
        self.assertEqual(received, sent)

    @inlineCallbacks
    def test_halfClose(self) -> Any:
        """
        A client that sends a request and half-closes still reads the whole reply: the service sees
        the end of the request (it answers only then), its digest of the request matches what was
        sent, and the 5 MiB reply arrives whole before EOF.
        """
        service = yield listenLocal(self, Factory.forProtocol(_DigestAfterEOF))
        _, _, _, port, *_ = yield self.startPair(f"127.0.0.1:{service}")
        sent, line, rest = yield deferToThread(_halfCloseExchange, port)
        self.assertEqual(line.decode(), sent)
        self.assertEqual(len(rest), REPLY)
        self.assertEqual(rest, _pattern(REPLY))

    @inlineCallbacks
    def test_resetMidStream(self) -> Any:
        """
        A client that resets its connection in the middle of an 8 MiB transfer gets the service's
        connection closed; relay and tunnel log no traceback and keep serving: the next visitor's
        bytes reach the service whole.
        """
        sink = _SinkFactory()
        sinkPort = yield listenLocal(self, sink)
        relay, tunnel, _, port, *_ = yield self.startPair(f"127.0.0.1:{sinkPort}")
        # The tunnel's startup check of its target opens (and closes) one connection first.
        yield pollUntil(lambda: sink.closed == 1, "the startup check's connection closed")
        yield deferToThread(_sendThenReset, port, 8 * 1024 * 1024)
        yield pollUntil(lambda: sink.closed == 2, "the service's connection closed")
        before = sink.received
        self.assertLessEqual(before, 8 * 1024 * 1024)
        yield deferToThread(_exchange, port, b"after the reset\n", 0, 0)
        yield pollUntil(lambda: sink.closed == 3, "the next visitor's connection closed")
        self.assertEqual(sink.received - before, len(b"after the reset\n"))
        for process in (relay, tunnel):
            self.assertNotIn("Traceback", process.output())

    @inlineCallbacks
    def test_proxyProtocolV2(self) -> Any:
        """
        With C{--proxy-protocol v2}, a service behind Twisted's PROXY parser sees the visitor's own
        source port.
        """
        service = yield listenLocal(self, HAProxyWrappingFactory(Factory.forProtocol(_PeerAddress)))
        _, _, _, port, *_ = yield self.startPair(str(service), ("--proxy-protocol", "v2"))
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            source = probe.getsockname()[1]
        seen = yield deferToThread(_exchange, port, b"who?\n", source)
        self.assertEqual(seen.decode(), f"127.0.0.1 {source}")

    @inlineCallbacks
    def test_redis(self) -> Any:
        """
        C{redis-cli -p <public port> ping} answers PONG through the tunnel to a real redis-server.
        """
        server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
        if server is None or cli is None:
            raise SkipTest("redis-server and redis-cli are not installed (.ci/run installs them)")
        redisPort, _ = freePortRange(1)
        root = os.path.abspath(self.mktemp())
        os.makedirs(root)
        redis = spawn(
            self,
            "redis-server",
            [server, "--port", str(redisPort), "--bind", "127.0.0.1", "--save", "", "--dir", root],
            root,
        )
        yield redis.waitFor(r"Ready to accept connections")
        self.addCleanup(terminate, redis)
        _, _, _, port, *_ = yield self.startPair(f"localhost:{redisPort}")
        result = yield deferToThread(
            subprocess.run,
            [cli, "-h", "127.0.0.1", "-p", str(port), "ping"],
            capture_output=True,
            timeout=WAIT,
        )
        self.assertEqual(result.stdout.strip(), b"PONG", result.stderr)
        result = yield deferToThread(
            subprocess.run,
            [cli, "-h", "127.0.0.1", "-p", str(port), "set", "portal", "tunnel"],
            capture_output=True,
            timeout=WAIT,
        )
        self.assertEqual(result.stdout.strip(), b"OK", result.stderr)

    @inlineCallbacks
    def test_tunnelStopClosesPort(self) -> Any:
        """
        When the tunnel stops, an open visitor connection is closed cleanly (EOF, after what was
        already sent) and the public port stops accepting connections.
        """
        echo = yield listenLocal(self, Factory.forProtocol(Echo))
        _, tunnel, _, port, *_ = yield self.startPair(str(echo))
        visitor = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        self.addCleanup(visitor.close)
        visitor.sendall(b"ping")
        echoed = yield deferToThread(visitor.recv, 4)
        self.assertEqual(echoed, b"ping")
        yield terminate(tunnel)
        rest = yield deferToThread(visitor.recv, 10)
        self.assertEqual(rest, b"")
        error = yield deferToThread(_refused, port)
        self.assertIsInstance(error, ConnectionRefusedError)

    @inlineCallbacks
    def test_relayRestartKeepsPort(self) -> Any:
        """
        After a relay restart (same state directory and control port) the tunnel reconnects and gets
        the same public port, which works again. The port is not the range's first free one at that
        point (another tunnel held that one and stopped), so a relay that forgot its assignments
        would move the lease.
        """
        echo = yield listenLocal(self, Factory.forProtocol(Echo))
        first = yield listenLocal(self, Factory.forProtocol(Echo))
        relay, other, _, otherPort, (low, high), controlPort, state = yield self.startPair(
            str(first)
        )
        self.assertEqual(otherPort, low)
        home = os.path.join(os.path.dirname(os.path.dirname(state)), "second")
        os.makedirs(home)
        tunnel = startExpose(self, home, controlPort, [str(echo), "--tcp"])
        lease = yield waitForLease(tunnel)
        port = _address(lease["url"])[1]
        self.assertEqual(port, low + 1)
        yield terminate(other)
        again = yield restartRelay(
            self, relay, state, controlPort, ["--tcp-ports", f"{low}-{high}"], tunnel
        )
        self.assertEqual(again["url"], lease["url"])
        reply = yield deferToThread(_exchange, port, b"again\n", 0, 6)
        self.assertEqual(reply, b"again\n")

    @inlineCallbacks
    def test_disabledOnRelay(self) -> Any:
        """
        A relay without C{--tcp-ports} refuses raw TCP mode: the tunnel exits 1 with the relay's
        reason instead of hanging.
        """
        root = os.path.abspath(self.mktemp())
        _, _, controlPort = yield startRelay(self, os.path.join(root, "relay", "state"))
        home = os.path.join(root, "tunnel")
        os.makedirs(home)
        tunnel = startExpose(self, home, controlPort, ["6379", "--tcp"])
        code = yield tunnel.ended
        self.assertEqual(code, 1)
        self.assertIn("tcp mode is disabled on this relay", tunnel.output())


def _refused(port: int) -> Exception | None:
    """
    @return: The error connecting to C{port} raised, or L{None} if it connected.
    """
    try:
        socket.create_connection(("127.0.0.1", port), timeout=WAIT).close()
    except OSError as e:
        return e
    return None
