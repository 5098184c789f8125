"""Block allocation: one allocator per CPU region, NUMA partitions, local write first.

Each CPU owns a region of the device (inside its NUMA node's partition) and
keeps that region's free blocks as a sorted map of free extents
(start -> length).  An allocation is served from the calling CPU's region
first, then from the other regions of the same node, then from remote nodes
("Local Write First").  A freed block always returns to the region that owns
it, found by address.  Allocator state is DRAM only: a clean unmount saves it
as a bitmap, and crash recovery rebuilds it from the logs.
"""
from __future__ import annotations

import bisect

import numpy as np
from sortedcontainers import SortedDict

from .layout import Region


class RegionAllocator:
    """Free extents of one CPU's data area."""

    def __init__(self, region: Region) -> None:
        self.region = region
        self.lo = region.data_start
        self.hi = region.end
        self.free_map: SortedDict = SortedDict()   # start -> length
        self.nfree = 0

    def reset_free(self) -> None:
        """Mark the whole data area free."""
        self.free_map.clear()
        self.free_map[self.lo] = self.hi - self.lo
        self.nfree = self.hi - self.lo

    def load_used_bitmap(self, used: np.ndarray) -> None:
        """Build free extents from a bool array (True = in use) over the data area."""
        self.free_map.clear()
        free = ~used
        # run boundaries of the free runs
        d = np.diff(np.concatenate(([0], free.view(np.int8), [0])))
        starts = np.flatnonzero(d == 1)
        ends = np.flatnonzero(d == -1)
        for s, e in zip(starts.tolist(), ends.tolist()):
            self.free_map[self.lo + s] = e - s
        self.nfree = int(free.sum())

    def used_bitmap(self) -> np.ndarray:
        used = np.ones(self.hi - self.lo, dtype=bool)
        for s, n in self.free_map.items():
            used[s - self.lo:s - self.lo + n] = False
        return used

    def alloc(self, n: int) -> list[tuple[int, int]]:
        """Take up to ``n`` blocks as extents, lowest address first."""
        out: list[tuple[int, int]] = []
        fm = self.free_map
        while n > 0 and fm:
            start, length = fm.peekitem(0)
            take = min(n, length)
            del fm[start]
            if take < length:
                fm[start + take] = length - take
            out.append((start, take))
            n -= take
            self.nfree -= take
        return out

    def free(self, start: int, n: int) -> None:
        """Return [start, start+n) and merge it with its neighbours."""
        fm = self.free_map
        self.nfree += n
        i = fm.bisect_left(start)
        if i > 0:
            pstart, plen = fm.peekitem(i - 1)
            if pstart + plen > start:
                raise AssertionError(f"double free of block {start}")
            if pstart + plen == start:
                start, n = pstart, plen + n
                del fm[pstart]
                i -= 1
        if i < len(fm):
            nstart, nlen = fm.peekitem(i)
            if start + n > nstart:
                raise AssertionError(f"double free of block {nstart}")
            if start + n == nstart:
                n += nlen
                del fm[nstart]
        fm[start] = n

    def contains(self, block: int) -> bool:
        return self.lo <= block < self.hi


class Allocator:
    """All regions, with the Local-Write-First policy and a reserve for deletes."""

    def __init__(self, regions: list[Region], cpus_per_node: int, reserve: int) -> None:
        self.regions = [RegionAllocator(r) for r in regions]
        self.cpus_per_node = cpus_per_node
        self._starts = [r.region.start for r in self.regions]
        # Blocks kept back for metadata so that unlink/rmdir still work on a
        # full device (they must append to the parent's log).
        self.reserve = reserve

    @property
    def nfree(self) -> int:
        return sum(r.nfree for r in self.regions)

    @property
    def ntotal(self) -> int:
        return sum(r.hi - r.lo for r in self.regions)

    def order(self, cpu: int) -> list[RegionAllocator]:
        """Regions in Local-Write-First order for ``cpu``."""
        node = cpu // self.cpus_per_node
        local = self.regions[node * self.cpus_per_node:(node + 1) * self.cpus_per_node]
        same = [local[cpu % self.cpus_per_node]] + [r for r in local if r.region.cpu != cpu]
        remote = [r for r in self.regions if r.region.node != node]
        return same + remote

    def alloc(self, cpu: int, n: int, *, meta: bool = False) -> list[tuple[int, int]]:
        """Allocate ``n`` blocks as extents; raise ENOSPC (after undoing) if short.

        Data allocations may not dip into the reserve; metadata (log pages) may.
        """
        from .errors import FsError
        import errno
        if n > self.nfree - (0 if meta else self.reserve):
            raise FsError(errno.ENOSPC)
        out: list[tuple[int, int]] = []
        for ra in self.order(cpu):
            if n == 0:
                break
            got = ra.alloc(n)
            out.extend(got)
            n -= sum(c for _, c in got)
        if n:
            for s, c in out:
                self.free(s, c)
            raise FsError(errno.ENOSPC)
        return out

    def alloc_one(self, cpu: int, *, meta: bool = True) -> int:
        ((start, _),) = self.alloc(cpu, 1, meta=meta)
        return start

    def owner(self, block: int) -> RegionAllocator:
        i = bisect.bisect_right(self._starts, block) - 1
        ra = self.regions[i]
        if not ra.contains(block):
            raise AssertionError(f"block {block} is not a data block")
        return ra

    def free(self, start: int, n: int) -> None:
        """Give blocks back to the region(s) that own them."""
        while n > 0:
            ra = self.owner(start)
            take = min(n, ra.hi - start)
            ra.free(start, take)
            start += take
            n -= take
