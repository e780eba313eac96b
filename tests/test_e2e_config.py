"""
End to end: tunnels from a C{portal.toml}, started by a real C{portal start} and a real C{twistd -n
portal-tunnel --config}, against a real relay, reached with curl.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase
from twisted.web.server import Site

from tests.realprocesses import (
    RecordingApp,
    _twistd,
    curl,
    homeDir,
    listenLocal,
    spawn,
    startRelay,
)


class ConfigFileEndToEndTests(TestCase):
    """
    Several tunnels of one file, each forwarding to its own service.
    """

    timeout = 120

    @inlineCallbacks
    def _world(self, defaults: str = "") -> Any:
        """
        A relay, two local apps and a C{portal.toml} naming a routed HTTP tunnel to the first and a
        stream tunnel to the second.

        @param defaults: More lines for the C{[defaults]} table.
        @return: C{(home, path of the file)}.
        """
        relayState = os.path.join(homeDir(self, "relay"), "state")
        _, _, controlPort = yield startRelay(self, relayState)
        webPort = yield listenLocal(self, Site(RecordingApp("web")))
        apiPort = yield listenLocal(self, Site(RecordingApp("api")))
        home = homeDir(self, "tunnel")
        path = os.path.join(home, "portal.toml")
        with open(path, "w") as f:
            f.write(
                "[defaults]\n"
                f'relay = ["127.0.0.1:{controlPort}"]\n'
                'identity = "identity.json"\n'
                "json = true\n"
                f"{defaults}"
                "\n[tunnels.web]\n"
                f"target = {webPort}\n"
                "http = true\n"
                'name = "web"\n'
                "\n[tunnels.api]\n"
                f'target = "127.0.0.1:{apiPort}"\n'
                'name = "api"\n'
            )
        return home, path

    @inlineCallbacks
    def assertServes(self, tunnel: Any) -> Any:
        """
        Wait for both tunnels' leases and fetch a page through each from its own app.
        """
        for name in ("web", "api"):
            match = yield tunnel.waitFor(rf'^{{.*"event": "lease".*"url": "https://{name}\.')
            lease = json.loads(match.string)
            code, status, body, _, err = yield curl(lease, "/hello")
            self.assertEqual((code, status), (0, 200), err)
            self.assertEqual(json.loads(body)["app"], name)

    @inlineCallbacks
    def test_portalStart(self) -> Any:
        """
        C{portal start --all --config FILE} runs every tunnel of the file in one process, logging
        at the file's C{log-level}.
        """
        home, path = yield self._world('log-level = "info"\n')
        tunnel = spawn(
            self,
            "portal start",
            [sys.executable, "-m", "portal", "start", "--all", "--config", path],
            home,
        )
        yield self.assertServes(tunnel)
        yield tunnel.waitFor(r"#info\] created identity")

    @inlineCallbacks
    def test_twistdTunnel(self) -> Any:
        """
        C{twistd -n portal-tunnel --config FILE NAME...} takes the same file, logs no factory
        noise for the connections it opens, and exits 0 on SIGTERM.
        """
        home, path = yield self._world()
        argv = [_twistd(), "-n", "--pidfile=", "portal-tunnel", "--config", path, "web", "api"]
        tunnel = spawn(self, "twistd portal-tunnel", argv, home)
        yield self.assertServes(tunnel)
        code = yield tunnel.stop()
        self.assertEqual(code, 0, tunnel.output())
        self.assertNotIn("OneShotFactory", tunnel.output())
