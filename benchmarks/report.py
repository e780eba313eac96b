"""
Turning benchmark results into the issue's target verdicts, a Markdown table and a chart.
"""

from __future__ import annotations

import itertools
from typing import Any

#: Issue 16's target for the largest UDP rate through relay + tunnel: twice the 30,000 datagrams/s
#: measured before it.
UDP_RATE_TARGET = 60000


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


#: Scenario 3's paths (L{benchmarks.scenarios.SETUP_STREAM}, L{benchmarks.scenarios.SETUP_RELAY}).
_STREAM, _RELAY_ONLY = "portal stream (relay + tunnel)", "portal relay only (bench tunnel)"


def _connectionTargets(setup: dict[str, Any]) -> list[dict[str, Any]]:
    """
    Issue 16's targets for a new stream-mode connection, against HAProxy in the same run.
    """
    targets = []
    haproxy = setup.get("haproxy")
    for name, words in ((_STREAM, "relay + tunnel"), (_RELAY_ONLY, "relay alone")):
        if name in setup and haproxy:
            # HAProxy's added time within the noise (zero or below) leaves no ratio to state.
            added = haproxy["addedP50us"]
            targets.append(
                _target(
                    f"added time to first byte (p50) of {words} vs HAProxy's",
                    setup[name]["addedP50us"] / added if added > 0 else None,
                    1.5,
                    False,
                    "x",
                )
            )
    stream = setup.get(_STREAM)
    if stream and haproxy and haproxy["cpuUsPerConnection"]["haproxy"] > 0:
        targets.append(
            _target(
                "relay CPU per new connection vs HAProxy's",
                stream["cpuUsPerConnection"]["relay"] / haproxy["cpuUsPerConnection"]["haproxy"],
                2.0,
                False,
                "x",
            )
        )
    if stream:
        targets.append(
            _target(
                "tunnel CPU per new TLS visitor",
                stream["cpuUsPerConnection"]["tunnel"] / 1000,
                1.0,
                False,
                "ms",
            )
        )
    return targets


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
    targets += _connectionTargets(results["scenarios"].get("connectionSetup", {}).get("paths", {}))
    levels = results["scenarios"].get("concurrency", {}).get("levels", [])
    if levels:
        largest = max(levels, key=lambda level: level["connections"])
        for who, limit in (("relay", 4.0), ("tunnel", 16.0)):
            targets.append(
                _target(
                    f"{who} memory per idle TLS visitor at {largest['connections']}",
                    largest[f"{who}BytesPerConnection"] / 1024,
                    limit,
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
    ratios = results["scenarios"].get("routedHTTP", {}).get("ratios", {})
    for key, name, limit in (
        ("portal vs HAProxy (wrk)", "routed HTTP requests/s vs HAProxy terminating TLS", 0.5),
        ("h2 -m1 vs HTTP/1.1", "HTTP/2 requests/s vs HTTP/1.1 on the same tunnel (h2load)", 0.8),
        ("h2 -m10 vs h2 -m1", "HTTP/2 with 10 streams per connection vs 1 (h2load)", 1.0),
    ):
        if key in ratios:
            targets.append(_target(name, ratios[key], limit, True, "x"))
    versus = results["scenarios"].get("localtunnel", {}).get("ratios", {})
    for q in ("p50", "p99"):
        # Issue 16: a new visitor's time to first byte no worse than localtunnel's.
        key = f"TTFB {q} portal / localtunnel"
        if key in versus:
            targets.append(
                _target(
                    f"new HTTP visitor TTFB ({q}) through portal --http vs localtunnel",
                    versus[key],
                    1.0,
                    False,
                    "x",
                )
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
    versus = results["scenarios"].get("rawTCP", {}).get("versusSSH", {})
    for direction in ("upload", "download"):
        if f"{direction}Throughput" in versus:
            targets.append(
                _target(
                    f"raw TCP {direction} throughput vs ssh -R",
                    versus[f"{direction}Throughput"],
                    2.0,
                    True,
                    "x",
                )
            )
            targets.append(
                _target(
                    f"raw TCP {direction} relay + tunnel CPU per GB vs sshd + ssh",
                    versus[f"{direction}Cpu"],
                    0.5,
                    False,
                    "x",
                )
            )
    loads = results["scenarios"].get("udp", {}).get("loads", {})
    for direction, words in (("upload", "visitor to service"), ("download", "service to visitor")):
        portal = loads.get("max", {}).get(direction, {}).get("portal (relay + tunnel)")
        if portal:
            targets.append(
                _target(
                    f"UDP maximum rate through relay + tunnel, {words} (2x issue 16's 30,000)",
                    _median(portal, "receivedPps"),
                    UDP_RATE_TARGET,
                    True,
                    "datagrams/s",
                )
            )
    for load, (direction, words) in itertools.product(
        ("100 Mbit/s", "200 Mbit/s"),
        (("upload", "visitor to service"), ("download", "service to visitor")),
    ):
        portal = loads.get(load, {}).get(direction, {}).get("portal (relay + tunnel)")
        if portal:
            targets.append(
                _target(
                    f"UDP loss at {load} through relay + tunnel, {words}",
                    _median(portal, "lossPercent"),
                    1.0,
                    False,
                    "%",
                )
            )
    store = results["scenarios"].get("storeScale", {})
    if "costRatio" in store:
        targets.append(
            _target(
                f"lease store: registration p50, last 100 of {store['records']} names vs the "
                f"first 100 (limit: 1.0 plus the 10% runs vary by on a shared machine)",
                store["costRatio"],
                1.1,
                False,
                "x",
            )
        )
    attack = results["scenarios"].get("underAttack", {})
    for name, figures in attack.get("comparison", {}).items():
        targets.append(
            _target(
                f"under attack: {name}, visits that succeeded",
                figures["successPercentAttacked"],
                100.0,
                True,
                "%",
            )
        )
        targets.append(
            _target(
                f"under attack: {name}, TTFB p99 vs the quiet relay",
                figures["p99Ratio"],
                2.0,
                False,
                "x",
            )
        )
    if "quotas" in attack:
        over = sum(1 for row in attack["quotas"] if not row["within"])
        targets.append(
            _target("under attack: attackers' holdings over their limits", over, 0, False, "rows")
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
                f"{data['connectionsPerPath']:,} sequential new TLS 1.3 connections per path, each "
                "with a 1-byte exchange, paths alternating in blocks of 50. Visitors that had to "
                f"wait for a data session: {data['visitorsThatWaitedForADataSession']:.0f}.",
                "",
                *_connectionTable(data),
            ]
    data = scenarios.get("localtunnel")
    if data:
        out += ["", "## 3l. New HTTP visitors: localtunnel and Portal", ""]
        if "error" in data:
            out.append(f"Failed: {data['error']}")
        else:
            out += [
                f"{data['requestsPerPath']:,} sequential new connections per path, each with one "
                "HTTP/1.1 GET of a 1 KiB body, paths alternating in blocks of 50 (conn/s: "
                "requests/s, one request per connection). The machine's load average (1, 5, "
                "15 min) was "
                + _loads(data.get("loadAverage", {}).get("before"))
                + " before and "
                + _loads(data.get("loadAverage", {}).get("after"))
                + " after.",
                "",
                *_connectionTable(data),
                "",
                "| Portal / localtunnel | ratio |",
                "|---|---|",
                *(f"| {name} | {_fmt(value, 2)} |" for name, value in data["ratios"].items()),
            ]
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
                "| path | requests/s | p50 µs | p99 µs | errors | proxy CPU µs per request |",
                "|---|---|---|---|---|---|",
            ]
            for name, e in data["paths"].items():
                out.append(
                    f"| {name} | {_fmt(e['requestsPerSecond'])} | {_fmt(e['p50us'])} | "
                    f"{_fmt(e['p99us'])} | {_fmt(e['errors'])} | "
                    f"{_fmt(e.get('proxyCpuUsPerRequest'))} |"
                )
            if data.get("h2load"):
                out += [
                    "",
                    "h2load on the same tunnel, same run, 16 connections:",
                    "",
                    "| run | requests/s | mean µs per request | failed | tunnel CPU µs per request |",
                    "|---|---|---|---|---|",
                ]
                for name, e in data["h2load"].items():
                    out.append(
                        f"| {name} | {_fmt(e['requestsPerSecond'])} | {_fmt(e['meanUs'])} | "
                        f"{_fmt(e['failed'])} | {_fmt(e['tunnelCpuUsPerRequest'])} |"
                    )
                out += [""] + [
                    f"- {name}: {value:.2f}x" for name, value in data.get("ratios", {}).items()
                ]
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
    data = scenarios.get("storeScale")
    if data:
        out += ["", "## 8. Lease store scale", ""]
        if "error" in data:
            out.append(f"Failed: {data['error']}")
        else:
            out += [
                f"{data['records']} names registered in the SQLite lease store through the relay's "
                f"lease table ({_fmt(data['registrationsPerSecond'])}/s). Registration p50: "
                f"{data['registerP50usFirst100']:.1f} µs for the first 100, "
                f"{data['registerP50usLast100']:.1f} µs for the last 100 (ratio "
                f"{data['costRatio']:.2f}, runs: {', '.join(map(str, data['costRatios']))}); p99 "
                f"over all {data['registerP99usAll']:.1f} µs. "
                f"Renewal p50: {data['renewP50usFirst100']:.1f} µs first 100, "
                f"{data['renewP50usLast100']:.1f} µs last 100. Store size "
                f"{data['storeBytes'] / 1e6:.1f} MB.",
            ]
    data = scenarios.get("rawTCP")
    if data:
        out += ["", "## 6a. Raw TCP throughput", ""]
        if "error" in data:
            out.append(f"Failed: {data['error']}")
        else:
            out += _rawTCPSection(data)
    data = scenarios.get("rawTCPConnections")
    if data:
        out += ["", "## 6c. Raw TCP new connections", ""]
        if "error" in data:
            out.append(f"Failed: {data['error']}")
        else:
            out += [
                f"{data['connectionsPerPath']:,} sequential new plain TCP connections per path, "
                "each with a 1-byte exchange, paths alternating in blocks of 50.",
                "",
                *_connectionTable(data),
            ]
    data = scenarios.get("udp")
    if data:
        out += ["", "## 6b. UDP throughput and loss", ""]
        if "error" in data:
            out.append(f"Failed: {data['error']}")
        else:
            out += _udpSection(data)
    data = scenarios.get("underAttack")
    if data:
        out += ["", "## 9. Service under attack", ""]
        if "error" in data:
            out.append(f"Failed: {data['error']}")
        else:
            out += _attackSection(data)
    if results["notBuilt"]:
        out += ["", "## Not measured", ""]
        out += [f"- {name}: {why}" for name, why in results["notBuilt"].items()]
    return "\n".join(out) + "\n"


_DIRECTIONS = {"upload": "visitor to service", "download": "service to visitor"}


def _loads(values: list[float] | None) -> str:
    """
    A load average triple for a sentence.
    """
    return "-" if not values else " / ".join(f"{value:.2f}" for value in values)


def _connectionTable(data: dict[str, Any]) -> list[str]:
    """
    Scenarios 3's and 6c's Markdown: rate, time to first byte, the time added to the direct path and
    each process's CPU per new connection, per path, then the notes.
    """
    out = [
        "| path | conn/s | TTFB p50 µs | TTFB p99 µs | added p50 µs | added p99 µs | "
        "CPU µs per connection | other cores |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, e in data["paths"].items():
        cpu = ", ".join(f"{who} {_fmt(value)}" for who, value in e["cpuUsPerConnection"].items())
        out.append(
            f"| {name} | {_fmt(e['connectionsPerSecond'])} | {_fmt(e['ttfbP50us'])} | "
            f"{_fmt(e['ttfbP99us'])} | {_fmt(e.get('addedP50us'))} | {_fmt(e.get('addedP99us'))} "
            f"| {cpu} | {_fmt(e.get('otherCores'), 2)} |"
        )
    return out + [f"- {note}" for note in data.get("notes", [])]


def _rawTCPSection(data: dict[str, Any]) -> list[str]:
    """
    Scenario 6a's Markdown: throughput and CPU per GB of every process on each path.
    """
    out = [
        f"{data['bytes'] >> 20} MiB up then {data['bytes'] >> 20} MiB down per run, one plain TCP "
        "connection each, to a plain sink: directly, through the relay's public TCP port and "
        "`portal expose --tcp`, and through `ssh -R` where OpenSSH is installed. CPU in seconds per "
        "GB moved (share of one core busy in brackets); forwarders = every process but the sink.",
        "",
        "| path | direction | MB/s | vs direct | forwarders CPU s/GB | per process CPU s/GB | "
        "sink CPU s/GB |",
        "|---|---|---|---|---|---|---|",
    ]
    direct = data["paths"]["direct"]
    for name, entry in data["paths"].items():
        processes = sorted(
            {key.split("CpuSecondsPerGB")[0] for key in entry if "CpuSecondsPerGB" in key}
            - {"sink"}
        )
        for direction in ("upload", "download"):
            d = direction.title()
            rate = _median(entry, f"{direction}MBps")
            base = _median(direct, f"{direction}MBps")
            ratio = rate / base if name != "direct" and rate and base else None
            total = sum(_median(entry, f"{who}CpuSecondsPerGB{d}") or 0.0 for who in processes)
            each = ", ".join(
                f"{who} {_cpuCell(entry, f'{who}CpuSecondsPerGB{d}', f'{who}Cores{d}')}"
                for who in processes
            )
            out.append(
                f"| {name} | {direction} | {_fmt(rate)} | {_fmt(ratio, 2)} | "
                f"{_fmt(total, 2) if processes else '-'} | {each or '-'} | "
                f"{_cpuCell(entry, f'sinkCpuSecondsPerGB{d}', f'sinkCores{d}')} |"
            )
    other = {name: _median(entry, "otherCores") for name, entry in data["paths"].items()}
    out.append(
        "- other work on the machine during the runs (median cores): "
        + ", ".join(f"{name} {value:.2f}" for name, value in other.items())
    )
    out.append(
        f"- relay streams sealed: {data.get('relaySealedStreams', 0):.0f}, spliced in Python: "
        f"{data['relayPythonSplicedStreams']:.0f}, by the kernel: "
        f"{data['relayKernelSplicedStreams']:.0f}"
    )
    versus = data.get("versusSSH", {})
    if versus:
        out.append(
            "- Portal against `ssh -R`: throughput "
            + ", ".join(f"{d} {versus[f'{d}Throughput']:.2f}x" for d in ("upload", "download"))
            + "; relay + tunnel CPU per GB against sshd + ssh "
            + ", ".join(f"{d} {versus[f'{d}Cpu']:.2f}x" for d in ("upload", "download"))
        )
    out += [f"- {note}" for note in data.get("notes", [])]
    return out


def _udpSection(data: dict[str, Any]) -> list[str]:
    """
    Scenario 6b's Markdown: the loss verdict, the maximum rate, the figures per load, direction
    and path, and where datagrams were lost.
    """
    portalName = "portal (relay + tunnel)"
    buffers = data["buffers"]
    out = [
        f"{data['datagramBytes']:,}-byte datagrams for {data['seconds']:g} s per load and direction, "
        "directly to the counting UDP sink on loopback, and through the relay's public UDP port "
        "and `portal expose --udp`. Upload: the harness sends, the sink counts; download: the sink "
        "sends, the harness counts. Socket buffers: the harness and the sink asked for "
        f"{buffers['requested'] >> 20} MiB (the kernel reports SO_RCVBUF "
        f"{buffers['sink']['rcvbuf']:,} for the sink, twice what it grants; net.core.rmem_max "
        f"{_fmt(buffers['rmemMax'])}, wmem_max {_fmt(buffers['wmemMax'])}); the relay and the "
        "tunnel ask for 4 MiB too (portal.forwarding.udpbuffers), where the default, net.core.rmem_default "
        f"{_fmt(buffers['rmemDefault'])}, holds {_fmt(buffers.get('defaultBufferDatagrams'))} of "
        "these datagrams on loopback.",
        "",
    ]
    other = [
        _median(entry, "otherCores") or 0.0
        for byDirection in data["loads"].values()
        for direction in _DIRECTIONS
        for entry in byDirection[direction].values()
    ]
    busiest = max(other, default=0.0)
    if busiest > 0.2:
        out += [
            f"**Other work shared the machine** (up to {busiest:.2f} cores, median per row, in "
            "the last table): the figures through Portal are lower than on a quiet machine.",
            "",
        ]
    for load, (direction, words) in itertools.product(
        ("100 Mbit/s", "200 Mbit/s"), _DIRECTIONS.items()
    ):
        entry = data["loads"].get(load, {}).get(direction, {}).get(portalName)
        if entry:
            loss = _median(entry, "lossPercent")
            verdict = "met" if loss is not None and loss < 1.0 else "**not met**"
            out.append(f"- loss < 1% at {load}, {words}: {verdict} ({_fmt(loss, 2)}%)")
    top = data["loads"].get("max", {})
    for direction, words in _DIRECTIONS.items():
        entry = top.get(direction, {}).get(portalName)
        direct = top.get(direction, {}).get("direct")
        if entry and direct:
            out.append(
                f"- maximum rate through relay + tunnel, {words} (sender unpaced): "
                f"{_fmt(_median(entry, 'receivedPps'))} datagrams/s received = "
                f"{_fmt(_median(entry, 'receivedMbps'))} Mbit/s, loss "
                f"{_fmt(_median(entry, 'lossPercent'), 1)}% of "
                f"{_fmt(_median(entry, 'sentPps'))}/s sent; direct: "
                f"{_fmt(_median(direct, 'receivedPps'))}/s = "
                f"{_fmt(_median(direct, 'receivedMbps'))} Mbit/s"
            )
    out += [
        "",
        "Medians; datagrams per second of sending; CPU in µs per datagram sent.",
        "",
        "| load | direction | path | offered/s | sent/s | received/s | Mbit/s | loss % | vs direct "
        "| relay µs | tunnel µs | sink µs | harness µs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for load, byDirection in data["loads"].items():
        for direction in _DIRECTIONS:
            for name, entry in byDirection[direction].items():
                ratio = data["ratio"][load][direction] if name != "direct" else None
                cells = [
                    _fmt(_median(entry, f"{who}CpuUsPerDatagram"), 1)
                    if name != "direct" or who in ("sink", "client")
                    else "-"
                    for who in ("relay", "tunnel", "sink", "client")
                ]
                out.append(
                    f"| {load} | {direction} | {name} | {_fmt(byDirection['offeredPps'])} "
                    f"| {_fmt(_median(entry, 'sentPps'))} | {_fmt(_median(entry, 'receivedPps'))} "
                    f"| {_fmt(_median(entry, 'receivedMbps'))} "
                    f"| {_fmt(_median(entry, 'lossPercent'), 2)} | {_fmt(ratio, 2)} "
                    f"| {' | '.join(cells)} |"
                )
    out += [
        "",
        "Where datagrams were lost (medians, datagrams per run): kernel drops at each process's UDP "
        "sockets (receive buffer full), at the machine's input backlog, and the rest; the relay's "
        "own counters for the portal path.",
        "",
        "| load | direction | path | sent | received | relay | tunnel | sink | harness "
        "| backlog | unaccounted | late | relay forwarded | relay over TCP | relay dropped |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for load, byDirection in data["loads"].items():
        for direction in _DIRECTIONS:
            forwarded = "udp_to_tunnel" if direction == "upload" else "udp_from_tunnel"
            for name, entry in byDirection[direction].items():
                cells = [
                    _fmt(_median(entry, key))
                    for key in (
                        "sent",
                        "received",
                        "relayDrops",
                        "tunnelDrops",
                        "sinkDrops",
                        "clientDrops",
                        "backlogDrops",
                        "unaccounted",
                        "late",
                        forwarded,
                        "udp_over_control",
                        "udp_dropped",
                    )
                ]
                out.append(f"| {load} | {direction} | {name} | {' | '.join(cells)} |")
    out += [
        "",
        "Cores busy, and in brackets cores ready to run but waiting for a CPU (run queue, from "
        "/proc/PID/schedstat), while datagrams flowed (medians); other = the rest of the "
        "machine's busy time.",
        "",
        "| load | direction | path | relay | tunnel | sink | harness | other |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for load, byDirection in data["loads"].items():
        for direction in _DIRECTIONS:
            for name, entry in byDirection[direction].items():
                cells = [
                    f"{_median(entry, f'{who}Cores'):.2f} ({_median(entry, f'{who}WaitCores'):.2f})"
                    if name != "direct" or who in ("sink", "client")
                    else "-"
                    for who in ("relay", "tunnel", "sink", "client")
                ]
                out.append(
                    f"| {load} | {direction} | {name} | {' | '.join(cells)} "
                    f"| {_fmt(_median(entry, 'otherCores'), 2)} |"
                )
    out += [f"- {note}" for note in data.get("notes", [])]
    return out


def _attackSection(data: dict[str, Any]) -> list[str]:
    """
    Scenario 9's Markdown: the visitors quiet and under attack, each phase's p99, what the
    attackers got against the limits, the relay's refusals, and the load on the machine.
    """
    quiet, attacked = data["quiet"], data["attacked"]
    out = [
        f"Visitors from {data['visitorSource']} throughout; the attack ran {data['seconds']:g} s "
        f"in {attacked['phases']} block(s) of {data['blockSeconds']:g} s, each between two quiet "
        f"phases as long, on the same relay. The harness, relay, tunnels and services ran at nice "
        f"{data.get('nice', 0)}; the attacker at {data.get('attackerScheduling', 'nice 19')}.",
        "",
        "| visitor | phases | visits | succeeded | TTFB p50 µs | TTFB p99 µs | max µs | failures |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in quiet["visitors"]:
        for phases, figures in (("quiet", quiet), ("under attack", attacked)):
            v = figures["visitors"][name]
            failures = "; ".join(f"{n} x {why}" for why, n in v["failures"].items()) or "-"
            out.append(
                f"| {name} | {phases} | {v['visits']} | {_fmt(v['successPercent'], 1)}% | "
                f"{_fmt(v['ttfbP50us'])} | {_fmt(v['ttfbP99us'])} | {_fmt(v['ttfbMaxUs'])} | "
                f"{failures} |"
            )
    out += [
        "",
        "| visitor | p50 under attack / quiet | p99 under attack / quiet |",
        "|---|---|---|",
    ]
    for name, c in data["comparison"].items():
        out.append(f"| {name} | {_fmt(c['p50Ratio'], 2)} | {_fmt(c['p99Ratio'], 2)} |")
    names = list(quiet["visitors"])
    out += [
        "",
        "Each phase in order (TTFB p99 µs):",
        "",
        "| phase | " + " | ".join(names) + " | machine busy cores | load average |",
        "|---|" + "---|" * (len(names) + 2),
    ]
    for phase in data["phases"]:
        cells = " | ".join(_fmt(phase["ttfbP99us"][name]) for name in names)
        out.append(
            f"| {'under attack' if phase['attacked'] else 'quiet'} | {cells} | "
            f"{_fmt(phase['machineBusyCores'], 2)} | {_fmt(phase['loadAverage1m'], 1)} |"
        )
    slow = [phase.get("slowBySecond") for phase in data["phases"]]
    if all(slow):
        width = max(len(counts) for counts in slow)
        out += [
            "",
            "When the slow visits came: visits (all visitors) slower than twice their quiet p99, by "
            "second of each phase in order:",
            "",
            "| phase | " + " | ".join(f"{s}-{s + 1} s" for s in range(width)) + " |",
            "|---|" + "---|" * width,
        ]
        for phase, counts in zip(data["phases"], slow, strict=True):
            kind = "under attack" if phase["attacked"] else "quiet"
            out.append(f"| {kind} | " + " | ".join(str(c) for c in counts) + " |")
    out += [
        "",
        "| phases | machine busy cores | relay CPU s | relay waiting for a CPU s | attacker CPU s "
        "| new tunnel's lease s | relay log lines |",
        "|---|---|---|---|---|---|---|",
    ]
    for phases, p in (("quiet", quiet), ("under attack", attacked)):
        leases = ", ".join(_fmt(x, 1) for x in p["newTunnelLeaseSeconds"])
        out.append(
            f"| {phases} ({_fmt(p['seconds'])} s) | {_fmt(p['machineBusyCores'], 2)} | "
            f"{_fmt(p['cpuSeconds']['relay'], 2)} | {_fmt(p['waitSeconds']['relay'], 2)} | "
            f"{_fmt(p['cpuSeconds'].get('attacker'), 2)} | {leases} | {p['relayLogLines']} |"
        )
    out += [
        "",
        "What the attackers held at once, against the limit that bounds it:",
        "",
        "| attack | limit | held | the attacker saw | relay's gauge peak (all addresses) | within |",
        "|---|---|---|---|---|---|",
    ]
    for row in data["quotas"]:
        out.append(
            f"| {row['what']} | {row['limit']} | {row['held']} | {_fmt(row.get('attackerSaw'))} "
            f"| {_fmt(row.get('relayGaugePeak'))} | {'yes' if row['within'] else '**no**'} |"
        )
    attack = data["attack"]
    out += ["", "| attack (all blocks) | figures |", "|---|---|"]
    for name, flood in attack["idle"].items():
        out.append(
            f"| idle connections to {name} | {flood['attempts']} tried, {flood['refusedAtOnce']} "
            f"closed within a second, {flood['closedAfterHolding']} closed later (median "
            f"{_fmt(flood['closedAfterSecondsMedian'], 1)} s) |"
        )
    for key, what in (("names", "name squatters"), ("ports", "port squatters")):
        if key in attack:
            refused = "; ".join(f"{n} x {why}" for why, n in attack[key]["refused"].items())
            out.append(
                f"| {what} | {attack[key]['tried']} tried, {attack[key]['heldInAll']} held; "
                f"{refused or 'none refused'} |"
            )
    challenges = attack["challenges"]
    out.append(
        f"| challenge flood | {challenges['asked']} asked on {challenges['sessions']} "
        f"session(s), {challenges['issuedInAll']} issued |"
    )
    if "udp" in attack:
        out.append(
            f"| UDP flood | {attack['udp']['sent']} datagrams from {attack['udp']['ports']} ports; "
            f"the relay forwarded {_fmt(data['udpCounters']['udp_to_tunnel'])} datagrams to "
            "tunnels in all |"
        )
    refusals = ", ".join(
        f"{reason} {_fmt(n)}" for reason, n in sorted(data["refusalsDuringAttack"].items())
    )
    out += [
        "",
        f"Relay refusals from the first attack block to the end (`portal_refusals_total`): "
        f"{refusals}.",
        "",
    ]
    out += [f"- {note}" for note in data.get("notes", [])]
    return out


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
