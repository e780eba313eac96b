"""
The relay's public TLS listener: peek at the ClientHello, route by SNI, never decrypt tenants' traffic.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IAddress, IProtocol, IProtocolFactory
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from portal.forwarding.pacer import PacerFull, Waiting
from portal.forwarding.sources import peerSource
from portal.forwarding.splice import SpliceProtocol, noDelay, pauseReading, resumeReading
from portal.relay.handoff import giveSocket
from portal.relay.interfaces import IWaitingVisitor
from portal.relay.router import DataPool, OnRouterClock, Router
from portal.wire.attach import StreamHeader
from portal.wire.clienthello import (
    INTERNAL_ERROR,
    UNRECOGNIZED_NAME,
    MalformedClientHello,
    alertRecord,
    parseClientHello,
)


@implementer(IWaitingVisitor)
class VisitorProtocol(OnRouterClock, SpliceProtocol, TimeoutMixin):
    """
    One public connection: buffered until its ClientHello is complete, then spliced to a tunnel's data
    session, handed to the relay's own TLS site, or refused with a TLS alert.

    @ivar pool: The data pool this visitor waits in, while it waits.
    @ivar acceptedAt: When the connection was accepted, by the router's clock.
    """

    pool: DataPool | None = None
    #: Whether a visitor for a lease another cluster member holds is forwarded to it (a visitor that
    #: came over a member link is not forwarded again).
    mayForward = True
    acceptedAt: float | None = None
    _site: IProtocol | None = None
    #: Its place in the relay's TLS handshake pacer, while it waits to reach the relay's own site.
    _siteWaiting: Waiting | None = None
    _decided = False
    _reads = 0
    _log = Logger()

    def __init__(self, router: Router, siteFactory: IProtocolFactory) -> None:
        super().__init__()
        self._router = router
        self._siteFactory = siteFactory

    def connectionMade(self) -> None:
        """
        Start the ClientHello timer.
        """
        self._router.counters["visitors"] += 1
        self.acceptedAt = self._router.clock.seconds()
        self._router.visitors.add(self)
        noDelay(self.transport)
        self.setTimeout(self._router.limits.helloTimeout)

    def unsplicedDataReceived(self, data: bytes) -> None:
        """
        Buffer until the ClientHello is complete, then decide; after a decision, forward to the relay's
        own site or keep buffering until the data session is paired.

        @param data: Bytes from the visitor.
        """
        if self._site is not None:
            self._site.dataReceived(data)
            return
        super().unsplicedDataReceived(data)
        if self._decided:
            return
        self._reads += 1
        if self._reads > self._router.limits.maxHelloReads:
            self._refuse(
                "client_hello_reads",
                f"ClientHello still incomplete after {self._reads - 1} reads",
                INTERNAL_ERROR,
            )
            return
        buffered = b"".join(self._pending)
        self._pending = [buffered]
        try:
            hello = parseClientHello(buffered)
        except MalformedClientHello as e:
            self._refuse(
                "malformed_client_hello", f"malformed ClientHello: {e.reason}", INTERNAL_ERROR
            )
            return
        if hello is None:
            return
        self._decided = True
        self._dispatch(hello.serverName)

    def _dispatch(self, serverName: str | None) -> None:
        """
        Route a visitor by the SNI of its ClientHello.

        @param serverName: The normalised SNI hostname, or L{None}.
        """
        router = self._router
        if serverName is None:
            self._refuse("no_sni", "ClientHello has no server name (SNI)", UNRECOGNIZED_NAME)
            return
        if serverName == router.relayDomain:
            self._serveSite()
            return
        pool = router.poolFor(serverName)
        peerHost, peerPort = self.visitorAddress()
        header = StreamHeader(
            streamId=router.nextStreamId(),
            hostname=serverName,
            peerHost=peerHost,
            peerPort=peerPort,
        )
        if pool is None:
            cluster = router.cluster
            holder = cluster.holderElsewhere(serverName) if cluster is not None else None
            if holder is not None and self.mayForward:
                assert cluster is not None
                self.setTimeout(router.limits.dataWaitTimeout)
                router.counters["forwarded"] = router.counters.get("forwarded", 0) + 1
                cluster.forward(self, holder, header)
                return
            router.counters["unknown"] += 1
            self._refuse("unknown_name", f"no live lease for {serverName!r}", UNRECOGNIZED_NAME)
            return
        self.setTimeout(None)
        self.pool = pool
        if not pool.route(self, header):
            self.pool = None
            router.counters["refused"] += 1
            self._refuse(
                "visitors_waiting", f"too many visitors waiting for {serverName!r}", INTERNAL_ERROR
            )
            return
        router.counters["routed"] += 1

    def handOff(self, send: Callable[[int, bytes], bool]) -> bool:
        """
        Give this visitor to another worker of the relay (L{portal.relay.handoff}): C{send} gets
        the socket's descriptor and the bytes read so far; once it has sent them, this worker
        closes its copy of the descriptor without shutting the connection down (the other worker
        holds the same socket).

        @return: Whether the visitor was handed off; if not, nothing changed.
        """

        def sent(fd: int) -> bool:
            if not send(fd, b"".join(self._pending)):
                return False
            # Gone before the transport closes: nothing of it is this worker's any more.
            self._pending = []
            self.setTimeout(None)
            return True

        return giveSocket(self.transport, sent)

    def visitorAddress(self) -> tuple[str, int]:
        """
        @return: The visitor's address and port, as the tunnel is told them.
        """
        assert self.transport is not None
        peer = self.transport.getPeer()
        return str(getattr(peer, "host", "")), int(getattr(peer, "port", 0))

    def _serveSite(self) -> None:
        """
        Hand the connection to the relay's own TLS site (dashboard, API, metrics) when the relay's
        TLS handshake pacer (L{Router.handshakes <portal.relay.router.Router.handshakes>}) lets
        it: the relay terminates this TLS itself, so ClientHellos for its own name are paced as
        control sessions' are (waiting, nothing more read; refused as C{handshake_queue} beyond
        the queue, as C{handshake_wait} after the attach timeout).
        """
        assert self.transport is not None
        router = self._router
        try:
            waiting = router.handshakes.enter(peerSource(self.transport.getPeer()), self._siteTurn)
        except PacerFull:
            self._refuse(
                "handshake_queue",
                "too many TLS handshakes waiting: refused before the TLS handshake",
                INTERNAL_ERROR,
            )
            return
        if waiting is None:
            self._startSite()
            return
        router.counters["handshakes_delayed"] = router.counters.get("handshakes_delayed", 0) + 1
        self._siteWaiting = waiting
        pauseReading(self.transport)
        self.setTimeout(router.limits.attachTimeout)

    def _siteTurn(self) -> None:
        """
        The pacer lets this visitor's TLS handshake with the relay's own site start.
        """
        self._siteWaiting = None
        assert self.transport is not None
        resumeReading(self.transport)
        self._startSite()

    def _startSite(self) -> None:
        """
        Connect the relay's own site to this connection and give it what was read.
        """
        self.setTimeout(None)
        assert self.transport is not None
        site = self._siteFactory.buildProtocol(self.transport.getPeer())
        if site is None:
            self.transport.loseConnection()
            return
        self._site = site
        site.makeConnection(self.transport)
        site.dataReceived(self.takePending())

    def refuse(self, reason: str, alert: int = INTERNAL_ERROR) -> None:
        """
        Count and log the refusal, send a fatal TLS alert and close (for the cluster's forwarding).

        @param reason: Why, for the log.
        @param alert: The TLS alert description to send.
        """
        self._refuse("cluster_forward", reason, alert)

    def _refuse(self, label: str, why: str, alert: int) -> None:
        """
        Count and log the refusal (L{Router.refusals}), send a fatal TLS alert and close.

        @param label: The refusal's reason in the metrics.
        @param why: Why, for the log.
        @param alert: The TLS alert description to send.
        """
        self.setTimeout(None)
        assert self.transport is not None
        peer = self.transport.getPeer()
        self._router.refusals.refuse(
            label,
            "refused visitor {peer}: {reason}",
            peer=getattr(peer, "host", str(peer)),
            reason=why,
        )
        self._pending = []
        self.transport.write(alertRecord(alert))
        self.transport.loseConnection()

    def timeoutConnection(self) -> None:
        """
        Too slow: the ClientHello did not arrive in time, no data session came for it, or its turn
        to reach the relay's own site did not come.
        """
        if self._siteWaiting is not None:
            self._siteWaiting.cancel()
            self._siteWaiting = None
            self._refuse(
                "handshake_wait",
                f"waited {self._router.limits.attachTimeout} seconds for its TLS handshake",
                INTERNAL_ERROR,
            )
            return
        if self.pool is not None:
            self._router.counters["timeouts"] += 1
            self._log.warn(
                "no data session from the tunnel within {timeout}s; dropping visitor",
                timeout=self._router.limits.dataWaitTimeout,
            )
            self.pool.abandon(self)
            self.pool = None
            assert self.transport is not None
            self.transport.loseConnection()
            return
        self._refuse(
            "client_hello_timeout",
            f"no complete ClientHello within {self._router.limits.helloTimeout} seconds",
            INTERNAL_ERROR,
        )

    def readConnectionLost(self) -> None:
        """
        Pass a half-close on; the relay's own site cannot half-close, so close it.
        """
        if self._site is not None:
            assert self.transport is not None
            self.transport.loseConnection()
            return
        super().readConnectionLost()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """
        Leave the waiting line, close the peer or the site.

        @param reason: Why.
        """
        self.setTimeout(None)
        self._router.visitors.discard(self)
        if self._siteWaiting is not None:
            self._siteWaiting.cancel()
            self._siteWaiting = None
        if self.pool is not None:
            self.pool.abandon(self)
            self.pool = None
        if self._site is not None:
            self._site.connectionLost(reason)
        super().connectionLost(reason)


class PublicFactory(Factory):
    """
    Builds L{VisitorProtocol}s for the public TLS listener.
    """

    noisy = False

    def __init__(self, router: Router, siteFactory: IProtocolFactory) -> None:
        self._router = router
        self._siteFactory = siteFactory

    def buildProtocol(self, addr: IAddress | None) -> VisitorProtocol:
        """
        @param addr: The visitor's address.
        @return: A new visitor protocol.
        """
        protocol = VisitorProtocol(self._router, self._siteFactory)
        protocol.factory = self
        return protocol
