"""Directories as a whole: the directory check and readdir (NOVA's dir.c)."""
from __future__ import annotations

import errno

from .errors import FsError
from .inode import Inode



class Directories:
    """Reading directories."""

    def _dir(self, ino: int) -> Inode:
        d = self.get(ino)
        if not d.is_dir:
            raise FsError(errno.ENOTDIR)
        return d

    def readdir(self, ino: int, off: int = 0,
                limit: int | None = None) -> list[tuple[bytes, int, int]]:
        """Entries after cookie ``off``: (name, ino, next cookie), '.' and '..' first;
        at most ``limit`` of them (a reply buffer's worth) when given."""
        d = self._dir(ino)
        out: list[tuple[bytes, int, int]] = []
        if off < 1:
            out.append((b".", ino, 1))
        if off < 2:
            out.append((b"..", d.parent or ino, 2))
        for cookie in d.order.irange(minimum=max(0, off - 2)):
            if limit is not None and len(out) >= limit:
                break
            if cookie + 3 <= off:
                continue
            name = d.order[cookie]
            out.append((name, d.dents[name][0], cookie + 3))
        return out
