"""
Tests for L{portal.cli.terminals}: C{portal pair} and C{portal terminals}, their arguments, and
their runs against a tunnel's control socket in memory, the store directly, or an app served by
L{treq.testing.StubTreq}.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import sys
import tempfile
from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail, inlineCallbacks, succeed
from twisted.internet.task import Clock
from twisted.internet.utils import getProcessOutputAndValue
from twisted.protocols import amp
from twisted.python import usage
from twisted.test.iosim import connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase, TestCase

from portal.cli.main import PortalOptions, main
from portal.cli.terminals import (
    CALL_TIMEOUT,
    PairOptions,
    TerminalsOptions,
    pairCommand,
    terminalsCommand,
)
from portal.gateway.sessions import SESSION_COOKIE
from portal.gateway.terminalaccess import TerminalAccess, storePath
from portal.gateway.terminalclient import TerminalKey
from portal.gateway.terminals import TerminalStore
from portal.tunnel.localcontrol import (
    NoRunningTunnel,
    controlFactory,
    socketPath,
    startControlSocket,
)
from tests.gatewaystub import GatewayStub

APP = "https://app.localhost:8443"


def parse(options: usage.Options, *arguments: str) -> Any:
    """
    @return: C{options} after parsing C{arguments}.
    """
    options.parseOptions(list(arguments))
    return options


class ArgumentTests(SynchronousTestCase):
    """
    The commands' arguments.
    """

    def usageError(self, *arguments: str) -> str:
        """
        @return: The message of the usage error C{portal ARGUMENTS} gives.
        """
        return str(self.assertRaises(usage.UsageError, parse, PortalOptions(), *arguments))

    def test_pair(self) -> None:
        """
        C{portal pair} takes an optional name, and options in any order.
        """
        options = parse(PortalOptions(), "pair", "--name", "phone", "--json")
        self.assertEqual(options.subCommand, "pair")
        self.assertEqual((options.subOptions["name"], options.subOptions["json"]), ("phone", 1))

    def test_join(self) -> None:
        """
        C{--join URL CODE} takes the code after the URL, with options before or after.
        """
        options = parse(PairOptions(), "--join", APP, "ABCD-EFGH", "--name", "box")
        self.assertEqual((options["code"], options["name"]), ("ABCD-EFGH", "box"))
        self.assertEqual(options["app"].authority, "app.localhost:8443")
        options = parse(PairOptions(), "--cacert", "ca.pem", "--join", APP, "ABCD-EFGH")
        self.assertEqual(options["cacert"], "ca.pem")

    def test_pairErrors(self) -> None:
        """
        Missing or extra arguments and options that do not go together are usage errors.
        """
        self.assertIn("give the pairing CODE", self.usageError("pair", "--join", APP))
        self.assertIn("unexpected argument", self.usageError("pair", "CODE"))
        self.assertIn("not both", self.usageError("pair", "--join", APP, "C", "--session", APP))
        self.assertIn("https://", self.usageError("pair", "--join", "http://app", "C"))
        self.assertIn("--cacert goes with", self.usageError("pair", "--cacert", "ca.pem"))
        self.assertIn("--key goes with", self.usageError("pair", "--key", "k.pem"))
        self.assertIn("--name goes with", self.usageError("pair", "--session", APP, "--name", "x"))
        self.assertIn("not recognized", self.usageError("pair", "--bogus"))

    def test_terminals(self) -> None:
        """
        C{portal terminals} takes list, rename ID NAME or revoke ID, with options anywhere.
        """
        options = parse(TerminalsOptions(), "list", "--json")
        self.assertEqual(
            (options["action"], options["arguments"], options["json"]), ("list", (), 1)
        )
        options = parse(TerminalsOptions(), "rename", "abcd", "my phone")
        self.assertEqual(options["arguments"], ("abcd", "my phone"))
        options = parse(TerminalsOptions(), "--identity", "/x/id.json", "revoke", "abcd")
        self.assertEqual((options["arguments"], options["identity"]), (("abcd",), "/x/id.json"))

    def test_terminalsErrors(self) -> None:
        """
        Unknown actions and wrong numbers of arguments are usage errors.
        """
        self.assertIn("expected 'portal terminals list'", self.usageError("terminals"))
        self.assertIn("expected", self.usageError("terminals", "delete", "x"))
        self.assertIn("rename ID NAME", self.usageError("terminals", "rename", "abcd"))
        self.assertIn("revoke ID", self.usageError("terminals", "revoke"))
        self.assertIn("usage: portal terminals list", self.usageError("terminals", "list", "x"))

    def test_mainExitsTwo(self) -> None:
        """
        The C{portal} command exits with status 2 and a one-line reason for usage errors.
        """
        err = io.StringIO()
        exit = self.assertRaises(SystemExit, main, ["terminals", "revoke"], io.StringIO(), err)
        self.assertEqual(exit.code, 2)
        self.assertEqual(err.getvalue(), "portal: error: usage: portal terminals revoke ID\n")


class CommandTests(SynchronousTestCase):
    """
    Runs of the commands.
    """

    def setUp(self) -> None:
        """
        A state directory with a tunnel's terminals, one paired, and the control socket in
        memory (not connected until a command connects).
        """
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.stateDir = os.path.abspath(self.mktemp())
        self.identity = os.path.join(self.stateDir, "identity.json")
        self.access = TerminalAccess.open(self.clock, self.stateDir)
        self.addCleanup(self.access.close)
        self.key = TerminalKey.generate()
        self.terminal = self.access.store.add(self.key.publicKey, "laptop", 1_699_000_000.0)
        self.urls = ["https://app.localhost:8443"]
        self.ca: str | None = None
        self.running = True
        self.connectedTo: list[str] = []
        self.pumps: list[Any] = []
        self.out = io.StringIO()
        self.err = io.StringIO()

    def connect(self, reactor: Any, path: str) -> Deferred[amp.AMP]:
        """
        Connect to the tunnel in memory, or find none when it is not running.
        """
        self.connectedTo.append(path)
        if not self.running:
            return fail(NoRunningTunnel(f"no running tunnel at {path}"))
        factory = controlFactory(self.access, lambda: self.urls, lambda: self.ca)
        client, _, pump = connectedServerAndClient(lambda: factory.buildProtocol(None), amp.AMP)
        self.pumps.append(pump)
        return succeed(client)

    def execute(self, command: Any, options: usage.Options, **kw: Any) -> int:
        """
        Run a command to its end, delivering the control socket's answers.

        @return: Its exit code.
        """
        d = Deferred.fromCoroutine(command(self.clock, options, self.out, self.err, **kw))
        for pump in self.pumps:
            pump.flush()
        code = self.successResultOf(d)
        assert isinstance(code, int)
        return code

    def pair(self, *arguments: str, **kw: Any) -> int:
        """
        Run C{portal pair ARGUMENTS --identity ...}.
        """
        options = parse(PairOptions(), *arguments, "--identity", self.identity)
        if "http" in kw:
            return self.execute(pairCommand, options, **kw)
        return self.execute(pairCommand, options, connect=self.connect)

    def terminals(self, *arguments: str) -> int:
        """
        Run C{portal terminals ARGUMENTS --identity ...}.
        """
        options = parse(TerminalsOptions(), *arguments, "--identity", self.identity)
        return self.execute(terminalsCommand, options, connect=self.connect)

    def test_pairCode(self) -> None:
        """
        C{portal pair} asks the tunnel at the state directory's socket for a code, and prints
        it with its lifetime, the pairing page's URL and the command for command-line terminals.
        """
        self.assertEqual(self.pair("--name", "phone"), 0)
        self.assertEqual(self.connectedTo, [socketPath(self.stateDir)])
        (code,) = [line.split(": ")[1] for line in self.out.getvalue().splitlines()[:1]]
        self.assertEqual(self.access.codes.redeem(code, "h").name, "phone")
        output = self.out.getvalue()
        self.assertIn("valid once, for 10 minutes", output)
        self.assertIn("named 'phone'", output)
        self.assertIn("  https://app.localhost:8443/.portal/pair\n", output)
        self.assertIn(f"portal pair --join https://app.localhost:8443 {code}\n", output)
        self.assertEqual(self.err.getvalue(), "")

    def test_pairCodeWithCA(self) -> None:
        """
        When the tunnel's certificates come from its local CA, the command for command-line
        terminals carries C{--cacert} with that CA's file, so that it works when pasted.
        """
        self.ca = "/home/me/.config/portal/ca/x y/ca.pem"
        self.assertEqual(self.pair(), 0)
        code = self.out.getvalue().splitlines()[0].split(": ")[1]
        self.assertIn(
            f"portal pair --join https://app.localhost:8443 {code} "
            "--cacert '/home/me/.config/portal/ca/x y/ca.pem'\n",
            self.out.getvalue(),
        )

    def test_pairCodeJSON(self) -> None:
        """
        With C{--json}, the code, its expiry and the URLs are one JSON object.
        """
        self.assertEqual(self.pair("--json"), 0)
        document = json.loads(self.out.getvalue())
        self.assertEqual(document["urls"], ["https://app.localhost:8443/.portal/pair"])
        self.assertEqual(document["expires"], 1_700_000_600)
        self.assertIsNone(self.access.codes.redeem(document["code"], "h").name)

    def test_pairCodeNoURL(self) -> None:
        """
        Before the tunnel has a public URL, the code is printed with where to use it later.
        """
        self.urls = []
        self.assertEqual(self.pair(), 0)
        self.assertIn("no public URL yet", self.out.getvalue())

    def test_pairCodeBadName(self) -> None:
        """
        A name the tunnel refuses is an error (exit 1), and no code is issued.
        """
        self.assertEqual(self.pair("--name", "a\tb"), 1)
        self.assertIn("control characters", self.err.getvalue())
        self.assertEqual(len(self.access.codes), 0)

    def test_pairNoTunnel(self) -> None:
        """
        Without a running tunnel, C{portal pair} says there is none at the socket's path.
        """
        self.running = False
        self.assertEqual(self.pair(), 1)
        self.assertIn(f"no running tunnel at {socketPath(self.stateDir)}", self.err.getvalue())

    def test_tunnelSilent(self) -> None:
        """
        A tunnel that accepts the connection but does not answer within 10 seconds is an error.
        """

        def connect(reactor: Any, path: str) -> Deferred[amp.AMP]:
            client, _, _ = connectedServerAndClient(amp.AMP, amp.AMP)
            return succeed(client)

        options = parse(PairOptions(), "--identity", self.identity)
        d = Deferred.fromCoroutine(
            pairCommand(self.clock, options, self.out, self.err, connect=connect)
        )
        self.assertNoResult(d)
        self.clock.advance(CALL_TIMEOUT)
        self.assertEqual(self.successResultOf(d), 1)
        self.assertIn("did not answer within 10 s", self.err.getvalue())

    def test_list(self) -> None:
        """
        C{portal terminals list} shows each terminal's short id, name, times and status.
        """
        other = self.access.store.add(TerminalKey.generate().publicKey, "phone", 1_699_500_000.0)
        self.access.revoke(other.id)
        self.assertEqual(self.terminals("list"), 0)
        lines = self.out.getvalue().splitlines()
        self.assertEqual(lines[0].split(), ["ID", "NAME", "PAIRED", "LAST", "SEEN", "STATUS"])
        self.assertTrue(lines[1].startswith(self.terminal.shortId + "  laptop"))
        self.assertTrue(lines[1].endswith("active"))
        self.assertTrue(lines[2].startswith(other.shortId + "  phone "))
        self.assertIn("revoked 20", lines[2])

    def test_listJSON(self) -> None:
        """
        With C{--json}, each terminal is a JSON object with its full id.
        """
        self.assertEqual(self.terminals("list", "--json"), 0)
        document = json.loads(self.out.getvalue())
        self.assertEqual(
            document,
            {
                "id": self.terminal.id,
                "name": "laptop",
                "created": 1_699_000_000.0,
                "lastSeen": 1_699_000_000.0,
                "revoked": None,
            },
        )

    def test_renameRevoke(self) -> None:
        """
        Renaming and revoking through the running tunnel change its store at once.
        """
        self.assertEqual(self.terminals("rename", self.terminal.shortId, "desk"), 0)
        self.assertIn("is now named 'desk'", self.out.getvalue())
        self.assertEqual(self.terminals("revoke", self.terminal.id[:5]), 0)
        self.assertIn(f"Revoked terminal {self.terminal.shortId} (desk)", self.out.getvalue())
        terminal = self.access.store.get(self.terminal.id)
        assert terminal is not None
        self.assertEqual((terminal.name, terminal.revoked), ("desk", 1_700_000_000))

    def test_unknownTerminal(self) -> None:
        """
        An id no terminal has is an error with exit status 1.
        """
        self.assertEqual(self.terminals("revoke", "zzzzzz"), 1)
        self.assertIn("no terminal has an id starting with 'zzzzzz'", self.err.getvalue())

    def test_withoutTunnel(self) -> None:
        """
        Without a running tunnel, C{portal terminals} works on the store in the state
        directory.
        """
        self.running = False
        self.assertEqual(self.terminals("rename", self.terminal.id, "desk"), 0)
        self.assertEqual(self.terminals("revoke", self.terminal.id), 0)
        self.assertEqual(self.terminals("list"), 0)
        self.assertIn("desk", self.out.getvalue())
        self.assertIn("revoked", self.out.getvalue().splitlines()[-1])
        terminal = self.access.store.get(self.terminal.id)
        assert terminal is not None
        self.assertEqual(terminal.name, "desk")
        self.assertIsNotNone(terminal.revoked)
        self.assertEqual(self.terminals("revoke", "zzzz"), 1)

    def test_withoutStore(self) -> None:
        """
        Without a tunnel or a store, there are no terminals, and none is created.
        """
        self.running = False
        self.identity = os.path.join(os.path.abspath(self.mktemp()), "identity.json")
        self.assertEqual(self.terminals("list"), 0)
        self.assertIn("No paired terminals", self.out.getvalue())
        self.assertEqual(self.terminals("revoke", "abcd"), 1)
        self.assertIn("no terminal is paired yet", self.err.getvalue())
        self.assertFalse(os.path.exists(storePath(os.path.dirname(self.identity))))


class TerminalSideTests(SynchronousTestCase):
    """
    C{portal pair --join} and C{--session} against an app in memory.
    """

    def setUp(self) -> None:
        """
        An app's terminals behind an in-memory gateway, and this machine's config directory.
        """
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.access = TerminalAccess.open(self.clock, self.mktemp())
        self.addCleanup(self.access.close)
        self.gateway = GatewayStub(self.access.pages, self.access.authenticator)
        self.http = StubTreq(self.gateway)
        self.configDir = os.path.abspath(self.mktemp())
        self.keyPath = os.path.join(self.configDir, "terminal-keys", "app.localhost_8443.pem")
        self.out = io.StringIO()
        self.err = io.StringIO()

    def pair(self, *arguments: str) -> int:
        """
        Run C{portal pair ARGUMENTS} with this machine's config directory.

        @return: The exit code.
        """
        options = parse(
            PairOptions(), *arguments, "--identity", os.path.join(self.configDir, "identity.json")
        )
        d = Deferred.fromCoroutine(
            pairCommand(self.clock, options, self.out, self.err, http=self.http)
        )
        code = self.successResultOf(d)
        assert isinstance(code, int)
        return code

    def test_join(self) -> None:
        """
        C{--join URL CODE} makes this machine's key for the app (0600) and pairs it: the
        terminal's id is the key's, and the output says how to use it.
        """
        code = self.access.issueCode().code
        self.assertEqual(self.pair("--join", APP + "/.portal/pair", code, "--name", "box"), 0)
        self.assertEqual(stat.S_IMODE(os.stat(self.keyPath).st_mode), 0o600)
        key = TerminalKey.load(self.keyPath)
        (terminal,) = self.access.list()
        self.assertEqual((terminal.id, terminal.name), (key.id, "box"))
        output = self.out.getvalue()
        self.assertIn(f"Paired with {APP} as terminal {key.id[:12]} (box)", output)
        self.assertIn(f"key: {self.keyPath} (new)", output)
        self.assertIn(f'curl -b "$(portal pair --session {APP})"', output)

    def test_joinHintWithCA(self) -> None:
        """
        After C{--join} with C{--cacert}, the session hint gives the CA to curl and to C{portal
        pair --session}, so that it works when pasted.
        """
        code = self.access.issueCode().code
        self.assertEqual(self.pair("--join", APP, code, "--cacert", "/ca.pem"), 0)
        self.assertIn(
            f'curl --cacert /ca.pem -b "$(portal pair --session {APP} --cacert /ca.pem)" {APP}/',
            self.out.getvalue(),
        )

    def test_joinNamedAfterMachine(self) -> None:
        """
        Without C{--name}, the terminal proposes this machine's host name; a name the owner gave
        with the code wins.
        """
        import socket

        self.pair("--join", APP, self.access.issueCode().code)
        self.assertEqual(self.access.list()[0].name, socket.gethostname())
        self.pair("--join", APP, self.access.issueCode("owner's name").code, "--name", "mine")
        self.assertEqual(self.access.list()[0].name, "owner's name")

    def test_joinAgainKeepsKey(self) -> None:
        """
        Joining again reuses this machine's key: the same terminal, renamed.
        """
        self.pair("--join", APP, self.access.issueCode().code, "--name", "one")
        self.assertEqual(self.pair("--join", APP, self.access.issueCode().code, "--json"), 0)
        document = json.loads(self.out.getvalue().splitlines()[-1])
        (terminal,) = self.access.list()
        self.assertEqual(document["terminal"], terminal.id)
        self.assertEqual(document["key"], self.keyPath)

    def test_joinWrongCode(self) -> None:
        """
        A wrong code fails with exit status 1 and the app's reason.
        """
        self.assertEqual(self.pair("--join", APP, "0000-0000"), 1)
        self.assertIn("wrong pairing code", self.err.getvalue())
        self.assertEqual(self.access.list(), [])

    def test_session(self) -> None:
        """
        C{--session URL} prints a cookie that makes requests come from this terminal.
        """
        self.pair("--join", APP, self.access.issueCode().code)
        self.out.truncate(0)
        self.out.seek(0)
        self.assertEqual(self.pair("--session", APP), 0)
        cookie = self.out.getvalue().strip()
        self.assertTrue(cookie.startswith(SESSION_COOKIE.decode() + "="))
        response = self.successResultOf(
            self.http.get(APP + "/private", headers={b"cookie": [cookie.encode()]})
        )
        caller = json.loads(self.successResultOf(response.content()))["caller"]
        self.assertEqual(caller, ["terminal", TerminalKey.load(self.keyPath).id])

    def test_sessionJSON(self) -> None:
        """
        With C{--json}, the session is a JSON object.
        """
        self.pair("--join", APP, self.access.issueCode().code)
        self.assertEqual(self.pair("--session", APP, "--json"), 0)
        document = json.loads(self.out.getvalue().splitlines()[-1])
        self.assertEqual(document["expires"], 1_700_000_300)
        self.assertTrue(document["cookie"].startswith("__Host-ptl-session=1."))

    def test_sessionNotPaired(self) -> None:
        """
        C{--session} on a machine without a key for the app says how to pair it.
        """
        self.assertEqual(self.pair("--session", APP), 1)
        self.assertIn("this machine is not paired with", self.err.getvalue())
        self.assertIn(f"portal pair --join {APP} CODE", self.err.getvalue())

    def test_sessionRevoked(self) -> None:
        """
        A revoked terminal's C{--session} fails, saying so and how to pair with a new key.
        """
        self.pair("--join", APP, self.access.issueCode().code)
        self.access.revoke(TerminalKey.load(self.keyPath).id)
        self.assertEqual(self.pair("--session", APP), 1)
        self.assertIn("revoked", self.err.getvalue())
        self.err.truncate(0)
        self.assertEqual(self.pair("--join", APP, self.access.issueCode().code), 1)
        self.assertIn(f"remove {self.keyPath} first", self.err.getvalue())

    def test_keyOption(self) -> None:
        """
        C{--key} chooses the key file.
        """
        path = os.path.join(os.path.abspath(self.mktemp()), "my.pem")
        self.assertEqual(self.pair("--join", APP, self.access.issueCode().code, "--key", path), 0)
        self.assertEqual(self.access.list()[0].id, TerminalKey.load(path).id)
        self.assertFalse(os.path.exists(self.keyPath))


class StoreOnDiskTests(SynchronousTestCase):
    """
    The store the commands use without a tunnel is the one the tunnel uses.
    """

    def test_samePath(self) -> None:
        """
        L{TerminalAccess.open} and the commands use C{terminals.sqlite3} in the state directory.
        """
        stateDir = self.mktemp()
        access = TerminalAccess.open(Clock(), stateDir)
        access.close()
        TerminalStore.open(storePath(stateDir)).close()
        self.assertEqual(sorted(os.listdir(stateDir)), ["terminals.sqlite3"])


class ProcessTests(TestCase):
    """
    The real C{portal} command in a child process: against the store with no tunnel, and against
    a control socket this test listens on (the tunnel's side, in this process).
    """

    def portal(self, home: str, *arguments: str) -> Any:
        """
        Run C{python -m portal ARGUMENTS} with HOME C{home} to completion.

        @return: A L{Deferred} firing with C{(stdout, stderr, exit code)}.
        """
        env = dict(os.environ, HOME=home, XDG_CONFIG_HOME=os.path.join(home, ".config"))
        d = getProcessOutputAndValue(sys.executable, ["-m", "portal", *arguments], env=env)
        return d.addCallback(lambda result: (result[0].decode(), result[1].decode(), result[2]))

    @inlineCallbacks
    def test_withoutTunnel(self) -> Any:
        """
        Without a tunnel, C{portal terminals} lists and revokes in the store of the default state
        directory, C{portal pair} says no tunnel runs (1), and usage errors exit 2.
        """
        home = os.path.abspath(self.mktemp())
        stateDir = os.path.join(home, ".config", "portal")
        store = TerminalStore.open(storePath(stateDir))
        terminal = store.add(TerminalKey.generate().publicKey, "laptop", 1_700_000_000.0)
        store.close()
        out, err, code = yield self.portal(home, "terminals", "revoke", terminal.id[:8])
        self.assertEqual(code, 0, err)
        self.assertIn(f"Revoked terminal {terminal.shortId} (laptop)", out)
        out, err, code = yield self.portal(home, "terminals", "list", "--json")
        self.assertEqual(code, 0, err)
        self.assertIsNotNone(json.loads(out)["revoked"])
        out, err, code = yield self.portal(home, "pair")
        self.assertEqual(code, 1)
        self.assertIn(f"no running tunnel at {socketPath(stateDir)}", err)
        out, err, code = yield self.portal(home, "terminals")
        self.assertEqual(code, 2)
        self.assertIn("portal: error: expected 'portal terminals list'", err)

    @inlineCallbacks
    def test_pairThroughSocket(self) -> Any:
        """
        C{portal pair} gets a code from the tunnel's control socket and prints it; the code is
        then good in the tunnel; C{portal terminals rename} goes through the socket too.
        """
        from twisted.internet import reactor

        # Short, for the 108-byte limit of socket paths.
        stateDir = tempfile.mkdtemp(prefix="portal-test-")
        self.addCleanup(shutil.rmtree, stateDir)
        access = TerminalAccess.open(reactor, stateDir)
        self.addCleanup(access.close)
        terminal = access.store.add(TerminalKey.generate().publicKey, "laptop", 1.0)
        port = yield startControlSocket(
            reactor, socketPath(stateDir), access, lambda: ["https://app.localhost:8443"]
        )
        self.addCleanup(port.stopListening)
        identity = os.path.join(stateDir, "identity.json")
        home = os.path.abspath(self.mktemp())
        out, err, code = yield self.portal(home, "pair", "--name", "phone", "--identity", identity)
        self.assertEqual(code, 0, err)
        code = out.splitlines()[0].removeprefix("Pairing code: ")
        self.assertIn("https://app.localhost:8443/.portal/pair", out)
        self.assertEqual(access.codes.redeem(code, "h").name, "phone")
        out, err, code = yield self.portal(
            home, "terminals", "rename", terminal.shortId, "desk", "--identity", identity
        )
        self.assertEqual(code, 0, err)
        self.assertEqual(access.store.get(terminal.id).name, "desk")  # type: ignore[union-attr]
