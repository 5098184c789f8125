"""Inode slot replicas (NOVA-Fortis): where each slot's second copy lies, how a
store to a slot reaches both copies, and which copy is kept when they differ.

With the ``INODE_REPLICA`` feature every CPU's inode table has a twin in the
next CPU's region (SPEC 5.5), so that one damaged block, sector or region
never holds both copies of a slot.  Every store to a slot goes to both copies
before the same fence, so the replica is never more than one unfenced store
apart from the primary.  A mount (and fsck) compares the tables and, for each
slot whose copies differ, keeps the one that reads (DESIGN 23.1).
"""
from __future__ import annotations

import bisect
import logging
import stat
from collections.abc import Callable

import numpy as np

from . import layout as L
from . import log as plog
from .pmem import SECTOR, PMem

logger = logging.getLogger("pnova")

_SLOT = L.INODE_SIZE
_PIECE = 256                   # slots compared at a time (32 KiB)


def slot_words(read_u64: Callable[[int], int], addr: int) -> tuple[int, int, int, int]:
    """state, log head, log tail, log array of the slot copy at ``addr``."""
    return (read_u64(addr + L.I_STATE), read_u64(addr + L.I_LOG_HEAD),
            read_u64(addr + L.I_LOG_TAIL), read_u64(addr + L.I_LOG_ARRAY))


def pick_line(pm: PMem, ino: int, p: tuple[int, int, int], q: tuple[int, int, int],
              max_pages: int, poisoned: tuple[bool, bool] = (False, False),
              sane: tuple[bool, bool] = (True, True)) -> tuple[int, bool | None]:
    """Which copy of a per-core log array line (head, tail, head's twin) to read
    when the array and its twin (format 8) differ there: (0 for the array's,
    1 for the twin's, whether the other copy is damaged rather than one store
    behind; None: neither is to be written over the other).

    A copy whose log does not read (or that lies in a poisoned sector) loses;
    of two that read, the twin's wins only when its log is the array's
    followed by newer entries (a tail the damage moved back); a twin's log
    that is the array's cut short is a commit between its two stores (the
    array's line is stored first).  A line whose head is a log page of
    another inode loses too, unless its whole copy leads elsewhere (``sane``
    false: a wrong array or twin pointer, which no line mends).  Of two copies
    with the same log, the one whose head's twin is the one the head page
    names wins."""
    pf, qf = _foreign(pm, p[0], ino), _foreign(pm, q[0], ino)
    if pf or qf:
        if pf and not qf and sane[0] and sane[1]:
            return 1, True
        if qf and not pf and sane[0] and sane[1]:
            return 0, True
        return 0, None

    def seqs(line: tuple[int, int, int], bad: bool) -> list[int] | None:
        if bad:
            return None
        h, t, tw = line
        if not (h and t):
            return []                            # no log: a line not yet committed
        try:
            return [int.from_bytes(raw[8:16], "little")
                    for raw in plog.walk(pm, h, t, ino, max_pages, None, 0, None,
                                         tw // L.BLOCK)]
        except plog.LogError:
            return None
    sp, sq = seqs(p, poisoned[0]), seqs(q, poisoned[1])
    if sp is None:
        return (1, True) if sq is not None else (0, None)
    if sq is None:
        return 0, True
    if p[0] == q[0] and _goes_on(sp, sq):
        return 1, True
    if p[:2] == q[:2] and p[2] != q[2]:          # only the heads' twins differ
        named = _named_twin(pm, p[0], ino)
        if named is not None and q[2] == named * L.BLOCK:
            return 1, True
        return 0, True
    return 0, not ((q[0] == p[0] or not q[1]) and sq == sp[:len(sq)])


def all_foreign(pm: PMem, ino: int, lines: list[tuple[int, int, int]]) -> bool:
    """Whether every live line of one copy of an array leads to another inode's
    log (and there is one): the copy is not this file's array."""
    live = [ln for ln in lines if ln[0] and ln[1]]
    return bool(live) and all(_foreign(pm, ln[0], ino) for ln in live)


def _named_twin(pm: PMem, head: int, ino: int) -> int | None:
    """The twin block the tail of the log page at ``head`` names, when it reads
    as a primary page of ``ino``."""
    if not head or head % L.BLOCK or not L.BLOCK <= head < pm.size:
        return None
    raw = pm.read(head + L.PT_NEXT, 32)
    if L.check_page_tail(raw, ino) is not None:
        return None
    t = L.page_tail_twin(raw)
    return None if t & L.TWIN_ROLE else t


def _foreign(pm: PMem, head: int, ino: int) -> bool:
    """Whether ``head`` is a well-formed log page of an inode other than ``ino``."""
    if not head or head % L.BLOCK or not L.BLOCK <= head < pm.size:
        return False
    raw = pm.read(head + L.PT_NEXT, 32)
    return L.check_page_tail(raw) is None and int.from_bytes(raw[8:16], "little") != ino


# how a usable copy that was not kept is described (see Judge.choose)
USABLE = "usable: "


def _goes_on(short: list[int], long: list[int]) -> bool:
    """Whether the log ``long`` is ``short`` followed by entries newer than all of
    it (sequence numbers of both logs' entries, in log order)."""
    if len(long) <= len(short) or long[:len(short)] != short:
        return False
    top = max(short, default=0)
    return all(s > top for s in long[len(short):])


class Judge:
    """Whether a slot copy reads, and which copy of a slot to keep, on one device.

    ``read_u64`` reads a word (fsck's sees through its virtual journal
    rollback); ``saved_used`` (a clean image's saved bitmap) must count a live
    copy's first log page and log array as in use: a freed slot keeps its old
    fields, and a flip of its state word must not bring back an inode whose
    blocks may be handed out again.  ``walk=False`` (recovery from a power
    loss, where a log may end early in both copies because its pages did not
    reach the disk) leaves the logs to recovery.
    """

    def __init__(self, pm: PMem, regions: list[L.Region], max_pages: int,
                 read_u64: Callable[[int], int] | None = None,
                 saved_used: Callable[[int], bool] | None = None, walk: bool = True,
                 twins: bool = True, dir_logs: bool = True) -> None:
        self.pm = pm
        self.twins = twins           # the image's logs have twins (format 8's LOG_REPLICA)
        self.dir_logs = dir_logs     # directories may have local logs (format 9)
        self.regions = regions
        self.max_pages = max_pages
        self.read_u64 = read_u64 or pm.read_u64
        self.saved_used = saved_used
        self.walk = walk

    def _in_data(self, block: int) -> bool:
        return any(r.data_start <= block < r.end for r in self.regions)

    def _seqs(self, ino: int, head: int, tail: int, head_twin: int) -> list[int]:
        """The sequence numbers of a log's entries (read around damage to one
        copy of a page); raises LogError when the log does not read."""
        return [int.from_bytes(raw[8:16], "little")
                for raw in plog.walk(self.pm, head, tail, ino, self.max_pages, None, 0, None,
                                     head_twin // L.BLOCK)]

    def problem(self, ino: int, addr: int) -> tuple[str | None, list[int]]:
        """(None, the sequence numbers of its global log's entries) if the slot
        copy at ``addr`` is a well-formed slot of inode ``ino``; (why not, [])
        otherwise.

        A free copy is well-formed whatever else it holds.  A live one must
        pass its line-0 CRC, have zero reserved bytes, a log array (if any) in a
        data area whose unused bytes are zero, and logs that walk from head to
        tail with page tails naming ``ino``."""
        pm = self.pm
        if pm.poison and pm.poisoned(addr, _SLOT):
            return "media error (poisoned sector)", []
        state, head, tail, array = slot_words(self.read_u64, addr)
        if state == L.STATE_FREE:
            return None, []
        if state != L.STATE_LIVE:
            return f"bad state word ({state:#x})", []
        try:
            st = L.InodeStatic.unpack(pm.read(addr, 64))
        except ValueError:
            return "inode fields fail their checksum", []
        if any(pm.read(addr + 112, 16)) or (not self.twins and any(pm.read(addr + 96, 16))):
            return "reserved bytes are not zero", []
        array_twin = self.read_u64(addr + L.I_LOG_ARRAY_TWIN)
        if array_twin and not self._in_data(array_twin):
            return f"the twin of its log array ({array_twin}) is not a data block", []
        head_twin = self.read_u64(addr + L.I_LOG_HEAD_TWIN)
        if head_twin and (head_twin % L.BLOCK or not self._in_data(head_twin // L.BLOCK)):
            return f"the twin of its first log page ({head_twin:#x}) is not a data block", []
        saved = self.saved_used
        lines: list[tuple[int, int, int]] = []
        if array:
            if (stat.S_ISDIR(st.mode) and not self.dir_logs) or not self._in_data(array):
                return f"log array {array} is not a block of a data area", []
            if saved is not None and not saved(array):
                return "its log array is free in the saved bitmap", []
            raw = pm.read(array * L.BLOCK, L.BLOCK)
            n = len(self.regions)
            keep = 24 if self.twins else 16      # bytes of a line that may be set
            if any(raw[64 * n:]) or any(any(raw[64 * c + keep:64 * c + 64]) for c in range(n)):
                return f"block {array} is not a log array", []
            lines = _lines(raw, n)
            if array_twin:                       # each line from the copy that reads
                traw = pm.read(array_twin * L.BLOCK, L.BLOCK)
                tlines = _lines(traw, n)
                if any(traw[64 * n:]) or any(any(traw[64 * c + 24:64 * c + 64])
                                             for c in range(n)) or \
                        (saved is not None and not saved(array_twin)) or \
                        all_foreign(pm, ino, tlines) or all_foreign(pm, ino, lines):
                    return f"block {array_twin} is not its log array's twin", []
                lines = [p if p == q else (p, q)[pick_line(pm, ino, p, q, self.max_pages)[0]]
                         for p, q in zip(lines, tlines)]
        if saved is not None and head and not saved(head // L.BLOCK):
            return "its log's first page is free in the saved bitmap", []
        if not self.walk:
            return None, []
        try:
            seqs = self._seqs(ino, head, tail, head_twin)
            for lh, lt, ltw in lines:
                if lh and lt:
                    self._seqs(ino, lh, lt, ltw)
        except plog.LogError as e:
            return str(e), []
        return None, seqs

    def choose(self, ino: int, primary: int, replica: int
               ) -> tuple[str, str | None, str | None]:
        """Which copy of a slot whose copies differ is kept: ("primary" |
        "replica" | "neither", why the primary is not kept, why the replica
        is not usable).  Of two usable copies, the reason the one not kept
        lost starts with "usable: ".

        Of two well-formed copies: the one that says the inode is live, when
        only one does (an eviction's state store reached one copy: the inode
        then has no name, and recovery frees it; or damage turned the other's
        state word to free, which would lose a live inode); else, of two copies
        of one log, the one whose log goes on past the other's end with newer
        entries (a crash between the two stores of a tail: either state is one
        the interrupted commit may leave, while damage can only move a tail
        that still reads back to an earlier entry: past the committed tail lie
        no entries with newer sequence numbers); else the primary."""
        why_p, seq_p = self.problem(ino, primary)
        why_r, seq_r = self.problem(ino, replica)
        if why_p is None and why_r is None:
            rd = self.read_u64
            sp, sr = rd(primary + L.I_STATE), rd(replica + L.I_STATE)
            if sp != sr:
                if sp == L.STATE_LIVE:
                    return "primary", None, USABLE + "it says the inode is free"
                return "replica", USABLE + "it says the inode is free, its replica " \
                    "that it is in use", None
            if rd(primary + L.I_LOG_HEAD) == rd(replica + L.I_LOG_HEAD) and \
                    _goes_on(seq_p, seq_r):
                return "replica", USABLE + "its log ends before the replica's", None
            return "primary", None, USABLE + "it differs from the slot"
        if why_p is None:
            return "primary", None, why_r
        if why_r is None:
            return "replica", why_p, None
        return "neither", why_p, why_r


def _lines(raw: bytes, n: int) -> list[tuple[int, int, int]]:
    """(head, tail, head's twin) of the first ``n`` lines of a log array block."""
    return [(int.from_bytes(raw[64 * c:64 * c + 8], "little"),
             int.from_bytes(raw[64 * c + 8:64 * c + 16], "little"),
             int.from_bytes(raw[64 * c + 16:64 * c + 24], "little")) for c in range(n)]


def _plain(why: str | None) -> str:
    """A reason as said to the user (without the USABLE mark)."""
    why = why or "it differs from the other copy"
    return why[len(USABLE):] if why.startswith(USABLE) else why


def differing_slots(pm: PMem, primary: int, replica: int, nslots: int) -> list[int]:
    """Indexes of the slots whose two copies differ or lie in a poisoned sector."""
    # Copies, not views of the mapping: a frame kept alive past this call (by
    # a traceback, or a signal handler's frame argument) must not hold the
    # device's buffer, or the device could not be closed.  In pieces small
    # enough for the allocator to reuse (a fresh 4 MiB array faults in every
    # page).
    rows: set[int] = set()
    for lo in range(0, nslots, _PIECE):
        n = min(_PIECE, nslots - lo) * _SLOT
        a = pm.buf[primary + lo * _SLOT:primary + lo * _SLOT + n].copy().reshape(-1, _SLOT)
        b = pm.buf[replica + lo * _SLOT:replica + lo * _SLOT + n].copy().reshape(-1, _SLOT)
        rows.update((lo + np.flatnonzero((a != b).any(axis=1))).tolist())
    if pm.poison:
        per = SECTOR // _SLOT
        for base in (primary, replica):
            for sec in pm.poisoned(base, nslots * _SLOT):
                first = (sec * SECTOR - base) // _SLOT
                rows.update(range(max(0, first), min(nslots, first + per)))
    return sorted(rows)


def copy_slot(pm: PMem, src: int, dst: int) -> None:
    """Make the copy at ``dst`` equal to the one at ``src`` (flushed, not fenced).

    A destination in a poisoned sector is written a whole sector at a time
    (which clears the poison, as the pmem driver does): the sector's other
    slots are taken from the source too, whose copies of them are the only
    ones that read.
    """
    if pm.poison and pm.poisoned(dst, _SLOT):
        off = dst % SECTOR
        src, dst, n = src - off, dst - off, SECTOR
    else:
        n = _SLOT
    pm.store(dst, pm.read(src, n))
    pm.flush(dst, n)


def _settle(pm: PMem, ino: int, keep: str, primary: int, replica: int, why_p: str | None,
            why_r: str | None, quiet: bool = False) -> None:
    """Write the kept copy of a slot over the other (flushed, not fenced) and,
    unless ``quiet``, log which copy was damaged and why."""
    if keep == "replica":
        copy_slot(pm, replica, primary)
        if not quiet:
            logger.warning("%s: inode %d: its slot is damaged (%s); restored from the "
                           "replica", pm.path, ino, _plain(why_p))
    elif keep == "primary":
        copy_slot(pm, primary, replica)
        if not quiet:
            logger.warning("%s: inode %d: the replica of its slot is damaged (%s); "
                           "rewritten", pm.path, ino, _plain(why_r))


def saved_bitmap_reader(pm: PMem, regions: list[L.Region]) -> Callable[[int], bool]:
    """block -> whether a clean image's saved allocator bitmap counts it in use."""
    def used(block: int) -> bool:
        for r in regions:
            if r.data_start <= block < r.end:
                i = block - r.data_start
                return bool(pm.buf[r.bitmap_start * L.BLOCK + i // 8] >> (i % 8) & 1)
        return False
    return used


class SlotReplicas:
    """The engine's side: every slot store reaches both copies; a mount repairs."""

    def _init_replicas(self) -> None:
        self._rtables = L.replica_tables(self.regions)

    def _replica(self, addr: int) -> int:
        """The replica address of a byte of a primary inode table."""
        c = bisect.bisect_right(self._itables, addr) - 1
        return self._rtables[c] + addr - self._itables[c]

    def _mirror_of(self, addr: int) -> int | None:
        """The replica of a byte of a primary inode table; None for any other
        address, or when the image keeps no replicas."""
        if self._rtables is None:
            return None
        c = bisect.bisect_right(self._itables, addr) - 1
        if c < 0 or addr >= self._itables[c] + self.sb.inodes_per_cpu * _SLOT:
            return None
        return self._rtables[c] + addr - self._itables[c]

    def _slot_store(self, addr: int, value: int) -> None:
        """Store one word of a slot in both copies and flush them (no fence)."""
        pm = self.pm
        pm.store_u64(addr, value)
        pm.flush(addr, 8)
        if self._rtables is not None:
            r = self._replica(addr)
            pm.store_u64(r, value)
            pm.flush(r, 8)

    def _slot_commit(self, addr: int, value: int) -> None:
        """A commit (:meth:`PMem.commit_u64`: fence, store, flush, fence) of one
        slot word, in both copies between the same fences."""
        if self._rtables is None:
            self.pm.commit_u64(addr, value)
        else:
            self.pm.commit_u64_twice(addr, self._replica(addr), value)

    def _slot_write(self, addr: int, raw: bytes) -> None:
        """Store bytes of a slot in both copies and flush them (no fence)."""
        pm = self.pm
        pm.store(addr, raw)
        pm.flush(addr, len(raw))
        if self._rtables is not None:
            r = self._replica(addr)
            pm.store(r, raw)
            pm.flush(r, len(raw))

    def repair_replicas(self) -> int:
        """Compare every slot with its replica and settle each difference (mount,
        before anything reads the tables); returns how many primaries were
        restored from their replicas.  Slots neither copy of which reads are
        left for the checks that follow to report."""
        if self._rtables is None or self.readonly:
            return 0
        pm = self.pm
        saved = saved_bitmap_reader(pm, self.regions) if self.sb.clean == 1 else None
        # After a power loss the two copies may come from different moments
        # (their pages reached the disk at different times): each is a state
        # the slot had, and recovery cuts whichever logs did not arrive.
        judge = Judge(pm, self.regions, self.max_log_pages, saved_used=saved,
                      twins=self.sb.log_replicas,
                      dir_logs=self.sb.version >= L.DIR_LOGS_VERSION,
                      walk=saved is not None or not self._pages_may_be_lost())
        n = self.sb.inodes_per_cpu
        restored = synced = 0
        # Every slot is judged on the tables as found, before any copy: a
        # copy into a poisoned sector rewrites its neighbours too.
        verdicts = []
        for c in range(self.ncpus):
            p0, r0 = self._itables[c], self._rtables[c]
            for i in differing_slots(pm, p0, r0, n):
                ino = self.ino_of(c, i)
                p, r = p0 + i * _SLOT, r0 + i * _SLOT
                verdicts.append((ino, p, r) + judge.choose(ino, p, r))
        for ino, p, r, keep, why_p, why_r in verdicts:
            # Two usable copies that differ on an image that was not cleanly
            # unmounted: an update a crash interrupted, settled silently.
            crash = saved is None and (why_p or why_r or "").startswith(USABLE)
            _settle(pm, ino, keep, p, r, why_p, why_r, quiet=crash)
            restored += keep == "replica"
            synced += keep == "primary"
            if keep == "neither" and judge.walk:
                logger.error("%s: inode %d: neither copy of its slot reads (%s; replica: "
                             "%s)", pm.path, ino, why_p, why_r)
            # (else recovery, which runs next, decides: after a power loss a
            # log may end early in both copies)
        if restored or synced:
            pm.fence()
            logger.info("%s: inode replicas: %d slot(s) restored from the replica, %d "
                        "replica(s) brought up to date", pm.path, restored, synced)
        return restored

    def scrub_slot(self, ino: int) -> int:
        """A scrub's look at one live inode's two slot copies (pnova-scrub):
        under the inode's log lock, which keeps every writer of its line-1
        words out, a copy that differs from the other and does not read is
        rewritten from the one that does.  Returns 1 when the slot itself was
        restored from its replica, else 0."""
        if self._rtables is None or self.readonly:
            return 0
        pm = self.pm
        p = self.inode_addr(ino)
        r = self._replica(p)
        self.scheme.log_lock(ino)
        try:
            if pm.read(p, _SLOT) == pm.read(r, _SLOT) and not (
                    pm.poison and (pm.poisoned(p, _SLOT) or pm.poisoned(r, _SLOT))):
                return 0
            keep, why_p, why_r = Judge(pm, self.regions, self.max_log_pages,
                                       twins=self.sb.log_replicas,
                                       dir_logs=self.sb.version >= L.DIR_LOGS_VERSION
                                       ).choose(ino, p, r)
            _settle(pm, ino, keep, p, r, why_p, why_r)
            pm.fence()
            return int(keep == "replica")
        finally:
            self.scheme.log_unlock(ino)
