"""The simulated driver: nodes kept in memory, with the agent's real state machine.

For tests of engine logic on virtual time (and for trying policies without machines):
each `SimNode` keeps A/B slots, a staged image, the booted slot, the committed flag and a
persisted-style boot count; activation takes `boot_seconds` on the one clock
(rollout.clock), so a test on a virtual-time loop sees exact, repeatable durations. What
is *not* simulated is left to the real agent and its tests: bytes, digests on disk,
process restarts, the commit deadline.

Health is decided by `healthy(node_id, digest, since_boot)`, a function the test gives:
e.g. "image X is never healthy", or "node-2 turns unhealthy 30 s after boot". `SimProber`
answers the policy's checks with it, in place of HTTP/TCP probes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from rollout import clock
from rollout.drivers.base import Refused, TransportError
from rollout.health import CheckResult
from rollout.model import ActivationMode, Image, Node, NodeStatus
from rollout.policy import Check

Healthy = Callable[[str, str, float], bool]


@dataclass
class SimNode:
    node_id: str
    slots: dict[str, str | None]  # slot -> digest
    booted: str = "A"
    committed: bool = True
    last_good: str = "A"
    staged: str | None = None
    boot_count: int = 1
    booted_at: float = 0.0
    busy: str | None = None
    reachable: bool = True
    versions: dict[str, str] = field(default_factory=dict)  # digest -> version

    def status(self) -> NodeStatus:
        digest = self.slots[self.booted]
        return NodeStatus(
            node_id=self.node_id,
            booted_slot=self.booted,
            booted_version=self.versions.get(digest or "", None),
            booted_digest=digest,
            staged_digest=self.slots[self.staged] if self.staged else None,
            committed=self.committed,
            boot_count=self.boot_count,
            workload="running",
            busy=self.busy,
        )

    @property
    def inactive(self) -> str:
        return "B" if self.booted == "A" else "A"


class SimFleet:
    """In-memory nodes booted on `image`, reached by `SimDriver`."""

    def __init__(
        self,
        nodes: Sequence[Node],
        image: Image,
        boot_seconds: float = 10.0,
        stage_seconds: float = 0.0,
    ) -> None:
        self.boot_seconds = boot_seconds
        self.stage_seconds = stage_seconds  # how long writing an image takes
        self.stages: list[tuple[str, float]] = []  # (node, clock time a stage began)
        self.discards: list[str] = []
        self.nodes = {
            n.id: SimNode(
                n.id, {"A": image.digest, "B": None}, versions={image.digest: image.version}
            )
            for n in nodes
        }
        self.activations: list[tuple[str, float]] = []  # (node, clock time): for assertions

    def __getitem__(self, node_id: str) -> SimNode:
        return self.nodes[node_id]


class SimDriver:
    """Driver over a SimFleet; boots take `boot_seconds` on rollout.clock."""

    def __init__(self, fleet: SimFleet) -> None:
        self.fleet = fleet
        self._tasks: set[asyncio.Task[None]] = set()

    def _node(self, node: Node) -> SimNode:
        sim = self.fleet[node.id]
        if not sim.reachable or (sim.busy == "booting"):
            raise TransportError(f"{node.id}: connection refused (simulated)")
        return sim

    async def status(self, node: Node) -> NodeStatus:
        return self._node(node).status()

    async def stage(
        self, node: Node, image: Image, on_bytes: Callable[[int], None] | None = None
    ) -> bool:
        sim = self._node(node)
        if sim.slots[sim.booted] == image.digest:
            raise Refused("already_booted", "that image is booted", 409)
        if sim.staged and sim.slots[sim.staged] == image.digest:
            return False
        self.fleet.stages.append((node.id, clock.now()))
        if self.fleet.stage_seconds:
            sim.busy = "staging"
            try:
                await clock.sleep(self.fleet.stage_seconds)
            finally:
                sim.busy = None
        sim.slots[sim.inactive] = image.digest
        sim.versions[image.digest] = image.version
        sim.staged = sim.inactive
        if on_bytes is not None:
            on_bytes(image.size)
        return True

    async def discard(self, node: Node, digest: str) -> bool:
        sim = self._node(node)
        if sim.staged is None or sim.slots[sim.staged] != digest:
            return False
        sim.slots[sim.staged], sim.staged = None, None
        self.fleet.discards.append(node.id)
        return True

    async def activate(self, node: Node, mode: ActivationMode) -> None:
        sim = self._node(node)
        if sim.staged is None:
            raise Refused("nothing_staged", "stage an image first", 409)
        target, sim.staged = sim.staged, None
        self.fleet.activations.append((node.id, clock.now()))
        self._boot(sim, target, committed=False)

    async def commit(self, node: Node) -> NodeStatus:
        sim = self._node(node)
        sim.committed, sim.last_good = True, sim.booted
        return sim.status()

    async def rollback(self, node: Node, mode: ActivationMode) -> None:
        sim = self._node(node)
        target = sim.last_good if not sim.committed else sim.inactive
        if target == sim.booted or sim.slots[target] is None:
            raise Refused("nothing_to_roll_back", "no other good slot", 409)
        self._boot(sim, target, committed=True)

    def _boot(self, sim: SimNode, slot: str, committed: bool) -> None:
        sim.busy = "booting"

        async def boot() -> None:
            await clock.sleep(self.fleet.boot_seconds)
            sim.booted, sim.committed, sim.busy = slot, committed, None
            if committed:
                sim.last_good = slot
            sim.boot_count += 1
            sim.booted_at = clock.now()

        task = asyncio.create_task(boot())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def lease(self, node: Node, ttl: float) -> bool:
        """Simulated nodes take part in no other rollout: a lease is always granted."""
        self._node(node)
        return True

    async def release(self, node: Node) -> None:
        return None

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()


class SimProber:
    """Answers every health check of a node with the test's `healthy` function."""

    def __init__(self, fleet: SimFleet, healthy: Healthy) -> None:
        self.fleet = fleet
        self.healthy = healthy

    async def check_all(
        self, checks: Sequence[Check], node: Node, target_digest: str
    ) -> list[CheckResult]:
        sim = self.fleet[node.id]
        digest = sim.slots[sim.booted] or ""
        ok = sim.busy is None and self.healthy(node.id, digest, clock.now() - sim.booted_at)
        return [CheckResult(c.type, ok, "simulated") for c in checks]
