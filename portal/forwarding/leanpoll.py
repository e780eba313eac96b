"""
A lean dispatch of readiness events for Twisted's epoll reactor: each event goes straight to the
reactor's C{_doReadOrWrite}, without the legacy log context Twisted sets up around it.

Twisted's L{EPollReactor.doPoll <twisted.internet.epollreactor.EPollReactor.doPoll>} calls every
ready descriptor through L{twisted.python.log.callWithLogger}: it asks the descriptor for its log
prefix and pushes a copy of the thread's log context holding it, so that a I{legacy}
C{log.msg} made during the event names the connection. Portal logs through L{twisted.logger.Logger},
which never reads that context; the cost is paid anyway, on every event of every connection: about
1.5 us per event with warm caches, and several times that in a process woken once per visitor (the
relay's workers hand most of their visitors over in one event each). L{install} replaces the
reactor's iteration with one that dispatches directly and still logs what escapes a descriptor's
event (L{twisted.python.log.callWithLogger} logged it too), so only the legacy log lines' system
field changes (C{-} instead of the connection's prefix).

It reads three attributes of L{EPollReactor} (C{_poller}, C{_selectables}, C{_doReadOrWrite}) that
have been stable since the reactor was written; L{install} leaves any other reactor, or one without
them, as it is.
"""

from __future__ import annotations

import errno
from typing import Any

from twisted.logger import Logger

_log = Logger()


class LeanPolling:
    """
    An epoll reactor's iteration: wait for readiness events and dispatch each straight to the
    reactor's C{_doReadOrWrite}.
    """

    __slots__ = ("_poller", "_selectables", "_dispatch")

    def __init__(self, poller: Any, selectables: dict[int, Any], dispatch: Any) -> None:
        """
        @param poller: The reactor's C{select.epoll}.
        @param selectables: The reactor's descriptors by file number.
        @param dispatch: The reactor's C{_doReadOrWrite}.
        """
        self._poller = poller
        self._selectables = selectables
        self._dispatch = dispatch

    def doPoll(self, timeout: float | None) -> None:
        """
        Wait for readiness events for at most C{timeout} seconds (forever for L{None}) and dispatch
        each to its descriptor.
        """
        selectables = self._selectables
        try:
            # As Twisted does: at most as many events as descriptors watched.
            ready = self._poller.poll(-1 if timeout is None else timeout, len(selectables))
        except InterruptedError:
            return
        except OSError as e:
            if e.errno == errno.EINTR:
                return
            raise
        dispatch = self._dispatch
        for fd, event in ready:
            selectable = selectables.get(fd)
            if selectable is None:
                continue
            try:
                dispatch(selectable, fd, event)
            except KeyboardInterrupt:
                raise
            except BaseException:
                # _doReadOrWrite logs and disconnects what a descriptor raises; only an error in
                # closing it after that arrives here (callWithLogger logged it the same way).
                _log.failure(
                    "unhandled error dispatching an event of {selectable}", selectable=selectable
                )


def install(reactor: Any) -> bool:
    """
    Have an epoll reactor dispatch its events without the legacy log context.

    @param reactor: The reactor (not yet running, or running: the next iteration uses the change).
    @return: Whether it was changed (only an epoll reactor with the attributes relied on is).
    """
    poller = getattr(reactor, "_poller", None)
    selectables = getattr(reactor, "_selectables", None)
    dispatch = getattr(reactor, "_doReadOrWrite", None)
    if poller is None or not hasattr(poller, "poll") or not isinstance(selectables, dict):
        return False
    if dispatch is None:
        return False
    reactor.doIteration = LeanPolling(poller, selectables, dispatch).doPoll
    return True
