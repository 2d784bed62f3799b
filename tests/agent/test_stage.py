"""Staging through a real agent process: what a refused or broken upload leaves behind.

The store's one-pass writer is tested piece by piece in test_store.py; here the whole
path (HTTP handler, runtime, state file) on a real agent: a refused image over a slot
that held a staged one leaves that slot empty, the booted slot and the state file
consistent, and the next upload works.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from rollout.agent.state import AgentState, Slot, from_json
from tests.agent.conftest import StartAgent
from tests.agent.harness import TOKEN, eventually
from tests.agent.test_api import slot_files, tree_digest
from tests.conftest import SampleImages


def state_on_disk(state_dir: Path) -> AgentState:
    return from_json(json.loads((state_dir / "state.json").read_text()))


async def trash_empty(state_dir: Path) -> bool:
    trash = state_dir / "trash"
    return not trash.exists() or not any(trash.iterdir())


async def test_a_mismatch_over_a_staged_image_leaves_no_slot_and_the_booted_one_intact(
    start_agent: StartAgent, images: SampleImages
) -> None:
    agent = await start_agent()
    code, body = await agent.stage(images.v2.path, images.v2.digest)
    assert code == 200 and body["slot"] == "B"
    root_a = agent.state_dir / "slots" / "A"
    a_before = tree_digest(root_a)

    code, body = await agent.stage(images.bad.path, "sha256:" + "0" * 64)
    assert (code, body["error"]) == (422, "digest_mismatch")
    assert body["actual"] == images.bad.digest
    status = await agent.status()
    assert status["staged"] is None and status["booted"]["version"] == "1.0.0"
    assert slot_files(agent, "B") == []  # neither the new image nor the old one
    assert tree_digest(root_a) == a_before
    state = state_on_disk(agent.state_dir)
    assert state.slot(Slot.B) is None and state.staged is None
    booted = state.slot(Slot.A)
    assert booted is not None and booted.digest == images.v1.digest
    await eventually(lambda: trash_empty(agent.state_dir), what="the old slot B deleted")

    code, body = await agent.stage(images.v2.path, images.v2.digest)
    assert code == 200 and body["written"] is True


async def test_an_upload_cut_off_over_a_staged_image_then_a_restart(
    start_agent: StartAgent, images: SampleImages
) -> None:
    """The state on disk said B empty before a byte was written: after the cut-off and a
    restart, nothing claims the half-written slot and nothing of it is left."""
    agent = await start_agent()
    code, _ = await agent.stage(images.v2.path, images.v2.digest)
    assert code == 200
    _reader, writer = await asyncio.open_connection(agent.host, agent.port)
    head = (
        "PUT /v1/image HTTP/1.1\r\n"
        f"Host: {agent.host}\r\n"
        f"Authorization: Bearer {TOKEN}\r\n"
        f"X-Image-Digest: {images.bad.digest}\r\n"
        f"Content-Length: {images.bad.size}\r\n\r\n"
    )
    data = await asyncio.to_thread(Path(images.bad.path).read_bytes)
    writer.write(head.encode() + data[: len(data) // 2])
    await writer.drain()
    part = agent.state_dir / "slots" / "B" / "image.tar.part"
    await agent.wait_status(lambda s: s["busy"] == "staging" and part.exists(), "mid-stage")
    state = state_on_disk(agent.state_dir)
    assert state.slot(Slot.B) is None and state.staged is None  # saved before the write
    writer.close()
    await writer.wait_closed()
    status = await agent.wait_status(lambda s: s["busy"] is None, "not busy")
    assert status["staged"] is None
    assert slot_files(agent, "B") == []

    await agent.stop()
    agent = await start_agent(state_dir=agent.state_dir)
    st = await agent.wait_status(lambda s: s["workload"]["state"] == "running", "up again")
    assert st["staged"] is None and st["booted"]["version"] == "1.0.0"
    await eventually(lambda: trash_empty(agent.state_dir), what="leftovers deleted")
    code, body = await agent.stage(images.v2.path, images.v2.digest)
    assert code == 200 and body["written"] is True
