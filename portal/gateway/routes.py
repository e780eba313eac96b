"""
Routes of the tunnel's HTTP mode: which local service gets each request.

In routed HTTP mode (C{portal expose --http-route /api=3001 --http-route /=5173}, or
C{portal expose 3000 --http}, which is the single route C{/}) the tunnel terminates TLS and sends
each request to the route whose prefix is the longest match of the request's path.  Matching
uses the path after L{normalisePath}; the query never takes part.

A route is written C{PREFIX=TARGET[,strip]} (see L{parseRoute}).  With C{strip} the prefix is
removed before the request goes upstream, and the proxy reports it in C{X-Forwarded-Prefix}.
Everything here is pure: no I/O, no reactor.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence

import attrs

#: Characters RFC 3986 section 2.3 calls unreserved; their percent-escapes are decoded.
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")

#: Hexadecimal digits, ASCII only (C{str.isdigit} accepts other scripts' digits).
_HEX = frozenset("0123456789abcdefABCDEF")

#: Characters allowed in a route prefix or base path besides escapes: RFC 3986 C{pchar} and C{/}.
_PATH_CHARACTERS = _UNRESERVED | frozenset("!$&'()*+,;=:@/")

#: A port number: one to five ASCII digits (range checked separately).
_PORT = re.compile(r"[0-9]{1,5}")

#: A host name or IPv4 address.
_HOSTNAME = re.compile(r"[A-Za-z0-9._-]+")

#: The beginning of an absolute-form request-target, up to the end of its authority.
_ABSOLUTE_FORM = re.compile(r"(?i)https?://[^/?#]*")

#: The schemes a route's target may have, and what each means: (TLS, HTTP/2).
_SCHEMES = {
    "http": (False, False),
    "https": (True, False),
    "h2c": (False, True),
    "h2": (True, True),
}

#: How users write a route, for error messages.
_SYNTAX = "expected PREFIX=TARGET[,strip][,host], e.g. /api=3001,strip"


class RouteError(ValueError):
    """
    An HTTP route or a set of routes is malformed; C{str()} of the exception gives a one-line
    reason naming the offending text.
    """


@attrs.frozen
class Upstream:
    """
    The local service a route sends requests to.

    @ivar host: Host name or address (C{127.0.0.1} for a bare port); IPv6 without brackets.
    @ivar port: TCP port.
    @ivar tls: Whether the tunnel speaks TLS to it (an C{https://} target).
    @ivar basePath: A path every forwarded request path is appended to: C{""}, or a normalised
        path starting with C{/} and without a trailing C{/}.
    @ivar http2: Whether the tunnel speaks HTTP/2 to it (an C{h2c://} or C{h2://} target); an
        HTTP/1.1 target still gets gRPC requests over HTTP/2 (L{isGRPC}).
    """

    host: str
    port: int
    tls: bool
    basePath: str
    http2: bool = False

    @property
    def authority(self) -> str:
        """
        C{host:port}, with the host in brackets when it is an IPv6 address; for C{Host} headers and
        logs.
        """
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@attrs.frozen
class Route:
    """
    One C{--http-route}: requests under C{prefix} go to C{upstream}.

    @ivar prefix: A normalised path: it starts with C{/} and has no trailing C{/} unless it is
        exactly C{/}.
    @ivar upstream: Where matching requests go.
    @ivar strip: Whether C{prefix} is removed from the path before it is forwarded.
    @ivar rewriteHost: Whether the C{Host} header is set to the upstream's authority (for development
        servers that refuse other hosts) instead of being passed through.
    """

    prefix: str
    upstream: Upstream
    strip: bool
    rewriteHost: bool = False


@attrs.frozen
class Match:
    """
    The outcome of routing one request.

    @ivar route: The route with the longest prefix matching the request's path.
    @ivar upstreamPath: The request-target to send upstream, in origin form (path and query).
    @ivar strippedPrefix: The prefix removed from the path, for C{X-Forwarded-Prefix}; L{None}
        when nothing was removed.
    """

    route: Route
    upstreamPath: str
    strippedPrefix: str | None


def _decodeEscapes(path: str) -> str:
    """
    Decode the percent-escapes of unreserved characters and put the others in canonical form.

    @param path: A path.
    @return: C{path} with each C{%XX} of an unreserved character replaced by the character, every
        other C{%XX} given uppercase hex digits, and each C{%} that does not begin a valid escape
        written C{%25}.
    """
    out: list[str] = []
    i = 0
    while i < len(path):
        char = path[i]
        escape = path[i + 1 : i + 3]
        if char != "%":
            out.append(char)
            i += 1
        elif len(escape) == 2 and set(escape) <= _HEX:
            decoded = chr(int(escape, 16))
            out.append(decoded if decoded in _UNRESERVED else "%" + escape.upper())
            i += 3
        else:
            out.append("%25")
            i += 1
    return "".join(out)


def _removeDotSegments(path: str) -> str:
    """
    Remove C{.} and C{..} segments as RFC 3986 section 5.2.4 does for an absolute path.

    @param path: A path starting with C{/}.
    @return: C{path} with each C{.} segment dropped and each C{..} segment dropped together with
        the segment before it (none above the root); a final C{.} or C{..} leaves a trailing C{/}.
    """
    segments = path.split("/")[1:]
    out: list[str] = []
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if segment in (".", ".."):
            if segment == ".." and out:
                out.pop()
            if last:
                out.append("")
        else:
            out.append(segment)
    return "/" + "/".join(out)


def normalisePath(path: str) -> str:
    """
    Put the path of a request-target in the form routes are matched on.

    Percent-escapes of unreserved characters (RFC 3986 section 2.3) are decoded, other escapes get
    uppercase hex digits, a C{%} that starts no valid escape becomes C{%25}, and dot segments are
    removed (RFC 3986 section 5.2.4, never above the root).  Nothing else changes: C{//} stays.

    @param path: The path only, without query or fragment.
    @return: The normalised path; it always starts with C{/}, and normalising it again changes
        nothing.
    """
    if not path.startswith("/"):
        path = "/" + path
    return _removeDotSegments(_decodeEscapes(path))


def checkPath(path: str, what: str, where: str) -> None:
    """
    Check that a prefix or base path is written as a request path would be.

    @param path: The path to check.
    @param what: What the path is, for the error message.
    @param where: Where the path was given, for the error message (such as
        C{--http-route '/api=3001'}).
    @raise RouteError: If C{path} has a query, a fragment, a malformed escape or a character that
        must be percent-encoded.
    """
    where = f"{where}: {what} {path!r}"
    if "?" in path or "#" in path:
        raise RouteError(f"{where} may not contain a query or fragment ('?' or '#')")
    for index, char in enumerate(path):
        if char == "%":
            escape = path[index + 1 : index + 3]
            if len(escape) != 2 or not set(escape) <= _HEX:
                raise RouteError(f"{where} has a '%' that does not begin a %XX escape")
        elif char not in _PATH_CHARACTERS:
            raise RouteError(f"{where} contains {char!r}; percent-encode it")


def _trimPath(path: str) -> str:
    """
    Normalise a prefix or base path and drop its trailing slashes.

    @param path: A path starting with C{/}.
    @return: The normalised path without trailing C{/}, or C{""} for the root.
    """
    return normalisePath(path).rstrip("/")


def _port(port: str, where: str) -> int:
    """
    Parse a TCP port number.

    @param port: The port as written.
    @param where: Where the route was given, for the error message.
    @return: The port.
    @raise RouteError: If C{port} is not a number from 1 to 65535.
    """
    if _PORT.fullmatch(port) is None or not 0 < int(port) < 65536:
        raise RouteError(f"{where}: {port!r} is not a port number (1-65535)")
    return int(port)


def _hostPort(hostport: str, where: str) -> tuple[str, int]:
    """
    Split C{HOST:PORT}, or C{[IPV6]:PORT}.

    @param hostport: The host and port as written.
    @param where: Where the route was given, for the error message.
    @return: The host (lowercase, IPv6 without brackets) and the port.
    @raise RouteError: If either part is missing or malformed.
    """
    if "@" in hostport:
        raise RouteError(f"{where}: user names and passwords in a target are not supported")
    if hostport.startswith("["):
        host, sep, rest = hostport[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise RouteError(f"{where}: {hostport!r} is not [IPV6]:PORT")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise RouteError(f"{where}: {host!r} is not an IPv6 address")
        return host.lower(), _port(rest[1:], where)
    host, sep, port = hostport.rpartition(":")
    if not sep:
        raise RouteError(f"{where}: target {hostport!r} has no port; expected HOST:PORT")
    if not host:
        raise RouteError(f"{where}: target {hostport!r} has an empty host")
    if ":" in host:
        raise RouteError(f"{where}: write an IPv6 address in brackets, [{host}]:{port}")
    if _HOSTNAME.fullmatch(host) is None:
        raise RouteError(f"{where}: {host!r} is not a host name or address")
    return host.lower(), _port(port, where)


def _parseUpstream(target: str, where: str) -> Upstream:
    """
    Parse a route's TARGET: C{PORT}, C{HOST:PORT}, C{[IPV6]:PORT}, C{http(s)://HOST:PORT[/BASE]},
    or C{h2c://HOST:PORT[/BASE]} (HTTP/2 in cleartext) or C{h2://HOST:PORT[/BASE]} (HTTP/2 over TLS).

    @param target: The target as written.
    @param where: Where the route was given, for error messages.
    @return: The upstream; a bare port means C{127.0.0.1}.
    @raise RouteError: If the target is malformed or uses a scheme other than http, https, h2c
        and h2.
    """
    if not target:
        raise RouteError(f"{where}: TARGET is empty; {_SYNTAX}")
    scheme, sep, rest = target.partition("://")
    if not sep:
        if target.isascii() and target.isdigit():
            return Upstream("127.0.0.1", _port(target, where), False, "")
        return Upstream(*_hostPort(target, where), False, "")
    scheme = scheme.lower()
    if scheme not in _SCHEMES:
        raise RouteError(
            f"{where}: scheme {scheme!r}: only http://, https://, h2c:// and h2:// are supported"
        )
    if "?" in rest or "#" in rest:
        raise RouteError(f"{where}: target {target!r} may not contain a query or fragment")
    hostport, slash, base = rest.partition("/")
    host, port = _hostPort(hostport, where)
    basePath = slash + base
    checkPath(basePath, "base path", where)
    tls, http2 = _SCHEMES[scheme]
    return Upstream(host, port, tls, _trimPath(basePath) if basePath else "", http2)


def parseRoute(text: str) -> Route:
    """
    Parse one C{--http-route PREFIX=TARGET[,strip]}.

    PREFIX is a path starting with C{/}; it is normalised like request paths (L{normalisePath}) and
    loses any trailing C{/}.  It cannot contain C{=}, which ends it.  TARGET is C{PORT} (on
    127.0.0.1), C{HOST:PORT}, C{[IPV6]:PORT}, or C{http://HOST:PORT[/BASE]} or
    C{https://HOST:PORT[/BASE]}; C{h2c://} and C{h2://} instead of C{http://} and C{https://}
    make the tunnel speak HTTP/2 to the target (a gRPC server).  Options: C{strip} removes the prefix from the forwarded path;
    C{host} sends the target's C{HOST:PORT} as the C{Host} header instead of the visitor's.

    @param text: The route as given.
    @return: The parsed route.
    @raise RouteError: If any part is missing or malformed, or an option is unknown.
    """
    where = f"--http-route {text!r}"
    prefix, sep, rest = text.partition("=")
    if not sep:
        raise RouteError(f"{where}: no '='; {_SYNTAX}")
    return makeRoute(prefix, rest, where)


def makeRoute(prefix: str, target: str, where: str) -> Route:
    """
    Parse a route given as its PREFIX and its C{TARGET[,strip][,host]} (the two sides of
    L{parseRoute}'s C{=}), for route tables written elsewhere than on the command line (an
    C{app.json}).

    @param prefix: The prefix, a path starting with C{/}.
    @param target: The target and its options.
    @param where: Where the route was given, for error messages.
    @return: The parsed route.
    @raise RouteError: If any part is missing or malformed, or an option is unknown.
    """
    if not prefix:
        raise RouteError(f"{where}: PREFIX is empty; use / to match every path")
    if not prefix.startswith("/"):
        raise RouteError(f"{where}: PREFIX {prefix!r} must start with '/'")
    checkPath(prefix, "PREFIX", where)
    spec, *options = target.split(",")
    strip = rewriteHost = False
    for option in options:
        if option == "strip":
            strip = True
        elif option == "host":
            rewriteHost = True
        else:
            raise RouteError(
                f"{where}: unknown option {option!r}; the options are 'strip' and 'host'"
            )
    upstream = _parseUpstream(spec, where)
    return Route(_trimPath(prefix) or "/", upstream, strip, rewriteHost)


def isGRPC(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    """
    Tell a gRPC request by its C{Content-Type} (C{application/grpc}, C{application/grpc+proto},
    ...): gRPC runs over HTTP/2 only, so such a request goes to its upstream over HTTP/2 even when
    the route's target was written without C{h2c://} or C{h2://}.

    @param headers: The request's headers.
    @return: Whether the request is a gRPC call.
    """
    for name, value in headers:
        if name.lower() == b"content-type":
            kind = value.split(b";")[0].strip().lower()
            return kind == b"application/grpc" or kind.startswith(b"application/grpc+")
    return False


def originForm(target: str) -> str | None:
    """
    Put a request-target in origin form.

    @param target: The request-target as sent: origin form (C{/path?query}) or absolute form
        (C{http://host/path?query}).
    @return: C{/path?query}, without any fragment; L{None} if C{target} is in neither form (such as
        C{*} or C{host:port}).
    """
    target = target.partition("#")[0]
    if not target.startswith("/"):
        authority = _ABSOLUTE_FORM.match(target)
        if authority is None:
            return None
        target = target[authority.end() :]
        if not target.startswith("/"):
            target = "/" + target
    return target


def _prefixMatches(prefix: str, path: str) -> bool:
    """
    @param prefix: A route's normalised prefix.
    @param path: A normalised request path.
    @return: Whether C{prefix} is C{/}, equals C{path}, or is C{path}'s beginning followed by C{/}.
    """
    return prefix == "/" or path == prefix or path.startswith(prefix + "/")


class RouteTable:
    """
    A set of routes with distinct prefixes, and the longest-prefix lookup over them.

    @ivar routes: The routes, longest prefix first; routes whose prefixes are equally long keep
        the order they were given in.
    """

    routes: tuple[Route, ...]

    def __init__(self, routes: Sequence[Route]) -> None:
        """
        @param routes: The routes, in the order the user gave them.
        @raise RouteError: If there are none, or two share a prefix.
        """
        if not routes:
            raise RouteError("no HTTP routes given; add --http-route PREFIX=TARGET")
        seen: set[str] = set()
        for route in routes:
            if route.prefix in seen:
                raise RouteError(f"--http-route: two routes have the prefix {route.prefix!r}")
            seen.add(route.prefix)
        self.routes = tuple(sorted(routes, key=lambda route: -len(route.prefix)))

    def prefixes(self) -> list[str]:
        """
        @return: The routes' prefixes in the order of L{routes}, for the page a request no route
            matches gets.
        """
        return [route.prefix for route in self.routes]

    def match(self, target: str) -> Match | None:
        """
        Find the route for a request and the request-target to send it.

        The path of C{target} is normalised (L{normalisePath}) and matched; its query and fragment
        take no part.  Without C{strip} or a base path the path goes upstream exactly as sent.
        Otherwise the normalised path is used, minus the prefix when stripping (C{/} if nothing is
        left), after the upstream's base path; the query follows unchanged.  Stripping the prefix
        C{/} removes nothing, so such a route behaves as if it did not strip.

        @param target: The request-target as sent: origin form (C{/path?query}) or absolute form
            (C{http://host/path?query}).
        @return: The match, or L{None} if no route matches or C{target} is in neither form (such
            as C{*} or C{host:port}).
        """
        origin = originForm(target)
        if origin is None:
            return None
        target = origin
        rawPath, sep, query = target.partition("?")
        path = normalisePath(rawPath)
        for route in self.routes:
            if _prefixMatches(route.prefix, path):
                break
        else:
            return None
        stripping = route.strip and route.prefix != "/"
        base = route.upstream.basePath
        if not stripping and not base:
            return Match(route, target, None)
        if stripping:
            path = path[len(route.prefix) :] or "/"
        return Match(route, base + path + sep + query, route.prefix if stripping else None)
