"""
The sample site C{portal demo} publishes.
"""

from __future__ import annotations

from twisted.web.resource import Resource
from twisted.web.server import Request

PAGE = b"""<!doctype html>
<meta charset="utf-8">
<title>Hello from Portal</title>
<h1>Hello from Portal</h1>
<p>This page is served by a local web server on 127.0.0.1, reached through a Portal relay (which routed
your TLS connection by its SNI without decrypting it) and a Portal tunnel (which terminated TLS with a
certificate from its own local CA).</p>
"""


class SampleSite(Resource):
    """
    A one-page site.
    """

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        """
        @return: The page.
        """
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return PAGE
