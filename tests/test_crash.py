"""Crash-resume: SIGKILL the controller at many random points; every resume carries on.

The kill points are journal positions (the controller is killed right after the journal
reaches a randomly chosen length, plus a random few milliseconds), seeded and printed, so
a failure names the exact sequence to replay. The fleet is real: 10 agent processes.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from rollout.journal import SQLiteStore, fold
from rollout.model import NodePhase, RolloutPhase
from tests.conftest import LocalFleet, SampleImages
from tests.helpers import FAST_POLICY, ROOT, status_json, wait_for

SEED = int(os.environ.get("ROLLOUT_CRASH_SEED", "20261123"))
KILLS = 20


def journal_length(path: Path) -> int:
    if not path.exists():
        return 0
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        row = db.execute("SELECT COALESCE(MAX(seq), 0) FROM entries").fetchone()
    except sqlite3.OperationalError:
        return 0
    finally:
        db.close()
    return int(row[0])


def test_sigkill_at_random_points_then_resume_ends_exactly_once(
    make_fleet: Callable[..., LocalFleet], images: SampleImages, tmp_path: Path
) -> None:
    rng = random.Random(SEED)
    fl = make_fleet(10)
    before = status_json(fl.inventory)
    policy = tmp_path / "policy.yaml"
    data = dict(FAST_POLICY, batches={"canary": 1, "size": 3, "max_unavailable": 3})
    policy.write_text(yaml.safe_dump(data))
    state = tmp_path / "state.db"
    cmd = [
        sys.executable, "-m", "rollout", "run", "--inventory", str(fl.inventory),
        "--policy", str(policy), "--image", images.v2.path, "--state", str(state),
        "--log-format", "json", "--output", "json",
    ]  # fmt: skip
    kill_points: list[tuple[int, float]] = []
    finished_early = False
    while len(kill_points) < KILLS:
        target = journal_length(state) + rng.randint(1, 5)
        jitter = rng.uniform(0, 0.05)
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def reached(t: int = target, p: subprocess.Popen[bytes] = proc) -> bool:
            return journal_length(state) >= t or p.poll() is not None

        wait_for(reached, 60, 0.005, what=f"journal entry {target} (kills so far {kill_points})")
        if proc.poll() is not None:
            finished_early = True
            break
        time.sleep(jitter)  # the random part of the kill point, not a wait for an event
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kill_points.append((target, round(jitter, 4)))
    report = f"seed {SEED}, kill points (journal seq, jitter s): {kill_points}"
    print(report)
    assert len(kill_points) == KILLS or finished_early, report
    assert len(kill_points) >= KILLS, f"the rollout finished after {len(kill_points)}: {report}"

    final = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert final.returncode == 0, f"{report}\n{final.stdout}\n{final.stderr}"

    after = status_json(fl.inventory)
    for node_id, row in after.items():
        assert row["digest"] == images.v2.digest, report
        assert row["committed"] is True, report
        assert row["staged"] is None, (node_id, report)  # nothing staged-but-unknown
        assert row["boot_count"] == before[node_id]["boot_count"] + 1, (node_id, report)

    store = SQLiteStore(state)
    try:
        (rollout_id,) = store.rollout_ids()
        replayed = fold(store.entries(rollout_id))
    finally:
        store.close()
    assert replayed.phase is RolloutPhase.SUCCEEDED
    assert {n.phase for n in replayed.nodes.values()} == {NodePhase.COMMITTED}
    assert sum(c.command == "abort" for c in replayed.commands) == 0
