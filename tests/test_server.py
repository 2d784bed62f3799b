"""The controller service over HTTP: a real `rollout serve` process and real agents."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from rollout.model import Node
from tests.conftest import LocalFleet, SampleImages, next_host
from tests.test_cli import FAST_POLICY, ROOT, status_json

TERMINAL = {"succeeded", "halted", "rolled_back", "aborted", "failed"}


@dataclass
class Service:
    workdir: Path
    host: str
    token: str
    proc: subprocess.Popen[bytes] | None = None
    logs: list[Path] = field(default_factory=list)
    args: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        return f"http://{self.host}:7400"

    def start(self) -> None:
        log = self.workdir / f"serve-{len(self.logs)}.log"
        self.logs.append(log)
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "rollout", "serve", "--state",
                 str(self.workdir / "state.db"), "--listen", f"{self.host}:7400",
                 "--token-file", str(self.workdir / "token"), "--log-format", "json",
                 *self.args],
                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
            )  # fmt: skip
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection((self.host, 7400), timeout=0.5):
                    return
            except OSError:
                assert self.proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, "service did not start"
                time.sleep(0.05)  # polling for the port

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    async def call(
        self, method: str, path: str, body: Any = None, token: str | None = "default"
    ) -> tuple[int, dict[str, Any]]:
        headers = {}
        if token is not None:
            headers["Authorization"] = f"Bearer {self.token if token == 'default' else token}"
        async with (
            aiohttp.ClientSession() as http,
            http.request(method, self.url + path, json=body, headers=headers) as r,
        ):
            return r.status, await r.json(content_type=None)

    async def wait_phase(
        self, rollout_id: str, phases: set[str], timeout: float = 90
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            status, body = await self.call("GET", f"/v1/rollouts/{rollout_id}")
            assert status == 200, body
            if body["phase"] in phases:
                return body
            assert time.monotonic() < deadline, f"still {body['phase']}: {body}"
            await asyncio.sleep(0.1)  # polling the API for the phase

    async def events(self, rollout_id: str) -> list[dict[str, Any]]:
        status, body = await self.call("GET", f"/v1/rollouts/{rollout_id}/events")
        assert status == 200
        return list(body["events"])


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    (tmp_path / "token").write_text("service-secret-token\n")
    svc = Service(tmp_path, next_host(), "service-secret-token")
    svc.start()
    yield svc
    svc.kill()


def policy_file(tmp_path: Path, **over: Any) -> str:
    data = dict(FAST_POLICY) | over
    path = tmp_path / f"policy-{len(list(tmp_path.glob('policy-*')))}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def body(fl: LocalFleet, policy: str, image: str, **extra: Any) -> dict[str, Any]:
    return {"inventory": str(fl.inventory), "policy": policy, "image": image, **extra}


async def test_auth_openapi_and_bad_requests_change_nothing(
    service: Service, make_fleet: Callable[..., LocalFleet], images: SampleImages, tmp_path: Path
) -> None:
    fl = make_fleet(1)
    assert (await service.call("GET", "/v1/rollouts", token=None))[0] == 401
    assert (await service.call("GET", "/v1/rollouts", token="wrong"))[0] == 401
    assert (await service.call("POST", "/v1/rollouts", {}, token=None))[0] == 401
    status, doc = await service.call("GET", "/v1/openapi.json", token=None)
    assert status == 200 and doc["openapi"].startswith("3.")
    assert "/v1/rollouts/{id}/retry" in doc["paths"]
    assert (await service.call("GET", "/healthz", token=None))[0] == 200

    policy = policy_file(tmp_path)
    bad_bodies = [
        ({"policy": policy, "image": images.v2.path}, "inventory"),
        (body(fl, policy, images.v2.path, color="red"), "color"),
        (body(fl, policy, images.v2.path, nodes=["nope"]), "nodes"),
        (body(fl, {"batches": {"size": "lots"}}, images.v2.path), "policy.batches.size"),  # type: ignore[arg-type]
        (body(fl, policy, str(tmp_path / "missing.img")), "image"),
    ]
    for bad, where in bad_bodies:
        status, answer = await service.call("POST", "/v1/rollouts", bad)
        assert status == 400, answer
        assert answer["field"] == where, answer
    assert (await service.call("GET", "/v1/rollouts"))[1]["rollouts"] == []
    assert (await service.call("GET", "/v1/rollouts/nope"))[0] == 404
    assert (await service.call("POST", "/v1/rollouts/nope/pause"))[0] == 404

    status, created = await service.call("POST", "/v1/rollouts", body(fl, policy, images.v2.path))
    assert status == 201
    rid = created["id"]
    await service.wait_phase(rid, TERMINAL)
    before = await service.events(rid)
    for cmd in ("resume", "pause", "retry"):
        status, answer = await service.call("POST", f"/v1/rollouts/{rid}/{cmd}")
        assert status == 409, (cmd, answer)
        assert answer["error"] == "illegal"
    status, answer = await service.call("POST", f"/v1/rollouts/{rid}/pause", token=None)
    assert status == 401
    assert await service.events(rid) == before


async def test_overlap_refused_disjoint_runs_at_once_then_rollback(
    service: Service, make_fleet: Callable[..., LocalFleet], images: SampleImages, tmp_path: Path
) -> None:
    fl = make_fleet(4)
    ids = [n.id for n in fl.nodes]
    policy = policy_file(tmp_path, batches={"canary": 1, "size": 1, "max_unavailable": 1})
    status, a = await service.call(
        "POST", "/v1/rollouts", body(fl, policy, images.v2.path, nodes=ids[:2])
    )
    assert status == 201
    status, clash = await service.call(
        "POST", "/v1/rollouts", body(fl, policy, images.v2.path, nodes=ids[1:3])
    )
    assert status == 409, clash
    assert clash["holder"] == a["id"] and ids[1] in clash["message"]
    status, b = await service.call(
        "POST", "/v1/rollouts", body(fl, policy, images.v2.path, nodes=ids[2:])
    )
    assert status == 201
    # Both run at the same time: each has a node in flight before either finishes.
    first_a = await service.wait_phase(a["id"], {"running"})
    first_b = await service.wait_phase(b["id"], {"running"})
    assert first_a and first_b
    done_a = await service.wait_phase(a["id"], TERMINAL)
    done_b = await service.wait_phase(b["id"], TERMINAL)
    assert done_a["phase"] == done_b["phase"] == "succeeded"
    events_a = await service.events(a["id"])
    events_b = await service.events(b["id"])
    end_a = max(e["ts"] for e in events_a)
    start_b = min(e["ts"] for e in events_b if e["kind"] == "node")
    assert start_b < end_a  # b's nodes started before a finished
    rows = status_json(fl.inventory)
    assert all(r["digest"] == images.v2.digest for r in rows.values())

    # Rollback after success: every node of rollout a returns to v1.
    status, answer = await service.call("POST", f"/v1/rollouts/{a['id']}/rollback", {"by": "ops"})
    assert status == 202, answer
    final = await service.wait_phase(a["id"], {"rolled_back", "failed"})
    assert final["phase"] == "rolled_back", final
    rows = status_json(fl.inventory)
    assert [rows[i]["digest"] for i in ids] == [images.v1.digest] * 2 + [images.v2.digest] * 2
    assert all(r["committed"] for r in rows.values())
    history = await service.events(a["id"])
    assert any(e["kind"] == "command" and e["data"] == {"command": "rollback", "by": "ops"}
               for e in history)  # fmt: skip


async def test_pause_holds_then_resume_finishes(
    service: Service, make_fleet: Callable[..., LocalFleet], images: SampleImages, tmp_path: Path
) -> None:
    fl = make_fleet(3)
    policy = policy_file(tmp_path, batches={"canary": 1, "size": 1, "max_unavailable": 1})
    _, created = await service.call("POST", "/v1/rollouts", body(fl, policy, images.v2.path))
    rid = created["id"]
    await service.wait_phase(rid, {"running"})
    status, _ = await service.call("POST", f"/v1/rollouts/{rid}/pause")
    assert status == 202
    # In-flight nodes come to rest; nothing new starts. A node the pause caught between
    # its stage and its activation waits there, staged (a checkpoint).
    deadline = time.monotonic() + 60
    while True:
        _, state = await service.call("GET", f"/v1/rollouts/{rid}")
        phases = [n["phase"] for n in state["nodes"]]
        if all(p in ("pending", "staged", "committed") for p in phases):
            break
        assert time.monotonic() < deadline, phases
        await asyncio.sleep(0.1)  # polling the API
    assert state["phase"] == "paused"
    assert "pending" in phases
    status, _ = await service.call("POST", f"/v1/rollouts/{rid}/resume")
    assert status == 202
    final = await service.wait_phase(rid, TERMINAL)
    assert final["phase"] == "succeeded"
    events = await service.events(rid)
    pause_seq = next(e["seq"] for e in events if e["data"].get("command") == "pause")
    resume_seq = next(e["seq"] for e in events if e["data"].get("command") == "resume")
    pending_at_pause = {n for n in (x.id for x in fl.nodes)} - {
        e["data"]["id"] for e in events if e["kind"] == "node" and e["seq"] < pause_seq
    }
    started_while_paused = {
        e["data"]["id"]
        for e in events
        if e["kind"] == "node" and pause_seq < e["seq"] < resume_seq
        and e["data"]["id"] in pending_at_pause
    }  # fmt: skip
    assert pending_at_pause and not started_while_paused


async def test_abort_then_retry_and_sse_stream(
    service: Service, make_fleet: Callable[..., LocalFleet], images: SampleImages, tmp_path: Path
) -> None:
    fl = make_fleet(3)
    policy = policy_file(tmp_path, batches={"canary": 1, "size": 1, "max_unavailable": 1})
    _, created = await service.call("POST", "/v1/rollouts", body(fl, policy, images.v2.path))
    rid = created["id"]
    await service.wait_phase(rid, {"running"})
    assert (await service.call("POST", f"/v1/rollouts/{rid}/abort"))[0] == 202
    aborted = await service.wait_phase(rid, TERMINAL)
    assert aborted["phase"] == "aborted"
    phases = {n["id"]: n["phase"] for n in aborted["nodes"]}
    assert set(phases.values()) <= {"committed", "pending", "staged"}
    assert phases[fl.nodes[-1].id] == "pending"
    status, answer = await service.call("POST", f"/v1/rollouts/{rid}/retry")
    assert status == 202, answer

    seen: list[str] = []
    headers = {"Authorization": f"Bearer {service.token}", "Accept": "text/event-stream"}
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{service.url}/v1/rollouts/{rid}/events", headers=headers) as r,
    ):
        assert r.headers["Content-Type"].startswith("text/event-stream")
        async for raw in r.content:
            line = raw.decode().strip()
            if line.startswith("event: "):
                seen.append(line[7:])
            if line == "event: end":
                break
    assert seen[0] == "created" and seen[-1] == "end"
    final = await service.wait_phase(rid, TERMINAL)
    assert final["phase"] == "succeeded"
    assert all(r["digest"] == images.v2.digest for r in status_json(fl.inventory).values())


async def test_retry_after_canary_halt(
    service: Service,
    make_fleet: Callable[..., LocalFleet],
    images: SampleImages,
    tmp_path: Path,
    tcp_listeners: Callable[[str, int], socket.socket],
) -> None:
    fl = make_fleet(3)
    # The canary's tcp check fails until the test opens the port: a failed canary.
    policy = policy_file(
        tmp_path,
        failure={"max_failed": 0, "action": "halt"},
        health=dict(FAST_POLICY["health"], checks=[{"type": "tcp", "port": 9199}]),
    )
    _, created = await service.call("POST", "/v1/rollouts", body(fl, policy, images.v2.path))
    rid = created["id"]
    halted = await service.wait_phase(rid, TERMINAL)
    assert halted["phase"] == "halted", halted
    canary = next(n for n in halted["nodes"] if n["batch"] == 1)
    assert canary["phase"] == "rolled_back" and canary["failed"]
    for node in fl.nodes:
        tcp_listeners(node.host, 9199)
    status, answer = await service.call("POST", f"/v1/rollouts/{rid}/retry", {"by": "ci"})
    assert status == 202, answer
    final = await service.wait_phase(rid, TERMINAL)
    assert final["phase"] == "succeeded", final
    rows = status_json(fl.inventory)
    assert all(r["digest"] == images.v2.digest and r["committed"] for r in rows.values())


async def test_service_restart_resumes_unfinished_rollout(
    service: Service, make_fleet: Callable[..., LocalFleet], images: SampleImages, tmp_path: Path
) -> None:
    fl = make_fleet(3)
    before = status_json(fl.inventory)
    policy = policy_file(tmp_path, batches={"canary": 1, "size": 1, "max_unavailable": 1})
    _, created = await service.call("POST", "/v1/rollouts", body(fl, policy, images.v2.path))
    rid = created["id"]
    deadline = time.monotonic() + 60
    while not any(e["kind"] == "node" and e["data"]["phase"] == "booting"
                  for e in await service.events(rid)):  # fmt: skip
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)  # polling the journal
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

    async def waiting_on_approval() -> None:
        deadline = time.monotonic() + 60
        while True:
            _, body = await service.call("GET", f"/v1/rollouts/{rid}")
            waits = [g for g in body["gates"] if g.get("event") == "waiting"]
            if body["phase"] == "waiting" and waits and waits[-1]["gate"] == "ship-it":
                return
            assert time.monotonic() < deadline, body
            await asyncio.sleep(0.1)  # polling the API

    asyncio.run(waiting_on_approval())
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
        assert -2 < left <= 31 and 0 < clash["expires_in"] <= 30  # the lock ttl, 30 s
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
