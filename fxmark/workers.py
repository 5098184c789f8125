"""The worker pool: forked processes pinned to CPUs, a start barrier, a timed loop.

How one run goes (FxMark's protocol):

1. The parent forks ``n`` workers.  Worker ``k`` pins itself to one CPU
   (``cpus[k % len(cpus)]``), runs ``setup(k)`` (which returns the per-op
   function, or the function and how many files the worker stocked for
   itself, and maybe a ``settle`` step) and reports "set" on its own pipe.
   When every worker is set (so every worker's stocking is over), the parent
   closes the write end of the "settle" pipe; each worker then runs its
   ``settle`` step, if it has one (a look at a directory the others stocked
   too, so that what learning their files costs is not in the first
   seconds of the run), and reports "ready".
2. When every worker is ready the parent writes the common stop time
   (now + duration, CLOCK_MONOTONIC, which all processes share) into a small
   shared mapping, reads /proc/stat, and closes the write end of the "go"
   pipe: every worker, blocked reading that pipe, wakes at once.
3. Each worker reads its own start time, calls ``op(1)``, ``op(2)``, ... until
   the stop time, and reports its op count, its elapsed time and the CPU time
   it used during the loop (``resource.getrusage``), as one JSON line.  An op
   that had to replenish what the workload uses up (see
   :mod:`fxmark.workloads`) returns the seconds that took: they are taken out
   of the worker's elapsed time and its stop time moves back by as much.
4. Meanwhile the parent only waits, calling the target's housekeeping and
   the progress display (``background``) every few milliseconds.
5. The parent reads /proc/stat again when the last worker has reported, and
   collects the reports; a worker that raised, died, never got ready, or did
   not finish within a grace period (it is then killed) is a failure with a
   one-line reason.

A worker that started late runs for less than the duration; the caller
decides what is too short (the 90% rule lives in :func:`summarise`).

Test hook: ``fail_worker=k`` makes worker ``k`` raise :class:`InjectedFailure`
in its tenth op (the ``fxmark`` command sets it from the environment variable
``FXMARK_FAIL_WORKER``).  It exists to test that failures are reported as
failures; with it unset the timed loop is not touched.
"""
from __future__ import annotations

import json
import mmap
import os
import resource
import select
import signal
import struct
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from .workloads import Op

INJECT_AFTER = 10              # the op in which an injected failure happens
READY_TIMEOUT = 120.0          # seconds for every worker to finish its setup, plus
STOCK_SECONDS = 5.0            # this many per second of the run: a worker stocking the
                               # files it uses up creates about 3 s's worth of them per
                               # second of the run, at its own fastest create rate
GRACE = 60.0                   # seconds past the stop time before a worker is killed;
                               # longer than pnova's 30 s lock timeout, so a worker stuck
                               # on a dead holder's lock reports that itself
MIN_FRACTION = 0.9             # a worker must run this share of the duration
MAX_PAUSED = 3.0               # replenishing may take this many times the duration


# What a worker's setup returns: the per-op function, or it and the number of
# files the worker stocked for itself, and maybe what it does once every
# worker has stocked (its settle step).
Setup = Op | tuple[Op, int] | tuple[Op, int, Callable[[], object]]


class InjectedFailure(RuntimeError):
    """Raised by the test hook (``fail_worker``)."""


@dataclass
class WorkerResult:
    """What one worker reported (or what the parent found out about it)."""
    wid: int
    cpu: int
    ops: int = 0
    elapsed: float = 0.0       # seconds in the timed loop
    utime: float = 0.0         # user CPU seconds in the timed loop
    stime: float = 0.0         # system CPU seconds in the timed loop
    paused: float = 0.0        # untimed seconds (replenishing), not in elapsed
    stocked: int | None = None  # files it made for itself before the start (setup's count)
    error: str | None = None


@dataclass
class PoolResult:
    """All workers' results and the first failure, if any."""
    duration: float
    workers: list[WorkerResult] = field(default_factory=list)
    failed: str | None = None
    cpu: dict[str, float] | None = None     # /proc/stat breakdown of the workers' CPUs


def usable_cpus() -> list[int]:
    """The CPUs this process may run on, in order (what workers are pinned to)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:                       # pragma: no cover - not Linux
        return list(range(os.cpu_count() or 1))


def _child(wid: int, cpu: int, setup: Callable[[int], Setup], settle_r: int, go_r: int,
           out_w: int, stop_at: mmap.mmap, fail_worker: int | None,
           teardown: Callable[[int], None] | None = None) -> None:
    """Body of worker ``wid``; never returns (os._exit), never raises."""
    res = WorkerResult(wid, cpu)
    status = 0
    n = 0
    try:
        os.sched_setaffinity(0, {cpu})
        op = setup(wid)
        settle = None
        if isinstance(op, tuple):                # (op, files the worker stocked[, settle])
            op, res.stocked, *rest = op
            settle = rest[0] if rest else None
        if fail_worker == wid:
            op = _failing(op)
        os.write(out_w, b"set\n")
        os.read(settle_r, 1)                     # b"" once every worker is set
        if settle is not None:
            settle()
        os.write(out_w, b"ready\n")
        os.read(go_r, 1)                         # returns b"" when the parent closes it
        deadline = struct.unpack_from("d", stop_at, 0)[0]
        mono = time.monotonic
        getrusage = resource.getrusage
        paused = 0.0
        max_paused = MAX_PAUSED * max(0.0, deadline - mono())
        ru0 = getrusage(resource.RUSAGE_SELF)
        t0 = t = mono()
        while t < deadline:
            n += 1
            x = op(n)
            if x:                                # untimed replenishing inside that op
                paused += x
                deadline += x
                if paused > max_paused:
                    raise RuntimeError(f"replenishing took {paused:.1f} s, more than "
                                       f"{MAX_PAUSED:g} times the measured time")
            t = mono()
        ru1 = getrusage(resource.RUSAGE_SELF)
        res.ops, res.elapsed, res.paused = n, t - t0 - paused, paused
        res.utime = ru1.ru_utime - ru0.ru_utime
        res.stime = ru1.ru_stime - ru0.ru_stime
        if teardown is not None:
            teardown(wid)                        # after the measured time
    except BaseException as e:                   # noqa: BLE001 - reported, not swallowed
        res.error = _one_line(e)
        res.ops = max(0, n - 1)                  # the ops completed before the failure
        status = 1
    try:
        os.write(out_w, json.dumps(asdict(res)).encode() + b"\n")
    finally:
        # _exit: no atexit handlers, no flushing of buffers inherited from the
        # parent, no unmount: the parent owns the filesystem.
        os._exit(status)


def _failing(op: Op) -> Op:
    def failing_op(seq: int) -> object:
        if seq == INJECT_AFTER:
            raise InjectedFailure(f"injected failure in op {seq} (test hook)")
        return op(seq)
    return failing_op


def _one_line(e: BaseException) -> str:
    """'Type: message (file:line)' of the innermost frame: enough to find the fault."""
    tb = traceback.extract_tb(e.__traceback__)
    where = f" ({os.path.basename(tb[-1].filename)}:{tb[-1].lineno})" if tb else ""
    msg = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {msg}{where}" if msg else f"{type(e).__name__}{where}"


class _Pipes:
    """Line-oriented reading of every worker's pipe, with one timeout."""

    def __init__(self, fds: dict[int, int]) -> None:
        self.fd_of = fds                          # wid -> read fd
        self.buf = {wid: b"" for wid in fds}
        self.eof: set[int] = set()

    def lines(self, wid: int) -> list[bytes]:
        return self.buf[wid].split(b"\n")[:-1]

    def wait(self, done: Callable[[int], bool], until: float,
             tick: Callable[[], object] | None = None, every: float = 1.0) -> list[int]:
        """Read until ``done(wid)`` or EOF for every worker, or ``until``; return the rest.

        ``tick`` is called about every ``every`` seconds meanwhile.
        """
        next_tick = time.monotonic() + every
        while True:
            todo = [w for w in self.fd_of if not done(w) and w not in self.eof]
            now = time.monotonic()
            left = until - now
            if not todo or left <= 0:
                return todo
            if tick is not None:
                if now >= next_tick:
                    tick()
                    next_tick = now + every
                left = min(left, max(0.0, next_tick - now))
            ready, _, _ = select.select([self.fd_of[w] for w in todo], [], [], left)
            for w in todo:
                if self.fd_of[w] in ready:
                    chunk = os.read(self.fd_of[w], 65536)
                    if chunk:
                        self.buf[w] += chunk
                    else:
                        self.eof.add(w)


def run_workers(n: int, setup: Callable[[int], Setup], duration: float, *,
                cpus: list[int] | None = None, fail_worker: int | None = None,
                grace: float = GRACE, background: Callable[[], object] | None = None,
                interval: float = 0.01,
                teardown: Callable[[int], None] | None = None) -> PoolResult:
    """Run ``n`` workers for ``duration`` seconds; see the module docstring.

    ``background``, if given, is called in the parent every ``interval``
    seconds while the workers run (a filesystem's housekeeping, such as
    pNOVA's designated refiller of log-pointer rings, and the progress
    display).  If it raises, the run fails with its error and it is not
    called again.  ``teardown(wid)``, if given, runs in each worker once its
    time is up, before it reports (the engine target hands back what a
    worker still holds there).
    """
    tick_error: list[str] = []

    def tick() -> None:
        if background is None or tick_error:
            return
        try:
            background()
        except Exception as e:                  # noqa: BLE001 - reported as the failure
            tick_error.append(f"parent housekeeping: {_one_line(e)}")

    cpus = cpus or usable_cpus()
    out = PoolResult(duration)
    stop_at = mmap.mmap(-1, mmap.PAGESIZE)       # anonymous, shared with the children
    settle_r, settle_w = os.pipe()
    go_r, go_w = os.pipe()
    pids: dict[int, int] = {}
    fds: dict[int, int] = {}
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        for wid in range(n):
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:                         # the worker
                os.close(settle_w)
                os.close(go_w)
                os.close(r)
                _child(wid, cpus[wid % len(cpus)], setup, settle_r, go_r, w, stop_at,
                       fail_worker, teardown)
            os.close(w)
            pids[wid], fds[wid] = pid, r
        pipes = _Pipes(fds)
        ready_by = time.monotonic() + READY_TIMEOUT + STOCK_SECONDS * duration
        # Every worker set up (or failed, or out of time): the settle steps
        # run now, after all the stocking (a worker that is not set then
        # never becomes ready, below).
        pipes.wait(lambda w: b"set" in pipes.lines(w), ready_by)
        os.close(settle_w)
        settle_w = -1
        not_ready = pipes.wait(lambda w: b"ready" in pipes.lines(w), ready_by)
        not_ready += [w for w in fds if w not in not_ready and b"ready" not in pipes.lines(w)]
        # Release the workers (a stop time of "now" when one of them is not
        # ready: the others then stop at once instead of measuring nothing).
        stop = time.monotonic() + (0.0 if not_ready else duration)
        struct.pack_into("d", stop_at, 0, stop)
        used = sorted({cpus[w % len(cpus)] for w in range(n)})
        stat0 = cpu_times(used)
        os.close(go_w)
        go_w = -1
        unfinished = pipes.wait(lambda w: any(x[:1] == b"{" for x in pipes.lines(w)),
                                stop + MAX_PAUSED * duration + grace,
                                tick if background is not None else None, interval)
        out.cpu = cpu_breakdown(stat0, cpu_times(used))
        for wid in unfinished:
            os.kill(pids[wid], signal.SIGKILL)   # our own child, stuck
        statuses = {wid: os.waitpid(pid, 0)[1] for wid, pid in pids.items()}
        pids.clear()
        for wid in range(n):
            res = _parse(wid, cpus[wid % len(cpus)], pipes.lines(wid))
            if res.error is None:
                if wid in unfinished:
                    res.error = f"did not finish within {grace:g} s of the stop time; killed"
                elif wid in not_ready:
                    res.error = "never became ready"
                elif statuses[wid] != 0:
                    res.error = _describe_status(statuses[wid])
            out.workers.append(res)
        for res in out.workers:
            if res.error is not None:
                out.failed = f"worker {res.wid}: {res.error}"
                break
        if out.failed is None and tick_error:
            out.failed = tick_error[0]
    finally:
        for fd in (settle_w, go_w):
            if fd >= 0:
                os.close(fd)
        for pid in pids.values():               # only after an error in the parent itself
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except OSError:
                pass
        for r in fds.values():
            os.close(r)
        os.close(settle_r)
        os.close(go_r)
        stop_at.close()
    return out


CPU_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def cpu_times(cpus: list[int]) -> dict[str, int] | None:
    """Clock ticks per /proc/stat field, summed over ``cpus``; None where unreadable."""
    want = {f"cpu{c}" for c in cpus}
    total = dict.fromkeys(CPU_FIELDS, 0)
    try:
        with open("/proc/stat", encoding="ascii") as f:
            for line in f:
                parts = line.split()
                if parts and parts[0] in want:
                    for name, value in zip(CPU_FIELDS, parts[1:]):
                        total[name] += int(value)
    except OSError:                              # pragma: no cover - not Linux
        return None
    return total


def cpu_breakdown(before: dict[str, int] | None,
                  after: dict[str, int] | None) -> dict[str, float] | None:
    """FxMark's CPU breakdown of the workers' CPUs over the run, as fractions.

    user = user + nice; sys = system + irq + softirq; idle; iowait; steal (time
    a virtual machine's CPU was taken by the host).  They add up to 1.  The
    whole CPU counts, not only the workers: a FUSE daemon or kernel threads
    running on those CPUs show up here, which is the point.
    """
    if before is None or after is None:
        return None
    d = {k: after[k] - before[k] for k in CPU_FIELDS}
    total = sum(d.values())
    if total <= 0:
        return None
    parts = {"user": d["user"] + d["nice"], "sys": d["system"] + d["irq"] + d["softirq"],
             "idle": d["idle"], "iowait": d["iowait"], "steal": d["steal"]}
    return {k: round(v / total, 4) for k, v in parts.items()}


def _parse(wid: int, cpu: int, lines: list[bytes]) -> WorkerResult:
    for line in lines:
        if line.startswith(b"{"):
            try:
                return WorkerResult(**json.loads(line))
            except (ValueError, TypeError):
                return WorkerResult(wid, cpu, error="sent an unreadable report")
    return WorkerResult(wid, cpu)


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return f"killed by {name} without a report"
    return f"exited with status {os.waitstatus_to_exitcode(status)} without a report"


def summarise(pool: PoolResult) -> dict:
    """The numbers of a run, or its failure.

    Returns a dict with ``ops`` (sum over workers), ``seconds`` (mean elapsed
    time of the workers), ``worker_ops`` and ``worker_seconds``, and either
    ``ops_per_sec`` = ops / seconds and ``cpu``, or ``failed`` (a reason) when
    a worker failed or ran less than 90% of the duration.

    ``cpu`` is FxMark's breakdown of the CPUs the workers ran on (see
    :func:`cpu_breakdown`): everything those CPUs did during the run.
    ``worker_cpu`` = {user, sys}: the workers' own share, from
    getrusage(RUSAGE_SELF) of each worker right before and after its timed
    loop, as fractions of their elapsed time (a worker spinning on a lock
    counts as busy, as in FxMark).  ``worker_paused`` lists the untimed
    seconds each worker spent replenishing (see :mod:`fxmark.workloads`),
    ``worker_stocked`` the files each stocked for itself before the start.
    """
    ws = pool.workers
    rec: dict = {
        "worker_ops": [w.ops for w in ws],
        "worker_seconds": [round(w.elapsed, 6) for w in ws],
    }
    if any(w.paused for w in ws):
        rec["worker_paused"] = [round(w.paused, 6) for w in ws]
    if any(w.stocked is not None for w in ws):
        rec["worker_stocked"] = [w.stocked for w in ws]
    if pool.failed is None:
        short = [w for w in ws if w.elapsed < MIN_FRACTION * pool.duration]
        if short:
            w = short[0]
            pool.failed = (f"worker {w.wid} ran {w.elapsed:.3f} s of the requested "
                           f"{pool.duration:g} s (less than {MIN_FRACTION:.0%})")
    if pool.failed is not None:
        rec["failed"] = pool.failed
        return rec
    ops = sum(w.ops for w in ws)
    seconds = sum(w.elapsed for w in ws) / len(ws)
    busy = sum(w.elapsed + w.paused for w in ws)
    user = sum(w.utime for w in ws) / busy
    sys_ = sum(w.stime for w in ws) / busy
    cpu = pool.cpu
    if cpu is None:                              # no /proc/stat: the workers' own share
        cpu = {"user": round(user, 4), "sys": round(sys_, 4),
               "idle": round(max(0.0, 1.0 - user - sys_), 4), "iowait": 0.0, "steal": 0.0}
    rec.update(ops=ops, seconds=seconds, ops_per_sec=ops / seconds, cpu=cpu,
               worker_cpu={"user": round(user, 4), "sys": round(sys_, 4)})
    return rec
