"""
The C{twistd} plugins' options and C{makeService}: C{portal-relay} and C{portal-tunnel}.

The top layer, beside L{portal.cli}.
"""
