"""Namespace operations: lookup, create, mknod, mkdir, symlink, link,
unlink, rmdir and rename (NOVA's namei.c).

Each is one commit: dentries in the parents' logs, link changes in the
children's, several inodes' tails moved in one journal transaction.
"""
from __future__ import annotations

import errno
import functools
import stat
import time
import zlib

from typing import TYPE_CHECKING

from . import layout as L
from .attrs import Attr
from .errors import FsError
from .inode import Inode
from .locks import WRITER
from .shared import (DIR_SHARED, H_DEATHS, H_RENAME_LOCK, H_SYNC_STARTED, H_SYNCED, ISLOT,
                     NAME_SLOTS)

if TYPE_CHECKING:
    from .engine import FileSystem


class MovedMeanwhile(Exception):
    """Under its locks, an operation found that another process moved its inode
    between directories after the operation's barrier looked, and no sync has
    covered the move: it is abandoned unchanged and run again after a sync."""


class Relock(Exception):
    """A namespace lock could not be taken in order: the operation starts again
    holding every lock it asked for, taken in order first."""

    def __init__(self, key: int, write: bool) -> None:
        super().__init__(key)
        self.key = key
        self.write = write


# Directories whose copy of the name versions a process keeps (32 KiB each).
SEEN_DIRS = 64

# A directory in which no other CPU did a namespace operation for this long
# (in units of 2**20 ns, about a millisecond) is one CPU's again (19.8).
PRIVATE_AFTER = 1000

# Key of the rename lock in the lock order: below every inode number (the keys
# of inode locks); the keys of name locks come after the inode numbers.
RENAME_KEY = 0
_DT_DIR = stat.S_IFDIR >> 12          # the type a dentry records for a directory


def namespace_op(fn):
    """Namespace operations: with several processes on the device, what an
    operation changes is locked (:meth:`Namei._ns_lock`) until it returns.

    Locks are taken in ascending key order.  An operation learns what it
    changes as it goes (a name leads to an inode), so a lock that would come
    out of order is only tried; if that fails, or a read lock it holds must
    become a write lock, the operation is abandoned before it has changed
    anything and run again holding all it asked for, taken in order first.
    The log compaction an operation asked for runs after its locks are gone,
    under its own.
    """
    @functools.wraps(fn)
    def op(self: "FileSystem", *args, **kwargs):
        if not self.shared or self._ns_alone or self._ns is not None:
            try:
                return fn(self, *args, **kwargs)
            finally:
                if self._ns is None and self._compact_wanted:
                    self._compact_pending()
        self._ns = {}
        self._ns_names = []
        self._ns_top = -1
        try:
            return fn(self, *args, **kwargs)
        except Relock as r:
            return _run_again(self, fn, r, args, kwargs)
        finally:
            self._ns_release()
            self._ns = None
            if self._compact_wanted:
                self._compact_pending()
    return op


def _run_again(fs: "FileSystem", fn, r: Relock, args, kwargs):
    """Run a namespace operation that met :class:`Relock` again, holding every
    lock it asked for, taken in order first, until it runs through."""
    while True:
        want = {k: w for k, (w, _) in fs._ns.items()}
        want[r.key] = want.get(r.key, False) or r.write
        fs._ns_release()
        for key in sorted(want):
            fs._ns_lock(key, want[key])
        try:
            return fn(fs, *args, **kwargs)
        except Relock as again:
            r = again


class Namei:
    """Directory entries: making, finding, linking, removing, renaming."""

    # Lock words of a namespace operation (section 19.8 of DESIGN.md):
    # - a directory's inode lock: read-locked by operations on one name in it,
    #   write-locked by those that change its link count (mkdir, rmdir, a
    #   directory renamed), remove it, or compact its log;
    # - the name lock of (directory, name), hashed into a table: write-locked
    #   by the operations on that name that read-lock the directory;
    # - the inode lock of a file whose link count changes (for a file it is
    #   also the size lock: a namespace operation holding it takes no data
    #   lock, and data operations take no namespace lock, so neither waits
    #   for the other while holding its own);
    # - the rename lock, for a rename of a directory to another parent.
    def _ns_word(self, key: int) -> int:
        if key == RENAME_KEY:
            return H_RENAME_LOCK
        if key < self._name_base:
            return self._inode_locks + ISLOT * (key - 1)
        return self._name_locks + 4 * (key - self._name_base)

    @staticmethod
    def _name_slot(parent: int, name: bytes) -> int:
        """The name lock word (and name version) of ``name`` in ``parent``."""
        return zlib.crc32(name, (parent * 0x9E3779B1) & 0xFFFFFFFF) & (NAME_SLOTS - 1)

    def _ns_lock(self, key: int, write: bool = True) -> None:
        """Lock ``key`` for the running namespace operation (a no-op unless
        processes share the device, or if it already holds it so)."""
        held = self._ns
        if held is None:
            return
        have = held.get(key)
        if have is not None:
            if have[0] or not write:
                return
            raise Relock(key, True)              # a read lock must become a write lock
        # _ns_word inlined: this runs for every inode a namespace operation
        # changes, and one Python call is a tenth of its cost.
        base = self._name_base
        if key >= base:
            off = self._name_locks + 4 * (key - base)
        elif key > RENAME_KEY:
            off = self._inode_locks + ISLOT * (key - 1)
        else:
            off = H_RENAME_LOCK
        sem = self.scheme.sem
        if key > self._ns_top:                   # in order: may wait
            if write:
                if not sem.w.cas32(off, 0, sem.mine):   # free: taken here, else as wlock waits
                    sem.wlock(off)
            else:
                sem.rlock(off)
            self._ns_top = key
        elif not (sem.try_wlock(off) if write else sem.try_rlock(off)):
            raise Relock(key, write)
        held[key] = (write, off)

    def _ns_name(self, parent: int, name: bytes) -> None:
        """Read-lock directory ``parent`` and write-lock the name lock of ``name``
        in it, or write-lock the directory alone if this CPU alone uses it
        lately (:meth:`_private_dir`)."""
        held = self._ns
        if held is None:
            return
        if held or not 1 <= parent < self._name_base:
            self._ns_name_more(held, parent, name)
            return
        # The operation's first locks, so in order: taken directly.  The
        # directory users word is looked at here first (_private_dir's
        # common case), saving a call on every operation in a private one.
        if self.area.w.load64(self._dir_users + ISLOT * (parent - 1)) == self.cpu + 1 or \
                self._private_dir(parent):
            off = self._inode_locks + ISLOT * (parent - 1)
            sem = self.scheme.sem
            if not sem.w.cas32(off, 0, sem.mine):
                sem.wlock(off)
            held[parent] = (True, off)
            self._ns_top = parent
            return
        self._name_pair(held, parent, self._name_slot(parent, name), True)

    def _ns_name_more(self, held: dict[int, tuple[bool, int]], parent: int,
                      name: bytes) -> None:
        """:meth:`_ns_name` for an operation that holds locks already (the
        second name of a rename, a link's new name).  A directory's share
        that comes before what the operation holds in the order is only
        tried, the name lock after it taken as :meth:`_ns_lock` would; both in
        one call when neither is held yet and the name comes last."""
        have = held.get(parent)
        if have is not None and have[0]:
            return                               # held exclusively: every name is covered
        inside = 1 <= parent < self._name_base
        if have is None and inside and self._private_dir(parent):
            self._ns_lock(parent)
            return
        slot = self._name_slot(parent, name)
        key = self._name_base + slot
        top = self._ns_top
        if have is None and inside and key > top:
            if not self._name_pair(held, parent, slot, parent > top):
                raise Relock(parent, False)      # out of order and not free now
            return
        self._ns_lock(parent, False)
        self._ns_lock(key)
        self._ns_names.append((parent, slot))     # bumped when released

    def _name_pair(self, held: dict[int, tuple[bool, int]], parent: int, slot: int,
                   wait_share: bool) -> bool:
        """Directory ``parent``'s share and the name lock ``slot`` after it, in
        one call (:meth:`Semaphores.rw_pair`), when the name lock comes after
        everything held; the share only tried unless ``wait_share``.  False:
        nothing taken."""
        roff = self._inode_locks + ISLOT * (parent - 1)
        woff = self._name_locks + 4 * slot
        if not self.scheme.sem.rw_pair(roff, woff, wait_share):
            return False
        held[parent] = (False, roff)
        self._ns_top = key = self._name_base + slot
        held[key] = (True, woff)
        self._ns_names.append((parent, slot))     # bumped when released
        return True

    def _private_dir(self, parent: int) -> bool:
        """Whether this CPU alone does namespace operations in directory
        ``parent`` lately (the directory users word of the shared area), so
        that an operation on one name in it may as well hold it exclusively:
        one lock word, no name lock, no name version, and no other process's
        cache to keep exact for its names.  Only a hint: both ways of locking
        are correct."""
        v = self.area.w.load64(self._dir_users + ISLOT * (parent - 1))
        if v == self.cpu + 1:
            return True
        if v & DIR_SHARED and (time.monotonic_ns() >> 20) - (v & ~DIR_SHARED) <= PRIVATE_AFTER:
            return False                         # shared lately
        return self._claim_dir(parent, v)

    def _claim_dir(self, parent: int, v: int) -> bool:
        """The directory users word of ``parent`` held ``v``: nobody's yet, or
        shared but not lately (this CPU's now, if no other CPU changes the word
        first), or another CPU's (shared from now on)."""
        off = self._dir_users + ISLOT * (parent - 1)
        w = self.area.w
        if v == 0 or v & DIR_SHARED:
            return w.cas64(off, v, self.cpu + 1)
        w.store64(off, DIR_SHARED | (time.monotonic_ns() >> 20))
        return False

    def _ns_release(self) -> None:
        """Unlock all the running operation holds (in any order: only taking
        locks has an order), each lock right after the operation is counted
        in what it covers, in the same call: a name lock in the version of its
        name, a directory held exclusively in its epoch (its link count, names
        changed without name locks, '..'), so that whoever takes the lock next,
        or looks at it, finds the change counted and catches up.

        The name locks go first; the directories' own locks, which a change of
        a name needs as well and which a lookup looks at, after them."""
        held = self._ns
        if held:
            if self._ns_names:
                self._ns_bump_names(held)
            w = self.area.w
            cache = self.cache
            for key, (write, off) in held.items():
                if not write:
                    self.scheme.sem.runlock(off)
                    continue
                # Only a directory's epoch says anything to namespace
                # operations; a file's link count matters to none of them.
                # (No inode is cached under the rename key, 0, or a name
                # lock's key, above the inode numbers.)
                inode = cache.get(key)
                if inode is None or inode.dents is None:
                    w.store32(off, 0)            # Semaphores.wunlock, without the call
                    continue
                a = self.area.epoch_slot(key)
                old = w.bump_unlock(a, off, 2)   # version words move by 2 (19.7)
                # The cache, caught up under the lock, has this operation's
                # entries: it may count them if nobody else bumped the epoch
                # since it was copied (as for names below).
                vers = inode.vers
                if vers.get(a) == old:
                    vers[a] = old + 2
                else:
                    vers.pop(a, None)
            held.clear()
        self._ns_top = -1

    def _ns_bump_names(self, held: dict[int, tuple[bool, int]]) -> None:
        """Count the operation in the version of each name it changed, letting
        the name's lock go in the same call (a name lock is only ever taken
        for writing)."""
        cache = self.cache
        w = self.area.w
        for parent, slot in self._ns_names:
            lock = held.pop(self._name_base + slot, None)
            old = w.bump_unlock(self._name_versions + 8 * slot, lock[1], 1) if lock else \
                w.add64(self._name_versions + 8 * slot, 1)   # a second name of the word
            seen = getattr(cache.get(parent), "names_seen", None)
            if seen is not None:
                # The cache has this operation's entries: it may count them
                # if nobody else changed a name of this word meanwhile
                # (0 is never a version: it looks next time).
                seen[slot] = old + 1 if seen[slot] == old else 0
        self._ns_names = []

    def _dir_names(self, parent: int, slots: list[int] | None = None) -> Inode:
        """The cached directory, exact for the names whose name locks this
        operation holds in it (or for ``slots``), for its link count and its
        '..', without catching up with other processes' entries for other names
        when their versions say nothing of these changed (section 19.8).

        A full catch-up takes a copy of every name version first (32 KiB,
        kept for the ``SEEN_DIRS`` directories caught up last), so a value
        recorded never counts a change the cache lacks, as with the page-group
        versions of file writes.  A directory held exclusively is caught up in
        full.
        """
        held = self._ns
        if slots is None:
            if held is None or held.get(parent, (True,))[0]:
                return self._dir(parent)
            slots = [slot for p, slot in self._ns_names if p == parent]
        d = self.cache.get(parent)
        if d is not None and slots and d.names_seen is not None and d.dents is not None:
            for slot in slots:
                if not self._exact_for(d, slot):
                    break
            else:
                return d
        self._trust_versions()
        q = self.area.u64
        epoch_word = self.area.epoch_slot(parent)
        epoch = q[epoch_word >> 3]
        if d is not None and d.dents is not None:
            gen, state, head, tail, array = self._slot_words(parent)
            if gen == d.generation and state == L.STATE_LIVE and head == d.head and \
                    self._rewrites(parent) == d.rewrites:
                # (the versions above decide for a cache that holds a copy of
                # them; with local logs their lines may have moved)
                if tail == d.tail and array == d.array and not array:
                    return d                     # nothing appended since: exact
        # a copy, taken before catching up
        base = self._name_versions >> 3
        snapshot = q[base:base + NAME_SLOTS].tolist()
        d = self._dir(parent)
        if not epoch & 1:                        # odd: a change in flight, never trusted
            d.vers[epoch_word] = epoch
        d.names_seen = snapshot
        seen_dirs = self._seen_dirs
        seen_dirs.pop(parent, None)
        seen_dirs[parent] = None
        if len(seen_dirs) > SEEN_DIRS:
            oldest = next(iter(seen_dirs))
            del seen_dirs[oldest]
            old = self.cache.get(oldest)
            if old is not None:
                old.names_seen = None
        return d

    @staticmethod
    def _check_name(name: bytes) -> None:
        if len(name) > L.NAME_MAX:
            raise FsError(errno.ENAMETOOLONG)
        if not name or b"/" in name or b"\0" in name or name in (b".", b".."):
            raise FsError(errno.EINVAL)

    @namespace_op
    def _create(self, parent: int, name: bytes, mode: int, uid: int, gid: int, rdev: int = 0,
                target: bytes | None = None) -> Attr:
        self._rw()
        self._check_name(name)
        if stat.S_ISDIR(mode):
            self._ns_lock(parent)                # its link count changes
        else:
            self._ns_name(parent, name)
        d = self._dir_names(parent)
        if d.nlink == 0:
            raise FsError(errno.ENOENT)
        if name in d.dents:
            raise FsError(errno.EEXIST)
        if d.mode & stat.S_ISGID:
            # BSD group semantics of a setgid directory: entries take its group,
            # subdirectories inherit the bit.
            gid = d.gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        now = time.time_ns()
        is_dir = stat.S_ISDIR(mode)
        own = [(L.E_DENTRY, self._next_seq(), L.D_ADD, L.DOTDOT, parent, stat.S_IFDIR >> 12, now)] \
            if is_dir else []
        inode, addr, allocated = self._make_inode(mode, uid, gid, rdev, own, target)
        pentries = [(L.E_DENTRY, self._next_seq(), L.D_ADD, name, inode.ino,
                     stat.S_IFMT(mode) >> 12, now)]
        if is_dir:
            pentries.append((L.E_LINK, self._next_seq(), d.nlink + 1, now))
        try:
            self._commit([(d, pentries)], extra=[(addr + L.I_STATE, L.STATE_LIVE)],
                         extra_pages=allocated)
        except FsError:
            self._release_ino(inode.ino, held=False)
            raise
        self.cache[inode.ino] = inode
        return self.attr(inode)

    def lookup(self, parent: int, name: bytes) -> Attr:
        """The attributes of what ``name`` in directory ``parent`` names."""
        return self.attr(self.get(self.lookup_ino(parent, name)))

    def lookup_ino(self, parent: int, name: bytes) -> int:
        """The inode number ``name`` in directory ``parent`` names: a lookup
        without the attributes of what it finds, which is all a path walk
        needs of the directories on its way (the kernel's walk asks nothing
        of them either).  The attributes of a directory other processes
        change keep moving (its times follow every entry), so reading them
        means catching its cache up with all of their entries; the name
        alone is vouched for by its name version (DESIGN 19.8)."""
        if name == b"." or name == b"..":
            d = self._dir(parent)
            return d.ino if name == b"." else (d.parent or parent)
        if len(name) > L.NAME_MAX:
            raise FsError(errno.ENAMETOOLONG)
        d = self.cache.get(parent) if self.shared else None
        if d is not None and d.names_seen is not None and d.dents is not None and \
                not self._ns_alone and self._name_unchanged(d, name):
            # A directory this process changes in shared mode (it holds a copy
            # of the name versions), others likely too: one look at the
            # name's version, as below, in one step.
            pass
        elif d is not None and d.dents is not None and self._unchanged(d):
            # Nobody has changed the directory since this cache read it: exact
            # for every name, with no name's version to look at (the path
            # walks of other processes through a directory they share look
            # up there all the time, and change nothing).
            pass
        elif self.shared and not self._ns_alone and self._valid_ino(parent) and \
                not self._private_dir(parent):
            # No lock: a change of this name that has not bumped its version
            # yet has not returned either, and the lookup may come before it.
            # A lookup counts as a use: the directory of another CPU becomes
            # shared, whose operations bump name versions, not the epoch
            # that would make this cache catch up in full for every lookup.
            # (A directory this CPU alone uses lately is read as any cache is
            # validated, below: no other process appends to its log, so
            # that costs nothing, and a change another CPU begins now marks
            # it shared first, so it comes after this lookup.)
            slot = self._name_slot(parent, name)
            # A change of the name in progress holds its lock as a writer; a
            # writer that died there may have committed without bumping the
            # version, and nothing else would tell this lookup: a held word
            # costs a look at whether its holder lives (DESIGN 19.7).
            # The directory itself may be held whole by its change (mkdir,
            # rmdir, a directory held by the one CPU using it): its word too.
            w = self.area.w
            for lock in (self._name_locks + 4 * slot, self._inode_locks + ISLOT * (parent - 1)):
                if w.load32(lock) & WRITER:
                    self.scheme.sem.reap(lock)
            d = self._dir_names(parent, [slot])
        else:
            d = self._dir(parent)
        ent = d.dents.get(name)
        if ent is None:
            raise FsError(errno.ENOENT)
        return ent[0]

    def _name_unchanged(self, d: Inode, name: bytes) -> bool:
        """Whether the cached directory ``d`` is exact for ``name``: the lookup
        below (the directory shared lately, no writer holding the name's or
        the directory's lock, nobody's death to account for) and
        :meth:`_dir_names`'s look at the name's version, fused into one step; a
        lookup in a directory other processes change takes this path on every
        walk through it.  False: not decided
        here (anything unusual), and the lookup goes the long way."""
        ino = d.ino
        w = self.area.w
        v = w.load64(self._dir_users + ISLOT * (ino - 1))
        if not v & DIR_SHARED or (time.monotonic_ns() >> 20) - (v & ~DIR_SHARED) > PRIVATE_AFTER:
            return False              # private, or one CPU may claim it: _private_dir decides
        slot = self._name_slot(ino, name)
        if w.load32(self._name_locks + 4 * slot) & WRITER or \
                w.load32(self._inode_locks + ISLOT * (ino - 1)) & WRITER:
            return False              # a change in progress, or a dead holder to reap
        return self._exact_for(d, slot)

    def _exact_for(self, d: Inode, slot: int) -> bool:
        """Whether the cached directory ``d``, which holds a copy of the name
        versions, is still exact for the names of name lock ``slot``: nobody's
        death to account for, its epoch, rewrite count and the slot's version
        as the cache recorded them, and its slot still the inode the cache
        read.  Each is a counter that only grows (or a slot word that only a
        compaction or a new life of the slot changes, each counted), so values
        equal to the recorded ones mean nothing changed up to when each was
        loaded, and the cache was exact for the name at the first load."""
        ino = d.ino
        area = self.area
        epoch_word = area.epoch_slot(ino)
        if not area.w.versions_match(H_DEATHS, self._deaths_seen,
                                     epoch_word, d.vers.get(epoch_word, -1),
                                     area.rewrites + ISLOT * (ino - 1), d.rewrites,
                                     self._name_versions + 8 * slot, d.names_seen[slot]):
            return False
        a = self.inode_addr(ino)
        words = self.pm.words
        return words.load64(a + L.I_GENERATION) == d.generation and \
            words.load64s(a + L.I_STATE, 2, 8) == (L.STATE_LIVE, d.head)

    def create(self, parent: int, name: bytes, mode: int, uid: int = 0, gid: int = 0) -> Attr:
        """Create a regular file (mode without type bits means a regular file)."""
        return self._create(parent, name, stat.S_IFREG | (mode & 0o7777), uid, gid)

    def mknod(self, parent: int, name: bytes, mode: int, rdev: int = 0, uid: int = 0,
              gid: int = 0) -> Attr:
        fmt = stat.S_IFMT(mode) or stat.S_IFREG
        if fmt not in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK):
            raise FsError(errno.EINVAL)
        return self._create(parent, name, fmt | (mode & 0o7777), uid, gid, rdev)

    def mkdir(self, parent: int, name: bytes, mode: int, uid: int = 0, gid: int = 0) -> Attr:
        return self._create(parent, name, stat.S_IFDIR | (mode & 0o7777), uid, gid)

    def symlink(self, parent: int, name: bytes, target: bytes, uid: int = 0,
                gid: int = 0) -> Attr:
        if not target or b"\0" in target:
            raise FsError(errno.EINVAL)
        if len(target) >= L.BLOCK:
            raise FsError(errno.ENAMETOOLONG)
        return self._create(parent, name, stat.S_IFLNK | 0o777, uid, gid, target=target)

    def readlink(self, ino: int) -> bytes:
        inode = self.get(ino)
        if not stat.S_ISLNK(inode.mode):
            raise FsError(errno.EINVAL)
        target = self._read(inode, 0, inode.size)
        if len(target) < inode.size:
            raise FsError(errno.EIO)             # part of it is damaged: never a shorter target
        return target

    def _moved_barrier(self, *inos: int) -> None:
        """Sync first when one of ``inos`` was moved between directories by a
        rename or exchange, in any process, that no sync has covered yet.
        After a power loss a half of such a move is undone from the names alone
        (DESIGN 24.3); an operation that uses the inode where the move put it,
        in a third log, must not reach the disk without the move."""
        if self._moved_unsynced(inos):
            self.sync()

    def _moved_word(self, ino: int) -> int:
        """Offset of ``ino``'s word in the shared area: 1 + the sync interval in
        which a rename last moved it between directories (0: none)."""
        return self.area.moved + ISLOT * (ino - 1)

    def _moved_unsynced(self, inos) -> bool:
        """A rename moved one of ``inos`` between directories and no sync begun
        after it has completed (always False where moves need no sync)."""
        if not self.moves_need_sync:
            return False
        w = self.area.w
        synced = w.load64(H_SYNCED)
        # numbers outside the table are not inodes (the caller says so)
        return any(0 < i <= self.area.ninodes and synced < w.load64(self._moved_word(i))
                   for i in inos)

    def _check_unmoved(self, *inos: int) -> None:
        """Under the inodes' locks: the barrier's look still holds."""
        if self._moved_unsynced(inos):
            raise MovedMeanwhile()

    def link(self, ino: int, new_parent: int, new_name: bytes) -> Attr:
        # The barrier syncs before any namespace lock is taken; a move by
        # another process after it is found under the inode's lock.
        while True:
            self._moved_barrier(ino)
            try:
                return self._link(ino, new_parent, new_name)
            except MovedMeanwhile:
                self.sync()

    @namespace_op
    def _link(self, ino: int, new_parent: int, new_name: bytes) -> Attr:
        self._rw()
        self._check_name(new_name)
        self._ns_name(new_parent, new_name)
        self._ns_lock(ino)
        self._check_unmoved(ino)
        target = self.get(ino)
        if target.is_dir:
            raise FsError(errno.EPERM)
        d = self._dir_names(new_parent)
        if d.nlink == 0 or target.nlink == 0:
            raise FsError(errno.ENOENT)
        if new_name in d.dents:
            raise FsError(errno.EEXIST)
        now = time.time_ns()
        self._commit([
            (d, [(L.E_DENTRY, self._next_seq(), L.D_ADD, new_name, ino,
                  stat.S_IFMT(target.mode) >> 12, now)]),
            (target, [(L.E_LINK, self._next_seq(), target.nlink + 1, now)]),
        ])
        return self.attr(self.cache.get(ino, target))

    @namespace_op
    def unlink(self, parent: int, name: bytes) -> None:
        self._rw()
        self._ns_name(parent, name)
        d = self._dir_names(parent)
        ent = d.dents.get(name) if len(name) <= L.NAME_MAX else None
        if ent is None:
            raise FsError(errno.ENAMETOOLONG if len(name) > L.NAME_MAX else errno.ENOENT)
        self._ns_lock(ent[0])
        victim = self.get(ent[0])
        if victim.is_dir:
            raise FsError(errno.EISDIR)
        now = time.time_ns()
        self._commit([
            (d, [(L.E_DENTRY, self._next_seq(), L.D_REMOVE, name, 0, 0, now)]),
            (victim, [(L.E_LINK, self._next_seq(), victim.nlink - 1, now)]),
        ])
        self._maybe_evict(victim)

    @namespace_op
    def rmdir(self, parent: int, name: bytes) -> None:
        self._rw()
        if name == b".":
            raise FsError(errno.EINVAL)
        if name == b"..":
            raise FsError(errno.ENOTEMPTY)
        self._ns_lock(parent)
        d = self._dir(parent)
        ent = d.dents.get(name)
        if ent is None:
            raise FsError(errno.ENOENT)
        self._ns_lock(ent[0])
        victim = self.get(ent[0])
        if not victim.is_dir:
            raise FsError(errno.ENOTDIR)
        if victim.dents:
            raise FsError(errno.ENOTEMPTY)
        now = time.time_ns()
        self._commit([
            (d, [(L.E_DENTRY, self._next_seq(), L.D_REMOVE, name, 0, 0, now),
                 (L.E_LINK, self._next_seq(), d.nlink - 1, now)]),
            (victim, [(L.E_LINK, self._next_seq(), 0, now)]),
        ])
        self._maybe_evict(victim)

    def _is_ancestor(self, anc: int, ino: int) -> bool:
        """True if directory ``anc`` is ``ino`` or one of its ancestors."""
        seen = 0
        while True:
            if ino == anc:
                return True
            if ino == L.ROOT_INO or seen > self.sb.inodes_per_cpu * self.ncpus:
                return False
            ino = self.get(ino).parent
            seen += 1

    def rename(self, p1: int, n1: bytes, p2: int, n2: bytes, flags: int = 0) -> None:
        """rename(2) / renameat2 with RENAME_NOREPLACE (1) or RENAME_EXCHANGE (2)."""
        while True:
            if self.moves_need_sync and p1 != p2:
                # The barrier, before any lock: a hint, read without locks
                # (the names found under the locks are checked again).
                ents = (self._dir(p1).dents.get(n1), self._dir(p2).dents.get(n2))
                self._moved_barrier(*(e[0] for e in ents if e))
            try:
                return self._rename(p1, n1, p2, n2, flags)
            except MovedMeanwhile:
                self.sync()

    @namespace_op
    def _rename(self, p1: int, n1: bytes, p2: int, n2: bytes, flags: int) -> None:
        self._rw()
        noreplace, exchange = flags & 1, flags & 2
        if flags & ~3 or (noreplace and exchange):
            raise FsError(errno.EINVAL)
        for n in (n1, n2):
            self._check_name(n)
        self._ns_name(p1, n1)
        self._ns_name(p2, n2)
        d1 = self._dir_names(p1)
        d2 = d1 if p2 == p1 else self._dir_names(p2)
        e1 = d1.dents.get(n1)
        if e1 is None:
            raise FsError(errno.ENOENT)
        e2 = d2.dents.get(n2)
        if d2.nlink == 0:
            raise FsError(errno.ENOENT)
        if e1[1] == _DT_DIR or e2 and e2[1] == _DT_DIR:
            if p1 != p2:
                # A directory changes parent: the ancestor check below walks
                # up through directories nobody locked, which only such a
                # rename can move, so these go one at a time (Linux's rename
                # mutex).
                self._ns_lock(RENAME_KEY)
            self._ns_lock(p1)                    # link counts of the parents change
            self._ns_lock(p2)
        if e1[1] == _DT_DIR or p1 != p2 and self.moves_need_sync:
            # A directory moved changes its '..'; a move between directories
            # on a disk-backed image is checked against the barrier under the
            # inode's lock.  A file renamed otherwise keeps its link count, and
            # its name, under this operation's locks, keeps it alive: only a
            # ctime entry goes into its log, under the log lock.
            self._ns_lock(e1[0])
        if e2:
            self._ns_lock(e2[0])
        if p1 != p2:
            self._check_unmoved(e1[0], *(e2[:1] if e2 else ()))
        src = self.get(e1[0])
        dst = self.get(e2[0]) if e2 else None
        if exchange and dst is None:
            raise FsError(errno.ENOENT)
        if noreplace and dst is not None:
            raise FsError(errno.EEXIST)
        if dst is not None and dst.ino == src.ino:
            if p1 == p2 and n1 == n2 or not exchange:
                return                                  # same file: rename does nothing
        if src.is_dir and p1 != p2 and self._is_ancestor(src.ino, p2):
            raise FsError(errno.EINVAL)
        if exchange and dst.is_dir and p1 != p2 and self._is_ancestor(dst.ino, p1):
            raise FsError(errno.EINVAL)
        if dst is not None and not exchange:
            if src.is_dir and not dst.is_dir:
                raise FsError(errno.ENOTDIR)
            if not src.is_dir and dst.is_dir:
                raise FsError(errno.EISDIR)
            if dst.is_dir and dst.dents:
                raise FsError(errno.ENOTEMPTY)
        now = time.time_ns()
        ent: dict[int, list[tuple]] = {}
        objs: dict[int, Inode] = {}

        def add(inode: Inode, e: tuple) -> None:
            objs[inode.ino] = inode
            ent.setdefault(inode.ino, []).append(e)

        nlink_delta: dict[int, int] = {}
        dt = lambda i: stat.S_IFMT(i.mode) >> 12  # noqa: E731
        # Between two directories each name's entry names the other (D_MOVED),
        # so that recovery can finish or undo a rename of which a power loss
        # kept only one directory's page (DESIGN 24.3).
        across = p1 != p2 and self.marks
        to1 = (L.D_MOVED | (L.D_EXCHANGE if exchange else 0), L.name_hash(p2, n2),
               p2 if self.peer_dirs else 0) if across else None
        to2 = (to1[0], L.name_hash(p1, n1), p1 if self.peer_dirs else 0) if across else None
        if exchange:
            add(d1, (L.E_DENTRY, 0, L.D_ADD, n1, dst.ino, dt(dst), now, to1))
            add(d2, (L.E_DENTRY, 0, L.D_ADD, n2, src.ino, dt(src), now, to2))
            if p1 != p2:
                for moved, to in ((src, p2), (dst, p1)):
                    if moved.is_dir:
                        add(moved, (L.E_DENTRY, self._next_seq(), L.D_ADD, L.DOTDOT, to,
                                    stat.S_IFDIR >> 12, now))
                        nlink_delta[to] = nlink_delta.get(to, 0) + 1
                        frm = p1 if to == p2 else p2
                        nlink_delta[frm] = nlink_delta.get(frm, 0) - 1
            for i in (src, dst):
                if not (i.is_dir and p1 != p2):
                    add(i, self._ctime_entry(i, now))
        else:
            # the removal names the inode that moved (0 in any other removal)
            add(d1, (L.E_DENTRY, 0, L.D_REMOVE, n1, src.ino if across else 0, 0, now, to1))
            add(d2, (L.E_DENTRY, 0, L.D_ADD, n2, src.ino, dt(src), now, to2))
            if src.is_dir and p1 != p2:
                add(src, (L.E_DENTRY, self._next_seq(), L.D_ADD, L.DOTDOT, p2,
                          stat.S_IFDIR >> 12, now))
                nlink_delta[p1] = nlink_delta.get(p1, 0) - 1
                nlink_delta[p2] = nlink_delta.get(p2, 0) + 1
            else:
                add(src, self._ctime_entry(src, now))
            if dst is not None:
                add(dst, (L.E_LINK, self._next_seq(), 0 if dst.is_dir else dst.nlink - 1, now))
                if dst.is_dir:
                    nlink_delta[p2] = nlink_delta.get(p2, 0) - 1
        for pino, delta in nlink_delta.items():
            if delta:
                pd = d1 if pino == p1 else d2
                add(pd, (L.E_LINK, self._next_seq(), pd.nlink + delta, now))
        self._commit([(objs[i], es) for i, es in ent.items()])
        if across and self.moves_need_sync:
            # Every process's barrier sees the move (still under the inodes'
            # locks, so an operation that uses them after it finds it there).
            w = self.area.w
            mark = w.load64(H_SYNC_STARTED) + 1
            for i in ((src.ino, dst.ino) if exchange else (src.ino,)):
                w.store64(self._moved_word(i), mark)
        if dst is not None and not exchange:
            self._maybe_evict(dst)

    def _ctime_entry(self, inode: Inode, now: int) -> tuple:
        return (L.E_SETATTR, self._next_seq(), L.SA_CTIME, 0, 0, 0, 0, 0, 0, now)
