"""The JUnit report of a rollout (`rollout run --junit FILE`), for CI systems.

An observer collects what a report needs while the rollout runs (time spent per node,
each gate's outcome); `write` then makes one test case per node (classname
`rollout.batch<N>`, failed when the node failed, skipped when the rollout never reached
it) and one per gate run (classname `rollout.gate`, failed unless it passed).
"""

from __future__ import annotations

import time
from collections import defaultdict

from rollout.engine import RolloutResult
from rollout.events import Event, StepDone
from rollout.gates.events import GateFinished, GateWaiting
from rollout.gates.junit import JUnitCase, write_junit
from rollout.model import NodePhase


class JUnitReport:
    def __init__(self, rollout_id: str) -> None:
        self.rollout_id = rollout_id
        self.node_seconds: dict[str, float] = defaultdict(float)
        self.gate_since: dict[str, float] = {}
        self.gate_cases: list[JUnitCase] = []

    def __call__(self, event: Event) -> None:
        if isinstance(event, StepDone):
            self.node_seconds[event.node_id] += event.seconds
        elif isinstance(event, GateWaiting):
            self.gate_since.setdefault(event.gate, event.since.timestamp())
        elif isinstance(event, GateFinished):
            since = self.gate_since.pop(event.gate, None)
            runs = sum(c.name.split(" #")[0] == event.gate for c in self.gate_cases)
            name = event.gate if not runs else f"{event.gate} #{runs + 1}"
            seconds = 0.0 if since is None else max(0.0, time.time() - since)
            failure = None if event.result == "passed" else f"{event.result}: {event.message}"
            self.gate_cases.append(
                JUnitCase("rollout.gate", name, seconds, failure, f"{event.kind}: {event.message}")
            )

    def cases(self, result: RolloutResult) -> list[JUnitCase]:
        out = []
        for rec in result.nodes.values():
            failure = None
            if rec.failed or rec.phase is NodePhase.ROLLBACK_FAILED:
                failure = f"{rec.reason or 'failed'}: {rec.detail}"
            skipped = "not reached" if rec.phase is NodePhase.PENDING and not failure else None
            out.append(
                JUnitCase(
                    f"rollout.batch{rec.batch}",
                    rec.node.id,
                    self.node_seconds.get(rec.node.id, 0.0),
                    failure,
                    f"phase {rec.phase}, version {rec.version}",
                    skipped,
                )
            )
        return out + self.gate_cases

    def write(self, path: str, result: RolloutResult) -> None:
        write_junit(path, f"rollout {self.rollout_id}: {result.phase}", self.cases(result))
