"""The controller service as a process: a real `rollout serve` and real agents.

Only what needs the process boundary: a restart that resumes a rollout, the real CLI
client against it, and another controller's leases on real agents. The HTTP contract
(auth, 400/404/409, commands, pause/resume, abort/retry, the events stream, overlapping
rollouts, rollback) is tested in-process on simulated nodes in tests/test_api.py."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from rollout.controller import LEASE_TTL
from rollout.model import Node
from tests.conftest import LocalFleet, SampleImages, next_host
from tests.helpers import (
    ROOT,
    TERMINAL,
    Service,
    body,
    policy_file,
    status_json,
    wait_for_async,
)


async def test_service_restart_resumes_unfinished_rollout(
    service: Service, make_fleet: Callable[..., LocalFleet], images: SampleImages, tmp_path: Path
) -> None:
    fl = make_fleet(3)
    before = status_json(fl.inventory)
    policy = policy_file(tmp_path, batches={"canary": 1, "size": 1, "max_unavailable": 1})
    _, created = await service.call("POST", "/v1/rollouts", body(fl, policy, images.v2.path))
    rid = created["id"]
    await wait_for_async(
        lambda: service.events(rid), 60, what="a node booting",
        done=lambda events: any(e["kind"] == "node" and e["data"]["phase"] == "booting"
                                for e in events),
    )  # fmt: skip
    service.kill()
    service.start()
    final = await service.wait_phase(rid, TERMINAL)
    assert final["phase"] == "succeeded", final
    after = status_json(fl.inventory)
    for node_id, row in after.items():
        assert row["digest"] == images.v2.digest and row["committed"]
        assert row["boot_count"] == before[node_id]["boot_count"] + 1


def test_cli_client_round_trip(
    service: Service, make_fleet: Callable[..., LocalFleet], images: SampleImages, tmp_path: Path
) -> None:
    fl = make_fleet(2)
    policy = policy_file(tmp_path)
    env = dict(os.environ, ROLLOUT_SERVER=service.url, ROLLOUT_TOKEN_FILE=str(tmp_path / "token"))

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "rollout", *args], capture_output=True,
                              text=True, env=env, cwd=ROOT, timeout=120)  # fmt: skip

    started = cli("start", "--inventory", str(fl.inventory), "--policy", policy,
                  "--image", images.v2.path)  # fmt: skip
    assert started.returncode == 0, started.stderr
    rid = started.stdout.strip()
    watched = cli("watch", rid)
    assert watched.returncode == 0, watched.stdout + watched.stderr
    assert "rollout succeeded" in watched.stdout
    shown = json.loads(cli("show", rid, "--output", "json").stdout)
    assert shown["phase"] == "succeeded"
    listed = json.loads(cli("ls", "--output", "json").stdout)
    assert [r["id"] for r in listed["rollouts"]] == [rid]
    hist = cli("history", rid)
    assert "created by api" in hist.stdout and "node-01 committed" in hist.stdout
    again = cli("resume", rid)
    assert again.returncode == 2 and "cannot resume" in again.stderr
    clash = cli("start", "--inventory", str(fl.inventory), "--policy", policy,
                "--image", images.v2.path)  # fmt: skip
    assert clash.returncode == 0  # the first finished: its locks are released
    no_token = subprocess.run([sys.executable, "-m", "rollout", "ls", "--server", service.url],
                              capture_output=True, text=True, cwd=ROOT,
                              env={k: v for k, v in os.environ.items()
                                   if not k.startswith("ROLLOUT_")})  # fmt: skip
    assert no_token.returncode == 2 and "token" in no_token.stderr


def test_gates_through_the_service_and_its_cli(
    service: Service, make_fleet: Callable[..., LocalFleet], images: SampleImages, tmp_path: Path
) -> None:
    fl = make_fleet(2)
    gates = [
        {"name": "smoke", "kind": "wait", "after": "canary", "timeout": "60s"},
        {"name": "ship-it", "kind": "approval", "after": "canary"},
    ]
    policy = policy_file(tmp_path, gates=gates)
    env = dict(os.environ, ROLLOUT_SERVER=service.url, ROLLOUT_TOKEN_FILE=str(tmp_path / "token"))

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "rollout", *args], capture_output=True,
                              text=True, env=env, cwd=ROOT, timeout=120)  # fmt: skip

    rid = cli("start", "--inventory", str(fl.inventory), "--policy", policy,
              "--image", images.v2.path).stdout.strip()  # fmt: skip
    # Early signals count: send it before the gate waits.
    sent = cli("signal", rid, "smoke", "--id", "ci-7", "--reason", "smoke ok", "--data", "12/12")
    assert sent.returncode == 0, sent.stderr
    wrong = cli("signal", rid, "ship-it")
    assert wrong.returncode == 2 and "approval gate" in wrong.stderr
    missing = cli("approve", rid, "nope")
    assert missing.returncode == 2 and "no gate" in missing.stderr

    def on_approval(state: dict[str, Any]) -> bool:
        waits = [g for g in state["gates"] if g.get("event") == "waiting"]
        return state["phase"] == "waiting" and bool(waits) and waits[-1]["gate"] == "ship-it"

    asyncio.run(wait_for_async(lambda: service.rollout(rid), 60, 0.1,
                               what="the approval gate to wait", done=on_approval))  # fmt: skip
    shown = cli("show", rid)
    assert "gate smoke: signal ci-7 SUCCESS" in shown.stdout and "data='12/12'" in shown.stdout
    assert "gate ship-it (approval) waiting" in shown.stdout
    ok = cli("approve", rid, "ship-it", "--by", "alice")
    assert ok.returncode == 0 and "approved by alice" in ok.stdout
    watched = cli("watch", rid)
    assert watched.returncode == 0, watched.stdout
    hist = cli("history", rid).stdout
    assert "gate ship-it: approved by alice" in hist and "gate smoke (wait) passed" in hist


async def agent_lease(node: Node) -> dict[str, Any] | None:
    """The node's lease as its agent reports it (GET /v1/status)."""
    with open(str(node.token_file)) as f:
        token = f.read().strip()
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://{node.address}/v1/status",
                 headers={"Authorization": f"Bearer {token}"}) as r,
    ):  # fmt: skip
        assert r.status == 200
        lease = (await r.json())["lease"]
        return lease if isinstance(lease, dict) else None


def locks_in(state: Path) -> list[tuple[str, str]]:
    with contextlib.closing(sqlite3.connect(f"file:{state}?mode=ro", uri=True)) as db:
        return [(r[0], r[1]) for r in db.execute("SELECT node_id, rollout_id FROM locks")]


async def test_rollout_over_nodes_another_controller_holds_is_refused_409_naming_it(
    service: Service, make_fleet: Callable[..., LocalFleet], images: SampleImages, tmp_path: Path
) -> None:
    """Another `rollout serve` (its own state file and token: it shares nothing but the
    nodes) holds two of three nodes: a rollout over all three is a 409 naming the holder,
    its nodes and until when, and nothing is journaled, locked or leased for it."""
    fl = make_fleet(3)
    ids = [n.id for n in fl.nodes]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "token").write_text("other-token\n")
    other = Service(tmp_path / "other", next_host(), "other-token")
    other.start()
    try:
        gate = {"name": "hold", "kind": "wait", "after": "canary", "timeout": "300s"}
        policy = policy_file(tmp_path, gates=[gate],
                             batches={"canary": 1, "size": 1, "max_unavailable": 1})  # fmt: skip
        status, held = await other.call(
            "POST", "/v1/rollouts", body(fl, policy, images.v2.path, nodes=ids[1:])
        )
        assert status == 201, held
        holder = held["id"]
        await other.wait_phase(holder, {"waiting"})

        plain = policy_file(tmp_path)
        status, clash = await service.call("POST", "/v1/rollouts", body(fl, plain, images.v2.path))
        assert status == 409, clash
        assert clash["error"] == "conflict" and clash["holder"] == holder
        assert sorted(clash["nodes"]) == ids[1:]
        assert holder in clash["message"] and ids[1] in clash["message"]
        until = dt.datetime.strptime(clash["expires_at"], "%Y-%m-%dT%H:%M:%SZ")
        left = until.replace(tzinfo=dt.UTC).timestamp() - time.time()
        # The holder's agent lease: rollout's lease ttl (300 s), outlasting a reboot.
        assert LEASE_TTL - 60 < left <= LEASE_TTL + 1
        assert LEASE_TTL - 60 < clash["expires_in"] <= LEASE_TTL
        assert clash["expires_at"] in clash["message"]
        # Nothing journaled, locked or leased for the refused request.
        assert (await service.call("GET", "/v1/rollouts"))[1]["rollouts"] == []
        assert locks_in(service.workdir / "state.db") == []
        assert await agent_lease(fl.nodes[0]) is None  # taken for the request, released
        for node in fl.nodes[1:]:
            lease = await agent_lease(node)
            assert lease is not None and lease["holder"] == holder

        # The free node alone is fine; once the holder is done, its nodes are too.
        status, free = await service.call(
            "POST", "/v1/rollouts", body(fl, plain, images.v2.path, nodes=ids[:1])
        )
        assert status == 201, free
        signal = held["signal_urls"]["hold"]
        async with aiohttp.ClientSession() as http, http.put(signal, data=b"") as r:
            assert r.status == 200, await r.text()  # a bare signal is a SUCCESS (Heat)
        assert (await other.wait_phase(holder, TERMINAL))["phase"] == "succeeded"
        status, after = await service.call(
            "POST", "/v1/rollouts", body(fl, plain, images.v1.path, nodes=ids[1:])
        )
        assert status == 201, after
        assert (await service.wait_phase(free["id"], TERMINAL))["phase"] == "succeeded"
        assert (await service.wait_phase(after["id"], TERMINAL))["phase"] == "succeeded"
    finally:
        other.kill()


async def test_a_resumed_rollout_whose_node_another_holds_halts_naming_it(
    make_fleet: Callable[..., LocalFleet], images: SampleImages, tmp_path: Path
) -> None:
    """The service resumes a rollout (as after a restart) and finds one of its nodes leased
    to another controller's rollout: it halts, saying who holds which node until when, and
    leaves no lease of its own behind; a retry once the node is free finishes it."""
    from rollout.controller import Controller
    from rollout.drivers.agent import AgentDriver
    from rollout.inventory import load_inventory
    from rollout.journal import SQLiteStore
    from rollout.policy import load_policy

    fl = make_fleet(2)
    store = SQLiteStore(tmp_path / "state.db")
    controller = Controller(store)
    policy = load_policy(policy_file(tmp_path))
    rid = controller.create(load_inventory(fl.inventory).nodes, policy, images.v2).rollout_id
    other = AgentDriver(lease_holder="other-controller-rollout")
    try:
        await other.lease(fl.nodes[1], 120)
        result = await asyncio.wait_for(controller.start(rid), 60)
        assert result.phase.value == "halted"
        state = controller.state(rid)
        assert state.phase.value == "halted"
        assert "other-controller-rollout" in state.message and fl.nodes[1].id in state.message
        assert re.search(r"at \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", state.message)
        assert await agent_lease(fl.nodes[0]) is None  # its own lease was given back
        assert store.lock_expiry(rid) is None
        await other.release(fl.nodes[1])
    finally:
        await other.close()
    assert controller.command(rid, "retry", by="ops").startswith("retrying")
    final = await asyncio.wait_for(controller.tasks[rid], 90)
    assert final.phase.value == "succeeded", final.message
    store.close()
