"""The promises of the engine and the controller, as tables, on virtual time.

Each case runs the real `Controller` (journal in a SQLite file) and the real `Engine` over
simulated nodes (rollout.drivers.sim), on a looptime loop: boots of 10 s, bakes and gate
timeouts take no real time, and a rollout that would hang (a gate run twice that nobody
approves again) ends at a virtual deadline instead.

The promises, one table each:

- commands: every command (pause, resume, abort, retry, rollback) in every rollout phase
  is legal or `IllegalCommand` exactly as docs/controller-api.md says, and an illegal one
  changes nothing in the journal;
- resume: a gate the journal says passed after batch N is not run again for batch N (and
  still runs for the batches after it);
- rollback cap: however many nodes return, at most `max_unavailable` reboot at once;
- gate failure x failure action: the final phase and the exact set of rolled-back nodes
  that docs/gates.md gives for halt, rollback, rollback-all and continue;
- no double activation: a resumed node whose activation already arrived (its boot count
  moved past the journaled one) is not activated again; one whose activation never left
  is activated exactly once.

Each Controller gets `driver_for`, a factory of `Agents`: a SimDriver over one shared
simulated fleet, so a "controller crash" (its task cancelled) leaves the nodes running,
and a fresh Controller over the same state file resumes against them, as after a real
crash.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from rollout.controller import Controller, IllegalCommand, RetryHook
from rollout.drivers.sim import SimDriver, SimFleet
from rollout.entries import PhaseEntry
from rollout.journal import RolloutState, SQLiteStore, load_state
from rollout.model import ActivationMode, Image, Node, NodePhase, NodeStatus, RolloutPhase
from rollout.plan import plan_batches
from rollout.policy import Policy, parse_policy
from rollout.pull import PullAccess
from rollout.record import NodeRecord, RolloutResult
from tests.helpers import LEGAL_IDLE

pytestmark = pytest.mark.looptime

V1 = Image("v1.img", "sha256:" + "1" * 64, "app", "1.0", 100)
V2 = Image("v2.img", "sha256:" + "2" * 64, "app", "2.0", 100)
DEADLINE = 4 * 3600.0  # virtual seconds: far more than any case here needs


class Agents(SimDriver):
    """The simulated fleet as a controller reaches it.

    On top of SimDriver: nodes that outlive the controller (`close` leaves their boots
    running); a workload that fails on the new image for the nodes in `world.sick`; a
    controller crash at a node's activation (`world.crash_at`: "before" the request
    leaves, or "after" it arrived); and every rollback request, with how many nodes were
    rebooting then.
    """

    def __init__(self, world: World) -> None:
        super().__init__(world.sim)
        self.world = world

    async def status(self, node: Node) -> NodeStatus:
        st = await super().status(node)
        if node.id in self.world.sick and st.booted_digest == V2.digest:
            return dataclasses.replace(st, workload="failed")
        return st

    async def activate(self, node: Node, mode: ActivationMode) -> None:
        when = self.world.crash_at.pop(node.id, None)
        if when == "before":
            await self.world.crash()  # the request never leaves
        await super().activate(node, mode)
        if when == "after":
            await self.world.crash()  # it arrived; the controller died before the answer

    async def commit(self, node: Node) -> NodeStatus:
        st = await super().commit(node)
        self.world.commits.append(node.id)
        if node.id in self.world.crash_at_commit:
            self.world.crash_at_commit.discard(node.id)
            await self.world.crash()  # committed; the controller died before the answer
        return st

    async def rollback(self, node: Node, mode: ActivationMode) -> None:
        await super().rollback(node, mode)
        rebooting = sum(1 for n in self.fleet.nodes.values() if n.busy == "booting")
        self.world.rollbacks.append((node.id, rebooting))

    async def close(self) -> None:
        return None  # the nodes are machines of their own: a boot under way goes on


class World:
    """One simulated fleet, one state file, and any number of controllers over them."""

    def __init__(self, tmp_path: Path, size: int) -> None:
        token = tmp_path / "token"
        token.write_text("simulated-token\n")
        self.nodes = tuple(
            Node(f"n{i}", f"10.0.0.{i}:7000", {}, str(token)) for i in range(1, size + 1)
        )
        self.sim = SimFleet(self.nodes, V1, boot_seconds=10.1)
        self.store = SQLiteStore(tmp_path / "state.db")
        self.sick: set[str] = set()
        self.crash_at: dict[str, str] = {}
        self.rollbacks: list[tuple[str, int]] = []  # (node, nodes rebooting at the request)
        self.commits: list[str] = []  # every commit request, by node
        self.crash_at_commit: set[str] = set()  # the controller dies once these committed
        self.drivers: list[Agents] = []
        self.running: asyncio.Task[RolloutResult] | None = None

    def driver(self, holder: str, pull: PullAccess, on_retry: RetryHook | None) -> Agents:
        """The controller's `driver_for`: every rollout reaches the one simulated fleet."""
        agents = Agents(self)
        self.drivers.append(agents)
        return agents

    def controller(self) -> Controller:
        """A fresh controller process over the state file: nothing in memory."""
        return Controller(self.store, driver_for=self.driver)

    def create(self, controller: Controller, pol: Policy) -> str:
        return controller.create(self.nodes, pol, V2, "promises").rollout_id

    def start(self, controller: Controller, rollout_id: str) -> asyncio.Task[RolloutResult]:
        self.running = asyncio.create_task(controller.execute(rollout_id))
        return self.running

    async def crash(self) -> None:
        """Kill the running controller here: its task is cancelled, and this never returns."""
        assert self.running is not None
        self.running.cancel()
        await asyncio.get_running_loop().create_future()  # the cancellation lands here

    async def execute(self, controller: Controller, rollout_id: str) -> RolloutResult:
        """Run (or resume) the rollout to its end, failing at the virtual deadline."""
        try:
            return await asyncio.wait_for(self.start(controller, rollout_id), DEADLINE)
        except TimeoutError:
            state = controller.state(rollout_id)
            pytest.fail(f"no end after {DEADLINE:g} virtual s: {state.phase} {state.message}")

    def activations(self) -> Counter[str]:
        return Counter(node_id for node_id, _ in self.sim.activations)

    def on(self, node_id: str) -> tuple[str | None, bool]:
        """The image a node runs, and whether it is committed: what the fleet says."""
        sim = self.sim[node_id]
        return sim.slots[sim.booted], sim.committed

    def gate_entries(self, rollout_id: str, event: str) -> Counter[tuple[str, int]]:
        return Counter(
            (g.gate, int(g.batch or 0))
            for g in self.store_state(rollout_id).gates
            if g.event == event
        )

    def store_state(self, rollout_id: str) -> RolloutState:
        return load_state(self.store, rollout_id)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    w = World(tmp_path, 6)
    yield w
    if w.running is not None and not w.running.done():
        w.running.cancel()
    for driver in w.drivers:
        await driver.close()  # nodes still rebooting stop doing so
    w.store.close()


def policy(action: str = "rollback", gates: tuple[dict[str, Any], ...] = ()) -> Policy:
    return parse_policy(
        {
            "batches": {"canary": 1, "size": 2, "max_unavailable": 2},
            "health": {
                "checks": [{"type": "agent"}],
                "interval": 5,
                "min_healthy_time": 20,
                "deadline": 120,
                "boot_timeout": 60,
                "failure_threshold": 2,
            },
            "failure": {"max_failed": 0, "action": action},
            "gates": list(gates),
        },
        "promises",
    )


def test_the_plan_these_tables_assume() -> None:
    nodes = tuple(Node(f"n{i}", f"10.0.0.{i}:7000") for i in range(1, 7))
    batches = plan_batches(nodes, policy())
    assert [b.node_ids for b in batches] == [("n1",), ("n2", "n3"), ("n4", "n5"), ("n6",)]
    assert [b.canary for b in batches] == [True, False, False, False]


# -- commands x phases ------------------------------------------------------------------------
P = RolloutPhase
ALL_PHASES = tuple(RolloutPhase)
# LEGAL_IDLE (tests.helpers): docs/controller-api.md's command table; test_api.py holds
# the HTTP answers to the same table.
# The phase journaled at once by a legal command (None: the command journals no phase).
PHASE_AFTER = {
    "pause": P.PAUSED,
    "resume": P.RUNNING,
    "abort": P.ABORTED,
    "retry": P.RUNNING,
    "rollback": None,
}
# While its engine still runs (not winding down), the phases it can be in.
LIVE_PHASES = (P.PENDING, P.RUNNING, P.WAITING, P.PAUSED, P.ROLLING_BACK)
LEGAL_LIVE: dict[str, frozenset[RolloutPhase]] = {
    "pause": frozenset({P.PENDING, P.RUNNING, P.WAITING}),
    "resume": frozenset({P.PAUSED}),  # the running engine resumes: no second one starts
    "abort": frozenset(LIVE_PHASES),  # the engine ends it: no phase journaled by the command
    "retry": frozenset(),  # "the rollout is still running"
    "rollback": frozenset(),  # "abort it first"
}
COMMANDS = tuple(LEGAL_IDLE)


def in_phase(world: World, phase: RolloutPhase) -> tuple[Controller, str]:
    """A rollout whose journal puts it in `phase`, with n1 committed (as after batch 1)."""
    controller = world.controller()
    rollout_id = world.create(controller, policy())
    rec = NodeRecord(world.nodes[0], 1, NodePhase.COMMITTED, previous_digest=V1.digest)
    world.store.append(rollout_id, rec.snapshot())
    if phase is not P.PENDING:
        world.store.append(rollout_id, PhaseEntry(phase=phase, message="set up"))
    assert controller.state(rollout_id).phase is phase
    return controller, rollout_id


async def stop_started(controller: Controller) -> None:
    """Cancel what a legal command started (this table is about legality only)."""
    tasks = list(controller.tasks.values())
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


@pytest.mark.parametrize("phase", ALL_PHASES, ids=str)
@pytest.mark.parametrize("command", COMMANDS)
async def test_command_phase_table(world: World, command: str, phase: RolloutPhase) -> None:
    controller, rid = in_phase(world, phase)
    before = world.store.entries(rid)
    if phase not in LEGAL_IDLE[command]:
        with pytest.raises(IllegalCommand):
            controller.command(rid, command, by="table")
        assert world.store.entries(rid) == before, "an illegal command changed the journal"
        assert rid not in controller.tasks
        return
    controller.command(rid, command, by="table")
    state = controller.state(rid)
    assert state.commands[-1].command == command and state.commands[-1].by == "table"
    expected = PHASE_AFTER[command]
    assert state.phase is (phase if expected is None else expected)
    starts = command in ("resume", "retry", "rollback")
    assert (rid in controller.tasks) is starts
    await stop_started(controller)


@pytest.mark.parametrize("phase", LIVE_PHASES, ids=str)
@pytest.mark.parametrize("command", COMMANDS)
async def test_command_phase_table_while_the_engine_runs(
    world: World, command: str, phase: RolloutPhase
) -> None:
    controller, rid = in_phase(world, phase)

    async def running_engine() -> RolloutResult:
        await asyncio.sleep(DEADLINE)
        raise AssertionError("never ends within the test")

    engine = asyncio.create_task(running_engine())
    controller.tasks[rid] = engine
    before = world.store.entries(rid)
    try:
        if phase not in LEGAL_LIVE[command]:
            with pytest.raises(IllegalCommand):
                controller.command(rid, command, by="table")
            assert world.store.entries(rid) == before
        else:
            controller.command(rid, command, by="table")
            state = controller.state(rid)
            assert state.commands[-1].command == command
            expected = {"pause": P.PAUSED, "resume": P.RUNNING, "abort": phase}[command]
            assert state.phase is expected
            if command == "abort":
                assert controller.controls[rid].aborted
        assert controller.tasks[rid] is engine, "a second engine was started"
    finally:
        engine.cancel()
        await asyncio.gather(engine, return_exceptions=True)


async def test_unknown_command_is_illegal_and_changes_nothing(world: World) -> None:
    controller, rid = in_phase(world, P.RUNNING)
    before = world.store.entries(rid)
    with pytest.raises(IllegalCommand, match="unknown command"):
        controller.command(rid, "reboot-everything")
    assert world.store.entries(rid) == before


# -- resume past a passed gate ---------------------------------------------------------------
async def test_resume_does_not_run_a_gate_again_that_passed(world: World) -> None:
    """Journal: after batch 1, gate `qa` (an approval) and a bake passed, then the
    controller died waiting on `ops`. The resumed rollout goes straight to `ops`: `qa`,
    whose approval was used up, would wait forever if it ran again, and the bake would
    run twice for batch 1. The bake still runs once after every later batch."""
    gates = (
        {"name": "qa", "kind": "approval", "after": "canary"},
        {"name": "bake", "kind": "bake", "after": "every", "duration": "30s"},
        {"name": "ops", "kind": "approval", "after": "canary"},
    )
    first = world.controller()
    rid = world.create(first, policy(gates=gates))
    first.decide(rid, "qa", True, "alice")
    task = world.start(first, rid)
    while ("ops", 1) not in world.gate_entries(rid, "waiting"):
        assert not task.done(), task
        await asyncio.sleep(1)  # virtual: polling the journal
    task.cancel()  # the controller dies while waiting for ops
    await asyncio.gather(task, return_exceptions=True)
    passed = {
        (g.gate, g.batch)
        for g in world.store_state(rid).gates
        if g.get("event") == "finished" and g.get("result") == "passed"
    }
    assert passed == {("qa", 1), ("bake", 1)}

    again = world.controller()  # nothing in memory but what the journal says
    again.decide(rid, "ops", True, "bob")
    result = await world.execute(again, rid)
    assert result.phase is RolloutPhase.SUCCEEDED, result.message
    assert world.gate_entries(rid, "waiting") == Counter(
        {("qa", 1): 1, ("bake", 1): 1, ("ops", 1): 2, ("bake", 2): 1, ("bake", 3): 1,
         ("bake", 4): 1}
    )  # fmt: skip
    assert world.activations() == Counter({n.id: 1 for n in world.nodes})


# -- the rollback cap ------------------------------------------------------------------------
Then = Callable[[Controller, str], object]  # what happens once the rollout ended


def trigger_gate(world: World) -> tuple[Policy, Then | None]:
    gate = {"name": "soak", "kind": "approval", "after": 4, "timeout": "1m"}  # times out
    return policy("rollback-all", (gate,)), None


def trigger_batch(world: World) -> tuple[Policy, Then | None]:
    world.sick.add("n6")  # the last node fails its health checks
    return policy("rollback-all"), None


def trigger_operator(world: World) -> tuple[Policy, Then | None]:
    return policy("rollback"), lambda c, rid: c.command(rid, "rollback", by="ops")


@pytest.mark.parametrize(
    "trigger",
    [trigger_gate, trigger_batch, trigger_operator],
    ids=["gate-fails-rollback-all", "last-batch-fails-rollback-all", "operator-rollback"],
)
async def test_rollbacks_in_flight_never_exceed_max_unavailable(
    world: World,
    trigger: Callable[[World], tuple[Policy, Then | None]],
) -> None:
    pol, then = trigger(world)
    controller = world.controller()
    rid = world.create(controller, pol)
    result = await world.execute(controller, rid)
    if then is not None:  # the rollout succeeded; the operator rolls it back
        assert result.phase is RolloutPhase.SUCCEEDED, result.message
        then(controller, rid)
        result = await asyncio.wait_for(controller.tasks[rid], DEADLINE)
    assert result.phase is RolloutPhase.ROLLED_BACK, result.message
    assert sorted(n for n, _ in world.rollbacks) == [n.id for n in world.nodes]  # 6 returned
    peak = max(rebooting for _, rebooting in world.rollbacks)
    assert peak == 2, f"{peak} nodes rebooting at once for a rollback; max_unavailable is 2"
    assert {n.id: world.on(n.id) for n in world.nodes} == {
        n.id: (V1.digest, True) for n in world.nodes
    }


# -- gate failure x failure action -----------------------------------------------------------
# docs/gates.md: a gate that fails or times out triggers failure.action; with `continue`
# the rollout halts as well. `rollback` returns the batch the gate followed (batch 2: n2,
# n3), `rollback-all` every node updated so far (n1, n2, n3); batches 3 and 4 never start.
GATE_FAILED = [
    ("halt", RolloutPhase.HALTED, set()),
    ("rollback", RolloutPhase.ROLLED_BACK, {"n2", "n3"}),
    ("rollback-all", RolloutPhase.ROLLED_BACK, {"n1", "n2", "n3"}),
    ("continue", RolloutPhase.HALTED, set()),
]


@pytest.mark.parametrize("how", ["rejected", "timeout"])
@pytest.mark.parametrize(("action", "phase", "rolled_back"), GATE_FAILED, ids=lambda v: str(v))
async def test_gate_failure_after_batch_2_by_failure_action(
    world: World, how: str, action: str, phase: RolloutPhase, rolled_back: set[str]
) -> None:
    gate: dict[str, Any] = {"name": "qa", "kind": "approval", "after": 2}
    if how == "timeout":
        gate["timeout"] = "2m"
    controller = world.controller()
    rid = world.create(controller, policy(action, (gate,)))
    if how == "rejected":
        controller.decide(rid, "qa", False, "qa-team", "smoke tests red")
    result = await world.execute(controller, rid)
    assert result.phase is phase, result.message
    assert controller.state(rid).phase is phase
    assert "gate qa" in result.message
    assert {i for i, r in result.nodes.items() if r.phase is NodePhase.ROLLED_BACK} == rolled_back
    updated = {"n1", "n2", "n3"} - rolled_back
    assert {i for i, r in result.nodes.items() if r.phase is NodePhase.COMMITTED} == updated
    for node in world.nodes:  # what the fleet says agrees with the journal
        on_v2 = node.id in updated
        assert world.on(node.id) == ((V2.digest if on_v2 else V1.digest), True), node.id
    assert world.activations() == Counter({"n1": 1, "n2": 1, "n3": 1})  # 3 and 4 never ran
    assert sorted(n for n, _ in world.rollbacks) == sorted(rolled_back)


# -- no double activation --------------------------------------------------------------------
def boot_done(world: World) -> None:
    """While the controller is down, the node boots the target (10 s): nothing to do."""


def fell_back(world: World) -> None:
    """While the controller is down, the node booted the target, was not committed in
    time and fell back on its own (its agent's boot counting): on v1, committed, two boots
    past the journaled count."""
    sim = world.sim["n1"]
    assert sim.boot_count == 2 and sim.slots[sim.booted] == V2.digest
    sim.fall_back()  # the agent's own transition: boot the last good slot, committed


DOUBLE_ACTIVATION = [
    # (crash, meanwhile, final phase, n1's phase, n1 on, n1's boot count)
    ("after", boot_done, RolloutPhase.SUCCEEDED, NodePhase.COMMITTED, V2, 2),
    ("after", fell_back, RolloutPhase.ROLLED_BACK, NodePhase.ROLLED_BACK, V1, 3),
    ("before", boot_done, RolloutPhase.SUCCEEDED, NodePhase.COMMITTED, V2, 2),
]


@pytest.mark.parametrize(
    ("crash", "meanwhile", "final", "node_phase", "image", "boots"),
    DOUBLE_ACTIVATION,
    ids=["arrived-and-booted", "arrived-booted-fell-back", "never-left"],
)
async def test_a_resumed_node_is_activated_exactly_once(
    world: World,
    crash: str,
    meanwhile: Callable[[World], None],
    final: RolloutPhase,
    node_phase: NodePhase,
    image: Image,
    boots: int,
) -> None:
    """The controller dies at the canary's activation, after its ACTIVATING snapshot
    (activated, boot count 1) is journaled: after the request arrived, or before it left.
    A fresh controller resumes once the node has done what it does meanwhile."""
    world.crash_at["n1"] = crash
    first = world.controller()
    rid = world.create(first, policy())
    task = world.start(first, rid)
    await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled()
    snap = world.store_state(rid).nodes["n1"]
    assert (snap.phase, snap.activated, snap.boot_count_start) == ("activating", True, 1)
    await asyncio.sleep(30)  # virtual: the controller stays dead while the node boots
    meanwhile(world)
    assert world.activations()["n1"] == (1 if crash == "after" else 0)

    result = await world.execute(world.controller(), rid)
    assert result.phase is final, result.message
    assert world.activations()["n1"] == 1, "n1 was activated again on resume"
    assert result.nodes["n1"].phase is node_phase
    assert world.on("n1") == (image.digest, True)
    assert world.sim["n1"].boot_count == boots
    if final is RolloutPhase.SUCCEEDED:
        assert world.activations() == Counter({n.id: 1 for n in world.nodes})


async def test_a_node_committed_before_the_crash_is_not_verified_or_committed_again(
    world: World,
) -> None:
    """The controller dies as the canary's commit is answered, before the COMMITTED entry
    (an observation, written lazily) is on disk: the journal says it is being verified.
    Its agent says
    committed on the target, past the journaled boot count, so the resumed controller
    records it committed, with no second round of health checks and no second commit."""
    world.crash_at_commit.add("n1")
    first = world.controller()
    rid = world.create(first, policy())
    task = world.start(first, rid)
    await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled()
    world.store._buffer.clear()  # what a killed process had not committed is gone
    assert world.store_state(rid).nodes["n1"].phase in (NodePhase.VERIFYING, NodePhase.HEALTHY)
    assert world.on("n1") == (V2.digest, True)

    result = await world.execute(world.controller(), rid)
    assert result.phase is RolloutPhase.SUCCEEDED, result.message
    assert result.nodes["n1"].phase is NodePhase.COMMITTED
    assert "committed already" in result.nodes["n1"].detail
    assert Counter(world.commits) == Counter({n.id: 1 for n in world.nodes})
    assert world.activations() == Counter({n.id: 1 for n in world.nodes})
