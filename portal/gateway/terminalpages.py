"""
The gateway's pages for terminals (L{portal.gateway.caller.GatewayPages}), under C{/.portal/}:

  - C{GET /.portal/pair}: the pairing page (L{portal.gateway.pairpage});
  - C{GET /.portal/terminal.js}: the terminal script it runs;
  - C{POST /.portal/session/challenge}: a fresh nonce (C{GET} works too);
  - C{POST /.portal/pair}: pair a new terminal with a code and a proof of its key;
  - C{POST /.portal/session}: renew a terminal's session with a proof of its key.

The C{POST}s take and answer JSON; refusals are C{{"error": message, "reason": code}} with a
4xx status.  They accept only C{application/json} bodies, and refuse requests whose C{Origin} is
not the app's own, so another site cannot drive them from a visitor's browser.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from portal.gateway.caller import LOCAL_PREFIX, GatewayRequest, GatewayResponse
from portal.gateway.pairing import PairingCodes, PairingRefused, TooManyAttempts
from portal.gateway.pairpage import PAGE, PAGE_POLICY, SCRIPT
from portal.gateway.proof import (
    PURPOSE_PAIR,
    PURPOSE_SESSION,
    NonceBook,
    ProofError,
    decode,
    normalizeAuthority,
    proofMessage,
    verifyProof,
)
from portal.gateway.sessions import SessionTokens
from portal.gateway.terminals import (
    Terminal,
    TerminalError,
    TerminalStore,
    canonicalPublicKey,
    terminalId,
    validateName,
)

#: Largest body the JSON endpoints accept.
MAX_BODY = 8192

PAIR_PATH = LOCAL_PREFIX + b"pair"
SCRIPT_PATH = LOCAL_PREFIX + b"terminal.js"
CHALLENGE_PATH = LOCAL_PREFIX + b"session/challenge"
SESSION_PATH = LOCAL_PREFIX + b"session"

#: Headers of every answer: never cached, never sniffed, no referrer sent on.
_COMMON = (
    (b"cache-control", b"no-store"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
)


class _Refusal(Exception):
    """
    A request to a terminal endpoint is refused.

    @ivar status: The HTTP status.
    @ivar reason: A short code for scripts (C{"revoked"}, C{"wrong-code"}...).
    @ivar headers: Extra response headers.
    """

    def __init__(
        self,
        status: int,
        reason: str,
        message: str,
        headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.headers = headers


def _json(
    status: int, document: dict[str, Any], headers: tuple[tuple[bytes, bytes], ...] = ()
) -> GatewayResponse:
    """
    @return: A JSON answer.
    """
    return GatewayResponse(
        status,
        ((b"content-type", b"application/json"), *_COMMON, *headers),
        json.dumps(document).encode("utf-8"),
    )


class TerminalPages:
    """
    Pairing and session renewal for terminals.
    """

    _log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        store: TerminalStore,
        codes: PairingCodes,
        nonces: NonceBook,
        tokens: SessionTokens,
    ) -> None:
        """
        @param clock: The source of the current time.
        @param store: The paired terminals.
        @param codes: The pairing codes the owner was given.
        @param nonces: The nonces proofs answer.
        @param tokens: Makes the sessions.
        """
        self._clock = clock
        self._store = store
        self._codes = codes
        self._nonces = nonces
        self._tokens = tokens
        self._routes: dict[bytes, dict[bytes, Callable[[GatewayRequest], GatewayResponse]]] = {
            PAIR_PATH: {b"GET": self._page, b"HEAD": self._page, b"POST": self._pair},
            SCRIPT_PATH: {b"GET": self._script, b"HEAD": self._script},
            CHALLENGE_PATH: {b"GET": self._challenge, b"POST": self._challenge},
            SESSION_PATH: {b"POST": self._session},
        }

    def render(self, request: GatewayRequest) -> Deferred[GatewayResponse]:
        """
        Answer a request for one of the terminal pages.

        @return: A L{Deferred} firing with the answer; 404 for other paths.
        """
        path = request.path.partition(b"?")[0]
        methods = self._routes.get(path)
        if methods is None:
            return succeed(_json(404, {"error": "no such page", "reason": "not-found"}))
        handler = methods.get(request.method)
        if handler is None:
            allow = b", ".join(sorted(methods))
            return succeed(
                _json(
                    405,
                    {"error": "method not allowed", "reason": "method"},
                    ((b"allow", allow),),
                )
            )
        try:
            response = handler(request)
        except _Refusal as e:
            response = _json(e.status, {"error": e.message, "reason": e.reason}, e.headers)
        except sqlite3.Error:
            self._log.failure("cannot use the terminal store")
            response = _json(
                503, {"error": "the terminal store cannot be used; try again", "reason": "store"}
            )
        if request.method == b"HEAD":
            response = GatewayResponse(response.status, response.headers, b"")
        return succeed(response)

    def _page(self, request: GatewayRequest) -> GatewayResponse:
        """
        The pairing page.
        """
        return GatewayResponse(
            200,
            (
                (b"content-type", b"text/html; charset=utf-8"),
                (b"content-security-policy", PAGE_POLICY),
                (b"x-frame-options", b"DENY"),
                *_COMMON,
            ),
            PAGE,
        )

    def _script(self, request: GatewayRequest) -> GatewayResponse:
        """
        The terminal script.
        """
        return GatewayResponse(
            200, ((b"content-type", b"text/javascript; charset=utf-8"), *_COMMON), SCRIPT
        )

    def _challenge(self, request: GatewayRequest) -> GatewayResponse:
        """
        A fresh nonce for a proof.
        """
        return _json(200, {"nonce": self._nonces.issue(), "ttl": self._nonces.ttl})

    def _body(self, request: GatewayRequest) -> tuple[dict[str, Any], str]:
        """
        Check a JSON request and read it.

        @return: Its JSON object, and the host it was sent to (see L{normalizeAuthority}).
        @raise _Refusal: If it is cross-origin, not JSON, too large, or not an object.
        """
        try:
            authority = normalizeAuthority(request.authority)
        except ValueError as e:
            raise _Refusal(400, "bad-request", str(e))
        origin = request.header(b"origin")
        if origin is not None and origin.lower() != b"https://" + authority.encode("ascii"):
            raise _Refusal(403, "cross-origin", "requests from other sites are refused")
        contentType = (request.header(b"content-type") or b"").partition(b";")[0].strip()
        if contentType.lower() != b"application/json":
            raise _Refusal(415, "bad-request", "the body must be application/json")
        body = request.body or b""
        if len(body) > MAX_BODY:
            raise _Refusal(413, "bad-request", f"the body may have at most {MAX_BODY} bytes")
        try:
            document = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise _Refusal(400, "bad-request", "the body is not JSON")
        if not isinstance(document, dict):
            raise _Refusal(400, "bad-request", "the body is not a JSON object")
        return document, authority

    def _proof(
        self, document: dict[str, Any], authority: str, purpose: str, publicKey: bytes | None
    ) -> tuple[str, bytes]:
        """
        Read the nonce and signature of a proof and use up the nonce.

        @param publicKey: The key to check the signature with, or L{None} to only read the proof
            (the caller checks it with L{_verify} once it knows the key).
        @return: The nonce and the signature.
        @raise _Refusal: If they are missing, malformed, or the nonce is not good.
        """
        nonce = document.get("nonce")
        signature = document.get("signature")
        if not isinstance(nonce, str) or not isinstance(signature, str):
            raise _Refusal(400, "bad-request", "the proof needs a nonce and a signature")
        try:
            signatureBytes = decode(signature)
        except ValueError:
            raise _Refusal(400, "bad-request", "the signature is not base64url")
        try:
            self._nonces.take(nonce)
        except ProofError as e:
            raise _Refusal(401, "challenge", str(e))
        if publicKey is not None:
            self._verify(publicKey, signatureBytes, purpose, authority, nonce)
        return nonce, signatureBytes

    def _verify(
        self, publicKey: bytes, signature: bytes, purpose: str, authority: str, nonce: str
    ) -> None:
        """
        @raise _Refusal: If C{signature} is not C{publicKey}'s over this proof.
        """
        if not verifyProof(publicKey, signature, proofMessage(purpose, authority, nonce)):
            raise _Refusal(
                401,
                "bad-signature",
                "the signature does not verify for this key, this host and the challenge",
            )

    def _pair(self, request: GatewayRequest) -> GatewayResponse:
        """
        Pair a new terminal: check the proof of its key, then redeem the code.
        """
        host = request.peer[0]
        try:
            # Refused visitors cost no signature check.
            self._codes.check(host)
        except TooManyAttempts as e:
            raise self._tooMany(e)
        document, authority = self._body(request)
        code = document.get("code")
        encodedKey = document.get("publicKey")
        name = document.get("name") or None
        if not isinstance(code, str) or not isinstance(encodedKey, str):
            raise _Refusal(400, "bad-request", "pairing needs a code and a publicKey")
        if name is not None and not isinstance(name, str):
            raise _Refusal(400, "bad-request", "the name must be a string")
        try:
            publicKey = canonicalPublicKey(decode(encodedKey))
            if name is not None:
                name = validateName(name)
        except (ValueError, TerminalError) as e:
            raise _Refusal(400, "bad-request", str(e))
        self._proof(document, authority, PURPOSE_PAIR, publicKey)
        id = terminalId(publicKey)
        existing = self._store.get(id)
        if existing is not None and existing.revoked is not None:
            raise _Refusal(
                403, "revoked", "this key's terminal was revoked; pair again with a new key"
            )
        try:
            issued = self._codes.redeem(code, host)
        except TooManyAttempts as e:
            raise self._tooMany(e)
        except PairingRefused as e:
            self._log.info("wrong pairing code from {host}", host=host)
            raise _Refusal(403, "wrong-code", str(e))
        try:
            terminal = self._store.add(
                publicKey, issued.name or name or f"terminal {id[:12]}", self._clock.seconds()
            )
        except TerminalError as e:
            # Revoked by another process since the check above.
            raise _Refusal(403, "revoked", str(e))
        self._log.info(
            "paired terminal {id} ({name}) from {host}", id=id, name=terminal.name, host=host
        )
        return self._started(terminal, authority)

    def _tooMany(self, e: TooManyAttempts) -> _Refusal:
        """
        @return: The refusal of a visitor who tried too many wrong codes.
        """
        return _Refusal(429, "rate-limited", str(e), ((b"retry-after", b"%d" % int(e.retryAfter)),))

    def _session(self, request: GatewayRequest) -> GatewayResponse:
        """
        Renew a terminal's session: check the proof of its key.
        """
        document, authority = self._body(request)
        id = document.get("terminal")
        if not isinstance(id, str):
            raise _Refusal(400, "bad-request", "renewal needs the terminal's id")
        nonce, signature = self._proof(document, authority, PURPOSE_SESSION, None)
        terminal = self._store.get(id)
        if terminal is None:
            raise _Refusal(401, "unknown-terminal", "no terminal with this id is paired here")
        self._verify(terminal.publicKey, signature, PURPOSE_SESSION, authority, nonce)
        # Only the key's holder learns that it was revoked.
        if terminal.revoked is not None:
            raise _Refusal(401, "revoked", "this terminal was revoked by the app's owner")
        self._store.touch(terminal.id, self._clock.seconds())
        return self._started(terminal, authority)

    def _started(self, terminal: Terminal, authority: str) -> GatewayResponse:
        """
        @return: The answer giving C{terminal} a fresh session on C{authority}.
        """
        token, expires = self._tokens.issue(terminal.id, authority)
        return _json(
            200,
            {
                "terminal": terminal.id,
                "name": terminal.name,
                "expires": expires,
                "ttl": self._tokens.ttl,
            },
            ((b"set-cookie", self._tokens.cookie(token)),),
        )
