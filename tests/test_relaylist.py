"""
Tests for L{portal.cli.relays}: what C{portal relays} checks and prints, with fake health checks and
descriptors served by L{treq.testing.StubTreq}.
"""

from __future__ import annotations

import json
from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from portal.cli.relays import RelayStatus, formatJSON, formatTable, surveyRegistry
from portal.registry.descriptor import signDescriptor
from portal.registry.document import Registry, RegistryEntry
from portal.registry.health import Health
from portal.trust.identity import Identity
from tests.test_descriptor import ISSUED, describe
from tests.test_registry import Static


class SurveyTests(SynchronousTestCase):
    """
    L{surveyRegistry} health-checks every relay and checks the descriptors the registry points to.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(ISSUED + 60)
        self.identities = [Identity.generate() for _ in range(4)]
        self.site = Resource()
        self.checked: list[tuple[RegistryEntry, frozenset[str]]] = []
        self.healths: dict[str, Health] = {}

    def entry(self, index: int, modes: tuple[str, ...] = ("stream",), **kw: Any) -> RegistryEntry:
        """
        @return: A registry entry for relay C{index}.
        """
        return RegistryEntry(
            f"r{index}.example", 4017, self.identities[index].id, frozenset(modes), **kw
        )

    def serve(self, name: str, content: bytes, code: int = 200) -> str:
        """
        Serve C{content} at C{/name}.

        @return: Its URL.
        """
        self.site.putChild(name.encode("ascii"), Static(content, code))
        return f"http://relays.example/{name}"

    def check(self, reactor: Any, entry: RegistryEntry, modes: Any) -> Deferred[Health]:
        """
        A fake health check: healthy unless set otherwise in C{self.healths}.
        """
        self.checked.append((entry, frozenset(modes)))
        return succeed(self.healths.get(entry.id, Health(True, "ok", 0.0125, entry.id)))

    def survey(self, *entries: RegistryEntry) -> list[RelayStatus]:
        """
        Survey a registry of C{entries}.
        """
        stub = StubTreq(self.site)
        results: list[Any] = []
        surveyRegistry(
            self.clock, Registry("reg.json", entries), check=self.check, http=stub
        ).addBoth(results.append)
        stub.flush()
        [statuses] = results
        return list(statuses)

    def test_healthChecksEveryRelay(self) -> None:
        """
        Every relay is checked for the modes its entry lists; results keep the registry's order.
        """
        down = Health(False, "cannot connect: refused")
        self.healths[self.identities[1].id] = down
        entries = [self.entry(0, ("stream", "tcp")), self.entry(1), self.entry(2)]
        statuses = self.survey(*entries)
        self.assertEqual([s.entry for s in statuses], entries)
        self.assertEqual(
            self.checked, [(e, e.modes) for e in entries], "each entry checked with its modes"
        )
        self.assertEqual([s.ok for s in statuses], [True, False, True])
        self.assertEqual(statuses[1].reason, "cannot connect: refused")
        self.assertIsNone(statuses[0].descriptor)

    def test_descriptorOK(self) -> None:
        """
        A descriptor that verifies for the entry's id and offers its modes is C{ok}.
        """
        identity = self.identities[0]
        url = self.serve("d0", signDescriptor(identity, describe(identity, issued=ISSUED)))
        [status] = self.survey(self.entry(0, ("stream", "tcp"), descriptor=url))
        self.assertEqual(status.descriptor, "ok")
        self.assertTrue(status.ok)

    def test_descriptorOfAnotherRelay(self) -> None:
        """
        A descriptor signed by another relay makes the entry unhealthy.
        """
        other = self.identities[3]
        url = self.serve("d0", signDescriptor(other, describe(other, issued=ISSUED)))
        [status] = self.survey(self.entry(0, descriptor=url))
        self.assertFalse(status.ok)
        self.assertEqual(
            status.reason,
            f"descriptor: the descriptor is relay {other.id}'s, not {self.identities[0].id}'s",
        )

    def test_descriptorMissingMode(self) -> None:
        """
        An entry listing a mode the relay's descriptor does not offer is unhealthy.
        """
        identity = self.identities[0]
        url = self.serve("d0", signDescriptor(identity, describe(identity, modes=("stream",))))
        [status] = self.survey(self.entry(0, ("stream", "tcp", "udp"), descriptor=url))
        self.assertEqual(
            status.reason,
            "descriptor: the registry lists tcp, udp mode, which the relay does not offer",
        )

    def test_descriptorStale(self) -> None:
        """
        A descriptor issued more than a day ago (a replay) is refused.
        """
        identity = self.identities[0]
        url = self.serve("d0", signDescriptor(identity, describe(identity, issued=ISSUED)))
        self.clock.advance(86400)
        [status] = self.survey(self.entry(0, descriptor=url))
        self.assertIn("descriptor: the descriptor was issued", status.reason)
        self.assertIn("(stale)", status.reason)

    def test_descriptorUnavailable(self) -> None:
        """
        A descriptor URL that does not answer 200 makes the entry unhealthy, with the status.
        """
        url = self.serve("d0", b"gone", 404)
        [status] = self.survey(self.entry(0, descriptor=url))
        self.assertEqual(status.reason, "descriptor: HTTP 404 Not Found")

    def test_unhealthyFirst(self) -> None:
        """
        When both fail, the health check's reason is shown.
        """
        self.healths[self.identities[0].id] = Health(False, "no answer within 10 s")
        url = self.serve("d0", b"gone", 404)
        [status] = self.survey(self.entry(0, descriptor=url))
        self.assertEqual(status.reason, "no answer within 10 s")
        self.assertEqual(status.descriptor, "HTTP 404 Not Found")


class FormatTests(SynchronousTestCase):
    """
    L{formatTable} and L{formatJSON}.
    """

    def setUp(self) -> None:
        self.up = RelayStatus(
            RegistryEntry("r1.example", 4017, "a" * 52, frozenset({"udp", "stream"}), "eu"),
            Health(True, "ok", 0.01234, "a" * 52, ("stream",), "portal-relay/0.1.0"),
            "ok",
        )
        self.down = RelayStatus(
            RegistryEntry("2001:db8::1", 4018, "b" * 52, frozenset({"stream"})),
            Health(False, "cannot connect: refused"),
        )
        self.registry = Registry("reg.json", (self.up.entry, self.down.entry))

    def test_table(self) -> None:
        """
        The table has a summary line and one aligned row per relay: address, short id, modes,
        region, latency in ms, health.
        """
        self.assertEqual(
            formatTable(self.registry, [self.up, self.down]),
            "registry reg.json: 2 relays, 1 healthy\n"
            "ADDRESS             ID            MODES       REGION  LATENCY  HEALTH\n"
            "r1.example:4017     aaaaaaaaaaaa  stream,udp  eu      12.3 ms  ok\n"
            "[2001:db8::1]:4018  bbbbbbbbbbbb  stream      -       -        cannot connect: refused\n",
        )

    def test_json(self) -> None:
        """
        One JSON object per relay per line.
        """
        lines = formatJSON([self.up, self.down]).splitlines()
        self.assertEqual(
            [json.loads(line) for line in lines],
            [
                {
                    "address": "r1.example:4017",
                    "id": "a" * 52,
                    "modes": ["stream", "udp"],
                    "region": "eu",
                    "ok": True,
                    "health": "ok",
                    "latencyMs": 12.3,
                    "descriptor": "ok",
                    "software": "portal-relay/0.1.0",
                },
                {
                    "address": "[2001:db8::1]:4018",
                    "id": "b" * 52,
                    "modes": ["stream"],
                    "region": None,
                    "ok": False,
                    "health": "cannot connect: refused",
                    "latencyMs": None,
                    "descriptor": None,
                    "software": None,
                },
            ],
        )
