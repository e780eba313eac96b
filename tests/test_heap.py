"""
Tests for L{portal.forwarding.heap}, and for who freezes the heap: the relay's and the tunnel's own
processes, never a test's (freezing the test runner's heap would keep its garbage forever).
"""

from __future__ import annotations

import os

import attrs
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from portal.forwarding import heap
from portal.relay.service import RelayConfig, RelayService
from portal.tap import relay as tapRelay
from portal.tap.relay import Options, makeService


class _FakeGC:
    """
    Records what is asked of the garbage collector.
    """

    def __init__(self) -> None:
        self.calls: list[str] = []

    def collect(self) -> int:
        self.calls.append("collect")
        return 0

    def freeze(self) -> None:
        self.calls.append("freeze")

    def get_freeze_count(self) -> int:
        return 1234


class FreezeTests(SynchronousTestCase):
    """
    L{heap.freezeStartupHeap} collects once, then freezes what is left.
    """

    def setUp(self) -> None:
        self.gc = _FakeGC()
        self.patch(heap, "gc", self.gc)

    def test_collectThenFreeze(self) -> None:
        """
        Garbage is collected first (so that it is not kept forever), then the rest is frozen.
        """
        self.assertEqual(heap.freezeStartupHeap(), 1234)
        self.assertEqual(self.gc.calls, ["collect", "freeze"])

    def test_relayFreezesOnceListening(self) -> None:
        """
        A relay told to (C{freezeHeap}) freezes its heap once it listens; by default it does not.
        """
        for freeze, expected in ((False, []), (True, ["collect", "freeze"])):
            self.gc.calls.clear()
            config = RelayConfig(stateDir=os.path.abspath(self.mktemp()), freezeHeap=freeze)
            service = RelayService(config, MemoryReactorClock())
            service.startService()
            self.addCleanup(service.stopService)
            self.successResultOf(service.whenListening())
            self.assertEqual(self.gc.calls, expected)

    def test_twistdRelayFreezes(self) -> None:
        """
        The relay C{twistd} starts (its own process) is told to freeze its heap; the options
        alone do not say so.
        """
        from twisted.internet import reactor

        built: list[RelayConfig] = []
        # The test runner's reactor is not to get the relay's exit trigger, nor a real service.
        self.patch(reactor, "addSystemEventTrigger", lambda *args, **kwargs: None)
        self.patch(tapRelay, "RelayService", lambda config, *args: built.append(config))
        options = Options()
        options.parseOptions(["--state-dir", os.path.abspath(self.mktemp())])
        self.assertFalse(options.config().freezeHeap)
        makeService(options)
        [config] = built
        self.assertTrue(config.freezeHeap)
        self.assertEqual(attrs.evolve(config, freezeHeap=False), options.config())
