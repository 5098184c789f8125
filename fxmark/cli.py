"""The ``fxmark`` command.

    fxmark run --workload DWOM,DRBM --target engine --target pnova --target tmpfs=/dev/shm \\
               --scheme inode,rangetree,segment,pnova --workers 1,2 --duration 5 --out results/
    fxmark report results/          # Markdown tables
    fxmark plot results/            # results/fxmark.png and .svg

``run`` runs every (workload, target, scheme, worker count), prints a table
row as each run ends and appends one record per run to OUT/results.jsonl.
Exit status: 0 when every run succeeded, 1 when any failed (each failed run is
printed as FAILED with its reason), 2 for bad usage.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from pnova.locks import SCHEMES
from pnova.util import parse_size

from . import results, workloads
from .progress import Progress
from .targets import NO_SCHEME, PROTECTIONS, RunConfig, Target, parse_target

FAIL_ENV = "FXMARK_FAIL_WORKER"


def _int_list(s: str) -> list[int]:
    try:
        out = sorted({int(x) for x in s.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}")
    if not out or out[0] < 1:
        raise argparse.ArgumentTypeError("worker counts must be 1 or more")
    return out


def _choices(s: str, allowed, what: str) -> list[str]:
    """A comma-separated list of names, each one of ``allowed``."""
    out = [x.strip() for x in s.split(",") if x.strip()]
    bad = [x for x in out if x not in allowed]
    if bad or not out:
        raise argparse.ArgumentTypeError(f"unknown {what}(s) {', '.join(bad) or s!r}; "
                                         f"choose from {', '.join(allowed)}")
    return out


def _schemes(s: str) -> list[str]:
    return _choices(s, SCHEMES, "scheme")


def _protections(s: str) -> list[str]:
    return _choices(s, PROTECTIONS, "protection")


def _size(s: str) -> int:
    try:
        return parse_size(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))


def _workloads(s: str) -> list[workloads.Workload]:
    names = [x.strip() for x in s.split(",") if x.strip()]
    if [n.lower() for n in names] == ["all"]:
        return list(workloads.WORKLOADS.values())
    out = []
    for name in names:
        try:
            out.append(workloads.get(name))
        except KeyError:
            raise argparse.ArgumentTypeError(f"unknown workload {name!r}; choose from "
                                             f"{', '.join(workloads.WORKLOADS)} or all")
    if not out:
        raise argparse.ArgumentTypeError("no workload named")
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fxmark", description="FxMark-style microbenchmarks "
                                 "of pnova and of any mounted filesystem.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser(
        "run", help="run workloads and record the results",
        description="Run every (workload, target, scheme, worker count); print a table and "
        "append one JSON record per run to OUT/results.jsonl.",
        epilog=f"Workloads: {', '.join(workloads.WORKLOADS)}.  Test hook: with "
        f"{FAIL_ENV}=K in the environment, worker K raises in its tenth op, so that the run "
        "must be reported as FAILED.")
    run.add_argument("--target", action="append", default=[], metavar="TARGET",
                     help="'engine' (the pnova engine driven directly by worker processes), "
                     "'engine-apart' (the same with each worker on an image of its own: "
                     "the engine's scaling with nothing shared), 'pnova' (a fresh pnova "
                     "FUSE mount per run, taking requests through io_uring when the kernel "
                     "offers it), 'pnova-devfuse' (the same, always reading /dev/fuse), or a "
                     "directory, DIR or "
                     "LABEL=DIR, on any filesystem; may be repeated (default: engine)")
    run.add_argument("--workload", type=_workloads, default=[workloads.DWOM],
                     help="comma-separated workloads, or 'all' (default DWOM)")
    run.add_argument("--scheme", type=_schemes, default=list(SCHEMES),
                     help=f"comma-separated lock schemes for 'engine' and 'pnova' targets "
                     f"(default {','.join(SCHEMES)})")
    run.add_argument("--protection", type=_protections, default=["full"],
                     help="comma-separated protection for the images of 'engine' and "
                     "'pnova' targets: full (data checksums and parity, inode replicas, "
                     "log page twins: mkfs's default), slots (no log page twins), data "
                     "(no metadata replicas), csum (no parity either), none; each is a "
                     "run of its own, shown as SCHEME:slots, SCHEME:data, ... (default "
                     "full)")
    run.add_argument("--workers", type=_int_list, default=[1, 2],
                     help="comma-separated worker counts (default 1,2)")
    run.add_argument("--duration", type=float, default=5.0,
                     help="seconds each run measures (default 5)")
    run.add_argument("--rounds", type=int, default=1,
                     help="measure each point this many times (a round runs every target "
                     "of a workload, each with its worker counts back to back, in the "
                     "opposite order every second round) and report "
                     "medians: a point's ops/s over its "
                     "rounds, a speed-up over the ratios measured within each round, with "
                     "their range (default 1)")
    run.add_argument("--direct", action="store_true",
                     help="open data files with O_DIRECT on directory and pnova targets "
                     "(the engine has no page cache either way)")
    run.add_argument("--out", required=True, help="directory for results.jsonl")
    run.add_argument("--device-size", type=_size, default=None,
                     help="pnova image size, e.g. 2G (default 1G, or more when the "
                     "workload's files need it)")
    run.add_argument("--segment-pages", type=int, default=16,
                     help="pages per segment of the segment lock schemes (default 16)")
    run.add_argument("--image-dir", default=None,
                     help="where pnova images go (default /dev/shm if writable, else the "
                     "temporary directory)")
    run.add_argument("--keep", action="store_true",
                     help="keep each pnova image and directory target's run directory "
                     "(their paths are recorded)")
    run.add_argument("--no-verify", dest="verify", action="store_false",
                     help="skip the checks after each run (contents, and fsck of pnova "
                     "images)")
    run.add_argument("--no-progress", dest="progress", action="store_false",
                     help="no progress line on stderr (it is only shown on a terminal)")

    rep = sub.add_parser("report", help="Markdown tables of recorded results",
                         description="Print (or write) Markdown tables of DIR/results.jsonl: "
                         "one table per workload, ops/s per worker count.")
    rep.add_argument("dir", help="directory holding results.jsonl")
    rep.add_argument("-o", "--output", default=None, help="write to this file, not stdout")

    plot = sub.add_parser("plot", help="draw recorded results (PNG and SVG)",
                          description="Draw ops/s against workers, one line per target and "
                          "scheme, one panel per workload, from DIR/results.jsonl.")
    plot.add_argument("dir", help="directory holding results.jsonl")
    plot.add_argument("-o", "--output", default=None,
                      help="file name without extension (default DIR/fxmark): "
                      "OUTPUT.png and OUTPUT.svg are written")
    plot.add_argument("--title", default=None, help="figure title")

    from .reproduce import WORKLOADS as REPRO, default_workers
    repro = sub.add_parser(
        "reproduce", help="the pNOVA comparison, written into docs/PERFORMANCE.md",
        description="Run DWOM, DRBM and DWOL with every lock scheme on 1..N workers against "
        "the engine and a pnova mount, with tmpfs as the reference; write the tables, the "
        "figure and the machine's description into the marked section of the document.")
    _report_options(repro, "pnova-comparison", default_workers())
    repro.add_argument("--schemes", type=_schemes, default=list(SCHEMES),
                     help=f"lock schemes (default {','.join(SCHEMES)})")
    repro.add_argument("--workloads", type=_workloads,
                     default=[workloads.get(w) for w in REPRO],
                     help=f"workloads (default {','.join(REPRO)})")
    repro.add_argument("--tmpfs", default="/dev/shm",
                     help="a tmpfs directory for the reference (default /dev/shm)")

    from .fusecompare import WORKLOADS as FUSE_WLS
    cmp = sub.add_parser(
        "compare-fuse", help="pnova's mount beside reference FUSE daemons, into the docs",
        description=f"Build libfuse's passthrough_ll and pyfuse3's passthroughfs.py from this "
        f"machine's packages, mount them over tmpfs, and run {', '.join(FUSE_WLS)} against "
        "tmpfs, both references and pnova, buffered and with direct I/O; write the tables, "
        "the ratios and the figure into the marked section of the document.")
    cmp.add_argument("--build", default="build",
                     help="where the references are built (default build)")
    _report_options(cmp, "fuse-comparison", default_workers())
    cmp.add_argument("--tmpfs", default="/dev/shm",
                     help="a tmpfs directory for the reference and the mirrored sources "
                     "(default /dev/shm)")
    return ap


def _report_options(p: argparse.ArgumentParser, name: str, workers: str) -> None:
    """Options of the commands that write a marked section of the docs: their
    results go to results/NAME, their figure to docs/figures/NAME."""
    p.add_argument("--workers", type=_int_list, default=_int_list(workers),
                   help="comma-separated worker counts (default 1..number of CPUs)")
    p.add_argument("--duration", type=float, default=5.0,
                   help="seconds each run measures (default 5)")
    p.add_argument("--out", default=f"results/{name}",
                   help=f"directory for results.jsonl (default results/{name})")
    p.add_argument("--doc", default="docs/PERFORMANCE.md",
                   help="document whose marked section is replaced (default docs/PERFORMANCE.md)")
    p.add_argument("--figure", default=f"docs/figures/{name}",
                   help=f"figure path without extension (default docs/figures/{name})")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress line on stderr")


def _targets(specs: list[str]) -> list[Target]:
    out: list[Target] = []
    for spec in specs or ["engine"]:
        t = parse_target(spec, {x.label for x in out})
        if any(x.label == t.label for x in out):
            raise ValueError(f"target {t.label!r} given twice")
        out.append(t)
    return out


def cmd_run(a: argparse.Namespace) -> int:
    if a.duration <= 0:
        print("fxmark: --duration must be positive", file=sys.stderr)
        return 2
    if a.segment_pages < 1:
        print("fxmark: --segment-pages must be 1 or more", file=sys.stderr)
        return 2
    if a.rounds < 1:
        print("fxmark: --rounds must be 1 or more", file=sys.stderr)
        return 2
    try:
        targets = _targets(a.target)
    except ValueError as e:
        print(f"fxmark: {e}", file=sys.stderr)
        return 2
    fail_worker = None
    if os.environ.get(FAIL_ENV, "").strip():
        try:
            fail_worker = int(os.environ[FAIL_ENV])
        except ValueError:
            print(f"fxmark: {FAIL_ENV} must be a worker number", file=sys.stderr)
            return 2
    cfg = RunConfig(ncpus=max(a.workers), device_size=a.device_size,
                    segment_pages=a.segment_pages, image_dir=a.image_dir, keep=a.keep,
                    verify=a.verify, direct=a.direct, fail_worker=fail_worker)
    schemes = [s if p == "full" else f"{s}:{p}" for p in a.protection for s in a.scheme]
    return 1 if run_plan(a.workload, targets, schemes, a.workers, a.duration, cfg, a.out,
                         a.progress, a.rounds) else 0


def run_plan(wls: list[workloads.Workload], targets: list[Target], schemes: list[str],
             workers: list[int], duration: float, cfg: RunConfig, out: str,
             show_progress: bool = True, rounds: int = 1) -> int:
    """Run every (workload, target, scheme, workers), ``rounds`` times; print
    the table, and with rounds the medians; return the failures.

    A round of a workload runs every target and scheme, each with its worker
    counts one after the other: a round's speed-ups compare runs seconds
    apart, and its targets (the engine beside ``engine-apart`` or tmpfs) run
    in the same minute.  The host's speed drifts by tens of percent within
    minutes, so targets run one after the other, all rounds of one first,
    would compare different minutes of the machine as well.  Every second
    round runs the worker counts in the opposite order, so that a drift of the
    host's speed during a round (which a round's speed-ups see whole) favours
    neither the first count nor the last in the medians."""
    plan = [(w, t, s, r, n) for w in wls for r in range(1, rounds + 1) for t in targets
            for s in (schemes if t.uses_schemes else [NO_SCHEME])
            for n in (workers if r % 2 else workers[::-1])]
    progress = Progress(len(plan), duration, enabled=show_progress and sys.stderr.isatty())
    table = results.Table(sys.stdout)
    table.header()
    failed = 0
    path = os.path.join(out, "results.jsonl")
    paths: dict[str, set[str]] = {}            # pnova target -> how requests came
    batch = f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')}/{os.getpid()}"
    done: list[dict] = []
    for w, t, scheme, r, n in plan:
        progress.start(f"{w.name} {t.label} {scheme} {n}w" +
                       (f" round {r}/{rounds}" if rounds > 1 else ""))
        rec = t.run(w, scheme, n, duration, cfg, progress.tick)
        progress.clear()
        if rounds > 1:
            rec.update(round=r, rounds=rounds, batch=batch)
        path = results.append(out, rec)
        done.append(rec)
        table.row(rec)
        if "requests" in rec:
            paths.setdefault(t.label, set()).add(rec["requests"])
        for key in ("image", "kept"):
            if key in rec:
                kept = rec[key] if isinstance(rec[key], str) else ", ".join(rec[key])
                print(f"  kept: {kept}", flush=True)
        failed += "failed" in rec
    for label, how in paths.items():
        print(f"{label}: requests taken through {' and '.join(sorted(how))}", flush=True)
    if rounds > 1:
        results.medians(done, sys.stdout)
    print(f"{failed} of {len(plan)} runs failed; " if failed else "",
          f"results appended to {path}", sep="", flush=True)
    return failed


def _load(d: str) -> list[dict] | None:
    """The records of d/results.jsonl, or None after saying why there are none."""
    try:
        return results.load(os.path.join(d, "results.jsonl"))
    except (OSError, ValueError) as e:
        print(f"fxmark: {e}", file=sys.stderr)
        return None


def cmd_report(a: argparse.Namespace) -> int:
    from .report import markdown
    recs = _load(a.dir)
    if recs is None:
        return 2
    text = markdown(recs)
    if a.output:
        with open(a.output, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


def cmd_plot(a: argparse.Namespace) -> int:
    from .plot import plot
    recs = _load(a.dir)
    if recs is None:
        return 2
    base = a.output or os.path.join(a.dir, "fxmark")
    try:
        files = plot(recs, base, title=a.title)
    except ValueError as e:
        print(f"fxmark: {e}", file=sys.stderr)
        return 2
    for f in files:
        print(f)
    return 0


def cmd_reproduce(a: argparse.Namespace) -> int:
    from .reproduce import reproduce
    if a.duration <= 0:
        print("fxmark: --duration must be positive", file=sys.stderr)
        return 2
    cfg = RunConfig(ncpus=max(a.workers))
    try:
        failed = reproduce(workers=a.workers, duration=a.duration, out=a.out, doc=a.doc,
                           figure=a.figure, tmpfs=a.tmpfs, schemes=a.schemes,
                           wls=[w.name for w in a.workloads], cfg=cfg,
                           show_progress=a.progress)
    except ValueError as e:
        print(f"fxmark: {e}", file=sys.stderr)
        return 2
    return 1 if failed else 0


def cmd_compare_fuse(a: argparse.Namespace) -> int:
    from .fusecompare import BuildError, compare_fuse
    if a.duration <= 0:
        print("fxmark: --duration must be positive", file=sys.stderr)
        return 2
    try:
        failed = compare_fuse(build=a.build, workers=a.workers, duration=a.duration,
                              out=a.out, doc=a.doc, figure=a.figure, tmpfs=a.tmpfs,
                              show_progress=a.progress)
    except BuildError as e:
        print(f"fxmark: {e}", file=sys.stderr)
        return 2
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    return {"run": cmd_run, "report": cmd_report, "plot": cmd_plot,
            "reproduce": cmd_reproduce, "compare-fuse": cmd_compare_fuse}[a.command](a)


if __name__ == "__main__":
    sys.exit(main())
