"""How much the metrics recorder costs per engine event, and how big /metrics gets.

    .venv/bin/python benchmarks/bench_metrics.py [NODES]

Feeds a whole successful rollout of NODES nodes (default 10000: 7 phase changes, 5 steps,
2 health checks and 1 transfer per node) into a MetricsRecorder and prints events per
second and the exposition's size and render time. The recorder adjusts node counts
incrementally, so the cost per event does not grow with the fleet.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator

from prometheus_client import generate_latest

from rollout.events import (
    BatchFinished,
    BatchStarted,
    BytesSent,
    Event,
    HealthChecked,
    NodeChanged,
    RolloutFinished,
    RolloutStarted,
    StepDone,
)
from rollout.metrics import MetricsRecorder
from rollout.model import Batch, Image, Node, NodePhase, RolloutPhase, Step

PHASES = (NodePhase.STAGING, NodePhase.STAGED, NodePhase.ACTIVATING, NodePhase.BOOTING,
          NodePhase.VERIFYING, NodePhase.HEALTHY, NodePhase.COMMITTED)  # fmt: skip


def events(count: int) -> Iterator[Event]:
    nodes = [Node(f"node-{i:05d}", f"10.0.{i // 250}.{i % 250}:7000") for i in range(count)]
    size = max(1, count // 10)
    batches = tuple(
        Batch(b + 1, tuple(nodes[i : i + size])) for b, i in enumerate(range(0, count, size))
    )
    image = Image("/v2.img", "sha256:" + "0" * 64, "sample", "2.0.0", 50_000_000)
    yield RolloutStarted("bench", image, "bench", batches, count)
    for batch in batches:
        yield BatchStarted(batch, len(batches))
        for node in batch.nodes:
            for phase in PHASES:
                yield NodeChanged(node.id, batch.index, phase)
            yield BytesSent(node.id, image.size)
            for step in (Step.STAGE, Step.ACTIVATE, Step.BOOT, Step.VERIFY, Step.COMMIT):
                yield StepDone(node.id, step, 1.0, True)
            yield HealthChecked(node.id, "http", True)
            yield HealthChecked(node.id, "agent", True)
        yield BatchFinished(batch, 0, "continue")
    yield RolloutFinished(RolloutPhase.SUCCEEDED, "done")


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    stream = list(events(count))
    recorder = MetricsRecorder()
    start = time.perf_counter()
    for event in stream:
        recorder(event)
    took = time.perf_counter() - start
    start = time.perf_counter()
    text = generate_latest(recorder.registry)
    render = time.perf_counter() - start
    print(
        f"nodes {count}: {len(stream)} events in {took:.3f}s "
        f"({len(stream) / took:,.0f} events/s, {took / len(stream) * 1e6:.1f} us/event)"
    )
    lines = text.count(b"\n")
    print(f"/metrics: {len(text):,} bytes, {lines:,} lines, "
          f"rendered in {render * 1000:.1f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
