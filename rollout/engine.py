"""The engine: runs a plan of batches as the policy says, one batch at a time.

Per batch: wait for its conditions (gates before it: windows, alerts), update its nodes
in parallel (asyncio.TaskGroup; each node through `steps.NodeSteps`), then let the pure
`decide.after_batch` say continue, halt, roll back the batch or roll back everything,
run the gates after it, and carry out what was decided (`decide.ending`, `decide.final`).
Nodes of later batches may be staged ahead meanwhile (`prestage.Prestager`).

Nodes already settled are skipped, so a re-run resumes a journaled rollout; gates that
passed before a crash are not run again. The engine never prints: every step is an event
(rollout.events) to one observer, which fans out to display, logs and metrics.

Stopping (Ctrl-C, abort): `request_stop()` makes the engine start nothing new (no new
batch, no new stage or activation); nodes already activated settle per policy (verify,
then commit or roll back), and the result names every node's phase.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime

import aiohttp

from rollout.control import Control
from rollout.decide import Decision, Ending, after_batch, after_gate, ending, final
from rollout.drivers.base import Driver
from rollout.entries import BatchFinishedEntry, BatchStartedEntry, GateEntry, PhaseEntry
from rollout.events import (
    BatchFinished,
    BatchStarted,
    Event,
    HealthChecked,
    Observer,
    RolloutFinished,
    RolloutPhaseChanged,
    RolloutStarted,
)
from rollout.gates.events import GateEvent, gate_event_json
from rollout.gates.runner import (
    GateEnv,
    GateOutcome,
    resolve_inconclusive,
    run_gate,
    utc_now,
    wait_before_batch,
)
from rollout.gates.schedule import after_batch as gates_after
from rollout.gates.schedule import before_batch
from rollout.gates.signals import GateBoxes
from rollout.health import Probe, Prober, probe_session
from rollout.model import Batch, Image, Node, NodePhase, RolloutPhase
from rollout.plan import limits
from rollout.policy import Policy
from rollout.prestage import Prestager
from rollout.record import Journal, NodeRecord, NoJournal, RolloutResult
from rollout.steps import REACH_TIMEOUT, NodeSteps

# Final phases after which images staged ahead will not be activated by this rollout.
_ABANDONING = frozenset(
    {RolloutPhase.HALTED, RolloutPhase.ROLLED_BACK, RolloutPhase.ABORTED, RolloutPhase.FAILED}
)


class Engine:
    def __init__(
        self,
        driver: Driver,
        policy: Policy,
        image: Image,
        observer: Observer,
        policy_name: str = "",
        rollout_id: str | None = None,
        reach_timeout: float = REACH_TIMEOUT,
        journal: Journal | None = None,
        records: dict[str, NodeRecord] | None = None,
        control: Control | None = None,
        boxes: GateBoxes | None = None,
        passed_gates: set[tuple[str, int]] | None = None,
        prober_for: Callable[[aiohttp.ClientSession], Probe] | None = None,
        wall_clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.driver = driver
        self.policy = policy
        self.image = image
        self.observer = observer
        self.policy_name = policy_name
        self.rollout_id = rollout_id or uuid.uuid4().hex[:12]
        self.reach_timeout = reach_timeout
        self.journal = journal or NoJournal()
        self.records: dict[str, NodeRecord] = dict(records or {})
        self.control = control or Control()
        self.boxes = boxes or GateBoxes()  # shared with the API that receives signals
        self.passed_gates = set(passed_gates or ())  # (gate, batch) passed before a resume
        self._gate_batch = 0
        self.prober_for = prober_for or (lambda session: Prober(self.driver, session))
        self.wall_clock = wall_clock  # what window gates judge (virtual in a simulation)
        self.steps = NodeSteps(
            driver, policy, image, self.control, self.journal, self._emit, reach_timeout
        )
        self.prestage = Prestager(self.steps, self.records)

    # -- control ------------------------------------------------------------------------
    def request_stop(self) -> None:
        """Start nothing new; let in-flight nodes settle (first Ctrl-C)."""
        self.control.abort()

    @property
    def stopping(self) -> bool:
        return self.control.aborted

    def _emit(self, event: Event) -> None:
        self.observer(event)

    def _resume_phase(self) -> None:
        """Back to running after a gate, unless an operator paused the rollout meanwhile."""
        self._phase(RolloutPhase.PAUSED if self.control.paused else RolloutPhase.RUNNING)

    def _phase(self, phase: RolloutPhase, message: str = "") -> None:
        if phase is RolloutPhase.ROLLING_BACK:
            self.prestage.stop()  # nothing more is activated: stop fetching for it
        self.journal.write(PhaseEntry(phase=phase, message=message))
        self._emit(RolloutPhaseChanged(self.rollout_id, phase, message))

    async def _finish(
        self, phase: RolloutPhase, message: str, stopped_as_asked: bool = False
    ) -> RolloutResult:
        self.prestage.stop()
        if phase in _ABANDONING:
            await self.prestage.discard()
        self.journal.write(PhaseEntry(phase=phase, message=message))
        await self.journal.flushed()  # the result reports what is on disk
        self._emit(RolloutFinished(phase, message))
        return RolloutResult(self.rollout_id, phase, message, dict(self.records), stopped_as_asked)

    # -- gates --------------------------------------------------------------------------
    def _on_gate_event(self, event: GateEvent) -> None:
        data = gate_event_json(event) | {"batch": self._gate_batch}
        self.journal.write(GateEntry.model_validate(data))
        self._emit(event)

    async def _recheck(self, prober: Probe) -> list[str]:
        """Updated nodes that fail a round of health checks now (a bake fails on them)."""
        updated = [r.node for r in self.records.values() if r.phase is NodePhase.COMMITTED]

        async def bad(node: Node) -> bool:
            results = await prober.check_all(self.policy.health.checks, node, self.image.digest)
            for r in results:
                self._emit(HealthChecked(node.id, r.kind, r.ok))
            return not all(r.ok for r in results)

        verdicts = await asyncio.gather(*(bad(n) for n in updated))
        return [n.id for n, b in zip(updated, verdicts, strict=True) if b]

    async def _before_gates(self, batch: Batch, env: GateEnv) -> GateOutcome | None:
        """Wait for the conditions of `batch` (windows, alerts); None when aborted."""
        gates = before_batch(self.policy.gates, batch)
        if not gates:
            return GateOutcome("passed", "no conditions")
        self._gate_batch = batch.index
        names = ", ".join(g.name for g in gates)
        self._phase(RolloutPhase.WAITING, f"before batch {batch.index}: {names}")
        outcome = await self.control.unless_aborted(wait_before_batch(gates, env))
        if outcome is not None and outcome.passed:
            self._resume_phase()
        return outcome

    async def _after_gates(self, batch: Batch, env: GateEnv) -> GateOutcome | None:
        """Run the gates after `batch`, in policy order; the first that does not pass
        ends it. An inconclusive analysis pauses for a human. None when aborted."""
        for gate in gates_after(self.policy.gates, batch):
            if (gate.name, batch.index) in self.passed_gates:
                continue  # passed before a crash
            self._gate_batch = batch.index
            self._phase(RolloutPhase.WAITING, f"gate {gate.name} after batch {batch.index}")
            outcome = await self.control.unless_aborted(run_gate(gate, env))
            if outcome is not None and outcome.result == "inconclusive":
                self._phase(RolloutPhase.PAUSED, f"gate {gate.name}: {outcome.message}")
                outcome = await self.control.unless_aborted(resolve_inconclusive(gate, env))
            if outcome is None or not outcome.passed:
                return outcome
            self.passed_gates.add((gate.name, batch.index))
            self._resume_phase()
        return GateOutcome("passed", "gates passed")

    async def _gate_failed(
        self, batch: Batch, records: list[NodeRecord], outcome: GateOutcome
    ) -> RolloutResult:
        """A gate failed or timed out: the failure action follows (continue halts)."""
        why = f"gate {outcome.gate} ({outcome.kind}) {outcome.result}: {outcome.message}"
        return await self._end(ending(after_gate(self.policy.failure.action)), records, why)

    async def _end(self, end: Ending, batch: list[NodeRecord], why: str) -> RolloutResult:
        """Carry out a decided ending: return its nodes to their previous image, finish."""
        if end.rollback != "none":
            self._phase(RolloutPhase.ROLLING_BACK, why)
            await self.steps.rollback_many(
                batch if end.rollback == "batch" else list(self.records.values()),
                len(self.records),
            )
        return await self._finish(end.phase, f"{why}; {end.suffix}")

    # -- the rollout --------------------------------------------------------------------
    async def run(self, batches: Sequence[Batch], stop_after: int | None = None) -> RolloutResult:
        """Run (or continue) the rollout: nodes already settled are left as they are, so
        the same call resumes a journaled rollout after a crash, a halt or an abort.

        `stop_after`: stop (phase paused, exit 0) once that batch and its gates passed."""
        fleet = [n for b in batches for n in b.nodes]
        for b in batches:
            for n in b.nodes:
                self.records.setdefault(n.id, NodeRecord(n, b.index))
        resumed = {i: r.phase for i, r in self.records.items() if r.phase is not NodePhase.PENDING}
        self._emit(
            RolloutStarted(
                self.rollout_id, self.image, self.policy_name, tuple(batches), len(fleet), resumed
            )
        )
        if not self.control.paused:
            self._phase(RolloutPhase.RUNNING)
        tolerated = limits(self.policy, len(fleet)).max_failed
        async with probe_session() as session:
            prober = self.prober_for(session)
            env = GateEnv(
                self.rollout_id,
                session,
                recheck=lambda: self._recheck(prober),
                on_event=self._on_gate_event,
                health_interval=self.policy.health.interval,
                boxes=self.boxes,
                wall_clock=self.wall_clock,
            )
            for batch in batches:
                records = [self.records[n.id] for n in batch.nodes]
                if any(not r.settled for r in records):
                    if not await self.control.checkpoint():
                        break
                    ready = await self._before_gates(batch, env)
                    if ready is None:
                        break  # aborted while waiting
                    if not ready.passed:
                        return await self._gate_failed(batch, [], ready)
                    self.journal.write(BatchStartedEntry(batch=batch.index))
                    self._emit(BatchStarted(batch, len(batches)))
                    mode = self.policy.prestage.mode
                    if mode != "none":
                        later = [b for b in batches if b.index > batch.index]
                        self.prestage.start(later[:1] if mode == "next-batch" else later)
                    async with asyncio.TaskGroup() as tg:
                        for rec in records:
                            if not rec.settled:
                                tg.create_task(self._update(rec, prober))
                done = [b for b in batches if b.index <= batch.index]
                failed_total = sum(self.records[n.id].failed for b in done for n in b.nodes)
                failed = [r for r in records if r.failed]
                decision = after_batch(failed_total, tolerated, self.policy.failure.action)
                if failed or any(r.phase is not NodePhase.PENDING for r in records):
                    self.journal.write(
                        BatchFinishedEntry(
                            batch=batch.index, failed=len(failed), decision=str(decision)
                        )
                    )
                    self._emit(BatchFinished(batch, len(failed), str(decision)))
                if decision is Decision.CONTINUE:
                    outcome = await self._after_gates(batch, env)
                    if outcome is None:
                        break  # aborted while waiting
                    if not outcome.passed:
                        return await self._gate_failed(batch, records, outcome)
                    more = batch.index < len(batches)
                    if stop_after is not None and batch.index >= stop_after and more:
                        return await self._finish(
                            RolloutPhase.PAUSED,
                            f"stopped after batch {batch.index} as asked; run again to go on",
                            stopped_as_asked=failed_total == 0,
                        )
                    continue
                names = ", ".join(r.node.id for r in failed) or "none in this batch"
                why = (
                    f"batch {batch.index}: {len(failed)} node(s) failed ({names}); "
                    f"{failed_total} failed in all, {tolerated} tolerated"
                )
                return await self._end(ending(decision), records, why)
        phase, message = final(
            all_settled=all(r.settled for r in self.records.values()),
            failed=sum(r.failed for r in self.records.values()),
            fleet=len(fleet),
            version=self.image.version,
        )
        return await self._finish(phase, message)

    async def rollback_all(self) -> RolloutResult:
        """Return every node this rollout updated to its previous image (operator command)."""
        self._phase(RolloutPhase.ROLLING_BACK, "requested by the operator")
        await self.steps.rollback_many(list(self.records.values()), len(self.records))
        bad = [r.node.id for r in self.records.values() if r.phase is NodePhase.ROLLBACK_FAILED]
        if bad:
            return await self._finish(RolloutPhase.FAILED, f"rollback failed on {', '.join(bad)}")
        return await self._finish(RolloutPhase.ROLLED_BACK, "rolled back by the operator")

    @staticmethod
    def retry_failed(records: dict[str, NodeRecord]) -> list[str]:
        """Make failed and rolled-back nodes pending again (the retry command); return
        their ids. A node whose rollback failed (it was unreachable: partitioned, frozen)
        is tried again too: the update starts by asking the node where it is, so one
        that fell back, or came back on the target uncommitted, is handled as it is."""
        again = []
        for rec in records.values():
            if rec.phase in (NodePhase.ROLLED_BACK, NodePhase.FAILED, NodePhase.ROLLBACK_FAILED):
                rec.phase, rec.failed, rec.reason, rec.detail = NodePhase.PENDING, False, None, ""
                rec.activated = False
                again.append(rec.node.id)
        return again

    async def _update(self, rec: NodeRecord, prober: Probe) -> None:
        await self.prestage.settle(rec.node.id)
        await self.steps.update(rec, prober)
