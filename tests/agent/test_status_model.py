"""One status model for both ends of the agent API (rollout/agent/status.py)."""

from __future__ import annotations

from typing import Any

import pytest

from rollout.agent.openapi import document
from rollout.agent.status import AgentStatus
from rollout.drivers.agent import parse_status
from tests.agent.conftest import StartAgent
from tests.conftest import SampleImages


async def test_a_real_agents_status_reads_back_through_the_driver(
    start_agent: StartAgent, images: SampleImages
) -> None:
    agent = await start_agent()
    body = await agent.wait_status(lambda s: s["workload"]["state"] == "running", "running")
    assert AgentStatus.model_validate(body).model_dump(mode="json", exclude_unset=True) == body
    st = parse_status(body)
    assert (st.node_id, st.booted_slot, st.booted_digest, st.boot_count) == (
        agent.host,
        "A",
        images.v1.digest,
        1,
    )
    assert st.committed and st.workload == "running" and st.staged_digest is None
    assert st.last_good_digest == images.v1.digest and st.root_device is None


GOOD: dict[str, Any] = {
    "node_id": "n1",
    "booted": {"slot": "B", "name": "w", "version": "2", "digest": "sha256:2"},
    "staged": None,
    "committed": False,
    "last_good_slot": "A",
    "last_good": {"slot": "A", "name": "w", "version": "1", "digest": "sha256:1"},
    "boot_tries_left": 1,
    "boot_count": 7,
    "workload": {"state": "starting", "units": {"web.service": "activating"}},
    "busy": "activating",
    "backend": {"kind": "disk", "root_device": "/dev/vda3", "slots": {"A": "/dev/vda2"}},
    "newer_agent_field": {"ignored": True},
}


def test_the_reduced_status_keeps_what_the_core_decides_on() -> None:
    st = parse_status(GOOD)
    assert (st.booted_version, st.last_good_version, st.busy) == ("2", "1", "activating")
    assert (st.root_device, st.workload, st.committed) == ("/dev/vda3", "starting", False)
    assert AgentStatus.model_validate(GOOD).workload.model_extra == {
        "units": {"web.service": "activating"}
    }


@pytest.mark.parametrize(
    ("name", "change"),
    [
        ("no boot count", {"boot_count": None}),
        ("a boot count that is not a number", {"boot_count": "many"}),
        ("no booted slot", {"booted": None}),
        ("a workload without its state", {"workload": {"pid": 3}}),
    ],
)
def test_an_answer_that_is_not_a_status_is_refused(name: str, change: dict[str, Any]) -> None:
    body = {k: v for k, v in (GOOD | change).items() if v is not None}
    with pytest.raises(ValueError):
        parse_status(body)


def test_the_openapi_document_declares_the_status_from_the_model() -> None:
    ok = document()["paths"]["/v1/status"]["get"]["responses"]["200"]
    schema = ok["content"]["application/json"]["schema"]
    assert set(schema["required"]) >= {"node_id", "booted", "committed", "boot_count"}
    assert schema["properties"]["booted"]["properties"]["digest"] == {"type": "string"}
