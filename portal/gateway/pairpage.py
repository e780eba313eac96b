"""
What a browser is served to become a terminal: the pairing page and the terminal script.

The script (served at C{/.portal/terminal.js}) makes the browser's ECDSA P-256 key with WebCrypto
(C{extractable: false}, so the private key can be used by this origin's pages but never read out),
keeps it in IndexedDB, pairs with a code, and renews the session before it expires by signing a
fresh nonce (see L{portal.gateway.proof}).  On the pairing page it drives the form; an app may also
include it (C{<script src="/.portal/terminal.js" defer></script>}) to keep sessions renewed while
its pages are open.

The page loads nothing from anywhere else; its Content-Security-Policy allows only this script, its
own inline style (by hash) and requests to its own origin.
"""

from __future__ import annotations

import base64
import hashlib

#: The pairing page's style sheet (inline; allowed by its hash).
STYLE = """
body { font: 16px/1.5 system-ui, sans-serif; margin: 0; background: #f6f6f4; color: #1c1c1c; }
main { max-width: 28rem; margin: 3rem auto; padding: 1.5rem 2rem; background: #fff;
       border-radius: 8px; box-shadow: 0 1px 4px rgba(0, 0, 0, .12); }
h1 { font-size: 1.4rem; margin-top: 0; }
label { display: block; margin: 1rem 0 .25rem; font-weight: 600; }
input { width: 100%; box-sizing: border-box; font: inherit; padding: .4rem .5rem; }
#code { font-family: ui-monospace, monospace; letter-spacing: .15em; text-transform: uppercase; }
button { margin-top: 1.25rem; font: inherit; padding: .45rem 1.2rem; }
.error { color: #a4161a; }
code { font-family: ui-monospace, monospace; word-break: break-all; }
"""

#: The pairing page.  The elements' ids are what the script looks for.
PAGE = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>Pair this device</title>
<style>{STYLE}</style>
<script src="/.portal/terminal.js" defer></script>
</head>
<body>
<main id="portal-pair">
<h1>Pair this device</h1>
<p id="portal-status" role="status">Checking this browser&hellip;</p>
<form id="portal-form" hidden>
<p>Ask the app's owner to run <code>portal pair</code> and enter the code it prints.</p>
<label for="portal-code">Pairing code</label>
<input id="portal-code" name="code" required maxlength="16" autocomplete="one-time-code"
 autocapitalize="characters" spellcheck="false" placeholder="XXXX-XXXX">
<label for="portal-name">Name for this device (optional)</label>
<input id="portal-name" name="name" maxlength="64" placeholder="e.g. work laptop">
<button type="submit">Pair</button>
</form>
<noscript><p class="error">Pairing needs JavaScript.</p></noscript>
</main>
</body>
</html>
""".encode()

#: The terminal script.
SCRIPT = rb"""
"use strict";
(() => {
  const DB_NAME = "portal-terminal";
  const DB_STORE = "terminal";
  const RECORD = "self";
  // Renew this many seconds before the session expires; retry this soon after a failure.
  const MARGIN = 60;
  const RETRY = 15;

  const b64url = (buffer) => {
    let text = "";
    for (const byte of new Uint8Array(buffer)) text += String.fromCharCode(byte);
    return btoa(text).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  };

  const openDB = () => new Promise((resolve, reject) => {
    const request = indexedDB.open(DB_NAME, 1);
    request.onupgradeneeded = () => request.result.createObjectStore(DB_STORE);
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(request.error);
  });

  const withStore = async (mode, action) => {
    const db = await openDB();
    try {
      return await new Promise((resolve, reject) => {
        const tx = db.transaction(DB_STORE, mode);
        const request = action(tx.objectStore(DB_STORE));
        tx.oncomplete = () => resolve(request.result);
        tx.onerror = tx.onabort = () => reject(tx.error);
      });
    } finally {
      db.close();
    }
  };
  const load = () => withStore("readonly", (s) => s.get(RECORD));
  const save = (record) => withStore("readwrite", (s) => s.put(record, RECORD));
  const forget = () => withStore("readwrite", (s) => s.delete(RECORD));

  const post = async (path, body) => {
    const response = await fetch(path, {
      method: "POST",
      credentials: "same-origin",
      cache: "no-store",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(body || {}),
    });
    let answer = {};
    try { answer = await response.json(); } catch (e) { /* not JSON */ }
    if (!response.ok) {
      const error = new Error(answer.error || `HTTP ${response.status}`);
      error.reason = answer.reason;
      throw error;
    }
    return answer;
  };

  // Sign a fresh nonce for `purpose`, bound to this host.
  const prove = async (privateKey, purpose) => {
    const { nonce } = await post("/.portal/session/challenge");
    const message = `portal-terminal-v1\n${purpose}\n${location.host.toLowerCase()}\n${nonce}\n`;
    const signature = await crypto.subtle.sign(
      { name: "ECDSA", hash: "SHA-256" }, privateKey, new TextEncoder().encode(message));
    return { nonce, signature: b64url(signature) };
  };

  let timer = null;
  const schedule = (seconds) => {
    clearTimeout(timer);
    timer = setTimeout(() => { renew().catch(() => schedule(RETRY)); }, Math.max(seconds, 1) * 1000);
  };
  const started = async (record, answer) => {
    record.terminal = answer.terminal;
    record.name = answer.name;
    record.renewAt = Date.now() / 1000 + answer.ttl - MARGIN;
    await save(record);
    schedule(answer.ttl - MARGIN);
    return answer;
  };

  // Make this browser a terminal: a new non-extractable key, proven with the pairing code.
  const pair = async (code, name) => {
    const keys = await crypto.subtle.generateKey(
      { name: "ECDSA", namedCurve: "P-256" }, false, ["sign", "verify"]);
    const publicKey = b64url(await crypto.subtle.exportKey("spki", keys.publicKey));
    const proof = await prove(keys.privateKey, "pair");
    const answer = await post("/.portal/pair", { code, name, publicKey, ...proof });
    return started({ privateKey: keys.privateKey, publicKey: keys.publicKey }, answer);
  };

  // Get a fresh session by proving possession of the key; forget a revoked key.
  const renew = async () => {
    const record = await load();
    if (!record) return null;
    try {
      const proof = await prove(record.privateKey, "session");
      return await started(record, await post("/.portal/session", { terminal: record.terminal, ...proof }));
    } catch (error) {
      if (error.reason === "revoked" || error.reason === "unknown-terminal") {
        await forget();
        clearTimeout(timer);
      }
      throw error;
    }
  };

  // Renew now if the session is due, else when it will be.
  const keepRenewed = async () => {
    const record = await load();
    if (!record) return null;
    const due = record.renewAt - Date.now() / 1000;
    if (due > 0) { schedule(due); return record; }
    await renew();
    return load();
  };

  window.portalTerminal = { pair, renew, load, forget };

  const nextPath = () => {
    const next = new URLSearchParams(location.search).get("next");
    if (!next || !next.startsWith("/")) return null;
    const url = new URL(next, location.origin);
    return url.origin === location.origin ? url.pathname + url.search + url.hash : null;
  };

  const pairingPage = () => {
    const $ = (id) => document.getElementById(id);
    const status = $("portal-status");
    const form = $("portal-form");
    const next = nextPath();
    const say = (text, error) => {
      status.textContent = text;
      status.className = error ? "error" : "";
    };
    const paired = (record) => {
      if (next) { location.replace(next); return; }
      say(`This browser is paired as "${record.name}" (terminal ${record.terminal.slice(0, 12)}).`);
      form.hidden = true;
    };
    const ask = (text, error) => {
      say(text, error);
      form.hidden = false;
      $("portal-code").focus();
    };
    if (location.hash.length > 1) $("portal-code").value = decodeURIComponent(location.hash.slice(1));
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      say("Pairing\u2026");
      try {
        await pair($("portal-code").value, $("portal-name").value);
        paired(await load());
      } catch (error) {
        ask(`Pairing failed: ${error.message}`, true);
      }
    });
    // Whoever comes here wants a working session now: renew it whatever its age.
    load().then((record) => record ? renew().then(load) : null).then(
      (record) => record ? paired(record) : ask("This browser is not paired yet."),
      (error) => ask(`This browser's pairing no longer works: ${error.message}`, true));
  };

  if (document.getElementById("portal-pair")) {
    pairingPage();
  } else {
    keepRenewed().catch(() => schedule(RETRY));
  }
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible") keepRenewed().catch(() => schedule(RETRY));
  });
})();
"""


def _hashSource(content: str) -> bytes:
    """
    @return: The CSP hash source (C{'sha256-...'}) that allows inline C{content}.
    """
    digest = base64.b64encode(hashlib.sha256(content.encode("utf-8")).digest())
    return b"'sha256-" + digest + b"'"


#: The pairing page's Content-Security-Policy: nothing but the terminal script from this origin,
#: the inline style by hash, and requests to this origin; no forms posting anywhere, no framing.
PAGE_POLICY = (
    b"default-src 'none'; script-src 'self'; style-src "
    + _hashSource(STYLE)
    + b"; connect-src 'self'; img-src 'none'; form-action 'none'; frame-ancestors 'none'; "
    b"base-uri 'none'"
)
