"""
Tests for L{portal.tunnel.service.TunnelService} with C{--app}: the lease names, the gateway and how
authenticators and pages are plugged in.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from portal.gateway.signatures import PeerAuthenticator
from portal.tunnel.config import buildConfig
from portal.tunnel.report import Reporter
from portal.tunnel.service import TunnelService
from tests.test_access import FakeAuthenticator, FakePages
from tests.test_appjson import EXAMPLE


class AppServiceTests(SynchronousTestCase):
    """
    A tunnel service configured with two apps.
    """

    def setUp(self) -> None:
        """
        Write two app files and an identity path.
        """
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.apps = [self.appFile("alpha", "3000"), self.appFile("beta", "4000")]
        self.fatals: list[str] = []
        self.reporter = Reporter(io.StringIO(), asJSON=True)

    def appFile(self, name: str, port: str) -> str:
        """
        @return: The path of an app.json for app C{name} on C{port}.
        """
        path = os.path.join(self.directory, f"{name}.json")
        with open(path, "w") as f:
            json.dump(dict(EXAMPLE, name=name, routes={"/": port}), f)
        return path

    def service(self, **kw: Any) -> TunnelService:
        """
        @return: A tunnel service for the two apps.
        """
        config = buildConfig(
            None, apps=self.apps, identityPath=os.path.join(self.directory, "identity.json")
        )
        return TunnelService(config, MemoryReactorClock(), self.reporter, self.fatals.append, **kw)

    def test_labels(self) -> None:
        """
        Each app's name is a lease label, asked for on every relay.
        """
        tunnel = self.service()
        self.assertEqual(tunnel.labels, ["alpha", "beta"])
        self.assertEqual(tunnel.label, "alpha")
        self.assertEqual([link.labels for link in tunnel.links], [["alpha", "beta"]])

    def test_gateway(self) -> None:
        """
        The routed HTTP proxy gets the gateway, with both apps and the tunnel identity; without
        authenticators or pages given, it has the paired terminals' (from the terminal store in the
        state directory) and then the peers' (the contact list); the terminals' control socket and
        the local peer endpoint run with the tunnel.
        """
        tunnel = self.service()
        gateway = tunnel.gateway
        assert gateway is not None
        self.assertEqual(sorted(gateway.apps), ["alpha", "beta"])
        self.assertEqual(gateway.identityId, tunnel.identity.id)
        self.assertIs(gateway.clock, tunnel.reactor)
        assert tunnel.terminals is not None
        terminals, peers = gateway.authenticators
        self.assertIs(terminals, tunnel.terminals.authenticator)
        self.assertIsInstance(peers, PeerAuthenticator)
        self.assertIs(gateway.pages, tunnel.terminals.pages)
        self.assertEqual(
            sorted(type(service).__name__ for service in tunnel),
            ["LocalControlService", "PeerEndpointService", "RelayLink"],
        )
        self.assertIs(tunnel.httpProxy.gateway, gateway)
        self.assertIsNone(tunnel.httpProxy.table)
        self.assertEqual(sorted(tunnel.httpProxy.tables), ["alpha", "beta"])

    def test_plugIn(self) -> None:
        """
        Authenticators given to the service are asked after the terminals' and the peers', in order, and pages
        given replace the terminals'; more authenticators can be added later.
        """
        first, second = FakeAuthenticator("a", {}), FakeAuthenticator("b", {})
        pages = FakePages()
        tunnel = self.service(authenticators=[first, second], gatewayPages=pages)
        gateway = tunnel.gateway
        assert gateway is not None
        assert tunnel.terminals is not None
        terminals, peers = gateway.authenticators[:2]
        self.assertEqual(gateway.authenticators, [terminals, peers, first, second])
        self.assertIs(gateway.pages, pages)
        third = FakeAuthenticator("c", {})
        gateway.authenticators.append(third)
        self.assertEqual(gateway.authenticators, [terminals, peers, first, second, third])

    def test_leaseLines(self) -> None:
        """
        Each hostname's lease line names its own app as the target.
        """
        tunnel = self.service()
        [link] = tunnel.links
        link.registered(object(), ["alpha.localhost", "beta.localhost"], 8443)  # type: ignore[arg-type]
        leases = [e for e in self.reporter.events if e["event"] == "lease"]
        self.assertEqual(
            [(e["url"], e["target"]) for e in leases],
            [
                ("https://alpha.localhost:8443", "app alpha: /=127.0.0.1:3000"),
                ("https://beta.localhost:8443", "app beta: /=127.0.0.1:4000"),
            ],
        )

    def test_noApps(self) -> None:
        """
        Without C{--app} there is no gateway.
        """
        config = buildConfig(
            "3000", http=True, identityPath=os.path.join(self.directory, "identity.json")
        )
        tunnel = TunnelService(config, MemoryReactorClock(), self.reporter, self.fatals.append)
        self.assertIsNone(tunnel.gateway)
        self.assertIsNone(tunnel.httpProxy.gateway)


class AcmeServiceTests(SynchronousTestCase):
    """
    A tunnel service with C{--acme}: its certificates come from L{AcmeCertificates} once issued, and
    from the local CA until then.
    """

    def setUp(self) -> None:
        """
        A stream mode tunnel with C{--acme}.
        """
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.reporter = Reporter(io.StringIO(), asJSON=True)
        config = buildConfig(
            "3000",
            identityPath=os.path.join(self.directory, "identity.json"),
            acme="https://ca.test/dir",
        )
        self.tunnel = TunnelService(config, MemoryReactorClock(), self.reporter, [].append)
        acme = self.tunnel.acme
        assert acme is not None
        self.acme = acme
        self.wanted: list[str] = []
        self.patch(acme, "want", self.wanted.append)

    def test_accountKeyBesideIdentity(self) -> None:
        """
        The ACME account key is created beside the identity file, mode 0600, and the ACME service
        runs with the tunnel.
        """
        path = os.path.join(self.directory, "identity.acme-account.pem")
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        self.assertIn(self.acme, list(self.tunnel))

    def test_leaseWantsCertificate(self) -> None:
        """
        Each lease hostname a relay grants is handed to the ACME service, and its C{Forwarding}
        line says the local CA's certificate serves until one is issued.
        """
        [link] = self.tunnel.links
        link.registered(object(), ["a.portal.test", "b.portal.test"], 443)  # type: ignore[arg-type]
        self.assertEqual(self.wanted, ["a.portal.test", "b.portal.test"])
        leases = [e for e in self.reporter.events if e["event"] == "lease"]
        self.assertEqual([e["certificate"] for e in leases], ["local-ca", "local-ca"])

    def test_issuedCertificateServes(self) -> None:
        """
        A hostname with an issued certificate is served with it; others with the local CA's.
        """
        [link] = self.tunnel.links
        link.registered(object(), ["a.portal.test", "b.portal.test"], 443)  # type: ignore[arg-type]
        issued = self.tunnel._certificateFor("b.portal.test")
        self.patch(
            self.acme,
            "certificateFor",
            lambda hostname: issued if hostname == "a.portal.test" else None,
        )
        self.assertIs(self.tunnel._certificateFor("a.portal.test"), issued)
        self.assertIsNot(self.tunnel._certificateFor("b.portal.test"), issued)
