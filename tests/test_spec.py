"""Behaviour that docs/SPEC.md states for readers and writers, section by section."""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import stat
import struct

import numpy as np
import pytest

from pnova import layout as L
from pnova import log as plog
from pnova.engine import FileSystem, read_regions, read_superblock, write_superblock
from pnova.errors import CorruptImage
from pnova.mkfs import format_device

from helpers import fsck
from pnova.pmem import PMem, TrackedPMem

ROOT = 1
MiB = 1 << 20


def digest(path: str) -> bytes:
    with open(path, "rb") as f:
        return hashlib.sha1(f.read()).digest()


def fill(path: str) -> dict[str, int]:
    fs = FileSystem.mount(path)
    f = fs.create(ROOT, b"f", 0o644).ino
    fs.write(f, 0, b"hello" * 2000)
    d = fs.mkdir(ROOT, b"d", 0o755).ino
    fs.unmount()
    return {"f": f, "d": d}


def append_zeros(path: str, n: int) -> None:
    with open(path, "ab") as f:
        f.write(bytes(n))


def sb_of(path: str) -> L.Superblock:
    pm = PMem(path, readonly=True)
    try:
        return read_superblock(pm)[0]
    finally:
        pm.close()


def slot(pm: PMem, sb: L.Superblock, ino: int) -> int:
    regions = L.plan_regions(sb.total_blocks, sb.numa_nodes, sb.cpus_per_node,
                             sb.inodes_per_cpu)
    n = sb.ncpus
    return regions[(ino - 1) % n].itable_start * L.BLOCK + (ino - 1) // n * L.INODE_SIZE


def slot_copies(pm: PMem, sb: L.Superblock, ino: int) -> list[int]:
    """The slot of ``ino`` and its replica (SPEC 5.5), where the image has one."""
    regions = L.plan_regions(sb.total_blocks, sb.numa_nodes, sb.cpus_per_node,
                             sb.inodes_per_cpu, sb.features)
    a = slot(pm, sb, ino)
    twin = L.replica_of(regions, sb.inodes_per_cpu, a)
    return [a] if twin is None else [a, twin]


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


# ------------------------------------------------------------------ 13.1: the file's size
def test_longer_file_is_valid_and_its_tail_unused(img, capsys, caplog):
    ino = fill(img)
    size = 8 * MiB
    append_zeros(img, MiB)                               # truncate -s +1M
    caplog.set_level(logging.WARNING, logger="pnova")
    fs = FileSystem.mount(img)
    assert [w for w in warnings_of(caplog) if "longer" in w] == \
        [f"{img}: the file is {MiB} bytes longer than its filesystem; bytes "
         f"{size}..{size + MiB - 1} are not used"]
    assert fs.read(ino["f"], 0, 10) == b"hellohello"
    g = fs.create(ROOT, b"g", 0o644).ino
    fs.write(g, 0, b"new" * 3000)
    fs.unmount()
    with open(img, "rb") as f:
        raw = f.read()
    assert len(raw) == size + MiB
    assert raw[size:] == bytes(MiB)                      # the tail was not touched
    assert raw[size - L.BLOCK:size - L.BLOCK + L.SB_SIZE] == raw[:L.SB_SIZE]   # replica at T-1
    ro = FileSystem.mount(img, readonly=True)
    assert ro.read(g, 0, 6) == b"newnew"
    ro.unmount()

    note = (f"{img}: the file is {MiB} bytes longer than its filesystem (2048 blocks); "
            f"bytes {size}..{size + MiB - 1} are not used")
    for opts in (["-n"], ["-n", "-f"], ["-p"], ["-p", "-f"]):
        rc, out = fsck(capsys, img, *opts)
        assert rc == 0 and note in out and "Trim" not in out, out
        assert os.path.getsize(img) == size + MiB
    rc, out = fsck(capsys, img, "-y", "-f")
    assert rc == 0 and note in out and f"Trim the file to {size} bytes? yes" in out, out
    assert "no problems found" in out
    assert os.path.getsize(img) == size
    rc, out = fsck(capsys, img, "-n", "-f")
    assert rc == 0 and "bytes longer than its filesystem" not in out, out
    fs = FileSystem.mount(img)
    assert fs.read(g, 0, 6) == b"newnew" and fs.mount_path == "clean"
    fs.unmount()


def test_longer_file_bounds_are_the_device(img, capsys):
    """A log pointer into the unused tail is outside the device (SPEC 10, rule 2)."""
    ino = fill(img)
    append_zeros(img, MiB)
    pm = PMem(img)
    sb = read_superblock(pm)[0]
    page = sb.total_blocks + 3                           # a block of the tail
    plog.init_page(pm, page, ino["f"])                   # a well-formed page there
    for a in slot_copies(pm, sb, ino["f"]):              # (both copies: 5.5 aside)
        pm.store_u64(a + L.I_LOG_HEAD, page * L.BLOCK)
        pm.store_u64(a + L.I_LOG_TAIL, page * L.BLOCK)
    sb.clean = 0
    write_superblock(pm, sb)
    pm.close()
    with pytest.raises(CorruptImage, match="is not a page inside the device"):
        FileSystem.mount(img)
    rc, out = fsck(capsys, img, "-n")
    assert rc == 4 and f"log tail {page * L.BLOCK:#x} is not a valid log position; the " \
        "head page is unusable too" in out, out


def test_shorter_file_is_refused(img, capsys):
    fill(img)
    os.truncate(img, 8 * MiB - L.BLOCK)                  # the replica's block is gone
    before = digest(img)
    want = (f"{img}: the file is shorter than its filesystem ({8 * MiB - L.BLOCK} bytes; "
            f"the superblock describes 2048 blocks, {8 * MiB} bytes): its end is missing")
    for ro in (False, True):
        with pytest.raises(CorruptImage) as ei:
            FileSystem.mount(img, readonly=ro)
        assert str(ei.value) == want
    for opts in (["-n"], ["-y", "-f"], ["-p"]):
        rc, out = fsck(capsys, img, *opts)
        assert rc == 8, out
        assert out.count("\n") == 1 and want in out and "cannot be rebuilt" in out, out
    assert digest(img) == before


@pytest.mark.parametrize("damage", ["crc", "total_blocks", "zeroed"])
def test_longer_file_with_damaged_primary(img, capsys, caplog, tmp_path, damage):
    """The replica is at block T-1, not at the file's end: 13.1 finds it."""
    ino = fill(img)
    append_zeros(img, MiB)
    with open(img, "r+b") as f:
        if damage == "crc":
            f.seek(40)                                   # uuid: caught by the CRC
            f.write(b"\xff")
        elif damage == "total_blocks":
            f.seek(20)                                   # the high half of total_blocks
            f.write(b"\x01")
        else:
            f.write(bytes(L.BLOCK))                      # dd over block 0
    block01 = open(img, "rb").read(2 * L.BLOCK)
    # the file's last block, then T-1 (from block 0, or from the region table)
    assert L.replica_blocks(block01[:L.SB_SIZE], block01[L.BLOCK:], 9 * MiB) == [2303, 2047]
    copy = str(tmp_path / "copy.img")
    shutil.copyfile(img, copy)
    caplog.set_level(logging.WARNING, logger="pnova")
    fs = FileSystem.mount(copy, readonly=True)
    assert fs.read(ino["f"], 0, 5) == b"hello"
    fs.unmount()
    assert any("using the replica" in w for w in warnings_of(caplog))
    rc, out = fsck(capsys, img, "-n", "-f")
    assert rc == 4 and "primary superblock (block 0) is damaged" in out and \
        "the replica is intact" in out, out
    rc, out = fsck(capsys, img, "-y", "-f")
    assert rc == 1 and "Rewrite the primary from the replica? yes" in out, out
    assert os.path.getsize(img) == 8 * MiB               # trimmed once nothing was left
    rc, out = fsck(capsys, img, "-n", "-f")
    assert rc == 0 and "no problems found" in out, out
    fs = FileSystem.mount(img)
    assert fs.read(ino["f"], 0, 5) == b"hello"
    fs.unmount()


def test_replica_candidates_in_order():
    """SPEC 13.1 step 2: last block, the damaged primary's T-1, the table's end."""
    sb = L.Superblock(total_blocks=1000, numa_nodes=1, cpus_per_node=2, inodes_per_cpu=64,
                      uuid=bytes(16), mkfs_time_ns=0)
    table = b"".join(r.pack() for r in L.plan_regions(1000, 1, 2, 64)).ljust(L.BLOCK, b"\0")
    raw = bytearray(sb.pack())
    raw[100] ^= 1                                        # CRC now fails, magic intact
    assert L.replica_blocks(bytes(raw), table, 1000 * L.BLOCK) == [999]
    assert L.replica_blocks(bytes(raw), table, 1200 * L.BLOCK + 17) == [1199, 999]
    struct.pack_into("<Q", raw, 16, 1100)                # a damaged total_blocks
    assert L.replica_blocks(bytes(raw), table, 1200 * L.BLOCK) == [1199, 1099, 999]
    assert L.replica_blocks(bytes(L.SB_SIZE), table, 1200 * L.BLOCK) == [1199, 999]
    broken = bytearray(table)
    broken[L.REGION_SIZE + 10] ^= 1                      # CPU 1's descriptor: CPU 0's end
    assert L.replica_blocks(bytes(L.SB_SIZE), bytes(broken), 1200 * L.BLOCK) == \
        [1199, L.plan_regions(1000, 1, 2, 64)[0].end]
    assert L.replica_blocks(bytes(L.SB_SIZE), bytes(L.BLOCK), 1200 * L.BLOCK) == [1199]
    assert L.replica_blocks(bytes(raw), table, 900 * L.BLOCK) == [899]   # beyond the file


def test_interrupted_reformat_of_a_grown_file_leaves_no_way_to_the_old_replica(
        tmp_path, monkeypatch):
    """The old replica lies inside the new, larger device; the old region table
    would lead to it, so the formatter invalidates the table with the superblocks."""
    import pnova.mkfs as mkfs

    path = str(tmp_path / "g.img")
    mkfs.format_device(path, 8 * MiB, numa_nodes=1, cpus_per_node=2)
    held: dict[str, TrackedPMem] = {}

    class PowerCut(Exception):
        pass

    class Tracked(TrackedPMem):
        def __init__(self, *a, **kw) -> None:
            super().__init__(*a, **kw)
            held["pm"] = self
            fences = [0]

            def cut(_pm) -> None:
                fences[0] += 1
                if fences[0] == 2:                       # only the first fence completed
                    raise PowerCut

            self.on_fence = cut

    monkeypatch.setattr(mkfs, "PMem", Tracked)
    with pytest.raises(PowerCut):
        mkfs.format_device(path, 16 * MiB, numa_nodes=1, cpus_per_node=1)
    durable = held["pm"].durable.tobytes()
    with open(path, "r+b") as f:
        f.write(durable)
    assert len(durable) == 16 * MiB
    assert durable[2047 * L.BLOCK:2047 * L.BLOCK + 8] == L.SB_MAGIC   # the old replica
    with pytest.raises(CorruptImage, match="not a pnova filesystem"):
        FileSystem.mount(path)


# ------------------------------------------------------------------ 3: clean values
def test_clean_value_other_than_0_or_1_means_not_clean(img, capsys, caplog, tmp_path):
    ino = fill(img)
    pm = PMem(img)
    sb = read_superblock(pm)[0]
    sb.clean = 2
    write_superblock(pm, sb)
    pm.close()
    caplog.set_level(logging.WARNING, logger="pnova")
    with pytest.raises(CorruptImage, match="not cleanly unmounted; recovery needs a read-write"):
        FileSystem.mount(img, readonly=True)
    assert f"{img}: the superblock's clean field holds 2 (neither 0 nor 1); the image is " \
        "treated as not cleanly unmounted" in warnings_of(caplog)
    copy = str(tmp_path / "copy.img")
    shutil.copyfile(img, copy)
    fs = FileSystem.mount(copy)
    assert fs.mount_path == "recovery" and fs.read(ino["f"], 0, 5) == b"hello"
    fs.unmount()
    assert sb_of(copy).clean == 1

    rc, out = fsck(capsys, img, "-n")                    # not taken for clean: full check
    assert rc == 4 and "superblock's clean field holds 2 (neither 0 nor 1)" in out, out
    assert "saved bitmaps are not checked" not in out and "clean," not in out
    rc, out = fsck(capsys, img, "-p")
    assert rc == 1 and "Rebuild the saved state from the logs? yes" in out, out
    assert sb_of(img).clean == 1
    rc, out = fsck(capsys, img, "-n", "-f")
    assert rc == 0 and "no problems found" in out, out


# ------------------------------------------------------------------ 13.3: read-only readers
def test_dirty_image_read_only_refused_but_checkable_in_memory(img, capsys):
    ino = fill(img)
    fs = FileSystem.mount(img)
    o = fs.create(ROOT, b"open", 0o644).ino
    fs.ref(o)                                            # held open ...
    fs.unlink(ROOT, b"open")                             # ... so an orphan
    fs.rename(ROOT, b"f", ROOT, b"f2")
    fs.pm.close()                                        # crash: clean = 0
    fs.pm = None
    before = digest(img)
    with pytest.raises(CorruptImage) as ei:
        FileSystem.mount(img, readonly=True)
    assert str(ei.value) == f"{img}: not cleanly unmounted; recovery needs a read-write mount"
    rc, out = fsck(capsys, img, "-n")                    # recovery in memory, no writes
    assert rc == 0 and "no problems found" in out, out
    assert digest(img) == before
    fs = FileSystem.mount(img)
    assert fs.mount_path == "recovery" and fs.lookup(ROOT, b"f2").ino == ino["f"]
    fs.unmount()
    pm = PMem(img, readonly=True)
    assert pm.read_u64(slot(pm, sb_of(img), o) + L.I_STATE) == L.STATE_FREE   # step 6
    pm.close()


# ------------------------------------------------------------------ 12.1, 12.10: orphans
def _last_entry(pm: PMem, sb: L.Superblock, ino: int) -> tuple:
    a = slot(pm, sb, ino)
    raws = list(plog.walk(pm, pm.read_u64(a + L.I_LOG_HEAD), pm.read_u64(a + L.I_LOG_TAIL),
                          ino, sb.total_blocks))
    return L.decode_entry(raws[-1])


def _names(pm: PMem, sb: L.Superblock) -> set[int]:
    """Every inode named by a dentry of a live directory (the '..' entries aside)."""
    named: set[int] = set()
    for ino in range(1, sb.ncpus * sb.inodes_per_cpu + 1):
        a = slot(pm, sb, ino)
        if pm.read_u64(a + L.I_STATE) != L.STATE_LIVE:
            continue
        if not stat.S_ISDIR(L.InodeStatic.unpack(pm.read(a, 64)).mode):
            continue
        names: dict[bytes, int] = {}
        for raw in plog.walk(pm, pm.read_u64(a + L.I_LOG_HEAD), pm.read_u64(a + L.I_LOG_TAIL),
                             ino, sb.total_blocks):
            e = L.decode_entry(raw)
            if e[0] == L.E_DENTRY and e[3] != L.DOTDOT:
                names.pop(e[3], None)
                if e[2] == L.D_ADD:
                    names[e[3]] = e[4]
        named |= set(names.values())
    return named


def _check_orphan_dir(path: str, d: int, capsys) -> None:
    sb = sb_of(path)
    assert sb.clean == 0
    pm = PMem(path, readonly=True)
    try:
        assert pm.read_u64(slot(pm, sb, d) + L.I_STATE) == L.STATE_LIVE
        e = _last_entry(pm, sb, d)
        assert e[0] == L.E_LINK and e[2] == 0            # rmdir logged nlink 0
        assert d not in _names(pm, sb)                   # and no dentry names it
    finally:
        pm.close()
    rc, out = fsck(capsys, path, "-n")                   # exempt from 12.10: no problem
    assert rc == 0 and "no problems found" in out, out
    fs = FileSystem.mount(path)                          # recovery frees it
    fs.unmount()
    pm = PMem(path, readonly=True)
    assert pm.read_u64(slot(pm, sb, d) + L.I_STATE) == L.STATE_FREE
    pm.close()
    rc, out = fsck(capsys, path, "-n", "-f")
    assert rc == 0 and "no problems found" in out, out


def test_rmdir_of_an_open_directory_leaves_an_orphan_directory(img, capsys):
    ino = fill(img)
    fs = FileSystem.mount(img)
    sub = fs.mkdir(ino["d"], b"sub", 0o755).ino
    fs.ref(sub)                                          # a process has it open
    fs.rmdir(ino["d"], b"sub")
    assert fs.getattr(ino["d"]).nlink == 2
    fs.pm.close()                                        # crash before it is released
    fs.pm = None
    _check_orphan_dir(img, sub, capsys)


def test_crash_state_of_rmdir_is_an_orphan_directory(tmp_path, capsys):
    """pnova-crashtest state seq1:27:4:0 (rmdir /A/C): the journal committed, the
    directory is not freed yet."""
    from pnova import crashtest as ct

    path = str(tmp_path / "c.img")
    res = ct.run_case("seq1", 0, 27, 2, only=(4, 0), keep=path)
    assert res.checked == 1 and not res.failures
    assert ct.cases_for("seq1", 0)[27][1] == [("rmdir", "/A/C")]
    _check_orphan_dir(path, 6, capsys)


# ------------------------------------------------------------------ 8: journals
def _open_txn(pm: PMem, region: L.Region, recs: list[tuple[int, int]]) -> None:
    raw = b"".join(struct.pack("<QQ", a, v) for a, v in recs)
    jb = region.journal_block * L.BLOCK
    pm.store(jb + L.J_RECORDS, raw)
    pm.store_u64(jb, L.journal_word(len(recs), raw))
    pm.persist(jb, L.BLOCK)


def test_journals_roll_back_in_cpu_order(img, capsys):
    """Two open transactions naming one word (no writer leaves that): the
    record of the highest-numbered CPU decides, for the mount and for fsck."""
    fs = FileSystem.mount(img)
    fs.create(ROOT, b"a", 0o644)
    mid = fs.get(ROOT).tail
    b = fs.create(ROOT, b"b", 0o644).ino
    end = fs.get(ROOT).tail
    fs.unmount()
    pm = PMem(img)
    sb = read_superblock(pm)[0]
    regions = read_regions(pm, sb)
    tail = slot(pm, sb, ROOT) + L.I_LOG_TAIL
    _open_txn(pm, regions[0], [(tail, mid)])             # CPU 0: without 'b'
    _open_txn(pm, regions[1], [(tail, end)])             # CPU 1: with 'b'
    sb.clean = 0
    write_superblock(pm, sb)
    pm.close()
    rc, out = fsck(capsys, img, "-n")
    assert rc == 0 and "no problems found" in out, out  # 'b' is named: CPU 1 won
    fs = FileSystem.mount(img)
    assert fs.lookup(ROOT, b"b").ino == b
    fs.unmount()


def test_unused_slots_are_not_inside_the_inode_table(tmp_path, capsys):
    path = str(tmp_path / "s.img")
    format_device(path, 8 * MiB, numa_nodes=1, cpus_per_node=1, inodes_per_cpu=40)
    pm = PMem(path)
    sb = read_superblock(pm)[0]
    region = read_regions(pm, sb)[0]
    assert region.itable_blocks == 2                     # slots 40..63 of block 2 unused
    base = region.itable_start * L.BLOCK
    sb.clean = 0
    write_superblock(pm, sb)
    _open_txn(pm, region, [(base + 39 * L.INODE_SIZE + L.I_LOG_TAIL, 0)])   # the last slot
    pm.close()
    shutil.copyfile(path, path + ".last")
    FileSystem.mount(path + ".last").unmount()
    pm = PMem(path)
    _open_txn(pm, region, [(base + 40 * L.INODE_SIZE + L.I_LOG_TAIL, 0)])   # past it
    pm.close()
    with pytest.raises(CorruptImage, match="lite journal points outside the inode tables"):
        FileSystem.mount(path)
    rc, out = fsck(capsys, path, "-n")
    assert rc == 4 and "is damaged (points outside the inode tables)" in out, out


# ------------------------------------------------------------------ 3: the dynamic fields
def test_mount_and_unmount_change_only_the_dynamic_fields(img):
    pm = PMem(img)
    sb = read_superblock(pm)[0]
    sb.flags = 0x5A5A                                    # reserved: to see that it is kept
    write_superblock(pm, sb)
    pm.close()
    with open(img, "rb") as f:
        before = f.read(L.SB_SIZE)
    fs = FileSystem.mount(img)
    with open(img, "rb") as f:
        mounted = f.read(L.SB_SIZE)
    fs.create(ROOT, b"f", 0o644)
    fs.unmount()
    with open(img, "rb") as f:
        after = f.read(L.SB_SIZE)
        f.seek((sb.total_blocks - 1) * L.BLOCK)
        replica = f.read(L.SB_SIZE)
    dynamic = set(range(64, 68)) | set(range(72, 104)) | set(range(252, 256))
    for raw in (mounted, after):
        assert [i for i in range(L.SB_SIZE) if raw[i] != before[i] and i not in dynamic] == []
    assert replica == after
    m, a = L.Superblock.unpack(mounted), L.Superblock.unpack(after)
    assert (m.clean, m.mount_count, m.flags) == (0, 1, 0x5A5A) and m.last_mount_ns > 0
    assert (a.clean, a.flags) == (1, 0x5A5A) and a.next_seq > sb.next_seq
    assert a.last_unmount_ns >= a.last_mount_ns == m.last_mount_ns


# ------------------------------------------------------------------ 16: the smallest device
def _tiny(path: str, total: int) -> None:
    """A freshly formatted image of ``total`` blocks, one CPU, 32 inodes (the
    formatter itself insists on 64 blocks)."""
    sb = L.Superblock(total_blocks=total, numa_nodes=1, cpus_per_node=1, inodes_per_cpu=32,
                      uuid=bytes(range(16)), mkfs_time_ns=1, clean=1, next_seq=3)
    pm = PMem(path, size=total * L.BLOCK, create=True)
    try:
        try:
            (r,) = L.plan_regions(total, 1, 1, 32)
        except ValueError:
            write_superblock(pm, sb)
            return
        pm.store(L.BLOCK, r.pack())
        plog.init_page(pm, r.data_start, ROOT)
        a = r.itable_start * L.BLOCK
        pm.store(a, L.InodeStatic(stat.S_IFDIR | 0o755, 0, 0, 0, 0, 1, 1, 1).pack())
        dotdot = L.dentry_entry(2, L.D_ADD, L.DOTDOT, ROOT, stat.S_IFDIR >> 12, 1)
        pm.store(r.data_start * L.BLOCK, dotdot)
        pm.store_u64(a + L.I_LOG_HEAD, r.data_start * L.BLOCK)
        pm.store_u64(a + L.I_LOG_TAIL, r.data_start * L.BLOCK + len(dotdot))
        pm.store_u64(a + L.I_STATE, L.STATE_LIVE)
        bits = np.zeros(r.data_blocks, dtype=bool)
        bits[0] = True
        pm.store(r.bitmap_start * L.BLOCK, np.packbits(bits, bitorder="little").tobytes())
        write_superblock(pm, sb)
    finally:
        pm.close()


def test_smallest_device_is_set_by_the_geometry(tmp_path, capsys):
    ok, small = str(tmp_path / "22.img"), str(tmp_path / "21.img")
    _tiny(ok, 22)
    _tiny(small, 21)
    fs = FileSystem.mount(ok)
    assert fs.alloc.regions[0].region.data_blocks == 16
    f = fs.create(ROOT, b"f", 0o644).ino
    fs.write(f, 0, b"x" * 5000)
    fs.unmount()
    rc, out = fsck(capsys, ok, "-n", "-f")
    assert rc == 0 and "no problems found" in out, out
    with pytest.raises(CorruptImage, match="superblock geometry is impossible"):
        FileSystem.mount(small)
    rc, out = fsck(capsys, small, "-n")
    assert rc == 8 and "superblock geometry is impossible" in out, out


# ------------------------------------------------------------------ 5.2: rdev
def test_rdev_is_linux_st_rdev_encoding(img):
    def spec_encode(major: int, minor: int) -> int:
        return (minor & 0xFF) | ((major & 0xFFF) << 8) | ((minor & 0xFFFFFF00) << 12) | \
            ((major & 0xFFFFF000) << 32)

    for major, minor in ((8, 3), (1, 3), (259, 0x12345), (0x12345, 0x6789A), (4095, 0xFFFFF)):
        r = spec_encode(major, minor)
        assert r == os.makedev(major, minor)
        assert (((r >> 8) & 0xFFF) | ((r >> 32) & 0xFFFFF000), (r & 0xFF) | ((r >> 12) & 0xFFFFFF00)) \
            == (os.major(r), os.minor(r)) == (major, minor)
    assert os.makedev(8, 3) == 2051
    fs = FileSystem.mount(img)
    n = fs.mknod(ROOT, b"sda3", stat.S_IFBLK | 0o660, os.makedev(8, 3)).ino
    fs.unmount()
    pm = PMem(img, readonly=True)
    raw = pm.read(slot(pm, sb_of(img), n) + 16, 8)
    pm.close()
    assert raw == bytes.fromhex("0308000000000000")
    fs = FileSystem.mount(img)
    assert fs.getattr(n).rdev == 2051
    fs.unmount()


# ------------------------------------------------------------------ 11: what a mount reports
def test_directory_size_is_0_on_the_media_and_4096_in_stat(img):
    fs = FileSystem.mount(img)
    d = fs.mkdir(ROOT, b"d", 0o755).ino
    for i in range(200):                                 # more than one log page
        fs.create(d, b"name-%03d" % i, 0o644)
    a = fs.getattr(d)
    assert a.ino == d and fs.getattr(ROOT).ino == ROOT
    assert a.size == 4096 and a.blocks == 8 * len(fs.get(d).log_pages) and a.blocks > 8
    fs.compact(d)                                        # logs SA_SIZE with size 0
    fs.unmount()
    pm = PMem(img, readonly=True)
    sb = sb_of(img)
    a_slot = slot(pm, sb, d)                             # st_ino names the slot (5.1)
    assert stat.S_ISDIR(L.InodeStatic.unpack(pm.read(a_slot, 64)).mode)
    entries = [L.decode_entry(r) for r in plog.walk(
        pm, pm.read_u64(a_slot + L.I_LOG_HEAD), pm.read_u64(a_slot + L.I_LOG_TAIL), d,
        sb.total_blocks)]
    pm.close()
    sizes = [e[6] for e in entries if e[0] == L.E_SETATTR and e[2] & L.SA_SIZE]
    assert sizes == [0]
    fs = FileSystem.mount(img)
    assert fs.get(d).size == 0 and fs.getattr(d).size == 4096
    fs.unmount()


def test_the_region_examples_of_section_2_1_are_what_the_formula_gives():
    """SPEC 2.1's example: a 1 GiB device, 2 nodes x 2 CPUs, 16384 inodes per
    CPU, with checksums and parity (features 3) and with inode replicas too (7)."""
    three = [(r.bitmap_start, r.csum_start, r.parity_start, r.csum2_start, r.data_start,
              r.data_blocks) for r in L.plan_regions(262144, 2, 2, 16384, 3)]
    assert three == [(515, 517, 963, 8089, 8535, 57002),
                     (66050, 66052, 66498, 73624, 74070, 57002),
                     (131585, 131587, 132033, 139159, 139605, 57002),
                     (197120, 197122, 197568, 204694, 205140, 57003)]
    seven = L.plan_regions(262144, 2, 2, 16384, 7)
    assert [(r.rtable_start, r.bitmap_start, r.csum_start, r.csum_blocks, r.parity_start,
             r.parity_blocks, r.csum2_start, r.data_start, r.data_blocks) for r in seven] == [
        (515, 1027, 1029, 442, 1471, 7070, 8541, 8983, 56554),
        (66050, 66562, 66564, 442, 67006, 7070, 74076, 74518, 56554),
        (131585, 132097, 132099, 442, 132541, 7070, 139611, 140053, 56554),
        (197120, 197632, 197634, 442, 198076, 7070, 205146, 205588, 56555)]
    # CPU 0's slots are replicated in region 1, CPU 3's in region 0
    assert L.replica_tables(seven) == [66050 * L.BLOCK, 131585 * L.BLOCK, 197120 * L.BLOCK,
                                       515 * L.BLOCK]


def test_the_appendix_page_tails_are_what_the_writer_packs():
    """SPEC 18's page tails, byte by byte: a fresh page, and in version 8 a page
    with its twin and the twin's tail (SPEC 6.1)."""
    import os
    import re
    spec = open(os.path.join(os.path.dirname(__file__), "..", "docs", "SPEC.md")).read()
    app = spec[spec.index("## 18. Appendix"):]
    blocks = re.findall(r"```\n(.*?)```", app, re.S)

    def hexbytes(block: str) -> bytes:
        return bytes.fromhex(" ".join(line[:24] for line in block.splitlines()))

    assert hexbytes(blocks[1]) == L.pack_page_tail(1)
    both = hexbytes(blocks[2])
    assert both[:32] == L.pack_page_tail(1, 0x1205)
    assert both[32:] == L.pack_page_tail(1, 0x300 | L.TWIN_ROLE)
