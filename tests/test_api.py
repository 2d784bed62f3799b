"""The controller's HTTP API in-process: the app of `rollout serve` on aiohttp's test
server, its Controller over simulated nodes (rollout.drivers.sim), no process and no agent.

What needs a process stays in tests/test_server.py (a restart resuming a rollout, the real
CLI client, another controller's leases on real agents); TLS and signals have their own
modules. Here: the contract of every endpoint, fast: 401 without or with a wrong token,
400 naming the field, 404 for unknown rollouts and gates, 202 or 409 for each command in
each phase, and rollouts run to their end (create, pause/resume, abort/retry, overlap,
rollback, a halted canary retried) with the events listing and its stream.

The simulated agents are held where a test needs a moment to stand still: a node's
activation request waits (`Fleet.hold`) until the test releases it, so "pause while the
canary is in flight" or "both rollouts have a node in flight at once" is a fact the test
arranges, not a race it hopes to win.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from rollout.controller import Controller
from rollout.drivers.sim import SimDriver, SimFleet
from rollout.entries import PhaseEntry
from rollout.journal import SQLiteStore
from rollout.metrics import MetricsRecorder
from rollout.model import ActivationMode, Node, NodePhase, NodeStatus, RolloutPhase
from rollout.policy import parse_policy
from rollout.pull import PullAccess
from rollout.record import NodeRecord
from rollout.server import make_app, service_observers
from tests.conftest import SampleImages
from tests.helpers import LEGAL_IDLE, TERMINAL, RolloutCalls, wait_for_async

TOKEN = "api-secret-token"
# Real time, short: a simulated boot of 50 ms, a node healthy after 50 ms of checks.
SIM_POLICY: dict[str, Any] = {
    "activation": "reboot",
    "batches": {"canary": 1, "size": 1, "max_unavailable": 1},
    "health": {
        "checks": [{"type": "agent"}],
        "interval": "20ms",
        "min_healthy_time": "50ms",
        "deadline": "20s",
        "boot_timeout": "20s",
        "failure_threshold": 1,
    },
    "failure": {"max_failed": 0, "action": "rollback"},
}


class Agents(SimDriver):
    """The simulated fleet as the controller reaches it, plus what the tests steer: a
    workload that fails on the new image for the nodes in `fleet.sick`, and activations
    of the nodes in `fleet.hold` that wait for `fleet.release`."""

    def __init__(self, fleet: Fleet) -> None:
        super().__init__(fleet.sim)
        self.steer = fleet

    async def status(self, node: Node) -> NodeStatus:
        st = await super().status(node)
        if node.id in self.steer.sick and st.booted_digest == self.steer.target_digest:
            return dataclasses.replace(st, workload="failed")
        return st

    async def activate(self, node: Node, mode: ActivationMode) -> None:
        if node.id in self.steer.hold:
            self.steer.arrived[node.id].set()
            await self.steer.release.wait()
        await super().activate(node, mode)


@dataclasses.dataclass
class Fleet:
    """Simulated nodes n1..nN booted on v1, an inventory file naming them, and the API."""

    tmp: Path
    images: SampleImages
    size: int = 3
    sick: set[str] = dataclasses.field(default_factory=set)
    hold: set[str] = dataclasses.field(default_factory=set)
    release: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        token = self.tmp / "node-token"
        token.write_text("node-token\n")
        self.nodes = tuple(
            Node(f"n{i}", f"10.0.0.{i}:7000", {"rack": f"r{i % 2}"}, str(token))
            for i in range(1, self.size + 1)
        )
        self.inventory = self.tmp / "inventory.yaml"
        listed = [{"id": n.id, "address": n.address, "labels": n.labels} for n in self.nodes]
        self.inventory.write_text(yaml.safe_dump({"token_file": str(token), "nodes": listed}))
        self.sim = SimFleet(self.nodes, self.images.v1, boot_seconds=0.05)
        self.target_digest = self.images.v2.digest
        self.arrived = {n.id: asyncio.Event() for n in self.nodes}
        self.drivers: list[Agents] = []

    def driver(self, holder: str, pull: PullAccess, on_retry: object) -> Agents:
        agents = Agents(self)
        self.drivers.append(agents)
        return agents

    def on(self, node_id: str) -> tuple[str | None, bool]:
        """The image digest a node runs, and whether it is committed."""
        sim = self.sim[node_id]
        return sim.slots[sim.booted], sim.committed

    async def held(self, *node_ids: str) -> None:
        """Wait until each of these nodes' activation request has arrived (and waits)."""
        for node_id in node_ids:
            await asyncio.wait_for(self.arrived[node_id].wait(), 30)


@dataclasses.dataclass
class Api(RolloutCalls):
    poll_interval = 0.02  # in-process: a read costs next to nothing
    phase_timeout = 60.0
    client: TestClient[web.Request, web.Application]
    controller: Controller
    store: SQLiteStore
    fleet: Fleet
    tmp: Path

    async def call(
        self, method: str, path: str, body: Any = None, token: str | None = TOKEN, **kw: Any
    ) -> tuple[int, dict[str, Any]]:
        headers = dict(kw.pop("headers", {}))
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        async with self.client.request(method, path, json=body, headers=headers, **kw) as r:
            return r.status, await r.json(content_type=None)

    def policy(self, **over: Any) -> str:
        path = self.tmp / f"policy-{len(list(self.tmp.glob('policy-*')))}.yaml"
        path.write_text(yaml.safe_dump(SIM_POLICY | over))
        return str(path)

    def body(self, policy: str | None = None, **extra: Any) -> dict[str, Any]:
        """A `POST /v1/rollouts` body: every node, SIM_POLICY, image v2."""
        return {"inventory": str(self.fleet.inventory), "policy": policy or self.policy(),
                "image": self.fleet.images.v2.path, **extra}  # fmt: skip

    async def create(self, **extra: Any) -> str:
        status, answer = await self.call("POST", "/v1/rollouts", self.body(**extra))
        assert status == 201, answer
        return str(answer["id"])


@pytest.fixture
async def api(
    request: pytest.FixtureRequest, tmp_path: Path, images: SampleImages
) -> AsyncIterator[Api]:
    """The service's app, as `rollout serve` wires it, on a test server over simulated
    nodes: 3, or as many as an indirect parameter says."""
    fleet = Fleet(tmp_path, images, size=getattr(request, "param", 3))
    store = SQLiteStore(tmp_path / "state.db")
    recorder = MetricsRecorder()
    controller = Controller(
        store, observer_for=service_observers(recorder), driver_for=fleet.driver
    )
    app = make_app(controller, TOKEN, recorder, service=True)
    async with TestClient(TestServer(app)) as client:
        yield Api(client, controller, store, fleet, tmp_path)
        fleet.release.set()  # nothing stays held while the app stops its rollouts
    for driver in fleet.drivers:
        await driver.close()  # boots still under way are cancelled
    store.close()


# -- who may call -----------------------------------------------------------------------------
async def test_no_token_or_a_wrong_one_is_401_but_health_and_openapi_are_open(api: Api) -> None:
    for method, path in [("GET", "/v1/rollouts"), ("POST", "/v1/rollouts"),
                         ("GET", "/v1/rollouts/nope"), ("POST", "/v1/rollouts/nope/pause"),
                         ("GET", "/v1/rollouts/nope/events"), ("GET", "/metrics")]:  # fmt: skip
        for token in (None, "wrong", ""):
            status, answer = await api.call(method, path, {} if method == "POST" else None,
                                            token=token)  # fmt: skip
            assert status == 401, (method, path, token, answer)
            assert answer["error"] == "unauthorized"
    async with api.client.get("/v1/rollouts") as r:
        assert r.status == 401 and r.headers["WWW-Authenticate"] == "Bearer"
    status, doc = await api.call("GET", "/v1/openapi.json", token=None)
    assert status == 200 and doc["openapi"].startswith("3.")
    assert "/v1/rollouts/{id}/retry" in doc["paths"]
    status, health = await api.call("GET", "/healthz", token=None)
    assert status == 200 and health["ok"] is True
    assert (await api.call("GET", "/v1/rollouts"))[0] == 200
    assert api.store.rollout_ids() == []


# -- 400: the field that is wrong, and nothing changed ------------------------------------
def _bad_bodies(api: Api) -> list[tuple[Any, str]]:
    policy = api.policy()
    image = api.fleet.images.v2.path
    return [
        ({"policy": policy, "image": image}, "inventory"),
        (api.body(policy, color="red"), "color"),
        (api.body(policy, nodes=["nope"]), "nodes"),
        (api.body(policy, labels={"rack": "r9"}), "nodes"),  # the selection matches no node
        (api.body(policy, inventory={"nodes": [{"id": "a"}]}), "inventory.nodes[0].address"),
        (api.body({"batches": {"size": "lots"}}), "policy.batches.size"),  # type: ignore[arg-type]
        (api.body(str(api.tmp / "missing.yaml")), "policy"),
        ({**api.body(policy), "image": str(api.tmp / "missing.img")}, "image"),
        ({**api.body(policy), "image": ""}, "image"),
        ([], "body"),
    ]


async def test_each_bad_create_body_is_400_naming_its_field_and_changes_nothing(
    api: Api,
) -> None:
    for bad, where in _bad_bodies(api):
        status, answer = await api.call("POST", "/v1/rollouts", bad)
        assert status == 400, (bad, answer)
        assert answer["error"] == "bad_request" and answer["field"] == where, (where, answer)
    async with api.client.post(
        "/v1/rollouts", data=b"{not json", headers={"Authorization": f"Bearer {TOKEN}"}
    ) as r:
        answer = await r.json()
        assert (r.status, answer["field"]) == (400, "body"), answer
    assert (await api.call("GET", "/v1/rollouts"))[1]["rollouts"] == []
    assert api.store.rollout_ids() == []


async def test_bad_command_decision_signal_and_events_requests_are_400(api: Api) -> None:
    api.fleet.hold.add("n1")  # the rollout stands still at its canary
    gate = {"name": "smoke", "kind": "wait", "after": "canary", "timeout": "60s"}
    rid = await api.create(policy=api.policy(gates=[gate]))
    await api.fleet.held("n1")
    before = api.store.entries(rid)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for path, data, where in [
        (f"/v1/rollouts/{rid}/pause", b"[1]", "body"),
        (f"/v1/rollouts/{rid}/pause", b'{"by": "x", "why": 1}', "body"),
        (f"/v1/rollouts/{rid}/pause", b"{nope", "body"),
        (f"/v1/rollouts/{rid}/gates/smoke/approve", b'{"color": 1}', "body"),
        (f"/v1/rollouts/{rid}/gates/smoke/approve", b"{nope", "body"),
        (f"/v1/rollouts/{rid}/gates/smoke/signal", b"{nope", "body"),
    ]:
        async with api.client.post(path, data=data, headers=auth) as r:
            answer = await r.json()
            assert (r.status, answer.get("field")) == (400, where), (path, data, answer)
    status, answer = await api.call("GET", f"/v1/rollouts/{rid}/events?after=soon")
    assert (status, answer["field"]) == (400, "after")
    assert api.store.entries(rid) == before


# -- 404: unknown rollouts, gates, commands ---------------------------------------------------
async def test_unknown_rollouts_gates_and_commands_are_404_and_change_nothing(api: Api) -> None:
    for method, path in [
        ("GET", "/v1/rollouts/nope"), ("POST", "/v1/rollouts/nope/pause"),
        ("POST", "/v1/rollouts/nope/resume"), ("GET", "/v1/rollouts/nope/events"),
        ("POST", "/v1/rollouts/nope/gates/smoke/approve"),
        ("POST", "/v1/rollouts/nope/gates/smoke/signal"),
        ("PUT", "/v1/rollouts/nope/gates/smoke/signal/secret"),
    ]:  # fmt: skip
        status, answer = await api.call(method, path)
        assert (status, answer["error"]) == (404, "not_found"), (method, path, answer)
    api.fleet.hold.add("n1")
    gate = {"name": "smoke", "kind": "wait", "after": "canary", "timeout": "60s"}
    status, created = await api.call("POST", "/v1/rollouts", api.body(api.policy(gates=[gate])))
    assert status == 201, created
    rid = created["id"]
    await api.fleet.held("n1")
    before = api.store.entries(rid)
    presigned = created["signal_urls"]["smoke"]
    assert presigned.startswith(str(api.client.make_url("/"))[:-1])
    secret = presigned.rsplit("/", 1)[1]
    for method, path in [
        ("POST", f"/v1/rollouts/{rid}/gates/nope/approve"),
        ("POST", f"/v1/rollouts/{rid}/gates/nope/signal"),
        ("PUT", f"/v1/rollouts/{rid}/gates/smoke/signal/{'0' * len(secret)}"),  # wrong secret
        ("PUT", f"/v1/rollouts/{rid}/gates/nope/signal/{secret}"),
        ("POST", f"/v1/rollouts/{rid}/reboot-everything"),
    ]:
        status, answer = await api.call(method, path, token=None if "/signal/" in path else TOKEN)
        assert (status, answer["error"]) == (404, "not_found"), (method, path, answer)
    assert api.store.entries(rid) == before


# -- 202 or 409: each command in each phase ---------------------------------------------------
@pytest.mark.parametrize("phase", tuple(RolloutPhase), ids=str)
@pytest.mark.parametrize("command", tuple(LEGAL_IDLE))
async def test_each_command_in_each_phase_is_202_or_409_as_the_table_says(
    api: Api, command: str, phase: RolloutPhase
) -> None:
    """A rollout journaled into `phase` (its canary committed, no engine running): the
    command is 202 where tests.helpers.LEGAL_IDLE says so, else a 409 `illegal` that
    leaves the journal as it was."""
    pol = parse_policy(SIM_POLICY, "api")
    state = api.controller.create(api.fleet.nodes, pol, api.fleet.images.v2, "api")
    rid = state.rollout_id
    canary = NodeRecord(api.fleet.nodes[0], 1, NodePhase.COMMITTED,
                        previous_digest=api.fleet.images.v1.digest)  # fmt: skip
    api.store.append(rid, canary.snapshot())
    if phase is not RolloutPhase.PENDING:
        api.store.append(rid, PhaseEntry(phase=phase, message="set up"))
    assert (await api.rollout(rid))["phase"] == str(phase)
    before = api.store.entries(rid)
    status, answer = await api.call("POST", f"/v1/rollouts/{rid}/{command}", {"by": "table"})
    if phase in LEGAL_IDLE[command]:
        assert status == 202, answer
        assert answer["id"] == rid and answer["command"] == command and answer["message"]
        assert api.controller.state(rid).commands[-1].by == "table"
    else:
        assert (status, answer["error"]) == (409, "illegal"), answer
        assert command in answer["message"] or str(phase) in answer["message"], answer
        assert api.store.entries(rid) == before
    tasks = list(api.controller.tasks.values())  # what a legal command started
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# -- rollouts run to their end ----------------------------------------------------------------
async def test_create_runs_to_succeeded_and_the_events_listing_replays_it(api: Api) -> None:
    status, created = await api.call("POST", "/v1/rollouts", api.body())
    assert status == 201, created
    rid = created["id"]
    assert created["phase"] == "pending" and not created.get("signal_urls")
    final = await api.wait_phase(rid, TERMINAL)
    assert final["phase"] == "succeeded", final
    assert [n["phase"] for n in final["nodes"]] == ["committed"] * 3
    assert all(api.fleet.on(n.id) == (api.fleet.images.v2.digest, True) for n in api.fleet.nodes)
    listed = (await api.call("GET", "/v1/rollouts"))[1]["rollouts"]
    assert [r["id"] for r in listed] == [rid]

    events = await api.events(rid)
    kinds = [e["kind"] for e in events]
    assert kinds[0] == "created" and events[0]["data"]["by"] == "api"
    assert [e["seq"] for e in events] == sorted(e["seq"] for e in events)
    assert {e["data"]["id"] for e in events if e["kind"] == "node"} == {"n1", "n2", "n3"}
    assert events[-1]["kind"] == "phase" and events[-1]["data"]["phase"] == "succeeded"
    middle = events[len(events) // 2]["seq"]
    assert await api.events(rid, after=middle) == [e for e in events if e["seq"] > middle]

    # A finished rollout: these commands are a 409 and change nothing; no token, a 401.
    for cmd in ("resume", "pause", "retry"):
        status, answer = await api.call("POST", f"/v1/rollouts/{rid}/{cmd}")
        assert status == 409, (cmd, answer)
        assert answer["error"] == "illegal"
    status, answer = await api.call("POST", f"/v1/rollouts/{rid}/pause", token=None)
    assert status == 401
    assert await api.events(rid) == events


async def test_pause_holds_then_resume_finishes(api: Api) -> None:
    api.fleet.hold.add("n1")
    rid = await api.create()
    await api.fleet.held("n1")  # the canary's activation is on its way
    status, _ = await api.call("POST", f"/v1/rollouts/{rid}/pause")
    assert status == 202
    api.fleet.hold.clear()
    api.fleet.release.set()
    # In-flight nodes come to rest; nothing new starts. A node the pause caught between
    # its stage and its activation waits there, staged (a checkpoint).
    state = await wait_for_async(
        lambda: api.rollout(rid), 30, 0.02, what="every node at rest",
        done=lambda s: all(n["phase"] in ("pending", "staged", "committed") for n in s["nodes"])
        and s["nodes"][0]["phase"] == "committed",  # the canary in flight came to rest
    )  # fmt: skip
    phases = [n["phase"] for n in state["nodes"]]
    assert state["phase"] == "paused"
    assert "pending" in phases
    status, _ = await api.call("POST", f"/v1/rollouts/{rid}/resume")
    assert status == 202
    final = await api.wait_phase(rid, TERMINAL)
    assert final["phase"] == "succeeded"
    events = await api.events(rid)
    pause_seq = next(e["seq"] for e in events if e["data"].get("command") == "pause")
    resume_seq = next(e["seq"] for e in events if e["data"].get("command") == "resume")
    pending_at_pause = {n.id for n in api.fleet.nodes} - {
        e["data"]["id"] for e in events if e["kind"] == "node" and e["seq"] < pause_seq
    }
    started_while_paused = {
        e["data"]["id"]
        for e in events
        if e["kind"] == "node" and pause_seq < e["seq"] < resume_seq
        and e["data"]["id"] in pending_at_pause
    }  # fmt: skip
    assert pending_at_pause and not started_while_paused


async def test_abort_then_retry_and_the_event_stream(api: Api) -> None:
    api.fleet.hold.add("n2")  # batch 2 is in flight when the abort arrives
    rid = await api.create()
    await api.fleet.held("n2")
    assert (await api.call("POST", f"/v1/rollouts/{rid}/abort"))[0] == 202
    api.fleet.hold.clear()
    api.fleet.release.set()
    aborted = await api.wait_phase(rid, TERMINAL)
    assert aborted["phase"] == "aborted"
    phases = {n["id"]: n["phase"] for n in aborted["nodes"]}
    assert set(phases.values()) <= {"committed", "pending", "staged"}
    assert phases["n1"] == "committed" and phases["n3"] == "pending"
    status, answer = await api.call("POST", f"/v1/rollouts/{rid}/retry")
    assert status == 202, answer

    seen: list[str] = []
    ids: list[int] = []
    headers = {"Authorization": f"Bearer {TOKEN}", "Accept": "text/event-stream"}
    async with api.client.get(f"/v1/rollouts/{rid}/events", headers=headers) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        async for raw in r.content:
            line = raw.decode().strip()
            if line.startswith("id: "):
                ids.append(int(line[4:]))
            if line.startswith("event: "):
                seen.append(line[7:])
            if line == "event: end":
                break
    assert seen[0] == "created" and seen[-1] == "end"
    assert ids == sorted(ids) and len(ids) == len(seen) - 1  # every event but `end` has its seq
    final = await api.wait_phase(rid, TERMINAL)
    assert final["phase"] == "succeeded"
    assert all(api.fleet.on(n.id) == (api.fleet.images.v2.digest, True) for n in api.fleet.nodes)
    # Replayed from the middle (Last-Event-ID), the stream starts right after it.
    headers["Last-Event-ID"] = str(ids[2])
    async with api.client.get(f"/v1/rollouts/{rid}/events", headers=headers) as r:
        first = next(line for line in (await r.text()).splitlines() if line.startswith("id: "))
    assert int(first[4:]) == ids[3]


@pytest.mark.parametrize("api", [4], indirect=True)
async def test_overlap_refused_disjoint_runs_at_once_then_rollback(
    api: Api, images: SampleImages
) -> None:
    ids = [n.id for n in api.fleet.nodes]
    api.fleet.hold.update({ids[0], ids[2]})  # the first node of each rollout waits
    status, a = await api.call("POST", "/v1/rollouts", api.body(nodes=ids[:2]))
    assert status == 201, a
    status, clash = await api.call("POST", "/v1/rollouts", api.body(nodes=ids[1:3]))
    assert status == 409, clash
    assert clash["error"] == "conflict"
    assert clash["holder"] == a["id"] and ids[1] in clash["message"]
    assert len(api.store.rollout_ids()) == 1  # nothing journaled for the refused one
    status, b = await api.call("POST", "/v1/rollouts", api.body(nodes=ids[2:]))
    assert status == 201, b
    # Both run at the same time: each has a node in flight before either finishes.
    await api.fleet.held(ids[0], ids[2])
    assert {(await api.rollout(r["id"]))["phase"] for r in (a, b)} == {"running"}
    api.fleet.hold.clear()
    api.fleet.release.set()
    done_a = await api.wait_phase(a["id"], TERMINAL)
    done_b = await api.wait_phase(b["id"], TERMINAL)
    assert done_a["phase"] == done_b["phase"] == "succeeded"
    v1, v2 = images.v1.digest, images.v2.digest
    assert [api.fleet.on(i) for i in ids] == [(v2, True)] * 4

    # Rollback after success: every node of rollout a returns to v1.
    status, answer = await api.call("POST", f"/v1/rollouts/{a['id']}/rollback", {"by": "ops"})
    assert status == 202, answer
    final = await api.wait_phase(a["id"], {"rolled_back", "failed"})
    assert final["phase"] == "rolled_back", final
    assert [api.fleet.on(i) for i in ids] == [(v1, True)] * 2 + [(v2, True)] * 2
    history = await api.events(a["id"])
    assert any(e["kind"] == "command" and e["data"] == {"command": "rollback", "by": "ops"}
               for e in history)  # fmt: skip


async def test_retry_after_a_halted_canary(api: Api) -> None:
    api.fleet.sick.update(n.id for n in api.fleet.nodes)  # v2's workload fails everywhere
    rid = await api.create(policy=api.policy(failure={"max_failed": 0, "action": "halt"}))
    halted = await api.wait_phase(rid, TERMINAL)
    assert halted["phase"] == "halted", halted
    canary = next(n for n in halted["nodes"] if n["batch"] == 1)
    assert canary["phase"] == "rolled_back" and canary["failed"]
    assert api.fleet.on(canary["id"]) == (api.fleet.images.v1.digest, True)
    assert all(n["phase"] == "pending" for n in halted["nodes"] if n["batch"] > 1)
    api.fleet.sick.clear()
    status, answer = await api.call("POST", f"/v1/rollouts/{rid}/retry", {"by": "ci"})
    assert status == 202, answer
    final = await api.wait_phase(rid, TERMINAL)
    assert final["phase"] == "succeeded", final
    assert all(api.fleet.on(n.id) == (api.fleet.images.v2.digest, True) for n in api.fleet.nodes)
