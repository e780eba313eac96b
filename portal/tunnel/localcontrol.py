"""
The running tunnel's local control socket: how C{portal pair} and C{portal terminals} on the
owner's machine talk to it.

The tunnel listens on a UNIX socket in its state directory (L{SOCKET_FILENAME}, mode 0600 in a
0700 directory, so only its owner can connect), speaking AMP.  A lock file next to it
(C{control.sock.lock}) lets a new tunnel replace the socket a crashed one left behind, and keeps a
second tunnel on the same state directory from taking it over while the first runs.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.endpoints import UNIXClientEndpoint, UNIXServerEndpoint, connectProtocol
from twisted.internet.error import CannotListenError, ConnectError
from twisted.internet.interfaces import IListeningPort, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from portal.gateway.terminalaccess import TerminalAccess
from portal.gateway.terminalpages import PAIR_PATH
from portal.gateway.terminals import (
    AmbiguousTerminal,
    InvalidTerminalName,
    Terminal,
    UnknownTerminal,
)
from portal.trust.privatefiles import PRIVATE_FILE_MODE, makePrivateDirectories

#: The socket's file name in the tunnel's state directory.
SOCKET_FILENAME = "control.sock"

#: Longest UNIX socket path in bytes: C{sun_path} holds 108 bytes on Linux and 104 on the BSDs and
#: macOS, the terminating NUL included.
MAX_SOCKET_PATH = 107 if sys.platform.startswith("linux") else 103

#: Seconds a command-line client waits to connect.
CONNECT_TIMEOUT = 5.0

_TERMINAL_ERRORS: dict[type[Exception], bytes] = {
    UnknownTerminal: b"UNKNOWN_TERMINAL",
    AmbiguousTerminal: b"AMBIGUOUS_TERMINAL",
    InvalidTerminalName: b"INVALID_NAME",
}

_TERMINAL = [
    (b"id", amp.Unicode()),
    (b"name", amp.Unicode()),
    (b"created", amp.Float()),
    (b"lastSeen", amp.Float()),
    (b"revoked", amp.Float(optional=True)),
]


class NoRunningTunnel(Exception):
    """
    Nothing listens on the control socket: no tunnel runs with this state directory.
    """


class CreatePairingCode(amp.Command):
    """
    Issue a pairing code.  The answer holds the code, when it expires (seconds since the epoch),
    its lifetime, the pairing page's URL on each of the tunnel's public hostnames, and the local
    CA's certificate file when the tunnel's certificates come from it.
    """

    arguments = [(b"name", amp.Unicode(optional=True))]
    response = [
        (b"code", amp.Unicode()),
        (b"expires", amp.Float()),
        (b"ttl", amp.Float()),
        (b"urls", amp.ListOf(amp.Unicode())),
        (b"ca", amp.Unicode(optional=True)),
    ]
    errors = _TERMINAL_ERRORS


class ListTerminals(amp.Command):
    """
    List the paired terminals, revoked ones included (C{revoked} is absent for the others).
    """

    arguments = []
    response = [(b"terminals", amp.AmpList(_TERMINAL))]


class RenameTerminal(amp.Command):
    """
    Rename the terminal whose id starts with C{id}; answers with the terminal.
    """

    arguments = [(b"id", amp.Unicode()), (b"name", amp.Unicode())]
    response = _TERMINAL
    errors = _TERMINAL_ERRORS


class RevokeTerminal(amp.Command):
    """
    Revoke the terminal whose id starts with C{id}; answers with the terminal.
    """

    arguments = [(b"id", amp.Unicode())]
    response = _TERMINAL
    errors = _TERMINAL_ERRORS


def socketPath(stateDir: str) -> str:
    """
    @param stateDir: The tunnel's state directory.
    @return: Where its control socket is.
    """
    return os.path.join(stateDir, SOCKET_FILENAME)


def socketPathProblem(path: str) -> str | None:
    """
    Say why a path cannot be a UNIX socket's, if it cannot.

    @param path: The socket's path.
    @return: L{None} when it can be used; else why not, for the user.
    """
    length = len(os.fsencode(path))
    if length <= MAX_SOCKET_PATH:
        return None
    return (
        f"a UNIX socket path may have at most {MAX_SOCKET_PATH} bytes and this one has {length}; "
        f"use a state directory with a shorter path (the directory of --identity)"
    )


def _describe(terminal: Terminal) -> dict[str, Any]:
    """
    @return: A terminal as the commands' answers give it.
    """
    described: dict[str, Any] = {
        "id": terminal.id,
        "name": terminal.name,
        "created": terminal.created,
        "lastSeen": terminal.lastSeen,
    }
    if terminal.revoked is not None:
        described["revoked"] = terminal.revoked
    return described


class LocalControl(amp.CommandLocator):
    """
    Answers the owner's commands on the control socket.
    """

    _log = Logger()

    def __init__(
        self,
        access: TerminalAccess,
        pairingURLs: Callable[[], Sequence[str]],
        caPath: Callable[[], str | None] = lambda: None,
    ) -> None:
        """
        @param access: The tunnel's terminals.
        @param pairingURLs: Gives the tunnel's public base URLs (C{https://host:port}) at the
            moment it is called.
        @param caPath: Gives the local CA's certificate file, or L{None} with C{--cert}.
        """
        super().__init__()
        self._access = access
        self._pairingURLs = pairingURLs
        self._caPath = caPath

    @CreatePairingCode.responder
    def createPairingCode(self, name: str | None = None) -> dict[str, Any]:
        """
        Issue a pairing code.
        """
        issued = self._access.issueCode(name)
        self._log.info("pairing code issued (valid until {expires})", expires=issued.expiresAt)
        urls = [url.rstrip("/") + PAIR_PATH.decode("ascii") for url in self._pairingURLs()]
        return {
            "code": issued.code,
            "expires": issued.expiresAt,
            "ttl": self._access.codes.ttl,
            "urls": urls,
            "ca": self._caPath(),
        }

    @ListTerminals.responder
    def listTerminals(self) -> dict[str, Any]:
        """
        List the terminals.
        """
        return {"terminals": [_describe(t) for t in self._access.list()]}

    @RenameTerminal.responder
    def renameTerminal(self, id: str, name: str) -> dict[str, Any]:
        """
        Rename a terminal.
        """
        terminal = self._access.rename(id, name)
        self._log.info("terminal {id} renamed {name!r}", id=terminal.id, name=terminal.name)
        return _describe(terminal)

    @RevokeTerminal.responder
    def revokeTerminal(self, id: str) -> dict[str, Any]:
        """
        Revoke a terminal.
        """
        terminal = self._access.revoke(id)
        self._log.info("terminal {id} ({name}) revoked", id=terminal.id, name=terminal.name)
        return _describe(terminal)


def controlFactory(
    access: TerminalAccess,
    pairingURLs: Callable[[], Sequence[str]],
    caPath: Callable[[], str | None] = lambda: None,
) -> Factory:
    """
    @return: The control socket's protocol factory (see L{LocalControl}).
    """
    return Factory.forProtocol(lambda: amp.AMP(locator=LocalControl(access, pairingURLs, caPath)))


def startControlSocket(
    reactor: Any,
    path: str,
    access: TerminalAccess,
    pairingURLs: Callable[[], Sequence[str]],
    caPath: Callable[[], str | None] = lambda: None,
) -> Deferred[IListeningPort]:
    """
    Listen on the control socket.

    @param reactor: An C{IReactorUNIX}.
    @param path: The socket's path, see L{socketPath}.
    @param access: The tunnel's terminals.
    @param pairingURLs: Gives the tunnel's public base URLs.
    @param caPath: Gives the local CA's certificate file, or L{None} with C{--cert}.
    @return: A L{Deferred} firing with the listening port, or failing with
        L{twisted.internet.error.CannotListenError} when another live tunnel holds the socket
        or the path is too long for a UNIX socket.
    """
    problem = socketPathProblem(path)
    if problem is not None:
        return fail(CannotListenError(None, path, problem))
    makePrivateDirectories(os.path.dirname(os.path.abspath(path)))
    endpoint = UNIXServerEndpoint(reactor, path, mode=PRIVATE_FILE_MODE, wantPID=True)
    listening: Deferred[IListeningPort] = endpoint.listen(
        controlFactory(access, pairingURLs, caPath)
    )
    return listening


class LocalControlService(Service):
    """
    Keeps the control socket open while the tunnel runs.  When another tunnel of the same state
    directory already holds it, this tunnel runs without one (and says so in the log).

    @ivar port: The listening port while it listens.
    """

    _log = Logger()
    port: IListeningPort | None = None

    def __init__(
        self,
        reactor: Any,
        path: str,
        access: TerminalAccess,
        pairingURLs: Callable[[], Sequence[str]],
        caPath: Callable[[], str | None] = lambda: None,
    ) -> None:
        """
        See L{startControlSocket} for the parameters.
        """
        super().__init__()
        self._reactor = reactor
        self.path = path
        self._access = access
        self._pairingURLs = pairingURLs
        self._caPath = caPath

    def startService(self) -> None:
        """
        Start listening.
        """
        super().startService()

        def listening(port: IListeningPort) -> None:
            self.port = port

        def failed(failure: Failure) -> None:
            self._log.warn(
                "no control socket at {path} ({reason}): 'portal pair' cannot reach this tunnel",
                path=self.path,
                reason=failure.getErrorMessage(),
            )

        d = maybeDeferred(
            startControlSocket,
            self._reactor,
            self.path,
            self._access,
            self._pairingURLs,
            self._caPath,
        )
        d.addCallbacks(listening, failed)

    def stopService(self) -> Deferred[None] | None:
        """
        Stop listening (the socket file and its lock go away).
        """
        super().stopService()
        port, self.port = self.port, None
        if port is None:
            return None
        return port.stopListening()


def connectControl(
    reactor: Any, path: str, endpoint: IStreamClientEndpoint | None = None
) -> Deferred[amp.AMP]:
    """
    Connect to a running tunnel's control socket.

    @param reactor: An C{IReactorUNIX} and C{IReactorTime}.
    @param path: The socket's path, see L{socketPath}.
    @param endpoint: The endpoint to connect with (by default a UNIX endpoint for C{path}).
    @return: A L{Deferred} firing with the connected client, or failing with L{NoRunningTunnel}.
    """
    problem = socketPathProblem(path)
    if problem is not None:
        # No tunnel can listen there either.
        return fail(NoRunningTunnel(f"no running tunnel at {path} ({problem})"))
    if endpoint is None:
        endpoint = UNIXClientEndpoint(reactor, path, timeout=CONNECT_TIMEOUT)
    d = connectProtocol(endpoint, amp.AMP())

    def failed(failure: Failure) -> amp.AMP:
        failure.trap(ConnectError)
        raise NoRunningTunnel(f"no running tunnel at {path}")

    connected: Deferred[amp.AMP] = d.addErrback(failed)
    return connected
