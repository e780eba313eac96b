"""
Child processes of the benchmark harness: start, wait for a line of output, measure, stop.
"""

from __future__ import annotations

import os
import random
import re
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class Child:
    """
    A running child process whose output is collected line by line.

    @ivar name: A name for messages.
    @ivar lines: Output lines so far (stdout and stderr together).
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        env: dict[str, str] | None = None,
        cwd: str | None = None,
    ) -> None:
        """
        Start the child.

        @param env: Variables to add to the child's environment.
        @param cwd: The child's working directory (this process's when L{None}).
        """
        self.name = name
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self.process = subprocess.Popen(
            list(argv),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            start_new_session=True,
            cwd=cwd,
        )
        threading.Thread(target=self._read, daemon=True).start()

    @property
    def pid(self) -> int:
        """
        The child's process id.
        """
        return self.process.pid

    def _read(self) -> None:
        """
        Collect output until the child closes it.
        """
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            with self._changed:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def waitFor(self, pattern: str, timeout: float = 60.0) -> re.Match[str]:
        """
        Wait for an output line matching C{pattern}.

        @raise RuntimeError: When the child ends or the time runs out first (with its output).
        """
        compiled = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._changed:
            while True:
                for line in self.lines[seen:]:
                    match = compiled.search(line)
                    if match:
                        return match
                seen = len(self.lines)
                if self.process.poll() is not None:
                    raise RuntimeError(self._explain(f"ended ({self.process.returncode})", pattern))
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(
                        self._explain(f"printed nothing matching in {timeout}s", pattern)
                    )
                self._changed.wait(min(left, 0.5))

    def _explain(self, what: str, pattern: str) -> str:
        """
        An error message with the child's last output.
        """
        tail = "\n".join(self.lines[-30:])
        return f"{self.name} {what} (waiting for {pattern!r}); last output:\n{tail}"

    def cpuSeconds(self) -> float:
        """
        @return: User plus system CPU seconds the child used so far.
        """
        return cpuSeconds(self.pid)

    def rss(self) -> int:
        """
        @return: The child's resident set size in bytes.
        """
        return rss(self.pid)

    def stop(self) -> None:
        """
        SIGTERM the child's process group, then SIGKILL if it lingers.
        """
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                return
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)


def cpuSeconds(pid: int) -> float:
    """
    @return: User plus system CPU seconds of process C{pid} (all its threads).
    """
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def treeCpuSeconds(pid: int) -> float:
    """
    @return: User plus system CPU seconds of process C{pid} and of its live descendants (sshd serves
        each connection in child processes).
    """
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, itsParent in parents.items():
            if itsParent == parent and child not in tree:
                tree.add(child)
                frontier.append(child)
    total = 0.0
    for member in tree:
        try:
            total += cpuSeconds(member)
        except OSError:
            continue
    return total


def schedSeconds(pid: int) -> tuple[float, float]:
    """
    The scheduler's own accounts of process C{pid}'s live threads, to the nanosecond (from
    C{/proc/PID/task/*/schedstat}); threads that ended are not counted.

    @return: Seconds on a CPU so far, and seconds ready to run but waiting for one.
    """
    running = waiting = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                fields = f.read().split()
        except OSError:
            continue
        running += int(fields[0])
        waiting += int(fields[1])
    return running / 1e9, waiting / 1e9


def machineBusySeconds() -> float:
    """
    @return: CPU seconds all processes on the machine used so far, on all cores (from C{/proc/stat}:
        everything but idle and I/O wait).
    """
    with open("/proc/stat") as f:
        fields = [int(n) for n in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / _CLOCK_TICKS


def rss(pid: int) -> int:
    """
    @return: The resident set size of process C{pid} in bytes.
    """
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def udpSocketDrops(pid: int) -> dict[int, int]:
    """
    @return: For each IPv4 UDP socket process C{pid} holds (by inode), the datagrams the kernel
        dropped on arriving at it, mostly because its receive buffer was full (the C{drops} column
        of C{/proc/net/udp}).
    """
    inodes = _socketInodes(pid)
    drops = {}
    with open("/proc/net/udp") as f:
        next(f)
        for line in f:
            fields = line.split()
            inode = int(fields[9])
            if inode in inodes:
                drops[inode] = int(fields[12])
    return drops


def _socketInodes(pid: int) -> set[int]:
    """
    @return: The inodes of the sockets process C{pid} holds.
    """
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def tcpConnectionsFrom(pid: int, source: str, ports: set[int]) -> dict[int, set[int]]:
    """
    The established IPv4 TCP connections process C{pid} holds from address C{source} on each of
    its local C{ports}: the connections it accepted and has not closed yet, whatever the peer knows
    of them. Asked of the kernel over C{NETLINK_SOCK_DIAG} for established sockets only (a flood
    leaves thousands of others in C{TIME_WAIT}, which C{/proc/net/tcp} would list and this process
    would parse: 35 ms a call with 2,600 connections open and 5,000 closed, against 4 ms). A socket
    on one of C{pid}'s listening C{ports} with an inode has been accepted, and so is held by C{pid}
    (the listener's owner): C{pid}'s descriptors are not read (thousands of links under a flood).

    @param pid: The process listening on C{ports}.
    @return: Per local port (ports with none left out), the connections' socket inodes (the same
        connection has the same inode in a later call).
    """
    remote = socket.inet_aton(source)
    found: dict[int, set[int]] = {}
    for port, peer, inode in _establishedTCP():
        if port in ports and peer == remote and inode:
            found.setdefault(port, set()).add(inode)
    return found


#: Netlink's C{SOCK_DIAG_BY_FAMILY} request and the flags of a dump; the message types that end it.
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_DUMP_REQUEST = 0x1 | 0x300
_NLMSG_DONE, _NLMSG_ERROR = 3, 2
_TCP_ESTABLISHED = 1
_NETLINK_SOCK_DIAG = 4


def _establishedTCP() -> list[tuple[int, bytes, int]]:
    """
    @return: Every established IPv4 TCP socket on the machine as (local port, peer address as 4
        bytes, inode), from the kernel's socket diagnostics (C{inet_diag}).
    """
    request = struct.pack(
        "=LHHLL BBBx L 48x",
        16 + 56,
        _SOCK_DIAG_BY_FAMILY,
        _NLM_F_DUMP_REQUEST,
        1,
        0,
        socket.AF_INET,
        socket.IPPROTO_TCP,
        0,
        1 << _TCP_ESTABLISHED,
    )
    found = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_SOCK_DIAG) as sock:
        sock.sendall(request)
        while True:
            data = sock.recv(1 << 20)
            offset = 0
            while offset + 16 <= len(data):
                length, kind = struct.unpack_from("=LH", data, offset)
                if kind == _NLMSG_DONE:
                    return found
                if kind == _NLMSG_ERROR or length < 16:
                    raise OSError("socket diagnostics refused the request")
                # inet_diag_msg: family, state, timer, retrans; sport, dport (big-endian), src[16],
                # dst[16], interface, cookie[8]; expires, rqueue, wqueue, uid, inode.
                body = offset + 16
                (port,) = struct.unpack_from("!H", data, body + 4)
                peer = data[body + 24 : body + 28]
                (inode,) = struct.unpack_from("=L", data, body + 68)
                found.append((port, peer, inode))
                offset += (length + 3) & ~3


def udpKernelDrops() -> dict[str, int]:
    """
    @return: The machine's UDP error counters (C{/proc/net/snmp}: C{RcvbufErrors}, C{SndbufErrors},
        C{InErrors}) and the packets dropped because a CPU's input backlog was full
        (C{backlogDrops}, the second column of C{/proc/net/softnet_stat}, summed).
    """
    with open("/proc/net/snmp") as f:
        rows = [line.split() for line in f if line.startswith("Udp:")]
    counters = dict(zip(rows[0][1:], (int(n) for n in rows[1][1:]), strict=True))
    with open("/proc/net/softnet_stat") as f:
        backlog = sum(int(line.split()[1], 16) for line in f)
    return {
        "RcvbufErrors": counters["RcvbufErrors"],
        "SndbufErrors": counters["SndbufErrors"],
        "InErrors": counters["InErrors"],
        "backlogDrops": backlog,
    }


def freePort() -> int:
    """
    A loopback port that was free a moment ago (for servers that cannot report a port they chose,
    such as HAProxy and nginx).
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def freePortRange(count: int, attempts: int = 50, belowEphemeral: bool = False) -> tuple[int, int]:
    """
    C{count} consecutive loopback ports, free for both TCP and UDP a moment ago, starting at one the
    OS picks (for a relay's C{--tcp-ports} or C{--udp-ports}); after half the attempts, at a
    random port below the ephemeral range (on a busy machine, outgoing connections and their
    TIME_WAIT leave few free runs in it).

    @param belowEphemeral: Only look below the ephemeral range, where no outgoing connection takes
        a port the relay wants to listen on later.
    @return: The first and last port.
    @raise RuntimeError: When no such range turns up in C{attempts} tries.
    """
    for attempt in range(attempts):
        if belowEphemeral or attempt >= attempts // 2:
            low = random.randrange(10000, 32768 - count)
        else:
            low = freePort()
        if low + count - 1 > 65535:
            continue
        held: list[socket.socket] = []
        try:
            for port in range(low, low + count):
                for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                    s = socket.socket(socket.AF_INET, kind)
                    held.append(s)
                    s.bind(("127.0.0.1", port))
            return low, low + count - 1
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise RuntimeError(f"no {count} consecutive free ports found")


def raiseFileLimit(wanted: int) -> int:
    """
    Raise this process's open file limit (children inherit it).

    @return: The soft limit now in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = max(soft, wanted)
    if hard != resource.RLIM_INFINITY and hard < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, target))
            return target
        except (ValueError, OSError):
            target = hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return soft
    return target


def tool(name: str) -> str | None:
    """
    @return: The path of an installed program, or L{None}.
    """
    return shutil.which(name) or (
        f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None
    )


def python() -> str:
    """
    @return: This Python.
    """
    return sys.executable


def twistd() -> str:
    """
    @return: The C{twistd} next to this Python.
    """
    candidate = os.path.join(os.path.dirname(sys.executable), "twistd")
    return candidate if os.path.exists(candidate) else (shutil.which("twistd") or "twistd")
