"""
C{python -m benchmarks [--quick] [--only N,N] [--out DIR]}: run the benchmark scenarios on 127.0.0.1
and write C{DIR/<date>.json} and C{DIR/<date>.md} (and a PNG chart when matplotlib is installed); a
run of some scenarios only writes C{DIR/<date>-only-N-N.*}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

from benchmarks import scenarios, underattack
from benchmarks.lab import Lab
from benchmarks.procs import raiseFileLimit
from benchmarks.report import evaluateTargets, markdown, writeChart

#: The scenarios built, in the order they run (scenario 3l is new HTTP visitors through localtunnel
#: and Portal, 6a raw TCP throughput, 6b UDP, 6c raw TCP new connections, 8 the lease store, 9 the
#: service under attack).
DEFAULT = ("1", "2", "3", "3l", "4", "5", "6a", "6b", "6c", "7", "8", "9")


def _log(message: str) -> None:
    """
    Progress on standard error.
    """
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """
    Run the scenarios and write the results.

    @return: The exit code.
    """
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, under 2 minutes")
    parser.add_argument(
        "--only",
        default=",".join(DEFAULT),
        help=f"comma-separated scenario numbers (default all built: {','.join(DEFAULT)})",
    )
    parser.add_argument(
        "--out", default=os.path.join(os.path.dirname(__file__), "results"), help="results folder"
    )
    args = parser.parse_args(argv)
    settings = scenarios.QUICK if args.quick else scenarios.FULL
    wanted = {n.strip() for n in args.only.split(",") if n.strip()}
    unknown = wanted - set(DEFAULT)
    if unknown:
        parser.error(f"unknown scenario {', '.join(sorted(unknown))}; built: {','.join(DEFAULT)}")
    limit = raiseFileLimit(1 << 20)
    started = time.monotonic()
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "kernel": platform.release(),
            "openFileLimit": limit,
        },
        "settings": {
            "runs": settings.runs,
            "bulkBytes": settings.bulkBytes,
            "fullPathBytes": settings.fullPathBytes,
            "connections": settings.connections,
            "concurrency": list(settings.concurrency),
            "leases": settings.leases,
            "rawTCPBytes": settings.rawTCPBytes,
            "udpSeconds": settings.udpSeconds,
            "storeRecords": settings.storeRecords,
            "attackSeconds": settings.attackSeconds,
        },
        "scenarios": {},
        "notBuilt": scenarios.NOT_BUILT,
    }
    plan: list[tuple[str, str, Callable[[Lab], dict[str, Any]]]] = [
        ("1", "relayHop", lambda lab: scenarios.relayHop(lab, settings, _log)),
        ("2", "fullPath", lambda lab: scenarios.fullPath(lab, settings, _log)),
        ("3", "connectionSetup", lambda lab: scenarios.connectionSetup(lab, settings, _log)),
        ("3l", "localtunnel", lambda lab: scenarios.localtunnelSetup(lab, settings, _log)),
        ("4", "concurrency", lambda lab: scenarios.concurrency(lab, settings, limit, _log)),
        ("5", "routedHTTP", lambda lab: scenarios.routedHTTP(lab, settings, _log)),
        ("6a", "rawTCP", lambda lab: scenarios.rawTCP(lab, settings, _log)),
        ("6b", "udp", lambda lab: scenarios.udp(lab, settings, _log)),
        ("6c", "rawTCPConnections", lambda lab: scenarios.rawTCPConnections(lab, settings, _log)),
        ("7", "leaseScale", lambda lab: scenarios.leaseScale(lab, settings, _log)),
        ("8", "storeScale", lambda lab: scenarios.storeScale(lab, settings, _log)),
        (
            "9",
            "underAttack",
            lambda lab: underattack.underAttack(lab, settings.attackSeconds, _log),
        ),
    ]
    for number, name, run in plan:
        if number not in wanted:
            continue
        lab = Lab()
        try:
            results["scenarios"][name] = run(lab)
        except Exception as e:  # A broken scenario is reported, and the others still run.
            _log(f"scenario {number} ({name}) failed: {e}")
            results["scenarios"][name] = {"error": str(e)}
        finally:
            lab.close()
    results["seconds"] = time.monotonic() - started
    results["targets"] = evaluateTargets(results)
    os.makedirs(args.out, exist_ok=True)
    # A run of some scenarios is named after them, so that it does not replace the day's full run.
    partial = "" if wanted == set(DEFAULT) else "-only-" + "-".join(sorted(wanted))
    stem = os.path.join(args.out, results["date"][:10] + ("-quick" if args.quick else "") + partial)
    with open(stem + ".json", "w") as f:
        json.dump(results, f, indent=2, sort_keys=True)
    table = markdown(results)
    with open(stem + ".md", "w") as f:
        f.write(table)
    chart = writeChart(results, stem + ".png")
    print(table)
    _log(
        f"wrote {stem}.json, {stem}.md"
        + (f", {chart}" if chart else "")
        + f" in {results['seconds']:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
