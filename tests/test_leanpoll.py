"""
Tests for L{portal.forwarding.leanpoll}.
"""

from __future__ import annotations

import errno
import os
from typing import Any

from twisted.internet.epollreactor import EPollReactor
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.python import log
from twisted.trial.unittest import SynchronousTestCase

from portal.forwarding import leanpoll
from portal.tap import relay as tapRelay
from portal.tap import tunnel as tapTunnel


class _Poller:
    """
    Stands in for C{select.epoll}: hands out prepared results, or raises.
    """

    def __init__(self, *results: Any) -> None:
        self.results = list(results)
        self.calls: list[tuple[float, int]] = []

    def poll(self, timeout: float, most: int) -> Any:
        self.calls.append((timeout, most))
        result = self.results.pop(0)
        if isinstance(result, BaseException):
            raise result
        return result


class _Reactor:
    """
    The attributes of an epoll reactor that L{leanpoll.install} relies on.
    """

    def __init__(self, poller: _Poller, selectables: dict[int, object]) -> None:
        self._poller = poller
        self._selectables = selectables
        self.dispatched: list[tuple[object, int, int]] = []
        self.raises: BaseException | None = None

    def _doReadOrWrite(self, selectable: object, fd: int, event: int) -> None:
        self.dispatched.append((selectable, fd, event))
        if self.raises is not None:
            raise self.raises


class _Descriptor:
    """
    A descriptor whose log prefix must not be asked for (the lean dispatch skips it).
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.reads = 0

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        raise AssertionError("the legacy log context was set up")

    def doRead(self) -> None:
        self.reads += 1
        os.read(self.fd, 100)

    def doWrite(self) -> None:
        pass

    def connectionLost(self, reason: object) -> None:
        pass


class InstallTests(SynchronousTestCase):
    """
    Tests for L{leanpoll.install}.
    """

    def test_dispatchesEachReadyDescriptor(self) -> None:
        """
        Each ready descriptor's event goes to the reactor's dispatch, in order; a descriptor no
        longer watched is skipped; the poll waits at most the timeout for at most as many events
        as descriptors watched.
        """
        a, b = object(), object()
        poller = _Poller([(3, 1), (9, 4), (4, 5)])
        reactor = _Reactor(poller, {3: a, 4: b})
        self.assertTrue(leanpoll.install(reactor))
        reactor.doIteration(0.25)  # type: ignore[attr-defined]
        self.assertEqual(reactor.dispatched, [(a, 3, 1), (b, 4, 5)])
        self.assertEqual(poller.calls, [(0.25, 2)])

    def test_waitsForeverWithoutTimeout(self) -> None:
        """
        No timeout waits until an event (-1, as epoll takes it).
        """
        poller = _Poller([])
        reactor = _Reactor(poller, {})
        leanpoll.install(reactor)
        reactor.doIteration(None)  # type: ignore[attr-defined]
        self.assertEqual(poller.calls, [(-1, 0)])

    def test_interrupted(self) -> None:
        """
        A poll interrupted by a signal ends the iteration without dispatching; any other poll error
        is raised.
        """
        poller = _Poller(
            InterruptedError(), OSError(errno.EINTR, "eintr"), OSError(errno.EBADF, "x")
        )
        reactor = _Reactor(poller, {})
        leanpoll.install(reactor)
        reactor.doIteration(0)  # type: ignore[attr-defined]
        reactor.doIteration(0)  # type: ignore[attr-defined]
        with self.assertRaises(OSError):
            reactor.doIteration(0)  # type: ignore[attr-defined]
        self.assertEqual(reactor.dispatched, [])

    def test_errorLoggedAndNextDispatched(self) -> None:
        """
        An error escaping one descriptor's dispatch is logged, and the next ready descriptor is
        still dispatched.
        """
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        a, b = object(), object()
        reactor = _Reactor(_Poller([(3, 1), (4, 1)]), {3: a, 4: b})
        reactor.raises = ValueError("broken descriptor")
        leanpoll.install(reactor)
        reactor.doIteration(0)  # type: ignore[attr-defined]
        self.assertEqual([s for s, _, _ in reactor.dispatched], [a, b])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 2)
        failures = [e for e in events if "log_failure" in e]
        self.assertEqual(len(failures), 2)
        self.assertIn("unhandled error dispatching", failures[0]["log_format"])

    def test_keyboardInterruptRaised(self) -> None:
        """
        A KeyboardInterrupt is not swallowed.
        """
        reactor = _Reactor(_Poller([(3, 1)]), {3: object()})
        reactor.raises = KeyboardInterrupt()
        leanpoll.install(reactor)
        with self.assertRaises(KeyboardInterrupt):
            reactor.doIteration(0)  # type: ignore[attr-defined]

    def test_otherReactorsUnchanged(self) -> None:
        """
        A reactor without an epoll poller (a memory reactor, a select reactor) is left as it is.
        """
        reactor = MemoryReactorClock()
        self.assertFalse(leanpoll.install(reactor))
        self.assertNotIn("doIteration", vars(reactor))
        broken = _Reactor(_Poller(), {})
        del broken._selectables
        self.assertFalse(leanpoll.install(broken))

    def test_realEPollReactor(self) -> None:
        """
        On Twisted's own epoll reactor, an iteration reads a ready pipe through its descriptor
        without asking for its log prefix (what Twisted's legacy log context needs).
        """
        reactor = EPollReactor()
        self.addCleanup(reactor._poller.close)
        # The waker's pipe, made by the constructor.
        self.addCleanup(reactor.waker.connectionLost, None)
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        descriptor = _Descriptor(r)
        reactor.addReader(descriptor)
        os.write(w, b"x")
        self.assertTrue(leanpoll.install(reactor))
        reactor.doIteration(0)
        self.assertEqual(descriptor.reads, 1)
        reactor.removeReader(descriptor)

    def test_legacyLogStillWorks(self) -> None:
        """
        A legacy C{log.msg} made during a dispatched event is still logged (with no connection in
        its system field).
        """
        events: list[dict[str, Any]] = []
        log.addObserver(events.append)
        self.addCleanup(log.removeObserver, events.append)

        class Logging(_Reactor):
            def _doReadOrWrite(self, selectable: object, fd: int, event: int) -> None:
                log.msg("from a descriptor")

        reactor = Logging(_Poller([(3, 1)]), {3: _Descriptor(3)})
        leanpoll.install(reactor)
        reactor.doIteration(0)  # type: ignore[attr-defined]
        [event] = [e for e in events if e.get("message") == ("from a descriptor",)]
        self.assertEqual(event["system"], "-")


class ProcessesTests(SynchronousTestCase):
    """
    The relay's and the tunnel's own processes install the lean dispatch.
    """

    def test_relay(self) -> None:
        """
        C{twistd portal-relay}'s service maker installs it on the reactor.
        """
        from twisted.internet import reactor

        installed: list[object] = []
        self.patch(reactor, "addSystemEventTrigger", lambda *args, **kwargs: None)
        self.patch(tapRelay, "RelayService", lambda config, *args: object())
        self.patch(leanpoll, "install", installed.append)
        options = tapRelay.Options()
        options.parseOptions(["--state-dir", os.path.abspath(self.mktemp())])
        tapRelay.makeService(options)
        self.assertEqual(installed, [reactor])

    def test_tunnel(self) -> None:
        """
        C{twistd portal-tunnel}'s service maker installs it on the reactor it is given.
        """
        installed: list[object] = []
        self.patch(leanpoll, "install", installed.append)
        reactor = MemoryReactorClock()
        options = tapTunnel.Options()
        options.parseOptions(["8000", "--name", "x"])
        tapTunnel.makeService(options, reactor)
        self.assertEqual(installed, [reactor])
