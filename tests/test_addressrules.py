"""
Tests for L{portal.tunnel.addressrules} (C{--allow-ip}, C{--deny-ip}) and their use by the stream
handler, which refuses a visitor before any of its bytes reach TLS or the target.
"""

from __future__ import annotations

import io
import json

from twisted.internet.error import ConnectionDone
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from portal.cli.exposeoptions import TunnelOptions
from portal.tunnel.addressrules import MAX_NETWORKS, SERVE_ALL, AddressRules, parseNetwork
from portal.tunnel.config import ConfigError, Target, buildConfig
from portal.tunnel.report import Reporter
from portal.tunnel.stream import REFUSED_LOG_INTERVAL, StreamHandler
from portal.wire.attach import StreamHeader


class AddressRulesTests(SynchronousTestCase):
    """
    Tests for L{AddressRules}.
    """

    def test_serveAll(self) -> None:
        """
        Without rules every visitor is served, whatever its address.
        """
        self.assertFalse(SERVE_ALL)
        for host in ("192.0.2.1", "2001:db8::1", "not an address"):
            self.assertIsNone(SERVE_ALL.refusal(host))

    def test_allow(self) -> None:
        """
        With C{--allow-ip}, only addresses in one of the networks are served, of either family.
        """
        rules = AddressRules.parse(allow=["192.0.2.0/24", "2001:db8::/32"])
        self.assertIsNone(rules.refusal("192.0.2.200"))
        self.assertIsNone(rules.refusal("2001:db8:1::5"))
        self.assertEqual(rules.refusal("198.51.100.1"), "not in any --allow-ip")
        self.assertEqual(rules.refusal("2001:db9::1"), "not in any --allow-ip")

    def test_denyFirst(self) -> None:
        """
        C{--deny-ip} wins over C{--allow-ip}, and names the network that refused.
        """
        rules = AddressRules.parse(allow=["10.0.0.0/8"], deny=["10.1.0.0/16"])
        self.assertIsNone(rules.refusal("10.2.0.1"))
        self.assertEqual(rules.refusal("10.1.2.3"), "in --deny-ip 10.1.0.0/16")

    def test_singleAddress(self) -> None:
        """
        A network may be one address; an IPv4-mapped IPv6 visitor is judged as its IPv4 address.
        """
        rules = AddressRules.parse(deny=["203.0.113.9"])
        self.assertEqual(rules.deny[0].prefixlen, 32)
        self.assertIsNotNone(rules.refusal("203.0.113.9"))
        self.assertIsNotNone(rules.refusal("::ffff:203.0.113.9"))
        self.assertIsNone(rules.refusal("203.0.113.10"))

    def test_unparseableVisitor(self) -> None:
        """
        With rules, a visitor address that is not an IP address is refused.
        """
        rules = AddressRules.parse(deny=["203.0.113.9"])
        self.assertEqual(rules.refusal("example.com"), "not an IP address")

    def test_malformed(self) -> None:
        """
        A malformed network, or one with bits set after its prefix, is refused naming the option.
        """
        for text in ("10.0.0.0/33", "nonsense", "10.0.0.1/8", ""):
            with self.assertRaises(ConfigError) as raised:
                parseNetwork(text, "--allow-ip")
            self.assertIn(f"--allow-ip {text!r}", str(raised.exception))

    def test_limit(self) -> None:
        """
        At most L{MAX_NETWORKS} networks may be given.
        """
        AddressRules.parse(allow=["10.0.0.1"] * MAX_NETWORKS)
        with self.assertRaises(ConfigError) as raised:
            AddressRules.parse(allow=["10.0.0.1"] * MAX_NETWORKS, deny=["10.0.0.2"])
        self.assertIn(f"at most {MAX_NETWORKS}", str(raised.exception))


class OptionsTests(SynchronousTestCase):
    """
    C{--allow-ip} and C{--deny-ip} on the command line and in L{buildConfig}.
    """

    def test_repeatable(self) -> None:
        """
        Both options repeat and end up in the configuration's rules.
        """
        options = TunnelOptions()
        options.parseOptions(
            ["8000", "--allow-ip", "10.0.0.0/8", "--allow-ip", "::1", "--deny-ip", "10.9.0.0/16"]
        )
        rules = options.tunnelConfig.addressRules
        self.assertEqual([str(n) for n in rules.allow], ["10.0.0.0/8", "::1/128"])
        self.assertEqual([str(n) for n in rules.deny], ["10.9.0.0/16"])

    def test_everyMode(self) -> None:
        """
        The rules apply in every mode: stream, routed HTTP, raw TCP and UDP.
        """
        for extra in ({}, {"http": True}, {"tcp": True}, {"udp": True}):
            config = buildConfig("8000", denyIPs=["192.0.2.0/24"], **extra)  # type: ignore[arg-type]
            self.assertTrue(config.addressRules)

    def test_usageError(self) -> None:
        """
        A malformed network is a usage error.
        """
        with self.assertRaises(UsageError) as raised:
            TunnelOptions().parseOptions(["8000", "--deny-ip", "300.1.1.1"])
        self.assertIn("--deny-ip '300.1.1.1'", str(raised.exception))


def _header(peer: str) -> StreamHeader:
    """
    @return: A stream header from visitor C{peer}.
    """
    return StreamHeader(streamId=3, hostname="app.localhost", peerHost=peer, peerPort=40000)


class StreamHandlerRulesTests(SynchronousTestCase):
    """
    The stream handler applies the rules to the address in each stream header.
    """

    def setUp(self) -> None:
        """
        A raw TCP mode handler (no TLS) that refuses 203.0.113.0/24, and a log capture.
        """
        self.reactor = MemoryReactorClock()
        self.handler = StreamHandler(
            self.reactor,
            Target("127.0.0.1", 9),
            None,
            addressRules=AddressRules.parse(deny=["203.0.113.0/24"]),
        )
        self.events = EventLoggingObserver.createWithCleanup(
            self,  # type: ignore[arg-type]
            globalLogPublisher,
        )

    def refusedEvents(self) -> list[dict[str, object]]:
        """
        @return: The warnings about refused visitors.
        """
        return [
            e
            for e in self.events
            if e["log_level"] == LogLevel.warn and "refused visitor" in e["log_format"]
        ]

    def test_refusedBeforeAnyByte(self) -> None:
        """
        A refused visitor's data session is closed as it starts; its bytes go nowhere and no
        connection to the target is attempted.
        """
        protocol = self.handler(_header("203.0.113.5"))
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(b"GET / HTTP/1.1\r\n\r\n")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")
        self.assertEqual(self.reactor.tcpClients, [])
        self.assertEqual(self.handler.refused, 1)
        [event] = self.refusedEvents()
        self.assertEqual(event["peer"], "203.0.113.5")
        self.assertEqual(event["reason"], "in --deny-ip 203.0.113.0/24")

    def test_servedConnects(self) -> None:
        """
        A visitor the rules serve is connected to the target as usual.
        """
        protocol = self.handler(_header("198.51.100.5"))
        protocol.makeConnection(StringTransport())
        self.assertEqual(self.handler.refused, 0)
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_logThrottled(self) -> None:
        """
        Refusals are logged at most once per L{REFUSED_LOG_INTERVAL}; the next event counts those
        held back.
        """
        for _ in range(3):
            self.handler(_header("203.0.113.5"))
        self.assertEqual(len(self.refusedEvents()), 1)
        self.reactor.advance(REFUSED_LOG_INTERVAL)
        self.handler(_header("203.0.113.6"))
        events = self.refusedEvents()
        self.assertEqual(len(events), 2)
        self.assertEqual(events[1]["held"], 2)
        self.assertEqual(self.handler.refused, 4)


class ConnectionReportTests(SynchronousTestCase):
    """
    The stream handler reports each spliced connection when it ends (stream and raw TCP modes).
    """

    def test_oneLinePerConnection(self) -> None:
        """
        A connection that reached the target is reported with the visitor's address, the bytes
        each way and its duration.
        """
        reactor = MemoryReactorClock()
        out = io.StringIO()
        reporter = Reporter(out, asJSON=True)
        handler = StreamHandler(reactor, Target("127.0.0.1", 9), None, reporter=reporter)
        visitor = handler(_header("198.51.100.5"))
        visitor.makeConnection(StringTransport())
        [(_, _, factory, _, _)] = reactor.tcpClients
        target = factory.buildProtocol(None)
        target.makeConnection(StringTransport())
        reactor.advance(2.5)
        visitor.dataReceived(b"hello")
        target.dataReceived(b"world!")
        visitor.connectionLost(Failure(ConnectionDone()))
        [event] = [json.loads(line) for line in out.getvalue().splitlines()]
        self.assertEqual(
            event,
            {
                "event": "connection",
                "client": "198.51.100.5",
                "target": "127.0.0.1:9",
                "in": 5,
                "out": 6,
                "seconds": 2.5,
            },
        )
