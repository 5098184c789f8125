"""Log compaction (NOVA's thorough garbage collection).

A log grows with every change; when its pages hold well over twice what the
live state needs, the live state is rewritten as one new chain and swapped in
by one journal transaction, and the old pages are freed.
"""
from __future__ import annotations

import errno
import logging
import stat
import threading
from dataclasses import dataclass, field

from . import layout as L
from . import log as plog
from .errors import FsError
from .icache import log_positions
from .inode import Inode
from .locks import LockTimeout
from .namei import namespace_op
from .shared import H_SWITCH_GATE, H_SYNC_STARTED, ISLOT

log = logging.getLogger("pnova.gc")

# A log shorter than this many pages is never compacted: on an image in memory
# (or on persistent memory), and on one on a disk, where each compaction costs
# an msync that waits for the disk (see Compaction._compact_min_pages).
COMPACT_MIN_PAGES = 4
DISK_COMPACT_MIN_PAGES = 256


@dataclass
class PendingSwitch:
    """A file's compacted chain, written and being pushed to the disk by an
    msync of its own, that the slot does not name yet (DESIGN 24.5): what it was
    built from, so that the switch can check that nothing but appends
    happened since and copy those."""
    ino: int
    generation: int
    head: int                    # the slot's head, array and rewrite count it was built from
    array: int
    rewrites: int
    gtail: int                   # how far the global log had been read
    local: dict[int, tuple[int, int]]   # CPU -> (head, tail) of each local log read
    first: int                   # the new chain: first block and its twin
    ftwin: int
    tail: int
    pages: list[int]             # its blocks, twins included
    last_seq: int                # the newest sequence number in it
    started: int                 # syncs started (H_SYNC_STARTED) when it was built
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    switched: bool = False       # the slot names it: its blocks are the file's now


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
        compaction is an msync of milliseconds (its new chain must be on the
        disk before the words that switch to it; for a file it runs in a
        thread, DESIGN 24.5): a file overwritten in place filled its 4-page
        threshold every 190 writes, and when those syncs were in the write's
        time they took a fifth of it; at 64 pages still 4-13% of the engine's,
        and with the msync in a thread 64 pages still cost 9% (DESIGN 12).
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
        and the logs read around a damaged copy (DESIGN 23.2); switch the files
        whose compacted chains have reached the disk since (24.5)."""
        if self._switches:
            # Each chain on its way holds its file's old chain and its new one
            # until it is switched.  Short of room, the operation waits for
            # them: on a slow disk they piled up and writes failed with
            # ENOSPC while the room was there to take back.
            a = self.alloc
            self._finish_switches(wait=4 * a.nfree < a.ntotal)
        try:
            self._compact_wanted_now()
        finally:
            # a chain still on its way to the disk: looked at after the next
            # operation again
            self._compact_wanted.update(self._switches)

    def _compact_wanted_now(self) -> None:
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
            if ino in self._switches:
                continue                         # compacted already, being switched
            try:
                cached = self.cache.get(ino)
                if cached is not None and self._owner_decides(cached):
                    self._compact_shared_file(ino, defer=True)
                elif cached is not None and cached.is_dir and self.shared and \
                        not self._dir_log_may_be_long(cached):
                    pass
                # decided on a cache caught up with the other processes (a
                # directory commit may have left that to the next validation)
                elif self._needs_compaction(self.get(ino)):
                    self.compact(ino, defer=True)
            except (FsError, LockTimeout):
                # Gone, no room for a new chain, or a directory too busy to
                # lock: keep the long log.  The operation that asked has
                # committed already; nothing here may fail it.
                pass

    def _compact_shared_file(self, ino: int, defer: bool = False) -> None:
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
            self._compact_file_sized(inode, defer)
        finally:
            sch.size_unlock(ino)

    def compact(self, ino: int, defer: bool = False) -> None:
        """Thorough log GC: rewrite the live state as one new chain.

        The new chain replaces the global log and every per-core local log in
        one journal transaction (head, tail and the log-array word); the old
        pages are freed after it.  A file is compacted under its size lock and
        a write lock over its whole range, so no writer is in the middle of an
        append; a directory under its namespace lock and its log lock.

        ``defer``: on an image on a disk, a file's new chain is made durable
        by an msync that promises nothing, in a thread, and the slot is switched to
        it after a later operation (:meth:`_finish_switches`), instead of
        syncing the image first, in the operation's time (DESIGN 24.5).
        """
        sch = self.scheme
        if self.get(ino).is_dir:
            self._compact_dir(ino)
            return
        sch.size_lock(ino)
        try:
            self._compact_file_sized(self.get(ino), defer)
        finally:
            sch.size_unlock(ino)

    def _compact_file_sized(self, inode: Inode, defer: bool = False) -> None:
        """Compact a file whose size lock this process holds: under a write
        lock over its whole range and its log lock."""
        self._whole_file_locked(inode, lambda locked: self._compact_locked(locked, defer))

    def _whole_file_locked(self, inode: Inode, fn) -> None:
        """``fn`` on the file, caught up, under a write lock over its whole
        range and its log lock (its size lock held by the caller): no writer
        is between taking its sequence number and its commit."""
        sch, ino = self.scheme, inode.ino
        last = max(inode.size // L.BLOCK, max(inode.pages, default=0))
        tok = sch.lock(ino, 0, last, True)
        try:
            sch.log_lock(ino)
            try:
                fn(self.get(ino))
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

    def _compact_locked(self, inode: Inode, defer: bool = False) -> None:
        ino = inode.ino
        entries: list[tuple] = []
        if inode.is_dir:
            entries.append((L.E_DENTRY, self._next_seq(), L.D_ADD, L.DOTDOT, inode.parent,
                            stat.S_IFDIR >> 12, inode.ctime))
            # names in cookie order, the order readdir lists them (each entry
            # keeps the sequence number its name was added with: SPEC 12.8)
            pos = inode.pos
            for cookie in (inode.sorted_pos if inode.sorted_pos is not None else sorted(pos)):
                name = pos[cookie]
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
        if pm.mode == "disk" and defer and not inode.is_dir:
            self._defer_switch(inode, first, ftwin, tail, pages, entries)
            return
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
        self._switch(inode, first, ftwin, tail, pages, entries[-1][1])

    def _switch(self, inode: Inode, first: int, ftwin: int, tail: int, pages: list[int],
                last_seq: int, free: bool = True) -> list[int]:
        """Switch the slot to a new chain whose entries are on the medium (one
        journal transaction), then free the old pages (or, with ``free``
        false, return them for the caller to free)."""
        ino = inode.ino
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
                                      (first * L.BLOCK, tail), last_seq)
        # The count is odd while the journal switches the slot's words, one at a
        # time: a reader that meets an odd count waits for it (a mix of old and
        # new head, tail and array reads as damage, or, old local logs with the
        # new chain, as names removed long ago), and one that saw it move while
        # it read reads the inode again (its positions are in freed pages, and
        # the new head may even be a number an old page had).  DESIGN 19.5.
        word = self.area.rewrites + ISLOT * (ino - 1)
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
        if free:
            self._free_old_chain(old)
        return old

    def _free_old_chain(self, old: list[int]) -> None:
        # Held until the next sync even if allocated since the last began:
        # until it completes, the slot on the disk may still name the old
        # chain (or, after a switch made without a sync first, the chain
        # before it), which must stay whole (DESIGN 24.5).
        self._free_blocks(old, hold=True)

    # -- compactions switched after their chain reached the disk (24.5) -------
    def _defer_switch(self, inode: Inode, first: int, ftwin: int, tail: int,
                      pages: list[int], entries: list[tuple]) -> None:
        """Note a file's new chain, written but not named by the slot, and start
        making it durable: an msync of the mapping that promises nothing, in a
        thread (the crash model's device does it at once); it takes the data
        of every write the chain maps along.  Called under the locks of the
        compaction: no entry of the file is committed between the state the
        chain holds and the count of syncs read here.

        The data blocks the chain maps lose their fresh marks: freed later in
        this sync interval (a write replacing a page before or after the
        switch), they wait for a sync, since a slot on the disk may name the
        chain, whose entries carry no digest, until one completes.  Given back
        at once as blocks no sync saw, one was reused and recovery found it
        mapped twice (DESIGN 24.5)."""
        for e in entries:
            if e[0] == L.E_WRITE:
                self.alloc.unfresh(e[4], e[3])
        last_seq = entries[-1][1]
        p = PendingSwitch(
            ino=inode.ino, generation=inode.generation, head=inode.head, array=inode.array,
            rewrites=inode.rewrites, gtail=inode.tail,
            local={c: (v[0], v[1]) for c, v in inode.local.items()},
            first=first, ftwin=ftwin, tail=tail, pages=pages, last_seq=last_seq,
            started=self.area.w.load64(H_SYNC_STARTED))
        self._switches[inode.ino] = p
        pm = self.pm

        def push() -> None:
            try:
                pm.push()
            except BaseException as exc:     # noqa: BLE001 (reported to the switch)
                p.error = exc
            finally:
                p.done.set()

        if getattr(pm, "push_inline", False):
            push()
        else:
            threading.Thread(target=push, name=f"pnova-chain-{inode.ino}", daemon=True).start()

    def finish_compactions(self) -> None:
        """Switch every file compacted here whose new chain is on its way to
        the disk, once it has arrived (DESIGN 24.5).  A process that stops
        serving calls it, and so do fsync and unmount: a chain left pending
        would keep its blocks from the allocator until the next mount."""
        if self._switches:
            self._finish_switches(wait=True)

    def _finish_switches(self, wait: bool = False) -> None:
        """Switch every file whose new chain has reached the disk (with
        ``wait``: every one, once its msync returns; fsync and unmount).  No
        lock is held by the caller."""
        for p in list(self._switches.values()):
            if not p.done.is_set():
                if not wait:
                    continue
                p.done.wait()
            try:
                if self._finish_switch(p, wait):
                    del self._switches[p.ino]
            except Exception as exc:                 # noqa: BLE001 - the operation committed
                del self._switches[p.ino]
                if not p.switched:
                    self._drop_chain(p)
                if not isinstance(exc, (FsError, LockTimeout)):
                    log.exception("switching inode %d to its compacted log failed", p.ino)

    def _drop_chain(self, p: PendingSwitch) -> None:
        """A new chain that will never be switched to: its blocks go back (no
        state on the disk ever named them)."""
        for b in p.pages:
            self.alloc.free(b, 1)
        p.pages = []

    def _finish_switch(self, p: PendingSwitch, wait: bool) -> bool:
        """Take the file's locks as a compaction does and switch it; False when
        another process holds its size lock (tried again later)."""
        sch, ino = self.scheme, p.ino
        if p.error is not None:
            self._drop_chain(p)
            return True
        if self.shared and not wait:
            if not sch.try_size_lock(ino):
                return False
        else:
            sch.size_lock(ino)
        try:
            inode = self.get(ino)
            if inode.generation != p.generation or inode.pages is None:
                self._drop_chain(p)              # another inode in the slot now
                return True

            def switch(locked: Inode) -> None:
                if not self._switch_appended(p, locked):
                    self._drop_chain(p)

            self._whole_file_locked(inode, switch)
        finally:
            sch.size_unlock(ino)
        return True

    def _switch_appended(self, p: PendingSwitch, inode: Inode) -> bool:
        """Under the file's compaction locks: copy into the new chain the entries
        committed since it was built, and switch the slot to it.  False (the
        chain is dropped) if anything but appends changed the file's logs, or
        if the copies cannot be kept whole (DESIGN 24.5).

        Without a sync only if no sync has started since the chain was built:
        one that did may have made entries durable in the old logs that the
        new chain would hold only as unsynced copies.  Then the switch is made
        as before 24.5: the copies, a sync, the switch (never starved by
        others' syncs, at the price of one sync in this case).  Nothing inside
        the gate may sync: the copies' pages are taken before it, and the old
        chain is freed (a free may sync when the held list is full) after it."""
        if (inode.generation, inode.head, inode.rewrites) != \
                (p.generation, p.head, p.rewrites) or (p.array and inode.array != p.array):
            return False
        raws = self._appended_since(p, inode)
        if raws is None:
            return False
        spare = self._spare_log_pages(p.tail, raws)
        if spare is None:
            return False

        def new_page() -> tuple[int, int]:
            if not spare:
                raise FsError(errno.ENOSPC)      # (never: enough were taken)
            pair = spare.pop()
            p.pages.extend(b for b in pair if b)
            return pair

        w, sem = self.area.w, self.scheme.sem
        tail, copied, old = p.tail, not raws, None
        last_seq = max(p.last_seq, L.entry_seq(raws[-1]) if raws else 0)
        try:
            if sem.try_rlock(H_SWITCH_GATE):
                try:
                    # after the gate, as sync_start looks at the gate after its count
                    if w.load64(H_SYNC_STARTED) == p.started:
                        if raws:
                            tail, _ = plog.append(self.pm, p.tail, raws, inode.ino, new_page)
                            copied = True
                        if w.load64(H_SYNC_STARTED) == p.started:
                            p.switched = True
                            old = self._switch(inode, p.first, p.ftwin, tail, p.pages,
                                               last_seq, free=False)
                finally:
                    sem.runlock(H_SWITCH_GATE)
            if old is None:
                if not copied:
                    tail, _ = plog.append(self.pm, p.tail, raws, inode.ino, new_page)
                self.sync()                      # the copies on the disk first
                p.switched = True
                old = self._switch(inode, p.first, p.ftwin, tail, p.pages, last_seq,
                                   free=False)
        finally:
            self._free_page_pairs(spare)
        self._free_old_chain(old)
        return True

    def _spare_log_pages(self, tail: int, raws: list[bytes]) -> list[tuple[int, int]] | None:
        """The log pages (with their twins) that appending ``raws`` after
        ``tail`` opens (as :func:`log.append` fills pages), taken now; None
        (none kept) if there is no room."""
        need, in_page = 0, tail % L.BLOCK
        for r in raws:
            if in_page + len(r) > L.LOG_DATA:
                need += 1
                in_page = 0
            in_page += len(r)
        got: list[tuple[int, int]] = []
        try:
            for _ in range(need):
                got.append(self._new_log_page())
        except FsError:
            self._free_page_pairs(got)
            return None
        return got

    def _free_page_pairs(self, pairs: list[tuple[int, int]]) -> None:
        """Give back log pages taken with their twins (0: none) and never used."""
        for pair in pairs:
            for b in pair:
                if b:
                    self.alloc.free(b, 1)

    def _appended_since(self, p: PendingSwitch, inode: Inode) -> list[bytes] | None:
        """The raw entries committed to the file's logs since the chain was
        built, in sequence order (the cache, caught up under the locks, says
        where each log ends).  None when entries of several logs are to be
        merged and one of them continues an operation (F_CONT): merged by
        sequence number, an operation's entries would no longer follow one
        another, and a cut after a power loss could keep half of it."""
        pm, ino = self.pm, inode.ino
        runs: list[list[bytes]] = []
        try:
            if inode.tail != p.gtail:
                runs.append([bytes(r) for r in plog.walk(pm, p.head, inode.tail, ino,
                                                         self.max_log_pages, None, p.gtail)])
            for cpu, (lhead, ltail, _) in inode.local.items():
                old = p.local.get(cpu)
                start = old[1] if old is not None and old[0] == lhead else 0
                if ltail != start:
                    runs.append([bytes(r) for r in plog.walk(pm, lhead, ltail, ino,
                                                             self.max_log_pages, None, start)])
        except plog.LogError:
            return None
        runs = [r for r in runs if r]
        if len(runs) > 1 and any(raw[1] & L.F_CONT for r in runs for raw in r):
            return None
        keyed = sorted(((L.entry_seq(raw), raw) for r in runs for raw in r),
                       key=lambda x: x[0])
        if keyed and keyed[0][0] <= p.last_seq:
            return None                          # never: taken after the chain's own
        return [raw for _, raw in keyed]
