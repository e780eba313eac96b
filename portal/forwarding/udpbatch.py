"""
Datagrams sent together and read together: UDP segmentation offload (GSO) for the datagrams one read
burst produces, and coalesced reads (GRO) where the other side sends that way.

Benchmark scenario 6b found half of the relay's and the tunnel's time at the maximum UDP rate in
C{sendto}: on Linux each datagram is one system call, one route lookup and one trip through the
stack, and on loopback the delivery to the receiver too. A read event of a UDP port on the datagram
path handles up to 64 datagrams (L{portal.forwarding.boundedreads}), and what it forwards mostly goes
to one address (the tunnel, one flow's local service, one visitor). While a port reads (a L{Burst} is
open), the ports on this path send the first datagram at once and queue the rest (L{SendQueue}), so
that a read of one datagram costs nothing more; when the read ends, each queue goes out in groups: consecutive datagrams to one address of one size (the last may be shorter) in one
C{sendmsg} with C{UDP_SEGMENT} (Linux 4.18+), which the kernel cuts into the same datagrams on the
wire (segments longer than the path's MTU are refused: such datagrams then go one by one). A receiver that asked for C{UDP_GRO} (Linux 5.0+) gets such a group in one read, with the
segment size beside it (L{splitCoalesced}); other receivers get ordinary datagrams. No datagram
waits longer than the read that produced it.

Where GSO is missing (another kernel, a device without checksum offload) or a group is refused
(datagrams longer than the path's MTU), the queue sends that group's datagrams one by one and stops
grouping (for the former) or grouping datagrams that long (for the latter); a datagram lost at that point is reported to the port's protocol
(C{sendFailed}), as an error of an immediate send is raised to its caller.
"""

from __future__ import annotations

import errno
import socket
import sys
from collections.abc import Callable, Sequence
from typing import Any

#: Linux's numbers (Python's C{socket} module does not name them).
SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104

#: Most segments in one GSO send (the kernel's C{UDP_MAX_SEGMENTS} is 64 before Linux 6.x, 128 after).
MAX_SEGMENTS = 64
#: Most bytes in one GSO send: under IPv4's largest UDP payload (65,507 bytes).
MAX_GROUP_BYTES = 65_000
#: The most bytes one coalescing read takes: the largest UDP payload, whole.
COALESCED_BUFFER = 65_535
#: Ancillary space for the segment size a coalesced read reports (one C int).
GRO_ANCILLARY = socket.CMSG_SPACE(4)

#: Errors saying this socket or its device cannot segment at all: stop grouping on it.
GSO_UNAVAILABLE = frozenset({errno.EIO, errno.EOPNOTSUPP, errno.ENOPROTOOPT})
#: Errors saying segments of this size do not fit the path (longer than its MTU): group only
#: shorter datagrams from then on.
GSO_TOO_LONG = frozenset({errno.EINVAL, errno.EMSGSIZE})

#: A datagram to send and its address (L{None} on a connected socket).
Queued = tuple[bytes, Any]


class Burst:
    """
    Whether a read is under way, and the queues to send when it ends.

    @ivar depth: How many reads are under way (reads do not nest in a reactor, but a read's
        callback might drive another port's read in tests).
    @ivar number: Counts bursts: a queue sends the first datagram of each burst at once.
    @ivar pending: The queues holding datagrams, in the order they were first used.
    """

    def __init__(self) -> None:
        self.depth = 0
        self.number = 0
        self.pending: list[SendQueue] = []

    def begin(self) -> None:
        """
        A read starts: sends queue from now on.
        """
        if not self.depth:
            self.number += 1
        self.depth += 1

    def end(self, opened: bool = True) -> None:
        """
        A read ended: when it was the outermost, send every queue.

        @param opened: Whether the read still counts in L{depth} (a caller that already took it
            off, to skip this call when nothing is queued, says C{False}).
        """
        if opened:
            self.depth -= 1
        if self.depth or not self.pending:
            return
        pending, self.pending = self.pending, []
        for queue in pending:
            queue.flush()


#: The reactor thread's burst (the reactor runs one read at a time).
BURST = Burst()


def groups(queued: Sequence[Queued], longest: int = MAX_GROUP_BYTES) -> list[tuple[int, int]]:
    """
    Cut queued datagrams into groups one GSO send can carry: consecutive, to one address, all of
    the first one's size except perhaps a shorter last one, at most L{MAX_SEGMENTS} and
    L{MAX_GROUP_BYTES}. An empty datagram, or one longer than C{longest}, is a group of its own.

    @param queued: The datagrams in the order they were queued.
    @param longest: The longest segment the path takes.
    @return: C{(start, end)} index pairs covering C{queued} in order.
    """
    cuts: list[tuple[int, int]] = []
    start, count = 0, len(queued)
    while start < count:
        first, address = queued[start]
        size = len(first)
        limit = min(MAX_SEGMENTS, MAX_GROUP_BYTES // size) if 0 < size <= longest else 1
        end = start + 1
        while end < count and end - start < limit:
            datagram, to = queued[end]
            length = len(datagram)
            if to != address or length > size or length == 0:
                break
            end += 1
            if length < size:
                break
        cuts.append((start, end))
        start = end
    return cuts


def splitCoalesced(data: bytes, segment: int) -> list[bytes]:
    """
    Cut what one coalescing read returned into its datagrams.

    @param data: The bytes read.
    @param segment: The segment size the kernel reported, or 0 when it reported none (one
        ordinary datagram).
    @return: The datagrams: all of C{segment} bytes but perhaps a shorter last one.
    """
    length = len(data)
    if segment <= 0 or segment >= length:
        return [data]
    return [data[offset : offset + segment] for offset in range(0, length, segment)]


def segmentSize(ancillary: list[tuple[int, int, bytes]]) -> int:
    """
    The segment size a coalescing read reported.

    @param ancillary: The read's ancillary data.
    @return: The size, or 0 if the read carried one ordinary datagram.
    """
    for level, kind, value in ancillary:
        if level == SOL_UDP and kind == UDP_GRO and len(value) >= 4:
            return int.from_bytes(value[:4], sys.byteorder, signed=True)
    return 0


def canSegment(sock: Any) -> bool:
    """
    Whether a socket takes C{UDP_SEGMENT}.

    @param sock: A UDP socket (anything else, as in-memory tests use, cannot).
    """
    if not isinstance(sock, socket.socket):
        return False
    try:
        sock.getsockopt(SOL_UDP, UDP_SEGMENT)
    except OSError:
        return False
    return True


def askCoalesced(sock: Any) -> bool:
    """
    Ask the kernel to hand this socket segmented groups whole (C{UDP_GRO}).

    @param sock: A UDP socket.
    @return: Whether the kernel agreed.
    """
    if not isinstance(sock, socket.socket):
        return False
    try:
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)
    except OSError:
        return False
    return True


class SendQueue:
    """
    One socket's datagrams queued during a burst, sent in groups when it ends.

    @ivar segmenting: Whether groups go as one GSO send (cleared for good by an error in
        L{GSO_UNAVAILABLE}).
    @ivar longest: The longest segment sent in groups (lowered below a size refused with an error
        in L{GSO_TOO_LONG}).
    @ivar groupSends: GSO sends made.
    @ivar groupedDatagrams: Datagrams those sends carried.
    """

    def __init__(
        self,
        sock: socket.socket,
        sendOne: Callable[[bytes, Any], object],
        lost: Callable[[bytes, Any, BaseException], object],
        burst: Burst = BURST,
    ) -> None:
        """
        @param sock: The socket (connected where datagrams are queued without an address).
        @param sendOne: Sends one datagram the socket refused, raising as the port's C{write}
            does (Twisted's C{write}: it retries, and turns errors into Twisted's).
        @param lost: Told of each datagram that could not be sent after all.
        @param burst: The burst that says when to queue and when to send.
        """
        self._sock = sock
        self._sendOne = sendOne
        self._lost = lost
        self._burst = burst
        self._queued: list[Queued] = []
        self._burstSeen = 0
        self.segmenting = True
        self.longest = MAX_GROUP_BYTES
        self.groupSends = 0
        self.groupedDatagrams = 0

    def queue(self, datagram: bytes, address: Any) -> bool:
        """
        Queue a datagram if a burst is open and this queue already sent one during it.

        @param datagram: The datagram.
        @param address: Where to, or L{None} on a connected socket.
        @return: Whether it was queued; if not, the caller sends it now.
        """
        burst = self._burst
        if not burst.depth or not self.segmenting:
            return False
        if self._burstSeen != burst.number:
            self._burstSeen = burst.number
            return False
        if not self._queued:
            burst.pending.append(self)
        self._queued.append((datagram, address))
        return True

    def flush(self) -> None:
        """
        Send what is queued, in groups.
        """
        queued, self._queued = self._queued, []
        if len(queued) == 1:
            self._sendLate(*queued[0])
            return
        for start, end in groups(queued, self.longest):
            if end - start == 1:
                self._sendLate(*queued[start])
            else:
                self._sendGroup(queued[start:end])

    def _sendGroup(self, group: list[Queued]) -> None:
        """
        Send a group in one GSO send; on refusal, one by one.
        """
        address = group[0][1]
        size = len(group[0][0])
        control = [(SOL_UDP, UDP_SEGMENT, size.to_bytes(2, sys.byteorder))]
        data = b"".join([datagram for datagram, _ in group])
        try:
            if address is None:
                self._sock.sendmsg([data], control)
            else:
                self._sock.sendmsg([data], control, 0, address)
        except OSError as e:
            if e.errno in GSO_UNAVAILABLE:
                self.segmenting = False
            elif e.errno in GSO_TOO_LONG:
                self.longest = min(self.longest, size - 1)
            for datagram, to in group:
                self._sendLate(datagram, to)
            return
        self.groupSends += 1
        self.groupedDatagrams += len(group)

    def _sendLate(self, datagram: bytes, address: Any) -> None:
        """
        Send one datagram after its burst, straight from the socket (its address was checked when
        it was queued); if the socket refuses, through C{sendOne}; report it if it cannot go.
        """
        try:
            if address is None:
                self._sock.send(datagram)
            else:
                self._sock.sendto(datagram, address)
            return
        except OSError:
            pass
        try:
            self._sendOne(datagram, address)
        except Exception as e:
            self._lost(datagram, address, e)
