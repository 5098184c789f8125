"""Atomic operations on shared memory, for state several processes change at once.

Python has no atomics of its own, and a plain ``+=`` on a shared numpy array
loses updates between processes.  :class:`SharedWords` is pnova's compiled
helper ``pnova._atomic`` (``pnova/_atomic.c``, built when the package is
installed): each word method is one GCC ``__atomic`` builtin, sequentially
consistent, behind a fast-call entry point, so one costs about what any
Python method call costs (DESIGN section 17 has the measurements).

    w = SharedWords(mapping)       # keeps the mapping's buffer until release()
    w.load32(off) / w.store32(off, v) / w.cas32(off, expected, desired) / w.add32(off, d)
    w.load64(off) / w.store64(off, v) / w.cas64(off, expected, desired) / w.add64(off, d)
    w.load64s(off, count, stride)              # several u64 words, each loaded whole
    w.rdlock(off, stop, clear, rec) / w.rdunlock(off, rec)
                                   # a reader's share of a lock word and its record
                                   # (pnova.locks.Semaphores), each one call
    w.rw_pair(roff, woff, rec, stop, mine) / w.bump_unlock(voff, woff, by)
    w.versions_match(deaths_off, deaths, epoch_off, epoch, rewrites_off, rewrites,
                     version_off, version)
                                   # a namespace operation's first two locks, a
                                   # name's version counted and its lock let go,
                                   # and the look at a cached directory's versions
                                   # (pnova.namei), each one call
    w.fresh_mark(off, g, mask) / w.fresh_take(off, g, mask)
    w.fresh_note(off, mask, started, synced, running)
                                   # a disk image's fresh-block words (pnova.alloc)
    w.stash_pop(count, slots) / w.stash_push(count, slots, cap, v)
                                   # a one-owner stack of u64 (a CPU's stash of blocks)
    w.fresh_pop(...) / w.fresh_push(...) / w.held_due(...)
                                   # a disk image's commonest allocator steps, one
                                   # call each (pnova.alloc, DESIGN 24)

The stash and fresh calls are short sequences of such atomic steps, not one:
they are correct because only the process acting as a CPU changes its stash.

Offsets are byte offsets, naturally aligned (4 for 32-bit words, 8 for 64-bit);
an offset outside the mapping or misaligned raises ValueError.  ``add`` wraps
(a negative delta subtracts) and returns the old value; ``cas`` returns True
when the word held ``expected`` and now holds ``desired``.
"""
from __future__ import annotations

from ._atomic import Words as SharedWords

__all__ = ["SharedWords"]
