"""FxMark-style microbenchmarks for pnova.

FxMark (Min et al., USENIX ATC'16) measures how a file system scales: each
worker is a process pinned to one CPU, all workers start together, each runs
one operation in a loop for a fixed time, and the result is the total number
of operations divided by the mean elapsed time, per worker count.

Modules:

``workloads``
    The workloads (DWOM, ...), each a prepare step and a per-op function
    written against a small file-operations interface, so that one workload
    definition serves every target.
``workers``
    The process pool: forking, CPU pinning, the start barrier, the timed loop,
    CPU-time accounting and failure detection.  Target independent.
``engine_target``
    Drives the pnova engine directly (no FUSE) with worker processes, one
    fresh device image per run.
``results``
    Result records (``results.jsonl``) and the printed table.
``cli``
    The ``fxmark`` command.
"""
