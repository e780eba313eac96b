"""
Moving bytes: the two-way splice between transports, the kernel splice, socket buffers, and the
rate limiting of repeated log events on the forwarding paths; and the limits on them: token buckets,
source addresses as limits count them, connection caps, bandwidth pacing and refusal counts.

A bottom layer beside L{portal.trust}: it may import L{portal.wire}, nothing above.
"""
