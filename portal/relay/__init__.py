"""
The relay's services: SNI routing of public TLS, the control protocol's relay side, data sessions,
raw TCP and UDP ports, hops, the lease table and the relay's own site.

Above L{portal.wire}, L{portal.trust}, L{portal.forwarding} and L{portal.registry}; it never imports
the tunnel, the gateway or the command line.
"""
