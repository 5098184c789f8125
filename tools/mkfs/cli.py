"""mkfs.pnova: format a device file with an empty pnova filesystem."""
from __future__ import annotations

import argparse
import os
import sys

from pnova import layout as L
from pnova.engine import read_superblock
from pnova.errors import CorruptImage
from pnova.protect import describe_protection
from pnova.mkfs import format_device
from pnova.pmem import DeviceError, PMem
from pnova.util import image_locked, parse_size


def _has_filesystem(path: str) -> bool:
    try:
        pm = PMem(path, readonly=True)
    except DeviceError:
        return False
    try:
        read_superblock(pm)
        return True
    except CorruptImage:
        return False
    finally:
        pm.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mkfs.pnova",
                                 description="Format a file as a pnova persistent-memory device.")
    ap.add_argument("device", help="device file (created if missing)")
    ap.add_argument("-s", "--size", help="device size, e.g. 1G, 512M (default: the "
                    "existing file's size)")
    ap.add_argument("--numa-nodes", type=int, default=1, help="NUMA partitions (default 1)")
    ap.add_argument("--cpus-per-node", type=int, default=None,
                    help="CPU regions per node (default: this machine's CPUs / nodes)")
    ap.add_argument("-N", "--inodes", type=int, default=None,
                    help="total inodes (default: one per 16 KiB)")
    ap.add_argument("-L", "--label", default="", help="volume label (up to 32 bytes)")
    ap.add_argument("-f", "--force", action="store_true",
                    help="overwrite an existing pnova filesystem")
    ap.add_argument("--no-data-parity", action="store_true",
                    help="keep checksums of file data but no parity strips: damage is "
                    "detected (EIO) but not repaired; less space, faster writes")
    ap.add_argument("--no-data-csum", action="store_true",
                    help="no checksums and no parity for file data (for benchmarks: "
                    "damaged data is then read back as it is)")
    ap.add_argument("--no-inode-replicas", action="store_true",
                    help="keep one copy of each inode slot and of the lite journals' "
                    "records, not two (for benchmarks: damage there is then reported by "
                    "fsck, not repaired)")
    ap.add_argument("--no-log-replicas", action="store_true",
                    help="give log pages no twin (for benchmarks: a damaged log entry or "
                    "page tail is then reported, and the inode's log cut there, not "
                    "repaired)")
    ap.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    a = ap.parse_args(argv)
    try:
        if a.size is not None:
            size = parse_size(a.size)
        elif os.path.exists(a.device):
            size = os.path.getsize(a.device)
        else:
            raise ValueError("the device does not exist: give --size")
        if os.path.exists(a.device):
            if image_locked(a.device):
                raise ValueError(f"{a.device} is mounted; unmount it first")
            if not a.force and _has_filesystem(a.device):
                raise ValueError(f"{a.device} already holds a pnova filesystem; use -f to "
                                 "overwrite it")
        nodes = a.numa_nodes
        cpn = a.cpus_per_node
        if cpn is None:
            cpn = max(1, min(os.cpu_count() or 1, L.MAX_CPUS) // max(1, nodes))
        ipc = None
        if a.inodes is not None:
            if a.inodes < 1:
                raise ValueError("--inodes must be positive")
            ipc = -(-a.inodes // (nodes * cpn))
        features = L.DEFAULT_FEATURES
        if a.no_data_parity:
            features &= ~L.FEATURE_DATA_PARITY
        if a.no_data_csum:
            features &= ~(L.FEATURE_DATA_CSUM | L.FEATURE_DATA_PARITY)
        if a.no_inode_replicas:
            features &= ~L.FEATURE_INODE_REPLICA
        if a.no_log_replicas:
            features &= ~L.FEATURE_LOG_REPLICA
        sb = format_device(a.device, size, numa_nodes=nodes, cpus_per_node=cpn,
                           inodes_per_cpu=ipc, label=a.label.encode()[:32], features=features)
    except (ValueError, DeviceError) as e:
        print(f"mkfs.pnova: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"mkfs.pnova: {a.device}: {e.strerror}", file=sys.stderr)
        return 1
    if not a.quiet:
        print(f"{a.device}: pnova format v{sb.version}, {_human(sb.total_blocks * L.BLOCK)} "
              f"({sb.total_blocks} blocks of {L.BLOCK} B), {sb.numa_nodes} NUMA node(s) x "
              f"{sb.cpus_per_node} CPU(s), {sb.inodes_per_cpu * sb.ncpus} inodes; file data: "
              f"{describe_protection(sb.features)}; inode slots: "
              f"{'two copies' if sb.inode_replicas else 'one copy'}; log pages: "
              f"{'two copies' if sb.log_replicas else 'one copy'}")
    return 0


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


if __name__ == "__main__":
    sys.exit(main())
