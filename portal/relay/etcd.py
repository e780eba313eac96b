"""
A small etcd v3 client over etcd's JSON gateway (C{/v3/...}), on treq.

A relay cluster (C{--cluster etcd://...}, docs/cluster.md) keeps name ownership, port allocations and
live leases in etcd. etcd's own gRPC API has no maintained Twisted client; its JSON gateway is part of
every etcd server since 3.3 and needs nothing but HTTP, so the relay talks to it with treq, which it
already uses. Keys and values are bytes (the gateway carries them base64-encoded); revisions and lease
ids are integers (the gateway carries them as decimal strings).

Every request has a timeout. A request that cannot reach an endpoint (refused, reset, timed out) is
tried on the next endpoint of the list; when none answers it fails with L{EtcdUnavailable}, which the
relay turns into "cluster store unavailable" for tunnels.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import attrs
import treq
from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, succeed
from twisted.internet.error import ConnectError, ConnectionClosed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers

#: Seconds one request to etcd may take before the next endpoint is tried.
REQUEST_TIMEOUT = 5.0

#: Most bytes of one JSON answer (a range over every lease of a large relay fits).
MAX_RESPONSE = 64 * 1024 * 1024


class EtcdError(Exception):
    """
    etcd answered with an error (its message is the exception's).
    """


class EtcdUnavailable(Exception):
    """
    No etcd endpoint answered.
    """


@attrs.frozen
class KeyValue:
    """
    One key of etcd and its metadata.

    @ivar key: The key.
    @ivar value: The value.
    @ivar modRevision: The revision of the key's last change (for compare-and-set).
    @ivar version: How many times the key changed since it was created (0: absent).
    @ivar lease: The etcd lease the key is attached to, or 0.
    """

    key: bytes
    value: bytes
    modRevision: int
    version: int
    lease: int = 0


@attrs.frozen
class WatchEvent:
    """
    One change seen by a watch.

    @ivar kind: C{"put"} or C{"delete"}.
    @ivar key: The key.
    @ivar value: The new value (empty for a delete).
    @ivar modRevision: The revision of the change.
    """

    kind: str
    key: bytes
    value: bytes
    modRevision: int


def parseClusterURL(text: str) -> list[str]:
    """
    Parse C{etcd://HOST:PORT[,HOST:PORT...]} into the gateway's base URLs.

    @param text: The C{--cluster} value.
    @return: C{http://HOST:PORT} for each endpoint, in order.
    @raise ValueError: When malformed.
    """
    if not text.startswith("etcd://"):
        raise ValueError(f"--cluster {text!r}: expected etcd://HOST:PORT[,HOST:PORT...]")
    urls = []
    for part in text[len("etcd://") :].rstrip("/").split(","):
        parsed = urlsplit(f"http://{part}")
        try:
            port = parsed.port
        except ValueError:
            port = None
        if not parsed.hostname or port is None or parsed.path:
            raise ValueError(f"--cluster {text!r}: {part!r} is not HOST:PORT")
        urls.append(f"http://{part}")
    return urls


def encode(data: bytes) -> str:
    """
    @return: C{data} as the gateway carries bytes (base64).
    """
    return base64.b64encode(data).decode("ascii")


def decode(text: str | None) -> bytes:
    """
    @return: The bytes of a gateway base64 field (absent means empty).
    """
    return base64.b64decode(text) if text else b""


def prefixEnd(prefix: bytes) -> bytes:
    """
    The C{range_end} that selects every key starting with C{prefix}.

    @param prefix: A non-empty key prefix.
    @return: The prefix with its last byte that can be incremented, incremented.
    """
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


def keyValue(item: dict[str, Any]) -> KeyValue:
    """
    @return: A gateway C{kv} object as a L{KeyValue}.
    """
    return KeyValue(
        key=decode(item.get("key")),
        value=decode(item.get("value")),
        modRevision=int(item.get("mod_revision", 0)),
        version=int(item.get("version", 0)),
        lease=int(item.get("lease", 0)),
    )


def watchEvents(message: dict[str, Any]) -> list[WatchEvent]:
    """
    @return: The events of one message of a watch stream.
    """
    result = message.get("result", {})
    events = []
    for event in result.get("events", []):
        kv = keyValue(event.get("kv", {}))
        kind = "delete" if event.get("type") == "DELETE" else "put"
        events.append(WatchEvent(kind, kv.key, kv.value, kv.modRevision))
    return events


class _LineSplitter:
    """
    Cut a streamed gateway answer into JSON messages, one per line.
    """

    def __init__(self, deliver: Callable[[dict[str, Any]], None], limit: int) -> None:
        self._deliver = deliver
        self._buffer = b""
        self._limit = limit

    def feed(self, data: bytes) -> None:
        """
        Take the next bytes of the stream and deliver every complete message.
        """
        self._buffer += data
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            if line.strip():
                self._deliver(json.loads(line))
        if len(self._buffer) > self._limit:
            raise EtcdError("watch message over the size limit")


class Watch:
    """
    A running watch of a key prefix; L{cancel} stops it.

    @ivar done: Fires when the stream ends (with L{None}, or a failure when it broke).
    """

    def __init__(self, request: Deferred[Any]) -> None:
        self._request = request
        self.done: Deferred[None] = Deferred()
        self.cancelled = False

    def cancel(self) -> None:
        """
        Stop watching.
        """
        self.cancelled = True
        self._request.cancel()


class EtcdClient:
    """
    The etcd operations a relay cluster needs, on the JSON gateway of one or more endpoints.
    """

    _log = Logger()

    def __init__(
        self,
        endpoints: Sequence[str],
        clock: IReactorTime,
        http: HTTPClient | None = None,
        timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        """
        @param endpoints: Base URLs (C{http://HOST:PORT}), tried in order from the last one that
            answered.
        @param clock: For timeouts.
        @param http: The HTTP client (treq's, by default).
        @param timeout: Seconds per request and endpoint.
        """
        if not endpoints:
            raise ValueError("at least one etcd endpoint is needed")
        self.endpoints = list(endpoints)
        self._clock = clock
        self._pool: HTTPConnectionPool | None = None
        if http is None:
            self._pool = HTTPConnectionPool(clock, persistent=True)
            http = HTTPClient(Agent(clock, pool=self._pool))
        self._http: Any = http
        self._timeout = timeout
        self._current = 0

    def close(self) -> Deferred[None]:
        """
        Close the client's kept-alive connections.
        """
        if self._pool is None:
            return succeed(None)
        closed: Deferred[None] = self._pool.closeCachedConnections()
        return closed

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """
        POST a JSON request to the gateway, trying each endpoint once.

        @raise EtcdUnavailable: When no endpoint answered.
        @raise EtcdError: When etcd answered with an error.
        """
        data = json.dumps(body).encode("utf-8")
        last: str = "no endpoint"
        for attempt in range(len(self.endpoints)):
            index = (self._current + attempt) % len(self.endpoints)
            url = self.endpoints[index] + path
            try:
                request = self._http.post(
                    url, data=data, headers=Headers({b"Content-Type": [b"application/json"]})
                )
                request.addTimeout(self._timeout, self._clock)
                response = await request
                reading = response.content()
                reading.addTimeout(self._timeout, self._clock)
                content = await reading
            except (
                ConnectError,
                ConnectionClosed,
                ResponseFailed,
                ResponseNeverReceived,
                RequestTransmissionFailed,
                RequestNotSent,
                TimeoutError,
                CancelledError,
            ) as e:
                # A kept-alive connection to an endpoint that went away fails with
                # ResponseNeverReceived: that endpoint is unreachable too.
                last = f"{url}: {e.__class__.__name__}"
                continue
            self._current = index
            if len(content) > MAX_RESPONSE:
                raise EtcdError(f"{url}: answer over {MAX_RESPONSE} bytes")
            try:
                answer = json.loads(content)
            except ValueError as e:
                raise EtcdError(f"{url}: not JSON: {e}") from None
            if response.code != 200 or "error" in answer:
                message = answer.get("message") or answer.get("error") or response.code
                raise EtcdError(f"{url}: {message}")
            return dict(answer)
        raise EtcdUnavailable(f"etcd unavailable ({last})")

    async def get(self, key: bytes) -> KeyValue | None:
        """
        @return: The key, or L{None} when absent.
        """
        answer = await self._post("/v3/kv/range", {"key": encode(key)})
        kvs = answer.get("kvs", [])
        return keyValue(kvs[0]) if kvs else None

    async def getPrefix(self, prefix: bytes) -> tuple[list[KeyValue], int]:
        """
        @return: Every key under C{prefix}, and the store's revision at the time of reading (a
            watch from the next revision misses nothing).
        """
        answer = await self._post(
            "/v3/kv/range", {"key": encode(prefix), "range_end": encode(prefixEnd(prefix))}
        )
        revision = int(answer.get("header", {}).get("revision", 0))
        return [keyValue(kv) for kv in answer.get("kvs", [])], revision

    async def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        """
        Set a key.

        @param lease: Attach the key to this etcd lease (0: none).
        @return: The revision of the change.
        """
        body: dict[str, Any] = {"key": encode(key), "value": encode(value)}
        if lease:
            body["lease"] = str(lease)
        answer = await self._post("/v3/kv/put", body)
        return int(answer.get("header", {}).get("revision", 0))

    async def _txn(
        self, key: bytes, compare: dict[str, Any], success: list[dict[str, Any]]
    ) -> tuple[bool, KeyValue | None]:
        """
        One compare-and-set transaction on C{key}: when C{compare} holds, run C{success}; otherwise
        read the key.

        @return: Whether C{compare} held, and the key as it is when it did not.
        """
        answer = await self._post(
            "/v3/kv/txn",
            {
                "compare": [{"key": encode(key), **compare}],
                "success": success,
                "failure": [{"request_range": {"key": encode(key)}}],
            },
        )
        if answer.get("succeeded"):
            return True, None
        current = None
        for response in answer.get("responses", []):
            kvs = response.get("response_range", {}).get("kvs", [])
            if kvs:
                current = keyValue(kvs[0])
        return False, current

    async def create(
        self, key: bytes, value: bytes, lease: int = 0
    ) -> tuple[bool, KeyValue | None]:
        """
        Set a key only when it does not exist (one transaction).

        @return: Whether it was created, and the existing key when it was not.
        """
        put: dict[str, Any] = {"key": encode(key), "value": encode(value)}
        if lease:
            put["lease"] = str(lease)
        return await self._txn(
            key,
            {"result": "EQUAL", "target": "VERSION", "version": "0"},
            [{"request_put": put}],
        )

    async def replace(
        self, key: bytes, modRevision: int, value: bytes, lease: int = 0
    ) -> tuple[bool, KeyValue | None]:
        """
        Set a key only when it is unchanged since C{modRevision} (one transaction).

        @return: Whether it was set, and the key as it is when it was not.
        """
        put: dict[str, Any] = {"key": encode(key), "value": encode(value)}
        if lease:
            put["lease"] = str(lease)
        return await self._txn(
            key,
            {"result": "EQUAL", "target": "MOD", "mod_revision": str(modRevision)},
            [{"request_put": put}],
        )

    async def deleteIf(self, key: bytes, modRevision: int) -> bool:
        """
        Delete a key only when it is unchanged since C{modRevision}.

        @return: Whether it was deleted.
        """
        done, _ = await self._txn(
            key,
            {"result": "EQUAL", "target": "MOD", "mod_revision": str(modRevision)},
            [{"request_delete_range": {"key": encode(key)}}],
        )
        return done

    async def delete(self, key: bytes) -> None:
        """
        Delete a key (absent is fine).
        """
        await self._post("/v3/kv/deleterange", {"key": encode(key)})

    async def grant(self, ttl: int) -> int:
        """
        Create an etcd lease.

        @param ttl: Seconds it lives without a keep-alive.
        @return: Its id.
        """
        answer = await self._post("/v3/lease/grant", {"TTL": str(ttl)})
        if "ID" not in answer:
            raise EtcdError(f"lease grant answered without an ID: {answer!r:.200}")
        return int(answer["ID"])

    async def keepAlive(self, lease: int) -> int:
        """
        Renew an etcd lease once.

        @return: Its new TTL in seconds; 0 when the lease is gone (its keys are deleted).
        """
        answer = await self._post("/v3/lease/keepalive", {"ID": str(lease)})
        return int(answer.get("result", {}).get("TTL", 0))

    async def revoke(self, lease: int) -> None:
        """
        End an etcd lease now, deleting its keys.
        """
        try:
            await self._post("/v3/lease/revoke", {"ID": str(lease)})
        except EtcdError as e:
            if "not found" not in str(e):
                raise

    def watchPrefix(
        self, prefix: bytes, fromRevision: int, onEvent: Callable[[WatchEvent], None]
    ) -> Watch:
        """
        Watch every key under C{prefix} from C{fromRevision} on, on the current endpoint.

        The stream has no timeout (it is meant to stay open); the caller restarts a watch whose
        L{Watch.done} fires, from the revision after the last event it saw.

        @param onEvent: Called with each change, in order.
        @return: The running watch.
        """
        body = {
            "create_request": {
                "key": encode(prefix),
                "range_end": encode(prefixEnd(prefix)),
                "start_revision": str(fromRevision),
            }
        }
        url = self.endpoints[self._current] + "/v3/watch"

        def deliver(message: dict[str, Any]) -> None:
            if "error" in message:
                raise EtcdError(str(message["error"]))
            for event in watchEvents(message):
                onEvent(event)

        splitter = _LineSplitter(deliver, MAX_RESPONSE)
        streams = self._http if self._pool is None else HTTPClient(Agent(self._clock))
        request = streams.post(
            url,
            data=json.dumps(body).encode("utf-8"),
            headers=Headers({b"Content-Type": [b"application/json"]}),
            unbuffered=True,
        )
        watch = Watch(request)

        def streaming(response: Any) -> Deferred[None]:
            reading: Deferred[None] = treq.collect(response, splitter.feed)
            watch._request = reading
            return reading

        request.addTimeout(self._timeout, self._clock)
        request.addCallback(streaming)
        request.addBoth(
            lambda result: watch.done.callback(result) if not watch.done.called else None
        )
        return watch
