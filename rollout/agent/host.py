"""`python -m rollout.agent.host --config many.json`: many real agents in one process.

A standalone agent (`rollout agent`) is one process per simulated machine. That is the
right model, but 2,000 Python processes do not fit in a laptop's memory, so a host runs
many agents on one event loop. Each hosted agent is a full, independent `Agent` (node.py)
with its own loopback address, state dir, token and aiohttp site (its own listening
socket): the controller cannot tell it from a standalone one. Nothing is shared but the
process, the event loop and the log file.

Reuse, not a copy: each agent's life is `rollout.agent.cli.run_agent`, the same boot,
serve and shut-down code `rollout agent` runs; only the re-exec differs. Where a
standalone agent re-executes its process on reboot or kexec (a fresh process: every
object and socket of the old boot gone), a hosted agent's life ends the same way (server,
background tasks and workload shut down, `ExitAction.REEXEC`) and the host starts a new
life from a new `Agent` on the same config: state is read back from the state dir, the
simulated boot delay is slept, the site is bound again. A soft reboot stays in-process in
both. The emulated backend only (a disk-backed node is a real machine, one agent each).

The config file (JSON; relative paths are relative to its directory)::

    {"defaults": {"token_file": "token", "image": "v1.img", "kernel_delay": 0.1},
     "agents": [{"node_id": "node-0001", "listen": "127.66.0.2:7000",
                 "state_dir": "nodes/node-0001", "token_file": "tokens/node-0001"}, ...]}

Every agent field may be given in `defaults` or per agent (the agent's wins): the fields
are those of `rollout agent`'s flags (listen, state_dir, token_file, image, node_id,
workload_port, firmware_delay, kernel_delay, commit_deadline, workload_grace, tls_cert,
tls_key, trusted_keys). Boot delays of 0 make boots instant.

Readiness: with `--ready-file F`, F is written (atomically, JSON with the pid and the
count) once every agent listens, so a caller waits for one file instead of polling
thousands of /healthz. Logs: one JSON line per event on stderr, each carrying the
hosted agent's `node_id`.

Failures: a bad config, or an agent that cannot start its first life (bad state dir,
address in use), stops every agent and exits 2, as `rollout agent` does. An agent whose
later life fails is logged (`agent_failed`) and stays down, as a crashed standalone agent
process would; the others go on. SIGTERM/SIGINT stop every agent (each stops its own
workload) and exit 0.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rollout.agent.cli import configure_logging, parse_listen, run_agent
from rollout.agent.node import Agent, AgentConfig, ExitAction
from rollout.errors import InputError
from rollout.tls import optional_server_context
from rollout.tokens import read_token

log = structlog.get_logger("rollout.agent.host")


class HostedAgentSpec(BaseModel):
    """One hosted agent, after `defaults` were merged in: `rollout agent`'s flags."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    listen: str = Field(description="HOST:PORT of this agent's API (its own address).")
    state_dir: str = Field(description="This agent's state dir.")
    token_file: str = Field(description="File holding this agent's bearer token.")
    node_id: str | None = Field(None, description="Node id reported in status [HOST].")
    image: str | None = Field(None, description="Image installed into slot A on first start.")
    workload_port: int = Field(8080, ge=1, le=65535)
    firmware_delay: float = Field(1.0, ge=0)
    kernel_delay: float = Field(0.5, ge=0)
    commit_deadline: float = Field(300.0, gt=0)
    workload_grace: float = Field(1.0, ge=0)
    tls_cert: str | None = None
    tls_key: str | None = None
    trusted_keys: tuple[str, ...] = ()


class HostFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    defaults: dict[str, Any] = Field(default_factory=dict)
    agents: list[dict[str, Any]] = Field(min_length=1)


@dataclass(frozen=True)
class HostedAgent:
    """What one life of a hosted agent needs: its config and its TLS files (read again at
    every boot, as a re-executed standalone agent does)."""

    config: AgentConfig
    tls_cert: Path | None = None
    tls_key: Path | None = None


_PATHS = ("state_dir", "token_file", "image", "tls_cert", "tls_key")


def load_host_config(path: Path) -> list[HostedAgent]:
    """Read a host config file; InputError names the file, the agent and the field."""
    try:
        raw = json.loads(path.read_text())
    except OSError as exc:
        raise InputError(f"--config {path}: cannot read: {exc.strerror}") from exc
    except ValueError as exc:
        raise InputError(f"--config {path}: not valid JSON: {exc}") from exc
    try:
        host = HostFile.model_validate(raw)
    except ValidationError as exc:
        raise InputError(f"{path}: {_where(exc)}") from exc
    base = path.parent
    agents: list[HostedAgent] = []
    seen: dict[tuple[str, int], int] = {}
    dirs: dict[Path, int] = {}
    for i, entry in enumerate(host.agents):
        try:
            spec = HostedAgentSpec.model_validate(host.defaults | entry)
        except ValidationError as exc:
            raise InputError(f"{path}: agents.{i}: {_where(exc)}") from exc
        where = f"{path}: agents.{i}"
        try:
            host_port = parse_listen(spec.listen)
        except InputError as exc:
            raise InputError(f"{where}: {exc}") from exc
        if host_port in seen:
            raise InputError(f"{where}: listen {spec.listen} is also agents.{seen[host_port]}'s")
        seen[host_port] = i
        files = {k: _resolve(base, getattr(spec, k)) for k in _PATHS}
        state_dir = files["state_dir"]
        if state_dir is None or files["token_file"] is None:
            raise AssertionError("required fields")  # pydantic checked them
        if state_dir in dirs:
            raise InputError(f"{where}: state_dir {state_dir} is also agents.{dirs[state_dir]}'s")
        dirs[state_dir] = i
        config = AgentConfig(
            host=host_port[0],
            port=host_port[1],
            state_dir=state_dir,
            token=read_token(files["token_file"], f"{where}: token_file"),
            node_id=spec.node_id or host_port[0],
            image=files["image"],
            workload_port=spec.workload_port,
            firmware_delay=spec.firmware_delay,
            kernel_delay=spec.kernel_delay,
            commit_deadline=spec.commit_deadline,
            workload_grace=spec.workload_grace,
            trusted_keys=tuple(str(_resolve(base, k)) for k in spec.trusted_keys),
        )
        agents.append(HostedAgent(config, files["tls_cert"], files["tls_key"]))
    return agents


def _where(exc: ValidationError) -> str:
    err = exc.errors()[0]
    return f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}"


def _resolve(base: Path, value: str | None) -> Path | None:
    if value is None:
        return None
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p).absolute()


class Host:
    """Runs hosted agents until `stop()`; each agent goes through lives (boots) alone."""

    def __init__(self, agents: list[HostedAgent]) -> None:
        self.agents = agents
        self.current: dict[str, Agent] = {}  # node id -> the agent of its running life
        self.lives: dict[str, int] = {}  # node id -> lives started (1 + reboots/kexecs)
        self.listening: set[str] = set()  # node ids that have listened at least once
        self.ready = asyncio.Event()  # every agent listened once
        self.stopping = asyncio.Event()
        self.failed: dict[str, BaseException] = {}  # node id -> what ended it

    def stop(self) -> None:
        """Stop every agent: each current life ends as after SIGTERM, none starts again."""
        if not self.stopping.is_set():
            log.info("host_stopping", agents=len(self.current))
        self.stopping.set()
        for agent in list(self.current.values()):
            agent.stopping.set()

    async def run(self) -> None:
        """Run every agent until `stop()`; raise the first start-up failure (after
        stopping the others) if an agent cannot start its first life."""
        tasks = [
            asyncio.create_task(self._lifetime(a), name=f"agent {a.config.node_id}")
            for a in self.agents
        ]
        try:
            await asyncio.gather(*tasks)
        finally:
            self.stop()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _lifetime(self, hosted: HostedAgent) -> None:
        config = hosted.config
        node_id = config.node_id
        structlog.contextvars.bind_contextvars(node_id=node_id)  # this task's lines only
        while not self.stopping.is_set():
            agent = Agent(config)
            self.current[node_id] = agent
            self.lives[node_id] = self.lives.get(node_id, 0) + 1
            try:
                ssl_context = optional_server_context(hosted.tls_cert, hosted.tls_key)
                action = await run_agent(agent, ssl_context, lambda: self._listened(node_id))
            except (InputError, OSError) as exc:
                if node_id not in self.listening:
                    raise InputError(f"agent {node_id}: {exc}") from exc
                self.failed[node_id] = exc
                log.error("agent_failed", error=str(exc))
                return
            except Exception as exc:
                self.failed[node_id] = exc
                log.exception("agent_failed")
                if node_id not in self.listening:
                    raise
                return
            finally:
                self.current.pop(node_id, None)
            if action is not ExitAction.REEXEC:
                return
            log.info("reexec", life=self.lives[node_id] + 1)  # the process re-exec, hosted

    def _listened(self, node_id: str) -> None:
        self.listening.add(node_id)
        if len(self.listening) == len(self.agents):
            self.ready.set()


async def run_host(agents: list[HostedAgent], ready_file: Path | None = None) -> None:
    """Run `agents` until SIGTERM/SIGINT; write `ready_file` once every one listens."""
    host = Host(agents)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, host.stop)

    async def announce() -> None:
        await host.ready.wait()
        log.info("host_ready", agents=len(agents), pid=os.getpid())
        if ready_file is not None:
            tmp = ready_file.with_name(f".{ready_file.name}.tmp")
            tmp.write_text(json.dumps({"pid": os.getpid(), "agents": len(agents)}) + "\n")
            os.replace(tmp, ready_file)

    ready = asyncio.create_task(announce(), name="announce")
    try:
        await host.run()
    finally:
        ready.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def raise_nofile_limit() -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; return (soft, hard).

    Each hosted agent holds a listening socket, its clients' connections and, while it
    stages, files; 250 agents under a controller that opens many connections at once can
    pass a 1,024 default."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft, hard


@click.command("agent-host")
@click.option(
    "--config",
    "config_file",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Host config file (JSON): defaults and one entry per agent.",
)
@click.option(
    "--ready-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Written (JSON: pid, agents) once every agent listens.",
)
def agent_host(config_file: Path, ready_file: Path | None) -> None:
    """Run many node agents in one process, each on its own address with its own state."""
    configure_logging()
    try:
        agents = load_host_config(config_file)
        soft, _ = raise_nofile_limit()
        log.info("host_start", agents=len(agents), nofile=soft, pid=os.getpid())
        asyncio.run(run_host(agents, ready_file.absolute() if ready_file else None))
    except InputError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    agent_host(prog_name="python -m rollout.agent.host")
