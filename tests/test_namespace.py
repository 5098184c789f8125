"""Namespace operations from several processes at once.

Worker processes (one per CPU) run hypothesis-generated creates, unlinks,
renames, links, mkdirs and rmdirs: in a directory of their own and in one
directory all of them share, with names moving from the private directories
into the shared one.  What a worker does in its own directory is predictable
whatever the others do, so it checks every result (errno included) against a
sequential model and the parent checks the directory's final listing.  The
shared directory has no single right answer; there the checks are that the
live view, a recovery from the logs and a clean remount show the same tree, and
that fsck (link counts, one name per directory, no leaks, no orphans) is clean.
"""
from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import pickle
import socket
import stat
import threading
import time

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings

import pnova.namei
from pnova.engine import FileSystem
from pnova.errors import FsError
from pnova.fsck import Checker
from pnova.mkfs import format_device
from pnova.shared import ISLOT

from helpers import fork_workers

NAMES = [b"a", b"b", b"c", b"d", b"e"]
name = st.sampled_from(NAMES)
# (kind, where, name, other name): where "p" = the worker's own directory,
# "s" = the shared one, "ps" = from its own directory into the shared one
op = st.one_of(
    st.tuples(st.sampled_from(["create", "unlink", "mkdir", "rmdir"]),
              st.sampled_from(["p", "s"]), name, st.just(b"")),
    st.tuples(st.sampled_from(["rename", "link"]), st.sampled_from(["p", "s", "ps"]),
              name, name),
)


class Private:
    """A sequential model of one worker's own directory: name -> ('f' or 'd',
    identity of the inode)."""

    def __init__(self) -> None:
        self.names: dict[bytes, tuple[str, int]] = {}
        self.made = 0

    def predict(self, kind: str, n1: bytes, n2: bytes) -> int:
        """The errno the operation must fail with (0: it succeeds); applies it."""
        names = self.names
        if kind in ("create", "mkdir"):
            if n1 in names:
                return errno.EEXIST
            self.made += 1
            names[n1] = ("f" if kind == "create" else "d", self.made)
        elif kind == "unlink":
            if n1 not in names:
                return errno.ENOENT
            if names[n1][0] == "d":
                return errno.EISDIR
            del names[n1]
        elif kind == "rmdir":
            if n1 not in names:
                return errno.ENOENT
            if names[n1][0] != "d":
                return errno.ENOTDIR
            del names[n1]                         # its subdirectories stay empty
        elif kind == "link":
            if n1 not in names:
                return errno.ENOENT
            if names[n1][0] == "d":
                return errno.EPERM
            if n2 in names:
                return errno.EEXIST
            names[n2] = names[n1]
        elif kind == "rename":
            if n1 not in names:
                return errno.ENOENT
            src, dst = names[n1], names.get(n2)
            if dst == src:                        # one name, or two links of one file
                return 0
            if dst and dst[0] == "d" and src[0] != "d":
                return errno.EISDIR
            if dst and dst[0] == "f" and src[0] == "d":
                return errno.ENOTDIR
            del names[n1]
            names[n2] = src
        return 0


def worker(fs: FileSystem, cpu: int, mine: int, shared: int, ops: list[tuple],
           out: str) -> None:
    fs.become_worker(cpu)
    model = Private()
    for i, (kind, where, n1, n2) in enumerate(ops):
        d1 = mine if where[0] == "p" else shared
        d2 = shared if where in ("s", "ps") else mine
        got = 0
        try:
            if kind == "create":
                fs.create(d1, n1, 0o644)
            elif kind == "mkdir":
                fs.mkdir(d1, n1, 0o755)
            elif kind == "unlink":
                fs.unlink(d1, n1)
            elif kind == "rmdir":
                fs.rmdir(d1, n1)
            elif kind == "link":
                fs.link(fs.lookup(d1, n1).ino, d2, n2)
            else:
                fs.rename(d1, n1, d2, n2)
        except FsError as e:
            got = e.errno
        if where == "p":
            want = model.predict(kind, n1, n2)
            assert got == want, f"cpu {cpu} op {i} {kind} {n1!r} {n2!r}: errno {got}, " \
                f"expected {want}"
        elif where == "ps" and got == 0 and kind == "rename":
            # It left for the shared directory, unless the name there was
            # already a link of the same file (then rename does nothing).
            try:
                fs.lookup(mine, n1)
            except FsError:
                model.names.pop(n1, None)
    listing = {n.decode(): k for n, (k, _) in model.names.items()}
    with open(out, "w") as f:
        json.dump(listing, f)


def tree(fs: FileSystem, ino: int = 1) -> dict:
    """Every name under ``ino``: (type, link count, children) of each."""
    out = {}
    for n, child, _ in fs.readdir(ino):
        if n in (b".", b".."):
            continue
        a = fs.getattr(child)
        kids = tree(fs, child) if stat.S_ISDIR(a.mode) else None
        out[n.decode()] = (stat.S_IFMT(a.mode), a.nlink, kids)
    return out


def run(path: str, per_cpu: list[list[tuple]], tmp) -> None:
    fs = FileSystem.mount(path)
    own = [fs.mkdir(1, b"p%d" % c, 0o755).ino for c in range(len(per_cpu))]
    shared = fs.mkdir(1, b"s", 0o755).ino
    # told the number: one worker alone takes no namespace locks
    fs.prepare_workers(workers=len(per_cpu))
    fork_workers(fs, len(per_cpu), lambda cpu: worker(fs, cpu, own[cpu], shared, per_cpu[cpu],
                                                      str(tmp / f"expect{cpu}")))
    live = tree(fs)
    for cpu in range(len(per_cpu)):
        with open(tmp / f"expect{cpu}") as f:
            expect = json.load(f)
        got = {n: "d" if stat.S_ISDIR(t) else "f" for n, (t, _, _) in live[f"p{cpu}"][2].items()}
        assert got == expect, f"the directory of CPU {cpu}"
    fs.pm.close()                                # a crash now
    fs.pm = None
    rec = FileSystem.mount(path)
    assert rec.mount_path == "recovery"
    assert tree(rec) == live, "recovery disagrees with what the workers left"
    rec.unmount()
    out = io.StringIO()
    assert Checker(path, force=True, out=out).run() == 0, out.getvalue()
    clean = FileSystem.mount(path)
    assert tree(clean) == live
    clean.unmount()


@pytest.fixture(params=["disk", "memory"])
def where(request, tmp_path, shm_dir):
    """Where the image lies: on a disk (tmp_path) directories keep one log; in
    memory the dentries of a CPU other than a shared directory's home go to its
    local log of the directory (DESIGN 19.3)."""
    return tmp_path if request.param == "disk" else shm_dir


@pytest.mark.parametrize("ncpus", [1, 2, 3])
@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_cpus_change_private_and_shared_directories(tmp_path, where, ncpus, data):
    per_cpu = data.draw(st.lists(st.lists(op, min_size=20, max_size=80), min_size=ncpus,
                                 max_size=ncpus))
    path = str(where / f"ns{ncpus}.img")
    if os.path.exists(path):
        os.unlink(path)
    format_device(path, 16 << 20, numa_nodes=1, cpus_per_node=ncpus)
    run(path, per_cpu, tmp_path)


def test_busy_shared_directory(tmp_path, where):
    """Two processes create, rename and unlink hundreds of names in one
    directory at once (long enough to overlap on any machine)."""
    path = str(where / "busy.img")
    format_device(path, 32 << 20, numa_nodes=1, cpus_per_node=2)
    per_cpu = [[(k, w, NAMES[(i * 7 + c) % 5], NAMES[(i * 3 + c) % 5])
                for i in range(300)
                for k, w in [("create", "s"), ("rename", "s"), ("link", "ps"), ("create", "p"),
                             ("rename", "ps"), ("unlink", "s"), ("mkdir", "s"), ("rmdir", "s")]]
               for c in range(2)]
    run(path, per_cpu, tmp_path)


def test_a_directory_changed_by_another_cpu_before_its_rmdir_commits_leaks_nothing(tmp_path):
    """CPU 1 changes a directory's attributes (no namespace lock: only its log
    lock) until its log gains a page, between CPU 0's validation and its rmdir's
    commit: the eviction must free that page too."""
    path = str(tmp_path / "rmdir.img")
    format_device(path, 16 << 20, numa_nodes=1, cpus_per_node=2)
    fs0 = FileSystem.mount(path)
    fs1 = FileSystem.attach(fs0, 1)
    v = fs0.mkdir(1, b"v", 0o755).ino
    fs1.getattr(v)
    commit = fs0._commit
    armed = [True]

    def racing_commit(changes, *args, **kwargs):
        if armed[0] and any(i.ino == v for i, _ in changes):
            armed[0] = False
            pages = len(fs1.get(v).log_pages)
            while len(fs1.get(v).log_pages) == pages:
                fs1.setattr(v, atime_ns=1, mtime_ns=2)
        return commit(changes, *args, **kwargs)

    fs0._commit = racing_commit
    fs0.rmdir(1, b"v")
    assert not armed[0], "the race was not set up"
    fs0.unmount()
    out = io.StringIO()
    assert Checker(path, force=True, out=out).run() == 0, out.getvalue()


@pytest.mark.parametrize("reused", [False, True])
def test_a_reference_to_an_inode_freed_since_its_lookup_is_refused(tmp_path, reused):
    """CPU 0 looks a file up (lookups take no lock); CPU 1 unlinks it, and with no
    reference anywhere frees it, and may reuse the slot for a new file.  CPU 0's
    reference for the kernel must then fail with ENOENT (as if the lookup came
    after the unlink) and must not count on the slot's new inode: that one is
    freed when its own last reference goes."""
    path = str(tmp_path / "ref.img")
    format_device(path, 16 << 20, numa_nodes=1, cpus_per_node=2)
    fs0 = FileSystem.mount(path)
    fs1 = FileSystem.attach(fs0, 1)
    fs0.create(1, b"f", 0o644)
    a = fs0.lookup(1, b"f")
    fs1.unlink(1, b"f")                          # no reference: freed at once
    if reused:
        # the freed slot goes to the next inode of the CPU whose table holds it
        owner = fs1 if (a.ino - 1) % 2 == 1 else fs0
        b = owner.create(1, b"g", 0o644)
        assert b.ino == a.ino and b.generation != a.generation
        owner.ref(b.ino, generation=b.generation)          # the kernel's reference
    with pytest.raises(FsError) as e:
        fs0.ref(a.ino, generation=a.generation)
    assert e.value.errno == errno.ENOENT
    if reused:
        owner.unlink(1, b"g")
        owner.forget(b.ino)                      # its only reference: freed now
        with pytest.raises(FsError):
            fs0.getattr(b.ino)
    fs0.unmount()
    out = io.StringIO()
    assert Checker(path, force=True, out=out).run() == 0, out.getvalue()


@pytest.mark.parametrize("op", ["link", "unlink", "rename"])
def test_a_link_count_change_holds_the_inode_lock_until_it_commits(tmp_path, op):
    """Two CPUs changing one file's link count each write count + 1 or - 1 from
    what they read: without the inode's lock held across the read and the
    commit, one change is lost (fsck then finds a wrong link count).  When
    CPU 0 commits a change of the file's link count, CPU 1 must not be able
    to take that file's lock."""
    path = str(tmp_path / "nlink.img")
    format_device(path, 16 << 20, numa_nodes=1, cpus_per_node=2)
    fs0 = FileSystem.mount(path)
    fs1 = FileSystem.attach(fs0, 1)
    a, b = fs0.mkdir(1, b"a", 0o755).ino, fs0.mkdir(1, b"b", 0o755).ino
    f = fs0.create(a, b"f", 0o644).ino
    fs0.link(f, a, b"g")
    commit = fs0._commit
    seen: list[bool] = []

    def racing_commit(changes, *args, **kwargs):
        if any(i.ino == f for i, _ in changes):
            word = fs1._ns_word(f)
            free = fs1.scheme.sem.try_wlock(word)
            if free:
                fs1.scheme.sem.wunlock(word)
            seen.append(free)
        return commit(changes, *args, **kwargs)

    fs0._commit = racing_commit
    if op == "link":
        fs0.link(f, b, b"h")
    elif op == "unlink":
        fs0.unlink(a, b"g")
    else:
        # A rename that keeps the file's link count does not hold its lock (a
        # writer of the file, holding it as its size lock, does not hold the
        # rename up); one that replaces a name of the file does.
        fs0.rename(a, b"g", b, b"g")
        fs0.rename(b, b"g", b, b"h")
        assert seen == [True, True], "a rename of a file waited for the file's lock"
        seen.clear()
        y = fs0.create(b, b"y", 0o644).ino
        fs0.rename(b, b"y", a, b"f")             # f loses a name
        assert fs0.lookup(a, b"f").ino == y and fs0.getattr(f).nlink == 1
    assert seen and not any(seen), "another CPU could change the link count meanwhile"
    fs0._commit = commit
    fs0.unmount()
    out = io.StringIO()
    assert Checker(path, force=True, out=out).run() == 0, out.getvalue()


def _lookup_while_another_cpu_frees(fs: FileSystem, d: int, name: bytes) -> int:
    """Look ``name`` up in ``d`` while its inode is freed in the middle of being
    read from the device, and the pages read then turn out to hold other data
    (another process unlinked it and reused its log pages)."""
    read_once = fs._read_inode_once

    def racing(ino: int, *args):
        fs._read_inode_once = read_once
        fs.unlink(d, name)                       # the last name: the inode is freed
        raise ValueError("dentry in a file log")  # what reused pages look like
    fs._read_inode_once = racing
    return fs.lookup(d, name).ino


def _dir_users(fs: FileSystem, d: int) -> int:
    """The directory users word of ``d`` (pnova.namei.Namei._private_dir)."""
    return fs.area.w.load64(fs._dir_users + ISLOT * (d - 1))


def _names_and_reads(fs: FileSystem, d: int) -> tuple[list[bytes], int]:
    """The names in ``d`` as this CPU sees them, and how many inodes it read
    whole from their logs to answer (a cache it could not bring up to date)."""
    reads = [0]
    read_inode = fs._read_inode

    def counted(ino, *args, **kw):
        reads[0] += 1
        return read_inode(ino, *args, **kw)
    fs._read_inode = counted
    try:
        names = sorted(n for n, *_ in fs.readdir(d, 0) if n not in (b".", b".."))
    finally:
        del fs._read_inode
    return names, reads[0]


def _read_locked_has(fs: FileSystem, d: int, name: bytes) -> bool:
    """Whether ``name`` is in ``d`` as an operation holding ``d``'s read lock and
    the name's lock sees it, the locks taken directly: as an operation takes
    them after it asked whether the directory is another CPU's alone and found
    it shared (or lost the race to claim it), and as one started again after
    a relock takes them (asking nothing)."""
    fs._ns, fs._ns_names, fs._ns_top = {}, [], -1
    try:
        slot = fs._name_slot(d, name)
        fs._ns_lock(d, False)
        fs._ns_lock(fs._name_base + slot)
        fs._ns_names.append((d, slot))
        return name in fs._dir_names(d).dents
    finally:
        fs._ns_release()
        fs._ns = None


_IN_CPU = {"lookup_while_another_cpu_frees": _lookup_while_another_cpu_frees,
           "dir_users": _dir_users, "names_and_reads": _names_and_reads,
           "read_locked_has": _read_locked_has, "sem_waits": lambda fs: fs.scheme.sem.waits,
           "private_dir": lambda fs, d: fs._private_dir(d)}


class _Cpu:
    """A worker process acting as one CPU, running the engine calls it is sent one
    at a time (so that its caches persist between the steps of a test)."""

    def __init__(self, fs: FileSystem, cpu: int, private_after: int | None = None) -> None:
        self.sock, theirs = socket.socketpair()
        self.pid = os.fork()
        if self.pid == 0:
            self.sock.close()
            code = 1
            try:
                fs.become_worker(cpu)
                if private_after is not None:
                    pnova.namei.PRIVATE_AFTER = private_after
                while msg := theirs.recv(1 << 16):
                    method, args = pickle.loads(msg)
                    try:
                        if method in _IN_CPU:
                            out = _IN_CPU[method](fs, *args)
                        else:
                            out = getattr(fs, method)(*args)
                            out = getattr(out, "ino", out)
                        reply = ("ok", out)
                    except FsError as e:
                        reply = ("err", e.errno)
                    theirs.sendall(pickle.dumps(reply))
                code = 0
            finally:
                os._exit(code)
        theirs.close()

    def __call__(self, method: str, *args):
        self.sock.sendall(pickle.dumps((method, args)))
        kind, out = pickle.loads(self.sock.recv(1 << 16))
        if kind == "err":
            raise FsError(out)
        return out

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)     # (a CPU forked later holds a copy)
        self.sock.close()
        assert os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1]) == 0


def test_a_second_directory_that_comes_first_in_the_order_is_only_tried(tmp_path):
    """A rename into the root from a directory with a higher inode number, as
    fxmark's MWRM makes: the root's share comes before the locks the rename
    holds already, so it is only tried.  Free, the rename goes through without
    waiting; while another process holds the root whole, the try fails and the
    rename starts again taking every lock in order, waits for the root, and
    goes through once it is let go."""
    from pnova.shared import DIR_SHARED
    path = str(tmp_path / "two.img")
    format_device(path, 16 << 20, numa_nodes=1, cpus_per_node=2)
    fs = FileSystem.mount(path)
    d = fs.mkdir(1, b"d", 0o755).ino
    for name in (b"x", b"z"):
        fs.create(d, name, 0o644)
    fs.prepare_workers(workers=2)
    b = _Cpu(fs, 1)
    try:
        def shared_lately(ino: int) -> None:             # not one CPU's: the shared path
            fs.area.w.store64(fs._dir_users + ISLOT * (ino - 1),
                              DIR_SHARED | (time.monotonic_ns() >> 20))
        shared_lately(1)
        shared_lately(d)
        b("rename", d, b"z", 1, b"z2", 0)
        assert b("sem_waits") == 0
        root_lock, sem = fs._inode_locks, fs.scheme.sem
        sem.wlock(root_lock)
        let_go = threading.Timer(0.3, sem.wunlock, (root_lock,))
        let_go.start()
        shared_lately(1)
        shared_lately(d)
        b("rename", d, b"x", 1, b"y", 0)
        let_go.join()
        assert b("sem_waits") >= 1
        assert b("lookup", 1, b"y") and b("lookup", 1, b"z2")
        with pytest.raises(FsError):
            b("lookup", d, b"x")
    finally:
        b.close()
    fs.unmount()
    out = io.StringIO()
    assert Checker(path, force=True, out=out).run() == 0, out.getvalue()


@contextlib.contextmanager
def _two_cpus(tmp_path, private_after_b: int | None = None):
    """Directory ``d`` on a fresh 2-CPU device (an image in ``tmp_path``), and CPU
    processes 0 and 1 (see :class:`_Cpu`); fsck must be clean once both have
    exited."""
    path = str(tmp_path / "two.img")
    format_device(path, 16 << 20, numa_nodes=1, cpus_per_node=2)
    fs = FileSystem.mount(path)
    d = fs.mkdir(1, b"d", 0o755).ino
    fs.prepare_workers(workers=2)
    a, b = _Cpu(fs, 0), _Cpu(fs, 1, private_after_b)
    try:
        yield d, a, b
    finally:
        a.close()
        b.close()
    fs.unmount()
    out = io.StringIO()
    assert Checker(path, force=True, out=out).run() == 0, out.getvalue()


def test_a_directory_one_cpu_uses_alone_is_held_whole_and_others_still_see_it(tmp_path):
    """Operations in a directory only their CPU uses lately hold it exclusively
    (no name locks or name versions, DESIGN 19.8); the directory turns shared when
    another CPU comes (a change or a lookup), and private again once the others
    stay away.  Either way every CPU sees every change: a cache holding the
    directory's names from before a private change catches up."""
    from pnova.shared import DIR_SHARED
    # CPU 1 takes a shared directory back at once
    with _two_cpus(tmp_path, private_after_b=0) as (d, a, b):
        b("create", d, b"b0", 0o644)
        assert b("dir_users", d) == 2                         # CPU 1's alone
        a("create", d, b"a0", 0o644)
        assert a("dir_users", d) & DIR_SHARED                 # CPU 0 came: shared
        assert a("lookup", d, b"b0")
        # "at once" is the next tick of the directory users word's clock (2^20 ns)
        time.sleep(0.003)
        b("rename", d, b"b0", d, b"b1")                       # (takes it back: private)
        assert b("dir_users", d) == 2
        b("create", d, b"b2", 0o644)
        b("unlink", d, b"a0")
        # CPU 0's cache has the names from before CPU 1's private changes
        with pytest.raises(FsError) as e:
            a("lookup", d, b"b0")
        assert e.value.errno == errno.ENOENT
        assert a("lookup", d, b"b1") and a("lookup", d, b"b2")
        with pytest.raises(FsError):
            a("lookup", d, b"a0")
        assert a("dir_users", d) & DIR_SHARED                 # the lookups made it shared
        a("create", d, b"a1", 0o644)
        assert sorted(n for n, *_ in b("readdir", d, 0) if n not in (b".", b"..")) == \
            [b"a1", b"b1", b"b2"]


def test_a_cpu_that_takes_a_directory_back_is_seen_by_caches_that_asked_before(tmp_path):
    """A CPU that holds a directory alone changes its names without name locks or
    name versions (DESIGN 19.8).  Another CPU's cache must still see every such
    change: one that copied the directory's state just before the claim (its
    process had asked whether the directory was another CPU's and found it
    shared), and one that read the directory again while the other CPU held it
    (as a process that lost the race to claim it, or an operation started again
    after a relock, reads it)."""
    with _two_cpus(tmp_path, private_after_b=0) as (d, a, b):
        b("create", d, b"b0", 0o644)
        a("create", d, b"a0", 0o644)                          # shared: CPU 0 caches it
        assert a("read_locked_has", d, b"b0")
        time.sleep(0.003)
        assert not a("private_dir", d)                        # asked: shared, not CPU 0's
        b("rename", d, b"b0", d, b"b1")                       # CPU 1 takes it back
        assert b("dir_users", d) == 2
        # CPU 0 copied the epoch before the claim
        assert not a("read_locked_has", d, b"b0")
        assert a("read_locked_has", d, b"b1")
        # ... and read the directory again after it (as a CPU that lost the
        # race to claim it would): CPU 1's next changes are seen too
        b("rename", d, b"b1", d, b"b2")
        b("create", d, b"b3", 0o644)
        assert b("dir_users", d) == 2
        assert not a("read_locked_has", d, b"b1")
        assert a("read_locked_has", d, b"b2")
        assert a("read_locked_has", d, b"b3")


def test_a_path_walked_through_a_directory_others_change_does_not_catch_it_up(tmp_path):
    """``lookup_ino`` answers the inode a name names, without the attributes of
    what it finds: a walk through a directory another CPU keeps changing leaves
    this CPU's cache of it as it was (``lookup``, which answers the directory's
    attributes, catches it up first), and still finds the names the other CPU
    made."""
    path = str(tmp_path / "walk.img")
    format_device(path, 16 << 20, numa_nodes=1, cpus_per_node=2)
    fs0 = FileSystem.mount(path)
    s = fs0.mkdir(1, b"s", 0o755).ino
    fs0.create(s, b"x", 0o644)
    fs1 = FileSystem.attach(fs0, 1)
    assert fs0.lookup_ino(1, b"s") == s and fs0.lookup(s, b"x")     # both cached here
    made = {fs1.create(s, b"n%d" % i, 0o644).ino: b"n%d" % i for i in range(20)}
    gathers = [0]
    gather = fs0._gather

    def counted(*args, **kw):
        gathers[0] += 1
        return gather(*args, **kw)
    fs0._gather = counted
    try:
        tail = fs0.cache[s].tail, dict(fs0.cache[s].local)
        assert fs0.lookup_ino(1, b"s") == s
        assert gathers[0] == 0 and (fs0.cache[s].tail, fs0.cache[s].local) == tail
        a = fs0.lookup(1, b"s")                  # the attributes: caught up first
        assert gathers[0] >= 1 and a.ino == s
        assert a.mtime_ns == fs1.getattr(s).mtime_ns
    finally:
        del fs0._gather
    for ino, name in made.items():
        assert fs0.lookup_ino(s, name) == ino
    assert fs0.lookup_ino(s, b".") == s and fs0.lookup_ino(s, b"..") == 1
    for name, err in ((b"none", errno.ENOENT), (b"n" * 256, errno.ENAMETOOLONG)):
        with pytest.raises(FsError) as e:
            fs0.lookup_ino(s, name)
        assert e.value.errno == err
    fs0.unmount()
    out = io.StringIO()
    assert Checker(path, force=True, out=out).run() == 0, out.getvalue()


def test_an_inode_freed_while_a_lookup_reads_it_is_gone_not_damaged(tmp_path):
    """A lock-free lookup finds a name, and the inode is freed by another process
    before its logs are read: the lookup answers ENOENT, as if it had come after
    the unlink, not EIO with a report of damage that fsck would not find."""
    with _two_cpus(tmp_path) as (d, a, b):
        b("create", d, b"f", 0o644)              # (so CPU 0 has never read it)
        with pytest.raises(FsError) as e:
            a("lookup_while_another_cpu_frees", d, b"f")
        assert e.value.errno == errno.ENOENT
        with pytest.raises(FsError) as e:
            b("lookup", d, b"f")
        assert e.value.errno == errno.ENOENT


def test_a_directory_compacted_by_another_cpu_is_not_read_again(tmp_path):
    """A compaction rewrites a directory's log as a new chain.  A process whose
    cache had reached the tail the compaction started from takes the new chain
    as it is (the compaction record in the shared area) and reads only what was
    appended after it; a cache that was behind reads the directory again.
    Either way every name is there."""
    with _two_cpus(tmp_path) as (d, a, b):
        for i in range(40):
            b("create", d, b"f%d" % i, 0o644)
        for i in range(0, 40, 2):
            b("unlink", d, b"f%d" % i)
        want = sorted(b"f%d" % i for i in range(1, 40, 2))
        assert a("names_and_reads", d) == (want, 0)          # caught up with CPU 1
        b("compact", d)
        b("create", d, b"after", 0o644)                      # appended to the new chain
        assert a("names_and_reads", d) == (sorted(want + [b"after"]), 0)
        # behind the tail the next compaction starts from: read again, all of it
        b("create", d, b"later", 0o644)
        b("compact", d)
        assert a("names_and_reads", d) == (sorted(want + [b"after", b"later"]), 1)
        a("create", d, b"from-a", 0o644)
        assert b("names_and_reads", d) == (sorted(want + [b"after", b"from-a", b"later"]), 0)


def _die_after_commit(fs: FileSystem, cpu: int, bump: str, change) -> None:
    """Fork a worker acting as ``cpu`` that makes ``change(fs)`` and is killed
    between its commit and the version bumps (``bump``: the method that makes
    them, each with the unlock of the lock it covers), holding the locks of
    the change."""
    pid = os.fork()
    if pid == 0:
        try:
            fs.become_worker(cpu)
            setattr(fs, bump, lambda *args: os._exit(0))
            change(fs)
        finally:
            os._exit(1)                                  # the change never got that far
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


def test_a_worker_killed_before_its_version_bumps_is_not_missed(tmp_path):
    """A worker killed after it committed a change but before it bumped the
    versions that tell other processes of it: the next process that takes a
    lock it held, or a lookup that finds the name's lock held by it, counts the
    death, and every process stops trusting its caches' versions.  The new name
    is found (a lookup takes no lock: it looks at the name's lock word and finds
    the dead writer there), a second create of it fails, and a partial write of
    a page the dead worker rewrote keeps the dead worker's bytes around it."""
    path = str(tmp_path / "two.img")
    format_device(path, 16 << 20, numa_nodes=1, cpus_per_node=2)
    fs = FileSystem.mount(path)
    d = fs.mkdir(1, b"d", 0o755).ino
    f = fs.create(d, b"f", 0o644).ino
    fs.write(f, 0, b"a" * 4096)
    fs.prepare_workers(workers=2)
    a = _Cpu(fs, 0)
    try:
        b = _Cpu(fs, 1)
        b("create", d, b"x", 0o644)
        b("write", f, 4096, b"x")                        # CPU 1's local log of f
        b.close()
        # CPU 0 catches up with CPU 1's changes and from then on trusts the
        # versions: it has seen every name of d and every page of f
        assert a("lookup", d, b"x") and a("lookup", d, b"f") == f
        assert a("read", f, 4096, 1) == b"x"
        assert a("write", f, 0, b"A" * 10) == 10
        _die_after_commit(fs, 1, "_ns_release", lambda w: w.create(d, b"new", 0o644))
        assert a("lookup", d, b"new")                    # not taken from the stale cache
        with pytest.raises(FsError) as e:
            a("create", d, b"new", 0o644)
        assert e.value.errno == errno.EEXIST
        _die_after_commit(fs, 1, "_bump_versions", lambda w: w.write(f, 0, b"b" * 4096))
        assert a("write", f, 0, b"c" * 100) == 100       # waits out the dead holder
        assert a("read", f, 0, 4096) == b"c" * 100 + b"b" * 3996
    finally:
        a.close()
    fs.unmount()
    fs = FileSystem.mount(path)
    assert fs.read(fs.lookup(d, b"f").ino, 0, 4096) == b"c" * 100 + b"b" * 3996
    assert fs.lookup(d, b"new")
    fs.unmount()


def _churn(fs: FileSystem, d: int, tag: bytes, n: int) -> int:
    """Create and unlink ``n`` names in ``d``; the log pages this CPU's cache of
    ``d`` counts at the end."""
    for i in range(n):
        name = b"%s-%d" % (tag, i)
        fs.create(d, name, 0o644)
        fs.unlink(d, name)
    return len(fs.get(d).log_pages)


_IN_CPU["churn"] = _churn


def test_a_directory_two_cpus_churn_is_still_compacted(shm_dir):
    """Two CPUs creating and unlinking names in one directory, taking turns: its
    log is compacted as it grows (the decision counts pages without catching up
    with the other CPU's entries, DESIGN 19.5), so it stays a few pages long.
    (An image in memory: on a disk no log shorter than 256 pages is compacted,
    DESIGN 12, and the same decision would take 200 times the churn.)"""
    with _two_cpus(shm_dir) as (d, a, b):
        for _ in range(6):
            a("churn", d, b"a", 100)
            b("churn", d, b"b", 100)
        pages = a("churn", d, b"a", 1)
        assert pages <= 12, pages                        # 1,200 pairs would fill ~30 pages
        assert b("names_and_reads", d)[0] == []


def test_a_worker_killed_inside_a_lock_free_change_or_a_whole_directory_is_not_missed(tmp_path):
    """Two more places a worker can die after its commit and before its version
    words move: a mkdir, which holds the new name's directory whole (a lookup
    looks at the directory's lock word too), and a chmod or a capability set,
    which no lock covers (their epoch is odd while they are in flight, and an
    odd epoch is never trusted): another worker sees the change at once, and
    its writes drop the set-user-ID bit and the capability as Linux does."""
    path = str(tmp_path / "two.img")
    format_device(path, 16 << 20, numa_nodes=1, cpus_per_node=2)
    fs = FileSystem.mount(path)
    d = fs.mkdir(1, b"d", 0o755).ino
    fs.prepare_workers(workers=2)
    b = _Cpu(fs, 1)
    f = b("create", 1, b"f", 0o755)                     # home CPU 1
    b("write", f, 0, b"a" * 4096)
    b("create", d, b"x", 0o644)
    b.close()
    a = _Cpu(fs, 0)
    try:
        assert a("lookup", d, b"x")                      # CPU 0 trusts d's versions
        assert a("write", f, 0, b"A" * 10) == 10         # and f's (its local log)
        _die_after_commit(fs, 1, "_ns_release", lambda w: w.mkdir(d, b"sub", 0o755))
        assert a("lookup", d, b"sub")

        def second_bump_dies(w, change):
            """Make ``change`` and die at the first epoch bump after its commit."""
            bump, commit, done = w._bump_epoch, w._commit, []

            def committing(*args, **kw):
                out = commit(*args, **kw)
                done.append(True)
                return out

            def dying(ino, by=2):
                if done:
                    os._exit(0)
                bump(ino, by)
            w._commit, w._bump_epoch = committing, dying
            change(w)
        for change in (lambda w: w.setattr(f, mode=0o4755),
                       lambda w: w.setxattr(f, b"security.capability", b"\x01" * 20)):
            pid = os.fork()
            if pid == 0:
                try:
                    fs.become_worker(1)
                    second_bump_dies(fs, change)
                finally:
                    os._exit(1)
            assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
            a("write", f, 10, b"B" * 10, True)             # a writer without CAP_FSETID
    finally:
        a.close()
    fs.unmount()
    fs = FileSystem.mount(path)
    assert fs.lookup(d, b"sub")
    assert fs.getattr(f).mode & 0o7777 == 0o755
    assert b"security.capability" not in fs.listxattr(f)
    fs.unmount()
