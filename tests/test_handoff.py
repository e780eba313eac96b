"""
Tests for L{portal.relay.handoff}: workers hand visitors' sockets to each other over UNIX datagram
sockets (in-process socket pairs stand for the visitors' connections).
"""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from portal.relay import handoff
from portal.relay.handoff import HandoffReceiver, HandoffSender, handoffPath, workerIndexOf


class _Recording(Protocol):
    """
    Records the bytes it gets.
    """

    def __init__(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data


class _Visitor(_Recording):
    """
    A visitor protocol that may be forwarded, as the public listener's are.
    """

    mayForward = True


class _Reactor:
    """
    The reactor calls a receiver makes: readers, and adopting a connection (a duplicate of its
    descriptor, as Twisted takes, and a protocol from the factory on an in-memory transport).
    """

    def __init__(self) -> None:
        self.readers: list[Any] = []
        self.adopted: list[tuple[int, int, Protocol]] = []

    def addReader(self, reader: Any) -> None:
        self.readers.append(reader)

    def removeReader(self, reader: Any) -> None:
        self.readers.remove(reader)

    def adoptStreamConnection(self, fd: int, family: int, factory: Any) -> None:
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(StringTransport())
        self.adopted.append((os.dup(fd), family, protocol))


class NamesTests(SynchronousTestCase):
    """
    Workers' member ids and their receiving names.
    """

    def test_workerIndex(self) -> None:
        """
        A member id C{RELAY-wI} is worker I of relay RELAY; anything else is not a worker of it.
        """
        self.assertEqual(workerIndexOf("abc-w1", "abc"), 1)
        self.assertEqual(workerIndexOf("abc-w12", "abc"), 12)
        self.assertIsNone(workerIndexOf("abd-w1", "abc"))
        self.assertIsNone(workerIndexOf("abc-wx", "abc"))
        self.assertIsNone(workerIndexOf("abc", "abc"))

    def test_paths(self) -> None:
        """
        Names are in the abstract namespace, one per state directory and worker.
        """
        name = handoffPath("/var/lib/portal", 1)
        self.assertTrue(name.startswith("\0"))
        self.assertLess(len(name), 100)
        self.assertNotEqual(name, handoffPath("/var/lib/portal", 2))
        self.assertNotEqual(name, handoffPath("/var/lib/other", 1))
        self.assertEqual(name, handoffPath("/var/lib/portal/", 1))


class HandoffTests(SynchronousTestCase):
    """
    A visitor's socket sent by one worker is adopted by the other, with the bytes read so far.
    """

    def setUp(self) -> None:
        self.root = self.mktemp()
        self.reactor = _Reactor()
        self.receiver = HandoffReceiver(
            self.reactor, handoffPath(self.root, 1), Factory.forProtocol(_Recording)
        )
        self.receiver.start()
        self.addCleanup(self.receiver.stop)
        self.sender = HandoffSender(self.root, "relay", 0)
        self.addCleanup(self.sender.close)
        self.visitor, self.client = socket.socketpair()
        self.addCleanup(self.visitor.close)
        self.addCleanup(self.client.close)

    def test_adopted(self) -> None:
        """
        The receiving worker adopts the very socket (what the client sends reaches it), and its
        protocol gets the bytes the sender had read first.
        """
        self.assertEqual(self.reactor.readers, [self.receiver])
        self.assertTrue(self.sender.send("relay-w1", self.visitor.fileno(), b"CLIENTHELLO"))
        self.receiver.doRead()
        [(fd, family, protocol)] = self.reactor.adopted
        self.assertEqual(family, socket.AF_UNIX)
        self.assertEqual(protocol.received, b"CLIENTHELLO")  # type: ignore[attr-defined]
        with socket.socket(fileno=fd) as adopted:
            self.client.sendall(b"more")
            self.assertEqual(adopted.recv(10), b"more")

    def test_notHandedOn(self) -> None:
        """
        A visitor adopted from another worker may not be handed on or forwarded again (two
        workers that disagree for a moment would pass it back and forth).
        """
        receiver = HandoffReceiver(
            self.reactor, handoffPath(self.root, 2), Factory.forProtocol(_Visitor)
        )
        receiver.start()
        self.addCleanup(receiver.stop)
        self.assertTrue(self.sender.send("relay-w2", self.visitor.fileno(), b"x"))
        receiver.doRead()
        [(fd, _, protocol)] = self.reactor.adopted
        os.close(fd)
        self.assertFalse(protocol.mayForward)  # type: ignore[attr-defined]
        self.assertEqual(protocol.received, b"x")  # type: ignore[attr-defined]

    def test_notAWorker(self) -> None:
        """
        Members that are not other workers of this relay, this worker itself, and a worker that
        does not listen are not sent anything.
        """
        fd = self.visitor.fileno()
        self.assertFalse(self.sender.send("other-w1", fd, b""))
        self.assertFalse(self.sender.send("relay-w0", fd, b""))
        self.assertFalse(self.sender.send("relay-w2", fd, b""))
        self.assertFalse(self.sender.send("relay-w1", fd, b"x" * (handoff.MAX_HANDOFF + 1)))
        self.receiver.doRead()
        self.assertEqual(self.reactor.adopted, [])

    def test_otherUserRefused(self) -> None:
        """
        A visitor from a sender running as another user is refused (its descriptor closed) and
        logged.
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]
        self.patch(handoff.os, "getuid", lambda: 4242)
        self.assertTrue(self.sender.send("relay-w1", self.visitor.fileno(), b"x"))
        self.receiver.doRead()
        self.assertEqual(self.reactor.adopted, [])
        self.assertTrue(any("not this relay's" in e["log_format"] for e in events))

    def test_stop(self) -> None:
        """
        A stopped receiver is no reader any more, and nothing can be sent to it.
        """
        other = HandoffReceiver(
            self.reactor, handoffPath(self.root, 3), Factory.forProtocol(_Recording)
        )
        other.start()
        self.assertTrue(self.sender.send("relay-w3", self.visitor.fileno(), b"x"))
        other.stop()
        self.assertEqual(self.reactor.readers, [self.receiver])
        self.assertFalse(self.sender.send("relay-w3", self.visitor.fileno(), b"x"))
