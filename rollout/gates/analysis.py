"""Prometheus analysis with Argo Rollouts semantics: a pure verdict, and the measuring loop.

One measurement runs the query once and is judged (`judge`) as:

- **successful** / **failed** by the conditions, as Argo Rollouts does:

  ==================  ===========================================================
  conditions given    measurement is
  ==================  ===========================================================
  success only        successful if it holds, else failed
  failure only        failed if it holds, else successful
  both                failed if failure holds; else successful if success holds;
                      else **inconclusive**
  ==================  ===========================================================

  A query may return several series (a vector): the success condition must hold for
  *every* sample, the failure condition holds if it holds for *any* sample.
- **inconclusive** also when the query returns no sample at all (nothing to judge);
- **error** when the query fails (unreachable after retries, HTTP error, bad query).

`assess` folds the measurements so far into a `Verdict`, checked in this order after each
measurement: *failed* once failed > failure_limit, *inconclusive* once inconclusive >
inconclusive_limit, *error* once consecutive errors > consecutive_error_limit, and
*successful* once ``count`` measurements that are not errors were taken; otherwise still
*running*. (Unlike Argo, errors do not count towards ``count``: an analysis never passes
on fewer than ``count`` real measurements.)

`run_analysis` waits ``initial_delay``, measures, and waits ``interval`` between two
measurements through `rollout.clock.sleep`, so with no errors it takes exactly
``initial_delay + (count - 1) * interval`` plus the query time.

Worked example, success ``result < 0.05``, count 3, failure_limit 1::

    0.01 -> successful   (running: 1 of 3)
    0.09 -> failed       (running: 1 failed, limit 1)
    0.02 -> successful   -> successful (3 measurements, 1 failed <= 1)
"""

from __future__ import annotations

import enum
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from rollout import clock
from rollout.gates.expr import Condition, parse
from rollout.gates.prometheus import PrometheusError, Sample

__all__ = [
    "AnalysisLike",
    "Measurement",
    "Phase",
    "Verdict",
    "assess",
    "judge",
    "run_analysis",
]


class Phase(enum.StrEnum):
    RUNNING = "running"
    SUCCESSFUL = "successful"
    FAILED = "failed"
    INCONCLUSIVE = "inconclusive"
    ERROR = "error"


class AnalysisLike(Protocol):
    """The fields of the policy's AnalysisGate that the analysis uses."""

    @property
    def query(self) -> str: ...
    @property
    def interval(self) -> float: ...
    @property
    def initial_delay(self) -> float: ...
    @property
    def count(self) -> int: ...
    @property
    def success(self) -> str | None: ...
    @property
    def failure(self) -> str | None: ...
    @property
    def failure_limit(self) -> int: ...
    @property
    def inconclusive_limit(self) -> int: ...
    @property
    def consecutive_error_limit(self) -> int: ...


@dataclass(frozen=True)
class Measurement:
    """One judged query: its phase (never running), the sample values, and why."""

    phase: Phase
    values: tuple[float, ...]
    message: str
    at: float = 0.0  # loop clock seconds when it was taken

    def to_json(self) -> dict[str, object]:
        return {
            "phase": str(self.phase),
            "values": [v if math.isfinite(v) else str(v) for v in self.values],
            "message": self.message,
            "at": self.at,
        }


@dataclass(frozen=True)
class Verdict:
    phase: Phase
    measured: int  # measurements that were not errors
    successful: int
    failed: int
    inconclusive: int
    errors: int
    consecutive_errors: int
    message: str

    def counts(self) -> dict[str, int]:
        return {
            "measured": self.measured,
            "successful": self.successful,
            "failed": self.failed,
            "inconclusive": self.inconclusive,
            "errors": self.errors,
        }


def _fmt(values: Sequence[float]) -> str:
    shown = ", ".join(f"{v:.6g}" for v in values[:5])
    more = f", ... ({len(values)} samples)" if len(values) > 5 else ""
    return f"[{shown}{more}]"


def judge(values: Sequence[float], success: Condition | None, failure: Condition | None) -> Phase:
    """The phase of one measurement (module docstring table).

    >>> ok, bad = parse("result < 0.05"), parse("result > 0.1")
    >>> [str(judge(v, ok, None)) for v in ([0.01], [0.07])]
    ['successful', 'failed']
    >>> [str(judge(v, ok, bad)) for v in ([0.07], [0.01, 0.2], [])]
    ['inconclusive', 'failed', 'inconclusive']
    """
    if success is None and failure is None:
        raise ValueError("an analysis needs a success or a failure condition")
    if not values:
        return Phase.INCONCLUSIVE
    failing = failure is not None and any(failure.holds(v) for v in values)
    passing = success is not None and all(success.holds(v) for v in values)
    if failure is None:
        return Phase.SUCCESSFUL if passing else Phase.FAILED
    if success is None:
        return Phase.FAILED if failing else Phase.SUCCESSFUL
    if failing:
        return Phase.FAILED
    return Phase.SUCCESSFUL if passing else Phase.INCONCLUSIVE


def measurement(
    values: Sequence[float], success: Condition | None, failure: Condition | None, at: float
) -> Measurement:
    """Judge sample values into a Measurement with a readable message."""
    phase = judge(values, success, failure)
    if not values:
        message = "the query returned no samples"
    elif phase is Phase.FAILED and failure is not None and any(failure.holds(v) for v in values):
        message = f"{_fmt(values)}: failure condition {failure} holds"
    elif phase is Phase.FAILED:
        message = f"{_fmt(values)}: success condition {success} does not hold"
    elif phase is Phase.SUCCESSFUL:
        message = f"{_fmt(values)}: " + (
            f"success condition {success} holds"
            if success is not None
            else f"failure condition {failure} does not hold"
        )
    else:
        message = f"{_fmt(values)}: neither {success} nor {failure} decides"
    return Measurement(phase, tuple(values), message, at)


def assess(measurements: Sequence[Measurement], spec: AnalysisLike) -> Verdict:
    """Fold measurements into a verdict (pure).

    >>> from types import SimpleNamespace as S
    >>> spec = S(count=3, failure_limit=1, inconclusive_limit=0, consecutive_error_limit=4)
    >>> m = lambda p: Measurement(Phase(p), (), "")
    >>> assess([m("successful"), m("failed")], spec).phase
    <Phase.RUNNING: 'running'>
    >>> assess([m("successful"), m("failed"), m("successful")], spec).phase
    <Phase.SUCCESSFUL: 'successful'>
    >>> assess([m("failed"), m("failed")], spec).phase
    <Phase.FAILED: 'failed'>
    """
    successful = failed = inconclusive = errors = consecutive = 0
    for m in measurements:
        if m.phase is Phase.ERROR:
            errors += 1
            consecutive += 1
            continue
        consecutive = 0
        if m.phase is Phase.SUCCESSFUL:
            successful += 1
        elif m.phase is Phase.FAILED:
            failed += 1
        elif m.phase is Phase.INCONCLUSIVE:
            inconclusive += 1
    measured = successful + failed + inconclusive
    last = measurements[-1].message if measurements else ""
    if failed > spec.failure_limit:
        phase = Phase.FAILED
        message = f"{failed} failed measurement(s), {spec.failure_limit} tolerated; last: {last}"
    elif inconclusive > spec.inconclusive_limit:
        phase = Phase.INCONCLUSIVE
        message = (
            f"{inconclusive} inconclusive measurement(s), {spec.inconclusive_limit} tolerated; "
            f"last: {last}"
        )
    elif consecutive > spec.consecutive_error_limit:
        phase = Phase.ERROR
        message = (
            f"{consecutive} consecutive query errors, {spec.consecutive_error_limit} "
            f"tolerated; last: {last}"
        )
    elif measured >= spec.count:
        phase = Phase.SUCCESSFUL
        message = (
            f"{successful} of {measured} measurement(s) successful "
            f"({failed} failed, {inconclusive} inconclusive, {errors} error(s))"
        )
    else:
        phase = Phase.RUNNING
        message = f"{measured} of {spec.count} measurement(s) taken"
    return Verdict(phase, measured, successful, failed, inconclusive, errors, consecutive, message)


Query = Callable[[str], Awaitable[tuple[Sample, ...]]]


async def run_analysis(
    spec: AnalysisLike,
    query: Query,
    on_measurement: Callable[[Measurement], None] | None = None,
) -> Verdict:
    """Measure until `assess` decides; ``query`` is e.g. `PrometheusClient.query`."""
    success = parse(spec.success) if spec.success else None
    failure = parse(spec.failure) if spec.failure else None
    if spec.initial_delay > 0:
        await clock.sleep(spec.initial_delay)
    taken: list[Measurement] = []
    while True:
        at = clock.now()
        try:
            samples = await query(spec.query)
        except PrometheusError as exc:
            m = Measurement(Phase.ERROR, (), f"query failed: {exc}", at)
        else:
            m = measurement([s.value for s in samples], success, failure, at)
        taken.append(m)
        if on_measurement is not None:
            on_measurement(m)
        verdict = assess(taken, spec)
        if verdict.phase is not Phase.RUNNING:
            return verdict
        await clock.sleep(spec.interval)
