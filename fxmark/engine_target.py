"""The ``engine`` target: worker processes driving :class:`pnova.engine.FileSystem`.

Each run gets a fresh device image (formatted with as many logical CPUs as the
largest worker count of the invocation, so that every run of one invocation
has the same geometry).  The parent mounts it with the lock scheme under test,
runs the workload's prepare step, switches the mount to shared multi-process
mode (``prepare_workers``) and forks the workers; worker ``k`` becomes logical
CPU ``k`` of the filesystem (``become_worker``) and is pinned to a real CPU.
While they run, the parent tops up the per-CPU rings of log pages
(``refill_rings``, the designated refiller of the ``pnova`` scheme).
After the workers exit the parent unmounts, mounts the image again, checks
the contents (the workload's ``check``) and runs fsck on the image: a run
whose data is wrong or whose image is inconsistent is a failed run, not a
fast one.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from typing import Any

from pnova.engine import FileSystem
from pnova.mkfs import format_device

from .fileops import EngineOps
from .targets import (RunConfig, adopt_stock, chain, device_size_for, fail, fsck_problem,
                      image_run, inodes_per_cpu_for, measure, one_line, split_scheme,
                      worker_op)
from .workers import Setup, run_workers, summarise
from .workloads import Workload


class EngineTarget:
    """Runs workloads on the engine, with a lock scheme per run."""

    label = "engine"
    uses_schemes = True

    def run(self, workload: Workload, scheme: str, nworkers: int, duration: float,
            cfg: RunConfig, tick: Callable[[], object] | None) -> dict[str, Any]:
        rec, _, tmp = image_run(workload, self.label, scheme, nworkers, duration, cfg)
        images = self._images(rec, workload, nworkers, duration, cfg, tmp)
        size = rec["device_size"]
        try:
            self._run(rec, workload, scheme, nworkers, duration, cfg, images, size, tick)
        except Exception as e:                 # noqa: BLE001 - a failed run, reported as such
            fail(rec, one_line(e))
        finally:
            if cfg.keep:
                rec["image"] = images[0] if len(images) == 1 else images
            else:
                shutil.rmtree(tmp, ignore_errors=True)
        return rec

    def _images(self, rec: dict[str, Any], workload: Workload, nworkers: int,
                duration: float, cfg: RunConfig, tmp: str) -> list[str]:
        """The run's image paths (one, shared by every worker)."""
        return [os.path.join(tmp, "pnova.img")]

    def _run(self, rec: dict[str, Any], workload: Workload, scheme: str, nworkers: int,
             duration: float, cfg: RunConfig, images: list[str], size: int,
             tick: Callable[[], object] | None) -> None:
        [image] = images
        fs, shared = _prepared(image, size, rec, cfg, scheme, workload, nworkers, duration)
        try:
            fops = EngineOps(fs)

            def setup(wid: int) -> None:
                # Runs in the forked worker: it becomes logical CPU wid of the
                # filesystem (its own log, allocator region and lock identity).
                fs.become_worker(cpu=wid)

            # The parent is the designated refiller of the per-CPU log-page
            # rings (a no-op unless the scheme uses them), as pNOVA's refill
            # thread is.
            def teardown(wid: int) -> None:
                # a compaction whose chain is on its way to a disk is switched
                # (or its blocks would stay taken in the image)
                fs.finish_compactions()

            numbers = measure(workload, fops, shared, nworkers, duration, cfg, setup,
                              chain(fs.refill_rings, tick), teardown)
        finally:
            fs.unmount()
        rec.update(numbers)
        if not cfg.verify or "failed" in rec:
            return
        why = _check_image(workload, image, shared, nworkers, rec["worker_ops"], "")
        if why:
            fail(rec, why)


class EngineApartTarget(EngineTarget):
    """The engine with nothing shared between workers: the ceiling of its scaling.

    Worker ``k`` works on an image of its own, prepared for one worker and
    mounted as the one-worker run of ``engine`` mounts it, and is pinned to
    real CPU ``k`` as an ``engine`` worker is; all start at the same moment
    and their operations are summed.  Its one-worker point is the same run
    as ``engine``'s.  No lock, cache, log or allocator is shared, so the
    speed-up of ``engine-apart`` is what the machine gives the engine's code
    with more processes (caches, memory, the host's other load): beside it,
    ``engine``'s speed-up says how much of that the sharing keeps.
    """

    label = "engine-apart"

    def _images(self, rec: dict[str, Any], workload: Workload, nworkers: int,
                duration: float, cfg: RunConfig, tmp: str) -> list[str]:
        """An image per worker, each sized for one worker's files."""
        size = cfg.device_size or device_size_for(workload, 1, duration)
        rec.update(device_size=size, images=nworkers,
                   inodes_per_cpu=inodes_per_cpu_for(workload, 1, duration, size, cfg.ncpus))
        return [os.path.join(tmp, f"pnova-{k}.img") for k in range(nworkers)]

    def _run(self, rec: dict[str, Any], workload: Workload, scheme: str, nworkers: int,
             duration: float, cfg: RunConfig, images: list[str], size: int,
             tick: Callable[[], object] | None) -> None:
        fss: list[FileSystem] = []
        shares: list[Any] = []
        try:
            for image in images:
                fs, shared = _prepared(image, size, rec, cfg, scheme, workload, 1, duration)
                fss.append(fs)
                shares.append(shared)

            def setup(wid: int) -> Setup:
                fss[wid].become_worker(cpu=0)
                return worker_op(workload, EngineOps(fss[wid]), shares[wid], 0, duration)

            def teardown(wid: int) -> None:
                fss[wid].finish_compactions()

            refill = [fs.refill_rings for fs in fss]
            pool = run_workers(len(images), setup, duration, fail_worker=cfg.fail_worker,
                               background=chain(*refill, tick), teardown=teardown)
            numbers = summarise(pool)
            adopt_stock(workload, shares, numbers)
        finally:
            for fs in fss:
                fs.unmount()
        rec.update(numbers)
        if not cfg.verify or "failed" in rec:
            return
        for k, image in enumerate(images):
            why = _check_image(workload, image, shares[k], 1, [rec["worker_ops"][k]],
                               f" of worker {k}'s image")
            if why:
                fail(rec, why)
                return


def _prepared(image: str, size: int, rec: dict[str, Any], cfg: RunConfig, scheme: str,
              workload: Workload, nworkers: int, duration: float) -> tuple[FileSystem, Any]:
    """A fresh image formatted and mounted for the scheme, with the workload
    prepared for ``nworkers`` and the mount switched to shared multi-process
    mode: (the mount, the workload's shared state)."""
    lock, features = split_scheme(scheme)
    format_device(image, size, numa_nodes=1, cpus_per_node=cfg.ncpus, features=features,
                  inodes_per_cpu=rec["inodes_per_cpu"])
    fs = FileSystem.mount(image, cpu=0, lock=lock, segment_pages=cfg.segment_pages)
    try:
        fops = EngineOps(fs)
        # Preparation runs on logical CPU 0 alone, before the mount goes
        # multi-process, as FxMark's worker 0 prepares the shared files; each
        # worker stocks its own (targets.worker_op).
        shared = workload.prepare(fops, nworkers)
        fs.prepare_workers(workers=nworkers)
    except BaseException:
        fs.unmount()
        raise
    return fs, shared


def _check_image(workload: Workload, image: str, shared: Any, nworkers: int,
                 worker_ops: list[int], whose: str) -> str | None:
    """Why a run's image is wrong after it (its contents, then fsck), or None."""
    fs = FileSystem.mount(image, cpu=0)
    try:
        why = workload.check(EngineOps(fs), shared, nworkers, worker_ops)
    finally:
        fs.unmount()
    if why:
        return f"wrong contents{whose} after the run: {why}"
    return fsck_problem(image)
