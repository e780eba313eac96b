"""
Tests that the parts plugged into the relay's router and into the tunnel's links provide the
interfaces they are known by (L{portal.relay.interfaces}, L{portal.tunnel.interfaces}).
"""

from __future__ import annotations

import io
import os

from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from portal.relay.data import RelayDataSession
from portal.relay.interfaces import (
    IDataSession,
    ILeasePorts,
    IPortLease,
    IUDPMode,
    IWaitingVisitor,
)
from portal.relay.leaseports import PortLease
from portal.relay.ports import PortAllocator, PortRange
from portal.relay.public import VisitorProtocol
from portal.relay.rawtcp import RawVisitor, tcpPorts
from portal.relay.router import Router
from portal.relay.udpmode import UDPMode
from portal.trust.identity import Identity
from portal.tunnel.config import buildConfig
from portal.tunnel.interfaces import IRelayLink, ITunnel
from portal.tunnel.link import RelayLink
from portal.tunnel.report import Reporter
from portal.tunnel.service import TunnelService


class RelayInterfacesTests(SynchronousTestCase):
    """
    The relay's data sessions, visitors and lease modes provide what the router relies on.
    """

    def setUp(self) -> None:
        """
        A router on a memory reactor.
        """
        self.clock = MemoryReactorClock()
        self.router = Router(Identity.generate(), self.clock)

    def test_dataSession(self) -> None:
        """
        A relay data session is an L{IDataSession}.
        """
        self.assertTrue(verifyObject(IDataSession, RelayDataSession(self.router)))

    def test_visitors(self) -> None:
        """
        A public TLS visitor and a raw TCP visitor are both L{IWaitingVisitor}s.
        """
        lease = PortLease(self.router, "id1", "app", "app.localhost", object(), 20000)
        self.assertTrue(verifyObject(IPortLease, lease))
        self.assertTrue(verifyObject(IWaitingVisitor, VisitorProtocol(self.router, Factory())))
        self.assertTrue(verifyObject(IWaitingVisitor, RawVisitor(lease)))

    def test_leaseModes(self) -> None:
        """
        Raw TCP mode's ports and UDP mode (with its ports) are what the router holds as
        C{router.tcp} and C{router.udp}.
        """
        tcp = tcpPorts(self.clock, PortAllocator(PortRange(20000, 20009), self.clock))
        udp = UDPMode(self.clock, PortAllocator(PortRange(30000, 30009), self.clock))
        self.assertTrue(verifyObject(ILeasePorts, tcp))
        self.assertTrue(verifyObject(IUDPMode, udp))
        self.assertTrue(verifyObject(ILeasePorts, udp.ports))


class TunnelInterfacesTests(SynchronousTestCase):
    """
    The tunnel service and its relay links provide what links and control sessions rely on.
    """

    def test_tunnelAndLink(self) -> None:
        """
        A L{TunnelService} is an L{ITunnel}, and each of its links a L{RelayLink} providing
        L{IRelayLink}.
        """
        directory = os.path.abspath(self.mktemp())
        config = buildConfig("8000", identityPath=os.path.join(directory, "identity.json"))
        tunnel = TunnelService(config, MemoryReactorClock(), Reporter(io.StringIO()), print)
        self.assertTrue(verifyObject(ITunnel, tunnel))
        [link] = tunnel.links
        self.assertIsInstance(link, RelayLink)
        self.assertTrue(verifyObject(IRelayLink, link))
