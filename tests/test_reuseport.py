"""
Tests for L{portal.forwarding.reuseport}: listeners shared between workers.
"""

from __future__ import annotations

import fcntl
import os
import select
import socket
from typing import Any

from twisted.internet.error import CannotListenError
from twisted.internet.protocol import DatagramProtocol, Factory
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from portal.forwarding.reuseport import (
    ReusePortError,
    SharedUDPPort,
    attachSteering,
    bindingTogether,
    listenSharedTCP,
    listenSharedUDP,
    parseTCPDescription,
    sourceSteeringProgram,
)


class DescriptionTests(SynchronousTestCase):
    """
    Which endpoint descriptions workers can share.
    """

    def test_parse(self) -> None:
        """
        C{tcp:PORT} with an optional interface and backlog parses.
        """
        self.assertEqual(parseTCPDescription("tcp:8443"), (8443, "", 50))
        self.assertEqual(
            parseTCPDescription("tcp:0:interface=127.0.0.1:backlog=9"), (0, "127.0.0.1", 9)
        )

    def test_refused(self) -> None:
        """
        Other endpoint types and options are refused with the description in the message.
        """
        for bad in ["ssl:443", "tcp:x", "tcp:1:foo=bar", "unix:/tmp/s", "tcp:1:backlog=x"]:
            with self.assertRaises(ReusePortError) as e:
                parseTCPDescription(bad)
            self.assertIn(repr(bad), str(e.exception))


class SteeringTests(SynchronousTestCase):
    """
    The source-address steering program, in the kernel.
    """

    def test_programShape(self) -> None:
        """
        The program is eight instructions and refuses zero workers.
        """
        self.assertEqual(len(sourceSteeringProgram(3)), 64)
        self.assertRaises(ValueError, sourceSteeringProgram, 0)

    def test_sameSourceSameSocket(self) -> None:
        """
        Connections from one source address always reach the same socket of the group, and two
        addresses that differ modulo the group size reach different sockets.
        """
        sockets = []
        for _ in range(2):
            s = socket.socket()
            self.addCleanup(s.close)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind(("127.0.0.1", sockets[0].getsockname()[1] if sockets else 0))
            s.listen(8)
            sockets.append(s)
        attachSteering(sockets[0], 2)
        port = sockets[0].getsockname()[1]
        chosen: dict[str, set[int]] = {}
        for source in ["127.0.0.2", "127.0.0.3"] * 3:
            client = socket.socket()
            self.addCleanup(client.close)
            client.bind((source, 0))
            client.connect(("127.0.0.1", port))
            ready, _, _ = select.select(sockets, [], [], 5)
            self.assertEqual(len(ready), 1)
            accepted, _ = ready[0].accept()
            accepted.close()
            chosen.setdefault(source, set()).add(sockets.index(ready[0]))
        self.assertEqual(chosen, {"127.0.0.2": {0}, "127.0.0.3": {1}})


class _AdoptingReactor:
    """
    Takes listening sockets as a reactor's C{adoptStreamPort} does: its own duplicate of each.

    @ivar sockets: The duplicates, by port.
    """

    def __init__(self, testCase: SynchronousTestCase) -> None:
        self._testCase = testCase
        self.sockets: list[socket.socket] = []

    def adoptStreamPort(self, fd: int, family: int, factory: object) -> socket.socket:
        """
        Keep a duplicate of the listening socket.
        """
        duplicate = socket.socket(fileno=os.dup(fd))
        self._testCase.addCleanup(duplicate.close)
        self.sockets.append(duplicate)
        return duplicate


class SharedTCPTests(SynchronousTestCase):
    """
    L{listenSharedTCP}: a raw TCP lease port bound by every worker of a relay.
    """

    def setUp(self) -> None:
        self.reactor = _AdoptingReactor(self)

    def test_everyWorkerBinds(self) -> None:
        """
        Listeners with C{SO_REUSEPORT} share a port, in either order of the holder and the
        forwarders, and each is listening.
        """
        first = listenSharedTCP(self.reactor, 0, "127.0.0.1", Factory())
        port = first.getsockname()[1]  # type: ignore[attr-defined]
        listenSharedTCP(self.reactor, port, "127.0.0.1", Factory())
        self.assertEqual(len(self.reactor.sockets), 2)
        for s in self.reactor.sockets:
            self.assertEqual(s.getsockname(), ("127.0.0.1", port))
            self.assertEqual(s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT), 1)
            self.assertEqual(s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN), 1)

    def test_portHeldWithoutReusePort(self) -> None:
        """
        A port another program bound without C{SO_REUSEPORT} cannot be shared: the bind fails
        with L{CannotListenError}, as C{listenTCP}'s does.
        """
        other = socket.socket()
        self.addCleanup(other.close)
        other.bind(("127.0.0.1", 0))
        other.listen(1)
        port = other.getsockname()[1]
        error = self.assertRaises(
            CannotListenError, listenSharedTCP, self.reactor, port, "127.0.0.1", Factory()
        )
        self.assertEqual(error.port, port)
        self.assertEqual(self.reactor.sockets, [])

    def test_notTakenOverWithoutReusePort(self) -> None:
        """
        A program that binds a shared port without C{SO_REUSEPORT} fails: the workers keep it.
        """
        listenSharedTCP(self.reactor, 0, "127.0.0.1", Factory())
        port = self.reactor.sockets[0].getsockname()[1]
        other = socket.socket()
        self.addCleanup(other.close)
        self.assertRaises(OSError, other.bind, ("127.0.0.1", port))

    def test_otherUserCannotJoin(self) -> None:
        """
        A process of another user cannot join the port's group even with C{SO_REUSEPORT} (Linux
        checks the effective user): only the relay's own user shares its ports.
        """
        if os.getuid() != 0:
            raise SkipTest("needs root to run a process as another user")
        listenSharedTCP(self.reactor, 0, "127.0.0.1", Factory())
        port = self.reactor.sockets[0].getsockname()[1]
        child = os.fork()
        if child == 0:  # pragma: no cover (the child process)
            status = 2
            try:
                os.setuid(65534)
                other = socket.socket()
                other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                try:
                    other.bind(("127.0.0.1", port))
                    status = 1
                except OSError:
                    status = 0
            finally:
                os._exit(status)
        _, status = os.waitpid(child, 0)
        self.assertEqual(os.waitstatus_to_exitcode(status), 0)


class _ReadingReactor:
    """
    Enough of a reactor for a UDP port to start reading: it only records the readers.
    """

    def __init__(self) -> None:
        self.readers: list[Any] = []

    def addReader(self, reader: Any) -> None:
        """
        Record a reader.
        """
        self.readers.append(reader)

    def removeReader(self, reader: Any) -> None:
        """
        Forget a reader.
        """
        self.readers.remove(reader)


def _receivedBy(ports: list[SharedUDPPort], payload: bytes) -> int:
    """
    @return: The index of the port whose socket received C{payload} (read from it), waiting up to
        5 s.
    """
    sockets = [p.socket for p in ports]
    ready, _, _ = select.select(sockets, [], [], 5)
    if len(ready) != 1:
        raise AssertionError(f"{len(ready)} sockets got the datagram")
    data, _ = ready[0].recvfrom(2048)
    if data != payload:
        raise AssertionError(data)
    return sockets.index(ready[0])


class SharedUDPTests(SynchronousTestCase):
    """
    L{listenSharedUDP}: a UDP lease port (or the tunnel-facing socket) bound by every worker.
    """

    def listen(self, port: int = 0, steer: int | None = None) -> SharedUDPPort:
        """
        Bind a shared UDP port on 127.0.0.1, closed after the test.
        """
        listening = listenSharedUDP(
            _ReadingReactor(), port, DatagramProtocol(), "127.0.0.1", steerWorkers=steer
        )
        assert isinstance(listening, SharedUDPPort)
        self.addCleanup(listening.socket.close)
        return listening

    def sender(self, source: str = "127.0.0.1") -> socket.socket:
        """
        A UDP socket on C{source}, closed after the test.
        """
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(s.close)
        s.bind((source, 0))
        return s

    def test_everyWorkerBinds(self) -> None:
        """
        Two sockets with C{SO_REUSEPORT} bind one UDP port, and both are read by the reactor.
        """
        first = self.listen()
        port = first.getHost().port
        second = self.listen(port)
        for p in (first, second):
            self.assertEqual(p.socket.getsockname(), ("127.0.0.1", port))
            self.assertEqual(p.socket.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT), 1)
            self.assertEqual(p.reactor.readers, [p])  # type: ignore[attr-defined]

    def test_portHeldWithoutReusePort(self) -> None:
        """
        A UDP port another program bound without C{SO_REUSEPORT} cannot be shared: the bind fails
        with L{CannotListenError}, as C{listenUDP}'s does.
        """
        other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(other.close)
        other.bind(("127.0.0.1", 0))
        port = other.getsockname()[1]
        error = self.assertRaises(
            CannotListenError,
            listenSharedUDP,
            _ReadingReactor(),
            port,
            DatagramProtocol(),
            "127.0.0.1",
        )
        self.assertEqual(error.port, port)

    def test_notTakenOverWithoutReusePort(self) -> None:
        """
        A program that binds a shared UDP port without C{SO_REUSEPORT} fails: the workers keep it.
        """
        port = self.listen().getHost().port
        other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(other.close)
        self.assertRaises(OSError, other.bind, ("127.0.0.1", port))

    def test_flowsSpreadAndStick(self) -> None:
        """
        Without steering, the kernel spreads visitors (source ports) over the sockets, and every
        datagram of one visitor reaches the same socket.
        """
        first = self.listen()
        port = first.getHost().port
        ports = [first, self.listen(port)]
        chosen: dict[int, set[int]] = {}
        for index in range(32):
            visitor = self.sender()
            for _ in range(3):
                payload = f"visitor {index}".encode()
                visitor.sendto(payload, ("127.0.0.1", port))
                chosen.setdefault(index, set()).add(_receivedBy(ports, payload))
        self.assertEqual({len(sockets) for sockets in chosen.values()}, {1})
        self.assertEqual(set().union(*chosen.values()), {0, 1})

    def test_steeredBySource(self) -> None:
        """
        With steering, a source address's datagrams reach the same socket whatever their source
        port, as the control port's connections from that address do.
        """
        first = self.listen(steer=2)
        port = first.getHost().port
        ports = [first, self.listen(port, steer=2)]
        chosen: dict[str, set[int]] = {}
        for source in ["127.0.0.2", "127.0.0.3"] * 8:
            payload = source.encode()
            self.sender(source).sendto(payload, ("127.0.0.1", port))
            chosen.setdefault(source, set()).add(_receivedBy(ports, payload))
        self.assertEqual(chosen, {"127.0.0.2": {0}, "127.0.0.3": {1}})


class BindingTogetherTests(SynchronousTestCase):
    """
    L{bindingTogether}: one worker binds at a time.
    """

    def test_exclusive(self) -> None:
        """
        While one process holds the lock, nobody else gets it; after, they do.
        """
        path = self.mktemp()
        with bindingTogether(path):
            other = os.open(path, os.O_RDWR)
            self.addCleanup(os.close, other)
            self.assertRaises(BlockingIOError, fcntl.flock, other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
