"""
Where the relay keeps what must outlive it: lease name ownership, reservations and public port
assignments, behind one interface, L{ILeaseStore}.

The lease table (L{portal.relay.leases}) and the port allocators (L{portal.relay.ports}) keep the
routing state in memory (holders are live objects) and write every change through to a store, one
record per name or port.  Ownership changes are compare-and-set operations (L{ILeaseStore.claimName},
L{ILeaseStore.claimPort}): a store shared by several relays (etcd) can refuse a claim that another
member won first, and the relay treats the refusal like a name taken.

A write that claims something (a registration, a renewal, a new port) fails its operation when the
store cannot make it.  A write that gives something up (a release, an expiry, a port released) is
made in memory first; if the store cannot record it, the error is logged and the store keeps the
longer claim, which never hands a name or port to someone else.

L{MemoryLeaseStore} keeps the records in dictionaries, for tests and for a relay without a state
directory; L{portal.relay.sqlitestore} keeps them in SQLite.  Nothing but the relay service knows
which one runs.

Relays of a cluster also share ownership through etcd, which answers over the network: the
registration path asks L{ILeaseClaims} (L{LocalClaims} for a relay on its own) before a name
counts as registered, and knows no more than that of where ownership is decided.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import Interface, implementer

#: The C{since} of names and ports imported from the JSON files of earlier relays, which did not
#: record it: long enough ago for every reservation rule.
IMPORTED_SINCE = 0.0


class StoreError(Exception):
    """
    The store could not be read or written; C{str()} of the exception names the store and, where
    an operator can act, how to recover.
    """


class StoreDamaged(StoreError):
    """
    The store exists but cannot be trusted (unreadable, not a store, corrupt): the relay must not
    start over it, or names would change owners.
    """


@attrs.frozen
class NameRecord:
    """
    The saved ownership of one lease name.

    @ivar name: The lease name.
    @ivar owner: The owner's identity id.
    @ivar since: When the owner's continuous ownership of the name began.
    @ivar expiresAt: When the lease stops being live unless renewed.
    @ivar ownedUntil: When the owner's claim ends: C{expiresAt}, plus the reservation period if the
        name was live long enough to earn one.  Another identity may claim the name from then on.
    """

    name: str
    owner: str
    since: float
    expiresAt: float
    ownedUntil: float


@attrs.frozen
class PortRecord:
    """
    The saved assignment of one public port.

    @ivar kind: C{"tcp"} or C{"udp"}.
    @ivar port: The port number.
    @ivar identity: The identity id the port is assigned to.
    @ivar name: The lease name it serves.
    @ivar since: When the assignment began (the port first went live for this identity and name).
    @ivar reservedAt: When the port stopped being live, or C{None} while it is live.
    @ivar reservedUntil: When its reservation ends, or C{None} while it is live.
    """

    kind: str
    port: int
    identity: str
    name: str
    since: float
    reservedAt: float | None = None
    reservedUntil: float | None = None

    @property
    def key(self) -> tuple[str, str]:
        """
        The (identity, name) the port is assigned to.
        """
        return (self.identity, self.name)

    def heldAt(self, now: float) -> bool:
        """
        @param now: A clock time.
        @return: Whether the port is still live or reserved at C{now}.
        """
        return self.reservedUntil is None or now < self.reservedUntil


class ILeaseStore(Interface):
    """
    Durable records of lease names and public ports, one record per name and per port.

    Every method is one small operation on one record (reading all records happens once, at
    start).  Claims are compare-and-set: they succeed only if nobody else holds the record.
    """

    def names() -> Iterable[NameRecord]:
        """
        @return: Every saved name record, including ones whose ownership has ended.
        @raise StoreError: If the store cannot be read.
        """

    def claimName(record: NameRecord, now: float) -> NameRecord:
        """
        Save C{record} unless another owner holds the name: in one atomic step, the record is
        written if no record exists for its name, the saved record has the same owner, or the
        saved record's C{ownedUntil} is at or before C{now}.

        @param record: The new record for the name.
        @param now: The current time.
        @return: The record saved for the name afterwards: C{record} when the claim succeeded, the
            other owner's record when it was refused.
        @raise StoreError: If the store cannot be written.
        """

    def dropName(name: str, owner: str) -> None:
        """
        Forget a name's record, if it belongs to C{owner}.

        @param name: The lease name.
        @param owner: The identity whose record may be dropped.
        @raise StoreError: If the store cannot be written.
        """

    def ports(kind: str) -> Iterable[PortRecord]:
        """
        @param kind: C{"tcp"} or C{"udp"}.
        @return: Every saved port record of that kind.
        @raise StoreError: If the store cannot be read.
        """

    def claimPort(record: PortRecord, now: float) -> PortRecord:
        """
        Save C{record} unless the port is held for another key: in one atomic step, the record is
        written if no record exists for its port, the saved record has the same (identity, name),
        or the saved record's reservation ended at or before C{now}.

        @param record: The new record for the port.
        @param now: The current time.
        @return: The record saved for the port afterwards (C{record} when the claim succeeded).
        @raise StoreError: If the store cannot be written.
        """

    def dropPort(kind: str, port: int, identity: str, name: str) -> None:
        """
        Forget a port's record, if it is assigned to (C{identity}, C{name}).

        @param kind: C{"tcp"} or C{"udp"}.
        @param port: The port number.
        @param identity: The identity id it must be assigned to.
        @param name: The lease name it must serve.
        @raise StoreError: If the store cannot be written.
        """

    def close() -> None:
        """
        Release the store's resources; no other method may be called afterwards.
        """


@implementer(ILeaseStore)
class MemoryLeaseStore:
    """
    An L{ILeaseStore} in dictionaries: nothing outlives the process.
    """

    def __init__(self) -> None:
        self._names: dict[str, NameRecord] = {}
        self._ports: dict[tuple[str, int], PortRecord] = {}

    def names(self) -> Iterable[NameRecord]:
        """
        @return: Every name record.
        """
        return list(self._names.values())

    def claimName(self, record: NameRecord, now: float) -> NameRecord:
        """
        Save C{record} unless another owner holds the name (see L{ILeaseStore.claimName}).

        @return: The record saved for the name afterwards.
        """
        current = self._names.get(record.name)
        if current is not None and current.owner != record.owner and now < current.ownedUntil:
            return current
        self._names[record.name] = record
        return record

    def dropName(self, name: str, owner: str) -> None:
        """
        Forget C{name} if C{owner} holds its record.
        """
        current = self._names.get(name)
        if current is not None and current.owner == owner:
            del self._names[name]

    def ports(self, kind: str) -> Iterable[PortRecord]:
        """
        @return: Every port record of C{kind}.
        """
        return [record for (k, _), record in self._ports.items() if k == kind]

    def claimPort(self, record: PortRecord, now: float) -> PortRecord:
        """
        Save C{record} unless the port is held for another key (see L{ILeaseStore.claimPort}).

        @return: The record saved for the port afterwards.
        """
        current = self._ports.get((record.kind, record.port))
        if current is not None and current.key != record.key and current.heldAt(now):
            return current
        self._ports[(record.kind, record.port)] = record
        return record

    def dropPort(self, kind: str, port: int, identity: str, name: str) -> None:
        """
        Forget the record of C{port} if it is assigned to (C{identity}, C{name}).
        """
        current = self._ports.get((kind, port))
        if current is not None and current.key == (identity, name):
            del self._ports[(kind, port)]

    def close(self) -> None:
        """
        Nothing to release.
        """


class ClaimsUnavailable(StoreError):
    """
    The shared store that decides ownership across relays cannot be reached: registrations must
    wait (the tunnel is told to try again); routes already known keep working.
    """


class ILeaseClaims(Interface):
    """
    Ownership of lease names across every relay that serves the tunnel domain, decided by the
    store they share; the asynchronous half of the store, beside the records of L{ILeaseStore}
    (which a relay reads and writes at memory speed).

    A relay on its own store (SQLite) decides ownership in its lease table, and its claims are
    L{LocalClaims}; relays of a cluster share etcd (L{portal.relay.memberlink.MemberLinks}).
    The registration path asks these three questions of whichever it runs on, and nothing else.
    """

    def mayRegister() -> str | None:
        """
        @return: L{None} when registrations can be decided now, else why they cannot (the tunnel
            is told to try again).
        """

    def claim(names: list[str], owner: str, source: str | None) -> Deferred[str | None]:
        """
        Claim lease names for C{owner}, one compare-and-set each, after this relay's own lease
        table accepted them; C{source}, the address they are registered from, is recorded with
        them for the quotas per source.

        @return: A L{Deferred} firing with L{None} when every name is C{owner}'s, or with the first
            name another identity holds; it fails with L{ClaimsUnavailable} when the store cannot
            be reached.
        """

    def sync() -> None:
        """
        Publish the leases live on this relay (announce new ones, withdraw ended ones) after a
        control session changed them.
        """


@implementer(ILeaseClaims)
class LocalClaims:
    """
    The claims of a relay on its own: its lease table has decided every claim by the time it is
    asked, and there is nobody to publish leases to.
    """

    def mayRegister(self) -> str | None:
        """
        @return: L{None}: the store is in this process.
        """
        return None

    def claim(
        self, names: list[str], owner: str, source: str | None = None
    ) -> Deferred[str | None]:
        """
        @return: A L{Deferred} that has fired with L{None}.
        """
        return succeed(None)

    def sync(self) -> None:
        """
        Nothing to publish.
        """


@implementer(ILeaseClaims)
class UnavailableClaims:
    """
    The claims of a relay that cannot decide yet (a cluster member still joining): registrations
    are refused with the reason, for the tunnel to try again.
    """

    def __init__(self, reason: str) -> None:
        """
        @param reason: Why registrations cannot be decided, as the tunnel is told.
        """
        self.reason = reason

    def mayRegister(self) -> str | None:
        """
        @return: The reason.
        """
        return self.reason

    def claim(
        self, names: list[str], owner: str, source: str | None = None
    ) -> Deferred[str | None]:
        """
        @return: A L{Deferred} that has failed with L{ClaimsUnavailable}.
        """
        return fail(ClaimsUnavailable(self.reason))

    def sync(self) -> None:
        """
        Nothing to publish.
        """
