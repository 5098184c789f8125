"""What a workload runs against, and the steps every run shares.

``--target`` values:

``engine``
    The pnova engine driven directly by the worker processes, one fresh
    device image per run (:mod:`fxmark.engine_target`).
``engine-apart``
    The same with nothing shared: each worker on an image of its own, all
    started together; its speed-up is the ceiling of ``engine``'s.
``pnova``
    A pnova FUSE mount made by the harness for each run: a fresh image,
    mounted with the lock scheme under test, used through system calls,
    unmounted and checked with fsck afterwards (:mod:`fxmark.mount_target`).
``DIR`` or ``LABEL=DIR``
    Any mounted directory (tmpfs, ext4 on a loop device, a pnova mount made
    by hand, ...), used through system calls; each run works in a fresh
    subdirectory that is removed afterwards.  The label (default: the
    filesystem type, then the path if two targets share a type) names the
    target in the results.

Lock schemes apply to ``engine``, ``engine-apart`` and ``pnova``; a directory target runs once
per worker count with scheme ``-``.
"""
from __future__ import annotations

import io
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from pnova.fsck import NO, Checker
from pnova.layout import BLOCK, INODE_SIZE, INODES_PER_BLOCK
from pnova.mkfs import default_inodes_per_cpu

from .fileops import FileOps
from .workers import PoolResult, Setup, run_workers, summarise, usable_cpus
from .workloads import Workload

NO_SCHEME = "-"


@dataclass
class RunConfig:
    """Settings shared by every run of one invocation."""
    ncpus: int                             # logical CPUs of formatted devices (max workers)
    device_size: int | None = None         # None: device_size_for(...)
    segment_pages: int = 16
    image_dir: str | None = None           # where device images go; None: default_image_dir()
    keep: bool = False                     # keep images / run directories (paths recorded)
    verify: bool = True                    # check contents (and fsck) after each run
    direct: bool = False                   # O_DIRECT for data files of directory targets
    fail_worker: int | None = None         # test hook, see fxmark.workers


class Target(Protocol):
    """One thing to benchmark."""
    label: str
    uses_schemes: bool

    def run(self, workload: Workload, scheme: str, nworkers: int, duration: float,
            cfg: RunConfig, tick: Callable[[], object] | None) -> dict[str, Any]:
        """One run; returns its record (see :mod:`fxmark.results`)."""


# What a pnova image is formatted to protect (mkfs.pnova's options): "full" is
# the default (data checksums and parity, inode replicas, log page twins),
# "slots" leaves the log page twins out, "data" every metadata replica, "csum"
# the parity too, "none" everything.
PROTECTIONS = {"full": 15, "slots": 7, "data": 3, "csum": 1, "none": 0}


def split_scheme(scheme: str) -> tuple[str, int]:
    """'pnova' -> ('pnova', full protection); 'pnova:none' -> ('pnova', 0): the
    lock scheme and the image features of a run (``fxmark run --protection``)."""
    lock, _, prot = scheme.partition(":")
    return lock, PROTECTIONS[prot or "full"]


MiB = 1 << 20
DEFAULT_DEVICE = 1024 * MiB
# Room for the logs of the directories that hold a workload's files, per file:
# a name's entry (about 64 bytes) and its twin, in a directory log that may
# grow to four times its live size before it is compacted (every directory,
# DESIGN 12), plus the new chain a compaction writes beside the old one.
# About 170 bytes a file were used when 516,000 files were moved into one
# directory by two workers (MWRM, 8 s), whose image, sized without this, ran
# out of blocks at the first refill.
DENTRY_ROOM = 2 * 64 * (4 + 1)


def device_size_for(workload: Workload, nworkers: int, duration: float = 5.0) -> int:
    """1 GiB, or more when the workload's files need it.

    Copy-on-write needs room for a second copy of what is overwritten while
    old blocks wait to be freed, and logs and per-CPU reserves take some: twice
    the data plus 64 MiB, rounded up to a MiB.  Every file the workload may
    hold at once takes a log page (and its twin), an inode slot and room for its
    name in a directory's log (:data:`DENTRY_ROOM`) besides, and the
    protection of blocks (parity and checksums: an eighth of the data area,
    SPEC 2.1) comes on top.  Images are sparse files, so only what a run
    touches takes memory.
    """
    files = workload.files(nworkers, duration)
    need = 2 * (workload.space(nworkers) + files * workload.file_bytes) + 64 * MiB \
        + files * (2 * BLOCK + INODE_SIZE + DENTRY_ROOM)    # a log page and its twin
    need += need // 7
    return max(DEFAULT_DEVICE, (need + MiB - 1) // MiB * MiB)


def inodes_per_cpu_for(workload: Workload, nworkers: int, duration: float, size: int,
                       ncpus: int) -> int | None:
    """Inode slots per CPU when mkfs's default (one per 16 KiB of device) would
    run out before the workload's files do; None: the default."""
    want = workload.files(nworkers, duration) + 1024
    total = size // BLOCK
    if default_inodes_per_cpu(total, ncpus) * ncpus >= want:
        return None
    per = -(-want // ncpus)
    return -(-per // INODES_PER_BLOCK) * INODES_PER_BLOCK


def default_image_dir() -> str:
    """/dev/shm when writable (the device then lives in RAM, like pmem), else the temp dir."""
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK | os.X_OK):
        return "/dev/shm"
    return tempfile.gettempdir()


def base_record(workload: Workload, target: str, scheme: str, nworkers: int,
                duration: float, cfg: RunConfig) -> dict[str, Any]:
    return {
        "workload": workload.name, "target": target, "scheme": scheme,
        "workers": nworkers, "duration": duration, "direct": cfg.direct,
        "host_cpus": len(usable_cpus()),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def image_run(workload: Workload, target: str, scheme: str, nworkers: int,
              duration: float, cfg: RunConfig) -> tuple[dict[str, Any], int, str]:
    """The start of a run on a fresh pnova image: (record, image size, a new
    directory for the image) -- the engine and pnova targets share it."""
    rec = base_record(workload, target, scheme, nworkers, duration, cfg)
    size = cfg.device_size or device_size_for(workload, nworkers, duration)
    rec.update(segment_pages=cfg.segment_pages, ncpus=cfg.ncpus, device_size=size,
               inodes_per_cpu=inodes_per_cpu_for(workload, nworkers, duration, size,
                                                 cfg.ncpus))
    tmp = tempfile.mkdtemp(prefix=f"fxmark-{workload.name.lower()}-{scheme}-{nworkers}-",
                           dir=cfg.image_dir or default_image_dir())
    return rec, size, tmp


def fail(rec: dict[str, Any], reason: str) -> dict[str, Any]:
    """Turn ``rec`` into a failed record: a reason and no throughput at all."""
    for k in ("ops", "seconds", "ops_per_sec", "cpu", "worker_cpu"):
        rec.pop(k, None)
    rec["failed"] = reason.splitlines()[0] if reason else "failed"
    return rec


def fsck_problem(image: str) -> str | None:
    """None when fsck finds a pnova image clean, else its first complaint."""
    out = io.StringIO()
    rc = Checker(image, policy=NO, force=True, out=out).run()
    if rc == 0:
        return None
    lines = [ln for ln in out.getvalue().splitlines() if ln.strip()]
    return f"fsck exit {rc}: {lines[0] if lines else 'problems found'}"


def one_line(e: BaseException) -> str:
    msg = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def measure(workload: Workload, fops: FileOps, shared: Any, nworkers: int,
            duration: float, cfg: RunConfig, setup: Callable[[int], None] | None,
            background: Callable[[], object] | None,
            teardown: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Run the workers of a prepared workload and summarise the run.

    ``setup(wid)``, if given, runs first in each forked worker (the engine
    target makes the worker a logical CPU of the filesystem there), then
    the workload's ``stock`` for that worker, and ``teardown(wid)`` in each
    once its time is up.
    """
    def worker_setup(wid: int) -> Setup:
        if setup is not None:
            setup(wid)
        return worker_op(workload, fops, shared, wid, duration)

    pool: PoolResult = run_workers(nworkers, worker_setup, duration,
                                   fail_worker=cfg.fail_worker, background=background,
                                   teardown=teardown)
    numbers = summarise(pool)
    adopt_stock(workload, [shared], numbers)
    return numbers


def worker_op(workload: Workload, fops: FileOps, shared: Any, wid: int,
              duration: float) -> Setup:
    """In worker ``wid``, once it is the worker: its own stock, if the workload
    has one, and its per-op function (with the count it stocked, and the
    workload's settle step, run once every worker has stocked)."""
    if workload.stock is None:
        return workload.worker(fops, shared, wid)
    stocked = workload.stock(fops, shared, wid, duration)
    op = workload.worker(fops, shared, wid)
    settle = workload.settle
    if settle is None:
        return op, stocked
    return op, stocked, lambda: settle(fops, shared, wid)


def adopt_stock(workload: Workload, shares: list[Any], numbers: dict[str, Any]) -> None:
    """Give the parent's shared state what the workers stocked (``shares``: one
    per worker's image, or one for all), for the workload's check."""
    got = numbers.get("worker_stocked")
    if workload.stock is None or got is None:
        return
    if len(shares) == 1:
        shares[0]["stocked"] = list(got)
    else:
        for share, n in zip(shares, got):
            share["stocked"] = [n]


def chain(*fns: Callable[[], object] | None) -> Callable[[], None] | None:
    """One callable running every given one in turn (None if there are none)."""
    todo = [f for f in fns if f is not None]
    if not todo:
        return None

    def run() -> None:
        for f in todo:
            f()
    return run


def parse_target(spec: str, taken: set[str]) -> Target:
    """The target a ``--target`` value names; ``taken`` holds labels already in use."""
    from .engine_target import EngineApartTarget, EngineTarget
    from .mount_target import DirTarget, PnovaMountTarget, fstype_of
    if spec == "engine":
        return EngineTarget()
    if spec == "engine-apart":
        return EngineApartTarget()
    if spec == "pnova":
        return PnovaMountTarget()
    if spec == "pnova-devfuse":
        return PnovaMountTarget("pnova-devfuse", uring=False)
    label, sep, path = spec.partition("=")
    if not sep:
        label, path = "", spec
    if not os.path.isdir(path):
        raise ValueError(f"target {spec!r}: not 'engine', 'engine-apart', 'pnova', "
                         "'pnova-devfuse' or a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"target {spec!r}: directory not writable")
    fstype = fstype_of(path)
    if not label:
        label = fstype if fstype not in taken else os.path.abspath(path)
    if label in taken or label in ("engine", "engine-apart", "pnova", "pnova-devfuse"):
        raise ValueError(f"target label {label!r} used twice; name it with LABEL=DIR")
    return DirTarget(label, os.path.abspath(path), fstype)
