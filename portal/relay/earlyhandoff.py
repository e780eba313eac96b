"""
Handing a visitor to the worker holding its lease as it is accepted (C{--workers}), before this
worker has built anything for it.

The kernel spreads the public port's visitors over the workers, so with two workers half of them
reach a worker that does not hold their lease. Handing such a visitor over after the usual path (a
Twisted transport, the connection caps' wrapper, a L{VisitorProtocol
<portal.relay.public.VisitorProtocol>}, a timer and a reactor turn to read its ClientHello) costs
this worker about a third of what serving it would. The public listener defers its accepts until the
client has sent something (C{TCP_DEFER_ACCEPT}), so the ClientHello is usually in the socket when it
is accepted: L{PeekingListener} peeks at it there, and when its name is live on another worker of
this relay, sends the socket as it is (L{portal.relay.handoff}, a handoff of the kind "nothing
read") and closes this worker's copy; the adopting worker reads the ClientHello itself. Anything
else (nothing to peek yet, no host name found, the relay's own name, a lease live here or nowhere,
a handoff that cannot be sent) goes the usual way, where the same decisions are made and refusals
are counted.

This worker only looks for the host name (L{peekHostName <portal.wire.clienthello.peekHostName>},
0.7 us where a full parse takes 12) and remembers the normal form of the names it saw: the adopting
worker parses the whole ClientHello, so one that names a lease but is malformed elsewhere is refused
(and counted) there instead of here.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable
from typing import Any

from twisted.logger import Logger

from portal.forwarding.boundedreads import MAX_ACCEPTS_PER_READ
from portal.relay.memberlink import MemberLinks
from portal.relay.router import Router
from portal.wire.clienthello import normalizeHostName, peekHostName
from portal.wire.handoff import Handoff

#: The most bytes peeked at: a ClientHello fits (the public listener reads at most this much
#: before deciding, too); a longer one is left to the usual path.
PEEK_BYTES = 16 * 1024
#: Host names remembered with their normal form (each at most 255 bytes).
NAMES_REMEMBERED = 4096
_UNKNOWN: Any = object()


class PeekingListener:
    """
    Stands in for a listening TCP socket (Twisted's port calls its C{accept}): each accepted
    connection is first offered to C{early}, and only those it does not take are returned.

    Everything else is the listening socket's.
    """

    def __init__(self, listening: socket.socket, early: Callable[[socket.socket], bool]) -> None:
        """
        @param listening: The listening socket.
        @param early: Given each accepted socket; returns whether it took it (and closed it).
        """
        self._listening = listening
        self._early = early
        #: A connection L{acceptEarly} accepted and C{early} did not take, for the next L{accept}.
        self._pending: tuple[socket.socket, Any] | None = None

    def acceptEarly(self) -> bool:
        """
        Accept connections and offer them to C{early}, before the port does anything (a read event
        that only hands visitors over then costs no more than that).

        @return: Whether the port has work: a connection C{early} did not take (the port's next
            L{accept} returns it) or an error other than C{EAGAIN} (the port's own accept meets it
            again, and handles it as Twisted does); not after C{EAGAIN}, nor after
            L{MAX_ACCEPTS_PER_READ} connections taken (the rest wait for the next read event).
        """
        for _ in range(MAX_ACCEPTS_PER_READ):
            try:
                connection, address = self._listening.accept()
            except BlockingIOError:
                return False
            except OSError:
                return True
            if not self._early(connection):
                self._pending = (connection, address)
                return True
        return False

    def accept(self) -> tuple[socket.socket, Any]:
        """
        Accept the next connection C{early} does not take (first the one L{acceptEarly} kept).

        @return: Its socket and address.
        @raise OSError: C{EAGAIN} when none is waiting, or once L{MAX_ACCEPTS_PER_READ} were taken
            in this call (which ends the port's batch for this turn of the reactor).
        """
        pending = self._pending
        if pending is not None:
            self._pending = None
            return pending
        for _ in range(MAX_ACCEPTS_PER_READ):
            connection, address = self._listening.accept()
            if not self._early(connection):
                return connection, address
        raise BlockingIOError(errno.EAGAIN, "handed over a batch")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._listening, name)


class EarlyHandoff:
    """
    Decides, from a ClientHello peeked at in a newly accepted socket, whether another worker of
    this relay holds the visitor's lease, and sends it the socket.
    """

    _log = Logger()

    def __init__(self, router: Router, links: MemberLinks) -> None:
        """
        @param router: This worker's router (its own leases, the relay's own name, counters).
        @param links: This worker's cluster view (where leases are live) and handoff sender.
        """
        self._router = router
        self._links = links
        self._announced = False
        #: Host names as sent, normalised (L{None}: refused), for the last L{NAMES_REMEMBERED}.
        self._names: dict[bytes, Any] = {}

    def __call__(self, connection: socket.socket) -> bool:
        """
        Hand C{connection} over if its lease is live on another worker of this relay.

        @return: Whether it was handed over (and this worker's copy closed); if not, nothing was
            read from it.
        """
        sender = self._links.handoff
        if sender is None:
            return False
        try:
            peeked = connection.recv(PEEK_BYTES, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except OSError:
            return False
        if not peeked:
            return False
        sent = peekHostName(peeked)
        if sent is None:
            return False
        names = self._names
        hostname = names.get(sent, _UNKNOWN)
        if hostname is _UNKNOWN:
            # A flood of made-up names only empties the table now and then.
            hostname = normalizeHostName(sent)
            if len(names) >= NAMES_REMEMBERED:
                names.clear()
            names[sent] = hostname
        if hostname is None:
            return False
        router = self._router
        if hostname == router.relayDomain or router.poolFor(hostname) is not None:
            return False
        member = self._links.holderElsewhere(hostname)
        if member is None or not sender.send(member.id, connection.fileno(), Handoff()):
            return False
        # The other worker holds the connection now; closing this copy does not end it.
        connection.close()
        router.counters["handed_off"] = router.counters.get("handed_off", 0) + 1
        router.counters["handed_off_at_accept"] = router.counters.get("handed_off_at_accept", 0) + 1
        if not self._announced:
            # Once: a log line per visitor would cost more than the handoff itself (twistd
            # formats and writes every event); /metrics counts them.
            self._announced = True
            self._log.info(
                "handed a visitor for {hostname} to worker {member} as it was accepted (later "
                "ones are counted in handed_off_at_accept)",
                hostname=hostname,
                member=member.nodeName,
            )
        return True


def peekAtAccept(port: object, early: Callable[[socket.socket], bool]) -> bool:
    """
    Have a listening port made by Twisted offer each connection it accepts to C{early} first: its
    read events start with L{PeekingListener.acceptEarly}, and its own accept loop runs only when
    there is more to do.

    @param port: A Twisted TCP port (its listening socket is its C{socket}).
    @param early: See L{PeekingListener}.
    @return: Whether the port was changed (not for a port without a listening socket).
    """
    listening = getattr(port, "socket", None)
    if not isinstance(listening, socket.socket):
        return False
    listener = PeekingListener(listening, early)
    port.socket = listener  # type: ignore[attr-defined]
    portRead = getattr(port, "doRead", None)
    if portRead is None:
        return True

    def doRead() -> object:
        """
        The listening socket is readable: hand visitors over first; only what is left goes through
        the port's own accept loop (Twisted's log buffering, protocol and transport set-up).
        """
        if listener.acceptEarly():
            return portRead()
        return None

    port.doRead = doRead  # type: ignore[attr-defined]
    return True
