"""
End to end: one tunnel holding leases on several real relays at once (a pool), relays dying and coming
back, and a relay's graceful shutdown; real C{twistd portal-relay} and C{portal expose} processes on
127.0.0.1 with ports the OS chose.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import threading
import time
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from twisted.web.server import Site

from tests.realprocesses import (
    WatchedProcess,
    homeDir,
    listenLocal,
    startExpose,
    startRelay,
)
from tests.test_e2e import PAGE, _fetch, _hostPort, _metrics, _Page


@inlineCallbacks
def _leaseOn(tunnel: WatchedProcess, controlPort: int, after: int = 0) -> Any:
    """
    Wait for the tunnel's C{lease} event for the relay at C{controlPort}.

    @return: A L{Deferred} firing with the event's dict.
    """
    pattern = rf'^(?=.*"event": "lease")(?=.*"relay": "127\.0\.0\.1:{controlPort}").*$'
    match = yield tunnel.waitFor(pattern, after=after)
    return json.loads(match.group(0))


class _FetchLoop:
    """
    Fetches a URL again and again on a thread, recording every failure, until stopped.

    @ivar fetched: Successful fetches.
    @ivar failures: What went wrong, one entry per failed fetch.
    """

    def __init__(self, url: str, cafile: str) -> None:
        self._url = url
        self._cafile = cafile
        self._stop = threading.Event()
        self.fetched = 0
        self.failures: list[str] = []

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                response, _ = _fetch(self._url, self._cafile)
            except (OSError, ssl.SSLError) as e:
                self.failures.append(repr(e))
            else:
                if response.endswith(PAGE):
                    self.fetched += 1
                else:
                    self.failures.append(repr(response[:200]))
            time.sleep(0.05)

    def start(self) -> Any:
        """
        Start fetching.

        @return: A L{Deferred} that fires when the loop has stopped.
        """
        return deferToThread(self._run)

    def stop(self) -> None:
        """
        Stop after the current fetch.
        """
        self._stop.set()


def _openRequest(url: str, cafile: str) -> ssl.SSLSocket:
    """
    Open a TLS connection to C{url} and send all of a GET request but its final line break, so that
    the connection stays open, mid-request, at the relay.
    """
    host, port = _hostPort(url)
    context = ssl.create_default_context(cafile=cafile)
    raw = socket.create_connection(("127.0.0.1", port), timeout=20)
    tls = context.wrap_socket(raw, server_hostname=host)
    tls.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n".encode())
    return tls


def _finishRequest(tls: ssl.SSLSocket) -> bytes:
    """
    Finish a request opened by L{_openRequest} and read the whole response.
    """
    with tls:
        tls.sendall(b"\r\n")
        chunks = []
        while data := tls.recv(65536):
            chunks.append(data)
    return b"".join(chunks)


def _connectRefused(port: int) -> bool:
    """
    @return: Whether a TCP connection to C{port} on 127.0.0.1 is refused.
    """
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


class PoolEndToEndTests(TestCase):
    """
    C{portal expose PORT --relay A --relay B}: a lease and a URL on each relay, each relay's outages its
    own.
    """

    timeout = 180

    @inlineCallbacks
    def _relay(
        self, name: str, public: int = 0, control: int = 0, extra: tuple[str, ...] = ()
    ) -> Any:
        """
        Start a relay with its own state directory (kept for a restart under the same C{name}).

        @return: A L{Deferred} firing with C{(watcher, publicPort, controlPort)}.
        """
        if not hasattr(self, "_states"):
            self._states: dict[str, str] = {}
        state = self._states.setdefault(name, os.path.join(homeDir(self, name), "state"))
        result = yield startRelay(
            self,
            state,
            public=f"tcp:{public}:interface=127.0.0.1",
            control=f"tcp:{control}:interface=127.0.0.1",
            extra=extra,
        )
        return result

    @inlineCallbacks
    def test_serveOnBothAndSurviveOneRelay(self) -> Any:
        """
        Three relays, a tunnel given two: both URLs serve the page and the third relay holds no lease.
        Killing relay A does not disturb relay B's URL (a client loop on it sees no failure
        throughout), the tunnel reports A's outage, and when A comes back on the same ports its URL
        serves again.
        """
        a, publicA, controlA = yield self._relay("a")
        b, publicB, controlB = yield self._relay("b")
        c, publicC, controlC = yield self._relay("c")
        servicePort = yield listenLocal(self, Site(_Page()))
        tunnel = startExpose(
            self,
            homeDir(self, "tunnel"),
            controlA,
            [str(servicePort), "--relay", f"127.0.0.1:{controlB}"],
        )
        leaseA = yield _leaseOn(tunnel, controlA)
        leaseB = yield _leaseOn(tunnel, controlB)
        self.assertTrue(leaseA["url"].endswith(f":{publicA}"), leaseA)
        self.assertTrue(leaseB["url"].endswith(f":{publicB}"), leaseB)
        for lease in (leaseA, leaseB):
            response, _ = yield deferToThread(_fetch, lease["url"], lease["ca"])
            self.assertTrue(response.endswith(PAGE), response[:200])
        relayCA = os.path.join(self._states["c"], "tls", "ca.pem")
        metricsC = yield deferToThread(_metrics, publicC, relayCA)
        self.assertEqual(metricsC["portal_relay_leases"], 0)

        loop = _FetchLoop(leaseB["url"], leaseB["ca"])
        looping = loop.start()
        try:
            seen = len(tunnel.lines)
            a.signal("KILL")
            yield a.ended
            yield tunnel.waitFor(
                rf'"event": "disconnected".*"relay": "127\.0\.0\.1:{controlA}"', after=seen
            )
            fetchedWhileDown = loop.fetched
            yield tunnel.waitFor(
                rf'"event": "unreachable".*"relay": "127\.0\.0\.1:{controlA}"', after=seen
            )
            seen = len(tunnel.lines)
            yield self._relay("a", publicA, controlA)
            again = yield _leaseOn(tunnel, controlA, after=seen)
            self.assertEqual(again["url"], leaseA["url"])
            response, _ = yield deferToThread(_fetch, leaseA["url"], leaseA["ca"])
            self.assertTrue(response.endswith(PAGE), response[:200])
        finally:
            loop.stop()
            yield looping
        self.assertEqual(loop.failures, [])
        self.assertGreater(loop.fetched, fetchedWhileDown)
        self.assertIsNone(tunnel.exitCode)

    @inlineCallbacks
    def test_gracefulShutdown(self) -> Any:
        """
        SIGTERM: the relay stops accepting visitors at once, tells the tunnel (which says so and keeps
        running), lets an open request finish, and exits as soon as it has, well before the grace
        period ends.
        """
        relay, publicPort, controlPort = yield self._relay("a", extra=("--shutdown-grace", "60"))
        servicePort = yield listenLocal(self, Site(_Page()))
        tunnel = startExpose(self, homeDir(self, "tunnel"), controlPort, [str(servicePort)])
        lease = yield _leaseOn(tunnel, controlPort)
        openRequest = yield deferToThread(_openRequest, lease["url"], lease["ca"])
        self.addCleanup(openRequest.close)
        seen = len(tunnel.lines)
        relay.signal("TERM")
        yield relay.waitFor(r"shutting down: accepting nothing new; 1 open connections")
        event = yield tunnel.waitFor(r'"event": "relay-leaving"', after=seen)
        self.assertIn("open connections get 60 s", event.string)
        refused = yield deferToThread(_connectRefused, publicPort)
        self.assertTrue(refused)
        self.assertIsNone(relay.exitCode)
        started = time.monotonic()
        response = yield deferToThread(_finishRequest, openRequest)
        self.assertTrue(response.endswith(PAGE), response[:200])
        code = yield relay.ended
        # twistd ends a SIGTERM'd run by re-raising the signal, so that its exit status tells why.
        self.assertIn(code, (0, -15), relay.output())
        self.assertIn("Main loop terminated", relay.output())
        self.assertLess(time.monotonic() - started, 30)
        self.assertIsNone(tunnel.exitCode)
