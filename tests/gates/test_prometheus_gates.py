"""Analysis and alert gates against a real Prometheus server (real time, kept short).

The module-scoped `prometheus` fixture (conftest) runs Prometheus scraping an exporter
whose gauges the tests set; every wait polls with a deadline.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest

from rollout.gates.alerts import wait_clear
from rollout.gates.events import GateEvent, GateFinished, GateMeasured, GateWaiting
from rollout.gates.prometheus import PrometheusClient, PrometheusError
from rollout.gates.runner import GateEnv, run_gate, wait_before_batch
from rollout.policy import AlertsGate, AnalysisGate
from tests.gates.conftest import PROBE_ERRORS, Prometheus
from tests.helpers import wait_for


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def no_unhealthy() -> list[str]:
    return []


def analysis(prom: Prometheus, query: str, **fields: object) -> AnalysisGate:
    return AnalysisGate.model_validate(
        {
            "name": "an",
            "kind": "analysis",
            "after": "canary",
            "prometheus": prom.url,
            "query": query,
            "interval": "200ms",
            "count": 3,
            **fields,
        }
    )


async def test_query_scalar_vector_and_errors(
    prometheus: Prometheus, session: aiohttp.ClientSession
) -> None:
    prometheus.set_and_wait("gt_vec", 1.5, series="a")
    prometheus.set_and_wait("gt_vec", 2.5, series="b")
    api = PrometheusClient(session, prometheus.url)
    samples = await api.query("gt_vec")
    assert sorted((s.labels["series"], s.value) for s in samples) == [("a", 1.5), ("b", 2.5)]
    (scalar,) = await api.query("scalar(vector(7))")
    assert scalar.value == 7 and dict(scalar.labels) == {}
    assert await api.query("gt_absent_metric") == ()
    with pytest.raises(PrometheusError, match=r"HTTP 400.*parse error"):
        await api.query("rate(")
    with pytest.raises(PrometheusError, match="matrix"):
        await api.query("gt_vec[1m]")
    dead = PrometheusClient(session, "http://127.0.0.1:9", attempts=2, backoff=0.01)
    with pytest.raises(PrometheusError, match="unreachable after 2 attempt"):
        await dead.query("up")


async def test_analysis_passes(prometheus: Prometheus, session: aiohttp.ClientSession) -> None:
    prometheus.set_and_wait("gt_pass", 0.001)
    events: list[GateEvent] = []
    env = GateEnv("r1", session, no_unhealthy, events.append)
    start = time.monotonic()
    out = await run_gate(analysis(prometheus, "gt_pass", success="result < 0.01"), env)
    assert out.result == "passed", out.message
    assert out.data["measured"] == 3 and out.data["successful"] == 3
    assert time.monotonic() - start >= 0.4  # (count - 1) * interval, on real time here
    measured = [e for e in events if isinstance(e, GateMeasured)]
    assert [m.measurement.values for m in measured] == [(0.001,)] * 3
    assert isinstance(events[0], GateWaiting) and isinstance(events[-1], GateFinished)
    assert events[-1].result == "passed"


async def test_analysis_fails(prometheus: Prometheus, session: aiohttp.ClientSession) -> None:
    prometheus.set_and_wait("gt_fail", 0.2)
    env = GateEnv("r1", session, no_unhealthy)
    gate = analysis(prometheus, "gt_fail", success="result < 0.01", failure="result > 0.1")
    out = await run_gate(gate, env)
    assert out.result == "failed"
    assert out.data["failed"] == 1 and out.data["measured"] == 1  # failure_limit 0: stops at once
    assert "failure condition result > 0.1 holds" in out.message


async def test_analysis_inconclusive(
    prometheus: Prometheus, session: aiohttp.ClientSession
) -> None:
    prometheus.set_and_wait("gt_mid", 0.05)
    env = GateEnv("r1", session, no_unhealthy)
    gate = analysis(
        prometheus, "gt_mid", success="result < 0.01", failure="result > 0.1", inconclusive_limit=1
    )
    out = await run_gate(gate, env)
    assert out.result == "inconclusive"
    assert out.data["inconclusive"] == 2  # one tolerated, the second one decides


async def test_analysis_nan_and_vector(
    prometheus: Prometheus, session: aiohttp.ClientSession
) -> None:
    prometheus.set_and_wait("gt_nan", math.nan)
    env = GateEnv("r1", session, no_unhealthy)
    out = await run_gate(analysis(prometheus, "gt_nan", count=1, success="isNaN(result)"), env)
    assert out.result == "passed", out.message
    prometheus.set_and_wait("gt_vec2", 0.001, series="a")
    prometheus.set_and_wait("gt_vec2", 0.5, series="b")
    # success must hold for every sample: one bad series fails the measurement
    out = await run_gate(analysis(prometheus, "gt_vec2", count=1, success="result < 0.01"), env)
    assert out.result == "failed"


async def test_analysis_errors_fail_after_the_limit(session: aiohttp.ClientSession) -> None:
    env = GateEnv(
        "r1",
        session,
        no_unhealthy,
        prometheus_api=lambda url: PrometheusClient(session, url, attempts=1),
    )
    gate = AnalysisGate.model_validate(
        {
            "name": "an",
            "kind": "analysis",
            "after": 1,
            "prometheus": "http://127.0.0.1:9",
            "query": "up",
            "interval": "50ms",
            "success": "result == 1",
            "consecutive_error_limit": 2,
        }
    )
    out = await run_gate(gate, env)
    assert out.result == "failed"
    assert out.data["errors"] == 3 and "3 consecutive query errors" in out.message


async def test_firing_alert_blocks_until_cleared(
    prometheus: Prometheus, session: aiohttp.ClientSession
) -> None:
    prometheus.set_and_wait("gt_alert", 1)
    await asyncio.to_thread(
        wait_for, lambda: "GateTestCritical" in prometheus.firing(), 15,
        what="the critical alert to fire", ignore=PROBE_ERRORS,
    )  # fmt: skip
    api = PrometheusClient(session, prometheus.url)
    reasons: list[str] = []
    blocked = asyncio.Event()

    def on_blocked(alerts: object, why: str) -> None:
        reasons.append(why)
        blocked.set()

    task = asyncio.create_task(wait_clear(api, {"severity": "critical"}, 0.1, None, on_blocked))
    await asyncio.wait_for(blocked.wait(), 10)
    assert "GateTestCritical" in reasons[0] and "since" in reasons[0]
    assert "GateTestWarning" not in reasons[0]  # firing, but severity=warning
    assert not task.done()
    prometheus.exporter.set("gt_alert", 0)
    result = await asyncio.wait_for(task, 10)
    assert result.cleared and result.waited > 0


async def test_alerts_gate_times_out_and_other_alerts_do_not_block(
    prometheus: Prometheus, session: aiohttp.ClientSession
) -> None:
    env = GateEnv("r1", session, no_unhealthy)
    # GateTestWarning always fires: it blocks only a gate whose match selects it.
    calm = AlertsGate.model_validate(
        {"name": "calm", "kind": "alerts", "prometheus": prometheus.url,
         "match": {"severity": "critical", "alertname": "GateTestCritical"}}
    )  # fmt: skip
    prometheus.set_and_wait("gt_alert", 0)
    await asyncio.to_thread(
        wait_for, lambda: "GateTestCritical" not in prometheus.firing(), 15,
        what="the critical alert to clear", ignore=PROBE_ERRORS,
    )  # fmt: skip
    assert (await wait_before_batch([calm], env)).result == "passed"
    noisy = AlertsGate.model_validate(
        {"name": "noisy", "kind": "alerts", "prometheus": prometheus.url,
         "match": {"severity": "warning"}, "interval": "100ms", "timeout": "300ms"}
    )  # fmt: skip
    out = await wait_before_batch([calm, noisy], env)
    assert out.result == "timeout" and out.gate == "noisy"
    assert "GateTestWarning" in out.message
