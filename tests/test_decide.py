"""The pure decision after a batch, as a table."""

from __future__ import annotations

import pytest

from rollout.decide import Decision, after_batch


@pytest.mark.parametrize(
    ("failed", "tolerated", "action", "expected"),
    [
        (0, 0, "rollback", Decision.CONTINUE),
        (1, 0, "rollback", Decision.ROLLBACK_BATCH),
        (1, 1, "rollback", Decision.CONTINUE),
        (2, 1, "halt", Decision.HALT),
        (2, 1, "rollback-all", Decision.ROLLBACK_ALL),
        (5, 1, "continue", Decision.CONTINUE),
    ],
)
def test_after_batch(failed: int, tolerated: int, action: str, expected: Decision) -> None:
    assert after_batch(failed, tolerated, action) is expected


def test_unknown_action() -> None:
    with pytest.raises(ValueError, match="unknown failure action"):
        after_batch(3, 0, "panic")


# --- how a rollout ends ------------------------------------------------------------------

from rollout.decide import after_gate, ending, final, refusal  # noqa: E402
from rollout.model import RolloutPhase as P  # noqa: E402


@pytest.mark.parametrize(
    ("name", "action", "rollback", "phase", "suffix"),
    [
        ("halt stops where it is", "halt", "none", P.HALTED, "halted"),
        ("rollback returns the batch", "rollback", "batch", P.ROLLED_BACK, "batch rolled back"),
        ("rollback-all returns every node", "rollback-all", "all", P.ROLLED_BACK,
         "all rolled back"),
        ("continue halts at a failed gate", "continue", "none", P.HALTED, "halted"),
    ],
)  # fmt: skip
def test_after_a_failed_gate(name: str, action: str, rollback: str, phase: P, suffix: str) -> None:
    end = ending(after_gate(action))
    assert (end.rollback, end.phase, end.suffix) == (rollback, phase, suffix), name


def test_continue_is_not_an_ending() -> None:
    with pytest.raises(ValueError, match="does not end"):
        ending(Decision.CONTINUE)


@pytest.mark.parametrize(
    ("name", "settled", "failed", "phase"),
    [
        ("all updated", True, 0, P.SUCCEEDED),
        ("some failed, tolerated", True, 2, P.FAILED),
        ("stopped before the end", False, 0, P.ABORTED),
        ("stopped wins over failures", False, 3, P.ABORTED),
    ],
)
def test_final_phase(name: str, settled: bool, failed: int, phase: P) -> None:
    assert final(all_settled=settled, failed=failed, fleet=6, version="2.0")[0] is phase, name


ALLOWED = {
    "pause": {P.PENDING, P.RUNNING, P.WAITING},
    "resume": {P.PAUSED},
    "abort": {P.PENDING, P.RUNNING, P.PAUSED, P.WAITING, P.ROLLING_BACK},
    "retry": {P.PAUSED, P.HALTED, P.ABORTED, P.FAILED, P.ROLLED_BACK},
    "rollback": set(P) - {P.ROLLED_BACK, P.ROLLING_BACK},
}


@pytest.mark.parametrize("command", sorted(ALLOWED))
@pytest.mark.parametrize("phase", list(P))
def test_command_by_phase(command: str, phase: P) -> None:
    why = refusal(command, phase, busy=False, any_committed=True)
    assert (why is None) == (phase in ALLOWED[command]), (command, phase, why)


@pytest.mark.parametrize(
    ("name", "command", "busy", "committed", "refused"),
    [
        ("retry while the engine works", "retry", True, True, "still running"),
        ("rollback while the engine works", "rollback", True, True, "abort it first"),
        ("rollback with nothing updated", "rollback", False, False, "no node"),
        ("resume while busy is fine", "resume", True, False, None),
        ("an unknown command", "explode", False, False, "unknown command"),
    ],
)
def test_command_refusals(
    name: str, command: str, busy: bool, committed: bool, refused: str | None
) -> None:
    phase = P.PAUSED if command in ("resume", "retry", "explode") else P.HALTED
    why = refusal(command, phase, busy=busy, any_committed=committed)
    assert (why is None) if refused is None else (why is not None and refused in why), name
