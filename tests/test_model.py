"""Random operation sequences on the engine and on a plain in-memory model.

After every step the whole tree (names, types, modes, sizes, contents, link
counts, symlink targets, xattrs, hard-link identity) must match.  Clean and
dirty remounts are steps too, and fsck must find nothing after each remount.
"""
from __future__ import annotations

import errno
import io
import stat

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pnova import layout as L
from pnova.engine import FileSystem
from pnova.errors import FsError
from pnova.mkfs import format_device

from pnova.fsck import Checker

NAMES = st.sampled_from([b"a", b"b", b"c", b"dd", b"e" * 40])
MAXSIZE = 40_000


class MNode:
    """A model inode: shared by every name that links to it."""

    def __init__(self, kind: str, mode: int) -> None:
        self.kind = kind            # 'f', 'd' or 'l'
        self.mode = mode
        self.data = bytearray()
        self.target = b""
        self.xattrs: dict[bytes, bytes] = {}
        self.children: dict[bytes, "MNode"] = {}


class EngineVsModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        import tempfile
        self.tmp = tempfile.TemporaryDirectory()
        self.path = self.tmp.name + "/m.img"
        format_device(self.path, 16 << 20, numa_nodes=1, cpus_per_node=2)
        self.fs = FileSystem.mount(self.path)
        self.root = MNode("d", 0o755)

    def teardown(self) -> None:
        if self.fs.pm is not None:
            self.fs.unmount()
        self.tmp.cleanup()

    # -- helpers -----------------------------------------------------------
    def walk(self) -> list[tuple[tuple[bytes, ...], MNode]]:
        out = [((), self.root)]
        i = 0
        while i < len(out):
            path, node = out[i]
            for name, child in sorted(node.children.items()):
                out.append((path + (name,), child))
                if child.kind != "d":
                    continue
            i += 1
        return out

    def dirs(self):
        return [(p, n) for p, n in self.walk() if n.kind == "d"]

    def files(self):
        return [(p, n) for p, n in self.walk() if n.kind == "f"]

    def ino(self, path: tuple[bytes, ...]) -> int:
        ino = L.ROOT_INO
        for name in path:
            ino = self.fs.lookup(ino, name).ino
        return ino

    def expect_err(self, code: int, fn, *a) -> None:
        try:
            fn(*a)
        except FsError as e:
            assert e.errno == code, (e.errno, code)
        else:
            raise AssertionError(f"expected errno {code}")

    @staticmethod
    def is_ancestor(a: MNode, b: MNode) -> bool:
        stack = [a]
        while stack:
            n = stack.pop()
            if n is b:
                return True
            stack.extend(c for c in n.children.values() if c.kind == "d")
        return False

    # -- rules ---------------------------------------------------------------
    @rule(data=st.data(), name=NAMES, kind=st.sampled_from(["f", "d", "l"]),
          mode=st.sampled_from([0o644, 0o600, 0o755]))
    def create(self, data, name, kind, mode):
        path, d = data.draw(st.sampled_from(self.dirs()))
        parent = self.ino(path)
        if name in d.children:
            self.expect_err(errno.EEXIST, self.fs.create, parent, name, mode)
            return
        if kind == "f":
            self.fs.create(parent, name, mode)
            d.children[name] = MNode("f", mode)
        elif kind == "d":
            self.fs.mkdir(parent, name, mode)
            d.children[name] = MNode("d", mode)
        else:
            target = data.draw(st.binary(min_size=1, max_size=300).filter(lambda t: b"\0" not in t))
            self.fs.symlink(parent, name, target)
            n = MNode("l", 0o777)
            n.target = target
            d.children[name] = n

    @precondition(lambda self: self.files())
    @rule(data=st.data(), off=st.integers(0, MAXSIZE), n=st.integers(1, 9000),
          byte=st.integers(0, 255))
    def write(self, data, off, n, byte):
        path, f = data.draw(st.sampled_from(self.files()))
        payload = bytes([byte]) * n
        self.fs.write(self.ino(path), off, payload)
        if off > len(f.data):
            f.data.extend(bytes(off - len(f.data)))
        f.data[off:off + n] = payload

    @precondition(lambda self: self.files())
    @rule(data=st.data(), size=st.integers(0, MAXSIZE))
    def truncate(self, data, size):
        path, f = data.draw(st.sampled_from(self.files()))
        self.fs.setattr(self.ino(path), size=size)
        if size < len(f.data):
            del f.data[size:]
        else:
            f.data.extend(bytes(size - len(f.data)))

    @precondition(lambda self: len(self.walk()) > 1)
    @rule(data=st.data())
    def remove(self, data):
        path, node = data.draw(st.sampled_from(self.walk()[1:]))
        parent_path, name = path[:-1], path[-1]
        parent = self.ino(parent_path)
        pnode = dict(self.walk())[parent_path]
        if node.kind == "d":
            if node.children:
                self.expect_err(errno.ENOTEMPTY, self.fs.rmdir, parent, name)
                return
            self.fs.rmdir(parent, name)
        else:
            self.fs.unlink(parent, name)
        del pnode.children[name]

    @precondition(lambda self: len(self.walk()) > 1)
    @rule(data=st.data(), name=NAMES, flags=st.sampled_from([0, 0, 1, 2]))
    def rename(self, data, name, flags):
        spath, snode = data.draw(st.sampled_from(self.walk()[1:]))
        dpath, dnode = data.draw(st.sampled_from(self.dirs()))
        nodes = dict(self.walk())
        sparent = nodes[spath[:-1]]
        sname = spath[-1]
        a, b = self.ino(spath[:-1]), self.ino(dpath)
        target = dnode.children.get(name)
        call = lambda: self.fs.rename(a, sname, b, name, flags)  # noqa: E731
        if flags == 2:
            if target is None:
                return self.expect_err(errno.ENOENT, call)
            if (snode.kind == "d" and self.is_ancestor(snode, dnode)) or \
                    (target.kind == "d" and self.is_ancestor(target, sparent)):
                return self.expect_err(errno.EINVAL, call)
            call()
            sparent.children[sname], dnode.children[name] = target, snode
            return
        if flags == 1 and target is not None:
            return self.expect_err(errno.EEXIST, call)
        if target is snode:
            call()
            return
        if snode.kind == "d" and self.is_ancestor(snode, dnode):
            return self.expect_err(errno.EINVAL, call)
        if target is not None:
            if snode.kind == "d" and target.kind != "d":
                return self.expect_err(errno.ENOTDIR, call)
            if snode.kind != "d" and target.kind == "d":
                return self.expect_err(errno.EISDIR, call)
            if target.kind == "d" and target.children:
                return self.expect_err(errno.ENOTEMPTY, call)
        call()
        del sparent.children[sname]
        dnode.children[name] = snode

    @precondition(lambda self: self.files())
    @rule(data=st.data(), name=NAMES)
    def link(self, data, name):
        path, f = data.draw(st.sampled_from(self.files()))
        dpath, d = data.draw(st.sampled_from(self.dirs()))
        if name in d.children:
            return self.expect_err(errno.EEXIST, self.fs.link, self.ino(path), self.ino(dpath), name)
        self.fs.link(self.ino(path), self.ino(dpath), name)
        d.children[name] = f

    @rule(data=st.data(), key=st.sampled_from([b"user.x", b"user.y"]),
          value=st.binary(max_size=200), remove=st.booleans())
    def xattr(self, data, key, value, remove):
        path, n = data.draw(st.sampled_from([(p, n) for p, n in self.walk() if n.kind != "l"]))
        ino = self.ino(path)
        if remove:
            if key in n.xattrs:
                self.fs.removexattr(ino, key)
                del n.xattrs[key]
            else:
                self.expect_err(errno.ENODATA, self.fs.removexattr, ino, key)
        else:
            self.fs.setxattr(ino, key, value)
            n.xattrs[key] = value

    @rule(data=st.data(), mode=st.sampled_from([0o700, 0o644, 0o1777, 0o4755]))
    def chmod(self, data, mode):
        path, n = data.draw(st.sampled_from([(p, n) for p, n in self.walk() if n.kind != "l"]))
        self.fs.setattr(self.ino(path), mode=mode)
        n.mode = mode

    @rule(clean=st.booleans())
    def remount(self, clean):
        path = self.fs.pm.path
        if clean:
            self.fs.unmount()
        else:
            self.fs.pm.close()
            self.fs.pm = None
        out = io.StringIO()
        assert Checker(path, force=True, out=out).run() == 0, out.getvalue()
        self.fs = FileSystem.mount(path)
        assert self.fs.mount_path == ("clean" if clean else "recovery")

    # -- the comparison -------------------------------------------------------
    @invariant()
    def trees_match(self):
        fs = self.fs
        seen: dict[int, int] = {}
        stack = [(L.ROOT_INO, self.root)]
        while stack:
            ino, node = stack.pop()
            a = fs.getattr(ino)
            if id(node) in seen:
                assert seen[id(node)] == ino, "hard links diverged"
            seen[id(node)] = ino
            if node.kind == "d":
                assert stat.S_ISDIR(a.mode)
                names = [n for n, _, _ in fs.readdir(ino)]
                assert names[:2] == [b".", b".."]
                assert sorted(names[2:]) == sorted(node.children)
                subdirs = sum(1 for c in node.children.values() if c.kind == "d")
                assert a.nlink == 2 + subdirs
                for name, child in node.children.items():
                    cino = fs.lookup(ino, name).ino
                    if child.kind == "d":
                        assert fs.lookup(cino, b"..").ino == ino
                    stack.append((cino, child))
            elif node.kind == "f":
                assert stat.S_ISREG(a.mode)
                assert a.size == len(node.data)
                assert fs.read(ino, 0, MAXSIZE * 2) == bytes(node.data)
            else:
                assert stat.S_ISLNK(a.mode) and fs.readlink(ino) == node.target
            if node.kind != "l":
                assert stat.S_IMODE(a.mode) == node.mode
            assert dict((k, fs.getxattr(ino, k)) for k in fs.listxattr(ino)) == node.xattrs
        counts: dict[int, int] = {}
        for _, n in self.walk()[1:]:
            if n.kind != "d":
                counts[id(n)] = counts.get(id(n), 0) + 1
        for nid, c in counts.items():
            assert fs.getattr(seen[nid]).nlink == c


EngineVsModel.TestCase.settings = settings(max_examples=150, stateful_step_count=60,
                                           deadline=None)
TestEngineVsModel = EngineVsModel.TestCase
