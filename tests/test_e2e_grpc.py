"""
End to end for HTTP/2 upstreams: a real C{grpcio} server behind real C{twistd portal-relay} and
C{portal expose ... --http} / C{--http-route PREFIX=h2c://...} processes, called by a real C{grpcio}
client that trusts the tunnel's local CA, all on 127.0.0.1 with ports the OS chose.

The service is defined without protoc: generic handlers whose messages are raw bytes.
"""

from __future__ import annotations

from concurrent import futures
from typing import Any

from OpenSSL import crypto
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from portal.trust.localca import LocalCA
from tests.realprocesses import homeDir, startExpose, startRelay, waitForLease

try:
    import grpc
except ImportError:  # pragma: no cover - grpcio is in the test extras
    grpc = None

#: The service's name, as gRPC paths carry it (C{/pkg.Echo/Unary}).
SERVICE = "pkg.Echo"
#: Size of each message of the streaming calls: several of them overrun HTTP/2's initial window.
PIECE = 48 * 1024
#: How many messages the streaming calls send.
PIECES = 40
#: Seconds each call may take.
CALL_TIMEOUT = 20.0


def _unary(request: bytes, context: Any) -> bytes:
    """
    Echo the request, marked.
    """
    return b"echo:" + request


def _serverStream(request: bytes, context: Any) -> Any:
    """
    Answer with L{PIECES} messages of L{PIECE} bytes, each filled with its index.
    """
    for index in range(PIECES):
        yield bytes([index]) * PIECE


def _clientStream(requests: Any, context: Any) -> bytes:
    """
    Answer with how many messages and bytes came.
    """
    count = total = 0
    for request in requests:
        count += 1
        total += len(request)
    return b"%d %d" % (count, total)


def _bidi(requests: Any, context: Any) -> Any:
    """
    Answer each message as it comes, reversed.
    """
    for request in requests:
        yield request[::-1]


def _fail(request: bytes, context: Any) -> bytes:
    """
    Fail with C{NOT_FOUND} and a message, which only trailers carry.
    """
    context.abort(grpc.StatusCode.NOT_FOUND, "no such thing: " + request.decode())


def serverCredentials(testCase: TestCase) -> Any:
    """
    @return: gRPC server credentials: a certificate for C{localhost} from a throwaway local CA
        (the tunnel does not verify upstream certificates, as for C{https://} targets).
    """
    ca = LocalCA.loadOrCreate(testCase.mktemp(), "grpc test CA")
    key, chain = ca.issue(["localhost"])
    keyPEM = crypto.dump_privatekey(crypto.FILETYPE_PEM, key)
    chainPEM = b"".join(crypto.dump_certificate(crypto.FILETYPE_PEM, c) for c in chain)
    return grpc.ssl_server_credentials([(keyPEM, chainPEM)])


def startServer(testCase: TestCase, tls: bool = False) -> int:
    """
    Start the gRPC server on 127.0.0.1 (HTTP/2 in cleartext, or over TLS); it stops when the test
    ends.

    @return: Its port.
    """
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(_unary),
            "ServerStream": grpc.unary_stream_rpc_method_handler(_serverStream),
            "ClientStream": grpc.stream_unary_rpc_method_handler(_clientStream),
            "Bidi": grpc.stream_stream_rpc_method_handler(_bidi),
            "Fail": grpc.unary_unary_rpc_method_handler(_fail),
        },
    )
    server.add_generic_rpc_handlers((handler,))
    if tls:
        port = server.add_secure_port("127.0.0.1:0", serverCredentials(testCase))
    else:
        port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    testCase.addCleanup(lambda: server.stop(None).wait(10))
    return int(port)


def callAll(lease: dict[str, Any]) -> dict[str, Any]:
    """
    Make every kind of call through the lease's URL, trusting its CA (runs in a thread).

    @return: What each call gave.
    """
    host, _, port = lease["url"].removeprefix("https://").partition(":")
    with open(lease["ca"], "rb") as f:
        credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
    options = [("grpc.ssl_target_name_override", host), ("grpc.default_authority", host)]
    with grpc.secure_channel(f"127.0.0.1:{port}", credentials, options=options) as channel:
        unary = channel.unary_unary(f"/{SERVICE}/Unary")
        serverStream = channel.unary_stream(f"/{SERVICE}/ServerStream")
        clientStream = channel.stream_unary(f"/{SERVICE}/ClientStream")
        bidi = channel.stream_stream(f"/{SERVICE}/Bidi")
        fail = channel.unary_unary(f"/{SERVICE}/Fail")
        results: dict[str, Any] = {}
        results["unary"] = unary(b"hello", timeout=CALL_TIMEOUT)
        results["serverStream"] = list(serverStream(b"", timeout=CALL_TIMEOUT))
        pieces = (bytes([i]) * PIECE for i in range(PIECES))
        results["clientStream"] = clientStream(pieces, timeout=CALL_TIMEOUT)
        results["bidi"] = list(bidi(iter([b"abc", b"xyz"]), timeout=CALL_TIMEOUT))
        try:
            fail(b"thing", timeout=CALL_TIMEOUT)
        except grpc.RpcError as e:
            results["fail"] = (e.code(), e.details())
        # Concurrent calls share the tunnel's one upstream connection.
        many = [unary.future(b"%d" % i, timeout=CALL_TIMEOUT) for i in range(20)]
        results["concurrent"] = [call.result() for call in many]
        return results


class GRPCTests(TestCase):
    """
    gRPC calls through a tunnel in routed HTTP mode reach a real gRPC server and come back whole,
    statuses included.
    """

    timeout = 120

    def setUp(self) -> None:
        """
        Skip without grpcio.
        """
        if grpc is None:
            self.skipTest("grpcio is not installed (pip install -e '.[test]')")

    @inlineCallbacks
    def check(self, arguments: list[str], tls: bool = False) -> Any:
        """
        Run the tunnel with C{arguments} in front of the gRPC server (C{{port}} in them is its port),
        make every kind of call, and check each result.

        @param tls: Whether the gRPC server speaks TLS.
        """
        port = startServer(self, tls)
        relayHome = homeDir(self, "relay")
        _, _, controlPort = yield startRelay(self, relayHome + "/state")
        tunnel = startExpose(
            self,
            homeDir(self, "tunnel"),
            controlPort,
            [a.format(port=port) for a in arguments],
        )
        lease = yield waitForLease(tunnel)
        results = yield deferToThread(callAll, lease)
        self.assertEqual(results["unary"], b"echo:hello")
        self.assertEqual(results["serverStream"], [bytes([i]) * PIECE for i in range(PIECES)])
        self.assertEqual(results["clientStream"], b"%d %d" % (PIECES, PIECES * PIECE))
        self.assertEqual(results["bidi"], [b"cba", b"zyx"])
        self.assertEqual(results["fail"], (grpc.StatusCode.NOT_FOUND, "no such thing: thing"))
        self.assertEqual(results["concurrent"], [b"echo:%d" % i for i in range(20)])
        requests = [line for line in tunnel.output().splitlines() if '"event": "request"' in line]
        self.assertTrue(
            any(f"/{SERVICE}/Unary" in line and '"status": 200' in line for line in requests)
        )

    def test_http(self) -> None:
        """
        C{portal expose PORT --http} sends gRPC calls (told by their content type) to the server
        over HTTP/2 in cleartext: unary, server-streaming, client-streaming and bidirectional calls
        work, and an error status with its message comes back in the trailers.
        """
        return self.check(["{port}", "--http"])

    def test_httpRoute(self) -> None:
        """
        The same calls work through C{--http-route /pkg.Echo=h2c://127.0.0.1:PORT}.
        """
        return self.check(["--http-route", f"/{SERVICE}=h2c://127.0.0.1:{{port}}"])

    def test_httpRouteTLS(self) -> None:
        """
        The same calls work to a gRPC server over TLS through
        C{--http-route /pkg.Echo=h2://127.0.0.1:PORT} (ALPN h2 to the upstream).
        """
        return self.check(["--http-route", f"/{SERVICE}=h2://127.0.0.1:{{port}}"], tls=True)

    def test_httpsTargetDetected(self) -> None:
        """
        gRPC calls are detected on an C{https://} target too, and go to it over HTTP/2 over TLS.
        """
        return self.check(["https://127.0.0.1:{port}", "--http"], tls=True)
