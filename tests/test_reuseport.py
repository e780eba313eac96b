"""
Tests for L{portal.forwarding.reuseport}: listeners shared between workers.
"""

from __future__ import annotations

import select
import socket

from twisted.trial.unittest import SynchronousTestCase

from portal.forwarding.reuseport import (
    ReusePortError,
    attachSteering,
    parseTCPDescription,
    sourceSteeringProgram,
)


class DescriptionTests(SynchronousTestCase):
    """
    Which endpoint descriptions workers can share.
    """

    def test_parse(self) -> None:
        """
        C{tcp:PORT} with an optional interface and backlog parses.
        """
        self.assertEqual(parseTCPDescription("tcp:8443"), (8443, "", 50))
        self.assertEqual(
            parseTCPDescription("tcp:0:interface=127.0.0.1:backlog=9"), (0, "127.0.0.1", 9)
        )

    def test_refused(self) -> None:
        """
        Other endpoint types and options are refused with the description in the message.
        """
        for bad in ["ssl:443", "tcp:x", "tcp:1:foo=bar", "unix:/tmp/s", "tcp:1:backlog=x"]:
            with self.assertRaises(ReusePortError) as e:
                parseTCPDescription(bad)
            self.assertIn(repr(bad), str(e.exception))


class SteeringTests(SynchronousTestCase):
    """
    The source-address steering program, in the kernel.
    """

    def test_programShape(self) -> None:
        """
        The program is eight instructions and refuses zero workers.
        """
        self.assertEqual(len(sourceSteeringProgram(3)), 64)
        self.assertRaises(ValueError, sourceSteeringProgram, 0)

    def test_sameSourceSameSocket(self) -> None:
        """
        Connections from one source address always reach the same socket of the group, and two
        addresses that differ modulo the group size reach different sockets.
        """
        sockets = []
        for _ in range(2):
            s = socket.socket()
            self.addCleanup(s.close)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind(("127.0.0.1", sockets[0].getsockname()[1] if sockets else 0))
            s.listen(8)
            sockets.append(s)
        attachSteering(sockets[0], 2)
        port = sockets[0].getsockname()[1]
        chosen: dict[str, set[int]] = {}
        for source in ["127.0.0.2", "127.0.0.3"] * 3:
            client = socket.socket()
            self.addCleanup(client.close)
            client.bind((source, 0))
            client.connect(("127.0.0.1", port))
            ready, _, _ = select.select(sockets, [], [], 5)
            self.assertEqual(len(ready), 1)
            accepted, _ = ready[0].accept()
            accepted.close()
            chosen.setdefault(source, set()).add(sockets.index(ready[0]))
        self.assertEqual(chosen, {"127.0.0.2": {0}, "127.0.0.3": {1}})
