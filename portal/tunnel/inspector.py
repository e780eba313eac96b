"""
The request inspector of routed HTTP mode, like ngrok's C{http://127.0.0.1:4040}: a local web page
and a JSON API listing the requests the tunnel answered (method, path, status, duration, sizes,
route, client), each with its headers and bodies up to a cap, and replaying one to its upstream,
optionally edited.

L{Capture} collects one exchange's heads and bodies as the proxy forwards them (bounded by
L{BODY_CAP} each way); L{Inspector} keeps the last L{MAX_RECORDS} finished exchanges; L{InspectorPage}
serves them. Credentials are redacted (L{REDACTED_HEADERS}). The listener is on loopback unless the
user names another address; its API refuses requests whose C{Host} is not the listener's own (DNS
rebinding) and replays only on C{application/json} POSTs (which another site's page cannot send
without a CORS preflight, which this server never allows).
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Sequence
from typing import Any, cast

import attrs
import treq
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.web.client import Agent
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from portal.wire.httpheaders import HOP_BY_HOP

#: Requests kept, oldest forgotten first.
MAX_RECORDS = 200
#: Bytes of each body kept; the rest is counted, not kept.
BODY_CAP = 64 * 1024
#: Headers whose values are never shown: credentials of visitors, terminals and peers.
REDACTED_HEADERS = frozenset(
    {b"authorization", b"proxy-authorization", b"cookie", b"set-cookie", b"signature"}
)
#: The inspector's default address, and how many ports after it are tried when it is taken.
DEFAULT_ADDRESS = ("127.0.0.1", 4040)
PORT_ATTEMPTS = 10
#: Seconds a replay may take.
REPLAY_TIMEOUT = 30.0


class Capture:
    """
    What the inspector keeps of one exchange while it runs.

    @ivar requestBody: The request body's first L{BODY_CAP} bytes.
    @ivar requestSize: All the request body's bytes.
    @ivar responseBody: The response body's first L{BODY_CAP} bytes.
    @ivar responseSize: All the response body's bytes.
    @ivar responseHeaders: The response head's headers, once known.
    """

    def __init__(self) -> None:
        self.requestBody = bytearray()
        self.requestSize = 0
        self.responseBody = bytearray()
        self.responseSize = 0
        self.responseHeaders: list[tuple[bytes, bytes]] = []

    def request(self, data: bytes) -> None:
        """
        Keep request body bytes, up to the cap.
        """
        self.requestSize += len(data)
        _keep(self.requestBody, data)

    def head(self, headers: Sequence[tuple[bytes, bytes]]) -> None:
        """
        Keep the response's headers.
        """
        self.responseHeaders = list(headers)

    def response(self, data: bytes) -> None:
        """
        Keep response body bytes, up to the cap.
        """
        self.responseSize += len(data)
        _keep(self.responseBody, data)


def _keep(kept: bytearray, data: bytes) -> None:
    """
    Append to C{kept} what of C{data} fits under L{BODY_CAP}.
    """
    room = BODY_CAP - len(kept)
    if room > 0:
        kept += data[:room]


def _headers(headers: Sequence[tuple[bytes, bytes]]) -> list[list[str]]:
    """
    @return: Headers for JSON, credentials redacted.
    """
    return [
        [
            name.decode("latin-1"),
            "[redacted]" if name.lower() in REDACTED_HEADERS else value.decode("latin-1"),
        ]
        for name, value in headers
    ]


def _body(data: bytes, size: int) -> dict[str, Any]:
    """
    @return: A body for JSON: text when it is UTF-8, else hex; with its full size and whether it
        was cut.
    """
    try:
        text, encoding = data.decode("utf-8"), "text"
    except UnicodeDecodeError:
        text, encoding = data.hex(), "hex"
    return {"data": text, "encoding": encoding, "size": size, "truncated": size > len(data)}


@attrs.define(slots=True)
class Finished:
    """
    A finished exchange, as the proxy (or a replay) gives it to the inspector.

    @ivar client: The visitor's address (C{"replay"} for a replay).
    @ivar upstream: The route's upstream (host, port, TLS), or L{None} when none was chosen.
    @ivar upstreamPath: The request-target sent upstream.
    @ivar capture: Its heads and bodies; neither it nor C{requestHeaders} changes afterwards.
    @ivar replayOf: The record replayed, for a replay.
    """

    client: str
    method: bytes
    path: bytes
    version: str
    requestHeaders: Sequence[tuple[bytes, bytes]]
    status: int
    ms: float
    route: str | None
    upstream: tuple[str, int, bool] | None
    upstreamPath: str | None
    capture: Capture
    replayOf: int | None = None


class _Kept:
    """
    A finished exchange kept by L{Inspector.keep}, made into its record when first asked for (a
    busy tunnel keeps far more exchanges than anyone looks at).
    """

    __slots__ = ("id", "at", "_finished", "_record")

    def __init__(self, recordId: int, at: float, finished: Finished) -> None:
        """
        @param recordId: The record's id.
        @param at: When the exchange ended (seconds since the epoch).
        @param finished: The exchange.
        """
        self.id = recordId
        self.at = at
        self._finished: Finished | None = finished
        self._record: dict[str, Any] | None = None

    def record(self) -> dict[str, Any]:
        """
        @return: The JSON-ready record (made once), with private C{_replay} data.
        """
        if self._record is None:
            assert self._finished is not None
            self._record = _makeRecord(self.id, self.at, self._finished)
            self._finished = None
        return self._record


def _makeRecord(recordId: int, at: float, f: Finished) -> dict[str, Any]:
    """
    @return: The JSON-ready record of a finished exchange, with private C{_replay} data.
    """
    capture, upstream = f.capture, f.upstream
    return {
        "id": recordId,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at)),
        "client": f.client,
        "method": f.method.decode("latin-1"),
        "path": f.path.decode("latin-1"),
        "version": f.version,
        "status": f.status,
        "ms": round(f.ms, 2),
        "route": f.route,
        "upstream": None if upstream is None else f"{upstream[0]}:{upstream[1]}",
        "requestHeaders": _headers(f.requestHeaders),
        "requestBody": _body(bytes(capture.requestBody), capture.requestSize),
        "responseHeaders": _headers(capture.responseHeaders),
        "responseBody": _body(bytes(capture.responseBody), capture.responseSize),
        "replayOf": f.replayOf,
        "_replay": None
        if upstream is None or f.upstreamPath is None
        else {
            "upstream": upstream,
            "path": f.upstreamPath,
            "headers": [
                (n, v)
                for n, v in f.requestHeaders
                if n.lower() not in HOP_BY_HOP and n.lower() not in REDACTED_HEADERS
            ],
            "body": bytes(capture.requestBody)
            if capture.requestSize == len(capture.requestBody)
            else None,
        },
    }


class Inspector:
    """
    The finished exchanges of one tunnel, newest last.
    """

    _log = Logger()

    def __init__(self, clock: Any) -> None:
        """
        @param clock: The source of the current time.
        """
        self._clock = clock
        self._next = 1
        self._kept: deque[_Kept] = deque(maxlen=MAX_RECORDS)

    @property
    def records(self) -> list[dict[str, Any]]:
        """
        The kept records (JSON-ready dicts, with private C{_replay} data), oldest first.
        """
        return [kept.record() for kept in self._kept]

    def since(self, after: int) -> list[dict[str, Any]]:
        """
        @return: The kept records whose id is above C{after}, oldest first.
        """
        return [kept.record() for kept in self._kept if kept.id > after]

    def keep(self, finished: Finished) -> None:
        """
        Keep a finished exchange (what the proxy does for every one); its record is made when
        first asked for.
        """
        self._kept.append(_Kept(self._next, self._clock.seconds(), finished))
        self._next += 1

    def add(self, **fields: Any) -> dict[str, Any]:
        """
        Keep a finished exchange, given by the fields of L{Finished}.

        @return: Its record.
        """
        self.keep(Finished(**fields))
        return self._kept[-1].record()

    def find(self, recordId: int) -> dict[str, Any] | None:
        """
        @return: The record with this id, if still kept.
        """
        for kept in self._kept:
            if kept.id == recordId:
                return kept.record()
        return None

    async def replay(
        self, reactor: Any, record: dict[str, Any], edits: dict[str, Any]
    ) -> dict[str, Any]:
        """
        Send a recorded request to its upstream again, optionally edited, and keep the exchange.

        @param edits: C{method}, C{path} (the upstream request-target), C{headers} (a list of
            C{[name, value]}) and C{body} (text) to change.
        @return: The new record.
        @raise ValueError: When the request cannot be replayed, saying why.
        """
        replay = record["_replay"]
        if replay is None:
            raise ValueError("this request was not routed to an upstream")
        host, port, tls = replay["upstream"]
        if tls:
            raise ValueError("replaying to an https:// upstream is not available yet")
        method = str(edits.get("method", record["method"])).encode("latin-1")
        path = str(edits.get("path", replay["path"]))
        if not path.startswith("/"):
            raise ValueError("path must start with /")
        headers = replay["headers"]
        if "headers" in edits:
            headers = [
                (str(n).encode("latin-1"), str(v).encode("latin-1")) for n, v in edits["headers"]
            ]
        body = replay["body"]
        if "body" in edits:
            body = str(edits["body"]).encode("utf-8")
        if body is None:
            raise ValueError("the request body was larger than the inspector keeps; give one")
        sent = {n.lower() for n, _ in headers}
        outgoing: dict[bytes | str, list[bytes | str]] = {}
        for name, value in headers:
            if name.lower() not in (b"content-length", b"transfer-encoding"):
                outgoing.setdefault(name, []).append(value)
        if b"host" not in sent:
            outgoing[b"Host"] = [f"{host}:{port}".encode()]
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        started = reactor.seconds()
        client = treq.client.HTTPClient(Agent(reactor))
        capture = Capture()
        capture.request(body)
        d: Deferred[Any] = client.request(
            method.decode("latin-1"),
            f"http://{authority}{path}",
            headers=outgoing,
            data=body or None,
        )
        d.addTimeout(REPLAY_TIMEOUT, reactor)
        response = await d
        content = await treq.content(response)
        capture.head(
            [
                (name, value)
                for name, values in response.headers.getAllRawHeaders()
                for value in values
            ]
        )
        capture.response(content)
        self._log.info(
            "replayed request {id} to {upstream}: {status}",
            id=record["id"],
            upstream=authority,
            status=response.code,
        )
        self.keep(
            Finished(
                client="replay",
                method=method,
                path=path.encode("latin-1"),
                version="1.1",
                requestHeaders=headers,
                status=response.code,
                ms=(reactor.seconds() - started) * 1000,
                route=record["route"],
                upstream=(host, port, tls),
                upstreamPath=path,
                capture=capture,
                replayOf=record["id"],
            )
        )
        return self._kept[-1].record()


def public(record: dict[str, Any]) -> dict[str, Any]:
    """
    @return: A record without its private fields, for the API.
    """
    return {k: v for k, v in record.items() if not k.startswith("_")}


def summary(record: dict[str, Any]) -> dict[str, Any]:
    """
    @return: A record's list entry: no headers or bodies.
    """
    keys = ("id", "time", "client", "method", "path", "status", "ms", "route", "upstream")
    out = {k: record[k] for k in keys}
    out["requestSize"] = record["requestBody"]["size"]
    out["responseSize"] = record["responseBody"]["size"]
    out["replayOf"] = record["replayOf"]
    return out


class InspectorPage(Resource):
    """
    The inspector's web page and JSON API: C{GET /}, C{GET /api/requests[?after=ID]}, C{GET
    /api/requests/ID}, C{POST /api/requests/ID/replay} (JSON edits, possibly C{{}}).
    """

    isLeaf = True

    def __init__(self, reactor: Any, inspector: Inspector, hosts: Sequence[str]) -> None:
        """
        @param hosts: The C{Host} values this listener answers to.
        """
        super().__init__()
        self._reactor = reactor
        self._inspector = inspector
        self._hosts = frozenset(hosts)

    def render(self, request: Request) -> bytes | int:
        """
        Route a request of the page or the API.
        """
        host = (request.getHeader(b"host") or b"").decode("latin-1")
        if host not in self._hosts:
            return self._json(request, 421, {"error": "unknown host"})
        path = request.path.decode("latin-1").rstrip("/") or "/"
        parts = path.split("/")[1:]
        method = request.method
        if path == "/" and method == b"GET":
            request.setHeader(b"content-type", b"text/html; charset=utf-8")
            request.setHeader(
                b"content-security-policy",
                b"default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                b"connect-src 'self'",
            )
            return PAGE
        if parts[:2] != ["api", "requests"]:
            return self._json(request, 404, {"error": "not found"})
        if len(parts) == 2 and method == b"GET":
            after = int((request.args.get(b"after") or [b"0"])[0] or 0)
            records = [summary(r) for r in self._inspector.since(after)]
            return self._json(request, 200, {"requests": records})
        record = (
            self._inspector.find(int(parts[2])) if len(parts) > 2 and parts[2].isdigit() else None
        )
        if record is None:
            return self._json(request, 404, {"error": "no such request (kept: the last 200)"})
        if len(parts) == 3 and method == b"GET":
            return self._json(request, 200, public(record))
        if len(parts) == 4 and parts[3] == "replay" and method == b"POST":
            return self._replay(request, record)
        return self._json(request, 405, {"error": "method not allowed"})

    def _replay(self, request: Request, record: dict[str, Any]) -> bytes | int:
        """
        Replay C{record} with the JSON edits of the request body.
        """
        contentType = (request.getHeader(b"content-type") or b"").split(b";")[0].strip()
        if contentType != b"application/json":
            return self._json(request, 415, {"error": "send the edits as application/json"})
        try:
            edits = json.loads(request.content.read() or b"{}") if request.content else {}
            if not isinstance(edits, dict):
                raise ValueError("expected a JSON object")
        except ValueError as e:
            return self._json(request, 400, {"error": f"bad edits: {e}"})

        async def run() -> None:
            try:
                new = await self._inspector.replay(self._reactor, record, edits)
            except ValueError as e:
                request.write(self._json(request, 400, {"error": str(e)}))
            except Exception as e:
                request.write(self._json(request, 502, {"error": f"replay failed: {e}"}))
            else:
                request.write(self._json(request, 200, summary(new)))
            request.finish()

        Deferred.fromCoroutine(run())
        return NOT_DONE_YET

    def _json(self, request: Request, status: int, document: Any) -> bytes:
        """
        @return: C{document} as the JSON answer with C{status}.
        """
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(document).encode()


async def listenInspector(
    reactor: Any, inspector: Inspector, address: tuple[str, int], tryNext: bool
) -> IListeningPort:
    """
    Serve the inspector on C{address}, or with C{tryNext} on the first free one of the next
    L{PORT_ATTEMPTS} ports.

    @return: The listening port.
    @raise CannotListenError: When no port could be had.
    """
    host, port = address
    last: CannotListenError | None = None
    for candidate in range(port, port + (PORT_ATTEMPTS if tryNext and port else 1)):
        hostForHeader = f"[{host}]" if ":" in host else host
        interface = host.replace(":", "\\:")
        endpoint = serverFromString(reactor, f"tcp:{candidate}:interface={interface}")
        page = InspectorPage(reactor, inspector, [])
        site = Site(page)
        site.noisy = False
        try:
            listening: IListeningPort = await endpoint.listen(site)
        except CannotListenError as e:
            last = e
            continue
        bound = cast(IPv4Address | IPv6Address, listening.getHost()).port
        page._hosts = frozenset(
            {f"{hostForHeader}:{bound}", f"localhost:{bound}"}
            if host in ("127.0.0.1", "::1")
            else {f"{hostForHeader}:{bound}"}
        )
        return listening
    assert last is not None
    raise last


PAGE = b"""<!doctype html>
<html lang="en"><meta charset="utf-8"><title>Portal inspector</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body{margin:0;font:14px/1.45 system-ui,sans-serif;color:#1d2433;background:#f5f7fb}
 header{padding:.7rem 1rem;background:#1d2433;color:#fff;display:flex;gap:1rem;align-items:center}
 header h1{font-size:1rem;margin:0} input{padding:.3rem .5rem;border-radius:4px;border:1px solid #ccd}
 main{display:grid;grid-template-columns:minmax(0,1fr) minmax(0,1fr);height:calc(100vh - 3rem)}
 #list{overflow:auto;border-right:1px solid #dde} table{border-collapse:collapse;width:100%}
 td,th{padding:.3rem .5rem;text-align:left;border-bottom:1px solid #e6e9f0;white-space:nowrap}
 tr.row{cursor:pointer} tr.row:hover,tr.sel{background:#e8effd} .s4,.s5{color:#b3261e}
 #detail{overflow:auto;padding:1rem} pre{background:#fff;border:1px solid #e6e9f0;padding:.5rem;
 white-space:pre-wrap;word-break:break-all;max-height:20rem;overflow:auto} button{padding:.3rem .8rem}
 .note{color:#8a5a00}
</style>
<header><h1>Portal inspector</h1><input id="filter" placeholder="filter: method, path, status">
<span id="count"></span></header>
<main><div id="list"><table><thead><tr><th>time</th><th>client</th><th>method</th><th>path</th>
<th>status</th><th>ms</th><th>in</th><th>out</th><th>route</th></tr></thead><tbody id="rows"></tbody>
</table></div><div id="detail">Click a request to see it.</div></main>
<script>
"use strict";
let last = 0, rows = [], selected = null;
const esc = s => String(s).replace(/[&<>"']/g, c => ({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;","'":"&#39;"}[c]));
function show() {
  const f = document.getElementById("filter").value.toLowerCase();
  const body = document.getElementById("rows");
  const shown = rows.filter(r => !f || `${r.method} ${r.path} ${r.status}`.toLowerCase().includes(f));
  body.innerHTML = shown.slice().reverse().map(r =>
    `<tr class="row ${r.id === selected ? "sel" : ""}" data-id="${r.id}"><td>${esc(r.time.slice(11, 19))}</td>` +
    `<td>${esc(r.client)}</td><td>${esc(r.method)}</td><td class="path">${esc(r.path)}</td>` +
    `<td class="s${String(r.status)[0]}">${r.status}</td><td>${r.ms}</td><td>${r.requestSize}</td>` +
    `<td>${r.responseSize}</td><td>${esc(r.route || "")}</td></tr>`).join("");
  document.getElementById("count").textContent = `${rows.length} requests`;
}
function bodyHTML(b) {
  if (!b.size) return "<p>(empty)</p>";
  const note = b.truncated ? `<p class="note">${b.size} bytes; the first ${b.encoding === "hex" ? b.data.length / 2 : b.data.length} kept</p>` : "";
  return note + (b.encoding === "hex" ? "<p>binary, as hex:</p>" : "") + `<pre>${esc(b.data)}</pre>`;
}
const headersHTML = h => `<pre>${esc(h.map(([n, v]) => `${n}: ${v}`).join("\\n"))}</pre>`;
async function detail(id) {
  selected = id; show();
  const r = await (await fetch(`/api/requests/${id}`)).json();
  document.getElementById("detail").innerHTML =
    `<h2>${esc(r.method)} ${esc(r.path)} \\u2192 ${r.status}</h2>` +
    `<p>${esc(r.client)} \\u00b7 ${r.ms} ms \\u00b7 HTTP/${esc(r.version)} \\u00b7 route ${esc(r.route || "none")} \\u2192 ${esc(r.upstream || "")}` +
    `${r.replayOf ? ` \\u00b7 replay of #${r.replayOf}` : ""}</p>` +
    `<p><button id="replay">Replay</button> <button id="edit">Edit and replay</button></p><div id="editor"></div>` +
    `<h3>Request headers</h3>${headersHTML(r.requestHeaders)}<h3>Request body</h3>${bodyHTML(r.requestBody)}` +
    `<h3>Response headers</h3>${headersHTML(r.responseHeaders)}<h3>Response body</h3>${bodyHTML(r.responseBody)}`;
  document.getElementById("replay").onclick = () => replay(id, {});
  document.getElementById("edit").onclick = () => {
    document.getElementById("editor").innerHTML =
      `<p><input id="em" value="${esc(r.method)}" size="7"> <input id="ep" placeholder="upstream path" size="40"></p>` +
      `<textarea id="eb" rows="6" cols="60">${r.requestBody.encoding === "text" ? esc(r.requestBody.data) : ""}</textarea>` +
      `<p><button id="send">Send</button></p>`;
    document.getElementById("send").onclick = () => {
      const edits = {method: document.getElementById("em").value, body: document.getElementById("eb").value};
      const p = document.getElementById("ep").value; if (p) edits.path = p;
      replay(id, edits);
    };
  };
}
async function replay(id, edits) {
  const answer = await (await fetch(`/api/requests/${id}/replay`, {method: "POST",
    headers: {"content-type": "application/json"}, body: JSON.stringify(edits)})).json();
  if (answer.error) alert(answer.error); else { await poll(); detail(answer.id); }
}
async function poll() {
  try {
    const answer = await (await fetch(`/api/requests?after=${last}`)).json();
    for (const r of answer.requests) { rows.push(r); last = Math.max(last, r.id); }
    if (rows.length > 200) rows = rows.slice(-200);
    if (answer.requests.length) show();
  } catch (e) {}
}
document.getElementById("rows").onclick = e => { const tr = e.target.closest("tr"); if (tr) detail(+tr.dataset.id); };
document.getElementById("filter").oninput = show;
poll(); setInterval(poll, 1000);
</script>
</html>
"""


async def startInspector(
    reactor: Any,
    proxy: Any,
    reporter: Any,
    address: tuple[str, int],
    tryNext: bool,
) -> IListeningPort | None:
    """
    Give C{proxy} (an L{portal.tunnel.httpproxy.HTTPProxy}) an inspector and serve it, telling the
    user where (an C{inspector} event), or why not (a C{warning}: the tunnel runs on without it).

    @return: The listening port, or L{None} when it could not listen.
    """
    inspector = Inspector(reactor)
    try:
        listening = await listenInspector(reactor, inspector, address, tryNext)
    except CannotListenError as e:
        reporter.state(
            "warning", "", f"no request inspector: cannot listen on {e.interface}:{e.port}"
        )
        return None
    proxy.inspector = inspector
    bound = cast(IPv4Address | IPv6Address, listening.getHost())
    host = f"[{bound.host}]" if ":" in bound.host else bound.host
    url = f"http://{host}:{bound.port}"
    reporter.state("inspector", "", f"Inspect requests at {url}", url=url)
    reactor.addSystemEventTrigger("before", "shutdown", listening.stopListening)
    return listening
