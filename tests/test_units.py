"""
Tests for the systemd units in C{docker/units/}: they parse, keep their hardening, their command lines
are valid Portal command lines, and C{systemd-analyze verify} accepts them where it is installed.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from portal.cli.exposeoptions import TunnelOptions
from portal.tap.relay import Options as RelayOptions

UNITS = Path(__file__).resolve().parent.parent / "docker" / "units"
RELAY = UNITS / "portal-relay.service"
TUNNEL = UNITS / "portal-tunnel@.service"
TUNNEL_ENV = UNITS / "tunnel-web.env.example"

#: Hardening every unit keeps (key, value).
HARDENING = [
    ("DynamicUser", "yes"),
    ("NoNewPrivileges", "yes"),
    ("ProtectSystem", "strict"),
    ("ProtectHome", "yes"),
    ("PrivateTmp", "yes"),
    ("PrivateDevices", "yes"),
    ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
    ("SystemCallFilter", "@system-service"),
]


def parseUnit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """
    Read a systemd unit file as systemd does: sections, C{KEY=VALUE} lines (keys may repeat), comments
    (C{#}, C{;}) and lines continued with a trailing backslash.

    @return: The entries of each section, in order.
    @raise ValueError: On a line that is neither.
    """
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    pending = ""
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
        elif "=" in line and current is not None:
            key, _, value = line.partition("=")
            current.append((key.strip(), value.strip()))
        else:
            raise ValueError(f"{path.name}:{number}: not a section or KEY=VALUE: {raw!r}")
    return sections


def values(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> list[str]:
    """
    @return: Every value of C{key} in C{section}.
    """
    return [v for k, v in unit.get(section, []) if k == key]


class UnitFileTests(SynchronousTestCase):
    """
    The units' content, read without systemd.
    """

    def test_sections(self) -> None:
        """
        Both units have their three sections, start after the network is up and are wanted by
        multi-user.target.
        """
        for path in (RELAY, TUNNEL):
            unit = parseUnit(path)
            self.assertEqual(sorted(unit), ["Install", "Service", "Unit"], path.name)
            self.assertEqual(values(unit, "Unit", "After"), ["network-online.target"])
            self.assertEqual(values(unit, "Install", "WantedBy"), ["multi-user.target"])
            self.assertEqual(values(unit, "Service", "Restart"), ["on-failure"])

    def test_hardening(self) -> None:
        """
        Both units run as a dynamic user with the system read-only and a filtered set of system
        calls; only the relay keeps a capability, the one to bind ports below 1024 (443 and 80).
        """
        for path in (RELAY, TUNNEL):
            unit = parseUnit(path)
            for key, value in HARDENING:
                self.assertEqual(values(unit, "Service", key), [value], f"{path.name}: {key}")
        relay, tunnel = parseUnit(RELAY), parseUnit(TUNNEL)
        for key in ("AmbientCapabilities", "CapabilityBoundingSet"):
            self.assertEqual(values(relay, "Service", key), ["CAP_NET_BIND_SERVICE"])
            self.assertEqual(values(tunnel, "Service", key), [""])

    def test_relayCommandLine(self) -> None:
        """
        The relay unit's command is a valid C{twistd portal-relay} command line: public port 443,
        state in the unit's state directory, the admin token from the unit's credential.
        """
        unit = parseUnit(RELAY)
        (execStart,) = values(unit, "Service", "ExecStart")
        argv = shlex.split(execStart)
        self.assertEqual(
            argv[:4], ["/opt/portal/bin/twistd", "--nodaemon", "--pidfile=", "portal-relay"]
        )
        credentials = self.mktemp()
        os.makedirs(credentials)
        with open(os.path.join(credentials, "admin-token"), "w") as f:
            f.write("0123456789abcdef0123456789abcdef\n")
        options = RelayOptions()
        options.parseOptions([a.replace("%d", credentials) for a in argv[4:]])
        config = options.config()
        self.assertEqual(config.public, "tcp:443")
        self.assertEqual(config.stateDir, "/var/lib/portal-relay")
        self.assertEqual(values(unit, "Service", "StateDirectory"), ["portal-relay"])
        self.assertEqual(config.adminToken, "0123456789abcdef0123456789abcdef")
        self.assertEqual(
            values(unit, "Service", "LoadCredential"), ["admin-token:/etc/portal/admin-token"]
        )

    def test_tunnelCommandLine(self) -> None:
        """
        The tunnel unit runs C{portal expose} with the arguments of its environment file; the example
        file's arguments are a valid C{portal expose} command line, and the identity lives in the
        instance's state directory.
        """
        unit = parseUnit(TUNNEL)
        self.assertEqual(
            values(unit, "Service", "ExecStart"),
            ["/opt/portal/bin/portal expose $PORTAL_EXPOSE_ARGS"],
        )
        self.assertEqual(values(unit, "Service", "EnvironmentFile"), ["/etc/portal/tunnel-%i.env"])
        self.assertIn("HOME=/var/lib/portal-tunnel/%i", values(unit, "Service", "Environment"))
        self.assertEqual(values(unit, "Service", "StateDirectory"), ["portal-tunnel/%i"])
        (line,) = [
            line
            for line in TUNNEL_ENV.read_text().splitlines()
            if line.startswith("PORTAL_EXPOSE_ARGS=")
        ]
        options = TunnelOptions()
        options.parseOptions(shlex.split(line.partition("=")[2]))
        self.assertEqual(options.tunnelConfig.name, "web")
        self.assertEqual(options.tunnelConfig.metrics, ("127.0.0.1", 9090))


class SystemdAnalyzeTests(SynchronousTestCase):
    """
    C{systemd-analyze verify} accepts the units, with their programs pointed at this Python's
    environment (the units name C{/opt/portal/bin}, which need not exist here).
    """

    def test_verify(self) -> None:
        """
        C{systemd-analyze verify} exits 0 and warns about nothing (an unknown key or a bad value is
        only a warning).
        """
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            raise SkipTest("systemd-analyze is not installed (UnitFileTests still parse the units)")
        directory = Path(self.mktemp())
        directory.mkdir()
        bin = os.path.dirname(sys.executable) + "/"
        for source, name in ((RELAY, RELAY.name), (TUNNEL, "portal-tunnel@web.service")):
            (directory / name).write_text(source.read_text().replace("/opt/portal/bin/", bin))
        result = subprocess.run(
            [analyze, "verify", "--man=no", *sorted(str(p) for p in directory.iterdir())],
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual((result.returncode, result.stderr), (0, ""))
