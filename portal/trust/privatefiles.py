"""
Files that only their owner may read: private directories, atomic writes, and checked reads.

Identities, the local CA's key, the known relays file and the relay's lease table all live in
files like these.  This module only does the file system work; it raises L{OSError} (or one of
the subclasses defined here) and leaves it to each caller to explain the problem in its own
terms.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from typing import BinaryIO

#: Permission bits of a file only its owner can read and write.
PRIVATE_FILE_MODE = 0o600

#: Permission bits of a directory only its owner can enter and list.
PRIVATE_DIRECTORY_MODE = 0o700


class NotRegularFileError(OSError):
    """
    A private file turned out to be something other than a regular file (a directory, a device,
    a FIFO...).
    """


class PermissionsTooOpenError(OSError):
    """
    A private file may be read or changed by its group or by other users.

    @ivar mode: The file's permission bits.
    """

    def __init__(self, path: str, mode: int) -> None:
        """
        @param path: The file.
        @param mode: Its permission bits.
        """
        super().__init__(f"{path} has mode {mode:04o}; group and others must have no access")
        self.filename = path
        self.mode = mode


def makePrivateDirectories(directory: str) -> None:
    """
    Create a directory and any missing parents, each new one with mode 0700 whatever the umask.

    Directories that already exist, including ones another process creates meanwhile, are left
    as they are.

    @param directory: The directory to create.
    @raise OSError: If a directory cannot be created, for example because a file stands where a
        directory should be.
    """
    directory = os.path.abspath(directory)
    missing = []
    while not os.path.isdir(directory):
        missing.append(directory)
        parent = os.path.dirname(directory)
        if parent == directory:
            break
        directory = parent
    for new in reversed(missing):
        try:
            os.mkdir(new, PRIVATE_DIRECTORY_MODE)
        except FileExistsError:
            continue
        # The mode given to mkdir is reduced by the umask; make it exactly 0700.
        os.chmod(new, PRIVATE_DIRECTORY_MODE)


def writeFileAtomically(
    path: str, content: bytes, mode: int = PRIVATE_FILE_MODE, overwrite: bool = True
) -> None:
    """
    Write a file so that readers, and a crash, see either the old file or the complete new one.

    The content goes to a new temporary file in the same directory, created with C{mode} (exactly,
    whatever the umask, so the file never has wider permissions than C{mode}) and flushed to disk;
    it is then moved to C{path}, and the directory is flushed too where the platform allows.  The
    directory must already exist (see L{makePrivateDirectories}).  No temporary file is left
    behind, whether or not the write succeeds.

    @param path: The file to write.
    @param content: What it should hold.
    @param mode: Its permission bits.
    @param overwrite: Whether an existing file at C{path} may be replaced.  When false the file is
        placed with a hard link where the file system allows it, so that of two processes
        creating the same file at once exactly one succeeds.
    @raise FileExistsError: If C{overwrite} is false and C{path} exists.
    @raise OSError: If the file cannot be written.
    """
    directory = os.path.dirname(os.path.abspath(path))
    temporary = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(8)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(content)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        if overwrite:
            os.replace(temporary, path)
        else:
            _placeWithoutReplacing(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
    _fsyncDirectory(directory)


def openPrivateFile(path: str) -> BinaryIO:
    """
    Open a file for reading after checking that it is a regular file that neither its group nor
    other users can access.

    The checks are made on the opened file, so the file cannot be swapped between the check and
    the read.  Permissions are only checked on POSIX systems.

    @param path: The file to open.
    @return: The file, open for reading bytes; the caller closes it.
    @raise FileNotFoundError: If there is no file at C{path}.
    @raise NotRegularFileError: If C{path} is not a regular file.
    @raise PermissionsTooOpenError: If the group or other users have any access to it.
    @raise OSError: If it cannot be opened for another reason.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            raise NotRegularFileError(f"{path} is not a regular file")
        mode = stat.S_IMODE(status.st_mode)
        if os.name == "posix" and mode & 0o077:
            raise PermissionsTooOpenError(path, mode)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _placeWithoutReplacing(temporary: str, path: str) -> None:
    """
    Give a completely written temporary file its final name, unless that name is taken.

    @param temporary: The temporary file; the caller removes this name afterwards.
    @param path: The final name.
    @raise FileExistsError: If C{path} exists.
    """
    try:
        os.link(temporary, path)
    except FileExistsError:
        raise
    except OSError:
        # No hard links here (some file systems); fall back to check-then-replace.
        if os.path.lexists(path):
            raise FileExistsError(f"{path} exists") from None
        os.replace(temporary, path)


def _fsyncDirectory(directory: str) -> None:
    """
    Make the entries of a directory (such as a rename into it) durable, where the platform allows.

    Failures are ignored: not every platform or file system can flush a directory.

    @param directory: The directory.
    """
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
