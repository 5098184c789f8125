"""The commit: entries appended to an inode's logs and made visible at once.

A change to one inode is one or more entries appended after its log tail and
one 8-byte store of the new tail (the commit point).  A change to several
inodes (a rename, a link) appends to each log and moves every tail in one lite
journal transaction.  File writes by a CPU other than the file's home CPU go
to that CPU's local log instead (pNOVA's per-core logs), committed by one
store of the local tail; its log pages come from the CPU's ring, refilled by
the designated refiller.
"""
from __future__ import annotations

import errno

from . import layout as L
from . import log as plog
from .errors import FsError
from .inode import Inode
from .ring import refill

RING_LOW = 32          # a ring holding fewer log pages than this is topped up


def _encode(entries: list[tuple], marks: bool = True) -> list[bytes]:
    """The entries of one operation for one log: every one but the last says the
    operation goes on (F_CONT; ``marks``: the image's version has the flag), so
    that recovery of a disk-backed image, which may find a log's later pages
    missing, cuts it between operations only."""
    if len(entries) == 1 or not marks:
        return [L.encode_entry(e) for e in entries]
    raws = [L.continued(L.encode_entry(e)) for e in entries[:-1]]
    raws.append(L.encode_entry(entries[-1]))
    return raws



class Commit:
    """Appending entries and committing them."""

    def _new_log_page(self) -> tuple[int, int]:
        """A log page from this CPU's region and its twin (0: the image keeps
        none) from the next CPU's, so that one damaged region never holds
        both copies."""
        return self._with_twin(self.alloc.alloc_one(self.cpu, meta=True))

    def _with_twin(self, blk: int) -> tuple[int, int]:
        """``blk`` and a twin for it from the next CPU's region (0 where the image
        keeps none); ``blk`` is freed if no twin can be had."""
        if not self.log_twins:
            return blk, 0
        try:
            return blk, self.alloc.alloc_one(self._twin_cpu, meta=True)
        except FsError:
            self.alloc.free(blk, 1)
            raise

    def _tail_twin(self, pages: list[int], tail: int) -> int | None:
        """The twin of the page holding ``tail``, when a cache's page list (each
        page followed by its twin) ends with that page; else None (the page
        tail says)."""
        if not self.log_twins:
            return 0
        if len(pages) >= 2 and pages[-2] == tail // L.BLOCK:
            return pages[-1]
        return None

    def _commit(self, changes: list[tuple[Inode, list[tuple]]],
                extra: list[tuple[int, int]] = (), extra_pages: list[int] = ()) -> list[int]:
        """Append entries to each inode's global log and make them visible atomically.

        ``extra`` are further 8-byte words (inode state) set in the same
        transaction.  ``extra_pages`` are blocks already allocated for this
        operation, freed if it fails.  Each inode's log lock is held from the
        append to the commit, and sequence numbers are taken under it, so a
        log's order is its sequence order.  Returns the data blocks the
        entries made unreferenced; the caller frees them (the commit is
        durable when this returns).
        """
        if len(changes) == 1 and not extra:
            return self._commit_one(*changes[0])
        pm = self.pm
        sch = self.scheme
        # Directories whose dentries go to this CPU's local log (19.3): their
        # arrays are made first, as that takes the directory's log lock.
        changes = list(changes)
        local = {k for k, (inode, entries) in enumerate(changes)
                 if self._dir_local(inode, entries)}
        for k in local:
            inode, entries = changes[k]
            if not inode.array:
                changes[k] = (self._ensure_array(inode), entries)
        locked = sorted({inode.ino for k, (inode, _) in enumerate(changes) if k not in local})
        for ino in locked:
            sch.log_lock(ino)
        # (inode, new tail, pages added, entries, where: "local" | "behind" |
        # "caught up", a new local log's head or None)
        appended: list[tuple[Inode, int, list[int], list[tuple], str, int | None]] = []
        updates: list[tuple[int, int]] = []
        try:
            try:
                for k, (inode, entries) in enumerate(changes):
                    if k in local:
                        entries = [(e[0], self._next_seq()) + e[2:] for e in entries]
                        line, tline, new_tail, pages, head = self._local_append(
                            inode, _encode(entries, self.marks))
                        # the array's line first, then its twin's (readers load
                        # the twin's first: a commit between is never damage)
                        updates.append((line + L.LA_TAIL, new_tail))
                        if tline:
                            updates.append((tline + L.LA_TAIL, new_tail))
                        appended.append((inode, new_tail, pages, entries, "local", head))
                        continue
                    tail = None
                    if self.shared:
                        if inode.is_dir:
                            inode, tail = self._dir_tail_under_log_lock(inode)
                        else:
                            inode = self._current_under_log_lock(inode)
                    entries = [(e[0], self._next_seq()) + e[2:] for e in entries]
                    raws = _encode(entries, self.marks)
                    at = inode.tail if tail is None else tail
                    twin = self._tail_twin(inode.log_pages, at)
                    new_tail, pages = plog.append(pm, at, raws, inode.ino, self._new_log_page,
                                                  self._twin_here(at) if twin is None else twin)
                    updates.append((self.inode_addr(inode.ino) + L.I_LOG_TAIL, new_tail))
                    appended.append((inode, new_tail, pages, entries,
                                     "caught up" if tail is None else "behind", None))
            except FsError as exc:
                for p in getattr(exc, "pages", []):
                    self.alloc.free(p, 1)
                for _, _, pages, _, _, _ in appended:
                    for p in pages:
                        self.alloc.free(p, 1)
                for p in extra_pages:
                    self.alloc.free(p, 1)
                raise
            # several words change at once: the lite journal makes them atomic
            # (a new local log's head, stored above, is durable by its F1)
            self.journals[self.cpu].run(updates + list(extra))
        finally:
            for ino in reversed(locked):
                sch.log_unlock(ino)
        # The caches follow after the locks are gone: they are this process's
        # alone, and the logs' waiters need not wait for them (DESIGN 19.8).
        freed: list[int] = []
        for inode, new_tail, pages, entries, where, head in appended:
            if where == "local":
                # this CPU's local log: its position in the cache is exact
                if head is not None:
                    inode.local[self.cpu] = [head, new_tail, pages]
                else:
                    have = inode.local[self.cpu]
                    have[1] = new_tail
                    have[2].extend(pages)
            if where != "caught up":
                # The cache keeps its tail and pages: the next validation
                # walks from there and applies, in log order, the other
                # processes' entries and these again (dentries, and link
                # counts changed only under the directory's exclusive lock,
                # give the same state either way).
                for e in entries:
                    inode.apply(e)
                if pages:
                    self._compact_wanted.add(inode.ino)   # looked at once caught up
            else:
                freed.extend(self._committed(inode, new_tail, pages, entries))
        return freed

    def _dir_local(self, inode: Inode, entries: list[tuple]) -> bool:
        """Whether this change goes to this CPU's local log of a directory
        (DESIGN 19.3): dentries only, made by a namespace operation that
        holds the directory shared (the names' locks order them), on a CPU
        other than the directory's home.  Changes of the directory's link
        count, `..` or attributes, and every change made while it is held
        whole, go to its global log."""
        if not self.dir_logs or not inode.is_dir or self._ns is None or \
                self.cpu == (inode.ino - 1) % self.ncpus:
            return False
        held = self._ns.get(inode.ino)
        return held is not None and not held[0] and \
            all(e[0] == L.E_DENTRY and e[3] != L.DOTDOT for e in entries)

    def _dir_tail_under_log_lock(self, inode: Inode) -> tuple[Inode, int | None]:
        """For a directory's append: the cached inode and, if only other
        processes' appends moved its tail since the cache last looked, the
        tail to append at (None: append at the cache's own tail).

        A namespace operation that holds the directory shared holds the locks of
        the names it changes, and its cache was validated under them, so it
        need not apply the entries the others committed meanwhile (all for
        other names) before its own: the catching up is left for the next
        validation, outside the log lock.  A directory held exclusively (its
        link count changes, it is being removed or compacted) is caught up
        now: only attribute changes compete for its log then, and what follows
        (an eviction frees every page the cache knows) needs the cache whole.
        Anything else (a compaction, a freed slot) is validated now too.
        """
        held = self._ns
        if held is None or held.get(inode.ino, (True,))[0]:
            return self._current_under_log_lock(inode), None
        gen, state, head, tail, array = self._slot_words(inode.ino)
        if (gen == inode.generation and state == L.STATE_LIVE and head == inode.head
                and array == inode.array and self._rewrites(inode.ino) == inode.rewrites):
            return inode, (None if tail == inode.tail else tail)
        return self._current_under_log_lock(inode), None

    def _current_under_log_lock(self, inode: Inode) -> Inode:
        """Catch up with appends by other processes before appending (a reload gives
        a new object: the entries go to that one).  Under the log lock the global
        log cannot move, so unchanged slot words mean the cache is current for it."""
        words = self._slot_words(inode.ino)
        if words != (inode.generation, L.STATE_LIVE, inode.head, inode.tail, inode.array) or \
                self._rewrites(inode.ino) != inode.rewrites:
            inode = self._validate(inode)
            if inode is None:
                raise FsError(errno.ENOENT)
        return inode

    def _committed(self, inode: Inode, new_tail: int, pages: list[int],
                   entries: list[tuple]) -> list[int]:
        """Bring the cache past a commit of ``entries``; return the blocks they freed."""
        inode.tail = new_tail
        if len(entries) == 1:
            freed = inode.apply(entries[0])
        else:
            freed = []
            for e in entries:
                freed.extend(inode.apply(e))
        if pages:
            inode.log_pages.extend(pages)
            self._want_compaction(inode)
        return freed

    def _commit_one(self, inode: Inode, entries: list[tuple]) -> list[int]:
        """:meth:`_commit` for one inode and no other words: one log, one tail
        store (the common case, kept short: it is on every write's path)."""
        sch = self.scheme
        ino = inode.ino
        addr = self.inode_addr(ino)
        sch.log_lock(ino)
        try:
            if self.shared:
                inode = self._current_under_log_lock(inode)
            seq = self._next_seq
            entries = [(e[0], seq()) + e[2:] for e in entries]
            new_tail, pages = self._append(inode.tail, _encode(entries, self.marks),
                                           ino, self._new_log_page, inode.log_pages)
            self._slot_commit(addr + L.I_LOG_TAIL, new_tail)
        finally:
            sch.log_unlock(ino)
        return self._committed(inode, new_tail, pages, entries)   # (after the lock, as above)

    def _append(self, tail: int, raws: list[bytes], ino: int, new_page,
                pages: list[int]) -> tuple[int, list[int]]:
        """:func:`plog.append`, with one entry that fits in the tail's page written
        directly; pages it allocated are freed again if it fails.  ``pages``:
        the cache's list of the log's pages."""
        twin = self._tail_twin(pages, tail)
        if len(raws) == 1:
            raw = raws[0]
            if tail % L.BLOCK + len(raw) <= L.LOG_DATA:
                plog.store_entry(self.pm, tail, raw,
                                 self._twin_here(tail) if twin is None else twin)
                return tail + len(raw), []
        try:
            if twin is None:
                twin = self._twin_here(tail)
            return plog.append(self.pm, tail, raws, ino, new_page, twin)
        except FsError as exc:
            for p in getattr(exc, "pages", []):
                self.alloc.free(p, 1)
            exc.pages = []                       # (freed: a caller must not again)
            raise

    def _twin_here(self, tail: int) -> int:
        """The twin of the page holding ``tail``, from that page's tail (EIO when
        it does not read: the log is repaired when it is next read whole)."""
        try:
            return plog.twin_of(self.pm, tail - tail % L.BLOCK)
        except plog.LogError as e:
            raise FsError(errno.EIO, str(e)) from None

    def _commit_local(self, inode: Inode, entries: list[tuple]) -> list[int]:
        """Append a file's write entries to this CPU's local log and commit them.

        Only this CPU ever appends to its local log, so no lock is taken: the
        commit is the one 8-byte store of the local tail, as for a global log.
        """
        pm = self.pm
        cpu = self.cpu
        if not inode.array:
            inode = self._ensure_array(inode)
        entries = [(e[0], self._next_seq()) + e[2:] for e in entries]
        line, tline, tail, more, head = self._local_append(inode, _encode(entries, self.marks))
        if head is not None:
            pm.fence()                                 # head before tail: tail 0 = no log yet
            for ln in (line, tline) if tline else (line,):
                pm.store_u64(ln + L.LA_TAIL, tail)
                pm.flush(ln + L.LA_TAIL, 8)
            pm.fence()                                 # committed
            inode.local[cpu] = [head, tail, more]
        else:
            if tline:
                pm.commit_u64_twice(line + L.LA_TAIL, tline + L.LA_TAIL, tail)
            else:
                pm.commit_u64(line + L.LA_TAIL, tail)
            have = inode.local[cpu]
            have[1] = tail
            if more:
                have[2].extend(more)
                self._want_compaction(inode)
        freed: list[int] = []
        for e in entries:
            freed.extend(inode.apply(e))
        return freed

    def _local_append(self, inode: Inode, raws: list[bytes]
                      ) -> tuple[int, int, int, list[int], int | None]:
        """Append encoded entries to this CPU's local log of ``inode`` (which
        has an array); no tail is stored.  A CPU without a local log there
        gets one: a page (and twin) holding the entries, fenced, then the head
        stored in the line of both array copies, not fenced (the caller
        fences before the tail store).  Returns (the line's byte offset, the
        twin array's line or 0, the new tail, the pages added, the new log's
        head or None)."""
        pm = self.pm
        cpu = self.cpu
        line = inode.array * L.BLOCK + cpu * L.LA_LINE
        # the line's copy in the array's twin (format 8), 0: none
        tline = inode.array_twin * L.BLOCK + cpu * L.LA_LINE if inode.array_twin else 0
        have = inode.local.get(cpu)
        if have is not None:
            tail, more = self._append(have[1], raws, inode.ino, self._local_page, have[2])
            return line, tline, tail, more, None
        page, twin = self._local_page()
        first = [page] + ([twin] if twin else [])
        try:
            plog.init_page(pm, page, inode.ino, twin)
            tail, more = plog.append(pm, page * L.BLOCK, raws, inode.ino, self._local_page,
                                     twin)
        except FsError as exc:
            for p in first + getattr(exc, "pages", []):
                self.alloc.free(p, 1)
            exc.pages = []                       # (freed: a caller must not again)
            raise
        pm.fence()                                     # entries durable before the log exists
        for ln in (line, tline) if tline else (line,):
            if twin:
                pm.store_u64(ln + L.LA_HEAD_TWIN, twin * L.BLOCK)
            pm.store_u64(ln + L.LA_HEAD, page * L.BLOCK)
            pm.flush(ln, 24)
        return line, tline, tail, first + more, page * L.BLOCK

    def _ensure_array(self, inode: Inode) -> Inode:
        """Give a file its per-core log array (an empty block, then one 8-byte store).

        Returns the current cache object of the inode (another process may
        have made the array first, which reloads it).
        """
        sch = self.scheme
        sch.log_lock(inode.ino)
        try:
            if self.shared:
                inode = self._validate(inode)
                if inode is None:
                    raise FsError(errno.ENOENT)
            if inode.array:
                return inode
            pm = self.pm
            blk = self.alloc.alloc_one(self.cpu, meta=True)
            tblk = 0
            if self.log_twins:                  # its twin, in the next CPU's region
                try:
                    tblk = self.alloc.alloc_one(self._twin_cpu, meta=True)
                except FsError:
                    self.alloc.free(blk, 1)
                    raise
            for b in (blk, tblk) if tblk else (blk,):
                pm.store_zero(b * L.BLOCK, L.BLOCK)
                pm.flush(b * L.BLOCK, L.BLOCK)
            pm.fence()                                 # zeroed lines before the pointer
            if pm.mode == "disk":
                pm.sync()       # on a disk too: a stale block's lines would name old logs
            addr = self.inode_addr(inode.ino)
            if tblk:                                   # the twin's word before the
                self._slot_store(addr + L.I_LOG_ARRAY_TWIN, tblk)   # array's (its fence)
            self._slot_commit(addr + L.I_LOG_ARRAY, blk)
            inode.array, inode.array_twin = blk, tblk
            return inode
        finally:
            sch.log_unlock(inode.ino)

    def _local_page(self) -> tuple[int, int]:
        """A log page for this CPU's local logs, from its ring, else allocated
        now; and its twin (0: none), from the next CPU's region."""
        v = None
        if self.shared:
            ring = self.rings[self.cpu]
            v = ring.pop()
            if self.ring_low is not None and len(ring) < RING_LOW:
                self.ring_low()
        return self._with_twin(v) if v else self._new_log_page()

    def refill_rings(self, low: int = RING_LOW) -> int:
        """The designated refiller: top up every CPU's ring of free log pages.

        Pages come from each CPU's own region (local write first); the pages
        in the rings are allocated but owned by no log, so a crash frees them.
        """
        if not self.local_logs or self.readonly:
            return 0

        def supplier(cpu: int):
            def supply(n: int) -> list[int]:
                try:
                    extents = self.alloc.alloc(cpu, n, meta=False)
                except FsError:                  # full: the rings stay short
                    return []
                return [b for s, c in extents for b in range(s, s + c)]
            return supply

        return sum(refill([ring], supplier(cpu), low) for cpu, ring in enumerate(self.rings))
