"""Edges of the planner and the gate schedule that the main tables leave open.

Found by mutation testing (`make mutate`): `spread` asked for more room than there are
nodes, `describe` counting two nodes of one rack, and the gate schedule's handling of
gates that lack a field (it reads them with getattr and defaults), of a canary gate when
the plan has a canary, and of a gate after exactly the last batch.
"""

from __future__ import annotations

from types import SimpleNamespace as S

from rollout.gates.schedule import after_batch, before_batch, unreachable
from rollout.model import Batch, Node
from rollout.plan import NO_LABEL, describe, spread


def racked(*racks: str) -> list[Node]:
    return [Node(f"n{i}", f"10.0.0.{i}:7000", {"rack": r}) for i, r in enumerate(racks, 1)]


def ids(batches: list[list[Node]]) -> list[list[str]]:
    return [[n.id for n in b] for b in batches]


def test_spread_with_more_room_than_nodes_keeps_the_partial_batch() -> None:
    nodes = racked("a", "b", "a")
    assert ids(spread(nodes, "rack", [2, 5, 1])) == [["n1", "n2"], ["n3"], []]


def test_an_empty_label_value_is_a_group_apart_from_a_missing_label() -> None:
    blank = [Node(i, f"{i}:7000", {"rack": ""}) for i in ("a", "c", "d")]
    nodes = [Node("b", "b:7000"), *blank]  # b lacks the label: its own group, sorted first
    assert ids(spread(nodes, "rack", [2, 2])) == [["a", "b"], ["c", "d"]]


def test_describe_counts_every_node_of_a_group() -> None:
    nodes = (*racked("r1", "r2", "r1"), Node("x", "10.0.0.9:7000"))
    (row,) = describe([Batch(2, nodes)], "rack")
    assert row == {
        "number": 2,
        "canary": False,
        "size": 4,
        "nodes": ["n1", "n2", "n3", "x"],
        "spread": {NO_LABEL: 1, "r1": 2, "r2": 1},
    }
    assert describe([Batch(1, nodes, canary=True)], None)[0]["spread"] == {}


CANARY, SECOND = S(index=1, canary=True), S(index=2, canary=False)


def names(gates: tuple[S, ...]) -> list[str]:
    return [g.name for g in gates]


def test_the_schedule_reads_missing_fields_as_their_defaults() -> None:
    no_kind = S(name="mystery", after="every", before="every")
    no_after = S(name="bake", kind="bake")
    no_before = S(name="night", kind="window")  # before defaults to every batch
    gates = [no_kind, no_after, no_before]
    assert names(after_batch(gates, CANARY)) == []
    assert names(before_batch(gates, CANARY)) == ["night"]
    assert names(before_batch(gates, SECOND)) == ["night"]


def test_unreachable_gates() -> None:
    plan = [CANARY, SECOND]
    assert unreachable([S(name="c", kind="bake", after="canary")], plan) == []
    assert unreachable([S(name="last", kind="wait", after=2)], plan) == []  # the last batch
    assert unreachable([S(kind="bake", after=3)], plan) == [
        "gate ?: after batch 3, but the plan has 2 batch(es); it never runs"
    ]
    assert unreachable([S(name="c", kind="approval", after="canary")], [SECOND]) == [
        "gate c: after the canary, but the plan has no canary batch"
    ]
    assert unreachable([S(name="odd", after=9), S(name="w", kind="window")], plan) == []
