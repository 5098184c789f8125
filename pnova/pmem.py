"""The persistent-memory device: the only code that writes to the mapped image.

A pnova device is a regular file mapped MAP_SHARED.  Every change to it goes
through :class:`PMem` as *store* (bytes land in the "CPU cache", i.e. the
mapping), *flush* (write back the 64-byte lines that cover a range, like
``clwb``) and *fence* (order and wait, like ``sfence``).  On the emulated
device the mapping itself is the medium, so in the default fast mode flush and
fence only count; a tracked mode that keeps a separate durable image (for crash
injection, :class:`TrackedPMem`) subclasses this class and overrides the
primitives, so callers never change: ``store``, ``store_u64``, ``store_zero``, ``store_copy``,
``store_read`` (a request read from a descriptor into the mapping), ``store_seal``
(a data extent's protection records, computed into the mapping), ``flush`` and
``fence`` are the whole set of mutating calls.  The numpy view
``buf`` handed to readers is read-only, so no caller can bypass them.

**Poison.** Real persistent memory reports uncorrectable media errors as
machine checks on the lines that hold them, and Linux keeps a list of bad
512-byte sectors per pmem device.  The emulated device keeps the same list in
a file beside the image, ``IMAGE.badblocks`` (lines ``SECTOR COUNT``, as
``/sys/block/pmemN/badblocks`` shows them); :meth:`PMem.poisoned` tells a
reader which sectors of a range it must not trust, and a store that covers a
whole sector clears its poison, as writing a sector through the pmem driver
does.  ``pnova-inject`` adds entries.
"""
from __future__ import annotations

import ctypes
import errno
import gc
import mmap
import os
import stat
import struct
from collections.abc import Callable

import numpy as np

from . import _protect
from .atomics import SharedWords

CACHELINE = 64
SECTOR = 512
_MADV_POPULATE_WRITE = 23      # linux/mman.h (Linux 5.14); Python 3.11 has no name for it

_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")


class DeviceError(Exception):
    """The device file cannot be opened or mapped (one-line message)."""


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def reserve(fd: int, path: str, size: int, *, new: bool = False) -> None:
    """Give every byte of a regular image file its storage now.

    A store into a hole of a shared mapping takes a page (tmpfs) or a block
    (a disk file system) at that moment; when the file system is full the
    storing process gets SIGBUS, or EFAULT from a read(2) into the mapping,
    and the mount dies with it.  With every block of the image allocated
    before it is mapped, running out of room is pnova's own ENOSPC, answered
    like any other error.  An image whose file has all its blocks already
    costs one fstat.  Raises DeviceError (one line) when the file system has
    no room; ``new``: the file is being formatted (the message differs).
    """
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_blocks * 512 >= size:
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        try:
            vfs = os.fstatvfs(fd)
            free = _mib(vfs.f_bavail * vfs.f_frsize)
        except OSError:
            free = "unknown"
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            if new:
                raise DeviceError(f"{path}: no room for a {_mib(size)} image on its file "
                                  f"system ({free} free)") from None
            raise DeviceError(
                f"{path}: the image file is sparse and its file system has no room for "
                f"the rest of it ({_mib(size - st.st_blocks * 512)} without storage, {free} "
                "free); free some space there, or mount it read-only") from None
        raise DeviceError(f"{path}: cannot allocate the image's storage: "
                          f"{e.strerror}") from None


class PMem:
    """A device file mapped shared, with store / flush / fence primitives."""

    def __init__(self, path: str, *, size: int | None = None, create: bool = False,
                 readonly: bool = False) -> None:
        flags = os.O_RDONLY if readonly else os.O_RDWR
        made = False
        if create:
            made = not os.path.exists(path)
            flags |= os.O_CREAT
        try:
            self.fd = os.open(path, flags, 0o644)
        except OSError as e:
            raise DeviceError(f"cannot open {path}: {e.strerror}") from None
        self.path = path
        try:
            st = os.fstat(self.fd)
            if create and size is not None and st.st_size != size:
                # Formatting an existing file at another size: its storage is
                # taken first, and a refusal leaves the file as it was (a
                # shrink only after the room is there, a growth undone).
                if size < st.st_size:
                    reserve(self.fd, path, size, new=True)
                    os.ftruncate(self.fd, size)
                else:
                    os.ftruncate(self.fd, size)
                    try:
                        reserve(self.fd, path, size, new=True)
                    except DeviceError:
                        if not made:
                            os.ftruncate(self.fd, st.st_size)
                        raise
            self.size = os.fstat(self.fd).st_size
            if self.size == 0:
                raise DeviceError(f"{path}: device is empty")
            if not readonly:
                reserve(self.fd, path, self.size, new=create)
            prot = mmap.PROT_READ if readonly else mmap.PROT_READ | mmap.PROT_WRITE
            self.mm = None
            if not readonly and not create and type(self) is PMem and _cpu_can_persist():
                # Persistent memory (a DAX filesystem or device) accepts
                # MAP_SYNC: stores then reach the medium by clwb + sfence alone.
                # (The crash-injection subclass keeps its own model.)
                try:
                    self.mm = mmap.mmap(self.fd, self.size, _MAP_SHARED_VALIDATE | _MAP_SYNC,
                                        prot)
                except OSError:
                    self.mm = None               # not DAX: the page cache is in between
            mapped_sync = self.mm is not None
            if self.mm is None:
                self.mm = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED, prot)
        except OSError as e:
            os.close(self.fd)
            raise DeviceError(f"cannot map {path}: {e.strerror}") from None
        except DeviceError:
            os.close(self.fd)
            if made:                             # nothing of it is worth keeping
                os.unlink(path)
            raise
        self.readonly = readonly
        # numpy views of the whole mapping: ``buf`` (read-only) for readers,
        # ``_wbuf`` for the primitives below and nothing else.
        self._wbuf = np.frombuffer(self.mm, dtype=np.uint8)
        self.buf = self._wbuf.view()
        self.buf.flags.writeable = False
        self.mv = memoryview(self.mm)
        # Whole-word access to the mapping.  Another process of the mount may
        # read a word (a log tail) while this one stores it: a struct
        # pack_into clears the 8 bytes and then writes them one at a time, so
        # such a reader could see 0 or a mix.  Every 8-byte store and every
        # read of a word that other processes change goes through these
        # (one instruction each, as on persistent memory).
        self.words = SharedWords(self.mm)
        self.stores = 0
        self.flushes = 0
        self.fences = 0
        self.poison: set[int] = load_badblocks(path)
        self._populate = isinstance(self.mm, mmap.mmap)   # (prefault)
        # An image on tmpfs or ramfs lives in memory: nothing is more stable
        # than the mapping, and a sync has nothing to write (DESIGN 24).
        self.volatile = _fs_type(self.fd) in _MEMORY_FILESYSTEMS
        self.msyncs = 0
        # "pmem": MAP_SYNC, real clwb / sfence; "disk": a file behind the page
        # cache, durable by msync; "memory": tmpfs or ramfs (DESIGN 24).
        self.mode = "memory" if self.volatile else "disk"
        if mapped_sync:
            self._use_cpu_persistence()

    def _use_cpu_persistence(self) -> None:
        """Make flush and fence the processor's (clwb or its fallbacks, sfence):
        the image is mapped with MAP_SYNC, so the cache is all that stands
        between a store and the medium, and a sync has nothing left to do."""
        from . import _persist
        self.mode = "pmem"
        self.cpu_flush = _persist.INSTRUCTION
        mm, wb, sfence = self.mm, _persist.flush, _persist.fence
        store64 = self.words.store64

        def flush(off: int, n: int) -> None:
            self.flushes += wb(mm, off, n)

        def fence() -> None:
            sfence()
            self.fences += 1

        def commit_u64(off: int, value: int) -> None:
            fence()
            store64(off, value)
            self.stores += 1
            flush(off, 8)
            fence()

        def commit_u64_twice(off: int, off2: int, value: int) -> None:
            fence()
            store64(off, value)
            store64(off2, value)
            self.stores += 2
            flush(off, 8)
            flush(off2, 8)
            fence()

        self.flush, self.fence, self.commit_u64 = flush, fence, commit_u64  # type: ignore[method-assign]
        self.commit_u64_twice = commit_u64_twice  # type: ignore[method-assign]

    def describe(self) -> str:
        """How stores reach the medium, for the mount log."""
        if self.mode == "pmem":
            return (f"persistent memory (MAP_SYNC): durable at each fence "
                    f"({self.cpu_flush} + sfence)")
        if self.mode == "disk":
            return "a file on a disk: durable at fsync, syncfs, each commit interval and unmount"
        return "a file in memory (tmpfs): lost with the machine's power"

    def limit(self, size: int) -> None:
        """Make ``size`` the device size: the first ``size`` bytes of a longer file
        (bounds checks against :attr:`size` then leave the file's tail out)."""
        self.size = min(self.size, size)

    # -- reads -------------------------------------------------------------
    def read(self, off: int, n: int) -> bytes:
        """Return a copy of ``n`` bytes at ``off``."""
        return self.mm[off:off + n]

    def view(self, off: int, n: int) -> memoryview:
        """Zero-copy read-only view of ``n`` bytes at ``off``."""
        return self.mv[off:off + n].toreadonly()

    def poisoned(self, off: int, n: int) -> list[int]:
        """The poisoned sectors that overlap [off, off+n), in order."""
        if not self.poison:
            return []
        return [s for s in range(off // SECTOR, (off + n + SECTOR - 1) // SECTOR)
                if s in self.poison]

    def _clear_poison(self, off: int, n: int) -> None:
        """A store covered [off, off+n): the whole sectors in it are good again
        (in the list on disk too, which other processes of the mount share)."""
        cleared = [s for s in range(-(-off // SECTOR), (off + n) // SECTOR) if s in self.poison]
        if cleared and not self.readonly:
            self.poison = clear_badblocks(self.path, cleared)

    def prefault(self, off: int, n: int) -> None:
        """Map the pages of [off, off+n) writable in this process now, in one
        call (madvise MADV_POPULATE_WRITE, Linux 5.14 on), instead of one page
        fault at the first store to each: blocks about to be written for the
        first time.  Nothing is written; on a kernel without it, nothing
        happens."""
        if not self._populate or self.readonly:
            return
        try:
            self.mm.madvise(_MADV_POPULATE_WRITE, off, n)
        except (OSError, ValueError, AttributeError):
            self._populate = False               # not supported here: stores fault

    def read_u64(self, off: int) -> int:
        """The u64 at ``off`` (8-byte aligned), loaded whole."""
        return self.words.load64(off)

    def read_u32(self, off: int) -> int:
        return _U32.unpack_from(self.mm, off)[0]

    # -- the persistence primitives -----------------------------------------
    def store(self, off: int, data: bytes | bytearray | memoryview) -> None:
        """Write bytes into the mapping (not yet durable)."""
        self.mm[off:off + len(data)] = data
        self.stores += 1
        if self.poison:
            self._clear_poison(off, len(data))

    def store_u64(self, off: int, value: int) -> None:
        """An aligned 8-byte store: the unit of atomicity (one instruction, so a
        reader in another process sees the old value or the new one)."""
        self.words.store64(off, value)
        self.stores += 1

    def store_zero(self, off: int, n: int) -> None:
        """Store ``n`` zero bytes at ``off``."""
        self._wbuf[off:off + n] = 0
        self.stores += 1
        if self.poison:
            self._clear_poison(off, n)

    def store_copy(self, dst: int, src: int, n: int) -> None:
        """Copy ``n`` bytes inside the device (copy-on-write page fill)."""
        self._wbuf[dst:dst + n] = self._wbuf[src:src + n]
        self.stores += 1
        if self.poison:
            self._clear_poison(dst, n)

    def store_read(self, fd: int, head: memoryview, ranges: list[tuple[int, int]],
                   spare: memoryview) -> int:
        """One read(2) of ``fd`` scattered over ``head``, then the device byte
        ranges ``ranges`` (offset, length) in order, then ``spare``; returns the
        bytes read.  What lands in the ranges is a store like any other (not
        yet durable): it lets a request's data arrive where it will be kept,
        without a copy through a buffer (DESIGN 22.6)."""
        buf = self._wbuf
        got = os.readv(fd, [head, *(buf[o:o + n].data for o, n in ranges), spare])
        self.stores += 1
        if self.poison:
            left = got - len(head)
            for o, n in ranges:
                if left <= 0:
                    break
                self._clear_poison(o, min(n, left))
                left -= n
        return got

    def store_seal(self, off: int, nblocks: int, sums: int, sums2: int, parity: int) -> int:
        """Store the protection records of the ``nblocks`` data blocks at byte
        ``off``, computed from them: their strip checksums at ``sums`` and
        again at ``sums2``, their parity at ``parity`` (-1: that one not kept).
        Returns the checksums' CRC32C (the extent's data digest).  One call
        instead of a store of each record: the records never pass through
        Python objects (SPEC 9.1, DESIGN 23)."""
        digest = _protect.seal_into(self._wbuf, off, nblocks, sums, sums2, parity)
        self.stores += 1
        if self.poison:
            for o, n in self._seal_ranges(nblocks, sums, sums2, parity):
                self._clear_poison(o, n)
        return digest

    @staticmethod
    def _seal_ranges(nblocks: int, sums: int, sums2: int,
                     parity: int) -> list[tuple[int, int]]:
        """The byte ranges :meth:`store_seal` writes."""
        out = [(sums, nblocks * _protect.CSUM_BYTES)]
        if sums2 >= 0:
            out.append((sums2, nblocks * _protect.CSUM_BYTES))
        if parity >= 0:
            out.append((parity, nblocks * _protect.STRIP_BYTES))
        return out

    def flush(self, off: int, n: int) -> None:
        """Write back every cache line that covers [off, off+n)."""
        self.flushes += ((off + n + CACHELINE - 1) // CACHELINE) - off // CACHELINE

    def fence(self) -> None:
        """Order: every flushed line is durable once this returns."""
        self.fences += 1

    def persist(self, off: int, n: int) -> None:
        """flush + fence."""
        self.flush(off, n)
        self.fence()

    def commit_u64(self, off: int, value: int) -> None:
        """fence; the 8-byte store; flush; fence: how a log tail commits (what was
        written before is durable first, the store itself when this returns).
        One call on the hot path; :class:`TrackedPMem` runs the four steps."""
        self.words.store64(off, value)
        self.stores += 1
        self.flushes += 1
        self.fences += 2

    def commit_u64_twice(self, off: int, off2: int, value: int) -> None:
        """:meth:`commit_u64` of one value into two words (an inode slot's word
        and its replica): both stores lie between the same two fences."""
        store64 = self.words.store64
        store64(off, value)
        store64(off2, value)
        self.stores += 2
        self.flushes += 2
        self.fences += 2

    # -- lifetime --------------------------------------------------------------
    def sync(self) -> None:
        """Push every changed page of the mapping to the backing file and wait for
        the device (msync MS_SYNC over the whole mapping: the kernel writes only
        the dirty pages; one page or a hundred cost about the same, the cache
        flush of the disk).  Nothing to do for an image in memory."""
        if not self.readonly and self.mode == "disk":
            self.mm.flush()
            self.msyncs += 1

    def push(self) -> None:
        """msync of the whole mapping that is not a sync: it promises no
        operation and opens no sync interval (DESIGN 24.5).  A compaction
        pushes its new chain with it, and with the chain the data of every
        write the chain maps, before the words that switch to it.  What it
        writes is one of the states the kernel's own write-back could leave,
        so it never weakens what a power loss may find.  The call releases the
        interpreter's lock (ctypes), so it may run in a thread while the
        process goes on serving.  Nothing to do for an image in memory or on
        persistent memory."""
        if self.readonly or self.mode != "disk":
            return
        if _LIBC.msync(ctypes.c_void_p(self._wbuf.ctypes.data),
                       ctypes.c_size_t(self._wbuf.nbytes), _MS_SYNC) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        self.msyncs += 1

    def close(self) -> None:
        self.buf = self._wbuf = None  # type: ignore[assignment]
        self.words.release()
        self.mv.release()
        try:
            try:
                self.mm.close()
            except BufferError:
                # A view of the mapping still referenced from garbage that only
                # the cycle collector frees (an exception's traceback keeps the
                # frames that held it): collect it, then close.
                gc.collect()
                self.mm.close()
        finally:
            os.close(self.fd)


_MAP_SHARED_VALIDATE, _MAP_SYNC = 0x03, 0x80000
_MS_SYNC = 4
# loaded once, here: a process may fork while a thread pushes (DESIGN 24.5), and
# a library loaded in that thread meanwhile could leave the loader locked
_LIBC = ctypes.CDLL(None, use_errno=True)
_TMPFS_MAGIC, _RAMFS_MAGIC = 0x01021994, 0x858458F6
_MEMORY_FILESYSTEMS = (_TMPFS_MAGIC, _RAMFS_MAGIC)


def _fs_type(fd: int) -> int:
    """f_type of the filesystem holding ``fd`` (fstatfs(2)); 0 if unknown."""
    import ctypes
    buf = ctypes.create_string_buffer(128)           # struct statfs: f_type first
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.fstatfs(fd, buf) != 0:
        return 0
    return struct.unpack_from("<q", buf.raw, 0)[0] & 0xFFFFFFFF


def badblocks_path(image: str) -> str:
    return image + ".badblocks"


def load_badblocks(image: str) -> set[int]:
    """The poisoned sectors of ``image`` (empty when it has no list)."""
    out: set[int] = set()
    try:
        with open(badblocks_path(image), encoding="ascii") as f:
            for line in f:
                fields = line.split()
                if len(fields) == 2 and fields[0].isdigit() and fields[1].isdigit():
                    first, count = int(fields[0]), int(fields[1])
                    out.update(range(first, first + count))
    except OSError:
        pass
    return out


def _cpu_can_persist() -> bool:
    """Whether this processor has a cache-line write-back pnova can issue."""
    try:
        from . import _persist
    except ImportError:
        return False
    return _persist.INSTRUCTION != "none"


def clear_badblocks(image: str, sectors: list[int]) -> set[int]:
    """Remove ``sectors`` from the image's list, under a lock (several processes
    of one mount may clear sectors at once); return the list as it now is."""
    import fcntl
    with open(badblocks_path(image) + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        now = load_badblocks(image) - set(sectors)
        save_badblocks(image, now)
    return now


def save_badblocks(image: str, sectors: set[int]) -> None:
    """Write the list (runs of sectors), or remove it when nothing is poisoned."""
    path = badblocks_path(image)
    if not sectors:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    runs: list[list[int]] = []
    for sec in sorted(sectors):
        if runs and runs[-1][0] + runs[-1][1] == sec:
            runs[-1][1] += 1
        else:
            runs.append([sec, 1])
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="ascii") as f:
        f.writelines(f"{a} {n}\n" for a, n in runs)
    os.replace(tmp, path)


class TrackedPMem(PMem):
    """Crash-injection mode: the mapping is the *volatile* image, ``durable`` the medium.

    Persistence model (x86 with clwb/sfence): a store makes its 64-byte lines
    *in flight*; ``flush`` marks in-flight lines *pending*; ``fence`` makes
    pending lines durable (copies them into ``durable``).  A line stored again
    after its flush is in flight again and needs another flush.  At a crash any
    subset of the in-flight lines may have reached the medium, and an aligned
    8-byte word is the unit that cannot tear.

    Every store call is one *unit*: the lines it touched.  Crash-state
    enumeration works on units (subsets of whole stores, as Chipmunk does) and
    adds torn variants of multi-line units at 8-byte granularity.
    ``on_fence(pm)`` is called at the start of every fence: a crash point.
    """

    def __init__(self, path: str, **kw) -> None:
        super().__init__(path, **kw)
        self.durable = np.array(self.buf, copy=True)
        self.inflight: dict[int, int] = {}     # line -> unit (store call) that last wrote it
        self.pending: set[int] = set()
        self.unit_seq = 0
        self.on_fence: Callable[["TrackedPMem"], None] | None = None

    def _mark(self, off: int, n: int) -> None:
        self.unit_seq += 1
        u = self.unit_seq
        for line in range(off // CACHELINE, (off + n + CACHELINE - 1) // CACHELINE):
            self.inflight[line] = u
            self.pending.discard(line)

    def store(self, off: int, data: bytes | bytearray | memoryview) -> None:
        super().store(off, data)
        self._mark(off, len(data))

    def store_u64(self, off: int, value: int) -> None:
        super().store_u64(off, value)
        self._mark(off, 8)

    def store_zero(self, off: int, n: int) -> None:
        super().store_zero(off, n)
        self._mark(off, n)

    def store_copy(self, dst: int, src: int, n: int) -> None:
        super().store_copy(dst, src, n)
        self._mark(dst, n)

    def store_read(self, fd: int, head: memoryview, ranges: list[tuple[int, int]],
                   spare: memoryview) -> int:
        # Read into a buffer first, then store each range: every range is a
        # store unit of its own, as if written by store().
        total = sum(n for _o, n in ranges)
        tmp = bytearray(total)
        got = os.readv(fd, [head, tmp, spare])
        left = got - len(head)
        pos = 0
        for o, n in ranges:
            if left <= 0:
                break
            k = min(n, left)
            self.store(o, tmp[pos:pos + k])
            pos += n
            left -= n
        return got

    def store_seal(self, off: int, nblocks: int, sums: int, sums2: int, parity: int) -> int:
        digest = super().store_seal(off, nblocks, sums, sums2, parity)
        for o, n in self._seal_ranges(nblocks, sums, sums2, parity):
            self._mark(o, n)                   # each record a store unit of its own
        return digest

    def commit_u64(self, off: int, value: int) -> None:
        self.fence()
        self.store_u64(off, value)
        self.flush(off, 8)
        self.fence()

    def commit_u64_twice(self, off: int, off2: int, value: int) -> None:
        self.fence()
        self.store_u64(off, value)
        self.store_u64(off2, value)
        self.flush(off, 8)
        self.flush(off2, 8)
        self.fence()

    def flush(self, off: int, n: int) -> None:
        super().flush(off, n)
        inflight = self.inflight
        for line in range(off // CACHELINE, (off + n + CACHELINE - 1) // CACHELINE):
            if line in inflight:
                self.pending.add(line)

    def fence(self) -> None:
        super().fence()
        if self.on_fence is not None:
            self.on_fence(self)
        if self.pending:
            lines = np.fromiter(self.pending, dtype=np.int64)
            idx = (lines[:, None] * CACHELINE + np.arange(CACHELINE)).ravel()
            self.durable[idx] = self.buf[idx]
            for line in self.pending:
                del self.inflight[line]
            self.pending.clear()

    def units(self) -> list[list[int]]:
        """The in-flight lines grouped by the store that last wrote them."""
        by: dict[int, list[int]] = {}
        for line, u in self.inflight.items():
            by.setdefault(u, []).append(line)
        return [sorted(v) for _, v in sorted(by.items())]

    def crash_image(self, lines: list[int] = (), torn: dict[int, int] | None = None) -> np.ndarray:
        """The durable image plus ``lines`` from the volatile image.

        ``torn`` maps a line to an 8-bit mask of the 8-byte words of that line
        that reached the medium (the others keep their durable value).
        """
        img = self.durable.copy()
        for line in lines:
            a = line * CACHELINE
            img[a:a + CACHELINE] = self.buf[a:a + CACHELINE]
        for line, mask in (torn or {}).items():
            a = line * CACHELINE
            for w in range(8):
                if mask >> w & 1:
                    img[a + 8 * w:a + 8 * w + 8] = self.buf[a + 8 * w:a + 8 * w + 8]
        return img


PAGE = 4096


class PagedPMem(PMem):
    """Crash-injection mode for an image on a disk: the mapping is the *page
    cache*, ``disk`` the file's blocks on the disk.

    Persistence model (a file mapped MAP_SHARED on an ordinary filesystem):
    flush and fence do nothing for durability; the kernel writes dirty 4 KiB
    pages back whenever it likes, in any order, each one whole as it is at that
    moment; :meth:`sync` (msync) writes every dirty page and returns when they
    are all on the disk.  So after a power loss each page that changed since
    the last sync holds one of the contents it had since then, chosen
    independently of every other page.  ``on_fence(pm)`` is called at every
    fence: the harness takes snapshots there, the moments a page could have
    been written back mid-operation.
    """

    def __init__(self, path: str, **kw) -> None:
        super().__init__(path, **kw)
        self.mode = "disk"                    # whatever holds the file: the model is a disk
        self.disk = np.array(self.buf, copy=True)
        self.on_fence: Callable[["PagedPMem"], None] | None = None
        self.on_sync: Callable[["PagedPMem"], None] | None = None
        self.on_push: Callable[["PagedPMem"], None] | None = None
        # a compaction's chain is pushed at once, not by a thread: the crash
        # states are taken in program order
        self.push_inline = True

    def fence(self) -> None:
        if self.on_fence is not None:
            self.on_fence(self)
        super().fence()

    def commit_u64(self, off: int, value: int) -> None:
        self.fence()
        super().commit_u64(off, value)

    def commit_u64_twice(self, off: int, off2: int, value: int) -> None:
        self.fence()
        super().commit_u64_twice(off, off2, value)

    def dirty_pages(self) -> np.ndarray:
        """Page numbers whose cached contents differ from the disk's."""
        cur = self.buf[:len(self.disk) // PAGE * PAGE].reshape(-1, PAGE)
        old = self.disk[:len(self.disk) // PAGE * PAGE].reshape(-1, PAGE)
        return np.flatnonzero((cur != old).any(axis=1))

    def sync(self) -> None:
        """msync: every dirty page reaches the disk."""
        if self.on_sync is not None:
            self.on_sync(self)
        self.disk[:] = self.buf
        self.msyncs += 1

    def push(self) -> None:
        """msync that promises nothing (a compaction's, DESIGN 24.5): every
        page reaches the disk, and ``on_sync`` is not called."""
        self.disk[:] = self.buf
        if self.on_push is not None:
            self.on_push(self)
        self.msyncs += 1
