"""The planner, as tables: sizes and rounding, caps, spreading, and its invariants."""

from __future__ import annotations

import doctest
import itertools
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest

import rollout.plan
from rollout.model import Batch, Node
from rollout.plan import NO_LABEL, Limits, describe, limits, plan_batches
from rollout.policy import Policy, parse_policy


def test_docstring_examples() -> None:
    result = doctest.testmod(rollout.plan)
    assert result.attempted > 0 and result.failed == 0


def fleet(n: int) -> list[Node]:
    return [Node(f"n{i:02d}", f"10.0.0.{i}:7000") for i in range(1, n + 1)]


def racked(*sizes: int, missing: int = 0) -> list[Node]:
    """Racks r1, r2 ... of the given sizes, then `missing` nodes without a rack label."""
    nodes = [
        Node(f"r{r}-{i}", f"10.{r}.0.{i}:7000", {"rack": f"r{r}"})
        for r, size in enumerate(sizes, start=1)
        for i in range(1, size + 1)
    ]
    nodes += [Node(f"x-{i}", f"10.9.0.{i}:7000", {"zone": "a"}) for i in range(1, missing + 1)]
    return nodes


def policy(**batches: Any) -> Policy:
    return parse_policy({"batches": batches}, "test")


def sizes(batches: Sequence[Batch]) -> list[int]:
    return [len(b.nodes) for b in batches]


# -- sizes and rounding ---------------------------------------------------------------------

LIMITS = [
    # fleet, batches, max_failed, expected (canary, size, max_unavailable, max_failed)
    (10, {}, 0, (1, 2, 2, 0)),  # defaults: 25% of 10 -> size ceil 3, max_unav floor 2
    (8, {}, "10%", (1, 2, 2, 0)),
    (12, {}, "10%", (1, 3, 3, 1)),
    (20, {}, "10%", (1, 5, 5, 2)),
    (3, {}, 0, (1, 1, 1, 0)),  # 25% of 3 floors to 0 -> max_unavailable at least 1
    (1, {}, 0, (1, 1, 1, 0)),
    (10, {"canary": 0}, 0, (0, 2, 2, 0)),
    (3, {"canary": 10, "max_unavailable": "100%"}, 0, (3, 1, 3, 0)),  # canary capped at fleet
    (5, {"canary": "50%", "max_unavailable": "100%"}, 0, (3, 2, 5, 0)),  # canary rounds up
    (10, {"canary": 5, "size": 4, "max_unavailable": 2}, 0, (2, 2, 2, 0)),  # both capped
    (10, {"size": "1%", "max_unavailable": "100%"}, 0, (1, 1, 10, 0)),  # size rounds up to 1
    (10, {"size": "33%", "max_unavailable": "100%"}, 3, (1, 4, 10, 3)),
    (10, {"size": "50%", "max_unavailable": "30%"}, "100%", (1, 3, 3, 10)),
    (30, {"size": "10%", "max_unavailable": "10%"}, 0, (1, 3, 3, 0)),  # exact: 10% of 30 = 3
    (5, {"max_unavailable": "10%"}, 0, (1, 1, 1, 0)),
]


@pytest.mark.parametrize(("n", "batches", "max_failed", "expected"), LIMITS)
def test_limits(
    n: int, batches: dict[str, Any], max_failed: object, expected: tuple[int, ...]
) -> None:
    p = parse_policy({"batches": batches, "failure": {"max_failed": max_failed}}, "t")
    assert limits(p, n) == Limits(n, *expected)


PLANS = [
    # fleet, batches, expected batch sizes, first batch is a canary
    (10, {}, [1, 2, 2, 2, 2, 1], True),
    (8, {}, [1, 2, 2, 2, 1], True),
    (4, {}, [1, 1, 1, 1], True),
    (1, {}, [1], True),
    (6, {"canary": 0, "size": 2, "max_unavailable": 2}, [2, 2, 2], False),
    (3, {"canary": 10, "max_unavailable": "100%"}, [3], True),  # canary larger than the fleet
    (5, {"canary": "50%", "size": "25%", "max_unavailable": "100%"}, [3, 2], True),
    (5, {"canary": 0, "size": 100, "max_unavailable": "100%"}, [5], False),  # size > fleet
    (5, {"canary": 1, "size": "100%", "max_unavailable": "100%"}, [1, 4], True),
    (5, {"canary": 1, "size": 50, "max_unavailable": 50}, [1, 4], True),
    (10, {"canary": 5, "size": 3, "max_unavailable": 2}, [2, 2, 2, 2, 2], True),  # cap both
    (10, {"canary": 1, "size": "50%", "max_unavailable": "30%"}, [1, 3, 3, 3], True),
    (10, {"canary": 0, "size": "1%", "max_unavailable": "100%"}, [1] * 10, False),
    (10, {"canary": 1, "size": "33%", "max_unavailable": "100%"}, [1, 4, 4, 1], True),
    (7, {"canary": 1, "size": 3, "max_unavailable": 3}, [1, 3, 3], True),
    (2, {"canary": "100%", "max_unavailable": "100%"}, [2], True),
]


@pytest.mark.parametrize(("n", "batches", "expected", "canary"), PLANS)
def test_plan_sizes(n: int, batches: dict[str, Any], expected: list[int], canary: bool) -> None:
    plan = plan_batches(fleet(n), policy(**batches))
    assert sizes(plan) == expected
    assert [b.canary for b in plan] == [canary] + [False] * (len(plan) - 1)
    assert [b.index for b in plan] == list(range(1, len(plan) + 1))
    # without spread_by the batches are consecutive stretches of the inventory order
    assert [n.id for b in plan for n in b.nodes] == [n.id for n in fleet(n)]


def test_empty_fleet() -> None:
    assert plan_batches([], Policy()) == ()


# -- spreading ------------------------------------------------------------------------------

SPREADS = [
    # rack sizes, missing-label nodes, batches, expected batches (node ids)
    (
        (3, 3, 3),
        0,
        {"canary": 0, "size": 3, "max_unavailable": 3},
        [["r1-1", "r2-1", "r3-1"], ["r1-2", "r2-2", "r3-2"], ["r1-3", "r2-3", "r3-3"]],
    ),
    (  # equal racks, batch smaller than the number of racks: plain round-robin
        (2, 2, 2),
        0,
        {"canary": 0, "size": 2, "max_unavailable": 2},
        [["r1-1", "r2-1"], ["r3-1", "r1-2"], ["r2-2", "r3-2"]],
    ),
    (  # uneven racks 5, 3, 1: the big rack is drawn down first; two of r1 only when forced
        (5, 3, 1),
        0,
        {"canary": 1, "size": 3, "max_unavailable": 3},
        [["r1-1"], ["r1-2", "r2-1", "r3-1"], ["r1-3", "r2-2", "r1-4"], ["r1-5", "r2-3"]],
    ),
    (  # the module docstring's worked example
        (5, 3, 2),
        0,
        {"canary": 1, "size": "25%", "max_unavailable": "25%"},
        [
            ["r1-1"],
            ["r1-2", "r2-1"],
            ["r1-3", "r2-2"],
            ["r1-4", "r3-1"],
            ["r1-5", "r2-3"],
            ["r3-2"],
        ],
    ),
    (  # nodes without the label form a group, sorted before every value
        (2, 2),
        2,
        {"canary": 0, "size": 3, "max_unavailable": 3},
        [["x-1", "r1-1", "r2-1"], ["x-2", "r1-2", "r2-2"]],
    ),
    (  # one rack only: inventory order
        (4,),
        0,
        {"canary": 1, "size": 2, "max_unavailable": 2},
        [["r1-1"], ["r1-2", "r1-3"], ["r1-4"]],
    ),
    (  # no node has the label: inventory order
        (),
        3,
        {"canary": 1, "size": 2, "max_unavailable": 2},
        [["x-1"], ["x-2", "x-3"]],
    ),
]


@pytest.mark.parametrize(("racks", "missing", "batches", "expected"), SPREADS)
def test_spread(
    racks: tuple[int, ...], missing: int, batches: dict[str, Any], expected: list[list[str]]
) -> None:
    plan = plan_batches(racked(*racks, missing=missing), policy(spread_by="rack", **batches))
    assert [list(b.node_ids) for b in plan] == expected


def test_spread_keeps_inventory_order_within_a_rack() -> None:
    nodes = [
        Node("b-late", "h:1", {"rack": "b"}),
        Node("a-2", "h:2", {"rack": "a"}),
        Node("b-early", "h:3", {"rack": "b"}),
        Node("a-1", "h:4", {"rack": "a"}),
    ]
    plan = plan_batches(nodes, policy(canary=0, size=2, max_unavailable=2, spread_by="rack"))
    assert [b.node_ids for b in plan] == [("a-2", "b-late"), ("a-1", "b-early")]


# -- invariants over many combinations ------------------------------------------------------

FLEETS = {
    "plain-1": fleet(1),
    "plain-7": fleet(7),
    "plain-20": fleet(20),
    "racks-5-3-1": racked(5, 3, 1),
    "racks-4-4-4": racked(4, 4, 4),
    "racks-10-1-1+2": racked(10, 1, 1, missing=2),
    "racks-1x13": racked(*[1] * 13),
}
AMOUNTS: list[dict[str, Any]] = [
    {"canary": c, "size": s, "max_unavailable": m}
    for c, s, m in itertools.product(
        [0, 1, "50%", 20], [1, 2, "25%", "100%"], [1, 3, "25%", "100%"]
    )
]


def _rack(node: Node) -> str:
    return node.labels.get("rack", NO_LABEL)


@pytest.mark.parametrize("spread_by", [None, "rack"])
@pytest.mark.parametrize("name", sorted(FLEETS))
def test_invariants(name: str, spread_by: str | None) -> None:
    nodes = FLEETS[name]
    for batches in AMOUNTS:
        p = policy(spread_by=spread_by, **batches)
        plan = plan_batches(nodes, p)
        lim = limits(p, len(nodes))
        ids = [n.id for b in plan for n in b.nodes]
        assert sorted(ids) == sorted(n.id for n in nodes), batches  # each node exactly once
        assert len(ids) == len(set(ids))
        assert all(0 < len(b.nodes) <= lim.max_unavailable for b in plan), batches
        assert [b.index for b in plan] == list(range(1, len(plan) + 1))
        assert [b.canary for b in plan][1:] == [False] * (len(plan) - 1)
        assert plan[0].canary == (lim.canary > 0)
        if lim.canary:
            assert len(plan[0].nodes) == lim.canary
        assert all(len(b.nodes) == lim.size for b in plan[1:-1]), batches
        if spread_by:
            _assert_even(plan)


def _assert_even(plan: Sequence[Batch]) -> None:
    """No batch takes a 2nd node of a rack while another rack with nodes left has none."""
    left = Counter(_rack(n) for b in plan for n in b.nodes)
    for batch in plan:
        taken = Counter(_rack(n) for n in batch.nodes)
        left -= taken
        for g, h in itertools.permutations(set(left) | set(taken), 2):
            if taken[g] >= taken[h] + 2:
                assert left[h] == 0, (batch.node_ids, g, h)


# -- describe -------------------------------------------------------------------------------


def test_describe_with_spread() -> None:
    plan = plan_batches(
        racked(2, 1, missing=1), policy(canary=1, size=3, max_unavailable=3, spread_by="rack")
    )
    assert describe(plan, "rack") == [
        {"number": 1, "canary": True, "size": 1, "nodes": ["r1-1"], "spread": {"r1": 1}},
        {
            "number": 2,
            "canary": False,
            "size": 3,
            "nodes": ["x-1", "r1-2", "r2-1"],
            "spread": {NO_LABEL: 1, "r1": 1, "r2": 1},
        },
    ]


def test_describe_without_spread() -> None:
    plan = plan_batches(fleet(3), policy(canary=0, size=2, max_unavailable=2))
    assert describe(plan, None) == [
        {"number": 1, "canary": False, "size": 2, "nodes": ["n01", "n02"], "spread": {}},
        {"number": 2, "canary": False, "size": 1, "nodes": ["n03"], "spread": {}},
    ]
