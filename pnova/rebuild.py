"""Building DRAM state from the device (NOVA's rebuild): an inode from its
global log and per-core local logs, the free-inode bitmaps from the inode
tables, the allocator from a clean unmount's saved bitmaps, and the whole
recovery of an image that was not unmounted cleanly (journal rollback, then
replay of every live inode's logs).
"""
from __future__ import annotations

import errno
import logging
import os
import stat
import struct
import time

import numpy as np

from . import layout as L
from . import log as plog
from .errors import CorruptImage, FsError
from .inode import Inode
from .journal import JournalError
from .replica import all_foreign, pick_line
from .shared import H_SEQ


logger = logging.getLogger("pnova")

# How often an optimistic read of an inode's logs is repeated before giving up.
RETRIES = 100


RESTARTS = 16          # undos one recovery may make before it gives up

# How long a reader waits for the two copies of a per-core log array line to
# agree again, another process being between its two stores of a commit (s).
LINES_WAIT = 0.02


class _Restart(Exception):
    """An undo changed logs on the disk: recovery starts over from them."""


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

    def _saved_bitmaps_poisoned(self) -> bool:
        """Whether a sector of the saved allocator bitmaps is poisoned."""
        pm = self.pm
        return bool(pm.poison) and any(
            pm.poisoned(ra.region.bitmap_start * L.BLOCK, ra.region.bitmap_blocks * L.BLOCK)
            for ra in self.alloc.regions)

    def _clear_poisoned_journals(self) -> None:
        """A clean image has no open transaction: a journal block with a media
        error is rewritten whole (which clears the poison) before it is used."""
        pm = self.pm
        if not pm.poison:
            return
        for j in self.journals:
            if pm.poisoned(j.base, L.BLOCK):
                logger.warning("%s: the lite journal at block %d had a media error; "
                               "rewritten (the image was clean)", pm.path, j.base // L.BLOCK)
                pm.store_zero(j.base, L.BLOCK)
                pm.flush(j.base, L.BLOCK)
                pm.fence()

    def _load_clean(self) -> None:
        self._build_free_inodes(clean=True)
        for ra in self.alloc.regions:
            r = ra.region
            raw = self.pm.buf[r.bitmap_start * L.BLOCK:(r.bitmap_start + r.bitmap_blocks) * L.BLOCK]
            used = np.unpackbits(raw, bitorder="little")[:r.data_blocks].astype(bool)
            ra.load(used)

    def _recover(self) -> None:
        """Roll back open journals, then rebuild every index by replaying every log
        (again, after an undo on the disk's logs that a power loss called for)."""
        for _ in range(RESTARTS):
            try:
                self._repair_in_place = True
                self._recover_once()
                return
            except _Restart:
                self.cache.clear()
            finally:
                self._repair_in_place = False
        raise CorruptImage(f"{self.pm.path}: recovery from the power loss does not settle; "
                           "run fsck.pnova")

    def _cut_dependents(self, seq: int, moved: set[int]) -> None:
        """After undoing an operation (sequence ``seq``) that moved the inodes
        ``moved``: cut every log, from its first later operation that used
        them, a name added for or removed from one of them, or a change of one
        of them.  Such an operation came after the undone one, so after the
        last sync; the rest of those logs goes with it (later still)."""
        pm = self.pm
        for x in self._build_free_inodes():
            addr = self.inode_addr(x)
            logs = [(None, pm.read_u64(addr + L.I_LOG_HEAD), pm.read_u64(addr + L.I_LOG_TAIL),
                     pm.read_u64(addr + L.I_LOG_HEAD_TWIN))]
            try:
                array, twin, lines = self._lines_of(x, addr)
                logs += [(cpu, h, t, tw) for cpu, h, t, tw in lines]
                for cpu, head, tail, htw in logs:
                    cut = self._first_dependent(x, head, tail, seq, moved, htw)
                    if cut is None:
                        continue
                    if cpu is None:
                        self._slot_commit(addr + L.I_LOG_TAIL, cut)
                    else:
                        self._line_commit(array, twin, cpu, 0 if cut == head else cut)
            except (plog.LogError, ValueError):
                continue                         # left to the rebuild to report

    def _first_dependent(self, ino: int, head: int, tail: int, seq: int,
                         moved: set[int], twin: int = 0) -> int | None:
        """Where the first operation after ``seq`` in this log that uses an inode
        of ``moved`` starts (None: there is none)."""
        stop: dict = {}
        start, first, dep = head, None, False
        names: dict[bytes, int] = {}
        for raw in plog.walk(self.pm, head, tail, ino, self.max_log_pages, None, 0, stop,
                             twin // L.BLOCK):
            e = L.decode_entry(raw)
            if first is None:
                first = e[1]
            hit = ino in moved
            if e[0] == L.E_DENTRY:
                if e[2] == L.D_ADD:
                    hit = hit or e[4] in moved
                    names[e[3]] = e[4]
                else:
                    hit = hit or names.pop(e[3], 0) in moved or e[4] in moved
            dep = dep or (hit and first > seq)
            if not raw[1] & L.F_CONT:
                if dep:
                    return start
                start, first = stop["pos"] + len(raw), None
        return None

    def _recover_once(self) -> None:
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
            if j.from_twin:
                logger.warning("%s: the records of lite journal block %d are damaged; "
                               "rolling back from their twin", self.pm.path,
                               j.base // L.BLOCK)
            undone += j.rollback()
        live = self._build_free_inodes()
        used = [np.zeros(ra.hi - ra.lo, dtype=bool) for ra in self.alloc.regions]
        maxseq = self.sb.next_seq
        orphans = []
        cut = 0
        lossy = self._pages_may_be_lost()
        for ino in list(live):
            if lossy:
                # A power loss on a disk-backed image: pages written since the
                # last sync may be missing (DESIGN 24.3).
                try:
                    got = self._cut_torn_logs(ino)
                except (plog.LogError, ValueError):
                    got = 0                      # left to the read below to report
                if got is None:
                    live.remove(ino)
                    continue
                cut += got
            try:
                inode, seq = self._read_inode(ino)
                # then the data of each write the file still maps (repeated:
                # a cut can bring an older write back into view)
                while lossy and inode.pages and self._cut_torn_logs(ino, digests=True):
                    cut += 1
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
        if self._pages_may_be_lost():
            fixed = self._finish_renames() + self._repair_namespace()
            orphans = [i for i in self.cache.values() if i.nlink == 0]
            if fixed:
                logger.warning("%s: %d names and link counts of changes made after the last "
                               "sync made consistent", self.pm.path, fixed)
        for inode in orphans:
            self._evict(inode)
        logger.info("recovery: %d journal words undone, %d inodes replayed (%d logs cut), "
                    "%d orphans freed in %.3f s", undone, len(live), cut, len(orphans),
                    time.monotonic() - t0)

    def _pages_may_be_lost(self) -> bool:
        """Whether the image lives behind a page cache (a file on a disk) and the
        mount asked for recovery from a power loss (``FileSystem.mount(...,
        power_loss=True)``, as the pnova command does): any page written since
        the last sync may then hold an older content, so a log may end before
        its tail.  Without it, recovery keeps persistent memory's rules and an
        entry that fails its checks is corruption (fsck.pnova decides)."""
        return self.power_loss and self.pm.mode == "disk"

    def _cut_log(self, ino: int, head: int, tail: int, final: set[int] | None = None,
                 twin: int = 0) -> tuple[int | None, str | None]:
        """(where a log's last entry that arrived ends, why the rest did not):
        (``tail``, None) if every entry did; (None, why) if its first page did
        not arrive (the log never existed on disk).  With ``final`` (the
        sequence numbers of the write entries no later write overrides in any
        page), such an entry arrived only if its data did too: its digest must
        match.  (The blocks of an entry a later one replaced may hold anything
        since, even the same page's newer data.)"""
        stop: dict = {}
        op_end = head               # just past the last whole operation (no F_CONT)
        page, last = -1, -1         # the page of the entry before, and its sequence number
        # (``twin``: where the first page's twin lies, which may have arrived
        # when the page did not)
        for raw in plog.walk(self.pm, head, tail, ino, self.max_log_pages, None, 0, stop,
                             twin // L.BLOCK):
            try:
                e = L.decode_entry(raw)
                self._check_entry(e)
                # A log's order is its sequence order, across its pages too
                # (compaction writes a whole new chain in that order).  A page
                # that starts with an older entry than the page before it ends
                # with is a block this inode (or an earlier inode of its
                # number) used before, reused as a log page, whose new content
                # did not arrive: its old entries pass every other check.
                at = stop["pos"] - stop["pos"] % L.BLOCK
                if at != page and e[1] <= last:
                    raise ValueError(f"the log page at {at:#x} starts with an older entry "
                                     f"(seq {e[1]}) than the page before it ends with "
                                     f"(seq {last}): its new content did not reach the disk")
                page, last = at, e[1]
                if e[0] == L.E_WRITE and final is not None and e[1] in final:
                    want = L.write_digest(raw)
                    if want is not None and self.prot.csum:
                        if self.prot.digest(e[4], e[3]) != want:
                            raise ValueError(f"the data of the write entry (seq {e[1]}) did "
                                             "not reach the disk")
                        # the data did: its checksums and parity (other pages) must too
                        self.prot.reseal(e[4], e[3])
            except ValueError as e:
                stop["why"] = str(e)             # stop["pos"]: where this entry starts
                break
            if not raw[1] & L.F_CONT:
                op_end = stop["pos"] + len(raw)
        if stop["why"] is None and op_end == tail:
            return tail, None
        # an operation is cut whole: entries of it that arrived go with the rest
        why = stop["why"] or "the log's last operation is not whole"
        if op_end == head and head and (
                head % L.BLOCK or not L.BLOCK <= head < self.pm.size
                or L.check_page_tail(self.pm.mm[head + L.PT_NEXT:head + L.BLOCK], ino)) \
                and not self._first_twin_arrived(ino, head, twin):
            return None, why
        return op_end, why

    def _final_writes(self, ino: int) -> set[int]:
        """Sequence numbers of the write entries of ``ino`` (all its logs) whose
        data recovery checks: those the sync record does not cover that are
        still the newest for some page they map; without a record, those
        that are the newest for every page they map."""
        pm = self.pm
        addr = self.inode_addr(ino)
        logs = [(pm.read_u64(addr + L.I_LOG_HEAD), pm.read_u64(addr + L.I_LOG_TAIL),
                 pm.read_u64(addr + L.I_LOG_HEAD_TWIN))]
        logs += [(h, t, tw) for _c, h, t, tw in self._lines_of(ino, addr)[2]]
        found = []
        for head, tail, twin in logs:
            for raw in plog.walk(pm, head, tail, ino, self.max_log_pages, None, 0, None,
                                 twin // L.BLOCK):
                e = L.decode_entry(raw)
                if e[0] == L.E_WRITE or (e[0] == L.E_SETATTR and e[2] & L.SA_SIZE):
                    found.append(e)
        found.sort(key=lambda e: e[1])
        # Replayed in sequence order, truncates included: a write a truncate
        # unmapped is the newest for no page (its blocks went back whole).
        newest: dict[int, int] = {}
        writes: list[tuple[int, int, int]] = []
        top = -1                                 # no page at or past top + 1 is mapped
        for e in found:
            if e[0] == L.E_WRITE:
                writes.append((e[1], e[2], e[3]))
                for pg in range(e[2], e[2] + e[3]):
                    newest[pg] = e[1]
                top = max(top, e[2] + e[3] - 1)
            else:
                keep = (e[6] + L.BLOCK - 1) // L.BLOCK
                if keep <= top:
                    for pg in [p for p in newest if p >= keep]:
                        del newest[pg]
                    top = keep - 1
        covered = self._sync_covered()
        if covered is None:
            return {seq for seq, pg, n in writes
                    if all(newest.get(p) == seq for p in range(pg, pg + n))}
        # With the sync record, every later write that still maps a page is
        # checked, all of it: the blocks of its other pages are held until the
        # record covers it (DESIGN 24.3), so they still hold its data.
        return {seq for seq, pg, n in writes
                if seq > covered and any(newest.get(p) == seq for p in range(pg, pg + n))}

    def _sync_covered(self) -> int | None:
        """The image's sync record (version 6): entries up to it arrived with
        their data; None when the image has no valid one."""
        if not self.sync_record:
            return None
        return self._sync_record()

    def _first_twin_arrived(self, ino: int, head: int, twin: int) -> bool:
        """Whether the twin of a log's first page is on the disk (its tail names
        the page and this inode)."""
        if not twin or twin % L.BLOCK or not L.BLOCK <= twin < self.pm.size:
            return False
        raw = self.pm.mm[twin + L.PT_NEXT:twin + L.BLOCK]
        return L.check_page_tail(raw, ino) is None and \
            L.page_tail_twin(raw) == head // L.BLOCK | L.TWIN_ROLE

    def _cut_torn_logs(self, ino: int, digests: bool = False) -> int | None:
        """After a power loss on a disk-backed image: end each log of ``ino`` just
        past its last entry that arrived (one 8-byte store of each tail).
        Entries past it were written after the last sync, and so were the
        later pages of the log: nothing a sync promised is cut.  Returns how
        many logs were cut, or None when the inode's own first log page did
        not arrive: it was created after the last sync, and its slot is freed.
        With ``digests`` (once the file has been replayed), the data of every
        write that is still the newest for its pages is checked too."""
        pm = self.pm
        addr = self.inode_addr(ino)
        head = pm.read_u64(addr + L.I_LOG_HEAD)
        tail = pm.read_u64(addr + L.I_LOG_TAIL)
        final = self._final_writes(ino) if digests else None
        new, why = self._cut_log(ino, head, tail, final, pm.read_u64(addr + L.I_LOG_HEAD_TWIN))
        if new is None:
            logger.warning("%s: inode %d was created after the last sync and its log did "
                           "not reach the disk (%s): it is dropped", pm.path, ino, why)
            self._slot_commit(addr + L.I_STATE, L.STATE_FREE)
            self._release_ino(ino, held=False)
            return None
        cuts = 0
        if new != tail:
            logger.warning("%s: inode %d: its log is cut at %#x, where what reached the disk "
                           "before the power loss ends (%s)", pm.path, ino, new, why)
            self._slot_commit(addr + L.I_LOG_TAIL, new)
            cuts += 1
        array, twin, lines = self._lines_of(ino, addr)
        for cpu, lhead, ltail, ltwin in lines:
            lnew, why = self._cut_log(ino, lhead, ltail, final, ltwin)
            if lnew == ltail:
                continue
            logger.warning("%s: inode %d: the local log of CPU %d is cut (%s)", pm.path, ino,
                           cpu, why)
            # no entry arrived: no log (a tail of 0 says so); both copies of
            # the line, or the twin's longer log would bring the cut back
            self._line_commit(array, twin, cpu, 0 if lnew is None or lnew == lhead else lnew)
            cuts += 1
        return cuts

    def _moved_names(self) -> tuple[list[tuple], dict[int, int]]:
        """Every D_MOVED dentry of every live directory's log, with where the
        operation that wrote it starts: (dir, op start, seq, op, name, ino,
        flags, the other name's hash, the other name's directory or 0); and
        the last sequence number in each directory's log."""
        pm = self.pm
        out = []
        last: dict[int, int] = {}
        for d in [i for i in self.cache.values() if i.is_dir]:
            addr = self.inode_addr(d.ino)
            head, tail = pm.read_u64(addr + L.I_LOG_HEAD), pm.read_u64(addr + L.I_LOG_TAIL)
            stop: dict = {}
            op_start = head
            top = 0
            for raw in plog.walk(pm, head, tail, d.ino, self.max_log_pages, None, 0, stop,
                                 pm.read_u64(addr + L.I_LOG_HEAD_TWIN) // L.BLOCK):
                top = max(top, L.entry_seq(raw))
                moved = L.dentry_moved(raw) if raw[0] == L.E_DENTRY else None
                if moved:
                    e = L.decode_entry(raw)
                    out.append((d.ino, op_start, e[1], e[2], e[3], e[4]) + moved)
                if not raw[1] & L.F_CONT:
                    op_start = stop["pos"] + len(raw)
            last[d.ino] = top
        return out, last

    def _new_half_missing(self, added: set[tuple[int, int, int]], last: dict[int, int],
                          seq: int, ino: int, peer: int, peer_dir: int) -> bool:
        """True when the new name of the move whose removal (sequence number
        ``seq``, of inode ``ino``) names directory ``peer_dir`` provably never
        reached that directory's log: no D_MOVED addition of ``ino`` under the
        name the removal's hash names is in it (``added``: (directory, inode,
        name hash) of every D_MOVED addition), and nothing later either.  A
        log's order is its sequence order, so an entry newer than the removal
        lies past where the addition was appended (a compaction since then,
        which would have dropped the addition of a name removed later, writes
        entries with new sequence numbers and syncs first)."""
        d = self.cache.get(peer_dir)
        if d is None or not d.is_dir:
            return False          # (removed since, perhaps: nothing to go by)
        return last.get(peer_dir, 0) <= seq and (peer_dir, ino, peer) not in added

    def _finish_renames(self) -> int:
        """After a power loss on a disk-backed image, settle every rename between
        two directories of which only one directory's page arrived (DESIGN
        24.3).  Each of its two dentries carries the other name's hash
        (D_MOVED), and a removal the inode that moved:

        * an exchange whose other half is missing (the other name still has
          its old inode, which this half moved here) is undone: this
          directory's log is cut before the operation, every log is cut from
          its first later operation that used either inode it moved, and
          recovery starts over (``_Restart``);
        * a move whose new name arrived while the old one is still there
          (with an older cookie) loses the old name;
        * a move whose old name went while the new one did not arrive, leaving
          the inode with no name, gets the old name back.

        Returns how many entries it committed."""
        cache = self.cache
        now = time.time_ns()
        moved, last = self._moved_names()
        names: dict[int, list[tuple[int, bytes, int, int]]] = {}
        for d in [i for i in cache.values() if i.is_dir]:
            for name, (ino, _dt, cookie) in d.dents.items():
                names.setdefault(L.name_hash(d.ino, name), []).append(
                    (d.ino, name, ino, cookie))
        for dino, op_start, seq, op, name, ino, flags, peer, _pd in moved:
            d = cache.get(dino)
            # (whatever became of this half's name since: a later operation
            # that used it goes with the undo)
            if op != L.D_ADD or not flags & L.D_EXCHANGE or d is None:
                continue
            if any(i == ino and c < seq for _d, _n, i, c in names.get(peer, ())):
                logger.warning("%s: an exchange of names reached the disk in directory %d "
                               "only: it is undone, with what depended on it", self.pm.path,
                               dino)
                self._slot_commit(self.inode_addr(dino) + L.I_LOG_TAIL, op_start)
                other = self._read_inode(dino)[0].dents.get(name, (0,))[0]
                self._cut_dependents(seq, {ino, other} - {0})
                raise _Restart()                 # rebuild every index from the cut logs
        fixes = 0
        named = {ino for d in cache.values() if d.is_dir for ino, _, _ in d.dents.values()}
        added = {(m[0], m[5], L.name_hash(m[0], m[4])) for m in moved if m[3] == L.D_ADD}
        for dino, _start, seq, op, name, ino, flags, peer, peer_dir in moved:
            d = cache.get(dino)
            if d is None or flags & L.D_EXCHANGE:
                continue
            if op == L.D_ADD and d.dents.get(name, (0, 0, -1))[2] == seq:
                for odir, oname, oino, cookie in names.get(peer, ()):
                    if oino == ino and cookie < seq and odir != dino:
                        logger.warning("%s: a rename reached the disk in its new directory "
                                       "only: the old name is removed", self.pm.path)
                        self._commit([(cache[odir], [(L.E_DENTRY, 0, L.D_REMOVE, oname, 0, 0,
                                                      now)])])
                        fixes += 1
            elif op == L.D_REMOVE and name not in d.dents:
                # The rename's new name never arrived when that name still holds
                # an older inode (the one the rename replaced): then nothing after
                # the rename can have reached that directory either, and the
                # rename is undone whatever names the inode has.  Without that
                # evidence the old name comes back only to an inode left with
                # no name at all, and link count 0 means a later unlink took
                # the name the rename made: the inode stays nameless.
                # Version 5: the removal names the new name's directory, whose
                # log shows whether the new name arrived.
                older = any(oino != ino and cookie < seq
                            for _d, _n, oino, cookie in names.get(peer, ())) or \
                    (peer_dir != 0 and self._new_half_missing(added, last, seq, ino, peer,
                                                              peer_dir))
                if not older and (ino in named or ino not in cache or cache[ino].nlink == 0):
                    continue
                if ino not in cache and not self._resurrect(ino):
                    continue
                child = cache[ino]
                logger.warning("%s: a rename reached the disk in its old directory only: "
                               "the old name is given back", self.pm.path)
                self._commit([(d, [(L.E_DENTRY, 0, L.D_ADD, name, ino,
                                    stat.S_IFMT(child.mode) >> 12, now)])])
                named.add(ino)
                fixes += 1
        return fixes

    def _resurrect(self, ino: int) -> bool:
        """Bring back an inode that an unlink after the last sync freed, when the
        rename that named it is being undone (``_finish_renames``): its slot and
        blocks were held since, so its slot and log are as the unlink left them.
        False, changing nothing, if any of it was reused or does not read."""
        pm = self.pm
        addr = self.inode_addr(ino)
        if pm.read_u64(addr + L.I_STATE) != L.STATE_FREE or not self._valid_ino(ino):
            return False
        table = self.free_inodes[(ino - 1) % self.ncpus]
        if not table.take((ino - 1) // self.ncpus):
            return False
        self._slot_store(addr + L.I_STATE, L.STATE_LIVE)
        try:
            if self._cut_torn_logs(ino) is None:     # frees the slot again
                return False
            inode, seq = self._read_inode(ino)
            while inode.pages and self._cut_torn_logs(ino, digests=True):
                inode, seq = self._read_inode(ino)       # as in recovery: data that
            blocks = sorted(set(self._blocks_of(inode)))  # did not arrive is cut
        except (plog.LogError, ValueError, FsError):
            inode = None
        taken: list[int] = []
        if inode is not None:
            for b in blocks:
                if not self.alloc.owner(b).take(b):
                    break
                taken.append(b)
        if inode is None or len(taken) < len(blocks):
            for b in taken:
                self.alloc.owner(b).free(b, 1)
            self._slot_store(addr + L.I_STATE, L.STATE_FREE)
            table.free((ino - 1) // self.ncpus, 1)
            return False
        pm.fence()                                  # both copies of the state word
        w = self.area.w
        if w.load64(H_SEQ) <= seq:                  # its entries were not counted
            w.store64(H_SEQ, seq + 1)
        logger.warning("%s: inode %d, freed by an unlink the power loss undid, is kept",
                       pm.path, ino)
        self.cache[ino] = inode
        return True

    def _repair_namespace(self) -> int:
        """After a power loss on a disk-backed image, make the tree whole again
        (DESIGN 24.3).  Two logs changed by one operation since the last sync
        may each have reached the disk or not: a name may point at an inode
        whose slot never arrived, an inode may have lost its name, a link count
        may count a name that did not arrive.  Every change made here is a new
        entry committed as any other: names to inodes that are not live are
        removed; a directory found under two names keeps the one its '..'
        names; link counts are set to the names found; an inode no name reaches
        gets link count 0 (it is freed as an orphan).  Returns how many entries
        it committed."""
        cache = self.cache
        now = time.time_ns()
        fixes = 0
        names: dict[int, int] = {}
        subdirs: dict[int, int] = {}
        seen_dir: set[int] = {L.ROOT_INO}
        queue = [cache[L.ROOT_INO]]
        while queue:
            d = queue.pop()
            drop = []
            for name, (ino, _dt, _c) in sorted(d.dents.items()):
                child = cache.get(ino)
                if child is None and self._resurrect(ino):
                    child = cache[ino]           # freed by an unlink that did not arrive
                if child is None or (stat.S_ISLNK(child.mode) and not child.pages):
                    drop.append(name)            # gone, or a symlink whose target was cut
                    continue
                if child.is_dir:
                    named = cache.get(child.parent)
                    if ino in seen_dir or (child.parent != d.ino and named is not None
                                           and named.is_dir and any(
                                               i == ino for i, _, _ in named.dents.values())):
                        drop.append(name)        # its other name is the one '..' names
                        continue
                    seen_dir.add(ino)
                    subdirs[d.ino] = subdirs.get(d.ino, 0) + 1
                    if child.parent != d.ino:
                        self._commit([(child, [(L.E_DENTRY, 0, L.D_ADD, L.DOTDOT, d.ino,
                                                stat.S_IFDIR >> 12, now)])])
                        fixes += 1
                    queue.append(child)
                else:
                    names[ino] = names.get(ino, 0) + 1
            if drop:
                self._commit([(d, [(L.E_DENTRY, 0, L.D_REMOVE, n, 0, 0, now) for n in drop])])
                fixes += len(drop)
        for ino, inode in list(cache.items()):
            want = (2 + subdirs.get(ino, 0) if ino in seen_dir else 0) if inode.is_dir \
                else names.get(ino, 0)
            if inode.nlink != want:
                self._commit([(inode, [(L.E_LINK, 0, want, now)])])
                fixes += 1
        return fixes

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
        return L.is_journaled_word(addr, self.regions, self.sb.inodes_per_cpu,
                                   self.sb.version)

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
                 start: int = 0, twin: int | None = None) -> list[tuple]:
        out = []
        fixes: list[plog.Fix] = []
        # recovery compares the copies too: after a power loss on a disk, one
        # copy of a page may have reached it and the other not
        check = self._check_entry
        # (decoded by the walk: a page's entries in one compiled call)
        for e in plog.walk(self.pm, head, tail, ino, self.max_log_pages, pages, start,
                           None, twin, fixes, self._repair_in_place, decode=True):
            if e[0] <= L.E_SETATTR:              # only writes and setattrs have ranges
                check(e)
            out.append(e)
        if fixes:
            self._note_damage(ino, fixes)
        return out

    def _note_damage(self, ino: int, fixes: list[plog.Fix]) -> None:
        """Damage a read found.  With several processes a read is optimistic
        (a compaction may free the pages it walks, which then read as
        anything): what it found counts only once the read is known to have
        seen one state, so it waits in ``_found`` for :meth:`_found_valid`."""
        if self.shared:
            self._found.append((ino, fixes))
        else:
            self._log_damage(ino, fixes)

    def _found_valid(self, mark: int) -> None:
        """The reads since ``len(self._found)`` was ``mark`` saw one state."""
        found = self._found[mark:]
        del self._found[mark:]
        for ino, fixes in found:
            self._log_damage(ino, fixes)

    def _verify_logs(self, ino: int) -> list[plog.Fix]:
        """Every log of an inode read with both copies of each page and array
        line compared (a scrub's look); returns the writes that would mend a
        damaged copy (none on an image without twins).  LogError when a log
        does not read.  Optimistic, like :meth:`_read_inode`: repeated when a
        compaction moved the logs meanwhile."""
        addr = self.inode_addr(ino)
        err: Exception | None = None
        for _ in range(RETRIES):
            rewrites = self._rewrites_settled(ino)
            words = self._slot_words(ino)
            try:
                fixes = self._verify_once(ino, addr)
            except (plog.LogError, ValueError) as e:
                fixes, err = None, e
            if self._rewrites(ino) == rewrites and self._slot_words(ino)[2::2] == words[2::2]:
                if fixes is None:
                    raise err
                return fixes
        raise err or plog.LogError("the log kept changing while it was read")

    def _verify_once(self, ino: int, addr: int) -> list[plog.Fix]:
        pm = self.pm
        _array, _twin, lines, fixes = self._lines_and_fixes(ino, addr)
        logs = [(pm.read_u64(addr + L.I_LOG_HEAD), pm.read_u64(addr + L.I_LOG_TAIL),
                 pm.read_u64(addr + L.I_LOG_HEAD_TWIN))]
        logs += [(h, t, tw) for _c, h, t, tw in lines]
        for h, t, tw in logs:
            for _ in plog.walk(pm, h, t, ino, self.max_log_pages, None, 0, None,
                               tw // L.BLOCK, fixes, True):
                pass
        return fixes

    def _log_damage(self, ino: int, fixes: list[plog.Fix]) -> None:
        """A log read around damage to one copy of its pages (format 8's twins).
        Recovery at mount, before anything else uses the image, writes the good
        copies back at once; later, other processes may be appending to the
        log or freeing its pages, so the log is compacted instead (a new chain
        from what was read; the damaged pages are freed)."""
        if self.readonly:
            return
        if self._repair_in_place:
            plog.repair(self.pm, fixes)
            logger.warning("%s: inode %d: %d damaged piece(s) of its log restored from "
                           "their twins", self.pm.path, ino, len(fixes))
            return
        if ino not in self._repair_wanted:
            logger.warning("%s: inode %d: its log is damaged in one copy and was read from "
                           "the other; it is rewritten", self.pm.path, ino)
            self._repair_wanted.add(ino)
            self._compact_wanted.add(ino)        # (what makes operations look)

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

    def _settle_lines(self, ino: int, base: int, tbase: int, heads: tuple[int, ...],
                      tails: tuple[int, ...], tlines: tuple[tuple[int, ...], tuple[int, ...]]
                      ) -> tuple[list[int], list[int], list[int]]:
        """The lines of a per-core log array whose twin (format 8) lies at byte
        ``tbase``: (heads, tails, heads' twins), each line from the copy
        :func:`pick_line` takes where the two differ; ``tlines`` are the twin's
        (heads, tails), read before the array's.  A copy that is damaged (not
        merely one store behind) is mended as a log page's would be
        (:meth:`_log_damage`)."""
        heads, tails, htw, fixes = self._settled(ino, base, tbase, heads, tails, tlines)
        if fixes:
            self._note_damage(ino, fixes)
        return heads, tails, htw

    def _settled(self, ino: int, base: int, tbase: int, heads: tuple[int, ...],
                 tails: tuple[int, ...], tlines: tuple[tuple[int, ...], tuple[int, ...]]
                 ) -> tuple[list[int], list[int], list[int], list[plog.Fix]]:
        """:meth:`_settle_lines`' choice, and the writes that would make both
        copies hold it (nothing is noted)."""
        pm = self.pm
        n = self.ncpus
        theads, ttails = tlines
        w = pm.words
        htw = list(w.load64s(base + L.LA_HEAD_TWIN, n, L.LA_LINE))
        poison = (pm.poison and bool(pm.poisoned(base, n * L.LA_LINE)),
                  pm.poison and bool(pm.poisoned(tbase, n * L.LA_LINE)))
        if heads == theads and tails == ttails and not any(poison):
            return list(heads), list(tails), htw, []
        thtw = w.load64s(tbase + L.LA_HEAD_TWIN, n, L.LA_LINE)
        lines = [[(heads[c], tails[c], htw[c]), (theads[c], ttails[c], thtw[c])]
                 for c in range(n)]
        # A copy all of whose live lines lead to another inode's logs may not be
        # this file's array at all (a wrong pointer, and the block another
        # file's): only fsck, which knows who owns each block, settles that.
        sane = [not all_foreign(pm, ino, [ln[k] for ln in lines]) for k in (0, 1)]
        if not all(sane):
            raise ValueError("a copy of its per-core log array leads only to logs of other "
                             "inodes")
        heads, tails = list(heads), list(tails)
        chosen, mend = [], [False, False]
        for c in range(n):
            off = c * L.LA_LINE
            bad = (bool(poison[0] and pm.poisoned(base + off, 24)),
                   bool(poison[1] and pm.poisoned(tbase + off, 24)))
            p, q = lines[c]
            which, damaged = 0, False
            if p != q or any(bad):
                which, damaged = pick_line(pm, ino, p, q, self.max_log_pages, bad, sane)
            good = (p, q)[which]
            heads[c], tails[c], htw[c] = good
            chosen.append(good)
            if damaged is not None and (damaged or self._repair_in_place) and p != q:
                mend[1 - which] = True
        fixes: list[plog.Fix] = []
        for k, b in ((0, base), (1, tbase)):
            if not sane[k] or not sane[1 - k]:
                continue
            if poison[k]:                        # a poisoned copy: rewritten whole
                block = bytearray(L.BLOCK)
                for c, good in enumerate(chosen):
                    struct.pack_into("<QQQ", block, c * L.LA_LINE, *good)
                fixes.append((b, bytes(block)))
            elif mend[k]:
                fixes += [(b + c * L.LA_LINE, struct.pack("<QQQ", *good))
                          for c, good in enumerate(chosen) if lines[c][k] != good]
        return heads, tails, htw, fixes

    def _lines_of(self, ino: int, addr: int) -> tuple[int, int, list[tuple[int, int, int, int]]]:
        """(array, its twin, [(cpu, head, tail, head's twin) of every live line])
        of an inode whose slot is at ``addr``, each line from the copy that
        reads (for recovery, which then stores both copies)."""
        return self._lines_and_fixes(ino, addr)[:3]

    def _lines_and_fixes(self, ino: int, addr: int
                         ) -> tuple[int, int, list[tuple[int, int, int, int]], list[plog.Fix]]:
        """:meth:`_lines_of`, and the writes that would make both copies of the
        array hold the lines chosen (nothing is noted)."""
        pm = self.pm
        array = pm.read_u64(addr + L.I_LOG_ARRAY)
        if not array:
            return 0, 0, [], []
        self._local_lines(array)                 # checks where the array lies
        twin = pm.read_u64(addr + L.I_LOG_ARRAY_TWIN)
        base = array * L.BLOCK
        fixes: list[plog.Fix] = []
        if twin:
            tlines = self._read_lines(twin * L.BLOCK)
            heads, tails = self._read_lines(base)
            heads, tails, htw, fixes = self._settled(ino, base, twin * L.BLOCK, heads, tails,
                                                     tlines)
        else:
            heads, tails = self._read_lines(base)
            htw = list(pm.words.load64s(base + L.LA_HEAD_TWIN, self.ncpus, L.LA_LINE))
        return array, twin, [(c, heads[c], tails[c], htw[c]) for c in range(self.ncpus)
                             if heads[c] and tails[c]], fixes

    def _line_commit(self, array: int, twin: int, cpu: int, value: int) -> None:
        """Commit a new tail in CPU ``cpu``'s line of an array and of its twin."""
        word = array * L.BLOCK + cpu * L.LA_LINE + L.LA_TAIL
        if twin:
            self.pm.commit_u64_twice(word, twin * L.BLOCK + cpu * L.LA_LINE + L.LA_TAIL, value)
        else:
            self.pm.commit_u64(word, value)

    def _lines_at_rest(self, base: int, tbase: int
                       ) -> tuple[tuple[int, ...], tuple[int, ...],
                                  tuple[tuple[int, ...], tuple[int, ...]]]:
        """(heads, tails, the twin's (heads, tails)) of a per-core log array at
        byte ``base`` and its twin at ``tbase``, read again until the copies
        agree, for as long as another process may be between the two stores
        of a commit (LINES_WAIT); copies that still differ are settled by the
        caller.  Settling walks both copies' logs whole, which grows with the
        log (a local log of a directory holds another CPU's every entry since
        the last compaction: 0.6-4.3 ms a walk in two-worker fxmark runs of
        MWUM, MWRM and MWCM), where the writer's second store comes within
        microseconds, or as soon as its CPU runs it again."""
        deadline = 0.0
        tries = 0
        while True:
            tlines = self._read_lines(tbase)
            heads, tails = self._read_lines(base)
            if (heads, tails) == tlines or not self.shared:
                break
            tries += 1
            if tries > 4:
                now = time.monotonic()
                if not deadline:
                    deadline = now + LINES_WAIT
                elif now > deadline:
                    break                        # not a commit in flight: settled
                os.sched_yield()                 # (the writer may share this CPU)
        return heads, tails, tlines

    def _read_lines(self, base: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(heads, tails) of every line of the per-core log array at byte ``base``.

        Tails first: a log's head is stored before its first tail, so a tail
        seen set has its head set too.  Each word is loaded whole: another
        process may be storing its tail meanwhile."""
        w = self.pm.words
        tails = w.load64s(base + L.LA_TAIL, self.ncpus, L.LA_LINE)
        return w.load64s(base + L.LA_HEAD, self.ncpus, L.LA_LINE), tails

    def _read_inode(self, ino: int, src: int | None = None) -> tuple[Inode, int]:
        """Build an Inode from its slot and logs; return it and its highest seq.

        A file's entries may sit in its global log and in per-core local logs:
        they are merged by sequence number.  A directory has one log, replayed
        in order.  With several processes the read is optimistic (see
        :meth:`_validate`): it is repeated if a compaction moved the head or
        the array meanwhile.  ``src``: the slot copy to read (default the
        slot; :meth:`_read_replica` passes the replica).
        """
        if not self.shared:
            got = self._read_inode_once(ino, src)
            got[0].rewrites = self._rewrites(ino)
            return got
        addr = self.inode_addr(ino) if src is None else src
        err: Exception | None = None
        mark = len(self._found)
        for _ in range(RETRIES):
            del self._found[mark:]               # what a torn attempt found
            rewrites = self._rewrites_settled(ino)
            gen = self.pm.read_u64(addr + L.I_GENERATION)
            head = self.pm.read_u64(addr + L.I_LOG_HEAD)
            array = self.pm.read_u64(addr + L.I_LOG_ARRAY)
            try:
                got = self._read_inode_once(ino, src)
            except (plog.LogError, ValueError) as e:
                got, err = None, e
            if self.pm.read_u64(addr + L.I_STATE) != L.STATE_LIVE or \
                    self.pm.read_u64(addr + L.I_GENERATION) != gen:
                # Another process freed the inode meanwhile (its pages may
                # already hold other data): gone, not damaged.
                raise FsError(errno.ENOENT)
            if self.pm.read_u64(addr + L.I_LOG_HEAD) == head and \
                    self.pm.read_u64(addr + L.I_LOG_ARRAY) == array and \
                    self._rewrites(ino) == rewrites:
                if got is None:
                    raise err
                got[0].rewrites = rewrites
                self._found_valid(mark)
                return got
        raise err or plog.LogError("the log kept changing while it was read")

    def _read_replica(self, ino: int, why: object) -> Inode | None:
        """An inode whose slot does not read (``why``), read from the slot's
        replica (DESIGN 23.1), or None when there is none or it does not read
        either.  The slot is restored from the replica after the operation
        (:meth:`_compact_pending`), unless the mount is read-only."""
        if self._rtables is None:
            return None
        r = self._replica(self.inode_addr(ino))
        pm = self.pm
        if (pm.poison and pm.poisoned(r, L.INODE_SIZE)) or \
                pm.read_u64(r + L.I_STATE) != L.STATE_LIVE:
            return None
        try:
            inode, _ = self._read_inode(ino, r)
        except (plog.LogError, ValueError, FsError):
            return None
        logger.warning("%s: inode %d: its slot does not read (%s); read from its replica",
                       pm.path, ino, why)
        if not self.readonly:
            self._slot_repairs.add(ino)
            self._compact_wanted.add(ino)        # (what makes operations look)
        return inode

    def _read_inode_once(self, ino: int, src: int | None = None) -> tuple[Inode, int]:
        addr = self.inode_addr(ino) if src is None else src
        pm = self.pm
        if pm.poison and pm.poisoned(addr, L.INODE_SIZE):
            raise ValueError(f"the slot of inode {ino} has a media error (poisoned sector)")
        st = L.InodeStatic.unpack(pm.read(addr, 64))
        head = pm.read_u64(addr + L.I_LOG_HEAD)
        array = pm.read_u64(addr + L.I_LOG_ARRAY)
        # blocks of big writes are tracked where freed blocks may be held back
        inode = Inode(ino, st, head, 0, wide=pm.mode == "disk")
        if array:
            if inode.is_dir and self.sb.version < L.DIR_LOGS_VERSION:
                raise ValueError("a directory has per-core logs")
            self._local_lines(array)             # checks where the array lies
        array_twin = pm.read_u64(addr + L.I_LOG_ARRAY_TWIN) if array else 0
        entries, inode.tail, inode.log_pages, inode.local = self._gather(
            ino, head, array, 0, {}, pm.read_u64(addr + L.I_LOG_HEAD_TWIN), array_twin,
            addr, inode.is_dir)
        inode.array, inode.array_twin = array, array_twin
        if array:
            entries.sort(key=lambda e: e[1])
        maxseq = max(st.create_seq, max((e[1] for e in entries), default=0))
        inode.apply_all(entries)
        return inode, maxseq

    def _gather(self, ino: int, head: int, array: int, gtail: int, known: dict[int, list],
                head_twin: int = 0, array_twin: int = 0, slot: int | None = None,
                is_dir: bool = False) -> tuple[list[tuple], int, list[int], dict[int, list]]:
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
        tail_addr = (self.inode_addr(ino) if slot is None else slot) + L.I_LOG_TAIL
        local = {c: [h, t, []] for c, (h, t, _) in known.items()}
        gpages: list[int] = []
        out: list[tuple] = []
        base = array * L.BLOCK
        ncpus = self.ncpus
        while True:
            moved = False
            tail = words.load64(tail_addr)
            if tail != gtail:
                out += self._entries(head, tail, ino, gpages, gtail,
                                     None if gtail else head_twin // L.BLOCK)
                gtail = tail
                moved = True
            if array:
                twins = None
                if array_twin:
                    # the twin's lines first: a writer stores the array's line
                    # first, so a commit between the two reads leaves the
                    # twin's behind (not taken for damage), never ahead.
                    tlines = self._read_lines(array_twin * L.BLOCK)
                    heads, tails = self._read_lines(base)
                    if (heads, tails) != tlines:
                        heads, tails, tlines = self._lines_at_rest(base, array_twin * L.BLOCK)
                    heads, tails, twins = self._settle_lines(ino, base, array_twin * L.BLOCK,
                                                             heads, tails, tlines)
                else:
                    heads, tails = self._read_lines(base)
                for cpu in range(ncpus):
                    lhead, ltail = heads[cpu], tails[cpu]
                    have = local.get(cpu)
                    if ltail == (have[1] if have else 0) or not (lhead and ltail):
                        continue                 # unchanged, or a log never committed
                    if have is None or have[0] != lhead:
                        have = local[cpu] = [lhead, 0, []]
                    twin = None if have[1] else (twins[cpu] if twins else self.pm.read_u64(
                        base + cpu * L.LA_LINE + L.LA_HEAD_TWIN)) // L.BLOCK
                    got = self._entries(lhead, ltail, ino, have[2], have[1], twin)
                    if any(not L.local_entry_ok(e, is_dir) for e in got):
                        raise ValueError(f"the local log of CPU {cpu} holds an entry "
                                         + ("other than a dentry" if is_dir
                                            else "other than a file write"))
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
        if inode.array_twin:
            blocks.append(inode.array_twin)
        if inode.pages:
            blocks.extend(inode.pages.values())
        return blocks
