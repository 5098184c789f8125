"""The on-media format (version FORMAT_VERSION): every structure's offsets, sizes and codecs.

docs/SPEC.md is the normative description; this module is its executable
form.  All integers are little-endian.  A "block" is 4096 bytes.  Log
pointers (log head/tail, page links, journal record addresses) are *byte
offsets* from the start of the device; region fields and data-block fields of
write entries are *block numbers*.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from crc32c import crc32c

FORMAT_VERSION = 9
# Versions this code reads: 2 is 3 without the features field (always 0 there).
READABLE_VERSIONS = (2, 3, 4, 5, 6, 7, 8, 9)
# The first version whose directories may have per-core local logs of dentries
# (and whose journal records may name a local log's tail in a log array).
DIR_LOGS_VERSION = 9
# Superblock feature bits (SPEC section 3): what the image protects.
FEATURE_DATA_CSUM = 1          # per-strip CRC32C of every file data block, two copies
FEATURE_DATA_PARITY = 2        # one parity strip per file data block (needs DATA_CSUM)
FEATURE_INODE_REPLICA = 4      # every inode slot has a replica in the next CPU's region
FEATURE_LOG_REPLICA = 8        # every log page has a twin page in the next CPU's region
KNOWN_FEATURES = FEATURE_DATA_CSUM | FEATURE_DATA_PARITY | FEATURE_INODE_REPLICA | \
    FEATURE_LOG_REPLICA
DEFAULT_FEATURES = KNOWN_FEATURES
STRIP = 512                    # bytes of data one checksum covers
STRIPS = 8                     # strips per 4096-byte block
CSUM_SIZE = 4 * 8              # checksum record of one data block: 8 x u32
PARITY_SIZE = 512              # parity strip of one data block
BLOCK = 4096
CACHELINE = 64
MAX_CPUS = 64                  # one 64-byte region descriptor each in block 1
NAME_MAX = 255
# File size limit: page offsets must fit the index and 2**44 bytes is beyond any
# emulated device; writes past it get EFBIG.
MAX_FILE_SIZE = 1 << 44

# ---------------------------------------------------------------------------
# Superblock: block 0 (primary) and the last block (replica), 256 bytes used.
# ---------------------------------------------------------------------------
SB_MAGIC = b"PNOVASB\x00"
SB_SIZE = 256
_SB = struct.Struct("<8sIIQIII I16sQ II Q Q Q Q 32s I")
# fields: magic, version, block_size, total_blocks, numa_nodes, cpus_per_node,
#         inodes_per_cpu, region_table_block, uuid, mkfs_time_ns,
#         clean, flags, mount_count, next_seq, last_mount_ns, last_unmount_ns,
#         label, features (version 3) ; then zero padding up to byte 252 and
#         crc32c at 252.
SB_CRC_OFF = 252
_U32 = struct.Struct("<I")
_U16 = struct.Struct("<H")
_U64 = struct.Struct("<Q")


# The sync record (version 6): one u64 at byte 256 of block 0, outside the
# superblock's checksum, changed by one 8-byte store.  It holds a sequence
# number R such that every entry with sequence number <= R that is on the
# medium has its data there too (SPEC 3.1, DESIGN 24.3): recovery after a
# power loss needs to check the data of later entries only.  The low 16 bits
# check the high 48; 0 (or a word that fails the check) says "unknown".
SYNC_RECORD = 256
SYNC_RECORD_MAX = (1 << 48) - 1


def encode_sync_record(seq: int) -> int:
    """The word recording ``seq`` (0 for a value the record cannot hold)."""
    if not 0 < seq <= SYNC_RECORD_MAX:
        return 0
    return seq << 16 | (crc32c(_U64.pack(seq)) & 0xFFFF)


def decode_sync_record(word: int) -> int | None:
    """The sequence number a sync record word holds, None when it holds none."""
    seq = word >> 16
    if seq == 0 or word & 0xFFFF != crc32c(_U64.pack(seq)) & 0xFFFF:
        return None
    return seq


def sync_record_addrs(total_blocks: int) -> tuple[int, int]:
    """Byte offsets of the sync record and of its copy (SPEC 3.1): byte 256 of
    block 0 and of block T-1, beside the superblock and its replica."""
    return SYNC_RECORD, (total_blocks - 1) * BLOCK + SYNC_RECORD


def sync_record_of(first: int, second: int) -> int | None:
    """What the two copies of the sync record say (SPEC 3.1): the smaller of the
    two numbers, None unless both words are valid.  A damaged copy can then
    only make recovery check more writes, never fewer."""
    a, b = decode_sync_record(first), decode_sync_record(second)
    if a is None or b is None:
        return None
    return min(a, b)


@dataclass
class Superblock:
    total_blocks: int
    numa_nodes: int
    cpus_per_node: int
    inodes_per_cpu: int
    uuid: bytes
    mkfs_time_ns: int
    clean: int = 0
    flags: int = 0
    mount_count: int = 0
    next_seq: int = 1
    last_mount_ns: int = 0
    last_unmount_ns: int = 0
    label: bytes = b""
    version: int = FORMAT_VERSION
    block_size: int = BLOCK
    region_table_block: int = 1
    features: int = 0

    @property
    def ncpus(self) -> int:
        return self.numa_nodes * self.cpus_per_node

    def pack(self) -> bytes:
        body = _SB.pack(SB_MAGIC, self.version, self.block_size, self.total_blocks,
                        self.numa_nodes, self.cpus_per_node, self.inodes_per_cpu,
                        self.region_table_block, self.uuid, self.mkfs_time_ns,
                        self.clean, self.flags, self.mount_count, self.next_seq,
                        self.last_mount_ns, self.last_unmount_ns,
                        self.label.ljust(32, b"\0")[:32], self.features)
        body = body.ljust(SB_CRC_OFF, b"\0")
        return body + struct.pack("<I", crc32c(body))

    @classmethod
    def unpack(cls, raw: bytes) -> "Superblock":
        """Decode; raises ValueError with a reason when the block is not valid."""
        if raw[:8] != SB_MAGIC:
            raise ValueError("bad magic")
        (crc,) = struct.unpack_from("<I", raw, SB_CRC_OFF)
        if crc32c(raw[:SB_CRC_OFF]) != crc:
            raise ValueError("checksum mismatch")
        f = _SB.unpack_from(raw, 0)
        sb = cls(total_blocks=f[3], numa_nodes=f[4], cpus_per_node=f[5],
                 inodes_per_cpu=f[6], uuid=f[8], mkfs_time_ns=f[9], clean=f[10],
                 flags=f[11], mount_count=f[12], next_seq=f[13], last_mount_ns=f[14],
                 last_unmount_ns=f[15], label=f[16].rstrip(b"\0"), version=f[1],
                 block_size=f[2], region_table_block=f[7], features=f[17])
        if sb.version not in READABLE_VERSIONS:
            raise ValueError(f"unsupported format version {sb.version}")
        if sb.version == 2 and sb.features:
            raise ValueError("a version 2 superblock with features set")
        if sb.version < 7 and sb.features & FEATURE_INODE_REPLICA:
            raise ValueError(f"a version {sb.version} superblock with inode replicas")
        if sb.version < 8 and sb.features & FEATURE_LOG_REPLICA:
            raise ValueError(f"a version {sb.version} superblock with log page twins")
        if sb.block_size != BLOCK:
            raise ValueError(f"unsupported block size {sb.block_size}")
        if not (1 <= sb.ncpus <= MAX_CPUS):
            raise ValueError(f"bad CPU geometry {sb.numa_nodes}x{sb.cpus_per_node}")
        return sb

    def geometry(self) -> tuple:
        """The fields that never change after mkfs (compared against the replica)."""
        return (self.version, self.block_size, self.total_blocks, self.numa_nodes,
                self.cpus_per_node, self.inodes_per_cpu, self.region_table_block,
                self.uuid, self.mkfs_time_ns, self.label, self.features)

    @property
    def data_csum(self) -> bool:
        return bool(self.features & FEATURE_DATA_CSUM)

    @property
    def data_parity(self) -> bool:
        return bool(self.features & FEATURE_DATA_PARITY)

    @property
    def inode_replicas(self) -> bool:
        return bool(self.features & FEATURE_INODE_REPLICA)

    @property
    def log_replicas(self) -> bool:
        return bool(self.features & FEATURE_LOG_REPLICA)


# ---------------------------------------------------------------------------
# Region table: block 1, one 64-byte descriptor per CPU.
# ---------------------------------------------------------------------------
REGION_SIZE = 64
_REGION = struct.Struct("<IIQQQQQQI")
INODE_SIZE = 128
INODES_PER_BLOCK = BLOCK // INODE_SIZE


@dataclass
class Region:
    """The part of the device one CPU's allocator owns (inside its NUMA partition)."""
    cpu: int
    node: int
    start: int           # first block of the region
    nblocks: int         # blocks in the region, metadata included
    itable_start: int    # first block of this CPU's inode table
    itable_blocks: int
    journal_block: int   # this CPU's lite journal
    bitmap_start: int    # saved allocator bitmap (valid only on a clean image)
    bitmap_blocks: int
    # data protection (not in the descriptor: computed by plan_regions)
    csum_blocks: int = 0     # blocks of each copy of the checksum records
    parity_blocks: int = 0   # blocks of the parity strips
    # replicas of the previous CPU's inode slots (0: none), after the journal
    rtable_blocks: int = 0

    @property
    def rtable_start(self) -> int:
        """First block of the replica table this region holds (CPU cpu-1's slots)."""
        return self.journal_block + 1

    @property
    def csum_start(self) -> int:
        """First block of the checksum records (primary copy)."""
        return self.bitmap_start + self.bitmap_blocks

    @property
    def parity_start(self) -> int:
        return self.csum_start + self.csum_blocks

    @property
    def csum2_start(self) -> int:
        """First block of the checksum records' replica."""
        return self.parity_start + self.parity_blocks

    @property
    def data_start(self) -> int:
        return self.csum2_start + self.csum_blocks

    @property
    def end(self) -> int:
        return self.start + self.nblocks

    @property
    def data_blocks(self) -> int:
        return self.end - self.data_start

    def descriptor(self) -> tuple:
        """The fields the region table stores (what a descriptor is compared on)."""
        return (self.cpu, self.node, self.start, self.nblocks, self.itable_start,
                self.itable_blocks, self.journal_block, self.bitmap_start, self.bitmap_blocks)

    def pack(self) -> bytes:
        body = _REGION.pack(self.cpu, self.node, self.start, self.nblocks,
                            self.itable_start, self.itable_blocks, self.journal_block,
                            self.bitmap_start, self.bitmap_blocks)
        return body + struct.pack("<I", crc32c(body))

    @classmethod
    def unpack(cls, raw: bytes) -> "Region":
        (crc,) = struct.unpack_from("<I", raw, 60)
        if crc32c(raw[:60]) != crc:
            raise ValueError("checksum mismatch")
        return cls(*_REGION.unpack_from(raw, 0))


def protection_blocks(rest: int, features: int) -> tuple[int, int, int]:
    """(data blocks, blocks per checksum copy, parity-area blocks) for ``rest``
    blocks after a region's bitmap: the most data blocks whose protection fits
    too (SPEC 2.1)."""
    if not features & FEATURE_DATA_CSUM:
        return rest, 0, 0
    parity = bool(features & FEATURE_DATA_PARITY)

    def need(d: int) -> int:
        return d + 2 * -(-d // (BLOCK // CSUM_SIZE)) + (-(-d // (BLOCK // PARITY_SIZE)) if parity else 0)
    d = rest * 128 // (146 if parity else 130)
    while d > 0 and need(d) > rest:
        d -= 1
    while need(d + 1) <= rest:
        d += 1
    csum = -(-d // (BLOCK // CSUM_SIZE))
    # the parity area takes the blocks left over (a data block one more would
    # need another checksum or parity block): the data area is exactly d blocks
    return d, csum, rest - d - 2 * csum


def plan_regions(total_blocks: int, numa_nodes: int, cpus_per_node: int,
                 inodes_per_cpu: int, features: int = 0) -> list[Region]:
    """Split blocks [2, total-1) into one partition per node, one region per CPU."""
    first, last = 2, total_blocks - 1          # last block holds the replica superblock
    usable = last - first
    regions: list[Region] = []
    itable_blocks = -(-inodes_per_cpu // INODES_PER_BLOCK)
    node_start = first
    for node in range(numa_nodes):
        node_len = usable // numa_nodes if node < numa_nodes - 1 else last - node_start
        cpu_start = node_start
        for c in range(cpus_per_node):
            cpu = node * cpus_per_node + c
            n = node_len // cpus_per_node if c < cpus_per_node - 1 else node_start + node_len - cpu_start
            rtable = itable_blocks if features & FEATURE_INODE_REPLICA else 0
            meta = itable_blocks + 1 + rtable
            rest = n - meta
            bitmap_blocks = max(1, -(-rest // (BLOCK * 8)))
            data, csum, par = protection_blocks(rest - bitmap_blocks, features)
            if data < 16:
                raise ValueError("device too small for this geometry")
            regions.append(Region(cpu, node, cpu_start, n, cpu_start, itable_blocks,
                                  cpu_start + itable_blocks, cpu_start + meta,
                                  bitmap_blocks, csum, par, rtable))
            cpu_start += n
        node_start += node_len
    return regions


def replica_blocks(block0: bytes, table: bytes, file_size: int) -> list[int]:
    """Where to look for the replica superblock when the primary is unusable (SPEC 13.1).

    ``block0`` is bytes 0..255 of the file, ``table`` block 1 (the region
    table), ``file_size`` the file's size in bytes.  The candidates, in order:
    the file's last whole block (the replica of a file exactly as long as its
    filesystem); if block 0 still starts with the magic, the block before the
    one its ``total_blocks`` field names; the block just past the last region
    of the region table's leading run of intact descriptors (where the
    replica of a file made longer lies).  Candidates outside blocks
    2 .. file blocks - 1 are left out, and none is listed twice.
    """
    nblocks = file_size // BLOCK
    out = [nblocks - 1]
    if block0[:8] == SB_MAGIC:
        out.append(struct.unpack_from("<Q", block0, 16)[0] - 1)
    last = None
    for i in range(MAX_CPUS):
        try:
            r = Region.unpack(table[i * REGION_SIZE:(i + 1) * REGION_SIZE])
        except ValueError:
            break
        if r.cpu != i:
            break
        last = r
    if last is not None:
        out.append(last.end)
    return [b for i, b in enumerate(out) if 2 <= b < nblocks and b not in out[:i]]


def replica_fits(sb: Superblock, block: int) -> str | None:
    """None if ``sb``, read at ``block``, is a replica there: the last block of the
    filesystem it describes.  Else the reason it is not."""
    if sb.total_blocks != block + 1:
        return f"it describes {sb.total_blocks} blocks, so block {block} is not its last"
    return None


# ---------------------------------------------------------------------------
# Inodes: 128 bytes, in per-CPU tables.  ino = 1 + index * ncpus + cpu.
# Line 0 (bytes 0..63) is written once at creation and carries a CRC;
# line 1 (64..127) holds the words updated in place, each an atomic 8-byte store.
# ---------------------------------------------------------------------------
ROOT_INO = 1
_INODE_STATIC = struct.Struct("<IIIIQQQQ")  # 48 bytes
INODE_CRC_OFF = 60
I_STATE = 64        # u64: 0 free, 1 live
I_LOG_HEAD = 72     # u64: byte offset of the first log page (0: none)
I_LOG_TAIL = 80     # u64: byte offset just past the last committed entry
I_LOG_ARRAY = 88    # u64: block number of the per-core log array (0: none)
I_LOG_HEAD_TWIN = 96  # u64 (version 8): byte offset of the twin of the first log page (0: none)
I_LOG_ARRAY_TWIN = 104  # u64 (version 8): block number of the log array's twin (0: none)
I_GENERATION = 24   # u64 in line 0: tells a reused slot from the inode a cache knew

# Per-core log array: one 64-byte line per CPU, holding that CPU's local log.
LA_LINE = 64
LA_HEAD = 0         # u64: byte offset of the local log's first page (0: none)
LA_TAIL = 8         # u64: just past its last committed entry (0: empty, see SPEC)
LA_HEAD_TWIN = 16   # u64 (version 8): byte offset of the twin of its first page (0: none)
STATE_FREE = 0
STATE_LIVE = 1


@dataclass
class InodeStatic:
    mode: int
    uid: int
    gid: int
    flags: int
    rdev: int
    generation: int
    ctime_ns: int      # creation time: initial atime = mtime = ctime
    create_seq: int

    def pack(self) -> bytes:
        body = _INODE_STATIC.pack(self.mode, self.uid, self.gid, self.flags, self.rdev,
                                  self.generation, self.ctime_ns, self.create_seq)
        body = body.ljust(INODE_CRC_OFF, b"\0")
        return body + struct.pack("<I", crc32c(body))

    @classmethod
    def unpack(cls, raw: bytes) -> "InodeStatic":
        (crc,) = struct.unpack_from("<I", raw, INODE_CRC_OFF)
        if crc32c(raw[:INODE_CRC_OFF]) != crc:
            raise ValueError("inode checksum mismatch")
        return cls(*_INODE_STATIC.unpack_from(raw, 0))


# ---------------------------------------------------------------------------
# Log pages: 4096 bytes; entries in bytes 0..4063, a 32-byte tail at 4064.
# ---------------------------------------------------------------------------
LOG_DATA = 4064
PT_NEXT = 4064      # u64 byte offset of the next log page (0: none); not in the CRC
PT_OWNER = 4072     # u64 owning inode number
PT_MAGIC = 4080     # u32 b"PLOG"
PT_TWIN = 4084      # u64 (version 8): block number of the page's twin (0: none), in the CRC
PT_CRC = 4092       # u32 crc32c of bytes 4072..4091
LOG_MAGIC = 0x474F4C50  # b"PLOG" little-endian
TWIN_ROLE = 1 << 63     # set in the ``twin`` field of a twin page (it names its primary)
_PT_BODY = struct.Struct("<QIQ")


def pack_page_tail(owner: int, twin: int = 0) -> bytes:
    """The 32-byte tail of a fresh log page (next = 0); ``twin`` is the field's
    value: the twin's block number in a primary, the primary's with
    TWIN_ROLE in a twin, 0 in a page without one."""
    body = _PT_BODY.pack(owner, LOG_MAGIC, twin)
    return struct.pack("<Q", 0) + body + struct.pack("<I", crc32c(body))


def page_tail_twin(raw: bytes) -> int:
    """The ``twin`` field of a 32-byte page tail (check it first)."""
    return _PT_BODY.unpack_from(raw, 8)[2]


def check_page_tail(raw: bytes, owner: int | None = None) -> str | None:
    """Return None if the 32-byte page tail is well formed, else a reason."""
    body = raw[8:28]
    (crc,) = struct.unpack_from("<I", raw, 28)
    if crc32c(body) != crc:
        return "log page tail checksum mismatch"
    own, magic = struct.unpack_from("<QI", raw, 8)
    if magic != LOG_MAGIC:
        return "log page tail has a bad magic"
    if owner is not None and own != owner:
        return f"log page belongs to inode {own}"
    return None


# ---------------------------------------------------------------------------
# Log entries.  Every entry starts with an 8-byte header:
#   u8 type, u8 flags, u16 size (bytes, a multiple of 8), u32 crc32c of the
#   whole entry computed with the crc field zero; then u64 seq.
# ---------------------------------------------------------------------------
E_WRITE = 1
E_SETATTR = 2
E_LINK = 3
E_DENTRY = 4
E_XATTR = 5
E_NEXT_PAGE = 6

ENTRY_NAMES = {E_WRITE: "file write", E_SETATTR: "setattr", E_LINK: "link change",
               E_DENTRY: "dentry", E_XATTR: "xattr", E_NEXT_PAGE: "next page"}

_HDR = struct.Struct("<BBHI")
_WRITE = struct.Struct("<BBHIQQIIQQQQ")       # 64 bytes
_SETATTR = struct.Struct("<BBHIQIIIIQQQQ")    # 64 bytes
_LINK = struct.Struct("<BBHIQQQ")             # 32 bytes
_DENTRY = struct.Struct("<BBHIQQQBBBBI")      # 40 bytes + name
_XATTR = struct.Struct("<BBHIQQBBHI")         # 32 bytes + name + value

SA_MODE, SA_UID, SA_GID, SA_SIZE, SA_ATIME, SA_MTIME, SA_CTIME = 1, 2, 4, 8, 16, 32, 64
D_ADD, D_REMOVE = 1, 2
X_SET, X_REMOVE = 1, 2
DOTDOT = b".."
XATTR_VALUE_MAX = 3584


def _seal(body: bytearray) -> bytes:
    """Fill in the CRC of an entry whose crc field (bytes 4..7) is zero."""
    struct.pack_into("<I", body, 4, crc32c(body))
    return bytes(body)


def _pad8(n: int) -> int:
    return (n + 7) & ~7


# Entry flags (SPEC 7.1).  Any entry: F_CONT, the operation goes on in the next
# entry of this log.  A file write: W_DIGEST, its u32 at offset 28 holds the
# data digest, the CRC32C of the strip checksums of every page it maps.  A
# dentry: D_MOVED, one of the two names a rename changed, its u32 at offset 36
# holding the other name's hash (name_hash); D_EXCHANGE with it: an exchange.
W_DIGEST = 1
D_EXCHANGE = 0x20
D_MOVED = 0x40
F_CONT = 0x80


def continued(raw: bytes) -> bytes:
    """``raw`` with F_CONT set (and its CRC made again)."""
    body = bytearray(raw)
    body[1] |= F_CONT
    body[4:8] = b"\0\0\0\0"
    return _seal(body)


def name_hash(dir_ino: int, name: bytes) -> int:
    """The 32-bit hash of a name in a directory that a D_MOVED dentry carries."""
    return crc32c(struct.pack("<Q", dir_ino) + name)


def entry_seq(raw: bytes) -> int:
    """The sequence number of a raw entry (any type but the next-page marker)."""
    return _U64.unpack_from(raw, 8)[0]


def dentry_moved(raw: bytes) -> tuple[int, int, int] | None:
    """(flags, other name's hash, other name's directory or 0 where the entry
    does not say: version 4) of a D_MOVED dentry entry, else None."""
    if raw[1] & D_MOVED:
        size = _U16.unpack_from(raw, 2)[0]
        peer_dir = _U64.unpack_from(raw, size - 8)[0] if size > _pad8(40 + raw[32]) else 0
        return raw[1], _U32.unpack_from(raw, 36)[0], peer_dir
    return None


def write_entry(seq: int, pgoff: int, npages: int, block: int, size: int, mtime: int,
                digest: int | None = None) -> bytes:
    # The most frequent entry: packed twice (CRC field zero, then the CRC)
    # rather than sealed through a bytearray, which costs more calls.
    flags, d = (0, 0) if digest is None else (W_DIGEST, digest)
    crc = crc32c(_WRITE.pack(E_WRITE, flags, 64, 0, seq, pgoff, npages, d, block, size, mtime, 0))
    return _WRITE.pack(E_WRITE, flags, 64, crc, seq, pgoff, npages, d, block, size, mtime, 0)


def write_digest(raw: bytes) -> int | None:
    """The data digest a raw write entry carries (None: it carries none)."""
    f = _WRITE.unpack_from(raw, 0)
    return f[7] if f[1] & W_DIGEST else None


def setattr_entry(seq: int, mask: int, mode: int, uid: int, gid: int, size: int,
                  atime: int, mtime: int, ctime: int) -> bytes:
    return _seal(bytearray(_SETATTR.pack(E_SETATTR, 0, 64, 0, seq, mask, mode, uid, gid,
                                         size, atime, mtime, ctime)))


def link_entry(seq: int, nlink: int, ctime: int) -> bytes:
    return _seal(bytearray(_LINK.pack(E_LINK, 0, 32, 0, seq, nlink, ctime)))


def dentry_entry(seq: int, op: int, name: bytes, ino: int, dtype: int, time_ns: int,
                 moved: tuple[int, int, int] | None = None) -> bytes:
    """``moved``: (D_MOVED, possibly with D_EXCHANGE; the other name's hash; the
    other name's directory, or 0 for the shorter entry of version 4)."""
    size = _pad8(40 + len(name))
    flags, peer, peer_dir = moved or (0, 0, 0)
    body = bytearray(size + 8 if peer_dir else size)
    _DENTRY.pack_into(body, 0, E_DENTRY, flags, len(body), 0, seq, ino, time_ns, len(name),
                      dtype, op, 0, peer)
    body[40:40 + len(name)] = name
    if peer_dir:
        _U64.pack_into(body, size, peer_dir)
    return _seal(body)


def xattr_entry(seq: int, op: int, name: bytes, value: bytes, time_ns: int) -> bytes:
    size = _pad8(32 + len(name) + len(value))
    body = bytearray(size)
    _XATTR.pack_into(body, 0, E_XATTR, 0, size, 0, seq, time_ns, len(name), op,
                     len(value), 0)
    body[32:32 + len(name)] = name
    body[32 + len(name):32 + len(name) + len(value)] = value
    return _seal(body)


NEXT_PAGE_ENTRY = _seal(bytearray(_HDR.pack(E_NEXT_PAGE, 0, 8, 0)))


def entry_header(raw: bytes | memoryview, off: int = 0) -> tuple[int, int, int, int]:
    """(type, flags, size, crc) of the entry at ``off``."""
    return _HDR.unpack_from(raw, off)


_ZERO4 = bytes(4)


def entry_crc_ok(raw: bytes) -> bool:
    """The entry's CRC, computed as if its crc field were zero (no copy made)."""
    (crc,) = _U32.unpack_from(raw, 4)
    return crc32c(raw[8:], crc32c(_ZERO4, crc32c(raw[:4]))) == crc


# Decoded entries are plain tuples (fast to build); their layouts:
#   WRITE   (E_WRITE, seq, pgoff, npages, block, size, mtime)
#   SETATTR (E_SETATTR, seq, mask, mode, uid, gid, size, atime, mtime, ctime)
#   LINK    (E_LINK, seq, nlink, ctime)
#   DENTRY  (E_DENTRY, seq, op, name, ino, dtype, time)
#   XATTR   (E_XATTR, seq, op, name, value, time)
def decode_entry(raw: bytes) -> tuple:
    """Decode one entry (its CRC already checked); raises ValueError if malformed."""
    etype, _flags, size, _crc = _HDR.unpack_from(raw, 0)
    if etype == E_WRITE and size == 64:
        f = _WRITE.unpack_from(raw, 0)
        return (E_WRITE, f[4], f[5], f[6], f[8], f[9], f[10])
    if etype == E_SETATTR and size == 64:
        f = _SETATTR.unpack_from(raw, 0)
        return (E_SETATTR, f[4], f[5], f[6], f[7], f[8], f[9], f[10], f[11], f[12])
    if etype == E_LINK and size == 32:
        f = _LINK.unpack_from(raw, 0)
        return (E_LINK, f[4], f[5], f[6])
    if etype == E_DENTRY and size >= 48:
        f = _DENTRY.unpack_from(raw, 0)
        nlen = f[7]
        # (a D_MOVED dentry of version 5 is 8 bytes longer: the other directory)
        if not 1 <= nlen <= NAME_MAX or f[9] not in (D_ADD, D_REMOVE) or \
                size != _pad8(40 + nlen) + (8 if f[1] & D_MOVED and size > _pad8(40 + nlen) else 0):
            raise ValueError("malformed dentry")
        return (E_DENTRY, f[4], f[9], bytes(raw[40:40 + nlen]), f[5], f[8], f[6])
    if etype == E_XATTR and size >= 40:
        f = _XATTR.unpack_from(raw, 0)
        nlen, vlen = f[6], f[8]
        if not 1 <= nlen <= NAME_MAX or _pad8(32 + nlen + vlen) != size or f[7] not in (X_SET, X_REMOVE):
            raise ValueError("malformed xattr entry")
        return (E_XATTR, f[4], f[7], bytes(raw[32:32 + nlen]),
                bytes(raw[32 + nlen:32 + nlen + vlen]), f[5])
    if etype == E_NEXT_PAGE and size == 8:
        return (E_NEXT_PAGE,)
    raise ValueError(f"unknown entry type {etype} or bad size {size}")


# ---------------------------------------------------------------------------
# Lite journal: one block per CPU.
#   bytes 0..7: u32 count (live undo records; 0 = no transaction), u32 crc32c
#               of the records -- one 8-byte word, stored atomically.
#   bytes 64..: records of 16 bytes: u64 device byte offset, u64 old value.
# ---------------------------------------------------------------------------
J_RECORDS = 64
J_RECORD = 16
J_MAX_RECORDS = (BLOCK - J_RECORDS) // J_RECORD
# With INODE_REPLICA, the records of CPU c's journal have a twin in the second
# half of CPU c+1's journal block (SPEC 8.1), so a transaction there keeps to
# the first half.
J_TWIN = BLOCK // 2
J_MAX_TWINNED = (J_TWIN - J_RECORDS) // J_RECORD


def journal_twin(regions: list[Region], cpu: int) -> int | None:
    """Byte offset of the twin of CPU ``cpu``'s journal records (SPEC 8.1): in
    the next CPU's journal block, so that one damaged block or region never
    holds both.  None without inode replicas or with one CPU."""
    if len(regions) < 2 or not regions[0].rtable_blocks:
        return None
    return regions[(cpu + 1) % len(regions)].journal_block * BLOCK + J_TWIN


# The inode words a lite-journal record may name (its undo target).
JOURNALED_WORDS = (I_STATE, I_LOG_HEAD, I_LOG_TAIL, I_LOG_ARRAY, I_LOG_HEAD_TWIN,
                   I_LOG_ARRAY_TWIN)


def local_entry_ok(e: tuple, is_dir: bool) -> bool:
    """Whether a decoded entry may sit in a per-core local log: a file's holds
    only its writes, a directory's (version 9) only dentries of its names
    (never its `..`)."""
    if is_dir:
        return e[0] == E_DENTRY and e[3] != DOTDOT
    return e[0] == E_WRITE


def is_journaled_word(addr: int, regions: list[Region], inodes_per_cpu: int,
                      version: int = FORMAT_VERSION) -> bool:
    """True if ``addr`` is a word a journal record may restore: a word of an
    inode slot (its replica, if any, is restored with it), or, from version 9,
    the tail of a line of a per-core log array in a data area (each copy of
    the array has a record of its own)."""
    for r in regions:
        lo = r.itable_start * BLOCK
        if lo <= addr < lo + inodes_per_cpu * INODE_SIZE:
            return (addr - lo) % INODE_SIZE in JOURNALED_WORDS
    if version >= DIR_LOGS_VERSION:
        ncpus = len(regions)
        for r in regions:
            if r.data_start * BLOCK <= addr < r.end * BLOCK:
                line, word = divmod(addr % BLOCK, LA_LINE)
                return word == LA_TAIL and line < ncpus
    return False


def replica_of(regions: list[Region], inodes_per_cpu: int, addr: int) -> int | None:
    """The replica (SPEC 5.5) of a byte of an inode slot; None for any other
    address, or when the image keeps no replicas."""
    tables = replica_tables(regions)
    if tables is None:
        return None
    for r in regions:
        lo = r.itable_start * BLOCK
        if lo <= addr < lo + inodes_per_cpu * INODE_SIZE:
            return tables[r.cpu] + addr - lo
    return None


def replica_tables(regions: list[Region]) -> list[int] | None:
    """Byte offset of the replica of each CPU's inode table (SPEC 5.5): in the
    next CPU's region, so that one region's damage never takes both copies.
    None when the image keeps no replicas."""
    if not regions or not regions[0].rtable_blocks:
        return None
    n = len(regions)
    return [regions[(c + 1) % n].rtable_start * BLOCK for c in range(n)]


def journal_word(count: int, records: bytes) -> int:
    return count | (crc32c(records) << 32)


def encode_entry(e: tuple) -> bytes:
    """Inverse of :func:`decode_entry`."""
    t = e[0]
    if t == E_WRITE:
        return write_entry(e[1], e[2], e[3], e[4], e[5], e[6], e[7] if len(e) > 7 else None)
    if t == E_SETATTR:
        return setattr_entry(*e[1:])
    if t == E_LINK:
        return link_entry(e[1], e[2], e[3])
    if t == E_DENTRY:
        _, seq, op, name, ino, dtype, time_ns = e[:7]
        return dentry_entry(seq, op, name, ino, dtype, time_ns, e[7] if len(e) > 7 else None)
    if t == E_XATTR:
        _, seq, op, name, value, time_ns = e
        return xattr_entry(seq, op, name, value, time_ns)
    raise ValueError(f"cannot encode entry type {t}")
