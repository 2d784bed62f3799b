"""`rollout simulate`: the CLI over the real controller on simulated nodes, virtual time.

The expected figures are computed from the inputs (the planner's batches, the boot and
health durations, the seeded draw of failing nodes), never copied from a run: a batch
takes `boot + healthy_after + min_healthy_time`, give or take the controller's status
polls: the boot wait's, which back off with the time waited (rollout.steps.poll_delay)
until the node answers (then a long poll waits for its workload, with no lag), and the
health rounds on `interval` steps.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import rollout.commands.simulate as command
from rollout.cli import main
from rollout.gates.signals import SignalBox
from rollout.journal import SQLiteStore, load_state
from rollout.plan import plan_batches
from rollout.policy import parse_policy
from rollout.simulate import (
    VirtualClockLoop,
    coarse,
    draw_boot_times,
    draw_failing,
    fmt_t,
    run_virtual,
    synthetic_nodes,
)
from rollout.steps import BOOT_POLL_MAX, POLL_INTERVAL, poll_delay
from tests.helpers import seen_at

POLICY = """\
batches: {canary: 1, size: "25%", max_unavailable: "25%", spread_by: rack}
health:
  checks: [{type: http, port: 8080}, {type: agent}]
  interval: 5s
  min_healthy_time: 20s
  deadline: 2m
  boot_timeout: 5m
failure: {max_failed: 0, action: ACTION}
gates:
  - {name: soak, kind: bake, after: canary, duration: 5m}
  - {name: ok, kind: approval, after: every}
"""
BOOT, HEALTHY_AFTER, MIN_HEALTHY, BAKE = 90.0, 20.0, 20.0, 300.0
# A batch's lag behind its configured durations: the boot poll's (at most the backed-off
# poll interval at the time the node is back) and the first health round's.
LAG = poll_delay(BOOT + HEALTHY_AFTER) + POLL_INTERVAL + 1e-6


@pytest.fixture(autouse=True)
def _no_gc_tuning(monkeypatch: pytest.MonkeyPatch) -> None:
    # settle_heap freezes the heap for the rest of the process: not in the test runner's.
    monkeypatch.setattr(command, "settle_heap", lambda: None)


def policy_file(tmp_path: Path, action: str = "rollback", text: str = POLICY) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(text.replace("ACTION", action))
    return path


def simulate(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["simulate", *args])
    return result.exit_code, result.output


def simulate_json(*args: str) -> tuple[int, dict[str, Any]]:
    code, out = simulate(*args, "--output", "json")
    return code, json.loads(out)


def planned(path: Path, count: int, labels: dict[str, int]) -> list[int]:
    pol = parse_policy(__import__("yaml").safe_load(path.read_text()), "p")
    return [len(b.nodes) for b in plan_batches(synthetic_nodes(count, labels), pol)]


def test_a_clean_rollout_takes_what_boot_and_health_say(tmp_path: Path) -> None:
    pol = policy_file(tmp_path)
    code, r = simulate_json(
        "--policy", str(pol), "--nodes", "50", "--labels", "rack=4",
        "--boot", "90s", "--healthy-after", "20s",
    )  # fmt: skip
    assert code == 0 and r["phase"] == "succeeded"
    sizes = planned(pol, 50, {"rack": 4})
    assert [b["nodes"] for b in r["batches"]] == sizes
    assert r["batches"][0]["canary"] and not any(b["canary"] for b in r["batches"][1:])
    per_batch = BOOT + HEALTHY_AFTER + MIN_HEALTHY
    for b in r["batches"]:
        assert per_batch <= b["end"] - b["start"] <= per_batch + LAG
        assert b["failed"] == 0 and b["decision"] == "continue"
    # The bake after the canary runs on virtual time; the approval gate is not simulated.
    (bake,) = r["gates"]
    assert bake["gate"] == "soak" and bake["after_batch"] == 1 and bake["result"] == "passed"
    assert bake["end"] - bake["start"] == pytest.approx(BAKE, abs=1e-6)
    assert any("gate ok (approval)" in note for note in r["not_simulated"])
    assert any("http" in note for note in r["not_simulated"])
    total = len(sizes) * per_batch + BAKE
    assert total <= r["duration"] <= total + len(sizes) * LAG
    # Batches follow one another: never more out of service than one batch, the cap.
    assert r["out_of_service"]["max"] == max(sizes) == r["out_of_service"]["max_unavailable"]
    assert r["failures"] == {"drawn": 0, "failed": 0, "rolled_back": 0, "by_reason": {},
                             "first": []}  # fmt: skip


@pytest.mark.parametrize(("action", "phase", "exit_code"), [
    ("rollback", "rolled_back", 1),
    ("halt", "halted", 1),
])  # fmt: skip
def test_failures_drawn_from_the_seed_trigger_the_policy(
    tmp_path: Path, action: str, phase: str, exit_code: int
) -> None:
    pol = policy_file(tmp_path, action)
    nodes = synthetic_nodes(50, {"rack": 4})
    failing = draw_failing([n.id for n in nodes], 0.05, 7)
    assert failing  # the seed draws some: the case is meaningful
    batches = plan_batches(nodes, parse_policy(__import__("yaml").safe_load(pol.read_text()), "p"))
    first_bad = next(b for b in batches if failing & set(b.node_ids))
    code, r = simulate_json(
        "--policy", str(pol), "--nodes", "50", "--labels", "rack=4", "--boot", "90s",
        "--healthy-after", "20s", "--fail-rate", "5%", "--seed", "7",
    )  # fmt: skip
    assert code == exit_code and r["phase"] == phase
    assert r["failures"]["drawn"] == len(failing)
    assert [b["number"] for b in r["batches"]] == list(range(1, first_bad.index + 1))
    bad = r["batches"][-1]
    assert bad["failed"] == len(failing & set(first_bad.node_ids))
    assert bad["decision"] == ("rollback_batch" if action == "rollback" else "halt")
    first = r["failures"]["first"]
    assert {f["node"] for f in first} == failing & set(first_bad.node_ids)
    assert {f["reason"] for f in first} == {"health_deadline"}  # never healthy, 2 min on
    # The policy's reaction is in the phases, with the failed batch named.
    assert r["phases"][-1]["phase"] == phase
    if action == "rollback":  # the whole failed batch returns to the old image
        assert r["failures"]["rolled_back"] == len(first_bad.nodes)


def test_text_output_and_the_journal_kept_with_state(tmp_path: Path) -> None:
    pol = policy_file(tmp_path)
    state = tmp_path / "sim.db"
    code, out = simulate(
        "--policy", str(pol), "--nodes", "8", "--boot", "1m", "--healthy-after", "0s",
        "--state", str(state),
    )  # fmt: skip
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0].startswith("simulated rollout of 8 node(s), policy policy, starting 20")
    assert ": boot 60s, healthy after 0s" in lines[0]
    first_end = fmt_t(seen_at(60.0) + MIN_HEALTHY)  # a 60 s boot, then 20 s healthy
    assert lines[1].startswith(f"batch 1 (canary): T+0:00:00 .. {first_end}")
    assert f"  gate soak (bake): {first_end}" in out
    assert "not simulated: gate ok (approval): assumed to pass at once" in out
    assert lines[-1].startswith("predicted duration: ") and "ending succeeded" in lines[-1]
    store = SQLiteStore(state)
    try:
        (rid,) = store.rollout_ids()
        assert str(load_state(store, rid).phase) == "succeeded"
    finally:
        store.close()


def test_inventory_nodes_need_no_tokens(tmp_path: Path) -> None:
    inv = tmp_path / "inventory.yaml"
    inv.write_text(
        "token_file: /nonexistent/token\nnodes:\n"
        + "".join(f"  - {{id: n{i}, address: 10.0.0.{i}:7000}}\n" for i in range(1, 5))
    )
    code, r = simulate_json("--policy", str(policy_file(tmp_path)), "--inventory", str(inv),
                            "--boot", "0s", "--healthy-after", "0s")  # fmt: skip
    assert code == 0 and r["nodes"] == 4 and r["phase"] == "succeeded"


def test_json_shape(tmp_path: Path) -> None:
    code, r = simulate_json("--policy", str(policy_file(tmp_path)), "--nodes", "3")
    assert code == 0
    assert set(r) == {
        "rollout", "policy", "nodes", "settings", "phase", "message", "duration", "batches",
        "gates", "out_of_service", "failures", "phases", "not_simulated", "state", "ends_at",
    }  # fmt: skip
    start = r["settings"].pop("start")  # now, as the run began: an ISO time in UTC
    assert datetime.fromisoformat(start).utcoffset() == timedelta(0) and start.endswith("Z")
    assert r["settings"] == {"boot": 90.0, "boot_max": None, "healthy_after": 20.0,
                             "healthy_after_max": None, "fail_rate": 0.0,
                             "fail_mode": "workload", "seed": 1, "stage": 0.0,
                             "gates": {}}  # fmt: skip
    ends = datetime.fromisoformat(r["ends_at"]) - datetime.fromisoformat(start)
    assert abs(ends.total_seconds() - r["duration"]) <= 1.0  # both shown to the second
    assert set(r["batches"][0]) == {"number", "canary", "nodes", "start", "end", "failed",
                                    "decision"}  # fmt: skip
    assert set(r["out_of_service"]) == {"max", "max_unavailable", "series"}
    assert all(set(p) == {"t", "nodes"} for p in r["out_of_service"]["series"])
    assert set(r["failures"]) == {"drawn", "failed", "rolled_back", "by_reason", "first"}


@pytest.mark.parametrize(("args", "message"), [
    ([], "give the fleet as --inventory FILE or --nodes N"),
    (["--nodes", "3", "--start", "saturday"], "--start: expected an ISO 8601 time like"),
    (["--nodes", "3", "--start", "2026-12-12T02:00"], "--start: '2026-12-12T02:00' has no time "
                                                      "zone"),
    (["--nodes", "3", "--inventory", "x.yaml"], "give the fleet as --inventory FILE or --nodes N"),
    (["--nodes", "0"], "--nodes: expected 1 to 10000000 nodes, got 0"),
    (["--nodes", "3", "--fail-rate", "150%"], "--fail-rate: must be between 0% and 100%"),
    (["--nodes", "3", "--fail-rate", "many"], '--fail-rate: expected a percentage like "2%"'),
    (["--nodes", "3", "--boot", "soon"], "--boot: expected a duration"),
    (["--nodes", "3", "--boot", "2m..1m"], "--boot: the range '2m..1m' ends before it starts"),
    (["--nodes", "3", "--boot", "1m..later"], "--boot: expected a duration"),
    (["--nodes", "3", "--labels", "rack"], "--labels: expected NAME=COUNT"),
    (["--inventory", "x.yaml", "--labels", "rack=2"], "--labels: only with --nodes"),
    (["--inventory", "missing.yaml"], "missing.yaml: no such inventory file"),
])  # fmt: skip
def test_bad_input_exits_2(tmp_path: Path, args: list[str], message: str) -> None:
    code, out = simulate("--policy", str(policy_file(tmp_path)), *args)
    assert code == 2, out
    assert out.startswith("error: ") and message in out, out


def test_a_bad_policy_exits_2_with_its_message(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("batches: {size: lots}\n")
    code, out = simulate("--policy", str(bad), "--nodes", "3")
    assert code == 2 and 'batches.size: expected a count or a percentage like "25%"' in out


def test_virtual_time_costs_no_real_time() -> None:
    async def a_day() -> float:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, VirtualClockLoop)
        await asyncio.gather(asyncio.sleep(86400), asyncio.sleep(3600))
        return loop.time()

    assert run_virtual(a_day()) == 86400  # a day passed on the loop's clock, none slept


def test_coarse_series_keeps_the_peak_of_each_slice() -> None:
    series = [(0.0, 0), (1.0, 5), (1.5, 0), (6.0, 3)]
    assert coarse(series, 8.0, 4) == [(0.0, 5), (2.0, 0), (4.0, 0), (6.0, 3)]
    assert coarse([(0.0, 0)], 0.0, 4) == [(0.0, 0)]


# Saturday 12 December 2026; the window is Saturdays 02:00-03:00 UTC.
WINDOW_POLICY = """\
batches: {canary: 0, size: 1, max_unavailable: 1}
health: {checks: [{type: agent}], interval: 5s, min_healthy_time: 0s, deadline: 2m,
         boot_timeout: 2h}
failure: {max_failed: 0, action: halt}
gates:
  - {name: maint, kind: window, before: every, timezone: UTC, days: [sat],
     start: "02:00", end: "03:00"}
"""


def test_window_gates_hold_batches_on_the_virtual_wall_clock(tmp_path: Path) -> None:
    pol = tmp_path / "window.yaml"
    pol.write_text(WINDOW_POLICY)
    boot = 40 * 60.0
    code, r = simulate_json(
        "--policy", str(pol), "--nodes", "3", "--boot", "40m", "--healthy-after", "0s",
        "--start", "2026-12-12T01:00:00Z",
    )  # fmt: skip
    assert code == 0 and r["phase"] == "succeeded", r
    assert r["settings"]["start"] == "2026-12-12T01:00:00Z"
    assert not any("window" in note for note in r["not_simulated"])  # it ran, not assumed
    one, two, three = r["batches"]
    hour, week = 3600.0, 7 * 86400.0
    # An hour early: batch 1 waits for 02:00. Batch 2 starts at 02:40, inside the window;
    # batch 3 would start at 03:20, after it closed: it waits for next Saturday 02:00.
    assert one["start"] == pytest.approx(hour, abs=1e-6)
    assert two["start"] == pytest.approx(one["end"], abs=1e-6) and two["start"] < 2 * hour
    assert two["end"] > 2 * hour
    assert three["start"] == pytest.approx(hour + week, abs=1e-6)
    for b in r["batches"]:
        assert b["end"] - b["start"] == pytest.approx(seen_at(boot), abs=1e-3)
        assert boot <= b["end"] - b["start"] <= boot + BOOT_POLL_MAX
    waits = [(g["gate"], g["kind"], g["before_batch"], g["result"]) for g in r["gates"]]
    assert waits == [("maint", "window", 1, "passed"), ("maint", "window", 3, "passed")]
    assert r["gates"][1]["start"] == pytest.approx(two["end"], abs=1e-6)
    assert r["gates"][1]["end"] == pytest.approx(three["start"], abs=1e-6)
    assert r["ends_at"].startswith("2026-12-19T02:40:")  # a week later, to the second

    code, out = simulate(
        "--policy", str(pol), "--nodes", "3", "--boot", "40m", "--healthy-after", "0s",
        "--start", "2026-12-12T02:00:00+01:00",  # the same instant, in another zone
    )  # fmt: skip
    assert code == 0, out
    lines = out.splitlines()
    assert "starting 2026-12-12T01:00:00Z" in lines[0]
    assert lines[1] == (
        "  gate maint (window): T+0:00:00 .. T+1:00:00 passed, before batch 1 "
        "(until 2026-12-12T02:00:00Z)"
    )
    assert "before batch 3 (until 2026-12-19T02:00:00Z)" in out
    assert lines[-1].startswith("predicted duration: 169h40m")


def test_inside_the_window_nothing_waits(tmp_path: Path) -> None:
    pol = tmp_path / "window.yaml"
    pol.write_text(WINDOW_POLICY)
    code, r = simulate_json(
        "--policy", str(pol), "--nodes", "2", "--boot", "10m", "--healthy-after", "0s",
        "--start", "2026-12-12T02:00:00Z",
    )  # fmt: skip
    assert code == 0 and r["gates"] == [] and r["batches"][0]["start"] == 0.0


def test_a_boot_range_makes_each_batch_as_slow_as_its_slowest_node(tmp_path: Path) -> None:
    pol = policy_file(tmp_path)
    nodes = synthetic_nodes(50, {"rack": 4})
    boots = draw_boot_times([n.id for n in nodes], 60.0, 120.0, 3)
    assert max(boots.values()) - min(boots.values()) > 30  # the draw spreads: meaningful
    batches = plan_batches(nodes, parse_policy(__import__("yaml").safe_load(pol.read_text()), "p"))
    code, r = simulate_json(
        "--policy", str(pol), "--nodes", "50", "--labels", "rack=4", "--boot", "60s..2m",
        "--healthy-after", "20s", "--seed", "3",
    )  # fmt: skip
    assert code == 0 and r["phase"] == "succeeded", r["message"]
    assert (r["settings"]["boot"], r["settings"]["boot_max"]) == (60.0, 120.0)
    for planned_batch, b in zip(batches, r["batches"], strict=True):
        slowest = max(boots[n.id] for n in planned_batch.nodes)
        ready = slowest + HEALTHY_AFTER
        took = b["end"] - b["start"]
        # Exact (to the JSON's milliseconds): the workload's start is long-polled, and the
        # boot poll's lag hides in healthy_after.
        assert took == pytest.approx(ready + MIN_HEALTHY, abs=1e-3)
    # Another seed, other boot times: the prediction follows the draw.
    code, other = simulate_json(
        "--policy", str(pol), "--nodes", "50", "--labels", "rack=4", "--boot", "60s..2m",
        "--healthy-after", "20s", "--seed", "4",
    )  # fmt: skip
    assert code == 0 and other["duration"] != r["duration"]
    code, out = simulate("--policy", str(pol), "--nodes", "3", "--boot", "1m..90s")
    assert code == 0 and "boot 60s..90s (each node its own)" in out.splitlines()[0]


def test_nodes_whose_new_image_does_not_boot_fall_back_and_trigger_the_policy(
    tmp_path: Path,
) -> None:
    pol = policy_file(tmp_path, "rollback")
    nodes = synthetic_nodes(50, {"rack": 4})
    failing = draw_failing([n.id for n in nodes], 0.05, 7)
    batches = plan_batches(nodes, parse_policy(__import__("yaml").safe_load(pol.read_text()), "p"))
    first_bad = next(b for b in batches if failing & set(b.node_ids))
    code, r = simulate_json(
        "--policy", str(pol), "--nodes", "50", "--labels", "rack=4", "--boot", "90s",
        "--healthy-after", "20s", "--fail-rate", "5%", "--fail-mode", "boot", "--seed", "7",
    )  # fmt: skip
    assert code == 1 and r["phase"] == "rolled_back"
    assert r["settings"]["fail_mode"] == "boot"
    bad = r["batches"][-1]
    assert bad["number"] == first_bad.index and bad["decision"] == "rollback_batch"
    first = r["failures"]["first"]
    assert {f["node"] for f in first} == failing & set(first_bad.node_ids)
    # Not a health failure: the node booted its old image again (two boots, then the
    # workload's start), and the controller saw it come back on the wrong image.
    assert {f["reason"] for f in first} == {"fell_back"}
    ready = 2 * BOOT + HEALTHY_AFTER
    for f in first:
        assert ready <= f["at"] - bad["start"] <= ready + poll_delay(ready) + 1e-6
    code, out = simulate(
        "--policy", str(pol), "--nodes", "50", "--fail-rate", "5%", "--fail-mode", "boot",
        "--seed", "7",
    )  # fmt: skip
    assert "where the new image does not boot" in out.splitlines()[0]


def test_a_workload_start_range_is_drawn_per_node_apart_from_the_boot(tmp_path: Path) -> None:
    pol = policy_file(tmp_path)
    nodes = synthetic_nodes(50, {"rack": 4})
    starts = draw_boot_times([n.id for n in nodes], 10.0, 60.0, 5, stream="healthy")
    boots = draw_boot_times([n.id for n in nodes], 10.0, 60.0, 5)
    assert starts != boots  # a stream of its own
    batches = plan_batches(nodes, parse_policy(__import__("yaml").safe_load(pol.read_text()), "p"))
    code, r = simulate_json(
        "--policy", str(pol), "--nodes", "50", "--labels", "rack=4", "--boot", "90s",
        "--healthy-after", "10s..1m", "--seed", "5",
    )  # fmt: skip
    assert code == 0 and r["phase"] == "succeeded", r["message"]
    assert (r["settings"]["healthy_after"], r["settings"]["healthy_after_max"]) == (10.0, 60.0)
    for planned_batch, b in zip(batches, r["batches"], strict=True):
        ready = BOOT + max(starts[n.id] for n in planned_batch.nodes)
        took = b["end"] - b["start"]
        # Exact (to the JSON's milliseconds): the workload's start is long-polled, and the
        # boot poll's lag hides in healthy_after.
        assert took == pytest.approx(ready + MIN_HEALTHY, abs=1e-3)


# Five nodes in batches of 1, 2, 2; every wait is on virtual time, so exact.
GATED_POLICY = """\
batches: {canary: 1, size: 2, max_unavailable: 2}
health: {checks: [{type: agent}], interval: 5s, min_healthy_time: 0s, deadline: 2m,
         boot_timeout: 10m}
failure: {max_failed: 0, action: ACTION}
gates:
  - {name: ci, kind: wait, after: canary, count: 3, timeout: 30m}
  - {name: ok, kind: approval, after: every, timeout: 1h}
  - {name: soak, kind: bake, after: canary, duration: 5m}
"""


def gated(tmp_path: Path, action: str = "halt") -> Path:
    return policy_file(tmp_path, action, GATED_POLICY)


def gate_entries(state: Path) -> list[dict[str, Any]]:
    store = SQLiteStore(state)
    try:
        (rid,) = store.rollout_ids()
        return [e.data for e in store.entries(rid) if e.kind == "gate"]
    finally:
        store.close()


def test_scripted_gates_pass_after_their_delay_through_the_real_commands(tmp_path: Path) -> None:
    state = tmp_path / "sim.db"
    code, r = simulate_json(
        "--policy", str(gated(tmp_path)), "--nodes", "5", "--boot", "1m", "--healthy-after",
        "0s", "--gate", "ci=pass@10m", "--gate", "ok=pass@20m", "--state", str(state),
    )  # fmt: skip
    assert code == 0 and r["phase"] == "succeeded", r
    assert r["settings"]["gates"] == {
        "ci": {"outcome": "pass", "after": 600.0},
        "ok": {"outcome": "pass", "after": 1200.0},
    }
    rows = [(g["gate"], g["after_batch"], g["result"]) for g in r["gates"]]
    assert sorted(rows) == sorted(
        [("ci", 1, "passed"), ("soak", 1, "passed"),
         ("ok", 1, "passed"), ("ok", 2, "passed"), ("ok", 3, "passed")]
    )  # fmt: skip
    waited = {"ci": 600.0, "ok": 1200.0, "soak": 300.0}
    for g in r["gates"]:
        assert g["end"] - g["start"] == pytest.approx(waited[g["gate"]], abs=1e-6), g
    batches = sum(b["end"] - b["start"] for b in r["batches"])
    assert r["duration"] == pytest.approx(batches + 600 + 300 + 3 * 1200, abs=1e-3)
    # What a CI system and an operator would have sent, journaled as theirs would be:
    # three distinct SUCCESS ids for ci, one approval per wait of ok.
    entries = gate_entries(state)
    signals = [e["signal"] for e in entries if e["event"] == "received_signal"]
    assert [s["status"] for s in signals] == ["SUCCESS"] * 3
    assert len({s["id"] for s in signals}) == 3
    decisions = [e for e in entries if e["event"] == "received_decision"]
    assert [(d["gate"], d["approved"], d["by"]) for d in decisions] == [
        ("ok", True, "simulate")
    ] * 3
    assert any("gate ci (wait): scripted: its SUCCESS signals arrive 10m" in n
               for n in r["not_simulated"])  # fmt: skip


@pytest.mark.parametrize(("script", "action", "phase", "gate", "after", "result", "why"), [
    ("ci=fail@5m", "rollback", "rolled_back", "ci", 300.0, "failed", "FAILURE"),
    ("ok=fail@7m", "halt", "halted", "ok", 420.0, "failed", "rejected"),
    ("ok=timeout", "halt", "halted", "ok", 3600.0, "timeout", "timeout"),
    ("ci=timeout", "rollback", "rolled_back", "ci", 1800.0, "timeout", "timed out"),
])  # fmt: skip
def test_a_scripted_gate_that_fails_or_times_out_triggers_the_policy(
    tmp_path: Path, script: str, action: str, phase: str, gate: str, after: float,
    result: str, why: str,
) -> None:  # fmt: skip
    others = [] if gate == "ok" else ["--gate", "ok=pass"]
    code, r = simulate_json(
        "--policy", str(gated(tmp_path, action)), "--nodes", "5", "--boot", "1m",
        "--healthy-after", "0s", "--gate", script, *(["--gate", "ci=pass"] if gate == "ok"
                                                      else others),
    )  # fmt: skip
    assert code == 1 and r["phase"] == phase, r
    assert len(r["batches"]) == 1  # the canary only: the gate after it ended the rollout
    (row,) = [g for g in r["gates"] if g["gate"] == gate]
    assert row["result"] == result and row["end"] - row["start"] == pytest.approx(after, abs=1e-6)
    assert why in r["message"], r["message"]


def test_a_decision_due_after_the_gate_timed_out_is_never_sent(tmp_path: Path) -> None:
    state = tmp_path / "sim.db"
    code, r = simulate_json(
        "--policy", str(gated(tmp_path)), "--nodes", "5", "--boot", "1m", "--healthy-after",
        "0s", "--gate", "ci=pass", "--gate", "ok=pass@2h", "--state", str(state),
    )  # fmt: skip
    assert code == 1 and r["phase"] == "halted"
    (ok,) = [g for g in r["gates"] if g["gate"] == "ok"]
    assert ok["result"] == "timeout" and ok["end"] - ok["start"] == pytest.approx(3600, abs=1e-6)
    assert [e for e in gate_entries(state) if e["event"] == "received_decision"] == []


@pytest.mark.parametrize(("args", "message"), [
    (["--gate", "nope=pass"], "--gate nope: the policy has no gate 'nope' (gates: ci, ok, soak)"),
    (["--gate", "ok=maybe"], "--gate ok=maybe: outcome must be pass, fail or timeout"),
    (["--gate", "ok"], "--gate ok: expected NAME=OUTCOME[@AFTER]"),
    (["--gate", "ci=pass@soon"], "--gate ci=pass@soon: after @: expected a duration"),
    (["--gate", "ci=timeout@5m"], "--gate ci=timeout@5m: a timeout comes when the gate's own"),
    (["--gate", "soak=pass"], "--gate soak: bake gates cannot be scripted"),
    (["--gate", "ci=pass", "--gate", "ci=fail"], "--gate ci: given more than once"),
])  # fmt: skip
def test_bad_gate_scripts_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    code, out = simulate("--policy", str(gated(tmp_path)), "--nodes", "3", *args)
    assert code == 2, out
    assert out.startswith("error: ") and message in out, out


def test_an_approval_without_timeout_cannot_be_scripted_to_time_out(tmp_path: Path) -> None:
    code, out = simulate("--policy", str(policy_file(tmp_path)), "--nodes", "3",
                         "--gate", "ok=timeout")  # fmt: skip
    assert code == 2 and "--gate ok=timeout: the approval gate ok has no timeout" in out, out


def test_a_wait_left_with_one_ulp_of_its_deadline_ends_on_virtual_time() -> None:
    # A wait woken before its deadline re-arms for what is left: here one float ulp,
    # which asyncio's clock resolution runs at once. The virtual clock must move to the
    # timer's time, or the wait finds time left, re-arms, and spins forever (it did: a
    # wait gate that got fewer signals than its count never timed out in a simulation).
    start = 1861.6050785877683
    ulp = math.nextafter(start, math.inf) - start
    out: list[tuple[str, float]] = []

    async def wait_out() -> None:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, VirtualClockLoop)
        loop.advance(start)
        result = await SignalBox("g").wait(1, ulp)
        out.append((result.status, loop.time()))

    worker = threading.Thread(target=lambda: run_virtual(wait_out()), daemon=True)
    worker.start()
    worker.join(60)  # a bound on a regression: it would spin, not fail
    assert out == [("timeout", start + ulp)]
