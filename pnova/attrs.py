"""Attributes: stat, chmod / chown / truncate / utimens, and the privilege
drop Linux applies when a file's contents or owner change.
"""
from __future__ import annotations

import errno
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass

from . import layout as L
from .errors import FsError
from .inode import Inode
from .xattr import CAPS_XATTR


SUIDGID = stat.S_ISUID | stat.S_ISGID


@dataclass(slots=True)
class Attr:
    """What stat(2) reports for an inode."""
    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    blocks: int          # 512-byte units
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    generation: int


class Attributes:
    """Reading and changing inode attributes."""

    def attr(self, inode: Inode) -> Attr:
        if inode.pages is not None:
            blocks = len(inode.pages) * (L.BLOCK // 512)
            size = inode.size
        else:
            blocks = len(inode.log_pages) * (L.BLOCK // 512)
            size = L.BLOCK
        return Attr(inode.ino, inode.mode, inode.nlink, inode.uid, inode.gid, inode.rdev,
                    size, blocks, inode.atime, inode.mtime, inode.ctime, inode.generation)

    def getattr(self, ino: int) -> Attr:
        attr = self.attr(self.get(ino))
        if self._repair_wanted:
            self._compact_pending()              # its log was read around damage
        return attr

    def setattr(self, ino: int, *, mode: int | None = None, uid: int | None = None,
                gid: int | None = None, size: int | None = None, atime_ns: int | None = None,
                mtime_ns: int | None = None, ctime_ns: int | None = None,
                kill_suidgid: bool = False,
                in_group: Callable[[int], bool] | None = None) -> Attr:
        """chmod / chown / truncate / utimens; ctime always moves.

        A size change holds the size lock and a write lock over the pages
        between the old and the new end.  A truncate, and a chown of anything
        but a directory, drop the file's capabilities; ``kill_suidgid`` (a
        chown, or a truncate by a caller without CAP_FSETID) drops its
        set-user-ID bit and its set-group-ID bit as :meth:`_privilege_drop` says.
        """
        self._rw()
        args = (mode, uid, gid, size, atime_ns, mtime_ns, ctime_ns, kill_suidgid, in_group)
        inode = self.get(ino)
        if size is None:
            # No lock keeps writers away from a mode or owner change, so its
            # epoch is odd while the change is made: a process that dies in
            # between leaves it odd, and nobody trusts it (DESIGN 19.7).
            self._bump_epoch(ino, 1)
            try:
                a = self._setattr_locked(inode, *args)
            finally:
                self._bump_epoch(ino, 1)         # a mode change matters to writers too
            if self._compact_wanted:             # (chmod, chown and touch grow logs too)
                self._compact_pending()
            return a
        if inode.is_dir:
            raise FsError(errno.EISDIR)
        if not 0 <= size <= L.MAX_FILE_SIZE:
            raise FsError(errno.EINVAL if size < 0 else errno.EFBIG)
        sch = self.scheme
        sch.size_lock(ino)
        try:
            inode = self.get(ino)
            lo, hi = sorted((size, inode.size))
            tok = sch.lock(ino, lo // L.BLOCK, hi // L.BLOCK, True)
            try:
                a = self._setattr_locked(self.get(ino), *args)
            finally:
                # Under the size lock: writers that skip catching up
                # (_current_for_write) see the size change coming.
                self._bump_epoch(ino)
                sch.unlock(tok)
        finally:
            sch.size_unlock(ino)
        if self._compact_wanted:
            self._compact_pending()
        return a

    def _bump_epoch(self, ino: int, by: int = 2) -> None:
        """Tell writers of other processes that skip catching up (see
        :meth:`_current_for_write`) that the size, mode or capabilities changed.
        Version words move by 2; a change made without a lock that keeps those
        writers out adds 1 before it and 1 after, so that its epoch is odd, and
        never trusted, while it is in flight."""
        if self.shared:
            self.area.w.add64(self.area.epoch_slot(ino), by)

    def _privilege_drop(self, inode: Inode, kill_suidgid: bool, now: int,
                        in_group: Callable[[int], bool] | None = None) -> list[tuple]:
        """Entries that take away what Linux takes away when a file's contents or
        owner change: its capabilities always; with ``kill_suidgid`` (a caller
        without CAP_FSETID, or any chown) its set-user-ID bit, and its
        set-group-ID bit if it is group-executable or the caller is not in the
        file's group (``in_group``; unknown counts as in it)."""
        out: list[tuple] = []
        if kill_suidgid and inode.mode & SUIDGID and not inode.is_dir:
            mode = inode.mode & ~stat.S_ISUID
            if mode & stat.S_IXGRP or (mode & stat.S_ISGID and in_group is not None
                                       and not in_group(inode.gid)):
                mode &= ~stat.S_ISGID
            if mode != inode.mode:
                out.append((L.E_SETATTR, 0, L.SA_MODE | L.SA_CTIME, mode & 0o7777, 0, 0, 0,
                            0, 0, now))
        if CAPS_XATTR in inode.xattrs:
            out.append((L.E_XATTR, 0, L.X_REMOVE, CAPS_XATTR, b"", now))
        return out

    def _setattr_locked(self, inode: Inode, mode, uid, gid, size, atime_ns, mtime_ns,
                        ctime_ns, kill_suidgid: bool = False,
                        in_group: Callable[[int], bool] | None = None) -> Attr:
        now = time.time_ns()
        mask = L.SA_CTIME
        entries: list[tuple] = []
        new_blocks: list[tuple[int, int]] = []
        if size is not None or ((uid is not None or gid is not None) and not inode.is_dir):
            # Linux: a truncate and a chown drop privileges before the change
            # (an explicit mode, from a kernel that computes the drop itself,
            # comes later in the same commit and wins)
            entries = self._privilege_drop(inode, kill_suidgid, now, in_group)
        if mode is not None:
            mask |= L.SA_MODE
        if uid is not None:
            mask |= L.SA_UID
        if gid is not None:
            mask |= L.SA_GID
        if atime_ns is not None:
            mask |= L.SA_ATIME
        if mtime_ns is not None:
            mask |= L.SA_MTIME
        if size is not None:
            if inode.is_dir:
                raise FsError(errno.EISDIR)
            if size < 0:
                raise FsError(errno.EINVAL)
            if size > L.MAX_FILE_SIZE:
                raise FsError(errno.EFBIG)
            mask |= L.SA_SIZE
            if mtime_ns is None and size != inode.size:
                mask |= L.SA_MTIME
                mtime_ns = now
            rem = size % L.BLOCK
            old = inode.pages.get(size // L.BLOCK)
            if size < inode.size and rem and old is not None:
                # Keep the bytes past EOF in the last page zero: copy it with a zeroed tail.
                self._check_kept(inode, size // L.BLOCK, old, 0, rem)
                blk = self.alloc.alloc_one(self.cpu, meta=False)
                new_blocks.append((blk, 1))
                pm = self.pm
                pm.store_copy(blk * L.BLOCK, old * L.BLOCK, rem)
                pm.store_zero(blk * L.BLOCK + rem, L.BLOCK - rem)
                pm.flush(blk * L.BLOCK, L.BLOCK)
                digest = self.prot.seal(blk, 1)
                entries.append((L.E_WRITE, self._next_seq(), size // L.BLOCK, 1, blk,
                                inode.size, inode.mtime, digest))
        entries.append((L.E_SETATTR, self._next_seq(), mask,
                        mode & 0o7777 if mode is not None else 0, uid or 0, gid or 0,
                        size or 0, atime_ns or 0, mtime_ns or 0, ctime_ns or now))
        try:
            freed = self._commit([(inode, entries)])
        except FsError:
            for s, c in new_blocks:
                self.alloc.free(s, c)
            raise
        self._free_blocks(freed, inode.ino)
        return self.attr(inode)
