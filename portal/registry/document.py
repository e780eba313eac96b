"""
Relay registries: a published list of relays a tunnel can choose from.

A registry is a versioned JSON document (specified in C{docs/registry.md}) naming each relay's control
address, identity id and the modes it offers, read from a file or fetched over http(s) with C{treq}
(with a timeout and a size limit). A tunnel picks its relays from it by rendezvous (highest random
weight) hashing on its own identity id, so that a relay joining or leaving moves no other tunnel's
choice.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from typing import Any

import attrs
import treq
from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure
from twisted.web.client import Agent
from twisted.web.iweb import UNKNOWN_LENGTH

from portal.trust.identity import looksLikeIdentityId, shortId
from portal.trust.relayaddress import ConfigError, parseHostPort

#: The registry format version this code reads.
REGISTRY_VERSION = 1
#: Largest registry accepted, in bytes (file or HTTP body).
MAX_REGISTRY_BYTES = 1024 * 1024
#: Most relays a registry may list.
MAX_ENTRIES = 4096
#: Seconds a registry (or a relay descriptor) fetch may take, from the request to the last body byte.
FETCH_TIMEOUT = 10.0
#: Modes a registry entry may say a relay offers (the parts of L{portal.wire.control.MODES}).
REGISTRY_MODES = ("stream", "tcp", "udp")
#: Longest region name.
MAX_REGION_LENGTH = 64
#: Longest descriptor URL.
MAX_URL_LENGTH = 2048
#: Domain separation prefix of rendezvous scores.
RENDEZVOUS_PURPOSE = b"portal-rendezvous-v1\0"

_HOST = re.compile(r"[A-Za-z0-9._:%-]+")
_JSON_TYPES = {
    dict: "an object",
    list: "a list",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
}


class RegistryError(ValueError):
    """
    A registry cannot be loaded or is malformed; the message names the registry, the entry and the
    field, and says what is wrong.
    """


class FetchError(Exception):
    """
    An http(s) fetch failed: an HTTP error status, a timeout, a body over the size limit, or a network
    error; the message says which.
    """


@attrs.frozen
class RegistryEntry:
    """
    One relay listed in a registry.

    @ivar host: The relay's control host (lowercased), without brackets for IPv6.
    @ivar port: The relay's control port.
    @ivar id: The relay's 52-character identity id, which it must prove in L{portal.wire.control.Hello}.
    @ivar modes: The modes the relay offers (a subset of L{REGISTRY_MODES}).
    @ivar region: A free-form region name, if the registry gives one.
    @ivar descriptor: The URL of the relay's signed descriptor, if the registry gives one.
    """

    host: str
    port: int
    id: str
    modes: frozenset[str]
    region: str | None = None
    descriptor: str | None = None

    @property
    def address(self) -> str:
        """
        C{HOST:PORT} (C{[V6]:PORT}), as C{--relay} takes it and relays are pinned under.
        """
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def shortId(self) -> str:
        """
        The 12-character form of L{id} shown to humans.
        """
        return shortId(self.id)


@attrs.frozen
class Registry:
    """
    A parsed registry.

    @ivar source: Where it was read from (a path or URL), for messages.
    @ivar relays: Its relays, in the registry's order.
    """

    source: str
    relays: tuple[RegistryEntry, ...]


def _jsonType(value: object) -> str:
    """
    @return: The JSON name of C{value}'s type, for messages.
    """
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _parseEntry(index: int, raw: object) -> RegistryEntry:
    """
    Check and decode one entry of C{"relays"}.

    @param index: Its position in the list, for messages.
    @param raw: The decoded JSON value.
    @raise RegistryError: Naming the entry and the field.
    """
    where = f"relays[{index}]"
    if not isinstance(raw, dict):
        raise RegistryError(f"{where}: expected an object, got {_jsonType(raw)}")
    for field in ("address", "id", "modes"):
        if field not in raw:
            raise RegistryError(f'{where}: missing "{field}"')
    address = raw["address"]
    if not isinstance(address, str):
        raise RegistryError(
            f'{where}: "address" must be a string HOST:PORT, got {_jsonType(address)}'
        )
    try:
        host, port = parseHostPort(address, f'{where}: "address"')
    except ConfigError as e:
        raise RegistryError(str(e))
    if not _HOST.fullmatch(host):
        raise RegistryError(f'{where}: "address": {address!r} has an invalid host')
    host = host.lower()
    where = f"{where} ({address})"
    relayId = raw["id"]
    if not isinstance(relayId, str):
        raise RegistryError(f'{where}: "id" must be a string, got {_jsonType(relayId)}')
    if not looksLikeIdentityId(relayId):
        raise RegistryError(
            f'{where}: "id": {relayId!r} is not a relay identity id (52 characters a-z, 2-7)'
        )
    modes = raw["modes"]
    if not isinstance(modes, list) or not all(isinstance(m, str) for m in modes):
        raise RegistryError(f'{where}: "modes" must be a list of strings like ["stream", "tcp"]')
    if not modes:
        raise RegistryError(f'{where}: "modes" is empty; a relay offers at least "stream"')
    for mode in modes:
        if mode not in REGISTRY_MODES:
            raise RegistryError(
                f'{where}: "modes": unknown mode {mode!r} (known: {", ".join(REGISTRY_MODES)})'
            )
    if len(set(modes)) != len(modes):
        raise RegistryError(f'{where}: "modes" lists a mode twice')
    region = raw.get("region")
    if region is not None and (
        not isinstance(region, str)
        or not 0 < len(region) <= MAX_REGION_LENGTH
        or not region.isprintable()
    ):
        raise RegistryError(
            f'{where}: "region" must be a string of 1 to {MAX_REGION_LENGTH} printable characters'
        )
    descriptor = raw.get("descriptor")
    if descriptor is not None and (
        not isinstance(descriptor, str)
        or not descriptor.lower().startswith(("http://", "https://"))
        or len(descriptor) > MAX_URL_LENGTH
        or not descriptor.isprintable()
        or " " in descriptor
    ):
        raise RegistryError(f'{where}: "descriptor" must be an http:// or https:// URL')
    return RegistryEntry(host, port, relayId, frozenset(modes), region, descriptor)


def parseRegistry(content: bytes, source: str = "registry") -> Registry:
    """
    Check and decode a registry document.

    Unknown keys, at the top and in entries, are ignored so that later versions can add fields.

    @param content: The document's bytes (UTF-8 JSON).
    @param source: Where it came from, for L{Registry.source} and messages.
    @return: The registry.
    @raise RegistryError: When it is not a version 1 registry listing at least one well-formed
        relay, or lists one relay twice (by address or by id); the message starts with C{source}.
    """
    try:
        document: Any = json.loads(content.decode("utf-8"))
    except UnicodeDecodeError:
        raise RegistryError(f"{source}: not UTF-8 text")
    except ValueError as e:
        raise RegistryError(f"{source}: not valid JSON: {e}")
    if not isinstance(document, dict):
        raise RegistryError(
            f'{source}: expected an object {{"version": {REGISTRY_VERSION}, "relays": [...]}}, '
            f"got {_jsonType(document)}"
        )
    version = document.get("version")
    if version != REGISTRY_VERSION or isinstance(version, bool):
        raise RegistryError(
            f'{source}: "version" is {json.dumps(version)}; this Portal reads registry '
            f"version {REGISTRY_VERSION}"
        )
    relays = document.get("relays")
    if not isinstance(relays, list):
        raise RegistryError(f'{source}: "relays" must be a list of relays, got {_jsonType(relays)}')
    if not relays:
        raise RegistryError(f'{source}: "relays" lists no relay')
    if len(relays) > MAX_ENTRIES:
        raise RegistryError(f"{source}: lists {len(relays)} relays; at most {MAX_ENTRIES} are read")
    entries: list[RegistryEntry] = []
    byAddress: dict[str, int] = {}
    byId: dict[str, int] = {}
    for index, raw in enumerate(relays):
        try:
            entry = _parseEntry(index, raw)
        except RegistryError as e:
            raise RegistryError(f"{source}: {e}")
        for seen, key, what in ((byAddress, entry.address, "address"), (byId, entry.id, "id")):
            if key in seen:
                raise RegistryError(
                    f"{source}: relays[{index}] ({entry.address}): the same {what} as "
                    f"relays[{seen[key]}]"
                )
            seen[key] = index
        entries.append(entry)
    return Registry(source, tuple(entries))


def isURL(source: str) -> bool:
    """
    @return: Whether C{source} is an http(s) URL rather than a file path.
    """
    return source.lower().startswith(("http://", "https://"))


def _readFile(path: str, limit: int) -> bytes:
    """
    Read at most C{limit} bytes of a file.

    @raise RegistryError: When it cannot be read or is larger.
    """
    try:
        with open(path, "rb") as f:
            content = f.read(limit + 1)
    except OSError as e:
        raise RegistryError(f"{path}: cannot read it: {e.strerror or e}")
    if len(content) > limit:
        raise RegistryError(f"{path}: larger than {limit} bytes")
    return content


def fetch(
    reactor: Any,
    url: str,
    http: Any = None,
    timeout: float = FETCH_TIMEOUT,
    limit: int = MAX_REGISTRY_BYTES,
) -> Deferred[bytes]:
    """
    GET C{url} with C{treq} and collect its body, within a time and a size limit.

    @param reactor: The reactor: the agent's, and the clock of the timeout.
    @param url: An http:// or https:// URL (https is checked against the system's trusted CAs).
    @param http: An object with C{treq}'s C{get} (an L{treq.client.HTTPClient}, or a
        L{treq.testing.StubTreq} in tests); by default an L{treq.client.HTTPClient} on an
        L{Agent} of C{reactor}.
    @param timeout: Seconds from the request to the last body byte.
    @param limit: Most body bytes accepted.
    @return: A L{Deferred} firing with the body of a C{200} response, or failing with L{FetchError}.
    """
    client = http if http is not None else treq.client.HTTPClient(Agent(reactor))
    abandoned = False

    async def get() -> bytes:
        response = await client.get(url, unbuffered=True)
        if response.code != 200:
            phrase = (response.phrase or b"").decode("ascii", "replace")
            # None of the body is needed: a collector that raises makes treq close the connection.
            await treq.collect(response, _refuse).addErrback(lambda _: None)
            raise FetchError(f"HTTP {response.code} {phrase}".rstrip())
        declared = response.length
        chunks: list[bytes] = []
        size = 0

        def collector(data: bytes) -> None:
            nonlocal size
            size += len(data)
            if abandoned or size > limit or (declared != UNKNOWN_LENGTH and declared > limit):
                # Raising here makes treq close the connection.
                raise FetchError(f"larger than {limit} bytes")
            chunks.append(data)

        await treq.collect(response, collector)
        return b"".join(chunks)

    def failed(failure: Failure) -> None:
        nonlocal abandoned
        abandoned = True
        error = failure.value
        if isinstance(error, FetchError):
            raise error
        # Agent's errors (ResponseFailed, ResponseNeverReceived, ...) wrap the failures that say why.
        reasons = getattr(error, "reasons", None)
        message = reasons[0].getErrorMessage() if reasons else failure.getErrorMessage()
        raise FetchError(f"cannot fetch: {message}")

    def timedOut(result: object, timeout: float) -> Failure:
        return Failure(FetchError(f"no complete answer within {timeout:g} s"))

    d = Deferred.fromCoroutine(get())
    d.addTimeout(timeout, reactor, onTimeoutCancel=timedOut)
    d.addErrback(failed)
    return d


def _refuse(data: bytes) -> None:
    """
    A body collector that refuses the body.
    """
    raise FetchError("body not wanted")


def loadRegistry(
    reactor: Any,
    source: str,
    http: Any = None,
    timeout: float = FETCH_TIMEOUT,
    limit: int = MAX_REGISTRY_BYTES,
) -> Deferred[Registry]:
    """
    Read a registry from a file, or fetch it from an http(s) URL.

    @param reactor: The reactor (for fetching and the timeout).
    @param source: A path, or an C{http://} or C{https://} URL.
    @param http: See L{fetch}.
    @param timeout: Seconds a fetch may take.
    @param limit: Largest registry accepted, in bytes.
    @return: A L{Deferred} firing with the L{Registry}, or failing with L{RegistryError} whose message
        names C{source} and the problem.
    """
    if not isURL(source):
        try:
            return succeed(parseRegistry(_readFile(source, limit), source))
        except RegistryError as e:
            return fail(e)

    def failed(failure: Any) -> None:
        failure.trap(FetchError)
        raise RegistryError(f"{source}: {failure.getErrorMessage()}")

    d: Deferred[Registry] = fetch(reactor, source, http, timeout, limit).addCallback(
        parseRegistry, source
    )
    d.addErrback(failed)
    return d


def rendezvousScore(tunnelId: str, relayId: str) -> bytes:
    """
    The weight of one relay for one tunnel in rendezvous (highest random weight) hashing.

    @param tunnelId: The tunnel's identity id.
    @param relayId: The relay's identity id.
    @return: SHA-256 of L{RENDEZVOUS_PURPOSE}, the tunnel id, a NUL and the relay id; compared as
        bytes (the same order as big-endian integers).
    """
    return hashlib.sha256(
        RENDEZVOUS_PURPOSE + tunnelId.encode("utf-8") + b"\0" + relayId.encode("utf-8")
    ).digest()


def rank(tunnelId: str, entries: Iterable[RegistryEntry]) -> list[RegistryEntry]:
    """
    Order relays by their rendezvous score for a tunnel, highest first.

    A relay's place depends only on its own score, so removing a relay moves no other, and adding one
    moves the others down by at most one place.

    @param tunnelId: The tunnel's identity id.
    @param entries: The relays.
    @return: The relays, best first (ties, which need a SHA-256 collision, broken by id).
    """
    return sorted(entries, key=lambda e: (rendezvousScore(tunnelId, e.id), e.id), reverse=True)


def select(tunnelId: str, entries: Iterable[RegistryEntry], count: int) -> list[RegistryEntry]:
    """
    The first C{count} relays of L{rank}.

    @param tunnelId: The tunnel's identity id.
    @param entries: The relays.
    @param count: How many to pick.
    @return: At most C{count} relays, best first.
    """
    return rank(tunnelId, entries)[:count]
