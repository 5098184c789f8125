"""Systematic crash injection: every crash state at every fence must recover atomically.

A workload case is a few setup operations and the operations under test,
written as path-based steps.  The case runs on the engine over a
:class:`~pnova.pmem.TrackedPMem`; at every fence (and at the end of every
operation under test) the harness builds crash states from the durable image
and the stores still in flight:

* the durable image alone and with every in-flight line;
* with every subset of size 1..k of the in-flight *atoms*: each line of a
  small store (up to four lines: log entries, inode lines, journal records,
  tail pointers) is an atom of its own, a larger store (data pages) is one;
* a seeded random sample of larger subsets;
* variants of each large store: a prefix of its lines plus one torn line (a
  random subset of that line's 8-byte words), and a random subset of its lines.

Each state is mounted (recovery must succeed), checked by fsck (nothing may
be found), compared with the model before and after the interrupted
operation (one of them must match exactly: names, types, modes, owners,
sizes, contents, link counts, symlink targets, xattrs, times set
explicitly), and finally used: a new file is written, everything is removed,
fsck must again be clean and only the root's log may still hold blocks.

Every state has an ID ``WORKLOAD:CASE:POINT:STATE`` (``random`` workloads
carry their seed: ``random@SEED``); ``--replay ID --keep IMAGE`` rebuilds
exactly that state, writes it to IMAGE and reports the check.
"""
from __future__ import annotations

import argparse
import copy
import errno
import hashlib
import io
import itertools
import multiprocessing
import os
import random
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field


from . import layout as L
from . import namei
from .engine import FileSystem, Landing
from .errors import FsError
from .mkfs import format_device
from .pmem import TrackedPMem

IMAGE_SIZE = 1 << 20
SAMPLE_BEYOND_K = 4          # random larger subsets per crash point
TORN_PER_UNIT = 2            # torn variants per multi-line store
SMALL_STORE_LINES = 4        # stores up to this many lines are enumerated line by line


# ---------------------------------------------------------------- the model
class Node:
    """A model inode (shared by all its hard links)."""

    def __init__(self, kind: str, mode: int) -> None:
        self.kind = kind                      # 'f', 'd' or 'l'
        self.mode = mode
        self.uid = 0
        self.gid = 0
        self.data = bytearray()
        self.target = b""
        self.xattrs: dict[bytes, bytes] = {}
        self.times: tuple[int, int] | None = None   # (atime, mtime) once set explicitly
        self.children: dict[bytes, Node] = {}


Step = tuple
# Steps that change the one object their path names (the rest change names).
OBJECT_OPS = ("write", "land", "truncate", "chmod", "chown", "utimens", "setxattr", "removexattr")


def _split(path: str) -> tuple[list[bytes], bytes]:
    parts = [p.encode() for p in path.strip("/").split("/")]
    return parts[:-1], parts[-1]


class Model:
    """A plain in-memory tree with the operations the workloads use."""

    def __init__(self) -> None:
        self.root = Node("d", 0o755)

    def node(self, path: str) -> Node:
        n = self.root
        for p in path.strip("/").split("/"):
            if p:
                n = n.children[p.encode()]
        return n

    def parent(self, path: str) -> tuple[Node, bytes]:
        dirs, name = _split(path)
        n = self.root
        for p in dirs:
            n = n.children[p]
        return n, name

    def apply(self, step: Step) -> None:
        op = step[0]
        if op == "cpu":                       # ("cpu", n, step): which CPU runs it is
            return self.apply(step[2])        # invisible in the resulting tree
        if op in ("create", "mkdir"):
            d, name = self.parent(step[1])
            d.children[name] = Node("f" if op == "create" else "d", step[2])
        elif op == "symlink":
            d, name = self.parent(step[2])
            n = Node("l", 0o777)
            n.target = step[1].encode()
            d.children[name] = n
        elif op in OBJECT_OPS:
            self.apply_to(self.node(step[1]), step)
        elif op == "link":
            d, name = self.parent(step[2])
            d.children[name] = self.node(step[1])
        elif op in ("unlink", "rmdir"):
            d, name = self.parent(step[1])
            del d.children[name]
        elif op == "rename":
            _, src, dst, flags = step
            sd, sn = self.parent(src)
            dd, dn = self.parent(dst)
            s = sd.children[sn]
            if flags == 2:
                sd.children[sn], dd.children[dn] = dd.children[dn], s
            elif dd.children.get(dn) is not s:
                del sd.children[sn]
                dd.children[dn] = s
        elif op in ("sync", "fill"):
            pass                              # the tree is unchanged
        else:
            raise ValueError(f"unknown step {step!r}")

    @staticmethod
    def apply_to(f: Node, step: Step) -> None:
        """A step that changes one object (OBJECT_OPS), applied to ``f`` itself
        rather than to whatever its path names now."""
        op = step[0]
        if op in ("write", "land"):
            _, _path, off, n, byte = step
            f.times = None                    # a write moves mtime: no longer pinned
            if off > len(f.data):
                f.data.extend(bytes(off - len(f.data)))
            f.data[off:off + n] = bytes([byte]) * n
        elif op == "truncate":
            f.times = None
            size = step[2]
            if size < len(f.data):
                del f.data[size:]
            else:
                f.data.extend(bytes(size - len(f.data)))
        elif op == "chmod":
            f.mode = step[2]
        elif op == "chown":
            f.uid, f.gid = step[2], step[3]
        elif op == "utimens":
            f.times = (step[2], step[3])
        elif op == "setxattr":
            f.xattrs[step[2]] = step[3]
        elif op == "removexattr":
            del f.xattrs[step[2]]
        else:
            raise ValueError(f"not a step on one object: {step!r}")

    def dump(self) -> dict:
        """Canonical description of the whole tree, keyed by path."""
        out: dict[str, tuple] = {}
        ids: dict[int, str] = {}

        def visit(path: str, n: Node) -> None:
            links = ids.setdefault(id(n), path)
            out[path] = _desc(n.kind, n.mode, n.uid, n.gid, bytes(n.data), n.target,
                              n.xattrs, n.times, links, _nlink_of(n, self.root))
            for name, c in sorted(n.children.items()):
                visit(path.rstrip("/") + "/" + name.decode(), c)

        visit("/", self.root)
        return out


def _nlink_of(n: Node, root: Node) -> int:
    if n.kind == "d":
        return 2 + sum(1 for c in n.children.values() if c.kind == "d")
    count = 0
    stack = [root]
    while stack:
        d = stack.pop()
        for c in d.children.values():
            if c is n:
                count += 1
            if c.kind == "d":
                stack.append(c)
    return count


def _desc(kind: str, mode: int, uid: int, gid: int, data: bytes, target: bytes,
          xattrs: dict, times, first_path: str, nlink: int) -> tuple:
    return (kind, mode & 0o7777, uid, gid, len(data), hashlib.sha1(data).hexdigest(),
            target, tuple(sorted(xattrs.items())), times, first_path, nlink)


# -------------------------------------------------------- driving the engine
class Driver:
    """Runs path-based steps on a FileSystem."""

    def __init__(self, fs: FileSystem) -> None:
        self.fs = fs

    def ino(self, path: str) -> int:
        ino = L.ROOT_INO
        for p in path.strip("/").split("/"):
            if p:
                ino = self.fs.lookup(ino, p.encode()).ino
        return ino

    def parent(self, path: str) -> tuple[int, bytes]:
        dirs, name = _split(path)
        return self.ino("/" + "/".join(d.decode() for d in dirs)), name

    def apply(self, step: Step) -> None:
        fs, op = self.fs, step[0]
        if op == "create":
            fs.create(*self.parent(step[1]), step[2])
        elif op == "mkdir":
            fs.mkdir(*self.parent(step[1]), step[2])
        elif op == "symlink":
            fs.symlink(*self.parent(step[2]), step[1].encode())
        elif op == "write":
            _, path, off, n, byte = step
            fs.write(self.ino(path), off, bytes([byte]) * n)
        elif op == "land":
            # a write whose data a read placed in free blocks first, as the
            # mount receives a stream of large writes (DESIGN 22.6)
            _, path, off, n, byte = step
            ino = self.ino(path)
            landing = Landing(fs)
            landing.arm(-(-n // L.BLOCK))
            if not landing.ready():
                raise FsError(errno.ENOSPC)
            with tempfile.TemporaryFile() as req:
                req.write(bytes(80) + bytes([byte]) * n)
                req.seek(0)
                landing.receive(req.fileno(), memoryview(bytearray(80)),
                                memoryview(bytearray(L.BLOCK)))
            fs.write(ino, off, landing.data(n))
            landing.end()
        elif op == "truncate":
            fs.setattr(self.ino(step[1]), size=step[2])
        elif op == "link":
            fs.link(self.ino(step[1]), *self.parent(step[2]))
        elif op == "unlink":
            fs.unlink(*self.parent(step[1]))
        elif op == "rmdir":
            fs.rmdir(*self.parent(step[1]))
        elif op == "rename":
            _, src, dst, flags = step
            fs.rename(*self.parent(src), *self.parent(dst), flags)
        elif op == "chmod":
            fs.setattr(self.ino(step[1]), mode=step[2])
        elif op == "chown":
            fs.setattr(self.ino(step[1]), uid=step[2], gid=step[3])
        elif op == "utimens":
            fs.setattr(self.ino(step[1]), atime_ns=step[2], mtime_ns=step[3])
        elif op == "setxattr":
            fs.setxattr(self.ino(step[1]), step[2], step[3])
        elif op == "removexattr":
            fs.removexattr(self.ino(step[1]), step[2])
        elif op == "sync":
            fs.sync()
        elif op == "fill":
            # ("fill", path, room): chmods that change nothing (64-byte
            # entries) until the object's log has less than ``room`` bytes
            # left in its page (64: no further setattr fits; 128: one does)
            ino = self.ino(step[1])
            while L.LOG_DATA - fs.get(ino).tail % L.BLOCK >= step[2]:
                fs.setattr(ino, mode=fs.getattr(ino).mode & 0o7777)
        else:
            raise ValueError(f"unknown step {step!r}")

    def dump(self, explicit_times: set[str]) -> dict:
        """The engine's tree in the model's canonical form."""
        fs = self.fs
        out: dict[str, tuple] = {}
        first: dict[int, str] = {}

        def visit(path: str, ino: int) -> None:
            a = fs.getattr(ino)
            kind = "d" if stat.S_ISDIR(a.mode) else "l" if stat.S_ISLNK(a.mode) else "f"
            data = fs.read(ino, 0, a.size) if kind == "f" else b""
            target = fs.readlink(ino) if kind == "l" else b""
            xattrs = {k: fs.getxattr(ino, k) for k in fs.listxattr(ino)}
            links = first.setdefault(ino, path)
            times = (a.atime_ns, a.mtime_ns) if links in explicit_times else None
            out[path] = _desc(kind, a.mode, a.uid, a.gid, data, target, xattrs, times, links,
                              a.nlink)
            if kind == "d":
                for name, child, _ in sorted(fs.readdir(ino)[2:]):
                    visit(path.rstrip("/") + "/" + name.decode(), child)

        visit("/", L.ROOT_INO)
        return out


def _explicit_times(model: Model) -> set[str]:
    return {p for p, d in model.dump().items() if d[8] is not None}


# ----------------------------------------------------------------- workloads
SETUP: list[Step] = [
    ("mkdir", "/A", 0o755),
    ("mkdir", "/B", 0o755),
    ("create", "/A/foo", 0o644),
    ("write", "/A/foo", 0, 6000, 0x61),
    ("create", "/bar", 0o600),
    ("write", "/bar", 0, 4096, 0x62),
    ("link", "/bar", "/B/barlink"),
    ("mkdir", "/A/C", 0o700),
    ("symlink", "A/foo", "/sym"),
    ("setxattr", "/A/foo", b"user.k", b"v1"),
]

SEQ1_OPS: list[Step] = [
    ("create", "/A/new", 0o644),
    ("mkdir", "/B/newdir", 0o755),
    ("write", "/A/foo", 0, 4096, 0x71),            # aligned overwrite
    ("write", "/A/foo", 100, 300, 0x72),           # unaligned overwrite inside a page
    ("write", "/A/foo", 5000, 5000, 0x73),         # extending, straddling pages
    ("write", "/bar", 20000, 100, 0x74),           # sparse: leaves a hole
    ("write", "/bar", 0, 12288, 0x75),             # multi-page overwrite
    ("truncate", "/A/foo", 20000),                 # grow
    ("truncate", "/A/foo", 1000),                  # shrink to a partial page
    ("truncate", "/bar", 0),
    ("link", "/A/foo", "/B/foolink"),
    ("unlink", "/A/foo"),
    ("unlink", "/bar"),                            # one of two links
    ("symlink", "../bar", "/B/newsym"),
    ("rename", "/A/foo", "/A/foo2", 0),            # within a directory
    ("rename", "/A/foo", "/B/foo", 0),             # across directories
    ("rename", "/A/foo", "/bar", 0),               # over an existing file
    ("rename", "/A/C", "/B/C", 0),                 # a directory across directories
    ("rename", "/A/foo", "/bar", 1),               # RENAME_NOREPLACE onto a new name? (see below)
    ("rename", "/A/foo", "/bar", 2),               # RENAME_EXCHANGE
    ("rename", "/A/C", "/sym", 2),                 # exchange a directory and a symlink
    ("chmod", "/A/foo", 0o4711),
    ("chown", "/A/foo", 1000, 100),
    ("utimens", "/A/foo", 1_000_000_000, 2_000_000_000),
    ("setxattr", "/A/foo", b"user.k", b"v2-longer-value"),
    ("setxattr", "/B", b"user.new", b"x"),
    ("removexattr", "/A/foo", b"user.k"),
    ("rmdir", "/A/C"),
    # a write whose data was read into free blocks first (DESIGN 22.6): it
    # extends the file and its last page is partial
    ("land", "/A/foo", 4096, 8197, 0x76),
]
# RENAME_NOREPLACE must target a free name to succeed.
SEQ1_OPS[SEQ1_OPS.index(("rename", "/A/foo", "/bar", 1))] = ("rename", "/A/foo", "/B/fresh", 1)


def _valid(model: Model, step: Step) -> bool:
    """Whether ``step`` is a legal operation on the model's tree (for pairs)."""
    def exists(p: str) -> bool:
        try:
            model.node(p)
            return True
        except KeyError:
            return False

    def parent_dir(p: str) -> bool:
        try:
            d, _ = model.parent(p)
            return d.kind == "d"
        except KeyError:
            return False

    op = step[0]
    if op == "cpu":
        return _valid(model, step[2])
    if op in ("create", "mkdir"):
        return parent_dir(step[1]) and not exists(step[1])
    if op == "symlink":
        return parent_dir(step[2]) and not exists(step[2])
    if op in ("write", "land", "truncate"):
        return exists(step[1]) and model.node(step[1]).kind == "f"
    if op == "link":
        return exists(step[1]) and model.node(step[1]).kind == "f" and parent_dir(step[2]) \
            and not exists(step[2])
    if op == "unlink":
        return exists(step[1]) and model.node(step[1]).kind != "d"
    if op == "rmdir":
        return exists(step[1]) and model.node(step[1]).kind == "d" and \
            not model.node(step[1]).children and step[1] != "/"
    if op == "rename":
        _, src, dst, flags = step
        if not exists(src) or not parent_dir(dst) or dst.startswith(src.rstrip("/") + "/"):
            return False
        s = model.node(src)
        if flags == 2:
            if not exists(dst):
                return False
            d = model.node(dst)
            return not (d.kind == "d" and src.startswith(dst.rstrip("/") + "/"))
        if exists(dst):
            if flags == 1:
                return False
            d = model.node(dst)
            if s.kind == "d":
                return d.kind == "d" and not d.children
            return d.kind != "d"
        return True
    if op in ("chmod", "chown", "utimens"):
        return exists(step[1])
    if op == "setxattr":
        return exists(step[1]) and model.node(step[1]).kind != "l"
    if op == "removexattr":
        return exists(step[1]) and step[2] in model.node(step[1]).xattrs
    return False


def seq1_cases() -> list[tuple[list[Step], list[Step]]]:
    return [(SETUP, [op]) for op in SEQ1_OPS]


# Every object an operation of SEQ1_OPS writes an entry to.
FILLED = ["/", "/A", "/B", "/A/foo", "/bar", "/A/C"]
EDGE_ROOM = (64, 128)


def edge_cases() -> list[tuple[list[Step], list[Step]]]:
    """Each operation of seq1 with every log it may write already filled to
    less than EDGE_ROOM bytes from its page's end (room for no 64-byte entry,
    or for one): its entries open new pages, or straddle two (the cases where
    a log's pages and the cut between operations meet)."""
    return [(SETUP + [("fill", p, room) for p in FILLED], [op])
            for room in EDGE_ROOM for op in SEQ1_OPS]


def seq2_cases() -> list[tuple[list[Step], list[Step]]]:
    out = []
    for a, b in itertools.product(SEQ1_OPS, repeat=2):
        m = Model()
        for s in SETUP:
            m.apply(s)
        if not _valid(m, a):
            continue
        m.apply(a)
        if _valid(m, b):
            out.append((SETUP, [a, b]))
    return out


def random_steps(rng: random.Random, model: Model, n: int) -> list[Step]:
    """``n`` random legal steps on a copy of ``model``."""
    m = copy.deepcopy(model)
    names = ["a", "b", "c", "dir", "x" * 30]
    steps: list[Step] = []
    tries = 0
    while len(steps) < n and tries < n * 50:
        tries += 1
        paths = [p for p in m.dump() if p != "/"]
        dirs = ["/"] + [p for p in paths if m.node(p).kind == "d"]
        d = rng.choice(dirs).rstrip("/")
        fresh = f"{d}/{rng.choice(names)}"
        any_path = rng.choice(paths) if paths else "/A"
        op = rng.choice(["create", "mkdir", "write", "write", "truncate", "link", "unlink",
                         "rmdir", "rename", "symlink", "chmod", "setxattr", "removexattr"])
        if op in ("create", "mkdir"):
            step: Step = (op, fresh, rng.choice([0o644, 0o755]))
        elif op == "write":
            step = ("write", any_path, rng.choice([0, 100, 4096, 5000, 20000]),
                    rng.choice([1, 300, 4096, 9000]), rng.randrange(1, 256))
        elif op == "truncate":
            step = ("truncate", any_path, rng.choice([0, 1000, 4096, 30000]))
        elif op == "link":
            step = ("link", any_path, fresh)
        elif op in ("unlink", "rmdir", "chmod"):
            step = (op, any_path) if op != "chmod" else (op, any_path, 0o700)
        elif op == "rename":
            step = ("rename", any_path, rng.choice([fresh, rng.choice(paths or ["/A"])]),
                    rng.choice([0, 0, 1, 2]))
        elif op == "symlink":
            step = ("symlink", rng.choice(["a", "../b", "x" * 100]), fresh)
        elif op == "setxattr":
            step = ("setxattr", any_path, rng.choice([b"user.p", b"user.q"]),
                    bytes([rng.randrange(256)]) * rng.choice([1, 50]))
        else:
            step = ("removexattr", any_path, rng.choice([b"user.p", b"user.q"]))
        if _valid(m, step):
            m.apply(step)
            steps.append(step)
    return steps


def random_cases(seed: int, count: int = 20, length: int = 4) -> list[tuple[list[Step], list[Step]]]:
    rng = random.Random(seed)
    base = Model()
    for s in SETUP:
        base.apply(s)
    return [(SETUP, random_steps(rng, base, length)) for _ in range(count)]


# Two CPUs writing one file in turn: CPU 0 is the file's home CPU (its writes
# go to the global log), CPU 1 appends to its own local log; replay must merge
# the logs by sequence number; the last three interleave namespace operations
# of two CPUs.  Each case is checked at every fence of every step, so crash
# states fall between and inside interleaved operations.
DUAL_CASES: list[list[Step]] = [
    [("cpu", 1, ("write", "/A/foo", 0, 4096, 0x41)), ("cpu", 0, ("write", "/A/foo", 0, 4096, 0x42)),
     ("cpu", 1, ("write", "/A/foo", 0, 4096, 0x43))],
    [("cpu", 0, ("write", "/A/foo", 100, 5000, 0x44)), ("cpu", 1, ("write", "/A/foo", 2000, 9000, 0x45)),
     ("cpu", 0, ("truncate", "/A/foo", 3000)), ("cpu", 1, ("write", "/A/foo", 0, 10, 0x46))],
    [("cpu", 1, ("write", "/A/foo", 8192, 4096, 0x47)), ("cpu", 1, ("truncate", "/A/foo", 100)),
     ("cpu", 0, ("write", "/A/foo", 20000, 50, 0x48)), ("cpu", 1, ("setxattr", "/A/foo", b"user.k", b"v3"))],
    [("cpu", 1, ("write", "/bar", 0, 12288, 0x49)), ("cpu", 0, ("unlink", "/bar")),
     ("cpu", 1, ("write", "/B/barlink", 4096, 100, 0x4A)), ("cpu", 0, ("write", "/B/barlink", 0, 10, 0x4B))],
    # namespace operations from two CPUs: one shared directory (/A), names
    # moving between directories, links, a directory moved and removed
    [("cpu", 1, ("create", "/A/n1", 0o644)), ("cpu", 0, ("create", "/A/n2", 0o600)),
     ("cpu", 1, ("rename", "/A/n1", "/B/m1", 0)), ("cpu", 0, ("link", "/A/n2", "/B/l2")),
     ("cpu", 1, ("unlink", "/A/n2")), ("cpu", 0, ("rename", "/B/m1", "/B/l2", 0))],
    [("cpu", 0, ("mkdir", "/A/D", 0o755)), ("cpu", 1, ("create", "/A/D/x", 0o644)),
     ("cpu", 1, ("rename", "/A/D", "/B/D", 0)), ("cpu", 0, ("unlink", "/B/D/x")),
     ("cpu", 1, ("rmdir", "/B/D")), ("cpu", 0, ("mkdir", "/B/E", 0o700))],
    [("cpu", 1, ("link", "/bar", "/A/bl")), ("cpu", 0, ("unlink", "/B/barlink")),
     ("cpu", 1, ("rename", "/A/bl", "/bar", 2)), ("cpu", 0, ("symlink", "bar", "/A/s")),
     ("cpu", 1, ("rename", "/A/s", "/A/foo", 0)), ("cpu", 0, ("unlink", "/bar"))],
    # one directory both CPUs change: CPU 1 holds it whole while it is the
    # only one there; once it is shared, CPU 1 (not its home) puts its
    # dentries in its own local log of it (format 9; the first makes the
    # directory's log array and that log, the later ones append) and CPU 0 in
    # the global log; a mkdir there holds it whole again; names move out of it
    [("cpu", 1, ("create", "/A/q", 0o644)), ("cpu", 0, ("create", "/A/p", 0o644)),
     ("cpu", 1, ("rename", "/A/q", "/A/r", 0)), ("cpu", 0, ("unlink", "/A/p")),
     ("cpu", 1, ("link", "/A/r", "/A/s")), ("cpu", 0, ("mkdir", "/A/E", 0o755)),
     ("cpu", 1, ("rename", "/A/s", "/B/t", 0)), ("cpu", 1, ("unlink", "/A/r"))],
    # a directory of CPU 1's table, where CPU 0 is the one with a local log,
    # emptied by both CPUs and removed: its array and local log go with it
    [("cpu", 1, ("mkdir", "/B/G", 0o755)), ("cpu", 0, ("create", "/B/G/b", 0o644)),
     ("cpu", 1, ("create", "/B/G/a", 0o644)), ("cpu", 0, ("unlink", "/B/G/b")),
     ("cpu", 1, ("unlink", "/B/G/a")), ("cpu", 0, ("rmdir", "/B/G"))],
]


def cases_for(workload: str, seed: int) -> list[tuple[list[Step], list[Step]]]:
    if workload == "seq1":
        return seq1_cases()
    if workload == "dual":
        return [(SETUP, ops) for ops in DUAL_CASES]
    if workload == "seq2":
        return seq2_cases()
    if workload == "random":
        return random_cases(seed)
    if workload == "edge":
        return edge_cases()
    raise ValueError(f"unknown workload {workload!r} (seq1, seq2, random, dual, edge)")


# ------------------------------------------------------------- crash states
def crash_states(units: list[list[int]], k: int, rng: random.Random
                 ) -> Iterator[tuple[list[int], dict[int, int]]]:
    """(lines to persist, torn lines) for every crash state of one crash point."""
    seen: set[tuple] = set()

    def emit(lines, torn):
        key = (tuple(sorted(lines)), tuple(sorted(torn.items())))
        if key not in seen:
            seen.add(key)
            return True
        return False

    # Small stores (metadata: entries, inode lines, journal records) persist
    # line by line in any order; a large store (data pages) is one atom whose
    # partial persistence the torn variants below cover.
    big = [u for u in units if len(u) > SMALL_STORE_LINES]
    units = [[ln] for u in units if len(u) <= SMALL_STORE_LINES for ln in u] + big
    if emit([], {}):
        yield [], {}
    everything = [ln for u in units for ln in u]
    if units and emit(everything, {}):
        yield everything, {}
    for size in range(1, min(k, len(units)) + 1):
        for combo in itertools.combinations(range(len(units)), size):
            lines = [ln for i in combo for ln in units[i]]
            if emit(lines, {}):
                yield lines, {}
    if len(units) > k + 1:
        for _ in range(SAMPLE_BEYOND_K):
            size = rng.randint(k + 1, len(units) - 1)
            combo = rng.sample(range(len(units)), size)
            lines = [ln for i in combo for ln in units[i]]
            if emit(lines, {}):
                yield lines, {}
    for u in big:
        for _ in range(TORN_PER_UNIT):
            cut = rng.randrange(1, len(u))       # lines before the cut made it; one is torn
            torn = {u[cut]: rng.randrange(1, 255)}
            if emit(u[:cut], torn):
                yield u[:cut], torn
        lines = sorted(rng.sample(u, rng.randrange(1, len(u))))   # any lines, any order
        if emit(lines, {}):
            yield lines, {}


# ------------------------------------------------------------------ oracle
@dataclass
class Failure:
    id: str
    reason: str


def check_state(img_path: str, allowed: list[tuple[dict, set[str]]],
                mount: Callable[[str], FileSystem] = FileSystem.mount) -> str | None:
    """Mount a crash image and check the oracle; return None or what went wrong.

    ``allowed`` holds (tree, paths whose times the tree pins) for the state
    before and the state after the interrupted operation (or, for the page
    model, every state it allows).  ``mount`` opens the crash image.
    """
    from .fsck import Checker          # fsck imports the engine; keep import order simple
    try:
        fs = mount(img_path)
    except Exception as e:                                   # noqa: BLE001
        # The temporary image's path would make the reason differ between runs.
        return f"recovery failed: {type(e).__name__}: {str(e).replace(img_path + ': ', '')}"
    try:
        try:
            trees = [(Driver(fs).dump(times), want) for want, times in allowed]
        except FsError as e:
            return f"reading the recovered tree failed: {e}"
        if not any(got == want for got, want in trees):
            got, want = trees[-1]
            return "recovered tree matches no allowed state; against the last: " + \
                _diff(got, want)
    finally:
        fs.unmount()
    out = io.StringIO()
    rc = Checker(img_path, force=True, out=out).run()
    if rc != 0:
        return "fsck after recovery: " + " | ".join(out.getvalue().strip().splitlines()[:4])
    return usable_after_recovery(img_path)


def usable_after_recovery(img_path: str) -> str | None:
    """The recovered filesystem must accept new work and give everything back:
    None, or what went wrong."""
    from .fsck import Checker
    fs = FileSystem.mount(img_path)
    try:
        d = Driver(fs)
        fs.write(fs.create(L.ROOT_INO, b"after-crash", 0o644).ino, 0, b"z" * 5000)
        _remove_all(fs, L.ROOT_INO)
        # (its log pages, and its per-core log array and local logs if it has them)
        root_pages = len(fs._blocks_of(fs.get(L.ROOT_INO)))
        st = fs.statfs()
        if st.blocks - st.bfree != root_pages:
            return f"{st.blocks - st.bfree - root_pages} blocks still in use after removing " \
                "everything"
        if st.ffree != st.files - 1:
            return f"{st.files - 1 - st.ffree} inodes still in use after removing everything"
        del d
    except FsError as e:
        return f"using the recovered filesystem failed: {e}"
    finally:
        fs.unmount()
    out = io.StringIO()
    if Checker(img_path, force=True, out=out).run() != 0:
        return "fsck after removing everything: " + out.getvalue().strip().splitlines()[0]
    return None


def _remove_all(fs: FileSystem, dino: int) -> None:
    for name, child, _ in fs.readdir(dino)[2:]:
        if stat.S_ISDIR(fs.getattr(child).mode):
            _remove_all(fs, child)
            fs.rmdir(dino, name)
        else:
            fs.unlink(dino, name)


def _diff(tree: dict, ref: dict) -> str:
    for p in sorted(set(tree) | set(ref)):
        if tree.get(p) != ref.get(p):
            return f"{p}: got {tree.get(p)!r}, after-state has {ref.get(p)!r}"
    return "?"


# ------------------------------------------------------------------ runner
@dataclass
class CaseResult:
    case: int
    checked: int = 0
    failures: list[Failure] = field(default_factory=list)


def run_case(workload: str, seed: int, case_no: int, k: int, *,
             only: tuple[int, int] | None = None, keep: str | None = None,
             tick: Callable[[int], None] | None = None) -> CaseResult:
    """Run one case of a workload, checking every crash state (or only (point, state))."""
    setup, ops = cases_for(workload, seed)[case_no]
    ident = workload if workload != "random" else f"random@{seed}"
    return run_steps(setup, ops, k, ident=ident, case_no=case_no, only=only, keep=keep,
                     tick=tick)


def run_steps(setup: list[Step], ops: list[Step], k: int, *, ident: str = "custom",
              case_no: int = 0, only: tuple[int, int] | None = None, keep: str | None = None,
              tmpdir: str | None = None,
              tick: Callable[[int], None] | None = None) -> CaseResult:
    """Apply ``setup`` normally, then ``ops`` with every crash state checked."""
    # A directory two CPUs have used stays shared for the whole case, however
    # long the checks between its steps take: each CPU's change there then
    # takes the path it takes under load (name locks; the dentries of a CPU
    # other than the directory's home in its local log, DESIGN 19.3 and 19.8).
    saved = namei.PRIVATE_AFTER
    namei.PRIVATE_AFTER = 1 << 60
    try:
        return _run_steps(setup, ops, k, ident, case_no, only, keep, tmpdir, tick)
    finally:
        namei.PRIVATE_AFTER = saved


def _run_steps(setup: list[Step], ops: list[Step], k: int, ident: str, case_no: int,
               only: tuple[int, int] | None, keep: str | None, tmpdir: str | None,
               tick: Callable[[int], None] | None) -> CaseResult:
    res = CaseResult(case_no)
    ncpus = 2 if any(s[0] == "cpu" for s in ops) else 1
    with tempfile.TemporaryDirectory(dir=tmpdir or _shm()) as tmp:
        img = os.path.join(tmp, "dev.img")
        crash = os.path.join(tmp, "crash.img")
        model = prepare_image(img, setup, ncpus)
        pm = TrackedPMem(img)
        fs = FileSystem.mount(img, device=pm)
        drivers = {0: Driver(fs)}
        point = 0
        rng_base = f"{ident}:{case_no}"
        cache: dict[bytes, str | None] = {}
        for op in ops:
            before = model.dump()
            after_model = copy.deepcopy(model)
            after_model.apply(op)
            allowed = [(before, _explicit_times(model)),
                       (after_model.dump(), _explicit_times(after_model))]

            def at_crash_point(p: TrackedPMem) -> None:
                nonlocal point
                this = point
                point += 1
                if only is not None and only[0] != this:
                    return
                rng = random.Random(f"{rng_base}:{this}")
                for sno, (lines, torn) in enumerate(crash_states(p.units(), k, rng)):
                    if only is not None and only[1] != sno:
                        continue
                    image = p.crash_image(lines, torn)
                    raw = image.tobytes()
                    sid = f"{ident}:{case_no}:{this}:{sno}"
                    if keep is not None:
                        with open(keep, "wb") as f:
                            f.write(raw)
                    h = hashlib.sha1(raw).digest()
                    if h in cache and keep is None:
                        why = cache[h]
                    else:
                        with open(crash, "wb") as f:
                            f.write(raw)
                        why = check_state(crash, allowed)
                        cache[h] = why
                    res.checked += 1
                    if why is not None:
                        res.failures.append(Failure(sid, why))
                    if tick is not None:
                        tick(1)

            pm.on_fence = at_crash_point
            cpu, step = (op[1], op[2]) if op[0] == "cpu" else (0, op)
            if cpu not in drivers:
                drivers[cpu] = Driver(FileSystem.attach(fs, cpu))
            drivers[cpu].apply(step)
            at_crash_point(pm)                 # the end of the operation is a crash point too
            pm.on_fence = None
            model = after_model
        fs.unmount()
    return res


def prepare_image(img: str, setup: list[Step], ncpus: int = 1) -> Model:
    """Format a crash-test image and apply ``setup`` to it normally (no crash
    states); return the model of the tree it holds, unmounted and clean."""
    format_device(img, IMAGE_SIZE, numa_nodes=1, cpus_per_node=ncpus, inodes_per_cpu=64)
    model = Model()
    fs = FileSystem.mount(img)
    drv = Driver(fs)
    for s in setup:
        drv.apply(s)
        model.apply(s)
    fs.unmount()
    return model


def _shm() -> str | None:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def _worker(args: tuple) -> CaseResult:
    workload, seed, case_no, k = args
    return run_case(workload, seed, case_no, k)


def run(workload: str, k: int, seed: int, jobs: int = 1,
        progress: Callable[[int, int, int, int], None] | None = None) -> list[CaseResult]:
    """Check every case of a workload; ``progress(cases_done, cases, states, failed)``."""
    n = len(cases_for(workload, seed))
    return run_cases(_worker, [(workload, seed, i, k) for i in range(n)], jobs, progress)


def run_cases(worker: Callable[[tuple], CaseResult], args: list[tuple], jobs: int,
              progress: Callable[[int, int, int, int], None] | None) -> list[CaseResult]:
    """``worker(a)`` for every ``a`` of ``args`` (in ``jobs`` processes), results
    in case order; ``progress(cases_done, cases, states, failed)``."""
    n = len(args)
    results: list[CaseResult] = []
    states = failed = 0
    pool = multiprocessing.get_context("fork").Pool(jobs) if jobs > 1 else None
    it: Iterator[CaseResult] = pool.imap_unordered(worker, args) if pool else map(worker, args)
    try:
        for r in it:
            results.append(r)
            states += r.checked
            failed += len(r.failures)
            if progress is not None:
                progress(len(results), n, states, failed)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    results.sort(key=lambda r: r.case)
    return results


def parse_id(ident: str) -> tuple[str, int, int, int, int]:
    """'seq1:3:7:12' or 'random@5:3:7:12' -> (workload, seed, case, point, state)."""
    try:
        wl, case, point, state = ident.split(":")
        seed = 0
        if wl.startswith("random@"):
            wl, seed = "random", int(wl.split("@", 1)[1])
        return wl, seed, int(case), int(point), int(state)
    except ValueError:
        raise ValueError(f"bad crash state ID {ident!r} (expected WORKLOAD:CASE:POINT:STATE)") \
            from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="pnova-crashtest",
        description="Check that every crash state at every fence recovers atomically.")
    ap.add_argument("--model", default="pm", choices=["pm", "pages"],
                    help="pm: persistent memory, stores lost unless flushed and fenced "
                         "(default); pages: an image on a disk, any dirty 4 KiB pages "
                         "written back since the last sync (workloads seq1, seq2, edge)")
    ap.add_argument("--workload", default="seq1",
                    choices=["seq1", "seq2", "random", "dual", "edge"],
                    help="seq1: each operation alone; seq2: every legal pair; random; "
                         "dual: two CPUs; edge: each operation with the logs it writes "
                         "filled to their page's end")
    ap.add_argument("--max-k", type=int, default=2,
                    help="persist every subset of up to K in-flight stores (default 2)")
    ap.add_argument("--seed", type=int, default=0, help="seed of samples and random workloads")
    ap.add_argument("--jobs", "-j", type=int, default=1, help="worker processes")
    ap.add_argument("--replay", metavar="ID", help="rebuild one crash state and check it")
    ap.add_argument("--keep", metavar="IMAGE", help="with --replay: write the crash image here")
    a = ap.parse_args(argv)
    if a.model == "pages" or (a.replay or "").startswith("pages:"):
        return _main_pages(a)
    if a.replay:
        try:
            wl, seed, case, point, state = parse_id(a.replay)
            ncases = len(cases_for(wl, seed))
            if not 0 <= case < ncases:
                raise ValueError(f"{wl} has cases 0..{ncases - 1}")
        except ValueError as e:
            print(f"pnova-crashtest: {e}", file=sys.stderr)
            return 2
        res = run_case(wl, seed, case, a.max_k, only=(point, state), keep=a.keep)
        if res.checked == 0:
            print(f"pnova-crashtest: no crash state {a.replay} (with --max-k {a.max_k})",
                  file=sys.stderr)
            return 2
        return _report_replay(case, cases_for(wl, seed)[case][1], res, a.keep)
    tty = sys.stderr.isatty()
    progress = _progress_bar(tty)
    try:
        results = run(a.workload, a.max_k, a.seed, a.jobs, progress)
    except KeyboardInterrupt:
        print("\npnova-crashtest: interrupted", file=sys.stderr)
        return 130
    return _report(results, tty)


def _report_replay(case: int, ops: list[Step], res: CaseResult, keep: str | None) -> int:
    print(f"case {case}: {' ; '.join(map(repr, ops))}")
    for f in res.failures:
        print(f"FAILED {f.id}: {f.reason}")
    if keep:
        print(f"crash image written to {keep}")
    print(f"crash states: {res.checked} checked, {len(res.failures)} failed")
    return 1 if res.failures else 0


def _progress_bar(tty: bool) -> Callable[[int, int, int, int], None]:
    t0 = time.monotonic()

    def progress(done: int, n: int, states: int, failed: int) -> None:
        width = 30
        bar = "#" * (width * done // n) + "-" * (width - width * done // n)
        line = f"[{bar}] {done}/{n} cases, {states} states, {failed} failed, " \
               f"{time.monotonic() - t0:.0f}s"
        print(("\r" + line) if tty else line, end="" if tty else "\n", file=sys.stderr,
              flush=True)

    return progress


def _report(results: list[CaseResult], tty: bool) -> int:
    if tty:
        print(file=sys.stderr)
    checked = sum(r.checked for r in results)
    failures = [f for r in results for f in r.failures]
    for f in failures:
        print(f"FAILED {f.id}: {f.reason}")
    if failures:
        print(f"reproduce one with: pnova-crashtest --replay {failures[0].id} --keep crash.img")
    print(f"crash states: {checked} checked, {len(failures)} failed")
    return 1 if failures else 0


def _main_pages(a: argparse.Namespace) -> int:
    """``--model pages``: pages written back in any order (:mod:`pnova.crashpages`)."""
    from . import crashpages as P
    if a.replay:
        try:
            wl, case, point, state = P.parse_id(a.replay)
            ncases = len(P.cases_for(wl))
            if not 0 <= case < ncases:
                raise ValueError(f"pages:{wl} has cases 0..{ncases - 1}")
        except ValueError as e:
            print(f"pnova-crashtest: {e}", file=sys.stderr)
            return 2
        res = P.run_case(wl, case, only=(point, state), keep=a.keep)
        if res.checked == 0:
            print(f"pnova-crashtest: no crash state {a.replay}", file=sys.stderr)
            return 2
        return _report_replay(case, P.cases_for(wl)[case][1], res, a.keep)
    if a.workload not in ("seq1", "seq2", "edge"):
        print(f"pnova-crashtest: the page model has workloads seq1, seq2 and edge, not "
              f"{a.workload}",
              file=sys.stderr)
        return 2
    tty = sys.stderr.isatty()
    progress = _progress_bar(tty)
    try:
        results = P.run(a.workload, a.jobs, progress)
    except KeyboardInterrupt:
        print("\npnova-crashtest: interrupted", file=sys.stderr)
        return 130
    return _report(results, tty)


if __name__ == "__main__":
    sys.exit(main())
