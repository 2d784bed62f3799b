"""The engine: executes a plan of batches through a Driver, as the policy says.

Per batch, every node runs in parallel (asyncio.TaskGroup) through::

    status -> stage -> activate -> boot (back on the target) -> verify -> commit

A node already on the target image and committed is skipped, so a re-run is safe. Any
node that fails after its activation was sent is returned to its previous image before
its task ends: it is never left half-activated without the output saying so
(`rollback_failed` names it; its agent still falls back on its own at its deadline).

After each batch the pure `decide.after_batch` says continue, halt, roll back the batch
or roll back everything, and the engine carries that out. The engine itself never
prints: it reports every step as an event (rollout.events) to one observer, which fans
out to progress display, logs and metrics.

Stopping (Ctrl-C): `request_stop()` makes the engine start nothing new (no new batch, no
new stage or activation); nodes already activated settle per policy (verify, then commit
or roll back), and the result names every node's phase.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp

from rollout import clock
from rollout.decide import Decision, Ending, after_batch, after_gate, ending, final
from rollout.drivers.base import Driver, Refused, TransportError
from rollout.events import (
    BatchFinished,
    BatchStarted,
    BytesFetched,
    BytesSent,
    Event,
    HealthChecked,
    NodeChanged,
    Observer,
    RolloutFinished,
    RolloutPhaseChanged,
    RolloutStarted,
    StepDone,
)
from rollout.gates.events import GateEvent, gate_event_json
from rollout.gates.runner import (
    GateEnv,
    GateOutcome,
    resolve_inconclusive,
    run_gate,
    wait_before_batch,
)
from rollout.gates.schedule import after_batch as gates_after
from rollout.gates.schedule import before_batch
from rollout.gates.signals import GateBoxes
from rollout.health import CheckResult, Probe, Prober, Verdict, watch
from rollout.model import (
    Batch,
    Image,
    Node,
    NodePhase,
    NodeStatus,
    Reason,
    RolloutPhase,
    Step,
)
from rollout.plan import limits
from rollout.policy import Policy

T = TypeVar("T")

# Final phases after which images staged ahead will not be activated by this rollout.
_ABANDONING = frozenset(
    {RolloutPhase.HALTED, RolloutPhase.ROLLED_BACK, RolloutPhase.ABORTED, RolloutPhase.FAILED}
)

# How often to look at a node that is rebooting; short, it is only a status request.
POLL_INTERVAL = 0.2
# How long a node may be unreachable when the engine first looks at it.
REACH_TIMEOUT = 15.0


class NodeFailed(Exception):
    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass
class NodeRecord:
    """What the engine knows about one node during this rollout (journaled on change)."""

    node: Node
    batch: int
    phase: NodePhase = NodePhase.PENDING
    reason: Reason | None = None
    detail: str = ""
    failed: bool = False
    activated: bool = False
    previous_digest: str | None = None
    previous_version: str | None = None
    boot_count_start: int | None = None
    boot_count: int | None = None
    version: str | None = None

    @property
    def settled(self) -> bool:
        """Nothing more to do for this node in this run."""
        if self.phase in (NodePhase.COMMITTED, NodePhase.SKIPPED, NodePhase.ROLLED_BACK):
            return True
        if self.phase is NodePhase.ROLLBACK_FAILED:
            return True
        return self.phase is NodePhase.FAILED and not self.activated

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.node.id,
            "batch": self.batch,
            "phase": str(self.phase),
            "reason": str(self.reason) if self.reason else None,
            "detail": self.detail,
            "failed": self.failed,
            "activated": self.activated,
            "previous_digest": self.previous_digest,
            "previous_version": self.previous_version,
            "boot_count_start": self.boot_count_start,
            "boot_count": self.boot_count,
            "version": self.version,
        }

    @classmethod
    def from_json(cls, node: Node, data: dict[str, Any]) -> NodeRecord:
        return cls(
            node=node,
            batch=int(data.get("batch", 0)),
            phase=NodePhase(data.get("phase", "pending")),
            reason=Reason(data["reason"]) if data.get("reason") else None,
            detail=str(data.get("detail", "")),
            failed=bool(data.get("failed", False)),
            activated=bool(data.get("activated", False)),
            previous_digest=data.get("previous_digest"),
            previous_version=data.get("previous_version"),
            boot_count_start=data.get("boot_count_start"),
            boot_count=data.get("boot_count"),
            version=data.get("version"),
        )


@dataclass
class RolloutResult:
    rollout_id: str
    phase: RolloutPhase
    message: str
    nodes: dict[str, NodeRecord] = field(default_factory=dict)
    stopped_as_asked: bool = False  # --stop-after: the batches asked for passed

    @property
    def succeeded(self) -> bool:
        return self.phase is RolloutPhase.SUCCEEDED

    @property
    def exit_code(self) -> int:
        return 0 if self.succeeded or self.stopped_as_asked else 1


class Control:
    """Operator commands an engine obeys at its checkpoints (before a batch, a stage or an
    activation): pause waits there, abort starts nothing new. In-flight nodes settle."""

    def __init__(self) -> None:
        self._running = asyncio.Event()
        self._running.set()
        self._aborted = asyncio.Event()
        self.aborted = False

    @property
    def paused(self) -> bool:
        return not self._running.is_set()

    def pause(self) -> None:
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    def abort(self) -> None:
        self.aborted = True
        self._aborted.set()
        self._running.set()

    async def unless_aborted(self, work: Awaitable[T]) -> T | None:
        """Await `work` (a gate wait), or give up with None when the rollout is aborted."""
        job = asyncio.ensure_future(work)
        stop = asyncio.ensure_future(self._aborted.wait())
        try:
            await asyncio.wait({job, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not job.done():
                job.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await job
        return job.result() if job.done() and not job.cancelled() else None

    async def checkpoint(self) -> bool:
        """Wait while paused; False when the rollout is being aborted."""
        await self._running.wait()
        return not self.aborted


Journal = Callable[[str, dict[str, Any]], object]


def _no_journal(kind: str, data: dict[str, Any]) -> None:
    return None


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
        journal: Journal = _no_journal,
        records: dict[str, NodeRecord] | None = None,
        control: Control | None = None,
        boxes: GateBoxes | None = None,
        passed_gates: set[tuple[str, int]] | None = None,
        prober_for: Callable[[aiohttp.ClientSession], Probe] | None = None,
    ) -> None:
        self.driver = driver
        self.policy = policy
        self.image = image
        self.observer = observer
        self.policy_name = policy_name
        self.rollout_id = rollout_id or uuid.uuid4().hex[:12]
        self.reach_timeout = reach_timeout
        self.journal = journal
        self.records: dict[str, NodeRecord] = dict(records or {})
        self.control = control or Control()
        self.boxes = boxes or GateBoxes()  # shared with the API that receives signals
        self.passed_gates = set(passed_gates or ())  # (gate, batch) passed before a resume
        self._gate_batch = 0
        self.prober_for = prober_for or (lambda session: Prober(self.driver, session))
        self._prestaging: dict[str, asyncio.Task[None]] = {}
        self._prestage_slots = asyncio.Semaphore(policy.prestage.max_concurrent)

    # -- control ------------------------------------------------------------------------
    def request_stop(self) -> None:
        """Start nothing new; let in-flight nodes settle (first Ctrl-C)."""
        self.control.abort()

    @property
    def stopping(self) -> bool:
        return self.control.aborted

    def _emit(self, event: Event) -> None:
        self.observer(event)

    def _set(
        self, rec: NodeRecord, phase: NodePhase, reason: Reason | None = None, detail: str = ""
    ) -> None:
        rec.phase = phase
        if reason is not None:
            rec.reason = reason
        if detail:
            rec.detail = detail
        elif not rec.failed:
            rec.detail = ""
        self.journal("node", rec.to_json())  # durable before anything acts on it
        self._emit(NodeChanged(rec.node.id, rec.batch, phase, reason, detail))

    def _resume_phase(self) -> None:
        """Back to running after a gate, unless an operator paused the rollout meanwhile."""
        self._phase(RolloutPhase.PAUSED if self.control.paused else RolloutPhase.RUNNING)

    def _phase(self, phase: RolloutPhase, message: str = "") -> None:
        if phase is RolloutPhase.ROLLING_BACK:
            self._stop_prestage()  # nothing more is activated: stop fetching for it
        self.journal("phase", {"phase": str(phase), "message": message})
        self._emit(RolloutPhaseChanged(self.rollout_id, phase, message))

    async def _finish(
        self, phase: RolloutPhase, message: str, stopped_as_asked: bool = False
    ) -> RolloutResult:
        self._stop_prestage()
        if phase in _ABANDONING:
            await self._discard_prestaged()
        self.journal("phase", {"phase": str(phase), "message": message})
        self._emit(RolloutFinished(phase, message))
        return RolloutResult(self.rollout_id, phase, message, dict(self.records), stopped_as_asked)

    # -- gates --------------------------------------------------------------------------
    def _on_gate_event(self, event: GateEvent) -> None:
        self.journal("gate", gate_event_json(event) | {"batch": self._gate_batch})
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
            await self._rollback_many(
                batch if end.rollback == "batch" else list(self.records.values())
            )
        return await self._finish(end.phase, f"{why}; {end.suffix}")

    # -- pre-staging ----------------------------------------------------------------------
    def _prestage(self, batches: Sequence[Batch]) -> None:
        """Start staging the nodes of `batches` in the background (policy `prestage`),
        at most `max_concurrent` at a time across the fleet, earlier batches first."""
        for batch in batches:
            for node in batch.nodes:
                rec = self.records[node.id]
                if rec.phase is NodePhase.PENDING and node.id not in self._prestaging:
                    task = asyncio.create_task(self._prestage_node(rec), name=f"prestage-{node.id}")
                    self._prestaging[node.id] = task

    async def _prestage_node(self, rec: NodeRecord) -> None:
        async with self._prestage_slots:
            if self.control.aborted or rec.phase is not NodePhase.PENDING:
                return
            try:
                st = await self.driver.status(rec.node)
                if not st.committed or st.runs(self.image.digest) or st.busy is not None:
                    return  # its own update will look at it
                if st.staged_digest != self.image.digest:
                    self._set(rec, NodePhase.STAGING, detail="pre-staging")
                    await self.driver.stage(rec.node, self.image, self._progress(rec))
                self._set(rec, NodePhase.STAGED, detail="pre-staged")
            except (TransportError, Refused, OSError, ValueError, aiohttp.ClientError) as exc:
                # Not a failure of the node: its batch stages it again, and decides then.
                self._set(rec, NodePhase.PENDING, detail=f"pre-staging failed: {exc}"[:300])
            except asyncio.CancelledError:
                phase: NodePhase = rec.phase  # set by _set above, which mypy does not see
                if phase is NodePhase.STAGING:  # the rollout stopped meanwhile
                    self._set(rec, NodePhase.PENDING, detail="pre-staging stopped")
                raise

    def _stop_prestage(self) -> None:
        for task in self._prestaging.values():
            task.cancel()

    async def _discard_prestaged(self) -> None:
        """The rollout ends without activating nodes it staged ahead: drop those images."""
        tasks = list(self._prestaging.values())
        await asyncio.gather(*tasks, return_exceptions=True)
        left = [
            r
            for r in self.records.values()
            if r.phase in (NodePhase.STAGING, NodePhase.STAGED) and not r.activated
        ]

        async def one(rec: NodeRecord) -> None:
            try:
                await self.driver.discard(rec.node, self.image.digest)
            except (TransportError, Refused, OSError, aiohttp.ClientError) as exc:
                self._set(rec, NodePhase.PENDING, detail=f"staged image not discarded: {exc}")
                return
            self._set(rec, NodePhase.PENDING, detail="staged image discarded")

        await asyncio.gather(*(one(r) for r in left))

    def _progress(self, rec: NodeRecord) -> Callable[[int], None]:
        if self.image.pulled:
            return lambda n: self._emit(BytesFetched(rec.node.id, n))
        return lambda n: self._emit(BytesSent(rec.node.id, n))

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
        async with aiohttp.ClientSession() as session:
            prober = self.prober_for(session)
            env = GateEnv(
                self.rollout_id,
                session,
                recheck=lambda: self._recheck(prober),
                on_event=self._on_gate_event,
                health_interval=self.policy.health.interval,
                boxes=self.boxes,
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
                    self.journal("batch_started", {"batch": batch.index})
                    self._emit(BatchStarted(batch, len(batches)))
                    mode = self.policy.prestage.mode
                    if mode != "none":
                        later = [b for b in batches if b.index > batch.index]
                        self._prestage(later[:1] if mode == "next-batch" else later)
                    async with asyncio.TaskGroup() as tg:
                        for rec in records:
                            if not rec.settled:
                                tg.create_task(self._update(rec, prober))
                done = [b for b in batches if b.index <= batch.index]
                failed_total = sum(self.records[n.id].failed for b in done for n in b.nodes)
                failed = [r for r in records if r.failed]
                decision = after_batch(failed_total, tolerated, self.policy.failure.action)
                if failed or any(r.phase is not NodePhase.PENDING for r in records):
                    self.journal(
                        "batch_finished",
                        {"batch": batch.index, "failed": len(failed), "decision": str(decision)},
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
        await self._rollback_many(list(self.records.values()))
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

    # -- one node -----------------------------------------------------------------------
    async def _update(self, rec: NodeRecord, prober: Probe) -> None:
        try:
            await self._update_steps(rec, prober)
        except NodeFailed as exc:
            await self._failed(rec, exc.reason, exc.detail)
        except (OSError, ValueError, aiohttp.ClientError) as exc:
            # Unexpected for one node (a bad answer, a TLS error, ...): that node fails,
            # the rest of the batch goes on, and the journal says exactly what happened.
            await self._failed(rec, Reason.INTERNAL, f"{type(exc).__name__}: {exc}")

    async def _failed(self, rec: NodeRecord, reason: Reason, detail: str) -> None:
        rec.failed = True
        self._set(rec, NodePhase.FAILED, reason, detail)
        if rec.activated:
            await self._rollback_node(rec)

    async def _update_steps(self, rec: NodeRecord, prober: Probe) -> None:
        """Drive one node to committed, from wherever the journal says it is."""
        node, target = rec.node, self.image.digest
        if (ahead := self._prestaging.pop(node.id, None)) is not None:
            await asyncio.gather(ahead, return_exceptions=True)  # it catches its own errors
        if rec.phase is NodePhase.FAILED or rec.phase is NodePhase.ROLLING_BACK:
            await self._rollback_node(rec)  # a crash interrupted its rollback
            return
        st = await self._reach(node, self.reach_timeout)
        if rec.activated:
            # Resumed after activation: the boot count recorded before it tells the rest.
            await self._resume_activated(rec, st)
        elif st.done(target):
            rec.boot_count, rec.version = st.boot_count, st.booted_version
            self._set(rec, NodePhase.SKIPPED, detail="already on the target, committed")
            return
        elif not st.committed and st.runs(target) and st.busy is None:
            # This rollout activated it before and lost sight of it (a partition, a crash
            # of the controller between attempts): it runs the target on trial. Adopt it:
            # verify and commit, or roll back to the image it had before.
            if rec.previous_digest is None:
                if st.last_good_digest is None or st.last_good_digest == target:
                    raise NodeFailed(
                        Reason.ACTIVATE_FAILED,
                        f"node is trying image {st.booted_version} uncommitted and reports no "
                        "other good image; wait until it commits or falls back",
                    )
                rec.previous_digest = st.last_good_digest
                rec.previous_version = st.last_good_version
            rec.activated = True
            rec.boot_count_start = st.boot_count - 1
            rec.boot_count, rec.version = st.boot_count, st.booted_version
            self._set(rec, NodePhase.BOOTING, detail="adopted: on the target, uncommitted")
            await self._boot(rec, st.boot_count - 1)  # its workload past starting
        elif not st.committed:
            raise NodeFailed(
                Reason.ACTIVATE_FAILED,
                f"node is trying image {st.booted_version} uncommitted; wait until it "
                "commits or falls back, then run again",
            )
        else:
            rec.previous_digest, rec.previous_version = st.booted_digest, st.booted_version
            rec.boot_count_start = rec.boot_count = st.boot_count
            rec.version = st.booted_version
            if not await self.control.checkpoint():
                return
            if st.staged_digest == target and not st.busy:
                self._set(rec, NodePhase.STAGED, detail="pre-staged")
            else:
                await self._stage(rec)
            if not await self.control.checkpoint():
                return
            await self._activate(rec)
        await self._verify(rec, prober)
        await self._commit(rec)

    async def _resume_activated(self, rec: NodeRecord, st: NodeStatus) -> None:
        """The journal says activation was (or was about to be) sent: find out if it was."""
        start = rec.boot_count_start if rec.boot_count_start is not None else st.boot_count
        if st.boot_count == start and st.busy is None and not st.runs(self.image.digest):
            if st.staged_digest != self.image.digest:
                await self._stage(rec)
            await self._activate(rec)  # it never arrived: boot count unchanged, agent idle
            return
        self._set(rec, NodePhase.BOOTING, detail="resumed")
        await self._boot(rec, start)

    async def _reach(self, node: Node, timeout: float) -> NodeStatus:
        deadline = clock.now() + timeout
        while True:
            try:
                return await self.driver.status(node)
            except TransportError as exc:
                if clock.now() >= deadline:
                    raise NodeFailed(Reason.UNREACHABLE, f"agent unreachable: {exc}") from exc
            except Refused as exc:
                raise NodeFailed(Reason.UNREACHABLE, f"agent refused status: {exc}") from exc
            await clock.sleep(POLL_INTERVAL)

    async def _timed(
        self,
        rec: NodeRecord,
        step: Step,
        work: Callable[[], Awaitable[T]],
        good: Callable[[T], bool] = lambda _: True,
    ) -> T:
        """Run one step, reporting its duration and whether its result was good."""
        start = clock.now()
        ok = False
        try:
            result = await work()
            ok = good(result)
            return result
        finally:
            self._emit(StepDone(rec.node.id, step, clock.now() - start, ok))

    async def _stage(self, rec: NodeRecord) -> None:
        self._set(rec, NodePhase.STAGING)
        progress = self._progress(rec)
        try:
            written = await self._timed(
                rec, Step.STAGE, lambda: self.driver.stage(rec.node, self.image, progress)
            )
        except Refused as exc:
            mismatch = exc.code == "digest_mismatch"
            reason = Reason.DIGEST_MISMATCH if mismatch else Reason.STAGE_FAILED
            raise NodeFailed(reason, f"agent refused the image: {exc}") from exc
        except TransportError as exc:
            raise NodeFailed(Reason.STAGE_FAILED, f"could not stream the image: {exc}") from exc
        self._set(rec, NodePhase.STAGED, detail="" if written else "already staged")

    async def _activate(self, rec: NodeRecord) -> None:
        node, mode = rec.node, self.policy.activation
        start = rec.boot_count if rec.boot_count is not None else 0
        rec.boot_count_start = start
        rec.activated = True  # journaled with ACTIVATING, before the request leaves
        self._set(rec, NodePhase.ACTIVATING)
        try:
            await self._timed(rec, Step.ACTIVATE, lambda: self.driver.activate(node, mode))
        except Refused as exc:
            rec.activated = False
            raise NodeFailed(Reason.ACTIVATE_FAILED, f"agent refused to activate: {exc}") from exc
        except TransportError:
            pass  # the request may have arrived: the boot count tells
        self._set(rec, NodePhase.BOOTING)
        await self._boot(rec, start)

    async def _boot(self, rec: NodeRecord, start: int) -> None:
        """The BOOT step: wait until the node booted past `start`; it must run the target."""
        timeout = self.policy.health.boot_timeout
        st = await self._timed(
            rec,
            Step.BOOT,
            lambda: self._wait_boot(rec.node, start, timeout),
            lambda s: s.runs(self.image.digest),
        )
        rec.boot_count, rec.version = st.boot_count, st.booted_version
        if not st.runs(self.image.digest):
            raise NodeFailed(
                Reason.FELL_BACK,
                f"node booted {st.booted_version} instead of the target (it fell back)",
            )

    async def _wait_boot(self, node: Node, boot_count: int, timeout: float) -> NodeStatus:
        """Poll until the node has booted once more than `boot_count` and its workload is
        past starting (so health checks judge a started workload, not a starting one)."""
        deadline = clock.now() + timeout
        last = "no answer"
        while clock.now() < deadline:
            try:
                st = await self.driver.status(node)
                if st.boot_count > boot_count and st.workload != "starting":
                    return st
                last = f"boot {st.boot_count}, workload {st.workload}"
            except TransportError as exc:
                last = str(exc)
            except Refused as exc:
                last = str(exc)
            await clock.sleep(POLL_INTERVAL)
        raise NodeFailed(Reason.BOOT_TIMEOUT, f"not back within {timeout:g}s ({last})")

    async def _verify(self, rec: NodeRecord, prober: Probe) -> None:
        self._set(rec, NodePhase.VERIFYING)

        def seen(r: CheckResult) -> None:
            self._emit(HealthChecked(rec.node.id, r.kind, r.ok))

        verdict, detail = await self._timed(
            rec,
            Step.VERIFY,
            lambda: watch(prober, self.policy.health, rec.node, self.image.digest, seen),
            lambda r: r[0] is Verdict.HEALTHY,
        )
        if verdict is Verdict.UNHEALTHY:
            raise NodeFailed(Reason.UNHEALTHY, f"health checks kept failing ({detail})")
        if verdict is Verdict.DEADLINE:
            raise NodeFailed(
                Reason.HEALTH_DEADLINE,
                f"not healthy for {self.policy.health.min_healthy_time:g}s within "
                f"{self.policy.health.deadline:g}s ({detail})",
            )
        self._set(rec, NodePhase.HEALTHY)

    async def _commit(self, rec: NodeRecord) -> None:
        try:
            st = await self._timed(
                rec,
                Step.COMMIT,
                lambda: self.driver.commit(rec.node),
                lambda s: s.done(self.image.digest),
            )
        except (Refused, TransportError) as exc:
            raise NodeFailed(Reason.COMMIT_FAILED, f"commit failed: {exc}") from exc
        if not st.done(self.image.digest):
            raise NodeFailed(
                Reason.COMMIT_FAILED, f"after commit the node runs {st.booted_version}"
            )
        rec.boot_count, rec.version = st.boot_count, st.booted_version
        self._set(rec, NodePhase.COMMITTED)

    # -- rollback -----------------------------------------------------------------------
    async def _rollback_many(self, records: Sequence[NodeRecord]) -> None:
        """Return nodes this rollout updated to their previous image, max_unavailable at a
        time (a rollback takes nodes out of service too)."""
        todo = [
            r
            for r in records
            if r.previous_digest
            and (
                r.phase in (NodePhase.COMMITTED, NodePhase.ROLLING_BACK)
                or (r.phase is NodePhase.FAILED and r.activated)
            )
        ]
        if not todo:
            return
        gate = asyncio.Semaphore(limits(self.policy, len(self.records)).max_unavailable)

        async def one(rec: NodeRecord) -> None:
            async with gate:
                await self._rollback_node(rec)

        async with asyncio.TaskGroup() as tg:
            for rec in todo:
                tg.create_task(one(rec))

    async def _rollback_node(self, rec: NodeRecord) -> None:
        node = rec.node
        self._set(rec, NodePhase.ROLLING_BACK)
        start = clock.now()
        ok = False
        try:
            ok = await self._rollback_steps(rec)
        except NodeFailed as exc:
            rec.detail = f"{rec.detail}; rollback: {exc.detail}"
        finally:
            self._emit(StepDone(node.id, Step.ROLLBACK, clock.now() - start, ok))
        if ok:
            back = f"back on {rec.previous_version}"
            detail = f"{rec.detail}; {back}" if rec.detail else back
            self._set(rec, NodePhase.ROLLED_BACK, detail=detail)
        else:
            self._set(
                rec,
                NodePhase.ROLLBACK_FAILED,
                detail=f"{rec.detail}; its agent falls back on its own at its commit deadline",
            )

    async def _rollback_steps(self, rec: NodeRecord) -> bool:
        node = rec.node
        st = await self._reach(node, self.policy.health.boot_timeout)
        timeout = self.policy.health.boot_timeout
        if st.busy is not None:  # a boot is under way (perhaps our rollback before a crash)
            st = await self._wait_boot(node, st.boot_count, timeout)
        if st.booted_digest == rec.previous_digest and st.committed:
            rec.boot_count, rec.version = st.boot_count, st.booted_version
            return True  # already back (the agent fell back, or an earlier request did it)
        try:
            await self.driver.rollback(node, self.policy.activation)
        except Refused as exc:
            raise NodeFailed(Reason.ACTIVATE_FAILED, f"agent refused: {exc}") from exc
        except TransportError:
            pass  # may have arrived; the boot count tells
        st = await self._wait_boot(node, st.boot_count, timeout)
        rec.boot_count, rec.version = st.boot_count, st.booted_version
        return st.booted_digest == rec.previous_digest and st.committed
