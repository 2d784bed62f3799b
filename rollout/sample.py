"""Sample images for the demo and the tests: a tiny HTTP workload, good or bad.

The workload is a stdlib-only Python server started by the agent after each boot. It
listens on ROLLOUT_WORKLOAD_HOST:ROLLOUT_WORKLOAD_PORT and answers `GET /healthz` with 200
and its version, or with 500 when built with `bad=True` (a release that boots fine but
fails its health check, the case a canary exists to catch). With SAMPLE_MODE=crash it
exits at once (the VM sample OS's bad release: its systemd unit fails).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from rollout.image import MANIFEST, build_image
from rollout.model import Image

WORKLOAD_PY = '''\
"""Sample workload: answers /healthz with the image version."""
import json
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOST = os.environ.get("ROLLOUT_WORKLOAD_HOST", "127.0.0.1")
PORT = int(os.environ.get("ROLLOUT_WORKLOAD_PORT", "8080"))
VERSION = os.environ.get("ROLLOUT_IMAGE_VERSION", "unknown")
BAD = os.environ.get("SAMPLE_MODE") == "bad"
if os.environ.get("SAMPLE_MODE") == "crash":  # a release that does not even start
    raise SystemExit("sample workload: this build is broken on purpose")


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        code = 500 if (BAD and self.path == "/healthz") else 200
        body = json.dumps({"version": VERSION, "healthy": code == 200}).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


ThreadingHTTPServer.allow_reuse_address = True
ThreadingHTTPServer((HOST, PORT), Handler).serve_forever()
'''


def write_sample_tree(dest: str | os.PathLike[str], bad: bool = False) -> Path:
    """Write the source tree of a sample image into `dest`."""
    root = Path(dest)
    (root / "app").mkdir(parents=True, exist_ok=True)
    (root / "app" / "server.py").write_text(WORKLOAD_PY)
    (root / "etc").mkdir(exist_ok=True)
    (root / "etc" / "motd").write_text("built by rollout sample\n")
    manifest = {
        "format": 1,
        "name": "sample-web",
        "workload": {
            "command": ["python3", "app/server.py"],
            "env": {"SAMPLE_MODE": "bad" if bad else "good"},
        },
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return root


def build_sample_image(output: str | os.PathLike[str], version: str, bad: bool = False) -> Image:
    """Build a sample image file at `output` and return it."""
    with tempfile.TemporaryDirectory(prefix="rollout-sample-") as tmp:
        write_sample_tree(tmp, bad=bad)
        return build_image(tmp, output, version=version)
