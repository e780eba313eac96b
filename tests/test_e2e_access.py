"""
End to end: C{--allow-ip} and C{--deny-ip} through a real relay and a real C{portal expose}, in
stream, routed HTTP and UDP modes. The visitors are on 127.0.0.1, which is the address the relay
reports.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import DatagramProtocol, Factory
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from twisted.web.server import Site

from tests.realprocesses import (
    RecordingApp,
    curl,
    freePortRange,
    homeDir,
    listenLocal,
    sleep,
    startExpose,
    startRelay,
    startTunnel,
    waitForLease,
)


class _Counter(DatagramProtocol):
    """
    A UDP service that counts what it receives and answers each datagram.

    @ivar received: The datagrams received.
    """

    def __init__(self) -> None:
        self.received: list[bytes] = []

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        """
        Count and echo.
        """
        self.received.append(datagram)
        assert self.transport is not None
        self.transport.write(datagram, addr)


def _send(port: int, payload: bytes) -> None:
    """
    Send one datagram to 127.0.0.1:C{port} from a fresh socket.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(payload, ("127.0.0.1", port))


class _TunnelWorld(TestCase):
    """
    A relay, a recording app and a tunnel to it, for the tests below.
    """

    timeout = 120

    @inlineCallbacks
    def _tunnel(self, extra: list[str], relayExtra: tuple[str, ...] = ()) -> Any:
        """
        A relay, a recording web app and a tunnel to it with C{extra} options.

        @return: C{(tunnel, lease, app)}.
        """
        relayState = os.path.join(homeDir(self, "relay"), "state")
        _, _, controlPort = yield startRelay(self, relayState, extra=relayExtra)
        app = RecordingApp("app")
        port = yield listenLocal(self, Site(app))
        tunnel = startTunnel(self, homeDir(self, "tunnel"), controlPort, str(port), extra)
        lease = yield waitForLease(tunnel)
        return tunnel, lease, app


class AccessEndToEndTests(_TunnelWorld):
    """
    Visitors refused by address never reach the service; visitors allowed do.
    """

    @inlineCallbacks
    def assertRefused(self, extra: list[str]) -> Any:
        """
        With C{extra}, a visitor from 127.0.0.1 gets no answer, the app sees nothing, and the
        tunnel says why.
        """
        tunnel, lease, app = yield self._tunnel(extra)
        code, status, _, _, err = yield curl(lease, "/secret")
        self.assertNotEqual(code, 0)
        self.assertEqual(status, 0, err)
        yield tunnel.waitFor(r"refused visitor 127\.0\.0\.1 .*: (in --deny-ip|not in any)")
        self.assertEqual(app.seen, [])

    def test_denyStream(self) -> Any:
        """
        Stream mode: a visitor in a C{--deny-ip} network is closed before TLS.
        """
        return self.assertRefused(["--deny-ip", "127.0.0.0/8"])

    def test_notAllowedHTTP(self) -> Any:
        """
        Routed HTTP mode: a visitor outside every C{--allow-ip} network is closed before TLS.
        """
        return self.assertRefused(["--http", "--allow-ip", "192.0.2.0/24"])

    @inlineCallbacks
    def test_allowed(self) -> Any:
        """
        A visitor in an C{--allow-ip} network and in no C{--deny-ip} one is served.
        """
        _, lease, app = yield self._tunnel(
            ["--http", "--allow-ip", "127.0.0.1", "--deny-ip", "10.0.0.0/8"]
        )
        code, status, _, _, err = yield curl(lease, "/open")
        self.assertEqual((code, status), (0, 200), err)
        self.assertEqual([uri for uri, _ in app.seen], ["/open"])

    @inlineCallbacks
    def test_denyUDP(self) -> Any:
        """
        UDP mode: datagrams from a denied visitor never reach the UDP service.
        """
        low, high = freePortRange(4)
        relayState = os.path.join(homeDir(self, "relay"), "state")
        _, _, controlPort = yield startRelay(
            self, relayState, extra=["--udp-ports", f"{low}-{high}"]
        )
        service = _Counter()
        listening = reactor.listenUDP(0, service, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        tunnel = startTunnel(
            self,
            homeDir(self, "tunnel"),
            controlPort,
            str(listening.getHost().port),
            ["--udp", "--deny-ip", "127.0.0.1"],
        )
        lease = yield waitForLease(tunnel)
        port = int(lease["url"].rsplit(":", 1)[1])
        yield deferToThread(_send, port, b"first")
        yield tunnel.waitFor(r"refused visitor 127\.0\.0\.1: in --deny-ip 127\.0\.0\.1/32")
        yield deferToThread(_send, port, b"second")
        # Nothing can signal that a datagram was not delivered: give it time to arrive.
        yield sleep(1.0)
        self.assertEqual(service.received, [])

    @inlineCallbacks
    def test_basicAuth(self) -> Any:
        """
        Routed HTTP mode with C{--basic-auth}: without or with wrong credentials a visitor gets 401
        and a Basic challenge and the app sees nothing; with the right ones, over HTTP/1.1 and
        HTTP/2, the request reaches the app without the C{Authorization} header.
        """
        _, lease, app = yield self._tunnel(["--http", "--basic-auth", "alice:wonder:land"])
        code, status, body, _, err = yield curl(lease, "/none", "-D", "-")
        self.assertEqual((code, status), (0, 401), err)
        self.assertIn(b'www-authenticate: basic realm="portal"', body.lower())
        code, status, _, _, err = yield curl(lease, "/wrong", "-u", "alice:wonder")
        self.assertEqual((code, status), (0, 401), err)
        self.assertEqual(app.seen, [])
        for option, version in (("--http1.1", "1.1"), ("--http2", "2")):
            code, status, _, seen, err = yield curl(lease, "/in", option, "-u", "alice:wonder:land")
            self.assertEqual((code, status, seen), (0, 200, version), err)
        self.assertEqual([uri for uri, _ in app.seen], ["/in", "/in"])
        for _, headers in app.seen:
            self.assertNotIn("authorization", headers)


class EventsEndToEndTests(_TunnelWorld):
    """
    What C{--json} reports of each visitor: a C{connection} event in stream mode, a C{request}
    event in routed HTTP mode, both with the visitor's address and the time.
    """

    @inlineCallbacks
    def test_connectionEvent(self) -> Any:
        """
        Stream mode reports each ended connection with the client, bytes each way and duration.
        """
        tunnel, lease, _ = yield self._tunnel([])
        code, status, _, _, err = yield curl(lease, "/", "--http1.1")
        self.assertEqual((code, status), (0, 200), err)
        match = yield tunnel.waitFor(r'^\{.*"event": "connection".*\}$')
        event = json.loads(match.group(0))
        self.assertEqual(event["client"], "127.0.0.1")
        self.assertGreater(event["in"], 0)
        self.assertGreater(event["out"], 0)
        self.assertGreaterEqual(event["seconds"], 0)
        self.assertRegex(event["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00$")

    @inlineCallbacks
    def test_requestEvent(self) -> Any:
        """
        Routed HTTP mode's request events carry the client and the time.
        """
        tunnel, lease, _ = yield self._tunnel(["--http"])
        code, status, _, _, err = yield curl(lease, "/x")
        self.assertEqual((code, status), (0, 200), err)
        match = yield tunnel.waitFor(r'^\{.*"event": "request".*\}$')
        event = json.loads(match.group(0))
        self.assertEqual((event["client"], event["path"]), ("127.0.0.1", "/x"))
        self.assertIn("time", event)

    @inlineCallbacks
    def test_targetDown(self) -> Any:
        """
        A tunnel whose local service does not listen says so when it starts, and keeps running.
        """
        relayState = os.path.join(homeDir(self, "relay"), "state")
        _, _, controlPort = yield startRelay(self, relayState)
        listening = yield serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(Factory())
        closed = listening.getHost().port
        yield listening.stopListening()
        tunnel = startTunnel(self, homeDir(self, "tunnel"), controlPort, str(closed))
        match = yield tunnel.waitFor(r'^\{.*"event": "target-down".*\}$')
        self.assertIn(f"127.0.0.1:{closed} does not accept connections", match.group(0))
        yield waitForLease(tunnel)
        self.assertIsNone(tunnel.exitCode)

    @inlineCallbacks
    def test_deadHopBlamed(self) -> Any:
        """
        In a chain whose first hop is down, the tunnel blames that hop, not the relay at the end.
        """
        relayState = os.path.join(homeDir(self, "relay"), "state")
        _, _, controlPort = yield startRelay(self, relayState)
        listening = yield serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(Factory())
        closed = listening.getHost().port
        yield listening.stopListening()
        tunnel = startExpose(
            self, homeDir(self, "tunnel"), controlPort, ["8000", "--via", f"127.0.0.1:{closed}"]
        )
        match = yield tunnel.waitFor(r'^\{.*"event": "unreachable".*\}$')
        event = json.loads(match.group(0))
        self.assertEqual(event["relay"], f"127.0.0.1:{controlPort}")
        self.assertIn(
            f"cannot reach relay 127.0.0.1:{closed} (--via, on the way to 127.0.0.1:{controlPort})",
            event["message"],
        )
        self.assertNotIn("cannot reach the relay:", event["message"])
