"""
End-to-end tests of the relay's registration gate (issue 14): a real C{twistd -n portal-relay} on
127.0.0.1, registration floods sent with the tunnel's control protocol from a client bound to
127.0.0.2 (fresh identities, one connection each), and legitimate registrations from 127.0.0.3 and
from a real C{portal expose} (127.0.0.1): loopback addresses are separate sources to the relay.
"""

from __future__ import annotations

import os
import time
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredSemaphore, gatherResults, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.task import deferLater
from twisted.protocols import amp
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from portal.trust.challenge import signRegistration
from portal.trust.identity import Identity, identityId
from portal.trust.proofofwork import solve
from portal.trust.relayhello import helloArguments, relayTLSOptions
from portal.wire.control import Challenge, GoingAway, Hello, Register
from tests.metricstext import metricValues
from tests.realprocesses import (
    freePortRange,
    homeDir,
    listenLocal,
    startRelay,
    startTunnel,
    waitForLease,
)

#: Rates high enough that the floods below meet the quotas, not the rate limits.
FAST = [
    "--hello-rate",
    "1000/1000",
    "--challenge-rate",
    "1000/1000",
    "--register-rate",
    "1000/1000",
]
#: Fresh identities in the name flood, and the name quota per address.
FLOOD = 200
NAME_QUOTA = 20
#: The proof of work is on, capped low so the flood's client solves it quickly.
WORK = ["--pow-quiet-rate", "1", "--pow-max-bits", "8"]


class _TunnelSide(amp.AMP):
    """
    The client side of a control session, as a tunnel that lists C{goaway} among its capabilities
    (L{helloArguments} does) must be: it accepts L{GoingAway} (a relay stopping at the end of a
    test may send it to a session still closing).
    """

    @GoingAway.responder
    def goingAway(self, deadline: float) -> dict[str, object]:
        """
        Nothing to do: the session is ending anyway.
        """
        return {}


async def register(
    controlPort: int, source: str, identity: Identity, name: str, mode: str = "stream"
) -> dict[str, Any]:
    """
    Register C{name} for C{identity} as a tunnel would (Hello, Challenge, the proof of work if
    asked, Register) on a new control session from C{source}, then close the session (the name
    stays reserved).

    @return: The relay's answer to L{Register}; fails with the relay's refusal.
    """
    endpoint = wrapClientTLS(
        relayTLSOptions(),
        TCP4ClientEndpoint(reactor, "127.0.0.1", controlPort, timeout=10, bindAddress=(source, 0)),
    )
    protocol = await connectProtocol(endpoint, _TunnelSide()).addTimeout(10, reactor)
    try:
        hello = await protocol.callRemote(Hello, **helloArguments()).addTimeout(10, reactor)
        challenge = await protocol.callRemote(Challenge, names=[name]).addTimeout(10, reactor)
        nonce = challenge["nonce"]
        extra = {"proof": solve(nonce, challenge["work"])} if challenge["work"] else {}
        answer: dict[str, Any] = await protocol.callRemote(
            Register,
            publicKey=identity.publicKey,
            names=[name],
            nonce=nonce,
            signature=signRegistration(identity, identityId(hello["relayKey"]), nonce, [name]),
            mode=mode,
            **extra,
        ).addTimeout(10, reactor)
        return answer
    finally:
        assert protocol.transport is not None
        protocol.transport.loseConnection()


async def flood(controlPort: int, count: int, prefix: str, mode: str = "stream") -> list[Any]:
    """
    Register C{count} names from 127.0.0.2, each with a fresh identity, 20 at a time.

    @return: Each registration's answer, or the exception it failed with.
    """
    semaphore = DeferredSemaphore(20)

    async def one(index: int) -> Any:
        try:
            return await register(
                controlPort, "127.0.0.2", Identity.generate(), f"{prefix}{index}", mode
            )
        except Exception as e:
            return e

    return list(
        await gatherResults(
            [semaphore.run(lambda i=i: Deferred.fromCoroutine(one(i))) for i in range(count)]
        )
    )


@inlineCallbacks
def metrics(httpPort: int) -> Any:
    """
    Read the relay's C{/metrics} from its plain-HTTP listener.

    @return: A L{Deferred} firing with the metric values by name (labels included).
    """
    response = yield treq.get(f"http://127.0.0.1:{httpPort}/metrics", persistent=False).addTimeout(
        10, reactor
    )
    body = yield treq.text_content(response)
    return metricValues(body)


class RegistrationFloodTests(TestCase):
    """
    Fresh identities from one address hold no more than the address's quota, while others register.
    """

    timeout = 180

    @inlineCallbacks
    def test_nameFlood(self) -> Any:
        """
        200 fresh identities from 127.0.0.2 hold exactly the quota of 20 names, the rest told why;
        a registration from 127.0.0.3 sent in the middle of the flood succeeds within seconds, and
        so does a real tunnel's afterwards (solving the proof of work the flood raised). Refusals
        are counted by reason on C{/metrics}.
        """
        stateDir = os.path.join(homeDir(self, "relay"), "state")
        relay, publicPort, controlPort = yield startRelay(
            self,
            stateDir,
            extra=[
                *FAST,
                *WORK,
                "--max-names-per-source",
                str(NAME_QUOTA),
                "--http",
                "tcp:0:interface=127.0.0.1",
            ],
        )
        httpMatch = yield relay.waitFor(r"http listening on 127\.0\.0\.1:(\d+)")
        flooding = Deferred.fromCoroutine(flood(controlPort, FLOOD, "squat"))
        started = time.monotonic()
        legit = yield Deferred.fromCoroutine(
            register(controlPort, "127.0.0.3", Identity.generate(), "legit")
        )
        legitSeconds = time.monotonic() - started
        results = yield flooding
        self.assertEqual(legit["hostnames"], ["legit.localhost"])
        self.assertLess(legitSeconds, 5.0)
        held = [r for r in results if isinstance(r, dict)]
        refused = [r for r in results if not isinstance(r, dict)]
        self.assertEqual(len(held), NAME_QUOTA)
        self.assertEqual(
            {str(e).split(" on this relay")[0] for e in refused},
            {f"your address already holds {NAME_QUOTA} lease names"},
        )
        values = yield metrics(int(httpMatch.group(1)))
        self.assertEqual(
            values['portal_refusals_total{reason="names_per_source"}'], FLOOD - NAME_QUOTA
        )
        self.assertGreater(values["portal_relay_pow_difficulty_bits"], 0)
        root = Resource()
        root.putChild(b"", _Hello())
        targetPort = yield listenLocal(self, Site(root))
        tunnel = startTunnel(self, homeDir(self, "tunnel"), controlPort, str(targetPort))
        lease = yield waitForLease(tunnel)
        self.assertIn(".localhost", lease["url"])
        self.assertIn(f":{publicPort}", lease["url"])
        yield relay.waitFor(r"refused 127\.0\.0\.2: your address already holds 20 lease names")

    @inlineCallbacks
    def test_challengeFlood(self) -> Any:
        """
        A flood of 1,000 challenges pipelined on one session from 127.0.0.2, with the default
        limits, gets the per-address burst (200) and then C{TRY_AGAIN}, after which the relay reads
        the session only as fast as requests are earned (20 a second): in the seconds the test
        watches, it answers at most the burst plus twice the rate, not the 1,000. The refusals are
        counted on C{/metrics} and logged once, not once per challenge; a registration from
        127.0.0.3 goes through meanwhile (solving the proof of work the flood raised).
        """
        stateDir = os.path.join(homeDir(self, "relay"), "state")
        relay, _, controlPort = yield startRelay(
            self, stateDir, extra=["--http", "tcp:0:interface=127.0.0.1"]
        )
        httpMatch = yield relay.waitFor(r"http listening on 127\.0\.0\.1:(\d+)")
        endpoint = wrapClientTLS(
            relayTLSOptions(),
            TCP4ClientEndpoint(
                reactor, "127.0.0.1", controlPort, timeout=10, bindAddress=("127.0.0.2", 0)
            ),
        )
        protocol = yield connectProtocol(endpoint, _TunnelSide()).addTimeout(10, reactor)
        self.addCleanup(lambda: protocol.transport.loseConnection())
        yield protocol.callRemote(Hello, **helloArguments()).addTimeout(10, reactor)
        started = time.monotonic()
        answers: list[Any] = []
        asked = [
            protocol.callRemote(Challenge, names=["flood"])
            .addCallbacks(answers.append, lambda f: answers.append(f.value))
            .addTimeout(30, reactor)
            for _ in range(1000)
        ]
        legit = yield Deferred.fromCoroutine(
            register(controlPort, "127.0.0.3", Identity.generate(), "legit")
        )
        self.assertEqual(legit["hostnames"], ["legit.localhost"])
        yield relay.waitFor(r"too many challenge requests")
        values = yield metrics(int(httpMatch.group(1)))
        seconds = time.monotonic() - started
        refusals = values['portal_refusals_total{reason="challenge_rate_source"}']
        self.assertGreaterEqual(refusals, 1)
        self.assertLessEqual(refusals, 20 * seconds + 1)
        protocol.transport.abortConnection()
        yield gatherResults(asked, consumeErrors=True).addErrback(lambda _: None)
        seconds = time.monotonic() - started
        issued = [a for a in answers if isinstance(a, dict)]
        refused = [a for a in answers if "too many challenge requests" in str(a)]
        self.assertGreaterEqual(len(issued), 200)
        self.assertLessEqual(len(issued), 200 + 20 * seconds + 1)
        self.assertLessEqual(len(issued) + len(refused), 200 + 40 * seconds + 2)
        logged = [line for line in relay.lines if "too many challenge requests" in line]
        self.assertEqual(len(logged), 1)

    @inlineCallbacks
    def test_handshakesPaced(self) -> Any:
        """
        With C{--handshake-rate 5/2}, 20 control sessions opened at once from 127.0.0.2 shake hands
        two at once and then five a second, the rest waiting (counted on C{/metrics}); a session
        from 127.0.0.3 that arrives while they wait is served in its own turn, before most of
        them, and every session gets its L{Hello} answered.
        """
        stateDir = os.path.join(homeDir(self, "relay"), "state")
        relay, _, controlPort = yield startRelay(
            self,
            stateDir,
            extra=["--http", "tcp:0:interface=127.0.0.1", "--handshake-rate", "5/2"],
        )
        httpMatch = yield relay.waitFor(r"http listening on 127\.0\.0\.1:(\d+)")
        httpPort = int(httpMatch.group(1))
        answered: list[str] = []

        async def hello(source: str, label: str) -> None:
            endpoint = wrapClientTLS(
                relayTLSOptions(),
                TCP4ClientEndpoint(
                    reactor, "127.0.0.1", controlPort, timeout=10, bindAddress=(source, 0)
                ),
            )
            protocol = await connectProtocol(endpoint, _TunnelSide()).addTimeout(10, reactor)
            try:
                await protocol.callRemote(Hello, **helloArguments()).addTimeout(30, reactor)
                answered.append(label)
            finally:
                assert protocol.transport is not None
                protocol.transport.loseConnection()

        flood = [Deferred.fromCoroutine(hello("127.0.0.2", f"flood{i}")) for i in range(20)]
        for _ in range(100):
            values = yield metrics(httpPort)
            if values.get("portal_relay_handshakes_waiting", 0) >= 10:
                break
            yield deferLater(reactor, 0.05)
        self.assertGreaterEqual(values["portal_relay_handshakes_waiting"], 10)
        yield Deferred.fromCoroutine(hello("127.0.0.3", "user"))
        yield gatherResults(flood)
        self.assertEqual(len(answered), 21)
        self.assertLess(answered.index("user"), 10, answered)
        values = yield metrics(httpPort)
        self.assertGreaterEqual(values["portal_relay_handshakes_delayed_total"], 18)
        self.assertEqual(values["portal_relay_handshakes_waiting"], 0)

    @inlineCallbacks
    def test_denyListOnSighup(self) -> Any:
        """
        An identity added to the state directory's deny list is refused once the relay got SIGHUP,
        without a restart; the identity registered before that, and others still register.
        """
        stateDir = os.path.join(homeDir(self, "relay"), "state")
        relay, _, controlPort = yield startRelay(self, stateDir)
        abuser = Identity.generate()
        yield Deferred.fromCoroutine(register(controlPort, "127.0.0.3", abuser, "before"))
        with open(os.path.join(stateDir, "denied-identities"), "w") as f:
            f.write(f"# flooded\n{abuser.id}\n")
        before = len(relay.lines)
        relay.signal("HUP")
        yield relay.waitFor(r"identity lists: 1 denied; open", after=before)
        refused = yield Deferred.fromCoroutine(
            register(controlPort, "127.0.0.3", abuser, "after")
        ).addErrback(lambda f: f.value)
        self.assertIn("this identity is not allowed to register on this relay", str(refused))
        other = yield Deferred.fromCoroutine(
            register(controlPort, "127.0.0.3", Identity.generate(), "other")
        )
        self.assertEqual(other["hostnames"], ["other.localhost"])

    @inlineCallbacks
    def test_portSquatters(self) -> Any:
        """
        Ten throwaway identities from 127.0.0.2 take only their address's quota of raw TCP ports;
        a tunnel from 127.0.0.3 still gets one of the range's ports.
        """
        low, high = freePortRange(6)
        stateDir = os.path.join(homeDir(self, "relay"), "state")
        _, _, controlPort = yield startRelay(
            self,
            stateDir,
            extra=[*FAST, "--tcp-ports", f"{low}-{high}", "--max-ports-per-source", "2"],
        )
        results = yield Deferred.fromCoroutine(flood(controlPort, 10, "port", mode="tcp"))
        ports = [r["tcpPort"] for r in results if isinstance(r, dict)]
        self.assertEqual(len(ports), 2)
        refused = [str(r) for r in results if not isinstance(r, dict)]
        self.assertEqual(len(refused), 8)
        self.assertTrue(all("already holds 2 public ports" in r for r in refused), refused)
        legit = yield Deferred.fromCoroutine(
            register(controlPort, "127.0.0.3", Identity.generate(), "legit", mode="tcp")
        )
        self.assertIn(legit["tcpPort"], range(low, high + 1))
        self.assertNotIn(legit["tcpPort"], ports)


class _Hello(Resource):
    """
    The tunnel's local target: a page saying hello.
    """

    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        """
        @return: C{hello}.
        """
        return b"hello"
