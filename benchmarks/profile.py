"""
C{python -m benchmarks.profile [--mode stream|tcp] [--seconds S] [--out DIR]}: profile the
new-connection path of stream mode (or of raw TCP mode) with py-spy (C{pip install -e '.[bench]'}):
a relay and a real C{portal expose PORT} (C{--tcp}) in front of the plain sink, new TLS connections
(plain TCP connections) one after another for S seconds while py-spy samples both processes, then each process's busiest functions (time inside them, callees included) as a share
of its reactor thread's busy samples (waiting in C{epoll} and idle pool threads left out). The raw
stacks are written to C{DIR/profile-relay.txt} and C{DIR/profile-tunnel.txt} (py-spy's collapsed
format, for a flame graph).
"""

from __future__ import annotations

import argparse
import collections
import os
import ssl
import subprocess
import sys
import time
from collections.abc import Callable

from benchmarks import workload
from benchmarks.lab import Lab
from benchmarks.procs import Child, tool

#: Samples per second py-spy takes.
RATE = 400
#: Frames that mean a thread is waiting, not working (its own samples are left out).
IDLE_FRAMES = ("EPollReactor.doPoll", "LeanPolling.doPoll", "Condition.wait")


def busiest(stacks: str, top: int = 25) -> list[tuple[float, str]]:
    """
    The functions a profile's busy samples spent most time in, callees included.

    @param stacks: py-spy's raw output: one C{frame;frame;... COUNT} line per distinct stack.
    @param top: How many functions to return.
    @return: (share of busy samples in percent, function) pairs, busiest first, leaving out the
        functions on every busy stack.
    """
    inside: collections.Counter[str] = collections.Counter()
    busy = 0
    for line in stacks.splitlines():
        if not line.strip():
            continue
        stack, count = line.rsplit(" ", 1)
        frames = stack.split(";")
        if frames[-1].startswith(IDLE_FRAMES):
            continue
        busy += int(count)
        for name in {frame.split(" (")[0] for frame in frames}:
            inside[name] += int(count)
    # Functions on every busy stack (the reactor's run loop and what starts it) say nothing.
    shares = [(100 * n / busy, name) for name, n in inside.most_common() if n < busy]
    return shares[:top]


def newConnectionPath(lab: Lab, mode: str, name: str) -> tuple[Child, Child, Callable[[], float]]:
    """
    Start the path a user runs for new connections: a relay and a real C{portal expose} in front
    of the plain sink, in stream mode (TLS in the tunnel) or raw TCP mode (C{"tcp"}), warmed up
    (the data session pool, the certificate).

    @param mode: C{"stream"} or C{"tcp"}.
    @param name: The lease's name.
    @return: The relay, the tunnel, and one new connection with a 1-byte exchange (its time to
        first byte).
    """
    _, plainPort = lab.sink(tls=False)
    host: str | None
    context: ssl.SSLContext | None
    if mode == "tcp":
        relay, _, control = lab.tcpRelay()
        tunnel, public = lab.tcpTunnel(control, plainPort, name)
        host, context = None, None
    else:
        relay, public, control = lab.relay()
        tunnel, url = lab.tunnel(control, plainPort, name)
        host = url.split("//", 1)[1].rsplit(":", 1)[0]
        context = workload.clientContext()

    def visit() -> float:
        return workload.firstByte(public, host, context)

    for _ in range(50):
        visit()
    return relay, tunnel, visit


def main(argv: list[str] | None = None) -> int:
    """
    Run the profile and print each process's busiest functions.

    @return: The exit code.
    """
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__)
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds of new connections")
    parser.add_argument("--out", default=".", help="folder for the raw stacks")
    parser.add_argument(
        "--mode",
        choices=("stream", "tcp"),
        default="stream",
        help="stream mode (TLS in the tunnel) or raw TCP mode (--tcp)",
    )
    args = parser.parse_args(argv)
    nextToPython = os.path.join(os.path.dirname(sys.executable), "py-spy")
    spy = nextToPython if os.path.exists(nextToPython) else tool("py-spy")
    if spy is None:
        parser.error("py-spy is not installed (pip install -e '.[bench]')")
    os.makedirs(args.out, exist_ok=True)
    lab = Lab()
    try:
        relay, tunnel, visit = newConnectionPath(lab, args.mode, "profile")
        processes: dict[str, Child] = {"relay": relay, "tunnel": tunnel}
        paths = {name: os.path.join(args.out, f"profile-{name}.txt") for name in processes}
        spies = [
            subprocess.Popen(
                [spy, "record", "-r", str(RATE), "-f", "raw", "-o", paths[name]]
                + ["-p", str(child.pid), "-d", str(int(args.seconds) + 3)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for name, child in processes.items()
        ]
        time.sleep(1.0)  # py-spy attaches.
        before = {name: child.cpuSeconds() for name, child in processes.items()}
        count, start = 0, time.monotonic()
        while time.monotonic() - start < args.seconds:
            visit()
            count += 1
        used = {name: child.cpuSeconds() - before[name] for name, child in processes.items()}
        for running in spies:
            running.wait()
    finally:
        lab.close()
    print(f"{count} connections in {args.seconds:g} s (py-spy sampling slows both processes)")
    for name, path in paths.items():
        print(f"\n{name}: {used[name] / count * 1e6:,.0f} µs CPU per connection; busiest:")
        with open(path) as f:
            for share, function in busiest(f.read()):
                print(f"  {share:5.1f}%  {function}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
