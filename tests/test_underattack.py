"""
Tests for L{benchmarks.underattack}, the benchmark's "service under attack" scenario, and its
report: what the attackers held is judged against the limits that bound it, and the verdicts and
tables say what was measured.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from benchmarks.report import evaluateTargets, markdown
from benchmarks.underattack import (
    LIMITS,
    _comparison,
    _mergeAttacks,
    _pool,
    _quotas,
    _refusals,
    _slowBySecond,
    _visitorFigures,
)


def _flood(held: int) -> dict[str, Any]:
    """
    An idle flood's figures, holding C{held} connections at the end.
    """
    return {
        "attempts": 1000,
        "failed": 0,
        "refusedAtOnce": 700,
        "maxHeld": held,
        "heldAtEnd": held,
        "closedAfterHolding": 20,
        "closedAfterSecondsMedian": 10.1,
        "closedAfterSecondsMax": 10.3,
    }


def _attack(publicHeld: int = 256, names: int = 8, issued: int = 390) -> dict[str, Any]:
    """
    An attacker's result for a 10-second attack.
    """
    return {
        "seconds": 10.0,
        "idle": {name: _flood(128) for name in ("public", "site (stalled ClientHello)")}
        | {name: _flood(256) for name in ("http", "control", "tcp")},
        "heldPeakByListener": {"public": publicHeld, "http": 256, "control": 256, "tcp": 256},
        "names": {"tried": 300, "held": names, "refused": {"proof of work above 16 bits": 292}},
        "ports": {"tried": 60, "held": 8, "refused": {}},
        "challenges": {"asked": 10000, "issued": issued, "sessions": 1, "refused": {}},
        "udp": {"ports": 500, "sent": 16000, "failed": 0},
    }


def _rawPhase(p99: float, succeeded: int = 200, busy: float = 20.0) -> dict[str, Any]:
    """
    A phase's raw figures with one visitor whose 200 visits took C{p99 / 2} seconds but for the
    slowest 2% (C{p99}), of which C{200 - succeeded} failed.
    """
    ttfbs = [p99 / 2] * 196 + [p99] * 4
    return {
        "seconds": 10.0,
        "ttfbs": {"stream": ttfbs[:succeeded]},
        "failures": {"stream": Counter({"TimeoutError: timed out": 200 - succeeded})},
        "gauges": {'portal_relay_listener_connections_open{listener="public"}': 259.0},
        "held": {"public": 256},
        "cpuSeconds": {"relay": 1.0},
        "waitSeconds": {"relay": 2.0},
        "busySeconds": busy,
        "loadAverage1m": 9.0,
        "newTunnelLeaseSeconds": 1.5,
        "relayLogLines": 400,
    }


def _phase(p99: float, succeeded: int = 200) -> dict[str, Any]:
    """
    The pooled figures of one phase like L{_rawPhase} (times in microseconds).
    """
    pooled = _pool([_rawPhase(p99 / 1e6, succeeded)])
    pooled["relayLogLines"] = 400
    return pooled


#: The connections the relay held from the flood's address, by listener.
_HELD = {"public": 256, "http": 256, "control": 256, "tcp": 256}


class QuotasTests(SynchronousTestCase):
    """
    L{_quotas} judges each holding against its limit.
    """

    def test_withinTheLimits(self) -> None:
        """
        Connections at the per-source cap, names and challenges under what the rate limits allow
        in the attack's time, are all within; the relay's gauge peak is quoted beside them.
        """
        rows = _quotas(_attack(), _HELD, _phase(1.0)["gaugePeaks"])
        self.assertTrue(all(row["within"] for row in rows), rows)
        public = rows[0]
        self.assertEqual(
            (public["limit"], public["held"], public["relayGaugePeak"]), (256, 256, 259.0)
        )

    def test_overTheLimits(self) -> None:
        """
        One connection over the cap held by the relay (whatever the attacker saw), more names than
        the registration rate lets through in the attack's time (burst 20 + 2/s x 10 s), or more
        challenges than their rate, are not within.
        """
        rows = _quotas(_attack(names=41, issued=401), _HELD | {"public": 257}, {})
        over = [row["what"] for row in rows if not row["within"]]
        self.assertEqual(len(over), 3, over)
        self.assertIn("public TLS port", over[0])
        self.assertIn("lease names", over[1])
        self.assertIn("challenges", over[2])

    def test_limitsQuoted(self) -> None:
        """
        The limits the rows are judged against are the ones the relay is started with.
        """
        rows = _quotas(_attack(), _HELD, {})
        ports = [row for row in rows if "raw TCP ports" in row["what"]][0]
        self.assertEqual(ports["limit"], LIMITS["max-ports-per-source"])


class FiguresTests(SynchronousTestCase):
    """
    The scenario's arithmetic on C{/metrics} and on the phases.
    """

    def test_refusals(self) -> None:
        """
        L{_refusals} keeps the refusal counters, by reason, and nothing else.
        """
        values = {
            'portal_refusals_total{reason="connections_per_source"}': 5.0,
            "portal_relay_leases": 3.0,
        }
        self.assertEqual(_refusals(values), {"connections_per_source": 5.0})

    def test_comparison(self) -> None:
        """
        L{_comparison} gives the success rates and the ratio of each percentile under attack to
        the quiet one.
        """
        figures = _comparison(_phase(1000.0), _phase(3000.0, succeeded=199))["stream"]
        self.assertEqual(figures["p99Ratio"], 3.0)
        self.assertEqual(figures["successPercentQuiet"], 100.0)
        self.assertEqual(figures["successPercentAttacked"], 99.5)


class PoolingTests(SynchronousTestCase):
    """
    Phases of one kind, and attack blocks, taken together.
    """

    def test_visitorFigures(self) -> None:
        """
        L{_visitorFigures} counts failed visits against the success rate and takes percentiles
        of the successful ones only.
        """
        figures = _visitorFigures([0.001] * 99 + [0.5], Counter({"TimeoutError": 1}))
        self.assertEqual((figures["visits"], figures["succeeded"]), (101, 100))
        self.assertAlmostEqual(figures["successPercent"], 100 * 100 / 101)
        self.assertEqual((figures["ttfbP50us"], figures["ttfbP99us"]), (1000.0, 1000.0))
        self.assertEqual(figures["ttfbMaxUs"], 500000.0)

    def test_pool(self) -> None:
        """
        L{_pool} takes every visit of every phase together, sums CPU and wait, keeps the peaks,
        and gives the machine's busy cores over the phases' whole time.
        """
        pooled = _pool([_rawPhase(0.01), _rawPhase(0.03, succeeded=198, busy=10.0)])
        stream = pooled["visitors"]["stream"]
        self.assertEqual((stream["visits"], stream["succeeded"]), (400, 398))
        self.assertEqual(stream["ttfbP99us"], 15000.0)
        self.assertEqual(pooled["cpuSeconds"], {"relay": 2.0})
        self.assertEqual(pooled["heldPeaks"], {"public": 256})
        self.assertEqual(pooled["machineBusyCores"], 1.5)
        self.assertEqual(pooled["newTunnelLeaseSeconds"], [1.5, 1.5])

    def test_slowBySecond(self) -> None:
        """
        L{_slowBySecond} counts, by whole second of the phase, the visits slower than twice their
        visitor's quiet p99 (the last second takes any visit that began after the phase's end).
        """
        quiet = _pool([_rawPhase(0.01)])
        phase = {
            "ttfbs": {"stream": [0.005, 0.025, 0.021, 0.019, 0.5]},
            "offsets": {"stream": [0.0, 0.1, 1.5, 2.0, 3.2]},
        }
        self.assertEqual(_slowBySecond(phase, quiet, 3.0), [1, 1, 1])

    def test_mergeAttacks(self) -> None:
        """
        L{_mergeAttacks} sums what the blocks tried and keeps, for what was held at once, the
        largest of any block (each block is judged against one block's limits).
        """
        merged = _mergeAttacks([_attack(names=8, issued=390), _attack(names=12, issued=380)])
        self.assertEqual(merged["blocks"], 2)
        self.assertEqual(merged["names"]["held"], 12)
        self.assertEqual(merged["names"]["heldInAll"], 20)
        self.assertEqual(merged["names"]["tried"], 600)
        self.assertEqual(merged["challenges"]["issued"], 390)
        self.assertEqual(merged["challenges"]["issuedInAll"], 770)
        self.assertEqual(merged["idle"]["public"]["attempts"], 2000)
        self.assertEqual(merged["udp"]["sent"], 32000)


class ReportTests(SynchronousTestCase):
    """
    Scenario 9 in the targets and the Markdown.
    """

    def results(self, attacked: dict[str, Any], attack: dict[str, Any]) -> dict[str, Any]:
        """
        Results of a run of scenario 9 alone, with one attack block.
        """
        quiet = _phase(1000.0)
        attack = _mergeAttacks([attack])
        data = {
            "seconds": 10.0,
            "blockSeconds": 10.0,
            "nice": 0,
            "visitorSource": "127.0.0.3",
            "quiet": quiet,
            "attacked": attacked,
            "phases": [
                {
                    "attacked": False,
                    "ttfbP99us": {"stream": 1000.0},
                    "machineBusyCores": 2.0,
                    "loadAverage1m": 9.0,
                    "slowBySecond": [3, 0],
                },
            ],
            "comparison": _comparison(quiet, attacked),
            "attack": attack,
            "refusalsDuringAttack": {"connections_per_source": 3000.0},
            "quotas": _quotas(attack, attacked["heldPeaks"] | _HELD, attacked["gaugePeaks"]),
            "udpCounters": {"udp_to_tunnel": 2000.0, "udp_dropped": 0.0},
            "notes": ["a note"],
        }
        return {
            "date": "2026-12-07T09:00:00+00:00",
            "quick": True,
            "machine": {"cpus": 2, "python": "3.11", "kernel": "6", "openFileLimit": 20000},
            "settings": {"runs": 5},
            "seconds": 40.0,
            "scenarios": {"underAttack": data},
            "notBuilt": {},
        }

    def test_targetsMet(self) -> None:
        """
        Every visit succeeding, p99 within twice the quiet one and every holding within its limit
        meet the three targets.
        """
        targets = evaluateTargets(self.results(_phase(2000.0), _attack()))
        self.assertEqual([t["met"] for t in targets], [True, True, True], targets)

    def test_targetsMissed(self) -> None:
        """
        A failed visit, a p99 over twice the quiet one, or a holding over its limit each miss
        their target.
        """
        targets = evaluateTargets(self.results(_phase(2500.0, succeeded=199), _attack(names=99)))
        self.assertEqual([t["met"] for t in targets], [False, False, False], targets)
        self.assertEqual(targets[2]["value"], 1)

    def test_markdown(self) -> None:
        """
        The Markdown has the scenario's section with the visitors per phase, the ratios, the
        holdings against their limits, the refusals and the notes.
        """
        results = self.results(_phase(2500.0, succeeded=199), _attack(names=99))
        results["targets"] = evaluateTargets(results)
        text = markdown(results)
        self.assertIn("## 9. Service under attack", text)
        self.assertIn("| stream | under attack | 200 | 99.5% | 1,250 | 2,500 | 2,500 |", text)
        self.assertIn("1 x TimeoutError: timed out", text)
        self.assertIn("| stream | 2.50 | 2.50 |", text)
        self.assertIn("| quiet | 1,000 | 2.00 | 9.0 |", text)
        self.assertIn("| phase | 0-1 s | 1-2 s |", text)
        self.assertIn("| quiet | 3 | 0 |", text)
        self.assertIn("| 40 | 99 | - | - | **no** |", text)
        self.assertIn("connections_per_source 3,000", text)
        self.assertIn("- a note", text)
