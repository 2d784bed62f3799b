"""The multi-agent host: three real agents in one process, each its own machine.

One `python -m rollout.agent.host` process runs three agents on distinct loopback
addresses with their own state dirs and tokens. Each must answer with its own identity
and refuse the others' tokens, and a rollout through the real AgentDriver (with reboots,
which a hosted agent does as a new life in the same process) must update all three.
Every wait is a condition polled with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from rollout.agent.host import load_host_config
from rollout.drivers.agent import AgentDriver
from rollout.engine import Engine
from rollout.errors import InputError
from rollout.model import Node, RolloutPhase
from rollout.plan import plan_batches
from rollout.policy import parse_policy
from tests.agent.harness import AGENT_PORT, WORKLOAD_PORT, eventually, processes_under
from tests.conftest import SampleImages

COUNT = 3


@dataclass
class HostProc:
    proc: asyncio.subprocess.Process
    log_path: Path
    nodes: list[Node]
    tokens: dict[str, str]
    state_dirs: dict[str, Path]

    def events(self, name: str) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                ev = json.loads(line)
                if ev.get("event") == name:
                    out.append(ev)
        return out


@pytest.fixture
async def host(
    tmp_path: Path, loopback: Callable[[], str], images: SampleImages
) -> AsyncIterator[HostProc]:
    agents, nodes, tokens, dirs = [], [], {}, {}
    for i in range(COUNT):
        node_id, address = f"hosted-{i}", loopback()
        token_file = tmp_path / f"token-{i}"
        tokens[node_id] = f"token-of-{node_id}"
        token_file.write_text(tokens[node_id] + "\n")
        dirs[node_id] = tmp_path / "nodes" / node_id
        agents.append({
            "node_id": node_id,
            "listen": f"{address}:{AGENT_PORT}",
            "state_dir": f"nodes/{node_id}",  # relative to the config file
            "token_file": token_file.name,
        })  # fmt: skip
        nodes.append(Node(node_id, f"{address}:{AGENT_PORT}", {}, str(token_file)))
    config = tmp_path / "host.json"
    defaults = {
        "image": images.v1.path,
        "workload_port": WORKLOAD_PORT,
        "firmware_delay": 0.1,
        "kernel_delay": 0.1,
        "workload_grace": 0.3,
    }
    config.write_text(json.dumps({"defaults": defaults, "agents": agents}))
    ready, log_path = tmp_path / "ready.json", tmp_path / "host.log"
    with open(log_path, "ab") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "rollout.agent.host",
            "--config", str(config), "--ready-file", str(ready),
            stdin=subprocess.DEVNULL, stdout=log, stderr=log,
        )  # fmt: skip
    hosted = HostProc(proc, log_path, nodes, tokens, dirs)
    try:

        async def is_ready() -> dict[str, Any] | None:
            if proc.returncode is not None:
                raise AssertionError(f"host exited {proc.returncode}:\n{log_path.read_text()}")
            return json.loads(ready.read_text()) if ready.exists() else None

        info = await eventually(is_ready, what="the host's ready file", timeout=30)
        assert info == {"pid": proc.pid, "agents": COUNT}
        yield hosted
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        for pid in processes_under(tmp_path / "nodes"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


async def _get(session: aiohttp.ClientSession, node: Node, token: str) -> tuple[int, Any]:
    url = f"http://{node.address}/v1/status"
    headers = {"Authorization": f"Bearer {token}"}
    async with session.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=5)) as r:
        return r.status, await r.json(content_type=None)


def _state(hosted: HostProc, node_id: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((hosted.state_dirs[node_id] / "state.json").read_text())
    return data


async def test_each_hosted_agent_is_its_own_node(host: HostProc, images: SampleImages) -> None:
    addresses = {n.address.split(":")[0] for n in host.nodes}
    assert len(addresses) == COUNT
    async with aiohttp.ClientSession() as session:
        for node in host.nodes:
            code, body = await _get(session, node, host.tokens[node.id])
            assert code == 200, body
            assert body["node_id"] == node.id
            assert body["booted"]["digest"] == images.v1.digest
            assert body["backend"] == {"kind": "emulated"}
            # Its own state dir: factory-installed there, and nowhere else.
            assert (host.state_dirs[node.id] / "state.json").is_file()
            assert _state(host, node.id)["boot_count"] == body["boot_count"]
            # Its own token: another agent's is refused.
            other = next(n for n in host.nodes if n.id != node.id)
            code, body = await _get(session, node, host.tokens[other.id])
            assert code == 401, body
    # The workloads run in their own slot roots, one per agent.
    for node in host.nodes:
        assert processes_under(host.state_dirs[node.id]), f"{node.id}: no workload running"


async def test_rollout_through_the_agent_driver(host: HostProc, images: SampleImages) -> None:
    policy = parse_policy(
        {
            "activation": "reboot",  # a new life of the hosted agent, like a re-exec
            "batches": {"canary": 1, "size": "50%", "max_unavailable": "50%"},
            "health": {
                "checks": [{"type": "http", "port": WORKLOAD_PORT}, {"type": "agent"}],
                "interval": 0.2,
                "min_healthy_time": 0.4,
                "deadline": 15,
                "boot_timeout": 20,
            },
            "failure": {"max_failed": 0, "action": "rollback"},
        },
        "host-test",
    )
    nodes = tuple(host.nodes)
    driver = AgentDriver()
    engine = Engine(driver, policy, images.v2, lambda e: None, policy_name="host-test")
    try:
        result = await engine.run(plan_batches(nodes, policy))
    finally:
        await driver.close()
    assert result.phase is RolloutPhase.SUCCEEDED, result.message
    async with aiohttp.ClientSession() as session:
        for node in nodes:
            code, body = await _get(session, node, host.tokens[node.id])
            assert code == 200, body
            assert body["node_id"] == node.id
            assert body["booted"]["digest"] == images.v2.digest
            assert body["committed"] is True
            assert _state(host, node.id)["boot_count"] == body["boot_count"]
    # Each agent rebooted once, as its own new life in the host process, logged as its own.
    reexecs = sorted(e["node_id"] for e in host.events("reexec"))
    assert reexecs == sorted(n.id for n in nodes)
    assert host.proc.returncode is None
    host.proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(host.proc.wait(), 15) == 0
    for node in nodes:  # each stopped its own workload
        assert not processes_under(host.state_dirs[node.id]), node.id


def test_config_errors_name_the_agent_and_field(tmp_path: Path) -> None:
    (tmp_path / "t").write_text("tok\n")
    agent = {"listen": "127.0.0.9:7000", "state_dir": "a", "token_file": "t"}
    config = tmp_path / "host.json"
    config.write_text(json.dumps({"agents": [agent, agent | {"state_dir": "b"}]}))
    with pytest.raises(InputError, match=r"agents\.1: listen 127.0.0.9:7000 is also agents\.0"):
        load_host_config(config)
    config.write_text(json.dumps({"defaults": {"kernel_delay": -1}, "agents": [agent]}))
    with pytest.raises(InputError, match=r"agents\.0: kernel_delay"):
        load_host_config(config)
    config.write_text(json.dumps({"agents": [agent | {"bogus": 1}]}))
    with pytest.raises(InputError, match=r"agents\.0: bogus"):
        load_host_config(config)
    config.write_text(json.dumps({"agents": [agent]}))
    (loaded,) = load_host_config(config)
    assert loaded.config.state_dir == tmp_path / "a"
    assert loaded.config.node_id == "127.0.0.9"
