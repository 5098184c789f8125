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
"""
from __future__ import annotations

import json
import os
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
    """The last record of each (workload, target, scheme, workers): a re-run replaces."""
    out: dict[tuple[str, str, str, int], dict[str, Any]] = {}
    for r in recs:
        out[(r["workload"], r["target"], r["scheme"], int(r["workers"]))] = r
    return out


class Table:
    """Prints rows as runs finish; speed-up is against the same scheme's 1-worker run."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.base: dict[tuple[str, str, str], float] = {}

    def header(self) -> None:
        self._line([name for name, _ in COLUMNS])
        self._line(["-" * width for _, width in COLUMNS])

    def row(self, rec: dict[str, Any]) -> None:
        key = (rec["workload"], rec["target"], rec["scheme"])
        first = [rec["workload"], rec["target"], rec["scheme"], str(rec["workers"])]
        if "failed" in rec:
            self._line(first + [f"FAILED: {rec['failed']}"], ragged=True)
            return
        ops = rec["ops_per_sec"]
        if rec["workers"] == 1:
            self.base[key] = ops
        base = self.base.get(key)
        speedup = f"{ops / base:.2f}x" if base else "-"
        cpu = rec["cpu"]
        self._line(first + [f"{ops:,.0f}", speedup] +
                   [f"{cpu[k]:.2f}" for k in ("user", "sys", "idle")])

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
