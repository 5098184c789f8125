"""Directories as a whole: the directory check and readdir (NOVA's dir.c)."""
from __future__ import annotations

import errno

from . import layout as L
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
        if self._repair_wanted:
            self._compact_pending()              # its log was read around damage
            d = self._dir(ino)
        out: list[tuple[bytes, int, int]] = []
        if off < 1:
            out.append((b".", ino, 1))
        if off < 2:
            out.append((b"..", d.parent or ino, 2))
        pos = d.pos
        for cookie in d.cookies().irange(minimum=max(0, off - 2)):
            if limit is not None and len(out) >= limit:
                break
            if cookie + 3 <= off:
                continue
            name = pos[cookie]
            out.append((name, d.dents[name][0], cookie + 3))
        return out

    def path_of(self, ino: int) -> str:
        """A path of ``ino`` for messages, found through the directories this
        process has cached (files have no parent pointer); ``inode N`` when none
        of them names it."""
        if ino == L.ROOT_INO:
            return "/"
        try:
            self.get(L.ROOT_INO)                 # the top of every path
        except FsError:
            pass
        parents = {}
        for d in list(self.cache.values()):
            if d.dents is not None:
                for name, ent in d.dents.items():
                    if name != L.DOTDOT:
                        parents.setdefault(ent[0], (d.ino, name))
        parts: list[bytes] = []
        cur = ino
        while cur != L.ROOT_INO and cur in parents and len(parts) < 256:
            cur, name = parents[cur]
            parts.append(name)
        if cur != L.ROOT_INO:
            return f"inode {ino}"
        return "/" + "/".join(p.decode(errors="replace") for p in reversed(parts))
