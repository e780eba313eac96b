"""
C{python -m benchmarks.syscalls [--mode stream|tcp] [--connections N]}: the system calls the relay
and the tunnel make per new connection, counted by C{strace -c} (Debian package C{strace}) on the
path a user runs: a relay and a real C{portal expose PORT} (C{--tcp} with C{--mode tcp}) in front
of the plain sink, N new connections (TLS in stream mode, plain TCP in raw TCP mode) with a 1-byte
exchange, one after another. Prints each process's calls per connection, busiest first.

strace slows both processes many times over: count calls with it, never time anything.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time

from benchmarks.lab import Lab
from benchmarks.procs import tool
from benchmarks.profile import newConnectionPath


def parseSummary(text: str) -> dict[str, int]:
    """
    Read C{strace -c}'s summary table.

    @param text: The table (C{% time seconds usecs/call calls [errors] syscall} rows).
    @return: Calls by system call name (the total row left out).
    """
    calls: dict[str, int] = {}
    for line in text.splitlines():
        words = line.split()
        if len(words) < 5 or not words[3].isdigit() or words[-1] == "total":
            continue
        calls[words[-1]] = int(words[3])
    return calls


def main(argv: list[str] | None = None) -> int:
    """
    Count, print.

    @return: The exit code.
    """
    parser = argparse.ArgumentParser(prog="python -m benchmarks.syscalls", description=__doc__)
    parser.add_argument("--mode", choices=("stream", "tcp"), default="stream")
    parser.add_argument("--connections", type=int, default=300)
    args = parser.parse_args(argv)
    strace = tool("strace")
    if strace is None:
        parser.error("strace is not installed (apt-get install strace)")
    folder = tempfile.mkdtemp(prefix="portal-syscalls-")
    lab = Lab()
    try:
        relay, tunnel, visit = newConnectionPath(lab, args.mode, "syscalls")
        outputs = {name: os.path.join(folder, f"{name}.txt") for name in ("relay", "tunnel")}
        tracers = [
            subprocess.Popen(
                [strace, "-c", "-f", "-o", outputs[name], "-p", str(child.pid)],
                stderr=subprocess.DEVNULL,
            )
            for name, child in (("relay", relay), ("tunnel", tunnel))
        ]
        time.sleep(1.0)  # strace attaches.
        for _ in range(args.connections):
            visit()
        time.sleep(0.5)  # The last connection's closing calls.
        for tracer in tracers:
            tracer.send_signal(signal.SIGINT)
            tracer.wait(timeout=30)
    finally:
        lab.close()
    print(f"{args.connections} new connections, {args.mode} mode; system calls per connection:")
    for name, path in outputs.items():
        with open(path) as f:
            calls = parseSummary(f.read())
        total = sum(calls.values()) / args.connections
        busiest = sorted(calls.items(), key=lambda item: -item[1])[:12]
        shown = ", ".join(f"{call} {count / args.connections:.1f}" for call, count in busiest)
        print(f"  {name}: {total:.1f} ({shown})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
