"""Rollout leases ("one rollout per node") against real agent processes.

A lease `{holder, ttl}` taken with `PUT /v1/lease` makes the agent refuse stage, activate,
commit and rollback from anyone but the holder (header `X-Rollout-Lease`) with 409
`leased`, until it is released or expires. It is persisted with a wall-clock expiry, so it
survives reboots and crashes. The expiry arithmetic is table-tested in test_state.py.
"""

from __future__ import annotations

import signal
from typing import Any

from tests.agent.conftest import StartAgent
from tests.agent.harness import AgentProc, eventually
from tests.agent.test_api import slot_files
from tests.agent.test_boot import on
from tests.conftest import SampleImages

MUTATIONS = [
    ("POST", "/v1/activate", {"mode": "soft-reboot"}),
    ("POST", "/v1/commit", None),
    ("POST", "/v1/rollback", {"mode": "soft-reboot"}),
]


async def lease(
    agent: AgentProc, holder: str, ttl: float = 60, method: str = "PUT"
) -> tuple[int, dict[str, Any]]:
    body: dict[str, Any] = (
        {"holder": holder} if method == "DELETE" else {"holder": holder, "ttl": ttl}
    )
    code, answer, _ = await agent.request(method, "/v1/lease", json_body=body)
    return code, answer


def as_holder(holder: str | None) -> dict[str, str]:
    return {} if holder is None else {"X-Rollout-Lease": holder}


def assert_leased_to(code: int, body: dict[str, Any], holder: str) -> None:
    assert code == 409, body
    assert body["error"] == "leased" and body["holder"] == holder, body
    assert body["message"] and 0 < body["expires_in"] <= 3600, body


async def test_acquire_shows_in_status_and_refuses_another_holder(
    start_agent: StartAgent,
) -> None:
    agent = await start_agent()
    assert (await agent.status())["lease"] is None

    code, body = await lease(agent, "r1", ttl=20)
    assert (code, body) == (200, {"holder": "r1", "expires_in": 20.0, "acquired": True})
    status = await agent.status()
    assert status["lease"]["holder"] == "r1"
    assert set(status["lease"]) == {"holder", "expires_in"}
    assert 15 < status["lease"]["expires_in"] <= 20

    code, body = await lease(agent, "r2")
    assert_leased_to(code, body, "r1")
    assert (await agent.status())["lease"]["holder"] == "r1"

    # Renewing extends from now, and says it was not newly taken.
    code, body = await lease(agent, "r1", ttl=60)
    assert (code, body) == (200, {"holder": "r1", "expires_in": 60.0, "acquired": False})
    assert 55 < (await agent.status())["lease"]["expires_in"] <= 60
    assert [e["holder"] for e in agent.events("lease_acquired")] == ["r1"]
    assert [e["holder"] for e in agent.events("lease_renewed")] == ["r1"]
    assert agent.events("lease_refused")[0]["leased_to"] == "r1"


async def test_others_cannot_stage_activate_commit_or_roll_back_while_leased(
    start_agent: StartAgent, images: SampleImages
) -> None:
    agent = await start_agent()
    assert (await lease(agent, "r1"))[0] == 200

    for holder in (None, "r2", ""):
        code, body = await agent.stage(images.v2.path, images.v2.digest, lease=holder)
        assert_leased_to(code, body, "r1")
        for method, path, json_body in MUTATIONS:
            code, body, _ = await agent.request(
                method, path, json_body=json_body, headers=as_holder(holder)
            )
            assert_leased_to(code, body, "r1")
    # Refused before the body or any other header is looked at.
    code, body, _ = await agent.request("PUT", "/v1/image", data=b"junk")
    assert_leased_to(code, body, "r1")
    code, body, _ = await agent.request("POST", "/v1/activate", data=b"not json")
    assert_leased_to(code, body, "r1")

    status = await agent.status()
    assert status["staged"] is None and status["boot_count"] == 1
    assert status["busy"] is None and status["booted"]["digest"] == images.v1.digest
    assert slot_files(agent, "B") == []
    assert not agent.events("stage_begin")

    # The holder can.
    code, body = await agent.stage(images.v2.path, images.v2.digest, lease="r1")
    assert code == 200 and body["written"] is True, body
    code, body, _ = await agent.request(
        "POST", "/v1/activate", json_body={"mode": "soft-reboot"}, headers=as_holder("r2")
    )
    assert_leased_to(code, body, "r1")
    assert (await agent.status())["boot_count"] == 1
    code, body, _ = await agent.request(
        "POST", "/v1/activate", json_body={"mode": "soft-reboot"}, headers=as_holder("r1")
    )
    assert code == 202, body
    await agent.wait_status(on(images.v2, committed=False), "booted v2")
    code, body, _ = await agent.request("POST", "/v1/commit")
    assert_leased_to(code, body, "r1")
    assert (await agent.status())["committed"] is False
    code, body, _ = await agent.request("POST", "/v1/commit", headers=as_holder("r1"))
    assert code == 200 and body["committed"] is True and body["lease"]["holder"] == "r1"


async def test_without_a_lease_anyone_proceeds(
    start_agent: StartAgent, images: SampleImages
) -> None:
    agent = await start_agent()
    code, body = await agent.stage(images.v2.path, images.v2.digest, lease="whoever")
    assert code == 200, body
    code, body, _ = await agent.request(
        "POST", "/v1/activate", json_body={"mode": "soft-reboot"}, headers=as_holder("other")
    )
    assert code == 202, body


async def test_release_lets_another_holder_in(start_agent: StartAgent) -> None:
    agent = await start_agent()
    assert (await lease(agent, "r1"))[0] == 200

    code, body = await lease(agent, "r2", method="DELETE")
    assert_leased_to(code, body, "r1")
    assert (await agent.status())["lease"]["holder"] == "r1"

    assert await lease(agent, "r1", method="DELETE") == (200, {"released": True})
    assert (await agent.status())["lease"] is None
    assert await lease(agent, "r1", method="DELETE") == (200, {"released": False})
    assert [e["holder"] for e in agent.events("lease_released")] == ["r1"]

    code, body = await lease(agent, "r2", ttl=30)
    assert (code, body) == (200, {"holder": "r2", "expires_in": 30.0, "acquired": True})
    code, body, _ = await agent.request("POST", "/v1/commit", headers=as_holder("r1"))
    assert_leased_to(code, body, "r2")


async def test_a_short_lease_expires_and_another_holder_takes_it(
    start_agent: StartAgent, images: SampleImages
) -> None:
    agent = await start_agent()
    code, body = await lease(agent, "r1", ttl=1)
    assert (code, body["acquired"]) == (200, True)
    code, body = await lease(agent, "r2")
    assert code == 409 and body["holder"] == "r1" and 0 < body["expires_in"] <= 1

    async def taken() -> dict[str, Any] | None:
        code, body = await lease(agent, "r2", ttl=30)
        return body if code == 200 else None

    body = await eventually(taken, what="r1's 1 s lease to expire", timeout=10)
    assert body == {"holder": "r2", "expires_in": 30.0, "acquired": True}
    assert (await agent.status())["lease"]["holder"] == "r2"
    code, body = await agent.stage(images.v2.path, images.v2.digest, lease="r1")
    assert_leased_to(code, body, "r2")


async def test_an_expired_lease_lets_unleased_calls_through(
    start_agent: StartAgent, images: SampleImages
) -> None:
    agent = await start_agent()
    assert (await lease(agent, "r1", ttl=1))[0] == 200
    await agent.wait_status(lambda s: s["lease"] is None, "the 1 s lease to expire", timeout=10)
    code, body = await agent.stage(images.v2.path, images.v2.digest)
    assert code == 200, body
    # The expired lease is dropped by a release, which has nothing to release.
    assert await lease(agent, "r2", method="DELETE") == (200, {"released": False})


async def test_the_lease_survives_a_reboot_and_a_crash(
    start_agent: StartAgent, images: SampleImages
) -> None:
    agent = await start_agent()
    assert (await lease(agent, "r1", ttl=120))[0] == 200
    code, body = await agent.stage(images.v2.path, images.v2.digest, lease="r1")
    assert code == 200, body
    code, body, _ = await agent.request(
        "POST", "/v1/activate", json_body={"mode": "reboot"}, headers=as_holder("r1")
    )
    assert code == 202, body

    status = await agent.wait_status(on(images.v2, committed=False), "rebooted into v2")
    assert len(agent.events("agent_start")) == 2  # a real process restart
    assert status["lease"]["holder"] == "r1" and 100 < status["lease"]["expires_in"] <= 120
    code, body, _ = await agent.request("POST", "/v1/commit", headers=as_holder("r2"))
    assert_leased_to(code, body, "r1")
    code, body = await lease(agent, "r2")
    assert body["holder"] == "r1" and code == 409
    code, body, _ = await agent.request("POST", "/v1/commit", headers=as_holder("r1"))
    assert code == 200 and body["committed"] is True

    await agent.stop(signal.SIGKILL)
    agent = await start_agent(state_dir=agent.state_dir)
    status = await agent.wait_status(on(images.v2, committed=True), "v2 after the crash")
    assert status["lease"]["holder"] == "r1" and 0 < status["lease"]["expires_in"] <= 120
    code, body, _ = await agent.request("POST", "/v1/rollback", headers=as_holder("r2"))
    assert_leased_to(code, body, "r1")


async def test_bad_lease_requests(start_agent: StartAgent) -> None:
    agent = await start_agent()
    cases: list[tuple[str, Any, str]] = [
        ("PUT", {"ttl": 30}, "holder"),
        ("PUT", {"holder": "", "ttl": 30}, "holder"),
        ("PUT", {"holder": "has space", "ttl": 30}, "holder"),
        ("PUT", {"holder": "x" * 129, "ttl": 30}, "holder"),
        ("PUT", {"holder": "r1"}, "ttl"),
        ("PUT", {"holder": "r1", "ttl": 0}, "ttl"),
        ("PUT", {"holder": "r1", "ttl": 3601}, "ttl"),
        ("PUT", {"holder": "r1", "ttl": "30"}, "ttl"),
        ("PUT", {"holder": "r1", "ttl": True}, "ttl"),
        ("PUT", ["r1", 30], "body"),
        ("DELETE", {}, "holder"),
        ("DELETE", {"holder": 7}, "holder"),
    ]
    for method, json_body, field in cases:
        code, body, _ = await agent.request(method, "/v1/lease", json_body=json_body)
        assert (code, body["error"], body.get("field")) == (400, "bad_request", field), json_body
    for method in ("PUT", "DELETE"):
        code, body, _ = await agent.request(method, "/v1/lease", data=b"{not json")
        assert (code, body["error"], body["field"]) == (400, "bad_request", "body")
        code, body, _ = await agent.request(method, "/v1/lease")
        assert (code, body["field"]) == (400, "body")
    code, body, _ = await agent.request("GET", "/v1/lease")
    assert (code, body["error"]) == (405, "method_not_allowed")
    assert (await agent.status())["lease"] is None


async def test_leases_need_the_token(start_agent: StartAgent, images: SampleImages) -> None:
    agent = await start_agent()
    for token in (None, "wrong"):
        for method, json_body in [
            ("PUT", {"holder": "r1", "ttl": 30}),
            ("DELETE", {"holder": "r1"}),
        ]:
            code, body, headers = await agent.request(
                method, "/v1/lease", token=token, json_body=json_body
            )
            assert (code, body["error"]) == (401, "unauthorized")
            assert headers["WWW-Authenticate"] == "Bearer"
    assert (await agent.status())["lease"] is None

    # While leased, a call without the token is unauthorized, not leased.
    assert (await lease(agent, "r1"))[0] == 200
    code, body, _ = await agent.request("POST", "/v1/commit", token=None, headers=as_holder("r1"))
    assert (code, body["error"]) == (401, "unauthorized")
    code, body, _ = await agent.request(
        "DELETE", "/v1/lease", token="wrong", json_body={"holder": "r1"}
    )
    assert code == 401
    assert (await agent.status())["lease"]["holder"] == "r1"
