"""
The sample site C{portal demo} publishes.
"""

from __future__ import annotations

from twisted.web.resource import Resource
from twisted.web.server import Request

PAGE = b"""<!doctype html>
<html lang="en">
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Hello from Portal</title>
<style>
  :root { color-scheme: light dark; --accent: #2f6fde; }
  body { margin: 0; min-height: 100vh; display: grid; place-items: center;
         font: 17px/1.55 system-ui, -apple-system, "Segoe UI", sans-serif;
         background: linear-gradient(135deg, #eef3fc, #f9fafb); color: #1d2433; }
  main { max-width: 38rem; margin: 2rem; padding: 2.2rem 2.5rem; border-radius: 14px;
         background: #fff; box-shadow: 0 10px 30px rgba(29, 36, 51, .12); }
  h1 { margin: 0 0 .8rem; font-size: 1.9rem; color: var(--accent); }
  ol { padding-left: 1.3rem; }
  li { margin: .35rem 0; }
  code { font: .92em ui-monospace, SFMono-Regular, Menlo, monospace; background: #eef3fc;
         padding: .1em .35em; border-radius: 4px; }
  footer { margin-top: 1.4rem; font-size: .85rem; color: #5b6475; }
  @media (prefers-color-scheme: dark) {
    body { background: linear-gradient(135deg, #111827, #1f2937); color: #e5e7eb; }
    main { background: #1b2230; box-shadow: none; }
    code { background: #263042; }
    footer { color: #9aa3b2; }
  }
</style>
<main>
  <h1>Hello from Portal</h1>
  <p>This page is served by a local web server on <code>127.0.0.1</code>. It reached you through:</p>
  <ol>
    <li>a Portal <strong>relay</strong>, which routed your TLS connection by its SNI without
      decrypting it;</li>
    <li>a Portal <strong>tunnel</strong>, which terminated TLS with a certificate from its own
      local CA, next to the service.</li>
  </ol>
  <p>Publish your own service with <code>portal expose 8000</code>.</p>
  <footer>portal demo &middot; Ctrl-C in its terminal stops it</footer>
</main>
</html>
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
