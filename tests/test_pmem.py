"""The pmem layer's persistence model (tracked mode) and its fast mode counters."""
from __future__ import annotations

import os

import numpy as np
import pytest

from pnova.pmem import PMem, TrackedPMem


def make(tmp_path, cls=TrackedPMem):
    path = str(tmp_path / "dev")
    with open(path, "wb") as f:
        f.truncate(4096)
    return cls(path)


def test_fast_mode_counts_lines_and_fences(tmp_path):
    pm = make(tmp_path, PMem)
    pm.store(60, b"x" * 10)           # straddles two lines
    pm.flush(60, 10)
    pm.fence()
    assert (pm.flushes, pm.fences) == (2, 1)
    assert pm.read(60, 10) == b"x" * 10
    pm.close()


def test_only_flushed_and_fenced_lines_are_durable(tmp_path):
    pm = make(tmp_path)
    pm.store(0, b"a" * 64)
    pm.store(128, b"b" * 64)
    pm.flush(0, 64)
    assert not pm.durable[:64].any()              # flushed but not fenced
    pm.fence()
    assert bytes(pm.durable[:64]) == b"a" * 64
    assert not pm.durable[128:192].any()          # never flushed: still in flight
    assert pm.units() == [[2]]
    pm.close()


def test_store_after_flush_needs_another_flush(tmp_path):
    pm = make(tmp_path)
    pm.store(0, b"a" * 8)
    pm.flush(0, 8)
    pm.store(8, b"b" * 8)                          # same line, after the flush
    pm.fence()
    assert not pm.durable[:16].any() and pm.units() == [[0]]
    pm.flush(0, 16)
    pm.fence()
    assert bytes(pm.durable[:16]) == b"a" * 8 + b"b" * 8
    pm.close()


def test_crash_images_and_fence_hook(tmp_path):
    pm = make(tmp_path)
    seen = []
    pm.on_fence = lambda p: seen.append(p.units())
    pm.store(0, b"x" * 200)                        # one store, four lines
    pm.store_u64(1024, 7)
    pm.flush(0, 200)
    pm.flush(1024, 8)
    pm.fence()
    assert seen == [[[0, 1, 2, 3], [16]]]
    pm.store(2048, b"y" * 64)
    img = pm.crash_image([32])
    assert bytes(img[2048:2112]) == b"y" * 64 and bytes(img[:200]) == b"x" * 200
    torn = pm.crash_image(torn={32: 0b101})
    assert bytes(torn[2048:2056]) == b"y" * 8 and not torn[2056:2064].any()
    assert bytes(torn[2064:2072]) == b"y" * 8
    assert isinstance(img, np.ndarray) and not pm.crash_image()[2048:2112].any()
    pm.close()


def _store_forever(path: str, off: int, values: tuple[int, int], n: int) -> None:
    pm = PMem(path)
    for i in range(n):
        pm.commit_u64(off, values[i & 1])
        pm.store_u64(off + 64, values[i & 1])
    pm.close()


def test_a_word_another_process_stores_is_read_whole(tmp_path):
    """A log tail is stored by one process while another reads it: the reader
    must see the old value or the new one, never zero or a mix of the two
    (struct's pack_into clears the 8 bytes before writing them one by one;
    a reader that caught that gap once skipped a committed write and the
    file's blocks were freed twice)."""
    import multiprocessing as mp
    path = str(tmp_path / "dev")
    pm = PMem(path, size=1 << 16, create=True)
    values = (0x0102030405060708, 0xF1F2F3F4F5F6F7F8)
    off = 4096 + 8
    pm.store_u64(off, values[0])
    pm.store_u64(off + 64, values[0])
    ctx = mp.get_context("fork")
    writer = ctx.Process(target=_store_forever, args=(path, off, values, 400_000))
    writer.start()
    seen: set[int] = set()
    bad: set[int] = set()
    try:
        while writer.is_alive() or not seen:
            for _ in range(2000):
                v = pm.read_u64(off)
                a, b = pm.words.load64s(off, 2, 64)
                for x in (v, a, b):
                    if x in values:
                        seen.add(x)
                    else:
                        bad.add(x)
    finally:
        writer.join()
        pm.close()
    assert not bad, [hex(x) for x in sorted(bad)[:5]]
    assert seen == set(values)


def _request_file(tmp_path, data: bytes) -> int:
    """A descriptor that reads ``data`` (what one read(2) of a request returns)."""
    p = tmp_path / "request"
    p.write_bytes(data)
    return os.open(p, os.O_RDONLY)


@pytest.mark.parametrize("cls", [PMem, TrackedPMem])
def test_a_scattered_read_stores_into_device_ranges_in_order(tmp_path, cls):
    pm = make(tmp_path, cls)
    msg = bytes(range(80)) + b"A" * 100 + b"B" * 200 + b"C" * 50
    fd = _request_file(tmp_path, msg)
    head, spare = bytearray(80), bytearray(4096)
    try:
        got = pm.store_read(fd, memoryview(head), [(1024, 100), (512, 200)],
                            memoryview(spare))
    finally:
        os.close(fd)
    assert got == len(msg)
    assert bytes(head) == msg[:80]
    assert pm.read(1024, 100) == b"A" * 100 and pm.read(512, 200) == b"B" * 200
    assert bytes(spare[:50]) == b"C" * 50
    if cls is TrackedPMem:
        # stores like any other: in flight until flushed and fenced
        assert not pm.durable[512:1124].any()
        pm.flush(512, 612)
        pm.fence()
        assert bytes(pm.durable[1024:1124]) == b"A" * 100
    pm.close()


def test_a_scattered_read_clears_the_poison_of_whole_sectors_it_fills(tmp_path):
    path = str(tmp_path / "dev")
    with open(path, "wb") as f:
        f.truncate(8192)
    with open(path + ".badblocks", "w") as f:
        f.write("8 1\n9 1\n")                      # bytes 4096..5119
    pm = PMem(path)
    assert pm.poisoned(4096, 1024) == [8, 9]
    fd = _request_file(tmp_path, b"h" * 80 + b"x" * 600)
    try:
        pm.store_read(fd, memoryview(bytearray(80)), [(4096, 1024)], memoryview(bytearray(64)))
    finally:
        os.close(fd)
    # the read filled sector 8 whole and sector 9 in part: only 8 is good again
    assert pm.poisoned(4096, 1024) == [9]
    pm.close()


def test_prefault_maps_pages_without_writing_them(tmp_path):
    """PMem.prefault (blocks a stash is about to hand out) changes no byte of the
    image, and on a kernel or mapping that cannot do it, quietly does nothing."""
    path = str(tmp_path / "p.img")
    with open(path, "wb") as f:
        f.write(bytes(range(256)) * 64)          # 16 KiB of known bytes
    pm = PMem(path)
    try:
        before = pm.read(0, 16384)
        pm.prefault(4096, 8192)
        assert pm.read(0, 16384) == before
        pm._populate = True

        class NoMadvise:                          # a mapping without the call
            def __getattr__(self, name):
                raise AttributeError(name)
        real, pm.mm = pm.mm, NoMadvise()
        pm.prefault(0, 4096)
        pm.mm = real
        assert pm._populate is False
        pm.prefault(0, 4096)                      # now a no-op
    finally:
        pm.close()
    with open(path, "rb") as f:
        assert f.read() == before
