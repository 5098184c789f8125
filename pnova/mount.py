"""pnova: mount a pnova image through FUSE.

    pnova IMAGE MOUNTPOINT [-f] [-d] [-o opt[,opt...]]

Options may follow the positionals, which is how mount(8) runs helpers
(``mount -t fuse.pnova IMAGE DIR`` becomes ``pnova IMAGE DIR -o rw,...``).
By default the command returns once the filesystem answers requests and a
daemon keeps serving it, logging to ``IMAGE.log``: a supervisor and one serving
process per CPU (:mod:`pnova.daemon`).  Unmounting (``fusermount3 -u DIR``,
``umount DIR``) or SIGINT/SIGTERM to the daemon leaves the image clean.
"""
from __future__ import annotations

import argparse
import errno
import faulthandler
import logging
import os
import stat
import sys
from dataclasses import dataclass, field
from typing import NoReturn

from .daemon import serve
from .engine import FileSystem
from .errors import CorruptImage
from .fuse_session import MountError, ProtocolError, detach, mounted_source
from .locks import SCHEMES
from .util import lock_image

log = logging.getLogger("pnova.mount")

# mount(8) options that only matter to mount(8) itself or to the boot
# sequence: accepted and ignored.  The atime variants libfuse cannot pass on
# are ignored too: the filesystem does not update atime on reads.
_IGNORED = frozenset({"auto", "noauto", "nofail", "_netdev", "user", "nouser", "users",
                      "owner", "group", "defaults", "default_permissions",
                      "relatime", "norelatime", "strictatime", "nostrictatime",
                      "diratime", "nodiratime", "lazytime", "nolazytime"})
# VFS mount flags libfuse hands to the kernel as they are.
_VFS_FLAGS = frozenset({"rw", "dev", "nodev", "suid", "nosuid", "exec", "noexec",
                        "atime", "noatime", "sync", "async", "dirsync"})

_LOG_FORMAT = "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"

_EPILOG = """\
mount options (-o, comma-separated, may be repeated):
  ro                  mount read-only
  rw                  mount read-write (the default)
  allow_other         let users other than the mounter access the filesystem
  default_permissions kernel permission checks (always on)
  logfile=PATH        daemon log file (default: IMAGE.log)
  lock=SCHEME         file data locking: inode, rangetree, segment, pnova (default)
  segment_pages=N     pages per segment of the segment and pnova schemes (default 16)
  workers=N           serving processes, one per logical CPU (default: as many as
                      the image has CPUs and this machine has cores)
  commit=SECONDS      an image on a disk is synced at least this often (default 5;
                      0: only by fsync, syncfs and unmount); see DESIGN.md 24
  keeper=on|off       while one caller's requests come one at a time, one more
                      process, at the idle scheduling class, keeps its CPU from
                      sleeping (default on with several serving processes);
                      DESIGN.md 22.3
  io_uring=auto|on|off
                      take requests through FUSE over io_uring, one queue per
                      CPU served on that CPU (default auto: when the kernel
                      offers it, /sys/module/fuse/parameters/enable_uring);
                      DESIGN.md 22.8
  fsname=NAME         the source /proc/mounts and df show (default: the image path)
  subtype=NAME        the type shown is fuse.NAME (default: by the image's backing,
                      fuse.pnova on a disk, fuse.pnova-pmem on persistent memory,
                      fuse.pnova-memory in tmpfs); DESIGN.md 24
  debug               same as -d
  dev,nodev,suid,nosuid,exec,noexec,atime,noatime,sync,async,dirsync
                      passed to the kernel
  auto,noauto,nofail,_netdev,user,users,defaults,relatime,lazytime,...
                      accepted for fstab, ignored

fstab:  /path/pnova.img  /mnt/pnova  fuse.pnova  defaults,noauto  0  0
unmount: fusermount3 -u MOUNTPOINT   (or umount MOUNTPOINT as root)
"""


SUBTYPE = "pnova"                # /proc/mounts shows the type fuse.pnova

# The type /proc/mounts and `df -T` show says what the image's durability rests
# on (DESIGN 24): the plain type for a file on a disk (the default image of
# `make run`), a suffix for real persistent memory and for an image in memory.
# `mount -a` recognises a mounted fstab line by source and mount point, not
# type, so a line of type fuse.pnova matches all three.
MODE_SUBTYPES = {"disk": SUBTYPE, "pmem": SUBTYPE + "-pmem", "memory": SUBTYPE + "-memory"}
_PNOVA_TYPES = frozenset("fuse." + s for s in MODE_SUBTYPES.values())


def is_pnova_type(fstype: str) -> bool:
    """Whether a mount of type ``fstype`` is a pnova mount (any backing)."""
    return fstype in _PNOVA_TYPES


class UsageError(Exception):
    """Bad command line: one line for the user, exit status 1."""


@dataclass
class Config:
    """What the command line asks for."""
    image: str
    mountpoint: str
    foreground: bool = False
    debug: bool = False
    readonly: bool = False
    logfile: str | None = None
    lock: str = "pnova"
    segment_pages: int = 16
    workers: int | None = None
    commit: float = 5.0
    keeper: bool = True
    uring: bool | None = None                # None: when the kernel offers it
    fuse_options: set[str] = field(default_factory=set)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def parse_args(argv: list[str]) -> Config:
    """Command line -> Config; raises UsageError with a one-line reason."""
    ap = _Parser(prog="pnova", description="Mount a pnova persistent-memory filesystem image.",
                 epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("image", help="image file made by mkfs.pnova")
    ap.add_argument("mountpoint", help="directory to mount it on")
    ap.add_argument("-f", "--foreground", action="store_true",
                    help="stay in the foreground, logging to stderr")
    ap.add_argument("-d", "--debug", action="store_true",
                    help="debug logging of every request (implies -f)")
    ap.add_argument("-o", dest="options", action="append", default=[], metavar="OPT[,OPT...]",
                    help="mount options, see below")
    a = ap.parse_args(argv)
    cfg = Config(image=os.path.abspath(a.image), mountpoint=os.path.abspath(a.mountpoint),
                 foreground=a.foreground, debug=a.debug)
    # Always on: without it FUSE does no permission checks at all.
    opts = {"default_permissions"}
    for group in a.options:
        for opt in group.split(","):
            opt = opt.strip()
            key, _, value = opt.partition("=")
            if not opt or opt in _IGNORED or opt.startswith(("x-", "comment=")):
                continue
            if opt in _VFS_FLAGS:
                opts.add(opt)
            elif opt == "ro":
                cfg.readonly = True
                opts.discard("rw")
                opts.add("ro")
            elif opt == "allow_other":
                opts.add(opt)
            elif opt == "debug":
                cfg.debug = True
            elif key == "logfile" and value:
                cfg.logfile = os.path.abspath(value)
            elif key == "lock":
                if value not in SCHEMES:
                    raise UsageError(f"lock={value}: choose one of {', '.join(SCHEMES)}")
                cfg.lock = value
            elif key == "segment_pages":
                if not value.isdigit() or int(value) < 1:
                    raise UsageError(f"segment_pages={value}: give a positive number of pages")
                cfg.segment_pages = int(value)
            elif key == "workers":
                if not value.isdigit() or int(value) < 1:
                    raise UsageError(f"workers={value}: give a positive number of processes")
                cfg.workers = int(value)
            elif key == "keeper":
                if value not in ("on", "off"):
                    raise UsageError(f"keeper={value}: give on or off")
                cfg.keeper = value == "on"
            elif key == "io_uring":
                if value not in ("auto", "on", "off"):
                    raise UsageError(f"io_uring={value}: give auto, on or off")
                cfg.uring = None if value == "auto" else value == "on"
            elif key == "commit":
                try:
                    cfg.commit = float(value)
                except ValueError:
                    cfg.commit = -1.0
                if not 0 <= cfg.commit <= 86400:
                    raise UsageError(f"commit={value}: give seconds between syncs (0 to 86400)")
            elif key in ("fsname", "subtype") and value:
                opts.add(opt)                       # an explicit name wins
            else:
                raise UsageError(f"unknown mount option {opt!r} (see pnova -h)")
    if cfg.readonly:
        opts.discard("rw")
    if not any(o.startswith("fsname=") for o in opts):
        opts.add(f"fsname={cfg.image}")
    if cfg.debug:
        cfg.foreground = True
        opts.add("debug")                           # libfuse traces every request
    cfg.fuse_options = opts
    if cfg.logfile is None:
        cfg.logfile = cfg.image + ".log"
    return cfg


# ---------------------------------------------------------------- the command
def _setup_logging(cfg: Config) -> logging.Handler | None:
    """Foreground: stderr.  Daemon: the log file, plus warnings on stderr until
    the fork (returned so that the daemon can drop it)."""
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if cfg.debug else logging.INFO)
    if not cfg.debug:
        logging.getLogger("pyfuse3").setLevel(logging.INFO)
    fmt = logging.Formatter(_LOG_FORMAT)
    if cfg.foreground:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(fmt)
        root.addHandler(h)
        return None
    try:
        fh = logging.FileHandler(cfg.logfile, encoding="utf-8")
    except OSError as e:
        print(f"pnova: warning: cannot write log file {cfg.logfile}: {e.strerror}; "
              "logging nowhere", file=sys.stderr)
        cfg.logfile = None
    else:
        fh.setFormatter(fmt)
        root.addHandler(fh)
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.WARNING)
    console.setFormatter(logging.Formatter("pnova: %(message)s"))
    # Messages printed by the command itself are not repeated by the log.
    console.addFilter(lambda record: getattr(record, "console", True))
    root.addHandler(console)
    return console


def _check_paths(cfg: Config) -> bool:
    """Check the image and the mount point; True if the mount point is a dead
    pnova mount of this image (its daemon died), which the mount replaces."""
    try:
        st = os.stat(cfg.image)
    except OSError as e:
        raise UsageError(f"{cfg.image}: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{cfg.image}: is a directory, not an image")
    try:
        st = os.stat(cfg.mountpoint)
    except OSError as e:
        dead = mounted_source(cfg.mountpoint) if e.errno == errno.ENOTCONN else None
        if dead is not None and is_pnova_type(dead[0]) and dead[1] == cfg.image:
            return True
        raise UsageError(f"mount point {cfg.mountpoint}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"mount point {cfg.mountpoint}: not a directory")
    return False


def _redirect_stdio(logfile: str | None) -> None:
    """Detach from the terminal: stdin from /dev/null, stdout/stderr to the log
    (so that libfuse messages and fatal-error dumps are kept)."""
    null = os.open(os.devnull, os.O_RDWR)
    out = null
    if logfile is not None:
        try:
            out = os.open(logfile, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError:
            out = null
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    for fd in {null, out}:
        if fd > 2:
            os.close(fd)


class _StartupReport:
    """The daemon's one message to the parent waiting in the shell: 'ok' once
    the filesystem answers requests, or a one-line error."""

    def __init__(self, fd: int | None = None) -> None:
        self.fd = fd

    def send(self, msg: str) -> None:
        if self.fd is None:
            return
        try:
            os.write(self.fd, msg.encode())
        except OSError:
            pass                     # the parent is gone: nobody to tell
        os.close(self.fd)
        self.fd = None


def _start_daemon(logfile: str | None) -> int | _StartupReport:
    """Fork.  The parent waits for the daemon's report and returns the exit
    status; the daemon (the child) returns the report channel."""
    sys.stdout.flush()
    sys.stderr.flush()
    r, w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(w)
        chunks = []
        while chunk := os.read(r, 4096):
            chunks.append(chunk)
        os.close(r)
        report = b"".join(chunks).decode(errors="replace")
        if report == "ok":
            return 0
        os.waitpid(pid, 0)
        if not report:
            report = "the daemon died during start-up" + (f"; see {logfile}" if logfile else "")
        print(f"pnova: {report}", file=sys.stderr)
        return 1
    os.close(r)
    os.setsid()
    os.chdir("/")              # do not pin the directory we were started from
    _redirect_stdio(logfile)
    return _StartupReport(w)


def _fail(cfg: Config, msg: str) -> int:
    """One line on stderr (and in the daemon's log); exit status 1."""
    print(f"pnova: {msg}", file=sys.stderr)
    if not cfg.foreground:
        log.error("%s", msg, extra={"console": False})
    return 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``pnova`` command; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = parse_args(argv)
        dead_mount = _check_paths(cfg)
    except UsageError as e:
        print(f"pnova: {e}", file=sys.stderr)
        return 1

    console = _setup_logging(cfg)
    try:
        lock_fd = lock_image(cfg.image)
    except BlockingIOError:
        # Not logged: the log file belongs to the mount that holds the image.
        print(f"pnova: {cfg.image} is already mounted (or being checked by fsck.pnova)",
              file=sys.stderr)
        return 1
    except OSError as e:
        return _fail(cfg, f"{cfg.image}: {e.strerror}")
    if dead_mount:
        # No daemon holds the image (we have its lock): what is mounted there
        # is what a failed daemon left.  Its image is recovered below.
        detach(cfg.mountpoint)
        log.warning("%s: removed the dead mount of %s left by a daemon that did not end "
                    "cleanly", cfg.mountpoint, cfg.image)
    try:
        # the image is what a power loss may have left on a disk (DESIGN 24.3)
        fs = FileSystem.mount(cfg.image, readonly=cfg.readonly, lock=cfg.lock,
                              segment_pages=cfg.segment_pages, power_loss=True)
    except CorruptImage as e:
        os.close(lock_fd)
        return _fail(cfg, f"cannot mount: {e}")
    except Exception as e:
        # A bug rather than a bad image: the traceback goes to the log file
        # (or to stderr with -d), the user gets one line.
        if cfg.debug or not cfg.foreground:
            log.error("engine mount failed", exc_info=True, extra={"console": False})
        os.close(lock_fd)
        return _fail(cfg, f"cannot mount {cfg.image}: {type(e).__name__}: {e}")

    if cfg.workers is not None and cfg.workers > fs.ncpus:
        fs.unmount()
        os.close(lock_fd)
        return _fail(cfg, f"workers={cfg.workers}: the image has {fs.ncpus} logical CPUs, "
                          "one serving process each (mkfs.pnova --cpus-per-node sets them)")
    report = _StartupReport()
    if not cfg.foreground:
        started = _start_daemon(cfg.logfile)
        if isinstance(started, int):
            return started           # the parent: the daemon owns fs and the lock now
        report = started
        logging.getLogger().removeHandler(console)
        if cfg.logfile is not None:
            faulthandler.enable()    # fatal errors dump to stderr, i.e. the log

    def ready() -> None:
        log.info("%s mounted on %s%s", cfg.image, cfg.mountpoint,
                 " (read-only)" if cfg.readonly else "")
        report.send("ok")

    def in_worker() -> None:
        # The supervisor alone talks to the waiting shell, which reads until
        # every copy of the pipe is closed.
        if report.fd is not None:
            os.close(report.fd)
            report.fd = None

    rc = 1
    served = False
    try:
        opts = set(cfg.fuse_options)
        if not any(o.startswith("subtype=") for o in opts):
            opts.add(f"subtype={MODE_SUBTYPES[fs.pm.mode]}")   # an explicit name wins
        rc = serve(fs, cfg.mountpoint, opts, workers=cfg.workers, commit=cfg.commit,
                   keeper=cfg.keeper, uring=cfg.uring,
                   debug=cfg.debug, on_ready=ready, child_setup=in_worker)
        served = True
    except (MountError, ProtocolError) as e:          # the kernel mount failed
        if cfg.foreground:
            _fail(cfg, f"cannot mount on {cfg.mountpoint}: {e}")
        else:
            log.error("cannot mount on %s: %s", cfg.mountpoint, e)
            where = f" (details in {cfg.logfile})" if cfg.logfile else ""
            report.send(f"cannot mount on {cfg.mountpoint}: {e}{where}")
    except BaseException as e:
        log.exception("unexpected failure")
        report.send(f"unexpected failure: {e}")
    finally:
        if not served:
            # nothing was served: the engine's state is as the mount left it
            try:
                fs.unmount()
            except Exception:
                log.exception("saving the filesystem state failed; run fsck.pnova")
                rc = 1
        os.close(lock_fd)
        report.send("the daemon stopped during start-up")
    return rc


if __name__ == "__main__":
    sys.exit(main())
