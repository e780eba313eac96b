"""
Tests for L{portal.forwarding.boundedreads}: ports that read and accept in bounded batches.
"""

from __future__ import annotations

import errno
import socket
from typing import Any

from twisted.internet import reactor, tcp
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import TestCase

from portal.forwarding.boundedreads import (
    MAX_ACCEPTS_PER_READ,
    MAX_DATAGRAMS_PER_READ,
    BoundedUDPPort,
    boundAccepts,
    deferAccept,
    listenUDP,
    readAtAccept,
)
from portal.relay.service import DEFAULT_BACKLOG, withBacklog


class _FloodedSocket:
    """
    A UDP socket holding C{count} datagrams, then empty (C{EAGAIN}).
    """

    def __init__(self, count: int) -> None:
        self.left = count

    def recvfrom(self, size: int) -> tuple[bytes, tuple[str, int]]:
        if not self.left:
            raise BlockingIOError(errno.EAGAIN, "empty")
        self.left -= 1
        return b"x", ("127.0.0.6", 40000 + self.left)


class _Counting(DatagramProtocol):
    def __init__(self) -> None:
        self.received: list[Any] = []

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.received.append((datagram, addr))


class BoundedUDPTests(TestCase):
    """
    A bounded UDP port reads at most L{MAX_DATAGRAMS_PER_READ} datagrams per read event.
    """

    def port(self, count: int) -> tuple[BoundedUDPPort, _Counting, _FloodedSocket]:
        protocol = _Counting()
        port = BoundedUDPPort(0, protocol, "127.0.0.1", 2048, MemoryReactor())
        sock = _FloodedSocket(count)
        port.socket = sock  # type: ignore[assignment]
        return port, protocol, sock

    def test_floodReadInBatches(self) -> None:
        """
        A socket full of one-byte datagrams (which Twisted's port would read in one go, its budget
        being 256 KiB) is read a batch per event; nothing is lost between batches.
        """
        port, protocol, sock = self.port(1000)
        port.doRead()
        self.assertEqual(len(protocol.received), MAX_DATAGRAMS_PER_READ)
        self.assertEqual(sock.left, 1000 - MAX_DATAGRAMS_PER_READ)
        events = 1
        while sock.left:
            port.doRead()
            events += 1
        self.assertEqual(len(protocol.received), 1000)
        self.assertEqual(events, -(-1000 // MAX_DATAGRAMS_PER_READ))
        self.assertEqual(protocol.received[0], (b"x", ("127.0.0.6", 40999)))

    def test_emptySocket(self) -> None:
        """
        A read event on an empty socket reads nothing and raises nothing.
        """
        port, protocol, _ = self.port(3)
        port.doRead()
        port.doRead()
        self.assertEqual(len(protocol.received), 3)

    def test_otherErrorsRaised(self) -> None:
        """
        A socket error other than "would block" or a refusal is raised, as Twisted's port does.
        """
        port, _, sock = self.port(0)

        def broken(size: int) -> Any:
            raise OSError(errno.EBADF, "bad descriptor")

        sock.recvfrom = broken  # type: ignore[method-assign]
        self.assertRaises(OSError, port.doRead)

    def test_memoryReactor(self) -> None:
        """
        On an in-memory reactor, L{listenUDP} asks the reactor for its own port.
        """
        calls: list[Any] = []

        class Reactor:
            def listenUDP(self, *args: Any, **kw: Any) -> str:
                calls.append((args, kw))
                return "port"

        protocol = _Counting()
        port = listenUDP(Reactor(), 5353, protocol, interface="127.0.0.1", maxPacketSize=2048)
        self.assertEqual(port, "port")
        self.assertEqual(
            calls, [((5353, protocol), {"interface": "127.0.0.1", "maxPacketSize": 2048})]
        )


class BoundAcceptsTests(TestCase):
    """
    L{boundAccepts} caps a TCP port's accept batch, which Twisted grows by 20 whenever a batch is
    used up.
    """

    def test_capped(self) -> None:
        """
        However Twisted raises the batch, it stays at most L{MAX_ACCEPTS_PER_READ}, and at least 1.
        """
        port = tcp.Port(0, Factory())
        self.assertIs(boundAccepts(port), port)
        self.assertIsInstance(port, tcp.Port)
        self.assertEqual(port.numberAccepts, MAX_ACCEPTS_PER_READ)
        for _ in range(10):
            port.numberAccepts = port.numberAccepts + 20
        self.assertEqual(port.numberAccepts, MAX_ACCEPTS_PER_READ)
        port.numberAccepts = 5
        self.assertEqual(port.numberAccepts, 5)
        port.numberAccepts = 0
        self.assertEqual(port.numberAccepts, 1)
        unbounded = tcp.Port(0, Factory())
        unbounded.numberAccepts = 500
        self.assertEqual(unbounded.numberAccepts, 500)

    def test_logPrefixWorkedOutOnce(self) -> None:
        """
        A bounded port's log prefix is Twisted's (its factory's class name), worked out on the
        first call only.
        """
        port: Any = boundAccepts(tcp.Port(0, Factory()))
        self.assertEqual(port.logPrefix(), tcp.Port(0, Factory()).logPrefix())
        asked: list[object] = []
        self.patch(tcp.reflect, "qual", lambda c: asked.append(c) or "other")
        self.assertEqual(port.logPrefix(), "twisted.internet.protocol.Factory")
        self.assertEqual(asked, [])

    def test_otherPortsUntouched(self) -> None:
        """
        Anything but Twisted's own TCP port (an in-memory port, a subclass) keeps its class.
        """

        class Other(tcp.Port):
            pass

        for port in (object(), Other(0, Factory())):
            kind = type(port)
            boundAccepts(port)
            self.assertIs(type(port), kind)


class _Reading(Protocol):
    """
    Keeps what it reads; paused from the start when told to.
    """

    def __init__(self, paused: bool) -> None:
        self.paused = paused
        self.received = b""

    def connectionMade(self) -> None:
        """
        Stop reading if told to.
        """
        if self.paused:
            self.transport.pauseProducing()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        """
        Keep the bytes.
        """
        self.received += data


class ReadAtAcceptTests(TestCase):
    """
    L{readAtAccept}: a client-first port with deferred accept reads each connection in the same
    read event that accepted it (real loopback sockets, the real reactor's dispatch).
    """

    def listen(self, readAtOnce: bool, paused: bool = False) -> tuple[Any, list[_Reading]]:
        """
        A bounded, deferred-accept TCP port on 127.0.0.1 (reading at accept if C{readAtOnce}),
        with a client connected that has sent C{hello}.

        @return: The port and the protocols it built.
        """
        built: list[_Reading] = []

        def build() -> _Reading:
            built.append(_Reading(paused))
            return built[-1]

        port: Any = boundAccepts(
            reactor.listenTCP(0, Factory.forProtocol(build), interface="127.0.0.1")
        )
        self.addCleanup(port.stopListening)
        self.assertTrue(deferAccept(port, 1))
        if readAtOnce:
            self.assertTrue(readAtAccept(port))
        client = socket.create_connection(("127.0.0.1", port.getHost().port))
        self.addCleanup(client.close)
        client.sendall(b"hello")
        self.addCleanup(lambda: [p.transport.abortConnection() for p in built])
        return port, built

    def test_readInTheAcceptEvent(self) -> None:
        """
        One read event of the port accepts the connection and delivers its first bytes.
        """
        port, built = self.listen(True)
        port.doRead()
        self.assertEqual([p.received for p in built], [b"hello"])

    def test_twistedWaitsForTheNextTurn(self) -> None:
        """
        Without it, the accepted connection's bytes wait for a read event of their own.
        """
        port, built = self.listen(False)
        port.doRead()
        self.assertEqual([p.received for p in built], [b""])

    def test_pausedNotRead(self) -> None:
        """
        A connection its protocol paused on connecting is not read.
        """
        port, built = self.listen(True, paused=True)
        port.doRead()
        self.assertEqual([p.received for p in built], [b""])

    def test_onlyBoundedPorts(self) -> None:
        """
        Only a port L{boundAccepts} changed is changed.
        """
        for port in (object(), tcp.Port(0, Factory())):
            kind = type(port)
            self.assertFalse(readAtAccept(port))
            self.assertIs(type(port), kind)


class _RecordingSocket:
    """
    A listening socket that records the options set on it.
    """

    def __init__(self, family: int) -> None:
        self.family = family
        self.options: list[tuple[int, int, int]] = []

    def setsockopt(self, level: int, option: int, value: int) -> None:
        self.options.append((level, option, value))


class _ListeningPort:
    def __init__(self, family: int) -> None:
        self.socket = _RecordingSocket(family)


class DeferAcceptTests(TestCase):
    """
    L{deferAccept} sets C{TCP_DEFER_ACCEPT} on TCP listeners, in whole seconds.
    """

    def test_set(self) -> None:
        """
        On an IPv4 or IPv6 listener the option is set, rounded up to whole seconds.
        """
        for family in (socket.AF_INET, socket.AF_INET6):
            port = _ListeningPort(family)
            self.assertTrue(deferAccept(port, 2.5))
            self.assertEqual(
                port.socket.options, [(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 3)]
            )

    def test_notSet(self) -> None:
        """
        No deferral asked (0), a UNIX socket, or a port without a socket: nothing is set.
        """
        port = _ListeningPort(socket.AF_INET)
        self.assertFalse(deferAccept(port, 0))
        unix = _ListeningPort(socket.AF_UNIX)
        self.assertFalse(deferAccept(unix, 5))
        self.assertFalse(deferAccept(object(), 5))
        self.assertEqual(port.socket.options + unix.socket.options, [])


class WithBacklogTests(TestCase):
    """
    L{withBacklog} gives TCP listeners without a backlog of their own L{DEFAULT_BACKLOG}.
    """

    def test_added(self) -> None:
        self.assertEqual(withBacklog("tcp:8443"), f"tcp:8443:backlog={DEFAULT_BACKLOG}")
        self.assertEqual(
            withBacklog("tcp6:443:interface=\\:\\:1"),
            f"tcp6:443:interface=\\:\\:1:backlog={DEFAULT_BACKLOG}",
        )

    def test_kept(self) -> None:
        for description in ("tcp:8443:backlog=10", "unix:/tmp/s", "ssl:443"):
            self.assertEqual(withBacklog(description), description)
