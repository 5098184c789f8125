"""Building DRAM state from the device (NOVA's rebuild): an inode from its
global log and per-core local logs, the free-inode bitmaps from the inode
tables, the allocator from a clean unmount's saved bitmaps, and the whole
recovery of an image that was not unmounted cleanly (journal rollback, then
replay of every live inode's logs).
"""
from __future__ import annotations

import logging
import time

import numpy as np

from . import layout as L
from . import log as plog
from .errors import CorruptImage
from .inode import Inode
from .journal import JournalError
from .shared import H_SEQ


logger = logging.getLogger("pnova")

# How often an optimistic read of an inode's logs is repeated before giving up.
RETRIES = 100


class Rebuild:
    """Reading inodes and rebuilding indexes from the device."""

    def _state_words(self, r: L.Region) -> np.ndarray:
        words = self.pm.buf[r.itable_start * L.BLOCK:
                            r.itable_start * L.BLOCK + self.sb.inodes_per_cpu * L.INODE_SIZE]
        return words.view("<u8").reshape(-1, L.INODE_SIZE // 8)[:, L.I_STATE // 8]

    def _build_free_inodes(self, clean: bool = False) -> list[int]:
        """Free-inode bitmaps from the state words; return the live inode numbers.

        A state word that is neither free nor live is damage.  On a clean image
        the slot is left alone (never allocated; using it answers EIO) and the
        saved bitmaps keep whatever blocks it had; recovery, which rebuilds the
        bitmaps from the live inodes' logs, cannot know those blocks and refuses
        (fsck.pnova decides what the slot was).
        """
        live: list[int] = []
        for r in self.regions:
            st = self._state_words(r).copy()      # a copy: no view outlives an error
            unreadable: set[int] = set()
            if self.pm.poison:
                # a slot in a poisoned sector cannot be read: damaged, whatever it holds
                base = r.itable_start * L.BLOCK
                for sec in self.pm.poisoned(base, self.sb.inodes_per_cpu * L.INODE_SIZE):
                    first = (sec * 512 - base) // L.INODE_SIZE
                    for i in range(first, min(first + 512 // L.INODE_SIZE, len(st))):
                        unreadable.add(i)
                        st[i] = 0xBAD
            bad = np.flatnonzero((st != L.STATE_FREE) & (st != L.STATE_LIVE))
            if len(bad) and not clean:
                ino = self.ino_of(r.cpu, int(bad[0]))
                raise CorruptImage(f"{self.pm.path}: inode {ino} has a bad state word; "
                                   "run fsck.pnova")
            for i in bad.tolist():
                what = "'s slot has a media error" if i in unreadable else \
                    f" has a bad state word ({int(st[i]):#x})"
                logger.error("%s: inode %d%s; it is left alone (fsck.pnova repairs it)",
                             self.pm.path, self.ino_of(r.cpu, i), what)
            if r.cpu == 0 and st[0] == L.STATE_FREE:
                raise CorruptImage(f"{self.pm.path}: the root inode is not live; run fsck.pnova")
            self.free_inodes[r.cpu].load(st != L.STATE_FREE)
            idx = np.flatnonzero(st == L.STATE_LIVE)
            live.extend((1 + idx * self.ncpus + r.cpu).tolist())
        return live

    @property
    def nfree_inodes(self) -> int:
        return sum(b.nfree for b in self.free_inodes)

    def _load_clean(self) -> None:
        self._build_free_inodes(clean=True)
        for ra in self.alloc.regions:
            r = ra.region
            raw = self.pm.buf[r.bitmap_start * L.BLOCK:(r.bitmap_start + r.bitmap_blocks) * L.BLOCK]
            used = np.unpackbits(raw, bitorder="little")[:r.data_blocks].astype(bool)
            ra.load(used)

    def _recover(self) -> None:
        """Roll back open journals, then rebuild every index by replaying every log."""
        t0 = time.monotonic()
        undone = 0
        for j in self.journals:
            try:
                recs = j.pending()
            except JournalError as e:
                raise CorruptImage(f"{self.pm.path}: lite journal damaged ({e}); "
                                   "run fsck.pnova") from None
            for addr, _old in recs or ():
                if not self._is_inode_word(addr):
                    raise CorruptImage(f"{self.pm.path}: lite journal points outside the "
                                       "inode tables; run fsck.pnova")
            undone += j.rollback()
        live = self._build_free_inodes()
        used = [np.zeros(ra.hi - ra.lo, dtype=bool) for ra in self.alloc.regions]
        maxseq = self.sb.next_seq
        orphans = []
        for ino in live:
            try:
                inode, seq = self._read_inode(ino)
            except (plog.LogError, ValueError) as e:
                raise CorruptImage(f"{self.pm.path}: inode {ino}: {e}; run fsck.pnova") from None
            maxseq = max(maxseq, seq + 1)
            self.cache[ino] = inode
            for b in self._blocks_of(inode):
                self._mark(used, b, ino)
            if inode.nlink == 0:
                orphans.append(inode)
        for ra, u in zip(self.alloc.regions, used):
            ra.load(u)
        self.area.w.store64(H_SEQ, maxseq)
        if 1 not in self.cache:
            raise CorruptImage(f"{self.pm.path}: the root inode is missing; run fsck.pnova")
        for inode in orphans:
            self._evict(inode)
        logger.info("recovery: %d journal words undone, %d inodes replayed, %d orphans "
                    "freed in %.3f s", undone, len(live), len(orphans), time.monotonic() - t0)

    def _mark(self, used: list[np.ndarray], block: int, ino: int) -> None:
        try:
            ra = self.alloc.owner(block)
        except AssertionError:
            raise CorruptImage(f"{self.pm.path}: inode {ino} uses block {block}, outside "
                               "the data area; run fsck.pnova") from None
        u = used[ra.region.cpu]
        if u[block - ra.lo]:
            raise CorruptImage(f"{self.pm.path}: block {block} is used twice (inode {ino}); "
                               "run fsck.pnova")
        u[block - ra.lo] = True

    def _is_inode_word(self, addr: int) -> bool:
        return L.is_journaled_word(addr, self.regions, self.sb.inodes_per_cpu)

    def _check_entry(self, e: tuple) -> None:
        """A CRC only proves an entry is what was written: check its ranges too."""
        if e[0] == L.E_WRITE:
            total = self.sb.total_blocks
            if not (1 <= e[3] <= total and 2 <= e[4] and e[4] + e[3] <= total
                    and e[2] + e[3] <= L.MAX_FILE_SIZE // L.BLOCK and e[5] <= L.MAX_FILE_SIZE):
                raise ValueError(f"write entry (seq {e[1]}) maps {e[3]} page(s) at block "
                                 f"{e[4]}, outside the device")
        elif e[0] == L.E_SETATTR and e[2] & L.SA_SIZE and e[6] > L.MAX_FILE_SIZE:
            raise ValueError(f"setattr entry (seq {e[1]}) sets an impossible size")

    def _entries(self, head: int, tail: int, ino: int, pages: list[int],
                 start: int = 0) -> list[tuple]:
        out = []
        for raw in plog.walk(self.pm, head, tail, ino, self.max_log_pages, pages, start):
            e = L.decode_entry(raw)
            self._check_entry(e)
            out.append(e)
        return out

    def _local_lines(self, array: int) -> list[tuple[int, int, int]]:
        """(cpu, head, tail) of every live local log in a per-core log array."""
        if not (self.regions[0].data_start <= array < self.sb.total_blocks - 1):
            raise ValueError(f"per-core log array at block {array} is outside the device")
        base = array * L.BLOCK
        out = []
        for cpu in range(self.ncpus):
            head = self.pm.read_u64(base + cpu * L.LA_LINE + L.LA_HEAD)
            tail = self.pm.read_u64(base + cpu * L.LA_LINE + L.LA_TAIL)
            if head and tail:            # a head without a tail: a log never committed
                out.append((cpu, head, tail))
        return out

    def _read_lines(self, base: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(heads, tails) of every line of the per-core log array at byte ``base``.

        Tails first: a log's head is stored before its first tail, so a tail
        seen set has its head set too.  Each word is loaded whole: another
        process may be storing its tail meanwhile."""
        w = self.pm.words
        tails = w.load64s(base + L.LA_TAIL, self.ncpus, L.LA_LINE)
        return w.load64s(base + L.LA_HEAD, self.ncpus, L.LA_LINE), tails

    def _read_inode(self, ino: int) -> tuple[Inode, int]:
        """Build an Inode from its slot and logs; return it and its highest seq.

        A file's entries may sit in its global log and in per-core local logs:
        they are merged by sequence number.  A directory has one log, replayed
        in order.  With several processes the read is optimistic (see
        :meth:`_validate`): it is repeated if a compaction moved the head or
        the array meanwhile.
        """
        if not self.shared:
            got = self._read_inode_once(ino)
            got[0].rewrites = self._rewrites(ino)
            return got
        addr = self.inode_addr(ino)
        err: Exception | None = None
        for _ in range(RETRIES):
            rewrites = self._rewrites(ino)
            head = self.pm.read_u64(addr + L.I_LOG_HEAD)
            array = self.pm.read_u64(addr + L.I_LOG_ARRAY)
            try:
                got = self._read_inode_once(ino)
            except (plog.LogError, ValueError) as e:
                got, err = None, e
            if self.pm.read_u64(addr + L.I_LOG_HEAD) == head and \
                    self.pm.read_u64(addr + L.I_LOG_ARRAY) == array and \
                    self._rewrites(ino) == rewrites:
                if got is None:
                    raise err
                got[0].rewrites = rewrites
                return got
        raise err or plog.LogError("the log kept changing while it was read")

    def _read_inode_once(self, ino: int) -> tuple[Inode, int]:
        addr = self.inode_addr(ino)
        pm = self.pm
        if pm.poison and pm.poisoned(addr, L.INODE_SIZE):
            raise ValueError(f"the slot of inode {ino} has a media error (poisoned sector)")
        st = L.InodeStatic.unpack(pm.read(addr, 64))
        head = pm.read_u64(addr + L.I_LOG_HEAD)
        array = pm.read_u64(addr + L.I_LOG_ARRAY)
        inode = Inode(ino, st, head, 0)
        if array:
            if inode.is_dir:
                raise ValueError("a directory has per-core logs")
            self._local_lines(array)             # checks where the array lies
        entries, inode.tail, inode.log_pages, inode.local = self._gather(ino, head, array, 0, {})
        inode.array = array
        if array:
            entries.sort(key=lambda e: e[1])
        maxseq = st.create_seq
        for e in entries:
            if e[1] > maxseq:
                maxseq = e[1]
            inode.apply(e)
        return inode, maxseq

    def _gather(self, ino: int, head: int, array: int, gtail: int,
                known: dict[int, list]) -> tuple[list[tuple], int, list[int], dict[int, list]]:
        """Collect every entry committed past the given positions of an inode's logs.

        ``gtail`` is how far the global log was read (0: not at all), ``known``
        maps a CPU to [head, tail, pages] of its local log as far as read.
        Tails are read one after the other, so a pass can see a later write in
        one log without an earlier conflicting write in a log it read before;
        the passes repeat until one finds no tail moved, which closes that gap
        (the earlier write committed before the later one could take its lock).
        Returns (entries, global tail, new global pages, local positions, with
        each log's page list holding only pages not in ``known``).
        """
        words = self.pm.words
        tail_addr = self.inode_addr(ino) + L.I_LOG_TAIL
        local = {c: [h, t, []] for c, (h, t, _) in known.items()}
        gpages: list[int] = []
        out: list[tuple] = []
        base = array * L.BLOCK
        ncpus = self.ncpus
        while True:
            moved = False
            tail = words.load64(tail_addr)
            if tail != gtail:
                out += self._entries(head, tail, ino, gpages, gtail)
                gtail = tail
                moved = True
            if array:
                heads, tails = self._read_lines(base)
                for cpu in range(ncpus):
                    lhead, ltail = heads[cpu], tails[cpu]
                    have = local.get(cpu)
                    if ltail == (have[1] if have else 0) or not (lhead and ltail):
                        continue                 # unchanged, or a log never committed
                    if have is None or have[0] != lhead:
                        have = local[cpu] = [lhead, 0, []]
                    got = self._entries(lhead, ltail, ino, have[2], have[1])
                    if any(e[0] != L.E_WRITE for e in got):
                        raise ValueError(f"the local log of CPU {cpu} holds an entry "
                                         "other than a file write")
                    out += got
                    have[1] = ltail
                    moved = True
            if not moved:
                return out, gtail, gpages, local

    def _blocks_of(self, inode: Inode) -> list[int]:
        """Every block an inode owns: log pages, local logs, log array, data pages."""
        blocks = list(inode.log_pages)
        for _, _, lpages in inode.local.values():
            blocks.extend(lpages)
        if inode.array:
            blocks.append(inode.array)
        if inode.pages:
            blocks.extend(inode.pages.values())
        return blocks
