"""Running gates: `run_gate` for one gate, `wait_before_batch` for the batch conditions.

The engine calls, for each batch of the plan::

    outcome = await wait_before_batch(schedule.before_batch(policy.gates, batch), ctx)
    ... run the batch; if the failure policy says continue:
    for gate in schedule.after_batch(policy.gates, batch):
        outcome = await run_gate(gate, ctx)
        if outcome.result == "inconclusive":          # analysis, on_inconclusive: pause
            outcome = await resolve_inconclusive(gate, ctx)   # rollout paused for a human
        if outcome.result != "passed": ... the failure action (policy.failure.action)

What each kind does (the outcome's ``result`` in brackets):

- ``bake``: waits ``duration``; every ``ctx.health_interval`` it calls
  ``ctx.recheck_health()``, which returns the updated nodes that turned unhealthy after
  they were counted healthy. Any such node ends the bake at once [failed]; else [passed]
  after exactly ``duration``.
- ``wait``: ``ctx.signals(name).wait(count, timeout)`` [passed | failed at the first
  FAILURE | timeout]. Signals sent before the gate starts count.
- ``approval``: ``ctx.approvals(name).wait(timeout)`` [passed when approved | failed when
  rejected | timeout].
- ``analysis``: `rollout.gates.analysis.run_analysis` against
  ``ctx.prometheus(gate.prometheus)`` [passed | failed (also: too many query errors) |
  inconclusive].
- ``alerts``: waits until no matching alert fires [passed | timeout].
- ``window``: waits until the maintenance window is open, on ``ctx.wall_now()``
  [passed | failed if it never opens].

Every gate that waits emits `GateWaiting` first (which gate, since, until, why) and
`GateFinished` at the end; gates never raise for a verdict. A before-batch condition that
holds at once emits nothing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal, Protocol

import aiohttp

from rollout import clock
from rollout.gates import alerts as alerts_mod
from rollout.gates import window as window_mod
from rollout.gates.analysis import Phase, run_analysis
from rollout.gates.events import (
    GateApproval,
    GateEvent,
    GateFinished,
    GateMeasured,
    GateSignal,
    GateWaiting,
)
from rollout.gates.prometheus import PrometheusAPI, PrometheusClient
from rollout.gates.signals import ApprovalBox, GateBoxes, SignalBox
from rollout.policy import (
    AlertsGate,
    AnalysisGate,
    ApprovalGate,
    BakeGate,
    Gate,
    WaitGate,
    WindowGate,
)

__all__ = [
    "GateContext",
    "GateEnv",
    "GateOutcome",
    "GateResult",
    "resolve_inconclusive",
    "run_gate",
    "wait_before_batch",
]

GateResult = Literal["passed", "failed", "inconclusive", "timeout"]

# Longest single sleep while waiting for a window: the wall clock is read again after it,
# so a clock step (NTP, suspend) delays a batch by at most this much.
WINDOW_RECHECK = 300.0


@dataclass(frozen=True)
class GateOutcome:
    result: GateResult
    message: str
    data: Mapping[str, object] = field(default_factory=dict)
    gate: str = ""
    kind: str = ""

    @property
    def passed(self) -> bool:
        return self.result == "passed"


class GateContext(Protocol):
    """What gates need from the engine. `GateEnv` is a ready implementation."""

    @property
    def rollout_id(self) -> str: ...

    @property
    def session(self) -> aiohttp.ClientSession: ...

    @property
    def health_interval(self) -> float:
        """Seconds between two health rechecks during a bake (policy.health.interval)."""
        ...

    def signals(self, gate: str) -> SignalBox: ...

    def approvals(self, gate: str) -> ApprovalBox: ...

    def recheck_health(self) -> Awaitable[list[str]]:
        """Ids of updated nodes that turned unhealthy after they were counted healthy."""
        ...

    def emit(self, event: GateEvent) -> None: ...

    def wall_now(self) -> datetime:
        """The wall clock, aware (UTC); windows and event times read it."""
        ...

    def prometheus(self, url: str) -> PrometheusAPI: ...


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass
class GateEnv:
    """A `GateContext` from plain values: what the engine builds once per rollout."""

    rollout_id: str
    session: aiohttp.ClientSession
    recheck: Callable[[], Awaitable[list[str]]]
    on_event: Callable[[GateEvent], None] = lambda event: None
    health_interval: float = 1.0
    boxes: GateBoxes = field(default_factory=GateBoxes)
    wall_clock: Callable[[], datetime] = utc_now
    prometheus_api: Callable[[str], PrometheusAPI] | None = None

    def signals(self, gate: str) -> SignalBox:
        return self.boxes.signals(gate)

    def approvals(self, gate: str) -> ApprovalBox:
        return self.boxes.approvals(gate)

    def recheck_health(self) -> Awaitable[list[str]]:
        return self.recheck()

    def emit(self, event: GateEvent) -> None:
        self.on_event(event)

    def wall_now(self) -> datetime:
        return self.wall_clock()

    def prometheus(self, url: str) -> PrometheusAPI:
        if self.prometheus_api is not None:
            return self.prometheus_api(url)
        return PrometheusClient(self.session, url)


# ----- one gate ----------------------------------------------------------------------------


def _now(ctx: GateContext) -> datetime:
    """The context's wall clock in UTC (same-zone datetimes would add and subtract as wall
    times, wrong across a DST change)."""
    return ctx.wall_now().astimezone(UTC)


def _fmt(seconds: float) -> str:
    return f"{seconds:g}s"


def _finish(ctx: GateContext, gate: Gate, outcome: GateOutcome) -> GateOutcome:
    done = GateOutcome(outcome.result, outcome.message, outcome.data, gate.name, gate.kind)
    ctx.emit(GateFinished(gate.name, gate.kind, done.result, done.message))
    return done


def _waiting(
    ctx: GateContext, gate: Gate, since: datetime, seconds: float | None, reason: str
) -> None:
    until = None if seconds is None else since + timedelta(seconds=seconds)
    ctx.emit(GateWaiting(gate.name, gate.kind, since, until, reason))


async def run_gate(gate: Gate, ctx: GateContext) -> GateOutcome:
    """Run one gate to its outcome (see the module docstring)."""
    if isinstance(gate, BakeGate):
        outcome = await _bake(gate, ctx)
    elif isinstance(gate, WaitGate):
        outcome = await _wait(gate, ctx)
    elif isinstance(gate, ApprovalGate):
        outcome = await _approval(gate, ctx)
    elif isinstance(gate, AnalysisGate):
        outcome = await _analysis(gate, ctx)
    elif isinstance(gate, AlertsGate):
        outcome = await _alerts(gate, ctx, None)
    elif isinstance(gate, WindowGate):
        outcome = await _window(gate, ctx)
    else:  # pragma: no cover - the policy schema allows no other kind
        raise TypeError(f"unknown gate {gate!r}")
    return _finish(ctx, gate, outcome)


async def _bake(gate: BakeGate, ctx: GateContext) -> GateOutcome:
    _waiting(
        ctx,
        gate,
        _now(ctx),
        gate.duration,
        f"baking for {_fmt(gate.duration)} while updated nodes stay health-checked",
    )
    end = clock.now() + gate.duration
    rechecks = 0
    interval = max(ctx.health_interval, 0.001)
    while (remaining := end - clock.now()) > 0:
        await clock.sleep(min(interval, remaining))
        unhealthy = await ctx.recheck_health()
        rechecks += 1
        if unhealthy:
            names = ", ".join(sorted(unhealthy))
            return GateOutcome(
                "failed",
                f"node(s) turned unhealthy during the bake: {names}",
                {"unhealthy": sorted(unhealthy), "rechecks": rechecks},
            )
    return GateOutcome(
        "passed",
        f"baked {_fmt(gate.duration)}; every updated node stayed healthy",
        {"rechecks": rechecks},
    )


async def _wait(gate: WaitGate, ctx: GateContext) -> GateOutcome:
    _waiting(
        ctx,
        gate,
        _now(ctx),
        gate.timeout,
        f"waiting for {gate.count} SUCCESS signal(s) on "
        f"/v1/rollouts/{ctx.rollout_id}/gates/{gate.name}/signal",
    )
    result = await ctx.signals(gate.name).wait(
        gate.count, gate.timeout, lambda s: ctx.emit(GateSignal(gate.name, s))
    )
    data = {
        "signals": [s.to_json() for s in result.signals],
        "success_ids": list(result.success_ids),
    }
    status: GateResult = {"success": "passed", "failure": "failed", "timeout": "timeout"}[
        result.status
    ]  # type: ignore[assignment]
    return GateOutcome(status, result.message, data)


async def _approval(gate: ApprovalGate, ctx: GateContext) -> GateOutcome:
    _waiting(ctx, gate, _now(ctx), gate.timeout, "waiting for approval (rollout approve)")
    decision = await ctx.approvals(gate.name).wait(
        gate.timeout, lambda a: ctx.emit(GateApproval(gate.name, a))
    )
    if decision is None:
        return GateOutcome("timeout", f"no approval within {_fmt(gate.timeout or 0)}")
    data = {"by": decision.by, "reason": decision.reason}
    if decision.approved:
        return GateOutcome("passed", f"approved by {decision.by}", data)
    why = f": {decision.reason}" if decision.reason else ""
    return GateOutcome("failed", f"rejected by {decision.by}{why}", data)


async def _analysis(gate: AnalysisGate, ctx: GateContext) -> GateOutcome:
    expected = gate.initial_delay + (gate.count - 1) * gate.interval
    _waiting(
        ctx,
        gate,
        _now(ctx),
        expected,
        f"analysing {gate.count} measurement(s) of {gate.query!r}, every {_fmt(gate.interval)}",
    )
    api = ctx.prometheus(gate.prometheus)
    verdict = await run_analysis(gate, api.query, lambda m: ctx.emit(GateMeasured(gate.name, m)))
    data: dict[str, object] = {"phase": str(verdict.phase), **verdict.counts()}
    if verdict.phase is Phase.SUCCESSFUL:
        return GateOutcome("passed", verdict.message, data)
    if verdict.phase is Phase.INCONCLUSIVE:
        return GateOutcome("inconclusive", verdict.message, data)
    return GateOutcome("failed", verdict.message, data)


async def resolve_inconclusive(gate: Gate, ctx: GateContext) -> GateOutcome:
    """After an inconclusive analysis (``on_inconclusive: pause``): wait for a human.

    ``rollout approve`` on the gate continues the rollout [passed]; a rejection fails the
    gate [failed] (the failure action follows). Emits GateWaiting and GateFinished.
    """
    _waiting(
        ctx,
        gate,
        _now(ctx),
        None,
        "analysis inconclusive: paused until approved (go on) or rejected (fail)",
    )
    decision = await ctx.approvals(gate.name).wait(
        None, lambda a: ctx.emit(GateApproval(gate.name, a))
    )
    assert decision is not None  # no timeout
    data = {"by": decision.by, "reason": decision.reason}
    if decision.approved:
        outcome = GateOutcome("passed", f"inconclusive analysis approved by {decision.by}", data)
    else:
        why = f": {decision.reason}" if decision.reason else ""
        outcome = GateOutcome(
            "failed", f"inconclusive analysis rejected by {decision.by}{why}", data
        )
    return _finish(ctx, gate, outcome)


async def _alerts(gate: AlertsGate, ctx: GateContext, timeout: float | None) -> GateOutcome:
    since = _now(ctx)
    api = ctx.prometheus(gate.prometheus)
    limit = gate.timeout if timeout is None else timeout

    def blocked(found: object, reason: str) -> None:
        _waiting(ctx, gate, since, limit, reason)

    result = await alerts_mod.wait_clear(api, gate.match, gate.interval, limit, blocked)
    data = {"alerts": [a.describe() for a in result.blocking], "waited": result.waited}
    if result.cleared:
        return GateOutcome("passed", "no matching alert fires", data)
    return GateOutcome(
        "timeout", f"still blocked after {_fmt(gate.timeout or 0)}: {result.reason}", data
    )


def _window_text(gate: WindowGate) -> str:
    return f"{','.join(gate.days)} {gate.start}-{gate.end} {gate.timezone}"


async def _window(gate: WindowGate, ctx: GateContext) -> GateOutcome:
    since = _now(ctx)
    announced: datetime | None = None
    while True:
        now = _now(ctx)
        if window_mod.is_open(now, gate):
            closes = window_mod.closes_at(now, gate)
            return GateOutcome(
                "passed",
                f"inside the window {_window_text(gate)}",
                {"closes": window_mod.local(closes, gate) or None},
            )
        opens = window_mod.next_open(now, gate)
        if opens is None:
            return GateOutcome("failed", f"the window {_window_text(gate)} never opens")
        if opens != announced:
            announced = opens
            ctx.emit(
                GateWaiting(
                    gate.name,
                    gate.kind,
                    since,
                    opens,
                    f"outside the maintenance window {_window_text(gate)}; "
                    f"waiting until {window_mod.local(opens, gate)}",
                )
            )
        delta = (opens - now).total_seconds()
        await clock.sleep(min(max(delta, 0.001), WINDOW_RECHECK))


# ----- before a batch ----------------------------------------------------------------------


async def _holds(gate: Gate, ctx: GateContext) -> bool:
    """One look at a before-batch condition, without waiting and without events."""
    if isinstance(gate, WindowGate):
        return window_mod.is_open(_now(ctx), gate)
    if isinstance(gate, AlertsGate):
        _, reason = await alerts_mod.check(ctx.prometheus(gate.prometheus), gate.match)
        return not reason
    raise TypeError(f"gate {gate.name} ({gate.kind}) is not a before-batch condition")


async def wait_before_batch(gates: Sequence[Gate], ctx: GateContext) -> GateOutcome:
    """Wait until every condition holds at the same time; passed, or the first that gave up.

    Conditions are looked at in policy order; the first that does not hold is waited for
    (with its events), then all are looked at again, since a window may have closed while
    alerts fired. An alerts gate's ``timeout`` counts its blocked time over this whole call.
    """
    blocked_for: dict[str, float] = {}
    while True:
        waited = False
        for gate in gates:
            if await _holds(gate, ctx):
                continue
            waited = True
            if isinstance(gate, AlertsGate):
                start = clock.now()
                left = None
                if gate.timeout is not None:
                    left = max(0.0, gate.timeout - blocked_for.get(gate.name, 0.0))
                outcome = await _alerts(gate, ctx, left)
                blocked_for[gate.name] = blocked_for.get(gate.name, 0.0) + clock.now() - start
                outcome = _finish(ctx, gate, outcome)
            elif isinstance(gate, WindowGate):
                outcome = _finish(ctx, gate, await _window(gate, ctx))
            else:
                raise TypeError(f"gate {gate.name} ({gate.kind}) is not a before-batch condition")
            if not outcome.passed:
                return outcome
            break  # look at every condition again
        if not waited:
            names = ", ".join(g.name for g in gates)
            return GateOutcome("passed", f"conditions hold: {names}" if gates else "no conditions")
