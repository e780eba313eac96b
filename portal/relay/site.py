"""
The relay's own web pages: the dashboard (L{portal.relay.dashboard}), C{/healthz}, C{/metrics} and the
signed descriptor C{/.well-known/portal-relay.json}, served over TLS on the relay's own hostname and, on the optional
plain-HTTP listener, next to a redirect to https.
"""

from __future__ import annotations

from typing import Any, cast

from prometheus_client import CONTENT_TYPE_LATEST
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from twisted.web.util import Redirect

import portal
from portal.registry.descriptor import RelayDescriptor, signDescriptor
from portal.relay.dashboard import AdminCheck, Dashboard, StatusAPI
from portal.relay.router import Router


class Health(Resource):
    """
    C{/healthz}: C{ok} while the relay runs.
    """

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        """
        @return: C{ok}.
        """
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"ok\n"


def describeRelay(router: Router) -> RelayDescriptor:
    """
    What the relay says about itself in its descriptor, issued now.

    @param router: The relay's state.
    """
    modes = ["stream"]
    tcpPorts = udpPorts = None
    if router.tcp is not None:
        modes.append("tcp")
        tcpPorts = str(router.tcp.allocator.portRange)
    if router.udp is not None:
        modes.append("udp")
        udpPorts = str(router.udp.ports.allocator.portRange)
    return RelayDescriptor(
        id=router.identity.id,
        publicKey=router.identity.publicKey,
        domain=router.relayDomain,
        tunnelDomain=router.tunnelDomain,
        publicPort=router.publicPort,
        controlPort=router.controlPort,
        modes=tuple(modes),
        tcpPorts=tcpPorts,
        udpPorts=udpPorts,
        software=f"portal-relay/{portal.__version__}",
        issued=int(router.clock.seconds()),
    )


class Descriptor(Resource):
    """
    C{/.well-known/portal-relay.json}: the relay's descriptor, signed afresh for each request.
    """

    isLeaf = True

    def __init__(self, router: Router) -> None:
        super().__init__()
        self._router = router

    def render_GET(self, request: Request) -> bytes:
        """
        @return: The signed descriptor document.
        """
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"access-control-allow-origin", b"*")
        return signDescriptor(self._router.identity, describeRelay(self._router))


def wellKnown(router: Router) -> Resource:
    """
    @return: The C{/.well-known/} resource, holding the descriptor.
    """
    resource = Resource()
    resource.putChild(b"portal-relay.json", Descriptor(router))
    return resource


class Metrics(Resource):
    """
    C{/metrics}: the relay's metrics in the Prometheus text format (L{portal.relay.metrics}).
    """

    isLeaf = True

    def __init__(self, router: Router) -> None:
        super().__init__()
        self._router = router

    def render_GET(self, request: Request) -> bytes:
        """
        @return: The metrics text.
        """
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        return self._router.metrics.render()


class DeadlineChannel(HTTPChannel):
    """
    An HTTP/1.1 channel that must receive each request's headers within its site's
    C{headerTimeout}: counted from the connection's start (a TLS handshake included, since TLS
    connects its protocol at once) and again from the end of each response. The idle timeout
    (C{timeOut}) alone is reset by every byte, so a client sending one byte a minute would hold
    the connection for ever.
    """

    site: RelaySite
    _headerCall: Any = None

    def connectionMade(self) -> None:
        """
        Start the header deadline.
        """
        super().connectionMade()
        self._armHeaderDeadline()

    def _armHeaderDeadline(self) -> None:
        """
        Start waiting for a request's headers, unless already waiting.
        """
        if self._headerCall is None:
            self._headerCall = self.callLater(self.site.headerTimeout, self._headersTooSlow)

    def _disarmHeaderDeadline(self) -> None:
        """
        Stop waiting for headers.
        """
        if self._headerCall is not None:
            if self._headerCall.active():
                self._headerCall.cancel()
            self._headerCall = None

    def allHeadersReceived(self) -> None:
        """
        A request's headers are complete: the deadline is met.
        """
        self._disarmHeaderDeadline()
        super().allHeadersReceived()

    def requestDone(self, request: Any) -> None:
        """
        A response is finished: the next request's headers have a deadline again, unless a
        pipelined request already sent them and is being handled.
        """
        super().requestDone(request)
        if self._handlingRequest or self.transport is None:
            return
        if not getattr(self.transport, "disconnecting", False):
            self._armHeaderDeadline()

    def _headersTooSlow(self) -> None:
        """
        No complete headers in time: count, log and abort.
        """
        self._headerCall = None
        assert self.transport is not None
        self.site.refusals.refuse(
            "http_header_timeout",
            "closed a connection from {peer} to the relay's pages: no complete request headers "
            "within {timeout} s",
            peer=getattr(self.transport.getPeer(), "host", ""),
            timeout=self.site.headerTimeout,
        )
        cast(ITCPTransport, self.transport).abortConnection()

    def timeoutConnection(self) -> None:
        """
        Silent for the idle timeout: count and log, then close as L{HTTPChannel} does.
        """
        assert self.transport is not None
        self.site.refusals.refuse(
            "http_idle_timeout",
            "closing a connection from {peer} to the relay's pages: silent for {timeout} s",
            peer=getattr(self.transport.getPeer(), "host", ""),
            timeout=self.timeOut,
        )
        super().timeoutConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """
        Stop the header deadline.
        """
        self._disarmHeaderDeadline()
        super().connectionLost(reason)


class RelaySite(Site):
    """
    The relay's own pages, served by L{DeadlineChannel}s on the router's clock, with its header
    and idle timeouts (L{RelayLimits.siteHeaderTimeout}, L{RelayLimits.siteIdleTimeout}).

    @ivar headerTimeout: Seconds a connection has to send a request's headers.
    @ivar refusals: Where timeouts are counted and logged.
    """

    protocol = DeadlineChannel  # type: ignore[assignment]

    def __init__(self, root: Resource, router: Router) -> None:
        """
        @param root: The root resource.
        @param router: The relay's state: clock, limits and refusal counts.
        """
        super().__init__(root, timeout=router.limits.siteIdleTimeout, reactor=router.clock)
        self.headerTimeout = router.limits.siteHeaderTimeout
        self.refusals = router.refusals

    def acceptableProtocols(self) -> list[bytes]:
        """
        The protocols TLS may negotiate with ALPN: HTTP/1.1 only. L{DeadlineChannel} speaks no
        HTTP/2; offering C{h2} (as L{Site} does when HTTP/2 is installed) made browsers and curl
        send HTTP/2 to it, which failed.

        @return: C{[b"http/1.1"]}.
        """
        return [b"http/1.1"]


def relaySite(router: Router, adminToken: str | None = None) -> Site:
    """
    The site served over TLS on the relay's own hostname: the dashboard and its API, health,
    metrics and the descriptor.

    @param router: The relay's state.
    @param adminToken: The token that shows the operator's view of the dashboard, or L{None}.
    @return: A L{Site}.
    """
    root = Dashboard(router)
    api = Resource()
    api.putChild(b"status", StatusAPI(router, AdminCheck(router, adminToken)))
    root.putChild(b"api", api)
    root.putChild(b"healthz", Health())
    root.putChild(b"metrics", Metrics(router))
    root.putChild(b".well-known", wellKnown(router))
    return RelaySite(root, router)


class _HTTPRoot(Resource):
    """
    The plain-HTTP root: health, metrics and the descriptor, everything else redirected to https.
    """

    def __init__(self, router: Router) -> None:
        super().__init__()
        self._router = router
        self.putChild(b"healthz", Health())
        self.putChild(b"metrics", Metrics(router))
        self.putChild(b".well-known", wellKnown(router))

    def getChild(self, path: bytes, request: Request) -> Resource:
        """
        Redirect to the same host and path over https on the public port.
        """
        host = (request.getRequestHostname() or b"").decode("ascii", "replace")
        port = self._router.publicPort
        authority = host if port == 443 else f"{host}:{port}"
        uri = request.uri.decode("ascii", "replace")
        return Redirect(f"https://{authority}{uri}".encode("ascii", "replace"))


def httpSite(router: Router) -> Site:
    """
    The site of the optional plain-HTTP listener.

    @param router: The relay's state.
    @return: A L{Site}.
    """
    return RelaySite(_HTTPRoot(router), router)
