"""
End to end: real C{twistd portal-relay} and C{portal expose} processes, real local services and real TLS
clients (curl, Python's C{ssl}), all on 127.0.0.1 with ports the OS chose.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import select
import shutil
import socket
import ssl
import struct
import sys
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.protocols.haproxy._wrapper import HAProxyWrappingFactory
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from tests.metricstext import metricValues
from tests.realprocesses import (
    browserTools,
    dumpDOM,
    homeDir,
    listenLocal,
    rss,
    spawn,
    startDemo,
    startRelay,
    startTunnel,
    tlsRequest,
    trustCA,
    waitForLease,
)

PAGE = b"<h1>portal end-to-end page</h1>\n"


class _Page(Resource):
    """
    A one-page local web service.
    """

    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        """
        @return: L{PAGE}.
        """
        return PAGE


class _Echo(Protocol):
    """
    Writes back what it receives.
    """

    def dataReceived(self, data: bytes) -> None:
        """
        Echo C{data}.
        """
        self.transport.write(data)


class _Source(Protocol):
    """
    Sends L{SOURCE_BYTES} pseudo-random bytes as fast as the connection takes them, then closes.
    """

    def connectionMade(self) -> None:
        """
        Start sending, driven by the transport's demand.
        """
        self._rng = random.Random(SOURCE_SEED)
        self._left = SOURCE_BYTES
        self.transport.registerProducer(self, False)

    def resumeProducing(self) -> None:
        """
        Write the next chunk, or close when all is sent.
        """
        if self._left <= 0:
            self.transport.unregisterProducer()
            self.transport.loseConnection()
            return
        chunk = self._rng.randbytes(min(1 << 18, self._left))
        self._left -= len(chunk)
        self.transport.write(chunk)

    def stopProducing(self) -> None:
        """
        The connection went away.
        """
        self._left = 0


SOURCE_BYTES = 64 * 1024 * 1024
SOURCE_SEED = 7


def _slowRead(url: str, cafile: str, publicPort: int, relayPid: int) -> tuple[str, str, int, int]:
    """
    Read L{SOURCE_BYTES} from the source slowly (1 ms pause every 256 KiB, so the source is far faster
    than the reader), watching the relay's resident memory.

    @return: The expected and received sha256, bytes received, and the relay's largest RSS growth.
    """
    host, port = _hostPort(url)
    expected = hashlib.sha256(random.Random(SOURCE_SEED).randbytes(SOURCE_BYTES)).hexdigest()
    context = ssl.create_default_context(cafile=cafile)
    baseline = rss(relayPid)
    peak = 0
    digest = hashlib.sha256()
    received = 0
    with socket.create_connection(("127.0.0.1", port), timeout=60) as raw:
        with context.wrap_socket(raw, server_hostname=host) as tls:
            while True:
                data = tls.recv(65536)
                if not data:
                    break
                digest.update(data)
                received += len(data)
                if received % (1 << 18) < len(data):
                    time.sleep(0.001)
                    peak = max(peak, rss(relayPid) - baseline)
    return expected, digest.hexdigest(), received, peak


def _abortMidTransfer(url: str, cafile: str) -> int:
    """
    Start a large upload to the echo service and reset the connection (RST) half way.

    @return: Bytes sent before the reset.
    """
    host, port = _hostPort(url)
    context = ssl.create_default_context(cafile=cafile)
    raw = socket.create_connection(("127.0.0.1", port), timeout=30)
    tls = context.wrap_socket(raw, server_hostname=host)
    sent = 0
    chunk = os.urandom(1 << 16)
    tls.settimeout(5)
    try:
        while sent < 8 * 1024 * 1024:
            sent += tls.send(chunk)
    except (TimeoutError, ssl.SSLError, OSError):
        pass
    # wrap_socket took over the raw socket's descriptor: reset through the TLS socket.
    tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    tls.close()
    return sent


def _hostPort(url: str) -> tuple[str, int]:
    """
    Split C{https://host:port}.
    """
    host, _, port = url.removeprefix("https://").partition(":")
    return host, int(port)


def _fetch(url: str, cafile: str) -> tuple[bytes, dict[str, Any]]:
    """
    GET C{/} with Python's C{ssl}, verifying the chain against C{cafile}.

    @return: The response and the peer certificate.
    """
    host, port = _hostPort(url)
    request = f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
    response, certificate = tlsRequest(port, host, request, cafile)
    return response, certificate


def _echoRoundTrip(url: str, cafile: str, total: int) -> tuple[str, str, int]:
    """
    Send C{total} pseudo-random bytes through an echo service while reading the echo, in one thread.

    @return: The sha256 of what was sent, of what came back, and how many bytes came back.
    """
    host, port = _hostPort(url)
    context = ssl.create_default_context(cafile=cafile)
    raw = socket.create_connection(("127.0.0.1", port), timeout=30)
    tls = context.wrap_socket(raw, server_hostname=host)
    tls.setblocking(False)
    rng = random.Random(20261122)
    sentHash, receivedHash = hashlib.sha256(), hashlib.sha256()
    sent = received = 0
    pending = b""
    try:
        while received < total:
            writing = sent < total or pending
            readable, writable, _ = select.select([tls], [tls] if writing else [], [], 30)
            if not readable and not writable:
                raise TimeoutError(f"stalled after sending {sent} and receiving {received} bytes")
            if writable and writing:
                if not pending:
                    pending = rng.randbytes(min(65536, total - sent))
                    sentHash.update(pending)
                try:
                    n = tls.send(pending)
                except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
                    n = 0
                pending = pending[n:]
                sent += n
            while True:
                try:
                    data = tls.recv(262144)
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    break
                if not data:
                    raise ConnectionError(f"closed after receiving {received} bytes")
                receivedHash.update(data)
                received += len(data)
    finally:
        tls.close()
    return sentHash.hexdigest(), receivedHash.hexdigest(), received


def _negotiated(url: str, cafile: str, protocols: list[str]) -> str | None:
    """
    Handshake offering C{protocols} by ALPN.

    @return: The protocol the tunnel selected.
    """
    host, port = _hostPort(url)
    context = ssl.create_default_context(cafile=cafile)
    context.set_alpn_protocols(protocols)
    with socket.create_connection(("127.0.0.1", port), timeout=20) as raw:
        with context.wrap_socket(raw, server_hostname=host) as tls:
            return tls.selected_alpn_protocol()


def _metrics(port: int, *cafiles: str) -> dict[str, float]:
    """
    Read the relay's C{/metrics} over TLS on its own hostname.

    @param cafiles: The CA certificates to trust (with C{--workers}, each worker has its own).
    @return: Metric values by name.
    """
    context = ssl.create_default_context()
    for cafile in cafiles:
        context.load_verify_locations(cafile)
    with socket.create_connection(("127.0.0.1", port), timeout=20) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            body = b""
            while chunk := tls.recv(65536):
                body += chunk
    return metricValues(body.split(b"\r\n\r\n", 1)[1].decode())


def _alertFor(port: int, hostname: str) -> str:
    """
    Connect with an SNI no lease holds.

    @return: The TLS error text.
    """
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=20) as raw:
        try:
            with context.wrap_socket(raw, server_hostname=hostname):
                return "handshake succeeded"
        except ssl.SSLError as e:
            return str(e)


class StreamModeEndToEndMixin:
    """
    The default HTTPS stream mode through real relay and tunnel processes; mixed into one test case per
    relay forwarding path.

    @cvar relayExtra: Extra relay options selecting the path.
    @cvar splicedCounter: The relay metric that counts pairings on that path.
    """

    timeout = 120
    relayExtra: list[str] = []
    splicedCounter = ""

    def _service(self, factory: Any) -> Any:
        """
        Listen with C{factory} on a loopback port the OS picks.

        @return: A L{Deferred} firing with the port number.
        """
        return listenLocal(self, factory)

    @inlineCallbacks
    def _world(self, factory: Any = None, name: str | None = None) -> Any:
        """
        A relay, a local service and a tunnel publishing it.

        @return: C{(relay, publicPort, controlPort, tunnel, lease, relayState, tunnelHome)}.
        """
        relayState = os.path.join(homeDir(self, "relay"), "state")
        self._relayCA = os.path.join(relayState, "tls", "ca.pem")
        relay, publicPort, controlPort = yield startRelay(self, relayState, extra=self.relayExtra)
        servicePort = yield self._service(factory or Site(_Page()))
        home = homeDir(self, "tunnel")
        tunnel = startTunnel(
            self, home, controlPort, str(servicePort), ["--name", name] if name else []
        )
        lease = yield waitForLease(tunnel)
        return relay, publicPort, controlPort, tunnel, lease, relayState, home

    @inlineCallbacks
    def test_curlAndPythonGetThePage(self) -> Any:
        """
        curl and Python's ssl reach the local service at the printed URL, verifying the certificate
        against the tunnel's local CA; the certificate is the tunnel's, not the relay's.
        """
        relay, publicPort, _, tunnel, lease, relayState, _ = yield self._world()
        url = lease["url"]
        self.assertRegex(url, rf"^https://[a-z2-7]{{16}}\.localhost:{publicPort}$")
        curl = shutil.which("curl")
        if curl is None:
            raise SkipTest("curl is not installed (.ci/run installs it)")
        out, err, code = yield getProcessOutputAndValue(
            curl, ["-sS", "--max-time", "20", "--cacert", lease["ca"], url + "/"], env=os.environ
        )
        self.assertEqual((code, out), (0, PAGE), err)
        response, certificate = yield deferToThread(_fetch, url, lease["ca"])
        self.assertTrue(response.startswith(b"HTTP/1."), response[:100])
        self.assertTrue(response.endswith(PAGE))
        host = _hostPort(url)[0]
        self.assertEqual(certificate["subjectAltName"], (("DNS", host),))
        issuer = dict(x[0] for x in certificate["issuer"])
        self.assertIn("Portal local CA", issuer["commonName"])
        # The relay's own certificate authority does not vouch for what the visitor saw.
        relayCA = os.path.join(relayState, "tls", "ca.pem")
        error = yield self.assertFailure(deferToThread(_fetch, url, relayCA), ssl.SSLError)
        self.assertIn("CERTIFICATE_VERIFY_FAILED", str(error))

    @inlineCallbacks
    def test_64MBEachWay(self) -> Any:
        """
        64 MB sent through relay and tunnel to an echo service comes back intact (sha256 both ways).
        """
        _, _, _, _, lease, _, _ = yield self._world(Factory.forProtocol(_Echo))
        total = 64 * 1024 * 1024
        sent, received, count = yield deferToThread(
            _echoRoundTrip, lease["url"], lease["ca"], total
        )
        self.assertEqual(count, total)
        self.assertEqual(sent, received)
        # The bytes went through the forwarding path under test.
        metrics = yield deferToThread(_metrics, _hostPort(lease["url"])[1], self._relayCA)
        self.assertGreaterEqual(metrics[f"portal_relay_{self.splicedCounter}_total"], 1)

    @inlineCallbacks
    def test_alpn(self) -> Any:
        """
        C{--alpn h2,http/1.1} makes the tunnel (not the relay) negotiate h2 with clients that offer it and
        http/1.1 with those that offer only that.
        """
        relayState = os.path.join(homeDir(self, "relay"), "state")
        _, _, controlPort = yield startRelay(self, relayState)
        servicePort = yield self._service(Site(_Page()))
        tunnel = startTunnel(
            self, homeDir(self, "tunnel"), controlPort, str(servicePort), ["--alpn", "h2,http/1.1"]
        )
        lease = yield waitForLease(tunnel)
        both = yield deferToThread(_negotiated, lease["url"], lease["ca"], ["h2", "http/1.1"])
        self.assertEqual(both, "h2")
        old = yield deferToThread(_negotiated, lease["url"], lease["ca"], ["http/1.1"])
        self.assertEqual(old, "http/1.1")

    @inlineCallbacks
    def test_slowReader(self) -> Any:
        """
        A local service that sends 64 MB far faster than the visitor reads is slowed down, not buffered:
        every byte arrives intact and the relay's memory grows by far less than what was sent.
        """
        relay, publicPort, _, _, lease, _, _ = yield self._world(Factory.forProtocol(_Source))
        expected, got, count, peak = yield deferToThread(
            _slowRead, lease["url"], lease["ca"], publicPort, relay.transport.pid
        )
        self.assertEqual(count, SOURCE_BYTES)
        self.assertEqual(got, expected)
        self.assertLess(peak, 16 * 1024 * 1024)

    @inlineCallbacks
    def test_abruptClose(self) -> Any:
        """
        A visitor that resets its connection in the middle of a transfer costs nobody else anything: the
        next visitor is served and the relay keeps running.
        """
        relay, _, _, _, lease, _, _ = yield self._world(Factory.forProtocol(_Echo))
        sent = yield deferToThread(_abortMidTransfer, lease["url"], lease["ca"])
        self.assertGreater(sent, 0)
        total = 4 * 1024 * 1024
        before, after, count = yield deferToThread(_echoRoundTrip, lease["url"], lease["ca"], total)
        self.assertEqual((count, before), (total, after))
        self.assertIsNone(relay.exitCode)

    @inlineCallbacks
    def test_unknownNameGetsAlert(self) -> Any:
        """
        A ClientHello for a name no lease holds gets a TLS unrecognized_name alert, and the relay logs it.
        """
        relay, publicPort, _, _, _, _, _ = yield self._world()
        error = yield deferToThread(_alertFor, publicPort, "nobody.localhost")
        self.assertIn("UNRECOGNIZED_NAME", error.upper())
        yield relay.waitFor(r"no live lease for 'nobody\.localhost'")

    @inlineCallbacks
    def test_relayOwnHostnameServesStatus(self) -> Any:
        """
        The relay's own hostname is served by the relay itself (TLS terminated there), with its status
        page and health check.
        """
        _, publicPort, _, _, _, relayState, _ = yield self._world()
        relayCA = os.path.join(relayState, "tls", "ca.pem")
        response, _ = yield deferToThread(_fetch, f"https://localhost:{publicPort}", relayCA)
        self.assertIn(b"Portal relay", response)
        self.assertIn(b"1 leases", response)

    @inlineCallbacks
    def test_secondIdentityCannotTakeLiveName(self) -> Any:
        """
        A second identity asking for a name that is live gets a clear 'taken' error and exit code 1,
        and the first tunnel keeps serving.
        """
        _, _, controlPort, _, lease, _, _ = yield self._world(name="shared")
        self.assertTrue(lease["url"].startswith("https://shared.localhost:"))
        otherHome = homeDir(self, "other")
        other = startTunnel(self, otherHome, controlPort, "9", ["--name", "shared"])
        code = yield other.ended
        self.assertEqual(code, 1, other.output())
        self.assertIn("taken by another identity", other.output())
        response, _ = yield deferToThread(_fetch, lease["url"], lease["ca"])
        self.assertTrue(response.endswith(PAGE))

    @inlineCallbacks
    def test_relayRestartKeepsURL(self) -> Any:
        """
        Killing and restarting the relay brings the same URL back without restarting the tunnel.
        """
        relay, publicPort, controlPort, tunnel, lease, relayState, _ = yield self._world()
        seen = len(tunnel.lines)
        yield relay.stop()
        yield tunnel.waitFor(r'"event": "disconnected"', after=seen)
        seen = len(tunnel.lines)
        relay2, _, _ = yield startRelay(
            self,
            relayState,
            public=f"tcp:{publicPort}:interface=127.0.0.1",
            control=f"tcp:{controlPort}:interface=127.0.0.1",
            extra=self.relayExtra,
        )
        again = yield waitForLease(tunnel, after=seen)
        self.assertEqual(again["url"], lease["url"])
        response, _ = yield deferToThread(_fetch, lease["url"], lease["ca"])
        self.assertTrue(response.endswith(PAGE))

    @inlineCallbacks
    def test_changedRelayIdentityRefused(self) -> Any:
        """
        A relay that comes back with another identity at a pinned address is refused loudly: the tunnel
        says what to do and exits 1.
        """
        relay, publicPort, controlPort, tunnel, _, relayState, home = yield self._world()
        yield relay.stop()
        impostorState = os.path.join(homeDir(self, "impostor"), "state")
        yield startRelay(
            self,
            impostorState,
            public=f"tcp:{publicPort}:interface=127.0.0.1",
            control=f"tcp:{controlPort}:interface=127.0.0.1",
        )
        code = yield tunnel.ended
        self.assertEqual(code, 1, tunnel.output())
        self.assertIn("known_relays.json", tunnel.output())
        self.assertIn("#", tunnel.output())

    @inlineCallbacks
    def test_cleanStopUnregisters(self) -> Any:
        """
        SIGTERM stops the tunnel with exit code 0 and its name stops routing at once.
        """
        relay, publicPort, _, tunnel, lease, _, _ = yield self._world()
        code = yield tunnel.stop()
        self.assertEqual(code, 0, tunnel.output())
        yield relay.waitFor(r"lease \S+ released")
        error = yield deferToThread(_alertFor, publicPort, _hostPort(lease["url"])[0])
        self.assertIn("UNRECOGNIZED_NAME", error.upper())


class KernelSpliceEndToEndTests(StreamModeEndToEndMixin, TestCase):
    """
    Stream mode with the relay moving paired connections in the kernel (C{os.splice}), the default.
    """

    splicedCounter = "kernel_spliced"


class PythonSpliceEndToEndTests(StreamModeEndToEndMixin, TestCase):
    """
    Stream mode with the relay's portable producer/consumer splice (C{--no-kernel-splice}).
    """

    relayExtra = ["--no-kernel-splice"]
    splicedCounter = "python_spliced"


class BrowserTests(TestCase):
    """
    A real browser reaches a published service once the user trusts the tunnel's local CA.
    """

    timeout = 120

    @inlineCallbacks
    def test_chromiumShowsPage(self) -> Any:
        """
        Headless Chromium, with the tunnel's CA imported into its NSS database the way a user would,
        renders the local service's page at the printed C{https://<label>.localhost:<port>} URL; without
        the CA it does not.
        """
        chromium, certutil = browserTools()
        root = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(root, "relay"))
        _, _, controlPort = yield startRelay(self, os.path.join(root, "relay", "state"))
        port = yield listenLocal(self, Site(_Page()))
        home = os.path.join(root, "tunnel")
        os.makedirs(home)
        lease = yield waitForLease(startTunnel(self, home, controlPort, str(port)))

        untrusting = os.path.join(root, "untrusting")
        os.makedirs(untrusting)
        page, _, _ = yield dumpDOM(chromium, untrusting, lease["url"])
        self.assertNotIn(b"portal end-to-end page", page)

        trusting = os.path.join(root, "trusting")
        yield trustCA(self, certutil, trusting, lease["ca"])
        page, _, _ = yield dumpDOM(chromium, trusting, lease["url"])
        self.assertIn(b"portal end-to-end page", page)


class CommandLineTests(TestCase):
    """
    The C{portal} command's contract: usage errors, identity commands, the demo, and twistd plugins.
    """

    timeout = 60

    @inlineCallbacks
    def _portal(self, *args: str, home: str | None = None) -> Any:
        """
        Run C{python -m portal ARGS} to completion.

        @return: C{(stdout, stderr, exit code)}.
        """
        home = home or os.path.abspath(self.mktemp())
        os.makedirs(home, exist_ok=True)
        env = dict(os.environ, HOME=home, XDG_CONFIG_HOME=os.path.join(home, ".config"))
        out, err, code = yield getProcessOutputAndValue(
            sys.executable, ["-m", "portal", *args], env=env
        )
        return out.decode(), err.decode(), code

    @inlineCallbacks
    def test_usageErrorsExit2(self) -> Any:
        """
        A missing TARGET, a bad flag, or a mode this version lacks exit 2 with a one-line reason.
        """
        for args, reason in [
            (("expose",), "missing TARGET"),
            (("expose", "99999"), "not a port number"),
            (("expose", "3000", "--udp-addr", "53"), "--udp-addr needs --udp"),
            (("expose", "http://localhost:3000", "--tcp"), "no scheme"),
            (("expose", "3000", "--bogus"), "bogus"),
            (("expose", "3000", "--cert", "x.pem"), "--cert and --key"),
        ]:
            out, err, code = yield self._portal(*args)
            self.assertEqual(code, 2, (args, out, err))
            self.assertIn(reason, err)
            self.assertEqual(len(err.strip().splitlines()), 1, err)

    @inlineCallbacks
    def test_identityNewAndShow(self) -> Any:
        """
        C{portal identity new} creates a 0600 file at the default path and C{show} prints the same id;
        a world-readable identity is an error that says to chmod, never silently replaced.
        """
        home = os.path.abspath(self.mktemp())
        out, err, code = yield self._portal("identity", "new", home=home)
        self.assertEqual(code, 0, err)
        path = os.path.join(home, ".config", "portal", "identity.json")
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        created = out.split()[2]
        out, err, code = yield self._portal("identity", "show", home=home)
        self.assertEqual(code, 0, err)
        self.assertIn(created, out)
        os.chmod(path, 0o644)
        out, err, code = yield self._portal("identity", "show", home=home)
        self.assertEqual(code, 1)
        self.assertIn("chmod 600", err)

    @inlineCallbacks
    def test_unreachableRelayReported(self) -> Any:
        """
        A tunnel that cannot reach its relay says so (once) and keeps retrying rather than exiting.
        """
        home = os.path.abspath(self.mktemp())
        os.makedirs(home)
        listening = yield serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(Factory())
        closedPort = listening.getHost().port
        yield listening.stopListening()
        tunnel = startTunnel(self, home, closedPort, "8000")
        yield tunnel.waitFor(r'"event": "unreachable".*cannot reach the relay')
        self.assertIsNone(tunnel.exitCode)
        code = yield tunnel.stop()
        self.assertEqual(code, 0, tunnel.output())

    @inlineCallbacks
    def test_demo(self) -> Any:
        """
        C{portal demo} runs relay, tunnel and sample site in one process and prints a URL that serves
        the sample page.
        """
        home = os.path.abspath(self.mktemp())
        os.makedirs(home)
        demo = startDemo(self, home, ["--json"])
        lease = yield waitForLease(demo)
        response, _ = yield deferToThread(_fetch, lease["url"], lease["ca"])
        self.assertIn(b"Hello from Portal", response)
        code = yield demo.stop()
        self.assertEqual(code, 0, demo.output())

    @inlineCallbacks
    def test_twistdPortalTunnel(self) -> Any:
        """
        C{twistd -n portal-tunnel} takes the same options as C{portal expose} and serves the same way.
        """
        root = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(root, "relay"))
        _, _, controlPort = yield startRelay(self, os.path.join(root, "relay", "state"))
        port = yield listenLocal(self, Site(_Page()))
        home = os.path.join(root, "tunnel")
        os.makedirs(home)
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        tunnel = spawn(
            self,
            "twistd portal-tunnel",
            [
                twistd,
                "-n",
                "--pidfile=",
                "portal-tunnel",
                str(port),
                "--relay",
                f"127.0.0.1:{controlPort}",
                "--identity",
                os.path.join(home, "identity.json"),
                "--json",
            ],
            home,
        )
        match = yield tunnel.waitFor(r'\{.*"event": "lease".*\}')
        lease = json.loads(match.group(0)[match.group(0).index("{") :])
        response, _ = yield deferToThread(_fetch, lease["url"], lease["ca"])
        self.assertTrue(response.endswith(PAGE))


class _PeerAddress(Protocol):
    """
    Answers the first bytes with the client address it sees (C{HOST PORT}) and closes (behind
    C{HAProxyWrappingFactory}, the PROXY header has been read by then).
    """

    def dataReceived(self, data: bytes) -> None:
        """
        Answer.
        """
        assert self.transport is not None
        peer = self.transport.getPeer()
        self.transport.write(f"{peer.host} {peer.port}".encode())
        self.transport.loseConnection()


def _readFromSourcePort(url: str, cafile: str) -> tuple[int, bytes]:
    """
    Connect to C{url} through TLS from a source port of our own, send a line and read until the
    server closes.

    @return: The source port and what was read.
    """
    host, port = _hostPort(url)
    context = ssl.create_default_context(cafile=cafile)
    with socket.socket() as raw:
        raw.bind(("127.0.0.1", 0))
        source = raw.getsockname()[1]
        raw.settimeout(20)
        raw.connect(("127.0.0.1", port))
        with context.wrap_socket(raw, server_hostname=host) as tls:
            tls.sendall(b"who?\n")
            chunks = []
            while data := tls.recv(65536):
                chunks.append(data)
    return source, b"".join(chunks)


class ProxyProtocolEndToEndTests(TestCase):
    """
    C{--proxy-protocol v1|v2}: the local service learns the visitor's address.
    """

    timeout = 120

    @inlineCallbacks
    def test_visitorAddressReachesService(self) -> Any:
        """
        A service behind Twisted's own PROXY protocol parser (C{HAProxyWrappingFactory}) sees the
        visitor's source port as its client's, with either header version; without the flag it sees
        the tunnel's own connection instead.
        """
        root = os.path.abspath(self.mktemp())
        _, _, controlPort = yield startRelay(self, os.path.join(root, "relay", "state"))
        proxied = yield listenLocal(self, HAProxyWrappingFactory(Factory.forProtocol(_PeerAddress)))
        plain = yield listenLocal(self, Factory.forProtocol(_PeerAddress))
        for version in ("v1", "v2"):
            home = os.path.join(root, f"tunnel-{version}")
            os.makedirs(home)
            tunnel = startTunnel(
                self, home, controlPort, str(proxied), ["--proxy-protocol", version]
            )
            lease = yield waitForLease(tunnel)
            source, seen = yield deferToThread(_readFromSourcePort, lease["url"], lease["ca"])
            self.assertEqual(seen.decode(), f"127.0.0.1 {source}", version)
        home = os.path.join(root, "tunnel-plain")
        os.makedirs(home)
        tunnel = startTunnel(self, home, controlPort, str(plain), [])
        lease = yield waitForLease(tunnel)
        source, seen = yield deferToThread(_readFromSourcePort, lease["url"], lease["ca"])
        host, port = seen.decode().split()
        self.assertEqual(host, "127.0.0.1")
        self.assertNotEqual(int(port), source)
