"""The simulated driver: nodes kept in memory, on the agent's own state machine.

For tests of engine and controller logic on virtual time (and for trying policies
without machines). Each `SimNode` holds an `AgentState` and changes it only through the
pure transitions of `rollout.agent.state`, the ones a real agent applies: staging
(`stage_target`, `begin_stage`, `finish_stage`), activation and rollback (`plan_activate`,
`plan_rollback`), boots (`plan_boot`, `begin_boot`, `finish_boot`), commit, and the
agent's own fallback (`fall_back`). So there is one slot/boot/commit logic, and the
simulation cannot drift from it. A boot takes `boot_seconds` on the one clock
(rollout.clock), so a test on a virtual-time loop sees exact, repeatable durations. What
is *not* simulated is left to the real agent and its tests: bytes, digests on disk,
process restarts, the commit deadline timer.

Health is decided by `healthy(node_id, digest, since_boot)`, a function the test gives:
e.g. "image X is never healthy", or "node-2 turns unhealthy 30 s after boot". `SimProber`
answers the policy's checks with it, in place of HTTP/TCP probes.

The workload the agent reports in its status (what the controller's own `agent` check and
its boot wait read, with no prober injected: `rollout simulate`) follows two fleet
settings: after each boot it is `starting` for `healthy_after` seconds, as a real agent's
is until the workload has come up; then `running`, except on the nodes in `failing`,
whose workload fails on any image but the one they were installed with (a bad image
there). The nodes in `not_booting` never come up on such an image: the boot into it
spends its try, the machine boots again (another `boot_seconds`) and falls back to its
last good slot, as a real A/B bootloader does. The factory boot counts as long ago: an
untouched node runs its workload.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

from rollout import clock
from rollout.agent import state as sm
from rollout.agent.state import AgentError, AgentState, FallbackReason, Slot, SlotImage
from rollout.drivers.base import Refused, TransportError
from rollout.health import HOLD_MAX, CheckResult, agent_only
from rollout.model import ActivationMode, Image, Node, NodeStatus
from rollout.policy import Check

Healthy = Callable[[str, str, float], bool]
_NO_DEADLINE = 1e12  # the commit deadline timer is not simulated


def _boot(state: AgentState, now: float) -> AgentState:
    """One boot, as the agent does it on start: plan, consume a try, finish."""
    plan = sm.plan_boot(state)
    return sm.finish_boot(sm.begin_boot(state, plan), plan, now=now, commit_deadline=_NO_DEADLINE)


@dataclass
class SimNode:
    node_id: str
    state: AgentState
    booted_at: float = 0.0
    busy: str | None = None
    reachable: bool = True

    @classmethod
    def factory(cls, node_id: str, image: Image) -> SimNode:
        """A node factory-installed with `image` and booted once, as a fresh agent."""
        slot = SlotImage(image.digest, image.name, image.version)
        return cls(node_id, _boot(sm.factory_state(slot), 0.0))

    # What tests read, in the simulation's plain terms.
    @property
    def slots(self) -> dict[str, str | None]:
        return {str(s): (i.digest if (i := self.state.slot(s)) else None) for s in Slot}

    @property
    def booted(self) -> str:
        return str(self.state.booted)

    @property
    def staged(self) -> str | None:
        return str(self.state.staged) if self.state.staged is not None else None

    @property
    def committed(self) -> bool:
        return self.state.committed

    @property
    def last_good(self) -> str:
        return str(self.state.last_good)

    @property
    def boot_count(self) -> int:
        return self.state.boot_count

    @property
    def inactive(self) -> str:
        return str(self.state.booted.other)

    def status(self, workload: str = "running") -> NodeStatus:
        s = self.state
        booted, staged = s.booted_image, s.slot(s.staged) if s.staged else None
        good = s.slot(s.last_good)
        return NodeStatus(
            node_id=self.node_id,
            booted_slot=str(s.booted),
            booted_version=booted.version,
            booted_digest=booted.digest,
            staged_digest=staged.digest if staged else None,
            committed=s.committed,
            boot_count=s.boot_count,
            workload=workload,
            busy=self.busy,
            last_good_digest=good.digest if good else None,
            last_good_version=good.version if good else None,
        )

    def fall_back(self, reason: FallbackReason = FallbackReason.COMMIT_DEADLINE) -> None:
        """What the agent does on its own when its uncommitted slot is not committed in
        time: boot the last good slot, committed (at once; no controller involved)."""
        self.state = _boot(sm.plan_fallback(self.state, reason), clock.now())
        self.booted_at = clock.now()


class SimFleet:
    """In-memory nodes booted on `image`, reached by `SimDriver`."""

    def __init__(
        self,
        nodes: Sequence[Node],
        image: Image,
        boot_seconds: float = 10.0,
        stage_seconds: float = 0.0,
        healthy_after: float = 0.0,
        failing: Collection[str] = (),
        boot_times: Mapping[str, float] | None = None,
        not_booting: Collection[str] = (),
        healthy_times: Mapping[str, float] | None = None,
    ) -> None:
        self.boot_seconds = boot_seconds
        self.boot_times = dict(boot_times or {})  # a node's own boot time, over boot_seconds
        self.stage_seconds = stage_seconds  # how long writing an image takes
        self.healthy_after = healthy_after  # workload "starting" this long after a boot
        self.healthy_times = dict(healthy_times or {})  # a node's own, over healthy_after
        self.failing = frozenset(failing)  # their workload fails on a new image
        self.not_booting = frozenset(not_booting)  # a new image never comes up on them
        self.factory_digest = image.digest
        self.stages: list[tuple[str, float]] = []  # (node, clock time a stage began)
        self.discards: list[str] = []
        # Every node starts in the same (immutable) state: computed once, shared.
        fresh = SimNode.factory("", image).state
        self.nodes = {n.id: SimNode(n.id, fresh) for n in nodes}
        self.activations: list[tuple[str, float]] = []  # (node, clock time): for assertions

    def __getitem__(self, node_id: str) -> SimNode:
        return self.nodes[node_id]

    def workload(self, sim: SimNode) -> str:
        """The workload state the node's agent reports now (see the module docstring)."""
        if self.starting_left(sim) > 0:
            return "starting"
        if sim.node_id in self.failing and sim.state.booted_image.digest != self.factory_digest:
            return "failed"
        return "running"

    def starting_left(self, sim: SimNode) -> float:
        """Seconds until the node's workload is past `starting` (0 when it is)."""
        starting = self.healthy_times.get(sim.node_id, self.healthy_after)
        if sim.state.boot_count <= 1:
            return 0.0
        left = sim.booted_at + starting - clock.now()
        return left if left > _SLACK else 0.0  # a sleep of `left` may land an ulp short


_SLACK = 1e-6  # seconds: clock sums are off by ulps (see starting_left)


def _refused(exc: AgentError) -> Refused:
    return Refused(exc.code, exc.message, 409)


class SimDriver:
    """Driver over a SimFleet; boots take `boot_seconds` on rollout.clock."""

    def __init__(self, fleet: SimFleet) -> None:
        self.fleet = fleet
        self._boots: dict[str, asyncio.TimerHandle] = {}  # boots under way, by node

    def _node(self, node: Node) -> SimNode:
        sim = self.fleet[node.id]
        if not sim.reachable or (sim.busy == "booting"):
            raise TransportError(f"{node.id}: connection refused (simulated)")
        return sim

    async def status(self, node: Node) -> NodeStatus:
        sim = self._node(node)
        return sim.status(self.fleet.workload(sim))

    async def watch(self, node: Node, seen: NodeStatus, wait: float) -> NodeStatus | None:
        """A long poll on virtual time: it waits while the workload is starting (the one
        change a simulated node makes on its own while it answers), else None."""
        left = self.fleet.starting_left(self._node(node))
        if left <= 0 or wait <= 0:
            return None
        await clock.sleep(min(left, wait))
        return await self.status(node)

    async def stage(
        self, node: Node, image: Image, on_bytes: Callable[[int], None] | None = None
    ) -> bool:
        sim = self._node(node)
        if sim.busy is not None:
            raise Refused("busy", f"the agent is busy {sim.busy}", 409)
        try:
            slot = sm.stage_target(sim.state, image.digest)
        except AgentError as exc:
            raise _refused(exc) from None
        if slot is None:
            return False
        self.fleet.stages.append((node.id, clock.now()))
        sim.state = sm.begin_stage(sim.state, slot)
        if self.fleet.stage_seconds:
            sim.busy = "staging"
            try:
                await clock.sleep(self.fleet.stage_seconds)
            finally:
                sim.busy = None
        sim.state = sm.finish_stage(
            sim.state, slot, SlotImage(image.digest, image.name, image.version)
        )
        if on_bytes is not None:
            on_bytes(image.size)
        return True

    async def discard(self, node: Node, digest: str) -> bool:
        sim = self._node(node)
        staged = sim.state.staged
        image = sim.state.slot(staged) if staged is not None else None
        if staged is None or image is None or image.digest != digest:
            return False
        sim.state = sm.begin_stage(sim.state, staged)  # empties it, staged no more
        self.fleet.discards.append(node.id)
        return True

    async def activate(self, node: Node, mode: ActivationMode) -> None:
        sim = self._node(node)
        try:
            new = sm.plan_activate(sim.state, mode)
        except AgentError as exc:
            raise _refused(exc) from None
        self.fleet.activations.append((node.id, clock.now()))
        self._boot(sim, new)

    async def commit(self, node: Node) -> NodeStatus:
        sim = self._node(node)
        sim.state = sm.commit(sim.state)
        return sim.status(self.fleet.workload(sim))

    async def rollback(self, node: Node, mode: ActivationMode) -> None:
        sim = self._node(node)
        try:
            new = sm.plan_rollback(sim.state, mode)
        except AgentError as exc:
            raise _refused(exc) from None
        self._boot(sim, new)

    def _boot(self, sim: SimNode, planned: AgentState) -> None:
        sim.state = planned
        sim.busy = "booting"
        seconds = max(0.0, self.fleet.boot_times.get(sim.node_id, self.fleet.boot_seconds))

        def booted() -> None:
            self._boots.pop(sim.node_id, None)
            plan = sm.plan_boot(sim.state)
            image = sim.state.slot(plan.slot)
            if (
                sim.node_id in self.fleet.not_booting
                and plan.consumes_try
                and image is not None
                and image.digest != self.fleet.factory_digest
            ):
                # The new image never comes up (a kernel that panics): the try is spent,
                # the machine resets, and the next boot falls back to the last good slot,
                # as GRUB's try counter does (state.plan_boot: tries exhausted).
                sim.state = sm.begin_boot(sim.state, plan)
                self._boots[sim.node_id] = clock.running_loop().call_later(seconds, booted)
                return
            sim.state = _boot(sim.state, clock.now())
            sim.busy = None
            sim.booted_at = clock.now()

        # A timer on the loop's clock, not a task: a rollout boots every node once.
        self._boots[sim.node_id] = clock.running_loop().call_later(seconds, booted)

    async def lease(self, node: Node, ttl: float) -> bool:
        """Simulated nodes take part in no other rollout: a lease is always granted."""
        self._node(node)
        return True

    async def release(self, node: Node) -> None:
        return None

    async def close(self) -> None:
        for handle in self._boots.values():
            handle.cancel()
        self._boots.clear()


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

    def first_round(
        self, checks: Sequence[Check], target_digest: str, st: NodeStatus
    ) -> list[CheckResult] | None:
        """None: the scripted health is not in the status, so the first round is a round."""
        return None

    async def hold(
        self, checks: Sequence[Check], node: Node, target_digest: str, results: list[CheckResult],
        wait: float, interval: float,
    ) -> list[CheckResult] | None:  # fmt: skip
        """`Prober.hold` on virtual time, for `agent` checks only: the scripted health has
        no status to watch, so it looks every `interval` and answers at the first look
        that fails, else after `wait` (at most HOLD_MAX). A real agent answers at the
        change itself, up to an interval sooner."""
        if not agent_only(checks):
            return None
        end = clock.now() + min(wait, HOLD_MAX)
        while True:
            left = end - clock.now()
            await clock.sleep(min(interval, left))
            now = await self.check_all(checks, node, target_digest)
            if not all(r.ok for r in now) or left <= interval:  # not `now >= end`: floats
                return now
