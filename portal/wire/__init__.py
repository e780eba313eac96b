"""
What crosses a link, as pure code: the TLS ClientHello parser and the peek wrapper, the control
protocol's AMP commands, the data-session attach, the PROXY header, UDP sealing, HTTP header rules,
and the server side of HTTP/2 with its header compression.

The bottom layer: it imports nothing else from C{portal} (the root package's version aside).
"""
