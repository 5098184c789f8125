"""Shared-memory atomics, semaphores, lock schemes and rings under contention.

Workers are real processes (fork), as they are when several processes serve
one device; every wait is bounded.
"""
from __future__ import annotations

import os
import time

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from pnova import locks
from pnova.atomics import SharedWords
from pnova.locks import WANTED, WRITER, LockTimeout, Semaphores, make_scheme
from pnova.ring import Ring, refill
from pnova.shared import H_DEATHS, ISLOT, SharedArea

NINODES = 64


@pytest.fixture
def area():
    a = SharedArea.create(4, NINODES)
    a.register(0)
    yield a
    a.close()


def fork(fn) -> int:
    """Run ``fn()`` in a child process; the child exits 0 if it returns."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fn()
            code = 0
        finally:
            os._exit(code)
    return pid


def join(pid: int, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.01)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    raise AssertionError("child did not finish")


def wait_for(pred, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "condition never became true"
        time.sleep(0.001)


def test_atomic_counter_from_two_processes(area):
    n = 20000
    pids = [fork(lambda: [area.next_seq() for _ in range(n)]) for _ in range(2)]
    for p in pids:
        join(p)
    assert area.next_seq() == 1 + 2 * n


def test_a_reader_share_and_its_record_come_and_go_together(area):
    """The compiled helper takes a share and stores its record in one call,
    and drops the record before the share: what a reaper of dead readers
    counts on (a record never names a share that is gone)."""
    w = area.w
    word, rec = area.inode_locks + ISLOT * 6, area.held_slot(1, 0)
    assert w.rdlock(word, WRITER | WANTED, 0, rec)
    assert w.load32(word) == 1 and w.load64(rec) == word + 1
    w.store32(word, WRITER | 2)                         # a writer holds it
    assert not w.rdlock(word, WRITER, 0, area.held_slot(1, 1))
    assert w.load64(area.held_slot(1, 1)) == 0          # no share, no record
    w.store32(word, WANTED | 1)                         # one reader, a writer waiting
    assert not w.rdlock(word, WRITER | WANTED, 0, area.held_slot(1, 1))     # polite
    assert w.rdlock(word, WRITER, WANTED, area.held_slot(1, 1))            # past a lease
    assert w.load32(word) == 2                          # the bit is gone, two readers
    w.rdunlock(word, area.held_slot(1, 1))
    w.rdunlock(word, rec)
    assert w.load32(word) == 0 and w.load64(rec) == w.load64(area.held_slot(1, 1)) == 0
    with pytest.raises(ValueError):
        w.rdlock(word + 2, WRITER, 0, rec)              # misaligned word
    with pytest.raises(ValueError):
        w.rdlock(word, WRITER, 0, rec + 4)              # misaligned record
    with pytest.raises(ValueError):
        w.rdunlock(word, len(area.mm))                  # outside the mapping


def test_a_directory_share_and_a_name_lock_are_taken_in_one_call(area):
    """``rw_pair`` takes a reader's share of the first word (with its record)
    and then the second word as a writer, and says how far it got; nothing is
    taken when the share is not free, and the share stays when the name lock
    is not."""
    w = area.w
    d, n, rec = area.inode_locks + ISLOT * 2, area.name_locks + 40, area.held_slot(1, 0)
    mine = WRITER | 2
    assert w.rw_pair(d, n, rec, WRITER | WANTED, mine) == 2
    assert (w.load32(d), w.load64(rec), w.load32(n)) == (1, d + 1, mine)
    w.rdunlock(d, rec)
    w.store32(n, WRITER | 3)                            # another CPU holds the name
    assert w.rw_pair(d, n, rec, WRITER | WANTED, mine) == 1
    assert (w.load32(d), w.load64(rec), w.load32(n)) == (1, d + 1, WRITER | 3)
    w.rdunlock(d, rec)
    w.store32(n, WANTED)                                # a writer wants it: mine to take
    assert w.rw_pair(d, n, rec, WRITER | WANTED, mine) == 2 and w.load32(n) == mine
    w.rdunlock(d, rec)
    w.store32(n, 0)
    for held in (WRITER | 3, WANTED | 1):               # a writer holds or wants the directory
        w.store32(d, held)
        assert w.rw_pair(d, n, rec, WRITER | WANTED, mine) == 0
        assert (w.load32(d), w.load64(rec), w.load32(n)) == (held, 0, 0)
    assert w.rw_pair(d, n, rec, WRITER, mine) == 2       # one who holds a share ignores a want
    assert w.load32(d) == WANTED | 2
    with pytest.raises(ValueError):
        w.rw_pair(d, n + 2, rec, WRITER, mine)          # misaligned name word


def test_a_names_version_is_counted_before_its_lock_goes(area):
    w = area.w
    v, n = area.name_versions + 8 * 7, area.name_locks + 4 * 7
    w.store64(v, 41)
    w.store32(n, WRITER | 1)
    assert w.bump_unlock(v, n, 1) == 41
    assert (w.load64(v), w.load32(n)) == (42, 0)
    # a directory's epoch moves by 2 (an odd one is a change in flight)
    e, d = area.versions + 8 * 3, area.inode_locks + ISLOT * 3
    w.store64(e, 10)
    w.store32(d, WRITER | 1)
    assert w.bump_unlock(e, d, 2) == 10
    assert (w.load64(e), w.load32(d)) == (12, 0)
    with pytest.raises(TypeError):
        w.bump_unlock(v, n)


def test_a_cached_directorys_versions_are_matched_in_one_call(area):
    w = area.w
    words = [(H_DEATHS, 8, 5), (area.versions + 16, 8, 1 << 40),
             (area.rewrites + ISLOT * 3, 4, 6), (area.name_versions + 8 * 9, 8, 17)]
    for off, size, v in words:
        (w.store64 if size == 8 else w.store32)(off, v)
    args = [x for off, _, v in words for x in (off, v)]
    assert w.versions_match(*args)
    for i in range(4):                                  # any one word moved: not exact
        moved = list(args)
        moved[2 * i + 1] += 1
        assert not w.versions_match(*moved)
    moved = list(args)
    moved[5] += 1 << 32                                 # a rewrite count is 32 bits
    assert not w.versions_match(*moved)
    moved[5] = -1                                       # a value never recorded
    assert not w.versions_match(*moved)


def test_semaphores_take_the_pair_and_wait_for_a_held_name(area):
    """The two locks of an operation on one name: taken at once when free;
    when another process holds the name, the share is kept and the name
    waited for; the share is then let go as any read share is."""
    sem = Semaphores(area, 1)
    d, n = area.inode_locks + ISLOT * 4, area.name_locks + 64
    sem.rw_pair(d, n)
    assert area.w.load32(d) == 1 and area.w.load32(n) == sem.mine
    sem.wunlock(n)
    sem.runlock(d)
    assert area.w.load32(d) == 0 and not any(area.w.load64(r) for r in sem.records)
    area.w.store32(n, WRITER | 1)                       # CPU 0, a live process, holds it
    pid = fork(lambda: (time.sleep(0.2), area.w.store32(n, 0)))
    start = time.monotonic()
    sem.rw_pair(d, n)
    assert time.monotonic() - start >= 0.15 and area.w.load32(n) == sem.mine
    join(pid)
    sem.wunlock(n)
    sem.runlock(d)
    area.w.store32(d, WRITER | 1)                       # the directory held exclusively
    pid = fork(lambda: (time.sleep(0.2), area.w.store32(d, 0)))
    sem.rw_pair(d, n)
    assert area.w.load32(d) == 1 and area.w.load32(n) == sem.mine
    join(pid)
    sem.wunlock(n)
    sem.runlock(d)


def test_fresh_block_words_mark_and_take_within_one_interval(area):
    """The compiled fresh-word operations of a disk image's allocator: a mark
    for one sync interval drops the bits of an older one; a take succeeds only
    when every asked bit is marked for that interval, and clears just those."""
    w = area.w
    off = area.held_slot(1, 2)                            # any u64 word of the area
    g1, g2 = 1 << 32, 2 << 32
    w.store64(off, 0)
    w.fresh_mark(off, g1, 0b0101)
    assert w.load64(off) == g1 | 0b0101
    w.fresh_mark(off, g1, 0b1000)
    assert w.load64(off) == g1 | 0b1101
    assert not w.fresh_take(off, g2, 0b0001)              # another interval: no
    assert not w.fresh_take(off, g1, 0b0011)              # one of two not marked: no
    assert w.load64(off) == g1 | 0b1101                   # and nothing cleared
    assert w.fresh_take(off, g1, 0b0101)
    assert w.load64(off) == g1 | 0b1000
    w.fresh_mark(off, g2, 0b0010)                         # a newer interval starts afresh
    assert w.load64(off) == g2 | 0b0010
    assert not w.fresh_take(off, g1, 0b1000)
    with pytest.raises(ValueError):
        w.fresh_mark(off + 4, g1, 1)                      # misaligned


def test_stash_and_fresh_calls_of_a_disk_images_allocator():
    """The compiled stash and fresh-word calls: a pop marks a block of the
    region fresh only while no sync runs; a push gives back at once only a
    block still fresh in the running interval, says when the stash is full,
    and catches a block the bitmap has free; held_due looks at the oldest
    record of a ring only."""
    w = SharedWords(bytearray(4096))
    started, synced, running = 0, 8, 16
    count, slots, fresh, bitmap = 64, 72, 1024, 2048
    lo, hi = 1000, 1064
    w.store64(started, 5)
    w.store64(synced, 5)
    assert w.stash_pop(count, slots) == 0                 # empty
    for blk in (1003, 1040, 1010, 2000):
        assert w.stash_push(count, slots, 4, blk)
    assert not w.stash_push(count, slots, 4, 1)            # full at cap: nothing stored
    assert w.load64(count) == 4 and w.load64(slots + 32) == 0
    g = 5 << 32
    pop = (count, slots, lo, hi, fresh, started, synced, running)
    assert w.fresh_pop(*pop) == 2000                       # outside lo..hi: no mark,
    assert w.load64(fresh + 8 * ((2000 - lo) >> 5)) == 0   # where it would have gone
    assert w.fresh_pop(*pop) == 1010 and w.load64(fresh) == g | 1 << 10
    w.store64(synced, 4)                                   # a sync began: no mark
    assert w.fresh_pop(*pop) == 1040 and w.load64(fresh + 8) == 0
    w.store64(synced, 5)
    w.store64(running, 1)                                  # a sync runs: no mark
    assert w.fresh_pop(*pop) == 1003 and w.load64(fresh) == g | 1 << 10
    assert w.fresh_pop(*pop) == 0 and w.load64(count) == 0
    w.store64(running, 0)
    push = (lo, hi, fresh, started, bitmap, count, slots, 1)
    w.store64(bitmap, 1 << 40 | 1 << 10 | 1 << 3)          # blocks 1040, 1010, 1003 in use
    assert w.fresh_push(1003, *push) == 0                  # its bit clear in this interval
    assert w.load64(fresh) == g | 1 << 10 and w.load64(count) == 0
    w.fresh_note(fresh + 8, 1 << 8, started, synced, running)   # 1040, fresh in 5
    w.store64(started, 6)
    assert w.fresh_push(1040, *push) == 0                  # marked in an older interval
    assert w.load64(fresh + 8) == g | 1 << 8               # and left as it was
    w.store64(started, 5)
    assert w.fresh_push(1040, *push) == 1 and w.load64(fresh + 8) == g
    assert w.stash_pop(count, slots) == 1040
    w.fresh_note(fresh, 1 << 3, started, synced, running)  # 1003, fresh now
    w.fresh_note(fresh, 1 << 4, started, synced, running)  # 1004, fresh but free
    w.stash_push(count, slots, 1, 7)                       # the stash full
    assert w.fresh_push(1003, *push) == 2                  # taken, not pushed
    assert w.load64(fresh) == g | 1 << 10 | 1 << 4 and w.load64(count) == 1
    assert w.fresh_push(1004, *push) == 3                  # a double free
    assert w.load64(count) == 1 and w.load64(slots) == 7
    w.store64(running, 1)                                  # a sync runs: fresh_note marks nothing
    w.fresh_note(fresh, 1 << 5, started, synced, running)
    assert w.load64(fresh) == g | 1 << 10
    with pytest.raises(ValueError, match="not in the region"):
        w.fresh_push(999, *push)
    w.store64(count, 1 << 62)                              # a damaged count
    with pytest.raises(ValueError, match="outside the mapping"):
        w.stash_pop(count, slots)
    with pytest.raises(ValueError):
        w.stash_pop(count + 4, slots)                      # misaligned count
    # a ring of 4 records of 32 bytes: head, tail, records, the newest durable
    head, tail, recs, durable = 3072, 3080, 3200, 3088
    due = (head, tail, recs, 4, 32, synced, durable)
    w.store64(synced, 5)
    w.store64(durable, 10)
    assert not w.held_due(*due)                            # empty
    w.store64(recs + 32 * 2, 3)                            # record 2 (head 6 mod 4): tag 3
    w.store64(recs + 32 * 2 + 24, 11)                      # needs sync record 11
    w.store64(recs + 32 * 3, 1)                            # record 3, the newest: due
    w.store64(head, 6)
    w.store64(tail, 8)
    assert not w.held_due(*due)                            # the oldest is not yet durable
    w.store64(durable, 11)
    assert w.held_due(*due)
    w.store64(synced, 3)
    assert not w.held_due(*due)                            # tagged in an unfinished sync
    with pytest.raises(ValueError):
        w.held_due(head, tail, recs, 1 << 40, 32, synced, durable)   # no such ring here


def test_a_cpu_records_each_read_share_it_holds(area):
    sem = Semaphores(area, 2)
    word = area.inode_locks + ISLOT * 8
    sem.rlock(word)
    assert sem.try_rlock(word)                          # a second share of one word
    recs = [area.w.load64(area.held_slot(2, i)) for i in range(locks.HELD_MAX)]
    assert sorted(recs)[-2:] == [word + 1, word + 1] and area.w.load32(word) == 2
    sem.runlock(word)
    sem.runlock(word)
    assert area.w.load32(word) == 0
    assert not any(area.w.load64(area.held_slot(2, i)) for i in range(locks.HELD_MAX))
    assert len(sem.free_records) == locks.HELD_MAX


def test_write_lock_excludes_across_processes(area):
    """A read-modify-write of two plain words under the lock never loses an update."""
    word, a, b = area.inode_locks, area.rings - 64, area.rings - 56   # scratch words
    n = 3000

    def worker(cpu):
        area.register(cpu)
        sem = Semaphores(area, cpu)
        w = area.w
        for _ in range(n):
            sem.wlock(word)
            assert w.load32(word) == WRITER | (cpu + 1)      # the word names the writer
            v = w.load64(a)
            w.store64(a, v + 1)
            w.store64(b, w.load64(b) + 1)
            sem.wunlock(word)

    pids = [fork(lambda c=c: worker(c)) for c in (1, 2)]
    for p in pids:
        join(p)
    assert area.w.load64(a) == area.w.load64(b) == 2 * n


def test_readers_share_and_exclude_writers(area):
    word = area.inode_locks + ISLOT * 2
    sem = Semaphores(area, 0)
    sem.rlock(word)
    flag = area.rings - 64

    def reader():
        area.register(1)
        s = Semaphores(area, 1)
        s.rlock(word)                      # granted while cpu 0 reads too
        assert s.waits == 0
        area.w.store64(flag, 1)
        wait_for(lambda: area.w.load64(flag) == 2)
        s.runlock(word)

    pid = fork(reader)
    wait_for(lambda: area.w.load64(flag) == 1)
    assert area.w.load32(word) == 2                     # two readers counted
    t0 = time.monotonic()
    sem.runlock(word)

    def writer():
        area.register(2)
        s = Semaphores(area, 2)
        s.wlock(word)                                   # waits for the other reader
        area.w.store64(flag, 3)
        s.wunlock(word)

    wpid = fork(writer)
    time.sleep(0.05)
    assert area.w.load64(flag) == 1                     # still excluded by the reader
    area.w.store64(flag, 2)
    join(pid)
    join(wpid)
    assert area.w.load64(flag) == 3 and area.w.load32(word) == 0
    assert time.monotonic() - t0 < 10


def test_a_waiting_writer_holds_new_readers_back(area):
    """Readers that keep overlapping would never let the word fall to 0: a writer
    that waits sets WANTED, new readers wait for it, readers that already hold a
    share still get another (they would otherwise wait for a writer waiting for
    them), and the writer is granted once the holders leave."""
    word = area.inode_locks + ISLOT * 6
    flag = area.rings - 64
    holder = Semaphores(area, 0)
    holder.rlock(word)

    def writer():
        area.register(1)
        s = Semaphores(area, 1)
        s.wlock(word)
        area.w.store64(flag, 1)
        wait_for(lambda: area.w.load64(flag) == 2)
        s.wunlock(word)

    pid = fork(writer)
    wait_for(lambda: area.w.load32(word) & WANTED)
    newcomer = Semaphores(area, 2)
    assert not newcomer.try_rlock(word)                 # held back by the waiting writer
    holder.rlock(word)                                  # a second share of a holder: granted
    assert area.w.load32(word) == WANTED | 2
    holder.runlock(word)
    holder.runlock(word)
    wait_for(lambda: area.w.load64(flag) == 1)          # the writer had its turn
    assert area.w.load32(word) == WRITER | 2
    area.w.store64(flag, 2)
    join(pid)
    assert newcomer.try_rlock(word)
    newcomer.runlock(word)
    assert area.w.load32(word) == 0


def test_a_want_left_by_a_dead_writer_delays_readers_by_one_lease(area):
    word = area.inode_locks + ISLOT * 8
    area.w.store32(word, WANTED)                        # its writer died waiting
    sem = Semaphores(area, 0)
    t0 = time.monotonic()
    sem.rlock(word)
    assert locks.LEASE <= time.monotonic() - t0 < 5
    assert area.w.load32(word) == 1                     # and the stale bit is gone
    sem.runlock(word)
    sem.rlock(word)                                     # the next reader does not wait
    assert sem.waits == 1
    sem.runlock(word)
    assert area.w.load32(word) == 0


@pytest.mark.parametrize("mode", ["write", "read"])
def test_dead_holder_does_not_wedge_the_lock(area, mode):
    word = area.seg_locks + 40
    held = area.rings - 64

    def die_holding():
        area.register(3)
        s = Semaphores(area, 3)
        (s.wlock if mode == "write" else s.rlock)(word)
        area.w.store64(held, 1)
        os._exit(0)                                     # killed while holding it

    pid = fork(die_holding)
    wait_for(lambda: area.w.load64(held) == 1)
    os.waitpid(pid, 0)
    sem = Semaphores(area, 0)
    t0 = time.monotonic()
    sem.wlock(word)                                     # granted once the lease has passed
    assert locks.LEASE <= time.monotonic() - t0 < 5
    sem.wunlock(word)
    assert area.w.load32(word) == 0


def test_new_worker_takes_over_a_dead_cpu(area):
    word = area.inode_locks + ISLOT * 4

    def die_holding():
        area.register(2)
        Semaphores(area, 2).wlock(word)
        os._exit(0)

    os.waitpid(fork(die_holding), 0)
    assert area.w.load32(word) == WRITER | 3
    Semaphores(area, 2).take_over()                     # the replacement worker for cpu 2
    assert area.w.load32(word) == 0


def test_unowned_reader_share_times_out(area, monkeypatch):
    monkeypatch.setattr(locks, "TIMEOUT", 0.5)
    word = area.seg_locks + 80
    area.w.add32(word, 1)                               # a share with no record
    with pytest.raises(LockTimeout):
        Semaphores(area, 0).wlock(word)


@settings(max_examples=50, deadline=None)
@given(ino=st.integers(1, NINODES), first=st.integers(0, 10 ** 6), n=st.integers(0, 300),
       seg=st.sampled_from([1, 4, 16, 64]))
def test_segment_slots_are_sorted_and_unique(ino, first, n, seg):
    a = SharedArea.create(1, NINODES)
    try:
        sch = make_scheme("segment", a, 0, seg)
        slots = sch.slots(ino, first, first + n)
        assert slots == sorted(set(slots))
        assert 1 <= len(slots) <= (first + n) // seg - first // seg + 1
        tok = sch.lock(ino, first, first + n, True)     # never deadlocks on itself
        sch.unlock(tok)
        assert all(a.w.load32(o) == 0 for o in slots)
    finally:
        a.close()


@pytest.mark.parametrize("name", ["inode", "rangetree", "segment", "pnova"])
def test_schemes_conflict_exactly_where_they_should(area, name):
    """Disjoint ranges of one file: only the inode scheme makes them wait."""
    mine = make_scheme(name, area, 0, 4)
    other_gate = area.rings - 64
    tok = mine.lock(5, 0, 3, True)                      # pages 0-3 (segment 0)

    def other():
        area.register(1)
        s = make_scheme(name, area, 1, 4)
        t = s.lock(5, 100, 103, True)                   # a different segment
        area.w.store64(other_gate, 1 + s.sem.waits)
        s.unlock(t)
        t = s.lock(5, 2, 2, False)                      # overlaps: must wait for cpu 0
        area.w.store64(other_gate, 10)
        s.unlock(t)
        s.close()

    pid = fork(other)
    wait_for(lambda: area.w.load64(other_gate) != 0 or name == "inode", 10)
    if name == "inode":
        time.sleep(0.05)
        assert area.w.load64(other_gate) == 0           # the whole file is locked
    else:
        assert area.w.load64(other_gate) == 1           # granted without waiting
        time.sleep(0.05)
        assert area.w.load64(other_gate) == 1           # the overlapping read waits
    mine.unlock(tok)
    join(pid)
    assert area.w.load64(other_gate) == 10
    mine.close()


def test_unknown_scheme_is_refused(area):
    with pytest.raises(ValueError, match="unknown lock scheme"):
        make_scheme("spin", area, 0)


def test_ring_across_processes_keeps_order_and_loses_nothing(area):
    ring = Ring(area, 2)
    n = 20000
    out = area.rings - 64

    def consumer():
        area.register(2)
        r = Ring(area, 2)
        expect = 0
        while expect < n:
            v = r.pop()
            if v is None:
                os.sched_yield()
                continue
            assert v == expect * 7 + 1
            expect += 1
        area.w.store64(out, expect)

    pid = fork(consumer)
    i = 0
    while i < n:
        if ring.push(i * 7 + 1):
            i += 1
        else:
            os.sched_yield()
    join(pid)
    assert area.w.load64(out) == n and len(ring) == 0


def test_refill_tops_up_low_rings(area):
    rings = [Ring(area, c) for c in range(4)]
    counter = iter(range(1, 10 ** 6))
    rings[1].push(999)
    pushed = refill(rings, lambda k: [next(counter) for _ in range(k)], low=8)
    assert pushed == 4 * rings[0].n - 1
    assert rings[1].pop() == 999 and len(rings[0]) == rings[0].n
    assert refill(rings, lambda k: [next(counter) for _ in range(k)], low=8) == 0


def test_an_inodes_epoch_word_is_the_one_its_writers_check():
    """Namespace operations bump an inode's epoch through epoch_slot; file writers
    read it as the last of version_slots: both must name one word."""
    area = SharedArea.create(2, 64, [100, 100])
    try:
        for ino in (1, 2, 7, 12345, 999_999):
            assert area.epoch_slot(ino) == area.version_slots(ino, 0, 0)[-1]
            assert area.epoch_slot(ino) == area.version_slots(ino, 40, 90)[-1]
    finally:
        area.close()
