"""
Tests for L{portal.relay.earlyhandoff}: visitors handed to the worker holding their lease as they are
accepted, from their ClientHello peeked at in the socket.
"""

from __future__ import annotations

import errno
import os
import socket
from typing import Any

import attrs
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from benchmarks.attacker import clientHello
from portal.relay import earlyhandoff
from portal.relay.earlyhandoff import EarlyHandoff, PeekingListener, peekAtAccept
from portal.wire.clienthello import MalformedClientHello, parseClientHello
from portal.wire.handoff import Handoff
from tests.test_clienthello import (
    _clientHelloBody,
    _extension,
    _handshake,
    _records,
    _serverNameExtension,
    _vector16,
)


@attrs.frozen
class _Member:
    id: str
    nodeName: str


class _Sender:
    """
    Records the handoffs it is asked to send; sends them when C{works}.
    """

    def __init__(self) -> None:
        self.works = True
        self.sent: list[tuple[str, int, Handoff]] = []

    def send(self, memberId: str, fd: int, handoff: Handoff) -> bool:
        self.sent.append((memberId, fd, handoff))
        return self.works


class _Links:
    """
    A cluster view in which C{elsewhere.localhost} is live on worker 1 of this relay.
    """

    def __init__(self) -> None:
        self.handoff: _Sender | None = _Sender()

    def holderElsewhere(self, hostname: str) -> _Member | None:
        if hostname == "elsewhere.localhost":
            return _Member("relay-w1", "w1")
        return None


class _Router:
    """
    A router holding C{here.localhost}, whose own name is C{relay.localhost}.
    """

    relayDomain = "relay.localhost"

    def __init__(self) -> None:
        self.counters: dict[str, int] = {}

    def poolFor(self, hostname: str) -> object | None:
        return object() if hostname == "here.localhost" else None


class EarlyHandoffTests(SynchronousTestCase):
    """
    L{EarlyHandoff} sends a socket whose ClientHello names a lease live on another worker, and
    leaves every other socket as it was, unread.
    """

    def setUp(self) -> None:
        self.router = _Router()
        self.links = _Links()
        self.early = EarlyHandoff(self.router, self.links)  # type: ignore[arg-type]
        self.accepted, self.client = socket.socketpair()
        self.addCleanup(self.accepted.close)
        self.addCleanup(self.client.close)

    def assertKept(self, sent: bytes) -> None:
        """
        Have the client send C{sent}; assert the socket is not taken, and those bytes are all
        still to read.
        """
        self.client.sendall(sent)
        self.assertFalse(self.early(self.accepted))
        self.assertNotEqual(self.accepted.fileno(), -1)
        self.accepted.setblocking(False)
        self.assertEqual(self.accepted.recv(len(sent) + 10) if sent else b"", sent)
        self.assertEqual(self.router.counters, {})

    def test_handedOver(self) -> None:
        """
        A complete ClientHello for a lease live on another worker: the socket is sent to it, as a
        visitor of which nothing was read, and this worker's copy is closed; counted.
        """
        self.client.sendall(clientHello("elsewhere.localhost"))
        fd = self.accepted.fileno()
        self.assertTrue(self.early(self.accepted))
        assert self.links.handoff is not None
        self.assertEqual(self.links.handoff.sent, [("relay-w1", fd, Handoff())])
        self.assertEqual(self.accepted.fileno(), -1)
        self.assertEqual(self.router.counters, {"handed_off": 1, "handed_off_at_accept": 1})

    def test_nameAsSent(self) -> None:
        """
        The name is compared in its normal form (case and a trailing dot as a client may send
        them), as the usual path compares it.
        """
        self.client.sendall(clientHello("ElseWhere.LOCALHOST."))
        self.assertTrue(self.early(self.accepted))
        assert self.links.handoff is not None
        self.assertEqual([m for m, _, _ in self.links.handoff.sent], ["relay-w1"])

    def test_malformedElsewhereHandedOver(self) -> None:
        """
        Only the host name is looked for here: a ClientHello naming a lease live on another worker
        but malformed further on is handed over (the adopting worker parses it whole and refuses
        it there).
        """
        emptyALPN = _extension(16, _vector16(b""))
        hello = _records(
            _handshake(_clientHelloBody([_serverNameExtension(b"elsewhere.localhost"), emptyALPN]))
        )
        with self.assertRaises(MalformedClientHello):
            parseClientHello(hello)
        self.client.sendall(hello)
        self.assertTrue(self.early(self.accepted))

    def test_refusedNameKept(self) -> None:
        """
        A host name the usual path refuses is left to it, unread.
        """
        self.assertKept(_records(_handshake(_clientHelloBody([_serverNameExtension(b"a..b")]))))

    def test_namesRemembered(self) -> None:
        """
        The normal form of each name is worked out once; at most L{earlyhandoff.NAMES_REMEMBERED}
        names are kept (a flood of made-up names empties the table now and then).
        """
        self.patch(earlyhandoff, "NAMES_REMEMBERED", 2)
        normalized: list[bytes] = []
        real = earlyhandoff.normalizeHostName

        def counting(sent: bytes) -> str | None:
            normalized.append(sent)
            return real(sent)

        self.patch(earlyhandoff, "normalizeHostName", counting)
        names = ["elsewhere.localhost", "elsewhere.localhost", "a.localhost", "b.localhost"]
        for name in names:
            accepted, client = socket.socketpair()
            self.addCleanup(accepted.close)
            self.addCleanup(client.close)
            client.sendall(clientHello(name))
            self.early(accepted)
            self.assertLessEqual(len(self.early._names), 2)
        self.assertEqual(normalized, [b"elsewhere.localhost", b"a.localhost", b"b.localhost"])

    def test_loggedOnce(self) -> None:
        """
        The first visitor handed over is logged; the later ones are only counted (a line per
        visitor would cost more than the handoff).
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]
        for _ in range(3):
            accepted, client = socket.socketpair()
            self.addCleanup(accepted.close)
            self.addCleanup(client.close)
            client.sendall(clientHello("elsewhere.localhost"))
            self.assertTrue(self.early(accepted))
        logged = [formatEvent(e) for e in events]
        self.assertEqual(len(logged), 1)
        self.assertIn("handed a visitor for elsewhere.localhost to worker w1", logged[0])
        self.assertEqual(self.router.counters["handed_off_at_accept"], 3)

    def test_nothingYet(self) -> None:
        """
        A socket with nothing to read yet is left to the usual path.
        """
        self.assertKept(b"")

    def test_incomplete(self) -> None:
        """
        An incomplete ClientHello is left, unread.
        """
        self.assertKept(clientHello("elsewhere.localhost")[:30])

    def test_notTLS(self) -> None:
        """
        Bytes that are no ClientHello are left, unread (the usual path refuses them).
        """
        self.assertKept(b"GET / HTTP/1.1\r\n\r\n")

    def test_localOrOwnOrUnknown(self) -> None:
        """
        A lease live on this worker, the relay's own name, and a name live nowhere are left.
        """
        for name in ("here.localhost", "relay.localhost", "nowhere.localhost"):
            self.setUp()
            self.assertKept(clientHello(name))

    def test_sendFails(self) -> None:
        """
        When the other worker cannot be sent the socket, it stays here, unread.
        """
        assert self.links.handoff is not None
        self.links.handoff.works = False
        self.assertKept(clientHello("elsewhere.localhost"))

    def test_noSender(self) -> None:
        """
        Without a handoff sender (not started yet), nothing is handed over.
        """
        self.links.handoff = None
        self.assertKept(clientHello("elsewhere.localhost"))


class _Listening:
    """
    A listening socket whose connections are the given sockets, then C{EAGAIN}.
    """

    family = socket.AF_INET

    def __init__(self, connections: list[socket.socket]) -> None:
        self.connections = connections

    def accept(self) -> tuple[socket.socket, Any]:
        if not self.connections:
            raise BlockingIOError(errno.EAGAIN, "none")
        return self.connections.pop(0), ("198.51.100.7", 5000)


class PeekingListenerTests(SynchronousTestCase):
    """
    L{PeekingListener.accept} returns the first connection its C{early} does not take.
    """

    def sockets(self, count: int) -> list[socket.socket]:
        """
        @return: C{count} sockets, closed after the test.
        """
        made = []
        for _ in range(count):
            one, other = socket.socketpair()
            self.addCleanup(one.close)
            self.addCleanup(other.close)
            made.append(one)
        return made

    def test_skipsTaken(self) -> None:
        """
        Connections C{early} takes are not returned; the next one is, with its address; with none
        left, C{EAGAIN} as from the listening socket itself.
        """
        first, second, third = self.sockets(3)
        taken = {first.fileno()}
        listener = PeekingListener(
            _Listening([first, second, third]),  # type: ignore[arg-type]
            lambda s: s.fileno() in taken,
        )
        self.assertEqual(listener.accept(), (second, ("198.51.100.7", 5000)))
        self.assertEqual(listener.accept()[0], third)
        with self.assertRaises(BlockingIOError):
            listener.accept()

    def test_batchBounded(self) -> None:
        """
        One call takes at most L{earlyhandoff.MAX_ACCEPTS_PER_READ} connections, then ends the
        port's batch with C{EAGAIN}, leaving the rest for the next turn.
        """
        self.patch(earlyhandoff, "MAX_ACCEPTS_PER_READ", 2)
        listening = _Listening(self.sockets(3))
        listener = PeekingListener(listening, lambda s: True)  # type: ignore[arg-type]
        with self.assertRaises(BlockingIOError) as e:
            listener.accept()
        self.assertEqual(e.exception.errno, errno.EAGAIN)
        self.assertEqual(len(listening.connections), 1)

    def test_acceptEarly(self) -> None:
        """
        L{PeekingListener.acceptEarly} hands over what C{early} takes and says whether the port
        has work: not after C{EAGAIN}; yes with a connection C{early} left (the port's next
        accept returns it first, then goes on as usual).
        """
        first, second, third = self.sockets(3)
        taken = {first.fileno()}
        listener = PeekingListener(
            _Listening([first, second, third]),  # type: ignore[arg-type]
            lambda s: s.fileno() in taken,
        )
        self.assertTrue(listener.acceptEarly())
        self.assertEqual(listener.accept()[0], second)
        self.assertEqual(listener.accept()[0], third)
        with self.assertRaises(BlockingIOError):
            listener.accept()
        self.assertFalse(listener.acceptEarly())

    def test_acceptEarlyBounded(self) -> None:
        """
        L{PeekingListener.acceptEarly} takes at most L{earlyhandoff.MAX_ACCEPTS_PER_READ}
        connections, leaving the rest for the next read event, and leaves the port nothing to do.
        """
        self.patch(earlyhandoff, "MAX_ACCEPTS_PER_READ", 2)
        listening = _Listening(self.sockets(3))
        listener = PeekingListener(listening, lambda s: True)  # type: ignore[arg-type]
        self.assertFalse(listener.acceptEarly())
        self.assertEqual(len(listening.connections), 1)

    def test_acceptEarlyError(self) -> None:
        """
        An accept error other than C{EAGAIN} is left to the port (its own accept meets it again).
        """

        class Failing(_Listening):
            def accept(self) -> tuple[socket.socket, Any]:
                raise OSError(errno.EMFILE, "too many open files")

        listener = PeekingListener(Failing([]), lambda s: True)  # type: ignore[arg-type]
        self.assertTrue(listener.acceptEarly())

    def test_delegates(self) -> None:
        """
        Everything but C{accept} is the listening socket's.
        """
        listener = PeekingListener(_Listening([]), lambda s: False)  # type: ignore[arg-type]
        self.assertEqual(listener.family, socket.AF_INET)


class PeekAtAcceptTests(SynchronousTestCase):
    """
    L{peekAtAccept} puts a L{PeekingListener} in front of a port's listening socket.
    """

    def test_port(self) -> None:
        """
        A port with a listening socket gets the stand-in, around the same socket.
        """
        listening = socket.socket()
        self.addCleanup(listening.close)

        class Port:
            socket = listening

        port = Port()
        self.assertTrue(peekAtAccept(port, lambda s: False))
        self.assertIsInstance(port.socket, PeekingListener)
        self.assertEqual(port.socket.fileno(), listening.fileno())

    def test_readEvents(self) -> None:
        """
        A read event whose visitors are all handed over never enters the port's own accept loop;
        one with a visitor left runs it, and its accept returns that visitor first.
        """
        path = os.path.join(self.mktemp())
        listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(listening.close)
        listening.bind(path)
        listening.listen(8)
        listening.setblocking(False)
        served: list[socket.socket] = []

        class Port:
            socket = listening
            reads = 0

            def doRead(self) -> None:
                # As Twisted's port: accept until EAGAIN.
                self.reads += 1
                while True:
                    try:
                        connection, _ = self.socket.accept()
                    except BlockingIOError:
                        return
                    served.append(connection)
                    self.addCleanup(connection.close)

        port = Port()
        port.addCleanup = self.addCleanup  # type: ignore[attr-defined]
        handOver = [True]
        seen: list[socket.socket] = []

        def early(connection: socket.socket) -> bool:
            seen.append(connection)
            if handOver[0]:
                connection.close()
            return handOver[0]

        def connect() -> None:
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.addCleanup(client.close)
            client.connect(path)

        self.assertTrue(peekAtAccept(port, early))
        connect()
        connect()
        port.doRead()
        self.assertEqual((len(seen), port.reads, served), (2, 0, []))
        handOver[0] = False
        connect()
        connect()
        port.doRead()
        self.assertEqual((len(seen), port.reads, len(served)), (4, 1, 2))
        self.assertIs(served[0], seen[2])

    def test_noSocket(self) -> None:
        """
        Other ports (in memory, UNIX) are left as they are.
        """
        self.assertFalse(peekAtAccept(object(), lambda s: False))
