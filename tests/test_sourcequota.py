"""
Tests for L{portal.relay.sourcequota}.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from portal.relay.sourcequota import OverQuota, SourceQuota


class SourceQuotaTests(SynchronousTestCase):
    """
    A source holds at most C{limit} things that are still held; things no longer held are not
    counted.
    """

    def setUp(self) -> None:
        """
        A quota of 3 over a set of held things the test controls.
        """
        self.held: set[str] = set()
        self.quota: SourceQuota[str] = SourceQuota(3, self.held.__contains__, "lease names")

    def hold(self, source: str, *things: str) -> None:
        """
        Check and add C{things} for C{source}, as a registration does, and mark them held.
        """
        self.quota.check(source, things)
        self.held.update(things)
        self.quota.add(source, things)

    def test_limit(self) -> None:
        """
        A source may hold up to the limit; one more is refused with a message giving both numbers,
        and another source is not affected.
        """
        self.hold("10.0.0.2", "a", "b", "c")
        error = self.assertRaises(OverQuota, self.quota.check, "10.0.0.2", ["d"])
        self.assertEqual((error.held, error.limit), (3, 3))
        self.assertIn("already holds 3 lease names", str(error))
        self.assertIn("at most 3", str(error))
        self.hold("10.0.0.3", "d", "e", "f")

    def test_heldAgainCostsNothing(self) -> None:
        """
        Registering again what the source holds already is not a new thing.
        """
        self.hold("10.0.0.2", "a", "b", "c")
        self.quota.check("10.0.0.2", ["a", "c"])

    def test_batchCounted(self) -> None:
        """
        One registration of several things is refused if together they exceed the quota.
        """
        self.hold("10.0.0.2", "a", "b")
        self.assertRaises(OverQuota, self.quota.check, "10.0.0.2", ["c", "d"])
        self.quota.check("10.0.0.2", ["c", "c"])

    def test_releasedThingsFree(self) -> None:
        """
        Once the holding table no longer holds a thing (its reservation ended), it stops counting.
        """
        self.hold("10.0.0.2", "a", "b", "c")
        self.held.discard("b")
        self.quota.check("10.0.0.2", ["d"])
        self.assertEqual(self.quota.holding("10.0.0.2"), 2)

    def test_moved(self) -> None:
        """
        A thing registered again from another source counts for the new source only.
        """
        self.hold("10.0.0.2", "a", "b", "c")
        self.hold("10.0.0.3", "a")
        self.assertEqual(self.quota.holding("10.0.0.2"), 2)
        self.assertEqual(self.quota.holding("10.0.0.3"), 1)

    def test_sweep(self) -> None:
        """
        L{SourceQuota.sweep} forgets everything no longer held, of every source.
        """
        self.hold("10.0.0.2", "a", "b")
        self.hold("10.0.0.3", "c")
        self.held.clear()
        self.held.add("b")
        self.assertEqual(self.quota.sweep(), 2)
        self.assertEqual(len(self.quota), 1)

    def test_limitChecked(self) -> None:
        """
        A quota below 1 is refused.
        """
        self.assertRaises(ValueError, SourceQuota, 0, bool, "ports")
