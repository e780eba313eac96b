"""
Tests for L{portal.gateway.terminalpages} (and L{portal.gateway.terminalaccess}, which puts them
together with the authenticator): the pairing page and script, challenges, pairing and session
renewal, at the level of L{GatewayRequest} and L{GatewayResponse}.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import sqlite3
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from portal.gateway.caller import AuthenticationFailed, Caller, GatewayRequest, GatewayResponse
from portal.gateway.pairing import ATTEMPTS_PER_ADDRESS
from portal.gateway.pairpage import PAGE, PAGE_POLICY, SCRIPT, STYLE
from portal.gateway.proof import (
    NONCE_TTL,
    PURPOSE_PAIR,
    PURPOSE_SESSION,
    encode,
    proofMessage,
)
from portal.gateway.sessions import SESSION_COOKIE, SESSION_TTL
from portal.gateway.terminalaccess import TerminalAccess, storePath
from portal.gateway.terminalclient import TerminalKey
from portal.gateway.terminalpages import MAX_BODY

HOST = b"app.example:8443"


def headers(response: GatewayResponse) -> dict[bytes, bytes]:
    """
    @return: The response's headers as a dictionary (the tests' responses repeat none).
    """
    return dict(response.headers)


class Visitor:
    """
    A browser or command-line terminal talking to the pages, with its own key.
    """

    def __init__(
        self, test: TerminalPagesTests, address: str = "192.0.2.1", host: bytes = HOST
    ) -> None:
        self.test = test
        self.address = address
        self.host = host
        self.key = TerminalKey.generate()
        self.cookie: bytes | None = None

    def request(
        self,
        method: bytes,
        path: bytes,
        body: bytes | None = None,
        extra: tuple[tuple[bytes, bytes], ...] = (),
        contentType: bytes = b"application/json",
    ) -> GatewayResponse:
        """
        Send a request to the pages and return their answer.
        """
        sent = [(b"content-type", contentType), *extra]
        if self.cookie is not None:
            sent.append((b"cookie", self.cookie))
        req = GatewayRequest(method, self.host, path, tuple(sent), body, (self.address, 4000))
        response = self.test.successResultOf(self.test.access.pages.render(req))
        assert isinstance(response, GatewayResponse)
        cookie = headers(response).get(b"set-cookie")
        if cookie is not None:
            self.cookie = cookie.partition(b";")[0]
        return response

    def post(self, path: bytes, document: dict[str, Any], **kw: Any) -> GatewayResponse:
        """
        POST a JSON document.
        """
        return self.request(b"POST", path, json.dumps(document).encode(), **kw)

    def nonce(self) -> str:
        """
        @return: A fresh nonce from the challenge endpoint.
        """
        response = self.post(b"/.portal/session/challenge", {})
        self.test.assertEqual(response.status, 200)
        nonce = json.loads(response.body)["nonce"]
        assert isinstance(nonce, str)
        return nonce

    def proof(
        self, purpose: str, nonce: str | None = None, host: str | None = None, key: Any = None
    ) -> dict[str, str]:
        """
        @return: The proof fields for C{purpose}, over a fresh nonce unless one is given.
        """
        nonce = nonce if nonce is not None else self.nonce()
        host = host if host is not None else self.host.decode().lower()
        signer = key if key is not None else self.key
        return {
            "nonce": nonce,
            "signature": encode(signer.sign(proofMessage(purpose, host, nonce))),
        }

    def pair(self, code: str, name: str | None = None, **changes: Any) -> GatewayResponse:
        """
        Pair with C{code}; C{changes} replace or add fields of the request.
        """
        document: dict[str, Any] = {"code": code, "publicKey": encode(self.key.publicKey)}
        if name is not None:
            document["name"] = name
        document.update(self.proof(PURPOSE_PAIR))
        document.update(changes)
        return self.post(b"/.portal/pair", document)

    def renew(self, **changes: Any) -> GatewayResponse:
        """
        Renew the session; C{changes} replace or add fields of the request.
        """
        document: dict[str, Any] = {"terminal": self.key.id, **self.proof(PURPOSE_SESSION)}
        document.update(changes)
        return self.post(b"/.portal/session", document)

    def caller(self) -> Caller | None:
        """
        @return: Who the authenticator says this visitor is, on a request to the app.
        """
        req = GatewayRequest(
            b"GET",
            self.host,
            b"/private",
            ((b"cookie", self.cookie),) if self.cookie else (),
            None,
            (self.address, 4000),
        )
        result = self.test.successResultOf(self.test.access.authenticator.authenticate(req))
        assert result is None or isinstance(result, Caller)
        return result

    def refused(self) -> AuthenticationFailed:
        """
        @return: The authenticator's refusal of this visitor's request to the app.
        """
        req = GatewayRequest(
            b"GET", self.host, b"/private", ((b"cookie", self.cookie or b""),), None, ("h", 1)
        )
        failure = self.test.failureResultOf(
            self.test.access.authenticator.authenticate(req), AuthenticationFailed
        )
        assert isinstance(failure.value, AuthenticationFailed)
        return failure.value


class TerminalPagesTests(SynchronousTestCase):
    """
    Tests for L{TerminalPages}.
    """

    def setUp(self) -> None:
        """
        A tunnel's terminals, on a fake clock, with a fresh store.
        """
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.stateDir = self.mktemp()
        self.access = TerminalAccess.open(self.clock, self.stateDir)
        self.addCleanup(self.access.close)
        self.visitor = Visitor(self)

    def answer(self, response: GatewayResponse, status: int, reason: str | None = None) -> Any:
        """
        Check a JSON answer's status (and refusal reason).

        @return: Its document.
        """
        self.assertEqual(
            (response.status, headers(response)[b"content-type"]),
            (status, b"application/json"),
            response.body,
        )
        document = json.loads(response.body)
        if reason is not None:
            self.assertEqual(document["reason"], reason)
            self.assertIsInstance(document["error"], str)
        return document

    def test_storeInStateDir(self) -> None:
        """
        The store is C{terminals.sqlite3} in the state directory.
        """
        self.assertEqual(storePath(self.stateDir), os.path.join(self.stateDir, "terminals.sqlite3"))
        self.assertTrue(os.path.exists(storePath(self.stateDir)))

    def test_page(self) -> None:
        """
        The pairing page is HTML that loads only the terminal script from its own origin, under
        a strict Content-Security-Policy, not framed, not cached.
        """
        response = self.visitor.request(b"GET", b"/.portal/pair")
        self.assertEqual(response.status, 200)
        h = headers(response)
        self.assertEqual(h[b"content-type"], b"text/html; charset=utf-8")
        self.assertEqual(h[b"content-security-policy"], PAGE_POLICY)
        self.assertEqual(h[b"x-frame-options"], b"DENY")
        self.assertEqual(h[b"cache-control"], b"no-store")
        self.assertEqual(h[b"x-content-type-options"], b"nosniff")
        self.assertEqual(response.body, PAGE)
        self.assertIn(b'<script src="/.portal/terminal.js" defer></script>', PAGE)
        self.assertEqual(re.findall(rb"(?:src|href)=\"([^\"]*)\"", PAGE), [b"/.portal/terminal.js"])
        self.assertNotIn(b"http", PAGE.lower().replace(b"http-equiv", b""))
        for element in [b"portal-pair", b"portal-status", b"portal-form", b"portal-code"]:
            self.assertIn(b'id="' + element + b'"', PAGE)

    def test_policy(self) -> None:
        """
        The policy allows nothing by default, scripts from the origin only (no inline script),
        the page's inline style by its hash, and requests to the origin.
        """
        directives = dict(d.strip().split(b" ", 1) for d in PAGE_POLICY.split(b";"))
        self.assertEqual(directives[b"default-src"], b"'none'")
        self.assertEqual(directives[b"script-src"], b"'self'")
        self.assertEqual(directives[b"connect-src"], b"'self'")
        self.assertEqual(directives[b"frame-ancestors"], b"'none'")
        self.assertEqual(directives[b"form-action"], b"'none'")
        (inline,) = re.findall(rb"<style>(.*?)</style>", PAGE, re.S)
        self.assertEqual(inline, STYLE.encode())
        digest = base64.b64encode(hashlib.sha256(inline).digest())
        self.assertEqual(directives[b"style-src"], b"'sha256-" + digest + b"'")
        self.assertNotIn(b"<script>", PAGE)

    def test_head(self) -> None:
        """
        HEAD answers like GET, without the body.
        """
        response = self.visitor.request(b"HEAD", b"/.portal/pair")
        self.assertEqual((response.status, response.body), (200, b""))
        self.assertEqual(headers(response)[b"content-security-policy"], PAGE_POLICY)

    def test_script(self) -> None:
        """
        The terminal script makes a non-extractable P-256 key, keeps it in IndexedDB, and signs
        exactly the message the tunnel checks.
        """
        response = self.visitor.request(b"GET", b"/.portal/terminal.js?v=1")
        self.assertEqual(response.status, 200)
        self.assertEqual(headers(response)[b"content-type"], b"text/javascript; charset=utf-8")
        self.assertEqual(response.body, SCRIPT)
        script = SCRIPT.decode()
        self.assertRegex(
            script,
            r'generateKey\(\s*\{ name: "ECDSA", namedCurve: "P-256" \}, false, \["sign", "verify"\]\)',
        )
        self.assertIn("indexedDB.open", script)
        self.assertIn(
            "`portal-terminal-v1\\n${purpose}\\n${location.host.toLowerCase()}\\n${nonce}\\n`",
            script,
        )
        self.assertIn('exportKey("spki"', script)
        self.assertTrue(SCRIPT.isascii())

    def test_notFound(self) -> None:
        """
        Other paths under C{/.portal/} are 404.
        """
        for path in [b"/.portal/", b"/.portal/pairx", b"/.portal/session/other", b"/.portal/peer"]:
            self.answer(self.visitor.request(b"GET", path), 404, "not-found")

    def test_methodNotAllowed(self) -> None:
        """
        A method a page does not take is 405, with the methods it takes.
        """
        response = self.visitor.request(b"DELETE", b"/.portal/pair")
        self.answer(response, 405, "method")
        self.assertEqual(headers(response)[b"allow"], b"GET, HEAD, POST")
        response = self.visitor.request(b"GET", b"/.portal/session")
        self.assertEqual(headers(response)[b"allow"], b"POST")

    def test_challenge(self) -> None:
        """
        The challenge endpoint gives a fresh nonce and its lifetime, by POST or GET, uncached.
        """
        response = self.visitor.post(b"/.portal/session/challenge", {})
        document = self.answer(response, 200)
        self.assertEqual(document["ttl"], NONCE_TTL)
        self.assertEqual(headers(response)[b"cache-control"], b"no-store")
        other = self.answer(self.visitor.request(b"GET", b"/.portal/session/challenge"), 200)
        self.assertNotEqual(document["nonce"], other["nonce"])

    def test_pair(self) -> None:
        """
        A visitor with a code and a proof of its key becomes a terminal whose id is its key's,
        gets a session cookie, and is that terminal on its next request to the app.
        """
        code = self.access.issueCode().code
        self.assertIsNone(self.visitor.caller())
        document = self.answer(self.visitor.pair(code, "laptop"), 200)
        self.assertEqual(document["terminal"], self.visitor.key.id)
        self.assertEqual(document["name"], "laptop")
        self.assertEqual(document["ttl"], SESSION_TTL)
        self.assertEqual(document["expires"], 1_700_000_000 + SESSION_TTL)
        (terminal,) = self.access.list()
        self.assertEqual((terminal.id, terminal.name), (self.visitor.key.id, "laptop"))
        self.assertEqual(terminal.publicKey, self.visitor.key.publicKey)
        self.assertEqual(self.visitor.caller(), Caller("terminal", self.visitor.key.id, "laptop"))

    def test_pairCookie(self) -> None:
        """
        The session comes as an C{HttpOnly}, C{Secure}, C{SameSite=Strict} C{__Host-} cookie.
        """
        response = self.visitor.pair(self.access.issueCode().code)
        cookie = headers(response)[b"set-cookie"]
        self.assertTrue(cookie.startswith(SESSION_COOKIE + b"=1." + self.visitor.key.id.encode()))
        for attribute in [b"Path=/", b"Max-Age=300", b"Secure", b"HttpOnly", b"SameSite=Strict"]:
            self.assertIn(b"; " + attribute, cookie)

    def test_names(self) -> None:
        """
        The name the owner gave with the code wins over the device's; without either, the
        terminal is named after its id.
        """
        code = self.access.issueCode("Anna's phone").code
        self.assertEqual(
            self.answer(self.visitor.pair(code, "iPhone"), 200)["name"], "Anna's phone"
        )
        other = Visitor(self)
        document = self.answer(other.pair(self.access.issueCode().code), 200)
        self.assertEqual(document["name"], f"terminal {other.key.id[:12]}")
        bad = Visitor(self)
        self.answer(bad.pair(self.access.issueCode().code, "a\nb"), 400, "bad-request")

    def test_codeSingleUse(self) -> None:
        """
        A code pairs one terminal; a second device with the same code is refused.
        """
        code = self.access.issueCode().code
        self.answer(self.visitor.pair(code), 200)
        other = Visitor(self, "192.0.2.2")
        self.answer(other.pair(code), 403, "wrong-code")
        self.assertEqual(len(self.access.list()), 1)

    def test_codeExpired(self) -> None:
        """
        A code is refused 10 minutes after it was issued.
        """
        code = self.access.issueCode().code
        self.clock.advance(600)
        self.answer(self.visitor.pair(code), 403, "wrong-code")
        self.assertEqual(self.access.list(), [])

    def test_wrongCode(self) -> None:
        """
        A wrong code is refused and the right one still works afterwards.
        """
        code = self.access.issueCode().code
        self.answer(self.visitor.pair("0000-0000"), 403, "wrong-code")
        self.answer(self.visitor.pair(code), 200)

    def test_rateLimited(self) -> None:
        """
        After 5 wrong codes a visitor is refused with 429 and C{Retry-After}, even with the
        right code, until a minute has passed; other visitors are not.
        """
        code = self.access.issueCode().code
        for _ in range(ATTEMPTS_PER_ADDRESS):
            self.answer(self.visitor.pair("0000-0000"), 403, "wrong-code")
        response = self.visitor.pair(code)
        self.answer(response, 429, "rate-limited")
        self.assertEqual(headers(response)[b"retry-after"], b"60")
        # Refused before its proof is looked at: the nonce it used is still good.
        self.assertEqual(len(self.access.pages._nonces), 1)
        self.clock.advance(60)
        self.answer(self.visitor.pair(code), 200)

    def test_otherAddressNotLimited(self) -> None:
        """
        One visitor's wrong codes do not lock out another one.
        """
        code = self.access.issueCode().code
        for _ in range(ATTEMPTS_PER_ADDRESS):
            self.visitor.pair("0000-0000")
        self.answer(Visitor(self, "198.51.100.7").pair(code), 200)

    def test_replayedNonce(self) -> None:
        """
        A proof over a nonce that was already used is refused.
        """
        nonce = self.visitor.nonce()
        proof = self.visitor.proof(PURPOSE_PAIR, nonce)
        self.answer(self.visitor.pair(self.access.issueCode().code, **proof), 200)
        other = Visitor(self)
        code = self.access.issueCode().code
        self.answer(other.pair(code, **other.proof(PURPOSE_PAIR, nonce)), 401, "challenge")
        self.answer(other.pair(code), 200)

    def test_unknownNonce(self) -> None:
        """
        A nonce the tunnel never issued is refused.
        """
        proof = self.visitor.proof(PURPOSE_PAIR, encode(b"x" * 32))
        self.answer(self.visitor.pair(self.access.issueCode().code, **proof), 401, "challenge")

    def test_expiredNonce(self) -> None:
        """
        A nonce answered more than a minute after it was issued is refused.
        """
        proof = self.visitor.proof(PURPOSE_PAIR)
        self.clock.advance(NONCE_TTL + 1)
        self.answer(self.visitor.pair(self.access.issueCode().code, **proof), 401, "challenge")

    def test_wrongKey(self) -> None:
        """
        A signature by another key than the one presented is refused, and the code is not used
        up.
        """
        code = self.access.issueCode().code
        proof = self.visitor.proof(PURPOSE_PAIR, key=TerminalKey.generate())
        self.answer(self.visitor.pair(code, **proof), 401, "bad-signature")
        self.answer(self.visitor.pair(code), 200)

    def test_otherHost(self) -> None:
        """
        A signature made for another host is refused.
        """
        proof = self.visitor.proof(PURPOSE_PAIR, host="evil.example:8443")
        self.answer(self.visitor.pair(self.access.issueCode().code, **proof), 401, "bad-signature")

    def test_otherPurpose(self) -> None:
        """
        A session renewal's signature cannot pair.
        """
        proof = self.visitor.proof(PURPOSE_SESSION)
        self.answer(self.visitor.pair(self.access.issueCode().code, **proof), 401, "bad-signature")

    def test_revokedKeyCannotPairAgain(self) -> None:
        """
        A revoked terminal's key is refused even with a new code, which stays usable.
        """
        self.visitor.pair(self.access.issueCode().code)
        self.access.revoke(self.visitor.key.id)
        code = self.access.issueCode().code
        self.answer(self.visitor.pair(code), 403, "revoked")
        self.answer(Visitor(self).pair(code), 200)

    def test_crossOrigin(self) -> None:
        """
        A request from another site's page is refused; one from the app's own origin is not.
        """
        code = self.access.issueCode().code
        evil = ((b"origin", b"https://evil.example"),)
        self.answer(
            self.visitor.post(b"/.portal/pair", {"code": code}, extra=evil), 403, "cross-origin"
        )
        self.answer(self.visitor.post(b"/.portal/session", {}, extra=evil), 403, "cross-origin")
        own = ((b"origin", b"https://" + HOST),)
        document = {"code": code, "publicKey": encode(self.visitor.key.publicKey)}
        document.update(self.visitor.proof(PURPOSE_PAIR))
        self.answer(self.visitor.post(b"/.portal/pair", document, extra=own), 200)

    def test_malformed(self) -> None:
        """
        Bodies that are not JSON objects, not declared JSON, too large, or lack fields are
        refused with 4xx, and are not counted as wrong codes.
        """
        v = self.visitor
        self.answer(v.request(b"POST", b"/.portal/pair", b"{}", contentType=b"text/plain"), 415)
        self.answer(v.request(b"POST", b"/.portal/pair", b"x" * (MAX_BODY + 1)), 413)
        self.answer(v.request(b"POST", b"/.portal/pair", b"{nope"), 400, "bad-request")
        self.answer(v.request(b"POST", b"/.portal/pair", b"[1]"), 400, "bad-request")
        self.answer(v.request(b"POST", b"/.portal/pair", None), 400, "bad-request")
        self.answer(v.post(b"/.portal/pair", {"code": "x"}), 400, "bad-request")
        code = self.access.issueCode().code
        for change in [
            {"publicKey": encode(b"not a key")},
            {"publicKey": "+++"},
            {"signature": "+++"},
            {"nonce": 5},
            {"name": 7},
        ]:
            self.answer(v.pair(code, **change), 400, "bad-request")
        self.answer(v.pair(code), 200)

    def test_renew(self) -> None:
        """
        A paired terminal renews its session by signing a fresh nonce: it gets a new cookie,
        good for 5 more minutes, and its last-seen time is updated.
        """
        self.visitor.pair(self.access.issueCode().code, "laptop")
        self.clock.advance(240)
        self.visitor.cookie = None
        document = self.answer(self.visitor.renew(), 200)
        self.assertEqual(document["expires"], 1_700_000_240 + SESSION_TTL)
        self.assertEqual((document["terminal"], document["name"]), (self.visitor.key.id, "laptop"))
        self.assertEqual(self.visitor.caller(), Caller("terminal", self.visitor.key.id, "laptop"))
        self.assertEqual(self.access.list()[0].lastSeen, 1_700_000_240)

    def test_copiedCookieExpires(self) -> None:
        """
        A session cookie alone works only until it expires; the key's holder renews it, the
        holder of a copied cookie cannot.
        """
        self.visitor.pair(self.access.issueCode().code)
        thief = Visitor(self, "203.0.113.5")
        thief.cookie = self.visitor.cookie
        self.assertEqual(thief.caller().id, self.visitor.key.id)  # type: ignore[union-attr]
        self.clock.advance(SESSION_TTL)
        self.assertIn("expired", thief.refused().message)
        self.assertIn("expired", self.visitor.refused().message)
        self.answer(thief.renew(terminal=self.visitor.key.id), 401, "bad-signature")
        self.answer(self.visitor.renew(), 200)
        self.assertEqual(self.visitor.caller().id, self.visitor.key.id)  # type: ignore[union-attr]

    def test_renewChecks(self) -> None:
        """
        Renewal is refused for an unknown terminal, another key's signature, a replayed nonce,
        another host, or a pairing signature.
        """
        self.visitor.pair(self.access.issueCode().code)
        v = self.visitor
        self.answer(v.renew(terminal="a" * 52), 401, "unknown-terminal")
        self.answer(v.renew(terminal=5), 400, "bad-request")
        self.answer(
            v.renew(**v.proof(PURPOSE_SESSION, key=TerminalKey.generate())), 401, "bad-signature"
        )
        nonce = v.nonce()
        self.answer(v.renew(**v.proof(PURPOSE_SESSION, nonce)), 200)
        self.answer(v.renew(**v.proof(PURPOSE_SESSION, nonce)), 401, "challenge")
        self.answer(v.renew(**v.proof(PURPOSE_SESSION, host="other:1")), 401, "bad-signature")
        self.answer(v.renew(**v.proof(PURPOSE_PAIR)), 401, "bad-signature")

    def test_revoked(self) -> None:
        """
        Once revoked, a terminal's next request is refused although its session has not
        expired, and it cannot renew; only the key's holder learns that it was revoked.
        """
        self.visitor.pair(self.access.issueCode().code)
        self.access.revoke(self.visitor.key.id[:6])
        self.assertIn("revoked", self.visitor.refused().message)
        self.answer(self.visitor.renew(), 401, "revoked")
        stranger = Visitor(self)
        self.answer(stranger.renew(terminal=self.visitor.key.id), 401, "bad-signature")

    def test_restartedTunnel(self) -> None:
        """
        After a restart (a new process: new session key, same store) old sessions are refused,
        and the terminal renews with its key.
        """
        self.visitor.pair(self.access.issueCode().code, "laptop")
        self.access.close()
        self.access = TerminalAccess.open(self.clock, self.stateDir)
        self.addCleanup(self.access.close)
        self.assertIn("not valid", self.visitor.refused().message)
        self.answer(self.visitor.renew(), 200)
        self.assertEqual(self.visitor.caller(), Caller("terminal", self.visitor.key.id, "laptop"))

    def test_sessionPerHost(self) -> None:
        """
        A session got on one of the tunnel's hosts is not valid on another.
        """
        self.visitor.pair(self.access.issueCode().code)
        elsewhere = Visitor(self, host=b"other.example:8443")
        elsewhere.cookie = self.visitor.cookie
        elsewhere.refused()

    def test_storeUnusable(self) -> None:
        """
        When the store cannot be used, pairing is answered with 503 and the error logged.
        """
        code = self.access.issueCode().code
        self.access.store.close()
        self.answer(self.visitor.pair(code), 503, "store")
        self.assertEqual(len(self.flushLoggedErrors(sqlite3.Error)), 1)
