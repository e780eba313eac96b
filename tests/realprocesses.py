"""
Helpers for end-to-end tests: real C{twistd portal-relay} and C{portal expose} processes on 127.0.0.1,
with ports chosen by the OS and read back from the processes' own output.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import ssl
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ProcessDone, ProcessTerminated, TimeoutError
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.resource import Resource

# The end-to-end tests take their port ranges as the benchmarks do: after half the attempts below the
# ephemeral range, where a busy machine's outgoing connections and their TIME_WAIT leave free runs.
from benchmarks.procs import freePortRange as freePortRange

#: Seconds a process may take to print what a test waits for.
WAIT = 30.0


class ProcessFailed(Exception):
    """
    A process ended, or did not print what was awaited in time; the message holds its output.
    """


class WatchedProcess(ProcessProtocol):
    """
    Collects a child process's output line by line and lets tests wait for a line.

    @ivar lines: Output lines so far (stdout and stderr interleaved).
    @ivar stdout: Everything printed on stdout alone, as bytes.
    @ivar exitCode: The exit code once ended.
    @ivar ended: Fires with the exit code when the process ends.
    """

    exitCode: int | None = None

    def __init__(self, name: str) -> None:
        self.name = name
        self.lines: list[str] = []
        self._partial = {1: b"", 2: b""}
        self.stdout = b""
        self._waiters: list[tuple[re.Pattern[str], Deferred[re.Match[str]]]] = []
        self.ended: Deferred[int | None] = Deferred()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        """
        Split output into lines and wake waiters whose pattern matches.
        """
        if childFD == 1:
            self.stdout += data
        buffered = self._partial.get(childFD, b"") + data
        *complete, self._partial[childFD] = buffered.split(b"\n")
        for raw in complete:
            line = raw.decode("utf-8", "replace")
            self.lines.append(line)
            for waiter in list(self._waiters):
                pattern, d = waiter
                match = pattern.search(line)
                if match is not None:
                    self._waiters.remove(waiter)
                    d.callback(match)

    def output(self) -> str:
        """
        @return: Everything printed so far.
        """
        return "\n".join(self.lines)

    def waitFor(
        self, pattern: str, timeout: float = WAIT, after: int = 0
    ) -> Deferred[re.Match[str]]:
        """
        Wait for an output line matching C{pattern}.

        @param pattern: A regular expression.
        @param timeout: Seconds to wait.
        @param after: Only consider lines from this index on (to wait for a later occurrence).
        @return: A L{Deferred} firing with the match.
        """
        compiled = re.compile(pattern)
        d: Deferred[re.Match[str]] = Deferred()
        for line in self.lines[after:]:
            match = compiled.search(line)
            if match is not None:
                d.callback(match)
                return d
        if self.exitCode is not None or self.ended.called:
            d.errback(ProcessFailed(f"{self.name} already ended; output:\n{self.output()}"))
            return d
        self._waiters.append((compiled, d))

        def timedOut(failure: Failure) -> Failure:
            # addTimeout fails with twisted.internet.defer's TimeoutError.
            failure.trap(TimeoutError, DeferredTimeoutError)
            if (compiled, d) in self._waiters:
                self._waiters.remove((compiled, d))
            raise ProcessFailed(
                f"{self.name} printed nothing matching {pattern!r} in {timeout}s; output:\n"
                f"{self.output()}"
            )

        d.addTimeout(timeout, reactor)
        d.addErrback(timedOut)
        return d

    def processEnded(self, reason: Failure) -> None:
        """
        Record the exit code and fail every waiter.
        """
        for fd, rest in self._partial.items():
            if rest:
                self.lines.append(rest.decode("utf-8", "replace"))
                self._partial[fd] = b""
        if reason.check(ProcessDone):
            self.exitCode = 0
        elif reason.check(ProcessTerminated):
            self.exitCode = reason.value.exitCode
            if self.exitCode is None:
                self.exitCode = -(reason.value.signal or 0)
        waiters, self._waiters = self._waiters, []
        for _, d in waiters:
            d.errback(
                ProcessFailed(f"{self.name} ended ({self.exitCode}); output:\n{self.output()}")
            )
        self.ended.callback(self.exitCode)

    def signal(self, name: str) -> None:
        """
        Send a signal if the process still runs.
        """
        if self.transport is not None and self.exitCode is None and not self.ended.called:
            try:
                self.transport.signalProcess(name)
            except OSError:
                pass

    @inlineCallbacks
    def stop(self, timeout: float = 10.0) -> Any:
        """
        SIGTERM, then SIGKILL if it has not ended within C{timeout} seconds.

        @return: A L{Deferred} firing with the exit code.
        """
        if self.ended.called:
            return self.exitCode
        self.signal("TERM")
        killer = reactor.callLater(timeout, self.signal, "KILL")
        code = yield self.ended
        if killer.active():
            killer.cancel()
        return code


def sleep(seconds: float) -> Deferred[None]:
    """
    @return: A L{Deferred} firing after C{seconds}.
    """
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


@inlineCallbacks
def pollUntil(
    check: Callable[[], Any], message: str, timeout: float = WAIT, interval: float = 0.2
) -> Any:
    """
    Call C{check} (which may return a L{Deferred}) every C{interval} seconds until it gives a true
    value, for at most C{timeout} seconds.

    @param message: What was awaited, for the failure.
    @return: A L{Deferred} firing with the true value.
    @raise AssertionError: When C{timeout} passes first; the message ends with the last value
        C{check} gave (or the exception it raised).
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = yield check()
        except Exception as e:
            last = e
        else:
            if last:
                return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"{message}: not within {timeout}s; last: {last!r}"[:4000])
        yield sleep(interval)


class RecordingApp(Resource):
    """
    An app that answers every request with JSON of what it received, and keeps a record of it.

    @ivar seen: C{(uri, headers)} of every request, headers lowercase with all their values.
    """

    isLeaf = True

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.seen: list[tuple[str, dict[str, list[str]]]] = []

    def render(self, request: Any) -> bytes:
        """
        @return: C{{"app", "uri", "headers"}} as JSON.
        """
        headers = {
            name.decode().lower(): [v.decode("utf-8") for v in values]
            for name, values in request.requestHeaders.getAllRawHeaders()
        }
        self.seen.append((request.uri.decode(), headers))
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(
            {"app": self.name, "uri": request.uri.decode(), "headers": headers}
        ).encode()


def curlProgram() -> str:
    """
    @return: The curl program.
    @raise SkipTest: Without curl.
    """
    curl = shutil.which("curl")
    if curl is None:
        raise SkipTest("curl is not installed (.ci/run installs it)")
    return curl


@inlineCallbacks
def curl(lease: dict[str, Any], path: str, *options: str) -> Any:
    """
    Fetch C{path} at a lease's URL with curl, trusting the lease's CA and resolving its host to
    127.0.0.1.

    @param lease: A C{lease} event (its C{url} and C{ca}).
    @return: A L{Deferred} firing with C{(exit code, status, body, HTTP version, stderr)}.
    """
    host, _, port = lease["url"].removeprefix("https://").partition(":")
    out, err, code = yield getProcessOutputAndValue(
        curlProgram(),
        [
            "-sS",
            "--max-time",
            "20",
            "--cacert",
            lease["ca"],
            "--resolve",
            f"{host}:{port}:127.0.0.1",
            "-w",
            "\n%{http_code} %{http_version}",
            *options,
            lease["url"] + path,
        ],
        env=os.environ,
    )
    body, _, trailer = out.rpartition(b"\n")
    status, _, version = trailer.decode().partition(" ")
    return code, int(status or 0), body, version, err.decode()


def homeDir(testCase: TestCase, name: str) -> str:
    """
    A fresh home directory for one process of a test.

    @param name: The directory's name (also what the process is, for someone reading the files).
    @return: Its absolute path.
    """
    path = os.path.join(os.path.abspath(testCase.mktemp()), name)
    os.makedirs(path)
    return path


def tlsRequest(
    port: int, hostname: str, request: bytes, cafile: str, source: str | None = None
) -> tuple[bytes, Any]:
    """
    Send C{request} over TLS to 127.0.0.1:C{port} with SNI C{hostname}, verifying the chain against
    C{cafile}, and read until the server closes.

    @param source: The loopback address to connect from (C{127.0.0.3}, say), or the default.
    @return: The response and the peer certificate.
    """
    context = ssl.create_default_context(cafile=cafile)
    bind = (source, 0) if source is not None else None
    with socket.create_connection(("127.0.0.1", port), timeout=20, source_address=bind) as raw:
        with context.wrap_socket(raw, server_hostname=hostname) as tls:
            tls.sendall(request)
            chunks = []
            while data := tls.recv(65536):
                chunks.append(data)
            return b"".join(chunks), tls.getpeercert()


def requestEvents(process: WatchedProcess) -> list[dict[str, Any]]:
    """
    @return: The C{request} events a C{--json} tunnel printed so far.
    """
    events = []
    for line in process.lines:
        if line.startswith("{"):
            event = json.loads(line)
            if event.get("event") == "request":
                events.append(event)
    return events


def rss(pid: int) -> int:
    """
    @return: The resident set size of process C{pid} in bytes.
    """
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def _twistd() -> str:
    """
    @return: The C{twistd} next to this Python, or the one on the PATH.
    """
    candidate = os.path.join(os.path.dirname(sys.executable), "twistd")
    return candidate if os.path.exists(candidate) else (shutil.which("twistd") or "twistd")


def spawn(testCase: TestCase, name: str, argv: Sequence[str], home: str) -> WatchedProcess:
    """
    Start a child process with its own home directory; it is stopped when the test ends.

    @param testCase: The running test.
    @param name: A name for messages.
    @param argv: The command line.
    @param home: The HOME (and XDG directories) of the child.
    @return: The watcher.
    """
    env = dict(os.environ)
    env.update(
        HOME=home,
        XDG_CONFIG_HOME=os.path.join(home, ".config"),
        XDG_STATE_HOME=os.path.join(home, ".local", "state"),
        PYTHONUNBUFFERED="1",
    )
    watcher = WatchedProcess(name)
    reactor.spawnProcess(watcher, argv[0], list(argv), env=env)
    testCase.addCleanup(watcher.stop)
    return watcher


def spawnRelay(
    testCase: TestCase,
    stateDir: str,
    public: str = "tcp:0:interface=127.0.0.1",
    control: str = "tcp:0:interface=127.0.0.1",
    extra: Sequence[str] = (),
) -> WatchedProcess:
    """
    Start C{twistd -n portal-relay} on C{stateDir} without waiting for anything (the parent of
    C{stateDir} is its home).

    @return: The watcher.
    """
    argv = [
        _twistd(),
        "-n",
        "--pidfile=",
        "portal-relay",
        "--state-dir",
        stateDir,
        "--public",
        public,
        "--control",
        control,
        *extra,
    ]
    return spawn(testCase, "portal-relay", argv, os.path.dirname(stateDir))


@inlineCallbacks
def startRelay(
    testCase: TestCase,
    stateDir: str,
    public: str = "tcp:0:interface=127.0.0.1",
    control: str = "tcp:0:interface=127.0.0.1",
    extra: Sequence[str] = (),
) -> Any:
    """
    Start C{twistd -n portal-relay} and wait until it listens.

    @return: A L{Deferred} firing with C{(watcher, publicPort, controlPort)}.
    """
    relay = spawnRelay(testCase, stateDir, public, control, extra)
    publicMatch = yield relay.waitFor(r"public listening on 127\.0\.0\.1:(\d+)")
    controlMatch = yield relay.waitFor(r"control listening on 127\.0\.0\.1:(\d+)")
    return relay, int(publicMatch.group(1)), int(controlMatch.group(1))


def startExpose(
    testCase: TestCase,
    home: str,
    controlPort: int,
    arguments: Sequence[str],
    name: str = "portal expose",
    relay: str | None = None,
) -> WatchedProcess:
    """
    Start C{portal expose ARGUMENTS --relay 127.0.0.1:PORT --identity HOME/identity.json --json}.

    @param relay: What to give C{--relay} instead of C{127.0.0.1:PORT}.
    @return: The watcher; wait for its lease with L{waitForLease}.
    """
    argv = [
        sys.executable,
        "-m",
        "portal",
        "expose",
        *arguments,
        "--relay",
        relay or f"127.0.0.1:{controlPort}",
        "--identity",
        os.path.join(home, "identity.json"),
        "--json",
    ]
    return spawn(testCase, name, argv, home)


def startDemo(testCase: TestCase, home: str, extra: Sequence[str] = ()) -> WatchedProcess:
    """
    Start C{portal demo} with its relay's listeners on ports the OS picks, and C{extra} options.

    @return: The watcher.
    """
    argv = [sys.executable, "-m", "portal", "demo", *extra]
    argv += ["--public", "tcp:0:interface=127.0.0.1", "--control", "tcp:0:interface=127.0.0.1"]
    return spawn(testCase, "portal demo", argv, home)


def startTunnel(
    testCase: TestCase, home: str, controlPort: int, target: str, extra: Sequence[str] = ()
) -> WatchedProcess:
    """
    Start C{portal expose TARGET [EXTRA]} against the relay, with the identity under C{home}.

    @return: The watcher; wait for its lease with L{waitForLease}.
    """
    return startExpose(testCase, home, controlPort, [target, *extra])


@inlineCallbacks
def waitForLease(tunnel: WatchedProcess, after: int = 0) -> Any:
    """
    Wait for a C{lease} JSON event.

    @return: A L{Deferred} firing with the event's dict.
    """
    match = yield tunnel.waitFor(r'^\{.*"event": "lease".*\}$', after=after)
    return json.loads(match.group(0))


@inlineCallbacks
def restartRelay(
    testCase: TestCase,
    relay: WatchedProcess,
    stateDir: str,
    controlPort: int,
    extra: Sequence[str],
    tunnel: WatchedProcess,
) -> Any:
    """
    Stop a relay cleanly and start it again with the same state directory and control port, then wait
    for C{tunnel} to report its lease again.

    @return: A L{Deferred} firing with the tunnel's new lease event.
    """
    yield terminate(relay)
    before = len(tunnel.lines)
    yield startRelay(
        testCase, stateDir, control=f"tcp:{controlPort}:interface=127.0.0.1", extra=extra
    )
    lease = yield waitForLease(tunnel, after=before)
    return lease


def terminate(watcher: WatchedProcess) -> Deferred[Any]:
    """
    Stop a process with SIGTERM (a clean stop).
    """
    return watcher.stop()


@inlineCallbacks
def listenLocal(testCase: TestCase, factory: Any) -> Any:
    """
    Listen with C{factory} on a loopback port the OS picks, until the test ends.

    @return: A L{Deferred} firing with the port number.
    """
    port = yield serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(factory)
    testCase.addCleanup(port.stopListening)
    return port.getHost().port


#: Headless Chromium on a machine with no network but loopback.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def browserTools() -> tuple[str, str]:
    """
    @return: The paths of Chromium and certutil.
    @raise SkipTest: When either is missing (C{.ci/run} installs both).
    """
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    certutil = shutil.which("certutil")
    if chromium is None or certutil is None:
        raise SkipTest("chromium and certutil (libnss3-tools) are needed; .ci/run installs them")
    return chromium, certutil


@inlineCallbacks
def trustCA(testCase: TestCase, certutil: str, browserHome: str, caFile: str) -> Any:
    """
    Import C{caFile} as a trusted CA into the NSS database of a browser whose HOME is
    C{browserHome}, as a user would.
    """
    nssdb = os.path.join(browserHome, ".pki", "nssdb")
    os.makedirs(nssdb)
    for args in (
        ["-N", "-d", f"sql:{nssdb}", "--empty-password"],
        ["-A", "-d", f"sql:{nssdb}", "-t", "C,,", "-n", "portal", "-i", caFile],
    ):
        out, err, code = yield getProcessOutputAndValue(certutil, args, env=os.environ)
        testCase.assertEqual(code, 0, err)


def dumpDOM(chromium: str, browserHome: str, url: str, extra: Sequence[str] = ()) -> Any:
    """
    Load C{url} in headless Chromium with HOME C{browserHome}.

    @return: A L{Deferred} firing with C{(stdout, stderr, exit code)}; stdout is the DOM.
    """
    return getProcessOutputAndValue(
        chromium,
        [*CHROMIUM_FLAGS, *extra, f"--user-data-dir={browserHome}/profile", "--dump-dom", url],
        env=dict(os.environ, HOME=browserHome),
    )


@inlineCallbacks
def openBrowser(testCase: TestCase, chromium: str, browserHome: str, url: str) -> Any:
    """
    Start headless Chromium on C{url} with HOME C{browserHome} and a DevTools port on 127.0.0.1; it is
    stopped when the test ends. Unlike L{dumpDOM}, no virtual time: the page runs in real time (virtual
    time holds WebSocket traffic back until pending fetches end), and the test reads the DOM when it
    chooses, with L{readDOM}.

    @return: A L{Deferred} firing with the DevTools port.
    """
    browser = spawn(
        testCase,
        "chromium",
        [
            chromium,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={browserHome}/profile",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
            url,
        ],
        browserHome,
    )
    match = yield browser.waitFor(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/")
    return int(match.group(1))


def _devtools(
    devtoolsPort: int,
    urlPrefix: str,
    commands: Sequence[tuple[str, dict[str, Any]]],
    timeout: float,
) -> Any:
    """
    Send DevTools protocol commands, in one session, to the page whose URL starts with C{urlPrefix}
    (blocking; run it on a thread).

    @param commands: Each command's method and parameters.
    @return: The last command's result.
    """
    from urllib.request import urlopen

    from websockets.sync.client import connect

    with urlopen(f"http://127.0.0.1:{devtoolsPort}/json/list", timeout=timeout) as response:
        targets = json.load(response)
    pages = [t for t in targets if t.get("type") == "page" and t["url"].startswith(urlPrefix)]
    if not pages:
        raise AssertionError(f"no page at {urlPrefix} among {[t['url'] for t in targets]}")
    result = None
    with connect(pages[0]["webSocketDebuggerUrl"], open_timeout=timeout, max_size=None) as session:
        for number, (method, params) in enumerate(commands, 1):
            session.send(json.dumps({"id": number, "method": method, "params": params}))
            while True:
                answer = json.loads(session.recv(timeout=timeout))
                if answer.get("id") == number:
                    break
            if "error" in answer:
                raise AssertionError(f"{method} failed: {answer['error']}")
            result = answer["result"]
    return result


def _evaluate(devtoolsPort: int, urlPrefix: str, expression: str, timeout: float) -> Any:
    """
    Evaluate C{expression} in the page whose URL starts with C{urlPrefix} over the DevTools protocol
    (blocking; run it on a thread). A promise is awaited.
    """
    params = {"expression": expression, "returnByValue": True, "awaitPromise": True}
    result = _devtools(devtoolsPort, urlPrefix, [("Runtime.evaluate", params)], timeout)
    if "exceptionDetails" in result:
        raise AssertionError(f"{expression!r} threw: {result['exceptionDetails']}")
    return result["result"].get("value")


def _screenshot(
    devtoolsPort: int, urlPrefix: str, path: str, size: tuple[int, int], timeout: float
) -> bytes:
    """
    Save a PNG screenshot of the page whose URL starts with C{urlPrefix} to C{path} (blocking).

    @param size: The viewport's width and height for the screenshot.
    @return: The PNG bytes.
    """
    import base64

    width, height = size
    viewport = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}
    commands = [
        ("Emulation.setDeviceMetricsOverride", viewport),
        ("Page.captureScreenshot", {"format": "png"}),
    ]
    png = base64.b64decode(_devtools(devtoolsPort, urlPrefix, commands, timeout)["data"])
    with open(path, "wb") as f:
        f.write(png)
    return png


def screenshot(
    devtoolsPort: int,
    urlPrefix: str,
    path: str,
    size: tuple[int, int] = (1280, 1000),
    timeout: float = WAIT,
) -> Any:
    """
    Save a PNG screenshot of the page at C{urlPrefix} in a browser from L{openBrowser}.

    @param size: The viewport's width and height for the screenshot.
    @return: A L{Deferred} firing with the PNG bytes, also written to C{path}.
    """
    from twisted.internet.threads import deferToThread

    return deferToThread(_screenshot, devtoolsPort, urlPrefix, path, size, timeout)


def evaluate(devtoolsPort: int, urlPrefix: str, expression: str, timeout: float = WAIT) -> Any:
    """
    Evaluate a JavaScript C{expression} (a promise is awaited) in the page at C{urlPrefix} in a
    browser from L{openBrowser}.

    @return: A L{Deferred} firing with the value (JSON-like), or failing with L{AssertionError} if
        there is no such page or the expression threw.
    """
    from twisted.internet.threads import deferToThread

    return deferToThread(_evaluate, devtoolsPort, urlPrefix, expression, timeout)


def readDOM(devtoolsPort: int, urlPrefix: str, timeout: float = WAIT) -> Any:
    """
    Read the rendered DOM (C{outerHTML}) of the page at C{urlPrefix} in a browser from L{openBrowser}.

    @return: A L{Deferred} firing with the HTML text.
    """
    return evaluate(devtoolsPort, urlPrefix, "document.documentElement.outerHTML", timeout)
