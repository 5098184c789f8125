"""``fxmark compare-fuse``: a pnova mount beside reference FUSE daemons, in one run.

The references are built from what this machine's packages ship, into a build
directory (nothing of theirs is kept in the repository):

* ``passthrough_ll``: libfuse's C example, ``passthrough_ll.c`` and
  ``passthrough_helpers.h`` from /usr/share/doc/libfuse3-dev/examples,
  compiled with the flags ``pkg-config fuse3`` gives;
* ``passthroughfs.py``: pyfuse3's example, taken from pyfuse3's source
  distribution (``pip download --no-binary :all: pyfuse3``) and run by a
  virtual environment of its own that has pyfuse3 installed.

Each reference mirrors a fresh directory on tmpfs, mounted afresh for every
workload, as shipped (its own cache settings, no writeback cache), with its
limit of open files raised as far as allowed (both keep a descriptor per inode
they know; MWCL runs at most CREATE_SECONDS for the same reason).  DWOM, DWOL, MWCL and DWBL (1 MiB sequential
writes) then run against tmpfs, both references and a fresh pnova mount per
run (lock scheme pnova; for DWOM also inode, NOVA's per-inode lock), with
buffered and with direct I/O, at each worker count.  Where the kernel offers
FUSE over io_uring, pnova runs twice: taking its requests that way (``pnova``)
and reading ``/dev/fuse`` as the references do (``pnova-devfuse``).  The tables, a table of
ratios and the figure replace the marked section of docs/PERFORMANCE.md
(between ``<!-- fxmark:compare-fuse:begin -->`` and
``<!-- fxmark:compare-fuse:end -->``).  ``make compare-fuse`` calls it.
"""
from __future__ import annotations

import glob
import os
import resource
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

from pnova.fuse_session import detach, uring_offered

from . import workloads
from .mount_target import DirTarget, PnovaMountTarget
from .plot import plot
from .reproduce import machine, section, update_doc
from .results import latest, load
from .targets import RunConfig, Target

BEGIN = "<!-- fxmark:compare-fuse:begin -->"
END = "<!-- fxmark:compare-fuse:end -->"
WORKLOADS = ("DWOM", "DWOL", "MWCL", "DWBL")
# MWCL runs at most this long: the references hold a descriptor for every file
# made, and the open-file limit (20,000 on the development machine) must not be
# what ends the run.
CREATE_SECONDS = 1.5
EXAMPLES = "/usr/share/doc/libfuse3-dev/examples"
MOUNT_TIMEOUT = 30.0


class BuildError(Exception):
    """A reference could not be built; the message says what is missing."""


@dataclass
class Reference:
    """A reference daemon: its label and how to run it in the foreground."""
    label: str
    command: Callable[[str, str], list[str]]     # (source directory, mount point) -> argv


def _run(cmd: list[str], what: str, **kw) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
        raise BuildError(f"{what} failed: {' / '.join(tail) or f'exit status {r.returncode}'}")
    return r.stdout


def build_passthrough_ll(build: str) -> Reference:
    """libfuse's passthrough_ll.c, compiled against this machine's libfuse 3."""
    srcs = [os.path.join(EXAMPLES, n) for n in ("passthrough_ll.c", "passthrough_helpers.h")]
    for s in srcs:
        if not os.path.exists(s) and os.path.exists(s + ".gz"):
            srcs[srcs.index(s)] = s + ".gz"
    missing = [s for s in srcs if not os.path.exists(s)]
    if missing:
        raise BuildError(f"{missing[0]} not found (install the Debian package libfuse3-dev)")
    d = os.path.join(build, "passthrough_ll")
    os.makedirs(d, exist_ok=True)
    for s in srcs:
        dst = os.path.join(d, os.path.basename(s).removesuffix(".gz"))
        if s.endswith(".gz"):
            import gzip
            with gzip.open(s, "rb") as fin, open(dst, "wb") as fout:
                shutil.copyfileobj(fin, fout)
        else:
            shutil.copyfile(s, dst)
    flags = _run(["pkg-config", "--cflags", "--libs", "fuse3"], "pkg-config fuse3").split()
    exe = os.path.join(d, "passthrough_ll")
    _run(["gcc", "-O2", "-Wall", "-o", exe, os.path.join(d, "passthrough_ll.c"), *flags],
         "compiling passthrough_ll.c")
    return Reference("passthrough_ll", lambda src, mnt: [exe, "-f", "-o", f"source={src}", mnt])


def build_passthroughfs(build: str) -> Reference:
    """pyfuse3's passthroughfs.py, run by a virtual environment with pyfuse3."""
    venv = os.path.join(build, "pyfuse3-venv")
    py = os.path.join(venv, "bin", "python")
    if not os.path.exists(py):
        _run([sys.executable, "-m", "venv", venv], "creating the pyfuse3 environment")
    if subprocess.run([py, "-c", "import pyfuse3"], capture_output=True).returncode != 0:
        _run([py, "-m", "pip", "install", "-q", "pyfuse3"], "pip install pyfuse3")
    version = _run([py, "-c", "import pyfuse3; print(pyfuse3.__version__)"],
                   "asking pyfuse3 its version").strip()
    d = os.path.join(build, "pyfuse3")
    script = os.path.join(d, "passthroughfs.py")
    if not os.path.exists(script):
        dl = os.path.join(d, "sdist")
        os.makedirs(dl, exist_ok=True)
        _run([py, "-m", "pip", "download", "-q", "--no-binary", ":all:", "--no-deps",
              "-d", dl, f"pyfuse3=={version}"], "pip download of pyfuse3's sources")
        [sdist] = glob.glob(os.path.join(dl, "pyfuse3-*.tar.gz"))
        with tarfile.open(sdist) as tf:
            member = next(m for m in tf.getmembers()
                          if m.name.endswith("/examples/passthroughfs.py"))
            with tf.extractfile(member) as fin, open(script, "wb") as fout:
                shutil.copyfileobj(fin, fout)
    return Reference("passthroughfs.py", lambda src, mnt: [py, script, src, mnt])


def _raise_fd_limit() -> None:
    """The references keep a descriptor open for every inode they know, and MWCL
    makes tens of thousands of files: raise the limit of open files as far as
    allowed (a million as root, else the hard limit)."""
    try:
        with open("/proc/sys/fs/nr_open", encoding="ascii") as f:
            most = int(f.read())
        resource.setrlimit(resource.RLIMIT_NOFILE, (most, most))
    except (OSError, ValueError):
        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Mounted:
    """A reference daemon serving a fresh tmpfs directory on a fresh mount point."""

    def __init__(self, ref: Reference, tmpfs: str, logdir: str) -> None:
        self.src = tempfile.mkdtemp(prefix=f"src-{ref.label}-", dir=tmpfs)
        self.mnt = tempfile.mkdtemp(prefix=f"mnt-{ref.label}-")
        self.log = os.path.join(logdir, f"{ref.label}.log")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(ref.command(self.src, self.mnt), stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         preexec_fn=_raise_fd_limit)
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not os.path.ismount(self.mnt):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise BuildError(f"{ref.label} did not mount (see {self.log})")
            time.sleep(0.05)

    def close(self) -> None:
        if os.path.ismount(self.mnt):
            detach(self.mnt)
        if self.proc.poll() is None:
            try:
                self.proc.wait(MOUNT_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.src, ignore_errors=True)
        try:
            os.rmdir(self.mnt)
        except OSError:
            pass


def ratios(recs: list[dict], workers: list[int]) -> str:
    """One table of the ratios the comparison is about, from one set of runs."""
    ops = {(k[0], k[1], k[2], k[3]): r["ops_per_sec"] for k, r in latest(recs).items()
           if "failed" not in r}
    lo, hi = min(workers), max(workers)
    lines = ["### Ratios, from the runs above", "",
             f"| workload | I/O | pnova / passthroughfs.py ({lo}w) | pnova / passthrough_ll "
             f"({lo}w) | pnova {hi}w / {lo}w | inode {hi}w / {lo}w | pnova-devfuse "
             f"{hi}w / {lo}w | passthrough_ll {hi}w / {lo}w | tmpfs {hi}w / {lo}w |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]

    def get(wl: str, target: str, scheme: str, n: int) -> float | None:
        return ops.get((wl, target, scheme, n))

    def ratio(a: float | None, b: float | None) -> str:
        return f"{a / b:.2f}x" if a and b else ""

    for wl in WORKLOADS:
        for sfx, io in (("", "buffered"), (" direct", "direct")):
            p = lambda n, s="pnova": get(wl, "pnova" + sfx, s, n)      # noqa: E731
            row = [wl, io,
                   ratio(p(lo), get(wl, "passthroughfs.py" + sfx, "-", lo)),
                   ratio(p(lo), get(wl, "passthrough_ll" + sfx, "-", lo)),
                   ratio(p(hi), p(lo)), ratio(p(hi, "inode"), p(lo, "inode")),
                   ratio(get(wl, "pnova-devfuse" + sfx, "pnova", hi),
                         get(wl, "pnova-devfuse" + sfx, "pnova", lo)),
                   ratio(get(wl, "passthrough_ll" + sfx, "-", hi),
                         get(wl, "passthrough_ll" + sfx, "-", lo)),
                   ratio(get(wl, "tmpfs" + sfx, "-", hi), get(wl, "tmpfs" + sfx, "-", lo))]
            if any(row[2:]):
                lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def compare_fuse(*, build: str, workers: list[int], duration: float, out: str, doc: str,
                 figure: str, tmpfs: str, show_progress: bool) -> int:
    """Build the references, run everything, refresh the docs; return the failed runs."""
    from .cli import run_plan
    build = os.path.abspath(build)
    os.makedirs(build, exist_ok=True)
    refs = [build_passthrough_ll(build), build_passthroughfs(build)]
    os.makedirs(out, exist_ok=True)
    results = os.path.join(out, "results.jsonl")
    if os.path.exists(results):                # one comparison = one set of runs
        os.replace(results, results + ".old")
    load_avg = os.getloadavg()
    about = machine()
    uring = uring_offered()
    about += ("; FUSE over io_uring offered (pnova takes requests through it; "
              "pnova-devfuse reads /dev/fuse)" if uring else
              "; FUSE over io_uring not offered (pnova reads /dev/fuse)")
    failed = 0
    for direct in (False, True):
        sfx = " direct" if direct else ""
        cfg = RunConfig(ncpus=max(workers), direct=direct)
        for wl in WORKLOADS:
            # Fresh reference mounts for every workload: they keep a descriptor
            # per file they have seen, and what one workload made must not use
            # up the next one's.
            mounted = []
            try:
                for ref in refs:
                    mounted.append(Mounted(ref, tmpfs, out))
                targets: list[Target] = [DirTarget("tmpfs" + sfx, tmpfs, "tmpfs")]
                targets += [DirTarget(r.label + sfx, m.mnt, "fuse")
                            for r, m in zip(refs, mounted)]
                targets.append(PnovaMountTarget("pnova" + sfx))
                if uring:
                    targets.append(PnovaMountTarget("pnova-devfuse" + sfx, uring=False))
                schemes = ["pnova", "inode"] if wl == "DWOM" else ["pnova"]
                failed += run_plan([workloads.get(wl)], targets, schemes, workers,
                                   min(duration, CREATE_SECONDS) if wl == "MWCL" else duration,
                                   cfg, out, show_progress)
            finally:
                for m in mounted:
                    m.close()
    recs = load(results)
    os.makedirs(os.path.dirname(os.path.abspath(figure)), exist_ok=True)
    plot(recs, figure, title="Through the mount: pnova, reference FUSE daemons, tmpfs")
    command = "fxmark compare-fuse " + " ".join(shlex.quote(x) for x in (
        "--workers", ",".join(map(str, workers)), "--duration", f"{duration:g}"))
    about += (f"; {time.strftime('%Y-%m-%d')}; {duration:g} s per point "
              f"({min(duration, CREATE_SECONDS):g} s for MWCL), one run each")
    text = section(recs, command, figure, os.path.dirname(os.path.abspath(doc)), about,
                   load_avg, title="Through the mount, beside reference FUSE daemons "
                   "(`make compare-fuse`)", begin=BEGIN, end=END,
                   extra=ratios(recs, workers))
    update_doc(doc, text, begin=BEGIN, end=END)
    print(f"updated {doc} and {figure}.png/.svg")
    return failed
