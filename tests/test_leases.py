"""
Tests for L{portal.relay.leases}.
"""

from __future__ import annotations

import json

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from portal.relay.leases import Lease, LeaseError, LeaseTable, NameTaken, TooManyLeases

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
        self.assertEqual(lease, Lease("web", ALICE, 1060.0, self.session))
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
        self.assertEqual(sorted(table.toJSON()["leases"]), ["c", "d"])

    def test_jsonRoundTrip(self) -> None:
        """
        Ownership and expiry survive a JSON round trip; restored leases are detached.
        """
        self.table.register("web", ALICE, self.session)
        self.table.register("api", BOB, _Session())
        data = json.loads(json.dumps(self.table.toJSON()))
        restored = LeaseTable.fromJSON(data, self.clock, ttl=60, reservation=3600)
        self.assertEqual(len(restored), 2)
        self.assertEqual(restored.ownerOf("web"), ALICE)
        self.assertEqual(restored.ownerOf("api"), BOB)
        self.assertIsNone(restored.route("web"))
        self.assertRaises(NameTaken, restored.register, "web", BOB, _Session())
        newSession = _Session()
        lease = restored.register("web", ALICE, newSession)
        self.assertIs(restored.route("web"), lease)

    def test_jsonReservationContinues(self) -> None:
        """
        A restored lease keeps its original expiry, so its reservation ends when it would have.
        """
        self.table.register("web", ALICE, self.session)
        data = self.table.toJSON()
        self.clock.advance(60 + 3600)
        restored = LeaseTable.fromJSON(data, self.clock, reservation=3600)
        self.assertEqual(len(restored), 0)
        self.assertIsNone(restored.ownerOf("web"))

    def test_jsonLeavesOutFreeNames(self) -> None:
        """
        Names past their reservation are not saved.
        """
        self.table.register("web", ALICE, self.session)
        self.clock.advance(60 + 3600)
        self.assertEqual(self.table.toJSON(), {"version": 1, "leases": {}})

    def test_fromJSONInvalid(self) -> None:
        """
        State in another format is refused with L{ValueError}.
        """
        for data in [
            [],
            {"version": 2, "leases": {}},
            {"version": 1},
            {"version": 1, "leases": {"web": "x"}},
            {"version": 1, "leases": {"web": {"owner": ALICE}}},
            {"version": 1, "leases": {"web": {"owner": 5, "expiresAt": 1.0}}},
            {"version": 1, "leases": {"web": {"owner": ALICE, "expiresAt": True}}},
        ]:
            self.assertRaises(ValueError, LeaseTable.fromJSON, data, self.clock)
