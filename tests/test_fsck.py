"""fsck.pnova: clean images stay clean; each kind of damage is named, handled, repaired."""
from __future__ import annotations

import hashlib
import io
import os
import random
import shutil
import stat
import struct
import subprocess
import sys

import pytest

from pnova import layout as L
from pnova import log as plog
from pnova.engine import FileSystem, read_regions, read_superblock, write_superblock
from pnova.errors import CorruptImage
from pnova.fsck import NO, YES, Checker
from pnova.mkfs import format_device

from helpers import fsck, set_version
from pnova.pmem import PMem

ROOT = 1
FSCK = os.path.join(os.path.dirname(sys.executable), "fsck.pnova")


# ---------------------------------------------------------------------- helpers
def workload(path: str) -> dict[str, int]:
    """A bit of everything through the engine; returns some inode numbers."""
    fs = FileSystem.mount(path)
    a = fs.mkdir(ROOT, b"a", 0o755).ino
    b = fs.mkdir(a, b"b", 0o755).ino
    gone = fs.mkdir(ROOT, b"gone", 0o755).ino
    f = fs.create(ROOT, b"f", 0o644).ino
    fs.write(f, 0, b"hello world" * 1000)                  # 3 pages, last one partial
    g = fs.create(a, b"g", 0o600).ino
    fs.write(g, 0, b"G" * 5000)
    fs.setattr(g, size=4100)                               # truncate inside page 1
    fs.link(g, b, b"g2")
    h = fs.create(b, b"h", 0o644).ino
    fs.write(h, 8192, b"sparse")
    fs.rename(b, b"h", ROOT, b"h-moved")
    fs.rename(a, b"b", gone, b"b")                         # cross-directory dir move
    fs.rename(gone, b"b", a, b"b")
    fs.rmdir(ROOT, b"gone")
    tmp = fs.create(ROOT, b"tmp", 0o644).ino
    fs.write(tmp, 0, b"x" * 10000)
    fs.unlink(ROOT, b"tmp")
    s = fs.symlink(ROOT, b"sym", b"a/g").ino
    fs.setxattr(f, b"user.color", b"blue")
    fs.setxattr(a, b"user.dir", b"yes")
    fs.removexattr(a, b"user.dir")
    fs.unmount()
    return {"a": a, "b": b, "f": f, "g": g, "h": h, "sym": s, "tmp": tmp}


class Img:
    """Raw access to an image for damaging it on purpose (through the pmem layer).

    Damage to an inode slot is made to its replica too (SPEC 5.5), and damage to
    a log page or a per-core log array to its twin (6.1, 5.4): these tests check
    what fsck does with metadata neither copy of which reads; tests/test_replica.py and
    tests/test_logtwins.py check the repairs from the second copy."""

    def __init__(self, path: str) -> None:
        self.pm = PMem(path)
        self.sb, _ = read_superblock(self.pm)
        self.regions = read_regions(self.pm, self.sb)
        self.array_twins: dict[int, int] = {}     # log array block -> its twin's

    def _copies(self, off: int) -> list[int]:
        """``off``, and its replica when it lies in an inode table, or the same
        byte of the twin when it lies in a log page or a log array (one this
        object has looked up) that has one."""
        twin = L.replica_of(self.regions, self.sb.inodes_per_cpu, off)
        if twin is None and self.array_twins.get(off // L.BLOCK):
            twin = self.array_twins[off // L.BLOCK] * L.BLOCK + off % L.BLOCK
        if twin is None:
            page = off - off % L.BLOCK
            tail = self.pm.read(page + L.PT_NEXT, 32)
            if L.check_page_tail(tail) is None:
                t = L.page_tail_twin(tail)
                if t and not t & L.TWIN_ROLE:
                    twin = t * L.BLOCK + off % L.BLOCK
        return [off] if twin is None else [off, twin]

    def close(self) -> None:
        self.pm.close()

    def __enter__(self) -> "Img":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def addr(self, ino: int) -> int:
        n = self.sb.ncpus
        return self.regions[(ino - 1) % n].itable_start * L.BLOCK + (ino - 1) // n * L.INODE_SIZE

    def u64(self, off: int) -> int:
        return self.pm.read_u64(off)

    def put64(self, off: int, v: int) -> None:
        for a in self._copies(off):
            self.pm.store_u64(a, v)
            self.pm.persist(a, 8)

    def put(self, off: int, data: bytes) -> None:
        for a in self._copies(off):
            self.pm.store(a, data)
            self.pm.persist(a, len(data))

    def flip(self, off: int) -> None:
        self.put(off, bytes([self.pm.read(off, 1)[0] ^ 0xFF]))

    def entries(self, ino: int) -> list[tuple[int, bytes]]:
        """(device offset, raw entry) of every committed entry of ino's log."""
        a = self.addr(ino)
        return self.chain(ino, self.u64(a + L.I_LOG_HEAD), self.u64(a + L.I_LOG_TAIL))

    def array(self, ino: int) -> int:
        blk = self.u64(self.addr(ino) + L.I_LOG_ARRAY)
        self.array_twins[blk] = self.u64(self.addr(ino) + L.I_LOG_ARRAY_TWIN)
        return blk

    def line(self, ino: int, cpu: int) -> int:
        """Device offset of CPU ``cpu``'s line in ino's per-core log array."""
        return self.array(ino) * L.BLOCK + cpu * L.LA_LINE

    def local_entries(self, ino: int, cpu: int) -> list[tuple[int, bytes]]:
        line = self.line(ino, cpu)
        return self.chain(ino, self.u64(line + L.LA_HEAD), self.u64(line + L.LA_TAIL))

    def chain(self, ino: int, head: int, tail: int) -> list[tuple[int, bytes]]:
        pages: list[int] = []
        out, seen, pos = [], 0, head
        copies = 2 if self.sb.log_replicas else 1
        for raw in plog.walk(self.pm, head, tail, ino, self.sb.total_blocks, pages):
            if len(pages) != seen:
                seen, pos = len(pages), pages[-copies] * L.BLOCK
            out.append((pos, raw))
            pos += len(raw)
        return out

    def log_pages(self, ino: int) -> list[int]:
        """The pages of ino's global log (not their twins)."""
        a = self.addr(ino)
        pages: list[int] = []
        for _ in plog.walk(self.pm, self.u64(a + L.I_LOG_HEAD), self.u64(a + L.I_LOG_TAIL), ino,
                           self.sb.total_blocks, pages):
            pass
        return pages[::2] if self.sb.log_replicas else pages

    def seq(self) -> int:
        """A fresh sequence number; the superblock's counter moves past it."""
        s = self.sb.next_seq
        self.sb.next_seq += 1
        write_superblock(self.pm, self.sb)
        return s

    def append(self, ino: int, entry: bytes) -> None:
        """Commit one more entry in the tail page of ino's log."""
        a = self.addr(ino)
        tail = self.u64(a + L.I_LOG_TAIL)
        assert tail % L.BLOCK + len(entry) <= L.LOG_DATA
        self.put(tail, entry)
        self.put64(a + L.I_LOG_TAIL, tail + len(entry))       # (and its replica)


def open_rename_txn(m: Img, ino: dict[str, int]) -> None:
    """Leave a rename of /f to /f2 half done: new tails in place, journal still open."""
    a_root, a_f = m.addr(ROOT) + L.I_LOG_TAIL, m.addr(ino["f"]) + L.I_LOG_TAIL
    old = [(a_root, m.u64(a_root)), (a_f, m.u64(a_f))]
    m.append(ROOT, L.dentry_entry(m.seq(), L.D_REMOVE, b"f", 0, 0, 1))
    m.append(ROOT, L.dentry_entry(m.seq(), L.D_ADD, b"f2", ino["f"], stat.S_IFREG >> 12, 1))
    recs = b"".join(struct.pack("<QQ", a, v) for a, v in old)
    jb = m.regions[0].journal_block * L.BLOCK
    m.put(jb + L.J_RECORDS, recs)
    m.put64(jb, L.journal_word(len(old), recs))


def reseal(raw: bytes | bytearray) -> bytes:
    body = bytearray(raw)
    body[4:8] = b"\0\0\0\0"
    return L._seal(body)


def mount_outcome(path: str, tmp_dir: str) -> str:
    """Mount a copy: 'refused' (one-line CorruptImage) or 'mounted'."""
    copy = os.path.join(tmp_dir, "copy.img")
    shutil.copyfile(path, copy)
    try:
        fs = FileSystem.mount(copy)
    except CorruptImage as e:
        msg = str(e)
        assert "\n" not in msg and ("run fsck.pnova" in msg or "not a pnova" in msg), msg
        return "refused"
    fs.unmount()
    return "mounted"


def repair_cycle(capsys, path: str, *expect: str, tmp_dir: str,
                 mount: str | None = None) -> tuple[str, str]:
    """-n names the damage (exit 4); mount copes or refuses; -y repairs; -n is clean."""
    rc, out = fsck(capsys, path, "-n", "-f")
    for e in expect:
        assert e in out, out
    assert rc == 4, out
    outcome = mount_outcome(path, tmp_dir)
    if mount is not None:
        assert outcome == mount
    rc, fixed = fsck(capsys, path, "-y", "-f")
    assert rc == 1, fixed
    rc, again = fsck(capsys, path, "-n", "-f")
    assert rc == 0, again
    assert "no problems found" in again
    return out, fixed


def away(ino: int) -> int:
    """The CPU (of two) that is not ino's home CPU: its writes go to a local log."""
    return 1 - (ino - 1) % 2


def local_workload(path: str, crash: bool = False) -> tuple[dict[str, int], dict[int, bytes]]:
    """Two files written by both CPUs (so both have a per-core local log) and a
    directory; returns inode numbers and the expected file contents."""
    fs = FileSystem.mount(path)
    ino = {"f": fs.create(ROOT, b"f", 0o644).ino, "g": fs.create(ROOT, b"g", 0o644).ino,
           "z": fs.create(ROOT, b"z", 0o644).ino, "d": fs.mkdir(ROOT, b"d", 0o755).ino}
    cpus = {0: fs, 1: FileSystem.attach(fs, 1)}
    want: dict[int, bytes] = {}
    # A data page of zeros, written first: its block was never another file's
    # (freed blocks are reused at once, and a repair that drops a log can bring
    # an old mapping back).
    fs.write(ino["z"], 0, bytes(L.BLOCK))
    for name in ("f", "g"):
        i = ino[name]
        home, other = cpus[1 - away(i)], cpus[away(i)]
        model = bytearray()

        def put(on: FileSystem, off: int, data: bytes) -> None:
            on.write(i, off, data)
            model[len(model):] = bytes(max(0, off + len(data) - len(model)))
            model[off:off + len(data)] = data

        put(home, 0, b"A" * 5000)                       # the global log
        put(other, 4096, b"B" * 8192)                   # the other CPU's local log
        put(home, 100, b"C" * 10)
        for k in range(80):                             # a second local log page
            put(other, 13000 + 10 * k, b"%010d" % k)
        want[i] = bytes(model)
    for i, data in want.items():
        assert fs.read(i, 0, len(data) + 10) == data
    if crash:
        fs.pm.close()
    else:
        fs.unmount()
    return ino, want


def check_contents(path: str, want: dict[int, bytes]) -> None:
    fs = FileSystem.mount(path)
    for i, data in want.items():
        assert fs.getattr(i).size == len(data)
        assert fs.read(i, 0, len(data) + 10) == data
    fs.unmount()


def mark_dirty(m: "Img") -> None:
    m.sb.clean = 0
    write_superblock(m.pm, m.sb)


# ---------------------------------------------------------------------- clean images
def test_fresh_image_is_clean(img, capsys):
    rc, out = fsck(capsys, img)
    assert rc == 0 and "clean, 1/512 files" in out
    rc, out = fsck(capsys, img, "-f", "-n")
    assert rc == 0 and out.strip().endswith("no problems found")


def test_workload_is_clean(img, capsys):
    workload(img)
    rc, out = fsck(capsys, img)
    assert rc == 0 and "clean" in out
    for opts in (["-f", "-n"], ["-f", "-y"], ["-f", "-p"], ["-f", "-v", "-n"]):
        rc, out = fsck(capsys, img, *opts)
        assert rc == 0, out
        assert "no problems found" in out
    assert "fragmentation" in out and "CPU 1" in out
    fs = FileSystem.mount(img)
    assert fs.mount_path == "clean"        # -y found nothing and wrote nothing
    fs.unmount()


def test_dirty_stop_is_clean(img, capsys):
    ino = workload(img)
    fs = FileSystem.mount(img)
    o = fs.create(ROOT, b"open", 0o644).ino
    fs.write(o, 0, b"data" * 3000)
    fs.ref(o)
    fs.unlink(ROOT, b"open")               # unlinked while open: an orphan on the media
    fs.write(ino["f"], 20000, b"tail")
    fs.pm.close()                          # crash: no unmount
    rc, out = fsck(capsys, img)            # not clean: checked without -f
    assert rc == 0, out
    assert "no problems found" in out
    rc, out = fsck(capsys, img, "-y")
    assert rc == 0, out
    fs = FileSystem.mount(img)
    assert fs.mount_path == "recovery"     # fsck left the recovery to mount
    assert fs.read(ino["f"], 20000, 4) == b"tail"
    fs.unmount()
    assert fsck(capsys, img, "-f", "-n")[0] == 0


def test_open_journal_after_crash_is_not_corruption(img, capsys):
    ino = workload(img)
    with Img(img) as m:
        open_rename_txn(m, ino)
        m.sb.clean = 0
        write_superblock(m.pm, m.sb)
    rc, out = fsck(capsys, img, "-n")
    assert rc == 0, out
    assert "unfinished operation" in out and "mount rolls it back" in out
    fs = FileSystem.mount(img)
    assert fs.lookup(ROOT, b"f").ino == ino["f"]
    fs.unmount()
    assert fsck(capsys, img, "-f", "-n")[0] == 0


def test_open_journal_rolled_back_before_repairs(img, capsys, tmp_path):
    ino = workload(img)
    with Img(img) as m:
        open_rename_txn(m, ino)
        m.append(ino["g"], L.link_entry(1, 9, 1))
        m.sb.clean = 0
        write_superblock(m.pm, m.sb)
    out, fixed = repair_cycle(capsys, img, f"inode {ino['g']} ('/a/g') has link count 9, "
                              "expected 2", "mount rolls it back", tmp_dir=str(tmp_path),
                              mount="mounted")
    fs = FileSystem.mount(img)
    assert fs.lookup(ROOT, b"f").ino == ino["f"]
    assert b"f2" not in [n for n, _, _ in fs.readdir(ROOT)]
    fs.unmount()


def test_open_journal_on_clean_image(img, capsys, tmp_path):
    ino = workload(img)
    with Img(img) as m:
        open_rename_txn(m, ino)
    out, fixed = repair_cycle(capsys, img, "lite journal of CPU 0 (block", "holds an open "
                              "transaction although the image was cleanly unmounted",
                              tmp_dir=str(tmp_path), mount="mounted")
    fs = FileSystem.mount(img)
    assert fs.lookup(ROOT, b"f2").ino == ino["f"]        # the committed state is kept
    fs.unmount()


def test_damaged_journal_on_dirty_image(img, capsys, tmp_path):
    ino = workload(img)
    with Img(img) as m:
        open_rename_txn(m, ino)
        m.flip(m.regions[0].journal_block * L.BLOCK + L.J_RECORDS + 3)
        m.sb.clean = 0
        write_superblock(m.pm, m.sb)
    out, fixed = repair_cycle(capsys, img, "lite journal of CPU 0", "is damaged (journal "
                              "records fail their checksum)", tmp_dir=str(tmp_path),
                              mount="refused")
    assert "Discard the unfinished transaction? yes" in fixed


def test_damaged_journal_records_are_read_from_their_twin(img, capsys):
    """An unfinished operation whose journal records are damaged: the twin of
    the records, in the next CPU's journal block (SPEC 8.1), is checked by the
    same journal word; fsck says so, and the mount rolls back from it."""
    ino = workload(img)
    with Img(img) as m:
        open_rename_txn(m, ino)
        jb = m.regions[0].journal_block * L.BLOCK
        n = m.u64(jb) & 0xFFFFFFFF
        twin = L.journal_twin(m.regions, 0)
        assert twin == m.regions[1].journal_block * L.BLOCK + L.J_TWIN
        m.put(twin, m.pm.read(jb + L.J_RECORDS, n * L.J_RECORD))
        m.flip(jb + L.J_RECORDS + 3)
        m.sb.clean = 0
        write_superblock(m.pm, m.sb)
    rc, out = fsck(capsys, img, "-n")
    assert rc == 0, out
    assert "mount rolls it back from the twin of its records" in out
    fs = FileSystem.mount(img)
    assert fs.lookup(ROOT, b"f").ino == ino["f"]        # rolled back: /f, not /f2
    assert b"f2" not in [n for n, _, _ in fs.readdir(ROOT)]
    fs.unmount()
    assert fsck(capsys, img, "-f", "-n")[0] == 0


def test_discarding_one_journal_keeps_the_twin_of_another(img, capsys):
    """Two faults at once: CPU 0's unfinished operation has damaged records (its
    twin lies in the second half of CPU 1's journal block) and CPU 1's journal
    word sits on a poisoned sector.  Discarding CPU 1's journal clears its own
    half only, so CPU 0 is still rolled back from the twin."""
    ino = workload(img)
    with Img(img) as m:
        open_rename_txn(m, ino)
        jb = m.regions[0].journal_block * L.BLOCK
        n = m.u64(jb) & 0xFFFFFFFF
        m.put(L.journal_twin(m.regions, 0), m.pm.read(jb + L.J_RECORDS, n * L.J_RECORD))
        m.flip(jb + L.J_RECORDS + 3)
        j1 = m.regions[1].journal_block * L.BLOCK
        m.put64(j1, L.journal_word(1, bytes(16)))
        m.sb.clean = 0
        write_superblock(m.pm, m.sb)
    with open(img + ".badblocks", "w") as f:
        f.write(f"{j1 // 512} 1\n")
    rc, out = fsck(capsys, img, "-y")
    assert rc == 1, out
    assert "Discard the unfinished transaction? yes" in out
    assert "rolls it back from the twin" in out
    assert fsck(capsys, img, "-f", "-n")[0] == 0
    fs = FileSystem.mount(img)
    assert fs.lookup(ROOT, b"f").ino == ino["f"]        # CPU 0's rename was undone
    fs.unmount()


# ---------------------------------------------------------------------- superblocks, regions
def test_primary_superblock_damaged(img, capsys, tmp_path):
    workload(img)
    with Img(img) as m:
        m.flip(20)
    out, fixed = repair_cycle(capsys, img, "primary superblock (block 0) is damaged "
                              "(checksum mismatch); the replica is intact",
                              tmp_dir=str(tmp_path), mount="mounted")
    assert "Rewrite the primary from the replica? yes" in fixed


def test_replica_superblock_damaged(img, capsys, tmp_path):
    workload(img)
    with Img(img) as m:
        m.flip((m.sb.total_blocks - 1) * L.BLOCK + 3)
    repair_cycle(capsys, img, "replica superblock (block 2047) is damaged (bad magic)",
                 tmp_dir=str(tmp_path), mount="mounted")


def test_both_superblocks_damaged(img, capsys, tmp_path):
    ino = workload(img)
    with Img(img) as m:
        m.flip(40)
        m.flip((m.sb.total_blocks - 1) * L.BLOCK + 40)
    out, _ = repair_cycle(capsys, img, "primary superblock is damaged (checksum mismatch) "
                          "and so is its replica", tmp_dir=str(tmp_path), mount="refused")
    fs = FileSystem.mount(img)
    assert fs.read(ino["f"], 0, 11) == b"hello world"
    fs.unmount()


def test_both_superblocks_gone_geometry_from_region_table(img, capsys, tmp_path):
    ino = workload(img)
    with Img(img) as m:
        m.put(0, bytes(L.SB_SIZE))
        m.put((m.sb.total_blocks - 1) * L.BLOCK, bytes(L.SB_SIZE))
    out, _ = repair_cycle(capsys, img, "rebuilt from the region table",
                          tmp_dir=str(tmp_path), mount="refused")
    fs = FileSystem.mount(img)
    assert fs.readlink(ino["sym"]) == b"a/g" and fs.ncpus == 2
    fs.unmount()


def test_replica_with_other_geometry(img, capsys, tmp_path):
    workload(img)
    with Img(img) as m:
        sb = read_superblock(m.pm)[0]
        sb.inodes_per_cpu += 32
        m.put((sb.total_blocks - 1) * L.BLOCK, sb.pack())
    out, fixed = repair_cycle(capsys, img, "superblock and replica disagree on the geometry; "
                              "the replica is wrong", tmp_dir=str(tmp_path), mount="mounted")


def test_region_descriptor_damaged(img, capsys, tmp_path):
    workload(img)
    with Img(img) as m:
        m.flip(L.BLOCK + L.REGION_SIZE + 10)             # CPU 1's descriptor
    repair_cycle(capsys, img, "region descriptor of CPU 1", tmp_dir=str(tmp_path),
                 mount="mounted")


def test_two_numa_nodes(tmp_path, capsys):
    path = str(tmp_path / "n.img")
    format_device(path, 16 << 20, numa_nodes=2, cpus_per_node=2)
    workload(path)
    rc, out = fsck(capsys, path, "-f", "-n", "-v")
    assert rc == 0 and "CPU 3 (node 1)" in out, out
    with Img(path) as m:
        m.flip(L.BLOCK + 3 * L.REGION_SIZE + 60)         # CPU 3's descriptor CRC
    repair_cycle(capsys, path, "region descriptor of CPU 3 fails its checksum",
                 tmp_dir=str(tmp_path), mount="mounted")


def test_not_a_pnova_image(tmp_path, capsys):
    p = str(tmp_path / "junk.img")
    with open(p, "wb") as f:
        f.write(os.urandom(1 << 20))
    rc, out = fsck(capsys, p, "-n")
    assert rc == 8 and "not a pnova filesystem" in out and out.count("\n") == 1
    rc, out = fsck(capsys, str(tmp_path / "missing.img"))
    assert rc == 8 and "cannot open" in out


# ---------------------------------------------------------------------- inodes and logs
def test_inode_static_crc(img, capsys, tmp_path):
    ino = workload(img)
    with Img(img) as m:
        m.flip(m.addr(ino["h"]) + 2)
    out, fixed = repair_cycle(capsys, img, f"inode {ino['h']} ('/h-moved'): inode fields fail "
                              "their checksum", f"points to inode {ino['h']}, which is not in use",
                              tmp_dir=str(tmp_path))
    assert "Clear the inode? yes" in fixed
    fs = FileSystem.mount(img)
    assert b"h-moved" not in [n for n, _, _ in fs.readdir(ROOT)]
    fs.unmount()


def test_root_static_crc_is_rebuilt(img, capsys, tmp_path):
    ino = workload(img)
    with Img(img) as m:
        m.flip(m.addr(ROOT) + 1)
    repair_cycle(capsys, img, "the root directory (inode 1): inode fields fail their checksum",
                 tmp_dir=str(tmp_path))
    fs = FileSystem.mount(img)
    assert fs.lookup(ROOT, b"f").ino == ino["f"]
    fs.unmount()


def test_inode_state_word_garbage(img, capsys, tmp_path):
    ino = workload(img)
    with Img(img) as m:
        m.put64(m.addr(ino["g"]) + L.I_STATE, 0xDEADBEEF)
    # a clean image mounts all the same: that inode answers EIO until fsck repairs it
    out, fixed = repair_cycle(capsys, img, f"inode {ino['g']} has a bad state word "
                              "(0xdeadbeef)", tmp_dir=str(tmp_path), mount="mounted")
    assert "Mark it in use (a directory names it)? yes" in fixed
    fs = FileSystem.mount(img)
    assert fs.read(ino["g"], 0, 4200) == b"G" * 4100
    fs.unmount()


def test_state_word_garbage_on_unnamed_slot(img, capsys, tmp_path):
    workload(img)
    fs = FileSystem.mount(img)
    x = fs.create(ROOT, b"x", 0o644).ino
    fs.write(x, 0, b"x" * 100)
    fs.unlink(ROOT, b"x")
    fs.unmount()
    with Img(img) as m:
        m.put64(m.addr(x) + L.I_STATE, 7)               # a deleted file's slot
        m.sb.clean = 0
        write_superblock(m.pm, m.sb)
    out, fixed = repair_cycle(capsys, img, f"inode {x} has a bad state word (0x7)",
                              tmp_dir=str(tmp_path), mount="refused")
    assert "Mark it free? yes" in fixed


def test_log_head_out_of_bounds(img, capsys, tmp_path):
    ino = workload(img)
    with Img(img) as m:
        m.put64(m.addr(ino["f"]) + L.I_LOG_HEAD, 1 << 40)
        m.sb.clean = 0
        write_superblock(m.pm, m.sb)
    out, fixed = repair_cycle(capsys, img, f"inode {ino['f']} ('/f'): log head 0x10000000000 "
                              "is not a page inside the device", tmp_dir=str(tmp_path),
                              mount="refused")
    assert "Clear the inode (its log is lost)? yes" in fixed
    assert "entry 'f' points to inode" in fixed


@pytest.mark.parametrize("where", ["past the page data", "inside no entry"])
def test_log_tail_garbage_finds_last_entry(img, capsys, tmp_path, where):
    ino = workload(img)
    with Img(img) as m:
        a = m.addr(ino["f"]) + L.I_LOG_TAIL
        tail = m.u64(a)
        m.put64(a, tail - tail % L.BLOCK + 4088 if where == "past the page data" else tail + 3)
    expect, fix = (("is not a valid log position", "Set the log tail after the last valid "
                    "entry? yes") if where == "past the page data" else
                   (f"entry at {tail:#x} has a bad size 0", "Truncate the log after the last "
                    "good entry? yes"))
    out, fixed = repair_cycle(capsys, img, expect, tmp_dir=str(tmp_path))
    assert fix in fixed
    fs = FileSystem.mount(img)
    assert fs.getxattr(ino["f"], b"user.color") == b"blue"
    fs.unmount()


def test_log_page_tail_damaged(img, capsys, tmp_path):
    fs = FileSystem.mount(img)
    f = fs.create(ROOT, b"many", 0o644).ino
    for i in range(100):                                 # 100 entries: two log pages
        fs.write(f, i, bytes([i]))
    fs.unmount()
    with Img(img) as m:
        pages = m.log_pages(f)
        assert len(pages) == 2
        m.flip(pages[1] * L.BLOCK + L.PT_OWNER)
    out, fixed = repair_cycle(capsys, img, f"inode {f} ('/many'): log page "
                              f"{pages[1] * L.BLOCK:#x}: log page tail checksum mismatch",
                              "leak", tmp_dir=str(tmp_path))
    assert "Truncate the log after the last good entry? yes" in fixed
    fs = FileSystem.mount(img)
    data = fs.read(f, 0, 100)
    assert 0 < len(data) < 100 and data == bytes(range(len(data)))
    fs.unmount()


def test_log_entry_byte_flip(img, capsys, tmp_path):
    ino = workload(img)
    with Img(img) as m:
        ents = m.entries(ino["f"])
        pos, raw = ents[-1]                              # the xattr entry
        assert raw[0] == L.E_XATTR
        m.flip(pos + 40)
    out, fixed = repair_cycle(capsys, img, f"inode {ino['f']} ('/f'): xattr entry at "
                              f"{pos:#x} fails its checksum", tmp_dir=str(tmp_path),
                              mount="mounted")
    fs = FileSystem.mount(img)
    assert fs.listxattr(ino["f"]) == [] and fs.read(ino["f"], 0, 5) == b"hello"
    fs.unmount()


def test_log_entry_byte_flip_dirty_refused(img, capsys, tmp_path):
    ino = workload(img)
    with Img(img) as m:
        pos, _ = m.entries(ino["a"])[0]
        m.flip(pos + 9)
        m.sb.clean = 0
        write_superblock(m.pm, m.sb)
    out, fixed = repair_cycle(capsys, img, f"directory {ino['a']} ('/a'): dentry entry at "
                              f"{pos:#x} fails its checksum", tmp_dir=str(tmp_path),
                              mount="refused")
    # The whole log of /a is gone, so its children end up in lost+found.
    assert "/lost+found/" in fixed


# ---------------------------------------------------------------------- namespace
def test_dentry_to_free_inode(img, capsys, tmp_path):
    workload(img)
    with Img(img) as m:
        m.append(ROOT, L.dentry_entry(m.seq(), L.D_ADD, b"ghost", 77, stat.S_IFREG >> 12, 1))
    out, fixed = repair_cycle(capsys, img, "directory 1 ('/'): entry 'ghost' points to inode "
                              "77, which is not in use", tmp_dir=str(tmp_path),
                              mount="mounted")
    fs = FileSystem.mount(img)
    assert b"ghost" not in [n for n, _, _ in fs.readdir(ROOT)]
    fs.unmount()


def test_wrong_link_count(img, capsys, tmp_path):
    ino = workload(img)
    with Img(img) as m:
        m.append(ino["f"], L.link_entry(1, 5, 1))
        m.append(ino["a"], L.link_entry(1, 7, 1))
    out, _ = repair_cycle(capsys, img, f"inode {ino['f']} ('/f') has link count 5, expected 1",
                          f"directory {ino['a']} ('/a') has link count 7, expected 3",
                          tmp_dir=str(tmp_path), mount="mounted")
    fs = FileSystem.mount(img)
    assert fs.getattr(ino["f"]).nlink == 1 and fs.getattr(ino["g"]).nlink == 2
    fs.unmount()


def test_block_used_twice(img, capsys, tmp_path):
    ino = workload(img)
    with Img(img) as m:
        fblock = next(struct.unpack_from("<Q", raw, 32)[0] for _, raw in m.entries(ino["f"])
                      if raw[0] == L.E_WRITE)
        pos, raw = next((p, r) for p, r in m.entries(ino["h"]) if r[0] == L.E_WRITE)
        body = bytearray(raw)
        struct.pack_into("<Q", body, 32, fblock)         # h's page now points at f's block
        m.put(pos, reseal(body))
    out, fixed = repair_cycle(capsys, img, f"block {fblock} used by inode {ino['f']} (page 0) "
                              f"and inode {ino['h']} (page 2)", "(leak)",
                              tmp_dir=str(tmp_path))
    assert f"Give inode {ino['h']} its own copy? yes" in fixed
    fs = FileSystem.mount(img)
    assert fs.read(ino["f"], 0, 11) == b"hello world"
    fs.write(ino["f"], 0, b"HELLO")                      # copy-on-write: h is unaffected
    assert fs.read(ino["h"], 8192, 5) == b"hello"
    fs.unmount()


def test_block_used_twice_refused_by_recovery(img, capsys, tmp_path):
    ino = workload(img)
    with Img(img) as m:
        page = m.log_pages(ino["a"])[0]
        pos, raw = next((p, r) for p, r in m.entries(ino["g"]) if r[0] == L.E_WRITE)
        body = bytearray(raw)
        struct.pack_into("<Q", body, 32, page)          # a data page on top of a log page
        m.put(pos, reseal(body))
        m.sb.clean = 0
        write_superblock(m.pm, m.sb)
    out, fixed = repair_cycle(capsys, img, f"block {page} used by inode {ino['a']} (log page)",
                              tmp_dir=str(tmp_path), mount="refused")
    assert "Give it a zeroed block instead? yes" in fixed


def test_leaked_block_on_clean_image(img, capsys, tmp_path):
    workload(img)
    with Img(img) as m:
        r = m.regions[1]
        bm = r.bitmap_start * L.BLOCK
        m.put(bm + 100, b"\x01")                         # data block 800 of CPU 1 "in use"
        leaked = r.data_start + 800
    out, fixed = repair_cycle(capsys, img, f"block {leaked} is marked in use but nothing owns "
                              "it (leak)", tmp_dir=str(tmp_path), mount="mounted")
    assert "Rebuild the allocation bitmaps? yes" in fixed
    rc, out = fsck(capsys, img, "-p", "-f")
    assert rc == 0


def test_used_block_marked_free(img, capsys, tmp_path):
    ino = workload(img)
    with Img(img) as m:
        r = m.regions[0]
        page = m.log_pages(ino["a"])[0]
        assert r.data_start <= page < r.end
        i = page - r.data_start
        off = r.bitmap_start * L.BLOCK + i // 8
        m.put(off, bytes([m.pm.read(off, 1)[0] & ~(1 << (i % 8))]))
    repair_cycle(capsys, img, f"block {page} is used by inode {ino['a']} but marked free",
                 tmp_dir=str(tmp_path), mount="mounted")


def test_unreferenced_live_inode(img, capsys, tmp_path):
    ino = workload(img)
    with Img(img) as m:
        m.append(ROOT, L.dentry_entry(m.seq(), L.D_REMOVE, b"h-moved", 0, 0, 1))
    out, fixed = repair_cycle(capsys, img, f"inode {ino['h']} is not referenced by any "
                              "directory", tmp_dir=str(tmp_path), mount="mounted")
    assert f"inode {ino['h']} is now /lost+found/#{ino['h']}" in fixed
    fs = FileSystem.mount(img)
    lf = fs.lookup(ROOT, b"lost+found")
    assert stat.S_ISDIR(lf.mode) and fs.getattr(ROOT).nlink == 4
    assert fs.lookup(lf.ino, f"#{ino['h']}".encode()).ino == ino["h"]
    assert fs.read(ino["h"], 8192, 6) == b"sparse"
    fs.unmount()


def test_orphan_on_clean_image(img, capsys, tmp_path):
    ino = workload(img)
    with Img(img) as m:
        m.append(ROOT, L.dentry_entry(m.seq(), L.D_REMOVE, b"h-moved", 0, 0, 1))
        m.append(ino["h"], L.link_entry(1, 0, 1))
    repair_cycle(capsys, img, f"inode {ino['h']} has no links and no name but is still "
                 "marked in use", tmp_dir=str(tmp_path), mount="mounted")
    fs = FileSystem.mount(img)
    assert fs.statfs().ffree == fs.statfs().files - 6
    fs.unmount()


def test_directory_loop_through_second_name(img, capsys, tmp_path):
    ino = workload(img)
    with Img(img) as m:
        m.append(ino["b"], L.dentry_entry(m.seq(), L.D_ADD, b"loop", ino["a"],
                                          stat.S_IFDIR >> 12, 1))
    out, fixed = repair_cycle(capsys, img, f"directory {ino['a']} ('/a') is also entered as "
                              "'/a/b/loop'; a directory can have only one name; this name "
                              "makes a loop", tmp_dir=str(tmp_path), mount="mounted")
    fs = FileSystem.mount(img)
    assert [n for n, _, _ in fs.readdir(ino["b"])] == [b".", b"..", b"g2"]
    fs.unmount()


def test_detached_directory_loop(img, capsys, tmp_path):
    ino = workload(img)
    a, b = ino["a"], ino["b"]
    with Img(img) as m:
        # rename(/a, /a/b/a) done by hand: a and b now only name each other.
        m.append(ROOT, L.dentry_entry(m.seq(), L.D_REMOVE, b"a", 0, 0, 1))
        m.append(b, L.dentry_entry(m.seq(), L.D_ADD, b"a", a, stat.S_IFDIR >> 12, 1))
        m.append(a, L.dentry_entry(m.seq(), L.D_ADD, b"..", b, stat.S_IFDIR >> 12, 1))
    out, fixed = repair_cycle(capsys, img, f"directories {a}, {b} form a loop that is not "
                              "connected to the root", tmp_dir=str(tmp_path), mount="mounted")
    fs = FileSystem.mount(img)
    lf = fs.lookup(ROOT, b"lost+found").ino
    assert fs.lookup(lf, f"#{a}".encode()).ino == a
    assert fs.lookup(fs.lookup(lf, f"#{a}".encode()).ino, b"b").ino == b
    assert fs.lookup(a, b"..").ino == lf and fs.getattr(lf).nlink == 3
    fs.unmount()


def test_wrong_dotdot_and_dentry_type(img, capsys, tmp_path):
    ino = workload(img)
    with Img(img) as m:
        m.append(ino["b"], L.dentry_entry(m.seq(), L.D_ADD, b"..", ROOT, stat.S_IFDIR >> 12, 1))
        m.append(ROOT, L.dentry_entry(m.seq(), L.D_ADD, b"f", ino["f"], stat.S_IFDIR >> 12, 1))
    repair_cycle(capsys, img, f"directory {ino['b']} ('/a/b'): '..' points to inode 1 instead "
                 f"of its parent {ino['a']}", "entry 'f' says it is a directory but inode "
                 f"{ino['f']} is a regular file", tmp_dir=str(tmp_path), mount="mounted")


def test_bytes_past_eof_not_zero(img, capsys, tmp_path):
    ino = workload(img)
    with Img(img) as m:
        blk = next(struct.unpack_from("<Q", raw, 32)[0] for _, raw in m.entries(ino["g"])
                   if raw[0] == L.E_WRITE and struct.unpack_from("<Q", raw, 16)[0] == 1)
        m.put(blk * L.BLOCK + 4000, b"junk")
    out, fixed = repair_cycle(capsys, img, "bytes past the end of the file in its last page",
                              tmp_dir=str(tmp_path), mount="mounted")
    fs = FileSystem.mount(img)
    fs.setattr(ino["g"], size=8192)
    assert fs.read(ino["g"], 4096, 4096) == b"G" * 4 + bytes(4092)
    fs.unmount()


# ---------------------------------------------------------------------- per-core local logs
def test_local_logs_clean(img, capsys):
    ino, want = local_workload(img)
    with Img(img) as m:
        for name in ("f", "g"):
            i = ino[name]
            assert m.array(i) and len(m.local_entries(i, away(i))) >= 81
            assert m.u64(m.line(i, 1 - away(i)) + L.LA_TAIL) == 0
    rc, out = fsck(capsys, img)
    assert rc == 0 and "clean" in out
    for opts in (["-f", "-n"], ["-f", "-y"], ["-f", "-p"], ["-f", "-v", "-n"]):
        rc, out = fsck(capsys, img, *opts)
        assert rc == 0, out
        assert "no problems found" in out
    fs = FileSystem.mount(img)
    assert fs.mount_path == "clean"        # -y found nothing and wrote nothing
    fs.unmount()
    check_contents(img, want)


def test_local_logs_dirty_stop_is_clean(img, capsys):
    ino, want = local_workload(img, crash=True)
    rc, out = fsck(capsys, img)            # not clean: checked without -f
    assert rc == 0, out
    assert "no problems found" in out
    assert fsck(capsys, img, "-y")[0] == 0
    fs = FileSystem.mount(img)
    assert fs.mount_path == "recovery"
    fs.unmount()
    check_contents(img, want)
    assert fsck(capsys, img, "-f", "-n")[0] == 0


@pytest.mark.parametrize("which", ["later", "first"])
def test_local_log_entry_damaged(img, capsys, tmp_path, which):
    ino, want = local_workload(img)
    f, cpu = ino["f"], away(ino["f"])
    with Img(img) as m:
        line = m.line(f, cpu)
        head = m.u64(line + L.LA_HEAD)
        ents = m.local_entries(f, cpu)
        # 'later': the entry of loop write 40 (its size field is the end it reached)
        pos, raw = ents[0] if which == "first" else \
            next((p, r) for p, r in ents if struct.unpack_from("<Q", r, 40)[0] == 13410)
        assert raw[0] == L.E_WRITE
        m.flip(pos + 20)
        mark_dirty(m)
    fix = "Truncate it after the last good entry? yes" if which == "later" else \
        "Drop that log (nothing in it can be used)? yes"
    out, fixed = repair_cycle(capsys, img, f"inode {f} ('/f'): per-core log of CPU {cpu}: "
                              f"file write entry at {pos:#x} fails its checksum",
                              tmp_dir=str(tmp_path), mount="refused")
    assert fix in fixed
    with Img(img) as m:
        tail = m.u64(line + L.LA_TAIL)
        assert m.u64(line + L.LA_HEAD) == head       # a head without a tail is legal
        assert tail == (pos if which == "later" else 0)
    fs = FileSystem.mount(img)
    if which == "later":                             # writes 40.. of the loop are gone
        size = 13000 + 10 * 40
        assert fs.getattr(f).size == size
        assert fs.read(f, 0, size + 10) == want[f][:size]
    else:                                            # only the global log is left
        assert fs.getattr(f).size == 5000
        assert fs.read(f, 0, 4096) == want[f][:4096]
    g = ino["g"]
    assert fs.read(g, 0, len(want[g])) == want[g]   # the other file is untouched
    fs.unmount()


def test_local_write_entry_into_block_1_is_cut(img, capsys, tmp_path):
    """Replay refuses a write to blocks 0-1, so remapping the page would not do."""
    ino, want = local_workload(img)
    f, cpu = ino["f"], away(ino["f"])
    with Img(img) as m:
        pos, raw = m.local_entries(f, cpu)[-1]
        body = bytearray(raw)
        struct.pack_into("<Q", body, 32, 1)
        m.put(pos, reseal(body))
        mark_dirty(m)
    out, fixed = repair_cycle(capsys, img, f"inode {f} ('/f'): per-core log of CPU {cpu}: "
                              f"file write entry at {pos:#x} is malformed (block 1 overlaps "
                              "the superblock or the region table)", tmp_dir=str(tmp_path),
                              mount="refused")
    assert "Truncate it after the last good entry? yes" in fixed
    fs = FileSystem.mount(img)
    size = 13000 + 10 * 79                           # the last write is gone
    data = fs.read(f, 0, size + 10)
    assert len(data) == size and data[:12288] == want[f][:12288]
    # Page 3 is mapped as before the last write, to a block that write let go
    # of; whoever took the block since (a later write, a log page) decides
    # what it holds, so its bytes are not checked.  repair_cycle checked that
    # no block is now used twice.
    fs.unmount()


@pytest.mark.parametrize("kind", ["metadata block", "past the device", "data page",
                                  "another array"])
def test_bad_log_array_pointer(img, capsys, tmp_path, kind):
    ino, want = local_workload(img)
    f, g = ino["f"], ino["g"]
    victim = g if kind == "another array" else f
    with Img(img) as m:
        if kind == "metadata block":
            blk = m.regions[1].itable_start
            why = "lies outside the data area"
        elif kind == "past the device":
            blk = 1 << 40
            why = "lies outside the data area"
        elif kind == "data page":
            blk = next(struct.unpack_from("<Q", raw, 32)[0] for _, raw in m.entries(ino["z"])
                       if raw[0] == L.E_WRITE)
            why = f"is also a data page of inode {ino['z']}"
        else:
            blk = m.array(f)
            # (with log twins the lines are taken from g's own twin array, and
            # the pointer is then found to name f's array)
            why = f"is also the per-core log array of inode {f}" if m.sb.log_replicas else \
                f"does not point to this inode's per-core log array (its lines lead to " \
                f"logs of inode {f})"
        m.put64(m.addr(victim) + L.I_LOG_ARRAY, blk)
        mark_dirty(m)
    out, fixed = repair_cycle(capsys, img, f"inode {victim} ('/{'g' if victim == g else 'f'}'): "
                              f"per-core log array pointer (block {blk}) {why}",
                              tmp_dir=str(tmp_path), mount="refused")
    assert "Clear the pointer (the per-core logs it leads to are lost)? yes" in fixed
    with Img(img) as m:
        assert m.array(victim) == 0
    fs = FileSystem.mount(img)
    assert fs.getattr(victim).size == 5000                  # the global log's state
    assert fs.read(victim, 0, 4096) == want[victim][:4096]
    keep = f if victim == g else g
    assert fs.read(keep, 0, len(want[keep]) + 1) == want[keep]
    fs.unmount()


def test_directory_with_log_array_before_version_9(img, capsys, tmp_path):
    ino, want = local_workload(img)
    d = ino["d"]
    set_version(img, 8)
    with Img(img) as m:
        blk = m.regions[1].end - 1                          # a free data block
        m.put64(m.addr(d) + L.I_LOG_ARRAY, blk)
        mark_dirty(m)
    out, fixed = repair_cycle(capsys, img, f"directory {d} ('/d'): per-core log array pointer "
                              f"(block {blk}) is set, but a directory has only its one log",
                              tmp_dir=str(tmp_path), mount="refused")
    with Img(img) as m:
        assert m.array(d) == 0
    check_contents(img, want)


def test_directory_log_array_pointing_at_a_files(img, capsys, tmp_path):
    """Version 9: a directory may have a log array (DESIGN 19.3), and its pointer is
    checked as a file's is: one that leads to another inode's local logs is
    cleared, and the directory keeps its names."""
    ino, want = local_workload(img)
    d, f = ino["d"], ino["f"]
    with Img(img) as m:
        m.put64(m.addr(d) + L.I_LOG_ARRAY, m.array(f))
        mark_dirty(m)
    out, fixed = repair_cycle(capsys, img, f"directory {d} ('/d'): per-core log array pointer "
                              f"(block ", f"does not point to this inode's per-core log array "
                              f"(its lines lead to logs of inode {f})",
                              tmp_dir=str(tmp_path), mount="refused")
    with Img(img) as m:
        assert m.array(d) == 0 and m.array(f) != 0
    check_contents(img, want)


@pytest.mark.parametrize("crash", [False, True])
def test_local_log_head_without_tail_is_legal(img, capsys, crash):
    ino, want = local_workload(img, crash=crash)
    with Img(img) as m:
        f, g = ino["f"], ino["g"]
        # A local log whose creation never committed: head stored, tail still 0.
        m.put64(m.line(f, 1 - away(f)) + L.LA_HEAD, (m.regions[0].end - 1) * L.BLOCK)
        m.put64(m.line(g, 1 - away(g)) + L.LA_HEAD, 0x1234)
    rc, out = fsck(capsys, img, "-f", "-n")
    assert rc == 0 and "no problems found" in out, out
    assert fsck(capsys, img, "-f", "-y")[0] == 0
    check_contents(img, want)
    assert fsck(capsys, img, "-f", "-n")[0] == 0


def test_log_array_line_words_preened(img, capsys):
    ino, want = local_workload(img)
    f = ino["f"]
    with Img(img) as m:
        m.put64(m.line(f, 1 - away(f)) + L.LA_TAIL, 0x1238)           # a tail, no head
        m.put(m.line(f, away(f)) + 40, b"\x01")                       # reserved byte
        m.put(m.array(f) * L.BLOCK + 3000, b"\x02")                   # past the lines
    rc, out = fsck(capsys, img, "-f", "-n")
    assert rc == 4
    assert f"the line of CPU {1 - away(f)} has a tail (0x1238) but no head" in out
    assert f"reserved bytes of the line(s) of CPU {away(f)} and bytes past the last CPU's " \
        "line are not zero" in out
    rc, out = fsck(capsys, img, "-f", "-p")
    assert rc == 1, out
    assert "Clear that tail? yes" in out and "Zero them? yes" in out
    rc, out = fsck(capsys, img, "-f", "-n")
    assert rc == 0, out
    with Img(img) as m:
        raw = m.pm.read(m.array(f) * L.BLOCK, L.BLOCK)
        assert not any(raw[2 * L.LA_LINE:])
        assert not any(any(raw[c * L.LA_LINE + 24:(c + 1) * L.LA_LINE]) for c in range(2))
        assert struct.unpack_from("<Q", raw, (1 - away(f)) * L.LA_LINE + L.LA_TAIL)[0] == 0
    check_contents(img, want)


def test_open_journal_with_log_array_word(img, capsys):
    """A compaction cut short: its transaction restores head, tail and the array
    word (and, with log twins, the words naming the twins of the first page and
    of the array)."""
    ino, want = local_workload(img)
    f = ino["f"]
    fs = FileSystem.mount(img)
    a = fs.inode_addr(f)
    words = [a + L.I_LOG_HEAD, a + L.I_LOG_TAIL, a + L.I_LOG_ARRAY]
    if fs.log_twins:
        words += [a + L.I_LOG_HEAD_TWIN, a + L.I_LOG_ARRAY_TWIN]
    old = [(w, fs.pm.read_u64(w)) for w in words]
    assert old[2][1] != 0
    fs.compact(f)
    assert fs.pm.read_u64(a + L.I_LOG_ARRAY) == 0
    fs.pm.close()                          # crash before the journal closed (F3..F4)
    with Img(img) as m:
        recs = b"".join(struct.pack("<QQ", w, v) for w, v in old)
        jb = m.regions[0].journal_block * L.BLOCK
        m.put(jb + L.J_RECORDS, recs)
        m.put64(jb, L.journal_word(len(old), recs))
    rc, out = fsck(capsys, img, "-n")
    assert rc == 0, out
    assert f"holds an unfinished operation ({len(old)} words); mount rolls it back" in out
    assert "no problems found" in out
    assert fsck(capsys, img, "-y")[0] == 0
    fs = FileSystem.mount(img)
    assert fs.pm.read_u64(a + L.I_LOG_ARRAY) == old[2][1]       # rolled back
    fs.unmount()
    check_contents(img, want)
    assert fsck(capsys, img, "-f", "-n")[0] == 0


def test_other_format_version_is_refused(img, capsys):
    workload(img)
    with Img(img) as m:
        sb = read_superblock(m.pm)[0]
        sb.version = 1
        m.put(0, sb.pack())
        m.put((sb.total_blocks - 1) * L.BLOCK, sb.pack())
    with open(img, "rb") as f:
        before = hashlib.sha1(f.read()).digest()
    for opts in (["-n"], ["-y", "-f"], ["-p"]):
        rc, out = fsck(capsys, img, *opts)
        assert rc == 8, out
        assert out.count("\n") == 1 and "format version 1 is not supported" in out, out
    with open(img, "rb") as f:
        assert hashlib.sha1(f.read()).digest() == before


# ---------------------------------------------------------------------- modes and CLI
def test_preen_repairs_only_safe_problems(img, capsys):
    ino = workload(img)
    with Img(img) as m:
        m.append(ino["f"], L.link_entry(1, 5, 1))                     # safe
        pos, _ = m.entries(ino["g"])[-1]
        m.flip(pos + 12)                                              # needs -y
    rc, out = fsck(capsys, img, "-p", "-f")
    assert rc == 5, out
    assert "Fix the link count? yes" in out and "Truncate the log after the last good " \
        "entry? no" in out and "UNEXPECTED INCONSISTENCY" in out
    rc, out = fsck(capsys, img, "-y", "-f")
    assert rc == 1, out
    assert fsck(capsys, img, "-f", "-n")[0] == 0


def test_clean_image_without_f_is_not_checked(img, capsys):
    ino = workload(img)
    with Img(img) as m:
        m.append(ino["f"], L.link_entry(1, 5, 1))
    rc, out = fsck(capsys, img)
    assert rc == 0 and "clean," in out
    assert fsck(capsys, img, "-f")[0] == 4          # non-tty without -n/-y/-p: read-only


def test_usage_errors(img, capsys):
    assert fsck(capsys, img, "-n", "-y")[0] == 16
    assert fsck(capsys, img, "--bogus")[0] == 16
    rc, out = fsck(capsys, img, "-C", "0", "-f", "-n")
    assert rc == 0 and "100%" in out


def test_refuses_mounted_image(img, capsys):
    from pnova.util import lock_image
    fd = lock_image(img)
    try:
        rc, out = fsck(capsys, img, "-y")
        assert rc == 8 and "is mounted" in out and out.count("\n") == 1
        rc, out = fsck(capsys, img, "-n", "-f")
        assert rc == 0 and "warning" in out
    finally:
        os.close(fd)


def test_checker_api_and_console_script(img):
    workload(img)
    with Img(img) as m:
        m.flip(10)
    buf = io.StringIO()
    assert Checker(img, policy=YES, out=buf).run() == 1
    assert "Rewrite the primary from the replica? yes" in buf.getvalue()
    r = subprocess.run([FSCK, "-f", img], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "no problems found" in r.stdout, r.stdout + r.stderr


# ---------------------------------------------------------------------- random damage
@pytest.fixture(scope="module")
def base_image(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("base") / "base.img")
    format_device(path, 8 << 20, numa_nodes=1, cpus_per_node=2)
    ino = workload(path)
    fs = FileSystem.mount(path)
    many = fs.create(ROOT, b"many", 0o644).ino
    for i in range(120):                                 # a two-page log
        fs.write(many, i * 7, b"abcdefg")
    fs.link(many, ino["b"], b"many-link")
    for i in range(12):
        d = fs.mkdir(ino["a"], f"d{i}".encode(), 0o755).ino
        fs.write(fs.create(d, b"x", 0o644).ino, 0, bytes([i]) * (500 * i + 1))
    fs.unmount()
    return path


def _damage(path: str, rnd: random.Random) -> None:
    with Img(path) as m:
        live = [i for i in range(1, m.sb.inodes_per_cpu * m.sb.ncpus + 1)
                if m.u64(m.addr(i) + L.I_STATE) == L.STATE_LIVE]
        for _ in range(rnd.randint(1, 3)):
            ino = rnd.choice(live)
            kind = rnd.randrange(4)
            if kind == 0:                                # a field of an entry, CRC fixed up
                try:
                    pos, raw = rnd.choice(m.entries(ino))
                except (IndexError, plog.LogError):
                    continue
                body = bytearray(raw)
                j = rnd.choice([k for k in range(1, len(body)) if not 4 <= k < 8])
                body[j] = rnd.choice([0, 1, 2, 0xFF, body[j] ^ 1, rnd.randrange(256)])
                m.put(pos, reseal(body))
            elif kind == 1:                              # a raw byte of a log page
                try:
                    page = rnd.choice(m.log_pages(ino))
                except (IndexError, plog.LogError):
                    continue
                m.flip(page * L.BLOCK + rnd.choice([rnd.randrange(512), L.PT_NEXT + rnd.randrange(32)]))
            elif kind == 2:                              # an inode word
                a = m.addr(ino) + rnd.choice([L.I_STATE, L.I_LOG_HEAD, L.I_LOG_TAIL])
                m.put64(a, rnd.choice([0, 2, m.u64(a) + 8, max(0, m.u64(a) - 8),
                                       rnd.randrange(1 << 32)]))
            else:                                        # the static line
                m.flip(m.addr(ino) + rnd.randrange(64))
        if rnd.random() < 0.5:
            m.sb.clean = 0
            write_superblock(m.pm, m.sb)


@pytest.mark.parametrize("seed", range(30))
def test_random_damage_is_repaired(base_image, tmp_path, seed):
    path = str(tmp_path / "d.img")
    shutil.copyfile(base_image, path)
    _damage(path, random.Random(seed))
    with open(path, "rb") as f:
        before = hashlib.sha1(f.read()).digest()
    out = io.StringIO()
    Checker(path, policy=NO, force=True, out=out).run()
    with open(path, "rb") as f:
        assert hashlib.sha1(f.read()).digest() == before, "-n changed the image"
    out = io.StringIO()
    assert Checker(path, policy=YES, force=True, out=out).run() in (0, 1), out.getvalue()
    again = io.StringIO()
    assert Checker(path, policy=NO, force=True, out=again).run() == 0, \
        out.getvalue() + "---\n" + again.getvalue()
    fs = FileSystem.mount(path)

    def walk(d: int) -> None:
        for _name, c, _ in fs.readdir(d)[2:]:
            a = fs.getattr(c)
            if stat.S_ISDIR(a.mode):
                walk(c)
            elif stat.S_ISREG(a.mode):
                fs.read(c, 0, min(a.size, 1 << 20))
    walk(ROOT)
    fs.unmount()


@pytest.fixture(scope="module")
def local_base_image(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("local") / "local.img")
    format_device(path, 8 << 20, numa_nodes=1, cpus_per_node=2)
    local_workload(path)
    return path


def _damage_local(path: str, rnd: random.Random) -> None:
    """Damage per-core logs: their entries, pages, array lines and array pointers."""
    with Img(path) as m:
        files = [i for i in range(1, m.sb.inodes_per_cpu * m.sb.ncpus + 1)
                 if m.u64(m.addr(i) + L.I_STATE) == L.STATE_LIVE and m.array(i)]
        for _ in range(rnd.randint(1, 3)):
            ino = rnd.choice(files)
            if not 0 < m.array(ino) < m.sb.total_blocks:
                continue                                 # its pointer was damaged already
            cpu = away(ino)
            kind = rnd.randrange(5)
            try:
                ents = m.local_entries(ino, cpu)
            except plog.LogError:
                ents = []
            if kind == 0 and ents:                       # a field of an entry, CRC fixed up
                pos, raw = rnd.choice(ents)
                body = bytearray(raw)
                j = rnd.choice([k for k in range(1, len(body)) if not 4 <= k < 8])
                body[j] = rnd.choice([0, 1, 2, 0xFF, body[j] ^ 1, rnd.randrange(256)])
                m.put(pos, reseal(body))
            elif kind == 1 and ents:                     # a raw byte of a local log page
                page = rnd.choice(sorted({p // L.BLOCK for p, _ in ents}))
                m.flip(page * L.BLOCK + rnd.choice([rnd.randrange(512),
                                                    L.PT_NEXT + rnd.randrange(32)]))
            elif kind == 2:                              # a head or tail word of a line
                a = m.line(ino, rnd.randrange(2)) + rnd.choice([L.LA_HEAD, L.LA_TAIL])
                m.put64(a, rnd.choice([0, 8, m.u64(a) + 8, max(0, m.u64(a) - 8),
                                       m.u64(a) + L.BLOCK, rnd.randrange(1 << 32)]))
            elif kind == 3:                              # the array pointer
                a = m.addr(ino) + L.I_LOG_ARRAY
                m.put64(a, rnd.choice([m.u64(a) + 1, m.u64(a) - 1, rnd.randrange(2048),
                                       m.u64(m.addr(rnd.choice(files)) + L.I_LOG_ARRAY),
                                       1 << 33]))
            else:                                        # any byte of the array block
                m.flip(m.array(ino) * L.BLOCK + rnd.randrange(L.BLOCK))
        if rnd.random() < 0.5:
            mark_dirty(m)


@pytest.mark.parametrize("seed", range(30))
def test_random_local_log_damage_is_repaired(local_base_image, tmp_path, seed):
    path = str(tmp_path / "d.img")
    shutil.copyfile(local_base_image, path)
    _damage_local(path, random.Random(seed))
    with open(path, "rb") as f:
        before = hashlib.sha1(f.read()).digest()
    Checker(path, policy=NO, force=True, out=io.StringIO()).run()
    with open(path, "rb") as f:
        assert hashlib.sha1(f.read()).digest() == before, "-n changed the image"
    out = io.StringIO()
    assert Checker(path, policy=YES, force=True, out=out).run() in (0, 1), out.getvalue()
    again = io.StringIO()
    assert Checker(path, policy=NO, force=True, out=again).run() == 0, \
        out.getvalue() + "---\n" + again.getvalue()
    fs = FileSystem.mount(path)
    for name, c, _ in fs.readdir(ROOT)[2:]:
        a = fs.getattr(c)
        if stat.S_ISREG(a.mode):
            n = min(a.size, 1 << 20)                 # a damaged size may be huge (sparse)
            assert len(fs.read(c, 0, n)) == n
            fs.write(c, n, b"more")                  # the repaired logs take appends
    fs.unmount()
    assert Checker(path, policy=NO, force=True, out=io.StringIO()).run() == 0
