"""Log page twins (SPEC 6.1, DESIGN 23.2): every log page has a second copy in
the next CPU's region; readers read around damage to either copy, recovery and
fsck.pnova write the good copy back, a mounted filesystem rewrites the log,
a scrub finds damage to the copy readers do not look at, and
``mkfs.pnova --no-log-replicas`` really keeps one copy."""
from __future__ import annotations

import logging
import os
import random
import shutil
import struct

import pytest
from crc32c import crc32c
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pnova import layout as L
from pnova import log as plog
from pnova.engine import FileSystem
from pnova.mkfs import format_device
from pnova.pmem import save_badblocks
from pnova_fsck.cli import main as fsck_main
from pnova_mkfs.cli import main as mkfs_main

from helpers import flip, fsck
from test_mount import Mount, needs_fuse
from test_replica import ROOT, _check, _image, _workload


def _logs(fs: FileSystem, ino: int) -> list[tuple[int, int, int]]:
    """(head, tail, head's twin as a byte offset) of every log of an inode."""
    a = fs.inode_addr(ino)
    rd = fs.pm.read_u64
    out = [(rd(a + L.I_LOG_HEAD), rd(a + L.I_LOG_TAIL), rd(a + L.I_LOG_HEAD_TWIN))]
    array = rd(a + L.I_LOG_ARRAY)
    if array:
        base = array * L.BLOCK
        out += [(h, t, rd(base + c * L.LA_LINE + L.LA_HEAD_TWIN))
                for c, h, t in fs._local_lines(array)]
    return out


def _live(fs: FileSystem) -> list[int]:
    """Every live inode, from the slots' state words."""
    n = fs.ncpus * fs.sb.inodes_per_cpu
    return [i for i in range(1, n + 1)
            if fs.pm.read_u64(fs.inode_addr(i) + L.I_STATE) == L.STATE_LIVE]


def _pages(path: str) -> list[tuple[int, int, int, int]]:
    """(inode, page block, twin block, bytes used in the page) of every page of
    every log of every live inode, read from a fresh read-only mount."""
    fs = FileSystem.mount(path, readonly=True)
    try:
        out = []
        for ino in _live(fs):
            for head, tail, _ in _logs(fs, ino):
                pages = plog.chain_pages(fs.pm, head, tail, ino, fs.max_log_pages)
                for k in range(0, len(pages), 2):
                    p, t = pages[k], pages[k + 1]
                    last = k + 2 == len(pages)
                    used = tail % L.BLOCK if last else _marker_end(fs, p)
                    out.append((ino, p, t, used))
        return out
    finally:
        fs.unmount()


def _marker_end(fs: FileSystem, page: int) -> int:
    """Where the entries of a log page that has a next page end: just after its
    next-page marker, if the page has room for one (the bytes between it and the
    page tail mean nothing)."""
    raw = fs.pm.read(page * L.BLOCK, L.LOG_DATA)
    off = 0
    while off < L.LOG_DATA:
        etype, _flags, size = struct.unpack_from("<BBH", raw, off)
        assert size, (page, off)
        off += size
        if etype == L.E_NEXT_PAGE:
            break
    return off


def _with_big_local_log(path: str, want: dict[str, bytes]) -> None:
    """Writes to 'big' (home CPU 0) from CPU 1: a per-core local log."""
    fs = FileSystem.mount(path, cpu=1)
    big = fs.lookup(ROOT, b"big").ino
    for k in range(70):                       # more than one local log page
        fs.write(big, 8192, bytes([k]) * 100)
    want["big"] = want["big"][:8192] + bytes([69]) * 100 + want["big"][8292:]
    assert fs.get(big).local
    fs.unmount()


@pytest.fixture(scope="module")
def twinned(tmp_path_factory):
    """An image after every kind of update, its expected contents and its log pages."""
    path = _image(tmp_path_factory.mktemp("twins"))
    want = _workload(path)
    _with_big_local_log(path, want)
    return path, want, _pages(path)


def test_every_log_page_has_a_twin_in_the_next_cpus_region(twinned):
    """Each page of every log (global and local) has a twin from the other
    CPU's region holding the same entries; their tails name each other."""
    path, _want, pages = twinned
    fs = FileSystem.mount(path, readonly=True)
    try:
        regions = fs.regions

        def region(b: int) -> int:
            return next(r.cpu for r in regions if r.data_start <= b < r.end)

        assert len(pages) > 30
        for ino, p, t, used in pages:
            assert region(t) != region(p), (ino, p, t)
            tail_p = fs.pm.read(p * L.BLOCK + L.PT_NEXT, 32)
            tail_t = fs.pm.read(t * L.BLOCK + L.PT_NEXT, 32)
            assert L.page_tail_twin(tail_p) == t
            assert L.page_tail_twin(tail_t) == p | L.TWIN_ROLE
            assert fs.pm.read(p * L.BLOCK, used) == fs.pm.read(t * L.BLOCK, used)
        for ino in _live(fs):
            for head, tail, twin in _logs(fs, ino):
                fixes: list = []
                for _ in plog.walk(fs.pm, head, tail, ino, fs.max_log_pages, None, 0, None,
                                   twin // L.BLOCK, fixes, True):
                    pass
                assert fixes == [] and twin
    finally:
        fs.unmount()
    assert fsck_clean(path)


def fsck_clean(path: str) -> bool:
    return fsck_main(["-n", "-f", path]) == 0


def _damage_spot(rng: random.Random, pages, twin: bool) -> tuple[int, int]:
    """A byte of a log page (or of its twin) that means something: an entry
    before the tail, or the page tail (the last page's ``next`` means nothing)."""
    ino, p, t, used = rng.choice(pages)
    last = used != L.LOG_DATA or not any(q[1] != p and q[0] == ino for q in pages)
    spots = list(range(0, used)) + list(range(L.PT_OWNER if last else L.PT_NEXT, L.BLOCK))
    return (t if twin else p) * L.BLOCK + rng.choice(spots), ino


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10 ** 6), nbytes=st.integers(1, 8), twin=st.booleans())
def test_flips_in_one_copy_of_a_log_page_read_back_exactly(twinned, tmp_path_factory, seed,
                                                          nbytes, twin):
    """1 to 8 random bytes flipped in one copy of a log page (entries, page tail
    or link): fsck.pnova -n reports it and -p restores it from the other copy;
    a mount without fsck reads every file and directory exactly, and rewrites a
    log whose primary copy it found damaged."""
    path, want, pages = twinned
    rng = random.Random(seed)
    tmp = tmp_path_factory.mktemp("flip")
    img = str(tmp / "f.img")
    shutil.copy(path, img)
    spot, ino = _damage_spot(rng, pages, twin)
    # a run of bytes through the spot, all in its page (a run that went past
    # the page's end would damage the next block, another inode's log maybe)
    block, off = divmod(spot, L.BLOCK)
    start = block * L.BLOCK + min(off, L.BLOCK - nbytes)
    for k in range(nbytes):
        flip(img, start + k, rng.randrange(1, 256))
    other = str(tmp / "g.img")
    shutil.copy(img, other)
    # fsck: reported, then a safe repair
    rc = fsck_main(["-n", "-f", img])
    assert rc != 0 or _unused_flip(img, path), (spot, ino)
    assert fsck_main(["-p", "-f", img]) in (0, 1)
    assert fsck_main(["-n", "-f", img]) == 0
    fs = FileSystem.mount(img)
    _check(fs, want)
    fs.unmount()
    # the mount alone: exact contents; a damaged primary is read around and
    # the log rewritten, a damaged twin (which readers do not read) is left
    # for fsck or a scrub
    fs = FileSystem.mount(other)
    _check(fs, want)
    fs.readdir(ROOT)
    fs.unmount()
    if twin:
        assert fsck_main(["-p", "-f", other]) in (0, 1)
    assert fsck_main(["-n", "-f", other]) == 0


def _unused_flip(img: str, orig: str) -> bool:
    """Whether the flipped bytes all landed where they mean nothing (a flip can
    give a byte back the value it had)."""
    with open(img, "rb") as a, open(orig, "rb") as b:
        return a.read() == b.read()


def test_a_poisoned_log_page_is_read_from_its_twin(twinned, tmp_path, capsys):
    """A media error in a directory's log page: fsck reports it and restores the
    whole page from its twin (which clears the poison); a mount reads the
    directory from the twin."""
    path, want, pages = twinned
    fs = FileSystem.mount(path, readonly=True)
    d = fs.lookup(ROOT, b"d").ino
    fs.unmount()
    p = next(q for q in pages if q[0] == d)[1]
    for variant in ("fsck", "mount"):
        img = str(tmp_path / f"{variant}.img")
        shutil.copy(path, img)
        save_badblocks(img, {p * L.BLOCK // 512 + 2})
        if variant == "fsck":
            rc, out = fsck(capsys, img, "-n", "-f")
            assert rc != 0 and "damaged in one copy" in out, out
            rc, out = fsck(capsys, img, "-p", "-f")
            assert "Restore them from the other copy? yes" in out, out
            assert fsck(capsys, img, "-n", "-f")[0] == 0
        fs = FileSystem.mount(img)
        _check(fs, want)
        fs.unmount()
        assert fsck(capsys, img, "-n", "-f")[0] == 0


def test_recovery_writes_the_good_copy_back(twinned, tmp_path, caplog):
    """After a crash, recovery reads every log and mends a damaged copy where it
    lies, before the mount serves."""
    path, want, pages = twinned
    img = str(tmp_path / "c.img")
    shutil.copy(path, img)
    fs = FileSystem.mount(img)
    fs.pm.close()                                # no clean unmount: recovery next
    _ino, p, t, used = pages[len(pages) // 2]
    flip(img, t * L.BLOCK + used // 2)           # the twin: readers never look there
    flip(img, p * L.BLOCK + L.PT_OWNER)
    caplog.set_level(logging.WARNING)
    fs = FileSystem.mount(img)
    assert "restored from their twins" in caplog.text
    _check(fs, want)
    fs.unmount()
    assert fsck_clean(img)


def test_a_scrub_finds_a_damaged_twin_and_rewrites_the_log(twinned, tmp_path, caplog):
    """Readers use the primary copy, so damage to a twin stays unseen until a
    scrub compares the copies: the log is then rewritten (a compaction)."""
    path, want, pages = twinned
    img = str(tmp_path / "s.img")
    shutil.copy(path, img)
    fs = FileSystem.mount(img)
    try:
        ino, _p, t, used = next(q for q in pages if q[3] > 200 and q[0] != ROOT)
        fs.pm.store(t * L.BLOCK + 64, b"\xA5" * 8)
        assert fs.scrub(ino).logs == 1
        assert fs._verify_logs(ino) == []
        assert "its log is damaged in one copy" in caplog.text
        assert fs.scrub(ino).logs == 0
        _check(fs, want)
    finally:
        fs.unmount()
    assert fsck_clean(img)


def test_without_twins_the_same_damage_is_only_reported(tmp_path, capsys):
    """mkfs.pnova --no-log-replicas: log pages have no twin; a damaged entry is
    found by fsck (and cut there), not repaired."""
    path = str(tmp_path / "n.img")
    assert mkfs_main(["-s", "16M", "--cpus-per-node", "2", "--no-log-replicas",
                      path]) == 0
    fs = FileSystem.mount(path)
    assert not fs.sb.log_replicas and not fs.log_twins
    d = fs.mkdir(ROOT, b"d", 0o755).ino
    for i in range(20):
        fs.create(d, b"f%d" % i, 0o644)
    head = fs.get(d).head
    assert fs.pm.read_u64(fs.inode_addr(d) + L.I_LOG_HEAD_TWIN) == 0
    assert L.page_tail_twin(fs.pm.read(head + L.PT_NEXT, 32)) == 0
    fs.unmount()
    flip(path, head + 200)
    rc, out = fsck(capsys, path, "-n", "-f")
    assert rc != 0 and "checksum" in out and "damaged in one copy" not in out


def test_mkfs_says_how_log_pages_are_kept(tmp_path, capsys):
    path = str(tmp_path / "m.img")
    assert mkfs_main(["-s", "16M", path]) == 0
    assert "log pages: two copies" in capsys.readouterr().out
    assert mkfs_main(["-f", "-s", "16M", "--no-log-replicas", path]) == 0
    assert "log pages: one copy" in capsys.readouterr().out


def test_a_version_7_image_mounts_without_log_twins(tmp_path, capsys, caplog):
    """An image of the format before twins (version 7, features 7) is read and
    written as it is, and says so in the mount log; version 7 with the twin
    bit is not a valid superblock."""
    path = _image(tmp_path, L.DEFAULT_FEATURES & ~L.FEATURE_LOG_REPLICA)
    with open(path, "r+b") as f:
        raw = bytearray(f.read(L.SB_SIZE))
        struct.pack_into("<I", raw, 8, 7)
        raw[L.SB_CRC_OFF:] = struct.pack("<I", crc32c(bytes(raw[:L.SB_CRC_OFF])))
        for off in (0, -L.BLOCK):
            f.seek(off, 0 if off == 0 else 2)
            f.write(raw)
    caplog.set_level(logging.INFO)
    want = _workload(path)
    fs = FileSystem.mount(path)
    assert fs.sb.version == 7 and not fs.log_twins
    _check(fs, want)
    fs.unmount()
    assert "log pages have no twins (format version 7)" in caplog.text
    assert fsck(capsys, path, "-n", "-f")[0] == 0
    struct.pack_into("<I", raw, 136, 15)
    raw[L.SB_CRC_OFF:] = struct.pack("<I", crc32c(bytes(raw[:L.SB_CRC_OFF])))
    with pytest.raises(ValueError, match="version 7 superblock with log page twins"):
        L.Superblock.unpack(bytes(raw))


def test_a_scribble_that_keeps_the_checksum_is_undone_from_the_twin(twinned, tmp_path,
                                                                    capsys):
    """A write entry rewritten with a valid checksum but an impossible block (a
    stray write of a whole entry): fsck.pnova keeps the twin's copy, which is a
    good entry, and writes it over the primary, never the other way round."""
    path, want, _pages = twinned
    img = str(tmp_path / "w.img")
    shutil.copy(path, img)
    fs = FileSystem.mount(img, readonly=True)
    ino = fs.lookup(fs.lookup(ROOT, b"d").ino, b"f0").ino
    head, tail, _ = _logs(fs, ino)[0]
    pos, raw = next((head + off, raw) for off, raw in _offsets(fs, ino, head, tail)
                    if raw[0] == L.E_WRITE)
    fs.unmount()
    body = bytearray(raw)
    struct.pack_into("<Q", body, 32, 1)                  # block 1: the region table
    body[4:8] = b"\0\0\0\0"
    with open(img, "r+b") as f:
        f.seek(pos)
        f.write(L._seal(body))
    rc, out = fsck(capsys, img, "-n", "-f")
    assert rc == 4 and "damaged in one copy" in out and "malformed" not in out, out
    rc, out = fsck(capsys, img, "-p", "-f")
    assert "Restore them from the other copy? yes" in out, out
    assert fsck(capsys, img, "-n", "-f")[0] == 0
    with open(img, "rb") as f:
        f.seek(pos)
        assert f.read(len(raw)) == raw
    fs = FileSystem.mount(img)
    _check(fs, want)
    fs.unmount()


def _offsets(fs: FileSystem, ino: int, head: int, tail: int) -> list[tuple[int, bytes]]:
    """(offset from the head page, raw entry) of the entries in a log's first page."""
    out, pos = [], 0
    for raw in plog.walk(fs.pm, head, tail, ino, fs.max_log_pages):
        if pos + len(raw) > L.LOG_DATA:
            break
        out.append((pos, bytes(raw)))
        pos += len(raw)
    return out


def _array_of(path: str, name: str) -> tuple[int, int, int, int]:
    """(inode, array block, twin block, CPU of its local log) of a file with one."""
    fs = FileSystem.mount(path, readonly=True)
    try:
        ino = fs.lookup(ROOT, name.encode()).ino
        inode = fs.get(ino)
        return ino, inode.array, inode.array_twin, next(iter(inode.local))
    finally:
        fs.unmount()


def test_a_per_core_log_array_has_a_twin_in_the_next_cpus_region(twinned):
    """The array of a file written from another CPU has a twin (slot word
    log_array_twin) whose lines are the array's, in the other region."""
    path, _want, _pages = twinned
    ino, arr, twin, cpu = _array_of(path, "big")
    fs = FileSystem.mount(path, readonly=True)
    try:
        assert arr and twin
        region = {r.cpu: (r.data_start, r.end) for r in fs.regions}
        assert not region[0][0] <= twin < region[0][1] or not region[0][0] <= arr < region[0][1]
        assert fs.pm.read(arr * L.BLOCK, L.BLOCK) == fs.pm.read(twin * L.BLOCK, L.BLOCK)
        line = fs.pm.read(arr * L.BLOCK + cpu * L.LA_LINE, 24)
        head, tail, head_twin = struct.unpack("<QQQ", line)
        assert head and tail and head_twin
    finally:
        fs.unmount()


@pytest.mark.parametrize("damage", ["tail moved back", "tail garbage", "poisoned"])
def test_a_damaged_log_array_line_is_read_from_the_twin(twinned, tmp_path, capsys, damage):
    """The array's line of a local log damaged: its tail moved back to an earlier
    entry (which still reads: only the twin shows entries are missing), turned
    to garbage, or in a poisoned sector.  fsck reports it and restores the line
    from the twin; a mount without fsck reads the file exactly."""
    path, want, _pages = twinned
    ino, arr, _twin, cpu = _array_of(path, "big")
    line = arr * L.BLOCK + cpu * L.LA_LINE
    for variant in ("fsck", "mount"):
        img = str(tmp_path / f"{variant}.img")
        shutil.copy(path, img)
        with open(img, "r+b") as f:
            f.seek(line)
            head, tail = struct.unpack("<QQ", f.read(16))
            if damage == "tail moved back":
                f.seek(line + L.LA_TAIL)
                f.write(struct.pack("<Q", head + 64))        # just past its first entry
            elif damage == "tail garbage":
                f.seek(line + L.LA_TAIL)
                f.write(struct.pack("<Q", tail ^ 0x5A5A00))
        if damage == "poisoned":
            save_badblocks(img, {line // 512})
        if variant == "fsck":
            rc, out = fsck(capsys, img, "-n", "-f")
            assert rc == 4 and "damaged in one copy" in out, out
            rc, out = fsck(capsys, img, "-p", "-f")
            assert "Restore them from the other copy? yes" in out, out
            assert fsck(capsys, img, "-n", "-f")[0] == 0
        fs = FileSystem.mount(img)
        _check(fs, want)
        fs.unmount()
        assert fsck(capsys, img, "-n", "-f")[0] == 0, variant


def _two_cpus_on_a_file(tmp_path) -> tuple[str, FileSystem, FileSystem, int]:
    """A fresh image mounted as CPU 0 with CPU 1 attached, and a file of CPU 0's
    (whose writes by CPU 1 go to a per-core local log): (path, cpu 0, cpu 1, ino)."""
    path = str(tmp_path / "w.img")
    format_device(path, 64 << 20, numa_nodes=1, cpus_per_node=2)
    a = FileSystem.mount(path)
    ino = a.create(ROOT, b"shared", 0o644).ino
    assert (ino - 1) % 2 == 0
    return path, a, FileSystem.attach(a, 1), ino


def test_a_commit_between_the_reads_of_a_line_s_two_copies_is_not_damage(tmp_path):
    """A reader in one process reads a per-core log array line's two copies while
    the writer of that line, in another, commits: a writer stores the array's
    copy first, so the reader reads the twin's first; the copies it then sees
    differ only with the twin behind, which is not damage (the reverse order
    would see the twin ahead and take the array's copy for damaged)."""
    path, a, b, ino = _two_cpus_on_a_file(tmp_path)
    b.write(ino, 0, b"b" * 100)
    assert b.get(ino).array_twin
    a.get(ino)
    damage: list[int] = []
    a._log_damage = lambda i, fixes: damage.append(i)
    reads = a._read_lines
    calls = []

    def read_lines(base: int):
        got = reads(base)
        if not calls:                            # between the two copies' reads
            calls.append(base)
            b.write(ino, 0, b"c" * 100)
        return got

    b.write(ino, 8192, b"d" * 10)                # a line moved: the reader reads them
    a._read_lines = read_lines
    assert a.read(ino, 0, 100) == b"c" * 100
    assert calls and not damage
    a.unmount()
    assert fsck_clean(path)


@pytest.mark.parametrize("second_store", ["comes", "never comes"])
def test_a_reader_waits_for_a_writer_between_its_two_stores(tmp_path, monkeypatch,
                                                            second_store):
    """A reader that finds a line's two copies differing because the writer in
    another process is between the two stores of a commit waits for the second
    store, rather than walking both copies' logs whole to settle them (which,
    for a long local log, takes far longer than the writer). Copies that stay
    different (the second store never comes) are settled after the wait, as
    before, and read right."""
    import threading

    from pnova import rebuild
    path, a, b, ino = _two_cpus_on_a_file(tmp_path)
    for i in range(50):
        b.write(ino, i * 100, b"b" * 100)
    assert b.get(ino).array_twin
    assert a.read(ino, 0, 5000) == b"b" * 5000   # a's cache of the file is caught up
    settled = []
    picks = rebuild.pick_line

    def pick(*args, **kw):
        settled.append(args[1])
        return picks(*args, **kw)
    monkeypatch.setattr(rebuild, "pick_line", pick)
    damage: list[int] = []
    a._log_damage = lambda i, fixes: damage.append(i)
    pm = a.pm
    twice = pm.commit_u64_twice
    late = []

    def first_store_only(off: int, off2: int, value: int) -> None:
        pm.store_u64(off, value)                 # the array's copy; the twin's follows
        if second_store == "comes":
            t = threading.Timer(0.003, pm.store_u64, (off2, value))
            t.start()
            late.append(t)
    pm.commit_u64_twice = first_store_only
    try:
        b.write(ino, 0, b"late")
    finally:
        pm.commit_u64_twice = twice
    assert a.read(ino, 0, 8) == b"late" + b"b" * 4
    for t in late:
        t.join()
    if second_store == "comes":
        assert settled == []                     # no walk: the copies came to agree
    else:
        # the twin's copy stayed behind: settled (in each pass of the read),
        # one commit behind, which is not damage
        assert settled and set(settled) == {ino}
    assert not damage
    b.write(ino, 4, b"next")                     # both copies stored again
    assert a.read(ino, 0, 8) == b"latenext"
    a.unmount()
    assert fsck_clean(path)


def test_processes_writing_one_file_never_take_each_other_for_damage(tmp_path):
    """Two processes write and read one file at once (global and per-core logs,
    array lines committed while the other reads them, compactions): neither
    reports damage, and the image they leave checks clean, both copies of every
    log page and array line equal."""
    from helpers import fork_workers
    path = str(tmp_path / "w.img")
    format_device(path, 64 << 20, numa_nodes=1, cpus_per_node=2)
    fs = FileSystem.mount(path)
    ino = fs.create(ROOT, b"shared", 0o644).ino
    fs.write(ino, 0, b"\0" * (16 * L.BLOCK))
    fs.prepare_workers()

    def work(cpu: int) -> None:
        fs.become_worker(cpu)
        damage: list[int] = []
        fs._log_damage = lambda i, fixes: damage.append(i)
        for i in range(1500):
            fs.write(ino, (i % 16) * L.BLOCK, bytes([cpu + 1]) * 512)
            fs.getattr(ino)
            assert not damage, f"damage reported at write {i}"

    fork_workers(fs, 2, work)
    fs.unmount()
    assert fsck_clean(path)


def test_fsck_sets_a_slot_s_head_twin_that_names_the_wrong_page(twinned, tmp_path, capsys):
    """The slot word naming the first log page's twin is used only when the
    page's own tail does not read, so damage to it would stay unseen: fsck
    compares it with the page's tail and sets it back (a safe repair)."""
    path, want, _pages = twinned
    img = str(tmp_path / "h.img")
    shutil.copy(path, img)
    fs = FileSystem.mount(img, readonly=True)
    ino = fs.lookup(ROOT, b"d").ino
    addr = fs.inode_addr(ino)
    good = fs.pm.read_u64(addr + L.I_LOG_HEAD_TWIN)
    fs.unmount()
    for off in (addr, _replica_addr(img, addr)):
        with open(img, "r+b") as f:
            f.seek(off + L.I_LOG_HEAD_TWIN)
            f.write(struct.pack("<Q", good + L.BLOCK))
    rc, out = fsck(capsys, img, "-n", "-f")
    assert rc == 4 and "as the twin of its first log page" in out, out
    rc, out = fsck(capsys, img, "-p", "-f")
    assert "Set the slot's word to the page's? yes" in out, out
    assert fsck(capsys, img, "-n", "-f")[0] == 0
    with open(img, "rb") as f:
        f.seek(addr + L.I_LOG_HEAD_TWIN)
        assert struct.unpack("<Q", f.read(8))[0] == good


def _replica_addr(path: str, addr: int) -> int:
    fs = FileSystem.mount(path, readonly=True)
    try:
        return fs._replica(addr)
    finally:
        fs.unmount()


@needs_fuse
@pytest.mark.mount
@pytest.mark.timeout(120)
def test_through_the_mount_damaged_log_pages_read_from_their_twins(twinned, tmp_path,
                                                                   capsys):
    """As a user meets it: the pnova command mounts an image whose log pages are
    damaged in one copy (a directory's and a file's primary, another file's
    twin); ls and cat through the mount see every name and byte, pnova-scrub
    rewrites what reads left, and the image then checks clean."""
    import subprocess
    import sys
    path, want, pages = twinned
    img = str(tmp_path / "m.img")
    shutil.copy(path, img)
    rng = random.Random(3)
    for twin in (False, False, True):
        spot, _ino = _damage_spot(rng, pages, twin)
        flip(img, spot)
    m = Mount(img, tmp_path / "mnt")
    try:
        m.start()
        for name, data in want.items():
            assert (m.mnt / name).read_bytes() == data, name
        assert sorted(os.listdir(m.mnt / "d")) == sorted(
            n.split("/")[1] for n in want if n.startswith("d/"))
        scrub = subprocess.run([sys.executable, "-m", "pnova.scrub", str(m.mnt)],
                               capture_output=True, text=True, timeout=60)
        assert scrub.returncode == 0, scrub.stdout + scrub.stderr
        m.stop()
    finally:
        m.cleanup()
    assert fsck(capsys, img, "-n", "-f")[0] == 0
