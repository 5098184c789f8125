"""Offline consistency check and repair of a pnova image (the engine side of fsck.pnova).

:class:`Checker` understands on-media format version 2 (an image of another
version is refused with one line).  It runs ordered ``check_*`` passes; each
one reports what it finds in plain words, counts it, and repairs it when the
answer policy says so.  The passes, in order:

1. superblock and replica (CRC, version, geometry; dynamic fields may lag
   after a crash; a clean flag other than 0 or 1), found as the mount finds
   them, and the file's size: a file shorter than its filesystem cannot be
   checked; a longer one is valid, its unused tail is named (and, with -y,
   trimmed off at the end);
2. region table against the geometry the superblock implies;
3. lite journals (an open transaction on a dirty image is normal: the check
   then looks at the state *after* a virtual rollback, as mount would see it);
4. inodes: state word, static line CRC and file type, log chain (via
   :func:`pnova.log.walk`: bounds, loops, page tails, entry CRCs), entry
   well-formedness while replaying it.  A file may also have a per-core log
   array (one line per CPU: head and tail of that CPU's local log): the
   pointer must lie in a data area, belong to a file and be used by nothing
   else; each live local log (head and tail set; a head without a tail is a
   log whose creation never committed, which is legal) is walked like the
   global log and may hold only file writes; reserved bytes are zero.  A
   file's state is the replay of all its entries, global and local, merged by
   sequence number (stable), exactly as the engine replays it;
5. blocks: every log page, local log page, log array and data page lies in a
   data area and is owned once;
6. saved allocator bitmaps (clean images only) against the blocks in use;
7. directory tree: dentries point to live inodes of their type, each
   directory has one name and the right '..', no loops, everything reachable;
8. link counts; 9. file sizes against mapped pages (and zero bytes past EOF).

How repairs are made
--------------------
Every write goes through the pmem layer (store / flush / fence).  Repairs of
a single word or of one inode's log are made directly: a bad state word, a
log tail moved back to the last good entry, a link-change, setattr, dentry
or write entry appended with :func:`pnova.log.append` and committed with one
atomic tail store.  A damaged local log is cut the same way, by moving that
CPU's tail in the log array back (to 0 when nothing in it is usable: a head
without a tail is legal); a bad log array pointer is set to 0, which drops
the local logs it leads to.  Before the first such write the image is marked
dirty (after really rolling back any open journal), so that a crash during
fsck leaves an image the next mount recovers.

Allocation is never patched bit by bit: after repairs (or when the saved
bitmaps are wrong) fsck mounts the image with the engine, whose recovery
rebuilds the allocator from the logs and frees unlinked inodes, reconnects
unreferenced inodes into /lost+found (created if missing) through the
engine's transaction path, and unmounts cleanly, which saves fresh bitmaps.
So a leaked block is fixed by that rebuild, and a repaired image is left
clean: a second check finds nothing.

Blocks fsck needs for a repair (a copy of a block used twice, a new log
page) are taken from blocks that no inode claims, not even a damaged one,
and that the saved bitmap (on a clean image) does not mark in use.
"""
from __future__ import annotations

import errno
import os
import stat
import struct
import time
import uuid as uuidlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

import numpy as np
from crc32c import crc32c

from . import layout as L
from . import log as plog
from .engine import FileSystem, write_superblock
from .errors import CorruptImage, FsError
from .inode import Inode
from .journal import Journal, JournalError
from .pmem import DeviceError, PMem
from .protect import DataProtection, strip_ranges
from .replica import (USABLE, Judge, all_foreign, copy_slot, differing_slots, pick_line,
                      saved_bitmap_reader)

# Answer policies.
NO, YES, PREEN = "no", "yes", "preen"

_FILE_TYPES = {stat.S_IFREG: "regular file", stat.S_IFDIR: "directory",
               stat.S_IFLNK: "symbolic link", stat.S_IFIFO: "FIFO", stat.S_IFSOCK: "socket",
               stat.S_IFCHR: "character device", stat.S_IFBLK: "block device"}
_MAX_PAGES = L.MAX_FILE_SIZE // L.BLOCK
_LIST_MAX = 20          # block ranges listed in one message


def _repairs(found) -> str:
    """What a data block's check found that a repair can set right, in words."""
    parts = []
    if found.rebuilt:
        parts.append("strip " + ", ".join(map(str, found.rebuilt)) + " fails its checksum "
                     "(the parity rebuilds it)")
    if found.csum_fixed:
        parts.append("checksum copy " + " and ".join(map(str, found.csum_fixed))
                     + " disagrees with the data")
    if found.parity_fixed:
        parts.append("its parity strip is stale")
    return "; ".join(parts)


class CheckAborted(Exception):
    """The check cannot go on (cannot open, not pnova, no usable geometry): one line."""


@dataclass(eq=False)
class _Chain:
    """One log chain (an inode's global log or a local log), as far as it is good."""
    head: int
    tail: int
    err: str | None = None
    bad_tail: bool = False               # the tail itself is not a log position
    good_end: int | None = None          # None: nothing of it can be used
    pages: list[int] = field(default_factory=list)      # pages up to good_end
    walked: list[int] = field(default_factory=list)     # every page validated
    entries: list[tuple] = field(default_factory=list)  # the entries before good_end
    fixes: list[plog.Fix] = field(default_factory=list)  # writes that mend one copy from the other

    @property
    def new_tail(self) -> int | None:
        """For a local log: None if it stays, else the tail a repair stores (0: dropped)."""
        if self.err is None:
            return None
        if self.good_end is None or self.good_end == self.head:
            return 0                     # nothing usable; the head may stay (legal)
        return self.good_end

    @property
    def kept(self) -> bool:
        return self.new_tail != 0


@dataclass(eq=False)
class _Rec:
    """What the scan learned about one non-free inode slot."""
    ino: int
    addr: int
    state: int
    static: L.InodeStatic | None = None
    static_err: str | None = None
    head: int = 0
    tail: int = 0
    head_twin: int = 0                   # byte offset of the twin of the first log page
    inode: Inode | None = None
    log_err: str | None = None
    bad_tail: bool = False
    good_end: int | None = None          # None: the log cannot be used at all
    log_pages: list[int] = field(default_factory=list)   # pages up to the (new) tail
    walked: list[int] = field(default_factory=list)      # every page validated
    maxseq: int = 0
    fate: str = "live"                   # live | clear (state -> FREE)
    frozen: bool = False                 # a structural repair was declined: no appends
    # Per-core logs (files only).
    replay_static: L.InodeStatic | None = None   # what the inode's state is replayed from
    global_entries: list[tuple] = field(default_factory=list)
    array: int = 0                       # block of the per-core log array, 0: none
    array_err: str | None = None         # the pointer is bad: cleared, local logs dropped
    array_clash: bool = False            # ... because something else uses that block
    lines: dict[int, _Chain] = field(default_factory=dict)   # cpu -> live local log
    local_walked: list[int] = field(default_factory=list)    # every local page validated
    headless: list[int] = field(default_factory=list)  # cpus whose line has a tail, no head
    reserved: list[int] = field(default_factory=list)  # cpus whose line has reserved bytes set
    beyond: bool = False                 # bytes past the last CPU's line are set
    twin_fixes: list[plog.Fix] = field(default_factory=list)   # one copy damaged, the other good
    array_twin: int = 0                  # block of the log array's twin (format 8), 0: none
    head_twin_want: int | None = None    # where the first page's twin is, when the slot errs
    array_twin_err: str | None = None    # the twin pointer is bad: cleared, the array kept

    @property
    def is_dir(self) -> bool:
        return self.static is not None and stat.S_ISDIR(self.static.mode)

    @property
    def cut(self) -> bool:
        """A repair drops part of its logs, so mappings they had replaced come back."""
        return self.log_err is not None or self.array_err is not None or \
            any(ch.err for ch in self.lines.values())

    def local_kept(self) -> list[_Chain]:
        """The local logs that remain after the planned repairs."""
        if not self.array or self.array_err:
            return []
        return [ch for _, ch in sorted(self.lines.items()) if ch.kept]

    def meta_blocks(self) -> list[tuple[int, str]]:
        """(block, what) of every log block the inode keeps: log pages and the array."""
        out = [(b, "log page") for b in self.log_pages]
        for ch in self.local_kept():
            out.extend((b, "log page") for b in ch.pages)
        if self.array and not self.array_err:
            out.append((self.array, "per-core log array"))
            if self.array_twin and not self.array_twin_err:
                out.append((self.array_twin, "per-core log array twin"))
        return out


def _file_entry(e: tuple) -> None:
    """Entries a file's global log may not hold (the rest is checked by replay)."""
    if e[0] == L.E_DENTRY:
        raise ValueError("dentry in a file log")


def _local_entry(e: tuple) -> None:
    """A file's local log holds only file writes."""
    if e[0] != L.E_WRITE:
        raise ValueError("a per-core log holds only file writes")


def _local_dentry(e: tuple) -> None:
    """A directory's local log (version 9) holds only dentries of its names."""
    if not L.local_entry_ok(e, True):
        raise ValueError("a directory's per-core log holds only dentries of its names")


def _ftype(mode: int) -> str:
    return _FILE_TYPES.get(stat.S_IFMT(mode), f"type {stat.S_IFMT(mode):#o}")


def _ranges(blocks: list[int]) -> str:
    """'3, 7-9, 12' for sorted block numbers, cut after _LIST_MAX ranges."""
    out: list[str] = []
    i = 0
    while i < len(blocks) and len(out) < _LIST_MAX:
        j = i
        while j + 1 < len(blocks) and blocks[j + 1] == blocks[j] + 1:
            j += 1
        out.append(str(blocks[i]) if i == j else f"{blocks[i]}-{blocks[j]}")
        i = j + 1
    if i < len(blocks):
        out.append(f"and {len(blocks) - i} more")
    return ", ".join(out)


class Checker:
    """Check (and, as the answer policy allows, repair) one pnova image.

    ``policy`` is NO (read-only), YES (repair everything), PREEN (repair only
    what cannot lose data) or a callable asked each question, returning
    True to repair.  ``progress(phase, fraction)`` is called during long
    passes.  :meth:`run` returns the fsck(8) exit status (0, 1, 4 or 5) and
    raises :class:`CheckAborted` for operational errors.
    """

    def __init__(self, path: str, *, policy: str | Callable[[str], bool] = NO,
                 force: bool = False, verbose: bool = False,
                 progress: Callable[[str, float], None] | None = None,
                 out: TextIO | None = None) -> None:
        self.path = path
        self.policy = policy
        self.readonly = policy == NO
        self.force = force
        self.verbose = verbose
        self.progress = progress
        self.out = out
        self.found = self.fixed = self.left = 0
        self.unsafe_declined = 0
        self.pm: PMem | None = None
        self.sb: L.Superblock | None = None
        self.clean = False
        self.regions: list[L.Region] = []
        self.file_size = 0                       # of the image file; the device may be shorter
        self.trim_to: int | None = None          # cut the unused tail off at the end
        self.overlay: dict[int, int] = {}        # virtual journal rollback: addr -> value
        self.pending_rollback: list[Journal] = []
        self.recs: dict[int, _Rec] = {}
        self.wrote = False                       # anything written: finish with a mount
        self.prepared = False                    # journals rolled back, image marked dirty
        self.deferred = 0                        # repairs counted as fixed, done by finish()
        self.expected: dict[int, int] = {}       # ino -> link count after repair
        self.rebuild_alloc = False
        self.reconnect: list[int] = []
        self.next_seq = 0
        self.maxseq = 0
        self.claimed: np.ndarray | None = None   # blocks fsck must not hand out
        self.allocated: set[int] = set()         # blocks fsck handed out
        self.released: set[int] = set()          # blocks a repair (planned) stops using
        self.owner: np.ndarray | None = None     # block -> first owning inode
        self.paths: dict[int, str] = {}
        self.notes: list[str] = []
        self.rtables: list[int] | None = None    # replica inode tables (SPEC 5.5)
        self.slot_src: dict[int, int] = {}       # slot -> the copy it is read from

    # ------------------------------------------------------------------ output
    def say(self, line: str) -> None:
        print(line, file=self.out)

    def info(self, line: str) -> None:
        if self.verbose:
            self.say(line)

    def problem(self, msg: str, fix: str | None, *, safe: bool) -> bool:
        """Report one problem; return True if it is to be repaired now."""
        self.found += 1
        if fix is None:
            self.say(f"{msg}.")
            self.left += 1
            return False
        pol = self.policy
        if callable(pol):
            self.say(f"{msg}.")
            ok = bool(pol(fix))
        else:
            ok = pol == YES or (pol == PREEN and safe)
            if pol == PREEN and not safe:
                self.unsafe_declined += 1
            self.say(f"{msg}.  {fix}? {'yes' if ok else 'no'}")
        if ok:
            self.fixed += 1
        else:
            self.left += 1
        return ok

    def _desc(self, ino: int) -> str:
        """'directory 7 ('/a/b')' or 'inode 12 ('/f')' or 'inode 12'."""
        rec = self.recs.get(ino)
        kind = "directory" if rec is not None and rec.is_dir else "inode"
        p = self.paths.get(ino)
        return f"{kind} {ino} ('{p}')" if p else f"{kind} {ino}"

    def _tick(self, phase: str, done: int, total: int) -> None:
        if self.progress is not None and total:
            self.progress(phase, done / total)

    # ------------------------------------------------------------ the run
    def run(self) -> int:
        """Run every pass; return the fsck exit status (without the operational bit)."""
        try:
            self.pm = PMem(self.path, readonly=self.readonly)
        except DeviceError as e:
            raise CheckAborted(str(e)) from None
        try:
            self.file_size = self.pm.size
            if self.pm.size < 16 * L.BLOCK:
                raise CheckAborted(f"{self.path}: not a pnova filesystem (too small)")
            self.check_superblock()
            if not self.force and self._quick_clean():
                self.pm.close()
                self.pm = None
                self._trim()
                return 0
            self.check_regions()
            self.check_journals()
            self.check_replicas()
            self.check_inodes()
            self.check_blocks()
            self.check_data()
            self.check_bitmaps()
            self.check_tree()
            self.check_links()
            self.check_sizes()
            if self.verbose:
                self.report_usage()
            nfiles, nblocks = self._counts()
        except FsError as e:             # a repair found no room (ENOSPC)
            raise CheckAborted(f"{self.path}: cannot complete a repair: {e}") from None
        finally:
            if self.pm is not None:
                self.pm.close()
                self.pm = None
        self.finish()
        self._trim()
        self._summary(nfiles, nblocks)
        return (1 if self.fixed else 0) | (4 if self.left else 0)

    def _trim(self) -> None:
        """Cut the unused tail off the file, as agreed in check_superblock."""
        if self.trim_to is None:
            return
        if self.left:
            self.say(f"{self.path}: the file was not trimmed, because problems remain")
            return
        try:
            os.truncate(self.path, self.trim_to)
        except OSError as e:
            self.say(f"{self.path}: cannot trim the file: {e.strerror}")

    def _summary(self, nfiles: int, nblocks: int) -> None:
        sb = self.sb
        ninodes = sb.inodes_per_cpu * sb.ncpus
        ndata = sum(r.data_blocks for r in self.regions)
        for n in self.notes:
            self.say(n)
        if self.unsafe_declined:
            self.say(f"{self.path}: UNEXPECTED INCONSISTENCY; run fsck.pnova without -p "
                     "(or with -y) to repair it.")
        if self.found == 0:
            state = "no problems found"
        else:
            state = f"{self.found} problem(s) found, {self.fixed} fixed"
            if self.left:
                state += f", {self.left} left"
        self.say(f"{self.path}: {nfiles}/{ninodes} files, {nblocks}/{ndata} blocks; {state}")

    # ------------------------------------------------------------ low-level access
    def _u64(self, addr: int) -> int:
        v = self.overlay.get(addr)
        return self.pm.read_u64(addr) if v is None else v

    def _block_overlaid(self, blk: int) -> bytes:
        """A block's bytes as mount will see them after rolling back the open
        journals (their records may name a log array line's tail, SPEC 8)."""
        raw = self.pm.read(blk * L.BLOCK, L.BLOCK)
        lo = blk * L.BLOCK
        over = [(a, v) for a, v in self.overlay.items() if lo <= a < lo + L.BLOCK]
        if not over:
            return raw
        out = bytearray(raw)
        for a, v in over:
            struct.pack_into("<Q", out, a - lo, v)
        return bytes(out)

    def _prepare_write(self) -> None:
        """Before the first inode/log write: undo open journals for real, mark dirty."""
        self.wrote = True
        if self.prepared:
            return
        self.prepared = True
        for j in self.pending_rollback:
            j.rollback()
        self.pending_rollback.clear()
        self.overlay.clear()
        if self.sb.clean:
            self.sb.clean = 0
            write_superblock(self.pm, self.sb)

    def _put_u64(self, addr: int, value: int) -> None:
        self._prepare_write()
        self.pm.store_u64(addr, value)
        self.pm.flush(addr, 8)
        r = self._replica_of(addr)
        if r is not None:                        # a slot word: its replica too
            self.pm.store_u64(r, value)
            self.pm.flush(r, 8)
        self.pm.fence()

    def _replica_of(self, addr: int) -> int | None:
        """The replica of a byte of a primary inode table; None elsewhere."""
        if self.rtables is None:
            return None
        return L.replica_of(self.regions, self.sb.inodes_per_cpu, addr)

    def _seq(self) -> int:
        s = self.next_seq
        self.next_seq += 1
        return s

    def _alloc_block(self, avoid: int | None = None) -> int:
        """A block nobody claims, for a repair; raises FsError(ENOSPC) if none.
        ``avoid``: a block whose region is taken last."""
        regions = self.regions
        if avoid is not None:
            regions = sorted(regions, key=lambda r: r.data_start <= avoid < r.end)
        for r in regions:
            free = np.flatnonzero(~self.claimed[r.data_start:r.end])
            if len(free):
                b = r.data_start + int(free[0])
                self.claimed[b] = True
                self.allocated.add(b)
                return b
        raise FsError(errno.ENOSPC, "no free block left for the repair")

    def _alloc_pair(self) -> tuple[int, int]:
        """A log page for a repair and, on an image whose log pages have twins,
        its twin, from another region where there is one."""
        page = self._alloc_block()
        if not self.sb.log_replicas:
            return page, 0
        return page, self._alloc_block(avoid=page)

    def _append(self, rec: _Rec, entries: list[tuple]) -> None:
        """Append entries to an inode's log and commit them with one tail store."""
        if rec.frozen:
            # An earlier repair of this inode's log was declined: writing after
            # its tail now would silently make that repair.
            self.say(f"  not done: inode {rec.ino}'s damaged log was left as it is")
            self.fixed -= 1
            self.left += 1
            return
        self._prepare_write()
        pm = self.pm
        raws = [L.encode_entry(e) for e in entries]
        tail, pages = plog.append(pm, rec.tail, raws, rec.ino, self._alloc_pair)
        pm.fence()                                       # entries before the tail
        self._put_u64(rec.addr + L.I_LOG_TAIL, tail)
        rec.tail = tail
        rec.log_pages.extend(pages)
        for e in entries:
            rec.inode.apply(e)

    def _inode_addr(self, ino: int) -> int:
        cpu = (ino - 1) % self.sb.ncpus
        idx = (ino - 1) // self.sb.ncpus
        return self.regions[cpu].itable_start * L.BLOCK + idx * L.INODE_SIZE

    def _valid_ino(self, ino: int) -> bool:
        return 1 <= ino and (ino - 1) // self.sb.ncpus < self.sb.inodes_per_cpu

    def _in_data(self, block: int) -> bool:
        return any(r.data_start <= block < r.end for r in self.regions)

    # ------------------------------------------------------------ pass 1: superblock
    def check_superblock(self) -> None:
        """Primary vs replica: CRC, plausibility, equal geometry; the file's size."""
        pm = self.pm
        nblocks = self.file_size // L.BLOCK
        prim, why_p = self._read_sb(0)
        repl_at: int | None = None
        if prim is not None:
            try:
                L.plan_regions(prim.total_blocks, prim.numa_nodes, prim.cpus_per_node,
                               prim.inodes_per_cpu, prim.features)
            except ValueError as e:
                raise CheckAborted(f"{self.path}: superblock geometry is impossible "
                                   f"({e})") from None
            if prim.total_blocks > nblocks:
                raise CheckAborted(self._short_file(prim))
            repl_at = prim.total_blocks - 1
            repl, why_r = self._read_sb(repl_at * L.BLOCK, repl_at)
        else:
            # The search the mount makes (SPEC 13.1): the file's last block, the
            # one the damaged primary's total_blocks names, the one after the
            # region table's last region.
            repl, why_r = None, "bad magic"
            for i, blk in enumerate(self._replica_blocks()):
                cand, why = self._read_sb(blk * L.BLOCK, blk)
                if cand is not None:
                    repl, repl_at = cand, blk
                    break
                if i == 0:
                    why_r = why
        if prim is None and repl is None:
            other = self._other_version()
            if other is not None:
                # An intact superblock of another format: nothing here may be
                # read (let alone "repaired") with this version's rules.
                raise CheckAborted(f"{self.path}: on-media format version {other} is not "
                                   f"supported (fsck.pnova checks version {L.FORMAT_VERSION})")
            sb, how = self._salvage_sb()
            if sb is None:
                if why_p == "bad magic" and why_r == "bad magic":
                    raise CheckAborted(f"{self.path}: not a pnova filesystem (no superblock "
                                       "found)")
                raise CheckAborted(f"{self.path}: superblock ({why_p}) and replica ({why_r}) "
                                   "are both unusable and the region table does not give "
                                   "the geometry back")
            self.sb = sb
            self._check_size()
            if self.problem(f"primary superblock is damaged ({why_p}) and so is its replica "
                            f"({why_r}); geometry {how}", "Rewrite both superblocks",
                            safe=False):
                write_superblock(pm, sb)
                self.wrote = True
            self.clean = False
            return
        if prim is not None and repl is not None:
            if prim.geometry() == repl.geometry():
                self.sb = prim
                if (prim.clean, prim.mount_count, prim.next_seq) != \
                        (repl.clean, repl.mount_count, repl.next_seq):
                    self.info("replica superblock lags behind the primary (normal after a "
                              "crash)")
            else:
                # Trust the copy that agrees with the device and the region table.
                good, bad, name = (prim, repl, "replica") if self._sb_fits(prim) else \
                    (repl, prim, "primary")
                self.sb = good
                if self.problem(f"superblock and replica disagree on the geometry; the "
                                f"{name} is wrong", f"Rewrite the {name} superblock",
                                safe=True):
                    self._write_sb_copy(good, 0 if name == "primary" else
                                        (good.total_blocks - 1) * L.BLOCK)
        elif prim is not None:
            self.sb = prim
            if self.problem(f"replica superblock (block {repl_at}) is damaged ({why_r}); the "
                            "primary is intact", "Rewrite the replica from the primary",
                            safe=True):
                self._write_sb_copy(prim, (prim.total_blocks - 1) * L.BLOCK)
        else:
            self.sb = repl
            if self.problem(f"primary superblock (block 0) is damaged ({why_p}); the replica "
                            "is intact", "Rewrite the primary from the replica", safe=True):
                self._write_sb_copy(repl, 0)
        sb = self.sb
        try:
            L.plan_regions(sb.total_blocks, sb.numa_nodes, sb.cpus_per_node, sb.inodes_per_cpu,
                           sb.features)
        except ValueError as e:
            raise CheckAborted(f"{self.path}: superblock geometry is impossible ({e})") from None
        self._check_size()
        self.clean = sb.clean == 1
        if sb.clean not in (0, 1):
            # Not a value any writer stores: the saved state cannot be trusted, so
            # the image is handled as not cleanly unmounted, as the mount does.
            if self.problem(f"superblock's clean field holds {sb.clean} (neither 0 nor 1); "
                            "the image is treated as not cleanly unmounted",
                            "Rebuild the saved state from the logs", safe=True):
                self.deferred += 1               # finish() writes it and rebuilds
                self.rebuild_alloc = True
        if sb.version >= 6:
            self._check_sync_record()

    def _check_sync_record(self) -> None:
        """Version 6 on: each copy of the sync record is 0 or a valid word, and on
        a clean image what they say is no larger than the last sequence number
        handed out (a record too large would let recovery trust writes it
        should check).  The copies may differ (either can reach a disk first,
        and an image written before the copy existed has 0 there): a reader
        takes the smaller, so a difference is no problem."""
        addrs = L.sync_record_addrs(self.sb.total_blocks)
        words = [self.pm.read_u64(a) for a in addrs]
        why = ""
        for a, word in zip(addrs, words):
            if word and L.decode_sync_record(word) is None:
                why = f"(block {a // L.BLOCK}, byte {a % L.BLOCK}) holds {word:#x}, " \
                      "which fails its check"
                break
        else:
            seq = L.sync_record_of(*words)
            if seq is not None and self.clean and seq > self.sb.next_seq - 1:
                why = f"covers sequence number {seq}, beyond the last one handed out " \
                      f"({self.sb.next_seq - 1})"
        if why and self.problem(f"the sync record {why}",
                                "Clear it (recovery then checks the data of every write it "
                                "may)", safe=True):
            for a in addrs:
                self.pm.store_u64(a, 0)
                self.pm.persist(a, 8)

    def _replica_blocks(self) -> list[int]:
        return L.replica_blocks(self.pm.read(0, L.SB_SIZE), self.pm.read(L.BLOCK, L.BLOCK),
                                self.file_size)

    def _short_file(self, sb: L.Superblock) -> str:
        size = sb.total_blocks * L.BLOCK
        return (f"{self.path}: the file is shorter than its filesystem ({self.file_size} "
                f"bytes; the superblock describes {sb.total_blocks} blocks, {size} bytes): its "
                "end is missing and cannot be rebuilt")

    def _check_size(self) -> None:
        """The file may be longer than the filesystem (its tail is not used), not shorter."""
        size = self.sb.total_blocks * L.BLOCK
        if size > self.file_size:
            raise CheckAborted(self._short_file(self.sb))
        if size == self.file_size:
            return
        self.pm.limit(size)                  # every later bound is the filesystem's end
        self.say(f"{self.path}: the file is {self.file_size - size} bytes longer than its "
                 f"filesystem ({self.sb.total_blocks} blocks); bytes {size}..{self.file_size - 1} "
                 "are not used")
        if self.policy in (NO, PREEN) or not stat.S_ISREG(os.stat(self.path).st_mode):
            return                           # not an error: nothing to repair
        question = f"Trim the file to {size} bytes"
        if callable(self.policy):
            ok = bool(self.policy(question))
        else:
            ok = True
            self.say(f"  {question}? yes")
        if ok:
            self.trim_to = size

    def _read_sb(self, off: int, replica_at: int | None = None
                 ) -> tuple[L.Superblock | None, str]:
        try:
            sb = L.Superblock.unpack(self.pm.read(off, L.SB_SIZE))
        except ValueError as e:
            return None, str(e)
        if sb.region_table_block != 1 or sb.inodes_per_cpu < 1:
            return None, "implausible fields"
        if replica_at is not None:
            why = L.replica_fits(sb, replica_at)
            if why is not None:
                return None, why
        return sb, ""

    def _other_version(self) -> int | None:
        """The version of a superblock copy that is intact but of another format."""
        for off in (0, (self.file_size // L.BLOCK - 1) * L.BLOCK):
            raw = self.pm.read(off, L.SB_SIZE)
            if raw[:8] != L.SB_MAGIC:
                continue
            (crc,) = struct.unpack_from("<I", raw, L.SB_CRC_OFF)
            if crc32c(raw[:L.SB_CRC_OFF]) != crc:
                continue
            version = L._SB.unpack_from(raw, 0)[1]
            if version not in L.READABLE_VERSIONS:
                return version
        return None

    def _write_sb_copy(self, sb: L.Superblock, off: int) -> None:
        raw = sb.pack()
        self.pm.store(off, raw)
        self.pm.persist(off, len(raw))

    def _table(self, ncpus: int | None = None) -> list[L.Region]:
        """Leading region descriptors that pass their CRC."""
        out = []
        for i in range(ncpus or L.MAX_CPUS):
            try:
                r = L.Region.unpack(self.pm.read(L.BLOCK + i * L.REGION_SIZE, L.REGION_SIZE))
            except ValueError:
                break
            if r.cpu != i:
                break
            out.append(r)
        return out

    def _sb_fits(self, sb: L.Superblock) -> bool:
        if sb.total_blocks > self.file_size // L.BLOCK:
            return False
        try:
            plan = L.plan_regions(sb.total_blocks, sb.numa_nodes, sb.cpus_per_node,
                                  sb.inodes_per_cpu, sb.features)
        except ValueError:
            return False
        return [r.descriptor() for r in self._table(sb.ncpus)] == [r.descriptor() for r in plan]

    def _salvage_sb(self) -> tuple[L.Superblock | None, str]:
        """Both copies failed: a copy whose fields fit the region table, or the table alone."""
        for off in [0] + [b * L.BLOCK for b in self._replica_blocks()]:
            raw = self.pm.read(off, L.SB_SIZE)
            if raw[:8] != L.SB_MAGIC:
                continue
            f = L._SB.unpack_from(raw, 0)
            sb = L.Superblock(total_blocks=f[3], numa_nodes=f[4], cpus_per_node=f[5],
                              inodes_per_cpu=f[6], uuid=f[8], mkfs_time_ns=f[9], clean=0,
                              flags=f[11], mount_count=f[12], next_seq=f[13],
                              last_mount_ns=f[14], last_unmount_ns=f[15],
                              label=f[16].rstrip(b"\0"), version=f[1],
                              features=f[17] if f[1] >= 3 else 0)
            if 1 <= sb.ncpus <= L.MAX_CPUS and f[1] in L.READABLE_VERSIONS and \
                    not sb.features & ~L.KNOWN_FEATURES and \
                    f[2] == L.BLOCK and f[7] == 1 and self._sb_fits(sb):
                return sb, "taken from the damaged copy, confirmed by the region table"
        table = self._table()
        if not table:
            return None, ""
        nodes = table[-1].node + 1
        if len(table) % nodes:
            return None, ""
        ipc = table[0].itable_blocks * L.INODES_PER_BLOCK
        # Inode replicas show in the descriptors: a replica table lies between
        # the journal and the bitmap (SPEC 2.1).
        rep = L.FEATURE_INODE_REPLICA if table[0].bitmap_start > table[0].journal_block + 1 \
            else 0
        # The file's whole blocks, or (a file made longer) the block after the
        # last region, which is where the replica belongs.
        for total in dict.fromkeys((self.file_size // L.BLOCK, table[-1].end + 1)):
            try:
                plan = L.plan_regions(total, nodes, len(table) // nodes, ipc, rep)
            except ValueError:
                continue
            if [r.descriptor() for r in plan] == [r.descriptor() for r in table] and \
                    total <= self.file_size // L.BLOCK:
                break
        else:
            return None, ""
        features = rep | self._guess_features(total, nodes, len(table) // nodes, ipc,
                                              table[0], rep)
        root = table[0].itable_start * L.BLOCK
        try:
            made = L.InodeStatic.unpack(self.pm.read(root, 64)).ctime_ns
        except ValueError:
            made = time.time_ns()
        sb = L.Superblock(total_blocks=total, numa_nodes=nodes,
                          cpus_per_node=len(table) // nodes, inodes_per_cpu=ipc,
                          uuid=uuidlib.uuid4().bytes, mkfs_time_ns=made, clean=0, next_seq=2,
                          features=features)
        return sb, "rebuilt from the region table (label and UUID are lost)"

    def _guess_features(self, total: int, nodes: int, cpn: int, ipc: int,
                        r0: L.Region, rep: int = 0) -> int:
        """The features of an image whose superblocks are both gone: the region
        table does not record them, but mkfs puts the root directory's first
        log page at the first data block of CPU 0, and a compaction moves it
        past that; the default set when nothing tells."""
        head = self.pm.read_u64(r0.itable_start * L.BLOCK + L.I_LOG_HEAD) // L.BLOCK
        data = L.FEATURE_DATA_CSUM | L.FEATURE_DATA_PARITY
        cands = (data, L.FEATURE_DATA_CSUM, 0)
        for f in cands:
            if L.plan_regions(total, nodes, cpn, ipc, f | rep)[0].data_start == head:
                return f
        for f in cands:
            if head >= L.plan_regions(total, nodes, cpn, ipc, f | rep)[0].data_start:
                return f
        return data

    def _quick_clean(self) -> bool:
        """Clean image without -f: print the one-line state if nothing cheap looks wrong."""
        sb = self.sb
        if sb.clean != 1 or self.found or not self._sb_fits(sb):
            return False
        regions = self.regions = L.plan_regions(sb.total_blocks, sb.numa_nodes,
                                                sb.cpus_per_node, sb.inodes_per_cpu,
                                                sb.features)
        files = used = total = 0
        for r in regions:
            files += int(np.count_nonzero(self._states(r) == L.STATE_LIVE))
            used += int(self._bitmap(r).sum())
            total += r.data_blocks
        self.say(f"{self.path}: clean, {files}/{sb.inodes_per_cpu * sb.ncpus} files, "
                 f"{used}/{total} blocks")
        return True

    def _states(self, r: L.Region) -> np.ndarray:
        base = r.itable_start * L.BLOCK
        words = self.pm.buf[base:base + self.sb.inodes_per_cpu * L.INODE_SIZE]
        return words.view("<u8").reshape(-1, L.INODE_SIZE // 8)[:, L.I_STATE // 8].copy()

    def _bitmap(self, r: L.Region) -> np.ndarray:
        raw = self.pm.buf[r.bitmap_start * L.BLOCK:(r.bitmap_start + r.bitmap_blocks) * L.BLOCK]
        return np.unpackbits(raw, bitorder="little")[:r.data_blocks].astype(bool)

    # ------------------------------------------------------------ pass 2: region table
    def check_regions(self) -> None:
        """Each CPU's descriptor must equal what the superblock's geometry implies."""
        sb = self.sb
        expect = L.plan_regions(sb.total_blocks, sb.numa_nodes, sb.cpus_per_node,
                                sb.inodes_per_cpu, sb.features)
        base = sb.region_table_block * L.BLOCK
        for r in expect:
            off = base + r.cpu * L.REGION_SIZE
            why = self._region_problem(off, r)
            if why and self.problem(f"region descriptor of CPU {r.cpu} {why}",
                                    "Rewrite it from the superblock's geometry", safe=True):
                if self.pm.poisoned(base, L.BLOCK):
                    # The whole block is derivable (zero past the last descriptor):
                    # rewriting it whole clears the poisoned sectors.
                    table = b"".join(x.pack() for x in expect).ljust(L.BLOCK, b"\0")
                    self.pm.store(base, table)
                    self.pm.persist(base, L.BLOCK)
                else:
                    self.pm.store(off, r.pack())
                    self.pm.persist(off, L.REGION_SIZE)
        self.regions = expect

    def _region_problem(self, off: int, r: L.Region) -> str | None:
        """What is wrong with the descriptor at ``off`` (expected: ``r``), or None."""
        if self.pm.poisoned(off, L.REGION_SIZE):
            return "has a media error"
        try:
            got = L.Region.unpack(self.pm.read(off, L.REGION_SIZE))
        except ValueError:
            return "fails its checksum"
        if got.descriptor() == r.descriptor():
            return None
        if (got.start, got.nblocks) != (r.start, r.nblocks):
            return f"says blocks {got.start}-{got.end - 1}, expected {r.start}-{r.end - 1}"
        return "does not match the geometry"

    # ------------------------------------------------------------ pass 3: journals
    def _is_inode_word(self, addr: int) -> bool:
        return L.is_journaled_word(addr, self.regions, self.sb.inodes_per_cpu,
                                   self.sb.version)

    def check_journals(self) -> None:
        """Lite journals: closed, or (dirty image) an intact transaction mount rolls back."""
        if self.sb.inode_replicas:
            self.rtables = L.replica_tables(self.regions)
        for r in self.regions:
            j = Journal(self.pm, r.journal_block, self._replica_of,
                        L.journal_twin(self.regions, r.cpu))
            where = f"lite journal of CPU {r.cpu} (block {r.journal_block})"
            try:
                recs = j.pending()
                why = None
                if recs and not all(self._is_inode_word(a) for a, _ in recs):
                    why = "points outside the inode tables"
            except JournalError as e:
                recs, why = None, str(e)
            if why is None and not recs:
                continue
            if self.clean:
                # A clean unmount commits everything: mount ignores this journal, and a
                # later crash would roll back words that were long committed.
                what = (f"{where} is damaged ({why})" if why is not None else
                        f"{where} holds an open transaction although the image was "
                        "cleanly unmounted")
                if self.problem(what, "Close it", safe=True):
                    self._clear_journal(j)
                continue
            if why is not None:
                if self.problem(f"{where} is damaged ({why}); mount refuses such an image",
                                "Discard the unfinished transaction", safe=False):
                    self._clear_journal(j)
                continue
            # A crash in the middle of a multi-inode operation: normal.  Look at the
            # image the way mount will, after the rollback.
            self.notes.append(f"{self.path}: the {where} holds an unfinished operation "
                              f"({len(recs)} words); mount rolls it back" +
                              (" from the twin of its records (the records themselves are "
                               "damaged)" if j.from_twin else ""))
            for addr, old in reversed(recs):
                self.overlay[addr] = old
                twin = self._replica_of(addr)
                if twin is not None:
                    self.overlay[twin] = old
            if not self.readonly:
                self.pending_rollback.append(j)

    def _clear_journal(self, j: Journal) -> None:
        # With twins, the second half of the block is the previous CPU's twin
        # (SPEC 8.1), which a rollback of that CPU may still need: only this
        # journal's own part is cleared.
        own = L.BLOCK if L.journal_twin(self.regions, 0) is None else L.J_TWIN
        if self.pm.poisoned(j.base, own):
            self.pm.store_zero(j.base, own)              # whole sectors: clears the poison
            self.pm.persist(j.base, own)
        else:
            self.pm.store_u64(j.base, 0)
            self.pm.persist(j.base, 8)
        self.wrote = True

    # ------------------------------------------------------------ pass 3b: inode replicas
    def check_replicas(self) -> None:
        """Each inode slot against its replica (SPEC 5.5): the copy mount would
        keep is the one the later passes read; a damaged copy is rewritten
        from the other.  Copies that differ only by an update a crash
        interrupted are normal on a dirty image (mount settles them)."""
        if not self.sb.inode_replicas:
            return
        pm, n = self.pm, self.sb.inodes_per_cpu
        saved = saved_bitmap_reader(pm, self.regions) if self.clean else None
        judge = Judge(pm, self.regions, self.sb.total_blocks, self._u64, saved,
                      twins=self.sb.log_replicas,
                      dir_logs=self.sb.version >= L.DIR_LOGS_VERSION)
        for r in self.regions:
            p0, r0 = r.itable_start * L.BLOCK, self.rtables[r.cpu]
            for i in differing_slots(pm, p0, r0, n):
                ino = 1 + i * self.sb.ncpus + r.cpu
                p, q = p0 + i * L.INODE_SIZE, r0 + i * L.INODE_SIZE
                if pm.read(p, L.INODE_SIZE) == pm.read(q, L.INODE_SIZE) and \
                        not pm.poisoned(p, L.INODE_SIZE) and not pm.poisoned(q, L.INODE_SIZE):
                    continue                     # made equal by a sector's repair
                keep, why_p, why_r = judge.choose(ino, p, q)
                crash = not self.clean and (why_p or why_r or "").startswith(USABLE)
                if crash:
                    # An update a crash interrupted between the two copies:
                    # normal after a crash, and settled as mount settles it.
                    if keep == "replica":
                        self.slot_src[p] = q
                    if not self.readonly:
                        self._prepare_write()
                        copy_slot(pm, *((q, p) if keep == "replica" else (p, q)))
                        pm.fence()
                        self.slot_src.pop(p, None)
                elif keep == "replica":
                    self.slot_src[p] = q
                    why = why_p.removeprefix(USABLE)
                    if self.problem(f"inode {ino}: its slot is damaged ({why}); the replica "
                                    "reads", "Restore the slot from its replica", safe=True):
                        self._prepare_write()
                        copy_slot(pm, q, p)
                        pm.fence()
                        del self.slot_src[p]
                elif keep == "primary":
                    why = (why_r or "it differs from the slot").removeprefix(USABLE)
                    if self.problem(f"inode {ino}: the replica of its slot is damaged ({why})",
                                    "Rewrite it from the slot", safe=True):
                        self._prepare_write()
                        copy_slot(pm, p, q)
                        pm.fence()
                # neither copy reads: the inode pass reports the slot

    # ------------------------------------------------------------ pass 4: inodes and logs
    def check_inodes(self) -> None:
        """State words, static lines, log chains and entries of every inode in use."""
        sb = self.sb
        slots: list[tuple[int, int]] = []
        over = {a for a in self.overlay}
        for r in self.regions:
            base = r.itable_start * L.BLOCK
            idx = set(np.flatnonzero(self._states(r) != L.STATE_FREE).tolist())
            idx |= {(a - base) // L.INODE_SIZE for a in over | set(self.slot_src)
                    if base <= a < base + sb.inodes_per_cpu * L.INODE_SIZE}
            slots.extend((1 + i * sb.ncpus + r.cpu, i) for i in idx)
        slots.sort()
        if not any(ino == L.ROOT_INO for ino, _ in slots):
            slots.insert(0, (L.ROOT_INO, 0))
        for n, (ino, _) in enumerate(slots):
            addr = self._inode_addr(ino)
            src = self.slot_src.get(addr, addr)
            state = self._u64(src + L.I_STATE)
            if state == L.STATE_FREE and ino != L.ROOT_INO:
                continue
            self.recs[ino] = self._scan(ino, addr, state, src)
            if n % 256 == 0:
                self._tick("inodes", n, len(slots))
        self._tick("inodes", 1, 1)
        self.maxseq = max([sb.next_seq - 1] + [r.maxseq for r in self.recs.values()])
        self.next_seq = self.maxseq + 1
        self._decide_fates()
        self._check_array_clashes()
        self._build_claimed()
        self._build_paths()
        for ino in sorted(self.recs):
            self._report_inode(self.recs[ino])
        if self.clean and self.sb.next_seq <= max(r.maxseq for r in self.recs.values()):
            top = max(r.maxseq for r in self.recs.values())
            if self.problem(f"superblock's next sequence number ({self.sb.next_seq}) is not "
                            f"above the highest one in use ({top})",
                            "Raise it", safe=True):
                self.sb.next_seq = top + 1
                if not self.wrote:
                    write_superblock(self.pm, self.sb)

    def _scan(self, ino: int, addr: int, state: int, src: int | None = None) -> _Rec:
        """Read inode ``ino`` (slot ``addr``) from the copy at ``src`` (default the
        slot itself: a read-only check reads a damaged slot's replica)."""
        rec = _Rec(ino, addr, state)
        src = addr if src is None else src
        try:
            if self.pm.poison and self.pm.poisoned(src, L.INODE_SIZE):
                raise ValueError("media error")
            st = L.InodeStatic.unpack(self.pm.read(src, 64))
            if stat.S_IFMT(st.mode) not in _FILE_TYPES:
                rec.static_err = f"unknown file type ({st.mode:#o})"
            elif ino == L.ROOT_INO and not stat.S_ISDIR(st.mode):
                rec.static_err = f"it is a {_ftype(st.mode)}, not a directory"
            else:
                rec.static = st
        except ValueError as e:
            rec.static_err = "its slot has a media error (poisoned sector)" \
                if str(e) == "media error" else "inode fields fail their checksum"
        if rec.static is None and ino == L.ROOT_INO:
            # The root is rebuilt rather than cleared: read its log as a directory's.
            rec.static = L.InodeStatic(stat.S_IFDIR | 0o755, 0, 0, 0, 0, 1, time.time_ns(), 1)
        rec.head = self._u64(src + L.I_LOG_HEAD)
        rec.tail = self._u64(src + L.I_LOG_TAIL)
        rec.array = self._u64(src + L.I_LOG_ARRAY)
        rec.head_twin = self._u64(src + L.I_LOG_HEAD_TWIN)
        rec.array_twin = self._u64(src + L.I_LOG_ARRAY_TWIN) if rec.array else 0
        if rec.static is not None:
            self._parse_log(rec, rec.static)
        else:
            # Cleared anyway, but learn which blocks it holds (so that they are not
            # handed out by a repair nor reported as leaked).
            for mode in (stat.S_IFREG, stat.S_IFDIR):
                self._parse_log(rec, L.InodeStatic(mode, 0, 0, 0, 0, 0, 0, 0))
                if not (rec.log_err or "").endswith("(dentry in a file log)"):
                    break
                rec.log_err = None
        return rec

    def _sane(self, e: tuple) -> None:
        """Reject decoded entries the replay would choke on (raises ValueError)."""
        t = e[0]
        if t == L.E_WRITE:
            _, _seq, pgoff, npages, block, size, _m = e
            if npages < 1 or pgoff + npages > _MAX_PAGES or size > L.MAX_FILE_SIZE:
                raise ValueError("impossible page range or size")
            if block + npages > self.sb.total_blocks:
                raise ValueError(f"blocks {block}-{block + npages - 1} lie past the device end")
            if block < 2:               # replay refuses these, so a remap would not help
                what = f"block {block} overlaps" if npages == 1 else \
                    f"blocks {block}-{block + npages - 1} overlap"
                raise ValueError(f"{what} the superblock or the region table")
        elif t == L.E_SETATTR and e[2] & L.SA_SIZE and e[6] > L.MAX_FILE_SIZE:
            raise ValueError("impossible size")

    def _parse_log(self, rec: _Rec, st: L.InodeStatic) -> None:
        """Replay the logs into an Inode; on damage remember where the good parts end.

        A directory's entries are applied while its log is walked; a file's
        global and local entries are merged by sequence number first.
        """
        ino, head, tail = rec.ino, rec.head, rec.tail
        rec.maxseq = st.create_seq
        rec.inode, rec.good_end, rec.bad_tail = None, None, False
        rec.log_pages, rec.walked, rec.global_entries = [], [], []
        rec.array_err, rec.array_clash, rec.beyond = None, False, False
        rec.lines, rec.local_walked, rec.headless, rec.reserved = {}, [], [], []
        if head == 0:
            # walk() accepts an empty log, but the engine appends after the tail
            # and needs a page there: an inode in use always has one.
            rec.log_err = "its log has no page" if tail == 0 else \
                f"log tail {tail:#x} is set but the log has no head page"
            return
        is_dir = stat.S_ISDIR(st.mode)
        inode = Inode(ino, st, head, tail)
        ch = self._walk_chain(ino, head, tail, inode.apply if is_dir else _file_entry, set(),
                              rec.head_twin)
        rec.log_err, rec.bad_tail, rec.walked = ch.err, ch.bad_tail, ch.walked
        rec.twin_fixes = list(ch.fixes)
        if self.sb.log_replicas and ch.walked and len(ch.walked) > 1 and \
                self._is_twin_of(ch.walked[1], head // L.BLOCK) and \
                rec.head_twin != ch.walked[1] * L.BLOCK:
            rec.head_twin_want = ch.walked[1] * L.BLOCK
        if rec.array:
            # Even for an inode that goes, learn which blocks its local logs hold.
            self._parse_array(rec, is_dir, set(ch.walked))
        if ch.good_end is None:
            return                          # the head page itself is unusable
        rec.log_pages, rec.good_end = ch.pages, ch.good_end
        rec.replay_static, rec.global_entries = st, ch.entries
        if is_dir and not (rec.array and not rec.array_err and rec.local_kept()):
            rec.inode = inode                    # applied as walked, in log order
            rec.maxseq = max([st.create_seq] + [e[1] for e in ch.entries])
        else:
            self._replay(rec)

    def _replay(self, rec: _Rec) -> None:
        """An inode's state: its kept global and local entries, merged by sequence
        number (a directory's local logs are version 9's).

        Exactly the engine's replay: with a log array, the global log followed
        by the local logs in CPU order, stably sorted by sequence number;
        without one (or once its local logs are dropped), the global log in
        its own order.
        """
        entries = list(rec.global_entries)
        if rec.array and not rec.array_err:
            for ch in rec.local_kept():
                entries.extend(ch.entries)
            entries.sort(key=lambda e: e[1])
        inode = Inode(rec.ino, rec.replay_static, rec.head, rec.good_end)
        try:
            for e in entries:
                inode.apply(e)
        except ValueError as e:
            if not (rec.array and not rec.array_err):
                raise
            # (two names at one position: entries of the local logs that
            # cannot belong with the global log's)
            rec.array_err = f"leads to local logs that do not fit the inode's log ({e})"
            self._replay(rec)
            return
        rec.inode = inode
        rec.maxseq = max([rec.replay_static.create_seq] + [e[1] for e in entries])

    def _walk_chain(self, ino: int, head: int, tail: int, check: Callable[[tuple], object],
                    other: set[int], head_twin: int = 0) -> _Chain:
        """Walk one log chain (``head`` != 0) and keep what is good of it.

        ``check`` rejects a decoded entry this chain may not hold (ValueError
        or KeyError); ``other`` are blocks of the inode's other logs and of its
        log array, which no page of this chain may be.  ``head_twin`` (a byte
        offset, 0: none) is where the slot or array line says the first page's
        twin lies; both copies of every page are compared, and the writes that
        would mend a damaged copy from the other are kept in the chain's
        ``fixes``.
        """
        pm = self.pm
        ch = _Chain(head, tail)
        if not (L.BLOCK <= tail < pm.size) or tail % L.BLOCK > L.LOG_DATA or \
                (tail % L.BLOCK == 0 and tail != head):
            ch.err = f"log tail {tail:#x} is not a valid log position"
            ch.bad_tail = True
            end = self._find_end(head, ino)
            if end is None:
                ch.err += "; the head page is unusable too"
                return ch
            tail = end
        pages: list[int] = []
        seen: set[int] = set()
        checked = 0
        pos = good_end = head
        err: str | None = None
        twin = 0                            # the current page's twin (0: none)

        def check_new_pages() -> None:
            # walk() validated these pages' tails; they must also be new and in a data area
            nonlocal checked
            for b in pages[checked:]:
                if b in seen:
                    raise plog.LogError(f"log chain loops back to page {b * L.BLOCK:#x}")
                if b in other:
                    raise plog.LogError(f"log page {b * L.BLOCK:#x} is also used by another "
                                        "log of this inode")
                if not self._in_data(b):
                    raise plog.LogError(f"log page {b * L.BLOCK:#x} lies outside the data area")
                seen.add(b)
            checked = len(pages)

        try:
            for raw in plog.walk(pm, head, tail, ino, self.sb.total_blocks, pages, 0, None,
                                 head_twin // L.BLOCK, ch.fixes, True):
                if len(pages) != checked:
                    # the walk lists each page, then its twin if it has one
                    new = pages[checked:]
                    check_new_pages()
                    pos = new[0] * L.BLOCK
                    twin = new[1] if len(new) > 1 else 0
                epos = pos
                pos += len(raw)
                try:
                    e = L.decode_entry(raw)
                    self._sane(e)
                    check(e)
                except (ValueError, KeyError) as ve:
                    # A scribble that kept the checksum right: the twin's copy,
                    # if it is a good entry of the same size, is the one kept
                    # (and the walk's fix that copied the primary over it goes).
                    alt = self._twin_entry(twin, epos, len(raw), check) if twin else None
                    if alt is None:
                        name = L.ENTRY_NAMES.get(raw[0], f"type {raw[0]}")
                        raise plog.LogError(f"{name} entry at {epos:#x} is malformed "
                                            f"({ve})") from None
                    e, good = alt
                    tpos = twin * L.BLOCK + epos % L.BLOCK
                    ch.fixes[:] = [f for f in ch.fixes if f[0] != tpos]
                    ch.fixes.append((epos, good))
                ch.entries.append(e)
                good_end = pos
            check_new_pages()
        except plog.LogError as le:
            err = str(le)
        ch.walked = list(dict.fromkeys(pages))
        valid: list[int] = []
        kept: set[int] = set()
        for b in pages:                     # the prefix of the chain that can be kept
            if b in kept or b in other or not self._in_data(b):
                break
            valid.append(b)
            kept.add(b)
        if err:
            ch.err = f"{ch.err}; {err}" if ch.bad_tail else err
        if not valid:
            return ch
        # good_end only advanced on pages already checked, so it lies in ``valid``
        # (followed by its twin).
        end = valid.index(good_end // L.BLOCK) + 1
        if end < len(valid) and self._is_twin_of(valid[end], valid[end - 1]):
            end += 1
        ch.pages = valid[:end]
        ch.good_end = good_end
        return ch

    def _is_twin_of(self, b: int, page: int) -> bool:
        """Whether block ``b``'s page tail says it is the twin of block ``page``."""
        raw = self.pm.read(b * L.BLOCK + L.PT_NEXT, 32)
        return L.check_page_tail(raw) is None and L.page_tail_twin(raw) == page | L.TWIN_ROLE

    def _twin_entry(self, twin: int, pos: int, size: int, check: Callable[[tuple], object]
                    ) -> tuple[tuple, bytes] | None:
        """(decoded entry, raw bytes) of the copy in twin block ``twin`` of the
        entry at ``pos`` whose primary is malformed, when that copy is a good
        entry of the same size; else None."""
        t = twin * L.BLOCK + pos % L.BLOCK
        raw = bytes(self.pm.mm[t:t + size])
        if len(raw) != size or L.entry_header(raw)[2] != size or not L.entry_crc_ok(raw):
            return None
        try:
            e = L.decode_entry(raw)
            self._sane(e)
            check(e)
        except (ValueError, KeyError):
            return None
        return e, raw

    def _parse_array(self, rec: _Rec, is_dir: bool, other: set[int]) -> None:
        """The per-core log array of a file: its pointer, every line, every live local log."""
        blk = rec.array
        if not self._in_data(blk):
            rec.array_err = "lies outside the data area"
            return
        if is_dir and self.sb.version < L.DIR_LOGS_VERSION:
            rec.array_err = "is set, but a directory has only its one log"
            return
        raw = self._block_overlaid(blk)
        other = other | {blk}
        keep = 24 if self.sb.log_replicas else 16    # bytes of a line that may be set
        if rec.array_twin:
            raw = self._settle_array(rec, raw)
            if not rec.array_twin_err:
                other |= {rec.array_twin}
        theirs: set[int] = set()        # other inodes whose logs the lines lead to
        ncpus = self.sb.ncpus
        for cpu in range(ncpus):
            off = cpu * L.LA_LINE
            head, tail, head_twin = struct.unpack_from("<QQQ", raw, off + L.LA_HEAD)
            if any(raw[off + keep:off + L.LA_LINE]):
                rec.reserved.append(cpu)
            if tail == 0:
                continue                # no log, or one whose creation never committed
            if head == 0:
                rec.headless.append(cpu)
                continue
            owner = self._page_owner(head)
            if owner is not None and owner != rec.ino:
                theirs.add(owner)
            ch = self._walk_chain(rec.ino, head, tail, _local_dentry if is_dir else _local_entry,
                                  other, head_twin)
            other |= set(ch.walked)
            rec.local_walked.extend(ch.walked)
            rec.lines[cpu] = ch
        rec.beyond = any(raw[ncpus * L.LA_LINE:])
        if any(ch.good_end is not None for ch in rec.lines.values()):
            return                      # some line leads to a log of this inode
        # The engine zeroes an array before it points to it, and its lines lead
        # to pages of this inode only: otherwise the pointer itself is wrong.
        if theirs:
            rec.array_err = ("does not point to this inode's per-core log array (its lines "
                             f"lead to logs of inode {', '.join(map(str, sorted(theirs)))})")
        elif rec.reserved or rec.beyond:
            rec.array_err = ("does not point to a per-core log array (reserved bytes are set "
                             "and no line leads to a log of this inode)")

    def _settle_array(self, rec: _Rec, raw: bytes) -> bytes:
        """The lines of a per-core log array that has a twin (format 8), each from
        the copy that reads (:func:`pick_line`), as the array block's bytes;
        the writes that make both copies hold them go to ``rec.twin_fixes``."""
        tblk, n, pm = rec.array_twin, self.sb.ncpus, self.pm
        if not self._in_data(tblk):
            rec.array_twin_err = "lies outside the data area"
        elif tblk == rec.array:
            rec.array_twin_err = "is the array itself"
        if rec.array_twin_err:
            return raw
        tbase, base = tblk * L.BLOCK, rec.array * L.BLOCK
        traw = self._block_overlaid(tblk)
        tpoison = bool(pm.poison and pm.poisoned(tbase, L.BLOCK))
        if not tpoison and (any(traw[n * L.LA_LINE:]) or any(
                any(traw[c * L.LA_LINE + 24:(c + 1) * L.LA_LINE]) for c in range(n))):
            rec.array_twin_err = "is not a per-core log array (bytes it keeps zero are set)"
            return raw
        lp = [struct.unpack_from("<QQQ", raw, c * L.LA_LINE) for c in range(n)]
        lq = [struct.unpack_from("<QQQ", traw, c * L.LA_LINE) for c in range(n)]
        if all_foreign(pm, rec.ino, lq):
            rec.array_twin_err = "leads to logs of other inodes"
            return raw
        # (an array whose lines all lead elsewhere while its twin's do not: the
        # lines are taken from the twin; if the array block turns out to be
        # another inode's, the writes into it are dropped, _report_twins)
        sane = (True, True)
        out = bytearray(raw)
        good = bytearray(L.BLOCK)                # the lines as kept, the rest zero
        decided = True
        for c in range(n):
            off = c * L.LA_LINE
            p, q = lp[c], lq[c]
            bad = (bool(pm.poison and pm.poisoned(base + off, 24)),
                   bool(pm.poison and pm.poisoned(tbase + off, 24)))
            which, damaged = 0, False
            if p != q or any(bad):
                which, damaged = pick_line(pm, rec.ino, p, q, self.sb.total_blocks, bad, sane)
            chosen = (p, q)[which]
            struct.pack_into("<QQQ", good, off, *chosen)
            out[off:off + 24] = good[off:off + 24]
            if damaged is None:
                decided = False                  # neither copy is written over the other
                continue
            if which == 1:
                rec.twin_fixes.append((base + off, bytes(good[off:off + 24])))
            elif q != chosen and not tpoison:
                rec.twin_fixes.append((tbase + off, bytes(good[off:off + 24])))
        if tpoison and decided:                  # rewritten whole, which clears it
            rec.twin_fixes.append((tbase, bytes(good)))
        return bytes(out)

    def _put_line(self, rec: _Rec, off: int, value: int) -> None:
        """Store a word of a per-core log array (byte ``off`` of the block) in the
        array and in its twin."""
        self._put_u64(rec.array * L.BLOCK + off, value)
        if rec.array_twin and not rec.array_twin_err:
            self._put_u64(rec.array_twin * L.BLOCK + off, value)

    def _page_owner(self, head: int) -> int | None:
        """The owner a well-formed log page at ``head`` names, else None."""
        if head % L.BLOCK or not (L.BLOCK <= head < self.pm.size):
            return None
        tail = self.pm.mm[head + L.PT_NEXT:head + L.BLOCK]
        if L.check_page_tail(tail) is not None:
            return None
        return self.pm.read_u64(head + L.PT_OWNER)

    def _find_end(self, head: int, ino: int) -> int | None:
        """With no trustworthy tail: the position after the last valid entry from head."""
        pm, mm, dev = self.pm, self.pm.mm, self.pm.size
        if head % L.BLOCK or not (L.BLOCK <= head < dev) or \
                L.check_page_tail(mm[head + L.PT_NEXT:head + L.BLOCK], ino):
            return None
        page = pos = head
        seen = {head}
        while True:
            inp = pos - page
            if inp < L.LOG_DATA:
                etype, _f, size, _c = L.entry_header(mm, pos)
                if not (etype == L.E_NEXT_PAGE and size == 8):
                    if size < 8 or size % 8 or inp + size > L.LOG_DATA:
                        return pos
                    raw = mm[pos:pos + size]
                    if not L.entry_crc_ok(raw):
                        return pos
                    try:
                        L.decode_entry(raw)
                    except ValueError:
                        return pos
                    pos += size
                    continue
            nxt = pm.read_u64(page + L.PT_NEXT)
            if nxt == 0 or nxt % L.BLOCK or not (L.BLOCK <= nxt < dev) or nxt in seen or \
                    L.check_page_tail(mm[nxt + L.PT_NEXT:nxt + L.BLOCK], ino):
                return pos
            seen.add(nxt)
            page = pos = nxt

    def _decide_fates(self) -> None:
        """Which slots stay in use: bad static/log -> clear; bad state -> in use iff named."""
        for rec in self.recs.values():
            if rec.ino == L.ROOT_INO:
                continue                    # the root is always kept (rebuilt if needed)
            if rec.static is None or rec.good_end is None:
                rec.fate = "clear"
        garbage = {r.ino for r in self.recs.values()
                   if r.state not in (L.STATE_FREE, L.STATE_LIVE) and r.fate == "live"
                   and r.ino != L.ROOT_INO}
        live = [i for i, r in self.recs.items() if r.fate == "live" and i not in garbage]
        named: set[int] = set()
        while live:                          # a rescued directory may name more of them
            d = self.recs[live.pop()].inode
            if d is None or d.dents is None:
                continue
            for c, _t, _k in d.dents.values():
                if c in garbage and c not in named:
                    named.add(c)
                    live.append(c)
        for g in garbage - named:
            self.recs[g].fate = "clear"

    def _check_array_clashes(self) -> None:
        """A log array block may be used by nothing else: else its pointer is cleared.

        An array has no checksum that could tell which user is right, while
        log pages carry their owner and data pages are checked later, so the
        array is the one that goes (its local logs with it).
        """
        live = self._live()
        used: dict[int, str] = {}
        for rec in live:
            for b, what in rec.meta_blocks():
                if what == "log page":
                    used.setdefault(b, f"a log page of inode {rec.ino}")
            if rec.inode is not None and rec.inode.pages:
                for b in rec.inode.pages.values():
                    used.setdefault(b, f"a data page of inode {rec.ino}")
        for rec in live:
            if not rec.array or rec.array_err:
                continue
            what = used.get(rec.array)
            if what is None:
                used[rec.array] = f"the per-core log array of inode {rec.ino}"
                if rec.array_twin and not rec.array_twin_err:
                    twhat = used.get(rec.array_twin)
                    if twhat is None:
                        used[rec.array_twin] = f"the per-core log array twin of inode {rec.ino}"
                    else:
                        rec.array_twin_err = f"is also {twhat}"
                continue
            rec.array_err = f"is also {what}"
            rec.array_clash = True
            if rec.replay_static is not None and rec.good_end is not None:
                self._replay(rec)           # its state without the local logs

    def _live(self) -> list[_Rec]:
        return [self.recs[i] for i in sorted(self.recs) if self.recs[i].fate == "live"]

    def _build_claimed(self) -> None:
        """Blocks a repair must not take: everything any scanned inode points at."""
        total = self.sb.total_blocks
        claimed = np.zeros(total, dtype=bool)
        for rec in self.recs.values():
            for b in rec.walked:
                claimed[b] = True
            for b in rec.local_walked:
                claimed[b] = True
            if 0 < rec.array < total:
                claimed[rec.array] = True
            if 0 < rec.array_twin < total:
                claimed[rec.array_twin] = True
            if rec.inode is not None and rec.inode.pages:
                for b in rec.inode.pages.values():
                    claimed[b] = True
        if self.clean:
            for r in self.regions:
                claimed[r.data_start:r.end] |= self._bitmap(r)
        self.claimed = claimed
        # Blocks the planned repairs stop using (not reported again as leaks).
        for rec in self.recs.values():
            live = rec.fate == "live"
            kept = {b for b, _ in rec.meta_blocks()} if live else set()
            self.released.update(b for b in rec.walked if b not in kept)
            self.released.update(b for b in rec.local_walked if b not in kept)
            if rec.array and rec.array not in kept and not rec.array_clash:
                self.released.add(rec.array)
            if rec.array_twin and rec.array_twin not in kept and 0 < rec.array_twin < total \
                    and self._in_data(rec.array_twin):
                self.released.add(rec.array_twin)
            if not live and rec.inode is not None and rec.inode.pages:
                self.released.update(rec.inode.pages.values())

    def _build_paths(self) -> None:
        """Best-effort '/a/b' names for messages (first name found from the root)."""
        self.paths = {L.ROOT_INO: "/"}
        q = deque([L.ROOT_INO])
        while q:
            p = q.popleft()
            rec = self.recs.get(p)
            if rec is None or rec.inode is None or rec.inode.dents is None:
                continue
            for name in sorted(rec.inode.dents):
                c = rec.inode.dents[name][0]
                if c in self.paths:
                    continue
                base = self.paths[p]
                self.paths[c] = base.rstrip("/") + "/" + name.decode("utf-8", "replace")
                q.append(c)

    def _declined(self, rec: _Rec) -> None:
        """A repair of this inode was refused: leave its log and its names alone."""
        if not self.readonly:          # read-only: report as if every repair were made
            rec.frozen = True

    def _report_inode(self, rec: _Rec) -> None:
        ino, desc = rec.ino, self._desc(rec.ino)
        if ino == L.ROOT_INO:
            self._report_root(rec)
            return
        if rec.state not in (L.STATE_FREE, L.STATE_LIVE):
            named = rec.fate == "live"
            fix = "Mark it in use (a directory names it)" if named else "Mark it free"
            if self.problem(f"inode {ino} has a bad state word ({rec.state:#x})", fix,
                            safe=False):
                self._put_u64(rec.addr + L.I_STATE, L.STATE_LIVE if named else L.STATE_FREE)
            else:
                self._declined(rec)
            if not named:
                return
        if rec.static_err:
            if self.problem(f"{desc}: {rec.static_err}", "Clear the inode", safe=False):
                self._put_u64(rec.addr + L.I_STATE, L.STATE_FREE)
            else:
                self._declined(rec)
            return
        self._report_twins(rec)
        if rec.log_err is not None:
            if rec.good_end is None:
                if self.problem(f"{desc}: {rec.log_err}", "Clear the inode (its log is lost)",
                                safe=False):
                    self._put_u64(rec.addr + L.I_STATE, L.STATE_FREE)
                else:
                    self._declined(rec)
                return
            fix = "Set the log tail after the last valid entry" if rec.bad_tail else \
                "Truncate the log after the last good entry"
            if self.problem(f"{desc}: {rec.log_err}", fix, safe=False):
                self._put_u64(rec.addr + L.I_LOG_TAIL, rec.good_end)
                rec.tail = rec.good_end
            else:
                self._declined(rec)
        self._report_array(rec)

    def _report_array(self, rec: _Rec) -> None:
        """The per-core log array of a kept inode: pointer, lines, local logs."""
        if not rec.array:
            return
        desc = self._desc(rec.ino)
        if rec.array_err:
            if self.problem(f"{desc}: per-core log array pointer (block {rec.array}) "
                            f"{rec.array_err}", "Clear the pointer (the per-core logs it "
                            "leads to are lost)", safe=False):
                self._put_u64(rec.addr + L.I_LOG_ARRAY, 0)
                if rec.array_twin:
                    self._put_u64(rec.addr + L.I_LOG_ARRAY_TWIN, 0)
            else:
                self._declined(rec)
            return
        if rec.array_twin_err:
            if self.problem(f"{desc}: the twin of its per-core log array (block "
                            f"{rec.array_twin}) {rec.array_twin_err}", "Clear that pointer "
                            "(the array keeps one copy)", safe=True):
                self._put_u64(rec.addr + L.I_LOG_ARRAY_TWIN, 0)
                rec.array_twin = 0
        base = rec.array * L.BLOCK
        where = f"{desc}: per-core log array (block {rec.array})"
        for cpu in rec.headless:
            line = base + cpu * L.LA_LINE
            # Ignored by replay, but a later head store would make it a live log.
            if self.problem(f"{where}: the line of CPU {cpu} has a tail "
                            f"({self.pm.read_u64(line + L.LA_TAIL):#x}) but no head",
                            "Clear that tail", safe=True):
                self._put_line(rec, cpu * L.LA_LINE + L.LA_TAIL, 0)
        for cpu, ch in sorted(rec.lines.items()):
            if ch.err is None:
                continue
            new = ch.new_tail
            fix = "Drop that log (nothing in it can be used)" if new == 0 else \
                "Set its tail after the last valid entry" if ch.bad_tail else \
                "Truncate it after the last good entry"
            if self.problem(f"{desc}: per-core log of CPU {cpu}: {ch.err}", fix, safe=False):
                self._put_line(rec, cpu * L.LA_LINE + L.LA_TAIL, new)
            else:
                self._declined(rec)
        if rec.reserved or rec.beyond:
            what = []
            if rec.reserved:
                cpus = ", ".join(map(str, rec.reserved))
                what.append(f"reserved bytes of the line(s) of CPU {cpus}")
            if rec.beyond:
                what.append("bytes past the last CPU's line")
            if self.problem(f"{where}: {' and '.join(what)} are not zero", "Zero them",
                            safe=True):
                self._prepare_write()
                pm = self.pm
                keep = 24 if self.sb.log_replicas else 16
                spans = [(base + cpu * L.LA_LINE + keep, L.LA_LINE - keep)
                         for cpu in rec.reserved]
                if rec.beyond:
                    end = self.sb.ncpus * L.LA_LINE
                    spans.append((base + end, L.BLOCK - end))
                for off, n in spans:
                    pm.store_zero(off, n)
                    pm.flush(off, n)
                pm.fence()

    def _report_twins(self, rec: _Rec) -> None:
        """Log pages of which one copy is damaged (format 8's twins): the other
        copy is written over it (a safe repair: both copies held the same)."""
        if rec.head_twin_want is not None:
            if self.problem(f"{self._desc(rec.ino)}: its slot names {rec.head_twin:#x} as the "
                            "twin of its first log page, which names "
                            f"{rec.head_twin_want:#x}", "Set the slot's word to the page's",
                            safe=True):
                self._put_u64(rec.addr + L.I_LOG_HEAD_TWIN, rec.head_twin_want)
        fixes = list(rec.twin_fixes)
        if rec.array and not rec.array_err:
            for ch in rec.local_kept():
                fixes.extend(ch.fixes)
        # nothing is written into an array (or twin) whose pointer is wrong: the
        # block may be another inode's
        for blk, err in ((rec.array, rec.array_err), (rec.array_twin, rec.array_twin_err)):
            if blk and err:
                fixes = [f for f in fixes if not blk * L.BLOCK <= f[0] < (blk + 1) * L.BLOCK]
        if not fixes:
            return
        where = ", ".join(f"{off:#x}" for off, _ in fixes[:4]) + \
            (f" and {len(fixes) - 4} more" if len(fixes) > 4 else "")
        if self.problem(f"{self._desc(rec.ino)}: {len(fixes)} piece(s) of its log pages are "
                        f"damaged in one copy (at {where})",
                        "Restore them from the other copy", safe=True):
            self._prepare_write()
            plog.repair(self.pm, fixes)

    def _report_root(self, rec: _Rec) -> None:
        """The root can't be cleared: rebuild its static line / log / state instead."""
        self._report_twins(rec)
        if rec.static_err:
            if self.problem(f"the root directory (inode 1): {rec.static_err}",
                            "Rebuild the root inode", safe=False):
                st = L.InodeStatic(stat.S_IFDIR | 0o755, 0, 0, 0, 0, 1, time.time_ns(), 1)
                self._prepare_write()
                for a in (rec.addr, self._replica_of(rec.addr)):
                    if a is not None:
                        self.pm.store(a, st.pack())
                        self.pm.persist(a, 64)
        if rec.log_err is not None:
            if rec.good_end is None:
                if self.problem(f"the root directory (inode 1): {rec.log_err}",
                                "Give the root directory a new empty log", safe=False):
                    page, twin = self._alloc_pair()
                    self._prepare_write()
                    plog.init_page(self.pm, page, L.ROOT_INO, twin)
                    self.pm.fence()
                    self._put_u64(rec.addr + L.I_LOG_HEAD_TWIN, twin * L.BLOCK)
                    self._put_u64(rec.addr + L.I_LOG_HEAD, page * L.BLOCK)
                    self._put_u64(rec.addr + L.I_LOG_TAIL, page * L.BLOCK)
                    rec.log_pages = [page] + ([twin] if twin else [])
                    rec.head = rec.tail = page * L.BLOCK
                else:
                    rec.head = rec.tail = 0
                    self._declined(rec)
                rec.inode = Inode(L.ROOT_INO, rec.static, rec.head, rec.tail)
                rec.good_end = rec.tail
            else:
                fix = "Set the log tail after the last valid entry" if rec.bad_tail else \
                    "Truncate the log after the last good entry"
                if self.problem(f"the root directory (inode 1): {rec.log_err}", fix,
                                safe=False):
                    self._put_u64(rec.addr + L.I_LOG_TAIL, rec.good_end)
                    rec.tail = rec.good_end
                else:
                    self._declined(rec)
        if rec.state != L.STATE_LIVE:
            what = "is not marked in use" if rec.state == L.STATE_FREE else \
                f"has a bad state word ({rec.state:#x})"
            if self.problem(f"the root directory (inode 1) {what}", "Mark it in use",
                            safe=False):
                self._put_u64(rec.addr + L.I_STATE, L.STATE_LIVE)
        rec.fate = "live"
        self._report_array(rec)

    # ------------------------------------------------------------ pass 5: block ownership
    def check_blocks(self) -> None:
        """Every page of every kept inode in a data area and owned exactly once."""
        owner = np.zeros(self.sb.total_blocks, dtype=np.int64)
        where: dict[int, int] = {}          # block -> page of its first owner (data pages)
        remap: dict[int, list[tuple[int, int, bool]]] = {}   # ino -> [(pgoff, block, copy)]
        meta: dict[int, str] = {}           # block -> 'log page' or 'per-core log array'
        live = self._live()
        for rec in live:
            # Log chains were validated (in bounds, no loops, one owner per page) and
            # arrays clashing with anything were dropped: each block is listed once.
            for b, what in rec.meta_blocks():
                owner[b] = rec.ino
                meta[b] = what
        for n, rec in enumerate(live):
            pages = rec.inode.pages if rec.inode is not None else None
            if not pages:
                continue
            for pg in sorted(pages):
                b = pages[pg]
                desc = self._desc(rec.ino)
                if not self._in_data(b):
                    if self.problem(f"{desc}: page {pg} points to block {b}, outside the "
                                    "data area", "Replace it with a zeroed block", safe=False):
                        remap.setdefault(rec.ino, []).append((pg, b, False))
                    continue
                o = int(owner[b])
                if o == 0:
                    owner[b] = rec.ino
                    where[b] = pg
                    continue
                first = where.get(b)
                stale = self._stale_user(self.recs[o], rec) if first is not None else None
                if stale is not None:
                    # A cut log brought back a mapping to a block its inode had
                    # let go, which another inode now uses: the cut one gets zeros
                    # (never the other inode's data).
                    spg = first if stale == o else pg
                    msg = (f"block {b} used by inode {o} (page {first}) and inode {rec.ino} "
                           f"(page {pg}); inode {stale}'s log was cut, so its mapping is stale")
                    if self.problem(msg, f"Give inode {stale} a zeroed block instead",
                                    safe=False):
                        remap.setdefault(stale, []).append((spg, b, False))
                        if stale == o:
                            owner[b] = rec.ino
                            where[b] = pg
                    continue
                if first is None:
                    what = meta.get(b, "log page")
                    whose = "its own" if o == rec.ino else "another inode's"
                    into = "log" if what == "log page" else what
                    msg = (f"block {b} used by inode {o} ({what}) and inode {rec.ino} "
                           f"(page {pg}): {desc} points into {whose} {into}")
                    fix, copy = "Give it a zeroed block instead", False
                else:
                    msg = f"block {b} used by inode {o} (page {first}) and inode {rec.ino} " \
                        f"(page {pg})"
                    fix, copy = f"Give inode {rec.ino} its own copy", True
                if self.problem(msg, fix, safe=False):
                    remap.setdefault(rec.ino, []).append((pg, b, copy))
            if n % 256 == 0:
                self._tick("blocks", n, len(live))
        self._tick("blocks", 1, 1)
        self.owner = owner
        for ino, items in remap.items():
            self._remap(self.recs[ino], items)

    # ------------------------------------------------------------ pass 5b: data protection
    def _protection(self) -> DataProtection:
        if getattr(self, "prot", None) is None or self.prot.pm is not self.pm:
            self.prot = DataProtection(self.pm, self.sb, self.regions)
        return self.prot

    def check_data(self) -> None:
        """Every strip of every file data block against its checksums (SPEC 9.1):
        rebuild a single bad strip from the parity, rewrite a checksum copy or a
        parity strip that disagrees with good data (safe repairs), and report,
        by path, the bytes that cannot be rebuilt (zeroed, with new checksums,
        only if the user agrees: their contents are lost either way)."""
        if not self.sb.data_csum:
            return
        prot = self._protection()
        if not self.paths:
            self._build_paths()
        live = [r for r in self._live() if r.inode is not None and r.inode.pages]
        checked = 0
        for n, rec in enumerate(live):
            for pg in sorted(rec.inode.pages):
                b = rec.inode.pages[pg]
                if not self._in_data(b) or self.owner[b] != rec.ino:
                    continue                     # reported (and remapped) by check_blocks
                checked += 1
                found = prot.examine(b, repair=False)
                if found.ok:
                    continue
                desc = self._desc(rec.ino)
                if found.bad:
                    ranges = strip_ranges(pg * L.BLOCK, found.bad)
                    if self.problem(f"{desc}: bytes {ranges} are damaged beyond repair "
                                    f"(data block {b}; reads answer EIO)",
                                    "Replace them with zeros (their contents are lost)",
                                    safe=False):
                        self._zero_strips(b, found.bad)
                    continue
                if self.problem(f"{desc}: data block {b} (page {pg}): "
                                f"{_repairs(found)}",
                                "Repair it from the parity and the checksum copies",
                                safe=True):
                    self._prepare_write()
                    done = self._protection().examine(b, repair=True)
                    assert not done.bad
            if n % 256 == 0:
                self._tick("data", n, len(live))
        self._tick("data", 1, 1)
        self.data_blocks_checked = checked

    def _zero_strips(self, block: int, strips: list[int]) -> None:
        """Zero strips whose data is lost and give the block new checksums and
        parity (the block stays in its file; fsck runs with the image offline)."""
        self._prepare_write()
        pm = self.pm
        for k in strips:
            pm.store_zero(block * L.BLOCK + k * L.STRIP, L.STRIP)
        pm.flush(block * L.BLOCK, L.BLOCK)
        self._protection().seal(block, 1)
        pm.fence()

    @staticmethod
    def _stale_user(a: _Rec, b: _Rec) -> int | None:
        """Of two inodes mapping one data block, the one whose log was cut (if only one)."""
        if a.cut == b.cut:
            return None
        return a.ino if a.cut else b.ino

    def _remap(self, rec: _Rec, items: list[tuple[int, int, bool]]) -> None:
        """Point pages at fresh blocks (copies or zeros) with appended write entries."""
        pm = self.pm
        inode = rec.inode
        entries = []
        self._prepare_write()
        for pg, old, copy in items:
            nb = self._alloc_block()
            dst = nb * L.BLOCK
            if copy:
                pm.store_copy(dst, old * L.BLOCK, L.BLOCK)
            else:
                pm.store_zero(dst, L.BLOCK)
            pm.flush(dst, L.BLOCK)
            self._protection().seal(nb, 1)
            entries.append((L.E_WRITE, self._seq(), pg, 1, nb, inode.size, inode.mtime))
        self._append(rec, entries)

    # ------------------------------------------------------------ pass 6: saved bitmaps
    def check_bitmaps(self) -> None:
        """Clean image: the saved allocator bitmaps must equal the blocks in use."""
        if not self.clean:
            self.info("image was not cleanly unmounted: saved bitmaps are not checked "
                      "(mount rebuilds them)")
            return
        skip = self.released | self.allocated
        for r in self.regions:
            if self.pm.poisoned(r.bitmap_start * L.BLOCK, r.bitmap_blocks * L.BLOCK):
                if self.problem(f"saved allocation bitmap of CPU {r.cpu} has a media error "
                                "(mount rebuilds it from the logs)",
                                "Rebuild the allocation bitmaps", safe=True):
                    self.rebuild_alloc = True
                    self.deferred += 1
                continue
            saved = self._bitmap(r)
            used = self.owner[r.data_start:r.end] != 0
            leaked = [r.data_start + int(i) for i in np.flatnonzero(saved & ~used)]
            lost = [r.data_start + int(i) for i in np.flatnonzero(used & ~saved)]
            leaked = [b for b in leaked if b not in skip]
            lost = [b for b in lost if b not in skip]
            if leaked:
                one = len(leaked) == 1
                msg = (f"block {leaked[0]} is marked in use but nothing owns it (leak)" if one
                       else f"blocks {_ranges(leaked)} are marked in use but nothing owns "
                       f"them (leak)")
                if self.problem(msg, "Rebuild the allocation bitmaps", safe=True):
                    self.rebuild_alloc = True
                    self.deferred += 1
            if lost:
                users = sorted({int(self.owner[b]) for b in lost})
                msg = (f"block {lost[0]} is used by inode {users[0]} but marked free"
                       if len(lost) == 1 else
                       f"blocks {_ranges(lost)} are in use (by inode(s) "
                       f"{', '.join(map(str, users[:10]))}) but marked free")
                if self.problem(msg, "Rebuild the allocation bitmaps", safe=True):
                    self.rebuild_alloc = True
                    self.deferred += 1

    # ------------------------------------------------------------ pass 7: directory tree
    def check_tree(self) -> None:
        """Dentries, one name per directory, '..', loops, reachability, orphans."""
        live = {r.ino: r for r in self._live()}
        dirs = {i for i, r in live.items() if r.inode.dents is not None}
        # Unlinked directories (link count 0, named nowhere) are orphans; their
        # entries do not count.  Iterate: dropping one may orphan another.
        kept = set(dirs)
        while True:
            refd = {c for p in kept for c, _t, _k in live[p].inode.dents.values()}
            orph = {d for d in kept if d != L.ROOT_INO and live[d].inode.nlink == 0
                    and d not in refd}
            if not orph:
                break
            kept -= orph
        edges = self._check_dentries(live, kept)
        # Give each directory one parent, preferring the one its '..' names.
        parent: dict[int, tuple[int, bytes]] = {}
        reached = {L.ROOT_INO}
        attached: set[int] = set()          # tops of detached subtrees -> /lost+found
        cut: set[int] = set()               # loop members whose names all go

        def spread(start: int) -> None:
            queue: deque[int] = deque([start])
            later: deque[tuple[int, bytes, int]] = deque()
            while True:
                while queue:
                    p = queue.popleft()
                    for name, c in edges.get(p, ()):
                        if c in reached or c not in kept:
                            continue
                        if live[c].inode.parent == p:
                            reached.add(c)
                            parent[c] = (p, name)
                            queue.append(c)
                        else:
                            later.append((p, name, c))
                while later and later[0][2] in reached:
                    later.popleft()
                if not later:
                    return
                p, name, c = later.popleft()
                reached.add(c)
                parent[c] = (p, name)
                queue.append(c)

        spread(L.ROOT_INO)
        # Directories the root does not reach: detached subtrees, then loops.
        while True:
            lost = sorted(d for d in kept if d not in reached)
            if not lost:
                break
            lost_set = set(lost)
            into: dict[int, int] = {}       # lost dir -> a lost dir naming it
            for p in lost:
                for _n, c in edges.get(p, ()):
                    if c in lost_set:
                        into.setdefault(c, p)
            tops = [d for d in lost if d not in into]
            if tops:
                top = tops[0]
                if self.problem(f"{self._desc(top)} is not referenced by any directory",
                                "Connect it to /lost+found", safe=True):
                    self._defer_reconnect(top)
            else:
                d, path = lost[0], []
                while d not in path:
                    path.append(d)
                    d = into[d]
                loop = sorted(path[path.index(d):])
                top = loop[0]
                if self.problem(f"directories {', '.join(map(str, loop))} form a loop that "
                                "is not connected to the root",
                                f"Disconnect directory {top} and connect it to /lost+found",
                                safe=False):
                    self._defer_reconnect(top)
                    cut.add(top)
            attached.add(top)
            reached.add(top)
            spread(top)
        # Every other name of a directory goes.
        removals: dict[int, list[tuple]] = {}
        for p in sorted(kept):
            for name, c in edges.get(p, ()):
                if c not in kept or parent.get(c) == (p, name):
                    continue
                rm = (L.E_DENTRY, 0, L.D_REMOVE, name, 0, 0, live[p].inode.mtime)
                if c in cut:
                    removals.setdefault(p, []).append(rm)
                    continue
                if c in attached:
                    continue                # its loop repair was declined
                shown = self.paths.get(p, f"<directory {p}>").rstrip("/") + "/" + \
                    name.decode("utf-8", "replace")
                why = "; it names itself" if c == p else \
                    "; this name makes a loop" if self._is_below(p, c, parent) else ""
                if self.problem(f"{self._desc(c)} is also entered as '{shown}'; a directory "
                                f"can have only one name{why}", "Remove that entry",
                                safe=False):
                    removals.setdefault(p, []).append(rm)
        for p, entries in removals.items():
            self._append(live[p], [e[:1] + (self._seq(),) + e[2:] for e in entries])
        # '..' of every directory.
        for d in sorted(kept):
            inode = live[d].inode
            want = L.ROOT_INO if d == L.ROOT_INO else parent[d][0] if d in parent else None
            if want is None or inode.parent == want or (d == L.ROOT_INO and inode.parent == 0):
                continue                    # attached ones get lost+found as parent
            if self.problem(f"{self._desc(d)}: '..' points to inode {inode.parent} instead "
                            f"of {'the root' if d == L.ROOT_INO else f'its parent {want}'}",
                            "Correct '..'", safe=True):
                self._append(live[d], [(L.E_DENTRY, self._seq(), L.D_ADD, L.DOTDOT, want,
                                        stat.S_IFDIR >> 12, inode.ctime)])
        # Expected link counts; files without a name are orphans or lost.
        names: dict[int, int] = {}
        for p in kept:
            for _n, c in edges.get(p, ()):
                if c not in dirs:
                    names[c] = names.get(c, 0) + 1
        subdirs: dict[int, int] = {}
        for c, (p, _n) in parent.items():
            subdirs[p] = subdirs.get(p, 0) + 1
        for d in kept:
            self.expected[d] = 2 + subdirs.get(d, 0)
        for ino, rec in live.items():
            if ino in kept:
                continue
            if ino in dirs:
                self._orphan(rec)
                continue
            n = names.get(ino, 0)
            if n:
                self.expected[ino] = n
            elif rec.inode.nlink == 0:
                self._orphan(rec)
            elif self.problem(f"{self._desc(ino)} is not referenced by any directory",
                              "Connect it to /lost+found", safe=True):
                self._defer_reconnect(ino)
        self._tree_paths(parent, attached)

    def _check_dentries(self, live: dict[int, _Rec], kept: set[int]
                        ) -> dict[int, list[tuple[bytes, int]]]:
        """Check every entry of every kept directory; return the valid (name, child) pairs."""
        edges: dict[int, list[tuple[bytes, int]]] = {}
        for p in sorted(kept):
            d = live[p].inode
            fixes: list[tuple] = []
            for name in sorted(d.dents):
                c, dtype, _cookie = d.dents[name]
                shown = name.decode("utf-8", "replace")
                where = f"{self._desc(p)}: entry '{shown}'"
                rm = (L.E_DENTRY, 0, L.D_REMOVE, name, 0, 0, d.mtime)
                if b"/" in name or b"\0" in name or name == b".":
                    if self.problem(f"{where} has an invalid name", "Remove the entry",
                                    safe=False):
                        fixes.append(rm)
                    continue
                if c not in live:
                    crec = self.recs.get(c)
                    if crec is not None and crec.frozen:
                        continue            # clearing it was declined: keep its name
                    why = "which does not exist" if not self._valid_ino(c) else \
                        "which is not in use"
                    if self.problem(f"{where} points to inode {c}, {why}",
                                    "Remove the entry", safe=True):
                        fixes.append(rm)
                    continue
                if c == L.ROOT_INO:
                    if self.problem(f"{where} names the root directory", "Remove the entry",
                                    safe=False):
                        fixes.append(rm)
                    continue
                real = stat.S_IFMT(live[c].inode.mode) >> 12
                if dtype != real:
                    if self.problem(f"{where} says it is a {_ftype(dtype << 12)} but inode {c} "
                                    f"is a {_ftype(real << 12)}", "Correct the entry",
                                    safe=True):
                        fixes.append((L.E_DENTRY, 0, L.D_ADD, name, c, real, d.mtime))
                edges.setdefault(p, []).append((name, c))
            if fixes:
                # (sequence numbers taken now: a log's order is its sequence order)
                self._append(live[p], [e[:1] + (self._seq(),) + e[2:] for e in fixes])
        return edges

    def _defer_reconnect(self, ino: int) -> None:
        self.reconnect.append(ino)
        self.deferred += 1

    def _orphan(self, rec: _Rec) -> None:
        """In use, no links, no name: normal after a crash, a leak on a clean image."""
        if not self.clean:
            self.info(f"inode {rec.ino} is unlinked but still in use (open when the image "
                      "was last used); mount frees it")
            return
        if self.problem(f"inode {rec.ino} has no links and no name but is still marked in "
                        "use", "Free it", safe=True):
            self.rebuild_alloc = True
            self.deferred += 1

    def _is_below(self, p: int, c: int, parent: dict[int, tuple[int, bytes]]) -> bool:
        """True if directory ``p`` is ``c`` or lies below it in the repaired tree."""
        seen = set()
        while p not in seen:
            if p == c:
                return True
            seen.add(p)
            if p not in parent:
                return False
            p = parent[p][0]
        return False

    def _tree_paths(self, parent: dict[int, tuple[int, bytes]], attached: set[int]) -> None:
        """Paths in the repaired tree (for the messages of later passes)."""
        children: dict[int, list[tuple[int, bytes]]] = {}
        for d, (p, name) in parent.items():
            children.setdefault(p, []).append((d, name))
        paths = {L.ROOT_INO: "/"}
        paths.update({d: f"/lost+found/#{d}" for d in attached})
        queue = deque(paths)                 # iterative: trees may be deeper than the stack
        while queue:
            p = queue.popleft()
            for d, name in children.get(p, ()):
                if d not in paths:
                    paths[d] = paths[p].rstrip("/") + "/" + name.decode("utf-8", "replace")
                    queue.append(d)
        for ino, path in self.paths.items():
            if ino not in paths and ino in self.recs and not self.recs[ino].is_dir:
                paths[ino] = path
        self.paths = paths

    # ------------------------------------------------------------ pass 8: link counts
    def check_links(self) -> None:
        """Directories: 2 + subdirectories; files: the number of names."""
        expected = self.expected
        for rec in self._live():
            want = expected.get(rec.ino)
            if want is None:
                continue                     # orphan or reconnected: handled elsewhere
            have = rec.inode.nlink
            if have != want:
                if self.problem(f"{self._desc(rec.ino)} has link count {have}, expected {want}",
                                "Fix the link count", safe=True):
                    self._append(rec, [(L.E_LINK, self._seq(), want, rec.inode.ctime)])

    # ------------------------------------------------------------ pass 9: sizes
    def check_sizes(self) -> None:
        """No page mapped wholly past EOF; bytes past EOF in the last page are zero."""
        mm = self.pm.mm
        for rec in self._live():
            inode = rec.inode
            if not inode.pages:
                continue
            size = inode.size
            npages = (size + L.BLOCK - 1) // L.BLOCK
            beyond = [pg for pg in inode.pages if pg >= npages]
            if beyond:
                if self.problem(f"{self._desc(rec.ino)} has {len(beyond)} page(s) mapped "
                                f"past its end (size {size}, last page {max(beyond)})",
                                "Drop those pages", safe=True):
                    self._append(rec, [(L.E_SETATTR, self._seq(), L.SA_SIZE, 0, 0, 0, size,
                                        0, 0, 0)])
            rem = size % L.BLOCK
            b = inode.pages.get(size // L.BLOCK)
            if rem and b is not None and self._in_data(b) and \
                    (self.owner[b] == rec.ino or b in self.allocated):
                off = b * L.BLOCK
                if any(mm[off + rem:off + L.BLOCK]):
                    if self.problem(f"{self._desc(rec.ino)}: bytes past the end of the file "
                                    f"in its last page (block {b}) are not zero",
                                    "Zero them", safe=True):
                        self._zero_tail(rec, size // L.BLOCK, b, rem)

    def _zero_tail(self, rec: _Rec, pg: int, old: int, rem: int) -> None:
        """Copy-on-write like the engine: a new block with the tail zeroed."""
        self._prepare_write()
        pm = self.pm
        nb = self._alloc_block()
        pm.store_copy(nb * L.BLOCK, old * L.BLOCK, rem)
        pm.store_zero(nb * L.BLOCK + rem, L.BLOCK - rem)
        pm.flush(nb * L.BLOCK, L.BLOCK)
        self._protection().seal(nb, 1)
        self._append(rec, [(L.E_WRITE, self._seq(), pg, 1, nb, rec.inode.size,
                            rec.inode.mtime)])

    # ------------------------------------------------------------ verbose statistics
    def report_usage(self) -> None:
        """Free space and fragmentation of every CPU region."""
        used_all = np.zeros(self.sb.total_blocks, dtype=bool)
        for rec in self._live():
            for b, _ in rec.meta_blocks():
                used_all[b] = True
            if rec.inode.pages:
                for b in rec.inode.pages.values():
                    if b < len(used_all):
                        used_all[b] = True
        for r in self.regions:
            used = used_all[r.data_start:r.end]
            free = ~used
            d = np.diff(np.concatenate(([0], free.view(np.int8), [0])))
            lens = np.flatnonzero(d == -1) - np.flatnonzero(d == 1)
            nfree = int(free.sum())
            largest = int(lens.max()) if len(lens) else 0
            frag = 0.0 if nfree == 0 else 100.0 * (1 - largest / nfree)
            st = self._states(r)
            self.say(f"CPU {r.cpu} (node {r.node}): blocks {r.start}-{r.end - 1}, "
                     f"{r.data_blocks} data blocks, {r.data_blocks - nfree} used, {nfree} free "
                     f"in {len(lens)} extent(s) (largest {largest}), fragmentation {frag:.1f}%; "
                     f"inodes {int(np.count_nonzero(st == L.STATE_LIVE))}/{len(st)}")

    def _counts(self) -> tuple[int, int]:
        used: set[int] = set()
        files = 0
        for rec in self._live():
            files += 1
            used.update(b for b, _ in rec.meta_blocks())
            if rec.inode.pages:
                used.update(rec.inode.pages.values())
        return files, len(used)

    # ------------------------------------------------------------ finishing repairs
    def finish(self) -> None:
        """Rebuild allocation and reconnect lost inodes by mounting with the engine."""
        if self.readonly or not (self.wrote or self.rebuild_alloc or self.reconnect):
            return
        if self.left:
            # Declined repairs may leave something the engine's replay chokes on;
            # the image stays marked dirty for the next (checked) attempt.
            self._undo_deferred()
            if self.wrote:
                self.say(f"{self.path}: problems remain, so allocation was not rebuilt; "
                         "run fsck.pnova -y before mounting")
            return
        pm = PMem(self.path)
        try:
            self.sb.clean = 0        # force recovery: it rebuilds allocation from the logs
            write_superblock(pm, self.sb)
        finally:
            pm.close()
        try:
            fs = FileSystem.mount(self.path)
        except CorruptImage as e:
            self.say(f"{self.path}: cannot finish the repairs ({e}); the image is left for "
                     "the next mount to recover")
            self._undo_deferred()
            return
        try:
            if self.reconnect:
                self._reconnect(fs)
        except FsError as e:
            self.say(f"{self.path}: cannot reconnect to /lost+found: {e}")
            self._undo_deferred()
        finally:
            fs.unmount()

    def _undo_deferred(self) -> None:
        self.fixed -= self.deferred
        self.left += self.deferred
        self.deferred = 0
        self.reconnect = []

    def _reconnect(self, fs: FileSystem) -> None:
        """Name each lost inode '#ino' in /lost+found (one engine transaction each)."""
        lf, lf_name = self._lost_found(fs)
        for ino in sorted(set(self.reconnect)):
            try:
                child = fs.get(ino)
            except FsError:
                continue
            d = fs.get(lf)
            name = f"#{ino}".encode()
            k = 1
            while name in d.dents:
                name = f"#{ino}.{k}".encode()
                k += 1
            now = time.time_ns()
            pent = [(L.E_DENTRY, fs._next_seq(), L.D_ADD, name, ino,
                     stat.S_IFMT(child.mode) >> 12, now)]
            if child.is_dir:
                pent.append((L.E_LINK, fs._next_seq(), d.nlink + 1, now))
                cent = [(L.E_DENTRY, fs._next_seq(), L.D_ADD, L.DOTDOT, lf,
                         stat.S_IFDIR >> 12, now)]
            else:
                cent = [(L.E_LINK, fs._next_seq(), 1, now)]
            fs._commit([(d, pent), (child, cent)])
            self.say(f"inode {ino} is now /{lf_name}/{name.decode()}")

    def _lost_found(self, fs: FileSystem) -> tuple[int, str]:
        """The /lost+found directory, created (like e2fsck) when missing."""
        root = fs.get(L.ROOT_INO)
        name = b"lost+found"
        k = 0
        while True:
            ent = root.dents.get(name)
            if ent is None:
                return fs.mkdir(L.ROOT_INO, name, 0o700).ino, name.decode()
            if fs.get(ent[0]).is_dir:
                return ent[0], name.decode()
            k += 1
            name = f"lost+found.{k}".encode()
