"""Units a user writes in policy and inventory files, and how they are shown back.

- `Amount`: a number of nodes, a count (``3``) or a percentage of the fleet (``"25%"``),
  kept unresolved until the planner resolves it against the fleet size.
- `parse_duration`: ``500ms``, ``5s``, ``2m``, ``1h30m`` or a number of seconds, to float
  seconds (`Duration` as a pydantic field type); `fmt_duration` for messages.
- `parse_rate`: a bandwidth like ``50MiB/s`` to bytes per second.
- `show`: how a user's value is quoted in error messages.

Every parser raises ValueError with a message meant for the user; pydantic places it at
the field (rollout.problems turns it into one line naming file and field).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from fractions import Fraction
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import core_schema


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
