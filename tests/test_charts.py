"""charts/: the Grafana dashboard refers only to metrics the recorder exports, through the
`datasource` variable; the Prometheus rules are valid and their promtool unit tests pass."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from rollout.metrics import MetricsRecorder
from rollout.model import RolloutPhase

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "charts" / "grafana" / "rollout.json"
RULES = ROOT / "charts" / "prometheus" / "rules.yaml"
RULE_TESTS = ROOT / "charts" / "prometheus" / "rules.test.yaml"

# A metric name in PromQL: an identifier not followed by "(" (a function) and not a label
# name inside {...} or by (...). Recording-rule names (with ":") are matched separately.
_NAME = re.compile(r"(?<![\w:$.])([a-zA-Z_][a-zA-Z0-9_:]*)(?![\w:])")
_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "bool", "offset", "inf", "nan",
}  # fmt: skip
_SUFFIXES = ("_bucket", "_count", "_sum", "_total", "_created", "_info")


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is not on PATH; .ci/run installs the prometheus package")
        pytest.skip("promtool not on PATH (apt-get install prometheus)")
    return path


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects: strip strings, label matchers and groupings,
    then keep identifiers that are not functions or keywords."""
    expr = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)  # string literals
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range and subquery windows
    expr = re.sub(r"\$\w+", "", expr)  # dashboard variables outside matchers
    names = set()
    for m in _NAME.finditer(expr):
        name = m.group(1)
        rest = expr[m.end() :].lstrip()
        if rest.startswith("(") or name.lower() in _KEYWORDS:
            continue
        names.add(name)
    return names


def exported_families() -> set[str]:
    """Every sample name the recorder can expose, with and without type suffixes."""
    names: set[str] = set()
    for family in MetricsRecorder().registry.collect():
        names.add(family.name)
        if family.type == "counter":
            names |= {family.name + "_total", family.name + "_created"}
        elif family.type == "histogram":
            names |= {family.name + s for s in ("_bucket", "_count", "_sum", "_created")}
    return names


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # collapsed rows hold their panels


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def test_metric_name_parser() -> None:
    expr = (
        "histogram_quantile(0.9, sum by (le, step) (rate(rollout_node_step_duration_seconds"
        '_bucket{rollout=~"$rollout", step="boot"}[$__rate_interval]))) / on (rollout) '
        "group_left (policy) rollout_info > bool 0 unless rollout:progress:ratio"
    )
    assert metric_names(expr) == {
        "rollout_node_step_duration_seconds_bucket", "rollout_info", "rollout:progress:ratio",
    }  # fmt: skip


def test_dashboard_shape(dashboard: dict[str, Any]) -> None:
    assert dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert "rollout" in variables
    for var in variables.values():
        if var["type"] == "query":
            assert var["datasource"]["uid"] == "${datasource}", var["name"]
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    titles = " | ".join(p["title"].lower() for p in panels(dashboard))
    for wanted in ("progress", "phase timeline", "node states", "failures and rollbacks",
                   "heatmap", "p50 / p90 / p99", "throughput", "gate waits", "retries",
                   "health-check failure rate"):  # fmt: skip
        assert wanted in titles, wanted


def test_every_panel_uses_the_datasource_variable(dashboard: dict[str, Any]) -> None:
    for panel in panels(dashboard):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
    assert '"uid": "${datasource}"' in DASHBOARD.read_text()


def test_dashboard_only_uses_exported_metrics(dashboard: dict[str, Any]) -> None:
    exported = exported_families()
    exprs = [t["expr"] for p in panels(dashboard) for t in p["targets"]]
    for var in dashboard["templating"]["list"]:
        if "definition" in var:  # label_values(<selector>, <label name>)
            selector = re.fullmatch(r"label_values\((.*),\s*\w+\)", var["definition"])
            assert selector, var["definition"]
            exprs.append(selector.group(1))
    used: set[str] = set()
    for expr in exprs:
        used |= metric_names(expr)
    assert used, "no metric found in the dashboard"
    unknown = sorted(n for n in used if n not in exported)
    assert unknown == [], f"dashboard queries metrics the recorder does not export: {unknown}"
    # Every rollout-level family the recorder exports shows somewhere on the dashboard.
    shown = {re.sub(r"_(bucket|count|sum|total)$", "", n) for n in used}
    families = {f.name for f in MetricsRecorder().registry.collect()
                if f.name.startswith("rollout_")}  # fmt: skip
    assert families - shown == set(), "exported but not on the dashboard"


def test_phase_panels_name_every_rollout_phase(dashboard: dict[str, Any]) -> None:
    """The phase panels turn one-hot `rollout_phase` into a code (`... * i` per phase) and
    map the code back to a name: both must cover every phase, with the same numbers."""
    phase_panels = [p for p in panels(dashboard) if p["title"] in ("Phase", "Phase timeline")]
    assert len(phase_panels) == 2
    for panel in phase_panels:
        expr = panel["targets"][0]["expr"]
        codes = dict(re.findall(r'phase="(\w+)"\}\) \* (\d+)', expr))
        assert set(codes) == {str(p) for p in RolloutPhase}, panel["title"]
        mapping = panel["fieldConfig"]["defaults"]["mappings"][0]["options"]
        assert {v["text"]: k for k, v in mapping.items()} == codes, panel["title"]


def test_rules_only_use_exported_metrics_or_their_own_records() -> None:
    doc = yaml.safe_load(RULES.read_text())
    rules = [r for g in doc["groups"] for r in g["rules"]]
    known = exported_families() | {r["record"] for r in rules if "record" in r} | {"up"}
    for rule in rules:
        unknown = metric_names(rule["expr"]) - known
        assert not unknown, f"{rule.get('alert') or rule.get('record')}: {unknown}"
    alerts = {r["alert"] for r in rules if "alert" in r}
    assert alerts == {
        "RolloutHalted", "RolloutNoProgress", "RolloutNodeRolledBack",
        "RolloutGateWaitingTooLong", "RolloutControllerDown",
    }  # fmt: skip


def test_promtool_check_rules_is_clean() -> None:
    proc = subprocess.run(
        [promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout and "WARNING" not in proc.stdout + proc.stderr


def test_promtool_rule_unit_tests_pass() -> None:
    proc = subprocess.run(
        [promtool(), "test", "rules", str(RULE_TESTS)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=RULE_TESTS.parent,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Every alert is tested, firing at least once and silent at least once.
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fired: set[str] = set()
    silent: set[str] = set()
    for test in tests:
        for case in test.get("alert_rule_test", []):
            (fired if case["exp_alerts"] else silent).add(case["alertname"])
    doc = yaml.safe_load(RULES.read_text())
    alerts = {r["alert"] for g in doc["groups"] for r in g["rules"] if "alert" in r}
    assert fired == alerts and silent == alerts
