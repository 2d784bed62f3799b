"""Fixtures for agent tests: start real agent processes and always clean them up."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Protocol

import aiohttp
import pytest

from tests.agent.harness import TOKEN, AgentProc, agent_argv
from tests.conftest import SampleImages


class StartAgent(Protocol):
    def __call__(
        self, *extra: str, image: str | None = ..., state_dir: Path | None = ...
    ) -> Awaitable[AgentProc]: ...


@pytest.fixture
async def start_agent(
    tmp_path: Path, loopback: Callable[[], str], images: SampleImages
) -> AsyncIterator[StartAgent]:
    """`await start_agent(*flags, image=..., state_dir=...)`: a running agent process.

    By default a fresh state dir, factory-installed with sample v1. Passing an existing
    `state_dir` restarts an agent on it (same host). Every agent is stopped at teardown.
    """
    token_file = tmp_path / "token"
    token_file.write_text(f"  {TOKEN}\n")
    started: list[AgentProc] = []
    hosts: dict[Path, str] = {}
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def start(
            *extra: str, image: str | None = images.v1.path, state_dir: Path | None = None
        ) -> AgentProc:
            if state_dir is None:
                state_dir = tmp_path / f"agent{len(started)}"
            host = hosts.setdefault(state_dir, loopback())
            agent = AgentProc(
                host=host,
                state_dir=state_dir,
                log_path=state_dir.with_name(state_dir.name + ".log"),
                session=session,
                argv=agent_argv(host, state_dir, token_file, image, *extra),
            )
            started.append(agent)
            await agent.start()
            return agent

        try:
            yield start
        finally:
            for agent in started:
                await agent.stop()
