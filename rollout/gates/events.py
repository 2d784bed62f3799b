"""Events the gates emit through ``GateContext.emit``: journal, metrics and display read them.

Each is a frozen value, like rollout.events. Their meaning for an observer:

- `GateWaiting`: the rollout now waits on ``gate`` (since ``since``, expected to end by
  ``until``, None when open-ended) and ``reason`` says why in one line. Emitted when a
  gate starts waiting and again whenever the reason changes (e.g. other alerts fire).
  Metrics: ``rollout_gate_waiting{gate,kind} = 1``.
- `GateSignal`: a wait-condition signal counted by a ``wait`` gate.
- `GateApproval`: a human decision taken by an ``approval`` gate (or by an inconclusive
  analysis waiting for one).
- `GateMeasured`: one analysis measurement.
- `GateFinished`: the gate is over with ``result`` passed, failed, inconclusive or
  timeout. Metrics: ``rollout_gate_waiting{gate,kind} = 0`` and
  ``rollout_gate_results{kind,result}`` + 1.

Times are aware UTC datetimes from the context's wall clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from rollout.gates.analysis import Measurement
from rollout.gates.signals import Approval, Signal

__all__ = [
    "GateApproval",
    "GateEvent",
    "GateFinished",
    "GateMeasured",
    "GateSignal",
    "GateWaiting",
    "gate_event_json",
]


@dataclass(frozen=True)
class GateWaiting:
    gate: str
    kind: str
    since: datetime
    until: datetime | None
    reason: str


@dataclass(frozen=True)
class GateSignal:
    gate: str
    signal: Signal


@dataclass(frozen=True)
class GateApproval:
    gate: str
    approval: Approval


@dataclass(frozen=True)
class GateMeasured:
    gate: str
    measurement: Measurement


@dataclass(frozen=True)
class GateFinished:
    gate: str
    kind: str
    result: str  # passed | failed | inconclusive | timeout
    message: str


GateEvent = GateWaiting | GateSignal | GateApproval | GateMeasured | GateFinished


def gate_event_json(event: GateEvent) -> dict[str, object]:
    """A gate event as journal data: `event` names its type, times are ISO 8601 UTC."""
    if isinstance(event, GateWaiting):
        return {
            "event": "waiting",
            "gate": event.gate,
            "kind": event.kind,
            "since": event.since.isoformat(),
            "until": event.until.isoformat() if event.until else None,
            "reason": event.reason,
        }
    if isinstance(event, GateSignal):
        return {"event": "signal", "gate": event.gate, "signal": event.signal.to_json()}
    if isinstance(event, GateApproval):
        a = event.approval
        return {
            "event": "approval",
            "gate": event.gate,
            "approved": a.approved,
            "by": a.by,
            "reason": a.reason,
        }
    if isinstance(event, GateMeasured):
        return {"event": "measured", "gate": event.gate, "measurement": event.measurement.to_json()}
    return {
        "event": "finished",
        "gate": event.gate,
        "kind": event.kind,
        "result": event.result,
        "message": event.message,
    }
