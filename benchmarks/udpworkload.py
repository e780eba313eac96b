"""
The UDP benchmark workload (scenario 6b): a counting UDP sink, and the client that offers it paced
datagrams. The sink runs in its own process (C{python -m benchmarks.udpworkload}), on a blocking
socket, so that the same code serves the direct path and the path through Portal.

Every datagram starts with a header: C{kind} (1 byte), C{run} (4 bytes) and C{sequence} (8 bytes),
big-endian. Kinds:
    C{d}: data. The sink counts it under its run (distinct sequence numbers, duplicates, datagrams
        older than the newest seen, bytes); the client does the same for the sink's data.
    C{q}: query (to the sink's port directly). The sink answers C{r} + the run's figures as JSON.
    C{s}: send, followed by C{seconds} and C{rate} (datagrams/s, 0 for as fast as possible), both
        doubles, and C{size} (4 bytes): the sink sends data datagrams of that size, paced, for that
        long, to the sender of the request (the tunnel's flow socket, through Portal). A repeated
        request for a run already served is ignored.
"""

from __future__ import annotations

import json
import socket
import struct
import time
from typing import Any

import attrs

_HEADER = struct.Struct("!cIQ")
_SEND = struct.Struct("!ddI")
#: Socket buffer size the client and the sink ask for (the kernel caps it at C{net.core.rmem_max}
#: and C{net.core.wmem_max}).
BUFFER = 4 << 20
#: Seconds without a new datagram after which a receiver decides the sender has finished.
DRAIN = 0.3


@attrs.define
class Tally:
    """
    What one side counted of one run's data datagrams.

    @ivar received: Datagrams with a sequence number not seen before.
    @ivar duplicates: Datagrams with a sequence number already seen.
    @ivar late: Datagrams older than the newest seen before them (reordered on the way).
    @ivar bytes: Bytes of the distinct datagrams.
    @ivar sent: Datagrams this side sent for the run (the sink, for a C{s} request).
    @ivar sendSeconds: Seconds this side spent sending them.
    """

    received: int = 0
    duplicates: int = 0
    late: int = 0
    bytes: int = 0
    sent: int = 0
    sendSeconds: float = 0.0
    _seen: bytearray = attrs.field(factory=bytearray, repr=False)
    _newest: int = -1

    def count(self, sequence: int, size: int) -> None:
        """
        Count one data datagram.
        """
        seen = self._seen
        if sequence >= len(seen):
            seen.extend(bytes(max(sequence + 1 - len(seen), 65536)))
        if seen[sequence]:
            self.duplicates += 1
            return
        seen[sequence] = 1
        self.received += 1
        self.bytes += size
        if sequence < self._newest:
            self.late += 1
        else:
            self._newest = sequence

    def asDict(self) -> dict[str, Any]:
        """
        @return: The figures, JSON-able.
        """
        return {
            "received": self.received,
            "duplicates": self.duplicates,
            "late": self.late,
            "bytes": self.bytes,
            "sent": self.sent,
            "sendSeconds": self.sendSeconds,
        }


def udpSocket() -> socket.socket:
    """
    @return: A UDP socket on 127.0.0.1 with L{BUFFER}-byte receive and send buffers requested.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUFFER)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUFFER)
    sock.bind(("127.0.0.1", 0))
    return sock


def buffers(sock: socket.socket) -> dict[str, int]:
    """
    @return: The receive and send buffer sizes the kernel reports for C{sock} (Linux reports twice
        the size granted, the other half being its bookkeeping).
    """
    return {
        "rcvbuf": sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
        "sndbuf": sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
    }


def defaultCapacity(size: int) -> int:
    """
    Fill a loopback UDP socket that has the kernel's default receive buffer (as the relay's and the
    tunnel's have) with C{size}-byte datagrams, and count how many it held.

    @return: How many datagrams the default buffer holds before the kernel drops.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as full:
        full.bind(("127.0.0.1", 0))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            sender.connect(full.getsockname())
            payload = bytes(size)
            for _ in range(full.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // size + 100):
                sender.send(payload)
        full.setblocking(False)
        held = 0
        try:
            while True:
                full.recv(65536)
                held += 1
        except BlockingIOError:
            return held


def send(
    sock: socket.socket,
    address: tuple[str, int] | None,
    run: int,
    size: int,
    rate: float,
    seconds: float,
) -> tuple[int, float]:
    """
    Send data datagrams of C{size} bytes numbered from 0 for C{seconds}, each at its due time
    C{n / rate} after the first (a late sender catches up at once, in a burst).

    @param address: Where to, or L{None} on a connected socket.
    @param rate: Datagrams per second, or 0 for as fast as this loop can.
    @return: Datagrams sent (refused sends are not counted) and the seconds spent.
    """
    buffer = bytearray(size)
    perfCounter, sleep, pack = time.perf_counter, time.sleep, _HEADER.pack_into
    write = sock.send if address is None else (lambda data: sock.sendto(data, address))
    count = int(rate * seconds) if rate else 1 << 62
    interval = 1 / rate if rate else 0.0
    start = perfCounter()
    end = start + seconds
    sent = 0
    for sequence in range(count):
        if rate:
            wait = start + sequence * interval - perfCounter()
            if wait > 0:
                sleep(wait)
        elif not sequence & 63 and perfCounter() >= end:
            break
        pack(buffer, 0, b"d", run, sequence)
        try:
            write(buffer)
        except OSError:
            continue
        sent += 1
    return sent, perfCounter() - start


def receive(sock: socket.socket, tally: Tally, run: int, first: float, drain: float) -> None:
    """
    Count data datagrams of C{run} until none arrived for C{drain} seconds (C{first} seconds for
    the first one).
    """
    buffer = bytearray(65536)
    view = memoryview(buffer)
    sock.settimeout(first)
    unpack = _HEADER.unpack_from
    while True:
        try:
            n = sock.recv_into(buffer)
        except TimeoutError:
            return
        if n < _HEADER.size:
            continue
        kind, tag, sequence = unpack(view)
        if kind == b"d" and tag == run:
            if not tally.received:
                sock.settimeout(drain)
            tally.count(sequence, n)


def serve(sock: socket.socket) -> None:
    """
    The sink: count data datagrams per run, answer queries, send on request. Runs forever.
    """
    tallies: dict[int, Tally] = {}
    buffer = bytearray(65536)
    view = memoryview(buffer)
    unpack = _HEADER.unpack_from
    while True:
        n, address = sock.recvfrom_into(buffer)
        if n < _HEADER.size:
            continue
        kind, run, sequence = unpack(view)
        tally = tallies.get(run)
        if tally is None:
            tally = tallies[run] = Tally()
        if kind == b"d":
            tally.count(sequence, n)
        elif kind == b"q":
            sock.sendto(b"r" + json.dumps(tally.asDict()).encode(), address)
        elif kind == b"s" and not tally.sendSeconds and n >= _HEADER.size + _SEND.size:
            seconds, rate, size = _SEND.unpack_from(view, _HEADER.size)
            tally.sent, tally.sendSeconds = send(sock, address, run, size, rate, seconds)


def query(sinkPort: int, run: int, tries: int = 10) -> dict[str, Any]:
    """
    Ask the sink for its figures of C{run}.

    @raise TimeoutError: When the sink does not answer.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(1.0)
        sock.connect(("127.0.0.1", sinkPort))
        for _ in range(tries):
            sock.send(_HEADER.pack(b"q", run, 0))
            try:
                answer = sock.recv(65536)
            except TimeoutError:
                continue
            if answer[:1] == b"r":
                figures: dict[str, Any] = json.loads(answer[1:])
                return figures
    raise TimeoutError(f"the UDP sink on port {sinkPort} does not answer")


def settled(sinkPort: int, run: int, wait: float = 0.2, limit: float = 5.0) -> dict[str, Any]:
    """
    Query the sink until its count for C{run} stops growing (datagrams still queued in the relay's
    and the tunnel's buffers arrive meanwhile), for at most C{limit} seconds.
    """
    figures = query(sinkPort, run)
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        time.sleep(wait)
        again = query(sinkPort, run)
        if again["received"] == figures["received"]:
            return again
        figures = again
    return figures


def requestSend(sock: socket.socket, run: int, seconds: float, rate: float, size: int) -> None:
    """
    Ask the sink, through whatever C{sock} is connected to, to send to it for C{seconds}.
    """
    sock.send(_HEADER.pack(b"s", run, 0) + _SEND.pack(seconds, rate, size))


def requestAndReceive(
    sock: socket.socket, run: int, seconds: float, rate: float, size: int
) -> Tally:
    """
    Ask the sink, through whatever C{sock} is connected to, to send to it for C{seconds}, and count
    what arrives; the request is a datagram too, so it is sent up to three times until data comes.

    @return: What arrived.
    """
    tally = Tally()
    for _ in range(3):
        requestSend(sock, run, seconds, rate, size)
        receive(sock, tally, run, 2.0, DRAIN)
        if tally.received:
            break
    return tally


def answerTime(sock: socket.socket, run: int, timeout: float) -> float:
    """
    Ask the sink, through whatever C{sock} is connected to, for one data datagram of C{run}, and
    wait for it (datagrams of other runs, late answers to earlier requests, are skipped).

    @return: Seconds from the request to the answer.
    @raise TimeoutError: When no answer comes within C{timeout} seconds.
    """
    start = time.perf_counter()
    deadline = start + timeout
    requestSend(sock, run, 0.01, 100.0, _HEADER.size)
    buffer = bytearray(65536)
    while True:
        left = deadline - time.perf_counter()
        if left <= 0:
            raise TimeoutError(f"no answer to UDP request {run} in {timeout:g} s")
        sock.settimeout(left)
        n = sock.recv_into(buffer)
        if n >= _HEADER.size and _HEADER.unpack_from(buffer)[:2] == (b"d", run):
            return time.perf_counter() - start


def main() -> None:
    """
    C{python -m benchmarks.udpworkload}: run the sink on a free loopback UDP port and print
    C{listening PORT RCVBUF SNDBUF}.
    """
    sock = udpSocket()
    granted = buffers(sock)
    print(f"listening {sock.getsockname()[1]} {granted['rcvbuf']} {granted['sndbuf']}", flush=True)
    serve(sock)


if __name__ == "__main__":
    main()
