"""
End to end for the app gateway's callers (issue 7): paired terminals (command line and a real
headless Chromium) and peers (another Portal calling through its local peer endpoint), with a real
C{twistd portal-relay}, real C{portal expose --app} processes, the C{portal} commands an owner would
type, and local apps that record what they receive; all on 127.0.0.1 with ports the OS chose.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import sys
import tempfile
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from twisted.web.server import Site

from portal.gateway.signatures import signRequest
from portal.trust.identity import Identity, loadIdentity, saveIdentity
from tests.realprocesses import (
    WAIT,
    RecordingApp,
    browserTools,
    curl,
    evaluate,
    homeDir,
    listenLocal,
    openBrowser,
    pollUntil,
    spawn,
    startExpose,
    startRelay,
    trustCA,
)

#: The identity headers every path of the test apps passes to the app.
_IDENTITY_HEADERS = {
    "X-Ptl-Client-Id": "{{ auth.client_id }}",
    "X-Ptl-Client-Name": "{{ auth.client_name }}",
    "X-Ptl-Client-Type": "{{ auth.client_type }}",
}


def _appJSON(name: str, port: int) -> dict[str, Any]:
    """
    @return: An app named C{name} on C{port}: every path private, but C{/public/} (anyone) and
        C{/peer/} (peers and terminals), with the identity headers everywhere.
    """
    return {
        "name": name,
        "routes": {"/": str(port)},
        "paths": {
            "": {"access": "private", "headers": _IDENTITY_HEADERS},
            "/public/": {"access": "public"},
            "/peer/": {"access": "peer"},
        },
    }


def _tlsExchange(lease: dict[str, Any], request: bytes) -> bytes:
    """
    Send C{request} (a whole HTTP/1.1 request, C{Connection: close}) to a lease's URL over TLS,
    verified against its CA, and read the answer to the end (blocking; run it on a thread).

    @return: The raw response.
    """
    host, _, port = lease["url"].removeprefix("https://").partition(":")
    context = ssl.create_default_context(cafile=lease["ca"])
    with socket.create_connection(("127.0.0.1", int(port)), timeout=20) as raw:
        with context.wrap_socket(raw, server_hostname=host) as tls:
            tls.sendall(request)
            chunks = []
            while data := tls.recv(65536):
                chunks.append(data)
    return b"".join(chunks)


def _status(response: bytes) -> int:
    """
    @return: The status code of a raw HTTP/1.1 response.
    """
    return int(response.split(b" ", 2)[1])


def _peerCall(endpoint: str, peerId: str, path: str) -> tuple[int, bytes]:
    """
    GET C{path} of peer C{peerId} through a local peer endpoint (blocking; run it on a thread).

    @param endpoint: The endpoint's URL, C{http://127.0.0.1:PORT}, from its C{peer-endpoint} event.
    @return: The status and body the endpoint answered.
    """
    from urllib.error import HTTPError
    from urllib.request import urlopen

    try:
        with urlopen(f"{endpoint}/peer/{peerId}{path}", timeout=45) as response:
            return response.status, response.read()
    except HTTPError as e:
        return e.code, e.read()


class _Tunnels(TestCase):
    """
    Starting a relay, apps and tunnels, and running C{portal} commands.
    """

    timeout = 180

    relayControlPort: int | None = None

    @inlineCallbacks
    def _relay(self) -> Any:
        """
        Start the relay, once per test.

        @return: A L{Deferred} firing with its control port.
        """
        if self.relayControlPort is None:
            _, _, self.relayControlPort = yield startRelay(
                self, os.path.join(homeDir(self, "relay"), "state")
            )
        return self.relayControlPort

    def _shortHome(self, name: str) -> str:
        """
        A home for a tunnel short enough for its control socket's path (at most 107 bytes for a
        UNIX socket; trial's temporary directories are deeper), removed when the test ends.
        """
        home = tempfile.mkdtemp(prefix=f"ptl-{name}-")
        self.addCleanup(shutil.rmtree, home, True)
        return home

    @inlineCallbacks
    def _exposeApp(self, name: str) -> Any:
        """
        Start a recording app named C{name} and C{portal expose --app} for it, and wait for its
        lease and its local peer endpoint.

        @return: A L{Deferred} firing with C{(app, tunnel, lease, identity path, peer endpoint
            URL)}.
        """
        app = RecordingApp(name)
        port = yield listenLocal(self, Site(app))
        appPath = os.path.join(homeDir(self, f"{name}-json"), "app.json")
        with open(appPath, "w") as f:
            json.dump(_appJSON(name, port), f)
        controlPort = yield self._relay()
        home = self._shortHome(name)
        tunnel = startExpose(self, home, controlPort, ["--app", appPath], f"portal expose {name}")
        match = yield tunnel.waitFor(rf'^\{{.*"event": "lease".*"url": "https://{name}\..*\}}$')
        lease = json.loads(match.group(0))
        match = yield tunnel.waitFor(r'^\{.*"event": "peer-endpoint".*\}$')
        endpoint = json.loads(match.group(0))["url"]
        return app, tunnel, lease, os.path.join(home, "identity.json"), endpoint

    @inlineCallbacks
    def _portal(self, *arguments: str, home: str | None = None) -> Any:
        """
        Run C{portal ARGUMENTS} (with a fresh home unless C{home} is given) and check it succeeds.

        @return: A L{Deferred} firing with its standard output, stripped.
        """
        if home is None:
            home = homeDir(self, f"cli-{arguments[0]}-{time.monotonic_ns()}")
        command = spawn(
            self, f"portal {arguments[0]}", [sys.executable, "-m", "portal", *arguments], home
        )
        killer = reactor.callLater(WAIT, command.signal, "KILL")
        code = yield command.ended
        if not killer.active():
            self.fail(f"portal {' '.join(arguments)} did not end in {WAIT}s:\n{command.output()}")
        killer.cancel()
        self.assertEqual(
            code, 0, f"portal {' '.join(arguments)} failed ({code}):\n{command.output()}"
        )
        return command.stdout.decode().strip()

    def _seenBy(self, app: RecordingApp, uri: str) -> dict[str, list[str]]:
        """
        @return: The headers of the last request for C{uri} the app received.
        """
        for seenURI, headers in reversed(app.seen):
            if seenURI == uri:
                return headers
        self.fail(f"the app {app.name} never received {uri}; it received {app.seen!r}")


class TerminalEndToEndTests(_Tunnels):
    """
    Paired terminals through the real tunnel: the owner's C{portal pair} and C{portal terminals},
    a command-line terminal's C{portal pair --join/--session}, and headless Chromium on the pairing
    page.
    """

    @inlineCallbacks
    def test_commandLineTerminal(self) -> Any:
        """
        The owner asks the running tunnel for a code (C{portal pair --json}); a command-line terminal
        pairs with it (C{portal pair --join}) and gets a session cookie (C{portal pair --session});
        with that cookie a private path reaches the app, which sees C{terminal}, the terminal's id
        and name, and not the session cookie. Once the owner revokes the terminal (C{portal terminals
        revoke} with a prefix of its id) the same cookie is refused with 401, over HTTP/1.1 and
        HTTP/2, and the app sees nothing more.
        """
        app, _, lease, identity, _ = yield self._exposeApp("notes")
        url = lease["url"]

        # Without a session the private path is refused.
        code, status, _, _, err = yield curl(lease, "/private/diary", "--http1.1")
        self.assertEqual((code, status), (0, 401), err)
        self.assertEqual(app.seen, [])

        pairing = json.loads(
            (yield self._portal("pair", "--json", "--identity", identity, "--name", "cli-box"))
        )
        self.assertEqual(pairing["urls"], [url + "/.portal/pair"])
        terminalHome = homeDir(self, "terminal")
        yield self._portal(
            "pair",
            "--join",
            pairing["urls"][0],
            pairing["code"],
            "--cacert",
            lease["ca"],
            home=terminalHome,
        )
        cookie = yield self._portal(
            "pair", "--session", url, "--cacert", lease["ca"], home=terminalHome
        )
        self.assertTrue(cookie.startswith("__Host-ptl-session="), cookie)

        listed = yield self._portal("terminals", "list", "--json", "--identity", identity)
        (terminal,) = [json.loads(line) for line in listed.splitlines()]
        self.assertEqual(terminal["name"], "cli-box")

        for option in ("--http1.1", "--http2"):
            code, status, body, _, err = yield curl(lease, "/private/diary", option, "-b", cookie)
            self.assertEqual((code, status), (0, 200), (err, body))
            headers = json.loads(body)["headers"]
            self.assertEqual(headers["x-ptl-client-type"], ["terminal"])
            self.assertEqual(headers["x-ptl-client-id"], [terminal["id"]])
            self.assertEqual(headers["x-ptl-client-name"], ["cli-box"])
            self.assertNotIn("ptl-session", json.dumps(headers))
        self.assertEqual(len(app.seen), 2)

        yield self._portal("terminals", "revoke", terminal["id"][:8], "--identity", identity)
        for option in ("--http1.1", "--http2"):
            code, status, body, _, err = yield curl(lease, "/private/diary", option, "-b", cookie)
            self.assertEqual((code, status), (0, 401), (err, body))
        self.assertEqual(len(app.seen), 2)

    @inlineCallbacks
    def test_browserTerminal(self) -> Any:
        """
        Headless Chromium, trusting the tunnel's local CA as a user would, opens the pairing page
        with a code from C{portal pair} in its fragment and C{?next=/private/page}; it pairs (a
        WebCrypto key kept in the browser), is sent on to the private page, and the app sees
        C{terminal} with the id of the terminal the owner's C{portal terminals list} shows, named as
        the page asked. Skipped only when Chromium or certutil is missing.
        """
        chromium, certutil = browserTools()
        app, _, lease, identity, _ = yield self._exposeApp("notes")
        url = lease["url"]
        browserHome = homeDir(self, "browser")
        yield trustCA(self, certutil, browserHome, lease["ca"])
        pairing = json.loads((yield self._portal("pair", "--json", "--identity", identity)))

        devtools = yield openBrowser(
            self, chromium, browserHome, f"{url}/.portal/pair?next=/private/page#{pairing['code']}"
        )
        status = 'document.getElementById("portal-status")?.textContent || ""'
        yield pollUntil(
            lambda: evaluate(devtools, url, status).addCallback(
                lambda text: "not paired yet" in text
            ),
            "the pairing page never said the browser is not paired yet",
        )
        yield evaluate(
            devtools,
            url + "/.portal/pair",
            'document.getElementById("portal-name").value = "chromium";'
            ' document.getElementById("portal-form").requestSubmit(); true',
        )

        def privatePage() -> Any:
            return evaluate(
                devtools,
                url + "/private/page",
                'document.readyState === "complete" ? document.body.innerText : ""',
            )

        text = yield pollUntil(privatePage, "the browser never reached /private/page after pairing")
        answer = json.loads(text)
        listed = yield self._portal("terminals", "list", "--json", "--identity", identity)
        (terminal,) = [json.loads(line) for line in listed.splitlines()]
        self.assertEqual(terminal["name"], "chromium")
        for headers in (answer["headers"], self._seenBy(app, "/private/page")):
            self.assertEqual(headers["x-ptl-client-type"], ["terminal"])
            self.assertEqual(headers["x-ptl-client-id"], [terminal["id"]])
            self.assertEqual(headers["x-ptl-client-name"], ["chromium"])


class PeerEndToEndTests(_Tunnels):
    """
    Peers through the real tunnels and relay: Alice's app calls Bob's through Alice's local peer
    endpoint, which signs with Alice's identity; Bob's gateway checks the signature against Bob's
    contact list.
    """

    @inlineCallbacks
    def test_peerCalls(self) -> Any:
        """
        With each in the other's contacts (C{portal peers add}; Bob's URL and CA for Alice), a call
        from Alice's peer endpoint to a C{peer} path of Bob's app arrives as C{peer} with Alice's full
        identity id and contact name, without the signature fields; the same call to a C{private}
        path is refused (403). The same call from Carol, who has Bob as a contact but is not Bob's,
        is refused with 403 and never reaches Bob's app; and once Bob removes Alice, so is Alice's.
        """
        bobApp, _, bobLease, bobIdentity, _ = yield self._exposeApp("bob")
        _, _, _, aliceIdentity, aliceEndpoint = yield self._exposeApp("alice")
        _, _, _, carolIdentity, carolEndpoint = yield self._exposeApp("carol")
        bobId = loadIdentity(bobIdentity).id
        aliceId = loadIdentity(aliceIdentity).id
        yield self._portal("peers", "add", aliceId, "--name", "Alice", "--identity", bobIdentity)
        for caller in (aliceIdentity, carolIdentity):
            yield self._portal(
                "peers",
                "add",
                bobId,
                "--name",
                "Bob",
                "--url",
                bobLease["url"],
                "--ca",
                bobLease["ca"],
                "--identity",
                caller,
            )

        status, body = yield deferToThread(_peerCall, aliceEndpoint, bobId, "/peer/inbox?x=1")
        self.assertEqual(status, 200, body)
        headers = json.loads(body)["headers"]
        self.assertEqual(headers["x-ptl-client-type"], ["peer"])
        self.assertEqual(headers["x-ptl-client-id"], [aliceId])
        self.assertEqual(headers["x-ptl-client-name"], ["Alice"])
        for stripped in ("signature", "signature-input", "portal-peer-key"):
            self.assertNotIn(stripped, headers)
        self.assertEqual([uri for uri, _ in bobApp.seen], ["/peer/inbox?x=1"])

        status, body = yield deferToThread(_peerCall, aliceEndpoint, bobId, "/private/diary")
        self.assertEqual(status, 403, body)

        status, body = yield deferToThread(_peerCall, carolEndpoint, bobId, "/peer/inbox?x=1")
        self.assertEqual(status, 403, body)
        self.assertIn(b"not a contact", body)

        yield self._portal("peers", "remove", aliceId, "--identity", bobIdentity)
        status, body = yield deferToThread(_peerCall, aliceEndpoint, bobId, "/peer/inbox?x=1")
        self.assertEqual(status, 403, body)
        self.assertEqual(len(bobApp.seen), 1)

    @inlineCallbacks
    def test_replayedRequest(self) -> Any:
        """
        A request signed with Alice's identity file (as her peer endpoint signs) and sent straight to
        Bob's public URL is accepted once, as C{peer} Alice; the very same bytes sent again are
        refused with 401 (a replayed nonce) and do not reach Bob's app.
        """
        bobApp, _, bobLease, bobIdentity, _ = yield self._exposeApp("bob")
        alicePath = os.path.join(homeDir(self, "alice"), "identity.json")
        saveIdentity(Identity.generate(), alicePath)
        alice = loadIdentity(alicePath)
        yield self._portal("peers", "add", alice.id, "--name", "Alice", "--identity", bobIdentity)

        authority = bobLease["url"].removeprefix("https://")
        target = b"/peer/once?n=1"
        signed = signRequest(alice, b"GET", authority, target, b"", int(time.time()))
        request = (
            b"GET "
            + target
            + b" HTTP/1.1\r\nHost: "
            + authority.encode()
            + b"\r\n"
            + b"".join(name + b": " + value + b"\r\n" for name, value in signed)
            + b"Connection: close\r\n\r\n"
        )

        first = yield deferToThread(_tlsExchange, bobLease, request)
        self.assertEqual(_status(first), 200, first)
        ((uri, headers),) = bobApp.seen
        self.assertEqual(uri, "/peer/once?n=1")
        self.assertEqual(headers["x-ptl-client-type"], ["peer"])
        self.assertEqual(headers["x-ptl-client-id"], [alice.id])

        second = yield deferToThread(_tlsExchange, bobLease, request)
        self.assertEqual(_status(second), 401, second)
        self.assertIn(b"replayed", second)
        self.assertEqual(len(bobApp.seen), 1)
