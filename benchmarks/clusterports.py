"""
C{python -m benchmarks.clusterports [--quick] [--out DIR]}: raw TCP and UDP ports in a relay
cluster (docs/cluster.md), measured on the path a user runs.

Real etcd, two real C{twistd portal-relay} members with the same C{--tcp-ports} range (member A's
public address 127.0.0.2, member B's 127.0.0.3), a real C{portal expose --tcp} on member A in front
of the benchmark sink (L{benchmarks.workload}). The same lease port is used at A's address (the
holding member) and at B's (forwarded over a member link), interleaved in one run:

- new connections: connect + a 1-byte exchange with the sink (time to first byte), p50 and p99;
- downloads of one large body on one connection (MB/s), and the CPU time each member spends on it.

Then the same for UDP, with new members and a real C{portal expose --udp} on member A in front of
the UDP sink (L{benchmarks.udpworkload}), the lease's port used at A's address and at B's (B
forwards datagrams over a member link, docs/cluster.md):

- round trips: one request datagram, one answer, p50 and p99;
- 1,400-byte datagrams offered at fixed rates, visitor to service (upload) and service to visitor
  (download): loss, and the CPU time each member spends per datagram.

Writes C{DIR/<date>-cluster-ports.json} and C{.md}.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import statistics
import struct
import threading
import time
from typing import Any

from benchmarks import udpworkload, workload
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


def _expose(base: str, name: str, target: int, mode: str, control: int) -> tuple[Child, int]:
    """
    Start a real C{portal expose 127.0.0.1:TARGET MODE} on the member whose control port is
    C{control}, and wait for its lease.

    @param mode: C{"--tcp"} or C{"--udp"}.
    @return: The child and the lease's public port.
    """
    home = os.path.join(base, name)
    tunnel = Child(
        f"portal expose {mode}",
        [
            python(),
            "-m",
            "portal",
            "expose",
            f"127.0.0.1:{target}",
            mode,
            "--relay",
            f"127.0.0.1:{control}",
            "--identity",
            os.path.join(home, "identity.json"),
            "--json",
        ],
        env={"HOME": home},
    )
    try:
        lease = json.loads(tunnel.waitFor(r'^\{.*"event": "lease".*\}$').group(0))
    except BaseException:
        tunnel.stop()
        raise
    return tunnel, int(lease["url"].rpartition(":")[2])


def measure(base: str, etcd: str, connections: int, size: int, downloads: int) -> dict[str, Any]:
    """
    Both measurements at the holding member and at the forwarding member.
    """
    low, high = freePortRange(4, belowEphemeral=True)
    a, controlA = _startMember(base, "a", HOLDER, etcd, f"{low}-{high}")
    b, _ = _startMember(base, "b", FORWARDER, etcd, f"{low}-{high}")
    listener = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=workload.serveForever, args=(listener, None), daemon=True).start()
    tunnel, port = _expose(base, "tunnel", listener.getsockname()[1], "--tcp", controlA)
    try:
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


#: UDP payload bytes per datagram (as scenario 6b).
UDP_DATAGRAM = 1400
#: Offered UDP loads, Mbit/s of payload.
UDP_LOADS = (100, 200)


def _udpLoad(
    host: str,
    port: int,
    sinkPort: int,
    run: int,
    direction: str,
    mbps: int,
    seconds: float,
    members: tuple[Child, Child],
) -> dict[str, float]:
    """
    Offer C{mbps} of datagrams for C{seconds} through C{host:port}, from the visitor to the sink
    (C{"upload"}) or from the sink to the visitor (C{"download"}).

    @return: Datagrams sent and received, loss in percent, and each member's CPU microseconds per
        datagram sent.
    """
    rate = mbps * 1e6 / 8 / UDP_DATAGRAM
    client = udpworkload.udpSocket()
    try:
        client.connect((host, port))
        before = cpuSeconds(members[0].pid), cpuSeconds(members[1].pid)
        if direction == "upload":
            sent, _ = udpworkload.send(client, None, run, UDP_DATAGRAM, rate, seconds)
            received = udpworkload.settled(sinkPort, run)["received"]
        else:
            tally = udpworkload.requestAndReceive(client, run, seconds, rate, UDP_DATAGRAM)
            sent, received = udpworkload.query(sinkPort, run)["sent"], tally.received
        after = cpuSeconds(members[0].pid), cpuSeconds(members[1].pid)
    finally:
        client.close()
    return {
        "sent": float(sent),
        "received": float(received),
        "lossPercent": 100 * (1 - received / sent) if sent else 100.0,
        "holderCpuUs": (after[0] - before[0]) * 1e6 / sent if sent else 0.0,
        "forwarderCpuUs": (after[1] - before[1]) * 1e6 / sent if sent else 0.0,
    }


def measureUDP(base: str, etcd: str, roundTrips: int, seconds: float) -> dict[str, Any]:
    """
    UDP round trips and loads at the holding member and at the forwarding member, interleaved.
    """
    low, high = freePortRange(4, belowEphemeral=True)
    extra = ["--udp-ports", f"{low}-{high}"]
    a, _, controlA = _startRelay(base, "ua", etcd, host=HOLDER, extra=extra)
    b, _, _ = _startRelay(base, "ub", etcd, host=FORWARDER, extra=extra)
    sink = Child("udp sink", [python(), "-m", "benchmarks.udpworkload"])
    tunnel: Child | None = None
    try:
        sinkPort = int(sink.waitFor(r"^listening (\d+) ").group(1))
        tunnel, port = _expose(base, "udptunnel", sinkPort, "--udp", controlA)
        runs = iter(range(1, 1 << 30))
        sockets = {host: udpworkload.udpSocket() for host in (HOLDER, FORWARDER)}
        try:
            for host, sock in sockets.items():
                sock.connect((host, port))
                deadline = time.monotonic() + 20
                while True:  # B learns of the port through etcd's watch.
                    try:
                        udpworkload.answerTime(sock, next(runs), 0.5)
                        break
                    except (TimeoutError, ConnectionRefusedError):
                        if time.monotonic() > deadline:
                            raise
            times: dict[str, list[float]] = {HOLDER: [], FORWARDER: []}
            for _ in range(roundTrips):
                for host, sock in sockets.items():
                    times[host].append(udpworkload.answerTime(sock, next(runs), 2.0))
        finally:
            for sock in sockets.values():
                sock.close()
        loads: dict[str, list[dict[str, float]]] = {}
        for mbps in UDP_LOADS:
            for direction in ("upload", "download"):
                for _ in range(2):
                    for host in (HOLDER, FORWARDER):
                        loads.setdefault(f"{host} {direction} {mbps}", []).append(
                            _udpLoad(
                                host, port, sinkPort, next(runs), direction, mbps, seconds, (a, b)
                            )
                        )
    finally:
        for child in (tunnel, sink, b, a):
            if child is not None:
                child.stop()
    result: dict[str, Any] = {"roundTrips": roundTrips, "seconds": seconds, "loads": {}}
    for label, host in (("holder", HOLDER), ("forwarded", FORWARDER)):
        result[f"{label}RTTp50ms"] = statistics.median(times[host]) * 1e3
        result[f"{label}RTTp99ms"] = _percentile(times[host], 0.99) * 1e3
        for mbps in UDP_LOADS:
            for direction in ("upload", "download"):
                runsOf = loads[f"{host} {direction} {mbps}"]
                result["loads"][f"{label} {direction} {mbps}"] = {
                    key: statistics.median(r[key] for r in runsOf) for key in runsOf[0]
                }
    result["addedByHopP50ms"] = result["forwardedRTTp50ms"] - result["holderRTTp50ms"]
    return result


def udpTable(r: dict[str, Any]) -> list[str]:
    """
    @return: The UDP results as Markdown lines.
    """
    lines = [
        "## UDP",
        "",
        "| measure | at the holding member | at another member (member hop) |",
        "|---|---|---|",
        f"| round trip (request, answer), p50 | {r['holderRTTp50ms']:.2f} ms | {r['forwardedRTTp50ms']:.2f} ms |",
        f"| same, p99 | {r['holderRTTp99ms']:.2f} ms | {r['forwardedRTTp99ms']:.2f} ms |",
    ]
    for mbps in UDP_LOADS:
        for direction in ("upload", "download"):
            at = r["loads"][f"holder {direction} {mbps}"]
            via = r["loads"][f"forwarded {direction} {mbps}"]
            lines.append(
                f"| {direction} at {mbps} Mbit/s: loss | {at['lossPercent']:.2f} % | {via['lossPercent']:.2f} % |"
            )
            lines.append(
                f"| same: CPU per datagram, holder / forwarder | {at['holderCpuUs']:.1f} / "
                f"{at['forwarderCpuUs']:.1f} us | {via['holderCpuUs']:.1f} / {via['forwarderCpuUs']:.1f} us |"
            )
    lines += [
        "",
        f"{r['roundTrips']} round trips on each path, interleaved; added by the member hop, p50: "
        f"{r['addedByHopP50ms']:.2f} ms. Loads: {UDP_DATAGRAM}-byte datagrams for {r['seconds']:g} s, "
        "each path twice (median), paths alternating.",
        "",
    ]
    return lines


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
    udp = withEtcd(
        "portal-clusterports-udp-bench-",
        lambda base, address: measureUDP(
            base, address, roundTrips=100 if args.quick else 500, seconds=1.0 if args.quick else 2.0
        ),
    )
    date = datetime.date.today().isoformat()
    r = result
    table = [
        "# Relay cluster: raw TCP and UDP ports",
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
        *udpTable(udp),
    ]
    writeResults(
        args.out, f"{date}-cluster-ports", {"date": date, "rawTCP": result, "udp": udp}, table
    )


if __name__ == "__main__":
    main()
