"""The per-process inode cache and its validation against the device.

Each process keeps DRAM inodes built from the logs.  When several processes
share the device, another one may have appended to an inode's logs, compacted
them, or freed and reused the slot: every use validates the cached inode
against the slot's words first and catches up with what was appended.
"""
from __future__ import annotations

import errno
import hashlib
import logging

from . import layout as L
from . import log as plog
from .errors import FsError
from .inode import Inode
from .rebuild import RETRIES


logger = logging.getLogger("pnova")


def log_positions(inode: Inode) -> int:
    """How far a cache has read an inode's logs, as one word: the global tail
    alone when it knows no local log, else a 63-bit digest of every
    position with the top bit set (a tail is below 2**63).  A compaction
    record (:meth:`InodeCache._adopt`) names the state it started from so."""
    if not inode.local:
        return inode.tail
    key = repr((inode.tail, sorted((c, v[0], v[1]) for c, v in inode.local.items())))
    return (1 << 63) | int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(),
                                      "little") >> 1


class InodeCache:
    """Cached inodes, validated before use when processes share the device."""

    def _validate(self, inode: Inode) -> Inode | None:
        """Bring a cached inode up to date with the device (other processes write it).

        Returns the inode (caught up, or reloaded), or None if it is gone.
        Entries appended since the cache last looked are replayed in sequence
        order; a new log head or array (compaction) means a reload.

        No lock is taken: the read is optimistic.  Compaction changes head,
        tail and array through the journal, one word at a time, so a reader
        can see a mix; it re-reads head and array after walking and starts
        again if either moved (every compaction moves the head).
        """
        for _ in range(RETRIES):
            rewrites = self._rewrites_settled(inode.ino)
            gen, state, head, _tail, array = self._slot_words(inode.ino)
            if state != L.STATE_LIVE or gen != inode.generation:
                self.cache.pop(inode.ino, None)
                return None
            if head != inode.head or array != inode.array or rewrites != inode.rewrites:
                if rewrites == inode.rewrites + 2 and not array and inode.dents is not None \
                        and self._adopt(inode, rewrites, head):
                    continue                     # on the new chain: catch up from its tail
                if head == inode.head and rewrites == inode.rewrites and not inode.array \
                        and not inode.local:
                    # An array appeared (the first write or dentry of another
                    # CPU): its lines were zero when it was stored and only
                    # lead to entries since, so the cache reads them from their
                    # heads instead of reading the whole inode again.
                    inode.array = array
                    inode.array_twin = self.pm.words.load64(self.inode_addr(inode.ino)
                                                            + L.I_LOG_ARRAY_TWIN)
                    continue
                return self._reload(inode)
            if _tail == inode.tail and (not array or self._locals_unchanged(inode)):
                return inode                     # no log has grown
            mark = len(self._found)
            try:
                new, tail, gpages, local = self._gather(inode.ino, head, array, inode.tail,
                                                        inode.local, 0, inode.array_twin,
                                                        None, inode.dents is not None)
                torn = False
            except (plog.LogError, ValueError):
                torn = True
            _g, _s, head2, _t, array2 = self._slot_words(inode.ino)
            if head2 != head or array2 != array or self._rewrites(inode.ino) != rewrites:
                del self._found[mark:]           # what it found may be freed pages
                continue                    # compacted meanwhile: look again
            if torn:
                del self._found[mark:]
                return self._reload(inode)
            self._found_valid(mark)
            inode.tail = tail
            inode.log_pages.extend(gpages)
            for cpu, (lhead, ltail, lpages) in local.items():
                have = inode.local.get(cpu)
                if have is not None and have[0] == lhead:
                    have[1] = ltail
                    have[2].extend(lpages)
                else:
                    inode.local[cpu] = [lhead, ltail, lpages]
            if new:
                if array:
                    new.sort(key=lambda e: e[1])
                try:
                    inode.apply_all(new)
                except ValueError:
                    # Not this inode's entries: its pages were freed and reused
                    # meanwhile.  A reload from the slot tells gone from damaged.
                    return self._reload(inode)
            return inode
        return self._reload(inode)

    def _locals_unchanged(self, inode: Inode) -> bool:
        """Whether every local log of an inode with an array ends where this
        cache read to: every line's tail where the cache has it (a writer
        stores the array's line first).  One load of the tails instead of
        reading both copies of every line (a directory several CPUs use is
        validated on every lookup and getattr)."""
        local = inode.local
        tails = self.pm.words.load64s(inode.array * L.BLOCK + L.LA_TAIL, self.ncpus,
                                      L.LA_LINE)
        if not all(t == (local[c][1] if c in local else 0) for c, t in enumerate(tails)):
            return False
        # The array was read after the slot's words: a compaction (or an rmdir
        # and the slot's reuse) may have freed its block meanwhile, and the
        # tails read from whatever holds it now.  The same words again, and
        # the rewrite count, say that the block was still the array.
        gen, state, head, tail, array = self._slot_words(inode.ino)
        return (array == inode.array and head == inode.head and tail == inode.tail
                and gen == inode.generation and state == L.STATE_LIVE
                and self._rewrites(inode.ino) == inode.rewrites)

    def _unchanged(self, inode: Inode) -> bool:
        """Whether no process has changed a cached inode since this cache read
        it (the first look of :meth:`_validate`, which catches up otherwise):
        the cache is then exact as it stands."""
        # The words first: a directory others change fails here, after one
        # load.  Read after them, an unchanged, even rewrite count says no
        # compaction began before they were read, and none switched them
        # while they were (an odd count is waited out, and then differs).
        gen, state, head, tail, array = self._slot_words(inode.ino)
        return (tail == inode.tail and head == inode.head and state == L.STATE_LIVE
                and gen == inode.generation and array == inode.array
                and self._rewrites_settled(inode.ino) == inode.rewrites
                and (not array or self._locals_unchanged(inode)))

    def _adopt(self, inode: Inode, rewrites: int, head: int) -> bool:
        """Move a cached directory onto the chain another process compacted its
        log into, when the compaction (its record in the shared area) started
        from exactly the state this cache holds: same head, same tail.  The
        new chain then holds this cache's names, attributes and positions;
        only its pages are walked (no entry is read).  False: reload.

        Before the record, every compaction of a shared directory made every
        other process re-read all of it (DESIGN 19.5)."""
        rec = self.area.compaction(inode.ino)
        if rec is None:
            return False
        r, old_head, old_tail, new_head, new_tail, last_seq = rec
        if (r, old_head, old_tail, new_head) != (rewrites, inode.head, log_positions(inode),
                                                 head):
            return False
        try:
            pages = plog.chain_pages(self.pm, new_head, new_tail, inode.ino,
                                     self.max_log_pages)
        except plog.LogError:
            return False
        if self._rewrites(inode.ino) != rewrites:
            return False                         # compacted again meanwhile: its pages may be gone
        inode.head, inode.tail, inode.log_pages = new_head, new_tail, pages
        inode.array = inode.array_twin = 0       # the new chain replaced its local logs
        inode.local = {}
        inode.rewrites = rewrites
        # the compaction's attribute entries carry newer sequence numbers
        inode.tseq = max(inode.tseq, last_seq)
        return True

    def _reload(self, old: Inode) -> Inode:
        try:
            inode, _ = self._read_inode(old.ino)
        except (plog.LogError, ValueError) as e:
            inode = self._read_replica(old.ino, e)
            if inode is None:
                logger.error("inode %d is damaged: %s (run fsck.pnova)", old.ino, e)
                raise FsError(errno.EIO) from None
        self.cache[old.ino] = inode
        return inode

    def get(self, ino: int) -> Inode:
        """The cached inode, loaded from the device on first use (validated first
        when several processes share the device)."""
        inode = self.cache.get(ino)
        if inode is not None:
            if not self.shared:
                return inode
            inode = self._validate(inode)
            if inode is not None:
                return inode
        if not self._valid_ino(ino):
            raise FsError(errno.ENOENT)
        state = self.pm.read_u64(self.inode_addr(ino) + L.I_STATE)
        why = None
        if self.pm.poison and self.pm.poisoned(self.inode_addr(ino), L.INODE_SIZE):
            why = "a media error"
        elif state not in (L.STATE_LIVE, L.STATE_FREE):    # damaged: not the same as gone
            why = f"a bad state word ({state:#x})"
        if why is not None:
            inode = self._read_replica(ino, why)
            if inode is None:
                logger.error("inode %d: its slot has %s; run fsck.pnova", ino, why)
                raise FsError(errno.EIO)
            self.cache[ino] = inode
            return inode
        if state != L.STATE_LIVE:
            raise FsError(errno.ENOENT)
        try:
            inode, _ = self._read_inode(ino)
        except (plog.LogError, ValueError) as e:
            inode = self._read_replica(ino, e)
            if inode is None:
                logger.error("inode %d is damaged: %s (run fsck.pnova)", ino, e)
                raise FsError(errno.EIO) from None
        self.cache[ino] = inode
        return inode
