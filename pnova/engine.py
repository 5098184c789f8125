"""The pnova engine: a NOVA-style filesystem on a PMem device, without FUSE.

Every public method takes inode numbers and byte-string names (the shape of
FUSE requests) and either returns a result or raises :class:`FsError` with an
errno.  The FUSE layer, the tools and the benchmark harness all drive this
class.  Persistent state changes only through the pmem layer; the Python
objects here (inode cache, allocators, free-inode bitmaps) are DRAM caches that
a mount rebuilds from the device.
"""
from __future__ import annotations

import errno
import functools
import struct
import logging
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from . import layout as L
from . import log as plog
from .alloc import Allocator, SharedBitmap
from .errors import CorruptImage, FsError
from .inode import Inode
from .journal import Journal, JournalError
from .pmem import DeviceError, PMem
from .locks import make_scheme
from .ring import Ring, refill
from .shared import H_NS_LOCK, H_SEQ, HELD_MAX, SharedArea

logger = logging.getLogger("pnova")

# Extended attribute namespaces stored: user.* (on regular files and
# directories only, as Linux allows), trusted.* (the kernel lets only
# CAP_SYS_ADMIN near them) and security.* (file capabilities, LSM labels).
# system.* (POSIX ACLs) is not offered.
_XATTR_NS = (b"user.", b"trusted.", b"security.")
CAPS_XATTR = b"security.capability"
_SUIDGID = stat.S_ISUID | stat.S_ISGID
_U64 = struct.Struct("<Q")
# How often an optimistic read of an inode's logs is repeated before giving up.
_RETRIES = 100
# line 1 of an inode slot: state, log head, log tail, log array, then zeros
_LINE1 = struct.Struct("<QQQQ32x")
# generation (line 0) and the four words of line 1, read in one call
_SLOT_WORDS = struct.Struct("<Q32xQQQQ")
# Largest piece of a read done under one range lock.  A segment scheme takes
# one read lock per segment, and a CPU can record only HELD_MAX of them at once
# in the shared area, so there a piece spans at most HELD_MAX - 2 segments.
READ_CHUNK = 1 << 20


@dataclass(slots=True)
class Attr:
    """What stat(2) reports for an inode."""
    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    blocks: int          # 512-byte units
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    generation: int


@dataclass(slots=True)
class StatFs:
    bsize: int
    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int
    namemax: int


def read_superblock(pm: PMem) -> tuple[L.Superblock, str]:
    """Return (superblock, which) where which is 'primary' or 'replica' (SPEC 13.1).

    Raises CorruptImage with one line when neither copy is usable, or when the
    file is shorter than the filesystem the superblock describes.  A longer
    file is accepted: the filesystem is its first ``total_blocks`` blocks.
    """
    if pm.size < 16 * L.BLOCK:
        raise CorruptImage(f"{pm.path}: too small to hold a pnova filesystem")
    block0 = pm.read(0, L.SB_SIZE)
    try:
        sb, which = L.Superblock.unpack(block0), "primary"
    except ValueError as e1:
        why1 = str(e1)
        if why1.startswith("unsupported format version"):
            raise CorruptImage(f"{pm.path}: {why1}; this pnova reads version "
                               f"{L.FORMAT_VERSION} only (copy the data out with the pnova "
                               "that made it, then mkfs.pnova)") from None
        sb, why2 = None, ""
        for blk in L.replica_blocks(block0, pm.read(L.BLOCK, L.BLOCK), pm.size):
            try:
                cand = L.Superblock.unpack(pm.read(blk * L.BLOCK, L.SB_SIZE))
                why = L.replica_fits(cand, blk)
            except ValueError as e2:
                why = str(e2)
            if why is None:
                sb = cand
                break
            why2 = why2 or why                   # the reason of the first candidate
        if sb is None:
            if why1 == "bad magic" and why2 == "bad magic":
                raise CorruptImage(f"{pm.path}: not a pnova filesystem (no superblock found; if "
                                   "it held one, fsck.pnova can rebuild it)") from None
            raise CorruptImage(f"{pm.path}: superblock unusable ({why1}) and its replica too "
                               f"({why2}); run fsck.pnova") from None
        which = "replica"
    if sb.total_blocks * L.BLOCK > pm.size:
        raise CorruptImage(f"{pm.path}: the file is shorter than its filesystem ({pm.size} "
                           f"bytes; the superblock describes {sb.total_blocks} blocks, "
                           f"{sb.total_blocks * L.BLOCK} bytes): its end is missing")
    return sb, which


def write_superblock(pm: PMem, sb: L.Superblock) -> None:
    """Primary then replica, each fenced: a crash leaves at least one intact copy."""
    raw = sb.pack()
    pm.store(0, raw)
    pm.persist(0, len(raw))
    last = (sb.total_blocks - 1) * L.BLOCK
    pm.store(last, raw)
    pm.persist(last, len(raw))


def read_regions(pm: PMem, sb: L.Superblock) -> list[L.Region]:
    """Region descriptors, checked against the geometry the superblock implies."""
    try:
        expect = L.plan_regions(sb.total_blocks, sb.numa_nodes, sb.cpus_per_node,
                                sb.inodes_per_cpu)
    except ValueError as e:
        raise CorruptImage(f"{pm.path}: superblock geometry is impossible ({e})") from None
    out = []
    base = sb.region_table_block * L.BLOCK
    for i in range(sb.ncpus):
        raw = pm.read(base + i * L.REGION_SIZE, L.REGION_SIZE)
        try:
            r = L.Region.unpack(raw)
        except ValueError:
            r = None
        if r != expect[i]:
            # The table is derivable from the superblock: use the derived copy
            # and let fsck rewrite the damaged descriptor.
            logger.warning("region descriptor of CPU %d is damaged; using the geometry "
                           "from the superblock", i)
            r = expect[i]
        out.append(r)
    return out


def _namespace(fn):
    """Directory operations: serialised by the namespace lock when processes share
    the device; the log compaction they asked for runs before the lock goes."""
    @functools.wraps(fn)
    def op(self: "FileSystem", *args, **kwargs):
        shared = self.shared and not self._ns_held
        if shared:
            self.scheme.sem.wlock(H_NS_LOCK)
            self._ns_held = True
        try:
            return fn(self, *args, **kwargs)
        finally:
            try:
                if self._compact_wanted:
                    self._compact_pending()
            finally:
                if shared:
                    self._ns_held = False
                    self.scheme.sem.wunlock(H_NS_LOCK)
    return op


class FileSystem:
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
        self.ncpus = sb.ncpus
        self.cpu = cpu % self.ncpus
        self.readonly = readonly
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
        self.journals = [Journal(pm, r.journal_block) for r in regions]
        self.lock_name = lock
        self.segment_pages = segment_pages
        self.scheme = make_scheme(lock, area, self.cpu, segment_pages)
        self.read_chunk = READ_CHUNK if lock in ("inode", "rangetree") else \
            min(READ_CHUNK, (HELD_MAX - 2) * segment_pages * L.BLOCK)
        self.local_logs = lock == "pnova"        # per-core logs for file writes
        self.rings: list[Ring] = [Ring(area, c) for c in range(self.ncpus)]
        # True once several processes use the device: caches are then
        # validated against the device before every use.
        self.shared = False
        # free inode slots of each CPU's table, shared by every worker process
        self.free_inodes = [SharedBitmap(area, area.itables[c], 0, sb.inodes_per_cpu)
                            for c in range(self.ncpus)]
        self.cache: dict[int, Inode] = {}
        self._compact_wanted: set[int] = set()
        # all heads and tails of a per-core log array, read in one call
        self._lines = struct.Struct("<" + "QQ48x" * self.ncpus)
        self._ns_held = False                    # this process holds the namespace lock
        self.max_log_pages = total
        self.mount_path = ""
        self.mount_seconds = 0.0

    # ------------------------------------------------------------------ mount
    @classmethod
    def mount(cls, path: str, *, cpu: int = 0, readonly: bool = False,
              device: PMem | None = None, lock: str = "pnova",
              segment_pages: int = 16) -> "FileSystem":
        """Open an image: clean images load saved state, others are recovered.

        ``device`` is an already opened pmem device for ``path`` (the tracked
        mode of crash injection); by default the image is opened in fast mode.
        ``lock`` chooses the lock scheme for file data (inode, rangetree,
        segment, pnova) and ``segment_pages`` the segment size of the segment
        schemes.  Raises CorruptImage (one line) when the image cannot be
        used, ValueError for a bad lock option.
        """
        make_scheme(lock, None, 0, segment_pages)        # reject bad options early
        t0 = time.monotonic()
        if device is not None:
            pm = device
        else:
            try:
                pm = PMem(path, readonly=readonly)
            except DeviceError as e:
                raise CorruptImage(str(e)) from None
        try:
            sb, which = read_superblock(pm)
            if which == "replica":
                logger.warning("%s: primary superblock is damaged; using the replica", path)
            size = sb.total_blocks * L.BLOCK
            if pm.size > size:
                # A file made longer after formatting (truncate -s, a padding copy):
                # the filesystem is its first total_blocks blocks, the tail is unused.
                logger.warning("%s: the file is %d bytes longer than its filesystem; bytes "
                               "%d..%d are not used", path, pm.size - size, size, pm.size - 1)
                pm.limit(size)
            regions = read_regions(pm, sb)
            fs = cls(pm, sb, regions, cpu=cpu, readonly=readonly, lock=lock,
                     segment_pages=segment_pages)
            if sb.clean not in (0, 1):
                logger.warning("%s: the superblock's clean field holds %d (neither 0 nor 1); "
                               "the image is treated as not cleanly unmounted", path, sb.clean)
            if sb.clean == 1:
                fs._load_clean()
                fs.mount_path = "clean"
            else:
                if readonly:
                    raise CorruptImage(f"{path}: not cleanly unmounted; recovery needs a "
                                       "read-write mount")
                fs._recover()
                fs.mount_path = "recovery"
            if not readonly:
                fs.sb.clean = 0
                fs.sb.mount_count += 1
                fs.sb.last_mount_ns = time.time_ns()
                write_superblock(pm, fs.sb)
        except BaseException:
            pm.close()
            raise
        fs.mount_seconds = time.monotonic() - t0
        logger.info("mounted %s via %s path in %.3f s (%d free blocks, %d free inodes)",
                    path, fs.mount_path, fs.mount_seconds, fs.alloc.nfree, fs.nfree_inodes)
        return fs

    def _state_words(self, r: L.Region) -> np.ndarray:
        words = self.pm.buf[r.itable_start * L.BLOCK:
                            r.itable_start * L.BLOCK + self.sb.inodes_per_cpu * L.INODE_SIZE]
        return words.view("<u8").reshape(-1, L.INODE_SIZE // 8)[:, L.I_STATE // 8]

    def _build_free_inodes(self) -> list[int]:
        """Free-inode bitmaps from the state words; return the live inode numbers."""
        live: list[int] = []
        for r in self.regions:
            st = self._state_words(r).copy()      # a copy: no view outlives an error
            bad = np.flatnonzero((st != L.STATE_FREE) & (st != L.STATE_LIVE))
            if len(bad):
                ino = self.ino_of(r.cpu, int(bad[0]))
                raise CorruptImage(f"{self.pm.path}: inode {ino} has a bad state word; "
                                   "run fsck.pnova")
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
        self._build_free_inodes()
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

    def unmount(self) -> None:
        """Clean unmount: free orphans, save allocator state, mark the image clean."""
        if self.pm is None:
            return
        if not self.readonly:
            if self.shared:
                for inode in list(self.cache.values()):
                    self._validate(inode)
            self.alloc.stash_cpu = None              # every stash goes back below
            for ring in self.rings:                  # pages handed out but never used
                while (blk := ring.pop()):
                    self.alloc.free(blk, 1)
            self.alloc.drain_stashes()
            for inode in self._orphans():
                self._evict(inode)
            pm = self.pm
            for ra in self.alloc.regions:
                r = ra.region
                bits = np.packbits(ra.used(), bitorder="little")
                off = r.bitmap_start * L.BLOCK
                pm.store(off, bits.tobytes())
                pm.flush(off, len(bits))
            pm.fence()                                   # saved state durable before 'clean'
            self.sb.clean = 1
            self.sb.next_seq = self.area.w.load64(H_SEQ)
            self.sb.last_unmount_ns = time.time_ns()
            write_superblock(pm, self.sb)
            pm.sync()
        self.pm.close()
        self.pm = None  # type: ignore[assignment]
        self.scheme.close()
        for other in self._attached:             # they share this device: done too
            if other.pm is not None:
                other.scheme.close()
                other.pm = None  # type: ignore[assignment]
        if self._own_area:
            self.area.close()
        logger.info("unmounted cleanly")

    def _orphans(self) -> list[Inode]:
        """Live inodes without a name, at unmount: the cached ones and any the
        kernel held a reference to (another process may have unlinked them; the
        shared reference counts are what is left of the processes that did)."""
        view = np.frombuffer(self.area.mm, dtype="<u4",
                             count=self.ncpus * self.sb.inodes_per_cpu, offset=self.area.refs)
        held = (np.flatnonzero(view) + 1).tolist()
        del view                                 # no export of the area outlives this
        for ino in held:
            if ino not in self.cache:
                try:
                    self.get(ino)
                except FsError:
                    pass                         # freed meanwhile, or damaged: recovery's job
        return [i for i in self.cache.values() if i.nlink == 0]

    def abandon(self) -> None:
        """Let go of the device without saving anything (a serving process died in
        the middle of an operation).  The image stays marked in use, so the next
        mount recovers it by journal rollback and log replay."""
        if self.pm is None:
            return
        self.pm.close()
        self.pm = None  # type: ignore[assignment]
        self.scheme.close()
        if self._own_area:
            self.area.close()
        logger.warning("the device was released without a clean unmount; the next mount "
                       "recovers it")

    # ---------------------------------------------------------- many processes
    def prepare_workers(self) -> None:
        """Switch to shared mode; call in the primary before forking workers."""
        self.shared = True
        # The workers act as the CPUs now, each with its own stash.
        self.alloc.stash_cpu = None
        self.scheme.sem.take_over()              # registers this process as its CPU
        self.refill_rings()

    @classmethod
    def attach(cls, primary: "FileSystem", cpu: int) -> "FileSystem":
        """Another CPU on the same device in this process (tests, crash injection).

        It shares the primary's device and shared area but has its own caches,
        exactly like a worker process; both are switched to shared mode.
        Unmount the primary only: that ends the attached ones too.
        """
        if not primary.shared:
            primary.prepare_workers()
            # No worker takes the primary's CPU over here: it keeps its stash.
            primary.alloc.stash_cpu = None if primary.readonly else primary.cpu
        fs = cls(primary.pm, primary.sb, primary.regions, cpu=cpu, area=primary.area,
                 lock=primary.lock_name, segment_pages=primary.segment_pages)
        if fs.cpu == primary.cpu:
            fs.alloc.stash_cpu = None            # one owner per stash
        fs.shared = True
        fs.scheme.sem.take_over()
        primary._attached.append(fs)
        return fs

    def become_worker(self, cpu: int) -> None:
        """In a forked child: act as ``cpu`` (its allocator region, journal, rings)."""
        if not self.shared:
            raise RuntimeError("prepare_workers() must be called before forking")
        self.cpu = cpu % self.ncpus
        self.alloc.stash_cpu = None if self.readonly else self.cpu
        self.scheme.close()
        self.scheme = make_scheme(self.lock_name, self.area, self.cpu, self.segment_pages)
        self.scheme.sem.take_over()
        self._compact_wanted = set()

    # --------------------------------------------------------------- helpers
    def ino_of(self, cpu: int, idx: int) -> int:
        return 1 + idx * self.ncpus + cpu

    def inode_addr(self, ino: int) -> int:
        i = ino - 1
        return self._itables[i % self.ncpus] + (i // self.ncpus) * L.INODE_SIZE

    def _valid_ino(self, ino: int) -> bool:
        return 1 <= ino and (ino - 1) // self.ncpus < self.sb.inodes_per_cpu

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

    def _read_inode(self, ino: int) -> tuple[Inode, int]:
        """Build an Inode from its slot and logs; return it and its highest seq.

        A file's entries may sit in its global log and in per-core local logs:
        they are merged by sequence number.  A directory has one log, replayed
        in order.  With several processes the read is optimistic (see
        :meth:`_validate`): it is repeated if a compaction moved the head or
        the array meanwhile.
        """
        if not self.shared:
            return self._read_inode_once(ino)
        addr = self.inode_addr(ino)
        err: Exception | None = None
        for _ in range(_RETRIES):
            head = self.pm.read_u64(addr + L.I_LOG_HEAD)
            array = self.pm.read_u64(addr + L.I_LOG_ARRAY)
            try:
                got = self._read_inode_once(ino)
            except (plog.LogError, ValueError) as e:
                got, err = None, e
            if self.pm.read_u64(addr + L.I_LOG_HEAD) == head and \
                    self.pm.read_u64(addr + L.I_LOG_ARRAY) == array:
                if got is None:
                    raise err
                return got
        raise err or plog.LogError("the log kept changing while it was read")

    def _read_inode_once(self, ino: int) -> tuple[Inode, int]:
        addr = self.inode_addr(ino)
        pm = self.pm
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
        mm = self.pm.mm
        tail_addr = self.inode_addr(ino) + L.I_LOG_TAIL
        local = {c: [h, t, []] for c, (h, t, _) in known.items()}
        gpages: list[int] = []
        out: list[tuple] = []
        base = array * L.BLOCK
        lines = self._lines
        while True:
            moved = False
            tail = _U64.unpack_from(mm, tail_addr)[0]
            if tail != gtail:
                out += self._entries(head, tail, ino, gpages, gtail)
                gtail = tail
                moved = True
            if array:
                words = lines.unpack_from(mm, base)
                for cpu in range(self.ncpus):
                    lhead, ltail = words[2 * cpu], words[2 * cpu + 1]
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
        mm = self.pm.mm
        addr = self.inode_addr(inode.ino)
        for _ in range(_RETRIES):
            gen, state, head, _tail, array = _SLOT_WORDS.unpack_from(mm, addr + L.I_GENERATION)
            if state != L.STATE_LIVE or gen != inode.generation:
                self.cache.pop(inode.ino, None)
                return None
            if head != inode.head or array != inode.array:
                return self._reload(inode)
            if not array and _tail == inode.tail:
                return inode                     # one log, and it has not grown
            try:
                new, tail, gpages, local = self._gather(inode.ino, head, array, inode.tail,
                                                        inode.local)
                torn = False
            except (plog.LogError, ValueError):
                torn = True
            _g, _s, head2, _t, array2 = _SLOT_WORDS.unpack_from(mm, addr + L.I_GENERATION)
            if head2 != head or array2 != array:
                continue                    # compacted meanwhile: look again
            if torn:
                return self._reload(inode)
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
                for e in new:
                    inode.apply(e)
            return inode
        return self._reload(inode)

    def _reload(self, old: Inode) -> Inode:
        try:
            inode, _ = self._read_inode(old.ino)
        except (plog.LogError, ValueError) as e:
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
        if not self._valid_ino(ino) or self.pm.read_u64(self.inode_addr(ino) + L.I_STATE) != L.STATE_LIVE:
            raise FsError(errno.ENOENT)
        try:
            inode, _ = self._read_inode(ino)
        except (plog.LogError, ValueError) as e:
            logger.error("inode %d is damaged: %s (run fsck.pnova)", ino, e)
            raise FsError(errno.EIO) from None
        self.cache[ino] = inode
        return inode

    def _dir(self, ino: int) -> Inode:
        d = self.get(ino)
        if not d.is_dir:
            raise FsError(errno.ENOTDIR)
        return d

    def _rw(self) -> None:
        if self.readonly:
            raise FsError(errno.EROFS)

    @staticmethod
    def _check_name(name: bytes) -> None:
        if len(name) > L.NAME_MAX:
            raise FsError(errno.ENAMETOOLONG)
        if not name or b"/" in name or b"\0" in name or name in (b".", b".."):
            raise FsError(errno.EINVAL)

    def _new_log_page(self) -> int:
        return self.alloc.alloc_one(self.cpu, meta=True)

    def attr(self, inode: Inode) -> Attr:
        if inode.pages is not None:
            blocks = len(inode.pages) * (L.BLOCK // 512)
            size = inode.size
        else:
            blocks = len(inode.log_pages) * (L.BLOCK // 512)
            size = L.BLOCK
        return Attr(inode.ino, inode.mode, inode.nlink, inode.uid, inode.gid, inode.rdev,
                    size, blocks, inode.atime, inode.mtime, inode.ctime, inode.generation)

    # ------------------------------------------------------------ transactions
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
        locked = sorted({inode.ino for inode, _ in changes})
        for ino in locked:
            sch.log_lock(ino)
        appended: list[tuple[Inode, int, list[int], list[tuple]]] = []
        try:
            try:
                for inode, entries in changes:
                    if self.shared:
                        inode = self._current_under_log_lock(inode)
                    entries = [(e[0], self._next_seq()) + e[2:] for e in entries]
                    raws = [L.encode_entry(e) for e in entries]
                    new_tail, pages = plog.append(pm, inode.tail, raws, inode.ino,
                                                  self._new_log_page)
                    appended.append((inode, new_tail, pages, entries))
            except FsError as exc:
                for p in getattr(exc, "pages", []):
                    self.alloc.free(p, 1)
                for _, _, pages, _ in appended:
                    for p in pages:
                        self.alloc.free(p, 1)
                for p in extra_pages:
                    self.alloc.free(p, 1)
                raise
            # several words change at once: the lite journal makes them atomic
            updates = [(self.inode_addr(i.ino) + L.I_LOG_TAIL, t) for i, t, _, _ in appended]
            self.journals[self.cpu].run(updates + list(extra))
            freed: list[int] = []
            for inode, new_tail, pages, entries in appended:
                freed.extend(self._committed(inode, new_tail, pages, entries))
        finally:
            for ino in reversed(locked):
                sch.log_unlock(ino)
        return freed

    def _current_under_log_lock(self, inode: Inode) -> Inode:
        """Catch up with appends by other processes before appending (a reload gives
        a new object: the entries go to that one).  Under the log lock the global
        log cannot move, so unchanged slot words mean the cache is current for it."""
        words = _SLOT_WORDS.unpack_from(self.pm.mm, self.inode_addr(inode.ino) + L.I_GENERATION)
        if words != (inode.generation, L.STATE_LIVE, inode.head, inode.tail, inode.array):
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
        pm = self.pm
        sch = self.scheme
        ino = inode.ino
        addr = self.inode_addr(ino)
        sch.log_lock(ino)
        try:
            if self.shared:
                inode = self._current_under_log_lock(inode)
            seq = self._next_seq
            entries = [(e[0], seq()) + e[2:] for e in entries]
            new_tail, pages = self._append(inode.tail, [L.encode_entry(e) for e in entries],
                                           ino, self._new_log_page)
            pm.commit_u64(addr + L.I_LOG_TAIL, new_tail)
            return self._committed(inode, new_tail, pages, entries)
        finally:
            sch.log_unlock(ino)

    def _append(self, tail: int, raws: list[bytes], ino: int, new_page) -> tuple[int, list[int]]:
        """:func:`plog.append`, with one entry that fits in the tail's page written
        directly; pages it allocated are freed again if it fails."""
        if len(raws) == 1:
            raw = raws[0]
            if tail % L.BLOCK + len(raw) <= L.LOG_DATA:
                pm = self.pm
                pm.store(tail, raw)
                pm.flush(tail, len(raw))
                return tail + len(raw), []
        try:
            return plog.append(self.pm, tail, raws, ino, new_page)
        except FsError as exc:
            for p in getattr(exc, "pages", []):
                self.alloc.free(p, 1)
            raise

    def _commit_local(self, inode: Inode, entries: list[tuple]) -> list[int]:
        """Append file-write entries to this CPU's local log and commit them.

        Only this CPU ever appends to its local log, so no lock is taken: the
        commit is the one 8-byte store of the local tail, as for a global log.
        """
        pm = self.pm
        cpu = self.cpu
        if not inode.array:
            inode = self._ensure_array(inode)
        entries = [(e[0], self._next_seq()) + e[2:] for e in entries]
        raws = [L.encode_entry(e) for e in entries]
        line = inode.array * L.BLOCK + cpu * L.LA_LINE
        have = inode.local.get(cpu)
        if have is None:
            page = self._local_page()
            try:
                plog.init_page(pm, page, inode.ino)
                tail, more = plog.append(pm, page * L.BLOCK, raws, inode.ino, self._local_page)
            except FsError as exc:
                for p in [page] + getattr(exc, "pages", []):
                    self.alloc.free(p, 1)
                raise
            pm.fence()                                 # entries durable before the log exists
            pm.store_u64(line + L.LA_HEAD, page * L.BLOCK)
            pm.flush(line + L.LA_HEAD, 8)
            pm.fence()                                 # head before tail: tail 0 = no log yet
            pm.store_u64(line + L.LA_TAIL, tail)
            pm.flush(line + L.LA_TAIL, 8)
            pm.fence()                                 # committed
            have = inode.local[cpu] = [page * L.BLOCK, tail, [page] + more]
        else:
            tail, more = self._append(have[1], raws, inode.ino, self._local_page)
            pm.commit_u64(line + L.LA_TAIL, tail)
            have[1] = tail
            if more:
                have[2].extend(more)
                self._want_compaction(inode)
        freed: list[int] = []
        for e in entries:
            freed.extend(inode.apply(e))
        return freed

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
            pm.store_zero(blk * L.BLOCK, L.BLOCK)
            pm.flush(blk * L.BLOCK, L.BLOCK)
            pm.fence()                                 # zeroed lines before the pointer
            addr = self.inode_addr(inode.ino) + L.I_LOG_ARRAY
            pm.store_u64(addr, blk)
            pm.flush(addr, 8)
            pm.fence()
            inode.array = blk
            return inode
        finally:
            sch.log_unlock(inode.ino)

    def _local_page(self) -> int:
        """A log page for this CPU's local logs: from its ring, else allocated now."""
        v = self.rings[self.cpu].pop() if self.shared else None
        return v if v else self.alloc.alloc_one(self.cpu, meta=True)

    def refill_rings(self, low: int = 32) -> int:
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

    def _free_blocks(self, blocks: list[int]) -> None:
        if not blocks:
            return
        blocks.sort()
        if blocks[-1] - blocks[0] == len(blocks) - 1:     # one extent (no block twice)
            self.alloc.free(blocks[0], len(blocks))
            return
        start = prev = blocks[0]
        for b in blocks[1:]:
            if b != prev + 1:
                self.alloc.free(start, prev - start + 1)
                start = b
            prev = b
        self.alloc.free(start, prev - start + 1)

    # --------------------------------------------------------- log compaction
    def _log_pages(self, inode: Inode) -> int:
        return len(inode.log_pages) + sum(len(v[2]) for v in inode.local.values())

    def _want_compaction(self, inode: Inode) -> None:
        """Note an inode whose logs have grown well past its live state."""
        n = self._log_pages(inode)
        if n >= 4 and n > 2 * (inode.live_log_estimate() // L.LOG_DATA + 1) + 1:
            self._compact_wanted.add(inode.ino)

    def _compact_pending(self) -> None:
        """Compact what the last operation asked for (no locks are held here)."""
        while self._compact_wanted:
            ino = self._compact_wanted.pop()
            try:
                self.compact(ino)
            except FsError:
                pass                    # no room for a new chain: keep the long one

    def compact(self, ino: int) -> None:
        """Thorough log GC: rewrite the live state as one new chain.

        The new chain replaces the global log and every per-core local log in
        one journal transaction (head, tail and the log-array word); the old
        pages are freed after it.  A file is compacted under its size lock and
        a write lock over its whole range, so no writer is in the middle of an
        append; a directory under its log lock (and, with several processes,
        the namespace lock its callers hold).
        """
        sch = self.scheme
        inode = self.get(ino)
        if inode.is_dir and self.shared and not self._ns_held:
            # a directory changes only under the namespace lock
            return _namespace(FileSystem.compact)(self, ino)
        tok = None
        if not inode.is_dir:
            sch.size_lock(ino)
        try:
            if not inode.is_dir:
                inode = self.get(ino)
                last = max(inode.size // L.BLOCK, max(inode.pages, default=0))
                tok = sch.lock(ino, 0, last, True)
            sch.log_lock(ino)
            try:
                inode = self.get(ino)
                self._compact_locked(inode)
            finally:
                sch.log_unlock(ino)
        finally:
            if tok is not None:
                sch.unlock(tok)
            if not inode.is_dir:
                sch.size_unlock(ino)

    def _compact_locked(self, inode: Inode) -> None:
        ino = inode.ino
        entries: list[tuple] = []
        if inode.is_dir:
            entries.append((L.E_DENTRY, self._next_seq(), L.D_ADD, L.DOTDOT, inode.parent,
                            stat.S_IFDIR >> 12, inode.ctime))
            for cookie, name in inode.order.items():
                child, dtype, _ = inode.dents[name]
                entries.append((L.E_DENTRY, cookie, L.D_ADD, name, child, dtype, inode.mtime))
        else:
            run = None
            for pg in sorted(inode.pages):
                b = inode.pages[pg]
                if run and run[0] + run[1] == pg and run[2] + run[1] == b:
                    run[1] += 1
                else:
                    if run:
                        entries.append((L.E_WRITE, self._next_seq(), run[0], run[1], run[2],
                                        inode.size, inode.mtime))
                    run = [pg, 1, b]
            if run:
                entries.append((L.E_WRITE, self._next_seq(), run[0], run[1], run[2],
                                inode.size, inode.mtime))
        for name, value in inode.xattrs.items():
            entries.append((L.E_XATTR, self._next_seq(), L.X_SET, name, value, inode.ctime))
        entries.append((L.E_SETATTR, self._next_seq(),
                        L.SA_MODE | L.SA_UID | L.SA_GID | L.SA_SIZE | L.SA_ATIME | L.SA_MTIME | L.SA_CTIME,
                        inode.mode & 0o7777, inode.uid, inode.gid, inode.size, inode.atime,
                        inode.mtime, inode.ctime))
        entries.append((L.E_LINK, self._next_seq(), inode.nlink, inode.ctime))
        pm = self.pm
        first = self._new_log_page()
        plog.init_page(pm, first, ino)
        try:
            tail, pages = plog.append(pm, first * L.BLOCK, [L.encode_entry(e) for e in entries],
                                      ino, self._new_log_page)
        except FsError as exc:
            for p in [first] + getattr(exc, "pages", []):
                self.alloc.free(p, 1)
            raise
        addr = self.inode_addr(ino)
        updates = [(addr + L.I_LOG_HEAD, first * L.BLOCK), (addr + L.I_LOG_TAIL, tail)]
        if inode.array:
            updates.append((addr + L.I_LOG_ARRAY, 0))
        self.journals[self.cpu].run(updates)
        old = list(inode.log_pages)
        for _, _, lpages in inode.local.values():
            old.extend(lpages)
        if inode.array:
            old.append(inode.array)
        inode.head, inode.tail, inode.log_pages = first * L.BLOCK, tail, [first] + pages
        inode.array = 0
        inode.local = {}
        self._free_blocks(old)

    # ---------------------------------------------------------- inode life
    def _alloc_ino(self) -> int:
        """A free inode slot: this CPU's table first, then the others."""
        order = [self.cpu] + [c for c in range(self.ncpus) if c != self.cpu]
        for c in order:
            got = self.free_inodes[c].alloc(1)
            if got:
                return self.ino_of(c, got[0][0])
        raise FsError(errno.ENOSPC)

    def _release_ino(self, ino: int) -> None:
        self.free_inodes[(ino - 1) % self.ncpus].free((ino - 1) // self.ncpus, 1)

    def _evict(self, inode: Inode) -> None:
        """Free an inode with no links and no users: state word first, then blocks."""
        addr = self.inode_addr(inode.ino)
        self.pm.store_u64(addr + L.I_STATE, L.STATE_FREE)
        self.pm.persist(addr + L.I_STATE, 8)             # after this the inode is gone
        self._free_blocks(self._blocks_of(inode))
        self.cache.pop(inode.ino, None)
        self._release_ino(inode.ino)

    def _refs(self, ino: int) -> int:
        return self.area.w.load32(self.area.refs + 4 * (ino - 1))

    def _maybe_evict(self, inode: Inode) -> None:
        """Free an inode once it has no name and no reference in any process."""
        # _commit may have replaced the cache object (a reload): use the current one
        inode = self.cache.get(inode.ino, inode)
        if inode.nlink == 0 and self._refs(inode.ino) == 0:
            self._evict(inode)

    def _make_inode(self, mode: int, uid: int, gid: int, rdev: int,
                    entries: list[tuple], data: bytes | None = None) -> tuple[Inode, int, list[int]]:
        """Write a new inode slot (state still FREE) with its first log page.

        Returns (inode object, slot address, blocks allocated).  The caller
        flips the state word to LIVE inside its journal transaction.
        """
        pm = self.pm
        ino = self._alloc_ino()
        allocated: list[int] = []
        try:
            page = self.alloc.alloc_one(self.cpu, meta=False)
            allocated.append(page)
            plog.init_page(pm, page, ino)
            if data is not None:            # symlink target: one data block
                blk = self.alloc.alloc_one(self.cpu, meta=False)
                allocated.append(blk)
                pm.store(blk * L.BLOCK, data)
                pm.store_zero(blk * L.BLOCK + len(data), L.BLOCK - len(data))
                pm.flush(blk * L.BLOCK, L.BLOCK)
                entries = entries + [(L.E_WRITE, self._next_seq(), 0, 1, blk, len(data),
                                      entries[0][-1] if entries else time.time_ns())]
            now = time.time_ns()
            seq = self._next_seq()
            st = L.InodeStatic(mode, uid, gid, 0, rdev, seq, now, seq)
            tail, more = page * L.BLOCK, []
            if entries:
                tail, more = plog.append(pm, tail, [L.encode_entry(e) for e in entries],
                                         ino, self._new_log_page)
                allocated.extend(more)
        except FsError as exc:
            for b in allocated + getattr(exc, "pages", []):
                self.alloc.free(b, 1)
            self._release_ino(ino)
            raise
        addr = self.inode_addr(ino)
        # line 0, then line 1: state FREE (0), head, tail, no log array
        pm.store(addr, st.pack() + _LINE1.pack(L.STATE_FREE, page * L.BLOCK, tail, 0))
        pm.flush(addr, L.INODE_SIZE)
        inode = Inode(ino, st, page * L.BLOCK, tail)
        inode.log_pages = [page] + more
        for e in entries:
            inode.apply(e)
        return inode, addr, allocated

    @_namespace
    def _create(self, parent: int, name: bytes, mode: int, uid: int, gid: int, rdev: int = 0,
                target: bytes | None = None) -> Attr:
        self._rw()
        self._check_name(name)
        d = self._dir(parent)
        if d.nlink == 0:
            raise FsError(errno.ENOENT)
        if name in d.dents:
            raise FsError(errno.EEXIST)
        if d.mode & stat.S_ISGID:
            # BSD group semantics of a setgid directory: entries take its group,
            # subdirectories inherit the bit.
            gid = d.gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        now = time.time_ns()
        is_dir = stat.S_ISDIR(mode)
        own = [(L.E_DENTRY, self._next_seq(), L.D_ADD, L.DOTDOT, parent, stat.S_IFDIR >> 12, now)] \
            if is_dir else []
        inode, addr, allocated = self._make_inode(mode, uid, gid, rdev, own, target)
        pentries = [(L.E_DENTRY, self._next_seq(), L.D_ADD, name, inode.ino,
                     stat.S_IFMT(mode) >> 12, now)]
        if is_dir:
            pentries.append((L.E_LINK, self._next_seq(), d.nlink + 1, now))
        try:
            self._commit([(d, pentries)], extra=[(addr + L.I_STATE, L.STATE_LIVE)],
                         extra_pages=allocated)
        except FsError:
            self._release_ino(inode.ino)
            raise
        self.cache[inode.ino] = inode
        return self.attr(inode)

    # ------------------------------------------------------------- namespace
    def lookup(self, parent: int, name: bytes) -> Attr:
        d = self._dir(parent)
        if name == b".":
            return self.attr(d)
        if name == b"..":
            return self.attr(self.get(d.parent or parent))
        if len(name) > L.NAME_MAX:
            raise FsError(errno.ENAMETOOLONG)
        ent = d.dents.get(name)
        if ent is None:
            raise FsError(errno.ENOENT)
        return self.attr(self.get(ent[0]))

    def getattr(self, ino: int) -> Attr:
        return self.attr(self.get(ino))

    def create(self, parent: int, name: bytes, mode: int, uid: int = 0, gid: int = 0) -> Attr:
        """Create a regular file (mode without type bits means a regular file)."""
        return self._create(parent, name, stat.S_IFREG | (mode & 0o7777), uid, gid)

    def mknod(self, parent: int, name: bytes, mode: int, rdev: int = 0, uid: int = 0,
              gid: int = 0) -> Attr:
        fmt = stat.S_IFMT(mode) or stat.S_IFREG
        if fmt not in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK):
            raise FsError(errno.EINVAL)
        return self._create(parent, name, fmt | (mode & 0o7777), uid, gid, rdev)

    def mkdir(self, parent: int, name: bytes, mode: int, uid: int = 0, gid: int = 0) -> Attr:
        return self._create(parent, name, stat.S_IFDIR | (mode & 0o7777), uid, gid)

    def symlink(self, parent: int, name: bytes, target: bytes, uid: int = 0,
                gid: int = 0) -> Attr:
        if not target or b"\0" in target:
            raise FsError(errno.EINVAL)
        if len(target) >= L.BLOCK:
            raise FsError(errno.ENAMETOOLONG)
        return self._create(parent, name, stat.S_IFLNK | 0o777, uid, gid, target=target)

    def readlink(self, ino: int) -> bytes:
        inode = self.get(ino)
        if not stat.S_ISLNK(inode.mode):
            raise FsError(errno.EINVAL)
        return self._read(inode, 0, inode.size)

    @_namespace
    def link(self, ino: int, new_parent: int, new_name: bytes) -> Attr:
        self._rw()
        self._check_name(new_name)
        target = self.get(ino)
        if target.is_dir:
            raise FsError(errno.EPERM)
        d = self._dir(new_parent)
        if d.nlink == 0 or target.nlink == 0:
            raise FsError(errno.ENOENT)
        if new_name in d.dents:
            raise FsError(errno.EEXIST)
        now = time.time_ns()
        self._commit([
            (d, [(L.E_DENTRY, self._next_seq(), L.D_ADD, new_name, ino,
                  stat.S_IFMT(target.mode) >> 12, now)]),
            (target, [(L.E_LINK, self._next_seq(), target.nlink + 1, now)]),
        ])
        return self.attr(self.cache.get(ino, target))

    @_namespace
    def unlink(self, parent: int, name: bytes) -> None:
        self._rw()
        d = self._dir(parent)
        ent = d.dents.get(name) if len(name) <= L.NAME_MAX else None
        if ent is None:
            raise FsError(errno.ENAMETOOLONG if len(name) > L.NAME_MAX else errno.ENOENT)
        victim = self.get(ent[0])
        if victim.is_dir:
            raise FsError(errno.EISDIR)
        now = time.time_ns()
        self._commit([
            (d, [(L.E_DENTRY, self._next_seq(), L.D_REMOVE, name, 0, 0, now)]),
            (victim, [(L.E_LINK, self._next_seq(), victim.nlink - 1, now)]),
        ])
        self._maybe_evict(victim)

    @_namespace
    def rmdir(self, parent: int, name: bytes) -> None:
        self._rw()
        if name == b".":
            raise FsError(errno.EINVAL)
        if name == b"..":
            raise FsError(errno.ENOTEMPTY)
        d = self._dir(parent)
        ent = d.dents.get(name)
        if ent is None:
            raise FsError(errno.ENOENT)
        victim = self.get(ent[0])
        if not victim.is_dir:
            raise FsError(errno.ENOTDIR)
        if victim.dents:
            raise FsError(errno.ENOTEMPTY)
        now = time.time_ns()
        self._commit([
            (d, [(L.E_DENTRY, self._next_seq(), L.D_REMOVE, name, 0, 0, now),
                 (L.E_LINK, self._next_seq(), d.nlink - 1, now)]),
            (victim, [(L.E_LINK, self._next_seq(), 0, now)]),
        ])
        self._maybe_evict(victim)

    def _is_ancestor(self, anc: int, ino: int) -> bool:
        """True if directory ``anc`` is ``ino`` or one of its ancestors."""
        seen = 0
        while True:
            if ino == anc:
                return True
            if ino == L.ROOT_INO or seen > self.sb.inodes_per_cpu * self.ncpus:
                return False
            ino = self.get(ino).parent
            seen += 1

    @_namespace
    def rename(self, p1: int, n1: bytes, p2: int, n2: bytes, flags: int = 0) -> None:
        """rename(2) / renameat2 with RENAME_NOREPLACE (1) or RENAME_EXCHANGE (2)."""
        self._rw()
        noreplace, exchange = flags & 1, flags & 2
        if flags & ~3 or (noreplace and exchange):
            raise FsError(errno.EINVAL)
        for n in (n1, n2):
            self._check_name(n)
        d1, d2 = self._dir(p1), self._dir(p2)
        e1 = d1.dents.get(n1)
        if e1 is None:
            raise FsError(errno.ENOENT)
        e2 = d2.dents.get(n2)
        if d2.nlink == 0:
            raise FsError(errno.ENOENT)
        src = self.get(e1[0])
        dst = self.get(e2[0]) if e2 else None
        if exchange and dst is None:
            raise FsError(errno.ENOENT)
        if noreplace and dst is not None:
            raise FsError(errno.EEXIST)
        if dst is not None and dst.ino == src.ino:
            if p1 == p2 and n1 == n2 or not exchange:
                return                                  # same file: rename does nothing
        if src.is_dir and p1 != p2 and self._is_ancestor(src.ino, p2):
            raise FsError(errno.EINVAL)
        if exchange and dst.is_dir and p1 != p2 and self._is_ancestor(dst.ino, p1):
            raise FsError(errno.EINVAL)
        if dst is not None and not exchange:
            if src.is_dir and not dst.is_dir:
                raise FsError(errno.ENOTDIR)
            if not src.is_dir and dst.is_dir:
                raise FsError(errno.EISDIR)
            if dst.is_dir and dst.dents:
                raise FsError(errno.ENOTEMPTY)
        now = time.time_ns()
        ent: dict[int, list[tuple]] = {}
        objs: dict[int, Inode] = {}

        def add(inode: Inode, e: tuple) -> None:
            objs[inode.ino] = inode
            ent.setdefault(inode.ino, []).append(e)

        nlink_delta: dict[int, int] = {}
        dt = lambda i: stat.S_IFMT(i.mode) >> 12  # noqa: E731
        if exchange:
            add(d1, (L.E_DENTRY, self._next_seq(), L.D_ADD, n1, dst.ino, dt(dst), now))
            add(d2, (L.E_DENTRY, self._next_seq(), L.D_ADD, n2, src.ino, dt(src), now))
            if p1 != p2:
                for moved, to in ((src, p2), (dst, p1)):
                    if moved.is_dir:
                        add(moved, (L.E_DENTRY, self._next_seq(), L.D_ADD, L.DOTDOT, to,
                                    stat.S_IFDIR >> 12, now))
                        nlink_delta[to] = nlink_delta.get(to, 0) + 1
                        frm = p1 if to == p2 else p2
                        nlink_delta[frm] = nlink_delta.get(frm, 0) - 1
            for i in (src, dst):
                if not (i.is_dir and p1 != p2):
                    add(i, self._ctime_entry(i, now))
        else:
            add(d1, (L.E_DENTRY, self._next_seq(), L.D_REMOVE, n1, 0, 0, now))
            add(d2, (L.E_DENTRY, self._next_seq(), L.D_ADD, n2, src.ino, dt(src), now))
            if src.is_dir and p1 != p2:
                add(src, (L.E_DENTRY, self._next_seq(), L.D_ADD, L.DOTDOT, p2,
                          stat.S_IFDIR >> 12, now))
                nlink_delta[p1] = nlink_delta.get(p1, 0) - 1
                nlink_delta[p2] = nlink_delta.get(p2, 0) + 1
            else:
                add(src, self._ctime_entry(src, now))
            if dst is not None:
                add(dst, (L.E_LINK, self._next_seq(), 0 if dst.is_dir else dst.nlink - 1, now))
                if dst.is_dir:
                    nlink_delta[p2] = nlink_delta.get(p2, 0) - 1
        for pino, delta in nlink_delta.items():
            if delta:
                pd = d1 if pino == p1 else d2
                add(pd, (L.E_LINK, self._next_seq(), pd.nlink + delta, now))
        self._commit([(objs[i], es) for i, es in ent.items()])
        if dst is not None and not exchange:
            self._maybe_evict(dst)

    def _ctime_entry(self, inode: Inode, now: int) -> tuple:
        return (L.E_SETATTR, self._next_seq(), L.SA_CTIME, 0, 0, 0, 0, 0, 0, now)

    def readdir(self, ino: int, off: int = 0,
                limit: int | None = None) -> list[tuple[bytes, int, int]]:
        """Entries after cookie ``off``: (name, ino, next cookie), '.' and '..' first;
        at most ``limit`` of them (a reply buffer's worth) when given."""
        d = self._dir(ino)
        out: list[tuple[bytes, int, int]] = []
        if off < 1:
            out.append((b".", ino, 1))
        if off < 2:
            out.append((b"..", d.parent or ino, 2))
        for cookie in d.order.irange(minimum=max(0, off - 2)):
            if limit is not None and len(out) >= limit:
                break
            if cookie + 3 <= off:
                continue
            name = d.order[cookie]
            out.append((name, d.dents[name][0], cookie + 3))
        return out

    # ------------------------------------------------------------- reference counts
    def ref(self, ino: int, n: int = 1) -> None:
        """The kernel (or another user) now holds ``n`` more references.

        The count lives in the shared area, so an inode unlinked by one
        process stays alive while another still holds references.
        """
        self.get(ino)
        self.area.w.add32(self.area.refs + 4 * (ino - 1), n)

    def forget(self, ino: int, n: int = 1) -> None:
        """Drop ``n`` references; the last one frees an inode that has no name."""
        if not self._valid_ino(ino):
            return
        off = self.area.refs + 4 * (ino - 1)
        old = self.area.w.add32(off, -n)
        if old < n:                              # more forgets than refs: clamp at 0
            self.area.w.add32(off, n - old)
            old = n
        if old == n and not self.readonly:
            self._forget_last(ino)

    @_namespace
    def _forget_last(self, ino: int) -> None:
        # Under the namespace lock no unlink or rename can change the link
        # count between the check and the eviction.
        try:
            inode = self.get(ino)
        except FsError:
            return                               # already gone
        self._maybe_evict(inode)

    # ------------------------------------------------------------------ data
    def _read(self, inode: Inode, off: int, size: int) -> bytes:
        end = min(inode.size, off + size)
        if off >= end:
            return b""
        pages = inode.pages
        mm = self.pm.mm
        first, last = off // L.BLOCK, (end - 1) // L.BLOCK
        if first == last:
            b = pages.get(first)
            if b is None:
                return bytes(end - off)
            base = b * L.BLOCK - first * L.BLOCK
            return mm[base + off:base + end]
        out = bytearray(end - off)                # holes stay zero
        for pg in range(first, last + 1):
            b = pages.get(pg)
            if b is not None:
                lo = max(off, pg * L.BLOCK)
                hi = min(end, (pg + 1) * L.BLOCK)
                src = b * L.BLOCK + lo - pg * L.BLOCK
                out[lo - off:hi - off] = mm[src:src + hi - lo]
        return bytes(out)

    def read(self, ino: int, off: int, size: int) -> bytes:
        """Read under a read lock of the range (in chunks of at most READ_CHUNK bytes)."""
        inode = self.get(ino)
        if inode.is_dir:
            raise FsError(errno.EISDIR)
        if off < 0:
            raise FsError(errno.EINVAL)
        end = min(off + size, inode.size)
        if off >= end:
            return b""
        sch = self.scheme
        parts = []
        while off < end:
            n = min(end - off, self.read_chunk)
            tok = sch.lock(ino, off // L.BLOCK, (off + n - 1) // L.BLOCK, False)
            try:
                if self.shared:
                    inode = self.get(ino)
                parts.append(self._read(inode, off, n))
            finally:
                sch.unlock(tok)
            off += n
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def write(self, ino: int, off: int, data: bytes | memoryview,
              kill_suidgid: bool = False, in_group: Callable[[int], bool] | None = None) -> int:
        """Copy-on-write: new blocks, one log entry per extent, one atomic commit.

        The written range is locked with the mount's lock scheme; a write that
        extends the file also takes the size lock (first, so that every path
        takes size lock, range locks, log lock in that order).  With per-core
        logs, a CPU other than the file's home CPU appends to its local log.
        A write drops the file's capabilities, and its set-user-ID and
        set-group-ID bits when ``kill_suidgid`` says so (the writer lacks
        CAP_FSETID), in the same commit (:meth:`_privilege_drop`; ``in_group``
        tells whether the writer is in a group).
        """
        self._rw()
        n = len(data)
        if off < 0:
            raise FsError(errno.EINVAL)
        if n == 0:
            return 0
        if off + n > L.MAX_FILE_SIZE:
            raise FsError(errno.EFBIG)
        # Before the locks the cached size is a hint (is this write extending?);
        # the inode is validated once, under the locks.
        inode = self.cache.get(ino) or self.get(ino)
        if inode.pages is None:
            raise FsError(errno.EISDIR)
        sch = self.scheme
        first, last = off // L.BLOCK, (off + n - 1) // L.BLOCK
        sized = off + n > inode.size
        if sized:
            sch.size_lock(ino)
        tok = sch.lock(ino, first, last, True)
        slots: list[int] = []
        try:
            if self.shared:
                inode, slots = self._current_for_write(ino, first, last)
                if not sized and off + n > inode.size:
                    # It became an extending write meanwhile: take the size lock in order.
                    sch.unlock(tok)
                    sch.size_lock(ino)
                    sized = True
                    tok = sch.lock(ino, first, last, True)
                    inode, slots = self._current_for_write(ino, first, last)
            try:
                freed = self._write_locked(inode, off, data, first, last, kill_suidgid,
                                           in_group)
            finally:
                if slots:
                    self._bump_versions(ino, inode, slots)
        finally:
            sch.unlock(tok)
            if sized:
                sch.size_unlock(ino)
        if len(freed) == 1:
            self.alloc.free(freed[0], 1)
        elif freed:
            self._free_blocks(freed)
        if self._compact_wanted:
            self._compact_pending()
        return n

    def _current_for_write(self, ino: int, first: int, last: int) -> tuple[Inode, list[int]]:
        """The cached inode, exact for pages first..last, and their version words.

        Called with pages first..last write-locked.  Every change of a page's
        mapping adds one to its group's version (in the shared area) before
        the writer unlocks, and every size change adds one to the inode's size
        epoch.  If the versions and the epoch still have the values this
        process recorded when its cache last covered them, and the slot's
        generation, head and array are unchanged, no other process has
        changed these pages or the size since: the cache is exact for this
        write, and catching up with the other processes' entries (writes to
        other pages, attribute changes) can wait for an operation that needs
        them (:meth:`get` always catches up).  Otherwise the values are read
        first and the cache caught up after, so that what is recorded never
        counts a change the cache lacks.  Returns the inode and the version
        words (the size epoch's last).
        """
        area = self.area
        q = area.u64
        slots = area.version_slots(ino, first, last)
        vals = [q[a >> 3] for a in slots]
        inode = self.cache.get(ino)
        if inode is not None:
            gen, state, head, _tail, array = _SLOT_WORDS.unpack_from(
                self.pm.mm, self.inode_addr(ino) + L.I_GENERATION)
            if (gen == inode.generation and state == L.STATE_LIVE and head == inode.head
                    and array == inode.array):
                vers = inode.vers
                for a, v in zip(slots, vals):
                    if vers.get(a) != v:
                        break
                else:
                    return inode, slots
        inode = self.get(ino)
        inode.vers.update(zip(slots, vals))
        return inode, slots

    def _bump_versions(self, ino: int, inode: Inode, slots: list[int]) -> None:
        """Count this write in its groups' versions (the last slot is the epoch: not
        bumped).  The cache may record a new value only if nobody else bumped
        the word since it was checked (a group shared with another writer's
        pages, or a hash collision)."""
        add = self.area.w.add64
        vers = inode.vers if self.cache.get(ino) is inode else None
        for a in slots[:-1]:
            old = add(a, 1)
            if vers is not None:
                if vers.get(a) == old:
                    vers[a] = old + 1
                else:
                    vers.pop(a, None)

    def _write_locked(self, inode: Inode, off: int, data, first: int, last: int,
                      kill_suidgid: bool = False,
                      in_group: Callable[[int], bool] | None = None) -> list[int]:
        pm = self.pm
        n = len(data)
        extents = self.alloc.alloc(self.cpu, last - first + 1)
        pages = inode.pages
        now = time.time_ns()
        entries = []
        pg = first
        src = memoryview(data)
        for start, count in extents:
            dst = start * L.BLOCK
            lo = pg * L.BLOCK                     # file offset of this extent's first page
            hi = lo + count * L.BLOCK
            a, b = max(off, lo), min(off + n, hi)
            if a > lo:                            # head of the first page: old bytes or zeros
                old = pages.get(pg)
                if old is not None:
                    pm.store_copy(dst, old * L.BLOCK, a - lo)
                else:
                    pm.store_zero(dst, a - lo)
            pm.store(dst + a - lo, src[a - off:b - off])
            if b < hi:                            # tail of the last page
                lp = (hi // L.BLOCK) - 1
                old = pages.get(lp)
                if old is not None:
                    pm.store_copy(dst + b - lo, old * L.BLOCK + b - lp * L.BLOCK, hi - b)
                else:
                    pm.store_zero(dst + b - lo, hi - b)
            pm.flush(dst, count * L.BLOCK)
            # the size field is the end this write reaches; replay takes the maximum
            entries.append((L.E_WRITE, 0, pg, count, start, off + n, now))
            pg += count
        drop = self._privilege_drop(inode, kill_suidgid, now, in_group) \
            if (kill_suidgid and inode.mode & _SUIDGID) or CAPS_XATTR in inode.xattrs else None
        try:
            if drop:
                # a local log holds file writes only: the drop and the data go
                # to the global log together
                return self._commit([(inode, drop + entries)])
            if self.local_logs and self.cpu != (inode.ino - 1) % self.ncpus:
                return self._commit_local(inode, entries)
            return self._commit([(inode, entries)])
        except FsError:
            for s, c in extents:
                self.alloc.free(s, c)
            raise

    def setattr(self, ino: int, *, mode: int | None = None, uid: int | None = None,
                gid: int | None = None, size: int | None = None, atime_ns: int | None = None,
                mtime_ns: int | None = None, ctime_ns: int | None = None,
                kill_suidgid: bool = False,
                in_group: Callable[[int], bool] | None = None) -> Attr:
        """chmod / chown / truncate / utimens; ctime always moves.

        A size change holds the size lock and a write lock over the pages
        between the old and the new end.  A truncate, and a chown of anything
        but a directory, drop the file's capabilities; ``kill_suidgid`` (a
        chown, or a truncate by a caller without CAP_FSETID) drops its
        set-user-ID bit and its set-group-ID bit as :meth:`_privilege_drop` says.
        """
        self._rw()
        args = (mode, uid, gid, size, atime_ns, mtime_ns, ctime_ns, kill_suidgid, in_group)
        inode = self.get(ino)
        if size is None:
            try:
                return self._setattr_locked(inode, *args)
            finally:
                self._bump_epoch(ino)            # a mode change matters to writers too
        if inode.is_dir:
            raise FsError(errno.EISDIR)
        if not 0 <= size <= L.MAX_FILE_SIZE:
            raise FsError(errno.EINVAL if size < 0 else errno.EFBIG)
        sch = self.scheme
        sch.size_lock(ino)
        try:
            inode = self.get(ino)
            lo, hi = sorted((size, inode.size))
            tok = sch.lock(ino, lo // L.BLOCK, hi // L.BLOCK, True)
            try:
                a = self._setattr_locked(self.get(ino), *args)
            finally:
                # Under the size lock: writers that skip catching up
                # (_current_for_write) see the size change coming.
                self._bump_epoch(ino)
                sch.unlock(tok)
        finally:
            sch.size_unlock(ino)
        if self._compact_wanted:
            self._compact_pending()
        return a

    def _bump_epoch(self, ino: int) -> None:
        """Tell writers of other processes that skip catching up (see
        :meth:`_current_for_write`) that the size, mode or capabilities changed."""
        if self.shared:
            self.area.w.add64(self.area.version_slots(ino, 0, 0)[-1], 1)

    def _privilege_drop(self, inode: Inode, kill_suidgid: bool, now: int,
                        in_group: Callable[[int], bool] | None = None) -> list[tuple]:
        """Entries that take away what Linux takes away when a file's contents or
        owner change: its capabilities always; with ``kill_suidgid`` (a caller
        without CAP_FSETID, or any chown) its set-user-ID bit, and its
        set-group-ID bit if it is group-executable or the caller is not in the
        file's group (``in_group``; unknown counts as in it)."""
        out: list[tuple] = []
        if kill_suidgid and inode.mode & _SUIDGID and not inode.is_dir:
            mode = inode.mode & ~stat.S_ISUID
            if mode & stat.S_IXGRP or (mode & stat.S_ISGID and in_group is not None
                                       and not in_group(inode.gid)):
                mode &= ~stat.S_ISGID
            if mode != inode.mode:
                out.append((L.E_SETATTR, 0, L.SA_MODE | L.SA_CTIME, mode & 0o7777, 0, 0, 0,
                            0, 0, now))
        if CAPS_XATTR in inode.xattrs:
            out.append((L.E_XATTR, 0, L.X_REMOVE, CAPS_XATTR, b"", now))
        return out

    def _setattr_locked(self, inode: Inode, mode, uid, gid, size, atime_ns, mtime_ns,
                        ctime_ns, kill_suidgid: bool = False,
                        in_group: Callable[[int], bool] | None = None) -> Attr:
        now = time.time_ns()
        mask = L.SA_CTIME
        entries: list[tuple] = []
        new_blocks: list[tuple[int, int]] = []
        if size is not None or ((uid is not None or gid is not None) and not inode.is_dir):
            # Linux: a truncate and a chown drop privileges before the change
            # (an explicit mode, from a kernel that computes the drop itself,
            # comes later in the same commit and wins)
            entries = self._privilege_drop(inode, kill_suidgid, now, in_group)
        if mode is not None:
            mask |= L.SA_MODE
        if uid is not None:
            mask |= L.SA_UID
        if gid is not None:
            mask |= L.SA_GID
        if atime_ns is not None:
            mask |= L.SA_ATIME
        if mtime_ns is not None:
            mask |= L.SA_MTIME
        if size is not None:
            if inode.is_dir:
                raise FsError(errno.EISDIR)
            if size < 0:
                raise FsError(errno.EINVAL)
            if size > L.MAX_FILE_SIZE:
                raise FsError(errno.EFBIG)
            mask |= L.SA_SIZE
            if mtime_ns is None and size != inode.size:
                mask |= L.SA_MTIME
                mtime_ns = now
            rem = size % L.BLOCK
            old = inode.pages.get(size // L.BLOCK)
            if size < inode.size and rem and old is not None:
                # Keep the bytes past EOF in the last page zero: copy it with a zeroed tail.
                blk = self.alloc.alloc_one(self.cpu, meta=False)
                new_blocks.append((blk, 1))
                pm = self.pm
                pm.store_copy(blk * L.BLOCK, old * L.BLOCK, rem)
                pm.store_zero(blk * L.BLOCK + rem, L.BLOCK - rem)
                pm.flush(blk * L.BLOCK, L.BLOCK)
                entries.append((L.E_WRITE, self._next_seq(), size // L.BLOCK, 1, blk,
                                inode.size, inode.mtime))
        entries.append((L.E_SETATTR, self._next_seq(), mask,
                        mode & 0o7777 if mode is not None else 0, uid or 0, gid or 0,
                        size or 0, atime_ns or 0, mtime_ns or 0, ctime_ns or now))
        try:
            freed = self._commit([(inode, entries)])
        except FsError:
            for s, c in new_blocks:
                self.alloc.free(s, c)
            raise
        self._free_blocks(freed)
        return self.attr(inode)

    def fsync(self, ino: int) -> None:
        """Every returned operation is already durable; fence for good measure."""
        self.get(ino)
        self.pm.fence()

    # ------------------------------------------------------------------ xattrs
    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0) -> None:
        """flags: XATTR_CREATE (1) fails if present, XATTR_REPLACE (2) if absent."""
        self._rw()
        inode = self.get(ino)
        ns = next((p for p in _XATTR_NS if name.startswith(p)), None)
        if ns is None:
            raise FsError(errno.EOPNOTSUPP)
        if len(name) > L.NAME_MAX or len(name) <= len(ns):
            raise FsError(errno.ERANGE if len(name) > L.NAME_MAX else errno.EINVAL)
        if len(value) > L.XATTR_VALUE_MAX:
            raise FsError(errno.E2BIG)
        if ns == b"user." and not (stat.S_ISREG(inode.mode) or stat.S_ISDIR(inode.mode)):
            raise FsError(errno.EPERM)
        exists = name in inode.xattrs
        if flags & 1 and exists:
            raise FsError(errno.EEXIST)
        if flags & 2 and not exists:
            raise FsError(errno.ENODATA)
        self._commit([(inode, [(L.E_XATTR, 0, L.X_SET, name, bytes(value),
                                time.time_ns())])])
        if ns == b"security.":
            self._bump_epoch(ino)                # writers must see capabilities come
        if self._compact_wanted:
            self._compact_pending()

    def getxattr(self, ino: int, name: bytes) -> bytes:
        inode = self.get(ino)
        v = inode.xattrs.get(name)
        if v is None:
            raise FsError(errno.ENODATA)
        return v

    def listxattr(self, ino: int) -> list[bytes]:
        return list(self.get(ino).xattrs)

    def removexattr(self, ino: int, name: bytes) -> None:
        self._rw()
        inode = self.get(ino)
        if name not in inode.xattrs:
            raise FsError(errno.ENODATA)
        self._commit([(inode, [(L.E_XATTR, 0, L.X_REMOVE, name, b"",
                                time.time_ns())])])
        if self._compact_wanted:
            self._compact_pending()

    # ------------------------------------------------------------------ statfs
    def statfs(self) -> StatFs:
        a = self.alloc
        ffree = self.nfree_inodes
        # Blocks kept at hand (stashes, rings of log pages) hold nothing: free.
        free = a.nfree + a.stashed() + sum(len(r) for r in self.rings)
        return StatFs(bsize=L.BLOCK, blocks=a.ntotal, bfree=free,
                      bavail=max(0, free - a.reserve),
                      files=self.sb.inodes_per_cpu * self.ncpus, ffree=ffree,
                      namemax=L.NAME_MAX)
