"""
Tests for L{portal.forwarding.datagramwriter}: datagrams to addresses on an unconnected UDP port,
with Twisted's address check once per host.
"""

from __future__ import annotations

import errno
import socket
from typing import Any

from twisted.internet.abstract import isIPAddress
from twisted.internet.error import InvalidAddressError, MessageLengthError
from twisted.trial.unittest import SynchronousTestCase

from portal.forwarding.datagramwriter import MAX_CHECKED_HOSTS, DatagramWriter


class RecordingSocket(socket.socket):
    """
    A UDP socket (never bound or used for I/O) whose C{sendto} records, or fails with C{failWith}.

    @ivar sent: The datagrams and addresses given to C{sendto}.
    @ivar failWith: An errno for C{sendto} to fail with, or L{None}.
    """

    def __init__(self) -> None:
        super().__init__(socket.AF_INET, socket.SOCK_DGRAM)
        self.sent: list[tuple[bytes, Any]] = []
        self.failWith: int | None = None

    def sendto(self, data: Any, address: Any) -> int:  # type: ignore[override]
        """
        Record the datagram, or fail.
        """
        if self.failWith is not None:
            raise OSError(self.failWith, "failed")
        self.sent.append((bytes(data), address))
        return len(data)


class FakePort:
    """
    A listening UDP port whose C{write} checks the address as Twisted's IPv4 C{Port.write} does and
    records, and maps C{EMSGSIZE} to L{MessageLengthError}.

    @ivar writes: The datagrams and addresses given to C{write}.
    @ivar failWith: An errno for C{write} to fail with, or L{None}.
    """

    def __init__(self, handle: Any) -> None:
        self._handle = handle
        self.writes: list[tuple[bytes, Any]] = []
        self.failWith: int | None = None

    def getHandle(self) -> Any:
        """
        @return: The socket.
        """
        return self._handle

    def write(self, datagram: bytes, addr: Any) -> None:
        """
        Check and record the write.
        """
        if not isIPAddress(addr[0]):
            raise InvalidAddressError(addr[0], "not an IPv4 address")
        if self.failWith == errno.EMSGSIZE:
            raise MessageLengthError("message too long")
        self.writes.append((datagram, addr))


class DatagramWriterTests(SynchronousTestCase):
    """
    L{DatagramWriter} checks a host through C{Port.write} once, then sends from the socket.
    """

    def setUp(self) -> None:
        """
        A writer on a fake port over a recording socket.
        """
        self.socket = RecordingSocket()
        self.addCleanup(self.socket.close)
        self.port = FakePort(self.socket)
        self.writer = DatagramWriter(self.port)

    def test_firstThroughPortThenSocket(self) -> None:
        """
        The first datagram to a host goes through the port's checked C{write}; later ones to any
        port of that host go straight to the socket.
        """
        self.writer.write(b"a", ("127.0.0.1", 5000))
        self.writer.write(b"b", ("127.0.0.1", 5000))
        self.writer.write(b"c", ("127.0.0.1", 5001))
        self.assertEqual(self.port.writes, [(b"a", ("127.0.0.1", 5000))])
        self.assertEqual(
            self.socket.sent, [(b"b", ("127.0.0.1", 5000)), (b"c", ("127.0.0.1", 5001))]
        )
        self.assertEqual(self.writer.checked, {"127.0.0.1"})

    def test_invalidHostAlwaysRefused(self) -> None:
        """
        A host name is refused by the port every time, never remembered, and nothing is sent.
        """
        for _ in range(2):
            self.assertRaises(InvalidAddressError, self.writer.write, b"x", ("example.com", 53))
        self.assertEqual(self.writer.checked, set())
        self.assertEqual((self.port.writes, self.socket.sent), ([], []))

    def test_failedSendGoesToPort(self) -> None:
        """
        A send the socket refuses is handed to the port's C{write}, whose errors the caller gets
        as Twisted raises them.
        """
        self.writer.write(b"a", ("127.0.0.1", 5000))
        self.socket.failWith = errno.EMSGSIZE
        self.port.failWith = errno.EMSGSIZE
        self.assertRaises(MessageLengthError, self.writer.write, b"big", ("127.0.0.1", 5000))
        self.socket.failWith = errno.EAGAIN
        self.port.failWith = None
        self.writer.write(b"b", ("127.0.0.1", 5000))
        self.assertEqual(self.port.writes[-1], (b"b", ("127.0.0.1", 5000)))

    def test_checkedHostsBounded(self) -> None:
        """
        At most C{maxChecked} hosts are remembered; one more makes the writer forget them all, so
        they are checked again.
        """
        writer = DatagramWriter(self.port, maxChecked=2)
        for host in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):
            writer.write(b"x", (host, 1))
        self.assertEqual(writer.checked, {"10.0.0.3"})
        writer.write(b"y", ("10.0.0.1", 1))
        self.assertEqual(self.port.writes[-1], (b"y", ("10.0.0.1", 1)))
        self.assertEqual(self.socket.sent, [])

    def test_defaultBound(self) -> None:
        """
        By default a writer remembers up to L{MAX_CHECKED_HOSTS} hosts.
        """
        for n in range(MAX_CHECKED_HOSTS):
            self.writer.write(b"x", (f"10.{n >> 16}.{(n >> 8) & 255}.{n & 255}", 1))
        self.assertEqual(len(self.writer.checked), MAX_CHECKED_HOSTS)
        self.writer.write(b"x", ("192.0.2.1", 1))
        self.assertEqual(self.writer.checked, {"192.0.2.1"})

    def test_portWithoutSocket(self) -> None:
        """
        A port without a socket (an in-memory test's) gets every datagram through its C{write}.
        """
        port = FakePort(None)
        writer = DatagramWriter(port)
        writer.write(b"a", ("127.0.0.1", 1))
        writer.write(b"b", ("127.0.0.1", 1))
        self.assertEqual([d for d, _ in port.writes], [b"a", b"b"])
        self.assertEqual(writer.checked, set())
