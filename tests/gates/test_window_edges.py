"""Edges of maintenance windows, found by `make mutate`: minutes past the hour, a zone
whose date is a day ahead of UTC, a window emptied by a spring-forward change, ranges
that wrap over the weekend, and the exact refusals.

Windows are compiled through an lru_cache: each case starts with it empty, so it compiles
its window itself (and mutation testing, which forks after a first run, sees that).
"""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from rollout.gates import window
from rollout.gates.window import (
    WindowSpec,
    closes_at,
    is_open,
    local,
    next_open,
    parse_clock,
    parse_days,
)

ALL = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


@pytest.fixture(autouse=True)
def compile_afresh() -> None:
    window._compile.cache_clear()


def test_minutes_past_the_hour_count() -> None:
    spec = WindowSpec("Asia/Kolkata", ALL, "09:30", "17:45")  # UTC+05:30
    kolkata = ZoneInfo("Asia/Kolkata")
    at = datetime(2024, 6, 3, 9, 29, tzinfo=kolkata)
    assert not is_open(at, spec)
    assert local(next_open(at, spec), spec) == "2024-06-03T09:30+05:30"
    assert is_open(datetime(2024, 6, 3, 17, 44, tzinfo=kolkata), spec)
    assert local(closes_at(datetime(2024, 6, 3, 12, 0, tzinfo=kolkata), spec), spec) == (
        "2024-06-03T17:45+05:30"
    )
    assert not is_open(datetime(2024, 6, 3, 17, 45, tzinfo=kolkata), spec)


def test_the_local_date_decides_not_the_utc_one() -> None:
    # Tuesday 07:00 in Auckland (UTC+12 in June) is still Monday 19:00 in UTC.
    spec = WindowSpec("Pacific/Auckland", ("tue",), "06:00", "12:00")
    now = datetime(2024, 6, 3, 19, 0, tzinfo=UTC)
    assert is_open(now, spec)
    opens = next_open(now, spec)
    assert opens == now and opens is not None and opens.tzinfo is UTC  # answers are in UTC


def test_a_window_emptied_by_spring_forward_is_skipped() -> None:
    # Europe/Berlin skips 02:00-03:00 on 2024-03-31: that night's window is empty.
    spec = WindowSpec("Europe/Berlin", ALL, "02:00", "03:00")
    berlin = ZoneInfo("Europe/Berlin")
    before = datetime(2024, 3, 31, 0, 30, tzinfo=berlin)
    assert local(next_open(before, spec), spec) == "2024-04-01T02:00+02:00"


def test_local_of_nothing_is_empty() -> None:
    assert local(None, WindowSpec("UTC", ALL, "01:00", "02:00")) == ""


def test_naive_now_is_refused() -> None:
    with pytest.raises(ValueError, match=r"^now must be an aware datetime \(with a time zone\)$"):
        is_open(datetime(2024, 6, 3, 12, 0), WindowSpec("UTC", ALL, "03:00", "04:00"))


@pytest.mark.parametrize(
    ("value", "days"),
    [
        ("fri-mon", ("mon", "fri", "sat", "sun")),
        (["sat-tue"], ("mon", "tue", "sat", "sun")),
        (["sun-sun", "wed"], ("wed", "sun")),
    ],
)
def test_day_ranges_wrap_over_the_weekend(value: object, days: tuple[str, ...]) -> None:
    assert parse_days(value) == days


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (5, "expected a list of days like [mon-fri, sun], got 5"),
        ({"mon": 1}, "expected a list of days like [mon-fri, sun], got a mapping"),
        ([1], "expected a day name like mon or a range like mon-fri, got 1"),
        ([["mon"]], "expected a day name like mon or a range like mon-fri, got a list"),
    ],
)
def test_day_refusals(value: object, message: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_days(value)
    assert str(err.value) == message


@pytest.mark.parametrize(
    ("value", "allow_24", "message"),
    [
        (1.5, False, 'expected a time like "22:00", got 1.5'),
        (["22:00"], False, 'expected a time like "22:00", got a list'),
        ({}, False, 'expected a time like "22:00", got a mapping'),
        ("24:30", True, 'hours must be 00-23 (or 24:00 to end at midnight), got "24:30"'),
        (
            "24:00",
            False,
            "hours must be 00-23 (or 24:00 to end at midnight); 24:00 is only allowed as an "
            'end, got "24:00"',
        ),
    ],
)
def test_clock_refusals(value: object, allow_24: bool, message: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_clock(value, allow_24=allow_24)
    assert str(err.value) == message
