"""Alert blocking, as kured does: no batch starts while a matching alert fires.

`blocking` (pure) keeps the alerts that are *firing* (pending ones do not block) and whose
labels include every ``match`` pair exactly (``{severity: critical}`` matches an alert
labelled ``severity="critical", team="db"``; an empty ``match`` matches every alert).

`wait_clear` asks Prometheus every ``interval`` until no matching alert fires. It reports
what blocks (which alerts, active since when) through ``on_blocked`` whenever that set
changes. When Prometheus cannot be asked, the batch stays blocked (fail safe) and the
reason says so. With a ``timeout`` it gives up after that many seconds of blocking.
Every wait goes through `rollout.clock`, so tests run it on virtual time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from rollout import clock
from rollout.gates.prometheus import Alert, PrometheusAPI, PrometheusError

__all__ = ["ClearResult", "blocking", "describe", "wait_clear"]


def blocking(alerts: Iterable[Alert], match: Mapping[str, str]) -> tuple[Alert, ...]:
    """Firing alerts whose labels include every pair of ``match``.

    >>> a = Alert("Disk", {"alertname": "Disk", "severity": "critical"}, "firing")
    >>> b = Alert("Load", {"alertname": "Load", "severity": "warning"}, "firing")
    >>> c = Alert("Disk", {"alertname": "Disk", "severity": "critical"}, "pending")
    >>> [x.name for x in blocking([a, b, c], {"severity": "critical"})]
    ['Disk']
    """
    return tuple(
        a
        for a in alerts
        if a.state == "firing" and all(a.labels.get(k) == v for k, v in match.items())
    )


def describe(alerts: Iterable[Alert]) -> str:
    """``Disk{severity="critical"} firing since 2024-06-01T10:00:00+00:00, ...``"""
    parts = []
    for a in alerts:
        since = f" since {a.active_at.isoformat(timespec='seconds')}" if a.active_at else ""
        parts.append(f"{a.describe()} firing{since}")
    return ", ".join(parts)


@dataclass(frozen=True)
class ClearResult:
    """``cleared`` False means the timeout passed; ``blocking`` is what blocked last."""

    cleared: bool
    blocking: tuple[Alert, ...]
    waited: float  # seconds spent blocked
    reason: str  # the last reason reported (empty when nothing ever blocked)


async def check(api: PrometheusAPI, match: Mapping[str, str]) -> tuple[tuple[Alert, ...], str]:
    """One look: (blocking alerts, reason); the reason is empty when nothing blocks."""
    try:
        found = blocking(await api.alerts(), match)
    except PrometheusError as exc:
        return (), f"cannot ask Prometheus for alerts: {exc}"
    return found, (f"alerts firing: {describe(found)}" if found else "")


async def wait_clear(
    api: PrometheusAPI,
    match: Mapping[str, str],
    interval: float,
    timeout: float | None = None,
    on_blocked: Callable[[tuple[Alert, ...], str], None] | None = None,
) -> ClearResult:
    """Poll until no matching alert fires (or ``timeout`` seconds of blocking pass).

    ``on_blocked(alerts, reason)`` is called when blocking starts and whenever the blocking
    set (or the reason) changes.
    """
    start = clock.now()
    last_key: tuple[object, ...] | None = None
    reason = ""
    found: tuple[Alert, ...] = ()
    while True:
        found, why = await check(api, match)
        if not why:
            return ClearResult(True, (), clock.now() - start, reason)
        reason = why
        key = (why, *sorted((a.name, tuple(sorted(a.labels.items()))) for a in found))
        if key != last_key:
            last_key = key
            if on_blocked is not None:
                on_blocked(found, why)
        waited = clock.now() - start
        if timeout is not None and waited >= timeout:
            return ClearResult(False, found, waited, reason)
        pause = interval if timeout is None else min(interval, timeout - waited)
        await clock.sleep(pause)
