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
from ._protect import log_scan
from .pmem import PMem

_U64 = struct.Struct("<Q")


class LogError(Exception):
    """A log chain or entry is malformed; the message says where and how."""


# A log page's twin (format 8, ``LOG_REPLICA``): a second page, from another
# CPU's region, holding the same entries at the same offsets and linked into a
# chain of its own; each page tail names the other page (SPEC 6).  ``fixes``
# lists below collect (byte offset, bytes) writes that would make both copies
# whole again; :func:`repair` makes them.
Fix = tuple[int, bytes]


def init_page(pm: PMem, block: int, owner: int, twin: int = 0) -> None:
    """Write a fresh page tail (next = 0) and flush it; with ``twin``, the twin's
    tail too (naming each other)."""
    off = block * L.BLOCK + L.PT_NEXT
    pm.store(off, L.pack_page_tail(owner, twin))
    pm.flush(off, 32)
    if twin:
        off = twin * L.BLOCK + L.PT_NEXT
        pm.store(off, L.pack_page_tail(owner, block | L.TWIN_ROLE))
        pm.flush(off, 32)


def twin_of(pm: PMem, page: int) -> int:
    """The block of the twin of the primary log page at byte offset ``page``
    (0: it has none); LogError when the page tail does not read."""
    raw = pm.mm[page + L.PT_NEXT:page + L.BLOCK]
    why = L.check_page_tail(raw)
    if why:
        raise LogError(f"log page {page:#x}: {why}")
    t = L.page_tail_twin(raw)
    if t & L.TWIN_ROLE:
        raise LogError(f"log page {page:#x} is a twin, not a primary page")
    return t


def append(pm: PMem, tail: int, entries: list[bytes], owner: int,
           new_page, twin: int | None = None) -> tuple[int, list[int]]:
    """Write ``entries`` after ``tail``; return (new tail, new page blocks).

    ``twin`` is the block of the twin of the page that holds ``tail`` (0:
    none; None: read from that page's tail); every entry is written to both
    copies at the same offset.  ``new_page()`` allocates a log page and its
    twin, as a pair of blocks (the twin 0 when the log has none); it may raise
    ENOSPC, and the pages allocated so far are then returned to the caller
    through the exception's ``pages`` attribute.  The blocks returned list
    each page followed by its twin.  Everything written is flushed, nothing
    is fenced.
    """
    pos = tail
    page = tail - tail % L.BLOCK
    tw = twin_of(pm, page) if twin is None else twin
    delta = tw * L.BLOCK - page
    pages: list[int] = []
    run_start = pos
    for e in entries:
        n = len(e)
        in_page = pos - page
        if in_page + n > L.LOG_DATA:
            if pos > run_start:
                _flush_run(pm, run_start, pos - run_start, tw, delta)
            if in_page < L.LOG_DATA:
                pm.store(pos, L.NEXT_PAGE_ENTRY)
                pm.flush(pos, 8)
                if tw:
                    pm.store(pos + delta, L.NEXT_PAGE_ENTRY)
                    pm.flush(pos + delta, 8)
            try:
                blk, tblk = new_page()
            except Exception as exc:
                exc.pages = pages  # type: ignore[attr-defined]
                raise
            pages.append(blk)
            if tblk:
                pages.append(tblk)
            init_page(pm, blk, owner, tblk)
            link = page + L.PT_NEXT
            pm.store_u64(link, blk * L.BLOCK)
            pm.flush(link, 8)
            if tw and tblk:
                pm.store_u64(link + delta, tblk * L.BLOCK)
                pm.flush(link + delta, 8)
            page = pos = run_start = blk * L.BLOCK
            tw = tblk
            delta = tw * L.BLOCK - page
        pm.store(pos, e)
        pos += n
    if pos > run_start:
        _flush_run(pm, run_start, pos - run_start, tw, delta)
    return pos, pages


def _flush_run(pm: PMem, start: int, n: int, tw: int, delta: int) -> None:
    """Flush entries just stored at ``start``; copy them into the twin first."""
    if tw:
        pm.store_copy(start + delta, start, n)
        pm.flush(start + delta, n)
    pm.flush(start, n)


def store_entry(pm: PMem, pos: int, raw: bytes, twin: int) -> None:
    """Store and flush one entry at ``pos`` and at the same offset of the page's
    twin block ``twin`` (0: none); the caller knows it fits."""
    pm.store(pos, raw)
    pm.flush(pos, len(raw))
    if twin:
        t = twin * L.BLOCK + pos % L.BLOCK
        pm.store(t, raw)
        pm.flush(t, len(raw))


def commit_tail(pm: PMem, tail_addr: int, new_tail: int) -> None:
    """Make appended entries durable and visible: fence (entries and data durable
    before the tail moves), 8-byte tail store, flush, fence (the operation is
    durable once this returns)."""
    pm.commit_u64(tail_addr, new_tail)


def repair(pm: PMem, fixes: list[Fix]) -> None:
    """Make the writes a walk's ``fixes`` list (each flushed), then fence.  Only
    while no one else appends to or frees the log (fsck, a mount before it
    serves)."""
    for off, data in fixes:
        pm.store(off, data)
        pm.flush(off, len(data))
    if fixes:
        pm.fence()


def walk(pm: PMem, head: int, tail: int, owner: int, max_pages: int,
         pages: list[int] | None = None, start: int = 0,
         stop: dict | None = None, twin: int | None = None,
         fixes: list[Fix] | None = None, verify: bool = False,
         decode: bool = False) -> Iterator[bytes] | Iterator[tuple]:
    """Yield every committed entry (raw bytes, or with ``decode`` the tuple
    :func:`layout.decode_entry` makes of it, raising its ValueError), validating
    as it goes.

    The blocks of the chain's pages are appended to ``pages`` if given, each
    page followed by its twin.  ``start`` resumes an earlier walk at a
    position it reached (the old tail of a log that has grown since); the
    pages before it are not listed again.  ``twin`` is the block of the twin
    of the first page walked (from the slot or the log array line; None: take
    it from that page's tail).  Where a primary entry or page tail does not
    read, its twin's is used, and the writes that would restore the damaged
    copy are added to ``fixes``; with ``verify`` the twin is compared with
    the primary too, so that damage to a twin is found.  Raises LogError on a
    pointer out of bounds, a loop, a page tail or entry bad in both copies, or
    a tail that is never reached.  With ``stop`` (a dict) it raises nothing:
    ``stop["pos"]`` follows the walk (while an entry is handed out, where that
    entry starts; at the end, just past the last good one) and ``stop["why"]``
    says why the log ended before its tail (None: it did not).  Recovery of a
    disk-backed image cuts logs there.
    """
    if stop is None:
        yield from _walk(pm, head, tail, owner, max_pages, pages, start, None, twin,
                         fixes, verify, decode)
        return
    stop["pos"], stop["why"] = start or head, None
    try:
        yield from _walk(pm, head, tail, owner, max_pages, pages, start, stop, twin,
                         fixes, verify, decode)
    except LogError as e:
        stop["why"] = str(e)


def _walk(pm: PMem, head: int, tail: int, owner: int, max_pages: int,
          pages: list[int] | None, start: int, good: dict | None, twin: int | None,
          fixes: list[Fix] | None, verify: bool, decode: bool = False
          ) -> Iterator[bytes] | Iterator[tuple]:
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
    if start:
        pos = start
        page = start - start % L.BLOCK
    else:
        pos = page = head
    tw = _open(pm, page, owner, twin, dev, fixes, verify)
    if pages is not None and not start:
        pages.append(page // L.BLOCK)
        if tw:
            pages.append(tw)
    mm = pm.mm
    npages = 1
    # The entries that read are taken a page's run at a time by the compiled
    # helper; whatever stops its scan (a next-page marker, an entry that does
    # not read) is looked at below.  Not where a copy of the page may hold
    # what the primary lacks (poisoned sectors, a verifying walk) or where
    # each entry's position is reported.
    fast = good is None and not verify and not pm.poison
    scanned = -1
    while pos != tail:
        in_page = pos - page
        tail_here = page <= tail <= page + L.LOG_DATA
        if in_page < L.LOG_DATA:
            if fast and pos != scanned:
                raws, pos = log_scan(mm, pos, tail if tail_here else page + L.LOG_DATA,
                                     decode)
                scanned = pos
                if raws:
                    yield from raws
                    continue
            lim = tail if tail_here else 0
            raw, why = _entry_at(pm, mm, pos, in_page, lim)
            if why is not None:
                if not tw:
                    raise LogError(why)
                raw = _twin_entry(pm, mm, in_page, lim, tw, why)
                if fixes is not None:
                    fixes.append((pos, raw))
            elif verify and tw and fixes is not None:
                t = tw * L.BLOCK + in_page
                if mm[t:t + len(raw)] != raw:
                    fixes.append((t, bytes(raw)))
            if raw[0] != L.E_NEXT_PAGE or len(raw) != 8:     # (the marker is 8 bytes)
                yield L.decode_entry(raw) if decode else raw
                pos += len(raw)
                if good is not None:
                    good["pos"] = pos
                continue
            if tail_here:
                raise LogError(f"next-page marker at {pos:#x} before the log tail {tail:#x}")
        elif tail_here:
            raise LogError(f"log tail {tail:#x} is past the end of page {page:#x}")
        if tw:
            page, tw = _next_pair(pm, page, tw, owner, dev, fixes, verify)
        else:
            page = _next(pm, page, owner, dev)
        npages += 1
        if npages > max_pages:
            raise LogError("log chain loops or is longer than the device")
        if pages is not None:
            pages.append(page // L.BLOCK)
            if tw:
                pages.append(tw)
        pos = page
        if good is not None:
            # the next entry starts here (the entry before ended in the page
            # before, at a next-page marker)
            good["pos"] = pos


def _entry_at(pm: PMem, mm, pos: int, in_page: int, tail: int) -> tuple[bytes | None, str | None]:
    """(the entry or next-page marker at ``pos``, None), or (None, why it does
    not read); ``tail`` (0: not in this page) bounds the last entry."""
    etype, _f, size, _c = L._HDR.unpack_from(mm, pos)
    if etype == L.E_NEXT_PAGE and size == 8:
        if pm.poison and pm.poisoned(pos, 8):
            return None, f"entry at {pos:#x} has a media error (poisoned sector)"
        return L.NEXT_PAGE_ENTRY, None
    if size < 8 or size % 8 or in_page + size > L.LOG_DATA:
        return None, f"entry at {pos:#x} has a bad size {size}"
    if tail and pos + size > tail:
        return None, f"log tail {tail:#x} falls inside the entry at {pos:#x}"
    if pm.poison and pm.poisoned(pos, size):
        return None, f"entry at {pos:#x} has a media error (poisoned sector)"
    raw = mm[pos:pos + size]
    if not L.entry_crc_ok(raw):
        name = L.ENTRY_NAMES.get(etype, f"type {etype}")
        return None, f"{name} entry at {pos:#x} fails its checksum"
    return raw, None


def _twin_entry(pm: PMem, mm, in_page: int, tail: int, tw: int, why: str) -> bytes:
    """The twin's copy of an entry whose primary does not read (``why``);
    LogError when the twin's does not read either."""
    t = tw * L.BLOCK
    traw, twhy = _entry_at(pm, mm, t + in_page, in_page, tail and t + tail % L.BLOCK)
    if twhy is not None:
        raise LogError(why)
    return bytes(traw)


def _tail_of(pm: PMem, page: int, owner: int, twin_role: bool) -> tuple[int | None, str | None]:
    """(the other page its tail names, None) for a log page at byte offset
    ``page`` whose tail reads, is ``owner``'s and has the expected role; else
    (None, why not)."""
    if pm.poison and pm.poisoned(page, L.BLOCK):
        return None, f"log page {page:#x} has a media error (poisoned sector)"
    raw = pm.mm[page + L.PT_NEXT:page + L.BLOCK]
    why = L.check_page_tail(raw, owner)
    if why:
        return None, f"log page {page:#x}: {why}"
    t = L.page_tail_twin(raw)
    if bool(t & L.TWIN_ROLE) != twin_role:
        return None, f"log page {page:#x} is {'not ' if twin_role else ''}a twin page"
    return t & ~L.TWIN_ROLE, None


def _in_dev(off: int, dev: int) -> bool:
    return off % L.BLOCK == 0 and L.BLOCK <= off < dev


def _open(pm: PMem, page: int, owner: int, twin: int | None, dev: int,
          fixes: list[Fix] | None, verify: bool) -> int:
    """Check the first page a walk reads; return its twin's block (0: none)."""
    t, why = _tail_of(pm, page, owner, False)
    if why is None:
        # the page tail (under its checksum) says which twin it has
        if t and (verify or fixes is not None):
            _check_twin(pm, page, t, owner, dev, fixes)
        return t
    if not twin or not _in_dev(twin * L.BLOCK, dev):
        raise LogError(why)
    p, twhy = _tail_of(pm, twin * L.BLOCK, owner, True)
    if twhy is not None or p * L.BLOCK != page:
        raise LogError(f"{why}; its twin does not read either")
    if fixes is not None:
        _restore(pm, page, twin * L.BLOCK, owner, twin, fixes)
    return twin


def _check_twin(pm: PMem, page: int, twin: int, owner: int, dev: int,
                fixes: list[Fix] | None) -> None:
    """A twin page whose primary reads: its tail must name the primary back."""
    toff = twin * L.BLOCK
    if not _in_dev(toff, dev):
        raise LogError(f"log page {page:#x} names a twin outside the device")
    p, why = _tail_of(pm, toff, owner, True)
    if (why is not None or p * L.BLOCK != page) and fixes is not None:
        _restore(pm, toff, page, owner, page // L.BLOCK | L.TWIN_ROLE, fixes)


def _restore(pm: PMem, bad: int, good: int, owner: int, named: int,
             fixes: list[Fix]) -> None:
    """Fixes that rebuild the log page at ``bad`` from its other copy at
    ``good``: a poisoned page whole, else its tail (next is set when the walk
    moves on)."""
    if pm.poison and pm.poisoned(bad, L.BLOCK):
        # the link stays what it reads as now: the walk compares the pair it
        # moves to with it and adds the fix of the link after this one
        body = bytes(pm.mm[good:good + L.LOG_DATA])
        link = bytes(pm.mm[bad + L.PT_NEXT:bad + L.PT_OWNER])
        fixes.append((bad, body + link + L.pack_page_tail(owner, named)[8:]))
    else:
        fixes.append((bad + L.PT_OWNER, L.pack_page_tail(owner, named)[8:]))


def _next_pair(pm: PMem, page: int, tw: int, owner: int, dev: int,
               fixes: list[Fix] | None, verify: bool) -> tuple[int, int]:
    """The next (page, twin block) of a twinned chain.  Neither copy's ``next``
    is under a checksum, but each page tail names its other copy: of the
    pairs the two links lead to, the one whose tails confirm each other
    (and the links) most is taken, and a link that disagrees is fixed."""
    toff = tw * L.BLOCK
    mm = pm.mm
    np_ = _U64.unpack_from(mm, page + L.PT_NEXT)[0]
    nt = _U64.unpack_from(mm, toff + L.PT_NEXT)[0]
    best: tuple[int, int, int] | None = None
    cands: list[tuple[int, int]] = []
    for x, y in _candidates(pm, np_, nt, owner, dev):
        score = (x == np_) + (y * L.BLOCK == nt)
        tx, _ = _tail_of(pm, x, owner, False)
        ty, _ = _tail_of(pm, y * L.BLOCK, owner, True)
        score += (tx == y) + (ty is not None and ty * L.BLOCK == x)
        if tx is None and ty is None:
            continue
        if score >= 3:
            cands.append((x, y))
        if best is None or score > best[0]:
            best = (score, x, y)
    if best is None or best[0] < 2:
        if np_ == 0 and nt == 0:
            raise LogError(f"log ends at page {page:#x} before reaching its tail")
        if _in_dev(np_, dev):
            _, why = _tail_of(pm, np_, owner, False)
            if why:
                raise LogError(f"{why}; its twin ({nt:#x}) does not read either")
        raise LogError(f"log page {page:#x} links to {np_:#x} and its twin to {nt:#x}; "
                       "neither leads to a log page of this inode")
    _, x, y = best
    if len(cands) > 1:
        # Two pairs that both check: one link was damaged into another page of
        # this log.  The right one is the earlier: the other is reached from it.
        for cx, cy in cands:
            if (cx, cy) != (x, y) and _reaches(pm, (cx, cy), (x, y), owner, dev):
                x, y = cx, cy
                break
    if fixes is not None:
        if np_ != x:
            fixes.append((page + L.PT_NEXT, _U64.pack(x)))
        if nt != y * L.BLOCK:
            fixes.append((toff + L.PT_NEXT, _U64.pack(y * L.BLOCK)))
        tx, _ = _tail_of(pm, x, owner, False)
        ty, _ = _tail_of(pm, y * L.BLOCK, owner, True)
        if tx != y:
            _restore(pm, x, y * L.BLOCK, owner, y, fixes)
        elif ty is None or ty * L.BLOCK != x:
            _restore(pm, y * L.BLOCK, x, owner, x // L.BLOCK | L.TWIN_ROLE, fixes)
    return x, y


def _reaches(pm: PMem, a: tuple[int, int], b: tuple[int, int], owner: int, dev: int,
             steps: int = 16) -> bool:
    """Whether following the links from page pair ``a`` (either copy's) leads to
    pair ``b`` within a few pages."""
    page, tw = a
    for _ in range(steps):
        np_ = _U64.unpack_from(pm.mm, page + L.PT_NEXT)[0] if _in_dev(page, dev) else 0
        nt = _U64.unpack_from(pm.mm, tw * L.BLOCK + L.PT_NEXT)[0] \
            if _in_dev(tw * L.BLOCK, dev) else 0
        if np_ == b[0] or nt == b[1] * L.BLOCK:
            return True
        if _in_dev(np_, dev) and _tail_of(pm, np_, owner, False)[1] is None:
            page = np_
            tw = _tail_of(pm, np_, owner, False)[0] or 0
        elif _in_dev(nt, dev) and _tail_of(pm, nt, owner, True)[1] is None:
            tw = nt // L.BLOCK
            page = (_tail_of(pm, nt, owner, True)[0] or 0) * L.BLOCK
        else:
            return False
    return False


def _candidates(pm: PMem, np_: int, nt: int, owner: int, dev: int) -> list[tuple[int, int]]:
    """Pairs (page offset, twin block) the two links may lead to."""
    out = []
    if _in_dev(np_, dev):
        t, _ = _tail_of(pm, np_, owner, False)
        if t and _in_dev(t * L.BLOCK, dev):
            out.append((np_, t))
        elif _in_dev(nt, dev):
            out.append((np_, nt // L.BLOCK))
    if _in_dev(nt, dev):
        p, _ = _tail_of(pm, nt, owner, True)
        if p and _in_dev(p * L.BLOCK, dev) and (p * L.BLOCK, nt // L.BLOCK) not in out:
            out.append((p * L.BLOCK, nt // L.BLOCK))
    return out


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
    each followed by its twin, following the links and checking each page
    tail (owner, checksum) but not the entries; LogError when the links do not
    lead there."""
    dev = pm.size
    if head % L.BLOCK or not (L.BLOCK <= head < dev):
        raise LogError(f"log head {head:#x} is not a page inside the device")
    page = head
    tw = _open(pm, page, owner, None, dev, None, False)
    out = [head // L.BLOCK] + ([tw] if tw else [])
    n = 1
    while not (page <= tail <= page + L.LOG_DATA):
        if tw:
            page, tw = _next_pair(pm, page, tw, owner, dev, None, False)
            out += [page // L.BLOCK, tw]
        else:
            page = _next(pm, page, owner, dev)
            out.append(page // L.BLOCK)
        n += 1
        if n > max_pages:
            raise LogError("log chain loops or is longer than the device")
    return out
