"""
Live status of the tunnels on a terminal (C{rich}), like ngrok's console: per relay its public URL,
state, and the requests, their rate, the connections and the errors so far, redrawn in place twice a
second, with the usual lines (requests, state changes) printed above it. Only on a terminal and
without C{--json}: otherwise the plain lines are all there is.

The reactor drives the redrawing (a L{LoopingCall}); C{rich}'s own refresh thread is not used.
"""

from __future__ import annotations

from collections import deque
from typing import Any, TextIO, cast

from rich.console import Console
from rich.live import Live
from rich.table import Table
from twisted.internet.task import LoopingCall

#: Seconds between two redraws.
REFRESH = 0.5
#: Seconds over which the request rate is computed.
RATE_WINDOW = 10.0


class _Relay:
    """
    What the status shows of one relay.
    """

    def __init__(self) -> None:
        self.urls: list[str] = []
        self.state = "connecting"
        self.requests = 0
        self.connections = 0
        self.errors = 0
        self.recent: deque[float] = deque()


class LiveStatus:
    """
    Follows a tunnel's reported events (L{portal.tunnel.report.Reporter} listener) and draws them.

    @ivar relays: The state per (tunnel name, relay address), in the order first seen.
    """

    #: Events after which a relay serves, and the state they mean otherwise.
    STATES = {
        "lease": "live",
        "disconnected": "reconnecting",
        "unreachable": "unreachable",
        "retrying": "retrying",
        "dead-path": "reconnecting",
        "relay-leaving": "relay leaving",
        "fatal": "stopped",
        "unreached": "unreachable",
    }

    def __init__(self, clock: Any, console: Console) -> None:
        """
        @param clock: The source of the current time (and of the redraw's calls).
        @param console: Where to draw.
        """
        self._clock = clock
        self._console = console
        self.relays: dict[tuple[str, str], _Relay] = {}
        self._live: Live | None = None
        self._loop = LoopingCall(self.redraw)
        self._loop.clock = clock

    def lineWriter(self) -> TextIO:
        """
        @return: A text stream whose lines are printed above the status (for the reporter).
        """
        return cast(TextIO, _AboveStatus(self._console))

    def listenerFor(self, tunnel: str) -> Any:
        """
        @param tunnel: The tunnel's name (C{portal start}), or C{""}.
        @return: A reporter listener feeding that tunnel's events to L{event}.
        """
        return lambda event: self.event(tunnel, event)

    def event(self, tunnel: str, event: dict[str, Any]) -> None:
        """
        Take one reported event of C{tunnel} into account.
        """
        kind = event["event"]
        relay = event.get("relay") or ""
        if kind in ("request", "connection"):
            # These name no relay: the tunnel's counts are shown on each of its rows.
            rows = [s for (t, _), s in self.relays.items() if t == tunnel]
            for state in rows or [self._relay(tunnel, "")]:
                if kind == "connection":
                    state.connections += 1
                else:
                    self._count(state, event)
            return
        if kind in self.STATES and relay:
            state = self._relay(tunnel, relay)
            state.state = self.STATES[kind]
            if kind == "lease" and event["url"] not in state.urls:
                state.urls.append(event["url"])
            if kind in ("unreachable", "fatal"):
                state.errors += 1

    def _relay(self, tunnel: str, address: str) -> _Relay:
        """
        @return: The state of C{tunnel}'s relay at C{address}, made on first use.
        """
        return self.relays.setdefault((tunnel, address), _Relay())

    def _count(self, state: _Relay, event: dict[str, Any]) -> None:
        """
        Count a request on C{state}.
        """
        state.requests += 1
        state.recent.append(self._clock.seconds())
        if event.get("status", 0) >= 500:
            state.errors += 1

    def table(self) -> Table:
        """
        @return: The status as a table, one row per relay.
        """
        now = self._clock.seconds()
        named = any(tunnel for tunnel, _ in self.relays)
        table = Table(title="portal", expand=True)
        columns = ["relay", "url", "state", "requests", "req/s", "connections", "errors"]
        for column in ["tunnel", *columns] if named else columns:
            table.add_column(column, no_wrap=column != "url")
        for (tunnel, address), state in self.relays.items():
            while state.recent and state.recent[0] <= now - RATE_WINDOW:
                state.recent.popleft()
            table.add_row(
                *([tunnel] if named else []),
                address or "-",
                "\n".join(state.urls) or "-",
                state.state,
                str(state.requests),
                f"{len(state.recent) / RATE_WINDOW:.1f}",
                str(state.connections),
                str(state.errors),
            )
        return table

    def start(self) -> None:
        """
        Start drawing in place.
        """
        self._live = Live(self.table(), console=self._console, auto_refresh=False, transient=False)
        self._live.start()
        self._loop.start(REFRESH)

    def redraw(self) -> None:
        """
        Draw the current status.
        """
        if self._live is not None:
            self._live.update(self.table(), refresh=True)

    def stop(self) -> None:
        """
        Stop drawing; the last status stays on the terminal.
        """
        if self._loop.running:
            self._loop.stop()
        if self._live is not None:
            self.redraw()
            self._live.stop()
            self._live = None


class _AboveStatus:
    """
    A minimal text stream for the reporter: each complete line is printed above the live status.
    """

    def __init__(self, console: Console) -> None:
        self._console = console
        self._partial = ""

    def write(self, text: str) -> int:
        """
        Print the complete lines of C{text}; keep the rest for the next write.
        """
        *lines, self._partial = (self._partial + text).split("\n")
        for line in lines:
            self._console.print(line, markup=False, highlight=False, soft_wrap=True)
        return len(text)

    def flush(self) -> None:
        """
        Nothing is buffered but a partial line.
        """

    def isatty(self) -> bool:
        """
        @return: The console's answer.
        """
        return self._console.is_terminal
