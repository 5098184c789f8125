"""Block allocation: one bitmap per CPU region, NUMA partitions, local write first.

Each CPU owns a region of the device inside its NUMA node's partition.  The
region's free blocks are a bitmap (1 = in use) kept in the shared area, so
every worker process sees one truth and changes it with atomic
compare-and-swap on 64-bit words: no global lock anywhere.

* An allocation is served from the calling CPU's region first, then from the
  other regions of the same node, then from remote nodes ("Local Write First").
* A freed block clears its bit in the region that owns it, whoever frees it:
  a block freed by another CPU goes straight back to its owner region.
* Each region has an atomic free counter and a cursor (where its last
  allocation ended), so the common case touches one or two words.
* The process acting as a CPU keeps up to STASH_SLOTS free blocks of its own
  region at hand, in its stash in the shared area: a one-block allocation
  (a 4 KiB write, a log page) pops one, a one-block free of its own region
  pushes one, and neither touches the shared bitmap.  Stashed blocks are
  marked in use in the bitmap and referenced by nothing on the medium, so a
  crash frees them (recovery rebuilds the bitmaps from the logs); a clean
  unmount, run by the primary once the workers have exited, returns every
  stash to the bitmaps first.

The bit layout is the on-media layout of the saved allocator state (SPEC
"Saved allocator bitmap"): a clean unmount copies the words to the device,
a clean mount copies them back, and crash recovery rebuilds them from the logs.
"""
from __future__ import annotations

import bisect
import errno
from collections.abc import Callable, Iterator

import numpy as np

from .errors import FsError
from .layout import BLOCK, Region
from .shared import (H_HELD_INOS, H_LIMBO, H_RDURABLE, H_SEQ, H_SYNC_STARTED, H_SYNCED,
                     H_SYNCS_RUNNING, HELD_REC, HELD_SLOTS, LINE, STASH_SLOTS, SharedArea,
                     lock_word, unlock_word)

ALL = (1 << 64) - 1
STASH_REFILL = 32              # blocks a stash takes from the bitmap at once
LOW_FIRST = 64                 # requests of this many blocks or more: lowest free first
_M32 = (1 << 32) - 1
LIMBO_WANT = 2048              # blocks held back by one process before it asks for a sync,
                               # at least (more on a larger device: hold_frees)


class SharedBitmap:
    """A bitmap (1 = in use) with a free counter and a cursor, in the shared area.

    Items are numbered ``lo .. lo + n - 1`` (blocks of a region, or slots of
    an inode table).
    """

    def __init__(self, area: SharedArea, base: int, lo: int, n: int) -> None:
        self.lo = lo
        self.hi = lo + n
        self.n = n
        self.nwords = (n + 63) // 64
        self.w = area.w
        self.mm = area.mm
        self.counter = base
        self.cursor = base + 8
        self.words = base + 64

    def view(self) -> np.ndarray:
        """A read-only snapshot-free view of the bitmap words (plain loads)."""
        v = np.frombuffer(self.mm, dtype="<u8", count=self.nwords, offset=self.words)
        v.flags.writeable = False
        return v

    @property
    def nfree(self) -> int:
        return self.w.load64(self.counter)

    def load(self, used: np.ndarray) -> None:
        """Set the bitmap from a bool array over the data area (True = in use).

        Only while no other process allocates (mount time).
        """
        bits = np.ones(self.nwords * 64, dtype=bool)      # past the end: never free
        bits[:self.n] = used
        packed = np.packbits(bits, bitorder="little")
        self.mm[self.words:self.words + len(packed)] = packed.tobytes()
        self.w.store64(self.counter, int(self.n - np.count_nonzero(used)))
        self.w.store64(self.cursor, 0)

    def used(self) -> np.ndarray:
        """Bool array over the data area, True = in use."""
        raw = np.frombuffer(self.mm, dtype=np.uint8, count=self.nwords * 8, offset=self.words)
        out = np.unpackbits(raw, bitorder="little")[:self.n].astype(bool)
        del raw
        return out

    def alloc(self, n: int) -> list[tuple[int, int]]:
        """Take up to ``n`` blocks; return extents (start block, count)."""
        w = self.w
        out: list[tuple[int, int]] = []
        if n <= 0:
            return out
        start = w.load64(self.cursor) % self.nwords
        if n < 64:
            # Fast path: the cursor's word usually has room for a small request.
            off = self.words + 8 * start
            v = w.load64(off)
            free = ~v & ALL
            if free and free.bit_count() >= n:
                mask = 0
                for _ in range(n):
                    low = free & -free
                    mask |= low
                    free ^= low
                if w.cas64(off, v, v | mask):
                    _extents(out, self.lo + 64 * start, mask)
                    w.add64(self.counter, -n)
                    return out
        if w.load64(self.counter) == 0:
            return out
        view = self.view()
        # words with a free bit, from the cursor on, then from the start
        cand = np.flatnonzero(view != ALL)
        del view
        if len(cand) == 0:
            return out
        if n >= LOW_FIRST:
            # Big requests take the lowest free blocks: blocks freed by earlier
            # writes come back first, and those are already mapped (a first
            # touch of a page costs a page fault, more than copying it).
            order = _lowest_first(cand, n)
        else:
            k = int(np.searchsorted(cand, start))
            order = np.concatenate((cand[k:], cand[:k])).tolist()
        got = 0
        last_j = start
        for j in order:
            off = self.words + 8 * j
            while got < n:
                v = w.load64(off)
                if v == ALL:
                    break
                need = n - got
                free = ~v & ALL
                if free.bit_count() <= need:
                    mask = free                  # the whole word's free blocks
                else:
                    mask = 0
                    c = 0
                    while free and c < need:
                        low = free & -free
                        mask |= low
                        free ^= low
                        c += 1
                if w.cas64(off, v, v | mask):
                    got += _extents(out, self.lo + 64 * j, mask)
                    last_j = j
                    break
            if got >= n:
                break
        if got:
            w.add64(self.counter, -got)
            w.store64(self.cursor, last_j)
        return out

    def free(self, start: int, n: int) -> None:
        """Clear the bits of [start, start+n) (all inside this region)."""
        w = self.w
        b = start - self.lo
        end = b + n
        while b < end:
            j, bit = divmod(b, 64)
            take = min(64 - bit, end - b)
            mask = (ALL >> (64 - take)) << bit
            off = self.words + 8 * j
            while True:
                v = w.load64(off)
                if v & mask != mask:
                    raise AssertionError(f"double free in blocks {start}..{start + n - 1}")
                if w.cas64(off, v, v & ~mask):
                    break
            b += take
        w.add64(self.counter, n)

    def take(self, start: int, n: int = 1) -> bool:
        """Set the bits of [start, start+n) if every one is clear; False (nothing
        taken) if any is set.  Recovery uses it, alone on the device."""
        w = self.w
        done: list[int] = []
        for b in range(start - self.lo, start - self.lo + n):
            j, bit = divmod(b, 64)
            off = self.words + 8 * j
            while True:
                v = w.load64(off)
                if v >> bit & 1:
                    for d in done:
                        self.free(d, 1)
                    return False
                if w.cas64(off, v, v | 1 << bit):
                    break
            w.add64(self.counter, -1)
            done.append(self.lo + b)
        return True

    def contains(self, block: int) -> bool:
        return self.lo <= block < self.hi


class RegionBitmap(SharedBitmap):
    """The free blocks of one CPU's data area."""

    def __init__(self, area: SharedArea, region: Region) -> None:
        super().__init__(area, area.regions[region.cpu], region.data_start, region.data_blocks)
        self.region = region

    def stats(self) -> tuple[int, int]:
        """(free extents, largest free extent) of this region."""
        free = ~self.used()
        d = np.diff(np.concatenate(([0], free.view(np.int8), [0])))
        starts, ends = np.flatnonzero(d == 1), np.flatnonzero(d == -1)
        return len(starts), int((ends - starts).max()) if len(starts) else 0


def _lowest_first(cand: np.ndarray, n: int) -> Iterator[int]:
    """Word numbers in ``cand``, lowest first, converted a few at a time: the
    first handful usually hold the ``n`` blocks wanted."""
    head = n // 32 + 16
    yield from cand[:head].tolist()
    yield from cand[head:].tolist()


def _extents(out: list[tuple[int, int]], base: int, mask: int) -> int:
    """Append the runs of set bits of ``mask`` (block ``base`` = bit 0); return the count."""
    count = 0
    while mask:
        low = (mask & -mask).bit_length() - 1
        run = ((~(mask >> low)) & ((mask >> low) + 1)).bit_length() - 1
        if out and out[-1][0] + out[-1][1] == base + low:
            s, c = out[-1]
            out[-1] = (s, c + run)
        else:
            out.append((base + low, run))
        mask &= ~(((1 << run) - 1) << low)
        count += run
    return count


class Stash:
    """One CPU's stack of free blocks of its own region, in the shared area.

    Only the process acting as the CPU pushes and pops (single owner), so the
    count and the slots need plain atomic stores, no compare-and-swap.
    """

    def __init__(self, area: SharedArea, cpu: int) -> None:
        self.w = area.w
        self.count = area.stashes + cpu * area.stash_size
        self.slots = self.count + LINE

    def __len__(self) -> int:
        return self.w.load64(self.count)

    def pop(self) -> int:
        """A stashed block, or 0 if the stash is empty."""
        return self.w.stash_pop(self.count, self.slots)

    def push(self, blk: int) -> bool:
        """Keep ``blk``; False if the stash is full."""
        return self.w.stash_push(self.count, self.slots, STASH_SLOTS, blk)

    def take_all(self) -> list[int]:
        w = self.w
        n = w.load64(self.count)
        out = [w.load64(self.slots + 8 * i) for i in range(n)]
        w.store64(self.count, 0)
        return out


BLOCKS, INODE = 0, 1           # kinds of held records


class HeldList:
    """One CPU's list of blocks and inode slots freed on a disk-backed image but
    not yet reusable (DESIGN 24), in the shared area.

    Only the process acting as the CPU appends (single producer: it writes the
    record, then publishes it by storing the tail); any process releases, under
    the list's lock word, the records a completed sync has made safe, oldest
    first.  So a sync by any process (the supervisor's commit interval
    included) gives back what every process held, and a process that stays
    idle strands nothing.  A record: tag (the syncs started when it was freed),
    start, count, kind (blocks or one inode slot) and need (the sync record it
    waits for, DESIGN 24.3; 0: none)."""

    def __init__(self, area: SharedArea, cpu: int) -> None:
        self.w = area.w
        base = area.held + cpu * area.held_size
        self.lock, self.head, self.tail, self.nblocks = base, base + 8, base + 16, base + 24
        self.slots = base + LINE
        # held_due's arguments: whether the oldest record is due, in one call
        self.due_args = (self.head, self.tail, self.slots, HELD_SLOTS, HELD_REC, H_SYNCED,
                         H_RDURABLE)

    def __len__(self) -> int:
        w = self.w
        return w.load64(self.tail) - w.load64(self.head)

    @property
    def blocks(self) -> int:
        """Blocks held in this list."""
        return self.w.load64(self.nblocks)

    def append(self, tag: int, kind: int, start: int, count: int, need: int) -> bool:
        """Hold one record; False when the list is full."""
        w = self.w
        tail = w.load64(self.tail)
        if tail - w.load64(self.head) >= HELD_SLOTS:
            return False
        rec = self.slots + (tail % HELD_SLOTS) * HELD_REC
        w.store64(rec, tag)
        w.store64(rec + 8, start)
        w.store32(rec + 16, count)
        w.store32(rec + 20, kind)
        w.store64(rec + 24, need)
        if kind == BLOCKS:
            w.add64(self.nblocks, count)
            w.add64(H_LIMBO, count)
        else:
            w.add64(H_HELD_INOS, 1)
        w.store64(self.tail, tail + 1)           # published: a releaser may take it
        return True

    def due(self) -> bool:
        """Whether a completed sync has made the oldest record reusable (no
        lock: a hint, as :meth:`release` decides again under it)."""
        return self.w.held_due(*self.due_args)

    def release(self, synced: int, durable: int, free_blocks: Callable[[int, int], None],
                free_ino: Callable[[int], None], everything: bool = False) -> int:
        """Give back, oldest first, every record a completed sync made safe (all
        of them with ``everything``); returns the blocks given back."""
        w = self.w
        lock_word(w, self.lock)
        n = 0
        try:
            head, tail = w.load64(self.head), w.load64(self.tail)
            while head < tail:
                rec = self.slots + (head % HELD_SLOTS) * HELD_REC
                if not everything and not (w.load64(rec) < synced
                                           and w.load64(rec + 24) <= durable):
                    break
                start, count, kind = w.load64(rec + 8), w.load32(rec + 16), w.load32(rec + 20)
                head += 1
                w.store64(self.head, head)       # taken before it is freed: never twice
                if kind == BLOCKS:
                    w.add64(self.nblocks, -count)
                    w.add64(H_LIMBO, -count)
                    free_blocks(start, count)
                    n += count
                else:
                    w.add64(H_HELD_INOS, -1)
                    free_ino(start)
        finally:
            unlock_word(w, self.lock)
        return n


class Allocator:
    """All regions, with the Local-Write-First policy and a reserve for deletes."""

    def __init__(self, area: SharedArea, regions: list[Region], cpus_per_node: int,
                 reserve: int) -> None:
        self.regions = [RegionBitmap(area, r) for r in regions]
        # each CPU's stash of its own region's blocks, then its twin stash, of
        # the next CPU's region (where its log pages' twins come from)
        n = len(regions)
        self.stashes = [Stash(area, r.cpu) for r in regions] + \
            [Stash(area, n + r.cpu) for r in regions]
        self._twin_of = {c: (c + 1) % n for c in range(n)}
        # maps blocks about to be written for the first time in one call
        # (PMem.prefault); None: no device (tests of the allocator alone)
        self.prefault: Callable[[int, int], None] | None = None
        # The CPU whose stash this process uses (None: no stash, e.g. a primary
        # whose workers act as its CPUs).
        self.stash_cpu: int | None = None
        self.cpus_per_node = cpus_per_node
        self._starts = [r.start for r in regions]
        # Blocks kept back for metadata so that unlink/rmdir still work on a
        # full device (they must append to the parent's log).
        self.reserve = reserve
        self._orders = [self._order(c) for c in range(len(regions))]
        # Blocks (and inode slots) freed since the last sync of a disk-backed
        # image wait in the shared held list of the CPU that freed them until
        # a sync has made their release durable (DESIGN 24; a block of a write
        # that still maps other pages also until the sync record covers it,
        # 24.3).  ``limbo``: this process's list; None: frees are immediate.
        self.held = [HeldList(area, r.cpu) for r in regions]
        self.limbo: HeldList | None = None
        self.free_ino: Callable[[int], None] | None = None    # gives an inode slot back
        self.w = area.w
        self.want_sync: Callable[[], None] | None = None      # ask for a sync (no wait)
        self.sync_now: Callable[[], None] | None = None       # sync and wait
        self._asked = -1                  # the sync generation a sync was asked in
        self.limbo_want = LIMBO_WANT
        # Blocks allocated while no sync was running and none has started since
        # are marked in the fresh words of the shared area: no synced state
        # ever used them, so freeing one needs no wait, whichever process
        # allocated it (the serving processes of a mount take any client's
        # requests, so the one that frees a block is often not the one that
        # allocated it).
        self._fresh_base = area.fresh
        # the region of the CPU whose held list this process uses, and its
        # fresh words: most blocks it allocates and frees are there
        self._own: RegionBitmap | None = None
        self._own_fresh = 0
        self._fast_cpu = -1               # the CPU whose stash the two use (-1: none)
        # the compiled calls' fixed arguments (Words.fresh_pop, Words.fresh_push),
        # set by held_by; used only while stash_cpu == _fast_cpu
        self._pop_args: tuple[int, ...] = ()
        self._push_args: tuple[int, ...] = ()
        self.split_frees = False

    @property
    def nfree(self) -> int:
        return sum(r.nfree for r in self.regions)

    @property
    def ntotal(self) -> int:
        return sum(r.n for r in self.regions)

    def _order(self, cpu: int) -> list[RegionBitmap]:
        node = cpu // self.cpus_per_node
        local = self.regions[node * self.cpus_per_node:(node + 1) * self.cpus_per_node]
        same = [local[cpu % self.cpus_per_node]] + [r for r in local if r.region.cpu != cpu]
        remote = [r for r in self.regions if r.region.node != node]
        return same + remote

    def order(self, cpu: int) -> list[RegionBitmap]:
        """Regions in Local-Write-First order for ``cpu``."""
        return self._orders[cpu]

    def alloc(self, cpu: int, n: int, *, meta: bool = False) -> list[tuple[int, int]]:
        """Allocate ``n`` blocks as extents; raise ENOSPC (after undoing) if short.

        Data allocations may not dip into the reserve; metadata (log pages) may.
        """
        if n == 1 and cpu == self.stash_cpu:
            return [(self.alloc_one(cpu, meta=meta), 1)]
        if self.limbo is None:
            return self._alloc_bitmaps(cpu, n, meta)
        self._before_alloc()
        out = self._bitmaps_or_sync(cpu, n, meta)
        self._note_fresh(out)
        return out

    def _bitmaps_or_sync(self, cpu: int, n: int, meta: bool) -> list[tuple[int, int]]:
        """:meth:`_alloc_bitmaps`; short of room while blocks are held back, sync
        (what is held becomes free) and try once more."""
        try:
            return self._alloc_bitmaps(cpu, n, meta)
        except FsError:
            if not self.w.load64(H_LIMBO) or self.sync_now is None:
                raise
            self.sync_now()                     # gives back what every CPU held
            if self.w.load64(H_LIMBO):
                self.sync_now()                 # the second writes the sync record back
            if n == 1 and cpu == self.stash_cpu and (blk := self.stashes[cpu].pop()):
                return [(blk, 1)]               # single blocks went back to the stash
            return self._alloc_bitmaps(cpu, n, meta)

    @property
    def limbo_blocks(self) -> int:
        """Blocks this process's CPU holds back."""
        return self.limbo.blocks if self.limbo is not None else 0

    def _before_alloc(self) -> None:
        if self.limbo is not None and self.limbo.due():
            self.release_limbo()

    # A process that only reads for a while (a serving process that takes only
    # reads) neither allocates nor frees: its reads give back what it holds.
    release_synced = _before_alloc

    def _note_fresh(self, extents: list[tuple[int, int]]) -> None:
        """Mark blocks allocated while no sync runs as fresh in this interval."""
        w = self.w
        gen = w.load64(H_SYNC_STARTED)
        if w.load64(H_SYNCED) != gen or w.load64(H_SYNCS_RUNNING):
            return                              # a sync is running: it may see them
        g = (gen & _M32) << 32
        mark = w.fresh_mark          # (another interval's bits mean nothing now: dropped)
        for s, c in extents:
            for off, mask in self._fresh_words(s, c) or ():
                mark(off, g, mask)

    def _note_fresh_one(self, blk: int) -> None:
        """:meth:`_note_fresh` of the one block ``blk`` (every log page and most
        data blocks), in one compiled call once its word is known."""
        if (word := self._fresh_word(blk)) is not None:
            self.w.fresh_note(word[0], word[1], H_SYNC_STARTED, H_SYNCED, H_SYNCS_RUNNING)

    def _fresh_word(self, blk: int) -> tuple[int, int] | None:
        """The fresh word (offset, mask of the block's bit) of data block ``blk``,
        or None if it is in no region."""
        own = self._own
        if own is not None and own.lo <= blk < own.hi:
            b = blk - own.lo                     # (most blocks: this CPU's own region)
            return self._own_fresh + 8 * (b >> 5), 1 << (b & 31)
        i = bisect.bisect_right(self._starts, blk) - 1
        ra = self.regions[i]
        if not ra.lo <= blk < ra.hi:
            return None
        b = blk - ra.lo
        return self._fresh_base[i] + 8 * (b >> 5), 1 << (b & 31)

    def _fresh_words(self, start: int, n: int) -> list[tuple[int, int]] | None:
        """The fresh words (offset, mask of the blocks' bits) of blocks
        start..start+n-1, or None if they are not all in one region."""
        i = bisect.bisect_right(self._starts, start) - 1
        ra = self.regions[i]
        if not (ra.lo <= start and start + n <= ra.hi):
            return None
        b = start - ra.lo
        base = self._fresh_base[i]
        out = []
        while n > 0:
            bit = b & 31
            take = min(n, 32 - bit)
            out.append((base + 8 * (b >> 5), ((1 << take) - 1) << bit))
            b += take
            n -= take
        return out

    def unfresh(self, start: int, n: int) -> None:
        """Clear the fresh marks of blocks start..start+n-1: freed later in this
        interval, they wait for a sync like any other.  A compaction marks so
        the data blocks its new chain maps, which a slot on the disk may name
        once the chain is switched to without a sync (DESIGN 24.5)."""
        if self.limbo is None or n <= 0:
            return
        words = self._fresh_words(start, n)
        if words is None:                        # across regions: block by block
            for b in range(start, start + n):
                self.unfresh(b, 1)
            return
        load, cas = self.w.load64, self.w.cas64
        for off, mask in words:
            while True:
                v = load(off)
                if not v & mask or cas(off, v, v & ~mask):
                    break

    def _take_fresh(self, start: int, n: int, tag: int) -> bool:
        """Whether blocks start..start+n-1 were all allocated in sync interval
        ``tag`` (now running) with no sync running; if so their marks are
        cleared and the caller frees them at once.  The decision is made on
        the first look: the entry that unmapped them was committed before
        ``tag`` was read, so no synced state can hold them, whatever starts
        after."""
        g = (tag & _M32) << 32
        if n == 1:                               # (most frees): one compiled call
            word = self._fresh_word(start)
            return word is not None and self.w.fresh_take(word[0], g, word[1])
        words = self._fresh_words(start, n)
        if words is None:
            return False
        load, cas = self.w.load64, self.w.cas64
        for off, mask in words:
            v = load(off)
            if v & ~_M32 != g or v & mask != mask:
                return False
        for off, mask in words:
            while True:
                v = load(off)
                if v & ~_M32 != g or cas(off, v, v & ~mask):
                    break                       # (reset by a newer interval: nothing left)
        return True

    # -- blocks held back until a sync -------------------------------------------
    def hold_frees(self, cpu: int, split: bool = False) -> None:
        """From now on, blocks (and inode slots) this process frees wait for the
        next completed sync, in ``cpu``'s held list.

        A process asks for an early sync once it holds an eighth of the data
        area's share of one CPU: every sync makes the pages it wrote back
        read-only again, and the next store to each takes a fault, so syncs
        a few times a second cost a quarter of a 4 KiB overwrite's rate
        (DESIGN 24); space, not time, is what held blocks must not run out of.
        ``split``: the image keeps a sync record, and blocks freed as split
        wait for it too (DESIGN 24.3, step 9).
        """
        self.split_frees = split
        self.limbo_want = max(LIMBO_WANT, self.ntotal // (8 * len(self.regions)))
        self.held_by(cpu)

    def held_by(self, cpu: int) -> None:
        """This process's frees wait in ``cpu``'s held list (the CPU it acts as)."""
        self.limbo = self.held[cpu]
        self._fast_cpu = cpu
        own = self._own = self._orders[cpu][0]
        self._own_fresh = self._fresh_base[self.regions.index(own)]
        stash = self.stashes[cpu]
        self._pop_args = (stash.count, stash.slots, own.lo, own.hi, self._own_fresh,
                          H_SYNC_STARTED, H_SYNCED, H_SYNCS_RUNNING)
        self._push_args = (own.lo, own.hi, self._own_fresh, H_SYNC_STARTED, own.words,
                           stash.count, stash.slots, STASH_SLOTS)

    def release_limbo(self, everything: bool = False, every_cpu: bool = False) -> int:
        """Free what a completed sync has made safe to reuse (``everything``: all of
        it, when no later allocation can happen or the image is synced anyway),
        from this process's CPU's list, or from every CPU's (``every_cpu``, as
        a process that has just synced does); returns the blocks freed."""
        if every_cpu or everything:
            lists = [h for h in self.held if len(h)]
        elif self.limbo is not None and len(self.limbo):
            lists = [self.limbo]
        else:
            return 0
        w = self.w
        synced, durable = w.load64(H_SYNCED), w.load64(H_RDURABLE)
        return sum(h.release(synced, durable, self._free_now, self.free_ino, everything)
                   for h in lists)

    def unknown_need(self) -> int:
        """What a block of an unknown write entry waits for: every entry so far."""
        return self.w.load64(H_SEQ) - 1

    def hold_ino(self, ino: int) -> None:
        """Hold an inode slot freed by an eviction until a sync has completed."""
        self._append(self.w.load64(H_SYNC_STARTED), INODE, ino, 0, 0)

    def _append(self, tag: int, kind: int, start: int, count: int, need: int) -> None:
        limbo = self.limbo
        if limbo.append(tag, kind, start, count, need):
            return
        # Full: two syncs make every record in it reusable (the second one
        # writes back a sync record that covers what the first made durable).
        if self.sync_now is None:
            raise AssertionError("the held list is full and there is no way to sync")
        self.sync_now()
        self.sync_now()
        self.release_limbo()
        if not limbo.append(tag, kind, start, count, need):
            raise AssertionError("the held list is still full after two syncs")

    def _alloc_bitmaps(self, cpu: int, n: int, meta: bool) -> list[tuple[int, int]]:
        own = self._orders[cpu][0]
        # The own region alone usually shows there is room: one counter read
        # instead of the sum over every region.
        if own.nfree < n + self.reserve and n > self.nfree - (0 if meta else self.reserve):
            raise FsError(errno.ENOSPC)
        out: list[tuple[int, int]] = []
        got = 0
        for ra in self._orders[cpu]:
            ext = ra.alloc(n - got)
            out.extend(ext)
            got += sum(c for _, c in ext)
            if got == n:
                return out
        for s, c in out:
            self._free_now(s, c)                 # never used: no sync needs to see it
        raise FsError(errno.ENOSPC)

    def alloc_one(self, cpu: int, *, meta: bool = True) -> int:
        limbo = self.limbo
        if limbo is not None:
            w = self.w
            if w.held_due(*limbo.due_args):            # (_before_alloc, inline)
                self.release_limbo()
            if cpu == self.stash_cpu == self._fast_cpu and \
                    (blk := w.fresh_pop(*self._pop_args)):
                return blk                       # (most: popped and marked in one call)
            blk = self._alloc_one(cpu, meta)
            self._note_fresh_one(blk)
            return blk
        return self._alloc_one(cpu, meta)

    def _alloc_one(self, cpu: int, meta: bool) -> int:
        mine = self.stash_cpu
        blk = 0
        if cpu == mine:
            blk = self._from_stash(self.stashes[cpu], cpu)
        elif mine is not None and cpu == self._twin_of[mine]:
            # a twin for this CPU's log page: from its twin stash
            blk = self._from_stash(self.stashes[len(self.regions) + mine], cpu)
        if blk:
            return blk
        ((start, _),) = self._bitmaps_or_sync(cpu, 1, meta)
        return start

    def _from_stash(self, stash: Stash, cpu: int) -> int:
        """A block of CPU ``cpu``'s region from ``stash``, which is refilled from
        that region only, and only well above the reserve; 0 if none."""
        blk = stash.pop()
        if blk:
            return blk
        region = self._orders[cpu][0]
        if region.nfree > STASH_REFILL + self.reserve:
            for s, c in region.alloc(STASH_REFILL):
                self._prefault(s, c)
                for b in range(s, s + c):
                    stash.push(b)
            blk = stash.pop()
        return blk

    def _prefault(self, start: int, n: int) -> None:
        """Blocks taken into a stash will be written soon, most of them for the
        first time by this process (log pages, one-block writes, new inodes'
        first pages): their pages are mapped in one call rather than one page
        fault each (2 of a create's 34 µs)."""
        if self.prefault is not None:
            self.prefault(start * BLOCK, n * BLOCK)

    def stashed(self) -> int:
        """Free blocks kept in stashes (free space, though not in the bitmaps)."""
        return sum(len(s) for s in self.stashes)

    def drain_stashes(self) -> None:
        """Return every stashed block to its bitmap (no CPU may use its stash)."""
        for stash in self.stashes:
            for blk in stash.take_all():
                self.owner(blk).free(blk, 1)

    def owner(self, block: int) -> RegionBitmap:
        i = bisect.bisect_right(self._starts, block) - 1
        ra = self.regions[i]
        if not ra.contains(block):
            raise AssertionError(f"block {block} is not a data block")
        return ra

    def free(self, start: int, n: int, need: int = 0, hold: bool = False) -> None:
        """Give blocks back to the region(s) that own them (a single block of this
        process's own region to its stash, while there is room), or hold them
        back until the next sync (:meth:`hold_frees`).  ``need``: the blocks
        belong to write entry ``need``, which still maps other pages and whose
        data recovery may check after a power loss: unless the sync record on
        the disk covers that entry already, they wait also until it does
        (DESIGN 24.3).  ``hold``: held until the next sync even if allocated
        since the last one began (a compaction's old chain, which the slot on
        the disk may name until then, DESIGN 24.5)."""
        limbo = self.limbo
        if limbo is not None:
            w = self.w
            looked = False
            if n == 1 and not need and not hold and self.stash_cpu == self._fast_cpu and \
                    self._own.lo <= start < self._own.hi:
                # (most frees: one block of the own region, back to the stash
                # at once if still fresh, in one call; the look decides, as
                # in _take_fresh)
                got = w.fresh_push(start, *self._push_args)
                if got == 1:
                    return
                if got == 2:
                    self._free_now(start, 1)
                    return
                if got == 3:
                    raise AssertionError(f"double free of block {start}")
                looked = True
            tag = w.load64(H_SYNC_STARTED)
            if need and (not self.split_frees or need <= w.load64(H_RDURABLE)):
                need = 0
            if not need and not hold and not looked and self._take_fresh(start, n, tag):
                # allocated and freed within one interval: no synced state used it
                self._free_now(start, n)
                return
            if limbo.due():
                self.release_limbo()
            self._append(tag, BLOCKS, start, n, need)
            # ask early, before the blocks pile up or the list fills (a full
            # list makes this process sync twice, in the request's time)
            if (limbo.blocks >= self.limbo_want or len(limbo) >= HELD_SLOTS // 2) and \
                    self._asked != tag and self.want_sync:
                self._asked = tag
                self.want_sync()
            return
        self._free_now(start, n)

    def _free_now(self, start: int, n: int) -> None:
        if n == 1 and self.stash_cpu is not None:
            own = self._orders[self.stash_cpu][0]
            if own.lo <= start < own.hi:
                # the bitmap's double-free check, kept for stashed blocks
                b = start - own.lo
                if not own.w.load64(own.words + 8 * (b >> 6)) >> (b & 63) & 1:
                    raise AssertionError(f"double free of block {start}")
                if self.stashes[self.stash_cpu].push(start):
                    return
            tw = self._orders[self._twin_of[self.stash_cpu]][0]
            if tw is not own and tw.lo <= start < tw.hi:
                b = start - tw.lo                # a twin's block: to the twin stash
                if not tw.w.load64(tw.words + 8 * (b >> 6)) >> (b & 63) & 1:
                    raise AssertionError(f"double free of block {start}")
                if self.stashes[len(self.regions) + self.stash_cpu].push(start):
                    return
        while n > 0:
            ra = self.owner(start)
            take = min(n, ra.hi - start)
            ra.free(start, take)
            start += take
            n -= take
