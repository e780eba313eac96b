"""
Moving bytes: the two-way splice between transports, the kernel splice, socket buffers, and the
rate limiting of repeated log events on the forwarding paths.

A bottom layer beside L{portal.trust}: it may import L{portal.wire}, nothing above.
"""
