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
- Durations are plain ``float`` seconds once validated (`parse_duration` accepts ``5s``,
  ``500ms``, ``1h30m`` ...), so the engine never sees a unit.
- Counts that may be relative to the fleet are `Amount` values: a count (``3``) or a
  percentage (``"25%"``). The policy keeps them unresolved; the planner and the decision
  function resolve them against the fleet size, each with its documented rounding.
- Every problem becomes one `InputError` with a single line
  ``<file>: <field.path>: <problem>``, e.g.
  ``policies/x.yaml: batches.size: expected a count or a percentage like "25%", got "lots"``.
  `validation_message` turns pydantic's ValidationError into that line; inventory.py
  reuses it, together with `read_yaml`, so both files report errors alike.

Nothing here does I/O except `load_policy` / `read_yaml` reading the one file they are given.
"""

from __future__ import annotations

import json
import math
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from fractions import Fraction
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    ValidationError,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import core_schema

from rollout.errors import InputError
from rollout.model import ActivationMode

__all__ = [
    "GATE_KINDS",
    "NOTIFY_EVENTS",
    "AgentCheck",
    "AlertsGate",
    "Amount",
    "AnalysisGate",
    "ApprovalGate",
    "BakeGate",
    "Batches",
    "Check",
    "Failure",
    "FailureAction",
    "FieldProblem",
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
    "parse_duration",
    "parse_policy",
    "read_yaml",
    "show",
    "validation_message",
]

# ---------------------------------------------------------------------------------------
# Field problems with a precise location
# ---------------------------------------------------------------------------------------


class FieldProblem(ValueError):
    """A ValueError raised by a model-level validator about one of the model's fields.

    pydantic places model-level errors at the model itself; `validation_message` appends
    ``field`` to the location so the message points at the field the user must change.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def show(value: object) -> str:
    """How a user's value is quoted in messages: YAML-ish, short, one line.

    >>> show("lots"), show(3), show(True), show(None), show([1, 2])
    ('"lots"', '3', 'true', 'null', 'a list')
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return type(value).__name__


# ---------------------------------------------------------------------------------------
# Amount: a count or a percentage of the fleet
# ---------------------------------------------------------------------------------------

_COUNT_RE = re.compile(r"\d+")
_PERCENT_RE = re.compile(r"(\d+(?:\.\d+)?)\s*%")
_AMOUNT_HINT = 'expected a count or a percentage like "25%"'


@dataclass(frozen=True)
class Amount:
    """A number of nodes, either absolute (``3``) or relative to the fleet (``"25%"``).

    ``value`` is the count or the percentage; ``percent`` says which. Counts are whole
    numbers >= 0; percentages lie in (0, 100]. Usable directly as a pydantic field type:
    it validates from ``3``, ``"3"`` or ``"25%"`` and serialises back to ``3`` / ``"25%"``.

    >>> quarter = Amount.parse("25%")
    >>> quarter.resolve(10, round_up=True), quarter.resolve(10, round_up=False)
    (3, 2)
    >>> Amount.parse(3).resolve(10, round_up=True), str(Amount.parse("12.5%"))
    (3, '12.5%')
    """

    value: float
    percent: bool = False

    @classmethod
    def parse(cls, raw: object) -> Amount:
        """Read ``3``, ``"3"`` or ``"25%"``; ValueError (with a user-facing message) otherwise."""
        if isinstance(raw, Amount):
            return raw
        if isinstance(raw, bool):
            raise ValueError(f"{_AMOUNT_HINT}, got {show(raw)}")
        if isinstance(raw, float):
            if not raw.is_integer():
                raise ValueError(
                    f'a count must be a whole number, got {show(raw)} (use a percentage like "25%")'
                )
            raw = int(raw)
        if isinstance(raw, int):
            if raw < 0:
                raise ValueError(f"must not be negative, got {raw}")
            return cls(float(raw), False)
        if isinstance(raw, str):
            text = raw.strip()
            if _COUNT_RE.fullmatch(text):
                return cls(float(int(text)), False)
            m = _PERCENT_RE.fullmatch(text)
            if m:
                pct = float(m.group(1))
                if not 0 < pct <= 100:
                    raise ValueError(
                        f"a percentage must be more than 0% and at most 100%, got {show(raw)}"
                    )
                return cls(pct, True)
        raise ValueError(f"{_AMOUNT_HINT}, got {show(raw)}")

    def resolve(self, total: int, *, round_up: bool) -> int:
        """The number of nodes this amount means in a fleet of ``total``.

        Percentages are taken of ``total`` and rounded up (ceil) or down (floor), computed
        exactly (10% of 30 is 3, not 3.0000000004 rounded up to 4). Counts are returned
        as they are: capping them at the fleet size is the caller's business.

        >>> quarter = Amount(25, True)
        >>> quarter.resolve(10, round_up=True), quarter.resolve(10, round_up=False)
        (3, 2)
        >>> Amount(5).resolve(2, round_up=False)
        5
        """
        if not self.percent:
            return int(self.value)
        exact = Fraction(str(self.value)) * total / 100
        return math.ceil(exact) if round_up else math.floor(exact)

    @property
    def is_zero(self) -> bool:
        return self.value == 0

    def to_yaml(self) -> int | str:
        """The form a user writes: ``3`` or ``"25%"``."""
        if not self.percent:
            return int(self.value)
        return f"{self.value:g}%"

    def __str__(self) -> str:
        return str(self.to_yaml())

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            cls.parse,
            serialization=core_schema.plain_serializer_function_ser_schema(
                lambda a: a.to_yaml(), return_schema=core_schema.any_schema()
            ),
        )

    @classmethod
    def __get_pydantic_json_schema__(
        cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {
            "anyOf": [
                {"type": "integer", "minimum": 0},
                {"type": "string", "pattern": r"^\d+(\.\d+)?%$"},
            ]
        }


def _positive(amount: Amount) -> Amount:
    if amount.is_zero:
        raise ValueError("must be greater than 0 (a batch needs at least one node)")
    return amount


PositiveAmount = Annotated[Amount, AfterValidator(_positive)]

# ---------------------------------------------------------------------------------------
# Durations
# ---------------------------------------------------------------------------------------

_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_RE = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h))+")
_DURATION_PART_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_DURATION_HINT = 'expected a duration like "500ms", "5s", "2m" or "1h30m"'


def parse_duration(value: object) -> float:
    """Seconds from a number of seconds or a string with units ``h``, ``m``, ``s``, ``ms``.

    Units may be combined (``1h30m``); a bare number (or numeric string) is seconds.
    Negative, infinite and non-numeric values raise ValueError with a user-facing message.

    >>> [parse_duration(v) for v in ("500ms", "1.5s", "2m", "1h30m")]
    [0.5, 1.5, 120.0, 5400.0]
    >>> parse_duration(3), parse_duration("10")
    (3.0, 10.0)
    """
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, bool):
        raise ValueError(f"{_DURATION_HINT}, got {show(value)}")
    elif isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        sign = -1.0 if text.startswith("-") else 1.0
        body = text.removeprefix("-").strip()
        if re.fullmatch(r"\d+(?:\.\d+)?", body):
            seconds = sign * float(body)
        elif _DURATION_RE.fullmatch(body):
            seconds = sign * sum(
                float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART_RE.findall(body)
            )
        else:
            raise ValueError(f"{_DURATION_HINT}, got {show(value)}")
    else:
        raise ValueError(f"{_DURATION_HINT}, got {show(value)}")
    if not math.isfinite(seconds):
        raise ValueError(f"{_DURATION_HINT}, got {show(value)}")
    if seconds < 0:
        raise ValueError(f"must not be negative, got {show(value)}")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]


def fmt_duration(seconds: float) -> str:
    """Short human form for messages.

    >>> fmt_duration(90), fmt_duration(0.5)
    ('90s', '500ms')
    """
    if 0 < seconds < 1:
        return f"{seconds * 1000:g}ms"
    return f"{seconds:g}s"


# ---------------------------------------------------------------------------------------
# The schema
# ---------------------------------------------------------------------------------------

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


_RATE_RE = re.compile(r"(?P<n>\d+(?:\.\d+)?)\s*(?P<unit>[KMG]i?B|B)/s")
_RATE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9,
               "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}  # fmt: skip


def parse_rate(value: object) -> object:
    """A bandwidth like ``50MiB/s`` or ``10 MB/s`` to bytes per second (ints pass through).

    >>> parse_rate("50MiB/s"), parse_rate("1.5 MB/s"), parse_rate(4096)
    (52428800, 1500000, 4096)
    """
    if isinstance(value, str):
        m = _RATE_RE.fullmatch(value.strip())
        if not m:
            raise ValueError(
                f"expected a rate such as 50MiB/s, 10MB/s or 512KiB/s, got {show(value)}"
            )
        return int(float(m.group("n")) * _RATE_UNITS[m.group("unit")])
    return value


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
# Loading and error messages
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


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (YAML keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:
                continue  # unhashable key: let the base class report it
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {show(key)}", key_node.start_mark
                )
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | os.PathLike[str], *, kind: str, hint: str = "") -> object:
    """Read and parse one YAML file; every failure is a one-line InputError naming the file.

    ``kind`` names the file in messages ("policy file"); ``hint`` is appended to the
    "no such file" message.
    """
    source = os.fspath(path)
    try:
        text = Path(source).read_text(encoding="utf-8")
    except FileNotFoundError:
        tail = f"; {hint}" if hint else ""
        raise InputError(f"{source}: no such {kind}{tail}") from None
    except IsADirectoryError:
        raise InputError(f"{source}: is a directory, expected a {kind}") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"{source}: not a UTF-8 text file ({exc.reason})") from None
    except OSError as exc:
        raise InputError(f"{source}: cannot read {kind}: {exc.strerror or exc}") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = " ".join(str(exc.problem or exc.context or "invalid YAML").split())
        if exc.context and exc.problem:
            problem = f"{' '.join(exc.context.split())}: {problem}"
        start = exc.context_mark
        if start is not None and mark is not None and start.line != mark.line:
            problem += f" (it began at line {start.line + 1}, column {start.column + 1})"
        raise InputError(f"{source}: {where}invalid YAML: {problem}") from None
    except yaml.YAMLError as exc:
        raise InputError(f"{source}: invalid YAML: {' '.join(str(exc).split())}") from None


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
        raise InputError(validation_message(exc, Policy, source)) from exc


# ----- ValidationError -> one line ------------------------------------------------------


def _unwrap(tp: Any) -> Any:
    """Strip Annotated[...] and Optional[...] wrappers down to the interesting type."""
    while True:
        origin = typing.get_origin(tp)
        if origin is Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) == 1:
                tp = args[0]
            else:
                return tp
        else:
            return tp


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _walk(root: type[BaseModel], loc: tuple[int | str, ...]) -> tuple[str, Any]:
    """Human path for a pydantic ``loc`` and the type found at its parent.

    Discriminator tags that pydantic inserts into the location (``checks.0.http.port``)
    are dropped from the path (``checks[0].port``).
    """
    path = ""
    tp: Any = root
    parent: Any = None
    for part in loc:
        tp = _unwrap(tp)
        parent = tp
        if isinstance(part, int) and not _is_model(tp):
            path += f"[{part}]"
            args = typing.get_args(tp)
            tp = args[0] if args else None
            continue
        if typing.get_origin(tp) in (Union, types.UnionType):
            for member in typing.get_args(tp):
                field = (
                    (member.model_fields.get("type") or member.model_fields.get("kind"))
                    if _is_model(member)
                    else None
                )
                if field is not None and part in typing.get_args(field.annotation):
                    tp = member
                    break
            else:
                tp = None
            continue  # a tag: not part of the user's path
        if typing.get_origin(tp) in (dict, Mapping) or tp is dict:
            path += f".{part}" if path else str(part)
            args = typing.get_args(tp)
            tp = args[1] if len(args) == 2 else None
            continue
        path += f".{part}" if path else str(part)
        if _is_model(tp) and isinstance(part, str) and part in tp.model_fields:
            tp = tp.model_fields[part].annotation
        else:
            tp = None
    return path, _unwrap(parent) if parent is not None else None


def _problem(err: Mapping[str, Any], parent: Any) -> tuple[str, str]:
    """(extra path, problem) for one pydantic error dict."""
    kind: str = err["type"]
    ctx: Mapping[str, Any] = err.get("ctx") or {}
    got = err.get("input")
    if kind == "value_error" and isinstance(ctx.get("error"), FieldProblem):
        exc: FieldProblem = ctx["error"]
        return exc.field, str(exc)
    if kind in ("value_error", "assertion_error"):
        return "", str(ctx.get("error", err["msg"]))
    if kind == "extra_forbidden":
        known = ", ".join(parent.model_fields) if _is_model(parent) else ""
        return "", f"unknown field (known: {known})" if known else "unknown field"
    if kind == "missing":
        return "", "required field missing"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        gate = ctx.get("discriminator") == "'kind'"
        what, key = ("gate kind", "kind") if gate else ("check type", "type")
        tags = ", ".join(GATE_KINDS if gate else CHECK_TYPES)
        if kind == "union_tag_not_found":
            return "", f'missing "{key}" (allowed: {tags})'
        return "", f"unknown {what} {show(ctx.get('tag'))} (allowed: {tags})"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return "", f"expected a mapping, got {show(got)}"
    if kind in ("list_type", "tuple_type"):
        return "", f"expected a list, got {show(got)}"
    if kind == "too_short":
        return "", "must not be empty"
    if kind in ("string_type", "str_type"):
        return "", f"expected a string, got {show(got)}"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return "", f"expected a whole number, got {show(got)}"
    if kind in ("float_type", "float_parsing", "bool_type", "bool_parsing"):
        return "", f"{err['msg'].lower()}, got {show(got)}"
    if kind in ("literal_error", "enum"):
        allowed = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        return "", f"expected one of: {', '.join(allowed)}; got {show(got)}"
    if kind == "invalid_key":
        return "", f"keys must be strings, got {show(got)}"
    if kind == "string_too_short":
        return "", "must not be empty"
    if kind == "string_pattern_mismatch":
        return "", f"{show(got)} does not match {ctx.get('pattern')}"
    comparisons = {
        "greater_than": ("gt", "greater than"),
        "greater_than_equal": ("ge", "at least"),
        "less_than": ("lt", "less than"),
        "less_than_equal": ("le", "at most"),
    }
    if kind in comparisons:
        key, words = comparisons[kind]
        return "", f"must be {words} {ctx.get(key)}, got {show(got)}"
    return "", f"{err['msg']}, got {show(got)}"


def validation_message(exc: ValidationError, root: type[BaseModel], source: str) -> str:
    """The first error of ``exc`` as one line: ``<source>: <field.path>: <problem>``."""
    err = exc.errors(include_url=False)[0]
    loc: tuple[int | str, ...] = tuple(err["loc"])
    path, parent = _walk(root, loc)
    extra, problem = _problem(err, parent)
    if extra:
        path = f"{path}.{extra}" if path else extra
    problem = " ".join(problem.split())  # never more than one line
    return f"{source}: {path}: {problem}" if path else f"{source}: {problem}"
