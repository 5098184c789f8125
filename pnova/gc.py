"""Log compaction (NOVA's thorough garbage collection).

A log grows with every change; when its pages hold well over twice what the
live state needs, the live state is rewritten as one new chain and swapped in
by one journal transaction, and the old pages are freed.
"""
from __future__ import annotations

import stat

from . import layout as L
from . import log as plog
from .errors import FsError
from .icache import log_positions
from .inode import Inode
from .locks import LockTimeout
from .namei import namespace_op

# A log shorter than this many pages is never compacted: on an image in memory
# (or on persistent memory), and on one on a disk, where each compaction costs
# a sync of the image (see Compaction._compact_min_pages).
COMPACT_MIN_PAGES = 4
DISK_COMPACT_MIN_PAGES = 256


class Compaction:
    """Noting long logs and rewriting them."""

    def _log_pages(self, inode: Inode) -> int:
        """Log pages of an inode, twins not counted."""
        n = len(inode.log_pages) + sum(len(v[2]) for v in inode.local.values())
        return n // 2 if self.log_twins else n

    def _needs_compaction(self, inode: Inode, npages: int | None = None) -> bool:
        """Whether an inode's logs have grown well past its live state: twice
        what it needs, or four times for a directory (a compaction rewrites
        every name, so in a directory that shrinks or churns, 2 names are
        rewritten per name removed at twice and 2/3 at four times; and where
        several processes change it, each compaction stops its users and a
        cache that was behind its start reads the whole directory again,
        DESIGN 12 and 19.5).
        What it needs counts a page for each per-core local log as well as the
        live entries: each core writing the inode keeps a log page open
        whatever compaction does, and without them in the count sixteen cores
        writing one small file compacted it (a stop of every writer) every few
        dozen writes (DESIGN 12)."""
        n = self._log_pages(inode) if npages is None else npages
        factor = 4 if inode.dents is not None else 2
        need = inode.live_log_estimate() // L.LOG_DATA + 1 + len(inode.local)
        return n >= self._compact_min_pages() and n > factor * need + 1

    def _compact_min_pages(self) -> int:
        """The fewest log pages worth a compaction.  On an image on a disk every
        compaction syncs the image first (its new chain must be on the disk
        before the words that switch to it), an msync of milliseconds: a file
        overwritten in place filled its 4-page threshold every 190 writes, and
        the syncs took a fifth of the time of 4 KiB overwrites; at 64 pages
        still 4-13% of the engine's (DESIGN 12).
        Long logs take room, though: once less than a quarter of the blocks
        is free, logs are compacted from four pages again, so that many files
        written in place never fill the device with dead entries."""
        if self.pm.mode != "disk":
            return COMPACT_MIN_PAGES
        a = self.alloc
        return DISK_COMPACT_MIN_PAGES if 4 * a.nfree >= a.ntotal else COMPACT_MIN_PAGES

    def _want_compaction(self, inode: Inode) -> None:
        """Note an inode whose logs have grown well past its live state."""
        if self._owner_decides(inode):
            if self._own_log_long(inode):
                self._compact_wanted.add(inode.ino)
        elif self._needs_compaction(inode):
            self._compact_wanted.add(inode.ino)

    def _dir_log_may_be_long(self, inode: Inode) -> bool:
        """Whether a directory that other processes change may need compacting,
        judged without catching up with their entries: its pages counted by
        following the links past this cache's last page (no entry is read),
        against this cache's live size, which lags theirs by about the entries
        of those pages.  A directory commit of a cache that is behind asks for
        a look whenever it adds a page; catching up for every such look made
        each process decode all of the other's entries (13% of two processes
        unlinking in one directory), which the namespace operations themselves
        avoid (19.8).  True sends the question to the exact decision."""
        if not inode.log_pages:
            return True
        tail = self._slot_words(inode.ino)[3]
        copies = 2 if self.log_twins else 1
        try:
            more = plog.chain_pages(self.pm, inode.log_pages[-copies] * L.BLOCK, tail,
                                    inode.ino, self.max_log_pages)
        except plog.LogError:
            return True                          # compacted or moving: let the exact path see
        # (the local logs' pages as far as this cache knows them: its own exactly)
        return self._needs_compaction(inode, self._log_pages(inode) + len(more) // copies - 1)

    def _owner_decides(self, inode: Inode) -> bool:
        """A file with per-core local logs, on a device other processes share:
        each core judges by its own local log, which it knows exactly without
        reading the others' (DESIGN 12)."""
        return inode.dents is None and bool(inode.local) and self.shared

    def _own_log_long(self, inode: Inode) -> bool:
        own = inode.local.get(self.cpu)
        if own is None:
            return False
        n = len(own[2]) // (2 if self.log_twins else 1)
        return n >= self._compact_min_pages() and \
            n > 2 * (inode.live_log_estimate() // L.LOG_DATA + 1) + 1

    def _compact_pending(self) -> None:
        """Compact what the last operation asked for (no locks are held here),
        and the logs read around a damaged copy (DESIGN 23.2)."""
        while self._slot_repairs:
            ino = self._slot_repairs.pop()
            try:
                self.scrub_slot(ino)             # the slot restored from its replica
            except (FsError, LockTimeout):
                pass
        while self._repair_wanted:
            ino = self._repair_wanted.pop()
            self._compact_wanted.discard(ino)
            try:
                self.compact(ino)
            except (FsError, LockTimeout):
                pass                             # gone, or busy: read from the good copy
        while self._compact_wanted:
            ino = self._compact_wanted.pop()
            try:
                cached = self.cache.get(ino)
                if cached is not None and self._owner_decides(cached):
                    self._compact_shared_file(ino)
                elif cached is not None and cached.is_dir and self.shared and \
                        not self._dir_log_may_be_long(cached):
                    pass
                # decided on a cache caught up with the other processes (a
                # directory commit may have left that to the next validation)
                elif self._needs_compaction(self.get(ino)):
                    self.compact(ino)
            except (FsError, LockTimeout):
                # Gone, no room for a new chain, or a directory too busy to
                # lock: keep the long log.  The operation that asked has
                # committed already; nothing here may fail it.
                pass

    def _compact_shared_file(self, ino: int) -> None:
        """Compact a file other cores are writing, if no one else is already.

        Its size lock, taken without waiting, makes this process the one
        compactor: the others that want the same compaction go on writing
        instead of each catching up with every core's entries and queueing for
        the file (with sixteen cores, that catching up was most of their time).
        The catching up is done before the whole-file lock, while the other
        cores still write; under the lock only what they wrote meanwhile is
        read.
        """
        sch = self.scheme
        if not sch.try_size_lock(ino):
            return
        try:
            inode = self.get(ino)
            if not (self._own_log_long(inode) or self._needs_compaction(inode)):
                return                           # someone compacted it meanwhile
            self._compact_file_sized(inode)
        finally:
            sch.size_unlock(ino)

    def compact(self, ino: int) -> None:
        """Thorough log GC: rewrite the live state as one new chain.

        The new chain replaces the global log and every per-core local log in
        one journal transaction (head, tail and the log-array word); the old
        pages are freed after it.  A file is compacted under its size lock and
        a write lock over its whole range, so no writer is in the middle of an
        append; a directory under its namespace lock and its log lock.
        """
        sch = self.scheme
        if self.get(ino).is_dir:
            self._compact_dir(ino)
            return
        sch.size_lock(ino)
        try:
            self._compact_file_sized(self.get(ino))
        finally:
            sch.size_unlock(ino)

    def _compact_file_sized(self, inode: Inode) -> None:
        """Compact a file whose size lock this process holds: under a write
        lock over its whole range and its log lock."""
        sch, ino = self.scheme, inode.ino
        last = max(inode.size // L.BLOCK, max(inode.pages, default=0))
        tok = sch.lock(ino, 0, last, True)
        try:
            sch.log_lock(ino)
            try:
                self._compact_locked(self.get(ino))
            finally:
                sch.log_unlock(ino)
        finally:
            sch.unlock(tok)

    @namespace_op
    def _compact_dir(self, ino: int) -> None:
        """A directory's entries change only under its namespace lock."""
        self._ns_lock(ino)
        self.scheme.log_lock(ino)
        try:
            inode = self.get(ino)
            if inode.is_dir:
                self._compact_locked(inode)
        finally:
            self.scheme.log_unlock(ino)

    def _compact_locked(self, inode: Inode) -> None:
        ino = inode.ino
        entries: list[tuple] = []
        if inode.is_dir:
            entries.append((L.E_DENTRY, self._next_seq(), L.D_ADD, L.DOTDOT, inode.parent,
                            stat.S_IFDIR >> 12, inode.ctime))
            for cookie, name in inode.order.items():
                child, dtype, _ = inode.dents[name]
                entries.append((L.E_DENTRY, cookie, L.D_ADD, name, child, dtype, inode.mtime))
        else:
            run = None
            for pg in sorted(inode.pages):
                b = inode.pages[pg]
                if run and run[0] + run[1] == pg and run[2] + run[1] == b:
                    run[1] += 1
                else:
                    if run:
                        entries.append((L.E_WRITE, self._next_seq(), run[0], run[1], run[2],
                                        inode.size, inode.mtime))
                    run = [pg, 1, b]
            if run:
                entries.append((L.E_WRITE, self._next_seq(), run[0], run[1], run[2],
                                inode.size, inode.mtime))
        for name, value in inode.xattrs.items():
            entries.append((L.E_XATTR, self._next_seq(), L.X_SET, name, value, inode.ctime))
        entries.append((L.E_SETATTR, self._next_seq(),
                        L.SA_MODE | L.SA_UID | L.SA_GID | L.SA_SIZE | L.SA_ATIME | L.SA_MTIME | L.SA_CTIME,
                        inode.mode & 0o7777, inode.uid, inode.gid, inode.size, inode.atime,
                        inode.mtime, inode.ctime))
        entries.append((L.E_LINK, self._next_seq(), inode.nlink, inode.ctime))
        pm = self.pm
        first, ftwin = self._new_log_page()
        pages = [first] + ([ftwin] if ftwin else [])
        plog.init_page(pm, first, ino, ftwin)
        try:
            tail, more = plog.append(pm, first * L.BLOCK, [L.encode_entry(e) for e in entries],
                                     ino, self._new_log_page, ftwin)
        except FsError as exc:
            for p in pages + getattr(exc, "pages", []):
                self.alloc.free(p, 1)
            raise
        pages += more
        if pm.mode == "disk":
            # The new chain is on the disk before the words that switch to it
            # can be: after a power loss the slot names the old chain or a
            # whole new one.  A sync of its own, not a bare msync: it opens a
            # new sync interval, so the old chain's pages, which it has just
            # made part of the state on the disk, are held until the next sync
            # (under a bare msync, those allocated since the last sync counted
            # as never synced and went straight back to the allocator, to be
            # rewritten while the disk's slot may still name them: recovery
            # then cut the old chain there, losing only entries no sync had
            # covered, but the old chain was no longer whole).
            self.sync()
        addr = self.inode_addr(ino)
        updates = [(addr + L.I_LOG_HEAD, first * L.BLOCK), (addr + L.I_LOG_TAIL, tail)]
        if ftwin:
            updates.append((addr + L.I_LOG_HEAD_TWIN, ftwin * L.BLOCK))
        if inode.array:
            updates.append((addr + L.I_LOG_ARRAY, 0))
        if inode.array_twin:
            updates.append((addr + L.I_LOG_ARRAY_TWIN, 0))
        if inode.is_dir and self.shared:
            # The new chain holds exactly what a cache that reached the old
            # tail holds: such a cache in another process takes the new chain
            # instead of re-reading the whole directory (icache).  Recorded
            # before the count moves, so that a reader who sees the new count
            # finds the record (or, once it is overwritten, reloads).
            self.area.note_compaction(ino, self._rewrites(ino) + 2,
                                      (inode.head, log_positions(inode)),
                                      (first * L.BLOCK, tail), entries[-1][1])
        # The count is odd while the journal switches the slot's words, one at a
        # time: a reader that meets an odd count waits for it (a mix of old and
        # new head, tail and array reads as damage, or, old local logs with the
        # new chain, as names removed long ago), and one that saw it move while
        # it read reads the inode again (its positions are in freed pages, and
        # the new head may even be a number an old page had).  DESIGN 19.5.
        word = self.area.rewrites + 4 * (ino - 1)
        self.area.w.add32(word, 1)
        try:
            self.journals[self.cpu].run(updates)
        finally:
            inode.rewrites = self.area.w.add32(word, 1) + 1
        old = list(inode.log_pages)
        for _, _, lpages in inode.local.values():
            old.extend(lpages)
        if inode.array:
            old.append(inode.array)
        if inode.array_twin:
            old.append(inode.array_twin)
        inode.head, inode.tail, inode.log_pages = first * L.BLOCK, tail, pages
        inode.array = inode.array_twin = 0
        inode.local = {}
        self._free_blocks(old)
