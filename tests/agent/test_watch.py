"""Status long polls (`GET /v1/status?wait=S` with `If-None-Match`) against real agents,
and the controller's boot wait riding them (`steps.wait_boot` over `AgentDriver`).

The grace before a workload counts as running is 3 s here, so a status read while it is
`starting` is still `starting` when the long poll that follows it arrives.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from rollout.agent.workload import Supervisor, WorkloadSpec, WorkloadState
from rollout.drivers.agent import AgentDriver
from rollout.model import Node, NodeStatus
from rollout.steps import wait_boot
from tests.agent.conftest import StartAgent
from tests.agent.harness import AGENT_PORT, AgentProc
from tests.conftest import SampleImages
from tests.helpers import wait_for_async

GRACE = ("--workload-grace", "3")


async def tagged(agent: AgentProc) -> tuple[dict[str, Any], str]:
    code, body, headers = await agent.request("GET", "/v1/status")
    assert code == 200, body
    return body, headers["ETag"]


async def long_poll(
    agent: AgentProc, tag: str, wait: float, session: aiohttp.ClientSession | None = None
) -> tuple[int, str, dict[str, Any]]:
    url = agent.url(f"/v1/status?wait={wait}")
    headers = agent.headers(**{"If-None-Match": tag})
    timeout = aiohttp.ClientTimeout(60)
    async with (session or agent.session).get(url, headers=headers, timeout=timeout) as r:
        body = await r.json(content_type=None) if r.status == 200 else {}
        return r.status, r.headers["ETag"], body


async def soft_reboot_to(agent: AgentProc, images: SampleImages) -> None:
    code, body = await agent.stage(images.v2.path, images.v2.digest)
    assert code == 200, body
    code, body, _ = await agent.request("POST", "/v1/activate", json_body={"mode": "soft-reboot"})
    assert code == 202, body


async def test_a_long_poll_answers_when_the_workload_comes_up(
    start_agent: StartAgent, images: SampleImages
) -> None:
    agent = await start_agent(*GRACE)
    await soft_reboot_to(agent, images)
    starting = await agent.wait_status(
        lambda s: s["boot_count"] == 2 and s["workload"]["state"] == "starting", "v2 starting"
    )
    _, tag = await tagged(agent)
    code, new_tag, body = await long_poll(agent, tag, 30)
    # Without the wait, the same tag would have been answered 304 at once.
    assert code == 200 and new_tag != tag
    assert body["workload"]["state"] == "running" and body["boot_count"] == starting["boot_count"]
    assert agent.events("workload_running")  # the change it woke for


async def test_an_unchanged_status_is_304_after_the_wait(start_agent: StartAgent) -> None:
    agent = await start_agent()
    await agent.wait_status(lambda s: s["workload"]["state"] == "running", "running")
    code, body, _ = await agent.request("PUT", "/v1/lease", json_body={"holder": "r1", "ttl": 60})
    assert code == 200, body
    _, tag = await tagged(agent)
    assert (await tagged(agent))[1] == tag  # the lease counts down: the tag stays
    began = time.monotonic()
    code, same, _ = await long_poll(agent, tag, 0.4)
    assert (code, same) == (304, tag)
    assert time.monotonic() - began >= 0.4  # it did wait
    assert (await long_poll(agent, tag, 0))[:2] == (304, tag)  # no wait: a plain check
    code, other, body = await long_poll(agent, '"not-the-tag"', 30)
    assert code == 200 and other == tag and body["lease"]["holder"] == "r1"


async def test_a_lease_taken_wakes_a_long_poll(start_agent: StartAgent) -> None:
    agent = await start_agent()
    await agent.wait_status(lambda s: s["workload"]["state"] == "running", "running")
    _, tag = await tagged(agent)
    poll = asyncio.create_task(long_poll(agent, tag, 30))  # the lease may come first: 200 too
    code, body, _ = await agent.request("PUT", "/v1/lease", json_body={"holder": "r2", "ttl": 60})
    assert code == 200, body
    code, new_tag, body = await asyncio.wait_for(poll, 20)
    assert code == 200 and new_tag != tag and body["lease"]["holder"] == "r2"


async def test_a_held_long_poll_does_not_hold_the_agent_up(start_agent: StartAgent) -> None:
    agent = await start_agent()
    await agent.wait_status(lambda s: s["workload"]["state"] == "running", "running")
    _, tag = await tagged(agent)
    sent = asyncio.Event()

    async def on_sent(*_: object) -> None:
        sent.set()

    trace = aiohttp.TraceConfig()
    trace.on_request_headers_sent.append(on_sent)
    async with aiohttp.ClientSession(trace_configs=[trace]) as session:
        poll = asyncio.create_task(long_poll(agent, tag, 60, session))
        await asyncio.wait_for(sent.wait(), 10)
        await agent.status()  # answered after the agent read the poll, sent before it
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGTERM)
        assert await agent.wait_exit(timeout=20) == 0  # well before the poll's 60 s
        assert (await asyncio.wait_for(poll, 5))[:2] == (304, tag)


@pytest.mark.parametrize(
    "wait", ["soon", "-1", "60.5", "nan", "inf"], ids=["word", "negative", "over", "nan", "inf"]
)
async def test_a_bad_wait_is_400_naming_it(start_agent: StartAgent, wait: str) -> None:
    agent = await start_agent()
    code, body, _ = await agent.request("GET", f"/v1/status?wait={wait}")
    assert code == 400 and body["error"] == "bad_request" and body["field"] == "wait", body
    assert "0 to 60" in body["message"]


class CountingDriver(AgentDriver):
    """The real driver, counting the status reads and long polls it makes."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    async def status(self, node: Node) -> NodeStatus:
        self.calls.append("status")
        return await super().status(node)

    async def watch(self, node: Node, seen: NodeStatus, wait: float) -> NodeStatus | None:
        self.calls.append("watch")
        return await super().watch(node, seen, wait)


async def test_the_boot_wait_long_polls_the_starting_workload(
    start_agent: StartAgent, images: SampleImages, tmp_path: Path
) -> None:
    agent = await start_agent(*GRACE)
    node = Node("n1", f"{agent.host}:{AGENT_PORT}", {}, str(tmp_path / "token"))
    driver = CountingDriver()
    try:
        await soft_reboot_to(agent, images)
        st = await wait_boot(driver, node, 1, timeout=60)
    finally:
        await driver.close()
    assert st.boot_count == 2 and st.workload == "running" and st.runs(images.v2.digest)
    # Polled every 0.2 s, the 3 s grace alone would be about 15 reads.
    assert driver.calls.count("watch") >= 1 and driver.calls.count("status") <= 3, driver.calls
    assert driver.calls[-1] == "watch"


async def test_a_status_without_a_tag_is_not_waited_for(
    start_agent: StartAgent, tmp_path: Path
) -> None:
    agent = await start_agent()
    node = Node("n1", f"{agent.host}:{AGENT_PORT}", {}, str(tmp_path / "token"))
    driver = AgentDriver()
    try:
        st = await driver.status(node)
        assert st.tag is not None and st.tag.startswith('"')
        untagged = NodeStatus(**{**st.__dict__, "tag": None})
        assert await driver.watch(node, untagged, 30) is None  # at once: the caller polls
        assert await driver.watch(node, st, 0.2) is st  # unchanged: the status it had
    finally:
        await driver.close()


async def test_the_workload_supervisor_announces_every_state(tmp_path: Path) -> None:
    """What wakes a long poll the moment the workload comes up (not RECHECK s later)."""
    seen: list[str] = []
    sup = Supervisor(
        log_path=tmp_path / "workload.log", port=0, grace=0.2,
        should_restart=lambda: False, on_failed=lambda code, ran: None,
        on_change=lambda: seen.append(str(sup.state)),
    )  # fmt: skip
    command = (sys.executable, "-c", "import time; time.sleep(60)")
    sup.start(WorkloadSpec(command, tmp_path, dict(os.environ)))
    try:
        await wait_for_async(lambda: sup.state is WorkloadState.RUNNING, 20, what="running")
    finally:
        await sup.stop()
    assert seen == ["starting", "running", "stopped"]
