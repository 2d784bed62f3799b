"""The engine against a real local fleet: agent processes, real image bytes, real reboots."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

from rollout.drivers.agent import AgentDriver
from rollout.engine import Engine
from rollout.events import BytesSent, Event, NodeChanged
from rollout.metrics import MetricsRecorder
from rollout.model import Image, Node, NodePhase, NodeStatus, RolloutPhase
from rollout.plan import plan_batches
from rollout.policy import Policy, parse_policy
from rollout.record import RolloutResult
from tests.conftest import LocalFleet, SampleImages


def fast_policy(**over: Any) -> Policy:
    """A policy with short timings for tests; `over` replaces whole sections."""
    data: dict[str, Any] = {
        "activation": "reboot",
        "batches": {"canary": 1, "size": "50%", "max_unavailable": "50%"},
        "health": {
            "checks": [{"type": "http", "port": 8080, "path": "/healthz"}, {"type": "agent"}],
            "interval": 0.2,
            "min_healthy_time": 0.6,
            "deadline": 15,
            "boot_timeout": 20,
            "failure_threshold": 4,
        },
        "failure": {"max_failed": 0, "action": "rollback"},
    }
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = data[key] | value
        else:
            data[key] = value
    return parse_policy(data, "test-policy")


async def statuses(nodes: tuple[Node, ...]) -> dict[str, NodeStatus]:
    driver = AgentDriver()
    try:
        found = await asyncio.gather(*(driver.status(n) for n in nodes))
    finally:
        await driver.close()
    return {n.id: s for n, s in zip(nodes, found, strict=True)}


async def run(
    fl: LocalFleet, policy: Policy, image: Image, observer: Callable[[Event], None] | None = None
) -> tuple[RolloutResult, list[Event]]:
    events: list[Event] = []

    def observe(e: Event) -> None:
        events.append(e)
        if observer is not None:
            observer(e)

    driver = AgentDriver()
    engine = Engine(driver, policy, image, observe, policy_name="test")
    try:
        result = await engine.run(plan_batches(fl.nodes, policy))
    finally:
        await driver.close()
    return result, events


async def test_success_updates_every_node_once(
    make_fleet: Callable[..., LocalFleet], images: SampleImages
) -> None:
    fl = make_fleet(4)
    before = await statuses(fl.nodes)
    recorder = MetricsRecorder()
    result, events = await run(fl, fast_policy(), images.v2, recorder)

    assert result.phase is RolloutPhase.SUCCEEDED, [r.detail for r in result.nodes.values()]
    after = await statuses(fl.nodes)
    for node in fl.nodes:
        assert after[node.id].booted_digest == images.v2.digest
        assert after[node.id].committed
        assert after[node.id].boot_count == before[node.id].boot_count + 1
    sent = sum(e.count for e in events if isinstance(e, BytesSent))
    assert sent == 4 * images.v2.size
    reg = recorder.registry
    rid = {"rollout": result.rollout_id}
    assert reg.get_sample_value("rollout_image_bytes_transferred_total", rid) == sent
    assert reg.get_sample_value("rollout_node_updates_total", rid | {"result": "committed"}) == 4
    assert reg.get_sample_value("rollout_nodes", rid | {"state": "committed"}) == 4
    assert reg.get_sample_value("rollout_batch_current", rid) == 3  # canary, 2, 1
    assert (
        reg.get_sample_value(
            "rollout_node_step_duration_seconds_count", rid | {"step": "boot", "result": "ok"}
        )
        == 4
    )
    # The canary finished before any other node started.
    canary = result.nodes[fl.nodes[0].id].node.id
    order = [e for e in events if isinstance(e, NodeChanged)]
    committed_at = next(
        i for i, e in enumerate(order) if e.node_id == canary and e.phase is NodePhase.COMMITTED
    )
    first_other = next(i for i, e in enumerate(order) if e.node_id != canary)
    assert committed_at < first_other


async def test_rerun_skips_done_nodes(
    make_fleet: Callable[..., LocalFleet], images: SampleImages
) -> None:
    fl = make_fleet(3)
    first, _ = await run(fl, fast_policy(), images.v2)
    assert first.succeeded
    mid = await statuses(fl.nodes)
    second, events = await run(fl, fast_policy(), images.v2)
    assert second.succeeded
    assert {r.phase for r in second.nodes.values()} == {NodePhase.SKIPPED}
    assert not [e for e in events if isinstance(e, BytesSent)]
    after = await statuses(fl.nodes)
    assert {n: s.boot_count for n, s in after.items()} == {n: s.boot_count for n, s in mid.items()}


async def test_canary_failure_rolls_back_and_spares_the_rest(
    make_fleet: Callable[..., LocalFleet], images: SampleImages
) -> None:
    fl = make_fleet(4)
    before = await statuses(fl.nodes)
    result, _ = await run(fl, fast_policy(), images.bad)

    assert result.phase is RolloutPhase.ROLLED_BACK
    assert result.exit_code == 1
    canary = fl.nodes[0].id
    assert result.nodes[canary].failed
    assert result.nodes[canary].phase is NodePhase.ROLLED_BACK
    after = await statuses(fl.nodes)
    for node in fl.nodes:
        assert after[node.id].booted_digest == images.v1.digest
        assert after[node.id].committed
    # Canary: one boot into the bad image, one back. Others: never touched.
    assert after[canary].boot_count == before[canary].boot_count + 2
    for node in fl.nodes[1:]:
        assert after[node.id].boot_count == before[node.id].boot_count
        assert result.nodes[node.id].phase is NodePhase.PENDING


async def test_halt_stops_after_failed_batch(
    make_fleet: Callable[..., LocalFleet], images: SampleImages
) -> None:
    fl = make_fleet(3)
    policy = fast_policy(failure={"action": "halt"}, activation="kexec")
    result, _ = await run(fl, policy, images.bad)
    assert result.phase is RolloutPhase.HALTED
    phases = [result.nodes[n.id].phase for n in fl.nodes]
    assert phases == [NodePhase.ROLLED_BACK, NodePhase.PENDING, NodePhase.PENDING]
    after = await statuses(fl.nodes)
    assert all(s.done(images.v1.digest) for s in after.values())


async def test_continue_tries_every_batch(
    make_fleet: Callable[..., LocalFleet], images: SampleImages
) -> None:
    fl = make_fleet(3)
    policy = fast_policy(
        failure={"action": "continue"},
        activation="soft-reboot",
        batches={"canary": 1, "size": 2, "max_unavailable": 2},
    )
    result, _ = await run(fl, policy, images.bad)
    assert result.phase is RolloutPhase.FAILED
    assert all(r.failed and r.phase is NodePhase.ROLLED_BACK for r in result.nodes.values())
    after = await statuses(fl.nodes)
    assert all(s.done(images.v1.digest) for s in after.values())


async def test_rollback_all_returns_every_updated_node(
    make_fleet: Callable[..., LocalFleet],
    images: SampleImages,
    tcp_listeners: Callable[[str, int], socket.socket],
) -> None:
    fl = make_fleet(3)
    # The tcp check passes on the first two nodes only: batch 3 (the last node) fails.
    for node in fl.nodes[:2]:
        tcp_listeners(node.host, 9099)
    policy = fast_policy(
        failure={"action": "rollback-all"},
        batches={"canary": 1, "size": 1, "max_unavailable": 1},
        health={"checks": [{"type": "tcp", "port": 9099}, {"type": "agent"}]},
    )
    result, _ = await run(fl, policy, images.v2)
    assert result.phase is RolloutPhase.ROLLED_BACK
    assert [r.phase for r in result.nodes.values()] == [NodePhase.ROLLED_BACK] * 3
    assert [r.failed for r in result.nodes.values()] == [False, False, True]
    after = await statuses(fl.nodes)
    assert all(s.done(images.v1.digest) for s in after.values())


async def test_unreachable_node_fails_without_activation(
    make_fleet: Callable[..., LocalFleet], images: SampleImages
) -> None:
    fl = make_fleet(2)
    ghost = Node("ghost", f"{fl.nodes[0].host}:7999", {}, fl.nodes[0].token_file)
    policy = fast_policy(failure={"action": "halt"})
    driver = AgentDriver()
    engine = Engine(driver, policy, images.v2, lambda e: None, reach_timeout=1.0)
    try:
        result = await engine.run(plan_batches((ghost, *fl.nodes), policy))
    finally:
        await driver.close()
    assert result.phase is RolloutPhase.HALTED
    assert result.nodes["ghost"].phase is NodePhase.FAILED
    assert str(result.nodes["ghost"].reason) == "unreachable"
    after = await statuses(fl.nodes)
    assert all(s.done(images.v1.digest) for s in after.values())
