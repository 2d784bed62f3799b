"""A node cut off mid-batch (its agent and workload SIGSTOPped, as a network partition
looks from the controller: connections hang) past the boot and health deadlines, then
healed: the rollout fails that node as the policy says, loses nothing, and running it
again with the same journal completes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from rollout import fleet
from tests.conftest import LocalFleet, SampleImages
from tests.helpers import FAST_POLICY, ROOT, status_json, write_policy


def freeze(fl: LocalFleet, node_id: str, sig: signal.Signals) -> list[int]:
    """Signal the node's agent and its workload process group."""
    pids = json.loads((fl.workdir / fleet.FLEET_FILE).read_text())["pids"]
    agent = int(pids[node_id])
    state = str(fl.workdir / "nodes" / node_id) + os.sep
    group = [agent]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/cwd").startswith(state):
                    group.append(int(entry))
            except OSError:
                continue
    for pid in group:
        os.kill(pid, sig)
    return group


def test_a_node_partitioned_mid_batch_fails_as_the_policy_says_and_a_rerun_completes(
    make_fleet: Callable[..., LocalFleet], images: SampleImages, tmp_path: Path
) -> None:
    fl = make_fleet(3)
    data = dict(
        FAST_POLICY,
        batches={"canary": 1, "size": 2, "max_unavailable": 2},
        health={**FAST_POLICY["health"], "boot_timeout": "4s", "deadline": "6s"},
        failure={"max_failed": 0, "action": "halt"},
    )
    policy = write_policy(tmp_path, data)
    state = tmp_path / "state.db"
    argv = [sys.executable, "-m", "rollout", "run", "--inventory", str(fl.inventory),
            "--policy", str(policy), "--image", images.v2.path, "--log-format", "json",
            "--output", "json", "--state", str(state)]  # fmt: skip
    victim = fl.nodes[2].id
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT)  # fmt: skip
    assert proc.stderr is not None
    deadline = time.monotonic() + 90
    frozen: list[int] = []
    for line in proc.stderr:  # cut the victim off once it has been activated
        if '"node_booting"' in line and victim in line:
            frozen = freeze(fl, victim, signal.SIGSTOP)
            break
        assert time.monotonic() < deadline, "the victim never got activated"
    assert frozen
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        for pid in frozen:
            # One that had exited before the freeze (a zombie, signalled all the same) is
            # reaped once its parent, continued first, runs again: it is gone by now.
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    assert proc.returncode == 1, err[-3000:]
    result = json.loads(out)
    assert result["phase"] == "halted"
    phases = {n["node"]: n["phase"] for n in result["nodes"]}
    assert phases[fl.nodes[0].id] == "committed"  # the canary
    assert phases[victim] in ("failed", "rolled_back", "rollback_failed"), phases

    # Healed: the same command with the same journal picks the rollout up and finishes it.
    again = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=180)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert json.loads(again.stdout)["phase"] == "succeeded"
    rows = status_json(fl.inventory)
    assert all(r["digest"] == images.v2.digest and r["committed"] for r in rows.values()), rows
