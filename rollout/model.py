"""Core value types: nodes, images, batches, phases and the reasons a node fails.

Everything here is a frozen dataclass or an enum and does no I/O, so the planner, the
decision function and the engine can share them freely and tests can build them by hand.

Node update phases follow DESIGN.md::

    pending -> staging -> staged -> activating -> booting -> verifying -> healthy -> committed
                  |          |          |            |           |
                  +----------+----------+------------+-----------+--> failed
    failed -> rolling_back -> rolled_back
    pending -> skipped          (already on the target image and committed)
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class ActivationMode(enum.StrEnum):
    """How an agent boots its staged slot."""

    REBOOT = "reboot"
    KEXEC = "kexec"
    SOFT_REBOOT = "soft-reboot"


class NodePhase(enum.StrEnum):
    PENDING = "pending"
    STAGING = "staging"
    STAGED = "staged"
    ACTIVATING = "activating"
    BOOTING = "booting"
    VERIFYING = "verifying"
    HEALTHY = "healthy"
    COMMITTED = "committed"
    SKIPPED = "skipped"
    FAILED = "failed"
    ROLLING_BACK = "rolling_back"
    ROLLED_BACK = "rolled_back"
    ROLLBACK_FAILED = "rollback_failed"

    @property
    def in_flight(self) -> bool:
        """True while the node is out of service because of this rollout."""
        return self in _IN_FLIGHT

    @property
    def done(self) -> bool:
        """True when the node runs the target image, committed."""
        return self in (NodePhase.COMMITTED, NodePhase.SKIPPED)


_IN_FLIGHT = frozenset(
    {
        NodePhase.ACTIVATING,
        NodePhase.BOOTING,
        NodePhase.VERIFYING,
        NodePhase.HEALTHY,
        NodePhase.ROLLING_BACK,
    }
)


class RolloutPhase(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    PAUSED = "paused"
    WAITING = "waiting"  # on a gate between batches
    SUCCEEDED = "succeeded"
    HALTED = "halted"
    ROLLING_BACK = "rolling_back"
    ROLLED_BACK = "rolled_back"
    ABORTED = "aborted"
    FAILED = "failed"

    @property
    def finished(self) -> bool:
        """True for the phases after which a rollout holds no locks and will not move on
        its own (a command may still start it again: retry, rollback)."""
        return self in FINISHED


# The one definition of "finished" (journal, controller, clients and webhooks use it).
FINISHED = frozenset(
    {
        RolloutPhase.SUCCEEDED,
        RolloutPhase.HALTED,
        RolloutPhase.ROLLED_BACK,
        RolloutPhase.ABORTED,
        RolloutPhase.FAILED,
    }
)


class Step(enum.StrEnum):
    """The timed steps of one node update (a bounded metric label)."""

    STAGE = "stage"
    ACTIVATE = "activate"
    BOOT = "boot"
    VERIFY = "verify"
    COMMIT = "commit"
    ROLLBACK = "rollback"


class Reason(enum.StrEnum):
    """Why a node failed: named constants, bounded so they can be metric labels."""

    STAGE_FAILED = "stage_failed"
    DIGEST_MISMATCH = "digest_mismatch"
    ACTIVATE_FAILED = "activate_failed"
    BOOT_TIMEOUT = "boot_timeout"
    FELL_BACK = "fell_back"
    HEALTH_DEADLINE = "health_deadline"
    UNHEALTHY = "unhealthy"
    COMMIT_FAILED = "commit_failed"
    UNREACHABLE = "unreachable"
    INTERRUPTED = "interrupted"
    INTERNAL = "internal_error"


@dataclass(frozen=True)
class Node:
    """One machine of the fleet, as the inventory names it."""

    id: str
    address: str  # agent "host:port"
    labels: Mapping[str, str] = field(default_factory=dict)
    token_file: str | None = None
    ca_file: str | None = None  # set: the agent speaks HTTPS, verified against this CA

    @property
    def scheme(self) -> str:
        """The URL scheme of the agent: https when the node has a ca_file, else http."""
        return "https" if self.ca_file else "http"

    @property
    def host(self) -> str:
        return self.address.rsplit(":", 1)[0]


@dataclass(frozen=True)
class Mirror:
    """A registry mirror (inventory `registry_mirrors`): nodes whose labels include all
    of `match` pull images from `registry` instead of the one the reference names."""

    match: Mapping[str, str]
    registry: str

    def applies(self, node: Node) -> bool:
        return all(node.labels.get(k) == v for k, v in self.match.items())

    def to_json(self) -> dict[str, Any]:
        return {"match": dict(self.match), "registry": self.registry}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Mirror:
        return cls(dict(data["match"]), str(data["registry"]))


@dataclass(frozen=True)
class Image:
    """An image (a file on the controller's disk, or in an image store) and what its
    manifest says."""

    path: str
    digest: str  # "sha256:<hex>"
    name: str
    version: str
    size: int
    signature: str | None = None  # X-Image-Signature value (base64 of IMAGE.sig), if signed
    # Pull mode: where the nodes fetch the image themselves, a pinned "oci://REG/REPO@sha256:"
    # (by manifest digest) or an https:// URL; None: the controller streams `path` (push).
    source: str | None = None
    reference: str | None = None  # what the operator named (e.g. a tag), for the record

    @property
    def pulled(self) -> bool:
        return self.source is not None


@dataclass(frozen=True)
class Batch:
    """One step of the plan: nodes updated in parallel."""

    index: int  # 1-based
    nodes: tuple[Node, ...]
    canary: bool = False

    @property
    def node_ids(self) -> tuple[str, ...]:
        return tuple(n.id for n in self.nodes)


@dataclass(frozen=True)
class NodeStatus:
    """What an agent reports about itself (GET /v1/status), reduced to what the core uses."""

    node_id: str
    booted_slot: str
    booted_version: str | None
    booted_digest: str | None
    staged_digest: str | None
    committed: bool
    boot_count: int
    workload: str  # "running" | "stopped" | "failed" | "starting"
    busy: str | None = None  # "staging" | "activating" while the agent works on a request
    root_device: str | None = None  # a real node: the device `/` is mounted from
    last_good_digest: str | None = None  # the image a fallback or rollback returns to
    last_good_version: str | None = None
    # The agent's ETag of this status: a long poll waits for the next (Driver.watch).
    tag: str | None = field(default=None, compare=False)

    def runs(self, digest: str) -> bool:
        return self.booted_digest == digest

    def done(self, digest: str) -> bool:
        return self.booted_digest == digest and self.committed


@dataclass(frozen=True)
class NodeOutcome:
    """How one node ended in one rollout."""

    node_id: str
    phase: NodePhase
    reason: Reason | None = None
    detail: str = ""
