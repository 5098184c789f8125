"""Result records and the printed table.

Every run appends one JSON object (one line) to ``DIR/results.jsonl``.  Keys
of every record: workload, target, scheme, workers, duration (requested
seconds), worker_ops and worker_seconds (per worker), and either

* ops (total), seconds (mean elapsed time of the workers), ops_per_sec
  (= ops / seconds), cpu ({user, sys, idle, iowait, steal}: fractions of the
  time of the CPUs the workers ran on) and worker_cpu ({user, sys}: the
  workers' own share), see :func:`fxmark.workers.summarise`, or
* failed: a one-line reason, and no throughput at all.

Also: direct (O_DIRECT asked for), host_cpus, started, worker_paused when a
workload replenished (untimed) what it uses up.  Targets add their own
settings: engine and pnova: segment_pages, ncpus, device_size (and image
when kept); pnova mounts also requests ('io_uring' or '/dev/fuse': how the
daemon took its requests); directory targets: path and fstype (and kept).
With ``--rounds N`` (N > 1) each point is measured N times: its records
carry round (1..N), rounds (N) and batch (the same for every record of
one ``fxmark run``).
"""
from __future__ import annotations

import json
import os
import statistics
from typing import Any, TextIO

COLUMNS = (("workload", 8), ("target", 13), ("scheme", 9), ("workers", 7),
           ("ops/s", 12), ("speed-up", 8), ("user", 5), ("sys", 5), ("idle", 5))


def append(out_dir: str, rec: dict[str, Any]) -> str:
    """Append ``rec`` to out_dir/results.jsonl (creating the directory); return the path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "results.jsonl")
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec, sort_keys=True) + "\n")
    return path


def load(path: str) -> list[dict[str, Any]]:
    """Every record of a results.jsonl file (ValueError names a bad line)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                raise ValueError(f"{path}:{no}: not a JSON record") from None
            if not isinstance(rec, dict) or not {"workload", "target", "scheme",
                                                  "workers"} <= rec.keys():
                raise ValueError(f"{path}:{no}: not an fxmark record")
            out.append(rec)
    return out


def latest(recs: list[dict[str, Any]]) -> dict[tuple[str, str, str, int], dict[str, Any]]:
    """The last record of each (workload, target, scheme, workers): a re-run replaces.

    A point measured in several rounds (``fxmark run --rounds``) counts as one
    record: its last round's, with ``ops_per_sec`` the median over the rounds
    and ``rounds_ops`` every round's figure, in round order; if a round
    failed, that round's record (the point failed)."""
    groups: dict[tuple[str, str, str, int], list[dict[str, Any]]] = {}
    for r in recs:
        key = (r["workload"], r["target"], r["scheme"], int(r["workers"]))
        batch = r.get("batch")
        have = groups.get(key)
        if batch is not None and have and have[-1].get("batch") == batch:
            have.append(r)
        else:
            groups[key] = [r]
    return {key: _merged(group) for key, group in groups.items()}


def _merged(group: list[dict[str, Any]]) -> dict[str, Any]:
    if len(group) == 1:
        return group[0]
    failed = [r for r in group if "failed" in r]
    if failed:
        return failed[0]
    group = sorted(group, key=lambda r: r.get("round", 0))
    ops = [r["ops_per_sec"] for r in group]
    return dict(group[-1], ops_per_sec=statistics.median(ops), rounds_ops=ops)


def round_ratios(rec: dict[str, Any], base: dict[str, Any]) -> list[float] | None:
    """Each round's speed-up of ``rec`` over ``base`` (its 1-worker point),
    the two measured in the same round, minutes apart at most; None unless
    both were measured in the same rounds."""
    a, b = rec.get("rounds_ops"), base.get("rounds_ops")
    if not a or not b or len(a) != len(b) or not all(b):
        return None
    return [x / y for x, y in zip(a, b)]


def speedup(rec: dict[str, Any], base: dict[str, Any]) -> str:
    """The speed-up of ``rec`` over ``base`` as printed: with rounds, the
    median of each round's ratio and their range; else the one ratio."""
    ratios = round_ratios(rec, base)
    if ratios:
        return (f"{statistics.median(ratios):.2f}x, "
                f"{min(ratios):.2f}-{max(ratios):.2f}x in {len(ratios)} rounds")
    return f"{rec['ops_per_sec'] / base['ops_per_sec']:.2f}x"


class Table:
    """Prints rows as runs finish; speed-up is against the same scheme's 1-worker
    run (of the same round)."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.base: dict[tuple[str, str, str, int], float] = {}
        # 2-worker rows of a round whose 1-worker point comes after them:
        # (their first cells, their ops/s)
        self.later: dict[tuple[str, str, str, int], list[tuple[list[str], float]]] = {}

    def header(self) -> None:
        self._line([name for name, _ in COLUMNS])
        self._line(["-" * width for _, width in COLUMNS])

    def row(self, rec: dict[str, Any]) -> None:
        key = (rec["workload"], rec["target"], rec["scheme"], rec.get("round", 0))
        first = [rec["workload"], rec["target"], rec["scheme"], str(rec["workers"])]
        if "failed" in rec:
            self._line(first + [f"FAILED: {rec['failed']}"], ragged=True)
            return
        ops = rec["ops_per_sec"]
        if rec["workers"] == 1:
            self.base[key] = ops
        base = self.base.get(key)
        if base is None and rec["workers"] != 1 and "round" in rec:
            self.later.setdefault(key, []).append((first, ops))
        speedup = f"{ops / base:.2f}x" if base else "-"
        cpu = rec["cpu"]
        self._line(first + [f"{ops:,.0f}", speedup] +
                   [f"{cpu[k]:.2f}" for k in ("user", "sys", "idle")])
        if rec["workers"] == 1:
            # A round that ran its worker counts the other way round (every
            # second one) has its speed-ups once the 1-worker point is in.
            for cells, later_ops in self.later.pop(key, []):
                self._line(cells + ["", f"{later_ops / ops:.2f}x"])

    def _line(self, cells: list[str], ragged: bool = False) -> None:
        parts = []
        for i, cell in enumerate(cells):
            width = COLUMNS[i][1]
            last = i == len(cells) - 1
            # Numbers right-aligned, words left-aligned; a FAILED reason runs on.
            if ragged and last:
                parts.append(cell)
            elif i >= 3:
                parts.append(cell.rjust(width))
            else:
                parts.append(cell.ljust(width))
        print("  ".join(parts).rstrip(), file=self.out, flush=True)


def medians(recs: list[dict[str, Any]], out: TextIO) -> None:
    """After a run in rounds: each point's median ops/s over its rounds and
    the median of its rounds' speed-ups, with their range."""
    last = latest(recs)
    print(f"\nmedians of {max(r.get('rounds', 1) for r in recs)} rounds", file=out)
    print(f"{'workload':8}  {'target':13}  {'scheme':9}  {'workers':>7}  {'ops/s':>12}  "
          "speed-up", file=out)
    for key, rec in last.items():
        cells = f"{key[0]:8}  {key[1]:13}  {key[2]:9}  {key[3]:>7}  "
        if "failed" in rec:
            print(cells + f"FAILED: {rec['failed']}", file=out)
            continue
        base = last.get(key[:3] + (1,))
        up = "-"
        if key[3] != 1 and base is not None and "failed" not in base:
            up = speedup(rec, base)
        print(cells + f"{rec['ops_per_sec']:>12,.0f}  {up}", file=out, flush=True)
