"""
Options of C{portal start [NAME...] | --all [--config PATH]} and of C{twistd portal-tunnel --config
PATH}: tunnels named in a C{portal.toml} (L{portal.cli.configfile}), each built by the parser of
C{portal expose}, with any option of C{portal expose} given on the command line overriding the file.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.python import usage

from portal.cli.configfile import (
    REPEATED,
    ConfigFileError,
    TunnelEntry,
    findConfig,
    loadConfig,
    optionKinds,
    searchPath,
    tunnelArguments,
)
from portal.cli.exposeoptions import TunnelOptions
from portal.tunnel.config import TunnelConfig

#: Where a value given on the command line comes from, in L{StartOptions}' bookkeeping.
COMMAND_LINE = "the command line"


class StartOptions(TunnelOptions):
    """
    C{[NAME...] | --all [--config PATH] [options of portal expose]}.

    @ivar tunnelConfigs: After L{postOptions}, each started tunnel's configuration by name, in the
        file's order.
    @ivar configPath: The file read, or L{None}.
    """

    synopsis = "[NAME...] | --all [--config PATH] [options of portal expose, overriding the file]"
    longdesc = (
        "Start tunnels described in a portal.toml: the NAMEs given, every one with --all, or the only "
        "one. Without --config the file is the first of $PORTAL_CONFIG, ./portal.toml and "
        "~/.config/portal/portal.toml. Options of portal expose given here override the file's for "
        "every started tunnel. The file's format is in docs/config-file.md."
    )
    optFlags = [["all", None, "Start every tunnel of the file."]]
    optParameters = [["config", None, None, "The configuration file (portal.toml)."]]

    #: Without C{--config}, take one TARGET as C{portal expose} does instead of searching for a file
    #: (C{twistd portal-tunnel}).
    targetWithoutConfig = False

    tunnelConfigs: dict[str, TunnelConfig]
    configPath: str | None = None

    def __init__(self) -> None:
        super().__init__()
        # None marks "not given here", so that only what the user typed overrides the file.
        for key, kind in optionKinds(TunnelOptions).items():
            if kind != "list" and key != "target":
                self[key] = None
        self["names"] = ()

    def parseArgs(self, *names: str) -> None:  # type: ignore[override]
        """
        @param names: The tunnels to start (or, with L{targetWithoutConfig} and no C{--config}, the
            TARGET).
        """
        self["names"] = names

    def givenValues(self) -> dict[str, Any]:
        """
        @return: The options of C{portal expose} given on the command line, as configuration keys.
        """
        values: dict[str, Any] = {}
        for key, kind in optionKinds(TunnelOptions).items():
            if kind == "list" or key == "target" or self[key] is None:
                continue
            values[key] = bool(self[key]) if kind == "flag" else self[key]
        if self["relays"]:
            values["relay"] = [
                {"relay": relay, "via": list(via)}
                for relay, via in zip(self["relays"], self["via"], strict=True)
            ]
        for key, option in REPEATED.items():
            if key != "relay" and self[option]:
                values[key] = list(self[option])
        return values

    def postOptions(self) -> None:
        """
        Find and read the file, pick the tunnels, and build each one's configuration.
        """
        self.refuseDanglingVia()
        if self["config"] is None and self.targetWithoutConfig:
            if len(self["names"]) > 1:
                raise usage.UsageError(f"expected one TARGET, got {' '.join(self['names'])}")
            values = self.givenValues()
            if self["names"]:
                values["target"] = self["names"][0]
            self.tunnelConfigs = {"": _build(values)}
            self.tunnelConfig = self.tunnelConfigs[""]
            return
        path = self["config"] or findConfig()
        if path is None:
            raise usage.UsageError(
                "no configuration file: give --config PATH or create one of "
                + ", ".join(searchPath())
            )
        self.configPath = path
        try:
            config = loadConfig(path)
            if self["all"] and self["names"]:
                raise usage.UsageError("give tunnel names or --all, not both")
            if self["all"] or (not self["names"] and len(config.tunnels) == 1):
                entries = list(config.tunnels)
            elif not self["names"]:
                raise usage.UsageError(
                    f"name the tunnels to start, or --all; {path} has {', '.join(config.names)}"
                )
            else:
                entries = [config.tunnel(name) for name in dict.fromkeys(self["names"])]
            given = self.givenValues()
            self.tunnelConfigs = {
                entry.name: self._buildEntry(path, entry, given) for entry in entries
            }
        except ConfigFileError as e:
            raise usage.UsageError(str(e))
        self.tunnelConfig = next(iter(self.tunnelConfigs.values()))

    def _buildEntry(self, path: str, entry: TunnelEntry, given: dict[str, Any]) -> TunnelConfig:
        """
        Build one tunnel: the file's values, overridden by C{given}.

        @raise ConfigFileError: When C{portal expose} would refuse the result; the message names
            the key at fault and its line.
        """
        values = {**entry.values, **given}
        try:
            return _build(values)
        except usage.UsageError as e:
            message = str(e)
            key = _blamedKey(message, values)
            if key is None:
                raise ConfigFileError(path, entry.line, f"tunnels.{entry.name}", message)
            if key in given:
                raise usage.UsageError(f"tunnel {entry.name}: {message} (from {COMMAND_LINE})")
            where, line = entry.lines[key]
            raise ConfigFileError(path, line, where, message)


def _build(values: dict[str, Any]) -> TunnelConfig:
    """
    Build a configuration with the parser of C{portal expose}.

    @raise usage.UsageError: When it refuses.
    """
    options = TunnelOptions()
    options.parseOptions(tunnelArguments(values))
    return options.tunnelConfig


def _blamedKey(message: str, values: dict[str, Any]) -> str | None:
    """
    @return: The key an error message of C{portal expose} is about: the first option it names that
        was given, or C{target} for TARGET.
    """
    for flag in re.findall(r"--([a-z][a-z0-9-]*)", message):
        key = "relay" if flag == "via" else flag
        if key in values:
            return key
    if "TARGET" in message and "target" in values:
        return "target"
    return None
