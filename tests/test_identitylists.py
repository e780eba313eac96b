"""
Tests for L{portal.relay.identitylists}.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from portal.relay.identitylists import (
    DENY_FILE,
    INVITE_FILE,
    IdentityListError,
    IdentityLists,
    readIdentityList,
)
from portal.relay.service import RelayConfig, RelayService
from portal.relay.workers import WorkerProcess, Workers
from portal.trust.identity import Identity


class IdentityListsTests(SynchronousTestCase):
    """
    The deny and invite lists are read from the state directory, one identity id a line.
    """

    def setUp(self) -> None:
        """
        A state directory and two identities.
        """
        self.stateDir = self.mktemp()
        os.makedirs(self.stateDir)
        self.alice = Identity.generate().id
        self.bob = Identity.generate().id

    def write(self, name: str, text: str) -> None:
        """
        Write a list file in the state directory.
        """
        with open(os.path.join(self.stateDir, name), "w", encoding="utf-8") as f:
            f.write(text)

    def test_open(self) -> None:
        """
        Without files and invite mode, every identity may register.
        """
        lists = IdentityLists.load(self.stateDir, inviteOnly=False)
        self.assertIsNone(lists.refusal(self.alice))

    def test_denied(self) -> None:
        """
        A listed identity is refused, with comments and blank lines ignored; others are not.
        """
        self.write(DENY_FILE, f"# abusers\n\n{self.alice}  # flooded on Monday\n")
        lists = IdentityLists.load(self.stateDir, inviteOnly=False)
        refusal = lists.refusal(self.alice)
        assert refusal is not None
        self.assertEqual(refusal[0], "identity_denied")
        self.assertIsNone(lists.refusal(self.bob))

    def test_inviteOnly(self) -> None:
        """
        In invite mode only invited identities may register; the refusal names the identity and
        the file to add it to. A denied identity stays refused even when invited.
        """
        self.write(INVITE_FILE, f"{self.alice}\n{self.bob}\n")
        self.write(DENY_FILE, f"{self.bob}\n")
        lists = IdentityLists.load(self.stateDir, inviteOnly=True)
        self.assertIsNone(lists.refusal(self.alice))
        stranger = Identity.generate().id
        refusal = lists.refusal(stranger)
        assert refusal is not None
        self.assertEqual(refusal[0], "identity_not_invited")
        self.assertIn(stranger, refusal[1])
        self.assertIn(INVITE_FILE, refusal[1])
        denied = lists.refusal(self.bob)
        assert denied is not None
        self.assertEqual(denied[0], "identity_denied")

    def test_inviteFileIgnoredWhenOpen(self) -> None:
        """
        Without invite mode the invite file does not restrict anyone.
        """
        self.write(INVITE_FILE, f"{self.alice}\n")
        self.assertIsNone(IdentityLists.load(self.stateDir, False).refusal(self.bob))

    def test_malformed(self) -> None:
        """
        A line that is not an identity id is an error naming the file and line.
        """
        self.write(DENY_FILE, f"{self.alice}\nnot-an-id\n")
        error = self.assertRaises(
            IdentityListError, readIdentityList, os.path.join(self.stateDir, DENY_FILE)
        )
        self.assertIn("line 2", str(error))
        self.assertIn(DENY_FILE, str(error))


class FakeSession:
    """
    A control session the reload may close.

    @ivar owner: The identity that registered on it.
    @ivar transport: Records an abort.
    """

    def __init__(self, owner: str | None) -> None:
        self.owner = owner
        self.transport = StringTransport()


class ReloadTests(SynchronousTestCase):
    """
    The relay service reads the lists at start and again on SIGHUP, through an injected signal hook.
    """

    def setUp(self) -> None:
        """
        Start a relay on a memory reactor, recording the signal handlers it installs.
        """
        self.stateDir = os.path.abspath(self.mktemp())
        os.makedirs(self.stateDir)
        self.handlers: dict[int, Any] = {}
        self.service = RelayService(
            RelayConfig(stateDir=self.stateDir, inviteOnly=True),
            MemoryReactorClock(),
            lambda signum, handler: self.handlers.__setitem__(signum, handler),
        )
        self.alice = Identity.generate().id
        self.bob = Identity.generate().id
        with open(os.path.join(self.stateDir, INVITE_FILE), "w") as f:
            f.write(f"{self.alice}\n{self.bob}\n")
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.successResultOf(self.service.whenListening())
        assert self.service.router is not None
        self.router = self.service.router

    def test_readAtStart(self) -> None:
        """
        The invite list is in force once the relay listens.
        """
        lists = self.router.admission.lists
        self.assertEqual(lists.invited, frozenset({self.alice, self.bob}))
        self.assertTrue(lists.inviteOnly)

    def test_sighupReloads(self) -> None:
        """
        On SIGHUP the files are read again: a newly denied identity's control session is closed,
        others stay; sessions that registered nothing are left alone.
        """
        sessions = [FakeSession(self.alice), FakeSession(self.bob), FakeSession(None)]
        self.router.controls.update(sessions)
        self.addCleanup(self.router.controls.difference_update, sessions)
        with open(os.path.join(self.stateDir, DENY_FILE), "w") as f:
            f.write(f"{self.bob}\n")
        self.handlers[signal.SIGHUP]()
        self.assertEqual(self.router.admission.lists.denied, frozenset({self.bob}))
        self.assertEqual([s.transport.disconnecting for s in sessions], [False, True, False])

    def test_badFileKeepsLists(self) -> None:
        """
        A list that cannot be read on SIGHUP leaves the previous lists in force, and says so.
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        before = self.router.admission.lists
        with open(os.path.join(self.stateDir, INVITE_FILE), "a") as f:
            f.write("garbage\n")
        self.handlers[signal.SIGHUP]()
        self.assertIs(self.router.admission.lists, before)
        self.assertTrue(any("not reloaded" in e["log_format"] for e in events))


class RecordingProcess:
    """
    A worker process transport that records signals.

    @ivar signals: The signals sent, by name.
    """

    pid = 4242

    def __init__(self) -> None:
        self.signals: list[str] = []

    def signalProcess(self, name: str) -> None:
        """
        Record a signal.
        """
        self.signals.append(name)


class WorkerListsTests(SynchronousTestCase):
    """
    With several workers (C{--workers}), every worker reads the operator's lists (next to the
    relay's identity, not in its own state directory), and the first passes SIGHUP on.
    """

    def test_workerReadsOperatorLists(self) -> None:
        """
        A worker whose state directory is under the first one's reads the lists of the first.
        """
        stateDir = os.path.abspath(self.mktemp())
        os.makedirs(stateDir)
        denied = Identity.generate().id
        with open(os.path.join(stateDir, DENY_FILE), "w") as f:
            f.write(f"{denied}\n")
        service = RelayService(
            RelayConfig(stateDir=os.path.join(stateDir, "worker-1"), workerIndex=1),
            MemoryReactorClock(),
        )
        service.router, _ = service._buildRouter()
        self.assertEqual(service.router.admission.lists.denied, frozenset({denied}))

    def test_sighupPassedOn(self) -> None:
        """
        The first worker sends SIGHUP on to the workers it started, and reloads its own lists.
        """
        handlers: dict[int, Any] = {}
        stateDir = os.path.abspath(self.mktemp())
        service = RelayService(
            RelayConfig(stateDir=stateDir),
            MemoryReactorClock(),
            lambda signum, handler: handlers.__setitem__(signum, handler),
        )
        service.startService()
        self.addCleanup(service.stopService)
        worker = WorkerProcess(1)
        worker.transport = RecordingProcess()  # type: ignore[assignment]
        service._workers = Workers(MemoryReactorClock(), {1: ["relay"]})
        service._workers.running[1] = worker
        self.addCleanup(setattr, service, "_workers", None)
        denied = Identity.generate().id
        with open(os.path.join(stateDir, DENY_FILE), "w") as f:
            f.write(f"{denied}\n")
        handlers[signal.SIGHUP]()
        self.assertEqual(worker.transport.signals, ["HUP"])  # type: ignore[attr-defined]
        assert service.router is not None
        self.assertEqual(service.router.admission.lists.denied, frozenset({denied}))
