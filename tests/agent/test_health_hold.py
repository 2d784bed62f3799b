"""Held health rounds against real agents (rollout.health: `watch` over `Prober.hold`):
with only `agent` checks, a passing node is watched with one status long poll over the
rest of min_healthy_time, which the agent answers the moment its workload changes."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from rollout.health import CheckResult, Prober, Verdict, probe_session, watch
from rollout.model import Node, NodeStatus
from rollout.policy import AgentCheck, Health, TcpCheck
from tests.agent.conftest import StartAgent
from tests.agent.harness import AGENT_PORT, WORKLOAD_PORT, AgentProc
from tests.agent.test_watch import CountingDriver
from tests.conftest import SampleImages
from tests.helpers import wait_for_async


async def running(start_agent: StartAgent) -> tuple[AgentProc, dict[str, Any]]:
    """A started agent whose workload runs, and that status."""
    agent = await start_agent()
    st = await agent.wait_status(lambda s: s["workload"]["state"] == "running", "running")
    return agent, st


async def watched(
    agent: AgentProc, tmp_path: Path, health: Health, digest: str,
    during: Callable[[CountingDriver], Awaitable[None]] | None = None,
    booted: NodeStatus | None = None, seen: list[str] | None = None,
) -> tuple[Verdict, str, list[str]]:  # fmt: skip
    """`health.watch` of the agent's node to `digest` with the real prober and driver
    (`during` runs meanwhile; `booted` the boot wait's status; each result's "kind:
    detail" into `seen`): the verdict, its detail, and the driver's status calls.
    Within 15 s: rounds of 20 s or more could not end sooner."""
    node = Node("n1", f"{agent.host}:{AGENT_PORT}", {}, str(tmp_path / "token"))
    driver = CountingDriver()

    def result(r: CheckResult) -> None:
        if seen is not None:
            seen.append(f"{r.kind}: {r.detail}")

    async with probe_session() as session:
        try:
            task = asyncio.create_task(
                watch(Prober(driver, session), health, node, digest, result, booted)
            )
            if during is not None:
                await during(driver)
            verdict, detail = await asyncio.wait_for(task, 15)
        finally:
            await driver.close()
    return verdict, detail, driver.calls


async def test_a_passing_node_is_held_not_polled(
    start_agent: StartAgent, images: SampleImages, tmp_path: Path
) -> None:
    agent, _ = await running(start_agent)
    health = Health(checks=(AgentCheck(),), interval=0.25, min_healthy_time=2, deadline=30)
    verdict, detail, calls = await watched(agent, tmp_path, health, images.v1.digest)
    assert (verdict, detail) == (Verdict.HEALTHY, "")
    # In rounds every 0.25 s over 2 s: nine status reads.
    assert calls[0] == "status" and calls.count("status") == 1, calls
    assert 1 <= calls.count("watch") <= 2, calls


async def test_a_crash_during_the_hold_is_seen_at_once(
    start_agent: StartAgent, images: SampleImages, tmp_path: Path
) -> None:
    """Rounds 20 s apart: only the held poll can see the crash within `watched`'s
    deadline (15 s), and it fails the node at the first failed round (threshold 1)."""
    agent, st = await running(start_agent)
    health = Health(
        checks=(AgentCheck(),), interval=20, min_healthy_time=60, deadline=120,
        failure_threshold=1,
    )  # fmt: skip

    async def crash(driver: CountingDriver) -> None:
        await wait_for_async(lambda: _true("watch" in driver.calls), 10, what="the hold")
        os.kill(st["workload"]["pid"], signal.SIGKILL)

    verdict, detail, _ = await watched(agent, tmp_path, health, images.v1.digest, crash)
    assert verdict is Verdict.UNHEALTHY
    assert detail.startswith("agent: workload ") and "running" not in detail, detail


async def test_other_checks_keep_their_rounds(
    start_agent: StartAgent, images: SampleImages, tmp_path: Path
) -> None:
    """An `agent` check with a `tcp` one: the tcp probe has no change to wait for."""
    agent, _ = await running(start_agent)
    health = Health(
        checks=(AgentCheck(), TcpCheck(port=WORKLOAD_PORT)), interval=0.25,
        min_healthy_time=0.5, deadline=30,
    )  # fmt: skip
    verdict, _, calls = await watched(agent, tmp_path, health, images.v1.digest)
    assert verdict is Verdict.HEALTHY
    assert calls == ["status"] * 3  # rounds at 0, 0.25 and 0.5 s


async def test_a_single_round_left_stays_a_round(
    start_agent: StartAgent, images: SampleImages, tmp_path: Path
) -> None:
    """One round left (0.25 s of 0.25 s rounds) is the same one request either way:
    rounds at 0 and 0.25 s. Two left (0.5 s) are held."""
    agent, _ = await running(start_agent)
    health = Health(checks=(AgentCheck(),), interval=0.25, min_healthy_time=0.25, deadline=30)
    verdict, _, calls = await watched(agent, tmp_path, health, images.v1.digest)
    assert verdict is Verdict.HEALTHY
    assert calls == ["status"] * 2
    health = Health(checks=(AgentCheck(),), interval=0.25, min_healthy_time=0.5, deadline=30)
    verdict, _, calls = await watched(agent, tmp_path, health, images.v1.digest)
    assert verdict is Verdict.HEALTHY
    assert calls == ["status", "watch"]


async def test_the_boot_wait_s_status_is_the_first_round(
    start_agent: StartAgent, images: SampleImages, tmp_path: Path
) -> None:
    """Given the status the boot wait read, `agent` checks ask nothing for their first
    round; a status that fails them is a failed round like any other; a `tcp` check
    still makes its own first round."""
    agent, st = await running(start_agent)
    node = Node("n1", f"{agent.host}:{AGENT_PORT}", {}, str(tmp_path / "token"))
    health = Health(checks=(AgentCheck(),), interval=0.25, min_healthy_time=0.5, deadline=30)
    counting = CountingDriver()
    booted = await counting.status(node)
    counting.calls.clear()
    verdict, _, calls = await watched(agent, tmp_path, health, images.v1.digest, booted=booted)
    assert verdict is Verdict.HEALTHY
    assert calls == ["watch"]  # in place of rounds at 0, 0.25 and 0.5 s
    starting = dataclasses.replace(booted, workload="starting", tag=None)
    seen: list[str] = []
    verdict, _, calls = await watched(
        agent, tmp_path, health, images.v1.digest, booted=starting, seen=seen
    )
    assert verdict is Verdict.HEALTHY
    assert seen[0] == "agent: workload starting"  # the first round, failed, from the status
    assert calls[0] == "status"  # then rounds again
    both = Health(
        checks=(AgentCheck(), TcpCheck(port=WORKLOAD_PORT)), interval=0.25,
        min_healthy_time=0.25, deadline=30,
    )  # fmt: skip
    verdict, _, calls = await watched(agent, tmp_path, both, images.v1.digest, booted=booted)
    assert verdict is Verdict.HEALTHY
    assert calls == ["status"] * 2
    await counting.close()
    assert st["workload"]["state"] == "running"


async def _true(value: bool) -> bool:
    return value
