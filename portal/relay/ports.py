"""
Public ports for the relay's raw TCP and UDP modes: which (identity, name) gets which port.

A port is sticky: once an identity's tunnel name has a port, it keeps it while its lease is live,
and for a reservation period after the lease lapses, so that a tunnel that reconnects (or a relay
that restarts) gets the same port back and nobody else can take it in between.  Otherwise a new
name gets the lowest port in the range that is neither live nor reserved.

This module does no I/O: the relay listens on the ports it hands out and persists L{toJSON}.
Times are C{clock.seconds()} values.
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Iterator
from typing import Any

import attrs
from twisted.internet.interfaces import IReactorTime

#: Version of the format written by L{PortAllocator.toJSON}.
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
    Saved allocator state is not in the format L{PortAllocator.toJSON} writes.
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


class PortAllocator:
    """
    The public ports of one range, each live for one (identity, name), reserved for it after its
    lease lapses, or free.

    Building or restoring an allocator takes time proportional to the range.  After that, every
    operation takes constant time, apart from taking a new port from the free pool and dropping
    ended reservations, which take logarithmic time per port.

    @ivar portRange: The ports handed out.
    @ivar reservation: Seconds a released port stays reserved for its (identity, name).
    @ivar maxPerIdentity: Most live ports one identity may hold; reserved ports do not count.
    """

    def __init__(
        self,
        portRange: PortRange,
        clock: IReactorTime,
        reservation: float = 3600.0,
        maxPerIdentity: int = 10,
    ) -> None:
        """
        @param portRange: The ports to hand out.
        @param clock: The source of the current time.
        @param reservation: Seconds a released port stays reserved for its (identity, name).
        @param maxPerIdentity: Most live ports one identity may hold.
        """
        self.portRange = portRange
        self.reservation = reservation
        self.maxPerIdentity = maxPerIdentity
        self._clock = clock
        # Live assignments, both ways, and the number of live ports per identity.
        self._live: dict[Key, int] = {}
        self._liveOwners: dict[int, Key] = {}
        self._liveCounts: dict[str, int] = {}
        # Reservations: key -> (port, reserved until), and port -> key.
        self._reserved: dict[Key, tuple[int, float]] = {}
        self._reservedFor: dict[int, Key] = {}
        # Reservation ends, soonest first.  An entry is stale unless it matches _reserved.
        self._ends: list[tuple[float, int, Key]] = []
        # Every port that is neither live nor reserved, as a heap; a sorted list is a heap.
        self._free: list[int] = list(portRange)

    def _purge(self, now: float) -> None:
        """
        Free every port whose reservation ended at or before C{now}.

        @param now: The current time.
        """
        ends = self._ends
        while ends and ends[0][0] <= now:
            until, port, key = heapq.heappop(ends)
            if self._reserved.get(key) == (port, until):
                del self._reserved[key]
                del self._reservedFor[port]
                heapq.heappush(self._free, port)
        if len(ends) > 2 * len(self._reserved) + 64:
            # Keys that were reserved, live again and released again left stale entries behind.
            self._ends = [(until, port, key) for key, (port, until) in self._reserved.items()]
            heapq.heapify(self._ends)

    def _reserve(self, key: Key, port: int, until: float) -> None:
        """
        Reserve a port that is not live for a key.

        @param key: The (identity, name) to reserve it for.
        @param port: The port.
        @param until: When the reservation ends.
        """
        self._reserved[key] = (port, until)
        self._reservedFor[port] = key
        heapq.heappush(self._ends, (until, port, key))

    def allocate(self, identity: str, name: str) -> int:
        """
        Make a port live for C{name} of C{identity}.

        The port is the one the key already holds, live or reserved, if any; otherwise the lowest
        free port in the range.

        @param identity: The identity's id, already authenticated.
        @param name: The tunnel's name.
        @return: The port, live until L{release}.
        @raise PortLimitReached: If the key is not live and C{identity} already holds
            L{maxPerIdentity} live ports.
        @raise PortsExhausted: If the key holds no port and every port in the range is live or
            reserved.
        """
        key = (identity, name)
        port = self._live.get(key)
        if port is not None:
            return port
        self._purge(self._clock.seconds())
        held = self._liveCounts.get(identity, 0)
        if held >= self.maxPerIdentity:
            raise PortLimitReached(
                f"identity already holds {held} live ports on this relay, the most allowed; "
                f"close a tunnel before opening {name!r}"
            )
        reserved = self._reserved.pop(key, None)
        if reserved is not None:
            port = reserved[0]
            del self._reservedFor[port]
        elif self._free:
            port = heapq.heappop(self._free)
        else:
            raise PortsExhausted(f"no free port in {self.portRange}")
        self._live[key] = port
        self._liveOwners[port] = key
        self._liveCounts[identity] = held + 1
        return port

    def release(self, identity: str, name: str) -> int | None:
        """
        Note that the lease of C{name} of C{identity} lapsed.

        Its port stops being live and stays reserved for it for L{reservation} seconds from now.
        Releasing a key that is not live changes nothing (a reservation is not extended).

        @param identity: The identity's id.
        @param name: The tunnel's name.
        @return: The port that stopped being live, or C{None} if the key was not live.
        """
        key = (identity, name)
        port = self._live.pop(key, None)
        if port is None:
            return None
        del self._liveOwners[port]
        count = self._liveCounts[identity] - 1
        if count:
            self._liveCounts[identity] = count
        else:
            del self._liveCounts[identity]
        now = self._clock.seconds()
        self._reserve(key, port, now + self.reservation)
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
        return None if reserved is None else reserved[0]

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

    def toJSON(self) -> dict[str, Any]:
        """
        Describe every live and reserved assignment for persistence.

        @return: A JSON-serialisable C{dict} for L{fromJSON}, listing assignments by port.
        """
        self._purge(self._clock.seconds())
        assignments = list(self._live.items()) + [
            (key, port) for key, (port, _) in self._reserved.items()
        ]
        return {
            "version": STATE_VERSION,
            "ports": [
                {"port": port, "identity": identity, "name": name}
                for (identity, name), port in sorted(assignments, key=lambda item: item[1])
            ],
        }

    @classmethod
    def fromJSON(
        cls,
        data: Any,
        portRange: PortRange,
        clock: IReactorTime,
        reservation: float = 3600.0,
        maxPerIdentity: int = 10,
    ) -> PortAllocator:
        """
        Rebuild an allocator saved by L{toJSON}, as after a relay restart.

        Every saved assignment, live or reserved, comes back reserved for L{reservation} seconds
        from now: a tunnel must allocate its port again to make it live.  Assignments outside
        C{portRange} (which may have changed since) are dropped.

        @param data: The result of L{toJSON}, after a JSON round trip.
        @param portRange: The ports to hand out.
        @param clock: The source of the current time.
        @param reservation: Seconds a released or restored port stays reserved.
        @param maxPerIdentity: Most live ports one identity may hold.
        @return: The allocator.
        @raise PortStateError: If C{data} is not in the format L{toJSON} writes.
        """
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            raise PortStateError(f"port state is not a version {STATE_VERSION} port table")
        entries = data.get("ports")
        if not isinstance(entries, list):
            raise PortStateError("port state has no 'ports' list")
        allocator = cls(portRange, clock, reservation=reservation, maxPerIdentity=maxPerIdentity)
        until = clock.seconds() + reservation
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
            key = (identity, name)
            if port in seenPorts:
                raise PortStateError(f"port state assigns port {port} twice")
            if key in seenKeys:
                raise PortStateError(
                    f"port state assigns two ports to name {name!r} of one identity"
                )
            seenPorts.add(port)
            seenKeys.add(key)
            if port in portRange:
                allocator._reserve(key, port, until)
        allocator._free = [port for port in portRange if port not in allocator._reservedFor]
        return allocator
