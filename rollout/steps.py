"""One node's way through a rollout, and back: `NodeSteps`.

    status -> stage -> activate -> boot (back on the target) -> verify -> commit

`update` drives one node to committed from wherever its record says it is, so the same
call resumes after a crash: a node whose activation was journaled is asked for its boot
count before anything is sent again, and one found on the target uncommitted is adopted.
Any node that fails after its activation was sent is returned to its previous image
before `update` returns: it is never left half-activated without its record (and so the
journal and the output) saying so; `rollback_failed` names it, and its agent still falls
back on its own at its deadline.

Every phase change goes through `set`, which journals the record and reports a NodeChanged
event; before a request that changes the node (stage, activate, rollback) it waits until
the entry is on disk (group commit, rollout.journal). The steps never print; they emit
events.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import aiohttp

from rollout import clock
from rollout.control import Control
from rollout.drivers.base import Driver, Refused, TransportError
from rollout.events import BytesFetched, BytesSent, Event, HealthChecked, NodeChanged, StepDone
from rollout.health import CheckResult, Probe, Verdict, watch
from rollout.model import Image, Node, NodePhase, NodeStatus, Reason, Step
from rollout.plan import limits
from rollout.policy import Policy
from rollout.record import Journal, NodeFailed, NodeRecord

T = TypeVar("T")

# How often to look at a node that is rebooting: every 0.2 s at first (a kexec is back in
# a second), then a twentieth of the time waited so far, at most every 2 s (`poll_delay`).
POLL_INTERVAL = 0.2
BOOT_POLL_SHARE = 0.05
BOOT_POLL_MAX = 2.0
# The longest status long poll (the agent allows 60 s): a lost answer costs at most this.
WATCH_MAX = 30.0
# How long a node may be unreachable when the engine first looks at it.
REACH_TIMEOUT = 15.0
# Phases that announce a request that changes the node (stage, activate, rollback): their
# entry is on disk before it leaves. Every other entry is committed with the next group
# (the next loop turn) without waiting: what it records is re-learnt from the agent after
# a crash (a commit is idempotent; health checks only read).
_ACTS_NEXT = frozenset({NodePhase.STAGING, NodePhase.ACTIVATING, NodePhase.ROLLING_BACK})


def poll_delay(waited: float) -> float:
    """Seconds until the next status poll of a node that has been waited for `waited`
    seconds since its activation (or rollback) was sent.

    A 90 s reboot polled every 0.2 s is 450 requests, most of them connects to a machine
    that is down: at a batch of 1,000 nodes, 5,000 a second for the controller to make.
    Backing off with the time waited keeps the lag behind the boot under 5% of it (and
    under 2 s) with about a fifth of the polls; a quick boot is still seen within 0.2 s.

    >>> [round(poll_delay(t), 3) for t in (0.0, 3.9, 10.0, 39.0, 600.0)]
    [0.2, 0.2, 0.5, 1.95, 2.0]
    """
    return min(max(POLL_INTERVAL, waited * BOOT_POLL_SHARE), BOOT_POLL_MAX)


async def wait_boot(driver: Driver, node: Node, boot_count: int, timeout: float) -> NodeStatus:
    """Poll until the node has booted once more than `boot_count` and its workload is
    past starting (so health checks judge a started workload, not a starting one),
    backing off as the wait grows (`poll_delay`). Once it answers on its new boot,
    wait for its workload with status long polls (`Driver.watch`), which answer the
    moment it is up, where polls would lag up to `poll_delay` behind."""
    start = clock.now()
    deadline = start + timeout
    last = "no answer"
    while (now := clock.now()) < deadline:
        try:
            st = await driver.status(node)
            while st.boot_count > boot_count and st.workload == "starting":
                # Up, its workload coming: a long poll answers when that changes.
                wait = min(WATCH_MAX, deadline - clock.now())
                seen = await driver.watch(node, st, wait) if wait > 0 else None
                if seen is None:
                    break
                st = seen
            if st.boot_count > boot_count and st.workload != "starting":
                return st
            last = f"boot {st.boot_count}, workload {st.workload}"
        except (TransportError, Refused) as exc:
            last = str(exc)
        await clock.sleep(min(poll_delay(now - start), max(0.0, deadline - clock.now())))
    raise NodeFailed(Reason.BOOT_TIMEOUT, f"not back within {timeout:g}s ({last})")


class NodeSteps:
    """The per-node steps of one rollout: its driver, policy, image and journal."""

    def __init__(
        self,
        driver: Driver,
        policy: Policy,
        image: Image,
        control: Control,
        journal: Journal,
        emit: Callable[[Event], None],
        reach_timeout: float = REACH_TIMEOUT,
    ) -> None:
        self.driver = driver
        self.policy = policy
        self.image = image
        self.control = control
        self.journal = journal
        self._emit = emit
        self.reach_timeout = reach_timeout

    async def set(
        self, rec: NodeRecord, phase: NodePhase, reason: Reason | None = None, detail: str = ""
    ) -> None:
        rec.phase = phase
        if reason is not None:
            rec.reason = reason
        if detail:
            rec.detail = detail
        elif not rec.failed:
            rec.detail = ""
        acts = phase in _ACTS_NEXT
        self.journal.write(rec.snapshot(), lazy=not acts)
        self._emit(NodeChanged(rec.node.id, rec.batch, phase, reason, detail))
        if acts:
            await self.journal.flushed()  # durable before the request it announces leaves

    def progress(self, rec: NodeRecord) -> Callable[[int], None]:
        if self.image.pulled:
            return lambda n: self._emit(BytesFetched(rec.node.id, n))
        return lambda n: self._emit(BytesSent(rec.node.id, n))

    async def update(self, rec: NodeRecord, prober: Probe) -> None:
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
        await self.set(rec, NodePhase.FAILED, reason, detail)
        if rec.activated:
            await self.rollback_node(rec)

    async def _update_steps(self, rec: NodeRecord, prober: Probe) -> None:
        """Drive one node to committed, from wherever the journal says it is."""
        node, target = rec.node, self.image.digest
        if rec.phase is NodePhase.FAILED or rec.phase is NodePhase.ROLLING_BACK:
            await self.rollback_node(rec)  # a crash interrupted its rollback
            return
        st = await self._reach(node, self.reach_timeout)
        booted: NodeStatus | None = None  # the boot wait's last status: the first round
        if rec.activated:
            start = rec.boot_count_start
            if st.done(target) and start is not None and st.boot_count > start:
                # Committed on this activation's boot before the controller stopped; the
                # entry saying so (written lazily) was lost: nothing is redone.
                rec.boot_count, rec.version = st.boot_count, st.booted_version
                await self.set(rec, NodePhase.COMMITTED, detail="resumed: committed already")
                return
            # Resumed after activation: the boot count recorded before it tells the rest.
            booted = await self._resume_activated(rec, st)
        elif st.done(target):
            rec.boot_count, rec.version = st.boot_count, st.booted_version
            await self.set(rec, NodePhase.SKIPPED, detail="already on the target, committed")
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
            await self.set(rec, NodePhase.BOOTING, detail="adopted: on the target, uncommitted")
            booted = await self._boot(rec, st.boot_count - 1)  # its workload past starting
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
                await self.set(rec, NodePhase.STAGED, detail="pre-staged")
            else:
                await self._stage(rec)
            if not await self.control.checkpoint():
                return
            booted = await self._activate(rec)
        await self._verify(rec, prober, booted)
        await self._commit(rec)

    async def _resume_activated(self, rec: NodeRecord, st: NodeStatus) -> NodeStatus:
        """The journal says activation was (or was about to be) sent: find out if it was.
        The node's status once it is back."""
        start = rec.boot_count_start if rec.boot_count_start is not None else st.boot_count
        if st.boot_count == start and st.busy is None and not st.runs(self.image.digest):
            if st.staged_digest != self.image.digest:
                await self._stage(rec)
            return await self._activate(rec)  # it never arrived: boot count unchanged, idle
        await self.set(rec, NodePhase.BOOTING, detail="resumed")
        return await self._boot(rec, start)

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
        await self.set(rec, NodePhase.STAGING)
        progress = self.progress(rec)
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
        await self.set(rec, NodePhase.STAGED, detail="" if written else "already staged")

    async def _activate(self, rec: NodeRecord) -> NodeStatus:
        """Activate, then wait until the node is back; its status then."""
        node, mode = rec.node, self.policy.activation
        start = rec.boot_count if rec.boot_count is not None else 0
        rec.boot_count_start = start
        rec.activated = True  # journaled with ACTIVATING, before the request leaves
        await self.set(rec, NodePhase.ACTIVATING)
        try:
            await self._timed(rec, Step.ACTIVATE, lambda: self.driver.activate(node, mode))
        except Refused as exc:
            rec.activated = False
            raise NodeFailed(Reason.ACTIVATE_FAILED, f"agent refused to activate: {exc}") from exc
        except TransportError:
            pass  # the request may have arrived: the boot count tells
        await self.set(rec, NodePhase.BOOTING)
        return await self._boot(rec, start)

    async def _boot(self, rec: NodeRecord, start: int) -> NodeStatus:
        """The BOOT step: wait until the node booted past `start`; it must run the target.
        Its status then."""
        timeout = self.policy.health.boot_timeout
        st = await self._timed(
            rec,
            Step.BOOT,
            lambda: wait_boot(self.driver, rec.node, start, timeout),
            lambda s: s.runs(self.image.digest),
        )
        rec.boot_count, rec.version = st.boot_count, st.booted_version
        if not st.runs(self.image.digest):
            raise NodeFailed(
                Reason.FELL_BACK,
                f"node booted {st.booted_version} instead of the target (it fell back)",
            )
        return st

    async def _verify(self, rec: NodeRecord, prober: Probe, booted: NodeStatus | None) -> None:
        await self.set(rec, NodePhase.VERIFYING)

        def seen(r: CheckResult) -> None:
            self._emit(HealthChecked(rec.node.id, r.kind, r.ok))

        verdict, detail = await self._timed(
            rec,
            Step.VERIFY,
            lambda: watch(prober, self.policy.health, rec.node, self.image.digest, seen, booted),
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
        await self.set(rec, NodePhase.HEALTHY)

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
        await self.set(rec, NodePhase.COMMITTED)

    # -- rollback -----------------------------------------------------------------------
    async def rollback_many(self, records: Sequence[NodeRecord], fleet: int) -> None:
        """Return nodes this rollout updated to their previous image, max_unavailable (of
        a fleet of `fleet` nodes) at a time: a rollback takes nodes out of service too."""
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
        gate = asyncio.Semaphore(limits(self.policy, fleet).max_unavailable)

        async def one(rec: NodeRecord) -> None:
            async with gate:
                await self.rollback_node(rec)

        async with asyncio.TaskGroup() as tg:
            for rec in todo:
                tg.create_task(one(rec))

    async def rollback_node(self, rec: NodeRecord) -> None:
        node = rec.node
        await self.set(rec, NodePhase.ROLLING_BACK)
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
            await self.set(rec, NodePhase.ROLLED_BACK, detail=detail)
        else:
            await self.set(
                rec,
                NodePhase.ROLLBACK_FAILED,
                detail=f"{rec.detail}; its agent falls back on its own at its commit deadline",
            )

    async def _rollback_steps(self, rec: NodeRecord) -> bool:
        node = rec.node
        st = await self._reach(node, self.policy.health.boot_timeout)
        timeout = self.policy.health.boot_timeout
        if st.busy is not None:  # a boot is under way (perhaps our rollback before a crash)
            st = await wait_boot(self.driver, node, st.boot_count, timeout)
        if st.booted_digest == rec.previous_digest and st.committed:
            rec.boot_count, rec.version = st.boot_count, st.booted_version
            return True  # already back (the agent fell back, or an earlier request did it)
        try:
            await self.driver.rollback(node, self.policy.activation)
        except Refused as exc:
            raise NodeFailed(Reason.ACTIVATE_FAILED, f"agent refused: {exc}") from exc
        except TransportError:
            pass  # may have arrived; the boot count tells
        st = await wait_boot(self.driver, node, st.boot_count, timeout)
        rec.boot_count, rec.version = st.boot_count, st.booted_version
        return st.booted_digest == rec.previous_digest and st.committed
