"""Several processes writing one device at once: no torn page, one truth.

Worker processes (one per CPU, forked after prepare_workers) run
hypothesis-generated mixes of overlapping and disjoint writes, reads, appends
and truncates on shared files.  Every write fills each 8-byte word of its
pages with a tag naming the write, so a page's content says which write it
came from.  Checked: reads never see a torn page or a tag that did not cover
that page; afterwards the live view, a clean remount and a crash recovery
(which merges the per-core logs by sequence number) agree exactly; fsck is
clean.
"""
from __future__ import annotations

import io
import os
import struct
import time

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from pnova.engine import FileSystem
from pnova.errors import FsError
from pnova.fsck import Checker
from pnova.mkfs import format_device

from helpers import fork_workers

PAGE = 4096
NFILES = 2
MAXPAGE = 24

no_truncate = st.one_of(
    st.tuples(st.just("write"), st.integers(0, NFILES - 1), st.integers(0, MAXPAGE),
              st.integers(1, 6)),
    st.tuples(st.just("read"), st.integers(0, NFILES - 1), st.integers(0, MAXPAGE),
              st.integers(1, 8)),
)
op = st.one_of(
    st.tuples(st.just("write"), st.integers(0, NFILES - 1), st.integers(0, MAXPAGE),
              st.integers(1, 6)),
    st.tuples(st.just("read"), st.integers(0, NFILES - 1), st.integers(0, MAXPAGE),
              st.integers(1, 8)),
    st.tuples(st.just("append"), st.integers(0, NFILES - 1), st.just(0), st.integers(1, 3)),
    st.tuples(st.just("truncate"), st.integers(0, NFILES - 1), st.integers(0, MAXPAGE),
              st.just(0)),
)


def tag(cpu: int, i: int, p: int) -> int:
    """The word written into page ``p`` by op ``i`` of ``cpu`` (never 0)."""
    return (cpu + 1) << 48 | (i + 1) << 24 | (p + 1)


def page_of(t: int) -> tuple[int, int, int]:
    return (t >> 48) - 1, ((t >> 24) & 0xFFFFFF) - 1, (t & 0xFFFFFF) - 1


def check_pages(data: bytes, first_page: int, where: str) -> None:
    """Every whole page is one tag for that page, or zeros."""
    words = np.frombuffer(data[:len(data) // PAGE * PAGE], dtype="<u8").reshape(-1, PAGE // 8)
    for k, row in enumerate(words):
        t = int(row[0])
        assert (row == t).all(), f"{where}: torn page {first_page + k}"
        if t:
            assert page_of(t)[2] == first_page + k, f"{where}: page {first_page + k} holds " \
                f"a tag of page {page_of(t)[2]}"


def worker(fs: FileSystem, cpu: int, inos: list[int], ops: list[tuple]) -> None:
    fs.become_worker(cpu)
    for i, (kind, f, p, n) in enumerate(ops):
        ino = inos[f]
        if kind == "write" or kind == "append":
            if kind == "append":
                p = -(-fs.getattr(ino).size // PAGE)
            buf = b"".join(struct.pack("<Q", tag(cpu, i, q)) * (PAGE // 8)
                           for q in range(p, p + n))
            fs.write(ino, p * PAGE, buf)
        elif kind == "read":
            check_pages(fs.read(ino, p * PAGE, n * PAGE), p, f"cpu {cpu} op {i}")
        else:
            fs.setattr(ino, size=p * PAGE)


def snapshot(fs: FileSystem, inos: list[int]) -> list[tuple[int, bytes]]:
    out = []
    for ino in inos:
        size = fs.getattr(ino).size
        data = fs.read(ino, 0, size)
        check_pages(data, 0, f"inode {ino}")
        out.append((size, data))
    return out


def run_workers(path: str, scheme: str, per_cpu: list[list[tuple]]) -> list[tuple[int, bytes]]:
    """Fork one worker per op list (CPU k runs per_cpu[k]); check all views agree."""
    fs = FileSystem.mount(path, lock=scheme, segment_pages=4)
    inos = [fs.create(1, b"f%d" % i, 0o644).ino for i in range(NFILES)]
    fs.prepare_workers()
    fork_workers(fs, len(per_cpu), lambda cpu: worker(fs, cpu, inos, per_cpu[cpu]))
    live = snapshot(fs, inos)
    # a crash now: the next mount must rebuild the same state from the logs
    fs.pm.close()
    fs.pm = None
    rec = FileSystem.mount(path)
    assert rec.mount_path == "recovery"
    assert snapshot(rec, inos) == live, "recovery disagrees with what the workers left"
    rec.unmount()
    out = io.StringIO()
    assert Checker(path, force=True, out=out).run() == 0, out.getvalue()
    clean = FileSystem.mount(path)
    assert snapshot(clean, inos) == live
    clean.unmount()
    return live


@pytest.mark.parametrize("scheme", ["inode", "rangetree", "segment", "pnova"])
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(per_cpu=st.lists(st.lists(op, min_size=20, max_size=60), min_size=2, max_size=2))
def test_concurrent_mixes(tmp_path, scheme, per_cpu):
    path = str(tmp_path / f"mc-{scheme}.img")
    format_device(path, 16 << 20, numa_nodes=1, cpus_per_node=2)
    run_workers(path, scheme, per_cpu)


def test_disjoint_writers_keep_their_own_pages(tmp_path):
    """Without truncates every page ends with a write that covered it, and the size
    is the furthest end any write reached."""
    path = str(tmp_path / "d.img")
    format_device(path, 32 << 20, numa_nodes=1, cpus_per_node=2)
    ops = [[("write", 0, (cpu * 3 + k) % 20, 2) for k in range(300)] for cpu in range(2)]
    (size, data), _ = run_workers(path, "pnova", ops)
    assert size == 21 * PAGE
    words = np.frombuffer(data, dtype="<u8").reshape(-1, PAGE // 8)[:, 0]
    assert all(page_of(int(t))[2] == p for p, t in enumerate(words) if t)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(per_cpu=st.lists(st.lists(no_truncate, min_size=30, max_size=80), min_size=3,
                       max_size=3))
def test_three_cpus_merge_their_logs(tmp_path, per_cpu):
    """Three CPUs, two of them appending to local logs: caches that catch up while
    others commit must still apply conflicting writes in their order."""
    path = str(tmp_path / "three.img")
    format_device(path, 16 << 20, numa_nodes=1, cpus_per_node=3)
    run_workers(path, "pnova", per_cpu)


def test_catch_up_sees_an_earlier_write_committed_mid_scan(tmp_path):
    """A cache scanning local tails in CPU order must not apply a later write of
    CPU 2 before an earlier, conflicting one of CPU 1 that committed while it
    was looking at CPU 2's log (the scan repeats until no tail moves)."""
    path = str(tmp_path / "race.img")
    format_device(path, 16 << 20, numa_nodes=1, cpus_per_node=3)
    fs0 = FileSystem.mount(path, lock="pnova")
    ino = fs0.create(1, b"f", 0o644).ino
    assert (ino - 1) % 3 == 0                      # CPU 0 is its home CPU
    fs1, fs2 = FileSystem.attach(fs0, 1), FileSystem.attach(fs0, 2)
    fs1.write(ino, 0, b"1" * PAGE)                 # both CPUs now have local logs
    fs2.write(ino, 0, b"2" * PAGE)
    assert fs0.read(ino, 0, 4) == b"2222"
    real = fs0._read_lines
    armed = [True]

    def torn_read(base):
        """Reads the array lines as a scan would if x and y committed between its
        read of CPU 1's line and its read of CPU 2's line."""
        before = real(base)
        if not armed[0]:
            return before
        armed[0] = False
        fs1.write(ino, 0, b"x" * PAGE)             # x commits, then the later y
        fs2.write(ino, 0, b"y" * PAGE)
        after = real(base)
        # CPU 0 and 1 old, CPU 2 new
        return tuple(b[:2] + a[2:] for b, a in zip(before, after))

    fs2.write(ino, 4 * PAGE, b"z" * PAGE)          # a tail moved: the cache scans the lines
    fs0._read_lines = torn_read
    try:
        got = fs0.read(ino, 0, 4)
    finally:
        del fs0._read_lines
    assert not armed[0]
    assert got == b"yyyy"
    assert fs0.read(ino, 0, 4) == b"yyyy"          # and the next catch-up keeps it
    fs0.unmount()


def test_a_killed_worker_does_not_wedge_the_others(tmp_path):
    """kill -9 of a worker that holds the write locks of the pages the survivor
    writes: the survivor takes them over once the lease has passed and keeps
    going; a crash recovery afterwards gives an fsck-clean device, whole pages."""
    import signal

    path = str(tmp_path / "kill.img")
    format_device(path, 16 << 20, numa_nodes=1, cpus_per_node=2)
    fs = FileSystem.mount(path, lock="segment", segment_pages=4)
    ino = fs.create(1, b"f", 0o644).ino
    fs.write(ino, 0, bytes(8 * PAGE))
    fs.prepare_workers()
    progress = tmp_path / "progress"

    def loop(cpu: int, count: int | None) -> None:
        fs.become_worker(cpu)
        i = 0
        while count is None or i < count:
            p = i % 8
            fs.write(ino, p * PAGE, struct.pack("<Q", tag(cpu, i, p)) * (PAGE // 8))
            i += 1
            if cpu == 1 and i == 50:
                # die holding the lock of the pages the survivor will write
                fs.scheme.lock(ino, 0, 7, True)
                progress.write_text("holding")
                time.sleep(60)

    victim = os.fork()
    if victim == 0:
        try:
            loop(1, None)
        finally:
            os._exit(1)
    deadline = time.monotonic() + 30
    while not progress.exists():
        assert time.monotonic() < deadline
        time.sleep(0.001)
    os.kill(victim, signal.SIGKILL)
    os.waitpid(victim, 0)
    from pnova.locks import WRITER
    slots = fs.scheme.slots(ino, 0, 7)
    assert all(fs.area.w.load32(o) == WRITER | 2 for o in slots)   # held by dead CPU 1
    survivor = os.fork()
    if survivor == 0:
        code = 1
        try:
            loop(0, 2000)
            code = 0
        finally:
            os._exit(code)
    while True:
        done, status = os.waitpid(survivor, os.WNOHANG)
        if done:
            break
        assert time.monotonic() < deadline + 30, "the survivor is stuck behind a dead lock"
        time.sleep(0.01)
    assert os.waitstatus_to_exitcode(status) == 0
    assert all(fs.area.w.load32(o) == 0 for o in slots)
    fs.pm.close()                                  # the whole thing crashes now
    fs.pm = None
    rec = FileSystem.mount(path)
    data = rec.read(ino, 0, 8 * PAGE)
    check_pages(data, 0, "after the kill")
    rec.unmount()
    out = io.StringIO()
    assert Checker(path, force=True, out=out).run() == 0, out.getvalue()


def test_inode_slots_are_shared_between_processes(tmp_path):
    """A slot freed by one process is free for the others at once, and two
    processes creating files at the same time never get the same inode."""
    path = str(tmp_path / "ino.img")
    format_device(path, 8 << 20, numa_nodes=1, cpus_per_node=2, inodes_per_cpu=32)
    fs = FileSystem.mount(path)
    d = [fs.mkdir(1, b"d%d" % c, 0o755).ino for c in range(2)]
    fs.prepare_workers()
    free0 = fs.statfs().ffree
    pids = []
    for c in range(2):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                fs.become_worker(c)
                for i in range(20):
                    fs.create(d[c], b"f%d" % i, 0o644)
                for i in range(0, 20, 2):
                    fs.unlink(d[c], b"f%d" % i)
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)
    for pid in pids:
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    assert fs.statfs().ffree == free0 - 20                 # 40 made, 20 freed, seen here
    inos = {fs.lookup(d[c], b"f%d" % i).ino for c in range(2) for i in range(1, 20, 2)}
    assert len(inos) == 20
    fs.unmount()
    out = io.StringIO()
    assert Checker(path, force=True, out=out).run() == 0, out.getvalue()


def test_a_file_open_in_one_process_survives_unlink_by_another(tmp_path):
    path = str(tmp_path / "open.img")
    format_device(path, 8 << 20, numa_nodes=1, cpus_per_node=2)
    fs = FileSystem.mount(path)
    ino = fs.create(1, b"f", 0o644).ino
    fs.write(ino, 0, b"keep me" * 1000)
    fs.prepare_workers()
    fs.ref(ino)                                    # this process has it open
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fs.become_worker(1)
            fs.unlink(1, b"f")                     # another process removes the name
            code = 0
        finally:
            os._exit(code)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    assert fs.getattr(ino).nlink == 0
    assert fs.read(ino, 0, 7) == b"keep me"        # still readable here
    free = fs.statfs().bfree
    fs.forget(ino)                                 # the last reference goes
    assert fs.statfs().bfree > free
    with pytest.raises(FsError):
        fs.getattr(ino)
    fs.unmount()
    out = io.StringIO()
    assert Checker(path, force=True, out=out).run() == 0, out.getvalue()


def _fsck_clean(path: str) -> None:
    out = io.StringIO()
    assert Checker(path, force=True, out=out).run() == 0, out.getvalue()


@pytest.mark.parametrize("scheme", ["inode", "rangetree", "segment", "pnova"])
def test_a_writer_defers_catching_up_with_other_pages_but_not_its_own(tmp_path, scheme):
    """A write whose pages no other process changed since this process last looked
    need not replay the others' entries first (their page-group versions say
    so); a write to a page another process changed must see that change."""
    path = str(tmp_path / "defer.img")
    format_device(path, 32 << 20, numa_nodes=1, cpus_per_node=2)
    a = FileSystem.mount(path, lock=scheme)
    ino = a.create(1, b"f", 0o644).ino
    a.write(ino, 0, b"." * (64 * PAGE))
    b = FileSystem.attach(a, 1)
    b.write(ino, 40 * PAGE, b"b" * PAGE)                # b's cache now holds the file
    a.write(ino, 0, b"a" * PAGE)                        # page 0 (group 0) changes in a
    b.write(ino, 40 * PAGE, b"B" * PAGE)                # group 2: b need not look at a's write
    if scheme == "pnova":
        # b appends to its own local log, so nothing made it look (the other
        # schemes append to the file's log, whose moved tail makes b catch up).
        assert b.cache[ino].pages[0] != a.cache[ino].pages[0]
    # A partial write of page 0 by b must keep a's bytes around its own.
    b.write(ino, 100, b"xyz")
    want = b"a" * 100 + b"xyz" + b"a" * (PAGE - 103)
    assert b.read(ino, 0, PAGE) == want and a.read(ino, 0, PAGE) == want
    assert b.read(ino, 40 * PAGE, 4) == b"BBBB"
    # A truncate in a makes b's next write (below the new end) see the new size.
    a.setattr(ino, size=50 * PAGE)
    b.write(ino, 41 * PAGE, b"c" * PAGE)
    assert b.getattr(ino).size == a.getattr(ino).size == 50 * PAGE
    # Times come from the newest entry even when entries of other pages are
    # replayed after it.
    a.write(ino, 2 * PAGE, b"d" * PAGE)
    b.write(ino, 42 * PAGE, b"e" * PAGE)
    live = b.getattr(ino)
    a.unmount()                                         # the primary: b goes with it
    _fsck_clean(path)
    fresh = FileSystem.mount(path)
    try:
        again = fresh.getattr(ino)
        assert (again.size, again.mtime_ns) == (live.size, live.mtime_ns)
        assert fresh.read(ino, 0, PAGE) == want
        for p, c in ((2, b"d"), (40, b"B"), (41, b"c"), (42, b"e")):
            assert fresh.read(ino, p * PAGE, PAGE) == c * PAGE
    finally:
        fresh.unmount()


def test_stashed_blocks_are_free_space_and_go_back_at_unmount(tmp_path):
    """Blocks a worker keeps in its stash count as free in statfs, a worker that
    exits leaves its stash to the primary, and the clean unmount returns every
    stash to the bitmaps: fsck finds no leaked block."""
    path = str(tmp_path / "stash.img")
    format_device(path, 16 << 20, numa_nodes=1, cpus_per_node=2)
    fs = FileSystem.mount(path)
    f = fs.create(1, b"f", 0o644).ino
    fs.write(f, 0, b"x" * 4096 * 8)
    fs.prepare_workers()
    free0 = fs.statfs().bfree
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fs.become_worker(1)
            for i in range(50):                  # overwrites: blocks go through the stash
                fs.write(f, 4096 * (i % 8), b"%d" % i * 1000)
            code = 0 if len(fs.alloc.stashes[1]) > 0 else 2
        finally:
            os._exit(code)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    assert len(fs.alloc.stashes[1]) > 0                   # left behind by the worker
    free = fs.statfs().bfree
    assert free0 - 8 < free <= free0                      # a local log, nothing more
    fs.unmount()                                          # drains every stash
    out = io.StringIO()
    assert Checker(path, force=True, out=out).run() == 0, out.getvalue()
    fs = FileSystem.mount(path)                           # the saved bitmaps agree
    assert fs.statfs().bfree == free
    fs.unmount()


def test_a_double_free_into_a_stash_is_caught(tmp_path):
    path = str(tmp_path / "df.img")
    format_device(path, 8 << 20, numa_nodes=1, cpus_per_node=1)
    fs = FileSystem.mount(path)
    try:
        blk = fs.alloc.alloc_one(0, meta=False)
        fs.alloc.free(blk, 1)                             # into the stash
        fs.alloc.drain_stashes()                          # the bitmap has it free again
        with pytest.raises(AssertionError, match="double free"):
            fs.alloc.free(blk, 1)
    finally:
        fs.unmount()


def test_a_ring_running_low_asks_the_refiller(tmp_path):
    """A worker's local log takes its pages from its CPU's ring; when fewer than
    RING_LOW are left it asks the designated refiller (the mount's supervisor
    sleeps until then), and the refill brings the ring back to full."""
    from pnova.commit import RING_LOW
    path = str(tmp_path / "ring.img")
    format_device(path, 64 << 20, numa_nodes=1, cpus_per_node=2)
    fs = FileSystem.mount(path)
    f = fs.create(1, b"f", 0o644).ino
    worker = f % 2                               # not the file's home CPU: a local log
    fs.prepare_workers()
    ring = fs.rings[worker]
    full = len(ring)
    assert full > RING_LOW
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            fs.become_worker(worker)
            fs.ring_low = lambda: os.write(w, b"%d\n" % len(fs.rings[worker]))
            i = 0
            while len(ring) >= RING_LOW - 1 and i < 200_000:
                fs.write(f, 4096 * (i % 4), b"%d" % i)
                i += 1
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r) as pipe:
        asked = [int(x) for x in pipe.read().split()]
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    # asked for the first time on the pop that left RING_LOW - 1, not before
    assert asked and asked[0] == RING_LOW - 1 and all(n < RING_LOW for n in asked)
    assert fs.refill_rings() > 0 and len(ring) == full
    fs.unmount()
    out = io.StringIO()
    assert Checker(path, force=True, out=out).run() == 0, out.getvalue()


def test_a_core_judges_compaction_of_a_shared_file_by_its_own_local_log(tmp_path):
    """Cores writing one file each decide on compaction from their own local log,
    which they know without reading the others' entries; the compaction is done
    by one process, and one that finds the file's size lock taken goes on writing
    instead of waiting or catching up (DESIGN 12)."""
    path = str(tmp_path / "gc.img")
    format_device(path, 64 << 20, numa_nodes=1, cpus_per_node=3)
    a = FileSystem.mount(path, lock="pnova")
    ino = a.create(1, b"f", 0o644).ino
    a.write(ino, 0, b"." * (64 * PAGE))
    b, c = FileSystem.attach(a, 1), FileSystem.attach(a, 2)

    def pages_of(fs, cpu):
        """Pages of a CPU's local log (not counting their twins)."""
        have = fs.cache[ino].local.get(cpu)
        return len(have[2]) // (2 if fs.log_twins else 1) if have else 0

    c.write(ino, 2 * PAGE, b"c" * PAGE)
    b.get(ino)
    k = 0
    while pages_of(b, 1) < 3:                           # b's local log: 3 pages, all but
        k += 1                                          # one entry superseded
        b.write(ino, 40 * PAGE, bytes([k % 250 + 1]) * PAGE)
    c.get(ino)                                          # c has seen b's long log
    assert pages_of(c, 1) == 3
    b.write(ino, 40 * PAGE, b"B" * PAGE)
    while pages_of(c, 2) < 2:                           # c's own log grows a page
        c.write(ino, 2 * PAGE, b"c" * PAGE)
    # Its own log is short: c neither compacted nor read b's newest entry
    # (judging by the whole file, as seen, would have done both).
    assert pages_of(c, 1) == 3
    assert c.cache[ino].pages[40] != b.cache[ino].pages[40]
    # With another process holding the file's size lock, c's long log is left
    # for later and its writes go on.
    b.scheme.size_lock(ino)
    try:
        while pages_of(c, 2) < 6:
            c.write(ino, 2 * PAGE, b"C" * PAGE)
        assert pages_of(c, 2) >= 6
    finally:
        b.scheme.size_unlock(ino)
    c.write(ino, 2 * PAGE, b"D" * PAGE)
    while pages_of(c, 2) >= 6:                          # the next page boundary compacts
        c.write(ino, 2 * PAGE, b"D" * PAGE)
    assert not a.get(ino).local                         # one chain, no local logs
    for fs in (a, b, c):
        assert fs.read(ino, 0, 4 * PAGE) == b"." * 2 * PAGE + b"D" * PAGE + b"." * PAGE
        assert fs.read(ino, 40 * PAGE, PAGE) == b"B" * PAGE
    a.unmount()
    _fsck_clean(path)
