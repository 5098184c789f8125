"""FUSE request handlers: decode a request, call :class:`FileSystem`, encode the reply.

This module holds no filesystem logic.  Each handler takes the request's inode
number, its body (a view of the request after the 40-byte header) and the
caller's uid and gid, and returns the reply's payload; an engine
:class:`~pnova.errors.FsError` becomes the reply's errno in the request loop
(:mod:`pnova.fuse_session`), which also turns any other exception into EIO.

Kernel lookup counts follow the FUSE rules: every reply that hands an inode to
the kernel (lookup, create, mknod, mkdir, symlink, link and each readdirplus
entry other than '.' and '..') adds one reference in the engine; FORGET drops
them.  The counts live in the shared area, so a FORGET may reach another
serving process than the LOOKUP did.  The engine frees an unlinked inode only
once both its link count and its references are zero, so open-but-unlinked
files keep working.

Privileges: the mount takes over suid/sgid and capability dropping from the
kernel (HANDLE_KILLPRIV_V2).  The kernel marks a write, truncate or open(O_TRUNC)
whose caller lacks CAP_FSETID, and every chown, and the engine drops the bits in
the same commit as the change (see ``FileSystem.write`` and ``setattr``).
"""
from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable

from . import fuse_wire as W
from .engine import Attr, FileSystem, Landing
from .errors import FsError
from .xattr import SCRUB_XATTR

log = logging.getLogger("pnova.fuse")

# The daemon's processes are the only writers to the filesystem, so what the
# kernel caches can only go stale through requests that pass through them, and
# the kernel itself invalidates what those requests change (link counts on
# unlink and rename, the parent directory on create/remove, sizes on write).
# A long timeout therefore costs no correctness and saves a LOOKUP per path
# component on every path walk and a GETATTR before many writes.
CACHE_TIMEOUT = 10.0

_EMPTY = b""
# a readdirplus entry that hands the kernel no inode (fuse_entry_out, node id 0)
_NO_ENTRY = bytes(W.ENTRY_OUT_SIZE)
# what a caller asking for the size of the scrub's answer is told (asking
# scrubs nothing: the answer is shorter than this)
SCRUB_ANSWER_MAX = 256
# keep_cache: only this daemon changes files, so cached pages stay valid
# across opens.  noflush: every write is durable when it returns, so close(2)
# has nothing to flush.
_CACHED_OPEN = W.FOPEN_KEEP_CACHE | W.FOPEN_NOFLUSH
# An O_DIRECT open is served as direct I/O, which lets the kernel send its
# writes to the daemon in parallel (it allows parallel direct writes to one
# file only for direct-I/O opens): the engine's range locks order the writers,
# the kernel's inode lock need not.
_DIRECT_OPEN = W.FOPEN_DIRECT_IO | W.FOPEN_PARALLEL_DIRECT_WRITES | W.FOPEN_NOFLUSH
# Under the inode scheme (NOVA's baseline) a file's writes are serialised for
# their whole length, as NOVA's VFS inode lock serialises them: through the
# mount that lock is the kernel's own, held from the request to its reply, so
# its direct opens do not ask for parallel writes.  The engine's inode lock
# then only orders this mount's processes against each other.
_SERIAL_DIRECT_OPEN = W.FOPEN_DIRECT_IO | W.FOPEN_NOFLUSH


def _member(gid: int, pid: int) -> Callable[[int], bool]:
    """Whether the caller of a request belongs to a group: its own group, or one of
    its supplementary groups (read from /proc only when asked, which is rare: a
    set-group-ID file that is not group-executable)."""
    def in_group(group: int) -> bool:
        if group == gid:
            return True
        try:
            with open(f"/proc/{pid}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"Groups:"):
                        return str(group).encode() in line.split()[1:]
        except OSError:
            pass                     # the caller is gone: not a member
        return False
    return in_group


def _name(body: memoryview) -> bytes:
    """The zero-terminated name that makes up a request's body."""
    return bytes(body[:-1]) if body[-1:] == b"\0" else bytes(body)


class PnovaOperations:
    """The handlers of one serving process, backed by its :class:`FileSystem`."""

    def __init__(self, fs: FileSystem, *, timeout: float = CACHE_TIMEOUT) -> None:
        self.fs = fs
        # Where large writes' data is received in place (fuse_session.Loop)
        self.landing: Landing | None = None if fs.readonly else Landing(fs)
        sec, nsec = W.split_timeout(timeout)
        # Every entry and attribute reply starts the same way but for the inode.
        self._valid = (sec, sec, nsec, nsec)
        self._attr_head = W.ATTR_OUT_HEAD.pack(sec, nsec, 0)
        # A reply for a name that does not exist: the kernel caches the
        # negative entry for the timeout (safe: every create goes through us).
        self._negative = W.ENTRY_HEAD.pack(0, 0, sec, 0, nsec, 0) + bytes(W.ATTR.size)
        self._direct_open = _SERIAL_DIRECT_OPEN if fs.lock_name == "inode" else _DIRECT_OPEN
        t = [None] * 64
        for op, fn in ((W.LOOKUP, self.lookup), (W.FORGET, self.forget),
                       (W.BATCH_FORGET, self.batch_forget), (W.GETATTR, self.getattr),
                       (W.SETATTR, self.setattr), (W.READLINK, self.readlink),
                       (W.SYMLINK, self.symlink), (W.MKNOD, self.mknod), (W.MKDIR, self.mkdir),
                       (W.UNLINK, self.unlink), (W.RMDIR, self.rmdir), (W.RENAME, self.rename),
                       (W.RENAME2, self.rename2), (W.LINK, self.link), (W.OPEN, self.open),
                       (W.CREATE, self.create), (W.READ, self.read), (W.WRITE, self.write),
                       (W.STATFS, self.statfs), (W.RELEASE, self.release),
                       (W.FSYNC, self.fsync), (W.SETXATTR, self.setxattr),
                       (W.GETXATTR, self.getxattr), (W.LISTXATTR, self.listxattr),
                       (W.REMOVEXATTR, self.removexattr), (W.OPENDIR, self.opendir),
                       (W.READDIR, self.readdir), (W.READDIRPLUS, self.readdirplus),
                       (W.RELEASEDIR, self.release), (W.FSYNCDIR, self.fsync),
                       (W.SYNCFS, self.syncfs), (W.DESTROY, self.destroy),
                       (W.INTERRUPT, self.interrupt)):
            t[op] = fn
        # FLUSH: every write is durable when it returns, so close(2) has
        # nothing to do; no handler means ENOSYS, and the kernel stops sending it.
        self.table = t

    # ------------------------------------------------------------ replies
    @staticmethod
    def _attr(a: Attr) -> bytes:
        return W.attr_bytes(a.ino, a.size, a.blocks, a.atime_ns, a.mtime_ns, a.ctime_ns,
                            a.mode, a.nlink, a.uid, a.gid, a.rdev)

    def _entry(self, a: Attr) -> bytes:
        return W.ENTRY_HEAD.pack(a.ino, a.generation, *self._valid) + self._attr(a)

    def _handed_out(self, a: Attr) -> bytes:
        """Reply for a request that gives the kernel one more reference to ``a``."""
        self.fs.ref(a.ino, generation=a.generation)
        return self._entry(a)

    def _attr_out(self, a: Attr) -> bytes:
        return self._attr_head + self._attr(a)

    # ------------------------------------------------------------ lifecycle
    def forget(self, ino: int, body: memoryview, uid: int, gid: int,
            pid: int) -> None:
        self._forget(ino, W.FORGET_IN.unpack_from(body)[0])

    def batch_forget(self, ino: int, body: memoryview, uid: int, gid: int,
            pid: int) -> None:
        count, _ = W.BATCH_FORGET_IN.unpack_from(body)
        for i in range(count):
            self._forget(*W.FORGET_ONE.unpack_from(body, 8 + 16 * i))

    def _forget(self, ino: int, n: int) -> None:
        # No reply goes back for a FORGET, so nothing may escape.
        try:
            self.fs.forget(ino, n)
        except Exception:
            log.exception("internal error in forget(%d, %d)", ino, n)

    def interrupt(self, ino: int, body: memoryview, uid: int, gid: int,
            pid: int) -> None:
        # Requests are served to the end without waiting: nothing to interrupt.
        return None

    def destroy(self, ino: int, body: memoryview, uid: int, gid: int,
            pid: int) -> bytes:
        return _EMPTY

    # ------------------------------------------------------------ namespace
    def lookup(self, parent: int, body: memoryview, uid: int, gid: int,
            pid: int) -> bytes:
        try:
            a = self.fs.lookup(parent, _name(body))
        except FsError as e:
            if e.errno == errno.ENOENT:
                return self._negative
            raise
        return self._handed_out(a)

    def getattr(self, ino: int, body: memoryview, uid: int, gid: int,
            pid: int) -> bytes:
        return self._attr_out(self.fs.getattr(ino))

    def setattr(self, ino: int, body: memoryview, uid: int, gid: int,
            pid: int) -> bytes:
        (valid, _, _fh, size, _lo, atime, mtime, ctime, atimensec, mtimensec, ctimensec,
         mode, _, new_uid, new_gid, _) = W.SETATTR_IN.unpack_from(body)
        now = time.time_ns() if valid & (W.FATTR_ATIME_NOW | W.FATTR_MTIME_NOW) else 0
        a = self.fs.setattr(
            ino,
            mode=mode & 0o7777 if valid & W.FATTR_MODE else None,
            uid=new_uid if valid & W.FATTR_UID else None,
            gid=new_gid if valid & W.FATTR_GID else None,
            size=size if valid & W.FATTR_SIZE else None,
            atime_ns=now if valid & W.FATTR_ATIME_NOW else
            atime * 1_000_000_000 + atimensec if valid & W.FATTR_ATIME else None,
            mtime_ns=now if valid & W.FATTR_MTIME_NOW else
            mtime * 1_000_000_000 + mtimensec if valid & W.FATTR_MTIME else None,
            ctime_ns=ctime * 1_000_000_000 + ctimensec if valid & W.FATTR_CTIME else None,
            kill_suidgid=bool(valid & W.FATTR_KILL_SUIDGID), in_group=_member(gid, pid))
        return self._attr_out(a)

    def readlink(self, ino: int, body: memoryview, uid: int, gid: int,
            pid: int) -> bytes:
        return self.fs.readlink(ino)

    def mknod(self, parent: int, body: memoryview, uid: int, gid: int,
            pid: int) -> bytes:
        mode, rdev, _umask, _ = W.MKNOD_IN.unpack_from(body)
        return self._handed_out(self.fs.mknod(parent, _name(body[W.MKNOD_IN.size:]), mode,
                                              rdev, uid, gid))

    def mkdir(self, parent: int, body: memoryview, uid: int, gid: int,
            pid: int) -> bytes:
        mode, _umask = W.MKDIR_IN.unpack_from(body)
        return self._handed_out(self.fs.mkdir(parent, _name(body[W.MKDIR_IN.size:]), mode,
                                              uid, gid))

    def unlink(self, parent: int, body: memoryview, uid: int, gid: int,
            pid: int) -> bytes:
        self.fs.unlink(parent, _name(body))
        return _EMPTY

    def rmdir(self, parent: int, body: memoryview, uid: int, gid: int,
            pid: int) -> bytes:
        self.fs.rmdir(parent, _name(body))
        return _EMPTY

    def symlink(self, parent: int, body: memoryview, uid: int, gid: int,
            pid: int) -> bytes:
        name, target = W.cstrings(body, 0, len(body), 2)
        return self._handed_out(self.fs.symlink(parent, name, target, uid, gid))

    def rename(self, parent: int, body: memoryview, uid: int, gid: int,
            pid: int) -> bytes:
        (newdir,) = W.RENAME_IN.unpack_from(body)
        old, new = W.cstrings(body, W.RENAME_IN.size, len(body), 2)
        self.fs.rename(parent, old, newdir, new, 0)
        return _EMPTY

    def rename2(self, parent: int, body: memoryview, uid: int, gid: int,
            pid: int) -> bytes:
        # RENAME_NOREPLACE / RENAME_EXCHANGE are the kernel's 1 / 2, the
        # values the engine takes.
        newdir, flags, _ = W.RENAME2_IN.unpack_from(body)
        old, new = W.cstrings(body, W.RENAME2_IN.size, len(body), 2)
        self.fs.rename(parent, old, newdir, new, flags)
        return _EMPTY

    def link(self, ino: int, body: memoryview, uid: int, gid: int,
            pid: int) -> bytes:
        (old,) = W.LINK_IN.unpack_from(body)
        return self._handed_out(self.fs.link(old, ino, _name(body[W.LINK_IN.size:])))

    # ------------------------------------------------------------ files
    def open(self, ino: int, body: memoryview, uid: int, gid: int,
            pid: int) -> bytes:
        flags, open_flags = W.OPEN_IN.unpack_from(body)
        # ATOMIC_O_TRUNC: the kernel leaves the truncation of open(O_TRUNC) to
        # this request instead of sending a SETATTR.
        if flags & os.O_TRUNC:
            self.fs.setattr(ino, size=0, kill_suidgid=bool(open_flags & W.OPEN_KILL_SUIDGID),
                            in_group=_member(gid, pid))
        else:
            self.fs.getattr(ino)                 # the inode must exist
        # The file handle is the inode number: the engine keeps no per-open state.
        return W.OPEN_OUT.pack(ino, self._direct_open if flags & os.O_DIRECT else _CACHED_OPEN, 0)

    def create(self, parent: int, body: memoryview, uid: int, gid: int,
            pid: int) -> bytes:
        flags, mode, _umask, _open_flags = W.CREATE_IN.unpack_from(body)
        a = self.fs.create(parent, _name(body[W.CREATE_IN.size:]), mode, uid, gid)
        return self._handed_out(a) + W.OPEN_OUT.pack(
            a.ino, self._direct_open if flags & os.O_DIRECT else _CACHED_OPEN, 0)

    def read(self, ino: int, body: memoryview, uid: int, gid: int,
            pid: int) -> bytes:
        _fh, off, size, _, _, flags, _ = W.READ_IN.unpack_from(body)
        data = self.fs.read(ino, off, size)
        if len(data) < size and not flags & os.O_DIRECT and \
                off + len(data) < self.fs.getattr(ino).size:
            # Damaged data past this point (a short read of the engine): the
            # kernel would take a short reply into its page cache as the end
            # of the file and read the file back shorter without an error.
            raise FsError(errno.EIO)
        return data

    def write(self, ino: int, body: memoryview, uid: int, gid: int,
            pid: int) -> bytes:
        _fh, off, size, wflags, _, _, _ = W.WRITE_IN.unpack_from(body)
        data = body[W.WRITE_IN_SIZE:W.WRITE_IN_SIZE + size]
        landing = self.landing
        if len(data) < size:                 # it arrived in the landing's blocks
            data = landing.data(size)
        if wflags & W.WRITE_KILL_SUIDGID:
            n = self.fs.write(ino, off, data, kill_suidgid=True, in_group=_member(gid, pid))
        else:
            n = self.fs.write(ino, off, data)
        if landing is not None:
            landing.expect(off, size)
        return W.WRITE_OUT.pack(n, 0)

    def release(self, ino: int, body: memoryview, uid: int, gid: int,
            pid: int) -> bytes:
        return _EMPTY

    def fsync(self, ino: int, body: memoryview, uid: int, gid: int,
            pid: int) -> bytes:
        self.fs.fsync(ino)
        return _EMPTY

    def syncfs(self, ino: int, body: memoryview, uid: int, gid: int,
            pid: int) -> bytes:
        self.fs.fsync(ino)
        return _EMPTY

    # ------------------------------------------------------------ directories
    def opendir(self, ino: int, body: memoryview, uid: int, gid: int,
            pid: int) -> bytes:
        if not self.fs.getattr(ino).mode & 0o040000:
            raise FsError(errno.ENOTDIR)
        return W.OPEN_OUT.pack(ino, 0, 0)

    def readdir(self, ino: int, body: memoryview, uid: int, gid: int,
            pid: int) -> bytes:
        _fh, off, size, _, _, _, _ = W.READ_IN.unpack_from(body)
        out = bytearray()
        for name, child, next_off in self.fs.readdir(ino, off, limit=size // 32 + 1):
            a = self._listed_attr(child)
            d = W.dirent(child, next_off, name, 0 if a is None else (a.mode & W.S_IFMT) >> 12)
            if len(out) + len(d) > size:
                break
            out += d
        return out

    def readdirplus(self, ino: int, body: memoryview, uid: int, gid: int,
            pid: int) -> bytes:
        _fh, off, size, _, _, _, _ = W.READ_IN.unpack_from(body)
        fs = self.fs
        out = bytearray()
        for name, child, next_off in fs.readdir(ino, off, limit=size // 160 + 1):
            a = self._listed_attr(child)
            if a is None:
                # listed by name alone: node id 0 hands the kernel no inode
                d = _NO_ENTRY + W.dirent(child, next_off, name, 0)
            else:
                d = self._entry(a) + W.dirent(child, next_off, name, (a.mode & W.S_IFMT) >> 12)
            if len(out) + len(d) > size:
                break
            # readdirplus hands each entry to the kernel, except '.' and '..'
            # which the kernel neither links nor counts.
            if a is not None and name != b"." and name != b"..":
                try:
                    fs.ref(child, generation=a.generation)
                except FsError:
                    continue                     # removed since: as if listed after
            out += d
        return out

    def _listed_attr(self, child: int) -> Attr | None:
        """The attributes of a directory entry's inode, or None when that inode
        does not read back (EIO): a listing still names it, with no inode and
        an unknown type, so that a damaged file costs that file, not its
        directory's listing; a lookup of it answers EIO."""
        try:
            return self.fs.getattr(child)
        except FsError as e:
            if e.errno != errno.EIO:
                raise
            return None

    # ------------------------------------------------------------ xattrs
    def setxattr(self, ino: int, body: memoryview, uid: int, gid: int,
            pid: int) -> bytes:
        size, flags = W.SETXATTR_IN.unpack_from(body)
        rest = bytes(body[W.SETXATTR_IN.size:])
        end = rest.find(b"\0")
        if end < 0 or len(rest) < end + 1 + size:
            raise FsError(errno.EINVAL)
        self.fs.setxattr(ino, rest[:end], rest[end + 1:end + 1 + size], flags)
        return _EMPTY

    def getxattr(self, ino: int, body: memoryview, uid: int, gid: int,
            pid: int) -> bytes:
        size, _ = W.GETXATTR_IN.unpack_from(body)
        name = _name(body[W.GETXATTR_IN.size:])
        if name == SCRUB_XATTR:
            # the scrub's request (pnova-scrub): check the inode's metadata
            # as the device holds it, and a file's checksum copies and parity
            # as well as its data, and say what was found
            if size == 0:
                return W.GETXATTR_OUT.pack(SCRUB_ANSWER_MAX, 0)
            return self._sized(self.fs.scrub(ino).wire(), size)
        return self._sized(self.fs.getxattr(ino, name), size)

    def listxattr(self, ino: int, body: memoryview, uid: int, gid: int,
            pid: int) -> bytes:
        size, _ = W.GETXATTR_IN.unpack_from(body)
        return self._sized(b"".join(n + b"\0" for n in self.fs.listxattr(ino)), size)

    @staticmethod
    def _sized(value: bytes, size: int) -> bytes:
        """A get/listxattr answer: the length when asked with size 0, ERANGE when
        the caller's buffer is too small."""
        if size == 0:
            return W.GETXATTR_OUT.pack(len(value), 0)
        if len(value) > size:
            raise FsError(errno.ERANGE)
        return value

    def removexattr(self, ino: int, body: memoryview, uid: int, gid: int,
            pid: int) -> bytes:
        self.fs.removexattr(ino, _name(body))
        return _EMPTY

    # ------------------------------------------------------------ statfs
    def statfs(self, ino: int, body: memoryview, uid: int, gid: int,
            pid: int) -> bytes:
        s = self.fs.statfs()
        return W.STATFS_OUT.pack(s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize,
                                 s.namemax, s.bsize, 0)
