"""
Tests for the registration gate in control sessions (L{portal.relay.admission} as
L{portal.relay.control.RelayControlProtocol} uses it, and the tunnel's proof of work in
L{portal.tunnel.control}), over TLS in memory.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.web.test.requesthelper import DummyRequest

from portal.relay import control
from portal.relay.admission import AdmissionLimits, CommandRates, Rate
from portal.relay.control import MAX_HOLD_OFF
from portal.relay.identitylists import IdentityLists
from portal.relay.ports import PortAllocator, PortRange
from portal.relay.rawtcp import tcpPorts
from portal.relay.router import RelayLimits
from portal.relay.site import Metrics
from portal.trust.challenge import signRegistration
from portal.trust.identity import Identity
from portal.trust.proofofwork import solutionBits, solve
from portal.tunnel.control import MAX_WORK
from portal.wire.control import (
    MAX_VERSION,
    MIN_VERSION,
    Challenge,
    Hello,
    Register,
    RegistrationRefused,
    TryAgain,
)
from tests.metricstext import metricValues
from tests.test_control import LABEL, ClientTestCase, ControlTestCase
from tests.test_rawtcp import PortsReactor


class GateClientTestCase(ClientTestCase):
    """
    A bare AMP client whose session the relay counts as coming from C{10.0.0.2}.
    """

    source = "10.0.0.2"

    def setUp(self) -> None:
        """
        Connect, and set the source address the relay counts the session under.
        """
        super().setUp()
        self.connection.relay.source = self.source

    def reconnect(self, source: str) -> None:
        """
        Replace the client by a new connection from C{source}.
        """
        self.connection = self.connect(amp.AMP)
        self.client = self.connection.tunnel
        self.connection.relay.source = source

    def hello(self, capabilities: tuple[str, ...] = ("stream", "pow")) -> None:
        """
        Say Hello, with the C{pow} capability unless told otherwise.
        """
        super().hello(capabilities)

    def workChallenge(self, names: list[str]) -> tuple[bytes, int]:
        """
        Ask for a challenge and return its nonce and the work it asks for.
        """
        result = self.call(Challenge, names=names)
        self.assertNotIsInstance(result, Failure)
        return result["nonce"], result.get("work") or 0

    def busy(self, bits: int) -> None:
        """
        Make the relay ask for C{bits} of work with every registration challenge.
        """
        self.patch(self.router.admission.difficulty, "current", lambda: bits)


class RateLimitTests(GateClientTestCase):
    """
    Hello, Challenge and Register are rate-limited per source address.
    """

    limits = RelayLimits(
        admission=AdmissionLimits(
            perSource=CommandRates(Rate(1.0, 2.0), Rate(1.0, 2.0), Rate(1.0, 2.0))
        )
    )

    def helloOverBurst(self) -> Any:
        """
        Say Hello on two sessions from the test's source (its burst), then on a third.

        @return: The third Hello's answer.
        """
        self.hello()
        self.reconnect(self.source)
        self.hello()
        self.reconnect(self.source)
        return self.call(
            Hello,
            minVersion=MIN_VERSION,
            maxVersion=MAX_VERSION,
            capabilities=["stream"],
            software="t",
        )

    def test_helloPerSource(self) -> None:
        """
        A source that said Hello as often as its burst allows is told to try again; a session from
        another source is not affected. The refusal is counted by reason.
        """
        result = self.helloOverBurst()
        self.assertRefusedWith(result, TryAgain, "too many hello requests from your address")
        self.reconnect("10.0.0.3")
        self.hello()
        self.assertEqual(self.router.refusals.counts, {"hello_rate_source": 1})

    def test_refusedHelloStillTimed(self) -> None:
        """
        A session whose Hello was refused stays in C{greeting}: the Hello deadline still closes
        it if the client does not go away.
        """
        self.assertIsInstance(self.helloOverBurst(), Failure)
        self.assertEqual(self.connection.relay.lifecycle, "greeting")
        self.clock.advance(self.router.limits.helloTimeout)
        self.connection.flush()
        self.assertEqual(self.connection.relay.lifecycle, "closed")

    def pipeline(self, count: int) -> list[Any]:
        """
        Send C{count} challenges at once (a flood pipelined on one session) and run the exchange.

        @return: The answers so far, filled in as more come.
        """
        results: list[Any] = []
        for _ in range(count):
            self.client.callRemote(Challenge, names=[LABEL]).addBoth(results.append)
        self.connection.flush()
        return results

    def advance(self, seconds: float) -> None:
        """
        Move the relay's clock on and run the exchange.
        """
        self.clock.advance(seconds)
        self.connection.flush()

    def test_challengeFloodBounded(self) -> None:
        """
        A flood of challenges pipelined on one session gets its burst and then C{TRY_AGAIN}; the
        relay then reads nothing more from the session until a request has been earned (1 s at one
        a second), so the flood costs it one issued challenge and one refusal a second, not one
        refusal per request sent. The refusals are counted.
        """
        self.hello()
        results = self.pipeline(50)
        issued = [r for r in results if not isinstance(r, Failure)]
        self.assertEqual((len(issued), len(results)), (2, 3))
        self.assertRefusedWith(results[-1], TryAgain, "too many challenge requests")
        self.assertTrue(self.connection.relay.paused)
        self.advance(0.99)
        self.assertEqual(len(results), 3)
        self.advance(0.01)
        self.assertEqual(len(results), 5)
        self.assertNotIsInstance(results[3], Failure)
        self.assertRefusedWith(results[4], TryAgain, "too many challenge requests")
        for _ in range(10):
            self.advance(1.0)
        self.assertEqual(len(results), 25)
        self.assertEqual(len(self.router.challenges), 13)
        self.assertEqual(self.router.refusals.counts, {"challenge_rate_source": 12})

    def test_pipelinedReadTakesTurns(self) -> None:
        """
        Requests that arrive in one read, within the rate, are answered
        L{control.MAX_REQUESTS_PER_READ} at a time: then the session yields for
        L{control.YIELD_SECONDS}, so a burst of pipelined requests never holds every other
        connection while it is answered.
        """
        self.patch(self.router.admission, "rate", lambda command, source: None)
        self.hello()
        # The client's twenty requests leave in one write, so the relay reads them at once.
        written: list[bytes] = []
        transport = self.client.transport
        transport.write = written.append
        results: list[Any] = []
        for _ in range(20):
            self.client.callRemote(Challenge, names=[LABEL]).addBoth(results.append)
        del transport.write
        transport.write(b"".join(written))
        self.connection.flush()
        step = control.MAX_REQUESTS_PER_READ
        self.assertEqual(len(results), step)
        self.assertTrue(self.connection.relay.paused)
        self.advance(control.YIELD_SECONDS)
        self.assertEqual(len(results), 2 * step)
        self.advance(control.YIELD_SECONDS)
        self.assertEqual(len(results), 20)
        self.assertNotIn(True, [isinstance(r, Failure) for r in results])

    def test_holdOffEndsWithSession(self) -> None:
        """
        A session closed while held off leaves no timer behind.
        """
        self.hello()
        self.pipeline(10)
        self.assertEqual(len(self.clock.getDelayedCalls()) > 0, True)
        relay = self.connection.relay
        self.assertIsNotNone(relay._resumeCall)
        self.client.transport.loseConnection()
        self.connection.flush()
        self.assertIsNone(relay._resumeCall)

    def test_registerPerSource(self) -> None:
        """
        Registrations are limited too, before their signature is checked.
        """
        self.hello()
        for _ in range(2):
            self.register([LABEL], self.challenge([LABEL]))
        self.clock.advance(1)
        nonce = self.challenge([LABEL])
        self.register([LABEL], nonce)
        result = self.register([LABEL], nonce, signature=b"not checked")
        self.assertRefusedWith(result, TryAgain, "too many register requests")


class HoldOffTests(GateClientTestCase):
    """
    Refused again straight after a hold-off, a session is held off twice as long each time.
    """

    limits = RelayLimits(
        admission=AdmissionLimits(
            perSource=CommandRates(Rate(1.0, 2.0), Rate(1.0, 2.0), Rate(1.0, 2.0)),
            total=CommandRates(Rate(100.0, 100.0), Rate(0.001, 2.0), Rate(100.0, 100.0)),
        )
    )

    def test_holdOffDoubles(self) -> None:
        """
        Here the relay's total is spent: every request after the burst is refused, and the session
        is read again after 1, 2, 4, 8, 8, ... seconds (at most L{MAX_HOLD_OFF}).
        """
        self.hello()
        results: list[Any] = []
        for _ in range(30):
            self.client.callRemote(Challenge, names=[LABEL]).addBoth(results.append)
        self.connection.flush()
        self.assertEqual(len(results), 3)
        answeredAt = []
        for second in range(1, 40):
            before = len(results)
            self.clock.advance(1.0)
            self.connection.flush()
            if len(results) > before:
                answeredAt.append(second)
        self.assertEqual(MAX_HOLD_OFF, 8.0)
        self.assertEqual(answeredAt, [1, 3, 7, 15, 23, 31, 39])
        self.assertEqual(len(results), 10)
        self.assertTrue(all(isinstance(r, Failure) for r in results[2:]))
        self.assertEqual(
            self.router.refusals.counts, {"challenge_rate_source": 1, "challenge_rate_total": 7}
        )


class NameQuotaTests(GateClientTestCase):
    """
    A source address holds at most its quota of lease names, whatever the identities.
    """

    limits = RelayLimits(admission=AdmissionLimits(maxNamesPerSource=3))

    def registerAs(self, identity: Identity, names: list[str]) -> Any:
        """
        Register C{names} for C{identity} on a new session from the current source.
        """
        self.reconnect(self.source)
        self.hello()
        return self.register(names, self.challenge(names), identity=identity)

    def test_freshIdentitiesBounded(self) -> None:
        """
        Fresh identities from one address get the quota's names and no more, with a message saying
        why; an identity from another address registers at once.
        """
        self.registerAs(Identity.generate(), ["a1", "a2"])
        self.registerAs(Identity.generate(), ["b1"])
        result = self.registerAs(Identity.generate(), ["c1"])
        self.assertRefusedWith(
            result, RegistrationRefused, "your address already holds 3 lease names"
        )
        self.assertIsNone(self.router.leases.ownerOf("c1"))
        self.assertEqual(self.router.refusals.counts, {"names_per_source": 1})
        self.source = "10.0.0.3"
        result = self.registerAs(Identity.generate(), ["d1"])
        self.assertEqual(result["hostnames"], ["d1.localhost"])

    def test_heldNamesRegisterAgain(self) -> None:
        """
        An identity at its address's quota registers its own names again (a reconnect).
        """
        owner = Identity.generate()
        self.registerAs(owner, ["a1", "a2", "a3"])
        self.connection.drop()
        result = self.registerAs(owner, ["a1", "a2", "a3"])
        self.assertNotIsInstance(result, Failure)

    def test_freedWhenReservationEnds(self) -> None:
        """
        Once names are no longer owned (their reservation ended), they stop counting.
        """
        self.registerAs(Identity.generate(), ["a1", "a2", "a3"])
        self.connection.drop()
        self.clock.advance(self.router.limits.leaseTTL + self.router.limits.reservation + 1)
        result = self.registerAs(Identity.generate(), ["c1"])
        self.assertNotIsInstance(result, Failure)


class PortQuotaTests(GateClientTestCase):
    """
    A source address holds at most its quota of public ports, whatever the identities, so
    throwaway identities cannot empty a port range.
    """

    limits = RelayLimits(admission=AdmissionLimits(maxPortsPerSource=2))

    def setUp(self) -> None:
        """
        Offer raw TCP mode on five ports.
        """
        super().setUp()
        self.allocator = PortAllocator(PortRange(20000, 20004), self.clock)
        self.router.tcp = tcpPorts(PortsReactor(), self.allocator, "127.0.0.1")

    def registerPort(self, source: str, name: str) -> Any:
        """
        Register C{name} in raw TCP mode for a fresh identity on a new session from C{source}.
        """
        self.reconnect(source)
        self.hello(capabilities=("stream", "tcp", "sealed-tcp", "pow"))
        return self.register(
            [name], self.challenge([name]), identity=Identity.generate(), mode="tcp"
        )

    def test_squattersBounded(self) -> None:
        """
        Fresh identities from one address get two ports, live or reserved after their sessions
        end; the third is refused, and another address still gets a port.
        """
        self.assertEqual(self.registerPort("10.0.0.2", "s1")["tcpPort"], 20000)
        self.connection.drop()
        self.assertEqual(self.registerPort("10.0.0.2", "s2")["tcpPort"], 20001)
        result = self.registerPort("10.0.0.2", "s3")
        self.assertRefusedWith(result, RegistrationRefused, "already holds 2 public ports")
        self.assertEqual(self.allocator.live + self.allocator.reserved, 2)
        self.assertEqual(self.registerPort("10.0.0.3", "legit")["tcpPort"], 20002)
        self.assertEqual(self.router.refusals.counts, {"ports_per_source": 1})

    def test_waitingRegistrationsCountedOneByOne(self) -> None:
        """
        Registrations from one address that wait on a cluster's claims at the same time are
        counted as they take their ports, not all against what the address held before any of
        them: of three, the third is refused once its claim is answered. The claims of names and
        of ports name the address.
        """
        names = _WaitingNameClaims()
        self.router.claims = names
        ports = _PortClaims()
        self.router.tcp.claims = ports
        waiting = []
        for name in ["s1", "s2", "s3"]:
            self.reconnect("10.0.0.2")
            self.hello(capabilities=("stream", "tcp", "sealed-tcp", "pow"))
            nonce = self.challenge([name])
            identity = Identity.generate()
            results: list[Any] = []
            self.client.callRemote(
                Register,
                publicKey=identity.publicKey,
                names=[name],
                nonce=nonce,
                signature=signRegistration(identity, self.relayIdentity.id, nonce, [name]),
                mode="tcp",
            ).addBoth(results.append)
            self.connection.flush()
            self.assertEqual(results, [])
            waiting.append((self.connection, results))
        self.assertEqual([source for source, _ in names.claims], ["10.0.0.2"] * 3)
        for (connection, results), (_, answer) in zip(waiting, names.claims, strict=True):
            answer.callback(None)
            connection.flush()
            self.assertEqual(len(results), 1)
        self.assertIn("tcpPort", waiting[0][1][0])
        self.assertIn("tcpPort", waiting[1][1][0])
        self.assertRefusedWith(waiting[2][1][0], RegistrationRefused, "already holds 2 public")
        self.assertEqual(ports.sources, ["10.0.0.2", "10.0.0.2"])
        self.assertEqual(self.allocator.live + self.allocator.reserved, 2)


class _WaitingNameClaims:
    """
    A cluster's name claims that wait until the test answers them.

    @ivar claims: The source of each claim asked, with the L{Deferred} it waits on.
    """

    def __init__(self) -> None:
        self.claims: list[tuple[str | None, Deferred[str | None]]] = []

    def mayRegister(self) -> str | None:
        """
        @return: L{None}: the cluster is there.
        """
        return None

    def claim(
        self, names: list[str], owner: str, source: str | None = None
    ) -> Deferred[str | None]:
        """
        @return: A L{Deferred} the test fires.
        """
        answer: Deferred[str | None] = Deferred()
        self.claims.append((source, answer))
        return answer

    def sync(self) -> None:
        """
        Nothing to publish.
        """


class _PortClaims:
    """
    A cluster's port claims, all granted at once.

    @ivar sources: The source each claim named.
    """

    def __init__(self) -> None:
        self.sources: list[str | None] = []

    def claim(
        self, kind: str, port: int, owner: str, name: str, source: str | None = None
    ) -> Deferred[bool]:
        """
        @return: A L{Deferred} that has fired with L{True}.
        """
        self.sources.append(source)
        return succeed(True)

    def released(self, kind: str, port: int, owner: str, name: str, until: float | None) -> None:
        """
        Nothing to record.
        """


class ProofOfWorkTests(GateClientTestCase):
    """
    While the relay is busy, registration challenges ask for a proof of work, checked before the
    signature.
    """

    def test_changesLogged(self) -> None:
        """
        A change of difficulty is logged with the rate that caused it.
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.hello()
        for _ in range(30):
            self.workChallenge([LABEL])
        logged = [e for e in events if "proof of work now" in e["log_format"]]
        self.assertEqual([e["bits"] for e in logged], [12])
        self.assertGreater(logged[0]["rate"], 2.0)

    def test_quietNoWork(self) -> None:
        """
        A quiet relay asks for no work (and says so to a tunnel that speaks C{pow}).
        """
        self.hello()
        self.assertEqual(self.workChallenge([LABEL])[1], 0)

    def test_solved(self) -> None:
        """
        A registration with a solution meeting the announced difficulty succeeds.
        """
        self.busy(10)
        self.hello()
        nonce, work = self.workChallenge([LABEL])
        self.assertEqual(work, 10)
        result = self.registerWithProof([LABEL], nonce, solve(nonce, work))
        self.assertEqual(result["hostnames"], [f"{LABEL}.localhost"])

    def test_missing(self) -> None:
        """
        A tunnel that speaks C{pow} and sends no solution is refused, saying how much work.
        """
        self.busy(10)
        self.hello()
        nonce, _ = self.workChallenge([LABEL])
        result = self.register([LABEL], nonce)
        self.assertRefusedWith(result, RegistrationRefused, "proof of work of 10 bits")
        self.assertEqual(self.router.refusals.counts, {"work_required": 1})

    def test_tooEasy(self) -> None:
        """
        A solution below the announced difficulty is refused and nothing is registered.
        """
        self.busy(16)
        self.hello()
        nonce, _ = self.workChallenge([LABEL])
        solution = solve(nonce, 4)
        while solutionBits(nonce, solution) >= 16:
            solution = solve(nonce, 4, start=int.from_bytes(solution, "big") + 1)
        result = self.registerWithProof([LABEL], nonce, solution)
        self.assertRefusedWith(result, RegistrationRefused, "16 are asked for")
        self.assertIsNone(self.router.leases.ownerOf(LABEL))
        self.assertEqual(self.router.refusals.counts, {"work_insufficient": 1})

    def test_replayed(self) -> None:
        """
        A solved registration replayed is refused: the challenge was used up.
        """
        self.busy(8)
        self.hello()
        nonce, work = self.workChallenge([LABEL])
        proof = solve(nonce, work)
        self.assertNotIsInstance(self.registerWithProof([LABEL], nonce, proof), Failure)
        self.assertRefusedWith(
            self.registerWithProof([LABEL], nonce, proof), TryAgain, "already used"
        )

    def test_olderTunnel(self) -> None:
        """
        A tunnel without the C{pow} capability registers while the relay is quiet; while it is
        busy it is told to try again later or upgrade.
        """
        self.hello(capabilities=("stream",))
        self.assertNotIsInstance(self.register([LABEL], self.challenge([LABEL])), Failure)
        self.busy(8)
        result = self.call(Challenge, names=[LABEL])
        self.assertIsNone(result["work"])
        result = self.register([LABEL], result["nonce"])
        self.assertRefusedWith(result, TryAgain, "upgrade the tunnel")

    def registerWithProof(self, names: list[str], nonce: bytes, proof: bytes) -> Any:
        """
        Send a correctly signed registration with the proof of work C{proof}.
        """
        return self.call(
            Register,
            publicKey=self.tunnelIdentity.publicKey,
            names=names,
            nonce=nonce,
            signature=signRegistration(self.tunnelIdentity, self.relayIdentity.id, nonce, names),
            mode="stream",
            proof=proof,
        )


class IdentityListTests(GateClientTestCase):
    """
    Denied identities, and uninvited ones on a private relay, are refused before their signature
    is checked.
    """

    def test_denied(self) -> None:
        """
        A denied identity is refused, and counted.
        """
        self.router.admission.lists = IdentityLists(denied=frozenset({self.tunnelIdentity.id}))
        self.hello()
        result = self.register([LABEL], self.challenge([LABEL]))
        self.assertRefusedWith(result, RegistrationRefused, "not allowed to register")
        self.assertEqual(self.router.refusals.counts, {"identity_denied": 1})

    def test_inviteOnly(self) -> None:
        """
        On a private relay an invited identity registers and another is refused.
        """
        self.router.admission.lists = IdentityLists(
            invited=frozenset({self.tunnelIdentity.id}), inviteOnly=True
        )
        self.hello()
        self.assertNotIsInstance(self.register([LABEL], self.challenge([LABEL])), Failure)
        result = self.register(["other"], self.challenge(["other"]), identity=Identity.generate())
        self.assertRefusedWith(result, RegistrationRefused, "this relay is private")


class TunnelWorkTests(ControlTestCase):
    """
    The tunnel solves the proof of work a busy relay asks for.
    """

    def test_tunnelSolves(self) -> None:
        """
        A tunnel registers with a busy relay, sending a solution that meets the difficulty.
        """
        self.patch(self.router.admission.difficulty, "current", lambda: 12)
        proofs: list[bytes | None] = []
        redeem = self.router.challenges.redeem

        def recording(
            nonce: bytes, names: Any, key: bytes, signature: bytes, proof: Any = None
        ) -> None:
            proofs.append(proof)
            self.assertGreaterEqual(solutionBits(nonce, proof), 12)
            redeem(nonce, names, key, signature, proof)

        self.patch(self.router.challenges, "redeem", recording)
        link = self.makeLink()
        connection = self.connectTunnel(link)
        self.assertRegistered(link, connection)
        self.assertEqual(len(proofs), 1)

    def test_tooMuchWork(self) -> None:
        """
        A relay asking for more than the tunnel spends is retried later, not solved.
        """
        self.patch(self.router.admission.difficulty, "current", lambda: MAX_WORK + 1)
        link = self.makeLink()
        self.connectTunnel(link)
        self.assertEqual(link.registrations, [])
        self.assertEqual(link.fatals, [])
        retrying = [e for e in link.reporter.events if e["event"] == "retrying"]
        self.assertEqual(len(retrying), 1)
        self.assertIn("more than this tunnel spends", retrying[0]["message"])


class MetricsTests(GateClientTestCase):
    """
    C{/metrics} shows refusals by reason and the current difficulty.
    """

    def test_otherRefusalsCounted(self) -> None:
        """
        Refusals that are not limits are counted by reason too: a command before C{Hello}, no
        common version.
        """
        self.call(Challenge, names=[LABEL])
        self.call(
            Hello,
            minVersion=MAX_VERSION + 1,
            maxVersion=MAX_VERSION + 1,
            capabilities=[],
            software="t",
        )
        self.assertEqual(self.router.refusals.counts, {"hello_first": 1, "unsupported_version": 1})

    def test_refusalsAndDifficulty(self) -> None:
        """
        A refusal appears as C{portal_refusals_total} with its reason.
        """
        self.router.admission.lists = IdentityLists(denied=frozenset({self.tunnelIdentity.id}))
        self.hello()
        self.register([LABEL], self.challenge([LABEL]))
        self.busy(14)
        text = Metrics(self.router).render_GET(DummyRequest([b"metrics"])).decode()
        values = metricValues(text)
        self.assertEqual(values['portal_refusals_total{reason="identity_denied"}'], 1)
        self.assertEqual(values["portal_relay_pow_difficulty_bits"], 14)
