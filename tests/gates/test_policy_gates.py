"""The gates and notify sections of a policy: values, the shipped example, every error."""

from __future__ import annotations

import doctest
from pathlib import Path
from types import SimpleNamespace

import pytest

import rollout.gates.schedule
from rollout.errors import InputError
from rollout.gates.schedule import after_batch, before_batch, unreachable
from rollout.policy import (
    AlertsGate,
    AnalysisGate,
    ApprovalGate,
    BakeGate,
    Notify,
    Policy,
    WaitGate,
    WindowGate,
    load_policy,
    parse_policy,
)

POLICIES = Path(__file__).resolve().parents[2] / "policies"
PROM = "http://prom:9090"


def test_schedule_docstring_examples() -> None:
    result = doctest.testmod(rollout.gates.schedule)
    assert result.attempted > 0 and result.failed == 0


def test_defaults_have_no_gates() -> None:
    assert Policy().gates == () and Policy().notify == ()


def test_shipped_gated_policy() -> None:
    p = load_policy(POLICIES / "gated.yaml")
    assert [(g.name, g.kind) for g in p.gates] == [
        ("no-critical-alerts", "alerts"),
        ("night-window", "window"),
        ("canary-tests", "wait"),
        ("canary-error-rate", "analysis"),
        ("bake", "bake"),
    ]
    alerts, window, wait, analysis, bake = p.gates
    assert isinstance(alerts, AlertsGate) and alerts.match == {"severity": "critical"}
    assert (alerts.before, alerts.interval, alerts.timeout) == ("every", 30, None)
    assert isinstance(window, WindowGate) and window.before == "after-canary"
    assert (window.timezone, window.days, window.start, window.end) == (
        "Europe/Berlin", ("mon", "tue", "wed", "thu", "fri"), "22:00", "06:00",
    )  # fmt: skip
    assert isinstance(wait, WaitGate) and (wait.after, wait.count, wait.timeout) == (
        "canary", 1, 1800,
    )  # fmt: skip
    assert isinstance(analysis, AnalysisGate)
    assert (analysis.success, analysis.failure) == ("result < 0.01", "result > 0.05")
    assert (analysis.interval, analysis.count, analysis.inconclusive_limit) == (60, 3, 1)
    assert analysis.consecutive_error_limit == 4 and analysis.on_inconclusive == "pause"
    assert isinstance(bake, BakeGate) and (bake.after, bake.duration) == ("every", 300)
    (hook,) = p.notify
    assert hook.events == ("started", "gate_waiting", "halted", "rolled_back", "succeeded")
    assert parse_policy(p.model_dump(mode="json"), "again") == p


def test_gate_defaults() -> None:
    p = parse_policy(
        {
            "gates": [
                {"name": "w", "kind": "wait", "after": 2},
                {"name": "ok", "kind": "approval", "after": "every"},
                {"name": "q", "kind": "analysis", "after": "canary", "prometheus": PROM,
                 "query": "up", "failure": "result == 0"},
                {"name": "win", "kind": "window", "start": "9:00", "end": "24:00"},
            ],
            "notify": [{"url": "https://hooks.example/x"}],
        },
        "p.yaml",
    )  # fmt: skip
    wait, approval, analysis, window = p.gates
    assert isinstance(wait, WaitGate) and (wait.count, wait.timeout) == (1, 3600)
    assert isinstance(approval, ApprovalGate) and approval.timeout is None
    assert isinstance(analysis, AnalysisGate)
    assert (analysis.interval, analysis.count, analysis.initial_delay) == (60, 1, 0)
    assert (analysis.success, analysis.failure_limit, analysis.inconclusive_limit) == (None, 0, 0)
    assert isinstance(window, WindowGate) and (window.timezone, window.start) == ("UTC", "09:00")
    assert window.days == ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
    assert p.notify == (Notify(url="https://hooks.example/x"),)
    assert p.notify[0].events == (
        "started", "batch_done", "gate_waiting", "halted", "rolled_back", "succeeded",
    )  # fmt: skip


GOOD_ANALYSIS = f"kind: analysis, after: canary, prometheus: '{PROM}', query: up"

ERRORS = [
    ("gates: x", "gates: expected a list, got \"x\""),
    ("gates: [{name: a}]",
     'gates[0]: missing "kind" (allowed: bake, wait, approval, analysis, alerts, window)'),
    ("gates: [{name: a, kind: sleep}]",
     'gates[0]: unknown gate kind "sleep" (allowed: bake, wait, approval, analysis, alerts, '
     "window)"),
    ("gates: [{kind: bake, after: 1, duration: 1}]", "gates[0].name: required field missing"),
    ("gates: [{name: Bake, kind: bake, after: 1, duration: 1}]",
     'gates[0].name: must be lowercase letters, digits and "-" (not at either end), at most 63 '
     'characters, e.g. "canary-bake"; got "Bake"'),
    ("gates: [{name: -x, kind: bake, after: 1, duration: 1}]", "gates[0].name: must be lowercase"),
    ("gates: [{name: a, kind: bake, duration: 1}]", "gates[0].after: required field missing"),
    ("gates: [{name: a, kind: bake, after: 0, duration: 1}]",
     'gates[0].after: expected "canary", "every" or a batch number >= 1, got 0'),
    ("gates: [{name: a, kind: bake, after: last, duration: 1}]",
     'gates[0].after: expected "canary", "every" or a batch number >= 1, got "last"'),
    ("gates: [{name: a, kind: bake, after: true, duration: 1}]",
     'gates[0].after: expected "canary", "every" or a batch number >= 1, got true'),
    ("gates: [{name: a, kind: bake, after: 1}]", "gates[0].duration: required field missing"),
    ("gates: [{name: a, kind: bake, after: 1, duration: 0}]",
     "gates[0].duration: must be greater than 0, got 0"),
    ("gates: [{name: a, kind: bake, after: 1, duration: soon}]",
     'gates[0].duration: expected a duration like "500ms", "5s", "2m" or "1h30m", got "soon"'),
    ("gates: [{name: a, kind: bake, after: 1, duration: 1, count: 2}]",
     "gates[0].count: unknown field (known: name, kind, after, duration)"),
    ("gates: [{name: a, kind: bake, after: 1, duration: 1}, {name: b, kind: bake, after: 2, "
     "duration: 1}, {name: a, kind: approval, after: 3}]",
     'gates[2].name: "a" is already the name of gates[0]; gate names must be unique'),
    ("batches: {canary: 0}\ngates: [{name: a, kind: bake, after: canary, duration: 1}]",
     'gates[0].after: "canary" refers to the canary, but batches.canary is 0 (no canary batch)'),
    ("batches: {canary: 0}\ngates: [{name: a, kind: window, before: after-canary, "
     "start: '22:00', end: '06:00'}]",
     'gates[0].before: "after-canary" refers to the canary, but batches.canary is 0'),
    ("gates: [{name: a, kind: wait, after: 1, count: 0}]",
     "gates[0].count: must be at least 1, got 0"),
    ("gates: [{name: a, kind: wait, after: 1, timeout: -5}]",
     'gates[0].timeout: must not be negative, got -5'),
    ("gates: [{name: a, kind: approval, after: 1, timeout: 0}]",
     "gates[0].timeout: must be greater than 0, got 0"),
    # analysis
    (f"gates: [{{name: a, {GOOD_ANALYSIS}}}]",
     "gates[0].success: an analysis needs a success or a failure condition (or both), "
     'e.g. success: "result < 0.01"'),
    (f"gates: [{{name: a, {GOOD_ANALYSIS}, success: \"__import__('os')\"}}]",
     'gates[0].success: column 1: unknown name "__import__" (known: result, isNaN, and, or, '
     "not)"),
    (f"gates: [{{name: a, {GOOD_ANALYSIS}, failure: 'result >'}}]",
     'gates[0].failure: column 9: expected a number, "result" or "(", got the end'),
    (f"gates: [{{name: a, {GOOD_ANALYSIS}, success: 1}}]",
     "gates[0].success: expected a string, got 1"),
    (f"gates: [{{name: a, {GOOD_ANALYSIS}, success: 'result < 1', count: 2, failure_limit: 2}}]",
     "gates[0].failure_limit: must be less than count (2), or no measurement could fail the "
     "analysis; got 2"),
    (f"gates: [{{name: a, {GOOD_ANALYSIS}, success: 'result < 1', on_inconclusive: fail}}]",
     'gates[0].on_inconclusive: expected one of: pause; got "fail"'),
    (f"gates: [{{name: a, {GOOD_ANALYSIS}, success: 'result < 1', count: 1.5}}]",
     "gates[0].count: expected a whole number, got 1.5"),
    ("gates: [{name: a, kind: analysis, after: 1, prometheus: 'prom:9090', query: up, "
     "success: 'result < 1'}]",
     'gates[0].prometheus: expected an http:// or https:// URL, got "prom:9090"'),
    ("gates: [{name: a, kind: analysis, after: 1, prometheus: 'http://p', query: '', "
     "success: 'result < 1'}]", "gates[0].query: must not be empty"),
    # alerts
    ("gates: [{name: a, kind: alerts}]", "gates[0].prometheus: required field missing"),
    (f"gates: [{{name: a, kind: alerts, prometheus: '{PROM}', match: {{severity: 2}}}}]",
     "gates[0].match.severity: expected a string, got 2"),
    (f"gates: [{{name: a, kind: alerts, prometheus: '{PROM}', match: [critical]}}]",
     "gates[0].match: expected a mapping, got a list"),
    (f"gates: [{{name: a, kind: alerts, prometheus: '{PROM}', after: canary}}]",
     "gates[0].after: unknown field (known: name, kind, before, prometheus, match, interval, "
     "timeout)"),
    (f"gates: [{{name: a, kind: alerts, prometheus: '{PROM}', before: canary}}]",
     'gates[0].before: expected one of: every, after-canary; got "canary"'),
    # window
    ("gates: [{name: a, kind: window, start: 22:00, end: '06:00'}]",
     'gates[0].start: expected a time like "22:00" in quotes (YAML reads an unquoted 22:00 as '
     "the number 1320), got 1320"),
    ("gates: [{name: a, kind: window, start: '22:00'}]", "gates[0].end: required field missing"),
    ("gates: [{name: a, kind: window, start: '22:00', end: '25:00'}]",
     'gates[0].end: expected a time "HH:MM" (24-hour clock), got "25:00"'),
    ("gates: [{name: a, kind: window, start: '24:00', end: '06:00'}]",
     "gates[0].start: hours must be 00-23 (or 24:00 to end at midnight); 24:00 is only allowed "
     'as an end, got "24:00"'),
    ("gates: [{name: a, kind: window, start: '6:00', end: '06:00'}]",
     'gates[0].end: must differ from start (06:00); for whole days write start "00:00", end '
     '"24:00"'),
    ("gates: [{name: a, kind: window, start: '22:00', end: '06:00', days: [mon, funday]}]",
     'gates[0].days: unknown day "funday" (days: mon, tue, wed, thu, fri, sat, sun; ranges like '
     "mon-fri)"),
    ("gates: [{name: a, kind: window, start: '22:00', end: '06:00', days: []}]",
     "gates[0].days: must not be empty (list the days the window opens on)"),
    ("gates: [{name: a, kind: window, start: '22:00', end: '06:00', timezone: Europe/Berln}]",
     'gates[0].timezone: unknown time zone "Europe/Berln" (use an IANA name like '
     '"Europe/Berlin" or "UTC")'),
    ("gates: [{name: a, kind: window, start: '22:00', end: '06:00', timezone: ../../etc/passwd}]",
     'gates[0].timezone: unknown time zone "../../etc/passwd"'),
    # notify
    ("notify: [{events: [halted]}]", "notify[0].url: required field missing"),
    ("notify: [{url: 'ftp://x'}]", 'notify[0].url: expected an http:// or https:// URL, got "ftp://x"'),
    ("notify: [{url: 'http://x', events: [done]}]",
     "notify[0].events[0]: expected one of: started, batch_done, gate_waiting, halted, "
     'rolled_back, succeeded; got "done"'),
    ("notify: [{url: 'http://x', events: []}]", "notify[0].events: must not be empty"),
    ("notify: [{url: 'http://x', headers: {X-Token: 5}}]",
     "notify[0].headers.X-Token: expected a string, got 5"),
    ("notify: [{url: 'http://x', secret: y}]",
     "notify[0].secret: unknown field (known: url, events, headers, timeout)"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "message"), ERRORS)
def test_errors_are_one_line_with_the_field(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(text + "\n")
    with pytest.raises(InputError) as err:
        load_policy(path)
    line = str(err.value)
    assert "\n" not in line
    assert line.startswith(f"{path}: {message}"), line


def test_schedule() -> None:
    p = load_policy(POLICIES / "gated.yaml")
    canary = SimpleNamespace(index=1, canary=True)
    second = SimpleNamespace(index=2, canary=False)
    assert [g.name for g in before_batch(p.gates, canary)] == ["no-critical-alerts"]
    assert [g.name for g in before_batch(p.gates, second)] == ["no-critical-alerts", "night-window"]
    assert [g.name for g in after_batch(p.gates, canary)] == [
        "canary-tests", "canary-error-rate", "bake",
    ]  # fmt: skip
    assert [g.name for g in after_batch(p.gates, second)] == ["bake"]
    numbered = parse_policy({"gates": [{"name": "x", "kind": "approval", "after": 3}]}, "p")
    third = SimpleNamespace(index=3, canary=False)
    assert after_batch(numbered.gates, third) == numbered.gates
    assert after_batch(numbered.gates, second) == ()
    assert unreachable(numbered.gates, [canary, second]) == [
        "gate x: after batch 3, but the plan has 2 batch(es); it never runs"
    ]
    assert unreachable(p.gates, [second]) == [
        "gate canary-tests: after the canary, but the plan has no canary batch",
        "gate canary-error-rate: after the canary, but the plan has no canary batch",
    ]
