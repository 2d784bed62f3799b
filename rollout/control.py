"""Operator commands a running rollout obeys: pause, resume and abort (`Control`).

The engine and the node steps look at a Control only at their checkpoints (before a
batch, a stage or an activation), so a command never cuts a node's step in half: pause
waits there, abort starts nothing new, and nodes already activated settle per policy.
Gate waits are the exception that is safe to cut: `unless_aborted` gives them up.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


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
