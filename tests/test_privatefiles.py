"""
Tests for L{portal.trust.privatefiles}.
"""

from __future__ import annotations

import errno
import os
import stat

from twisted.trial.unittest import SynchronousTestCase

from portal.trust.privatefiles import (
    NotRegularFileError,
    PermissionsTooOpenError,
    makePrivateDirectories,
    openPrivateFile,
    writeFileAtomically,
)


def _mode(path: str) -> int:
    """
    Read the permission bits of a file or directory.

    @param path: The file or directory.
    @return: Its mode without the file type bits.
    """
    return stat.S_IMODE(os.stat(path).st_mode)


def _read(path: str) -> bytes:
    """
    Read a whole file.

    @param path: The file.
    @return: Its contents.
    """
    with open(path, "rb") as f:
        return f.read()


class _DirectoryTestCase(SynchronousTestCase):
    """
    Give each test an empty directory of its own, a file name in it, and a known umask.

    @ivar fileName: The name of C{path} inside C{directory}.
    """

    fileName = "file.json"

    def setUp(self) -> None:
        """
        Create the test's directory and set the umask to the common 022, restored afterwards.
        """
        self.directory = os.path.abspath(self.mktemp())
        self.path = os.path.join(self.directory, self.fileName)
        os.mkdir(self.directory)
        oldUmask = os.umask(0o022)
        self.addCleanup(os.umask, oldUmask)


class MakePrivateDirectoriesTests(_DirectoryTestCase):
    """
    Tests for L{makePrivateDirectories}.
    """

    def test_createsParentsPrivate(self) -> None:
        """
        The directory and every missing parent are created with mode 0700 despite the umask.
        """
        parent = os.path.join(self.directory, "a")
        target = os.path.join(parent, "b", "c")
        makePrivateDirectories(target)
        self.assertTrue(os.path.isdir(target))
        for directory in (parent, os.path.dirname(target), target):
            self.assertEqual(_mode(directory), 0o700)

    def test_existingDirectoriesUntouched(self) -> None:
        """
        Directories that already exist keep their mode; only the missing ones are created.
        """
        parent = os.path.join(self.directory, "shared")
        os.mkdir(parent)
        os.chmod(parent, 0o755)
        target = os.path.join(parent, "private")
        makePrivateDirectories(target)
        makePrivateDirectories(target)
        self.assertEqual(_mode(parent), 0o755)
        self.assertEqual(_mode(target), 0o700)

    def test_relativePath(self) -> None:
        """
        A relative path is created relative to the working directory.
        """
        relative = os.path.join(self.mktemp(), "sub")
        self.assertFalse(os.path.isabs(relative))
        makePrivateDirectories(relative)
        self.assertEqual(_mode(os.path.abspath(relative)), 0o700)
        self.assertEqual(_mode(os.path.dirname(os.path.abspath(relative))), 0o700)

    def test_fileInTheWay(self) -> None:
        """
        A file where a directory should be gives an L{OSError}.
        """
        blocker = os.path.join(self.directory, "file")
        with open(blocker, "w") as f:
            f.write("not a directory")
        self.assertRaises(OSError, makePrivateDirectories, os.path.join(blocker, "sub"))


class WriteFileAtomicallyTests(_DirectoryTestCase):
    """
    Tests for L{writeFileAtomically}.
    """

    def test_writesPrivateFile(self) -> None:
        """
        A new file holds the content, has mode 0600 by default, and no temporary file is left.
        """
        writeFileAtomically(self.path, b"content\n")
        self.assertEqual(_read(self.path), b"content\n")
        self.assertEqual(_mode(self.path), 0o600)
        self.assertEqual(os.listdir(self.directory), ["file.json"])

    def test_exactMode(self) -> None:
        """
        The file gets exactly the mode asked for, even when the umask would remove some bits.
        """
        os.umask(0o077)
        writeFileAtomically(self.path, b"public", 0o644)
        self.assertEqual(_mode(self.path), 0o644)

    def test_emptyContent(self) -> None:
        """
        Empty content makes an empty file.
        """
        writeFileAtomically(self.path, b"")
        self.assertEqual(_read(self.path), b"")

    def test_replaces(self) -> None:
        """
        By default an existing file is replaced by a new one (a new inode, so a reader holding the
        old file open still sees the old content), with the new mode.
        """
        with open(self.path, "wb") as f:
            f.write(b"old")
        os.chmod(self.path, 0o644)
        with open(self.path, "rb") as reader:
            writeFileAtomically(self.path, b"new")
            self.assertEqual(reader.read(), b"old")
        self.assertEqual(_read(self.path), b"new")
        self.assertEqual(_mode(self.path), 0o600)
        self.assertEqual(os.listdir(self.directory), ["file.json"])

    def test_refusesToOverwrite(self) -> None:
        """
        With C{overwrite=False} an existing file gives L{FileExistsError} and is kept as it was,
        and the temporary file is removed.
        """
        with open(self.path, "wb") as f:
            f.write(b"old")
        self.assertRaises(FileExistsError, writeFileAtomically, self.path, b"new", overwrite=False)
        self.assertEqual(_read(self.path), b"old")
        self.assertEqual(os.listdir(self.directory), ["file.json"])

    def test_createsWithoutOverwrite(self) -> None:
        """
        With C{overwrite=False} a file that does not exist yet is created as usual.
        """
        writeFileAtomically(self.path, b"new", overwrite=False)
        self.assertEqual(_read(self.path), b"new")
        self.assertEqual(_mode(self.path), 0o600)
        self.assertEqual(os.listdir(self.directory), ["file.json"])

    def test_noHardLinks(self) -> None:
        """
        Where the file system has no hard links, C{overwrite=False} still creates a new file and
        still refuses to replace an existing one.
        """

        def link(source: str, destination: str) -> None:
            raise OSError(errno.EPERM, "Operation not permitted")

        self.patch(os, "link", link)
        writeFileAtomically(self.path, b"first", overwrite=False)
        self.assertEqual(_read(self.path), b"first")
        self.assertRaises(
            FileExistsError, writeFileAtomically, self.path, b"second", overwrite=False
        )
        self.assertEqual(_read(self.path), b"first")
        self.assertEqual(os.listdir(self.directory), ["file.json"])

    def test_failureLeavesNoTemporaryFile(self) -> None:
        """
        When the file cannot be put in place, the error is raised, the old file is kept, and the
        temporary file is removed.
        """
        os.mkdir(self.path)
        self.assertRaises(OSError, writeFileAtomically, self.path, b"new")
        self.assertTrue(os.path.isdir(self.path))
        self.assertEqual(os.listdir(self.directory), ["file.json"])

    def test_missingDirectory(self) -> None:
        """
        A file in a directory that does not exist gives L{FileNotFoundError}.
        """
        path = os.path.join(self.directory, "missing", "file.json")
        self.assertRaises(FileNotFoundError, writeFileAtomically, path, b"content")


class OpenPrivateFileTests(_DirectoryTestCase):
    """
    Tests for L{openPrivateFile}.
    """

    fileName = "secret"

    def writeFile(self, mode: int) -> None:
        """
        Write the test file with some content and a mode.

        @param mode: The file's permission bits.
        """
        with open(self.path, "wb") as f:
            f.write(b"secret")
        os.chmod(self.path, mode)

    def test_reads(self) -> None:
        """
        A file only its owner can access is opened for reading bytes.
        """
        self.writeFile(0o600)
        with openPrivateFile(self.path) as f:
            self.assertEqual(f.read(), b"secret")

    def test_ownerReadOnly(self) -> None:
        """
        A file its owner can only read is accepted too.
        """
        self.writeFile(0o400)
        with openPrivateFile(self.path) as f:
            self.assertEqual(f.read(), b"secret")

    def test_missing(self) -> None:
        """
        A missing file gives L{FileNotFoundError}.
        """
        self.assertRaises(FileNotFoundError, openPrivateFile, self.path)

    def test_groupOrOthers(self) -> None:
        """
        A file its group or other users can read or write gives L{PermissionsTooOpenError}, an
        L{OSError} carrying the file's mode.
        """
        for mode in (0o640, 0o620, 0o604, 0o602, 0o644, 0o666):
            self.writeFile(mode)
            error = self.assertRaises(PermissionsTooOpenError, openPrivateFile, self.path)
            self.assertIsInstance(error, OSError)
            self.assertEqual(error.mode, mode)
            self.assertEqual(error.filename, self.path)

    def test_notRegularFile(self) -> None:
        """
        A directory gives L{NotRegularFileError}, an L{OSError}.
        """
        os.mkdir(self.path, 0o700)
        error = self.assertRaises(NotRegularFileError, openPrivateFile, self.path)
        self.assertIsInstance(error, OSError)

    def test_refusalClosesFile(self) -> None:
        """
        A refused file is not left open.
        """
        self.writeFile(0o644)
        closed = []
        realClose = os.close

        def close(fd: int) -> None:
            closed.append(fd)
            realClose(fd)

        self.patch(os, "close", close)
        self.assertRaises(PermissionsTooOpenError, openPrivateFile, self.path)
        self.assertEqual(len(closed), 1)
