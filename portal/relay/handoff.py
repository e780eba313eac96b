"""
Handing a visitor's connection to the worker that holds its lease (C{--workers}).

Workers of one relay share the public port, so the kernel gives a visitor to any of them; when the
lease is live on another worker, forwarding it over a member link (a second TCP connection, an
attach, and two splices in two processes) costs more than serving it. Workers of one machine can
do better: the worker that read the ClientHello sends the visitor's socket itself to the holding
worker (a UNIX datagram with the descriptor attached, C{SCM_RIGHTS}), and closes its own copy; the
holding worker adopts the socket and serves the visitor as if it had accepted it, starting with
the ClientHello bytes that came with it. The visitor's TCP connection is never touched.

Each worker binds a datagram socket named after the first worker's state directory in the abstract
namespace (L{handoffPath}); any local process may send to such a name, so the receiver takes a
visitor only from a sender running as its own user (the kernel attaches the sender's credentials,
C{SO_PASSCRED}). A worker that cannot hand a visitor over (the other is restarting, its queue is
full) falls back to a member link.
"""

from __future__ import annotations

import array
import hashlib
import os
import socket
import struct
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IProtocol, IProtocolFactory
from twisted.logger import Logger

#: The most bytes of a visitor one handoff carries (what the worker read before deciding: at most a
#: ClientHello, which the public listener bounds far below this).
MAX_HANDOFF = 64 * 1024

_INT = struct.calcsize("i")
#: Room for one descriptor and the sender's credentials.
_ANCILLARY = socket.CMSG_SPACE(_INT) + socket.CMSG_SPACE(3 * _INT)


def handoffPath(root: str, index: int) -> str:
    """
    @param root: The first worker's state directory.
    @param index: A worker's index.
    @return: Where worker C{index} receives visitors: a name in Linux's abstract socket namespace
        (a state directory's path may exceed the 107 bytes a socket file's path may have), made of
        the state directory's path, so that the workers of two relays never meet.
    """
    digest = hashlib.sha256(os.path.realpath(root).encode()).hexdigest()[:24]
    return f"\0portal-handoff-{digest}-{index}"


def workerIndexOf(memberId: str, relayId: str) -> int | None:
    """
    @param memberId: A cluster member's id.
    @param relayId: This relay's identity id.
    @return: The worker index of C{memberId} when it is a worker of this relay (C{ID-wI}), else
        L{None}.
    """
    prefix = f"{relayId}-w"
    if not memberId.startswith(prefix) or not memberId[len(prefix) :].isdigit():
        return None
    return int(memberId[len(prefix) :])


class HandoffSender:
    """
    Sends visitors' sockets to the other workers of this relay.
    """

    def __init__(self, root: str, relayId: str, ownIndex: int) -> None:
        """
        @param root: The first worker's state directory.
        @param relayId: This relay's identity id (workers' member ids start with it).
        @param ownIndex: This worker's index.
        """
        self._root = root
        self._relayId = relayId
        self._ownIndex = ownIndex
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.setblocking(False)

    def send(self, memberId: str, fd: int, prefix: bytes) -> bool:
        """
        Send the socket C{fd} and the bytes already read from it to the worker C{memberId}.

        @return: Whether it was sent; if not (not a worker of this relay, it is not listening, its
            queue is full), nothing happened and the caller keeps the visitor.
        """
        index = workerIndexOf(memberId, self._relayId)
        if index is None or index == self._ownIndex or len(prefix) > MAX_HANDOFF:
            return False
        try:
            # Not socket.send_fds, which ignores its address argument.
            self._socket.sendmsg(
                [prefix],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))],
                0,
                handoffPath(self._root, index),
            )
        except OSError:
            return False
        return True

    def close(self) -> None:
        """
        Close the sending socket.
        """
        self._socket.close()


class HandoffReceiver:
    """
    Receives visitors' sockets from the other workers and serves each as if this worker had
    accepted it: C{adopt} builds its protocol (the public listener's factory), which then gets the
    bytes that came with it.

    It is a reader of the reactor (C{fileno}, C{doRead}).
    """

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        path: str,
        factory: IProtocolFactory,
        onAdopted: Callable[[], None] | None = None,
    ) -> None:
        """
        @param reactor: Provides C{addReader}, C{removeReader} and C{adoptStreamConnection}.
        @param path: Where to receive (a stale socket file there is replaced).
        @param factory: Builds the protocol of each adopted visitor.
        @param onAdopted: Called for each visitor adopted.
        """
        self._reactor = reactor
        self._path = path
        self._factory = factory
        self._onAdopted = onAdopted
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self._socket.bind(path)
        self._socket.setblocking(False)

    def start(self) -> None:
        """
        Start receiving.
        """
        self._reactor.addReader(self)

    def stop(self) -> None:
        """
        Stop receiving (the name goes with the socket).
        """
        self._reactor.removeReader(self)
        self._socket.close()

    def fileno(self) -> int:
        """
        @return: The receiving socket's descriptor.
        """
        return self._socket.fileno()

    def logPrefix(self) -> str:
        """
        @return: The name in Twisted's log lines.
        """
        return "HandoffReceiver"

    def connectionLost(self, reason: object) -> None:
        """
        The reactor is shutting down: nothing to do (see L{stop}).
        """

    def doRead(self) -> None:
        """
        Adopt every visitor waiting.
        """
        for _ in range(64):
            try:
                prefix, ancillary, _, _ = self._socket.recvmsg(MAX_HANDOFF, _ANCILLARY)
            except BlockingIOError:
                return
            except OSError as e:
                self._log.warn("could not receive a visitor from another worker: {error}", error=e)
                return
            fds: list[int] = []
            uid = None
            for level, kind, data in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.extend(array.array("i", data[: len(data) - len(data) % _INT]))
                elif level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    _, uid, _ = struct.unpack("3i", data[: 3 * _INT])
            if uid != os.getuid():
                for fd in fds:
                    os.close(fd)
                self._log.warn(
                    "refused a visitor handed over by user {uid}, not this relay's", uid=uid
                )
                continue
            for extra in fds[1:]:
                os.close(extra)
            if fds:
                self._adopt(fds[0], prefix)

    def _adopt(self, fd: int, prefix: bytes) -> None:
        """
        Serve the visitor on socket C{fd}, starting with C{prefix}.
        """
        built: list[IProtocol] = []
        factory = self._factory

        class Capture:
            def buildProtocol(self, addr: Any) -> IProtocol | None:
                protocol = factory.buildProtocol(addr)
                if protocol is not None:
                    built.append(protocol)
                return protocol

        try:
            with socket.socket(fileno=fd) as visitor:
                # The reactor takes a duplicate of the descriptor; ours closes with the block.
                self._reactor.adoptStreamConnection(visitor.fileno(), visitor.family, Capture())
        except OSError as e:
            self._log.warn("could not adopt a visitor from another worker: {error}", error=e)
            return
        if self._onAdopted is not None:
            self._onAdopted()
        if not built:
            return
        # A visitor handed over is not handed on (nor forwarded): two workers whose views of the
        # cluster differ for a moment would otherwise pass it back and forth. The listener's
        # connection limit wraps the visitor protocol (portal.forwarding.connlimit).
        served: Any = getattr(built[0], "inner", built[0])
        if hasattr(served, "mayForward"):
            served.mayForward = False
        if prefix:
            built[0].dataReceived(prefix)
