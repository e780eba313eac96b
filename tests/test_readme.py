"""
The README's 30-second tour stays true: every command it shows exists, and every option it uses is in
that command's C{--help}.
"""

from __future__ import annotations

import os
import shlex
import sys
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from portal.cli.main import PortalOptions
from tests.realprocesses import _twistd

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def tourCommands() -> list[list[str]]:
    """
    @return: The command lines of the README's tour, without their comments, split as a shell would.
    """
    with open(README) as f:
        text = f.read()
    tour = text.split("## A 30-second tour", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    commands = []
    for line in tour.splitlines():
        # As in a shell, "#" starts a comment only at the start of a word (not in HOST:PORT#ID).
        tokens = shlex.split(line, comments=True)
        if tokens:
            commands.append(tokens)
    return commands


def helpCommand(tokens: list[str]) -> tuple[list[str], list[str]]:
    """
    @return: The command line that prints the help of the command in C{tokens}, and the options
        C{tokens} uses.
    """
    if tokens[0] == "twistd":
        plugin = next(t for t in tokens if t.startswith("portal-"))
        rest = tokens[tokens.index(plugin) + 1 :]
        argv = [_twistd(), plugin, "--help"]
    else:
        assert tokens[0] == "portal", tokens
        command, rest = tokens[1], tokens[2:]
        argv = [sys.executable, "-m", "portal", command]
        sub = {name: parser for name, _, parser, _ in PortalOptions.subCommands}[command]
        nested = [name for name, *_ in getattr(sub, "subCommands", [])]
        if rest and rest[0] in nested:
            argv.append(rest[0])
        argv.append("--help")
    return argv, [t.split("=", 1)[0] for t in rest if t.startswith("--")]


class TourTests(TestCase):
    """
    Each command of the tour, run with C{--help}.
    """

    timeout = 120

    def test_tourIsComplete(self) -> None:
        """
        The tour shows every command of C{portal}, both twistd plugins, and the raw modes with the
        relay options they need.
        """
        commands = tourCommands()
        shown = {tokens[1] for tokens in commands if tokens[0] == "portal"}
        self.assertEqual(shown, {name for name, *_ in PortalOptions.subCommands})
        flat = [" ".join(tokens) for tokens in commands]
        for needed in (
            "portal-relay",
            "portal-tunnel",
            "--tcp-ports",
            "--udp-ports",
            " --tcp",
            " --udp",
        ):
            self.assertTrue(any(needed in line for line in flat), needed)

    @inlineCallbacks
    def test_everyCommandHelps(self) -> Any:
        """
        Every command of the tour prints its help and exits 0, and the help names every option the
        tour gives it.
        """
        for tokens in tourCommands():
            argv, options = helpCommand(tokens)
            out, err, code = yield getProcessOutputAndValue(argv[0], argv[1:], env=os.environ)
            self.assertEqual(code, 0, (tokens, err))
            for option in options:
                self.assertIn(option, out.decode(), tokens)
