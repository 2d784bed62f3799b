"""Fixtures for gate tests: a real Prometheus scraping a tiny exporter the test controls.

The exporter is a threaded http.server on loopback serving gauges from a dict the test
sets (`Exporter.set`). Prometheus scrapes it every 200 ms and evaluates a rule file every
200 ms (alerts with ``for: 0s``). One server per test module keeps the suite short; tests
use distinct metric names so they never see each other's values. Every wait polls with a
deadline. Outside CI the tests skip when ``prometheus`` is not on PATH; under CI=true they
fail instead.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import free_port, wait_for

PROBE_ERRORS = (OSError, ValueError)  # Prometheus not up yet, or a partial answer
RULES = {
    "groups": [
        {
            "name": "gate-tests",
            "interval": "200ms",
            "rules": [
                {
                    "alert": "GateTestCritical",
                    "expr": "gt_alert > 0",
                    "for": "0s",
                    "labels": {"severity": "critical"},
                },
                {  # always firing, but not matched by {severity: critical}
                    "alert": "GateTestWarning",
                    "expr": "vector(1)",
                    "for": "0s",
                    "labels": {"severity": "warning"},
                },
            ],
        }
    ]
}


@dataclass
class Exporter:
    """Gauges served at /metrics: ``{(name, labels-text): value}``."""

    port: int = 0
    values: dict[tuple[str, str], float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def set(self, name: str, value: float, **labels: str) -> None:
        text = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        with self.lock:
            self.values[(name, text)] = value

    def render(self) -> bytes:
        with self.lock:
            items = sorted(self.values.items())
        lines = []
        for (name, labels), value in items:
            shown = "NaN" if value != value else repr(value)
            lines.append(f"{name}{{{labels}}} {shown}")
        return ("\n".join(lines) + "\n").encode()


@dataclass
class Prometheus:
    url: str
    exporter: Exporter

    def get(self, path: str, **params: str) -> Any:
        q = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{q}", timeout=5) as resp:
            return json.load(resp)

    def values(self, expr: str) -> list[float]:
        body = self.get("/api/v1/query", query=expr)
        return [float(s["value"][1]) for s in body["data"]["result"]]

    def firing(self) -> set[str]:
        body = self.get("/api/v1/alerts")
        return {a["labels"]["alertname"] for a in body["data"]["alerts"] if a["state"] == "firing"}

    def set_and_wait(self, name: str, value: float, **labels: str) -> None:
        """Set a gauge and wait until Prometheus has scraped that value."""
        self.exporter.set(name, value, **labels)
        sel = ",".join(f'{k}="{v}"' for k, v in labels.items())
        expr = f"{name}{{{sel}}}" if sel else name

        def seen() -> bool:
            got = self.values(expr)
            return bool(got) and (
                got[0] == value or (value != value and got[0] != got[0])  # NaN
            )

        wait_for(seen, 15, what=f"prometheus to scrape {expr} = {value}", ignore=PROBE_ERRORS)


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    binary = shutil.which("prometheus")
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail("prometheus is not on PATH; .ci/run installs the prometheus package")
        pytest.skip("prometheus not on PATH (apt-get install prometheus)")
    tmp = tmp_path_factory.mktemp("prom")
    exporter = Exporter()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = exporter.render()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    exporter.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    rules = tmp / "rules.yaml"
    rules.write_text(yaml.safe_dump(RULES))
    config = tmp / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "200ms", "scrape_timeout": "150ms",
                   "evaluation_interval": "200ms"},
        "rule_files": [str(rules)],
        "scrape_configs": [{"job_name": "gates", "static_configs": [
            {"targets": [f"127.0.0.1:{exporter.port}"]}]}],
    }))  # fmt: skip
    port = free_port()
    log = tmp / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    prom = Prometheus(f"http://127.0.0.1:{port}", exporter)
    try:

        def ready() -> bool:
            assert proc.poll() is None, f"prometheus exited: {log.read_text()}"
            with urllib.request.urlopen(f"{prom.url}/-/ready", timeout=2) as resp:
                return bool(resp.status == 200)

        wait_for(ready, 15, what="prometheus to be ready", ignore=PROBE_ERRORS)
        wait_for(
            lambda: prom.values('up{job="gates"}') == [1.0], 15,
            what="the exporter to be scraped", ignore=PROBE_ERRORS,
        )  # fmt: skip
        yield prom
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        server.shutdown()
        server.server_close()


def write(tmp: Path, name: str, text: str) -> Path:
    path = tmp / name
    path.write_text(text)
    return path
