"""Lock-free single-producer single-consumer rings of u64 in the shared area.

pNOVA hands out log pointers through one ring per core: a designated
refiller is the only producer, the core's writer the only consumer.  With one
writer per index no lock is needed: the consumer alone moves ``head``, the
producer alone moves ``tail``, each on its own cache line, and a slot is
written before the tail that publishes it (the stores are sequentially
consistent atomics).
"""
from __future__ import annotations

from collections.abc import Callable

from .shared import LINE, RING_SLOTS, SharedArea


class Ring:
    """One core's ring: ``push`` by the refiller, ``pop`` by the core."""

    def __init__(self, area: SharedArea, cpu: int) -> None:
        self.w = area.w
        base = area.ring_base(cpu)
        self.head = base
        self.tail = base + LINE
        self.slots = base + 2 * LINE
        self.n = RING_SLOTS

    def __len__(self) -> int:
        return self.w.load64(self.tail) - self.w.load64(self.head)

    def push(self, v: int) -> bool:
        """Producer side: append ``v``; False if the ring is full."""
        w = self.w
        t = w.load64(self.tail)
        if t - w.load64(self.head) >= self.n:
            return False
        w.store64(self.slots + 8 * (t % self.n), v)
        w.store64(self.tail, t + 1)              # publishes the slot
        return True

    def pop(self) -> int | None:
        """Consumer side: take the oldest value, None if empty."""
        w = self.w
        h = w.load64(self.head)
        if h == w.load64(self.tail):
            return None
        v = w.load64(self.slots + 8 * (h % self.n))
        w.store64(self.head, h + 1)              # frees the slot
        return v


def refill(rings: list[Ring], supply: Callable[[int], list[int]], low: int) -> int:
    """Top up every ring holding fewer than ``low`` items; return items pushed.

    ``supply(n)`` produces up to ``n`` new values (e.g. freshly allocated log
    pages); it is called only by the one designated refiller.
    """
    pushed = 0
    for r in rings:
        have = len(r)
        if have >= low:
            continue
        for v in supply(r.n - have):
            if not r.push(v):
                break
            pushed += 1
    return pushed
