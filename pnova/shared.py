"""The shared area: DRAM state that the worker processes of one device share.

Each worker process acts as one logical CPU.  What they must agree on lives
here, in one MAP_SHARED mapping changed only with atomics (:mod:`pnova.atomics`):
the sequence counter, the lock words of every lock scheme, the per-CPU log
pointer rings and the registry of workers (so that a waiter can tell that the
holder of a lock has died).  None of it is persistent: a fresh mount starts a
fresh area, sized from the device geometry.

The mapping is either anonymous (inherited by workers forked from one parent)
or a named file in /dev/shm (``SharedArea.create(path=...)`` and
``SharedArea.attach(path)``), so that independent processes can join.

Layout (byte offsets; every region starts on a 64-byte line)::

    0       header line: magic u64, version u32, ncpus u32, seq u64 (next
            sequence number), segment-table slots u32, range-table entries u32,
            rename lock word u32, syncs started u64, syncs done u64, held
            blocks u64
    64      sync record line: covered sequence number u64, durable record
            u64, record lock u32; at 88 held inode slots u64, at 96 the deaths
            noticed u64 (dead workers' write locks released by others), at 104
            the syncs running u64 (begun, not yet done)
    128     worker registry: one line per CPU: pid u64, held-read records
            (HELD_MAX u64 lock offsets, 0 = empty)
    ...     inode slots: one line per inode slot (ISLOT bytes), in it
            +0   inode lock word u32
            +4   inode log-tail lock word u32
            +8   reference count u32 (kernel lookups, open handles)
            +12  log rewrites u32, two per compaction, odd while the
                 compaction switches the slot's words
            +16  moves between directories u64, 1 + the sync interval of the
                 last one (0 = none)
            +24  directory users u64, CPU + 1 of the one CPU doing namespace
                 operations in the directory, or DIR_SHARED | the time (ms)
                 another CPU came; a hint (0 = nobody yet)
            +32  unused (to the end of the line)
    ...     name lock words: NAME_SLOTS u32, hashed by (directory, name); a
            namespace operation holds the one of each name it changes
    ...     segment lock words: SEG_SLOTS u32, hashed by (inode, segment)
    ...     range table: a guard word, then RANGE_MAX entries of 32 bytes
            (inode u64, first page u64, last page u64, owner CPU + 1 u32, mode u32)
    ...     per-CPU rings: head line, tail line, RING_SLOTS u64 slots
    ...     per-CPU block stashes: a line with the count u64, then STASH_SLOTS
            u64 block numbers; each is changed only by the process acting as
            its CPU (and by the primary once every worker has exited); then
            as many twin stashes, CPU c's holding blocks of CPU c+1's region
            (for log page twins)
    ...     per-CPU held lists: a line with the lock word u32 (its holder's
            pid), head u64, tail u64 and held blocks u64, then HELD_SLOTS
            records (tag u64, start u64, count u32, kind u32, need u64) of
            blocks (kind 0) and inode slots (kind 1) freed but not yet
            reusable; the CPU's process appends, any process releases
    ...     page-group versions: VER_SLOTS u64, hashed by (inode, group of
            VER_PAGES pages), and per inode a size epoch in the same table;
            a writer adds one to the versions of the groups it wrote before
            it unlocks them (see the engine's write path)
    ...     name versions: NAME_SLOTS u64, one per name lock word; the holder of
            a name lock adds one before it unlocks (see the engine's namei)
    ...     compaction records: COMPACT_SLOTS lines, hashed by inode: version
            u64 (odd while written), inode u64, its log rewrites after the
            compaction u64, old head u64, old positions u64 (the tail, or a
            digest of every log's position), new head u64, new tail u64, the
            compaction's last sequence number u64; the last compaction of a
            directory, so that a cache that had reached the old positions
            takes the new chain without re-reading it (see the engine's icache)
    ...     per region (one per CPU): a line with the free-block counter u64 and
            the allocation cursor u64, then the block bitmap (u64 words, bit i
            of word j = data block 64*j + i of the region, 1 = in use)
    ...     per CPU inode table: the same (counter, cursor, bitmap of its slots)
    ...     per region: fresh words, one u64 per 32 data blocks: the sync
            interval (syncs started, low 32 bits) in the high half, and in the
            low half a bit per block allocated in that interval while no sync
            ran (so no synced state has used it: freed in the same interval,
            it needs no sync; DESIGN 24)
"""
from __future__ import annotations

import mmap
import os
import time

import numpy as np

from .atomics import SharedWords

MAGIC = 0x41455241_41564F4E   # "NOVAAREA"
VERSION = 20
LINE = 64
# The words of one inode slot, one line per slot (offsets in it): each
# inode's words come with one line fetched, and two inodes never share a line,
# so processes working on different inodes never take a line from each other
# (inode numbers of different CPUs alternate: packed arrays would put every
# CPU's inodes beside each other's).
ISLOT = LINE
S_FIELDS = {"inode_locks": 0, "log_locks": 4, "refs": 8, "rewrites": 12, "moved": 16,
            "dir_users": 24}
HELD_MAX = 6                  # read locks one CPU may hold at once
SEG_SLOTS = 1 << 16
NAME_SLOTS = 1 << 12
RANGE_MAX = 256
RANGE_ENTRY = 32
RING_SLOTS = 256
DIR_SHARED = 1 << 63          # a directory users word: several CPUs, since the time below
REF_DYING = 1 << 31           # a reference count's word once its inode is being freed
STASH_SLOTS = 64              # free blocks one CPU keeps at hand
HELD_SLOTS = 2048             # records of one CPU's list of held blocks and inode slots
HELD_REC = 32                 # one record: tag u64, start u64, count u32, kind u32, need u64
COMPACT_SLOTS = 256           # compaction records (one line each)
VER_BITS = 16
VER_SLOTS = 1 << VER_BITS     # page-group version words
VER_SHIFT_PAGES = 4
VER_PAGES = 1 << VER_SHIFT_PAGES   # pages per version group
_B = 0xC2B2AE3D27D4EB4F
_M64 = (1 << 64) - 1
_VER_SHIFT = 64 - VER_BITS    # a slot is the top VER_BITS bits of a 64-bit hash

H_MAGIC, H_VERSION, H_NCPUS, H_SEQ, H_SEG_SLOTS, H_RANGE_MAX = 0, 8, 12, 16, 24, 28
H_RENAME_LOCK = 32            # u32: the rename lock (a directory moving to another parent)
H_SYNC_STARTED = 40           # u64: syncs started (a block freed now is tagged with it)
H_SYNCED = 48                 # u64: blocks tagged below it are free to reuse (DESIGN 24)
H_LIMBO = 56                  # u64: blocks freed but not yet reusable, all processes
# The sync record (DESIGN 24.3), second header line:
H_RSYNC = 64                  # u64: the newest sequence number a completed sync covers
H_RDURABLE = 72               # u64: the newest sync record a completed sync wrote back
H_RLOCK = 80                  # u32: held while a sync stores the record into the image
H_HELD_INOS = 88              # u64: inode slots freed but not yet reusable, all processes
# u64: how often a dead worker's write lock was released by another process; a
# change tells every cache to stop trusting version words (DESIGN 19.7)
H_DEATHS = 96
# u64: syncs begun and not yet done; a block allocated while any runs is never
# fresh (DESIGN 24)
H_SYNCS_RUNNING = 104
# u32 lock word: read-held by each compaction that is switching a slot to a
# chain made durable by its own msync (DESIGN 24.5); a sync that starts waits
# until no one holds it (never write-locked)
H_SWITCH_GATE = 112
HEADER = 2 * 64


def _line(n: int) -> int:
    return (n + LINE - 1) // LINE * LINE


def _offsets(ncpus: int, ninodes: int, region_blocks: list[int]) -> dict[str, int]:
    """Offsets of every table; region_blocks = data blocks of each CPU region."""
    o: dict[str, int] = {"registry": HEADER}
    o["slots"] = o["registry"] + ncpus * LINE
    for name, at in S_FIELDS.items():
        o[name] = o["slots"] + at
    o["name_locks"] = o["slots"] + ISLOT * ninodes
    o["seg_locks"] = o["name_locks"] + _line(4 * NAME_SLOTS)
    o["range_table"] = o["seg_locks"] + _line(4 * SEG_SLOTS)
    o["rings"] = o["range_table"] + LINE + _line(RANGE_ENTRY * RANGE_MAX)
    o["ring_size"] = 2 * LINE + _line(8 * RING_SLOTS)
    o["stashes"] = o["rings"] + ncpus * o["ring_size"]
    o["stash_size"] = LINE + _line(8 * STASH_SLOTS)
    o["held"] = o["stashes"] + 2 * ncpus * o["stash_size"]      # own and twin stashes
    o["held_size"] = LINE + HELD_SLOTS * HELD_REC
    o["versions"] = o["held"] + ncpus * o["held_size"]
    o["name_versions"] = o["versions"] + 8 * VER_SLOTS
    o["compactions"] = o["name_versions"] + 8 * NAME_SLOTS
    off = o["compactions"] + LINE * COMPACT_SLOTS
    for i, n in enumerate(region_blocks):
        o[f"region{i}"] = off
        off += LINE + _line(8 * ((n + 63) // 64))
    per_cpu = ninodes // ncpus
    for c in range(ncpus):
        o[f"itable{c}"] = off
        off += LINE + _line(8 * ((per_cpu + 63) // 64))
    for i, n in enumerate(region_blocks):
        o[f"fresh{i}"] = off
        off += _line(8 * ((n + 31) // 32))
    o["size"] = off
    return o


class SharedArea:
    """One mapping plus the offsets of each table inside it."""

    def __init__(self, mm: mmap.mmap, ncpus: int, ninodes: int, region_blocks: list[int],
                 path: str | None) -> None:
        self.mm = mm
        self.path = path
        self.ncpus = ncpus
        self.ninodes = ninodes
        self.region_blocks = region_blocks
        self.w = SharedWords(mm)
        # Plain loads of 64-bit words by index (offset // 8), for the write
        # path's version checks: an aligned 8-byte load is one instruction, so
        # it cannot tear, and it costs a tenth of a libatomic call.  Never
        # written through: every store is an atomic of ``w``.
        self.u64 = memoryview(mm).cast("Q")
        o = _offsets(ncpus, ninodes, region_blocks)
        self.registry = o["registry"]
        # Inode slot ino's word of a field is at field + ISLOT * (ino - 1).
        self.inode_locks = o["inode_locks"]
        self.log_locks = o["log_locks"]
        self.refs = o["refs"]
        # u32 per inode slot: how often its logs were rewritten (compacted).
        # A compaction frees the old pages, and the new head or array may be
        # a block number the old ones had (freed, then handed out again): head
        # and array alone cannot tell a cache that its positions are gone.
        self.rewrites = o["rewrites"]
        # u64 per inode slot: 1 + the sync interval (H_SYNC_STARTED) in which
        # a rename last moved the inode between directories; 0 = not since
        # this area was made (DESIGN 24.3, step 8)
        self.moved = o["moved"]
        # u64 per inode slot: which CPU does namespace operations in the
        # directory (a hint that chooses how they lock: DESIGN 19.8)
        self.dir_users = o["dir_users"]
        self.name_locks = o["name_locks"]
        self.seg_locks = o["seg_locks"]
        self.range_table = o["range_table"]
        self.rings = o["rings"]
        self.ring_size = o["ring_size"]
        self.stashes = o["stashes"]
        self.stash_size = o["stash_size"]
        self.held = o["held"]
        self.held_size = o["held_size"]
        self.versions = o["versions"]
        self.name_versions = o["name_versions"]
        self.compactions = o["compactions"]
        self.regions = [o[f"region{i}"] for i in range(len(region_blocks))]
        self.itables = [o[f"itable{c}"] for c in range(ncpus)]
        self.fresh = [o[f"fresh{i}"] for i in range(len(region_blocks))]
        self.size = o["size"]

    def column(self, field: int) -> np.ndarray:
        """The u32 word at ``field`` (``inode_locks``, ``log_locks``, ``refs``...)
        of every inode slot, as a view; drop it before the area is closed."""
        return np.ndarray((self.ninodes,), dtype="<u4", buffer=self.mm, offset=field,
                          strides=(ISLOT,))

    def note_compaction(self, ino: int, rewrites: int, old: tuple[int, int],
                        new: tuple[int, int], last_seq: int) -> None:
        """Record that ``ino``'s log went from (head, tail) ``old`` to ``new``,
        its rewrites count becoming ``rewrites``.  A hint: a writer that finds
        the line being written by another gives up, and a reader checks every
        field against what it knows."""
        w = self.w
        off = self.compactions + LINE * (ino % COMPACT_SLOTS)
        for _ in range(100):
            v = w.load64(off)
            if not v & 1 and w.cas64(off, v, v + 1):
                break
        else:
            return                               # (its writer may have died mid-way)
        for i, x in enumerate((ino, rewrites, *old, *new, last_seq), 1):
            w.store64(off + 8 * i, x)
        w.store64(off, v + 2)

    def compaction(self, ino: int) -> tuple[int, ...] | None:
        """The last compaction recorded for ``ino``: (rewrites, old head, old
        tail, new head, new tail, last sequence number), or None."""
        w = self.w
        off = self.compactions + LINE * (ino % COMPACT_SLOTS)
        v = w.load64(off)
        if v & 1:
            return None
        rec = w.load64s(off + 8, 7, 8)
        if w.load64(off) != v or rec[0] != ino:
            return None
        return rec[1:]

    @staticmethod
    def size_for(ncpus: int, ninodes: int, region_blocks: list[int]) -> int:
        return _offsets(ncpus, ninodes, region_blocks)["size"]

    @classmethod
    def create(cls, ncpus: int, ninodes: int, region_blocks: list[int] | None = None, *,
               path: str | None = None, first_seq: int = 1) -> "SharedArea":
        """A fresh, zeroed area; anonymous unless ``path`` names a /dev/shm file."""
        region_blocks = list(region_blocks or [])
        size = cls.size_for(ncpus, ninodes, region_blocks)
        if path is None:
            mm = mmap.mmap(-1, size, mmap.MAP_SHARED)
        else:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.ftruncate(fd, size)
                mm = mmap.mmap(fd, size, mmap.MAP_SHARED)
            finally:
                os.close(fd)
        area = cls(mm, ncpus, ninodes, region_blocks, path)
        w = area.w
        w.store32(H_VERSION, VERSION)
        w.store32(H_NCPUS, ncpus)
        w.store64(H_SEQ, first_seq)
        w.store32(H_SEG_SLOTS, SEG_SLOTS)
        w.store32(H_RANGE_MAX, RANGE_MAX)
        w.store64(H_MAGIC, MAGIC)                # last: the area is ready
        return area

    @classmethod
    def attach(cls, path: str, ninodes: int, region_blocks: list[int]) -> "SharedArea":
        """Map an existing named area (created by another process)."""
        fd = os.open(path, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED)
        finally:
            os.close(fd)
        w = SharedWords(mm)
        if w.load64(H_MAGIC) != MAGIC or w.load32(H_VERSION) != VERSION:
            w.release()
            mm.close()
            raise ValueError(f"{path} is not a pnova shared area")
        ncpus = w.load32(H_NCPUS)
        w.release()
        area = cls(mm, ncpus, ninodes, list(region_blocks), path)
        if area.size != size:
            area.close()
            raise ValueError(f"{path} does not match this device's geometry")
        return area

    def close(self) -> None:
        self.u64.release()
        self.w.release()
        self.mm.close()

    # ---------------------------------------------------------- sequence numbers
    def next_seq(self, n: int = 1) -> int:
        """Reserve ``n`` sequence numbers; return the first."""
        return self.w.add64(H_SEQ, n)

    # ----------------------------------------------------------- versions
    def version_slots(self, ino: int, first: int, last: int) -> list[int]:
        """Offsets of the version words of pages first..last of ``ino``, then of its
        size epoch.  Different groups may hash to one word: that only makes a
        version change more often than its group does."""
        base = self.versions
        # Multiplicative hashing, top bits; the epoch is "group -1".
        h = (ino * 0x9E3779B97F4A7C15) & _M64
        g0, g1 = first >> VER_SHIFT_PAGES, last >> VER_SHIFT_PAGES
        if g0 == g1:                           # the common case: one group
            return [base + 8 * (((h + (g0 + 1) * _B) & _M64) >> _VER_SHIFT),
                    base + 8 * (h >> _VER_SHIFT)]
        out = [base + 8 * (((h + (g + 1) * _B) & _M64) >> _VER_SHIFT)
               for g in range(g0, g1 + 1)]
        out.append(base + 8 * (h >> _VER_SHIFT))
        return out

    def epoch_slot(self, ino: int) -> int:
        """Offset of the epoch word of ``ino`` (the last of :meth:`version_slots`)."""
        return self.versions + 8 * (((ino * 0x9E3779B97F4A7C15) & _M64) >> _VER_SHIFT)

    # ----------------------------------------------------------- worker registry
    def register(self, cpu: int, pid: int | None = None) -> None:
        """Record that process ``pid`` now acts as ``cpu`` (clears its records)."""
        base = self.registry + cpu * LINE
        for i in range(HELD_MAX):
            self.w.store64(base + 8 + 8 * i, 0)
        self.w.store64(base, os.getpid() if pid is None else pid)

    def pid_of(self, cpu: int) -> int:
        return self.w.load64(self.registry + cpu * LINE)

    def held_slot(self, cpu: int, i: int) -> int:
        """Offset of record ``i`` of ``cpu``'s held read locks."""
        return self.registry + cpu * LINE + 8 + 8 * i

    def ring_base(self, cpu: int) -> int:
        return self.rings + cpu * self.ring_size


def process_alive(pid: int) -> bool:
    """True unless ``pid`` has exited (a zombie counts as dead)."""
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    state = stat[stat.rindex(b")") + 2:stat.rindex(b")") + 3]
    return state not in (b"Z", b"X")


def lock_word(w: SharedWords, off: int) -> None:
    """Take a u32 lock word that holds its holder's pid.  Such a lock is held for
    a short run of loads and stores; a holder that died holding it (kill -9;
    a zombie counts as dead) is waited out for a second and then passed over.
    What it was doing may be left half done: the sync record is one store,
    either made or not; a held list may lose the records it had taken, whose
    blocks then stay marked in use until the next mount rebuilds the
    allocator, which a serving process's death always leads to (DESIGN 22.4)."""
    me = os.getpid()
    deadline = None
    while True:
        holder = w.load32(off)
        if holder == 0 and w.cas32(off, 0, me):
            return
        if holder:
            now = time.monotonic()
            if deadline is None:
                deadline = now + 1.0
            elif now > deadline and not process_alive(holder) and w.cas32(off, holder, me):
                return
        os.sched_yield()


def unlock_word(w: SharedWords, off: int) -> None:
    w.store32(off, 0)
