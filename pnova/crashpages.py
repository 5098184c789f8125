"""Crash injection for an image on a disk: pages written back in any order.

The persistent-memory model (:mod:`pnova.crashtest`) loses what was not
flushed and fenced.  A file on an ordinary filesystem loses differently: the
kernel writes dirty 4 KiB pages back whenever it likes, in any order, and
only a sync (msync, which fsync, fdatasync, syncfs, the commit interval and a
clean unmount call) promises that every page has arrived.  So after a power
loss each page changed since the last sync holds any one of the contents it
has had since then, independently of the others
(:class:`~pnova.pmem.PagedPMem`).

A case is setup steps (unmounted cleanly: the disk starts synced) and steps
under test, among them ``("sync",)``.  After every step the harness builds
crash states from the last synced disk and the versions each dirty page went
through (snapshots at every fence and at the end of every step):

* the synced disk alone, and with every dirty page at its latest version;
* every page alone at its latest version, and every page but one;
* every subset of the dirty pages (latest versions) when there are few of them;
* a seeded random sample where each page takes any of its versions.

The oracle (:func:`check_paged_state`): recovery succeeds; fsck finds
nothing; every path of the recovered tree is as it was after some step since
the last sync (the synced state included), so that nothing synced and left
alone is lost, nothing appears that never existed, and each file is a whole
version of itself; and the filesystem accepts new work and gives every block
back.  State IDs are ``pages:WORKLOAD:CASE:POINT:STATE``.
"""
from __future__ import annotations

import hashlib
import io
import itertools
import os
import random
import tempfile
from collections.abc import Callable, Iterator

import numpy as np

from .crashtest import (SETUP, SEQ1_OPS, CaseResult, Driver, Failure, Model, Step, _explicit_times,
                        run_cases, seq2_cases, usable_after_recovery)
from .engine import FileSystem
from .errors import FsError
from .mkfs import format_device
from .pmem import PAGE, PagedPMem, PMem

IMAGE_SIZE = 1 << 20
EXHAUSTIVE_PAGES = 8         # every subset of the dirty pages up to this many
RANDOM_STATES = 12           # random page-version choices per crash point
SYNC: Step = ("sync",)
AFTER_SYNC: Step = ("create", "/after-sync", 0o644)


# ----------------------------------------------------------------- workloads
def seq1_cases() -> list[tuple[list[Step], list[Step]]]:
    """Each operation alone, unsynced; then synced, followed by an operation that
    dirties the root's pages again (the synced one must survive any of them)."""
    return [(SETUP, [op, SYNC, AFTER_SYNC]) for op in SEQ1_OPS]


def cases_for(workload: str) -> list[tuple[list[Step], list[Step]]]:
    if workload == "seq1":
        return seq1_cases()
    if workload == "seq2":
        # every legal pair, unsynced between them (the two may arrive in any mix)
        return seq2_cases()
    raise ValueError(f"the page model has workloads seq1 and seq2, not {workload!r}")


# -------------------------------------------------------------- crash states
def page_states(versions: dict[int, list[bytes]], rng: random.Random
                ) -> Iterator[dict[int, int]]:
    """Crash states of one crash point: {page: index of the version it holds}
    (pages left out hold version 0, the synced one)."""
    pages = sorted(p for p, v in versions.items() if len(v) > 1)
    latest = {p: len(versions[p]) - 1 for p in pages}
    seen: set[tuple] = set()

    def fresh(state: dict[int, int]) -> bool:
        key = tuple(sorted(state.items()))
        if key in seen:
            return False
        seen.add(key)
        return True

    candidates: list[dict[int, int]] = [{}, dict(latest)]
    candidates += [{p: latest[p]} for p in pages]
    candidates += [{q: latest[q] for q in pages if q != p} for p in pages]
    if len(pages) <= EXHAUSTIVE_PAGES:
        for size in range(2, len(pages) - 1):
            for combo in itertools.combinations(pages, size):
                candidates.append({p: latest[p] for p in combo})
    for _ in range(RANDOM_STATES):
        candidates.append({p: rng.randrange(len(versions[p])) for p in pages})
    for state in candidates:
        state = {p: i for p, i in state.items() if i}
        if fresh(state):
            yield state


# ------------------------------------------------------------------- oracle
def _on_disk(path: str) -> PMem:
    """The crash image, opened as the disk-backed image it models (the file
    itself may sit in memory, for speed)."""
    pm = PMem(path)
    pm.mode = "disk"
    return pm


def _window_match(got: dict, window: list[tuple[dict, set[str]]], pinned: set[str]) -> str | None:
    """None when every path of ``got`` (and of the states) is as it was in one of
    the states of the window, else the first path that is not."""
    for p in sorted(set(got).union(*(t for t, _ in window))):
        g = got.get(p)
        for tree, times in window:
            w = tree.get(p)
            if g is None or w is None:
                if g is w:
                    break
                continue
            if p in pinned and p not in times:
                # the window pins this path's times only in some states
                g2, w2 = g[:8] + g[9:], w[:8] + w[9:]
                if g2 == w2:
                    break
            elif g == w:
                break
        else:
            return f"{p}: recovered as {g!r}, which no state since the last sync had"
    return None


def check_paged_state(img_path: str, window: list[tuple[dict, set[str]]]) -> str | None:
    """Mount a crash image and check the page model's oracle (module docstring);
    ``window`` holds (tree, paths whose times it pins) for the synced state and
    every state after it up to the crash."""
    from .fsck import Checker
    try:
        fs = FileSystem.mount(img_path, device=_on_disk(img_path), power_loss=True)
    except Exception as e:                                   # noqa: BLE001
        return f"recovery failed: {type(e).__name__}: {str(e).replace(img_path + ': ', '')}"
    pinned = set().union(*(t for _, t in window))
    try:
        try:
            got = Driver(fs).dump(pinned)
        except FsError as e:
            return f"reading the recovered tree failed: {e}"
        why = _window_match(got, window, pinned)
        if why:
            return why
    finally:
        fs.unmount()
    out = io.StringIO()
    if Checker(img_path, force=True, out=out).run() != 0:
        return "fsck after recovery: " + " | ".join(out.getvalue().strip().splitlines()[:4])
    return usable_after_recovery(img_path)


# ------------------------------------------------------------------- runner
def run_steps(setup: list[Step], ops: list[Step], *, ident: str = "custom", case_no: int = 0,
              only: tuple[int, int] | None = None, keep: str | None = None,
              hold_frees: bool = True,
              tick: Callable[[int], None] | None = None) -> CaseResult:
    """Apply ``setup`` and unmount, then ``ops`` on the page model, checking the
    crash states after every step.  ``hold_frees=False`` runs the engine
    without holding freed blocks back until a sync (to show what that
    protects)."""
    res = CaseResult(case_no)
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(dir=shm) as tmp:
        img = os.path.join(tmp, "dev.img")
        crash = os.path.join(tmp, "crash.img")
        format_device(img, IMAGE_SIZE, numa_nodes=1, cpus_per_node=1, inodes_per_cpu=64)
        model = Model()
        fs = FileSystem.mount(img)
        drv = Driver(fs)
        for s in setup:
            drv.apply(s)
            model.apply(s)
        fs.unmount()
        pm = PagedPMem(img)
        fs = FileSystem.mount(img, device=pm)
        if hold_frees:
            fs.hold_frees_until_sync()
        drv = Driver(fs)
        versions: dict[int, list[bytes]] = {}
        window = [(model.dump(), _explicit_times(model))]
        cache: dict[bytes, str | None] = {}

        def snapshot(p: PagedPMem) -> None:
            for page in p.dirty_pages().tolist():
                v = versions.setdefault(page, [p.disk[page * PAGE:(page + 1) * PAGE].tobytes()])
                now = p.buf[page * PAGE:(page + 1) * PAGE].tobytes()
                if v[-1] != now:
                    v.append(now)

        def synced(p: PagedPMem) -> None:
            versions.clear()

        pm.on_fence = snapshot
        pm.on_sync = synced
        for point, op in enumerate(ops):
            if op == SYNC:
                fs.sync()
                window = window[-1:]
            else:
                drv.apply(op)
                model.apply(op)
                window.append((model.dump(), _explicit_times(model)))
            snapshot(pm)
            if only is not None and only[0] != point:
                continue
            rng = random.Random(f"pages:{ident}:{case_no}:{point}")
            for sno, state in enumerate(page_states(versions, rng)):
                if only is not None and only[1] != sno:
                    continue
                image = pm.disk.copy()
                for page, i in state.items():
                    image[page * PAGE:(page + 1) * PAGE] = np.frombuffer(versions[page][i],
                                                                         dtype=np.uint8)
                raw = image.tobytes()
                if keep is not None:
                    with open(keep, "wb") as f:
                        f.write(raw)
                h = hashlib.sha1(raw).digest()
                if h in cache and keep is None:
                    why = cache[h]
                else:
                    with open(crash, "wb") as f:
                        f.write(raw)
                    why = check_paged_state(crash, window)
                    cache[h] = why
                res.checked += 1
                if why is not None:
                    res.failures.append(Failure(f"pages:{ident}:{case_no}:{point}:{sno}", why))
                if tick is not None:
                    tick(1)
        pm.on_fence = pm.on_sync = None
        fs.unmount()
    return res


def run_case(workload: str, case_no: int, *, only: tuple[int, int] | None = None,
             keep: str | None = None, hold_frees: bool = True) -> CaseResult:
    setup, ops = cases_for(workload)[case_no]
    return run_steps(setup, ops, ident=workload, case_no=case_no, only=only, keep=keep,
                     hold_frees=hold_frees)


def _worker(args: tuple) -> CaseResult:
    workload, case_no = args
    return run_case(workload, case_no)


def run(workload: str, jobs: int = 1,
        progress: Callable[[int, int, int, int], None] | None = None) -> list[CaseResult]:
    """Check every case of a workload; ``progress(cases_done, cases, states, failed)``."""
    import logging
    # a crash state's recovery reports what it cut and repaired: expected here
    logging.getLogger("pnova").setLevel(logging.ERROR)
    n = len(cases_for(workload))
    return run_cases(_worker, [(workload, i) for i in range(n)], jobs, progress)


def parse_id(ident: str) -> tuple[str, int, int, int]:
    """'pages:seq1:3:1:12' -> (workload, case, point, state)."""
    try:
        model, wl, case, point, state = ident.split(":")
        if model != "pages":
            raise ValueError
        return wl, int(case), int(point), int(state)
    except ValueError:
        raise ValueError(f"bad crash state ID {ident!r} "
                         "(expected pages:WORKLOAD:CASE:POINT:STATE)") from None
