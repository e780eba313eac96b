"""
Tests for L{portal.gateway.access}: the app gateway's decisions, with fake authenticators and
pages.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from portal.gateway.access import (
    DECISION_TIMEOUT,
    MAX_BODY,
    Admitted,
    Gateway,
    HeaderEdits,
    accessRefusal,
    keptCookies,
    page,
)
from portal.gateway.appjson import parseApp
from portal.gateway.caller import (
    PUBLIC,
    AuthenticationFailed,
    Authenticator,
    Caller,
    GatewayPages,
    GatewayRequest,
    GatewayResponse,
)
from tests.test_appjson import EXAMPLE

#: The tunnel identity's id.
IDENTITY = "q3wat5w3yickabcdefghijklmnopqrstuvwxyz234567abcdefgh"
#: The SNI of the visitors' connections.
SNI = "myapp.localhost"
TERMINAL = Caller("terminal", "term-1", "Laptop")
PEER = Caller("peer", "p" * 52, "Alice")


class FakeAuthenticator:
    """
    An authenticator whose credentials are the header C{x-fake-<kind>} (and the cookie
    C{<kind>}): its value names a caller in L{callers}; C{bad} fails with 401, C{wait} leaves the
    answer to the test (L{pending}), C{crash} raises an unexpected error.

    @ivar seen: Every request it was asked about.
    @ivar pending: The Deferreds of C{wait} requests.
    """

    def __init__(self, kind: str, callers: dict[bytes, Caller], needsBody: bool = False) -> None:
        self.header = b"x-fake-" + kind.encode()
        self.credentialHeaders = frozenset({self.header})
        self.credentialCookies = frozenset({kind.encode()})
        self.needsBody = needsBody
        self.callers = callers
        self.seen: list[GatewayRequest] = []
        self.pending: list[Deferred[Caller | None]] = []

    def authenticate(self, request: GatewayRequest) -> Deferred[Caller | None]:
        """
        Answer from the credential header.
        """
        self.seen.append(request)
        value = request.header(self.header)
        if value is None:
            return succeed(None)
        if value == b"bad":
            return fail(AuthenticationFailed(401, "this terminal was revoked"))
        if value == b"forbidden":
            return fail(AuthenticationFailed(403, "replayed signature"))
        if value == b"crash":
            return fail(RuntimeError("authenticator bug"))
        if value == b"wait":
            d: Deferred[Caller | None] = Deferred()
            self.pending.append(d)
            return d
        return succeed(self.callers[value])


class FakePages:
    """
    Gateway pages that answer 200 with the path, and record the requests.
    """

    def __init__(self) -> None:
        self.seen: list[GatewayRequest] = []

    def render(self, request: GatewayRequest) -> Deferred[GatewayResponse]:
        """
        Answer with the path.
        """
        self.seen.append(request)
        return succeed(GatewayResponse(200, ((b"content-type", b"text/plain"),), request.path))


def request(
    path: bytes = b"/",
    headers: tuple[tuple[bytes, bytes], ...] = (),
    authority: bytes = b"myapp.localhost:8443",
    body: bytes | None = None,
) -> GatewayRequest:
    """
    @return: A C{GET} request for C{path}.
    """
    return GatewayRequest(b"GET", authority, path, headers, body, ("203.0.113.9", 5555))


class GatewayTestCase(SynchronousTestCase):
    """
    A gateway for L{EXAMPLE} (C{""} private, C{/public/} public, C{/friends/} peer) with a
    terminal and a peer authenticator.
    """

    def setUp(self) -> None:
        """
        Build the gateway.
        """
        self.app = parseApp(EXAMPLE)
        self.other = parseApp(dict(EXAMPLE, name="other"))
        self.terminals = FakeAuthenticator("terminal", {b"t1": TERMINAL})
        self.peers = FakeAuthenticator("peer", {b"p1": PEER, b"odd": Caller("admin")})
        self.gateway = Gateway([self.app, self.other], IDENTITY, [self.terminals, self.peers], None)
        self.events = EventLoggingObserver.createWithCleanup(
            self,  # type: ignore[arg-type]
            globalLogPublisher,
        )

    def decide(self, req: GatewayRequest, sni: str = SNI) -> Admitted | GatewayResponse:
        """
        @return: The gateway's decision, which must be synchronous here.
        """
        return self.successResultOf(self.gateway.decide(req, sni))

    def admitted(self, req: GatewayRequest) -> Admitted:
        """
        @return: The decision, which must admit the request.
        """
        decision = self.decide(req)
        assert isinstance(decision, Admitted), decision
        return decision

    def refused(self, req: GatewayRequest, status: int) -> GatewayResponse:
        """
        @return: The decision, which must be a response with C{status}.
        """
        decision = self.decide(req)
        assert isinstance(decision, GatewayResponse), decision
        self.assertEqual(decision.status, status)
        return decision


class ProtocolTests(SynchronousTestCase):
    """
    The fakes have the shape of the shared interface.
    """

    def test_fakes(self) -> None:
        """
        L{FakeAuthenticator} is an L{Authenticator} and L{FakePages} are L{GatewayPages} (checked
        by mypy through these assignments).
        """
        authenticator: Authenticator = FakeAuthenticator("x", {})
        pages: GatewayPages = FakePages()
        self.assertFalse(authenticator.needsBody)
        self.assertEqual(pages.render(request()).result.status, 200)  # type: ignore[attr-defined]


class AccessTests(GatewayTestCase):
    """
    Who may open which path.
    """

    def test_refusalTable(self) -> None:
        """
        L{accessRefusal}: public admits anyone, peer admits peers and terminals, private admits
        terminals; anonymous callers get 401, callers of the wrong type 403.
        """
        table = {
            ("public", "public"): None,
            ("public", "peer"): None,
            ("public", "terminal"): None,
            ("peer", "public"): 401,
            ("peer", "peer"): None,
            ("peer", "terminal"): None,
            ("private", "public"): 401,
            ("private", "peer"): 403,
            ("private", "terminal"): None,
        }
        for (access, callerType), status in table.items():
            self.assertEqual(
                accessRefusal(access, Caller(callerType)), status, (access, callerType)
            )

    def test_privateAnonymous(self) -> None:
        """
        An anonymous request for a private path gets 401 with a page saying how to pair (C{portal
        pair}, then the pairing page on the app's own host), a challenge, and no caching.
        """
        response = self.refused(request(b"/notes"), 401)
        headers = dict(response.headers)
        self.assertEqual(headers[b"content-type"], b"text/html; charset=utf-8")
        self.assertEqual(headers[b"cache-control"], b"no-store")
        self.assertEqual(headers[b"www-authenticate"], b'Portal realm="portal"')
        self.assertIn(b"private", response.body)
        self.assertIn(b"<code>portal pair</code>", response.body)
        self.assertIn(b"https://myapp.localhost:8443/.portal/pair", response.body)

    def test_peerAnonymous(self) -> None:
        """
        An anonymous request for a peer path gets 401 too.
        """
        response = self.refused(request(b"/friends/x"), 401)
        self.assertIn(b"contacts", response.body)

    def test_privatePeer(self) -> None:
        """
        A peer asking for a private path gets 403 naming who they are signed in as.
        """
        response = self.refused(request(b"/", ((b"x-fake-peer", b"p1"),)), 403)
        self.assertIn(b"signed in as peer Alice", response.body)
        self.assertNotIn(b"www-authenticate", dict(response.headers))

    def test_privateTerminal(self) -> None:
        """
        A terminal may open a private path, and the app learns who it is.
        """
        decision = self.admitted(request(b"/notes", ((b"x-fake-terminal", b"t1"),)))
        self.assertEqual(decision.caller, TERMINAL)
        self.assertIs(decision.app, self.app)
        self.assertEqual(
            list(decision.edits.add),
            [
                (b"X-Ptl-Client-Id", b"term-1"),
                (b"X-Ptl-Client-Name", b"Laptop"),
                (b"X-Ptl-Client-Type", b"terminal"),
            ],
        )

    def test_peerPath(self) -> None:
        """
        Peers and terminals may open a peer path.
        """
        self.assertEqual(
            self.admitted(request(b"/friends/", ((b"x-fake-peer", b"p1"),))).caller, PEER
        )
        self.assertEqual(
            self.admitted(request(b"/friends/", ((b"x-fake-terminal", b"t1"),))).caller, TERMINAL
        )

    def test_publicAnonymous(self) -> None:
        """
        Anyone may open a public path; the identity headers still say it is a public caller.
        """
        decision = self.admitted(request(b"/public/index.html"))
        self.assertEqual(decision.caller, PUBLIC)
        self.assertEqual(
            list(decision.edits.add),
            [
                (b"X-Ptl-Client-Id", b""),
                (b"X-Ptl-Client-Name", b""),
                (b"X-Ptl-Client-Type", b"public"),
            ],
        )

    def test_publicIdentified(self) -> None:
        """
        On a public path an identified caller's headers are sent too.
        """
        decision = self.admitted(request(b"/public/", ((b"x-fake-peer", b"p1"),)))
        self.assertIn((b"X-Ptl-Client-Type", b"peer"), decision.edits.add)
        self.assertIn((b"X-Ptl-Client-Name", b"Alice"), decision.edits.add)

    def test_queryIgnored(self) -> None:
        """
        The query cannot make a private path public.
        """
        self.refused(request(b"/secret?x=/public/"), 401)

    def test_ambiguousPath(self) -> None:
        """
        A path an app could read as another entry's gets 400, and no authenticator is asked.
        """
        response = self.refused(request(b"/x%2F..%2Fpublic/a"), 400)
        self.assertIn(b"another path", response.body)
        self.assertEqual(self.terminals.seen, [])


class AuthenticatorTests(GatewayTestCase):
    """
    Authenticators are asked in order; the first caller wins.
    """

    def test_order(self) -> None:
        """
        Every authenticator sees the request until one proves a caller; the later ones are not
        asked.
        """
        req = request(b"/", ((b"x-fake-terminal", b"t1"), (b"x-fake-peer", b"p1")))
        self.assertEqual(self.admitted(req).caller, TERMINAL)
        self.assertEqual(self.terminals.seen, [req])
        self.assertEqual(self.peers.seen, [])
        req = request(b"/friends/", ((b"x-fake-peer", b"p1"),))
        self.assertEqual(self.admitted(req).caller, PEER)
        self.assertEqual(self.terminals.seen[-1], req)
        self.assertEqual(self.peers.seen, [req])

    def test_failed(self) -> None:
        """
        L{AuthenticationFailed} on a private path answers its status and message, with the pairing
        hint on a 401; later authenticators are not asked.
        """
        response = self.refused(request(b"/", ((b"x-fake-terminal", b"bad"),)), 401)
        self.assertIn(b"this terminal was revoked", response.body)
        self.assertIn(b"portal pair", response.body)
        self.assertEqual(self.peers.seen, [])
        response = self.refused(request(b"/friends/", ((b"x-fake-peer", b"forbidden"),)), 403)
        self.assertIn(b"replayed signature", response.body)
        self.assertNotIn(b"portal pair", response.body)

    def test_failedOnPublicPath(self) -> None:
        """
        On a public path a failed authentication leaves the caller anonymous (a stale session must
        not lock anyone out of public pages), and its credentials are still stripped.
        """
        decision = self.admitted(request(b"/public/", ((b"x-fake-terminal", b"bad"),)))
        self.assertEqual(decision.caller, PUBLIC)
        self.assertIn(b"x-fake-terminal", decision.edits.strip)

    def test_pending(self) -> None:
        """
        The decision waits for an authenticator that answers later.
        """
        d = self.gateway.decide(request(b"/", ((b"x-fake-terminal", b"wait"),)), SNI)
        self.assertNoResult(d)
        self.terminals.pending[0].callback(TERMINAL)
        decision = self.successResultOf(d)
        assert isinstance(decision, Admitted)
        self.assertEqual(decision.caller, TERMINAL)

    def test_timeout(self) -> None:
        """
        An authenticator that has not answered after L{DECISION_TIMEOUT} seconds is cancelled, and
        the request gets 504.
        """
        clock = MemoryReactorClock()
        self.gateway.clock = clock
        d = self.gateway.decide(request(b"/", ((b"x-fake-terminal", b"wait"),)), SNI)
        clock.advance(DECISION_TIMEOUT - 1)
        self.assertNoResult(d)
        clock.advance(1)
        response = self.successResultOf(d)
        assert isinstance(response, GatewayResponse)
        self.assertEqual(response.status, 504)
        self.assertTrue(self.terminals.pending[0].called)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_noTimeoutOnceDecided(self) -> None:
        """
        A decision in time leaves no timer behind.
        """
        clock = MemoryReactorClock()
        self.gateway.clock = clock
        self.successResultOf(self.gateway.decide(request(b"/public/"), SNI))
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_unexpectedError(self) -> None:
        """
        An authenticator failing in another way gets 500, and the error is logged.
        """
        self.refused(request(b"/public/", ((b"x-fake-terminal", b"crash"),)), 500)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_unknownCallerType(self) -> None:
        """
        A caller of a type other than terminal, peer and public is an authenticator's bug: 500.
        """
        self.refused(request(b"/public/", ((b"x-fake-peer", b"odd"),)), 500)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_noAuthenticators(self) -> None:
        """
        Without authenticators (this branch's tunnel) private and peer paths always get 401, and
        public paths work.
        """
        self.gateway.authenticators = []
        self.refused(request(b"/", ((b"x-fake-terminal", b"t1"),)), 401)
        self.refused(request(b"/friends/"), 401)
        self.admitted(request(b"/public/"))


class HeaderTests(GatewayTestCase):
    """
    What the app gets: no visitor C{X-Ptl-*}, no credentials, the rendered templates.
    """

    def test_edits(self) -> None:
        """
        An admitted request's edits strip every authenticator's credential headers and cookies,
        and add the path's rendered headers.
        """
        decision = self.admitted(request(b"/", ((b"x-fake-terminal", b"t1"),)))
        self.assertEqual(decision.edits.strip, frozenset({b"x-fake-terminal", b"x-fake-peer"}))
        self.assertEqual(decision.edits.stripCookies, frozenset({b"terminal", b"peer"}))

    def test_stripped(self) -> None:
        """
        L{HeaderEdits.stripped} removes C{X-Ptl-*} in any case, the credential headers in any case,
        and the credential cookies; everything else stays, in order.
        """
        edits = HeaderEdits(frozenset({b"authorization"}), frozenset({b"session"}))
        headers = [
            (b"Host", b"myapp.localhost"),
            (b"X-Ptl-Client-Id", b"forged"),
            (b"x-ptl-client-type", b"terminal"),
            (b"X-PTL-ANYTHING", b"x"),
            (b"Authorization", b"Bearer secret"),
            (b"Accept", b"*/*"),
            (b"X-Ptlx", b"kept: not the prefix"),
        ]
        self.assertEqual(
            edits.stripped(headers),
            [
                (b"Host", b"myapp.localhost"),
                (b"Accept", b"*/*"),
                (b"X-Ptlx", b"kept: not the prefix"),
            ],
        )

    def test_cookies(self) -> None:
        """
        Credential cookies leave the C{Cookie} header and the others stay; several C{Cookie}
        headers (HTTP/2 sends crumbs) become one where the first was; none is left when no cookie
        remains.
        """
        edits = HeaderEdits(stripCookies=frozenset({b"session", b"ptl"}))
        headers = [
            (b"Accept", b"*/*"),
            (b"Cookie", b"theme=dark; session=secret"),
            (b"Via", b"x"),
            (b"cookie", b"ptl=1;lang=en"),
        ]
        self.assertEqual(
            edits.stripped(headers),
            [(b"Accept", b"*/*"), (b"Cookie", b"theme=dark; lang=en"), (b"Via", b"x")],
        )
        self.assertEqual(
            edits.stripped([(b"Cookie", b"session=a; ptl=b"), (b"Accept", b"*/*")]),
            [(b"Accept", b"*/*")],
        )

    def test_keptCookies(self) -> None:
        """
        L{keptCookies} matches cookie names exactly (they are case-sensitive), ignores spacing and
        empty pairs, and keeps values as sent.
        """
        self.assertEqual(
            keptCookies(b" a=1 ;;Session=2; session =3; b=x=y ", frozenset({b"session"})),
            [b"a=1", b"Session=2", b"b=x=y"],
        )

    def test_apply(self) -> None:
        """
        L{HeaderEdits.apply} strips, then adds the templates' headers: a forged C{X-Ptl-Client-Id}
        is replaced by the real one.
        """
        edits = HeaderEdits(add=((b"X-Ptl-Client-Id", b""),))
        self.assertEqual(
            edits.apply([(b"X-Ptl-Client-Id", b"forged"), (b"Accept", b"*/*")]),
            [(b"Accept", b"*/*"), (b"X-Ptl-Client-Id", b"")],
        )

    def test_portalValues(self) -> None:
        """
        C{portal.domain} is the tunnel domain of the SNI, C{portal.id} and C{portal.short_id} the
        tunnel identity's.
        """
        templates = {
            "X-Ptl-Domain": "{{ portal.domain }}",
            "X-Ptl-Id": "{{ portal.id }}",
            "X-Ptl-Short": "{{ portal.short_id }}",
        }
        app = parseApp(dict(EXAMPLE, paths={"": {"access": "public", "headers": templates}}))
        gateway = Gateway([app], IDENTITY)
        decision = self.successResultOf(
            gateway.decide(request(authority=b"myapp.t.example.net"), "myapp.t.example.net")
        )
        assert isinstance(decision, Admitted)
        self.assertEqual(
            list(decision.edits.add),
            [
                (b"X-Ptl-Domain", b"t.example.net"),
                (b"X-Ptl-Id", IDENTITY.encode()),
                (b"X-Ptl-Short", IDENTITY[:12].encode()),
            ],
        )

    def test_controlCharacterRefused(self) -> None:
        """
        A caller whose name would put a control character in a header is refused with 500, and
        the refusal is logged; nothing reaches the app.
        """
        self.terminals.callers[b"evil"] = Caller("terminal", "t2", "x\r\nX-Ptl-Client-Type: peer")
        response = self.refused(request(b"/", ((b"x-fake-terminal", b"evil"),)), 500)
        self.assertIn(b"control character", response.body)
        [event] = [e for e in self.events if "refused" in e["log_format"]]
        self.assertIn("X-Ptl-Client-Name", event["reason"])


class SiteTests(GatewayTestCase):
    """
    The app is chosen by the request's host, on the connection's tunnel domain.
    """

    def site(self, authority: bytes, sni: str = SNI) -> str | None:
        """
        @return: The name of the app chosen, or L{None}.
        """
        site = self.gateway.site(request(authority=authority), sni)
        return None if site is None else site.app.name

    def test_host(self) -> None:
        """
        The host names the app, with or without a port, in any case, with a final dot.
        """
        self.assertEqual(self.site(b"myapp.localhost"), "myapp")
        self.assertEqual(self.site(b"MyApp.LocalHost.:8443"), "myapp")

    def test_coalesced(self) -> None:
        """
        A request for the other app on a connection made for this one (HTTP/2 connection
        reuse, with a certificate covering both) goes to the other app.
        """
        self.assertEqual(self.site(b"other.localhost:8443"), "other")

    def test_misdirected(self) -> None:
        """
        A host that is not an app on the SNI's tunnel domain chooses nothing, and the request gets
        421.
        """
        self.assertIsNone(self.site(b"unknown.localhost"))
        self.assertIsNone(self.site(b"myapp.evil.example"))
        self.assertIsNone(self.site(b"localhost"))
        self.assertIsNone(self.site(b"[::1]:8443"))
        response = self.refused(request(authority=b"myapp.evil.example"), 421)
        self.assertIn(b"myapp.evil.example", response.body)

    def test_noHost(self) -> None:
        """
        Without a host the SNI decides.
        """
        self.assertEqual(self.site(b""), "myapp")
        self.assertEqual(self.site(b"", "other.localhost"), "other")

    def test_origin(self) -> None:
        """
        The pairing link is on the host and port the visitor used.
        """
        site = self.gateway.site(request(authority=b"MYAPP.localhost:9443"), SNI)
        assert site is not None
        self.assertEqual(site.origin, "https://myapp.localhost:9443")
        self.assertEqual(site.domain, "localhost")


class LocalTests(GatewayTestCase):
    """
    Paths under C{/.portal/} are the gateway's own: never the app's.
    """

    def test_noPages(self) -> None:
        """
        Without pages such a path is 404, however it is written, and no authenticator is asked.
        """
        for path in (
            b"/.portal/pair",
            b"/.portal",
            b"/.portal/",
            b"/x/../.portal/pair",
            b"/%2Eportal/pair",
            b"//.portal/pair",
            b"/.portal/pair?x=1",
        ):
            self.refused(request(path, ((b"x-fake-terminal", b"t1"),)), 404)
        self.assertEqual(self.terminals.seen, [])

    def test_notLocal(self) -> None:
        """
        Other paths that merely look alike are the app's.
        """
        for path in (b"/.portalx", b"/x/.portal/pair", b"/?/.portal/"):
            self.refused(request(path), 401)

    def test_pages(self) -> None:
        """
        With pages, they answer, with the request as sent (body included).
        """
        pages = FakePages()
        self.gateway.pages = pages
        req = request(b"/.portal/pair?code=1", body=b"form")
        response = self.decide(req)
        self.assertEqual(
            response,
            GatewayResponse(200, ((b"content-type", b"text/plain"),), b"/.portal/pair?code=1"),
        )
        self.assertEqual(pages.seen, [req])


class BodyTests(GatewayTestCase):
    """
    L{Gateway.wantsBody}: when the proxy must hold the whole body before deciding.
    """

    def test_limit(self) -> None:
        """
        The limit is 1 MiB.
        """
        self.assertEqual(MAX_BODY, 1024 * 1024)

    def test_signedRequest(self) -> None:
        """
        A request carrying the credential headers of an authenticator that needs the body: yes.
        """
        signer = FakeAuthenticator("signature", {}, needsBody=True)
        self.gateway.authenticators.append(signer)
        self.assertTrue(self.gateway.wantsBody(request(headers=((b"x-fake-signature", b"s"),))))

    def test_otherwise(self) -> None:
        """
        Without such headers, or when the authenticator does not need the body: no.
        """
        self.gateway.authenticators.append(FakeAuthenticator("signature", {}, needsBody=True))
        self.assertFalse(self.gateway.wantsBody(request()))
        self.assertFalse(self.gateway.wantsBody(request(headers=((b"x-fake-terminal", b"t1"),))))

    def test_localPages(self) -> None:
        """
        A request for the gateway's pages: yes when there are pages, no when it will be a 404.
        """
        self.assertFalse(self.gateway.wantsBody(request(b"/.portal/pair")))
        self.gateway.pages = FakePages()
        self.assertTrue(self.gateway.wantsBody(request(b"/.portal/pair")))
        self.assertFalse(self.gateway.wantsBody(request(b"/x")))


class PageTests(SynchronousTestCase):
    """
    L{page}: the gateway's own pages.
    """

    def test_escaped(self) -> None:
        """
        The message and the pairing link are HTML-escaped.
        """
        response = page(401, "<script>", "https://a<b>", pairing=True)
        self.assertIn(b"&lt;script&gt;", response.body)
        self.assertIn(b"https://a&lt;b&gt;/.portal/pair", response.body)
        self.assertNotIn(b"<script>", response.body)

    def test_titles(self) -> None:
        """
        The title gives the status and its reason.
        """
        for status, reason in ((413, b"Content Too Large"), (421, b"Misdirected Request")):
            self.assertIn(b"<h1>%d %s</h1>" % (status, reason), page(status, "x").body)
