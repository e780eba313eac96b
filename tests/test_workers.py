"""
Tests for C{twistd portal-relay --workers}: its option checks and the other workers' command line.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Any

from twisted.internet.error import ProcessTerminated
from twisted.internet.task import Clock
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from portal.relay.service import workerCommand
from portal.relay.workers import (
    MAX_RESTART_DELAY,
    QUICK_DEATH,
    RESTART_DELAY,
    WorkerProcess,
    Workers,
)
from portal.tap.relay import Options


class WorkerOptionsTests(SynchronousTestCase):
    """
    What C{--workers} needs.
    """

    def test_needsCluster(self) -> None:
        """
        More than one worker without C{--cluster} is a usage error saying why.
        """
        with self.assertRaises(usage.UsageError) as e:
            Options().parseOptions(["--workers", "2"])
        self.assertIn("--cluster", str(e.exception))

    def test_sharedListenersOnly(self) -> None:
        """
        Listeners that cannot be shared are refused with workers.
        """
        cluster = ["--workers", "2", "--cluster", "etcd://127.0.0.1:2379"]
        self.assertRaises(
            usage.UsageError, Options().parseOptions, [*cluster, "--public", "ssl:443"]
        )

    def test_udpPorts(self) -> None:
        """
        UDP ports are offered with workers: every worker gets the range.
        """
        options = Options()
        argv = [
            "--workers",
            "2",
            "--cluster",
            "etcd://127.0.0.1:2379",
            "--udp-ports",
            "20000-20010",
        ]
        options.parseOptions(argv)
        config = options.config()
        self.assertIsNotNone(config.udpPorts)
        command = workerCommand(config.workerArgs, 1, "tcp:1", "tcp:2", "/state/worker-1")
        self.assertIn("20000-20010", command)

    def test_tcpPorts(self) -> None:
        """
        Raw TCP ports are offered with workers: every worker gets the range.
        """
        options = Options()
        argv = [
            "--workers",
            "2",
            "--cluster",
            "etcd://127.0.0.1:2379",
            "--tcp-ports",
            "20000-20010",
        ]
        options.parseOptions(argv)
        config = options.config()
        self.assertEqual(config.workers, 2)
        self.assertIsNotNone(config.tcpPorts)
        command = workerCommand(config.workerArgs, 1, "tcp:1", "tcp:2", "/state/worker-1")
        self.assertIn("20000-20010", command)

    def test_config(self) -> None:
        """
        The options reach the relay's configuration, with the command line kept for the others.
        """
        options = Options()
        argv = ["--workers", "3", "--cluster", "etcd://127.0.0.1:2379"]
        options.parseOptions(argv)
        config = options.config()
        self.assertEqual((config.workers, config.workerIndex), (3, None))
        self.assertEqual(config.workerArgs, tuple(argv))


class WorkerCommandTests(SynchronousTestCase):
    """
    The command line of the other workers.
    """

    def test_replacesListenersAndState(self) -> None:
        """
        The listeners get the first worker's actual ports, the state directory its own, and the
        worker its index; every other option is kept, in either spelling.
        """
        argv = workerCommand(
            (
                "--public=tcp:0",
                "--control",
                "tcp:0:interface=127.0.0.1",
                "--state-dir",
                "/s",
                "--workers",
                "2",
                "--cluster=etcd://e:1",
            ),
            1,
            public="tcp:8443",
            control="tcp:4017:interface=127.0.0.1",
            stateDir="/s/worker-1",
        )
        options = argv[argv.index("portal-relay") + 1 :]
        self.assertEqual(
            options,
            [
                "--workers",
                "2",
                "--cluster=etcd://e:1",
                "--public",
                "tcp:8443",
                "--control",
                "tcp:4017:interface=127.0.0.1",
                "--state-dir",
                "/s/worker-1",
                "--worker-index",
                "1",
            ],
        )


class _FakeProcess:
    """
    A spawned process as C{spawnProcess} returns it: a pid and the signals it got.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[str] = []

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)


class _ProcessReactor(Clock):
    """
    A clock that also records the processes spawned on it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[WorkerProcess, list[str], _FakeProcess]] = []

    def spawnProcess(self, protocol: Any, executable: str, args: list[str], **kw: Any) -> Any:
        transport = _FakeProcess(1000 + len(self.spawned))
        protocol.makeConnection(transport)
        self.spawned.append((protocol, list(args), transport))
        return transport


def _exit(process: WorkerProcess, code: int = 1) -> None:
    """
    Make C{process} end with exit code C{code}.
    """
    process.processEnded(Failure(ProcessTerminated(exitCode=code)))


class WorkersTests(SynchronousTestCase):
    """
    L{Workers} starts the other workers and restarts one that ends, backing off while it dies
    quickly, and stops them all without restarting any.
    """

    def setUp(self) -> None:
        self.reactor = _ProcessReactor()
        self.workers = Workers(self.reactor, {1: ["relay", "-w1"], 2: ["relay", "-w2"]})
        self.workers.start()

    def test_started(self) -> None:
        """
        Every worker is started with its own command line.
        """
        self.assertEqual(
            [args for _, args, _ in self.reactor.spawned], [["relay", "-w1"], ["relay", "-w2"]]
        )
        self.assertEqual(sorted(self.workers.running), [1, 2])

    def test_restartedWithBackoff(self) -> None:
        """
        A worker that ends is started again after 1 s; dying within L{QUICK_DEATH} seconds each
        time, it waits 2, 4, ... up to L{MAX_RESTART_DELAY} seconds; one that ran a while is
        restarted after 1 s again. The other worker is not touched.
        """
        waits = []
        for _ in range(7):
            process = self.workers.running[1]
            before = len(self.reactor.spawned)
            _exit(process)
            waited = 0.0
            while len(self.reactor.spawned) == before:
                self.reactor.advance(0.5)
                waited += 0.5
            waits.append(waited)
        self.assertEqual(waits, [1.0, 2.0, 4.0, 8.0, 16.0, MAX_RESTART_DELAY, MAX_RESTART_DELAY])
        self.reactor.advance(QUICK_DEATH)
        before = len(self.reactor.spawned)
        _exit(self.workers.running[1])
        self.reactor.advance(RESTART_DELAY)
        self.assertEqual(len(self.reactor.spawned), before + 1)
        self.assertEqual(self.workers.restarts, {1: 8, 2: 0})
        self.assertEqual(self.reactor.spawned[-1][1], ["relay", "-w1"])

    def test_signalPassedOn(self) -> None:
        """
        A signal goes to every running worker.
        """
        self.workers.signal("HUP")
        self.assertEqual([t.signals for _, _, t in self.reactor.spawned], [["HUP"], ["HUP"]])

    def test_stop(self) -> None:
        """
        Stopping sends SIGTERM to every worker, cancels a pending restart, restarts none, and
        fires once every worker has exited.
        """
        _exit(self.workers.running[1])
        self.assertEqual(len(self.reactor.getDelayedCalls()), 1)
        stopped = self.workers.stop()
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertNoResult(stopped)
        survivor = self.workers.running[2]
        self.assertEqual(self.reactor.spawned[1][2].signals, ["TERM"])
        _exit(survivor, 0)
        self.successResultOf(stopped)
        self.reactor.advance(MAX_RESTART_DELAY)
        self.assertEqual(len(self.reactor.spawned), 2)


def _runWorkerCode(code: str) -> subprocess.CompletedProcess[str]:
    """
    Run C{code} in a new Python process, child of this one, with this one's C{portal}.

    @return: The finished process, its output as text.
    """
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )


class DieWithParentTests(SynchronousTestCase):
    """
    L{dieWithParent}: a worker ends when the first worker does, however that one ended.
    """

    def test_signalSet(self) -> None:
        """
        Once called with its parent's id, the process has SIGTERM as its parent-death signal and
        goes on.
        """
        done = _runWorkerCode(
            "import ctypes, os\n"
            f"from portal.relay.workers import dieWithParent\n"
            f"dieWithParent({os.getpid()})\n"
            "value = ctypes.c_int()\n"
            "ctypes.CDLL(None).prctl(2, ctypes.byref(value), 0, 0, 0)\n"
            "print(value.value)\n"
        )
        self.assertEqual((done.returncode, done.stdout.strip()), (0, str(int(signal.SIGTERM))))

    def test_parentAlreadyGone(self) -> None:
        """
        A process whose parent is not the one named (it ended before the call, and the process
        was adopted) ends at once with SIGTERM.
        """
        done = _runWorkerCode(
            "from portal.relay.workers import dieWithParent\n"
            f"dieWithParent({os.getpid() + 1_000_000})\n"
            "print('still running')\n"
        )
        self.assertEqual((done.returncode, done.stdout), (-signal.SIGTERM, ""))

    def test_workerCommandCallsIt(self) -> None:
        """
        A worker's command line calls L{dieWithParent} with the first worker's process id before
        C{twistd} runs.
        """
        argv = workerCommand((), 1, "tcp:1", "tcp:2", "/s/worker-1", parent=4321)
        code = argv[argv.index("-c") + 1]
        self.assertLess(code.index("dieWithParent(4321)"), code.index("run()"))
        default = workerCommand((), 1, "tcp:1", "tcp:2", "/s/worker-1")
        self.assertIn(f"dieWithParent({os.getpid()})", default[default.index("-c") + 1])
