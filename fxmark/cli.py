"""The ``fxmark`` command.

    fxmark run --target engine --workload DWOM --scheme inode,rangetree,segment,pnova \\
               --workers 1,2 --duration 5 --out results/

runs every (scheme, worker count), prints a table and appends one record per
run to OUT/results.jsonl.  Exit status: 0 when every run succeeded, 1 when any
failed (each failed run is printed as FAILED with its reason), 2 for bad usage.
"""
from __future__ import annotations

import argparse
import os
import sys

from pnova.locks import SCHEMES
from pnova.util import parse_size

from . import results, workloads
from .engine_target import EngineConfig, run_engine

FAIL_ENV = "FXMARK_FAIL_WORKER"
TARGETS = ("engine",)


def _int_list(s: str) -> list[int]:
    try:
        out = sorted({int(x) for x in s.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}")
    if not out or out[0] < 1:
        raise argparse.ArgumentTypeError("worker counts must be 1 or more")
    return out


def _schemes(s: str) -> list[str]:
    out = [x.strip() for x in s.split(",") if x.strip()]
    bad = [x for x in out if x not in SCHEMES]
    if bad or not out:
        raise argparse.ArgumentTypeError(f"unknown scheme(s) {', '.join(bad) or s!r}; "
                                         f"choose from {', '.join(SCHEMES)}")
    return out


def _size(s: str) -> int:
    try:
        return parse_size(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))


def _workload(s: str) -> workloads.Workload:
    try:
        return workloads.get(s)
    except KeyError:
        raise argparse.ArgumentTypeError(f"unknown workload {s!r}; choose from "
                                         f"{', '.join(workloads.WORKLOADS)}")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fxmark", description="FxMark-style microbenchmarks "
                                 "of pnova.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # 'plot' and 'report' (over results.jsonl) are to sit beside 'run'.
    run = sub.add_parser(
        "run", help="run workloads and record the results",
        description="Run a workload for every (scheme, worker count); print a table and "
        "append one JSON record per run to OUT/results.jsonl.",
        epilog=f"Test hook: with {FAIL_ENV}=K in the environment, worker K raises in its "
        "tenth op, so that the run must be reported as FAILED.")
    run.add_argument("--target", choices=TARGETS, default="engine",
                     help="what to drive: 'engine' = the pnova engine, directly, from "
                     "worker processes (default)")
    run.add_argument("--workload", type=_workload, default=workloads.DWOM,
                     help=f"one of {', '.join(workloads.WORKLOADS)} (default DWOM)")
    run.add_argument("--scheme", type=_schemes, default=list(SCHEMES),
                     help=f"comma-separated lock schemes (default {','.join(SCHEMES)})")
    run.add_argument("--workers", type=_int_list, default=[1, 2],
                     help="comma-separated worker counts (default 1,2)")
    run.add_argument("--duration", type=float, default=5.0,
                     help="seconds each run measures (default 5)")
    run.add_argument("--out", required=True, help="directory for results.jsonl")
    run.add_argument("--device-size", type=_size, default=None,
                     help="device image size, e.g. 512M (default 256M, or enough for "
                     "the workload's files)")
    run.add_argument("--segment-pages", type=int, default=16,
                     help="pages per segment of the segment lock schemes (default 16)")
    run.add_argument("--image-dir", default=None,
                     help="where device images go (default /dev/shm if writable, else "
                     "the temporary directory)")
    run.add_argument("--keep", action="store_true",
                     help="keep each device image (its path is printed and recorded)")
    run.add_argument("--no-verify", dest="verify", action="store_false",
                     help="skip the check of the file contents after each run")
    return ap


def cmd_run(a: argparse.Namespace) -> int:
    if a.duration <= 0:
        print("fxmark: --duration must be positive", file=sys.stderr)
        return 2
    if a.segment_pages < 1:
        print("fxmark: --segment-pages must be 1 or more", file=sys.stderr)
        return 2
    fail_worker = None
    if os.environ.get(FAIL_ENV, "").strip():
        try:
            fail_worker = int(os.environ[FAIL_ENV])
        except ValueError:
            print(f"fxmark: {FAIL_ENV} must be a worker number", file=sys.stderr)
            return 2
    cfg = EngineConfig(ncpus=max(a.workers), device_size=a.device_size,
                       segment_pages=a.segment_pages, image_dir=a.image_dir, keep=a.keep,
                       verify=a.verify, fail_worker=fail_worker)
    table = results.Table(sys.stdout)
    table.header()
    failed = 0
    for scheme in a.scheme:
        for n in a.workers:
            rec = run_engine(a.workload, scheme, n, a.duration, cfg)
            path = results.append(a.out, rec)
            table.row(rec)
            if a.keep:
                print(f"  image kept: {rec['image']}", flush=True)
            failed += "failed" in rec
    print(f"{failed} of {len(a.scheme) * len(a.workers)} runs failed; " if failed else "",
          f"results appended to {path}", sep="")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.command == "run":
        return cmd_run(a)
    return 2                                   # pragma: no cover - argparse rejects others


if __name__ == "__main__":
    sys.exit(main())
