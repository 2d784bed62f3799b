"""What a rollout knows about each node, and what it returns: `NodeRecord`, `RolloutResult`.

A NodeRecord is mutable on purpose: the engine and the node steps move it through the
node phases (model.NodePhase) and journal a snapshot of it on every change, so that the
journal's fold rebuilds the same record after a crash (`NodeRecord.from_snapshot`; the
snapshot is entries.NodeSnapshot, the same shape the API shows). It holds
what the later steps need to decide: whether activation was sent, the boot count before
it, and the image to return to.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from rollout.entries import Body, NodeSnapshot
from rollout.model import Node, NodePhase, Reason, RolloutPhase


class Journal(Protocol):
    """Where the engine writes one rollout's entries: `write` buffers (group commit; a
    `lazy` entry, one no action waits for, may wait longer), `flushed` returns once
    everything written is on disk."""

    def write(self, body: Body, *, lazy: bool = False) -> None: ...

    async def flushed(self) -> None: ...


class NoJournal:
    """A journal that keeps nothing (an engine run without a store, in tests)."""

    def write(self, body: Body, *, lazy: bool = False) -> None:
        return None

    async def flushed(self) -> None:
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

    def snapshot(self) -> NodeSnapshot:
        return NodeSnapshot(
            id=self.node.id,
            batch=self.batch,
            phase=self.phase,
            reason=self.reason,
            detail=self.detail,
            failed=self.failed,
            activated=self.activated,
            previous_digest=self.previous_digest,
            previous_version=self.previous_version,
            boot_count_start=self.boot_count_start,
            boot_count=self.boot_count,
            version=self.version,
        )

    @classmethod
    def from_snapshot(cls, node: Node, snap: NodeSnapshot) -> NodeRecord:
        return cls(
            node=node,
            batch=snap.batch,
            phase=snap.phase,
            reason=snap.reason,
            detail=snap.detail,
            failed=snap.failed,
            activated=snap.activated,
            previous_digest=snap.previous_digest,
            previous_version=snap.previous_version,
            boot_count_start=snap.boot_count_start,
            boot_count=snap.boot_count,
            version=snap.version,
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
