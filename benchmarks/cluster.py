"""
C{python -m benchmarks.cluster [--quick] [--out DIR]}: the relay cluster (docs/cluster.md) on
127.0.0.1, measured on the path a user runs.

- Added time to first byte when a visitor arrives at a member that does not hold the tunnel: real
  etcd, two real C{twistd portal-relay} members, a real C{portal expose} on member A; new TLS
  connections (connect + TLS 1.3 + C{GET /}) to A's public port and to B's, interleaved, same run.
  CPU per connection of each member from C{/proc}.
- Registration cost against etcd: the ownership claim and live route a registration adds, as
  claims/s through the relay's own etcd client, and whether 10,000 owned names make a claim slower
  than the first 100.

Writes C{DIR/<date>-cluster.json} and C{.md}.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import re
import shutil
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from benchmarks import workload
from benchmarks.procs import Child, cpuSeconds, freePort, python, twistd

_T = TypeVar("_T")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _startEtcd(base: str) -> tuple[Child, str]:
    client, peer = freePort(), freePort()
    etcd = shutil.which("etcd")
    if etcd is None:
        raise SystemExit("etcd is needed (apt-get install etcd-server)")
    child = Child(
        "etcd",
        [
            etcd,
            "--data-dir",
            os.path.join(base, "etcd"),
            "--listen-client-urls",
            f"http://127.0.0.1:{client}",
            "--advertise-client-urls",
            f"http://127.0.0.1:{client}",
            "--listen-peer-urls",
            f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls",
            f"http://127.0.0.1:{peer}",
            "--initial-cluster",
            f"default=http://127.0.0.1:{peer}",
        ],
    )
    child.waitFor(r"ready to serve client requests|serving insecure client requests")
    return child, f"127.0.0.1:{client}"


def _startRelay(
    base: str,
    name: str,
    etcd: str,
    workers: int = 1,
    host: str = "127.0.0.1",
    extra: Sequence[str] = (),
) -> tuple[Child, int, int]:
    """
    Start a cluster member named C{name} (with C{workers} worker processes), its public listener
    on C{host}, with C{extra} options, and wait until it has joined.

    @return: The child, its public port and its control port.
    """
    home = os.path.join(base, name)
    os.makedirs(home)
    child = Child(
        f"relay-{name}",
        [
            twistd(),
            "-n",
            "--pidfile=",
            "portal-relay",
            "--state-dir",
            os.path.join(home, "state"),
            "--public",
            f"tcp:0:interface={host}",
            "--control",
            "tcp:0:interface=127.0.0.1",
            "--tunnel-domain",
            "cluster.localhost",
            "--cluster",
            f"etcd://{etcd}",
            "--node-name",
            name,
            "--workers",
            str(workers),
            *extra,
        ],
        env={"HOME": home},
    )
    public = int(child.waitFor(rf"public listening on {re.escape(host)}:(\d+)").group(1))
    control = int(child.waitFor(r"control listening on 127\.0\.0\.1:(\d+)").group(1))
    suffix = rf"-w{workers - 1}" if workers > 1 else ""
    child.waitFor(rf"joined relay cluster .* as {name}{suffix} ")
    return child, public, control


def _ttfb(port: int, hostname: str, context: ssl.SSLContext) -> float:
    """
    One routed request's time to first byte (L{workload.httpFirstByte}, 10 s per socket step).
    """
    return workload.httpFirstByte(port, hostname, context, None, 10)


def _ttfbNumbered(port: int, hostname: str, context: ssl.SSLContext, index: int) -> float:
    """
    L{_ttfb}, for a thread pool's C{map} over connection numbers.
    """
    return _ttfb(port, hostname, context)


def _startTunnel(home: str, pagePort: int, name: str, control: int) -> Child:
    """
    Start a real C{portal expose PAGEPORT --name NAME} on the relay control port C{control}.
    """
    return Child(
        "portal expose",
        [
            python(),
            "-m",
            "portal",
            "expose",
            str(pagePort),
            "--name",
            name,
            "--relay",
            f"127.0.0.1:{control}",
            "--identity",
            os.path.join(home, "identity.json"),
            "--json",
        ],
        env={"HOME": home},
    )


def _lease(tunnel: Child) -> tuple[str, ssl.SSLContext]:
    """
    Wait for the tunnel's lease.

    @return: Its hostname, and a TLS context trusting the tunnel's local CA.
    """
    lease = json.loads(tunnel.waitFor(r'^\{.*"event": "lease".*\}$').group(0))
    hostname = lease["url"].removeprefix("https://").rpartition(":")[0]
    return hostname, ssl.create_default_context(cafile=lease["ca"])


def forwardedVisitor(base: str, etcd: str, connections: int) -> dict[str, Any]:
    """
    Time to first byte at the holding member and at another member, interleaved.
    """
    a = _startRelay(base, "a", etcd)
    b = _startRelay(base, "b", etcd)
    page = Child("page", [python(), "-m", "http.server", "0", "--bind", "127.0.0.1"])
    pagePort = int(page.waitFor(r"port (\d+)").group(1))
    home = os.path.join(base, "tunnel")
    tunnel = _startTunnel(home, pagePort, "bench", a[2])
    try:
        hostname, context = _lease(tunnel)
        deadline = time.monotonic() + 20
        while True:
            try:
                _ttfb(b[1], hostname, context)
                break
            except (OSError, ssl.SSLError, RuntimeError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        times: dict[str, list[float]] = {"holder": [], "forwarded": []}
        cpu = {"a": cpuSeconds(a[0].pid), "b": cpuSeconds(b[0].pid)}
        for _ in range(connections):
            times["holder"].append(_ttfb(a[1], hostname, context))
            times["forwarded"].append(_ttfb(b[1], hostname, context))
        cpuA = cpuSeconds(a[0].pid) - cpu["a"]
        cpuB = cpuSeconds(b[0].pid) - cpu["b"]
    finally:
        for child in (tunnel, page, b[0], a[0]):
            child.stop()
    result = {
        "connections": connections,
        "holderTTFBp50ms": statistics.median(times["holder"]) * 1e3,
        "holderTTFBp99ms": _percentile(times["holder"], 0.99) * 1e3,
        "forwardedTTFBp50ms": statistics.median(times["forwarded"]) * 1e3,
        "forwardedTTFBp99ms": _percentile(times["forwarded"], 0.99) * 1e3,
        # A serves every connection (both paths end there); B forwards half of them.
        "holderCPUPerConnectionMs": cpuA / (2 * connections) * 1e3,
        "forwarderCPUPerForwardedConnectionMs": cpuB / connections * 1e3,
    }
    result["addedByHopP50ms"] = result["forwardedTTFBp50ms"] - result["holderTTFBp50ms"]
    return result


def _workerPids(parent: int) -> list[int]:
    """
    @return: The parent and its worker children's pids.
    """
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == parent:
                children.append(int(entry))
    return [parent, *children]


def workersScaling(
    base: str, etcd: str, connections: int, threads: int, rounds: int = 4
) -> dict[str, Any]:
    """
    New connections per second through a relay with one worker and through one with two, same
    tunnel type, C{threads} clients at once; each worker process's CPU per connection. Both relays
    run side by side and are measured in alternating blocks (C{rounds} of C{connections /
    rounds} each, one worker first, then two), so that a drift of the machine's pace touches both;
    each figure is over all of a configuration's blocks.
    """
    import concurrent.futures

    page = Child("page", [python(), "-m", "http.server", "0", "--bind", "127.0.0.1"])
    pagePort = int(page.waitFor(r"port (\d+)").group(1))
    out: dict[str, Any] = {"connections": connections, "clientThreads": threads, "rounds": rounds}
    started: list[Child] = []
    try:
        paths = {}
        for workers in (1, 2):
            relay, public, control = _startRelay(base, f"relay-{workers}w", etcd, workers)
            started.append(relay)
            home = os.path.join(base, f"tunnel-{workers}w")
            tunnel = _startTunnel(home, pagePort, f"scale{workers}", control)
            started.append(tunnel)
            hostname, context = _lease(tunnel)
            _ttfb(public, hostname, context)
            paths[workers] = (relay, tunnel, public, hostname, context, _workerPids(relay.pid))
        totals = {
            workers: {"seconds": 0.0, "tunnel": 0.0, "cpu": {pid: 0.0 for pid in path[5]}}
            for workers, path in paths.items()
        }
        block = max(1, connections // rounds)
        for _ in range(rounds):
            for workers, (_, tunnel, public, hostname, context, pids) in paths.items():
                before = {pid: cpuSeconds(pid) for pid in pids}
                tunnelBefore = cpuSeconds(tunnel.pid)
                start = time.perf_counter()
                target = functools.partial(_ttfbNumbered, public, hostname, context)
                with concurrent.futures.ThreadPoolExecutor(threads) as pool:
                    list(pool.map(target, range(block)))
                total = totals[workers]
                total["seconds"] += time.perf_counter() - start
                total["tunnel"] += cpuSeconds(tunnel.pid) - tunnelBefore
                for pid in pids:
                    total["cpu"][pid] += cpuSeconds(pid) - before[pid]
        measured = block * rounds
        for workers, total in totals.items():
            cpu = total["cpu"]
            out[f"workers{workers}"] = {
                "connectionsPerSecond": measured / total["seconds"],
                "relayCPUPerConnectionMs": sum(cpu.values()) / measured * 1e3,
                "perWorkerCPUSeconds": sorted(cpu.values(), reverse=True),
                # Each worker's CPU over all of the configuration's connections, busiest first
                # (with two workers: the one holding the tunnel serves every visitor, those it
                # accepted and those handed to it; the other only hands visitors over).
                "perWorkerCPUPerConnectionMs": [
                    seconds / measured * 1e3 for seconds in sorted(cpu.values(), reverse=True)
                ],
                "tunnelCPUPerConnectionMs": total["tunnel"] / measured * 1e3,
            }
    finally:
        for child in reversed(started):
            child.stop()
        page.stop()
    one, two = out["workers1"], out["workers2"]
    out["rateRatio"] = two["connectionsPerSecond"] / one["connectionsPerSecond"]
    out["relayCPUPerConnectionRatio"] = (
        two["relayCPUPerConnectionMs"] / one["relayCPUPerConnectionMs"]
    )
    return out


def registrationCost(etcd: str, names: int) -> dict[str, Any]:
    """
    Claims per second through the relay's etcd client, and the cost of the last 100 of C{names}
    claims against the first 100.
    """
    from twisted.internet import reactor, task
    from twisted.internet.defer import ensureDeferred

    from portal.relay.cluster import ClusterDirectory, Member
    from portal.relay.etcd import EtcdClient
    from portal.trust.identity import Identity

    identity = Identity.generate()
    me = Member(identity.id, identity.publicKey, "127.0.0.1:1", "bench")
    result: dict[str, Any] = {}

    async def run() -> None:
        client = EtcdClient([f"http://{etcd}"], reactor)
        directory = ClusterDirectory(client, reactor, "bench.localhost", me)
        await directory.start()
        durations = []
        start = time.perf_counter()
        for i in range(names):
            began = time.perf_counter()
            other = await directory.claimOwnership(f"n{i}", "owner", 3600)
            await directory.announce(f"n{i}")
            durations.append(time.perf_counter() - began)
            assert other is None
        total = time.perf_counter() - start
        await directory.stop()
        await client.close()
        result.update(
            names=names,
            registrationsPerSecond=names / total,
            first100p50ms=statistics.median(durations[:100]) * 1e3,
            last100p50ms=statistics.median(durations[-100:]) * 1e3,
        )
        result["lastOverFirst"] = result["last100p50ms"] / result["first100p50ms"]
        print("RESULT", json.dumps(result), flush=True)

    task.react(lambda _: ensureDeferred(run()))  # type: ignore[no-untyped-call]
    return result


def benchArguments(prog: str) -> argparse.Namespace:
    """
    @param prog: The command's name, for its help.
    @return: C{--quick} and C{--out} (the results folder) as given.
    """
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    return parser.parse_args()


def withEtcd(prefix: str, work: Callable[[str, str], _T]) -> _T:
    """
    Run C{work(base, etcdAddress)} with a single-node etcd started in a new temporary folder,
    stopped afterwards whatever happens.
    """
    base = tempfile.mkdtemp(prefix=prefix)
    etcd, address = _startEtcd(base)
    try:
        return work(base, address)
    finally:
        etcd.stop()


def writeResults(out: str, stem: str, data: dict[str, Any], table: list[str]) -> None:
    """
    Write C{out/stem.json} and C{out/stem.md}, and print the table.
    """
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, stem)
    with open(path + ".json", "w") as f:
        json.dump(data, f, indent=2)
    with open(path + ".md", "w") as f:
        f.write("\n".join(table))
    print("\n".join(table))


def main() -> None:
    """
    Run both measurements and write the results.
    """
    args = benchArguments("python -m benchmarks.cluster")

    def members(base: str, address: str) -> tuple[dict[str, Any], dict[str, Any]]:
        hop = forwardedVisitor(base, address, 100 if args.quick else 500)
        print(json.dumps(hop), flush=True)
        scaling = workersScaling(base, address, 200 if args.quick else 2000, 4)
        print(json.dumps(scaling), flush=True)
        return hop, scaling

    def claimCost(base: str, address: str) -> dict[str, Any]:
        # In a child, so that task.react's reactor is fresh.
        child = Child(
            "claims",
            [
                python(),
                "-c",
                "from benchmarks.cluster import registrationCost; "
                f"registrationCost({address!r}, {1000 if args.quick else 10000})",
            ],
        )
        line = child.waitFor(r"^RESULT ", timeout=900).string
        result: dict[str, Any] = json.loads(line.removeprefix("RESULT "))
        return result

    hop, scaling = withEtcd("portal-cluster-bench-", members)
    claims = withEtcd("portal-cluster-bench-", claimCost)
    results = {
        "date": datetime.date.today().isoformat(),
        "forwardedVisitor": hop,
        "workersScaling": scaling,
        "registration": claims,
    }
    table = [
        "# Relay cluster benchmark",
        "",
        f"Run {results['date']} on this machine (2 cores, loopback), `python -m benchmarks.cluster`"
        + (" --quick" if args.quick else "")
        + ".",
        "",
        "| measure | value |",
        "|---|---|",
        f"| new connections, each path | {hop['connections']} |",
        f"| TTFB p50 at the holding member | {hop['holderTTFBp50ms']:.2f} ms |",
        f"| TTFB p50 at another member (one member hop) | {hop['forwardedTTFBp50ms']:.2f} ms |",
        f"| added by the member hop, p50 | {hop['addedByHopP50ms']:.2f} ms |",
        f"| TTFB p99 holder / forwarded | {hop['holderTTFBp99ms']:.2f} / {hop['forwardedTTFBp99ms']:.2f} ms |",
        f"| holding member CPU per connection | {hop['holderCPUPerConnectionMs']:.3f} ms |",
        f"| forwarding member CPU per forwarded connection | {hop['forwarderCPUPerForwardedConnectionMs']:.3f} ms |",
        f"| new connections/s, --workers 1 / --workers 2 ({scaling['clientThreads']} clients) | "
        f"{scaling['workers1']['connectionsPerSecond']:.0f} / {scaling['workers2']['connectionsPerSecond']:.0f} "
        f"(x{scaling['rateRatio']:.2f}) |",
        f"| relay CPU per connection, 1 worker / 2 workers ({scaling['rounds']} alternating blocks each) | "
        f"{scaling['workers1']['relayCPUPerConnectionMs']:.3f} / {scaling['workers2']['relayCPUPerConnectionMs']:.3f} ms "
        f"(x{scaling['relayCPUPerConnectionRatio']:.2f}) |",
        "| relay CPU per connection of each of the 2 workers (the tunnel's holder first), over all "
        "connections | "
        + " / ".join(f"{ms:.3f}" for ms in scaling["workers2"]["perWorkerCPUPerConnectionMs"])
        + f" ms (holder x{scaling['workers2']['perWorkerCPUPerConnectionMs'][0] / scaling['workers1']['relayCPUPerConnectionMs']:.2f} of 1 worker) |",
        f"| tunnel CPU per connection, 1 worker / 2 workers | "
        f"{scaling['workers1']['tunnelCPUPerConnectionMs']:.3f} / {scaling['workers2']['tunnelCPUPerConnectionMs']:.3f} ms |",
        f"| etcd claims + live routes per second (sequential) | {claims['registrationsPerSecond']:.0f} |",
        f"| claim p50, first 100 / last 100 of {claims['names']} | {claims['first100p50ms']:.2f} / {claims['last100p50ms']:.2f} ms (x{claims['lastOverFirst']:.2f}) |",
        "",
    ]
    writeResults(args.out, f"{results['date']}-cluster", results, table)


if __name__ == "__main__":
    sys.exit(main())
