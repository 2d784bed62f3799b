"""Webhooks: rollout events as JSON POSTs, delivered in the background, never blocking.

``Notifier(specs, session).notify("halted", {...})`` returns at once. Each webhook (one
``notify:`` entry of the policy) has its own queue and worker task, so its events arrive
in the order they happened, and a slow or dead receiver delays nobody else.

The body of every POST::

    {"event": "halted", "time": "2024-06-01T10:00:00.123456+00:00", "data": {...}}

with ``Content-Type: application/json`` and the webhook's ``headers``.

Delivery: an attempt succeeds on any 2xx answer. Transport errors (refused, reset, timed
out) and 5xx answers are retried with tenacity, exponential backoff, ``attempts`` tries in
all; a 4xx answer is final (the receiver refuses this request; sending it again would not
help). A delivery that fails for good is logged (structlog, ``webhook_failed``) and
reported to ``on_failure(url, event, error)``, which the engine wires to the metric
``rollout_webhook_failures_total``. `aclose` gives in-flight deliveries ``grace`` seconds;
whatever is still queued then is dropped and reported as failed.

The engine side: `WebhookObserver` turns rollout events into deliveries. The mapping (a
contract, see docs/gates.md): RolloutStarted -> `started`, BatchFinished ->
`batch_done`, GateWaiting -> `gate_waiting`, RolloutFinished -> `succeeded`,
`rolled_back` or `halted` (halted, aborted and failed rollouts all say `halted`, with the
phase in the payload). Deliveries run in the background (`Notifier`): the rollout never
waits on a webhook.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

import aiohttp
import structlog
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from rollout import clock
from rollout.events import BatchFinished, Event, RolloutFinished, RolloutStarted
from rollout.gates.events import GateWaiting
from rollout.model import RolloutPhase

__all__ = ["Notifier", "NotifySpec", "WebhookError"]

log = structlog.get_logger("rollout.notify")

QUEUE_LIMIT = 1000


class NotifySpec(Protocol):
    """The policy's Notify model has these fields."""

    @property
    def url(self) -> str: ...
    @property
    def events(self) -> tuple[str, ...]: ...
    @property
    def headers(self) -> dict[str, str]: ...
    @property
    def timeout(self) -> float: ...


class WebhookError(Exception):
    """One attempt that should be retried (transport error or 5xx)."""


class _Final(Exception):
    """An answer that must not be retried (4xx, other non-2xx)."""


_RETRY_ON = (WebhookError, aiohttp.ClientConnectionError, asyncio.TimeoutError, ConnectionError)

_STOP = object()


class _Hook:
    def __init__(self, spec: NotifySpec) -> None:
        self.spec = spec
        self.queue: asyncio.Queue[Any] = asyncio.Queue(QUEUE_LIMIT)
        self.task: asyncio.Task[None] | None = None


class Notifier:
    """Sends events to the webhooks whose ``events`` include them (see module docstring)."""

    def __init__(
        self,
        specs: Sequence[NotifySpec],
        session: aiohttp.ClientSession,
        on_failure: Callable[[str, str, str], None] | None = None,
        *,
        attempts: int = 5,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
    ) -> None:
        self.session = session
        self.on_failure = on_failure
        self.attempts = attempts
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.delivered = 0
        self.failed = 0
        self._hooks = [_Hook(s) for s in specs]
        self._closed = False

    def notify(self, event: str, payload: Mapping[str, object]) -> None:
        """Queue ``event`` for every webhook that wants it; returns at once."""
        if self._closed:
            return
        body = {"event": event, "time": datetime.now(UTC).isoformat(), "data": dict(payload)}
        for hook in self._hooks:
            if event not in hook.spec.events:
                continue
            if hook.task is None:
                hook.task = asyncio.get_running_loop().create_task(self._worker(hook))
            try:
                hook.queue.put_nowait(body)
            except asyncio.QueueFull:
                self._failed(hook.spec.url, event, f"more than {QUEUE_LIMIT} events queued")

    async def aclose(self, grace: float = 5.0) -> None:
        """Stop taking events; wait up to ``grace`` seconds for queued deliveries."""
        self._closed = True
        tasks = []
        for hook in self._hooks:
            if hook.task is None:
                continue
            with contextlib.suppress(asyncio.QueueFull):
                hook.queue.put_nowait(_STOP)
            tasks.append(hook.task)
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=grace)
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for hook in self._hooks:
            while not hook.queue.empty():
                body = hook.queue.get_nowait()
                if body is not _STOP:
                    self._failed(hook.spec.url, body["event"], "not delivered before shutdown")

    # -- delivery ---------------------------------------------------------------------------
    async def _worker(self, hook: _Hook) -> None:
        while True:
            body = await hook.queue.get()
            if body is _STOP:
                return
            try:
                await self._deliver(hook.spec, body)
            except asyncio.CancelledError:
                self._failed(hook.spec.url, body["event"], "not delivered before shutdown")
                raise
            except Exception as exc:  # a webhook must never take the rollout down
                self._failed(hook.spec.url, body["event"], _describe(exc))
            else:
                self.delivered += 1

    async def _deliver(self, spec: NotifySpec, body: dict[str, Any]) -> None:
        def retrying(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            log.info(
                "webhook_retry",
                url=spec.url,
                webhook_event=body["event"],
                attempt=state.attempt_number,
                error=_describe(exc) if exc else "",
            )

        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(_RETRY_ON),
            stop=stop_after_attempt(self.attempts),
            wait=wait_exponential(multiplier=self.backoff, max=self.max_backoff),
            sleep=clock.sleep,
            before_sleep=retrying,
            reraise=True,
        ):
            with attempt:
                await self._post(spec, body)

    async def _post(self, spec: NotifySpec, body: dict[str, Any]) -> None:
        async with self.session.post(
            spec.url,
            json=body,
            headers=spec.headers,
            timeout=aiohttp.ClientTimeout(total=spec.timeout),
            allow_redirects=False,
        ) as resp:
            await resp.read()
            if 200 <= resp.status < 300:
                return
            if resp.status >= 500:
                raise WebhookError(f"HTTP {resp.status}")
            raise _Final(f"HTTP {resp.status}")

    def _failed(self, url: str, event: str, error: str) -> None:
        self.failed += 1
        log.warning("webhook_failed", url=url, webhook_event=event, error=error)
        if self.on_failure is not None:
            self.on_failure(url, event, error)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, WebhookError | _Final):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# Every finished phase, named as a notify event (an abort or a failure counts as halted).
_FINAL = {
    RolloutPhase.SUCCEEDED: "succeeded",
    RolloutPhase.ROLLED_BACK: "rolled_back",
    RolloutPhase.HALTED: "halted",
    RolloutPhase.ABORTED: "halted",
    RolloutPhase.FAILED: "halted",
}


class WebhookObserver:
    def __init__(self, notifier: Notifier, rollout_id: str) -> None:
        self.notifier = notifier
        self.rollout_id = rollout_id
        self.image: dict[str, str] = {}

    def __call__(self, event: Event) -> None:
        base: dict[str, object] = {"rollout": self.rollout_id}
        if isinstance(event, RolloutStarted):
            self.image = {"name": event.image.name, "version": event.image.version,
                          "digest": event.image.digest}  # fmt: skip
            self.notifier.notify(
                "started",
                base
                | {
                    "image": self.image,
                    "nodes": event.fleet_size,
                    "batches": len(event.batches),
                    "policy": event.policy,
                },
            )
        elif isinstance(event, BatchFinished):
            self.notifier.notify(
                "batch_done",
                base
                | {
                    "batch": event.batch.index,
                    "nodes": list(event.batch.node_ids),
                    "failed": event.failed,
                    "decision": event.decision,
                },
            )
        elif isinstance(event, GateWaiting):
            self.notifier.notify(
                "gate_waiting",
                base
                | {
                    "gate": event.gate,
                    "kind": event.kind,
                    "since": event.since.isoformat(),
                    "until": event.until.isoformat() if event.until else None,
                    "reason": event.reason,
                },
            )
        elif isinstance(event, RolloutFinished) and event.phase in _FINAL:
            self.notifier.notify(
                _FINAL[event.phase],
                base | {"phase": str(event.phase), "message": event.message, "image": self.image},
            )
