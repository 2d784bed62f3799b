"""What `rollout run` does with its journal (controller.pick), as a table of named cases."""

from __future__ import annotations

from collections.abc import Set as AbstractSet

import pytest

from rollout.controller import Pick, pick
from rollout.entries import CreatedEntry, ImageData, InventoryNode
from rollout.errors import InputError
from rollout.journal import RolloutState
from rollout.model import Image
from rollout.model import RolloutPhase as P

V2 = Image("v2.img", "sha256:" + "2" * 64, "app", "2.0", 100)
TAGGED = Image("", "sha256:" + "3" * 64, "app", "2.1", 100, source="oci://r/a@sha256:" + "9" * 64,
               reference="oci://r/a:stable")  # fmt: skip
NODES = frozenset({"n1", "n2"})


def state(rid: str, phase: P, nodes: AbstractSet[str], digest: str, reference: str | None = None,
          source: str | None = None) -> RolloutState:  # fmt: skip
    image = ImageData(path="", digest=digest, name="app", version="x", size=1,
                      reference=reference, source=source)  # fmt: skip
    inventory = tuple(InventoryNode(id=n, address=f"{n}:7000") for n in sorted(nodes))
    created = CreatedEntry(policy={}, image=image, inventory=inventory, batches=())
    return RolloutState(rid, created, phase)


CASES = [
    ("an empty journal: new", [], V2, Pick("new")),
    ("a finished rollout of the same: new", [state("r1", P.SUCCEEDED, NODES, V2.digest)], V2,
     Pick("new")),
    ("an unfinished one of the same: resume", [state("r1", P.RUNNING, NODES, V2.digest)], V2,
     Pick("resume", "r1", P.RUNNING)),
    ("paused after the canary: resume", [state("r1", P.PAUSED, NODES, V2.digest)], V2,
     Pick("resume", "r1", P.PAUSED)),
    ("halted, same image: retry", [state("r1", P.HALTED, NODES, V2.digest)], V2,
     Pick("retry", "r1", P.HALTED)),
    ("the newest halted one is retried",
     [state("r1", P.HALTED, NODES, V2.digest), state("r2", P.HALTED, NODES, V2.digest)], V2,
     Pick("retry", "r2", P.HALTED)),
    ("halted with another image: new", [state("r1", P.HALTED, NODES, "sha256:" + "0" * 64)], V2,
     Pick("new")),
    ("unfinished over other nodes: new", [state("r1", P.RUNNING, {"n9"}, V2.digest)], V2,
     Pick("new")),
    ("the tag moved since: resume on the journaled digest",
     [state("r1", P.PAUSED, NODES, "sha256:" + "1" * 64, TAGGED.reference, "oci://r/a@sha256:1")],
     TAGGED, Pick("resume", "r1", P.PAUSED, "oci://r/a@sha256:1")),
]  # fmt: skip


@pytest.mark.parametrize(("name", "states", "image", "expected"), CASES)
def test_pick(name: str, states: list[RolloutState], image: Image, expected: Pick) -> None:
    assert pick(states, NODES, image) == expected, name


@pytest.mark.parametrize(
    ("name", "other"),
    [
        ("another image over the same nodes", state("r1", P.RUNNING, NODES, "sha256:" + "0" * 64)),
        ("the same image over some of the nodes", state("r1", P.WAITING, {"n1"}, V2.digest)),
    ],
)
def test_an_unfinished_rollout_over_these_nodes_is_refused(name: str, other: RolloutState) -> None:
    with pytest.raises(InputError, match=r"r1 .* is not finished in this state file"):
        pick([other], NODES, V2)
