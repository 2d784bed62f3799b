"""Events the engine emits, and the Observer protocol that receives them.

The engine reports everything it decides and observes as a frozen event value. Progress
display, structured logs and Prometheus metrics are all observers of the same stream, so
they can never disagree, and a journal can store the same values later.
Observers must be fast and must not raise: the engine calls them inline.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import structlog

from rollout.gates.events import GateEvent
from rollout.model import Batch, Image, NodePhase, Reason, RolloutPhase, Step


@dataclass(frozen=True)
class RolloutStarted:
    rollout_id: str
    image: Image
    policy: str
    batches: tuple[Batch, ...]
    fleet_size: int
    # Nodes already past pending when a journaled rollout resumes (empty when new).
    phases: Mapping[str, NodePhase] = field(default_factory=dict)


@dataclass(frozen=True)
class RolloutPhaseChanged:
    """The rollout entered a phase other than its final one (running, paused, ...)."""

    rollout_id: str
    phase: RolloutPhase
    message: str = ""


@dataclass(frozen=True)
class BatchStarted:
    batch: Batch
    total_batches: int


@dataclass(frozen=True)
class NodeChanged:
    node_id: str
    batch: int
    phase: NodePhase
    reason: Reason | None = None
    detail: str = ""


@dataclass(frozen=True)
class StepDone:
    node_id: str
    step: Step
    seconds: float
    ok: bool


@dataclass(frozen=True)
class BytesSent:
    node_id: str
    count: int


@dataclass(frozen=True)
class BytesFetched:
    """Bytes a node pulled from the image store since the last report (pull mode)."""

    node_id: str
    count: int


@dataclass(frozen=True)
class Retried:
    node_id: str
    operation: str
    attempt: int
    error: str


@dataclass(frozen=True)
class HealthChecked:
    node_id: str
    check: str  # check type: http, tcp, agent
    ok: bool


@dataclass(frozen=True)
class WebhookFailed:
    """A webhook delivery gave up after its retries (the rollout went on regardless)."""

    url: str
    event: str  # the rollout event it carried: started, batch_done, ...
    error: str


@dataclass(frozen=True)
class BatchFinished:
    batch: Batch
    failed: int
    decision: str


@dataclass(frozen=True)
class RolloutFinished:
    phase: RolloutPhase
    message: str


Event = (
    GateEvent
    | RolloutStarted
    | RolloutPhaseChanged
    | BatchStarted
    | NodeChanged
    | StepDone
    | BytesSent
    | BytesFetched
    | Retried
    | HealthChecked
    | BatchFinished
    | WebhookFailed
    | RolloutFinished
)


_log = structlog.get_logger("rollout.events")

# Anything that takes an event: the engine calls it inline, so it must be fast and not raise.
Observer = Callable[[Event], None]


class Fanout:
    """Deliver each event to several observers."""

    def __init__(self, observers: Iterable[Observer] = ()) -> None:
        self.observers = list(observers)

    def __call__(self, event: Event) -> None:
        for observer in self.observers:
            try:
                observer(event)
            except Exception as exc:  # a display or metric bug must not stop a rollout
                _log.error("observer_failed", observer=repr(observer), error=repr(exc))
