"""
Tests for L{portal.tunnel.handledinputs}.
"""

from __future__ import annotations

from typing import Protocol

from automat import TypeMachine, TypeMachineBuilder
from twisted.trial.unittest import SynchronousTestCase

from portal.tunnel.handledinputs import HandledInputs


class _Switch(Protocol):
    """
    The inputs of a two-state switch.
    """

    def on(self) -> None:
        """
        Switch on.
        """

    def off(self) -> None:
        """
        Switch off.
        """

    def state(self) -> str:
        """
        @return: The state's name.
        """


class _Core:
    """
    Counts the switch's transitions.
    """

    flips = 0


def _switch() -> TypeMachine[_Switch, _Core]:
    """
    @return: A switch machine whose only transitions are off -> on -> off.
    """
    builder = TypeMachineBuilder(_Switch, _Core)
    states = {"off": builder.state("off"), "on": builder.state("on")}
    handled = HandledInputs(states)

    @states["off"].upon(_Switch.on).to(states["on"])
    @states["on"].upon(_Switch.off).to(states["off"])
    def flip(inputs: _Switch, core: _Core) -> None:
        core.flips += 1

    handled.on(states["off"], "on")
    handled.on(states["on"], "off")
    handled.ignoreTheRest(_Switch)
    return builder.build()


class HandledInputsTests(SynchronousTestCase):
    """
    L{HandledInputs} makes every unhandled input a loop that does nothing.
    """

    def test_unhandledIgnored(self) -> None:
        """
        Switching off what is off, or on what is on, raises nothing and changes nothing; the
        handled inputs still switch, and the query names the state.
        """
        core = _Core()
        switch = _switch()(core)
        switch.off()
        self.assertEqual((switch.state(), core.flips), ("off", 0))
        switch.on()
        switch.on()
        self.assertEqual((switch.state(), core.flips), ("on", 1))
        switch.off()
        self.assertEqual((switch.state(), core.flips), ("off", 2))
