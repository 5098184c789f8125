"""FxMark workloads, written against a small file-operations interface.

A workload has three parts, each a plain function:

``prepare(fops, nworkers) -> shared``
    Runs once, before the workers exist (FxMark's worker 0 preparing the
    shared files).  Returns whatever the workers need (handles, sizes); it is
    inherited by the forked workers, so it need not be picklable.
``worker(fops, shared, wid) -> op``
    Runs in worker ``wid`` before the start barrier; returns the per-op
    function ``op(seq)``, called with seq = 1, 2, 3, ... in the timed loop.
    Everything that is not the measured operation (buffers, offsets) is set
    up here, so that ``op`` does only what FxMark times.
``check(fops, shared, nworkers, worker_ops) -> str | None``
    After the run, on a fresh mount: verifies the file contents given how
    many ops each worker completed; returns None or a one-line reason.

The interface, :class:`FileOps`, is what a target provides (the engine
target maps it onto :class:`pnova.engine.FileSystem`; a mounted target would
map it onto os.open/os.pwrite).
"""
from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

PAGE = 4096
MiB = 1 << 20


class FileOps(Protocol):
    """The file operations a workload may use; handles are target-specific."""

    def create(self, name: str) -> Any:
        """Create an empty regular file in the root directory; return a handle."""

    def open(self, name: str) -> Any:
        """Return a handle of an existing file in the root directory."""

    def pwrite(self, h: Any, data: bytes | bytearray | memoryview, off: int) -> int:
        """Write ``data`` at ``off``; return the number of bytes written."""

    def pread(self, h: Any, size: int, off: int) -> bytes:
        """Read up to ``size`` bytes at ``off``."""

    def fsync(self, h: Any) -> None:
        """Make the file durable."""

    def size(self, h: Any) -> int:
        """The file's size in bytes."""


Op = Callable[[int], object]


@dataclass(frozen=True)
class Workload:
    """One FxMark microbenchmark (see the module docstring for the parts)."""
    name: str
    summary: str
    sharing: str                                   # low / medium / high, as FxMark labels it
    prepare: Callable[[FileOps, int], Any]
    worker: Callable[[FileOps, Any, int], Op]
    check: Callable[[FileOps, Any, int, list[int]], str | None]
    space: Callable[[int], int]                    # bytes of file data for n workers


# --------------------------------------------------------------------- DWOM
DWOM_STRIDE = 8 * MiB          # each worker's page sits at wid x 8 MiB
DWOM_FILE = "dwom"
DWOM_FILL = 0x5A               # pre-fill byte: tells pre-filled data from holes
DWOM_CHUNK = 1 * MiB           # pre-fill write size ("big chunks")
_HDR = struct.Struct("<QQ")    # (worker id, op sequence number) at the start of each page


def dwom_page(wid: int, seq: int) -> bytes:
    """The page worker ``wid`` writes in its op number ``seq``."""
    page = bytearray([0x41 + wid % 26]) * PAGE
    _HDR.pack_into(page, 0, wid, seq)
    return bytes(page)


def _dwom_prepare(fops: FileOps, nworkers: int) -> tuple[Any, int]:
    h = fops.create(DWOM_FILE)
    size = (nworkers + 1) * DWOM_STRIDE
    chunk = bytes([DWOM_FILL]) * DWOM_CHUNK
    for off in range(0, size, DWOM_CHUNK):
        fops.pwrite(h, chunk, off)
    fops.fsync(h)
    return h, size


def _dwom_worker(fops: FileOps, shared: tuple[Any, int], wid: int) -> Op:
    h = shared[0]
    off = wid * DWOM_STRIDE
    # One buffer, changed in place: only the 16-byte header differs between
    # ops, so building the page costs next to nothing inside the timed loop.
    page = bytearray(dwom_page(wid, 0))
    pack_into = _HDR.pack_into
    pwrite = fops.pwrite

    def op(seq: int) -> None:
        pack_into(page, 0, wid, seq)
        pwrite(h, page, off)

    return op


def _dwom_check(fops: FileOps, shared: tuple[Any, int], nworkers: int,
                worker_ops: list[int]) -> str | None:
    h = fops.open(DWOM_FILE)
    want_size = shared[1]
    if fops.size(h) != want_size:
        return f"{DWOM_FILE}: size {fops.size(h)}, expected {want_size}"
    fill = bytes([DWOM_FILL]) * PAGE
    for wid in range(nworkers):
        off = wid * DWOM_STRIDE
        got = fops.pread(h, PAGE, off)
        want = dwom_page(wid, worker_ops[wid]) if worker_ops[wid] else fill
        if got != want:
            if len(got) >= _HDR.size and got[_HDR.size:] == want[_HDR.size:]:
                w, s = _HDR.unpack_from(got)
                return (f"{DWOM_FILE}: worker {wid}'s page holds op {s} of worker {w}, "
                        f"expected op {worker_ops[wid]}")
            return f"{DWOM_FILE}: worker {wid}'s page at offset {off} has wrong content"
        # The page after it was never written by anyone: still the pre-fill.
        if fops.pread(h, PAGE, off + PAGE) != fill:
            return f"{DWOM_FILE}: the page after worker {wid}'s page lost its pre-fill"
    return None


DWOM = Workload(
    name="DWOM",
    summary="pwrite 4 KiB at offset id x 8 MiB of one shared file",
    sharing="medium",
    prepare=_dwom_prepare,
    worker=_dwom_worker,
    check=_dwom_check,
    space=lambda n: (n + 1) * DWOM_STRIDE,
)

WORKLOADS: dict[str, Workload] = {w.name: w for w in (DWOM,)}


def get(name: str) -> Workload:
    """The workload called ``name`` (case-insensitive); KeyError if unknown."""
    return WORKLOADS[name.upper()]
