"""
Tests for L{portal.relay.leases}.
"""

from __future__ import annotations

import json

from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from portal.relay.leases import Lease, LeaseError, LeaseTable, NameTaken, TooManyLeases
from portal.relay.store import MemoryLeaseStore, NameRecord, StoreError
from tests.test_store import FailingStore

ALICE = "a" * 52
BOB = "b" * 52


class _Session:
    """
    A stand-in for a control session, unhashable like an C{attrs} class with equality.
    """

    __hash__ = None  # type: ignore[assignment]


class LeaseTableTests(SynchronousTestCase):
    """
    Tests for L{LeaseTable}.
    """

    def setUp(self) -> None:
        """
        Make a table with a 60 second lease and a 3600 second reservation on a fake clock.
        """
        self.clock = Clock()
        self.clock.advance(1000)
        self.table = LeaseTable(self.clock, ttl=60, reservation=3600)
        self.session = _Session()

    def test_registerRoute(self) -> None:
        """
        A registered name routes to its lease, live for C{ttl} seconds, held by the session.
        """
        lease = self.table.register("web", ALICE, self.session)
        self.assertEqual(lease, Lease("web", ALICE, 1060.0, self.session, since=1000.0))
        self.assertIs(self.table.route("web"), lease)
        self.assertEqual(self.table.ownerOf("web"), ALICE)
        self.assertEqual(len(self.table), 1)
        self.assertEqual(self.table.ttl, 60)

    def test_routeUnknown(self) -> None:
        """
        An unknown name neither routes nor has an owner.
        """
        self.assertIsNone(self.table.route("web"))
        self.assertIsNone(self.table.ownerOf("web"))

    def test_routeStopsAtExpiry(self) -> None:
        """
        A lease not renewed stops routing when it expires, but stays owned.
        """
        self.table.register("web", ALICE, self.session)
        self.clock.advance(59.9)
        self.assertIsNotNone(self.table.route("web"))
        self.clock.advance(0.1)
        self.assertIsNone(self.table.route("web"))
        self.assertEqual(self.table.ownerOf("web"), ALICE)

    def test_takenWhileLive(self) -> None:
        """
        Another owner cannot register a live name.
        """
        self.table.register("web", ALICE, self.session)
        error = self.assertRaises(NameTaken, self.table.register, "web", BOB, _Session())
        self.assertEqual(str(error), "name 'web' is taken by another identity")
        self.assertIsInstance(error, LeaseError)
        lease = self.table.route("web")
        assert lease is not None
        self.assertIs(lease.holder, self.session)

    def test_takenDuringReservation(self) -> None:
        """
        After the lease expires another owner still cannot take the name during the reservation.
        """
        self.table.register("web", ALICE, self.session)
        self.clock.advance(60 + 3599)
        self.assertRaises(NameTaken, self.table.register, "web", BOB, _Session())
        self.assertEqual(self.table.ownerOf("web"), ALICE)

    def test_freeAfterReservation(self) -> None:
        """
        Once expiry plus reservation has passed the name has no owner and anyone may take it.
        """
        self.table.register("web", ALICE, self.session)
        self.clock.advance(60 + 3600)
        self.assertIsNone(self.table.ownerOf("web"))
        other = _Session()
        lease = self.table.register("web", BOB, other)
        self.assertEqual(lease.owner, BOB)
        self.assertIs(self.table.route("web"), lease)
        self.assertEqual(self.table.detach(self.session), [])

    def test_sameOwnerReconnect(self) -> None:
        """
        After its session goes away the owner registers again from a new session, which then holds it.
        """
        self.table.register("web", ALICE, self.session)
        self.table.detach(self.session)
        self.clock.advance(120)
        newSession = _Session()
        lease = self.table.register("web", ALICE, newSession)
        self.assertIs(lease.holder, newSession)
        self.assertEqual(lease.expiresAt, 1180.0)
        self.assertIs(self.table.route("web"), lease)
        self.assertEqual(self.table.detach(self.session), [])
        self.assertEqual(self.table.detach(newSession), [lease])

    def test_sameOwnerMovesHolder(self) -> None:
        """
        Registering a live name again from a new session moves it there; the old session loses it.
        """
        self.table.register("web", ALICE, self.session)
        newSession = _Session()
        self.table.register("web", ALICE, newSession)
        lease = self.table.route("web")
        assert lease is not None
        self.assertIs(lease.holder, newSession)
        self.assertEqual(self.table.detach(self.session), [])
        self.assertRaises(LeaseError, self.table.renew, "web", ALICE, self.session)

    def test_detach(self) -> None:
        """
        Detaching a session stops its names routing but keeps their ownership.
        """
        self.table.register("web", ALICE, self.session)
        self.table.register("api", ALICE, self.session)
        self.table.register("other", BOB, _Session())
        detached = self.table.detach(self.session)
        self.assertEqual(sorted(lease.name for lease in detached), ["api", "web"])
        self.assertTrue(all(lease.holder is None for lease in detached))
        self.assertIsNone(self.table.route("web"))
        self.assertIsNone(self.table.route("api"))
        self.assertIsNotNone(self.table.route("other"))
        self.assertEqual(self.table.ownerOf("web"), ALICE)
        self.assertRaises(NameTaken, self.table.register, "web", BOB, _Session())

    def test_detachUnknown(self) -> None:
        """
        Detaching a session that holds nothing returns no leases.
        """
        self.assertEqual(self.table.detach(_Session()), [])

    def test_renew(self) -> None:
        """
        Renewing extends the lease to C{ttl} seconds from now.
        """
        self.table.register("web", ALICE, self.session)
        self.clock.advance(50)
        lease = self.table.renew("web", ALICE, self.session)
        self.assertEqual(lease.expiresAt, 1110.0)
        self.clock.advance(50)
        self.assertIs(self.table.route("web"), lease)

    def test_renewByOther(self) -> None:
        """
        Another owner cannot renew a name, even from the holding session.
        """
        self.table.register("web", ALICE, self.session)
        self.assertRaises(LeaseError, self.table.renew, "web", BOB, self.session)

    def test_renewFromOtherSession(self) -> None:
        """
        The owner cannot renew from a session that does not hold the lease.
        """
        self.table.register("web", ALICE, self.session)
        self.assertRaises(LeaseError, self.table.renew, "web", ALICE, _Session())

    def test_renewDetached(self) -> None:
        """
        A detached lease cannot be renewed; it must be registered again.
        """
        self.table.register("web", ALICE, self.session)
        self.table.detach(self.session)
        self.assertRaises(LeaseError, self.table.renew, "web", ALICE, self.session)

    def test_renewUnknown(self) -> None:
        """
        A name never registered cannot be renewed.
        """
        self.assertRaises(LeaseError, self.table.renew, "web", ALICE, self.session)

    def test_release(self) -> None:
        """
        Releasing stops routing at once and reserves the name for its owner from now.
        """
        self.table.register("web", ALICE, self.session)
        self.clock.advance(10)
        self.table.release("web", ALICE)
        self.assertIsNone(self.table.route("web"))
        self.assertEqual(self.table.detach(self.session), [])
        self.clock.advance(3599)
        self.assertRaises(NameTaken, self.table.register, "web", BOB, _Session())
        self.clock.advance(1)
        self.assertIsNone(self.table.ownerOf("web"))
        self.table.register("web", BOB, _Session())

    def test_releaseByOther(self) -> None:
        """
        Another owner cannot release a name, and it keeps routing.
        """
        self.table.register("web", ALICE, self.session)
        self.assertRaises(LeaseError, self.table.release, "web", BOB)
        self.assertIsNotNone(self.table.route("web"))

    def test_expire(self) -> None:
        """
        L{LeaseTable.expire} drops exactly the names whose reservation has ended.
        """
        self.table.register("old", ALICE, self.session)
        self.clock.advance(100)
        self.table.register("new", BOB, _Session())
        self.clock.advance(3600 + 60 - 100)
        self.assertEqual(self.table.expire(), ["old"])
        self.assertEqual(len(self.table), 1)
        self.assertIsNone(self.table.ownerOf("old"))
        self.assertEqual(self.table.ownerOf("new"), BOB)
        self.assertEqual(self.table.detach(self.session), [])
        self.assertEqual(self.table.expire(), [])

    def test_perOwnerLimit(self) -> None:
        """
        An owner may hold at most C{maxPerOwner} names; others are unaffected.
        """
        table = LeaseTable(self.clock, maxPerOwner=2)
        table.register("a", ALICE, self.session)
        table.register("b", ALICE, self.session)
        self.assertRaises(TooManyLeases, table.register, "c", ALICE, self.session)
        table.register("a", ALICE, self.session)
        table.register("c", BOB, self.session)

    def test_perOwnerLimitCountsReserved(self) -> None:
        """
        Released and detached names count against the limit until their reservation ends.
        """
        table = LeaseTable(self.clock, ttl=60, reservation=3600, maxPerOwner=2)
        table.register("a", ALICE, self.session)
        table.register("b", ALICE, self.session)
        table.release("a", ALICE)
        table.detach(self.session)
        self.assertRaises(TooManyLeases, table.register, "c", ALICE, self.session)
        # "a" was released at once, so its reservation ends first; "b" lapsed 60 seconds later.
        self.clock.advance(3600)
        table.register("c", ALICE, self.session)
        self.assertRaises(TooManyLeases, table.register, "d", ALICE, self.session)
        self.clock.advance(60)
        table.register("d", ALICE, self.session)
        self.assertEqual([table.ownerOf(name) for name in "abcd"], [None, None, ALICE, ALICE])

    def test_importJSON(self) -> None:
        """
        The names of an earlier relay's C{leases.json} are taken over detached, keep their expiry,
        count as having earned their reservation, and go to the store.
        """
        store = MemoryLeaseStore()
        table = LeaseTable(self.clock, ttl=60, reservation=3600, reserveAfter=600, store=store)
        data = {
            "version": 1,
            "leases": {
                "web": {"owner": ALICE, "expiresAt": 1030},
                "api": {"owner": BOB, "expiresAt": 990.5},
                "gone": {"owner": BOB, "expiresAt": 1000 - 3600},
            },
        }
        self.assertEqual(table.importJSON(json.loads(json.dumps(data))), 2)
        self.assertEqual(
            sorted((r.name, r.owner, r.expiresAt) for r in store.names()),
            [("api", BOB, 990.5), ("web", ALICE, 1030.0)],
        )
        self.assertEqual((table.ownerOf("web"), table.ownerOf("api")), (ALICE, BOB))
        self.assertIsNone(table.ownerOf("gone"))
        self.assertIsNone(table.route("web"))
        self.assertRaises(NameTaken, table.register, "web", BOB, _Session())
        self.clock.advance(3600 + 29)
        self.assertEqual(table.ownerOf("web"), ALICE)
        self.clock.advance(1)
        self.assertIsNone(table.ownerOf("web"))

    def test_importJSONKeepsCurrentOwners(self) -> None:
        """
        A name the table already holds keeps its owner when an old file names another.
        """
        self.table.register("web", BOB, self.session)
        data = {"version": 1, "leases": {"web": {"owner": ALICE, "expiresAt": 1050}}}
        self.assertEqual(self.table.importJSON(data), 0)
        self.assertEqual(self.table.ownerOf("web"), BOB)

    def test_importJSONInvalid(self) -> None:
        """
        A file in another format is refused with L{ValueError}, and nothing of it is imported.
        """
        for data in [
            [],
            {"version": 2, "leases": {}},
            {"version": 1},
            {"version": 1, "leases": {"ok": {"owner": ALICE, "expiresAt": 2000}, "web": "x"}},
            {"version": 1, "leases": {"web": {"owner": ALICE}}},
            {"version": 1, "leases": {"web": {"owner": 5, "expiresAt": 1.0}}},
            {"version": 1, "leases": {"web": {"owner": ALICE, "expiresAt": True}}},
        ]:
            self.assertRaises(ValueError, self.table.importJSON, data)
            self.assertEqual(len(self.table), 0)


class ReservationRuleTests(SynchronousTestCase):
    """
    A name is reserved for its owner after it lapses only if it was held for C{reserveAfter}
    seconds.
    """

    def setUp(self) -> None:
        """
        A table with a 60 second lease, an hour's reservation earned after 600 seconds.
        """
        self.clock = Clock()
        self.clock.advance(1000)
        self.table = LeaseTable(self.clock, ttl=60, reservation=3600, reserveAfter=600)
        self.session = _Session()

    def test_droppedAtOnceIsFree(self) -> None:
        """
        A name registered and released at once is free for anyone straight away.
        """
        self.table.register("web", ALICE, self.session)
        self.table.release("web", ALICE)
        self.assertIsNone(self.table.ownerOf("web"))
        self.table.register("web", BOB, _Session())
        self.assertEqual(self.table.ownerOf("web"), BOB)

    def test_shortLeaseLapsesFree(self) -> None:
        """
        A name whose control session went away early stays its owner's only until its lease
        lapses (so a quick reconnect gets it back), then is free.
        """
        self.table.register("web", ALICE, self.session)
        self.table.detach(self.session)
        self.clock.advance(59)
        self.assertRaises(NameTaken, self.table.register, "web", BOB, _Session())
        self.clock.advance(1)
        self.assertIsNone(self.table.ownerOf("web"))

    def test_heldLongEnoughIsReserved(self) -> None:
        """
        A name held (renewed) for C{reserveAfter} seconds stays its owner's for the whole
        reservation after it is released.
        """
        self.table.register("web", ALICE, self.session)
        for _ in range(20):
            self.clock.advance(30)
            self.table.renew("web", ALICE, self.session)
        self.table.release("web", ALICE)
        self.assertEqual(self.clock.seconds() - 1000, 600)
        self.clock.advance(3599)
        self.assertRaises(NameTaken, self.table.register, "web", BOB, _Session())
        self.clock.advance(1)
        self.assertIsNone(self.table.ownerOf("web"))

    def test_justShortOfIt(self) -> None:
        """
        A name released one second before it earns its reservation is free at once.
        """
        self.table.register("web", ALICE, self.session)
        for _ in range(19):
            self.clock.advance(31)
            self.table.renew("web", ALICE, self.session)
        self.clock.advance(599 - 19 * 31)
        self.table.release("web", ALICE)
        self.assertIsNone(self.table.ownerOf("web"))

    def test_reconnectKeepsSince(self) -> None:
        """
        Registering again from a new session continues the owner's ownership: the time already
        held counts towards the reservation.
        """
        self.table.register("web", ALICE, self.session)
        self.clock.advance(50)
        self.table.detach(self.session)
        session = _Session()
        lease = self.table.register("web", ALICE, session)
        self.assertEqual(lease.since, 1000)
        for _ in range(11):
            self.clock.advance(50)
            self.table.renew("web", ALICE, session)
        self.table.release("web", ALICE)
        self.assertEqual(self.table.ownerOf("web"), ALICE)


class StoreTests(SynchronousTestCase):
    """
    L{LeaseTable} writes every ownership change through to its store and starts from it.
    """

    def setUp(self) -> None:
        """
        A table on a L{MemoryLeaseStore}.
        """
        self.clock = Clock()
        self.clock.advance(1000)
        self.store = MemoryLeaseStore()
        self.table = LeaseTable(self.clock, ttl=60, reservation=3600, store=self.store)

    def records(self) -> dict[str, NameRecord]:
        """
        @return: The store's records by name.
        """
        return {record.name: record for record in self.store.names()}

    def test_registerRenewRelease(self) -> None:
        """
        Registration, renewal and release each leave the store with the lease's owner, start,
        expiry and the end of its ownership.
        """
        self.table.register("web", ALICE, _Session())
        self.assertEqual(self.records(), {"web": NameRecord("web", ALICE, 1000, 1060, 4660)})
        session = _Session()
        self.table.register("web", ALICE, session)
        self.clock.advance(20)
        self.table.renew("web", ALICE, session)
        self.assertEqual(self.records(), {"web": NameRecord("web", ALICE, 1000, 1080, 4680)})
        self.clock.advance(5)
        self.table.release("web", ALICE)
        self.assertEqual(self.records(), {"web": NameRecord("web", ALICE, 1000, 1025, 4625)})

    def test_expiryDropsRecord(self) -> None:
        """
        A name whose ownership ended is dropped from the store by L{LeaseTable.expire}, or by a
        lookup.
        """
        self.table.register("web", ALICE, _Session())
        self.table.register("api", ALICE, _Session())
        self.clock.advance(60 + 3600)
        self.assertEqual(self.table.ownerOf("web"), None)
        self.assertEqual(list(self.records()), ["api"])
        self.assertEqual(self.table.expire(), ["api"])
        self.assertEqual(self.records(), {})

    def test_restart(self) -> None:
        """
        A table built on a store holds its owned names, detached; records whose ownership ended
        are dropped from the store.
        """
        self.table.register("web", ALICE, _Session())
        self.table.register("old", BOB, _Session())
        self.table.release("old", BOB)
        self.clock.advance(3600)
        again = LeaseTable(self.clock, ttl=60, reservation=3600, store=self.store)
        self.assertEqual(again.ownerOf("web"), ALICE)
        self.assertIsNone(again.route("web"))
        self.assertEqual(len(again), 1)
        self.assertEqual(list(self.records()), ["web"])
        self.assertRaises(NameTaken, again.register, "web", BOB, _Session())

    def test_storeRefusesClaim(self) -> None:
        """
        When the store holds a name for another identity (another relay of a cluster won it), the
        registration is refused and the table is unchanged.
        """
        self.store.claimName(NameRecord("web", BOB, 990, 1050, 5000), 1000)
        table = LeaseTable(self.clock, store=MemoryLeaseStore())
        table._store = self.store
        self.assertRaises(NameTaken, table.register, "web", ALICE, _Session())
        self.assertEqual(len(table), 0)
        self.assertEqual(self.records()["web"].owner, BOB)

    def test_storeFailureChangesNothing(self) -> None:
        """
        A store that cannot be written fails the registration with its error, and the table does
        not change.
        """
        table = LeaseTable(self.clock, store=FailingStore())
        self.assertRaises(StoreError, table.register, "web", ALICE, _Session())
        self.assertIsNone(table.ownerOf("web"))
        self.assertEqual(len(table), 0)

    def test_givingUpNeverFails(self) -> None:
        """
        A release or an expiry the store cannot record still happens in the table, and is logged;
        the store keeps the owner's longer claim.
        """
        store = FailingStore(broken=False)
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        table = LeaseTable(self.clock, ttl=60, reservation=3600, store=store)
        table.register("web", ALICE, _Session())
        store.broken = True
        table.release("web", ALICE)
        self.assertIsNone(table.route("web"))
        self.clock.advance(3600)
        self.assertEqual(table.expire(), ["web"])
        self.assertEqual(len(table), 0)
        self.assertEqual([record.expiresAt for record in store.names()], [1060.0])
        self.assertEqual(
            [formatEvent(event) for event in events],
            [
                "lease store did not record the end of web: disk full",
                "lease store did not drop web: disk full",
            ],
        )
