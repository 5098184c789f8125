"""The progress line of ``fxmark run``: which run of how many, and its seconds so far."""
from __future__ import annotations

import sys
import time
from typing import TextIO

_EVERY = 0.2                   # seconds between redraws


class Progress:
    """Draws ``[k/N] WORKLOAD TARGET SCHEME Nw  t/T s`` on one terminal line.

    ``tick`` is called often (every few milliseconds while workers run); it
    redraws at most every 0.2 s.  Disabled, every method does nothing, so
    that output to a file or a pipe stays clean.
    """

    def __init__(self, total: int, duration: float, *, enabled: bool,
                 out: TextIO | None = None) -> None:
        self.total, self.duration, self.enabled = total, duration, enabled
        self.out = out or sys.stderr
        self.k = 0
        self.what = ""
        self.t0: float | None = None
        self.last = 0.0

    def start(self, what: str) -> None:
        self.k += 1
        self.what, self.t0 = what, None
        self._draw("preparing")

    def tick(self) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        first = self.t0 is None
        if first:                      # the first tick comes when the workers start
            self.t0 = now
        if first or now - self.last >= _EVERY:
            self._draw(f"{min(now - self.t0, self.duration):4.1f}/{self.duration:g} s")

    def clear(self) -> None:
        if self.enabled:
            self.out.write("\r\033[K")
            self.out.flush()

    def _draw(self, status: str) -> None:
        if not self.enabled:
            return
        self.last = time.monotonic()
        self.out.write(f"\r\033[K[{self.k}/{self.total}] {self.what}  {status}")
        self.out.flush()
