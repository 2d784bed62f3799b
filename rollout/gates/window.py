"""Maintenance windows: when a batch may start, on the wall clock of a time zone.

A window is a daily time range on some days of the week, in an IANA time zone::

    {timezone: Europe/Berlin, days: [mon-fri], start: "22:00", end: "06:00"}

Definitions (all pure; ``now`` is an aware datetime, never the machine's local time):

- On each listed day D (the local date in ``timezone``) the window opens at ``start`` on D
  and closes at ``end`` on D, or on D+1 when ``end`` <= ``start`` (crossing midnight).
  ``days`` name the day a window *opens*: ``fri`` with 22:00-06:00 is Friday 22:00 to
  Saturday 06:00. ``end`` may be ``"24:00"`` (midnight at the end of D).
- Open means ``opens <= now < closes``.
- Answers are UTC datetimes: comparing aware datetimes of different zones is unreliable
  for times in a fall-back hour (PEP 495), and UTC never is. Show them with `local`.
- Daylight saving time: local times are turned into instants with zoneinfo. A local time
  skipped by a spring-forward change (02:30 in Europe/Berlin on the last Sunday of March)
  is moved later by the length of the gap (03:30), as java.time does; a local time that
  happens twice on a fall-back day is the first occurrence. A window whose end falls at
  or before its start after this is empty that day. Hence a 22:00-06:00 window lasts 7 h
  on the night clocks spring forward and 9 h on the night they fall back.

Worked example (Europe/Berlin, mon-fri 22:00-06:00):

>>> from datetime import datetime
>>> from zoneinfo import ZoneInfo
>>> spec = WindowSpec("Europe/Berlin", ("mon", "tue", "wed", "thu", "fri"), "22:00", "06:00")
>>> berlin = ZoneInfo("Europe/Berlin")
>>> sat = datetime(2024, 6, 1, 3, 0, tzinfo=berlin)      # Saturday 03:00: Friday's window
>>> is_open(sat, spec), local(closes_at(sat, spec), spec)
(True, '2024-06-01T06:00+02:00')
>>> local(next_open(datetime(2024, 6, 1, 12, 0, tzinfo=berlin), spec), spec)  # Sat noon
'2024-06-03T22:00+02:00'
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from functools import lru_cache
from typing import Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

__all__ = [
    "DAYS",
    "Window",
    "WindowLike",
    "WindowSpec",
    "check_timezone",
    "closes_at",
    "compile_window",
    "is_open",
    "local",
    "next_open",
    "parse_clock",
    "parse_days",
]

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_CLOCK_RE = re.compile(r"([01]?\d|2[0-4]):([0-5]\d)")


class WindowLike(Protocol):
    """What a window needs: the policy's WindowGate has these attributes."""

    @property
    def timezone(self) -> str: ...
    @property
    def days(self) -> tuple[str, ...]: ...
    @property
    def start(self) -> str: ...
    @property
    def end(self) -> str: ...


@dataclass(frozen=True)
class WindowSpec:
    """A plain window value (tests, examples); the policy's WindowGate works the same."""

    timezone: str
    days: tuple[str, ...]
    start: str
    end: str


# ----- validation helpers (used by rollout.policy) ---------------------------------------


def parse_days(value: object) -> tuple[str, ...]:
    """Day names and ranges -> the listed days in week order.

    Accepts a list (or a comma-separated string) of ``mon`` ... ``sun`` and ranges such as
    ``mon-fri`` or ``fri-mon`` (wrapping over the weekend). Case-insensitive.

    >>> parse_days(["mon-wed", "sun"]), parse_days("fri-mon")
    (('mon', 'tue', 'wed', 'sun'), ('mon', 'fri', 'sat', 'sun'))
    """
    if isinstance(value, str):
        items: list[object] = [p for p in value.split(",")]
    elif isinstance(value, list | tuple):
        items = list(value)
    else:
        raise ValueError(f"expected a list of days like [mon-fri, sun], got {_show(value)}")
    if not items:
        raise ValueError("must not be empty (list the days the window opens on)")
    chosen: set[int] = set()
    for item in items:
        if not isinstance(item, str):
            raise ValueError(
                f"expected a day name like mon or a range like mon-fri, got {_show(item)}"
            )
        text = item.strip().lower()
        first, sep, last = text.partition("-")
        a, b = _day(first, item), _day(last, item) if sep else None
        if b is None:
            chosen.add(a)
        else:
            i = a
            while True:
                chosen.add(i)
                if i == b:
                    break
                i = (i + 1) % 7
    return tuple(DAYS[i] for i in sorted(chosen))


def _day(text: str, item: str) -> int:
    text = text.strip()
    if text in DAYS:
        return DAYS.index(text)
    raise ValueError(f"unknown day {_show(item)} (days: {', '.join(DAYS)}; ranges like mon-fri)")


def parse_clock(value: object, *, allow_24: bool = False) -> str:
    """A local time of day ``"HH:MM"`` (24-hour clock) -> normalised ``"HH:MM"``.

    YAML 1.1 reads an unquoted ``22:00`` as the number 1320, so numbers are refused with a
    hint to quote the time.

    >>> parse_clock("9:05"), parse_clock("24:00", allow_24=True)
    ('09:05', '24:00')
    """
    if isinstance(value, bool) or not isinstance(value, str):
        if isinstance(value, int) and not isinstance(value, bool):
            return _raise(
                f'expected a time like "22:00" in quotes (YAML reads an unquoted 22:00 as '
                f"the number {value}), got {value}"
            )
        return _raise(f'expected a time like "22:00", got {_show(value)}')
    m = _CLOCK_RE.fullmatch(value.strip())
    if not m:
        return _raise(f'expected a time "HH:MM" (24-hour clock), got {_show(value)}')
    hours, minutes = int(m.group(1)), int(m.group(2))
    if hours == 24 and (minutes or not allow_24):
        hint = "; 24:00 is only allowed as an end" if not allow_24 else ""
        return _raise(
            f"hours must be 00-23 (or 24:00 to end at midnight){hint}, got {_show(value)}"
        )
    return f"{hours:02d}:{minutes:02d}"


def check_timezone(value: str) -> str:
    """An IANA time zone name known to zoneinfo, e.g. ``Europe/Berlin`` or ``UTC``."""
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f'unknown time zone {_show(value)} (use an IANA name like "Europe/Berlin" or "UTC")'
        ) from None
    return value


def _raise(message: str) -> str:
    raise ValueError(message)


def _show(value: object) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    if value is None:
        return "null"
    return repr(value)


# ----- the arithmetic ------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """A compiled window: zone, weekday numbers (Monday 0), start and end in minutes."""

    tz: ZoneInfo
    weekdays: frozenset[int]
    start: int  # minutes after local midnight, 0..1439
    end: int  # minutes after local midnight, 0..1440

    def interval(self, day: date) -> tuple[datetime, datetime] | None:
        """The window that opens on local ``day``, as UTC instants; None when there is none."""
        if day.weekday() not in self.weekdays:
            return None
        opens = self._instant(day, self.start)
        end_day = day if self.end > self.start else day + timedelta(days=1)
        closes = self._instant(end_day, self.end)
        if closes <= opens:
            return None  # emptied by a clock change
        return opens, closes

    def _instant(self, day: date, minutes: int) -> datetime:
        if minutes >= 1440:
            day, minutes = day + timedelta(days=1), minutes - 1440
        local = datetime.combine(day, time(minutes // 60, minutes % 60), tzinfo=self.tz)
        # fold=0: a skipped time takes the offset before the change (so it moves later by
        # the gap); a repeated time is its first occurrence.
        return local.astimezone(UTC)


def _minutes(clock: str) -> int:
    hours, minutes = clock.split(":")
    return int(hours) * 60 + int(minutes)


@lru_cache(maxsize=256)
def _compile(timezone: str, days: tuple[str, ...], start: str, end: str) -> Window:
    return Window(
        ZoneInfo(timezone),
        frozenset(DAYS.index(d) for d in days),
        _minutes(start),
        _minutes(end),
    )


def compile_window(spec: WindowLike) -> Window:
    return _compile(spec.timezone, tuple(spec.days), spec.start, spec.end)


def local(at: datetime | None, spec: WindowLike) -> str:
    """An instant as the window's local time, e.g. ``2024-06-03T22:00+02:00`` ("" for None)."""
    if at is None:
        return ""
    return at.astimezone(ZoneInfo(spec.timezone)).isoformat(timespec="minutes")


def _aware(now: datetime) -> datetime:
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be an aware datetime (with a time zone)")
    return now.astimezone(UTC)


def _containing(now: datetime, w: Window) -> tuple[datetime, datetime] | None:
    today = now.astimezone(w.tz).date()
    for day in (today - timedelta(days=1), today):
        iv = w.interval(day)
        if iv is not None and iv[0] <= now < iv[1]:
            return iv
    return None


def is_open(now: datetime, spec: WindowLike) -> bool:
    """Whether a batch may start at ``now``.

    >>> spec = WindowSpec("UTC", ("mon",), "00:00", "24:00")
    >>> is_open(datetime(2024, 6, 3, 23, 59, tzinfo=UTC), spec)  # a Monday
    True
    """
    return _containing(_aware(now), compile_window(spec)) is not None


def next_open(now: datetime, spec: WindowLike) -> datetime | None:
    """``now`` when the window is open, else when it next opens; in UTC.

    None only when no window opens within the next 8 days (impossible for a valid spec
    unless clock changes empty every listed day).
    """
    at = _aware(now)
    w = compile_window(spec)
    if _containing(at, w) is not None:
        return at
    today = at.astimezone(w.tz).date()
    for k in range(-1, 9):
        iv = w.interval(today + timedelta(days=k))
        if iv is not None and iv[0] > at:
            return iv[0]
    return None


def closes_at(now: datetime, spec: WindowLike) -> datetime | None:
    """When the window open at ``now`` closes, in UTC; None when it is shut.

    Windows that touch count as one (looked at for a week at most).

    >>> spec = WindowSpec("UTC", ("mon", "tue"), "00:00", "24:00")
    >>> closes_at(datetime(2024, 6, 3, 12, tzinfo=UTC), spec).isoformat()
    '2024-06-05T00:00:00+00:00'
    """
    at = _aware(now)
    w = compile_window(spec)
    iv = _containing(at, w)
    if iv is None:
        return None
    end = iv[1]
    for _ in range(7):
        following = _containing(end, w)
        if following is None:
            break
        end = following[1]
    return end
