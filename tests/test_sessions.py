"""
Tests for L{portal.gateway.sessions}: session tokens, and the terminal authenticator on every
request (expiry, forgery, other hosts, revocation).
"""

from __future__ import annotations

import os
import sqlite3

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from portal.gateway.caller import AuthenticationFailed, Caller, GatewayRequest
from portal.gateway.sessions import (
    SESSION_COOKIE,
    SESSION_TTL,
    ExpiredSession,
    InvalidSession,
    SessionTokens,
    TerminalAuthenticator,
    requestCookies,
)
from portal.gateway.terminals import Terminal, TerminalStore

HOST = "app.example:8443"


def request(*cookies: bytes, authority: bytes = HOST.encode()) -> GatewayRequest:
    """
    @return: A GET request carrying one C{Cookie} header per item of C{cookies}.
    """
    return GatewayRequest(
        b"GET", authority, b"/private", tuple((b"cookie", c) for c in cookies), None, ("h", 1)
    )


def newKey() -> bytes:
    """
    @return: A fresh P-256 public key, DER SubjectPublicKeyInfo.
    """
    return (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    )


class SessionTokensTests(SynchronousTestCase):
    """
    Tests for L{SessionTokens}.
    """

    def setUp(self) -> None:
        """
        Make tokens on a fake clock.
        """
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.tokens = SessionTokens(self.clock)

    def test_roundTrip(self) -> None:
        """
        A token names its terminal and expires 5 minutes after it is issued.
        """
        token, expires = self.tokens.issue("t" * 52, HOST)
        self.assertEqual(expires, 1_700_000_000 + SESSION_TTL)
        self.assertEqual(SESSION_TTL, 300)
        self.assertEqual(self.tokens.verify(token.encode(), HOST), "t" * 52)
        self.assertTrue(token.startswith("1." + "t" * 52 + f".{expires}."))

    def test_expiry(self) -> None:
        """
        A token is good until its expiry and refused as expired from then on.
        """
        token, _ = self.tokens.issue("t" * 52, HOST)
        self.clock.advance(SESSION_TTL - 0.5)
        self.tokens.verify(token.encode(), HOST)
        self.clock.advance(0.5)
        self.assertRaises(ExpiredSession, self.tokens.verify, token.encode(), HOST)

    def test_otherHost(self) -> None:
        """
        A token issued for one host is refused on another.
        """
        token, _ = self.tokens.issue("t" * 52, HOST)
        self.assertRaises(InvalidSession, self.tokens.verify, token.encode(), "other.example:8443")

    def test_otherKey(self) -> None:
        """
        A token made with another key (another run of the tunnel) is refused.
        """
        token, _ = SessionTokens(self.clock).issue("t" * 52, HOST)
        self.assertRaises(InvalidSession, self.tokens.verify, token.encode(), HOST)

    def test_tampered(self) -> None:
        """
        Changing the terminal, the expiry, the version or the MAC makes a token invalid; so does
        any malformed token.
        """
        token, expires = self.tokens.issue("a" * 52, HOST)
        version, id, _, mac = token.split(".")
        for forged in [
            f"{version}.{'b' * 52}.{expires}.{mac}",
            f"{version}.{id}.{expires + 3600}.{mac}",
            f"2.{id}.{expires}.{mac}",
            f"{version}.{id}.{expires}.{mac[:-2]}AA",
            f"{version}.{id}.+{expires}.{mac}",
            f"{version}.{id}.{expires}",
            "",
            "garbage",
            "1.a.b.c.d",
        ]:
            self.assertRaises(InvalidSession, self.tokens.verify, forged.encode(), HOST)
        self.assertRaises(InvalidSession, self.tokens.verify, b"\xff.\xfe.1.x", HOST)

    def test_cookie(self) -> None:
        """
        The cookie is C{__Host-} prefixed, for the whole site, HTTPS only, hidden from scripts,
        never sent cross-site, and lives as long as the session.
        """
        cookie = self.tokens.cookie("TOKEN")
        self.assertEqual(
            cookie,
            b"__Host-ptl-session=TOKEN; Path=/; Max-Age=300; Secure; HttpOnly; SameSite=Strict",
        )


class RequestCookiesTests(SynchronousTestCase):
    """
    Tests for L{requestCookies}.
    """

    def test_find(self) -> None:
        """
        Every value of the cookie, over several headers, is found; other cookies and pairs
        without C{=} are ignored.
        """
        found = requestCookies(
            request(b"a=1; __Host-ptl-session=x=y;b", b"__Host-ptl-session=z", b"c=2"),
            SESSION_COOKIE,
        )
        self.assertEqual(found, [b"x=y", b"z"])
        self.assertEqual(requestCookies(request(b"a=1"), SESSION_COOKIE), [])


class TerminalAuthenticatorTests(SynchronousTestCase):
    """
    Tests for L{TerminalAuthenticator}.
    """

    def setUp(self) -> None:
        """
        A store with one terminal, and a session for it.
        """
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.store = TerminalStore.open(os.path.join(self.mktemp(), "terminals.sqlite3"))
        self.addCleanup(self.store.close)
        self.tokens = SessionTokens(self.clock)
        self.authenticator = TerminalAuthenticator(self.tokens, self.store)
        self.terminal = self.store.add(newKey(), "laptop", self.clock.seconds())
        self.cookie = self.cookieFor(self.terminal)

    def cookieFor(self, terminal: Terminal, host: str = HOST) -> bytes:
        """
        @return: A C{Cookie} header value with a fresh session for C{terminal}.
        """
        token, _ = self.tokens.issue(terminal.id, host)
        return SESSION_COOKIE + b"=" + token.encode()

    def refusal(self, req: GatewayRequest) -> AuthenticationFailed:
        """
        @return: The L{AuthenticationFailed} the authenticator fails with.
        """
        failure = self.failureResultOf(self.authenticator.authenticate(req), AuthenticationFailed)
        error = failure.value
        assert isinstance(error, AuthenticationFailed)
        self.assertEqual(error.status, 401)
        return error

    def test_declares(self) -> None:
        """
        The session cookie is the authenticator's credential (the gateway strips it before the
        app), with no header and no need for the body.
        """
        self.assertEqual(self.authenticator.credentialCookies, frozenset({SESSION_COOKIE}))
        self.assertEqual(self.authenticator.credentialHeaders, frozenset())
        self.assertFalse(self.authenticator.needsBody)

    def test_noCookie(self) -> None:
        """
        A request without the session cookie carries no terminal credentials.
        """
        self.assertIsNone(self.successResultOf(self.authenticator.authenticate(request())))
        self.assertIsNone(
            self.successResultOf(self.authenticator.authenticate(request(b"other=1")))
        )

    def test_valid(self) -> None:
        """
        A valid session of a paired terminal is that terminal, with its id and name.
        """
        caller = self.successResultOf(
            self.authenticator.authenticate(request(b"a=b; " + self.cookie))
        )
        self.assertEqual(caller, Caller("terminal", self.terminal.id, "laptop"))

    def test_hostCaseIgnored(self) -> None:
        """
        The host is compared without regard to case.
        """
        caller = self.successResultOf(
            self.authenticator.authenticate(request(self.cookie, authority=HOST.upper().encode()))
        )
        self.assertEqual(caller.id, self.terminal.id)  # type: ignore[union-attr]

    def test_renamedSeen(self) -> None:
        """
        The name comes from the store at each request, so a rename shows at once.
        """
        self.store.rename(self.terminal.id, "desk")
        caller = self.successResultOf(self.authenticator.authenticate(request(self.cookie)))
        self.assertEqual(caller.name, "desk")  # type: ignore[union-attr]

    def test_expired(self) -> None:
        """
        An expired session is refused with 401 and a hint to renew it.
        """
        self.clock.advance(SESSION_TTL)
        error = self.refusal(request(self.cookie))
        self.assertIn("expired", error.message)
        self.assertIn("/.portal/pair", error.message)

    def test_forged(self) -> None:
        """
        A session not made by this tunnel is refused with 401.
        """
        token, _ = SessionTokens(self.clock).issue(self.terminal.id, HOST)
        self.refusal(request(SESSION_COOKIE + b"=" + token.encode()))
        self.refusal(request(SESSION_COOKIE + b"=nonsense"))
        self.refusal(request(SESSION_COOKIE + b"="))

    def test_otherHost(self) -> None:
        """
        A session made for another host of the tunnel is refused there.
        """
        self.refusal(request(self.cookieFor(self.terminal, "other.example:8443")))

    def test_badAuthority(self) -> None:
        """
        A request whose host cannot be read is refused, not crashed on.
        """
        self.refusal(request(self.cookie, authority=b""))

    def test_revokedOnNextRequest(self) -> None:
        """
        Once the terminal is revoked, its next request with the still unexpired session is
        refused with 401.
        """
        self.successResultOf(self.authenticator.authenticate(request(self.cookie)))
        self.store.revoke(self.terminal.id, self.clock.seconds())
        error = self.refusal(request(self.cookie))
        self.assertIn("revoked", error.message)

    def test_unknownTerminal(self) -> None:
        """
        A genuine session of a terminal the store does not know (a store replaced since) is
        refused.
        """
        token, _ = self.tokens.issue("q" * 52, HOST)
        error = self.refusal(request(SESSION_COOKIE + b"=" + token.encode()))
        self.assertIn("not paired", error.message)

    def test_severalCookies(self) -> None:
        """
        With several session cookies, a valid one wins; when none is valid, the first one's
        problem is reported.
        """
        stale = SESSION_COOKIE + b"=1." + self.terminal.id.encode() + b".1.AAAA"
        caller = self.successResultOf(self.authenticator.authenticate(request(stale, self.cookie)))
        self.assertEqual(caller.id, self.terminal.id)  # type: ignore[union-attr]
        self.clock.advance(SESSION_TTL)
        error = self.refusal(request(self.cookie, stale))
        self.assertIn("expired", error.message)

    def test_storeUnreadable(self) -> None:
        """
        When the store cannot be read, the request is refused with 503 and the error logged.
        """
        self.store.close()
        failure = self.failureResultOf(
            self.authenticator.authenticate(request(self.cookie)), AuthenticationFailed
        )
        self.assertEqual(failure.value.status, 503)  # type: ignore[attr-defined]
        self.assertEqual(len(self.flushLoggedErrors(sqlite3.Error)), 1)
