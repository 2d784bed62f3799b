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
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import aiohttp

from rollout import clock
from rollout.decide import Decision, after_batch
from rollout.drivers.base import Driver, Refused, TransportError
from rollout.events import (
    BatchFinished,
    BatchStarted,
    BytesSent,
    Event,
    HealthChecked,
    NodeChanged,
    Observer,
    RolloutFinished,
    RolloutStarted,
    StepDone,
)
from rollout.health import CheckResult, Prober, Verdict, watch
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
from rollout.policy import Policy

T = TypeVar("T")

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
    """What the engine knows about one node during this rollout."""

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


@dataclass
class RolloutResult:
    rollout_id: str
    phase: RolloutPhase
    message: str
    nodes: dict[str, NodeRecord] = field(default_factory=dict)

    @property
    def succeeded(self) -> bool:
        return self.phase is RolloutPhase.SUCCEEDED

    @property
    def exit_code(self) -> int:
        return 0 if self.succeeded else 1


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
    ) -> None:
        self.driver = driver
        self.policy = policy
        self.image = image
        self.observer = observer
        self.policy_name = policy_name
        self.rollout_id = rollout_id or uuid.uuid4().hex[:12]
        self.reach_timeout = reach_timeout
        self.records: dict[str, NodeRecord] = {}
        self._stop = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None

    # -- control ------------------------------------------------------------------------
    def request_stop(self) -> None:
        """Start nothing new; let in-flight nodes settle (first Ctrl-C)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

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
        self._emit(NodeChanged(rec.node.id, rec.batch, phase, reason, detail))

    # -- the rollout --------------------------------------------------------------------
    async def run(self, batches: Sequence[Batch]) -> RolloutResult:
        fleet = [n for b in batches for n in b.nodes]
        for b in batches:
            for n in b.nodes:
                self.records[n.id] = NodeRecord(n, b.index)
        self._emit(
            RolloutStarted(
                self.rollout_id, self.image, self.policy_name, tuple(batches), len(fleet)
            )
        )
        tolerated = self.policy.failure.max_failed.resolve(len(fleet), round_up=False)
        phase, message = RolloutPhase.SUCCEEDED, ""
        failed_total = 0
        async with aiohttp.ClientSession() as session:
            self._session = session
            prober = Prober(self.driver, session)
            for batch in batches:
                if self.stopping:
                    break
                self._emit(BatchStarted(batch, len(batches)))
                async with asyncio.TaskGroup() as tg:
                    for node in batch.nodes:
                        tg.create_task(self._update(self.records[node.id], prober))
                failed = [self.records[n.id] for n in batch.nodes if self.records[n.id].failed]
                failed_total += len(failed)
                decision = after_batch(failed_total, tolerated, self.policy.failure.action)
                self._emit(BatchFinished(batch, len(failed), str(decision)))
                if decision is Decision.CONTINUE:
                    continue
                names = ", ".join(r.node.id for r in failed)
                why = (
                    f"batch {batch.index}: {len(failed)} node(s) failed ({names}); "
                    f"{failed_total} failed in all, {tolerated} tolerated"
                )
                if decision is Decision.HALT:
                    phase, message = RolloutPhase.HALTED, f"{why}; halted"
                elif decision is Decision.ROLLBACK_BATCH:
                    await self._rollback_many(
                        [self.records[n.id] for n in batch.nodes], "the failed batch"
                    )
                    phase, message = RolloutPhase.ROLLED_BACK, f"{why}; batch rolled back"
                else:
                    await self._rollback_many(list(self.records.values()), "every updated node")
                    phase, message = RolloutPhase.ROLLED_BACK, f"{why}; all rolled back"
                break
        self._session = None
        if phase is RolloutPhase.SUCCEEDED:
            if self.stopping and not all(r.phase.done for r in self.records.values()):
                phase, message = RolloutPhase.ABORTED, "stopped by the operator"
            elif failed_total:
                phase = RolloutPhase.FAILED
                message = f"{failed_total} node(s) failed; the rest were updated"
            else:
                message = f"{len(fleet)} node(s) on {self.image.version}"
        self._emit(RolloutFinished(phase, message))
        return RolloutResult(self.rollout_id, phase, message, dict(self.records))

    # -- one node -----------------------------------------------------------------------
    async def _update(self, rec: NodeRecord, prober: Prober) -> None:
        try:
            await self._update_steps(rec, prober)
        except NodeFailed as exc:
            rec.failed = True
            self._set(rec, NodePhase.FAILED, exc.reason, exc.detail)
            if rec.activated:
                await self._rollback_node(rec)

    async def _update_steps(self, rec: NodeRecord, prober: Prober) -> None:
        node, target = rec.node, self.image.digest
        st = await self._reach(node, self.reach_timeout)
        rec.boot_count_start = rec.boot_count = st.boot_count
        rec.version = st.booted_version
        if st.done(target):
            self._set(rec, NodePhase.SKIPPED, detail="already on the target, committed")
            return
        if not st.committed and st.runs(target):
            # Activated earlier (e.g. by a crashed run) and not yet committed: verify it.
            rec.activated = True
        elif not st.committed:
            raise NodeFailed(
                Reason.ACTIVATE_FAILED,
                f"node is trying image {st.booted_version} uncommitted; wait until it "
                "commits or falls back, then run again",
            )
        else:
            rec.previous_digest, rec.previous_version = st.booted_digest, st.booted_version
            if self.stopping:
                return
            await self._stage(rec)
            if self.stopping:
                return
            st = await self._activate(rec, st)
        await self._verify(rec, prober)
        await self._commit(rec)

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

    async def _timed(self, rec: NodeRecord, step: Step, work: Callable[[], Awaitable[T]]) -> T:
        start = clock.now()
        ok = False
        try:
            result = await work()
            ok = True
            return result
        finally:
            self._emit(StepDone(rec.node.id, step, clock.now() - start, ok))

    async def _stage(self, rec: NodeRecord) -> None:
        self._set(rec, NodePhase.STAGING)

        def sent(n: int) -> None:
            self._emit(BytesSent(rec.node.id, n))

        try:
            written = await self._timed(
                rec, Step.STAGE, lambda: self.driver.stage(rec.node, self.image, sent)
            )
        except Refused as exc:
            mismatch = exc.code == "digest_mismatch"
            reason = Reason.DIGEST_MISMATCH if mismatch else Reason.STAGE_FAILED
            raise NodeFailed(reason, f"agent refused the image: {exc}") from exc
        except TransportError as exc:
            raise NodeFailed(Reason.STAGE_FAILED, f"could not stream the image: {exc}") from exc
        self._set(rec, NodePhase.STAGED, detail="" if written else "already staged")

    async def _activate(self, rec: NodeRecord, before: NodeStatus) -> NodeStatus:
        node, mode = rec.node, self.policy.activation
        self._set(rec, NodePhase.ACTIVATING)
        try:
            await self._timed(rec, Step.ACTIVATE, lambda: self.driver.activate(node, mode))
        except Refused as exc:
            raise NodeFailed(Reason.ACTIVATE_FAILED, f"agent refused to activate: {exc}") from exc
        except TransportError:
            pass  # the request may have arrived: boot_count below tells
        rec.activated = True
        self._set(rec, NodePhase.BOOTING)
        timeout = self.policy.health.boot_timeout
        st = await self._timed(
            rec, Step.BOOT, lambda: self._wait_boot(node, before.boot_count, timeout)
        )
        rec.boot_count, rec.version = st.boot_count, st.booted_version
        if not st.runs(self.image.digest):
            raise NodeFailed(
                Reason.FELL_BACK,
                f"node booted {st.booted_version} instead of the target (it fell back)",
            )
        return st

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

    async def _verify(self, rec: NodeRecord, prober: Prober) -> None:
        self._set(rec, NodePhase.VERIFYING)

        def seen(r: CheckResult) -> None:
            self._emit(HealthChecked(rec.node.id, r.kind, r.ok))

        verdict, detail = await self._timed(
            rec,
            Step.VERIFY,
            lambda: watch(prober, self.policy.health, rec.node, self.image.digest, seen),
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
            st = await self._timed(rec, Step.COMMIT, lambda: self.driver.commit(rec.node))
        except (Refused, TransportError) as exc:
            raise NodeFailed(Reason.COMMIT_FAILED, f"commit failed: {exc}") from exc
        if not st.done(self.image.digest):
            raise NodeFailed(
                Reason.COMMIT_FAILED, f"after commit the node runs {st.booted_version}"
            )
        rec.boot_count, rec.version = st.boot_count, st.booted_version
        self._set(rec, NodePhase.COMMITTED)

    # -- rollback -----------------------------------------------------------------------
    async def _rollback_many(self, records: Sequence[NodeRecord], what: str) -> None:
        """Return committed nodes of this rollout to their previous image, max_unavailable
        at a time (a rollback takes nodes out of service too)."""
        todo = [r for r in records if r.phase is NodePhase.COMMITTED and r.previous_digest]
        if not todo:
            return
        fleet = len(self.records)
        limit = max(1, self.policy.batches.max_unavailable.resolve(fleet, round_up=False))
        gate = asyncio.Semaphore(limit)

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
        if st.booted_digest == rec.previous_digest and st.committed:
            return True  # the agent already fell back on its own
        try:
            await self.driver.rollback(node, self.policy.activation)
        except Refused as exc:
            raise NodeFailed(Reason.ACTIVATE_FAILED, f"agent refused: {exc}") from exc
        except TransportError:
            pass  # may have arrived; the boot count tells
        st = await self._wait_boot(node, st.boot_count, self.policy.health.boot_timeout)
        rec.boot_count, rec.version = st.boot_count, st.booted_version
        return st.booted_digest == rec.previous_digest and st.committed
