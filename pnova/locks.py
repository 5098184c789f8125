"""Lock schemes for file data, shared by every worker process of a device.

Four schemes, chosen per mount (``-o lock=``), so that they can be compared on
the same workload:

``inode``
    NOVA's baseline: one reader/writer semaphore per inode.  Writers to any
    part of a file exclude each other.
``rangetree``
    pNOVA's first step: a range lock over an interval table (page-granular
    ranges held by (inode, first page, last page, mode)) guarded by one lock
    word.  Writers to disjoint ranges proceed; every acquire and release goes
    through the guard, which is what limited its scaling.
``segment``
    The light-weight segment range lock: a file is cut into segments of
    ``segment_pages`` pages, each with a 32-bit semaphore (top bit = writer,
    low 31 bits = reader count) changed with compare-and-swap and fetch-add.
``pnova``
    Segment locks plus per-core local logs fed by lock-free rings of log
    pointers (:mod:`pnova.ring`); the locking itself is the segment scheme's.

Semaphore words (all schemes use them):  a reader moves the word from ``v``
to ``v + 1`` by compare-and-swap while the writer bit is clear and leaves
with a fetch-add of -1; a writer moves it from 0 to ``WRITER | (cpu + 1)``.
While the writer bit is set the reader count is necessarily 0, so the low
bits name the writing CPU: that is how a waiter recognises a dead holder.
A writer that has to wait for readers sets ``WANTED``; new readers then hold
back until a writer has had the word, so a stream of readers overlapping one
another (creates in one shared directory) cannot starve a writer (a mkdir
there).  A reader that already holds a share of the word, or has waited for
``LEASE`` seconds (the writer that asked may have died), ignores the bit.

Dead holders: a waiter that has waited for ``LEASE`` seconds looks up the
holder's process in the shared area's registry; if it has exited, the waiter
releases the lock on its behalf (a writer word by compare-and-swap back to 0,
a reader's share by the records each CPU keeps of its read locks).  A reader
killed between its compare-and-swap and its record, or between dropping the
record and its fetch-add (two instructions each, in the compiled helper's
``rdlock`` and ``rdunlock``), leaves a share nobody owns:
waiters on that lock then fail with :class:`LockTimeout` after ``TIMEOUT``
seconds instead of hanging, and a worker that takes over the CPU resets every
lock word the old one held.
"""
from __future__ import annotations

import os
import time

import numpy as np

from .shared import (H_DEATHS, H_RENAME_LOCK, HELD_MAX, ISLOT, RANGE_ENTRY, RANGE_MAX, SEG_SLOTS,
                     SharedArea, process_alive)

WRITER = 0x80000000
WANTED = 0x40000000        # a writer waits for the readers to leave
LEASE = 0.2
TIMEOUT = 30.0
SCHEMES = ("inode", "rangetree", "segment", "pnova")


class LockTimeout(Exception):
    """A lock was not granted within TIMEOUT seconds (its holder is gone)."""


class Semaphores:
    """Reader/writer semaphore words in the shared area, used as ``cpu``."""

    def __init__(self, area: SharedArea, cpu: int) -> None:
        self.area = area
        self.w = area.w
        self.cpu = cpu
        self.mine = WRITER | (cpu + 1)
        self.records = [area.held_slot(cpu, i) for i in range(HELD_MAX)]
        self.free_records = list(self.records)
        self.record_of: dict[int, list[int]] = {}
        self.waits = 0                     # acquisitions that had to wait (contention)

    # -- writers -------------------------------------------------------------
    def wlock(self, off: int) -> None:
        if not self.w.cas32(off, 0, self.mine):
            self.waits += 1
            self._wait(off, lambda: self._try_write(off))

    def _try_write(self, off: int) -> bool:
        w = self.w
        v = w.load32(off)
        if v == 0 or v == WANTED:
            return w.cas32(off, v, self.mine)
        if not v & (WRITER | WANTED):
            w.cas32(off, v, v | WANTED)          # readers hold it: no new ones
        return False

    def try_wlock(self, off: int) -> bool:
        """Take the writer lock if it is free now; never waits."""
        w = self.w
        v = w.load32(off)
        return (v == 0 or v == WANTED) and w.cas32(off, v, self.mine)

    def wunlock(self, off: int) -> None:
        self.w.store32(off, 0)

    # -- readers -------------------------------------------------------------
    def _try_read(self, off: int, rec: int, polite: bool = True) -> bool:
        # One call of the compiled helper: up to eight tries, since a failed
        # compare-and-swap with no writer means another reader came or went
        # meanwhile; the record is stored with the share.  A reader already
        # holding a share must not wait for a writer that waits for it.
        # Impolite, the WANTED bit goes too (a live writer that still waits
        # sets it again; a dead one's would hold every later reader back a lease).
        if not polite:
            return self.w.rdlock(off, WRITER, WANTED, rec)
        return self.w.rdlock(off, WRITER if self.record_of.get(off) else WRITER | WANTED, 0, rec)

    def rlock(self, off: int) -> None:
        free = self.free_records
        if not free:
            raise RuntimeError(f"a CPU may hold at most {HELD_MAX} read locks at once")
        rec = free[-1]
        if not self._try_read(off, rec):
            self.waits += 1
            since = time.monotonic()
            self._wait(off, lambda: self._try_read(off, rec, time.monotonic() - since < LEASE))
        self._record(off, free.pop())

    def try_rlock(self, off: int) -> bool:
        """Take a read share if no writer holds the word now; never waits."""
        free = self.free_records
        if not free:
            raise RuntimeError(f"a CPU may hold at most {HELD_MAX} read locks at once")
        if not self._try_read(off, free[-1]):
            return False
        self._record(off, free.pop())
        return True

    def _record(self, off: int, rec: int) -> None:
        """Remember which record holds the share of ``off`` (already stored)."""
        recs = self.record_of.get(off)
        if recs is None:
            self.record_of[off] = [rec]
        else:
            recs.append(rec)

    def runlock(self, off: int) -> None:
        rec = self.record_of[off].pop()
        self.w.rdunlock(off, rec)
        self.free_records.append(rec)

    # -- a name in a directory ---------------------------------------------------
    def rw_pair(self, roff: int, woff: int, wait_share: bool = True) -> bool:
        """A reader's share of ``roff``, then the writer word ``woff`` (in that
        order, waiting as :meth:`rlock` and :meth:`wlock` do): the two locks of a
        namespace operation on one name in a directory others use, in one call
        of the compiled helper when neither has to wait.  Without
        ``wait_share`` the share is only tried, as :meth:`try_rlock` does: False,
        with nothing taken, if it is not free now."""
        free = self.free_records
        if free and not self.record_of.get(roff):
            rec = free[-1]
            got = self.w.rw_pair(roff, woff, rec, WRITER | WANTED, self.mine)
            if got:
                self.record_of[roff] = [free.pop()]
                if got == 2:
                    return True
                self.waits += 1
                self._wait(woff, lambda: self._try_write(woff))
                return True
            if not wait_share:
                return False
        if wait_share:
            self.rlock(roff)
        elif not self.try_rlock(roff):
            return False
        self.wlock(woff)
        return True

    # -- waiting and dead holders -----------------------------------------------
    def _wait(self, off: int, attempt) -> None:
        spins = 0
        start = time.monotonic()
        while True:
            if attempt():
                return
            spins += 1
            if spins < 32:
                continue
            os.sched_yield()                   # two cores: let the holder run
            if spins % 64 == 0:
                waited = time.monotonic() - start
                if waited > LEASE:
                    self.reap(off)
                if waited > TIMEOUT:
                    raise LockTimeout(f"lock word at {off:#x} not granted in {TIMEOUT:.0f} s")

    def reap(self, off: int) -> bool:
        """Release what exited processes hold of the word at ``off``; True if any."""
        w, area = self.w, self.area
        v = w.load32(off)
        if v & WRITER:
            owner = (v & ~WRITER) - 1
            # The holder is whoever last registered as that CPU; it may be this
            # CPU's previous process (a dead worker this process took over from).
            pid = area.pid_of(owner) if 0 <= owner < area.ncpus else 0
            if pid and pid != os.getpid() and not process_alive(pid):
                # Counted before the release: the dead writer may have
                # committed without bumping its versions, and whoever takes
                # the lock next must not trust them (DESIGN 19.7).
                w.add64(H_DEATHS, 1)
                return w.cas32(off, v, 0)
            return False
        freed = False
        for cpu in range(area.ncpus):
            if cpu == self.cpu or process_alive(area.pid_of(cpu)):
                continue
            for i in range(HELD_MAX):
                rec = area.held_slot(cpu, i)
                if w.load64(rec) == off + 1 and w.cas64(rec, off + 1, 0):
                    w.add32(off, -1)
                    freed = True
        return freed

    def _written_words(self) -> tuple[list[int], list[int]]:
        """The lock words (inode, log, name and segment words, the range table's
        guard) and the range-table entries held as this CPU."""
        area, w = self.area, self.w
        words: list[int] = []
        for lo in (area.inode_locks, area.log_locks):
            view = area.column(lo)
            words += [lo + ISLOT * i for i in np.flatnonzero(view == self.mine).tolist()]
            del view
        for lo, hi in ((area.name_locks, area.seg_locks), (area.seg_locks, area.range_table + 4)):
            view = np.frombuffer(area.mm, dtype="<u4", count=(hi - lo) // 4, offset=lo)
            words += [lo + 4 * i for i in np.flatnonzero(view == self.mine).tolist()]
            del view
        entries = [e for e in (area.range_table + 64 + RANGE_ENTRY * i for i in range(RANGE_MAX))
                   if w.load64(e) and w.load32(e + 24) == self.cpu + 1]
        return words, entries

    def take_over(self) -> None:
        """Become ``cpu``: release every lock a previous (dead) worker held as it."""
        area, w = self.area, self.w
        words, entries = self._written_words()
        if words or entries or w.load32(H_RENAME_LOCK) == self.mine:
            w.add64(H_DEATHS, 1)                 # counted before the release, as in reap()
        for i in range(HELD_MAX):
            rec = area.held_slot(self.cpu, i)
            off = w.load64(rec)
            if off and w.cas64(rec, off, 0):
                w.add32(off - 1, -1)
        for off in words:
            w.cas32(off, self.mine, 0)
        for e in entries:
            w.store64(e, 0)
        w.cas32(H_RENAME_LOCK, self.mine, 0)
        area.register(self.cpu)


# ---------------------------------------------------------------- the schemes
class Scheme:
    """lock(ino, first page, last page, write) -> token; unlock(token)."""

    name = ""

    def __init__(self, area: SharedArea, cpu: int, segment_pages: int = 16) -> None:
        self.area = area
        self.sem = Semaphores(area, cpu)
        self.segment_pages = segment_pages

    def close(self) -> None:
        """Drop views into the shared area (so that it can be unmapped)."""

    def lock(self, ino: int, first: int, last: int, write: bool):
        raise NotImplementedError

    def unlock(self, token) -> None:
        raise NotImplementedError

    def size_lock(self, ino: int) -> None:
        """Exclude other size changes (extending writes, truncates, compaction)."""
        self.sem.wlock(self.area.inode_locks + ISLOT * (ino - 1))

    def size_unlock(self, ino: int) -> None:
        self.sem.wunlock(self.area.inode_locks + ISLOT * (ino - 1))

    def try_size_lock(self, ino: int) -> bool:
        """Take the size lock if it is free now; never waits."""
        return self.sem.try_wlock(self.area.inode_locks + ISLOT * (ino - 1))

    def log_lock(self, ino: int) -> None:
        """Serialise appends to the inode's global log."""
        self.sem.wlock(self.area.log_locks + ISLOT * (ino - 1))

    def log_unlock(self, ino: int) -> None:
        self.sem.wunlock(self.area.log_locks + ISLOT * (ino - 1))


class InodeScheme(Scheme):
    """NOVA: one reader/writer semaphore per inode (it also covers the log)."""

    name = "inode"

    def lock(self, ino: int, first: int, last: int, write: bool):
        off = self.area.inode_locks + ISLOT * (ino - 1)
        (self.sem.wlock if write else self.sem.rlock)(off)
        return off, write

    def unlock(self, token) -> None:
        off, write = token
        (self.sem.wunlock if write else self.sem.runlock)(off)

    def size_lock(self, ino: int) -> None:
        pass                                   # writers hold the whole inode already

    def size_unlock(self, ino: int) -> None:
        pass

    def try_size_lock(self, ino: int) -> bool:
        return True


class SegmentScheme(Scheme):
    """pNOVA's light-weight segment range lock."""

    name = "segment"

    def slots(self, ino: int, first: int, last: int) -> list[int]:
        """Lock words of the segments covering pages first..last, in address order.

        Segments hash into a fixed table; two segments of one range may share
        a word, so the list is de-duplicated (and sorted, which also fixes a
        global acquisition order: no deadlock between two ranges).
        """
        sp = self.segment_pages
        base = self.area.seg_locks
        s0 = first // sp
        if s0 == last // sp:                   # the common case: one segment
            return [base + 4 * ((ino * 0x9E3779B1 + s0 * 0x85EBCA77) & (SEG_SLOTS - 1))]
        h = {base + 4 * ((ino * 0x9E3779B1 + s * 0x85EBCA77) & (SEG_SLOTS - 1))
             for s in range(s0, last // sp + 1)}
        return sorted(h)

    def lock(self, ino: int, first: int, last: int, write: bool):
        offs = self.slots(ino, first, last)
        acquire = self.sem.wlock if write else self.sem.rlock
        for off in offs:
            acquire(off)
        return offs, write

    def unlock(self, token) -> None:
        offs, write = token
        release = self.sem.wunlock if write else self.sem.runlock
        for off in reversed(offs):
            release(off)


class PnovaScheme(SegmentScheme):
    """Segment locks; file writes append to per-core logs, which need no log lock."""

    name = "pnova"


class RangeTreeScheme(Scheme):
    """Page-granular range lock: an interval table guarded by one lock word."""

    name = "rangetree"
    READ, WRITE = 1, 2

    def __init__(self, area: SharedArea, cpu: int, segment_pages: int = 16) -> None:
        super().__init__(area, cpu, segment_pages)
        self.guard = area.range_table
        self.entries = area.range_table + 64
        # Read-only numpy view of the table for the overlap scan (plain loads;
        # entries change only under the guard, except a release zeroing 'ino').
        self.table = np.frombuffer(area.mm, dtype=np.dtype([("ino", "<u8"), ("first", "<u8"),
                                                            ("last", "<u8"), ("owner", "<u4"),
                                                            ("mode", "<u4")]),
                                   count=RANGE_MAX, offset=self.entries)
        self.owner = self.sem.cpu + 1

    def close(self) -> None:
        self.table = None

    def _conflict(self, ino: int, first: int, last: int, write: bool) -> bool:
        t = self.table
        hit = (t["ino"] == ino) & (t["first"] <= last) & (t["last"] >= first)
        if not write:
            hit &= t["mode"] == self.WRITE
        return bool(hit.any())

    def lock(self, ino: int, first: int, last: int, write: bool):
        sem, w = self.sem, self.area.w
        start = time.monotonic()
        spins = 0
        while True:
            sem.wlock(self.guard)
            try:
                if not self._conflict(ino, first, last, write):
                    free = np.flatnonzero(self.table["ino"] == 0)
                    if len(free):
                        i = int(free[0])
                        e = self.entries + RANGE_ENTRY * i
                        w.store64(e + 8, first)
                        w.store64(e + 16, last)
                        w.store32(e + 24, self.owner)
                        w.store32(e + 28, self.WRITE if write else self.READ)
                        w.store64(e, ino)      # last: the entry is live
                        return e
            finally:
                sem.wunlock(self.guard)
            spins += 1
            sem.waits += spins == 1
            os.sched_yield()
            if spins % 64 == 0:
                waited = time.monotonic() - start
                if waited > LEASE:
                    self._reap()
                if waited > TIMEOUT:
                    raise LockTimeout(f"range {first}-{last} of inode {ino} not granted")

    def unlock(self, token) -> None:
        self.area.w.store64(token, 0)

    def _reap(self) -> None:
        area, w = self.area, self.area.w
        for i in np.flatnonzero(self.table["ino"] != 0).tolist():
            e = self.entries + RANGE_ENTRY * i
            owner = w.load32(e + 24) - 1
            if owner != self.sem.cpu and 0 <= owner < area.ncpus and \
                    not process_alive(area.pid_of(owner)):
                if w.load32(e + 28) == self.WRITE:   # see Semaphores.reap
                    w.add64(H_DEATHS, 1)
                w.store64(e, 0)


def make_scheme(name: str, area: SharedArea | None, cpu: int,
                segment_pages: int = 16) -> Scheme | None:
    """The scheme called ``name`` for ``cpu``; raises ValueError for an unknown name.

    With ``area`` None only the options are checked.
    """
    classes = {"inode": InodeScheme, "rangetree": RangeTreeScheme, "segment": SegmentScheme,
               "pnova": PnovaScheme}
    if name not in classes:
        raise ValueError(f"unknown lock scheme {name!r} (choose from {', '.join(SCHEMES)})")
    if segment_pages < 1:
        raise ValueError("segment size must be at least one page")
    if area is None:
        return None                       # options checked only
    return classes[name](area, cpu, segment_pages)
