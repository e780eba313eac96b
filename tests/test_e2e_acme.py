"""
End-to-end tests of C{portal expose --acme} (issue 15) with real processes on 127.0.0.1: a real
C{twistd portal-relay}, a real C{portal expose}, Debian's C{pebble} ACME server validating
TLS-ALPN-01 through the relay's public port, and C{pebble-challtestsrv} as the DNS server pebble
resolves the tunnel domain with. Real clients (curl, Python's ssl, headless Chromium) verify the
page against pebble's root only.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from typing import Any
from urllib.request import Request, urlopen

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from portal.trust.localca import LocalCA
from tests.realprocesses import (
    WAIT,
    _twistd,
    browserTools,
    curlProgram,
    dumpDOM,
    freePortRange,
    homeDir,
    listenLocal,
    pollUntil,
    spawn,
    startExpose,
    startRelay,
    tlsRequest,
    trustCA,
    waitForLease,
)
from tests.test_localca import certificatePEM, privateKeyPEM

TUNNEL_DOMAIN = "portal.test"
PAGE = b"<html><body><h1 id='greeting'>Hello over ACME</h1></body></html>"

#: The slow download: this many chunks of CHUNK bytes, one every CHUNK_INTERVAL seconds.
CHUNKS = 48
CHUNK = 65536
CHUNK_INTERVAL = 0.5


class _Page(Resource):
    """
    The local service: a small page at C{/}, and a slow download at C{/slow}.
    """

    isLeaf = True

    def render_GET(self, request: Any) -> Any:
        """
        @return: L{PAGE}, or start the slow download.
        """
        if request.path == b"/slow":
            request.setHeader(b"content-length", str(CHUNKS * CHUNK).encode())
            self._sendChunk(request, 0)
            return NOT_DONE_YET
        request.setHeader(b"content-type", b"text/html")
        return PAGE

    def _sendChunk(self, request: Any, sent: int) -> None:
        """
        Write one chunk of the slow download, and schedule the next.
        """
        if request.finished or request._disconnected:
            return
        request.write(b"x" * CHUNK)
        if sent + 1 == CHUNKS:
            request.finish()
            return
        reactor.callLater(CHUNK_INTERVAL, self._sendChunk, request, sent + 1)


def _events(process: Any, name: str) -> list[dict[str, Any]]:
    """
    @return: The JSON events called C{name} a C{--json} tunnel printed so far.
    """
    found = []
    for line in process.lines:
        if line.startswith("{"):
            event = json.loads(line)
            if event.get("event") == name:
                found.append(event)
    return found


def _serial(peer: dict[str, Any]) -> int:
    """
    @return: The serial number of a certificate as Python's ssl module describes it.
    """
    return int(peer["serialNumber"], 16)


class AcmeEndToEndTests(TestCase):
    """
    A relay with the tunnel domain C{portal.test}, pebble validating through its public port, and
    tunnels with C{--acme}.
    """

    timeout = 240

    @inlineCallbacks
    def setUp(self) -> Any:
        """
        Start the local service, the relay, the DNS server and pebble (its HTTPS certificate from a
        throwaway CA, given to the tunnels with C{--acme-ca}); fetch pebble's root.
        """
        pebble = shutil.which("pebble")
        challtestsrv = shutil.which("pebble-challtestsrv")
        if pebble is None or challtestsrv is None:
            raise SkipTest("pebble is not installed (.ci/run installs it)")
        self.curl = curlProgram()
        self.webPort = yield listenLocal(self, Site(_Page()))
        self.relayState = os.path.join(homeDir(self, "relay"), "state")
        self.relay, self.publicPort, self.controlPort = yield startRelay(
            self, self.relayState, extra=["--tunnel-domain", TUNNEL_DOMAIN]
        )
        base = homeDir(self, "pebble")
        # Pebble's own HTTPS: a certificate for localhost from a CA only the tunnels trust.
        httpsCA = LocalCA.loadOrCreate(os.path.join(base, "https-ca"), "pebble HTTPS test CA")
        key, chain = httpsCA.issue(["localhost"])
        self.pebbleCA = httpsCA.certPath
        with open(os.path.join(base, "cert.pem"), "wb") as f:
            f.write(b"".join(certificatePEM(c) for c in chain))
        with open(os.path.join(base, "key.pem"), "wb") as f:
            f.write(privateKeyPEM(key))
        dnsPort = freePortRange(1)[0]
        dnsManagement, acmePort, managementPort, httpPort = (freePortRange(1)[0] for _ in range(4))
        self.dnsManagement = dnsManagement
        self.dns = spawn(
            self,
            "pebble-challtestsrv",
            [
                challtestsrv,
                "-defaultIPv4",
                "127.0.0.1",
                "-defaultIPv6",
                "",
                "-dns01",
                f"127.0.0.1:{dnsPort}",
                "-management",
                f"127.0.0.1:{dnsManagement}",
                "-http01",
                "",
                "-https01",
                "",
                "-tlsalpn01",
                "",
            ],
            base,
        )
        yield self.dns.waitFor(r"Starting management server")
        config = os.path.join(base, "pebble.json")
        with open(config, "w") as f:
            json.dump(
                {
                    "pebble": {
                        "listenAddress": f"127.0.0.1:{acmePort}",
                        "managementListenAddress": f"127.0.0.1:{managementPort}",
                        "certificate": os.path.join(base, "cert.pem"),
                        "privateKey": os.path.join(base, "key.pem"),
                        "httpPort": httpPort,
                        # The CA validates TLS-ALPN-01 at the relay's public port.
                        "tlsPort": self.publicPort,
                        "ocspResponderURL": "",
                        "externalAccountBindingRequired": False,
                    }
                },
                f,
            )
        # No random sleep before each validation.
        self.patch(os, "environ", {**os.environ, "PEBBLE_VA_NOSLEEP": "1"})
        self.pebble = spawn(
            self,
            "pebble",
            [pebble, "-config", config, "-dnsserver", f"127.0.0.1:{dnsPort}", "-strict"],
            base,
        )
        yield self.pebble.waitFor(r"ACME directory available")
        self.directory = f"https://localhost:{acmePort}/dir"
        self.root = os.path.join(base, "root.pem")

        @inlineCallbacks
        def fetchRoot() -> Any:
            out, err, code = yield getProcessOutputAndValue(
                self.curl,
                [
                    "-sS",
                    "--max-time",
                    "20",
                    "--cacert",
                    self.pebbleCA,
                    "-o",
                    self.root,
                    f"https://localhost:{managementPort}/roots/0",
                ],
                env=os.environ,
            )
            if code != 0:
                raise AssertionError(err.decode())
            return True

        # Pebble logs that it listens a moment before its listeners accept.
        yield pollUntil(fetchRoot, "pebble's root from its management interface")

    def expose(self, home: str, name: str, extra: tuple[str, ...] = ()) -> Any:
        """
        Start C{portal expose} for the local service with C{--acme} against pebble.

        @return: The watcher.
        """
        return startExpose(
            self,
            home,
            self.controlPort,
            [
                str(self.webPort),
                "--name",
                name,
                "--acme",
                self.directory,
                "--acme-ca",
                self.pebbleCA,
                "--acme-email",
                "tenant@example.net",
                *extra,
            ],
        )

    def addA(self, host: str, address: str) -> None:
        """
        Make the DNS server pebble uses answer C{address} for C{host} (blocking; run it on a
        thread).
        """
        body = json.dumps({"host": host, "addresses": [address]})
        request = Request(
            f"http://127.0.0.1:{self.dnsManagement}/add-a", data=body.encode(), method="POST"
        )
        with urlopen(request, timeout=WAIT) as response:
            self.assertEqual(response.status, 200)

    @inlineCallbacks
    def waitIssued(self, tunnel: Any, after: int = 0) -> Any:
        """
        Wait for a certificate of the tunnel; fail at once, with the CA's message, if an order
        fails instead.

        @param after: Only consider output lines from this index on.
        @return: A L{Deferred} firing with the C{acme-issued} event.
        """
        match = yield tunnel.waitFor(r'"event": "acme-(issued|failed)"', timeout=90, after=after)
        event = json.loads(match.string)
        self.assertEqual(event["event"], "acme-issued", event["message"])
        return event

    def url(self, name: str, path: str = "/") -> str:
        """
        @return: The public URL of lease C{name}.
        """
        return f"https://{name}.{TUNNEL_DOMAIN}:{self.publicPort}{path}"

    @inlineCallbacks
    def curlPage(
        self,
        name: str,
        cafile: str,
        *options: str,
        domain: str = TUNNEL_DOMAIN,
        address: str = "127.0.0.1",
        path: str = "/",
    ) -> Any:
        """
        Fetch a page of lease C{name} with curl, trusting only C{cafile}, with the lease hostname
        resolved to C{address}.

        @return: A L{Deferred} firing with C{(exit code, body, stderr)}.
        """
        host = f"{name}.{domain}"
        out, err, code = yield getProcessOutputAndValue(
            self.curl,
            [
                "-sS",
                "--max-time",
                "90",
                "--cacert",
                cafile,
                "--resolve",
                f"{host}:{self.publicPort}:{address}",
                *options,
                f"https://{host}:{self.publicPort}{path}",
            ],
            env=os.environ,
        )
        return code, out, err.decode()

    def handshake(self, name: str, cafile: str) -> Any:
        """
        Fetch C{/} of lease C{name} with Python's ssl, trusting only C{cafile}.

        @return: A L{Deferred} firing with C{(response, peer certificate)}.
        """
        request = f"GET / HTTP/1.1\r\nHost: {name}.{TUNNEL_DOMAIN}\r\nConnection: close\r\n\r\n"
        return deferToThread(
            tlsRequest, self.publicPort, f"{name}.{TUNNEL_DOMAIN}", request.encode(), cafile
        )

    def assertNoKeyMaterial(self, *keyFiles: str) -> None:
        """
        Assert that neither the relay's state directory nor its log holds any of these private keys
        (their PEM body or DER bytes).
        """
        secrets: list[bytes] = []
        for path in keyFiles:
            with open(path, "rb") as f:
                pem = f.read()
            key = serialization.load_pem_private_key(pem, None)
            assert isinstance(key, ec.EllipticCurvePrivateKey)
            scalar = key.private_numbers().private_value.to_bytes(32, "big")
            # The PEM lines after the first (which every P-256 key shares), and the raw scalar
            # in binary and base64.
            lines = [line for line in pem.splitlines() if not line.startswith(b"-----")]
            secrets += [*lines[1:], scalar, base64.b64encode(scalar)[:40]]
        blobs = ["\n".join(self.relay.lines).encode()]
        for directory, _, files in os.walk(self.relayState):
            for file in files:
                with open(os.path.join(directory, file), "rb") as f:
                    blobs.append(f.read())
        self.assertGreater(len(blobs), 1)
        for blob in blobs:
            for secret in secrets:
                self.assertNotIn(secret, blob)

    @inlineCallbacks
    def test_issuedTrustedAndReused(self) -> None:
        """
        A tunnel with C{--acme} serves the local CA's certificate until pebble issues one through
        the relay; curl then verifies the page against pebble's root alone; the relay holds no
        key material; a restart serves the stored certificate without a new order.
        """
        home = homeDir(self, "tunnel")
        tunnel = self.expose(home, "blog")
        lease = yield waitForLease(tunnel)
        self.assertEqual(lease["certificate"], "local-ca")
        yield self.waitIssued(tunnel)
        self.assertEqual(len(_events(tunnel, "acme-ordering")), 1)
        code, body, err = yield self.curlPage("blog", self.root)
        self.assertEqual((code, body), (0, PAGE), err)
        # The local CA alone no longer verifies the page: it is the ACME certificate.
        code, _, _ = yield self.curlPage("blog", lease["ca"])
        self.assertNotEqual(code, 0)
        _, peer = yield self.handshake("blog", self.root)
        issued = _events(tunnel, "acme-issued")[0]
        self.assertEqual(_serial(peer), int(issued["serial"], 16))
        # Pebble validated through the relay, which saw only a ClientHello and ciphertext.
        self.assertTrue(
            any("tls-alpn-01" in line and "valid" in line.lower() for line in self.pebble.lines)
            or any("Issued certificate serial" in line for line in self.pebble.lines)
        )
        acmeDir = os.path.join(home, "acme")
        [keyFile] = [
            os.path.join(d, "key.pem") for d, _, files in os.walk(acmeDir) if "key.pem" in files
        ]
        self.assertEqual(os.stat(keyFile).st_mode & 0o777, 0o600)
        accountKey = os.path.join(home, "identity.acme-account.pem")
        self.assertEqual(os.stat(accountKey).st_mode & 0o777, 0o600)
        self.assertNoKeyMaterial(keyFile, accountKey)

        yield tunnel.stop()
        again = self.expose(home, "blog")
        lease = yield waitForLease(again)
        self.assertEqual(lease["certificate"], "acme")
        reused = yield again.waitFor(r'"event": "acme-issued"')
        self.assertTrue(json.loads(reused.string)["stored"])
        self.assertEqual(_events(again, "acme-ordering"), [])
        _, peer = yield self.handshake("blog", self.root)
        self.assertEqual(_serial(peer), int(issued["serial"], 16))

    @inlineCallbacks
    def test_renewalDuringDownload(self) -> None:
        """
        With a renew-before just short of the certificate's remaining life, the tunnel renews it
        while a slow download runs on an open connection: the download completes whole on the
        old certificate, and new connections get the renewed one.
        """
        home = homeDir(self, "tunnel")
        tunnel = self.expose(home, "dl")
        yield self.waitIssued(tunnel)
        issued = _events(tunnel, "acme-issued")[0]
        yield tunnel.stop()
        [chainFile] = [
            os.path.join(d, "fullchain.pem")
            for d, _, files in os.walk(os.path.join(home, "acme"))
            if "fullchain.pem" in files
        ]
        with open(chainFile, "rb") as f:
            leaf = x509.load_pem_x509_certificates(f.read())[0]
        now = reactor.seconds()
        remaining = leaf.not_valid_after_utc.timestamp() - now
        # Renewal due about 8 s after the restart.
        renewBefore = int(remaining - 8)
        tunnel = self.expose(home, "dl", ("--acme-renew-before", f"{renewBefore}s"))
        yield waitForLease(tunnel)
        downloadFile = os.path.join(home, "download")
        started = reactor.seconds()
        slow = self.curlPage(
            "dl", self.root, "-o", downloadFile, "-w", "%{size_download}", path="/slow"
        )
        renewed = yield tunnel.waitFor(r'"event": "acme-renewed"', timeout=60)
        renewedAt = reactor.seconds()
        code, out, err = yield slow
        finished = reactor.seconds()
        self.assertEqual(code, 0, err)
        self.assertEqual(out.split()[0], str(CHUNKS * CHUNK).encode())
        self.assertLess(renewedAt, finished)
        self.assertLess(started, renewedAt)
        self.assertEqual(os.path.getsize(downloadFile), CHUNKS * CHUNK)
        renewedSerial = int(json.loads(renewed.string)["serial"], 16)
        self.assertNotEqual(renewedSerial, int(issued["serial"], 16))
        _, peer = yield self.handshake("dl", self.root)
        # New connections get the renewed certificate (or a later renewal of it).
        self.assertNotEqual(_serial(peer), int(issued["serial"], 16))
        self.assertEqual(_events(tunnel, "acme-failed"), [])

    @inlineCallbacks
    def test_nameNotResolvingToRelay(self) -> None:
        """
        When the lease hostname does not resolve to the relay, the order fails with one clear
        message carrying pebble's problem detail, and the local CA's certificate keeps serving.
        """
        yield deferToThread(self.addA, f"lost.{TUNNEL_DOMAIN}.", "127.0.0.2")
        home = homeDir(self, "tunnel")
        tunnel = self.expose(home, "lost")
        lease = yield waitForLease(tunnel)
        match = yield tunnel.waitFor(r'"event": "acme-failed"', timeout=90)
        failed = json.loads(match.string)
        self.assertIn("lost.portal.test", failed["message"])
        self.assertIn("127.0.0.2", failed["problem"])
        self.assertIn("the local CA's certificate keeps serving", failed["message"])
        self.assertEqual(failed["retryIn"], 300.0)
        self.assertEqual(len(_events(tunnel, "acme-failed")), 1)
        code, body, err = yield self.curlPage("lost", lease["ca"])
        self.assertEqual((code, body), (0, PAGE), err)

    @inlineCallbacks
    def test_poolOfTwoRelays(self) -> None:
        """
        A tunnel holding leases on two relays (each with its own tunnel domain, on its own
        address, both on the port pebble validates at) gets a certificate for each relay's
        hostname, and each URL verifies against pebble's root.
        """
        yield deferToThread(self.addA, "pool.other.test.", "127.0.0.2")
        relayB = spawn(
            self,
            "portal-relay B",
            [
                _twistd(),
                "-n",
                "--pidfile=",
                "portal-relay",
                "--state-dir",
                os.path.join(homeDir(self, "relayB"), "state"),
                "--public",
                f"tcp:{self.publicPort}:interface=127.0.0.2",
                "--control",
                "tcp:0:interface=127.0.0.1",
                "--tunnel-domain",
                "other.test",
            ],
            homeDir(self, "relayBhome"),
        )
        match = yield relayB.waitFor(r"control listening on 127\.0\.0\.1:(\d+)")
        home = homeDir(self, "tunnel")
        tunnel = self.expose(home, "pool", ("--relay", f"127.0.0.1:{match.group(1)}"))
        issued = set()
        after = 0
        while len(issued) < 2:
            event = yield self.waitIssued(tunnel, after)
            issued.add(event["hostname"])
            after = tunnel.lines.index(json.dumps(event, sort_keys=True)) + 1
        self.assertEqual(issued, {f"pool.{TUNNEL_DOMAIN}", "pool.other.test"})
        code, body, err = yield self.curlPage("pool", self.root)
        self.assertEqual((code, body), (0, PAGE), err)
        code, out, err = yield self.curlPage(
            "pool", self.root, domain="other.test", address="127.0.0.2"
        )
        self.assertEqual((code, out), (0, PAGE), err)

    @inlineCallbacks
    def test_chromium(self) -> None:
        """
        Headless Chromium trusting only pebble's root (in its NSS database) loads the page of a
        routed HTTP mode tunnel (C{--http}) with no certificate error: the DOM is the service's
        page.
        """
        chromium, certutil = browserTools()
        home = homeDir(self, "tunnel")
        tunnel = self.expose(home, "web", ("--http",))
        yield self.waitIssued(tunnel)
        browserHome = homeDir(self, "browser")
        yield trustCA(self, certutil, browserHome, self.root)
        out, err, code = yield dumpDOM(
            chromium,
            browserHome,
            self.url("web"),
            [f"--host-resolver-rules=MAP *.{TUNNEL_DOMAIN} 127.0.0.1"],
        )
        self.assertIn(b"Hello over ACME", out, err.decode(errors="replace")[-2000:])
        self.assertIn(b'id="greeting"', out)
