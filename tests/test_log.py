"""Reading a log: the compiled scan of a page's entries and the walk built on it.

A walk takes the entries of a page that read in one call of the compiled
helper (``log_scan``) and looks at whatever stops the scan itself.  These
tests hold the scan to the rule the walk applies to each entry (SPEC 7 and
10): whole before the limit, a size that is a multiple of 8, a CRC32C over
the entry with its crc field as zero; a scan that decodes to
``layout.decode_entry``, field for field, and to its refusals; and a walk that
uses it to the walk that reads entry by entry.
"""
from __future__ import annotations

import contextlib
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pnova import layout as L
from pnova import log as plog
from pnova._protect import log_scan
from pnova.engine import FileSystem
from pnova.mkfs import format_device

PAGE = L.BLOCK               # the page the tests lay entries out in


def _entries() -> list[bytes]:
    """One entry of each kind, with names and values of several lengths."""
    return [
        L.link_entry(1, 2, 3),
        L.dentry_entry(2, L.D_ADD, b"a", 5, 8, 9),
        L.write_entry(3, 0, 1, 77, 4096, 10),
        L.setattr_entry(4, L.SA_MODE, 0o644, 0, 0, 0, 0, 0, 11),
        L.dentry_entry(5, L.D_REMOVE, b"n" * 200, 0, 0, 12),
        L.xattr_entry(6, L.X_SET, b"user.k", b"v" * 13, 13),
        L.dentry_entry(7, L.D_ADD, b"bb", 6, 4, 14, (L.D_MOVED, 99, 3)),
    ]


def _page(entries: list[bytes], marker: bool = True) -> tuple[bytearray, int]:
    """A buffer whose second 4 KiB page holds ``entries`` from its start (then
    a next-page marker); returns it and where the entries end."""
    buf = bytearray(3 * PAGE)
    pos = PAGE
    for raw in entries:
        buf[pos:pos + len(raw)] = raw
        pos += len(raw)
    if marker:
        buf[pos:pos + 8] = L.NEXT_PAGE_ENTRY
    return buf, pos


def _reference(buf: bytes, pos: int, lim: int) -> tuple[list[bytes], int]:
    """The walk's rule for each entry, one at a time, in Python."""
    out = []
    while pos + 8 <= lim:
        etype, _flags, size, _crc = L.entry_header(buf, pos)
        if etype == L.E_NEXT_PAGE and size == 8:
            break
        if size < 8 or size % 8 or pos + size > lim:
            break
        raw = bytes(buf[pos:pos + size])
        if not L.entry_crc_ok(raw):
            break
        out.append(raw)
        pos += size
    return out, pos


def test_a_page_of_entries_is_scanned_up_to_its_marker_or_the_tail():
    entries = _entries()
    buf, end = _page(entries)
    assert log_scan(buf, PAGE, PAGE + L.LOG_DATA) == (entries, end)
    # the tail, where it lies in the page, bounds the scan
    last = end - len(entries[-1])
    assert log_scan(buf, PAGE, last) == (entries[:-1], last)
    assert log_scan(buf, PAGE, end - 8) == (entries[:-1], last)      # inside the last entry
    # a scan may start at any entry's start
    second = PAGE + len(entries[0])
    assert log_scan(buf, second, end) == (entries[1:], end)
    assert log_scan(buf, end, PAGE + L.LOG_DATA) == ([], end)        # at the marker


@pytest.mark.parametrize("where", ["body", "crc", "size", "type"])
def test_the_scan_stops_at_the_first_entry_that_does_not_read(where):
    entries = _entries()
    buf, end = _page(entries)
    at = PAGE + len(entries[0]) + len(entries[1])           # the third entry
    off = {"body": 20, "crc": 5, "size": 2, "type": 0}[where]
    buf[at + off] ^= 0x10
    got, pos = log_scan(buf, PAGE, PAGE + L.LOG_DATA)
    assert (got, pos) == (entries[:2], at)
    assert (got, pos) == _reference(buf, PAGE, PAGE + L.LOG_DATA)


def test_a_zeroed_page_and_bad_positions():
    buf = bytearray(2 * PAGE)
    assert log_scan(buf, PAGE, PAGE + L.LOG_DATA) == ([], PAGE)     # a size of 0
    with pytest.raises(ValueError):
        log_scan(buf, PAGE + 4, PAGE + L.LOG_DATA)                 # not 8-byte aligned
    with pytest.raises(ValueError):
        log_scan(buf, PAGE, 3 * PAGE)                              # past the buffer


def test_random_damage_is_judged_as_the_walk_judges_it():
    """Seeded flips anywhere in a page of entries: the scan takes exactly what
    the walk's per-entry rule takes, and stops where it stops."""
    rng = random.Random(7)
    entries = _entries() * 6
    clean, end = _page(entries)
    for _ in range(400):
        buf = bytearray(clean)
        for _ in range(rng.randint(1, 3)):
            buf[rng.randrange(PAGE, end + 8)] ^= 1 << rng.randrange(8)
        lim = rng.choice([end, PAGE + L.LOG_DATA, rng.randrange(PAGE, end + 1) & ~7])
        assert log_scan(buf, PAGE, lim) == _reference(buf, PAGE, lim)


@contextlib.contextmanager
def _dir_log(tmp_path, names: int, unlink_every: int = 0):
    """A mounted image whose directory got ``names`` creates, every
    ``unlink_every``-th name unlinked again: (the mount, the directory log's
    walk arguments)."""
    path = str(tmp_path / "img")
    format_device(path, 32 << 20, numa_nodes=1, cpus_per_node=1)
    fs = FileSystem.mount(path)
    try:
        d = fs.mkdir(1, b"d", 0o755).ino
        for k in range(names):
            fs.create(d, b"f%03d" % k, 0o644)
            if unlink_every and k % unlink_every == 0:
                fs.unlink(d, b"f%03d" % k)
        inode = fs.get(d)
        yield fs, (fs.pm, inode.head, inode.tail, d, fs.max_log_pages)
    finally:
        fs.unmount()


def test_a_walk_reads_the_same_through_the_scan_as_entry_by_entry(tmp_path):
    """A directory log of several pages: the walk that scans each page and the
    walk that reads entry by entry (one that reports every entry's position)
    yield the same entries and list the same pages; from a position in the
    middle of the log too."""
    with _dir_log(tmp_path, 300, 3) as (_fs, args):
        pages_fast: list[int] = []
        pages_slow: list[int] = []
        fast = list(plog.walk(*args, pages_fast))
        slow = list(plog.walk(*args, pages_slow, 0, {}))
        assert len(fast) > 400 and len(pages_fast) > 4
        assert fast == slow and pages_fast == pages_slow
        # resumed from an entry's start in the third page
        stop: dict = {}
        starts = []
        for _ in plog.walk(*args, None, 0, stop):
            starts.append(stop["pos"])
        mid = starts[len(starts) // 2]
        assert list(plog.walk(*args, None, mid)) == slow[len(starts) // 2:]
        # decoded by the scan, as decode_entry decodes each entry the walk reads
        assert list(plog.walk(*args, None, 0, None, None, None, False, True)) == \
            [L.decode_entry(r) for r in slow]
        assert list(plog.walk(*args, None, mid, decode=True)) == \
            [L.decode_entry(r) for r in slow[len(starts) // 2:]]


def _typed(x):
    """A decoded entry with each field's type beside it (1 == True in Python)."""
    return [(type(f), f) for f in x] if isinstance(x, tuple) else x


def test_the_decoding_scan_gives_what_decode_entry_gives():
    entries = _entries()
    buf, end = _page(entries)
    got, pos = log_scan(buf, PAGE, PAGE + L.LOG_DATA, True)
    assert pos == end
    assert [_typed(e) for e in got] == [_typed(L.decode_entry(r)) for r in entries]
    # the largest values of each field
    big = [L.write_entry(2**64 - 1, 2**64 - 1, 2**32 - 1, 2**64 - 1, 2**64 - 1, 2**64 - 1),
           L.setattr_entry(2**64 - 1, 2**32 - 1, 2**32 - 1, 2**32 - 1, 2**32 - 1, 2**64 - 1,
                           2**64 - 1, 2**64 - 1, 2**64 - 1),
           L.link_entry(2**64 - 1, 2**64 - 1, 2**64 - 1),
           L.dentry_entry(2**64 - 1, L.D_REMOVE, b"\xff" * 255, 2**64 - 1, 255, 2**64 - 1),
           L.xattr_entry(2**64 - 1, L.X_REMOVE, b"x" * 255, b"\0" * 1000, 2**64 - 1)]
    buf, end = _page(big)
    got, pos = log_scan(buf, PAGE, PAGE + L.LOG_DATA, True)
    assert pos == end
    assert [_typed(e) for e in got] == [_typed(L.decode_entry(r)) for r in big]


def _sealed(etype: int, flags: int, size: int, body: bytes) -> bytes:
    """An entry of any header and body, with a good CRC."""
    raw = bytearray(size)
    raw[0], raw[1] = etype, flags
    raw[2:4] = size.to_bytes(2, "little")
    raw[8:size] = body[:size - 8].ljust(size - 8, b"\0")
    return L._seal(raw)


@settings(max_examples=600, deadline=None)
@given(etype=st.integers(0, 8), flags=st.sampled_from([0, L.D_MOVED, 0xFF]),
       size=st.integers(1, 80).map(lambda n: 8 * n), fit=st.sampled_from([0, 8, None]),
       body=st.binary(min_size=632, max_size=632),
       nlen=st.integers(0, 255), vlen=st.integers(0, 300),
       op=st.sampled_from([1, 2, 1, 2, 0, 3]))
def test_a_decoding_scan_refuses_what_decode_entry_refuses(etype, flags, size, fit, body,
                                                           nlen, vlen, op):
    """Entries with good CRCs and any header and body (name and value lengths
    and operations drawn separately, and most sizes those of the type, so that
    each check is hit both ways): the scan decodes exactly those decode_entry
    decodes, to the same tuple, and stops at the others, which the walk then
    hands to decode_entry and so raises as it did."""
    body = bytearray(body)
    if fit is not None:                      # the type's own size (+ 0 or 8)
        size = {L.E_WRITE: 64, L.E_SETATTR: 64, L.E_LINK: 32, L.E_NEXT_PAGE: 8,
                L.E_DENTRY: (40 + nlen + 7) & ~7, L.E_XATTR: (32 + nlen + vlen + 7) & ~7
                }.get(etype, size) + fit
    if etype == L.E_DENTRY:
        body[32 - 8], body[34 - 8] = nlen, op
    elif etype == L.E_XATTR:
        body[24 - 8], body[25 - 8] = nlen, op
        body[26 - 8:28 - 8] = vlen.to_bytes(2, "little")
    size = min(size, 640)
    raw = _sealed(etype, flags, size, bytes(body))
    follow = L.link_entry(1, 2, 3)
    buf, end = _page([raw, follow])
    try:
        want = L.decode_entry(raw)
    except ValueError:
        want = None
    got, pos = log_scan(buf, PAGE, PAGE + L.LOG_DATA, True)
    if etype == L.E_NEXT_PAGE and size == 8:                  # a marker ends the scan
        assert (got, pos) == ([], PAGE)
    elif want is None:
        assert (got, pos) == ([], PAGE)
    else:
        assert [_typed(e) for e in got] == [_typed(want), _typed(L.decode_entry(follow))]
        assert pos == end


def test_a_decoding_walk_raises_what_decode_entry_raises(tmp_path):
    """An entry with a good CRC that decode_entry refuses (a dentry whose
    operation is neither add nor remove), in the middle of a real log: the
    decoding walk stops the scan there and raises decode_entry's own error,
    having handed out the entries before it."""
    with _dir_log(tmp_path, 5) as (fs, args):
        raws = [bytes(r) for r in plog.walk(*args)]
        at = args[1]                                     # the log's head
        for r in raws[:3]:
            at += len(r)
        bad = bytearray(raws[3])
        assert bad[0] == L.E_DENTRY
        bad[34], bad[4:8] = 3, b"\0\0\0\0"
        fs.pm.store(at, L._seal(bad))
        with pytest.raises(ValueError) as want:
            L.decode_entry(L._seal(bad))
        got = []
        with pytest.raises(ValueError) as raised:
            for e in plog.walk(*args, decode=True):
                got.append(e)
        assert str(raised.value) == str(want.value)
        assert got == [L.decode_entry(r) for r in raws[:3]]
