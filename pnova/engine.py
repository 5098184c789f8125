"""The pnova engine: a NOVA-style filesystem on a PMem device, without FUSE.

Every public method takes inode numbers and byte-string names (the shape of
FUSE requests) and either returns a result or raises :class:`FsError` with an
errno.  The FUSE layer, the tools and the benchmark harness all drive
:class:`FileSystem`, and nothing else of the engine.  Persistent state
changes only through the pmem layer; the Python objects (inode cache,
allocators, free-inode bitmaps) are DRAM caches that a mount rebuilds from
the device.

``FileSystem`` is assembled from one class per mechanism, each in the module
named for it (NOVA's source layout):

    super     superblock, mount, clean unmount, worker processes, statfs
    rebuild   reading an inode from its logs; recovery of a dirty image
    replica   the second copy of every inode slot, and its repair at mount
    icache    the per-process inode cache, validated against the device
    commit    appending entries and committing them (tail store / journal)
    gc        log compaction
    itable    inode slots: allocation, creation, references, eviction
    attrs     stat, setattr, the privilege drop
    namei     lookup, create, link, unlink, rmdir, rename
    dir       readdir
    file      read and the copy-on-write write path
    xattr     extended attributes

This module holds what they all share: the constructor and the addressing of
inode slots.
"""
from __future__ import annotations

import errno
import functools
import os
import time
from collections.abc import Callable

from . import layout as L
from .alloc import Allocator, SharedBitmap
from .attrs import Attr, Attributes
from .commit import Commit
from .dir import Directories
from .errors import FsError
from .file import READ_CHUNK, FileData, Landing
from .gc import Compaction, PendingSwitch
from .icache import InodeCache
from .inode import Inode
from .itable import InodeTable
from .journal import Journal
from .locks import make_scheme
from .namei import Namei
from .pmem import PMem
from .protect import DataProtection
from .rebuild import Rebuild
from .replica import SlotReplicas
from .ring import Ring
from .shared import H_DEATHS, H_SEQ, HELD_MAX, ISLOT, SharedArea
from .xattr import Xattrs
from .super import Mount, StatFs, read_regions, read_superblock, write_superblock
from .xattr import CAPS_XATTR

__all__ = ["Attr", "CAPS_XATTR", "FileSystem", "Landing", "StatFs", "read_regions",
           "read_superblock", "write_superblock"]


class FileSystem(Mount, Rebuild, SlotReplicas, InodeCache, Commit, Compaction, InodeTable,
                 Attributes, Namei, Directories, FileData, Xattrs):
    """A mounted pnova filesystem: one process, acting as one CPU.

    Several processes can work on one device at once: the primary calls
    :meth:`prepare_workers`, forks, and each child calls :meth:`become_worker`
    with its CPU.  They then share the allocator, sequence counter, locks and
    log-page rings (the shared area) and validate their inode caches against
    the device before every use.
    """

    def __init__(self, pm: PMem, sb: L.Superblock, regions: list[L.Region], *, cpu: int = 0,
                 readonly: bool = False, area: SharedArea | None = None,
                 lock: str = "pnova", segment_pages: int = 16) -> None:
        self.pm = pm
        self.sb = sb
        self.regions = regions
        self._itables = [r.itable_start * L.BLOCK for r in regions]
        self._init_replicas()
        self.ncpus = sb.ncpus
        self.cpu = cpu % self.ncpus
        self.readonly = readonly
        # recovery may meet pages a power loss kept from a disk (Rebuild._pages_may_be_lost)
        self.power_loss = False
        # slots freed by evictions wait for a sync, in the allocator's held
        # lists, on a disk-backed image (itable)
        self.hold_inos = False
        # inodes moved between directories since a sync, with the sync interval
        # then open (disk-backed images: DESIGN 24.3, rename barrier)
        self.moves_need_sync = False           # on a disk: DESIGN 24.3, step 8
        # version 4's entry marks (F_CONT, rename marks): not written into older images
        self.marks = sb.version >= 4
        self.peer_dirs = sb.version >= 5            # D_MOVED dentries name the other directory
        self.sync_record = sb.version >= 6          # block 0 records what syncs cover (24.3)
        total = sb.total_blocks
        self._own_area = area is None
        self._attached: list[FileSystem] = []   # other CPUs attached in this process
        if area is None:
            area = SharedArea.create(sb.ncpus, sb.ncpus * sb.inodes_per_cpu,
                                     [r.data_blocks for r in regions], first_seq=sb.next_seq)
        self.area = area
        # The next sequence number (one shared counter; 16.): a bound call, as it
        # is taken for every entry.
        self._next_seq = functools.partial(area.w.add64, H_SEQ, 1)
        self.alloc = Allocator(area, regions, sb.cpus_per_node,
                               reserve=max(8, min(1024, total // 512)))
        self.alloc.stash_cpu = None if readonly else self.cpu
        self.alloc.prefault = pm.prefault
        self.journals = [Journal(pm, r.journal_block, self._mirror_of,
                                 L.journal_twin(regions, r.cpu)) for r in regions]
        self.prot = DataProtection(pm, sb, regions)
        self._lost_seen: set[tuple[int, int]] = set()   # damaged data already logged
        self.lock_name = lock
        self.segment_pages = segment_pages
        self.scheme = make_scheme(lock, area, self.cpu, segment_pages)
        self.read_chunk = READ_CHUNK if lock in ("inode", "rangetree") else \
            min(READ_CHUNK, (HELD_MAX - 2) * segment_pages * L.BLOCK)
        self.local_logs = lock == "pnova"        # per-core logs for file writes
        # ... and for the dentries of directories several CPUs change (format 9;
        # not on a disk, where settling half-arrived renames after a power loss
        # reads each directory's one log in order: DESIGN 24.3)
        self.dir_logs = self.local_logs and sb.version >= 9 and pm.mode != "disk"
        # Every log page has a twin in the next CPU's region (format 8).
        self.log_twins = sb.log_replicas
        self._twin_cpu = (self.cpu + 1) % self.ncpus
        self.rings: list[Ring] = [Ring(area, c) for c in range(self.ncpus)]
        # Called when this CPU's ring runs short (the mount's refiller sleeps
        # until then); None: the refiller tops up on its own schedule.
        self.ring_low: Callable[[], None] | None = None
        # True once several processes use the device: caches are then
        # validated against the device before every use.
        self.shared = False
        # free inode slots of each CPU's table, shared by every worker process
        self.free_inodes = [SharedBitmap(area, area.itables[c], 0, sb.inodes_per_cpu)
                            for c in range(self.ncpus)]
        # any process may give back a slot another CPU held until a sync
        self.alloc.free_ino = lambda ino: self._release_ino(ino, held=False)
        self.cache: dict[int, Inode] = {}
        self._compact_wanted: set[int] = set()
        # files compacted on a disk whose new chains are on their way to it
        # (DESIGN 24.5): switched after a later operation
        self._switches: dict[int, PendingSwitch] = {}
        # logs read around a damaged copy (rewritten by a compaction), and
        # whether such damage is repaired where it lies (recovery at mount)
        self._repair_wanted: set[int] = set()
        self._repair_in_place = False
        self._found: list[tuple[int, list]] = []  # damage optimistic reads found
        self._slot_repairs: set[int] = set()     # slots read from their replicas
        # all heads and tails of a per-core log array, read in one call
        # namespace locks held by the running namespace operation (None: none running)
        # locks of the running namespace operation: key -> (for writing, word);
        # None while none runs
        self._ns: dict[int, tuple[bool, int]] | None = None
        self._ns_top = -1                        # the highest key it holds
        self._inode_locks = area.inode_locks
        self._name_locks = area.name_locks
        self._name_versions = area.name_versions
        self._dir_users = area.dir_users
        self._seen_dirs: dict[int, None] = {}    # directories holding a copy, oldest first
        self._deaths_seen = 0                    # H_DEATHS when the caches last trusted versions
        self._ns_alone = False                   # the only process changing the device
        self._ns_names: list[tuple[int, int]] = []   # (directory, name slot) it locked
        self._name_base = sb.ncpus * sb.inodes_per_cpu + 1   # first name-lock key
        self.max_log_pages = total
        self.mount_path = ""
        self.mount_seconds = 0.0

    def ino_of(self, cpu: int, idx: int) -> int:
        return 1 + idx * self.ncpus + cpu

    def inode_addr(self, ino: int) -> int:
        i = ino - 1
        return self._itables[i % self.ncpus] + (i // self.ncpus) * L.INODE_SIZE

    def _slot_words(self, ino: int) -> tuple[int, int, int, int, int]:
        """The slot words a cache is validated against: generation, state, log
        head, log tail, log array; each loaded whole (other processes store
        them meanwhile)."""
        a = self.inode_addr(ino)
        w = self.pm.words
        return (w.load64(a + L.I_GENERATION),) + w.load64s(a + L.I_STATE, 4, 8)

    def _trust_versions(self) -> None:
        """Before a cache is trusted on the word of version words: if another
        process released a dead worker's write lock since this process last
        looked, that worker may have committed a change without bumping its
        versions (it dies between the two), so every cached inode forgets what
        the versions vouched for and is caught up in full at its next use
        (DESIGN 19.7).  One load when nobody died."""
        deaths = self.area.u64[H_DEATHS >> 3]
        if deaths != self._deaths_seen:
            self._deaths_seen = deaths
            for inode in self.cache.values():
                inode.vers.clear()
                inode.names_seen = None
            self._seen_dirs.clear()

    def _rewrites(self, ino: int) -> int:
        """How often the inode's logs have been rewritten (shared area): twice
        per compaction, odd while one switches the slot's words."""
        return self.area.w.load32(self.area.rewrites + ISLOT * (ino - 1))

    def _rewrites_settled(self, ino: int) -> int:
        """The rewrite count once it is even: a reader about to read an inode's
        slot words and logs waits out a compaction that is switching them.  A
        count that stays odd for a second belongs to a compactor that stopped
        (a killed worker, whose open journal only recovery settles): the
        reader then goes on and finds what it finds."""
        load = self.area.w.load32
        off = self.area.rewrites + ISLOT * (ino - 1)
        v = load(off)
        if not v & 1:
            return v
        deadline = time.monotonic() + 1.0
        while v & 1 and time.monotonic() < deadline:
            os.sched_yield()
            v = load(off)
        return v

    def _valid_ino(self, ino: int) -> bool:
        return 1 <= ino and (ino - 1) // self.ncpus < self.sb.inodes_per_cpu

    def _rw(self) -> None:
        if self.readonly:
            raise FsError(errno.EROFS)

    def _split_need(self, ino: int, lo: int, hi: int) -> int:
        """What freed blocks lo..hi of file ``ino`` wait for besides a sync: the
        sequence number of a write entry of several pages they belong to that
        still maps other pages (DESIGN 24.3, step 9), else 0.  An entry's
        blocks are consecutive, so one that keeps pages outside lo..hi holds
        lo or hi.  A file not cached here: the worst, every entry so far."""
        alloc = self.alloc
        if not ino or alloc.limbo is None:
            return 0
        owner = self.cache.get(ino)
        if owner is None:
            return alloc.unknown_need()
        if not owner.wide:
            return 0                             # no entry of several pages maps any
        return owner.holds(lo) if lo == hi else max(owner.holds(lo), owner.holds(hi))

    def _free_blocks(self, blocks: list[int], ino: int = 0, hold: bool = False) -> None:
        """Free data blocks, as extents.  ``ino``: the file whose write or
        truncate unmapped them, 0 for other blocks (:meth:`_split_need`);
        ``hold``: see :meth:`Allocator.free`."""
        if not blocks:
            return
        free, need = self.alloc.free, self._split_need
        blocks.sort()
        if blocks[-1] - blocks[0] == len(blocks) - 1:     # one extent (no block twice)
            free(blocks[0], len(blocks), need(ino, blocks[0], blocks[-1]), hold)
            return
        start = prev = blocks[0]
        for b in blocks[1:]:
            if b != prev + 1:
                free(start, prev - start + 1, need(ino, start, prev), hold)
                start = b
            prev = b
        free(start, prev - start + 1, need(ino, start, prev), hold)
