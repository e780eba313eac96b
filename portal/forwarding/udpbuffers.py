"""
Socket buffers of the UDP sockets on the datagram path.

Linux gives a UDP socket about 208 KiB of receive buffer by default: 92 datagrams of 1,400 bytes on
loopback, about 2 ms at 500 Mbit/s. A relay or tunnel process that is off the CPU longer than that
loses datagrams in the kernel (benchmark scenario 6b measured 40% loss at 500 Mbit/s, all of it at
full receive buffers). Asking for more needs no privilege up to C{net.core.rmem_max} /
C{net.core.wmem_max}, and the kernel only uses the memory while datagrams are queued.
"""

from __future__ import annotations

import socket
from typing import Any

#: Bytes of receive and send buffer asked for on each UDP socket of the datagram path.
UDP_BUFFER = 4 * 1024 * 1024


def enlargeBuffers(port: Any, size: int = UDP_BUFFER) -> int | None:
    """
    Ask for C{size} bytes of receive and send buffer on a listening UDP port's socket; the kernel
    grants what its limits allow.

    @param port: What C{listenUDP} returned (a port without a socket, as in-memory tests use, is
        left alone).
    @return: The receive buffer the kernel reports (Linux reports twice what it grants), or
        L{None} when C{port} has no socket.
    """
    getHandle = getattr(port, "getHandle", None)
    if getHandle is None:
        return None
    handle = getHandle()
    if not isinstance(handle, socket.socket):
        return None
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            handle.setsockopt(socket.SOL_SOCKET, option, size)
        except OSError:
            pass
    granted: int = handle.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    return granted
