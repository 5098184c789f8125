"""Per-inode logs: chains of 4 KiB log pages holding 8-byte-aligned entries.

An inode's log runs from ``log_head`` (first page) to ``log_tail`` (the byte
just past the last committed entry).  Entries never cross a page: when one
does not fit, a NEXT_PAGE marker (if room) ends the page and writing goes on
in a new page linked through the page tail's ``next`` field.  Only the range
[head, tail) is meaningful; the tail page's ``next`` may point anywhere.

Appending writes and flushes entries past the tail without moving it; the
caller makes them visible with one atomic 8-byte store of the new tail
(:func:`commit_tail`, or the lite journal for several inodes at once).
"""
from __future__ import annotations

import struct
from collections.abc import Iterator

from . import layout as L
from .pmem import PMem

_U64 = struct.Struct("<Q")


class LogError(Exception):
    """A log chain or entry is malformed; the message says where and how."""


def init_page(pm: PMem, block: int, owner: int) -> None:
    """Write a fresh page tail (next = 0) and flush it."""
    off = block * L.BLOCK + L.PT_NEXT
    pm.store(off, L.pack_page_tail(owner))
    pm.flush(off, 32)


def append(pm: PMem, tail: int, entries: list[bytes], owner: int,
           new_page) -> tuple[int, list[int]]:
    """Write ``entries`` after ``tail``; return (new tail, new page blocks).

    ``new_page()`` allocates a log page block (it may raise ENOSPC; pages
    allocated so far are returned to the caller through the exception's
    ``pages`` attribute).  Everything written is flushed, nothing is fenced.
    """
    pos = tail
    pages: list[int] = []
    run_start = pos
    for e in entries:
        n = len(e)
        in_page = pos % L.BLOCK
        if in_page + n > L.LOG_DATA:
            if pos > run_start:
                pm.flush(run_start, pos - run_start)
            if in_page < L.LOG_DATA:
                pm.store(pos, L.NEXT_PAGE_ENTRY)
                pm.flush(pos, 8)
            try:
                blk = new_page()
            except Exception as exc:
                exc.pages = pages  # type: ignore[attr-defined]
                raise
            pages.append(blk)
            init_page(pm, blk, owner)
            link = pos - in_page + L.PT_NEXT
            pm.store_u64(link, blk * L.BLOCK)
            pm.flush(link, 8)
            pos = run_start = blk * L.BLOCK
        pm.store(pos, e)
        pos += n
    if pos > run_start:
        pm.flush(run_start, pos - run_start)
    return pos, pages


def commit_tail(pm: PMem, tail_addr: int, new_tail: int) -> None:
    """Make appended entries durable and visible: fence (entries and data durable
    before the tail moves), 8-byte tail store, flush, fence (the operation is
    durable once this returns)."""
    pm.commit_u64(tail_addr, new_tail)


def walk(pm: PMem, head: int, tail: int, owner: int, max_pages: int,
         pages: list[int] | None = None, start: int = 0,
         stop: dict | None = None) -> Iterator[bytes]:
    """Yield every committed entry (raw bytes), validating as it goes.

    The blocks of the chain's pages are appended to ``pages`` if given.
    ``start`` resumes an earlier walk at a position it reached (the old tail
    of a log that has grown since); the pages before it are not listed again.
    Raises LogError on a pointer out of bounds, a loop, a bad page tail, a
    torn or unknown entry, or a tail that is never reached.  With ``stop`` (a
    dict) it raises nothing: ``stop["pos"]`` follows the walk (while an entry
    is handed out, where that entry starts; at the end, just past the last
    good one) and ``stop["why"]`` says why the log ended before its tail
    (None: it did not).  Recovery of a disk-backed image cuts logs there.
    """
    if stop is None:
        yield from _walk(pm, head, tail, owner, max_pages, pages, start, None)
        return
    stop["pos"], stop["why"] = start or head, None
    try:
        yield from _walk(pm, head, tail, owner, max_pages, pages, start, stop)
    except LogError as e:
        stop["why"] = str(e)


def _walk(pm: PMem, head: int, tail: int, owner: int, max_pages: int,
          pages: list[int] | None, start: int, good: dict | None) -> Iterator[bytes]:
    dev = pm.size
    if head == 0:
        if tail != 0:
            raise LogError("log tail is set but the log has no head page")
        return
    if head % L.BLOCK or not (L.BLOCK <= head < dev):
        raise LogError(f"log head {head:#x} is not a page inside the device")
    if not (L.BLOCK <= tail < dev) or (tail % L.BLOCK > L.LOG_DATA) or \
            (tail % L.BLOCK == 0 and tail != head):
        raise LogError(f"log tail {tail:#x} is not a valid log position")
    mm = pm.mm
    if start:
        pos = start
        page = start - start % L.BLOCK
    else:
        pos = page = head
        _check_tail(pm, page, owner)
        if pages is not None:
            pages.append(page // L.BLOCK)
    npages = 1
    while pos != tail:
        in_page = pos - page
        tail_here = page <= tail <= page + L.LOG_DATA
        if in_page < L.LOG_DATA:
            etype, _f, size, _c = L._HDR.unpack_from(mm, pos)
            if not (etype == L.E_NEXT_PAGE and size == 8):
                if size < 8 or size % 8 or in_page + size > L.LOG_DATA:
                    raise LogError(f"entry at {pos:#x} has a bad size {size}")
                if tail_here and pos + size > tail:
                    raise LogError(f"log tail {tail:#x} falls inside the entry at {pos:#x}")
                raw = mm[pos:pos + size]
                if not L.entry_crc_ok(raw):
                    name = L.ENTRY_NAMES.get(etype, f"type {etype}")
                    raise LogError(f"{name} entry at {pos:#x} fails its checksum")
                yield raw
                pos += size
                if good is not None:
                    good["pos"] = pos
                continue
            if tail_here:
                raise LogError(f"next-page marker at {pos:#x} before the log tail {tail:#x}")
        elif tail_here:
            raise LogError(f"log tail {tail:#x} is past the end of page {page:#x}")
        page = _next(pm, page, owner, dev)
        npages += 1
        if npages > max_pages:
            raise LogError("log chain loops or is longer than the device")
        if pages is not None:
            pages.append(page // L.BLOCK)
        pos = page
        if good is not None:
            # the next entry starts here (the entry before ended in the page
            # before, at a next-page marker)
            good["pos"] = pos


def _next(pm: PMem, page: int, owner: int, dev: int) -> int:
    nxt = _U64.unpack_from(pm.mm, page + L.PT_NEXT)[0]
    if nxt == 0:
        raise LogError(f"log ends at page {page:#x} before reaching its tail")
    if nxt % L.BLOCK or not (L.BLOCK <= nxt < dev):
        raise LogError(f"log page {page:#x} links to {nxt:#x}, outside the device")
    _check_tail(pm, nxt, owner)
    return nxt


def _check_tail(pm: PMem, page: int, owner: int) -> None:
    if pm.poison and pm.poisoned(page, L.BLOCK):
        # a machine check on reading it: handled as a failed checksum would be
        raise LogError(f"log page {page:#x} has a media error (poisoned sector)")
    why = L.check_page_tail(pm.mm[page + L.PT_NEXT:page + L.BLOCK], owner)
    if why:
        raise LogError(f"log page {page:#x}: {why}")


def chain_pages(pm: PMem, head: int, tail: int, owner: int, max_pages: int) -> list[int]:
    """Block numbers of the pages from ``head`` to the page that holds ``tail``,
    following the links and checking each page tail (owner, checksum) but not
    the entries; LogError when the links do not lead there."""
    dev = pm.size
    if head % L.BLOCK or not (L.BLOCK <= head < dev):
        raise LogError(f"log head {head:#x} is not a page inside the device")
    _check_tail(pm, head, owner)
    page = head
    out = [head // L.BLOCK]
    while not (page <= tail <= page + L.LOG_DATA):
        page = _next(pm, page, owner, dev)
        out.append(page // L.BLOCK)
        if len(out) > max_pages:
            raise LogError("log chain loops or is longer than the device")
    return out


def pages_of(pm: PMem, head: int, tail: int) -> list[int]:
    """Block numbers of a (validated) chain's pages, head page to tail page."""
    if head == 0:
        return []
    out = [head // L.BLOCK]
    page = head
    while tail // L.BLOCK != page // L.BLOCK:
        page = _U64.unpack_from(pm.mm, page + L.PT_NEXT)[0]
        out.append(page // L.BLOCK)
    return out
