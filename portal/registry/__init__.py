"""
Relay registries: the registry document and rendezvous ranking, the relays' signed descriptors, and
health checks of registry relays.

Above L{portal.wire}, L{portal.trust} and L{portal.forwarding}; used by the relay and the tunnel,
never importing them.
"""
