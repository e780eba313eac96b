"""
End to end for the app gateway: a real C{twistd portal-relay} and a real C{portal expose --app
app.json} process, local apps that are small twisted.web services recording what they receive, and
curl as the visitor (HTTP/1.1 and HTTP/2), all on 127.0.0.1 with ports the OS chose.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase
from twisted.web.server import Site

from tests.realprocesses import (
    RecordingApp,
    curl,
    homeDir,
    listenLocal,
    requestEvents,
    startExpose,
    startRelay,
)


def _appJSON(name: str, port: int) -> dict[str, Any]:
    """
    @return: An app named C{name} on C{port}: every path private but C{/public/}, with the three
        identity headers everywhere.
    """
    return {
        "name": name,
        "routes": {"/": str(port)},
        "paths": {
            "": {
                "access": "private",
                "headers": {
                    "X-Ptl-Client-Id": "{{ auth.client_id }}",
                    "X-Ptl-Client-Name": "{{ auth.client_name }}",
                    "X-Ptl-Client-Type": "{{ auth.client_type }}",
                    "X-Ptl-Portal": "{{ portal.short_id }}@{{ portal.domain }}",
                },
            },
            "/public/": {"access": "public"},
        },
    }


class AppGatewayEndToEndTests(TestCase):
    """
    C{portal expose --app app.json} through a real relay.
    """

    timeout = 120

    @inlineCallbacks
    def _app(self, name: str) -> Any:
        """
        Start a recording app and write its app.json.

        @return: C{(app, path of its app.json)}.
        """
        app = RecordingApp(name)
        port = yield listenLocal(self, Site(app))
        path = os.path.join(homeDir(self, f"{name}-json"), "app.json")
        with open(path, "w") as f:
            json.dump(_appJSON(name, port), f)
        return app, path

    @inlineCallbacks
    def _expose(self, *apps: str) -> Any:
        """
        Start a relay and C{portal expose --app ...} for C{apps}, and wait for every app's lease.

        @return: C{(tunnel, leases by app name)}.
        """
        _, _, controlPort = yield startRelay(self, os.path.join(homeDir(self, "relay"), "state"))
        arguments = [argument for path in apps for argument in ("--app", path)]
        tunnel = startExpose(
            self, homeDir(self, "tunnel"), controlPort, arguments, "portal expose --app"
        )
        leases = {}
        for path in apps:
            with open(path) as f:
                name = json.load(f)["name"]
            match = yield tunnel.waitFor(rf'^\{{.*"event": "lease".*"url": "https://{name}\..*\}}$')
            leases[name] = json.loads(match.group(0))
        return tunnel, leases

    @inlineCallbacks
    def test_privatePublicAndForgedHeaders(self) -> Any:
        """
        An anonymous request for a private path gets 401 with the page saying how to pair, over
        HTTP/1.1 and HTTP/2, and the app sees nothing of it; a public path reaches the app, which
        sees C{X-Ptl-Client-Type: public} and not the C{X-Ptl-Client-Id} (nor any C{X-Ptl-*}) the
        visitor sent; C{/.portal/} paths never reach the app.
        """
        app, path = yield self._app("notes")
        tunnel, leases = yield self._expose(path)
        lease = leases["notes"]
        self.assertTrue(re.fullmatch(r"https://notes\.localhost:\d+", lease["url"]), lease)
        self.assertRegex(lease["target"], r"^app notes: /=127\.0\.0\.1:\d+$")

        for version, option in (("1.1", "--http1.1"), ("2", "--http2")):
            code, status, body, got, err = yield curl(lease, "/private/diary", option)
            self.assertEqual((code, status, got), (0, 401, version), err)
            self.assertIn(b"portal pair", body)
            self.assertIn(lease["url"].encode() + b"/.portal/pair", body)
        self.assertEqual(app.seen, [])

        for version, option in (("1.1", "--http1.1"), ("2", "--http2")):
            code, status, body, got, err = yield curl(
                lease,
                "/public/hello?x=1",
                option,
                "-H",
                "X-Ptl-Client-Id: forged-id",
                "-H",
                "x-ptl-client-type: terminal",
                "-H",
                "X-Ptl-Other: forged-other",
            )
            self.assertEqual((code, status, got), (0, 200, version), err)
            answer = json.loads(body)
            self.assertEqual(answer["uri"], "/public/hello?x=1")
            headers = answer["headers"]
            self.assertEqual(headers["x-ptl-client-type"], ["public"])
            self.assertEqual(headers["x-ptl-client-id"], [""])
            self.assertNotIn("x-ptl-other", headers)
            self.assertNotIn("forged", json.dumps(headers))
            shortId, _, domain = headers["x-ptl-portal"][0].partition("@")
            self.assertEqual((len(shortId), domain), (12, "localhost"))
        self.assertEqual([uri for uri, _ in app.seen], ["/public/hello?x=1"] * 2)

        # The gateway's own pairing page answers; the app never sees /.portal/ requests.
        code, status, _, _, err = yield curl(lease, "/.portal/pair", "--http1.1")
        self.assertEqual((code, status), (0, 200), err)
        code, status, _, _, err = yield curl(lease, "/.portal/nothing-here", "--http1.1")
        self.assertEqual((code, status), (0, 404), err)
        self.assertEqual(len(app.seen), 2)

        yield tunnel.waitFor(r'"path": "/\.portal/pair"')
        statuses = [(e["path"], e["status"]) for e in requestEvents(tunnel)]
        self.assertIn(("/private/diary", 401), statuses)
        self.assertIn(("/public/hello?x=1", 200), statuses)

    @inlineCallbacks
    def test_twoApps(self) -> Any:
        """
        Two C{--app} files give two leases, two URLs, each reaching its own app.
        """
        alpha, alphaPath = yield self._app("alpha")
        beta, betaPath = yield self._app("beta")
        _, leases = yield self._expose(alphaPath, betaPath)
        self.assertNotEqual(leases["alpha"]["url"], leases["beta"]["url"])
        for name, app in (("alpha", alpha), ("beta", beta)):
            code, status, body, _, err = yield curl(leases[name], "/public/", "--http2")
            self.assertEqual((code, status), (0, 200), err)
            self.assertEqual(json.loads(body)["app"], name)
            self.assertEqual(len(app.seen), 1)
            code, status, _, _, err = yield curl(leases[name], "/", "--http1.1")
            self.assertEqual((code, status), (0, 401), err)
            self.assertEqual(len(app.seen), 1)

    @inlineCallbacks
    def test_invalidApp(self) -> Any:
        """
        An invalid app.json stops C{portal expose} with exit status 2 and a message naming the file,
        the field and the problem.
        """
        path = os.path.join(homeDir(self, "bad"), "app.json")
        with open(path, "w") as f:
            json.dump(
                {"name": "x", "routes": {"/": "3000"}, "paths": {"/a/": {"access": "all"}}}, f
            )
        tunnel = startExpose(
            self, homeDir(self, "tunnel"), 1, ["--app", path], "portal expose --app"
        )
        code = yield tunnel.ended
        self.assertEqual(code, 2)
        self.assertIn(f"portal: error: --app {path}: paths: the entry", tunnel.output())
