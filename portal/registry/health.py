"""
Health checks of registry relays: connect to the relay's control port, run L{portal.wire.control.Hello}
as a tunnel does (L{portal.trust.relayhello}), and check that the relay proves the identity the registry
lists for it, on this very TLS session.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.protocols import amp
from twisted.python.failure import Failure

import portal
from portal.registry.document import RegistryEntry
from portal.trust.relayhello import helloArguments, relayTLSOptions, verifyHello
from portal.wire.control import Hello

#: Seconds a health check may take: connection, TLS handshake and the Hello round trip.
HEALTH_TIMEOUT = 10.0


@attrs.frozen
class Health:
    """
    The outcome of one health check.

    @ivar ok: Whether the relay answered and proved the expected identity, with the modes asked for.
    @ivar reason: C{"ok"}, or why the relay is not healthy, for humans.
    @ivar latency: Seconds from the start of the connection to the Hello answer, when one came.
    @ivar relayId: The identity the relay proved, when it proved one.
    @ivar capabilities: The capabilities the relay answered with.
    @ivar software: The relay's software version, as it says.
    """

    ok: bool
    reason: str
    latency: float | None = None
    relayId: str | None = None
    capabilities: tuple[str, ...] = ()
    software: str | None = None


class _TimedOut(Exception):
    """
    The health check took longer than its timeout.
    """


def controlEndpoint(
    reactor: Any, host: str, port: int, timeout: float = HEALTH_TIMEOUT
) -> IStreamClientEndpoint:
    """
    A TLS endpoint to a relay's control port, as tunnels connect to it.

    @param reactor: The reactor.
    @param host: The relay's host.
    @param port: Its control port.
    @param timeout: Seconds to wait for the TCP connection.
    """
    return wrapClientTLS(relayTLSOptions(), HostnameEndpoint(reactor, host, port, timeout=timeout))


def checkRelay(
    reactor: Any,
    entry: RegistryEntry,
    modes: Iterable[str] = ("stream",),
    timeout: float = HEALTH_TIMEOUT,
    endpoint: IStreamClientEndpoint | None = None,
) -> Deferred[Health]:
    """
    Check one relay: connect to its control port over TLS 1.3, say L{Hello}, verify the relay's
    signature over this TLS session, and compare the identity it proves with the registry's.

    @param reactor: The reactor (connections, and the clock latency and the timeout are measured on).
    @param entry: The relay, as the registry lists it.
    @param modes: Modes the relay must have among its Hello capabilities.
    @param timeout: Seconds the whole check may take.
    @param endpoint: Where to connect (default: L{controlEndpoint} to the entry's address).
    @return: A L{Deferred} firing with the L{Health}; it does not fail.
    """
    if endpoint is None:
        endpoint = controlEndpoint(reactor, entry.host, entry.port, timeout)
    start = reactor.seconds()
    connected: list[amp.AMP] = []
    wanted = sorted(set(modes))

    async def probe() -> Health:
        protocol = cast(amp.AMP, await endpoint.connect(Factory.forProtocol(amp.AMP)))
        connected.append(protocol)
        arguments = {**helloArguments(), "software": f"portal/{portal.__version__} health check"}
        response = await protocol.callRemote(Hello, **arguments)
        latency = reactor.seconds() - start
        relayId = verifyHello(protocol.transport, response, entry.address)
        capabilities = tuple(response["capabilities"])
        software = response["software"]
        if relayId != entry.id:
            return Health(
                False,
                f"the relay proved identity {relayId}, but the registry lists {entry.id}",
                latency,
                relayId,
                capabilities,
                software,
            )
        missing = [mode for mode in wanted if mode not in capabilities]
        if missing:
            return Health(
                False,
                f"the relay does not speak {', '.join(missing)} mode",
                latency,
                relayId,
                capabilities,
                software,
            )
        return Health(True, "ok", latency, relayId, capabilities, software)

    def timedOut(result: object, timeout: float) -> Failure:
        return Failure(_TimedOut())

    def failed(failure: Failure) -> Health:
        if failure.check(_TimedOut):
            return Health(False, f"no answer within {timeout:g} s")
        if not connected:
            return Health(False, f"cannot connect: {failure.getErrorMessage()}")
        return Health(False, f"Hello failed: {failure.getErrorMessage()}")

    def close(health: Health) -> Health:
        for protocol in connected:
            transport: Any = protocol.transport
            if transport is not None:
                if health.ok:
                    transport.loseConnection()
                else:
                    transport.abortConnection()
        return health

    d = Deferred.fromCoroutine(probe())
    d.addTimeout(timeout, reactor, onTimeoutCancel=timedOut)
    result: Deferred[Health] = d.addErrback(failed)
    result.addCallback(close)
    return result
