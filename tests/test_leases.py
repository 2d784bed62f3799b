"""The controller keeps its agent leases alive at fleet scale (virtual time)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import pytest

import rollout.controller as controller_module
from rollout.controller import LEASE_MAX_TTL, Controller, lease_ttl_for
from rollout.journal import SQLiteStore
from rollout.model import Node

pytestmark = pytest.mark.looptime


class SlowLeases:
    """A leasing driver whose every lease call takes a virtual second (a busy agent)."""

    def __init__(self) -> None:
        self.renewed: dict[str, float] = {}
        self.ttls: list[float] = []

    async def lease(self, node: Node, ttl: float) -> bool:
        await asyncio.sleep(1.0)
        self.renewed[node.id] = asyncio.get_running_loop().time()
        self.ttls.append(ttl)
        return False


async def test_lease_renewal_reaches_every_node_within_its_ttl(tmp_path: Path) -> None:
    """Renewing 100 leases that take a second each must not take 100 s: with a ttl of
    30 s the leases would lapse mid-rollout and another rollout could take the nodes."""
    store = SQLiteStore(tmp_path / "s.db")
    controller = Controller(store, lease_ttl=30.0)
    driver = SlowLeases()
    nodes = [Node(f"n{i}", f"127.0.0.1:{7000 + i}", {}) for i in range(100)]
    start = asyncio.get_running_loop().time()
    async with controller._renewing(driver, nodes, "r1"):  # type: ignore[arg-type]
        await asyncio.sleep(controller.lease_ttl / 3 + 5)
    assert len(driver.renewed) == 100
    assert max(driver.renewed.values()) - start < controller.lease_ttl / 3 + 5
    store.close()


class CountingStore(SQLiteStore):
    """The real store, counting lock renewals (and the full takes they fall back on)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.locked: list[float] = []
        self.taken = 0

    def renew(self, rollout_id: str, node_ids: Sequence[str], ttl: float) -> None:
        self.locked.append(asyncio.get_running_loop().time())
        super().renew(rollout_id, node_ids, ttl)

    def lock(self, rollout_id: str, node_ids: Sequence[str], ttl: float) -> None:
        self.taken += 1
        super().lock(rollout_id, node_ids, ttl)


async def test_locks_and_leases_renew_each_on_its_own_cadence(tmp_path: Path) -> None:
    """The state file's locks every lock_ttl / 3, the agents' leases (one request per
    node) only every lease_ttl / 3, and a lease sweep that takes long never delays a
    lock renewal."""
    store = CountingStore(tmp_path / "s.db")
    controller = Controller(store, lock_ttl=30.0, lease_ttl=300.0)
    driver = SlowLeases()
    nodes = [Node(f"n{i}", f"127.0.0.1:{7000 + i}", {}) for i in range(3)]
    store.lock("r1", [n.id for n in nodes], 30.0)  # as execute takes them first
    start = asyncio.get_running_loop().time()
    async with controller._renewing(driver, nodes, "r1"):  # type: ignore[arg-type]
        await asyncio.sleep(95)
        assert driver.renewed == {}  # 95 s < 300 / 3: no lease request yet
        assert len(store.locked) == 9  # at 10, 20, ... 90 s
        await asyncio.sleep(10)
    assert sorted(driver.renewed) == ["n0", "n1", "n2"]
    assert min(driver.renewed.values()) - start >= 100
    assert len(store.locked) == 10
    assert store.taken == 1  # every renewal found its locks held: one UPDATE, no re-take
    store.close()


@pytest.mark.parametrize(
    ("fleet", "ttl", "expected"),
    [
        pytest.param(30, 300.0, 300.0, id="a-small-fleet-keeps-300s"),
        pytest.param(10_000, 300.0, 300.0, id="10k-renews-100-a-second"),
        pytest.param(20_000, 300.0, 600.0, id="20k-lives-twice-as-long"),
        pytest.param(100_000, 300.0, 3000.0, id="100k"),
        pytest.param(10**6, 300.0, LEASE_MAX_TTL, id="capped-at-the-agents-3600s"),
        pytest.param(10, 10**7, 10**7, id="a-longer-ttl-is-kept"),
    ],
)
def test_a_large_fleets_leases_live_longer(fleet: int, ttl: float, expected: float) -> None:
    assert lease_ttl_for(fleet, ttl) == pytest.approx(expected)


async def test_a_large_fleet_renews_its_leases_at_the_bounded_rate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With 600 nodes and (here) 1 renewal a second allowed, leases are taken for 1800 s
    and renewed every 600 s: 600 requests per 600 s, not per 100 s."""
    monkeypatch.setattr(controller_module, "LEASE_RENEW_RATE", 1.0)
    store = SQLiteStore(tmp_path / "s.db")
    controller = Controller(store, lease_ttl=300.0)
    driver = SlowLeases()
    nodes = [Node(f"n{i}", f"127.0.0.1:{7000 + i}", {}) for i in range(600)]
    await controller._lease_all(driver, nodes, "r1")  # type: ignore[arg-type]
    assert set(driver.ttls) == {1800.0}
    driver.renewed.clear()
    start = asyncio.get_running_loop().time()
    async with controller._renewing(driver, nodes, "r1"):  # type: ignore[arg-type]
        await asyncio.sleep(599)
        assert driver.renewed == {}  # not at 100 s: the sweep waits a third of 1800 s
        await asyncio.sleep(5)
    assert len(driver.renewed) == 600
    assert min(driver.renewed.values()) - start >= 600
    store.close()
