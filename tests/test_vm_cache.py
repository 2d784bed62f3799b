"""The VM cache keeps the builds of the newest few code versions, not every one ever made
(rollout.vm.fleet: `stale`, pure, and `_prune` on real files)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rollout.vm import fleet

CASES = {
    "empty": ([], 3, []),
    "fewer builds than kept": ([("s-1-k1.img", "k1", 1.0), ("s-2-k2.img", "k2", 2.0)], 3, []),
    "oldest build goes, all its files": (
        [
            ("s-1-k1.img", "k1", 1.0),
            ("s-2-k1.img", "k1", 1.5),
            ("s-1-k2.img", "k2", 2.0),
            ("s-1-k3.img", "k3", 3.0),
        ],
        2,
        ["s-1-k1.img", "s-2-k1.img"],
    ),
    "a build's time is its newest file": (
        [("a-k1", "k1", 0.1), ("b-k1", "k1", 9.0), ("a-k2", "k2", 5.0), ("a-k3", "k3", 6.0)],
        2,
        ["a-k2"],
    ),
}


@pytest.mark.parametrize(("entries", "keep", "dropped"), CASES.values(), ids=CASES.keys())
def test_stale(entries: list[tuple[str, str, float]], keep: int, dropped: list[str]) -> None:
    assert fleet.stale(entries, keep) == dropped


def test_prune_deletes_the_old_builds_images_and_nothing_else(tmp_path: Path) -> None:
    names = {
        "sample-1.0.0-aaaaaaaaaaaa.img": 100,
        "sample-4.0.0-bad-aaaaaaaaaaaa.img": 101,
        "sample-1.0.0-bbbbbbbbbbbb.img": 200,
        "sample-1.0.0-cccccccccccc.img": 300,
        "sample-4.0.0-bad-dddddddddddd.img": 400,
        "notes.txt": 1,  # not an image: never touched
    }
    for name, mtime in names.items():
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, (mtime, mtime))
    fleet._prune(tmp_path, "sample-*.img", lambda n: n.rsplit("-", 1)[-1])
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "notes.txt",
        "sample-1.0.0-bbbbbbbbbbbb.img",
        "sample-1.0.0-cccccccccccc.img",
        "sample-4.0.0-bad-dddddddddddd.img",
    ]
