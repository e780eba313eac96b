"""
Multi-hop chains in the tunnel: L{HopEndpoint}, an endpoint that reaches a destination through a relay.

To hop through relay A to B the tunnel opens TLS 1.3 to A over the previous endpoint (TCP to A, or
another hop), checks and pins A's identity with L{portal.wire.control.Hello} exactly as for a relay it
registers with, asks for a hop challenge and sends the signed L{portal.wire.control.Hop}. Once A has
connected to B it answers, and the connection becomes a byte stream to B's control port, carried
inside the TLS to A: the endpoint's protocol is connected to it through AMP's own protocol switch.

A chain is nested hops; TLS to the last relay is wrapped around the outermost hop
(L{chainEndpoint}), so every relay before it sees only ciphertext, and the last one sees connections
coming from the relay before it.
"""

from __future__ import annotations

from typing import Any, cast

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.interfaces import (
    IAddress,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
    ITCPTransport,
)
from twisted.internet.protocol import ClientFactory, connectionDone
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import implementer

from portal.forwarding.quietconnect import connectQuietly
from portal.forwarding.tcpendpoint import tcpEndpoint
from portal.trust.challenge import PURPOSE_HOP, signHop
from portal.trust.identity import Identity
from portal.trust.pinning import KnownRelays
from portal.trust.relayhello import (
    FatalRelayError,
    RelayAuthenticationFailed,
    ReportsState,
    checkHello,
    helloArguments,
    relayTLSOptions,
)
from portal.tunnel.config import RelayAddress
from portal.wire.control import (
    Challenge,
    Hello,
    Hop,
    HopLimit,
    HopRefused,
    HopUnreachable,
    TryAgain,
    UnsupportedVersion,
)

#: Seconds one hop may take: TLS to the hop relay, Hello, Challenge, and Hop (the relay's own
#: connection to the destination included).
HOP_TIMEOUT = 30.0
#: Seconds to wait for the TCP connection to the first relay of a path.
CONNECT_TIMEOUT = 10.0


class HopFailed(Exception):
    """
    A hop could not be opened now (the relay's limit, an unreachable destination, a stale challenge,
    a lost connection or a timeout); reconnecting later may work.
    """


class _SwitchFactory(ClientFactory):
    """
    Builds, at AMP's protocol switch, the protocol of the endpoint's user, and remembers it.

    @ivar built: The protocol, once built.
    """

    noisy = False
    built: IProtocol | None = None

    def __init__(self, factory: IProtocolFactory) -> None:
        self._factory = factory

    def buildProtocol(self, addr: IAddress | None) -> Any:
        """
        @return: The user's protocol for the hop's stream (an L{IProtocol}, typed as the user's
            factory builds it).
        """
        self.built = self._factory.buildProtocol(cast(IAddress, addr))
        return self.built

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        """
        The hop was refused; L{_HopClient} reports it.
        """

    def clientConnectionLost(self, connector: Any, reason: Failure) -> None:
        """
        The hop's stream ended; its protocol was told.
        """


class _HopClient(amp.AMP):
    """
    The tunnel's AMP session with a hop relay, until the relay switches it to the hop's stream.
    """

    _log = Logger()

    def __init__(
        self, endpoint: HopEndpoint, factory: IProtocolFactory, result: Deferred[IProtocol]
    ) -> None:
        """
        @param endpoint: The hop.
        @param factory: Builds the protocol of the hop's stream.
        @param result: Fired with that protocol once it is connected, or failed.
        """
        super().__init__()
        self._endpoint = endpoint
        self._switch = _SwitchFactory(factory)
        self.result = result

    def connectionMade(self) -> None:
        """
        Run Hello, Challenge and Hop.
        """
        super().connectionMade()
        Deferred.fromCoroutine(self._hop()).addErrback(self._failed)

    async def _hop(self) -> None:
        """
        Check and pin the hop relay, then ask it for the hop.
        """
        endpoint = self._endpoint
        hop, destination = endpoint.hop, endpoint.destination
        hello = await self.callRemote(Hello, **helloArguments())
        relayId = checkHello(
            self.transport, hello, hop, endpoint.pins, endpoint.reporter, flag="--via"
        )
        if "hop" not in hello["capabilities"]:
            raise FatalRelayError(
                f"relay {hop.address} (--via) does not forward hops: it does not offer them"
            )
        challenge = await self.callRemote(Challenge, names=[], purpose=PURPOSE_HOP)
        signature = signHop(
            endpoint.identity, relayId, challenge["nonce"], destination.host, destination.port
        )
        await self.callRemote(
            Hop,
            self._switch,
            host=destination.host,
            port=destination.port,
            publicKey=endpoint.identity.publicKey,
            nonce=challenge["nonce"],
            signature=signature,
        )
        # AMP switched before this point: the user's protocol is connected to the hop's stream.
        assert self._switch.built is not None
        if not self.result.called:
            self.result.callback(self._switch.built)

    def _failed(self, failure: Failure) -> None:
        """
        Fail the endpoint's connection attempt with a message naming the hop, and close.
        """
        endpoint = self._endpoint
        hop = f"relay {endpoint.hop.address} (--via)"
        destination = endpoint.destination.address
        message = failure.getErrorMessage()
        error: Exception
        if failure.check(HopRefused):
            error = FatalRelayError(f"{hop} refused the hop to {destination}: {message}")
        elif failure.check(FatalRelayError, RelayAuthenticationFailed):
            error = FatalRelayError(message)
        elif failure.check(UnsupportedVersion):
            error = FatalRelayError(f"{hop}: {message}")
        elif failure.check(HopLimit, HopUnreachable, TryAgain):
            error = HopFailed(f"{hop} cannot forward to {destination} now: {message}")
        else:
            error = HopFailed(f"hop through {hop} to {destination} failed: {message}")
        if not self.result.called:
            self.result.errback(Failure(error))
        if self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """
        Before the switch: the hop failed. After it: the stream's protocol is told (by AMP).
        """
        super().connectionLost(reason)
        if not self.result.called:
            endpoint = self._endpoint
            self.result.errback(
                Failure(
                    HopFailed(
                        f"relay {endpoint.hop.address} (--via) closed the connection before "
                        f"the hop to {endpoint.destination.address} was open"
                    )
                )
            )


@implementer(IStreamClientEndpoint)
class HopEndpoint:
    """
    A stream to C{destination} through the relay C{hop}, which is reached over C{previous}.

    @ivar hop: The relay asked to forward; its identity is checked and pinned like a relay's.
    @ivar destination: Where the relay connects to (the next hop, or the last relay).
    """

    def __init__(
        self,
        reactor: Any,
        previous: IStreamClientEndpoint,
        hop: RelayAddress,
        destination: RelayAddress,
        identity: Identity,
        pins: KnownRelays,
        reporter: ReportsState,
        timeout: float = HOP_TIMEOUT,
    ) -> None:
        """
        @param reactor: Time, for the timeout.
        @param previous: A stream to C{hop}'s control port (TCP, or another L{HopEndpoint}).
        @param hop: The hop relay's address as the user gave it (C{--via}).
        @param destination: The address the hop relay is asked to connect to.
        @param identity: The tunnel's identity, which signs the hop request.
        @param pins: The known relays, where C{hop} is checked and pinned.
        @param reporter: Told about new pins.
        @param timeout: Seconds for the whole hop, once C{previous} is asked to connect.
        """
        self._reactor = reactor
        self._previous = previous
        self.hop = hop
        self.destination = destination
        self.identity = identity
        self.pins = pins
        self.reporter = reporter
        self._timeout = timeout

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        """
        Open the hop and connect a protocol from C{protocolFactory} to its stream.

        @return: A L{Deferred} firing with that protocol, or failing with L{FatalRelayError} (the
            hop relay will never forward this hop, or its identity is wrong) or L{HopFailed}.
            Cancelling it, or its timeout, aborts the connection to the hop relay.
        """
        connecting: Deferred[_HopClient] | None = None

        def cancel(result: Deferred[IProtocol]) -> None:
            if connecting is not None:
                connecting.cancel()
            transport = client.transport
            if transport is not None:
                cast(ITCPTransport, transport).abortConnection()

        result: Deferred[IProtocol] = Deferred(cancel)
        client = _HopClient(self, protocolFactory, result)
        connecting = connectQuietly(wrapClientTLS(relayTLSOptions(), self._previous), client)

        hop, destination, timeout = self.hop.address, self.destination.address, self._timeout

        def notConnected(failure: Failure) -> None:
            if result.called:
                return
            if not failure.check(HopFailed, FatalRelayError, RelayAuthenticationFailed):
                # The hop relay itself is not there: blame it, not the relay at the end.
                failure = Failure(
                    HopFailed(
                        f"cannot reach relay {hop} (--via, on the way to {destination}): "
                        f"{failure.getErrorMessage().rstrip('.')}"
                    )
                )
            result.errback(failure)

        connecting.addErrback(notConnected)

        def timedOut(outcome: Any, timeout: float) -> Any:
            if isinstance(outcome, Failure):
                return Failure(
                    HopFailed(
                        f"hop through relay {hop} (--via) to {destination}: not open within "
                        f"{timeout:g} s"
                    )
                )
            return outcome

        result.addTimeout(timeout, self._reactor, onTimeoutCancel=timedOut)
        return result


def chainEndpoint(
    reactor: Any,
    relay: RelayAddress,
    identity: Identity,
    pins: KnownRelays,
    reporter: ReportsState,
) -> IStreamClientEndpoint:
    """
    The plain stream to C{relay}'s control port: TCP, or nested L{HopEndpoint}s through its C{via}
    relays, first hop first. Wrap it in TLS for a control session or a TLS data session.

    @param reactor: The reactor.
    @param relay: The relay, with its path.
    @param identity: The tunnel's identity.
    @param pins: The known relays.
    @param reporter: Told about new pins of hop relays.
    @return: The endpoint.
    """
    path = [*relay.via, relay]
    endpoint = tcpEndpoint(reactor, path[0].host, path[0].port, CONNECT_TIMEOUT)
    for hop, destination in zip(path, path[1:], strict=False):
        endpoint = HopEndpoint(reactor, endpoint, hop, destination, identity, pins, reporter)
    return endpoint
