"""What pnova negotiates with the kernel, seen through real mounts.

Each capability the mount asks for changes what reaches the daemon, and each
test here shows that change: run once as pnova runs, and once with the
capability taken away, the outcome differs.  A probe daemon (pnova's own
serving processes with two handlers wrapped) makes concurrency observable
without timing anything: two requests that must both be inside the daemon at
once meet at a rendezvous, and a request that waits for a partner in vain
gives up after a few seconds and records that it was alone.
"""
from __future__ import annotations

import errno
import logging
import mmap
import select
import signal
import os
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from test_mount import (WAIT, Mount, daemon_pids, need_uring, needs_fuse, serving_processes,
                        wait_for)

pytestmark = [pytest.mark.mount, pytest.mark.timeout(120)]

_PROBE_DAEMON = r"""
import os, sys, time
from pnova import fuse_wire as W
from pnova.daemon import serve
from pnova.engine import FileSystem
from pnova.fuse_ops import PnovaOperations
from pnova.fuse_session import WANTED

image, mnt, meet_dir, variant = sys.argv[1:5]


def meet(tag):
    # Wait (at most 5 s) until another request has arrived at the rendezvous.
    open(os.path.join(meet_dir, tag), "w").close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if len([n for n in os.listdir(meet_dir) if "." not in n]) >= 2:
            open(os.path.join(meet_dir, tag + ".met"), "w").close()
            return
        time.sleep(0.005)
    open(os.path.join(meet_dir, tag + ".alone"), "w").close()


class Probe(PnovaOperations):
    def __init__(self, fs):
        super().__init__(fs)
        self.table[W.LOOKUP] = self.probe_lookup
        self.table[W.WRITE] = self.probe_write
        self.table[W.GETXATTR] = self.probe_getxattr
        if variant == "no-parallel-writes":
            self.table[W.OPEN] = self.cached_open

    def probe_lookup(self, parent, body, uid, gid, pid):
        if bytes(body[:5]) == b"meet-":
            meet(bytes(body[:-1]).decode())
        return self.lookup(parent, body, uid, gid, pid)

    def probe_write(self, ino, body, uid, gid, pid):
        if bytes(body[W.WRITE_IN_SIZE:W.WRITE_IN_SIZE + 4]) == b"MEET":
            meet("w%d" % W.WRITE_IN.unpack_from(body)[1])
        return self.write(ino, body, uid, gid, pid)

    def probe_getxattr(self, ino, body, uid, gid, pid):
        with open(os.path.join(meet_dir, "getxattr.count"), "a") as f:
            f.write(bytes(body[8:-1]).decode() + "\n")
        return self.getxattr(ino, body, uid, gid, pid)

    def cached_open(self, ino, body, uid, gid, pid):
        # the open as it would be without direct I/O and parallel direct writes
        out = bytearray(self.open(ino, body, uid, gid, pid))
        W.OPEN_OUT.pack_into(out, 0, ino, W.FOPEN_KEEP_CACHE, 0)
        return bytes(out)


wanted = WANTED
if variant == "no-parallel-dirops":
    wanted &= ~W.PARALLEL_DIROPS
if variant == "no-killpriv":
    wanted &= ~W.HANDLE_KILLPRIV_V2
fs = FileSystem.mount(image, lock="inode" if variant == "inode-scheme" else "pnova")
# (the /dev/fuse path: through io_uring a request is served by the process of
# its caller's CPU, and two callers on one CPU would never meet)
sys.exit(serve(fs, mnt, ["default_permissions", "fsname=" + image], workers=2,
               ops_factory=Probe, wanted=wanted, uring=False))
"""


class Probe(Mount):
    """A mount served by the probe daemon, with its rendezvous directory."""

    def __init__(self, image: str, mnt: Path, meet: Path, variant: str) -> None:
        super().__init__(image, mnt)
        self.meet = meet
        self.variant = variant
        meet.mkdir()
        self.fg = subprocess.Popen([sys.executable, "-c", _PROBE_DAEMON, image, str(mnt),
                                    str(meet), variant],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wait_for(lambda: os.path.ismount(mnt) or self.fg.poll() is not None, "the mount")
        assert self.fg.poll() is None, self.fg.stderr.read()

    def outcomes(self) -> dict[str, str]:
        """tag -> 'met' or 'alone', for every request that went to the rendezvous."""
        out = {}
        for name in os.listdir(self.meet):
            tag, _, how = name.partition(".")
            if how in ("met", "alone"):
                out[tag] = how
        return out

    def getxattr_names(self) -> list[str]:
        try:
            return (self.meet / "getxattr.count").read_text().split()
        except FileNotFoundError:
            return []

    def stop_probe(self) -> None:
        self.stop()
        assert self.fg.wait(timeout=WAIT) == 0
        self.fg.stderr.close()


@pytest.fixture
def probe(tmp_path: Path, image: str, request: pytest.FixtureRequest) -> Iterator[Probe]:
    p = Probe(image, tmp_path / "mnt", tmp_path / "meet", request.param)
    try:
        yield p
    finally:
        if p.fg is not None and p.fg.stderr and not p.fg.stderr.closed:
            p.fg.stderr.close()
        p.cleanup()


def _together(*calls) -> None:
    """Run the calls in threads at once; re-raise the first unexpected error."""
    errors: list[BaseException] = []

    def run(call) -> None:
        try:
            call()
        except FileNotFoundError:
            pass                                 # a lookup of a name that is not there
        except BaseException as e:               # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(c,)) for c in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=WAIT)
    assert not errors, errors


@needs_fuse
@pytest.mark.parametrize("probe", ["pnova", "no-parallel-dirops"], indirect=True)
def test_lookups_in_one_directory_reach_two_processes_at_once(probe: Probe) -> None:
    """PARALLEL_DIROPS: without it the kernel lets one lookup per directory through."""
    (probe.mnt / "d").mkdir()
    d = probe.mnt / "d"
    _together(lambda: os.stat(d / "meet-a"), lambda: os.stat(d / "meet-b"))
    seen = probe.outcomes()
    if probe.variant == "no-parallel-dirops":
        assert sorted(seen.values()) == ["alone", "met"], seen   # one after the other
    else:
        assert seen == {"meet-a": "met", "meet-b": "met"}
    probe.stop_probe()


@needs_fuse
@pytest.mark.parametrize("probe", ["pnova"], indirect=True)
def test_a_request_that_queues_behind_a_long_one_wakes_a_sleeping_process(probe: Probe) -> None:
    """One caller at a time keeps the second serving process asleep; a request
    that arrives while the awake one is busy with a long request must wake it
    (the watch timer, pnova.daemon.Readers), not wait for the long one."""
    d = probe.mnt / "d"
    d.mkdir()
    for i in range(200):                         # sequential: one process serves, one sleeps
        os.stat(probe.mnt / "d")
    first = threading.Thread(target=lambda: _missing(d / "meet-a"))
    first.start()
    wait_for(lambda: (probe.meet / "meet-a").exists(), "the first request in its handler")
    _missing(d / "meet-b")                       # queued behind it, nobody reading
    first.join(timeout=WAIT)
    assert probe.outcomes() == {"meet-a": "met", "meet-b": "met"}
    probe.stop_probe()


def _missing(path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        os.stat(path)


@needs_fuse
@pytest.mark.parametrize("probe", ["pnova", "no-parallel-writes", "inode-scheme"],
                         indirect=True)
def test_direct_writes_to_one_file_reach_two_processes_at_once(probe: Probe) -> None:
    """Direct I/O opens with FOPEN_PARALLEL_DIRECT_WRITES: O_DIRECT writes to one file
    are served by two processes at once (the kernel holds its inode lock otherwise).
    Under the inode scheme, NOVA's baseline, the kernel's inode lock is the one
    that serialises a file's writes, so they reach the daemon one at a time."""
    f = probe.mnt / "f"
    f.write_bytes(bytes(8192))
    bufs = []
    for _ in range(2):
        b = mmap.mmap(-1, 4096)                  # page-aligned, as O_DIRECT wants
        b.write(b"MEET" + bytes(4092))
        bufs.append(b)
    fds = [os.open(f, os.O_WRONLY | os.O_DIRECT) for _ in range(2)]
    try:
        _together(lambda: os.pwrite(fds[0], bufs[0], 0), lambda: os.pwrite(fds[1], bufs[1], 4096))
    finally:
        for fd in fds:
            os.close(fd)
        for b in bufs:
            b.close()
    seen = probe.outcomes()
    if probe.variant in ("no-parallel-writes", "inode-scheme"):
        assert sorted(seen.values()) == ["alone", "met"], seen
    else:
        assert seen == {"w0": "met", "w4096": "met"}
    assert f.read_bytes() == (b"MEET" + bytes(4092)) * 2
    probe.stop_probe()


@needs_fuse
@pytest.mark.parametrize("probe", ["pnova", "no-killpriv"], indirect=True)
def test_writes_do_not_ask_for_capabilities(probe: Probe) -> None:
    """HANDLE_KILLPRIV_V2: the kernel leaves privilege dropping to pnova and stops
    asking for security.capability before every write."""
    with open(probe.mnt / "f", "wb", buffering=0) as fh:
        for i in range(50):
            fh.write(b"%04d" % i * 1024)
    asked = probe.getxattr_names().count("security.capability")
    if probe.variant == "no-killpriv":
        assert asked >= 50
    else:
        assert asked <= 1
    probe.stop_probe()


# ---------------------------------------------------------------- privileges
NOBODY = 65534
# A VFS_CAP_REVISION_2 value with the effective flag: cap_net_raw permitted.
CAPS = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)

# (name, initial mode, the file's group, who acts, what it does)
_CASES = [
    ("user-write", 0o6777, 0, NOBODY, "write"),
    ("root-write", 0o6777, 0, 0, "write"),
    ("user-truncate", 0o6777, 0, NOBODY, "truncate"),
    ("root-truncate", 0o6777, 0, 0, "truncate"),
    ("user-open-trunc", 0o6777, 0, NOBODY, "open-trunc"),
    ("user-write-sgid-no-gx", 0o2767, 0, NOBODY, "write"),
    ("member-write-sgid-no-gx", 0o2767, NOBODY, NOBODY, "write"),
    ("root-chown", 0o6777, 0, 0, "chown"),
    ("root-chown-sgid-no-gx", 0o2767, 0, 0, "chown"),
    ("root-chmod", 0o6777, 0, 0, "chmod"),
]

# Ordinary tools (the second user cannot run this project's Python, under /root).
_ACT = {
    "write": 'printf changed | dd of="$1" conv=notrunc status=none',
    "truncate": 'truncate -s 3 "$1"',
    "open-trunc": ': > "$1"',
    "chown": 'chown 1000:1000 "$1"',
    "chmod": 'chmod 6775 "$1"',
}


def _run_cases(base: Path) -> dict[str, tuple[int, bool]]:
    """Each case on a fresh file in ``base``: the file's (mode, still has caps)."""
    out = {}
    for name, mode, group, who, what in _CASES:
        p = base / name
        p.write_bytes(b"original contents")
        os.chown(p, 0, group)
        os.chmod(p, mode)
        os.setxattr(p, "security.capability", CAPS)
        kw = {"user": who, "group": who, "extra_groups": []} if who else {}
        r = subprocess.run(["sh", "-c", _ACT[what], "sh", str(p)], capture_output=True,
                           text=True, timeout=WAIT, **kw)
        assert r.returncode == 0, (name, r.stderr)
        try:
            caps = os.getxattr(p, "security.capability") == CAPS
        except OSError as e:
            assert e.errno == errno.ENODATA
            caps = False
        out[name] = (stat.S_IMODE(os.stat(p).st_mode), caps)
    return out


@needs_fuse
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: setuid bits, capabilities and a "
                    "second user")
def test_privileges_dropped_exactly_as_on_tmpfs(image: str) -> None:
    """suid/sgid and security.capability after writes, truncates, open(O_TRUNC) and
    chown by a user and by root: the same through a pnova mount as on tmpfs."""
    # Directories the second user can reach (pytest's own are private to root).
    top = Path(tempfile.mkdtemp(prefix="pnova-privs-"))
    ref = Path(tempfile.mkdtemp(prefix="pnova-privs-", dir="/dev/shm"))
    m = Mount(image, top / "mnt")
    try:
        os.chmod(top, 0o755)
        os.chmod(ref, 0o755)
        m.start("-o", "allow_other")
        os.chmod(m.mnt, 0o755)
        got = _run_cases(m.mnt)
        want = _run_cases(ref)
        assert got == want
        # what Linux does, spelled out for the cases that matter most
        assert want["user-write"] == (0o0777, False)
        assert want["root-write"] == (0o6777, False)
        assert want["user-write-sgid-no-gx"] == (0o0767, False)     # not in the group
        assert want["member-write-sgid-no-gx"] == (0o2767, False)
        assert want["root-chown"] == (0o0777, False)
        m.stop()
    finally:
        m.cleanup()
        shutil.rmtree(top, ignore_errors=True)
        shutil.rmtree(ref, ignore_errors=True)


@needs_fuse
@pytest.mark.parametrize("path", ["io_uring", "devfuse"])
def test_debug_names_the_serving_process(tmp_path: Path, image: str, path: str) -> None:
    """pnova -d traces every request and reply, naming the process that served it."""
    if path == "io_uring":
        need_uring()
    m = Mount(image, tmp_path / "mnt", path)
    try:
        proc = m.start_foreground("-d", "-o", "workers=2")
        (m.mnt / "f").write_bytes(b"traced")
        assert (m.mnt / "f").read_bytes() == b"traced"
        m.stop()
        assert proc.wait(timeout=WAIT) == 0
        err = proc.stderr.read()
        proc.stderr.close()
        assert "FUSE protocol 7." in err and "handle_killpriv_v2" in err
        served = [line for line in err.splitlines() if " WRITE ino " in line]
        assert served and all("cpu0:" in line or "cpu1:" in line for line in served)
        assert any("-> ok" in line for line in err.splitlines())
    finally:
        m.cleanup()


@needs_fuse
def test_one_client_is_served_by_one_process(tmp_path: Path, image: str) -> None:
    """The kernel would hand a sequential client's requests to the serving processes
    in turn; the mount keeps the other processes asleep until requests overlap
    (pnova.daemon.Readers), so one process serves almost all of them.  Each
    process logs how many requests it served when the mount ends."""
    m = Mount(image, tmp_path / "mnt", "devfuse")
    try:
        m.start("-o", "workers=2")
        fd = os.open(m.mnt / "f", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            for i in range(2000):
                os.pwrite(fd, b"%04d" % i * 1024, 4096 * (i % 16))
        finally:
            os.close(fd)
        m.stop()
        served = _served_since(m.log, 0)
        assert set(served) == {"cpu0", "cpu1"}
        assert sum(served.values()) >= 2000
        assert max(served.values()) >= 0.95 * sum(served.values()), served
    finally:
        m.cleanup()


def _wakeups(pids: list[int]) -> int:
    """Context switches of these processes so far: each sleep and wake-up is one."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    total += int(line.split()[1])
    return total


def _runnable_share(pid: int, seconds: float) -> float:
    """The share of samples (every 5 ms for ``seconds``) in which process ``pid``
    was running or waiting to run, rather than asleep: a spinning process is
    runnable whether or not a busy machine gives it a CPU."""
    states = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        with open(f"/proc/{pid}/stat", "rb") as f:
            states.append(f.read().rpartition(b")")[2].split()[0])
        threading.Event().wait(0.005)
    return states.count(b"R") / len(states)


def _writing(paths: list[Path], seconds: float) -> threading.Thread:
    """Threads overwriting 4 KiB of each file in a loop for ``seconds``; returns a
    thread that ends with them."""
    def write(path: Path) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                os.pwrite(fd, b"k" * 4096, 0)
        finally:
            os.close(fd)
    threads = [threading.Thread(target=write, args=(p,)) for p in paths]
    for t in threads:
        t.start()

    def join() -> None:
        for t in threads:
            t.join()
    joiner = threading.Thread(target=join)
    joiner.start()
    return joiner


@needs_fuse
def test_the_keeper_spins_at_the_idle_class_only_for_a_lone_caller(
        tmp_path: Path, image: str) -> None:
    """With several serving processes, one more process (pnova-keep) keeps a
    caller's CPU busy while its requests come one at a time, so that a reply
    wakes the caller on a CPU that is running rather than halted (DESIGN 22.3):
    it runs at the idle scheduling class, spins (is runnable) while one caller
    writes, sleeps while two callers' requests overlap (every CPU has work
    then) and on an idle mount; `-o keeper=off` has none, and a keeper killed
    leaves the mount serving."""
    m = Mount(image, tmp_path / "mnt", "devfuse")
    try:
        m.start("-o", "workers=2")
        wait_for(lambda: "pnova-keep" in serving_processes(image), "the keeper")
        keeper = serving_processes(image)["pnova-keep"]
        wait_for(lambda: os.sched_getscheduler(keeper) == os.SCHED_IDLE, "the idle class")
        one = _writing([m.mnt / "f"], 1.5)
        threading.Event().wait(0.2)
        alone = _runnable_share(keeper, 1.0)
        one.join()
        two = _writing([m.mnt / "f", m.mnt / "g"], 1.5)
        threading.Event().wait(0.2)
        overlapping = _runnable_share(keeper, 1.0)
        two.join()
        threading.Event().wait(0.3)
        idle = _runnable_share(keeper, 0.5)
        assert alone >= 0.5, alone
        assert overlapping <= 0.2, overlapping
        assert idle <= 0.05, idle
        os.kill(keeper, 9)
        wait_for(lambda: "pnova-keep" not in serving_processes(image), "the keeper to die")
        (m.mnt / "h").write_bytes(b"still served")
        assert (m.mnt / "h").read_bytes() == b"still served"
        m.stop()
        m.start("-o", "workers=2,keeper=off")
        assert set(serving_processes(image)) == {"pnova", "pnova-cpu0", "pnova-cpu1"}
        assert (m.mnt / "f").read_bytes() == b"k" * 4096
        m.stop()
    finally:
        m.cleanup()


@needs_fuse
@pytest.mark.parametrize("path", ["io_uring", "devfuse"])
def test_an_idle_mount_sleeps(tmp_path: Path, image: str, path: str) -> None:
    """Nothing in the daemon polls: the supervisor waits for signals, its workers'
    exits and a ring running low; a serving process waits for requests (or, asleep,
    for a wake-up; through io_uring, in io_uring_enter).  A mount nobody uses
    wakes no process."""
    if path == "io_uring":
        need_uring()
    m = Mount(image, tmp_path / "mnt", path)
    try:
        m.start("-o", "workers=2")
        (m.mnt / "f").write_bytes(b"x" * 10000)
        assert (m.mnt / "f").read_bytes() == b"x" * 10000
        pids = daemon_pids(image)
        # the supervisor, two serving processes and (reading /dev/fuse) the keeper
        assert len(pids) == (3 if path == "io_uring" else 4)
        before = _wakeups(pids)
        threading.Event().wait(1.0)
        # (polling every few milliseconds, as the supervisor once did, is hundreds)
        assert _wakeups(pids) - before <= 5
        m.stop()
    finally:
        m.cleanup()


@needs_fuse
def test_overlapping_clients_keep_few_processes_reading(tmp_path: Path) -> None:
    """While two clients' O_DIRECT writes overlap, a serving process that finishes a
    request sleeps when two others already wait in read() (pnova.daemon.Readers,
    SPARE_READERS): the kernel hands each request to the reader that waited
    longest, so every extra reader spreads the requests over more processes, each
    with its cache behind the others' writes.  Sampled from /proc: processes
    blocked reading /dev/fuse (a third may slip in between a look and its count)."""
    from pnova.daemon import SPARE_READERS
    from pnova.mkfs import format_device

    image = str(tmp_path / "six.img")
    format_device(image, 64 << 20, numa_nodes=1, cpus_per_node=6)
    m = Mount(image, tmp_path / "mnt", "devfuse")
    try:
        m.start("-o", "workers=6")
        workers = [p for p in daemon_pids(image)
                   if open(f"/proc/{p}/comm").read().startswith("pnova-cpu")]
        assert len(workers) == 6
        f = m.mnt / "f"
        f.write_bytes(bytes(1 << 20))
        stop = threading.Event()

        def writer(off: int) -> None:
            buf = mmap.mmap(-1, 4096)
            fd = os.open(f, os.O_WRONLY | os.O_DIRECT)
            try:
                while not stop.is_set():
                    os.pwrite(fd, buf, off)
            finally:
                os.close(fd)
                buf.close()

        threads = [threading.Thread(target=writer, args=(off,)) for off in (0, 1 << 19)]
        for t in threads:
            t.start()
        reading = []
        try:
            for _ in range(1500):
                n = 0
                for p in workers:
                    with open(f"/proc/{p}/wchan") as w:
                        n += w.read() == "fuse_dev_do_read"
                reading.append(n)
        finally:
            stop.set()
            for t in threads:
                t.join()
        m.stop()
        served = [int(line.split(" after ")[1].split()[0]) for line in open(m.log)
                  if " after " in line and line.rstrip().endswith(" requests")]
        assert sum(1 for s in served if s >= 50) >= 2     # the requests did overlap
        # (every process reading, as before the cap: 4 to 6 in most samples)
        assert max(reading) <= SPARE_READERS + 1, reading
        assert sum(n <= SPARE_READERS for n in reading) >= 0.95 * len(reading)
    finally:
        m.cleanup()


def test_a_watch_tick_inside_the_last_ticks_handler_is_skipped() -> None:
    """The watch timer's SIGALRM can arrive while its handler for the tick before
    still runs (a loaded machine): the handler must not run again inside itself,
    whose poll() of the watch would raise "concurrent poll() invocation" into the
    request being served (it answered a WRITE with EIO)."""
    from pnova.daemon import Readers

    r = Readers(2)

    class Watch:
        """A poll object that, like select.poll, refuses a nested poll(), and
        delivers the next tick in the middle of the first."""
        inside = False

        def poll(self, _timeout: int) -> list:
            if self.inside:
                raise RuntimeError("concurrent poll() invocation")
            self.inside = True
            try:
                r._look(14, None)                # the next tick, inside this one
                return []
            finally:
                self.inside = False

    r.watch = Watch()
    r.serving = True
    r._look(14, None)                            # raised before the fix
    assert not r.looking


def test_looking_ahead_under_overlap_only_with_cpus_to_spare() -> None:
    """A serving process looks ahead for the next request (keeping its CPU busy)
    while one caller at a time sends requests; while requests overlap, only if the
    machine has two CPUs for every awake worker and two more: on two cores the
    callers need every CPU, on sixteen a looking worker takes the next request
    without the wake-up of a halted CPU (pnova.daemon.Readers.may_look)."""
    import time

    from pnova.daemon import Readers
    r = Readers(4)
    r.cpus = 16
    assert r.may_look()                          # nothing overlapped yet: sequential
    r.w.store64(r._OVERLAP, time.monotonic_ns())
    r.w.store32(r._READING, 1)
    r.w.store32(r._BUSY, 2)
    assert r.may_look()                          # 2 * (3 + 1) <= 16
    r.w.store32(r._READING, 2)
    r.w.store32(r._BUSY, 5)
    assert r.may_look()                          # 2 * (7 + 1) <= 16, just
    r.w.store32(r._BUSY, 6)
    assert not r.may_look()                      # eight awake: none to spare
    r.cpus = 2
    r.w.store32(r._READING, 1)
    r.w.store32(r._BUSY, 0)
    assert not r.may_look()                      # two cores: never while overlapping


# ---------------------------------------------------------------- FUSE over io_uring
def _served_since(log: str, start: int) -> dict[str, int]:
    """Requests each serving process logged having served, for the mounts whose
    log begins at byte ``start``."""
    served: dict[str, int] = {}
    with open(log) as f:
        f.seek(start)
        for line in f:
            if " after " in line and line.rstrip().endswith(" requests"):
                cpu = line.split(": ")[1].split()[0]
                served[cpu] = served.get(cpu, 0) + int(line.split(" after ")[1].split()[0])
    return served


def _log_size(log: str) -> int:
    try:
        return os.path.getsize(log)
    except FileNotFoundError:
        return 0


@needs_fuse
def test_through_io_uring_a_request_is_served_on_its_callers_cpu(tmp_path: Path,
                                                                 image: str) -> None:
    """Through FUSE over io_uring the kernel puts a request on the queue of the CPU
    its caller runs on, and each queue is served by one process pinned to that
    CPU (DESIGN 22.8): a caller kept on CPU 0 is served by the process pinned
    there, one kept on CPU 1 by the other, and the data is there either way."""
    from pnova.daemon import assign_queues
    from pnova.fuse_session import possible_cpus
    need_uring()
    mine = os.sched_getaffinity(0)
    if not {0, 1} <= mine:
        pytest.skip("needs CPUs 0 and 1")
    pins = [set(q) & mine for q in assign_queues(possible_cpus(), 2, mine)]
    m = Mount(image, tmp_path / "mnt", "io_uring")
    try:
        for cpu in (0, 1):
            start = _log_size(m.log)
            m.start("-o", "workers=2")

            def pinned() -> bool:
                procs = serving_processes(image)
                try:
                    return all(os.sched_getaffinity(procs[f"pnova-cpu{k}"]) == pins[k]
                               for k in (0, 1))
                except (KeyError, OSError):
                    return False
            wait_for(pinned, "the serving processes to pin themselves")
            server = next(f"cpu{k}" for k in (0, 1) if cpu in pins[k])
            os.sched_setaffinity(0, {cpu})
            try:
                d = m.mnt / f"from{cpu}"
                d.mkdir()
                for i in range(200):
                    (d / f"f{i}").write_bytes(b"%d" % i)
                fd = os.open(d / "f0", os.O_WRONLY)
                try:
                    for i in range(600):
                        os.pwrite(fd, b"w" * 4096, 4096 * (i % 8))
                finally:
                    os.close(fd)
            finally:
                os.sched_setaffinity(0, mine)
            m.stop()
            served = _served_since(m.log, start)
            other = "cpu1" if server == "cpu0" else "cpu0"
            assert served[server] >= 1000, served
            assert served[other] <= 0.05 * served[server], served
        m.start()
        for cpu in (0, 1):
            assert sorted(os.listdir(m.mnt / f"from{cpu}")) == sorted(
                f"f{i}" for i in range(200))
            assert (m.mnt / f"from{cpu}" / "f7").read_bytes() == b"7"
            assert (m.mnt / f"from{cpu}" / "f0").read_bytes() == b"w" * 4096 * 8
        m.stop()
    finally:
        m.cleanup()


@needs_fuse
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch FUSE over io_uring")
def test_io_uring_option_auto_on_off(tmp_path: Path, image: str) -> None:
    """io_uring=auto (the default) takes requests through io_uring where the kernel
    offers it and reads /dev/fuse where it does not; io_uring=off never asks for
    it; io_uring=on refuses to mount without it, in one line that says how to
    switch it on, and leaves nothing mounted."""
    from pnova.fuse_session import URING_PARAMETER
    if not os.path.exists(URING_PARAMETER):
        pytest.skip("this kernel has no FUSE over io_uring")
    with open(URING_PARAMETER) as f:
        before = f.read().strip()
    said = "requests come through io_uring"

    def mount_says(*opts: str) -> bool:
        start = _log_size(m.log)
        m.start(*opts)
        (m.mnt / "f").write_bytes(b"data")
        assert (m.mnt / "f").read_bytes() == b"data"
        m.stop()
        with open(m.log) as f:
            f.seek(start)
            return said in f.read()

    def switch(value: str) -> None:
        with open(URING_PARAMETER, "w") as f:
            f.write(value)

    m = Mount(image, tmp_path / "mnt")
    try:
        switch("Y")
        assert mount_says()
        assert mount_says("-o", "io_uring=auto")
        assert not mount_says("-o", "io_uring=off")
        switch("N")
        assert not mount_says()
        r = m.run("-o", "io_uring=on")
        assert r.returncode != 0
        assert "enable_uring" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not os.path.ismount(m.mnt)
        r = m.run("-o", "io_uring=sometimes")
        assert r.returncode == 1 and "io_uring=sometimes: give auto, on or off" in r.stderr
    finally:
        switch(before)
        m.cleanup()


def test_a_refused_ring_falls_back_to_reading_the_descriptor(
        image: str, caplog: pytest.LogCaptureFixture) -> None:
    """A serving process whose io_uring entries the kernel refuses (here: the
    descriptor is no FUSE connection at all) says so in one warning and serves by
    reading the descriptor, unpinned, with its landing for large writes kept."""
    from pnova.daemon import _uring_loop
    from pnova.engine import FileSystem
    from pnova.fuse_ops import PnovaOperations
    from pnova.fuse_session import Connection, Loop, UringLoop

    fs = FileSystem.mount(image)
    rd, wr = os.pipe()
    mine = os.sched_getaffinity(0)
    try:
        for cpu in (0, 1):
            ops = PnovaOperations(fs)
            landing = ops.landing
            with caplog.at_level(logging.WARNING, logger="pnova.daemon"):
                loop = _uring_loop(fs, Connection(rd, "/nowhere"), cpu, ops, [cpu], False)
            assert type(loop) is Loop and not isinstance(loop, UringLoop)
            assert loop.landing is landing is not None
            assert os.sched_getaffinity(0) == mine
            assert f"cpu{cpu}: the kernel refused FUSE over io_uring" in caplog.text
            # worker 0's second descriptor of a pipe cannot be made; worker 1's
            # REGISTER command goes to a file that takes none
            why = os.strerror(errno.EINVAL if cpu == 0 else errno.EOPNOTSUPP)
            assert f"({why})" in caplog.text, caplog.text
            caplog.clear()
    finally:
        os.sched_setaffinity(0, mine)
        os.close(rd)
        os.close(wr)
        fs.unmount()


def test_queues_go_to_the_cpus_the_daemon_may_use_first() -> None:
    """Each serving process gets io_uring queues of CPUs it may run on, in turn,
    before any it may not (it is pinned to the former)."""
    from pnova.daemon import assign_queues
    assert assign_queues(2, 2, {0, 1}) == [[0], [1]]
    assert assign_queues(2, 1, {0, 1}) == [[0, 1]]
    assert assign_queues(4, 2, {0, 1, 2, 3}) == [[0, 2], [1, 3]]
    assert assign_queues(4, 2, {1, 3}) == [[1, 0], [3, 2]]
    assert assign_queues(3, 2, {2}) == [[2, 1], [0]]


def test_the_io_uring_helper() -> None:
    """pnova._uring.Ring: a poll completes when its descriptor is readable; a
    command the file does not take completes with a negative errno; a signal
    during a wait runs its handler, whose exception comes out of the wait; a
    closed ring refuses further use."""
    from pnova._uring import Ring
    try:
        ring = Ring(8)
    except OSError as e:
        pytest.skip(f"io_uring cannot be set up here: {e.strerror}")
    rd, wr = os.pipe()
    old = signal.getsignal(signal.SIGALRM)
    try:
        assert ring.fileno() >= 0
        ring.poll(rd, select.POLLIN, 7)
        assert ring.enter(False) == []
        os.write(wr, b"x")
        got = ring.enter(True)
        assert len(got) == 1 and got[0][0] == 7 and got[0][1] & select.POLLIN
        ring.cmd(rd, 1, bytes(24), 0, 0, 9)      # a pipe takes no io_uring command
        (ud, res), = ring.enter(True)
        assert ud == 9 and res < 0
        with pytest.raises(ValueError):
            ring.cmd(rd, 1, bytes(81), 0, 0, 1)

        class Woken(Exception):
            pass

        def alarm(*_):
            raise Woken()
        signal.signal(signal.SIGALRM, alarm)
        ring.poll(rd, select.POLLPRI, 8)         # never completes
        assert ring.enter(False) == []           # submitted: the wait below submits nothing
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with pytest.raises(Woken):               # raised by the handler inside the wait
            ring.enter(True)
        signal.signal(signal.SIGALRM, lambda *_: None)
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        assert ring.enter(True) == []            # a handler that returns: nothing came
        ring.close()
        assert ring.fileno() == -1
        with pytest.raises(ValueError):
            ring.enter(False)
        with pytest.raises(ValueError):
            ring.poll(rd, select.POLLIN, 1)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        ring.close()
        os.close(rd)
        os.close(wr)
