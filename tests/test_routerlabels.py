"""
Tests for L{portal.relay.router.Router.poolFor}'s table of lease labels by SNI hostname.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from portal.relay import router as routerModule
from portal.relay.router import Router
from portal.trust.identity import Identity


class _Holder:
    mode = "stream"
    pool = object()


class _Lease:
    holder = _Holder()


class LabelTableTests(SynchronousTestCase):
    """
    Hostnames are checked once and their labels remembered, in a bounded table; what a label routes
    to is looked up every time.
    """

    def setUp(self) -> None:
        self.router = Router(Identity.generate(), Clock())
        self.routed: list[str] = []
        self.live: set[str] = set()

        def route(label: str) -> Any:
            self.routed.append(label)
            return _Lease() if label in self.live else None

        self.patch(self.router.leases, "route", route)

    def test_leaseFoundAfterwards(self) -> None:
        """
        A name asked for before its lease was live is found once it is: only the label is
        remembered, not the answer.
        """
        self.assertIsNone(self.router.poolFor("app.localhost"))
        self.live.add("app")
        self.assertIs(self.router.poolFor("app.localhost"), _Holder.pool)
        self.assertEqual(self.routed, ["app", "app"])

    def test_notALabel(self) -> None:
        """
        A hostname outside the tunnel domain, or not one valid label, routes nowhere, remembered
        too.
        """
        for name in ("example.com", "a.b.localhost", "-x.localhost"):
            self.assertIsNone(self.router.poolFor(name))
            self.assertIsNone(self.router.poolFor(name))
        self.assertEqual(self.routed, [])

    def test_bounded(self) -> None:
        """
        The table holds at most L{routerModule.LABELS_REMEMBERED} names: a flood of made-up names
        empties it rather than growing it.
        """
        self.patch(routerModule, "LABELS_REMEMBERED", 3)
        for i in range(10):
            self.router.poolFor(f"n{i}.localhost")
            self.assertLessEqual(len(self.router._labels), 3)
        self.assertIsNone(self.router.poolFor("n9.localhost"))
