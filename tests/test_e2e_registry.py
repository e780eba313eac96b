"""
End to end: relay registries with real C{twistd portal-relay}, C{portal expose --registry} and
C{portal relays} processes on 127.0.0.1, a registry file listing two live relays and a dead one (a
closed port).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase
from twisted.web.server import Site

from portal.registry.descriptor import DESCRIPTOR_PATH, DescriptorError, verifyDescriptor
from portal.registry.document import RegistryEntry, fetch, rank
from portal.trust.identity import Identity, saveIdentity
from tests.realprocesses import (
    listenLocal,
    spawn,
    startRelay,
    tlsRequest,
    waitForLease,
)
from tests.test_e2e import PAGE, _fetch, _Page


def _closedPort() -> int:
    """
    @return: A loopback port nothing listens on (bound by the OS, then closed).
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _getOverTLS(port: int, hostname: str, path: str, cafile: str) -> bytes:
    """
    GET C{path} from the relay's public TLS port with SNI C{hostname}, trusting C{cafile}.

    @return: The response body.
    """
    request = f"GET {path} HTTP/1.1\r\nHost: {hostname}\r\nConnection: close\r\n\r\n"
    response, _ = tlsRequest(port, hostname, request.encode(), cafile)
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return body


class RegistryEndToEndTests(TestCase):
    """
    A registry file with a dead relay (a closed port) and two live relays.
    """

    timeout = 120

    @inlineCallbacks
    def setUp(self) -> Any:
        """
        Start two relays (with their plain-HTTP listeners), pick a closed port for the dead relay, and
        write the registry, with the dead relay first in the tunnel's rank order so that it is the
        first one checked.
        """
        self.root = os.path.abspath(self.mktemp())
        self.home = os.path.join(self.root, "tunnel")
        os.makedirs(self.home)
        self.identityPath = os.path.join(self.home, "identity.json")
        self.identity = Identity.generate()
        saveIdentity(self.identity, self.identityPath)
        self.relays: list[dict[str, Any]] = []
        for name in ("one", "two"):
            stateDir = os.path.join(self.root, name, "state")
            os.makedirs(os.path.dirname(stateDir))
            relay, publicPort, controlPort = yield startRelay(
                self, stateDir, extra=["--http", "tcp:0:interface=127.0.0.1"]
            )
            http = yield relay.waitFor(r"http listening on 127\.0\.0\.1:(\d+)")
            serving = yield relay.waitFor(r"portal-relay ([a-z2-7]{52}) serving")
            self.relays.append(
                {
                    "process": relay,
                    "stateDir": stateDir,
                    "publicPort": publicPort,
                    "controlPort": controlPort,
                    "httpPort": int(http.group(1)),
                    "id": serving.group(1),
                    "address": f"127.0.0.1:{controlPort}",
                }
            )
        self.deadAddress = f"127.0.0.1:{_closedPort()}"
        liveIds = [r["id"] for r in self.relays]
        while True:
            self.deadId = Identity.generate().id
            entries = [
                RegistryEntry("127.0.0.1", 1, relayId, frozenset({"stream"}))
                for relayId in [self.deadId, *liveIds]
            ]
            if rank(self.identity.id, entries)[0].id == self.deadId:
                break
        self.registryPath = os.path.join(self.root, "relays.json")
        document = {
            "version": 1,
            "relays": [
                {
                    "address": self.deadAddress,
                    "id": self.deadId,
                    "modes": ["stream"],
                    "region": "nowhere",
                },
                *(
                    {
                        "address": r["address"],
                        "id": r["id"],
                        "modes": ["stream"],
                        "region": "loopback",
                        "descriptor": f"http://127.0.0.1:{r['httpPort']}{DESCRIPTOR_PATH}",
                    }
                    for r in self.relays
                ),
            ],
        }
        with open(self.registryPath, "w") as f:
            json.dump(document, f)

    @inlineCallbacks
    def _portal(self, *args: str) -> Any:
        """
        Run C{python -m portal ARGS} to completion.

        @return: C{(stdout, stderr, exit code)}.
        """
        env = dict(os.environ, HOME=self.home, XDG_CONFIG_HOME=os.path.join(self.home, ".config"))
        out, err, code = yield getProcessOutputAndValue(
            sys.executable, ["-m", "portal", *args], env=env
        )
        return out.decode(), err.decode(), code

    @inlineCallbacks
    def test_exposeSkipsDeadRelay(self) -> Any:
        """
        C{portal expose PORT --registry FILE --max-relays 2} checks the dead relay first (it ranks
        first), skips it, and serves the page on both live relays' URLs; it never holds a lease on
        the dead one.
        """
        port = yield listenLocal(self, Site(_Page()))
        tunnel = spawn(
            self,
            "portal expose --registry",
            [
                sys.executable,
                "-m",
                "portal",
                "expose",
                str(port),
                "--registry",
                self.registryPath,
                "--max-relays",
                "2",
                "--identity",
                self.identityPath,
                "--json",
            ],
            self.home,
        )
        first = yield waitForLease(tunnel)
        after = [i for i, line in enumerate(tunnel.lines) if '"event": "lease"' in line][0] + 1
        second = yield waitForLease(tunnel, after=after)
        self.assertEqual(
            {first["relay"], second["relay"]}, {r["address"] for r in self.relays}, tunnel.output()
        )
        for lease in (first, second):
            response, _ = yield deferToThread(_fetch, lease["url"], lease["ca"])
            self.assertTrue(response.startswith(b"HTTP/1.1 200"), response[:100])
            self.assertTrue(response.endswith(PAGE))
        events = [json.loads(line) for line in tunnel.lines if line.startswith("{")]
        skipped = [e for e in events if e["event"] == "skipped"]
        self.assertEqual([e["relay"] for e in skipped], [self.deadAddress], tunnel.output())
        self.assertIn("cannot connect", skipped[0]["message"])
        selected = [e for e in events if e["event"] == "selected"]
        self.assertEqual(
            sorted(e["relay"] for e in selected), sorted(r["address"] for r in self.relays)
        )
        self.assertEqual(sorted(e["rank"] for e in selected), [2, 3])
        self.assertNotIn(
            self.deadAddress, [e.get("relay") for e in events if e["event"] != "skipped"]
        )
        with open(os.path.join(self.home, "known_relays.json")) as f:
            pinned = json.load(f)["relays"]
        self.assertEqual(pinned, {r["address"]: r["id"] for r in self.relays})
        code = yield tunnel.stop()
        self.assertEqual(code, 0, tunnel.output())

    @inlineCallbacks
    def test_portalRelays(self) -> Any:
        """
        C{portal relays --registry FILE} shows the live relays ok with a latency and a verified
        descriptor, and the dead one down; exit 0.
        """
        out, err, code = yield self._portal("relays", "--registry", self.registryPath, "--json")
        self.assertEqual(code, 0, err)
        statuses = {s["address"]: s for s in map(json.loads, out.splitlines())}
        self.assertEqual(
            sorted(statuses), sorted([self.deadAddress, *(r["address"] for r in self.relays)])
        )
        dead = statuses[self.deadAddress]
        self.assertFalse(dead["ok"])
        self.assertIn("cannot connect", dead["health"])
        self.assertIsNone(dead["latencyMs"])
        for relay in self.relays:
            status = statuses[relay["address"]]
            self.assertTrue(status["ok"], status)
            self.assertEqual((status["health"], status["descriptor"]), ("ok", "ok"))
            self.assertGreater(status["latencyMs"], 0)
            self.assertLess(status["latencyMs"], 10000)
            self.assertTrue(status["software"].startswith("portal-relay/"))

        out, err, code = yield self._portal("relays", "--registry", self.registryPath)
        self.assertEqual(code, 0, err)
        lines = out.splitlines()
        self.assertEqual(lines[0], f"registry {self.registryPath}: 3 relays, 2 healthy")
        self.assertEqual(
            lines[1].split(), ["ADDRESS", "ID", "MODES", "REGION", "LATENCY", "HEALTH"]
        )
        rows = {line.split()[0]: line for line in lines[2:]}
        self.assertIn("cannot connect", rows[self.deadAddress])
        for relay in self.relays:
            row = rows[relay["address"]].split()
            self.assertEqual(row[1], relay["id"][:12])
            self.assertEqual(row[5], "ms")
            self.assertEqual(row[-1], "ok")

    @inlineCallbacks
    def test_descriptorVerifies(self) -> Any:
        """
        The descriptor a live relay serves, over plain HTTP (fetched as C{portal relays} does) and over
        TLS on its own hostname, verifies against the relay's id (and not another's) and names its
        ports.
        """
        relay = self.relays[0]
        body = yield fetch(reactor, f"http://127.0.0.1:{relay['httpPort']}{DESCRIPTOR_PATH}")
        descriptor = verifyDescriptor(body, relay["id"], now=time.time())
        self.assertEqual(descriptor.controlPort, relay["controlPort"])
        self.assertEqual(descriptor.publicPort, relay["publicPort"])
        self.assertEqual((descriptor.domain, descriptor.modes), ("localhost", ("stream",)))
        overTLS = yield deferToThread(
            _getOverTLS,
            relay["publicPort"],
            "localhost",
            DESCRIPTOR_PATH,
            os.path.join(relay["stateDir"], "tls", "ca.pem"),
        )
        self.assertEqual(verifyDescriptor(overTLS, relay["id"]).id, relay["id"])
        self.assertRaises(DescriptorError, verifyDescriptor, body, self.relays[1]["id"])

    @inlineCallbacks
    def test_unloadableRegistry(self) -> Any:
        """
        A registry that cannot be loaded: C{portal expose} and C{portal relays} exit 1 saying why;
        C{portal relays} without C{--registry} is a usage error.
        """
        missing = os.path.join(self.root, "missing.json")
        out, err, code = yield self._portal(
            "expose", "8000", "--registry", missing, "--identity", self.identityPath
        )
        self.assertEqual(code, 1, (out, err))
        self.assertIn(f"cannot load the registry {missing}: cannot read it", err)
        out, err, code = yield self._portal("relays", "--registry", missing)
        self.assertEqual(code, 1, (out, err))
        self.assertIn(f"portal: cannot load the registry {missing}", err)
        out, err, code = yield self._portal("relays")
        self.assertEqual(code, 2)
        self.assertIn("needs --registry", err)
