"""The one definition of finished rollout phases, and everything that depends on it."""

from __future__ import annotations

from rollout import client, journal, webhooks
from rollout.model import FINISHED, RolloutPhase


def test_finished_phases_are_one_set_everywhere() -> None:
    assert {p for p in RolloutPhase if p.finished} == FINISHED
    assert journal.FINISHED is FINISHED
    assert client.FINAL == {str(p) for p in FINISHED}
    assert set(webhooks._FINAL) == FINISHED  # each has a notify event name


def test_running_phases_are_not_finished() -> None:
    for phase in (RolloutPhase.PENDING, RolloutPhase.RUNNING, RolloutPhase.PAUSED,
                  RolloutPhase.WAITING, RolloutPhase.ROLLING_BACK):  # fmt: skip
        assert not phase.finished, phase
