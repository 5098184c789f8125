"""Lite undo journal: makes updates of several 8-byte words atomic.

Multi-inode operations (create, mknod, mkdir, symlink, link, unlink, rmdir,
rename) and log compaction (head and tail of one inode) first append their entries to every inode's log without
moving the tails, then move all tails (and flip inode state words) through
one journal transaction:

1. store the undo records (address, old value), flush;     fence F1
2. store the journal word (count | crc << 32), flush;      fence F2  -> txn open
3. store every new value, flush;                           fence F3
4. store journal word 0, flush;                            fence F4  -> committed

On an image with inode replicas (SPEC 5.5) the records name the slot words
only; step 3 stores each new value in the word's replica too, and a rollback
restores both, so the two copies never differ once a transaction is closed.
Such an image also keeps a twin of the records in the next CPU's journal
block (SPEC 8.1), stored in step 1 before F1.  The journal word stays the one
commit point (a second word could not change with it, and a copy that says
"open" while the other says "closed" would be ambiguous); its CRC checks the
twin as it checks the records, and a reader falls back to the twin when the
records fail it or sit on a poisoned sector.

A crash before F2 leaves the word 0: nothing was changed in place.  A crash
after F2 and before F4 leaves an open transaction that recovery undoes by
writing the old values back (then clears the word).  After F4 every new
value is durable (F3) and the transaction is gone.
"""
from __future__ import annotations

import struct

from collections.abc import Callable

from . import layout as L
from .pmem import PMem

_REC = struct.Struct("<QQ")


class JournalError(Exception):
    pass


class Journal:
    """One CPU's lite journal block."""

    def __init__(self, pm: PMem, block: int,
                 mirror: Callable[[int], int | None] | None = None,
                 twin: int | None = None) -> None:
        self.pm = pm
        self.base = block * L.BLOCK
        # the replica of a word a record names (None: it has none)
        self.mirror = mirror
        # where the twin of the records is (None: no twin)
        self.twin = twin
        self.limit = L.J_MAX_RECORDS if twin is None else L.J_MAX_TWINNED
        self.from_twin = False          # the last pending() read the twin

    def _targets(self, a: int) -> tuple[int, ...]:
        r = self.mirror(a) if self.mirror is not None else None
        return (a,) if r is None else (a, r)

    def run(self, updates: list[tuple[int, int]]) -> None:
        """Atomically apply ``updates`` = [(device byte offset, new u64 value)]."""
        pm = self.pm
        n = len(updates)
        if n > self.limit:
            raise JournalError("transaction too large")
        recs = b"".join(_REC.pack(a, pm.read_u64(a)) for a, _ in updates)
        pm.store(self.base + L.J_RECORDS, recs)
        pm.flush(self.base + L.J_RECORDS, len(recs))
        if self.twin is not None:
            pm.store(self.twin, recs)
            pm.flush(self.twin, len(recs))
        pm.fence()                                       # F1: records, twin (and log entries) durable
        pm.store_u64(self.base, L.journal_word(n, recs))
        pm.flush(self.base, 8)
        pm.fence()                                       # F2: transaction open
        for a, v in updates:
            for t in self._targets(a):
                pm.store_u64(t, v)
                pm.flush(t, 8)
        pm.fence()                                       # F3: new values durable
        pm.store_u64(self.base, 0)
        pm.flush(self.base, 8)
        pm.fence()                                       # F4: committed

    def pending(self) -> list[tuple[int, int]] | None:
        """The undo records of an open transaction, None if none is open.

        Raises JournalError if the records do not match their checksum.
        """
        pm = self.pm
        if pm.poison and pm.poisoned(self.base, 8):
            raise JournalError("media error (poisoned sector)")
        word = pm.read_u64(self.base)
        n = word & 0xFFFFFFFF
        if n == 0:
            return None
        if n > L.J_MAX_RECORDS:
            raise JournalError(f"journal claims {n} records")
        self.from_twin = False
        size = n * L.J_RECORD
        if pm.poison and pm.poisoned(self.base + L.J_RECORDS, size):
            why = "media error in its records (poisoned sector)"
        else:
            recs = pm.read(self.base + L.J_RECORDS, size)
            if L.journal_word(n, recs) == word:
                return [_REC.unpack_from(recs, i * L.J_RECORD) for i in range(n)]
            why = "journal records fail their checksum"
        # the twin, checked by the same word
        if self.twin is not None and n <= L.J_MAX_TWINNED and \
                not (pm.poison and pm.poisoned(self.twin, size)):
            recs = pm.read(self.twin, size)
            if L.journal_word(n, recs) == word:
                self.from_twin = True
                return [_REC.unpack_from(recs, i * L.J_RECORD) for i in range(n)]
        raise JournalError(why)

    def rollback(self) -> int:
        """Undo an open transaction (recovery); return how many words were restored."""
        recs = self.pending()
        if not recs:
            return 0
        pm = self.pm
        for a, old in reversed(recs):
            for t in self._targets(a):
                pm.store_u64(t, old)
                pm.flush(t, 8)
        pm.fence()                                       # old values durable
        pm.store_u64(self.base, 0)
        pm.flush(self.base, 8)
        pm.fence()                                       # journal closed
        return len(recs)
