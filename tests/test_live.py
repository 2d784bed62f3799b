"""The live view's staging progress: bytes pushed or pulled per node, from the events."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from rollout.console import LiveProgress
from rollout.events import BytesFetched, BytesSent, Event, NodeChanged, RolloutStarted
from rollout.model import Batch, Image, Node, NodePhase

NODE = Node("n1", "10.0.0.1:7000")
PUSHED = Image("v2.img", "sha256:" + "2" * 64, "app", "2.0", 10 << 20)
PULLED = Image(
    "", PUSHED.digest, "app", "2.0", 10 << 20, source="oci://r:5000/a@sha256:" + "3" * 64
)
STAGING = NodeChanged("n1", 1, NodePhase.STAGING)
MiB = 1 << 20


def render(events: list[Event]) -> str:
    out = io.StringIO()
    console = Console(file=out, width=120, force_terminal=False)
    live = LiveProgress(console)
    for event in events:
        live(event)
    console.print(live._render())
    return out.getvalue()


@pytest.mark.parametrize(
    ("name", "image", "more", "expected"),
    [
        ("push, half sent", PUSHED, [BytesSent("n1", 5 * MiB)], "5.0/10.0 MiB sent (50%)"),
        ("pull, a quarter fetched", PULLED,
         [BytesFetched("n1", 2 * MiB), BytesFetched("n1", MiB // 2)],
         "2.5/10.0 MiB fetched (25%)"),
        ("a new attempt starts from zero", PUSHED,
         [BytesSent("n1", 9 * MiB), STAGING, BytesSent("n1", MiB)], "1.0/10.0 MiB sent (10%)"),
    ],
)  # fmt: skip
def test_staging_progress_is_shown_per_node(
    name: str, image: Image, more: list[Event], expected: str
) -> None:
    started = RolloutStarted("r1", image, "p", (Batch(1, (NODE,)),), 1)
    text = render([started, NodeChanged("n1", 1, NodePhase.STAGING), *more])
    assert expected in text, (name, text)


def test_no_progress_once_staged() -> None:
    started = RolloutStarted("r1", PUSHED, "p", (Batch(1, (NODE,)),), 1)
    text = render([started, NodeChanged("n1", 1, NodePhase.STAGING), BytesSent("n1", 10 << 20),
                   NodeChanged("n1", 1, NodePhase.STAGED)])  # fmt: skip
    assert "MiB" not in text and "staged" in text
