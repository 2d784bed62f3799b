"""Process-wide settings for a long controller run (`rollout run`, `rollout simulate`).

Python's cyclic garbage collector walks every tracked container on each full collection,
and a fleet's inventory, policy, plan, node records and journal snapshots are hundreds of
thousands of them that live until the process ends: at 100,000 nodes the engine spent
more than half its time in collections that freed nothing of those. `settle_heap`, called
once after the inputs are loaded and planned, collects the young generations once (what
loading made; a full collection there found nothing to free, after walking every module's
objects: 40 ms of a 30-node run's start-up, 80 ms at 100,000 nodes), then freezes what is
alive (`gc.freeze`: moved to a permanent generation the collector never scans) and makes the
young-generation threshold larger, so collections are rarer but still happen: cycles made
later (finished tasks, exceptions with tracebacks) are still collected. `paused_gc`
turns collection off while a large input file is read (rollout.inventory).
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

# gen0 threshold: allocations minus deallocations between two young collections (the
# default, 700, makes a collection every few events at fleet scale; at 50,000 a 100,000-
# node simulation still spent ~7 s of ~60 in them, at 500,000 ~2 s, with the same peak
# RSS. Over HTTP the garbage waits longer: 2,000 real agents peaked at 137 MB against
# 103 MB at 50,000, bounded by the threshold, not by the fleet).
_GEN0 = 500_000


def settle_heap() -> None:
    """Freeze the long-lived objects loaded so far and make collections rarer."""
    gc.collect(1)
    gc.freeze()
    gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(max(_GEN0, gen0), gen1, gen2)


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """No cyclic collection inside: for loading a large file, which makes hundreds of
    thousands of objects that all stay alive (a collection would only walk them)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
