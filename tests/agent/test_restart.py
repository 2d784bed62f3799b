"""A real agent SIGKILLed mid-run and mid-stage, then started again on the same state:
it stops the workload its dead predecessor left (which held the port), removes half-written
files, and the node is healthy again with no human involved."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp

from tests.agent.conftest import StartAgent
from tests.agent.harness import AgentProc, eventually
from tests.conftest import SampleImages


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()[0] != "Z"


async def sigkill(agent: AgentProc) -> None:
    """SIGKILL the agent alone, as the kernel's OOM killer would: its children live on."""
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGKILL)
    await agent.proc.wait()


async def test_sigkill_mid_run_then_restart_reaps_the_orphaned_workload(
    start_agent: StartAgent,
) -> None:
    agent = await start_agent()
    first = await agent.wait_status(lambda s: s["workload"]["state"] == "running", "running")
    orphan = first["workload"]["pid"]
    await sigkill(agent)
    assert alive(orphan)  # the bug this guards against: it still holds the port

    agent = await start_agent(state_dir=agent.state_dir)
    st = await agent.wait_status(
        lambda s: s["workload"]["state"] == "running" and s["workload"]["restarts"] == 0,
        "running again",
    )
    assert st["workload"]["pid"] != orphan
    await eventually(lambda: asyncio.sleep(0, result=not alive(orphan)), what="orphan gone")
    assert [e["pid"] for e in agent.events("workload_reaped")] == [orphan]
    assert (await agent.workload_get())[0] == 200


async def test_sigkill_mid_stage_then_restart_removes_the_partial_image(
    start_agent: StartAgent, images: SampleImages
) -> None:
    agent = await start_agent()
    release = asyncio.Event()
    data = await asyncio.to_thread(Path(images.v2.path).read_bytes)

    async def slow() -> AsyncIterator[bytes]:
        yield data[: len(data) // 2]
        await release.wait()  # hold the upload open: the agent is mid-write

    session = aiohttp.ClientSession()
    upload = asyncio.create_task(session.put(
        agent.url("/v1/image"), data=slow(),
        headers=agent.headers(**{"X-Image-Digest": images.v2.digest}),
    ))  # fmt: skip
    part = agent.state_dir / "slots" / "B" / "image.tar.part"
    await agent.wait_status(lambda s: s["busy"] == "staging" and part.exists(), "mid-stage")
    await sigkill(agent)
    release.set()
    upload.cancel()
    await asyncio.gather(upload, return_exceptions=True)
    await session.close()
    assert part.exists()  # left behind by the dead process

    agent = await start_agent(state_dir=agent.state_dir)
    st = await agent.wait_status(lambda s: s["workload"]["state"] == "running", "up again")
    assert st["staged"] is None and st["booted"]["version"] == "1.0.0"
    assert not (agent.state_dir / "slots" / "B").exists()
    assert agent.events("partial_removed")
    code, body = await agent.stage(images.v2.path, images.v2.digest)
    assert code == 200 and body["written"] is True, body
