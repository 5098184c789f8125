"""Per-core local logs of directories (format 9, DESIGN 19.3).

A CPU other than a directory's home that changes names in it while another CPU
uses it too appends its dentries to its own local log of the directory, with
no log lock; replay merges the logs by sequence number.  These tests drive two
CPUs of one image in one process (``FileSystem.attach``) so that which CPU does
what is exact, and check the image's words and logs, every CPU's view, a
recovery, a clean remount and fsck.
"""
from __future__ import annotations

import errno
import io
import shutil
import struct

import pytest

import pnova.namei
from pnova import layout as L
from pnova import log as plog
from pnova.engine import FileSystem
from pnova.errors import FsError
from pnova.fsck import Checker
from pnova.mkfs import format_device

from helpers import set_version


@pytest.fixture(autouse=True)
def _stays_shared(monkeypatch):
    """A directory two CPUs used stays shared for the whole test (the directory
    users word would otherwise hand it back to one CPU after a second)."""
    monkeypatch.setattr(pnova.namei, "PRIVATE_AFTER", 1 << 60)


def _fsck_clean(path: str) -> None:
    out = io.StringIO()
    assert Checker(path, force=True, out=out).run() == 0, out.getvalue()


def _names(fs: FileSystem, d: int) -> list[bytes]:
    return sorted(n for n, _, _ in fs.readdir(d)[2:])


def _array(fs: FileSystem, d: int) -> int:
    return fs.pm.read_u64(fs.inode_addr(d) + L.I_LOG_ARRAY)


def _line(fs: FileSystem, array: int, cpu: int) -> tuple[int, int]:
    base = array * L.BLOCK + cpu * L.LA_LINE
    return fs.pm.read_u64(base + L.LA_HEAD), fs.pm.read_u64(base + L.LA_TAIL)


def _local_entries(fs: FileSystem, d: int, cpu: int) -> list[tuple]:
    head, tail = _line(fs, _array(fs, d), cpu)
    return [L.decode_entry(raw) for raw in plog.walk(fs.pm, head, tail, d, 1 << 20)]


def _global_names(fs: FileSystem, d: int) -> set[bytes]:
    a = fs.inode_addr(d)
    head, tail = fs.pm.read_u64(a + L.I_LOG_HEAD), fs.pm.read_u64(a + L.I_LOG_TAIL)
    return {e[3] for e in map(L.decode_entry, plog.walk(fs.pm, head, tail, d, 1 << 20))
            if e[0] == L.E_DENTRY}


def _two_cpus(path: str) -> tuple[FileSystem, FileSystem, int]:
    format_device(path, 32 << 20, numa_nodes=1, cpus_per_node=2)
    fs0 = FileSystem.mount(path)
    d = fs0.mkdir(1, b"d", 0o755).ino
    assert (d - 1) % 2 == 0                      # CPU 0's table: its home
    return fs0, FileSystem.attach(fs0, 1), d


def test_the_dentries_of_a_cpu_other_than_the_home_go_to_its_local_log(shm_dir):
    """Once two CPUs change one directory, CPU 1's creates, unlinks, renames and
    links there are appended to CPU 1's local log of it (the global log holds
    none of its names) while CPU 0's go to the global log; each CPU sees every
    name; a recovery from the logs and a clean remount give the same directory,
    and fsck is clean."""
    path = str(shm_dir / "d.img")
    fs0, fs1, d = _two_cpus(path)
    fs0.create(d, b"a0", 0o644)                  # CPU 0's alone: held whole
    for i in range(20):
        fs1.create(d, b"b%d" % i, 0o644)         # now shared
        fs0.create(d, b"a%d" % (i + 1), 0o600)
    fs1.unlink(d, b"b3")
    fs1.rename(d, b"b4", d, b"b44")
    fs1.link(fs1.lookup(d, b"a1").ino, d, b"b-link")
    fs0.unlink(d, b"b5")                         # a name of CPU 1's, removed by CPU 0
    fs1.mkdir(d, b"sub", 0o755)                  # its link count: global log, held whole
    fs1.create(d, b"b-after", 0o644)

    want = sorted([b"a%d" % i for i in range(21)] +
                  [b"b%d" % i for i in range(20) if i not in (3, 4, 5)] +
                  [b"b44", b"b-link", b"sub", b"b-after"])
    assert _names(fs0, d) == want and _names(fs1, d) == want
    assert fs0.lookup(d, b"b44").ino == fs1.lookup(d, b"b44").ino
    array = _array(fs0, d)
    assert array
    assert _line(fs0, array, 0) == (0, 0)        # the home CPU has no local log
    local = _local_entries(fs0, d, 1)
    assert local and all(e[0] == L.E_DENTRY for e in local)
    assert {e[3] for e in local} >= {b"b0", b"b19", b"b3", b"b4", b"b44", b"b-link",
                                     b"b-after"}
    assert not any(n.startswith(b"b") for n in _global_names(fs0, d) - {b"b5"})
    assert b"sub" in _global_names(fs0, d)       # held whole: the global log

    # a recovery from the logs (the image as a crash would leave it)
    crash = str(shm_dir / "crash.img")
    shutil.copyfile(path, crash)
    fs0.unmount()
    _fsck_clean(path)
    for img in (crash, path):
        fs = FileSystem.mount(img)
        assert _names(fs, d) == want
        assert fs.getattr(d).nlink == 3
        fs.unmount()
        _fsck_clean(img)


def test_a_directory_with_local_logs_is_compacted_and_removed_whole(shm_dir):
    """A compaction of a directory folds its local logs into one new chain and
    clears its log array in the same transaction; a CPU whose cache had read
    every log as far as the compaction started takes the new chain without
    reading the directory again; once empty, the directory goes with its
    array and local log, and every block comes back."""
    path = str(shm_dir / "d.img")
    fs0, fs1, d = _two_cpus(path)
    before = fs0.statfs().bfree
    first = len(fs0.get(d).log_pages)            # d's first log page (and its twin)
    fs0.create(d, b"a", 0o644)
    for i in range(60):
        fs1.create(d, b"n%d" % i, 0o644)
    for i in range(0, 60, 2):
        fs1.unlink(d, b"n%d" % i)
    want = sorted([b"a"] + [b"n%d" % i for i in range(1, 60, 2)])
    assert _names(fs0, d) == want                # CPU 0 caught up with CPU 1's log
    assert _array(fs0, d) and _local_entries(fs0, d, 1)

    reads = []
    real = fs0._read_inode
    fs0._read_inode = lambda *a, **k: (reads.append(a[0]), real(*a, **k))[1]
    fs1.compact(d)
    assert _array(fs0, d) == 0                   # one chain again
    assert _names(fs0, d) == want and _names(fs1, d) == want
    assert reads == []                           # CPU 0 took the new chain as it was
    fs1.create(d, b"later", 0o644)               # a new array and local log
    assert _array(fs0, d) and fs0.lookup(d, b"later")

    for n in want + [b"later"]:
        (fs0 if n.startswith(b"a") else fs1).unlink(d, n)
    assert _names(fs1, d) == []
    fs0.rmdir(1, b"d")
    fs0.unmount()
    _fsck_clean(path)
    fs = FileSystem.mount(path)
    assert fs.statfs().bfree == before + first   # d's first log page is free again too
    fs.unmount()


def test_an_image_on_a_disk_or_of_version_8_keeps_one_log_per_directory(tmp_path, shm_dir):
    """On a disk the settling of renames half-written by a power loss reads each
    directory's one log in order (DESIGN 24.3), so there directories get no
    local log; nor in a version-8 image, whose readers do not know them (the
    version is kept)."""
    disk = str(tmp_path / "disk.img")
    old = str(shm_dir / "v8.img")
    for path in (disk, old):
        format_device(path, 32 << 20, numa_nodes=1, cpus_per_node=2)
        if path == old:
            set_version(path, 8)
        fs0 = FileSystem.mount(path)
        d = fs0.mkdir(1, b"d", 0o755).ino
        fs1 = FileSystem.attach(fs0, 1)
        fs0.create(d, b"a", 0o644)
        for i in range(10):
            fs1.create(d, b"b%d" % i, 0o644)
        assert _array(fs0, d) == 0
        assert _global_names(fs0, d) == {b"..", b"a"} | {b"b%d" % i for i in range(10)}
        assert fs0.sb.version == (8 if path == old else L.FORMAT_VERSION)
        fs0.unmount()
        _fsck_clean(path)


def test_fsck_reads_a_directorys_local_log_and_refuses_a_stray_entry_in_it(shm_dir, capsys):
    """fsck merges a directory's local logs into its names (a name only there
    is no orphan); an entry other than a dentry of its names in such a log (here
    a `..`, which only the global log may hold) is damage fsck reports and
    repairs by cutting that log."""
    path = str(shm_dir / "d.img")
    fs0, fs1, d = _two_cpus(path)
    fs0.create(d, b"a", 0o644)
    fs1.create(d, b"b", 0o644)
    fs1.create(d, b"c", 0o644)
    array = _array(fs0, d)
    head, tail = _line(fs0, array, 1)
    fs0.unmount()
    _fsck_clean(path)

    # the second entry of CPU 1's local log becomes a `..` (CRC made good)
    fs = FileSystem.mount(path)
    (first, second) = list(plog.walk(fs.pm, head, tail, d, 1 << 20))
    twin = plog.twin_of(fs.pm, head - head % L.BLOCK)
    fs.unmount()
    e = L.decode_entry(second)
    bad = L.encode_entry((L.E_DENTRY, e[1], L.D_ADD, L.DOTDOT, 1, e[5], e[6]))
    assert len(bad) == len(second) and twin
    with open(path, "r+b") as f:
        for page in (head - head % L.BLOCK, twin * L.BLOCK):   # both copies
            f.seek(page + head % L.BLOCK + len(first))
            f.write(bad)
    out = io.StringIO()
    assert Checker(path, force=True, out=out).run() != 0
    assert "dentries of its names" in out.getvalue()


def _open_and_store(journal, updates: list[tuple[int, int]], before_store=None) -> None:
    """Steps 1 to 3 of ``Journal.run`` (records, open, new values, each fenced),
    leaving the transaction open; ``before_store(k)`` runs before the k-th
    word is stored."""
    pm = journal.pm
    recs = b"".join(struct.pack("<QQ", a, pm.read_u64(a)) for a, _ in updates)
    pm.store(journal.base + L.J_RECORDS, recs)
    if journal.twin is not None:
        pm.store(journal.twin, recs)
    pm.fence()
    pm.store_u64(journal.base, L.journal_word(len(updates), recs))
    pm.fence()
    for k, (a, v) in enumerate(updates):
        if before_store is not None:
            before_store(k)
        for t in journal._targets(a):
            pm.store_u64(t, v)
    pm.fence()


def _attrs_time(fs: FileSystem, d: int) -> tuple[int, int]:
    a = fs.getattr(d)
    return a.mtime_ns, a.ctime_ns


def test_a_directorys_times_are_its_newest_entrys_in_every_view(shm_dir):
    """CPU 1 takes the number of its dentry, CPU 0 creates a name in the same
    directory and commits first, then CPU 1 commits: the directory's times are
    those of the newer entry (CPU 0's) in both CPUs' caches and after a
    remount, as replay by sequence number gives them."""
    path = str(shm_dir / "d.img")
    fs0, fs1, d = _two_cpus(path)
    fs0.create(d, b"a", 0o644)
    fs1.create(d, b"b", 0o644)                   # shared; CPU 1 has a local log
    real = fs1._local_append

    def late_commit(inode, raws):
        fs1._local_append = real
        fs0.create(d, b"late", 0o644)            # a larger number, committed first
        return real(inode, raws)

    fs1._local_append = late_commit
    fs1.create(d, b"early", 0o644)
    newest = _attrs_time(fs0, d)
    assert _attrs_time(fs1, d) == newest
    fs0.unmount()
    fs = FileSystem.mount(path)
    assert _attrs_time(fs, d) == newest
    assert _names(fs, d) == [b"a", b"b", b"early", b"late"]
    fs.unmount()


def test_a_lookup_sees_a_name_that_only_another_cpus_local_log_holds(shm_dir):
    """A lookup answers from the cache of a directory no process has changed
    since it was read, without looking at name versions.  "Changed" includes
    a local log that grew while the global log did not: CPU 0's cache of the
    directory is current, CPU 1 creates and removes names in its own local
    log, and each lookup of CPU 0 sees each change at once."""
    path = str(shm_dir / "d.img")
    fs0, fs1, d = _two_cpus(path)
    fs0.create(d, b"a", 0o644)
    fs1.create(d, b"b", 0o644)                   # shared; CPU 1 has a local log
    assert fs0.lookup(d, b"b").ino == fs1.lookup(d, b"b").ino
    g = fs0.pm.read_u64(fs0.inode_addr(d) + L.I_LOG_TAIL)
    c = fs1.create(d, b"c", 0o644).ino
    assert fs0.pm.read_u64(fs0.inode_addr(d) + L.I_LOG_TAIL) == g    # only the local log
    assert fs0.lookup(d, b"c").ino == c
    fs1.unlink(d, b"b")
    with pytest.raises(FsError) as e:
        fs0.lookup(d, b"b")
    assert e.value.errno == errno.ENOENT
    fs1.rename(d, b"c", d, b"c2")
    assert fs0.lookup(d, b"c2").ino == c
    fs0.unmount()


def test_a_listing_kept_sorted_follows_another_cpus_names(shm_dir):
    """CPU 0 lists a directory, which from then on keeps its cookies sorted;
    CPU 1 adds and removes names in its local log, and CPU 0's cache applies
    them when it catches up: both CPUs list the same names at the same
    cookies, a listing resumed from a cookie goes on after it, and after CPU 1
    compacts the directory (CPU 0 adopts or re-reads it) nothing moves."""
    path = str(shm_dir / "d.img")
    fs0, fs1, d = _two_cpus(path)
    for n in range(6):
        fs0.create(d, b"a%d" % n, 0o644)
    fs1.create(d, b"b0", 0o644)                  # shared from here on
    assert [n for n, _, _ in fs0.readdir(d)][2:] == [b"a%d" % n for n in range(6)] + [b"b0"]
    fs1.unlink(d, b"a2")
    fs1.create(d, b"b1", 0o644)
    fs0.create(d, b"a6", 0o644)
    fs1.rename(d, b"a4", d, b"b2")
    fs1.unlink(d, b"a0")
    want = [b"a1", b"a3", b"a5", b"b0", b"b1", b"a6", b"b2"]
    ents = fs0.readdir(d)
    assert [n for n, _, _ in ents][2:] == want
    assert fs1.readdir(d) == ents
    for k in range(2, len(ents) - 1):
        assert fs0.readdir(d, ents[k][2]) == ents[k + 1:]
    fs1.compact(d)
    assert fs0.readdir(d) == ents and fs1.readdir(d) == ents
    fs0.unmount()
    _fsck_clean(path)


def test_a_lookup_that_a_compaction_overtakes_reads_the_directory_again(shm_dir):
    """A lookup reads the slot's words, then the array's line tails.  If, in
    between, another CPU compacts the directory (its array block freed) and a
    file's write lands in that block with the cache's old tail at the line's
    offset, the tails match the cache by chance: the lookup must still see the
    name created before it began (it looks at the slot's words again)."""
    path = str(shm_dir / "d.img")
    fs0, fs1, d = _two_cpus(path)
    fs0.create(d, b"a", 0o644)
    fs1.create(d, b"b0", 0o644)                  # CPU 1's local log
    fs0.lookup(d, b"b0")                         # CPU 0's cache: line 1 at t1
    old_tail = fs0.cache[d].local[1][1]
    g = fs1.create(1, b"g", 0o644).ino
    fs1.write(g, 0, b"g" * 4096)
    x = fs1.create(d, b"x0", 0o644).ino          # returned: line 1 moved on
    array = _array(fs0, d)
    real = fs0._slot_words
    reused = []

    def compacted_between(ino):
        words = real(ino)
        if ino == d and not reused:
            fs1.compact(d)                       # the array block is freed
            data = bytearray(4096)
            struct.pack_into("<Q", data, L.LA_LINE + L.LA_TAIL, old_tail)
            fs1.write(g, 4096, bytes(data))      # ...and a file's data lands in it
            reused.append(fs1.get(g).pages[1])
        return words

    fs0._slot_words = compacted_between
    try:
        assert fs0.lookup(d, b"x0").ino == x
    finally:
        fs0._slot_words = real
    assert reused == [array]                     # the case the test is about happened
    fs0.unmount()


@pytest.mark.parametrize("stores", [1, 2, 3])
def test_a_reader_waits_out_a_compaction_that_is_switching_the_words(shm_dir, stores):
    """A compaction of a directory with local logs switches head, tail, head
    twin and array in one journal transaction, one word at a time.  A
    lock-free reader on another CPU (readdir) that comes while only some are
    stored waits for the rest (DESIGN 19.5): it neither reads the new chain to
    the old tail (an error) nor the new chain with the old local logs (names
    removed long ago)."""
    import threading
    from pnova import journal
    path = str(shm_dir / "d.img")
    fs0, fs1, d = _two_cpus(path)
    fs0.create(d, b"a", 0o644)
    for i in range(20):
        fs1.create(d, b"b%d" % i, 0o644)         # CPU 1's local log
    fs0.unlink(d, b"b3")                         # removed in the global log
    want = _names(fs0, d)
    real = journal.Journal.run
    inside, go = threading.Event(), threading.Event()

    def paused(self, updates):
        """Journal.run for the compaction, paused after ``stores`` of its words."""
        if updates[0][0] != fs1.inode_addr(d) + L.I_LOG_HEAD:
            return real(self, updates)
        def pause(k: int) -> None:
            if k == stores:
                inside.set()
                go.wait(10)

        _open_and_store(self, updates, pause)
        self.pm.store_u64(self.base, 0)
        self.pm.fence()

    got = []
    journal.Journal.run = paused
    try:
        compactor = threading.Thread(target=fs1.compact, args=(d,))
        compactor.start()
        assert inside.wait(10)

        def read():
            try:
                got.append(_names(fs0, d))
            except Exception as e:               # noqa: BLE001 (what the reader met)
                got.append(e)

        reader = threading.Thread(target=read)
        reader.start()
        reader.join(0.2)                         # (it waits: the count is odd)
        go.set()
        compactor.join(10)
        reader.join(10)
    finally:
        go.set()
        journal.Journal.run = real
    assert got == [want]
    assert _array(fs0, d) == 0 and _names(fs1, d) == want
    fs0.unmount()
    _fsck_clean(path)


def test_fsck_reads_a_dirty_images_lines_as_the_rollback_leaves_them(shm_dir):
    """A crash inside a create whose journal transaction names CPU 1's line of a
    directory (its new tail stored, the transaction still open): fsck judges
    the image as mount will leave it after the rollback (no name for an inode
    that is free again), and mount rolls it back."""
    from pnova import journal
    path = str(shm_dir / "d.img")
    crash = str(shm_dir / "crash.img")
    fs0, fs1, d = _two_cpus(path)
    fs0.create(d, b"a", 0o644)
    fs1.create(d, b"b", 0o644)
    real = journal.Journal.run

    class Crash(Exception):
        pass

    def crash_after_f3(self, updates):
        _open_and_store(self, updates)
        shutil.copyfile(path, crash)             # the image as the crash leaves it
        raise Crash

    journal.Journal.run = crash_after_f3
    try:
        with pytest.raises(Crash):
            fs1.create(d, b"c", 0o644)
    finally:
        journal.Journal.run = real
    fs0.abandon()
    out = io.StringIO()
    assert Checker(crash, force=True, out=out).run() == 0, out.getvalue()
    assert "mount rolls it back" in out.getvalue()
    fs = FileSystem.mount(crash)
    assert _names(fs, d) == [b"a", b"b"]
    fs.unmount()
    _fsck_clean(crash)
