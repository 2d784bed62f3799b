"""The CLI as a user runs it: real subprocesses, real fleets, exit codes and output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from rollout import fleet
from tests.conftest import LocalFleet, SampleImages, next_block
from tests.helpers import FAST_POLICY, ROOT, rollout, status_json, write_policy


def test_run_then_status_shows_every_node_on_target_with_one_more_boot(
    make_fleet: Callable[..., LocalFleet], images: SampleImages, tmp_path: Path
) -> None:
    fl = make_fleet(4)
    before = status_json(fl.inventory)
    policy = write_policy(tmp_path)
    proc = rollout(
        "run", "--inventory", str(fl.inventory), "--policy", str(policy),
        "--image", images.v2.path, "--log-format", "json", "--state", str(tmp_path / "s.db"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    events = {line["event"] for line in lines}
    assert {"rollout_started", "batch_started", "node_committed", "rollout_finished"} <= events
    steps = [line for line in lines if line["event"] == "node_step"]
    assert {s["step"] for s in steps} == {"stage", "activate", "boot", "verify", "commit"}
    token = Path(fl.nodes[0].token_file or "").read_text().strip()
    assert token not in proc.stderr and token not in proc.stdout
    after = status_json(fl.inventory)
    for node_id, row in after.items():
        assert row["digest"] == images.v2.digest
        assert row["committed"] is True
        assert row["boot_count"] == before[node_id]["boot_count"] + 1
        assert row["healthy"] is True


def test_bad_policy_is_exit_2_with_file_and_field(
    make_fleet: Callable[..., LocalFleet], tmp_path: Path
) -> None:
    bad = dict(FAST_POLICY, batches={"size": "lots"})
    policy = write_policy(tmp_path, bad)
    inventory = tmp_path / "inv.yaml"
    inventory.write_text(yaml.safe_dump({"token_file": "t", "nodes": [
        {"id": "a", "address": "127.0.0.1:1"}]}))  # fmt: skip
    proc = rollout("plan", "--inventory", str(inventory), "--policy", str(policy))
    assert proc.returncode == 2
    assert f"{policy}: batches.size:" in proc.stderr
    assert '"lots"' in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_missing_image_is_exit_2(tmp_path: Path) -> None:
    policy = write_policy(tmp_path)
    inventory = tmp_path / "inv.yaml"
    inventory.write_text(yaml.safe_dump({"token_file": "t", "nodes": [
        {"id": "a", "address": "127.0.0.1:1"}]}))  # fmt: skip
    proc = rollout(
        "run", "--inventory", str(inventory), "--policy", str(policy),
        "--image", str(tmp_path / "nope.img"), "--state", str(tmp_path / "s.db"),
    )  # fmt: skip
    assert proc.returncode == 2
    assert "nope.img" in proc.stderr


def test_plan_prints_batches_without_touching_nodes(tmp_path: Path) -> None:
    inventory = tmp_path / "inv.yaml"
    ids = [f"n{i}" for i in range(6)]
    nodes = [
        {"id": ids[i], "address": f"127.0.0.{i + 2}:7000", "labels": {"rack": f"r{i % 2}"}}
        for i in range(6)
    ]
    inventory.write_text(yaml.safe_dump({"token_file": "t", "nodes": nodes}))
    proc = rollout(
        "plan", "--inventory", str(inventory), "--policy", str(ROOT / "policies/canary.yaml"),
        "--output", "json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    batches = json.loads(proc.stdout)["batches"]
    assert batches[0]["size"] == 1
    assert sorted(n for b in batches for n in b["nodes"]) == sorted(ids)


def test_image_build_prints_digest_and_refuses_escaping_link(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "app").mkdir(parents=True)
    (src / "app" / "run.sh").write_text("echo hi\n")
    out = tmp_path / "x.img"
    proc = rollout("image", "build", str(src), "--version", "3", "--output", str(out),
                   "--workload", "sh app/run.sh")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    digest = proc.stdout.strip()
    assert digest.startswith("sha256:") and len(digest) == 71
    with tarfile.open(out) as tar:
        assert "manifest.json" in tar.getnames()
    (src / "escape").symlink_to("/etc/passwd")
    proc = rollout("image", "build", str(src), "--version", "3", "--output", str(out),
                   "--workload", "sh app/run.sh")  # fmt: skip
    assert proc.returncode == 2
    assert "escape" in proc.stderr and "outside" in proc.stderr


def _pids_alive(workdir: Path) -> list[int]:
    return [p for p in fleet._processes_under(workdir)]


def test_demo_bad_rolls_back_canary_and_exits_1(images: SampleImages, tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    base = next_block(3)
    proc = rollout(
        "demo", "--nodes", "3", "--bad", "--workdir", str(workdir), "--keep",
        "--base-address", base, "--log-format", "console", timeout=180,
    )  # fmt: skip
    try:
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "rolled_back" in proc.stdout
        rows = status_json(workdir / "inventory.yaml")
        v1 = json.loads(rollout("image", "inspect", str(workdir / "v1.img")).stdout)
        assert all(r["digest"] == v1["digest"] and r["committed"] for r in rows.values())
    finally:
        fleet.down(workdir)
    assert _pids_alive(workdir) == []


def test_demo_succeeds_and_leaves_nothing_running(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    proc = rollout(
        "demo", "--nodes", "3", "--workdir", str(workdir), "--base-address", next_block(3),
        "--log-format", "console", timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "succeeded" in proc.stdout
    assert _pids_alive(workdir) == []
    assert not (workdir / fleet.FLEET_FILE).exists()


def test_ctrl_c_starts_nothing_new_and_settles_in_flight(
    make_fleet: Callable[..., LocalFleet], images: SampleImages, tmp_path: Path
) -> None:
    fl = make_fleet(4)
    data = dict(FAST_POLICY, batches={"canary": 1, "size": 1, "max_unavailable": 1})
    policy = write_policy(tmp_path, data)
    proc = subprocess.Popen(
        [sys.executable, "-m", "rollout", "run", "--inventory", str(fl.inventory),
         "--policy", str(policy), "--image", images.v2.path, "--log-format", "json",
         "--output", "json", "--state", str(tmp_path / "s.db")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    assert proc.stderr is not None
    deadline = time.monotonic() + 60
    for line in proc.stderr:  # wait for the canary to be activated, then interrupt
        if '"node_booting"' in line:
            os.kill(proc.pid, signal.SIGINT)
            break
        assert time.monotonic() < deadline
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 1
    result = json.loads(out)
    assert result["phase"] == "aborted"
    phases = {n["node"]: n["phase"] for n in result["nodes"]}
    assert phases[fl.nodes[0].id] == "committed"  # in flight: settled
    assert all(phases[n.id] == "pending" for n in fl.nodes[1:])  # nothing new started
    rows = status_json(fl.inventory)
    assert rows[fl.nodes[0].id]["digest"] == images.v2.digest
    assert all(rows[n.id]["digest"] == images.v1.digest for n in fl.nodes[1:])
    assert all(r["committed"] for r in rows.values())


def test_two_controllers_never_drive_one_node(
    make_fleet: Callable[..., LocalFleet], images: SampleImages, tmp_path: Path
) -> None:
    """Another controller (another state file) holds a node's agent lease: refused, exit 2."""
    import asyncio

    from rollout.drivers.agent import AgentDriver

    fl = make_fleet(2)

    async def take() -> None:
        other = AgentDriver(lease_holder="other-rollout")
        try:
            await other.lease(fl.nodes[1], 120)
        finally:
            await other.close()

    asyncio.run(take())
    before = status_json(fl.inventory)
    policy = write_policy(tmp_path)
    proc = rollout(
        "run", "--inventory", str(fl.inventory), "--policy", str(policy),
        "--image", images.v2.path, "--state", str(tmp_path / "mine.db"),
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "other-rollout" in proc.stderr and fl.nodes[1].id in proc.stderr
    keys = ("digest", "committed", "staged", "boot_count")
    after = status_json(fl.inventory)
    for node_id, row in after.items():  # nothing staged, nothing booted
        assert {k: row[k] for k in keys} == {k: before[node_id][k] for k in keys}
        assert row["staged"] is None


def test_unfinished_rollout_with_other_image_is_refused(
    make_fleet: Callable[..., LocalFleet], images: SampleImages, tmp_path: Path
) -> None:
    from rollout.controller import Controller
    from rollout.inventory import load_inventory
    from rollout.journal import SQLiteStore
    from rollout.policy import load_policy

    fl = make_fleet(1)
    policy = write_policy(tmp_path)
    state = tmp_path / "s.db"
    store = SQLiteStore(state)
    created = Controller(store).create(
        load_inventory(fl.inventory).nodes, load_policy(policy), images.bad, "p"
    )
    store.close()
    proc = rollout(
        "run", "--inventory", str(fl.inventory), "--policy", str(policy),
        "--image", images.v2.path, "--state", str(state),
    )  # fmt: skip
    assert proc.returncode == 2
    assert created.rollout_id in proc.stderr and "not finished" in proc.stderr


def test_offline_history_show_and_abort_of_a_run_journal(
    make_fleet: Callable[..., LocalFleet], images: SampleImages, tmp_path: Path
) -> None:
    from rollout.controller import Controller
    from rollout.inventory import load_inventory
    from rollout.journal import SQLiteStore
    from rollout.policy import load_policy

    fl = make_fleet(1)
    policy = write_policy(tmp_path)
    state = tmp_path / "s.db"
    proc = rollout(
        "run", "--inventory", str(fl.inventory), "--policy", str(policy),
        "--image", images.v2.path, "--state", str(state),
    )  # fmt: skip
    assert proc.returncode == 0
    listed = json.loads(rollout("ls", "--state", str(state), "--output", "json").stdout)
    (done,) = listed["rollouts"]
    assert done["phase"] == "succeeded"
    hist = rollout("history", done["id"], "--state", str(state))
    assert hist.returncode == 0 and "created by run" in hist.stdout
    assert "node node-01 committed" in hist.stdout
    again = rollout("abort", done["id"], "--state", str(state))
    assert again.returncode == 2 and "already succeeded" in again.stderr

    # An unfinished rollout whose controller died (its lock expired) can be aborted offline,
    # then a rollout of another image may go ahead.
    store = SQLiteStore(state)
    stale = Controller(store, lock_ttl=0.0).create(
        load_inventory(fl.inventory).nodes, load_policy(policy), images.bad, "p"
    )
    store.close()
    blocked = rollout(
        "run", "--inventory", str(fl.inventory), "--policy", str(policy),
        "--image", images.v1.path, "--state", str(state),
    )  # fmt: skip
    assert blocked.returncode == 2 and stale.rollout_id in blocked.stderr
    aborted = rollout("abort", stale.rollout_id, "--state", str(state), "--by", "ops")
    assert aborted.returncode == 0, aborted.stderr
    shown = json.loads(rollout("show", stale.rollout_id, "--state", str(state),
                               "--output", "json").stdout)  # fmt: skip
    assert shown["phase"] == "aborted" and shown["commands"][0]["by"] == "ops"
    back = rollout(
        "run", "--inventory", str(fl.inventory), "--policy", str(policy),
        "--image", images.v1.path, "--state", str(state),
    )  # fmt: skip
    assert back.returncode == 0, back.stdout + back.stderr


def test_unreadable_token_is_exit_2_and_nothing_is_journaled(
    images: SampleImages, tmp_path: Path
) -> None:
    policy = write_policy(tmp_path)
    inventory = tmp_path / "inv.yaml"
    inventory.write_text(yaml.safe_dump({"token_file": "missing-token", "nodes": [
        {"id": "a", "address": "127.0.0.1:1"}]}))  # fmt: skip
    state = tmp_path / "s.db"
    proc = rollout(
        "run", "--inventory", str(inventory), "--policy", str(policy),
        "--image", images.v2.path, "--state", str(state),
    )  # fmt: skip
    assert proc.returncode == 2
    assert "node a: token file: cannot read" in proc.stderr and "missing-token" in proc.stderr
    assert rollout("ls", "--state", str(state)).stdout.strip() == "no rollouts"


def test_fleet_down_stops_its_agents_and_workloads_and_nothing_else(
    make_fleet: Callable[..., LocalFleet],
) -> None:
    fl = make_fleet(2)
    ours = fleet._processes_under(fl.workdir.resolve())
    agents = json.loads((fl.workdir / fleet.FLEET_FILE).read_text())["pids"].values()
    assert set(agents) <= set(ours) and len(ours) > 2  # the agents and their workloads
    bystander = subprocess.Popen(["sleep", "60"], cwd=fl.workdir)  # e.g. a shell in there
    try:
        proc = rollout("fleet", "down", "--workdir", str(fl.workdir))
        assert proc.returncode == 0 and "stopped 2 agent(s)" in proc.stdout
        assert fleet._processes_under(fl.workdir.resolve()) == []
        assert all(not fleet.pid_alive(pid) for pid in ours)
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()
