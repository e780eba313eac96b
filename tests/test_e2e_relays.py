"""
End to end: C{portal relays --cacert} against a real relay whose descriptor is served over TLS on the
relay's own hostname, with a certificate from the relay's own CA.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from portal.registry.descriptor import DESCRIPTOR_PATH
from tests.realprocesses import homeDir, startRelay


class RelaysCACertTests(TestCase):
    """
    C{portal relays --cacert FILE}: https descriptors checked against the given CA.
    """

    timeout = 60

    @inlineCallbacks
    def test_relayOwnCA(self) -> Any:
        """
        A descriptor at C{https://localhost:PORT/...} signed by the relay's CA fails verification
        with the system's CAs, and is checked (ok) with C{--cacert STATE_DIR/tls/ca.pem}; a CA file
        that is not one is an error naming it.
        """
        home = homeDir(self, "relay")
        stateDir = os.path.join(home, "state")
        relay, publicPort, controlPort = yield startRelay(self, stateDir)
        serving = yield relay.waitFor(r"portal-relay ([a-z2-7]{52}) serving")
        registry = os.path.join(home, "relays.json")
        with open(registry, "w") as f:
            json.dump(
                {
                    "version": 1,
                    "relays": [
                        {
                            "address": f"127.0.0.1:{controlPort}",
                            "id": serving.group(1),
                            "modes": ["stream"],
                            "descriptor": f"https://localhost:{publicPort}{DESCRIPTOR_PATH}",
                        }
                    ],
                },
                f,
            )
        command = [sys.executable, "-m", "portal", "relays", "--registry", registry, "--json"]
        env = dict(os.environ, HOME=home, XDG_CONFIG_HOME=os.path.join(home, ".config"))
        out, err, code = yield getProcessOutputAndValue(command[0], command[1:], env=env)
        self.assertEqual(code, 0, err)
        self.assertNotEqual(json.loads(out)["descriptor"], "ok")
        ca = os.path.join(stateDir, "tls", "ca.pem")
        out, err, code = yield getProcessOutputAndValue(
            command[0], [*command[1:], "--cacert", ca], env=env
        )
        self.assertEqual(code, 0, err)
        self.assertEqual(json.loads(out)["descriptor"], "ok", out)
        out, err, code = yield getProcessOutputAndValue(
            command[0], [*command[1:], "--cacert", registry], env=env
        )
        self.assertEqual(code, 1)
        self.assertIn(f"--cacert: {registry} is not a PEM certificate", err.decode())
