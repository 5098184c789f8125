"""FxMark's microbenchmarks, written once against :class:`fxmark.fileops.FileOps`.

A workload has these parts, each a plain function:

``prepare(fops, nworkers) -> shared``
    Runs once in the parent before the workers exist (FxMark's worker 0
    preparing the shared files).  What it returns is inherited by the forked
    workers.
``stock(fops, shared, wid, seconds) -> int`` (optional)
    Runs in worker ``wid`` before the start barrier, once the target has
    made the process that worker (the engine target: logical CPU ``wid``),
    as FxMark's ``pre_work`` runs in each worker on its own CPU: it creates
    the files this worker will use up in a run of ``seconds``, and returns
    how many.  A filesystem places a file on the CPU that creates it (pnova:
    that CPU's inode table and allocator region), so the files a worker
    uses up are its own, as in FxMark.  The harness hands every worker's
    count back to the parent, in ``shared["stocked"]``, for ``check``.
``worker(fops, shared, wid) -> op``
    Runs in worker ``wid`` before the start barrier (it opens the worker's
    own handles and builds its buffers) and returns the per-op function
    ``op(seq)``, called with seq = 1, 2, 3, ... in the timed loop.
``op(seq) -> None | float``
    Does exactly one of the operations FxMark times.  Workloads that use up
    something (pre-created files to unlink, a file to shrink, space to
    append to) replenish it inside an op when it runs out and return the
    seconds that took: the worker loop takes them out of the measured time
    and moves the worker's stop time back by as much (see
    :mod:`fxmark.workers`).  FxMark instead pre-creates files or fills the
    device until ENOSPC and lets a worker stop early.  Files to unlink or
    move are stocked for the whole run where the device allows (``stock``):
    a refill creates files while the other workers are timed, in the shared
    directory or through the shared allocator, which the measurement would
    then include.
``check(fops, shared, nworkers, worker_ops) -> str | None``
    After the run: verifies what is on the target given how many ops each
    worker completed; returns None, or a one-line reason (the run is then
    reported as failed).

The operations follow FxMark's definitions (Min et al., ATC'16); the file
and directory names, pool sizes and the few deliberate differences are
stated on each workload and in docs/PERFORMANCE.md.  One workload is not
FxMark's: DWBL, big sequential writes (1 MiB), for bandwidth rather than
operations.
"""
from __future__ import annotations

import random
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .fileops import FileOps, read

PAGE = 4096
MiB = 1 << 20
_HDR = struct.Struct("<QQ")        # (worker id, op sequence number) at the start of a page

Op = Callable[[int], "float | None"]
Check = Callable[[FileOps, Any, int, "list[int]"], "str | None"]


@dataclass(frozen=True)
class Workload:
    """One FxMark microbenchmark (see the module docstring for the parts)."""
    name: str
    summary: str
    sharing: str                    # low / medium / high, as FxMark labels it
    prepare: Callable[[FileOps, int], Any]
    worker: Callable[[FileOps, Any, int], Op]
    check: Check
    space: Callable[[int], int]     # bytes of file data for n workers (device sizing)
    # Files and directories that n workers running d seconds may hold at once
    # (device sizing: each needs an inode slot and a log page).
    files: Callable[[int, float], int] = lambda n, d: 0
    file_bytes: int = 0             # data written into each of those files
    # stock(fops, shared, wid, seconds) -> files stocked: worker wid's own
    # preparation that depends on the run's length (files to use up), in
    # the worker, before the start barrier
    stock: Callable[[FileOps, Any, int, float], int] | None = None
    # settle(fops, shared, wid): in worker wid once every worker has stocked,
    # before the start barrier: a look at a directory all of them stocked, so
    # that a worker's first ops do not learn the others' files (on the engine
    # a process's cache of a directory catches up with every other process's
    # entries at its first full look: about 0.37 s for 100,000 names)
    settle: Callable[[FileOps, Any, int], object] | None = None


def page_pattern(wid: int, seq: int) -> bytes:
    """The page worker ``wid`` writes in its op number ``seq``."""
    page = bytearray([0x41 + wid % 26]) * PAGE
    _HDR.pack_into(page, 0, wid, seq)
    return bytes(page)


def _page_buffer(fops: FileOps, wid: int, seq: int = 0) -> Any:
    buf = fops.buffer(PAGE)
    buf[:] = page_pattern(wid, seq)
    return buf


def _fill(fops: FileOps, h: Any, size: int, byte: int, start: int = 0) -> None:
    """Write ``byte`` over [start, size) in 1 MiB pieces (preparation, never timed)."""
    chunk = fops.buffer(MiB)
    chunk[:] = bytes([byte]) * MiB
    view = memoryview(chunk)
    off = start
    while off < size:
        n = min(MiB, size - off)
        fops.pwrite(h, view[:n], off)
        off += n


def _untimed(fn: Callable[[], object]) -> float:
    t = time.monotonic()
    fn()
    return time.monotonic() - t


def _expect_page(fops: FileOps, h: Any, off: int, want: bytes, what: str) -> str | None:
    got = read(fops, h, PAGE, off)
    if got == want:
        return None
    if len(got) >= _HDR.size and len(want) >= _HDR.size and got[16:] == want[16:]:
        w, s = _HDR.unpack_from(got)
        ww, ws = _HDR.unpack_from(want)
        return f"{what}: holds op {s} of worker {w}, expected op {ws} of worker {ww}"
    return f"{what}: wrong contents at offset {off}"


def _expect_names(fops: FileOps, path: str, want: set[str], prefix: str = "") -> str | None:
    got = {n for n in fops.listdir(path) if n.startswith(prefix)}
    if got == want:
        return None
    missing, extra = sorted(want - got), sorted(got - want)
    where = path or "the root directory"
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (first {missing[0]})")
    if extra:
        parts.append(f"{len(extra)} unexpected (first {extra[0]})")
    return f"{where}: {', '.join(parts)}"


# =====================================================================
# Data workloads
# =====================================================================

# ------------------------------------------------------------- DWOL / DWSL / DRBL
def _own_page_prepare(fname: str) -> Callable[[FileOps, int], Any]:
    """Each worker gets directory <id>/ holding a one-page file."""
    def prepare(fops: FileOps, n: int) -> None:
        for wid in range(n):
            fops.mkdir(str(wid))
            h = fops.create(f"{wid}/{fname}", data=True)
            fops.pwrite(h, _page_buffer(fops, wid), 0)
            fops.close(h)
    return prepare


def _dwol_worker(sync: bool, fname: str) -> Callable[[FileOps, Any, int], Op]:
    def worker(fops: FileOps, shared: Any, wid: int) -> Op:
        h = fops.open(f"{wid}/{fname}", data=True)
        buf = _page_buffer(fops, wid)
        pack_into, pwrite, fsync = _HDR.pack_into, fops.pwrite, fops.fsync

        if sync:
            def op(seq: int) -> None:
                pack_into(buf, 0, wid, seq)
                pwrite(h, buf, 0)
                fsync(h)
        else:
            def op(seq: int) -> None:
                pack_into(buf, 0, wid, seq)
                pwrite(h, buf, 0)
        return op
    return worker


def _own_page_check(fname: str, written: bool) -> Check:
    def check(fops: FileOps, shared: Any, n: int, worker_ops: list[int]) -> str | None:
        for wid in range(n):
            h = fops.open(f"{wid}/{fname}")
            try:
                if fops.size(h) != PAGE:
                    return f"{wid}/{fname}: size {fops.size(h)}, expected {PAGE}"
                seq = worker_ops[wid] if written else 0
                why = _expect_page(fops, h, 0, page_pattern(wid, seq), f"{wid}/{fname}")
            finally:
                fops.close(h)
            if why:
                return why
        return None
    return check


DWOL = Workload("DWOL", "overwrite 4 KiB at offset 0 of its own file", "low",
                _own_page_prepare("dwol.dat"), _dwol_worker(False, "dwol.dat"),
                _own_page_check("dwol.dat", True), lambda n: n * PAGE)
DWSL = Workload("DWSL", "pwrite 4 KiB at offset 0 of its own file, then fsync", "low",
                _own_page_prepare("dwsl.dat"), _dwol_worker(True, "dwsl.dat"),
                _own_page_check("dwsl.dat", True), lambda n: n * PAGE)


def _drbl_worker(fops: FileOps, shared: Any, wid: int) -> Op:
    h = fops.open(f"{wid}/drbl.dat", data=True)
    return _reader(fops, h, 0)


def _reader(fops: FileOps, h: Any, off: int) -> Op:
    buf = fops.buffer(PAGE)
    pread_into = fops.pread_into

    def op(seq: int) -> None:
        if pread_into(h, buf, off) != PAGE:
            raise OSError(f"short read at offset {off}")
    return op


DRBL = Workload("DRBL", "pread 4 KiB at offset 0 of its own file", "low",
                _own_page_prepare("drbl.dat"), _drbl_worker,
                _own_page_check("drbl.dat", False), lambda n: n * PAGE)

# ------------------------------------------------------------- DWAL
DWAL_WRAP = 64 * MiB           # a worker's file is emptied (untimed) when it reaches this


def _empty_file_prepare(fname: str) -> Callable[[FileOps, int], None]:
    """Each worker gets directory <id>/ holding an empty file."""
    def prepare(fops: FileOps, n: int) -> None:
        for wid in range(n):
            fops.mkdir(str(wid))
            fops.close(fops.create(f"{wid}/{fname}", data=True))
    return prepare


def _dwal_worker(fops: FileOps, shared: Any, wid: int) -> Op:
    h = fops.open(f"{wid}/dwal.dat", data=True)
    buf = _page_buffer(fops, wid)
    pack_into, pwrite = _HDR.pack_into, fops.pwrite
    end = [0]

    def op(seq: int) -> float | None:
        pack_into(buf, 0, wid, seq)
        off = end[0]
        pwrite(h, buf, off)
        off += PAGE
        if off < DWAL_WRAP:
            end[0] = off
            return None
        end[0] = 0
        return _untimed(lambda: fops.ftruncate(h, 0))
    return op


def _dwal_check(fops: FileOps, shared: Any, n: int, worker_ops: list[int]) -> str | None:
    per_file = DWAL_WRAP // PAGE
    for wid in range(n):
        path = f"{wid}/dwal.dat"
        ops = worker_ops[wid]
        pages = ops % per_file
        h = fops.open(path)
        try:
            if fops.size(h) != pages * PAGE:
                return f"{path}: size {fops.size(h)}, expected {pages * PAGE}"
            if pages:
                # The first and the last page of the current round.
                for page, seq in ((0, ops - pages + 1), (pages - 1, ops)):
                    why = _expect_page(fops, h, page * PAGE, page_pattern(wid, seq), path)
                    if why:
                        return why
        finally:
            fops.close(h)
    return None


DWAL = Workload("DWAL", "append 4 KiB to its own file", "low",
                _empty_file_prepare("dwal.dat"), _dwal_worker, _dwal_check,
                lambda n: n * DWAL_WRAP)

# ------------------------------------------------------------- DWBL (not in FxMark)
DWBL_WRAP = 64 * MiB           # a worker's file is written again from its start


def _dwbl_worker(fops: FileOps, shared: Any, wid: int) -> Op:
    h = fops.open(f"{wid}/dwbl.dat", data=True)
    buf = fops.buffer(MiB)
    buf[:] = bytes([0x41 + wid % 26]) * MiB
    pack_into, pwrite = _HDR.pack_into, fops.pwrite
    chunks = DWBL_WRAP // MiB

    def op(seq: int) -> None:
        pack_into(buf, 0, wid, seq)            # op seq's chunk starts with its header
        pwrite(h, buf, (seq - 1) % chunks * MiB)
    return op


def _dwbl_check(fops: FileOps, shared: Any, n: int, worker_ops: list[int]) -> str | None:
    chunks = DWBL_WRAP // MiB
    for wid in range(n):
        path = f"{wid}/dwbl.dat"
        ops = worker_ops[wid]
        h = fops.open(path)
        try:
            if fops.size(h) != min(ops, chunks) * MiB:
                return f"{path}: size {fops.size(h)}, expected {min(ops, chunks) * MiB}"
            for c in range(min(ops, chunks)):
                # chunk c holds the last op k <= ops with (k - 1) % chunks == c
                k = ops - (ops - 1 - c) % chunks
                why = _expect_page(fops, h, c * MiB, page_pattern(wid, k), path) or \
                    _expect_page(fops, h, (c + 1) * MiB - PAGE, bytes([0x41 + wid % 26]) * PAGE,
                                 path)
                if why:
                    return why
        finally:
            fops.close(h)
    return None


DWBL = Workload("DWBL", "write its own file sequentially in 1 MiB pieces (not in FxMark)",
                "low", _empty_file_prepare("dwbl.dat"), _dwbl_worker, _dwbl_check,
                lambda n: n * DWBL_WRAP)

# ------------------------------------------------------------- DWTL
DWTL_PAGES = 4096              # each worker's file starts at 16 MiB


def _dwtl_prepare(fops: FileOps, n: int) -> None:
    for wid in range(n):
        fops.mkdir(str(wid))
        h = fops.create(f"{wid}/dwtl.dat", data=True)
        _fill(fops, h, DWTL_PAGES * PAGE, 0x41 + wid % 26)
        fops.close(h)


def _dwtl_worker(fops: FileOps, shared: Any, wid: int) -> Op:
    h = fops.open(f"{wid}/dwtl.dat", data=True)
    ftruncate = fops.ftruncate
    pages = [DWTL_PAGES]

    def regrow() -> None:
        _fill(fops, h, DWTL_PAGES * PAGE, 0x41 + wid % 26, start=PAGE)

    def op(seq: int) -> float | None:
        p = pages[0] - 1
        ftruncate(h, p * PAGE)
        if p > 1:
            pages[0] = p
            return None
        # Down to one page, as FxMark's loop ends: write the file back to its
        # full size, untimed, and go on shrinking.
        pages[0] = DWTL_PAGES
        return _untimed(regrow)
    return op


def _dwtl_check(fops: FileOps, shared: Any, n: int, worker_ops: list[int]) -> str | None:
    for wid in range(n):
        path = f"{wid}/dwtl.dat"
        pages = DWTL_PAGES - worker_ops[wid] % (DWTL_PAGES - 1)
        h = fops.open(path)
        try:
            if fops.size(h) != pages * PAGE:
                return f"{path}: size {fops.size(h)}, expected {pages * PAGE}"
            fill = bytes([0x41 + wid % 26]) * PAGE
            for off in (0, (pages - 1) * PAGE):
                if read(fops, h, PAGE, off) != fill:
                    return f"{path}: wrong contents at offset {off}"
        finally:
            fops.close(h)
    return None


DWTL = Workload("DWTL", "shrink its own file by 4 KiB with ftruncate", "low",
                _dwtl_prepare, _dwtl_worker, _dwtl_check, lambda n: n * DWTL_PAGES * PAGE)

# ------------------------------------------------------------- DWOM / DRBM
STRIDE = 8 * MiB               # worker k's page sits at k x 8 MiB of the shared file
FILL = 0x5A                    # pre-fill byte: tells pre-filled data from holes


def _shared_prepare(fname: str) -> Callable[[FileOps, int], Any]:
    """One shared file of (n + 1) x 8 MiB, pre-filled in big pieces and fsynced."""
    def prepare(fops: FileOps, n: int) -> int:
        h = fops.create(fname, data=True)
        size = (n + 1) * STRIDE
        _fill(fops, h, size, FILL)
        fops.fsync(h)
        fops.close(h)
        return size
    return prepare


def _dwom_worker(fops: FileOps, size: int, wid: int) -> Op:
    h = fops.open("dwom.dat", data=True)     # each worker opens the file itself
    off = wid * STRIDE
    # One buffer changed in place: only the 16-byte header differs between
    # ops, so building the page costs next to nothing inside the timed loop.
    buf = _page_buffer(fops, wid)
    pack_into, pwrite = _HDR.pack_into, fops.pwrite

    def op(seq: int) -> None:
        pack_into(buf, 0, wid, seq)
        pwrite(h, buf, off)
    return op


def _shared_check(fname: str, written: bool) -> Check:
    def check(fops: FileOps, size: int, n: int, worker_ops: list[int]) -> str | None:
        h = fops.open(fname)
        try:
            if fops.size(h) != size:
                return f"{fname}: size {fops.size(h)}, expected {size}"
            fill = bytes([FILL]) * PAGE
            for wid in range(n):
                off = wid * STRIDE
                want = page_pattern(wid, worker_ops[wid]) if written and worker_ops[wid] \
                    else fill
                why = _expect_page(fops, h, off, want, f"{fname}, worker {wid}'s page")
                if why:
                    return why
                # The page after it was never written by anyone: still the pre-fill.
                if read(fops, h, PAGE, off + PAGE) != fill:
                    return f"{fname}: the page after worker {wid}'s page lost its pre-fill"
            if read(fops, h, PAGE, size - PAGE) != fill:
                return f"{fname}: the last page lost its pre-fill"
        finally:
            fops.close(h)
        return None
    return check


def _drbm_worker(fops: FileOps, size: int, wid: int) -> Op:
    return _reader(fops, fops.open("drbm.dat", data=True), wid * STRIDE)


DWOM = Workload("DWOM", "pwrite 4 KiB at offset id x 8 MiB of one shared file", "medium",
                _shared_prepare("dwom.dat"), _dwom_worker, _shared_check("dwom.dat", True),
                lambda n: (n + 1) * STRIDE)
DRBM = Workload("DRBM", "pread 4 KiB at offset id x 8 MiB of one shared file", "medium",
                _shared_prepare("drbm.dat"), _drbm_worker, _shared_check("drbm.dat", False),
                lambda n: (n + 1) * STRIDE)

# ------------------------------------------------------------- DRBH


def _drbh_prepare(fops: FileOps, n: int) -> None:
    h = fops.create("drbh.dat", data=True)
    fops.pwrite(h, _page_buffer(fops, 0), 0)
    fops.fsync(h)
    fops.close(h)


def _drbh_worker(fops: FileOps, shared: Any, wid: int) -> Op:
    return _reader(fops, fops.open("drbh.dat", data=True), 0)


def _drbh_check(fops: FileOps, shared: Any, n: int, worker_ops: list[int]) -> str | None:
    h = fops.open("drbh.dat")
    try:
        if fops.size(h) != PAGE:
            return f"drbh.dat: size {fops.size(h)}, expected {PAGE}"
        return _expect_page(fops, h, 0, page_pattern(0, 0), "drbh.dat")
    finally:
        fops.close(h)


DRBH = Workload("DRBH", "pread 4 KiB at offset 0 of one shared one-page file", "high",
                _drbh_prepare, _drbh_worker, _drbh_check, lambda n: PAGE)

# =====================================================================
# Metadata workloads
# =====================================================================


def _own_dirs(fops: FileOps, n: int) -> None:
    for wid in range(n):
        fops.mkdir(str(wid))


# ------------------------------------------------------------- MWCL / MWCM
def _mwcl_worker(fops: FileOps, shared: Any, wid: int) -> Op:
    create, close = fops.create, fops.close
    prefix = f"{wid}/c-"

    def op(seq: int) -> None:
        close(create(prefix + str(seq)))
    return op


def _mwcl_check(fops: FileOps, shared: Any, n: int, worker_ops: list[int]) -> str | None:
    for wid in range(n):
        why = _expect_names(fops, str(wid), {f"c-{i}" for i in range(1, worker_ops[wid] + 1)})
        if why:
            return why
    return None


def _mwcm_worker(fops: FileOps, shared: Any, wid: int) -> Op:
    create, close, pwrite = fops.create, fops.close, fops.pwrite
    buf = _page_buffer(fops, wid)
    pack_into = _HDR.pack_into
    prefix = f"m-{wid}-"

    def op(seq: int) -> None:
        pack_into(buf, 0, wid, seq)
        h = create(prefix + str(seq), data=True)
        pwrite(h, buf, 0)
        close(h)
    return op


def _mwcm_check(fops: FileOps, shared: Any, n: int, worker_ops: list[int]) -> str | None:
    for wid in range(n):
        ops = worker_ops[wid]
        prefix = f"m-{wid}-"
        why = _expect_names(fops, "", {f"{prefix}{i}" for i in range(1, ops + 1)}, prefix)
        if why:
            return why
        if ops:
            h = fops.open(f"{prefix}{ops}")
            try:
                why = _expect_page(fops, h, 0, page_pattern(wid, ops), f"{prefix}{ops}")
            finally:
                fops.close(h)
            if why:
                return why
    return None


# The create workloads make files for as long as they run.  Sizing the image for
# this many creates per second and worker keeps ENOSPC out of the measurement
# (the engine makes up to 20,000 a second per worker); a faster target would
# fail the run with ENOSPC, never report a false rate.
CREATES_PER_SEC = 30_000


def _created(n: int, d: float) -> int:
    return int(n * (d + 0.5) * CREATES_PER_SEC)


MWCL = Workload("MWCL", "create and close an empty file in its own directory", "low",
                _own_dirs, _mwcl_worker, _mwcl_check, lambda n: 0, _created)
MWCM = Workload("MWCM", "create, write 4 KiB, close a file in the shared directory",
                "medium", lambda fops, n: None, _mwcm_worker, _mwcm_check,
                lambda n: 0, _created, PAGE)

# ------------------------------------------------------------- MWUL / MWUM / MWRM
POOL = 4096                    # files pre-created per worker, and per refill


def _pool_dir(shared_dir: bool, wid: int) -> tuple[str, str]:
    """(directory, name prefix) of worker wid's pool of files."""
    return ("", f"u-{wid}-") if shared_dir else (str(wid), "u-")


def _join(d: str, name: str) -> str:
    return f"{d}/{name}" if d else name


# Files stocked per op a worker is expected to do.  A run should use up well
# under half of its stock: a directory that loses most of its names meets its
# log's compaction (pnova compacts a directory's log once it holds four times
# its live entries, after 60% of its names are gone), and whether a run of two
# seconds reached that point moved its rate by a few percent.  The creates
# that time the estimate run slower than the unlinks and moves they stand for,
# most where several workers stock at once (two engine workers created 10-11 k
# files a second each while stocking and then unlinked 15-16 k a second): with
# 1.3 two-worker runs used 56-65% of their stock and compacted, one-worker runs
# 46-56% and did not; with 2.0 two-worker runs still used 60%.
STOCK_MARGIN = 3.0


def _stock_limit(d: float) -> int:
    """The most files one worker stocks for a run of ``d`` seconds: STOCK_MARGIN
    times what it could use up at CREATES_PER_SEC, in whole pools."""
    return POOL * -(-int(STOCK_MARGIN * (d + 0.5) * CREATES_PER_SEC) // POOL)


def _pool_files(n: int, d: float) -> int:
    """A full stock and a refill per worker, alive at once at most."""
    return n * (_stock_limit(d) + POOL) + n


def _make_pool(fops: FileOps, d: str, prefix: str, start: int) -> None:
    for k in range(start, start + POOL):
        fops.close(fops.create(_join(d, f"{prefix}{k}")))


def _pool_created(ops: int, stocked: int) -> int:
    """Files a worker has created after ``ops`` ops: its stock, plus a pool per
    exhaustion."""
    return stocked + POOL * -(-max(0, ops - stocked) // POOL)


def _pools(n: int) -> dict[str, list[int]]:
    """The shared state of a pool workload: files stocked per worker (filled in
    by the workers' ``stock``)."""
    return {"stocked": [0] * n}


def _stock_pools(where: Callable[[int], tuple[str, str]]
                 ) -> Callable[[FileOps, Any, int, float], int]:
    """The stock step of a pool workload whose worker ``wid`` uses up files
    ``where(wid)`` = (directory, name prefix)."""
    def stock(fops: FileOps, shared: Any, wid: int, seconds: float) -> int:
        """Give worker ``wid`` the files it should use up in ``seconds``: the
        rate at which it creates them estimates the rate of its ops, and the
        device's sizing (:func:`_stock_limit`) bounds it. The fastest pool so
        far sets the rate: the first ones meet a cold image and the other
        workers stocking at the same time, and would set it too low."""
        d, prefix = where(wid)
        limit = _stock_limit(seconds)
        stocked, rate = 0, 0.0
        while True:
            took = _untimed(lambda: _make_pool(fops, d, prefix, stocked))
            stocked += POOL
            rate = max(rate, POOL / max(took, 1e-6))
            want = POOL * -(-int(rate * STOCK_MARGIN * (seconds + 0.5)) // POOL)
            if stocked >= min(limit, want):
                break
        shared["stocked"][wid] = stocked
        return stocked
    return stock


def _unlink_prepare(shared_dir: bool) -> Callable[[FileOps, int], Any]:
    def prepare(fops: FileOps, n: int) -> dict[str, list[int]]:
        for wid in range(n):
            d, _ = _pool_dir(shared_dir, wid)
            if d:
                fops.mkdir(d)
        return _pools(n)
    return prepare


def _pool_op(fops: FileOps, d: str, prefix: str, use: Callable[[int], object],
             stocked: int) -> Op:
    """The op that calls ``use(k)`` on pool file k = seq - 1, making the next pool of
    files (untimed) in directory ``d`` when the ``stocked`` ones are used up."""
    created = [stocked]

    def op(seq: int) -> float | None:
        k = seq - 1
        paused = None
        if k == created[0]:
            paused = _untimed(lambda: _make_pool(fops, d, prefix, k))
            created[0] += POOL
        use(k)
        return paused
    return op


def _unlink_worker(shared_dir: bool) -> Callable[[FileOps, Any, int], Op]:
    def worker(fops: FileOps, shared: Any, wid: int) -> Op:
        d, prefix = _pool_dir(shared_dir, wid)
        base = _join(d, prefix)
        unlink = fops.unlink
        return _pool_op(fops, d, prefix, lambda k: unlink(base + str(k)),
                        shared["stocked"][wid])
    return worker


def _unlink_check(shared_dir: bool) -> Check:
    def check(fops: FileOps, shared: Any, n: int, worker_ops: list[int]) -> str | None:
        for wid in range(n):
            d, prefix = _pool_dir(shared_dir, wid)
            ops = worker_ops[wid]
            want = {f"{prefix}{k}"
                    for k in range(ops, _pool_created(ops, shared["stocked"][wid]))}
            why = _expect_names(fops, d, want, prefix)
            if why:
                return why
        return None
    return check


MWUL = Workload("MWUL", "unlink a pre-created file in its own directory", "low",
                _unlink_prepare(False), _unlink_worker(False), _unlink_check(False),
                lambda n: 0, _pool_files,
                stock=_stock_pools(lambda wid: _pool_dir(False, wid)))
MWUM = Workload("MWUM", "unlink a pre-created file in the shared directory", "medium",
                _unlink_prepare(True), _unlink_worker(True), _unlink_check(True),
                lambda n: 0, _pool_files,
                stock=_stock_pools(lambda wid: _pool_dir(True, wid)),
                settle=lambda fops, shared, wid: fops.stat(""))


def _mwrm_pool(wid: int) -> tuple[str, str]:
    """(directory, name prefix) of MWRM worker wid's pool of files."""
    return str(wid), f"u-{wid}-"


def _mwrm_prepare(fops: FileOps, n: int) -> dict[str, list[int]]:
    for wid in range(n):
        fops.mkdir(_mwrm_pool(wid)[0])
    return _pools(n)


def _mwrm_worker(fops: FileOps, shared: Any, wid: int) -> Op:
    d, prefix = _mwrm_pool(wid)
    rename = fops.rename

    def move(k: int) -> None:
        name = prefix + str(k)
        rename(f"{d}/{name}", name)
    return _pool_op(fops, d, prefix, move, shared["stocked"][wid])


def _mwrm_check(fops: FileOps, shared: Any, n: int, worker_ops: list[int]) -> str | None:
    for wid in range(n):
        prefix, ops = f"u-{wid}-", worker_ops[wid]
        why = (_expect_names(fops, "", {f"{prefix}{k}" for k in range(ops)}, prefix)
               or _expect_names(fops, str(wid),
                                {f"{prefix}{k}" for k in
                                 range(ops, _pool_created(ops, shared["stocked"][wid]))}))
        if why:
            return why
    return None


MWRM = Workload("MWRM", "rename a file from its own directory into the shared one",
                "medium", _mwrm_prepare, _mwrm_worker, _mwrm_check, lambda n: 0,
                _pool_files, stock=_stock_pools(_mwrm_pool))

# ------------------------------------------------------------- MWRL


def _mwrl_prepare(fops: FileOps, n: int) -> None:
    for wid in range(n):
        fops.mkdir(str(wid))
        fops.close(fops.create(f"{wid}/r-0"))


def _mwrl_worker(fops: FileOps, shared: Any, wid: int) -> Op:
    rename = fops.rename
    prefix = f"{wid}/r-"

    def op(seq: int) -> None:
        rename(prefix + str(seq - 1), prefix + str(seq))
    return op


def _mwrl_check(fops: FileOps, shared: Any, n: int, worker_ops: list[int]) -> str | None:
    for wid in range(n):
        why = _expect_names(fops, str(wid), {f"r-{worker_ops[wid]}"})
        if why:
            return why
    return None


MWRL = Workload("MWRL", "rename a file within its own directory", "low",
                _mwrl_prepare, _mwrl_worker, _mwrl_check, lambda n: 0,
                lambda n, d: 2 * n)

# ------------------------------------------------------------- MRPL / MRPM / MRPH
FANOUT, DEPTH = 8, 5           # the shared tree: 8^4 directories, 8 files in each
_PATHS = 4096                  # random paths a MRPM worker cycles through
_TREE = sum(FANOUT ** k for k in range(1, DEPTH + 1))     # its directories and files


def _mrpl_prepare(fops: FileOps, n: int) -> None:
    for wid in range(n):
        path = str(wid)
        fops.mkdir(path)
        for _ in range(DEPTH - 2):
            path += "/0"
            fops.mkdir(path)
        fops.close(fops.create(path + "/0"))


def _stat_worker(paths_of: Callable[[int], list[str]]) -> Callable[[FileOps, Any, int], Op]:
    def worker(fops: FileOps, shared: Any, wid: int) -> Op:
        paths = paths_of(wid)
        mask = len(paths) - 1          # a power of two
        stat = fops.stat

        def op(seq: int) -> None:
            stat(paths[seq & mask])
        return op
    return worker


def _tree_prepare(fops: FileOps, n: int) -> None:
    def make(prefix: str, level: int) -> None:
        for i in range(FANOUT):
            path = f"{prefix}{i}"
            if level == DEPTH:
                fops.close(fops.create(path))
            else:
                fops.mkdir(path)
                make(path + "/", level + 1)
    make("", 1)


def _random_paths(wid: int) -> list[str]:
    # Chosen before the clock starts, so the loop does only the stat; each
    # worker has its own sequence.
    rng = random.Random(wid)
    return ["/".join(str(rng.randrange(FANOUT)) for _ in range(DEPTH)) for _ in range(_PATHS)]


def _stat_check(paths_of: Callable[[int], list[str]]) -> Check:
    def check(fops: FileOps, shared: Any, n: int, worker_ops: list[int]) -> str | None:
        for wid in range(n):
            for path in paths_of(wid)[:64]:
                try:
                    fops.stat(path)
                except OSError as e:
                    return f"{path}: {e.strerror}"
        return None
    return check


def _mrpl_paths(wid: int) -> list[str]:
    return [f"{wid}" + "/0" * (DEPTH - 1)]


def _mrph_paths(wid: int) -> list[str]:
    return ["/".join("0" * DEPTH)]


MRPL = Workload("MRPL", "stat a path in its own directory tree", "low",
                _mrpl_prepare, _stat_worker(_mrpl_paths), _stat_check(_mrpl_paths),
                lambda n: 0)
MRPM = Workload("MRPM", "stat a random path of one shared tree", "medium",
                _tree_prepare, _stat_worker(_random_paths), _stat_check(_random_paths),
                lambda n: 0, lambda n, d: _TREE)
MRPH = Workload("MRPH", "stat one path of one shared tree", "high",
                _tree_prepare, _stat_worker(_mrph_paths), _stat_check(_mrph_paths),
                lambda n: 0, lambda n, d: _TREE)

# ------------------------------------------------------------- MRDL / MRDM
DIR_FILES = 1024               # entries in each directory that is read


def _mrd_prepare(shared_dir: bool) -> Callable[[FileOps, int], None]:
    def prepare(fops: FileOps, n: int) -> None:
        for d in ([""] if shared_dir else [str(w) for w in range(n)]):
            if d:
                fops.mkdir(d)
            for k in range(DIR_FILES):
                fops.close(fops.create(_join(d, f"d-{k}")))
    return prepare


def _mrd_worker(shared_dir: bool) -> Callable[[FileOps, Any, int], Op]:
    def worker(fops: FileOps, shared: Any, wid: int) -> Op:
        d = "" if shared_dir else str(wid)
        listdir = fops.listdir

        def op(seq: int) -> None:
            # One op reads the whole directory (FxMark counts readdir calls,
            # including empty ones past its end).
            if len(listdir(d)) != DIR_FILES:
                raise OSError(f"directory {d or '/'} lost entries")
        return op
    return worker


def _mrd_check(shared_dir: bool) -> Check:
    def check(fops: FileOps, shared: Any, n: int, worker_ops: list[int]) -> str | None:
        want = {f"d-{k}" for k in range(DIR_FILES)}
        for d in ([""] if shared_dir else [str(w) for w in range(n)]):
            why = _expect_names(fops, d, want, "d-")
            if why:
                return why
        return None
    return check


MRDL = Workload("MRDL", "read its own directory", "low",
                _mrd_prepare(False), _mrd_worker(False), _mrd_check(False), lambda n: 0,
                lambda n, d: n * (DIR_FILES + 1))
MRDM = Workload("MRDM", "read the shared directory", "medium",
                _mrd_prepare(True), _mrd_worker(True), _mrd_check(True), lambda n: 0,
                lambda n, d: DIR_FILES)

WORKLOADS: dict[str, Workload] = {w.name: w for w in (
    DWAL, DWOL, DWOM, DWSL, DWTL, DWBL, DRBL, DRBM, DRBH,
    MWCL, MWCM, MWUL, MWUM, MWRL, MWRM, MRPL, MRPM, MRPH, MRDL, MRDM)}


def get(name: str) -> Workload:
    """The workload called ``name`` (case-insensitive); KeyError if unknown."""
    return WORKLOADS[name.upper()]
