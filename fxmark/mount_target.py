"""Targets used through system calls: any directory, and pnova mounts the harness makes.

:class:`DirTarget` runs each workload in a fresh subdirectory of a directory
the user names (tmpfs, ext4, a pnova mount made by hand, ...) and removes it
afterwards.  :class:`PnovaMountTarget` formats a fresh image for each run,
mounts it with ``pnova -f -o lock=SCHEME`` on a temporary mount point, runs
the workload there, checks the contents through the mount, unmounts, and
checks the image with fsck: the same engine, lock schemes and checks as the
``engine`` target, with the kernel's FUSE layer in between.  The daemon takes
requests through FUSE over io_uring when the kernel offers it (target
``pnova``) or always reads ``/dev/fuse`` (``pnova-devfuse``); each record says
which path served it (``requests``).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from pnova.fuse_session import detach, mounted_source, unmount
from pnova.mkfs import format_device

from .fileops import PosixOps
from .targets import (RunConfig, base_record, fail, fsck_problem, image_run, measure,
                      one_line, split_scheme)
from .workloads import Workload

MOUNT_TIMEOUT = 30.0           # seconds for a pnova daemon to mount or to exit


def fstype_of(path: str) -> str:
    """The filesystem type of the mount holding ``path`` (from /proc/self/mountinfo)."""
    real = os.path.realpath(path)
    best, kind = "", "unknown"
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                mnt = left.split()[4].replace("\\040", " ")
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and \
                        len(mnt) >= len(best):
                    best, kind = mnt, right.split()[0]
    except OSError:                              # pragma: no cover - not Linux
        pass
    return kind


class _PosixRun:
    """The part of a run that is the same for every system-call target."""

    @staticmethod
    def measure_in(rec: dict[str, Any], workload: Workload, base: str, nworkers: int,
                   duration: float, cfg: RunConfig,
                   tick: Callable[[], object] | None) -> None:
        fops = PosixOps(base, direct=cfg.direct)
        shared = workload.prepare(fops, nworkers)
        rec.update(measure(workload, fops, shared, nworkers, duration, cfg, None, tick))
        if cfg.verify and "failed" not in rec:
            why = workload.check(PosixOps(base), shared, nworkers, rec["worker_ops"])
            if why:
                fail(rec, f"wrong contents after the run: {why}")


class DirTarget:
    """A directory on any mounted filesystem."""

    uses_schemes = False

    def __init__(self, label: str, path: str, fstype: str) -> None:
        self.label, self.path, self.fstype = label, path, fstype

    def run(self, workload: Workload, scheme: str, nworkers: int, duration: float,
            cfg: RunConfig, tick: Callable[[], object] | None) -> dict[str, Any]:
        rec = base_record(workload, self.label, scheme, nworkers, duration, cfg)
        rec.update(path=self.path, fstype=self.fstype)
        base = None
        try:
            base = tempfile.mkdtemp(prefix=f"fxmark-{workload.name.lower()}-{nworkers}-",
                                    dir=self.path)
            _PosixRun.measure_in(rec, workload, base, nworkers, duration, cfg, tick)
        except Exception as e:                 # noqa: BLE001 - a failed run, reported as such
            fail(rec, one_line(e))
        finally:
            if base is not None:
                if cfg.keep:
                    rec["kept"] = base
                else:
                    shutil.rmtree(base, ignore_errors=True)
        return rec


def _pnova_command() -> list[str]:
    """The pnova daemon of this very installation (not whatever is first on PATH)."""
    return [sys.executable, "-m", "pnova.mount"]


class PnovaMountTarget:
    """A fresh pnova FUSE mount per run, with the lock scheme under test."""

    uses_schemes = True

    def __init__(self, label: str = "pnova", uring: bool | None = None) -> None:
        self.label = label
        self.uring = uring                     # the daemon's io_uring= (None: auto)

    def run(self, workload: Workload, scheme: str, nworkers: int, duration: float,
            cfg: RunConfig, tick: Callable[[], object] | None) -> dict[str, Any]:
        rec, size, tmp = image_run(workload, self.label, scheme, nworkers, duration, cfg)
        image, mnt = os.path.join(tmp, "pnova.img"), os.path.join(tmp, "mnt")
        logpath = os.path.join(tmp, "pnova.log")
        daemon: subprocess.Popen | None = None
        try:
            format_device(image, size, numa_nodes=1, cpus_per_node=cfg.ncpus,
                          features=split_scheme(scheme)[1],
                          inodes_per_cpu=rec["inodes_per_cpu"])
            os.mkdir(mnt)
            daemon = self._mount(image, mnt, scheme, cfg, logpath, self.uring)
            rec["requests"] = requests_path(logpath)
            # (the type says the image's backing: fuse.pnova-memory on tmpfs)
            rec["fstype"] = (mounted_source(mnt) or ("?",))[0]
            run_dir = os.path.join(mnt, "fxmark")
            os.mkdir(run_dir)
            _PosixRun.measure_in(rec, workload, run_dir, nworkers, duration, cfg, tick)
            self._unmount(daemon, mnt, logpath)
            daemon = None
            if cfg.verify and "failed" not in rec:
                why = fsck_problem(image)
                if why:
                    fail(rec, why)
        except Exception as e:                 # noqa: BLE001 - a failed run, reported as such
            fail(rec, one_line(e))
        finally:
            if daemon is not None:             # something failed while mounted
                detach(mnt)
                try:
                    daemon.wait(MOUNT_TIMEOUT)
                except subprocess.TimeoutExpired:
                    daemon.kill()
                    daemon.wait()
            if cfg.keep:
                rec["image"] = image
            else:
                shutil.rmtree(tmp, ignore_errors=True)
        return rec

    @staticmethod
    def _mount(image: str, mnt: str, scheme: str, cfg: RunConfig,
               logpath: str, uring: bool | None) -> subprocess.Popen:
        how = "auto" if uring is None else ("on" if uring else "off")
        cmd = _pnova_command() + [image, mnt, "-f", "-o",
                                  f"lock={split_scheme(scheme)[0]},"
                                  f"segment_pages={cfg.segment_pages},io_uring={how}"]
        with open(logpath, "ab") as log:
            daemon = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not os.path.ismount(mnt):
            if daemon.poll() is not None:
                raise RuntimeError(f"pnova exited with status {daemon.returncode} before "
                                   f"mounting: {_last_line(logpath)}")
            if time.monotonic() > deadline:
                daemon.kill()
                daemon.wait()
                raise RuntimeError(f"pnova did not mount within {MOUNT_TIMEOUT:g} s")
            time.sleep(0.02)
        return daemon

    @staticmethod
    def _unmount(daemon: subprocess.Popen, mnt: str, logpath: str) -> None:
        unmount(mnt)
        try:
            rc = daemon.wait(MOUNT_TIMEOUT)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
            raise RuntimeError(f"pnova did not exit within {MOUNT_TIMEOUT:g} s of the "
                               "unmount") from None
        if rc != 0:
            raise RuntimeError(f"pnova exited with status {rc}: {_last_line(logpath)}")


def requests_path(logpath: str) -> str:
    """How the daemon that logs to ``logpath`` takes its requests, from its
    log: 'io_uring', or '/dev/fuse' (also when a serving process's entries were
    refused: the kernel then sends everything through the descriptor)."""
    try:
        with open(logpath, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return "/dev/fuse"
    if "requests come through io_uring" in text and "refused FUSE over io_uring" not in text:
        return "io_uring"
    return "/dev/fuse"


def _last_line(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
    except OSError:
        return "(no log)"
    return lines[-1] if lines else "(no output)"
