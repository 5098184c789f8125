"""``fxmark report``: Markdown tables of recorded results.

One table per workload (in FxMark's order): a row per target and scheme, a
column per worker count with ops/s and, in brackets, the speed-up over the
same row's 1-worker run; then the CPU breakdown of the largest worker count.
Failed runs show as FAILED, with their reasons listed under the table.  When
a (workload, target, scheme, workers) was run more than once, the last
record counts; a point measured in rounds (``fxmark run --rounds``) shows
the median of its rounds, and its speed-up the median of each round's
ratio, with their range.
"""
from __future__ import annotations

from typing import Any

from .results import latest, speedup
from .workloads import WORKLOADS


def _fmt_ops(v: float) -> str:
    if v >= 1e6:
        return f"{v / 1e6:.2f} M"
    if v >= 1e4:
        return f"{v / 1e3:.1f} k"
    return f"{v:,.0f}"


def _workload_order(names: set[str]) -> list[str]:
    known = [n for n in WORKLOADS if n in names]
    return known + sorted(names - set(known))


def markdown(recs: list[dict[str, Any]]) -> str:
    """The report for ``recs`` (records as loaded from results.jsonl)."""
    if not recs:
        return "No results recorded.\n"
    last = latest(recs)
    lines: list[str] = ["# fxmark results", ""]
    cpus = sorted({r.get("host_cpus") for r in recs if r.get("host_cpus")})
    started = sorted(r["started"] for r in recs if r.get("started"))
    about = []
    if cpus:
        about.append(f"{'/'.join(map(str, cpus))} usable CPUs")
    if started:
        about.append(f"runs from {started[0]} to {started[-1]}")
    direct = {bool(r.get("direct")) for r in recs}
    about.append({frozenset({True}): "direct I/O", frozenset({False}): "buffered I/O"}.get(
        frozenset(direct), "buffered and direct I/O"))
    rounds = sum(len(r.get("rounds_ops", ())) > 1 for r in last.values())
    counted = f"{len(last)} points, {rounds} of them measured in rounds" if rounds \
        else f"{len(last)} runs"
    lines += [counted + "; " + "; ".join(about) + ".", ""]
    for wl in _workload_order({k[0] for k in last}):
        keys = [k for k in last if k[0] == wl]
        workers = sorted({k[3] for k in keys})
        rows = list(dict.fromkeys((k[1], k[2]) for k in keys))     # first-run order
        summary = WORKLOADS[wl].summary if wl in WORKLOADS else ""
        lines.append(f"## {wl}" + (f": {summary}" if summary else ""))
        lines.append("")
        head = ["target", "scheme"] + [f"{n} worker{'s' if n > 1 else ''}" for n in workers] \
            + ["CPU user/sys/idle"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "|".join(["---"] * 2 + ["---:"] * len(workers) + ["---"]) + "|")
        failures = []
        for target, scheme in rows:
            base = last.get((wl, target, scheme, 1))
            base_ops = base.get("ops_per_sec") if base else None
            cells = [target, scheme]
            cpu_cell = ""
            for n in workers:
                r = last.get((wl, target, scheme, n))
                if r is None:
                    cells.append("")
                elif "failed" in r:
                    cells.append("FAILED")
                    failures.append(f"- {target} {scheme} {n} workers: {r['failed']}")
                else:
                    ops = r["ops_per_sec"]
                    up = f" ({speedup(r, base)})" if base_ops and n != 1 else ""
                    cells.append(_fmt_ops(ops) + up)
                    cpu = r.get("cpu") or {}
                    if cpu:
                        cpu_cell = "/".join(f"{100 * cpu.get(k, 0):.0f}"
                                            for k in ("user", "sys", "idle")) + f" % ({n}w)"
            lines.append("| " + " | ".join(cells + [cpu_cell]) + " |")
        lines.append("")
        if failures:
            lines += ["Failed runs:", ""] + failures + [""]
    return "\n".join(lines)
