"""What a rollout knows about each node, and what it returns: `NodeRecord`, `RolloutResult`.

A NodeRecord is mutable on purpose: the engine and the node steps move it through the
node phases (model.NodePhase) and journal a snapshot of it on every change, so that the
journal's fold rebuilds the same record after a crash (`NodeRecord.from_json`). It holds
what the later steps need to decide: whether activation was sent, the boot count before
it, and the image to return to.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rollout.model import Node, NodePhase, Reason, RolloutPhase

# The engine's journal: entry kind and body, written durably before the step it records.
Journal = Callable[[str, dict[str, Any]], object]


def no_journal(kind: str, data: dict[str, Any]) -> None:
    return None


class NodeFailed(Exception):
    """One node's update cannot go on (the reason is journaled with the node)."""

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
