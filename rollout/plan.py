"""Pure planning: a fleet and a policy in, the ordered batches out.

Sizes, for a fleet of N nodes (percentages are of N)::

    max_unavailable = max(1, floor(batches.max_unavailable))
    canary          = min(ceil(batches.canary), N, max_unavailable)     0 = no canary batch
    size            = min(max(1, ceil(batches.size)), max_unavailable)

Every batch, the canary included, is capped at max_unavailable: all nodes of a batch are
out of service together, and max_unavailable is the fleet-wide cap on that.

Cut: the canary batch first (``canary=True``) when canary > 0, then batches of ``size``;
the last batch takes what is left. Without ``spread_by`` the batches are consecutive
stretches of the inventory order. With it, each batch is filled round-robin across the
label's values, starting with the values that have the most nodes left (see `spread`),
so every batch draws evenly from each failure domain.

Invariants (tested): every node appears in exactly one batch, in one position; no batch
is empty or larger than max_unavailable; ``Batch.index`` runs 1, 2, 3 ...

Worked example: 10 nodes in racks a (5), b (3), c (2), policy canary 1, size "25%",
max_unavailable "25%", spread_by rack. max_unavailable = floor(2.5) = 2, size =
min(ceil(2.5), 2) = 2, canary = 1, so the capacities are 1, 2, 2, 2, 2, 1 and the
batches [a1] (canary), [a2 b1], [a3 b2], [a4 c1], [a5 b3], [c2]: no batch takes two
nodes of one rack.

Nothing here does I/O; `describe` gives the JSON-friendly view the CLI prints.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rollout.model import Batch, Node
from rollout.policy import Policy

__all__ = ["NO_LABEL", "Limits", "describe", "limits", "plan_batches", "spread"]

NO_LABEL = "(none)"
"""How `describe` names the group of nodes that lack the ``spread_by`` label."""


@dataclass(frozen=True)
class Limits:
    """A policy's amounts resolved against one fleet size (see the module docstring)."""

    fleet: int
    canary: int
    size: int
    max_unavailable: int
    max_failed: int


def limits(policy: Policy, fleet: int) -> Limits:
    """Resolve the policy's amounts for a fleet of ``fleet`` nodes.

    >>> from rollout.policy import parse_policy
    >>> p = parse_policy({"batches": {"canary": "5%", "size": "25%", "max_unavailable": "25%"},
    ...                   "failure": {"max_failed": "10%"}}, "example")
    >>> limits(p, 10)
    Limits(fleet=10, canary=1, size=2, max_unavailable=2, max_failed=1)
    >>> limits(p, 3)
    Limits(fleet=3, canary=1, size=1, max_unavailable=1, max_failed=0)
    """
    b = policy.batches
    max_unavailable = max(1, b.max_unavailable.resolve(fleet, round_up=False))
    canary = min(b.canary.resolve(fleet, round_up=True), fleet, max_unavailable)
    size = min(max(1, b.size.resolve(fleet, round_up=True)), max_unavailable)
    max_failed = policy.failure.max_failed.resolve(fleet, round_up=False)
    return Limits(fleet, canary, size, max_unavailable, max_failed)


def _group_key(node: Node, label: str) -> tuple[int, str]:
    value = node.labels.get(label)
    return (0, "") if value is None else (1, value)


def _group_name(node: Node, label: str) -> str:
    value = node.labels.get(label)
    return NO_LABEL if value is None else value


def _capacities(total: int, lim: Limits) -> list[tuple[int, bool]]:
    """Batch sizes in order, with the canary flag: canary first, then chunks of ``size``."""
    caps: list[tuple[int, bool]] = []
    left = total
    if lim.canary > 0:
        caps.append((lim.canary, True))
        left -= lim.canary
    while left > 0:
        caps.append((min(lim.size, left), False))
        left -= caps[-1][0]
    return caps


def spread(nodes: Sequence[Node], label: str, capacities: Sequence[int]) -> list[list[Node]]:
    """Fill batches of the given capacities so each draws evenly from every label value.

    Each batch is filled one node at a time from the group (nodes sharing a value of
    ``label``) that has the fewest nodes in this batch so far; among those, the one with
    the most nodes left; then the one whose value sorts first (nodes lacking the label
    form a group that sorts before every value). Within a group the inventory order is
    kept. So a group gets a second node in a batch only once every group with nodes left
    has one, and big groups are drawn down first, which keeps the later batches mixed
    instead of ending on one failure domain. Groups of equal size give plain
    round-robin: a b c a b c ...

    >>> def n(i, rack): return Node(i, f"h{i}:1", {"rack": rack})
    >>> fleet = [n("a1", "a"), n("a2", "a"), n("a3", "a"), n("b1", "b"), n("b2", "b"), n("x", "")]
    >>> [[node.id for node in batch] for batch in spread(fleet, "rack", [1, 2, 2, 1])]
    [['a1'], ['a2', 'b1'], ['x', 'a3'], ['b2']]
    """
    groups: dict[tuple[int, str], list[Node]] = {}
    for node in nodes:
        groups.setdefault(_group_key(node, label), []).append(node)
    queues = [list(reversed(groups[key])) for key in sorted(groups)]  # pop() = next in order
    batches: list[list[Node]] = []
    for capacity in capacities:
        taken = [0] * len(queues)
        batch: list[Node] = []
        for _ in range(capacity):
            candidates = [g for g, q in enumerate(queues) if q]
            if not candidates:
                break
            g = min(candidates, key=lambda g: (taken[g], -len(queues[g]), g))
            batch.append(queues[g].pop())
            taken[g] += 1
        batches.append(batch)
    return batches


def plan_batches(nodes: Sequence[Node], policy: Policy) -> tuple[Batch, ...]:
    """Cut ``nodes`` into batches per ``policy.batches`` (module docstring: sizes, order).

    Node ids are assumed unique (the inventory guarantees it). An empty fleet gives ().

    >>> from rollout.policy import parse_policy
    >>> fleet = [Node(f"n{i}", f"10.0.0.{i}:7000") for i in range(1, 8)]
    >>> policy = parse_policy({"batches": {"canary": 1, "size": 3, "max_unavailable": 3}}, "x")
    >>> [(b.index, b.canary, b.node_ids) for b in plan_batches(fleet, policy)]
    [(1, True, ('n1',)), (2, False, ('n2', 'n3', 'n4')), (3, False, ('n5', 'n6', 'n7'))]
    """
    if not nodes:
        return ()
    caps = _capacities(len(nodes), limits(policy, len(nodes)))
    label = policy.batches.spread_by
    if label:
        chunks = spread(nodes, label, [c for c, _ in caps])
    else:
        chunks, start = [], 0
        for c, _ in caps:
            chunks.append(list(nodes[start : start + c]))
            start += c
    return tuple(
        Batch(index=i, nodes=tuple(chunk), canary=canary)
        for i, (chunk, (_, canary)) in enumerate(zip(chunks, caps, strict=True), start=1)
    )


def describe(batches: Sequence[Batch], spread_by: str | None) -> list[dict[str, Any]]:
    """A JSON-friendly view of a plan, one dict per batch, for ``rollout plan``.

    Keys: ``number`` (1-based), ``canary``, ``size``, ``nodes`` (ids in order) and
    ``spread`` (nodes per ``spread_by`` value, sorted by value, `NO_LABEL` for nodes
    without the label; empty when ``spread_by`` is None).

    >>> b = Batch(1, (Node("n1", "h:1", {"rack": "r2"}), Node("n2", "h:2")), canary=True)
    >>> row = describe([b], "rack")[0]
    >>> row["number"], row["canary"], row["size"], row["nodes"], row["spread"]
    (1, True, 2, ['n1', 'n2'], {'(none)': 1, 'r2': 1})
    """
    out: list[dict[str, Any]] = []
    for batch in batches:
        spread: dict[str, int] = {}
        if spread_by:
            for node in sorted(batch.nodes, key=lambda n: _group_key(n, spread_by)):
                name = _group_name(node, spread_by)
                spread[name] = spread.get(name, 0) + 1
        out.append(
            {
                "number": batch.index,
                "canary": batch.canary,
                "size": len(batch.nodes),
                "nodes": list(batch.node_ids),
                "spread": spread,
            }
        )
    return out
