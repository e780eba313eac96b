"""
ACME certificates for the tunnel (C{--acme}): the settings, the client that orders certificates from
an ACME CA with the TLS-ALPN-01 challenge, and the service that keeps every lease hostname's
certificate issued and renewed. The challenge certificate and the storage are in L{portal.trust}.
"""
