"""The file operations a workload uses, for each kind of target.

Workloads are written once against :class:`FileOps` and run unchanged on

* :class:`EngineOps`: the pnova engine called directly (paths are walked
  from the root with ``lookup_ino``, name by name, as the kernel walks them
  for a system call: inode numbers only, no attributes of the directories on
  the way);
* :class:`PosixOps`: any directory, through real system calls (a pnova mount,
  tmpfs, ext4, ...), optionally with ``O_DIRECT`` for data files.

Paths are relative to the run's own directory and use ``/``.  Handles are
whatever the target uses (an inode number, a file descriptor).  Data buffers
come from :meth:`FileOps.buffer`, so that they are page aligned where direct
I/O needs it.
"""
from __future__ import annotations

import errno
import mmap
import os
import stat as st
from typing import Any, Protocol

from pnova.engine import FileSystem
from pnova.errors import FsError

ROOT_INO = 1


class FileOps(Protocol):
    """What a workload may do; every path is relative to the run's directory."""

    direct: bool

    def buffer(self, size: int) -> Any:
        """A writable buffer of ``size`` zero bytes, aligned for direct I/O."""

    def mkdir(self, path: str) -> None:
        """Create a directory."""

    def create(self, path: str, data: bool = False) -> Any:
        """Create (or truncate) a regular file, open for reading and writing."""

    def open(self, path: str, data: bool = False) -> Any:
        """Open an existing regular file for reading and writing.

        ``data``: the handle is used for data I/O (direct I/O applies to it).
        """

    def close(self, h: Any) -> None:
        """Release a handle."""

    def pwrite(self, h: Any, buf: Any, off: int) -> int:
        """Write ``buf`` at ``off``; return the bytes written."""

    def pread_into(self, h: Any, buf: Any, off: int) -> int:
        """Read into ``buf`` from ``off``; return the bytes read."""

    def fsync(self, h: Any) -> None:
        """Make the file durable."""

    def ftruncate(self, h: Any, size: int) -> None:
        """Set a file's size."""

    def size(self, h: Any) -> int:
        """A file's size in bytes."""

    def stat(self, path: str) -> int:
        """stat(2) a path; returns its mode."""

    def unlink(self, path: str) -> None:
        """Remove a file."""

    def rename(self, old: str, new: str) -> None:
        """Rename (replacing ``new`` if it exists)."""

    def listdir(self, path: str) -> list[str]:
        """The names in a directory, without '.' and '..'."""


def read(fops: FileOps, h: Any, size: int, off: int) -> bytes:
    """Up to ``size`` bytes at ``off`` (for checks after a run, not for timed ops)."""
    buf = fops.buffer(size)
    n = fops.pread_into(h, buf, off)
    return bytes(memoryview(buf)[:n])


def _oserror(e: FsError, path: str | None = None) -> OSError:
    return OSError(e.errno, os.strerror(e.errno), path) if path else \
        OSError(e.errno, os.strerror(e.errno))


class EngineOps:
    """:class:`FileOps` on a mounted :class:`pnova.engine.FileSystem`; handles are inodes.

    Errors come out as :class:`OSError`, as from the system calls of
    :class:`PosixOps`, so that a workload sees one kind of failure.
    """

    direct = True                  # the engine has no page cache: every op reaches the device

    def __init__(self, fs: FileSystem) -> None:
        self.fs = fs

    def _walk(self, path: str) -> tuple[int, bytes]:
        """(parent inode, last name) of ``path``."""
        parent = ROOT_INO
        *dirs, last = path.split("/")
        for name in dirs:
            parent = self.fs.lookup_ino(parent, name.encode())
        return parent, last.encode()

    def _ino(self, path: str) -> int:
        if not path:
            return ROOT_INO                      # "" is the base directory, as on PosixOps
        parent, name = self._walk(path)
        return self.fs.lookup(parent, name).ino

    def buffer(self, size: int) -> bytearray:
        return bytearray(size)

    def mkdir(self, path: str) -> None:
        try:
            parent, name = self._walk(path)
            self.fs.mkdir(parent, name, 0o755)
        except FsError as e:
            raise _oserror(e, path) from None

    def create(self, path: str, data: bool = False) -> int:
        try:
            parent, name = self._walk(path)
            try:
                return self.fs.create(parent, name, 0o644).ino
            except FsError as e:
                if e.errno != errno.EEXIST:
                    raise
                ino = self.fs.lookup(parent, name).ino
                self.fs.setattr(ino, size=0)          # O_CREAT | O_TRUNC
                return ino
        except FsError as e:
            raise _oserror(e, path) from None

    def open(self, path: str, data: bool = False) -> int:
        try:
            ino = self._ino(path)
        except FsError as e:
            raise _oserror(e, path) from None
        if st.S_ISDIR(self.fs.getattr(ino).mode):
            raise OSError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        return ino

    def close(self, h: int) -> None:
        pass                       # nothing is held per open file by the engine

    def pwrite(self, h: int, buf: Any, off: int) -> int:
        try:
            return self.fs.write(h, off, buf)
        except FsError as e:
            raise _oserror(e) from None

    def pread_into(self, h: int, buf: Any, off: int) -> int:
        try:
            data = self.fs.read(h, off, len(buf))
        except FsError as e:
            raise _oserror(e) from None
        n = len(data)
        buf[:n] = data
        return n

    def fsync(self, h: int) -> None:
        try:
            self.fs.fsync(h)
        except FsError as e:
            raise _oserror(e) from None

    def ftruncate(self, h: int, size: int) -> None:
        try:
            self.fs.setattr(h, size=size)
        except FsError as e:
            raise _oserror(e) from None

    def size(self, h: int) -> int:
        return self.fs.getattr(h).size

    def stat(self, path: str) -> int:
        try:
            return self.fs.getattr(self._ino(path)).mode
        except FsError as e:
            raise _oserror(e, path) from None

    def unlink(self, path: str) -> None:
        try:
            parent, name = self._walk(path)
            self.fs.unlink(parent, name)
        except FsError as e:
            raise _oserror(e, path) from None

    def rename(self, old: str, new: str) -> None:
        try:
            p1, n1 = self._walk(old)
            p2, n2 = self._walk(new)
            self.fs.rename(p1, n1, p2, n2)
        except FsError as e:
            raise _oserror(e, old) from None

    def listdir(self, path: str) -> list[str]:
        try:
            ino = self._ino(path) if path not in ("", ".") else ROOT_INO
            return [n.decode() for n, _, _ in self.fs.readdir(ino) if n not in (b".", b"..")]
        except FsError as e:
            raise _oserror(e, path) from None


class PosixOps:
    """:class:`FileOps` through system calls, under the directory ``base``; handles are fds."""

    def __init__(self, base: str, direct: bool = False) -> None:
        self.base = base
        self.direct = direct
        self._data_flags = os.O_RDWR | (os.O_DIRECT if direct else 0)

    def _p(self, path: str) -> str:
        return os.path.join(self.base, path)

    def buffer(self, size: int) -> mmap.mmap:
        # Anonymous mappings are page aligned, which O_DIRECT requires.
        return mmap.mmap(-1, max(size, 1))

    def mkdir(self, path: str) -> None:
        os.mkdir(self._p(path), 0o755)

    def create(self, path: str, data: bool = False) -> int:
        flags = (self._data_flags if data else os.O_RDWR) | os.O_CREAT | os.O_TRUNC
        return os.open(self._p(path), flags, 0o644)

    def open(self, path: str, data: bool = False) -> int:
        return os.open(self._p(path), self._data_flags if data else os.O_RDWR)

    def close(self, h: int) -> None:
        os.close(h)

    def pwrite(self, h: int, buf: Any, off: int) -> int:
        return os.pwrite(h, buf, off)

    def pread_into(self, h: int, buf: Any, off: int) -> int:
        return os.preadv(h, [buf], off)

    def fsync(self, h: int) -> None:
        os.fsync(h)

    def ftruncate(self, h: int, size: int) -> None:
        os.ftruncate(h, size)

    def size(self, h: int) -> int:
        return os.fstat(h).st_size

    def stat(self, path: str) -> int:
        return os.stat(self._p(path)).st_mode

    def unlink(self, path: str) -> None:
        os.unlink(self._p(path))

    def rename(self, old: str, new: str) -> None:
        os.rename(self._p(old), self._p(new))

    def listdir(self, path: str) -> list[str]:
        return os.listdir(self._p(path))
