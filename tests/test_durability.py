"""Durability beyond the process on an image kept on a disk (DESIGN 24).

After a power loss the disk holds what the last sync wrote plus any subset of
the pages written back since, in any order.  What these tests check: fsync,
syncfs and the unmount push the image's changes to the disk (msync), a block
freed since the last sync is not reused before the next one has completed (the
synced state may still use it), and holding blocks back never makes a
filesystem that has room report ENOSPC.
"""
from __future__ import annotations

import errno
import io
import os
import time

import pytest

from pnova import layout as L
from pnova.engine import FileSystem
from pnova.mkfs import format_device
from pnova.shared import H_HELD_INOS, H_LIMBO, H_SEQ

from test_mount import needs_fuse

ROOT = L.ROOT_INO


def _disk_image(tmp_path, size: int = 16 << 20, cpus: int = 1) -> str:
    path = str(tmp_path / "d.img")
    format_device(path, size, numa_nodes=1, cpus_per_node=cpus)
    return path


def test_an_image_in_memory_is_told_from_one_on_a_disk(tmp_path):
    path = _disk_image(tmp_path)
    fs = FileSystem.mount(path)
    assert not fs.pm.volatile
    assert fs.pm.mode == "disk"                          # ext4 refuses MAP_SYNC: not DAX
    fs.unmount()
    if os.path.isdir("/dev/shm"):
        shm = f"/dev/shm/pnova-test-{os.getpid()}.img"
        try:
            format_device(shm, 1 << 20, numa_nodes=1, cpus_per_node=1)
            fs = FileSystem.mount(shm)
            assert fs.pm.volatile and fs.pm.mode == "memory"
            fs.sync()
            assert fs.pm.msyncs == 0                     # nothing beyond memory to write
            fs.unmount()
        finally:
            os.unlink(shm)


def test_a_file_overwritten_in_place_is_compacted_rarely_on_a_disk(tmp_path, shm_dir):
    # Each compaction on a disk-backed image pushes its new chain to the disk
    # (an msync that promises nothing, in a thread, before the words that
    # switch to it, DESIGN 24.5), a flush of the disk's cache: a file overwritten in place
    # must not pay one every few pages, as an image in memory may.  No sync of
    # the image is started for it.
    from pnova.gc import DISK_COMPACT_MIN_PAGES
    from pnova.shared import H_SYNC_STARTED
    path = _disk_image(tmp_path, 64 << 20)
    fs = FileSystem.mount(path)
    ino = fs.create(ROOT, b"f", 0o644).ino
    per_page = L.LOG_DATA // 64                          # 64-byte write entries
    before = fs.pm.msyncs
    syncs = fs.area.w.load64(H_SYNC_STARTED)
    for i in range(per_page * (DISK_COMPACT_MIN_PAGES - 2)):
        fs.write(ino, 0, b"%08d" % i)
    assert fs.pm.msyncs == before                        # no compaction, so no sync
    copies = 2 if fs.log_twins else 1                    # a page and its twin
    assert len(fs.get(ino).log_pages) // copies >= DISK_COMPACT_MIN_PAGES - 2
    for i in range(per_page * 4):
        fs.write(ino, 0, b"%08d" % i)
    fs.finish_compactions()                              # (the switch, once pushed)
    assert fs.pm.msyncs > before                         # compacted now, its chain pushed
    assert fs.area.w.load64(H_SYNC_STARTED) == syncs     # and no sync of the image
    assert len(fs.get(ino).log_pages) // copies <= 5     # the new chain and what followed
    assert fs.read(ino, 0, 8) == b"%08d" % (per_page * 4 - 1)
    fs.unmount()
    shm = str(shm_dir / "m.img")                         # in memory: after four pages
    format_device(shm, 16 << 20, numa_nodes=1, cpus_per_node=1)
    fs = FileSystem.mount(shm)
    ino = fs.create(ROOT, b"f", 0o644).ino
    for i in range(per_page * 8):
        fs.write(ino, 0, b"%08d" % i)
        assert len(fs.get(ino).log_pages) // copies <= 4
    fs.unmount()


def test_many_files_overwritten_in_place_never_fill_a_disk_image_with_logs(tmp_path):
    # Each of 40 small files may keep a long log on a disk-backed image, but not
    # at the price of the space: once a quarter of the blocks is all that is
    # free, logs are compacted from four pages again, and the writes go on.
    path = _disk_image(tmp_path, 4 << 20)
    fs = FileSystem.mount(path)
    inos = [fs.create(ROOT, b"f%d" % i, 0o644).ino for i in range(40)]
    total = fs.statfs().blocks
    last = {}
    for k in range(40 * L.LOG_DATA // 64 * 24):          # 24 pages of entries each
        fs.write(inos[k % 40], 0, b"%08d" % k)
        last[inos[k % 40]] = b"%08d" % k
    assert 4 * fs.statfs().bfree >= total - 4 * 40 * 2   # about a quarter stays free
    assert all(fs.read(ino, 0, 8) == v for ino, v in last.items())
    fs.unmount()


def test_writes_on_a_slow_disk_wait_for_compacted_chains_instead_of_failing(tmp_path,
                                                                            monkeypatch):
    # Each compacted chain on its way to the disk holds its file's old chain and
    # its new one until it is switched.  With every msync taking 0.3 s, 40 files
    # overwritten in place had all their chains pending and the writes failed
    # with ENOSPC at about 22,700 (the room was there to take back); short of
    # room, an operation now waits for them.
    path = _disk_image(tmp_path, 4 << 20)
    fs = FileSystem.mount(path)
    push = type(fs.pm).push

    def slow_push(pm) -> None:
        time.sleep(0.3)
        push(pm)
    monkeypatch.setattr(type(fs.pm), "push", slow_push)
    inos = [fs.create(ROOT, b"f%d" % i, 0o644).ino for i in range(40)]
    total = fs.statfs().blocks
    for k in range(26000):
        fs.write(inos[k % 40], 0, b"%08d" % k)
    assert 4 * fs.statfs().bfree >= total - 4 * 40 * 2
    assert all(fs.read(ino, 0, 8) == b"%08d" % (25960 + i) for i, ino in enumerate(inos))
    fs.unmount()
    from pnova.fsck import Checker
    out = io.StringIO()
    assert Checker(path, force=True, out=out).run() == 0, out.getvalue()


def test_fsync_pushes_the_image_to_the_disk(tmp_path):
    path = _disk_image(tmp_path)
    fs = FileSystem.mount(path)
    ino = fs.create(ROOT, b"f", 0o644).ino
    fs.write(ino, 0, b"x" * 5000)
    before = fs.pm.msyncs
    fs.fsync(ino)
    assert fs.pm.msyncs == before + 1
    fs.unmount()


def test_a_freed_block_waits_for_the_next_sync(tmp_path):
    path = _disk_image(tmp_path)
    fs = FileSystem.mount(path)
    fs.hold_frees_until_sync()
    ino = fs.create(ROOT, b"f", 0o644).ino
    fs.write(ino, 0, b"a" * 4096)
    old = fs.get(ino).pages[0]
    fs.sync()                                             # a synced state maps old
    fs.write(ino, 0, b"b" * 4096)                         # copy-on-write: old is freed
    assert fs.get(ino).pages[0] != old
    seen = set()
    for i in range(200):                                  # many allocations, none of it
        fs.write(ino, 4096 * (1 + i % 50), b"c" * 4096)
        seen.update(fs.get(ino).pages.values())
    assert old not in seen
    assert fs.area.w.load64(H_LIMBO) > 0
    free_before = fs.statfs().bfree
    fs.sync()                                             # the release is durable now
    assert fs.area.w.load64(H_LIMBO) == 0
    assert fs.statfs().bfree == free_before               # held blocks counted as free
    for i in range(300):
        fs.write(ino, 4096 * (100 + i), b"d" * 4096)
        seen.update(fs.get(ino).pages.values())
    assert old in seen                                    # reused after the sync
    fs.unmount()
    from pnova.fsck import Checker
    import io
    out = io.StringIO()
    assert Checker(path, force=True, out=out).run() == 0, out.getvalue()


def test_held_blocks_never_cause_enospc(tmp_path):
    """Overwriting a file again and again frees a block per write: with the frees
    held back, a small image would fill up unless a sync is made when space runs
    out."""
    path = _disk_image(tmp_path, 2 << 20)
    fs = FileSystem.mount(path)
    fs.hold_frees_until_sync()
    ino = fs.create(ROOT, b"f", 0o644).ino
    pages = fs.statfs().bavail * 6 // 10
    for pg in range(pages):
        fs.write(ino, 4096 * pg, os.urandom(4096))
    fs.sync()                                             # every block of f now synced
    synced = fs.pm.msyncs
    for pg in range(pages):                               # each overwrite holds one back
        fs.write(ino, 4096 * pg, os.urandom(4096))
    assert fs.pm.msyncs > synced                          # room was made by a sync
    fs.unmount()


def test_the_commit_interval_option(tmp_path):
    """-o commit=SECONDS bounds how old the unsynced work of a disk-backed image
    can get; 0 leaves syncing to fsync, syncfs and unmount; nonsense is refused."""
    from pnova.mount import UsageError, parse_args
    args = [str(tmp_path / "i"), str(tmp_path), "-o"]
    assert parse_args(args + ["rw"]).commit == 5.0
    assert parse_args(args + ["commit=0.5"]).commit == 0.5
    assert parse_args(args + ["commit=0"]).commit == 0.0
    for bad in ("commit=-1", "commit=soon", "commit=1e9"):
        with pytest.raises(UsageError, match="commit="):
            parse_args(args + [bad])


def test_a_block_no_sync_ever_saw_is_reused_at_once(tmp_path):
    """Allocated and freed between two syncs, a block was never part of a synced
    state: it goes straight back (the stash hands it out again), so overwriting a
    file costs no more held blocks than before; one that a sync wrote out waits."""
    path = _disk_image(tmp_path)
    fs = FileSystem.mount(path)
    fs.hold_frees_until_sync()
    ino = fs.create(ROOT, b"f", 0o644).ino
    fs.sync()
    fs.write(ino, 0, b"a" * 4096)
    first = fs.get(ino).pages[0]
    fs.write(ino, 0, b"b" * 4096)                         # frees first: never synced
    fs.write(ino, 4096, b"c" * 4096)
    assert fs.get(ino).pages[1] == first                  # reused at once
    assert fs.alloc.limbo_blocks == 0
    fs.sync()
    synced = fs.get(ino).pages[1]
    fs.write(ino, 4096, b"d" * 4096)                      # frees a block the sync wrote
    fs.write(ino, 8192, b"e" * 4096)
    assert fs.get(ino).pages[2] != synced and fs.alloc.limbo_blocks == 1
    fs.unmount()


def test_blocks_of_a_write_that_keeps_other_pages_wait_for_the_sync_record(tmp_path):
    """A block of a three-page write that a later write replaces, while the first
    write still maps its other pages, is held even though no sync saw it (after
    a power loss recovery checks that write's data, all of it, unless the sync
    record covers it), and given back only after the second sync: the first
    makes the write durable, the second writes back a record that covers it.
    Replacing the whole write holds nothing back."""
    path = _disk_image(tmp_path)
    fs = FileSystem.mount(path)
    fs.hold_frees_until_sync()
    assert fs.sync_record and L.decode_sync_record(fs.pm.read_u64(L.SYNC_RECORD)) == \
        fs.area.w.load64(H_SEQ) - 1                      # the mount covers what it found
    ino = fs.create(ROOT, b"f", 0o644).ino
    fs.sync()
    fs.write(ino, 0, b"a" * 3 * 4096)
    blocks = [fs.get(ino).pages[p] for p in range(3)]
    assert blocks == list(range(blocks[0], blocks[0] + 3))   # one entry, three pages
    fs.write(ino, 0, b"b" * 4096)                          # page 0 only: the entry stays
    assert fs.alloc.limbo_blocks == 1
    fs.sync()
    assert fs.alloc.limbo_blocks == 1                      # the record does not cover it yet
    fs.sync()
    assert fs.alloc.limbo_blocks == 0
    assert L.decode_sync_record(fs.pm.read_u64(L.SYNC_RECORD)) >= fs.area.w.load64(H_SEQ) - 3
    fs.write(ino, 4 * 4096, b"c" * 2 * 4096)               # a new two-page entry...
    fs.write(ino, 4 * 4096, b"d" * 2 * 4096)               # ...replaced whole: fresh again
    assert fs.alloc.limbo_blocks == 0
    fs.setattr(ino, size=5 * 4096)                          # a truncate that splits an entry
    assert fs.alloc.limbo_blocks == 1
    fs.unmount()
    fs = FileSystem.mount(path)
    assert fs.pm.read_u64(L.SYNC_RECORD) == 0        # kept only while frees are held
    fs.hold_frees_until_sync()
    assert L.decode_sync_record(fs.pm.read_u64(L.SYNC_RECORD)) == fs.area.w.load64(H_SEQ) - 1
    assert fs.read(ino, 0, 5 * 4096) == b"b" * 4096 + b"a" * 2 * 4096 + bytes(4096) + b"d" * 4096
    fs.unmount()


def _two_cpus_holding(tmp_path) -> tuple[FileSystem, FileSystem, int]:
    """:func:`_holding_file` on a two-CPU image, with CPU 1 attached and holding
    freed blocks back too: (CPU 0's engine, CPU 1's, the file's inode)."""
    _, fs0, ino = _holding_file(tmp_path, b"f", cpus=2)
    fs1 = FileSystem.attach(fs0, 1)
    fs1.hold_frees_until_sync()
    return fs0, fs1, ino


def test_a_block_another_process_allocated_since_the_last_sync_goes_straight_back(tmp_path):
    """The serving processes of a mount take any client's requests, so the one
    that overwrites a page is often not the one that wrote it.  A block that
    CPU 0 allocated and CPU 1 replaced with no sync in between was never part
    of a synced state: it is free again at once (the fresh words of the shared
    area say so to every process).  One that a sync saw waits for the next."""
    fs0, fs1, ino = _two_cpus_holding(tmp_path)
    for i in range(20):                          # CPU 0 writes, CPU 1 replaces
        fs0.write(ino, 0, b"a" * 4096)
        fs1.write(ino, 0, b"b" * 4096)
    assert fs1.alloc.limbo_blocks == 0 and fs0.alloc.limbo_blocks == 0
    assert fs0.area.w.load64(H_LIMBO) == 0
    fs0.write(ino, 0, b"c" * 4096)
    fs1.sync()                                   # the synced state maps CPU 0's block
    fs1.write(ino, 0, b"d" * 4096)
    assert fs1.alloc.limbo_blocks == 1
    assert fs0.read(ino, 0, 4096) == b"d" * 4096
    fs0.unmount()


def test_a_worker_overwriting_uses_the_stash_of_the_cpu_it_acts_as(tmp_path):
    """A forked worker that becomes CPU 1 of a disk image (as a mount's serving
    processes and fxmark's workers do) takes its blocks from CPU 1's stash and
    region, and gives a replaced block that no sync saw straight back to that
    stash: nothing is held, and CPU 0's stash, the primary's before the fork,
    is not touched."""
    path, fs, ino = _holding_file(tmp_path, b"f", cpus=2)
    fs.prepare_workers(workers=2)
    stash0 = fs.alloc.stashes[0]
    before = [stash0.w.load64(stash0.slots + 8 * i) for i in range(len(stash0))]
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fs.become_worker(cpu=1)
            region1 = fs.alloc.order(1)[0]
            for i in range(50):
                fs.write(ino, 0, bytes([i]) * 4096)
                assert region1.contains(fs.get(ino).pages[0])
                assert fs.alloc.limbo_blocks == 0
            assert fs.read(ino, 0, 4096) == bytes([49]) * 4096
            assert len(fs.alloc.stashes[1]) > 0
            code = 0
        finally:
            os._exit(code)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    assert [stash0.w.load64(stash0.slots + 8 * i) for i in range(len(stash0))] == before
    assert fs.area.w.load64(H_LIMBO) == 0
    fs.unmount()
    fs = FileSystem.mount(path)
    assert fs.read(ino, 0, 4096) == bytes([49]) * 4096
    fs.unmount()


def test_a_block_allocated_while_an_earlier_sync_still_runs_is_not_fresh(tmp_path):
    """Two syncs overlap and the later one finishes first: the interval numbers
    then say "no sync running" while the earlier sync, which may cover what is
    written now, has not read the sequence counter yet.  A block allocated
    meanwhile is not fresh: replaced before the next sync, it is held."""
    fs0, fs1, ino = _two_cpus_holding(tmp_path)
    early = fs0.sync_start()                     # begun, not done
    fs1.sync()                                   # begun later, done first
    fs0.write(ino, 0, b"x" * 4096)
    fs1.write(ino, 0, b"y" * 4096)
    assert fs1.alloc.limbo_blocks == 1
    fs0.pm.sync()
    fs0.sync_done(early)
    fs0.write(ino, 0, b"z" * 4096)               # no sync running now: fresh again
    fs1.write(ino, 0, b"w" * 4096)
    assert fs1.alloc.limbo_blocks == 1
    fs0.unmount()


def test_a_sync_that_fails_does_not_count_as_running_afterwards(tmp_path, monkeypatch):
    """An fsync whose msync fails reports the error and takes itself off the
    count of running syncs: the syncs after it give freed blocks back as
    before, and blocks allocated and freed between two of them go straight
    back."""
    path = _disk_image(tmp_path)
    fs = FileSystem.mount(path)
    fs.hold_frees_until_sync()
    ino = fs.create(ROOT, b"f", 0o644).ino
    real = fs.pm.sync

    def failing() -> None:
        raise OSError(errno.EIO, "injected")

    monkeypatch.setattr(fs.pm, "sync", failing)
    with pytest.raises(OSError):
        fs.fsync(ino)
    monkeypatch.setattr(fs.pm, "sync", real)
    fs.sync()
    fs.write(ino, 0, b"a" * 4096)
    fs.write(ino, 0, b"b" * 4096)
    assert fs.alloc.limbo_blocks == 0
    assert fs.read(ino, 0, 4096) == b"b" * 4096
    fs.unmount()


def test_a_compaction_on_a_disk_holds_the_old_chain_until_the_next_sync(tmp_path,
                                                                      monkeypatch):
    """A compaction makes its new chain durable with a sync before the words that
    switch to it; until another sync the disk's slot may still name the old
    chain, whose pages that sync has just written.  So they are held, even those
    allocated since the previous sync, and reused only after the next one."""
    import pnova.gc
    monkeypatch.setattr(pnova.gc, "DISK_COMPACT_MIN_PAGES", 4)
    path = _disk_image(tmp_path, 64 << 20)
    fs = FileSystem.mount(path)
    fs.hold_frees_until_sync()
    ino = fs.create(ROOT, b"f", 0o644).ino
    fs.sync()
    rewrites = fs._rewrites(ino)
    old: list[int] = []
    i = 0
    while fs._rewrites(ino) == rewrites:
        old = list(fs.get(ino).log_pages)
        fs.write(ino, 0, b"%08d" % i)
        i += 1
    assert len(old) >= 4 and not set(old) & set(fs.get(ino).log_pages)
    assert fs.alloc.limbo_blocks >= len(old)     # all held, none back in a stash
    fs.sync()
    assert fs.alloc.limbo_blocks == 0
    assert fs.read(ino, 0, 8) == b"%08d" % (i - 1)
    fs.unmount()


def _holding_file(tmp_path, name: bytes, cpus: int = 1) -> tuple[str, FileSystem, int]:
    """A disk image whose engine holds freed blocks back, with an empty file
    ``name`` synced: (path, the mounted engine, its inode number)."""
    path = _disk_image(tmp_path, cpus=cpus)
    fs = FileSystem.mount(path)
    fs.hold_frees_until_sync()
    ino = fs.create(ROOT, name, 0o644).ino
    fs.sync()
    return path, fs, ino


@pytest.mark.parametrize("hold", [True, False])
def test_a_crash_of_the_process_alone_cuts_no_acknowledged_write(tmp_path, monkeypatch, hold):
    """The daemon killed (the page cache keeps every page): recovery still
    checks the data of writes the sync record does not cover, and a write
    partly replaced since must pass, so its replaced block must not have been
    reused meanwhile.  Given back at once, as a block no sync saw, the block
    goes to the next file and recovery cuts an acknowledged write."""
    from pnova.inode import Inode
    if not hold:
        monkeypatch.setattr(Inode, "holds", lambda self, block: False)
    path, fs, ino = _holding_file(tmp_path, b"f")
    fs.write(ino, 0, b"a" * 3 * 4096)
    fs.write(ino, 0, b"b" * 4096)
    other = fs.create(ROOT, b"g", 0o644).ino
    fs.write(other, 0, b"c" * 4096)
    fs.abandon()                                         # as kill -9 leaves it
    fs = FileSystem.mount(path, power_loss=True)
    got = fs.read(ino, 0, 3 * 4096)
    fs.unmount()
    if hold:
        assert got == b"b" * 4096 + b"a" * 2 * 4096
    else:
        assert got != b"b" * 4096 + b"a" * 2 * 4096


def _take_blocks(fs: FileSystem, name: bytes, want: list[int], limit: int = 400) -> bool:
    """Write pages of a new file ``name`` until it holds every block of ``want``."""
    ino = fs.create(ROOT, name, 0o644).ino
    for pg in range(limit):
        if set(want) <= set(fs.get(ino).pages.values()):
            return True
        fs.write(ino, pg * 4096, b"z" * 4096)
    return False


def test_a_write_a_truncate_unmapped_whole_is_not_checked_by_recovery(tmp_path):
    """A three-page write, truncated away: its blocks go back whole (no sync saw
    them) and another file takes them.  After a crash of the process alone,
    recovery must not check that write's data (no page maps it once the
    truncate is replayed): checked, it would cut the truncate and the
    acknowledged write and chmod after it."""
    path, fs, ino = _holding_file(tmp_path, b"bar")
    fs.write(ino, 0, b"u" * 3 * 4096)
    gone = sorted(fs.get(ino).pages.values())
    fs.setattr(ino, size=0)
    fs.write(ino, 0, b"A" * 4096)
    fs.setattr(ino, mode=0o640)
    assert _take_blocks(fs, b"z", gone)
    fs.abandon()                                         # as kill -9 leaves it
    fs = FileSystem.mount(path, power_loss=True)
    assert fs.read(ino, 0, 8192) == b"A" * 4096
    assert fs.getattr(ino).mode & 0o7777 == 0o640
    fs.unmount()


def test_another_process_frees_a_partly_replaced_write_as_held(tmp_path):
    """The cache of a process that read a file back from its logs (here because
    its cached copy was dropped after another CPU wrote the file through its
    own local log) knows its writes of several pages too: replacing one page of
    such a write frees the block as held, not as one no sync saw, so nothing
    reuses it and recovery after a crash of the process finds the write whole."""
    path = str(tmp_path / "d.img")
    format_device(path, 16 << 20, numa_nodes=1, cpus_per_node=2)
    fs0 = FileSystem.mount(path)
    fs0.hold_frees_until_sync()
    fs1 = FileSystem.attach(fs0, 1)
    fs1.hold_frees_until_sync()
    ino = fs0.create(ROOT, b"bar", 0o644).ino
    fs0.sync()
    fs0.write(ino, 0, b"u" * 3 * 4096)                    # one entry, three pages
    first = fs0.get(ino).pages[0]
    before = fs0.cache[ino]
    fs1.write(ino, 5 * 4096, b"1" * 4096)                 # another CPU: a log array
    del fs0.cache[ino]
    fs0.write(ino, 0, b"A" * 4096)                        # replaces the entry's page 0
    assert fs0.cache[ino] is not before                   # read back from the logs
    assert fs0.alloc.limbo_blocks == 1                    # held, not given back
    fs0.setattr(ino, mode=0o640)
    assert not _take_blocks(fs0, b"z", [first], limit=64)
    fs0.abandon()
    fs = FileSystem.mount(path, power_loss=True)
    got = fs.read(ino, 0, 6 * 4096)
    assert got == b"A" * 4096 + b"u" * 2 * 4096 + bytes(2 * 4096) + b"1" * 4096
    assert fs.getattr(ino).mode & 0o7777 == 0o640
    fs.unmount()


def test_inode_slots_held_behind_blocks_that_wait_for_the_record_are_found(tmp_path):
    """A full inode table, a block that waits for the sync record (a partly
    replaced write), then unlinks: their slots wait behind that block in the
    CPU's held list, and a create must still find one (two syncs), as statfs
    promised."""
    from pnova.errors import FsError
    path = str(tmp_path / "i.img")
    format_device(path, 16 << 20, numa_nodes=1, cpus_per_node=1, inodes_per_cpu=16)
    fs = FileSystem.mount(path)
    fs.hold_frees_until_sync()
    big = fs.create(ROOT, b"big", 0o644).ino
    names = []
    with pytest.raises(FsError):
        for i in range(100):
            fs.create(ROOT, b"n%d" % i, 0o644)
            names.append(b"n%d" % i)
    fs.sync()
    fs.write(big, 0, b"a" * 3 * 4096)
    fs.write(big, 0, b"b" * 4096)                          # held until the record covers it
    for n in names[:5]:
        fs.unlink(ROOT, n)
    assert fs.statfs().ffree == 5
    fs.create(ROOT, b"new", 0o644)
    fs.unmount()


def test_the_sync_record_word_and_what_fsck_says_of_it(tmp_path):
    """The record keeps 48 bits of sequence number checked by 16; a word that
    fails the check means "no record"; fsck.pnova reports and clears it."""
    from pnova.fsck import Checker
    assert L.decode_sync_record(L.encode_sync_record(12345)) == 12345
    assert L.decode_sync_record(0) is None
    assert L.decode_sync_record(L.encode_sync_record(12345) ^ 1 << 20) is None
    assert L.encode_sync_record(1 << 48) == 0
    path = _disk_image(tmp_path)
    fs = FileSystem.mount(path)
    fs.unmount()
    with open(path, "r+b") as f:
        f.seek(L.SYNC_RECORD)
        f.write((L.encode_sync_record(7) ^ 1 << 30).to_bytes(8, "little"))
    out = io.StringIO()
    assert Checker(path, force=True, out=out).run() == 4
    assert "sync record" in out.getvalue() and "fails its check" in out.getvalue()
    assert Checker(path, policy="yes", force=True, out=io.StringIO()).run() == 1
    with open(path, "rb") as f:
        f.seek(L.SYNC_RECORD)
        assert f.read(8) == bytes(8)
    out = io.StringIO()
    assert Checker(path, force=True, out=out).run() == 0, out.getvalue()


def test_the_sync_record_has_a_copy_and_a_damaged_one_never_covers_more(tmp_path):
    """The record is kept twice, at byte 256 of the first and of the last block
    (beside the superblock and its replica); recovery takes the smaller number,
    and nothing when either copy fails its check, so one damaged copy can make
    recovery check more writes, never fewer.  fsck.pnova reports a damaged copy
    and clears both."""
    from pnova.fsck import Checker
    path = _disk_image(tmp_path)
    first, second = L.sync_record_addrs(os.path.getsize(path) // L.BLOCK)
    assert second == os.path.getsize(path) - L.BLOCK + 256
    fs = FileSystem.mount(path)
    fs.hold_frees_until_sync()
    ino = fs.create(ROOT, b"f", 0o644).ino
    fs.write(ino, 0, b"x" * 3 * 4096)
    fs.sync()
    fs.sync()
    words = [fs.pm.read_u64(first), fs.pm.read_u64(second)]
    assert words[0] == words[1] and L.decode_sync_record(words[0]) >= fs.area.w.load64(H_SEQ) - 3
    covered = fs._sync_covered()
    assert covered == L.decode_sync_record(words[0])
    # one copy claims more than was synced: the other one counts
    fs.pm.store_u64(second, L.encode_sync_record(covered + 1000))
    assert fs._sync_covered() == covered
    fs.pm.store_u64(first, L.encode_sync_record(covered + 2000))
    assert fs._sync_covered() == covered + 1000
    # a copy that fails its check: no record at all
    fs.pm.store_u64(first, L.encode_sync_record(covered) ^ 1 << 40)
    assert fs._sync_covered() is None
    fs.pm.store_u64(first, words[0])
    fs.pm.store_u64(second, words[1])
    fs.unmount()
    with open(path, "r+b") as f:
        f.seek(second)
        f.write((L.encode_sync_record(7) ^ 1 << 30).to_bytes(8, "little"))
    out = io.StringIO()
    assert Checker(path, force=True, out=out).run() == 4
    assert f"block {second // L.BLOCK}, byte 256" in out.getvalue()
    assert Checker(path, policy="yes", force=True, out=io.StringIO()).run() == 1
    assert _record_on(path) is None
    out = io.StringIO()
    assert Checker(path, force=True, out=out).run() == 0, out.getvalue()


def test_the_cache_line_helper_writes_back_what_it_is_asked_to():
    """clwb (or clflushopt, clflush) per 64-byte line of the range, sfence for the
    fence: the primitives of a MAP_SYNC mapping.  They change no byte."""
    import mmap
    from pnova import _persist
    assert _persist.INSTRUCTION in ("clwb", "clflushopt", "clflush")
    m = mmap.mmap(-1, 1 << 16)
    m[:8] = b"pnova-pm"
    assert _persist.flush(m, 0, 64) == 1
    assert _persist.flush(m, 10, 64) == 2                 # crosses a line boundary
    assert _persist.flush(m, 0, 4096) == 64
    assert _persist.flush(m, 0, 0) == 0
    _persist.fence()
    assert m[:8] == b"pnova-pm"
    with pytest.raises(ValueError):
        _persist.flush(m, 1 << 16, 1)


def test_a_map_sync_image_persists_at_each_fence(tmp_path, caplog):
    """What the pmem layer does once MAP_SYNC was granted (a DAX filesystem; this
    machine has none, so the switch is made on an ordinary mapping, where the
    same instructions run harmlessly): flushes and fences are the processor's,
    a sync adds no msync, and freed blocks are reusable at once."""
    path = _disk_image(tmp_path)
    fs = FileSystem.mount(path)
    pm = fs.pm
    pm._use_cpu_persistence()
    msyncs = pm.msyncs                                  # the mount's own (the clean flag)
    assert pm.mode == "pmem" and "MAP_SYNC" in pm.describe()
    ino = fs.create(ROOT, b"f", 0o644).ino
    flushes, fences = pm.flushes, pm.fences
    fs.write(ino, 0, b"p" * 4096)
    assert pm.flushes >= flushes + 64 and pm.fences > fences  # every line of the page
    fs.fsync(ino)
    fs.hold_frees_until_sync()
    assert fs.alloc.limbo is None                        # the fence made the free safe
    assert pm.msyncs == msyncs
    assert fs.read(ino, 0, 4096) == b"p" * 4096
    fs.unmount()


def test_an_allocation_undone_for_lack_of_room_holds_nothing_back(tmp_path):
    """Blocks taken for a request that then does not fit were never used: they go
    straight back, not into the held list (which would need a sync to empty)."""
    from pnova.errors import FsError
    path = _disk_image(tmp_path, 2 << 20)
    fs = FileSystem.mount(path)
    fs.hold_frees_until_sync()
    fs.alloc.sync_now = None                              # see the bare allocator
    (ra,) = fs.alloc.regions
    taken = ra.alloc

    def half(n):                                          # as if another process took
        return taken(n // 2)                              # the rest meanwhile
    ra.alloc = half
    free = fs.alloc.nfree
    with pytest.raises(FsError):
        fs.alloc.alloc(0, 100)
    ra.alloc = taken
    assert fs.alloc.limbo_blocks == 0 and fs.alloc.nfree == free
    fs.unmount()


@needs_fuse
@pytest.mark.mount
@pytest.mark.timeout(180)
def test_a_file_overwritten_through_a_mount_on_a_disk_is_compacted_from_long_logs(tmp_path,
                                                                                  capsys):
    """Through the mount, on a disk-backed image, a file overwritten in place
    keeps long logs (each compaction flushes the disk's cache, so one comes
    only past DISK_COMPACT_MIN_PAGES pages, DESIGN 12) and is compacted once they are
    that long, whichever serving process writes: after far more writes than
    that many pages hold, its logs are short again, the last write reads back
    after a remount, and fsck finds the image clean."""
    from helpers import fsck
    from pnova.gc import DISK_COMPACT_MIN_PAGES
    from test_mount import Mount
    path = str(tmp_path / "m.img")                       # tmp_path: a disk, not tmpfs
    format_device(path, 64 << 20, numa_nodes=1, cpus_per_node=2)
    writes = 3 * DISK_COMPACT_MIN_PAGES * (L.LOG_DATA // 64)     # 64-byte write entries
    m = Mount(path, tmp_path / "mnt")
    try:
        m.start()
        fd = os.open(m.mnt / "f", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            for i in range(writes):
                os.pwrite(fd, b"%08d" % i, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        m.stop()
        fs = FileSystem.mount(path, readonly=True)
        try:
            ino = fs.lookup(1, b"f").ino
            assert fs._log_pages(fs.get(ino)) < 2 * DISK_COMPACT_MIN_PAGES   # compacted
            assert fs.read(ino, 0, 8) == b"%08d" % (writes - 1)
        finally:
            fs.unmount()
    finally:
        m.cleanup()
    rc, out = fsck(capsys, path, "-n", "-f")
    assert rc == 0, out


@needs_fuse
@pytest.mark.mount
@pytest.mark.timeout(120)
def test_held_frees_through_a_mount_on_a_disk(tmp_path, capsys):
    """The daemon holds freed blocks back on a disk-backed image, syncs every
    commit interval and at fsync, and gives every held block back when it
    stops: overwrites, fsync, a quiet spell and the unmount leave a file
    exactly as written and an image fsck finds clean (no block leaked)."""
    import time
    from helpers import fsck
    from test_mount import Mount
    path = str(tmp_path / "m.img")                       # tmp_path: a disk, not tmpfs
    format_device(path, 16 << 20, numa_nodes=1, cpus_per_node=2)
    m = Mount(path, tmp_path / "mnt")
    try:
        m.start("-o", "commit=0.2")
        f = m.mnt / "f"
        want = bytearray(os.urandom(64 * 1024))
        f.write_bytes(want)
        fd = os.open(f, os.O_RDWR)
        try:
            for i in range(600):                          # each overwrite frees a block
                piece = os.urandom(4096)
                os.pwrite(fd, piece, 4096 * (i % 16))
                want[4096 * (i % 16):4096 * (i % 16 + 1)] = piece
                if i % 100 == 0:
                    os.fsync(fd)
        finally:
            os.close(fd)
        time.sleep(0.5)                                   # a commit interval or two
        assert f.read_bytes() == bytes(want)
        m.stop()
    finally:
        m.cleanup()
    rc, out = fsck(capsys, path, "-n", "-f")
    assert rc == 0, out


@needs_fuse
@pytest.mark.mount
@pytest.mark.timeout(120)
def test_two_clients_overwriting_through_a_mount_on_a_disk(tmp_path, capsys):
    """Two clients overwrite their own files at once through a mount with two
    serving processes on a disk image, so each process frees blocks the other
    allocated (the fresh words of DESIGN 24 let those go straight back when no
    sync came between): both files read back exactly, after the unmount too,
    and fsck finds the image clean (no block leaked or used twice)."""
    from helpers import fsck
    from test_mount import Mount
    path = str(tmp_path / "m.img")                       # tmp_path: a disk, not tmpfs
    format_device(path, 16 << 20, numa_nodes=1, cpus_per_node=2)
    m = Mount(path, tmp_path / "mnt")
    want = {}
    try:
        m.start("-o", "workers=2,commit=0.2")
        for k in range(2):
            want[k] = bytearray(os.urandom(16 * 4096))
            (m.mnt / f"f{k}").write_bytes(want[k])
        kids = []
        for k in range(2):
            pid = os.fork()
            if pid == 0:                                 # a client: its own file
                code = 1
                try:
                    fd = os.open(m.mnt / f"f{k}", os.O_RDWR)
                    for i in range(800):
                        os.pwrite(fd, bytes([i % 251]) * 4096, 4096 * (i % 16))
                        if i % 200 == 199:
                            os.fsync(fd)
                    os.close(fd)
                    code = 0
                finally:
                    os._exit(code)
            kids.append(pid)
        for pid in kids:
            assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        for k in range(2):
            for i in range(800 - 16, 800):
                want[k][4096 * (i % 16):4096 * (i % 16 + 1)] = bytes([i % 251]) * 4096
            assert (m.mnt / f"f{k}").read_bytes() == bytes(want[k])
        m.stop()
        rc, out = fsck(capsys, path, "-n", "-f")
        assert rc == 0, out
        m.start()
        for k in range(2):
            assert (m.mnt / f"f{k}").read_bytes() == bytes(want[k])
        m.stop()
    finally:
        m.cleanup()


def _record_on(path: str) -> int | None:
    """The sync record of an image, as a reader of the file sees it (both copies)."""
    words = []
    with open(path, "rb") as f:
        for a in L.sync_record_addrs(os.path.getsize(path) // L.BLOCK):
            f.seek(a)
            words.append(int.from_bytes(f.read(8), "little"))
    return L.sync_record_of(*words)


@needs_fuse
@pytest.mark.mount
@pytest.mark.timeout(120)
def test_the_sync_record_through_a_mount_and_a_kill(tmp_path, capsys):
    """Through the pnova command on a disk image: the daemon keeps the sync
    record (a sync moves it past what the sync before made durable); writes of
    several pages made since, then partly replaced, keep the replaced blocks
    out of reuse, so a kill -9 of every serving process right after loses
    nothing that was acknowledged: the next mount recovers the file exactly
    (its recovery checks those writes' data), and fsck is clean."""
    import signal
    from helpers import fsck
    from test_mount import Mount, serving_processes
    path = str(tmp_path / "r.img")                       # tmp_path: a disk, not tmpfs
    format_device(path, 16 << 20, numa_nodes=1, cpus_per_node=2)
    m = Mount(path, tmp_path / "mnt")
    try:
        m.start("-o", "commit=0")                        # syncs only when asked
        first = _record_on(path)
        assert first is not None                         # set when the daemon started
        f = m.mnt / "f"
        want = bytearray(os.urandom(512 * 1024))
        fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.pwrite(fd, want[:256 * 1024], 0)          # writes of several pages
            os.fsync(fd)
            os.fsync(fd)                                 # the second writes the record back
            assert (_record_on(path) or 0) > first
            os.pwrite(fd, want[256 * 1024:], 256 * 1024)     # more, after the record
            for i in range(40):                          # pages of them replaced
                at = 4096 * (64 + 3 * i % 64)
                piece = os.urandom(4096)
                os.pwrite(fd, piece, at)
                want[at:at + 4096] = piece
        finally:
            os.close(fd)
        for pid in serving_processes(path).values():
            os.kill(pid, signal.SIGKILL)
        m.cleanup()
        m.start()
        assert f.read_bytes() == bytes(want)
        m.stop()
    finally:
        m.cleanup()
    rc, out = fsck(capsys, path, "-n", "-f")
    assert rc == 0, out


def _synced_files(tmp_path, n: int) -> tuple[str, FileSystem, list[int]]:
    """A disk image holding freed blocks back, with ``n`` files of 3 blocks
    (/f0, /f1, ...) synced: (path, the mounted engine, their inode numbers)."""
    path = _disk_image(tmp_path)
    fs = FileSystem.mount(path)
    fs.hold_frees_until_sync()
    inos = [fs.create(ROOT, b"f%d" % i, 0o644).ino for i in range(n)]
    for ino in inos:
        fs.write(ino, 0, b"x" * 3 * 4096)
    fs.sync()
    return path, fs, inos


def test_a_sync_by_any_process_gives_back_what_every_cpu_held(tmp_path):
    """Held blocks and inode slots wait in their CPU's list in the shared area: a
    sync by another process (the supervisor's commit interval) gives them back
    at once, while the process that freed them does nothing more (it may stay
    idle, awake in read(), for as long as it likes)."""
    path, fs, inos = _synced_files(tmp_path, 8)
    for i in range(4):                                    # frees only: held back
        fs.unlink(ROOT, b"f%d" % i)
    held = fs.alloc.limbo_blocks
    assert held >= 12 and fs.area.w.load64(H_LIMBO) == held
    assert fs.area.w.load64(H_HELD_INOS) == 4
    free = fs.statfs()
    other = FileSystem.attach(fs, 1)
    other.sync()
    assert fs.alloc.limbo_blocks == 0 and fs.area.w.load64(H_LIMBO) == 0
    assert fs.area.w.load64(H_HELD_INOS) == 0
    after = fs.statfs()                                   # statfs counted them free already
    assert (after.bfree, after.ffree) == (free.bfree, free.ffree)
    fs.unmount()
    from pnova.fsck import Checker
    import io
    out = io.StringIO()
    assert Checker(path, force=True, out=out).run() == 0, out.getvalue()


def test_a_full_device_takes_back_what_another_cpu_holds(tmp_path):
    """One CPU deletes a large file (its blocks held until a sync) and goes idle;
    another then fills the device.  statfs counted the held blocks free, so the
    filling CPU must get them: its own sync gives back every CPU's held blocks
    (they used to wait for the idle CPU's next request)."""
    from pnova.errors import FsError
    path = _disk_image(tmp_path, 8 << 20)
    fs = FileSystem.mount(path)
    fs.hold_frees_until_sync()
    idle = FileSystem.attach(fs, 1)
    idle.hold_frees_until_sync()
    big = idle.create(ROOT, b"big", 0o644).ino
    piece = b"b" * (64 << 10)
    with pytest.raises(FsError):
        for k in range(1 << 10):
            idle.write(big, k * len(piece), piece)
    idle.sync()
    idle.unlink(ROOT, b"big")
    held = idle.alloc.limbo_blocks
    assert held > 1000 and fs.statfs().bavail >= held
    f = fs.create(ROOT, b"fill", 0o644).ino
    written = 0
    try:
        while True:
            fs.write(f, written, b"f" * 4096)
            written += 4096
    except FsError as e:
        assert e.errno == errno.ENOSPC
    # the device was full but for the held blocks: the writes got them (less
    # the log pages they took)
    assert written // 4096 >= held - held // 16
    assert idle.alloc.limbo_blocks == 0
    fs.unmount()


def test_a_reused_log_page_whose_new_content_did_not_arrive_is_cut(tmp_path, monkeypatch):
    """A file's log is compacted and its old pages freed; after a sync one of
    them becomes a log page of the same file again, and a power loss keeps the
    pointer to it (in the page before) but not its new content.  Its old
    entries name the same inode and pass their checksums; recovery must not
    replay them (they would bring back a mode older than the synced one)."""
    import io

    import pnova.gc
    from pnova.fsck import Checker
    from pnova.pmem import PagedPMem, PMem

    # a log compacted after a few pages, as on an almost full disk image
    monkeypatch.setattr(pnova.gc, "DISK_COMPACT_MIN_PAGES", 4)

    path = _disk_image(tmp_path)
    pm = PagedPMem(path)
    fs = FileSystem.mount(path, device=pm, power_loss=True)
    fs.hold_frees_until_sync()
    f = fs.create(ROOT, b"f", 0o600).ino
    head = fs.get(f).log_pages[0]
    i = 0
    while fs.get(f).log_pages[0] == head:              # until a compaction
        old = list(fs.get(f).log_pages)
        fs.setattr(f, mode=0o400 | (i % 0o100))       # old modes: 0o400..0o477
        i += 1
        assert i < 5000, "the log was never compacted"
    fs.sync()
    synced_mode = fs.getattr(f).mode & 0o7777
    fs.alloc.release_limbo()
    taken = [p for p in old if fs.alloc.owner(p).take(p)]
    reuse, reuse_twin = taken[0], (taken[1] if fs.log_twins else 0)
    new_page = fs._new_log_page
    fs._new_log_page = lambda: (reuse, reuse_twin)       # the next log page: an old one
    after = []
    pages = len(fs.get(f).log_pages)
    j = 0
    while True:
        m = 0o2000 | (j % 0o100)                          # new modes: setgid set
        fs.setattr(f, mode=m)
        after.append(m)
        if len(fs.get(f).log_pages) > pages:
            fs._new_log_page = new_page
            break
        j += 1
    assert reuse in fs.get(f).log_pages
    for k in range(3):                                    # entries in the reused page
        m = 0o2100 | k
        fs.setattr(f, mode=m)
        after.append(m)
    # The power loss: every page changed since the sync arrived but the reused
    # one (and its twin, another reused page).
    crash = str(tmp_path / "crash.img")
    image = pm.buf.copy()
    for b in (reuse, reuse_twin) if reuse_twin else (reuse,):
        lo, hi = b * L.BLOCK, (b + 1) * L.BLOCK
        image[lo:hi] = pm.disk[lo:hi]
    with open(crash, "wb") as out:
        out.write(image.tobytes())
    rpm = PMem(crash)
    rpm.mode = "disk"
    rec = FileSystem.mount(crash, device=rpm, power_loss=True)
    got = rec.getattr(rec.lookup(ROOT, b"f").ino).mode & 0o7777
    assert got == synced_mode or got in after, oct(got)
    assert got not in (0o2100, 0o2101, 0o2102), "entries of a page that did not arrive"
    rec.unmount()
    report = io.StringIO()
    assert Checker(crash, force=True, out=report).run() == 0, report.getvalue()


def _crash_after_an_operation_that_opened_a_page(tmp_path) -> tuple[str, int, int, int]:
    """A disk image on which setattrs of /f (synced before them) went on until
    one opened a new log page, then one more; after the power loss every page
    arrived but the last entry.  Returns (crash image, /f's inode, the mode the
    page-opening setattr left, where that page starts)."""
    from pnova import log as plog
    from pnova.pmem import PagedPMem

    path = _disk_image(tmp_path)
    pm = PagedPMem(path)
    fs = FileSystem.mount(path, device=pm, power_loss=True)
    f = fs.create(ROOT, b"f", 0o600).ino
    fs.sync()
    stop: dict = {}
    pages = len(fs.get(f).log_pages)
    i = 0
    while len(fs.get(f).log_pages) == pages:           # until one opens a page
        fs.setattr(f, mode=0o400 | (i % 0o100))
        i += 1
    inode = fs.get(f)
    starts = [stop["pos"] for _ in plog.walk(fs.pm, inode.head, inode.tail, f,
                                             fs.max_log_pages, None, 0, stop)]
    opener = starts[-1]
    twin = inode.log_pages[-1] if fs.log_twins else 0   # the page's twin, listed after it
    assert opener % L.BLOCK == 0 and opener // L.BLOCK == inode.log_pages[-2 if twin else -1]
    want = fs.getattr(f).mode & 0o7777
    fs.setattr(f, mode=0o2000)                          # the entry after it: lost below
    crash = str(tmp_path / "crash.img")
    image = pm.buf.copy()
    lo = fs.get(f).tail - 64                            # the last entry did not arrive
    image[lo:lo + 64] = 0                               # (in either copy)
    if twin:
        lo = twin * L.BLOCK + lo % L.BLOCK
        image[lo:lo + 64] = 0
    with open(crash, "wb") as out:
        out.write(image.tobytes())
    return crash, f, want, opener


def test_a_log_cut_after_an_operation_that_opens_a_page_keeps_a_valid_tail(tmp_path):
    """Recovery after a power loss cuts a log just past its last whole operation.
    When that operation's entry is the first of a log page, the cut must fall
    in that page (the walk says where each entry starts, the first of a page
    included), not past the previous page's next-page marker."""
    import io

    from pnova.fsck import Checker
    from pnova.pmem import PMem

    crash, f, want, opener = _crash_after_an_operation_that_opened_a_page(tmp_path)
    rpm = PMem(crash)
    rpm.mode = "disk"
    rec = FileSystem.mount(crash, device=rpm, power_loss=True)
    assert rec.getattr(rec.lookup(ROOT, b"f").ino).mode & 0o7777 == want
    assert rec.get(f).tail == opener + 64
    rec.unmount()
    report = io.StringIO()
    assert Checker(crash, force=True, out=report).run() == 0, report.getvalue()


@needs_fuse
@pytest.mark.mount
@pytest.mark.timeout(120)
def test_power_loss_recovery_and_rename_marks_through_the_mount(tmp_path, capsys):
    """As a user meets them: the pnova command mounts an image on a disk that a
    power loss left with a log whose last page opened just before the loss
    (recovery cuts it there and the files read back as synced or later); a
    move between directories made through that mount writes format 5's mark
    naming the new directory; the image then checks clean."""
    from helpers import fsck
    from test_crashtest import _moved_removals
    from test_mount import Mount

    crash, _f, want, _opener = _crash_after_an_operation_that_opened_a_page(tmp_path)
    m = Mount(crash, tmp_path / "mnt")
    try:
        r = m.run()                                       # recovery says what it cut
        assert r.returncode == 0 and "its log is cut" in r.stderr, r.stderr
        assert os.stat(m.mnt / "f").st_mode & 0o7777 == want
        (m.mnt / "a").mkdir()
        (m.mnt / "b").mkdir()
        (m.mnt / "a" / "x").write_bytes(b"moved")
        os.rename(m.mnt / "a" / "x", m.mnt / "b" / "y")
        b = os.stat(m.mnt / "b").st_ino
        m.stop()
    finally:
        m.cleanup()
    fs = FileSystem.mount(crash, readonly=True)
    for name in (b"a", b"b"):
        fs.get(fs.lookup(ROOT, name).ino)                 # (the walk looks at cached ones)
    ((_flags, peer, peer_dir),) = _moved_removals(fs)
    assert (peer, peer_dir) == (L.name_hash(b, b"y"), b)
    assert fs.read(fs.lookup(fs.lookup(ROOT, b"b").ino, b"y").ino, 0, 10) == b"moved"
    fs.unmount()
    rc, out = fsck(capsys, crash, "-n", "-f")
    assert rc == 0, out


def _two_cpus_and_a_synced_file(tmp_path) -> tuple[FileSystem, FileSystem, tuple, int]:
    """CPU 0 and CPU 1 (a second FileSystem on the device, as another process
    of the mount) on a disk-backed image holding directories /a, /b, /c and
    the file /a/f, synced."""
    path = str(tmp_path / "d.img")
    format_device(path, 16 << 20, numa_nodes=1, cpus_per_node=2)
    fs0 = FileSystem.mount(path)
    fs0.hold_frees_until_sync()
    fs1 = FileSystem.attach(fs0, 1)
    fs1.hold_frees_until_sync()
    dirs = tuple(fs0.mkdir(ROOT, n, 0o755).ino for n in (b"a", b"b", b"c"))
    ino = fs0.create(dirs[0], b"f", 0o644).ino
    fs0.sync()
    return fs0, fs1, dirs, ino


@pytest.mark.parametrize("second", ["link", "rename"])
def test_a_move_by_one_process_is_synced_before_another_uses_the_inode(tmp_path, second):
    """DESIGN 24.3, step 8, across processes: CPU 0 moves a file between two
    directories; CPU 1 (another process of the mount: a second FileSystem on
    the device, with caches of its own) then links it, or moves it on to a
    third directory.  CPU 1 syncs first, as CPU 0 itself would, so its entry
    never reaches the disk without the move; with the move synced, nothing
    more is synced."""
    fs0, fs1, (a, b, c), ino = _two_cpus_and_a_synced_file(tmp_path)

    def use(fs: FileSystem, name: bytes) -> None:
        if second == "link":
            fs.link(ino, c, name)
        else:
            fs.rename(b, b"f", c, name)

    fs0.rename(a, b"f", b, b"f")                         # the move, not synced
    pm = fs0.pm
    before = pm.msyncs
    use(fs1, b"g")
    assert pm.msyncs == before + 1                       # synced before CPU 1's entry
    assert fs1.lookup(c, b"g").ino == ino
    before = pm.msyncs
    fs0.sync()
    if second == "link":
        fs1.link(ino, a, b"h")
    else:
        fs1.rename(c, b"g", a, b"h")
    assert pm.msyncs == before + 1                       # only the explicit sync
    fs0.unmount()


def test_a_move_between_the_barrier_and_the_locks_is_found_under_the_locks(tmp_path,
                                                                             monkeypatch):
    """CPU 1's link looks for an unsynced move before it takes any lock; CPU 0
    moves the file just after that look.  Under the inode's lock CPU 1 finds
    the move, gives up unchanged, syncs and links."""
    fs0, fs1, (a, b, c), ino = _two_cpus_and_a_synced_file(tmp_path)
    looks = []
    barrier = FileSystem._moved_barrier

    def look_then_move(self, *inos):
        barrier(self, *inos)
        if self is fs1:
            looks.append(self.pm.msyncs)
            if len(looks) == 1:
                fs0.rename(a, b"f", b, b"f")             # right after CPU 1 looked

    monkeypatch.setattr(FileSystem, "_moved_barrier", look_then_move)
    before = fs0.pm.msyncs
    fs1.link(ino, c, b"g")
    assert len(looks) == 2                               # the link ran twice
    assert fs0.pm.msyncs == before + 1                   # with a sync between
    assert fs1.get(ino).nlink == 2 and fs1.lookup(b, b"f").ino == ino
    fs0.unmount()


def _compacting_file(tmp_path, monkeypatch, cpus: int = 1):
    """A disk image on the page model whose file /f (synced) has just been
    compacted, its new chain's msync held back by the test: (the engine, its
    device, /f's inode, the release of that msync)."""
    import threading

    import pnova.gc
    from pnova.pmem import PagedPMem

    monkeypatch.setattr(pnova.gc, "DISK_COMPACT_MIN_PAGES", 4)
    path = _disk_image(tmp_path, 64 << 20, cpus)
    pm = PagedPMem(path)
    pm.push_inline = False                        # in a thread, as on a real disk
    release = threading.Event()
    push = pm.push

    def held_back() -> None:
        release.wait(10)
        push()

    pm.push = held_back  # type: ignore[method-assign]
    fs = FileSystem.mount(path, device=pm, power_loss=True)
    fs.hold_frees_until_sync()
    ino = fs.create(ROOT, b"f", 0o644).ino
    fs.sync()
    i = 0
    while not fs._switches:
        fs.write(ino, 0, b"%08d" % i)
        i += 1
        assert i < 5000, "the log was never compacted"
    return fs, pm, ino, release


def test_a_compaction_on_a_disk_syncs_nothing_on_the_write_path(tmp_path, monkeypatch):
    """The new chain of a file compacted on a disk reaches it by an msync that
    promises nothing, in a thread, while the writes go on; the slot is switched to
    it after a later write, with the entries written meanwhile copied in.  No
    sync runs for it, and every write reads back, after a remount too."""
    from pnova.shared import H_SYNC_STARTED
    fs, pm, ino, release = _compacting_file(tmp_path, monkeypatch)
    syncs = fs.area.w.load64(H_SYNC_STARTED)
    rewrites = fs._rewrites(ino)
    for k in range(50):                            # while the chain is on its way
        fs.write(ino, 4096 * (1 + k % 3), b"%08d" % k)
    assert fs._rewrites(ino) == rewrites            # not switched yet: the writes went on
    release.set()
    fs._switches[ino].done.wait(10)
    fs.write(ino, 3 * 4096, b"last")
    assert not fs._switches and fs._rewrites(ino) == rewrites + 2
    assert fs.area.w.load64(H_SYNC_STARTED) == syncs         # no sync was asked for
    want = fs.read(ino, 0, 4 * 4096)
    assert want[4096:4104] == b"%08d" % 48 and want[3 * 4096:3 * 4096 + 4] == b"last"
    pages = fs._log_pages(fs.get(ino))
    assert pages < 4                                # the long log is gone
    fs.unmount()
    fs = FileSystem.mount(str(tmp_path / "d.img"))
    assert fs.read(ino, 0, 4 * 4096) == want
    fs.unmount()


@pytest.mark.parametrize("check", [True, False])
def test_a_compaction_switched_after_a_sync_began_syncs_first(tmp_path, monkeypatch, check):
    """A write made after a file's chain was built, then a sync: the write is
    durable in the old log, and promised.  Switched without a sync, the slot
    would name a chain holding that write only as an unsynced copy, and a
    power loss that keeps the slot's page but not the copy's would lose it;
    so the switch syncs first, as compactions did before DESIGN 24.5.  Without
    that check (the count of syncs read from a word that never moves) the
    promised write is lost in such a state."""
    import pnova.gc
    from pnova.pmem import PMem
    from pnova.shared import H_SYNC_STARTED
    if not check:
        monkeypatch.setattr(pnova.gc, "H_SYNC_STARTED", 0)
    fs, pm, ino, release = _compacting_file(tmp_path, monkeypatch)
    first = fs._switches[ino]
    fs.write(ino, 4096, b"promised")
    fs.sync()
    syncs = fs.area.w.load64(H_SYNC_STARTED)
    release.set()
    first.done.wait(10)
    rewrites = fs._rewrites(ino)
    fs.write(ino, 2 * 4096, b"after")                # the switch is made after it
    assert fs._switches.get(ino) is not first and fs._rewrites(ino) == rewrites + 2
    assert (fs.area.w.load64(H_SYNC_STARTED) == syncs + 1) == check     # its own sync
    # The power loss: every page changed since the last sync arrived but those
    # of the new chain from where the copies went in.
    pages = fs.get(ino).log_pages
    at = pages.index(first.tail // L.BLOCK)
    assert at % (2 if fs.log_twins else 1) == 0
    image = pm.buf.copy()
    for b in pages[at:]:
        image[b * L.BLOCK:(b + 1) * L.BLOCK] = pm.disk[b * L.BLOCK:(b + 1) * L.BLOCK]
    crash = str(tmp_path / "crash.img")
    with open(crash, "wb") as out:
        out.write(image.tobytes())
    rpm = PMem(crash)
    rpm.mode = "disk"
    rec = FileSystem.mount(crash, device=rpm, power_loss=True)
    got = rec.read(ino, 4096, 8)
    rec.unmount()
    assert (got == b"promised") == check
    fs.unmount()


@pytest.mark.parametrize("extents", [1, 2])
def test_a_compaction_copies_what_another_cpu_wrote_meanwhile(tmp_path, monkeypatch, extents):
    """CPU 1 writes the file while CPU 0's compacted chain is on its way to the
    disk: its entries, in its own local log, are copied into the chain with CPU
    0's, in sequence order, and the file reads back whole on both CPUs, after a
    remount, and fsck finds nothing.  A write of two extents from CPU 1 (its
    entries continue one another, F_CONT) cannot be merged with CPU 0's: the
    switch is given up, and the long log is compacted again later."""
    import io

    from pnova.fsck import Checker
    fs0, pm, ino, release = _compacting_file(tmp_path, monkeypatch, cpus=2)
    fs1 = FileSystem.attach(fs0, 1)
    fs1.hold_frees_until_sync()
    first = fs0._switches[ino]
    rewrites = fs0._rewrites(ino)
    want = bytearray(1 << 20)
    now = fs0.read(ino, 0, 1 << 20)
    want[:len(now)] = now
    for k in range(6):
        fs0.write(ino, 4096 * (4 + k), b"zero%d" % k)
        want[4096 * (4 + k):4096 * (4 + k) + 5] = b"zero%d" % k
        if extents == 2 and k == 3:
            # two pages whose new blocks are not contiguous (as on a
            # fragmented device): two write entries, the first continued
            alloc = fs1.alloc.alloc

            def apart(cpu: int, n: int, **kw):
                if n != 2:
                    return alloc(cpu, n, **kw)
                got = [alloc(cpu, 1)[0] for _ in range(3)]
                fs1.alloc.free(got[1][0], 1)
                return [got[0], got[2]]

            monkeypatch.setattr(fs1.alloc, "alloc", apart)
            fs1.write(ino, 4096 * 20, b"b" * 8192)
            monkeypatch.setattr(fs1.alloc, "alloc", alloc)
            want[4096 * 20:4096 * 22] = b"b" * 8192
        else:
            fs1.write(ino, 4096 * (30 + k), b"one%d" % k)
            want[4096 * (30 + k):4096 * (30 + k) + 4] = b"one%d" % k
    assert fs0.get(ino).local, "CPU 1 wrote through a local log"
    release.set()
    first.done.wait(10)
    fs0.write(ino, 4096 * 3, b"end")
    want[4096 * 3:4096 * 3 + 3] = b"end"
    switched = fs0._rewrites(ino) == rewrites + 2
    assert switched == (extents == 1)
    assert fs0._switches.get(ino) is not first
    n = len(want.rstrip(b"\0"))
    assert fs0.read(ino, 0, 1 << 20)[:n] == bytes(want[:n])
    assert fs1.read(ino, 0, 1 << 20)[:n] == bytes(want[:n])
    fs0.unmount()
    path = str(tmp_path / "d.img")
    fs = FileSystem.mount(path)
    assert fs.read(ino, 0, 1 << 20)[:n] == bytes(want[:n])
    fs.unmount()
    report = io.StringIO()
    assert Checker(path, force=True, out=report).run() == 0, report.getvalue()


_SLOW_PUSH_DAEMON = r"""
import sys, time
import pnova.gc
from pnova.daemon import serve
from pnova.engine import FileSystem
from pnova.pmem import PMem

pnova.gc.DISK_COMPACT_MIN_PAGES = 4               # a compaction every few hundred writes
push = PMem.push

def slow(self):
    time.sleep(0.5)                               # a disk slower than the client
    push(self)

PMem.push = slow
image, mnt = sys.argv[1:3]
sys.exit(serve(FileSystem.mount(image), mnt, ["default_permissions", "fsname=" + image],
               workers=2, commit=0))
"""


@needs_fuse
@pytest.mark.mount
@pytest.mark.timeout(120)
def test_a_serving_process_switches_its_pending_compaction_before_it_exits(tmp_path, capsys):
    """Through the mount, a file overwritten until its log is compacted, and
    the mount ended while the new chain is still on its way to the disk: the
    serving process waits for it and switches before it exits (else its
    blocks would stay taken in the clean image, which fsck reports as leaked).
    The last write reads back after a remount."""
    import subprocess
    import sys

    from helpers import fsck
    from test_mount import wait_for
    path = str(tmp_path / "m.img")                       # tmp_path: a disk, not tmpfs
    format_device(path, 64 << 20, numa_nodes=1, cpus_per_node=2)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    fg = subprocess.Popen([sys.executable, "-c", _SLOW_PUSH_DAEMON, path, str(mnt)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: os.path.ismount(mnt) or fg.poll() is not None, "the mount")
        assert fg.poll() is None, fg.stderr.read()
        fd = os.open(mnt / "f", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            for i in range(2000):
                os.pwrite(fd, b"%08d" % i, 0)
        finally:
            os.close(fd)
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
        assert fg.wait(timeout=60) == 0, fg.stderr.read()
        fg.stderr.close()
    rc, out = fsck(capsys, path, "-n", "-f")
    assert rc == 0, out
    fs = FileSystem.mount(path, readonly=True)
    try:
        ino = fs.lookup(ROOT, b"f").ino
        assert fs.read(ino, 0, 8) == b"%08d" % 1999
    finally:
        fs.unmount()
