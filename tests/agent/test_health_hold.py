"""Held health rounds against real agents (rollout.health: `watch` over `Prober.hold`):
with only `agent` checks, a passing node is watched with one status long poll over the
rest of min_healthy_time, which the agent answers the moment its workload changes."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

from rollout.health import Prober, Verdict, probe_session, watch
from rollout.model import Node
from rollout.policy import AgentCheck, Health, TcpCheck
from tests.agent.conftest import StartAgent
from tests.agent.harness import AGENT_PORT, WORKLOAD_PORT
from tests.agent.test_watch import CountingDriver
from tests.conftest import SampleImages
from tests.helpers import wait_for_async


async def test_a_passing_node_is_held_not_polled(
    start_agent: StartAgent, images: SampleImages, tmp_path: Path
) -> None:
    agent = await start_agent()
    await agent.wait_status(lambda s: s["workload"]["state"] == "running", "workload running")
    node = Node("n1", f"{agent.host}:{AGENT_PORT}", {}, str(tmp_path / "token"))
    health = Health(checks=(AgentCheck(),), interval=0.25, min_healthy_time=2, deadline=30)
    driver = CountingDriver()
    async with probe_session() as session:
        try:
            verdict, detail = await watch(Prober(driver, session), health, node, images.v1.digest)
        finally:
            await driver.close()
    assert (verdict, detail) == (Verdict.HEALTHY, "")
    # In rounds every 0.25 s over 2 s: nine status reads.
    assert driver.calls[0] == "status" and driver.calls.count("status") == 1, driver.calls
    assert 1 <= driver.calls.count("watch") <= 2, driver.calls


async def test_a_crash_during_the_hold_is_seen_at_once(
    start_agent: StartAgent, images: SampleImages, tmp_path: Path
) -> None:
    """Rounds 20 s apart: only the held poll can see the crash within the test's
    deadline (15 s), and it fails the node at the first failed round (threshold 1)."""
    agent = await start_agent()
    st = await agent.wait_status(lambda s: s["workload"]["state"] == "running", "running")
    node = Node("n1", f"{agent.host}:{AGENT_PORT}", {}, str(tmp_path / "token"))
    health = Health(
        checks=(AgentCheck(),), interval=20, min_healthy_time=60, deadline=120,
        failure_threshold=1,
    )  # fmt: skip
    driver = CountingDriver()
    async with probe_session() as session:
        try:
            task = asyncio.create_task(
                watch(Prober(driver, session), health, node, images.v1.digest)
            )
            await wait_for_async(lambda: _true("watch" in driver.calls), 10, what="the hold")
            os.kill(st["workload"]["pid"], signal.SIGKILL)
            verdict, detail = await asyncio.wait_for(task, 15)
        finally:
            await driver.close()
    assert verdict is Verdict.UNHEALTHY
    assert detail.startswith("agent: workload ") and "running" not in detail, detail


async def test_other_checks_keep_their_rounds(
    start_agent: StartAgent, images: SampleImages, tmp_path: Path
) -> None:
    """An `agent` check with a `tcp` one: the tcp probe has no change to wait for."""
    agent = await start_agent()
    await agent.wait_status(lambda s: s["workload"]["state"] == "running", "workload running")
    node = Node("n1", f"{agent.host}:{AGENT_PORT}", {}, str(tmp_path / "token"))
    health = Health(
        checks=(AgentCheck(), TcpCheck(port=WORKLOAD_PORT)), interval=0.25,
        min_healthy_time=0.5, deadline=30,
    )  # fmt: skip
    driver = CountingDriver()
    async with probe_session() as session:
        try:
            verdict, _ = await watch(Prober(driver, session), health, node, images.v1.digest)
        finally:
            await driver.close()
    assert verdict is Verdict.HEALTHY
    assert driver.calls == ["status"] * 3  # rounds at 0, 0.25 and 0.5 s


async def test_a_short_hold_stays_rounds(
    start_agent: StartAgent, images: SampleImages, tmp_path: Path
) -> None:
    """Two rounds left (0.5 s of 0.25 s rounds) are cheaper than a held poll's own
    connection: rounds at 0, 0.25 and 0.5 s."""
    agent = await start_agent()
    await agent.wait_status(lambda s: s["workload"]["state"] == "running", "workload running")
    node = Node("n1", f"{agent.host}:{AGENT_PORT}", {}, str(tmp_path / "token"))
    health = Health(checks=(AgentCheck(),), interval=0.25, min_healthy_time=0.5, deadline=30)
    driver = CountingDriver()
    async with probe_session() as session:
        try:
            verdict, _ = await watch(Prober(driver, session), health, node, images.v1.digest)
        finally:
            await driver.close()
    assert verdict is Verdict.HEALTHY
    assert driver.calls == ["status"] * 3


async def _true(value: bool) -> bool:
    return value
