"""Protection of file data: strip checksums, parity, poison, fsck and pnova-inject.

Every test damages an image the way media errors and stray writes do, then
checks what a user relies on: a read returns exactly the bytes written or
fails with EIO for the damaged range (never wrong bytes), whatever one strip
lost comes back from the parity, and fsck.pnova names what it finds by path.
"""
from __future__ import annotations

import errno
import json
import os
import random
import struct
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pnova import _protect
from pnova import layout as L
from pnova.engine import FileSystem
from pnova.errors import CorruptImage, FsError
from pnova.inject import inject
from pnova.inject import main as inject_main
from pnova.mkfs import format_device
from pnova.pmem import load_badblocks, save_badblocks

from helpers import flip as _flip
from helpers import fsck
from test_mount import Mount, needs_fuse

ROOT = L.ROOT_INO
# no second copy of inode slots or log pages
NO_REPLICAS = L.DEFAULT_FEATURES & ~(L.FEATURE_INODE_REPLICA | L.FEATURE_LOG_REPLICA)


def _image(tmp_path, features: int = L.DEFAULT_FEATURES, name: str = "p.img") -> str:
    path = str(tmp_path / name)
    format_device(path, 16 << 20, numa_nodes=1, cpus_per_node=2, features=features)
    return path


def _files(path: str, seed: int = 1) -> dict[str, bytes]:
    """A few files of different sizes (one block, several, a partial last page)."""
    rng = random.Random(seed)
    want = {"a": rng.randbytes(4096), "b": rng.randbytes(3 * 4096 + 700),
            "c": rng.randbytes(100), "d": rng.randbytes(9 * 4096)}
    fs = FileSystem.mount(path)
    for name, data in want.items():
        fs.write(fs.create(ROOT, name.encode(), 0o644).ino, 0, data)
    fs.unmount()
    return want


def _block_of(path: str, name: str, page: int) -> int:
    fs = FileSystem.mount(path, readonly=True)
    try:
        return fs.get(fs.lookup(ROOT, name.encode()).ino).pages[page]
    finally:
        fs.unmount()


def _read(fs: FileSystem, name: str, off: int = 0, size: int = 1 << 20) -> bytes:
    return fs.read(fs.lookup(ROOT, name.encode()).ino, off, size)


def test_the_compiled_checksums_are_crc32c_and_the_parity_is_the_xor():
    from crc32c import crc32c
    import numpy as np
    data = random.Random(0).randbytes(2 * 4096)
    sums, par = _protect.seal(data, 0, 2)
    assert sums == _protect.checksums(data, 0, 2)
    want = [crc32c(data[i:i + 512]) for i in range(0, 8192, 512)]
    assert list(struct.unpack("<16I", sums)) == want
    for b in range(2):
        strips = np.frombuffer(data, dtype=np.uint8, count=4096, offset=4096 * b).reshape(8, 512)
        assert par[512 * b:512 * (b + 1)] == bytes(np.bitwise_xor.reduce(strips, axis=0))
    assert _protect.crc32c(b"123456789") == 0xE3069283
    with pytest.raises(ValueError):
        _protect.seal(data, 4096, 2)                     # past the buffer's end
    # a read checks a run of blocks against their records in one call
    buf = bytearray(data + sums)
    assert _protect.good_run(buf, 0, 2, 8192) == 2
    buf[4096 + 700] ^= 1                                 # block 1, strip 1
    assert _protect.good_run(buf, 0, 2, 8192) == 1
    assert _protect.good_run(buf, 4096, 1, 8192 + 32) == 0
    buf[3] ^= 1
    assert _protect.good_run(buf, 0, 2, 8192) == 0
    with pytest.raises(ValueError):
        _protect.good_run(buf, 4096, 2, 8192)            # blocks past the buffer's end


@pytest.mark.parametrize("impl", _protect.implementations())
def test_every_implementation_this_processor_runs_computes_the_same_records(impl):
    # The fastest (carry-less multiplication of AVX-512 vectors, where the
    # processor has it) is the one a mount uses; each must be exact, on data
    # of every kind (all zeros and all ones are where a folding error hides).
    from crc32c import crc32c
    import numpy as np
    data = bytearray(random.Random(impl).randbytes(6 * 4096))
    data[:4096] = bytes(4096)
    data[4096:8192] = b"\xff" * 4096
    data[8192:8192 + 512] = bytes(range(256)) * 2
    old = _protect.use(impl)
    try:
        assert _protect.implementation() == impl
        sums, par = _protect.seal(data, 0, 6)
        assert _protect.checksums(data, 0, 6) == sums
        digest = _protect.seal_into(bytearray(4096 + 32), 0, 1, 4096, -1, -1)   # a zero block
    finally:
        _protect.use(old)
    want = [crc32c(bytes(data[i:i + 512])) for i in range(0, 6 * 4096, 512)]
    assert list(struct.unpack("<48I", sums)) == want
    for b in range(6):
        strips = np.frombuffer(bytes(data), dtype=np.uint8, count=4096,
                               offset=4096 * b).reshape(8, 512)
        assert par[512 * b:512 * (b + 1)] == bytes(np.bitwise_xor.reduce(strips, axis=0))
    assert digest == crc32c(struct.pack("<8I", *[crc32c(bytes(512))] * 8))
    with pytest.raises(ValueError):
        _protect.use("no-such-implementation")


def test_the_mount_log_says_how_file_data_is_protected(tmp_path, caplog):
    caplog.set_level("INFO", logger="pnova")
    for features, words in ((L.DEFAULT_FEATURES, ["computed with " + _protect.implementation(),
                                                  "a parity strip per block"]),
                            (L.FEATURE_DATA_CSUM, ["no parity"]),
                            (0, ["no checksums"])):
        path = str(tmp_path / "p.img")
        format_device(path, 8 << 20, numa_nodes=1, cpus_per_node=1, features=features)
        caplog.clear()
        FileSystem.mount(path).unmount()
        line = [r.getMessage() for r in caplog.records if "file data:" in r.getMessage()]
        assert len(line) == 1 and all(w in line[0] for w in words), line


def test_records_are_computed_into_the_mapping_where_they_are_kept():
    # The write path's one call: both checksum copies and the parity land in
    # the buffer (the device's mapping), nothing else changes, and the answer
    # is the digest a write entry carries.
    from crc32c import crc32c
    data = random.Random(1).randbytes(3 * 4096)
    buf = bytearray(data) + bytearray(4096)
    sums, par = _protect.seal(data, 0, 3)
    digest = _protect.seal_into(buf, 0, 3, 12288, 12288 + 96, 12288 + 1024)
    assert digest == crc32c(sums)
    assert buf[:12288] == data
    assert buf[12288:12288 + 96] == sums and buf[12288 + 96:12288 + 192] == sums
    assert buf[12288 + 192:12288 + 1024] == bytes(832)
    assert buf[12288 + 1024:12288 + 1024 + 1536] == par
    # -1: that copy is not kept
    buf2 = bytearray(data) + bytearray(4096)
    assert _protect.seal_into(buf2, 0, 3, 12288, -1, -1) == digest
    assert buf2[12288 + 96:] == bytes(4096 - 96)
    for bad in ((0, 3, 12288, -1, 16384 - 1000),       # parity past the end
                (0, 3, -1, -1, -1),                     # the first copy is not optional
                (8192, 3, 12288, -1, -1),               # blocks past the end
                (0, 2 ** 59, 0, -1, -1),                # a count whose size wraps around
                (0, 3, 12288, 12288 + 16, -1),          # the copies overlap
                (0, 3, 12288, -1, 12288 + 64),          # parity over the checksums
                (0, 3, 4096, -1, -1)):                  # checksums inside the blocks
        with pytest.raises(ValueError):
            _protect.seal_into(buf, *bad)
    with pytest.raises(BufferError):
        _protect.seal_into(bytes(buf), 0, 3, 12288, -1, -1)   # not writable


@pytest.mark.parametrize("strip", range(8))
def test_one_damaged_strip_is_rebuilt_from_parity_and_written_back(tmp_path, strip):
    path = _image(tmp_path)
    want = _files(path)
    blk = _block_of(path, "b", 1)
    for k in range(1 + strip % 4):                       # 1..4 bytes in that strip
        _flip(path, blk * L.BLOCK + strip * 512 + 37 * k + 5)
    fs = FileSystem.mount(path)
    assert _read(fs, "b") == want["b"]
    assert fs.prot.repaired >= 1
    fs.unmount()
    with open(path, "rb") as f:                          # the medium holds the data again
        f.seek(blk * L.BLOCK + 4096)
    fs = FileSystem.mount(path, readonly=True)
    assert fs.prot.examine(blk, repair=False).ok
    fs.unmount()


def test_two_damaged_strips_give_eio_for_their_bytes_and_nothing_wrong(tmp_path, capsys, caplog):
    path = _image(tmp_path)
    want = _files(path)
    blk = _block_of(path, "d", 2)                         # file bytes 8192..12287
    _flip(path, blk * L.BLOCK + 600)                      # strip 1
    _flip(path, blk * L.BLOCK + 3000)                     # strip 5
    fs = FileSystem.mount(path)
    got = _read(fs, "d")
    assert got == want["d"][:8192 + 512]                  # a short read, up to the damage
    for off in (8192 + 512, 8192 + 2600):                 # inside each damaged strip
        with pytest.raises(FsError) as e:
            _read(fs, "d", off, 100)
        assert e.value.errno == errno.EIO
    # the strips between and after are good and read back
    assert _read(fs, "d", 8192 + 1024, 1024) == want["d"][8192 + 1024:8192 + 2048]
    assert _read(fs, "d", 8192 + 3072, 5000) == want["d"][8192 + 3072:8192 + 8072]
    # a partial write into the damaged page would copy lost bytes: refused
    ino = fs.lookup(ROOT, b"d").ino
    with pytest.raises(FsError) as e:
        fs.write(ino, 8192 + 100, b"x")
    assert e.value.errno == errno.EIO
    assert "/d: bytes 8704..9215, 10752..11263 are damaged beyond repair" in caplog.text
    # overwriting the whole page needs none of it: the file is whole again
    fs.write(ino, 8192, b"y" * 4096)
    assert _read(fs, "d") == want["d"][:8192] + b"y" * 4096 + want["d"][12288:]
    fs.unmount()
    rc, out = fsck(capsys, path, "-n", "-f")
    assert rc == 0, out


def test_fsck_reports_lost_bytes_by_path_and_zeroes_them_only_when_told(tmp_path, capsys):
    path = _image(tmp_path)
    want = _files(path)
    blk = _block_of(path, "b", 0)
    _flip(path, blk * L.BLOCK + 10)
    _flip(path, blk * L.BLOCK + 4000)
    rc, out = fsck(capsys, path, "-n", "-f")
    assert rc == 4
    assert "('/b'): bytes 0..511, 3584..4095 are damaged beyond repair" in out
    rc, out = fsck(capsys, path, "-p", "-f")              # not a safe repair: left alone
    assert rc & 4
    rc, out = fsck(capsys, path, "-y", "-f")
    assert rc == 1, out
    rc, out = fsck(capsys, path, "-n", "-f")
    assert rc == 0, out
    fs = FileSystem.mount(path)
    got = _read(fs, "b")
    expect = bytearray(want["b"])
    expect[0:512] = bytes(512)
    expect[3584:4096] = bytes(512)
    assert got == bytes(expect)
    fs.unmount()


def _damage_a_strip_a_replica_and_a_parity(path: str, also_a_primary: bool = False) -> None:
    """Flip bytes in a data strip of /a (and, if asked, in its primary checksum
    record), in /b's checksum replica and in /d's parity strip."""
    fs = FileSystem.mount(path, readonly=True)
    a, b, d = (fs.get(fs.lookup(ROOT, n).ino).pages[0] for n in (b"a", b"b", b"d"))
    c1a, _, _ = fs.prot.records(a)
    _, c2b, _ = fs.prot.records(b)
    _, _, pd = fs.prot.records(d)
    fs.unmount()
    _flip(path, a * L.BLOCK + 1234)                       # a data strip
    if also_a_primary:
        _flip(path, c1a + 5)                              # ... and a's primary checksums
    _flip(path, c2b + 9)                                  # b's checksum replica
    _flip(path, pd + 100)                                 # d's parity


def test_fsck_repairs_a_strip_a_checksum_copy_and_a_parity_as_safe_repairs(tmp_path, capsys):
    path = _image(tmp_path)
    want = _files(path)
    _damage_a_strip_a_replica_and_a_parity(path, also_a_primary=True)
    rc, out = fsck(capsys, path, "-n", "-f")
    assert rc == 4
    assert "('/a'): data block" in out and "fails its checksum (the parity rebuilds it)" in out
    assert "checksum copy 1 disagrees" in out
    assert "('/b'): data block" in out and "checksum copy 2 disagrees" in out
    assert "('/d'): data block" in out and "its parity strip is stale" in out
    rc, out = fsck(capsys, path, "-p", "-f")
    assert rc == 1, out
    rc, out = fsck(capsys, path, "-n", "-f")
    assert rc == 0, out
    fs = FileSystem.mount(path)
    for name, data in want.items():
        assert _read(fs, name) == data
    assert fs.prot.repaired == 0                          # nothing left to repair
    fs.unmount()


def test_a_poisoned_sector_is_read_as_a_media_error_and_rebuilt(tmp_path):
    path = _image(tmp_path)
    want = _files(path)
    blk = _block_of(path, "d", 4)
    save_badblocks(path, {blk * 8 + 6})
    fs = FileSystem.mount(path)
    assert _read(fs, "d") == want["d"]
    assert fs.pm.poison == set()                          # the rewrite cleared it
    fs.unmount()
    assert load_badblocks(path) == set()
    assert not os.path.exists(path + ".badblocks")
    save_badblocks(path, {blk * 8 + 1, blk * 8 + 2})       # two sectors: beyond parity
    fs = FileSystem.mount(path)
    assert _read(fs, "d") == want["d"][:4 * 4096 + 512]
    fs.unmount()


def test_without_parity_damage_is_detected_not_repaired(tmp_path):
    path = _image(tmp_path, L.FEATURE_DATA_CSUM)
    want = _files(path)
    blk = _block_of(path, "a", 0)
    _flip(path, blk * L.BLOCK + 2000)
    fs = FileSystem.mount(path)
    assert _read(fs, "a") == want["a"][:1536]
    fs.unmount()


def test_without_checksums_nothing_is_checked(tmp_path):
    """The benchmark setting: damaged data reads back as it is on the medium."""
    path = _image(tmp_path, 0)
    want = _files(path)
    blk = _block_of(path, "a", 0)
    _flip(path, blk * L.BLOCK + 2000)
    fs = FileSystem.mount(path)
    got = _read(fs, "a")
    assert got != want["a"] and len(got) == len(want["a"])
    fs.unmount()


def test_protection_costs_space_as_specified(tmp_path):
    sizes = {}
    for f in (0, L.FEATURE_DATA_CSUM, L.DEFAULT_FEATURES):
        (r,) = L.plan_regions(4096, 1, 1, 64, f)
        sizes[f] = r.data_blocks
        # the areas tile the region after its bitmap; each record has its place
        assert r.data_blocks + 2 * r.csum_blocks + r.parity_blocks == r.end - r.csum_start
        assert r.csum_blocks == (-(-r.data_blocks // 128) if f else 0)
        if f & L.FEATURE_DATA_PARITY:
            assert r.parity_blocks >= -(-r.data_blocks // 8)
        # one data block more would not have fitted
        d = r.data_blocks + 1
        assert f == 0 or d + 2 * -(-d // 128) + (-(-d // 8) if f & L.FEATURE_DATA_PARITY else 0) \
            > r.end - r.csum_start
    assert sizes[0] > sizes[L.FEATURE_DATA_CSUM] > sizes[L.DEFAULT_FEATURES]
    assert sizes[L.DEFAULT_FEATURES] / sizes[0] > 0.86


def test_an_older_image_mounts_unprotected_and_unknown_features_are_refused(tmp_path, capsys, caplog):
    path = _image(tmp_path, 0)
    want = _files(path)
    with open(path, "r+b") as f:                          # make it a version 2 image
        raw = bytearray(f.read(L.SB_SIZE))
        struct.pack_into("<I", raw, 8, 2)
        raw[L.SB_CRC_OFF:] = struct.pack("<I", __import__("crc32c").crc32c(bytes(raw[:L.SB_CRC_OFF])))
        f.seek(0)
        f.write(raw)
        f.seek(-L.BLOCK, 2)
        f.write(raw)
    caplog.set_level("INFO")
    fs = FileSystem.mount(path)
    assert fs.sb.version == 2 and _read(fs, "b") == want["b"]
    fs.unmount()
    assert "format version 2: file data is not checksummed" in caplog.text
    rc, out = fsck(capsys, path, "-n", "-f")
    assert rc == 0, out
    fs = FileSystem.mount(path, readonly=True)
    assert fs.sb.version == 2                             # never rewritten as version 3
    fs.unmount()
    path2 = _image(tmp_path, name="q.img")
    with open(path2, "r+b") as f:
        raw = bytearray(f.read(L.SB_SIZE))
        struct.pack_into("<I", raw, 136, 0x80)
        raw[L.SB_CRC_OFF:] = struct.pack("<I", __import__("crc32c").crc32c(bytes(raw[:L.SB_CRC_OFF])))
        f.seek(0)
        f.write(raw)
    with pytest.raises(CorruptImage, match="features this pnova does not know"):
        FileSystem.mount(path2)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10 ** 6), nbytes=st.integers(1, 8), spread=st.booleans())
def test_seeded_data_flips_never_read_back_wrong(tmp_path_factory, seed, nbytes, spread):
    """pnova-inject's flips of file data: within one strip always repaired; spread
    over the block, exactly right or EIO from the first damaged strip on."""
    tmp = tmp_path_factory.mktemp("flip")
    path = _image(tmp)
    want = _files(path, seed)
    (ev,) = inject(path, kind="flip", target="data", seed=seed, nbytes=nbytes, spread=spread)
    name = ev.path.lstrip("/")
    fs = FileSystem.mount(path)
    try:
        got = _read(fs, name)
    except FsError as e:
        assert e.errno == errno.EIO
        got = b""
    strips = {o // 512 for o in ev.offsets}
    if len(strips) == 1:
        assert got == want[name]
    else:
        # right up to where it stops, and it stops only at a damaged strip
        assert got == want[name][:len(got)]
        assert len(got) == len(want[name]) or \
            len(got) in {ev.file_offset + 512 * k for k in strips}
    fs.unmount()


def test_pnova_inject_is_reproducible_and_aims_where_told(tmp_path, capsys):
    path = _image(tmp_path)
    _files(path)
    copy = str(tmp_path / "copy.img")
    with open(path, "rb") as f, open(copy, "wb") as g:
        g.write(f.read())
    a = inject(path, kind="flip", target="data", count=3, seed=7)
    b = inject(copy, kind="flip", target="data", count=3, seed=7)
    assert a == b and all(e.path and e.what == "data" for e in a)
    with open(path, "rb") as f, open(copy, "rb") as g:
        assert f.read() == g.read()
    m = inject(path, kind="zero", target="metadata", count=5, seed=1, length=1024)
    assert all(e.what != "data" and e.length == 1024 and e.offsets[0] % 512 == 0 for e in m)
    p = inject(path, kind="poison", target="data", count=2, seed=3)
    assert load_badblocks(path) == {e.block * 8 + e.offsets[0] // 512 for e in p}
    capsys.readouterr()
    assert inject_main([path, "--kind", "flip", "--seed", "2", "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["kind"] == "flip" and ev["path"].startswith("/")
    assert inject_main([path, "--bytes", "9"]) == 1
    assert "--bytes must be 1..8" in capsys.readouterr().err


@needs_fuse
@pytest.mark.mount
@pytest.mark.timeout(120)
def test_damaged_data_through_the_mount(tmp_path, capsys):
    """As a user meets it: files written through the mount, the image damaged while
    unmounted with pnova-inject, then cat / cmp through a new mount: every file is
    exactly what was written or fails with EIO (never a shorter or different file,
    also through the page cache), pnova-scrub names the lost ranges by path, and
    fsck.pnova agrees."""
    path = str(tmp_path / "m.img")
    format_device(path, 32 << 20, numa_nodes=1, cpus_per_node=2)
    m = Mount(path, tmp_path / "mnt")
    rng = random.Random(5)
    want = {f"f{i}": rng.randbytes(rng.randrange(1, 60_000)) for i in range(12)}
    try:
        m.start()
        for name, data in want.items():
            (m.mnt / name).write_bytes(data)
        m.stop()
        single = inject(path, kind="flip", target="data", count=4, seed=11)
        double = inject(path, kind="flip", target="data", count=2, seed=12, nbytes=4, spread=True)
        inject(path, kind="poison", target="data", count=2, seed=13)
        m.start()
        lost = set()
        for name, data in want.items():
            r = subprocess.run(["cat", str(m.mnt / name)], capture_output=True)
            if r.returncode == 0:
                assert r.stdout == data, name            # complete and right
            else:
                assert b"Input/output error" in r.stderr
                lost.add("/" + name)
        # a flip inside one strip is always repaired; these seeds spread the
        # double flips over two strips or more, in bytes the files hold
        assert lost and lost <= {e.path for e in double}
        assert not lost & ({e.path for e in single} - {e.path for e in double})
        scrub = subprocess.run([sys.executable, "-m", "pnova.scrub", str(m.mnt)],
                               capture_output=True, text=True, timeout=60)
        damaged = {line.split(":")[0][len(str(m.mnt)):] for line in scrub.stdout.splitlines()
                   if "damaged beyond repair" in line}
        assert damaged == lost
        assert scrub.returncode == (1 if lost else 0)
        m.stop()
    finally:
        m.cleanup()
    rc, out = fsck(capsys, path, "-n", "-f")
    assert rc == (4 if lost else 0), out
    for p in lost:
        assert f"('{p}'): bytes" in out
    assert "fails its checksum" not in out               # the mount repaired the rest


@needs_fuse
@pytest.mark.mount
@pytest.mark.timeout(120)
def test_scrub_through_the_mount_repairs_checksum_copies_and_parity(tmp_path, capsys):
    """A read checks the data it returns against one checksum copy only; a
    damaged second copy or parity strip would wait for fsck.  pnova-scrub asks
    the mount to check every block as fsck does (the trusted.pnova.scrub
    attribute, which cannot be set), so after it fsck.pnova finds nothing."""
    path = _image(tmp_path)
    want = _files(path)
    _damage_a_strip_a_replica_and_a_parity(path)
    m = Mount(path, tmp_path / "mnt")
    try:
        m.start()
        with pytest.raises(OSError) as e:
            os.setxattr(m.mnt / "a", "trusted.pnova.scrub", b"x")
        assert e.value.errno == errno.EPERM
        assert "trusted.pnova.scrub" not in os.listxattr(m.mnt / "a")
        scrub = subprocess.run([sys.executable, "-m", "pnova.scrub", str(m.mnt)],
                               capture_output=True, text=True, timeout=60)
        assert scrub.returncode == 0, scrub.stdout + scrub.stderr
        assert "rebuilt from parity: 1 strip; rewritten: 1 checksum copy, 1 parity " \
            "strip" in scrub.stdout, scrub.stdout
        again = subprocess.run([sys.executable, "-m", "pnova.scrub", str(m.mnt)],
                               capture_output=True, text=True, timeout=60)
        assert "rebuilt from parity: 0 strips; rewritten: 0 checksum copies, 0 parity " \
            "strips" in again.stdout, again.stdout
        for name, data in want.items():
            assert (m.mnt / name).read_bytes() == data
        m.stop()
    finally:
        m.cleanup()
    rc, out = fsck(capsys, path, "-n", "-f")
    assert rc == 0, out


def test_a_read_in_pieces_stops_at_damage_in_a_later_piece(tmp_path):
    """A read longer than one lock's piece (READ_CHUNK, or fewer pages under a
    segment scheme) is answered in pieces; lost strips in a later piece end it
    there with exactly the bytes before them, and a read from them is EIO."""
    path = _image(tmp_path)
    data = random.Random(9).randbytes(600 << 10)
    fs = FileSystem.mount(path)
    ino = fs.create(ROOT, b"big", 0o644).ino
    fs.write(ino, 0, data)
    assert fs.read_chunk < len(data)
    assert fs.read(ino, 0, len(data)) == data            # whole, in pieces
    assert fs.read(ino, 5000, len(data)) == data[5000:]
    blk = fs.get(ino).pages[120]                         # bytes 491520.., a later piece
    fs.unmount()
    _flip(path, blk * L.BLOCK + 1000)                    # strips 1 and 6
    _flip(path, blk * L.BLOCK + 3100)
    fs = FileSystem.mount(path)
    try:
        assert fs.read(ino, 0, len(data)) == data[:120 * 4096 + 512]
        with pytest.raises(FsError) as e:
            fs.read(ino, 120 * 4096 + 600, 10)
        assert e.value.errno == errno.EIO
        assert fs.read(ino, 121 * 4096, 1 << 20) == data[121 * 4096:]
    finally:
        fs.unmount()


def _entry_of(path: str, name: str) -> int:
    """Byte offset of the first entry of a file's log (past its page's start)."""
    fs = FileSystem.mount(path, readonly=True)
    try:
        return fs.get(fs.lookup(ROOT, name.encode()).ino).head
    finally:
        fs.unmount()


def _flip_both(path: str, off: int) -> None:
    """Flip a byte of a log page and the same byte of its twin (SPEC 6.1): damage
    neither copy of which reads."""
    with open(path, "rb") as f:
        f.seek(off - off % L.BLOCK + L.PT_NEXT)
        twin = L.page_tail_twin(f.read(32))
    _flip(path, off)
    if twin:
        _flip(path, twin * L.BLOCK + off % L.BLOCK)


def test_a_scrub_reads_metadata_again_from_the_device(tmp_path, caplog):
    """Damage to a log entry after the inode was cached: reads go on from the
    cache, but the scrub reads the slot and the logs again from the device,
    finds it, and logs it with the path; the other inodes check clean."""
    path = _image(tmp_path)
    _files(path)
    entry = _entry_of(path, "b")
    fs = FileSystem.mount(path)
    try:
        ino = fs.lookup(ROOT, b"b").ino
        fs.read(ino, 0, 100)                              # cached
        _flip_both(path, entry + 20)                      # inside the first entry
        assert fs.scrub(ino).meta == 1
        assert "/b: its metadata does not read back from the device" in caplog.text
        assert fs.scrub(fs.lookup(ROOT, b"d").ino).meta == 0
        assert fs.scrub(ROOT).meta == 0
    finally:
        fs.unmount()


def test_pnova_scrub_reports_damaged_metadata_by_path(tmp_path, capsys):
    """A log entry damaged in both copies is reported by path; a damaged inode
    slot is restored from its replica by the scrub itself."""
    path = _image(tmp_path)
    want = _files(path)
    entry = _entry_of(path, "c")
    fs = FileSystem.mount(path, readonly=True)
    slot_a = fs.inode_addr(fs.lookup(ROOT, b"a").ino)
    fs.unmount()
    m = Mount(path, tmp_path / "mnt")
    try:
        m.start()
        for name, data in want.items():                  # everything cached
            assert (m.mnt / name).read_bytes() == data
        _flip_both(path, entry + 20)
        _flip(path, slot_a + 5)                          # line 0 of a's slot
        scrub = subprocess.run([sys.executable, "-m", "pnova.scrub", str(m.mnt)],
                               capture_output=True, text=True, timeout=60)
        assert scrub.returncode == 1, scrub.stdout + scrub.stderr
        assert f"{m.mnt}/c: its metadata is damaged" in scrub.stdout, scrub.stdout
        assert "5 inodes read back from the device; 1 with damaged metadata; 1 inode slot " \
            "restored from the replica" in scrub.stdout, scrub.stdout
        assert f"{m.mnt}/a" not in scrub.stdout
        m.stop()
    finally:
        m.cleanup()
    rc, out = fsck(capsys, path, "-n", "-f")
    assert rc != 0 and "inode" in out
    assert "its slot is damaged" not in out, out          # the scrub restored it


def test_pnova_scrub_reports_a_path_the_mount_cannot_look_up(tmp_path):
    """A log entry damaged in both copies before the mount has read the file:
    the directory still lists the file's name (the listing hands the kernel no
    inode for it) and the other files read, the mount answers EIO for that path,
    and the scrub reports that path's metadata as damaged and exits 1, as it
    does when a cached file's log fails to read back."""
    path = _image(tmp_path)
    want = _files(path)
    entry = _entry_of(path, "c")
    _flip_both(path, entry + 20)
    m = Mount(path, tmp_path / "mnt")
    try:
        m.start()
        assert sorted(os.listdir(m.mnt)) == ["a", "b", "c", "d"]
        assert sorted(e.name for e in os.scandir(m.mnt)) == ["a", "b", "c", "d"]
        with pytest.raises(OSError) as err:
            os.stat(m.mnt / "c")
        assert err.value.errno == errno.EIO
        for name in "abd":
            assert (m.mnt / name).read_bytes() == want[name]
        scrub = subprocess.run([sys.executable, "-m", "pnova.scrub", str(m.mnt)],
                               capture_output=True, text=True, timeout=60)
        assert scrub.returncode == 1, scrub.stdout + scrub.stderr
        assert f"{m.mnt}/c: its metadata is damaged" in scrub.stdout, scrub.stdout
        assert "not readable" not in scrub.stdout, scrub.stdout
        m.stop()
    finally:
        m.cleanup()


def test_a_damaged_inode_state_word_costs_that_inode_not_the_mount(tmp_path, capsys, caplog):
    """A state word neither free (0) nor live (1) on a clean image: the mount goes
    on, never hands the slot out, and answers EIO for that inode only (not ENOENT:
    it was not removed); fsck.pnova repairs it.  (An image without inode
    replicas: with them the mount restores the slot, tests/test_replica.py.)"""
    path = _image(tmp_path, NO_REPLICAS)
    want = _files(path)
    fs = FileSystem.mount(path, readonly=True)
    named = fs.lookup(ROOT, b"b").ino
    addr = fs.inode_addr
    free = next(i for i in range(2, 200) if fs.pm.read_u64(addr(i) + L.I_STATE) == L.STATE_FREE)
    a_named, a_free = addr(named), addr(free)
    fs.unmount()
    _flip(path, a_free + L.I_STATE + 3, 0x10)
    _flip(path, a_named + L.I_STATE + 5, 0x01)
    fs = FileSystem.mount(path)
    for name, data in want.items():
        if name == "b":
            with pytest.raises(FsError) as e:
                _read(fs, name)
            assert e.value.errno == errno.EIO
        else:
            assert _read(fs, name) == data
    made = [fs.create(ROOT, b"n%d" % i, 0o644).ino for i in range(300)]
    assert free not in made and named not in made
    fs.unmount()
    assert f"inode {free} has a bad state word" in caplog.text
    rc, out = fsck(capsys, path, "-n", "-f")
    assert rc == 4 and f"inode {free} has a bad state word" in out
    rc, out = fsck(capsys, path, "-y", "-f")
    assert rc == 1, out
    fs = FileSystem.mount(path)
    assert _read(fs, "b") == want["b"]                    # a directory named it: live again
    fs.unmount()


def test_poisoned_metadata_is_a_media_error_not_garbage(tmp_path, capsys):
    """Sectors of metadata marked poisoned read as media errors, as a machine
    check would make them: the primary superblock falls back to its replica, a
    poisoned inode slot or log page costs that inode (EIO), and fsck reports it;
    nothing is read from a poisoned sector as if it were good.  (An image
    without metadata replicas: with them a poisoned slot sector is rewritten
    from the replicas, tests/test_replica.py, and a poisoned log page is read
    from its twin, tests/test_logtwins.py.)"""
    path = _image(tmp_path, NO_REPLICAS)
    want = _files(path)
    fs = FileSystem.mount(path)
    for i in range(12):                                   # slots past the root's sector
        name = f"e{i}"
        want[name] = name.encode() * 100
        fs.write(fs.create(ROOT, name.encode(), 0o644).ino, 0, want[name])
    fs.unmount()
    fs = FileSystem.mount(path, readonly=True)
    root_sector = fs.inode_addr(ROOT) // 512
    a = next(fs.lookup(ROOT, f"e{i}".encode()).ino for i in range(12)
             if fs.inode_addr(fs.lookup(ROOT, f"e{i}".encode()).ino) // 512 != root_sector)
    in_sector = {n for n in want if fs.inode_addr(fs.lookup(ROOT, n.encode()).ino) // 512
                 == fs.inode_addr(a) // 512}
    c = fs.lookup(ROOT, b"c").ino
    slot_a = fs.inode_addr(a)
    log_c = fs.get(c).log_pages[0]
    fs.unmount()
    save_badblocks(path, {0, slot_a // 512, log_c * 8 + 7})
    fs = FileSystem.mount(path)                           # the replica superblock
    for name, data in want.items():
        if name in in_sector or name == "c":             # four slots share a sector
            with pytest.raises(FsError) as e:
                _read(fs, name)
            assert e.value.errno == errno.EIO
        else:
            assert _read(fs, name) == data
    fs.unmount()
    rc, out = fsck(capsys, path, "-n", "-f")
    assert rc == 4, out
    assert f"log page {log_c * L.BLOCK:#x} has a media error" in out
    assert "its slot has a media error (poisoned sector)" in out


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10 ** 6), kind=st.sampled_from(["flip", "zero", "poison"]))
def test_metadata_damage_is_never_read_back_as_wrong_data(tmp_path_factory, seed, kind):
    """pnova-inject aimed at the metadata in use (inode slots, log pages, log
    arrays, journals, superblocks, region table, checksum and parity records),
    one block damaged: the mount serves every file exactly as written, because
    every such structure has a second copy or is rebuilt (inode slots have
    replicas, DESIGN 23.1; log pages and arrays twins, 23.2), and fsck.pnova
    -p leaves an image that checks clean."""
    from pnova.fsck import Checker
    import io
    tmp = tmp_path_factory.mktemp("meta")
    path = _image(tmp)
    want = _files(path, seed)
    (ev,) = inject(path, kind=kind, target="metadata", seed=seed, spread=True)
    fs = FileSystem.mount(path)
    try:
        for name, data in want.items():
            assert _read(fs, name) == data, f"{name} after {ev.line()}"
    finally:
        fs.unmount()
    out = io.StringIO()
    assert Checker(path, policy="preen", force=True, out=out).run() in (0, 1), out.getvalue()
    out = io.StringIO()
    assert Checker(path, force=True, out=out).run() == 0, f"{ev.line()}: {out.getvalue()}"


def test_stale_data_with_its_own_parity_is_not_taken_for_good(tmp_path):
    """A block whose data and parity are both another, older content (a page and
    its parity that did not reach the disk while the checksums did): the two
    agreeing checksum copies win, and the read fails rather than serve the old
    bytes or re-seal them."""
    import numpy as np
    path = _image(tmp_path)
    want = _files(path)
    fs = FileSystem.mount(path, readonly=True)
    blk = fs.get(fs.lookup(ROOT, b"a").ino).pages[0]
    _, _, par_off = fs.prot.records(blk)
    fs.unmount()
    stale = random.Random(9).randbytes(4096)
    par = np.bitwise_xor.reduce(np.frombuffer(stale, np.uint8).reshape(8, 512), axis=0).tobytes()
    with open(path, "r+b") as f:
        f.seek(blk * L.BLOCK)
        f.write(stale)
        f.seek(par_off)
        f.write(par)
    fs = FileSystem.mount(path)
    with pytest.raises(FsError) as e:
        _read(fs, "a")
    assert e.value.errno == errno.EIO
    assert _read(fs, "b") == want["b"]
    fs.unmount()


def test_a_read_only_mount_never_serves_a_strip_it_could_not_write_back(tmp_path):
    """Read-only, a strip rebuilt from parity cannot be stored, and the read copies
    from the medium: that strip answers EIO (a read-write mount repairs it)."""
    path = _image(tmp_path)
    want = _files(path)
    blk = _block_of(path, "a", 0)
    _flip(path, blk * L.BLOCK + 1543)                     # strip 3
    fs = FileSystem.mount(path, readonly=True)
    got = _read(fs, "a")
    assert got == want["a"][:1536]                        # up to the strip, never past it
    fs.unmount()
    fs = FileSystem.mount(path)
    assert _read(fs, "a") == want["a"]
    fs.unmount()


def _read_all(fs: FileSystem, want: dict[str, bytes]) -> None:
    for name, data in want.items():
        ino = fs.lookup(ROOT, name.encode()).ino
        assert fs.read(ino, 0, len(data) + 10) == data, name


def test_media_errors_in_the_region_table_bitmaps_and_a_journal_lose_nothing(tmp_path, capsys):
    """Poison in metadata the mount can do without: a region descriptor (derived
    from the superblock), the saved allocation bitmaps (rebuilt from the logs)
    and the lite journal of a clean image (rewritten).  fsck names each; the
    mount serves every file, allocates no block twice, and fsck -p repairs
    what the mount left."""
    path = _image(tmp_path)
    want = _files(path)
    fs = FileSystem.mount(path, readonly=True)
    r0, r1 = fs.regions[0], fs.regions[1]
    fs.unmount()
    sec = 512
    region1 = (1 * L.BLOCK + L.REGION_SIZE) // sec       # CPUs 0-7's descriptors
    save_badblocks(path, {region1, r0.bitmap_start * L.BLOCK // sec,
                          r1.journal_block * L.BLOCK // sec})
    rc, out = fsck(capsys, path, "-n", "-f")
    assert rc != 0
    assert "region descriptor of CPU 0 has a media error" in out
    assert "region descriptor of CPU 1 has a media error" in out
    assert "saved allocation bitmap of CPU 0 has a media error" in out
    assert f"lite journal of CPU 1 (block {r1.journal_block}) is damaged (media error" in out
    fs = FileSystem.mount(path)
    try:
        assert fs.mount_path == "recovery"              # the bitmaps came from the logs
        _read_all(fs, want)
        more = {f"n{i}": os.urandom(5000 + i) for i in range(40)}
        for name, data in more.items():                  # new blocks: none of the old ones
            fs.write(fs.create(ROOT, name.encode(), 0o644).ino, 0, data)
        _read_all(fs, want | more)
    finally:
        fs.unmount()
    # The bitmaps and the journal were rewritten whole; the descriptor is fsck's.
    assert load_badblocks(path) == {region1}
    rc, out = fsck(capsys, path, "-p", "-f")
    assert rc in (0, 1) and "region descriptor of CPU 0 has a media error" in out
    assert load_badblocks(path) == set()
    rc, out = fsck(capsys, path, "-n", "-f")
    assert rc == 0, out
    fs = FileSystem.mount(path, readonly=True)
    try:
        _read_all(fs, want | more)
    finally:
        fs.unmount()


def test_a_media_error_in_an_open_journal_refuses_the_mount_until_fsck(tmp_path, capsys):
    """After a crash the lite journals decide what to roll back: one that cannot be
    read refuses the mount with one line, and fsck -y discards it."""
    path = _image(tmp_path)
    want = _files(path)
    fs = FileSystem.mount(path)
    jblock = fs.regions[0].journal_block
    fs.write(fs.create(ROOT, b"late", 0o644).ino, 0, b"late")
    fs.abandon()                                         # as a crash would leave it
    save_badblocks(path, {jblock * L.BLOCK // 512})
    with pytest.raises(CorruptImage, match="lite journal damaged .*media error"):
        FileSystem.mount(path)
    rc, out = fsck(capsys, path, "-y", "-f")
    assert "lite journal of CPU 0" in out and "media error" in out
    assert load_badblocks(path) == set()
    rc, out = fsck(capsys, path, "-n", "-f")
    assert rc == 0, out
    fs = FileSystem.mount(path)
    try:
        _read_all(fs, want)
    finally:
        fs.unmount()


def test_a_scrub_checks_a_file_larger_than_one_read(tmp_path):
    """The scrub's look at the data of a file of many pages takes its read locks a
    read's worth at a time (the segment lock scheme lets a CPU hold a few
    segments at once): every block is checked, and a damaged strip in the last
    piece is rebuilt."""
    path = _image(tmp_path)
    fs = FileSystem.mount(path)
    try:
        ino = fs.create(ROOT, b"big", 0o644).ino
        data = random.Random(5).randbytes(3 << 20)
        fs.write(ino, 0, data)
        blk = fs.get(ino).pages[767]
        fs.pm.store(blk * L.BLOCK + 100, b"\x00\x01\x02")
        counts = fs.scrub(ino)
        assert counts.blocks == 768 and counts.rebuilt == 1 and counts.lost == 0, counts
        assert fs.read(ino, 0, 3 << 20) == data
    finally:
        fs.unmount()


def test_a_poisoned_sector_of_checksum_records_is_rewritten_whole(tmp_path, capsys):
    """A media error in a sector of checksum records (sixteen blocks' records):
    the repair of one record rewrites the whole sector, the other records from
    the replica copy where they match their blocks, which clears the poison;
    fsck then finds nothing."""
    from pnova.pmem import load_badblocks
    path = _image(tmp_path)
    want = _files(path)
    fs = FileSystem.mount(path, readonly=True)
    blk = fs.get(fs.lookup(ROOT, b"a").ino).pages[0]
    c1, _c2, _p = fs.prot.records(blk)
    fs.unmount()
    save_badblocks(path, {c1 // 512})
    rc, out = fsck(capsys, path, "-n", "-f")
    assert rc == 4 and "checksum copy 1" in out, out
    rc, out = fsck(capsys, path, "-p", "-f")
    assert rc == 1, out
    assert not load_badblocks(path)
    assert fsck(capsys, path, "-n", "-f")[0] == 0
    fs = FileSystem.mount(path)
    for name, data in want.items():
        assert _read(fs, name) == data
    fs.unmount()
