"""
Tests for L{portal.gateway.routes}.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from portal.gateway.routes import (
    Match,
    Route,
    RouteError,
    RouteTable,
    Upstream,
    isGRPC,
    normalisePath,
    parseRoute,
)

#: Segments that exercise escapes, dot segments and empty segments.
_TRICKY_SEGMENTS = [
    "",
    ".",
    "..",
    "%2E",
    "%2e",
    ".%2E",
    "%2E%2E",
    "a",
    "B",
    "%41",
    "%7e",
    "%7E",
    "~",
    "%2F",
    "%2f",
    "%",
    "%%",
    "%4",
    "%%41",
    "%25",
    "%zz",
    "é",
    "%C3%A9",
    "api",
]

#: Paths built from L{_TRICKY_SEGMENTS}, with or without a leading C{/}.
_paths = st.one_of(
    st.lists(st.sampled_from(_TRICKY_SEGMENTS), max_size=8).map("/".join),
    st.lists(st.sampled_from(_TRICKY_SEGMENTS), max_size=8).map(lambda s: "/" + "/".join(s)),
    st.text(alphabet="/.%2eEaF7~-", max_size=30),
    st.text(max_size=30),
)

_UNRESERVED = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"


def _upstream(port: int, basePath: str = "") -> Upstream:
    """
    @param port: A port.
    @param basePath: A base path.
    @return: A plain HTTP upstream on 127.0.0.1.
    """
    return Upstream("127.0.0.1", port, False, basePath)


def _table(*specs: str) -> RouteTable:
    """
    @param specs: Routes as written on the command line.
    @return: A table of the parsed routes.
    """
    return RouteTable([parseRoute(spec) for spec in specs])


class UpstreamTests(SynchronousTestCase):
    """
    Tests for L{Upstream}.
    """

    def test_authority(self) -> None:
        """
        The authority of a host name or IPv4 upstream is C{host:port}.
        """
        self.assertEqual(Upstream("localhost", 3001, False, "").authority, "localhost:3001")
        self.assertEqual(_upstream(80).authority, "127.0.0.1:80")

    def test_authorityIPv6(self) -> None:
        """
        The authority of an IPv6 upstream puts the address in brackets.
        """
        self.assertEqual(Upstream("::1", 8443, True, "").authority, "[::1]:8443")


class IsGRPCTests(SynchronousTestCase):
    """
    Tests for L{isGRPC}.
    """

    def test_grpcContentTypes(self) -> None:
        """
        C{application/grpc} and its C{+proto}, C{+json} forms are gRPC, whatever their case and
        parameters.
        """
        for value in (b"application/grpc", b"application/grpc+proto", b"Application/GRPC; x=1"):
            self.assertTrue(isGRPC([(b"Content-Type", value)]), value)

    def test_otherContentTypes(self) -> None:
        """
        Other content types (gRPC-Web's included, which runs over HTTP/1.1) and no content type
        are not gRPC.
        """
        for value in (b"application/json", b"application/grpc-web", b"application/grpcx"):
            self.assertFalse(isGRPC([(b"content-type", value)]), value)
        self.assertFalse(isGRPC([(b"accept", b"application/grpc")]))


class ParseRouteTests(SynchronousTestCase):
    """
    Tests for L{parseRoute}.
    """

    def test_barePort(self) -> None:
        """
        A bare port target means plain HTTP on 127.0.0.1, and the prefix is not stripped by
        default.
        """
        self.assertEqual(parseRoute("/api=3001"), Route("/api", _upstream(3001), False))

    def test_root(self) -> None:
        """
        The prefix C{/} is kept as it is.
        """
        self.assertEqual(parseRoute("/=5173"), Route("/", _upstream(5173), False))

    def test_strip(self) -> None:
        """
        The C{strip} option makes a stripping route.
        """
        self.assertEqual(parseRoute("/api=3001,strip"), Route("/api", _upstream(3001), True))

    def test_hostPort(self) -> None:
        """
        A C{HOST:PORT} target names the host, lowercased.
        """
        self.assertEqual(
            parseRoute("/x=Backend.Local:8080").upstream,
            Upstream("backend.local", 8080, False, ""),
        )

    def test_ipv6(self) -> None:
        """
        An C{[IPV6]:PORT} target gives the address without brackets.
        """
        self.assertEqual(parseRoute("/x=[::1]:8080").upstream, Upstream("::1", 8080, False, ""))

    def test_httpURL(self) -> None:
        """
        An C{http://} target is plain HTTP with no base path.
        """
        self.assertEqual(
            parseRoute("/x=http://localhost:3000").upstream,
            Upstream("localhost", 3000, False, ""),
        )

    def test_httpsURLWithBase(self) -> None:
        """
        An C{https://} target with a path is TLS with that path as base, trailing slash dropped.
        """
        self.assertEqual(
            parseRoute("/x=HTTPS://[::1]:8443/base/v1/").upstream,
            Upstream("::1", 8443, True, "/base/v1"),
        )

    def test_baseRootIsEmpty(self) -> None:
        """
        A base path of just C{/} is no base path.
        """
        self.assertEqual(parseRoute("/x=http://h:1/").upstream.basePath, "")

    def test_baseNormalised(self) -> None:
        """
        The base path is normalised like request paths.
        """
        self.assertEqual(parseRoute("/x=http://h:1/a/../%7Eb/./c").upstream.basePath, "/~b/c")

    def test_prefixTrailingSlash(self) -> None:
        """
        A prefix loses its trailing slashes.
        """
        self.assertEqual(parseRoute("/api/=3001").prefix, "/api")
        self.assertEqual(parseRoute("/api//=3001").prefix, "/api")

    def test_prefixNormalised(self) -> None:
        """
        A prefix is normalised like request paths, so it matches the requests it names.
        """
        self.assertEqual(parseRoute("/%7Euser/./x/../y=3001").prefix, "/~user/y")
        self.assertEqual(parseRoute("/a%2fb=3001").prefix, "/a%2Fb")

    def test_prefixNormalisedToRoot(self) -> None:
        """
        A prefix that normalises to the root is C{/}.
        """
        self.assertEqual(parseRoute("/a/..=3001").prefix, "/")
        self.assertEqual(parseRoute("//=3001").prefix, "/")

    def assertRouteError(self, text: str, *fragments: str) -> None:
        """
        Assert that parsing a route fails with a message naming the route and the problem.

        @param text: The route.
        @param fragments: Text the message must contain besides the route.
        """
        error = self.assertRaises(RouteError, parseRoute, text)
        message = str(error)
        self.assertNotIn("\n", message)
        self.assertIn(repr(text), message)
        for fragment in fragments:
            self.assertIn(fragment, message)

    def test_missingEquals(self) -> None:
        """
        A route without C{=} is rejected, with the expected syntax.
        """
        self.assertRouteError("/api", "no '='", "PREFIX=TARGET")

    def test_emptyPrefix(self) -> None:
        """
        An empty prefix is rejected, suggesting C{/}.
        """
        self.assertRouteError("=3001", "PREFIX is empty", "use /")

    def test_relativePrefix(self) -> None:
        """
        A prefix not starting with C{/} is rejected.
        """
        self.assertRouteError("api=3001", "'api'", "must start with '/'")

    def test_prefixQuery(self) -> None:
        """
        A prefix with a query is rejected.
        """
        self.assertRouteError("/api?v=2=3001", "'/api?v'", "query or fragment")

    def test_prefixFragment(self) -> None:
        """
        A prefix with a fragment is rejected.
        """
        self.assertRouteError("/api#x=3001", "'/api#x'", "query or fragment")

    def test_prefixBadEscape(self) -> None:
        """
        A prefix with a C{%} that starts no escape is rejected.
        """
        self.assertRouteError("/a%zz=3001", "'/a%zz'", "%XX")
        self.assertRouteError("/a%4=3001", "'/a%4'", "%XX")

    def test_prefixBadCharacter(self) -> None:
        """
        A prefix with a character a request path cannot hold unescaped is rejected.
        """
        self.assertRouteError("/a b=3001", "' '", "percent-encode")

    def test_emptyTarget(self) -> None:
        """
        An empty target is rejected.
        """
        self.assertRouteError("/api=", "TARGET is empty")
        self.assertRouteError("/api=,strip", "TARGET is empty")

    def test_portOutOfRange(self) -> None:
        """
        Ports outside 1-65535 are rejected, with the port named.
        """
        self.assertRouteError("/api=0", "'0'", "not a port number")
        self.assertRouteError("/api=65536", "'65536'", "not a port number")
        self.assertRouteError("/api=h:99999", "'99999'", "not a port number")

    def test_portNotANumber(self) -> None:
        """
        A port that is not a number is rejected, with the port named.
        """
        self.assertRouteError("/api=localhost:http", "'http'", "not a port number")
        self.assertRouteError("/api=h:\N{SUPERSCRIPT TWO}", "not a port number")
        self.assertRouteError("/api=http://h:", "''", "not a port number")

    def test_noPort(self) -> None:
        """
        A host without a port is rejected.
        """
        self.assertRouteError("/api=localhost", "'localhost'", "no port")
        self.assertRouteError("/api=http://localhost/base", "'localhost'", "no port")

    def test_unsupportedScheme(self) -> None:
        """
        Schemes other than http, https, h2c and h2 are rejected, with the scheme named.
        """
        self.assertRouteError(
            "/api=ftp://h:21", "'ftp'", "only http://, https://, h2c:// and h2://"
        )

    def test_http2Schemes(self) -> None:
        """
        C{h2c://} is HTTP/2 in cleartext and C{h2://} HTTP/2 over TLS, with a base path as for
        http; http and https targets and bare ports are HTTP/1.1.
        """
        self.assertEqual(
            parseRoute("/pkg.Service=h2c://127.0.0.1:50051").upstream,
            Upstream("127.0.0.1", 50051, False, "", http2=True),
        )
        self.assertEqual(
            parseRoute("/=H2://grpc.internal:443/base").upstream,
            Upstream("grpc.internal", 443, True, "/base", http2=True),
        )
        self.assertFalse(parseRoute("/=http://h:80").upstream.http2)
        self.assertFalse(parseRoute("/=50051").upstream.http2)

    def test_emptyHost(self) -> None:
        """
        An empty host is rejected.
        """
        self.assertRouteError("/api=:3001", "empty host")
        self.assertRouteError("/api=http://:3001", "empty host")

    def test_badHost(self) -> None:
        """
        A host with characters no host name has is rejected, with the host named.
        """
        self.assertRouteError("/api=bad host:3001", "'bad host'", "not a host name")

    def test_credentials(self) -> None:
        """
        User names and passwords in a target are rejected.
        """
        self.assertRouteError("/api=http://user:pw@h:1", "user names and passwords")

    def test_unbracketedIPv6(self) -> None:
        """
        An IPv6 address without brackets is rejected, showing the bracketed form.
        """
        self.assertRouteError("/api=::1:3001", "[::1]:3001")

    def test_badIPv6(self) -> None:
        """
        Something in brackets that is not an IPv6 address is rejected.
        """
        self.assertRouteError("/api=[nope]:3001", "'nope'", "not an IPv6 address")
        self.assertRouteError("/api=[::1]3001", "[IPV6]:PORT")

    def test_targetQuery(self) -> None:
        """
        A URL target with a query or fragment is rejected.
        """
        self.assertRouteError("/api=http://h:1/base?x", "query or fragment")
        self.assertRouteError("/api=http://h:1#x", "query or fragment")

    def test_badBasePath(self) -> None:
        """
        A base path with a malformed escape is rejected, with the base path named.
        """
        self.assertRouteError("/api=http://h:1/a%g0", "'/a%g0'", "%XX")

    def test_unknownOption(self) -> None:
        """
        Options other than C{strip} are rejected, with the option named.
        """
        self.assertRouteError("/api=3001,strip,fast", "'fast'", "options are 'strip' and 'host'")
        self.assertRouteError("/api=3001,", "unknown option ''")

    @given(st.integers(1, 65535), st.booleans())
    def test_anyPort(self, port: int, strip: bool) -> None:
        """
        Every port from 1 to 65535 parses, in each target form, with or without C{strip}.
        """
        option = ",strip" if strip else ""
        for target in (f"{port}", f"h:{port}", f"[::1]:{port}", f"https://h:{port}/b"):
            route = parseRoute(f"/p={target}{option}")
            self.assertEqual((route.upstream.port, route.strip), (port, strip))


class NormalisePathTests(SynchronousTestCase):
    """
    Tests for L{normalisePath}.
    """

    cases = [
        ("", "/"),
        ("/", "/"),
        ("/plain/path", "/plain/path"),
        ("no/slash", "/no/slash"),
        ("/%7Euser", "/~user"),
        ("/%7euser", "/~user"),
        ("/%41%62%2D%2e%5F%30", "/Ab-._0"),
        ("/a%2Fb", "/a%2Fb"),
        ("/a%2fb", "/a%2Fb"),
        ("/caf%c3%a9", "/caf%C3%A9"),
        ("/100%25", "/100%25"),
        ("/%zz", "/%25zz"),
        ("/50%", "/50%25"),
        ("/%4", "/%254"),
        ("/a/./b", "/a/b"),
        ("/a/../b", "/b"),
        ("/a/b/../../../c", "/c"),
        ("/..", "/"),
        ("/../..", "/"),
        ("/a/..", "/"),
        ("/a/b/..", "/a/"),
        ("/a/.", "/a/"),
        ("/.", "/"),
        ("/a/%2E%2E/b", "/b"),
        ("/a/.%2e/b", "/b"),
        ("/a/%2E/b", "/a/b"),
        ("/a/..%2F/b", "/a/..%2F/b"),
        ("/a/...", "/a/..."),
        ("/a/.b/..c", "/a/.b/..c"),
        ("//a//b/", "//a//b/"),
        ("/a//../b", "/a/b"),
        ("/a/b//..", "/a/b/"),
    ]

    def test_cases(self) -> None:
        """
        Unreserved escapes are decoded, others uppercased, stray C{%} escaped, and dot segments
        removed without going above the root; empty segments stay.
        """
        for path, expected in self.cases:
            self.assertEqual((path, normalisePath(path)), (path, expected))

    @given(_paths)
    def test_idempotent(self, path: str) -> None:
        """
        Normalising a normalised path changes nothing.
        """
        once = normalisePath(path)
        self.assertEqual(normalisePath(once), once)

    @given(_paths)
    def test_absolute(self, path: str) -> None:
        """
        A normalised path starts with C{/}.
        """
        self.assertTrue(normalisePath(path).startswith("/"))

    @given(_paths)
    def test_noDotSegments(self, path: str) -> None:
        """
        A normalised path has no C{.} or C{..} segment.
        """
        segments = normalisePath(path).split("/")
        self.assertNotIn(".", segments)
        self.assertNotIn("..", segments)

    @given(_paths)
    def test_onlyCanonicalEscapes(self, path: str) -> None:
        """
        Every C{%} in a normalised path begins an uppercase escape of a character that is not
        unreserved.
        """
        result = normalisePath(path)
        for index, char in enumerate(result):
            if char == "%":
                escape = result[index + 1 : index + 3]
                self.assertEqual(len(escape), 2, result)
                self.assertEqual(escape, escape.upper(), result)
                self.assertNotIn(chr(int(escape, 16)), _UNRESERVED, result)

    @given(st.text(alphabet=_UNRESERVED + "/", max_size=30), st.data())
    def test_escapingUnreservedChangesNothing(self, path: str, data: st.DataObject) -> None:
        """
        Percent-encoding any unreserved characters of a path, in either case, does not change its
        normalised form.
        """
        escaped = "".join(
            (f"%{ord(char):02X}" if data.draw(st.booleans()) else f"%{ord(char):02x}")
            if char != "/" and data.draw(st.booleans())
            else char
            for char in path
        )
        self.assertEqual(normalisePath(escaped), normalisePath(path))


class RouteTableTests(SynchronousTestCase):
    """
    Tests for L{RouteTable} construction and L{RouteTable.prefixes}.
    """

    def test_empty(self) -> None:
        """
        A table needs at least one route.
        """
        error = self.assertRaises(RouteError, RouteTable, [])
        self.assertIn("no HTTP routes", str(error))

    def test_duplicatePrefix(self) -> None:
        """
        Two routes whose prefixes normalise to the same path are rejected, naming the prefix.
        """
        error = self.assertRaises(RouteError, _table, "/api=3001", "/api/=3002")
        self.assertIn("'/api'", str(error))
        self.assertRaises(RouteError, _table, "/=1", "/a/..=2")

    def test_routesLongestFirst(self) -> None:
        """
        L{RouteTable.routes} holds the routes longest prefix first.
        """
        table = _table("/=1", "/api/v2=3", "/api=2")
        self.assertEqual([route.prefix for route in table.routes], ["/api/v2", "/api", "/"])
        self.assertIsInstance(table.routes, tuple)

    def test_prefixesOrder(self) -> None:
        """
        L{RouteTable.prefixes} lists the prefixes longest first, equally long ones in the order
        given.
        """
        table = _table("/=1", "/b=2", "/api=3", "/a=4", "/web=5")
        self.assertEqual(table.prefixes(), ["/api", "/web", "/b", "/a", "/"])


class RouteTableMatchTests(SynchronousTestCase):
    """
    Tests for L{RouteTable.match}.
    """

    def setUp(self) -> None:
        """
        Make a table with nested prefixes and a root route.
        """
        self.table = _table("/=5173", "/api=3001", "/api/v2=3002")

    def prefixFor(self, target: str) -> str | None:
        """
        @param target: A request-target.
        @return: The prefix of the route it matches, or L{None}.
        """
        match = self.table.match(target)
        return None if match is None else match.route.prefix

    def test_longestPrefixWins(self) -> None:
        """
        The longest matching prefix wins.
        """
        self.assertEqual(self.prefixFor("/"), "/")
        self.assertEqual(self.prefixFor("/index.html"), "/")
        self.assertEqual(self.prefixFor("/api"), "/api")
        self.assertEqual(self.prefixFor("/api/"), "/api")
        self.assertEqual(self.prefixFor("/api/users"), "/api")
        self.assertEqual(self.prefixFor("/api/v2"), "/api/v2")
        self.assertEqual(self.prefixFor("/api/v2/users"), "/api/v2")
        self.assertEqual(self.prefixFor("/api/v3"), "/api")

    def test_segmentBoundary(self) -> None:
        """
        A prefix matches only whole segments: C{/api} does not match C{/apix} or C{/api%2Fx}.
        """
        self.assertEqual(self.prefixFor("/apix"), "/")
        self.assertEqual(self.prefixFor("/api/v2x"), "/api")
        self.assertEqual(self.prefixFor("/api%2Fv2"), "/")

    def test_queryIgnored(self) -> None:
        """
        The query takes no part in matching.
        """
        self.assertEqual(self.prefixFor("/x?/api"), "/")
        self.assertEqual(self.prefixFor("/api?/api/v2"), "/api")
        self.assertEqual(self.prefixFor("?/api"), None)

    def test_fragmentIgnored(self) -> None:
        """
        A fragment takes no part in matching and is not forwarded.
        """
        match = self.table.match("/x#/api")
        assert match is not None
        self.assertEqual((match.route.prefix, match.upstreamPath), ("/", "/x"))

    def test_normalisedPathMatched(self) -> None:
        """
        The path is normalised before matching: escapes of unreserved characters and dot segments
        count for what they mean.
        """
        self.assertEqual(self.prefixFor("/%61pi/users"), "/api")
        self.assertEqual(self.prefixFor("/api/../secret"), "/")
        self.assertEqual(self.prefixFor("/api/v2/%2E%2E/x"), "/api")
        self.assertEqual(self.prefixFor("/api/%2E%2E/v2/x"), "/")
        self.assertEqual(self.prefixFor("/x/../api/v2"), "/api/v2")
        self.assertEqual(self.prefixFor("/API"), "/")

    def test_absoluteForm(self) -> None:
        """
        An absolute-form target is matched on its path, and forwarded in origin form.
        """
        match = self.table.match("http://example.com:443/api/v2/x?q=1")
        self.assertEqual(match, Match(self.table.routes[0], "/api/v2/x?q=1", None))
        self.assertEqual(self.prefixFor("HTTPS://example.com/api"), "/api")

    def test_absoluteFormWithoutPath(self) -> None:
        """
        An absolute-form target without a path means the path C{/}.
        """
        match = self.table.match("http://example.com?q")
        assert match is not None
        self.assertEqual((match.route.prefix, match.upstreamPath), ("/", "/?q"))

    def test_otherForms(self) -> None:
        """
        Targets in neither origin nor absolute form match nothing.
        """
        self.assertIsNone(self.table.match("*"))
        self.assertIsNone(self.table.match("example.com:443"))
        self.assertIsNone(self.table.match("ftp://example.com/api"))
        self.assertIsNone(self.table.match(""))

    def test_noRootRoute(self) -> None:
        """
        Without a C{/} route, paths under no prefix match nothing.
        """
        table = _table("/api=3001", "/web=3002")
        self.assertIsNone(table.match("/"))
        self.assertIsNone(table.match("/apix"))
        self.assertIsNone(table.match("/other?x=/api"))
        match = table.match("/web/x")
        assert match is not None
        self.assertEqual(match.route.prefix, "/web")

    def test_notStrippedForwardedAsSent(self) -> None:
        """
        Without C{strip} or a base path the target goes upstream exactly as sent, escapes and all.
        """
        match = self.table.match("/api/%7Euser?q")
        self.assertEqual(match, Match(self.table.routes[1], "/api/%7Euser?q", None))
        match = self.table.match("/api/./x/../%7euser?")
        assert match is not None
        self.assertEqual(match.upstreamPath, "/api/./x/../%7euser?")

    def test_strip(self) -> None:
        """
        A stripping route forwards the rest of the path and the query, and reports the prefix.
        """
        table = _table("/api=3001,strip")
        self.assertEqual(
            table.match("/api/users?x=1"), Match(table.routes[0], "/users?x=1", "/api")
        )

    def test_stripExactPrefix(self) -> None:
        """
        Stripping a path equal to the prefix leaves C{/}, with or without a trailing slash or
        query.
        """
        table = _table("/api=3001,strip")
        self.assertEqual(table.match("/api"), Match(table.routes[0], "/", "/api"))
        self.assertEqual(table.match("/api/"), Match(table.routes[0], "/", "/api"))
        self.assertEqual(table.match("/api?a=b"), Match(table.routes[0], "/?a=b", "/api"))

    def test_stripNormalised(self) -> None:
        """
        A stripping route forwards the normalised rest of the path; the query is unchanged.
        """
        table = _table("/api=3001,strip")
        match = table.match("/%61pi/x/../%7euser/%2f?q=%7e")
        assert match is not None
        self.assertEqual(match.upstreamPath, "/~user/%2F?q=%7e")

    def test_stripKeepsEmptySegments(self) -> None:
        """
        Stripping keeps empty segments after the prefix.
        """
        table = _table("/api=3001,strip")
        match = table.match("/api//x")
        assert match is not None
        self.assertEqual(match.upstreamPath, "//x")

    def test_stripWithBase(self) -> None:
        """
        A stripping route with a base path forwards the rest of the path after the base.
        """
        table = _table("/api=http://localhost:3001/base,strip")
        self.assertEqual(
            table.match("/api/users?x=1"), Match(table.routes[0], "/base/users?x=1", "/api")
        )
        match = table.match("/api")
        assert match is not None
        self.assertEqual(match.upstreamPath, "/base/")

    def test_baseWithoutStrip(self) -> None:
        """
        A base path without C{strip} goes before the whole normalised path, so dot segments cannot
        climb out of the base.
        """
        table = _table("/api=http://localhost:3001/base")
        self.assertEqual(
            table.match("/api/users?x=1"), Match(table.routes[0], "/base/api/users?x=1", None)
        )
        table = _table("/=http://localhost:3001/base")
        for target in ("/../etc?q", "/a/%2e%2E/../etc?q"):
            match = table.match(target)
            assert match is not None
            self.assertEqual(match.upstreamPath, "/base/etc?q")

    def test_stripRoot(self) -> None:
        """
        Stripping the prefix C{/} removes nothing: the target goes upstream as sent and no prefix
        is reported.
        """
        table = _table("/=3001,strip")
        self.assertEqual(table.match("/a/%7e?q"), Match(table.routes[0], "/a/%7e?q", None))

    @given(_paths, st.text(max_size=10))
    def test_matchedPrefixIsSegmentPrefix(self, path: str, query: str) -> None:
        """
        Any origin-form target matches some route of a table with C{/}, and the matched prefix is
        C{/} or a whole-segment prefix of the normalised path.
        """
        path = "/" + path.replace("?", "").replace("#", "")
        match = self.table.match(f"{path}?{query.replace('#', '')}")
        assert match is not None
        prefix, normalised = match.route.prefix, normalisePath(path)
        self.assertTrue(
            prefix == "/" or normalised == prefix or normalised.startswith(prefix + "/")
        )
        for route in self.table.routes:
            if len(route.prefix) > len(prefix):
                self.assertFalse(
                    normalised == route.prefix or normalised.startswith(route.prefix + "/")
                )

    @given(_paths, st.text(max_size=10))
    def test_strippedPathUnderBase(self, path: str, query: str) -> None:
        """
        Whenever a stripping route with a base path matches, it forwards a path starting with the
        base and a C{/}, followed by the query as sent, and reports its prefix.
        """
        table = _table("/api=http://h:1/base,strip", "/=2")
        query = query.replace("#", "")
        match = table.match(f"/api/{path.replace('?', '').replace('#', '')}?{query}")
        assert match is not None
        if match.route.prefix == "/api":
            self.assertEqual(match.strippedPrefix, "/api")
            self.assertTrue(match.upstreamPath.startswith("/base/"))
            self.assertTrue(match.upstreamPath.endswith("?" + query))
        else:
            self.assertEqual(match.strippedPrefix, None)


class HostOptionTests(SynchronousTestCase):
    """
    The C{host} route option.
    """

    def test_hostOption(self) -> None:
        """
        C{,host} asks for the Host header to be rewritten; it combines with C{strip} in any order.
        """
        route = parseRoute("/app=5173,host,strip")
        self.assertTrue(route.rewriteHost)
        self.assertTrue(route.strip)
        self.assertFalse(parseRoute("/app=5173").rewriteHost)
