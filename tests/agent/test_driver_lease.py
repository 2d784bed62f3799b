"""The agent driver releases a node's lease with its commit (rollout.drivers.agent,
Leases), against a real agent: no release request of its own, none renewed after, and a
later rollback takes the lease again first, or is refused before it is sent when another
rollout took the node meanwhile."""

from __future__ import annotations

from pathlib import Path

import pytest

from rollout.drivers.agent import AgentDriver
from rollout.drivers.base import Refused
from rollout.model import ActivationMode, Node
from tests.agent.conftest import StartAgent
from tests.agent.harness import AGENT_PORT
from tests.agent.test_driver_down import counting


async def test_the_lease_goes_with_the_commit_and_comes_back_for_a_rollback(
    start_agent: StartAgent, tmp_path: Path
) -> None:
    agent = await start_agent()
    node = Node("n1", f"{agent.host}:{AGENT_PORT}", {}, str(tmp_path / "token"))
    driver = AgentDriver(lease_holder="r1")
    sent = counting(driver)
    try:
        assert await driver.lease(node, 60) is True
        assert (await agent.status())["lease"]["holder"] == "r1"
        assert (await driver.commit(node)).committed
        assert (await agent.status())["lease"] is None  # released with the commit
        assert await driver.lease(node, 60) is False  # a renewal sweep passes it by
        await driver.release(node)  # the final release too
        assert sent == ["/v1/lease", "/v1/commit"]
        assert (await agent.status())["lease"] is None

        with pytest.raises(Refused, match="nothing_to_roll_back"):
            await driver.rollback(node, ActivationMode.SOFT_REBOOT)
        assert sent[2:] == ["/v1/lease", "/v1/rollback"]  # leased again, then sent
        assert (await agent.status())["lease"]["holder"] == "r1"
        await driver.release(node)  # held again: released at the end as usual
        assert sent[-1] == "/v1/lease" and (await agent.status())["lease"] is None

        await driver.commit(node)
        code, _, _ = await agent.request(
            "PUT", "/v1/lease", json_body={"holder": "r2", "ttl": 60}
        )  # another rollout takes the node
        assert code == 200
        before = len(sent)
        with pytest.raises(Refused) as err:
            await driver.rollback(node, ActivationMode.SOFT_REBOOT)
        assert (err.value.code, err.value.holder) == ("leased", "r2")
        assert sent[before:] == ["/v1/lease"]  # the rollback itself never left
    finally:
        await driver.close()
