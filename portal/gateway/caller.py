"""
What the app gateway's parts agree on: who a caller is, what an authenticator is given and answers,
and the gateway's own pages under C{/.portal/}.

The gateway (C{portal.gateway.access}) decides, per path of an C{app.json}, who may call; the
authenticators (paired terminals, peers) say who is calling; the gateway's own pages (pairing) answer
requests under L{LOCAL_PREFIX} without reaching the app.
"""

from __future__ import annotations

from typing import Protocol

import attrs
from twisted.internet.defer import Deferred

#: The values of C{{{ auth.client_type }}}.
CLIENT_TYPES = ("terminal", "peer", "public")

#: Paths under this prefix are the gateway's own (pairing, sessions); they never reach an app.
LOCAL_PREFIX = b"/.portal/"


@attrs.frozen
class Caller:
    """
    Who is calling.

    @ivar type: C{"terminal"} (a device paired to the owner), C{"peer"} (another Portal owner in the
        contact list) or C{"public"} (anyone else).
    @ivar id: The caller's id: a terminal's key-derived id, a peer's full identity id; C{""} for an
        anonymous public caller.
    @ivar name: A human name for the caller (the terminal's or contact's name), or C{""}.
    """

    type: str
    id: str = ""
    name: str = ""


#: An anonymous caller.
PUBLIC = Caller("public")


@attrs.frozen
class GatewayRequest:
    """
    What an authenticator or a gateway page sees of a visitor's request.

    @ivar method: The method, e.g. C{b"GET"}.
    @ivar authority: The C{Host} (HTTP/1.1) or C{:authority} (HTTP/2), as sent.
    @ivar path: The request target as sent (path and query).
    @ivar headers: The request's headers, names lowercased, in order.
    @ivar body: The whole body when the gateway buffered it (requests carrying a signature, pages
        under L{LOCAL_PREFIX}), else L{None}.
    @ivar peer: The visitor's address C{(host, port)}.
    """

    method: bytes
    authority: bytes
    path: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes | None = None
    peer: tuple[str, int] = ("", 0)

    def header(self, name: bytes) -> bytes | None:
        """
        @param name: A lowercase header name.
        @return: The first value of header C{name}, or L{None}.
        """
        for key, value in self.headers:
            if key == name:
                return value
        return None


@attrs.frozen
class GatewayResponse:
    """
    An answer the gateway gives itself, without the app.

    @ivar status: The HTTP status code.
    @ivar headers: Response headers, names lowercased.
    @ivar body: The body.
    """

    status: int
    headers: tuple[tuple[bytes, bytes], ...] = ()
    body: bytes = b""


class AuthenticationFailed(Exception):
    """
    The request carries credentials of an authenticator's kind, and they are not good (a revoked
    terminal, a bad or replayed signature, a stale session). The gateway answers C{status} with
    C{message} and nothing reaches the app.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Authenticator(Protocol):
    """
    Says who is calling, from one kind of credentials.

    @ivar credentialHeaders: Lowercase names of the request headers that carry this kind of
        credentials; the gateway strips them before the request reaches the app.
    @ivar credentialCookies: Names of the cookies that carry them; stripped likewise.
    @ivar needsBody: Whether L{authenticate} needs the whole body of a request that carries these
        credentials (a signature over a content digest).
    """

    credentialHeaders: frozenset[bytes]
    credentialCookies: frozenset[bytes]
    needsBody: bool

    def authenticate(self, request: GatewayRequest) -> Deferred[Caller | None]:
        """
        @return: A L{Deferred} firing with the L{Caller} the credentials prove, or L{None} when the
            request carries none of this kind; failing with L{AuthenticationFailed} when it carries
            bad ones.
        """


class GatewayPages(Protocol):
    """
    The gateway's own pages, for requests whose path starts with L{LOCAL_PREFIX}.
    """

    def render(self, request: GatewayRequest) -> Deferred[GatewayResponse]:
        """
        @return: A L{Deferred} firing with the answer (404 for a path these pages do not have).
        """
