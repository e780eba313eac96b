"""
Public ports for the relay's raw TCP and UDP modes: which (identity, name) gets which port.

A port is sticky: once an identity's tunnel name has a port, it keeps it while its lease is live,
and for a reservation period after the lease lapses, so that a tunnel that reconnects (or a relay
that restarts) gets the same port back and nobody else can take it in between.  Otherwise a new
name gets the lowest port in the range that is neither live nor reserved.  Reservations are not a
way to empty a range: a port live for less than C{reserveAfter} seconds is reserved for the short
C{grace} period only, and when no port is free the oldest reservation past its grace period is
given up (and logged) for the newcomer.

The allocator listens nowhere (the relay listens on the ports it hands out); it writes every
assignment through to an L{ILeaseStore}.  Times are C{clock.seconds()} values.
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Callable, Iterator
from typing import Any

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from portal.relay.store import (
    IMPORTED_SINCE,
    ILeaseStore,
    MemoryLeaseStore,
    PortRecord,
    StoreError,
)

#: Version of the C{ports.json} format of earlier relays, read by L{PortAllocator.importJSON}.
STATE_VERSION = 1

#: The lowest and highest port numbers a range may include.
MIN_PORT = 1
MAX_PORT = 65535

_RANGE = re.compile(r"\A\s*([0-9]+)\s*-\s*([0-9]+)\s*\Z")


class PortRangeError(ValueError):
    """
    A port range is malformed; C{str()} of the exception is a message a command line can show.
    """


class PortAllocationError(Exception):
    """
    A port could not be allocated; C{str()} of the exception gives the reason.
    """


class PortsExhausted(PortAllocationError):
    """
    Every port in the range is live or reserved.
    """


class PortLimitReached(PortAllocationError):
    """
    The identity already holds as many live ports as one identity may.
    """


class PortStateError(ValueError):
    """
    A C{ports.json} of an earlier relay is not in the format L{PortAllocator.importJSON} reads.
    """


def _checkRange(low: int, high: int, label: str) -> None:
    """
    Check the bounds of a port range.

    @param low: The lowest port.
    @param high: The highest port.
    @param label: How to name the range at the start of an error message.
    @raise PortRangeError: If a bound is outside 1-65535 or C{low} exceeds C{high}.
    """
    if not (MIN_PORT <= low <= MAX_PORT and MIN_PORT <= high <= MAX_PORT):
        raise PortRangeError(f"{label}: ports must be between {MIN_PORT} and {MAX_PORT}")
    if low > high:
        raise PortRangeError(f"{label}: LO must not exceed HI")


def _validateRange(instance: PortRange, attribute: object, value: int) -> None:
    """
    An C{attrs} validator for L{PortRange.high}, run once both bounds are set.

    @param instance: The range being built.
    @param attribute: Unused.
    @param value: The high bound.
    @raise PortRangeError: If the bounds do not make a range.
    """
    _checkRange(instance.low, value, f"{instance.low}-{value}")


@attrs.frozen
class PortRange:
    """
    An inclusive range of port numbers, C{low} to C{high}.

    @ivar low: The lowest port in the range.
    @ivar high: The highest port in the range.
    """

    low: int
    high: int = attrs.field(validator=_validateRange)

    def __contains__(self, port: object) -> bool:
        """
        @param port: A port number.
        @return: Whether C{port} is an C{int} (not a C{bool}) in the range.
        """
        return (
            isinstance(port, int) and not isinstance(port, bool) and self.low <= port <= self.high
        )

    def __len__(self) -> int:
        """
        @return: The number of ports in the range.
        """
        return self.high - self.low + 1

    def __iter__(self) -> Iterator[int]:
        """
        @return: The ports in the range, lowest first.
        """
        return iter(range(self.low, self.high + 1))

    def __str__(self) -> str:
        """
        @return: The range as L{parsePortRange} reads it, C{"LO-HI"}.
        """
        return f"{self.low}-{self.high}"


def _portNumber(digits: str) -> int:
    """
    Read a port number without converting absurdly long digit strings.

    @param digits: ASCII digits.
    @return: The number, or C{MAX_PORT + 1} if it is longer than any port number.
    """
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= len(str(MAX_PORT)) else MAX_PORT + 1


def parsePortRange(text: str, option: str | None = None) -> PortRange:
    """
    Read a port range written C{"LO-HI"}, such as C{"9000-9099"}; both ends are included.

    @param text: The range as the operator wrote it.
    @param option: The command-line option it came from, such as C{"--tcp-ports"}, to name in
        error messages.
    @return: The range.
    @raise PortRangeError: If C{text} is not two integers joined by C{-}, a port is outside
        1-65535, or LO exceeds HI; the message starts with C{option} and C{text}, as in
        C{"--tcp-ports 9000-8000: LO must not exceed HI"}.
    """
    shown = text if len(text) <= 40 else text[:37] + "..."
    label = shown if option is None else f"{option} {shown}"
    match = _RANGE.match(text)
    if match is None:
        raise PortRangeError(
            f"{label}: expected LO-HI, two port numbers joined by '-', such as 9000-9099"
        )
    low, high = _portNumber(match.group(1)), _portNumber(match.group(2))
    _checkRange(low, high, label)
    return PortRange(low, high)


#: The key ports are allocated to: (identity id, tunnel name).
Key = tuple[str, str]


@attrs.frozen
class _Reservation:
    """
    A port reserved for a key that is not live.

    @ivar port: The port.
    @ivar since: When the key's assignment of the port began.
    @ivar reservedAt: When the port stopped being live.
    @ivar until: When the reservation ends.
    """

    port: int
    since: float
    reservedAt: float
    until: float


class PortAllocator:
    """
    The public ports of one range, each live for one (identity, name), reserved for it after its
    lease lapses, or free.

    Building an allocator takes time proportional to the range and the saved records.  After that,
    every operation takes constant time, apart from taking a new port from the free pool and
    dropping ended reservations, which take logarithmic time per port (linear in a relay cluster,
    where choosing a new port skips the ports the cluster holds: L{heldElsewhere}).

    @ivar portRange: The ports handed out.
    @ivar reservation: Seconds a released port stays reserved for its (identity, name), once earned.
    @ivar maxPerIdentity: Most live ports one identity may hold; reserved ports do not count.
    @ivar reserveAfter: Seconds a port must have been assigned to its key, when it is released, to
        earn the full reservation; sooner, it is reserved for C{grace} seconds only.
    @ivar grace: Seconds every reservation is kept whatever the range's pressure; after that, when
        no port is free, the oldest reservation is given to the newcomer.  L{None}: reservations
        are never given up early, and a port released before C{reserveAfter} is free at once.
    @ivar kind: C{"tcp"} or C{"udp"}: which of the store's port records are this allocator's.
    """

    _log = Logger()

    def __init__(
        self,
        portRange: PortRange,
        clock: IReactorTime,
        reservation: float = 3600.0,
        maxPerIdentity: int = 10,
        reserveAfter: float = 0.0,
        grace: float | None = None,
        store: ILeaseStore | None = None,
        kind: str = "tcp",
    ) -> None:
        """
        Build the allocator from C{store}'s records of C{kind}: live assignments saved before a
        restart come back reserved for L{reservation} seconds from now (a tunnel must allocate its
        port again to make it live); records outside C{portRange} (which may have changed since)
        and ended reservations are dropped from the store.

        @param portRange: The ports to hand out.
        @param clock: The source of the current time.
        @param reservation: Seconds a released port stays reserved for its (identity, name).
        @param maxPerIdentity: Most live ports one identity may hold.
        @param reserveAfter: Seconds a port must have been assigned to earn the full reservation.
        @param grace: Seconds every reservation is safe from being given up; L{None} for never.
        @param store: Where assignments are kept; a new L{MemoryLeaseStore} if not given.
        @param kind: C{"tcp"} or C{"udp"}.
        @raise portal.relay.store.StoreError: If the store cannot be read or written.
        """
        self.portRange = portRange
        self.reservation = reservation
        self.maxPerIdentity = maxPerIdentity
        self.reserveAfter = reserveAfter
        self.grace = grace
        self.kind = kind
        self._clock = clock
        self._store: ILeaseStore = store if store is not None else MemoryLeaseStore()
        # Live assignments, both ways, when each began, and the number of live ports per identity.
        self._live: dict[Key, int] = {}
        self._liveOwners: dict[int, Key] = {}
        self._liveSince: dict[Key, float] = {}
        self._liveCounts: dict[str, int] = {}
        # Reservations by key, oldest first (reservations are made at the current time, so
        # insertion order is age order), and port -> key.
        self._reserved: dict[Key, _Reservation] = {}
        self._reservedFor: dict[int, Key] = {}
        # Reservation ends, soonest first.  An entry is stale unless it matches _reserved.
        self._ends: list[tuple[float, int, Key]] = []
        # Ports free here that the store holds for a lease this allocator does not know.
        self._elsewhere: set[int] = set()
        #: In a relay cluster: whether the cluster holds a port (live or reserved) for another key
        #: than the one given (L{portal.relay.clusterports}); such ports are not handed out.
        self.heldElsewhere: Callable[[int, Key], bool] | None = None
        #: In a relay cluster: the port the cluster holds for a key, if any (its port follows it
        #: from member to member).
        self.clusterPortOf: Callable[[Key], int | None] | None = None
        #: In a relay cluster: how many ports of this kind an identity holds live on the other
        #: members, not counting the given key's (they count towards L{maxPerIdentity}).
        self.liveElsewhere: Callable[[Key], int] | None = None
        now = clock.seconds()
        restored = []
        for record in self._store.ports(kind):
            if record.port not in portRange or not record.heldAt(now):
                self._store.dropPort(kind, record.port, record.identity, record.name)
                continue
            if record.reservedAt is None or record.reservedUntil is None:
                # Live when the relay stopped: reserved from now, as if released at start.
                record = attrs.evolve(record, reservedAt=now, reservedUntil=now + reservation)
                self._store.claimPort(record, now)
            restored.append(record)
        restored.sort(key=lambda record: (record.reservedAt, record.port))
        for record in restored:
            assert record.reservedAt is not None and record.reservedUntil is not None
            if record.key in self._reserved:
                self._store.dropPort(kind, record.port, record.identity, record.name)
                continue
            self._remember(
                record.key,
                _Reservation(record.port, record.since, record.reservedAt, record.reservedUntil),
            )
        # Every port that is neither live nor reserved, as a heap; a sorted list is a heap.
        self._free: list[int] = [port for port in portRange if port not in self._reservedFor]

    def _purge(self, now: float) -> None:
        """
        Free every port whose reservation ended at or before C{now}, in memory and in the store.

        @param now: The current time.
        """
        ends = self._ends
        while ends and ends[0][0] <= now:
            entry = heapq.heappop(ends)
            reservation = self._reservedAt(entry)
            if reservation is not None:
                self._forget(entry[2], reservation)
        if len(ends) > 2 * len(self._reserved) + 64:
            # Keys that were reserved, live again and released again left stale entries behind.
            self._ends = [(r.until, r.port, key) for key, r in self._reserved.items()]
            heapq.heapify(self._ends)

    def _forget(self, key: Key, reservation: _Reservation) -> None:
        """
        End a reservation: its port is free.

        @param key: The (identity, name) it was reserved for.
        @param reservation: The reservation.
        """
        del self._reserved[key]
        del self._reservedFor[reservation.port]
        heapq.heappush(self._free, reservation.port)
        self._record(self._store.dropPort, self.kind, reservation.port, *key)

    def _record(self, operation: Callable[..., object], *arguments: object) -> None:
        """
        Record in the store a change that gives a port up, after the allocator made it: a store
        that cannot record it is logged, not raised (its record stays a claim on the port, which
        never hands it to someone else, until the port is claimed over or the relay restarts).

        @param operation: The store's method.
        @param arguments: Its arguments.
        """
        try:
            operation(*arguments)
        except StoreError as e:
            self._log.error(
                "lease store did not record a {kind} port given up: {error}",
                kind=self.kind,
                error=str(e),
            )

    def _remember(self, key: Key, reservation: _Reservation) -> None:
        """
        Record a reservation in memory (the store already has it).

        @param key: The (identity, name) the port is reserved for.
        @param reservation: The reservation.
        """
        self._reserved[key] = reservation
        self._reservedFor[reservation.port] = key
        heapq.heappush(self._ends, (reservation.until, reservation.port, key))

    def _reservedAt(self, entry: tuple[float, int, Key]) -> _Reservation | None:
        """
        @param entry: An entry of the queue of reservation ends.
        @return: The reservation it stands for, or L{None} if it is stale.
        """
        until, port, key = entry
        reservation = self._reserved.get(key)
        if reservation is None or (reservation.port, reservation.until) != (port, until):
            return None
        return reservation

    def _reclaim(self, now: float) -> None:
        """
        No port is free: give up the oldest reservation past its grace period, or explain when a
        port will free.

        @param now: The current time, after L{_purge}.
        @raise PortsExhausted: If no reservation can be given up; the message says when the next
            port frees, if that is known.
        """
        if self._reserved:
            key, oldest = next(iter(self._reserved.items()))
            if self.grace is not None and now - oldest.reservedAt >= self.grace:
                self._forget(key, oldest)
                self._log.info(
                    "{kind} port {port} reserved for {name} of {identity} given up after "
                    "{age:.0f} s: no free port in {range}, oldest reservation first",
                    kind=self.kind,
                    port=oldest.port,
                    name=key[1],
                    identity=key[0][:12],
                    age=now - oldest.reservedAt,
                    range=str(self.portRange),
                )
                return
            ends = self._ends
            while ends and self._reservedAt(ends[0]) is None:
                heapq.heappop(ends)  # A stale entry: its key was live again since.
            frees = ends[0][0]
            if self.grace is not None:
                frees = min(frees, oldest.reservedAt + self.grace)
            raise PortsExhausted(
                f"no free port in {self.portRange}: {len(self._live)} live, "
                f"{len(self._reserved)} reserved; the next port frees in "
                f"{max(frees - now, 0.0):.0f} s"
            )
        held = f"all {len(self._live)} are live"
        if self._elsewhere:
            held = (
                f"{len(self._live)} are live and {len(self._elsewhere)} held in the lease store "
                f"for other leases"
            )
        raise PortsExhausted(
            f"no free port in {self.portRange}: {held}; one frees when a tunnel using one stops"
        )

    def allocate(self, identity: str, name: str) -> int:
        """
        Make a port live for C{name} of C{identity}.

        The port is the one the key already holds, live or reserved, if any; otherwise the lowest
        free port in the range; otherwise the port of the oldest reservation past its grace period.

        @param identity: The identity's id, already authenticated.
        @param name: The tunnel's name.
        @return: The port, live until L{release}.
        @raise PortLimitReached: If the key is not live and C{identity} already holds
            L{maxPerIdentity} live ports.
        @raise PortsExhausted: If the key holds no port and no port can be given.
        @raise PortAllocationError: If the store holds the key's reserved port for another key.
        @raise portal.relay.store.StoreError: If the store cannot be written.
        """
        key = (identity, name)
        port = self._live.get(key)
        if port is not None:
            return port
        now = self._clock.seconds()
        self._purge(now)
        held = self._liveCounts.get(identity, 0)
        elsewhere = 0 if self.liveElsewhere is None else self.liveElsewhere(key)
        if held + elsewhere >= self.maxPerIdentity:
            where = "on this relay" if self.liveElsewhere is None else "in this relay cluster"
            raise PortLimitReached(
                f"identity already holds {held + elsewhere} live ports {where}, the most "
                f"allowed; close a tunnel before opening {name!r}"
            )
        reserved = self._reserved.get(key)
        if (
            reserved is not None
            and self.heldElsewhere is not None
            and self.heldElsewhere(reserved.port, key)
        ):
            # The cluster gave the port to another lease (say, after this member lost its records).
            self._forget(key, reserved)
            reserved = None
        while True:
            if reserved is not None:
                port, since = reserved.port, reserved.since
            else:
                port, since = self._nextFree(key, now), now
            record = PortRecord(self.kind, port, identity, name, since)
            if self._store.claimPort(record, now) == record:
                break
            if reserved is not None:
                raise PortAllocationError(f"port {port} is held by another relay sharing the store")
            # A free port here that the store holds for another lease (another relay's, or a
            # release the store failed to record): leave it out and take the next one.
            self._takeFree(port)
            self._elsewhere.add(port)
            self._log.warn(
                "{kind} port {port} is held in the lease store for another lease; it is not "
                "handed out until the relay restarts",
                kind=self.kind,
                port=port,
            )
        if reserved is not None:
            del self._reserved[key]
            del self._reservedFor[port]
        else:
            self._takeFree(port)
        self._live[key] = port
        self._liveOwners[port] = key
        self._liveSince[key] = since
        self._liveCounts[identity] = held + 1
        return port

    def _nextFree(self, key: Key, now: float) -> int:
        """
        Choose the free port a key without a reservation gets: the lowest free port, or in a
        relay cluster the port the cluster holds for the key, else the lowest free port the
        cluster does not hold for another key (a scan of the free ports, linear in the range).

        @param key: The (identity, name) to give a port.
        @param now: The current time, after L{_purge}.
        @return: A port still in the free pool.
        @raise PortsExhausted: If no port can be given.
        """
        heldElsewhere = self.heldElsewhere
        if heldElsewhere is None:
            if not self._free:
                self._reclaim(now)
            return self._free[0]
        wanted = self.clusterPortOf(key) if self.clusterPortOf is not None else None
        if wanted is not None and wanted in self._free:
            return wanted
        for _ in range(len(self._reserved) + 1):
            for port in sorted(self._free):
                if not heldElsewhere(port, key):
                    return port
            if not self._reserved or self.grace is None:
                break
            # Every free port is held in the cluster: give up the oldest reservation here.
            self._reclaim(now)
        raise PortsExhausted(
            f"no free port in {self.portRange}: {len(self._live)} live here, "
            f"{len(self._reserved)} reserved here, the rest held by other members of the cluster"
        )

    def _takeFree(self, port: int) -> None:
        """
        Take C{port} out of the free pool (logarithmic when it is the lowest, else linear).

        @param port: A port in the free pool.
        """
        if self._free[0] == port:
            heapq.heappop(self._free)
        else:
            self._free.remove(port)
            heapq.heapify(self._free)

    def abandon(self, identity: str, name: str) -> int | None:
        """
        Undo the live assignment of C{name} of C{identity} without reserving its port (the cluster
        refused it): the port is free again here.

        @param identity: The identity's id.
        @param name: The tunnel's name.
        @return: The port, or L{None} if the key was not live.
        """
        key = (identity, name)
        port = self._live.pop(key, None)
        if port is None:
            return None
        del self._liveOwners[port]
        del self._liveSince[key]
        count = self._liveCounts[identity] - 1
        if count:
            self._liveCounts[identity] = count
        else:
            del self._liveCounts[identity]
        heapq.heappush(self._free, port)
        self._record(self._store.dropPort, self.kind, port, identity, name)
        return port

    def reservedUntil(self, identity: str, name: str) -> float | None:
        """
        @return: When the reservation of C{name} of C{identity} ends, or L{None} when it has none.
        """
        reservation = self._reserved.get((identity, name))
        return None if reservation is None else reservation.until

    def release(self, identity: str, name: str) -> int | None:
        """
        Note that the lease of C{name} of C{identity} lapsed.

        Its port stops being live and stays reserved for it for L{reservation} seconds from now,
        if it was assigned for at least L{reserveAfter} seconds; else for L{grace} seconds (free
        at once without a grace period).  Releasing a key that is not live changes nothing (a
        reservation is not extended).

        @param identity: The identity's id.
        @param name: The tunnel's name.
        @return: The port that stopped being live, or C{None} if the key was not live.
        """
        key = (identity, name)
        port = self._live.pop(key, None)
        if port is None:
            return None
        del self._liveOwners[port]
        since = self._liveSince.pop(key)
        count = self._liveCounts[identity] - 1
        if count:
            self._liveCounts[identity] = count
        else:
            del self._liveCounts[identity]
        now = self._clock.seconds()
        length = self.reservation
        if now - since < self.reserveAfter:
            length = min(self.reservation, self.grace or 0.0)
        if length > 0:
            self._remember(key, _Reservation(port, since, now, now + length))
            record = PortRecord(self.kind, port, identity, name, since, now, now + length)
            self._record(self._store.claimPort, record, now)
        else:
            heapq.heappush(self._free, port)
            self._record(self._store.dropPort, self.kind, port, identity, name)
        self._purge(now)
        return port

    def portFor(self, identity: str, name: str) -> int | None:
        """
        Find the port of C{name} of C{identity}.

        @param identity: The identity's id.
        @param name: The tunnel's name.
        @return: The port live or reserved for the key, else C{None}.
        """
        key = (identity, name)
        port = self._live.get(key)
        if port is not None:
            return port
        self._purge(self._clock.seconds())
        reserved = self._reserved.get(key)
        return None if reserved is None else reserved.port

    def owner(self, port: int) -> tuple[str, str] | None:
        """
        Find whom a port serves.

        @param port: A port number.
        @return: The (identity, name) the port is live for, else C{None} (also when it is only
            reserved).
        """
        return self._liveOwners.get(port)

    @property
    def live(self) -> int:
        """
        The number of live ports.
        """
        return len(self._live)

    @property
    def reserved(self) -> int:
        """
        The number of ports reserved and not live, not counting ended reservations.
        """
        self._purge(self._clock.seconds())
        return len(self._reserved)

    def importJSON(self, data: Any) -> int:
        """
        Take over the assignments of this allocator's kind from a C{ports.json} of an earlier relay.

        Every assignment comes back reserved for L{reservation} seconds from now, counted as
        assigned long enough to earn it; assignments outside the range, or of a port or key the
        allocator already holds, are left out.

        @param data: The parsed JSON of one kind (C{{"version": 1, "ports": [{"port", "identity",
            "name"}]}}).
        @return: The number of assignments taken over.
        @raise PortStateError: If C{data} is not in that format (nothing is imported then).
        @raise portal.relay.store.StoreError: If the store cannot be written.
        """
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            raise PortStateError(f"port state is not a version {STATE_VERSION} port table")
        entries = data.get("ports")
        if not isinstance(entries, list):
            raise PortStateError("port state has no 'ports' list")
        seenPorts: set[int] = set()
        seenKeys: set[Key] = set()
        for index, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise PortStateError(f"port state entry {index} is not an object")
            port = entry.get("port")
            identity = entry.get("identity")
            name = entry.get("name")
            if (
                isinstance(port, bool)
                or not isinstance(port, int)
                or not isinstance(identity, str)
                or not isinstance(name, str)
            ):
                raise PortStateError(
                    f"port state entry {index} lacks a valid port, identity or name"
                )
            if port in seenPorts:
                raise PortStateError(f"port state assigns port {port} twice")
            if (identity, name) in seenKeys:
                raise PortStateError(
                    f"port state assigns two ports to name {name!r} of one identity"
                )
            seenPorts.add(port)
            seenKeys.add((identity, name))
        now = self._clock.seconds()
        self._purge(now)
        imported = 0
        for entry in entries:
            port, key = entry["port"], (entry["identity"], entry["name"])
            if (
                port not in self.portRange
                or port in self._reservedFor
                or port in self._liveOwners
                or key in self._reserved
                or key in self._live
            ):
                continue
            reservation = _Reservation(port, IMPORTED_SINCE, now, now + self.reservation)
            record = PortRecord(self.kind, port, *key, IMPORTED_SINCE, now, reservation.until)
            if self._store.claimPort(record, now) != record:
                continue
            self._remember(key, reservation)
            self._free.remove(port)
            imported += 1
        heapq.heapify(self._free)
        return imported
