"""
End to end: C{portal demo} in text mode, stopped with Ctrl-C (SIGINT) as a user stops it.
"""

from __future__ import annotations

import os
import re
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from tests.realprocesses import curl, startDemo


class DemoEndToEndTests(TestCase):
    """
    What a user of C{portal demo} sees.
    """

    timeout = 60

    @inlineCallbacks
    def test_styledPageAndCtrlC(self) -> Any:
        """
        The sample page is styled; Ctrl-C stops the demo with exit status 0 and a last line saying
        so, without claiming the tunnel reconnects.
        """
        home = os.path.abspath(self.mktemp())
        os.makedirs(home)
        demo = startDemo(self, home, ["--state-dir", os.path.join(home, "relay-state")])
        match = yield demo.waitFor(r"^\d\d:\d\d:\d\d Forwarding (https://\S+) -> ")
        ca = yield demo.waitFor(r"curl --cacert (\S+) ")
        lease = {"url": match.group(1), "ca": ca.group(1)}
        code, status, body, _, err = yield curl(lease, "/")
        self.assertEqual((code, status), (0, 200), err)
        self.assertIn(b"<style>", body)
        self.assertIn(b'name="viewport"', body)
        demo.signal("INT")
        code = yield demo.ended
        self.assertEqual(code, 0, demo.output())
        self.assertEqual(demo.lines[-1], "Stopped.", demo.output())
        self.assertIsNone(re.search("reconnect", demo.output()), demo.output())
