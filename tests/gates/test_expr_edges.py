"""Edges of the condition language and the analysis verdict, found by `make mutate`.

The nesting limit is counted per level and unwound after each group, whatever opened it
(a parenthesis, ``not``, ``-``, ``isNaN(``); the length limit is inclusive; errors carry
their column; each measurement says why it was judged so, and `assess` and
`run_analysis` report exact counts, messages and times.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest

from rollout import clock
from rollout.gates.analysis import (
    Measurement,
    Phase,
    Verdict,
    assess,
    judge,
    measurement,
    run_analysis,
)
from rollout.gates.expr import MAX_DEPTH, MAX_LENGTH, ExprError, parse
from rollout.gates.prometheus import PrometheusError, Sample


def nested(levels: int) -> str:
    return "(" * levels + "result < 1" + ")" * levels


@pytest.mark.parametrize(
    "first",
    ["(result < 1)", "not result < 1", "-result < 1", "isNaN(result)", "result < 1"],
)
def test_every_group_gives_its_level_back(first: str) -> None:
    parse(f"{first} and {nested(MAX_DEPTH)}")
    parse(f"{first} and {first} and {nested(MAX_DEPTH)}")
    with pytest.raises(ExprError, match=rf"nested more than {MAX_DEPTH} levels deep"):
        parse(f"{first} and {nested(MAX_DEPTH + 1)}")


def test_the_nesting_limit_is_inclusive() -> None:
    assert parse(nested(MAX_DEPTH)).holds(0)
    with pytest.raises(ExprError) as err:
        parse(nested(MAX_DEPTH + 1))
    assert (err.value.column, err.value.problem) == (
        MAX_DEPTH + 2,
        f"nested more than {MAX_DEPTH} levels deep",
    )
    assert parse("not " * MAX_DEPTH + "result < 1").holds(0)  # an even number of nots
    assert parse("-" * MAX_DEPTH + "result < 1").holds(0)


def test_the_length_limit_is_inclusive() -> None:
    source = "result < 1".ljust(MAX_LENGTH)
    assert parse(source).holds(0)
    with pytest.raises(ExprError) as err:
        parse(source + " ")
    assert str(err.value) == f"column {MAX_LENGTH + 1}: longer than {MAX_LENGTH} characters"


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (5, "column 1: expected a condition as text, got int"),
        ("X", 'column 1: unknown name "X" (known: result, isNaN, and, or, not)'),
        ("result < 1 1", 'column 12: expected "and", "or" or the end, got "1"'),
        ("result 1", 'column 8: expected a comparison (< <= > >= == !=), got "1"'),
        ("result or result < 1", 'column 8: expected a comparison (< <= > >= == !=) before "or"'),
        ("-(result < 1)", 'column 2: "-" takes a number, not a condition'),
        ("isNaN(result", 'column 13: expected ")" to close the "(" at column 6, got the end'),
        ("(result < 1", 'column 12: expected ")" to close the "(" at column 1, got the end'),
    ],
)
def test_errors_name_their_column(source: object, message: str) -> None:
    with pytest.raises(ExprError) as err:
        parse(source)  # type: ignore[arg-type]
    assert str(err.value) == message
    column, problem = message.removeprefix("column ").split(": ", 1)
    assert (err.value.column, err.value.problem) == (int(column), problem)


def test_values_in_any_position_and_spacing() -> None:
    assert parse("1 < result").holds(2)
    assert parse("\tresult\r\n<\n1 ").holds(0)
    assert not parse("result > 1").holds(1)
    assert parse("result >= 1").holds(1)


# -- the analysis verdict --------------------------------------------------------------------
@dataclass(frozen=True)
class Spec:
    """The fields of an analysis gate that `assess` reads."""

    count: int = 3
    failure_limit: int = 0
    inconclusive_limit: int = 0
    consecutive_error_limit: int = 1
    query: str = "q"
    interval: float = 60.0
    initial_delay: float = 0.0
    success: str | None = "result < 1"
    failure: str | None = None


def m_(phase: Phase, message: str = "") -> Measurement:
    return Measurement(phase, (), message or str(phase))


OK, BAD, MEH, ERR = Phase.SUCCESSFUL, Phase.FAILED, Phase.INCONCLUSIVE, Phase.ERROR


@pytest.mark.parametrize(
    ("phases", "expected"),
    [
        ([], Verdict(Phase.RUNNING, 0, 0, 0, 0, 0, 0, "0 of 3 measurement(s) taken")),
        ([OK, ERR], Verdict(Phase.RUNNING, 1, 1, 0, 0, 1, 1, "1 of 3 measurement(s) taken")),
        ([ERR, OK, ERR], Verdict(Phase.RUNNING, 1, 1, 0, 0, 2, 1,
                                 "1 of 3 measurement(s) taken")),
        ([ERR, ERR], Verdict(Phase.ERROR, 0, 0, 0, 0, 2, 2,
                             "2 consecutive query errors, 1 tolerated; last: error")),
        ([OK, BAD], Verdict(Phase.FAILED, 2, 1, 1, 0, 0, 0,
                            "1 failed measurement(s), 0 tolerated; last: failed")),
        ([OK, MEH], Verdict(Phase.INCONCLUSIVE, 2, 1, 0, 1, 0, 0,
                            "1 inconclusive measurement(s), 0 tolerated; last: inconclusive")),
        ([OK, ERR, OK, OK], Verdict(Phase.SUCCESSFUL, 3, 3, 0, 0, 1, 0,
                                    "3 of 3 measurement(s) successful (0 failed, 0 "
                                    "inconclusive, 1 error(s))")),
    ],
)  # fmt: skip
def test_assess(phases: list[Phase], expected: Verdict) -> None:
    assert assess([m_(p) for p in phases], Spec()) == expected


def test_assess_tolerates_up_to_the_limits() -> None:
    lenient = Spec(count=4, failure_limit=1, inconclusive_limit=1)
    verdict = assess([m_(OK), m_(BAD), m_(MEH), m_(OK)], lenient)
    assert (verdict.phase, verdict.measured) == (Phase.SUCCESSFUL, 4)


def test_judge() -> None:
    low, high = parse("result < 0.01"), parse("result > 0.1")
    assert judge([0.001], low, None) is Phase.SUCCESSFUL
    assert judge([0.5], None, high) is Phase.FAILED
    assert judge([0.05], None, high) is Phase.SUCCESSFUL
    assert judge([0.05], low, high) is Phase.INCONCLUSIVE
    assert judge([0.001], low, high) is Phase.SUCCESSFUL
    assert judge([0.001, 0.05], low, high) is Phase.INCONCLUSIVE  # success must hold for all
    assert judge([], low, high) is Phase.INCONCLUSIVE
    with pytest.raises(ValueError, match=r"^an analysis needs a success or a failure condition$"):
        judge([1.0], None, None)


LOW, HIGH = "result < 0.01", "result > 0.1"


@pytest.mark.parametrize(
    ("values", "success", "failure", "phase", "message"),
    [
        ([], LOW, None, Phase.INCONCLUSIVE, "the query returned no samples"),
        ([0.5], None, HIGH, Phase.FAILED, "[0.5]: failure condition result > 0.1 holds"),
        ([0.5], LOW, None, Phase.FAILED,
         "[0.5]: success condition result < 0.01 does not hold"),
        ([0.001], LOW, HIGH, Phase.SUCCESSFUL, "[0.001]: success condition result < 0.01 holds"),
        ([0.05], None, HIGH, Phase.SUCCESSFUL,
         "[0.05]: failure condition result > 0.1 does not hold"),
        ([0.05], LOW, HIGH, Phase.INCONCLUSIVE,
         "[0.05]: neither result < 0.01 nor result > 0.1 decides"),
        ([0.001, 0.5], LOW, HIGH, Phase.FAILED,
         "[0.001, 0.5]: failure condition result > 0.1 holds"),
        ([1, 2, 3, 4, 5], LOW, None, Phase.FAILED,
         "[1, 2, 3, 4, 5]: success condition result < 0.01 does not hold"),
        ([1, 2, 3, 4, 5, 6.5], LOW, None, Phase.FAILED,
         "[1, 2, 3, 4, 5, ... (6 samples)]: success condition result < 0.01 does not hold"),
    ],
)  # fmt: skip
def test_measurement_messages(
    values: list[float], success: str | None, failure: str | None, phase: Phase, message: str
) -> None:
    judged = measurement(
        values,
        parse(success) if success else None,
        parse(failure) if failure else None,
        at=42.5,
    )
    assert judged == Measurement(phase, tuple(values), message, 42.5)


def test_measurement_and_verdict_as_data() -> None:
    m = Measurement(Phase.FAILED, (0.5, math.inf, math.nan), "why", 12.5)
    assert m.to_json() == {
        "phase": "failed",
        "values": [0.5, "inf", "nan"],
        "message": "why",
        "at": 12.5,
    }
    lenient = Spec(count=5, inconclusive_limit=2)
    verdict = assess([m_(OK), m_(MEH), m_(ERR), m_(MEH)], lenient)
    assert verdict.counts() == {
        "measured": 3,
        "successful": 1,
        "failed": 0,
        "inconclusive": 2,
        "errors": 1,
    }


@pytest.mark.looptime
async def test_run_analysis_records_every_measurement() -> None:
    asked: list[str] = []
    answers: list[tuple[float, ...] | None] = [(0.001,), None, (0.002, 0.003)]

    async def query(q: str) -> tuple[Sample, ...]:
        asked.append(q)
        values = answers.pop(0)
        if values is None:
            raise PrometheusError("HTTP 503")
        return tuple(Sample(v) for v in values)

    spec = Spec(count=2, interval=30.0, initial_delay=10.0, query="up", success=LOW, failure=None)
    seen: list[Measurement] = []
    start = clock.now()
    verdict = await run_analysis(spec, query, seen.append)
    assert asked == ["up"] * 3
    assert [(m.phase, m.values, m.message, m.at - start) for m in seen] == [
        (OK, (0.001,), "[0.001]: success condition result < 0.01 holds", 10.0),
        (ERR, (), "query failed: HTTP 503", 40.0),
        (OK, (0.002, 0.003), "[0.002, 0.003]: success condition result < 0.01 holds", 70.0),
    ]
    assert (verdict.phase, verdict.measured, verdict.errors) == (Phase.SUCCESSFUL, 2, 1)


@pytest.mark.looptime
@pytest.mark.parametrize("delay", [0.0, 0.5])
async def test_run_analysis_waits_exactly_its_initial_delay(delay: float) -> None:
    async def query(q: str) -> tuple[Sample, ...]:
        return (Sample(0.5),)

    spec = Spec(count=1, initial_delay=delay, success=None, failure=HIGH)
    start = clock.now()
    verdict = await run_analysis(spec, query)
    assert (verdict.phase, clock.now() - start) == (Phase.FAILED, delay)
