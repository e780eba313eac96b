"""
The lock that keeps a relay's state directory to one relay process at a time.

Two relays on one state directory would share one identity and overwrite each other's leases.  A
relay takes an exclusive C{fcntl} lock on C{relay.lock} in its state directory before it reads
anything there, and writes its process id into the file so that a second relay can say which
process holds it.  The kernel drops the lock when the process ends, however it ends: a stale lock
file does not stop the next relay.
"""

from __future__ import annotations

import fcntl
import os

#: The lock file's name in the state directory.
LOCK_FILE = "relay.lock"


class StateDirectoryLocked(Exception):
    """
    Another process holds the state directory; C{str()} of the exception says which and what to do.
    """


class StateLock:
    """
    An exclusive lock on a state directory, held until L{release} or the process ends.

    @ivar path: The lock file.
    """

    def __init__(self, path: str, fd: int) -> None:
        """
        Use L{lockStateDirectory} rather than this.

        @param path: The lock file.
        @param fd: Its open descriptor, locked.
        """
        self.path = path
        self._fd: int | None = fd

    def release(self) -> None:
        """
        Give up the lock (closing the file releases it); calling this again does nothing.
        """
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def lockStateDirectory(directory: str) -> StateLock:
    """
    Lock C{directory} for this process and record its process id in the lock file.

    @param directory: The state directory (it must exist).
    @return: The lock.
    @raise StateDirectoryLocked: If another process holds it; the message names the directory and
        the holder's process id.
    @raise OSError: If the lock file cannot be opened.
    """
    path = os.path.join(directory, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise StateDirectoryLocked(
            f"state directory {directory} is in use by another portal-relay (process {holder}); "
            f"stop that relay, or give this one its own --state-dir"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    return StateLock(path, fd)
