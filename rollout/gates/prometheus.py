"""The small Prometheus HTTP API client the analysis and alerts gates use.

- ``query(expr)``: ``GET {base}/api/v1/query?query=...`` (an instant query). A vector
  result gives one `Sample` per series, a scalar one sample without labels; matrix and
  string results are errors (write an instant query).
- ``alerts()``: ``GET {base}/api/v1/alerts``, every alert Prometheus evaluates, pending
  and firing.

Retries (tenacity) only around transport errors (connection refused or reset, timeouts),
with an explicit stop and exponential wait through `rollout.clock.sleep`. An HTTP error
status or an error body from Prometheus is an answer, not a fault: it is raised at once as
`PrometheusError`, and the gates count it as a failed measurement or a blocked check.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import aiohttp
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from rollout import clock

__all__ = [
    "Alert",
    "PrometheusAPI",
    "PrometheusClient",
    "PrometheusError",
    "Sample",
    "parse_alerts",
    "parse_query_result",
]

TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    aiohttp.ClientConnectionError,
    asyncio.TimeoutError,
    ConnectionError,
)


class PrometheusError(Exception):
    """A query or alerts request that did not give a usable answer."""


@dataclass(frozen=True)
class Sample:
    value: float
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Alert:
    """One alert as Prometheus reports it (``state`` is ``pending`` or ``firing``)."""

    name: str
    labels: Mapping[str, str]
    state: str
    active_at: datetime | None = None
    value: str = ""

    def describe(self) -> str:
        """``HighErrorRate{severity="critical"}`` (alertname left out of the braces)."""
        rest = ",".join(f'{k}="{v}"' for k, v in sorted(self.labels.items()) if k != "alertname")
        return f"{self.name}{{{rest}}}" if rest else self.name


class PrometheusAPI(Protocol):
    """What gates need from a Prometheus server (tests may pass an in-memory fake)."""

    async def query(self, expr: str) -> tuple[Sample, ...]: ...

    async def alerts(self) -> tuple[Alert, ...]: ...


def _float(text: object) -> float:
    try:
        return float(str(text))  # "NaN", "+Inf" and "-Inf" included
    except ValueError:
        raise PrometheusError(f"not a sample value: {text!r}") from None


def parse_query_result(body: object) -> tuple[Sample, ...]:
    """Samples from a decoded ``/api/v1/query`` answer; PrometheusError otherwise.

    >>> parse_query_result({"status": "success", "data": {"resultType": "scalar",
    ...                     "result": [1700000000.0, "0.5"]}})
    (Sample(value=0.5, labels={}),)
    """
    data = _data(body)
    kind = data.get("resultType")
    result = data.get("result")
    if kind == "scalar" and isinstance(result, list) and len(result) == 2:
        return (Sample(_float(result[1])),)
    if kind == "vector" and isinstance(result, list):
        samples = []
        for series in result:
            if not isinstance(series, dict) or not isinstance(series.get("value"), list):
                raise PrometheusError("malformed vector in the answer")
            labels = series.get("metric") or {}
            samples.append(
                Sample(_float(series["value"][1]), {str(k): str(v) for k, v in labels.items()})
            )
        return tuple(samples)
    if kind in ("matrix", "string"):
        raise PrometheusError(f"the query returned a {kind}; write an instant vector or scalar")
    raise PrometheusError(f"unexpected result type {kind!r}")


_FRACTION_RE = re.compile(r"(\.\d{6})\d+")


def _time(text: object) -> datetime | None:
    if not isinstance(text, str) or not text or text.startswith("0001-01-01"):
        return None
    try:
        return datetime.fromisoformat(_FRACTION_RE.sub(r"\1", text).replace("Z", "+00:00"))
    except ValueError:
        return None


def parse_alerts(body: object) -> tuple[Alert, ...]:
    """Alerts from a decoded ``/api/v1/alerts`` answer; PrometheusError otherwise."""
    data = _data(body)
    alerts = data.get("alerts")
    if not isinstance(alerts, list):
        raise PrometheusError("no alerts list in the answer")
    out = []
    for a in alerts:
        if not isinstance(a, dict) or not isinstance(a.get("labels"), dict):
            raise PrometheusError("malformed alert in the answer")
        labels = {str(k): str(v) for k, v in a["labels"].items()}
        out.append(
            Alert(
                name=labels.get("alertname", ""),
                labels=labels,
                state=str(a.get("state", "")),
                active_at=_time(a.get("activeAt")),
                value=str(a.get("value", "")),
            )
        )
    return tuple(out)


def _data(body: object) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise PrometheusError("the answer is not a JSON object")
    if body.get("status") != "success":
        raise PrometheusError(
            f"{body.get('errorType', 'error')}: {body.get('error', 'status is not success')}"
        )
    data = body.get("data")
    if not isinstance(data, dict):
        raise PrometheusError("the answer has no data")
    return data


class PrometheusClient:
    """`PrometheusAPI` over HTTP with an aiohttp session the caller owns."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        *,
        timeout: float = 10.0,
        attempts: int = 3,
        backoff: float = 0.5,
    ) -> None:
        self.session = session
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.attempts = attempts
        self.backoff = backoff

    async def query(self, expr: str) -> tuple[Sample, ...]:
        return parse_query_result(await self._get("/api/v1/query", {"query": expr}))

    async def alerts(self) -> tuple[Alert, ...]:
        return parse_alerts(await self._get("/api/v1/alerts", {}))

    async def _get(self, path: str, params: Mapping[str, str]) -> object:
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception_type(TRANSPORT_ERRORS),
                stop=stop_after_attempt(self.attempts),
                wait=wait_exponential(multiplier=self.backoff, max=5.0),
                sleep=clock.sleep,
                reraise=True,
            ):
                with attempt:
                    return await self._get_once(path, params)
        except TRANSPORT_ERRORS as exc:
            raise PrometheusError(
                f"{self.base_url} unreachable after {self.attempts} attempt(s): "
                f"{type(exc).__name__}: {exc}".rstrip(": ")
            ) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    async def _get_once(self, path: str, params: Mapping[str, str]) -> object:
        url = f"{self.base_url}{path}"
        async with self.session.get(
            url, params=params, timeout=aiohttp.ClientTimeout(total=self.timeout)
        ) as resp:
            try:
                body = await resp.json(content_type=None)
            except ValueError:
                body = None
            if resp.status >= 400:
                detail = body.get("error") if isinstance(body, dict) else None
                raise PrometheusError(f"HTTP {resp.status} from {url}: {detail or resp.reason}")
            if body is None:
                raise PrometheusError(f"{url} did not answer JSON")
            return body
