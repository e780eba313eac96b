"""
Tests for the lifecycles written as automat machines: the relay's control session
(L{portal.relay.control.controlMachine}) and data session (L{portal.relay.data.sessionMachine}), and
the tunnel's relay link (L{portal.tunnel.link.linkMachine}), driven on a clock; and their state tables
(the ACME certificate's machine, L{portal.tunnel.acme.lifecycle.certificateMachine}, too: it is
driven in C{tests/test_acmecertificates.py})
in C{docs/lifecycles.md}, which must match the machines.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from portal.relay.control import RelayControlProtocol, controlMachine
from portal.relay.data import RelayDataSession, sessionMachine
from portal.trust.relayhello import FatalRelayError, helloArguments
from portal.tunnel.acme.lifecycle import certificateMachine
from portal.tunnel.backoff import STABLE_AFTER
from portal.tunnel.config import buildConfig
from portal.tunnel.control import TunnelControlProtocol
from portal.tunnel.link import linkMachine
from portal.tunnel.report import Reporter
from portal.tunnel.service import TunnelService
from portal.wire.attach import attachProof
from portal.wire.control import Hello, HopUnreachable
from tests.test_relay_hop import HopTestCase
from tests.test_relay_public import _KEY, RelayHarness, clientHello

#: The machines documented in docs/lifecycles.md, with their states in reading order.
MACHINES: dict[str, tuple[Any, list[str]]] = {
    "control session": (controlMachine, ["greeting", "open", "hopping", "hopped", "closed"]),
    "data session": (sessionMachine, ["attaching", "idle", "paired", "closed"]),
    "relay link": (
        linkMachine,
        ["stopped", "connecting", "hello", "registering", "live", "draining", "backingOff"],
    ),
    "acme certificate": (
        certificateMachine,
        [
            "idle",
            "ordering",
            "waitingRetry",
            "serving",
            "renewing",
            "servingRetry",
            "stopped",
        ],
    ),
}

DOCS = Path(__file__).parent.parent / "docs" / "lifecycles.md"
#: Where the machines' Graphviz sources (and the pictures drawn from them) are kept.
DIAGRAMS = Path(__file__).parent.parent / "docs" / "lifecycles"


def transitions(machine: Any, order: list[str]) -> list[tuple[str, str, str, str]]:
    """
    A machine's transitions that matter to a reader: every input that changes the state or has an
    output; inputs a state ignores and the C{state} query are left out.

    @param machine: A built L{automat.TypeMachine}.
    @param order: The state names in reading order.
    @return: (state, input, next state, outputs) by state in C{order}, then by input.
    """
    rows = []
    for old, input, new, outputs in machine.__automat_automaton__.allTransitions():
        names = [o.name for o in outputs if not o.name.startswith("returns(")]
        if input == "state" or (old is new and not names):
            continue
        rows.append((order.index(old.name), input, new.name, ", ".join(names)))
    return [(order[index], input, new, outputs) for index, input, new, outputs in sorted(rows)]


def stateTable(machine: Any, order: list[str]) -> str:
    """
    A Markdown table of L{transitions}.

    @return: The table's lines.
    """
    lines = ["| State | Input | Next state | Outputs |", "|---|---|---|---|"]
    for old, input, new, outputs in transitions(machine, order):
        lines.append(f"| `{old}` | `{input}` | `{new}` | {outputs or '-'} |")
    return "\n".join(lines)


def stateGraph(machine: Any, order: list[str], title: str) -> str:
    """
    A Graphviz picture of L{transitions}: states as ellipses (the first one bold), one arrow per
    transition labelled with its input and outputs.

    @param title: The machine's name, for the graph's label.
    @return: The graph's C{dot} source.
    """
    lines = [
        f'digraph "{title}" {{',
        f'  label="{title}"; labelloc=t; rankdir=LR; fontname=Helvetica;',
        "  node [shape=ellipse, fontname=Helvetica];",
        "  edge [fontname=Helvetica, fontsize=10];",
    ]
    for index, state in enumerate(order):
        style = ", style=bold" if index == 0 else ""
        lines.append(f'  "{state}" [label="{state}"{style}];')
    for old, input, new, outputs in transitions(machine, order):
        label = f"{input}\\n({outputs})" if outputs else input
        lines.append(f'  "{old}" -> "{new}" [label="{label}"];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def diagramPath(name: str) -> Path:
    """
    @return: Where the C{dot} source of the machine called C{name} is kept.
    """
    return DIAGRAMS / (name.replace(" ", "-") + ".dot")


def writeDiagrams() -> None:
    """
    Write each machine's C{dot} source to C{docs/lifecycles/}, and draw it as SVG when Graphviz's
    C{dot} is installed (C{python -m tests.test_lifecycles}).
    """
    DIAGRAMS.mkdir(exist_ok=True)
    for name, (machine, order) in MACHINES.items():
        path = diagramPath(name)
        path.write_text(stateGraph(machine, order, name))
        if shutil.which("dot"):
            subprocess.run(
                ["dot", "-Tsvg", "-o", str(path.with_suffix(".svg")), str(path)], check=True
            )


class DocumentedTests(SynchronousTestCase):
    """
    C{docs/lifecycles.md} shows each machine as it is built.
    """

    def test_tablesMatch(self) -> None:
        """
        Each machine's state table appears verbatim in C{docs/lifecycles.md}, and names every state.
        """
        text = DOCS.read_text()
        for name, (machine, order) in MACHINES.items():
            table = stateTable(machine, order)
            self.assertIn(table, text, f"{name}: docs/lifecycles.md should hold\n{table}")
            states = {state.name for state in machine.__automat_automaton__.states()}
            self.assertEqual(states, set(order))

    def test_diagramsMatch(self) -> None:
        """
        Each machine's Graphviz source in C{docs/lifecycles/} is the one drawn from the machine as
        it is built, and has its picture beside it (regenerate both with
        C{python -m tests.test_lifecycles}).
        """
        for name, (machine, order) in MACHINES.items():
            path = diagramPath(name)
            self.assertEqual(path.read_text(), stateGraph(machine, order, name), name)
            self.assertTrue(path.with_suffix(".svg").exists(), name)


class ControlSessionLifecycleTests(HopTestCase):
    """
    A relay control session goes C{greeting} -> C{open} -> C{closed}, or through C{hopping} and
    C{hopped} when it carries a hop.
    """

    def test_helloThenClosed(self) -> None:
        """
        A session is C{greeting} until L{Hello}, C{open} after it, and C{closed} once its
        connection is lost; the hello timer no longer fires after Hello.
        """
        connection = self.connect(amp.AMP)
        relay: RelayControlProtocol = connection.relay
        self.assertEqual(relay.lifecycle, "greeting")
        self.call(connection, connection.tunnel, Hello, **helloArguments())
        self.assertEqual(relay.lifecycle, "open")
        self.clock.advance(self.router.limits.helloTimeout)
        self.assertFalse(connection.relayTransport.disconnecting)
        connection.drop()
        self.assertEqual(relay.lifecycle, "closed")

    def test_helloTimeout(self) -> None:
        """
        A session that says nothing for C{helloTimeout} on the clock is closed.
        """
        connection = self.connect(amp.AMP)
        relay: RelayControlProtocol = connection.relay
        self.clock.advance(self.router.limits.helloTimeout - 0.1)
        self.assertEqual(relay.lifecycle, "greeting")
        self.clock.advance(0.1)
        connection.flush()
        self.assertEqual(relay.lifecycle, "closed")

    def test_hopped(self) -> None:
        """
        A hop request makes the session C{hopping}; the destination accepting makes it C{hopped},
        and its pool is gone.
        """
        connection, client = self.client()
        relay: RelayControlProtocol = connection.relay
        self.askHop(connection, client)
        self.assertEqual(relay.lifecycle, "hopping")
        self.outbound.succeed()
        connection.flush()
        self.assertEqual(relay.lifecycle, "hopped")
        self.assertNotIn(relay.sessionId, self.router.sessions)

    def test_hopFailedReopens(self) -> None:
        """
        A hop whose destination refuses leaves the session C{open}, as it was.
        """
        connection, client = self.client()
        relay: RelayControlProtocol = connection.relay
        d, _, _ = self.askHop(connection, client)
        self.outbound.attempts[0][3].errback(ConnectionRefusedError("refused"))
        connection.flush()
        self.assertFailed(d, HopUnreachable, "cannot connect")
        self.assertEqual(relay.lifecycle, "open")

    def test_lostWhileHopping(self) -> None:
        """
        A session lost while its hop connects is C{closed} and the attempt is cancelled.
        """
        connection, client = self.client()
        relay: RelayControlProtocol = connection.relay
        self.askHop(connection, client)
        connection.drop()
        self.assertEqual(relay.lifecycle, "closed")
        self.assertEqual(len(self.outbound.cancelled), 1)
        self.flushLoggedErrors()


class DataSessionLifecycleTests(RelayHarness):
    """
    A relay data session goes C{attaching} -> C{idle} -> C{paired} -> C{closed}.
    """

    def test_attachIdlePairedClosed(self) -> None:
        """
        A session attaches (idle in the pool), is paired with a visitor (with its stream id), and
        is closed when its connection ends.
        """
        dispatch, transport = self.dataConnection()
        session = dispatch.chosen
        assert isinstance(session, RelayDataSession)
        self.assertEqual(session.lifecycle, "attaching")
        dispatch.dataReceived(attachProof(_KEY, session.nonce, self.sessionId))
        self.assertEqual(session.lifecycle, "idle")
        self.assertEqual(len(self.pool), 1)
        visitor, _ = self.visitor()
        visitor.dataReceived(clientHello("app.localhost"))
        self.assertEqual(session.lifecycle, "paired")
        self.assertEqual(session.streamId, 1)
        transport.loseConnection()
        self.assertEqual(session.lifecycle, "closed")

    def test_attachWhileVisitorWaits(self) -> None:
        """
        A session that attaches while a visitor waits goes through C{idle} straight to C{paired},
        and carries the visitor's stream id at once: in raw TCP mode the pool seals the stream under
        it right away, before the machine has finished the attach.
        """
        self.pool.sealSecret = b"r" * 32
        visitor, _ = self.visitor()
        visitor.dataReceived(clientHello("app.localhost"))
        self.assertEqual(self.pool.waiting, 1)
        dispatch, _ = self.dataConnection()
        session = dispatch.chosen
        assert isinstance(session, RelayDataSession)
        dispatch.dataReceived(attachProof(_KEY, session.nonce, self.sessionId))
        self.assertEqual(session.lifecycle, "paired")
        self.assertEqual(session.streamId, 1)
        assert session._sealed is not None
        self.assertEqual(session._sealed.streamId, 1)
        self.assertEqual(self.pool.waiting, 0)

    def test_attachTimeout(self) -> None:
        """
        A session that does not attach within C{attachTimeout} on the clock is closed, and a timer
        firing late changes nothing.
        """
        dispatch, transport = self.dataConnection()
        session = dispatch.chosen
        assert isinstance(session, RelayDataSession)
        self.clock.advance(self.limits.attachTimeout - 0.1)
        self.assertEqual(session.lifecycle, "attaching")
        self.clock.advance(0.1)
        self.assertEqual(session.lifecycle, "closed")
        self.assertTrue(transport.disconnecting)
        session.timeoutConnection()
        self.assertEqual(session.lifecycle, "closed")

    def test_attachedHasNoTimer(self) -> None:
        """
        An idle session is not closed by the attach timer, however long it waits.
        """
        session, _, transport = self.attached()
        self.clock.advance(self.limits.attachTimeout * 10)
        self.assertEqual(session.lifecycle, "idle")
        self.assertFalse(transport.disconnecting)

    def test_dataWhileIdle(self) -> None:
        """
        An idle session that talks is closed and leaves the pool.
        """
        session, dispatch, _ = self.attached()
        dispatch.dataReceived(b"x")
        self.assertEqual(session.lifecycle, "closed")
        self.assertEqual(len(self.pool), 0)

    def test_badAttach(self) -> None:
        """
        A wrong attach proof closes the session from C{attaching}.
        """
        dispatch, transport = self.dataConnection()
        session = dispatch.chosen
        assert isinstance(session, RelayDataSession)
        dispatch.dataReceived(attachProof(b"w" * 32, session.nonce, self.sessionId))
        self.assertEqual(session.lifecycle, "closed")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(len(self.pool), 0)


class FakeProtocol:
    """
    Stands in for a registered control session that the link unregisters when it stops.

    @ivar unregistered: How many times the link asked it to unregister.
    """

    unregistered = 0

    def unregister(self) -> Deferred[None]:
        """
        End the leases: done at once.
        """
        self.unregistered += 1
        return succeed(None)


class RelayLinkLifecycleTests(SynchronousTestCase):
    """
    A tunnel's relay link goes C{stopped} -> C{connecting} -> C{hello} -> C{registering} -> C{live}
    -> C{draining} -> C{backingOff} -> ... -> C{stopped}, on a memory reactor's clock.
    """

    def setUp(self) -> None:
        """
        A stream-mode tunnel on a memory reactor, with one relay link.
        """
        self.reactor = MemoryReactorClock()
        self.output = io.StringIO()
        self.fatals: list[str] = []
        directory = os.path.abspath(self.mktemp())
        config = buildConfig("8000", identityPath=os.path.join(directory, "identity.json"))
        self.tunnel = TunnelService(
            config, self.reactor, Reporter(self.output, asJSON=True), self.fatals.append
        )
        [self.link] = self.tunnel.links

    def events(self, name: str) -> list[dict[str, Any]]:
        """
        @return: The reported events called C{name}.
        """
        return [e for e in self.link.reporter.events if e["event"] == name]

    def session(self) -> TunnelControlProtocol:
        """
        Start the link and make a connection, as the L{ClientService} would.

        @return: The new control session's protocol.
        """
        self.link.startService()
        self.addCleanup(self.link.stopService)
        return self.link._newSession()

    def test_fullCycle(self) -> None:
        """
        Each step of a session moves the link on: a connection starts C{hello}, the relay's Hello
        C{registering}, the registration C{live} (reported), the relay's goodbye C{draining}, and
        the end of the session C{backingOff} (reported); stopping ends in C{stopped}.
        """
        self.assertEqual(self.link.lifecycle, "stopped")
        self.link.startService()
        self.assertEqual(self.link.lifecycle, "connecting")
        protocol = self.link._newSession()
        self.assertEqual(self.link.lifecycle, "hello")
        protocol.onHello()
        self.assertEqual(self.link.lifecycle, "registering")
        self.link.registered(protocol, ["app.localhost"], 8443)
        self.assertEqual(self.link.lifecycle, "live")
        self.assertEqual([e["url"] for e in self.events("lease")], ["https://app.localhost:8443"])
        protocol.onGoingAway(30.0)
        self.assertEqual(self.link.lifecycle, "draining")
        self.link.controlLost(protocol)
        self.assertEqual(self.link.lifecycle, "backingOff")
        self.assertEqual(len(self.events("disconnected")), 1)
        self.assertIsNone(self.link.protocol)
        self.link.stopService()
        self.assertEqual(self.link.lifecycle, "stopped")

    def test_unreachableOncePerOutage(self) -> None:
        """
        Failed attempts move the link to C{backingOff} and are reported once until a session is
        live again; the next attempt is C{connecting}.
        """
        self.link.startService()
        self.addCleanup(self.link.stopService)
        for _ in range(3):
            self.link._unreachable(Failure(ConnectionRefusedError()))
            self.assertEqual(self.link.lifecycle, "backingOff")
        self.assertEqual(len(self.events("unreachable")), 1)
        self.link.controlEndpoint().connect(Factory.forProtocol(Protocol))
        self.assertEqual(self.link.lifecycle, "connecting")
        protocol = self.link._newSession()
        self.link.registered(protocol, ["app.localhost"], 8443)
        self.link.controlLost(protocol)
        self.link._unreachable(Failure(ConnectionRefusedError()))
        self.assertEqual(len(self.events("unreachable")), 2)

    def test_alternativeAddresses(self) -> None:
        """
        A relay given with several addresses (C{--relay A,B}): each failed attempt moves the next
        attempt to the next address, in turn (reported as C{alternative}); the data sessions go to
        the address the control session reached; an address that works is kept.
        """
        directory = os.path.abspath(self.mktemp())
        config = buildConfig(
            "8000",
            relays=["127.0.0.1:4001,127.0.0.1:4002"],
            identityPath=os.path.join(directory, "identity.json"),
        )
        tunnel = TunnelService(
            config, self.reactor, Reporter(io.StringIO(), asJSON=True), self.fatals.append
        )
        [link] = tunnel.links
        link.startService()
        self.addCleanup(link.stopService)
        tried = []
        for _ in range(3):
            link.controlEndpoint().connect(Factory.forProtocol(Protocol))
            tried.append(self.reactor.tcpClients[-1][1])
            link._unreachable(Failure(ConnectionRefusedError()))
        self.assertEqual(tried, [4001, 4002, 4001])
        alternatives = [e for e in link.reporter.events if e["event"] == "alternative"]
        self.assertEqual(
            [(e["relay"], e["next"]) for e in alternatives],
            [
                ("127.0.0.1:4001", "127.0.0.1:4002"),
                ("127.0.0.1:4002", "127.0.0.1:4001"),
                ("127.0.0.1:4001", "127.0.0.1:4002"),
            ],
        )
        link.controlEndpoint().connect(Factory.forProtocol(Protocol))
        self.assertEqual(self.reactor.tcpClients[-1][1], 4002)
        protocol = link._newSession()
        link.registered(protocol, ["app.localhost"], 8443)
        link.dataEndpoint().connect(Factory.forProtocol(Protocol))
        self.assertEqual(self.reactor.tcpClients[-1][1], 4002)
        link.controlLost(protocol)
        link.controlEndpoint().connect(Factory.forProtocol(Protocol))
        self.assertEqual(self.reactor.tcpClients[-1][1], 4002)
        # An error reconnecting cannot fix stops the tunnel; no other address is announced.
        link._unreachable(Failure(FatalRelayError("the hop refuses")))
        self.assertEqual(len(self.fatals), 1)
        self.assertEqual(len([e for e in link.reporter.events if e["event"] == "alternative"]), 3)

    def test_fatalAttempt(self) -> None:
        """
        An attempt that fails for good (a relay that is not who it should be) stops the tunnel.
        """
        self.link.startService()
        self.addCleanup(self.link.stopService)
        self.link._unreachable(Failure(FatalRelayError("the hop refuses")))
        self.assertEqual(len(self.fatals), 1)
        self.assertIn("the hop refuses", self.fatals[0])

    def test_stableSessionResetsBackoff(self) -> None:
        """
        A session that stays live for L{STABLE_AFTER} seconds on the clock resets the backoff; one
        that ends sooner counts as a failure.
        """
        protocol = self.session()
        self.link.registered(protocol, ["app.localhost"], 8443)
        self.reactor.advance(STABLE_AFTER / 2)
        self.link.controlLost(protocol)
        self.assertEqual(self.link.backoff.unstable, 1)
        protocol = self.link._newSession()
        self.link.registered(protocol, ["app.localhost"], 8443)
        self.assertEqual(len(self.events("reconnected")), 1)
        self.reactor.advance(STABLE_AFTER)
        self.link.controlLost(protocol)
        self.assertEqual(self.link.backoff.unstable, 0)

    def test_lostAfterStopIsQuiet(self) -> None:
        """
        A control session that closes after the link stopped is not reported as a lost relay, and
        the link stays C{stopped}.
        """
        self.session()
        protocol = FakeProtocol()
        self.link.registered(protocol, ["app.localhost"], 8443)  # type: ignore[arg-type]
        self.link.stopService()
        self.assertEqual(protocol.unregistered, 1)
        self.link.controlLost(protocol)  # type: ignore[arg-type]
        self.assertEqual(self.link.lifecycle, "stopped")
        self.assertEqual(self.events("disconnected"), [])


if __name__ == "__main__":
    writeDiagrams()
