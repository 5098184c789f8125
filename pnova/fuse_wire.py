"""The FUSE kernel protocol on the wire: opcodes, flags and message layouts.

pnova speaks the kernel's protocol (``<linux/fuse.h>``, version 7.38) directly
on ``/dev/fuse`` (DESIGN section 22 says why).  This module owns the byte
layouts and nothing else: the structures are ``struct.Struct`` objects
compiled once, and the few replies that several handlers build (an entry, an
attribute block, a directory entry) are packed here.

Every request starts with a 40-byte header; every reply with a 16-byte one.
Field names follow the kernel header so that the two can be read side by side.
"""
from __future__ import annotations

import struct

# ------------------------------------------------------------------ version
KERNEL_MAJOR = 7
KERNEL_MINOR = 38            # the protocol this module implements (Linux 6.2)
MIN_MINOR = 31               # oldest kernel protocol pnova accepts (Linux 5.4)

# ------------------------------------------------------------------ opcodes
LOOKUP, FORGET, GETATTR, SETATTR, READLINK, SYMLINK = 1, 2, 3, 4, 5, 6
MKNOD, MKDIR, UNLINK, RMDIR, RENAME, LINK = 8, 9, 10, 11, 12, 13
OPEN, READ, WRITE, STATFS, RELEASE, FSYNC = 14, 15, 16, 17, 18, 20
SETXATTR, GETXATTR, LISTXATTR, REMOVEXATTR, FLUSH, INIT = 21, 22, 23, 24, 25, 26
OPENDIR, READDIR, RELEASEDIR, FSYNCDIR = 27, 28, 29, 30
GETLK, SETLK, SETLKW, ACCESS, CREATE, INTERRUPT = 31, 32, 33, 34, 35, 36
BMAP, DESTROY, IOCTL, POLL, NOTIFY_REPLY, BATCH_FORGET = 37, 38, 39, 40, 41, 42
FALLOCATE, READDIRPLUS, RENAME2, LSEEK, COPY_FILE_RANGE = 43, 44, 45, 46, 47
SYNCFS, TMPFILE, STATX = 50, 51, 52

OPCODE_NAMES = {
    LOOKUP: "LOOKUP", FORGET: "FORGET", GETATTR: "GETATTR", SETATTR: "SETATTR",
    READLINK: "READLINK", SYMLINK: "SYMLINK", MKNOD: "MKNOD", MKDIR: "MKDIR",
    UNLINK: "UNLINK", RMDIR: "RMDIR", RENAME: "RENAME", LINK: "LINK", OPEN: "OPEN",
    READ: "READ", WRITE: "WRITE", STATFS: "STATFS", RELEASE: "RELEASE", FSYNC: "FSYNC",
    SETXATTR: "SETXATTR", GETXATTR: "GETXATTR", LISTXATTR: "LISTXATTR",
    REMOVEXATTR: "REMOVEXATTR", FLUSH: "FLUSH", INIT: "INIT", OPENDIR: "OPENDIR",
    READDIR: "READDIR", RELEASEDIR: "RELEASEDIR", FSYNCDIR: "FSYNCDIR", GETLK: "GETLK",
    SETLK: "SETLK", SETLKW: "SETLKW", ACCESS: "ACCESS", CREATE: "CREATE",
    INTERRUPT: "INTERRUPT", BMAP: "BMAP", DESTROY: "DESTROY", IOCTL: "IOCTL", POLL: "POLL",
    NOTIFY_REPLY: "NOTIFY_REPLY", BATCH_FORGET: "BATCH_FORGET", FALLOCATE: "FALLOCATE",
    READDIRPLUS: "READDIRPLUS", RENAME2: "RENAME2", LSEEK: "LSEEK",
    COPY_FILE_RANGE: "COPY_FILE_RANGE", SYNCFS: "SYNCFS", TMPFILE: "TMPFILE", STATX: "STATX",
}

# ------------------------------------------------------------------ INIT flags
ASYNC_READ = 1 << 0
ATOMIC_O_TRUNC = 1 << 3
EXPORT_SUPPORT = 1 << 4
BIG_WRITES = 1 << 5
AUTO_INVAL_DATA = 1 << 12
DO_READDIRPLUS = 1 << 13
ASYNC_DIO = 1 << 15
PARALLEL_DIROPS = 1 << 18
MAX_PAGES = 1 << 22
CACHE_SYMLINKS = 1 << 23
HANDLE_KILLPRIV_V2 = 1 << 28
INIT_EXT = 1 << 30                   # the flags go on in flags2 (bits 32..63)
DIRECT_IO_ALLOW_MMAP = 1 << 36       # a direct-I/O open may still be mapped shared
OVER_IO_URING = 1 << 41              # requests may come through io_uring (Linux 6.14)

INIT_FLAG_NAMES = {
    ASYNC_READ: "async_read", ATOMIC_O_TRUNC: "atomic_o_trunc",
    EXPORT_SUPPORT: "export_support", BIG_WRITES: "big_writes",
    AUTO_INVAL_DATA: "auto_inval_data", DO_READDIRPLUS: "readdirplus",
    ASYNC_DIO: "async_dio", PARALLEL_DIROPS: "parallel_dirops", MAX_PAGES: "max_pages",
    CACHE_SYMLINKS: "cache_symlinks", HANDLE_KILLPRIV_V2: "handle_killpriv_v2",
    DIRECT_IO_ALLOW_MMAP: "direct_io_allow_mmap", OVER_IO_URING: "over_io_uring",
}

# open reply flags (fuse_open_out.open_flags)
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_NOFLUSH = 1 << 5
FOPEN_PARALLEL_DIRECT_WRITES = 1 << 6

# request flags that ask the filesystem to drop privileges (HANDLE_KILLPRIV_V2)
WRITE_KILL_SUIDGID = 1 << 2          # fuse_write_in.write_flags
FATTR_KILL_SUIDGID = 1 << 11         # fuse_setattr_in.valid
OPEN_KILL_SUIDGID = 1 << 0           # fuse_open_in / fuse_create_in .open_flags

# fuse_setattr_in.valid
FATTR_MODE, FATTR_UID, FATTR_GID, FATTR_SIZE = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FATTR_ATIME, FATTR_MTIME, FATTR_FH = 1 << 4, 1 << 5, 1 << 6
FATTR_ATIME_NOW, FATTR_MTIME_NOW, FATTR_CTIME = 1 << 7, 1 << 8, 1 << 10

# fuse_getattr_in.getattr_flags
GETATTR_FH = 1 << 0

# ------------------------------------------------------------------ layouts
IN_HEADER = struct.Struct("<IIQQIIIHH")      # len opcode unique nodeid uid gid pid extlen pad
IN_HEADER_SIZE = IN_HEADER.size              # 40
OUT_HEADER = struct.Struct("<IiQ")           # len error unique
OUT_HEADER_SIZE = OUT_HEADER.size            # 16

INIT_IN = struct.Struct("<IIIII")            # major minor max_readahead flags flags2
INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")  # ... max_pages map_alignment flags2, unused
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")    # fuse_attr, 88 bytes
ENTRY_HEAD = struct.Struct("<QQQQII")        # nodeid generation entry_valid attr_valid nsecs
ENTRY_OUT_SIZE = ENTRY_HEAD.size + ATTR.size  # 128
ATTR_OUT_HEAD = struct.Struct("<QII")        # attr_valid attr_valid_nsec dummy
GETATTR_IN = struct.Struct("<IIQ")           # getattr_flags dummy fh
SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")  # valid pad fh size lock_owner a/m/ctime ...
MKNOD_IN = struct.Struct("<IIII")            # mode rdev umask padding
MKDIR_IN = struct.Struct("<II")              # mode umask
RENAME_IN = struct.Struct("<Q")              # newdir
RENAME2_IN = struct.Struct("<QII")           # newdir flags padding
LINK_IN = struct.Struct("<Q")                # oldnodeid
OPEN_IN = struct.Struct("<II")               # flags open_flags
OPEN_OUT = struct.Struct("<QIi")             # fh open_flags backing_id
CREATE_IN = struct.Struct("<IIII")           # flags mode umask open_flags
READ_IN = struct.Struct("<QQIIQII")          # fh offset size read_flags lock_owner flags pad
WRITE_IN = struct.Struct("<QQIIQII")         # fh offset size write_flags lock_owner flags pad
WRITE_IN_SIZE = WRITE_IN.size                # 40
WRITE_OUT = struct.Struct("<II")             # size padding
FSYNC_IN = struct.Struct("<QII")             # fh fsync_flags padding
FORGET_IN = struct.Struct("<Q")              # nlookup
BATCH_FORGET_IN = struct.Struct("<II")       # count dummy
FORGET_ONE = struct.Struct("<QQ")            # nodeid nlookup
SETXATTR_IN = struct.Struct("<II")           # size flags
GETXATTR_IN = struct.Struct("<II")           # size padding
GETXATTR_OUT = struct.Struct("<II")          # size padding
STATFS_OUT = struct.Struct("<QQQQQIIII24x")  # fuse_kstatfs, 80 bytes
DIRENT = struct.Struct("<QQII")              # ino off namelen type
INTERRUPT_IN = struct.Struct("<Q")           # unique of the interrupted request

# FUSE over io_uring (<linux/fuse.h> 7.42).  Each ring entry has a 288-byte
# header buffer: the fuse_in_header / fuse_out_header in the first 128 bytes,
# the opcode's own header (its first argument) in the next 128, then
# fuse_uring_ent_in_out (flags, commit_id, payload_sz, padding, reserved).
# Everything after the opcode's header, both ways, is in the payload buffer.
URING_CMD_REGISTER = 1                       # register an entry's buffers, fetch
URING_CMD_COMMIT_AND_FETCH = 2               # answer the entry's request, fetch
URING_OP_IN = 128                            # offset of the opcode's header
URING_ENT_IN_OUT = 256                       # offset of fuse_uring_ent_in_out
URING_HEADER_SIZE = 288
URING_ENT = struct.Struct("<QQI")            # flags commit_id payload_sz
URING_PAYLOAD_SZ = URING_ENT_IN_OUT + 16     # offset of payload_sz
URING_CMD = struct.Struct("<QQH6x")          # fuse_uring_cmd_req: flags commit_id qid

# S_IFMT >> 12 is the dirent type the kernel expects (DT_*)
S_IFMT = 0o170000


def pad8(n: int) -> int:
    return (n + 7) & ~7


def attr_bytes(ino: int, size: int, blocks: int, atime_ns: int, mtime_ns: int,
               ctime_ns: int, mode: int, nlink: int, uid: int, gid: int, rdev: int) -> bytes:
    """A fuse_attr for the given stat(2) fields (times in nanoseconds)."""
    return ATTR.pack(ino, size, blocks, atime_ns // 1_000_000_000, mtime_ns // 1_000_000_000,
                     ctime_ns // 1_000_000_000, atime_ns % 1_000_000_000,
                     mtime_ns % 1_000_000_000, ctime_ns % 1_000_000_000, mode, nlink,
                     uid, gid, rdev & 0xFFFFFFFF, 4096, 0)


def split_timeout(seconds: float) -> tuple[int, int]:
    """A timeout as the (seconds, nanoseconds) pair the replies carry."""
    whole = int(seconds)
    return whole, int((seconds - whole) * 1e9)


def dirent(ino: int, off: int, name: bytes, dtype: int) -> bytes:
    """One fuse_dirent, padded to 8 bytes."""
    raw = DIRENT.pack(ino, off, len(name), dtype) + name
    return raw + bytes(pad8(len(raw)) - len(raw))


def cstrings(buf: memoryview | bytes, start: int, end: int, count: int) -> list[bytes]:
    """``count`` zero-terminated strings from buf[start:end]."""
    parts = bytes(buf[start:end]).split(b"\0", count)
    if len(parts) <= count:                      # fewer than ``count`` terminators
        raise ValueError("truncated request")
    return parts[:count]
