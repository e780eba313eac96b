"""
Tests for L{portal.tunnel.config} and L{portal.cli.exposeoptions}: how a tunnel's command line is read.
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from portal.cli.exposeoptions import TunnelOptions
from portal.tunnel.acme.settings import (
    LETSENCRYPT,
    LETSENCRYPT_STAGING,
    AcmeSettings,
    parseDuration,
)
from portal.tunnel.config import (
    DEFAULT_RELAY,
    ConfigError,
    RelayAddress,
    Target,
    buildConfig,
    parseChain,
    parseRelay,
    parseTarget,
)
from tests.test_appjson import EXAMPLE

RELAY_ID = "a" * 52


class ParseTargetTests(SynchronousTestCase):
    """
    Tests for L{parseTarget}.
    """

    def test_barePort(self) -> None:
        """
        A bare port means that port on 127.0.0.1.
        """
        self.assertEqual(parseTarget("8000"), Target("127.0.0.1", 8000))

    def test_hostPort(self) -> None:
        """
        C{HOST:PORT} names both.
        """
        self.assertEqual(parseTarget("localhost:3000"), Target("localhost", 3000))

    def test_http(self) -> None:
        """
        An C{http://} target is plain TCP; a trailing slash is allowed.
        """
        self.assertEqual(parseTarget("http://example.com:80/"), Target("example.com", 80, False))

    def test_https(self) -> None:
        """
        An C{https://} target is reached over TLS, and shown with its scheme.
        """
        target = parseTarget("https://example.com:8443")
        self.assertEqual(target, Target("example.com", 8443, True))
        self.assertEqual(str(target), "https://example.com:8443")

    def test_schemeCaseInsensitive(self) -> None:
        """
        Schemes are matched without regard to case.
        """
        self.assertEqual(parseTarget("HTTPS://h:1"), Target("h", 1, True))

    def test_ipv6(self) -> None:
        """
        An IPv6 address goes in brackets, and is shown that way.
        """
        target = parseTarget("[::1]:80")
        self.assertEqual(target, Target("::1", 80))
        self.assertEqual(str(target), "[::1]:80")
        self.assertEqual(parseTarget("https://[::1]:443"), Target("::1", 443, True))

    def test_str(self) -> None:
        """
        A plain target is shown as C{HOST:PORT}, a bare port with the address it means.
        """
        self.assertEqual(str(parseTarget("8000")), "127.0.0.1:8000")

    def test_badPorts(self) -> None:
        """
        Ports outside 1-65535, or not numbers, are refused with the offending text named.
        """
        for text in ["0", "65536", "h:0", "h:65536", "h:x", "h:", "h:-1", "h:+80"]:
            e = self.assertRaises(ConfigError, parseTarget, text)
            self.assertIn("port number", str(e), text)

    def test_noHost(self) -> None:
        """
        A port with an empty host before the colon is refused.
        """
        self.assertRaises(ConfigError, parseTarget, ":80")

    def test_badIPv6(self) -> None:
        """
        A bracketed address without a port, or without the colon before it, is refused.
        """
        for text in ["[::1]", "[::1]80", "[::1"]:
            self.assertRaises(ConfigError, parseTarget, text)

    def test_otherSchemes(self) -> None:
        """
        Schemes other than http and https are refused, naming the supported ones.
        """
        for text in ["ftp://h:21", "tcp://h:1", "ws://h:80"]:
            e = self.assertRaises(ConfigError, parseTarget, text)
            self.assertIn("only http:// and https://", str(e))

    def test_configError(self) -> None:
        """
        L{ConfigError} is a L{ValueError}, so callers that expect one still catch it.
        """
        self.assertRaises(ValueError, parseTarget, "nonsense")


class ParseRelayTests(SynchronousTestCase):
    """
    Tests for L{parseRelay}.
    """

    def test_hostOnly(self) -> None:
        """
        A relay without a port uses the default control port 4017.
        """
        self.assertEqual(parseRelay("relay.example"), RelayAddress("relay.example", 4017))

    def test_hostPort(self) -> None:
        """
        C{HOST:PORT} names both; the address relays are pinned under is the same text.
        """
        relay = parseRelay("relay.example:5000")
        self.assertEqual(relay, RelayAddress("relay.example", 5000))
        self.assertEqual(relay.address, "relay.example:5000")

    def test_default(self) -> None:
        """
        The default relay is the one on this machine.
        """
        self.assertEqual(parseRelay(DEFAULT_RELAY), RelayAddress("localhost", 4017))

    def test_ipv6(self) -> None:
        """
        A bracketed IPv6 relay takes the default port when none is given, and keeps brackets in its
        address.
        """
        self.assertEqual(parseRelay("[::1]"), RelayAddress("::1", 4017))
        relay = parseRelay("[::1]:5000")
        self.assertEqual(relay, RelayAddress("::1", 5000))
        self.assertEqual(relay.address, "[::1]:5000")

    def test_relayId(self) -> None:
        """
        C{#RELAYID} gives the expected relay identity, lowercased.
        """
        self.assertEqual(
            parseRelay(f"relay.example:1#{RELAY_ID.upper()}"),
            RelayAddress("relay.example", 1, RELAY_ID),
        )
        self.assertEqual(parseRelay(f"relay.example#{RELAY_ID}").port, 4017)

    def test_emptyRelayId(self) -> None:
        """
        An empty C{#} suffix means no expected identity.
        """
        self.assertIsNone(parseRelay("relay.example:1#").expectedId)

    def test_badRelayId(self) -> None:
        """
        An identity that is not 52 letters and digits is refused with what it must be.
        """
        for relayId in ["abc", "a" * 51, "a" * 53, "a" * 51 + "!"]:
            e = self.assertRaises(ConfigError, parseRelay, f"h:1#{relayId}")
            self.assertIn("52-character identity id", str(e))

    def test_badSpecs(self) -> None:
        """
        A bare port, an empty relay, and a bad port are refused.
        """
        for text in ["4017", "", "#" + RELAY_ID, "h:x", "h:0", "h:70000"]:
            self.assertRaises(ConfigError, parseRelay, text)


class BuildConfigTests(SynchronousTestCase):
    """
    Tests for L{buildConfig}.
    """

    def test_defaults(self) -> None:
        """
        With only a target the tunnel uses the local relay, a derived name and HTTP/1.1.
        """
        identityPath = os.path.join("somewhere", "identity.json")
        config = buildConfig("8000", identityPath=identityPath)
        self.assertEqual(config.target, Target("127.0.0.1", 8000))
        self.assertEqual(config.relays, (RelayAddress("localhost", 4017),))
        self.assertIsNone(config.name)
        self.assertEqual(config.alpn, (b"http/1.1",))
        self.assertEqual(config.identityPath, identityPath)
        self.assertEqual(config.configDir, os.path.abspath("somewhere"))

    def test_everything(self) -> None:
        """
        Every option is parsed into the configuration.
        """
        config = buildConfig(
            "https://h:1",
            relays=["a:1", f"b:2#{RELAY_ID}"],
            name="My-App",
            alpn="h2, http/1.1",
            certFile="c.pem",
            keyFile="k.pem",
            identityPath="id.json",
            json=True,
            poolSize=8,
        )
        self.assertEqual(config.target, Target("h", 1, True))
        self.assertEqual(config.relays, (RelayAddress("a", 1), RelayAddress("b", 2, RELAY_ID)))
        self.assertEqual(config.name, "my-app")
        self.assertEqual(config.alpn, (b"h2", b"http/1.1"))
        self.assertEqual((config.certFile, config.keyFile), ("c.pem", "k.pem"))
        self.assertTrue(config.json)
        self.assertEqual(config.poolSize, 8)

    def test_certWithoutKey(self) -> None:
        """
        A certificate without its key, or a key without its certificate, is refused.
        """
        e = self.assertRaises(ConfigError, buildConfig, "8000", certFile="c.pem")
        self.assertIn("--cert and --key", str(e))
        self.assertRaises(ConfigError, buildConfig, "8000", keyFile="k.pem")

    def test_invalidName(self) -> None:
        """
        A name that is not a DNS label is refused, naming the option.
        """
        for name in ["Bad_Name", "", "-x", "a.b", "x" * 64]:
            e = self.assertRaises(ConfigError, buildConfig, "8000", name=name)
            self.assertIn("--name", str(e))

    def test_duplicateRelays(self) -> None:
        """
        The same relay given twice is refused, even when spelt once with the default port.
        """
        self.assertRaises(ConfigError, buildConfig, "8000", relays=["h:1", "h:1"])
        e = self.assertRaises(ConfigError, buildConfig, "8000", relays=["h", "h:4017"])
        self.assertIn("twice", str(e))

    def test_poolSize(self) -> None:
        """
        A pool size outside 1-64 is refused.
        """
        for size in [0, -1, 65]:
            self.assertRaises(ConfigError, buildConfig, "8000", poolSize=size)

    def test_badAlpn(self) -> None:
        """
        An empty ALPN list is refused.
        """
        self.assertRaises(ConfigError, buildConfig, "8000", alpn=" , ")

    def test_badTarget(self) -> None:
        """
        A malformed target is refused.
        """
        self.assertRaises(ConfigError, buildConfig, "ftp://h:1")


class TunnelOptionsTests(SynchronousTestCase):
    """
    Tests for L{TunnelOptions}, the options of C{portal expose} and C{twistd portal-tunnel}.
    """

    def parse(self, *arguments: str) -> TunnelOptions:
        """
        Parse a command line.
        """
        options = TunnelOptions()
        options.parseOptions(list(arguments))
        return options

    def test_optionsAfterTarget(self) -> None:
        """
        Options may follow TARGET, as in C{portal expose 8000 --relay h:1 --name x}.
        """
        config = self.parse("8000", "--relay", "h:1", "--name", "x").tunnelConfig
        self.assertEqual(config.target, Target("127.0.0.1", 8000))
        self.assertEqual(config.relays, (RelayAddress("h", 1),))
        self.assertEqual(config.name, "x")

    def test_optionsBeforeTarget(self) -> None:
        """
        Options may also come before TARGET, with C{=} values and flags mixed in.
        """
        config = self.parse(
            "--name=x", "--json", "--relay", "h:1", "8000", "--relay", "g:2"
        ).tunnelConfig
        self.assertEqual(config.name, "x")
        self.assertTrue(config.json)
        self.assertEqual(config.relays, (RelayAddress("h", 1), RelayAddress("g", 2)))

    def test_defaultRelay(self) -> None:
        """
        Without C{--relay} the relay on this machine is used.
        """
        self.assertEqual(self.parse("8000").tunnelConfig.relays, (parseRelay(DEFAULT_RELAY),))

    def test_poolSize(self) -> None:
        """
        C{--pool-size} is read as a number.
        """
        self.assertEqual(self.parse("8000", "--pool-size", "9").tunnelConfig.poolSize, 9)

    def test_missingTarget(self) -> None:
        """
        Without TARGET the usage error says what TARGET is.
        """
        e = self.assertRaises(UsageError, self.parse, "--relay", "h:1")
        self.assertIn("missing TARGET", str(e))

    def test_twoTargets(self) -> None:
        """
        More than one TARGET is a usage error.
        """
        self.assertRaises(UsageError, self.parse, "8000", "9000")

    def test_unknownOption(self) -> None:
        """
        An unknown option is a usage error.
        """
        self.assertRaises(UsageError, self.parse, "8000", "--bogus")

    def test_proxyProtocol(self) -> None:
        """
        C{--proxy-protocol v1|v2} (or 1|2) is kept in the configuration; another version, routed HTTP
        mode and an C{https://} target are usage errors that say why.
        """
        self.assertIsNone(self.parse("8000").tunnelConfig.proxyProtocol)
        self.assertEqual(
            self.parse("8000", "--proxy-protocol", "v1").tunnelConfig.proxyProtocol, "v1"
        )
        self.assertEqual(
            self.parse("8000", "--proxy-protocol", "2").tunnelConfig.proxyProtocol, "v2"
        )
        e = self.assertRaises(UsageError, self.parse, "8000", "--proxy-protocol", "v3")
        self.assertEqual(str(e), "--proxy-protocol v3: expected v1 or v2")
        e = self.assertRaises(UsageError, self.parse, "8000", "--http", "--proxy-protocol", "v1")
        self.assertIn("X-Forwarded-For", str(e))
        e = self.assertRaises(
            UsageError, self.parse, "https://127.0.0.1:8443", "--proxy-protocol", "v2"
        )
        self.assertIn("https://", str(e))

    def test_tcp(self) -> None:
        """
        C{--tcp} selects raw TCP mode (registration mode C{tcp}) with TARGET as HOST:PORT or PORT,
        and works with C{--proxy-protocol}.
        """
        config = self.parse("localhost:25565", "--tcp", "--proxy-protocol", "v2").tunnelConfig
        self.assertTrue(config.tcp)
        self.assertEqual(config.mode, "tcp")
        self.assertEqual((config.target.host, config.target.port), ("localhost", 25565))
        self.assertEqual(config.proxyProtocol, "v2")
        self.assertEqual(self.parse("6379", "--tcp").tunnelConfig.target.host, "127.0.0.1")
        self.assertEqual(self.parse("8000").tunnelConfig.mode, "stream")

    def test_tcpConflicts(self) -> None:
        """
        Options that make no sense without TLS termination, or with routed HTTP, are usage errors
        that say why.
        """
        for arguments, text in [
            (["http://127.0.0.1:3000", "--tcp"], "no scheme"),
            (["3000", "--tcp", "--http"], "--http"),
            (["--tcp", "--http-route", "/=3000"], "--http-route"),
            (["3000", "--tcp", "--alpn", "h2"], "does not terminate TLS"),
            (["3000", "--tcp", "--cert", "c.pem", "--key", "k.pem"], "does not terminate TLS"),
        ]:
            e = self.assertRaises(UsageError, self.parse, *arguments)
            self.assertIn(text, str(e))

    def test_udp(self) -> None:
        """
        C{--udp}: TARGET is the UDP service (mode C{udp}); with C{--udp-addr} that is the UDP service
        and TARGET is served over TCP too (C{stream+udp}, or C{tcp+udp} with C{--tcp}, where one
        TARGET serves both); the idle timeout and flow limit are kept.
        """
        config = self.parse("19132", "--udp").tunnelConfig
        self.assertEqual((config.mode, config.target), ("udp", None))
        self.assertEqual(str(config.udpTarget), "127.0.0.1:19132")
        self.assertEqual((config.udpIdleTimeout, config.udpMaxFlows), (60.0, 1024))
        config = self.parse("8080", "--udp", "--udp-addr", "19132").tunnelConfig
        self.assertEqual(config.mode, "stream+udp")
        self.assertEqual(
            (str(config.target), str(config.udpTarget)), ("127.0.0.1:8080", "127.0.0.1:19132")
        )
        config = self.parse("localhost:25565", "--tcp", "--udp").tunnelConfig
        self.assertEqual(config.mode, "tcp+udp")
        self.assertEqual(str(config.udpTarget), "localhost:25565")
        config = self.parse(
            "--udp", "--udp-addr", "53", "--udp-idle-timeout", "5", "--udp-max-flows", "3"
        ).tunnelConfig
        self.assertEqual((config.mode, config.udpIdleTimeout, config.udpMaxFlows), ("udp", 5.0, 3))
        self.assertEqual(config.udpMaxFlowsPerSource, 64)
        config = self.parse("53", "--udp", "--udp-max-flows-per-source", "2").tunnelConfig
        self.assertEqual(config.udpMaxFlowsPerSource, 2)

    def test_udpErrors(self) -> None:
        """
        Inconsistent UDP options are usage errors that say why.
        """
        for arguments, text in [
            (["53", "--udp-addr", "54"], "--udp-addr needs --udp"),
            (["--udp"], "missing TARGET or --udp-addr"),
            (["http://127.0.0.1:53", "--udp"], "no scheme"),
            (["53", "--udp", "--udp-max-flows", "0"], "--udp-max-flows"),
            (["53", "--udp", "--udp-max-flows-per-source", "0"], "--udp-max-flows-per-source"),
            (["53", "--udp", "--udp-idle-timeout", "-1"], "--udp-idle-timeout"),
            (["53", "--udp", "--http"], "UDP service"),
        ]:
            e = self.assertRaises(UsageError, self.parse, *arguments)
            self.assertIn(text, str(e))

    def test_acmeOptions(self) -> None:
        """
        C{--acme} with its companions builds the ACME settings: shortcuts expand to Let's Encrypt's
        directories, the renew-before duration is read in seconds, and the CA file is made absolute.
        """
        caFile = self.mktemp()
        with open(caFile, "w") as f:
            f.write("x")
        options = self.parse(
            "8000",
            "--acme",
            "letsencrypt-staging",
            "--acme-email",
            "me@example.net",
            "--acme-ca",
            caFile,
            "--acme-renew-before",
            "30d",
        )
        self.assertEqual(
            options.tunnelConfig.acme,
            AcmeSettings(
                LETSENCRYPT_STAGING, "me@example.net", os.path.abspath(caFile), 30 * 86400.0
            ),
        )
        self.assertEqual(
            self.parse("8000", "--acme", "letsencrypt").tunnelConfig.acme,
            AcmeSettings(LETSENCRYPT),
        )
        self.assertIsNone(self.parse("8000").tunnelConfig.acme)

    def test_acmeRefusals(self) -> None:
        """
        Malformed ACME options, companions without C{--acme}, and C{--acme} where the tunnel
        terminates no TLS or has a certificate already are usage errors naming the flag.
        """
        for arguments, text in [
            (["8000", "--acme", "ftp://a"], "--acme 'ftp://a'"),
            (["8000", "--acme-email", "a@b"], "--acme-email needs --acme"),
            (["8000", "--acme-ca", "ca.pem"], "--acme-ca needs --acme"),
            (["8000", "--acme-renew-before", "1d"], "--acme-renew-before needs --acme"),
            (["8000", "--acme", "letsencrypt", "--acme-email", "nobody"], "--acme-email"),
            (["8000", "--acme", "letsencrypt", "--acme-ca", "/nonexistent"], "--acme-ca"),
            (["8000", "--acme", "letsencrypt", "--acme-renew-before", "soon"], "duration"),
            (["8000", "--acme", "letsencrypt", "--acme-renew-before", "0"], "duration"),
            (["8000", "--acme", "letsencrypt", "--tcp"], "terminates TLS"),
            (["53", "--acme", "letsencrypt", "--udp"], "terminates TLS"),
            (
                ["8000", "--acme", "letsencrypt", "--cert", "c.pem", "--key", "k.pem"],
                "--acme and --cert",
            ),
        ]:
            e = self.assertRaises(UsageError, self.parse, *arguments)
            self.assertIn(text, str(e))

    def test_durations(self) -> None:
        """
        Durations are seconds, or a number with C{s}, C{m}, C{h} or C{d}.
        """
        for text, seconds in [
            ("90", 90.0),
            ("45s", 45.0),
            ("2m", 120.0),
            ("1.5h", 5400.0),
            ("30d", 2592000.0),
        ]:
            self.assertEqual(parseDuration(text, "--x"), seconds)

    def test_configErrorIsUsageError(self) -> None:
        """
        A malformed option value becomes a usage error with the configuration's reason.
        """
        e = self.assertRaises(UsageError, self.parse, "8000", "--name", "Bad_Name")
        self.assertIn("--name", str(e))
        e = self.assertRaises(UsageError, self.parse, "ftp://h:1")
        self.assertIn("only http:// and https://", str(e))
        self.assertRaises(UsageError, self.parse, "8000", "--cert", "c.pem")


class ViaTests(SynchronousTestCase):
    """
    C{--via HOST:PORT[#RELAYID]}: the C{--via} options before a C{--relay} are its path.
    """

    def parse(self, *arguments: str) -> TunnelOptions:
        """
        Parse a command line.
        """
        options = TunnelOptions()
        options.parseOptions(list(arguments))
        return options

    def test_chain(self) -> None:
        """
        C{--via A --via B#ID --relay C}: one relay, C, reached through A then B; each hop is parsed
        like a relay (default port 4017, lowercased, an optional identity).
        """
        config = self.parse(
            "8000", "--via", "A.example", "--via", f"b.example:4018#{RELAY_ID}", "--relay", "c:1"
        ).tunnelConfig
        [relay] = config.relays
        self.assertEqual((relay.host, relay.port), ("c", 1))
        self.assertEqual(
            relay.via,
            (RelayAddress("a.example", 4017), RelayAddress("b.example", 4018, RELAY_ID)),
        )
        self.assertEqual(relay.path, "a.example:4017 -> b.example:4018 -> c:1")

    def test_pool(self) -> None:
        """
        C{--relay X --via A --relay B}: X direct, B through A; the order of the other options and
        of TARGET does not matter.
        """
        config = self.parse(
            "--relay", "x:1", "--json", "--via", "a:2", "8000", "--relay", "b:3"
        ).tunnelConfig
        x, b = config.relays
        self.assertEqual((x, b.via), (RelayAddress("x", 1), (RelayAddress("a", 2),)))
        self.assertEqual(b.address, "b:3")

    def test_viaWithoutRelay(self) -> None:
        """
        A C{--via} with no C{--relay} after it is a usage error with a one-line reason.
        """
        for arguments in (["--via", "a:1"], ["--relay", "x:1", "--via", "a:1"]):
            e = self.assertRaises(UsageError, self.parse, "8000", *arguments)
            self.assertTrue(str(e).startswith("--via a:1: a --via must be followed by"), str(e))
            self.assertNotIn("\n", str(e))

    def test_malformedVia(self) -> None:
        """
        A malformed hop is a usage error naming C{--via}.
        """
        for text in ("", "a:0", "a:b", f"a:1#{'0' * 52}"):
            e = self.assertRaises(UsageError, self.parse, "8000", "--via", text, "--relay", "c")
            self.assertTrue(str(e).startswith("--via"), str(e))

    def test_relayTwiceOnAPath(self) -> None:
        """
        A relay may occur once on a path: a hop repeated, or the relay as its own hop, is refused.
        """
        self.assertRaises(ConfigError, parseChain, "c:1", ["a:1", "a:1"])
        error = self.assertRaises(ConfigError, parseChain, "c:1", ["c:1"])
        self.assertIn("only once on the path to c:1", str(error))

    def test_alternatives(self) -> None:
        """
        C{--relay A,B#ID}: one relay with two control addresses, tried in that order, each parsed
        like a relay and each with the path given with C{--via}.
        """
        config = self.parse(
            "8000", "--via", "h:1", "--relay", f"A.example, b.example:4018#{RELAY_ID}"
        ).tunnelConfig
        [relay] = config.relays
        first, second = relay.choices
        hop = (RelayAddress("h", 1),)
        self.assertEqual(first, RelayAddress("a.example", 4017, via=hop))
        self.assertEqual(second, RelayAddress("b.example", 4018, RELAY_ID, via=hop))
        self.assertEqual(relay.address, "a.example:4017")
        self.assertEqual(RelayAddress("c", 1).choices, (RelayAddress("c", 1),))

    def test_alternativeGivenTwice(self) -> None:
        """
        An address listed twice, within one C{--relay} or in two, or as a hop of the path, is
        refused.
        """
        error = self.assertRaises(ConfigError, parseChain, "a:1,b:1,a:1")
        self.assertIn("a:1 is listed twice", str(error))
        self.assertRaises(ConfigError, buildConfig, "8000", relays=["a:1,b:1", "b:1"])
        self.assertRaises(ConfigError, parseChain, "a:1,b:1", ["b:1"])
        self.assertRaises(ConfigError, parseChain, "a:1,")

    def test_hopMayBeAPoolRelay(self) -> None:
        """
        A relay of the pool may also be a hop on another relay's path.
        """
        config = buildConfig("8000", relays=["a:1", "b:1"], via=[(), ["a:1"]])
        self.assertEqual(config.relays[1].via, (RelayAddress("a", 1),))

    def test_udpThroughChain(self) -> None:
        """
        UDP mode through a chain is accepted (its datagrams go over the control session).
        """
        config = self.parse("53", "--udp", "--via", "a:1", "--relay", "c:1").tunnelConfig
        self.assertEqual((config.mode, len(config.relays[0].via)), ("udp", 1))


class AddressEdgeTests(SynchronousTestCase):
    """
    Addresses that once parsed into nonsense.
    """

    def test_bareIPv6Relay(self) -> None:
        """
        A bare IPv6 address is refused with a hint to use brackets; in brackets it gets port 4017.
        """
        error = self.assertRaises(ConfigError, parseRelay, "::1")
        self.assertIn("[", str(error))
        self.assertEqual(parseRelay("[::1]"), RelayAddress("::1", 4017))

    def test_emptyBracketHost(self) -> None:
        """
        C{[]:80} is not an address.
        """
        self.assertRaises(ConfigError, parseTarget, "[]:80")

    def test_relayIdAlphabet(self) -> None:
        """
        A relay id must be base32 (letters and 2-7): digits 0, 1, 8 and 9 cannot occur in one.
        """
        self.assertRaises(ConfigError, parseRelay, "h:1#" + "0" * 52)
        self.assertEqual(parseRelay("h:1#" + "A" * 52).expectedId, "a" * 52)

    def test_duplicateRelayIgnoresCase(self) -> None:
        """
        The same relay written in two cases is a duplicate, as pins are keyed case-insensitively.
        """
        self.assertRaises(
            ConfigError, buildConfig, "80", relays=["Relay.Example:1", "relay.example:1"]
        )


class RoutedHTTPConfigTests(SynchronousTestCase):
    """
    Routed HTTP mode's options: C{--http} and C{--http-route}.
    """

    def parse(self, *arguments: str) -> TunnelOptions:
        """
        Parse C{portal expose} arguments.
        """
        options = TunnelOptions()
        options.parseOptions(list(arguments))
        return options

    def test_httpIsOneRoute(self) -> None:
        """
        C{portal expose 3000 --http} is routed mode with the one route '/' to 127.0.0.1:3000.
        """
        config = self.parse("3000", "--http").tunnelConfig
        self.assertIsNone(config.target)
        self.assertEqual([r.prefix for r in config.routes], ["/"])
        self.assertEqual(config.routes[0].upstream.authority, "127.0.0.1:3000")

    def test_routesWithoutTarget(self) -> None:
        """
        Routes need no TARGET; they are kept longest prefix first and described for the Forwarding line.
        """
        config = self.parse(
            "--http-route", "/=5173", "--http-route", "/api=3001,strip"
        ).tunnelConfig
        self.assertEqual([r.prefix for r in config.routes], ["/api", "/"])
        self.assertEqual(config.describeTarget(), "/api=127.0.0.1:3001,strip /=127.0.0.1:5173")

    def test_http2RoutesDescribed(self) -> None:
        """
        HTTP/2 routes are described with their scheme (C{h2c://}, C{h2://}); HTTP/1.1 ones as before.
        """
        config = self.parse(
            "--http-route",
            "/pkg.Echo=h2c://127.0.0.1:50051",
            "--http-route",
            "/s=h2://10.0.0.5:8443",
            "--http-route",
            "/=5173",
        ).tunnelConfig
        self.assertEqual(
            config.describeTarget(),
            "/pkg.Echo=h2c://127.0.0.1:50051 /s=h2://10.0.0.5:8443 /=127.0.0.1:5173",
        )

    def test_targetBecomesRootRoute(self) -> None:
        """
        A TARGET given with routes becomes the '/' route; if a '/' route is given too, that is an error.
        """
        config = self.parse("5173", "--http-route", "/api=3001").tunnelConfig
        self.assertEqual([r.prefix for r in config.routes], ["/api", "/"])
        error = self.assertRaises(UsageError, self.parse, "5173", "--http-route", "/=3001")
        self.assertIn("'/' route", str(error))

    def test_badRoute(self) -> None:
        """
        A malformed route is a usage error that names the route.
        """
        error = self.assertRaises(UsageError, self.parse, "--http-route", "api=3001")
        self.assertIn("--http-route", str(error))

    def test_duplicatePrefix(self) -> None:
        """
        Two routes for one prefix are refused.
        """
        self.assertRaises(
            UsageError, self.parse, "--http-route", "/api=1", "--http-route", "/api/=2"
        )

    def test_alpnInRoutedMode(self) -> None:
        """
        Routed mode offers HTTP/2 and HTTP/1.1 to visitors by default (stream mode HTTP/1.1 only),
        C{--alpn http/1.1} turns HTTP/2 off; other ALPN protocols are a usage error.
        """
        config = self.parse("3000", "--http").tunnelConfig
        self.assertEqual(config.alpn, (b"h2", b"http/1.1"))
        config = self.parse("3000", "--http", "--alpn", "http/1.1").tunnelConfig
        self.assertEqual(config.alpn, (b"http/1.1",))
        self.assertEqual(self.parse("3000").tunnelConfig.alpn, (b"http/1.1",))
        error = self.assertRaises(UsageError, self.parse, "3000", "--http", "--alpn", "h3")
        self.assertIn("h2,http/1.1", str(error))

    def test_missingTarget(self) -> None:
        """
        Neither TARGET nor routes is a usage error saying what is missing.
        """
        error = self.assertRaises(UsageError, self.parse)
        self.assertIn("missing TARGET", str(error))


class AppOptionTests(SynchronousTestCase):
    """
    C{--app app.json}: each file is an app of the gateway, under its own lease name.
    """

    def parse(self, *arguments: str) -> TunnelOptions:
        """
        Parse C{portal expose} arguments.
        """
        options = TunnelOptions()
        options.parseOptions(list(arguments))
        return options

    def appFile(self, **changes: Any) -> str:
        """
        @param changes: Top-level keys of L{EXAMPLE} to replace.
        @return: A file holding the app.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            json.dump(dict(EXAMPLE, **changes), f)
        return path

    def test_oneApp(self) -> None:
        """
        One C{--app} gives routed HTTP mode (stream leases, HTTP/2 offered) with the app and no
        other routes.
        """
        path = self.appFile()
        config = self.parse("--app", path).tunnelConfig
        [app] = config.apps
        self.assertEqual((app.name, app.source), ("myapp", path))
        self.assertEqual(config.mode, "stream")
        self.assertEqual(config.routes, ())
        self.assertIsNone(config.target)
        self.assertEqual(config.alpn, (b"h2", b"http/1.1"))
        self.assertEqual(
            config.describeTarget("myapp"), "app myapp: /=127.0.0.1:3000 /api=127.0.0.1:3001"
        )

    def test_severalApps(self) -> None:
        """
        C{--app} may be repeated; the apps keep their order.
        """
        config = self.parse(
            "--app", self.appFile(), "--app", self.appFile(name="second")
        ).tunnelConfig
        self.assertEqual([app.name for app in config.apps], ["myapp", "second"])
        self.assertIn("app second:", config.describeTarget())
        self.assertEqual(config.describeTarget("second"), config.apps[1].describe())

    def test_sameName(self) -> None:
        """
        Two apps with one name are refused, naming both files.
        """
        first, second = self.appFile(), self.appFile()
        e = self.assertRaises(UsageError, self.parse, "--app", first, "--app", second)
        self.assertEqual(
            str(e),
            f"--app {second}: the name 'myapp' is already the name of --app {first}; each app "
            "needs its own",
        )

    def test_invalidApp(self) -> None:
        """
        An invalid app.json is a usage error naming the file, the field and the problem.
        """
        path = self.appFile(paths={"/x/": {"access": "public"}})
        e = self.assertRaises(UsageError, self.parse, "--app", path)
        self.assertTrue(str(e).startswith(f'--app {path}: paths: the entry "" '), str(e))
        missing = os.path.join(self.mktemp(), "app.json")
        e = self.assertRaises(UsageError, self.parse, "--app", missing)
        self.assertEqual(
            str(e), f"--app {missing}: cannot read the file: No such file or directory"
        )

    def test_conflicts(self) -> None:
        """
        What else would say what to publish, or a mode without HTTP, cannot be combined with
        C{--app}.
        """
        path = self.appFile()
        for arguments, text in [
            (["8000"], "--app: TARGET '8000' cannot be combined with --app"),
            (["--http-route", "/=3000"], "--app: cannot be combined with --http or --http-route"),
            (["--name", "x"], "--name: with --app each app's name"),
            (["--tcp"], "--app: the app gateway is routed HTTP mode"),
            (["--udp", "--udp-addr", "53"], "--app: the app gateway is routed HTTP mode"),
            (["--proxy-protocol", "v1"], "--proxy-protocol: routed HTTP mode"),
            (["--alpn", "h3"], "--alpn: routed HTTP mode speaks HTTP/1.1 and HTTP/2"),
        ]:
            e = self.assertRaises(UsageError, self.parse, "--app", path, *arguments)
            self.assertTrue(str(e).startswith(text), (arguments, str(e)))

    def test_buildConfig(self) -> None:
        """
        L{buildConfig} takes the files as C{apps}.
        """
        config = buildConfig(None, apps=[self.appFile()])
        self.assertEqual([app.name for app in config.apps], ["myapp"])
        self.assertRaises(ConfigError, buildConfig, None, apps=[self.mktemp()])
