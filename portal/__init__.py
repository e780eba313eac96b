"""
Portal: a permissionless tunnel network on Twisted.

Relays route visitors' TLS by SNI without decrypting it; tunnels hold leases on relays and terminate TLS
next to the local service they publish.
"""

__version__ = "0.1.0"
