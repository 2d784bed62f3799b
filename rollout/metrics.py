"""Prometheus metrics: every metric defined here, fed by one observer of engine events.

The recorder owns its own CollectorRegistry (so tests and several engines in one process
never share state) and `serve()` exposes it over HTTP with prometheus-client's server.
Labels are bounded: phases, steps, results and check kinds are enums, never raw errors.
Names and meanings are documented in docs/metrics.md; keep them stable.
"""

from __future__ import annotations

from collections import Counter as Tally

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from rollout import __version__
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
)
from rollout.model import NodePhase, RolloutPhase

STEP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)
# Node updates end committed, skipped or failed; a failed node's rollback is counted apart.
_RESULTS = {
    NodePhase.COMMITTED: "committed",
    NodePhase.SKIPPED: "skipped",
    NodePhase.FAILED: "failed",
}
_ROLLBACKS = {NodePhase.ROLLED_BACK: "ok", NodePhase.ROLLBACK_FAILED: "failed"}


class MetricsRecorder:
    """An engine observer that keeps Prometheus metrics current."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.build_info = Gauge(
            "rollout_build_info", "Controller build information.", ["version"], registry=r
        )
        self.build_info.labels(__version__).set(1)
        self.info = Gauge(
            "rollout_info",
            "The current rollout: 1 for its id, policy and target image version.",
            ["rollout", "policy", "image_version"],
            registry=r,
        )
        self.phase = Gauge(
            "rollout_phase", "1 for the rollout's current phase, 0 for the others.", ["phase"],
            registry=r,
        )
        self.nodes = Gauge(
            "rollout_nodes", "Nodes of the rollout in each state.", ["state"], registry=r
        )
        self.batch_current = Gauge(
            "rollout_batch_current", "1-based number of the batch in progress (0 before).",
            registry=r,
        )
        self.batch_total = Gauge("rollout_batches", "Number of batches in the plan.", registry=r)
        self.updates = Counter(
            "rollout_node_updates", "Node updates finished, by result.", ["result"], registry=r
        )
        self.rollbacks = Counter(
            "rollout_node_rollbacks", "Nodes returned to their previous image, by result.",
            ["result"], registry=r,
        )
        self.step_seconds = Histogram(
            "rollout_node_step_duration_seconds",
            "Duration of each node update step.",
            ["step", "result"],
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.bytes = Counter(
            "rollout_image_bytes_transferred", "Image bytes streamed to agents.", registry=r
        )
        self.retries = Counter(
            "rollout_retries", "Transport retries, by operation.", ["operation"], registry=r
        )
        self.checks = Counter(
            "rollout_health_checks", "Health check rounds per check kind and result.",
            ["check", "result"], registry=r,
        )
        self.batches_done = Counter(
            "rollout_batches_finished", "Batches finished, by decision taken after them.",
            ["decision"], registry=r,
        )
        for p in RolloutPhase:
            self.phase.labels(str(p)).set(0)
        for s in NodePhase:
            self.nodes.labels(str(s)).set(0)
        self._phases: dict[str, NodePhase] = {}

    def __call__(self, event: Event) -> None:
        if isinstance(event, RolloutStarted):
            self.info.labels(event.rollout_id, event.policy, event.image.version).set(1)
            self.batch_total.set(len(event.batches))
            self.batch_current.set(0)
            self._phases = {n.id: NodePhase.PENDING for b in event.batches for n in b.nodes}
            self._set_phase(RolloutPhase.RUNNING)
            self._count_nodes()
        elif isinstance(event, BatchStarted):
            self.batch_current.set(event.batch.index)
        elif isinstance(event, NodeChanged):
            self._phases[event.node_id] = event.phase
            self._count_nodes()
            if event.phase in _RESULTS:
                self.updates.labels(_RESULTS[event.phase]).inc()
            elif event.phase in _ROLLBACKS:
                self.rollbacks.labels(_ROLLBACKS[event.phase]).inc()
        elif isinstance(event, StepDone):
            self.step_seconds.labels(str(event.step), "ok" if event.ok else "error").observe(
                event.seconds
            )
        elif isinstance(event, BytesSent):
            self.bytes.inc(event.count)
        elif isinstance(event, Retried):
            self.retries.labels(event.operation).inc()
        elif isinstance(event, HealthChecked):
            self.checks.labels(event.check, "pass" if event.ok else "fail").inc()
        elif isinstance(event, BatchFinished):
            self.batches_done.labels(event.decision).inc()
        elif isinstance(event, RolloutFinished):
            self._set_phase(event.phase)

    def _set_phase(self, phase: RolloutPhase) -> None:
        for p in RolloutPhase:
            self.phase.labels(str(p)).set(1 if p is phase else 0)

    def _count_nodes(self) -> None:
        tally = Tally(self._phases.values())
        for s in NodePhase:
            self.nodes.labels(str(s)).set(tally.get(s, 0))

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        """Expose /metrics on host:port from a background thread."""
        start_http_server(port, addr=host, registry=self.registry)
