"""
Listeners shared by several processes with C{SO_REUSEPORT}, for a relay's C{--workers N}.

The kernel spreads new connections over the processes listening on the same address. For the
control port that is not enough: a tunnel's data sessions must reach the process that holds its
control session, so the control listeners also carry a classic BPF program
(C{SO_ATTACH_REUSEPORT_CBPF}) that picks the process by the connection's source address alone: every
connection from one tunnel host reaches the same worker.

Raw TCP lease ports are shared too (L{listenSharedTCP}): the worker holding a lease and the others
(which hand its visitors over) all bind the port with C{SO_REUSEPORT}, and the kernel spreads the
port's visitors over them. Linux lets a socket join a group only when every socket in it set the
option and runs under the same effective user: a port another user's process holds, or one a process
bound without the option, still cannot be bound.

UDP lease ports are shared the same way (L{listenSharedUDP}): the kernel picks a socket of the group
by a hash of each datagram's addresses and ports, so one visitor's datagrams (one source address and
port) always reach the same worker. The relay's tunnel-facing UDP socket, on the control port's
number, carries the control port's steering program, so that a tunnel's sealed datagrams reach the
worker its control session reached: the program picks the I{position} of a socket in its group, so
each worker binds its control listener and its tunnel-facing UDP socket together, while it holds
L{bindingTogether}'s lock, and the two sockets take the same position in their groups.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.internet.protocol import DatagramProtocol

from portal.forwarding.boundedreads import BoundedUDPPort

#: C{SO_ATTACH_REUSEPORT_CBPF} from Linux's C{asm-generic/socket.h}.
SO_ATTACH_REUSEPORT_CBPF = 51

#: Classic BPF's offset of the network header (C{SKF_NET_OFF}).
_NET = -0x100000

_LD_B_ABS = 0x30
_LD_W_ABS = 0x20
_RSH_K = 0x74
_JEQ_K = 0x15
_JA = 0x05
_MOD_K = 0x94
_RET_A = 0x16


class ReusePortError(ValueError):
    """
    An endpoint description this module cannot share between processes.
    """


def _instruction(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k & 0xFFFFFFFF)


def sourceSteeringProgram(workers: int) -> bytes:
    """
    A classic BPF program for a reuseport group: the index of the socket is the connection's source
    address (IPv4, or the last 32 bits of IPv6) modulo C{workers}.

    @param workers: The number of sockets in the group.
    @return: The instructions, 8 bytes each.
    """
    if workers < 1:
        raise ValueError("at least one worker")
    return b"".join(
        [
            _instruction(_LD_B_ABS, 0, 0, _NET),  # A = first byte of the IP header
            _instruction(_RSH_K, 0, 0, 4),  # A = IP version
            _instruction(_JEQ_K, 2, 0, 6),  # IPv6: skip to the IPv6 load
            _instruction(_LD_W_ABS, 0, 0, _NET + 12),  # IPv4 source address
            _instruction(_JA, 0, 0, 1),
            _instruction(_LD_W_ABS, 0, 0, _NET + 20),  # last 32 bits of the IPv6 source
            _instruction(_MOD_K, 0, 0, workers),
            _instruction(_RET_A, 0, 0, 0),
        ]
    )


def attachSteering(sock: socket.socket, workers: int) -> None:
    """
    Attach L{sourceSteeringProgram} to C{sock}'s reuseport group.

    @raise OSError: When the kernel refuses it.
    """
    program = sourceSteeringProgram(workers)
    buffer = ctypes.create_string_buffer(program)
    fprog = struct.pack("HL", len(program) // 8, ctypes.addressof(buffer))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)


def parseTCPDescription(description: str) -> tuple[int, str, int]:
    """
    Parse the C{tcp:PORT[:interface=HOST][:backlog=N]} endpoint descriptions a worker can share.

    @return: Port, interface (C{""} for all) and backlog.
    @raise ReusePortError: For anything else.
    """
    parts = description.split(":")
    if parts[0] != "tcp" or len(parts) < 2 or not parts[1].isdigit():
        raise ReusePortError(
            f"{description!r}: with --workers, listeners must be tcp:PORT[:interface=HOST]"
        )
    options = {}
    for part in parts[2:]:
        key, sep, value = part.partition("=")
        if not sep or key not in ("interface", "backlog"):
            raise ReusePortError(f"{description!r}: {part!r} is not supported with --workers")
        options[key] = value
    backlog = options.get("backlog", "50")
    if not backlog.isdigit():
        raise ReusePortError(f"{description!r}: backlog must be a number")
    return int(parts[1]), options.get("interface", ""), int(backlog)


def listenReusePort(
    reactor: Any, description: str, factory: IProtocolFactory, steerWorkers: int | None = None
) -> IListeningPort:
    """
    Listen on a TCP address that other processes share.

    @param reactor: An C{IReactorSocket}.
    @param description: C{tcp:PORT[:interface=HOST][:backlog=N]}.
    @param factory: The protocol factory.
    @param steerWorkers: Steer connections by source address over this many workers, or L{None}
        to let the kernel spread them.
    @return: The listening port.
    @raise ReusePortError: For a description that cannot be shared.
    @raise OSError: When binding fails.
    """
    port, interface, backlog = parseTCPDescription(description)
    return _listenShared(reactor, port, interface, backlog, factory, steerWorkers)


def listenSharedTCP(
    reactor: Any, port: int, interface: str, factory: IProtocolFactory, backlog: int = 50
) -> IListeningPort:
    """
    Listen on a TCP port that other processes of this user share (with C{SO_REUSEPORT}, as
    L{listenReusePort}), failing as C{reactor.listenTCP} does.

    @param reactor: An C{IReactorSocket}.
    @param port: The port number.
    @param interface: The address to bind (C{""} for all IPv4 addresses).
    @param factory: The protocol factory.
    @param backlog: The listen queue's length.
    @return: The listening port.
    @raise CannotListenError: When binding fails (a process bound the port without
        C{SO_REUSEPORT}, or as another user).
    """
    try:
        return _listenShared(reactor, port, interface, backlog, factory, None)
    except OSError as e:
        raise CannotListenError(interface, port, e) from None


def _listenShared(
    reactor: Any,
    port: int,
    interface: str,
    backlog: int,
    factory: IProtocolFactory,
    steerWorkers: int | None,
) -> IListeningPort:
    """
    Bind and listen with C{SO_REUSEPORT}, then hand the socket to the reactor.

    @raise OSError: When binding fails.
    """
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((interface or ("::" if family == socket.AF_INET6 else "0.0.0.0"), port))
        sock.listen(backlog)
        if steerWorkers is not None:
            attachSteering(sock, steerWorkers)
        sock.setblocking(False)
        adopted: IListeningPort = reactor.adoptStreamPort(sock.fileno(), family, factory)
        return adopted
    finally:
        # The reactor holds its own duplicate of the descriptor.
        sock.close()


class SharedUDPPort(BoundedUDPPort):
    """
    A L{BoundedUDPPort} bound with C{SO_REUSEPORT}, optionally steering the group's datagrams by
    source address (L{sourceSteeringProgram}).

    @ivar steerWorkers: Steer over this many sockets, or L{None} to let the kernel hash.
    """

    steerWorkers: int | None = None

    def createInternetSocket(self) -> socket.socket:
        """
        A UDP socket that may share its port with this user's other sockets.
        """
        skt = super().createInternetSocket()
        skt.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        return skt

    def _bindSocket(self) -> None:
        """
        Bind, then attach the steering program if asked.

        @raise CannotListenError: When binding or attaching fails.
        """
        super()._bindSocket()  # type: ignore[no-untyped-call]
        if self.steerWorkers is not None:
            try:
                attachSteering(self.socket, self.steerWorkers)
            except OSError as e:
                self.socket.close()
                raise CannotListenError(self.interface, self.port, e) from None


def listenSharedUDP(
    reactor: Any,
    port: int,
    protocol: DatagramProtocol,
    interface: str = "",
    maxPacketSize: int = 8192,
    steerWorkers: int | None = None,
    coalesced: bool = False,
) -> IListeningPort:
    """
    Listen for datagrams on a UDP port that other processes of this user share (with
    C{SO_REUSEPORT}), failing as C{reactor.listenUDP} does; reads are bounded as
    L{portal.forwarding.boundedreads.listenUDP}'s.

    @param reactor: A posix reactor (C{addReader}).
    @param port: The port number.
    @param protocol: The datagram protocol.
    @param interface: The address to bind (C{""} for all IPv4 addresses).
    @param maxPacketSize: The largest datagram read.
    @param steerWorkers: Steer datagrams by source address over this many workers, or L{None} to
        let the kernel spread them by their addresses and ports.
    @param coalesced: Take segmented groups whole (L{BoundedUDPPort.coalesced}).
    @return: The listening port.
    @raise CannotListenError: When binding fails (a process bound the port without
        C{SO_REUSEPORT}, or as another user).
    """
    shared = SharedUDPPort(port, protocol, interface, maxPacketSize, reactor)  # type: ignore[no-untyped-call]
    shared.steerWorkers = steerWorkers
    shared.coalesced = coalesced
    shared.startListening()
    return shared


@contextmanager
def bindingTogether(path: str) -> Iterator[None]:
    """
    Hold an exclusive lock (C{flock} on C{path}, created if need be) while this process binds
    sockets that must take the same position in their reuseport groups as each other: no other
    worker binds in between.

    @param path: The lock file, the same for every worker of a relay.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
