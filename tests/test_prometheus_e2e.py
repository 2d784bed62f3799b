"""A real Prometheus server scrapes a real rollout over a real local fleet.

Prometheus (the Debian `prometheus` package; .ci/run installs it) scrapes the recorder
every 250 ms with charts/prometheus/rules.yaml loaded. Every wait polls a condition with a
deadline. Outside CI the tests skip when `prometheus` is not on PATH; under CI=true they
fail instead.

- In process: the engine runs with `recorder.serve()` on a free port, and the endpoint
  stays up until Prometheus has scraped the final state, so exact final values are
  asserted (and the recording rules and every dashboard query are evaluated on them).
- The CLI: `rollout run --metrics-port --metrics-linger` as a user runs it: the endpoint
  stays up until Prometheus scraped it once more after the rollout, so the final values
  are asserted exactly (see docs/observability.md, "one-shot runs").
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from rollout.drivers.agent import AgentDriver
from rollout.engine import Engine
from rollout.metrics import MetricsRecorder
from rollout.model import Image
from rollout.plan import plan_batches
from rollout.policy import parse_policy
from rollout.record import RolloutResult
from tests.conftest import LocalFleet, SampleImages
from tests.helpers import FAST_POLICY, ROOT, free_port, wait_for, write_policy

SCRAPE = "250ms"
RULES = ROOT / "charts" / "prometheus" / "rules.yaml"
DASHBOARD = ROOT / "charts" / "grafana" / "rollout.json"


@dataclass
class Prometheus:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query; the result vector (fails the test on a query error)."""
        q = urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(f"{self.url}/api/v1/query?{q}", timeout=10) as resp:
            body = json.load(resp)
        assert body["status"] == "success", (expr, body)
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def value(self, expr: str) -> float | None:
        """The single value of an instant query, None when it returns no series."""
        result = self.query(expr)
        assert len(result) <= 1, (expr, result)
        return float(result[0]["value"][1]) if result else None

    def target_up(self) -> bool:
        return self.value('up{job="rollout"}') == 1


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[int], Prometheus]]:
    """Start a real Prometheus scraping 127.0.0.1:<port> as job="rollout"; kill it after."""
    binary = shutil.which("prometheus")
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail("prometheus is not on PATH; .ci/run installs the prometheus package")
        pytest.skip("prometheus not on PATH (apt-get install prometheus)")
    started: list[subprocess.Popen[bytes]] = []

    def start(metrics_port: int) -> Prometheus:
        config = tmp_path / "prom.yml"
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": SCRAPE, "scrape_timeout": "200ms",
                       "evaluation_interval": "500ms"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": "rollout", "static_configs": [
                {"targets": [f"127.0.0.1:{metrics_port}"]}]}],
        }))  # fmt: skip
        port = free_port()
        log = tmp_path / "prometheus.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        started.append(proc)
        prom = Prometheus(f"http://127.0.0.1:{port}", proc, log)

        def ready() -> bool:
            assert proc.poll() is None, f"prometheus exited: {log.read_text()}"
            with urllib.request.urlopen(f"{prom.url}/-/ready", timeout=2) as resp:
                return bool(resp.status == 200)

        wait_for(ready, what="prometheus to be ready", ignore=(OSError,))
        return prom

    yield start
    for proc in started:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def run_engine(fl: LocalFleet, image: Image, recorder: MetricsRecorder) -> RolloutResult:
    policy = parse_policy(FAST_POLICY, "fast")
    driver = AgentDriver()
    engine = Engine(driver, policy, image, recorder, policy_name="fast")
    try:
        return await engine.run(plan_batches(fl.nodes, policy))
    finally:
        await driver.close()


def dashboard_queries() -> list[str]:
    """Every panel query, with the dashboard's variables replaced by concrete values."""
    data = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in data["panels"] for t in p["targets"]]
    subs = {"$__rate_interval": "1m", "$rollout": ".*", "$step": ".*"}
    return [re.sub(r"\$__rate_interval|\$rollout|\$step", lambda m: subs[m[0]], e)
            for e in exprs]  # fmt: skip


def test_prometheus_scrapes_a_whole_rollout(
    make_fleet: Callable[..., LocalFleet],
    images: SampleImages,
    prometheus: Callable[[int], Prometheus],
) -> None:
    fl = make_fleet(3)
    recorder = MetricsRecorder()
    recorder.serve(0, "127.0.0.1")
    try:
        assert recorder.port
        prom = prometheus(recorder.port)
        wait_for(prom.target_up, what="the first scrape", ignore=(OSError,))
        result = asyncio.run(run_engine(fl, images.v2, recorder))
        assert result.succeeded, result.message
        rid = f'rollout="{result.rollout_id}"'

        # The final state stays served until Prometheus has scraped it (as a one-shot run
        # with `wait_for_scrape` before exiting would), then it is in Prometheus.
        assert recorder.wait_for_scrape(10), "prometheus did not scrape within 10 s"

        def final_state_scraped() -> bool:
            return prom.value(f'rollout_phase{{{rid},phase="succeeded"}}') == 1

        wait_for(final_state_scraped, what="the final state to be scraped", ignore=(OSError,))

        def last(expr: str) -> float | None:
            return prom.value(f"last_over_time({expr}[5m])")

        assert last(f'rollout_phase{{{rid},phase="running"}}') == 0
        assert last(f'rollout_nodes{{{rid},state="committed"}}') == 3
        assert last(f'rollout_nodes{{{rid},state="pending"}}') == 0
        assert last(f"rollout_image_bytes_transferred_total{{{rid}}}") == 3 * images.v2.size
        assert last(f'rollout_node_updates_total{{{rid},result="committed"}}') == 3
        assert last(f'rollout_node_updates_total{{{rid},result="failed"}}') == 0
        assert last(f'rollout_node_step_duration_seconds_count{{{rid},step="boot",result="ok"}}'
                    ) == 3  # fmt: skip
        batches = len(plan_batches(fl.nodes, parse_policy(FAST_POLICY, "fast")))
        assert last(f"rollout_batches{{{rid}}}") == batches
        assert last(f"rollout_batch_current{{{rid}}}") == batches
        # Seen while running: a node in flight, fewer than 3 committed.
        assert prom.value(f'min_over_time(rollout_nodes{{{rid},state="committed"}}[5m])') == 0
        info = prom.query(f"rollout_info{{{rid}}}")
        assert info[0]["metric"]["policy"] == "fast"
        assert info[0]["metric"]["image_version"] == images.v2.version

        # The recording rules run on the real series, and alerts stay quiet.
        wait_for(
            lambda: prom.value(f"rollout:progress:ratio{{{rid}}}") == 1,
            what="rollout:progress:ratio == 1",
            ignore=(OSError,),
        )
        alerts = prom.query('ALERTS{alertname=~"RolloutHalted|RolloutNodeRolledBack"}')
        assert alerts == []
        # Every dashboard query is valid PromQL for this server (query() fails otherwise),
        # and the progress panel shows the whole fleet done.
        for expr in dashboard_queries():
            prom.query(expr)
    finally:
        recorder.close()


def test_cli_metrics_port_is_scraped_during_the_run(
    make_fleet: Callable[..., LocalFleet],
    images: SampleImages,
    prometheus: Callable[[int], Prometheus],
    tmp_path: Path,
) -> None:
    fl = make_fleet(3)
    port = free_port()
    prom = prometheus(port)
    policy = write_policy(tmp_path)
    run = subprocess.Popen(
        [sys.executable, "-m", "rollout", "run", "--inventory", str(fl.inventory),
         "--policy", str(policy), "--image", images.v2.path, "--metrics-port", str(port),
         "--metrics-host", "127.0.0.1", "--metrics-linger", "15", "--log-format", "json",
         "--output", "json", "--state", str(tmp_path / "state.db")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    try:
        out, err = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 0, out + err
    rid = json.loads(out)["rollout"]
    sel = f'rollout="{rid}"'
    # Scraped while the run was in progress (the process has exited since).
    assert prom.value('max_over_time(up{job="rollout"}[5m])') == 1
    info = prom.query(f"last_over_time(rollout_info{{{sel}}}[5m])")
    assert [i["metric"]["policy"] for i in info] == ["policy"]
    assert info[0]["metric"]["image_version"] == images.v2.version
    assert prom.value(f"max_over_time(rollout_batches{{{sel}}}[5m])") == 3
    assert prom.value(f'max_over_time(rollout_phase{{{sel},phase="running"}}[5m])') == 1
    # --metrics-linger: the final state was scraped before the process exited.
    committed = prom.value(f'last_over_time(rollout_nodes{{{sel},state="committed"}}[5m])')
    assert committed == len(fl.nodes)
    sent = prom.value(f"last_over_time(rollout_image_bytes_transferred_total{{{sel}}}[5m])")
    assert sent == len(fl.nodes) * images.v2.size
    assert prom.value(f'last_over_time(rollout_phase{{{sel},phase="succeeded"}}[5m])') == 1
    build = prom.query("last_over_time(rollout_build_info[5m])")
    assert build and build[0]["metric"]["version"]
