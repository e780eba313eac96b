"""
End-to-end tests of the relay's dashboard and metrics: a real relay and tunnel, headless Chromium on
the relay's own hostname (the page refreshes itself; the operator's view with the admin token),
C{/api/status} and C{/metrics} over real connections, and the tunnel's C{--metrics} listener.
"""

from __future__ import annotations

import json
import os
from typing import Any
from urllib.error import HTTPError
from urllib.request import Request, urlopen

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from twisted.web.server import Site

from tests.metricstext import metricValues
from tests.realprocesses import (
    RecordingApp,
    browserTools,
    curl,
    evaluate,
    freePortRange,
    listenLocal,
    openBrowser,
    pollUntil,
    screenshot,
    startExpose,
    startRelay,
    trustCA,
    waitForLease,
)

#: The admin token the tests' relays are given.
TOKEN = "t0ken-for-the-dashboard-test"


def _get(url: str, cafile: str | None = None, token: str | None = None) -> tuple[int, bytes]:
    """
    GET C{url} (blocking), over TLS verified against C{cafile} for https.

    @return: The status and body (also for error statuses).
    """
    import ssl

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    context = ssl.create_default_context(cafile=cafile) if cafile else None
    try:
        with urlopen(Request(url, headers=headers), timeout=20, context=context) as response:
            return response.status, response.read()
    except HTTPError as e:
        return e.code, e.read()


class DashboardTests(TestCase):
    """
    The relay's dashboard, API and metrics against a real relay with one tunnel.
    """

    timeout = 120

    @inlineCallbacks
    def world(self, relayExtra: tuple[str, ...] = (), tunnelExtra: tuple[str, ...] = ()) -> Any:
        """
        Start an app, a relay with the admin token, and a tunnel publishing the app.

        @return: The relay's public port, its CA file, the lease event and the tunnel's watcher.
        """
        appPort = yield listenLocal(self, Site(RecordingApp("dashboard-app")))
        root = os.path.abspath(self.mktemp())
        state = os.path.join(root, "relay", "state")
        os.makedirs(os.path.dirname(state))
        _, publicPort, controlPort = yield startRelay(
            self, state, extra=("--admin-token", TOKEN, *relayExtra)
        )
        home = os.path.join(root, "tunnel")
        os.makedirs(home)
        tunnel = startExpose(self, home, controlPort, [str(appPort), *tunnelExtra])
        lease = yield waitForLease(tunnel)
        self.root = root
        return publicPort, os.path.join(state, "tls", "ca.pem"), lease, tunnel

    @inlineCallbacks
    def test_chromium(self) -> Any:
        """
        Chromium shows the operator's dashboard (the token in the URL's fragment): totals, the lease
        in the lease table, recent events; a visitor's request shows up without reloading; a
        screenshot is saved. The public API, asked from the same page without the token, has no
        lease table.
        """
        chromium, certutil = browserTools()
        publicPort, relayCA, lease, _ = yield self.world()
        hostname = lease["url"].removeprefix("https://").partition(":")[0]
        browserHome = os.path.join(self.root, "browser")
        yield trustCA(self, certutil, browserHome, relayCA)
        page = f"https://localhost:{publicPort}/"
        devtools = yield openBrowser(self, chromium, browserHome, f"{page}#token={TOKEN}")

        def read() -> Any:
            return evaluate(
                devtools,
                page,
                """(() => {
                  const text = (id) => document.getElementById(id).textContent;
                  return {state: text("state"), tunnels: text("tunnels"), leases: text("leases"),
                          visitors: text("visitors"), toVisitors: text("to-visitors"),
                          version: text("version"), admin: !document.getElementById("admin").hidden,
                          leaseTable: text("lease-table"), events: text("events"),
                          refusals: text("refusals"), pool: text("pool")};
                })()""",
            )

        first = yield pollUntil(
            lambda: read().addCallback(lambda dom: dom if dom["state"] == "live" else None),
            "the dashboard rendered the operator's view",
        )
        self.assertEqual(first["tunnels"], "1")
        self.assertEqual(first["leases"], "1 / 1")
        self.assertEqual(first["version"], "0.1.0")
        self.assertTrue(first["admin"])
        self.assertIn(hostname, first["leaseTable"])
        self.assertIn("live", first["leaseTable"])
        self.assertIn("registered by", first["events"])
        self.assertIn("no live lease for the name", first["refusals"])
        self.assertIn("idle data sessions", first["pool"])
        code, status, _, _, err = yield curl(lease, "/hello")
        self.assertEqual((code, status), (0, 200), err)
        later = yield pollUntil(
            lambda: read().addCallback(
                lambda dom: dom if dom["visitors"] != first["visitors"] else None
            ),
            "the dashboard refreshed itself after a visit",
        )
        self.assertNotEqual(later["toVisitors"], "0 B")
        path = os.path.join(os.path.abspath(self.mktemp()) + "-dashboard.png")
        png = yield screenshot(devtools, page, path)
        self.assertEqual(png[:8], b"\x89PNG\r\n\x1a\n")
        self.assertGreater(len(png), 10_000)
        public = yield evaluate(
            devtools,
            page,
            "fetch('/api/status').then(r => r.json()).then(s => [s.admin, 'leaseTable' in s])",
        )
        self.assertEqual(public, [False, False])

    @inlineCallbacks
    def test_apiAndMetrics(self) -> Any:
        """
        Without the token C{/api/status} shows totals only, with it the lease table, with a wrong one
        401 (counted); C{/metrics} has the histograms, observed once the visitor got a response.
        """
        publicPort, relayCA, lease, _ = yield self.world()
        code, status, _, _, err = yield curl(lease, "/hello")
        self.assertEqual((code, status), (0, 200), err)
        base = f"https://localhost:{publicPort}"
        status, body = yield deferToThread(_get, f"{base}/api/status", relayCA)
        self.assertEqual(status, 200)
        public = json.loads(body)
        self.assertEqual((public["tunnels"], public["leases"]["live"]), (1, 1))
        self.assertNotIn("leaseTable", public)
        self.assertNotIn(lease["url"].removeprefix("https://").partition(":")[0], body.decode())
        status, body = yield deferToThread(_get, f"{base}/api/status", relayCA, TOKEN)
        self.assertEqual(status, 200)
        self.assertEqual(len(json.loads(body)["leaseTable"]), 1)
        status, _ = yield deferToThread(_get, f"{base}/api/status", relayCA, "x" * len(TOKEN))
        self.assertEqual(status, 401)
        status, body = yield deferToThread(_get, f"{base}/metrics", relayCA)
        values = metricValues(body.decode())
        self.assertEqual(values["portal_relay_admin_refused_total"], 1)
        self.assertEqual(values["portal_relay_registration_seconds_count"], 1)
        self.assertEqual(values["portal_relay_data_wait_seconds_count"], 1)
        self.assertEqual(values["portal_relay_first_byte_seconds_count"], 1)
        self.assertGreater(values["portal_relay_bytes_to_visitors_total"], 0)
        self.assertGreater(values["portal_relay_bytes_to_tunnels_total"], 0)

    @inlineCallbacks
    def test_tunnelMetrics(self) -> Any:
        """
        C{portal expose --metrics} serves the tunnel's metrics and a health check that passes while
        the lease is live.
        """
        port, _ = freePortRange(1)
        _, _, lease, _ = yield self.world(tunnelExtra=("--metrics", f"127.0.0.1:{port}"))
        code, status, _, _, err = yield curl(lease, "/hello")
        self.assertEqual((code, status), (0, 200), err)
        status, body = yield pollUntil(
            lambda: deferToThread(_get, f"http://127.0.0.1:{port}/healthz"),
            "the tunnel's metrics listener answered",
        )
        self.assertEqual(status, 200, body)
        status, body = yield deferToThread(_get, f"http://127.0.0.1:{port}/metrics")
        values = metricValues(body.decode())
        self.assertEqual(values["portal_tunnel_relays_live"], 1)
        self.assertEqual(values["portal_tunnel_streams_total"], 1)
        self.assertIn('portal_tunnel_events_total{event="lease"} 1.0', body.decode())
