"""
Tests for L{portal.forwarding.udpbatch} and the bounded UDP port's use of it: the datagrams of a read
burst sent in groups (UDP GSO), coalesced reads (UDP GRO) cut into their datagrams.
"""

from __future__ import annotations

import errno
import sys
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.testing import EventLoggingObserver, MemoryReactor
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from portal.forwarding.boundedreads import BoundedUDPPort
from portal.forwarding.udpbatch import (
    MAX_GROUP_BYTES,
    MAX_SEGMENTS,
    SOL_UDP,
    UDP_GRO,
    UDP_SEGMENT,
    Burst,
    SendQueue,
    groups,
    segmentSize,
    splitCoalesced,
)

VISITOR = ("127.0.0.5", 5000)
OTHER = ("127.0.0.6", 6000)


def _groupOf(cuts: list[tuple[int, int]], queued: list[tuple[bytes, Any]]) -> list[list[bytes]]:
    """
    The datagrams of each group.
    """
    return [[datagram for datagram, _ in queued[start:end]] for start, end in cuts]


class GroupsTests(SynchronousTestCase):
    """
    L{groups} cuts queued datagrams where one GSO send could not carry them on.
    """

    def test_sameAddressAndSize(self) -> None:
        """
        Consecutive datagrams of one size to one address make one group.
        """
        queued = [(b"a" * 100, VISITOR)] * 5
        self.assertEqual(groups(queued), [(0, 5)])

    def test_addressChangeCuts(self) -> None:
        """
        A datagram to another address starts a new group; the same address later is another.
        """
        queued = [(b"a", VISITOR), (b"b", VISITOR), (b"c", OTHER), (b"d", VISITOR)]
        self.assertEqual(groups(queued), [(0, 2), (2, 3), (3, 4)])

    def test_shorterEndsGroup(self) -> None:
        """
        A shorter datagram ends its group (it is carried as the last segment); a longer one starts a
        new group.
        """
        queued = [(b"aaa", None), (b"aaa", None), (b"a", None), (b"aaa", None), (b"aaaa", None)]
        self.assertEqual(groups(queued), [(0, 3), (3, 4), (4, 5)])

    def test_longerThanPathAlone(self) -> None:
        """
        A datagram longer than the longest segment the path takes goes alone.
        """
        queued = [(b"aaa", None), (b"aaa", None), (b"aa", None), (b"aa", None)]
        self.assertEqual(groups(queued, longest=2), [(0, 1), (1, 2), (2, 4)])

    def test_emptyAlone(self) -> None:
        """
        An empty datagram cannot be a segment: it goes alone, and does not join a group.
        """
        queued = [(b"aa", None), (b"", None), (b"", None), (b"aa", None)]
        self.assertEqual(groups(queued), [(0, 1), (1, 2), (2, 3), (3, 4)])

    def test_segmentLimit(self) -> None:
        """
        No group has more than L{MAX_SEGMENTS} datagrams.
        """
        queued = [(b"x", VISITOR)] * (MAX_SEGMENTS * 2 + 1)
        self.assertEqual(
            groups(queued),
            [
                (0, MAX_SEGMENTS),
                (MAX_SEGMENTS, 2 * MAX_SEGMENTS),
                (2 * MAX_SEGMENTS, 2 * MAX_SEGMENTS + 1),
            ],
        )

    def test_byteLimit(self) -> None:
        """
        No group carries more than L{MAX_GROUP_BYTES}: 1,400-byte datagrams go 46 at a time.
        """
        queued = [(b"x" * 1400, VISITOR)] * 50
        self.assertEqual(groups(queued), [(0, 46), (46, 50)])
        self.assertLessEqual(46 * 1400, MAX_GROUP_BYTES)

    @given(
        st.lists(
            st.tuples(st.binary(max_size=3000), st.sampled_from([None, VISITOR, OTHER])),
            max_size=200,
        )
    )
    def test_groupsAreSendable(self, queued: list[tuple[bytes, Any]]) -> None:
        """
        Groups cover every datagram once, in order, and each is what one GSO send may carry.
        """
        cuts = groups(queued)
        self.assertEqual(
            [index for start, end in cuts for index in range(start, end)], list(range(len(queued)))
        )
        for start, end in cuts:
            group = queued[start:end]
            self.assertLessEqual(len(group), MAX_SEGMENTS)
            if len(group) == 1:
                continue
            size = len(group[0][0])
            self.assertGreater(size, 0)
            self.assertEqual({address for _, address in group}, {group[0][1]})
            self.assertTrue(all(len(datagram) == size for datagram, _ in group[:-1]))
            self.assertTrue(0 < len(group[-1][0]) <= size)
            self.assertLessEqual(sum(len(datagram) for datagram, _ in group), MAX_GROUP_BYTES)


class CoalescedTests(SynchronousTestCase):
    """
    L{splitCoalesced} and L{segmentSize} undo what the kernel coalesced.
    """

    def test_split(self) -> None:
        """
        A coalesced read is cut at the segment size, the last datagram shorter.
        """
        self.assertEqual(splitCoalesced(b"aaabbbcc", 3), [b"aaa", b"bbb", b"cc"])

    def test_oneDatagram(self) -> None:
        """
        Without a segment size, or one not smaller than what was read, the read is one datagram
        (an empty one too).
        """
        self.assertEqual(splitCoalesced(b"abc", 0), [b"abc"])
        self.assertEqual(splitCoalesced(b"abc", 3), [b"abc"])
        self.assertEqual(splitCoalesced(b"", 0), [b""])

    def test_segmentSize(self) -> None:
        """
        The size comes from the C{UDP_GRO} ancillary item; other items are ignored, and none
        means an ordinary datagram.
        """
        gro = (SOL_UDP, UDP_GRO, (1400).to_bytes(4, sys.byteorder))
        self.assertEqual(segmentSize([(0, 1, b"\0\0\0\1"), gro]), 1400)
        self.assertEqual(segmentSize([]), 0)
        self.assertEqual(segmentSize([(SOL_UDP, UDP_GRO, b"\1")]), 0)


class _Socket:
    """
    A UDP socket that records what is sent, and can fail sends or hold datagrams to read.

    @ivar sendmsgError: Raised by C{sendmsg} when set.
    @ivar reads: What C{recvmsg} returns, one item per call: C{(data, segment, address)}.
    """

    def __init__(self) -> None:
        self.sent: list[tuple[str, Any, Any]] = []
        self.sendmsgError: OSError | None = None
        self.sendError: OSError | None = None
        self.reads: list[tuple[bytes, int, tuple[str, int]]] = []
        self.datagrams: list[tuple[bytes, tuple[str, int]]] = []

    def recvfrom(self, size: int) -> tuple[bytes, tuple[str, int]]:
        if not self.datagrams:
            raise BlockingIOError(errno.EAGAIN, "empty")
        return self.datagrams.pop(0)

    def sendmsg(
        self, buffers: list[bytes], ancillary: Any, flags: int = 0, address: Any = None
    ) -> int:
        if self.sendmsgError is not None:
            raise self.sendmsgError
        self.sent.append(("sendmsg", (b"".join(buffers), ancillary), address))
        return sum(map(len, buffers))

    def sendto(self, datagram: bytes, address: Any) -> int:
        if self.sendError is not None:
            raise self.sendError
        self.sent.append(("sendto", datagram, address))
        return len(datagram)

    def send(self, datagram: bytes) -> int:
        if self.sendError is not None:
            raise self.sendError
        self.sent.append(("send", datagram, None))
        return len(datagram)

    def recvmsg(self, size: int, ancsize: int) -> tuple[bytes, Any, int, Any]:
        if not self.reads:
            raise BlockingIOError(errno.EAGAIN, "empty")
        data, segment, address = self.reads.pop(0)
        ancillary = [(SOL_UDP, UDP_GRO, segment.to_bytes(4, sys.byteorder))] if segment else []
        return data[:size], ancillary, 0, address


def _control(size: int) -> list[tuple[int, int, bytes]]:
    """
    The ancillary item of a GSO send of C{size}-byte segments.
    """
    return [(SOL_UDP, UDP_SEGMENT, size.to_bytes(2, sys.byteorder))]


class SendQueueTests(SynchronousTestCase):
    """
    L{SendQueue} sends the first datagram of a burst at once, holds the rest and sends them in
    groups when the burst ends.
    """

    def setUp(self) -> None:
        self.burst = Burst()
        self.sock = _Socket()
        self.one: list[tuple[bytes, Any]] = []
        self.lost: list[tuple[bytes, Any, BaseException]] = []
        self.queue = SendQueue(
            self.sock,  # type: ignore[arg-type]
            lambda datagram, address: self.one.append((datagram, address)),
            lambda datagram, address, error: self.lost.append((datagram, address, error)),
            self.burst,
        )

    def send(self, datagram: bytes, address: Any) -> None:
        """
        Send as a port does: queue if the queue takes it, else at once (recorded as C{"now"}).
        """
        if not self.queue.queue(datagram, address):
            self.sock.sent.append(("now", datagram, address))

    def sendBurst(self, datagrams: tuple[bytes, ...], address: Any) -> None:
        """
        Send datagrams to one address as a port does during one burst, and end the burst.
        """
        self.burst.begin()
        for datagram in datagrams:
            self.send(datagram, address)
        self.burst.end()

    def assertSentOneByOne(self, datagrams: list[bytes], address: Any) -> None:
        """
        Assert that after the burst's first datagram, C{datagrams} went one by one from the socket.
        """
        self.assertEqual(
            self.sock.sent[1:], [("sendto", datagram, address) for datagram in datagrams]
        )

    def test_noBurstNoQueue(self) -> None:
        """
        Outside a burst nothing is queued: the caller sends at once.
        """
        self.assertFalse(self.queue.queue(b"x", VISITOR))
        self.assertFalse(self.queue.queue(b"x", VISITOR))
        self.assertEqual(self.burst.pending, [])

    def test_firstAtOnce(self) -> None:
        """
        The first datagram of each burst goes at once (a read of one datagram costs nothing more);
        later ones are queued.
        """
        for _ in range(2):
            self.burst.begin()
            self.assertFalse(self.queue.queue(b"a", VISITOR))
            self.assertTrue(self.queue.queue(b"b", VISITOR))
            self.burst.end()

    def test_groupSentAtEnd(self) -> None:
        """
        A burst's later datagrams to one address go in one GSO send when the burst ends, the
        segment size beside them; the queue is registered with the burst once.
        """
        self.burst.begin()
        for datagram in (b"xxxx", b"aaaa", b"bbbb", b"cc"):
            self.send(datagram, VISITOR)
        self.assertEqual(self.burst.pending, [self.queue])
        self.assertEqual(self.sock.sent, [("now", b"xxxx", VISITOR)])
        self.burst.end()
        self.assertEqual(self.sock.sent[1:], [("sendmsg", (b"aaaabbbbcc", _control(4)), VISITOR)])
        self.assertEqual((self.queue.groupSends, self.queue.groupedDatagrams), (1, 3))
        self.assertEqual(self.burst.pending, [])

    def test_connected(self) -> None:
        """
        On a connected socket a group goes without an address.
        """
        self.sendBurst((b"xx", b"aa", b"bb"), None)
        self.assertEqual(self.sock.sent[1:], [("sendmsg", (b"aabb", _control(2)), None)])

    def test_loneDatagram(self) -> None:
        """
        A group of one goes as an ordinary send from the socket.
        """
        self.burst.begin()
        for datagram, address in ((b"xx", VISITOR), (b"aa", VISITOR), (b"bb", OTHER)):
            self.send(datagram, address)
        self.burst.end()
        self.assertEqual(self.sock.sent[1:], [("sendto", b"aa", VISITOR), ("sendto", b"bb", OTHER)])
        self.assertEqual(self.one, [])

    def test_loneConnected(self) -> None:
        """
        A group of one on a connected socket goes as an ordinary send.
        """
        self.sendBurst((b"xx", b"aa"), None)
        self.assertEqual(self.sock.sent[1:], [("send", b"aa", None)])

    def test_refusedByTheSocket(self) -> None:
        """
        A queued datagram the socket refuses goes through the port's own C{write} (which retries
        and turns errors into Twisted's).
        """
        self.burst.begin()
        self.send(b"xx", None)
        self.send(b"aa", None)
        self.sock.sendError = OSError(errno.ECONNREFUSED, "refused")
        self.burst.end()
        self.assertEqual(self.one, [(b"aa", None)])

    def test_nestedBurst(self) -> None:
        """
        Only the outermost burst's end sends.
        """
        self.burst.begin()
        self.burst.begin()
        for datagram in (b"xx", b"aa", b"bb"):
            self.send(datagram, None)
        self.burst.end()
        self.assertEqual(len(self.sock.sent), 1)
        self.burst.end()
        self.assertEqual(len(self.sock.sent), 2)

    def test_unavailable(self) -> None:
        """
        A GSO send refused as unsupported sends the group one by one and stops grouping: later
        datagrams go at once.
        """
        self.sock.sendmsgError = OSError(errno.EIO, "no offload")
        self.sendBurst((b"xx", b"aa", b"bb"), VISITOR)
        self.assertSentOneByOne([b"aa", b"bb"], VISITOR)
        self.assertFalse(self.queue.segmenting)
        self.burst.begin()
        self.assertFalse(self.queue.queue(b"cc", VISITOR))
        self.assertFalse(self.queue.queue(b"dd", VISITOR))
        self.burst.end()

    def test_tooLong(self) -> None:
        """
        A GSO send refused for its segments' length (longer than the path's MTU) sends the group one
        by one, and from then on only shorter datagrams go in groups.
        """
        self.sock.sendmsgError = OSError(errno.EINVAL, "longer than the MTU")
        self.sendBurst((b"xxxx", b"aaaa", b"bbbb"), VISITOR)
        self.assertSentOneByOne([b"aaaa", b"bbbb"], VISITOR)
        self.assertEqual(self.queue.longest, 3)
        self.sock.sendmsgError = None
        del self.sock.sent[:]
        self.sendBurst((b"xxxx", b"cccc", b"dddd", b"eee", b"fff"), VISITOR)
        self.assertEqual(
            self.sock.sent[1:],
            [
                ("sendto", b"cccc", VISITOR),
                ("sendto", b"dddd", VISITOR),
                ("sendmsg", (b"eeefff", _control(3)), VISITOR),
            ],
        )

    def test_transientFailure(self) -> None:
        """
        A GSO send failing for a passing reason (a full send buffer) sends that group one by one
        and keeps grouping.
        """
        self.sock.sendmsgError = BlockingIOError(errno.EAGAIN, "full")
        self.sendBurst((b"xx", b"aa", b"bb"), VISITOR)
        self.assertSentOneByOne([b"aa", b"bb"], VISITOR)
        self.assertTrue(self.queue.segmenting)

    def test_lostReported(self) -> None:
        """
        A queued datagram that neither the socket nor the port's C{write} sends is reported with
        the latter's error.
        """
        error = OSError(errno.ENETUNREACH, "unreachable")

        def fail(datagram: bytes, address: Any) -> None:
            raise error

        queue = SendQueue(
            self.sock,  # type: ignore[arg-type]
            fail,
            lambda datagram, address, e: self.lost.append((datagram, address, e)),
            self.burst,
        )
        self.burst.begin()
        self.assertFalse(queue.queue(b"xx", VISITOR))
        self.assertTrue(queue.queue(b"aa", VISITOR))
        self.sock.sendError = error
        self.burst.end()
        self.assertEqual(self.lost, [(b"aa", VISITOR, error)])


class _Forwarding(DatagramProtocol):
    """
    Records datagrams and sends each on to a fixed address (through the port's C{sendChecked}, as a
    L{DatagramWriter} does once it checked the address), or on its connected socket.

    @ivar to: Where to send, L{None} for the connected peer, or no sending when C{"nowhere"}.
    """

    def __init__(self, to: Any = "nowhere") -> None:
        self.received: list[tuple[bytes, Any]] = []
        self.failed: list[tuple[bytes, Any, BaseException]] = []
        self.to = to

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.received.append((datagram, addr))
        if self.to is None:
            assert self.transport is not None
            self.transport.write(datagram, None)
        elif self.to != "nowhere":
            assert isinstance(self.transport, BoundedUDPPort)
            self.transport.sendChecked(datagram, self.to)

    def sendFailed(self, datagram: bytes, address: Any, error: BaseException) -> None:
        self.failed.append((datagram, address, error))


class BoundedPortBatchTests(SynchronousTestCase):
    """
    A bounded UDP port reads coalesced groups and opens a burst around each read, so that what its
    protocol sends meanwhile goes out in groups.
    """

    def port(self, protocol: _Forwarding, coalesced: bool = True) -> tuple[BoundedUDPPort, _Socket]:
        """
        A bounded port on a recording socket, queueing its sends, as C{startListening} would set it
        up on a socket that segments.
        """
        port = BoundedUDPPort(0, protocol, "127.0.0.1", 2048, MemoryReactor())
        sock = _Socket()
        port.socket = sock  # type: ignore[assignment]
        port.burst = Burst()
        port.sends = SendQueue(
            sock,  # type: ignore[arg-type]
            super(BoundedUDPPort, port).write,
            port._sendFailed,
            port.burst,
        )
        if coalesced:
            port.coalesced = True
        protocol.makeConnection(port)
        return port, sock

    def test_coalescedReadCut(self) -> None:
        """
        A coalesced read reaches the protocol as its datagrams, in order, with the sender's
        address; an ordinary one as itself.
        """
        protocol = _Forwarding()
        port, sock = self.port(protocol)
        sock.reads = [(b"aaabbbc", 3, ("127.0.0.7", 7000, 0, 0)), (b"dd", 0, ("127.0.0.8", 8000))]
        port.doRead()
        self.assertEqual(
            protocol.received,
            [
                (b"aaa", ("127.0.0.7", 7000)),
                (b"bbb", ("127.0.0.7", 7000)),
                (b"c", ("127.0.0.7", 7000)),
                (b"dd", ("127.0.0.8", 8000)),
            ],
        )

    def test_coalescedReadBounded(self) -> None:
        """
        A read event stops once it handed on L{BoundedUDPPort.maxDatagramsPerRead} datagrams or
        more, counting each segment.
        """
        protocol = _Forwarding()
        port, sock = self.port(protocol)
        port.maxDatagramsPerRead = 4
        sock.reads = [(b"ab", 1, VISITOR), (b"cde", 1, VISITOR), (b"f", 0, VISITOR)]
        port.doRead()
        self.assertEqual(len(protocol.received), 5)
        self.assertEqual(len(sock.reads), 1)

    def test_oversizeOrdinaryTruncated(self) -> None:
        """
        An ordinary datagram longer than the port's C{maxPacketSize} is cut to it, as Twisted's
        C{recvfrom(maxPacketSize)} would.
        """
        protocol = _Forwarding()
        port, sock = self.port(protocol)
        sock.reads = [(b"x" * 3000, 0, VISITOR)]
        port.doRead()
        self.assertEqual(protocol.received, [(b"x" * 2048, VISITOR)])

    def test_connectedSendsGrouped(self) -> None:
        """
        What the protocol writes on a connected port during a read goes in one GSO send after it,
        but the first datagram, sent at once.
        """
        protocol = _Forwarding(to=None)
        port, sock = self.port(protocol)
        port._connectedAddr = OTHER
        sock.reads = [(b"xxxaaabbb", 3, OTHER)]
        port.doRead()
        self.assertEqual(
            sock.sent, [("send", b"xxx", None), ("sendmsg", (b"aaabbb", _control(3)), None)]
        )

    def test_checkedSendsGrouped(self) -> None:
        """
        What the protocol sends with C{sendChecked} during a read goes in one GSO send after it,
        but the first datagram, sent at once.
        """
        protocol = _Forwarding(to=VISITOR)
        port, sock = self.port(protocol, coalesced=False)
        sock.datagrams = [(b"xx", OTHER), (b"aa", OTHER), (b"bb", OTHER), (b"c", OTHER)]
        port.doRead()
        self.assertEqual(len(protocol.received), 4)
        self.assertEqual(
            sock.sent,
            [("sendto", b"xx", VISITOR), ("sendmsg", (b"aabbc", _control(2)), VISITOR)],
        )

    def test_sendCheckedAtOnce(self) -> None:
        """
        Outside a read, L{BoundedUDPPort.sendChecked} sends at once.
        """
        port, sock = self.port(_Forwarding())
        port.sendChecked(b"x", VISITOR)
        self.assertEqual(sock.sent, [("sendto", b"x", VISITOR)])

    def test_sendFailedTold(self) -> None:
        """
        A datagram lost after its burst is told to the protocol's C{sendFailed}.
        """
        protocol = _Forwarding()
        port, _ = self.port(protocol)
        error = OSError(errno.ENOBUFS, "no buffers")
        port._sendFailed(b"x", VISITOR, error)
        self.assertEqual(protocol.failed, [(b"x", VISITOR, error)])

    def test_sendFailedLogged(self) -> None:
        """
        A protocol without C{sendFailed} has the loss logged instead.
        """
        port, _ = self.port(_Forwarding())
        port.protocol = DatagramProtocol()
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        port._sendFailed(b"x", VISITOR, OSError(errno.ENOBUFS, "no buffers"))
        self.assertEqual(len(events), 1)
        self.assertIn("could not be sent", events[0]["log_format"])
