"""The healthy-for-long-enough tracker (pure) as tables of observations."""

from __future__ import annotations

import pytest

from rollout.health import HealthTracker, Verdict

P, H, U, D = Verdict.PENDING, Verdict.HEALTHY, Verdict.UNHEALTHY, Verdict.DEADLINE


@pytest.mark.parametrize(
    ("min_healthy", "deadline", "threshold", "rounds", "expected"),
    [
        # healthy only after holding min_healthy_time continuously
        (3, 10, 0, [(0, True), (1, True), (2, True), (3, True)], [P, P, P, H]),
        # a failed round resets the streak
        (3, 10, 0, [(0, True), (1, False), (2, True), (5, True)], [P, P, P, H]),
        (0, 10, 0, [(0, True)], [H]),
        # consecutive failures fail early; a pass in between resets the count
        (
            3,
            10,
            3,
            [(0, False), (1, False), (2, True), (3, False), (4, False), (5, False)],
            [P, P, P, P, P, U],
        ),
        # the deadline passes before the streak is long enough
        (3, 4, 0, [(0, False), (2, True), (4, True)], [P, P, D]),
        # healthy wins over the deadline when both hold in the same round
        (2, 4, 0, [(2, True), (4, True)], [P, H]),
    ],
)
def test_tracker(
    min_healthy: float,
    deadline: float,
    threshold: int,
    rounds: list[tuple[float, bool]],
    expected: list[Verdict],
) -> None:
    t = HealthTracker(started=0, min_healthy_time=min_healthy, deadline=deadline,
                      failure_threshold=threshold)  # fmt: skip
    assert [t.observe(now, ok) for now, ok in rounds] == expected


@pytest.mark.parametrize(
    ("rounds", "now", "due"),
    [
        ([], 1.0, 9.0),  # never passed: only the deadline (10 s)
        ([(2.0, True)], 2.5, 2.5),  # passing since 2: healthy at 5
        ([(2.0, True), (3.0, False)], 3.0, 7.0),  # a failure: the deadline again
        ([(9.0, True)], 9.5, 0.5),  # the deadline comes before 12
        ([(2.0, True)], 6.0, 0.0),  # past due: never negative
    ],
    ids=["failing", "passing", "reset", "deadline_first", "past_due"],
)
def test_until_due(rounds: list[tuple[float, bool]], now: float, due: float) -> None:
    t = HealthTracker(started=0, min_healthy_time=3, deadline=10)
    for at, ok in rounds:
        t.observe(at, ok)
    assert t.until_due(now) == pytest.approx(due)
