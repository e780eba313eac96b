"""
The other workers of a relay started with C{--workers N}, kept running by the first one.

The first worker starts the others (each a C{twistd -n portal-relay} with its own index and state
directory, on the ports the first one bound) and restarts one that ends while the relay runs, as
nginx's master process restarts a worker: after 1 s, and twice as long each time a worker dies
within L{QUICK_DEATH} seconds of starting (at most L{MAX_RESTART_DELAY}), so a worker that cannot
start does not spin. SIGHUP is passed on to every worker; on stop, each gets SIGTERM (they drain
like any relay) and no worker is restarted.

A worker must not outlive the first one, even when that one is killed with SIGKILL and cannot
stop it: each worker calls L{dieWithParent} first thing, which asks Linux to send it SIGTERM when
the process that started it ends (C{prctl(PR_SET_PDEATHSIG)}), so it stops as on any SIGTERM
(draining for at most C{--shutdown-grace} seconds). The call is made in the worker itself, at the
start of its command (Twisted's C{spawnProcess} runs no code between C{fork} and C{exec}; the
setting survives C{exec} anyway), and a worker whose parent is already gone by then ends at once.
The kernel does the watching, so nothing in the worker's reactor is needed, and it works whatever
state the worker is in; a pipe from the first worker watched by each worker's reactor would also
work beyond Linux, but the workers need Linux already (C{SO_REUSEPORT} steering).
"""

from __future__ import annotations

import ctypes
import os
import signal
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

#: Seconds before a worker that ended is started again, the first time.
RESTART_DELAY = 1.0

#: The longest wait before a restart.
MAX_RESTART_DELAY = 30.0

#: A worker that ends sooner than this after it started died quickly: the next wait doubles.
QUICK_DEATH = 10.0


#: C{PR_SET_PDEATHSIG} from Linux's C{linux/prctl.h}.
PR_SET_PDEATHSIG = 1


def dieWithParent(parent: int, sig: int = signal.SIGTERM) -> None:
    """
    Have the kernel send this process C{sig} when its parent ends (C{PR_SET_PDEATHSIG}); when the
    parent is already gone (this process's parent is no longer C{parent}), send it now.

    @param parent: The process id of the first worker, which started this one.
    @param sig: The signal.
    @raise OSError: When the kernel refuses (not Linux).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_PDEATHSIG): {os.strerror(errno)}")
    if os.getppid() != parent:
        os.kill(os.getpid(), sig)


class WorkerProcess(ProcessProtocol):
    """
    One run of a worker; its output goes to the first worker's.

    @ivar index: The worker's index (1 to N - 1).
    @ivar ended: Fires when the process exits.
    """

    _log = Logger()

    def __init__(self, index: int) -> None:
        self.index = index
        self.ended: Deferred[None] = Deferred()

    @property
    def pid(self) -> int | None:
        """
        The process id.
        """
        return getattr(self.transport, "pid", None)

    def signal(self, name: str) -> None:
        """
        Send the process a signal, unless it has ended.

        @param name: The signal's name, C{"TERM"} or C{"HUP"}.
        """
        if self.transport is not None and not self.ended.called:
            try:
                self.transport.signalProcess(name)
            except ProcessExitedAlready:
                pass

    def processEnded(self, reason: Failure) -> None:
        """
        The process exited.
        """
        self.ended.callback(None)


class Workers:
    """
    The workers other than the first, started, restarted and stopped together.

    @ivar running: The current process of each worker, by index.
    @ivar restarts: How many times each worker was restarted.
    """

    _log = Logger()

    def __init__(self, reactor: Any, commands: dict[int, Sequence[str]]) -> None:
        """
        @param reactor: Provides C{spawnProcess} and C{callLater}.
        @param commands: The argv of each worker, by index.
        """
        self._reactor = reactor
        self._commands = commands
        self.running: dict[int, WorkerProcess] = {}
        self.restarts: dict[int, int] = dict.fromkeys(commands, 0)
        self._delays: dict[int, float] = dict.fromkeys(commands, RESTART_DELAY)
        self._startedAt: dict[int, float] = {}
        self._pending: dict[int, IDelayedCall] = {}
        self._stopping = False

    def start(self) -> None:
        """
        Start every worker.
        """
        for index in sorted(self._commands):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        """
        Start (or start again) worker C{index}.
        """
        self._pending.pop(index, None)
        argv = list(self._commands[index])
        process = WorkerProcess(index)
        self.running[index] = process
        self._startedAt[index] = self._reactor.seconds()
        self._reactor.spawnProcess(
            process, argv[0], argv, env=dict(os.environ), childFDs={0: "w", 1: 1, 2: 2}
        )
        process.ended.addCallback(lambda _: self._ended(index, process))
        self._log.info("started worker {index} (pid {pid})", index=index, pid=process.pid)

    def _ended(self, index: int, process: WorkerProcess) -> None:
        """
        Worker C{index} exited: unless the relay is stopping, start it again after a while.
        """
        if self._stopping or self.running.get(index) is not process:
            self._log.info("worker {index} ended", index=index)
            return
        lived = self._reactor.seconds() - self._startedAt[index]
        if lived >= QUICK_DEATH:
            self._delays[index] = RESTART_DELAY
        delay = self._delays[index]
        self._delays[index] = min(MAX_RESTART_DELAY, delay * 2)
        self.restarts[index] += 1
        self._log.warn(
            "worker {index} ended after {lived:.1f} s; restarting it in {delay:g} s",
            index=index,
            lived=lived,
            delay=delay,
        )
        self._pending[index] = self._reactor.callLater(delay, self._spawn, index)

    def signal(self, name: str) -> None:
        """
        Pass a signal on to every running worker.
        """
        for process in self.running.values():
            process.signal(name)

    def stop(self) -> Deferred[Any]:
        """
        Stop every worker (SIGTERM) and restart none.

        @return: Fires when every worker has exited.
        """
        self._stopping = True
        for call in self._pending.values():
            call.cancel()
        self._pending.clear()
        ended = []
        for process in self.running.values():
            process.signal("TERM")
            ended.append(process.ended)
        return gatherResults(ended)
