"""
Tests for L{portal.relay.ports}.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from portal.relay.ports import (
    STATE_VERSION,
    PortAllocationError,
    PortAllocator,
    PortLimitReached,
    PortRange,
    PortRangeError,
    PortsExhausted,
    PortStateError,
    parsePortRange,
)
from portal.relay.store import MemoryLeaseStore, PortRecord
from tests.test_store import FailingStore

ALICE = "a" * 52
BOB = "b" * 52
CAROL = "c" * 52

#: Property tests run the same examples every time, with no deadline, so CI is deterministic.
deterministic = settings(derandomize=True, deadline=None, max_examples=200)


class PortRangeTests(SynchronousTestCase):
    """
    Tests for L{parsePortRange} and L{PortRange}.
    """

    def test_parse(self) -> None:
        """
        C{"LO-HI"} is the inclusive range from LO to HI.
        """
        portRange = parsePortRange("9000-9009")
        self.assertEqual(portRange, PortRange(9000, 9009))
        self.assertEqual(len(portRange), 10)
        self.assertEqual(list(portRange), list(range(9000, 9010)))
        self.assertEqual(str(portRange), "9000-9009")

    def test_parseEdges(self) -> None:
        """
        A range may hold a single port, and may span every port from 1 to 65535.
        """
        self.assertEqual(parsePortRange("9000-9000"), PortRange(9000, 9000))
        self.assertEqual(len(parsePortRange("9000-9000")), 1)
        self.assertEqual(parsePortRange("1-65535"), PortRange(1, 65535))

    def test_parseWhitespace(self) -> None:
        """
        Spaces around the numbers are ignored, and leading zeros are allowed.
        """
        self.assertEqual(parsePortRange(" 9000 - 9009\n"), PortRange(9000, 9009))
        self.assertEqual(parsePortRange("09000-09009"), PortRange(9000, 9009))

    def test_contains(self) -> None:
        """
        A range contains the C{int}s from C{low} to C{high} and nothing else.
        """
        portRange = PortRange(9000, 9009)
        self.assertIn(9000, portRange)
        self.assertIn(9009, portRange)
        self.assertNotIn(8999, portRange)
        self.assertNotIn(9010, portRange)
        self.assertNotIn("9000", portRange)
        self.assertNotIn(True, PortRange(1, 2))

    def test_notTwoIntegers(self) -> None:
        """
        Text that is not two decimal integers joined by C{-} is refused with a message naming the
        option and the text.
        """
        for text in [
            "",
            "9000",
            "9000-",
            "-9000",
            "a-b",
            "9000-9009-9010",
            "9000:9009",
            "+9000-9009",
            "9000--9009",
            "9_000-9_009",
            "9000.0-9009",
            "\u0669\u0660\u0660\u0660-\u0669\u0660\u0660\u0669",
        ]:
            error = self.assertRaises(PortRangeError, parsePortRange, text, "--tcp-ports")
            self.assertEqual(
                str(error),
                f"--tcp-ports {text}: expected LO-HI, two port numbers joined by '-', "
                "such as 9000-9099",
            )

    def test_loExceedsHi(self) -> None:
        """
        A range whose low end exceeds its high end is refused.
        """
        error = self.assertRaises(PortRangeError, parsePortRange, "9000-8000", "--tcp-ports")
        self.assertEqual(str(error), "--tcp-ports 9000-8000: LO must not exceed HI")
        error = self.assertRaises(PortRangeError, parsePortRange, "9001-9000", "--tcp-ports")
        self.assertEqual(str(error), "--tcp-ports 9001-9000: LO must not exceed HI")

    def test_outOfRange(self) -> None:
        """
        A range with a port outside 1-65535 is refused, however many digits it has.
        """
        for text in ["0-10", "65535-65536", "70000-60000", "1-" + "9" * 30]:
            error = self.assertRaises(PortRangeError, parsePortRange, text, "--udp-ports")
            self.assertEqual(str(error), f"--udp-ports {text}: ports must be between 1 and 65535")

    def test_withoutOption(self) -> None:
        """
        Without an option name, the message starts with the text.
        """
        error = self.assertRaises(PortRangeError, parsePortRange, "9000-8000")
        self.assertEqual(str(error), "9000-8000: LO must not exceed HI")

    def test_longTextShortened(self) -> None:
        """
        Long text is cut short in the message.
        """
        error = self.assertRaises(PortRangeError, parsePortRange, "9" * 100, "--tcp-ports")
        self.assertEqual(
            str(error),
            "--tcp-ports " + "9" * 37 + "...: expected LO-HI, two port numbers joined by '-', "
            "such as 9000-9099",
        )

    def test_valueError(self) -> None:
        """
        L{PortRangeError} is a L{ValueError}, so option parsers that coerce values report it.
        """
        self.assertIsInstance(PortRangeError("x"), ValueError)

    def test_constructorChecks(self) -> None:
        """
        L{PortRange} itself refuses bounds that do not make a range.
        """
        error = self.assertRaises(PortRangeError, PortRange, 9000, 8000)
        self.assertEqual(str(error), "9000-8000: LO must not exceed HI")
        error = self.assertRaises(PortRangeError, PortRange, 0, 10)
        self.assertEqual(str(error), "0-10: ports must be between 1 and 65535")

    @given(st.integers(1, 65535), st.integers(1, 65535))
    @deterministic
    def test_parseProperty(self, a: int, b: int) -> None:
        """
        Any two ports in order parse to their range, which reads back the same; out of order
        they are refused.
        """
        low, high = min(a, b), max(a, b)
        portRange = parsePortRange(f"{low}-{high}")
        self.assertEqual(portRange, PortRange(low, high))
        self.assertEqual(parsePortRange(str(portRange)), portRange)
        self.assertEqual(len(portRange), high - low + 1)
        if low != high:
            self.assertRaises(PortRangeError, parsePortRange, f"{high}-{low}")

    @given(st.text())
    @deterministic
    def test_parseAnything(self, text: str) -> None:
        """
        Arbitrary text either parses to a valid range or raises L{PortRangeError}; nothing else
        escapes.
        """
        try:
            portRange = parsePortRange(text)
        except PortRangeError:
            return
        self.assertTrue(1 <= portRange.low <= portRange.high <= 65535)


class PortAllocatorTests(SynchronousTestCase):
    """
    Tests for L{PortAllocator}'s allocation, release and lookups.
    """

    def setUp(self) -> None:
        """
        Make an allocator for ports 9000-9009 with a 3600 second reservation, at most three live
        ports per identity, on a fake clock.
        """
        self.clock = Clock()
        self.clock.advance(1000)
        self.ports = PortAllocator(
            PortRange(9000, 9009), self.clock, reservation=3600, maxPerIdentity=3
        )

    def test_defaults(self) -> None:
        """
        The reservation lasts an hour by default, and the parameters are kept.
        """
        ports = PortAllocator(PortRange(9000, 9009), self.clock)
        self.assertEqual(ports.reservation, 3600.0)
        self.assertEqual(ports.portRange, PortRange(9000, 9009))
        self.assertEqual(self.ports.maxPerIdentity, 3)

    def test_firstFree(self) -> None:
        """
        New keys get the lowest free ports in turn.
        """
        self.assertEqual(self.ports.allocate(ALICE, "ssh"), 9000)
        self.assertEqual(self.ports.allocate(ALICE, "game"), 9001)
        self.assertEqual(self.ports.allocate(BOB, "ssh"), 9002)
        self.assertEqual(self.ports.live, 3)

    def test_lowestGapAfterExpiry(self) -> None:
        """
        A port freed below others is the next one handed out.
        """
        for name in ["a", "b", "c"]:
            self.ports.allocate(ALICE, name)
        self.ports.release(ALICE, "b")
        self.clock.advance(3600)
        self.assertEqual(self.ports.allocate(BOB, "x"), 9001)
        self.assertEqual(self.ports.allocate(BOB, "y"), 9003)

    def test_idempotent(self) -> None:
        """
        Allocating a live key again returns its port, and neither takes another port nor counts
        against the identity's limit.
        """
        port = self.ports.allocate(ALICE, "ssh")
        for _ in range(5):
            self.assertEqual(self.ports.allocate(ALICE, "ssh"), port)
        self.assertEqual(self.ports.live, 1)
        self.assertEqual(self.ports.allocate(ALICE, "b"), 9001)
        self.assertEqual(self.ports.allocate(ALICE, "c"), 9002)

    def test_stickyAfterRelease(self) -> None:
        """
        A released port is reserved for its key: others get other ports, and the key gets it
        back, live again, within the reservation.
        """
        port = self.ports.allocate(ALICE, "ssh")
        self.assertEqual(self.ports.release(ALICE, "ssh"), port)
        self.assertIsNone(self.ports.owner(port))
        self.assertEqual(self.ports.allocate(BOB, "ssh"), 9001)
        self.assertEqual(self.ports.allocate(ALICE, "other"), 9002)
        self.clock.advance(3599.9)
        self.assertEqual(self.ports.allocate(ALICE, "ssh"), port)
        self.assertEqual(self.ports.owner(port), (ALICE, "ssh"))
        self.assertEqual(self.ports.live, 3)
        self.assertEqual(self.ports.reserved, 0)

    def test_reservationRenewedByEachRelease(self) -> None:
        """
        Each release starts a full reservation, counted from that release.
        """
        self.ports.allocate(ALICE, "ssh")
        self.ports.release(ALICE, "ssh")
        self.clock.advance(3000)
        self.ports.allocate(ALICE, "ssh")
        self.clock.advance(100)
        self.ports.release(ALICE, "ssh")
        self.clock.advance(3599)
        self.assertEqual(self.ports.allocate(BOB, "x"), 9001)
        self.assertEqual(self.ports.portFor(ALICE, "ssh"), 9000)

    def test_reservationExpiry(self) -> None:
        """
        Once the reservation has passed, the port goes to whoever asks next, and the old key gets
        the lowest port then free.
        """
        self.assertEqual(self.ports.allocate(ALICE, "ssh"), 9000)
        self.assertEqual(self.ports.allocate(BOB, "ssh"), 9001)
        self.ports.release(ALICE, "ssh")
        self.clock.advance(3600)
        self.assertEqual(self.ports.allocate(CAROL, "ssh"), 9000)
        self.assertEqual(self.ports.owner(9000), (CAROL, "ssh"))
        self.assertEqual(self.ports.allocate(ALICE, "ssh"), 9002)

    def test_expiredKeyMayGetSamePort(self) -> None:
        """
        A key whose reservation has passed gets the lowest free port, which may be its old one.
        """
        self.ports.allocate(ALICE, "a")
        self.ports.allocate(ALICE, "b")
        self.ports.release(ALICE, "a")
        self.clock.advance(4000)
        self.assertEqual(self.ports.allocate(ALICE, "a"), 9000)

    def test_zeroReservation(self) -> None:
        """
        With no reservation, a released port is free at once.
        """
        ports = PortAllocator(PortRange(9000, 9009), self.clock, reservation=0)
        ports.allocate(ALICE, "ssh")
        ports.release(ALICE, "ssh")
        self.assertEqual(ports.reserved, 0)
        self.assertEqual(ports.allocate(BOB, "ssh"), 9000)

    def test_releaseNotLive(self) -> None:
        """
        Releasing a key that is not live returns C{None} and neither reserves a port nor extends
        a reservation.
        """
        self.assertIsNone(self.ports.release(ALICE, "ssh"))
        self.assertEqual(self.ports.reserved, 0)
        self.assertEqual(self.ports.allocate(BOB, "ssh"), 9000)
        self.ports.release(BOB, "ssh")
        self.clock.advance(3000)
        self.assertIsNone(self.ports.release(BOB, "ssh"))
        self.clock.advance(600)
        self.assertIsNone(self.ports.portFor(BOB, "ssh"))
        self.assertEqual(self.ports.allocate(ALICE, "ssh"), 9000)

    def test_exhaustion(self) -> None:
        """
        When every port is live, a new key is refused with L{PortsExhausted}.
        """
        ports = PortAllocator(PortRange(9000, 9009), self.clock, maxPerIdentity=100)
        self.assertEqual(
            [ports.allocate(ALICE, str(i)) for i in range(10)], list(range(9000, 9010))
        )
        error = self.assertRaises(PortsExhausted, ports.allocate, BOB, "ssh")
        self.assertEqual(
            str(error),
            "no free port in 9000-9009: all 10 are live; one frees when a tunnel using one stops",
        )
        self.assertIsInstance(error, PortAllocationError)
        self.assertEqual(ports.allocate(ALICE, "3"), 9003)

    def test_exhaustedByReservations(self) -> None:
        """
        Reserved ports are not handed to new keys even when nothing else is free, but their own
        keys still get them back; once the reservations pass, the ports are free again.
        """
        ports = PortAllocator(PortRange(9000, 9001), self.clock)
        ports.allocate(ALICE, "a")
        ports.allocate(ALICE, "b")
        ports.release(ALICE, "a")
        ports.release(ALICE, "b")
        self.clock.advance(100)
        error = self.assertRaises(PortsExhausted, ports.allocate, BOB, "ssh")
        self.assertEqual(
            str(error),
            "no free port in 9000-9001: 0 live, 2 reserved; the next port frees in 3500 s",
        )
        self.assertEqual(ports.allocate(ALICE, "b"), 9001)
        self.clock.advance(3500)
        self.assertEqual(ports.allocate(BOB, "ssh"), 9000)

    def test_limit(self) -> None:
        """
        An identity holding C{maxPerIdentity} live ports is refused another with
        L{PortLimitReached}; other identities are not affected.
        """
        for name in ["a", "b", "c"]:
            self.ports.allocate(ALICE, name)
        error = self.assertRaises(PortLimitReached, self.ports.allocate, ALICE, "d")
        self.assertEqual(
            str(error),
            "identity already holds 3 live ports on this relay, the most allowed; "
            "close a tunnel before opening 'd'",
        )
        self.assertIsInstance(error, PortAllocationError)
        self.assertIsNone(self.ports.portFor(ALICE, "d"))
        self.assertEqual(self.ports.allocate(BOB, "d"), 9003)

    def test_limitCountsLiveOnly(self) -> None:
        """
        Reserved ports do not count against the limit: after a release, the identity may open
        another name while the released one stays reserved.
        """
        for name in ["a", "b", "c"]:
            self.ports.allocate(ALICE, name)
        self.ports.release(ALICE, "a")
        self.assertEqual(self.ports.allocate(ALICE, "d"), 9003)
        self.ports.release(ALICE, "b")
        self.assertEqual(self.ports.allocate(ALICE, "e"), 9004)
        self.assertEqual(self.ports.live, 3)
        self.assertEqual(self.ports.reserved, 2)

    def test_limitOnReservedKey(self) -> None:
        """
        Taking back a reserved port makes it live, so the limit applies; the refused key keeps its
        reservation.
        """
        for name in ["a", "b", "c"]:
            self.ports.allocate(ALICE, name)
        self.ports.release(ALICE, "a")
        self.ports.allocate(ALICE, "d")
        self.assertRaises(PortLimitReached, self.ports.allocate, ALICE, "a")
        self.assertEqual(self.ports.portFor(ALICE, "a"), 9000)
        self.ports.release(ALICE, "d")
        self.assertEqual(self.ports.allocate(ALICE, "a"), 9000)

    def test_limitCheckedBeforeExhaustion(self) -> None:
        """
        An identity at its limit is told so, even when the range is also full.
        """
        ports = PortAllocator(PortRange(9000, 9000), self.clock, maxPerIdentity=1)
        ports.allocate(ALICE, "a")
        self.assertRaises(PortLimitReached, ports.allocate, ALICE, "b")
        self.assertRaises(PortsExhausted, ports.allocate, BOB, "b")

    def test_portFor(self) -> None:
        """
        L{PortAllocator.portFor} gives a key's live or reserved port, and C{None} once the
        reservation has passed or for an unknown key.
        """
        self.assertIsNone(self.ports.portFor(ALICE, "ssh"))
        self.ports.allocate(ALICE, "ssh")
        self.assertEqual(self.ports.portFor(ALICE, "ssh"), 9000)
        self.assertIsNone(self.ports.portFor(BOB, "ssh"))
        self.assertIsNone(self.ports.portFor(ALICE, "web"))
        self.ports.release(ALICE, "ssh")
        self.clock.advance(3599)
        self.assertEqual(self.ports.portFor(ALICE, "ssh"), 9000)
        self.clock.advance(1)
        self.assertIsNone(self.ports.portFor(ALICE, "ssh"))

    def test_owner(self) -> None:
        """
        L{PortAllocator.owner} names the key a port is live for, and C{None} for a reserved,
        free or foreign port.
        """
        self.ports.allocate(ALICE, "ssh")
        self.ports.allocate(BOB, "ssh")
        self.assertEqual(self.ports.owner(9000), (ALICE, "ssh"))
        self.assertEqual(self.ports.owner(9001), (BOB, "ssh"))
        self.ports.release(ALICE, "ssh")
        self.assertIsNone(self.ports.owner(9000))
        self.assertIsNone(self.ports.owner(9005))
        self.assertIsNone(self.ports.owner(80))

    def test_counts(self) -> None:
        """
        C{live} and C{reserved} count live ports and unexpired reservations.
        """
        self.assertEqual((self.ports.live, self.ports.reserved), (0, 0))
        self.ports.allocate(ALICE, "a")
        self.ports.allocate(ALICE, "b")
        self.assertEqual((self.ports.live, self.ports.reserved), (2, 0))
        self.ports.release(ALICE, "a")
        self.assertEqual((self.ports.live, self.ports.reserved), (1, 1))
        self.clock.advance(1800)
        self.ports.release(ALICE, "b")
        self.assertEqual((self.ports.live, self.ports.reserved), (0, 2))
        self.clock.advance(1800)
        self.assertEqual((self.ports.live, self.ports.reserved), (0, 1))
        self.clock.advance(1800)
        self.assertEqual((self.ports.live, self.ports.reserved), (0, 0))

    def test_largeRange(self) -> None:
        """
        A range of 10,000 ports can be filled, emptied and filled again, in order.
        """
        ports = PortAllocator(PortRange(50000, 59999), self.clock, maxPerIdentity=10000)
        names = [str(i) for i in range(10000)]
        self.assertEqual([ports.allocate(ALICE, n) for n in names], list(range(50000, 60000)))
        self.assertRaises(PortsExhausted, ports.allocate, BOB, "x")
        for name in names:
            ports.release(ALICE, name)
        self.assertEqual((ports.live, ports.reserved), (0, 10000))
        self.assertEqual(ports.allocate(ALICE, "9999"), 59999)
        self.clock.advance(3600)
        self.assertEqual([ports.allocate(BOB, n) for n in names[:9999]], list(range(50000, 59999)))
        self.assertEqual((ports.live, ports.reserved), (10000, 0))

    def test_flappingKeyBoundedMemory(self) -> None:
        """
        A key made live and released over and over, within one reservation, keeps one
        reservation and does not grow the allocator's bookkeeping without bound.
        """
        for _ in range(10000):
            self.ports.allocate(ALICE, "ssh")
            self.ports.release(ALICE, "ssh")
        self.assertEqual(self.ports.reserved, 1)
        # White box: the queue of reservation ends is compacted as it fills with stale entries.
        self.assertLess(len(self.ports._ends), 200)
        self.clock.advance(3600)
        self.assertEqual(self.ports.allocate(BOB, "ssh"), 9000)


def _assignments(ports: PortAllocator, keys: list[tuple[str, str]]) -> dict[tuple[str, str], int]:
    """
    List the ports of some keys.

    @param ports: An allocator.
    @param keys: The keys to look up.
    @return: The port, live or reserved, of each key that has one.
    """
    result = {}
    for identity, name in keys:
        port = ports.portFor(identity, name)
        if port is not None:
            result[identity, name] = port
    return result


def _roundTrip(data: dict[str, Any]) -> Any:
    """
    @param data: A JSON-serialisable value.
    @return: C{data} written as JSON text and read back.
    """
    return json.loads(json.dumps(data))


#: The range most persistence tests use.
TEN_PORTS = PortRange(9000, 9009)


class PersistenceTests(SynchronousTestCase):
    """
    L{PortAllocator} writes every assignment through to its store and starts from it, as after a
    relay restart.
    """

    def setUp(self) -> None:
        """
        Make an allocator for ports 9000-9009 on a store, holding two live ports, one reserved
        and one whose reservation has passed.
        """
        self.clock = Clock()
        self.clock.advance(1000)
        self.store = MemoryLeaseStore()
        self.ports = self.restart()
        self.ports.allocate(ALICE, "old")
        self.ports.allocate(ALICE, "ssh")
        self.ports.allocate(BOB, "game")
        self.ports.allocate(BOB, "ssh")
        self.ports.release(ALICE, "old")
        self.clock.advance(3000)
        self.ports.release(BOB, "game")
        self.clock.advance(600)

    def restart(self, portRange: PortRange = TEN_PORTS, **kw: Any) -> PortAllocator:
        """
        @return: A new allocator of C{portRange} on the test's store.
        """
        kw.setdefault("reservation", 3600)
        return PortAllocator(portRange, self.clock, store=self.store, kind="udp", **kw)

    def test_records(self) -> None:
        """
        The store holds a record per live or reserved port, of the allocator's kind, and none for
        an ended reservation.
        """
        self.assertEqual(self.ports.reserved, 1)
        self.assertEqual(
            sorted(self.store.ports("udp"), key=lambda record: record.port),
            [
                PortRecord("udp", 9001, ALICE, "ssh", 1000),
                PortRecord("udp", 9002, BOB, "game", 1000, 4000, 7600),
                PortRecord("udp", 9003, BOB, "ssh", 1000),
            ],
        )
        self.assertEqual(list(self.store.ports("tcp")), [])

    def test_restoredAsReserved(self) -> None:
        """
        After a restart every saved assignment is reserved, not live: others cannot take the
        ports, and each key gets its own port back when it allocates again.
        """
        restored = self.restart()
        self.assertEqual((restored.live, restored.reserved), (0, 3))
        for port in [9001, 9002, 9003]:
            self.assertIsNone(restored.owner(port))
        self.assertEqual(restored.allocate(CAROL, "a"), 9000)
        self.assertEqual(restored.allocate(CAROL, "b"), 9004)
        self.assertEqual(restored.allocate(BOB, "ssh"), 9003)
        self.assertEqual(restored.allocate(BOB, "game"), 9002)
        self.assertEqual(restored.allocate(ALICE, "ssh"), 9001)
        self.assertEqual(restored.owner(9001), (ALICE, "ssh"))

    def test_reservationsAfterRestart(self) -> None:
        """
        Ports live when the relay stopped are reserved from the restart; reserved ones keep the
        end they had.
        """
        self.clock.advance(2999)
        restored = self.restart()
        self.assertEqual(restored.portFor(BOB, "game"), 9002)
        self.clock.advance(1)
        self.assertIsNone(restored.portFor(BOB, "game"))
        self.clock.advance(3598)
        self.assertEqual(restored.reserved, 2)
        self.clock.advance(1)
        self.assertEqual(restored.reserved, 0)
        self.assertEqual(list(self.store.ports("udp")), [])

    def test_longDowntime(self) -> None:
        """
        Reservations that ended while the relay was down are dropped at start, from the store too.
        """
        self.clock.advance(100000)
        restored = self.restart()
        self.assertEqual((restored.live, restored.reserved), (0, 2))
        self.assertIsNone(restored.portFor(BOB, "game"))
        self.assertEqual(sorted(record.port for record in self.store.ports("udp")), [9001, 9003])

    def test_limitRestored(self) -> None:
        """
        C{maxPerIdentity} is passed on, and restored reservations do not count against it.
        """
        restored = self.restart(maxPerIdentity=1)
        self.assertEqual(restored.maxPerIdentity, 1)
        self.assertEqual(restored.allocate(BOB, "ssh"), 9003)
        self.assertRaises(PortLimitReached, restored.allocate, BOB, "game")

    def test_rangeChanged(self) -> None:
        """
        Assignments outside a changed range are dropped, from the store too; those inside stay
        reserved and the rest of the new range is free.
        """
        restored = self.restart(PortRange(9002, 9005))
        self.assertEqual(restored.reserved, 2)
        self.assertIsNone(restored.portFor(ALICE, "ssh"))
        self.assertEqual(restored.portFor(BOB, "game"), 9002)
        self.assertEqual(restored.allocate(ALICE, "ssh"), 9004)
        self.assertEqual(restored.allocate(CAROL, "x"), 9005)
        self.assertRaises(PortsExhausted, restored.allocate, CAROL, "y")
        self.assertEqual(
            sorted(record.port for record in self.store.ports("udp")), [9002, 9003, 9004, 9005]
        )

    def test_storeRefusesClaim(self) -> None:
        """
        A free port the store holds for another lease (another relay sharing the store took it)
        is skipped for the next one; a reserved port the store holds for another lease is refused,
        and the allocator is unchanged.
        """
        ports = PortAllocator(PortRange(9000, 9001), self.clock, store=self.store, kind="tcp")
        now = self.clock.seconds()
        self.store.claimPort(PortRecord("tcp", 9000, CAROL, "x", now), now)
        self.assertEqual(ports.allocate(ALICE, "ssh"), 9001)
        ports.release(ALICE, "ssh")
        self.store.dropPort("tcp", 9001, ALICE, "ssh")
        self.store.claimPort(PortRecord("tcp", 9001, CAROL, "y", now), now)
        error = self.assertRaises(PortAllocationError, ports.allocate, ALICE, "ssh")
        self.assertEqual(str(error), "port 9001 is held by another relay sharing the store")
        self.assertEqual((ports.live, ports.portFor(ALICE, "ssh")), (0, 9001))


class GivingUpTests(SynchronousTestCase):
    """
    Releasing a port never fails because of the store.
    """

    def test_releaseAndExpiryLogged(self) -> None:
        """
        A release and a reservation's end that the store cannot record still happen in the
        allocator, and are logged; the store's stale claim keeps the port from others (never
        handing it to two leases) until a restart reads it back as a reservation.
        """
        clock = Clock()
        store = FailingStore(broken=False)
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        ports = PortAllocator(PortRange(9000, 9000), clock, reservation=10, store=store)
        ports.allocate(ALICE, "ssh")
        store.broken = True
        self.assertEqual(ports.release(ALICE, "ssh"), 9000)
        self.assertEqual(ports.portFor(ALICE, "ssh"), 9000)
        clock.advance(10)
        self.assertEqual(ports.reserved, 0)
        self.assertEqual(
            [formatEvent(event) for event in events],
            ["lease store did not record a tcp port given up: disk full"] * 2,
        )
        store.broken = False
        error = self.assertRaises(PortsExhausted, ports.allocate, BOB, "x")
        self.assertEqual(
            str(error),
            "no free port in 9000-9000: 0 are live and 1 held in the lease store for other "
            "leases; one frees when a tunnel using one stops",
        )
        self.assertIn(
            "tcp port 9000 is held in the lease store for another lease; it is not handed out "
            "until the relay restarts",
            [formatEvent(event) for event in events],
        )
        restarted = PortAllocator(PortRange(9000, 9001), clock, reservation=10, store=store)
        self.assertEqual(restarted.portFor(ALICE, "ssh"), 9000)
        self.assertEqual(restarted.allocate(BOB, "x"), 9001)


class ImportJSONTests(SynchronousTestCase):
    """
    Tests for L{PortAllocator.importJSON}: the C{ports.json} of earlier relays.
    """

    def setUp(self) -> None:
        """
        An allocator for ports 9000-9009 on a store, with one live port.
        """
        self.clock = Clock()
        self.clock.advance(1000)
        self.store = MemoryLeaseStore()
        self.ports = PortAllocator(PortRange(9000, 9009), self.clock, store=self.store)
        self.ports.allocate(CAROL, "x")

    def test_imported(self) -> None:
        """
        Assignments come back reserved for the reservation period, in the store too; ports outside
        the range and ports or keys already held are left out.
        """
        data = {
            "version": STATE_VERSION,
            "ports": [
                {"port": 9003, "identity": ALICE, "name": "ssh"},
                {"port": 9001, "identity": BOB, "name": "game"},
                {"port": 9000, "identity": BOB, "name": "web"},
                {"port": 9005, "identity": CAROL, "name": "x"},
                {"port": 8000, "identity": CAROL, "name": "y"},
            ],
        }
        self.assertEqual(self.ports.importJSON(_roundTrip(data)), 2)
        self.assertEqual((self.ports.live, self.ports.reserved), (1, 2))
        self.assertEqual(self.ports.allocate(BOB, "new"), 9002)
        self.assertEqual(self.ports.allocate(BOB, "another"), 9004)
        self.assertEqual(self.ports.allocate(ALICE, "ssh"), 9003)
        self.assertEqual(
            sorted((r.port, r.identity, r.name) for r in self.store.ports("tcp")),
            [
                (9000, CAROL, "x"),
                (9001, BOB, "game"),
                (9002, BOB, "new"),
                (9003, ALICE, "ssh"),
                (9004, BOB, "another"),
            ],
        )
        self.clock.advance(3600)
        self.assertIsNone(self.ports.portFor(BOB, "game"))

    def test_malformed(self) -> None:
        """
        A file not in the format earlier relays wrote is refused with a message saying what is
        wrong, and nothing of it is imported.
        """

        def entry(**kw: Any) -> dict[str, Any]:
            """
            @return: A valid entry, with C{kw} changed.
            """
            return {"port": 9001, "identity": ALICE, "name": "ssh"} | kw

        def state(*entries: Any) -> dict[str, Any]:
            """
            @return: A file's content with C{entries}.
            """
            return {"version": STATE_VERSION, "ports": list(entries)}

        cases: list[tuple[Any, str]] = [
            ([], "port state is not a version 1 port table"),
            ({"ports": []}, "port state is not a version 1 port table"),
            ({"version": 2, "ports": []}, "port state is not a version 1 port table"),
            ({"version": STATE_VERSION}, "port state has no 'ports' list"),
            ({"version": STATE_VERSION, "ports": {}}, "port state has no 'ports' list"),
            (state(entry(), 5), "port state entry 1 is not an object"),
            (state(entry(port="9000")), "port state entry 0 lacks a valid port, identity or name"),
            (state(entry(port=True)), "port state entry 0 lacks a valid port, identity or name"),
            (state(entry(port=9000.0)), "port state entry 0 lacks a valid port, identity or name"),
            (
                state(entry(identity=None)),
                "port state entry 0 lacks a valid port, identity or name",
            ),
            (
                state({"port": 9000, "identity": ALICE}),
                "port state entry 0 lacks a valid port, identity or name",
            ),
            (state(entry(), entry(name="web")), "port state assigns port 9001 twice"),
            (
                state(entry(), entry(port=9002)),
                "port state assigns two ports to name 'ssh' of one identity",
            ),
        ]
        for data, message in cases:
            error = self.assertRaises(PortStateError, self.ports.importJSON, data)
            self.assertEqual(str(error), message)
            self.assertIsInstance(error, ValueError)
            self.assertEqual(self.ports.reserved, 0)


class PressureTests(SynchronousTestCase):
    """
    Reservations cannot empty a range: short-lived ports earn only the grace period, and with no
    port free the oldest reservation past its grace period goes to the newcomer.
    """

    def setUp(self) -> None:
        """
        Ports 9000-9002, an hour's reservation earned after 600 seconds, a 60 second grace period.
        """
        self.clock = Clock()
        self.clock.advance(1000)
        self.store = MemoryLeaseStore()
        self.ports = PortAllocator(
            PortRange(9000, 9002),
            self.clock,
            reservation=3600,
            maxPerIdentity=10,
            reserveAfter=600,
            grace=60,
            store=self.store,
        )
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def test_shortLivedGetsGraceOnly(self) -> None:
        """
        A port released before C{reserveAfter} stays its key's for the grace period only.
        """
        self.ports.allocate(ALICE, "a")
        self.clock.advance(599)
        self.ports.release(ALICE, "a")
        self.clock.advance(59)
        self.assertEqual(self.ports.portFor(ALICE, "a"), 9000)
        self.clock.advance(1)
        self.assertIsNone(self.ports.portFor(ALICE, "a"))
        self.assertEqual(list(self.store.ports("tcp")), [])

    def test_longLivedGetsReservation(self) -> None:
        """
        A port held for C{reserveAfter} seconds stays its key's for the whole reservation while
        ports are free.
        """
        self.ports.allocate(ALICE, "a")
        self.clock.advance(600)
        self.ports.release(ALICE, "a")
        self.clock.advance(3599)
        self.assertEqual(self.ports.portFor(ALICE, "a"), 9000)

    def test_oldestGivenUpFirst(self) -> None:
        """
        With no port free, the oldest reservation past its grace period goes to a new key, and
        the event is logged; younger ones stay.
        """
        for name in "abc":
            self.ports.allocate(ALICE, name)
        self.clock.advance(600)
        self.ports.release(ALICE, "b")
        self.clock.advance(10)
        self.ports.release(ALICE, "a")
        self.clock.advance(10)
        self.ports.release(ALICE, "c")
        self.clock.advance(60)
        self.assertEqual(self.ports.allocate(BOB, "x"), 9001)
        self.assertIsNone(self.ports.portFor(ALICE, "b"))
        self.assertEqual(self.ports.portFor(ALICE, "a"), 9000)
        self.assertEqual(self.ports.allocate(BOB, "y"), 9000)
        self.assertEqual(self.ports.portFor(ALICE, "c"), 9002)
        self.assertEqual(
            sorted((r.port, r.identity, r.name) for r in self.store.ports("tcp")),
            [(9000, BOB, "y"), (9001, BOB, "x"), (9002, ALICE, "c")],
        )
        given = [e for e in self.events if "given up" in e.get("log_format", "")]
        self.assertEqual(
            [(e["port"], e["name"], e["age"]) for e in given], [(9001, "b", 80), (9000, "a", 70)]
        )

    def test_graceProtects(self) -> None:
        """
        Reservations younger than the grace period are kept; the refusal says when the next port
        frees.
        """
        for name in "abc":
            self.ports.allocate(ALICE, name)
        self.clock.advance(600)
        for name in "abc":
            self.ports.release(ALICE, name)
        self.clock.advance(45)
        error = self.assertRaises(PortsExhausted, self.ports.allocate, BOB, "x")
        self.assertEqual(
            str(error), "no free port in 9000-9002: 0 live, 3 reserved; the next port frees in 15 s"
        )
        self.clock.advance(15)
        self.assertEqual(self.ports.allocate(BOB, "x"), 9000)

    def test_squattersCannotEmptyRange(self) -> None:
        """
        Keys that take ports and drop them at once, over and over, leave the range usable: a new
        key gets a port within the grace period.
        """
        for round in range(5):
            for i in range(3):
                try:
                    self.ports.allocate(CAROL, f"{round}-{i}")
                except PortsExhausted:
                    continue
                self.ports.release(CAROL, f"{round}-{i}")
            self.clock.advance(1)
        self.clock.advance(60)
        self.assertIn(self.ports.allocate(ALICE, "real"), self.ports.portRange)


#: Identities and names used by the property tests: few, so that keys collide often.
_IDENTITIES = [ALICE, BOB, CAROL]
_NAMES = ["ssh", "game", "dns"]
_KEYS = [(identity, name) for identity in _IDENTITIES for name in _NAMES]

_operations = st.lists(
    st.one_of(
        st.tuples(st.just("allocate"), st.sampled_from(_KEYS)),
        st.tuples(st.just("release"), st.sampled_from(_KEYS)),
        st.tuples(st.just("advance"), st.integers(0, 150)),
    ),
    max_size=60,
)


@attrs.define
class _Model:
    """
    A slow, obvious allocator to check L{PortAllocator} against.

    @ivar low: The lowest port.
    @ivar high: The highest port.
    @ivar reservation: Seconds a released port stays reserved.
    @ivar limit: Most live ports per identity.
    @ivar now: The current time.
    @ivar entries: Each key's port and the end of its reservation, or C{None} while it is live.
    """

    low: int
    high: int
    reservation: int
    limit: int
    now: float = 0.0
    entries: dict[tuple[str, str], tuple[int, float | None]] = attrs.Factory(dict)

    def _current(self) -> dict[tuple[str, str], tuple[int, float | None]]:
        """
        @return: The entries that are live or still reserved.
        """
        return {
            key: (port, until)
            for key, (port, until) in self.entries.items()
            if until is None or self.now < until
        }

    def allocate(self, key: tuple[str, str]) -> int | type[Exception]:
        """
        @param key: The key to allocate for.
        @return: Its port, or the type of exception the allocator should raise.
        """
        self.entries = self._current()
        entry = self.entries.get(key)
        if entry is not None and entry[1] is None:
            return entry[0]
        held = sum(1 for k, (_, u) in self.entries.items() if k[0] == key[0] and u is None)
        if held >= self.limit:
            return PortLimitReached
        if entry is not None:
            port = entry[0]
        else:
            used = {port for port, _ in self.entries.values()}
            free = [p for p in range(self.low, self.high + 1) if p not in used]
            if not free:
                return PortsExhausted
            port = free[0]
        self.entries[key] = (port, None)
        return port

    def release(self, key: tuple[str, str]) -> int | None:
        """
        @param key: The key whose lease lapsed.
        @return: The port that stopped being live, if any.
        """
        entry = self.entries.get(key)
        if entry is None or entry[1] is not None:
            return None
        self.entries[key] = (entry[0], self.now + self.reservation)
        return entry[0]


def _run(
    testCase: SynchronousTestCase,
    ports: PortAllocator,
    model: _Model,
    clock: Clock,
    operations: list[tuple[str, Any]],
) -> None:
    """
    Apply operations to an allocator and a model, checking after each that they agree and that
    no port is given to two keys.

    @param testCase: The test to report failures to.
    @param ports: The allocator.
    @param model: The model, in the same state.
    @param clock: The allocator's clock.
    @param operations: C{("allocate", key)}, C{("release", key)} or C{("advance", seconds)}.
    """
    for operation, argument in operations:
        if operation == "allocate":
            expected = model.allocate(argument)
            if isinstance(expected, int):
                port = ports.allocate(*argument)
                testCase.assertEqual(port, expected)
                testCase.assertIn(port, ports.portRange)
                testCase.assertEqual(ports.owner(port), argument)
            else:
                testCase.assertRaises(expected, ports.allocate, *argument)
        elif operation == "release":
            testCase.assertEqual(ports.release(*argument), model.release(argument))
        else:
            clock.advance(argument)
            model.now += argument
        current = model._current()
        live = {key: port for key, (port, until) in current.items() if until is None}
        testCase.assertEqual(_assignments(ports, _KEYS), {k: p for k, (p, _) in current.items()})
        testCase.assertEqual((ports.live, ports.reserved), (len(live), len(current) - len(live)))
        owners = {port: ports.owner(port) for port in ports.portRange}
        testCase.assertEqual(
            {port: key for port, key in owners.items() if key is not None},
            {port: key for key, port in live.items()},
        )
        allPorts = [port for port, _ in current.values()]
        testCase.assertEqual(len(allPorts), len(set(allPorts)))


class PortAllocatorPropertyTests(SynchronousTestCase):
    """
    Property tests for L{PortAllocator}: random sequences of allocations, releases and clock
    advances, checked against a simple model.
    """

    @given(
        st.integers(1, 6),
        st.sampled_from([0, 10, 100]),
        st.integers(1, 4),
        _operations,
    )
    @deterministic
    def test_matchesModel(
        self, size: int, reservation: int, limit: int, operations: list[tuple[str, Any]]
    ) -> None:
        """
        Every result and refusal matches the model; every allocated port is in range; no port is
        live or reserved for two keys; lookups and counts agree with the model throughout.
        """
        clock = Clock()
        ports = PortAllocator(
            PortRange(9000, 9000 + size - 1), clock, reservation=reservation, maxPerIdentity=limit
        )
        model = _Model(9000, 9000 + size - 1, reservation, limit)
        _run(self, ports, model, clock, operations)

    @given(_operations, st.sampled_from(_KEYS), st.integers(0, 99), _operations)
    @deterministic
    def test_stickyWhileReserved(
        self,
        before: list[tuple[str, Any]],
        key: tuple[str, str],
        wait: int,
        others: list[tuple[str, Any]],
    ) -> None:
        """
        Whatever happened before, and whatever other keys do meanwhile, a key released less than
        the reservation ago gets its old port back.
        """
        clock = Clock()
        ports = PortAllocator(PortRange(9000, 9011), clock, reservation=100, maxPerIdentity=4)
        for operation, argument in before:
            if operation == "advance":
                clock.advance(argument)
            else:
                try:
                    getattr(ports, operation)(*argument)
                except PortAllocationError:
                    pass
        # Twelve ports for nine keys, and a limit above three names: the key always gets a port.
        port = ports.allocate(*key)
        ports.release(*key)
        clock.advance(wait)
        elapsed = 0
        for operation, argument in others:
            if operation == "advance":
                step = min(argument, 99 - wait - elapsed)
                clock.advance(step)
                elapsed += step
            elif argument != key:
                try:
                    getattr(ports, operation)(*argument)
                except PortAllocationError:
                    pass
        self.assertIsNone(ports.owner(port))
        self.assertEqual(ports.allocate(*key), port)

    @given(
        st.integers(1, 6),
        st.integers(1, 6),
        _operations,
        st.integers(0, 1000),
    )
    @deterministic
    def test_persistence(
        self, size: int, newSize: int, operations: list[tuple[str, Any]], downtime: int
    ) -> None:
        """
        After any history and a restart on the same store, possibly with a smaller or larger
        range and after any downtime, every key keeps the port it had, if that is still in range
        and its reservation has not ended (live ports are reserved from the restart), and new keys
        get the lowest other ports.
        """
        clock = Clock()
        store = MemoryLeaseStore()
        ports = PortAllocator(PortRange(9000, 9000 + size - 1), clock, reservation=100, store=store)
        model = _Model(9000, 9000 + size - 1, 100, 10)
        _run(self, ports, model, clock, operations)
        clock.advance(downtime)
        restart = clock.seconds()
        newRange = PortRange(9000, 9000 + newSize - 1)
        restored = PortAllocator(newRange, clock, reservation=100, store=store)
        kept = {
            key: (port, restart + 100 if until is None else until)
            for key, (port, until) in model.entries.items()
            if port in newRange and (until is None or restart < until)
        }
        self.assertEqual(
            _assignments(restored, _KEYS), {key: port for key, (port, _) in kept.items()}
        )
        self.assertEqual((restored.live, restored.reserved), (0, len(kept)))
        model = _Model(9000, 9000 + newSize - 1, 100, 10, now=restart, entries=kept)
        _run(self, restored, model, clock, operations)
