"""Pure decisions: what the engine does after a batch, given what it observed.

The engine never branches on policy text itself; it asks `after_batch` and acts on the
returned `Decision` (the way Nomad's deployment watcher returns a verdict, then acts).

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
