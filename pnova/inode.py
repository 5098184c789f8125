"""DRAM state of one inode, rebuilt by replaying its log.

An inode's persistent state is its static line (written once at creation) plus
its log.  :class:`Inode` is the per-core cache of the result: attributes, the
page index of a file (page offset -> data block), the name index of a
directory, the xattrs.  It is derived state only and can always be rebuilt.
"""
from __future__ import annotations

import stat

from sortedcontainers import SortedList

from . import layout as L


def initial_nlink(mode: int) -> int:
    """Link count of a freshly created inode (before any LINK entry)."""
    return 2 if stat.S_ISDIR(mode) else 1


class Inode:
    """Attributes and indexes of one live inode."""

    __slots__ = ("ino", "mode", "uid", "gid", "rdev", "generation", "nlink", "size",
                 "atime", "mtime", "ctime", "head", "tail", "log_pages", "pages",
                 "dents", "pos", "sorted_pos", "parent", "dent_bytes", "xattrs",
                 "array", "array_twin", "local", "tseq", "vers", "names_seen", "rewrites", "wide")

    def __init__(self, ino: int, st: L.InodeStatic, head: int, tail: int, *,
                 wide: bool = True) -> None:
        self.ino = ino
        self.mode = st.mode
        self.uid = st.uid
        self.gid = st.gid
        self.rdev = st.rdev
        self.generation = st.generation
        self.nlink = initial_nlink(st.mode)
        self.size = 0
        self.atime = self.mtime = self.ctime = st.ctime_ns
        self.head = head
        self.tail = tail
        self.log_pages: list[int] = []
        self.xattrs: dict[bytes, bytes] = {}
        self.parent = 0
        self.dent_bytes = 0
        self.array = 0                     # block of the per-core log array, 0: none
        self.array_twin = 0                # block of its twin (format 8), 0: none
        # cpu -> [head, tail, pages] of that CPU's local log, as far as replayed
        self.local: dict[int, list] = {}
        # Sequence number of the entry that last set the times: with several
        # processes, entries of different pages may be applied out of order,
        # and the newest still gives the times.
        self.tseq = 0
        # version word -> value as of the last time this cache covered it
        # (shared mode only, see FileSystem._current_for_write)
        self.vers: dict[int, int] = {}
        # a directory's copy of every name version, as of the last time this
        # cache covered them all (shared mode only, see Namei._dir_names)
        self.names_seen = None
        # the inode's rewrite count when this cache was read (shared mode)
        self.rewrites = 0
        # The blocks of write entries of several pages, each to its entry's
        # record [pages, pages still mapped, sequence number, first block]
        # (one list shared by all its blocks); None while there are none.
        # Their frees wait for the sync record while other pages remain (see
        # :meth:`holds`; DESIGN 24.3).  A dict, not a sorted map: the common
        # free, of a one-page write's block, costs one lookup.
        # False: not kept, where nothing asks (an image in memory never holds
        # freed blocks back, so the bookkeeping of every big write would be
        # for nothing: a fifth of a 1 MiB write's time in a serving process).
        self.wide: dict[int, list] | None | bool = None if wide else False
        if stat.S_ISDIR(st.mode):
            self.pages = None
            self.dents: dict[bytes, tuple[int, int, int]] | None = {}   # name -> (ino, dtype, cookie)
            self.pos: dict[int, bytes] | None = {}                      # cookie -> name
            # The cookies in increasing order, for readdir: built at the first
            # listing and kept up to date from then on (None: not built).  A
            # sorted map kept up to date on every dentry cost about a tenth of
            # a create or an unlink, and a directory nobody lists needs none.
            self.sorted_pos: SortedList | None = None
        else:
            self.pages: dict[int, int] | None = {}
            self.dents = None
            self.pos = None
            self.sorted_pos = None

    @property
    def is_dir(self) -> bool:
        return self.dents is not None

    def cookies(self) -> SortedList:
        """A directory's name positions (cookie bases) in increasing order;
        kept up to date from the first call on."""
        if self.sorted_pos is None:
            self.sorted_pos = SortedList(self.pos)
        return self.sorted_pos

    def apply_all(self, entries: list[tuple]) -> None:
        """Apply decoded entries in order, as :meth:`apply` does one by one, the
        blocks they unreference not returned (a replay or a catching up frees
        nothing).  A directory's names, the bulk of what a directory's log
        holds, go to :meth:`_name_entry` without :meth:`apply`'s dispatch;
        ValueError as there (the caller drops this cache then)."""
        apply = self.apply
        if self.dents is None:
            for e in entries:
                apply(e)
            return
        name_entry = self._name_entry
        dentry, dotdot = L.E_DENTRY, L.DOTDOT
        for e in entries:
            if e[0] != dentry or e[3] == dotdot:
                apply(e)
            else:
                name_entry(*e[1:7])

    def _name_entry(self, seq: int, op: int, name: bytes, ino: int, dtype: int,
                    time_ns: int) -> None:
        """A directory's dentry for a name (not '..'): the name removed (with
        its position), then added again if ``op`` adds it."""
        pos = self.pos
        old = self.dents.pop(name, None)
        if old is not None:
            del pos[old[2]]
            if self.sorted_pos is not None:
                self.sorted_pos.remove(old[2])
            self.dent_bytes -= (47 + len(name)) & ~7
        if op == L.D_ADD:
            if seq in pos:
                raise ValueError(f"two names share directory position {seq}")
            self.dents[name] = (ino, dtype, seq)
            pos[seq] = name
            if self.sorted_pos is not None:
                self.sorted_pos.add(seq)
            self.dent_bytes += (47 + len(name)) & ~7
        # The times are the newest entry's: dentries of different names,
        # from different CPUs' logs, may be applied out of their order
        # (DESIGN 19.3.1), and a compacted log keeps old numbers.
        if seq >= self.tseq:
            self.mtime = self.ctime = time_ns
            self.tseq = seq

    def apply(self, e: tuple) -> list[int]:
        """Apply one decoded entry; return data blocks it made unreferenced."""
        t = e[0]
        freed: list[int] = []
        if t == L.E_WRITE:
            _, _seq, pgoff, npages, block, size, mtime = e[:7]   # [7]: the data digest
            pages = self.pages
            if pages is None:
                raise ValueError("write entry in a directory log")
            if npages == 1:
                old = pages.get(pgoff)
                wide = self.wide
                if old is not None:
                    freed.append(old)
                    if wide and old in wide:
                        self._unmapped(freed)
                if wide and block in wide:
                    del wide[block]        # a block of an entry that is gone, reused
                pages[pgoff] = block
            else:                          # a big write: the loops run in C
                span = range(pgoff, pgoff + npages)
                freed = [*map(pages.get, span)]
                holes = freed.count(None)
                if holes:                  # (none in an overwrite, all in an append)
                    freed = [] if holes == npages else [b for b in freed if b is not None]
                pages.update(zip(span, range(block, block + npages)))
                if freed and self.wide:
                    self._unmapped(freed)
                # every write of several pages (one read back from a log
                # carries no digest field here): counting one without a
                # digest only holds its blocks longer than needed
                if self.wide is not False:
                    self._mapped(block, npages, _seq)
            # Writes only ever grow the size (their field is the end they
            # reach): writes on different cores then commute, and only a
            # setattr, ordered by its sequence number, makes a file shorter.
            if size > self.size:
                self.size = size
            if _seq >= self.tseq:
                self.mtime = self.ctime = mtime
                self.tseq = _seq
        elif t == L.E_SETATTR:
            _, seq, mask, mode, uid, gid, size, atime, mtime, ctime = e
            if seq < self.tseq:                 # a newer write set the times already
                mask &= ~(L.SA_ATIME | L.SA_MTIME | L.SA_CTIME)
            elif mask & (L.SA_ATIME | L.SA_MTIME | L.SA_CTIME):
                self.tseq = seq
            if mask & L.SA_MODE:
                self.mode = (self.mode & ~0o7777) | (mode & 0o7777)
            if mask & L.SA_UID:
                self.uid = uid
            if mask & L.SA_GID:
                self.gid = gid
            if mask & L.SA_SIZE:
                freed = self.truncate_index(size)
                if freed and self.wide:
                    self._unmapped(freed)
                self.size = size
            if mask & L.SA_ATIME:
                self.atime = atime
            if mask & L.SA_MTIME:
                self.mtime = mtime
            if mask & L.SA_CTIME:
                self.ctime = ctime
        elif t == L.E_LINK:
            self.nlink = e[2]
            if e[1] >= self.tseq:
                self.ctime = e[3]
                self.tseq = e[1]
        elif t == L.E_DENTRY:
            _, seq, op, name, ino, dtype, time_ns = e[:7]   # [7]: rename marks
            if self.dents is None:
                raise ValueError("dentry in a file log")
            if name == L.DOTDOT:
                self.parent = ino
                if seq >= self.tseq:
                    self.ctime = time_ns
                    self.tseq = seq
                return freed
            self._name_entry(seq, op, name, ino, dtype, time_ns)
        elif t == L.E_XATTR:
            _, _seq, op, name, value, time_ns = e
            if op == L.X_SET:
                self.xattrs[name] = value
            else:
                self.xattrs.pop(name, None)
            if _seq >= self.tseq:
                self.ctime = time_ns
                self.tseq = _seq
        return freed

    def _mapped(self, block: int, n: int, seq: int) -> None:
        """Write entry ``seq`` now maps blocks block..block+n-1 (a block that an
        earlier entry had, freed and counted since, now belongs to this one)."""
        wide = self.wide
        if wide is None:
            wide = self.wide = {}
        wide.update(dict.fromkeys(range(block, block + n), [n, n, seq, block]))

    def _unmapped(self, blocks: list[int]) -> None:
        """Pages no longer map ``blocks``: count them off their entries; an entry
        that maps nothing any more is forgotten."""
        wide = self.wide
        get = wide.get
        for b in blocks:
            rec = get(b)
            if rec is not None and rec[1] > 0:
                rec[1] -= 1
                if rec[1] == 0:
                    start = rec[3]
                    for x in range(start, start + rec[0]):
                        if get(x) is rec:
                            del wide[x]

    def holds(self, block: int) -> int:
        """The sequence number of the write entry of several pages that ``block``
        belongs to, if that entry still maps some page (recovery may check its
        data, all of it, until the sync record covers it); else 0."""
        wide = self.wide
        if not wide:
            return 0
        rec = wide.get(block)
        return rec[2] if rec is not None and rec[1] > 0 else 0

    def truncate_index(self, size: int) -> list[int]:
        """Drop pages wholly past ``size``; return their blocks."""
        pages = self.pages
        if pages is None:
            return []
        keep = (size + L.BLOCK - 1) // L.BLOCK
        if not pages or max(pages) < keep:
            return []
        drop = [p for p in pages if p >= keep]
        return [pages.pop(p) for p in drop]

    def live_log_estimate(self) -> int:
        """Upper bound, in bytes, of this inode's log after compaction."""
        n = 64 + 32 + 16 + sum((39 + len(k) + len(v)) & ~7 for k, v in self.xattrs.items())
        if self.pages is not None:
            n += 64 * len(self.pages)
        else:
            n += self.dent_bytes + 48
        return n
