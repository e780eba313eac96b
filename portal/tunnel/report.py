"""
What the tunnel tells its user: C{Forwarding} lines, or one JSON object per event with C{--json}.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TextIO

#: Events kept in L{Reporter.events}.
MAX_EVENTS = 1000
#: C{json.dumps(event, sort_keys=True)} without building an encoder for every event.
_encodeSorted = json.JSONEncoder(sort_keys=True).encode


class Reporter:
    """
    Writes user-facing events to a text stream.

    @ivar events: The last L{MAX_EVENTS} events reported, newest last (for tests and status).
    @ivar leasedRelays: The relays that have given a lease at least once.
    @ivar listeners: Called with every event as it is reported (the live status on a terminal).
    """

    #: Events that go to the error stream in text mode.
    ERRORS = frozenset(
        {
            "fatal",
            "error",
            "unreachable",
            "retrying",
            "skipped",
            "dropped",
            "degraded",
            "target-down",
            "unreached",
            "warning",
            "acme-failed",
        }
    )

    def __init__(
        self,
        out: TextIO,
        asJSON: bool = False,
        err: TextIO | None = None,
        clock: Any = None,
        timestamps: bool = False,
    ) -> None:
        """
        @param out: Where events go.
        @param asJSON: One JSON object per line instead of text.
        @param err: Where errors go in text mode (default C{out}).
        @param clock: With a clock, output is flushed once per reactor turn rather than per line (a
            busy routed-HTTP tunnel logs every request), and every JSON event has its C{time}
            (ISO 8601, UTC, milliseconds).
        @param timestamps: With a clock, start every text line with the local time (C{HH:MM:SS}).
        """
        self._timestamps = timestamps and clock is not None
        self._out = out
        self._err = err or out
        self._json = asJSON
        self._clock = clock
        self._flushing: Any = None
        self._pendingLines: list[str] = []
        #: The whole second whose time texts are kept, and those texts (UTC ISO 8601, local).
        self._second: int | None = None
        self._isoSecond = ""
        self._localSecond = ""
        self.events: deque[dict[str, Any]] = deque(maxlen=MAX_EVENTS)
        self.leasedRelays: set[str] = set()
        self.listeners: list[Callable[[dict[str, Any]], None]] = []

    def _emit(self, event: dict[str, Any], text: str) -> None:
        """
        Record an event and print it.
        """
        if self._clock is not None:
            second, micros = divmod(round(self._clock.seconds() * 1_000_000), 1_000_000)
            if second != self._second:
                # A busy tunnel reports many events a second: the time's text is made once per
                # second.
                self._second = second
                self._isoSecond = datetime.fromtimestamp(second, UTC).isoformat()[:19]
                self._localSecond = time.strftime("%H:%M:%S ", time.localtime(second))
            event["time"] = f"{self._isoSecond}.{micros // 1000:03d}+00:00"
            if self._timestamps:
                text = self._localSecond + text
        self.events.append(event)
        for listener in self.listeners:
            listener(event)
        if self._json:
            stream, line = self._out, _encodeSorted(event)
        else:
            stream = self._err if event["event"] in self.ERRORS else self._out
            line = text
        if self._clock is not None and event["event"] in ("request", "connection"):
            # A busy tunnel logs every request or connection: one write per reactor turn, not per
            # line.
            self._pendingLines.append(line + "\n")
            if self._flushing is None:
                self._flushing = self._clock.callLater(0, self._flush)
            return
        # State changes (a fatal error just before the reactor stops, above all) go out at once,
        # after the request lines before them.
        self._writePending()
        stream.write(line + "\n")
        stream.flush()

    def _flush(self) -> None:
        """
        Write the request lines collected during this reactor turn.
        """
        self._flushing = None
        self._writePending()

    def _writePending(self) -> None:
        """
        Write and flush collected request lines.
        """
        if self._pendingLines:
            data, self._pendingLines = "".join(self._pendingLines), []
            self._out.write(data)
            self._out.flush()

    def lease(
        self,
        url: str,
        relay: str,
        target: str,
        caPath: str | None,
        certificate: str | None = None,
        acme: str | None = None,
    ) -> None:
        """
        A lease is live: visitors can use C{url}.

        @param url: The public URL.
        @param relay: The relay's address.
        @param target: The local target.
        @param caPath: The local CA file visitors can trust, when the local CA is used.
        @param certificate: Which certificate C{url} presents: C{"acme"}, C{"local-ca"} or
            C{"file"} (C{--cert}); L{None} where no TLS ends in the tunnel.
        @param acme: With C{--acme}, the ACME directory.
        """
        self.leasedRelays.add(relay)
        text = f"Forwarding {url} -> {target}"
        if certificate == "acme":
            text += f"\n  (certificate from the ACME CA {acme})"
        elif caPath:
            text += (
                f"\n  (certificate from the local CA {caPath}; try: curl --cacert {caPath} {url}/)"
            )
            if acme:
                text += f"\n  (until the ACME CA {acme} issues one)"
        event = {"event": "lease", "url": url, "relay": relay, "target": target, "ca": caPath}
        if certificate is not None:
            event["certificate"] = certificate
        self._emit(event, text)

    def request(
        self,
        method: str,
        path: str,
        status: int,
        bytes: int,
        ms: float,
        route: str | None,
        upstream: str | None,
        client: str | None = None,
    ) -> None:
        """
        One proxied request finished (routed HTTP mode), like ngrok's console.

        @param method: The request method.
        @param path: The request target as the visitor sent it.
        @param status: The response status sent to the visitor.
        @param bytes: Response body bytes sent.
        @param ms: Milliseconds from the request's first byte to its last response byte.
        @param route: The route prefix, or L{None} when no route matched.
        @param upstream: The route's target.
        @param client: The visitor's address, as the relay reported it.
        """
        where = f"{route} -> {upstream}" if route else "no route"
        self._emit(
            {
                "event": "request",
                "client": client,
                "method": method,
                "path": path,
                "status": status,
                "bytes": bytes,
                "ms": round(ms, 2),
                "route": route,
                "upstream": upstream,
            },
            f"{client + ' ' if client else ''}{method} {path} {status} {bytes} B {ms:.1f} ms "
            f"[{where}]",
        )

    def connection(
        self, client: str, target: str, bytesIn: int, bytesOut: int, seconds: float
    ) -> None:
        """
        One visitor connection ended (stream and raw TCP modes).

        @param client: The visitor's address, as the relay reported it.
        @param target: The local target.
        @param bytesIn: Bytes from the visitor to the target (after TLS).
        @param bytesOut: Bytes from the target to the visitor.
        @param seconds: How long the connection lasted.
        """
        self._emit(
            {
                "event": "connection",
                "client": client,
                "target": target,
                "in": bytesIn,
                "out": bytesOut,
                "seconds": round(seconds, 3),
            },
            f"{client} connection {bytesIn} B in, {bytesOut} B out, {seconds:.1f} s [-> {target}]",
        )

    def state(self, event: str, relay: str, message: str, **fields: Any) -> None:
        """
        A change of state: reconnecting, lease lost, an error.

        @param event: A short event name (C{disconnected}, C{error}, ...).
        @param relay: The relay concerned.
        @param message: A sentence for humans.
        @param fields: More JSON fields.
        """
        self._emit(
            {"event": event, "relay": relay, "message": message, **fields},
            f"[{relay}] {message}" if relay else message,
        )
