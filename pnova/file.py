"""File data: read, and the copy-on-write write path top to bottom (NOVA's
file.c).

A write locks its page range with the mount's lock scheme (and the size lock
first if it extends the file), makes sure the cached inode is exact for those
pages (page-group versions, :meth:`FileData._current_for_write`), copies the
data into newly allocated blocks, and commits one entry per extent
(:mod:`pnova.commit`); the blocks it replaced are freed after the commit.
"""
from __future__ import annotations

import errno
import time
from collections.abc import Callable
from dataclasses import dataclass

import logging

from . import layout as L
from .attrs import SUIDGID as _SUIDGID
from .errors import FsError
from .inode import Inode
from .locks import LockTimeout
from .log import LogError
from .protect import strip_ranges
from .shared import HELD_MAX
from .xattr import CAPS_XATTR


logger = logging.getLogger("pnova")

# Largest piece of a read done under one range lock.  A segment scheme takes
# one read lock per segment, and a CPU can record only HELD_MAX of them at once
# in the shared area, so there a piece spans at most HELD_MAX - 2 segments.
READ_CHUNK = 1 << 20
assert HELD_MAX > 2


SCRUB_PAGES = 256              # pages a scrub checks under one read lock


@dataclass
class ScrubCounts:
    """What :meth:`FileData.scrub_data` found in one file (and, unless the mount
    is read-only, repaired)."""
    blocks: int = 0            # data blocks checked
    rebuilt: int = 0           # strips rebuilt from parity
    copies: int = 0            # checksum copies rewritten
    parity: int = 0            # parity strips rewritten
    lost: int = 0              # blocks with strips that cannot be rebuilt
    meta: int = 0              # 1: the inode's slot or logs do not read back
    slots: int = 0             # 1: its slot was restored from the replica
    logs: int = 0              # 1: its logs were damaged in one copy and rewritten

    def wire(self) -> bytes:
        """The answer of the scrub attribute (SCRUB_XATTR) through the mount."""
        return (f"blocks={self.blocks} rebuilt={self.rebuilt} copies={self.copies} "
                f"parity={self.parity} lost={self.lost} meta={self.meta} "
                f"slots={self.slots} logs={self.logs}").encode()


def _runs(pages: dict[int, int], first: int, last: int):
    """Pages first..last as runs (first page, pages, first block or None for a
    hole): pages mapped to consecutive blocks, or consecutive holes."""
    pg = first
    get = pages.get
    while pg <= last:
        b = get(pg)
        n = 1
        if b is None:
            while pg + n <= last and get(pg + n) is None:
                n += 1
        else:
            while pg + n <= last and get(pg + n) == b + n:
                n += 1
        yield pg, n, b
        pg += n


# A write at least this large, at a block boundary, arms the landing for the
# next request: smaller ones cost less to copy than to receive in place.
LAND_MIN = 64 << 10


class Landing:
    """Free blocks of one serving process's CPU that its next request is read
    into (DESIGN 22.6).

    A large write's data then arrives from the kernel in the blocks that will
    hold it, and the write keeps them instead of copying the data out of a
    buffer.  The landing is armed after a large block-aligned write, sized for
    the next one like it; a request of any other kind gives the blocks back, so
    a process that is not streaming writes holds none (and ``statfs`` counts
    them free).  The blocks are allocated like any write's: unreferenced until
    a write commits them, so a crash leaves them free.
    """

    def __init__(self, fs: "FileData") -> None:
        self.fs = fs
        self.extents: list[tuple[int, int]] = []   # reserved, in the order data fills them
        self.ranges: list[tuple[int, int]] = []    # the same as device byte ranges
        self.nbytes = 0                            # bytes the reserved blocks hold
        self.want = 0                              # blocks the next request may need

    def expect(self, off: int, n: int) -> None:
        """After a write of ``n`` bytes at ``off``: arm for another like it, or
        disarm (and give the blocks back)."""
        if n >= LAND_MIN and off % L.BLOCK == 0:
            self.arm(-(-n // L.BLOCK))
        else:
            self.end()

    def arm(self, nblocks: int) -> None:
        """Let the next read land in ``nblocks`` blocks (reserved by :meth:`ready`)."""
        self.want = nblocks

    def end(self) -> None:
        """The stream of large writes has ended: reserve nothing more, give the
        blocks back."""
        self.want = 0
        if self.extents:
            self.release()

    def ready(self) -> bool:
        """Reserve the blocks the next request may need; whether it can land."""
        need = self.want - self.nbytes // L.BLOCK
        if need > 0:
            try:
                more = self.fs.alloc.alloc(self.fs.cpu, need)
            except FsError:                        # short of room: copy instead
                self.end()
                return False
            self._set(self.extents + more)
        return self.want > 0

    def receive(self, fd: int, head: memoryview, spare: memoryview) -> int:
        """Read one request: ``head`` first, then the reserved blocks, then ``spare``."""
        return self.fs.pm.store_read(fd, head, self.ranges, spare)

    def copy_to(self, out: memoryview, n: int) -> None:
        """Copy the first ``n`` bytes received into the blocks to ``out`` (a
        request that does not keep them is made whole in its buffer)."""
        view = self.fs.pm.view
        pos = 0
        for o, k in self.ranges:
            if pos >= n:
                break
            k = min(k, n - pos)
            out[pos:pos + k] = view(o, k)
            pos += k

    def data(self, n: int) -> "Landed":
        """The ``n`` bytes just received into the blocks, as a write's data."""
        return Landed(self, n)

    def bytes(self, n: int) -> bytes:
        """A copy of the first ``n`` bytes received (a write that cannot keep them)."""
        out = bytearray(n)
        self.copy_to(memoryview(out), n)
        return bytes(out)

    def take(self, nblocks: int) -> list[tuple[int, int]]:
        """Give the first ``nblocks`` reserved blocks to a write, as extents."""
        out: list[tuple[int, int]] = []
        rest = list(self.extents)
        while nblocks:
            s, c = rest.pop(0)
            k = min(c, nblocks)
            out.append((s, k))
            if k < c:
                rest.insert(0, (s + k, c - k))
            nblocks -= k
        self._set(rest)
        return out

    def release(self) -> None:
        """Give every reserved block back to the allocator."""
        extents = self.extents
        self._set([])
        for s, c in extents:
            self.fs.alloc.free(s, c)

    def _set(self, extents: list[tuple[int, int]]) -> None:
        self.extents = extents
        self.ranges = [(s * L.BLOCK, c * L.BLOCK) for s, c in extents]
        self.nbytes = sum(c for _s, c in extents) * L.BLOCK


class Landed:
    """A write's data that a read placed at the start of a landing's blocks."""

    __slots__ = ("landing", "n")

    def __init__(self, landing: Landing, n: int) -> None:
        self.landing = landing
        self.n = n

    def __len__(self) -> int:
        return self.n


class FileData:
    """Reading and writing file contents."""

    def read(self, ino: int, off: int, size: int) -> bytes | bytearray:
        """Read under a read lock of the range (in chunks of at most READ_CHUNK bytes)."""
        inode = self.get(ino)
        if self._repair_wanted:
            self._compact_pending()              # its log was read around damage
            inode = self.get(ino)
        if inode.is_dir:
            raise FsError(errno.EISDIR)
        if off < 0:
            raise FsError(errno.EINVAL)
        end = min(off + size, inode.size)
        if self.alloc.limbo:
            # blocks this process freed, held until a sync that has completed
            # since: a process that now only reads gives them back here
            self.alloc.release_synced()
        if off >= end:
            return b""
        sch = self.scheme
        if end - off <= self.read_chunk:
            tok = sch.lock(ino, off // L.BLOCK, (end - 1) // L.BLOCK, False)
            try:
                if self.shared:
                    inode = self.get(ino)
                return self._read(inode, off, end - off)
            finally:
                sch.unlock(tok)
        # In pieces, each copied (once) into the answer under its own lock.
        out = bytearray(end - off)
        pos = 0
        while off < end:
            n = min(end - off, self.read_chunk)
            tok = sch.lock(ino, off // L.BLOCK, (off + n - 1) // L.BLOCK, False)
            try:
                if self.shared:
                    inode = self.get(ino)
                got = 0
                for part in self._read_parts(inode, off, n):
                    k = len(part)
                    out[pos + got:pos + got + k] = part
                    got += k
            except FsError:
                if not pos:
                    raise
                break                            # damage further on: a short read
            finally:
                sch.unlock(tok)
            pos += got
            if got < min(n, inode.size - off):
                break                            # stopped at damage
            off += n
        if pos < len(out):
            del out[pos:]
        return out

    def scrub(self, ino: int) -> ScrubCounts:
        """Check one inode as fsck would: its slot and every entry and page
        tail of its logs, read again from the device (what this process has
        cached may hide damage done since), and then, for a file, its data
        (:meth:`scrub_data`).  A slot that does not read is restored from its
        replica, a damaged replica rewritten (``scrub_slot``); logs whose
        pages are damaged in one copy (of two, format 8) are rewritten by a
        compaction; damage that leaves no good copy is reported (logged with
        the path, counted in ``meta``), for fsck.pnova to repair with the
        image unmounted."""
        self.get(ino)                            # ENOENT / ESTALE as any request
        slots = self.scrub_slot(ino)
        try:
            self._read_inode(ino)
            fixes = self._verify_logs(ino)
        except (LogError, ValueError) as e:
            logger.error("%s: its metadata does not read back from the device (%s); "
                         "unmount and run fsck.pnova", self.path_of(ino), e)
            return ScrubCounts(meta=1, slots=slots)
        logs = 0
        if fixes and not self.readonly:
            logger.warning("%s: its log is damaged in one copy (%d piece(s)); it is "
                           "rewritten", self.path_of(ino), len(fixes))
            try:
                self.compact(ino)
                logs = 1
            except (FsError, LockTimeout):
                self._log_damage(ino, fixes)     # busy: the next operation on it tries again
        counts = self.scrub_data(ino)
        counts.slots, counts.logs = slots, logs
        return counts

    def scrub_data(self, ino: int) -> ScrubCounts:
        """Check every data block of a file as fsck does: each strip against its
        checksums, both checksum copies, the parity strip; rebuild and rewrite
        what can be (not on a read-only mount).  A read checks only what it
        returns against the first copy, so a damaged second copy or parity
        strip waits for this (or fsck) to be found.  Runs under read locks of
        at most SCRUB_PAGES pages at a time (and no more than a read takes):
        readers go on, writers wait for one piece at most."""
        inode = self.get(ino)
        out = ScrubCounts()
        if inode.is_dir or inode.pages is None or not self.prot.csum:
            return out
        sch = self.scheme
        top = max(inode.pages, default=-1)
        # no more at once than a read takes: a segment lock scheme lets a CPU
        # hold a few segments' read locks only
        step = max(1, min(SCRUB_PAGES, self.read_chunk // L.BLOCK))
        for first in range(0, top + 1, step):
            last = min(top, first + step - 1)
            tok = sch.lock(ino, first, last, False)
            try:
                if self.shared:
                    inode = self.get(ino)
                for pg in sorted(p for p in inode.pages if first <= p <= last):
                    block = inode.pages[pg]
                    found = self.prot.examine(block, repair=not self.readonly)
                    out.blocks += 1
                    out.rebuilt += len(found.rebuilt)
                    out.copies += len(found.csum_fixed)
                    out.parity += found.parity_fixed
                    if found.bad:
                        out.lost += 1
                        self._report_lost(inode, pg, block, found.bad)
                    elif not found.ok:
                        logger.warning("%s: data block %d: %s", self.path_of(ino), block,
                                       self.prot.describe(found))
            finally:
                sch.unlock(tok)
        return out

    def _check_kept(self, inode: Inode, pg: int, block: int, lo: int, hi: int) -> None:
        """Bytes lo..hi of page ``pg`` (in ``block``) are about to be copied into a
        new block: they must be good (a copy would give damaged bytes new,
        valid checksums).  EIO if a strip they touch cannot be repaired."""
        bad = self.prot.verify(block)
        if bad and any(k * L.STRIP < hi and lo < (k + 1) * L.STRIP for k in bad):
            self._report_lost(inode, pg, block, bad)
            raise FsError(errno.EIO)

    def _report_lost(self, inode: Inode, pg: int, block: int, bad: list[int]) -> None:
        """Log, once per block and process, file data that cannot be read back."""
        key = (inode.ino, block)
        if key in self._lost_seen:
            return
        self._lost_seen.add(key)
        ranges = strip_ranges(pg * L.BLOCK, bad)
        logger.error("%s: bytes %s are damaged beyond repair (data block %d); reads of them "
                     "answer EIO (fsck.pnova reports them)", self.path_of(inode.ino), ranges,
                     block)

    def _verified_end(self, inode: Inode, off: int, end: int) -> int:
        """How far from ``off`` (at most ``end``) the file's bytes are good: the
        start of the first strip that cannot be repaired, checking (and
        repairing) every data block in between."""
        pages = inode.pages
        prot = self.prot
        for pg, n, b in _runs(pages, off // L.BLOCK, (end - 1) // L.BLOCK):
            if b is None:
                continue
            # a run of consecutive blocks: checked in one call; a block that
            # does not match goes through verify() (repair, poison)
            while n:
                k = prot.good_run(b, n)
                pg, b, n = pg + k, b + k, n - k
                if not n:
                    break
                bad = prot.verify(b)
                if bad:
                    lo = max(off, pg * L.BLOCK)
                    hi = min(end, (pg + 1) * L.BLOCK)
                    hit = [s for s in bad if pg * L.BLOCK + s * L.STRIP < hi
                           and lo < pg * L.BLOCK + (s + 1) * L.STRIP]
                    if hit:
                        self._report_lost(inode, pg, b, bad)
                        return max(off, pg * L.BLOCK + hit[0] * L.STRIP)
                pg, b, n = pg + 1, b + 1, n - 1
        return end

    def _read(self, inode: Inode, off: int, size: int) -> bytes:
        """Bytes ``off`` .. ``off + size`` of a file (fewer at its end or at
        damage), copied out of the device: the caller holds the range's lock."""
        parts = self._read_parts(inode, off, size)
        if len(parts) == 1 and type(parts[0]) is bytes:
            return parts[0]
        return b"".join(parts)

    def _read_parts(self, inode: Inode, off: int, size: int) -> list[bytes | memoryview]:
        """The same as pieces, views of the device among them: valid only while
        the caller holds the range's lock (a copy-on-write write may free and
        reuse the blocks after it)."""
        end = min(inode.size, off + size)
        if off >= end:
            return []
        if self.prot.csum:
            good = self._verified_end(inode, off, end)
            if good < end:
                if good == off:
                    raise FsError(errno.EIO)     # the first byte asked for is lost
                end = good                       # a short read up to the damage
        pages = inode.pages
        first, last = off // L.BLOCK, (end - 1) // L.BLOCK
        if first == last:                        # within a page: the copy at once
            b = pages.get(first)
            if b is None:
                return [bytes(end - off)]
            base = b * L.BLOCK - first * L.BLOCK
            return [self.pm.mm[base + off:base + end]]
        # One view of the device per run of consecutive blocks, zeros for
        # holes: the caller copies them once.
        view = self.pm.view
        parts: list[bytes | memoryview] = []
        for pg, n, b in _runs(pages, first, last):
            lo = max(off, pg * L.BLOCK)
            hi = min(end, (pg + n) * L.BLOCK)
            if b is None:
                parts.append(bytes(hi - lo))
            else:
                parts.append(view(b * L.BLOCK + lo - pg * L.BLOCK, hi - lo))
        return parts

    def write(self, ino: int, off: int, data: bytes | memoryview | Landed,
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
        if isinstance(data, Landed) and off % L.BLOCK:
            data = data.landing.bytes(data.n)     # not where its page starts: copy
        n = len(data)
        if off < 0:
            raise FsError(errno.EINVAL)
        if n == 0:
            return 0
        if off + n > L.MAX_FILE_SIZE:
            raise FsError(errno.EFBIG)
        # Before the locks the cached size is a hint (is this write extending?);
        # the inode is validated once, under the locks.
        inode = self.cache.get(ino)
        if inode is None or inode.pages is None:
            # Not cached, or cached as a directory: that may be an inode another
            # process has freed since, whose slot now holds this file.
            inode = self.get(ino)
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
                if inode.pages is None:          # the slot was reused meanwhile
                    raise FsError(errno.EISDIR)
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
            self.alloc.free(freed[0], 1, self._split_need(ino, freed[0], freed[0]))
        elif freed:
            self._free_blocks(freed, ino)
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
        self._trust_versions()
        area = self.area
        q = area.u64
        slots = area.version_slots(ino, first, last)
        vals = [q[a >> 3] for a in slots]
        inode = self.cache.get(ino)
        if inode is not None:
            gen, state, head, _tail, array = self._slot_words(ino)
            if (gen == inode.generation and state == L.STATE_LIVE and head == inode.head
                    and array == inode.array and self._rewrites(ino) == inode.rewrites):
                vers = inode.vers
                for a, v in zip(slots, vals):
                    if vers.get(a) != v:
                        break
                else:
                    return inode, slots
        inode = self.get(ino)
        # an odd word is a change in flight (or one whose maker died): never
        # recorded, so it is never trusted (DESIGN 19.7)
        inode.vers.update((a, v) for a, v in zip(slots, vals) if not v & 1)
        return inode, slots

    def _bump_versions(self, ino: int, inode: Inode, slots: list[int]) -> None:
        """Count this write in its groups' versions (the last slot is the epoch: not
        bumped).  The cache may record a new value only if nobody else bumped
        the word since it was checked (a group shared with another writer's
        pages, or a hash collision)."""
        add = self.area.w.add64
        vers = inode.vers if self.cache.get(ino) is inode else None
        for a in slots[:-1]:
            old = add(a, 2)                       # even: odd means "in flight"
            if vers is not None:
                if vers.get(a) == old:
                    vers[a] = old + 2
                else:
                    vers.pop(a, None)

    def _write_locked(self, inode: Inode, off: int, data, first: int, last: int,
                      kill_suidgid: bool = False,
                      in_group: Callable[[int], bool] | None = None) -> list[int]:
        pm = self.pm
        n = len(data)
        pages = inode.pages
        if self.prot.csum:
            # The old bytes a partial first or last page keeps are copied into
            # the new block: they must be good (before anything is allocated).
            if off % L.BLOCK and (old := pages.get(first)) is not None:
                self._check_kept(inode, first, old, 0, off % L.BLOCK)
            if (off + n) % L.BLOCK and (old := pages.get(last)) is not None:
                self._check_kept(inode, last, old, (off + n) % L.BLOCK, L.BLOCK)
        if isinstance(data, Landed):
            # The data is already in place, from the first page on (write()
            # copies it out when the write does not start a page).
            extents = data.landing.take(last - first + 1)
            src = None
        else:
            extents = self.alloc.alloc(self.cpu, last - first + 1)
            src = memoryview(data)
        now = time.time_ns()
        entries = []
        pg = first
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
            if src is not None:
                pm.store(dst + a - lo, src[a - off:b - off])
            if b < hi:                            # tail of the last page
                lp = (hi // L.BLOCK) - 1
                old = pages.get(lp)
                if old is not None:
                    pm.store_copy(dst + b - lo, old * L.BLOCK + b - lp * L.BLOCK, hi - b)
                else:
                    pm.store_zero(dst + b - lo, hi - b)
            pm.flush(dst, count * L.BLOCK)
            digest = self.prot.seal(start, count)  # fenced by the commit, before the entry
            # the size field is the end this write reaches; replay takes the maximum
            entries.append((L.E_WRITE, 0, pg, count, start, off + n, now, digest))
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

    def fsync(self, ino: int) -> None:
        """fsync, fdatasync, fsyncdir, syncfs: every returned operation is already
        durable in persistent memory; on an image backed by a disk file, push
        the image's changed pages to the disk too (:meth:`sync`)."""
        self.get(ino)
        # a compacted chain switched to before the sync, which then makes
        # the entries copied into it durable (DESIGN 24.5)
        self.finish_compactions()
        self.sync()
