"""The policy file: how a rollout cuts batches, checks health and reacts to failure.

A policy is a YAML mapping with these sections (all optional, every field has a default)::

    activation: reboot
    batches:  {canary: 1, size: "25%", max_unavailable: "25%", spread_by: rack}
    health:   {checks: [{type: agent}], interval: 1s, min_healthy_time: 10s,
               deadline: 5m, boot_timeout: 2m, failure_threshold: 0}
    failure:  {max_failed: 0, action: rollback}
    gates:    [{name: bake, kind: bake, after: every, duration: 5m}, ...]   # rollout.gates
    notify:   [{url: "https://hooks.example/x", events: [halted]}]

Design:

- The schema is a tree of frozen pydantic models with ``extra="forbid"``: a typo is an
  error, never a silently ignored setting. Every field carries its documentation in its
  ``Field(description=...)``; docs/policies.md is written from the same text.
- Durations are plain ``float`` seconds once validated (rollout.units), so the engine
  never sees a unit. Counts that may be relative to the fleet are `units.Amount` values,
  resolved against the fleet size by the planner and the decision functions.
- Every problem becomes one `InputError` line ``<file>: <field.path>: <problem>``
  (rollout.problems), the file is read by rollout.yamlfile; inventory.py shares both.

Nothing here does I/O except `load_policy` reading the one file it is given.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from rollout.errors import InputError
from rollout.model import ActivationMode
from rollout.problems import FieldProblem, Tags, validation_message
from rollout.units import (
    Amount,
    Duration,
    PositiveAmount,
    fmt_duration,
    parse_rate,
    show,
)
from rollout.yamlfile import read_yaml

__all__ = [
    "GATE_KINDS",
    "NOTIFY_EVENTS",
    "AgentCheck",
    "AlertsGate",
    "AnalysisGate",
    "ApprovalGate",
    "BakeGate",
    "Batches",
    "Check",
    "Failure",
    "FailureAction",
    "Gate",
    "Health",
    "HttpCheck",
    "Notify",
    "NotifyEvent",
    "Policy",
    "TcpCheck",
    "WaitGate",
    "WindowGate",
    "load_policy",
    "parse_policy",
]

_CONFIG = ConfigDict(extra="forbid", frozen=True)
Int = Annotated[int, Field(strict=True)]  # no bools, no "8080" strings: YAML gives real ints
Port = Annotated[Int, Field(ge=1, le=65535)]
ProbeTimeout = Annotated[Duration, Field(gt=0)]


def _abs_path(path: str) -> str:
    if not path.startswith("/"):
        raise ValueError(f'must start with "/", got {show(path)}')
    return path


class HttpCheck(BaseModel):
    """Healthy when ``GET http://<node host>:<port><path>`` answers ``expect_status``."""

    model_config = _CONFIG

    type: Literal["http"] = Field(default="http", description="Selects this check: `http`.")
    port: Port = Field(
        default=8080, description="TCP port of the workload's HTTP endpoint on the node's host."
    )
    path: Annotated[str, AfterValidator(_abs_path)] = Field(
        default="/healthz", description="Request path; it starts with `/`."
    )
    expect_status: Int = Field(
        default=200,
        ge=100,
        le=599,
        description="The HTTP status a healthy node answers (redirects are not followed).",
    )
    timeout: ProbeTimeout = Field(
        default=2.0,
        description="Time one probe may take (connect and answer); longer counts as failed.",
    )


class TcpCheck(BaseModel):
    """Healthy when a TCP connection to ``<node host>:<port>`` opens."""

    model_config = _CONFIG

    type: Literal["tcp"] = Field(default="tcp", description="Selects this check: `tcp`.")
    port: Port = Field(description="TCP port to connect to on the node's host.")
    timeout: ProbeTimeout = Field(
        default=2.0, description="Time the connection may take to open; longer counts as failed."
    )


class AgentCheck(BaseModel):
    """Healthy when the agent reports the target image booted and its workload running."""

    model_config = _CONFIG

    type: Literal["agent"] = Field(
        default="agent",
        description="Selects this check: `agent` (booted digest == target and workload running).",
    )


Check = Annotated[HttpCheck | TcpCheck | AgentCheck, Field(discriminator="type")]
CHECK_TYPES = ("http", "tcp", "agent")


class Batches(BaseModel):
    """How the fleet is cut into batches (see rollout/plan.py for the exact arithmetic)."""

    model_config = _CONFIG

    canary: Amount = Field(
        default=Amount(1.0),
        description=(
            "Size of the first batch, run alone before any other. A percentage is rounded up. "
            "Capped at the fleet size and at `max_unavailable`. `0` = no canary batch."
        ),
    )
    size: PositiveAmount = Field(
        default=Amount(25.0, True),
        description=(
            "Size of each later batch. A percentage is rounded up; at least 1. Capped at "
            "`max_unavailable`."
        ),
    )
    max_unavailable: PositiveAmount = Field(
        default=Amount(25.0, True),
        description=(
            "Most nodes out of service at once, fleet-wide. A percentage is rounded down, but "
            "at least 1. Every batch, the canary included, is capped at it, because all nodes "
            "of a batch are out of service together."
        ),
    )
    spread_by: str | None = Field(
        default=None,
        min_length=1,
        description=(
            "A node label (for example `rack`). When set, each batch is filled round-robin "
            "across the label's values, so every batch draws evenly from each failure domain; "
            "nodes without the label form one more group. `null` = batches follow the "
            "inventory order."
        ),
    )


class Health(BaseModel):
    """When an activated node counts as healthy, and when as failed."""

    model_config = _CONFIG

    checks: tuple[Check, ...] = Field(
        default=(AgentCheck(),),
        min_length=1,
        description=(
            "Probes that must all pass in a round, each a mapping with a `type`: `http`, "
            "`tcp` or `agent`."
        ),
    )
    interval: Annotated[Duration, Field(gt=0)] = Field(
        default=1.0, description="Time between two rounds of checks on one node."
    )
    min_healthy_time: Annotated[Duration, Field(ge=0)] = Field(
        default=10.0,
        description=(
            "How long rounds must keep passing, without one failure, before the node is "
            "committed; a failed round restarts this clock."
        ),
    )
    deadline: Annotated[Duration, Field(gt=0)] = Field(
        default=300.0,
        description=(
            "Time, counted from when the node is back on the new image, to have been healthy "
            "for `min_healthy_time`; past it the node fails (`health_deadline`). Must be "
            "greater than `min_healthy_time`."
        ),
    )
    boot_timeout: Annotated[Duration, Field(gt=0)] = Field(
        default=120.0,
        description=(
            "Time, counted from activation, for the node to come back running the new image; "
            "past it the node fails (`boot_timeout`)."
        ),
    )
    failure_threshold: Int = Field(
        default=0,
        ge=0,
        description=(
            "Consecutive failed rounds, after the node is back, that fail it early "
            "(`unhealthy`). `0` = only the deadline fails a node."
        ),
    )

    @model_validator(mode="after")
    def _deadline_after_min_healthy_time(self) -> Health:
        if self.deadline <= self.min_healthy_time:
            raise FieldProblem(
                "deadline",
                f"must be greater than min_healthy_time ({fmt_duration(self.min_healthy_time)})"
                f", got {fmt_duration(self.deadline)}",
            )
        return self


FailureAction = Literal["halt", "rollback", "rollback-all", "continue"]


class Failure(BaseModel):
    """What the rollout does when nodes fail (defined precisely in docs/policies.md)."""

    model_config = _CONFIG

    max_failed: Amount = Field(
        default=Amount(0.0),
        description=(
            "Failed nodes tolerated over the whole rollout. A percentage is of the fleet size, "
            "rounded **down**. While failed nodes <= `max_failed` the rollout goes on; one "
            "more triggers `action`. `0` = the first failure triggers it."
        ),
    )
    action: FailureAction = Field(
        default="rollback",
        description=(
            "What happens once failed nodes exceed `max_failed`: `halt` (stop starting "
            "batches), `rollback` (return the failed batch to its previous image, then halt), "
            "`rollback-all` (return every node updated in this rollout), `continue` (carry "
            "on with the next batches; exit 1 at the end). Failed nodes themselves are always "
            "returned to their previous image."
        ),
    )


def _prestage_shorthand(value: object) -> object:
    return {"mode": value} if isinstance(value, str) else value


PrestageMode = Literal["none", "next-batch", "all"]


class Prestage(BaseModel):
    """Fetching or pushing images to later batches while earlier ones verify and bake."""

    model_config = _CONFIG

    mode: PrestageMode = Field(
        default="none",
        description=(
            "`none`: a node's image is staged when its batch starts. `next-batch`: while a "
            "batch runs (its gates included) the next batch's nodes stage. `all`: every later "
            "batch stages from the first batch on, earlier batches first. Activation stays in "
            "batch order; gates still decide."
        ),
    )
    max_concurrent: Annotated[Int, Field(ge=1)] = Field(
        default=10,
        description=(
            "Fleet-wide cap on pre-stage transfers in flight at once, so the registry is not "
            "hit by the whole fleet together."
        ),
    )
    bandwidth: Annotated[int, BeforeValidator(parse_rate), Field(gt=0)] | None = Field(
        default=None,
        description=(
            "Pull mode: each node's fetch of the image is paced to this rate (the agent paces "
            "its reads). `null` = as fast as the store serves."
        ),
    )


# ----- gates ---------------------------------------------------------------------------
# Documented in docs/policies.md ("Gates") and docs/gates.md; run by rollout.gates.

_GATE_NAME_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_URL_RE = re.compile(r"https?://[^\s/?#]+(?:[/?#]\S*)?")


def _gate_name(value: str) -> str:
    if not _GATE_NAME_RE.fullmatch(value):
        raise ValueError(
            'must be lowercase letters, digits and "-" (not at either end), at most 63 '
            f'characters, e.g. "canary-bake"; got {show(value)}'
        )
    return value


def _http_url(value: str) -> str:
    if not _URL_RE.fullmatch(value):
        raise ValueError(f"expected an http:// or https:// URL, got {show(value)}")
    return value


def _gate_after(value: object) -> object:
    if value in ("canary", "every"):
        return value
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise ValueError(f'expected "canary", "every" or a batch number >= 1, got {show(value)}')


# rollout.gates imports nothing at package level, so these imports cannot cycle; they
# are local to keep `import rollout.policy` as light as it was.
def _condition(value: str | None) -> str | None:
    from rollout.gates.expr import parse

    if value is not None:
        parse(value)  # ExprError is a ValueError: "column N: ..."
    return value


def _clock_value(value: object) -> object:
    from rollout.gates.window import parse_clock

    return parse_clock(value)


def _clock_end_value(value: object) -> object:
    from rollout.gates.window import parse_clock

    return parse_clock(value, allow_24=True)


def _days_value(value: object) -> object:
    from rollout.gates.window import parse_days

    return parse_days(value)


def _timezone_value(value: str) -> str:
    from rollout.gates.window import check_timezone

    return check_timezone(value)


GateName = Annotated[str, AfterValidator(_gate_name)]
HttpUrl = Annotated[str, AfterValidator(_http_url)]
GateAfter = Annotated[Literal["canary", "every"] | int, BeforeValidator(_gate_after)]
Condition = Annotated[str | None, AfterValidator(_condition)]
GateBefore = Literal["every", "after-canary"]

_NAME_DESCRIPTION = (
    "Unique among the gates: lowercase letters, digits and `-` (not at either end), at most "
    "63 characters. Used in the signal URL, `rollout approve`, events and metric labels."
)
_KIND_DESCRIPTION = (
    "Selects the gate: `bake`, `wait`, `approval`, `analysis` (they run after batches), "
    "`alerts`, `window` (they hold batches back before they start)."
)
_AFTER_DESCRIPTION = (
    "When the gate runs: after the `canary` batch (needs `batches.canary` > 0), after batch "
    "number N (the first batch is 1), or after `every` batch, the last one included."
)
_BEFORE_DESCRIPTION = (
    "Which batches wait for this condition before they start: `every` batch (the first "
    "included), or every batch `after-canary` (the canary starts without it; needs "
    "`batches.canary` > 0)."
)


class BakeGate(BaseModel):
    """Wait ``duration`` while health checks keep running on every updated node."""

    model_config = _CONFIG

    name: GateName = Field(description=_NAME_DESCRIPTION)
    kind: Literal["bake"] = Field(description=_KIND_DESCRIPTION)
    after: GateAfter = Field(description=_AFTER_DESCRIPTION)
    duration: Annotated[Duration, Field(gt=0)] = Field(
        description=(
            "How long to bake. Meanwhile every updated node is checked every "
            "`health.interval`; a node that turns unhealthy after it was counted healthy fails "
            "the gate."
        )
    )


class WaitGate(BaseModel):
    """A Heat-compatible wait condition: ``count`` SUCCESS signals on the gate's signal URL."""

    model_config = _CONFIG

    name: GateName = Field(description=_NAME_DESCRIPTION)
    kind: Literal["wait"] = Field(description=_KIND_DESCRIPTION)
    after: GateAfter = Field(description=_AFTER_DESCRIPTION)
    count: Int = Field(
        default=1,
        ge=1,
        description="SUCCESS signals with distinct ids needed (a repeated id counts once).",
    )
    timeout: Annotated[Duration, Field(gt=0)] = Field(
        default=3600.0,
        description=(
            "How long to wait for them; past it the gate fails (`timeout`). Any FAILURE "
            "signal fails it at once."
        ),
    )


class ApprovalGate(BaseModel):
    """Wait until a human approves (``rollout approve``) or rejects."""

    model_config = _CONFIG

    name: GateName = Field(description=_NAME_DESCRIPTION)
    kind: Literal["approval"] = Field(description=_KIND_DESCRIPTION)
    after: GateAfter = Field(description=_AFTER_DESCRIPTION)
    timeout: Annotated[Duration, Field(gt=0)] | None = Field(
        default=None,
        description=(
            "How long to wait for a decision; past it the gate fails (`timeout`). `null` = as "
            "long as it takes."
        ),
    )


class AnalysisGate(BaseModel):
    """Prometheus measurements judged by conditions, with Argo Rollouts' limits."""

    model_config = _CONFIG

    name: GateName = Field(description=_NAME_DESCRIPTION)
    kind: Literal["analysis"] = Field(description=_KIND_DESCRIPTION)
    after: GateAfter = Field(description=_AFTER_DESCRIPTION)
    prometheus: HttpUrl = Field(
        description="Base URL of the Prometheus server, e.g. `http://prometheus:9090`."
    )
    query: str = Field(
        min_length=1, description="PromQL instant query; each sample's value is `result`."
    )
    interval: Annotated[Duration, Field(gt=0)] = Field(
        default=60.0, description="Time between two measurements."
    )
    initial_delay: Annotated[Duration, Field(ge=0)] = Field(
        default=0.0, description="Time before the first measurement."
    )
    count: Int = Field(
        default=1, ge=1, description="Measurements to take (query errors do not count)."
    )
    success: Condition = Field(
        default=None,
        description=(
            "A measurement is successful when this condition holds (for a vector: for every "
            "sample), e.g. `result < 0.01`."
        ),
    )
    failure: Condition = Field(
        default=None,
        description=(
            "A measurement is failed when this condition holds (for a vector: for any "
            "sample), e.g. `result > 0.05`. At least one of `success` and `failure` is "
            "required."
        ),
    )
    failure_limit: Int = Field(
        default=0,
        ge=0,
        description=(
            "Failed measurements tolerated; one more fails the gate. Must be less than `count`."
        ),
    )
    inconclusive_limit: Int = Field(
        default=0,
        ge=0,
        description="Inconclusive measurements tolerated; one more makes the gate inconclusive.",
    )
    consecutive_error_limit: Int = Field(
        default=4,
        ge=0,
        description="Consecutive query errors tolerated; one more fails the gate.",
    )
    on_inconclusive: Literal["pause"] = Field(
        default="pause",
        description=(
            "What an inconclusive analysis does: `pause` the rollout until the gate is "
            "approved (go on) or rejected (the failure action)."
        ),
    )

    @model_validator(mode="after")
    def _needs_a_condition(self) -> AnalysisGate:
        if self.success is None and self.failure is None:
            raise FieldProblem(
                "success",
                "an analysis needs a success or a failure condition (or both), "
                'e.g. success: "result < 0.01"',
            )
        if self.failure_limit >= self.count:
            raise FieldProblem(
                "failure_limit",
                f"must be less than count ({self.count}), or no measurement could fail the "
                f"analysis; got {self.failure_limit}",
            )
        return self


class AlertsGate(BaseModel):
    """No batch starts while a matching Prometheus alert fires (checked before batches)."""

    model_config = _CONFIG

    name: GateName = Field(description=_NAME_DESCRIPTION)
    kind: Literal["alerts"] = Field(description=_KIND_DESCRIPTION)
    before: GateBefore = Field(default="every", description=_BEFORE_DESCRIPTION)
    prometheus: HttpUrl = Field(
        description="Base URL of the Prometheus server, e.g. `http://prometheus:9090`."
    )
    match: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "Labels a firing alert must all have, exactly, to block, e.g. "
            "`{severity: critical}`. `{}` = every firing alert blocks."
        ),
    )
    interval: Annotated[Duration, Field(gt=0)] = Field(
        default=30.0, description="Time between two looks at the alerts while blocked."
    )
    timeout: Annotated[Duration, Field(gt=0)] | None = Field(
        default=None,
        description=(
            "How long alerts may hold back one batch; past it the gate fails (`timeout`). "
            "`null` = until they clear."
        ),
    )


class WindowGate(BaseModel):
    """Batches start only inside a maintenance window (checked before batches)."""

    model_config = _CONFIG

    name: GateName = Field(description=_NAME_DESCRIPTION)
    kind: Literal["window"] = Field(description=_KIND_DESCRIPTION)
    before: GateBefore = Field(default="every", description=_BEFORE_DESCRIPTION)
    timezone: Annotated[str, AfterValidator(_timezone_value)] = Field(
        default="UTC", description="Zone of `start` and `end`, e.g. `Europe/Berlin`."
    )
    days: Annotated[tuple[str, ...], BeforeValidator(_days_value)] = Field(
        default=("mon", "tue", "wed", "thu", "fri", "sat", "sun"),
        description=(
            "Days a window opens on; a range may wrap over the weekend (`fri-mon`). Also a "
            'comma-separated string: `"mon-fri,sun"`.'
        ),
    )
    start: Annotated[str, BeforeValidator(_clock_value)] = Field(
        description=(
            "Local time the window opens, 24-hour clock. Quote it: YAML reads an unquoted "
            "22:00 as the number 1320."
        )
    )
    end: Annotated[str, BeforeValidator(_clock_end_value)] = Field(
        description=(
            "Local time it closes; at or before `start` means the next day (crossing "
            "midnight). Must differ from `start`."
        )
    )

    @model_validator(mode="after")
    def _not_empty(self) -> WindowGate:
        if self.start == self.end:
            raise FieldProblem(
                "end",
                f'must differ from start ({self.start}); for whole days write start "00:00", '
                'end "24:00"',
            )
        return self


Gate = Annotated[
    BakeGate | WaitGate | ApprovalGate | AnalysisGate | AlertsGate | WindowGate,
    Field(discriminator="kind"),
]
GATE_KINDS = ("bake", "wait", "approval", "analysis", "alerts", "window")
# How the problems of the two discriminated unions are worded.
TAGS: Tags = {"kind": ("gate kind", GATE_KINDS), "type": ("check type", CHECK_TYPES)}

NotifyEvent = Literal["started", "batch_done", "gate_waiting", "halted", "rolled_back", "succeeded"]
NOTIFY_EVENTS: tuple[NotifyEvent, ...] = (
    "started",
    "batch_done",
    "gate_waiting",
    "halted",
    "rolled_back",
    "succeeded",
)


class Notify(BaseModel):
    """A webhook: a JSON POST to ``url`` on each of ``events`` (see docs/gates.md)."""

    model_config = _CONFIG

    url: HttpUrl = Field(description="Where to POST.")
    events: tuple[NotifyEvent, ...] = Field(
        default=NOTIFY_EVENTS,
        min_length=1,
        description="Events to send.",
    )
    headers: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "Extra HTTP headers sent with each POST, e.g. for authentication: "
            '`{Authorization: "Bearer ..."}`.'
        ),
    )
    timeout: Annotated[Duration, Field(gt=0)] = Field(
        default=10.0, description="Time one delivery attempt may take."
    )


class Policy(BaseModel):
    """A whole policy file. Every section and field has a default: ``{}`` is a valid policy."""

    model_config = _CONFIG

    activation: ActivationMode = Field(
        default=ActivationMode.REBOOT,
        description=(
            "How an agent boots the staged image: `reboot` restarts the machine fully; "
            "`kexec` boots the new kernel directly, skipping the firmware (faster); "
            "`soft-reboot` restarts userspace only (pivot-root into the new image)."
        ),
    )
    batches: Batches = Field(
        default_factory=Batches, description="How the fleet is cut into batches."
    )
    health: Health = Field(
        default_factory=Health,
        description="When an updated node counts as healthy, and when as failed.",
    )
    failure: Failure = Field(
        default_factory=Failure,
        description="How many failed nodes the rollout tolerates, and what it does past that.",
    )
    gates: tuple[Gate, ...] = Field(
        default=(),
        description=(
            "What the rollout waits for between batches: gates after batches (`bake`, `wait`, "
            "`approval`, `analysis`) and conditions before them (`alerts`, `window`). "
            "`[]` = batches follow one another at once."
        ),
    )
    notify: tuple[Notify, ...] = Field(
        default=(),
        description=(
            "Webhooks: a JSON POST on each chosen rollout event, sent in the background; a "
            "failed delivery never stops the rollout."
        ),
    )
    prestage: Annotated[Prestage, BeforeValidator(_prestage_shorthand)] = Field(
        default_factory=Prestage,
        description=(
            "Stage later batches' images early, while earlier batches boot, verify and bake: "
            "a mode (short for `{mode: ...}`) or a mapping."
        ),
    )

    @model_validator(mode="after")
    def _gates_consistent(self) -> Policy:
        seen: dict[str, int] = {}
        for i, gate in enumerate(self.gates):
            if gate.name in seen:
                raise FieldProblem(
                    f"gates[{i}].name",
                    f"{show(gate.name)} is already the name of gates[{seen[gate.name]}]; "
                    "gate names must be unique",
                )
            seen[gate.name] = i
            field = "after" if hasattr(gate, "after") else "before"
            canary = getattr(gate, field) in ("canary", "after-canary")
            if canary and self.batches.canary.is_zero:
                raise FieldProblem(
                    f"gates[{i}].{field}",
                    f"{show(getattr(gate, field))} refers to the canary, but batches.canary "
                    "is 0 (no canary batch)",
                )
        return self


# ---------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------

_POLICY_DIR = Path(__file__).resolve().parent.parent / "policies"


def _shipped_policies() -> str:
    try:
        names = sorted(p.name for p in _POLICY_DIR.glob("*.yaml"))
    except OSError:  # pragma: no cover - unreadable install dir
        names = []
    if names:
        return f"copy one of the ready-made policies in {_POLICY_DIR}: {', '.join(names)}"
    return "copy one of the ready-made policies in policies/ (canary, cautious, fast .yaml)"


def load_policy(path: str | os.PathLike[str]) -> Policy:
    """Read a policy file; raise InputError with one line ``<file>: <field>: <problem>``."""
    data = read_yaml(path, kind="policy file", hint=_shipped_policies())
    return parse_policy(data, os.fspath(path))


def parse_policy(data: object, source: str) -> Policy:
    """Validate an already-parsed policy (a mapping); ``source`` names it in messages.

    >>> parse_policy({"batches": {"size": "50%"}}, "p.yaml").batches.size
    Amount(value=50.0, percent=True)
    >>> try:
    ...     parse_policy({"batches": {"sise": 2}}, "p.yaml")
    ... except InputError as exc:
    ...     print(exc)
    p.yaml: batches.sise: unknown field (known: canary, size, max_unavailable, spread_by)
    """
    top = ", ".join(Policy.model_fields)
    if data is None:
        raise InputError(
            f"{source}: the policy is empty; expected a mapping with any of: {top} "
            "(write {} to take every default)"
        )
    if not isinstance(data, Mapping):
        raise InputError(
            f"{source}: expected a mapping at the top level (with any of: {top}), got {show(data)}"
        )
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        raise InputError(validation_message(exc, Policy, source, TAGS)) from exc
