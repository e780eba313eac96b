"""
The HTTP gateway of routed HTTP mode: routes from a path prefix to a local service, and the app
gateway (per-path access from an C{app.json}, identity headers, paired terminals and peers).

Above the bottom layers; the tunnel's HTTP proxies use it, and it never imports the tunnel, the relay
or the command line.
"""
