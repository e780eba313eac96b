"""
Command-line options that may come before or after the positional arguments (C{portal expose 3000
--relay R}, C{portal peers add ID --name N}), as users of other tunnel tools expect; Twisted's
parser alone stops at the first positional argument.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from portal.cli.helptext import TidyHelp


class FlagsAnywhere(TidyHelp):
    """
    Options (with tidy help, L{TidyHelp}) that move the flags (and their values) before the positional arguments, then
    parse as usual. C{--} still ends the flags.
    """

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        """
        @param options: The arguments (default C{sys.argv[1:]}).
        """
        if options is None:
            options = sys.argv[1:]
        flags: list[str] = []
        positional: list[str] = []
        arguments = iter(options)
        for argument in arguments:
            if argument == "--":
                positional.extend(arguments)
                break
            if argument.startswith("-") and argument != "-":
                flags.append(argument)
                if "=" not in argument and self._takesValue(argument):
                    value = next(arguments, None)
                    if value is not None:
                        flags.append(value)
            else:
                positional.append(argument)
        super().parseOptions(flags + ["--"] + positional)

    def _takesValue(self, flag: str) -> bool:
        """
        @return: Whether C{flag} (possibly an unambiguous abbreviation) needs a value.
        """
        if flag.startswith("--"):
            matches = [o for o in self.longOpt if o.rstrip("=") == flag[2:]] or [
                o for o in self.longOpt if o.startswith(flag[2:])
            ]
            return len(matches) == 1 and matches[0].endswith("=")
        return len(flag) == 2 and f"{flag[1]}:" in self.shortOpt
