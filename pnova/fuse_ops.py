"""FUSE request handlers: translate pyfuse3 requests into :class:`FileSystem` calls.

This module holds no filesystem logic.  Each handler unpacks a request, calls
the engine and packs the answer.  Errors cross the boundary in one place
(:func:`_request`): an engine :class:`FsError` becomes ``FUSEError(errno)``;
any other exception is logged with its traceback and becomes ``EIO``, because
an exception escaping a handler would end ``pyfuse3.main()`` and leave a dead
mount behind.

Kernel lookup counts follow the FUSE rules: every reply that hands an inode to
the kernel (lookup, create, mknod, mkdir, symlink, link and each readdirplus
entry other than '.' and '..') adds one reference in the engine; ``forget``
drops them.  The engine frees an unlinked inode only once both its link count
and its references are zero, so open-but-unlinked files keep working.
"""
from __future__ import annotations

import errno
import functools
import logging
import os
from typing import Any, Awaitable, Callable, Concatenate, ParamSpec, Sequence, TypeVar

import pyfuse3
from pyfuse3 import EntryAttributes, FileInfo, FUSEError, StatvfsData

from .engine import Attr, FileSystem
from .errors import FsError

log = logging.getLogger("pnova.fuse")

# The daemon is the only writer to the filesystem, so what the kernel caches
# can only go stale through requests that pass through here, and the kernel
# itself invalidates what those requests change (link counts on unlink and
# rename, the parent directory on create/remove, sizes on write).  A long
# timeout therefore costs no correctness and saves a LOOKUP per path component
# on every path walk.
CACHE_TIMEOUT = 10.0

_P = ParamSpec("_P")
_T = TypeVar("_T")
_Self = TypeVar("_Self", bound="PnovaOperations")


def _short(args: tuple) -> str:
    """Arguments of a failed request for the log, without bulk data or contexts."""
    out = []
    for a in args:
        if isinstance(a, (bytes, bytearray, memoryview)) and len(a) > 64:
            out.append(f"<{len(a)} bytes>")
        elif isinstance(a, (int, bytes, str)) or a is None:
            out.append(repr(a))
        else:
            out.append(type(a).__name__)
    return ", ".join(out)


def _request(fn: Callable[Concatenate[_Self, _P], _T]
             ) -> Callable[Concatenate[_Self, _P], Awaitable[_T]]:
    """Turn a synchronous handler into a pyfuse3 coroutine with error translation.

    Handlers never await (every engine call is synchronous and short), so the
    wrapper runs the handler inline: one plain call per request, no extra
    coroutine.
    """
    name = fn.__name__

    @functools.wraps(fn)
    async def handler(self: _Self, *args: Any) -> _T:
        try:
            return fn(self, *args)
        except FsError as e:
            raise FUSEError(e.errno) from None
        except FUSEError:
            raise
        except Exception:
            log.exception("internal error in %s(%s); answering EIO", name, _short(args))
            raise FUSEError(errno.EIO) from None

    return handler  # type: ignore[return-value]


class PnovaOperations(pyfuse3.Operations):
    """pyfuse3 operations backed by one mounted :class:`FileSystem`."""

    # Write-through keeps every write(2) a durable engine write when it
    # returns, which is what a persistent-memory filesystem promises.
    enable_writeback_cache = False
    supports_dot_lookup = True

    def __init__(self, fs: FileSystem, *, on_init: Callable[[], None] | None = None,
                 timeout: float = CACHE_TIMEOUT) -> None:
        super().__init__()
        self.fs = fs
        self.on_init = on_init
        self.timeout = timeout
        # A reply for a name that does not exist: the kernel caches the
        # negative entry for entry_timeout (safe: every create goes through us).
        neg = EntryAttributes()
        neg.st_ino = 0
        neg.entry_timeout = timeout
        self._negative = neg

    # ------------------------------------------------------------ helpers
    def _entry(self, a: Attr) -> EntryAttributes:
        e = EntryAttributes()
        e.st_ino = a.ino
        e.generation = a.generation
        e.entry_timeout = self.timeout
        e.attr_timeout = self.timeout
        e.st_mode = a.mode
        e.st_nlink = a.nlink
        e.st_uid = a.uid
        e.st_gid = a.gid
        e.st_rdev = a.rdev
        e.st_size = a.size
        e.st_blksize = 4096
        e.st_blocks = a.blocks
        e.st_atime_ns = a.atime_ns
        e.st_mtime_ns = a.mtime_ns
        e.st_ctime_ns = a.ctime_ns
        return e

    def _handed_out(self, a: Attr) -> EntryAttributes:
        """Reply for a request that gives the kernel one more reference to ``a``."""
        self.fs.ref(a.ino)
        return self._entry(a)

    # ------------------------------------------------------------ lifecycle
    def init(self) -> None:
        """FUSE_INIT processed: the filesystem now answers requests."""
        if self.on_init is not None:
            try:
                self.on_init()
            except Exception:            # init must not raise (pyfuse3 contract)
                log.exception("start-up notification failed")

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        # No reply goes back for FORGET, so nothing may escape.
        fs = self.fs
        for ino, n in inode_list:
            try:
                fs.forget(ino, n)
            except Exception:
                log.exception("internal error in forget(%d, %d)", ino, n)

    # ------------------------------------------------------------ namespace
    @_request
    def lookup(self, parent_inode: int, name: bytes, ctx: Any) -> EntryAttributes:
        try:
            a = self.fs.lookup(parent_inode, name)
        except FsError as e:
            if e.errno == errno.ENOENT:
                return self._negative
            raise
        return self._handed_out(a)

    @_request
    def getattr(self, inode: int, ctx: Any) -> EntryAttributes:
        return self._entry(self.fs.getattr(inode))

    @_request
    def setattr(self, inode: int, attr: EntryAttributes, fields: Any, fh: int | None,
                ctx: Any) -> EntryAttributes:
        a = self.fs.setattr(
            inode,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=attr.st_size if fields.update_size else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            ctime_ns=attr.st_ctime_ns if fields.update_ctime else None)
        return self._entry(a)

    @_request
    def readlink(self, inode: int, ctx: Any) -> bytes:
        return self.fs.readlink(inode)

    @_request
    def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
              ctx: Any) -> EntryAttributes:
        return self._handed_out(self.fs.mknod(parent_inode, name, mode, rdev, ctx.uid, ctx.gid))

    @_request
    def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> EntryAttributes:
        return self._handed_out(self.fs.mkdir(parent_inode, name, mode, ctx.uid, ctx.gid))

    @_request
    def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        self.fs.unlink(parent_inode, name)

    @_request
    def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        self.fs.rmdir(parent_inode, name)

    @_request
    def symlink(self, parent_inode: int, name: bytes, target: bytes,
                ctx: Any) -> EntryAttributes:
        return self._handed_out(self.fs.symlink(parent_inode, name, target, ctx.uid, ctx.gid))

    @_request
    def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
               name_new: bytes, flags: int, ctx: Any) -> None:
        # pyfuse3's RENAME_NOREPLACE / RENAME_EXCHANGE are the kernel's 1 / 2,
        # the values the engine takes.
        self.fs.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)

    @_request
    def link(self, inode: int, new_parent_inode: int, new_name: bytes,
             ctx: Any) -> EntryAttributes:
        return self._handed_out(self.fs.link(inode, new_parent_inode, new_name))

    # ------------------------------------------------------------ files
    @_request
    def open(self, inode: int, flags: int, ctx: Any) -> FileInfo:
        # libfuse negotiates atomic O_TRUNC: the kernel leaves the truncation
        # of open(O_TRUNC) to this request instead of sending a SETATTR.
        if flags & os.O_TRUNC:
            self.fs.setattr(inode, size=0)
        # The file handle is the inode number: the engine keeps no per-open
        # state.  keep_cache: only this daemon changes files, so cached pages
        # stay valid across opens.
        return FileInfo(fh=inode, keep_cache=True)

    @_request
    def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
               ctx: Any) -> tuple[FileInfo, EntryAttributes]:
        a = self.fs.create(parent_inode, name, mode, ctx.uid, ctx.gid)
        return FileInfo(fh=a.ino, keep_cache=True), self._handed_out(a)

    @_request
    def read(self, fh: int, off: int, size: int) -> bytes:
        return self.fs.read(fh, off, size)

    @_request
    def write(self, fh: int, off: int, buf: bytes) -> int:
        return self.fs.write(fh, off, buf)

    @_request
    def flush(self, fh: int) -> None:
        # Every write is durable when it returns, so close(2) has nothing to
        # do; ENOSYS tells the kernel to stop sending FLUSH at all.
        raise FUSEError(errno.ENOSYS)

    @_request
    def release(self, fh: int) -> None:
        pass

    @_request
    def fsync(self, fh: int, datasync: bool) -> None:
        self.fs.fsync(fh)

    # ------------------------------------------------------------ directories
    @_request
    def opendir(self, inode: int, ctx: Any) -> int:
        return inode                         # readdir checks that it is a directory

    @_request
    def readdir(self, fh: int, start_id: int, token: Any) -> None:
        fs = self.fs
        reply = pyfuse3.readdir_reply
        for name, ino, next_id in fs.readdir(fh, start_id):
            if not reply(token, name, self._entry(fs.getattr(ino)), next_id):
                break
            # readdirplus hands each entry to the kernel, except '.' and '..'
            # which the kernel neither links nor counts.
            if name != b"." and name != b"..":
                fs.ref(ino)

    @_request
    def releasedir(self, fh: int) -> None:
        pass

    @_request
    def fsyncdir(self, fh: int, datasync: bool) -> None:
        self.fs.fsync(fh)

    # ------------------------------------------------------------ xattrs
    @_request
    def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        self.fs.setxattr(inode, name, value)

    @_request
    def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        # The kernel asks for security.capability before every write(2).  The
        # engine stores user.* names only, so anything else is answered here
        # without touching it.
        if not name.startswith(b"user."):
            raise FUSEError(errno.ENODATA)
        return self.fs.getxattr(inode, name)

    @_request
    def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        return self.fs.listxattr(inode)

    @_request
    def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        self.fs.removexattr(inode, name)

    # ------------------------------------------------------------ statfs
    @_request
    def statfs(self, ctx: Any) -> StatvfsData:
        s = self.fs.statfs()
        d = StatvfsData()
        d.f_bsize = d.f_frsize = s.bsize
        d.f_blocks = s.blocks
        d.f_bfree = s.bfree
        d.f_bavail = s.bavail
        d.f_files = s.files
        d.f_ffree = d.f_favail = s.ffree
        d.f_namemax = s.namemax
        return d
