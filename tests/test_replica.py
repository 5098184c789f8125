"""Inode slot replicas (SPEC 5.5, DESIGN 23.1): every store to a slot reaches its
replica, a mount restores a damaged slot from it (or a damaged replica from the
slot), fsck.pnova does the same and reports only the one problem, and
``mkfs.pnova --no-inode-replicas`` really keeps one copy."""
from __future__ import annotations

import errno
import logging
import os
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pnova import layout as L
from pnova.engine import FileSystem
from pnova.errors import FsError
from pnova.mkfs import format_device
from pnova.pmem import PMem, save_badblocks
from pnova_mkfs.cli import main as mkfs_main

from helpers import flip as _flip
from helpers import fork_workers, fsck
from test_mount import Mount, needs_fuse

ROOT = L.ROOT_INO


def _image(tmp_path, features: int = L.DEFAULT_FEATURES, cpus: int = 2) -> str:
    path = str(tmp_path / "r.img")
    format_device(path, 16 << 20, numa_nodes=1, cpus_per_node=cpus, features=features)
    return path


def _tables(path: str) -> list[tuple[bytes, bytes]]:
    """(primary table, replica table) of every CPU, as bytes."""
    fs = FileSystem.mount(path, readonly=True)
    try:
        n = fs.sb.inodes_per_cpu * L.INODE_SIZE
        return [(fs.pm.read(p, n), fs.pm.read(r, n))
                for p, r in zip(fs._itables, fs._rtables)]
    finally:
        fs.unmount()


def _workload(path: str) -> dict[str, bytes]:
    """Creates, writes (global and per-core logs), links, renames, unlinks,
    directories, xattrs, a compaction: every kind of slot update."""
    rng = random.Random(7)
    fs = FileSystem.mount(path)
    want: dict[str, bytes] = {}
    d = fs.mkdir(ROOT, b"d", 0o755).ino
    for i in range(24):
        ino = fs.create(d, b"f%d" % i, 0o644).ino
        data = rng.randbytes(rng.choice([100, 4096, 3 * 4096 + 5]))
        fs.write(ino, 0, data)
        want[f"d/f{i}"] = data
    big = fs.create(ROOT, b"big", 0o644).ino
    # enough overwrites to compact its log (from 256 pages on a disk, DESIGN 12)
    n = max(400, L.LOG_DATA // 64 * (fs._compact_min_pages() + 2)) // 4 * 4
    for k in range(n):
        fs.write(big, (k % 4) * 4096, bytes([k % 251]) * 4096)
    # (on a disk the switch to the compacted log waits for its own msync,
    # which an fsync waits for: DESIGN 24.5)
    fs.fsync(big)
    assert fs.get(big).rewrites >= 1 or len(fs.get(big).log_pages) < 4   # compacted
    want["big"] = b"".join(bytes([k % 251]) * 4096 for k in range(n - 4, n))
    fs.setxattr(big, b"user.k", b"v")
    fs.link(fs.lookup(d, b"f1").ino, ROOT, b"hard")
    want["hard"] = want["d/f1"]
    fs.rename(d, b"f2", ROOT, b"moved")
    want["moved"] = want.pop("d/f2")
    for i in range(3, 24, 3):
        fs.unlink(d, b"f%d" % i)
        del want[f"d/f{i}"]
    fs.mkdir(ROOT, b"gone", 0o755)
    fs.rmdir(ROOT, b"gone")
    fs.unmount()
    fs = FileSystem.mount(path, cpu=1)    # slots of CPU 1's table (replicas in region 0)
    for i in range(6):
        want[f"e{i}"] = b"e%d" % i * 300
        fs.write(fs.create(ROOT, b"e%d" % i, 0o600).ino, 0, want[f"e{i}"])
    fs.unmount()
    return want


def _check(fs: FileSystem, want: dict[str, bytes]) -> None:
    for name, data in want.items():
        ino = ROOT
        for part in name.split("/"):
            ino = fs.lookup(ino, part.encode()).ino
        assert fs.read(ino, 0, 1 << 20) == data, name


def _slot(path: str, name: str) -> tuple[int, int, int]:
    """(inode, slot address, replica address) of a file named from the root."""
    fs = FileSystem.mount(path, readonly=True)
    try:
        ino = ROOT
        for part in name.split("/"):
            ino = fs.lookup(ino, part.encode()).ino
        a = fs.inode_addr(ino)
        return ino, a, fs._replica(a)
    finally:
        fs.unmount()


def test_every_slot_store_reaches_its_replica_in_the_next_cpus_region(tmp_path):
    path = _image(tmp_path)
    _workload(path)
    tables = _tables(path)
    assert all(p == r for p, r in tables)
    assert any(p.count(0) < len(p) for p, _ in tables[1:])     # CPU 1's table is used too
    fs = FileSystem.mount(path, readonly=True)
    try:
        for c, r in enumerate(fs.regions):
            nxt = fs.regions[(c + 1) % len(fs.regions)]
            assert nxt.start <= fs._rtables[c] // L.BLOCK < nxt.bitmap_start
    finally:
        fs.unmount()


def test_slot_stores_of_several_processes_reach_the_replicas(tmp_path):
    path = _image(tmp_path)
    fs = FileSystem.mount(path)
    fs.prepare_workers(2)

    def work(cpu: int) -> None:
        fs.become_worker(cpu)
        d = fs.mkdir(ROOT, b"w%d" % cpu, 0o755).ino
        for i in range(30):
            ino = fs.create(d, b"f%d" % i, 0o644).ino
            fs.write(ino, 0, b"x" * 5000)
            if i % 2:
                fs.unlink(d, b"f%d" % i)

    fork_workers(fs, 2, work)
    fs.unmount()
    assert all(p == r for p, r in _tables(path))


@pytest.mark.parametrize("where", ["line 0", "log head", "log tail", "state live to free",
                                   "poisoned sector"])
def test_a_damaged_slot_is_restored_from_its_replica(tmp_path, capsys, caplog, where):
    path = _image(tmp_path)
    want = _workload(path)
    ino, a, _r = _slot(path, "d/f4")
    if where == "line 0":
        _flip(path, a + 5)
    elif where == "log head":
        _flip(path, a + L.I_LOG_HEAD + 1, 0x40)
    elif where == "log tail":
        _flip(path, a + L.I_LOG_TAIL, 0x08)
    elif where == "state live to free":
        _flip(path, a + L.I_STATE, 0x01)
    else:
        save_badblocks(path, {a // 512})
    rc, out = fsck(capsys, path, "-n", "-f")
    assert rc == 4 and out.count("Restore the slot from its replica? no") >= 1, out
    # -n reads the replica: nothing but the slot(s) is reported
    assert "problem(s) found, 0 fixed" in out and "lost+found" not in out, out
    caplog.set_level(logging.INFO)
    fs = FileSystem.mount(path)
    _check(fs, want)
    fs.unmount()
    assert f"inode {ino}: its slot is damaged" in caplog.text
    rc, out = fsck(capsys, path, "-n", "-f")
    assert rc == 0, out
    assert all(p == r for p, r in _tables(path))


def test_a_damaged_replica_is_rewritten_from_its_slot(tmp_path, capsys, caplog):
    path = _image(tmp_path)
    want = _workload(path)
    ino, _a, r = _slot(path, "moved")
    _flip(path, r + 9)
    rc, out = fsck(capsys, path, "-n", "-f")
    assert rc == 4 and f"inode {ino}: the replica of its slot is damaged" in out, out
    fs = FileSystem.mount(path)
    _check(fs, want)
    fs.unmount()
    assert f"inode {ino}: the replica of its slot is damaged" in caplog.text
    assert all(p == r for p, r in _tables(path))


def test_fsck_restores_a_slot_as_a_safe_repair(tmp_path, capsys):
    path = _image(tmp_path)
    want = _workload(path)
    _ino, a, _r = _slot(path, "d")                  # a directory: everything below it
    _flip(path, a + L.I_LOG_HEAD + 2, 0x10)
    rc, out = fsck(capsys, path, "-p", "-f")
    assert rc == 1 and "Restore the slot from its replica? yes" in out, out
    rc, out = fsck(capsys, path, "-n", "-f")
    assert rc == 0, out
    fs = FileSystem.mount(path, readonly=True)      # no mount repair was needed
    _check(fs, want)
    fs.unmount()


def test_a_flipped_free_slot_does_not_come_back_on_a_clean_image(tmp_path, capsys):
    """An evicted inode's slot keeps its old fields: turning its state word to
    live must not bring it back (its log page is free in the saved bitmap)."""
    path = _image(tmp_path)
    fs = FileSystem.mount(path)
    ino = fs.create(ROOT, b"x", 0o644).ino
    fs.write(ino, 0, b"old")
    fs.unlink(ROOT, b"x")
    a = fs.inode_addr(ino)
    fs.unmount()
    fs = FileSystem.mount(path, readonly=True)
    assert fs.pm.read_u64(a + L.I_STATE) == L.STATE_FREE and fs.pm.read_u64(a + L.I_LOG_HEAD)
    fs.unmount()
    _flip(path, a + L.I_STATE, 0x01)
    fs = FileSystem.mount(path)
    assert fs.pm.read_u64(a + L.I_STATE) == L.STATE_FREE
    with pytest.raises(FsError) as e:
        fs.lookup(ROOT, b"x")
    assert e.value.errno == errno.ENOENT
    fs.unmount()
    rc, out = fsck(capsys, path, "-n", "-f")
    assert rc == 0, out


def test_both_copies_damaged_is_reported_and_costs_that_inode_only(tmp_path, capsys):
    path = _image(tmp_path)
    want = _workload(path)
    ino, a, r = _slot(path, "d/f5")
    _flip(path, a + 3)
    _flip(path, r + 3)
    fs = FileSystem.mount(path)
    with pytest.raises(FsError) as e:
        fs.read(fs.lookup(fs.lookup(ROOT, b"d").ino, b"f5").ino, 0, 10)
    assert e.value.errno == errno.EIO
    _check(fs, {k: v for k, v in want.items() if k != "d/f5"})
    fs.unmount()
    rc, out = fsck(capsys, path, "-n", "-f")
    assert rc == 4 and "inode fields fail their checksum" in out, out


def test_mkfs_option_turns_the_replicas_off(tmp_path, capsys):
    path = str(tmp_path / "n.img")
    assert mkfs_main(["-q", "-s", "16M", "--cpus-per-node", "2", "--no-inode-replicas",
                      path]) == 0
    fs = FileSystem.mount(path, readonly=True)
    assert not fs.sb.inode_replicas and fs._rtables is None
    assert fs.regions[0].bitmap_start == fs.regions[0].journal_block + 1
    fs.unmount()
    _workload(path)
    fs = FileSystem.mount(path, readonly=True)
    a = fs.inode_addr(fs.lookup(fs.lookup(ROOT, b"d").ino, b"f4").ino)
    fs.unmount()
    _flip(path, a + 5)
    fs = FileSystem.mount(path)
    with pytest.raises(FsError) as e:                # one copy: detected, not repaired
        fs.read(fs.lookup(fs.lookup(ROOT, b"d").ino, b"f4").ino, 0, 10)
    assert e.value.errno == errno.EIO
    fs.unmount()
    capsys.readouterr()
    assert mkfs_main(["-f", "-s", "16M", "--cpus-per-node", "2", path]) == 0
    assert "inode slots: two copies" in capsys.readouterr().out


def test_a_version_6_image_mounts_without_replicas(tmp_path, capsys, caplog):
    """An image of the format before replicas (version 6, features 3) is read and
    written as it is, and says so in the mount log."""
    import struct
    from crc32c import crc32c
    path = _image(tmp_path, L.FEATURE_DATA_CSUM | L.FEATURE_DATA_PARITY)
    with open(path, "r+b") as f:
        raw = bytearray(f.read(L.SB_SIZE))
        struct.pack_into("<I", raw, 8, 6)
        raw[L.SB_CRC_OFF:] = struct.pack("<I", crc32c(bytes(raw[:L.SB_CRC_OFF])))
        for off in (0, -L.BLOCK):
            f.seek(off, 0 if off == 0 else 2)
            f.write(raw)
    caplog.set_level(logging.INFO)
    want = _workload(path)
    fs = FileSystem.mount(path)
    assert fs.sb.version == 6 and fs._rtables is None
    _check(fs, want)
    fs.unmount()
    assert "inode slots have no replicas (format version 6)" in caplog.text
    assert fsck(capsys, path, "-n", "-f")[0] == 0
    # version 6 with the replica bit is not a valid superblock
    with open(path, "r+b") as f:
        raw = bytearray(f.read(L.SB_SIZE))
    struct.pack_into("<I", raw, 136, 7)
    raw[L.SB_CRC_OFF:] = struct.pack("<I", crc32c(bytes(raw[:L.SB_CRC_OFF])))
    with pytest.raises(ValueError, match="version 6 superblock with inode replicas"):
        L.Superblock.unpack(bytes(raw))


def test_a_poisoned_sector_of_slots_is_rewritten_whole_from_the_replicas(tmp_path, capsys):
    """Four slots share a 512-byte sector: the mount rewrites the sector from
    their replicas, which clears the poison, and every file reads back."""
    path = _image(tmp_path)
    want = _workload(path)
    _ino, a, _r = _slot(path, "e2")
    save_badblocks(path, {a // 512})
    fs = FileSystem.mount(path)
    _check(fs, want)
    assert not fs.pm.poisoned(a, L.INODE_SIZE)
    fs.unmount()
    assert fsck(capsys, path, "-n", "-f")[0] == 0
    pm = PMem(path, readonly=True)
    assert not pm.poison
    pm.close()


def test_a_scrub_restores_a_slot_damaged_while_mounted(tmp_path, capsys, caplog):
    """Damage that arrives while the image is mounted: the scrub's look at the
    inode (pnova-scrub) restores the slot from its replica under the inode's
    lock, and a damaged replica from the slot."""
    path = _image(tmp_path)
    want = _workload(path)
    fs = FileSystem.mount(path)
    try:
        d = fs.lookup(ROOT, b"d").ino
        f = fs.lookup(d, b"f4").ino
        a = fs.inode_addr(f)
        fs.pm.store_u64(a + L.I_LOG_HEAD, fs.pm.read_u64(a + L.I_LOG_HEAD) ^ 1 << 40)
        counts = fs.scrub(f)
        assert counts.slots == 1 and counts.meta == 0, counts
        assert f"inode {f}: its slot is damaged" in caplog.text
        r = fs._replica(fs.inode_addr(d))
        fs.pm.store_u64(r + L.I_STATE, 0xBAD)
        assert fs.scrub(d).slots == 0
        assert f"inode {d}: the replica of its slot is damaged" in caplog.text
        _check(fs, want)
        assert fs.scrub(f).slots == 0                     # nothing left to restore
    finally:
        fs.unmount()
    assert all(p == r for p, r in _tables(path))
    assert fsck(capsys, path, "-n", "-f")[0] == 0


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10 ** 6), nbytes=st.integers(1, 8), replica=st.booleans())
def test_flips_in_one_copy_of_a_slot_always_read_back_exactly(tmp_path_factory, seed, nbytes,
                                                             replica):
    """1 to 8 random bytes flipped in one copy of a live slot (the primary or the
    replica): the next mount serves every file exactly, fsck -n beforehand
    reports the one damaged copy, and the copies are equal again after."""
    import io

    from pnova.fsck import Checker
    tmp = tmp_path_factory.mktemp("flip")
    path = _image(tmp)
    want = _workload(path)
    rng = random.Random(seed)
    name = rng.choice(sorted(want))
    _ino, a, r = _slot(path, name)
    base = r if replica else a
    for _ in range(nbytes):
        _flip(path, base + rng.randrange(L.INODE_SIZE), rng.randrange(1, 256))
    out = io.StringIO()
    assert Checker(path, force=True, out=out).run() == 4, out.getvalue()
    assert "problem(s) found" in out.getvalue() and "lost+found" not in out.getvalue()
    fs = FileSystem.mount(path)
    _check(fs, want)
    fs.unmount()
    assert all(p == q for p, q in _tables(path))


@pytest.mark.mount
@pytest.mark.timeout(120)
@needs_fuse
def test_the_pnova_command_restores_a_damaged_slot_at_mount(tmp_path, capsys):
    """Through the mount a user runs: a file whose slot was damaged while the
    image was unmounted reads back exactly with cat-like reads, the mount log
    says what was restored, and fsck is clean afterwards."""
    path = _image(tmp_path)
    want = _workload(path)
    ino, a, _r = _slot(path, "d/f5")
    _flip(path, a + 7)                                   # line 0 of its slot
    said = f"inode {ino}: its slot is damaged (inode fields fail their checksum); " \
        "restored from the replica"
    m = Mount(path, tmp_path / "mnt")
    try:
        r = m.run()
        assert r.returncode == 0 and os.path.ismount(m.mnt), r.stderr
        assert said in r.stderr                         # on the terminal, as in the log
        for name, data in want.items():
            assert (m.mnt / name).read_bytes() == data, name
        m.stop()
    finally:
        m.cleanup()
    with open(m.log) as log:
        assert said in log.read()
    assert fsck(capsys, path, "-n", "-f")[0] == 0


def test_every_journal_transaction_leaves_a_twin_of_its_records(tmp_path):
    """Each CPU's lite-journal records are stored a second time, in the second
    half of the next CPU's journal block, before the fence that orders them
    (SPEC 8.1); without inode replicas there is no twin."""
    path = _image(tmp_path)
    fs = FileSystem.mount(path, cpu=1)
    d = fs.mkdir(ROOT, b"d", 0o755).ino
    fs.rename(ROOT, b"d", ROOT, b"e")                    # a transaction of CPU 1
    journals = fs.regions[1].journal_block, fs.regions[0].journal_block
    fs.unmount()
    with open(path, "rb") as f:
        f.seek(journals[0] * L.BLOCK + L.J_RECORDS)
        records = f.read(4 * L.J_RECORD)
        f.seek(journals[1] * L.BLOCK + L.J_TWIN)
        twin = f.read(4 * L.J_RECORD)
    assert records.strip(b"\0") and twin == records
    assert d
    plain = str(tmp_path / "plain.img")
    assert mkfs_main(["-q", "--size", "8M", "--cpus-per-node", "2", "--no-inode-replicas",
                      plain]) == 0
    fs = FileSystem.mount(plain)
    try:
        assert all(j.twin is None for j in fs.journals)
    finally:
        fs.unmount()


@needs_fuse
@pytest.mark.mount
@pytest.mark.timeout(120)
def test_through_the_mount_every_serving_process_leaves_journal_twins(tmp_path):
    """Renames through the pnova command, served by one process per CPU: every
    CPU whose journal held a transaction has the twin of its records in the
    next CPU's journal block after the unmount."""
    path = _image(tmp_path)
    m = Mount(path, tmp_path / "mnt")
    try:
        m.start()
        for i in range(20):
            (m.mnt / f"a{i}").write_bytes(b"x")
            os.rename(m.mnt / f"a{i}", m.mnt / f"b{i}")
        m.stop()
    finally:
        m.cleanup()
    fs = FileSystem.mount(path, readonly=True)
    try:
        used = 0
        for j in fs.journals:
            records = fs.pm.read(j.base + L.J_RECORDS, 4 * L.J_RECORD)
            if records.strip(b"\0"):
                used += 1
                assert fs.pm.read(j.twin, 4 * L.J_RECORD) == records
        assert used >= 1
    finally:
        fs.unmount()


def test_a_slot_damaged_while_mounted_is_read_from_its_replica(tmp_path, caplog):
    """Damage to slots no cache holds yet (line 0, a state word, a log head):
    reads take the replica, the files read back exactly, and the slots are
    restored from their replicas after the operation.  A read-only mount,
    started on the damaged image (its mount repairs nothing), reads the
    replicas too and writes nothing."""
    import struct
    path = _image(tmp_path)
    want = _workload(path)
    names = [b"f4", b"f5", b"f7"]
    fs = FileSystem.mount(path, readonly=True)
    d = fs.lookup(ROOT, b"d").ino
    inos = [fs.lookup(d, n).ino for n in names]
    a = [fs.inode_addr(i) for i in inos]
    before = [fs.pm.read(x, L.INODE_SIZE) for x in a]
    fs.unmount()
    damage = [(a[0] + 5, bytes([before[0][5] ^ 0xFF])),
              (a[1] + L.I_STATE, struct.pack("<Q", 0xBAD)),
              (a[2] + L.I_LOG_HEAD, struct.pack("<Q", struct.unpack_from(
                  "<Q", before[2], L.I_LOG_HEAD)[0] ^ 1 << 40))]

    def check(fs: FileSystem) -> None:
        for n, i in zip(names, inos):
            assert fs.read(i, 0, 1 << 20) == want["d/" + n.decode()], n
        assert "its slot does not read" in caplog.text

    with open(path, "r+b") as f:                        # before a read-only mount
        for off, raw in damage:
            f.seek(off)
            f.write(raw)
    fs = FileSystem.mount(path, readonly=True)
    try:
        check(fs)
        assert [fs.pm.read(x, L.INODE_SIZE) for x in a] != before
    finally:
        fs.unmount()
    with open(path, "r+b") as f:                        # undone
        for x, b in zip(a, before):
            f.seek(x)
            f.write(b)
    caplog.clear()
    fs = FileSystem.mount(path)                         # while mounted
    try:
        for off, raw in damage:
            fs.pm.store(off, raw)
        check(fs)
        fs.create(ROOT, b"after", 0o644)                  # the repairs follow an operation
        assert [fs.pm.read(x, L.INODE_SIZE) for x in a] == before
    finally:
        fs.unmount()
    assert all(p == r for p, r in _tables(path))
