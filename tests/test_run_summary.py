"""The summary `rollout run` prints at the end: every node of a small fleet; for a large
one, the nodes counted by phase and only those that need a look, most urgent first."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from rollout.commands.run import SUMMARY_ROWS, phase_counts, print_result, summary_records
from rollout.model import Node, NodePhase, RolloutPhase
from rollout.record import NodeRecord, RolloutResult

C, F, P = NodePhase.COMMITTED, NodePhase.FAILED, NodePhase.PENDING


def result(phases: list[NodePhase], phase: RolloutPhase = RolloutPhase.HALTED) -> RolloutResult:
    nodes = {
        f"n{i:03d}": NodeRecord(Node(f"n{i:03d}", f"127.0.0.{i % 250 + 2}:7000"), i // 10, p)
        for i, p in enumerate(phases)
    }
    return RolloutResult("r-1", phase, "batch 2 failed", nodes)


def listed(res: RolloutResult, limit: int = SUMMARY_ROWS) -> list[tuple[str, NodePhase]]:
    return [(r.node.id, r.phase) for r in summary_records(res, limit)]


@pytest.mark.parametrize(
    ("name", "phases", "limit", "expected"),
    [
        (
            "small fleet: every node, in plan order",
            [C, F, P],
            3,
            [("n000", C), ("n001", F), ("n002", P)],
        ),
        ("large, all committed: none listed", [C] * 4, 3, []),
        (
            "large: done, pending and staged only counted",
            [C, P, NodePhase.STAGED, F],
            3,
            [("n003", F)],
        ),
        (
            "large: not settled first, then failed, then rolled back",
            [NodePhase.ROLLED_BACK, F, C, NodePhase.BOOTING, NodePhase.ROLLBACK_FAILED],
            4,
            [
                ("n004", NodePhase.ROLLBACK_FAILED),
                ("n003", NodePhase.BOOTING),
                ("n001", F),
                ("n000", NodePhase.ROLLED_BACK),
            ],
        ),
        (
            "large: at most `limit`, plan order within a phase",
            [F, F, F, F, C],
            2,
            [("n000", F), ("n001", F)],
        ),
    ],
)
def test_summary_records(
    name: str, phases: list[NodePhase], limit: int, expected: list[tuple[str, NodePhase]]
) -> None:
    assert listed(result(phases), limit) == expected, name


def test_phase_counts_most_first() -> None:
    assert phase_counts(result([F, C, C, P, C])) == "3 committed, 1 failed, 1 pending"


def printed(res: RolloutResult) -> str:
    out = io.StringIO()
    print_result(res, Console(file=out, width=200, color_system=None))
    return out.getvalue()


def test_small_fleet_table_lists_every_node() -> None:
    text = printed(result([C] * (SUMMARY_ROWS - 1) + [F]))
    assert all(f"n{i:03d}" in text for i in range(SUMMARY_ROWS))
    assert "rollout r-1: halted" in text and "need a look" not in text


def test_large_fleet_counts_and_lists_what_needs_a_look() -> None:
    phases = [C] * 9_990 + [F] * 60 + [NodePhase.VERIFYING]
    text = printed(result(phases))
    assert "rollout r-1: halted, 10,051 nodes: 9,990 committed, 60 failed, 1 verifying" in text
    assert f"nodes that need a look (the first {SUMMARY_ROWS} of 61)" in text
    rows = [line.split()[1] for line in text.splitlines() if line.startswith("│ n")]
    assert rows[0] == "n10050"  # the node in flight first
    assert len(rows) == SUMMARY_ROWS and rows[1:4] == ["n9990", "n9991", "n9992"]
    assert "n000" not in rows and "n9989" not in rows  # committed nodes are only counted
    assert "every node: --output json, or `rollout show r-1 --state FILE`" in text
    assert "not settled: n10050" in text  # the node left in flight is still named


def test_large_fleet_all_committed_prints_no_table() -> None:
    text = printed(result([C] * (SUMMARY_ROWS + 1), RolloutPhase.SUCCEEDED))
    assert f"{SUMMARY_ROWS + 1} nodes: {SUMMARY_ROWS + 1} committed" in text
    assert "need a look" not in text and "n000" not in text
