"""Opening and closing a device: the superblock, the region table, mount,
clean unmount, abandoning a device, the switch to several worker processes,
and statfs (NOVA's super.c).

A mount reads the superblock (primary, else its replica), checks the region
table against the geometry the superblock implies, and then either loads the
state saved by a clean unmount or recovers (:mod:`pnova.rebuild`).
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from . import layout as L
from .errors import CorruptImage, FsError
from .inode import Inode
from .locks import LEASE, TIMEOUT, LockTimeout, make_scheme
from .pmem import DeviceError, PMem
from .shared import (H_HELD_INOS, H_LIMBO, H_RDURABLE, H_RLOCK, H_RSYNC, H_SEQ, H_SYNC_STARTED,
                     H_SWITCH_GATE, H_SYNCED, H_SYNCS_RUNNING, lock_word, unlock_word)

if TYPE_CHECKING:
    from .engine import FileSystem

logger = logging.getLogger("pnova")


@dataclass(slots=True, frozen=True)
class SyncTicket:
    """One sync in progress (:meth:`FileSystem.sync_start`)."""
    started: int        # its number: frees tagged below it are reusable once it is done
    covered: int        # the newest sequence number handed out when it began
    record: int         # what the image's sync record held when its msync began


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
        if pm.poisoned(0, L.SB_SIZE):
            raise ValueError("media error (poisoned sector)")
        sb, which = L.Superblock.unpack(block0), "primary"
    except ValueError as e1:
        why1 = str(e1)
        if why1.startswith("unsupported format version"):
            raise CorruptImage(f"{pm.path}: {why1}; this pnova reads versions "
                               f"{', '.join(map(str, L.READABLE_VERSIONS))} (copy the data out "
                               "with the pnova that made it, then mkfs.pnova)") from None
        sb, why2 = None, ""
        for blk in L.replica_blocks(block0, pm.read(L.BLOCK, L.BLOCK), pm.size):
            try:
                if pm.poisoned(blk * L.BLOCK, L.SB_SIZE):
                    raise ValueError("media error (poisoned sector)")
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
    if sb.features & ~L.KNOWN_FEATURES:
        raise CorruptImage(f"{pm.path}: the image uses features this pnova does not know "
                           f"({sb.features & ~L.KNOWN_FEATURES:#x}); use a newer pnova")
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
                                sb.inodes_per_cpu, sb.features)
    except ValueError as e:
        raise CorruptImage(f"{pm.path}: superblock geometry is impossible ({e})") from None
    out = []
    base = sb.region_table_block * L.BLOCK
    for i in range(sb.ncpus):
        off = base + i * L.REGION_SIZE
        bad = "has a media error" if pm.poison and pm.poisoned(off, L.REGION_SIZE) else None
        if bad is None:
            try:
                r = L.Region.unpack(pm.read(off, L.REGION_SIZE))
            except ValueError:
                r = None
            if r is None or r.descriptor() != expect[i].descriptor():
                bad = "is damaged"
        if bad:
            # The table is derivable from the superblock: use the derived copy
            # and let fsck rewrite the damaged descriptor.
            logger.warning("region descriptor of CPU %d %s; using the geometry "
                           "from the superblock", i, bad)
        out.append(expect[i])                   # with the protection areas (not stored)
    return out


class Mount:
    """Mount, unmount and worker set-up of :class:`~pnova.engine.FileSystem`."""

    @classmethod
    def mount(cls, path: str, *, cpu: int = 0, readonly: bool = False,
              device: PMem | None = None, lock: str = "pnova",
              segment_pages: int = 16, power_loss: bool = False) -> "FileSystem":
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
            fs.power_loss = power_loss
            if sb.version == 2:
                logger.info("%s: format version %d: file data is not checksummed (to protect "
                            "it: copy the files out, mkfs.pnova, copy them back)", path,
                            sb.version)
            elif sb.version < 6:
                logger.info("%s: format version %d: recovery after a power loss has fewer "
                            "marks to go by than version 6's (DESIGN 24.3; to get them: copy "
                            "the files out, mkfs.pnova, copy them back)", path, sb.version)
            if not sb.inode_replicas:
                logger.info("%s: inode slots have no replicas (format version %d%s): a "
                            "damaged slot is reported, not repaired", path, sb.version,
                            ", formatted with --no-inode-replicas" if sb.version >= 7 else "")
            if not sb.log_replicas:
                logger.info("%s: log pages have no twins (format version %d%s): a damaged "
                            "log entry is reported, not repaired", path, sb.version,
                            ", formatted with --no-log-replicas" if sb.version >= 8 else "")
            if sb.clean not in (0, 1):
                logger.warning("%s: the superblock's clean field holds %d (neither 0 nor 1); "
                               "the image is treated as not cleanly unmounted", path, sb.clean)
            if not readonly:
                # Before anything reads a slot: each slot whose two copies
                # differ gets the one that reads (DESIGN 23.1).
                fs.repair_replicas()
            if sb.clean == 1 and not readonly:
                fs._clear_poisoned_journals()
            # Saved allocator state that cannot be read is rebuilt from the
            # logs, as after a crash (a read-only mount allocates nothing).
            rebuild = sb.clean == 1 and not readonly and fs._saved_bitmaps_poisoned()
            if rebuild:
                logger.warning("%s: the saved allocation bitmaps have a media error; "
                               "rebuilding them from the logs", path)
            if sb.clean == 1 and not rebuild:
                fs._load_clean()
                fs.mount_path = "clean"
            else:
                if readonly:
                    raise CorruptImage(f"{path}: not cleanly unmounted; recovery needs a "
                                       "read-write mount")
                fs._recover()
                fs.mount_path = "recovery"
            if not readonly:
                if fs.sync_record and any(pm.read_u64(a) for a in fs._sync_record_addrs()):
                    # No session keeps the record up unless it holds freed
                    # blocks back (hold_frees_until_sync sets it again): until
                    # then it says nothing (DESIGN 24.3, step 9).
                    fs._put_sync_record(0)
                fs.sb.clean = 0
                fs.sb.mount_count += 1
                fs.sb.last_mount_ns = time.time_ns()
                write_superblock(pm, fs.sb)
                if pm.mode == "disk":
                    # The flag must be off on the disk before any change can
                    # reach it: a page written back early over a "clean" image
                    # would be trusted without recovery (DESIGN 24.3).
                    pm.sync()
        except BaseException:
            pm.close()
            raise
        fs.mount_seconds = time.monotonic() - t0
        logger.info("mounted %s via %s path in %.3f s (%d free blocks, %d free inodes)",
                    path, fs.mount_path, fs.mount_seconds, fs.alloc.nfree, fs.nfree_inodes)
        logger.info("%s: %s", path, pm.describe())
        logger.info("%s: %s", path, fs.prot.summary())
        return fs

    def unmount(self) -> None:
        """Clean unmount: free orphans, save allocator state, mark the image clean."""
        if self.pm is None:
            return
        if not self.readonly:
            # compacted chains on their way to the disk: switched now (the
            # syncs below make it durable)
            for fs in [self] + self._attached:
                if fs.pm is not None:
                    fs.finish_compactions()
            if self.shared:
                for inode in list(self.cache.values()):
                    self._validate(inode)
            # No allocation follows, and the image is synced before it is
            # marked clean: frees are immediate from here on.
            self.alloc.release_limbo(everything=True)
            self.alloc.limbo = None
            self.hold_inos = False
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
                # the whole area, so that the store also clears any poison in it
                bits = np.packbits(ra.used(), bitorder="little").tobytes()
                bits = bits.ljust(r.bitmap_blocks * L.BLOCK, b"\0")
                off = r.bitmap_start * L.BLOCK
                pm.store(off, bits)
                pm.flush(off, len(bits))
            pm.fence()                                   # saved state durable before 'clean'
            # On a disk, the pages reach it in any order: everything but the
            # superblock first, so that 'clean' never arrives before what it
            # vouches for (DESIGN 24).
            pm.sync()
            if self.sync_record and self.alloc.split_frees:
                # everything is on the disk now: the record may say so
                self._put_sync_record(self.area.w.load64(H_SEQ) - 1)
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
        view = self.area.column(self.area.refs)
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

    def prepare_workers(self, workers: int | None = None) -> None:
        """Switch to shared mode; call in the primary before forking workers.

        ``workers`` is how many worker processes will use the device (None:
        not known).  With exactly one, and the primary doing no file operation
        while it runs, no other process can change a directory under it, so
        namespace operations take no namespace locks (19.8).
        """
        self.shared = True
        self._ns_alone = workers == 1
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
        primary._ns_alone = False                # several CPUs in this process now
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
        if self.alloc.limbo is not None:
            self.alloc.held_by(self.cpu)                     # one producer per list
        self.scheme.close()
        self.scheme = make_scheme(self.lock_name, self.area, self.cpu, self.segment_pages)
        self.scheme.sem.take_over()
        self._compact_wanted = set()
        self._switches = {}                      # the parent's, not this process's

    def sync(self) -> None:
        """Make every operation that has returned durable on the image's backing
        storage: a fence (on persistent memory mapped with MAP_SYNC, all it
        takes), then, for a file on a disk, msync of the mapping.  Blocks freed
        before the sync began may be reused once it has completed (DESIGN 24)."""
        ticket = self.sync_start()
        if ticket:
            try:
                self.pm.sync()
            except BaseException:
                self.sync_failed(ticket)
                raise
            self.sync_done(ticket)

    def sync_start(self) -> "SyncTicket | None":
        """The first half of :meth:`sync`: fence, open a new sync interval (frees
        from now on wait for the next sync), note the newest sequence number
        handed out, and bring the image's sync record up to what completed
        syncs cover (DESIGN 24.3).  Returns None when there is nothing to push
        (an image in memory or on persistent memory, or a read-only mount).  A
        caller that runs the msync elsewhere (a thread) calls
        :meth:`sync_done` after it."""
        pm = self.pm
        pm.fence()
        if pm.mode != "disk" or self.readonly:
            return None
        w = self.area.w
        # Counted as running first: an allocation that finds none running knows
        # that no sync began before it looked (the interval alone cannot tell:
        # H_SYNCED is the highest interval done, and a later sync may finish
        # before an earlier one).  A sync whose msync fails takes itself off
        # (sync_failed); one whose process dies in the middle leaves the count
        # up, and the fresh-block shortcut off, until the next mount.
        w.add64(H_SYNCS_RUNNING, 1)
        started = w.add64(H_SYNC_STARTED, 1) + 1
        # A compaction that switches a slot to its new chain copies into it,
        # unsynced, the entries written since the chain was made durable; it
        # may do so only while no sync starts (it read-locks the gate word,
        # then looks at H_SYNC_STARTED; this sync bumped that, then looks at
        # the gate: one of the two sees the other).  So the
        # msync below begins after every such switch has ended (DESIGN 24.5).
        try:
            self._wait_switches()
        except BaseException:
            w.add64(H_SYNCS_RUNNING, -1)         # no sync runs after all
            raise
        # Every entry numbered up to here took its number after its data was
        # stored, so before the msync below begins: once it completes, such an
        # entry is on the disk only with its data.
        covered = w.load64(H_SEQ) - 1
        return SyncTicket(started, covered, self._store_sync_record())

    def _wait_switches(self) -> None:
        """Wait until no compaction is switching a slot (microseconds each).
        The switchers hold the gate word as readers, recorded per CPU: one
        still there after a lease may be a dead process's, which is reaped.
        Nothing a switch does inside the gate syncs, so a sync never waits
        for its own process's share."""
        sem = self.scheme.sem
        load = self.area.w.load32
        if not load(H_SWITCH_GATE):
            return
        start = time.monotonic()
        while load(H_SWITCH_GATE):
            waited = time.monotonic() - start
            if waited > TIMEOUT:
                raise LockTimeout(f"a compaction's switch held the sync gate for {TIMEOUT:.0f} s")
            if waited > LEASE:
                sem.reap(H_SWITCH_GATE)
            os.sched_yield()

    def _store_sync_record(self) -> int:
        """Raise the image's sync record to what completed syncs cover; return
        the value it holds now (the msync that follows writes it back).  Only
        a session that holds freed blocks back keeps the record."""
        if not self.alloc.split_frees:
            return 0
        w = self.area.w
        pm = self.pm
        lock_word(w, H_RLOCK)
        try:
            want = w.load64(H_RSYNC)
            have = self._sync_record() or 0
            if want > have and L.encode_sync_record(want):
                self._put_sync_record(want)
                have = want
        finally:
            unlock_word(w, H_RLOCK)
        pm.fence()
        return have

    def sync_failed(self, ticket: "SyncTicket") -> None:
        """A sync whose msync failed: it runs no more and completes nothing (the
        blocks held for it stay held, and its interval is never published)."""
        self.area.w.add64(H_SYNCS_RUNNING, -1)

    def sync_done(self, ticket: "SyncTicket") -> None:
        """The second half of :meth:`sync`, once the msync begun after
        :meth:`sync_start` has returned: record the interval as synced and
        reuse the blocks it made safe."""
        w = self.area.w
        for off, value in ((H_RSYNC, ticket.covered), (H_RDURABLE, ticket.record),
                           (H_SYNCED, ticket.started)):
            while True:                          # each word only grows
                cur = w.load64(off)
                if cur >= value or w.cas64(off, cur, value):
                    break
        w.add64(H_SYNCS_RUNNING, -1)
        # every CPU's held blocks and slots, not only this process's: a CPU
        # whose process stays idle strands nothing
        self.alloc.release_limbo(every_cpu=True)

    def _sync_record_addrs(self) -> tuple[int, int]:
        return L.sync_record_addrs(self.sb.total_blocks)

    def _sync_record(self) -> int | None:
        """What the image's sync record says (both copies, SPEC 3.1)."""
        a, b = self._sync_record_addrs()
        return L.sync_record_of(self.pm.read_u64(a), self.pm.read_u64(b))

    def _put_sync_record(self, seq: int) -> None:
        """Store and flush both copies of the sync record for ``seq`` (0: no
        record); the caller's next fence, or msync, makes them durable.  Either
        may reach the medium first: a reader takes the smaller."""
        word = L.encode_sync_record(seq) if seq else 0
        for a in self._sync_record_addrs():
            self.pm.store_u64(a, word)
            self.pm.flush(a, 8)

    def _start_sync_record(self) -> None:
        """When a session starts holding freed blocks back on a version-6 image:
        every entry on the image is durable (the mount has synced), so the sync
        record may cover them all; one msync makes it durable before any block
        is held or reused under the record's rules (DESIGN 24.3, step 9)."""
        pm = self.pm
        w = self.area.w
        last = w.load64(H_SEQ) - 1               # every entry up to it is stored now
        pm.sync()                                # and on the disk after this
        if L.encode_sync_record(last):
            self._put_sync_record(last)
            pm.fence()
            pm.sync()
            w.store64(H_RSYNC, last)
            w.store64(H_RDURABLE, last)

    def hold_frees_until_sync(self) -> None:
        """On a disk-backed image, a freed block is reused only after a sync has
        made its release durable (so a power loss never finds an older state
        that still uses it rewritten); a no-op for an image in memory."""
        if self.pm.mode == "disk" and not self.readonly:
            if self.sync_record and self.alloc.limbo is None:
                self._start_sync_record()
            self.alloc.hold_frees(self.cpu, split=self.sync_record)
            self.alloc.sync_now = self.sync
            self.hold_inos = True
            self.moves_need_sync = True

    def statfs(self) -> StatFs:
        a = self.alloc
        ffree = self.nfree_inodes + self.area.w.load64(H_HELD_INOS)   # free after the next sync
        # Blocks kept at hand (stashes, rings of log pages) hold nothing: free.
        free = a.nfree + a.stashed() + sum(len(r) for r in self.rings) + \
            self.area.w.load64(H_LIMBO)           # free again after the next sync
        return StatFs(bsize=L.BLOCK, blocks=a.ntotal, bfree=free,
                      bavail=max(0, free - a.reserve),
                      files=self.sb.inodes_per_cpu * self.ncpus, ffree=ffree,
                      namemax=L.NAME_MAX)
