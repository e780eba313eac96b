"""
The local peer endpoint: how apps call peers through their own tunnel without handling keys.

An app sends a plain HTTP request to C{http://127.0.0.1:<port>/peer/<identity-id>/<path>}; the
tunnel looks the identity up in its contacts, signs the request with its own identity
(L{portal.gateway.signatures.signRequest}) for the peer's URL, sends it there over HTTPS and
streams the answer back.  The endpoint listens on a loopback address only.

TLS to a peer is verified: against the peer's CA when its contact has one (a Portal's local CA is
not publicly trusted), else against the system's certificate authorities.  The request signature
proves who is calling; the verified TLS proves to the caller that it talks to the peer's tunnel, so
that neither the relay nor anyone on the path reads or answers in the peer's place.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from io import BytesIO
from typing import Any, cast
from typing import Protocol as Interface

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL
from twisted.application.service import Service
from twisted.internet import task
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    TimeoutError,
    ensureDeferred,
    succeed,
)
from twisted.internet.endpoints import HostnameEndpoint, serverFromString, wrapClientTLS
from twisted.internet.error import ConnectError
from twisted.internet.error import TimeoutError as ConnectTimeoutError
from twisted.internet.interfaces import (
    IListeningPort,
    IOpenSSLClientConnectionCreator,
    IPushProducer,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import (
    Certificate,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    URI,
    Agent,
    FileBodyProducer,
    HTTPConnectionPool,
    ResponseDone,
    ResponseFailed,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IPolicyForHTTPS, IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from portal.gateway.contacts import Contact, ContactsError, InvalidContact, validateIdentityId
from portal.gateway.loopback import isLoopbackHost, loopbackEndpoint, parseLoopbackAddress
from portal.gateway.signatures import CREDENTIAL_HEADERS, ContactLookup, signRequest
from portal.trust.identity import Identity
from portal.wire.httpheaders import HOP_BY_HOP


class Reporter(Interface):
    """
    Where the endpoint reports its state (the tunnel's event reporter implements it).
    """

    def state(self, event: str, relay: str, message: str, **fields: Any) -> None:
        """
        A change of state, as in the tunnel's reporter.
        """


#: Where the endpoint listens unless told otherwise: loopback, a port the OS chooses.
DEFAULT_ADDRESS = "127.0.0.1:0"

#: Seconds a peer has to answer a request (connection, TLS and the response's headers).
RESPONSE_TIMEOUT = 30.0

#: Seconds to establish a TCP connection to one of a peer's URLs before trying the next.
CONNECT_TIMEOUT = 10.0

#: Largest request body an app may send to a peer: what a peer's gateway holds whole to check its
#: digest (C{portal.gateway.access.MAX_BODY}); a larger one would be refused there with 413.
MAX_BODY = 1024 * 1024

#: The path prefix of calls to peers.
PREFIX = b"/peer/"

_CALL = re.compile(rb"\A/peer/([^/?]*)(.*)\Z", re.DOTALL)

#: An HTTP method (RFC 9110 token), and a request target in origin form: printable ASCII without
#: a fragment.
_TOKEN = re.compile(rb"\A[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
_TARGET = re.compile(rb"\A/[\x21\x22\x24-\x7e]*\Z")

#: Request header fields not copied from the app's request: the hop-by-hop ones, those the
#: agent sets (C{Host}, C{Content-Length}) and those the signature sets.
_NOT_FORWARDED = HOP_BY_HOP | {b"host", b"content-length", b"content-digest"} | CREDENTIAL_HEADERS


def parseEndpointAddress(text: str) -> tuple[str, int]:
    """
    Parse the local peer endpoint's address (L{parseLoopbackAddress}).

    @param text: C{PORT}, C{HOST:PORT} or C{[IPV6]:PORT}; port 0 lets the OS choose.
    @return: The address and port.
    @raise portal.gateway.loopback.EndpointAddressError: If it is malformed or the host is not a loopback address: the
        endpoint signs with the tunnel's identity for whoever can reach it.
    """
    return parseLoopbackAddress(
        text,
        "the peer endpoint",
        "anyone who can reach it can call peers with this tunnel's identity",
    )


@implementer(IPolicyForHTTPS)
class PeerTLSPolicy:
    """
    How the endpoint verifies a peer's TLS: against the CA in its contact, or the system's CAs.
    """

    def __init__(self, ca: str | None) -> None:
        """
        @param ca: PEM certificates to trust, or L{None} for the platform's trust store.
        """
        if ca is None:
            self._trustRoot: Any = platformTrust()
        else:
            self._trustRoot = trustRootFromCertificates(
                [
                    Certificate.loadPEM(certificate.public_bytes(Encoding.PEM))
                    for certificate in x509.load_pem_x509_certificates(ca.encode("ascii"))
                ]
            )

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        """
        @param hostname: The peer's host, sent as SNI and checked against its certificate.
        @param port: Its port.
        @return: Client TLS options verifying the peer.
        """
        return optionsForClientTLS(hostname.decode("ascii"), trustRoot=self._trustRoot)


def connectHost(host: str) -> str:
    """
    @param host: A peer URL's host.
    @return: Where to connect for it: C{localhost} for names under C{.localhost} (RFC 6761), as
        browsers and curl do, so a local relay's tunnels need no DNS set-up; else C{host}.
    """
    host = host.lower()
    return "localhost" if host == "localhost" or host.endswith(".localhost") else host


@implementer(IAgentEndpointFactory)
class _PeerEndpointFactory:
    """
    Connections to a peer: TLS with its L{PeerTLSPolicy} over a L{HostnameEndpoint} to
    L{connectHost}.
    """

    def __init__(self, reactor: Any, policy: PeerTLSPolicy, connectTimeout: float) -> None:
        self._reactor = reactor
        self._policy = policy
        self._connectTimeout = connectTimeout

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        """
        @param uri: An https URI of the peer.
        @return: The endpoint to connect to it.
        """
        return wrapClientTLS(
            self._policy.creatorForNetloc(uri.host, uri.port),
            HostnameEndpoint(
                self._reactor,
                connectHost(uri.host.decode("ascii")).encode("ascii"),
                uri.port,
                timeout=self._connectTimeout,
            ),
        )


class PeerAgents:
    """
    An HTTP agent per contact, with its own connection pool and its own TLS verification.
    """

    def __init__(self, reactor: Any, connectTimeout: float = CONNECT_TIMEOUT) -> None:
        """
        @param reactor: The reactor.
        @param connectTimeout: Seconds to establish a TCP connection.
        """
        self._reactor = reactor
        self._connectTimeout = connectTimeout
        self._agents: dict[tuple[str, str | None], tuple[Agent, HTTPConnectionPool]] = {}

    def agentFor(self, contact: Contact) -> IAgent:
        """
        @param contact: A peer.
        @return: The agent to call it with, verifying its TLS with its CA, if it has one.
        """
        key = (contact.id, contact.ca)
        if key not in self._agents:
            pool = HTTPConnectionPool(self._reactor, persistent=True)
            pool.retryAutomatically = False  # A retried request would carry a used nonce.
            factory = _PeerEndpointFactory(
                self._reactor, PeerTLSPolicy(contact.ca), self._connectTimeout
            )
            self._agents[key] = (Agent.usingEndpointFactory(self._reactor, factory, pool), pool)
        return self._agents[key][0]

    def close(self) -> Deferred[Any]:
        """
        Close every cached connection.

        @return: A L{Deferred} firing once they are closed.
        """
        pools = [pool for _, pool in self._agents.values()]
        self._agents.clear()
        return DeferredList([pool.closeCachedConnections() for pool in pools])


class _BodyRelay(Protocol):
    """
    Streams a peer's response body to the app's request, with the peer's connection as the
    request's producer (so a slow app slows the peer down instead of filling memory).
    """

    _log = Logger()

    def __init__(self, request: Request) -> None:
        self.request = request
        self.done: Deferred[None] = Deferred()
        self._appGone = False

    def connectionMade(self) -> None:
        """
        Register the peer's connection as the app's producer, and stop reading from the peer if
        the app goes away.
        """
        self.request.registerProducer(self.transport, True)
        self.request.notifyFinish().addErrback(self._appLost)

    def _appLost(self, failure: Failure) -> None:
        """
        The app closed its connection: stop the peer's response.
        """
        self._appGone = True
        cast(IPushProducer, self.transport).stopProducing()

    def dataReceived(self, data: bytes) -> None:
        """
        Pass body bytes to the app.
        """
        if not self._appGone:
            self.request.write(data)

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        """
        Finish the app's response, or cut it short if the peer's response broke off.
        """
        if not self._appGone and self.request.channel is not None:
            self.request.unregisterProducer()
            if reason.check(ResponseDone, PotentialDataLoss):
                self.request.finish()
            else:
                self._log.warn(
                    "a peer's response broke off: {error}", error=reason.getErrorMessage()
                )
                self.request.loseConnection()
        self.done.callback(None)


def _tlsFailure(failure: Failure) -> BaseException | None:
    """
    @return: The TLS error behind a failed request, if that is why it failed.
    """
    error: BaseException | None = failure.value
    if failure.check(SSL.Error):
        return error
    if isinstance(error, ResponseFailed):
        for reason in error.reasons:
            if reason.check(SSL.Error):
                cause: BaseException = reason.value
                return cause
    return None


class PeerEndpointResource(Resource):
    """
    The endpoint's one resource: C{/peer/<identity-id>/<path>} signs the request and forwards it
    to the peer; everything else is a 404.

    Besides the loopback-only listener, requests that look like a browser's are refused (an
    C{Origin} or a cross-site C{Sec-Fetch-Site} header, or a C{Host} that is not a loopback name):
    a web page must not make this tunnel sign requests to its peers.
    """

    isLeaf = True
    _log = Logger()

    def __init__(
        self,
        identity: Identity,
        contacts: ContactLookup,
        agentFor: Callable[[Contact], IAgent],
        clock: IReactorTime,
        timeout: float = RESPONSE_TIMEOUT,
        maxBody: int = MAX_BODY,
        cooperator: Any = task,
    ) -> None:
        """
        @param identity: The tunnel's identity, which signs.
        @param contacts: The contact list.
        @param agentFor: Gives the agent to call a contact with (L{PeerAgents.agentFor}).
        @param clock: Gives the time of signatures and the timeouts.
        @param timeout: Seconds a peer has to answer (L{RESPONSE_TIMEOUT}).
        @param maxBody: Largest request body, in bytes (L{MAX_BODY}).
        @param cooperator: What schedules request bodies' writes (L{twisted.internet.task} by
            default; a L{task.Cooperator} on a test clock in tests).
        """
        super().__init__()
        self.identity = identity
        self.contacts = contacts
        self.agentFor = agentFor
        self.clock = clock
        self.timeout = timeout
        self.maxBody = maxBody
        self.cooperator = cooperator

    def render(self, request: Request) -> bytes | int:
        """
        Check and forward a call to a peer.

        @return: An error page, or C{NOT_DONE_YET} while the peer answers.
        """
        refusal = self._browserRefusal(request)
        if refusal is not None:
            return self._error(request, 403, refusal)
        match = _CALL.match(request.uri)
        if match is None:
            return self._error(request, 404, "not found: call a peer at /peer/<identity-id>/<path>")
        rawId, rest = match.groups()
        target = rest if rest.startswith(b"/") else b"/" + rest
        if not _TOKEN.match(request.method) or not _TARGET.match(target):
            return self._error(
                request, 400, "the method and path must be ASCII (percent-encode the path)"
            )
        try:
            identityId = validateIdentityId(rawId.decode("ascii"))
        except (InvalidContact, UnicodeDecodeError) as e:
            return self._error(request, 404, f"not a peer: {e}")
        try:
            contact = self.contacts.get(identityId)
        except ContactsError as e:
            return self._error(request, 500, str(e))
        if contact is None:
            return self._error(
                request,
                404,
                f"{identityId} is not a contact; add it with `portal peers add {identityId} "
                f"--url https://...`",
            )
        if not contact.urls:
            return self._error(
                request,
                502,
                f"no URL is known for {contact.label}; give one with `portal peers add "
                f"{contact.id} --replace --url https://...`",
            )
        content = request.content
        assert content is not None
        content.seek(0, 2)
        if content.tell() > self.maxBody:
            return self._error(
                request, 413, f"the body is over {self.maxBody} bytes, the most sent to a peer"
            )
        content.seek(0)
        body = content.read()
        method = request.method
        connectionTokens = {
            token.strip().lower()
            for value in request.requestHeaders.getRawHeaders(b"connection", [])
            for token in value.split(b",")
        }
        headers = [
            (name, value)
            for name, values in request.requestHeaders.getAllRawHeaders()
            if name.lower() not in _NOT_FORWARDED and name.lower() not in connectionTokens
            for value in values
        ]
        forwarding = ensureDeferred(self._forward(request, contact, method, target, headers, body))

        def failed(failure: Failure) -> None:
            self._log.failure("calling peer {peer}", failure, peer=contact.id)
            self._finishWithError(request, 500, f"calling {contact.label} failed")

        forwarding.addErrback(failed)
        return NOT_DONE_YET

    def _browserRefusal(self, request: Request) -> str | None:
        """
        @return: Why the request is refused as coming from a browser or another host, or
            L{None}.
        """
        client = request.getClientAddress()
        clientHost = getattr(client, "host", None)
        if clientHost is not None and not isLoopbackHost(clientHost):
            return "the peer endpoint only serves this machine"
        if request.getHeader(b"origin") is not None:
            return "the peer endpoint does not serve web pages (the request has an Origin)"
        fetchSite = request.getHeader(b"sec-fetch-site")
        if fetchSite is not None and fetchSite.lower() != b"none":
            return "the peer endpoint does not serve web pages (Sec-Fetch-Site)"
        hostHeader = request.getHeader(b"host")
        if hostHeader is not None:
            host = hostHeader.decode("latin-1").strip()
            host = host[1:].partition("]")[0] if host.startswith("[") else host.partition(":")[0]
            if not isLoopbackHost(host):
                return f"the Host {host!r} is not this machine's loopback address"
        return None

    def _error(self, request: Request, status: int, message: str) -> bytes:
        """
        Set up a plain-text error response.

        @return: Its body.
        """
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return (message + "\n").encode("utf-8")

    def _finishWithError(self, request: Request, status: int, message: str) -> None:
        """
        Answer a pending request with an error, unless the app has gone.
        """
        if request.finished or request.channel is None:
            return
        request.write(self._error(request, status, message))
        request.finish()

    async def _forward(
        self,
        request: Request,
        contact: Contact,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
    ) -> None:
        """
        Sign the request for each of the peer's URLs in turn until one can be connected to, and
        relay the answer.
        """
        failures: list[str] = []
        for url in contact.urls:
            uri = url.encode("ascii") + target
            sent = URI.fromBytes(uri).originForm
            outgoing = Headers()
            for name, value in headers:
                outgoing.addRawHeader(name, value)
            for name, value in signRequest(
                self.identity,
                method,
                url.removeprefix("https://"),
                sent,
                body,
                int(self.clock.seconds()),
            ):
                outgoing.setRawHeaders(name, [value])
            producer = FileBodyProducer(BytesIO(body), cooperator=self.cooperator) if body else None
            pending = self.agentFor(contact).request(method, uri, outgoing, producer)
            pending.addTimeout(self.timeout, self.clock)
            request.notifyFinish().addErrback(lambda _, d: d.cancel(), pending)
            try:
                response: IResponse = await pending
            except (ConnectError, ConnectTimeoutError) as e:
                # Nothing was sent: the next URL may be reachable.
                self._log.info(
                    "cannot connect to peer {peer} at {url}: {error}",
                    peer=contact.id,
                    url=url,
                    error=str(e),
                )
                failures.append(f"{url}: {e}")
                continue
            except TimeoutError:
                self._finishWithError(
                    request, 504, f"{contact.label} did not answer at {url} in {self.timeout:g} s"
                )
                return
            except CancelledError:
                return
            except Exception:
                failure = Failure()
                tls = _tlsFailure(failure)
                if tls is not None:
                    message = (
                        f"TLS to {contact.label} at {url} failed ({tls}); if the peer uses its "
                        f"local CA, give its ca.pem with `portal peers add {contact.id} --replace "
                        f"--ca FILE`"
                    )
                    self._log.warn("{detail}", detail=message)
                else:
                    message = f"calling {contact.label} at {url} failed: {failure.value!r}"
                    self._log.failure("calling peer {peer}", failure, peer=contact.id)
                self._finishWithError(request, 502, message)
                return
            await self._relay(request, response)
            return
        self._finishWithError(request, 502, f"cannot reach {contact.label}: " + "; ".join(failures))

    async def _relay(self, request: Request, response: IResponse) -> None:
        """
        Pass a peer's response to the app: status, end-to-end headers, and the body as it comes.
        """
        if request.finished or request.channel is None:
            response.deliverBody(Protocol())
            return
        request.setResponseCode(response.code, response.phrase)
        request.responseHeaders = Headers()
        for name, values in response.headers.getAllRawHeaders():
            if name.lower() not in HOP_BY_HOP:
                request.responseHeaders.setRawHeaders(name, values)
        request.defaultContentType = None
        relay = _BodyRelay(request)
        response.deliverBody(relay)
        await relay.done


class PeerEndpointService(Service):
    """
    The local peer endpoint as a service: listens on a loopback address while running, and
    reports its URL as a C{peer-endpoint} event.

    @ivar url: C{http://127.0.0.1:<port>} once listening, else L{None}.
    @ivar port: The listening port, once listening.
    """

    _log = Logger()
    url: str | None = None
    port: IListeningPort | None = None

    def __init__(
        self,
        reactor: Any,
        identity: Identity,
        contacts: ContactLookup,
        address: str = DEFAULT_ADDRESS,
        reporter: Reporter | None = None,
        agents: PeerAgents | None = None,
        timeout: float = RESPONSE_TIMEOUT,
        maxBody: int = MAX_BODY,
    ) -> None:
        """
        @param reactor: The reactor (TCP and time).
        @param identity: The tunnel's identity, which signs.
        @param contacts: The contact list (a L{ContactList
            <portal.gateway.contacts.ContactList>}).
        @param address: Where to listen: C{PORT}, C{HOST:PORT} (see L{parseEndpointAddress}).
        @param reporter: Where to report the endpoint's URL, or L{None}.
        @param agents: The agents to call peers with; L{PeerAgents} on C{reactor} by default.
        @param timeout: Seconds a peer has to answer.
        @param maxBody: Largest request body sent to a peer.
        @raise portal.gateway.loopback.EndpointAddressError: If C{address} is malformed or not a loopback address.
        """
        self.reactor = reactor
        self.host, self._requestedPort = parseEndpointAddress(address)
        self.reporter = reporter
        self.agents = agents if agents is not None else PeerAgents(reactor)
        self.resource = PeerEndpointResource(
            identity, contacts, self.agents.agentFor, reactor, timeout, maxBody
        )
        self.site = Site(self.resource, reactor=reactor)
        self.site.noisy = False
        self.site.displayTracebacks = False
        self._waiting: list[Deferred[str]] = []
        self._listening: Deferred[IListeningPort] | None = None

    def startService(self) -> None:
        """
        Start listening.
        """
        super().startService()
        endpoint = serverFromString(self.reactor, loopbackEndpoint(self.host, self._requestedPort))
        self._listening = endpoint.listen(self.site)
        self._listening.addCallbacks(self._listened, self._failed)

    def _listened(self, port: IListeningPort) -> None:
        """
        Record and report the URL.
        """
        self._listening = None
        self.port = port
        address: Any = port.getHost()
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.url = f"http://{host}:{address.port}"
        if self.reporter is not None:
            self.reporter.state(
                "peer-endpoint",
                "",
                f"Peer endpoint {self.url}/peer/<identity-id>/<path> (apps call peers here)",
                url=self.url,
            )
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(self.url)

    def _failed(self, failure: Failure) -> None:
        """
        Report that the endpoint cannot listen.
        """
        self._listening = None
        message = f"the peer endpoint cannot listen on {self.host}: {failure.getErrorMessage()}"
        self._log.error("{detail}", detail=message)
        if self.reporter is not None:
            self.reporter.state("error", "", message)
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.errback(failure)

    def whenListening(self) -> Deferred[str]:
        """
        @return: A L{Deferred} firing with L{url} once the endpoint listens, or failing if it
            cannot.
        """
        if self.url is not None:
            return succeed(self.url)
        d: Deferred[str] = Deferred()
        self._waiting.append(d)
        return d

    def stopService(self) -> Deferred[Any]:
        """
        Stop listening and close connections to peers.
        """
        super().stopService()
        if self._listening is not None:
            self._listening.cancel()
        port, self.port, self.url = self.port, None, None
        stopped: list[Deferred[Any]] = [self.agents.close()]
        if port is not None:
            result = port.stopListening()
            if isinstance(result, Deferred):
                stopped.append(result)
        return DeferredList(stopped)
