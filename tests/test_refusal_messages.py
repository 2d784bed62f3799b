"""The words of the controller's refusals (HTTP 409 `illegal`, `rollout` exit 2) and of an
aborted ending: what an operator reads, pinned one case each (the legality itself is
tabled in test_decide.py and, through the controller, in test_promises.py)."""

from __future__ import annotations

import pytest

from rollout.decide import final, refusal
from rollout.model import RolloutPhase as P


@pytest.mark.parametrize(
    ("command", "phase", "busy", "committed", "message"),
    [
        ("pause", P.HALTED, False, True, "cannot pause a rollout that is halted"),
        ("resume", P.RUNNING, True, True, "cannot resume a rollout that is running, not paused"),
        ("abort", P.SUCCEEDED, False, True, "cannot abort a rollout that is already succeeded"),
        ("retry", P.RUNNING, True, True,
         "cannot retry a rollout that is running; retry applies to halted, aborted, failed, "
         "rolled back or stopped (paused) rollouts"),
        ("retry", P.PAUSED, True, True,
         "the rollout is still running (paused rollouts resume with resume)"),
        ("rollback", P.ROLLING_BACK, False, True, "the rollout is already rolling_back"),
        ("rollback", P.PAUSED, True, True, "the rollout is running; abort it first"),
        ("rollback", P.HALTED, False, False, "no node of this rollout is on the new image"),
        ("reboot", P.RUNNING, False, True, "unknown command 'reboot'"),
    ],
)  # fmt: skip
def test_refusal_messages(
    command: str, phase: P, busy: bool, committed: bool, message: str
) -> None:
    assert refusal(command, phase, busy=busy, any_committed=committed) == message


def test_a_rollout_that_stopped_starting_nodes_ends_aborted() -> None:
    assert final(all_settled=False, failed=1, fleet=3, version="2.0") == (
        P.ABORTED,
        "stopped by the operator",
    )
