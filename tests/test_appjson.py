"""
Tests for L{portal.gateway.appjson}: loading and checking an C{app.json}, choosing the entry of
C{paths} for a request, and rendering header templates.
"""

from __future__ import annotations

import copy
import json
import os
import re
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from portal.gateway.appjson import (
    TEMPLATE_NAMES,
    AmbiguousPath,
    App,
    AppError,
    HeaderTemplate,
    TemplateRefused,
    loadApp,
    parseApp,
    requestPaths,
)
from portal.gateway.routes import Upstream

#: The example of the issue and of C{docs/app-json.md}.
EXAMPLE: dict[str, Any] = {
    "name": "myapp",
    "routes": {"/": "3000", "/api": "http://127.0.0.1:3001"},
    "paths": {
        "": {
            "access": "private",
            "headers": {
                "X-Ptl-Client-Id": "{{ auth.client_id }}",
                "X-Ptl-Client-Name": "{{ auth.client_name }}",
                "X-Ptl-Client-Type": "{{ auth.client_type }}",
            },
        },
        "/public/": {"access": "public"},
        "/friends/": {"access": "peer"},
    },
}

#: A value for every template name.
VALUES = {
    "auth.client_type": "terminal",
    "auth.client_id": "t1",
    "auth.client_name": "Zoë's phone",
    "portal.domain": "localhost",
    "portal.id": "a" * 52,
    "portal.short_id": "a" * 12,
}


def example(**changes: Any) -> dict[str, Any]:
    """
    @param changes: Top-level keys to replace (a value of L{None} removes the key).
    @return: A deep copy of L{EXAMPLE} with C{changes}.
    """
    data = copy.deepcopy(EXAMPLE)
    for key, value in changes.items():
        if value is None:
            del data[key]
        else:
            data[key] = value
    return data


def withPaths(**entries: Any) -> dict[str, Any]:
    """
    @param entries: C{paths} entries by prefix; the key C{root} stands for C{""}.
    @return: L{EXAMPLE} with exactly these C{paths}.
    """
    return example(paths={("" if k == "root" else k): v for k, v in entries.items()})


def rootHeaders(headers: Any) -> dict[str, Any]:
    """
    @return: L{EXAMPLE} whose only path is C{""}, public, with C{headers}.
    """
    return withPaths(root={"access": "public", "headers": headers})


class ExampleTests(SynchronousTestCase):
    """
    The example of the issue loads as it says.
    """

    def test_example(self) -> None:
        """
        The name is the label; the routes are parsed as C{--http-route} targets; the paths come
        longest prefix first, each with its access, the entries without C{headers} with those of
        C{""}.
        """
        app = parseApp(EXAMPLE, "myapp.json")
        self.assertEqual(app.name, "myapp")
        self.assertEqual(app.source, "myapp.json")
        self.assertEqual(
            [(r.prefix, r.upstream) for r in app.routes],
            [
                ("/", Upstream("127.0.0.1", 3000, False, "")),
                ("/api", Upstream("127.0.0.1", 3001, False, "")),
            ],
        )
        self.assertEqual(
            [(p.prefix, p.access) for p in app.paths],
            [("/friends/", "peer"), ("/public/", "public"), ("", "private")],
        )
        names = [b"X-Ptl-Client-Id", b"X-Ptl-Client-Name", b"X-Ptl-Client-Type"]
        for entry in app.paths:
            self.assertEqual([h.name for h in entry.headers], names)

    def test_describe(self) -> None:
        """
        L{App.describe} names the app and its routes.
        """
        self.assertEqual(
            parseApp(EXAMPLE).describe(), "app myapp: /=127.0.0.1:3000 /api=127.0.0.1:3001"
        )

    def test_routeOptions(self) -> None:
        """
        A route target takes C{--http-route}'s options.
        """
        app = parseApp(example(routes={"/": "3000", "/api": "3001,strip,host"}))
        [api] = [r for r in app.routes if r.prefix == "/api"]
        self.assertTrue(api.strip)
        self.assertTrue(api.rewriteHost)

    def test_nameLowercased(self) -> None:
        """
        The name is lowercased, as lease labels are.
        """
        self.assertEqual(parseApp(example(name="MyApp")).name, "myapp")


class ValidationTests(SynchronousTestCase):
    """
    Each rule of the format, with the message naming the field and the problem.
    """

    def assertInvalid(self, data: Any, message: str) -> None:
        """
        Check that C{data} is refused with exactly C{message}.
        """
        e = self.assertRaises(AppError, parseApp, data)
        self.assertEqual(str(e), message)

    def test_topLevel(self) -> None:
        """
        The top level must be an object.
        """
        values: list[Any] = [[], "x", None, 3]
        for data in values:
            self.assertInvalid(
                data,
                'the top level must be an object: {"name": ..., "routes": ..., "paths": ...}',
            )

    def test_unknownKey(self) -> None:
        """
        An unknown top-level key (a typo) is refused, naming the known ones.
        """
        self.assertInvalid(example(path={}), 'unknown key "path"; the keys are name, routes, paths')

    def test_nameMissing(self) -> None:
        """
        C{name} is required.
        """
        self.assertInvalid(
            example(name=None),
            'name: missing; the app\'s name is its lease label, such as "myapp"',
        )

    def test_nameNotString(self) -> None:
        """
        C{name} must be a string.
        """
        self.assertInvalid(example(name=3), "name: must be a string")

    def test_nameNotLabel(self) -> None:
        """
        C{name} must be a DNS label, with L{portal.trust.names}' reason.
        """
        self.assertInvalid(
            example(name="my app"),
            "name: lease name 'my app' is not a DNS label: use only letters a-z, digits 0-9 "
            "and '-'",
        )
        self.assertInvalid(
            example(name="-x"),
            "name: lease name '-x' is not a DNS label: it may not start or end with '-'",
        )

    def test_routesMissing(self) -> None:
        """
        C{routes} is required.
        """
        self.assertInvalid(example(routes=None), 'routes: missing; such as {"/": "3000"}')

    def test_routesNotObject(self) -> None:
        """
        C{routes} must be an object.
        """
        self.assertInvalid(
            example(routes=["/=3000"]),
            'routes: must be an object of path prefixes to targets, such as {"/": "3000"}',
        )

    def test_routesEmpty(self) -> None:
        """
        C{routes} needs a route.
        """
        self.assertInvalid(
            example(routes={}), 'routes: must have at least one route, such as "/": "3000"'
        )

    def test_routeTargetNotString(self) -> None:
        """
        A route's target must be a string.
        """
        self.assertInvalid(
            example(routes={"/": 3000}),
            'routes["/"]: must be a string, a target as --http-route takes it ("3000", '
            '"http://127.0.0.1:3001", "3001,strip")',
        )

    def test_routeMalformed(self) -> None:
        """
        A malformed route gets C{--http-route}'s reason, under its field.
        """
        self.assertInvalid(
            example(routes={"/": "ftp://x:1"}),
            "routes[\"/\"]: scheme 'ftp': only http://, https://, h2c:// and h2:// are supported",
        )
        self.assertInvalid(
            example(routes={"/": "99999"}),
            "routes[\"/\"]: '99999' is not a port number (1-65535)",
        )
        self.assertInvalid(
            example(routes={"api": "3000"}), "routes[\"api\"]: PREFIX 'api' must start with '/'"
        )
        self.assertInvalid(
            example(routes={"/": "3000,gzip"}),
            "routes[\"/\"]: unknown option 'gzip'; the options are 'strip' and 'host'",
        )

    def test_routePrefixEquals(self) -> None:
        """
        A route prefix cannot contain C{=} (it ends a C{--http-route} prefix).
        """
        self.assertInvalid(
            example(routes={"/a=b": "3000"}),
            "routes[\"/a=b\"]: a prefix may not contain '='; percent-encode it (%3D)",
        )

    def test_routeSamePrefix(self) -> None:
        """
        Two route prefixes that are the same once normalised are refused.
        """
        self.assertInvalid(
            example(routes={"/api": "3000", "/api/": "3001"}),
            'routes["/api/"]: the same prefix (/api) as routes["/api"]',
        )

    def test_pathsMissing(self) -> None:
        """
        C{paths} is required: an app is never a bare route table.
        """
        self.assertInvalid(
            example(paths=None), 'paths: missing; it needs at least the entry "" (every path)'
        )

    def test_pathsNotObject(self) -> None:
        """
        C{paths} must be an object.
        """
        self.assertInvalid(
            example(paths=[]),
            'paths: must be an object of path prefixes to {"access": ...}',
        )

    def test_rootMissing(self) -> None:
        """
        The entry C{""} must exist.
        """
        self.assertInvalid(
            withPaths(**{"/public/": {"access": "public"}}),
            'paths: the entry "" (every path no longer prefix matches) is missing; add '
            '"": {"access": "private"} or another access',
        )

    def test_entryNotObject(self) -> None:
        """
        An entry must be an object.
        """
        self.assertInvalid(
            withPaths(root="public"),
            'paths[""]: must be an object of access and headers, such as {"access": "public"}',
        )

    def test_entryUnknownKey(self) -> None:
        """
        An entry's unknown key is refused.
        """
        self.assertInvalid(
            withPaths(root={"access": "public", "acces": "private"}),
            'paths[""]: unknown key "acces"; the keys are access, headers',
        )

    def test_accessMissing(self) -> None:
        """
        Every entry needs C{access}: nothing is inherited silently.
        """
        self.assertInvalid(
            withPaths(root={"access": "public"}, **{"/x/": {}}),
            'paths["/x/"].access: missing; one of public, private, peer',
        )

    def test_accessUnknown(self) -> None:
        """
        C{access} must be one of the three levels.
        """
        for access in ("everyone", "Public", None, 1):
            self.assertInvalid(
                withPaths(root={"access": "public"}, **{"/x/": {"access": access}}),
                'paths["/x/"].access: must be one of public, private, peer',
            )

    def test_prefixNoSlash(self) -> None:
        """
        A prefix other than C{""} starts with C{/}.
        """
        self.assertInvalid(
            withPaths(root={"access": "public"}, x={"access": "public"}),
            'paths["x"]: a path prefix must be "" (every path) or start with \'/\'',
        )

    def test_prefixQuery(self) -> None:
        """
        A prefix has no query: the query never takes part.
        """
        self.assertInvalid(
            withPaths(root={"access": "public"}, **{"/a?b": {"access": "public"}}),
            "paths[\"/a?b\"]: prefix '/a?b' may not contain a query or fragment ('?' or '#')",
        )

    def test_prefixCharacters(self) -> None:
        """
        A prefix is written as a request path would be.
        """
        self.assertInvalid(
            withPaths(root={"access": "public"}, **{"/a b/": {"access": "public"}}),
            "paths[\"/a b/\"]: prefix '/a b/' contains ' '; percent-encode it",
        )

    def test_prefixNotNormalised(self) -> None:
        """
        A prefix that normalisation would change is refused with its normalised form, so that the
        file says what is matched.
        """
        for prefix, normalised in (
            ("/%7Eme/", "/~me/"),
            ("/a/../b/", "/b/"),
            ("/a/./b", "/a/b"),
            ("/%2f/", "/%2F/"),
        ):
            self.assertInvalid(
                withPaths(root={"access": "public"}, **{prefix: {"access": "public"}}),
                f'paths["{prefix}"]: write the prefix in normalised form, "{normalised}"',
            )

    def test_prefixAmbiguous(self) -> None:
        """
        A prefix with C{//}, C{;}, C{%2F} or C{%5C} is refused: apps read them in different
        ways.
        """
        for prefix in ("//a/", "/a;b/", "/a%2Fb/", "/a%5Cb/"):
            self.assertInvalid(
                withPaths(root={"access": "public"}, **{prefix: {"access": "public"}}),
                f"paths[\"{prefix}\"]: a prefix may not contain '//', ';', %2F or %5C (apps read "
                "them in different ways)",
            )

    def test_headersNotObject(self) -> None:
        """
        C{headers} must be an object.
        """
        self.assertInvalid(
            rootHeaders(["X-Ptl-A"]),
            'paths[""].headers: must be an object of header names to templates, such as '
            '{"X-Ptl-Client-Id": ...}',
        )

    def test_headerPrefix(self) -> None:
        """
        A header name must start with C{X-Ptl-}, in any case, and have more after it.
        """
        for name in ("X-Client-Id", "Authorization", "X-Ptl-", "Ptl-X"):
            self.assertInvalid(
                rootHeaders({name: "x"}),
                f'paths[""].headers["{name}"]: header names must start with X-Ptl- (the prefix '
                "the gateway reserves: it strips such headers from visitors, so the app can "
                "trust them)",
            )
        parseApp(rootHeaders({"x-ptl-a": "x", "X-PTL-B": "y"}))

    def test_headerNameInvalid(self) -> None:
        """
        A header name must be an HTTP token.
        """
        for name in ("X-Ptl-A B", "X-Ptl-A:", "X-Ptl-Ä", ""):
            self.assertInvalid(
                rootHeaders({name: "x"}),
                f'paths[""].headers[{json.dumps(name, ensure_ascii=False)}]: not a valid header '
                "name (letters, digits and !#$%&'*+-.^_`|~ only)",
            )

    def test_headerSameName(self) -> None:
        """
        Two header names that differ only in case are refused.
        """
        self.assertInvalid(
            rootHeaders({"X-Ptl-A": "x", "x-ptl-a": "y"}),
            'paths[""].headers["x-ptl-a"]: the same header as paths[""].headers["X-Ptl-A"]',
        )

    def test_templateNotString(self) -> None:
        """
        A template is a string.
        """
        self.assertInvalid(
            rootHeaders({"X-Ptl-A": 1}),
            'paths[""].headers["X-Ptl-A"]: must be a string, such as "{{ auth.client_id }}"',
        )

    def test_templateUnknownName(self) -> None:
        """
        A name outside the six is refused at load time, listing them; there are no expressions.
        """
        for template, inner in (
            ("{{ auth.email }}", "auth.email"),
            ("{{auth.client_id|upper}}", "auth.client_id|upper"),
            ("{{ }}", ""),
            ("{{ __import__('os') }}", "__import__('os')"),
        ):
            e = self.assertRaises(AppError, parseApp, rootHeaders({"X-Ptl-A": template}))
            self.assertEqual(
                str(e),
                f'paths[""].headers["X-Ptl-A"]: unknown name {inner!r} in '
                f"{template!r}; the names are {', '.join(TEMPLATE_NAMES)}",
            )

    def test_templateUnclosed(self) -> None:
        """
        A C{{{} without C{}}} is refused.
        """
        self.assertInvalid(
            rootHeaders({"X-Ptl-A": "id={{ auth.client_id"}),
            "paths[\"\"].headers[\"X-Ptl-A\"]: '{{' without a matching '}}'",
        )

    def test_templateControlCharacter(self) -> None:
        """
        A template's literal text may not hold control characters.
        """
        for char in ("\r", "\n", "\0", "\t", "\x7f", "\x85"):
            self.assertInvalid(
                rootHeaders({"X-Ptl-A": f"a{char}b"}),
                f'paths[""].headers["X-Ptl-A"]: contains the control character U+{ord(char):04X}',
            )


class LoadTests(SynchronousTestCase):
    """
    L{loadApp} reads the file.
    """

    def write(self, content: bytes) -> str:
        """
        @return: A file holding C{content}.
        """
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(content)
        return path

    def test_load(self) -> None:
        """
        A valid file gives its app, with the file as source.
        """
        path = self.write(json.dumps(EXAMPLE).encode())
        app = loadApp(path)
        self.assertEqual(app.name, "myapp")
        self.assertEqual(app.source, path)

    def test_missing(self) -> None:
        """
        A missing file is refused with the system's reason.
        """
        e = self.assertRaises(AppError, loadApp, os.path.join(self.mktemp(), "app.json"))
        self.assertEqual(str(e), "cannot read the file: No such file or directory")

    def test_notJSON(self) -> None:
        """
        Invalid JSON is refused with the line and column.
        """
        e = self.assertRaises(AppError, loadApp, self.write(b'{"name": "a",\n  }'))
        self.assertEqual(
            str(e),
            "not valid JSON: Expecting property name enclosed in double quotes (line 2 column 3)",
        )

    def test_notUTF8(self) -> None:
        """
        A file that is not UTF-8 is refused.
        """
        e = self.assertRaises(AppError, loadApp, self.write(b'{"name": "\xff"}'))
        self.assertEqual(str(e), "the file is not UTF-8 text")

    def test_duplicateKey(self) -> None:
        """
        A key given twice in the file is refused, naming the object.
        """
        data = json.dumps(EXAMPLE)[:-1] + ', "name": "other"}'
        e = self.assertRaises(AppError, loadApp, self.write(data.encode()))
        self.assertEqual(str(e), 'app.json: the key "name" is given twice')

    def test_duplicateKeyNested(self) -> None:
        """
        A key given twice in a nested object (which JSON parsers silently collapse) is refused,
        naming that object.
        """
        text = b'{"name": "a", "routes": {"/": "1", "/": "2"}, "paths": {"": {"access": "public"}}}'
        e = self.assertRaises(AppError, loadApp, self.write(text))
        self.assertEqual(str(e), 'routes: the key "/" is given twice')


class PolicyTests(SynchronousTestCase):
    """
    L{App.policyFor}: the longest prefix covering the normalised path decides; the query never
    does.
    """

    def setUp(self) -> None:
        """
        An app with nested prefixes.
        """
        self.app: App = parseApp(
            withPaths(
                root={"access": "private"},
                **{
                    "/public/": {"access": "public"},
                    "/public/secret/": {"access": "private"},
                    "/friends": {"access": "peer"},
                    "/favicon.ico": {"access": "public"},
                },
            )
        )

    def prefixFor(self, target: str) -> str:
        """
        @return: The prefix of the entry deciding C{target}.
        """
        return self.app.policyFor(target).prefix

    def test_longestFirst(self) -> None:
        """
        The longest covering prefix wins, whatever the order in the file.
        """
        self.assertEqual(self.prefixFor("/public/a"), "/public/")
        self.assertEqual(self.prefixFor("/public/secret/a"), "/public/secret/")
        self.assertEqual(self.prefixFor("/other"), "")
        self.assertEqual(self.prefixFor("/"), "")

    def test_trailingSlash(self) -> None:
        """
        A prefix ending in C{/} covers what starts with it, not the path without the slash.
        """
        self.assertEqual(self.prefixFor("/public/"), "/public/")
        self.assertEqual(self.prefixFor("/public"), "")
        self.assertEqual(self.prefixFor("/publicity"), "")

    def test_segments(self) -> None:
        """
        A prefix without a final C{/} covers itself and the paths under it, not longer names.
        """
        self.assertEqual(self.prefixFor("/friends"), "/friends")
        self.assertEqual(self.prefixFor("/friends/x"), "/friends")
        self.assertEqual(self.prefixFor("/friendship"), "")
        self.assertEqual(self.prefixFor("/favicon.ico"), "/favicon.ico")
        self.assertEqual(self.prefixFor("/favicon.ico.bak"), "")

    def test_query(self) -> None:
        """
        The query takes no part: C{?/public/} does not make a private path public.
        """
        self.assertEqual(self.prefixFor("/x?next=/public/"), "")
        self.assertEqual(self.prefixFor("/x#/public/"), "")
        self.assertEqual(self.prefixFor("/public/?a=/x"), "/public/")

    def test_normalised(self) -> None:
        """
        The path is normalised first: dot segments and escapes of unreserved characters cannot
        move a request out of (or into) a prefix.
        """
        self.assertEqual(self.prefixFor("/public/../private"), "")
        self.assertEqual(self.prefixFor("/public/%2E%2E/x"), "")
        self.assertEqual(self.prefixFor("/%70ublic/a"), "/public/")
        self.assertEqual(self.prefixFor("/x/../public/a"), "/public/")
        self.assertEqual(self.prefixFor("/public/secret/../a"), "/public/")

    def test_absoluteForm(self) -> None:
        """
        An absolute-form target is decided on its path.
        """
        self.assertEqual(self.prefixFor("http://other.example/public/a"), "/public/")
        self.assertEqual(self.prefixFor("https://x/"), "")

    def test_noPath(self) -> None:
        """
        A target without a path (C{*}) is decided by C{""}.
        """
        self.assertEqual(self.prefixFor("*"), "")

    def test_ambiguous(self) -> None:
        """
        A path that an app could read as one under another entry (escaped slashes or backslashes,
        empty segments, C{;} parameters) is refused with L{AmbiguousPath}.
        """
        for target in (
            "/x%2F..%2Fpublic/a",
            "/x%2f..%2fpublic%2fa",
            "/public/..%5Cx",
            "//public/x",
            "/public/secret;x=1/a",
            "/x\\..\\public\\a",
        ):
            self.assertRaises(AmbiguousPath, self.app.policyFor, target)

    def test_unambiguous(self) -> None:
        """
        Such a path is accepted when both readings fall under the same entry.
        """
        self.assertEqual(self.prefixFor("/public//a"), "/public/")
        self.assertEqual(self.prefixFor("/public/a%2Fb"), "/public/")
        self.assertEqual(self.prefixFor("/x;y"), "")
        self.assertEqual(self.prefixFor("/public%2F..%2Fx"), "")

    def test_requestPaths(self) -> None:
        """
        L{requestPaths} gives the normalised path and the loose reading.
        """
        self.assertEqual(requestPaths("/a//b%2f..;p/c?q"), ("/a//b%2F..;p/c", "/a/c"))
        self.assertIsNone(requestPaths("*"))

    def test_headersInherited(self) -> None:
        """
        An entry without C{headers} has those of the nearest shorter prefix covering it; an
        entry with C{"headers": {}} has none, and the entries under it inherit that.
        """
        app = parseApp(
            withPaths(
                root={"access": "public", "headers": {"X-Ptl-A": "a"}},
                **{
                    "/b/": {"access": "public", "headers": {"X-Ptl-B": "b"}},
                    "/b/c/": {"access": "public"},
                    "/d": {"access": "public", "headers": {}},
                    "/d/e": {"access": "public"},
                    "/f/": {"access": "public"},
                },
            )
        )
        names = {p.prefix: [h.name for h in p.headers] for p in app.paths}
        self.assertEqual(
            names,
            {
                "": [b"X-Ptl-A"],
                "/b/": [b"X-Ptl-B"],
                "/b/c/": [b"X-Ptl-B"],
                "/d": [],
                "/d/e": [],
                "/f/": [b"X-Ptl-A"],
            },
        )


class TemplateTests(SynchronousTestCase):
    """
    L{HeaderTemplate}: substitution of the six names only.
    """

    def compile(self, template: str) -> HeaderTemplate:
        """
        @return: C{template} compiled for header C{X-Ptl-T}.
        """
        return HeaderTemplate.compile("X-Ptl-T", template, "t")

    def test_eachName(self) -> None:
        """
        Each of the six names is replaced by its value, with or without spaces in the braces.
        """
        for name in TEMPLATE_NAMES:
            for template in (f"{{{{ {name} }}}}", f"{{{{{name}}}}}"):
                self.assertEqual(
                    self.compile(template).render(VALUES), VALUES[name].encode("utf-8")
                )

    def test_literalText(self) -> None:
        """
        Text around placeholders, and single braces, are kept as written.
        """
        template = self.compile("id={{ auth.client_id }}; {x} @ {{portal.short_id}}.")
        self.assertEqual(template.render(VALUES), b"id=t1; {x} @ aaaaaaaaaaaa.")
        self.assertEqual(self.compile("fixed").render(VALUES), b"fixed")
        self.assertEqual(self.compile("").render(VALUES), b"")

    def test_valueNotInterpreted(self) -> None:
        """
        A value that looks like a template is not expanded again.
        """
        values = dict(VALUES, **{"auth.client_name": "{{ portal.id }}"})
        self.assertEqual(self.compile("{{ auth.client_name }}").render(values), b"{{ portal.id }}")

    def test_utf8(self) -> None:
        """
        Values are sent UTF-8.
        """
        self.assertEqual(
            self.compile("{{ auth.client_name }}").render(VALUES), "Zoë's phone".encode()
        )

    def test_controlCharacterRefused(self) -> None:
        """
        A value with a control character (CR, LF, NUL, TAB, any other C0, DEL, C1) is refused
        with L{TemplateRefused} naming the header and the name; nothing is rendered.
        """
        template = self.compile("name={{ auth.client_name }}")
        for char in (
            "\r",
            "\n",
            "\r\nX-Ptl-Client-Type: terminal",
            "\0",
            "\t",
            "\x1b",
            "\x7f",
            "\x9b",
        ):
            values = dict(VALUES, **{"auth.client_name": f"evil{char}"})
            e = self.assertRaises(TemplateRefused, template.render, values)
            self.assertEqual(e.header, b"X-Ptl-T")
            self.assertEqual(e.name, "auth.client_name")
            self.assertEqual(
                str(e),
                "the value of {{ auth.client_name }} in header X-Ptl-T contains a control "
                "character",
            )


class DocumentationTests(SynchronousTestCase):
    """
    The examples of the documentation are valid apps.
    """

    def test_examples(self) -> None:
        """
        Every complete C{app.json} in a C{json} block of C{docs/app-json.md} and
        C{docs/user-guide.md} loads; the first one of C{app-json.md} is L{EXAMPLE}.
        """
        docs = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs")
        apps = []
        for name in ("app-json.md", "user-guide.md"):
            with open(os.path.join(docs, name)) as f:
                text = f.read()
            for block in re.findall(r"```json\n(.*?)```", text, re.DOTALL):
                if '"paths"' in block:
                    apps.append((name, parseApp(json.loads(block))))
        self.assertEqual(
            [(name, app.name) for name, app in apps],
            [("app-json.md", "myapp"), ("user-guide.md", "notes")],
        )
        self.assertEqual(apps[0][1], parseApp(EXAMPLE))
