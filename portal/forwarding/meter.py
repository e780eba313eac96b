"""
Byte meters: what one direction of a splice moved, added to a shared counter, and a one-time callback
on the first byte (a relay's time to first byte).

A meter is told about bytes after they are read from one side, whichever splice moves them: the Python
splice (L{portal.forwarding.splice.SpliceProtocol.meter}) or the kernel splice
(L{portal.forwarding.kernelsplice.KernelSplice}'s C{meters}).
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping


class ByteMeter:
    """
    Counts the bytes of one direction of one spliced connection into a shared counter.
    """

    # Slots: a relay keeps two meters per spliced connection, idle ones included (issue 16).
    __slots__ = ("_counters", "_key", "_onFirstByte")

    def __init__(
        self,
        counters: MutableMapping[str, int],
        key: str,
        onFirstByte: Callable[[], None] | None = None,
    ) -> None:
        """
        @param counters: Where the byte count is added (shared by every meter of a relay).
        @param key: The counter to add to.
        @param onFirstByte: Called once, when the first bytes are counted.
        """
        self._counters = counters
        self._key = key
        self._onFirstByte = onFirstByte
        counters.setdefault(key, 0)

    def count(self, size: int) -> None:
        """
        Record C{size} bytes moved.

        @param size: The number of bytes just read from the source side.
        """
        self._counters[self._key] += size
        onFirstByte = self._onFirstByte
        if onFirstByte is not None and size > 0:
            self._onFirstByte = None
            onFirstByte()
