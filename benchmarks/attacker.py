"""
The attacker of the "service under attack" scenario (9): a bounded mix of the attacks of issue 14
against one relay on loopback, each from its own source address, for a fixed time.

C{python -m benchmarks.attacker PLAN}, where PLAN is the JSON of an L{AttackPlan}, prints
C{attacking} once every attack has started (at the lowest scheduling priority: C{SCHED_IDLE}, or
L{NICE} alone when the plan says so) and, when the time is up (or every attack has used its budget), C{result JSON} with what each attack got, then exits. Every loop is bounded in count and in
time, and every connection is closed at the end.

The attacks:
    - idle connections: up to C{idlePerListener} connections held open, sending nothing, to each of
      the relay's listeners (public TLS, its own site after a ClientHello for the relay's hostname,
      C{--http}, control, a raw TCP lease port), reopened as the relay closes them;
    - name squatters: fresh identities registering one name each, keeping their sessions (and so
      their leases) open;
    - port squatters: the same for raw TCP ports;
    - a UDP flood: one-byte datagrams from many ports of one address to a UDP lease's port;
    - a challenge flood: C{Challenge} requests on one control session, many in flight at once.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import ssl
import sys
from collections import Counter
from typing import Any

import attrs
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.error import ConnectionClosed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThread
from twisted.protocols import amp
from twisted.python.failure import Failure

from portal.trust.challenge import signRegistration
from portal.trust.identity import Identity, identityId
from portal.trust.proofofwork import solve
from portal.trust.relayhello import helloArguments, relayTLSOptions
from portal.wire.control import Challenge, Hello, Register

#: The attacker's scheduling priority (C{nice}): the lowest.
NICE = 19
#: Seconds any one network step of an attack may take.
STEP_TIMEOUT = 10.0


@attrs.frozen
class AttackPlan:
    """
    What to attack, from where, and how hard.

    @ivar seconds: How long the attacks run.
    @ivar publicPort: The relay's public TLS port.
    @ivar controlPort: The relay's control port.
    @ivar httpPort: The relay's C{--http} port.
    @ivar tcpPort: A raw TCP lease's public port, or L{None}.
    @ivar udpPort: A UDP lease's public port, or L{None}.
    @ivar domain: The relay's own hostname.
    @ivar idleSource: The address the idle connections come from.
    @ivar idlePerListener: Idle connections the attacker tries to hold on each listener.
    @ivar idleOpensPerSecond: The most connections opened per second per listener.
    @ivar idleAttempts: The most connections tried per listener.
    @ivar nameSource: The address the name squatters come from.
    @ivar names: The most names the name squatters try to register.
    @ivar portSource: The address the port squatters come from.
    @ivar ports: The most raw TCP ports the port squatters try to register.
    @ivar registrationsInFlight: Registrations under way at once, per squatter kind.
    @ivar maxWorkBits: The most proof-of-work bits a squatter spends on a registration (more is
        given up: the attacker's CPU is this machine's CPU).
    @ivar udpSource: The address the UDP flood comes from.
    @ivar udpSockets: Source ports of the UDP flood.
    @ivar udpPerSecond: Datagrams per second of the UDP flood.
    @ivar challengeSource: The address the challenge flood comes from.
    @ivar challenges: The most challenges the flood asks for.
    @ivar challengesInFlight: Challenge requests outstanding at once.
    @ivar label: Put in the squatters' names, so that each attack (block) asks for new ones.
    @ivar idleScheduling: Run under C{SCHED_IDLE} (on a CPU only when nothing else wants it), as an
        attacker on a machine of its own would be, rather than at nice 19 alone (which still
        takes turns with the relay, the tunnels and the visitors on the same cores).
    """

    seconds: float
    publicPort: int
    controlPort: int
    httpPort: int
    tcpPort: int | None
    udpPort: int | None
    domain: str = "localhost"
    idleSource: str = "127.0.0.2"
    idlePerListener: int = 400
    idleOpensPerSecond: int = 100
    idleAttempts: int = 4000
    nameSource: str = "127.0.0.4"
    names: int = 500
    portSource: str = "127.0.0.5"
    ports: int = 60
    registrationsInFlight: int = 8
    maxWorkBits: int = 16
    udpSource: str = "127.0.0.6"
    udpSockets: int = 500
    udpPerSecond: int = 2000
    challengeSource: str = "127.0.0.7"
    challenges: int = 200000
    challengesInFlight: int = 100
    label: str = ""
    idleScheduling: bool = True


def clientHello(serverName: str | None) -> bytes:
    """
    Have the standard library's C{ssl} module write a real ClientHello (the tests use it too).

    @param serverName: The name to send in SNI, or L{None} for none.
    @return: The bytes a client writes first.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(incoming, outgoing, server_hostname=serverName)
    try:
        client.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


class _Idle(Protocol):
    """
    One idle connection: writes its flood's first bytes (if any), then nothing.
    """

    def __init__(self, flood: IdleFlood) -> None:
        self._flood = flood
        self.opened = 0.0

    def connectionMade(self) -> None:
        """
        Send the first bytes and count the connection as held.
        """
        assert self.transport is not None
        self.opened = self._flood.now()
        if self._flood.first:
            self.transport.write(self._flood.first)
        self._flood.held(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """
        Count the connection as closed.
        """
        self._flood.lost(self)


class IdleFlood:
    """
    Holds up to C{most} idle connections from one address to one port, reopening those the relay
    closes, at most C{perSecond} new ones a second and C{attempts} in all.

    A connection the relay accepts over its cap is closed at once, before this side sees it as
    anything but open for a moment; so the connections held are counted as those open for at least
    L{HELD} seconds. Its reactor gives it TCP connections and the time.

    @ivar first: Bytes sent on each new connection (a stalled ClientHello), or none.
    @ivar attempts: Connections tried.
    @ivar failed: Connections that could not be made.
    @ivar refused: Connections the relay closed within L{HELD} seconds.
    @ivar closedAfterHolding: Connections the relay closed after L{HELD} seconds or more (its
        timeouts), with how long each was held in C{heldSeconds}.
    @ivar maxHeld: The most connections open for L{HELD} seconds or more at once.
    """

    _TICK = 0.1
    #: Seconds open after which a connection counts as held.
    HELD = 1.0

    def __init__(
        self,
        reactor: Any,
        source: str,
        port: int,
        first: bytes,
        most: int,
        perSecond: int,
        attempts: int,
    ) -> None:
        self._reactor = reactor
        self._source, self._port = source, port
        self.first = first
        self._most, self._perSecond, self._budget = most, perSecond, attempts
        self._open: set[_Idle] = set()
        self._pending = 0
        self._stopping = False
        self.attempts = self.failed = self.refused = self.maxHeld = 0
        self.heldSeconds: list[float] = []
        self._loop = LoopingCall(self._tick)
        self._loop.clock = reactor

    def start(self) -> None:
        """
        Start opening connections.
        """
        self._loop.start(self._TICK)

    def _tick(self) -> None:
        """
        Count the connections held, and open this tick's share of the connections missing.
        """
        self.maxHeld = max(self.maxHeld, self.heldNow())
        budget = max(1, int(self._perSecond * self._TICK))
        while (
            budget and len(self._open) + self._pending < self._most and self.attempts < self._budget
        ):
            budget -= 1
            self.attempts += 1
            self._pending += 1
            endpoint = TCP4ClientEndpoint(
                self._reactor,
                "127.0.0.1",
                self._port,
                timeout=int(STEP_TIMEOUT),
                bindAddress=(self._source, 0),
            )
            d = connectProtocol(endpoint, _Idle(self))
            d.addTimeout(STEP_TIMEOUT, self._reactor)
            d.addCallbacks(self._connected, self._failed)

    def now(self) -> float:
        """
        @return: The reactor's time.
        """
        return self._reactor.seconds()

    def heldNow(self) -> int:
        """
        @return: The connections open for L{HELD} seconds or more.
        """
        now = self.now()
        return sum(1 for p in self._open if now - p.opened >= self.HELD)

    def _connected(self, protocol: _Idle) -> None:
        """
        A connection attempt ended with a connection.
        """
        self._pending -= 1

    def _failed(self, reason: Failure) -> None:
        """
        A connection attempt failed.
        """
        self._pending -= 1
        self.failed += 1

    def held(self, protocol: _Idle) -> None:
        """
        A connection is open.
        """
        self._open.add(protocol)

    def lost(self, protocol: _Idle) -> None:
        """
        A connection closed; unless this side is stopping, the relay closed it.
        """
        self._open.discard(protocol)
        if self._stopping:
            return
        seconds = self.now() - protocol.opened
        if seconds < self.HELD:
            self.refused += 1
        else:
            self.heldSeconds.append(seconds)

    def stop(self) -> dict[str, Any]:
        """
        Stop opening, close every connection, and report.

        @return: The flood's figures.
        """
        self._stopping = True
        if self._loop.running:
            self._loop.stop()
        heldAtEnd = self.heldNow()
        for protocol in list(self._open):
            assert protocol.transport is not None
            protocol.transport.abortConnection()  # type: ignore[attr-defined]
        held = sorted(self.heldSeconds)
        return {
            "attempts": self.attempts,
            "failed": self.failed,
            "refusedAtOnce": self.refused,
            "maxHeld": self.maxHeld,
            "heldAtEnd": heldAtEnd,
            "closedAfterHolding": len(held),
            "closedAfterSecondsMedian": held[len(held) // 2] if held else None,
            "closedAfterSecondsMax": held[-1] if held else None,
        }


async def _session(reactor: Any, port: int, source: str) -> Any:
    """
    A control session from C{source} that has said Hello.

    @param reactor: The reactor (TCP and time).

    @return: The AMP protocol and the relay's identity id.
    """
    endpoint = wrapClientTLS(
        relayTLSOptions(),
        TCP4ClientEndpoint(
            reactor, "127.0.0.1", port, timeout=int(STEP_TIMEOUT), bindAddress=(source, 0)
        ),
    )
    protocol: Any = await connectProtocol(endpoint, amp.AMP()).addTimeout(STEP_TIMEOUT, reactor)
    try:
        hello = await protocol.callRemote(Hello, **helloArguments()).addTimeout(
            STEP_TIMEOUT, reactor
        )
    except BaseException:
        protocol.transport.abortConnection()
        raise
    return protocol, identityId(hello["relayKey"])


def _reason(error: BaseException) -> str:
    """
    @return: A short, countable form of a refusal (its first words, no numbers of seconds).
    """
    text = str(error) or type(error).__name__
    return text.split(";")[0].split(" (")[0][:80]


class Squatters:
    """
    Fresh identities registering one name (or raw TCP port) each from one address, several at a
    time, keeping their control sessions open so that their leases stay live. Its reactor gives it
    TCP connections and the time.

    @ivar held: Names (or ports) the squatters got.
    @ivar refused: Refusals by reason.
    """

    def __init__(
        self,
        reactor: Any,
        plan: AttackPlan,
        source: str,
        most: int,
        mode: str,
        prefix: str,
    ) -> None:
        self._reactor, self._plan = reactor, plan
        self._source, self._most, self._mode, self._prefix = source, most, mode, prefix
        self._started = 0
        self._deadline = 0.0
        self._sessions: list[Any] = []
        self.held: list[Any] = []
        self.refused: Counter[str] = Counter()

    def run(self, deadline: float) -> Deferred[Any]:
        """
        Register until C{deadline} (the reactor's time) or the budget is spent.

        @return: A L{Deferred} that fires when every worker has stopped.
        """
        self._deadline = deadline
        workers = [
            Deferred.fromCoroutine(self._worker()) for _ in range(self._plan.registrationsInFlight)
        ]
        return DeferredList(workers, consumeErrors=True)

    async def _worker(self) -> None:
        """
        Register one name after another.
        """
        while self._started < self._most and self._reactor.seconds() < self._deadline:
            index = self._started
            self._started += 1
            try:
                await self._registerOne(f"{self._prefix}{index}")
            except Exception as e:
                self.refused[_reason(e)] += 1

    async def _registerOne(self, name: str) -> None:
        """
        Hello, Challenge, the proof of work (if cheap enough), Register, as a fresh identity.
        """
        protocol, relayId = await _session(self._reactor, self._plan.controlPort, self._source)
        try:
            identity = Identity.generate()
            challenge = await protocol.callRemote(Challenge, names=[name]).addTimeout(
                STEP_TIMEOUT, self._reactor
            )
            nonce, work = challenge["nonce"], challenge["work"]
            if work > self._plan.maxWorkBits:
                raise RuntimeError(f"proof of work above {self._plan.maxWorkBits} bits: gave up")
            extra = {"proof": (await deferToThread(solve, nonce, work))} if work else {}
            answer = await protocol.callRemote(
                Register,
                publicKey=identity.publicKey,
                names=[name],
                nonce=nonce,
                signature=signRegistration(identity, relayId, nonce, [name]),
                mode=self._mode,
                **extra,
            ).addTimeout(STEP_TIMEOUT, self._reactor)
        except BaseException:
            protocol.transport.abortConnection()
            raise
        self._sessions.append(protocol)
        self.held.append(answer.get("tcpPort") if self._mode == "tcp" else name)

    def stop(self) -> dict[str, Any]:
        """
        Close every session and report.
        """
        for protocol in self._sessions:
            protocol.transport.abortConnection()
        return {
            "tried": self._started,
            "held": len(self.held),
            "refused": dict(self.refused.most_common()),
        }


class ChallengeFlood:
    """
    C{Challenge} requests on one control session, C{challengesInFlight} outstanding at once, until
    the time or the budget runs out; a session the relay closes is replaced at most once a second.
    Its reactor gives it TCP connections and the time.

    @ivar issued: Challenges the relay issued.
    @ivar refused: Refusals by reason.
    """

    def __init__(self, reactor: Any, plan: AttackPlan) -> None:
        self._reactor, self._plan = reactor, plan
        self._asked = 0
        self.issued = 0
        self.sessions = 0
        self.refused: Counter[str] = Counter()

    async def run(self, deadline: float) -> None:
        """
        Flood until C{deadline} (the reactor's time) or the budget is spent.
        """
        while self._asked < self._plan.challenges and self._reactor.seconds() < deadline:
            try:
                protocol, _ = await _session(
                    self._reactor, self._plan.controlPort, self._plan.challengeSource
                )
            except Exception as e:
                self.refused[f"session: {_reason(e)}"] += 1
                await _sleep(self._reactor, 1.0)
                continue
            self.sessions += 1
            # The relay reads a session over its rate only as fast as requests are earned, so
            # requests may still wait at the deadline: the flood ends there, they are not served
            # after it.
            stop = self._reactor.callLater(
                max(0.0, deadline - self._reactor.seconds()), protocol.transport.abortConnection
            )
            try:
                await DeferredList(
                    [
                        Deferred.fromCoroutine(self._ask(protocol, deadline))
                        for _ in range(self._plan.challengesInFlight)
                    ],
                    consumeErrors=True,
                )
            finally:
                if stop.active():
                    stop.cancel()
                protocol.transport.abortConnection()
            if self._reactor.seconds() < deadline:
                await _sleep(self._reactor, 1.0)

    async def _ask(self, protocol: Any, deadline: float) -> None:
        """
        One lane of requests: ask again as soon as each answer comes.
        """
        while self._asked < self._plan.challenges and self._reactor.seconds() < deadline:
            self._asked += 1
            try:
                await protocol.callRemote(Challenge, names=["flood"]).addTimeout(
                    STEP_TIMEOUT, self._reactor
                )
                self.issued += 1
            except ConnectionClosed:
                self._asked -= 1  # Not asked: the relay closed the session.
                return
            except Exception as e:
                self.refused[_reason(e)] += 1

    def report(self) -> dict[str, Any]:
        """
        @return: The flood's figures.
        """
        return {
            "asked": self._asked,
            "issued": self.issued,
            "sessions": self.sessions,
            "refused": dict(self.refused.most_common()),
        }


class UDPFlood:
    """
    One-byte datagrams from C{udpSockets} ports of one address, round robin, C{udpPerSecond} a
    second at most.

    @ivar sent: Datagrams sent.
    @ivar failed: Datagrams the kernel would not send (a full buffer).
    """

    _TICK = 0.05

    def __init__(self, reactor: IReactorTime, plan: AttackPlan, port: int) -> None:
        self._port = port
        self._perTick = max(1, int(plan.udpPerSecond * self._TICK))
        self._sockets: list[socket.socket] = []
        for _ in range(plan.udpSockets):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setblocking(False)
            s.bind((plan.udpSource, 0))
            self._sockets.append(s)
        self._next = 0
        self.sent = self.failed = 0
        self._loop = LoopingCall(self._tick)
        self._loop.clock = reactor

    def start(self) -> None:
        """
        Start sending.
        """
        self._loop.start(self._TICK)

    def _tick(self) -> None:
        """
        Send this tick's datagrams, each from the next port.
        """
        for _ in range(self._perTick):
            s = self._sockets[self._next]
            self._next = (self._next + 1) % len(self._sockets)
            try:
                s.sendto(b"x", ("127.0.0.1", self._port))
                self.sent += 1
            except OSError:
                self.failed += 1

    def stop(self) -> dict[str, Any]:
        """
        Stop, close the sockets, and report.
        """
        if self._loop.running:
            self._loop.stop()
        for s in self._sockets:
            s.close()
        return {"ports": len(self._sockets), "sent": self.sent, "failed": self.failed}


def _sleep(reactor: IReactorTime, seconds: float) -> Deferred[None]:
    """
    @return: A L{Deferred} that fires after C{seconds}.
    """
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


async def attack(reactor: Any, plan: AttackPlan) -> dict[str, Any]:
    """
    Run every attack of C{plan} at once until its time is up.

    @param reactor: The reactor (TCP and time).

    @return: What each attack got.
    """
    deadline = reactor.seconds() + plan.seconds
    listeners = {
        "public": (plan.publicPort, b""),
        "site (stalled ClientHello)": (plan.publicPort, clientHello(plan.domain)),
        "http": (plan.httpPort, b""),
        "control": (plan.controlPort, b""),
    }
    if plan.tcpPort is not None:
        listeners["tcp"] = (plan.tcpPort, b"")
    floods = {
        name: IdleFlood(
            reactor,
            plan.idleSource,
            port,
            first,
            plan.idlePerListener,
            plan.idleOpensPerSecond,
            plan.idleAttempts,
        )
        for name, (port, first) in listeners.items()
    }
    for flood in floods.values():
        flood.start()
    # The connections held on each port at once (the public port takes two floods).
    byPort: dict[int, list[IdleFlood]] = {}
    for name, (port, _) in listeners.items():
        byPort.setdefault(port, []).append(floods[name])
    peaks = dict.fromkeys(byPort, 0)

    def sample() -> None:
        for port, group in byPort.items():
            peaks[port] = max(peaks[port], sum(flood.heldNow() for flood in group))

    sampler = LoopingCall(sample)
    sampler.clock = reactor
    sampler.start(IdleFlood._TICK)
    udp = UDPFlood(reactor, plan, plan.udpPort) if plan.udpPort is not None else None
    if udp is not None:
        udp.start()
    names = Squatters(reactor, plan, plan.nameSource, plan.names, "stream", f"squat{plan.label}-")
    ports = Squatters(reactor, plan, plan.portSource, plan.ports, "tcp", f"port{plan.label}-")
    challenges = ChallengeFlood(reactor, plan)
    running = [
        names.run(deadline),
        ports.run(deadline) if plan.tcpPort is not None else None,
        Deferred.fromCoroutine(challenges.run(deadline)),
    ]
    print("attacking", flush=True)
    await DeferredList([d for d in running if d is not None], consumeErrors=True)
    left = deadline - reactor.seconds()
    if left > 0:
        await _sleep(reactor, left)
    sampler.stop()
    result: dict[str, Any] = {
        "seconds": plan.seconds,
        "idle": {name: flood.stop() for name, flood in floods.items()},
        "heldPeakByListener": {
            name: peaks[port]
            for name, (port, _) in listeners.items()
            if name != "site (stalled ClientHello)"
        },
        "names": names.stop(),
        "challenges": challenges.report(),
    }
    if plan.tcpPort is not None:
        result["ports"] = ports.stop()
    if udp is not None:
        result["udp"] = udp.stop()
    return result


def main(argv: list[str]) -> None:
    """
    Run the attack described by the JSON plan in C{argv[0]} and print its result.
    """
    from twisted.internet import reactor

    plan = AttackPlan(**json.loads(argv[0]))
    # The lowest priority, whatever the harness runs at: a real attacker brings its own CPU.
    os.setpriority(os.PRIO_PROCESS, 0, NICE)
    if plan.idleScheduling:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    runner: Any = reactor

    def report(result: dict[str, Any]) -> None:
        print("result " + json.dumps(result), flush=True)

    def failed(failure: Failure) -> None:
        print(f"failed: {failure.getTraceback()}", flush=True)

    def run() -> None:
        d = ensureDeferred(attack(runner, plan))
        d.addCallbacks(report, failed)
        d.addBoth(lambda _: runner.stop())

    runner.callWhenRunning(run)
    runner.run()


if __name__ == "__main__":
    main(sys.argv[1:])
