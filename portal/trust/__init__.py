"""
Who is who: secp256k1 identities, registration challenges, relay addresses and the relay's proof of
identity at Hello, pinning of relay identities, the local CA, lease names, and private files.

A bottom layer beside L{portal.forwarding}: it may import L{portal.wire}, nothing above.
"""
