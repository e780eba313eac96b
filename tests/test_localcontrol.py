"""
Tests for L{portal.tunnel.localcontrol}: the control socket's AMP commands in memory, how it
listens, and how clients find no tunnel.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from typing import Any

from twisted.internet.defer import fail, inlineCallbacks, succeed
from twisted.internet.error import CannotListenError, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, MemoryReactor
from twisted.logger import globalLogPublisher
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.test.iosim import connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase, TestCase

from portal.gateway.pairing import CODE_TTL, normalizeCode
from portal.gateway.terminalaccess import TerminalAccess
from portal.gateway.terminalclient import TerminalKey
from portal.gateway.terminals import AmbiguousTerminal, InvalidTerminalName, UnknownTerminal
from portal.tunnel.localcontrol import (
    MAX_SOCKET_PATH,
    SOCKET_FILENAME,
    CreatePairingCode,
    ListTerminals,
    LocalControlService,
    NoRunningTunnel,
    RenameTerminal,
    RevokeTerminal,
    connectControl,
    controlFactory,
    socketPath,
    socketPathProblem,
    startControlSocket,
)

URLS = ["https://app.localhost:8443", "https://app.relay2.example/"]


class LocalControlTests(SynchronousTestCase):
    """
    The commands of the control socket, over an in-memory connection.
    """

    def setUp(self) -> None:
        """
        A tunnel's terminals with one paired terminal, and a connected client.
        """
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.access = TerminalAccess.open(self.clock, self.mktemp())
        self.addCleanup(self.access.close)
        self.key = TerminalKey.generate()
        self.terminal = self.access.store.add(self.key.publicKey, "laptop", 1_600_000_000.0)
        self.urls = list(URLS)
        factory = controlFactory(self.access, lambda: self.urls)
        self.client, _, self.pump = connectedServerAndClient(
            lambda: factory.buildProtocol(None), amp.AMP
        )

    def call(self, command: type[amp.Command], **arguments: Any) -> Any:
        """
        Call a command and deliver its answer.

        @return: A L{Deferred} with the answer, or the failure.  (The answer's own L{Deferred}
            must have its callbacks before the answer arrives: AMP hands failures nobody
            handles yet to its C{unhandledError}, which drops the connection.)
        """
        results: list[Any] = []
        self.client.callRemote(command, **arguments).addBoth(results.append)
        self.pump.flush()
        (result,) = results
        return fail(result) if isinstance(result, Failure) else succeed(result)

    def test_createPairingCode(self) -> None:
        """
        A code is issued in the tunnel, valid for 10 minutes, with the pairing page's URL on
        each public hostname of the tunnel.
        """
        answer = self.successResultOf(self.call(CreatePairingCode, name="phone"))
        self.assertEqual(answer["expires"], 1_700_000_000 + CODE_TTL)
        self.assertEqual(answer["ttl"], CODE_TTL)
        self.assertEqual(
            answer["urls"],
            [
                "https://app.localhost:8443/.portal/pair",
                "https://app.relay2.example/.portal/pair",
            ],
        )
        issued = self.access.codes.redeem(answer["code"], "h")
        self.assertEqual(issued.name, "phone")

    def test_createPairingCodeNoName(self) -> None:
        """
        Without a name, the device names itself; the URLs are the tunnel's at the time.
        """
        self.urls = []
        answer = self.successResultOf(self.call(CreatePairingCode))
        self.assertEqual(answer["urls"], [])
        self.assertIsNone(self.access.codes.redeem(normalizeCode(answer["code"]), "h").name)

    def test_createPairingCodeBadName(self) -> None:
        """
        A name the store would refuse is refused when the code is asked for.
        """
        self.failureResultOf(self.call(CreatePairingCode, name="a\nb"), InvalidTerminalName)
        self.assertEqual(len(self.access.codes), 0)

    def test_list(self) -> None:
        """
        Every terminal is listed with its full id, name, times, and revocation time if any.
        """
        other = self.access.store.add(TerminalKey.generate().publicKey, "phone", 1_650_000_000.0)
        self.access.revoke(other.id)
        answer = self.successResultOf(self.call(ListTerminals))
        self.assertEqual(
            answer["terminals"],
            [
                {
                    "id": self.terminal.id,
                    "name": "laptop",
                    "created": 1_600_000_000.0,
                    "lastSeen": 1_600_000_000.0,
                    "revoked": None,
                },
                {
                    "id": other.id,
                    "name": "phone",
                    "created": 1_650_000_000.0,
                    "lastSeen": 1_650_000_000.0,
                    "revoked": 1_700_000_000.0,
                },
            ],
        )

    def test_rename(self) -> None:
        """
        Renaming by id prefix changes the name in the store.
        """
        answer = self.successResultOf(
            self.call(RenameTerminal, id=self.terminal.shortId, name="desk")
        )
        self.assertEqual((answer["id"], answer["name"]), (self.terminal.id, "desk"))
        self.assertEqual(self.access.store.get(self.terminal.id).name, "desk")  # type: ignore[union-attr]

    def test_revoke(self) -> None:
        """
        Revoking by id prefix records the revocation in the store at once.
        """
        answer = self.successResultOf(self.call(RevokeTerminal, id=self.terminal.id[:6]))
        self.assertEqual(answer["revoked"], 1_700_000_000.0)
        self.assertEqual(
            self.access.store.get(self.terminal.id).revoked,  # type: ignore[union-attr]
            1_700_000_000.0,
        )

    def test_errors(self) -> None:
        """
        Unknown and ambiguous ids and bad names reach the client as the same exceptions, with
        the store's messages.
        """
        failure = self.failureResultOf(self.call(RevokeTerminal, id="zzzzzz"), UnknownTerminal)
        self.assertIn("zzzzzz", failure.getErrorMessage())
        self.failureResultOf(self.call(RenameTerminal, id="zz", name="x"), UnknownTerminal)
        self.failureResultOf(
            self.call(RenameTerminal, id=self.terminal.id, name=""), InvalidTerminalName
        )
        for suffix in ["a", "b"]:
            self.access.store._db.execute(
                "INSERT INTO terminals VALUES (?, 'x', x'00', 1.0, 1.0, NULL)",
                ("yyyy" + suffix * 48,),
            )
        self.failureResultOf(self.call(RevokeTerminal, id="yyyy"), AmbiguousTerminal)


class ListenTests(SynchronousTestCase):
    """
    Tests for L{startControlSocket} and L{LocalControlService} on a memory reactor.
    """

    def setUp(self) -> None:
        """
        A state directory that does not exist yet, and a tunnel's terminals.
        """
        self.stateDir = os.path.join(self.mktemp(), "portal")
        self.access = TerminalAccess.open(Clock(), self.mktemp())
        self.addCleanup(self.access.close)

    def test_socketPath(self) -> None:
        """
        The socket is C{control.sock} in the state directory.
        """
        self.assertEqual(SOCKET_FILENAME, "control.sock")
        self.assertEqual(socketPath("/s"), "/s/control.sock")

    def test_listen(self) -> None:
        """
        The socket is a UNIX socket only its owner may use (mode 0600, in a 0700 directory),
        with a lock file so that a stale socket is replaced and a live one is not.
        """
        reactor = MemoryReactor()
        path = socketPath(self.stateDir)
        self.successResultOf(startControlSocket(reactor, path, self.access, lambda: []))
        ((address, factory, backlog, mode, wantPID),) = reactor.unixServers
        self.assertEqual((address, mode, wantPID), (path, 0o600, True))
        self.assertEqual(stat.S_IMODE(os.stat(self.stateDir).st_mode), 0o700)
        self.assertIsInstance(factory.buildProtocol(None), amp.AMP)

    def test_service(self) -> None:
        """
        The service listens while it runs and stops listening when stopped.
        """
        reactor = MemoryReactor()
        service = LocalControlService(reactor, socketPath(self.stateDir), self.access, list)
        service.startService()
        stopped: list[bool] = []
        service.port.stopListening = lambda: stopped.append(True)  # type: ignore[union-attr,method-assign]
        service.stopService()
        self.assertIsNone(service.port)
        self.assertEqual(stopped, [True])

    def test_serviceOtherTunnel(self) -> None:
        """
        When another tunnel holds the socket, the service logs a warning and the tunnel runs
        on without one.
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

        class Busy(MemoryReactor):
            def listenUNIX(self, *args: object, **kwargs: object) -> Any:
                raise CannotListenError(None, args[0], "Cannot acquire lock")

        service = LocalControlService(Busy(), socketPath(self.stateDir), self.access, list)
        service.startService()
        self.assertIsNone(service.port)
        self.assertEqual(len(events), 1)
        self.assertIn("portal pair", events[0]["log_format"])
        self.assertIsNone(service.stopService())

    def test_serviceCannotCreate(self) -> None:
        """
        When the socket's directory cannot be made, the service logs a warning and the tunnel
        runs on without a control socket.
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        blocker = self.mktemp()
        with open(blocker, "w"):
            pass
        path = socketPath(os.path.join(blocker, "state"))
        service = LocalControlService(MemoryReactor(), path, self.access, list)
        service.startService()
        self.assertIsNone(service.port)
        self.assertEqual(len(events), 1)
        self.assertEqual(events[0]["path"], path)

    def test_pathTooLong(self) -> None:
        """
        A socket path longer than a UNIX socket's may be is not listened on: the service logs
        why, and the tunnel runs on without a control socket.
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        reactor = MemoryReactor()
        path = "/" + "d" * MAX_SOCKET_PATH + "/control.sock"
        service = LocalControlService(reactor, path, self.access, list)
        service.startService()
        self.assertIsNone(service.port)
        self.assertEqual(reactor.unixServers, [])
        self.assertIn(f"at most {MAX_SOCKET_PATH} bytes", events[0]["reason"])
        self.assertIsNone(socketPathProblem("/" + "d" * (MAX_SOCKET_PATH - 1)))
        self.assertIsNotNone(socketPathProblem("/" + "d" * MAX_SOCKET_PATH))


class ConnectTests(SynchronousTestCase):
    """
    Tests for L{connectControl}.
    """

    def test_noTunnel(self) -> None:
        """
        When nothing listens, the client is told there is no running tunnel at the path.
        """

        class Refused:
            def connect(self, factory: object) -> Any:
                return fail(ConnectionRefusedError())

        failure = self.failureResultOf(
            connectControl(Clock(), "/s/control.sock", Refused()),  # type: ignore[arg-type]
            NoRunningTunnel,
        )
        self.assertEqual(failure.getErrorMessage(), "no running tunnel at /s/control.sock")

    def test_pathTooLong(self) -> None:
        """
        A socket path too long for a UNIX socket is reported as no running tunnel, saying why,
        without trying to connect.
        """
        path = "/" + "d" * MAX_SOCKET_PATH + "/control.sock"
        failure = self.failureResultOf(connectControl(MemoryReactor(), path), NoRunningTunnel)
        self.assertIn(f"at most {MAX_SOCKET_PATH} bytes", failure.getErrorMessage())
        self.assertIn("shorter path", failure.getErrorMessage())


class RealSocketTests(TestCase):
    """
    The control socket over a real UNIX socket (the one test here that needs the reactor).
    """

    @inlineCallbacks
    def test_roundTrip(self) -> Any:
        """
        A client connects to a listening tunnel's socket file (mode 0600) and lists terminals;
        once the tunnel stops, the socket and its lock are gone and clients find no tunnel.
        """
        from twisted.internet import reactor

        # Short, for the 108-byte limit of socket paths.
        directory = tempfile.mkdtemp(prefix="portal-test-")
        self.addCleanup(shutil.rmtree, directory)
        path = socketPath(directory)
        access = TerminalAccess.open(Clock(), directory)
        self.addCleanup(access.close)
        port = yield startControlSocket(reactor, path, access, lambda: [])
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertTrue(os.path.lexists(path + ".lock"))
        client = yield connectControl(reactor, path)
        answer = yield client.callRemote(ListTerminals)
        self.assertEqual(answer["terminals"], [])
        client.transport.loseConnection()
        yield port.stopListening()
        self.assertFalse(os.path.lexists(path))
        self.assertFalse(os.path.lexists(path + ".lock"))
        yield self.assertFailure(connectControl(reactor, path), NoRunningTunnel)
