"""Prometheus metrics: every metric defined here, fed by one observer of engine events.

The recorder owns its own CollectorRegistry (so tests and several engines in one process
never share state) and `serve()` exposes it over HTTP with prometheus-client's server.
Names and meanings are documented in docs/metrics.md and are a contract: dashboards
(charts/grafana) and alerts (charts/prometheus) depend on them.

Invariants:

- Every per-rollout series carries a `rollout` label (the rollout id), so several rollouts
  can share one controller process and one scrape; `forget(rollout_id)` drops a finished
  rollout's series once it no longer needs to be shown.
- Every other label is bounded: phases, node states, steps, results, reasons, check kinds,
  transport operations, gate names and kinds come from enums or from the policy, never
  from node ids or error text.
- Gauges that describe a rollout (`rollout_phase`, `rollout_nodes`) list every value of
  their enum, 0 for the ones not current, so a query never sees a hole and "one-hot"
  panels need no `or vector(0)`.
- `rollout_last_progress_timestamp_seconds` is wall-clock unix seconds (an alert compares
  it with Prometheus' `time()`); everything else is counts and durations.

Gates (bake, wait conditions, approvals, analysis) are not wired to engine events yet:
their families (`rollout_gate_waiting`, `rollout_gate_results_total`) are registered now
with no samples, and `gate_waiting()` / `gate_result()` record them.
"""

from __future__ import annotations

import platform
import threading
import time
from collections import Counter as Tally
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)

from rollout import __version__
from rollout.decide import Decision
from rollout.events import (
    BatchFinished,
    BatchStarted,
    BytesFetched,
    BytesSent,
    Event,
    HealthChecked,
    NodeChanged,
    Retried,
    RolloutFinished,
    RolloutPhaseChanged,
    RolloutStarted,
    StepDone,
    WebhookFailed,
)
from rollout.gates.events import GateFinished, GateWaiting
from rollout.model import NodePhase, Reason, RolloutPhase

# From a commit (milliseconds) to streaming a large image or a long bake (half an hour).
STEP_BUCKETS = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800,
)  # fmt: skip
# Node updates end committed, skipped or failed; a failed node's rollback is counted apart.
_RESULTS = {
    NodePhase.COMMITTED: "committed",
    NodePhase.SKIPPED: "skipped",
    NodePhase.FAILED: "failed",
}
_ROLLBACKS = {NodePhase.ROLLED_BACK: "ok", NodePhase.ROLLBACK_FAILED: "failed"}
# Decisions after a batch that start returning nodes to their previous image.
_ROLLING_BACK = frozenset({"rollback_batch", "rollback_all"})


@dataclass
class _Rollout:
    """What the recorder keeps about one rollout: its id and each node's phase."""

    id: str
    phases: dict[str, NodePhase] = field(default_factory=dict)
    # Every (metric, label values) this rollout created, with its child, so forget() can
    # remove them and an event does not look the child up again (labels() is costly).
    series: dict[tuple[Any, tuple[str, ...]], Any] = field(default_factory=dict)
    # What `rollout_nodes` and the progress timestamp read when collected (set_function).
    counts: Tally[NodePhase] = field(default_factory=Tally)
    progress_at: float = 0.0


class MetricsRecorder:
    """An engine observer that keeps Prometheus metrics current.

    `wall` returns unix seconds (for the progress timestamp); tests pass a fake.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._wall = wall
        self._rollouts: dict[str, _Rollout] = {}
        self._current: _Rollout | None = None
        self._server: Any = None
        self._collected = threading.Condition()
        self._collections = 0
        r = self.registry
        # Registered first, so collected first: a scrape counted after an event reads the
        # metrics after that event (wait_for_scrape relies on it).
        r.register(_CollectionCounter(self))
        # -- the controller --------------------------------------------------------------
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.build_info = Gauge(
            "rollout_build_info",
            "Controller build information: 1, labelled with its version.",
            ["version", "python_version"],
            registry=r,
        )
        self.build_info.labels(__version__, platform.python_version()).set(1)
        # -- one rollout: what and where -------------------------------------------------
        self.info = Gauge(
            "rollout_info",
            "1 for each rollout, labelled with its policy and target image.",
            ["rollout", "policy", "image", "image_version"],
            registry=r,
        )
        self.phase = Gauge(
            "rollout_phase",
            "1 for the rollout's current phase, 0 for the others.",
            ["rollout", "phase"],
            registry=r,
        )
        self.nodes = Gauge(
            "rollout_nodes",
            "Nodes of the rollout in each node state.",
            ["rollout", "state"],
            registry=r,
        )
        self.batch_current = Gauge(
            "rollout_batch_current",
            "1-based number of the batch in progress or last run (0 before the first).",
            ["rollout"],
            registry=r,
        )
        self.batch_total = Gauge(
            "rollout_batches", "Number of batches in the rollout's plan.", ["rollout"],
            registry=r,
        )  # fmt: skip
        self.started = Gauge(
            "rollout_start_timestamp_seconds",
            "Unix time the rollout started.",
            ["rollout"],
            registry=r,
        )
        self.last_progress = Gauge(
            "rollout_last_progress_timestamp_seconds",
            "Unix time of the rollout's last node phase change (or of its start).",
            ["rollout"],
            registry=r,
        )
        # -- what happened ---------------------------------------------------------------
        self.batches_done = Counter(
            "rollout_batches_finished",
            "Batches finished, by the decision taken after them.",
            ["rollout", "decision"],
            registry=r,
        )
        self.updates = Counter(
            "rollout_node_updates",
            "Node updates finished, by result (committed, skipped, failed).",
            ["rollout", "result"],
            registry=r,
        )
        self.failures = Counter(
            "rollout_node_failures",
            "Node updates that failed, by reason.",
            ["rollout", "reason"],
            registry=r,
        )
        self.rollbacks = Counter(
            "rollout_node_rollbacks",
            "Nodes returned to their previous image, by result (ok, failed).",
            ["rollout", "result"],
            registry=r,
        )
        self.step_seconds = Histogram(
            "rollout_node_step_duration_seconds",
            "Duration of each node update step, by step and result (ok, error).",
            ["rollout", "step", "result"],
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.bytes = Counter(
            "rollout_image_bytes_transferred",
            "Image bytes streamed to node agents.",
            ["rollout"],
            registry=r,
        )
        self.fetched = Counter(
            "rollout_image_bytes_fetched",
            "Image bytes node agents pulled from the image store (pull mode).",
            ["rollout"],
            registry=r,
        )
        self.retries = Counter(
            "rollout_retries",
            "Transport retries towards node agents, by operation.",
            ["rollout", "operation"],
            registry=r,
        )
        self.checks = Counter(
            "rollout_health_checks",
            "Health check results, by check kind and result (pass, fail).",
            ["rollout", "check", "result"],
            registry=r,
        )
        # -- gates (families present with no samples until a gate runs) ------------------
        self.gate_waiting_gauge = Gauge(
            "rollout_gate_waiting",
            "1 while the rollout waits on this gate, 0 once it is passed or failed.",
            ["rollout", "gate", "kind"],
            registry=r,
        )
        self.gate_results = Counter(
            "rollout_gate_results",
            "Gates finished, by kind and result (passed, failed, timeout).",
            ["rollout", "kind", "result"],
            registry=r,
        )
        self.webhook_failures = Counter(
            "rollout_webhook_failures",
            "Webhook deliveries given up after retries, by the rollout event they carried.",
            ["rollout", "event"],
            registry=r,
        )

    # -- the observer ------------------------------------------------------------------------
    def bound(self, rollout_id: str) -> Callable[[Event], None]:
        """An observer for one rollout's engine: with several rollouts in one process
        (the service), events are attributed to the rollout whose engine sent them."""

        def observe(event: Event) -> None:
            if not isinstance(event, RolloutStarted):
                self._current = self._rollouts.get(rollout_id, self._current)
            self(event)

        return observe

    def __call__(self, event: Event) -> None:
        ro = self._current
        # A node's phase changes and step durations first: they are nearly every event.
        if isinstance(event, NodeChanged):
            if ro is None:
                return
            phase = event.phase
            self._move_node(ro, event.node_id, phase)
            ro.progress_at = self._wall()  # read by the gauge when collected
            if phase in _RESULTS:
                self._inc(self.updates, ro, _RESULTS[phase])
            elif phase in _ROLLBACKS:
                self._inc(self.rollbacks, ro, _ROLLBACKS[phase])
            if phase is NodePhase.FAILED:
                self._inc(self.failures, ro, str(event.reason or "unknown"))
            return
        if isinstance(event, StepDone):
            if ro is None:
                return
            result = "ok" if event.ok else "error"
            self._child(self.step_seconds, ro, str(event.step), result).observe(event.seconds)
            return
        if isinstance(event, RolloutStarted):
            self._start(event)
            return
        if ro is None:
            return  # no rollout to attribute it to (the engine always starts with one)
        if isinstance(event, BatchStarted):
            self._set(self.batch_current, ro, value=event.batch.index)
        elif isinstance(event, BytesSent):
            self._inc(self.bytes, ro, amount=event.count)
        elif isinstance(event, BytesFetched):
            self._inc(self.fetched, ro, amount=event.count)
        elif isinstance(event, Retried):
            self._inc(self.retries, ro, event.operation)
        elif isinstance(event, HealthChecked):
            self._inc(self.checks, ro, event.check, "pass" if event.ok else "fail")
        elif isinstance(event, BatchFinished):
            self._inc(self.batches_done, ro, event.decision)
            if event.decision in _ROLLING_BACK:
                self._set_phase(ro, RolloutPhase.ROLLING_BACK)
        elif isinstance(event, RolloutPhaseChanged):
            self._set_phase(ro, event.phase)
        elif isinstance(event, GateWaiting):
            self.gate_waiting(event.gate, event.kind, True)
        elif isinstance(event, GateFinished):
            self.gate_result(event.gate, event.kind, event.result)
        elif isinstance(event, WebhookFailed):
            self._inc(self.webhook_failures, ro, event.event)
        elif isinstance(event, RolloutFinished):
            self._set_phase(ro, event.phase)

    # -- gates (called by the gate runner; no engine event carries them yet) ----------------
    def gate_waiting(self, gate: str, kind: str, waiting: bool) -> None:
        """Mark the current rollout as waiting (or no longer) on `gate` of `kind`."""
        if self._current is not None:
            self._set(self.gate_waiting_gauge, self._current, gate, kind, value=int(waiting))

    def gate_result(self, gate: str, kind: str, result: str) -> None:
        """Record a finished gate: it stops waiting and its result is counted."""
        if self._current is not None:
            self.gate_waiting(gate, kind, False)
            self._inc(self.gate_results, self._current, kind, result)

    # -- lifecycle ---------------------------------------------------------------------------
    def forget(self, rollout_id: str) -> None:
        """Remove every series of a rollout (a long-lived controller calls this some time
        after the rollout finished, so series do not accumulate)."""
        ro = self._rollouts.pop(rollout_id, None)
        if ro is None:
            return
        for metric, labels in ro.series:
            metric.remove(ro.id, *labels)
        if self._current is ro:
            self._current = None

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        """Expose /metrics on host:port from a background thread (port 0: any free port;
        `port` tells which)."""
        started = start_http_server(port, addr=host, registry=self.registry)
        self._server = started[0] if isinstance(started, tuple) else None

    @property
    def collections(self) -> int:
        """How many times the registry was collected (each /metrics scrape is one)."""
        with self._collected:
            return self._collections

    def wait_for_scrape(self, timeout: float, since: int | None = None, count: int = 1) -> bool:
        """Block until the registry has been collected `count` times (scrapes of /metrics)
        after this call, or after `collections` was `since`; at most `timeout` seconds.
        True if it was. A one-shot `rollout run` calls it with count=2 before exiting: a
        collection is counted when it starts, and Prometheus scrapes a target one scrape
        at a time, so the second start means the first scrape after the final state was
        answered in full (exiting at the first could cut its answer off)."""
        deadline = time.monotonic() + timeout
        with self._collected:
            seen = self._collections if since is None else since
            while self._collections < seen + count:
                left = deadline - time.monotonic()
                if left <= 0 or not self._collected.wait(left):
                    return self._collections >= seen + count
        return True

    def _was_collected(self) -> None:
        with self._collected:
            self._collections += 1
            self._collected.notify_all()

    @property
    def port(self) -> int | None:
        """The port `serve()` listens on, or None when not serving."""
        if self._server is None:
            return None
        return int(self._server.server_address[1])

    def close(self) -> None:
        """Stop serving /metrics (if `serve()` was called)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # -- helpers -----------------------------------------------------------------------------
    def _start(self, event: RolloutStarted) -> None:
        # The same rollout started again in this process (resumed after a pause, a halt or
        # a retry) keeps its series and what the recorder knows of its nodes.
        known = self._rollouts.get(event.rollout_id)
        ro = known or _Rollout(event.rollout_id)
        self._rollouts[ro.id] = ro
        self._current = ro
        self._set(self.info, ro, event.policy, event.image.name, event.image.version, value=1)
        self._set(self.batch_total, ro, value=len(event.batches))
        self._set(self.batch_current, ro, value=0)
        now = self._wall()
        if known is None:
            self._set(self.started, ro, value=now)
        ro.progress_at = now
        self._child(self.last_progress, ro).set_function(lambda: ro.progress_at)
        ro.phases = {
            n.id: event.phases.get(n.id) or ro.phases.get(n.id, NodePhase.PENDING)
            for b in event.batches
            for n in b.nodes
        }
        self._set_phase(ro, RolloutPhase.RUNNING)
        self._count_nodes(ro)
        # Counters whose label values are known start at 0, so that the first failure or
        # rollback is an increase Prometheus can see (a series born at 1 shows none).
        self._inc(self.bytes, ro, amount=0)
        self._inc(self.fetched, ro, amount=0)
        for result in _RESULTS.values():
            self._inc(self.updates, ro, result, amount=0)
        for result in _ROLLBACKS.values():
            self._inc(self.rollbacks, ro, result, amount=0)
        for reason in Reason:
            self._inc(self.failures, ro, str(reason), amount=0)
        for decision in Decision:
            self._inc(self.batches_done, ro, str(decision), amount=0)

    def _child(self, metric: Any, ro: _Rollout, *labels: str) -> Any:
        key = (metric, labels)
        child = ro.series.get(key)
        if child is None:
            child = ro.series[key] = metric.labels(ro.id, *labels)
        return child

    def _set(self, metric: Gauge, ro: _Rollout, *labels: str, value: float) -> None:
        self._child(metric, ro, *labels).set(value)

    def _inc(self, metric: Counter, ro: _Rollout, *labels: str, amount: float = 1) -> None:
        self._child(metric, ro, *labels).inc(amount)

    def _set_phase(self, ro: _Rollout, phase: RolloutPhase) -> None:
        for p in RolloutPhase:
            self._set(self.phase, ro, str(p), value=1 if p is phase else 0)

    def _count_nodes(self, ro: _Rollout) -> None:
        """`rollout_nodes` reads the rollout's tally when collected: a node's move is
        two dict updates, not two locked gauge updates."""
        ro.counts = counts = Tally(ro.phases.values())
        for s in NodePhase:
            self._child(self.nodes, ro, str(s)).set_function(lambda s=s: counts[s])

    def _move_node(self, ro: _Rollout, node_id: str, phase: NodePhase) -> None:
        """One node changed state: adjust two counts (O(1), whatever the fleet's size)."""
        old = ro.phases.get(node_id)
        ro.phases[node_id] = phase
        counts = ro.counts
        if old is not None:
            counts[old] -= 1
        counts[phase] += 1


class _CollectionCounter:
    """A collector with no metrics that tells the recorder each time it is collected."""

    def __init__(self, recorder: MetricsRecorder) -> None:
        self.recorder = recorder

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> list[Any]:
        self.recorder._was_collected()
        return []
