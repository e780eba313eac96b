"""
The relay's registration gate: what a control session's C{Hello}, C{Challenge} and C{Register} must
pass before the relay spends work on them.

- Token-bucket rate limits on each of the three commands, per source address (IPv4 /32, IPv6 /64)
  and in total (L{portal.forwarding.tokenbucket}). Over a limit the answer is C{TRY_AGAIN} with the
  time to wait: a user's tunnel retries with backoff, a flood gets nothing.
- Quotas per source address on lease names and public ports held, live or reserved
  (L{portal.relay.sourcequota}): free identities do not buy more names.
- The adaptive proof of work (L{portal.relay.difficulty}, L{portal.trust.proofofwork}).
- The deny and invite lists (L{portal.relay.identitylists}), replaced on SIGHUP.

Every refusal goes through L{Refusals}: one log event (a flood's rate-limited per reason) and one
count per reason for C{/metrics}.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from portal.forwarding.logthrottle import LogThrottle
from portal.forwarding.refusals import Refusals
from portal.forwarding.tokenbucket import KeyedBuckets, TokenBucket
from portal.relay.difficulty import AdaptiveDifficulty, DifficultyPolicy
from portal.relay.identitylists import IdentityLists
from portal.relay.sourcequota import OverQuota, SourceQuota
from portal.wire.control import RegistrationRefused, TryAgain

#: The commands that are rate-limited.
COMMANDS = ("hello", "challenge", "register")
#: Least seconds between two log events saying that the proof-of-work difficulty changed.
DIFFICULTY_LOG_INTERVAL = 10.0


class RateError(ValueError):
    """
    A rate written on the command line is malformed; C{str()} says how to write it.
    """


@attrs.frozen
class Rate:
    """
    A token-bucket rate.

    @ivar perSecond: Requests a second, sustained.
    @ivar burst: Requests allowed at once after a quiet time.
    """

    perSecond: float
    burst: float

    def __str__(self) -> str:
        """
        @return: The rate as L{parseRate} reads it.
        """
        return f"{self.perSecond:g}/{self.burst:g}"


def parseRate(text: str, option: str = "rate") -> Rate:
    """
    Read a rate written C{PER_SECOND/BURST} (C{"2/20"}), or C{PER_SECOND} alone for a burst of as
    many.

    @param text: The rate as written.
    @param option: What to name in error messages.
    @raise RateError: If it is not one or two positive numbers.
    """
    parts = text.split("/")
    try:
        numbers = [float(part) for part in parts]
    except ValueError:
        numbers = []
    if len(numbers) not in (1, 2) or not all(math.isfinite(n) and n > 0 for n in numbers):
        raise RateError(
            f"{option} {text[:40]!r}: expected PER_SECOND/BURST, two positive numbers such as 2/20"
        )
    return Rate(numbers[0], numbers[-1] if len(numbers) == 2 else max(1.0, numbers[0]))


@attrs.frozen
class CommandRates:
    """
    One rate for each rate-limited command.

    @ivar hello: For C{Hello}.
    @ivar challenge: For C{Challenge}.
    @ivar register: For C{Register}.
    """

    hello: Rate
    challenge: Rate
    register: Rate

    def of(self, command: str) -> Rate:
        """
        @param command: One of L{COMMANDS}.
        @return: Its rate.
        """
        rate: Rate = getattr(self, command)
        return rate


@attrs.frozen
class AdmissionLimits:
    """
    The registration gate's limits. Defaults let a household or office of tunnels (re)connect in a
    burst and hold the names and ports a person uses, and make a flood from one address stall after
    a few seconds. C{Hello} and C{Challenge} are allowed far more often than C{Register}: a tunnel
    chained through this relay opens one control-port connection (C{Hello}, a hop C{Challenge},
    C{Hop}) per visitor connection.

    @ivar perSource: Rate limits per source address by command.
    @ivar total: Rate limits over all sources by command.
    @ivar maxNamesPerSource: Lease names (live or reserved) one source address may hold.
    @ivar maxPortsPerSource: Public TCP and UDP ports (live or reserved) one source address may hold.
    @ivar difficulty: The proof-of-work policy.
    """

    perSource: CommandRates = CommandRates(
        hello=Rate(20.0, 200.0), challenge=Rate(20.0, 200.0), register=Rate(2.0, 20.0)
    )
    total: CommandRates = CommandRates(
        hello=Rate(1000.0, 5000.0), challenge=Rate(1000.0, 5000.0), register=Rate(100.0, 500.0)
    )
    maxNamesPerSource: int = 256
    maxPortsPerSource: int = 20
    difficulty: DifficultyPolicy = attrs.field(factory=DifficultyPolicy)


class Admission:
    """
    The registration gate of one relay.

    @ivar limits: Its limits.
    @ivar refusals: Where refusals are counted and logged.
    @ivar difficulty: The current proof-of-work difficulty.
    @ivar lists: The deny and invite lists in force.
    @ivar names: Lease names held per source, keyed C{(identity, name)}.
    @ivar ports: Public ports held per source, keyed C{(kind, identity, name)}.
    """

    _log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        limits: AdmissionLimits,
        refusals: Refusals,
        nameHeld: Callable[[tuple[str, str]], bool],
        portHeld: Callable[[tuple[str, str, str]], bool],
    ) -> None:
        """
        @param clock: The source of the current time.
        @param limits: The limits.
        @param refusals: Where refusals are counted and logged.
        @param nameHeld: Tells whether C{(identity, name)} is still owned (live or reserved).
        @param portHeld: Tells whether C{(kind, identity, name)} still has a port (live or
            reserved).
        """
        self.limits = limits
        self.refusals = refusals
        self._perSource: dict[str, KeyedBuckets] = {}
        self._total: dict[str, TokenBucket] = {}
        for command in COMMANDS:
            rate = limits.perSource.of(command)
            self._perSource[command] = KeyedBuckets(clock, rate.perSecond, rate.burst)
            rate = limits.total.of(command)
            self._total[command] = TokenBucket(clock, rate.perSecond, rate.burst)
        self.difficulty = AdaptiveDifficulty(clock, limits.difficulty)
        self._announcedWork = 0
        self._difficultyLog = LogThrottle(clock, DIFFICULTY_LOG_INTERVAL)
        self.lists = IdentityLists()
        self.names: SourceQuota[tuple[str, str]] = SourceQuota(
            limits.maxNamesPerSource, nameHeld, "lease names"
        )
        self.ports: SourceQuota[tuple[str, str, str]] = SourceQuota(
            limits.maxPortsPerSource, portHeld, "public ports"
        )

    def refuse(self, reason: str, source: str, message: str, **fields: Any) -> None:
        """
        Count and log one refusal.

        @param reason: The metric's reason label.
        @param source: The source address refused.
        @param message: The reason as the tunnel is told it.
        @param fields: More log fields.
        """
        self.refusals.refuse(
            reason, "refused {source}: {detail}", source=source, detail=message, **fields
        )

    def rate(self, command: str, source: str) -> None:
        """
        Take a token for C{command} from C{source}'s bucket and the total one.

        @param command: One of L{COMMANDS}.
        @param source: The source address (L{portal.forwarding.sources.peerSource}).
        @raise TryAgain: Over either limit, with the time to wait.
        """
        total = self._total[command]
        perSource = self._perSource[command]
        if not perSource.take(source):
            rate = self.limits.perSource.of(command)
            message = (
                f"too many {command} requests from your address (at most {rate.perSecond:g} a "
                f"second); retry in {max(1, math.ceil(1 / rate.perSecond))} s"
            )
            self.refuse(f"{command}_rate_source", source, message)
            raise TryAgain(message)
        if not total.take():
            message = (
                f"this relay is receiving too many {command} requests; retry in "
                f"{max(1.0, total.delay(1.0)):.0f} s"
            )
            self.refuse(f"{command}_rate_total", source, message)
            raise TryAgain(message)

    def mayHello(self, source: str) -> bool:
        """
        Whether C{source} has a L{Hello} left in its bucket now (taking none): a new control
        session from a source that has none is refused before its TLS handshake, the costliest
        part of a session for the relay (see L{portal.relay.control.ControlDispatch}).

        @param source: The source address.
        """
        return self._perSource["hello"].has(source)

    def challengeWork(self) -> int:
        """
        Count a registration challenge and say what work it asks for.

        @return: The proof-of-work difficulty in bits.
        """
        self.difficulty.note()
        work = self.difficulty.current()
        if work != self._announcedWork and self._difficultyLog.due() is not None:
            self._announcedWork = work
            self._log.info(
                "registration proof of work now {bits} bits ({rate:.1f} registrations a second)",
                bits=work,
                rate=self.difficulty.rate,
            )
        return work

    def checkIdentity(self, source: str, identity: str) -> None:
        """
        Check the deny and invite lists.

        @param source: The source address.
        @param identity: The registering identity's id.
        @raise RegistrationRefused: If the identity may not register.
        """
        refusal = self.lists.refusal(identity)
        if refusal is not None:
            reason, message = refusal
            self.refuse(reason, source, message, identity=identity[:12])
            raise RegistrationRefused(message)

    def checkQuota(
        self, source: str, identity: str, names: list[str], portKinds: frozenset[str]
    ) -> None:
        """
        Check that C{source} may hold C{names} of C{identity}, and their ports of C{portKinds}.

        @param source: The source address.
        @param identity: The registering identity's id.
        @param names: The names registered.
        @param portKinds: C{"tcp"} and/or C{"udp"} for a raw lease; empty otherwise.
        @raise RegistrationRefused: Over a quota.
        """
        checks: list[tuple[str, SourceQuota[Any], list[Any]]] = [
            ("names_per_source", self.names, [(identity, name) for name in names]),
            (
                "ports_per_source",
                self.ports,
                [(kind, identity, name) for kind in sorted(portKinds) for name in names],
            ),
        ]
        for reason, quota, things in checks:
            try:
                quota.check(source, things)
            except OverQuota as e:
                self.refuse(reason, source, str(e), identity=identity[:12])
                raise RegistrationRefused(str(e))

    def takePort(self, source: str, identity: str, name: str, kind: str) -> None:
        """
        Check again, just before a port is allocated for the lease C{name} of C{identity}, that
        C{source} may hold it, and count it at once: registrations from one source that wait on a
        cluster's store at the same time are counted one after the other, not all against the
        count before any of them.

        @param source: The source address.
        @param identity: The registering identity's id.
        @param name: The lease name.
        @param kind: C{"tcp"} or C{"udp"}.
        @raise RegistrationRefused: Over the quota.
        """
        thing = (kind, identity, name)
        try:
            self.ports.check(source, [thing])
        except OverQuota as e:
            self.refuse("ports_per_source", source, str(e), identity=identity[:12])
            raise RegistrationRefused(str(e)) from None
        self.ports.add(source, [thing])

    def sweep(self) -> None:
        """
        Forget the names and ports no longer held (for sources that do not come back).
        """
        self.names.sweep()
        self.ports.sweep()
