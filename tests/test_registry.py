"""
Tests for L{portal.registry.document}: the registry format, loading from a file or over http(s) (with
L{treq.testing.StubTreq} and a fake clock), and rendezvous selection.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from treq.testing import StubTreq
from twisted.internet.defer import fail
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from portal.registry.document import (
    FETCH_TIMEOUT,
    MAX_REGISTRY_BYTES,
    RENDEZVOUS_PURPOSE,
    FetchError,
    Registry,
    RegistryEntry,
    RegistryError,
    fetch,
    loadRegistry,
    parseRegistry,
    rank,
    rendezvousScore,
    select,
)

ID_A = "a" * 52
ID_B = "b" * 52


def document(*relays: Any, version: Any = 1) -> bytes:
    """
    @return: A registry document listing C{relays}.
    """
    return json.dumps({"version": version, "relays": list(relays)}).encode("utf-8")


def relay(**fields: Any) -> dict[str, Any]:
    """
    @return: A registry entry, C{fields} added to (or, when L{None}, removed from) the defaults.
    """
    entry: dict[str, Any] = {"address": "relay.example:4017", "id": ID_A, "modes": ["stream"]}
    for key, value in fields.items():
        if value is None:
            entry.pop(key, None)
        else:
            entry[key] = value
    return entry


def entry(name: str, relayId: str, modes: tuple[str, ...] = ("stream",)) -> RegistryEntry:
    """
    @return: A parsed registry entry for a relay called C{name}.
    """
    return RegistryEntry(f"{name}.example", 4017, relayId, frozenset(modes))


class ParseRegistryTests(SynchronousTestCase):
    """
    L{parseRegistry} decodes a well-formed registry and refuses malformed ones with a message naming
    the entry and the field.
    """

    def test_fullEntry(self) -> None:
        """
        Every field of an entry is decoded; the host is lowercased; unknown keys are ignored.
        """
        registry = parseRegistry(
            json.dumps(
                {
                    "version": 1,
                    "name": "example registry",
                    "relays": [
                        {
                            "address": "Relay1.Example.NET:4017",
                            "id": ID_A,
                            "modes": ["stream", "tcp", "udp"],
                            "region": "eu-west",
                            "descriptor": "https://relay1.example.net/.well-known/portal-relay.json",
                            "operator": "someone",
                        },
                        {"address": "[2001:db8::1]:4018", "id": ID_B, "modes": ["stream"]},
                    ],
                }
            ).encode("utf-8"),
            "relays.json",
        )
        self.assertEqual(
            registry,
            Registry(
                "relays.json",
                (
                    RegistryEntry(
                        "relay1.example.net",
                        4017,
                        ID_A,
                        frozenset({"stream", "tcp", "udp"}),
                        "eu-west",
                        "https://relay1.example.net/.well-known/portal-relay.json",
                    ),
                    RegistryEntry("2001:db8::1", 4018, ID_B, frozenset({"stream"})),
                ),
            ),
        )
        self.assertEqual(registry.relays[0].address, "relay1.example.net:4017")
        self.assertEqual(registry.relays[1].address, "[2001:db8::1]:4018")
        self.assertEqual(registry.relays[0].shortId, "a" * 12)

    def assertRefused(self, content: bytes, *fragments: str) -> str:
        """
        Check that C{content} is refused with a message holding every fragment.

        @return: The message.
        """
        error = self.assertRaises(RegistryError, parseRegistry, content, "relays.json")
        message = str(error)
        self.assertTrue(message.startswith("relays.json: "), message)
        for fragment in fragments:
            self.assertIn(fragment, message)
        return message

    def test_notJSON(self) -> None:
        """
        Bytes that are not JSON, or not UTF-8, are refused.
        """
        self.assertRefused(b"{version: 1", "not valid JSON", "line 1")
        self.assertRefused(b"\xff\xfe", "not UTF-8")

    def test_notAnObject(self) -> None:
        """
        A document that is not an object is refused, showing the expected shape.
        """
        self.assertRefused(b"[]", '"relays": [...]', "got a list")

    def test_version(self) -> None:
        """
        A missing, other or ill-typed version is refused, naming what was found.
        """
        self.assertRefused(b'{"relays": []}', '"version" is null', "version 1")
        self.assertRefused(document(relay(), version=2), '"version" is 2')
        self.assertRefused(document(relay(), version="1"), '"version" is "1"')
        self.assertRefused(document(relay(), version=True), '"version" is true')

    def test_relaysNotAList(self) -> None:
        """
        C{"relays"} must be a list.
        """
        self.assertRefused(b'{"version": 1}', '"relays" must be a list', "got null")
        self.assertRefused(b'{"version": 1, "relays": {}}', "got an object")

    def test_empty(self) -> None:
        """
        A registry listing no relay is refused.
        """
        self.assertRefused(document(), '"relays" lists no relay')

    def test_entryNotAnObject(self) -> None:
        """
        An entry that is not an object is refused, naming its index.
        """
        self.assertRefused(document(relay(), "relay.example:4017"), "relays[1]: expected an object")

    def test_missingFields(self) -> None:
        """
        An entry without an address, id or modes is refused, naming the entry and the field.
        """
        for field in ("address", "id", "modes"):
            self.assertRefused(document(relay(**{field: None})), f'relays[0]: missing "{field}"')

    def test_badAddress(self) -> None:
        """
        An address that is not a string C{HOST:PORT} with a valid port and host is refused.
        """
        for address, problem in [
            (4017, '"address" must be a string'),
            ("relay.example", "is not HOST:PORT"),
            ("relay.example:0", "is not a port number"),
            ("relay.example:99999", "is not a port number"),
            ("relay.example:http", "is not a port number"),
            ("2001:db8::1:4017", "write an IPv6 address in brackets"),
            ("[2001:db8::1]", "is not [IPV6]:PORT"),
            ("relay example:4017", "invalid host"),
            ("relay.example/x:4017", "invalid host"),
            ("relay.example:4017#" + ID_A, "is not a port number"),
        ]:
            message = self.assertRefused(document(relay(address=address)), problem)
            self.assertIn('relays[0]: "address"', message)

    def test_badId(self) -> None:
        """
        An id that is not a 52-character base32 identity id is refused, naming the entry.
        """
        for relayId in ["abc", ID_A + "a", "A" * 52, "1" * 52, ""]:
            self.assertRefused(
                document(relay(), relay(address="other.example:4017", id=relayId)),
                "relays[1] (other.example:4017)",
                f'"id": {relayId!r} is not a relay identity id',
            )
        self.assertRefused(document(relay(id=52)), '"id" must be a string, got a number')

    def test_badModes(self) -> None:
        """
        Modes must be a non-empty list of known modes, each once.
        """
        for modes, problem in [
            ("stream", '"modes" must be a list of strings'),
            ([1], '"modes" must be a list of strings'),
            ([], '"modes" is empty'),
            (["stream", "http"], "unknown mode 'http' (known: stream, tcp, udp)"),
            (["stream+udp"], "unknown mode 'stream+udp'"),
            (["tcp", "tcp"], '"modes" lists a mode twice'),
        ]:
            self.assertRefused(
                document(relay(modes=modes)), "relays[0] (relay.example:4017)", problem
            )

    def test_badRegion(self) -> None:
        """
        A region must be a short printable string.
        """
        for region in [1, "", "x" * 65, "eu\nwest"]:
            self.assertRefused(document(relay(region=region)), '"region" must be a string')

    def test_badDescriptor(self) -> None:
        """
        A descriptor must be an http(s) URL.
        """
        for url in [1, "ftp://relay.example/d.json", "/d.json", "https://relay example/", ""]:
            self.assertRefused(document(relay(descriptor=url)), '"descriptor" must be an http')

    def test_duplicateAddress(self) -> None:
        """
        Two entries with one address are refused (addresses compare without case), naming both.
        """
        self.assertRefused(
            document(relay(), relay(address="RELAY.example:4017", id=ID_B)),
            "relays[1] (relay.example:4017)",
            "the same address as relays[0]",
        )

    def test_duplicateId(self) -> None:
        """
        Two entries with one relay id are refused, naming both.
        """
        self.assertRefused(
            document(relay(), relay(address="other.example:4017")),
            "relays[1] (other.example:4017)",
            "the same id as relays[0]",
        )

    def test_firstProblemReported(self) -> None:
        """
        Entries are checked in order: the first bad one is named.
        """
        self.assertRefused(
            document(relay(), relay(address="b.example:1", id="x"), relay(address="bad")),
            "relays[1]",
        )


class Stall(Resource):
    """
    Never answers.
    """

    isLeaf = True

    def render_GET(self, request: Request) -> Any:
        """
        @return: L{NOT_DONE_YET}, and never finish.
        """
        return NOT_DONE_YET


class Partial(Resource):
    """
    Sends part of a body, then stalls.
    """

    isLeaf = True

    def render_GET(self, request: Request) -> Any:
        """
        Write a little, and never finish.
        """
        request.write(b'{"version": 1,')
        return NOT_DONE_YET


class Chunks(Resource):
    """
    Streams a body in chunks, without a Content-Length.
    """

    isLeaf = True

    def __init__(self, chunks: list[bytes]) -> None:
        super().__init__()
        self.chunks = chunks

    def render_GET(self, request: Request) -> Any:
        """
        Write the chunks and finish.
        """
        for chunk in self.chunks:
            request.write(chunk)
        request.finish()
        return NOT_DONE_YET


class Static(Resource):
    """
    Answers with a fixed status and body (with a Content-Length).
    """

    isLeaf = True

    def __init__(self, body: bytes, code: int = 200) -> None:
        super().__init__()
        self.body = body
        self.code = code
        self.requests: list[bytes] = []

    def render_GET(self, request: Request) -> bytes:
        """
        @return: The body.
        """
        self.requests.append(request.uri)
        request.setResponseCode(self.code)
        return self.body


class LoadRegistryTests(SynchronousTestCase):
    """
    L{loadRegistry} reads a file or fetches a URL, within a size limit and, for URLs, a timeout.
    """

    def setUp(self) -> None:
        self.clock = Clock()

    def load(self, source: str, resource: Resource | None = None, **kw: Any) -> list[Any]:
        """
        Start loading C{source}, with HTTP answered by C{resource}.

        @return: A list the result is appended to when it comes.
        """
        stub = StubTreq(resource or Resource())
        results: list[Any] = []
        loadRegistry(self.clock, source, stub, **kw).addBoth(results.append)
        stub.flush()
        self.stub = stub
        return results

    def assertLoadFails(self, results: list[Any], *fragments: str) -> None:
        """
        Check that loading failed with L{RegistryError} holding every fragment.
        """
        self.assertEqual(len(results), 1)
        results[0].trap(RegistryError)
        for fragment in fragments:
            self.assertIn(fragment, str(results[0].value))

    def writeFile(self, content: bytes) -> str:
        """
        @return: The path of a new file holding C{content}.
        """
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(content)
        return path

    def test_file(self) -> None:
        """
        A registry file is read and parsed at once.
        """
        path = self.writeFile(document(relay()))
        [registry] = self.load(path)
        self.assertEqual(registry.source, path)
        self.assertEqual([r.id for r in registry.relays], [ID_A])

    def test_missingFile(self) -> None:
        """
        A file that cannot be read fails with its path and why.
        """
        path = os.path.join(self.mktemp(), "relays.json")
        self.assertLoadFails(self.load(path), path, "cannot read it", "No such file")

    def test_badFile(self) -> None:
        """
        A malformed file fails with its path and the problem.
        """
        path = self.writeFile(document())
        self.assertLoadFails(self.load(path), f"{path}: ", "lists no relay")

    def test_largeFile(self) -> None:
        """
        A file larger than the limit is refused (only the limit and one byte are read).
        """
        content = document(relay())
        path = self.writeFile(content)
        self.assertLoadFails(self.load(path, limit=len(content) - 1), "larger than")
        self.assertEqual(len(self.load(path, limit=len(content))[0].relays), 1)

    def test_defaultLimit(self) -> None:
        """
        The default limit is L{MAX_REGISTRY_BYTES}.
        """
        path = self.writeFile(b" " * MAX_REGISTRY_BYTES + b"\n")
        self.assertLoadFails(self.load(path), f"larger than {MAX_REGISTRY_BYTES} bytes")

    def test_http(self) -> None:
        """
        An http(s) URL is fetched and parsed; messages name the URL.
        """
        resource = Static(document(relay()))
        [registry] = self.load("https://registry.example/relays.json", resource)
        self.assertEqual(registry.source, "https://registry.example/relays.json")
        self.assertEqual([r.id for r in registry.relays], [ID_A])
        self.assertEqual(resource.requests, [b"/relays.json"])
        self.assertLoadFails(
            self.load("HTTP://registry.example/r", Static(b"[]")), "HTTP://registry.example/r: "
        )

    def test_httpError(self) -> None:
        """
        A status other than 200 fails with the status.
        """
        self.assertLoadFails(
            self.load("http://registry.example/r", Static(b"gone", 404)),
            "http://registry.example/r: HTTP 404",
        )

    def test_timeoutBeforeAnswer(self) -> None:
        """
        A server that does not answer fails the load after the timeout, not before.
        """
        results = self.load("http://registry.example/r", Stall())
        self.clock.advance(FETCH_TIMEOUT - 0.1)
        self.assertEqual(results, [])
        self.clock.advance(0.1)
        self.assertLoadFails(results, "no complete answer within 10 s")

    def test_timeoutDuringBody(self) -> None:
        """
        The timeout covers the whole body: a server that stalls part way fails too.
        """
        results = self.load("http://registry.example/r", Partial(), timeout=3.0)
        self.assertEqual(results, [])
        self.clock.advance(3.0)
        self.assertLoadFails(results, "no complete answer within 3 s")

    def test_tooLargeDeclared(self) -> None:
        """
        A body whose Content-Length is over the limit is refused.
        """
        body = document(relay())
        self.assertLoadFails(
            self.load("http://registry.example/r", Static(body), limit=len(body) - 1),
            f"larger than {len(body) - 1} bytes",
        )

    def test_tooLargeStreamed(self) -> None:
        """
        A body without a Content-Length is refused once it grows over the limit.
        """
        self.assertLoadFails(
            self.load("http://registry.example/r", Chunks([b" " * 600] * 2), limit=1000),
            "larger than 1000 bytes",
        )
        [registry] = self.load(
            "http://registry.example/r", Chunks([b" " * 500, document(relay())]), limit=1000
        )
        self.assertEqual(len(registry.relays), 1)

    def test_connectionFailed(self) -> None:
        """
        A network error fails with its message.
        """

        class Refusing:
            """
            An HTTP client whose connections are refused.
            """

            def get(self, url: str, **kw: Any) -> Any:
                """
                @return: A failed L{Deferred}.
                """
                return fail(ConnectionRefusedError("nobody home"))

        results: list[Any] = []
        loadRegistry(self.clock, "http://registry.example/r", Refusing()).addBoth(results.append)
        self.assertLoadFails(results, "cannot fetch", "nobody home")

    def test_fetchError(self) -> None:
        """
        L{fetch} itself fails with L{FetchError}.
        """
        results: list[Any] = []
        stub = StubTreq(Static(b"", 500))
        fetch(self.clock, "http://x.example/", stub).addBoth(results.append)
        stub.flush()
        results[0].trap(FetchError)
        self.assertEqual(str(results[0].value), "HTTP 500 Internal Server Error")


_ids = st.text(alphabet="abcdefghijklmnopqrstuvwxyz234567", min_size=52, max_size=52)


class RendezvousTests(SynchronousTestCase):
    """
    L{rank} and L{select}: rendezvous hashing on the tunnel's identity.
    """

    def test_score(self) -> None:
        """
        A score is SHA-256 of the purpose, the tunnel id, a NUL and the relay id.
        """
        self.assertEqual(
            rendezvousScore("t" * 52, ID_A),
            hashlib.sha256(RENDEZVOUS_PURPOSE + b"t" * 52 + b"\0" + b"a" * 52).digest(),
        )

    def test_deterministic(self) -> None:
        """
        The order is fixed by the ids alone, the same in every run and on every machine (a change
        would move every tunnel), and differs between tunnels.
        """
        relays = [entry(c, c * 52) for c in "abcdefgh"]
        self.assertEqual(
            [e.host[0] for e in rank("t" * 52, relays)], ["d", "f", "b", "c", "a", "h", "e", "g"]
        )
        self.assertEqual(
            [e.host[0] for e in rank("u" * 52, relays)], ["h", "b", "f", "c", "a", "g", "e", "d"]
        )
        self.assertEqual(
            rendezvousScore("t" * 52, ID_A).hex(),
            "78f6e60ea6b31c62f40bbb1f652e16c2ade7f9278ddaff9a182e8e5d83b5b5db",
        )
        self.assertEqual(rank("t" * 52, reversed(relays)), rank("t" * 52, relays))

    def test_selectIsPrefix(self) -> None:
        """
        L{select} takes the first relays of L{rank}, all of them when fewer exist.
        """
        relays = [entry(c, c * 52) for c in "abcde"]
        self.assertEqual(select("t" * 52, relays, 2), rank("t" * 52, relays)[:2])
        self.assertEqual(select("t" * 52, relays, 9), rank("t" * 52, relays))

    @settings(max_examples=200, deadline=None)
    @given(
        st.lists(_ids, min_size=2, max_size=25, unique=True),
        st.lists(_ids, min_size=1, max_size=20, unique=True),
        st.integers(min_value=1, max_value=4),
        st.data(),
    )
    def test_removalMovesOnlyItsTunnels(
        self, relayIds: list[str], tunnelIds: list[str], count: int, data: Any
    ) -> None:
        """
        When a relay leaves, exactly the tunnels that had chosen it change their choice, and each of
        them keeps its other relays and takes the next one in its own ranking.
        """
        relays = [entry(f"r{i}", relayId) for i, relayId in enumerate(relayIds)]
        gone = data.draw(st.sampled_from(relays))
        rest = [r for r in relays if r != gone]
        for tunnelId in tunnelIds:
            before = select(tunnelId, relays, count)
            after = select(tunnelId, rest, count)
            if gone not in before:
                self.assertEqual(after, before)
            else:
                self.assertEqual(after, [r for r in rank(tunnelId, relays) if r != gone][:count])
                self.assertLessEqual(set(before) - {gone}, set(after))

    @settings(max_examples=200, deadline=None)
    @given(
        st.lists(_ids, min_size=2, max_size=25, unique=True),
        st.lists(_ids, min_size=1, max_size=20, unique=True),
        st.integers(min_value=1, max_value=4),
    )
    def test_additionDisplacesAtMostOne(
        self, relayIds: list[str], tunnelIds: list[str], count: int
    ) -> None:
        """
        When a relay joins, a tunnel's choice either stays the same or takes the new relay in place of
        exactly one old pick (its lowest-ranked one).
        """
        relays = [entry(f"r{i}", relayId) for i, relayId in enumerate(relayIds[1:])]
        new = entry("new", relayIds[0])
        for tunnelId in tunnelIds:
            before = select(tunnelId, relays, count)
            after = select(tunnelId, [*relays, new], count)
            if new not in after:
                self.assertEqual(after, before)
            else:
                self.assertEqual(set(after) - {new}, set(before[: count - 1]))
                self.assertLessEqual(len(set(before) - set(after)), 1)

    @settings(max_examples=100, deadline=None)
    @given(st.lists(_ids, min_size=1, max_size=25, unique=True), _ids)
    def test_rankIsAPermutation(self, relayIds: list[str], tunnelId: str) -> None:
        """
        Ranking neither drops nor repeats a relay, and its scores never increase.
        """
        relays = [entry(f"r{i}", relayId) for i, relayId in enumerate(relayIds)]
        ranked = rank(tunnelId, relays)
        self.assertEqual(sorted(ranked, key=lambda r: r.id), sorted(relays, key=lambda r: r.id))
        scores = [rendezvousScore(tunnelId, r.id) for r in ranked]
        self.assertEqual(scores, sorted(scores, reverse=True))
