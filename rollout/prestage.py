"""Staging ahead (policy `prestage`): nodes of later batches fetch or receive the image
in the background while the current batch updates, at most `max_concurrent` at a time
across the fleet, earlier batches first.

A pre-staging failure is not a failure of the node: its record goes back to pending and
its own batch stages it again (and decides then). A node's update first waits for its
pre-staging task (`settle`), so the two never race. When the rollout ends without
activating nodes it staged ahead (halted, rolled back, aborted, failed), `discard` asks
their agents to drop the image.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import aiohttp

from rollout.drivers.base import Refused, TransportError
from rollout.model import Batch, NodePhase
from rollout.record import NodeRecord
from rollout.steps import NodeSteps


class Prestager:
    def __init__(self, steps: NodeSteps, records: dict[str, NodeRecord]) -> None:
        self.steps = steps
        self.records = records
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._slots = asyncio.Semaphore(steps.policy.prestage.max_concurrent)

    def start(self, batches: Sequence[Batch]) -> None:
        """Start staging the pending nodes of `batches` in the background."""
        for batch in batches:
            for node in batch.nodes:
                rec = self.records[node.id]
                if rec.phase is NodePhase.PENDING and node.id not in self._tasks:
                    task = asyncio.create_task(self._one(rec), name=f"prestage-{node.id}")
                    self._tasks[node.id] = task

    async def settle(self, node_id: str) -> None:
        """Wait for the node's pre-staging, if any, before its own update starts."""
        if (ahead := self._tasks.pop(node_id, None)) is not None:
            await asyncio.gather(ahead, return_exceptions=True)  # it catches its own errors

    async def _one(self, rec: NodeRecord) -> None:
        steps, image = self.steps, self.steps.image
        async with self._slots:
            if steps.control.aborted or rec.phase is not NodePhase.PENDING:
                return
            try:
                st = await steps.driver.status(rec.node)
                if not st.committed or st.runs(image.digest) or st.busy is not None:
                    return  # its own update will look at it
                if st.staged_digest != image.digest:
                    await steps.set(rec, NodePhase.STAGING, detail="pre-staging")
                    await steps.driver.stage(rec.node, image, steps.progress(rec))
                await steps.set(rec, NodePhase.STAGED, detail="pre-staged")
            except (TransportError, Refused, OSError, ValueError, aiohttp.ClientError) as exc:
                await steps.set(rec, NodePhase.PENDING, detail=f"pre-staging failed: {exc}"[:300])
            except asyncio.CancelledError:
                phase: NodePhase = rec.phase  # set by steps.set above, which mypy does not see
                if phase is NodePhase.STAGING:  # the rollout stopped meanwhile
                    await steps.set(rec, NodePhase.PENDING, detail="pre-staging stopped")
                raise

    def stop(self) -> None:
        for task in self._tasks.values():
            task.cancel()

    async def discard(self) -> None:
        """The rollout ends without activating nodes it staged ahead: drop those images."""
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        left = [
            r
            for r in self.records.values()
            if r.phase in (NodePhase.STAGING, NodePhase.STAGED) and not r.activated
        ]
        steps = self.steps

        async def one(rec: NodeRecord) -> None:
            try:
                await steps.driver.discard(rec.node, steps.image.digest)
            except (TransportError, Refused, OSError, aiohttp.ClientError) as exc:
                await steps.set(rec, NodePhase.PENDING, detail=f"staged image not discarded: {exc}")
                return
            await steps.set(rec, NodePhase.PENDING, detail="staged image discarded")

        await asyncio.gather(*(one(r) for r in left))
