"""
Tests for L{portal.relay.handoff}: workers hand visitors' sockets to each other over UNIX datagram
sockets (in-process socket pairs stand for the visitors' connections).
"""

from __future__ import annotations

import array
import os
import socket
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import (
    EventLoggingObserver,
    StringTransport,
    StringTransportWithDisconnection,
)
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from portal.relay import handoff
from portal.relay.handoff import HandoffReceiver, HandoffSender, handoffPath, workerIndexOf
from portal.relay.ports import PortAllocator, PortRange
from portal.relay.rawtcp import RawVisitor, handedOverFactory, tcpPorts
from portal.relay.router import RelayLimits, Router
from portal.trust.identity import Identity
from portal.wire.attach import decodeStreamHeader
from portal.wire.handoff import Handoff, MalformedHandoff, encodeHandoff, parseHandoff
from tests.test_control import LABEL
from tests.test_rawtcp import _KEY, OwnerStub, PortsReactor, offerIdleSession

#: A TLS visitor's handoff (its bytes start a handshake record).
_TLS = Handoff(b"\x16\x03\x01hello")


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
        self.assertTrue(
            self.sender.send("relay-w1", self.visitor.fileno(), Handoff(b"\x16CLIENTHELLO"))
        )
        self.receiver.doRead()
        [(fd, family, protocol)] = self.reactor.adopted
        self.assertEqual(family, socket.AF_UNIX)
        self.assertEqual(protocol.received, b"\x16CLIENTHELLO")  # type: ignore[attr-defined]
        with socket.socket(fileno=fd) as adopted:
            self.client.sendall(b"more")
            self.assertEqual(adopted.recv(10), b"more")

    def test_adoptedUnread(self) -> None:
        """
        A visitor handed over before anything was read (only peeked at) is adopted with no bytes
        given to its protocol: the ClientHello is still in the socket for it to read.
        """
        self.client.sendall(b"\x16CLIENTHELLO")
        self.assertTrue(self.sender.send("relay-w1", self.visitor.fileno(), Handoff()))
        self.receiver.doRead()
        [(fd, _, protocol)] = self.reactor.adopted
        self.assertEqual(protocol.received, b"")  # type: ignore[attr-defined]
        with socket.socket(fileno=fd) as adopted:
            self.assertEqual(adopted.recv(20), b"\x16CLIENTHELLO")

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
        self.assertTrue(self.sender.send("relay-w2", self.visitor.fileno(), _TLS))
        receiver.doRead()
        [(fd, _, protocol)] = self.reactor.adopted
        os.close(fd)
        self.assertFalse(protocol.mayForward)  # type: ignore[attr-defined]
        self.assertEqual(protocol.received, _TLS.prefix)  # type: ignore[attr-defined]

    def test_notAWorker(self) -> None:
        """
        Members that are not other workers of this relay, this worker itself, and a worker that
        does not listen are not sent anything.
        """
        fd = self.visitor.fileno()
        self.assertFalse(self.sender.send("other-w1", fd, _TLS))
        self.assertFalse(self.sender.send("relay-w0", fd, _TLS))
        self.assertFalse(self.sender.send("relay-w2", fd, _TLS))
        big = Handoff(b"\x16" * (handoff.MAX_HANDOFF + 1))
        self.assertFalse(self.sender.send("relay-w1", fd, big))
        # A handoff that has no encoding is not sent either.
        self.assertFalse(self.sender.send("relay-w1", fd, Handoff(b"GET /")))
        self.receiver.doRead()
        self.assertEqual(self.reactor.adopted, [])

    def test_membersRemembered(self) -> None:
        """
        What each member id is (another worker's name, or nobody to send to) is worked out once
        and remembered, for at most C{_PATHS_REMEMBERED} ids; the answers stay the same.
        """
        self.patch(handoff, "_PATHS_REMEMBERED", 2)
        worked: list[str] = []
        real = handoff.workerIndexOf

        def counting(memberId: str, relayId: str) -> int | None:
            worked.append(memberId)
            return real(memberId, relayId)

        self.patch(handoff, "workerIndexOf", counting)
        fd = self.visitor.fileno()
        for _ in range(2):
            self.assertFalse(self.sender.send("other-w1", fd, _TLS))
            self.assertTrue(self.sender.send("relay-w1", fd, _TLS))
        self.assertEqual(worked, ["other-w1", "relay-w1"])
        self.assertFalse(self.sender.send("relay-w0", fd, _TLS))
        self.assertLessEqual(len(self.sender._paths), 2)
        self.assertTrue(self.sender.send("relay-w1", fd, _TLS))
        self.receiver.doRead()
        self.assertEqual(len(self.reactor.adopted), 3)
        for adoptedFd, _, _ in self.reactor.adopted:
            os.close(adoptedFd)

    def test_otherUserRefused(self) -> None:
        """
        A visitor from a sender running as another user is refused (its descriptor closed) and
        logged.
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]
        self.patch(handoff.os, "getuid", lambda: 4242)
        self.assertTrue(self.sender.send("relay-w1", self.visitor.fileno(), _TLS))
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
        self.assertTrue(self.sender.send("relay-w3", self.visitor.fileno(), _TLS))
        other.stop()
        self.assertEqual(self.reactor.readers, [self.receiver])
        self.assertFalse(self.sender.send("relay-w3", self.visitor.fileno(), _TLS))


class HandoffMessageTests(SynchronousTestCase):
    """
    L{portal.wire.handoff}: what travels with a visitor's socket.
    """

    def test_roundTrip(self) -> None:
        """
        A TLS visitor's bytes travel as they are; a raw TCP visitor's port as 0x00 and two bytes;
        a TLS visitor of which nothing was read as 0x01 alone; all parse back as sent.
        """
        tls = Handoff(b"\x16\x03\x01\x00\x05hello")
        self.assertEqual(encodeHandoff(tls), tls.prefix)
        self.assertEqual(parseHandoff(encodeHandoff(tls)), tls)
        for port in (1, 20000, 65535):
            raw = Handoff(tcpPort=port)
            self.assertEqual(encodeHandoff(raw), b"\x00" + port.to_bytes(2, "big"))
            self.assertEqual(parseHandoff(encodeHandoff(raw)), raw)
        self.assertEqual(encodeHandoff(Handoff()), b"\x01")
        self.assertEqual(parseHandoff(b"\x01"), Handoff())

    @given(port=st.integers(1, 65535), rest=st.binary(max_size=64))
    def test_roundTripAny(self, port: int, rest: bytes) -> None:
        """
        Every port and every TLS visitor's bytes parse back as sent.
        """
        self.assertEqual(parseHandoff(encodeHandoff(Handoff(tcpPort=port))), Handoff(tcpPort=port))
        tls = Handoff(b"\x16" + rest)
        self.assertEqual(parseHandoff(encodeHandoff(tls)), tls)

    @given(payload=st.binary(max_size=16))
    def test_anyBytes(self, payload: bytes) -> None:
        """
        Any payload parses or is refused with L{MalformedHandoff}, never another error.
        """
        try:
            parseHandoff(payload)
        except MalformedHandoff:
            pass

    def test_malformed(self) -> None:
        """
        An empty payload, an unknown kind, a port message of the wrong length and port 0 are
        refused with the reason.
        """
        for payload, reason in [
            (b"", "empty handoff"),
            (b"\x07junk", "unknown handoff kind 0x07"),
            (b"GET / HTTP/1.1", "unknown handoff kind 0x47"),
            (b"\x00\x4e", "a raw TCP port handoff is 3 bytes, not 2"),
            (b"\x00\x4e\x20\x00", "a raw TCP port handoff is 3 bytes, not 4"),
            (b"\x00\x00\x00", "a raw TCP port handoff names port 0"),
            (b"\x01\x16", "an unread TLS visitor's handoff is 1 byte, not 2"),
        ]:
            with self.assertRaises(MalformedHandoff) as e:
                parseHandoff(payload)
            self.assertEqual(str(e.exception), reason)

    def test_noEncoding(self) -> None:
        """
        A port out of range, a port with bytes read, and bytes that do not start a TLS record
        have no encoding.
        """
        for bad in [
            Handoff(tcpPort=0),
            Handoff(tcpPort=65536),
            Handoff(b"\x16", tcpPort=80),
            Handoff(b"\x00\x00\x50"),
        ]:
            self.assertRaises(ValueError, encodeHandoff, bad)


class _PortReactor(_Reactor):
    """
    A L{_Reactor} whose adopted connections have the visitor's address (Twisted reads it from
    the socket, which is a UNIX socket pair here).
    """

    peer = IPv4Address("TCP", "198.51.100.7", 5555)

    def adoptStreamConnection(self, fd: int, family: int, factory: Any) -> None:
        protocol = factory.buildProtocol(self.peer)
        if protocol is None:
            # Twisted closes its duplicate of the descriptor at once.
            return
        transport = StringTransportWithDisconnection(peerAddress=self.peer)
        transport.protocol = protocol
        protocol.makeConnection(transport)
        self.adopted.append((os.dup(fd), family, protocol))


class RawPortHandoffTests(SynchronousTestCase):
    """
    A visitor of a raw TCP lease port that another worker accepted is handed over with the port,
    and the worker holding the lease serves it as a visitor of its own listener on that port: its
    real address reaches the tunnel and the listener's per-source cap counts it.
    """

    def setUp(self) -> None:
        self.root = self.mktemp()
        self.reactor = _PortReactor()
        self.ports = PortsReactor()
        self.router = Router(
            Identity.generate(), self.ports, limits=RelayLimits(maxConnectionsPerSource=2)
        )
        self.tcp = tcpPorts(self.ports, PortAllocator(PortRange(20000, 20002), self.ports))
        self.router.tcp = self.tcp
        self.owner = OwnerStub(self.router)
        self.router.leases.register(LABEL, "id1", self.owner)
        opened = Deferred.fromCoroutine(
            self.tcp.open(self.router, "id1", LABEL, f"{LABEL}.localhost", self.owner)
        )
        self.port = self.successResultOf(opened).port
        self.adopted: list[Handoff] = []
        self.receiver = HandoffReceiver(
            self.reactor,
            handoffPath(self.root, 1),
            Factory.forProtocol(_Recording),
            onAdopted=self.adopted.append,
            portFactory=lambda port: handedOverFactory(self.tcp, port),
            refusals=self.router.refusals,
        )
        self.receiver.start()
        self.addCleanup(self.receiver.stop)
        self.sender = HandoffSender(self.root, "relay", 0)
        self.addCleanup(self.sender.close)
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]

    def handOver(self, port: int) -> socket.socket:
        """
        Send one visitor's socket to the receiver with C{port}, closing the sender's copy as the
        sending worker does, and let the receiver read.

        @return: The visitor's end of the connection.
        """
        visitor, client = socket.socketpair()
        self.addCleanup(client.close)
        with visitor:
            self.assertTrue(self.sender.send("relay-w1", visitor.fileno(), Handoff(tcpPort=port)))
        self.receiver.doRead()
        return client

    def test_adoptedAsOwnVisitor(self) -> None:
        """
        The visitor is served by the lease's own visitor protocol under the raw TCP listener's
        caps: it waits in the lease's data pool, and the stream header the tunnel gets carries the
        visitor's real address.
        """
        self.handOver(self.port)
        [(fd, _, protocol)] = self.reactor.adopted
        os.close(fd)
        visitor: Any = getattr(protocol, "inner", None)
        self.assertIsInstance(visitor, RawVisitor)
        self.assertEqual(self.adopted, [Handoff(tcpPort=self.port)])
        self.assertEqual(self.router.counters["tcp_visitors"], 1)
        self.assertEqual(self.owner.pool.waiting, 1)
        self.assertEqual(self.router.limiters["tcp"].bySource, {"198.51.100.7": 1})
        _, sessionTransport, nonce = offerIdleSession(self.router, self.owner)
        decoded = decodeStreamHeader(_KEY, nonce, sessionTransport.value())
        assert decoded is not None
        header, _ = decoded
        self.assertEqual(
            (header.hostname, header.peerHost, header.peerPort),
            (f"{LABEL}.localhost", "198.51.100.7", 5555),
        )

    def test_perSourceCap(self) -> None:
        """
        Visitors handed over count against their source on the raw TCP listener like the ones it
        accepts: over the cap, the visitor is closed and the refusal counted.
        """
        clients = [self.handOver(self.port) for _ in range(3)]
        for fd, _, _ in self.reactor.adopted:
            os.close(fd)
        self.assertEqual(len(self.reactor.adopted), 2)
        clients[2].settimeout(5)
        self.assertEqual(clients[2].recv(10), b"")
        self.assertEqual(self.router.refusals.counts, {"connections_per_source": 1})
        self.assertEqual(self.owner.pool.waiting, 2)
        self.assertEqual(self.router.limiters["tcp"].bySource, {"198.51.100.7": 2})

    def test_noSuchPort(self) -> None:
        """
        A visitor handed over for a port no lease here listens on is refused: its socket is
        closed (the visitor sees the end), the refusal counted and logged.
        """
        client = self.handOver(20002)
        self.assertEqual(self.reactor.adopted, [])
        client.settimeout(5)
        self.assertEqual(client.recv(10), b"")
        self.assertEqual(self.router.refusals.counts, {"handoff": 1})
        [event] = [e for e in self.events if e.get("refusal") == "handoff"]
        self.assertIn("no lease live here on TCP port 20002", formatEvent(event))

    def test_closedPortRefused(self) -> None:
        """
        Once the lease's port is closed, its visitors handed over are refused.
        """
        self.successResultOf(self.tcp.close("id1", LABEL))
        self.handOver(self.port)
        self.assertEqual(self.reactor.adopted, [])
        self.assertEqual(self.router.refusals.counts, {"handoff": 1})

    def test_malformedRefused(self) -> None:
        """
        A payload that is no handoff (from a process of this user that is not a worker, or a
        bug) is refused with the reason, and the descriptor that came with it is closed.
        """
        visitor, client = socket.socketpair()
        self.addCleanup(client.close)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as raw, visitor:
            raw.sendmsg(
                [b"\x07junk"],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [visitor.fileno()]))],
                0,
                handoffPath(self.root, 1),
            )
        self.receiver.doRead()
        self.assertEqual(self.reactor.adopted, [])
        client.settimeout(5)
        self.assertEqual(client.recv(10), b"")
        self.assertEqual(self.router.refusals.counts, {"handoff": 1})
        [event] = [e for e in self.events if e.get("refusal") == "handoff"]
        self.assertIn("unknown handoff kind 0x07", formatEvent(event))

    def test_withoutPortFactory(self) -> None:
        """
        A receiver that serves no raw TCP ports refuses their visitors, and logs why.
        """
        receiver = HandoffReceiver(
            self.reactor, handoffPath(self.root, 2), Factory.forProtocol(_Recording)
        )
        receiver.start()
        self.addCleanup(receiver.stop)
        visitor, client = socket.socketpair()
        self.addCleanup(client.close)
        with visitor:
            self.assertTrue(
                self.sender.send("relay-w2", visitor.fileno(), Handoff(tcpPort=self.port))
            )
        receiver.doRead()
        self.assertEqual(self.reactor.adopted, [])
        self.assertTrue(
            any("no lease live here" in formatEvent(e) for e in self.events), list(self.events)
        )
