"""
The image's HEALTHCHECK: GET C{PORTAL_HEALTH_URL} (default the relay's C{/healthz} on its plain-HTTP
listener); exit 0 when it answers 200, 1 otherwise.
"""

import os
import sys
import urllib.request

url = os.environ.get("PORTAL_HEALTH_URL", "http://127.0.0.1:8080/healthz")
try:
    with urllib.request.urlopen(url, timeout=4) as response:
        sys.exit(0 if response.status == 200 else 1)
except OSError as e:
    print(f"{url}: {e}", file=sys.stderr)
    sys.exit(1)
