"""
Writing datagrams to addresses on an unconnected UDP port, without Twisted's per-datagram address
check.

Twisted's C{udp.Port.write(datagram, addr)} checks on every call that C{addr}'s host is an IP
literal of the port's family (C{isIPAddress} and C{isIPv6Address}, the latter raising and catching
an exception for every IPv4 address): benchmark scenario 6b found a third of the relay's CPU time
per datagram in these checks. L{DatagramWriter} lets Twisted check a host once, with the datagram
that first goes to it, and sends later datagrams to that host straight from the socket (on a
L{BoundedUDPPort <portal.forwarding.boundedreads.BoundedUDPPort>}, through its C{sendChecked}, which
sends the datagrams of a read burst in groups: L{portal.forwarding.udpbatch}). A send that fails is handed back to Twisted's C{write}, which retries it and turns the error into the
exceptions Twisted documents (C{MessageLengthError}; a refusal ignored), so callers see exactly
what C{Port.write} would have given them.
"""

from __future__ import annotations

import socket
from typing import Any

#: Most hosts a writer remembers as checked; past it, it forgets them all and checks them again.
MAX_CHECKED_HOSTS = 4096


class DatagramWriter:
    """
    Writes datagrams to addresses through one listening UDP port.

    @ivar port: The port written through.
    @ivar checked: The hosts Twisted has accepted since the writer last forgot them.
    """

    def __init__(self, port: Any, maxChecked: int = MAX_CHECKED_HOSTS) -> None:
        """
        @param port: What C{listenUDP} returned; a port without a socket (as in-memory tests use)
            gets every datagram through its C{write}.
        @param maxChecked: Most hosts remembered as checked.
        """
        self.port = port
        self._maxChecked = maxChecked
        getHandle = getattr(port, "getHandle", None)
        handle = getHandle() if getHandle is not None else None
        self._sendto = handle.sendto if isinstance(handle, socket.socket) else None
        sendChecked = getattr(port, "sendChecked", None)
        if self._sendto is not None and sendChecked is not None:
            # A bounded port queues the datagrams of a read burst to send them in groups.
            self._sendto = sendChecked
        self.checked: set[str] = set()

    def write(self, datagram: bytes, address: tuple[Any, ...]) -> None:
        """
        Send one datagram to C{address}.

        @param datagram: The datagram.
        @param address: C{(host, port)} with C{host} an IP literal, as C{Port.write} takes it.
        @raise twisted.internet.error.InvalidAddressError: For a host that is not an IP literal of
            the port's family.
        @raise twisted.internet.error.MessageLengthError: For a datagram too large to send.
        @raise OSError: For other send errors, as C{Port.write} raises them.
        """
        sendto = self._sendto
        host = address[0]
        if sendto is not None and host in self.checked:
            try:
                sendto(datagram, address)
            except OSError:
                self.port.write(datagram, address)
            return
        self.port.write(datagram, address)
        if sendto is not None:
            if len(self.checked) >= self._maxChecked:
                self.checked.clear()
            self.checked.add(host)
