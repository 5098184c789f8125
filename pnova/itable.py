"""Inode life: slots of the per-CPU inode tables, making a new inode,
references held by the kernel and other users, and eviction.
"""
from __future__ import annotations

import errno
import struct
import time

from . import layout as L
from . import log as plog
from .errors import FsError
from .inode import Inode
from .namei import namespace_op
from .shared import H_HELD_INOS, ISLOT, REF_DYING


# line 1 of an inode slot: state, log head, log tail, log array, then zeros
_LINE1 = struct.Struct("<QQQQQQ16x")   # state, head, tail, array, head's twin, array's twin


class InodeTable:
    """Allocating, creating, referencing and evicting inodes."""

    def _alloc_ino(self) -> int:
        """A free inode slot: this CPU's table first, then the others."""
        if self.hold_inos:
            self.alloc.release_synced()
        for attempt in (0, 1, 2):
            order = [self.cpu] + [c for c in range(self.ncpus) if c != self.cpu]
            for c in order:
                got = self.free_inodes[c].alloc(1)
                if got:
                    return self.ino_of(c, got[0][0])
            if attempt == 2 or not self.area.w.load64(H_HELD_INOS):
                break
            # What any CPU held back is free after a sync; a slot queued behind
            # blocks that wait for the sync record, after a second one.
            self.sync()
        raise FsError(errno.ENOSPC)

    def _release_ino(self, ino: int, held: bool = True) -> None:
        """Give an inode slot back.  On a disk-backed image a slot freed by an
        eviction waits for the next completed sync, as a freed block does: the
        state on the disk may still name the old inode, whose name must not
        come to mean a new one after a power loss (DESIGN 24.3).  ``held=False``:
        a slot that never held a live inode."""
        if held and self.hold_inos:
            self.alloc.hold_ino(ino)
            return
        self.free_inodes[(ino - 1) % self.ncpus].free((ino - 1) // self.ncpus, 1)

    def _make_inode(self, mode: int, uid: int, gid: int, rdev: int,
                    entries: list[tuple], data: bytes | None = None) -> tuple[Inode, int, list[int]]:
        """Write a new inode slot (state still FREE) with its first log page.

        Returns (inode object, slot address, blocks allocated).  The caller
        flips the state word to LIVE inside its journal transaction.
        """
        pm = self.pm
        ino = self._alloc_ino()
        # the count of the slot's last inode ended as REF_DYING (or 0)
        self.area.w.store32(self.area.refs + ISLOT * (ino - 1), 0)
        allocated: list[int] = []
        try:
            page = self.alloc.alloc_one(self.cpu, meta=False)
            allocated.append(page)
            twin = 0
            if self.log_twins:
                twin = self.alloc.alloc_one(self._twin_cpu, meta=False)
                allocated.append(twin)
            plog.init_page(pm, page, ino, twin)
            if data is not None:            # symlink target: one data block
                blk = self.alloc.alloc_one(self.cpu, meta=False)
                allocated.append(blk)
                pm.store(blk * L.BLOCK, data)
                pm.store_zero(blk * L.BLOCK + len(data), L.BLOCK - len(data))
                pm.flush(blk * L.BLOCK, L.BLOCK)
                digest = self.prot.seal(blk, 1)
                entries = entries + [(L.E_WRITE, self._next_seq(), 0, 1, blk, len(data),
                                      entries[0][-1] if entries else time.time_ns(), digest)]
            now = time.time_ns()
            seq = self._next_seq()
            st = L.InodeStatic(mode, uid, gid, 0, rdev, seq, now, seq)
            tail, more = page * L.BLOCK, []
            if entries:
                tail, more = plog.append(pm, tail, [L.encode_entry(e) for e in entries],
                                         ino, self._new_log_page, twin)
                allocated.extend(more)
        except FsError as exc:
            for b in allocated + getattr(exc, "pages", []):
                self.alloc.free(b, 1)
            self._release_ino(ino, held=False)
            raise
        addr = self.inode_addr(ino)
        # line 0, then line 1: state FREE (0), head, tail, no log array
        self._slot_write(addr, st.pack() + _LINE1.pack(L.STATE_FREE, page * L.BLOCK, tail, 0,
                                                        twin * L.BLOCK, 0))
        inode = Inode(ino, st, page * L.BLOCK, tail, wide=self.pm.mode == "disk")
        inode.log_pages = [page] + ([twin] if twin else []) + more
        for e in entries:
            inode.apply(e)
        return inode, addr, allocated

    def _refs(self, ino: int) -> int:
        return self.area.w.load32(self.area.refs + ISLOT * (ino - 1))

    def ref(self, ino: int, n: int = 1, generation: int | None = None) -> None:
        """The kernel (or another user) now holds ``n`` more references.

        The count lives in the shared area, so an inode unlinked by one
        process stays alive while another still holds references.  With
        ``generation`` (what the lookup that found the inode saw), an inode
        that another process freed meanwhile, whose slot may already hold a
        new inode, is not counted: ENOENT, as if the lookup came after the
        unlink.  The evictor turns a count of 0 into REF_DYING with a
        compare-and-swap, so a count is either taken before the eviction
        decides (which then does not happen) or fails (DESIGN 19.8).
        """
        w = self.area.w
        off = self.area.refs + ISLOT * (ino - 1)
        if generation is None:
            self.get(ino)
        while True:
            v = w.load32(off)
            if v & REF_DYING:
                raise FsError(errno.ENOENT)
            if w.cas32(off, v, v + n):
                break
        if generation is not None:
            gen, state, *_ = self._slot_words(ino)
            if gen != generation or state != L.STATE_LIVE:
                self.forget(ino, n)              # the slot's new inode: not ours to count
                raise FsError(errno.ENOENT)

    def forget(self, ino: int, n: int = 1) -> None:
        """Drop ``n`` references; the last one frees an inode that has no name."""
        if not self._valid_ino(ino):
            return
        off = self.area.refs + ISLOT * (ino - 1)
        old = self.area.w.add32(off, -n)
        if old < n:                              # more forgets than refs: clamp at 0
            self.area.w.add32(off, n - old)
            old = n
        if old == n and not self.readonly:
            self._forget_last(ino)

    @namespace_op
    def _forget_last(self, ino: int) -> None:
        # Under its namespace lock no unlink or rename can change the link
        # count between the check and the eviction.
        self._ns_lock(ino)
        try:
            inode = self.get(ino)
        except FsError:
            return                               # already gone
        self._maybe_evict(inode)

    def _maybe_evict(self, inode: Inode) -> None:
        """Free an inode once it has no name and no reference in any process."""
        # _commit may have replaced the cache object (a reload): use the current one
        inode = self.cache.get(inode.ino, inode)
        if inode.nlink == 0 and self._refs(inode.ino) == 0:
            if self.shared:
                # Under the inode's namespace lock: every page of its logs,
                # whoever appended it, must be in the cache to be freed.
                inode = self._validate(inode)
                if inode is None or inode.nlink != 0:
                    return
                # No reference may be taken from here on (a lookup that found
                # the name before it went fails instead); the slot's next
                # inode starts from 0 again (_make_inode).
                if not self.area.w.cas32(self.area.refs + ISLOT * (inode.ino - 1), 0, REF_DYING):
                    return
            self._evict(inode)

    def _evict(self, inode: Inode) -> None:
        """Free an inode with no links and no users: state word first, then blocks."""
        addr = self.inode_addr(inode.ino)
        self._slot_commit(addr + L.I_STATE, L.STATE_FREE)   # after this the inode is gone
        self._free_blocks(self._blocks_of(inode))
        self.cache.pop(inode.ino, None)
        self._release_ino(inode.ino)
