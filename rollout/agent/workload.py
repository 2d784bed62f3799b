"""The workload supervisor: one child process (group) per boot, watched and restarted.

After every boot the agent starts the booted image's `workload.command` with its cwd in
the slot's root, in a new session so that `stop` can signal the whole process group
(SIGTERM, up to `stop_timeout` seconds, then SIGKILL). Output is appended to one log file.

States::

    stopped --start--> starting --survived `grace` s--> running
                          |                                |
                          +------------ exits -------------+--> failed

On exit the supervisor asks `should_restart()` (the agent answers "is the booted slot
committed?"). Yes: wait a small backoff and start again, counting `restarts`. No: call
`on_failed(exit_code, ran_seconds)` once and stop supervising; the agent then falls back.
A command that cannot be spawned at all counts as an exit with code 127.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import os
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger("rollout.agent.workload")

SPAWN_FAILED = 127
_BACKOFF_FIRST = 0.2
_BACKOFF_MAX = 5.0
_STABLE_AFTER = 30.0  # a run this long resets the backoff


class WorkloadState(enum.StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    STOPPED = "stopped"
    FAILED = "failed"


@dataclass(frozen=True)
class WorkloadSpec:
    command: tuple[str, ...]
    cwd: Path
    env: Mapping[str, str]


def backoff(consecutive_failures: int) -> float:
    """Seconds to wait before restart number `consecutive_failures` (1-based).

    >>> [backoff(n) for n in (1, 2, 3, 10)]
    [0.2, 0.4, 0.8, 5.0]
    """
    return float(min(_BACKOFF_MAX, _BACKOFF_FIRST * 2 ** max(0, consecutive_failures - 1)))


class Supervisor:
    def __init__(
        self,
        *,
        log_path: Path,
        port: int,
        pid_path: Path | None = None,
        grace: float,
        should_restart: Callable[[], bool],
        on_failed: Callable[[int, float], None],
        on_change: Callable[[], None] = lambda: None,
        stop_timeout: float = 5.0,
    ) -> None:
        self.log_path = log_path
        self.pid_path = pid_path
        self.port = port
        self.grace = grace
        self.stop_timeout = stop_timeout
        self._should_restart = should_restart
        self._on_failed = on_failed
        self._on_change = on_change
        self._state = WorkloadState.STOPPED
        self.pid: int | None = None
        self.exit_code: int | None = None
        self.restarts = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def state(self) -> WorkloadState:
        return self._state

    @state.setter
    def state(self, new: WorkloadState) -> None:
        changed, self._state = new != self._state, new
        if changed:
            self._on_change()  # the agent's status long polls wake

    def snapshot(self) -> dict[str, Any]:
        return {
            "state": str(self.state),
            "pid": self.pid,
            "port": self.port,
            "exit_code": self.exit_code,
            "restarts": self.restarts,
        }

    def start(self, spec: WorkloadSpec) -> None:
        """Start supervising `spec` (the previous workload must have been stopped)."""
        if self._task is not None and not self._task.done():
            raise RuntimeError("workload already supervised; stop it first")
        self.exit_code = None
        self.restarts = 0
        self.state = WorkloadState.STARTING
        self._task = asyncio.create_task(self._supervise(spec), name="workload")

    async def _spawn(self, spec: WorkloadSpec) -> asyncio.subprocess.Process:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        out = await asyncio.to_thread(os.open, self.log_path, flags, 0o644)
        try:
            return await asyncio.create_subprocess_exec(
                *spec.command,
                cwd=spec.cwd,
                env=dict(spec.env),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            os.close(out)

    async def _run_once(self, spec: WorkloadSpec) -> int:
        """Run the workload until it exits; return its exit code."""
        loop = asyncio.get_running_loop()
        self.state = WorkloadState.STARTING
        try:
            proc = await self._spawn(spec)
        except OSError as exc:
            log.error("workload_spawn_failed", command=list(spec.command), error=str(exc))
            return SPAWN_FAILED
        self._proc, self.pid = proc, proc.pid
        if self.pid_path is not None:
            await asyncio.to_thread(write_pidfile, self.pid_path, proc.pid)
        log.info("workload_started", pid=proc.pid, command=list(spec.command))
        waiter = loop.create_task(proc.wait())
        try:
            done, _ = await asyncio.wait({waiter}, timeout=self.grace)
            if not done:
                self.state = WorkloadState.RUNNING
                log.info("workload_running", pid=proc.pid)
            return await waiter
        finally:
            if not waiter.done():
                waiter.cancel()

    async def _supervise(self, spec: WorkloadSpec) -> None:
        loop = asyncio.get_running_loop()
        consecutive = 0
        while True:
            started = loop.time()
            code = await self._run_once(spec)
            ran = loop.time() - started
            self.exit_code, self.pid, self.state = code, None, WorkloadState.FAILED
            log.warning("workload_exited", exit_code=code, ran_s=round(ran, 3))
            if not self._should_restart():
                self._on_failed(code, ran)
                return
            consecutive = 1 if ran >= _STABLE_AFTER else consecutive + 1
            await asyncio.sleep(backoff(consecutive))
            self.restarts += 1
            log.info("workload_restart", restarts=self.restarts)

    async def stop(self) -> None:
        """Stop supervising and terminate the process group; safe to call repeatedly."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.returncode is None:
                _killpg(proc.pid, signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), self.stop_timeout)
                except TimeoutError:
                    log.warning("workload_kill", pid=proc.pid)
                    _killpg(proc.pid, signal.SIGKILL)
                    await proc.wait()
                self.exit_code = proc.returncode
                log.info("workload_stopped", pid=proc.pid, exit_code=proc.returncode)
            _killpg(proc.pid, signal.SIGKILL)  # whatever else is left in its group
        self.pid = None
        self.state = WorkloadState.STOPPED
        if self.pid_path is not None:
            self.pid_path.unlink(missing_ok=True)


def _start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot): tells a pid from its reuse."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def write_pidfile(path: Path, pid: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"pid": pid, "start": _start_time(pid)}) + "\n")
    os.replace(tmp, path)


def reap_leftover(path: Path, timeout: float = 5.0) -> int | None:
    """Stop the workload a previous agent process left running (it was SIGKILLed, so its
    child, in a session of its own, lived on and holds the port). Only the process the
    pidfile names, and only if it is still that process (same start time). Returns its
    pid when one was stopped. Blocking."""
    try:
        data = json.loads(path.read_text())
        pid, start = int(data["pid"]), data.get("start")
    except (OSError, ValueError, KeyError, TypeError):
        path.unlink(missing_ok=True)
        return None
    found = None
    if start is not None and _start_time(pid) == start:
        found = pid
        _killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _start_time(pid) == start and time.monotonic() < deadline:
            time.sleep(0.05)  # polling for the exit, with a deadline
        _killpg(pid, signal.SIGKILL)
        log.warning("workload_reaped", pid=pid)
    path.unlink(missing_ok=True)
    return found


def _killpg(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
