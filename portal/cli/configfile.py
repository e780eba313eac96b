"""
C{portal.toml}: named tunnels in a TOML file, for C{portal start} and C{twistd portal-tunnel --config}.

A file holds a C{[defaults]} table and any number of C{[tunnels.NAME]} tables. Their keys are the long
options of C{portal expose} without the dashes (C{pool-size = 8}, C{http = true}), plus C{target};
the repeatable options (L{REPEATED}) take a list, and a C{relay} entry may be C{{relay = "C:4017",
via = ["A:4017"]}} for a chain. A tunnel's keys override the defaults'. Paths (C{cert}, C{key}, C{identity},
C{app}, C{acme-ca}, a C{registry} file) are relative to the file's directory.

This module reads and checks the file (every error names the key and its line) and turns each tunnel
into the argument list of C{portal expose}, so that one parser (L{TunnelOptions}) builds every
L{TunnelConfig}. The model is ngrok's C{ngrok.yml} and frp's C{frpc.toml}.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from portal.cli.exposeoptions import TunnelOptions
from portal.trust.identity import defaultIdentityPath

#: The file name looked for on the search path.
CONFIG_NAME = "portal.toml"

#: Environment variable naming the configuration file.
CONFIG_ENV = "PORTAL_CONFIG"

#: Keys that take a list (a single string is one entry): the repeatable options of C{portal expose},
#: each with the L{TunnelOptions} key collecting it.
REPEATED = {
    "relay": "relays",
    "http-route": "http-routes",
    "app": "apps",
    "allow-ip": "allow-ips",
    "deny-ip": "deny-ips",
    "basic-auth": "basic-auths",
    "basic-auth-file": "basic-auth-files",
}

#: Keys holding a file path, read relative to the configuration file.
PATH_KEYS = frozenset({"cert", "key", "identity", "app", "basic-auth-file", "acme-ca"})


class ConfigFileError(Exception):
    """
    The configuration file cannot be used; the message names the file, line and key.
    """

    def __init__(self, path: str, line: int | None, key: str | None, message: str) -> None:
        """
        @param path: The file.
        @param line: The line the problem is on, when known.
        @param key: The dotted key, when one is at fault.
        @param message: What is wrong.
        """
        where = path if line is None else f"{path}:{line}"
        super().__init__(f"{where}: {key}: {message}" if key else f"{where}: {message}")
        self.path = path
        self.line = line
        self.key = key


def searchPath(cwd: str | None = None) -> list[str]:
    """
    Where C{portal start} looks for its file when no C{--config} is given, first match wins.

    @param cwd: The working directory (default the current one).
    @return: C{$PORTAL_CONFIG} when set, then C{./portal.toml}, then C{portal.toml} beside the
        default identity (C{~/.config/portal/portal.toml}, under C{XDG_CONFIG_HOME} when set).
    """
    paths = []
    if os.environ.get(CONFIG_ENV):
        paths.append(os.environ[CONFIG_ENV])
    paths.append(os.path.join(cwd or os.getcwd(), CONFIG_NAME))
    paths.append(os.path.join(os.path.dirname(defaultIdentityPath()), CONFIG_NAME))
    return paths


def findConfig(cwd: str | None = None) -> str | None:
    """
    @return: The first existing file of L{searchPath}, or L{None}.
    """
    for path in searchPath(cwd):
        if os.path.isfile(path):
            return path
    return None


def optionKinds(options: type[TunnelOptions] = TunnelOptions) -> dict[str, str]:
    """
    The keys a tunnel table may hold, from the options of C{portal expose} themselves, so that a new
    option is a new key.

    @return: For each key, C{"flag"}, C{"int"}, C{"float"}, C{"str"} or C{"list"}.
    """
    kinds: dict[str, str] = {"target": "str"}
    for flag in _accumulated(options, "optFlags"):
        kinds[flag[0]] = "flag"
    for parameter in _accumulated(options, "optParameters"):
        coerce = parameter[4] if len(parameter) > 4 else None
        kinds[parameter[0]] = "int" if coerce is int else "float" if coerce is float else "str"
    for key in REPEATED:
        kinds[key] = "list"
    return kinds


def _accumulated(options: type[Any], name: str) -> list[Any]:
    """
    @return: The C{name} lists (C{optFlags}, C{optParameters}) of C{options} and its bases.
    """
    found: list[Any] = []
    for klass in reversed(options.__mro__):
        found.extend(vars(klass).get(name, []))
    return found


@attrs.frozen
class TunnelEntry:
    """
    One tunnel of the file, checked but not yet built.

    @ivar name: The table's name (C{[tunnels.NAME]}).
    @ivar values: Each key given (defaults included) with its value, paths made absolute.
    @ivar lines: For each key, the dotted key that gave it (in C{[defaults]} or the tunnel's
        table) and its line.
    @ivar line: The line of the C{[tunnels.NAME]} header.
    """

    name: str
    values: Mapping[str, Any]
    lines: Mapping[str, tuple[str, int | None]]
    line: int | None


@attrs.frozen
class ConfigFile:
    """
    A loaded C{portal.toml}.

    @ivar path: The file.
    @ivar tunnels: The tunnels, in the file's order.
    """

    path: str
    tunnels: tuple[TunnelEntry, ...]

    @property
    def names(self) -> tuple[str, ...]:
        """
        The tunnels' names, in the file's order.
        """
        return tuple(t.name for t in self.tunnels)

    def tunnel(self, name: str) -> TunnelEntry:
        """
        @return: The tunnel called C{name}.
        @raise ConfigFileError: When there is none.
        """
        for entry in self.tunnels:
            if entry.name == name:
                return entry
        raise ConfigFileError(
            self.path, None, None, f"no tunnel {name!r}; it has {_listed(self.names)}"
        )


def loadConfig(path: str) -> ConfigFile:
    """
    Read and check a configuration file.

    @raise ConfigFileError: When it cannot be read, is not TOML, or has an unknown key or a value
        of the wrong type.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigFileError(path, None, None, f"cannot read it: {e}")
    return parseConfig(text, path)


def parseConfig(text: str, path: str = CONFIG_NAME) -> ConfigFile:
    """
    Check the text of a configuration file.

    @param path: The file's name, for messages and for relative paths.
    @raise ConfigFileError: As L{loadConfig}.
    """
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        match = re.search(r"\(at line (\d+), column \d+\)", str(e))
        raise ConfigFileError(
            path, int(match.group(1)) if match else None, None, f"not valid TOML: {e}"
        )
    lines = keyLines(text)
    for key in document:
        if key not in ("defaults", "tunnels"):
            raise ConfigFileError(
                path,
                min((n for k, n in lines.items() if k[0] == key), default=None),
                key,
                "unknown table; a portal.toml has [defaults] and [tunnels.NAME] tables",
            )
    kinds = optionKinds()
    base = os.path.dirname(os.path.abspath(path))
    defaults = _table(document, "defaults", path, lines)
    checkedDefaults = {
        key: _checkValue(path, lines, ("defaults", key), kinds, value, base)
        for key, value in defaults.items()
    }
    if "target" in checkedDefaults:
        raise ConfigFileError(
            path, lines.get(("defaults", "target")), "defaults.target", "each tunnel has its own"
        )
    tunnels = _table(document, "tunnels", path, lines)
    if not tunnels:
        raise ConfigFileError(path, None, "tunnels", "no [tunnels.NAME] table: nothing to start")
    entries = []
    for name, table in tunnels.items():
        if not isinstance(table, dict):
            raise ConfigFileError(
                path, lines.get(("tunnels", name)), f"tunnels.{name}", "expected a table"
            )
        values = dict(checkedDefaults)
        keyLine = {
            key: (f"defaults.{key}", lines.get(("defaults", key))) for key in checkedDefaults
        }
        for key, value in table.items():
            values[key] = _checkValue(path, lines, ("tunnels", name, key), kinds, value, base)
            keyLine[key] = (f"tunnels.{name}.{key}", lines.get(("tunnels", name, key)))
        entries.append(TunnelEntry(name, values, keyLine, lines.get(("tunnels", name))))
    return ConfigFile(path, tuple(entries))


def _table(document: Mapping[str, Any], key: str, path: str, lines: Mapping[Any, int]) -> Any:
    """
    @return: The table C{key} of the document (empty when absent).
    @raise ConfigFileError: When it is not a table.
    """
    table = document.get(key, {})
    if not isinstance(table, dict):
        raise ConfigFileError(path, lines.get((key,)), key, "expected a table")
    return table


_KINDS = {
    "flag": "true or false",
    "int": "an integer",
    "float": "a number",
    "str": "a string",
    "list": "a string or a list of strings",
}


def _checkValue(
    path: str,
    lines: Mapping[tuple[str, ...], int],
    where: tuple[str, ...],
    kinds: Mapping[str, str],
    value: Any,
    base: str,
) -> Any:
    """
    Check one key's value against the option it stands for.

    @param where: The key's dotted path (C{("tunnels", "web", "pool-size")}).
    @param base: The directory relative paths start from.
    @return: The value, paths made absolute and single strings of list keys made lists.
    @raise ConfigFileError: For an unknown key or a value of the wrong type.
    """
    key = where[-1]
    dotted = ".".join(where)
    line = lines.get(where)
    kind = kinds.get(key)
    if kind is None:
        close = difflib.get_close_matches(key, list(kinds), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigFileError(path, line, dotted, f"unknown key{hint}")
    if kind == "flag":
        ok = isinstance(value, bool)
    elif kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif kind == "str":
        ok = isinstance(value, str) or (key == "target" and isinstance(value, int))
        value = str(value)
    else:
        if isinstance(value, str):
            value = [value]
        ok = isinstance(value, list) and all(
            isinstance(v, str) or (key == "relay" and _isChainEntry(v)) for v in value
        )
    if not ok:
        extra = ' or {relay = "HOST:PORT", via = ["HOP:PORT"]}' if key == "relay" else ""
        raise ConfigFileError(path, line, dotted, f"expected {_KINDS[kind]}{extra}, got {value!r}")
    if key in PATH_KEYS:
        value = [_absolute(v, base) for v in value] if kind == "list" else _absolute(value, base)
    elif key == "registry" and "://" not in value:
        value = _absolute(value, base)
    return value


def _isChainEntry(value: Any) -> bool:
    """
    @return: Whether C{value} is a relay entry with a path: C{{relay = "C", via = ["A", ...]}}.
    """
    return (
        isinstance(value, dict)
        and set(value) <= {"relay", "via"}
        and isinstance(value.get("relay"), str)
        and isinstance(value.get("via", []), list)
        and all(isinstance(v, str) for v in value.get("via", []))
    )


def _absolute(value: str, base: str) -> str:
    """
    @return: C{value} with C{~} expanded, relative to C{base}.
    """
    return os.path.join(base, os.path.expanduser(value))


def _listed(names: Sequence[str]) -> str:
    """
    @return: The names for a message.
    """
    return ", ".join(names) if names else "none"


def tunnelArguments(values: Mapping[str, Any]) -> list[str]:
    """
    The C{portal expose} command line that says what C{values} say.

    @param values: Keys and values as L{TunnelEntry.values} holds them.
    @return: The arguments, the target (if any) last after C{--}.
    """
    kinds = optionKinds()
    arguments: list[str] = []
    for key, value in values.items():
        kind = kinds[key]
        if key == "target":
            continue
        if kind == "flag":
            if value:
                arguments.append(f"--{key}")
        elif key == "relay":
            for entry in value:
                if isinstance(entry, dict):
                    arguments.extend(f"--via={hop}" for hop in entry.get("via", []))
                    entry = entry["relay"]
                arguments.append(f"--relay={entry}")
        elif kind == "list":
            arguments.extend(f"--{key}={v}" for v in value)
        else:
            arguments.append(f"--{key}={value}")
    if values.get("target") is not None:
        arguments.extend(["--", str(values["target"])])
    return arguments


_BARE = r"[A-Za-z0-9_-]+"
_QUOTED = r'"(?:[^"\\]|\\.)*"|\'[^\']*\''
_KEY = rf"(?:{_BARE}|{_QUOTED})"
_DOTTED = rf"{_KEY}(?:\s*\.\s*{_KEY})*"
_HEADER = re.compile(rf"^\s*\[\[?\s*({_DOTTED})\s*\]\]?\s*(?:#.*)?$")
_ASSIGNMENT = re.compile(rf"^\s*({_DOTTED})\s*=")
_PART = re.compile(_KEY)


def _parts(dotted: str) -> tuple[str, ...]:
    """
    @return: The keys of a dotted key, unquoted.
    """
    return tuple(p[1:-1] if p[:1] in ('"', "'") else p for p in _PART.findall(dotted) if p.strip())


def keyLines(text: str) -> dict[tuple[str, ...], int]:
    """
    Where each key and table of a TOML document is, for error messages (C{tomllib} keeps no
    positions).

    @param text: A document C{tomllib} has accepted.
    @return: For each table and key, as its dotted path, its first line (1-based).
    """
    found: dict[tuple[str, ...], int] = {}
    table: tuple[str, ...] = ()
    inString: str | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        if inString is not None:
            if line.count(inString) % 2:
                inString = None
            continue
        header = _HEADER.match(line)
        if header:
            table = _parts(header.group(1))
            found.setdefault(table, number)
            continue
        assignment = _ASSIGNMENT.match(line)
        if assignment:
            found.setdefault(table + _parts(assignment.group(1)), number)
        for quotes in ('"""', "'''"):
            if line.count(quotes) % 2:
                inString = quotes
                break
    return found
