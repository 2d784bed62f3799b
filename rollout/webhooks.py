"""Webhooks as an engine observer: rollout events become `notify:` deliveries.

The mapping (a contract, see docs/gates.md): RolloutStarted -> `started`, BatchFinished ->
`batch_done`, GateWaiting -> `gate_waiting`, RolloutFinished -> `succeeded`,
`rolled_back` or `halted` (halted, aborted and failed rollouts all say `halted`, with the
phase in the payload). Deliveries run in the background (gates.notify.Notifier): the
rollout never waits on a webhook.
"""

from __future__ import annotations

from rollout.events import BatchFinished, Event, RolloutFinished, RolloutStarted
from rollout.gates.events import GateWaiting
from rollout.gates.notify import Notifier
from rollout.model import RolloutPhase

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
