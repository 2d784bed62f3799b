"""Gates on virtual time (looptime): exact virtual seconds, no real sleeping.

Prometheus is an in-memory fake here (`FakePrometheus`) whose answers are a function of
the loop's clock; the wall clock of windows is ``BASE + loop time``. The same gates run
against a real Prometheus in test_prometheus_gates.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import pytest

from rollout import clock
from rollout.gates.events import (
    GateApproval,
    GateEvent,
    GateFinished,
    GateMeasured,
    GateSignal,
    GateWaiting,
)
from rollout.gates.prometheus import Alert, PrometheusError, Sample
from rollout.gates.runner import GateEnv, resolve_inconclusive, run_gate, wait_before_batch
from rollout.gates.signals import Signal, Status
from rollout.policy import Gate, parse_policy

pytestmark = pytest.mark.looptime

PROM = "http://prom.invalid:9090"
BERLIN = ZoneInfo("Europe/Berlin")


def gate(**fields: Any) -> Gate:
    """One gate validated through the policy schema (so tests use what users write)."""
    fields.setdefault("name", "g")
    if fields["kind"] in ("bake", "wait", "approval", "analysis"):
        fields.setdefault("after", "canary")
    if fields["kind"] in ("analysis", "alerts"):
        fields.setdefault("prometheus", PROM)
    return parse_policy({"gates": [fields]}, "test").gates[0]


@dataclass
class FakePrometheus:
    """Answers as a function of loop time: ``values(t)`` for queries, ``alerts(t)``."""

    values: Callable[[float], tuple[float, ...] | None] = lambda t: (1.0,)
    firing: Callable[[float], tuple[Alert, ...] | None] = lambda t: ()
    queries: list[float] = field(default_factory=list)
    looks: list[float] = field(default_factory=list)

    async def query(self, expr: str) -> tuple[Sample, ...]:
        self.queries.append(clock.now())
        got = self.values(clock.now())
        if got is None:
            raise PrometheusError("boom")
        return tuple(Sample(v) for v in got)

    async def alerts(self) -> tuple[Alert, ...]:
        self.looks.append(clock.now())
        got = self.firing(clock.now())
        if got is None:
            raise PrometheusError("connection refused")
        return got


@dataclass
class Harness:
    env: GateEnv
    events: list[GateEvent]
    prom: FakePrometheus
    unhealthy: dict[float, list[str]]  # from this loop time on, these nodes are unhealthy
    rechecks: list[float]


BASE = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)  # a Saturday


@pytest.fixture
async def h() -> AsyncIterator[Harness]:
    events: list[GateEvent] = []
    prom = FakePrometheus()
    unhealthy: dict[float, list[str]] = {}
    rechecks: list[float] = []

    async def recheck() -> list[str]:
        rechecks.append(clock.now())
        bad: list[str] = []
        for since, nodes in unhealthy.items():
            if clock.now() >= since:
                bad += nodes
        return bad

    async with aiohttp.ClientSession() as session:
        env = GateEnv(
            "r1",
            session,
            recheck,
            events.append,
            health_interval=5.0,
            wall_clock=lambda: BASE + timedelta(seconds=clock.now()),
            prometheus_api=lambda url: prom,
        )
        yield Harness(env, events, prom, unhealthy, rechecks)


def at(seconds: float, action: Callable[[], object]) -> None:
    """Run ``action`` at loop time ``seconds``."""
    loop = asyncio.get_running_loop()
    loop.call_at(seconds, action)


def kinds(events: list[GateEvent]) -> list[str]:
    return [type(e).__name__ for e in events]


# -- bake -----------------------------------------------------------------------------------


async def test_bake_passes_after_exactly_its_duration(h: Harness) -> None:
    out = await run_gate(gate(kind="bake", duration="10m"), h.env)
    assert out.result == "passed" and clock.now() == pytest.approx(600)
    assert h.rechecks == pytest.approx([5.0 * i for i in range(1, 121)])  # every health interval
    waiting = h.events[0]
    assert isinstance(waiting, GateWaiting) and waiting.until == BASE + timedelta(minutes=10)
    assert waiting.since == BASE and waiting.kind == "bake"
    assert h.events[-1] == GateFinished("g", "bake", "passed", out.message)


async def test_bake_fails_when_a_node_turns_unhealthy(h: Harness) -> None:
    h.unhealthy[42.0] = ["n3", "n1"]
    out = await run_gate(gate(kind="bake", duration="10m"), h.env)
    assert out.result == "failed" and clock.now() == pytest.approx(45)  # first recheck after 42
    assert out.data["unhealthy"] == ["n1", "n3"] and "n1, n3" in out.message


async def test_bake_shorter_than_the_health_interval(h: Harness) -> None:
    out = await run_gate(gate(kind="bake", duration="2s"), h.env)
    assert out.result == "passed" and clock.now() == pytest.approx(2)
    assert h.rechecks == pytest.approx([2.0])


# -- wait condition -------------------------------------------------------------------------


async def test_wait_passes_at_the_count_th_distinct_signal(h: Harness) -> None:
    box = h.env.signals("g")
    box.add(Signal(Status.SUCCESS, id="early"))  # sent before the gate started: counts
    at(10, lambda: box.add(Signal(Status.SUCCESS, id="early")))  # repeated id: counts once
    at(20, lambda: box.add(Signal(Status.SUCCESS, reason="tests ok", id="ci")))
    at(30, lambda: box.add(Signal(Status.SUCCESS)))  # no id: numbered, distinct
    out = await run_gate(gate(kind="wait", count=3, timeout="1h"), h.env)
    assert out.result == "passed" and clock.now() == pytest.approx(30)
    assert out.data["success_ids"] == ["early", "ci", "4"]
    assert [e.signal.id for e in h.events if isinstance(e, GateSignal)] == [
        "early", "early", "ci", "4",
    ]  # fmt: skip
    assert "/v1/rollouts/r1/gates/g/signal" in h.events[0].reason  # type: ignore[union-attr]


async def test_wait_fails_at_the_first_failure(h: Harness) -> None:
    box = h.env.signals("g")
    at(5, lambda: box.add(Signal(Status.SUCCESS, id="a")))
    at(7, lambda: box.add(Signal(Status.FAILURE, reason="smoke test failed", id="b")))
    out = await run_gate(gate(kind="wait", count=2, timeout="1h"), h.env)
    assert out.result == "failed" and clock.now() == pytest.approx(7)
    assert "smoke test failed" in out.message


async def test_wait_times_out(h: Harness) -> None:
    box = h.env.signals("g")
    at(5, lambda: box.add(Signal(Status.SUCCESS, id="a")))
    out = await run_gate(gate(kind="wait", count=2, timeout="15m"), h.env)
    assert out.result == "timeout" and clock.now() == pytest.approx(900)
    assert "1 of 2" in out.message
    assert h.events[0].until == BASE + timedelta(minutes=15)  # type: ignore[union-attr]


async def test_wait_consumes_signals_so_every_gate_needs_fresh_ones(h: Harness) -> None:
    box = h.env.signals("g")
    box.add(Signal(Status.SUCCESS, id="a"))
    assert (await run_gate(gate(kind="wait", timeout=60), h.env)).result == "passed"
    out = await run_gate(gate(kind="wait", timeout=60), h.env)
    assert out.result == "timeout" and clock.now() == pytest.approx(60)
    assert [s.id for s in box.history] == ["a"]


# -- approval -------------------------------------------------------------------------------


async def test_approval(h: Harness) -> None:
    box = h.env.approvals("g")
    at(30, lambda: box.approve("alice"))
    out = await run_gate(gate(kind="approval"), h.env)
    assert out.result == "passed" and clock.now() == pytest.approx(30)
    assert out.message == "approved by alice"
    assert any(isinstance(e, GateApproval) and e.approval.by == "alice" for e in h.events)
    at(40, lambda: box.reject("bob", "error budget spent"))
    out = await run_gate(gate(kind="approval"), h.env)
    assert out.result == "failed" and clock.now() == pytest.approx(40)
    assert out.message == "rejected by bob: error budget spent"
    out = await run_gate(gate(kind="approval", timeout="2h"), h.env)
    assert out.result == "timeout" and clock.now() == pytest.approx(40 + 7200)


# -- analysis -------------------------------------------------------------------------------


async def test_analysis_takes_interval_times_count(h: Harness) -> None:
    h.prom.values = lambda t: (0.001,)
    g = gate(kind="analysis", query="q", success="result < 0.01", interval="1m", count=5,
             initial_delay="30s")  # fmt: skip
    out = await run_gate(g, h.env)
    assert out.result == "passed" and clock.now() == pytest.approx(30 + 4 * 60)
    assert h.prom.queries == pytest.approx([30, 90, 150, 210, 270])
    assert len([e for e in h.events if isinstance(e, GateMeasured)]) == 5
    assert h.events[0].until == BASE + timedelta(seconds=270)  # type: ignore[union-attr]


async def test_analysis_failure_limit(h: Harness) -> None:
    h.prom.values = lambda t: (0.5,) if t in (60, 120) else (0.001,)
    g = gate(kind="analysis", query="q", success="result < 0.01", interval=60, count=5,
             failure_limit=1)  # fmt: skip
    out = await run_gate(g, h.env)
    assert out.result == "failed" and clock.now() == pytest.approx(120)
    assert (out.data["failed"], out.data["successful"]) == (2, 1)


async def test_analysis_errors_do_not_count_and_consecutive_ones_fail(h: Harness) -> None:
    h.prom.values = lambda t: None if t in (10, 20) else (1.0,)
    g = gate(kind="analysis", query="q", success="result == 1", interval=10, count=3)
    out = await run_gate(g, h.env)
    assert out.result == "passed" and clock.now() == pytest.approx(40)  # 5 looks, 2 errors
    assert (out.data["measured"], out.data["errors"]) == (3, 2)
    h.prom.values = lambda t: None
    g = gate(kind="analysis", query="q", success="result == 1", interval=10, count=3,
             consecutive_error_limit=2)  # fmt: skip
    start = clock.now()
    out = await run_gate(g, h.env)
    assert out.result == "failed" and clock.now() - start == pytest.approx(20)
    assert "3 consecutive query errors" in out.message


async def test_inconclusive_analysis_pauses_for_a_human(h: Harness) -> None:
    h.prom.values = lambda t: (0.05,)
    g = gate(kind="analysis", query="q", success="result < 0.01", failure="result > 0.1")
    out = await run_gate(g, h.env)
    assert out.result == "inconclusive" and clock.now() == 0
    at(600, lambda: h.env.approvals("g").approve("carol"))
    out = await resolve_inconclusive(g, h.env)
    assert out.result == "passed" and clock.now() == pytest.approx(600)
    assert [e.result for e in h.events if isinstance(e, GateFinished)] == [
        "inconclusive",
        "passed",
    ]


# -- alerts ---------------------------------------------------------------------------------


def alert(name: str, severity: str = "critical") -> Alert:
    return Alert(name, {"alertname": name, "severity": severity}, "firing", BASE)


async def test_alerts_block_until_they_clear(h: Harness) -> None:
    h.prom.firing = lambda t: (
        (alert("DiskFull"), alert("Noise", "info")) if t < 95 else (alert("Noise", "info"),)
    )
    g = gate(kind="alerts", match={"severity": "critical"}, interval="30s")
    out = await wait_before_batch([g], h.env)
    assert out.result == "passed" and clock.now() == pytest.approx(120)
    # a first look, the wait (every 30 s), then every condition is looked at once more
    assert h.prom.looks == pytest.approx([0, 0, 30, 60, 90, 120, 120])
    (waiting,) = [e for e in h.events if isinstance(e, GateWaiting)]
    assert waiting.until is None and "DiskFull" in waiting.reason and "Noise" not in waiting.reason
    assert "since 2024-06-01T12:00:00+00:00" in waiting.reason
    assert h.events[-1] == GateFinished("g", "alerts", "passed", "no matching alert fires")


async def test_alerts_timeout_and_unreachable_prometheus_blocks(h: Harness) -> None:
    h.prom.firing = lambda t: None
    g = gate(kind="alerts", interval="30s", timeout="100s")
    out = await wait_before_batch([g], h.env)
    assert out.result == "timeout" and clock.now() == pytest.approx(100)
    assert "cannot ask Prometheus for alerts" in out.message


async def test_nothing_blocks_nothing_is_emitted(h: Harness) -> None:
    out = await wait_before_batch([gate(kind="alerts")], h.env)
    assert out.result == "passed" and clock.now() == 0 and h.events == []


# -- windows --------------------------------------------------------------------------------


async def test_window_waits_until_it_opens_and_says_until_when(h: Harness) -> None:
    # Saturday 14:00 in Berlin; mon-fri 22:00-06:00 opens on Monday 22:00 (+02:00)
    g = gate(kind="window", timezone="Europe/Berlin", days=["mon-fri"], start="22:00",
             end="06:00")  # fmt: skip
    out = await wait_before_batch([g], h.env)
    opens = datetime(2024, 6, 3, 22, 0, tzinfo=BERLIN)
    assert out.result == "passed"
    assert clock.now() == pytest.approx((opens - BASE).total_seconds(), abs=1e-3)
    (waiting,) = [e for e in h.events if isinstance(e, GateWaiting)]
    assert waiting.until == opens and "waiting until 2024-06-03T22:00+02:00" in waiting.reason


async def test_window_across_a_dst_change_waits_real_seconds() -> None:
    # Saturday 2024-03-30 23:00 CET; window Sunday 04:00-05:00 Berlin, after the clocks
    # sprang forward at 02:00: 4 hours of real time, though 5 on the wall clock.
    base = datetime(2024, 3, 30, 23, 0, tzinfo=BERLIN).astimezone(UTC)
    events: list[GateEvent] = []

    async def recheck() -> list[str]:
        return []

    async with aiohttp.ClientSession() as session:
        env = GateEnv("r", session, recheck, events.append,
                      wall_clock=lambda: base + timedelta(seconds=clock.now()))  # fmt: skip
        g = gate(kind="window", timezone="Europe/Berlin", days=["sun"], start="04:00",
                 end="05:00")  # fmt: skip
        assert (await run_gate(g, env)).result == "passed"
    assert clock.now() == pytest.approx(4 * 3600, abs=1e-3)


async def test_conditions_must_hold_together(h: Harness) -> None:
    # The window opens at 22:00 UTC (t=36000); an alert fires from then until 22:50, which
    # leaves the batch inside the window: it starts at the first look after the alert.
    h.prom.firing = lambda t: (alert("Busy"),) if 36000 <= t < 39000 else ()
    win = gate(name="night", kind="window", start="22:00", end="23:00")
    quiet = gate(name="quiet", kind="alerts", interval="5m")
    out = await wait_before_batch([win, quiet], h.env)
    assert out.result == "passed" and clock.now() == pytest.approx(39000, abs=1e-3)
    finished = [(e.gate, e.result) for e in h.events if isinstance(e, GateFinished)]
    assert finished == [("night", "passed"), ("quiet", "passed")]


async def test_alerts_holding_past_the_window_wait_for_the_next_one(h: Harness) -> None:
    # Alert from 22:00 to 23:30 UTC; window 22:00-23:00: the batch waits for the next day.
    h.prom.firing = lambda t: (alert("Busy"),) if 36000 <= t < 41400 else ()
    win = gate(name="night", kind="window", start="22:00", end="23:00")
    quiet = gate(name="quiet", kind="alerts", interval="30m")
    out = await wait_before_batch([win, quiet], h.env)
    assert out.result == "passed"
    assert clock.now() == pytest.approx(36000 + 86400, abs=1e-3)
