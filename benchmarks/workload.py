"""
The benchmark workload: a sink server that speaks a tiny command protocol over TLS or plain TCP, and
the client measurements that drive it. Blocking sockets and threads, so that the same sink code serves
every path being compared (direct, through Portal, through HAProxy or nginx).

Commands (client -> sink), each C{op} (1 byte) + C{size} (8 bytes, big-endian):
    C{U}: the client sends C{size} bytes; the sink answers C{K} once it has them all.
    C{D}: the sink sends C{size} bytes.
    C{P}: the sink answers C{P} at once (time to first byte).
    C{H}: the sink holds the connection until the client closes it (idle connections).
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
import sys
import threading
import time
from collections.abc import Callable

_COMMAND = struct.Struct("!cQ")
#: Bytes per send/recv call.
CHUNK = 1 << 20
_PAYLOAD = memoryview(os.urandom(CHUNK))


def recvExact(sock: socket.socket | ssl.SSLSocket, count: int) -> bytes:
    """
    Read exactly C{count} bytes.

    @raise ConnectionError: When the peer closes first.
    """
    parts = []
    while count:
        data = sock.recv(min(count, CHUNK))
        if not data:
            raise ConnectionError("closed early")
        parts.append(data)
        count -= len(data)
    return b"".join(parts)


def serverContext(certFile: str, keyFile: str) -> ssl.SSLContext:
    """
    @return: A TLS 1.3 server context for the sink.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(certFile, keyFile)
    return context


def clientContext() -> ssl.SSLContext:
    """
    @return: A TLS 1.3 client context that does not verify (every path presents another certificate;
        verification is tested elsewhere and costs the same on every path).
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def serve(
    sock: socket.socket,
    context: ssl.SSLContext | None,
    onHandshake: Callable[[], object] | None = None,
) -> None:
    """
    Serve one sink connection until the client closes it.

    @param sock: A connected socket (blocking).
    @param context: A server TLS context, or L{None} for plain TCP.
    @param onHandshake: Called once the TLS handshake is done.
    """
    try:
        stream: socket.socket | ssl.SSLSocket = (
            context.wrap_socket(sock, server_side=True) if context else sock
        )
        if onHandshake is not None:
            onHandshake()
        while True:
            try:
                head = recvExact(stream, _COMMAND.size)
            except ConnectionError:
                return
            op, size = _COMMAND.unpack(head)
            if op == b"U":
                buffer = bytearray(CHUNK)
                while size:
                    n = stream.recv_into(buffer, min(size, CHUNK))
                    if not n:
                        return
                    size -= n
                stream.sendall(b"K")
            elif op == b"D":
                while size:
                    n = min(size, CHUNK)
                    stream.sendall(_PAYLOAD[:n])
                    size -= n
            elif op == b"P":
                stream.sendall(b"P")
            elif op == b"H":
                while stream.recv(65536):
                    pass
                return
            else:
                return
    except (OSError, ssl.SSLError):
        return
    finally:
        sock.close()


def serveForever(listener: socket.socket, context: ssl.SSLContext | None) -> None:
    """
    Accept connections and serve each on its own thread.
    """
    threading.stack_size(256 * 1024)
    while True:
        sock, _ = listener.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=serve, args=(sock, context), daemon=True).start()


def _connect(  # type: ignore[no-untyped-def]
    port: int,
    serverName: str | None,
    context: ssl.SSLContext | None,
    source: str | None = None,
    timeout: float = 120,
):
    """
    Connect to 127.0.0.1:C{port}, with TLS when C{context} is given.

    @param source: The loopback address to connect from (another source address to the relay), or
        L{None} for the system's choice.
    @param timeout: Seconds any one socket operation may take.
    """
    sock = socket.create_connection(
        ("127.0.0.1", port), timeout=timeout, source_address=(source, 0) if source else None
    )
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if context is None:
        return sock
    return context.wrap_socket(sock, server_hostname=serverName)


def upload(port: int, serverName: str | None, size: int, tls: bool = True) -> float:
    """
    Send C{size} bytes on a new connection and wait for the sink's acknowledgement.

    @return: Seconds from the first byte sent to the acknowledgement.
    """
    stream = _connect(port, serverName, clientContext() if tls else None)
    try:
        start = time.perf_counter()
        stream.sendall(_COMMAND.pack(b"U", size))
        remaining = size
        while remaining:
            n = min(remaining, CHUNK)
            stream.sendall(_PAYLOAD[:n])
            remaining -= n
        if recvExact(stream, 1) != b"K":
            raise ConnectionError("bad acknowledgement")
        return time.perf_counter() - start
    finally:
        stream.close()


def download(port: int, serverName: str | None, size: int, tls: bool = True) -> float:
    """
    Receive C{size} bytes on a new connection.

    @return: Seconds from the request to the last byte.
    """
    stream = _connect(port, serverName, clientContext() if tls else None)
    try:
        start = time.perf_counter()
        stream.sendall(_COMMAND.pack(b"D", size))
        remaining = size
        buffer = bytearray(CHUNK)
        while remaining:
            n = stream.recv_into(buffer, min(remaining, CHUNK))
            if not n:
                raise ConnectionError("closed early")
            remaining -= n
        return time.perf_counter() - start
    finally:
        stream.close()


def firstByte(
    port: int,
    serverName: str | None,
    context: ssl.SSLContext | None,
    source: str | None = None,
    timeout: float = 120,
) -> float:
    """
    One new connection (TLS with C{context}, else plain TCP) with a 1-byte exchange.

    @param source: The address to connect from (see L{_connect}).
    @param timeout: Seconds any one socket operation may take.
    @return: Seconds from starting the TCP connection to receiving the first byte.
    """
    start = time.perf_counter()
    stream = _connect(port, serverName, context, source, timeout)
    try:
        stream.sendall(_COMMAND.pack(b"P", 0))
        if recvExact(stream, 1) != b"P":
            raise ConnectionError("bad answer")
        return time.perf_counter() - start
    finally:
        stream.close()


def httpFirstByte(
    port: int, serverName: str, context: ssl.SSLContext, source: str | None, timeout: float
) -> float:
    """
    One new TLS connection with one HTTP/1.1 C{GET /} for C{serverName}, read to the end of the
    response (C{Connection: close}).

    @param source: The address to connect from (see L{_connect}).
    @param timeout: Seconds any one socket operation may take.
    @return: Seconds from starting the TCP connection to the response's first byte.
    @raise ConnectionError: When the response is not a 200.
    """
    start = time.perf_counter()
    stream = _connect(port, serverName, context, source, timeout)
    try:
        stream.sendall(
            f"GET / HTTP/1.1\r\nHost: {serverName}\r\nConnection: close\r\n\r\n".encode()
        )
        head = stream.recv(65536)
        seconds = time.perf_counter() - start
        if not (head.startswith(b"HTTP/1.") and head[9:12] == b"200"):
            raise ConnectionError(f"answered {head[:40]!r}")
        while stream.recv(65536):
            pass
        return seconds
    finally:
        stream.close()


def parseResponseHead(data: bytes) -> tuple[int, int, int] | None:
    """
    Read an HTTP/1.1 response's status line and C{Content-Length} once its head has arrived.

    @param data: The response's bytes so far.
    @return: The status code, the length of the head (through the blank line) and the body's
        length; L{None} while the head is incomplete.
    @raise ConnectionError: When the response is not HTTP/1.x or has no C{Content-Length} (a
        chunked or close-delimited body cannot tell a keep-alive client where it ends).
    """
    end = data.find(b"\r\n\r\n")
    if end < 0:
        if not b"HTTP/1.".startswith(data[:7]):
            raise ConnectionError(f"not an HTTP/1 response: {data[:40]!r}")
        return None
    lines = data[:end].split(b"\r\n")
    words = lines[0].split(b" ", 2)
    if len(words) < 2 or not words[0].startswith(b"HTTP/1.") or not words[1].isdigit():
        raise ConnectionError(f"not an HTTP/1 response: {lines[0][:40]!r}")
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            return int(words[1]), end + 4, int(value.strip())
    raise ConnectionError(f"no Content-Length in {data[:end][:200]!r}")


def httpKeepAliveFirstByte(
    port: int,
    hostName: str,
    context: ssl.SSLContext | None,
    timeout: float = 120,
) -> float:
    """
    One new connection (TLS with C{context}, SNI C{hostName}; plain TCP without) carrying one
    HTTP/1.1 C{GET /} for C{hostName} as a browser's first request sends it (keep-alive, no
    C{Connection: close}), read to the end of its C{Content-Length} body, then closed by the client.

    @param timeout: Seconds any one socket operation may take.
    @return: Seconds from starting the TCP connection to the response's first byte.
    @raise ConnectionError: When the response is not a complete 200.
    """
    start = time.perf_counter()
    stream = _connect(port, hostName if context else None, context, None, timeout)
    try:
        stream.sendall(f"GET / HTTP/1.1\r\nHost: {hostName}\r\nAccept: */*\r\n\r\n".encode())
        data = stream.recv(65536)
        seconds = time.perf_counter() - start
        head = None
        while True:
            if not data:
                raise ConnectionError("closed before the response")
            head = parseResponseHead(data)
            if head is not None:
                break
            more = stream.recv(65536)
            if not more:
                raise ConnectionError(f"closed in the response's head: {data[:40]!r}")
            data += more
        status, headLength, bodyLength = head
        if status != 200:
            raise ConnectionError(f"answered {data[:40]!r}")
        remaining = headLength + bodyLength - len(data)
        while remaining > 0:
            more = stream.recv(65536)
            if not more:
                raise ConnectionError("closed in the response's body")
            remaining -= len(more)
        return seconds
    finally:
        stream.close()


def hold(port: int, serverName: str | None, count: int, progress: Callable[[int], None]) -> list:  # type: ignore[type-arg]
    """
    Open C{count} TLS connections and leave them idle.

    @return: The open connections (close them to release).
    """
    context = clientContext()
    held = []
    for i in range(count):
        stream = _connect(port, serverName, context)
        stream.sendall(_COMMAND.pack(b"H", 0))
        held.append(stream)
        if i % 500 == 499:
            progress(i + 1)
    return held


def main(argv: list[str]) -> None:
    """
    C{python -m benchmarks.workload [--tls CERT KEY]}: run a sink on a free loopback port and print
    C{listening PORT}.
    """
    context = serverContext(argv[2], argv[3]) if argv[1:2] == ["--tls"] else None
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4096)
    print(f"listening {listener.getsockname()[1]}", flush=True)
    serveForever(listener, context)


if __name__ == "__main__":
    main(sys.argv)
