"""Pre-staging (policy `prestage`) on virtual time, over simulated nodes.

Staging takes 30 s per node here, so whether it overlapped earlier batches shows in the
exact virtual duration; activation order, the fleet-wide cap and the clean-up of images
staged ahead of a rollout that stops are asserted directly on the simulated fleet. The
same paths against real agents pulling from a real registry are in tests/test_pull.py.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from rollout import clock
from rollout.drivers.sim import Healthy, SimDriver, SimFleet, SimProber
from rollout.engine import Engine
from rollout.model import Image, Node, NodePhase, RolloutPhase
from rollout.plan import plan_batches
from rollout.policy import Policy, parse_policy
from rollout.record import NodeRecord, RolloutResult
from tests.helpers import seen_at

pytestmark = pytest.mark.looptime

V1 = Image("v1.img", "sha256:" + "1" * 64, "app", "1.0", 100)
V2 = Image("v2.img", "sha256:" + "2" * 64, "app", "2.0", 100)
NODES = tuple(Node(f"n{i}", f"10.0.0.{i}:7000") for i in range(1, 7))
STAGE = 30.0
BOOT = 10.1  # seen at the boot poll after (rollout.steps.poll_delay): 10.108
BATCH = seen_at(BOOT) + 20  # boot, then min_healthy_time (20 s at a 5 s interval)


def policy(prestage: Any, **over: Any) -> Policy:
    data: dict[str, Any] = {
        "batches": {"canary": 1, "size": 2, "max_unavailable": 2},  # 1 + 2 + 2 + 1
        "health": {"checks": [{"type": "agent"}], "interval": 5, "min_healthy_time": 20,
                   "deadline": 120, "boot_timeout": 60},
        "failure": {"max_failed": 0, "action": "rollback"},
        "prestage": prestage,
    } | over  # fmt: skip
    return parse_policy(data, "virtual")


async def run(pol: Policy, healthy: Healthy) -> tuple[RolloutResult, SimFleet, float]:
    fleet = SimFleet(NODES, V1, boot_seconds=BOOT, stage_seconds=STAGE)
    driver = SimDriver(fleet)
    engine = Engine(driver, pol, V2, lambda e: None, prober_for=lambda _: SimProber(fleet, healthy))
    start = clock.now()
    result = await engine.run(plan_batches(NODES, pol))
    await driver.close()
    return result, fleet, clock.now() - start


def always(node: str, digest: str, since_boot: float) -> bool:
    return True


def activation_order(fleet: SimFleet) -> list[str]:
    return [node for node, _ in fleet.activations]


@pytest.mark.parametrize(
    ("name", "prestage", "expected"),
    [
        # Each batch stages (30 s), then boots and bakes.
        ("none: every batch stages in turn", "none", 4 * (STAGE + BATCH)),
        # The next batch stages while this one boots and bakes (30 s < 30.1 s): only the
        # canary waits for its own stage.
        ("next-batch: later batches find their image there", "next-batch", STAGE + 4 * BATCH),
        # All later batches stage at once from the start, under the cap of 10.
        ("all: the same, everything staged during the canary", "all", STAGE + 4 * BATCH),
    ],
)
async def test_prestage_overlaps_staging_with_earlier_batches(
    name: str, prestage: str, expected: float
) -> None:
    result, fleet, took = await run(policy(prestage), always)
    assert result.phase is RolloutPhase.SUCCEEDED, name
    assert took == pytest.approx(expected, abs=0.3), name
    assert activation_order(fleet) == ["n1", "n2", "n3", "n4", "n5", "n6"], name
    assert all(r.phase is NodePhase.COMMITTED for r in result.nodes.values()), name


async def test_the_fleet_wide_cap_bounds_prestage_transfers() -> None:
    # Cap 1: five later nodes stage one after another, 30 s each, from the canary's start.
    result, fleet, _ = await run(policy({"mode": "all", "max_concurrent": 1}), always)
    assert result.phase is RolloutPhase.SUCCEEDED
    starts = sorted(t for node, t in fleet.stages if node != "n1")
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert all(g >= STAGE - 0.01 for g in gaps), gaps


async def test_images_staged_ahead_of_a_halted_rollout_are_discarded() -> None:
    bad = lambda node, digest, t: digest != V2.digest  # noqa: E731 - v2 never healthy
    result, fleet, _ = await run(policy("all", failure={"max_failed": 0, "action": "halt"}), bad)
    assert result.phase is RolloutPhase.HALTED
    assert activation_order(fleet) == ["n1"]  # gates and failures still decide
    later = ["n2", "n3", "n4", "n5", "n6"]
    assert sorted(fleet.discards) == later
    for node in later:
        assert fleet[node].staged is None and fleet[node].slots["B"] is None
        assert result.nodes[node].phase is NodePhase.PENDING
        assert result.nodes[node].detail == "staged image discarded"


async def test_without_prestage_nothing_is_staged_ahead_or_discarded() -> None:
    bad = lambda node, digest, t: digest != V2.digest  # noqa: E731
    result, fleet, _ = await run(policy("none", failure={"max_failed": 0, "action": "halt"}), bad)
    assert result.phase is RolloutPhase.HALTED
    assert [node for node, _ in fleet.stages] == ["n1"]
    assert fleet.discards == []


async def test_stopping_after_the_canary_keeps_what_was_staged_and_the_next_run_uses_it() -> None:
    pol = policy("all")
    fleet = SimFleet(NODES, V1, boot_seconds=BOOT, stage_seconds=STAGE)
    driver = SimDriver(fleet)

    def engine(records: dict[str, NodeRecord] | None = None) -> Engine:
        return Engine(driver, pol, V2, lambda e: None, records=records,
                      prober_for=lambda _: SimProber(fleet, always))  # fmt: skip

    batches = plan_batches(NODES, pol)
    first = await engine().run(batches, stop_after=1)
    assert first.phase is RolloutPhase.PAUSED and first.stopped_as_asked
    assert fleet.discards == []
    staged = [n for n, r in first.nodes.items() if r.phase is NodePhase.STAGED]
    # The canary took 60.1 s: with the cap of 10 every later node staged in its first 30 s.
    assert sorted(staged) == ["n2", "n3", "n4", "n5", "n6"]
    stages_before = len(fleet.stages)
    second = await engine(first.nodes).run(batches)
    assert second.phase is RolloutPhase.SUCCEEDED
    assert len(fleet.stages) == stages_before  # nothing staged twice
    assert activation_order(fleet) == ["n1", "n2", "n3", "n4", "n5", "n6"]
