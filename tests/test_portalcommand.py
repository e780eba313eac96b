"""
Tests for the C{portal} command line itself (L{portal.cli.main}): version, usage, help text, and the
quiet connections and clean signal handling of C{twistd portal-tunnel}.
"""

from __future__ import annotations

import io
import signal
import sys
from typing import Any

from twisted.internet.defer import succeed
from twisted.internet.protocol import Protocol
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

import portal
from portal.cli.main import PortalOptions, main
from portal.cli.relays import HTTPSWithCA
from portal.forwarding.quietconnect import connectQuietly
from portal.tap.tunnel import stopCleanlyOnSignals


def run(*argv: str) -> tuple[int, str, str]:
    """
    Run C{portal ARGV} in this process.

    @return: The exit code, standard output and standard error.
    """
    out, err = io.StringIO(), io.StringIO()
    realOut = sys.stdout
    sys.stdout = out  # --help and --version print.
    try:
        main(list(argv), out, err)
    except SystemExit as e:
        code = int(e.code or 0)
    finally:
        sys.stdout = realOut
    return code, out.getvalue(), err.getvalue()


class CommandLineTests(SynchronousTestCase):
    """
    The version, the usage lines and the help text.
    """

    def test_version(self) -> None:
        """
        C{portal --version} prints Portal's version, not Twisted's, like C{portal version}.
        """
        for argv in (["--version"], ["version"]):
            code, out, _ = run(*argv)
            self.assertEqual((code, out), (0, f"portal {portal.__version__}\n"))

    def test_unknownCommand(self) -> None:
        """
        An unknown command, or none, exits 2 naming the commands there are.
        """
        for argv, start in ((["frob"], "Unknown command: frob; the commands are "), ([], "")):
            code, _, err = run(*argv)
            self.assertEqual(code, 2)
            self.assertIn(start, err)
            self.assertIn("expose, start, identity, peers, relays, demo, pair, terminals", err)

    def test_usageLines(self) -> None:
        """
        The usage line of C{portal} and of each command starts with C{Usage: portal COMMAND}.
        """
        code, out, _ = run("--help")
        self.assertEqual(code, 0)
        self.assertTrue(out.startswith("Usage: portal COMMAND [options]\n"), out)
        for command in ("expose", "start", "relays", "pair"):
            code, out, _ = run(command, "--help")
            self.assertEqual(code, 0)
            self.assertTrue(out.startswith(f"Usage: portal {command} "), out[:100])

    def test_helpHasNoRunsOfSpaces(self) -> None:
        """
        No option's help text keeps the indentation of the docstring it came from.
        """
        options = PortalOptions()
        for name, _, parser, _ in options.subCommands:
            commandOptions = parser()
            for option, doc in commandOptions.docs.items():
                if doc:
                    self.assertNotIn("  ", doc, f"portal {name} --{option}")


class QuietConnectTests(SynchronousTestCase):
    """
    Tests for L{connectQuietly}.
    """

    def test_noFactoryNoise(self) -> None:
        """
        The protocol given is connected, and no factory start or stop is logged.
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]
        endpoint = _RecordingEndpoint()
        protocol = Protocol()
        d = connectQuietly(endpoint, protocol)
        self.assertIs(self.successResultOf(d), protocol)
        factory = endpoint.factory
        factory.doStart()
        factory.doStop()
        self.assertFalse(factory.noisy)
        self.assertEqual(list(events), [])


class _RecordingEndpoint:
    """
    A client endpoint that connects at once and keeps the factory it was given.
    """

    factory: Any

    def connect(self, factory: Any) -> Any:
        """
        @return: A fired L{Deferred} with the factory's protocol.
        """
        self.factory = factory
        return succeed(factory.buildProtocol(None))


class _SignalReactor:
    """
    Records the calls L{stopCleanlyOnSignals}' handlers make.
    """

    def __init__(self) -> None:
        self.calls: list[Any] = []

    def callFromThread(self, f: Any, *args: Any) -> None:
        """
        Record C{f}.
        """
        self.calls.append(f)

    def stop(self) -> None:
        """
        Stand for the reactor's stop.
        """


class SignalTests(SynchronousTestCase):
    """
    Tests for L{stopCleanlyOnSignals}.
    """

    def test_cleanStop(self) -> None:
        """
        SIGTERM and SIGINT stop the reactor like a clean stop (so twistd exits 0).
        """
        for number in (signal.SIGTERM, signal.SIGINT):
            self.addCleanup(signal.signal, number, signal.getsignal(number))
        reactor = _SignalReactor()
        stopCleanlyOnSignals(reactor)
        for number in (signal.SIGTERM, signal.SIGINT):
            handler = signal.getsignal(number)
            assert callable(handler)
            handler(number, None)
        self.assertEqual(reactor.calls, [reactor.stop, reactor.stop])


class _Client:
    """
    A fake of C{treq}'s C{get} that records the URLs it was asked for.
    """

    def __init__(self) -> None:
        self.urls: list[str] = []

    def get(self, url: str, **kwargs: Any) -> None:
        """
        Record C{url}.
        """
        self.urls.append(url)


class RelaysCACertTests(SynchronousTestCase):
    """
    C{portal relays --cacert}.
    """

    def test_bySchemeDispatch(self) -> None:
        """
        L{HTTPSWithCA} sends https URLs to the client trusting the CA, the others to the plain one.
        """
        https, plain = _Client(), _Client()
        client = HTTPSWithCA(https, plain)
        client.get("https://relay.example/r.json", unbuffered=True)
        client.get("http://127.0.0.1:8080/d.json")
        self.assertEqual(
            (https.urls, plain.urls),
            (["https://relay.example/r.json"], ["http://127.0.0.1:8080/d.json"]),
        )

    def test_plainRegistry(self) -> None:
        """
        C{--cacert} with an C{http://} registry is a usage error.
        """
        code, _, err = run(
            "relays", "--registry", "http://relay.example/r.json", "--cacert", "c.pem"
        )
        self.assertEqual(code, 2)
        self.assertIn("plain http://", err)
