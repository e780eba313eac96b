"""
The relay's lease table: which identity owns which name, and which control session serves it.

A lease name belongs to the identity that first registered it for as long as the lease is renewed.
Once it has been live for C{reserveAfter} seconds it also stays reserved for its owner for a
reservation period after it lapses, so that a tunnel that reconnects (or a relay that restarts) gets
its name back and nobody else can take it in between; a name registered and dropped at once is
free again as soon as its lease ends.  A name is routable only while its lease is live and a
control session holds it.

The table keeps everything in memory and writes every ownership change through to an
L{ILeaseStore}, one record per name; it loads the store's records when it is built.

Times are C{clock.seconds()} values.  The relay uses the reactor's clock, which is wall-clock time,
so persisted expiry times stay meaningful across restarts.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from portal.relay.sourcequota import ISharedHoldings
from portal.relay.store import IMPORTED_SINCE, ILeaseStore, MemoryLeaseStore, NameRecord, StoreError

#: Version of the C{leases.json} format of earlier relays, read by L{LeaseTable.importJSON}.
STATE_VERSION = 1


class LeaseError(Exception):
    """
    A lease operation was refused; C{str()} of the exception gives the reason.
    """


class NameTaken(LeaseError):
    """
    The name is owned, or still reserved, by another identity.
    """


class TooManyLeases(LeaseError):
    """
    The identity already owns as many names (live or reserved) as one identity may.
    """


@attrs.define
class Lease:
    """
    One name's lease.

    Leases returned by L{LeaseTable} are the table's own records: read them, do not change them.

    @ivar name: The lease name (a DNS label).
    @ivar owner: The identity id of the owner.
    @ivar expiresAt: The clock time the lease stops being live unless renewed; ownership lasts until
        the table's reservation period after it, if the name has earned a reservation.
    @ivar holder: The control session serving the name, or C{None} when detached.
    @ivar since: When the owner's continuous ownership of the name began.
    """

    name: str
    owner: str
    expiresAt: float
    holder: object | None
    since: float = 0.0


class LeaseTable:
    """
    All of a relay's leases, indexed by name, owner and holder so that lookups take constant time,
    with every ownership change written through to a store.

    @ivar ttl: Seconds a registration or renewal keeps a lease live.
    @ivar reservation: Seconds a lapsed lease stays owned by its owner, once earned.
    @ivar reserveAfter: Seconds a name must have been owned (from its first registration to the end
        of its lease) to earn the reservation; a name that lapses sooner is free when its lease ends.
    @ivar maxPerOwner: Most names (live or reserved) one owner may hold.
    @ivar shared: In a relay cluster, the names each owner holds on every member (L{None}: the
        names of this table are all there is); a name counts once, whether held here, elsewhere or
        both.
    """

    _log = Logger()
    shared: ISharedHoldings | None = None

    def __init__(
        self,
        clock: IReactorTime,
        ttl: float = 60.0,
        reservation: float = 3600.0,
        maxPerOwner: int = 100,
        reserveAfter: float = 0.0,
        store: ILeaseStore | None = None,
    ) -> None:
        """
        Build the table from the records in C{store}, every lease detached; records whose
        ownership has ended are dropped from the store.

        @param clock: The source of the current time.
        @param ttl: Seconds a registration or renewal keeps a lease live.
        @param reservation: Seconds a lapsed lease stays owned by its owner, once earned.
        @param maxPerOwner: Most names (live or reserved) one owner may hold.
        @param reserveAfter: Seconds a name must have been owned to earn the reservation.
        @param store: Where ownership is kept; a new L{MemoryLeaseStore} if not given.
        @raise portal.relay.store.StoreError: If the store cannot be read.
        """
        self.ttl = ttl
        self.reservation = reservation
        self.reserveAfter = reserveAfter
        self.maxPerOwner = maxPerOwner
        self._clock = clock
        self._store: ILeaseStore = store if store is not None else MemoryLeaseStore()
        self._leases: dict[str, Lease] = {}
        self._byOwner: dict[str, set[str]] = {}
        # Keyed by id(holder): holders need not be hashable.  Each entry's lease keeps its holder
        # alive, so the id cannot be reused while it is in this index.
        self._byHolder: dict[int, set[str]] = {}
        now = clock.seconds()
        for record in self._store.names():
            lease = Lease(record.name, record.owner, record.expiresAt, None, record.since)
            if self._owned(lease, now):
                self._add(lease)
            else:
                self._store.dropName(record.name, record.owner)

    def __len__(self) -> int:
        """
        Count the names in the table.

        @return: The number of names recorded, live or reserved; names whose reservation has ended
            count until L{expire} or a lookup removes them.
        """
        return len(self._leases)

    def ownedUntil(self, lease: Lease) -> float:
        """
        Tell when a lease stops belonging to its owner.

        @param lease: The lease.
        @return: Its expiry, plus the reservation period if the name was owned for at least
            L{reserveAfter} seconds by then.
        """
        earned = lease.expiresAt - lease.since >= self.reserveAfter
        return lease.expiresAt + (self.reservation if earned else 0.0)

    def _owned(self, lease: Lease, now: float) -> bool:
        """
        Tell whether a lease still belongs to its owner.

        @param lease: The lease.
        @param now: The current time.
        @return: Whether C{now} is before L{ownedUntil}.
        """
        return now < self.ownedUntil(lease)

    def _save(self, name: str, owner: str, since: float, expiresAt: float, now: float) -> None:
        """
        Claim a name's record in the store for its owner, before the table changes.

        @raise NameTaken: If the store holds the name for another identity (another relay sharing
            the store won it first).
        @raise portal.relay.store.StoreError: If the store cannot be written.
        """
        lease = Lease(name, owner, expiresAt, None, since)
        record = NameRecord(name, owner, since, expiresAt, self.ownedUntil(lease))
        saved = self._store.claimName(record, now)
        if saved.owner != owner:
            raise NameTaken(f"name {name!r} is taken by another identity")

    def _saveGivingUp(self, lease: Lease, now: float) -> None:
        """
        Record in the store a change that gives something up (an earlier end), after the table
        made it: a store that cannot record it is logged, not raised, and keeps the owner's
        longer claim, which never hands a name to someone else.

        @param lease: The changed lease.
        @param now: The current time.
        """
        try:
            self._save(lease.name, lease.owner, lease.since, lease.expiresAt, now)
        except (StoreError, NameTaken) as e:
            self._log.error(
                "lease store did not record the end of {name}: {error}",
                name=lease.name,
                error=str(e),
            )

    def _add(self, lease: Lease) -> None:
        """
        Put a lease in the table and the owner index.

        @param lease: A lease on a name not in the table.
        """
        self._leases[lease.name] = lease
        self._byOwner.setdefault(lease.owner, set()).add(lease.name)

    def _setHolder(self, lease: Lease, holder: object | None) -> None:
        """
        Move a lease to another holder, keeping the holder index up to date.

        @param lease: The lease.
        @param holder: The new holder, or C{None} to detach it.
        """
        if lease.holder is not None:
            key = id(lease.holder)
            names = self._byHolder.get(key)
            if names is not None:
                names.discard(lease.name)
                if not names:
                    del self._byHolder[key]
        lease.holder = holder
        if holder is not None:
            self._byHolder.setdefault(id(holder), set()).add(lease.name)

    def _remove(self, lease: Lease) -> None:
        """
        Drop a lease from the table, every index and the store.

        A store that cannot drop the record is logged: the record's ownership has ended anyway, so
        it is claimed over or dropped at the next start.

        @param lease: The lease to drop.
        """
        self._setHolder(lease, None)
        del self._leases[lease.name]
        names = self._byOwner[lease.owner]
        names.discard(lease.name)
        if not names:
            del self._byOwner[lease.owner]
        try:
            self._store.dropName(lease.name, lease.owner)
        except StoreError as e:
            self._log.error(
                "lease store did not drop {name}: {error}", name=lease.name, error=str(e)
            )

    def _lookup(self, name: str, now: float) -> Lease | None:
        """
        Find a name's lease, dropping it if its reservation has ended.

        @param name: The lease name.
        @param now: The current time.
        @return: The lease if it is still owned, else C{None}.
        """
        lease = self._leases.get(name)
        if lease is None:
            return None
        if not self._owned(lease, now):
            self._remove(lease)
            return None
        return lease

    def _ownedCount(self, owner: str, now: float) -> int:
        """
        Count the names an owner holds, first dropping any whose reservation has ended.

        @param owner: The owner's identity id.
        @param now: The current time.
        @return: The number of live or reserved names of C{owner}.
        """
        names = self._byOwner.get(owner)
        if not names:
            return 0
        if len(names) >= self.maxPerOwner:
            for name in list(names):
                self._lookup(name, now)
            names = self._byOwner.get(owner, set())
        return len(names)

    def _checkOwnerQuota(self, name: str, owner: str, now: float) -> None:
        """
        Check that C{owner} may hold C{name} as well as the names it holds (here, and on every
        member of a cluster).

        @raise TooManyLeases: If it holds L{maxPerOwner} other names.
        """
        held = self._ownedCount(owner, now)
        shared = self.shared
        if shared is None:
            if held >= self.maxPerOwner:
                raise TooManyLeases(
                    f"identity already holds {self.maxPerOwner} names on this relay, the most "
                    f"allowed; release one before registering {name!r}"
                )
            return
        if held + shared.upperBound(owner) < self.maxPerOwner:
            return
        everywhere = set(self._byOwner.get(owner, ())) | shared.heldBy(owner)
        if name not in everywhere and len(everywhere) >= self.maxPerOwner:
            raise TooManyLeases(
                f"identity already holds {len(everywhere)} names in this relay cluster (live or "
                f"reserved), and at most {self.maxPerOwner} are allowed; release one before "
                f"registering {name!r}"
            )

    def register(self, name: str, owner: str, holder: object) -> Lease:
        """
        Give C{owner} a live lease on C{name}, served by C{holder}.

        This succeeds if the name is free, already owned by C{owner} (live, lapsed or detached; a
        new holder takes it over, as when a tunnel reconnects), or its previous owner's reservation
        has ended.

        @param name: The lease name, already validated.
        @param owner: The registering identity's id, already authenticated.
        @param holder: The control session that will serve the name.
        @return: The lease, live for L{ttl} seconds from now.
        @raise NameTaken: If another identity owns the name or still has it reserved.
        @raise TooManyLeases: If C{owner} already holds C{maxPerOwner} other names.
        @raise portal.relay.store.StoreError: If the store cannot be written.
        """
        now = self._clock.seconds()
        lease = self._lookup(name, now)
        if lease is not None and lease.owner != owner:
            raise NameTaken(f"name {name!r} is taken by another identity")
        if lease is None:
            self._checkOwnerQuota(name, owner, now)
        since = now if lease is None else lease.since
        self._save(name, owner, since, now + self.ttl, now)
        if lease is None:
            lease = Lease(name=name, owner=owner, expiresAt=now + self.ttl, holder=None, since=now)
            self._add(lease)
        lease.expiresAt = now + self.ttl
        if lease.holder is not holder:
            self._setHolder(lease, holder)
        return lease

    def renew(self, name: str, owner: str, holder: object) -> Lease:
        """
        Keep a lease live for another L{ttl} seconds.

        @param name: The lease name.
        @param owner: The renewing identity's id.
        @param holder: The control session renewing it.
        @return: The renewed lease.
        @raise LeaseError: If C{owner} does not own the name or C{holder} does not hold it (a
            detached lease must be registered again).
        @raise portal.relay.store.StoreError: If the store cannot be written.
        """
        now = self._clock.seconds()
        lease = self._lookup(name, now)
        if lease is None or lease.owner != owner:
            raise LeaseError(f"name {name!r} is not leased to this identity; register it again")
        if lease.holder is not holder:
            raise LeaseError(
                f"name {name!r} is not held by this connection; register it again to move it here"
            )
        self._save(name, owner, lease.since, now + self.ttl, now)
        lease.expiresAt = now + self.ttl
        return lease

    def release(self, name: str, owner: str) -> None:
        """
        End a lease now at its owner's request.

        The name stops being routable at once; the owner keeps it for the reservation period
        counted from now (or from its earlier expiry, if the lease had already lapsed), if the name
        has earned one.

        @param name: The lease name.
        @param owner: The releasing identity's id.
        @raise LeaseError: If C{owner} does not own the name.
        """
        now = self._clock.seconds()
        lease = self._lookup(name, now)
        if lease is None or lease.owner != owner:
            raise LeaseError(f"name {name!r} is not leased to this identity")
        lease.expiresAt = min(lease.expiresAt, now)
        self._setHolder(lease, None)
        self._saveGivingUp(lease, now)

    def detach(self, holder: object) -> list[Lease]:
        """
        Note that a control session has gone away.

        Its leases stop being routable; their owners keep them until their expiry (plus the
        reservation period, if earned), and can take them back by registering again.

        @param holder: The control session that ended.
        @return: The leases it held, now detached.
        """
        names = self._byHolder.pop(id(holder), set())
        detached = []
        for name in names:
            lease = self._leases[name]
            lease.holder = None
            detached.append(lease)
        return detached

    def records(self) -> list[Lease]:
        """
        Every lease recorded, live, detached or reserved, for reports (names whose reservation has
        ended are included until L{expire} removes them).

        @return: The table's own records, in name order: read them, do not change them.
        """
        return [self._leases[name] for name in sorted(self._leases)]

    def route(self, name: str) -> Lease | None:
        """
        Find where to send a visitor for a name.

        @param name: The lease name.
        @return: The lease if it is live and held by a control session, else C{None}.
        """
        lease = self._leases.get(name)
        if lease is None or lease.holder is None:
            return None
        if not self._clock.seconds() < lease.expiresAt:
            return None
        return lease

    def ownerOf(self, name: str) -> str | None:
        """
        Find who owns a name.

        @param name: The lease name.
        @return: The owner's identity id while the lease is live or reserved, else C{None}.
        """
        lease = self._lookup(name, self._clock.seconds())
        return None if lease is None else lease.owner

    def expire(self) -> list[str]:
        """
        Drop every name whose ownership has ended, from the table and the store.

        This walks the whole table; call it now and then (every L{ttl} seconds, say).

        @return: The names dropped.
        """
        now = self._clock.seconds()
        expired = [lease for lease in self._leases.values() if not self._owned(lease, now)]
        for lease in expired:
            self._remove(lease)
        return [lease.name for lease in expired]

    def importJSON(self, data: Any) -> int:
        """
        Take over the names of a C{leases.json} written by an earlier relay, every lease detached.

        Imported names count as owned long enough to earn their reservation.  A name already in
        the table keeps its owner.

        @param data: The parsed JSON (C{{"version": 1, "leases": {name: {"owner", "expiresAt"}}}}).
        @return: The number of names taken over; names whose reservation has already ended are
            left out.
        @raise ValueError: If C{data} is not in that format (nothing is imported then).
        @raise portal.relay.store.StoreError: If the store cannot be written.
        """
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            raise ValueError(f"lease state is not a version {STATE_VERSION} lease table")
        leases = data.get("leases")
        if not isinstance(leases, dict):
            raise ValueError("lease state has no 'leases' object")
        entries = []
        for name, entry in leases.items():
            if not isinstance(entry, dict):
                raise ValueError(f"lease state for {name!r} is not an object")
            owner = entry.get("owner")
            expiresAt = entry.get("expiresAt")
            if (
                not isinstance(name, str)
                or not isinstance(owner, str)
                or isinstance(expiresAt, bool)
                or not isinstance(expiresAt, (int, float))
            ):
                raise ValueError(f"lease state for {name!r} lacks a valid owner or expiresAt")
            entries.append(Lease(name, owner, float(expiresAt), None, IMPORTED_SINCE))
        now = self._clock.seconds()
        imported = 0
        for lease in entries:
            if not self._owned(lease, now) or self._lookup(lease.name, now) is not None:
                continue
            try:
                self._save(lease.name, lease.owner, lease.since, lease.expiresAt, now)
            except NameTaken:
                continue
            self._add(lease)
            imported += 1
        return imported
