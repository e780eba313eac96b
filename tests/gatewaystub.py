"""
An in-memory stand-in for the app gateway's handling of C{/.portal/} pages, for tests of the
command-line terminal: a C{twisted.web} resource that hands every request to a
L{portal.gateway.caller.GatewayPages} and, for other paths, answers with who the
L{portal.gateway.caller.Authenticator} says is calling.  Used with L{treq.testing.StubTreq}.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from portal.gateway.caller import (
    LOCAL_PREFIX,
    AuthenticationFailed,
    Authenticator,
    Caller,
    GatewayPages,
    GatewayRequest,
    GatewayResponse,
)


def gatewayRequest(request: Request, authority: bytes | None = None) -> GatewayRequest:
    """
    @param request: A twisted.web request.
    @param authority: The host to present (by default its C{Host} header).
    @return: It as the gateway gives it to pages and authenticators.
    """
    headers = tuple(
        (name.lower(), value)
        for name, values in request.requestHeaders.getAllRawHeaders()
        for value in values
    )
    assert request.content is not None
    body = request.content.read()
    return GatewayRequest(
        request.method,
        authority if authority is not None else (request.getHeader(b"host") or b""),
        request.uri,
        headers,
        body,
        ("192.0.2.10", 5000),
    )


class GatewayStub(Resource):
    """
    Serves pages under C{/.portal/}, and C{{"caller": ...}} (or the authenticator's refusal) for
    any other path.

    @ivar requests: Every request received, as the gateway saw it.
    @ivar authority: The host to present instead of the request's C{Host} header, if set.
    """

    isLeaf = True

    def __init__(self, pages: GatewayPages, authenticator: Authenticator) -> None:
        super().__init__()
        self.pages = pages
        self.authenticator = authenticator
        self.requests: list[GatewayRequest] = []
        self.authority: bytes | None = None

    def render(self, request: Request) -> Any:  # type: ignore[override]
        """
        Answer from the pages, or say who is calling.
        """
        req = gatewayRequest(request, self.authority)
        self.requests.append(req)
        if req.path.startswith(LOCAL_PREFIX):
            d = self.pages.render(req)
        else:
            d = self.authenticator.authenticate(req).addCallbacks(self._caller, self._refused)
        d.addCallback(self._write, request)
        return NOT_DONE_YET

    def _caller(self, caller: Caller | None) -> GatewayResponse:
        body = json.dumps({"caller": None if caller is None else [caller.type, caller.id]})
        return GatewayResponse(200, (), body.encode())

    def _refused(self, failure: Any) -> GatewayResponse:
        failure.trap(AuthenticationFailed)
        return GatewayResponse(failure.value.status, (), failure.value.message.encode())

    def _write(self, response: GatewayResponse, request: Request) -> None:
        request.setResponseCode(response.status)
        for name, value in response.headers:
            request.responseHeaders.addRawHeader(name, value)
        request.write(response.body)
        request.finish()
