"""
Turning benchmark results into the issue's target verdicts, a Markdown table and a chart.
"""

from __future__ import annotations

from typing import Any


def _median(entry: dict[str, Any], key: str) -> float | None:
    """
    The median of a summarised figure, if present.
    """
    value = entry.get(key)
    return None if value is None else float(value["median"])


def _target(
    name: str, value: float | None, limit: float, higherIsBetter: bool, unit: str
) -> dict[str, Any]:
    """
    One target verdict.
    """
    if value is None:
        return {"target": name, "value": None, "limit": limit, "met": None, "unit": unit}
    met = value >= limit if higherIsBetter else value <= limit
    return {"target": name, "value": round(value, 3), "limit": limit, "met": met, "unit": unit}


def evaluateTargets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """
    The issue's targets, as ratios measured in this run.
    """
    targets = []
    hop = results["scenarios"].get("relayHop", {}).get("paths", {})
    portal, haproxy = hop.get("portal"), hop.get("haproxy")
    if portal and haproxy:
        for direction in ("uploadMBps", "downloadMBps"):
            ratio = _median(portal, direction) / _median(haproxy, direction)  # type: ignore[operator]
            targets.append(
                _target(f"relay hop {direction[:-4]} throughput vs HAProxy", ratio, 1.0, True, "x")
            )
        cpu = _median(portal, "forwarderCpuNsPerByte") / _median(haproxy, "forwarderCpuNsPerByte")  # type: ignore[operator]
        targets.append(_target("relay CPU per byte vs HAProxy", cpu, 1.0, False, "x"))
    setup = results["scenarios"].get("connectionSetup", {}).get("paths", {})
    if "portal" in setup and "haproxy" in setup and setup["haproxy"]["addedP50us"] > 0:
        ratio = setup["portal"]["addedP50us"] / setup["haproxy"]["addedP50us"]
        targets.append(
            _target("added time to first byte (p50) vs HAProxy's", ratio, 1.5, False, "x")
        )
    levels = results["scenarios"].get("concurrency", {}).get("levels", [])
    if levels:
        largest = max(levels, key=lambda level: level["connections"])
        targets.append(
            _target(
                f"relay memory per idle connection at {largest['connections']}",
                largest["relayBytesPerConnection"] / 1024,
                8.0,
                False,
                "KiB",
            )
        )
    routed = results["scenarios"].get("routedHTTP", {}).get("paths", {})
    if "portal" in routed:
        targets.append(
            _target(
                "routed HTTP requests/s through relay + tunnel",
                routed["portal"]["requestsPerSecond"],
                10000,
                True,
                "req/s",
            )
        )
        targets.append(
            _target("routed HTTP p99 latency", routed["portal"]["p99us"] / 1000, 20, False, "ms")
        )
    full = results["scenarios"].get("fullPath", {}).get("paths", {})
    if "portal (relay + tunnel)" in full and "twisted TLS server" in full:
        for direction in ("uploadMBps", "downloadMBps"):
            ratio = _median(full["portal (relay + tunnel)"], direction) / _median(  # type: ignore[operator]
                full["twisted TLS server"], direction
            )
            targets.append(
                _target(
                    f"full path {direction[:-4]} throughput vs direct TLS", ratio, 0.6, True, "x"
                )
            )
    raw = results["scenarios"].get("rawTCP", {}).get("ratio", {})
    for direction in ("upload", "download"):
        if direction in raw:
            targets.append(
                _target(
                    f"raw TCP {direction} throughput through relay + tunnel vs direct",
                    raw[direction],
                    0.5,
                    True,
                    "x",
                )
            )
    return targets


def _fmt(value: Any, digits: int = 0) -> str:
    """
    A number for a table cell.
    """
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def markdown(results: dict[str, Any]) -> str:
    """
    The results as Markdown tables.
    """
    out = [
        f"# Portal benchmarks, {results['date']}{' (quick)' if results['quick'] else ''}",
        "",
        f"{results['machine']['cpus']} CPUs, Python {results['machine']['python']}, Linux "
        f"{results['machine']['kernel']}, open-file limit {results['machine']['openFileLimit']}. "
        f"Medians of {results['settings']['runs']} interleaved runs. Took {results['seconds']:.0f} s.",
        "",
        "## Targets",
        "",
        "| target | measured | limit | met |",
        "|---|---|---|---|",
    ]
    for t in results["targets"]:
        met = {True: "yes", False: "**no**", None: "-"}[t["met"]]
        out.append(
            f"| {t['target']} | {_fmt(t['value'], 2)} {t['unit']} | {t['limit']} {t['unit']} | {met} |"
        )
    scenarios = results["scenarios"]
    for key, title in (
        ("relayHop", "1. Relay hop throughput"),
        ("fullPath", "2. Full path throughput"),
    ):
        data = scenarios.get(key)
        if not data:
            continue
        out += ["", f"## {title}", ""]
        if "error" in data:
            out.append(f"Failed: {data['error']}")
            continue
        out += [
            f"{data['bytes'] >> 20} MiB per run, one TLS 1.3 connection.",
            "",
            "| path | upload MB/s | download MB/s | forwarder CPU ns/byte |",
            "|---|---|---|---|",
        ]
        for name, entry in data["paths"].items():
            out.append(
                f"| {name} | {_fmt(_median(entry, 'uploadMBps'))} | {_fmt(_median(entry, 'downloadMBps'))} "
                f"| {_fmt(_median(entry, 'forwarderCpuNsPerByte'), 2)} |"
            )
        out += [f"- {note}" for note in data.get("notes", [])]
    data = scenarios.get("connectionSetup")
    if data:
        out += ["", "## 3. Connection setup", ""]
        if "error" in data:
            out.append(f"Failed: {data['error']}")
        else:
            out += [
                f"{data['connectionsPerPath']} sequential TLS 1.3 connections per path, 1-byte exchange. "
                f"Visitors that had to wait for a data session: {data['visitorsThatWaitedForADataSession']:.0f}.",
                "",
                "| path | connections/s | TTFB p50 µs | TTFB p99 µs | added p50 µs | added p99 µs |",
                "|---|---|---|---|---|---|",
            ]
            for name, e in data["paths"].items():
                out.append(
                    f"| {name} | {_fmt(e['connectionsPerSecond'])} | {_fmt(e['ttfbP50us'])} | "
                    f"{_fmt(e['ttfbP99us'])} | {_fmt(e.get('addedP50us'))} | {_fmt(e.get('addedP99us'))} |"
                )
    data = scenarios.get("concurrency")
    if data:
        out += ["", "## 4. Idle connections", ""]
        if "error" in data:
            out.append(f"Failed: {data['error']}")
        else:
            out += [
                "| connections | opened/s | relay KiB/conn | tunnel KiB/conn | relay RSS MiB | tunnel RSS MiB |",
                "|---|---|---|---|---|---|",
            ]
            for level in data["levels"]:
                out.append(
                    f"| {level['connections']} | {_fmt(level['openedPerSecond'])} | "
                    f"{_fmt(level['relayBytesPerConnection'] / 1024, 1)} | "
                    f"{_fmt(level['tunnelBytesPerConnection'] / 1024, 1)} | "
                    f"{_fmt(level['relayRssMiB'], 1)} | {_fmt(level['tunnelRssMiB'], 1)} |"
                )
            out += [f"- {note}" for note in data.get("notes", [])]
    data = scenarios.get("routedHTTP")
    if data:
        out += ["", "## 5. Routed HTTP", ""]
        if "error" in data:
            out.append(f"Failed: {data['error']}")
        else:
            out += [
                "wrk, 2 threads, 16 keep-alive connections, 1 KiB responses from nginx.",
                "",
                "| path | requests/s | p50 µs | p99 µs | errors |",
                "|---|---|---|---|---|",
            ]
            for name, e in data["paths"].items():
                out.append(
                    f"| {name} | {_fmt(e['requestsPerSecond'])} | {_fmt(e['p50us'])} | "
                    f"{_fmt(e['p99us'])} | {_fmt(e['errors'])} |"
                )
            out += [f"- {note}" for note in data.get("notes", [])]
    data = scenarios.get("leaseScale")
    if data:
        out += ["", "## 7. Lease scale", ""]
        if "error" in data:
            out.append(f"Failed: {data['error']}")
        else:
            out += [
                f"{data['leases']} leases registered in {data['registrationSeconds']:.2f} s "
                f"({_fmt(data['registrationsPerSecond'])}/s). Relay TTFB p50 with 10 leases "
                f"{_fmt(data['ttfbP50usWith10'])} µs, with {data['leases']}: "
                f"{_fmt(data['ttfbP50usWithMany'])} µs (ratio {data['routingCostRatio']:.2f}).",
            ]
    data = scenarios.get("rawTCP")
    if data:
        out += ["", "## 6a. Raw TCP throughput", ""]
        if "error" in data:
            out.append(f"Failed: {data['error']}")
        else:
            out += [
                f"{data['bytes'] >> 20} MiB up then {data['bytes'] >> 20} MiB down per run, one plain "
                "TCP connection each, to a plain sink: directly, and through the relay's public TCP "
                "port and `portal expose --tcp`. CPU in seconds per GB moved (cores busy).",
                "",
                "| path | direction | MB/s | vs direct | relay CPU s/GB | tunnel CPU s/GB "
                "| sink CPU s/GB |",
                "|---|---|---|---|---|---|---|",
            ]
            for name, entry in data["paths"].items():
                for direction in ("upload", "download"):
                    d = direction.title()
                    ratio = data["ratio"][direction] if name != "direct" else None
                    cells = [
                        _cpuCell(entry, f"{who}CpuSecondsPerGB{d}", f"{who}Cores{d}")
                        for who in ("relay", "tunnel", "sink")
                    ]
                    out.append(
                        f"| {name} | {direction} | {_fmt(_median(entry, f'{direction}MBps'))} "
                        f"| {_fmt(ratio, 2)} | {' | '.join(cells)} |"
                    )
            other = {name: _median(entry, "otherCores") for name, entry in data["paths"].items()}
            out.append(
                "- other work on the machine during the runs (median cores): "
                + ", ".join(f"{name} {value:.2f}" for name, value in other.items())
            )
            out.append(
                f"- relay streams spliced in Python: {data['relayPythonSplicedStreams']:.0f}, "
                f"by the kernel: {data['relayKernelSplicedStreams']:.0f}"
            )
            out += [f"- {note}" for note in data.get("notes", [])]
    out += ["", "## Not measured", ""]
    out += [f"- {name}: {why}" for name, why in results["notBuilt"].items()]
    return "\n".join(out) + "\n"


def _cpuCell(entry: dict[str, Any], perGB: str, cores: str) -> str:
    """
    A table cell: median CPU seconds per GB, with the median share of one core in brackets.
    """
    if perGB not in entry:
        return "-"
    return f"{_median(entry, perGB):.2f} ({_median(entry, cores):.2f})"


def writeChart(results: dict[str, Any], path: str) -> str | None:
    """
    A bar chart of the throughput scenarios, when matplotlib is installed.

    @return: The path written, or L{None}.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    panels = [
        (key, title)
        for key, title in (
            ("relayHop", "Relay hop"),
            ("fullPath", "Full path"),
            ("rawTCP", "Raw TCP"),
        )
        if results["scenarios"].get(key, {}).get("paths")
    ]
    if not panels:
        return None
    figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for axis, (key, title) in zip(axes[0], panels, strict=True):
        paths = results["scenarios"][key]["paths"]
        names = list(paths)
        positions = range(len(names))
        up = [_median(paths[n], "uploadMBps") or 0 for n in names]
        down = [_median(paths[n], "downloadMBps") or 0 for n in names]
        axis.bar([p - 0.2 for p in positions], up, 0.4, label="upload")
        axis.bar([p + 0.2 for p in positions], down, 0.4, label="download")
        axis.set_xticks(list(positions), names, rotation=20, ha="right", fontsize=8)
        axis.set_ylabel("MB/s")
        axis.set_title(title)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path
