"""
C{python -m benchmarks.clusterports [--quick] [--out DIR]}: raw TCP ports in a relay cluster
(docs/cluster.md), measured on the path a user runs.

Real etcd, two real C{twistd portal-relay} members with the same C{--tcp-ports} range (member A's
public address 127.0.0.2, member B's 127.0.0.3), a real C{portal expose --tcp} on member A in front
of the benchmark sink (L{benchmarks.workload}). The same lease port is used at A's address (the
holding member) and at B's (forwarded over a member link), interleaved in one run:

- new connections: connect + a 1-byte exchange with the sink (time to first byte), p50 and p99;
- downloads of one large body on one connection (MB/s), and the CPU time each member spends on it.

Writes C{DIR/<date>-cluster-ports.json} and C{.md}.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import statistics
import struct
import sys
import threading
import time
from typing import Any

from benchmarks import workload
from benchmarks.cluster import (
    _percentile,
    _startRelay,
    benchArguments,
    withEtcd,
    writeResults,
)
from benchmarks.lab import UNPACED_TCP
from benchmarks.procs import Child, cpuSeconds, freePortRange, python

_COMMAND = struct.Struct("!cQ")
HOLDER = "127.0.0.2"
FORWARDER = "127.0.0.3"


def _connect(host: str, port: int) -> socket.socket:
    """
    @return: A new connection to C{host:port}, with C{TCP_NODELAY}.
    """
    sock = socket.create_connection((host, port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def firstByte(host: str, port: int) -> float:
    """
    One new connection to C{host:port} with a 1-byte exchange with the sink.

    @return: Seconds from starting the connection to the answer.
    """
    start = time.perf_counter()
    with _connect(host, port) as sock:
        sock.sendall(_COMMAND.pack(b"P", 0))
        if workload.recvExact(sock, 1) != b"P":
            raise ConnectionError("bad answer")
        return time.perf_counter() - start


def download(host: str, port: int, size: int) -> float:
    """
    Receive C{size} bytes from the sink on a new connection.

    @return: Seconds from the request to the last byte.
    """
    with _connect(host, port) as sock:
        start = time.perf_counter()
        sock.sendall(_COMMAND.pack(b"D", size))
        remaining = size
        buffer = bytearray(workload.CHUNK)
        while remaining:
            n = sock.recv_into(buffer, min(remaining, workload.CHUNK))
            if not n:
                raise ConnectionError("closed early")
            remaining -= n
        return time.perf_counter() - start


def _startMember(base: str, name: str, host: str, etcd: str, ports: str) -> tuple[Child, int]:
    """
    Start a member whose public listener and raw TCP ports are on C{host}.

    @return: The child and its control port.
    """
    child, _, control = _startRelay(
        base, name, etcd, host=host, extra=["--tcp-ports", ports, *UNPACED_TCP]
    )
    return child, control


def measure(base: str, etcd: str, connections: int, size: int, downloads: int) -> dict[str, Any]:
    """
    Both measurements at the holding member and at the forwarding member.
    """
    low, high = freePortRange(4, belowEphemeral=True)
    a, controlA = _startMember(base, "a", HOLDER, etcd, f"{low}-{high}")
    b, _ = _startMember(base, "b", FORWARDER, etcd, f"{low}-{high}")
    listener = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=workload.serveForever, args=(listener, None), daemon=True).start()
    home = os.path.join(base, "tunnel")
    tunnel = Child(
        "portal expose",
        [
            python(),
            "-m",
            "portal",
            "expose",
            f"127.0.0.1:{listener.getsockname()[1]}",
            "--tcp",
            "--relay",
            f"127.0.0.1:{controlA}",
            "--identity",
            os.path.join(home, "identity.json"),
            "--json",
        ],
        env={"HOME": home},
    )
    try:
        lease = json.loads(tunnel.waitFor(r'^\{.*"event": "lease".*\}$').group(0))
        port = int(lease["url"].rpartition(":")[2])
        deadline = time.monotonic() + 20
        while True:
            try:
                firstByte(FORWARDER, port)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        times: dict[str, list[float]] = {HOLDER: [], FORWARDER: []}
        for _ in range(connections):
            for host in (HOLDER, FORWARDER):
                times[host].append(firstByte(host, port))
        rates: dict[str, list[float]] = {HOLDER: [], FORWARDER: []}
        cpu: dict[str, dict[str, float]] = {
            host: {"a": 0.0, "b": 0.0} for host in (HOLDER, FORWARDER)
        }
        for _ in range(downloads):
            for host in (HOLDER, FORWARDER):
                before = cpuSeconds(a.pid), cpuSeconds(b.pid)
                seconds = download(host, port, size)
                cpu[host]["a"] += cpuSeconds(a.pid) - before[0]
                cpu[host]["b"] += cpuSeconds(b.pid) - before[1]
                rates[host].append(size / seconds / 1e6)
    finally:
        for child in (tunnel, b, a):
            child.stop()
        listener.close()
    gigabytes = size * downloads / 1e9
    result: dict[str, Any] = {"connections": connections, "downloadBytes": size}
    for label, host in (("holder", HOLDER), ("forwarded", FORWARDER)):
        result[f"{label}TTFBp50ms"] = statistics.median(times[host]) * 1e3
        result[f"{label}TTFBp99ms"] = _percentile(times[host], 0.99) * 1e3
        result[f"{label}DownloadMBps"] = statistics.median(rates[host])
        result[f"{label}HolderCPUsPerGB"] = cpu[host]["a"] / gigabytes
        result[f"{label}ForwarderCPUsPerGB"] = cpu[host]["b"] / gigabytes
    result["addedByHopP50ms"] = result["forwardedTTFBp50ms"] - result["holderTTFBp50ms"]
    return result


def main() -> None:
    """
    Run the measurements and write the results.
    """
    args = benchArguments("python -m benchmarks.clusterports")
    result = withEtcd(
        "portal-clusterports-bench-",
        lambda base, address: measure(
            base,
            address,
            connections=100 if args.quick else 500,
            size=(64 if args.quick else 256) * 1024 * 1024,
            downloads=3,
        ),
    )
    date = datetime.date.today().isoformat()
    r = result
    table = [
        "# Relay cluster: raw TCP ports",
        "",
        f"Run {date} on this machine (2 cores, loopback), `python -m benchmarks.clusterports`"
        + (" --quick" if args.quick else "")
        + ". One raw TCP lease on member A; the same port at A's address and at B's.",
        "",
        "| measure | at the holding member | at another member (member hop) |",
        "|---|---|---|",
        f"| new connection + 1-byte exchange, p50 | {r['holderTTFBp50ms']:.2f} ms | {r['forwardedTTFBp50ms']:.2f} ms |",
        f"| same, p99 | {r['holderTTFBp99ms']:.2f} ms | {r['forwardedTTFBp99ms']:.2f} ms |",
        f"| download of {r['downloadBytes'] >> 20} MiB, median of 3 | {r['holderDownloadMBps']:.0f} MB/s | {r['forwardedDownloadMBps']:.0f} MB/s |",
        f"| holding member CPU per GB | {r['holderHolderCPUsPerGB']:.2f} s | {r['forwardedHolderCPUsPerGB']:.2f} s |",
        f"| forwarding member CPU per GB | {r['holderForwarderCPUsPerGB']:.2f} s | {r['forwardedForwarderCPUsPerGB']:.2f} s |",
        "",
        f"{r['connections']} connections on each path, interleaved; added by the member hop, p50: "
        f"{r['addedByHopP50ms']:.2f} ms.",
        "",
    ]
    writeResults(args.out, f"{date}-cluster-ports", {"date": date, "rawTCP": result}, table)


if __name__ == "__main__":
    sys.exit(main())
