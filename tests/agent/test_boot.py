"""Activation, boot counting, fallback and rollback with real agent processes.

A reboot or kexec is a real re-exec of the agent (same PID, a fresh interpreter): the log
then holds one `agent_start` event per process start, which is how these tests tell a
real restart from a soft reboot.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest

from rollout.image import build_image
from rollout.model import Image
from tests.agent.conftest import StartAgent
from tests.agent.harness import AgentProc
from tests.conftest import SampleImages


async def stage_and_activate(agent: AgentProc, image: Image, mode: str) -> dict[str, Any]:
    code, body = await agent.stage(image.path, image.digest)
    assert code == 200, body
    code, body, _ = await agent.request("POST", "/v1/activate", json_body={"mode": mode})
    assert code == 202, body
    return body


def on(image: Image, *, committed: bool | None = None, running: bool = True) -> Any:
    """A status predicate: booted `image` (committed as given), workload running."""

    def pred(s: dict[str, Any]) -> bool:
        return (
            s["booted"]["digest"] == image.digest
            and s["busy"] is None
            and (committed is None or s["committed"] is committed)
            and (not running or s["workload"]["state"] == "running")
        )

    return pred


async def test_activate_reboot_restarts_the_process_then_commit(
    start_agent: StartAgent, images: SampleImages
) -> None:
    agent = await start_agent()
    assert agent.proc is not None
    pid = agent.proc.pid
    body = await stage_and_activate(agent, images.v2, "reboot")
    assert body == {"booting": "B", "mode": "reboot", "boot_count": 1}

    status = await agent.wait_status(on(images.v2), "booted v2, workload running")
    assert status["booted"] == {
        "slot": "B",
        "name": "sample-web",
        "version": "2.0.0",
        "digest": images.v2.digest,
    }
    assert status["boot_count"] == 2
    assert status["committed"] is False
    assert status["last_good_slot"] == "A"
    assert status["boot_tries_left"] == 0
    assert status["staged"] is None
    assert status["fell_back"] is None
    assert await agent.workload_get() == (200, {"version": "2.0.0", "healthy": True})

    # A real process restart: same PID (execv), a second process start, firmware + kernel.
    assert agent.proc.returncode is None and agent.proc.pid == pid
    assert len(agent.events("agent_start")) == 2
    boot = agent.events("boot")[-1]
    assert (boot["mode"], boot["boot_delay"], boot["slot"]) == ("reboot", 0.3, "B")

    code, status, _ = await agent.request("POST", "/v1/commit")
    assert code == 200
    assert status["committed"] is True and status["last_good_slot"] == "B"
    assert status["boot_tries_left"] == 0
    code, again, _ = await agent.request("POST", "/v1/commit")
    assert code == 200 and again["committed"] is True and again["boot_count"] == 2


async def test_kexec_boots_the_new_slot_without_firmware(
    start_agent: StartAgent, images: SampleImages
) -> None:
    agent = await start_agent()
    await stage_and_activate(agent, images.v2, "kexec")
    status = await agent.wait_status(on(images.v2, committed=False), "booted v2 via kexec")
    assert status["boot_count"] == 2
    assert len(agent.events("agent_start")) == 2
    boot = agent.events("boot")[-1]
    assert (boot["mode"], boot["boot_delay"]) == ("kexec", 0.1)
    assert (await agent.workload_get())[0] == 200


async def test_soft_reboot_stays_in_process(start_agent: StartAgent, images: SampleImages) -> None:
    agent = await start_agent()
    before = await agent.wait_status(lambda s: s["workload"]["state"] == "running", "running")
    await stage_and_activate(agent, images.v2, "soft-reboot")
    status = await agent.wait_status(on(images.v2, committed=False), "booted v2 via soft")
    assert status["boot_count"] == before["boot_count"] + 1
    assert status["workload"]["pid"] != before["workload"]["pid"]
    assert len(agent.events("agent_start")) == 1
    assert agent.events("boot")[-1]["mode"] == "soft-reboot"
    assert await agent.workload_get() == (200, {"version": "2.0.0", "healthy": True})


async def test_uncommitted_boot_falls_back_at_the_commit_deadline(
    start_agent: StartAgent, images: SampleImages
) -> None:
    agent = await start_agent("--commit-deadline", "1.5")
    await stage_and_activate(agent, images.v2, "reboot")
    await agent.wait_status(on(images.v2, committed=False, running=False), "booted v2")
    status = await agent.wait_status(on(images.v1, committed=True), "fell back to v1")
    assert status["fell_back"] == {
        "from_slot": "B",
        "digest": images.v2.digest,
        "reason": "commit_deadline",
        "boot_count": 3,
    }
    assert status["boot_count"] == 3
    assert status["last_good_slot"] == "A"
    assert len(agent.events("agent_start")) == 3  # the fallback is a real reboot too
    assert await agent.workload_get() == (200, {"version": "1.0.0", "healthy": True})


async def test_failing_workload_falls_back(
    start_agent: StartAgent, images: SampleImages, tmp_path: Path
) -> None:
    src = tmp_path / "crash-src"
    src.mkdir()
    (src / "README").write_text("a release whose workload exits at once\n")
    crash = build_image(
        src,
        tmp_path / "crash.img",
        version="3.0.0",
        name="crash",
        command=("python3", "-c", "import sys; sys.exit(3)"),
    )
    agent = await start_agent()
    await stage_and_activate(agent, crash, "kexec")
    status = await agent.wait_status(
        lambda s: s["fell_back"] is not None and s["busy"] is None, "fallback"
    )
    assert status["booted"]["digest"] == images.v1.digest
    assert status["committed"] is True
    assert status["fell_back"] == {
        "from_slot": "B",
        "digest": crash.digest,
        "reason": "workload_failed",
        "boot_count": 3,
    }
    failed = agent.events("workload_exited")
    assert failed and failed[0]["exit_code"] == 3
    await agent.wait_status(on(images.v1, committed=True), "v1 workload running")


async def test_restart_before_commit_exhausts_the_boot_try(
    start_agent: StartAgent, images: SampleImages
) -> None:
    agent = await start_agent()
    await stage_and_activate(agent, images.v2, "soft-reboot")
    await agent.wait_status(on(images.v2, committed=False), "booted v2")
    await agent.stop(signal.SIGKILL)  # the node dies before anyone commits

    agent = await start_agent(state_dir=agent.state_dir)
    status = await agent.wait_status(on(images.v1, committed=True), "fell back to v1")
    assert status["fell_back"] == {
        "from_slot": "B",
        "digest": images.v2.digest,
        "reason": "boot_tries_exhausted",
        "boot_count": 3,
    }


async def test_rollback_after_a_committed_upgrade(
    start_agent: StartAgent, images: SampleImages
) -> None:
    agent = await start_agent()
    code, body, _ = await agent.request("POST", "/v1/rollback")
    assert (code, body["error"]) == (409, "nothing_to_roll_back")

    await stage_and_activate(agent, images.v2, "kexec")
    await agent.wait_status(on(images.v2), "booted v2")
    code, _, _ = await agent.request("POST", "/v1/commit")
    assert code == 200

    code, body, _ = await agent.request("POST", "/v1/rollback")
    assert code == 202
    assert body == {"booting": "A", "mode": "reboot", "boot_count": 2}
    status = await agent.wait_status(on(images.v1, committed=True), "rolled back to v1")
    assert status["last_good_slot"] == "A"
    assert status["boot_count"] == 3
    assert status["fell_back"] is None
    assert await agent.workload_get() == (200, {"version": "1.0.0", "healthy": True})


async def test_rollback_of_an_uncommitted_boot(
    start_agent: StartAgent, images: SampleImages
) -> None:
    agent = await start_agent()
    await stage_and_activate(agent, images.v2, "soft-reboot")
    await agent.wait_status(on(images.v2, committed=False), "booted v2")
    code, body, _ = await agent.request("POST", "/v1/rollback", json_body={"mode": "soft-reboot"})
    assert (code, body["booting"], body["mode"]) == (202, "A", "soft-reboot")
    status = await agent.wait_status(on(images.v1, committed=True), "back on v1")
    assert status["last_good_slot"] == "A" and status["boot_count"] == 3
    # B was never committed: nothing further to roll back to.
    code, body, _ = await agent.request("POST", "/v1/rollback")
    assert (code, body["error"]) == (409, "nothing_to_roll_back")


@pytest.mark.parametrize("mode", ["reboot", "soft-reboot"])
async def test_staging_refused_while_uncommitted(
    start_agent: StartAgent, images: SampleImages, mode: str
) -> None:
    agent = await start_agent()
    await stage_and_activate(agent, images.v2, mode)
    await agent.wait_status(on(images.v2, committed=False), "booted v2")
    # The inactive slot A is the fallback: writing into it would leave nothing to fall to.
    code, body = await agent.stage(images.bad.path, images.bad.digest)
    assert (code, body["error"]) == (409, "not_committed")
    code, body = await agent.stage(images.v2.path, images.v2.digest)
    assert (code, body["error"]) == (409, "already_booted")
