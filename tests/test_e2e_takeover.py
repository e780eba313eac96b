"""
End to end: a second C{portal expose} of the same identity and name, without and with C{--takeover}.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase
from twisted.web.server import Site

from tests.realprocesses import (
    RecordingApp,
    homeDir,
    listenLocal,
    startRelay,
    startTunnel,
    waitForLease,
)


class TakeoverEndToEndTests(TestCase):
    """
    Only one tunnel serves a name; a second one says so, or takes it over when asked.
    """

    timeout = 120

    @inlineCallbacks
    def test_alreadyRunningThenTakeover(self) -> Any:
        """
        A second tunnel exits 1 saying one already runs; one with C{--takeover} gets the lease, and
        the first then exits 1 too, at its next renewal.
        """
        relayState = os.path.join(homeDir(self, "relay"), "state")
        _, _, controlPort = yield startRelay(self, relayState, extra=["--lease-ttl", "3"])
        port = yield listenLocal(self, Site(RecordingApp("app")))
        home = homeDir(self, "tunnel")
        first = startTunnel(self, home, controlPort, str(port), ["--name", "same"])
        yield waitForLease(first)
        second = startTunnel(self, home, controlPort, str(port), ["--name", "same"])
        code = yield second.ended
        self.assertEqual(code, 1, second.output())
        self.assertIn("already running: name 'same' is served by another tunnel", second.output())
        self.assertIn("--takeover", second.output())
        third = startTunnel(self, home, controlPort, str(port), ["--name", "same", "--takeover"])
        lease = yield waitForLease(third)
        self.assertTrue(lease["url"].startswith("https://same."), lease)
        code = yield first.ended
        self.assertEqual(code, 1, first.output())
        self.assertIn("already running", first.output())
        self.assertIsNone(third.exitCode)
