"""
End-to-end tests of L{portal.forwarding.udpbatch} on real UDP sockets on 127.0.0.1: a bounded port
forwarding a burst sends it as one GSO send, and a coalescing port reads it back as the datagrams sent.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import DatagramProtocol
from twisted.trial.unittest import SkipTest, TestCase

from portal.forwarding.boundedreads import BoundedUDPPort, listenUDP
from portal.forwarding.datagramwriter import DatagramWriter
from portal.forwarding.udpbatch import canSegment


class _Collect(DatagramProtocol):
    """
    Keeps what arrives; fires C{done} once C{expected} datagrams came.
    """

    def __init__(self, expected: int) -> None:
        self.received: list[bytes] = []
        self.expected = expected
        self.done: Deferred[None] = Deferred()

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.received.append(datagram)
        if len(self.received) == self.expected:
            self.done.callback(None)


class _Forward(DatagramProtocol):
    """
    Sends every datagram on to one address through a L{DatagramWriter}.
    """

    def __init__(self, to: tuple[str, int]) -> None:
        self.to = to
        self.writer: DatagramWriter | None = None

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        if self.writer is None:
            self.writer = DatagramWriter(self.transport)
        self.writer.write(datagram, self.to)


class GroupedSendsTests(TestCase):
    """
    A burst forwarded by a bounded port crosses loopback as one GSO send and is read back whole.
    """

    timeout = 30

    def listen(self, protocol: DatagramProtocol, coalesced: bool) -> BoundedUDPPort:
        """
        Listen on 127.0.0.1 with a bounded port until the test ends.
        """
        port = listenUDP(reactor, 0, protocol, interface="127.0.0.1", coalesced=coalesced)
        self.addCleanup(port.stopListening)
        assert isinstance(port, BoundedUDPPort)
        return port

    def test_burstForwardedInOneSend(self) -> Any:
        """
        Twenty 1,000-byte datagrams and a 300-byte one sent to a forwarding port all in one go
        reach a coalescing port in order: the first alone (its address checked by Twisted), the
        second alone (the first of the burst goes at once), the other nineteen in one GSO send,
        read back as nineteen datagrams.
        """
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            if not canSegment(probe):
                raise SkipTest("this kernel has no UDP_SEGMENT (Linux 4.18+)")
        burst = [bytes([i]) * 1000 for i in range(20)] + [b"last" * 75]
        collect = _Collect(len(burst))
        receiver = self.listen(collect, coalesced=True)
        self.assertTrue(receiver.coalesced)
        forward = _Forward(("127.0.0.1", receiver.getHost().port))
        forwarder = self.listen(forward, coalesced=False)
        assert forwarder.sends is not None
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            for datagram in burst:
                sender.sendto(datagram, ("127.0.0.1", forwarder.getHost().port))

        def arrived(_: None) -> None:
            self.assertEqual(collect.received, burst)
            assert forwarder.sends is not None
            self.assertEqual(
                (forwarder.sends.groupSends, forwarder.sends.groupedDatagrams), (1, 19)
            )

        return collect.done.addTimeout(10, reactor).addCallback(arrived)
