"""Extended attributes, stored as log entries of their inode.

Namespaces stored: user.* (on regular files and directories only, as Linux
allows), trusted.* (the kernel lets only CAP_SYS_ADMIN near them) and
security.* (file capabilities, LSM labels).  system.* (POSIX ACLs) is not
offered.
"""
from __future__ import annotations

import errno
import stat
import time

from . import layout as L
from .errors import FsError


XATTR_NS = (b"user.", b"trusted.", b"security.")
CAPS_XATTR = b"security.capability"
# Not stored: reading it through the mount scrubs the file's data (pnova-scrub;
# trusted.*, so only CAP_SYS_ADMIN reaches it), and it cannot be set.
SCRUB_XATTR = b"trusted.pnova.scrub"


class Xattrs:
    """setxattr, getxattr, listxattr, removexattr."""

    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0) -> None:
        """flags: XATTR_CREATE (1) fails if present, XATTR_REPLACE (2) if absent."""
        self._rw()
        inode = self.get(ino)
        ns = next((p for p in XATTR_NS if name.startswith(p)), None)
        if ns is None:
            raise FsError(errno.EOPNOTSUPP)
        if name == SCRUB_XATTR:
            raise FsError(errno.EPERM)
        if len(name) > L.NAME_MAX or len(name) <= len(ns):
            raise FsError(errno.ERANGE if len(name) > L.NAME_MAX else errno.EINVAL)
        if len(value) > L.XATTR_VALUE_MAX:
            raise FsError(errno.E2BIG)
        if ns == b"user." and not (stat.S_ISREG(inode.mode) or stat.S_ISDIR(inode.mode)):
            raise FsError(errno.EPERM)
        exists = name in inode.xattrs
        if flags & 1 and exists:
            raise FsError(errno.EEXIST)
        if flags & 2 and not exists:
            raise FsError(errno.ENODATA)
        security = ns == b"security."
        if security:
            self._bump_epoch(ino, 1)             # odd while it is in flight (attrs)
        try:
            self._commit([(inode, [(L.E_XATTR, 0, L.X_SET, name, bytes(value),
                                    time.time_ns())])])
        finally:
            if security:
                self._bump_epoch(ino, 1)         # writers must see capabilities come
        if self._compact_wanted:
            self._compact_pending()

    def getxattr(self, ino: int, name: bytes) -> bytes:
        inode = self.get(ino)
        v = inode.xattrs.get(name)
        if v is None:
            raise FsError(errno.ENODATA)
        return v

    def listxattr(self, ino: int) -> list[bytes]:
        return list(self.get(ino).xattrs)

    def removexattr(self, ino: int, name: bytes) -> None:
        self._rw()
        inode = self.get(ino)
        if name not in inode.xattrs:
            raise FsError(errno.ENODATA)
        self._commit([(inode, [(L.E_XATTR, 0, L.X_REMOVE, name, b"",
                                time.time_ns())])])
        if self._compact_wanted:
            self._compact_pending()
