"""
End-to-end tests of multi-hop chains: real C{twistd portal-relay} processes (one forwarding hops with
C{--allow-hop}) and a real C{portal expose --via ... --relay ...}, all on 127.0.0.1.
"""

from __future__ import annotations

import os
import re
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.protocol import Factory
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from twisted.web.server import Site

from tests.realprocesses import (
    freePortRange,
    homeDir,
    listenLocal,
    spawn,
    startRelay,
    waitForLease,
)
from tests.test_e2e import PAGE, _fetch, _hostPort, _metrics, _Page
from tests.test_e2e_tcp import REPLY, _address, _DigestAfterEOF, _halfCloseExchange, _pattern

#: A hop relay's log line for an opened hop: its outbound connection's local port.
_OPENED = re.compile(r"hop \d+ opened: \S+ \(\w+\) -> (\S+) from 127\.0\.0\.1:(\d+)")
#: The last relay's log lines naming the peer port of a control session or a data session.
_CONTROL_PEER = re.compile(r"control session from 127\.0\.0\.1:(\d+): Hello")
_DATA_PEER = re.compile(r"data session attached from 127\.0\.0\.1:(\d+) \(TLS\)")


class ChainEndToEndTests(TestCase):
    """
    C{portal expose} through relay A to relay B.
    """

    timeout = 120

    def _expose(self, target: str, relays: list[str]) -> Any:
        """
        Start C{portal expose TARGET RELAYS...} with its own identity, printing JSON events.
        """
        import sys

        home = homeDir(self, "tunnel")
        argv = [
            sys.executable,
            "-m",
            "portal",
            "expose",
            target,
            *relays,
            "--identity",
            os.path.join(home, "identity.json"),
            "--json",
        ]
        return spawn(self, "portal expose", argv, home)

    @inlineCallbacks
    def _relays(self, hopExtra: list[str] | None = None, bExtra: tuple[str, ...] = ()) -> Any:
        """
        Start relay B (with C{bExtra} options), then relay A allowed to hop to B's control port.

        @return: C{(a, aControl, b, bPublic, bControl)}.
        """
        self._bState = os.path.join(homeDir(self, "b"), "state")
        b, bPublic, bControl = yield startRelay(self, self._bState, extra=list(bExtra))
        extra = ["--allow-hop", f"127.0.0.1:{bControl}"] if hopExtra is None else hopExtra
        a, _, aControl = yield startRelay(
            self, os.path.join(homeDir(self, "a"), "state"), extra=extra
        )
        return a, aControl, b, bPublic, bControl

    @inlineCallbacks
    def _onlyTLSDataSessions(self, bPublic: int) -> Any:
        """
        Relay B's /metrics counted TLS data sessions and no plain one: inside a chain every data
        session runs in TLS to B.
        """
        ca = os.path.join(self._bState, "tls", "ca.pem")
        metrics = yield deferToThread(_metrics, bPublic, ca)
        self.assertGreater(metrics["portal_relay_tls_data_sessions_total"], 0, metrics)
        self.assertNotIn("portal_relay_plain_data_sessions_total", metrics)

    @inlineCallbacks
    def test_pageThroughA(self) -> Any:
        """
        C{--via A --relay B}: the page is served at B's URL; B sees the tunnel's control session and
        its (TLS) data sessions coming from A's outbound connections; A's log holds neither the
        visitor's SNI hostname nor any of the page or the request.
        """
        a, aControl, b, bPublic, bControl = yield self._relays()
        service = yield listenLocal(self, Site(_Page()))
        tunnel = self._expose(
            str(service), ["--via", f"127.0.0.1:{aControl}", "--relay", f"127.0.0.1:{bControl}"]
        )
        lease = yield waitForLease(tunnel)
        self.assertEqual(lease["relay"], f"127.0.0.1:{bControl}")
        url = lease["url"]
        self.assertEqual(_hostPort(url)[1], bPublic)
        for _ in range(2):
            response, _ = yield deferToThread(_fetch, url, lease["ca"])
            self.assertTrue(response.startswith(b"HTTP/1."), response[:100])
            self.assertTrue(response.endswith(PAGE))
        hops = [m for m in map(_OPENED.search, a.lines) if m is not None]
        self.assertTrue(hops, a.output())
        self.assertEqual({m.group(1) for m in hops}, {f"127.0.0.1:{bControl}"})
        fromA = {int(m.group(2)) for m in hops}
        controlPeers = {int(m.group(1)) for m in map(_CONTROL_PEER.search, b.lines) if m}
        dataPeers = {int(m.group(1)) for m in map(_DATA_PEER.search, b.lines) if m}
        self.assertTrue(controlPeers, b.output())
        self.assertTrue(dataPeers, b.output())
        self.assertLessEqual(controlPeers | dataPeers, fromA)
        yield self._onlyTLSDataSessions(bPublic)
        host = _hostPort(url)[0]
        label = host.split(".")[0]
        aLog = a.output()
        for secret in (host, label, PAGE.decode().strip(), "GET /", "portal end-to-end"):
            self.assertNotIn(secret, aLog)
        self.assertIn(label, b.output())

    @inlineCallbacks
    def test_rawTCPThroughA(self) -> Any:
        """
        C{--tcp --via A --relay B}: raw TCP mode's sealed streams run inside TLS data sessions to B,
        and a client that half-closes still reads the whole reply through the chain.
        """
        low, high = freePortRange(2)
        a, aControl, b, bPublic, bControl = yield self._relays(
            bExtra=("--tcp-ports", f"{low}-{high}")
        )
        service = yield listenLocal(self, Factory.forProtocol(_DigestAfterEOF))
        tunnel = self._expose(
            f"127.0.0.1:{service}",
            ["--tcp", "--via", f"127.0.0.1:{aControl}", "--relay", f"127.0.0.1:{bControl}"],
        )
        lease = yield waitForLease(tunnel)
        port = _address(lease["url"])[1]
        sent, line, rest = yield deferToThread(_halfCloseExchange, port)
        self.assertEqual(line.decode(), sent)
        self.assertEqual(rest, _pattern(REPLY))
        self.assertTrue([m for m in map(_DATA_PEER.search, b.lines) if m], b.output())
        yield self._onlyTLSDataSessions(bPublic)

    @inlineCallbacks
    def test_hopNotAllowed(self) -> Any:
        """
        A hop to a destination A does not allow stops the tunnel with exit status 1 and a message
        naming the hop relay and the destination.
        """
        a, aControl, b, bPublic, bControl = yield self._relays(
            hopExtra=["--allow-hop", "127.0.0.1:1"]
        )
        tunnel = self._expose(
            "8000", ["--via", f"127.0.0.1:{aControl}", "--relay", f"127.0.0.1:{bControl}"]
        )
        code = yield tunnel.ended
        self.assertEqual(code, 1, tunnel.output())
        output = tunnel.output()
        self.assertIn(
            f"relay 127.0.0.1:{aControl} (--via) refused the hop to 127.0.0.1:{bControl}", output
        )
        self.assertIn("is not allowed on this relay", output)

    @inlineCallbacks
    def test_chainInPool(self) -> Any:
        """
        C{--relay A --via A --relay B}: one lease on A directly and one on B through A; the page is
        served at both URLs.
        """
        a, aControl, b, bPublic, bControl = yield self._relays()
        service = yield listenLocal(self, Site(_Page()))
        tunnel = self._expose(
            str(service),
            [
                "--relay",
                f"127.0.0.1:{aControl}",
                "--via",
                f"127.0.0.1:{aControl}",
                "--relay",
                f"127.0.0.1:{bControl}",
            ],
        )
        first = yield waitForLease(tunnel)
        second = yield waitForLease(tunnel, after=tunnel.lines.index(_line(tunnel, first)) + 1)
        leases = {lease["relay"]: lease for lease in (first, second)}
        self.assertEqual(set(leases), {f"127.0.0.1:{aControl}", f"127.0.0.1:{bControl}"})
        for lease in leases.values():
            response, _ = yield deferToThread(_fetch, lease["url"], lease["ca"])
            self.assertTrue(response.endswith(PAGE))
        self.assertTrue(any(_OPENED.search(line) for line in a.lines), a.output())


def _line(process: Any, event: dict[str, Any]) -> str:
    """
    @return: The output line of a JSON C{event}.
    """
    for line in process.lines:
        if line.startswith("{") and f'"url": "{event["url"]}"' in line and '"lease"' in line:
            return str(line)
    raise AssertionError(f"no line for {event}")
