"""
The C{portal pair} and C{portal terminals} commands.

On the owner's machine, C{portal pair [--name NAME]} asks the running tunnel for a pairing code
over its control socket (L{portal.tunnel.localcontrol}), and C{portal terminals list|rename|revoke}
manage the paired terminals: through the running tunnel when there is one, else directly in the
terminal store of its state directory.

On a command-line terminal, C{portal pair --join URL CODE} pairs this machine with an app, and
C{portal pair --session URL} prints a fresh session cookie for it (L{portal.gateway.terminalclient}).

Each command function takes the reactor (and, for tests, how to connect) and returns the exit code.
"""

from __future__ import annotations

import getopt
import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TextIO

from twisted.internet.defer import Deferred
from twisted.protocols import amp
from twisted.python import usage
from twisted.python.failure import Failure

from portal.cli.helptext import TidyHelp
from portal.gateway.terminalaccess import storePath
from portal.gateway.terminalclient import (
    TerminalClientError,
    TerminalKey,
    defaultKeyPath,
    httpClient,
    join,
    openSession,
    parseAppURL,
)
from portal.gateway.terminals import SHORT_ID_LENGTH, TerminalError, TerminalStore, validateName
from portal.trust.identity import defaultIdentityPath
from portal.tunnel.localcontrol import (
    CreatePairingCode,
    ListTerminals,
    NoRunningTunnel,
    RenameTerminal,
    RevokeTerminal,
    connectControl,
    socketPath,
)

FAILURE = 1

#: Seconds the running tunnel has to answer a command on its control socket.
CALL_TIMEOUT = 10.0

#: How a command reaches the running tunnel: C{(reactor, socket path) -> Deferred[AMP]}.
Connect = Callable[[Any, str], "Deferred[amp.AMP]"]


class _InterspersedOptions(TidyHelp):
    """
    Options that may come before or after the positional arguments
    (C{portal terminals list --json}), like C{portal expose}'s; Twisted's parser alone stops at the
    first positional argument, the standard library's C{gnu_getopt} does not.
    """

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        """
        Move the options before the positional arguments, then parse as usual.

        @param options: The arguments (default C{sys.argv[1:]}).
        """
        arguments = list(sys.argv[1:] if options is None else options)
        try:
            pairs, positional = getopt.gnu_getopt(arguments, self.shortOpt, self.longOpt)
        except getopt.GetoptError as e:
            raise usage.UsageError(str(e))
        flags: list[str] = []
        for flag, value in pairs:
            flags.append(flag)
            if f"{flag[2:]}=" in self.longOpt or f"{flag[1:]}:" in self.shortOpt:
                flags.append(value)
        super().parseOptions([*flags, "--", *positional])


class PairOptions(_InterspersedOptions):
    """
    C{portal pair [--name NAME]}, C{portal pair --join URL CODE [--name NAME]}, or
    C{portal pair --session URL}.
    """

    synopsis = "[--name NAME] | --join URL CODE [--name NAME] | --session URL"
    longdesc = (
        "Without --join or --session, on the owner's machine: ask the running tunnel for a "
        "one-time pairing code, and print it with the pairing page's URL. With --join, on a "
        "command-line terminal: pair this machine with the app at URL using the CODE the owner "
        "gave. With --session: print a fresh session cookie for the app at URL "
        '(curl -b "$(portal pair --session URL)" URL/...).'
    )
    optParameters = [
        ["name", None, None, "The name of the terminal to be paired."],
        ["join", None, None, "Pair this machine with the app at this https:// URL (needs CODE)."],
        ["session", None, None, "Print a fresh session cookie for the app at this URL."],
        [
            "cacert",
            None,
            None,
            "With --join/--session: the CA certificate (PEM) to trust for the app, such as the "
            "tunnel's local CA (default: the system's CAs).",
        ],
        [
            "key",
            None,
            None,
            "With --join/--session: this machine's key file for the app "
            "(default ~/.config/portal/terminal-keys/HOST.pem).",
        ],
        [
            "identity",
            None,
            None,
            "Identity file; its directory holds the tunnel's state and this machine's terminal "
            "keys (default ~/.config/portal/identity.json).",
        ],
    ]
    optFlags = [["json", None, "Print JSON."]]

    def parseArgs(self, *args: str) -> None:
        """
        Take the CODE of C{--join}.
        """
        if self["join"] is not None:
            if len(args) != 1:
                raise usage.UsageError("portal pair --join URL CODE: give the pairing CODE")
            self["code"] = args[0]
        elif args:
            raise usage.UsageError(f"unexpected argument {args[0]!r}")

    def postOptions(self) -> None:
        """
        Check that the options go together.
        """
        if self["join"] is not None and self["session"] is not None:
            raise usage.UsageError("give either --join or --session, not both")
        remote = self["join"] is not None or self["session"] is not None
        for flag in ("cacert", "key"):
            if self[flag] is not None and not remote:
                raise usage.UsageError(f"--{flag} goes with --join or --session")
        if self["session"] is not None and self["name"] is not None:
            raise usage.UsageError("--name goes with pairing, not --session")
        for flag in ("join", "session"):
            if self[flag] is not None:
                try:
                    self["app"] = parseAppURL(self[flag])
                except TerminalClientError as e:
                    raise usage.UsageError(f"--{flag}: {e}")


class TerminalsOptions(_InterspersedOptions):
    """
    C{portal terminals list | rename ID NAME | revoke ID}.
    """

    synopsis = "list | rename ID NAME | revoke ID  [--identity PATH] [--json]"
    longdesc = (
        "Manage the terminals paired with your tunnel: through the running tunnel, or directly "
        "in its state directory when none runs. ID is a terminal id or its first characters "
        "(at least 4) as 'list' shows them."
    )
    optParameters = [
        [
            "identity",
            None,
            None,
            "Identity file; its directory holds the tunnel's state "
            "(default ~/.config/portal/identity.json).",
        ]
    ]
    optFlags = [["json", None, "With list: print one JSON object per terminal."]]

    _ARGUMENTS = {"list": 0, "rename": 2, "revoke": 1}

    def parseArgs(self, action: str | None = None, *args: str) -> None:
        """
        @param action: C{list}, C{rename} or C{revoke}.
        """
        expected = self._ARGUMENTS.get(action or "")
        if expected is None:
            raise usage.UsageError(
                "expected 'portal terminals list', 'rename ID NAME' or 'revoke ID'"
            )
        if len(args) != expected:
            usage_ = {"list": "list", "rename": "rename ID NAME", "revoke": "revoke ID"}[
                action or ""
            ]
            raise usage.UsageError(f"usage: portal terminals {usage_}")
        self["action"] = action
        self["arguments"] = args


def _call(reactor: Any, control: amp.AMP, command: type[amp.Command], **arguments: Any) -> Any:
    """
    Call a command of the running tunnel, within L{CALL_TIMEOUT} seconds.

    @return: A L{Deferred} firing with the answer, or failing with the command's error, or with
        L{TerminalError} when the tunnel does not answer in time.
    """

    def timedOut(result: object, timeout: float) -> None:
        raise TerminalError(f"the running tunnel did not answer within {timeout:g} s")

    return control.callRemote(command, **arguments).addTimeout(
        CALL_TIMEOUT, reactor, onTimeoutCancel=timedOut
    )


def _stateDir(options: usage.Options) -> str:
    """
    @return: The tunnel's state directory (the identity file's directory).
    """
    return os.path.dirname(os.path.abspath(options["identity"] or defaultIdentityPath()))


def _machineName() -> str | None:
    """
    @return: The name a command-line terminal proposes for itself when given none: this machine's
        host name, if it is an acceptable terminal name.
    """
    try:
        return validateName(socket.gethostname())
    except TerminalError:
        return None


def _when(seconds: float | None) -> str:
    """
    @return: A time for humans, in local time to the minute, or C{-}.
    """
    if seconds is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(seconds))


def runCommand(command: Callable[[Any], Coroutine[Any, Any, int]], err: TextIO) -> int:
    """
    Run a command on the reactor until it is done.

    @param command: Given the reactor, a coroutine giving the exit code.
    @return: The exit code (1 when it failed unexpectedly; the failure is printed).
    """
    from twisted.internet import reactor

    exit = [FAILURE]

    def started() -> None:
        d = Deferred.fromCoroutine(command(reactor))

        def done(code: int) -> None:
            exit[0] = code

        def failed(failure: Failure) -> None:
            err.write(f"portal: {failure.getErrorMessage()}\n")

        d.addCallbacks(done, failed)
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(started)
    reactor.run()
    return exit[0]


async def pairCommand(
    reactor: Any,
    options: PairOptions,
    out: TextIO,
    err: TextIO,
    connect: Connect = connectControl,
    http: Any = None,
) -> int:
    """
    Run C{portal pair}: issue a code, join an app, or print a session.

    @param connect: How to reach the running tunnel.
    @param http: The HTTP client for C{--join}/C{--session} (by default L{httpClient}).
    @return: The exit code.
    """
    if options["join"] is not None or options["session"] is not None:
        return await _terminalSide(reactor, options, out, err, http)
    path = socketPath(_stateDir(options))
    try:
        control = await connect(reactor, path)
    except NoRunningTunnel as e:
        err.write(f"portal: {e}; start the tunnel (portal expose ...) and try again\n")
        return FAILURE
    try:
        answer = await _call(reactor, control, CreatePairingCode, name=options["name"])
    except TerminalError as e:
        err.write(f"portal: {e}\n")
        return FAILURE
    finally:
        control.transport.loseConnection()  # type: ignore[union-attr]
    if options["json"]:
        out.write(
            json.dumps({key: answer[key] for key in ("code", "expires", "ttl", "urls")}) + "\n"
        )
        return 0
    until = time.strftime("%H:%M:%S", time.localtime(answer["expires"]))
    out.write(f"Pairing code: {answer['code']}\n")
    out.write(f"  valid once, for {answer['ttl'] / 60:g} minutes (until {until})\n")
    if options["name"]:
        out.write(f"  the terminal will be named {options['name']!r}\n")
    if not answer["urls"]:
        out.write(
            "The tunnel has no public URL yet: once it forwards, open /.portal/pair on the "
            "app's URL on the device to pair.\n"
        )
        return 0
    out.write("On the device to pair, open:\n")
    for url in answer["urls"]:
        out.write(f"  {url}\n")
    base = answer["urls"][0].removesuffix("/.portal/pair")
    ca = answer.get("ca")
    out.write(
        f"A command-line terminal pairs with:\n  portal pair --join {base} {answer['code']}"
        + (f" --cacert {shlex.quote(ca)}" if ca else "")
        + "\n"
    )
    if ca:
        out.write(f"  (on another machine, copy {ca} there first: the tunnel's local CA)\n")
    return 0


async def _terminalSide(
    reactor: Any, options: PairOptions, out: TextIO, err: TextIO, http: Any
) -> int:
    """
    Run C{portal pair --join} or C{portal pair --session}.

    @return: The exit code.
    """
    app = options["app"]
    keyPath = options["key"] or defaultKeyPath(_stateDir(options), app)
    try:
        if http is None:
            http = httpClient(reactor, options["cacert"])
        if options["join"] is not None:
            key, created = TerminalKey.loadOrCreate(keyPath)
            name = options["name"] or _machineName()
            session = await join(reactor, http, app, key, options["code"], name)
        else:
            try:
                key = TerminalKey.load(keyPath)
            except FileNotFoundError:
                err.write(
                    f"portal: this machine is not paired with {app.origin} (no key at "
                    f"{keyPath}); pair it with 'portal pair --join {app.origin} CODE'\n"
                )
                return FAILURE
            session = await openSession(reactor, http, app, key)
    except TerminalClientError as e:
        err.write(f"portal: {e}\n")
        if e.reason == "revoked":
            err.write(f"  to pair again with a new key, remove {keyPath} first\n")
        return FAILURE
    if options["session"] is not None:
        if options["json"]:
            document = {
                "terminal": session.terminal,
                "cookie": session.cookie,
                "expires": session.expires,
            }
            out.write(json.dumps(document) + "\n")
        else:
            out.write(session.cookie + "\n")
        return 0
    if options["json"]:
        document = {
            "terminal": session.terminal,
            "name": session.name,
            "app": app.origin,
            "key": keyPath,
        }
        out.write(json.dumps(document) + "\n")
        return 0
    out.write(
        f"Paired with {app.origin} as terminal {session.terminal[:SHORT_ID_LENGTH]} "
        f"({session.name}).\n"
        f"  terminal id: {session.terminal}\n"
        f"  key: {keyPath}{' (new)' if created else ''}\n"
        f"Sessions last minutes; get one for a request with:\n"
        f"  {_sessionHint(app.origin, options['cacert'])}\n"
    )
    return 0


def _sessionHint(origin: str, cacert: str | None) -> str:
    """
    @return: The curl command that makes a request with a fresh session, ready to paste: with
        C{--cacert} for curl and for C{portal pair --session} when pairing needed one.
    """
    if not cacert:
        return f'curl -b "$(portal pair --session {origin})" {origin}/'
    ca = shlex.quote(cacert)
    return f'curl --cacert {ca} -b "$(portal pair --session {origin} --cacert {ca})" {origin}/'


async def terminalsCommand(
    reactor: Any,
    options: TerminalsOptions,
    out: TextIO,
    err: TextIO,
    connect: Connect = connectControl,
) -> int:
    """
    Run C{portal terminals list|rename|revoke}: through the running tunnel when there is one,
    else on the store in the state directory.

    @param connect: How to reach the running tunnel.
    @return: The exit code.
    """
    stateDir = _stateDir(options)
    action, arguments = options["action"], options["arguments"]
    try:
        control = await connect(reactor, socketPath(stateDir))
    except NoRunningTunnel:
        control = None
    try:
        if control is not None:
            try:
                terminals = await _remote(reactor, control, action, arguments)
            finally:
                control.transport.loseConnection()  # type: ignore[union-attr]
        else:
            path = storePath(stateDir)
            if not os.path.exists(path):
                terminals = []
                if action != "list":
                    raise TerminalError(f"no terminal is paired yet (no store at {path})")
            else:
                terminals = _local(path, action, arguments, reactor.seconds())
    except TerminalError as e:
        err.write(f"portal: {e}\n")
        return FAILURE
    _report(action, terminals, options["json"], out)
    return 0


async def _remote(
    reactor: Any, control: amp.AMP, action: str, arguments: tuple[str, ...]
) -> list[dict[str, Any]]:
    """
    Carry out a C{portal terminals} action through the running tunnel.

    @return: The terminals concerned, as the control socket describes them.
    """
    if action == "list":
        answer = await _call(reactor, control, ListTerminals)
        return list(answer["terminals"])
    if action == "rename":
        return [await _call(reactor, control, RenameTerminal, id=arguments[0], name=arguments[1])]
    return [await _call(reactor, control, RevokeTerminal, id=arguments[0])]


def _local(path: str, action: str, arguments: tuple[str, ...], now: float) -> list[dict[str, Any]]:
    """
    Carry out a C{portal terminals} action on the store directly.

    @param now: The current time (a revocation's time).

    @return: The terminals concerned, described like the control socket does.
    """
    store = TerminalStore.open(path)
    try:
        if action == "list":
            terminals = store.list()
        elif action == "rename":
            terminals = [store.rename(arguments[0], arguments[1])]
        else:
            terminals = [store.revoke(arguments[0], now)]
    finally:
        store.close()
    return [
        {
            "id": t.id,
            "name": t.name,
            "created": t.created,
            "lastSeen": t.lastSeen,
            "revoked": t.revoked,
        }
        for t in terminals
    ]


def _report(action: str, terminals: list[dict[str, Any]], asJSON: bool, out: TextIO) -> None:
    """
    Print the outcome of a C{portal terminals} action.
    """
    if asJSON:
        for terminal in terminals:
            out.write(json.dumps({**terminal, "revoked": terminal.get("revoked")}) + "\n")
        return
    if action == "rename":
        (terminal,) = terminals
        out.write(
            f"Terminal {terminal['id'][:SHORT_ID_LENGTH]} is now named {terminal['name']!r}.\n"
        )
        return
    if action == "revoke":
        (terminal,) = terminals
        out.write(
            f"Revoked terminal {terminal['id'][:SHORT_ID_LENGTH]} ({terminal['name']}); "
            f"its next request is refused.\n"
        )
        return
    if not terminals:
        out.write("No paired terminals. Pair one with 'portal pair'.\n")
        return
    rows = [("ID", "NAME", "PAIRED", "LAST SEEN", "STATUS")]
    for t in terminals:
        revoked = t.get("revoked")
        status = "active" if revoked is None else f"revoked {_when(revoked)}"
        rows.append(
            (
                t["id"][:SHORT_ID_LENGTH],
                t["name"],
                _when(t["created"]),
                _when(t["lastSeen"]),
                status,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row[:4], widths, strict=True)]
        out.write("  ".join([*cells, row[4]]) + "\n")
