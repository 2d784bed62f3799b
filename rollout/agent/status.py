"""`GET /v1/status`, one model for both ends of the agent API: `AgentStatus`.

The agent builds an AgentStatus from its state and serves `model_dump(mode="json")`; the
controller's driver validates the same model from the answer and reduces it to what the
core decides on (`node_status()` -> model.NodeStatus). The OpenAPI document declares the
answer from this model's JSON Schema, and the fuzz test checks the agent against it.

Extra fields are ignored when reading, so a controller reads a newer agent's status;
the parts whose content depends on the backend (workload details, the machine under the
agent) keep their extra fields.

Every answer carries an `ETag` (`status_tag`): a digest of the status without the
lease's countdown, the one field that changes on every call while nothing happens. A
caller that sends it back in `If-None-Match` with `?wait=S` is answered as soon as the
status differs, or `304 Not Modified` after S seconds: a long poll (app.py).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict

from rollout.model import NodeStatus

WAIT_MAX = 60.0  # a status long poll's longest wait (seconds)

_READ = ConfigDict(frozen=True, extra="ignore")
_OPEN = ConfigDict(frozen=True, extra="allow")


class SlotImageStatus(BaseModel):
    """The image in one slot."""

    model_config = _READ
    slot: str
    name: str
    version: str
    digest: str


class FellBackStatus(BaseModel):
    """The agent returned to its last good slot on its own (a failed trial boot)."""

    model_config = _READ
    from_slot: str
    digest: str | None = None
    reason: str
    boot_count: int


class LeaseStatus(BaseModel):
    model_config = _READ
    holder: str
    expires_in: float


class WorkloadStatus(BaseModel):
    """`state` is running, stopped, failed or starting; the rest depends on the backend
    (a process's pid and port, or a real node's systemd units)."""

    model_config = _OPEN
    state: str


class BackendStatus(BaseModel):
    """The machine under the agent: `kind` (emulated, disk), a real node's root device,
    slots and compatible string."""

    model_config = _OPEN
    kind: str
    root_device: str | None = None


class FetchStatus(BaseModel):
    """A pull-mode fetch in progress or done (POST /v1/fetch)."""

    model_config = _READ
    digest: str
    size: int
    url: str
    state: str
    bytes: int = 0
    resumes: int = 0
    error: dict[str, str] | None = None  # code and message, as the agent's errors
    seconds: float = 0.0


class AgentStatus(BaseModel):
    model_config = _READ
    node_id: str
    booted: SlotImageStatus
    staged: SlotImageStatus | None = None
    committed: bool
    last_good_slot: str
    last_good: SlotImageStatus | None = None
    boot_tries_left: int
    boot_count: int
    workload: WorkloadStatus
    fell_back: FellBackStatus | None = None
    busy: str | None = None  # staging, fetching, activating ... while a request works
    lease: LeaseStatus | None = None
    backend: BackendStatus
    fetch: FetchStatus | None = None

    def node_status(self, tag: str | None = None) -> NodeStatus:
        """What the controller's core decides on; `tag` is the answer's ETag."""
        return NodeStatus(
            node_id=self.node_id,
            booted_slot=self.booted.slot,
            booted_version=self.booted.version,
            booted_digest=self.booted.digest,
            staged_digest=self.staged.digest if self.staged is not None else None,
            committed=self.committed,
            boot_count=self.boot_count,
            workload=self.workload.state,
            busy=self.busy,
            root_device=self.backend.root_device,
            last_good_digest=self.last_good.digest if self.last_good is not None else None,
            last_good_version=self.last_good.version if self.last_good is not None else None,
            tag=tag,
        )


def status_tag(body: Mapping[str, Any]) -> str:
    """The ETag of a status answer (quoted, as RFC 9110 writes entity tags): the same for
    two answers that differ only in the lease's `expires_in`.

    >>> a = {"boot_count": 2, "lease": {"holder": "r1", "expires_in": 29.5}}
    >>> status_tag(a) == status_tag(a | {"lease": {"holder": "r1", "expires_in": 3.0}})
    True
    >>> status_tag(a) == status_tag(a | {"boot_count": 3})
    False
    """
    lease = body.get("lease")
    if isinstance(lease, Mapping):
        body = {**body, "lease": {k: v for k, v in lease.items() if k != "expires_in"}}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return '"' + hashlib.blake2b(text.encode(), digest_size=12).hexdigest() + '"'
