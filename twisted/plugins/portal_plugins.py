"""
Twisted plugins: C{twistd portal-relay} and C{twistd portal-tunnel}.
"""

from twisted.application.service import ServiceMaker

portalRelay = ServiceMaker(
    "Portal relay", "portal.tap.relay", "An SNI-routing relay for Portal tunnels.", "portal-relay"
)
portalTunnel = ServiceMaker(
    "Portal tunnel",
    "portal.tap.tunnel",
    "Expose a local service through Portal relays.",
    "portal-tunnel",
)
