"""
Listening ports that take turns: a flood on one socket cannot hold the reactor for long.

Twisted's UDP port reads datagrams until the socket is empty or C{maxThroughput} bytes were read
(256 KiB): a flood of one-byte datagrams is read a few thousand at a time in one go, while every
other connection waits. Its TCP port accepts up to C{numberAccepts} connections in one go and raises
that number by 20 each time it accepted as many as it could, without bound. Both are fair to
throughput and unfair to latency: under a flood, a visitor's event waits behind the whole batch.

L{listenUDP} makes a port that reads at most L{MAX_DATAGRAMS_PER_READ} datagrams per readiness
event, and L{boundAccepts} caps a TCP port's batch at L{MAX_ACCEPTS_PER_READ}. The reactor then
serves other ready descriptors in between (epoll is level-triggered: what is left is read on the
next round), so the total rate is unchanged and the delay a flood adds to anyone else is bounded by
one batch.
"""

from __future__ import annotations

import math
import select
import socket
from typing import Any

from twisted.internet import tcp, udp
from twisted.internet.interfaces import IListeningPort
from twisted.internet.posixbase import PosixReactorBase
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from twisted.python import log

from portal.forwarding.udpbatch import (
    BURST,
    COALESCED_BUFFER,
    GRO_ANCILLARY,
    Burst,
    SendQueue,
    askCoalesced,
    canSegment,
    segmentSize,
    splitCoalesced,
)
from portal.forwarding.writethrough import WriteThroughServer

#: Datagrams one read event of a bounded UDP port takes from its socket.
MAX_DATAGRAMS_PER_READ = 64

#: Connections one read event of a bounded TCP port accepts.
MAX_ACCEPTS_PER_READ = 32


class BoundedUDPPort(udp.Port):
    """
    A UDP port that reads at most about L{maxDatagramsPerRead} datagrams per readiness event, and
    sends what its reads produce in groups (L{portal.forwarding.udpbatch}).

    @ivar coalesced: Whether reads take segmented groups whole (C{UDP_GRO}); set by L{listenUDP}'s
        C{coalesced} before listening, kept only if the kernel agrees.
    @ivar sends: The queue of datagrams sent during a read burst, or L{None} where the socket
        cannot segment (the datagrams then go at once).
    """

    _log = Logger()
    maxDatagramsPerRead = MAX_DATAGRAMS_PER_READ
    coalesced = False
    sends: SendQueue | None = None
    burst: Burst = BURST

    def startListening(self) -> None:
        """
        Listen; then ask for coalesced reads if wanted, and queue sends where the socket can
        segment.
        """
        super().startListening()  # type: ignore[no-untyped-call]
        if self.coalesced:
            self.coalesced = askCoalesced(self.socket)
        if canSegment(self.socket):
            self.sends = SendQueue(self.socket, super().write, self._sendFailed, self.burst)

    def doRead(self) -> None:
        """
        Read what the socket holds, at most about L{maxDatagramsPerRead} datagrams (Twisted's
        L{udp.Port.doRead} with a count instead of a byte budget), inside a burst: what the
        protocol sends meanwhile goes out in groups when the reading ends.
        """
        burst = self.burst
        if not burst.depth:
            burst.number += 1
        burst.depth += 1
        try:
            if self.coalesced:
                self._readCoalesced()
            else:
                self._readEach()
        finally:
            burst.depth -= 1
            if not burst.depth and burst.pending:
                burst.end(opened=False)

    def _readEach(self) -> None:
        """
        Read datagrams one per system call.
        """
        recvfrom, protocol = self.socket.recvfrom, self.protocol
        size = self.maxPacketSize
        for _ in range(self.maxDatagramsPerRead):
            try:
                data, addr = recvfrom(size)
            except OSError as e:
                if self._readFailed(e):
                    return
                raise
            try:
                protocol.datagramReceived(data, addr[:2])
            except BaseException:
                log.err()

    def _readCoalesced(self) -> None:
        """
        Read segmented groups whole and hand on their datagrams one by one.
        """
        recv, protocol = self.socket.recvmsg, self.protocol
        size = self.maxPacketSize
        count = 0
        while count < self.maxDatagramsPerRead:
            try:
                data, ancillary, _, addr = recv(COALESCED_BUFFER, GRO_ANCILLARY)
            except OSError as e:
                if self._readFailed(e):
                    return
                raise
            segment = segmentSize(ancillary) if ancillary else 0
            if not segment:
                # One ordinary datagram, the usual case at low rates.
                count += 1
                try:
                    protocol.datagramReceived(data[:size] if len(data) > size else data, addr[:2])
                except BaseException:
                    log.err()
                continue
            datagrams = splitCoalesced(data, segment)
            count += len(datagrams)
            addr = addr[:2]
            for datagram in datagrams:
                try:
                    protocol.datagramReceived(datagram, addr)
                except BaseException:
                    log.err()

    def _readFailed(self, e: OSError) -> bool:
        """
        Deal with a read error as Twisted's port does.

        @return: Whether reading ends here quietly (nothing left, or a refusal told); if not, the
            error is the caller's to raise.
        """
        if e.args[0] in udp._sockErrReadIgnore:
            return True
        if e.args[0] in udp._sockErrReadRefuse:
            if self._connectedAddr:
                self.protocol.connectionRefused()
            return True
        return False

    def write(self, datagram: bytes, addr: Any = None) -> Any:
        """
        Send a datagram; on a connected socket during a read burst, queue it to go in a group.

        @param datagram: The datagram.
        @param addr: Where to; L{None} on a connected socket.
        """
        sends = self.sends
        if addr is None and sends is not None and self._connectedAddr:
            if sends.queue(datagram, None):
                return None
        return super().write(datagram, addr)

    def sendChecked(self, datagram: bytes, addr: tuple[str, int]) -> None:
        """
        Send a datagram to an address this port's C{write} has already accepted once (as
        L{portal.forwarding.datagramwriter.DatagramWriter} sends), queued during a read burst.

        @raise OSError: As C{sendto} raises, when sent at once.
        """
        sends = self.sends
        if sends is not None and sends.queue(datagram, addr):
            return
        self.socket.sendto(datagram, addr)

    def _sendFailed(self, datagram: bytes, addr: Any, error: BaseException) -> None:
        """
        A datagram queued in a burst could not be sent after all: tell the protocol
        (C{sendFailed(datagram, address, error)}) if it listens, else log it.
        """
        told = getattr(self.protocol, "sendFailed", None)
        if told is not None:
            told(datagram, addr, error)
            return
        self._log.info(
            "a UDP datagram to {address} could not be sent: {error}", address=addr, error=error
        )


def listenUDP(
    reactor: Any,
    port: int,
    protocol: DatagramProtocol,
    interface: str = "",
    maxPacketSize: int = 8192,
    coalesced: bool = False,
) -> IListeningPort:
    """
    Listen for datagrams like C{reactor.listenUDP}, on a L{BoundedUDPPort} when the reactor is a
    real one (in-memory test reactors get their own kind of port).

    @param coalesced: Take segmented groups whole (C{UDP_GRO}): for sockets that talk to a peer
        sending that way (the relay's and the tunnel's sockets to each other).

    @return: The listening port.
    """
    if not isinstance(reactor, PosixReactorBase):
        listening: IListeningPort = reactor.listenUDP(
            port, protocol, interface=interface, maxPacketSize=maxPacketSize
        )
        return listening
    bounded = BoundedUDPPort(port, protocol, interface, maxPacketSize, reactor)  # type: ignore[no-untyped-call]
    bounded.coalesced = coalesced
    bounded.startListening()
    return bounded


class _BoundedAcceptsPort(tcp.Port):
    """
    A TCP port whose accept batch never grows past L{MAX_ACCEPTS_PER_READ} (see L{boundAccepts}).
    """

    #: Accepted connections write through (L{portal.forwarding.writethrough}).
    transport = WriteThroughServer

    def logPrefix(self) -> str:
        """
        The factory's class name, as Twisted's port gives it, worked out once: Twisted computes it
        for every read event of the port (every accept batch), a tenth of a worker's time when it
        only hands visitors on (issue 19's profile).
        """
        prefix: str | None = self.__dict__.get("_logPrefix")
        if prefix is None:
            base: Any = super()
            prefix = self.__dict__["_logPrefix"] = base.logPrefix()
        return prefix

    @property
    def numberAccepts(self) -> int:
        """
        The connections the next read event may accept.
        """
        value: int = self.__dict__.get("_boundedAccepts", MAX_ACCEPTS_PER_READ)
        return value

    @numberAccepts.setter
    def numberAccepts(self, value: int) -> None:
        self.__dict__["_boundedAccepts"] = max(1, min(value, MAX_ACCEPTS_PER_READ))


class _ReadAtAcceptServer(WriteThroughServer):
    """
    A connection of a L{_ReadAtAcceptPort}: it tells its port it was made.
    """

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        accepted: list[Any] | None = self.server.__dict__.get("_accepted")
        if accepted is not None:
            accepted.append(self)


class _ReadAtAcceptPort(_BoundedAcceptsPort):
    """
    A bounded TCP port whose clients speak first and whose connections the kernel hands over once
    they did (C{TCP_DEFER_ACCEPT}): each connection accepted is read at once, as the reactor would
    on its next turn (see L{readAtAccept}).
    """

    transport = _ReadAtAcceptServer

    def doRead(self) -> Any:
        """
        Accept a batch as Twisted does; then read each connection still reading, through the
        reactor's own dispatch (its errors and its end handled as for any read event).
        """
        accepted: list[Any] = []
        self.__dict__["_accepted"] = accepted
        try:
            result = super().doRead()  # type: ignore[no-untyped-call]
        finally:
            self.__dict__["_accepted"] = None
        reactor: Any = self.reactor
        reads = getattr(reactor, "_reads", None)
        dispatch = getattr(reactor, "_doReadOrWrite", None)
        if reads is None or dispatch is None:
            return result
        for connection in accepted:
            fd = connection.fileno()
            if fd in reads:
                dispatch(connection, fd, _READABLE)
        return result


#: The event the reactor's dispatch reads on.
_READABLE = getattr(select, "EPOLLIN", 1)


def readAtAccept(port: object) -> bool:
    """
    Have a bounded TCP port (L{boundAccepts}) whose clients speak first, and which the kernel hands
    connections only once they did (L{deferAccept}), read each connection right after accepting it:
    the bytes are there, and waiting for the reactor's next turn costs a wake-up and a pass through
    C{epoll} per connection (nginx and HAProxy read at once after a deferred accept too). On a
    reactor without the epoll reactor's descriptor table (C{_reads}) nothing changes.

    @param port: A port L{boundAccepts} changed.
    @return: Whether the port was changed.
    """
    if type(port) is not _BoundedAcceptsPort:
        return False
    port.__class__ = _ReadAtAcceptPort
    return True


def boundAccepts(port: object) -> object:
    """
    Cap the accept batch of a listening TCP port made by Twisted (C{listenTCP}, a C{tcp:}
    endpoint): its class becomes a subclass that only bounds C{numberAccepts}. Other ports (an
    in-memory test port, a UNIX socket) are left as they are.

    @param port: A listening port.
    @return: C{port}.
    """
    if type(port) is tcp.Port:
        port.__class__ = _BoundedAcceptsPort
    return port


def deferAccept(port: object, seconds: float) -> bool:
    """
    Have the kernel hand the listening TCP port's connections to the process only once the client
    has sent something, or C{seconds} after the handshake at the earliest (Linux
    C{TCP_DEFER_ACCEPT}; nginx's C{listen ... deferred}, HAProxy's C{bind ... defer-accept}). For
    protocols where the client speaks first: a connection opened and left idle costs the process
    no accept, descriptor or timer until then (the kernel keeps it half-open, resending its SYN-ACK,
    and passes it on at the first byte or at the first ACK after C{seconds}). Other ports (UNIX
    sockets, in-memory test ports, a system without the option) are left as they are.

    @param port: A listening port.
    @param seconds: At least this long (rounded up to the kernel's retransmission steps); 0 for no
        deferral.
    @return: Whether the option was set.
    """
    option = getattr(socket, "TCP_DEFER_ACCEPT", None)
    # Twisted's listening TCP port keeps its socket there (it has no getHandle).
    handle = getattr(port, "socket", None)
    if not seconds or option is None or handle is None:
        return False
    if getattr(handle, "family", None) not in (socket.AF_INET, socket.AF_INET6):
        return False
    handle.setsockopt(socket.IPPROTO_TCP, option, max(1, math.ceil(seconds)))
    return True


__all__ = [
    "MAX_ACCEPTS_PER_READ",
    "MAX_DATAGRAMS_PER_READ",
    "BoundedUDPPort",
    "boundAccepts",
    "deferAccept",
    "readAtAccept",
    "listenUDP",
]
