"""
Stream mode in the tunnel: terminate the visitor's TLS with the tenant's certificate and splice the
decrypted bytes to the local target.

With C{--acme}, while a TLS-ALPN-01 challenge is pending for a hostname, each stream for that
hostname first shows its ClientHello to L{_ChallengeDispatch}: one that offers C{acme-tls/1} is the
CA's validation connection and is answered with the challenge certificate, then closed; any other
goes on as usual. Streams for other hostnames, and all streams when no challenge is pending, go
straight to TLS.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.interfaces import (
    IHandshakeListener,
    IOpenSSLServerConnectionCreator,
    IProtocol,
    ITCPTransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.ssl import CertificateOptions
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from portal.forwarding.logthrottle import LogThrottle
from portal.forwarding.quietconnect import connectQuietly
from portal.forwarding.splice import SpliceProtocol, noDelay, pauseReading, splice
from portal.forwarding.tcpendpoint import tcpEndpoint
from portal.trust.acmechallenge import ACME_TLS_1, PendingChallenges
from portal.tunnel.addressrules import SERVE_ALL, AddressRules
from portal.tunnel.config import Target
from portal.tunnel.report import Reporter
from portal.tunnel.tlswrapper import LeanTLSTransport
from portal.wire.attach import StreamHeader
from portal.wire.clienthello import (
    HANDSHAKE_FAILURE,
    MAX_CLIENT_HELLO_BYTES,
    MalformedClientHello,
    alertRecord,
    parseClientHello,
)
from portal.wire.peek import PeekingProtocol, RefuseConnection
from portal.wire.proxyheader import proxyHeader

#: Seconds to wait for the local target to accept a connection.
TARGET_CONNECT_TIMEOUT = 10.0
#: Least seconds between two log events about refused visitors (the others are counted).
REFUSED_LOG_INTERVAL = 10.0

#: Seconds a TLS-ALPN-01 validation connection may take to finish its handshake.
CHALLENGE_HANDSHAKE_TIMEOUT = 10.0


class _TargetSide(SpliceProtocol):
    """
    The tunnel's connection to the local target.
    """

    def connectionMade(self) -> None:
        """
        Forward small writes at once.
        """
        noDelay(self.transport)


class _VisitorSide(SpliceProtocol):
    """
    The decrypted visitor stream, inside the tunnel's TLS; connects to the target when it starts.
    """

    _log = Logger()

    def __init__(self, handler: StreamHandler, header: StreamHeader) -> None:
        super().__init__()
        self._handler = handler
        self._header = header
        self._connecting: Deferred[Any] | None = None
        self._started = 0.0

    def connectionMade(self) -> None:
        """
        Hold the visitor until the target is connected, then splice.
        """
        assert self.transport is not None
        self._started = self._handler.reactor.seconds()
        pauseReading(self.transport)
        d = connectQuietly(self._handler.targetEndpoint(), _TargetSide())
        d.addTimeout(TARGET_CONNECT_TIMEOUT, self._handler.reactor)
        self._connecting = d
        d.addCallbacks(self._connected, self._failed)

    def _connected(self, target: _TargetSide) -> None:
        """
        Start forwarding both ways.
        """
        self._connecting = None
        assert target.transport is not None
        if self._lost:
            target.transport.loseConnection()
            return
        version = self._handler.proxyProtocol
        if version is not None:
            header = self._header
            family = IPv6Address if ":" in header.peerHost else IPv4Address
            visitor = family("TCP", header.peerHost, header.peerPort)
            # The destination is the target's own address: the relay's public one is not known here.
            local = target.transport.getPeer()
            assert isinstance(local, (IPv4Address, IPv6Address))
            target.transport.write(proxyHeader(version, visitor, local))
        splice(self, target)

    def _failed(self, failure: Failure) -> None:
        """
        The target cannot be reached: say so in the log and close the visitor.
        """
        self._connecting = None
        self._log.warn(
            "stream {stream} from {peer}: cannot reach {target}: {error}",
            stream=self._header.streamId,
            peer=self._header.peerHost,
            target=str(self._handler.target),
            error=failure.getErrorMessage(),
        )
        if not self._lost:
            assert self.transport is not None
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """
        Stop connecting to the target if that is still under way; report a spliced connection.
        """
        # The splice lets go of the peer when the connection is lost.
        target = self.peer
        super().connectionLost(reason)
        if self._connecting is not None:
            self._connecting.cancel()
        reporter = self._handler.reporter
        if target is not None and reporter is not None:
            reporter.connection(
                self._header.peerHost,
                str(self._handler.target),
                self.forwarded,
                target.forwarded,
                self._handler.reactor.seconds() - self._started,
            )


class _Refused(Protocol):
    """
    A visitor the address rules refuse: its data session is closed before any byte is read, so
    nothing of it reaches TLS or the target.
    """

    def connectionMade(self) -> None:
        """
        Close at once.
        """
        assert self.transport is not None
        self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        """
        Ignore what arrives while closing.
        """


@implementer(IHandshakeListener)
class _ChallengeAnswer(Protocol):
    """
    Inside the TLS of a CA's TLS-ALPN-01 validation connection: close once the handshake (which
    presented the challenge certificate) is done. Nothing is read or forwarded.
    """

    _log = Logger()

    def __init__(self, handler: StreamHandler, header: StreamHeader) -> None:
        self._handler = handler
        self._header = header
        self._timer: Any = None

    def connectionMade(self) -> None:
        """
        Give the handshake L{CHALLENGE_HANDSHAKE_TIMEOUT} seconds.
        """
        self._timer = self._handler.reactor.callLater(CHALLENGE_HANDSHAKE_TIMEOUT, self._expired)

    def _expired(self) -> None:
        """
        The validation connection did not finish its handshake in time: abort it.
        """
        self._timer = None
        self._log.warn(
            "TLS-ALPN-01 validation for {hostname} from {peer}: no handshake within {seconds} s",
            hostname=self._header.hostname,
            peer=self._header.peerHost,
            seconds=CHALLENGE_HANDSHAKE_TIMEOUT,
        )
        assert self.transport is not None
        cast(ITCPTransport, self.transport).abortConnection()

    def handshakeCompleted(self) -> None:
        """
        The CA has seen the challenge certificate: close.
        """
        self._log.info(
            "answered the TLS-ALPN-01 validation for {hostname} from {peer}",
            hostname=self._header.hostname,
            peer=self._header.peerHost,
        )
        assert self.transport is not None
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """
        Stop the handshake timer.
        """
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class _ChallengeDispatch(PeekingProtocol):
    """
    A stream for a hostname with a pending TLS-ALPN-01 challenge: read its ClientHello, then answer
    the challenge if it offers C{acme-tls/1}, else serve it as any other stream.
    """

    maxPeek = MAX_CLIENT_HELLO_BYTES

    def __init__(self, handler: StreamHandler, header: StreamHeader) -> None:
        super().__init__()
        self._handler = handler
        self._header = header
        self.callLater = handler.reactor.callLater  # type: ignore[method-assign]

    def choose(self, data: bytes) -> IProtocol | None:
        """
        @return: The challenge answer for a validation connection, the usual protocol otherwise,
            or L{None} until the ClientHello is complete.
        @raise RefuseConnection: When the bytes are not a ClientHello.
        """
        try:
            hello = parseClientHello(data)
        except MalformedClientHello as e:
            raise RefuseConnection(e.reason, alertRecord(HANDSHAKE_FAILURE))
        if hello is None:
            return None
        return self._handler.protocolFor(self._header, ACME_TLS_1.decode() in hello.alpn)


class StreamHandler:
    """
    Builds, for each stream header a data session receives, the protocol that serves it: inside the
    tenant's TLS (stream and routed HTTP modes) or, without C{tlsCreator}, on the stream's bytes as
    they are (raw TCP mode, whose data sessions open the sealed stream first,
    L{portal.forwarding.sealedstream}).

    @ivar target: The local target.
    @ivar reactor: The reactor (TCP and time).
    @ivar refused: How many visitors the address rules refused.
    @ivar reporter: Where each ended connection is reported, or L{None}.
    @ivar streams: How many visitor streams were served (the address rules admitted them).
    """

    streams = 0

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        target: Target | None,
        tlsCreator: IOpenSSLServerConnectionCreator | None,
        inner: Callable[[StreamHeader], IProtocol] | None = None,
        proxyProtocol: str | None = None,
        addressRules: AddressRules = SERVE_ALL,
        reporter: Reporter | None = None,
        challenges: PendingChallenges | None = None,
    ) -> None:
        """
        @param reactor: The reactor (TCP and time).
        @param target: The local target of stream mode.
        @param tlsCreator: Makes the TLS server connection visitors handshake with; L{None} in raw TCP
            mode.
        @param inner: Builds the protocol inside TLS instead of the stream-mode splice to C{target}
            (routed HTTP mode passes L{portal.tunnel.httpproxy.HTTPProxy.protocolFor}).
        @param proxyProtocol: C{"v1"} or C{"v2"}: start each target connection with a PROXY protocol
            header carrying the visitor's address.
        @param addressRules: Which visitor addresses are served (C{--allow-ip}, C{--deny-ip}).
        @param reporter: Where each ended connection is reported (stream and raw TCP modes: one
            line per connection), or L{None}.
        @param challenges: With C{--acme}, the pending TLS-ALPN-01 challenges to answer.
        """
        self.reporter = reporter
        self.reactor = reactor
        self.addressRules = addressRules
        self.refused = 0
        self._refusedLog = LogThrottle(reactor, REFUSED_LOG_INTERVAL)
        self.target = target
        self._inner = inner
        self.proxyProtocol = proxyProtocol
        self._tlsFactory = None
        if tlsCreator is not None:
            self._tlsFactory = TLSMemoryBIOFactory(tlsCreator, False, Factory(), clock=reactor)
            self._tlsFactory.protocol = LeanTLSTransport
        self._challenges = challenges
        self._challengeFactory = (
            None
            if challenges is None
            else TLSMemoryBIOFactory(challenges.creator, False, Factory(), clock=reactor)
        )

    def targetEndpoint(self) -> Any:
        """
        @return: A client endpoint to the local target (TLS without verification for C{https://}
            targets, as local development servers rarely have a trusted certificate); straight
            to an IP literal, with no resolver (L{tcpEndpoint}).
        """
        target = self.target
        assert target is not None
        endpoint = tcpEndpoint(self.reactor, target.host, target.port, TARGET_CONNECT_TIMEOUT)
        if target.tls:
            return wrapClientTLS(CertificateOptions(verify=False), endpoint)
        return endpoint

    def __call__(self, header: StreamHeader) -> IProtocol:
        """
        @param header: The visitor's stream header.
        @return: A TLS server protocol around the visitor's stream, or in raw TCP mode the splice to
            the target itself; for a visitor the address rules refuse, a protocol that closes.
        """
        challenges = self._challenges
        if (
            self._tlsFactory is not None
            and challenges is not None
            and challenges.isPending(header.hostname)
        ):
            # The ClientHello says whether this is the CA's validation (which the address
            # rules do not apply to: it only sees the challenge certificate) or a visitor.
            return _ChallengeDispatch(self, header)
        return self.protocolFor(header)

    def protocolFor(self, header: StreamHeader, validation: bool = False) -> IProtocol:
        """
        @param header: The visitor's stream header.
        @param validation: Whether the stream is an ACME CA's TLS-ALPN-01 validation connection
            (its ClientHello offers C{acme-tls/1}) for a hostname with a pending challenge.
        @return: The protocol serving the stream: see L{__call__}; for a validation connection, a
            TLS server presenting the challenge certificate that closes after the handshake.
        """
        challengeFactory = self._challengeFactory
        if validation and challengeFactory is not None:
            assert self._challenges is not None
            if self._challenges.isPending(header.hostname):
                return challengeFactory.protocol(challengeFactory, _ChallengeAnswer(self, header))
        reason = self.addressRules.refusal(header.peerHost)
        if reason is not None:
            self.refused += 1
            held = self._refusedLog.due()
            if held is not None:
                self._log.warn(
                    "refused visitor {peer} (stream {stream}): {reason}"
                    + (" ({held} more refused since the last message)" if held else ""),
                    peer=header.peerHost,
                    stream=header.streamId,
                    reason=reason,
                    held=held,
                )
            return _Refused()
        self.streams += 1
        factory = self._tlsFactory
        inner = self._inner(header) if self._inner is not None else _VisitorSide(self, header)
        if factory is None:
            return inner
        return factory.protocol(factory, inner)
