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

The oracle (:func:`pnova.crashtest.check_state`, with the states of
:func:`allowed_states`): recovery succeeds; the recovered tree is exactly the
synced state with some subset of the operations done since applied, in order
(the page cache keeps no order between operations, so any of them may be lost,
but each survives whole: a rename is never half done, a write never half
there, nothing synced is lost); fsck finds nothing; and the filesystem accepts
new work and gives every block back.  State IDs are
``pages:WORKLOAD:CASE:POINT:STATE``.
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import os
import random
import tempfile
from collections.abc import Callable, Iterator

import numpy as np

from .crashtest import IMAGE_SIZE  # noqa: F401  (the size of the crash images it keeps)
from .crashtest import (OBJECT_OPS, SETUP, SEQ1_OPS, CaseResult, Driver, Failure, Model, Step,
                        _explicit_times, _shm, _valid, check_state, edge_cases, prepare_image,
                        run_cases, seq2_cases)
from . import layout as L
from .engine import FileSystem
from .pmem import PAGE, PagedPMem, PMem

EXHAUSTIVE_PAGES = 8         # every subset of the dirty pages up to this many
RANDOM_STATES = 12           # random page-version choices per crash point
TWIN_STATES = 6              # more, where replica-table pages choose on their own
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
    if workload == "edge":
        # each operation opening new log pages, then synced, then another
        return [(setup, ops + [SYNC, AFTER_SYNC]) for setup, ops in edge_cases()]
    raise ValueError(f"the page model has workloads seq1, seq2 and edge, not {workload!r}")


# -------------------------------------------------------------- crash states
def page_states(versions: dict[int, list[bytes]], rng: random.Random,
                twins: dict[int, int] | None = None) -> Iterator[dict[int, int]]:
    """Crash states of one crash point: {page: index of the version it holds}
    (pages left out hold version 0, the synced one).

    ``twins`` maps each page of an inode-replica table to the page of the table
    it mirrors (SPEC 5.5), and each twin log page to its primary (SPEC 6).  In the exhaustive subsets a dirty twin arrives with
    the page it mirrors, so that replicas do not shrink the number of pages
    enumerated exhaustively, and in the first random states it holds the version
    of the same moment as that page; the single pages, all-but-one and
    ``TWIN_STATES`` more random states move it on its own."""
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
    twins = {t: p for t, p in (twins or {}).items() if t in latest and p in latest}
    led: dict[int, list[int]] = {}
    for t, p in twins.items():
        led.setdefault(p, []).append(t)
    alone = [p for p in pages if p not in twins]
    if len(alone) <= EXHAUSTIVE_PAGES:
        for size in range(2, len(alone) - 1):
            for combo in itertools.combinations(alone, size):
                candidates.append({q: latest[q] for p in combo for q in [p] + led.get(p, [])})
    for _ in range(RANDOM_STATES):
        state = {p: rng.randrange(len(versions[p])) for p in alone}
        for p, ts in led.items():             # a twin holds the version of its page's
            for t in ts:                      # moment, when their histories match
                state[t] = state[p] if len(versions[t]) == len(versions[p]) else latest[t]
        candidates.append(state)
    for _ in range(TWIN_STATES if twins else 0):
        candidates.append({p: rng.randrange(len(versions[p])) for p in pages})
    for state in candidates:
        state = {p: i for p, i in state.items() if i}
        if fresh(state):
            yield state


# ------------------------------------------------------------------- oracle
def _mount_after_power_loss(path: str) -> FileSystem:
    """Recovery of the crash image as the pnova command would run it on the
    disk-backed image it models (the file itself may sit in memory, for speed)."""
    pm = PMem(path)
    pm.mode = "disk"
    return FileSystem.mount(path, device=pm, power_loss=True)


def allowed_states(synced: Model, since: list[tuple[Step, object | None]]
                   ) -> list[tuple[dict, set[str]]]:
    """Every tree a power loss may leave: the synced state with any subset of the
    operations done since, applied in their order (the page cache keeps no order
    between operations, but each must be whole; a subset whose operation no
    longer applies, say a write to a file whose creation is left out, is not a
    state).  ``since`` pairs each step with the synced model's object it changed
    (a step on one object that existed at the sync): such a step changes that
    object whatever its name in the subset, as the engine's change to an inode
    does, while other steps go by path."""
    out = []
    for keep in itertools.product((False, True), repeat=len(since)):
        memo: dict = {}
        m = copy.deepcopy(synced, memo)
        ok = True
        for (step, target), k in zip(since, keep):
            if not k:
                continue
            if target is not None:
                m.apply_to(memo[id(target)], step)
            elif _valid(m, step):
                m.apply(step)
            else:
                ok = False
                break
        if ok:
            out.append((m.dump(), _explicit_times(m)))
    return out


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
    with tempfile.TemporaryDirectory(dir=_shm()) as tmp:
        img = os.path.join(tmp, "dev.img")
        crash = os.path.join(tmp, "crash.img")
        model = prepare_image(img, setup)
        pm = PagedPMem(img)
        fs = FileSystem.mount(img, device=pm)
        if hold_frees:
            fs.hold_frees_until_sync()
        drv = Driver(fs)
        twins: dict[int, int] = {}
        if fs._rtables is not None:
            for r, rt in zip(fs.regions, fs._rtables):
                for k in range(r.itable_blocks):
                    twins[rt // PAGE + k] = r.itable_start + k
        versions: dict[int, list[bytes]] = {}
        # the synced model, its copy of each live object, and the steps since
        synced_memo: dict = {}
        synced_model, since = copy.deepcopy(model, synced_memo), []
        cache: dict[bytes, str | None] = {}

        def snapshot(p: PagedPMem) -> None:
            for page in p.dirty_pages().tolist():
                if fs.log_twins and page not in twins:
                    # a log page's twin (format 8) moves with its primary too
                    tail = p.buf[page * PAGE + L.PT_NEXT:(page + 1) * PAGE].tobytes()
                    if L.check_page_tail(tail) is None:
                        named = L.page_tail_twin(tail)
                        if named & L.TWIN_ROLE:
                            twins[page] = named & ~L.TWIN_ROLE
                v = versions.setdefault(page, [p.disk[page * PAGE:(page + 1) * PAGE].tobytes()])
                now = p.buf[page * PAGE:(page + 1) * PAGE].tobytes()
                if v[-1] != now:
                    v.append(now)

        def synced(p: PagedPMem) -> None:
            versions.clear()

        def pushed(p: PagedPMem) -> None:
            # every page is on the disk as it is now (a compaction's msync):
            # none chooses among older contents, but nothing is promised
            versions.clear()

        pm.on_fence = snapshot
        pm.on_sync = synced
        pm.on_push = pushed
        for point, op in enumerate(ops):
            if op == SYNC:
                fs.sync()
                synced_memo = {}
                synced_model, since = copy.deepcopy(model, synced_memo), []
            else:
                target = None
                if op[0] in OBJECT_OPS:
                    target = synced_memo.get(id(model.node(op[1])))
                drv.apply(op)
                model.apply(op)
                since.append((op, target))
            snapshot(pm)
            allowed = allowed_states(synced_model, since)
            if only is not None and only[0] != point:
                continue
            # seeded by the steps, not by the case's number: a case keeps its
            # states when a workload gains operations
            rng = random.Random(f"pages:{setup!r}:{ops!r}:{point}")
            for sno, state in enumerate(page_states(versions, rng, twins)):
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
                    why = check_state(crash, allowed, mount=_mount_after_power_loss)
                    cache[h] = why
                res.checked += 1
                if why is not None:
                    res.failures.append(Failure(f"pages:{ident}:{case_no}:{point}:{sno}", why))
                if tick is not None:
                    tick(1)
        pm.on_fence = pm.on_sync = pm.on_push = None
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
