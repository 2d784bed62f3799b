"""`rollout simulate`: predict a rollout's timeline on simulated nodes, on virtual time.

What runs is what `rollout run` runs: the `Controller` (create: plan, lock, journal; then
execute: rebuild from the journal, leases, the `Engine`), the real planner, the bake gates,
metrics, and the durable SQLite journal (a temporary file unless a state path is given).
Only the edges are simulated:

- the nodes: `rollout.drivers.sim`, on the agent's own pure state machine (a failing
  node's workload fails on the new image, or with `fail_mode` "boot" the image never
  comes up and the node falls back to its last good slot after a second boot). A boot takes
  `boot` seconds (or each node its own time in [boot, boot_max], `draw_boot_times`: a
  batch waits for its slowest node), the workload is `starting` for `healthy_after`
  seconds after each boot, and a seeded draw of `fail_rate` of the nodes run a workload
  that fails on the new image (`draw_failing`: the same seed and inventory give the same
  nodes);
- the clock: `VirtualClockLoop`, an asyncio loop whose time jumps to the next timer when
  nothing is ready, so hours of boots and bakes pass in the CPU time the controller itself
  needs. A simulation is therefore also the benchmark of the controller's cost
  (benchmarks/bench_scale.py);
- the wall clock: window gates judge a virtual one, `SimSettings.start` (the real time
  by default) plus the virtual seconds gone, so a maintenance window delays the batches
  it would delay in a run started then (a rollout that misses Saturday's window waits,
  in the prediction, for the next Saturday);
- what needs the outside world (`simulation_policy`): health checks become the one `agent`
  check, answered by the simulated agents (no network); wait and approval gates run as
  they are when a `GateScript` (`--gate NAME=pass|fail|timeout[@AFTER]`) says what their
  outside world does: `GateScripter` sends, AFTER virtual seconds into each wait, the
  signals or the decision through the controller's own commands (journaled as a real one
  is); unscripted ones, and analysis and alerts gates (Prometheus), are taken as passing
  at once and listed in the report; webhooks are not sent; node locks and agent leases
  are taken once and not renewed (nobody else contends for simulated nodes).

`Timeline` is the observer that turns the engine's events into the prediction: each
batch's start and end, nodes out of service over time, failures and the policy's reaction
(halt, rollback), the total duration. `report_json` and `render_text` present it.

Worked example (50 nodes, policy batches canary 1 / size 25% / max_unavailable 25%,
health interval 5 s, min_healthy_time 20 s, --boot 90s --healthy-after 20s): the planner
cuts batches of 1, 12, 12, 12, 12, 1; in each, a node reboots for 90 s, its workload
starts 20 s later (seen at the controller's next status poll, about 1.6 s late after a
110 s wait: rollout.steps.poll_delay), and the fifth check, 20 s on, commits it: 131.6 s
a batch, 6 batches, 13 minutes.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import selectors
import tempfile
from collections import Counter
from collections.abc import Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from rollout import clock
from rollout.controller import Controller, RetryHook
from rollout.drivers.sim import SimDriver, SimFleet
from rollout.errors import InputError
from rollout.events import (
    BatchFinished,
    BatchStarted,
    Event,
    Fanout,
    NodeChanged,
    Observer,
    RolloutFinished,
    RolloutPhaseChanged,
)
from rollout.gates.events import GateFinished, GateWaiting
from rollout.gates.schedule import BEFORE_KINDS
from rollout.journal import LockConflict, SQLiteStore
from rollout.model import Image, Node, NodePhase, RolloutPhase
from rollout.plan import limits
from rollout.policy import AgentCheck, ApprovalGate, Policy, WaitGate
from rollout.pull import PullAccess
from rollout.units import fmt_duration, parse_duration

__all__ = [
    "GateScript",
    "GateScripter",
    "SimReport",
    "SimSettings",
    "Timeline",
    "VirtualClockLoop",
    "draw_failing",
    "parse_gate_script",
    "parse_labels",
    "render_text",
    "report_json",
    "run_virtual",
    "simulate",
    "simulation_policy",
    "synthetic_nodes",
]

T = TypeVar("T")

# The images a simulated fleet moves between (nothing reads their bytes).
CURRENT = Image("simulated-current.img", "sha256:" + "c" * 64, "simulated", "current", 1 << 30)
TARGET = Image("simulated-target.img", "sha256:" + "7" * 64, "simulated", "target", 1 << 30)
# Virtual seconds after which a simulation gives up (a rollout that would never end).
MAX_VIRTUAL = 30 * 86400.0
# Node locks and agent leases outlive any simulation: taken once, never renewed.
_SIM_LOCK_TTL = 10 * MAX_VIRTUAL
# Gate kinds that run as they are (bake on virtual time, window on the virtual wall
# clock); the others are assumed to pass at once.
_SIMULATED_GATES = frozenset({"bake", "window"})
# Gate kinds a `GateScript` can play (the others need Prometheus, or run as they are).
_SCRIPTABLE_GATES = frozenset({"wait", "approval"})
GATE_OUTCOMES = ("pass", "fail", "timeout")
_SERIES_POINTS = 24  # how many points the coarse out-of-service series has
_FIRST_FAILURES = 20  # failed nodes listed by name in the report


# -- virtual time ------------------------------------------------------------------------
class _VirtualSelector(selectors.BaseSelector):
    """A real selector that never sleeps: it polls ready I/O, and when nothing is ready and
    the loop's next timer is `timeout` away, moves the loop's clock there instead."""

    def __init__(self, loop: VirtualClockLoop) -> None:
        self._real = selectors.DefaultSelector()
        self._loop = loop

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._real.register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._real.unregister(fileobj)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._real.modify(fileobj, events, data)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = self._real.select(0)
        if ready or timeout == 0:
            return ready
        if timeout is None:  # no timer at all: only another thread can wake the loop
            return self._real.select(None)
        self._loop.advance(timeout)
        return []

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return self._real.get_map()

    def close(self) -> None:
        self._real.close()


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """An event loop on virtual time: `time()` starts at 0 and jumps to the next timer
    whenever no callback is ready, so `asyncio.sleep(3600)` takes no real time. Real I/O
    still works (it is polled), but a simulation must not wait on any: time would run on
    without it."""

    def __init__(self) -> None:
        self._virtual = 0.0
        super().__init__(_VirtualSelector(self))

    def time(self) -> float:
        return self._virtual

    def advance(self, seconds: float) -> None:
        self._virtual += seconds

    def _run_once(self) -> None:
        # asyncio also runs a timer due within its clock resolution (1 ns) of now. On a
        # real clock time has moved past it by then; this one must be moved, or a wait
        # that re-arms for what is left of its deadline (one float ulp, say) gets its
        # timer run at once, finds time left, re-arms, and spins forever.
        timers: list[asyncio.TimerHandle] = self._scheduled  # type: ignore[attr-defined]
        resolution: float = self._clock_resolution  # type: ignore[attr-defined]
        if timers:
            when = timers[0].when()
            if self._virtual < when < self._virtual + resolution:
                self._virtual = when
        super()._run_once()  # type: ignore[misc]


def run_virtual(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` to its end on a fresh `VirtualClockLoop` (as `asyncio.run` does)."""
    with asyncio.Runner(loop_factory=VirtualClockLoop) as runner:
        return runner.run(main)


# -- inputs ------------------------------------------------------------------------------
@dataclass(frozen=True)
class GateScript:
    """What a wait or approval gate's outside world does in a simulation, each time the
    gate waits: `outcome` "pass" (a wait gate gets its `count` SUCCESS signals, an approval
    is approved), "fail" (one FAILURE signal, a rejection) or "timeout" (nothing comes:
    the gate's own timeout decides), `after` virtual seconds into the wait."""

    outcome: str
    after: float = 0.0

    def describe(self, kind: str) -> str:
        if self.outcome == "timeout":
            return "scripted: nothing arrives, so it times out"
        what = {
            ("wait", "pass"): "its SUCCESS signals arrive",
            ("wait", "fail"): "a FAILURE signal arrives",
            ("approval", "pass"): "approved",
            ("approval", "fail"): "rejected",
        }[(kind, self.outcome)]
        return f"scripted: {what} {_span(self.after)} after it starts waiting"


def parse_gate_script(text: str) -> tuple[str, GateScript]:
    """`--gate NAME=OUTCOME[@AFTER]`: the gate's name and its script.

    >>> parse_gate_script("approve=pass@2h")
    ('approve', GateScript(outcome='pass', after=7200.0))
    >>> parse_gate_script(" smoke = fail ")
    ('smoke', GateScript(outcome='fail', after=0.0))
    >>> parse_gate_script("x=ok")
    Traceback (most recent call last):
    rollout.errors.InputError: --gate x=ok: outcome must be pass, fail or timeout, e.g. a=pass@2h
    """
    name, sep, rest = (part.strip() for part in text.partition("="))
    outcome, at, after = (part.strip() for part in rest.partition("@"))
    example = "e.g. a=pass@2h"
    if not sep or not name or not outcome:
        raise InputError(f"--gate {text.strip()}: expected NAME=OUTCOME[@AFTER], {example}")
    if outcome not in GATE_OUTCOMES:
        raise InputError(
            f"--gate {text.strip()}: outcome must be {', '.join(GATE_OUTCOMES[:-1])} or "
            f"{GATE_OUTCOMES[-1]}, {example}"
        )
    seconds = 0.0
    if at:
        if outcome == "timeout":
            raise InputError(
                f"--gate {text.strip()}: a timeout comes when the gate's own timeout says; "
                "drop the @AFTER"
            )
        try:
            seconds = parse_duration(after)
        except ValueError as exc:
            raise InputError(f"--gate {text.strip()}: after @: {exc}") from None
    return name, GateScript(outcome, seconds)


@dataclass(frozen=True)
class SimSettings:
    """How the simulated nodes behave (seconds, a fraction, a seed), and when it starts."""

    boot: float = 90.0  # activation to the agent answering again
    boot_max: float | None = None  # set: each node's boot drawn from [boot, boot_max]
    healthy_after: float = 20.0  # the workload is `starting` this long after each boot
    healthy_after_max: float | None = None  # set: each node's drawn from the range
    fail_rate: float = 0.0  # fraction of nodes that fail on the new image
    fail_mode: str = "workload"  # how they fail: "workload" (never healthy) or "boot"
    seed: int = 1
    stage: float = 0.0  # writing the image into the inactive slot
    start: datetime | None = None  # the wall-clock start window gates see; None: now
    gates: tuple[tuple[str, GateScript], ...] = ()  # scripted wait and approval gates

    def to_json(self) -> dict[str, Any]:
        return {
            "boot": self.boot,
            "boot_max": self.boot_max,
            "healthy_after": self.healthy_after,
            "healthy_after_max": self.healthy_after_max,
            "fail_rate": self.fail_rate,
            "fail_mode": self.fail_mode,
            "seed": self.seed,
            "stage": self.stage,
            "start": iso_utc(self.start) if self.start is not None else None,
            "gates": {
                name: {"outcome": script.outcome, "after": script.after}
                for name, script in self.gates
            },
        }


def iso_utc(at: datetime) -> str:
    """An aware time as ISO 8601 in UTC with Z, to the second (a prediction is no finer).

    >>> from datetime import timezone
    >>> iso_utc(datetime(2026, 12, 12, 3, 0, 0, 600000, tzinfo=timezone(timedelta(hours=1))))
    '2026-12-12T02:00:01Z'
    """
    whole = (at + timedelta(microseconds=500000)).replace(microsecond=0)
    return whole.astimezone(UTC).isoformat().replace("+00:00", "Z")


def parse_labels(text: str | None) -> dict[str, int]:
    """`--labels rack=4,zone=2`: label name -> how many values to spread the nodes over.

    >>> parse_labels("rack=4, zone=2")
    {'rack': 4, 'zone': 2}
    >>> parse_labels("rack")
    Traceback (most recent call last):
    rollout.errors.InputError: --labels: expected NAME=COUNT[,NAME=COUNT...] like rack=4, got 'rack'
    """
    out: dict[str, int] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        name, sep, count = (s.strip() for s in part.partition("="))
        if not sep or not name or not count.isdigit() or int(count) < 1:
            raise InputError(
                f"--labels: expected NAME=COUNT[,NAME=COUNT...] like rack=4, got {part.strip()!r}"
            )
        out[name] = int(count)
    return out


def synthetic_nodes(count: int, labels: Mapping[str, int] | None = None) -> tuple[Node, ...]:
    """`--nodes N`: node-001 ... with unique made-up addresses, each label's values dealt
    round-robin (the first label varies fastest), as racks usually are.

    >>> [(n.id, dict(n.labels)) for n in synthetic_nodes(3, {"rack": 2})]
    [('node-1', {'rack': 'rack-1'}), ('node-2', {'rack': 'rack-2'}), ('node-3', {'rack': 'rack-1'})]
    """
    if not 1 <= count <= 10_000_000:
        raise InputError(f"--nodes: expected 1 to 10000000 nodes, got {count}")
    width = len(str(count))
    specs = list((labels or {}).items())
    nodes = []
    for i in range(count):
        values: dict[str, str] = {}
        step = 1
        for name, n in specs:
            values[name] = f"{name}-{(i // step) % n + 1}"
            step *= n
        address = f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}:{7000 + (i >> 24)}"
        nodes.append(Node(f"node-{i + 1:0{width}d}", address, values))
    return tuple(nodes)


def draw_boot_times(
    node_ids: Sequence[str], low: float, high: float, seed: int, stream: str = "boot"
) -> dict[str, float]:
    """Each node's boot time (or with `stream` "healthy", its workload's start time),
    uniform in [low, high], drawn in inventory order from `seed` in a stream of its own:
    the failing nodes drawn from the same seed stay the same. A node boots (starts) that
    long every time (into the new image, and back on a rollback).

    >>> times = draw_boot_times(["a", "b", "c"], 60.0, 120.0, 7)
    >>> times == draw_boot_times(["a", "b", "c"], 60.0, 120.0, 7)
    True
    >>> all(60 <= t <= 120 for t in times.values()), len(set(times.values()))
    (True, 3)
    """
    rng = random.Random(f"{stream}/{seed}")
    return {n: rng.uniform(low, high) for n in node_ids}


def draw_failing(node_ids: Sequence[str], rate: float, seed: int) -> frozenset[str]:
    """The nodes whose workload fails on the new image: each independently with
    probability `rate`, drawn in inventory order from `seed` (repeatable).

    >>> sorted(draw_failing(["a", "b", "c"], 1.0, 7)), draw_failing(["a", "b"], 0.0, 7)
    (['a', 'b', 'c'], frozenset())
    """
    if rate <= 0:
        return frozenset()
    rng = random.Random(seed)
    return frozenset(n for n in node_ids if rng.random() < rate)


def simulation_policy(
    policy: Policy, scripts: Mapping[str, GateScript] | None = None
) -> tuple[Policy, list[str]]:
    """The policy as a simulation runs it, and what it left out or scripted (one line
    each).

    Health checks become the `agent` check (the simulated agents answer it), bake and
    window gates and the `scripts`' wait and approval gates stay, the other gates pass at
    once, webhooks are dropped; everything else is the policy as given. A script for a
    gate the policy lacks, for a kind that cannot be scripted, or a timeout for a gate
    that never times out is an InputError.
    """
    scripts = scripts or {}
    by_name = {g.name: g for g in policy.gates}
    for name, script in scripts.items():
        gate = by_name.get(name)
        if gate is None:
            known = ", ".join(sorted(by_name)) or "none"
            raise InputError(f"--gate {name}: the policy has no gate {name!r} (gates: {known})")
        if gate.kind not in _SCRIPTABLE_GATES:
            raise InputError(
                f"--gate {name}: {gate.kind} gates cannot be scripted; only wait and approval "
                "gates can (bake and window gates run as they are, on virtual time and "
                "--start; analysis and alerts gates are taken as passing)"
            )
        if script.outcome == "timeout" and isinstance(gate, ApprovalGate) and gate.timeout is None:
            raise InputError(
                f"--gate {name}=timeout: the approval gate {name} has no timeout (it waits as "
                "long as it takes); give it one in the policy, or script pass or fail"
            )
    notes: list[str] = []
    kinds = sorted({c.type for c in policy.health.checks} - {"agent"})
    if kinds:
        notes.append(
            f"health checks ({', '.join(kinds)}): answered by the simulated nodes' workload"
        )
    kept = tuple(g for g in policy.gates if g.kind in _SIMULATED_GATES or g.name in scripts)
    for gate in policy.gates:
        if gate.name in scripts:
            notes.append(
                f"gate {gate.name} ({gate.kind}): {scripts[gate.name].describe(gate.kind)}"
            )
        elif gate.kind not in _SIMULATED_GATES:
            hint = " (script it with --gate)" if gate.kind in _SCRIPTABLE_GATES else ""
            notes.append(f"gate {gate.name} ({gate.kind}): assumed to pass at once{hint}")
    if policy.notify:
        notes.append(f"webhooks ({len(policy.notify)}): not sent")
    health = policy.health.model_copy(update={"checks": (AgentCheck(),)})
    simulated = policy.model_copy(update={"health": health, "gates": kept, "notify": ()})
    return simulated, notes


class GateScripter:
    """Observer that plays the outside world of the scripted gates: when one starts
    waiting it sends, `after` virtual seconds later, what its outcome needs, through the
    controller's own commands (`signal`, `decide`: journaled and counted as an operator's
    or a `cfn-signal` would be). A wait gate that passes gets its `count` SUCCESS signals
    with ids of their own (each wait of an `every` gate new ones), one that fails a
    FAILURE; an approval is approved or rejected by "simulate". A gate that ends first
    (its timeout) is left alone, so nothing spills into its next wait."""

    def __init__(self, scripts: Mapping[str, GateScript], policy: Policy) -> None:
        self.scripts = dict(scripts)
        self._gates = {g.name: g for g in policy.gates if g.name in self.scripts}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._waits: Counter[str] = Counter()
        self.controller: Controller | None = None  # set once the rollout exists
        self.rollout_id = ""

    def __call__(self, event: Event) -> None:
        if type(event) is NodeChanged:  # the frequent event: out at once
            return
        if isinstance(event, GateWaiting):
            script = self.scripts.get(event.gate)
            if script is None or event.gate in self._timers or script.outcome == "timeout":
                return
            self._waits[event.gate] += 1
            self._timers[event.gate] = clock.running_loop().call_later(
                script.after, self._act, event.gate, self._waits[event.gate]
            )
        elif isinstance(event, GateFinished):
            timer = self._timers.pop(event.gate, None)
            if timer is not None:
                timer.cancel()

    def _act(self, name: str, wait: int) -> None:
        self._timers.pop(name, None)
        assert self.controller is not None, "GateScripter.controller is set after create"
        gate, passed = self._gates[name], self.scripts[name].outcome == "pass"
        if isinstance(gate, WaitGate):
            if passed:
                for k in range(gate.count):
                    body = {"status": "SUCCESS", "id": f"simulate-{wait}-{k + 1}"}
                    self.controller.signal(self.rollout_id, name, body)
            else:
                body = {"status": "FAILURE", "id": f"simulate-{wait}", "reason": "scripted"}
                self.controller.signal(self.rollout_id, name, body)
        else:
            self.controller.decide(self.rollout_id, name, passed, "simulate", "scripted")


# -- the prediction ----------------------------------------------------------------------
@dataclass
class BatchRow:
    number: int
    canary: bool
    nodes: int
    start: float
    end: float | None = None
    failed: int = 0
    decision: str | None = None


@dataclass
class GateRow:
    gate: str
    kind: str
    after_batch: int  # the last batch finished when it began to wait (0: none yet)
    start: float
    end: float | None = None
    result: str | None = None

    @property
    def before_batch(self) -> int | None:
        """The batch a before-batch condition (window, alerts) held back; else None."""
        return self.after_batch + 1 if self.kind in BEFORE_KINDS else None


@dataclass
class Failure:
    node: str
    batch: int
    at: float
    reason: str
    detail: str


class Timeline:
    """Observer of one simulated rollout: what happened when, in virtual seconds from the
    start. Cheap per event (it sees every node change of a 100,000-node fleet)."""

    def __init__(self) -> None:
        self.start = clock.now()
        self.batches: dict[int, BatchRow] = {}
        self.gates: list[GateRow] = []
        self.open_gates: dict[str, GateRow] = {}
        self.phases: list[tuple[float, str, str]] = []
        self.failures: list[Failure] = []
        self.failed_by_reason: Counter[str] = Counter()
        self.final: tuple[float, str, str] | None = None
        self.rolled_back = 0
        self._out: set[str] = set()  # nodes out of service now
        self.peak_out = 0
        self.series: list[tuple[float, int]] = [(0.0, 0)]  # (t, out of service from t)
        self._last_batch = 0

    def _now(self) -> float:
        return clock.now() - self.start

    def __call__(self, event: Event) -> None:
        if type(event) is NodeChanged:  # by far the most frequent: first, and cheap
            self._node(event)
        elif isinstance(event, BatchStarted):
            b = event.batch
            self.batches[b.index] = BatchRow(b.index, b.canary, len(b.nodes), self._now())
        elif isinstance(event, BatchFinished):
            row = self.batches.get(event.batch.index)
            if row is not None:
                row.end, row.failed, row.decision = self._now(), event.failed, event.decision
            self._last_batch = event.batch.index
        elif isinstance(event, GateWaiting):
            if event.gate not in self.open_gates:
                gate = GateRow(event.gate, event.kind, self._last_batch, self._now())
                self.open_gates[event.gate] = gate
                self.gates.append(gate)
        elif isinstance(event, GateFinished):
            gate_row = self.open_gates.pop(event.gate, None)
            if gate_row is None:
                gate_row = GateRow(event.gate, event.kind, self._last_batch, self._now())
                self.gates.append(gate_row)
            gate_row.end, gate_row.result = self._now(), event.result
        elif isinstance(event, RolloutPhaseChanged):
            self.phases.append((self._now(), str(event.phase), event.message))
        elif isinstance(event, RolloutFinished):  # the final phase is journaled, not "changed"
            self.final = (self._now(), str(event.phase), event.message)
            self.phases.append(self.final)

    def _node(self, event: NodeChanged) -> None:
        phase = event.phase
        out = self._out
        before = len(out)
        if phase.in_flight:
            out.add(event.node_id)
        else:
            out.discard(event.node_id)
            if phase is NodePhase.ROLLED_BACK:
                self.rolled_back += 1
            elif phase is NodePhase.FAILED:
                reason = str(event.reason) if event.reason else "failed"
                self.failed_by_reason[reason] += 1
                if len(self.failures) < _FIRST_FAILURES:
                    self.failures.append(
                        Failure(event.node_id, event.batch, self._now(), reason, event.detail)
                    )
        now_out = len(out)
        if now_out != before:
            if now_out > self.peak_out:
                self.peak_out = now_out
            t = self._now()
            if self.series[-1][0] == t:
                self.series[-1] = (t, now_out)
            else:
                self.series.append((t, now_out))


def coarse(series: Sequence[tuple[float, int]], end: float, points: int) -> list[tuple[float, int]]:
    """The most nodes out of service in each of `points` equal slices of [0, end].

    >>> coarse([(0.0, 0), (1.0, 5), (2.0, 0), (6.0, 3)], 8.0, 4)
    [(0.0, 5), (2.0, 0), (4.0, 0), (6.0, 3)]
    """
    if end <= 0 or not series:
        return [(0.0, max((n for _, n in series), default=0))]
    step = end / points
    out: list[tuple[float, int]] = []
    i, current = 0, 0
    for k in range(points):
        lo, hi = k * step, (k + 1) * step
        while i < len(series) and series[i][0] <= lo + 1e-9:  # changes at the slice's start
            current = series[i][1]
            i += 1
        peak = current  # what was out when the slice began
        while i < len(series) and series[i][0] < hi - 1e-9:
            current = series[i][1]
            peak = max(peak, current)
            i += 1
        out.append((round(lo, 3), peak))
    return out


@dataclass
class SimReport:
    """The prediction: what `render_text` prints and `report_json` gives as data."""

    rollout_id: str
    nodes: int
    policy_name: str
    settings: SimSettings
    phase: RolloutPhase
    message: str
    exit_code: int
    duration: float
    timeline: Timeline
    max_unavailable: int
    drawn_failing: int
    not_simulated: list[str] = field(default_factory=list)
    state_path: str | None = None

    def wall(self, t: float | None) -> str | None:
        """Virtual seconds from the start as the wall-clock time they stand for (UTC)."""
        start = self.settings.start
        if t is None or start is None:
            return None
        return iso_utc(start + timedelta(seconds=round(t, 3)))


def _r(t: float | None) -> float | None:
    return None if t is None else round(t, 3)


def report_json(report: SimReport) -> dict[str, Any]:
    tl = report.timeline
    return {
        "rollout": report.rollout_id,
        "policy": report.policy_name,
        "nodes": report.nodes,
        "settings": report.settings.to_json(),
        "phase": str(report.phase),
        "message": report.message,
        "duration": _r(report.duration),
        "ends_at": report.wall(report.duration),
        "batches": [
            {
                "number": b.number,
                "canary": b.canary,
                "nodes": b.nodes,
                "start": _r(b.start),
                "end": _r(b.end),
                "failed": b.failed,
                "decision": b.decision,
            }
            for b in sorted(tl.batches.values(), key=lambda b: b.number)
        ],
        "gates": [
            {
                "gate": g.gate,
                "kind": g.kind,
                "after_batch": g.after_batch,
                "before_batch": g.before_batch,
                "start": _r(g.start),
                "end": _r(g.end),
                "result": g.result,
            }
            for g in tl.gates
        ],
        "out_of_service": {
            "max": tl.peak_out,
            "max_unavailable": report.max_unavailable,
            "series": [
                {"t": t, "nodes": n} for t, n in coarse(tl.series, report.duration, _SERIES_POINTS)
            ],
        },
        "failures": {
            "drawn": report.drawn_failing,
            "failed": sum(tl.failed_by_reason.values()),
            "rolled_back": tl.rolled_back,
            "by_reason": dict(sorted(tl.failed_by_reason.items())),
            "first": [
                {
                    "node": f.node,
                    "batch": f.batch,
                    "at": _r(f.at),
                    "reason": f.reason,
                    "detail": f.detail,
                }
                for f in tl.failures
            ],
        },
        "phases": [{"at": _r(t), "phase": p, "message": m} for t, p, m in tl.phases],
        "not_simulated": list(report.not_simulated),
        "state": report.state_path,
    }


def fmt_t(seconds: float | None) -> str:
    """A virtual time from the start, as T+h:mm:ss (tenths when not whole).

    >>> fmt_t(0), fmt_t(130.4), fmt_t(3725)
    ('T+0:00:00', 'T+0:02:10.4', 'T+1:02:05')
    """
    if seconds is None:
        return "T+?"
    tenths = round(seconds * 10)
    whole, frac = divmod(tenths, 10)
    h, rest = divmod(whole, 3600)
    m, s = divmod(rest, 60)
    return f"T+{h}:{m:02d}:{s:02d}" + (f".{frac}" if frac else "")


def _span(seconds: float) -> str:
    """A duration for people, to a tenth of a second, zero units left out after the first.

    >>> [_span(t) for t in (4.2, 0, 720, 782.4, 3600, 3605, 3720.04)]
    ['4.2s', '0s', '12m', '13m2.4s', '1h', '1h0m5s', '1h2m']
    """
    tenths = round(seconds * 10)
    whole, frac = divmod(tenths, 10)
    h, rest = divmod(whole, 3600)
    m, s = divmod(rest, 60)
    sec = f"{s}.{frac}s" if frac else f"{s}s" if s or not (h or m) else ""
    if h:
        return f"{h}h" + (f"{m}m{sec}" if m or sec else "")
    return f"{m}m{sec}" if m else sec


_FAILING_TEXT = {"workload": "with a failing workload", "boot": "where the new image does not boot"}


def _range_text(low: float, high: float | None) -> str:
    if high is None or high <= low:
        return fmt_duration(low)
    return f"{fmt_duration(low)}..{fmt_duration(high)} (each node its own)"


def render_text(report: SimReport) -> list[str]:
    """The prediction as lines for a terminal or a CI log."""
    tl, s = report.timeline, report.settings
    started = f", starting {iso_utc(s.start)}" if s.start is not None else ""
    lines = [
        f"simulated rollout of {report.nodes} node(s), policy {report.policy_name or '?'}"
        f"{started}: boot {_range_text(s.boot, s.boot_max)}, healthy after "
        f"{_range_text(s.healthy_after, s.healthy_after_max)}, "
        f"fail rate {s.fail_rate * 100:g}% (seed {s.seed}, "
        f"{report.drawn_failing} node(s) {_FAILING_TEXT.get(s.fail_mode, 'failing')})"
    ]
    gates_after: dict[int, list[GateRow]] = {}
    held: dict[int, list[GateRow]] = {}  # before-batch waits, by the batch they held back
    for g in tl.gates:
        if g.before_batch is not None:
            held.setdefault(g.before_batch, []).append(g)
        else:
            gates_after.setdefault(g.after_batch, []).append(g)

    def gate_line(g: GateRow) -> str:
        line = f"  gate {g.gate} ({g.kind}): {fmt_t(g.start)} .. {fmt_t(g.end)} "
        line += g.result or "unfinished"
        if g.before_batch is None:
            return line
        until = report.wall(g.end)
        return line + f", before batch {g.before_batch}" + (f" (until {until})" if until else "")

    for b in sorted(tl.batches.values(), key=lambda b: b.number):
        lines.extend(gate_line(g) for g in held.pop(b.number, []))
        kind = " (canary)" if b.canary else ""
        end = fmt_t(b.end) if b.end is not None else "(did not finish)"
        tail = f" -> {b.decision}" if b.decision else ""
        lines.append(
            f"batch {b.number}{kind}: {fmt_t(b.start)} .. {end}  {b.nodes} node(s), "
            f"{b.failed} failed{tail}"
        )
        lines.extend(gate_line(g) for g in gates_after.get(b.number, []))
    for rows in held.values():  # a batch that never started (the window never opened)
        lines.extend(gate_line(g) for g in rows)
    lines.append(
        f"out of service: at most {tl.peak_out} node(s) at once "
        f"(max_unavailable {report.max_unavailable})"
    )
    series = coarse(tl.series, report.duration, 12)
    lines.append("  " + "  ".join(f"{fmt_t(t)} {n}" for t, n in series))
    failed = sum(tl.failed_by_reason.values())
    if failed:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(tl.failed_by_reason.items()))
        lines.append(f"failures: {failed} node(s) failed ({reasons}); {tl.rolled_back} rolled back")
        for f in tl.failures[:5]:
            lines.append(f"  {fmt_t(f.at)} {f.node} (batch {f.batch}): {f.reason}")
    else:
        lines.append("failures: none")
    quiet = {str(RolloutPhase.RUNNING), str(RolloutPhase.WAITING), str(RolloutPhase.SUCCEEDED)}
    for t, p, m in tl.phases:  # the policy's reaction: halts, rollbacks, pauses
        if p not in quiet:
            lines.append(f"policy: {fmt_t(t)} {p}" + (f" ({m})" if m else ""))
    for note in report.not_simulated:
        lines.append(f"not simulated: {note}")
    ends = report.wall(report.duration)
    lines.append(
        f"predicted duration: {_span(report.duration)}"
        + (f" (until {ends})" if ends else "")
        + f", ending {report.phase}"
        + (f": {report.message}" if report.message else "")
    )
    return lines


# -- the runner --------------------------------------------------------------------------
@contextlib.contextmanager
def _scratch(state_path: str | None) -> Iterator[tuple[Path, str]]:
    """A directory for the simulated nodes' token, and the journal's path in it (or the
    path given)."""
    with tempfile.TemporaryDirectory(prefix="rollout-simulate-") as tmp:
        yield Path(tmp), state_path or str(Path(tmp) / "state.db")


def simulate(
    nodes: Sequence[Node],
    policy: Policy,
    settings: SimSettings,
    *,
    policy_name: str = "",
    state_path: str | None = None,
    observers: Sequence[Observer] = (),
) -> SimReport:
    """Run the rollout of `nodes` under `policy` on simulated nodes and virtual time.

    `observers` see the engine's events besides the timeline (metrics, an event log).
    Bad input (no nodes, a state file whose unfinished rollout holds these nodes) is an
    InputError."""
    if not nodes:
        raise InputError("the simulation has no nodes")
    if settings.start is None:
        settings = replace(settings, start=datetime.now(UTC))
    start_at = settings.start
    assert start_at is not None
    scripts = dict(settings.gates)
    sim_policy, notes = simulation_policy(policy, scripts)
    failing = draw_failing([n.id for n in nodes], settings.fail_rate, settings.seed)
    with _scratch(state_path) as (tmp, journal_path):
        token = tmp / "token"
        token.write_text("simulated\n")
        # The inventory's own token and CA files are for real agents; none is read here.
        sim_nodes = [replace(n, token_file=str(token), ca_file=None) for n in nodes]
        fleet = SimFleet(
            sim_nodes,
            CURRENT,
            boot_seconds=settings.boot,
            stage_seconds=settings.stage,
            healthy_after=settings.healthy_after,
            healthy_times=(
                draw_boot_times(
                    [n.id for n in nodes],
                    settings.healthy_after,
                    settings.healthy_after_max,
                    settings.seed,
                    stream="healthy",
                )
                if settings.healthy_after_max is not None
                and settings.healthy_after_max > settings.healthy_after
                else None
            ),
            failing=failing if settings.fail_mode == "workload" else (),
            not_booting=failing if settings.fail_mode == "boot" else (),
            boot_times=(
                draw_boot_times(
                    [n.id for n in nodes], settings.boot, settings.boot_max, settings.seed
                )
                if settings.boot_max is not None and settings.boot_max > settings.boot
                else None
            ),
        )
        store = SQLiteStore(journal_path)
        try:

            def driver_for(holder: str, pull: PullAccess, hook: RetryHook | None) -> SimDriver:
                return SimDriver(fleet)

            async def run() -> tuple[str, Timeline, float, Any]:
                timeline = Timeline()
                scripter = GateScripter(scripts, sim_policy)
                observer = Fanout([timeline, scripter, *observers])
                began = clock.now()

                def wall_clock() -> datetime:  # the start plus the virtual seconds gone
                    return start_at + timedelta(seconds=clock.now() - began)

                controller = Controller(
                    store,
                    observer_for=lambda rid: observer,
                    lock_ttl=_SIM_LOCK_TTL,
                    lease_ttl=_SIM_LOCK_TTL,
                    driver_for=driver_for,
                    wall_clock=wall_clock,
                )
                try:
                    rid = controller.create(
                        sim_nodes, sim_policy, TARGET, policy_name=policy_name, by="simulate"
                    ).rollout_id
                except LockConflict as exc:
                    raise InputError(f"--state {journal_path}: {exc}") from None
                scripter.controller, scripter.rollout_id = controller, rid
                try:
                    result = await asyncio.wait_for(controller.execute(rid), MAX_VIRTUAL)
                except TimeoutError:
                    raise InputError(
                        f"the simulated rollout did not end within {_span(MAX_VIRTUAL)} of "
                        "virtual time"
                    ) from None
                return rid, timeline, clock.now() - timeline.start, result

            rid, timeline, took, result = run_virtual(run())
        finally:
            store.close()
        return SimReport(
            rollout_id=rid,
            nodes=len(sim_nodes),
            policy_name=policy_name,
            settings=settings,
            phase=result.phase,
            message=result.message,
            exit_code=result.exit_code,
            duration=took,
            timeline=timeline,
            max_unavailable=limits(policy, len(sim_nodes)).max_unavailable,
            drawn_failing=len(failing),
            not_simulated=notes,
            state_path=state_path,
        )
