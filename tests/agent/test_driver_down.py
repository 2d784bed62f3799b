"""A node that is down costs the controller a bare TCP connect per status poll, not an
HTTP request (`AgentDriver.status`), and is asked over HTTP again the moment it listens.

Against a real agent process, stopped and started again on its own address. The spy on
`_exchange` only counts the driver's HTTP requests; every request is real.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from rollout.drivers.agent import AgentDriver
from rollout.drivers.base import NotSent
from rollout.model import Node
from tests.agent.conftest import StartAgent
from tests.agent.harness import AGENT_PORT
from tests.helpers import free_port


def counting(driver: AgentDriver) -> list[str]:
    """The paths of the HTTP requests `driver` sends from now on."""
    sent: list[str] = []
    exchange = driver._exchange

    async def spy(*args: Any, **kwargs: Any) -> Any:
        sent.append(args[3])
        return await exchange(*args, **kwargs)

    driver._exchange = spy  # type: ignore[method-assign]
    return sent


async def test_a_down_node_is_probed_by_connect_until_it_listens(
    start_agent: StartAgent, tmp_path: Path
) -> None:
    agent = await start_agent()
    node = Node("n1", f"{agent.host}:{AGENT_PORT}", {}, str(tmp_path / "token"))
    driver = AgentDriver()
    sent = counting(driver)
    try:
        assert (await driver.status(node)).boot_count == 1
        await agent.stop()
        with pytest.raises(NotSent):
            await driver.status(node)  # found down: over HTTP, the connect refused
        assert len(sent) == 2
        for _ in range(3):
            with pytest.raises(NotSent, match="cannot connect to"):
                await driver.status(node)
        assert len(sent) == 2  # three polls, no request
        await agent.start()
        assert (await driver.status(node)).boot_count >= 1
        assert len(sent) == 3
        await agent.stop()
        with pytest.raises(NotSent):
            await driver.status(node)  # up in between: the first failure is a request again
        assert len(sent) == 4
    finally:
        await driver.close()


async def test_a_node_named_by_host_name_is_polled_over_http(tmp_path: Path) -> None:
    """No bare connect for a host name: it would resolve the name on every poll."""
    (tmp_path / "token").write_text("t0ken\n")
    node = Node("n1", f"localhost:{free_port()}", {}, str(tmp_path / "token"))
    driver = AgentDriver()
    sent = counting(driver)
    try:
        for _ in range(3):
            with pytest.raises(NotSent):
                await driver.status(node)
        assert len(sent) == 3
    finally:
        await driver.close()
