"""
An app of the app gateway, as its C{app.json} describes it: a name (the lease label), routes (as
C{--http-route} gives them), and per path prefix who may call (C{access}) and which identity
headers the app gets (C{headers}).

Everything is checked when the file is loaded; an L{AppError} names the field and the problem
(C{paths["/x/"].access: must be one of public, private, peer}). Header templates are compiled at
load time, so a request only substitutes values (L{HeaderTemplate.render}). Nothing here does I/O
but L{loadApp}, which reads the file. The format is documented in C{docs/app-json.md}.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Mapping
from typing import Any

import attrs

from portal.gateway.routes import (
    Route,
    RouteError,
    checkPath,
    makeRoute,
    normalisePath,
    originForm,
)
from portal.trust.names import InvalidName, validateLabel

#: The values of a path's C{access}: anyone, the owner's paired terminals, the owner's peers.
ACCESS_LEVELS = ("public", "private", "peer")

#: The names a header template may use, in C{{{ NAME }}}.
TEMPLATE_NAMES = (
    "auth.client_type",
    "auth.client_id",
    "auth.client_name",
    "portal.domain",
    "portal.id",
    "portal.short_id",
)

#: The prefix (compared case-insensitively) of every header an C{app.json} may set; the gateway
#: strips headers with it from visitors' requests.
HEADER_PREFIX = b"x-ptl-"

#: The keys of an C{app.json} and of one of its paths.
_APP_KEYS = ("name", "routes", "paths")
_PATH_KEYS = ("access", "headers")

#: An RFC 9110 token, which a header name is.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")

#: A C{{{ NAME }}} placeholder of a header template.
_PLACEHOLDER = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)

#: Escaped slashes and backslashes (as L{normalisePath} writes them), a backslash, and runs of
#: slashes: what an app may read as a path separator where the gateway does not.
_ESCAPED_SEPARATOR = re.compile(r"%2F|%5C|\\")
_SLASHES = re.compile(r"/{2,}")
#: Path parameters (C{/admin;jsessionid=x/}), which some servers drop from each segment.
_PARAMETERS = re.compile(r";[^/]*")


class AppError(ValueError):
    """
    An C{app.json} is not valid; C{str()} of the exception names the field and the problem.
    """


class TemplateRefused(ValueError):
    """
    A header's value would contain a control character; the header cannot be sent.

    @ivar header: The header's name.
    @ivar name: The template name whose value holds the control character.
    """

    def __init__(self, header: bytes, name: str) -> None:
        super().__init__(
            f"the value of {{{{ {name} }}}} in header {header.decode('ascii')} contains a "
            "control character"
        )
        self.header = header
        self.name = name


class AmbiguousPath(ValueError):
    """
    An app could read a request's path as another path than the gateway does (an escaped slash or
    backslash, or an empty segment) and the two readings fall under different entries of C{paths}.
    """


def _key(name: str) -> str:
    """
    @return: C{name} as it is written inside the field paths of messages: a JSON string.
    """
    return json.dumps(name, ensure_ascii=False)


def _controlCharacter(text: str) -> str | None:
    """
    @return: The first control character of C{text} (C0, DEL or C1: Unicode category C{Cc}), or
        L{None}.
    """
    for char in text:
        if unicodedata.category(char) == "Cc":
            return char
    return None


@attrs.frozen
class HeaderTemplate:
    """
    One identity header of a path: its name and its value with placeholders, compiled.

    @ivar name: The header name as written (it starts with C{X-Ptl-}, in any case).
    @ivar parts: Literal text and template names alternately: the even items are literal text
        (possibly empty), the odd ones names from L{TEMPLATE_NAMES}.
    """

    name: bytes
    parts: tuple[str, ...]

    @classmethod
    def compile(cls, name: str, template: object, where: str) -> HeaderTemplate:
        """
        Check a header name and its template and compile them.

        @param name: The header name.
        @param template: The template (from JSON: anything).
        @param where: The field path of the header, for messages.
        @raise AppError: If the name is not a header name starting with C{X-Ptl-}, or the template
            is not a string, has a control character, an unclosed C{{{}, or an unknown name.
        """
        if _TOKEN.fullmatch(name) is None:
            raise AppError(
                f"{where}: not a valid header name (letters, digits and !#$%&'*+-.^_`|~ only)"
            )
        encoded = name.encode("ascii")
        if not encoded.lower().startswith(HEADER_PREFIX) or len(encoded) == len(HEADER_PREFIX):
            raise AppError(
                f"{where}: header names must start with X-Ptl- (the prefix the gateway reserves: "
                "it strips such headers from visitors, so the app can trust them)"
            )
        if not isinstance(template, str):
            raise AppError(f'{where}: must be a string, such as "{{{{ auth.client_id }}}}"')
        control = _controlCharacter(template)
        if control is not None:
            raise AppError(f"{where}: contains the control character U+{ord(control):04X}")
        parts: list[str] = []
        last = 0
        for placeholder in _PLACEHOLDER.finditer(template):
            templateName = placeholder.group(1).strip()
            if templateName not in TEMPLATE_NAMES:
                raise AppError(
                    f"{where}: unknown name {templateName!r} in {placeholder.group(0)!r}; the "
                    f"names are {', '.join(TEMPLATE_NAMES)}"
                )
            parts += [template[last : placeholder.start()], templateName]
            last = placeholder.end()
        parts.append(template[last:])
        for literal in parts[::2]:
            if "{{" in literal:
                raise AppError(f"{where}: '{{{{' without a matching '}}}}'")
        return cls(encoded, tuple(parts))

    def render(self, values: Mapping[str, str]) -> bytes:
        """
        Substitute the values of the template names.

        @param values: A value for every name of L{TEMPLATE_NAMES}.
        @return: The header value, UTF-8.
        @raise TemplateRefused: If a value contains a control character (CR, LF, NUL, any other C0
            or C1 character, DEL).
        """
        out = []
        for index, part in enumerate(self.parts):
            if index % 2:
                value = values[part]
                if _controlCharacter(value) is not None:
                    raise TemplateRefused(self.name, part)
                out.append(value)
            else:
                out.append(part)
        return "".join(out).encode("utf-8")


@attrs.frozen
class PathPolicy:
    """
    One entry of C{paths}: who may call the paths under a prefix, and the headers the app gets.

    @ivar prefix: C{""} (every path), or a normalised path starting with C{/}. One ending in C{/}
        matches the paths that start with it; any other matches itself and the paths under it
        (C{/api} matches C{/api} and C{/api/x}, not C{/apix}).
    @ivar access: One of L{ACCESS_LEVELS}.
    @ivar headers: The identity headers: the entry's own C{headers}, or without that key those of
        the nearest shorter prefix that matches this one.
    """

    prefix: str
    access: str
    headers: tuple[HeaderTemplate, ...]

    def matches(self, path: str) -> bool:
        """
        @param path: A normalised request path.
        @return: Whether this entry's prefix covers C{path}.
        """
        prefix = self.prefix
        if not prefix or prefix.endswith("/"):
            return path.startswith(prefix)
        return path == prefix or path.startswith(prefix + "/")


def requestPaths(target: str) -> tuple[str, str] | None:
    """
    The paths the gateway decides on, for a request-target.

    @param target: The request-target as sent.
    @return: The normalised path (L{normalisePath}; the query and fragment never count), and the
        path an app may read instead: with escaped slashes and backslashes (C{%2F}, C{%5C}) and
        backslashes read as C{/}, path parameters (C{;...} in a segment) dropped, runs of C{/}
        read as one, and dot segments then removed again.
        L{None} for a target in neither origin nor absolute form (C{*}, C{host:port}).
    """
    origin = originForm(target)
    if origin is None:
        return None
    path = normalisePath(origin.partition("?")[0])
    loose = _PARAMETERS.sub("", _ESCAPED_SEPARATOR.sub("/", path))
    loose = normalisePath(_SLASHES.sub("/", loose))
    return path, loose


@attrs.frozen
class App:
    """
    A gateway app: what an C{app.json} says.

    @ivar name: The lease label, lowercase.
    @ivar routes: The routes, in the order they were written.
    @ivar paths: The C{paths} entries, longest prefix first; the last one is C{""}.
    @ivar source: Where the app was read from, for messages.
    """

    name: str
    routes: tuple[Route, ...]
    paths: tuple[PathPolicy, ...]
    source: str = "app.json"

    def _entry(self, path: str) -> PathPolicy:
        """
        @return: The entry with the longest prefix covering the normalised C{path}.
        """
        for entry in self.paths:
            if entry.matches(path):
                return entry
        raise AssertionError("the entry '' covers every path")

    def policyFor(self, target: str) -> PathPolicy:
        """
        Find the entry of C{paths} that decides a request: the longest prefix that covers its
        normalised path.

        @param target: The request-target as sent (the query never counts).
        @return: The entry; the C{""} entry for a target that has no path (C{*}).
        @raise AmbiguousPath: If reading escaped slashes, backslashes or empty segments as an app
            might (L{requestPaths}) would select another entry.
        """
        paths = requestPaths(target)
        if paths is None:
            return self.paths[-1]
        path, loose = paths
        entry = self._entry(path)
        if self._entry(loose) != entry:
            raise AmbiguousPath(
                f"the path {path!r} could be read as {loose!r}, which another entry of paths covers"
            )
        return entry

    def describe(self) -> str:
        """
        @return: The app for humans: its name and C{PREFIX=TARGET} for each route.
        """
        routes = " ".join(
            f"{r.prefix}={r.upstream.authority}{r.upstream.basePath}"
            f"{',strip' if r.strip else ''}{',host' if r.rewriteHost else ''}"
            for r in self.routes
        )
        return f"app {self.name}: {routes}"


class _Object(dict[str, Any]):
    """
    A JSON object that remembers the keys it had twice (C{json} keeps the last value silently).

    @ivar duplicates: The keys given more than once.
    """

    duplicates: list[str]


def _pairs(pairs: list[tuple[str, Any]]) -> _Object:
    """
    C{object_pairs_hook} for L{json.loads}: build an L{_Object}, noting duplicate keys.
    """
    result = _Object()
    result.duplicates = []
    for key, value in pairs:
        if key in result:
            result.duplicates.append(key)
        result[key] = value
    return result


def _object(value: object, where: str, what: str) -> dict[str, Any]:
    """
    @param value: A JSON value.
    @param where: Its field path, for messages.
    @param what: What it must hold, for messages.
    @return: C{value}, if it is a JSON object without duplicate keys.
    @raise AppError: If it is not.
    """
    if not isinstance(value, dict):
        raise AppError(f"{where}: must be an object of {what}")
    if isinstance(value, _Object) and value.duplicates:
        raise AppError(f"{where}: the key {_key(value.duplicates[0])} is given twice")
    return value


def _unknownKeys(value: dict[str, Any], allowed: tuple[str, ...], where: str) -> None:
    """
    @raise AppError: If C{value} has a key not in C{allowed} (a typo would otherwise go unseen).
    """
    for key in value:
        if key not in allowed:
            raise AppError(f"{where}unknown key {_key(key)}; the keys are {', '.join(allowed)}")


def _parseRoutes(value: object) -> tuple[Route, ...]:
    """
    @param value: C{routes}.
    @return: The routes, in the order written.
    @raise AppError: If C{routes} is not a non-empty object of prefixes to targets, or a route is
        malformed, or two prefixes are the same once normalised.
    """
    routes = _object(value, "routes", 'path prefixes to targets, such as {"/": "3000"}')
    if not routes:
        raise AppError('routes: must have at least one route, such as "/": "3000"')
    parsed: dict[str, tuple[str, Route]] = {}
    for prefix, target in routes.items():
        where = f"routes[{_key(prefix)}]"
        if not isinstance(target, str):
            raise AppError(
                f'{where}: must be a string, a target as --http-route takes it ("3000", '
                '"http://127.0.0.1:3001", "3001,strip")'
            )
        if "=" in prefix:
            raise AppError(f"{where}: a prefix may not contain '='; percent-encode it (%3D)")
        try:
            route = makeRoute(prefix, target, where)
        except RouteError as e:
            raise AppError(str(e))
        if route.prefix in parsed:
            raise AppError(
                f"{where}: the same prefix ({route.prefix}) as routes"
                f"[{_key(parsed[route.prefix][0])}]"
            )
        parsed[route.prefix] = (prefix, route)
    return tuple(route for _, route in parsed.values())


def _checkPrefix(prefix: str, where: str) -> None:
    """
    Check a key of C{paths}.

    @raise AppError: If it is neither C{""} nor a path starting with C{/}, has a query, a fragment,
        a character to percent-encode, or is not written in normalised form, or has C{//}, C{%2F},
        C{%5C} or C{;} (which apps read in different ways).
    """
    if prefix == "":
        return
    if not prefix.startswith("/"):
        raise AppError(f"{where}: a path prefix must be \"\" (every path) or start with '/'")
    try:
        checkPath(prefix, "prefix", where)
    except RouteError as e:
        raise AppError(str(e))
    normalised = normalisePath(prefix)
    if normalised != prefix:
        raise AppError(f"{where}: write the prefix in normalised form, {_key(normalised)}")
    if "//" in prefix or ";" in prefix or _ESCAPED_SEPARATOR.search(prefix):
        raise AppError(
            f"{where}: a prefix may not contain '//', ';', %2F or %5C (apps read them in "
            "different ways)"
        )


def _parseHeaders(value: object, where: str) -> tuple[HeaderTemplate, ...]:
    """
    @param value: A path's C{headers}.
    @param where: Its field path.
    @return: The compiled templates.
    @raise AppError: If a name or template is invalid, or two names differ only in case.
    """
    headers = _object(value, where, 'header names to templates, such as {"X-Ptl-Client-Id": ...}')
    compiled: list[HeaderTemplate] = []
    seen: dict[bytes, str] = {}
    for name, template in headers.items():
        field = f"{where}[{_key(name)}]"
        header = HeaderTemplate.compile(name, template, field)
        lower = header.name.lower()
        if lower in seen:
            raise AppError(f"{field}: the same header as {where}[{_key(seen[lower])}]")
        seen[lower] = name
        compiled.append(header)
    return tuple(compiled)


def _parsePaths(value: object) -> tuple[PathPolicy, ...]:
    """
    @param value: C{paths}.
    @return: The entries, longest prefix first, each with its headers resolved (an entry without
        C{headers} has those of the nearest shorter prefix that covers it).
    @raise AppError: If an entry is malformed, or C{""} is missing.
    """
    paths = _object(value, "paths", 'path prefixes to {"access": ...}')
    if "" not in paths:
        raise AppError(
            'paths: the entry "" (every path no longer prefix matches) is missing; add '
            '"": {"access": "private"} or another access'
        )
    entries: list[tuple[str, str, tuple[HeaderTemplate, ...] | None]] = []
    for prefix, entry in paths.items():
        where = f"paths[{_key(prefix)}]"
        _checkPrefix(prefix, where)
        entry = _object(entry, where, 'access and headers, such as {"access": "public"}')
        _unknownKeys(entry, _PATH_KEYS, f"{where}: ")
        if "access" not in entry:
            raise AppError(f"{where}.access: missing; one of {', '.join(ACCESS_LEVELS)}")
        access = entry["access"]
        if access not in ACCESS_LEVELS:
            raise AppError(f"{where}.access: must be one of {', '.join(ACCESS_LEVELS)}")
        headers = (
            _parseHeaders(entry["headers"], f"{where}.headers") if "headers" in entry else None
        )
        entries.append((prefix, access, headers))
    # Shortest first, so that each entry's nearest covering entry is resolved before it.
    entries.sort(key=lambda item: len(item[0]))
    resolved: list[PathPolicy] = []
    for prefix, access, headers in entries:
        if headers is None:
            covering = [p for p in resolved if p.matches(prefix)]
            headers = covering[-1].headers if covering else ()
        resolved.append(PathPolicy(prefix, access, headers))
    return tuple(reversed(resolved))


def parseApp(data: object, source: str = "app.json") -> App:
    """
    Check a parsed C{app.json} and build the app.

    @param data: The file's JSON value.
    @param source: Where it was read from, for L{App.source}.
    @return: The app.
    @raise AppError: For the first problem found, naming its field.
    """
    if not isinstance(data, dict):
        raise AppError(
            'the top level must be an object: {"name": ..., "routes": ..., "paths": ...}'
        )
    app = _object(data, "app.json", "name, routes and paths")
    _unknownKeys(app, _APP_KEYS, "")
    if "name" not in app:
        raise AppError('name: missing; the app\'s name is its lease label, such as "myapp"')
    name = app["name"]
    if not isinstance(name, str):
        raise AppError("name: must be a string")
    try:
        name = validateLabel(name)
    except InvalidName as e:
        raise AppError(f"name: {e}")
    if "routes" not in app:
        raise AppError('routes: missing; such as {"/": "3000"}')
    routes = _parseRoutes(app["routes"])
    if "paths" not in app:
        raise AppError('paths: missing; it needs at least the entry "" (every path)')
    return App(name, routes, _parsePaths(app["paths"]), source)


def loadApp(path: str) -> App:
    """
    Read and check an C{app.json}.

    @param path: The file.
    @return: The app.
    @raise AppError: If the file cannot be read, is not JSON, or is not a valid app.
    """
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as e:
        raise AppError(f"cannot read the file: {e.strerror or e}")
    try:
        data = json.loads(text, object_pairs_hook=_pairs)
    except UnicodeDecodeError:
        raise AppError("the file is not UTF-8 text")
    except json.JSONDecodeError as e:
        raise AppError(f"not valid JSON: {e.msg} (line {e.lineno} column {e.colno})")
    return parseApp(data, path)
