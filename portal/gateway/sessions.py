"""
Terminal sessions: short-lived tokens that say "this request comes from terminal X", and the
authenticator that checks them on every request.

A session is a token the tunnel signs with an HMAC key that only it holds (in memory, new at every
start), naming the terminal, the host it was issued for, and when it expires (5 minutes by
default).  Browsers carry it in the cookie L{SESSION_COOKIE} (C{HttpOnly}, C{Secure},
C{SameSite=Strict}); a terminal renews it before it expires by proving again that it holds its key
(L{portal.gateway.proof}), so a copied cookie alone stops working within minutes, and a revoked
terminal is refused on its next request because the store is checked every time.

A token reads C{1.<terminal id>.<expiry>.<mac>}: a version, the id, the expiry in whole seconds
since the epoch, and the unpadded base64url HMAC-SHA256 of
C{portal-session-v1\\n<host>\\n<terminal id>\\n<expiry>}.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from portal.gateway.caller import AuthenticationFailed, Caller, GatewayRequest
from portal.gateway.proof import decode, encode, normalizeAuthority
from portal.gateway.terminals import TerminalStore

#: The cookie that carries a browser terminal's session.  The C{__Host-} prefix makes browsers
#: accept it only from the app's own host, over HTTPS, for the whole site.
SESSION_COOKIE = b"__Host-ptl-session"

#: Seconds a session is valid after it is issued or renewed.
SESSION_TTL = 300.0

#: Version of the token format.
TOKEN_VERSION = "1"

_MAC_DOMAIN = b"portal-session-v1"


class InvalidSession(Exception):
    """
    A session token is malformed, was not made by this tunnel (or by this run of it), or was made
    for another host.
    """


class ExpiredSession(InvalidSession):
    """
    A session token was made here but has expired.
    """


class SessionTokens:
    """
    Makes and checks session tokens with a key only this tunnel process holds.
    """

    def __init__(
        self, clock: IReactorTime, key: bytes | None = None, ttl: float = SESSION_TTL
    ) -> None:
        """
        @param clock: The source of the current time.
        @param key: The HMAC key; by default 32 fresh random bytes, so that sessions end with the
            tunnel process (terminals renew them).
        @param ttl: Seconds a session is valid.
        """
        self._clock = clock
        self._key = key if key is not None else secrets.token_bytes(32)
        self.ttl = ttl

    def _mac(self, authority: str, terminalId: str, expires: int) -> str:
        """
        @return: The token's MAC for these fields.
        """
        message = b"\n".join(
            [_MAC_DOMAIN, authority.encode("ascii"), terminalId.encode("ascii"), b"%d" % expires]
        )
        return encode(hmac.new(self._key, message, hashlib.sha256).digest())

    def issue(self, terminalId: str, authority: str) -> tuple[str, int]:
        """
        Make a session for a terminal.

        @param terminalId: The terminal's id.
        @param authority: The host the session is for, see L{normalizeAuthority}.
        @return: The token, and when it expires (whole seconds since the epoch).
        """
        expires = int(self._clock.seconds() + self.ttl)
        token = ".".join(
            [TOKEN_VERSION, terminalId, str(expires), self._mac(authority, terminalId, expires)]
        )
        return token, expires

    def verify(self, token: bytes, authority: str) -> str:
        """
        Check a session token.

        @param token: The token as received.
        @param authority: The host the request was sent to, see L{normalizeAuthority}.
        @return: The id of the terminal it names.
        @raise ExpiredSession: If it is genuine but has expired.
        @raise InvalidSession: If it is malformed, forged, from an earlier run of the tunnel, or for
            another host.
        """
        try:
            version, terminalId, expiresText, mac = token.decode("ascii").split(".")
            expires = int(expiresText)
            decode(mac)
        except ValueError:
            raise InvalidSession("the session is malformed")
        if version != TOKEN_VERSION or not expiresText.isdigit() or not terminalId.isalnum():
            raise InvalidSession("the session is malformed")
        if not hmac.compare_digest(mac, self._mac(authority, terminalId, expires)):
            raise InvalidSession("the session was not issued by this tunnel for this host")
        if self._clock.seconds() >= expires:
            raise ExpiredSession("the session has expired")
        return terminalId

    def cookie(self, token: str) -> bytes:
        """
        @param token: A token from L{issue}.
        @return: The C{Set-Cookie} value that gives a browser this session for L{ttl} seconds.
        """
        return (
            SESSION_COOKIE
            + b"="
            + token.encode("ascii")
            + b"; Path=/; Max-Age=%d; Secure; HttpOnly; SameSite=Strict" % int(self.ttl)
        )


def requestCookies(request: GatewayRequest, name: bytes) -> list[bytes]:
    """
    Find the values of a cookie in a request.

    This reads C{Cookie} headers the way C{twisted.web.http.Request.parseCookies} does (pairs split
    on C{;} and the first C{=}), over every C{Cookie} header (HTTP/2 may send several); that
    parser is a method of a live request, so it cannot be used on a L{GatewayRequest}.

    @param request: The request.
    @param name: The cookie's name.
    @return: Every value sent for C{name}, in order.
    """
    values = []
    for header, value in request.headers:
        if header != b"cookie":
            continue
        for pair in value.split(b";"):
            key, sep, cookieValue = pair.strip().partition(b"=")
            if sep and key == name:
                values.append(cookieValue)
    return values


class TerminalAuthenticator:
    """
    Says which paired terminal is calling, from its session cookie
    (L{portal.gateway.caller.Authenticator}).

    @ivar credentialHeaders: None: terminals send their session in a cookie.
    @ivar credentialCookies: L{SESSION_COOKIE}.
    @ivar needsBody: C{False}: a session is checked without the body.
    """

    _log = Logger()
    credentialHeaders: frozenset[bytes] = frozenset()
    credentialCookies: frozenset[bytes] = frozenset({SESSION_COOKIE})
    needsBody: bool = False

    def __init__(self, tokens: SessionTokens, store: TerminalStore) -> None:
        """
        @param tokens: The tunnel's session tokens.
        @param store: The paired terminals, consulted on every request so that a revocation takes
            effect at once.
        """
        self._tokens = tokens
        self._store = store

    def authenticate(self, request: GatewayRequest) -> Deferred[Caller | None]:
        """
        @return: A L{Deferred} firing with the terminal of a valid session; with L{None} when the
            request has no session cookie; failing with L{AuthenticationFailed} (401) when the
            session is expired, invalid, or its terminal unknown or revoked (503 when the store
            cannot be read, which is logged).
        """
        values = requestCookies(request, SESSION_COOKIE)
        if not values:
            return succeed(None)
        try:
            caller = self._check(values, request.authority)
        except AuthenticationFailed as e:
            return fail(e)
        except sqlite3.Error as e:
            self._log.failure("cannot read the terminal store", Failure(e))
            return fail(AuthenticationFailed(503, "the terminal store cannot be read; try again"))
        return succeed(caller)

    def _check(self, values: list[bytes], authority: bytes) -> Caller:
        """
        Find a terminal that one of the session cookies proves.

        @raise AuthenticationFailed: If none does; the first cookie's problem is reported.
        """
        problem: str | None = None
        for value in values:
            try:
                terminalId = self._tokens.verify(value, normalizeAuthority(authority))
            except ExpiredSession:
                problem = problem or (
                    "your terminal session has expired; open /.portal/pair to renew it"
                )
                continue
            except (InvalidSession, ValueError):
                problem = problem or (
                    "your terminal session is not valid here (the tunnel may have restarted); "
                    "open /.portal/pair to renew it"
                )
                continue
            terminal = self._store.get(terminalId)
            if terminal is None:
                problem = problem or "this terminal is not paired with this app"
                continue
            if terminal.revoked is not None:
                problem = problem or "this terminal was revoked by the app's owner"
                continue
            return Caller("terminal", terminal.id, terminal.name)
        assert problem is not None
        raise AuthenticationFailed(401, problem)
