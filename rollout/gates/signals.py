"""Wait-condition signals (Heat-compatible) and manual approvals, held in memory per gate.

A ``wait`` gate passes when ``count`` distinct signal ids have said SUCCESS, fails at the
first FAILURE, and times out otherwise, exactly as an OpenStack Heat wait condition. Two
request bodies are accepted (`parse_signal`):

- Heat native (``OS::Heat::WaitConditionHandle``)::

      {"status": "SUCCESS", "reason": "tests passed", "data": "build 42", "id": "ci-1"}

  every key optional: ``status`` defaults to SUCCESS, a missing ``id`` is given the next
  sequential number ("1", "2", ...) by the box, as Heat does, so each such signal counts.
- CloudFormation style (``AWS::CloudFormation::WaitConditionHandle``)::

      {"Status": "SUCCESS", "Reason": "tests passed", "UniqueId": "ci-1", "Data": "build 42"}

  ``Status`` and ``UniqueId`` required.

Invariants of `SignalBox` and `ApprovalBox`:

- ``add``/``approve``/``reject`` never block and may be called before anyone waits: a
  signal sent early counts for the next wait. A box is consumed by a wait: when ``wait``
  returns (whatever the result) the signals it has seen are cleared, so a gate that runs
  after every batch needs fresh signals each time. ``history`` keeps everything received.
- A repeated id counts once; any FAILURE (whatever its id) fails the wait.
- Timeouts are on the event loop's clock (virtual time in tests).
"""

from __future__ import annotations

import asyncio
import enum
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Literal

from rollout import clock

__all__ = [
    "Approval",
    "ApprovalBox",
    "GateBoxes",
    "Signal",
    "SignalBox",
    "Status",
    "WaitResult",
    "parse_signal",
]

MAX_ID = 255
MAX_REASON = 4096
MAX_DATA = 65536
MAX_SIGNALS = 10000


class Status(enum.StrEnum):
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"


@dataclass(frozen=True)
class Signal:
    """One wait-condition signal. ``id`` is None until a box numbers it (Heat native, no id)."""

    status: Status
    reason: str = ""
    data: str = ""
    id: str | None = None

    def to_json(self) -> dict[str, str | None]:
        """Heat's native form, e.g. for the journal and ``rollout show``."""
        return {"status": str(self.status), "reason": self.reason, "data": self.data, "id": self.id}


_NATIVE = ("status", "reason", "data", "id")
_CFN = ("Status", "Reason", "UniqueId", "Data")


def parse_signal(body: object) -> Signal:
    """A signal from a decoded JSON body; ValueError naming the field when it is malformed.

    >>> parse_signal({"status": "SUCCESS", "id": "ci-1"})
    Signal(status=<Status.SUCCESS: 'SUCCESS'>, reason='', data='', id='ci-1')
    >>> parse_signal({"Status": "FAILURE", "UniqueId": "x", "Reason": "boom"}).status
    <Status.FAILURE: 'FAILURE'>
    >>> parse_signal({"status": "OK"})
    Traceback (most recent call last):
    ...
    ValueError: status: expected "SUCCESS" or "FAILURE", got "OK"
    """
    if body is None:
        body = {}  # Heat: a bare POST is a SUCCESS signal
    if not isinstance(body, Mapping):
        raise ValueError(f"body: expected a JSON object, got {_kind(body)}")
    keys = [k for k in body]
    for k in keys:
        if not isinstance(k, str):
            raise ValueError(f"body: keys must be strings, got {k!r}")
    cfn = any(k in _CFN for k in keys)
    known = _CFN if cfn else _NATIVE
    for k in keys:
        if k not in known:
            style = "CloudFormation" if cfn else "Heat native"
            other = _NATIVE if cfn else _CFN
            mix = " (do not mix Heat native and CloudFormation keys)" if k in other else ""
            raise ValueError(
                f"{k}: unknown field for a {style} signal (known: {', '.join(known)}){mix}"
            )
    status_key, reason_key, data_key, id_key = (
        ("Status", "Reason", "Data", "UniqueId") if cfn else ("status", "reason", "data", "id")
    )
    if cfn:
        for required in ("Status", "UniqueId"):
            if required not in body:
                raise ValueError(f"{required}: required in a CloudFormation signal")
    raw_status = body.get(status_key, "SUCCESS")
    if not isinstance(raw_status, str) or raw_status.strip().upper() not in ("SUCCESS", "FAILURE"):
        raise ValueError(f'{status_key}: expected "SUCCESS" or "FAILURE", got {_show(raw_status)}')
    status = Status(raw_status.strip().upper())
    reason = _text(body.get(reason_key), reason_key, MAX_REASON)
    data = _data(body.get(data_key), data_key)
    raw_id = body.get(id_key)
    signal_id: str | None
    if raw_id is None:
        if cfn:
            raise ValueError(f"{id_key}: must not be null")
        signal_id = None
    else:
        if isinstance(raw_id, bool) or not isinstance(raw_id, str | int):
            raise ValueError(f"{id_key}: expected a string, got {_show(raw_id)}")
        signal_id = str(raw_id).strip()
        if not signal_id:
            raise ValueError(f"{id_key}: must not be empty")
        if len(signal_id) > MAX_ID:
            raise ValueError(f"{id_key}: longer than {MAX_ID} characters")
    return Signal(status, reason, data, signal_id)


def _text(value: object, field: str, limit: int) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{field}: expected a string, got {_show(value)}")
    if len(value) > limit:
        raise ValueError(f"{field}: longer than {limit} characters")
    return value


def _data(value: object, field: str) -> str:
    """Heat's data is a string; any other JSON value is kept as its JSON text."""
    if value is None:
        return ""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    if len(text) > MAX_DATA:
        raise ValueError(f"{field}: longer than {MAX_DATA} characters")
    return text


def _kind(value: object) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return type(value).__name__


def _show(value: object) -> str:
    if isinstance(value, str):
        return json.dumps(value)
    if value is None:
        return "null"
    return _kind(value)


# ----- the boxes ---------------------------------------------------------------------------


@dataclass(frozen=True)
class WaitResult:
    """How a wait on a SignalBox ended; ``signals`` are those it saw, in arrival order."""

    status: Literal["success", "failure", "timeout"]
    signals: tuple[Signal, ...]
    success_ids: tuple[str, ...]
    message: str


class SignalBox:
    """Signals for one gate of one rollout (see the module docstring for its rules)."""

    def __init__(self, gate: str) -> None:
        self.gate = gate
        self.history: list[Signal] = []
        self._pending: list[Signal] = []
        self._changed = asyncio.Event()
        self._waiting = False

    @property
    def waiting(self) -> bool:
        """True while a gate waits on this box."""
        return self._waiting

    def add(self, signal: Signal) -> Signal:
        """Store a signal (numbering it when it has no id) and wake the waiter; never blocks."""
        if len(self.history) >= MAX_SIGNALS:
            raise ValueError(f"gate {self.gate}: more than {MAX_SIGNALS} signals")
        if signal.id is None:
            signal = replace(signal, id=str(len(self.history) + 1))
        self.history.append(signal)
        self._pending.append(signal)
        self._changed.set()
        return signal

    async def wait(
        self,
        count: int,
        timeout: float | None,
        on_signal: Callable[[Signal], None] | None = None,
    ) -> WaitResult:
        """Wait until ``count`` distinct ids said SUCCESS, a FAILURE, or ``timeout`` seconds.

        ``on_signal`` sees every signal this wait consumes (early ones first).
        """
        deadline = None if timeout is None else clock.now() + timeout
        seen: list[Signal] = []
        ok: dict[str, None] = {}
        self._waiting = True
        try:
            while True:
                self._changed.clear()
                while len(seen) < len(self._pending):
                    sig = self._pending[len(seen)]
                    seen.append(sig)
                    if on_signal is not None:
                        on_signal(sig)
                    if sig.status is Status.FAILURE:
                        why = f": {sig.reason}" if sig.reason else ""
                        return self._done("failure", seen, ok, f"signal {sig.id} FAILURE{why}")
                    ok[str(sig.id)] = None
                    if len(ok) >= count:
                        return self._done(
                            "success", seen, ok, f"{len(ok)} of {count} SUCCESS signal(s)"
                        )
                remaining = None if deadline is None else deadline - clock.now()
                if remaining is not None and remaining <= 0:
                    return self._done(
                        "timeout",
                        seen,
                        ok,
                        f"timed out after {timeout:g}s with {len(ok)} of {count} SUCCESS signal(s)",
                    )
                try:
                    await asyncio.wait_for(self._changed.wait(), remaining)
                except TimeoutError:
                    pass
        finally:
            self._waiting = False

    def _done(
        self,
        status: Literal["success", "failure", "timeout"],
        seen: list[Signal],
        ok: dict[str, None],
        message: str,
    ) -> WaitResult:
        del self._pending[: len(seen)]
        return WaitResult(status, tuple(seen), tuple(ok), message)


@dataclass(frozen=True)
class Approval:
    """A human's decision on a gate: go (approved) or no (rejected, with a reason)."""

    approved: bool
    by: str
    reason: str = ""


class ApprovalBox:
    """Approvals for one gate of one rollout: the first decision answers the next wait."""

    def __init__(self, gate: str) -> None:
        self.gate = gate
        self.history: list[Approval] = []
        self._pending: list[Approval] = []
        self._changed = asyncio.Event()
        self._waiting = False

    @property
    def waiting(self) -> bool:
        return self._waiting

    def approve(self, by: str, reason: str = "") -> Approval:
        return self._add(Approval(True, by, reason))

    def reject(self, by: str, reason: str = "") -> Approval:
        return self._add(Approval(False, by, reason))

    def _add(self, decision: Approval) -> Approval:
        if len(self.history) >= MAX_SIGNALS:
            raise ValueError(f"gate {self.gate}: more than {MAX_SIGNALS} decisions")
        self.history.append(decision)
        self._pending.append(decision)
        self._changed.set()
        return decision

    async def wait(
        self, timeout: float | None, on_decision: Callable[[Approval], None] | None = None
    ) -> Approval | None:
        """The first decision (pending or coming), or None after ``timeout`` seconds."""
        deadline = None if timeout is None else clock.now() + timeout
        self._waiting = True
        try:
            while True:
                self._changed.clear()
                if self._pending:
                    decision = self._pending.pop(0)
                    self._pending.clear()  # later duplicates belong to this wait too
                    if on_decision is not None:
                        on_decision(decision)
                    return decision
                remaining = None if deadline is None else deadline - clock.now()
                if remaining is not None and remaining <= 0:
                    return None
                try:
                    await asyncio.wait_for(self._changed.wait(), remaining)
                except TimeoutError:
                    pass
        finally:
            self._waiting = False


class GateBoxes:
    """The boxes of one rollout, made on first use; the HTTP service and the gates share it."""

    def __init__(self) -> None:
        self._signals: dict[str, SignalBox] = {}
        self._approvals: dict[str, ApprovalBox] = {}

    def signals(self, gate: str) -> SignalBox:
        box = self._signals.get(gate)
        if box is None:
            box = self._signals[gate] = SignalBox(gate)
        return box

    def approvals(self, gate: str) -> ApprovalBox:
        box = self._approvals.get(gate)
        if box is None:
            box = self._approvals[gate] = ApprovalBox(gate)
        return box
