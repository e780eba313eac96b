"""
The tunnel's services: relay links and the control protocol's tunnel side, data sessions, the
stream, routed HTTP (HTTP/1.1 and HTTP/2), raw TCP and UDP modes, pools of relays and the event
reporter.

Above the bottom layers, L{portal.registry} and L{portal.gateway}; it never imports the relay or the
command line.
"""
