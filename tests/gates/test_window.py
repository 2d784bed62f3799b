"""Maintenance-window arithmetic: tables over weekdays, midnight crossings and DST days."""

from __future__ import annotations

import doctest
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

import rollout.gates.window
from rollout.gates.window import (
    WindowSpec,
    closes_at,
    is_open,
    local,
    next_open,
    parse_clock,
    parse_days,
)

BER = ZoneInfo("Europe/Berlin")
NY = ZoneInfo("America/New_York")
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri")
ALL = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def test_docstring_examples() -> None:
    result = doctest.testmod(rollout.gates.window)
    assert result.attempted > 0 and result.failed == 0


def b(year: int, month: int, day: int, hour: int, minute: int) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=BER)


NIGHT = WindowSpec("Europe/Berlin", WEEKDAYS, "22:00", "06:00")  # crosses midnight
DAY = WindowSpec("Europe/Berlin", WEEKDAYS, "09:00", "17:00")

# June 2024: Mon 3, Tue 4, ..., Fri 7, Sat 8, Sun 9, Mon 10.
OPEN_TABLE = [
    # spec, now, open?, next open, closes
    (DAY, b(2024, 6, 3, 8, 59), False, b(2024, 6, 3, 9, 0), None),
    (DAY, b(2024, 6, 3, 9, 0), True, b(2024, 6, 3, 9, 0), b(2024, 6, 3, 17, 0)),
    (DAY, b(2024, 6, 3, 16, 59), True, b(2024, 6, 3, 16, 59), b(2024, 6, 3, 17, 0)),
    (DAY, b(2024, 6, 3, 17, 0), False, b(2024, 6, 4, 9, 0), None),  # end is exclusive
    (DAY, b(2024, 6, 7, 17, 30), False, b(2024, 6, 10, 9, 0), None),  # Friday evening
    (DAY, b(2024, 6, 9, 12, 0), False, b(2024, 6, 10, 9, 0), None),  # Sunday
    (NIGHT, b(2024, 6, 3, 21, 59), False, b(2024, 6, 3, 22, 0), None),
    (NIGHT, b(2024, 6, 3, 23, 0), True, b(2024, 6, 3, 23, 0), b(2024, 6, 4, 6, 0)),
    (NIGHT, b(2024, 6, 4, 5, 59), True, b(2024, 6, 4, 5, 59), b(2024, 6, 4, 6, 0)),
    # Monday 03:00 belongs to Sunday's window, and Sunday is not listed:
    (NIGHT, b(2024, 6, 3, 3, 0), False, b(2024, 6, 3, 22, 0), None),
    # Saturday 03:00 belongs to Friday's window, which is listed:
    (NIGHT, b(2024, 6, 8, 3, 0), True, b(2024, 6, 8, 3, 0), b(2024, 6, 8, 6, 0)),
    (NIGHT, b(2024, 6, 8, 6, 0), False, b(2024, 6, 10, 22, 0), None),
    # the same instants given in another zone give the same answers
    (
        NIGHT,
        datetime(2024, 6, 8, 1, 0, tzinfo=UTC),
        True,
        datetime(2024, 6, 8, 1, 0, tzinfo=UTC),
        b(2024, 6, 8, 6, 0),
    ),
    # whole days touch: one window from Saturday 00:00 to Monday 00:00
    (
        WindowSpec("UTC", ("sat", "sun"), "00:00", "24:00"),
        datetime(2024, 6, 8, 12, tzinfo=UTC),
        True,
        datetime(2024, 6, 8, 12, tzinfo=UTC),
        datetime(2024, 6, 10, tzinfo=UTC),
    ),
    (
        WindowSpec("UTC", ALL, "00:00", "24:00"),
        datetime(2024, 6, 8, 12, tzinfo=UTC),
        True,
        datetime(2024, 6, 8, 12, tzinfo=UTC),
        datetime(2024, 6, 16, tzinfo=UTC),
    ),
    # (always open: closes_at looks one week ahead at most)
    # a window ending at 00:00 ends at the next midnight
    (
        WindowSpec("UTC", ("mon",), "20:00", "00:00"),
        datetime(2024, 6, 3, 23, 59, tzinfo=UTC),
        True,
        datetime(2024, 6, 3, 23, 59, tzinfo=UTC),
        datetime(2024, 6, 4, tzinfo=UTC),
    ),
]


@pytest.mark.parametrize(("spec", "now", "opened", "nxt", "closes"), OPEN_TABLE)
def test_open_next_close(
    spec: WindowSpec, now: datetime, opened: bool, nxt: datetime, closes: datetime | None
) -> None:
    assert is_open(now, spec) is opened
    assert next_open(now, spec) == nxt
    assert closes_at(now, spec) == closes


# Europe/Berlin: 2024-03-31 (Sun) 02:00 CET -> 03:00 CEST; 2024-10-27 (Sun) 03:00 -> 02:00.
DST_TABLE = [
    # a night window across spring-forward is 7 real hours (22:00 CET to 06:00 CEST)
    (
        WindowSpec("Europe/Berlin", ("sat",), "22:00", "06:00"),
        datetime(2024, 3, 30, 21, tzinfo=UTC),
        datetime(2024, 3, 31, 4, tzinfo=UTC),
    ),
    # ... and 9 real hours across fall-back (22:00 CEST to 06:00 CET)
    (
        WindowSpec("Europe/Berlin", ("sat",), "22:00", "06:00"),
        datetime(2024, 10, 26, 20, tzinfo=UTC),
        datetime(2024, 10, 27, 5, tzinfo=UTC),
    ),
    # a start skipped by spring-forward (02:30) moves later by the gap: 03:30 CEST
    (
        WindowSpec("Europe/Berlin", ("sun",), "02:30", "04:00"),
        datetime(2024, 3, 31, 1, 30, tzinfo=UTC),
        datetime(2024, 3, 31, 2, tzinfo=UTC),
    ),
    # a start that happens twice on fall-back day is its first occurrence (CEST)
    (
        WindowSpec("Europe/Berlin", ("sun",), "02:30", "04:00"),
        datetime(2024, 10, 27, 0, 30, tzinfo=UTC),
        datetime(2024, 10, 27, 3, tzinfo=UTC),
    ),
    # New York: 2024-03-10 02:00 EST -> 03:00 EDT
    (
        WindowSpec("America/New_York", ("sun",), "01:00", "05:00"),
        datetime(2024, 3, 10, 6, tzinfo=UTC),
        datetime(2024, 3, 10, 9, tzinfo=UTC),
    ),
]


@pytest.mark.parametrize(("spec", "opens_utc", "closes_utc"), DST_TABLE)
def test_dst_days(spec: WindowSpec, opens_utc: datetime, closes_utc: datetime) -> None:
    just_before = opens_utc - timedelta(minutes=1)
    assert not is_open(just_before, spec)
    assert next_open(just_before, spec) == opens_utc
    assert is_open(opens_utc, spec)
    assert closes_at(opens_utc, spec) == closes_utc
    assert not is_open(closes_utc, spec)


def test_times_skipped_by_spring_forward_move_later_by_the_gap() -> None:
    # 02:05-02:55 does not exist on 2024-03-31 in Berlin: it becomes 03:05-03:55 CEST.
    spec = WindowSpec("Europe/Berlin", ("sun",), "02:05", "02:55")
    nxt = next_open(datetime(2024, 3, 30, 12, tzinfo=UTC), spec)
    assert nxt == datetime(2024, 3, 31, 1, 5, tzinfo=UTC) and nxt.tzinfo is UTC
    assert closes_at(nxt, spec) == datetime(2024, 3, 31, 1, 55, tzinfo=UTC)


def test_window_emptied_by_the_clock_change_is_skipped() -> None:
    # 02:30 moves to 03:30 CEST, after the 03:15 end: no window that Sunday.
    spec = WindowSpec("Europe/Berlin", ("sun",), "02:30", "03:15")
    nxt = next_open(datetime(2024, 3, 30, 12, tzinfo=UTC), spec)
    assert nxt == datetime(2024, 4, 7, 2, 30, tzinfo=BER)


def test_new_york_next_open_on_dst_day() -> None:
    spec = WindowSpec("America/New_York", ALL, "03:00", "04:00")
    nxt = next_open(datetime(2024, 3, 10, 5, tzinfo=UTC), spec)  # 00:00 EST
    assert nxt == datetime(2024, 3, 10, 7, tzinfo=UTC)  # 03:00 EDT
    assert local(nxt, spec) == "2024-03-10T03:00-04:00"


def test_naive_now_is_refused() -> None:
    with pytest.raises(ValueError, match="aware"):
        is_open(datetime(2024, 6, 3, 12), DAY)


@pytest.mark.parametrize(
    ("raw", "days"),
    [
        (["mon"], ("mon",)),
        (["MON-Fri"], WEEKDAYS),
        ("sat,sun", ("sat", "sun")),
        (["fri-mon"], ("mon", "fri", "sat", "sun")),
        (["sun", "mon", "sun"], ("mon", "sun")),
        (["mon-sun"], ALL),
    ],
)
def test_parse_days(raw: object, days: tuple[str, ...]) -> None:
    assert parse_days(raw) == days


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ([], "must not be empty"),
        (["monday"], 'unknown day "monday"'),
        (["mon-xyz"], 'unknown day "mon-xyz"'),
        ([1], "expected a day name"),
        (5, "expected a list of days"),
    ],
)
def test_parse_days_errors(raw: object, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_days(raw)


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (1320, "in quotes"),
        ("25:00", 'expected a time "HH:MM"'),
        ("12:60", 'expected a time "HH:MM"'),
        ("24:00", "only allowed as an end"),
        ("noon", 'expected a time "HH:MM"'),
        (None, 'expected a time like "22:00", got null'),
    ],
)
def test_parse_clock_errors(raw: object, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_clock(raw)


def test_parse_clock_end_of_day() -> None:
    assert parse_clock("24:00", allow_24=True) == "24:00"
    with pytest.raises(ValueError, match="hours must be"):
        parse_clock("24:30", allow_24=True)
