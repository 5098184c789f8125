"""The mounted filesystem as a user meets it: real FUSE mounts in a subprocess.

Every mount is torn down by the fixture whatever happens in the test
(fusermount3 -u, then a lazy unmount, then SIGKILL of what is left), and every
wait polls with a deadline.
"""
from __future__ import annotations

import ctypes
import errno
import filecmp
import importlib.util
import logging
import mmap
import os
import random
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from pnova import fuse_wire as W
from pnova.engine import FileSystem
from pnova.errors import CorruptImage, FsError
from pnova.fuse_ops import PnovaOperations
from pnova.fuse_session import Loop, uring_offered
from pnova.mkfs import format_device
from pnova.util import image_locked

from helpers import fsck

pytestmark = [pytest.mark.mount, pytest.mark.timeout(120)]

BIN = Path(sys.executable).parent
PNOVA = [str(BIN / "pnova")] if (BIN / "pnova").exists() else [sys.executable, "-m",
                                                                  "pnova.mount"]
FUSERMOUNT = shutil.which("fusermount3")
WAIT = 20.0                                      # seconds; nothing here should come close

needs_fuse = pytest.mark.skipif(
    not (os.path.exists("/dev/fuse") and FUSERMOUNT),
    reason="needs /dev/fuse and fusermount3")


# ---------------------------------------------------------------- helpers
def wait_for(pred: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    """Poll ``pred`` with a short back-off until it holds; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    delay = 0.002
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def is_mounted(path: Path) -> bool:
    """True while ``path`` is a mount point, even one whose daemon died
    (os.path.ismount says False then: stat fails with ENOTCONN)."""
    target = str(path).replace(" ", "\\040")
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == target for line in f)


def mount_entry(path: Path) -> list[str]:
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if fields[1] == str(path):
                return fields
    raise AssertionError(f"{path} is not mounted")


def daemon_pids(image: str) -> list[int]:
    """Processes serving ``image`` (found by their command line)."""
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if image.encode() in argv and any(b"pnova" in a for a in argv):
            pids.append(int(d))
    return pids


def wait_all_gone(image: str) -> None:
    """Wait until every process serving ``image`` has exited and released it.

    A process that is exiting has lost its command line (its memory is gone)
    but still holds its files, the image's lock among them, for a moment."""
    wait_for(lambda: not daemon_pids(image) and not image_locked(image),
             "every process of the mount to exit and release the image")


def one_line(text: str) -> bool:
    return text.strip() != "" and "\n" not in text.strip() and "Traceback" not in text


def need_uring() -> None:
    """Skip (saying why) where the kernel does not offer FUSE over io_uring."""
    if not uring_offered():
        pytest.skip("this kernel does not offer FUSE over io_uring (Linux 6.14 or later, "
                    "with /sys/module/fuse/parameters/enable_uring set by root)")


# How a mount takes its requests: the -o option the Mount fixture adds.
PATHS = {"io_uring": "io_uring=on", "devfuse": "io_uring=off"}


def unserved(mnt: "Mount") -> tuple[int, ...]:
    """The errors a caller may get for a request the mount never served because
    it ended: ENOTCONN or ECONNABORTED; through io_uring also ECANCELED, for a
    request the kernel had already handed to the entry of a process that then
    exited (DESIGN 22.8)."""
    out = (errno.ENOTCONN, errno.ECONNABORTED)
    return out + (errno.ECANCELED,) if mnt.path != "devfuse" else out


class Mount:
    """One image and one mount point; knows how to start and always stop a mount.
    ``path``: 'io_uring' or 'devfuse' adds the option that says how the mount
    takes its requests; None leaves the daemon's default."""

    def __init__(self, image: str, mnt: Path, path: str | None = None) -> None:
        self.image = image
        self.mnt = mnt
        self.log = image + ".log"
        self.fg: subprocess.Popen | None = None
        self.path = path
        self.path_opts = ["-o", PATHS[path]] if path else []
        mnt.mkdir(exist_ok=True)

    def run(self, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([*PNOVA, self.image, str(self.mnt), *args], capture_output=True,
                              text=True, timeout=WAIT, env=env)

    def start(self, *args: str) -> None:
        """Mount as a daemon; the command returns only once the mount answers."""
        r = self.run(*args, *self.path_opts)
        assert r.returncode == 0, r.stderr
        assert r.stderr == ""
        assert os.path.ismount(self.mnt)            # no waiting: it is there already

    def start_foreground(self, *args: str) -> subprocess.Popen:
        self.fg = subprocess.Popen([*PNOVA, self.image, str(self.mnt), "-f", *args,
                                    *self.path_opts],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wait_for(lambda: os.path.ismount(self.mnt) or self.fg.poll() is not None, "the mount")
        assert self.fg.poll() is None, self.fg.stderr.read()
        return self.fg

    def stop(self) -> None:
        """fusermount3 -u, then wait until the daemon has saved state and exited."""
        r = subprocess.run([FUSERMOUNT, "-u", str(self.mnt)], capture_output=True, text=True,
                           timeout=WAIT)
        assert r.returncode == 0, r.stderr
        self.wait_gone()

    def wait_gone(self) -> None:
        # The daemon holds the image lock until its last step (engine unmount).
        wait_for(lambda: not image_locked(self.image), "the daemon to exit")
        if self.fg is not None:
            self.fg.wait(timeout=WAIT)

    def cleanup(self) -> None:
        """Whatever state the test left: no mount, no daemon."""
        try:
            if is_mounted(self.mnt):
                subprocess.run([FUSERMOUNT, "-u", str(self.mnt)], capture_output=True,
                               timeout=WAIT)
            if is_mounted(self.mnt):
                subprocess.run([FUSERMOUNT, "-u", "-z", str(self.mnt)], capture_output=True,
                               timeout=WAIT)
            if is_mounted(self.mnt) and os.geteuid() == 0:
                subprocess.run(["umount", "-l", str(self.mnt)], capture_output=True,
                               timeout=WAIT)
            try:
                wait_for(lambda: not daemon_pids(self.image), "the daemon to exit", 5)
            except AssertionError:
                pass
        finally:
            for pid in daemon_pids(self.image):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if self.fg is not None and self.fg.poll() is None:
                self.fg.kill()
                self.fg.wait(timeout=WAIT)


@pytest.fixture(params=list(PATHS))
def mnt(tmp_path: Path, image: str, request: pytest.FixtureRequest) -> Iterator[Mount]:
    """A mount point for ``image``; every test that uses it runs twice, with the
    requests taken through io_uring and read from /dev/fuse."""
    if request.param == "io_uring":
        need_uring()
    m = Mount(image, tmp_path / "mnt", request.param)
    try:
        yield m
    finally:
        m.cleanup()


@pytest.fixture
def mounted(mnt: Mount) -> Mount:
    mnt.start()
    return mnt


def engine_state(image: str) -> str:
    """How the engine would mount the image now: 'clean', or 'recovery' when it
    was not cleanly unmounted (a read-only mount refuses that case)."""
    try:
        fs = FileSystem.mount(image, readonly=True)
    except CorruptImage:
        return "recovery"
    path = fs.mount_path
    fs.unmount()
    return path


def renameat2(old: Path, new: Path, flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd = -100
    if libc.renameat2(at_fdcwd, os.fsencode(old), at_fdcwd, os.fsencode(new), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def build_tree(root: Path) -> Path:
    """A few hundred files: the pnova sources plus generated binaries of awkward sizes,
    nested directories, symlinks and an empty directory."""
    src = root / "src"
    pkg = Path(__file__).resolve().parent.parent / "pnova"
    shutil.copytree(pkg, src / "pnova", ignore=shutil.ignore_patterns("__pycache__"))
    rng = random.Random(1234)
    sizes = [0, 1, 100, 4095, 4096, 4097, 8192, 12289, 65536, 100_003]
    for d in range(12):
        sub = src / f"dir{d:02d}" / ("deep" if d % 3 == 0 else "")
        sub.mkdir(parents=True, exist_ok=True)
        for i in range(22):
            size = sizes[(d + i) % len(sizes)] if i % 4 else rng.randrange(0, 30000)
            (sub / f"file{i:02d}.bin").write_bytes(rng.randbytes(size))
        (sub / "link").symlink_to(f"file{d:02d}.bin")
    (src / "empty").mkdir()
    (src / "dangling").symlink_to("does/not/exist")
    os.chmod(src / "dir01" / "file03.bin", 0o600)
    return src


def assert_same_tree(a: Path, b: Path) -> int:
    """Names, types, modes, sizes, mtimes, symlink targets and bytes agree; returns files."""
    n = 0
    for dirpath, dirnames, filenames in os.walk(a):
        rel = Path(dirpath).relative_to(a)
        other = b / rel
        assert sorted(os.listdir(other)) == sorted(dirnames + filenames), rel
        for name in dirnames + filenames:
            p, q = Path(dirpath) / name, other / name
            sp, sq = os.lstat(p), os.lstat(q)
            assert stat.S_IFMT(sp.st_mode) == stat.S_IFMT(sq.st_mode), p
            if stat.S_ISLNK(sp.st_mode):
                assert os.readlink(p) == os.readlink(q)
                continue
            assert stat.S_IMODE(sp.st_mode) == stat.S_IMODE(sq.st_mode), p
            if stat.S_ISREG(sp.st_mode):
                assert sp.st_size == sq.st_size, p
                assert sp.st_mtime_ns == sq.st_mtime_ns, p
                assert filecmp.cmp(p, q, shallow=False), p
                n += 1
    return n


# ---------------------------------------------------------------- file operations
@needs_fuse
def test_file_operations_and_kernel_cache(mounted: Mount) -> None:
    m = mounted.mnt
    root_links = os.stat(m).st_nlink
    (m / "d").mkdir()
    assert os.stat(m).st_nlink == root_links + 1
    f = m / "d" / "f"
    with pytest.raises(FileNotFoundError):
        os.stat(f)                                       # a negative entry, then create
    f.write_bytes(b"hello")
    assert f.read_bytes() == b"hello"
    os.utime(f, ns=(0, 0))
    with open(f, "ab") as fh:
        fh.write(b" world")
    st = os.stat(f)
    assert f.read_bytes() == b"hello world" and st.st_size == 11
    assert st.st_mtime_ns > 0                            # not the cached attributes
    os.truncate(f, 4)
    assert f.read_bytes() == b"hell"
    os.truncate(f, 6000)
    assert f.read_bytes() == b"hell" + bytes(5996)
    f.write_bytes(b"new")                                # open(O_TRUNC) on an existing file
    assert f.read_bytes() == b"new" and os.stat(f).st_size == 3
    os.utime(f, ns=(0, 0))
    os.close(os.open(f, os.O_WRONLY | os.O_TRUNC))       # truncation alone
    st = os.stat(f)
    assert st.st_size == 0 and f.read_bytes() == b"" and st.st_mtime_ns > 0
    fd = os.open(f, os.O_RDWR)
    os.pwrite(fd, b"XY", 8192)
    assert os.pread(fd, 10, 8190) == b"\0\0XY"
    os.ftruncate(fd, 1)
    assert os.fstat(fd).st_size == 1
    os.close(fd)

    # Hard links: the kernel's cached link count follows every change.
    a, b, c = m / "a", m / "b", m / "c"
    a.write_bytes(b"A")
    os.link(a, b)
    os.link(a, c)
    assert os.stat(a).st_nlink == 3
    os.unlink(b)
    assert os.stat(a).st_nlink == 2 and os.stat(c).st_nlink == 2
    assert not b.exists()

    # rename over a file that has another link: the replaced inode drops a link.
    x, y, y2 = m / "x", m / "y", m / "y2"
    x.write_bytes(b"X")
    y.write_bytes(b"Y")
    os.link(y, y2)
    ino_x = os.stat(x).st_ino
    os.rename(x, y)
    assert os.stat(y).st_ino == ino_x and y.read_bytes() == b"X"
    assert os.stat(y2).st_nlink == 1 and y2.read_bytes() == b"Y"
    assert not x.exists()

    # renameat2 flags pass through.
    with pytest.raises(FileExistsError):
        renameat2(y, y2, 1)                              # RENAME_NOREPLACE
    renameat2(y, y2, 2)                                  # RENAME_EXCHANGE
    assert y.read_bytes() == b"Y" and y2.read_bytes() == b"X"

    # chmod / utime: the cached attributes are the new ones.
    os.chmod(a, 0o640)
    assert stat.S_IMODE(os.stat(a).st_mode) == 0o640
    fd = os.open(a, os.O_RDONLY)
    os.fchmod(fd, 0o604)
    assert stat.S_IMODE(os.fstat(fd).st_mode) == 0o604
    os.close(fd)
    os.utime(a, ns=(1_000_000_123, 2_000_000_456))
    st = os.stat(a)
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_123, 2_000_000_456)
    ctime = st.st_ctime_ns
    os.chmod(a, 0o644)
    assert os.stat(a).st_ctime_ns >= ctime

    # Directories: moving one between parents moves a link between them.
    (m / "e").mkdir()
    (m / "d" / "sub").mkdir()
    d_links, e_links = os.stat(m / "d").st_nlink, os.stat(m / "e").st_nlink
    os.rename(m / "d" / "sub", m / "e" / "sub")
    assert os.stat(m / "d").st_nlink == d_links - 1
    assert os.stat(m / "e").st_nlink == e_links + 1
    with pytest.raises(OSError) as ei:
        os.rmdir(m / "e")
    assert ei.value.errno == errno.ENOTEMPTY
    os.rmdir(m / "e" / "sub")
    os.rmdir(m / "e")
    assert not (m / "e").exists()

    # Symlinks, FIFOs.
    os.symlink("d/f", m / "s")
    assert os.readlink(m / "s") == "d/f" and stat.S_ISLNK(os.lstat(m / "s").st_mode)
    assert (m / "s").read_bytes() == b"\0"
    os.mkfifo(m / "fifo")
    assert stat.S_ISFIFO(os.stat(m / "fifo").st_mode)
    if os.geteuid() == 0:
        os.mknod(m / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        assert os.stat(m / "null").st_rdev == os.makedev(1, 3)
        os.unlink(m / "null")

    assert sorted(os.listdir(m)) == ["a", "c", "d", "fifo", "s", "y", "y2"]
    st = os.stat(a)
    assert st.st_blksize == 4096 and st.st_uid == os.getuid()


@needs_fuse
def test_xattrs(mounted: Mount) -> None:
    p = mounted.mnt / "x"
    p.write_bytes(b"data")
    os.setxattr(p, "user.colour", b"blue")
    assert os.getxattr(p, "user.colour") == b"blue"
    assert os.listxattr(p) == ["user.colour"]
    with pytest.raises(FileExistsError):
        os.setxattr(p, "user.colour", b"red", os.XATTR_CREATE)
    with pytest.raises(OSError) as ei:
        os.setxattr(p, "user.size", b"1", os.XATTR_REPLACE)
    assert ei.value.errno == errno.ENODATA
    with pytest.raises(OSError) as ei:
        os.getxattr(p, "user.missing")
    assert ei.value.errno == errno.ENODATA
    with pytest.raises(OSError) as ei:
        os.getxattr(p, "security.capability")
    assert ei.value.errno == errno.ENODATA
    if os.geteuid() == 0:
        os.setxattr(p, "trusted.x", b"1")                # as on tmpfs: root may
        assert os.getxattr(p, "trusted.x") == b"1"
        os.removexattr(p, "trusted.x")
    with pytest.raises(OSError) as ei:
        os.setxattr(p, "system.other", b"1")             # no ACLs, nothing else there
    assert ei.value.errno == errno.EOPNOTSUPP
    os.removexattr(p, "user.colour")
    assert os.listxattr(p) == []
    p.write_bytes(b"still writable")                    # the write path asks for xattrs
    assert p.read_bytes() == b"still writable"


@needs_fuse
def test_copy_a_real_tree_and_compare(mounted: Mount, tmp_path: Path) -> None:
    src = build_tree(tmp_path)
    dst = mounted.mnt / "tree"
    shutil.copytree(src, dst, symlinks=True)
    n = assert_same_tree(src, dst)
    assert n > 250
    r = subprocess.run(["cp", "-a", str(src), str(mounted.mnt / "cpa")], capture_output=True,
                       text=True, timeout=WAIT)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(["diff", "-r", "--no-dereference", str(src), str(mounted.mnt / "cpa")],
                       capture_output=True, text=True, timeout=WAIT)
    assert r.returncode == 0, r.stdout + r.stderr
    # And it is all still there after a clean unmount and a fresh mount.
    mounted.stop()
    assert engine_state(mounted.image) == "clean"
    mounted.start()
    assert_same_tree(src, dst)
    assert_same_tree(src, mounted.mnt / "cpa")


@needs_fuse
def test_statvfs(mounted: Mount) -> None:
    m = mounted.mnt
    s0 = os.statvfs(m)
    assert s0.f_namemax == 255
    assert s0.f_bsize == 4096 and s0.f_frsize == 4096
    assert 0 < s0.f_bavail <= s0.f_bfree < s0.f_blocks
    assert s0.f_blocks * 4096 <= os.path.getsize(mounted.image)
    assert 0 < s0.f_ffree < s0.f_files
    (m / "big").write_bytes(os.urandom(1 << 20))
    s1 = os.statvfs(m)
    assert s0.f_bfree - s1.f_bfree >= 256
    assert s1.f_ffree == s0.f_ffree - 1
    os.unlink(m / "big")
    wait_for(lambda: os.statvfs(m).f_bfree >= s0.f_bfree - 2, "the space to come back")
    r = subprocess.run(["df", "-P", str(m)], capture_output=True, text=True, timeout=WAIT)
    assert r.returncode == 0 and mounted.image in r.stdout


# A client of the mount: creates, renames, links and unlinks its own names in
# one directory shared with the other client, and makes and removes
# directories in its own; prints the names it leaves.
_NAMESPACE_CLIENT = r"""
import os, sys
root, c = sys.argv[1], sys.argv[2]
shared, own = os.path.join(root, "shared"), os.path.join(root, "own" + c)
os.mkdir(own)
left = set()
for i in range(150):
    a = os.path.join(shared, f"{c}-a{i}")
    with open(a, "w") as f:
        f.write(f"{c}:{i}")
    if i % 3 == 0:
        os.rename(a, os.path.join(shared, f"{c}-r{i}"))
        left.add(f"{c}-r{i}")
    elif i % 3 == 1:
        os.link(a, os.path.join(own, f"l{i}"))
        os.unlink(a)
    else:
        left.add(f"{c}-a{i}")
    os.mkdir(os.path.join(own, f"d{i}"))
    if i % 2:
        os.rmdir(os.path.join(own, f"d{i}"))
print(" ".join(sorted(left)))
"""


@needs_fuse
def test_namespace_operations_of_two_clients_through_two_serving_processes(
        mnt: Mount) -> None:
    """Two clients change one shared directory and directories of their own at
    once through a mount with two serving processes: every name each leaves is
    there, with its contents, the same after a remount, and fsck is clean."""
    mnt.start("-o", "workers=2")
    (mnt.mnt / "shared").mkdir()
    clients = [subprocess.Popen([sys.executable, "-c", _NAMESPACE_CLIENT, str(mnt.mnt), c],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for c in "01"]
    left = set()
    for p in clients:
        out, err = p.communicate(timeout=WAIT)
        assert p.returncode == 0, err
        left |= set(out.split())

    def check() -> None:
        assert set(os.listdir(mnt.mnt / "shared")) == left
        for name in left:
            c, rest = name.split("-")
            assert (mnt.mnt / "shared" / name).read_text() == f"{c}:{rest[1:]}"
        for c in "01":
            own = mnt.mnt / f"own{c}"
            assert {n for n in os.listdir(own) if n.startswith("d")} == \
                {f"d{i}" for i in range(0, 150, 2)}
            assert {n for n in os.listdir(own) if n.startswith("l")} == \
                {f"l{i}" for i in range(1, 150, 3)}
            assert os.stat(own).st_nlink == 2 + 75

    check()
    mnt.stop()
    with open(mnt.log) as f:
        served = [int(n) for n in re.findall(r"cpu\d: \w+ after (\d+) requests", f.read())]
    assert len(served) == 2 and min(served) > 0, f"requests served by each process: {served}"
    if _fsck_available():
        r = subprocess.run([str(BIN / "fsck.pnova"), "-n", "-f", mnt.image],
                           capture_output=True, text=True, timeout=WAIT)
        assert r.returncode == 0, r.stdout + r.stderr
    mnt.start()
    check()


_LISTING_CLIENT = r"""
import os, sys
d, c = os.path.join(sys.argv[1], "shared"), sys.argv[2]
for i in range(150):
    open(os.path.join(d, f"{c}-{i}"), "w").close()
    if i % 3 == 2:
        os.unlink(os.path.join(d, f"{c}-{i - 1}"))
    if i % 25 == 0:
        os.listdir(d)                      # a listing in the middle of the changes
"""


@needs_fuse
def test_a_directory_listed_while_two_clients_change_it_keeps_its_order(mnt: Mount) -> None:
    """Two clients create and remove names in one directory through two serving
    processes, listing it as they go (a listed directory keeps its positions
    sorted from then on, in each process that listed it): at the end, and
    after a remount, each client's names are listed in the order it created
    them, and the two listings are the same."""
    mnt.start("-o", "workers=2")
    shared = mnt.mnt / "shared"
    shared.mkdir()
    clients = [subprocess.Popen([sys.executable, "-c", _LISTING_CLIENT, str(mnt.mnt), c],
                                stderr=subprocess.PIPE, text=True) for c in "ab"]
    for p in clients:
        _, err = p.communicate(timeout=WAIT)
        assert p.returncode == 0, err
    listed = os.listdir(shared)
    for c in "ab":
        want = [f"{c}-{i}" for i in range(150) if i % 3 != 1]
        assert [n for n in listed if n.startswith(c + "-")] == want
    mnt.stop()
    mnt.start()
    assert os.listdir(shared) == listed


_SHARED_DIR_CLIENT = r"""
import os, sys
d, c, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
for i in range(n):
    p = os.path.join(d, f"{c}-{i}")
    os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o644))
    if i % 3 == 0:
        os.unlink(p)
"""


@needs_fuse
def test_a_directory_two_serving_processes_change_gets_a_local_log(shm_dir: Path,
                                                                    tmp_path: Path) -> None:
    """Two clients creating and unlinking in one directory of an image in memory,
    through a mount with two serving processes: the process whose CPU is not
    the directory's home appends its dentries to its own local log of the
    directory (format 9, DESIGN 19.3), which the image shows after the
    unmount; every name is there, fsck is clean, and a remount lists the same."""
    from pnova import layout as L
    image = str(shm_dir / "p.img")
    format_device(image, 32 << 20, numa_nodes=1, cpus_per_node=2)
    m = Mount(image, tmp_path / "mnt")
    try:
        m.start("-o", "workers=2")
        (m.mnt / "shared").mkdir()
        left: set[str] = set()
        array = 0
        for rnd in range(10):                    # until both processes served it
            clients = [subprocess.Popen([sys.executable, "-c", _SHARED_DIR_CLIENT,
                                         str(m.mnt / "shared"), f"{c}{rnd}", "300"],
                                        stderr=subprocess.PIPE, text=True) for c in "ab"]
            for p in clients:
                assert p.wait(timeout=WAIT) == 0, p.stderr.read()
            left |= {f"{c}{rnd}-{i}" for c in "ab" for i in range(300) if i % 3}
            m.stop()
            fs = FileSystem.mount(image, readonly=True)
            d = fs.lookup(1, b"shared").ino
            array = fs.pm.read_u64(fs.inode_addr(d) + L.I_LOG_ARRAY)
            tails = [fs.pm.read_u64(array * L.BLOCK + c * L.LA_LINE + L.LA_TAIL)
                     for c in range(2)] if array else []
            fs.unmount()
            if array:
                break
            m.start("-o", "workers=2")
        assert array, "the non-home process never served a change of the directory"
        home = (d - 1) % 2
        assert tails[home] == 0 and tails[1 - home] != 0
        r = subprocess.run([str(BIN / "fsck.pnova"), "-n", "-f", image],
                           capture_output=True, text=True, timeout=WAIT)
        assert r.returncode == 0, r.stdout + r.stderr
        m.start()
        assert set(os.listdir(m.mnt / "shared")) == left
        m.stop()
    finally:
        m.cleanup()


@needs_fuse
def test_unlinked_open_file_lives_until_closed(mounted: Mount) -> None:
    m = mounted.mnt
    base = os.statvfs(m).f_bfree
    data = os.urandom(100_000)
    fd = os.open(m / "u", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.unlink(m / "u")
        assert not (m / "u").exists() and os.listdir(m) == []
        assert os.pread(fd, len(data), 0) == data
        os.pwrite(fd, b"y" * 5000, len(data))
        st = os.fstat(fd)
        assert st.st_size == len(data) + 5000 and st.st_nlink == 0
        assert os.pread(fd, 5000, len(data)) == b"y" * 5000
        assert os.statvfs(m).f_bfree <= base - 26        # still holds its blocks
    finally:
        os.close(fd)
    wait_for(lambda: os.statvfs(m).f_bfree >= base - 2, "the blocks of the closed file")

    # The same for a file replaced by rename while open.
    (m / "old").write_bytes(b"old contents")
    (m / "new").write_bytes(b"new contents")
    with open(m / "old", "r+b") as fh:
        os.rename(m / "new", m / "old")
        assert fh.read() == b"old contents" and os.fstat(fh.fileno()).st_nlink == 0
        fh.write(b"!")
        fh.flush()
        fh.seek(0)
        assert fh.read() == b"old contents!"
    assert (m / "old").read_bytes() == b"new contents" and os.listdir(m) == ["old"]


@needs_fuse
def test_name_too_long(mounted: Mount) -> None:
    m = mounted.mnt
    for call in (lambda p: p.write_bytes(b""), lambda p: p.mkdir(),
                 lambda p: os.symlink("t", p), lambda p: os.stat(p)):
        with pytest.raises(OSError) as ei:
            call(m / ("n" * 256))
        assert ei.value.errno == errno.ENAMETOOLONG
    ok = m / ("n" * 255)
    ok.write_bytes(b"fits")
    with pytest.raises(OSError) as ei:
        os.rename(ok, m / ("r" * 256))
    assert ei.value.errno == errno.ENAMETOOLONG
    assert os.listdir(m) == ["n" * 255]


# ---------------------------------------------------------------- the command
@needs_fuse
def test_second_mount_is_refused(mounted: Mount, tmp_path: Path) -> None:
    (tmp_path / "other").mkdir()
    r = subprocess.run([*PNOVA, mounted.image, str(tmp_path / "other")], capture_output=True,
                       text=True, timeout=WAIT)
    assert r.returncode == 1 and one_line(r.stderr) and "already mounted" in r.stderr
    assert not os.path.ismount(tmp_path / "other")
    (mounted.mnt / "ok").write_bytes(b"first mount unharmed")
    assert (mounted.mnt / "ok").read_bytes() == b"first mount unharmed"


def test_command_line_errors(tmp_path: Path, image: str) -> None:
    (tmp_path / "mnt").mkdir()
    (tmp_path / "file").write_bytes(b"")
    garbage = tmp_path / "garbage.img"
    garbage.write_bytes(os.urandom(1 << 20))
    cases = [
        ([image, str(tmp_path / "mnt"), "-o", "rw,frobnicate"], "unknown mount option"),
        ([str(garbage), str(tmp_path / "mnt")], "not a pnova filesystem"),
        ([image, str(tmp_path / "missing")], "No such file"),
        ([image, str(tmp_path / "file")], "not a directory"),
        ([str(tmp_path / "missing.img"), str(tmp_path / "mnt")], "No such file"),
        ([image], "required"),
    ]
    for args, words in cases:
        r = subprocess.run([*PNOVA, *args], capture_output=True, text=True, timeout=WAIT)
        assert r.returncode == 1, (args, r.stderr)
        assert one_line(r.stderr) and words in r.stderr, (args, r.stderr)
    assert not image_locked(image)
    r = subprocess.run([*PNOVA, "-h"], capture_output=True, text=True, timeout=WAIT)
    assert r.returncode == 0 and "fuse.pnova" in r.stdout and "-o" in r.stdout


@needs_fuse
def test_mount_options_and_proc_mounts(mnt: Mount) -> None:
    # What mount(8) passes, plus fstab-only options: all accepted.
    mnt.start("-o", "rw,dev,suid,noauto", "-o", "nofail,_netdev,relatime,defaults")
    source, _, fstype, opts = mount_entry(mnt.mnt)[:4]
    assert source == mnt.image and fstype == "fuse.pnova"
    assert "default_permissions" in opts
    (mnt.mnt / "f").write_bytes(b"rw")
    mnt.stop()
    with open(mnt.log) as f:
        text = f.read()
    assert "via clean path" in text and "unmounted cleanly" in text   # the engine's lines

    mnt.start("-o", "ro,nosuid,nodev")
    opts = mount_entry(mnt.mnt)[3].split(",")
    assert "ro" in opts and "nosuid" in opts
    assert (mnt.mnt / "f").read_bytes() == b"rw"
    with pytest.raises(OSError) as ei:
        (mnt.mnt / "g").write_bytes(b"")
    assert ei.value.errno == errno.EROFS
    mnt.stop()


@needs_fuse
@pytest.mark.skipif(not os.path.exists("/sbin/mount.fuse3"), reason="no /sbin/mount.fuse3")
def test_mount_helper(mnt: Mount) -> None:
    # mount(8) runs /sbin/mount.fuse3 IMAGE DIR -t fuse.pnova -o OPTS, which runs
    # `pnova IMAGE DIR -o OPTS` through /bin/sh.  mount(8) itself drops PATH (the
    # shell then searches /usr/local/bin and the system directories), so here
    # the helper is run directly with the virtual environment first in PATH.
    env = dict(os.environ, PATH=f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}")
    r = subprocess.run(["/sbin/mount.fuse3", mnt.image, str(mnt.mnt), "-t", "fuse.pnova",
                        "-o", "rw,noauto"], capture_output=True, text=True, timeout=WAIT,
                       env=env)
    assert r.returncode == 0, r.stderr
    assert mount_entry(mnt.mnt)[2] == "fuse.pnova"
    (mnt.mnt / "via-helper").write_bytes(b"1")
    mnt.stop()
    assert engine_state(mnt.image) == "clean"


def _helpers_installed() -> bool:
    installed = Path("/usr/local/bin/pnova")
    return installed.exists() and installed.resolve() == (BIN / "pnova").resolve()


@needs_fuse
@pytest.mark.skipif(os.geteuid() != 0 or not _helpers_installed(),
                    reason="needs root and `make install-helpers` (mount(8) resets PATH)")
def test_mount_t_fuse_pnova(mnt: Mount) -> None:
    r = subprocess.run(["mount", "-t", "fuse.pnova", mnt.image, str(mnt.mnt)],
                       capture_output=True, text=True, timeout=WAIT)
    assert r.returncode == 0, r.stderr
    assert mount_entry(mnt.mnt)[2] == "fuse.pnova"
    (mnt.mnt / "via-mount").write_bytes(b"1")
    r = subprocess.run(["umount", str(mnt.mnt)], capture_output=True, text=True, timeout=WAIT)
    assert r.returncode == 0, r.stderr
    mnt.wait_gone()
    assert engine_state(mnt.image) == "clean"


@needs_fuse
@pytest.mark.skipif(os.geteuid() != 0, reason="mount -a needs root")
def test_the_mount_type_says_what_the_image_rests_on(tmp_path: Path, shm_dir: Path) -> None:
    """`df -T` and /proc/mounts show fuse.pnova for an image on a disk and
    fuse.pnova-memory for one in tmpfs (fuse.pnova-pmem on persistent memory,
    not present here), and an fstab line of type fuse.pnova still finds either
    mounted: `mount -a` goes by source and mount point."""
    disk = str(tmp_path / "disk.img")
    mem = str(shm_dir / "mem.img")
    expect = {}
    for path in (disk, mem):
        format_device(path, 32 << 20, numa_nodes=1, cpus_per_node=2)
        fs = FileSystem.mount(path)
        expect[path] = "fuse.pnova" + {"disk": "", "memory": "-memory"}[fs.pm.mode]
        fs.unmount()
    assert expect[mem] == "fuse.pnova-memory"
    mounts = [Mount(disk, tmp_path / "m1"), Mount(mem, tmp_path / "m2")]
    try:
        for m in mounts:
            m.start()
            source, _, fstype = mount_entry(m.mnt)[:3]
            assert (source, fstype) == (m.image, expect[m.image])
            df = subprocess.run(["df", "-T", str(m.mnt)], capture_output=True, text=True,
                                timeout=WAIT)
            assert df.returncode == 0 and df.stdout.split()[-6] == expect[m.image], df.stdout
            with open(m.log) as f:
                assert f"type {expect[m.image]}" in f.read()
        fstab = tmp_path / "fstab"
        fstab.write_text("".join(f"{m.image} {m.mnt} fuse.pnova defaults 0 0\n"
                                 for m in mounts))
        r = subprocess.run(["mount", "-a", "-v", "--fstab", str(fstab)], capture_output=True,
                           text=True, timeout=WAIT)
        assert r.returncode == 0, r.stderr
        assert r.stdout.count("already mounted") == 2, r.stdout
        for m in mounts:
            with open("/proc/self/mounts") as f:
                assert sum(line.split()[1] == str(m.mnt) for line in f) == 1
        # pnova's own tools know both types: pnova-scrub checks the mount in memory
        r = subprocess.run([str(BIN / "pnova-scrub"), "-q", str(mounts[1].mnt)],
                           capture_output=True, text=True, timeout=WAIT)
        assert r.returncode == 0, r.stderr
        for m in mounts:
            m.stop()
    finally:
        for m in mounts:
            m.cleanup()


# ---------------------------------------------------------------- unmount and crashes
@needs_fuse
def test_unmount_leaves_image_clean(mounted: Mount) -> None:
    (mounted.mnt / "keep").write_bytes(b"kept" * 5000)
    os.setxattr(mounted.mnt / "keep", "user.k", b"v")
    with open(mounted.mnt / "mapped", "w+b") as fh:      # writes through a shared mapping
        fh.truncate(8192)
        with mmap.mmap(fh.fileno(), 8192) as mm:
            mm[4000:4010] = b"via mmap!!"
            mm.flush()
    mounted.stop()
    assert not is_mounted(mounted.mnt)
    assert engine_state(mounted.image) == "clean"
    mounted.start()
    assert (mounted.mnt / "keep").read_bytes() == b"kept" * 5000
    assert os.getxattr(mounted.mnt / "keep", "user.k") == b"v"
    data = (mounted.mnt / "mapped").read_bytes()
    assert data[4000:4010] == b"via mmap!!" and len(data) == 8192


@needs_fuse
def test_streams_of_large_writes_through_the_mount(mounted: Mount, capsys) -> None:
    """1 MiB writes, buffered and O_DIRECT, from two writers at once, mixed with
    unaligned and small writes and other requests (these are received in place,
    DESIGN 22.6): the data reads back exactly, the space comes back whole once
    the files are gone and the mount is idle, and the image is fsck-clean."""
    m = mounted.mnt
    s0 = os.statvfs(m)
    rng = random.Random(11)
    models: dict[str, bytearray] = {}
    failed: list[BaseException] = []

    def writer(name: str, flags: int, seed: float) -> None:
        r = random.Random(seed)
        model = bytearray()
        fd = os.open(m / name, os.O_CREAT | os.O_WRONLY | flags, 0o644)
        try:
            for i in range(12):
                if i in (4, 9):                          # unaligned, then small
                    data, off = r.randbytes(300_000 if i == 4 else 777), len(model) + 1234
                    n = os.pwrite(fd, data, off) if not flags else None
                    if n is None:                        # O_DIRECT needs alignment: a
                        os.fsync(fd)                     # different request instead
                        continue
                else:
                    data, off = r.randbytes(1 << 20), len(model) // 4096 * 4096
                    if flags:                            # page-aligned, for O_DIRECT
                        buf = mmap.mmap(-1, len(data))
                        buf[:] = data
                        n = os.pwrite(fd, buf, off)
                        buf.close()
                    else:
                        n = os.pwrite(fd, data, off)
                assert n == len(data)
                model[len(model):off + len(data)] = bytes(max(0, off + len(data) - len(model)))
                model[off:off + len(data)] = data
            models[name] = model
        except BaseException as e:                       # reported by the test
            failed.append(e)
        finally:
            os.close(fd)

    threads = [threading.Thread(target=writer, args=("buffered", 0, rng.random())),
               threading.Thread(target=writer, args=("direct", os.O_DIRECT, rng.random()))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=WAIT)
    assert not failed, failed
    assert set(models) == {"buffered", "direct"}
    for name, model in models.items():
        assert (m / name).read_bytes() == bytes(model), name
        os.unlink(m / name)
    wait_for(lambda: os.statvfs(m).f_bfree == s0.f_bfree, "the space to come back")
    mounted.stop()
    rc, out = fsck(capsys, mounted.image, "-n", "-f")
    assert rc == 0, out


@needs_fuse
def test_a_full_device_answers_enospc_to_a_stream_of_large_writes(mounted: Mount,
                                                                    capsys) -> None:
    """1 MiB writes until the device is full: the write that does not fit fails
    with ENOSPC, not EIO; what was written before reads back; removing it gives
    the whole space back; the image is fsck-clean."""
    m = mounted.mnt
    s0 = os.statvfs(m)
    piece = random.Random(5).randbytes(1 << 20)
    written = 0
    fd = os.open(m / "fill", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        with pytest.raises(OSError) as err:
            for _ in range(64):                          # the image holds about 27 MiB
                assert os.pwrite(fd, piece, written) == len(piece)
                written += len(piece)
        assert err.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    assert written >= 16 << 20
    with open(m / "fill", "rb") as f:
        for off in range(0, written, len(piece)):
            assert f.read(len(piece)) == piece, off
    os.unlink(m / "fill")
    wait_for(lambda: os.statvfs(m).f_bfree == s0.f_bfree, "the space to come back")
    mounted.stop()
    rc, out = fsck(capsys, mounted.image, "-n", "-f")
    assert rc == 0, out


@needs_fuse
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_unmounts_cleanly(mnt: Mount, sig: signal.Signals) -> None:
    proc = mnt.start_foreground()
    (mnt.mnt / "f").write_bytes(b"before the signal")
    proc.send_signal(sig)
    assert proc.wait(timeout=WAIT) == 0, proc.stderr.read()
    err = proc.stderr.read()
    assert "Traceback" not in err and "unmounted cleanly" in err
    assert not is_mounted(mnt.mnt)
    fs = FileSystem.mount(mnt.image, readonly=True)
    try:
        assert fs.mount_path == "clean"
        ino = fs.lookup(1, b"f").ino
        assert fs.read(ino, 0, 100) == b"before the signal"
    finally:
        fs.unmount()


_WRITER = r"""
import os, sys
mnt = sys.argv[1]
fds = [os.open(os.path.join(mnt, f"f{k}"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
       for k in range(4)]
i = 0
try:
    while True:
        os.write(fds[i % 4], b"%08d" % i * 128)
        if i % 8 == 0:
            os.fsync(fds[i % 4])
        if i % 50 == 49:
            tmp = os.path.join(mnt, f"n{i}.tmp")
            with open(tmp, "wb") as f:
                f.write(b"%d" % i)
            os.rename(tmp, os.path.join(mnt, f"n{i}"))
        print(i, flush=True)
        i += 1
except OSError as e:
    print("stopped", e.errno, flush=True)
"""


# Writes 64 KiB pieces one after another with O_DIRECT (each piece is received
# in place by the serving process: DESIGN 22.6), printing each one's number
# once it returned.
_LARGE_WRITER = r"""
import mmap, os, sys
fd = os.open(os.path.join(sys.argv[1], "big"), os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
buf = mmap.mmap(-1, 65536)
i = 0
try:
    while True:
        buf[:] = b"%08d" % i * 8192
        os.pwrite(fd, buf, i * 65536)
        print(i, flush=True)
        i += 1
except OSError as e:
    print("stopped", e.errno, flush=True)
"""


def _write_until_killed(script: str, mnt: Path, enough: int, victim: int,
                        sig: int = signal.SIGKILL) -> tuple[list[int], list[str]]:
    """Run a writer ``script`` on ``mnt``; once it has reported ``enough``
    returned writes, send ``sig`` (kill -9) to ``victim``.  Returns the numbers
    of the writes that returned and the errno (as text) the writer stopped
    with; the writer must not hang."""
    writer = subprocess.Popen([sys.executable, "-c", script, str(mnt)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done: list[int] = []
    stopped: list[str] = []
    ready = threading.Event()

    def collect() -> None:
        for line in writer.stdout:
            if line.strip().isdigit():
                done.append(int(line))
                if len(done) >= enough:
                    ready.set()
            elif line.startswith("stopped"):
                stopped.append(line.split()[1])
        ready.set()

    reader = threading.Thread(target=collect, daemon=True)
    reader.start()
    try:
        assert ready.wait(WAIT), "the writer made no progress"
        assert len(done) >= enough, writer.stderr.read()
        os.kill(victim, sig)
        writer.wait(timeout=WAIT)                      # it must not hang
        reader.join(timeout=WAIT)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait(timeout=WAIT)
        reader.join(timeout=WAIT)
        writer.stdout.close()
        writer.stderr.close()
    return done, stopped


def serving_processes(image: str) -> dict[str, int]:
    """The daemon's processes by name: 'pnova' (the supervisor), 'pnova-cpuK' (workers),
    'pnova-keep'; of two with one name (a child between its fork and its
    renaming) the older."""
    out: dict[str, int] = {}
    for pid in sorted(daemon_pids(image)):
        try:
            with open(f"/proc/{pid}/comm") as f:
                out.setdefault(f.read().strip(), pid)
        except OSError:
            pass
    return out


@needs_fuse
@pytest.mark.parametrize("victim", ["pnova-cpu0", "pnova-cpu1", "pnova"])
def test_kill9_of_any_serving_process_aborts_and_next_mount_recovers(
        mnt: Mount, victim: str) -> None:
    """kill -9 of a worker or of the supervisor: the caller gets ENOTCONN instead of
    hanging, every process of the mount exits, nothing acknowledged is lost, and the
    next mount on the same directory replaces the dead mount and recovers."""
    mounted = mnt
    mounted.start("-o", "workers=2")
    m = mounted.mnt
    procs = serving_processes(mounted.image)
    assert {"pnova", "pnova-cpu0", "pnova-cpu1"} <= set(procs), procs
    done, stopped = _write_until_killed(_WRITER, m, 400, procs[victim])
    assert stopped and int(stopped[0]) in unserved(mounted), stopped
    returned = done[:]
    assert returned == list(range(len(returned)))
    wait_all_gone(mounted.image)
    with open(mounted.log) as f:
        text = f.read()
    if victim == "pnova":
        assert "the supervisor died" in text
    else:
        assert f"(CPU {victim[-1]}) was killed by SIGKILL" in text
        assert "the mount was aborted" in text
    # The dead mount answers ENOTCONN until it is replaced (through io_uring,
    # a call the kernel queued while it was still taking the queues down may
    # fail with ECONNABORTED first).
    assert is_mounted(m)

    def stat_errno() -> int:
        try:
            os.stat(m)
        except OSError as e:
            return e.errno
        return 0
    if mounted.path == "devfuse":
        assert stat_errno() == errno.ENOTCONN
    else:
        wait_for(lambda: stat_errno() == errno.ENOTCONN, "the dead mount to answer ENOTCONN")
    assert stat_errno() == errno.ENOTCONN

    log_before = os.path.getsize(mounted.log)
    r = mounted.run()                                  # on the dead mount's directory
    assert r.returncode == 0 and one_line(r.stderr), r.stderr
    assert "removed the dead mount" in r.stderr and os.path.ismount(m)
    with open(mounted.log) as f:
        f.seek(log_before)
        assert "via recovery path" in f.read()
    for i in returned:
        with open(m / f"f{i % 4}", "rb") as f:
            f.seek((i // 4) * 1024)
            assert f.read(1024) == b"%08d" % i * 128, i
        if i % 50 == 49:
            assert (m / f"n{i}").read_bytes() == b"%d" % i
    mounted.stop()
    assert engine_state(mounted.image) == "clean"
    if _fsck_available():
        r = subprocess.run([str(BIN / "fsck.pnova"), "-n", "-f", mounted.image],
                           capture_output=True, text=True, timeout=WAIT)
        assert r.returncode == 0, r.stdout + r.stderr


@needs_fuse
def test_a_stop_signal_in_a_stream_of_requests_unmounts_cleanly(mnt: Mount) -> None:
    """SIGTERM to the daemon while a client writes, fsyncs and renames through it:
    each serving process answers the requests it holds and exits, the image is
    saved clean, the client's next call fails instead of hanging, and every write
    that returned is in the image (fsck clean)."""
    mnt.start("-o", "workers=2")
    supervisor = serving_processes(mnt.image)["pnova"]
    done, stopped = _write_until_killed(_WRITER, mnt.mnt, 300, supervisor, signal.SIGTERM)
    assert stopped and int(stopped[0]) in unserved(mnt), stopped
    assert done == list(range(len(done)))
    wait_all_gone(mnt.image)
    with open(mnt.log) as f:
        text = f.read()
    assert "unmounted cleanly" in text and "Traceback" not in text, text
    assert engine_state(mnt.image) == "clean"
    # The stop detaches the mount first: the client's open files still reach
    # it, but a path opened after that is in the directory underneath, so the
    # last renames may have happened there, and only the last ones.
    under = {p.name for p in mnt.mnt.iterdir()}
    renamed = [i for i in done if i % 50 == 49]
    later = [i for i in renamed if f"n{i}" in under]
    assert later == renamed[len(renamed) - len(later):], (later, renamed)
    fs = FileSystem.mount(mnt.image, readonly=True)
    try:
        for i in done:
            ino = fs.lookup(1, b"f%d" % (i % 4)).ino
            assert fs.read(ino, (i // 4) * 1024, 1024) == b"%08d" % i * 128, i
        for i in renamed[:len(renamed) - len(later)]:
            assert fs.read(fs.lookup(1, b"n%d" % i).ino, 0, 16) == b"%d" % i
    finally:
        fs.unmount()
    if _fsck_available():
        r = subprocess.run([str(BIN / "fsck.pnova"), "-n", "-f", mnt.image],
                           capture_output=True, text=True, timeout=WAIT)
        assert r.returncode == 0, r.stdout + r.stderr


@needs_fuse
def test_kill9_in_a_stream_of_large_writes_loses_nothing_acknowledged(mnt: Mount) -> None:
    """The serving process is killed while it receives large writes into blocks
    it reserved: the writer's write fails instead of hanging, the next mount
    recovers every piece that returned, the reserved blocks are free again, and
    fsck is clean.  The write fails with ECONNABORTED, or with EIO when the kill
    came while the kernel was copying that request into the reserved blocks
    (DESIGN 22.6); it was not acknowledged either way."""
    mnt.start("-o", "workers=1")
    m = mnt.mnt
    s0 = os.statvfs(m)
    victim = serving_processes(mnt.image)["pnova-cpu0"]
    done, stopped = _write_until_killed(_LARGE_WRITER, m, 100, victim)
    assert stopped and int(stopped[0]) in unserved(mnt) + (errno.EIO,), stopped
    wait_all_gone(mnt.image)
    r = mnt.run()                                        # replaces the dead mount, recovers
    assert r.returncode == 0, r.stderr
    with open(m / "big", "rb") as f:
        for i in done:
            f.seek(i * 65536)
            assert f.read(65536) == b"%08d" % i * 8192, i
    os.unlink(m / "big")
    wait_for(lambda: os.statvfs(m).f_bfree == s0.f_bfree, "the space to come back")
    mnt.stop()
    if _fsck_available():
        r = subprocess.run([str(BIN / "fsck.pnova"), "-n", "-f", mnt.image],
                           capture_output=True, text=True, timeout=WAIT)
        assert r.returncode == 0, r.stdout + r.stderr


def _fsck_available() -> bool:
    """fsck.pnova is usable (the checker and its command-line front end exist)."""
    try:
        return (importlib.util.find_spec("pnova.fsck") is not None
                and importlib.util.find_spec("pnova_fsck.cli") is not None
                and (BIN / "fsck.pnova").exists())
    except ModuleNotFoundError:
        return False


# ---------------------------------------------------------------- engine failures
class _Broken(FileSystem):
    """An engine whose getattr fails the way a bug would."""

    def getattr(self, ino: int):  # type: ignore[override]
        raise RuntimeError("injected engine failure")


class _Kernel:
    """The kernel's side of a FUSE connection, played over a SOCK_SEQPACKET pair
    (one message per request and per reply, as on /dev/fuse) to a request loop
    running in a thread."""

    def __init__(self, fs: FileSystem, *, landing: bool = False) -> None:
        self.ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.theirs = theirs
        # room for a request of a few hundred KiB in one message
        self.ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        self.ops = PnovaOperations(fs)
        self.loop = Loop(theirs.fileno(), self.ops.table, name="test",
                         landing=self.ops.landing if landing else None)
        self.thread = threading.Thread(target=self.loop.run, daemon=True)
        self.thread.start()
        self.unique = 0

    def send(self, op: int, nodeid: int, body: bytes = b"") -> int:
        self.unique += 2
        self.ours.send(W.IN_HEADER.pack(W.IN_HEADER_SIZE + len(body), op, self.unique,
                                        nodeid, 0, 0, os.getpid(), 0, 0) + body)
        return self.unique

    def call(self, op: int, nodeid: int, body: bytes = b"") -> tuple[int, bytes]:
        """One request; its reply's (errno, payload)."""
        unique = self.send(op, nodeid, body)
        self.ours.settimeout(WAIT)
        reply = self.ours.recv(1 << 21)
        length, error, got = W.OUT_HEADER.unpack_from(reply)
        assert got == unique and length == len(reply)
        return -error, reply[W.OUT_HEADER_SIZE:]

    def close(self) -> None:
        self.ours.close()                            # the loop sees the end and returns
        self.thread.join(timeout=WAIT)
        self.theirs.close()


def test_request_loop_translates_errors(image: str, caplog: pytest.LogCaptureFixture) -> None:
    """Engine errors keep their errno, anything else is EIO with a logged traceback,
    and the loop goes on answering; lookup counts follow the FUSE rules."""
    fs = _Broken.mount(image)
    k = _Kernel(fs)
    try:
        with caplog.at_level(logging.ERROR, logger="pnova.fuse"):
            err, _ = k.call(W.GETATTR, 1, W.GETATTR_IN.pack(0, 0, 0))
        assert err == errno.EIO
        rec = [r for r in caplog.records if "internal error in GETATTR" in r.getMessage()]
        assert rec and rec[0].exc_info is not None
        assert "injected engine failure" in caplog.text and "Traceback" in caplog.text

        assert k.call(W.RMDIR, 1, b"missing\0")[0] == errno.ENOENT
        assert k.call(W.IOCTL, 1)[0] == errno.ENOSYS           # not offered
        err, neg = k.call(W.LOOKUP, 1, b"missing\0")
        nodeid, _gen, entry_valid = struct.unpack_from("<QQQ", neg)
        assert err == 0 and nodeid == 0 and entry_valid > 0    # a cached negative entry

        # Lookup counts: a reply that hands out an inode takes a reference;
        # forget gives it back and an unlinked inode then goes.
        a = fs.create(1, b"f", 0o644)
        err, entry = k.call(W.LOOKUP, 1, b"f\0")
        assert err == 0 and struct.unpack_from("<Q", entry)[0] == a.ino
        assert fs._refs(a.ino) == 1
        fs.unlink(1, b"f")
        assert a.ino in fs.cache                               # still referenced
        k.send(W.FORGET, a.ino, W.FORGET_IN.pack(1))            # no reply to a FORGET
        k.send(W.BATCH_FORGET, 0, W.BATCH_FORGET_IN.pack(2, 0) + W.FORGET_ONE.pack(a.ino, 1)
               + W.FORGET_ONE.pack(10**9, 3))                  # unknown inodes: no error
        assert k.call(W.STATFS, 1)[0] == 0                     # the loop still answers
        assert a.ino not in fs.cache
    finally:
        k.close()
        fs.unmount()
    fs = FileSystem.mount(image)
    try:
        with pytest.raises(FsError):
            fs.lookup(1, b"f")
    finally:
        fs.unmount()


def test_large_writes_are_received_into_the_blocks_that_keep_them(image: str, capsys) -> None:
    """After a large aligned write, the loop reads the next request into free
    blocks: a write that fits keeps them (no copy), with its last page's tail
    zeroed; an unaligned or larger write, and any other request, are made whole
    and served as usual; the blocks go back to the allocator when the stream of
    writes ends, and the image is fsck-clean."""
    fs = FileSystem.mount(image)
    k = _Kernel(fs, landing=True)
    landing = k.ops.landing
    want = bytearray()

    def write(off: int, data: bytes) -> None:
        body = W.WRITE_IN.pack(0, off, len(data), 0, 0, 0, 0) + data
        err, out = k.call(W.WRITE, ino, body)
        assert err == 0 and struct.unpack_from("<I", out)[0] == len(data)
        want[len(want):off + len(data)] = bytes(max(0, off + len(data) - len(want)))
        want[off:off + len(data)] = data

    def armed() -> list[tuple[int, int]]:
        # the loop reserves the blocks just before it blocks in its read
        wait_for(lambda: landing.nbytes > 0, "the landing to be armed")
        return list(landing.extents)

    try:
        free = fs.statfs().bfree
        ino = fs.create(1, b"f", 0o644).ino
        rng = random.Random(7)
        write(0, rng.randbytes(33 * 4096))                # served as usual; arms 33 blocks
        blocks = [b for s, c in armed() for b in range(s, s + c)]
        assert len(blocks) == 33
        write(33 * 4096, rng.randbytes(32 * 4096 + 5))   # lands: 33 blocks, the last partial
        pages = fs.get(ino).pages
        assert [pages[p] for p in range(33, 66)] == blocks
        armed()
        write(66 * 4096 + 100, rng.randbytes(70_000))    # not at a page start: copied out
        assert landing.nbytes == 0                       # and the stream has ended
        write(90 * 4096, rng.randbytes(64 << 10))        # arms 16 blocks
        armed()
        write(106 * 4096, rng.randbytes(100_000))        # larger than the landing: whole
        assert k.call(W.GETATTR, ino, W.GETATTR_IN.pack(0, 0, 0))[0] == 0
        assert landing.nbytes == 0                       # a getattr ended the stream
        assert fs.read(ino, 0, len(want) + 10) == bytes(want)
        fs.unlink(1, b"f")
        assert fs.statfs().bfree == free                 # nothing is held
    finally:
        k.close()
        fs.unmount()
    rc, out = fsck(capsys, image, "-n", "-f")
    assert rc == 0, out


_BROKEN_DAEMON = r"""
import logging, sys
from pnova.engine import FileSystem
from pnova.mount import serve

class Broken(FileSystem):
    def getxattr(self, ino, name):
        if name == b"user.k":
            raise RuntimeError("injected engine failure")
        return super().getxattr(ino, name)

logging.basicConfig(level=logging.INFO, stream=sys.stderr)
fs = Broken.mount(sys.argv[1])
rc = serve(fs, sys.argv[2], {"default_permissions", "fsname=" + sys.argv[1], "subtype=pnova"})
fs.unmount()
sys.exit(rc)
"""


@needs_fuse
def test_engine_exception_is_eio_and_mount_stays_up(mnt: Mount) -> None:
    mnt.fg = subprocess.Popen([sys.executable, "-c", _BROKEN_DAEMON, mnt.image, str(mnt.mnt)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: os.path.ismount(mnt.mnt) or mnt.fg.poll() is not None, "the mount")
    p = mnt.mnt / "f"
    p.write_bytes(b"x")
    for _ in range(3):
        with pytest.raises(OSError) as ei:
            os.getxattr(p, "user.k")
        assert ei.value.errno == errno.EIO
    p.write_bytes(b"still serving")                     # the daemon is alive
    assert p.read_bytes() == b"still serving" and os.listdir(mnt.mnt) == ["f"]
    mnt.stop()
    assert mnt.fg.wait(timeout=WAIT) == 0
    err = mnt.fg.stderr.read()
    assert err.count("Traceback") == 3 and "injected engine failure" in err
    assert engine_state(mnt.image) == "clean"


def test_lock_scheme_options(tmp_path):
    """-o lock= and segment_pages= are accepted; bad values get one line and exit 1."""
    from pnova.mount import UsageError, parse_args

    cfg = parse_args([str(tmp_path / "i"), str(tmp_path), "-o", "rw,lock=rangetree,segment_pages=4"])
    assert (cfg.lock, cfg.segment_pages) == ("rangetree", 4)
    for bad in ("lock=spin", "segment_pages=0", "segment_pages=x"):
        with pytest.raises(UsageError, match=bad.split("=")[0]):
            parse_args([str(tmp_path / "i"), str(tmp_path), "-o", bad])


def test_keeper_option(tmp_path):
    """-o keeper=on|off: on unless turned off; anything else gets one line."""
    from pnova.mount import UsageError, parse_args

    args = [str(tmp_path / "i"), str(tmp_path), "-o"]
    assert parse_args(args + ["rw"]).keeper is True
    assert parse_args(args + ["keeper=off"]).keeper is False
    assert parse_args(args + ["keeper=on"]).keeper is True
    with pytest.raises(UsageError, match="keeper=maybe"):
        parse_args(args + ["keeper=maybe"])


@needs_fuse
def test_the_mount_recovers_a_rename_a_power_loss_cut_in_half(tmp_path: Path,
                                                             monkeypatch) -> None:
    """The pnova command recovers an image on a disk by the page model's rules
    (DESIGN 24.3): here a crash state of the page model in which a rename from
    /A to /B reached the disk in /B only, so that its logs alone name the file
    twice.  Through the mount the file has its new name only, with its data, and
    fsck is clean afterwards."""
    import pnova.crashpages as cp
    from pnova.pmem import PMem
    from pnova.rebuild import Rebuild

    cases = cp.cases_for("seq1")
    case = next(i for i, (_, ops) in enumerate(cases)
                if ops[0] == ("rename", "/A/foo", "/B/foo", 0))
    img = str(tmp_path / "lost.img")            # tmp_path is on a disk (test_durability)
    probe = str(tmp_path / "probe.img")
    found = False
    for sno in range(400):
        if cp.run_case("seq1", case, only=(0, sno), keep=img).checked == 0:
            break
        shutil.copy(img, probe)
        with monkeypatch.context() as m:        # recovery without settling renames
            m.setattr(Rebuild, "_finish_renames", lambda self: 0)
            fs = FileSystem.mount(probe, device=PMem(probe), power_loss=True)
        try:
            names = [(d, n) for d in (b"A", b"B")
                     for n, _i, _t in fs.readdir(fs.lookup(1, d).ino)[2:] if n == b"foo"]
        finally:
            fs.unmount()
        if len(names) == 2:
            found = True
            break
    assert found, "no crash state names the file twice: the rename's pages changed"
    m = Mount(img, tmp_path / "mnt")
    try:
        r = m.run()
        assert r.returncode == 0 and os.path.ismount(m.mnt), r.stderr
        # what recovery settled is said, on the terminal as in the mount log
        assert "a rename reached the disk in its new directory only" in r.stderr
        assert not (m.mnt / "A" / "foo").exists()
        assert (m.mnt / "B" / "foo").read_bytes() == b"a" * 6000
        assert os.stat(m.mnt / "B" / "foo").st_nlink == 1
        m.stop()
    finally:
        m.cleanup()
    r = subprocess.run([str(BIN / "fsck.pnova"), "-n", "-f", img],
                       capture_output=True, text=True, timeout=WAIT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "a rename reached the disk in its new directory only" in open(m.log).read()


# ---------------------------------------------------------------- the image's own storage
MKFS = [str(BIN / "mkfs.pnova")] if (BIN / "mkfs.pnova").exists() else \
    [sys.executable, "-m", "tools.mkfs.cli"]
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small tmpfs: needs root")


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 48 MiB tmpfs: a host file system that fills up."""
    d = tmp_path / "host"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(d)], check=True)
    try:
        yield d
    finally:
        for _ in range(50):
            if subprocess.run(["umount", str(d)], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)                      # a daemon may still hold the image


def _fill_up(d: Path) -> None:
    """Take every free byte of the file system of ``d`` with another file."""
    fd = os.open(d / "other", os.O_CREAT | os.O_WRONLY, 0o644)
    chunk = bytes(1 << 16)
    try:
        with pytest.raises(OSError) as err:
            while True:
                os.write(fd, chunk)
        assert err.value.errno == errno.ENOSPC
    finally:
        os.close(fd)


@needs_root
def test_mkfs_refuses_an_image_its_file_system_has_no_room_for(small_fs: Path) -> None:
    """The image's storage is taken at mkfs: a device bigger than the room left
    is refused in one line, and no half-made file is left behind."""
    img = small_fs / "big.img"
    r = subprocess.run([*MKFS, "--size", "128M", str(img)], capture_output=True, text=True,
                       timeout=WAIT)
    assert r.returncode == 1 and one_line(r.stderr) and "no room" in r.stderr, r.stderr
    assert not img.exists()
    # An existing file is left exactly as it was: not grown, not emptied.
    old = small_fs / "old.img"
    content = random.Random(3).randbytes(1 << 20)
    old.write_bytes(content)
    r = subprocess.run([*MKFS, "-f", "--size", "128M", str(old)], capture_output=True,
                       text=True, timeout=WAIT)
    assert r.returncode == 1 and one_line(r.stderr) and "no room" in r.stderr, r.stderr
    assert old.stat().st_size == 1 << 20 and old.read_bytes() == content


@needs_root
@needs_fuse
def test_a_full_host_file_system_leaves_the_mount_serving(small_fs: Path, tmp_path: Path,
                                                          capsys) -> None:
    """Once formatted, the image owns its storage: when other files fill its host
    file system, writes into the mount go on until pnova's own space runs out
    (ENOSPC), and the mount keeps serving.  (A store into a hole of the mapping
    with the host full would kill the serving process, and the mount with it.)"""
    img = small_fs / "pnova.img"
    r = subprocess.run([*MKFS, "-q", "--size", "40M", str(img)], capture_output=True,
                       text=True, timeout=WAIT)
    assert r.returncode == 0, r.stderr
    assert os.stat(img).st_blocks * 512 >= 40 << 20
    m = Mount(str(img), tmp_path / "mnt")
    try:
        m.start()
        _fill_up(small_fs)
        piece = random.Random(7).randbytes(1 << 20)
        written = 0
        with pytest.raises(OSError) as err:
            with open(m.mnt / "data", "wb", buffering=0) as f:
                for _ in range(64):
                    f.write(piece)
                    written += len(piece)
        assert err.value.errno == errno.ENOSPC
        assert written >= 24 << 20
        assert os.listdir(m.mnt) == ["data"]             # still served
        with open(m.mnt / "data", "rb") as f:
            assert f.read(1 << 20) == piece
        m.stop()
    finally:
        m.cleanup()
    rc, out = fsck(capsys, str(img), "-n", "-f")
    assert rc == 0, out


@needs_root
@needs_fuse
def test_a_sparse_image_gets_its_storage_at_mount_or_is_refused(small_fs: Path,
                                                              tmp_path: Path) -> None:
    """An image copied sparse (or made before images owned their storage) is
    allocated by a read-write mount; where its file system has no room, the
    mount is refused in one line, and a read-only mount still works."""
    made = tmp_path / "made.img"
    r = subprocess.run([*MKFS, "-q", "--size", "40M", str(made)], capture_output=True,
                       text=True, timeout=WAIT)
    assert r.returncode == 0, r.stderr
    img = small_fs / "pnova.img"
    subprocess.run(["cp", "--sparse=always", str(made), str(img)], check=True)
    assert os.stat(img).st_blocks * 512 < 8 << 20
    with open(small_fs / "other", "wb") as f:
        f.write(bytes(40 << 20))                         # 8 MiB stay free
    m = Mount(str(img), tmp_path / "mnt")
    try:
        r = m.run()
        assert r.returncode == 1 and one_line(r.stderr), r.stderr
        assert "sparse" in r.stderr and "read-only" in r.stderr
        assert not is_mounted(m.mnt)
        m.start("-o", "ro")
        assert os.listdir(m.mnt) == []
        m.stop()
        os.unlink(small_fs / "other")
        m.start()
        assert os.stat(img).st_blocks * 512 >= 40 << 20
        (m.mnt / "f").write_bytes(b"kept")
        m.stop()
    finally:
        m.cleanup()


@needs_fuse
def test_a_directory_emptied_through_a_mount_of_one_serving_process_is_compacted(
        tmp_path: Path, shm_dir: Path, capsys) -> None:
    """Names removed through a mount served by one process: the directory's log
    is compacted as they go (at four times what its names need, DESIGN 12, as
    with several processes); the names left, their order and an fsck after the
    unmount are right.  (An image in memory: on a disk no log this short is
    compacted.)"""
    path = str(shm_dir / "d.img")
    format_device(path, 16 << 20, numa_nodes=1, cpus_per_node=1)
    m = Mount(path, tmp_path / "mnt")
    names = ["file-%04d" % i for i in range(600)]
    keep = names[::6]
    try:
        m.start()
        d = m.mnt / "d"
        d.mkdir()
        for n in names:
            (d / n).write_bytes(b"")
        for n in names:
            if n not in keep:
                (d / n).unlink()
        m.stop()
        fs = FileSystem.mount(path, readonly=True)
        try:
            ino = fs.lookup(1, b"d").ino
            # 1,100 entries of about 56 bytes fill 16 log pages; 600 fill 9
            assert fs._log_pages(fs.get(ino)) < 9                 # compacted
            assert [n for n, _, _ in fs.readdir(ino)][2:] == [n.encode() for n in keep]
        finally:
            fs.unmount()
    finally:
        m.cleanup()
    rc, out = fsck(capsys, path, "-n", "-f")
    assert rc == 0, out
