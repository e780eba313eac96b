"""
Quotas per source address on what registrations hold: lease names, public ports.

Per-identity limits mean nothing against an attacker with free identities; per-source ones (an IPv4
address, an IPv6 /64, see L{portal.forwarding.sources}) do. A L{SourceQuota} remembers which source
registered each thing (a lease name of an identity, a port of a lease) and counts, per source,
those that are still held, live or reserved: whether a thing is still held is asked of the table
that holds it (the lease table, the port allocator), so the quota never keeps a thing alive.

In a relay cluster, the quota also counts what the source holds on the other members
(L{ISharedHoldings}, kept from the cluster's records by L{portal.relay.clusterquota}).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from typing import Any, Generic, TypeVar

from zope.interface import Interface

K = TypeVar("K", bound=Hashable)


class ISharedHoldings(Interface):
    """
    What each source holds across a relay cluster, this member included, as the cluster's
    records say.
    """

    def upperBound(source: str) -> int:
        """
        @return: At least how many things C{source} holds in the cluster, at once (constant time).
        """

    def heldBy(source: str) -> set[Any]:
        """
        @return: The things C{source} holds in the cluster, live or reserved, now.
        """

    def sweep() -> int:
        """
        Forget what is no longer held.

        @return: How many were forgotten.
        """


class OverQuota(Exception):
    """
    A source would hold more than its quota; C{str()} says how many it holds and may hold.

    @ivar held: What the source holds now.
    @ivar limit: What it may hold.
    """

    def __init__(self, message: str, held: int, limit: int) -> None:
        """
        @param message: What the tunnel is told.
        @param held: What the source holds now.
        @param limit: What it may hold.
        """
        super().__init__(message)
        self.held = held
        self.limit = limit


class SourceQuota(Generic[K]):
    """
    At most C{limit} things held per source.

    Checking costs constant time while a source is under its quota; at the quota, its things are
    checked once against the holding table (and those no longer held forgotten). L{sweep} forgets
    every thing no longer held, for sources that never come back.

    @ivar limit: Most things one source may hold.
    @ivar what: What is counted, for messages (C{"lease names"}).
    @ivar shared: In a relay cluster, what each source holds on every member (L{None}: the things
        registered here are all there is). A thing counts once, whether held here, elsewhere or
        both.
    """

    shared: ISharedHoldings | None = None

    def __init__(self, limit: int, held: Callable[[K], bool], what: str) -> None:
        """
        @param limit: Most things one source may hold; positive.
        @param held: Tells whether a thing is still held (live or reserved).
        @param what: What is counted, plural, for messages.
        @raise ValueError: If C{limit} is not positive.
        """
        if limit < 1:
            raise ValueError(f"a quota of {what} must be at least 1, not {limit}")
        self.limit = limit
        self.what = what
        self._held = held
        self._bySource: dict[str, set[K]] = {}
        self._sourceOf: dict[K, str] = {}

    def _forget(self, thing: K) -> None:
        """
        Stop counting C{thing} for its source.
        """
        source = self._sourceOf.pop(thing, None)
        if source is None:
            return
        things = self._bySource[source]
        things.discard(thing)
        if not things:
            del self._bySource[source]

    def holding(self, source: str) -> int:
        """
        @param source: A source key.
        @return: The things C{source} holds, checked against the holding table.
        """
        for thing in list(self._bySource.get(source, ())):
            if not self._held(thing):
                self._forget(thing)
        return len(self._bySource.get(source, ()))

    def check(self, source: str, things: Iterable[K]) -> None:
        """
        Check that C{source} may hold C{things} as well as what it holds.

        A thing the source holds already costs nothing; one another source registered (a tunnel
        that moved) counts for C{source} once L{add}ed.

        @param source: A source key.
        @param things: What a registration would hold.
        @raise OverQuota: If C{source} would hold more than L{limit}.
        """
        mine = self._bySource.get(source, set())
        new = [thing for thing in dict.fromkeys(things) if thing not in mine]
        shared = self.shared
        elsewhere = 0 if shared is None else shared.upperBound(source)
        if not new or len(mine) + elsewhere + len(new) <= self.limit:
            return
        self.holding(source)
        everywhere = set(self._bySource.get(source, ()))
        if shared is not None:
            everywhere |= shared.heldBy(source)
        held = len(everywhere)
        new = [thing for thing in new if thing not in everywhere]
        if new and held + len(new) > self.limit:
            where = "on this relay" if shared is None else "in this relay cluster"
            raise OverQuota(
                f"your address already holds {held} {self.what} {where} (live or reserved), and "
                f"at most {self.limit} are allowed per address; release some, or wait for their "
                f"reservations to end",
                held,
                self.limit,
            )

    def add(self, source: str, things: Iterable[K]) -> None:
        """
        Count C{things} for C{source} (they were just registered from it).

        @param source: A source key.
        @param things: What the registration holds.
        """
        for thing in things:
            if self._sourceOf.get(thing) != source:
                self._forget(thing)
                self._sourceOf[thing] = source
                self._bySource.setdefault(source, set()).add(thing)

    def sweep(self) -> int:
        """
        Forget every thing that is no longer held.

        @return: How many were forgotten.
        """
        gone = [thing for thing in self._sourceOf if not self._held(thing)]
        for thing in gone:
            self._forget(thing)
        if self.shared is not None:
            self.shared.sweep()
        return len(gone)

    def __len__(self) -> int:
        """
        @return: The things counted, for all sources (some may no longer be held until L{sweep}).
        """
        return len(self._sourceOf)
