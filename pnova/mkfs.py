"""Formatting: write an empty pnova filesystem onto a device file."""
from __future__ import annotations

import os
import stat
import time
import uuid as uuidlib

import numpy as np

from . import layout as L
from . import log as plog
from .engine import write_superblock
from .pmem import PMem


def default_inodes_per_cpu(total_blocks: int, ncpus: int) -> int:
    """One inode per 16 KiB of device, split over the CPUs, a block's worth at least."""
    n = total_blocks * L.BLOCK // (16 * 1024) // ncpus
    return max(L.INODES_PER_BLOCK, (n + L.INODES_PER_BLOCK - 1) // L.INODES_PER_BLOCK
               * L.INODES_PER_BLOCK)


def format_device(path: str, size: int, *, numa_nodes: int = 1, cpus_per_node: int | None = None,
                  inodes_per_cpu: int | None = None, label: bytes = b"",
                  uid: int | None = None, gid: int | None = None,
                  features: int = L.DEFAULT_FEATURES) -> L.Superblock:
    """Create/overwrite ``path`` with an empty filesystem of ``size`` bytes.

    ``features``: the protection of file data (SPEC 3; default checksums and
    parity).  Raises ValueError with a one-line reason for impossible geometry.
    """
    if features & ~L.KNOWN_FEATURES or (features & L.FEATURE_DATA_PARITY
                                        and not features & L.FEATURE_DATA_CSUM):
        raise ValueError(f"bad feature set {features:#x} (parity needs checksums)")
    if cpus_per_node is None:
        cpus_per_node = max(1, min(os.cpu_count() or 1, L.MAX_CPUS) // numa_nodes)
    ncpus = numa_nodes * cpus_per_node
    if numa_nodes < 1 or cpus_per_node < 1 or ncpus > L.MAX_CPUS:
        raise ValueError(f"need 1..{L.MAX_CPUS} CPUs in all, got {numa_nodes}x{cpus_per_node}")
    total = size // L.BLOCK
    if total < 64:
        raise ValueError("device too small: pnova needs at least 256 KiB")
    if inodes_per_cpu is None:
        inodes_per_cpu = default_inodes_per_cpu(total, ncpus)
    regions = L.plan_regions(total, numa_nodes, cpus_per_node, inodes_per_cpu, features)
    pm = PMem(path, size=total * L.BLOCK, create=True)
    try:
        sb = L.Superblock(total_blocks=total, numa_nodes=numa_nodes,
                          cpus_per_node=cpus_per_node, inodes_per_cpu=inodes_per_cpu,
                          uuid=uuidlib.uuid4().bytes, mkfs_time_ns=time.time_ns(),
                          label=label[:32], clean=1, next_seq=3, features=features)
        # First make any old filesystem unrecognisable: both superblock copies
        # and the region table go, durably, before anything else changes, so an
        # interrupted mkfs never leaves a stale replica describing the old
        # geometry, nor a table that leads to one (an old replica inside a
        # file that grew is not overwritten; SPEC 13.1 looks for it through
        # block 0 and the table).
        pm.store_zero(0, 2 * L.BLOCK)
        pm.store_zero((total - 1) * L.BLOCK, L.BLOCK)
        pm.flush(0, 2 * L.BLOCK)
        pm.flush((total - 1) * L.BLOCK, L.BLOCK)
        pm.fence()
        # Zero the metadata areas (inode tables, journals, bitmaps, checksums
        # and parity): a reused file may hold anything.
        for r in regions:
            pm.store_zero(r.start * L.BLOCK, (r.data_start - r.start) * L.BLOCK)
        table = b"".join(r.pack() for r in regions)
        pm.store(L.BLOCK, table)
        # Root directory: inode 1 (CPU 0, slot 0), its log in CPU 0's first data block.
        root_page = regions[0].data_start
        # ... and its twin (format 8) in the next CPU's first data block
        twin_region = regions[1 % len(regions)]
        root_twin = 0
        if sb.log_replicas:
            root_twin = twin_region.data_start + (1 if twin_region is regions[0] else 0)
        plog.init_page(pm, root_page, L.ROOT_INO, root_twin)
        now = time.time_ns()
        st = L.InodeStatic(stat.S_IFDIR | 0o755, os.getuid() if uid is None else uid,
                           os.getgid() if gid is None else gid, 0, 0, 1, now, 1)
        addr = regions[0].itable_start * L.BLOCK
        pm.store(addr, st.pack())
        # The root's '..' names the root itself, like every directory's '..' entry.
        dotdot = L.dentry_entry(2, L.D_ADD, L.DOTDOT, L.ROOT_INO, stat.S_IFDIR >> 12, now)
        pm.store(root_page * L.BLOCK, dotdot)
        if root_twin:
            pm.store(root_twin * L.BLOCK, dotdot)
            pm.store_u64(addr + L.I_LOG_HEAD_TWIN, root_twin * L.BLOCK)
        pm.store_u64(addr + L.I_LOG_HEAD, root_page * L.BLOCK)
        pm.store_u64(addr + L.I_LOG_TAIL, root_page * L.BLOCK + len(dotdot))
        pm.store_u64(addr + L.I_STATE, L.STATE_LIVE)
        replicas = L.replica_tables(regions)
        if replicas is not None:                # the root slot's second copy (SPEC 5.5)
            pm.store(replicas[0], pm.read(addr, L.INODE_SIZE))
        # Saved allocator state: everything free but the root's log page (and twin).
        for r in regions:
            used = np.zeros(r.data_blocks, dtype=bool)
            if r.cpu == 0:
                used[0] = True
            if root_twin and r.data_start <= root_twin < r.data_start + r.data_blocks:
                used[root_twin - r.data_start] = True
            bits = np.packbits(used, bitorder="little").tobytes()
            pm.store(r.bitmap_start * L.BLOCK, bits)
        pm.flush(0, pm.size)
        pm.fence()                              # everything but the superblock durable
        write_superblock(pm, sb)
        pm.sync()
    finally:
        pm.close()
    return sb
