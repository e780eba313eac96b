"""
Cluster-wide counts for the quotas per source address and per identity (docs/cluster.md, *Quotas
across the cluster*).

Every member keeps a copy of the cluster's C{owners/} and C{ports/} records from its watch
(L{portal.relay.cluster.ClusterDirectory}); each record names the source address
(L{portal.forwarding.sources}) that registered it and the identity that owns it. The indexes here
are kept beside that copy as the watch applies puts and deletes, so that a registration's quota
check reads counts instead of scanning the cluster:

- L{SourceIndex}: the records of each source, for C{--max-names-per-source} and
  C{--max-ports-per-source}. A record counts while it is held, live or reserved; a reservation
  ends with time, not with an etcd event, so a source's records are checked against the clock
  when its count reaches the quota (and the ended ones dropped), as L{SourceQuota} does locally.
- L{LiveIndex}: the ports live for each identity, for C{--max-ports-per-identity} (which counts
  live ports only: they end with an etcd event, so that count is exact at all times).

A record without a source (written by a member of an older version, or with a malformed one)
counts for no source.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from zope.interface import implementer

from portal.relay.sourcequota import ISharedHoldings

#: The record's key in the directory (a name, or a port's C{(kind, port)}).
R = TypeVar("R", bound=Hashable)
#: What a quota counts (C{(identity, name)}, C{(kind, identity, name)}).
T = TypeVar("T", bound=Hashable)

#: Longest source key a record may carry (an IPv6 /64 in CIDR form is at most 43 characters).
MAX_SOURCE_LENGTH = 64


def recordSource(value: object) -> str | None:
    """
    Read the C{source} field of a record tolerantly.

    @param value: The field as parsed from JSON (absent: L{None}).
    @return: The source key, or L{None} when absent or not a short non-empty string (such a
        record counts for no source).
    """
    if isinstance(value, str) and 0 < len(value) <= MAX_SOURCE_LENGTH and value.isprintable():
        return value
    return None


@implementer(ISharedHoldings)
class SourceIndex(Generic[R, T]):
    """
    The cluster's records by the source that registered them.

    Adding, replacing and dropping a record takes constant time. L{upperBound} takes constant
    time; L{heldBy} takes time linear in the source's records, dropping those no longer held.

    """

    def __init__(self, held: Callable[[R, float | None], bool]) -> None:
        """
        @param held: Tells whether a record, given its key and its C{until}, is still held (live
            or reserved) now.
        """
        self._held = held
        self._records: dict[R, tuple[str, T, float | None]] = {}
        self._bySource: dict[str, set[R]] = {}

    def put(self, key: R, source: str | None, thing: T, until: float | None) -> None:
        """
        A record was written (or read at start): count it for C{source}.

        @param key: The record's key.
        @param source: The source that registered it, or L{None} for unknown.
        @param thing: What the record counts as.
        @param until: When its reservation ends, or L{None} while it is live.
        """
        self.drop(key)
        if source is None:
            return
        self._records[key] = (source, thing, until)
        self._bySource.setdefault(source, set()).add(key)

    def drop(self, key: R) -> None:
        """
        A record was deleted (or replaced): stop counting it.

        @param key: The record's key.
        """
        entry = self._records.pop(key, None)
        if entry is None:
            return
        keys = self._bySource[entry[0]]
        keys.discard(key)
        if not keys:
            del self._bySource[entry[0]]

    def clear(self) -> None:
        """
        Forget every record (the directory is read again).
        """
        self._records.clear()
        self._bySource.clear()

    def upperBound(self, source: str) -> int:
        """
        @param source: A source key.
        @return: How many records count for C{source}, some of which may no longer be held.
        """
        return len(self._bySource.get(source, ()))

    def heldBy(self, source: str) -> set[T]:
        """
        @param source: A source key.
        @return: What the records of C{source} still held count as; records no longer held are
            forgotten (a later write of the record counts it again).
        """
        held: set[T] = set()
        for key in list(self._bySource.get(source, ())):
            _, thing, until = self._records[key]
            if self._held(key, until):
                held.add(thing)
            else:
                self.drop(key)
        return held

    def sweep(self) -> int:
        """
        Forget every record no longer held, for sources that do not come back.

        @return: How many were forgotten.
        """
        gone = [key for key, (_, _, until) in self._records.items() if not self._held(key, until)]
        for key in gone:
            self.drop(key)
        return len(gone)

    def __len__(self) -> int:
        """
        @return: The records counted, for all sources.
        """
        return len(self._records)


class LiveIndex:
    """
    The ports live in the cluster for each identity, and the member holding each.
    """

    def __init__(self) -> None:
        self._byOwner: dict[tuple[str, str], dict[int, tuple[str, str]]] = {}
        self._ownerOf: dict[tuple[str, int], str] = {}

    def put(self, kind: str, port: int, owner: str, name: str, member: str, live: bool) -> None:
        """
        A port record was written: count it for C{owner} while it is live.

        @param kind: C{"tcp"} or C{"udp"}.
        @param port: The port.
        @param owner: The identity it is given to.
        @param name: The lease name.
        @param member: The member holding it.
        @param live: Whether it is live (not reserved).
        """
        self.drop(kind, port)
        if not live:
            return
        self._ownerOf[(kind, port)] = owner
        self._byOwner.setdefault((kind, owner), {})[port] = (member, name)

    def drop(self, kind: str, port: int) -> None:
        """
        A port record was deleted or replaced.
        """
        owner = self._ownerOf.pop((kind, port), None)
        if owner is None:
            return
        ports = self._byOwner[(kind, owner)]
        del ports[port]
        if not ports:
            del self._byOwner[(kind, owner)]

    def clear(self) -> None:
        """
        Forget every record.
        """
        self._byOwner.clear()
        self._ownerOf.clear()

    def liveElsewhere(self, kind: str, owner: str, name: str, me: str) -> int:
        """
        @param kind: C{"tcp"} or C{"udp"}.
        @param owner: An identity.
        @param name: The lease being allocated (its own port, live on another member while the
            tunnel moves here, does not count).
        @param me: This member's id (its own ports are counted by its allocator).
        @return: How many C{kind} ports C{owner} holds live on other members.
        """
        return sum(
            1
            for member, other in self._byOwner.get((kind, owner), {}).values()
            if member != me and other != name
        )
