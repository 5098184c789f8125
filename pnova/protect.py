"""Protection of file data against media errors (NOVA-Fortis's data side).

Every block that holds file data (a page of a regular file, a symlink's
target) has a protection record, written with the copy-on-write block and
before the log entry that makes the block part of the file: eight CRC32C
checksums, one per 512-byte strip, kept twice (in two areas of the block's
region, apart from each other), and one parity strip, the XOR of the eight
(SPEC 9.1).  Data blocks are never changed in place while a file refers to
them, so a record written once stays right until the block is freed.

A read checks the strips it returns against the primary checksums.  A strip
that fails (or lies in a poisoned sector) is rebuilt from the parity and the
other seven, checked against its checksum and written back; what cannot be
rebuilt (two bad strips in one block, a bad parity) is reported to the
caller, which answers EIO for those bytes and never returns wrong ones.  A
checksum copy that disagrees with good data is rewritten from the data.

The arithmetic is :mod:`pnova._protect` (compiled); every store goes through
the pmem layer.
"""
from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass, field

import numpy as np

from . import _protect
from . import layout as L
from .pmem import SECTOR, PMem

logger = logging.getLogger("pnova")

STRIPS = L.STRIPS
STRIP = L.STRIP
_matches = _protect.matches
_good_run = _protect.good_run


def describe_protection(features: int) -> str:
    """The protection of file data that ``features`` gives, in words."""
    if not features & L.FEATURE_DATA_CSUM:
        return "not checksummed"
    if features & L.FEATURE_DATA_PARITY:
        return "checksummed (two copies) with parity"
    return "checksummed (two copies), no parity"


@dataclass
class Examined:
    """What one data block's check found (and, with repair, did)."""
    block: int
    bad: list[int] = field(default_factory=list)       # strips still bad (unrecoverable)
    rebuilt: list[int] = field(default_factory=list)   # strips rebuilt from parity
    csum_fixed: list[int] = field(default_factory=list)  # checksum copies rewritten (1, 2)
    parity_fixed: bool = False                         # a stale parity strip rewritten

    @property
    def ok(self) -> bool:
        return not (self.bad or self.rebuilt or self.csum_fixed or self.parity_fixed)


class DataProtection:
    """Checksums and parity of the file data blocks of one device."""

    def __init__(self, pm: PMem, sb: L.Superblock, regions: list[L.Region]) -> None:
        self.pm = pm
        self.csum = sb.data_csum
        self.parity = sb.data_parity
        # version 4 write entries carry the data digest (SPEC 7.2); a version-3
        # image keeps version-3 entries
        self.digests = self.csum and sb.version >= 4
        self.regions = regions
        self._starts = [r.data_start for r in regions]
        # per region: (data_start, end, record base, replica base, parity base),
        # precomputed: the region's properties chain, and a read asks each time
        self._where = [(r.data_start, r.end, r.csum_start * L.BLOCK, r.csum2_start * L.BLOCK,
                        r.parity_start * L.BLOCK) for r in regions]
        self.repaired = 0            # strips rebuilt and copies rewritten since mount
        self.lost = 0                # blocks found with strips that could not be rebuilt

    def summary(self) -> str:
        """How file data is protected, for the mount log."""
        if not self.csum:
            return "file data: no checksums (formatted with --no-data-csum)"
        how = (f"file data: a CRC32C per 512-byte strip, kept twice, computed with "
               f"{_protect.implementation()}")
        if not self.parity:
            return how + "; no parity (formatted with --no-data-parity)"
        return how + ", and a parity strip per block"

    # ------------------------------------------------------------ where
    def records(self, block: int) -> tuple[int, int, int]:
        """Byte offsets of ``block``'s checksum record, its replica and its parity."""
        i = bisect.bisect_right(self._starts, block) - 1
        if i < 0:
            raise ValueError(f"block {block} is not a data block")
        start, end, c1, c2, par = self._where[i]
        if block >= end:
            raise ValueError(f"block {block} is not a data block")
        k = block - start
        return c1 + L.CSUM_SIZE * k, c2 + L.CSUM_SIZE * k, par + L.PARITY_SIZE * k

    # ------------------------------------------------------------ writing
    def seal(self, start: int, count: int) -> int | None:
        """Write the records of blocks start..start+count-1 (one extent of one
        region, just filled) and flush them; the caller's commit fences them
        before the entry that refers to the blocks.  Returns the extent's data
        digest (CRC32C of its strip checksums), which the write entry carries
        so that recovery can tell whether the data reached a disk (None
        without checksums)."""
        if not self.csum:
            return None
        pm = self.pm
        c1, c2, p = self.records(start)
        if not self.parity:
            p = -1
        digest = pm.store_seal(start * L.BLOCK, count, c1, c2, p)
        n = count * L.CSUM_SIZE
        pm.flush(c1, n)
        pm.flush(c2, n)
        if p >= 0:
            pm.flush(p, count * L.PARITY_SIZE)
        return digest if self.digests else None

    def reseal(self, start: int, count: int) -> None:
        """Rewrite the records of blocks whose data is known good (a write entry's
        digest matched it) where they disagree with it: after a power loss
        the data's page may have reached the disk without its records'."""
        mm = self.pm.mm
        for b in range(start, start + count):
            sums, par = _protect.seal(mm, b * L.BLOCK, 1)      # computes, stores nothing
            c1, c2, p = self.records(b)
            if mm[c1:c1 + len(sums)] != sums or mm[c2:c2 + len(sums)] != sums or \
                    (self.parity and mm[p:p + len(par)] != par):
                self.seal(b, 1)

    def digest(self, start: int, count: int) -> int:
        """The data digest of blocks start..start+count-1 as they are now."""
        return _protect.crc32c(_protect.checksums(self.pm.mm, start * L.BLOCK, count))

    # ------------------------------------------------------------ reading
    def good_run(self, start: int, count: int) -> int:
        """How many of blocks start..start+count-1, from the first on, match
        their checksums (``count`` when all do); one call for an extent a read
        returns.  Nothing is repaired: the caller gives the first block that
        does not match to :meth:`verify`.  Stops at the end of a region (its
        records are contiguous only within it) and at once when sectors are
        poisoned (:meth:`verify` checks those)."""
        if not self.csum:
            return count
        pm = self.pm
        if pm.poison:
            return 0
        i = bisect.bisect_right(self._starts, start) - 1
        if i < 0:
            raise ValueError(f"block {start} is not a data block")
        data_start, end, c1, _c2, _par = self._where[i]
        count = min(count, end - start)
        return _good_run(pm.mm, start * L.BLOCK, count, c1 + L.CSUM_SIZE * (start - data_start))

    def verify(self, block: int) -> list[int]:
        """The strips of ``block`` that cannot be trusted, after repairing what can
        be repaired (empty: the whole block is good)."""
        if not self.csum:
            return []
        pm = self.pm
        if not pm.poison and _matches(pm.mm, block * L.BLOCK, self.records(block)[0]):
            return []
        found = self.examine(block, repair=not pm.readonly)
        if found.rebuilt or found.csum_fixed:
            logger.warning("data block %d: %s", block, self.describe(found))
        if pm.readonly and found.rebuilt:
            # rebuilt but not written back: the medium still holds the damage,
            # and that is what a read would copy
            return sorted(found.bad + found.rebuilt)
        return found.bad

    def examine(self, block: int, repair: bool) -> Examined:
        """Check every strip of ``block``, both checksum copies and the parity;
        with ``repair``, rebuild a single bad strip and rewrite bad copies."""
        pm, mm = self.pm, self.pm.mm
        out = Examined(block)
        if not self.csum:
            return out
        c1, c2, p = self.records(block)
        base = block * L.BLOCK
        unreadable = {s - base // SECTOR for s in pm.poisoned(base, L.BLOCK)}
        got = _sums(_protect.checksums(mm, base, 1))
        copies = [None if pm.poisoned(c, L.CSUM_SIZE) else _sums(mm[c:c + L.CSUM_SIZE])
                  for c in (c1, c2)]
        par_ok = self.parity and not pm.poisoned(p, L.PARITY_SIZE)

        def expected(k: int) -> set[int]:
            return {c[k] for c in copies if c is not None}

        bad = [k for k in range(STRIPS) if k in unreadable or got[k] not in expected(k)]
        strips = np.frombuffer(mm, dtype=np.uint8, count=L.BLOCK, offset=base).reshape(STRIPS, STRIP)
        if bad and not unreadable and par_ok and (None in copies or copies[0] != copies[1]) \
                and bytes(np.bitwise_xor.reduce(strips, axis=0)) == mm[p:p + L.PARITY_SIZE]:
            # Data and parity agree and the two checksum copies do not (or one
            # is unreadable): the copies are what is damaged, so the data stands.
            # Two copies that agree are trusted over data and parity, which may
            # both be a block's earlier contents.
            bad = []
        truth = list(got)                        # the checksums of the right data
        if len(bad) == 1 and par_ok:
            k = bad[0]
            others = np.delete(strips, k, axis=0)
            parity = np.frombuffer(mm, dtype=np.uint8, count=STRIP, offset=p)
            rebuilt = bytes(np.bitwise_xor.reduce(np.vstack([others, parity[None, :]]), axis=0))
            del parity
            crc = _protect.crc32c(rebuilt)
            if crc in expected(k):
                out.rebuilt = [k]
                truth[k] = crc
                if repair:
                    pm.store(base + k * STRIP, rebuilt)
                    pm.flush(base + k * STRIP, STRIP)
                bad = []
        del strips
        out.bad = bad
        if bad:
            self.lost += 1
            return out
        good = _pack(truth)
        for i, (c, copy) in enumerate(zip((c1, c2), copies)):
            if copy is None or copy != truth:
                out.csum_fixed.append(i + 1)
                if repair and pm.poison and pm.poisoned(c, L.CSUM_SIZE):
                    self._rewrite_sector(block, c, (c2, c1)[i], good)
                elif repair:
                    pm.store(c, good)
                    pm.flush(c, L.CSUM_SIZE)
        if self.parity and not out.rebuilt:      # a rebuild proved the parity right
            strips = np.frombuffer(mm, dtype=np.uint8, count=L.BLOCK,
                                   offset=base).reshape(STRIPS, STRIP)
            want = bytes(np.bitwise_xor.reduce(strips, axis=0))
            del strips
            if pm.poisoned(p, L.PARITY_SIZE) or mm[p:p + L.PARITY_SIZE] != want:
                out.parity_fixed = True
                if repair:
                    pm.store(p, want)
                    pm.flush(p, L.PARITY_SIZE)
        if repair and not out.ok:
            pm.fence()
            self.repaired += len(out.rebuilt) + len(out.csum_fixed) + out.parity_fixed
        return out

    def _rewrite_sector(self, block: int, c: int, other: int, good: bytes) -> None:
        """Rewrite the poisoned sector that holds ``block``'s record at ``c`` whole
        (which clears the poison; a smaller store would not): ``good`` for
        this block, and for each other block of the sector the record that
        matches it, taken from the other copy's sector at ``other``.  Where
        that record disagrees with its block, the block's own checksums are
        taken if its parity agrees with its data (the record was the damaged
        one, as :meth:`examine` would find), else the other copy's record is
        kept (so a later check still sees the disagreement)."""
        pm, mm = self.pm, self.pm.mm
        at = c % SECTOR
        lo, olo = c - at, other - at
        first = block - at // L.CSUM_SIZE
        out = bytearray(SECTOR)
        for k in range(SECTOR // L.CSUM_SIZE):
            b = first + k
            off = k * L.CSUM_SIZE
            if b == block:
                out[off:off + L.CSUM_SIZE] = good
                continue
            rec = b"" if pm.poisoned(olo + off, L.CSUM_SIZE) else \
                bytes(mm[olo + off:olo + off + L.CSUM_SIZE])
            try:
                _, _, par = self.records(b)
            except ValueError:
                out[off:off + L.CSUM_SIZE] = rec or bytes(L.CSUM_SIZE)
                continue
            base = b * L.BLOCK
            if rec and pm.poisoned(base, L.BLOCK):
                out[off:off + L.CSUM_SIZE] = rec     # its data cannot vouch for anything
                continue
            mine = _protect.checksums(mm, base, 1)
            if rec == bytes(mine):
                out[off:off + L.CSUM_SIZE] = rec
                continue
            strips = np.frombuffer(mm, dtype=np.uint8, count=L.BLOCK,
                                   offset=base).reshape(STRIPS, STRIP)
            agree = self.parity and not pm.poisoned(par, L.PARITY_SIZE) and \
                bytes(np.bitwise_xor.reduce(strips, axis=0)) == mm[par:par + L.PARITY_SIZE]
            del strips
            out[off:off + L.CSUM_SIZE] = bytes(mine) if agree or not rec else rec
        pm.store(lo, bytes(out))
        pm.flush(lo, SECTOR)

    @staticmethod
    def describe(found: Examined) -> str:
        parts = []
        if found.rebuilt:
            parts.append("strip " + ", ".join(map(str, found.rebuilt)) + " rebuilt from parity")
        if found.csum_fixed:
            parts.append("checksum copy " + " and ".join(map(str, found.csum_fixed)) + " rewritten")
        if found.parity_fixed:
            parts.append("parity rewritten")
        if found.bad:
            parts.append("strip " + ", ".join(map(str, found.bad)) + " unreadable")
        return "; ".join(parts) or "good"


def strip_ranges(base: int, strips: list[int]) -> str:
    """'a..b, c..d': the bytes of ``strips`` of a block whose first byte is at
    ``base`` (a file offset), neighbouring strips run together."""
    runs: list[list[int]] = []
    for k in sorted(strips):
        if runs and runs[-1][1] == k:
            runs[-1][1] = k + 1
        else:
            runs.append([k, k + 1])
    return ", ".join(f"{base + a * STRIP}..{base + b * STRIP - 1}" for a, b in runs)


def _sums(raw: bytes) -> list[int]:
    return list(np.frombuffer(raw, dtype="<u4").tolist())


def _pack(sums: list[int]) -> bytes:
    return np.array(sums, dtype="<u4").tobytes()
