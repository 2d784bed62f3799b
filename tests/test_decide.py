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
