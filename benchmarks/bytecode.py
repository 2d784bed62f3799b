"""Bytecode for rollout's modules before a benchmark starts rollout processes, and the
machine's pace while it runs.

An installed rollout (a wheel, a distribution package) has its modules compiled; a
source checkout run with PYTHONDONTWRITEBYTECODE=1 (this machine's environment sets it)
compiles every module from source at every start, about 0.1 s of CPU per process. The
benchmarks measure rollout as it is installed, so they compile first (`compileall`
writes the `__pycache__` files whatever that variable says; later imports read them).
"""

from __future__ import annotations

import compileall
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def compile_rollout() -> None:
    compileall.compile_dir(ROOT / "rollout", quiet=1)


def pace() -> float:
    """CPU seconds of a fixed pure-Python loop (about 0.4 s on this 2-core VM when it is quiet):
    printed with the figures, because this machine's speed varies by a quarter from one
    minute to the next (other tenants), and a figure means little without it."""
    start = time.process_time()
    total = 0
    for i in range(5_000_000):
        total += i * i % 7
    return time.process_time() - start
