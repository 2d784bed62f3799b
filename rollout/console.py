"""What the operator sees: live progress (rich), structured logs (structlog), summaries.

Both the progress display and the log are observers of the engine's events. On a
terminal the CLI shows live progress and logs only warnings; elsewhere (CI, pipes) it
writes one structured log line per event, as key=value text or, with `--log-format
json`, as JSON. Tokens never reach either: events carry no secrets.

Logging is on the engine's path (it is an observer, called inline, 12 lines a node), so
off a terminal it is kept cheap: `_KeyValueRenderer` writes the same line structlog's
ConsoleRenderer writes without colours (timestamp, padded level and event, sorted
key=value pairs) in one f-string, where ConsoleRenderer styles and pads every field; the
timestamp is formatted once per second and the milliseconds appended. On a terminal
ConsoleRenderer's colours are kept. The event log hands its lines to `_LineSink`, the
same processors without structlog's bound-logger layers, and they leave once per loop
turn (`_TurnBuffer`).
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable
from typing import Any, TextIO

import structlog
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from rollout import clock
from rollout.events import (
    BatchFinished,
    BatchStarted,
    BytesFetched,
    BytesSent,
    Event,
    NodeChanged,
    Retried,
    RolloutFinished,
    RolloutPhaseChanged,
    RolloutStarted,
    StepDone,
    WebhookFailed,
)
from rollout.gates.events import (
    GateApproval,
    GateFinished,
    GateMeasured,
    GateSignal,
    GateWaiting,
    gate_event_json,
)
from rollout.model import NodePhase

_STYLE = {
    NodePhase.COMMITTED: "green",
    NodePhase.SKIPPED: "green",
    NodePhase.FAILED: "red",
    NodePhase.ROLLBACK_FAILED: "bold red",
    NodePhase.ROLLED_BACK: "yellow",
    NodePhase.ROLLING_BACK: "yellow",
    NodePhase.PENDING: "dim",
}


def make_console(stderr: bool = False) -> Console:
    """A rich console; off a terminal (CI logs, pipes) wide enough that tables are not
    squeezed into 80 columns."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else 160)


class _UtcStamper:
    """`timestamp`: UTC, ISO 8601 with microseconds and Z, as structlog's TimeStamper(
    fmt="iso", utc=True) writes it; the date and time part is formatted once a second."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self, logger: Any, name: str, event: dict[str, Any]) -> dict[str, Any]:
        event["timestamp"] = self.stamp()
        return event

    def stamp(self) -> str:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._prefix}.{int((now - second) * 1e6):06d}Z"


class _KeyValueRenderer:
    """``<timestamp> [<level>   ] <event>   k=v k=v``: ConsoleRenderer's line without
    colours, keys sorted, strings bare and other values as their repr."""

    def __call__(self, logger: Any, name: str, event: dict[str, Any]) -> str:
        stamp = event.pop("timestamp", "")
        level = event.pop("level", "")
        message = str(event.pop("event", ""))
        return _key_value_line(stamp, level, message, event)


def _key_value_line(stamp: str, level: str, message: str, fields: dict[str, Any]) -> str:
    pairs = " ".join(
        [f"{k}={v}" if type(v) is str else f"{k}={v!r}" for k, v in sorted(fields.items())]
    )
    return f"{stamp} [{level:<9}] {message:<30} {pairs}".rstrip()


class _TurnBuffer:
    """stderr for log lines, written once per event-loop turn instead of once per line.

    structlog's WriteLogger writes and flushes every line: at a hundred thousand nodes a
    rollout logs over a million lines, a syscall each. Here the lines of one loop turn go
    out in one write at the start of the next turn (as the journal's group commit does);
    outside a running loop, and at exit, at once. A SIGKILL loses at most one turn of log
    lines, never a journal entry.
    """

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.parts: list[str] = []
        self.loop: asyncio.AbstractEventLoop | None = None  # where a flush is scheduled
        self.lock = threading.Lock()  # worker threads log too
        atexit.register(self.drain)

    def write(self, text: str) -> None:
        try:
            loop = clock.running_loop()
        except RuntimeError:
            loop = None
        with self.lock:
            self.parts.append(text)
            if loop is not None and self.loop is not loop:  # none scheduled, or on a
                self.loop = loop  # loop that has ended
                loop.call_soon(self.drain)
        if loop is None:
            self.drain()

    def flush(self) -> None:
        """WriteLogger flushes after every line: deferred to the end of the turn."""

    def drain(self) -> None:
        with self.lock:
            self.loop = None
            text, self.parts = "".join(self.parts), []
        if text:
            self.stream.write(text)
            self.stream.flush()


class _LineSink:
    """The processor chain `configure_logging` set up, run for the event log's lines
    without structlog's bound-logger layers (method proxy, context copy, per-line lock
    and flush), which cost more than the line itself: a rollout of 10,000 nodes logs
    120,000 lines. Same processors, same level filter, same stream, same lines."""

    def __init__(self, processors: list[Any], min_level: int, out: _TurnBuffer) -> None:
        self.processors = processors
        self.min_level = min_level
        self.out = out
        # The chain configure_logging builds off a terminal (level, _UtcStamper, one of
        # our two renderers) is run as one function: the same line without the merged
        # dict, the pops and three calls per line.
        stamper, renderer = ([*processors, None, None])[1:3]
        self.fused: Any = None
        if (
            len(processors) == 3
            and processors[0] is structlog.processors.add_log_level
            and isinstance(stamper, _UtcStamper)
        ):
            if isinstance(renderer, _KeyValueRenderer):
                self.fused = self._key_value
            elif isinstance(renderer, structlog.processors.JSONRenderer):
                self.fused = self._json
        self.stamp: Any = stamper.stamp if isinstance(stamper, _UtcStamper) else None
        self.renderer: Any = renderer

    def emit(self, level: int, context: dict[str, Any], event: str, fields: dict[str, Any]) -> None:
        if level < self.min_level:
            return
        name = _LEVEL_NAMES[level]
        if self.fused is not None:
            self.out.write(self.fused(name, context, event, fields))
            return
        line: Any = {**context, **fields, "event": event}
        for proc in self.processors:
            line = proc(None, name, line)
        self.out.write(f"{line}\n")

    def _key_value(
        self, name: str, context: dict[str, Any], event: str, fields: dict[str, Any]
    ) -> str:
        merged = {**context, **fields} if context else fields
        return f"{_key_value_line(self.stamp(), name, event, merged)}\n"

    def _json(self, name: str, context: dict[str, Any], event: str, fields: dict[str, Any]) -> str:
        # The dict add_log_level and the stamper would have left, in their key order.
        line = {**context, **fields, "event": event, "level": name, "timestamp": self.stamp()}
        return f"{self.renderer(None, name, line)}\n"


_LEVEL_NAMES = {logging.INFO: "info", logging.WARNING: "warning"}
# Set by configure_logging; None: structlog is set up by someone else (tests, a library
# user), and the event log goes through structlog's loggers as any other.
_sink: _LineSink | None = None


def configure_logging(fmt: str = "console", level: int = logging.INFO) -> None:
    """Set structlog up once: JSON for machines, key=value text otherwise, on stderr
    (coloured by structlog on a terminal, by `_KeyValueRenderer` elsewhere)."""
    global _sink
    renderer: Any
    stamper: Any = _UtcStamper()
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    elif sys.stderr.isatty():
        renderer = structlog.dev.ConsoleRenderer(colors=True)
        stamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    else:
        renderer = _KeyValueRenderer()
    processors = [  # (no merge_contextvars: nothing binds structlog context variables)
        structlog.processors.add_log_level,
        stamper,
        renderer,
    ]
    out = _TurnBuffer(sys.stderr)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.WriteLoggerFactory(out),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )
    _sink = _LineSink(processors, level, out)


INFO, WARNING = logging.INFO, logging.WARNING


class EventLog:
    """Observer writing one structured log line per meaningful event."""

    def __init__(self, rollout_id: str | None = None) -> None:
        self.log = structlog.get_logger("rollout")
        self.context: dict[str, Any] = {"rollout": rollout_id} if rollout_id else {}
        self.batch_of: dict[str, int] = {}
        self.started: float | None = None

    def bound(self, rollout_id: str) -> EventLog:
        """A log for one rollout (the service runs several at once)."""
        return EventLog(rollout_id)

    def _out(self, level: int, event: str, fields: dict[str, Any]) -> None:
        sink = _sink
        if sink is not None:
            sink.emit(level, self.context, event, fields)
        else:
            method = self.log.info if level == INFO else self.log.warning
            method(event, **self.context, **fields)

    def __call__(self, event: Event) -> None:
        # The two events of every node step first: they are nearly all of them.
        out = self._out
        if isinstance(event, StepDone):
            out(
                INFO if event.ok else WARNING,
                "node_step",
                {
                    "node": event.node_id,
                    "batch": self.batch_of.get(event.node_id),
                    "step": str(event.step),
                    "seconds": round(event.seconds, 3),
                    "outcome": "ok" if event.ok else "error",
                },
            )
        elif isinstance(event, NodeChanged):
            bad = event.phase in (NodePhase.FAILED, NodePhase.ROLLBACK_FAILED)
            fields: dict[str, Any] = {"node": event.node_id, "batch": event.batch}
            if event.reason:
                fields["reason"] = str(event.reason)
            if event.detail:
                fields["detail"] = event.detail
            out(WARNING if bad else INFO, f"node_{event.phase}", fields)
        elif isinstance(event, RolloutStarted):
            self.context = {"rollout": event.rollout_id}
            self.batch_of = {n.id: b.index for b in event.batches for n in b.nodes}
            self.started = time.monotonic()
            out(INFO, "rollout_started", {
                "image": event.image.version,
                "digest": event.image.digest,
                "policy": event.policy,
                "batches": len(event.batches),
                "nodes": event.fleet_size,
            })  # fmt: skip
        elif isinstance(event, BatchStarted):
            out(INFO, "batch_started", {
                "batch": event.batch.index,
                "of": event.total_batches,
                "canary": event.batch.canary,
                "nodes": list(event.batch.node_ids),
            })  # fmt: skip
        elif isinstance(event, Retried):
            out(WARNING, "transport_retry", {
                "node": event.node_id,
                "operation": event.operation,
                "attempt": event.attempt,
                "error": event.error,
            })  # fmt: skip
        elif isinstance(event, RolloutPhaseChanged):
            out(INFO, "rollout_phase", {"phase": str(event.phase), "message": event.message})
        elif isinstance(event, GateWaiting):
            out(INFO, "gate_waiting", {
                "gate": event.gate,
                "kind": event.kind,
                "since": event.since.isoformat(),
                "until": event.until.isoformat() if event.until else None,
                "reason": event.reason,
            })  # fmt: skip
        elif isinstance(event, GateFinished):
            out(INFO if event.result == "passed" else WARNING, "gate_finished", {
                "gate": event.gate, "kind": event.kind, "result": event.result,
                "message": event.message,
            })  # fmt: skip
        elif isinstance(event, GateSignal | GateApproval | GateMeasured):
            fields = gate_event_json(event)
            out(INFO, f"gate_{fields.pop('event')}", fields)
        elif isinstance(event, WebhookFailed):
            out(WARNING, "webhook_failed",
                {"url": event.url, "event_name": event.event, "error": event.error})  # fmt: skip
        elif isinstance(event, BatchFinished):
            out(INFO, "batch_finished", {
                "batch": event.batch.index, "failed": event.failed, "decision": event.decision,
            })  # fmt: skip
        elif isinstance(event, RolloutFinished):
            seconds = time.monotonic() - self.started if self.started is not None else None
            out(INFO if event.phase == "succeeded" else WARNING, "rollout_finished", {
                "phase": str(event.phase),
                "message": event.message,
                "seconds": round(seconds, 3) if seconds is not None else None,
            })  # fmt: skip


class LiveProgress:
    """Observer drawing live progress on a terminal: batch, counts, nodes in flight."""

    def __init__(self, console: Console) -> None:
        self.console = console
        # Transient: the summary table printed afterwards replaces the live view.
        self.live = Live(console=console, refresh_per_second=8, transient=True)
        self.title = ""
        self.batch = ""
        self.phases: dict[str, NodePhase] = {}
        self.details: dict[str, str] = {}
        self.gate = ""
        self.staged_bytes: dict[str, int] = {}  # pushed or pulled so far, while staging
        self.image_size = 0
        self.verb = "sent"

    def __enter__(self) -> LiveProgress:
        self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.live.__exit__(None, None, None)

    def __call__(self, event: Event) -> None:
        if isinstance(event, RolloutStarted):
            self.title = (
                f"rollout {event.rollout_id}: {event.image.name} {event.image.version} "
                f"to {event.fleet_size} nodes in {len(event.batches)} batches"
            )
            self.phases = {n.id: NodePhase.PENDING for b in event.batches for n in b.nodes}
            self.image_size = event.image.size
            self.verb = "fetched" if event.image.pulled else "sent"
        elif isinstance(event, (BytesSent, BytesFetched)):
            self.staged_bytes[event.node_id] = self.staged_bytes.get(event.node_id, 0) + event.count
        elif isinstance(event, BatchStarted):
            kind = "canary " if event.batch.canary else ""
            self.batch = (
                f"{kind}batch {event.batch.index}/{event.total_batches}: "
                f"{', '.join(event.batch.node_ids)}"
            )
        elif isinstance(event, NodeChanged):
            self.phases[event.node_id] = event.phase
            if event.phase is NodePhase.STAGING:
                self.staged_bytes[event.node_id] = 0
            if event.detail:
                self.details[event.node_id] = event.detail
        elif isinstance(event, GateWaiting):
            until = f" until {event.until:%H:%M:%S} UTC" if event.until else ""
            self.gate = f"waiting on gate {event.gate} ({event.kind}){until}: {event.reason}"
        elif isinstance(event, GateFinished):
            self.gate = f"gate {event.gate}: {event.result} ({event.message})"
        elif isinstance(event, RolloutFinished):
            self.batch = f"{event.phase}: {event.message}"
        self.live.update(self._render())

    def _render(self) -> Group:
        counts = Counter(self.phases.values())
        done = counts[NodePhase.COMMITTED] + counts[NodePhase.SKIPPED]
        failed = sum(counts[p] for p in (NodePhase.FAILED, NodePhase.ROLLED_BACK,
                                         NodePhase.ROLLBACK_FAILED))  # fmt: skip
        flight = [n for n, p in self.phases.items() if p not in _SETTLED]
        line = Text.assemble(
            (f"done {done}", "green"), "  ",
            (f"failed {failed}", "red" if failed else "dim"), "  ",
            (f"in flight {len(flight)}", "cyan"), "  ",
            (f"pending {counts[NodePhase.PENDING]}", "dim"),
        )  # fmt: skip
        table = Table(box=None, show_header=False, pad_edge=False)
        for node_id in flight[:16]:
            phase = self.phases[node_id]
            progress = ""
            if phase is NodePhase.STAGING and self.image_size:
                done = self.staged_bytes.get(node_id, 0)
                progress = (
                    f"{done / 2**20:.1f}/{self.image_size / 2**20:.1f} MiB {self.verb} "
                    f"({100 * done / self.image_size:.0f}%)"
                )
            table.add_row(
                node_id, Text(str(phase), style=_STYLE.get(phase, "cyan")), Text(progress)
            )
        gate = Text(self.gate, style="magenta") if self.gate else Text("")
        return Group(Text(self.title, style="bold"), Text(self.batch), gate, line, table)


_SETTLED = frozenset(
    {
        NodePhase.PENDING,
        NodePhase.COMMITTED,
        NodePhase.SKIPPED,
        NodePhase.FAILED,
        NodePhase.ROLLED_BACK,
        NodePhase.ROLLBACK_FAILED,
    }
)


_PHASES = frozenset(str(p) for p in NodePhase)


def node_table(rows: Iterable[dict[str, Any]], title: str) -> Table:
    """A table of per-node rows (as built by the CLI's status and summary commands)."""
    table = Table(title=title)
    rows = list(rows)
    columns = list(rows[0].keys()) if rows else ["node"]
    for col in columns:
        table.add_column(col)
    for row in rows:
        cells = []
        for col in columns:
            value = row.get(col)
            style = ""
            if col == "phase" and value in _PHASES:
                style = _STYLE.get(NodePhase(value), "")
            cells.append(Text("" if value is None else str(value), style=style))
        table.add_row(*cells)
    return table
