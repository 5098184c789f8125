"""The ``engine`` target: worker processes driving :class:`pnova.engine.FileSystem`.

Each run gets a fresh device image (formatted with as many logical CPUs as the
largest worker count of the invocation, so that every run of one invocation
has the same geometry).  The parent mounts it with the lock scheme under test,
runs the workload's prepare step, switches the mount to shared multi-process
mode (``prepare_workers``) and forks the workers; worker ``k`` becomes logical
CPU ``k`` of the filesystem (``become_worker``) and is pinned to a real CPU.
While they run, the parent tops up the per-CPU rings of log pages
(``refill_rings``, the designated refiller of the ``pnova`` scheme).
After the workers exit the parent unmounts, mounts the image again and checks
the file contents (the workload's ``check``): a run whose data is wrong is a
failed run, not a fast one.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from pnova.engine import FileSystem
from pnova.mkfs import format_device

from .workers import run_workers, summarise, usable_cpus
from .workloads import MiB, Op, Workload

ROOT = 1
DEFAULT_DEVICE = 256 * MiB


class EngineOps:
    """:class:`fxmark.workloads.FileOps` on a mounted engine; handles are inode numbers."""

    def __init__(self, fs: FileSystem) -> None:
        self.fs = fs

    def create(self, name: str) -> int:
        return self.fs.create(ROOT, name.encode(), 0o644).ino

    def open(self, name: str) -> int:
        return self.fs.lookup(ROOT, name.encode()).ino

    def pwrite(self, h: int, data: bytes | bytearray | memoryview, off: int) -> int:
        return self.fs.write(h, off, data)

    def pread(self, h: int, size: int, off: int) -> bytes:
        return self.fs.read(h, off, size)

    def fsync(self, h: int) -> None:
        self.fs.fsync(h)

    def size(self, h: int) -> int:
        return self.fs.getattr(h).size


def device_size_for(workload: Workload, nworkers: int) -> int:
    """256 MiB, or more when the workload's files need it.

    Copy-on-write needs room for a second copy of what is overwritten while
    old blocks wait to be freed, and logs and per-CPU reserves take some: twice
    the data plus 64 MiB, rounded up to a MiB.
    """
    need = 2 * workload.space(nworkers) + 64 * MiB
    return max(DEFAULT_DEVICE, (need + MiB - 1) // MiB * MiB)


def default_image_dir() -> str:
    """/dev/shm when writable (the device then lives in RAM, like pmem), else the temp dir."""
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK | os.X_OK):
        return "/dev/shm"
    return tempfile.gettempdir()


@dataclass
class EngineConfig:
    """Settings shared by every run of one invocation."""
    ncpus: int                             # logical CPUs of the formatted device
    device_size: int | None = None         # None: device_size_for(...)
    segment_pages: int = 16
    image_dir: str | None = None           # None: default_image_dir()
    keep: bool = False                     # keep the device image (its path is recorded)
    verify: bool = True                    # remount and check the contents afterwards
    fail_worker: int | None = None         # test hook, see fxmark.workers


def run_engine(workload: Workload, scheme: str, nworkers: int, duration: float,
               cfg: EngineConfig) -> dict[str, Any]:
    """One run; returns its record (see :func:`fxmark.workers.summarise`)."""
    rec: dict[str, Any] = {
        "workload": workload.name, "target": "engine", "scheme": scheme,
        "workers": nworkers, "duration": duration,
        "segment_pages": cfg.segment_pages, "ncpus": cfg.ncpus,
        "host_cpus": len(usable_cpus()),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    size = cfg.device_size or device_size_for(workload, nworkers)
    rec["device_size"] = size
    tmp = tempfile.mkdtemp(prefix=f"fxmark-{workload.name.lower()}-{scheme}-{nworkers}-",
                           dir=cfg.image_dir or default_image_dir())
    image = os.path.join(tmp, "pnova.img")
    try:
        rec.update(_run(workload, scheme, nworkers, duration, cfg, image, size))
    except Exception as e:                     # noqa: BLE001 - a failed run, reported as such
        rec.pop("ops_per_sec", None)
        rec["failed"] = f"{type(e).__name__}: {e}".splitlines()[0]
    finally:
        if cfg.keep:
            rec["image"] = image
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return rec


def _run(workload: Workload, scheme: str, nworkers: int, duration: float,
         cfg: EngineConfig, image: str, size: int) -> dict[str, Any]:
    format_device(image, size, numa_nodes=1, cpus_per_node=cfg.ncpus)
    fs = FileSystem.mount(image, cpu=0, lock=scheme, segment_pages=cfg.segment_pages)
    try:
        fops = EngineOps(fs)
        shared = workload.prepare(fops, nworkers)
        fs.prepare_workers()

        def setup(wid: int) -> Op:
            # Runs in the forked worker: it becomes logical CPU wid of the
            # filesystem (its own log, allocator region and lock identity).
            fs.become_worker(cpu=wid)
            return workload.worker(fops, shared, wid)

        # The parent is the designated refiller of the per-CPU log-page rings
        # (a no-op unless the scheme uses them), as pNOVA's refill thread is.
        pool = run_workers(nworkers, setup, duration, fail_worker=cfg.fail_worker,
                           background=fs.refill_rings)
    finally:
        fs.unmount()
    rec = summarise(pool)
    if cfg.verify and "failed" not in rec:
        fs = FileSystem.mount(image, cpu=0)
        try:
            why = workload.check(EngineOps(fs), shared, nworkers, rec["worker_ops"])
        finally:
            fs.unmount()
        if why is not None:
            for k in ("ops", "seconds", "ops_per_sec", "cpu"):
                del rec[k]
            rec["failed"] = f"wrong contents after the run: {why}"
    return rec
