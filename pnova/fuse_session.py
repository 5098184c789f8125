"""The kernel connection: mounting, the INIT handshake, the request loop, unmounting.

A :class:`Connection` is one open ``/dev/fuse`` bound to one mount point.  As
root it is mounted with mount(2) directly; otherwise ``fusermount3`` (the
setuid helper of the fuse3 package) mounts it and hands the descriptor back over
a socket, which is what libfuse does too.  :meth:`Connection.negotiate` answers
the kernel's INIT, asking for the capabilities pnova relies on (DESIGN 22.2).

:func:`serve` is the request loop of one serving process: a blocking read of
one request, a call of the handler its opcode names, one reply.  Several
processes may run it on the same descriptor: the kernel wakes exactly one
reader per request.  Handlers are synchronous, so nothing but the read ever
waits.  A handler reports failure by raising :class:`~pnova.errors.FsError`;
any other exception is logged with its traceback and answered with EIO, so no
request can end the loop.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import mmap
import os
import re
import select
import shutil
import signal
import socket
import stat
import struct
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from . import fuse_wire as W
from .errors import FsError

if TYPE_CHECKING:
    from .file import Landing

log = logging.getLogger("pnova.fuse")

# How long a serving process looks for its caller's next request before it
# blocks in read() (DESIGN 22.4).
SPIN_NS = 100_000
MAX_WRITE = 1 << 20               # bytes per WRITE request (256 pages)
BUFFER_SIZE = MAX_WRITE + 4096    # a WRITE's data plus its headers fits

# What pnova asks the kernel for (each is explained in DESIGN 22.2).
WANTED = (W.ASYNC_READ | W.ATOMIC_O_TRUNC | W.EXPORT_SUPPORT | W.BIG_WRITES
          | W.AUTO_INVAL_DATA | W.DO_READDIRPLUS | W.ASYNC_DIO | W.PARALLEL_DIROPS
          | W.MAX_PAGES | W.CACHE_SYMLINKS | W.HANDLE_KILLPRIV_V2 | W.DIRECT_IO_ALLOW_MMAP)

# mount(2) flags for the VFS options a user may give
_MS = {"ro": 1, "nosuid": 2, "nodev": 4, "noexec": 8, "sync": 16, "dirsync": 128,
       "noatime": 1024, "nodiratime": 2048, "relatime": 1 << 21, "strictatime": 1 << 24}
_MS_UNSET = {"rw": "ro", "suid": "nosuid", "dev": "nodev", "exec": "noexec",
             "async": "sync", "atime": "noatime", "diratime": "nodiratime"}
_MNT_DETACH = 2
# Options that go into mount(2)'s data string, as the kernel's FUSE takes them.
_KERNEL_OPTS = ("default_permissions", "allow_other")

# handler(inode, request body, caller's uid, gid, pid) -> reply payload or None
Handler = Callable[[int, memoryview, int, int, int], "bytes | bytearray | memoryview | None"]


class MountError(Exception):
    """The kernel mount failed; the message is one line for the user."""


class ProtocolError(Exception):
    """The kernel spoke a protocol pnova cannot serve."""


@dataclass
class Negotiated:
    """What the INIT handshake settled."""
    minor: int
    flags: int
    max_readahead: int

    def names(self) -> list[str]:
        return [n for f, n in sorted(W.INIT_FLAG_NAMES.items()) if self.flags & f]


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _escape(value: str) -> str:
    """fusermount3's -o parser splits at commas: escape them (and backslashes)."""
    return value.replace("\\", "\\\\").replace(",", "\\,")


class Connection:
    """One kernel FUSE connection, mounted on ``mountpoint``."""

    def __init__(self, fd: int, mountpoint: str) -> None:
        self.fd = fd
        self.mountpoint = mountpoint
        self.negotiated: Negotiated | None = None

    # ---------------------------------------------------------------- mount
    @classmethod
    def mount(cls, mountpoint: str, options: Sequence[str], *, fsname: str,
              subtype: str = "pnova") -> "Connection":
        """Mount a new FUSE filesystem on ``mountpoint``.

        ``options`` are VFS flags (ro, nosuid, noatime, ...) and kernel FUSE
        options (default_permissions, allow_other).  nosuid and nodev are on
        unless suid / dev is given, as with libfuse.  Raises MountError.
        """
        try:
            st = os.stat(mountpoint)
        except OSError as e:
            raise MountError(f"{mountpoint}: {e.strerror}") from None
        opts = ["nosuid", "nodev"]
        for o in options:
            if o in _MS_UNSET:
                opts = [x for x in opts if x != _MS_UNSET[o]]
            elif o not in opts:
                opts.append(o)
        if os.geteuid() == 0:
            return cls._mount_direct(mountpoint, opts, fsname, subtype, st.st_mode)
        return cls._mount_fusermount(mountpoint, opts, fsname, subtype)

    @classmethod
    def _mount_direct(cls, mountpoint: str, opts: list[str], fsname: str, subtype: str,
                      mode: int) -> "Connection":
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        flags = 0
        data = [f"fd={fd}", f"rootmode={stat.S_IFMT(mode):o}",
                f"user_id={os.getuid()}", f"group_id={os.getgid()}"]
        for o in opts:
            if o in _MS:
                flags |= _MS[o]
            elif o in _KERNEL_OPTS:
                data.append(o)
            else:
                os.close(fd)
                raise MountError(f"mount option {o!r} is not supported")
        libc = _libc()
        if libc.mount(os.fsencode(fsname), os.fsencode(mountpoint),
                      f"fuse.{subtype}".encode(), ctypes.c_ulong(flags),
                      ",".join(data).encode()) != 0:
            err = ctypes.get_errno()
            os.close(fd)
            raise MountError(f"mount(2) on {mountpoint}: {os.strerror(err)}")
        return cls(fd, mountpoint)

    @classmethod
    def _mount_fusermount(cls, mountpoint: str, opts: list[str], fsname: str,
                          subtype: str) -> "Connection":
        helper = shutil.which("fusermount3")
        if helper is None:
            raise MountError("fusermount3 not found (install the Debian package fuse3)")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            env = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()))
            arg = ",".join(opts + [f"fsname={_escape(fsname)}", f"subtype={subtype}"])
            proc = subprocess.run([helper, "-o", arg, "--", mountpoint], env=env,
                                  pass_fds=(theirs.fileno(),), capture_output=True,
                                  text=True)
            theirs.close()
            if proc.returncode != 0:
                why = proc.stderr.strip().splitlines()
                raise MountError(why[-1] if why else f"fusermount3 exited with "
                                 f"{proc.returncode}")
            _msg, fds, _flags, _addr = socket.recv_fds(ours, 1, 1)
            if not fds:
                raise MountError("fusermount3 did not pass the FUSE descriptor")
            os.set_inheritable(fds[0], False)
            return cls(fds[0], mountpoint)
        finally:
            ours.close()
            if theirs.fileno() >= 0:
                theirs.close()

    # ---------------------------------------------------------------- INIT
    def negotiate(self, wanted: int = WANTED) -> Negotiated:
        """Read the kernel's INIT request and answer it; return what was agreed."""
        buf = bytearray(BUFFER_SIZE)
        while True:
            try:
                n = os.readv(self.fd, [buf])
            except OSError as e:
                if e.errno == errno.ENOENT:        # interrupted before we read it
                    continue
                raise
            if n >= W.IN_HEADER_SIZE:
                break
        length, op, unique, *_ = W.IN_HEADER.unpack_from(buf)
        if op != W.INIT:
            raise ProtocolError(f"the kernel's first request is opcode {op}, not INIT")
        major, minor, readahead, kflags, kflags2 = W.INIT_IN.unpack_from(buf, W.IN_HEADER_SIZE)
        if major != W.KERNEL_MAJOR or minor < W.MIN_MINOR:
            self._reply(unique, -errno.EPROTO)
            raise ProtocolError(f"kernel FUSE protocol {major}.{minor} is not supported "
                                f"(pnova needs 7.{W.MIN_MINOR} or later)")
        if kflags & W.INIT_EXT:
            kflags |= kflags2 << 32
        flags = wanted & kflags
        if flags >> 32:
            flags |= W.INIT_EXT
        out = W.INIT_OUT.pack(W.KERNEL_MAJOR, min(minor, W.KERNEL_MINOR), readahead,
                              flags & 0xFFFFFFFF, 64, 48, MAX_WRITE, 1, MAX_WRITE // 4096, 0,
                              flags >> 32)
        self._reply(unique, 0, out)
        self.negotiated = Negotiated(min(minor, W.KERNEL_MINOR), flags, readahead)
        return self.negotiated

    def _reply(self, unique: int, error: int, payload: bytes = b"") -> None:
        os.write(self.fd, W.OUT_HEADER.pack(W.OUT_HEADER_SIZE + len(payload), error, unique)
                 + payload)

    def close(self) -> None:
        """Close this process's descriptor; the connection ends (and every
        request still waiting fails with ENOTCONN) once every process has."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def unmount(mountpoint: str) -> None:
    """Unmount ``mountpoint`` now, as ``umount``/``fusermount3 -u`` would: umount2 as
    root (no helper needed), else fusermount3.  Raises OSError with the reason."""
    if os.geteuid() == 0:
        if _libc().umount2(os.fsencode(mountpoint), 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"unmounting {mountpoint}: {os.strerror(err)}")
        return
    helper = shutil.which("fusermount3")
    if helper is None:
        raise OSError(errno.ENOENT, "fusermount3 not found (install the Debian package fuse3)")
    r = subprocess.run([helper, "-u", "--", mountpoint], capture_output=True, text=True)
    if r.returncode != 0:
        raise OSError(errno.EBUSY, f"fusermount3 -u failed: {r.stderr.strip()}")


def detach(mountpoint: str) -> bool:
    """Lazy unmount of ``mountpoint`` (files still open keep the connection until
    they are closed): umount2(MNT_DETACH) as root, else fusermount3.  False if
    nothing was mounted there."""
    if os.geteuid() == 0:
        libc = _libc()
        if libc.umount2(os.fsencode(mountpoint), _MNT_DETACH) == 0:
            return True
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):
            log.warning("unmounting %s: %s", mountpoint, os.strerror(err))
        return False
    helper = shutil.which("fusermount3")
    if helper is None:
        return False
    r = subprocess.run([helper, "-u", "-q", "-z", "--", mountpoint], capture_output=True)
    return r.returncode == 0


def _unescape(field: str) -> str:
    """A /proc/self/mountinfo field with its octal escapes (space, tab, ...) undone."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounted_source(mountpoint: str) -> tuple[str, str] | None:
    """(filesystem type, source) of what is mounted on ``mountpoint`` (the top
    mount), from /proc/self/mountinfo; None if nothing is."""
    want = os.path.realpath(mountpoint)          # non-strict: a dead mount is fine
    found = None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                if _unescape(left.split()[4]) == want:
                    fstype, source = right.split()[:2]
                    found = (fstype, _unescape(source))
    except OSError:
        return None
    return found


# ---------------------------------------------------------------- the loop
class Stop(Exception):
    """Raised by a stop request (a signal) while the loop waits for a request."""


_unpack_in = W.IN_HEADER.unpack_from
_pack_out = W.OUT_HEADER.pack
_op_of = struct.Struct("<4xI").unpack_from
# A write's headers: read into the buffer when the data goes to a landing
_HEAD = W.IN_HEADER_SIZE + W.WRITE_IN_SIZE


class Turns(Protocol):
    """Which of several processes reading one connection waits for the next
    request (see :class:`pnova.daemon.Readers`)."""

    def reading(self) -> None: ...        # before a read (may sleep until needed)
    def read_done(self) -> None: ...      # the read returned or failed
    def started(self, request: memoryview) -> None: ...   # this request is being served
    def finished(self) -> None: ...       # ... and answered
    def may_look(self) -> bool: ...       # looking ahead for the next request pays


class Loop:
    """The request loop of one serving process.

    ``handlers`` is indexed by opcode; a handler returns the reply's payload
    (bytes-like, possibly empty) or None when the request takes no reply
    (FORGET, INTERRUPT).  ``name`` labels the process in debug output.
    ``turns``, when several processes serve, decides when this one reads.

    A caller that issues its requests one after another sends the next one a
    few tens of microseconds after it gets its reply.  Blocking in read() for
    it puts this CPU to sleep and the next request pays the wake-up, and the
    interpreter's caches go cold meanwhile.  So when the last request came
    within ``spin_ns`` of the reply before it, and requests come from one
    caller at a time, the loop first looks (poll with no timeout) for up to
    ``spin_ns`` before it blocks; a caller that thinks longer stops the
    looking at once.  With one usable CPU it never looks: the caller needs
    that CPU to send anything.
    """

    def __init__(self, fd: int, handlers: Sequence[Handler | None], *, name: str = "",
                 debug: bool = False, turns: Turns | None = None,
                 spin_ns: int = SPIN_NS, landing: Landing | None = None) -> None:
        self.fd = fd
        self.landing = landing
        self.spin_ns = spin_ns if len(os.sched_getaffinity(0)) > 1 else 0
        self.turns = turns
        self.handlers = list(handlers) + [None] * max(0, 64 - len(handlers))
        self.name = name
        self.debug = debug
        self.waiting = False          # blocked reading: a stop may interrupt at once
        self.stopping = False
        self.served = 0

    def request_stop(self, *_args: object) -> None:
        """Signal handler: stop before the next request (at once if waiting for one)."""
        self.stopping = True
        if self.waiting:
            raise Stop()

    def run(self) -> str:
        """Serve until the connection ends ('unmounted') or a stop ('stopped')."""
        fd = self.fd
        buf = bytearray(BUFFER_SIZE)
        bufs = [buf]
        mv = memoryview(buf)
        readv = os.readv
        turns = self.turns
        spin_ns = self.spin_ns
        queue = select.poll()
        queue.register(fd, select.POLLIN)
        look = queue.poll
        clock = time.monotonic_ns
        spin = False                            # the caller answered quickly last time
        replied = 0
        landing = self.landing
        head = mv[:_HEAD]
        landed = False                          # this read went into the landing's blocks

        def read() -> int:
            nonlocal landed, landing
            try:
                landed = landing is not None and landing.ready()
            except Exception:                   # a bug: go on without the landing
                log.exception("%s: reserving blocks for the next request failed; large "
                              "writes are copied from now on", self.name)
                landed, landing = False, None
            if landed:
                return landing.receive(fd, head, mv[_HEAD + landing.nbytes:])
            return readv(fd, bufs)

        while True:
            if self.stopping:
                return "stopped"
            self.waiting = True
            try:
                if turns is not None:
                    turns.reading()
                    try:
                        if spin and turns.may_look():
                            end = clock() + spin_ns
                            while not look(0) and clock() < end:
                                pass
                        n = read()
                    finally:
                        turns.read_done()
                else:
                    if spin:
                        end = clock() + spin_ns
                        while not look(0) and clock() < end:
                            pass
                    n = read()
                if n == 0:                      # not /dev/fuse: the peer went away
                    return "unmounted"
            except Stop:
                return "stopped"
            except OSError as e:
                if e.errno == errno.ENOENT:     # the request was interrupted meanwhile
                    continue
                if e.errno in (errno.ENODEV, errno.ECONNABORTED):
                    return "unmounted"
                raise
            finally:
                self.waiting = False
            if spin_ns:
                spin = clock() - replied < spin_ns
            req = mv
            if landed:
                is_write = _op_of(mv)[0] == W.WRITE
                if is_write and _HEAD < n <= _HEAD + landing.nbytes:
                    # the data stays in the blocks; the handler sees the headers
                    req = head
                else:
                    try:
                        if n > _HEAD:           # make the request whole in the buffer
                            landing.copy_to(mv[_HEAD:], n - _HEAD)
                        if not is_write:        # the stream of writes has ended
                            landing.end()
                    except Exception:           # a bug: this request is lost, not the mount
                        log.exception("%s: a request read into the landing could not be "
                                      "made whole; answering EIO", self.name)
                        landing = None
                        self._send([_pack_out(W.OUT_HEADER_SIZE, -errno.EIO,
                                              _unpack_in(mv)[2])], 0, errno.EIO)
                        continue
            if turns is not None:
                turns.started(mv)
                try:
                    reply = self._answer(req)
                finally:
                    # before the reply goes out: a sequential caller's next
                    # request then never looks like one overlapping this one
                    turns.finished()
            else:
                reply = self._answer(req)
            if reply is not None:
                self._send(*reply)
            replied = clock()

    def _answer(self, mv: memoryview) -> tuple[list, int, int] | None:
        """The reply to the request in the buffer: (parts, unique, errno), or None
        for a request that takes none."""
        length, op, unique, nodeid, uid, gid, pid, _x, _p = _unpack_in(mv)
        handler = self.handlers[op] if op < 64 else None
        if self.debug:
            log.debug("%s: #%d %s ino %d uid %d pid %d (%d bytes)", self.name, unique,
                      W.OPCODE_NAMES.get(op, op), nodeid, uid, pid, length)
        if handler is None:
            if op == W.INTERRUPT:
                return None
            return [_pack_out(W.OUT_HEADER_SIZE, -errno.ENOSYS, unique)], unique, errno.ENOSYS
        try:
            out = handler(nodeid, mv[W.IN_HEADER_SIZE:length], uid, gid, pid)
        except FsError as e:
            return [_pack_out(W.OUT_HEADER_SIZE, -e.errno, unique)], unique, e.errno
        except Exception:
            log.exception("%s: internal error in %s (ino %d); answering EIO", self.name,
                          W.OPCODE_NAMES.get(op, op), nodeid)
            return [_pack_out(W.OUT_HEADER_SIZE, -errno.EIO, unique)], unique, errno.EIO
        self.served += 1
        if out is None:
            return None
        return [_pack_out(W.OUT_HEADER_SIZE + len(out), 0, unique), out], unique, 0

    def _send(self, parts: list, unique: int, error: int, fd: int = -1) -> None:
        """Write a reply (``error``: its errno, 0 for success) to the loop's
        descriptor, or to ``fd``."""
        if self.debug:
            # before the reply, so that tracing does not keep the process busy
            # while the caller goes on
            log.debug("%s: #%d -> %s", self.name, unique,
                      "ok" if error == 0 else errno.errorcode.get(error, error))
        try:
            os.writev(self.fd if fd < 0 else fd, parts)
        except OSError as e:
            # ENOENT: the kernel no longer waits for this request (interrupted,
            # or the connection is being torn down); nothing to do.
            if e.errno not in (errno.ENOENT, errno.ENODEV):
                log.error("%s: reply to #%d failed: %s", self.name, unique, e.strerror)


# ---------------------------------------------------------------- io_uring
URING_PARAMETER = "/sys/module/fuse/parameters/enable_uring"
_POLL = 1 << 62                 # user_data of the classic descriptor's poll
_ROOM = 4096                    # before an entry's payload: the request's headers
# An entry's payload buffer: the kernel wants room for its largest request,
# max(8 KiB, max_write, max_pages x its page size); the INIT reply sets
# max_pages to MAX_WRITE / 4 KiB, and a page may be larger than 4 KiB.
URING_PAYLOAD = max(BUFFER_SIZE, (MAX_WRITE // 4096) * mmap.PAGESIZE + 4096)


def uring_offered() -> bool:
    """Whether this kernel lets FUSE requests come through io_uring: built with
    it, and switched on (``enable_uring``, which only root can set)."""
    try:
        with open(URING_PARAMETER, encoding="ascii") as f:
            return f.read().strip() in ("Y", "1")
    except OSError:
        return False


def possible_cpus() -> int:
    """How many CPUs the kernel may ever run (its ``num_possible_cpus``): FUSE
    over io_uring keeps one request queue for each."""
    try:
        with open("/sys/devices/system/cpu/possible", encoding="ascii") as f:
            text = f.read().strip()
    except OSError:
        return os.cpu_count() or 1
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return n


class UringUnavailable(Exception):
    """The kernel refused to take this process's io_uring entries."""


class UringLoop(Loop):
    """The request loop of a serving process that takes requests from the
    kernel's per-CPU queues of FUSE over io_uring (DESIGN 22.8).

    ``queues`` are the queues (CPU numbers) this process serves; the kernel
    puts a request on the queue of the CPU its caller runs on, so a process
    pinned to that CPU serves it there, and a reply and the fetch of the
    next request are one system call.  ``classic``: this process also reads
    the descriptor itself, for what never comes through io_uring (FORGET,
    INTERRUPT) and everything until every queue has an entry: ``classic`` is
    then a non-blocking clone of the descriptor (:func:`clone_nonblocking`),
    else -1.

    Each entry has its own buffer: the 288-byte header area the kernel fills,
    then ``_ROOM`` bytes where the request's headers are copied to sit right
    before the payload, then the payload; the handlers so see the request as
    one contiguous buffer, as a read() of the descriptor gives it.
    """

    def __init__(self, fd: int, handlers: Sequence[Handler | None], queues: Sequence[int],
                 *, classic: int = -1, name: str = "", debug: bool = False) -> None:
        super().__init__(fd, handlers, name=name, debug=debug)
        from ._uring import Ring                 # (compiled; only this loop needs it)
        self.queues = list(queues)
        self.classic = classic
        self.first: list[tuple[int, int]] = []
        self.classic_buf: bytearray | None = None
        self.ring = Ring(max(8, 4 * len(self.queues) + 4))
        size = W.URING_HEADER_SIZE + _ROOM + URING_PAYLOAD
        self.areas = [mmap.mmap(-1, size) for _ in self.queues]
        self.views = [memoryview(a) for a in self.areas]
        # iovec pairs (header, payload) the REGISTER commands point at
        self.iovecs = []
        for area in self.areas:
            base = ctypes.addressof(ctypes.c_char.from_buffer(area))
            self.iovecs.append((ctypes.c_uint64 * 4)(
                base, W.URING_HEADER_SIZE,
                base + W.URING_HEADER_SIZE + _ROOM, URING_PAYLOAD))

    def register(self) -> list[tuple[int, int]]:
        """Give the kernel one entry for each of this process's queues; returns
        the completions already there.  Raises UringUnavailable if the kernel
        refuses one; the ring is then closed, which gives back any entry it took
        (the kernel offers none of them requests: until every queue has an entry
        everything comes through the descriptor)."""
        ring = self.ring
        for i, qid in enumerate(self.queues):
            ring.cmd(self.fd, W.URING_CMD_REGISTER, W.URING_CMD.pack(0, 0, qid),
                     ctypes.addressof(self.iovecs[i]), 2, i)
        if self.classic >= 0:
            ring.poll(self.classic, select.POLLIN, _POLL)
        # A refusal completes at once; an accepted entry completes with a request.
        done = ring.enter(False)
        for ud, res in done:
            if ud != _POLL and res < 0:
                ring.close()
                raise UringUnavailable(os.strerror(-res))
        return done

    def request_stop(self, *_args: object) -> None:
        """Signal handler: stop once the requests in hand are answered.  It never
        raises into the loop: completions already taken from the ring would be
        lost with it, and their callers left waiting for the connection's end."""
        self.stopping = True

    def run(self) -> str:
        """Serve until the connection ends ('unmounted') or a stop ('stopped').
        :meth:`register` must have been called."""
        ring = self.ring
        done, self.first = self.first, []
        while True:
            if done and self._serve(done):
                return "unmounted"
            if self.stopping:
                # The answers queued in the ring go to the kernel.  Without a
                # wait the kernel hands out no new request (DEFER_TASKRUN), so
                # what completes here is only a poll or an ended entry.
                for _ in range(16):
                    done = ring.enter(False)
                    if not done:
                        break
                    if self._serve(done):
                        return "unmounted"
                ring.enter(False)
                return "stopped"
            # a stop signal during the wait: EINTR, its handler runs, and this
            # returns what completed (possibly nothing)
            done = ring.enter(True)

    def _serve(self, done: list[tuple[int, int]]) -> bool:
        """Answer the requests that completed (``done``: (user data, result));
        each answer is queued in the ring, and goes with the next enter.  True
        if the connection has ended."""
        views = self.views
        head_at = W.URING_HEADER_SIZE + _ROOM
        for ud, res in done:
            if ud == _POLL:
                if self._classic(res):
                    return True
                self.ring.poll(self.classic, select.POLLIN, _POLL)
                continue
            if res < 0:
                # the connection ended: every entry is given back
                if res in (-errno.ENOTCONN, -errno.ECONNABORTED, -errno.ECANCELED):
                    return True
                raise OSError(-res, f"io_uring entry {ud}: {os.strerror(-res)}")
            v = views[ud]
            length = _unpack_in(v)[0]
            _flags, commit_id, psz = W.URING_ENT.unpack_from(v, W.URING_ENT_IN_OUT)
            h = length - W.IN_HEADER_SIZE - psz          # the opcode's header
            if not 0 <= h <= W.URING_OP_IN or psz > URING_PAYLOAD:
                log.error("%s: an io_uring request of %d bytes with a %d-byte payload "
                          "does not add up; answering EIO", self.name, length, psz)
                reply = [_pack_out(W.OUT_HEADER_SIZE, -errno.EIO, commit_id)], commit_id, \
                    errno.EIO
            else:
                start = head_at - h - W.IN_HEADER_SIZE
                v[start:start + W.IN_HEADER_SIZE] = v[:W.IN_HEADER_SIZE]
                v[head_at - h:head_at] = v[W.URING_OP_IN:W.URING_OP_IN + h]
                reply = self._answer(v[start:start + length])
            psz = 0
            if reply is None:                 # (no such request comes this way)
                v[:W.OUT_HEADER_SIZE] = _pack_out(W.OUT_HEADER_SIZE, 0, commit_id)
            else:
                parts, unique, error = reply
                if self.debug:
                    log.debug("%s: #%d -> %s", self.name, unique,
                              "ok" if error == 0 else errno.errorcode.get(error, error))
                v[:W.OUT_HEADER_SIZE] = parts[0]
                for part in parts[1:]:
                    n = len(part)
                    v[head_at + psz:head_at + psz + n] = part
                    psz += n
            v[W.URING_PAYLOAD_SZ:W.URING_PAYLOAD_SZ + 4] = psz.to_bytes(4, "little")
            self.ring.cmd(self.fd, W.URING_CMD_COMMIT_AND_FETCH,
                          W.URING_CMD.pack(0, commit_id, self.queues[ud]), 0, 0, ud)
        return False

    def _classic(self, res: int) -> bool:
        """Serve what waits on the descriptor itself (it is non-blocking);
        True if the connection has ended."""
        if res < 0 or res & (select.POLLERR | select.POLLHUP):
            return True
        if self.classic_buf is None:
            self.classic_buf = bytearray(BUFFER_SIZE)
        buf = self.classic_buf
        mv = memoryview(buf)
        fd = self.classic
        while True:
            try:
                n = os.readv(fd, [buf])
            except BlockingIOError:
                return False
            except OSError as e:
                if e.errno == errno.ENOENT:
                    continue
                if e.errno in (errno.ENODEV, errno.ECONNABORTED):
                    return True
                raise
            if n == 0:
                return True
            reply = self._answer(mv[:n])
            if reply is not None:
                self._send(*reply, fd=fd)


_FUSE_DEV_IOC_CLONE = 0x8004E500        # _IOR(229, 0, uint32_t)


def clone_nonblocking(fd: int) -> int:
    """A second descriptor of the connection ``fd``, non-blocking: a request
    read from it is answered on it.  (Reading the shared descriptor without
    blocking would change it for every process.)"""
    new = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        fcntl.ioctl(new, _FUSE_DEV_IOC_CLONE, struct.pack("I", fd))
    except OSError:
        os.close(new)
        raise
    return new


def ignore_terminal_signals() -> None:
    """In a serving process: Ctrl-C and hang-ups reach the supervisor, which decides."""
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
