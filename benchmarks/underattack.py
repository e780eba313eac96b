"""
Scenario 9, "service under attack" (issue 14): legitimate visitors from one loopback address keep
opening new TLS connections through a real C{portal expose} in stream mode, sending routed HTTP
requests through a real C{portal expose --http} and UDP round trips through C{portal expose --udp},
in quiet phases and in phases while L{benchmarks.attacker} runs a bounded mix of the issue's attacks
from other loopback addresses against the same relay (alternating: quiet, attack, quiet, ...).
Reported: the visitors' success rate and time to first byte quiet and under attack, and what the
attackers held (counted on the relay's side, by the attacker and on the relay's C{/metrics})
against the relay's configured limits.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import attrs

from benchmarks import udpworkload, workload
from benchmarks.attacker import NICE, AttackPlan
from benchmarks.lab import Lab, metrics
from benchmarks.procs import (
    Child,
    freePortRange,
    machineBusySeconds,
    python,
    schedSeconds,
    tcpConnectionsFrom,
)

#: The legitimate visitors' source address.
VISITOR = "127.0.0.3"
#: Seconds between a visitor's requests (each kind), when a request takes less.
VISIT_INTERVAL = 0.05
#: Seconds any one socket operation of a visitor may take before the visit counts as failed.
VISIT_TIMEOUT = 10.0
#: Seconds between reads of the relay's C{/metrics} during a phase.
SAMPLE_INTERVAL = 2.0
#: Seconds between counts of the connections the relay holds from the attacker's address.
HELD_INTERVAL = 0.5
#: Seconds of one attack block: the attack runs in blocks, each between two quiet phases.
ATTACK_BLOCK = 10.0

#: The relay's limits in this scenario, as options: the defaults, given explicitly so that the
#: results can quote them.
LIMITS: dict[str, Any] = {
    "max-connections-per-source": 256,
    "max-control-connections-per-source": 256,
    "max-names-per-source": 256,
    "max-ports-per-source": 20,
    "max-udp-flows-per-source": 64,
    "register-rate": "2/20",
    "challenge-rate": "20/200",
    "hello-rate": "20/200",
    "handshake-rate": "200/20",
    "tcp-visitor-rate": "20/20",
    "site-header-timeout": 10.0,
    "defer-accept": float(os.environ.get("PORTAL_BENCH_DEFER_ACCEPT", "5")),
}
#: Raw TCP ports the relay offers (the port squatters' target).
TCP_PORTS = 40


@attrs.frozen
class Visitor:
    """
    One kind of legitimate visit.

    @ivar name: Its name in the results.
    @ivar visit: Makes one visit and returns the seconds to its first byte; raises on failure.
    """

    name: str
    visit: Callable[[], float]


class UDPVisitor:
    """
    Round trips through a UDP lease from one socket of L{VISITOR} (one flow, as a game or VoIP
    client keeps): each visit asks the counting sink, through the relay and the tunnel, for one
    datagram and waits for it.
    """

    def __init__(self, port: int) -> None:
        self._port = port
        self._runs = itertools.count(1 << 20)
        self._sock: socket.socket | None = None

    def __call__(self) -> float:
        """
        One round trip.

        @return: Seconds from the request to the answer.
        @raise TimeoutError: When no answer comes in L{VISIT_TIMEOUT} seconds.
        """
        if self._sock is None:
            self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self._sock.bind((VISITOR, 0))
            self._sock.connect(("127.0.0.1", self._port))
        return udpworkload.answerTime(self._sock, next(self._runs), VISIT_TIMEOUT)

    def close(self) -> None:
        """
        Close the socket (the next visit opens another: a new flow).
        """
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _percentile(values: list[float], q: float) -> float | None:
    """
    The C{q}-th percentile (nearest rank), or L{None} without values.
    """
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def _visitLoop(
    visitor: Visitor,
    seconds: float,
    ttfbs: list[float],
    failures: Counter[str],
    offsets: list[float],
) -> None:
    """
    Visit every L{VISIT_INTERVAL} (or back to back when a visit takes longer) for C{seconds},
    noting each successful visit's time to first byte in C{ttfbs} and when in the phase it began in
    C{offsets}.
    """
    start = time.monotonic()
    due = start
    while time.monotonic() - start < seconds:
        try:
            began = time.monotonic() - start
            ttfbs.append(visitor.visit())
            offsets.append(began)
        except Exception as e:
            failures[f"{type(e).__name__}: {e}"[:120]] += 1
        due += VISIT_INTERVAL
        wait = due - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        else:
            due = time.monotonic()


class _Sampler:
    """
    Reads, in a process of its own (L{sampleMain}), the relay's gauges every L{SAMPLE_INTERVAL}
    and the connections it holds from the idle flood's address on each listener (from C{/proc})
    every L{HELD_INTERVAL}, keeping each one's peak; a connection counts as held when it was open
    at two counts in a row. Not a thread of the harness: under attack C{/proc/net/tcp} and the
    relay's descriptors run to thousands of lines, and reading them would hold the interpreter's
    lock for milliseconds at a time, which the visitors' threads would then count as time to
    first byte.

    @ivar gauges: The peak of each gauge of C{/metrics}.
    @ivar held: The peak of the connections the relay held from the flood's address, by listener.
    """

    def __init__(
        self, publicPort: int, relayPid: int, listeners: dict[str, int], source: str
    ) -> None:
        self._arguments = json.dumps(
            {"publicPort": publicPort, "pid": relayPid, "listeners": listeners, "source": source}
        )
        self.gauges: dict[str, float] = {}
        self.held: dict[str, int] = {}
        self._process: subprocess.Popen[str] | None = None

    def start(self) -> None:
        """
        Start sampling.
        """
        self._process = subprocess.Popen(
            [python(), "-m", "benchmarks.underattack", self._arguments],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            # Measurement, not load: its start (an interpreter and its imports, a tenth of a
            # second of CPU at every phase's start) and its reads run when the CPUs are idle.
            preexec_fn=_idleScheduling,
        )

    def stop(self) -> None:
        """
        Stop sampling and read the peaks.
        """
        assert self._process is not None
        output, _ = self._process.communicate("stop\n", timeout=60)
        peaks = json.loads(output)
        self.gauges, self.held = peaks["gauges"], peaks["held"]


def _idleScheduling() -> None:
    """
    Run this process under C{SCHED_IDLE} (in the sampler's child, before it runs Python).
    """
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def sampleMain(arguments: dict[str, Any]) -> None:
    """
    The sampler's process: sample until a line (or the end) comes on standard input, then print
    the peaks as JSON (see L{_Sampler}).
    """
    listeners: dict[str, int] = arguments["listeners"]
    stopped = threading.Event()

    def waitForStop() -> None:
        sys.stdin.readline()
        stopped.set()

    threading.Thread(target=waitForStop, daemon=True).start()
    gauges: dict[str, float] = {}
    held: dict[str, int] = {}
    ticks = 0
    every = round(SAMPLE_INTERVAL / HELD_INTERVAL)
    previous: dict[int, set[int]] = {}
    while not stopped.wait(HELD_INTERVAL):
        ticks += 1
        byPort = tcpConnectionsFrom(arguments["pid"], arguments["source"], set(listeners.values()))
        for name, port in listeners.items():
            # Held: open at this count and at the one before (a refused connection is open for a
            # moment, until the relay has written its alert and closed it).
            count = len(byPort.get(port, set()) & previous.get(port, set()))
            held[name] = max(held.get(name, 0), count)
        previous = byPort
        if ticks % every:
            continue
        try:
            values = metrics(arguments["publicPort"])
        except OSError:
            gauges["unreadable"] = gauges.get("unreadable", 0) + 1
            continue
        for name, value in values.items():
            if "_open" in name or name == "portal_relay_pow_difficulty_bits":
                gauges[name] = max(gauges.get(name, 0.0), value)
    print(json.dumps({"gauges": gauges, "held": held}), flush=True)


def _phase(
    visitors: list[Visitor],
    seconds: float,
    sampler: _Sampler,
    processes: dict[str, Child],
    during: Callable[[], float],
) -> dict[str, Any]:
    """
    Run every visitor for C{seconds} at once, with C{during} called on another thread half way
    through.

    @return: The phase's raw figures: each visitor's times to first byte and failures by reason,
        the sampler's peaks, each process's seconds on a CPU and waiting for one (its live
        threads, from the scheduler), the machine's busy CPU seconds, the load average and what
        C{during} returned.
    """
    ttfbs: dict[str, list[float]] = {v.name: [] for v in visitors}
    offsets: dict[str, list[float]] = {v.name: [] for v in visitors}
    failures: dict[str, Counter[str]] = {v.name: Counter() for v in visitors}
    threads = [
        threading.Thread(
            target=_visitLoop,
            args=(v, seconds, ttfbs[v.name], failures[v.name], offsets[v.name]),
            daemon=True,
        )
        for v in visitors
    ]
    extra: list[float] = []

    def halfway() -> None:
        time.sleep(seconds / 2)
        extra.append(during())

    helper = threading.Thread(target=halfway, daemon=True)
    sched = {name: schedSeconds(child.pid) for name, child in processes.items()}
    busy, started = machineBusySeconds(), time.monotonic()
    sampler.start()
    for thread in [*threads, helper]:
        thread.start()
    for thread in threads:
        thread.join(seconds + 2 * VISIT_TIMEOUT + 10)
    helper.join(60)
    sampler.stop()
    now = {name: schedSeconds(child.pid) for name, child in processes.items()}
    return {
        "seconds": time.monotonic() - started,
        "ttfbs": ttfbs,
        "offsets": offsets,
        "failures": failures,
        "gauges": sampler.gauges,
        "held": sampler.held,
        "cpuSeconds": {name: now[name][0] - sched[name][0] for name in processes},
        "waitSeconds": {name: now[name][1] - sched[name][1] for name in processes},
        "busySeconds": machineBusySeconds() - busy,
        "loadAverage1m": os.getloadavg()[0],
        "newTunnelLeaseSeconds": extra[0] if extra else None,
    }


def _visitorFigures(ttfbs: list[float], failures: Counter[str]) -> dict[str, Any]:
    """
    @return: Visits, successes, the success rate, time to first byte p50/p99/max (microseconds)
        and the failures by reason.
    """
    ok, failed = len(ttfbs), sum(failures.values())
    p50, p99 = _percentile(ttfbs, 50), _percentile(ttfbs, 99)
    return {
        "visits": ok + failed,
        "succeeded": ok,
        "successPercent": 100.0 * ok / (ok + failed) if ok + failed else 0.0,
        "ttfbP50us": p50 * 1e6 if p50 is not None else None,
        "ttfbP99us": p99 * 1e6 if p99 is not None else None,
        "ttfbMaxUs": max(ttfbs) * 1e6 if ttfbs else None,
        "failures": dict(failures.most_common(10)),
    }


def _slowBySecond(phase: dict[str, Any], quiet: dict[str, Any], seconds: float) -> list[int]:
    """
    When in a phase the slow visits came: a visit is slow when its time to first byte is more
    than twice its visitor's p99 over all quiet phases.

    @param phase: A phase's raw figures (L{_phase}).
    @param quiet: The quiet phases' pooled figures (L{_pool}).
    @param seconds: The phase's length.
    @return: Slow visits of every visitor together, by whole second of the phase.
    """
    counts = [0] * max(1, math.ceil(seconds))
    for name, ttfbs in phase["ttfbs"].items():
        p99 = quiet["visitors"][name]["ttfbP99us"]
        if not p99:
            continue
        for began, ttfb in zip(phase["offsets"][name], ttfbs, strict=True):
            if ttfb * 1e6 > 2 * p99:
                counts[min(len(counts) - 1, int(began))] += 1
    return counts


def _pool(phases: list[dict[str, Any]]) -> dict[str, Any]:
    """
    The figures of several phases of one kind (quiet, or under attack) taken together.

    @return: Per visitor the figures of all its visits (L{_visitorFigures}); the gauges' and
        holdings' peaks; CPU and wait seconds summed; the machine's busy cores over the phases'
        time; the load averages and new tunnels' lease times of each phase.
    """
    names = list(phases[0]["ttfbs"])
    result: dict[str, Any] = {
        "phases": len(phases),
        "seconds": sum(p["seconds"] for p in phases),
        "visitors": {
            name: _visitorFigures(
                [t for p in phases for t in p["ttfbs"][name]],
                sum((p["failures"][name] for p in phases), Counter()),
            )
            for name in names
        },
        "gaugePeaks": {},
        "heldPeaks": {},
        "cpuSeconds": {},
        "waitSeconds": {},
    }
    for p in phases:
        for key in ("gaugePeaks", "heldPeaks"):
            source = p["gauges"] if key == "gaugePeaks" else p["held"]
            for name, value in source.items():
                result[key][name] = max(result[key].get(name, 0), value)
        for key in ("cpuSeconds", "waitSeconds"):
            for name, value in p[key].items():
                result[key][name] = result[key].get(name, 0.0) + value
    result["machineBusyCores"] = sum(p["busySeconds"] for p in phases) / result["seconds"]
    result["loadAverage1m"] = [p["loadAverage1m"] for p in phases]
    result["newTunnelLeaseSeconds"] = [p["newTunnelLeaseSeconds"] for p in phases]
    return result


def _mergeAttacks(blocks: list[dict[str, Any]]) -> dict[str, Any]:
    """
    The attacker's results of several blocks taken together: counts summed, holdings (what one
    block held at once, judged against one block's limits) the largest of any block.
    """
    merged: dict[str, Any] = {"seconds": blocks[0]["seconds"], "blocks": len(blocks), "idle": {}}
    for name in blocks[0]["idle"]:
        floods = [b["idle"][name] for b in blocks]
        medians = [f["closedAfterSecondsMedian"] for f in floods if f["closedAfterSecondsMedian"]]
        merged["idle"][name] = {
            **{
                key: sum(f[key] for f in floods)
                for key in ("attempts", "failed", "refusedAtOnce", "closedAfterHolding")
            },
            "maxHeld": max(f["maxHeld"] for f in floods),
            "heldAtEnd": max(f["heldAtEnd"] for f in floods),
            "closedAfterSecondsMedian": statistics.median(medians) if medians else None,
        }
    merged["heldPeakByListener"] = {
        name: max(b["heldPeakByListener"][name] for b in blocks)
        for name in blocks[0]["heldPeakByListener"]
    }
    for kind in ("names", "ports"):
        if kind in blocks[0]:
            refused: Counter[str] = Counter()
            for b in blocks:
                refused.update(b[kind]["refused"])
            merged[kind] = {
                "tried": sum(b[kind]["tried"] for b in blocks),
                "held": max(b[kind]["held"] for b in blocks),
                "heldInAll": sum(b[kind]["held"] for b in blocks),
                "refused": dict(refused.most_common()),
            }
    merged["challenges"] = {
        "asked": sum(b["challenges"]["asked"] for b in blocks),
        "issued": max(b["challenges"]["issued"] for b in blocks),
        "issuedInAll": sum(b["challenges"]["issued"] for b in blocks),
        "sessions": sum(b["challenges"]["sessions"] for b in blocks),
    }
    if "udp" in blocks[0]:
        merged["udp"] = {
            "ports": blocks[0]["udp"]["ports"],
            "sent": sum(b["udp"]["sent"] for b in blocks),
            "failed": sum(b["udp"]["failed"] for b in blocks),
        }
    return merged


def _refusals(values: dict[str, float]) -> dict[str, float]:
    """
    @return: The C{portal_refusals_total} counters by reason.
    """
    prefix = 'portal_refusals_total{reason="'
    return {
        name[len(prefix) : -2]: value for name, value in values.items() if name.startswith(prefix)
    }


def _rate(option: str) -> tuple[float, float]:
    """
    @return: A L{LIMITS} rate option's per second and burst.
    """
    perSecond, burst = str(LIMITS[option]).split("/")
    return float(perSecond), float(burst)


def _quotas(
    attack: dict[str, Any], relayHeld: dict[str, int], gauges: dict[str, float]
) -> list[dict[str, Any]]:
    """
    What the attackers held at once (in any one attack block) against the limits that bound it.

    @param relayHeld: The peak of the connections the relay held from the idle flood's address,
        by listener (from C{/proc}): the figure judged.
    @param gauges: The peaks of the relay's gauges, quoted beside it (they count every address).
    @return: One row per bounded resource: the limit, what the attackers held (connections: as
        the relay held them, and as the attacker saw them, which counts a connection the relay
        closed until the attacker reads the close; names, ports and challenges: what they got)
        and whether it stayed within.
    """
    rows = []
    cap = int(LIMITS["max-connections-per-source"])
    gauge = 'portal_relay_listener_connections_open{{listener="{}"}}'
    for listener, what, limit in (
        ("public", "public TLS port (idle, and stalled ClientHello for the relay's own name)", cap),
        ("http", "--http port", cap),
        ("tcp", "raw TCP lease port", cap),
        (
            "control",
            "control port (not yet proved who they are)",
            int(LIMITS["max-control-connections-per-source"]),
        ),
    ):
        if listener not in relayHeld:
            continue
        rows.append(
            {
                "what": f"idle connections from one address held on the {what}",
                "limit": limit,
                "held": relayHeld[listener],
                "attackerSaw": attack["heldPeakByListener"].get(listener),
                "relayGaugePeak": gauges.get(gauge.format(listener)),
                "within": relayHeld[listener] <= limit,
            }
        )
    seconds = float(attack["seconds"])
    perSecond, burst = _rate("register-rate")
    for kind, option, what in (
        ("names", "max-names-per-source", "lease names"),
        ("ports", "max-ports-per-source", "raw TCP ports"),
    ):
        if kind not in attack:
            continue
        quota = int(LIMITS[option])
        # The registration rate per address bounds them before the quota in a short attack.
        limit = min(quota, int(burst + perSecond * seconds))
        rows.append(
            {
                "what": f"{what} held by fresh identities from one address (quota {quota}; "
                f"registrations {perSecond:g}/s, burst {burst:g})",
                "limit": limit,
                "held": attack[kind]["held"],
                "within": attack[kind]["held"] <= limit,
            }
        )
    perSecond, burst = _rate("challenge-rate")
    challenges = attack["challenges"]
    limit = int(burst + perSecond * seconds)
    rows.append(
        {
            "what": f"challenges issued to one address ({perSecond:g}/s, burst {burst:g})",
            "limit": limit,
            "held": challenges["issued"],
            "within": challenges["issued"] <= limit,
        }
    )
    return rows


def _comparison(baseline: dict[str, Any], attacked: dict[str, Any]) -> dict[str, Any]:
    """
    Per visitor: success rates and the time-to-first-byte ratios of C{attacked} to C{baseline}.
    """
    comparison = {}
    for name, a in attacked["visitors"].items():
        q = baseline["visitors"][name]
        comparison[name] = {
            "successPercentQuiet": q["successPercent"],
            "successPercentAttacked": a["successPercent"],
        }
        for figure in ("P50", "P99"):
            mine, theirs = a[f"ttfb{figure}us"], q[f"ttfb{figure}us"]
            comparison[name][f"{figure.lower()}Ratio"] = mine / theirs if mine and theirs else None
    return comparison


def underAttack(lab: Lab, seconds: float, log: Callable[[str], None]) -> dict[str, Any]:
    """
    Scenario 9: a relay with every mode on (C{--http}, raw TCP and UDP ports) and the limits of
    L{LIMITS}; a stream tunnel to a plain sink, a routed HTTP tunnel to nginx, a raw TCP tunnel
    and a UDP tunnel to the counting UDP sink; visitors from L{VISITOR} throughout, while the
    attacker runs for C{seconds} in all, in blocks of about L{ATTACK_BLOCK} seconds each between
    two quiet phases as long (quiet, attack, quiet, attack, ..., quiet), so that the machine's
    other load falls on both alike; a real tunnel registers half way through each phase.
    """
    service = lab.httpService()
    if service is None:
        return {"error": "nginx (Debian nginx-light) is needed as the routed HTTP service"}
    _, httpServicePort, _ = service
    _, sinkPort = lab.sink(tls=False)
    _, udpSinkPort, _ = lab.udpSink()
    # Below the ephemeral range: the attack's thousands of connections take ephemeral ports.
    tcpLow, tcpHigh = freePortRange(TCP_PORTS, belowEphemeral=True)
    udpLow, udpHigh = freePortRange(2, belowEphemeral=True)
    relay, public, control = lab.relay(
        [
            "--http",
            "tcp:0:interface=127.0.0.1:backlog=4096",
            "--tcp-ports",
            f"{tcpLow}-{tcpHigh}",
            "--udp-ports",
            f"{udpLow}-{udpHigh}",
            *(f"--{name}={value}" for name, value in LIMITS.items()),
        ]
    )
    httpPort = int(relay.waitFor(r"http listening on 127\.0\.0\.1:(\d+)").group(1))
    stream, streamURL = lab.tunnel(control, sinkPort, "visit")
    routed, routedURL = lab.routedTunnel(control, httpServicePort, "web")
    _, tcpPort = lab.tcpTunnel(control, sinkPort, "rawtcp")
    udpTunnel, udpPort = lab.udpTunnel(control, udpSinkPort, "udp")
    context = workload.clientContext()
    streamHost = streamURL.split("//", 1)[1].rsplit(":", 1)[0]
    routedHost = routedURL.split("//", 1)[1].rsplit(":", 1)[0]
    udpVisitor = UDPVisitor(udpPort)
    visitors = [
        Visitor(
            "stream (new TLS connection)",
            lambda: workload.firstByte(public, streamHost, context, VISITOR, VISIT_TIMEOUT),
        ),
        Visitor(
            "routed HTTP (new connection, GET /)",
            lambda: workload.httpFirstByte(public, routedHost, context, VISITOR, VISIT_TIMEOUT),
        ),
        Visitor("UDP round trip (one flow)", udpVisitor),
    ]
    for v in visitors:  # Warm-up: data session pools, upstream connections, lazily built state.
        for _ in range(20):
            v.visit()
    processes = {
        "relay": relay,
        "stream tunnel": stream,
        "routed tunnel": routed,
        "udp tunnel": udpTunnel,
    }
    listeners = {"public": public, "http": httpPort, "tcp": tcpPort, "control": control}
    registrations = itertools.count()

    def registerTunnel() -> float:
        started = time.monotonic()
        child, _ = lab.tunnel(control, sinkPort, f"late{next(registrations)}", ())
        took = time.monotonic() - started
        lab.stop(child)
        return took

    blocks = max(1, round(seconds / ATTACK_BLOCK))
    block = seconds / blocks
    plan = AttackPlan(
        seconds=block,
        publicPort=public,
        controlPort=control,
        httpPort=httpPort,
        tcpPort=tcpPort,
        udpPort=udpPort,
        idleScheduling=not os.environ.get("PORTAL_BENCH_ATTACKER_NICE"),
        **json.loads(os.environ.get("PORTAL_BENCH_ATTACK_PLAN", "{}")),
    )

    def quietPhase() -> dict[str, Any]:
        log(f"scenario 9: quiet, visitors for {block:g} s")
        udpVisitor.close()  # A new flow per phase.
        lines = len(relay.lines)
        sampler = _Sampler(public, relay.pid, listeners, plan.idleSource)
        phase = _phase(visitors, block, sampler, processes, registerTunnel)
        phase["relayLogLines"] = len(relay.lines) - lines
        return phase

    quiet, attacked, attacks = [quietPhase()], [], []
    before = metrics(public)
    for index in range(blocks):
        log(f"scenario 9: under attack, visitors for {block:g} s")
        udpVisitor.close()
        blockPlan = attrs.evolve(plan, label=str(index))
        attacker = Child(
            "attacker",
            [python(), "-m", "benchmarks.attacker", json.dumps(attrs.asdict(blockPlan))],
        )
        try:
            attacker.waitFor(r"^attacking$", timeout=60)
            lines = len(relay.lines)
            sampler = _Sampler(public, relay.pid, listeners, plan.idleSource)
            phase = _phase(
                visitors, block, sampler, processes | {"attacker": attacker}, registerTunnel
            )
            phase["relayLogLines"] = len(relay.lines) - lines
            attacked.append(phase)
            line = attacker.waitFor(r"^(result|failed:) ", timeout=block + 120).string
            if not line.startswith("result "):
                raise RuntimeError("the attacker failed:\n" + "\n".join(attacker.lines[-30:]))
            attacks.append(json.loads(line[len("result ") :]))
        finally:
            attacker.stop()
        quiet.append(quietPhase())
    after = metrics(public)
    if os.environ.get("PORTAL_BENCH_RELAY_LOG"):
        with open(os.environ["PORTAL_BENCH_RELAY_LOG"], "w") as f:
            f.write("\n".join(relay.lines))
    udpVisitor.close()
    refusalsBefore = _refusals(before)
    refused = {
        reason: count - refusalsBefore.get(reason, 0)
        for reason, count in _refusals(after).items()
        if count - refusalsBefore.get(reason, 0)
    }
    quietFigures, attackedFigures = _pool(quiet), _pool(attacked)
    attack = _mergeAttacks(attacks)
    quietFigures["relayLogLines"] = sum(p["relayLogLines"] for p in quiet)
    attackedFigures["relayLogLines"] = sum(p["relayLogLines"] for p in attacked)
    order = [quiet[0]] + [p for pair in zip(attacked, quiet[1:], strict=True) for p in pair]
    return {
        "seconds": seconds,
        "blockSeconds": block,
        # The harness's priority, which the relay, the tunnels and the services inherit.
        "nice": os.getpriority(os.PRIO_PROCESS, 0),
        "visitorSource": VISITOR,
        "visitIntervalSeconds": VISIT_INTERVAL,
        "limits": LIMITS,
        "attackPlan": attrs.asdict(plan),
        "attackerScheduling": "SCHED_IDLE" if plan.idleScheduling else f"nice {NICE}",
        "quiet": quietFigures,
        "attacked": attackedFigures,
        "phases": [
            {
                "attacked": any(phase is a for a in attacked),
                "ttfbP99us": {
                    name: _visitorFigures(ttfbs, phase["failures"][name])["ttfbP99us"]
                    for name, ttfbs in phase["ttfbs"].items()
                },
                "machineBusyCores": phase["busySeconds"] / phase["seconds"],
                "loadAverage1m": phase["loadAverage1m"],
                "slowBySecond": _slowBySecond(phase, quietFigures, block),
            }
            for phase in order
        ],
        "comparison": _comparison(quietFigures, attackedFigures),
        "attack": attack,
        "refusalsDuringAttack": refused,
        "quotas": _quotas(attack, attackedFigures["heldPeaks"], attackedFigures["gaugePeaks"]),
        "udpCounters": {
            name: after.get(f"portal_relay_{name}_total", 0)
            - before.get(f"portal_relay_{name}_total", 0)
            for name in ("udp_to_tunnel", "udp_dropped")
        },
        "notes": NOTES,
    }


#: What the results of scenario 9 mean.
NOTES = [
    f"visitors: from {VISITOR}, each kind on its own thread of this harness, one visit every "
    f"{VISIT_INTERVAL * 1000:g} ms (back to back when one takes longer), a visit failing after "
    f"{VISIT_TIMEOUT:g} s of silence; stream: a new TLS 1.3 connection through the relay to the "
    "tunnel, which terminates TLS, and a 1-byte exchange with the plain sink; routed HTTP: a new "
    "TLS connection and GET / through the routed tunnel to nginx (1 KiB body); UDP: one socket per "
    "phase (one flow), each visit a request to the counting sink through relay and tunnel and its "
    "one-datagram answer",
    "time to first byte runs from the TCP connect (UDP: the request) to the first byte of the "
    "answer",
    f"the attack runs in blocks of {ATTACK_BLOCK:g} s or so, each between two quiet phases as "
    "long, on the same relay (quiet, attack, quiet, ...): the machine's other load, which drifts, "
    "falls on both; figures pool every quiet phase and every attacked phase, and the phases "
    "table shows each one's p99",
    "the attacker is one process (benchmarks/attacker.py) on this machine, a new one per block, "
    f"under SCHED_IDLE at nice {NICE} (with PORTAL_BENCH_ATTACKER_NICE=1, at nice {NICE} alone): a "
    "real attacker brings its own CPU, this one shares the same 2 cores as the relay, the tunnels "
    "and the visitors, and SCHED_IDLE keeps it from taking turns with them while leaving it every "
    "idle moment; what it sent (attempts, challenges asked, datagrams) is reported, so a starved "
    "attacker shows; machine busy cores count every process on the machine (other work "
    "included)",
    "connections held: the established connections from the flood's address the relay process "
    f"holds on each listener, counted from /proc every {HELD_INTERVAL:g} s, those open at two "
    "counts in a row (peak; a refused connection is open for a moment until the relay has "
    "written its alert and closed it); beside them, "
    "what the attacker saw (connections open a second or more, which counts a connection the "
    "relay closed until the attacker, starved of CPU, reads the close) and the peak of the relay's "
    "gauge of the listener, which counts every address (the visitors' and, on the control port, "
    "the tunnels' data sessions)",
    "names, ports and challenges are judged per block, against what one block's time allows "
    "(burst + rate x seconds) when that is below the quota; the relay's buckets refill in the "
    "quiet phases between blocks",
    "CPU and wait: each process's seconds on a CPU and ready to run but waiting for one "
    "(/proc/PID/task/*/schedstat), summed over the phases",
    "new tunnel's lease: a real portal expose started half way through each phase, from start to "
    "its lease (Python start-up included)",
]


if __name__ == "__main__":
    sampleMain(json.loads(sys.argv[1]))
