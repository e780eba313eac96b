"""
Tests for L{portal.relay.statelock}: one relay per state directory.
"""

from __future__ import annotations

import os
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

from portal.relay.statelock import LOCK_FILE, StateDirectoryLocked, lockStateDirectory


class StateLockTests(SynchronousTestCase):
    """
    Tests for L{lockStateDirectory}.
    """

    def setUp(self) -> None:
        """
        A state directory.
        """
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)

    def test_lockedOnce(self) -> None:
        """
        The first lock holds the directory and records this process's id; a second is refused
        with a message naming the directory and that process; after release it can be taken
        again.
        """
        lock = lockStateDirectory(self.directory)
        self.addCleanup(lock.release)
        with open(os.path.join(self.directory, LOCK_FILE)) as f:
            self.assertEqual(f.read(), f"{os.getpid()}\n")
        error = self.assertRaises(StateDirectoryLocked, lockStateDirectory, self.directory)
        self.assertEqual(
            str(error),
            f"state directory {self.directory} is in use by another portal-relay (process "
            f"{os.getpid()}); stop that relay, or give this one its own --state-dir",
        )
        lock.release()
        lock.release()
        again = lockStateDirectory(self.directory)
        again.release()

    def test_otherProcess(self) -> None:
        """
        A lock held by another process refuses this one, naming that process; the lock ends with
        the process, leaving the stale file harmless.
        """
        code = (
            "import sys\n"
            "from portal.relay.statelock import lockStateDirectory\n"
            "lock = lockStateDirectory(sys.argv[1])\n"
            "print('locked', flush=True)\n"
            "sys.stdin.read()\n"
        )
        child = subprocess.Popen(
            [sys.executable, "-c", code, self.directory],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert child.stdout is not None
            self.assertEqual(child.stdout.readline(), "locked\n")
            error = self.assertRaises(StateDirectoryLocked, lockStateDirectory, self.directory)
            self.assertIn(f"(process {child.pid})", str(error))
        finally:
            assert child.stdin is not None
            child.stdin.close()
            child.wait(30)
            child.stdout.close()
        lock = lockStateDirectory(self.directory)
        lock.release()
