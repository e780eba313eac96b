"""
Handing a visitor's connection to the worker that holds its lease (C{--workers}).

Workers of one relay share the public port, so the kernel gives a visitor to any of them; when the
lease is live on another worker, forwarding it over a member link (a second TCP connection, an
attach, and two splices in two processes) costs more than serving it. Workers of one machine can
do better: the worker that read the ClientHello sends the visitor's socket itself to the holding
worker (a UNIX datagram with the descriptor attached, C{SCM_RIGHTS}), and closes its own copy; the
holding worker adopts the socket and serves the visitor as if it had accepted it, starting with
the ClientHello bytes that came with it. The visitor's TCP connection is never touched.

Raw TCP lease ports are shared the same way (every worker listens on each, with C{SO_REUSEPORT}):
a worker that accepts a visitor of a port whose lease another worker holds sends the socket with
the port instead of a ClientHello (L{portal.wire.handoff}), and the holding worker serves it as a
visitor of its own listener on that port, under that listener's connection caps.

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

from twisted.internet.interfaces import IProtocol, IProtocolFactory, ITransport
from twisted.logger import Logger

from portal.forwarding.refusals import Refusals
from portal.wire.handoff import Handoff, MalformedHandoff, encodeHandoff, parseHandoff

#: The most bytes one handoff carries (what the worker read from a TLS visitor before deciding: at
#: most a ClientHello, which the public listener bounds far below this).
MAX_HANDOFF = 64 * 1024

_INT = struct.calcsize("i")
#: One descriptor, as C{SCM_RIGHTS} carries it.
_FD = struct.Struct("i")
#: A TLS visitor of which nothing was read (what workers hand over as they accept), and its
#: encoding, made once.
_UNREAD = Handoff()
_UNREAD_PAYLOAD = encodeHandoff(_UNREAD)
#: Member ids whose handoff names are remembered (a cluster has a few; more only empties it).
_PATHS_REMEMBERED = 256
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
        # Each member's name, made once (it resolves the state directory's path).
        self._paths: dict[str, str | None] = {}

    def send(self, memberId: str, fd: int, handoff: Handoff) -> bool:
        """
        Send the socket C{fd} to the worker C{memberId}, with what it needs to serve it (the bytes
        already read from a TLS visitor, or the raw TCP port a visitor connected to).

        @return: Whether it was sent; if not (not a worker of this relay, it is not listening, its
            queue is full, the handoff has no encoding), nothing happened and the caller keeps the
            visitor.
        """
        path = self._pathOf(memberId)
        if path is None:
            return False
        if handoff == _UNREAD:
            payload = _UNREAD_PAYLOAD
        else:
            try:
                payload = encodeHandoff(handoff)
            except ValueError:
                return False
            if len(payload) > MAX_HANDOFF:
                return False
        try:
            # Not socket.send_fds, which ignores its address argument.
            self._socket.sendmsg(
                [payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, _FD.pack(fd))], 0, path
            )
        except OSError:
            return False
        return True

    def _pathOf(self, memberId: str) -> str | None:
        """
        @return: Where worker C{memberId} receives visitors (L{handoffPath}, made once per
            member), or L{None} when it is not another worker of this relay.
        """
        paths = self._paths
        if memberId in paths:
            return paths[memberId]
        index = workerIndexOf(memberId, self._relayId)
        path = None
        if index is not None and index != self._ownIndex:
            path = handoffPath(self._root, index)
        if len(paths) >= _PATHS_REMEMBERED:
            paths.clear()
        paths[memberId] = path
        return path

    def close(self) -> None:
        """
        Close the sending socket.
        """
        self._socket.close()


class HandoffReceiver:
    """
    Receives visitors' sockets from the other workers and serves each as if this worker had
    accepted it: a TLS visitor with the public listener's factory (its protocol then gets the
    bytes that came with it), a raw TCP visitor with the factory of this worker's listener on its
    port.

    It is a reader of the reactor (C{fileno}, C{doRead}).
    """

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        path: str,
        factory: IProtocolFactory,
        onAdopted: Callable[[Handoff], None] | None = None,
        portFactory: Callable[[int], IProtocolFactory | None] | None = None,
        refusals: Refusals | None = None,
    ) -> None:
        """
        @param reactor: Provides C{addReader}, C{removeReader} and C{adoptStreamConnection}.
        @param path: Where to receive (a stale socket file there is replaced).
        @param factory: Builds the protocol of each adopted TLS visitor.
        @param onAdopted: Called with each visitor's handoff once it is adopted.
        @param portFactory: Gives the factory of this worker's listener on a raw TCP lease port,
            or L{None} when no lease live here has that port; without it, raw TCP visitors are
            refused.
        @param refusals: Where refused visitors are counted (reason C{handoff}) and logged; without
            it they are only logged.
        """
        self._reactor = reactor
        self._path = path
        self._factory = factory
        self._onAdopted = onAdopted
        self._portFactory = portFactory
        self._refusals = refusals
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
                payload, ancillary, _, _ = self._socket.recvmsg(MAX_HANDOFF, _ANCILLARY)
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
            if not fds:
                continue
            try:
                handoff = parseHandoff(payload)
            except MalformedHandoff as e:
                os.close(fds[0])
                self._refuse("refused a visitor handed over by another worker: {reason}", str(e))
                continue
            if handoff.tcpPort is None:
                self._adopt(fds[0], self._factory, handoff)
                continue
            factory = None
            if self._portFactory is not None:
                factory = self._portFactory(handoff.tcpPort)
            if factory is None:
                os.close(fds[0])
                self._refuse(
                    "refused a raw TCP visitor handed over by another worker: {reason}",
                    f"no lease live here on TCP port {handoff.tcpPort}",
                )
                continue
            if self._adopt(fds[0], factory, handoff):
                self._log.debug(
                    "adopted a raw TCP visitor of port {port} from another worker",
                    port=handoff.tcpPort,
                )

    def _refuse(self, format: str, reason: str) -> None:
        """
        Count (when this receiver has L{Refusals}) and log a visitor refused.

        @param format: The log event's format, with C{{reason}}.
        @param reason: Why.
        """
        if self._refusals is not None:
            self._refusals.refuse("handoff", format, reason=reason)
        else:
            self._log.warn(format, reason=reason)

    def _adopt(self, fd: int, factory: IProtocolFactory, handoff: Handoff) -> bool:
        """
        Serve the visitor on socket C{fd} with a protocol of C{factory}, starting with the bytes
        that came with it.

        @return: Whether a protocol serves the visitor now (not when the reactor could not take
            the socket, or the listener's connection caps refused it).
        """
        built: list[IProtocol] = []

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
            return False
        if not built:
            # Refused by the listener's connection caps (the reactor closed the socket).
            return False
        if self._onAdopted is not None:
            self._onAdopted(handoff)
        # A visitor handed over is not handed on (nor forwarded): two workers whose views of the
        # cluster differ for a moment would otherwise pass it back and forth. The listener's
        # connection limit wraps the visitor protocol (portal.forwarding.connlimit).
        served: Any = getattr(built[0], "inner", built[0])
        if hasattr(served, "mayForward"):
            served.mayForward = False
        if handoff.prefix:
            built[0].dataReceived(handoff.prefix)
        return True


def giveSocket(transport: ITransport | None, send: Callable[[int], bool]) -> bool:
    """
    Give a connection's socket to another worker: C{send} gets its descriptor; once it has sent
    it, close this worker's copy without shutting the connection down (the other worker holds the
    same socket).

    @param transport: The connection's Twisted TCP transport.
    @param send: Sends the descriptor; returns whether it did.
    @return: Whether the socket was given; if not, nothing changed.
    """
    fileno = getattr(transport, "fileno", None)
    if transport is None or fileno is None or not send(fileno()):
        return False
    # Twisted's TCP transport shuts a socket down before closing it unless told not to
    # (tcp._SocketCloser); the shutdown would end the connection for the other worker too.
    transport._shouldShutdown = False  # type: ignore[attr-defined]
    transport.loseConnection()
    return True
