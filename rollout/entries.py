"""The journal's entry kinds, one frozen pydantic model per kind (`Kind` -> `Body`).

    created          CreatedEntry: who, the policy (as data), the image, the inventory, the plan
    phase            PhaseEntry: the rollout's phase and why (running, paused, halted, ...)
    batch_started    BatchStartedEntry: the batch that began
    batch_finished   BatchFinishedEntry: its failed count and the decision taken after it
    node             NodeSnapshot: one node's whole record; the last snapshot wins
    command          CommandEntry: an operator's command (pause, retry, ...) and who gave it
    gate             GateEntry: a gate event (waiting, signal, decision, measured, finished)

The engine and the controller write bodies (`Store.append(rollout_id, body)`); the store
keeps each as JSON with its kind; the fold (rollout.journal) reads them back with
`parse_body`. `NodeSnapshot` is the one shape of a node's state: the engine journals it
(`NodeRecord.snapshot`), the fold keeps it, the API shows it and a resume rebuilds the
record from it. Fields added later get defaults, so older journals still fold; a body
that does not validate is a corrupt journal (ValueError naming the entry).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from rollout.model import NodePhase, Reason, RolloutPhase


class Kind(StrEnum):
    CREATED = "created"
    PHASE = "phase"
    BATCH_STARTED = "batch_started"
    BATCH_FINISHED = "batch_finished"
    NODE = "node"
    COMMAND = "command"
    GATE = "gate"


class _Body(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")
    kind: ClassVar[Kind]

    def get(self, key: str, default: Any = None) -> Any:
        """A field or, for commands and gates, an extra field by name (None if absent)."""
        if key in type(self).model_fields:
            return getattr(self, key)
        return (self.model_extra or {}).get(key, default)


class ImageData(BaseModel):
    """model.Image as journaled (its path, digest, manifest and where nodes get it)."""

    model_config = ConfigDict(frozen=True, extra="ignore")
    path: str
    digest: str
    name: str
    version: str
    size: int
    signature: str | None = None
    source: str | None = None
    reference: str | None = None


class InventoryNode(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")
    id: str
    address: str
    labels: dict[str, str] = {}
    token_file: str | None = None
    ca_file: str | None = None


class PlannedBatch(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")
    index: int
    canary: bool = False
    nodes: tuple[str, ...]


class CreatedEntry(_Body):
    kind = Kind.CREATED
    by: str = ""
    policy_name: str = ""
    policy: dict[str, Any]
    image: ImageData
    pull: dict[str, Any] | None = None  # PullAccess.to_json: paths only, never secrets
    inventory: tuple[InventoryNode, ...]
    batches: tuple[PlannedBatch, ...]


class PhaseEntry(_Body):
    kind = Kind.PHASE
    phase: RolloutPhase
    message: str = ""


class BatchStartedEntry(_Body):
    kind = Kind.BATCH_STARTED
    batch: int


class BatchFinishedEntry(_Body):
    kind = Kind.BATCH_FINISHED
    batch: int
    failed: int
    decision: str


class NodeSnapshot(_Body):
    """One node's record in a rollout (engine's `NodeRecord`), as journaled and shown."""

    kind = Kind.NODE
    id: str
    batch: int = 0
    phase: NodePhase = NodePhase.PENDING
    reason: Reason | None = None
    detail: str = ""
    failed: bool = False
    activated: bool = False  # activation was (or was about to be) sent
    previous_digest: str | None = None
    previous_version: str | None = None
    boot_count_start: int | None = None  # the boot count before activation
    boot_count: int | None = None
    version: str | None = None


class CommandEntry(_Body):
    """An operator's command; a retry also names the nodes made pending again."""

    model_config = ConfigDict(frozen=True, extra="allow")
    kind = Kind.COMMAND
    command: str
    by: str = ""


class GateEntry(_Body):
    """A gate event (gates.events.gate_event_json): `event` names its type, the rest of
    its fields depend on it; `batch` is the batch the gate ran for."""

    model_config = ConfigDict(frozen=True, extra="allow")
    kind = Kind.GATE
    event: str
    gate: str
    batch: int | None = None


Body = (
    CreatedEntry
    | PhaseEntry
    | BatchStartedEntry
    | BatchFinishedEntry
    | NodeSnapshot
    | CommandEntry
    | GateEntry
)

MODELS: dict[Kind, type[Body]] = {
    m.kind: m
    for m in (
        CreatedEntry,
        PhaseEntry,
        BatchStartedEntry,
        BatchFinishedEntry,
        NodeSnapshot,
        CommandEntry,
        GateEntry,
    )
}


def to_data(body: Body) -> dict[str, Any]:
    """The JSON object the store keeps for `body` (extra fields of commands and gates too)."""
    return body.model_dump(mode="json")


def parse_body(kind: str, data: dict[str, Any]) -> Body:
    """The typed body of one stored entry; ValueError for an unknown kind or bad data.

    >>> parse_body("phase", {"phase": "paused", "message": "pause by cli"}).phase
    <RolloutPhase.PAUSED: 'paused'>
    """
    try:
        model = MODELS[Kind(kind)]
    except ValueError:
        raise ValueError(f"unknown journal entry kind {kind!r}") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ValueError(f"bad {kind} entry in the journal: {exc}") from exc
