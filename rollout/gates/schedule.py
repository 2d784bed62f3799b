"""Which gates apply to which batch (pure).

- After-batch gates (bake, wait, approval, analysis) with ``after``:
  ``canary`` runs after the canary batch; a number N after batch N; ``every`` after every
  batch. Gates also run after the last batch: the rollout succeeds once they pass.
- Before-batch conditions (alerts, window) with ``before``: ``every`` is checked before
  every batch, the first one included; ``after-canary`` before every batch except the
  canary.

Several gates for one batch run one after the other, in the order of the policy file.

>>> from types import SimpleNamespace as S
>>> bake = S(name="bake", kind="bake", after="every")
>>> tests = S(name="tests", kind="wait", after="canary")
>>> win = S(name="night", kind="window", before="after-canary")
>>> canary, second = S(index=1, canary=True), S(index=2, canary=False)
>>> [g.name for g in after_batch([bake, tests, win], canary)]
['bake', 'tests']
>>> [g.name for g in before_batch([bake, tests, win], canary)]
[]
>>> [g.name for g in before_batch([bake, tests, win], second)]
['night']
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar

__all__ = ["AFTER_KINDS", "BEFORE_KINDS", "after_batch", "before_batch", "unreachable"]

AFTER_KINDS = ("bake", "wait", "approval", "analysis")
BEFORE_KINDS = ("alerts", "window")


class BatchLike(Protocol):
    @property
    def index(self) -> int: ...
    @property
    def canary(self) -> bool: ...


G = TypeVar("G")


def after_batch(gates: Sequence[G], batch: BatchLike) -> tuple[G, ...]:
    """The after-batch gates to run once ``batch`` has finished, in policy order."""
    out = []
    for g in gates:
        if getattr(g, "kind", None) not in AFTER_KINDS:
            continue
        after = getattr(g, "after", None)
        if (
            after == "every"
            or (after == "canary" and batch.canary)
            or (isinstance(after, int) and after == batch.index)
        ):
            out.append(g)
    return tuple(out)


def before_batch(gates: Sequence[G], batch: BatchLike) -> tuple[G, ...]:
    """The conditions that must hold before ``batch`` starts, in policy order."""
    out = []
    for g in gates:
        if getattr(g, "kind", None) not in BEFORE_KINDS:
            continue
        before = getattr(g, "before", "every")
        if before == "every" or (before == "after-canary" and not batch.canary):
            out.append(g)
    return tuple(out)


def unreachable(gates: Sequence[object], batches: Sequence[BatchLike]) -> list[str]:
    """One message per gate that no batch of this plan triggers (to warn before running).

    >>> from types import SimpleNamespace as S
    >>> unreachable([S(name="late", kind="bake", after=5)], [S(index=1, canary=True)])
    ['gate late: after batch 5, but the plan has 1 batch(es); it never runs']
    """
    out = []
    has_canary = any(b.canary for b in batches)
    for g in gates:
        kind, name = getattr(g, "kind", None), getattr(g, "name", "?")
        after = getattr(g, "after", None)
        if kind in AFTER_KINDS and isinstance(after, int) and after > len(batches):
            out.append(
                f"gate {name}: after batch {after}, but the plan has {len(batches)} "
                "batch(es); it never runs"
            )
        elif kind in AFTER_KINDS and after == "canary" and not has_canary:
            out.append(f"gate {name}: after the canary, but the plan has no canary batch")
    return out
