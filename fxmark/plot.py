"""``fxmark plot``: ops/s against workers, one panel per workload, as FxMark draws it.

Each panel has one line per target and scheme (``engine/pnova``,
``tmpfs``, ...).  Failed runs are left out of the lines (``fxmark report``
lists them).  When a (workload, target, scheme, workers) was run more than
once, the last record counts.  A panel whose values span more than a factor
of 20 (a Python filesystem beside tmpfs) gets a logarithmic ops/s axis.
Written with matplotlib's Agg backend (no display needed) as PNG and SVG.
"""
from __future__ import annotations

import math
from typing import Any

from .results import latest
from .targets import NO_SCHEME
from .workloads import WORKLOADS

_MARKERS = "osD^v<>pHx*+"
LOG_RATIO = 20                 # a panel whose values span more than this uses a log axis


def _label(target: str, scheme: str) -> str:
    return target if scheme == NO_SCHEME else f"{target}/{scheme}"


def plot(recs: list[dict[str, Any]], base: str, title: str | None = None) -> list[str]:
    """Draw ``recs`` into ``base``.png and ``base``.svg; return the two paths.

    ValueError when no run succeeded (there would be nothing to draw).
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    # Text stays text in the SVG (searchable, smaller), and no random ids:
    # the same results give the same file.
    matplotlib.rcParams["svg.fonttype"] = "none"
    matplotlib.rcParams["svg.hashsalt"] = "fxmark"

    last = latest(recs)
    ok = {k: r for k, r in last.items() if "failed" not in r and r.get("ops_per_sec")}
    if not ok:
        raise ValueError("no successful run to plot")
    names = {k[0] for k in ok}
    order = [n for n in WORKLOADS if n in names] + sorted(names - set(WORKLOADS))
    series = list(dict.fromkeys((k[1], k[2]) for k in ok))          # first-run order
    style = {s: _MARKERS[i % len(_MARKERS)] for i, s in enumerate(series)}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    ncols = min(4, len(order))
    nrows = math.ceil(len(order) / ncols)
    height = 3.0 * nrows + 0.5 + (0.4 if title else 0.0)     # inches: panels, legend, title
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, height), squeeze=False)
    handles: dict[str, Any] = {}
    for i, wl in enumerate(order):
        ax = axes[i // ncols][i % ncols]
        for j, (target, scheme) in enumerate(series):
            pts = sorted((k[3], r["ops_per_sec"]) for k, r in ok.items()
                         if k[0] == wl and (k[1], k[2]) == (target, scheme))
            if not pts:
                continue
            xs, ys = zip(*pts)
            (line,) = ax.plot(xs, ys, marker=style[(target, scheme)],
                              color=colors[j % len(colors)], label=_label(target, scheme))
            handles.setdefault(_label(target, scheme), line)
        ax.set_title(wl, fontsize=10)
        ax.set_xlabel("workers", fontsize=8)
        workers = sorted({k[3] for k in ok if k[0] == wl})
        ax.set_xticks(workers)
        ax.tick_params(labelsize=7)
        ys = [r["ops_per_sec"] for k, r in ok.items() if k[0] == wl]
        if max(ys) > LOG_RATIO * min(ys):
            # Python filesystems beside kernel ones: on a linear axis the
            # slower lines would lie flat on zero.
            ax.set_yscale("log")
            ax.set_ylabel("ops/s (log scale)", fontsize=8)
        else:
            ax.set_ylim(bottom=0)
            ax.set_ylabel("ops/s", fontsize=8)
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
        ax.grid(True, alpha=0.3)
    for i in range(len(order), nrows * ncols):
        axes[i // ncols][i % ncols].set_visible(False)
    fig.legend(list(handles.values()), list(handles.keys()), loc="lower center",
               ncol=min(len(handles), 5), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.45 / height, 1, 1 - (0.35 / height if title else 0.0)))
    paths = [f"{base}.png", f"{base}.svg"]
    fig.savefig(paths[0], dpi=120, metadata={"Software": None})
    fig.savefig(paths[1], metadata={"Date": None})
    plt.close(fig)
    return paths
