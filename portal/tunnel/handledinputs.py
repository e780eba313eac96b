"""
Typed automat machines whose states ignore every input they have no transition for.

The tunnel's lifecycles (L{portal.tunnel.link.linkMachine},
L{portal.tunnel.acme.lifecycle.certificateMachine}) treat an input a state has no transition for as
late or repeated news that changes nothing, so that no input ever raises. L{HandledInputs} records,
while a machine is described, which inputs each state handles, then gives every other one a loop
that does nothing, and every state the answer to the machine's C{state} query.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class HandledInputs:
    """
    The (state, input) pairs of a machine being built that have a transition.
    """

    def __init__(self, states: Mapping[str, Any]) -> None:
        """
        @param states: The machine's states (C{TypeMachineBuilder.state}), by name.
        """
        self._states = dict(states)
        self._names = {id(state): name for name, state in states.items()}
        self._handled: set[tuple[str, str]] = set()

    def on(self, state: Any, *inputs: str) -> None:
        """
        Record that C{state} has a transition for each of C{inputs}.

        @param state: One of the machine's states.
        @param inputs: Input names (the input protocol's method names).
        """
        for input in inputs:
            self._handled.add((self._names[id(state)], input))

    def ignoreTheRest(self, protocol: type) -> None:
        """
        Make the input protocol's C{state} query return each state's name, and each of its other
        inputs a loop that does nothing in every state that has no transition for it.

        @param protocol: The machine's input protocol; its inputs other than C{state} return
            nothing.
        """
        inputs = [
            value
            for name, value in vars(protocol).items()
            if callable(value) and not name.startswith("_") and name != "state"
        ]
        for name, state in self._states.items():
            state.upon(vars(protocol)["state"]).loop().returns(name)
            for input in inputs:
                if (name, input.__name__) not in self._handled:
                    state.upon(input).loop().returns(None)
