"""
Tests for L{portal.forwarding.udpbuffers}.
"""

from __future__ import annotations

import socket

from twisted.trial.unittest import SynchronousTestCase

from portal.forwarding.udpbuffers import enlargeBuffers


class _Port:
    """
    Stands in for a listening UDP port: holds an unbound socket.
    """

    def __init__(self) -> None:
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    def getHandle(self) -> socket.socket:
        """
        @return: The socket.
        """
        return self.socket


class EnlargeBuffersTests(SynchronousTestCase):
    """
    L{enlargeBuffers} asks the kernel for bigger buffers than the default.
    """

    def test_larger(self) -> None:
        """
        The receive and send buffers grow past the defaults a new socket has (within what the
        kernel allows; it reports twice what it grants).
        """
        port = _Port()
        self.addCleanup(port.socket.close)
        before = port.socket.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        sendBefore = port.socket.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        granted = enlargeBuffers(port, 1024 * 1024)
        self.assertEqual(granted, port.socket.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))
        assert granted is not None
        self.assertGreater(granted, before)
        self.assertGreater(port.socket.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF), sendBefore)

    def test_noSocket(self) -> None:
        """
        A port without a socket (an in-memory reactor's) is left alone.
        """
        self.assertIsNone(enlargeBuffers(object()))
