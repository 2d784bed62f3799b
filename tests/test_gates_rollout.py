"""Gates in whole rollouts: real agents, a real Prometheus, real HTTP signals and webhooks."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web

from rollout.drivers.agent import AgentDriver
from rollout.engine import Engine
from rollout.entries import Body, to_data
from rollout.events import Event
from rollout.gates.signals import parse_signal
from rollout.model import NodePhase, RolloutPhase
from rollout.plan import plan_batches
from rollout.policy import Policy, parse_policy
from rollout.record import RolloutResult
from tests.conftest import LocalFleet, SampleImages, next_host
from tests.gates.conftest import Prometheus, prometheus  # noqa: F401 - the fixture
from tests.helpers import (
    FAST_POLICY,
    ROOT,
    fold_id,
    gated,
    journal_gates,
    run_cmd,
    status_json,
    wait_for_async,
)

Journal = list[tuple[str, dict[str, Any]]]


class ListJournal:
    """The engine's journal (rollout.record.Journal) kept as a list of (kind, data)."""

    def __init__(self, entries: Journal) -> None:
        self.entries = entries

    def write(self, body: Body, *, lazy: bool = False) -> None:
        self.entries.append((body.kind.value, to_data(body)))

    async def flushed(self) -> None:
        return None


class Run:
    """An engine running in the background of the test's loop, journaling to a list."""

    def __init__(self, fl: LocalFleet, policy: Policy, image: Any) -> None:
        self.journal: Journal = []
        self.events: list[Event] = []
        self.driver = AgentDriver()
        self.engine = Engine(
            self.driver, policy, image, self.events.append, journal=ListJournal(self.journal)
        )
        self.task = asyncio.create_task(self.engine.run(plan_batches(fl.nodes, policy)))

    async def until(self, what: str, check: Callable[[], bool], timeout: float = 60) -> None:
        def met() -> bool:
            if check():
                return True
            assert not self.task.done(), f"finished before {what}"
            return False

        await wait_for_async(met, timeout, 0.02, what=what)

    def phases(self) -> list[str]:
        return [d["phase"] for k, d in self.journal if k == "phase"]

    def gate_events(self, event: str) -> list[dict[str, Any]]:
        return [d for k, d in self.journal if k == "gate" and d.get("event") == event]

    async def result(self, timeout: float = 90) -> RolloutResult:
        try:
            return await asyncio.wait_for(self.task, timeout)
        finally:
            await self.driver.close()


# -- wait conditions over HTTP, --stop-after and --junit, with `rollout run` ----------------
async def test_wait_condition_signals_in_both_styles_over_run_listen(
    make_fleet: Callable[..., LocalFleet], images: SampleImages, tmp_path: Path
) -> None:
    fl = make_fleet(3)
    policy = tmp_path / "p.yaml"
    gate = {"name": "tests", "kind": "wait", "after": "canary", "count": 2, "timeout": "60s"}
    policy.write_text(yaml.safe_dump(gated(gate)))
    (tmp_path / "token").write_text("run-token\n")
    host = next_host()
    junit = tmp_path / "report.xml"
    proc = subprocess.Popen(
        run_cmd(fl, policy, images.v2.path, tmp_path, "--listen", f"{host}:7401",
                "--token-file", str(tmp_path / "token"), "--junit", str(junit)),
        cwd=ROOT, stdout=subprocess.PIPE, stderr=open(tmp_path / "run.log", "w"), text=True,
    )  # fmt: skip

    def gate_waits() -> bool:
        assert proc.poll() is None, "rollout run exited"
        return any(g.get("event") == "waiting" for g in journal_gates(tmp_path / "state.db"))

    await wait_for_async(gate_waits, 60, what="the gate to wait")
    rid = fold_id(tmp_path / "state.db")
    url = f"http://{host}:7401/v1/rollouts/{rid}/gates/tests/signal"
    auth = {"Authorization": "Bearer run-token"}
    async with aiohttp.ClientSession() as http:
        async with http.post(url, json={"status": "SUCCESS", "id": "a"}) as r:
            assert r.status == 401  # no token
        async with http.post(url, json={"status": "MAYBE"}, headers=auth) as r:
            assert r.status == 400 and (await r.json())["field"] == "status"
        async with http.post(url.replace("/tests/", "/nope/"), json={}, headers=auth) as r:
            assert r.status == 404
        native = {"status": "SUCCESS", "reason": "smoke ok", "data": "42 passed", "id": "a"}
        for _ in range(2):  # the same id twice counts once
            async with http.post(url, json=native, headers=auth) as r:
                assert r.status == 200, await r.text()
        assert proc.poll() is None  # one distinct id of two: still waiting
        cfn = {"Status": "SUCCESS", "Reason": "e2e ok", "UniqueId": "b", "Data": "9 passed"}
        async with http.post(url, json=cfn, headers=auth) as r:
            assert r.status == 200
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0, out
    gates = journal_gates(tmp_path / "state.db")
    received = [g["signal"] for g in gates if g["event"] == "received_signal"]
    assert [s["data"] for s in received] == ["42 passed", "42 passed", "9 passed"]
    finished = [g for g in gates if g["event"] == "finished"]
    assert [(g["gate"], g["result"]) for g in finished] == [("tests", "passed")]
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite is not None
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    assert set(cases) == {n.id for n in fl.nodes} | {"tests"}
    assert suite.get("failures") == "0"


def test_stop_after_canary_keeps_it_then_a_later_run_continues(
    make_fleet: Callable[..., LocalFleet], images: SampleImages, tmp_path: Path
) -> None:
    fl = make_fleet(3)
    policy = tmp_path / "p.yaml"
    bake = {"name": "soak", "kind": "bake", "after": "canary", "duration": "1s"}
    policy.write_text(yaml.safe_dump(gated(bake)))
    junit = tmp_path / "canary.xml"
    cmd = run_cmd(fl, policy, images.v2.path, tmp_path)
    first = subprocess.run([*cmd, "--stop-after", "canary", "--junit", str(junit)],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert first.returncode == 0, first.stdout + first.stderr
    assert json.loads(first.stdout)["phase"] == "paused"
    rows = status_json(fl.inventory)
    canary = fl.nodes[0].id
    assert rows[canary]["digest"] == images.v2.digest and rows[canary]["committed"]
    assert all(rows[n.id]["digest"] == images.v1.digest for n in fl.nodes[1:])
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite is not None
    assert (suite.get("tests"), suite.get("failures"), suite.get("skipped")) == ("4", "0", "2")
    second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "resuming rollout" in second.stderr or "resuming rollout" in second.stdout
    rows = status_json(fl.inventory)
    assert all(r["digest"] == images.v2.digest and r["committed"] for r in rows.values())


def test_stop_after_a_failed_canary_exits_1(
    make_fleet: Callable[..., LocalFleet], images: SampleImages, tmp_path: Path
) -> None:
    fl = make_fleet(2)
    policy = tmp_path / "p.yaml"
    policy.write_text(yaml.safe_dump(gated()))
    junit = tmp_path / "canary.xml"
    proc = subprocess.run(
        [*run_cmd(fl, policy, images.bad.path, tmp_path), "--stop-after", "canary",
         "--junit", str(junit)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1
    failures = [
        c for c in ET.parse(junit).getroot().iter("testcase") if c.find("failure") is not None
    ]
    assert [c.get("name") for c in failures] == [fl.nodes[0].id]
    message = failures[0].find("failure")
    assert message is not None and "unhealthy" in (message.get("message") or "")


# -- in-process engine: wait failure/timeout, bake, approval, webhooks ------------------------
async def test_wait_failure_signal_and_timeout_trigger_the_failure_action(
    make_fleet: Callable[..., LocalFleet], images: SampleImages
) -> None:
    fl = make_fleet(2)
    gate = {"name": "tests", "kind": "wait", "after": "canary", "timeout": "60s"}
    run = Run(fl, parse_policy(gated(gate), "p"), images.v2)
    await run.until("the gate to wait", lambda: bool(run.gate_events("waiting")))
    run.engine.boxes.signals("tests").add(
        parse_signal({"status": "FAILURE", "reason": "smoke failed", "id": "ci"})
    )
    result = await run.result()
    assert result.phase is RolloutPhase.ROLLED_BACK
    assert "smoke failed" in result.message
    assert all(s["digest"] == images.v1.digest for s in status_json(fl.inventory).values())

    short = dict(gate, timeout="1s")
    run = Run(fl, parse_policy(gated(short, failure={"action": "halt"}), "p"), images.v2)
    result = await run.result()
    assert result.phase is RolloutPhase.HALTED
    assert "timeout" in result.message
    assert [g["result"] for g in run.gate_events("finished")] == ["timeout"]


async def test_bake_fails_when_an_updated_node_turns_unhealthy(
    make_fleet: Callable[..., LocalFleet],
    images: SampleImages,
    tcp_listeners: Callable[[str, int], socket.socket],
) -> None:
    fl = make_fleet(2)
    canary_port = tcp_listeners(fl.nodes[0].host, 9299)
    tcp_listeners(fl.nodes[1].host, 9299)
    bake = {"name": "soak", "kind": "bake", "after": "canary", "duration": "60s"}
    health = dict(FAST_POLICY["health"], checks=[{"type": "tcp", "port": 9299}])
    run = Run(fl, parse_policy(gated(bake, health=health), "p"), images.v2)
    await run.until("the bake to start", lambda: bool(run.gate_events("waiting")))
    canary_port.close()  # the canary turns unhealthy after it was committed
    result = await run.result()
    assert result.phase is RolloutPhase.ROLLED_BACK
    assert fl.nodes[0].id in result.message and "unhealthy during the bake" in result.message
    assert result.nodes[fl.nodes[1].id].phase is NodePhase.PENDING


async def test_approval_and_webhooks(
    make_fleet: Callable[..., LocalFleet], images: SampleImages
) -> None:
    fl = make_fleet(2)
    got: list[dict[str, Any]] = []
    failures = 0

    async def hook(request: web.Request) -> web.Response:
        nonlocal failures
        if failures < 1:  # the first delivery fails: retried with backoff
            failures += 1
            return web.Response(status=503)
        got.append(await request.json())
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    host = next_host()
    await web.TCPSite(runner, host, 7402).start()
    try:
        gate = {"name": "ship-it", "kind": "approval", "after": "canary"}
        notify = [{"url": f"http://{host}:7402/hook"}]
        policy = parse_policy(gated(gate, notify=notify), "p")
        from rollout.controller import Controller
        from rollout.inventory import load_inventory
        from rollout.journal import SQLiteStore as Store

        store = Store(":memory:")
        controller = Controller(store)
        state = controller.create(load_inventory(fl.inventory).nodes, policy, images.v2, "p")
        task = asyncio.create_task(controller.execute(state.rollout_id))

        def phase() -> RolloutPhase:
            assert not task.done(), task
            return controller.state(state.rollout_id).phase

        await wait_for_async(phase, 60, what="the rollout to wait",
                             done=lambda p: p is RolloutPhase.WAITING)  # fmt: skip
        controller.decide(state.rollout_id, "ship-it", True, "alice")
        result = await asyncio.wait_for(task, 60)
        assert result.phase is RolloutPhase.SUCCEEDED
        # The notifier is closed at the end: its deliveries are done.
        await wait_for_async(lambda: got, 30, what="5 notifications",
                             done=lambda g: len(g) >= 5)  # fmt: skip
        kinds = [g["event"] for g in got]
        assert kinds[0] == "started" and kinds[-1] == "succeeded"
        assert "gate_waiting" in kinds and kinds.count("batch_done") == 2
        finished = [g for g in controller.state(state.rollout_id).gates
                    if g.get("event") == "approval"]  # fmt: skip
        assert finished and finished[0].get("by") == "alice"
        store.close()
    finally:
        await runner.cleanup()


# -- Prometheus analysis and alert blocking in whole rollouts --------------------------------
def analysis(prom: Prometheus, metric: str, **fields: Any) -> dict[str, Any]:
    return {"name": "slo", "kind": "analysis", "after": "canary", "prometheus": prom.url,
            "query": metric, "interval": "200ms", "count": 3,
            "success": "result < 0.01", "failure": "result > 0.1", **fields}  # fmt: skip


async def test_analysis_pass_fail_and_inconclusive_pause(
    make_fleet: Callable[..., LocalFleet],
    images: SampleImages,
    prometheus: Prometheus,  # noqa: F811
) -> None:
    fl = make_fleet(2)
    prometheus.set_and_wait("ro_err_ok", 0.001)
    run = Run(fl, parse_policy(gated(analysis(prometheus, "ro_err_ok")), "p"), images.v2)
    assert (await run.result()).phase is RolloutPhase.SUCCEEDED

    fl = make_fleet(2)
    prometheus.set_and_wait("ro_err_bad", 0.5)
    run = Run(fl, parse_policy(gated(analysis(prometheus, "ro_err_bad")), "p"), images.v2)
    result = await run.result()
    assert result.phase is RolloutPhase.ROLLED_BACK and "slo" in result.message
    assert all(s["digest"] == images.v1.digest for s in status_json(fl.inventory).values())

    fl = make_fleet(2)
    prometheus.set_and_wait("ro_err_mid", 0.05)
    run = Run(fl, parse_policy(gated(analysis(prometheus, "ro_err_mid")), "p"), images.v2)
    await run.until("the rollout to pause", lambda: "paused" in run.phases())
    assert not run.task.done()
    assert status_json(fl.inventory)[fl.nodes[1].id]["digest"] == images.v1.digest
    run.engine.boxes.approvals("slo").approve("sre-on-call")
    assert (await run.result()).phase is RolloutPhase.SUCCEEDED


async def test_firing_alert_blocks_the_next_batch_until_it_clears(
    make_fleet: Callable[..., LocalFleet],
    images: SampleImages,
    prometheus: Prometheus,  # noqa: F811
) -> None:
    fl = make_fleet(2)
    prometheus.set_and_wait("gt_alert", 1)
    await wait_for_async(prometheus.firing, 15, what="GateTestCritical to fire",
                         done=lambda firing: "GateTestCritical" in firing)  # fmt: skip
    gate = {"name": "quiet", "kind": "alerts", "before": "after-canary",
            "prometheus": prometheus.url, "match": {"severity": "critical"},
            "interval": "200ms"}  # fmt: skip
    run = Run(fl, parse_policy(gated(gate), "p"), images.v2)
    await run.until("the alert to block batch 2", lambda: any(
        "GateTestCritical" in g["reason"] for g in run.gate_events("waiting")))  # fmt: skip
    rows = status_json(fl.inventory)
    assert rows[fl.nodes[0].id]["digest"] == images.v2.digest  # the canary ran
    assert rows[fl.nodes[1].id]["digest"] == images.v1.digest  # batch 2 is held
    prometheus.exporter.set("gt_alert", 0)
    result = await run.result()
    assert result.phase is RolloutPhase.SUCCEEDED
    assert [g["result"] for g in run.gate_events("finished")] == ["passed"]
