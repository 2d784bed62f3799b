"""Pure decisions: what the engine and the controller do, as values they carry out.

The engine never branches on policy text itself: it asks `after_batch` (or `after_gate`)
and acts on the returned `Decision`, whose `ending` says which nodes go back and the
final phase; `final` names the phase of a rollout that went through its batches; and
the controller asks `refusal` whether an operator command applies to a rollout's phase
(the way Nomad's deployment watcher returns a verdict, then acts).

Worked example: a fleet of 12 with `max_failed: "10%"` tolerates 1 failure (10% of 12 =
1.2, rounded down). After a batch where a second node fails, the total is 2 > 1, so with
`action: rollback` the answer is `Decision.ROLLBACK_BATCH`::

    >>> after_batch(failed_total=2, tolerated=1, action="rollback")
    <Decision.ROLLBACK_BATCH: 'rollback_batch'>
    >>> after_batch(failed_total=1, tolerated=1, action="rollback")
    <Decision.CONTINUE: 'continue'>
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal

from rollout.model import RolloutPhase


class Decision(enum.StrEnum):
    CONTINUE = "continue"  # start the next batch
    HALT = "halt"  # start nothing more; committed nodes stay
    ROLLBACK_BATCH = "rollback_batch"  # the failed batch's nodes return, then halt
    ROLLBACK_ALL = "rollback_all"  # every node updated by this rollout returns


_BY_ACTION = {
    "halt": Decision.HALT,
    "rollback": Decision.ROLLBACK_BATCH,
    "rollback-all": Decision.ROLLBACK_ALL,
    "continue": Decision.CONTINUE,
}


def after_batch(failed_total: int, tolerated: int, action: str) -> Decision:
    """Decide what follows a batch: go on while failures are within tolerance, else act."""
    if failed_total <= tolerated:
        return Decision.CONTINUE
    try:
        return _BY_ACTION[action]
    except KeyError:
        raise ValueError(f"unknown failure action {action!r}") from None


# --- how a rollout ends ---------------------------------------------------------------------


def after_gate(action: str) -> Decision:
    """A gate failed or timed out: the failure action decides, except that `continue`
    halts (a gate is a stop sign, not a node failure to tolerate).

    >>> after_gate("continue"), after_gate("rollback-all")
    (<Decision.HALT: 'halt'>, <Decision.ROLLBACK_ALL: 'rollback_all'>)
    """
    decision = after_batch(1, 0, action)
    return Decision.HALT if decision is Decision.CONTINUE else decision


Scope = Literal["none", "batch", "all"]


@dataclass(frozen=True)
class Ending:
    """What the engine carries out for a decision that stops the rollout: which nodes it
    returns to their previous image, then the final phase and the message's ending."""

    rollback: Scope
    phase: RolloutPhase
    suffix: str


_ENDINGS = {
    Decision.HALT: Ending("none", RolloutPhase.HALTED, "halted"),
    Decision.ROLLBACK_BATCH: Ending("batch", RolloutPhase.ROLLED_BACK, "batch rolled back"),
    Decision.ROLLBACK_ALL: Ending("all", RolloutPhase.ROLLED_BACK, "all rolled back"),
}


def ending(decision: Decision) -> Ending:
    """The ending of a rollout stopped by `decision` (anything but CONTINUE).

    >>> e = ending(Decision.ROLLBACK_BATCH)
    >>> e.rollback, e.phase, e.suffix
    ('batch', <RolloutPhase.ROLLED_BACK: 'rolled_back'>, 'batch rolled back')
    """
    try:
        return _ENDINGS[decision]
    except KeyError:
        raise ValueError(f"{decision} does not end a rollout") from None


def final(*, all_settled: bool, failed: int, fleet: int, version: str) -> tuple[RolloutPhase, str]:
    """The phase and message of a rollout that went through all its batches (or stopped
    starting new ones, when not every node settled).

    >>> final(all_settled=True, failed=0, fleet=12, version="2.0")
    (<RolloutPhase.SUCCEEDED: 'succeeded'>, '12 node(s) on 2.0')
    >>> final(all_settled=True, failed=2, fleet=12, version="2.0")[0]
    <RolloutPhase.FAILED: 'failed'>
    """
    if not all_settled:
        return RolloutPhase.ABORTED, "stopped by the operator"
    if failed:
        return RolloutPhase.FAILED, f"{failed} node(s) failed; the rest were updated"
    return RolloutPhase.SUCCEEDED, f"{fleet} node(s) on {version}"


# --- operator commands ----------------------------------------------------------------------

COMMANDS = ("pause", "resume", "abort", "retry", "rollback")
_PAUSABLE = frozenset({RolloutPhase.RUNNING, RolloutPhase.WAITING, RolloutPhase.PENDING})
_RETRYABLE = frozenset(
    {
        RolloutPhase.PAUSED,  # e.g. stopped after the canary (--stop-after)
        RolloutPhase.HALTED,
        RolloutPhase.ABORTED,
        RolloutPhase.FAILED,
        RolloutPhase.ROLLED_BACK,
    }
)


def refusal(command: str, phase: RolloutPhase, *, busy: bool, any_committed: bool) -> str | None:
    """Why `command` may not be applied to a rollout in `phase` (None: it may).

    `busy`: its engine is still working (not winding down); `any_committed`: a node of
    the rollout is on the new image, committed.

    >>> refusal("pause", RolloutPhase.HALTED, busy=False, any_committed=False)
    'cannot pause a rollout that is halted'
    >>> refusal("resume", RolloutPhase.PAUSED, busy=True, any_committed=False) is None
    True
    """
    if command == "pause":
        return None if phase in _PAUSABLE else f"cannot pause a rollout that is {phase}"
    if command == "resume":
        if phase is not RolloutPhase.PAUSED:
            return f"cannot resume a rollout that is {phase}, not paused"
        return None
    if command == "abort":
        return f"cannot abort a rollout that is already {phase}" if phase.finished else None
    if command == "retry":
        if phase not in _RETRYABLE:
            return (
                f"cannot retry a rollout that is {phase}; retry applies to halted, "
                "aborted, failed, rolled back or stopped (paused) rollouts"
            )
        if busy:
            return "the rollout is still running (paused rollouts resume with resume)"
        return None
    if command == "rollback":
        if phase in (RolloutPhase.ROLLED_BACK, RolloutPhase.ROLLING_BACK):
            return f"the rollout is already {phase}"
        if busy:
            return "the rollout is running; abort it first"
        if not any_committed:
            return "no node of this rollout is on the new image"
        return None
    return f"unknown command {command!r}"
