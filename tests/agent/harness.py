"""Run real agent processes for tests: start, poll, stop, and clean up their workloads.

Each agent is `python -m rollout.agent` on its own loopback address, with a state dir under
the test's tmp_path and its log (one JSON line per event) in a file there. Waiting is
always polling a condition with a deadline (`eventually`), never a bare sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

from tests.helpers import wait_for_async

TOKEN = "t0ken-for-tests"
AGENT_PORT = 7000
WORKLOAD_PORT = 18080
FAST_FLAGS = (
    "--firmware-delay", "0.2",
    "--kernel-delay", "0.1",
    "--workload-grace", "0.5",
)  # fmt: skip

T = TypeVar("T")


async def eventually(
    probe: Callable[[], Awaitable[T | None]],
    *,
    what: str,
    timeout: float = 15.0,
    interval: float = 0.05,
) -> T:
    """Call `probe` until it returns something other than None (or False); fail at deadline.
    A probe that times out or cannot connect yet counts as not yet (its error is the last
    value seen). tests.helpers.wait_for_async with the agent's transient errors."""
    result = await wait_for_async(
        probe, timeout, interval, what=what,
        ignore=(TimeoutError, aiohttp.ClientError, OSError),
        done=lambda r: r is not None and r is not False,
    )  # fmt: skip
    assert result is not None
    return result


def processes_under(path: Path) -> list[int]:
    """PIDs of processes whose cwd is inside `path` (an agent's workloads)."""
    found = []
    prefix = str(path.resolve())
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            continue
        if cwd == prefix or cwd.startswith(prefix + os.sep):
            found.append(int(entry))
    return found


@dataclass
class AgentProc:
    host: str
    state_dir: Path
    log_path: Path
    session: aiohttp.ClientSession
    argv: list[str]
    proc: asyncio.subprocess.Process | None = None
    token: str = TOKEN
    port: int = AGENT_PORT
    workload_port: int = WORKLOAD_PORT
    _log: Any = field(default=None, repr=False)

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"

    def headers(self, token: str | None = "default", **extra: str) -> dict[str, str]:
        h = dict(extra)
        if token is not None:
            h["Authorization"] = f"Bearer {self.token if token == 'default' else token}"
        return h

    async def request(
        self,
        method: str,
        path: str,
        *,
        token: str | None = "default",
        json_body: Any = None,
        data: Any = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, Any], Mapping[str, str]]:
        kwargs: dict[str, Any] = {"headers": self.headers(token, **(headers or {}))}
        if json_body is not None:
            kwargs["json"] = json_body
        if data is not None:
            kwargs["data"] = data
        timeout = aiohttp.ClientTimeout(total=30)
        async with self.session.request(method, self.url(path), timeout=timeout, **kwargs) as r:
            body = await r.json(content_type=None)
            return r.status, body, r.headers

    async def status(self) -> dict[str, Any]:
        code, body, _ = await self.request("GET", "/v1/status")
        assert code == 200, body
        return body

    async def wait_status(
        self, pred: Callable[[dict[str, Any]], bool], what: str, timeout: float = 15.0
    ) -> dict[str, Any]:
        async def probe() -> dict[str, Any] | None:
            s = await self.status()
            return s if pred(s) else None

        return await eventually(probe, what=what, timeout=timeout)

    async def stage(
        self,
        image_path: str,
        digest: str,
        *,
        lease: str | None = None,
        signature: str | None = None,
    ) -> tuple[int, dict[str, Any]]:
        headers = {"X-Image-Digest": digest}
        if lease is not None:
            headers["X-Rollout-Lease"] = lease
        if signature is not None:
            headers["X-Image-Signature"] = signature
        fh = await asyncio.to_thread(open, image_path, "rb")
        try:  # streamed from the file, as the controller does
            code, body, _ = await self.request("PUT", "/v1/image", data=fh, headers=headers)
        finally:
            fh.close()
        return code, body

    async def workload_get(self, path: str = "/healthz") -> tuple[int, dict[str, Any]]:
        url = f"http://{self.host}:{self.workload_port}{path}"
        async with self.session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as r:
            return r.status, await r.json(content_type=None)

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if name is None or ev.get("event") == name:
                out.append(ev)
        return out

    async def start(self) -> None:
        self._log = await asyncio.to_thread(open, self.log_path, "ab")
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log
        )

        async def up() -> bool:
            if self.proc is not None and self.proc.returncode is not None:
                raise AssertionError(
                    f"agent exited with {self.proc.returncode}:\n{self.log_path.read_text()}"
                )
            async with self.session.get(
                self.url("/healthz"), timeout=aiohttp.ClientTimeout(total=2)
            ) as r:
                return r.status == 200

        await eventually(up, what=f"agent on {self.host} to answer /healthz")

    async def wait_exit(self, timeout: float = 10.0) -> int | None:
        async def exited() -> int | None:
            return self.proc.returncode if self.proc is not None else 0

        with contextlib.suppress(AssertionError):
            return await eventually(lambda: exited(), what="agent exit", timeout=timeout)
        return None

    async def stop(self, sig: signal.Signals = signal.SIGTERM) -> int | None:
        """Stop the agent (SIGTERM, then SIGKILL) and kill anything left in its state dir."""
        code: int | None = None
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(sig)
            code = await self.wait_exit()
            if code is None:
                self.proc.kill()
                await asyncio.wait_for(self.proc.wait(), 5)
        elif self.proc is not None:
            code = self.proc.returncode
        for pid in processes_under(self.state_dir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self._log is not None:
            self._log.close()
            self._log = None
        return code


def agent_argv(
    host: str, state_dir: Path, token_file: Path, image: str | None, *extra: str
) -> list[str]:
    argv = [
        sys.executable, "-m", "rollout.agent",
        "--listen", f"{host}:{AGENT_PORT}",
        "--state-dir", str(state_dir),
        "--token-file", str(token_file),
        "--workload-port", str(WORKLOAD_PORT),
        *FAST_FLAGS,
    ]  # fmt: skip
    if image is not None:
        argv += ["--image", image]
    return argv + list(extra)
