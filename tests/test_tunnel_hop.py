"""
Tests for the tunnel's side of multi-hop chains, L{portal.tunnel.hop}: L{HopEndpoint} and chains of
them composed in memory (iosim) against real relay control listeners (TLS, AMP, hop forwarding).
"""

from __future__ import annotations

import io
import os
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import CertificateOptions
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.protocols import amp, tls
from twisted.test.iosim import FakeTransport, IOPump, connect
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from portal.relay.control import ControlFactory, RelayControlProtocol
from portal.relay.hop import HopForwarder
from portal.relay.router import Router
from portal.trust.identity import Identity
from portal.trust.localca import LocalCA
from portal.trust.pinning import KnownRelays
from portal.trust.relayhello import FatalRelayError, helloArguments, relayTLSOptions
from portal.tunnel.config import RelayAddress, parseChain
from portal.tunnel.control import TunnelControlProtocol
from portal.tunnel.hop import HOP_TIMEOUT, HopEndpoint, HopFailed, chainEndpoint
from portal.tunnel.report import Reporter
from portal.wire.control import Hello
from tests.test_control import FakeLink

A = RelayAddress("relay-a.example", 4017)
B = RelayAddress("relay-b.example", 4017)
C = RelayAddress("relay.example", 4017)
#: The in-memory address of each relay host.
ADDRESSES = {A.host: "10.0.0.1", B.host: "10.0.0.2", C.host: "10.0.0.3", "tunnel": "10.0.0.9"}


@implementer(IStreamClientEndpoint)
class MemoryEndpoint:
    """
    Connects to a listener of a L{MemoryNetwork} from one host.
    """

    def __init__(self, network: MemoryNetwork, source: str, host: str, port: int) -> None:
        self._network = network
        self._source = source
        self._host = host
        self._port = port

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        """
        Connect at once (the listener must exist), with addresses for both ends.
        """
        return self._network.connect(self._source, self._host, self._port, protocolFactory)


class MemoryNetwork:
    """
    Hosts and listeners in memory: each connection is an iosim pump with real-looking addresses.

    @ivar pumps: Every connection's pump.
    @ivar silent: Listeners that accept and never answer.
    """

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._listeners: dict[tuple[str, int], IProtocolFactory] = {}
        self._nextPort = 50000
        self.pumps: list[IOPump] = []

    def listen(self, host: str, port: int, factory: IProtocolFactory) -> None:
        """
        Accept connections to C{host}:C{port} with C{factory}.
        """
        self._listeners[(host, port)] = factory

    def endpoint(self, source: str, host: str, port: int) -> MemoryEndpoint:
        """
        @return: An endpoint from host C{source} to C{host}:C{port}.
        """
        return MemoryEndpoint(self, source, host, port)

    def connect(
        self, source: str, host: str, port: int, factory: IProtocolFactory
    ) -> Deferred[IProtocol]:
        """
        Connect C{factory}'s protocol to the listener at C{host}:C{port}.
        """
        server = self._listeners.get((host, port))
        if server is None:
            return fail(ConnectionRefusedError(f"{host}:{port}"))
        self._nextPort += 1
        clientAddress = IPv4Address("TCP", ADDRESSES[source], self._nextPort)
        serverAddress = IPv4Address("TCP", ADDRESSES[host], port)
        client = factory.buildProtocol(serverAddress)
        serverProtocol = server.buildProtocol(clientAddress)
        assert client is not None and serverProtocol is not None
        clientIO = FakeTransport(client, False, clientAddress, serverAddress)
        serverIO = FakeTransport(serverProtocol, True, serverAddress, clientAddress)
        self.pumps.append(
            connect(serverProtocol, serverIO, client, clientIO, greet=False, clock=self._clock)
        )
        return succeed(client)

    def flush(self) -> None:
        """
        Move bytes on every connection until all are quiet.
        """
        for _ in range(100):
            if not [pump for pump in list(self.pumps) if pump.flush()]:
                return
        raise AssertionError("the network does not settle")


class Relay:
    """
    A relay in memory: its identity, router and control listener.
    """

    def __init__(
        self,
        test: ChainTestCase,
        address: RelayAddress,
        allowed: list[RelayAddress],
        maxHops: int = 256,
    ) -> None:
        self.address = address
        self.identity = Identity.generate()
        self.router = Router(self.identity, test.clock)
        self.router.kernelSplice = False
        self.router.hops = HopForwarder(
            test.clock,
            [(r.host, r.port) for r in allowed],
            maxPerIdentity=maxHops,
            endpointFor=lambda host, port: test.network.endpoint(address.host, host, port),
        )
        test.network.listen(
            address.host, address.port, ControlFactory(self.router, test.serverOptions)
        )

    def controlSessions(self) -> list[RelayControlProtocol]:
        """
        @return: The relay's control sessions that said Hello, by their data pools' owners.
        """
        return [pool._owner for pool in self.router.sessions.values()]  # type: ignore[misc]


class Greeter(amp.AMP):
    """
    A bare AMP client inside TLS to the last relay: says Hello once connected.

    @ivar hello: The relay's answer, once it came.
    """

    hello: dict[str, Any] | None = None

    def connectionMade(self) -> None:
        """
        Say Hello.
        """
        super().connectionMade()

        def answered(response: dict[str, Any]) -> None:
            self.hello = response

        self.callRemote(Hello, **helloArguments()).addCallback(answered)


class ChainTestCase(SynchronousTestCase):
    """
    Relays A, B and C on an in-memory network; A forwards to B, B to C; a tunnel identity and pins.
    """

    def setUp(self) -> None:
        """
        Build the network, the relays and the tunnel's identity, pins and reporter.
        """
        self.clock = Clock()
        # Twisted's TLS batches small writes on the global reactor unless told a clock.
        self.patch(tls, "_get_default_clock", lambda: self.clock)
        self.network = MemoryNetwork(self.clock)
        key, chain = LocalCA.loadOrCreate(self.mktemp(), "test").issue(["localhost"])
        self.serverOptions = CertificateOptions(
            privateKey=key, certificate=chain[0], extraCertChain=chain[1:]
        )
        self.a = Relay(self, A, [B])
        self.b = Relay(self, B, [C])
        self.c = Relay(self, C, [])
        self.identity = Identity.generate()
        self.pinsPath = os.path.join(self.mktemp(), "known_relays.json")
        self.pins = KnownRelays(self.pinsPath)
        self.reporter = Reporter(io.StringIO())
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def hop(
        self, previous: IStreamClientEndpoint, hop: RelayAddress, destination: RelayAddress
    ) -> HopEndpoint:
        """
        @return: A hop through C{hop} to C{destination} over C{previous}.
        """
        return HopEndpoint(
            self.clock, previous, hop, destination, self.identity, self.pins, self.reporter
        )

    def fromTunnel(self, relay: RelayAddress) -> MemoryEndpoint:
        """
        @return: A TCP endpoint from the tunnel's host to C{relay}.
        """
        return self.network.endpoint("tunnel", relay.host, relay.port)

    def greet(self, endpoint: IStreamClientEndpoint) -> tuple[Deferred[Greeter], Greeter]:
        """
        Connect a L{Greeter} over TLS through C{endpoint} and run the network.
        """
        greeter = Greeter()
        d = connectProtocol(wrapClientTLS(relayTLSOptions(), endpoint), greeter)
        self.network.flush()
        return d, greeter

    def opened(self) -> list[dict[str, Any]]:
        """
        @return: The relays' C{hop ... opened} log events.
        """
        return [e for e in self.events if "opened:" in e.get("log_format", "")]


class HopEndpointTests(ChainTestCase):
    """
    One hop: the tunnel reaches relay B through relay A.
    """

    def test_interface(self) -> None:
        """
        L{HopEndpoint} is a stream client endpoint.
        """
        self.assertTrue(verifyObject(IStreamClientEndpoint, self.hop(self.fromTunnel(A), A, B)))

    def test_throughA(self) -> None:
        """
        TLS and AMP to B run through A: B answers Hello (its identity verifies on the tunnel's own
        TLS session to B), B's control session comes from A's outbound connection (the port A
        logs), and A is pinned like a relay.
        """
        d, greeter = self.greet(self.hop(self.fromTunnel(A), A, B))
        self.assertIs(self.successResultOf(d), greeter)
        assert greeter.hello is not None
        self.assertEqual(greeter.hello["relayKey"], self.b.identity.publicKey)
        [session] = self.b.controlSessions()
        assert session.transport is not None
        peer = session.transport.getPeer()
        self.assertEqual(getattr(peer, "host", None), ADDRESSES[A.host])
        [opened] = self.opened()
        self.assertEqual(opened["local"], f"{ADDRESSES[A.host]}:{getattr(peer, 'port', None)}")
        self.assertEqual(opened["destination"], B.address)
        self.assertEqual(opened["peer"].split(":")[0], ADDRESSES["tunnel"])
        self.assertEqual(self.pins.pinned(A.address), self.a.identity.id)
        self.assertEqual(self.a.router.hops.openFor(self.identity.id), 1)

    def test_closeReleases(self) -> None:
        """
        Closing the stream to B closes the hop at A, which gives the identity's slot back.
        """
        d, greeter = self.greet(self.hop(self.fromTunnel(A), A, B))
        self.successResultOf(d)
        assert greeter.transport is not None
        greeter.transport.loseConnection()
        self.network.flush()
        self.assertEqual(self.a.router.hops.openFor(self.identity.id), 0)
        self.assertEqual(self.b.controlSessions(), [])

    def test_refusedIsFatal(self) -> None:
        """
        A hop A does not allow fails with L{FatalRelayError} naming the hop relay and the
        destination, with A's reason.
        """
        d, _ = self.greet(self.hop(self.fromTunnel(A), A, C))
        failure = self.failureResultOf(d, FatalRelayError)
        message = failure.getErrorMessage()
        self.assertIn(f"relay {A.address} (--via) refused the hop to {C.address}", message)
        self.assertIn("is not allowed on this relay", message)

    def test_noHopsIsFatal(self) -> None:
        """
        A relay that forwards no hops says so, and that is fatal too.
        """
        d, _ = self.greet(self.hop(self.fromTunnel(C), C, A))
        failure = self.failureResultOf(d, FatalRelayError)
        self.assertIn("this relay does not forward hops", failure.getErrorMessage())

    def test_limitIsRetryable(self) -> None:
        """
        A relay at its per-identity limit refuses with a retryable L{HopFailed}.
        """
        self.a.router.hops.maxPerIdentity = 1
        first, _ = self.greet(self.hop(self.fromTunnel(A), A, B))
        self.successResultOf(first)
        second, _ = self.greet(self.hop(self.fromTunnel(A), A, B))
        failure = self.failureResultOf(second, HopFailed)
        self.assertIn(f"relay {A.address} (--via) cannot forward to {B.address} now", str(failure))

    def test_unreachableIsRetryable(self) -> None:
        """
        A destination the hop relay cannot connect to is a retryable L{HopFailed}.
        """
        self.a.router.hops = HopForwarder(
            self.clock,
            [("nowhere.example", 4017)],
            endpointFor=lambda host, port: self.network.endpoint(A.host, host, port),
        )
        nowhere = RelayAddress("nowhere.example", 4017)
        d, _ = self.greet(self.hop(self.fromTunnel(A), A, nowhere))
        failure = self.failureResultOf(d, HopFailed)
        self.assertIn("cannot connect to nowhere.example:4017", failure.getErrorMessage())

    def test_deadHopBlamed(self) -> None:
        """
        When the hop relay itself cannot be reached, the retryable L{HopFailed} names it, not the
        relay at the end of the chain.
        """
        d, _ = self.greet(self.hop(_RefusingEndpoint(), A, B))
        failure = self.failureResultOf(d, HopFailed)
        self.assertEqual(
            failure.getErrorMessage(),
            f"cannot reach relay {A.address} (--via, on the way to {B.address}): "
            "Connection was refused by other side: 111: Connection refused",
        )

    def test_hopIdentityChecked(self) -> None:
        """
        A hop relay presenting another identity than the one given with C{--via A#ID} is fatal,
        and the advice names C{--via}.
        """
        other = Identity.generate().id
        hop = RelayAddress(A.host, A.port, other)
        d, _ = self.greet(self.hop(self.fromTunnel(A), hop, B))
        message = self.failureResultOf(d, FatalRelayError).getErrorMessage()
        self.assertIn(f"--via {A.address}#{other} was given", message)
        self.assertEqual(self.a.router.hops.openFor(self.identity.id), 0)

    def test_timeout(self) -> None:
        """
        A hop relay that accepts and never answers fails the hop after L{HOP_TIMEOUT} seconds with
        L{HopFailed}, and the connection to it is aborted.
        """
        silent: list[Protocol] = []
        self.network.listen(
            "relay-a.example",
            4018,
            Factory.forProtocol(lambda: silent.append(Protocol()) or silent[-1]),
        )
        d, _ = self.greet(self.hop(self.network.endpoint("tunnel", A.host, 4018), A, B))
        self.assertNoResult(d)
        self.clock.advance(HOP_TIMEOUT)
        self.network.flush()
        failure = self.failureResultOf(d, HopFailed)
        self.assertIn(f"not open within {HOP_TIMEOUT:g} s", failure.getErrorMessage())
        [protocol] = silent
        assert protocol.transport is not None
        self.assertTrue(protocol.transport.disconnected)  # type: ignore[attr-defined]

    def test_cancel(self) -> None:
        """
        Cancelling the connection attempt aborts the connection to the hop relay.
        """
        endpoint = self.hop(self.fromTunnel(A), A, B)
        d = endpoint.connect(Factory.forProtocol(Protocol))
        d.cancel()
        self.failureResultOf(d)
        self.network.flush()
        self.assertEqual(self.a.router.hops.openFor(self.identity.id), 0)
        self.assertTrue(all(pump.clientIO.disconnected for pump in self.network.pumps))


class ChainTests(ChainTestCase):
    """
    Two hops: the tunnel registers with relay C through A, then B.
    """

    def test_registerThroughTwoHops(self) -> None:
        """
        A tunnel control session over TLS to C, through A and B, registers its lease on C; C sees
        the session coming from B, B from A; both hop relays and C are pinned.
        """
        link = FakeLink(self.clock, self.identity, self.pinsPath)
        chain = self.hop(self.hop(self.fromTunnel(A), A, B), B, C)
        d = connectProtocol(wrapClientTLS(relayTLSOptions(), chain), TunnelControlProtocol(link))  # type: ignore[arg-type]
        self.network.flush()
        protocol = self.successResultOf(d)
        self.assertEqual(link.fatals, [])
        self.assertEqual([h for (_, h, _) in link.registrations], [["app.localhost"]])
        lease = self.c.router.leases.route("app")
        assert lease is not None
        self.assertEqual(lease.owner, self.identity.id)
        self.assertIs(lease.holder, self.c.controlSessions()[0])
        self.assertEqual(protocol.relayId, self.c.identity.id)
        peerOfC = lease.holder.transport.getPeer()  # type: ignore[union-attr]
        self.assertEqual(peerOfC.host, ADDRESSES[B.host])
        opened = {e["destination"]: e for e in self.opened()}
        self.assertEqual(opened[C.address]["local"], f"{peerOfC.host}:{peerOfC.port}")
        self.assertEqual(opened[C.address]["peer"].split(":")[0], ADDRESSES[A.host])
        self.assertEqual(opened[B.address]["peer"].split(":")[0], ADDRESSES["tunnel"])
        for relay in (self.a, self.b, self.c):
            self.assertEqual(self.pins.pinned(relay.address.address), relay.identity.id)

    def test_chainEndpoint(self) -> None:
        """
        L{chainEndpoint} nests one L{HopEndpoint} per C{--via} relay, first hop innermost, around a
        TCP endpoint to the first hop; without hops it is TCP to the relay.
        """
        relay = parseChain("relay.example:4017", ["relay-a.example", "relay-b.example"])
        outer = chainEndpoint(self.clock, relay, self.identity, self.pins, self.reporter)
        assert isinstance(outer, HopEndpoint)
        self.assertEqual((outer.hop, outer.destination.address), (relay.via[1], C.address))
        inner = outer._previous
        assert isinstance(inner, HopEndpoint)
        self.assertEqual((inner.hop, inner.destination), (relay.via[0], relay.via[1]))
        self.assertIsInstance(inner._previous, HostnameEndpoint)
        direct = chainEndpoint(
            self.clock, parseChain("relay.example"), self.identity, self.pins, self.reporter
        )
        self.assertIsInstance(direct, HostnameEndpoint)


class _RefusingEndpoint:
    """
    A client endpoint whose every connection attempt is refused.
    """

    def connect(self, factory: Any) -> Deferred[Any]:
        """
        @return: A failed L{Deferred}.
        """
        return fail(ConnectionRefusedError(111, "Connection refused"))
