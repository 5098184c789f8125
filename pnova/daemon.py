"""One mount served by several processes: a supervisor and its serving workers.

::

    pnova (supervisor) --- mounts, answers INIT, forks, then only watches
       |-- worker CPU 0 --.
       |-- worker CPU 1 ---+-- each reads requests from the one /dev/fuse
       '-- ...          --'    descriptor and serves them with its own engine

The supervisor mounts the kernel connection and answers its INIT, switches
the engine to shared multi-process mode and forks one worker per logical CPU:
worker *k* becomes CPU *k* of the filesystem (its allocator region, journal,
local logs and lock identity) and runs the request loop of
:mod:`pnova.fuse_session`.  The kernel hands each request to exactly one
reader, so requests spread over the workers by themselves.

Where the kernel offers FUSE over io_uring (DESIGN 22.8), it queues each
request on its caller's CPU instead, and worker *k*, pinned to the CPUs of its
queues (:func:`assign_queues`), serves them there (:class:`UringLoop`); worker
0 also reads what still comes through the descriptor.  Otherwise not every
worker waits for requests all the time (:class:`Readers`): the kernel hands
requests to waiting readers in turn, so with every worker waiting, a single
client's requests would alternate between processes and each would first
catch up with the other's log entries.  One worker reads while the load is
sequential; the others sleep until requests overlap.

The supervisor never serves a request.  Under trio it waits for signals and
for its workers to exit (each through a pidfd), and it is pNOVA's designated
refiller of the per-CPU rings of log pages, woken when a ring runs low.  It
never polls: an idle mount uses no CPU.  How a mount ends:

* unmounted (fusermount3 -u, umount): every worker's read fails with ENODEV,
  the workers exit, the supervisor saves the engine's state (clean unmount);
* SIGINT / SIGTERM / SIGHUP to the supervisor, or SIGTERM to any worker: the
  mount is detached, each worker finishes the request in hand and exits, and
  the state is saved as above;
* a worker dies (kill -9, a crash): it may have been in the middle of an
  operation, so nothing is saved.  The other workers finish their requests
  and exit, and once the last descriptor is closed the kernel fails every
  request still waiting, and every later one, with ENOTCONN.  The image is
  left as a crash leaves it;
* the supervisor dies: every worker gets SIGTERM from the kernel
  (PR_SET_PDEATHSIG) and exits after its current request, with the same
  result.

An aborted mount stays in place, answering ENOTCONN, until it is unmounted
(fusermount3 -u) or the next ``pnova`` mount of the same image on the same
directory takes it away; that mount recovers the image by log replay.  It
is not detached at once because programs using it would then go on in the
directory underneath, unaware.
"""
from __future__ import annotations

import ctypes
import functools
import gc
import logging
import math
import mmap
import os
import select
import signal
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import trio

from . import fuse_wire as W
from .atomics import SharedWords
from .engine import FileSystem, Landing
from .fuse_ops import PnovaOperations
from .fuse_session import (WANTED, Connection, Loop, MountError, UringLoop, UringUnavailable,
                           clone_nonblocking, detach, ignore_terminal_signals,
                           possible_cpus, uring_offered)
from .locks import LockTimeout
from .shared import H_LIMBO, H_RDURABLE, H_RSYNC, H_SEQ

log = logging.getLogger("pnova.daemon")
# Allocations between two young garbage collections in a serving process.
GC_YOUNG = 20_000

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
WATCH_INTERVAL = 0.005         # seconds between a busy worker's looks for waiting requests
COMMIT_INTERVAL = 5.0          # seconds between syncs of a disk-backed image
CONCURRENT_NS = 50_000_000     # overlapping requests this recent keep a second reader awake
# The keeper spins this long after the last caller's request began (DESIGN 22.3).
KEEP_NS = 1_000_000
# Readers waiting at once while requests overlap.  More only rotate the requests
# over more processes (the kernel hands each to the reader that waited longest),
# each with its CPU gone idle and its cache behind the others' writes: on 16
# cores, with every serving process reading, two O_DIRECT writers of one file
# were served slower than one.  One alone made a worker that finished sleep
# whenever the other was between two requests, and be woken again at the next
# overlap (2 cores, 2 writers: about 8% slower than two).
SPARE_READERS = 2
STOP_GRACE = 10.0              # seconds a worker has to finish its request
_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15

# worker exit statuses
EXIT_DONE = 0                  # unmounted, or asked to stop
EXIT_FAILED = 3                # the request loop itself failed (logged)
EXIT_ORPHANED = 4              # the supervisor died


_BACKGROUND = frozenset({W.RELEASE, W.RELEASEDIR, W.FORGET, W.BATCH_FORGET, W.INTERRUPT})
# requests pnova answers without any work (no state is kept per open file)
_QUICK = frozenset({W.RELEASE, W.RELEASEDIR})
_OP_CALLER = struct.Struct("<4xI24xI")          # opcode and pid of a request header


class Readers:
    """Which serving processes wait for the next request.

    The kernel wakes the reader that has waited longest, so with every worker
    blocked in read() a single client's requests alternate between processes,
    and each request finds the serving process's cache behind the other's
    writes.  So a worker that finishes a request goes to sleep instead of
    reading again when another worker is already waiting for requests and no
    two requests of callers have been served at once in the last
    CONCURRENT_NS, or, while requests overlap, when SPARE_READERS others
    already wait: enough to take the next overlapping requests at once, few
    enough that requests keep to a few processes.  A worker that takes a
    request while nobody else reads looks whether more requests are queued
    behind it, and wakes a sleeper if so:
    that one serves them while the first is busy, and the two requests served
    at once keep both awake.  The supervisor also wakes one when requests stay
    queued with nobody reading and no request finishing (a long request on the
    only awake worker).  Requests the kernel sends on its own (releases,
    forgets; caller 0) are nobody's load: they do not count as served at once.

    Shared words (a small anonymous mapping made before the fork): the number
    of workers in read(), the number serving a caller's request, the time two
    were last served at once, a bitmap of sleeping workers and the number of
    requests finished; each sleeper waits on an eventfd of its own.  For the
    keeper (:meth:`keep`) they also hold when the last caller's request began,
    that caller's thread id and whether the keeper sleeps (it waits on an
    eventfd too).

    Nothing polls: while a worker serves callers' requests and others sleep,
    an interval timer (SIGALRM every WATCH_INTERVAL) looks whether requests
    queued behind it with nobody reading, and wakes a sleeper if so (a long
    request on the only awake worker would otherwise hold them up).  The
    timer is armed by the first such request and stays armed across the
    requests that follow; the first tick that finds the worker between
    requests disarms it.  Arming and disarming per request cost two system
    calls each time, which a virtual machine turns into two exits to its
    hypervisor; an idle mount gets at most one tick.
    """

    _READING, _BUSY, _OVERLAP, _ASLEEP, _DONE = 0, 4, 8, 16, 24
    # the keeper's: when the last caller's request began, its caller, and
    # whether the keeper sleeps (1) or spins (0)
    _LAST, _CALLER, _KEEPER_ASLEEP = 32, 40, 44

    def __init__(self, nworkers: int) -> None:
        self.mm = mmap.mmap(-1, 64, mmap.MAP_SHARED)
        self.w = SharedWords(self.mm)
        self.efds = [os.eventfd(0) for _ in range(nworkers)]
        self.me = -1
        self.cpus = 1
        self.counted = False                      # the request in hand is a caller's
        self.armed = False                        # the watch timer runs
        self.looking = False                      # _look is running (not re-entered)
        self.serving = False                      # between started() and finished()
        self.queue = select.poll()
        # the timer's own: a poll object refuses a call from a signal handler
        # that interrupted a poll() on it
        self.watch = select.poll()
        # called before this worker goes to sleep (it may sleep for long)
        self.before_sleep: Callable[[], None] | None = None
        # wakes the keeper (-1: the mount has none)
        self.keep_efd = -1

    def become(self, worker: int, fd: int) -> None:
        """In the forked worker: act as reader ``worker`` of descriptor ``fd``."""
        self.me = worker
        self.cpus = len(os.sched_getaffinity(0))
        self.queue.register(fd, select.POLLIN)
        self.watch.register(fd, select.POLLIN)
        signal.signal(signal.SIGALRM, self._look)

    def sequential(self, now: int | None = None) -> bool:
        """No two callers' requests were served at once lately: one caller at a
        time (``now``: the monotonic clock in ns, if the caller has read it)."""
        if now is None:
            now = time.monotonic_ns()
        return now - self.w.load64(self._OVERLAP) > CONCURRENT_NS

    def may_look(self) -> bool:
        """Looking ahead for the next request (a CPU kept busy) pays: one caller at
        a time, or CPUs to spare (one for every awake worker and its caller, two
        for the callers of the overlapping requests not in hand)."""
        w = self.w
        return self.sequential() or \
            2 * (w.load32(self._READING) + w.load32(self._BUSY) + 1) <= self.cpus

    # -- the Turns protocol of the request loop -------------------------------
    def reading(self) -> None:
        w = self.w
        while True:
            # Counted before the look, so that two workers finishing at once see
            # each other; one woken meanwhile looks again (others may read now).
            n = w.add32(self._READING, 1)
            if not n or (n < SPARE_READERS and
                         time.monotonic_ns() - w.load64(self._OVERLAP) <= CONCURRENT_NS):
                return
            w.add32(self._READING, -1)
            self._sleep()

    def read_done(self) -> None:
        self.w.add32(self._READING, -1)

    def started(self, request: memoryview) -> None:
        self.serving = True                       # (before arming: see _look)
        w = self.w
        op, caller = _OP_CALLER.unpack_from(request)
        self.counted = caller != 0 and op not in _BACKGROUND
        if self.counted:
            now = time.monotonic_ns()
            if w.add32(self._BUSY, 1):
                w.store64(self._OVERLAP, now)                     # served at once
            # (only while requests come from one caller at a time: with
            # several, every CPU has work, and a keeper among them was measured
            # costing a third of two O_DIRECT writers' rate)
            if self.keep_efd >= 0 and self.sequential(now):
                w.store64(self._LAST, now)
                w.store32(self._CALLER, caller)
                if w.load32(self._KEEPER_ASLEEP) and w.cas32(self._KEEPER_ASLEEP, 1, 0):
                    os.eventfd_write(self.keep_efd, 1)
        # Requests wait behind this one: wake a sleeper, unless this one is a
        # release, which pnova answers at once (a close's RELEASE is queued just
        # before the caller's next request; waking a second process for that
        # one would move a sequential caller between processes).
        if op not in _QUICK and w.load64(self._ASLEEP):
            if not w.load32(self._READING) and self.queue.poll(0):
                self.wake_one()
            elif not self.armed:
                # requests that queue while this one runs: see _look
                signal.setitimer(signal.ITIMER_REAL, WATCH_INTERVAL, WATCH_INTERVAL)
                self.armed = True

    def finished(self) -> None:
        self.serving = False
        if self.counted:
            self.w.add32(self._BUSY, -1)
        self.w.add64(self._DONE, 1)

    def _look(self, *_args: object) -> None:
        """SIGALRM: while serving, wake a sleeper if requests wait and nobody
        reads; between requests, stop the timer (the next request arms it).

        A tick that arrives while the handler of the one before still runs (a
        loaded machine delays it) would run the handler again inside it, and
        its poll() of the watch would raise "concurrent poll() invocation" in
        the middle of whatever request the worker was serving: such a tick is
        skipped (the next one looks)."""
        if self.looking:
            return
        self.looking = True
        try:
            if not self.serving:
                self._disarm()
            elif not self.w.load32(self._READING) and self.watch.poll(0) and self.wake_one():
                self._disarm()
        finally:
            self.looking = False

    def _disarm(self) -> None:
        if self.armed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            self.armed = False

    # -- sleeping and waking ---------------------------------------------------
    def _sleep(self) -> None:
        self._disarm()                            # asleep, it serves nothing to watch
        if self.before_sleep is not None:
            self.before_sleep()
        w = self.w
        bit = 1 << self.me
        while not w.cas64(self._ASLEEP, v := w.load64(self._ASLEEP), v | bit):
            pass
        if not w.load32(self._READING):
            # The reader took a request meanwhile: stay awake (a wake-up that
            # came in between is only a spare eventfd count).
            if self._claim(bit):
                return
        os.eventfd_read(self.efds[self.me])       # a stop signal interrupts it

    def _claim(self, bit: int) -> bool:
        """Clear ``bit`` in the sleepers' bitmap; False if someone else did."""
        w = self.w
        while (v := w.load64(self._ASLEEP)) & bit:
            if w.cas64(self._ASLEEP, v, v & ~bit):
                return True
        return False

    def wake_one(self) -> bool:
        """Wake one sleeping worker, if there is one."""
        while v := self.w.load64(self._ASLEEP):
            bit = v & -v
            if self._claim(bit):
                os.eventfd_write(self.efds[bit.bit_length() - 1], 1)
                return True
        return False

    # -- the keeper --------------------------------------------------------------
    def keep(self) -> None:
        """The keeper's loop (it never returns): spin while a caller's requests
        come one at a time, on the CPU the last caller ran on, and sleep once
        none began for KEEP_NS (requests that overlap do not count).  It runs
        at the idle scheduling class, so any task that wants its CPU, the
        caller first, gets it at once; what it buys is that the CPU is busy
        rather than halted when the reply wakes the caller there
        (DESIGN 22.3)."""
        w = self.w
        clock = time.monotonic_ns
        cpus = os.sched_getaffinity(0)
        on = -1                                   # the CPU it keeps (-1: any)
        while True:
            w.store32(self._KEEPER_ASLEEP, 1)
            # (stored before the look: a request that begins meanwhile sees
            # the flag and writes the eventfd, so no wake-up is lost)
            if clock() - w.load64(self._LAST) > KEEP_NS:
                os.eventfd_read(self.keep_efd)
            w.store32(self._KEEPER_ASLEEP, 0)
            n = 0
            while clock() - w.load64(self._LAST) <= KEEP_NS:
                n += 1
                if not n & 4095:                  # about every millisecond it spins
                    on = _follow(w.load32(self._CALLER), on, cpus)


def _follow(caller: int, on: int, cpus: set[int]) -> int:
    """Move this process onto the CPU ``caller`` last ran on; returns the CPU
    it now keeps.  (Field 39 of /proc/PID/stat, counted after the command
    name, which may hold spaces.)"""
    try:
        with open(f"/proc/{caller}/stat", "rb") as f:
            cpu = int(f.read().rpartition(b")")[2].split()[36])
        if cpu != on and cpu in cpus:
            os.sched_setaffinity(0, {cpu})
            return cpu
    except (OSError, ValueError, IndexError):
        pass                                      # gone, or not ours to read
    return on


def default_workers(fs: FileSystem) -> int:
    """One serving process per logical CPU of the image that this machine has."""
    return max(1, min(fs.ncpus, len(os.sched_getaffinity(0))))


@dataclass
class _State:
    """What the supervisor has learnt so far."""
    workers: dict[int, int]                       # pid -> CPU, while alive
    keeper: int = 0                               # the keeper's pid (0: none)
    stopping: bool = False                        # a clean stop is under way
    failure: str | None = None                    # why the mount was aborted


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"was killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with status {os.WEXITSTATUS(status)}"


def serve(fs: FileSystem, mountpoint: str, options: Iterable[str], *,
          workers: int | None = None, debug: bool = False,
          on_ready: Callable[[], None] | None = None,
          child_setup: Callable[[], None] | None = None,
          ops_factory: Callable[[FileSystem], PnovaOperations] = PnovaOperations,
          wanted: int = WANTED, commit: float = COMMIT_INTERVAL, keeper: bool = True,
          uring: bool | None = None) -> int:
    """Mount ``fs`` on ``mountpoint`` and serve it with ``workers`` processes.

    ``options``: VFS and kernel FUSE options, plus ``fsname=`` (the source
    /proc/mounts shows) and ``subtype=``.  ``on_ready`` runs in the supervisor
    once the workers read requests; ``child_setup`` in each worker right after
    the fork (to close descriptors it must not keep).  ``wanted``: the INIT
    capabilities asked for (tests take one away).  ``commit``: seconds between
    syncs of a disk-backed image (0: only when asked, DESIGN 24).  ``keeper``: with
    several serving processes, one more process keeps the CPU of a caller whose
    requests come one at a time awake meanwhile (:meth:`Readers.keep`).
    ``uring``: take requests through FUSE over io_uring, one queue per CPU
    (DESIGN 22.8): None uses it when the kernel offers it, True insists (a
    MountError if it does not), False never asks for it.
    Returns 0 after a clean unmount (the engine's state is saved), 1 when the
    mount was aborted (the engine is released unsaved).  Raises MountError / ProtocolError when the
    kernel mount or its handshake fails.
    """
    opts, fsname, subtype = [], "pnova", "pnova"
    for o in options:
        key, _, value = o.partition("=")
        if key == "fsname":
            fsname = value
        elif key == "subtype":
            subtype = value
        elif o != "debug":
            opts.append(o)
    n = workers or default_workers(fs)
    if uring is not False:
        why = uring_unusable()
        if why is None:
            wanted |= W.OVER_IO_URING
        elif uring:
            raise MountError(f"io_uring=on: {why}")
        elif uring_offered():
            log.warning("FUSE over io_uring is offered but %s; reading /dev/fuse", why)
    # Signals stay blocked until the supervisor's trio receiver exists (and,
    # in workers, until their handlers are set), so that a SIGTERM arriving
    # right after the mount appears still unmounts cleanly.
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        conn = Connection.mount(mountpoint, opts, fsname=fsname, subtype=subtype)
        try:
            neg = conn.negotiate(wanted)
        except BaseException:
            detach(mountpoint)
            conn.close()
            raise
        log.info("FUSE protocol 7.%d with %s; %d serving process%s", neg.minor,
                 ", ".join(neg.names()), n, "" if n == 1 else "es")
        log.info("mounted on %s, type fuse.%s", mountpoint, subtype)
        fs.prepare_workers(workers=n)
        queues: list[list[int]] | None = None
        if neg.flags & W.OVER_IO_URING:
            nq = possible_cpus()
            queues = assign_queues(nq, n, os.sched_getaffinity(0))
            log.info("requests come through io_uring: %d queues over %d serving "
                     "process%s", nq, n, "" if n == 1 else "es")
        # (with io_uring, requests are already spread by the caller's CPU)
        readers = Readers(n) if n > 1 and queues is None else None
        if readers is not None and keeper and len(os.sched_getaffinity(0)) > 1:
            # (with one usable CPU the caller's CPU is the serving one: nothing to keep)
            readers.keep_efd = os.eventfd(0, os.EFD_CLOEXEC)
        # A worker whose ring of log pages runs low wakes the refiller.
        refill = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        fs.ring_low = functools.partial(os.eventfd_write, refill, 1)
        # On a disk, freed blocks wait for a sync; a worker holding many asks
        # the supervisor for one early.
        syncs = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        fs.hold_frees_until_sync()
        fs.alloc.want_sync = functools.partial(os.eventfd_write, syncs, 1)
        pids: dict[int, int] = {}
        try:
            for cpu in range(n):
                pid = os.fork()
                if pid == 0:
                    _worker(fs, conn, cpu, ops_factory, debug, child_setup,
                            readers, None if queues is None else queues[cpu])
                    # (never returns)
                pids[pid] = cpu
        except OSError as e:
            log.error("cannot start serving processes: %s", e.strerror)
            for pid in pids:
                _kill(pid, signal.SIGTERM)
        state = _State(dict(pids))
        supervisor = os.getpid()
        if readers is not None and readers.keep_efd >= 0 and len(pids) == n:
            try:
                state.keeper = os.fork()
                if state.keeper == 0:
                    _keeper(conn, readers, child_setup, supervisor)     # never returns
            except OSError as e:
                state.keeper = 0
                log.warning("no keeper process (%s); serving without it", e.strerror)
        if on_ready is not None and len(pids) == n:
            on_ready()
        if len(pids) < n:
            state.failure = "not every serving process could be started"
        try:
            trio.run(_supervise, fs, conn, state, refill, syncs, commit)
        except BaseException:
            log.exception("the supervisor failed")
            state.failure = state.failure or "the supervisor failed"
            for pid in state.workers:
                _kill(pid, signal.SIGKILL)
        finally:
            if state.keeper:
                _kill(state.keeper, signal.SIGKILL)
                os.waitpid(state.keeper, 0)
            if readers is not None and readers.keep_efd >= 0:
                os.close(readers.keep_efd)
            # The connection ends once every serving process has closed it too.
            conn.close()
            os.close(refill)
            os.close(syncs)
            fs.ring_low = None
            fs.alloc.want_sync = None
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
    if state.failure:
        log.error("%s; the mount was aborted and the image will be recovered at the next "
                  "mount", state.failure)
        fs.abandon()
        return 1
    fs.unmount()
    log.info("%s unmounted", mountpoint)
    return 0


def uring_unusable() -> str | None:
    """Why the mount cannot take requests through io_uring here, or None if it
    can: the kernel must offer FUSE over io_uring and let this process set up a
    ring (a sysctl or a seccomp filter may forbid io_uring altogether)."""
    if not uring_offered():
        return ("this kernel does not offer FUSE over io_uring (Linux 6.14 or later; as "
                "root: echo Y > /sys/module/fuse/parameters/enable_uring)")
    try:
        from ._uring import Ring
        Ring(8).close()
    except (OSError, ImportError) as e:
        return f"io_uring cannot be set up here ({getattr(e, 'strerror', None) or e})"
    return None


def assign_queues(nqueues: int, workers: int, allowed: set[int]) -> list[list[int]]:
    """The io_uring queues (one per possible CPU) each serving process serves:
    the CPUs this daemon may run on first, dealt out in turn, so that each
    process has CPUs to be pinned to where there are enough; then the others
    (callers elsewhere are served too, just not on their own CPU)."""
    order = sorted(q for q in allowed if q < nqueues)
    order += [q for q in range(nqueues) if q not in allowed]
    return [order[k::workers] for k in range(workers)]


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


# ---------------------------------------------------------------- the supervisor
async def _supervise(fs: FileSystem, conn: Connection, state: _State,
                     refill: int, syncs: int, commit: float) -> None:
    mountpoint = conn.mountpoint
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_signals, mountpoint, state)
        nursery.start_soon(_refiller, fs, refill)
        if fs.pm.mode == "disk" and not fs.readonly:
            nursery.start_soon(_syncer, fs, syncs, commit)
        async with trio.open_nursery() as watchers:
            for pid, cpu in list(state.workers.items()):
                watchers.start_soon(_watch, pid, cpu, mountpoint, state)
        nursery.cancel_scope.cancel()             # every worker has exited


async def _signals(mountpoint: str, state: _State) -> None:
    with trio.open_signal_receiver(*SIGNALS) as received:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
        async for signum in received:
            log.info("%s received: unmounting", signal.Signals(signum).name)
            _stop(mountpoint, state)


async def _refiller(fs: FileSystem, wanted: int) -> None:
    """pNOVA's designated refiller: the only producer of every CPU's ring.  It
    sleeps until a worker's ring runs low (the eventfd ``wanted``)."""
    while True:
        fs.refill_rings()
        await trio.lowlevel.wait_readable(wanted)
        try:
            os.eventfd_read(wanted)
        except BlockingIOError:
            pass


async def _syncer(fs: FileSystem, syncs: int, commit: float) -> None:
    """Sync a disk-backed image every ``commit`` seconds (ext4's commit interval:
    what a power loss can take is bounded), and when a worker holds many freed
    blocks back (they become reusable only after a sync).  The msync alone runs
    in a thread, so that signals and worker exits are still seen meanwhile;
    everything else (the allocator, which the refiller uses too) stays in
    this one."""
    done = -1                                   # the sequence counter at the last sync
    while True:
        asked = False
        with trio.move_on_after(commit if commit > 0 else math.inf):
            await trio.lowlevel.wait_readable(syncs)
            asked = True
        try:
            os.eventfd_read(syncs)
        except BlockingIOError:
            pass
        w = fs.area.w
        now = w.load64(H_SEQ)                   # every change takes a sequence number
        # Blocks held until the sync record covers their write need one more
        # sync after the one that made the write durable (DESIGN 24.3).
        behind = fs.alloc.split_frees and w.load64(H_LIMBO) and \
            w.load64(H_RDURABLE) < w.load64(H_RSYNC)
        if asked or now != done or behind:
            try:
                ticket = fs.sync_start()
            except LockTimeout:
                # a serving process stopped in a compaction's switch (DESIGN
                # 24.5): this sync is skipped, the next interval tries again
                log.error("sync skipped: a compaction's switch held the sync gate")
                continue
            if ticket:
                try:
                    await trio.to_thread.run_sync(fs.pm.sync)
                except BaseException:
                    fs.sync_failed(ticket)
                    raise
                fs.sync_done(ticket)
            done = now


def _stop(mountpoint: str, state: _State) -> None:
    """Begin a stop: detach the mount (unless it is being aborted), then ask every
    worker to finish the request in hand and exit."""
    if state.stopping:
        return
    state.stopping = True
    if state.failure is None:
        detach(mountpoint)
    for pid in state.workers:
        _kill(pid, signal.SIGTERM)


async def _watch(pid: int, cpu: int, mountpoint: str, state: _State) -> None:
    """Wait for one worker to exit and act on how it ended."""
    fd = os.pidfd_open(pid)
    try:
        await trio.lowlevel.wait_readable(fd)
    finally:
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    del state.workers[pid]
    how = _describe(status)
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == EXIT_DONE:
        log.debug("serving process %d (CPU %d) %s", pid, cpu, how)
        _stop(mountpoint, state)                  # an unmount, or a stop request
        return
    if state.failure is None:
        state.failure = f"serving process {pid} (CPU {cpu}) {how}"
        log.error("%s: stopping the others", state.failure)
    _stop(mountpoint, state)
    # A worker that cannot finish its request in time is killed: the mount
    # is being aborted anyway.
    with trio.move_on_after(STOP_GRACE):
        while state.workers:
            await trio.sleep(0.05)
    for other in list(state.workers):
        _kill(other, signal.SIGKILL)


# ---------------------------------------------------------------- a worker
def _settle_held(fs: FileSystem, landing: Landing | None = None) -> None:
    """Before a serving process goes quiet (to sleep, or to exit): the blocks
    reserved for a landing go back (DESIGN 22.6).  Blocks it holds back until
    a sync need nothing here: they wait in its CPU's held list in the shared
    area, which every completed sync empties of what it made safe, whoever
    runs it (DESIGN 24).  A compaction whose new chain is on its way to the
    disk is switched first: another process's sync would otherwise make it
    give up, and one that exits would leave its blocks taken (24.5)."""
    try:
        fs.finish_compactions()
    except Exception:                             # noqa: BLE001 - the mount goes on
        log.exception("cpu%d: switching a compacted log failed", fs.cpu)
    if landing is not None:
        landing.end()


def _keeper(conn: Connection, readers: Readers,
            child_setup: Callable[[], None] | None, supervisor: int) -> None:
    """The forked keeper (:meth:`Readers.keep`): it serves nothing and closes
    its copy of the connection; what else it inherited (the image's descriptor,
    its lock and mapping) it never uses, and the supervisor kills and reaps it
    before it unlocks the image.  It ends with the supervisor (``supervisor``:
    its pid, taken before the fork: one read here could already be init's)."""
    try:
        if child_setup is not None:
            child_setup()
        os.close(conn.fd)                         # the mount ends with its serving processes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        libc.prctl(_PR_SET_NAME, b"pnova-keep")
        ignore_terminal_signals()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
        if os.getppid() == supervisor:            # (else it died before PDEATHSIG was set)
            # the lowest class: never in the way of a task that wants the CPU,
            # and (without CAP_SYS_NICE) never allowed back out of it
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            readers.keep()
    except BaseException:                         # noqa: BLE001 - a keeper only speeds up
        log.exception("the keeper failed; serving goes on without it")
    finally:
        os._exit(0)


def _uring_loop(fs: FileSystem, conn: Connection, cpu: int, ops: PnovaOperations,
                queues: list[int], debug: bool) -> Loop:
    """The request loop of a worker serving the io_uring queues ``queues``
    (CPU numbers): pinned to those CPUs, so that their requests are served
    where their callers run.  Worker 0 also reads what comes through the
    descriptor itself.  If the kernel refuses the ring, the worker reads the
    descriptor as without io_uring (a warning says so)."""
    allowed = os.sched_getaffinity(0)
    mine = set(queues) & allowed
    if mine:
        os.sched_setaffinity(0, mine)
    classic = -1
    try:
        classic = clone_nonblocking(conn.fd) if cpu == 0 else -1
        loop = UringLoop(conn.fd, ops.table, queues, classic=classic, name=f"cpu{cpu}",
                         debug=debug)
        loop.first = loop.register()
        # the data of a write comes in the ring's buffer: nothing to land
        ops.landing = None
        return loop
    except (OSError, UringUnavailable) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        log.warning("cpu%d: the kernel refused FUSE over io_uring (%s); reading "
                    "/dev/fuse instead", cpu, why)
        if classic >= 0:
            os.close(classic)
        if mine:
            os.sched_setaffinity(0, allowed)
        return Loop(conn.fd, ops.table, name=f"cpu{cpu}", debug=debug, landing=ops.landing)


def _worker(fs: FileSystem, conn: Connection, cpu: int,
            ops_factory: Callable[[FileSystem], PnovaOperations], debug: bool,
            child_setup: Callable[[], None] | None, readers: Readers | None,
            queues: list[int] | None = None) -> None:
    """The forked child: serve as ``cpu`` until the mount ends, then exit
    (``queues``: the io_uring queues it serves, None to read /dev/fuse)."""
    code = EXIT_FAILED
    supervisor = os.getppid()
    try:
        if child_setup is not None:
            child_setup()
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        # ps and /proc/PID/comm tell the serving processes apart
        libc.prctl(_PR_SET_NAME, f"pnova-cpu{cpu}".encode())
        fs.become_worker(cpu)
        ops = ops_factory(fs)
        if readers is not None:
            readers.become(cpu, conn.fd)
            readers.before_sleep = functools.partial(_settle_held, fs, ops.landing)
        if queues is not None:
            loop = _uring_loop(fs, conn, cpu, ops, queues, debug)
        else:
            loop = Loop(conn.fd, ops.table, name=f"cpu{cpu}", debug=debug, turns=readers,
                        landing=ops.landing)
        ignore_terminal_signals()
        # Every request allocates short-lived objects and the inode cache keeps
        # growing: with Python's default threshold a young collection runs every
        # few requests and scans more each time (7% of a create, measured; 2%
        # with this threshold).  What the process holds from before serving
        # is left out of collections altogether.
        gc.freeze()
        gc.set_threshold(GC_YOUNG, 20, 20)
        signal.signal(signal.SIGTERM, loop.request_stop)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
        if os.getppid() != supervisor:            # it died before PDEATHSIG was set
            loop.stopping = True
        how = loop.run()
        # Other serving processes may still allocate: what this one held back
        # goes back only after a sync (a process that dies leaves it to recovery).
        _settle_held(fs, ops.landing)
        code = EXIT_DONE
        if os.getppid() != supervisor:
            code = EXIT_ORPHANED
            log.error("cpu%d: the supervisor died; stopping (the next mount recovers the "
                      "image)", cpu)
        log.info("cpu%d: %s after %d requests", cpu, how, loop.served)
    except BaseException:
        log.exception("serving process for CPU %d failed", cpu)
    finally:
        for h in logging.getLogger().handlers:
            try:
                h.flush()
            except Exception:                     # noqa: BLE001 - exiting anyway
                pass
        os._exit(code)

