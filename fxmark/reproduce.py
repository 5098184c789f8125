"""``fxmark reproduce``: the pNOVA comparison in one command, written into the docs.

It runs DWOM, DRBM and DWOL with each lock scheme (inode, rangetree, segment,
pnova) on 1..N workers, against the engine and through a pnova mount, with
tmpfs as the reference; then it writes the Markdown tables and the figure
and replaces the marked section of docs/PERFORMANCE.md (between
``<!-- fxmark:reproduce:begin -->`` and ``<!-- fxmark:reproduce:end -->``,
appended when the markers are missing) with them and a description of the
machine.  ``make compare`` calls it.
"""
from __future__ import annotations

import os
import platform
import shlex
import time

from . import workloads
from .plot import plot
from .report import markdown
from .results import load
from .targets import RunConfig, Target, parse_target

BEGIN = "<!-- fxmark:reproduce:begin -->"
END = "<!-- fxmark:reproduce:end -->"
WORKLOADS = ("DWOM", "DRBM", "DWOL")


def machine() -> str:
    """One line about the machine: CPUs and their model, memory, OS, kernel, Python."""
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            kib = int(next(ln for ln in f if ln.startswith("MemTotal")).split()[1])
        mem = f"{kib / (1 << 20):.0f} GiB RAM"
    except (OSError, StopIteration, ValueError):
        pass
    osname = ""
    try:
        with open("/etc/os-release", encoding="utf-8") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    osname = line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    ncpu = len(os.sched_getaffinity(0))
    parts = [f"{ncpu} CPUs" + (f" ({model})" if model else ""), mem, osname,
             f"Linux {platform.release()}", f"Python {platform.python_version()}"]
    return ", ".join(p for p in parts if p)


def section(recs: list[dict], command: str, figure: str, doc_dir: str, about: str,
            load_avg: tuple[float, float, float] | None, *,
            title: str = "The pNOVA comparison (`make compare`)", begin: str = BEGIN,
            end: str = END, extra: str = "") -> str:
    """The Markdown that goes between the markers (``extra`` after the tables)."""
    rel = os.path.relpath(figure, doc_dir)
    tables = markdown(recs).split("\n", 2)[2].lstrip()        # without the report's title
    tables = tables.replace("\n## ", "\n### ")
    lines = [begin, "",
             f"## {title}", "",
             f"Machine: {about}.",
             (f"Load average before the runs: {load_avg[0]:.2f}." if load_avg else ""),
             "", "```", command, "```", "",
             f"![ops/s against workers, one panel per workload]({rel}.svg)", "",
             f"(also [{os.path.basename(rel)}.png]({rel}.png))", "",
             tables.rstrip(), ""] + ([extra.rstrip(), ""] if extra else []) + [end]
    return "\n".join(lines) + "\n"


def update_doc(doc: str, text: str, *, begin: str = BEGIN, end: str = END) -> None:
    """Replace the marked section of ``doc`` with ``text`` (append it when unmarked)."""
    try:
        with open(doc, encoding="utf-8") as f:
            old = f.read()
    except FileNotFoundError:
        old = "# pnova performance\n"
    if begin in old and end in old and old.index(begin) < old.index(end):
        head = old[:old.index(begin)]
        tail = old[old.index(end) + len(end):].lstrip("\n")
        new = head + text + ("\n" + tail if tail else "")
    else:
        new = old.rstrip("\n") + "\n\n" + text
    tmp = doc + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(new)
    os.replace(tmp, doc)


def reproduce(*, workers: list[int], duration: float, out: str, doc: str, figure: str,
              tmpfs: str, schemes: list[str], wls: list[str], cfg: RunConfig,
              show_progress: bool) -> int:
    """Run the comparison and refresh the docs; return the number of failed runs."""
    from .cli import run_plan
    os.makedirs(out, exist_ok=True)
    results = os.path.join(out, "results.jsonl")
    if os.path.exists(results):                # one comparison = one set of runs
        os.replace(results, results + ".old")
    targets: list[Target] = []
    for spec in ("engine", "pnova", f"tmpfs={tmpfs}"):
        targets.append(parse_target(spec, {t.label for t in targets}))
    load_avg = os.getloadavg()
    about = machine()
    failed = run_plan([workloads.get(w) for w in wls], targets, schemes, workers, duration,
                      cfg, out, show_progress)
    recs = load(results)
    os.makedirs(os.path.dirname(os.path.abspath(figure)), exist_ok=True)
    plot(recs, figure, title="pNOVA comparison: engine, pnova mount, tmpfs")
    command = "fxmark reproduce " + " ".join(shlex.quote(x) for x in (
        "--workers", ",".join(map(str, workers)), "--duration", f"{duration:g}",
        "--schemes", ",".join(schemes), "--workloads", ",".join(wls)))
    about += f"; {time.strftime('%Y-%m-%d')}; {duration:g} s per point, one run each"
    update_doc(doc, section(recs, command, figure, os.path.dirname(os.path.abspath(doc)),
                            about, load_avg))
    print(f"updated {doc} and {figure}.png/.svg")
    return failed


def default_workers() -> str:
    """1..N for the N CPUs this process may use."""
    return ",".join(str(i) for i in range(1, len(os.sched_getaffinity(0)) + 1))

