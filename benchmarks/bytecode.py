"""Bytecode for rollout's modules before a benchmark starts rollout processes.

An installed rollout (a wheel, a distribution package) has its modules compiled; a
source checkout run with PYTHONDONTWRITEBYTECODE=1 (this machine's environment sets it)
compiles every module from source at every start, about 0.1 s of CPU per process. The
benchmarks measure rollout as it is installed, so they compile first (`compileall`
writes the `__pycache__` files whatever that variable says; later imports read them).
"""

from __future__ import annotations

import compileall
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def compile_rollout() -> None:
    compileall.compile_dir(ROOT / "rollout", quiet=1)
