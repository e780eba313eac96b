"""
The app gateway's decisions: for one request, which app it is for, who is calling, whether they
may, and what the app gets.

L{Gateway.decide} gives either a L{GatewayResponse} (the gateway answers; nothing reaches the app)
or L{Admitted}: the app, the caller, and the L{HeaderEdits} to make before the request goes
upstream. The routed HTTP proxy (L{portal.tunnel.httpproxy}, L{portal.tunnel.http2}) asks, then
does what it is told. In order:

 1. The app is the one whose lease hostname the request's C{Host} (C{:authority}) names, on the
    tunnel domain of the connection's SNI; another host gets 421.
 2. Paths under L{LOCAL_PREFIX} go to the L{GatewayPages}, or get 404: never the app.
 3. The entry of the app's C{paths} covering the path decides the access (L{App.policyFor}; 400
    when an app could read the path as one another entry covers).
 4. The authenticators are asked in order; the first L{Caller} wins; none means L{PUBLIC}.
    L{AuthenticationFailed} refuses with its status and message, except on a public path, where
    the caller is then taken to be anonymous.
 5. Access: C{public} admits anyone, C{peer} peers and terminals, C{private} terminals. Refused:
    401 without a caller, 403 with one of the wrong type; the page says how to pair a device.
 6. Headers: every C{X-Ptl-*} header of the visitor and every authenticator's credential headers
    and cookies are removed, and the path's templates rendered and added (500 if a value has a
    control character).
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping, Sequence

import attrs
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from portal.gateway.appjson import (
    HEADER_PREFIX,
    AmbiguousPath,
    App,
    PathPolicy,
    TemplateRefused,
    requestPaths,
)
from portal.gateway.caller import (
    CLIENT_TYPES,
    LOCAL_PREFIX,
    PUBLIC,
    AuthenticationFailed,
    Authenticator,
    Caller,
    GatewayPages,
    GatewayRequest,
    GatewayResponse,
)
from portal.trust.identity import shortId
from portal.trust.names import normaliseHostname

#: The largest request body the gateway holds whole, for an authenticator that needs it or a page
#: of its own; a larger one gets 413.
MAX_BODY = 1024 * 1024

#: Seconds the authenticators and pages may take to answer; then the request gets 504.
DECISION_TIMEOUT = 30.0

#: Where a device pairs, under the app's own hostname.
PAIR_PATH = LOCAL_PREFIX.decode("ascii") + "pair"

_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    413: "Content Too Large",
    421: "Misdirected Request",
    500: "Internal Server Error",
    504: "Gateway Timeout",
}


@attrs.frozen
class HeaderEdits:
    """
    What the gateway changes in the headers of a request it admits.

    @ivar strip: Lowercase names of headers to remove (the authenticators' credential headers),
        besides every header starting with C{X-Ptl-}, which is always removed.
    @ivar stripCookies: Names of cookies to remove from the C{Cookie} headers.
    @ivar add: The headers to add: the rendered templates of the path.
    """

    strip: frozenset[bytes] = frozenset()
    stripCookies: frozenset[bytes] = frozenset()
    add: tuple[tuple[bytes, bytes], ...] = ()

    def stripped(self, headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """
        Remove what the app must not get.

        @param headers: A request's headers, names in any case.
        @return: C{headers} without C{X-Ptl-*} headers, without L{strip} headers, and with the
            remaining cookies of every C{Cookie} header in one C{Cookie} header where the first one
            was (none if no cookie is left).
        """
        out: list[tuple[bytes, bytes]] = []
        cookies: list[bytes] = []
        cookieAt: int | None = None
        for name, value in headers:
            lower = name.lower()
            if lower.startswith(HEADER_PREFIX) or lower in self.strip:
                continue
            if lower == b"cookie":
                if cookieAt is None:
                    cookieAt = len(out)
                cookies += keptCookies(value, self.stripCookies)
                continue
            out.append((name, value))
        if cookieAt is not None and cookies:
            out.insert(cookieAt, (b"Cookie", b"; ".join(cookies)))
        return out

    def apply(self, headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """
        @param headers: A request's headers.
        @return: L{stripped} headers followed by L{add}.
        """
        return self.stripped(headers) + list(self.add)


def keptCookies(value: bytes, names: frozenset[bytes]) -> list[bytes]:
    """
    Split a C{Cookie} header and drop some cookies.

    @param value: The header's value: C{name=value} pairs separated by C{;}.
    @param names: The names of the cookies to drop (case-sensitive, as cookie names are).
    @return: The other pairs, as sent but for surrounding whitespace.
    """
    kept = []
    for pair in value.split(b";"):
        pair = pair.strip(b" \t")
        if pair and pair.partition(b"=")[0].strip(b" \t") not in names:
            kept.append(pair)
    return kept


@attrs.frozen
class Admitted:
    """
    A request the app may get.

    @ivar app: The app it is for.
    @ivar caller: Who is calling.
    @ivar edits: What to change in its headers first.
    """

    app: App
    caller: Caller
    edits: HeaderEdits


@attrs.frozen
class Site:
    """
    The app a request is for, and where the visitor reached it.

    @ivar app: The app.
    @ivar domain: The tunnel domain of the lease hostname (the SNI without the app's label).
    @ivar origin: C{https://HOST[:PORT]} as the visitor wrote it, for links on the gateway's pages.
    """

    app: App
    domain: str
    origin: str


def accessRefusal(access: str, caller: Caller) -> int | None:
    """
    Decide whether a caller may open a path.

    @param access: The path's access, one of L{portal.gateway.appjson.ACCESS_LEVELS}.
    @param caller: Who is calling.
    @return: L{None} when the caller may; else 401 for an anonymous caller, 403 for a caller of
        the wrong type. The owner's terminals may open every path, peers C{peer} and C{public}
        paths, anyone C{public} paths.
    """
    if access == "public" or caller.type == "terminal":
        return None
    if access == "peer" and caller.type == "peer":
        return None
    return 401 if caller.type == "public" else 403


def templateValues(caller: Caller, domain: str, identityId: str) -> dict[str, str]:
    """
    @param caller: Who is calling.
    @param domain: The tunnel domain the request came in on.
    @param identityId: The tunnel identity's full id.
    @return: The value of every template name.
    """
    return {
        "auth.client_type": caller.type,
        "auth.client_id": caller.id,
        "auth.client_name": caller.name,
        "portal.domain": domain,
        "portal.id": identityId,
        "portal.short_id": shortId(identityId),
    }


def headerEdits(
    authenticators: Sequence[Authenticator], policy: PathPolicy, values: Mapping[str, str]
) -> HeaderEdits:
    """
    @param authenticators: Every authenticator (all their credentials are removed, not only the
        winner's).
    @param policy: The entry of C{paths} that covers the request.
    @param values: The template values (L{templateValues}).
    @return: The edits for an admitted request.
    @raise TemplateRefused: If a rendered value would contain a control character.
    """
    return HeaderEdits(
        strip=frozenset(h.lower() for a in authenticators for h in a.credentialHeaders),
        stripCookies=frozenset(c for a in authenticators for c in a.credentialCookies),
        add=tuple((template.name, template.render(values)) for template in policy.headers),
    )


def page(
    status: int, message: str, origin: str | None = None, pairing: bool = False
) -> GatewayResponse:
    """
    A small HTML page of the gateway's own.

    @param status: The status code.
    @param message: What happened, plain text.
    @param origin: C{https://HOST[:PORT]} of the app, for the pairing link.
    @param pairing: Whether to say how to pair this device with the owner's machine.
    @return: The response: C{Cache-Control: no-store}, and on a 401 a C{WWW-Authenticate}
        challenge.
    """
    title = f"{status} {_TITLES.get(status, 'Error')}"
    body = (
        f"<!doctype html><meta charset=utf-8><title>{title}</title>"
        f"<h1>{title}</h1><p>{html.escape(message)}</p>"
    )
    if pairing and origin is not None:
        link = html.escape(origin + PAIR_PATH)
        body += (
            "<p>If this is one of the owner's own devices, pair it: run <code>portal pair</code> "
            "on the machine that publishes this app, then open "
            f'<a href="{link}">{link}</a> on this device.</p>'
        )
    body += "<p><small>portal app gateway</small></p>\n"
    headers = [
        (b"content-type", b"text/html; charset=utf-8"),
        (b"cache-control", b"no-store"),
    ]
    if status == 401:
        headers.append((b"www-authenticate", b'Portal realm="portal"'))
    return GatewayResponse(status, tuple(headers), body.encode("utf-8"))


def _authority(authority: bytes) -> tuple[str, str]:
    """
    @param authority: A C{Host} or C{:authority} as sent.
    @return: Its host, normalised (L{normaliseHostname}), and C{:PORT} if it has a numeric port
        (else C{""}).
    """
    text = authority.decode("ascii", "replace").strip()
    host, sep, port = text.rpartition(":")
    if sep and port.isascii() and port.isdigit() and not host.endswith("]"):
        return normaliseHostname(host), ":" + port
    return normaliseHostname(text), ""


class Gateway:
    """
    The app gateway of one tunnel: its apps, the authenticators that say who is calling, and the
    gateway's own pages.

    @ivar apps: The apps by name.
    @ivar authenticators: Asked in this order; the first caller wins. The list may be changed at
        any time (the tunnel service fills it, see L{portal.tunnel.service.TunnelService}).
    @ivar pages: The pages under L{LOCAL_PREFIX}, or L{None} (every such path is 404).
    @ivar identityId: The tunnel identity's full id (C{{{ portal.id }}}).
    @ivar clock: Times out decisions after L{DECISION_TIMEOUT} seconds, or L{None} for no timeout.
    """

    _log = Logger()

    def __init__(
        self,
        apps: Sequence[App],
        identityId: str,
        authenticators: Sequence[Authenticator] = (),
        pages: GatewayPages | None = None,
        clock: IReactorTime | None = None,
    ) -> None:
        self.apps = {app.name: app for app in apps}
        self.identityId = identityId
        self.authenticators = list(authenticators)
        self.pages = pages
        self.clock = clock

    def site(self, request: GatewayRequest, sni: str) -> Site | None:
        """
        Find the app a request is for.

        @param request: The request.
        @param sni: The SNI of the visitor's connection (one of the tunnel's lease hostnames).
        @return: The app whose lease hostname the request's authority (or, without one, the SNI)
            names, if that hostname is on the SNI's tunnel domain; else L{None}.
        """
        sniHost = normaliseHostname(sni)
        host, port = _authority(request.authority) if request.authority else (sniHost, "")
        label, _, domain = host.partition(".")
        app = self.apps.get(label)
        if app is None or domain != sniHost.partition(".")[2]:
            return None
        return Site(app, domain, f"https://{host}{port}")

    def isLocal(self, request: GatewayRequest) -> bool:
        """
        @return: Whether the request's path is the gateway's own (under L{LOCAL_PREFIX}, or the
            prefix without its final C{/}), however an app might read it.
        """
        paths = requestPaths(request.path.decode("latin-1"))
        local = LOCAL_PREFIX.decode("ascii")
        return paths is not None and any(
            path == local[:-1] or path.startswith(local) for path in paths
        )

    def wantsBody(self, request: GatewayRequest) -> bool:
        """
        Say whether L{decide} needs the request's whole body (up to L{MAX_BODY}).

        @param request: The request's head (no body).
        @return: Whether it is for the gateway's own pages, or carries the credential headers of
            an authenticator that needs the body.
        """
        if self.pages is not None and self.isLocal(request):
            return True
        return any(
            authenticator.needsBody
            and any(
                request.header(name.lower()) is not None for name in authenticator.credentialHeaders
            )
            for authenticator in self.authenticators
        )

    def decide(self, request: GatewayRequest, sni: str) -> Deferred[Admitted | GatewayResponse]:
        """
        Decide what happens to a request.

        @param request: The request; with its body when L{wantsBody} said so.
        @param sni: The SNI of the visitor's connection.
        @return: A L{Deferred} firing with the gateway's answer, or with L{Admitted}; it does not
            fail (an unexpected error is logged and answered with 500, an authenticator or page that
            has not answered after L{DECISION_TIMEOUT} seconds is cancelled and the answer is 504).
        """
        d = Deferred.fromCoroutine(self._decide(request, sni))
        if self.clock is not None:
            d.addTimeout(DECISION_TIMEOUT, self.clock)
        return d

    async def _decide(self, request: GatewayRequest, sni: str) -> Admitted | GatewayResponse:
        """
        L{decide}, as a coroutine.
        """
        try:
            return await self._decideOrRaise(request, sni)
        except CancelledError:
            self._log.warn(
                "app gateway: no decision on {method} {path} in {timeout} s",
                method=request.method.decode("latin-1"),
                path=request.path.decode("latin-1"),
                timeout=DECISION_TIMEOUT,
            )
            return page(504, "The app gateway could not decide on this request in time.")
        except Exception:
            self._log.failure(
                "app gateway: error deciding {method} {path}",
                method=request.method.decode("latin-1"),
                path=request.path.decode("latin-1"),
            )
            return page(500, "The app gateway failed to handle this request.")

    async def _decideOrRaise(self, request: GatewayRequest, sni: str) -> Admitted | GatewayResponse:
        """
        L{decide}, letting unexpected errors out.
        """
        site = self.site(request, sni)
        if site is None:
            return page(
                421,
                f"{request.authority.decode('ascii', 'replace')} is not served on this "
                "connection; connect to it by its own name.",
            )
        if self.isLocal(request):
            if self.pages is None:
                return page(404, "The gateway has no page here.")
            return await self.pages.render(request)
        try:
            policy = site.app.policyFor(request.path.decode("latin-1"))
        except AmbiguousPath as e:
            return page(
                400,
                f"{e}: an escaped slash, a backslash, an empty segment or a ';' parameter could "
                "make the app read it as another path than the gateway does.",
            )
        caller = await self._caller(request, policy, site)
        if isinstance(caller, GatewayResponse):
            return caller
        status = accessRefusal(policy.access, caller)
        if status is not None:
            return self._refusal(status, policy, caller, site)
        values = templateValues(caller, site.domain, self.identityId)
        try:
            edits = headerEdits(self.authenticators, policy, values)
        except TemplateRefused as e:
            self._log.warn(
                "app gateway: refused {method} {path} from {caller}: {reason}",
                method=request.method.decode("latin-1"),
                path=request.path.decode("latin-1"),
                caller=caller.id or caller.type,
                reason=str(e),
            )
            return page(500, f"The gateway cannot send this request to the app: {e}.")
        return Admitted(site.app, caller, edits)

    async def _caller(
        self, request: GatewayRequest, policy: PathPolicy, site: Site
    ) -> Caller | GatewayResponse:
        """
        Ask the authenticators in order who is calling.

        @return: The first caller one of them proves, L{PUBLIC} if none does; the refusal when one
            raises L{AuthenticationFailed} on a path that is not public.
        """
        for authenticator in self.authenticators:
            try:
                caller = await authenticator.authenticate(request)
            except AuthenticationFailed as e:
                self._log.info(
                    "app gateway: {method} {path}: authentication failed: {reason}",
                    method=request.method.decode("latin-1"),
                    path=request.path.decode("latin-1"),
                    reason=e.message,
                )
                if policy.access == "public":
                    # Anyone may open this path: a stale session must not lock its owner out.
                    return PUBLIC
                return page(e.status, e.message, site.origin, pairing=e.status == 401)
            if caller is not None:
                if caller.type not in CLIENT_TYPES:
                    raise ValueError(f"{authenticator!r} gave a caller of type {caller.type!r}")
                return caller
        return PUBLIC

    def _refusal(
        self, status: int, policy: PathPolicy, caller: Caller, site: Site
    ) -> GatewayResponse:
        """
        @return: The page refusing C{caller} a path with C{policy}.
        """
        if policy.access == "private":
            what = "This page is private: only the owner's own devices may open it."
        else:
            what = (
                "This page is for the owner's contacts (other Portal owners, whose requests are "
                "signed with their identity) and the owner's own devices."
            )
        if status == 403:
            who = f"{caller.type} {caller.name or caller.id}".strip()
            what = f"You are signed in as {who}. {what}"
        return page(status, what, site.origin, pairing=True)
