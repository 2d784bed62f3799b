"""The controller keeps its agent leases alive at fleet scale (virtual time)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from rollout.controller import Controller
from rollout.journal import SQLiteStore
from rollout.model import Node

pytestmark = pytest.mark.looptime


class SlowLeases:
    """A leasing driver whose every lease call takes a virtual second (a busy agent)."""

    def __init__(self) -> None:
        self.renewed: dict[str, float] = {}

    async def lease(self, node: Node, ttl: float) -> bool:
        await asyncio.sleep(1.0)
        self.renewed[node.id] = asyncio.get_running_loop().time()
        return False


async def test_lease_renewal_reaches_every_node_within_its_ttl(tmp_path: Path) -> None:
    """Renewing 100 leases that take a second each must not take 100 s: the leases
    (ttl 30 s) would lapse mid-rollout and another rollout could take the nodes."""
    store = SQLiteStore(tmp_path / "s.db")
    controller = Controller(store)
    driver = SlowLeases()
    nodes = [Node(f"n{i}", f"127.0.0.1:{7000 + i}", {}) for i in range(100)]
    start = asyncio.get_running_loop().time()
    async with controller._renewing(driver, nodes, "r1"):  # type: ignore[arg-type]
        await asyncio.sleep(controller.lock_ttl / 3 + 5)
    assert len(driver.renewed) == 100
    assert max(driver.renewed.values()) - start < controller.lock_ttl / 3 + 5
    store.close()
