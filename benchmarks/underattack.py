"""
Scenario 8, "service under attack" (issue 14): legitimate visitors from one loopback address keep
opening new TLS connections through a real C{portal expose} in stream mode and sending routed HTTP
requests through a real C{portal expose --http}, first on a quiet relay and then while
L{benchmarks.attacker} runs a bounded mix of the issue's attacks from other loopback addresses
against the same relay. Reported: the visitors' success rate and time to first byte in both
phases, and what the attackers got (their own counts and the relay's C{/metrics}) against the
relay's configured limits.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import attrs

from benchmarks import udpworkload, workload
from benchmarks.attacker import AttackPlan
from benchmarks.lab import Lab, metrics
from benchmarks.procs import Child, freePortRange, machineBusySeconds, python, schedSeconds

#: The legitimate visitors' source address.
VISITOR = "127.0.0.3"
#: Seconds between a visitor's requests (each kind), when a request takes less.
VISIT_INTERVAL = 0.05
#: Seconds any one socket operation of a visitor may take before the visit counts as failed.
VISIT_TIMEOUT = 10.0
#: Seconds between reads of the relay's C{/metrics} during a phase.
SAMPLE_INTERVAL = 2.0

#: The relay's limits in this scenario, as options: the defaults, given explicitly so that the
#: results can quote them.
LIMITS = {
    "max-connections-per-source": 256,
    "max-control-connections-per-source": 256,
    "max-names-per-source": 256,
    "max-ports-per-source": 20,
    "max-udp-flows-per-source": 64,
    "register-rate": "2/20",
    "challenge-rate": "20/200",
    "hello-rate": "20/200",
    "site-header-timeout": 10.0,
}
#: The attacker's scheduling priority (C{nice}): the lowest.
ATTACKER_NICE = 19
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
    visitor: Visitor, seconds: float, ttfbs: list[float], failures: Counter[str]
) -> None:
    """
    Visit every L{VISIT_INTERVAL} (or back to back when a visit takes longer) for C{seconds}.
    """
    start = time.monotonic()
    due = start
    while time.monotonic() - start < seconds:
        try:
            ttfbs.append(visitor.visit())
        except Exception as e:
            failures[f"{type(e).__name__}: {e}"[:120]] += 1
        due += VISIT_INTERVAL
        wait = due - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        else:
            due = time.monotonic()


def _sampleGauges(publicPort: int, stop: threading.Event, peaks: dict[str, float]) -> None:
    """
    Read the relay's gauges every L{SAMPLE_INTERVAL} until C{stop}, keeping each one's peak.
    """
    while not stop.wait(SAMPLE_INTERVAL):
        try:
            values = metrics(publicPort)
        except OSError:
            peaks["unreadable"] = peaks.get("unreadable", 0) + 1
            continue
        for name, value in values.items():
            if "_open" in name or name in (
                "portal_relay_leases",
                "portal_relay_pow_difficulty_bits",
            ):
                peaks[name] = max(peaks.get(name, 0.0), value)


def _phase(
    visitors: list[Visitor],
    seconds: float,
    publicPort: int,
    processes: dict[str, Child],
    during: Callable[[], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """
    Run every visitor for C{seconds} at once, with C{during} (if given) called on another thread
    half way through.

    @return: Per visitor: visits, successes, the success rate and time to first byte p50/p99
        (microseconds), the failures by reason; the relay's gauges' peaks; each process's seconds
        on a CPU and waiting for one (its live threads, from the scheduler) and the machine's
        load.
    """
    ttfbs: dict[str, list[float]] = {v.name: [] for v in visitors}
    failures: dict[str, Counter[str]] = {v.name: Counter() for v in visitors}
    threads = [
        threading.Thread(
            target=_visitLoop, args=(v, seconds, ttfbs[v.name], failures[v.name]), daemon=True
        )
        for v in visitors
    ]
    peaks: dict[str, float] = {}
    stop = threading.Event()
    sampler = threading.Thread(target=_sampleGauges, args=(publicPort, stop, peaks), daemon=True)
    extra: dict[str, Any] = {}

    def halfway() -> None:
        time.sleep(seconds / 2)
        assert during is not None
        extra.update(during())

    helper = threading.Thread(target=halfway, daemon=True) if during else None
    sched = {name: schedSeconds(child.pid) for name, child in processes.items()}
    busy, started = machineBusySeconds(), time.monotonic()
    for thread in [*threads, sampler, *([helper] if helper else [])]:
        thread.start()
    for thread in threads:
        thread.join(seconds + 2 * VISIT_TIMEOUT + 10)
    if helper is not None:
        helper.join(60)
    stop.set()
    sampler.join(30)
    wall = time.monotonic() - started
    result: dict[str, Any] = {"seconds": wall, "visitors": {}}
    for v in visitors:
        ok, failed = len(ttfbs[v.name]), sum(failures[v.name].values())
        p50, p99 = _percentile(ttfbs[v.name], 50), _percentile(ttfbs[v.name], 99)
        result["visitors"][v.name] = {
            "visits": ok + failed,
            "succeeded": ok,
            "successPercent": 100.0 * ok / (ok + failed) if ok + failed else 0.0,
            "ttfbP50us": p50 * 1e6 if p50 is not None else None,
            "ttfbP99us": p99 * 1e6 if p99 is not None else None,
            "ttfbMaxUs": max(ttfbs[v.name]) * 1e6 if ttfbs[v.name] else None,
            "failures": dict(failures[v.name].most_common(10)),
        }
    result["gaugePeaks"] = peaks
    now = {name: schedSeconds(child.pid) for name, child in processes.items()}
    result["cpuSeconds"] = {name: now[name][0] - sched[name][0] for name in processes}
    result["waitSeconds"] = {name: now[name][1] - sched[name][1] for name in processes}
    result["machineBusyCores"] = (machineBusySeconds() - busy) / wall
    result["loadAverage1m"] = os.getloadavg()[0]
    result.update(extra)
    return result


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


def _quotas(attack: dict[str, Any], peaks: dict[str, float]) -> list[dict[str, Any]]:
    """
    What the attackers held against the limits that bound it.

    @return: One row per bounded resource: the limit, what the attackers held (by their own
        count: connections open for a second or more, names and ports registered; and, for
        connections, the peak of the relay's gauge of the listener, which also counts the
        legitimate visitors' and this harness's connections) and whether it stayed within.
    """
    rows = []
    cap = int(LIMITS["max-connections-per-source"])
    gauge = 'portal_relay_listener_connections_open{{listener="{}"}}'
    groups = (
        ("public", "public TLS port (idle, and stalled ClientHello for the relay's own name)", cap),
        ("http", "--http port", cap),
        ("tcp", "raw TCP lease port", cap),
        (
            "control",
            "control port (not yet proved who they are)",
            int(LIMITS["max-control-connections-per-source"]),
        ),
    )
    for listener, what, limit in groups:
        held = attack["heldPeakByListener"].get(listener)
        if held is None:
            continue
        rows.append(
            {
                "what": f"idle connections from one address held on the {what}",
                "limit": limit,
                "held": held,
                "relayGaugePeak": peaks.get(gauge.format(listener)),
                "within": held <= limit,
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
    Scenario 8: a relay with every mode on (C{--http}, raw TCP and UDP ports) and the limits of
    L{LIMITS}; a stream tunnel to a plain sink, a routed HTTP tunnel to nginx, a raw TCP tunnel
    and a UDP tunnel to the counting UDP sink; visitors from L{VISITOR} for C{seconds} on the quiet
    relay, for C{seconds} while the attacker runs, and for C{seconds} on the quiet relay again; a
    real tunnel registers half way through each phase.
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
    registrations = itertools.count()

    def registerTunnel() -> dict[str, Any]:
        started = time.monotonic()
        child, _ = lab.tunnel(control, sinkPort, f"late{next(registrations)}", ())
        took = time.monotonic() - started
        lab.stop(child)
        return {"newTunnelLeaseSeconds": took}

    def phase(name: str, extra: dict[str, Child]) -> dict[str, Any]:
        log(f"scenario 8: {name}, visitors for {seconds:g} s")
        udpVisitor.close()  # A new flow per phase.
        lines = len(relay.lines)
        result = _phase(visitors, seconds, public, processes | extra, registerTunnel)
        result["relayLogLines"] = len(relay.lines) - lines
        return result

    quiet = phase("quiet relay", {})
    before = metrics(public)
    plan = AttackPlan(
        seconds=seconds,
        publicPort=public,
        controlPort=control,
        httpPort=httpPort,
        tcpPort=tcpPort,
        udpPort=udpPort,
    )
    # At the lowest priority: a real attacker brings its own CPU, while this one shares the
    # relay's two cores (what it sent is reported, so a starved attacker shows).
    attacker = Child(
        "attacker",
        [
            "nice",
            "-n",
            str(ATTACKER_NICE),
            python(),
            "-m",
            "benchmarks.attacker",
            json.dumps(attrs.asdict(plan)),
        ],
    )
    try:
        attacker.waitFor(r"^attacking$", timeout=60)
        attacked = phase("under attack", {"attacker": attacker})
        line = attacker.waitFor(r"^(result|failed:) ", timeout=seconds + 120).string
        if not line.startswith("result "):
            raise RuntimeError("the attacker failed:\n" + "\n".join(attacker.lines[-30:]))
        attack = json.loads(line[len("result ") :])
    finally:
        attacker.stop()
    after = metrics(public)
    quietAfter = phase("quiet again", {})
    udpVisitor.close()
    refusalsBefore = _refusals(before)
    refused = {
        reason: count - refusalsBefore.get(reason, 0)
        for reason, count in _refusals(after).items()
        if count - refusalsBefore.get(reason, 0)
    }
    return {
        "seconds": seconds,
        "visitorSource": VISITOR,
        "visitIntervalSeconds": VISIT_INTERVAL,
        "limits": LIMITS,
        "attackPlan": attrs.asdict(plan),
        "quiet": quiet,
        "attacked": attacked,
        "quietAfter": quietAfter,
        "comparison": _comparison(quiet, attacked),
        "comparisonQuietAfter": _comparison(quietAfter, attacked),
        "attack": attack,
        "refusalsDuringAttack": refused,
        "quotas": _quotas(attack, attacked["gaugePeaks"]),
        "udpCounters": {
            name: after.get(f"portal_relay_{name}_total", 0)
            - before.get(f"portal_relay_{name}_total", 0)
            for name in ("udp_to_tunnel", "udp_dropped")
        },
        "notes": [
            f"visitors: from {VISITOR}, each kind on its own thread of this harness, one visit "
            f"every {VISIT_INTERVAL * 1000:g} ms (back to back when one takes longer), a visit "
            f"failing after {VISIT_TIMEOUT:g} s of silence; stream: a new TLS 1.3 connection "
            "through the relay to the tunnel, which terminates TLS, and a 1-byte exchange with the "
            "plain sink; routed HTTP: a new TLS connection and GET / through the routed tunnel to "
            "nginx (1 KiB body); UDP: one socket per phase (one flow), each visit a request to the "
            "counting sink through relay and tunnel and its one-datagram answer",
            "time to first byte runs from the TCP connect (UDP: the request) to the first byte of "
            "the answer",
            "phases run one after the other on the same relay: quiet, under attack, quiet again; "
            "the attack is compared with the quiet phase before it (comparison) and after it "
            "(comparisonQuietAfter), which shows how much the machine's other load drifted",
            "the attacker is one process (benchmarks/attacker.py) on this machine, run at nice "
            f"{ATTACKER_NICE}: a real attacker brings its own CPU, this one shares the same 2 "
            "cores as the relay, the tunnels and the visitors, and comes second to them; what it "
            "sent (attempts, challenges asked, datagrams) is reported, so a starved attacker "
            "shows; machineBusyCores counts every process on the machine (other work included)",
            "held connections are the attacker's connections open for a second or more (over the "
            "cap the relay closes a connection at once); relayGaugePeak, the listener's open "
            "connections from every address, read every 2 s",
            "CPU and wait: each process's seconds on a CPU and ready to run but waiting for one "
            "during the phase (/proc/PID/task/*/schedstat)",
            "newTunnelLeaseSeconds: a real portal expose started half way through the phase, "
            "from start to its lease (Python start-up included)",
        ],
    }
