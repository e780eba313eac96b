"""
Tests for L{portal.cli.configfile} and L{portal.cli.startoptions}: C{portal.toml}, C{portal start} and
C{twistd portal-tunnel --config}.
"""

from __future__ import annotations

import io
import os
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.testing import MemoryReactorClock
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from portal.cli.configfile import (
    CONFIG_ENV,
    ConfigFileError,
    findConfig,
    keyLines,
    loadConfig,
    optionKinds,
    parseConfig,
    searchPath,
    tunnelArguments,
)
from portal.cli.exposeoptions import TunnelOptions
from portal.cli.main import main
from portal.cli.startoptions import StartOptions
from portal.tap.tunnel import Options as TapOptions
from portal.tap.tunnel import makeService
from portal.tunnel.config import RelayAddress, Target
from portal.tunnel.service import TunnelService

EXAMPLE = """\
# Two tunnels sharing the relay.
[defaults]
relay = ["relay.example:4017"]
pool-size = 2

[tunnels.web]
target = 8000
http = true
http-route = ["/api=9000,strip"]

[tunnels.ssh]
target = "127.0.0.1:22"
tcp = true
pool-size = 8
relay = [{ relay = "c.example:4017", via = ["a.example:4017"] }]
"""


class KeyLinesTests(SynchronousTestCase):
    """
    Tests for L{keyLines}, which finds keys' lines for messages.
    """

    def test_tablesAndKeys(self) -> None:
        """
        Keys are found under the table header before them, with 1-based line numbers.
        """
        lines = keyLines(EXAMPLE)
        self.assertEqual(lines[("defaults",)], 2)
        self.assertEqual(lines[("defaults", "pool-size")], 4)
        self.assertEqual(lines[("tunnels", "web")], 6)
        self.assertEqual(lines[("tunnels", "ssh", "pool-size")], 14)

    def test_quotedAndDotted(self) -> None:
        """
        Quoted table names and dotted keys are split as TOML splits them.
        """
        lines = keyLines('[tunnels."my.site"]\ntarget = 1\n[x]\na.b = 2\n')
        self.assertEqual(lines[("tunnels", "my.site", "target")], 2)
        self.assertEqual(lines[("x", "a", "b")], 4)

    def test_multilineStringsSkipped(self) -> None:
        """
        A line inside a multi-line string that looks like a key is not taken for one.
        """
        lines = keyLines('[t]\ns = """\nfake = 1\n"""\nreal = 2\n')
        self.assertNotIn(("t", "fake"), lines)
        self.assertEqual(lines[("t", "real")], 5)


class ParseConfigTests(SynchronousTestCase):
    """
    Tests for L{parseConfig} and L{loadConfig}.
    """

    def test_example(self) -> None:
        """
        Each tunnel gets the defaults, overridden by its own keys; list keys are lists.
        """
        config = parseConfig(EXAMPLE, "/etc/portal.toml")
        self.assertEqual(config.names, ("web", "ssh"))
        web = config.tunnel("web")
        self.assertEqual(web.values["pool-size"], 2)
        self.assertEqual(web.values["target"], "8000")
        self.assertEqual(web.lines["pool-size"], ("defaults.pool-size", 4))
        self.assertEqual(web.line, 6)
        ssh = config.tunnel("ssh")
        self.assertEqual(ssh.values["pool-size"], 8)
        self.assertEqual(ssh.lines["pool-size"], ("tunnels.ssh.pool-size", 14))

    def test_everyOptionIsAKey(self) -> None:
        """
        Every flag and parameter of C{portal expose} is a key, with the type of its option.
        """
        kinds = optionKinds()
        for flag in TunnelOptions.optFlags:
            self.assertEqual(kinds[flag[0]], "flag")
        for parameter in TunnelOptions.optParameters:
            self.assertIn(parameter[0], kinds)
        self.assertEqual(kinds["pool-size"], "int")
        self.assertEqual(kinds["udp-idle-timeout"], "float")
        for key in ("relay", "http-route", "app"):
            self.assertEqual(kinds[key], "list")

    def assertRefused(self, text: str, line: int | None, key: str | None, fragment: str) -> None:
        """
        Assert that C{text} is refused with a message naming C{line}, C{key} and C{fragment}.
        """
        with self.assertRaises(ConfigFileError) as raised:
            parseConfig(text, "p.toml")
        self.assertEqual(raised.exception.line, line)
        self.assertEqual(raised.exception.key, key)
        self.assertIn(fragment, str(raised.exception))
        self.assertTrue(str(raised.exception).startswith("p.toml"))

    def test_unknownKey(self) -> None:
        """
        An unknown key is refused with its line and the closest real key.
        """
        self.assertRefused(
            "[tunnels.web]\ntarget = 1\npoolsize = 3\n",
            3,
            "tunnels.web.poolsize",
            "unknown key (did you mean 'pool-size'?)",
        )

    def test_wrongTypes(self) -> None:
        """
        Values of the wrong type are refused with the key's line and what was expected.
        """
        self.assertRefused('[tunnels.w]\nhttp = "yes"\n', 2, "tunnels.w.http", "true or false")
        self.assertRefused('[tunnels.w]\npool-size = "4"\n', 2, "tunnels.w.pool-size", "integer")
        self.assertRefused("[tunnels.w]\npool-size = true\n", 2, "tunnels.w.pool-size", "integer")
        self.assertRefused("[tunnels.w]\nname = 3\n", 2, "tunnels.w.name", "a string")
        self.assertRefused("[tunnels.w]\nrelay = [1]\n", 2, "tunnels.w.relay", "via")
        self.assertRefused(
            '[tunnels.w]\nrelay = [{relay = "a:1", hop = "b:1"}]\n', 2, "tunnels.w.relay", "via"
        )

    def test_syntaxError(self) -> None:
        """
        Text that is not TOML is refused with the line C{tomllib} reports.
        """
        self.assertRefused("[tunnels.w]\ntarget = \n", 2, None, "not valid TOML")

    def test_structure(self) -> None:
        """
        Unknown tables, a file without tunnels and a target among the defaults are refused.
        """
        self.assertRefused("[tunnel.w]\ntarget = 1\n", 1, "tunnel", "unknown table")
        self.assertRefused("[defaults]\npool-size = 1\n", None, "tunnels", "nothing to start")
        self.assertRefused("[defaults]\ntarget = 1\n[tunnels.w]\n", 2, "defaults.target", "its own")
        self.assertRefused("tunnels = 3\n", 1, "tunnels", "expected a table")
        self.assertRefused("[tunnels]\nw = 3\n", 2, "tunnels.w", "expected a table")

    def test_relativePaths(self) -> None:
        """
        Paths are read relative to the file's directory; a registry URL is left alone.
        """
        config = parseConfig(
            '[tunnels.w]\napp = "app.json"\ncert = "/abs/c.pem"\nkey = "k.pem"\nacme-ca = "ca.pem"\n'
            'registry = "https://r.example/registry.json"\n[tunnels.v]\nregistry = "reg.json"\n',
            "/srv/site/portal.toml",
        )
        w = config.tunnel("w").values
        self.assertEqual(w["app"], ["/srv/site/app.json"])
        self.assertEqual(w["cert"], "/abs/c.pem")
        self.assertEqual(w["key"], "/srv/site/k.pem")
        self.assertEqual(w["acme-ca"], "/srv/site/ca.pem")
        self.assertEqual(w["registry"], "https://r.example/registry.json")
        self.assertEqual(config.tunnel("v").values["registry"], "/srv/site/reg.json")

    def test_unknownTunnel(self) -> None:
        """
        Asking for a tunnel the file does not have lists those it has.
        """
        with self.assertRaises(ConfigFileError) as raised:
            parseConfig(EXAMPLE).tunnel("api")
        self.assertIn("no tunnel 'api'; it has web, ssh", str(raised.exception))

    def test_loadConfig(self) -> None:
        """
        L{loadConfig} reads a file; one that cannot be read is refused with its path.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(EXAMPLE)
        self.assertEqual(loadConfig(path).names, ("web", "ssh"))
        with self.assertRaises(ConfigFileError) as raised:
            loadConfig(path + ".missing")
        self.assertIn("cannot read it", str(raised.exception))

    def test_tunnelArguments(self) -> None:
        """
        A tunnel's values become the command line of C{portal expose}, chains as C{--via} before
        their C{--relay}, and the target last after C{--}.
        """
        ssh = parseConfig(EXAMPLE).tunnel("ssh")
        self.assertEqual(
            tunnelArguments(ssh.values),
            [
                "--via=a.example:4017",
                "--relay=c.example:4017",
                "--pool-size=8",
                "--tcp",
                "--",
                "127.0.0.1:22",
            ],
        )


class SearchPathTests(SynchronousTestCase):
    """
    Tests for L{searchPath} and L{findConfig}.
    """

    def setUp(self) -> None:
        """
        Give the test its own configuration home and no C{PORTAL_CONFIG}.
        """
        self.home = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(self.home, "portal"))
        for name, value in (("XDG_CONFIG_HOME", self.home), (CONFIG_ENV, None)):
            old = os.environ.get(name)
            self.addCleanup(_restore, name, old)
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    def test_order(self) -> None:
        """
        C{$PORTAL_CONFIG} comes first, then the working directory, then the configuration home.
        """
        self.assertEqual(
            searchPath("/work"),
            ["/work/portal.toml", os.path.join(self.home, "portal", "portal.toml")],
        )
        os.environ[CONFIG_ENV] = "/etc/p.toml"
        self.assertEqual(searchPath("/work")[0], "/etc/p.toml")

    def test_findConfig(self) -> None:
        """
        The first file that exists is used; none gives L{None}.
        """
        cwd = os.path.abspath(self.mktemp())
        os.makedirs(cwd)
        self.assertIsNone(findConfig(cwd))
        inHome = os.path.join(self.home, "portal", "portal.toml")
        open(inHome, "w").close()
        self.assertEqual(findConfig(cwd), inHome)
        here = os.path.join(cwd, "portal.toml")
        open(here, "w").close()
        self.assertEqual(findConfig(cwd), here)


def _restore(name: str, value: str | None) -> None:
    """
    Put an environment variable back as it was.
    """
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


class StartOptionsTests(SynchronousTestCase):
    """
    Tests for L{StartOptions}, the options of C{portal start}.
    """

    def setUp(self) -> None:
        """
        Write the example file.
        """
        self.path = self.write(EXAMPLE)

    def write(self, text: str) -> str:
        """
        @return: The path of a new file holding C{text}.
        """
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(text)
        return path

    def parse(self, *arguments: str, options: Any = StartOptions) -> Any:
        """
        @return: The parsed options of C{arguments}.
        """
        parsed = options()
        parsed.parseOptions(list(arguments))
        return parsed

    def test_names(self) -> None:
        """
        The named tunnels are built, each as C{portal expose} would build it from the same options.
        """
        configs = self.parse("--config", self.path, "ssh", "web").tunnelConfigs
        self.assertEqual(list(configs), ["ssh", "web"])
        expected = TunnelOptions()
        expected.parseOptions(
            ["8000", "--http", "--http-route", "/api=9000,strip"]
            + ["--relay", "relay.example:4017", "--pool-size", "2"]
        )
        self.assertEqual(configs["web"], expected.tunnelConfig)
        ssh = configs["ssh"]
        self.assertTrue(ssh.tcp)
        self.assertEqual(ssh.poolSize, 8)
        self.assertEqual(
            ssh.relays, (RelayAddress("c.example", 4017, via=(RelayAddress("a.example", 4017),)),)
        )

    def test_all(self) -> None:
        """
        C{--all} starts every tunnel, in the file's order; it cannot be combined with names.
        """
        self.assertEqual(
            list(self.parse("--config", self.path, "--all").tunnelConfigs), ["web", "ssh"]
        )
        with self.assertRaises(UsageError) as raised:
            self.parse("--config", self.path, "--all", "web")
        self.assertIn("not both", str(raised.exception))

    def test_onlyTunnel(self) -> None:
        """
        Without names, a file with one tunnel starts it, and one with several asks which.
        """
        single = self.write('[tunnels.only]\ntarget = 8000\nrelay = "r:1"\n')
        self.assertEqual(list(self.parse("--config", single).tunnelConfigs), ["only"])
        with self.assertRaises(UsageError) as raised:
            self.parse("--config", self.path)
        self.assertIn("name the tunnels to start, or --all", str(raised.exception))
        self.assertIn("has web, ssh", str(raised.exception))

    def test_unknownName(self) -> None:
        """
        An unknown name is a usage error listing the tunnels there are.
        """
        with self.assertRaises(UsageError) as raised:
            self.parse("--config", self.path, "api")
        self.assertIn("no tunnel 'api'; it has web, ssh", str(raised.exception))

    def test_flagsOverride(self) -> None:
        """
        Options on the command line override the file's (lists replace lists), for every tunnel
        started; what is not given keeps the file's value.
        """
        configs = self.parse(
            "--config", self.path, "--all", "--pool-size", "5", "--relay", "other:2", "--json"
        ).tunnelConfigs
        for config in configs.values():
            self.assertEqual(config.poolSize, 5)
            self.assertEqual(config.relays, (RelayAddress("other", 2),))
            self.assertTrue(config.json)
        self.assertTrue(configs["ssh"].tcp)
        self.assertFalse(configs["web"].tcp)

    def test_blameTheKey(self) -> None:
        """
        When C{portal expose} refuses a tunnel, the message names the key and line at fault, in
        the tunnel's table or in the defaults.
        """
        path = self.write(
            '[defaults]\nalpn = ""\n[tunnels.a]\ntarget = 1\n[tunnels.b]\ntarget = 1\n'
            'pool-size = 99\nalpn = "h2"\n[tunnels.c]\nhttp = true\nalpn = "h2"\n'
        )
        for name, expected in (
            ("a", f"{path}:2: defaults.alpn: --alpn"),
            ("b", f"{path}:7: tunnels.b.pool-size: --pool-size must be between 1 and 64"),
            ("c", f"{path}:9: tunnels.c: missing TARGET"),
        ):
            with self.assertRaises(UsageError) as raised:
                self.parse("--config", path, name)
            self.assertTrue(str(raised.exception).startswith(expected), str(raised.exception))

    def test_blameTheCommandLine(self) -> None:
        """
        A refused value that came from the command line is reported as such.
        """
        with self.assertRaises(UsageError) as raised:
            self.parse("--config", self.path, "web", "--pool-size", "0")
        self.assertEqual(
            str(raised.exception),
            "tunnel web: --pool-size must be between 1 and 64 (from the command line)",
        )

    def test_danglingVia(self) -> None:
        """
        A C{--via} without its C{--relay} is refused as by C{portal expose}.
        """
        with self.assertRaises(UsageError) as raised:
            self.parse("--config", self.path, "web", "--via", "a:1")
        self.assertIn("must be followed by the --relay", str(raised.exception))

    def test_noFile(self) -> None:
        """
        Without C{--config} and no file on the search path, the message lists where it looked.
        """
        empty = os.path.abspath(self.mktemp())
        os.makedirs(empty)
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(empty)
        self.addCleanup(_restore, CONFIG_ENV, os.environ.get(CONFIG_ENV))
        self.addCleanup(_restore, "XDG_CONFIG_HOME", os.environ.get("XDG_CONFIG_HOME"))
        os.environ.pop(CONFIG_ENV, None)
        os.environ["XDG_CONFIG_HOME"] = empty
        with self.assertRaises(UsageError) as raised:
            self.parse("web")
        self.assertIn("no configuration file", str(raised.exception))
        self.assertIn(os.path.join(empty, "portal.toml"), str(raised.exception))
        os.environ[CONFIG_ENV] = self.path
        self.assertEqual(list(self.parse("web").tunnelConfigs), ["web"])

    def test_exitCode(self) -> None:
        """
        C{portal start} with a bad file exits 2 with the file, line and key.
        """
        path = self.write("[tunnels.w]\ntarget = 1\nhttp = 1\n")
        err = io.StringIO()
        with self.assertRaises(SystemExit) as exit:
            main(["start", "--config", path], io.StringIO(), err)
        self.assertEqual(exit.exception.code, 2)
        self.assertIn(f"{path}:3: tunnels.w.http: expected true or false", err.getvalue())


class TapOptionsTests(SynchronousTestCase):
    """
    Tests for C{twistd portal-tunnel}'s options: C{portal expose}'s, or a configuration file.
    """

    def test_target(self) -> None:
        """
        Without C{--config}, the options are those of C{portal expose}, defaults included.
        """
        options = TapOptions()
        options.parseOptions(["8000", "--name", "x"])
        self.assertEqual(options.tunnelConfig.target, Target("127.0.0.1", 8000))
        self.assertEqual(options.tunnelConfig.poolSize, 4)
        self.assertIsInstance(makeService(options, MemoryReactorClock()), TunnelService)
        with self.assertRaises(UsageError):
            TapOptions().parseOptions(["8000", "9000"])

    def test_config(self) -> None:
        """
        With C{--config}, the chosen tunnels run under one L{MultiService}.
        """
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(EXAMPLE)
        options = TapOptions()
        options.parseOptions(["--config", path, "--all"])
        service = makeService(options, MemoryReactorClock())
        self.assertIsInstance(service, MultiService)
        self.assertEqual(
            [type(s) for s in service],  # type: ignore[attr-defined]
            [TunnelService, TunnelService],
        )


class DocumentedExampleTests(SynchronousTestCase):
    """
    The example of C{docs/config-file.md} is a valid file.
    """

    def test_example(self) -> None:
        """
        The first TOML block of the document loads, and its tunnels that need no other file build.
        """
        document = os.path.join(os.path.dirname(__file__), "..", "docs", "config-file.md")
        with open(document) as f:
            text = f.read()
        example = text.split("```toml\n", 1)[1].split("```", 1)[0]
        path = os.path.join(os.path.abspath(self.mktemp()), "portal.toml")
        os.makedirs(os.path.dirname(path))
        with open(path, "w") as f:
            f.write(example)
        self.assertEqual(loadConfig(path).names, ("web", "ssh", "notes", "game"))
        options = StartOptions()
        options.parseOptions(["--config", path, "web", "ssh", "game"])
        configs = options.tunnelConfigs
        self.assertEqual(configs["web"].name, "myapp")
        self.assertEqual(len(configs["web"].routes), 2)
        self.assertEqual(configs["ssh"].relays[0].via, (RelayAddress("relay-a.example", 4017),))
        self.assertIsNotNone(configs["game"].udpTarget)


class LogLevelTests(SynchronousTestCase):
    """
    C{--log-level}: checked, kept in the configuration, refused under twistd.
    """

    def test_levels(self) -> None:
        """
        The five levels are accepted (any case); anything else is a usage error naming them.
        """
        for level in ("debug", "INFO", "warn", "error", "critical"):
            options = TunnelOptions()
            options.parseOptions(["8000", "--log-level", level])
            self.assertEqual(options.tunnelConfig.logLevel, level.lower())
        options = TunnelOptions()
        options.parseOptions(["8000"])
        self.assertEqual(options.tunnelConfig.logLevel, "warn")
        with self.assertRaises(UsageError) as raised:
            TunnelOptions().parseOptions(["8000", "--log-level", "loud"])
        self.assertIn("expected one of debug, info, warn, error, critical", str(raised.exception))

    def test_refusedUnderTwistd(self) -> None:
        """
        C{twistd portal-tunnel} refuses C{--log-level}: twistd's own options set up logging.
        """
        with self.assertRaises(UsageError) as raised:
            TapOptions().parseOptions(["8000", "--log-level", "debug"])
        self.assertIn("under twistd", str(raised.exception))
