"""The metrics recorder: its arithmetic on hand-built events, and a lint-clean exposition."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from rollout.events import (
    BatchFinished,
    BatchStarted,
    BytesSent,
    Event,
    HealthChecked,
    NodeChanged,
    Retried,
    RolloutFinished,
    RolloutStarted,
    StepDone,
    WebhookFailed,
)
from rollout.metrics import MetricsRecorder
from rollout.model import Batch, Image, Node, NodePhase, Reason, RolloutPhase, Step

RID = "r1"
IMAGE = Image("/img/v2.img", "sha256:" + "ab" * 32, "sample", "2.0.0", 1000)
NODES = tuple(Node(f"n{i}", f"127.0.0.{i + 2}:7000") for i in range(3))
BATCHES = (Batch(1, NODES[:1], canary=True), Batch(2, NODES[1:]))
UPDATE = (
    NodePhase.STAGING, NodePhase.STAGED, NodePhase.ACTIVATING, NodePhase.BOOTING,
    NodePhase.VERIFYING, NodePhase.HEALTHY, NodePhase.COMMITTED,
)  # fmt: skip


class FakeWall:
    def __init__(self) -> None:
        self.t = 1_700_000_000.0

    def __call__(self) -> float:
        return self.t


def node_update(node: str, batch: int, ok: bool = True) -> Iterator[Event]:
    """The events of one node update, as the engine emits them; fails at verify if not ok."""
    for phase in UPDATE:
        if not ok and phase is NodePhase.HEALTHY:
            yield StepDone(node, Step.VERIFY, 3.0, False)
            yield NodeChanged(node, batch, NodePhase.FAILED, Reason.UNHEALTHY, "500 from /")
            yield NodeChanged(node, batch, NodePhase.ROLLING_BACK)
            yield StepDone(node, Step.ROLLBACK, 4.0, True)
            yield NodeChanged(node, batch, NodePhase.ROLLED_BACK)
            return
        yield NodeChanged(node, batch, phase)
        if phase is NodePhase.STAGING:
            yield BytesSent(node, 600)
            yield Retried(node, "stage", 1, "connection reset")
            yield BytesSent(node, 400)
        elif phase is NodePhase.STAGED:
            yield StepDone(node, Step.STAGE, 0.4, True)
        elif phase is NodePhase.BOOTING:
            yield StepDone(node, Step.ACTIVATE, 0.02, True)
        elif phase is NodePhase.VERIFYING:
            yield StepDone(node, Step.BOOT, 1.5, True)
            yield HealthChecked(node, "http", ok)
            yield HealthChecked(node, "agent", True)
        elif phase is NodePhase.HEALTHY:
            yield StepDone(node, Step.VERIFY, 0.8, True)
            yield StepDone(node, Step.COMMIT, 0.01, True)


def rollout_events(bad_last: bool = False) -> Iterator[Event]:
    """A whole rollout: canary, then a batch of two (whose last node may fail)."""
    yield RolloutStarted(RID, IMAGE, "canary", BATCHES, 3)
    yield BatchStarted(BATCHES[0], 2)
    yield from node_update("n0", 1)
    yield BatchFinished(BATCHES[0], 0, "continue")
    yield BatchStarted(BATCHES[1], 2)
    yield from node_update("n1", 2)
    yield from node_update("n2", 2, ok=not bad_last)
    if bad_last:
        yield BatchFinished(BATCHES[1], 1, "halt")
        yield RolloutFinished(RolloutPhase.HALTED, "batch 2: 1 node(s) failed")
    else:
        yield BatchFinished(BATCHES[1], 0, "continue")
        yield RolloutFinished(RolloutPhase.SUCCEEDED, "3 node(s) on 2.0.0")


def feed(recorder: MetricsRecorder, events: Iterator[Event]) -> None:
    for e in events:
        recorder(e)


def value(rec: MetricsRecorder, name: str, **labels: str) -> float | None:
    got = rec.registry.get_sample_value(name, {"rollout": RID, **labels})
    return None if got is None else float(got)


def nodes_by_state(rec: MetricsRecorder) -> dict[str, float]:
    out = {str(s): value(rec, "rollout_nodes", state=str(s)) for s in NodePhase}
    return {k: v for k, v in out.items() if v}


def phases(rec: MetricsRecorder) -> dict[str, float | None]:
    return {str(p): value(rec, "rollout_phase", phase=str(p)) for p in RolloutPhase}


def test_node_counts_follow_phase_changes() -> None:
    rec = MetricsRecorder()
    rec(RolloutStarted(RID, IMAGE, "canary", BATCHES, 3))
    assert nodes_by_state(rec) == {"pending": 3}
    rec(NodeChanged("n0", 1, NodePhase.STAGING))
    assert nodes_by_state(rec) == {"pending": 2, "staging": 1}
    rec(NodeChanged("n1", 2, NodePhase.STAGING))
    rec(NodeChanged("n0", 1, NodePhase.STAGED))
    assert nodes_by_state(rec) == {"pending": 1, "staging": 1, "staged": 1}
    rec(NodeChanged("n0", 1, NodePhase.FAILED, Reason.BOOT_TIMEOUT))
    rec(NodeChanged("n1", 2, NodePhase.SKIPPED))
    assert nodes_by_state(rec) == {"pending": 1, "failed": 1, "skipped": 1}
    # Every state is listed, 0 when no node is in it.
    assert value(rec, "rollout_nodes", state="rollback_failed") == 0


def test_phase_gauge_is_one_hot_through_a_rollback() -> None:
    rec = MetricsRecorder()
    rec(RolloutStarted(RID, IMAGE, "canary", BATCHES, 3))
    seen = phases(rec)
    assert seen.pop("running") == 1 and set(seen.values()) == {0}
    rec(BatchFinished(BATCHES[0], 1, "rollback_batch"))
    seen = phases(rec)
    assert seen.pop("rolling_back") == 1 and set(seen.values()) == {0}
    rec(RolloutFinished(RolloutPhase.ROLLED_BACK, "rolled back"))
    seen = phases(rec)
    assert seen.pop("rolled_back") == 1 and set(seen.values()) == {0}


def test_a_whole_rollout_adds_up() -> None:
    wall = FakeWall()
    rec = MetricsRecorder(wall=wall)
    events = list(rollout_events())
    feed(rec, iter(events[:1]))
    assert value(rec, "rollout_start_timestamp_seconds") == wall.t
    wall.t += 42
    feed(rec, iter(events[1:]))
    assert value(rec, "rollout_last_progress_timestamp_seconds") == wall.t
    assert value(rec, "rollout_start_timestamp_seconds") == wall.t - 42
    assert value(rec, "rollout_info", policy="canary", image="sample", image_version="2.0.0") == 1
    assert value(rec, "rollout_phase", phase="succeeded") == 1
    assert nodes_by_state(rec) == {"committed": 3}
    assert value(rec, "rollout_batches") == 2
    assert value(rec, "rollout_batch_current") == 2
    assert value(rec, "rollout_batches_finished_total", decision="continue") == 2
    assert value(rec, "rollout_node_updates_total", result="committed") == 3
    # Known label values start at 0, so a first failure is an increase Prometheus sees.
    assert value(rec, "rollout_node_updates_total", result="failed") == 0
    assert value(rec, "rollout_node_rollbacks_total", result="ok") == 0
    assert value(rec, "rollout_node_failures_total", reason="unhealthy") == 0
    assert value(rec, "rollout_image_bytes_transferred_total") == 3 * 1000
    assert value(rec, "rollout_retries_total", operation="stage") == 3
    assert value(rec, "rollout_health_checks_total", check="http", result="pass") == 3
    for step in ("stage", "activate", "boot", "verify", "commit"):
        count = value(rec, "rollout_node_step_duration_seconds_count", step=step, result="ok")
        assert count == 3, step
    assert value(rec, "rollout_node_step_duration_seconds_sum", step="boot", result="ok") == 4.5
    # 1.5 s boots fall in the 2.5 s bucket, not in the 1 s one.
    bucket = "rollout_node_step_duration_seconds_bucket"
    assert value(rec, bucket, step="boot", result="ok", le="1.0") == 0
    assert value(rec, bucket, step="boot", result="ok", le="2.5") == 3
    assert value(rec, bucket, step="boot", result="ok", le="+Inf") == 3


def test_failure_is_counted_by_reason_and_rollback_by_result() -> None:
    rec = MetricsRecorder()
    feed(rec, rollout_events(bad_last=True))
    assert value(rec, "rollout_phase", phase="halted") == 1
    assert nodes_by_state(rec) == {"committed": 2, "rolled_back": 1}
    assert value(rec, "rollout_node_updates_total", result="failed") == 1
    assert value(rec, "rollout_node_failures_total", reason="unhealthy") == 1
    assert value(rec, "rollout_node_rollbacks_total", result="ok") == 1
    assert value(rec, "rollout_health_checks_total", check="http", result="fail") == 1
    assert value(rec, "rollout_node_step_duration_seconds_count", step="verify",
                 result="error") == 1  # fmt: skip
    assert value(rec, "rollout_node_step_duration_seconds_count", step="rollback",
                 result="ok") == 1  # fmt: skip


def test_a_rollout_started_again_keeps_its_nodes_and_counters() -> None:
    wall = FakeWall()
    rec = MetricsRecorder(wall=wall)
    events = list(rollout_events())
    cut = next(i for i, e in enumerate(events) if isinstance(e, BatchStarted) and i > 1)
    feed(rec, iter(events[:cut]))  # the canary is committed, then the run stops
    wall.t += 60
    feed(rec, iter(events[:1]))  # ... and is resumed: the engine starts it again
    assert nodes_by_state(rec) == {"committed": 1, "pending": 2}
    assert value(rec, "rollout_start_timestamp_seconds") == wall.t - 60
    assert value(rec, "rollout_last_progress_timestamp_seconds") == wall.t
    feed(rec, iter(events[cut:]))
    assert nodes_by_state(rec) == {"committed": 3}
    assert value(rec, "rollout_node_updates_total", result="committed") == 3
    assert value(rec, "rollout_phase", phase="succeeded") == 1


def test_gates_have_families_but_no_samples_until_used() -> None:
    rec = MetricsRecorder()
    families = {m.name: m for m in rec.registry.collect()}
    assert families["rollout_gate_waiting"].samples == []
    assert families["rollout_gate_results"].samples == []
    feed(rec, iter(list(rollout_events())[:4]))
    rec.gate_waiting("bake-canary", "bake", True)
    assert value(rec, "rollout_gate_waiting", gate="bake-canary", kind="bake") == 1
    rec.gate_result("bake-canary", "bake", "passed")
    assert value(rec, "rollout_gate_waiting", gate="bake-canary", kind="bake") == 0
    assert value(rec, "rollout_gate_results_total", kind="bake", result="passed") == 1


def test_two_rollouts_keep_apart_and_forget_removes_one() -> None:
    rec = MetricsRecorder()
    feed(rec, rollout_events())
    rec(RolloutStarted("r2", IMAGE, "canary", BATCHES, 3))
    rec(BytesSent("n0", 5))
    reg = rec.registry
    assert reg.get_sample_value("rollout_image_bytes_transferred_total", {"rollout": "r2"}) == 5
    assert value(rec, "rollout_image_bytes_transferred_total") == 3000
    rec.forget(RID)
    text = generate_latest(reg).decode()
    assert 'rollout="r1"' not in text and 'rollout="r2"' in text
    assert "rollout_build_info{" in text


def test_wait_for_scrape_returns_once_metrics_are_fetched() -> None:
    rec = MetricsRecorder()
    rec.serve(0, "127.0.0.1")
    try:
        assert rec.wait_for_scrape(0.05) is False  # nobody scrapes
        fetched: list[bytes] = []

        def scrape() -> None:
            with urllib.request.urlopen(f"http://127.0.0.1:{rec.port}/metrics", timeout=10) as r:
                fetched.append(r.read())

        since = rec.collections
        scraper = threading.Thread(target=scrape)
        scraper.start()
        assert rec.wait_for_scrape(10, since=since) is True
        scraper.join(10)
        assert b"rollout_build_info" in fetched[0]
    finally:
        rec.close()


def test_labels_never_carry_node_ids_or_error_text() -> None:
    rec = MetricsRecorder()
    feed(rec, rollout_events(bad_last=True))
    text = generate_latest(rec.registry).decode()
    for needle in ("n0", "n1", "n2", "127.0.0", "connection reset", "500 from"):
        assert f'"{needle}' not in text, needle


def test_exposition_passes_promtool_check_metrics() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is not on PATH; .ci/run installs the prometheus package")
        pytest.skip("promtool not on PATH (apt-get install prometheus)")
    rec = MetricsRecorder()
    feed(rec, rollout_events(bad_last=True))
    rec.gate_waiting("approval", "approval", True)
    exposition = generate_latest(rec.registry)
    proc = subprocess.run(
        [promtool, "check", "metrics"], input=exposition, capture_output=True, timeout=30
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, b"", b""), exposition.decode()


def test_docs_table_matches_the_registry() -> None:
    """docs/metrics.md lists every rollout_* family with its type and labels, and no more."""
    docs = (Path(__file__).resolve().parent.parent / "docs" / "metrics.md").read_text()
    table = docs.split("## Rollout metrics", 1)[1].split("\n## ", 1)[0]
    documented = {}
    for row in re.findall(r"^\| `(rollout_\w+)` \| (\w+) \| ([^|]*) \|", table, re.M):
        name, kind, labels = row
        documented[name] = (kind, tuple(re.findall(r"`(\w+)`", labels)))
    rec = MetricsRecorder()
    feed(rec, rollout_events(bad_last=True))
    rec.gate_result("bake", "bake", "passed")
    rec(WebhookFailed("http://127.0.0.1:9/hook", "halted", "connection refused"))
    exported = {}
    for family in rec.registry.collect():
        if not family.name.startswith("rollout_"):
            continue
        name = family.name + ("_total" if family.type == "counter" else "")
        first = next(s for s in family.samples if not s.name.endswith("_created"))
        labels = tuple(k for k in first.labels if k != "le")
        exported[name] = (family.type, labels)
    assert documented == exported
