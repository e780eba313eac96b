"""
The relay's dashboard on its own hostname: what the relay is doing, as a page that refreshes itself
and as JSON (C{/api/status}).

Everyone sees totals: uptime, version, tunnels, leases, visitors, traffic, refusals by reason and the
health of the data-session pools. The operator, who sends the relay's admin token
(C{--admin-token}) as C{Authorization: Bearer TOKEN}, also sees every lease and the recent events,
which name tenants and visitors' addresses. The page takes the token from its URL's fragment
(C{https://relay.example/#token=TOKEN}), which the browser never sends to a server.
"""

from __future__ import annotations

import hmac
import html
import json
from typing import Any

from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request

import portal
from portal.relay.events import MAX_EVENTS
from portal.relay.router import Router
from portal.trust.names import leaseHostname

#: Seconds between the page's refreshes.
REFRESH_SECONDS = 2

#: Counters that count a refused or dropped visitor, and the reason each stands for. Any other
#: counter whose name contains C{refused} is a refusal too, under its own name.
REFUSAL_REASONS: dict[str, str] = {
    "unknown": "no live lease for the name",
    "refused": "too many visitors waiting",
    "timeouts": "no data session in time",
    "hops_refused": "hop refused (destination not allowed or over the limit)",
    "admin_refused": "dashboard request with a wrong admin token",
}


def refusals(counters: dict[str, int], limits: dict[str, int] | None = None) -> dict[str, int]:
    """
    The refusal counters among C{counters}, and the refusals of the relay's limits, by reason.

    @param counters: Every counter of the relay (L{Router.allCounters}).
    @param limits: What the relay's limits refused, by reason (L{Router.limitRefusals}).
    @return: Counts by reason, in a stable order.
    """
    found = {reason: counters.get(name, 0) for name, reason in REFUSAL_REASONS.items()}
    for name in sorted(counters):
        if "refused" in name and name not in REFUSAL_REASONS:
            found[name] = counters[name]
    for reason, count in sorted((limits or {}).items()):
        found[reason] = found.get(reason, 0) + count
    return found


def _histogramMean(router: Router, name: str) -> float | None:
    """
    @return: The mean of a histogram of the relay's metrics, or L{None} before any observation.
    """
    registry = router.metrics.registry
    count = registry.get_sample_value(f"{name}_count")
    total = registry.get_sample_value(f"{name}_sum")
    if not count or total is None:
        return None
    return total / count


def _leaseRows(router: Router) -> list[dict[str, Any]]:
    """
    @return: One row per lease for the operator: owner, state, tunnel address and its data pool.
    """
    now = router.clock.seconds()
    rows = []
    for lease in router.leases.records():
        holder = lease.holder
        pool = getattr(holder, "pool", None)
        transport = getattr(holder, "transport", None)
        peer: Any = transport.getPeer() if transport is not None else None
        live = holder is not None and now < lease.expiresAt
        rows.append(
            {
                "name": lease.name,
                "hostname": leaseHostname(lease.name, router.tunnelDomain),
                "owner": lease.owner,
                "state": "live" if live else "reserved",
                "expiresIn": round(lease.expiresAt - now, 1),
                "mode": getattr(holder, "mode", None),
                "tunnel": f"{peer.host}:{peer.port}" if hasattr(peer, "port") else None,
                "idleDataSessions": len(pool) if pool is not None else 0,
                "waitingVisitors": pool.waiting if pool is not None else 0,
                "visitorsServed": pool.paired if pool is not None else 0,
            }
        )
    return rows


def relayStatus(router: Router, admin: bool = False) -> dict[str, Any]:
    """
    What the dashboard shows, as a JSON-serialisable object (documented in C{docs/operator-guide.md}).

    @param router: The relay's state.
    @param admin: Include the per-lease table and the recent events (for the operator only).
    @return: The status.
    """
    counters = router.allCounters()
    gauges = router.gauges()
    meanWait = _histogramMean(router, "portal_relay_data_wait_seconds")
    status: dict[str, Any] = {
        "relay": {
            "id": router.identity.id,
            "domain": router.relayDomain,
            "tunnelDomain": router.tunnelDomain,
            "version": portal.__version__,
            "uptime": round(gauges["uptime_seconds"], 1),
            "publicPort": router.publicPort,
            "controlPort": router.controlPort,
        },
        "tunnels": gauges["control_sessions"],
        "leases": {"recorded": gauges["leases"], "live": gauges["live_leases"]},
        "visitors": {
            "open": gauges["open_visitors"],
            "total": counters.get("visitors", 0) + counters.get("tcp_visitors", 0),
            "routed": counters.get("routed", 0),
        },
        "traffic": {
            "bytesToTunnels": counters.get("bytes_to_tunnels", 0),
            "bytesToVisitors": counters.get("bytes_to_visitors", 0),
        },
        "refusals": refusals(counters, router.limitRefusals()),
        "dataSessions": {
            "idle": gauges["idle_data_sessions"],
            "waitingVisitors": gauges["waiting_visitors"],
            "visitorsWhoWaited": counters.get("waited", 0),
            "waitTimeouts": counters.get("timeouts", 0),
            "meanWaitSeconds": None if meanWait is None else round(meanWait, 6),
            "kernelSpliced": counters.get("kernel_spliced", 0),
            "pythonSpliced": counters.get("python_spliced", 0),
            "sealedSpliced": counters.get("sealed_spliced", 0),
        },
        "counters": counters,
        "admin": admin,
    }
    if admin:
        status["leaseTable"] = _leaseRows(router)
        status["events"] = [event.toJSON() for event in router.events.recent(MAX_EVENTS)]
    return status


class AdminCheck:
    """
    Tells the operator's requests apart: they carry the relay's admin token as a bearer token.
    """

    _log = Logger()

    def __init__(self, router: Router, token: str | None) -> None:
        """
        @param router: The relay's state (its counters count refused tokens).
        @param token: The admin token, or L{None}: then nobody is the operator.
        """
        self._router = router
        self._token = token.encode("utf-8") if token else None

    def isAdmin(self, request: Request) -> bool:
        """
        @param request: A request to the dashboard.
        @return: Whether it carries the admin token. A wrong token is logged and counted.
        """
        header = request.getHeader(b"authorization")
        if header is None:
            return False
        scheme, _, given = header.partition(b" ")
        if (
            self._token is not None
            and scheme.lower() == b"bearer"
            and hmac.compare_digest(given.strip(), self._token)
        ):
            return True
        self._router.counters["admin_refused"] += 1
        self._log.warn(
            "refused a dashboard request from {peer}: {reason}",
            peer=getattr(request.getClientAddress(), "host", "?"),
            reason="wrong admin token" if self._token is not None else "no admin token is set",
        )
        return False


class StatusAPI(Resource):
    """
    C{/api/status}: L{relayStatus} as JSON; the operator's view with the admin token, else 401 when a
    wrong token is given.
    """

    isLeaf = True

    def __init__(self, router: Router, admin: AdminCheck) -> None:
        super().__init__()
        self._router = router
        self._admin = admin

    def render_GET(self, request: Request) -> bytes:
        """
        @return: The status as JSON.
        """
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        admin = self._admin.isAdmin(request)
        if request.getHeader(b"authorization") is not None and not admin:
            request.setResponseCode(401)
            request.setHeader(b"www-authenticate", b'Bearer realm="portal-relay"')
            return b'{"error": "wrong admin token"}\n'
        return json.dumps(relayStatus(self._router, admin)).encode("utf-8")


_STYLE = """
body{font:15px system-ui,sans-serif;margin:1.5em;color:#1d2330;background:#f6f7f9}
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.05em;margin:1.2em 0 .4em}
.sub{color:#5b6477;margin:0 0 1em}code{font-size:.9em}
.cards{display:flex;flex-wrap:wrap;gap:.7em}
.card{background:#fff;border:1px solid #dde1e8;border-radius:8px;padding:.6em .9em;min-width:8.5em}
.card b{display:block;font-size:1.5em}.card span{color:#5b6477;font-size:.85em}
table{border-collapse:collapse;background:#fff;font-size:.9em}
td,th{border:1px solid #dde1e8;padding:.25em .6em;text-align:left}
#events li{font-family:monospace;font-size:.85em;list-style:none}
.warn{color:#9a5b00}.error,.critical{color:#b3261e}
"""

_SCRIPT = """
const token = new URLSearchParams(location.hash.slice(1)).get("token");
const $ = (id) => document.getElementById(id);
function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + units[i];
}
function duration(s) {
  const d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600), m = Math.floor(s % 3600 / 60);
  return (d ? d + "d " : "") + (d || h ? h + "h " : "") + m + "m " + Math.floor(s % 60) + "s";
}
function rows(table, header, items) {
  table.replaceChildren();
  const head = table.insertRow();
  for (const name of header) { const th = document.createElement("th"); th.textContent = name; head.append(th); }
  for (const item of items) {
    const row = table.insertRow();
    for (const value of item) row.insertCell().textContent = value === null ? "-" : value;
  }
}
function render(s) {
  $("version").textContent = s.relay.version;
  $("uptime").textContent = duration(s.relay.uptime);
  $("tunnels").textContent = s.tunnels;
  $("leases").textContent = s.leases.live + " / " + s.leases.recorded;
  $("visitors").textContent = s.visitors.open + " / " + s.visitors.total;
  $("to-tunnels").textContent = bytes(s.traffic.bytesToTunnels);
  $("to-visitors").textContent = bytes(s.traffic.bytesToVisitors);
  rows($("refusals"), ["reason", "count"], Object.entries(s.refusals));
  const p = s.dataSessions;
  rows($("pool"), ["idle data sessions", "visitors waiting", "visitors who waited", "wait timeouts",
                   "mean wait", "kernel spliced", "python spliced", "sealed (raw TCP)"],
       [[p.idle, p.waitingVisitors, p.visitorsWhoWaited, p.waitTimeouts,
         p.meanWaitSeconds === null ? null : (p.meanWaitSeconds * 1000).toFixed(2) + " ms",
         p.kernelSpliced, p.pythonSpliced, p.sealedSpliced]]);
  $("admin").hidden = !s.admin;
  if (s.admin) {
    rows($("lease-table"), ["name", "state", "owner", "tunnel", "mode", "expires in", "idle", "waiting", "served"],
         s.leaseTable.map(l => [l.hostname, l.state, l.owner.slice(0, 12), l.tunnel, l.mode,
                                l.expiresIn + " s", l.idleDataSessions, l.waitingVisitors, l.visitorsServed]));
    const list = $("events");
    list.replaceChildren();
    for (const e of s.events.slice().reverse()) {
      const li = document.createElement("li");
      li.className = e.level;
      li.textContent = new Date(e.time * 1000).toISOString().slice(11, 19) + " " + e.level + " " + e.text;
      list.append(li);
    }
  }
}
async function refresh() {
  try {
    const r = await fetch("/api/status", {headers: token ? {Authorization: "Bearer " + token} : {}, cache: "no-store"});
    if (!r.ok) throw new Error("HTTP " + r.status);
    render(await r.json());
    $("updated").textContent = new Date().toISOString().slice(11, 19);
    $("state").textContent = "live";
  } catch (e) {
    $("state").textContent = "cannot refresh: " + e.message;
  }
}
render(JSON.parse($("initial").textContent));
refresh();
setInterval(refresh, REFRESH_MS);
"""


def dashboardPage(router: Router) -> bytes:
    """
    The dashboard's HTML, with the public status in it (readable without script; the script renders
    it, refreshes it every L{REFRESH_SECONDS} seconds, and asks for the operator's view when the URL
    carries the token).

    @param router: The relay's state.
    @return: The page.
    """
    status = relayStatus(router)
    # "</" cannot end the script element early once escaped.
    initial = json.dumps(status).replace("</", "<\\/")
    domain = html.escape(router.relayDomain)

    def card(id: str, label: str, value: object) -> str:
        return (
            f'<div class=card><b id="{id}">{html.escape(str(value))}</b><span>{label}</span></div>'
        )

    page = (
        "<!doctype html><html lang=en><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width,initial-scale=1">'
        f"<title>Portal relay {domain}</title><style>{_STYLE}</style>"
        f"<h1>Portal relay {domain}</h1>"
        f"<p class=sub>Identity <code>{html.escape(router.identity.id)}</code> · tunnel domain "
        f"<code>{html.escape(router.tunnelDomain)}</code> · portal "
        f'<span id="version">{html.escape(portal.__version__)}</span> · up '
        f'<span id="uptime">{status["relay"]["uptime"]:.0f} s</span> · '
        f'<span id="state">loading</span> <span id="updated"></span></p>'
        f'<p id="summary">{status["leases"]["recorded"]} leases, {status["tunnels"]} tunnels '
        "connected.</p>"
        "<div class=cards>"
        + card("tunnels", "tunnels connected", status["tunnels"])
        + card(
            "leases",
            "leases live / recorded",
            f"{status['leases']['live']} / {status['leases']['recorded']}",
        )
        + card(
            "visitors",
            "visitors open / total",
            f"{status['visitors']['open']} / {status['visitors']['total']}",
        )
        + card("to-tunnels", "to tunnels", status["traffic"]["bytesToTunnels"])
        + card("to-visitors", "to visitors", status["traffic"]["bytesToVisitors"])
        + "</div>"
        '<h2>Refusals by reason</h2><table id="refusals"></table>'
        '<h2>Data sessions</h2><table id="pool"></table>'
        '<section id="admin" hidden><h2>Leases</h2><table id="lease-table"></table>'
        '<h2>Recent events</h2><ul id="events"></ul></section>'
        '<p class=sub>JSON: <a href="/api/status">/api/status</a> · '
        '<a href="/metrics">/metrics</a> · <a href="/healthz">/healthz</a></p>'
        f'<script type="application/json" id="initial">{initial}</script>'
        f"<script>{_SCRIPT.replace('REFRESH_MS', str(REFRESH_SECONDS * 1000))}</script>"
    )
    return page.encode("utf-8")


class Dashboard(Resource):
    """
    The relay's root page: L{dashboardPage}.
    """

    def __init__(self, router: Router) -> None:
        super().__init__()
        self._router = router

    def getChild(self, path: bytes, request: Request) -> Resource:
        """
        Serve the dashboard at the root only.
        """
        if path == b"":
            return self
        child: Resource = Resource.getChild(self, path, request)
        return child

    def render_GET(self, request: Request) -> bytes:
        """
        @return: The dashboard page.
        """
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        # The page runs only its own inline script and talks only to this relay.
        request.setHeader(
            b"content-security-policy",
            b"default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
            b"connect-src 'self'; img-src 'self'",
        )
        return dashboardPage(self._router)
