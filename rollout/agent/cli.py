"""`rollout agent`: run the node agent in the foreground.

The process is the simulated machine: a reboot or kexec is a real re-exec of this same
command line (`os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])`, same PID),
done here after the event loop has shut the server and the workload down, so no socket or
child process leaks into the new image.

With --tls-cert/--tls-key the API is HTTPS only; the re-exec keeps the flags, so a
rebooted agent serves the same certificate (read again, so a renewed file is picked up).

Exit codes: 0 after SIGTERM/SIGINT, 2 on bad input (flags, token file, TLS files, state
dir, image).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import ssl
import sys
from collections.abc import Callable
from pathlib import Path

import click
import structlog
from aiohttp import web

from rollout.agent.app import make_app
from rollout.agent.node import Agent, AgentConfig, ExitAction
from rollout.errors import InputError
from rollout.tls import optional_server_context
from rollout.tokens import read_token

log = structlog.get_logger("rollout.agent")


def configure_logging() -> None:
    """One JSON line per event on stderr."""
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,  # a host's agents bind their node_id
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(sort_keys=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


def parse_listen(value: str) -> tuple[str, int]:
    """'HOST:PORT' (or '[v6]:PORT') -> (host, port).

    >>> parse_listen("127.0.0.5:7000")
    ('127.0.0.5', 7000)
    """
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(f"--listen: expected HOST:PORT, got {value!r}")
    return host, int(port)


async def serve(config: AgentConfig, ssl_context: ssl.SSLContext | None = None) -> ExitAction:
    """Boot, listen until stopped (SIGTERM/SIGINT), shut down; return whether to exit or
    re-exec.

    With `ssl_context` the API is served over HTTPS only."""
    agent = Agent(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, agent.request_exit)
    try:
        return await run_agent(agent, ssl_context)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


async def run_agent(
    agent: Agent,
    ssl_context: ssl.SSLContext | None = None,
    on_listening: Callable[[], None] | None = None,
) -> ExitAction:
    """One life of `agent`: boot, serve its API on its own address until `agent.stopping`
    is set, shut the server, background tasks and workload down; return the exit action.

    No signal handling: `serve` adds it for a standalone agent; a host of many agents
    (rollout.agent.host) stops each one with `agent.request_exit()`. `on_listening` is
    called once the API accepts connections."""
    config = agent.config
    runner: web.AppRunner | None = None
    boot = asyncio.create_task(agent.start(), name="boot")
    stop = asyncio.create_task(agent.stopping.wait(), name="stop")
    try:
        await asyncio.wait({boot, stop}, return_when=asyncio.FIRST_COMPLETED)
        if not boot.done():  # asked to stop while booting
            boot.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await boot
            return ExitAction.EXIT
        boot.result()
        runner = web.AppRunner(make_app(agent), access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        await web.TCPSite(runner, config.host, config.port, ssl_context=ssl_context).start()
        log.info(
            "listening",
            host=config.host,
            port=config.port,
            node_id=config.node_id,
            tls=ssl_context is not None,
        )
        if on_listening is not None:
            on_listening()
        await stop
        return agent.exit_action
    finally:
        stop.cancel()
        boot.cancel()  # a no-op once it finished; else this life was cancelled mid-boot
        if runner is not None:
            await runner.cleanup()
        await agent.close()


def reexec() -> None:
    """Replace this process with a fresh run of the same command line (same PID)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


@click.command("agent")
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Agent config file (YAML) of a real node: the disk backend. Replaces the other "
    "options but --node-id.",
)
@click.option(
    "--listen",
    default=None,
    metavar="HOST:PORT",
    help="Address of the agent API; HOST is also where the workload listens.",
)
@click.option(
    "--state-dir",
    default=None,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory holding state.json, the slots and workload.log.",
)
@click.option(
    "--token-file",
    default=None,
    type=click.Path(dir_okay=False, path_type=Path),
    help="File holding the bearer token (whitespace stripped).",
)
@click.option(
    "--image",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Image installed into slot A on first start (ignored once state exists).",
)
@click.option("--node-id", default=None, help="Node id reported in status [default: HOST].")
@click.option(
    "--workload-port",
    type=click.IntRange(1, 65535),
    default=8080,
    show_default=True,
    help="Port given to the workload (ROLLOUT_WORKLOAD_PORT).",
)
@click.option(
    "--firmware-delay",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    help="Simulated firmware seconds (reboot only).",
)
@click.option(
    "--kernel-delay",
    type=click.FloatRange(min=0),
    default=0.5,
    show_default=True,
    help="Simulated kernel boot seconds (reboot and kexec).",
)
@click.option(
    "--commit-deadline",
    type=click.FloatRange(min=0, min_open=True),
    default=300.0,
    show_default=True,
    help="Seconds an uncommitted boot may last before fallback.",
)
@click.option(
    "--workload-grace",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    help="Seconds the workload must survive to count as running.",
)
@click.option(
    "--tls-cert",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="PEM certificate (chain) to serve the API over HTTPS only; needs --tls-key.",
)
@click.option(
    "--tls-key",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="PEM private key of --tls-cert.",
)
@click.option(
    "--trusted-key",
    "trusted_keys",
    multiple=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="ed25519 public key (PEM) an image must be signed by; repeat to trust several "
    "(key rotation). Without one, images are checked by digest only.",
)
def agent(
    config_file: Path | None,
    listen: str | None,
    state_dir: Path | None,
    token_file: Path | None,
    image: Path | None,
    node_id: str | None,
    workload_port: int,
    firmware_delay: float,
    kernel_delay: float,
    commit_deadline: float,
    workload_grace: float,
    tls_cert: Path | None,
    tls_key: Path | None,
    trusted_keys: tuple[Path, ...],
) -> None:
    """Run the node agent: A/B slots, boot counting, workload, HTTP API."""
    configure_logging()
    try:
        if config_file is not None:
            config, ssl_context = _disk_config(config_file, node_id)
            action = asyncio.run(serve(config, ssl_context))
            if action is ExitAction.REEXEC:
                reexec()
            return
        missing = [
            f"--{n}" for n, v in (("listen", listen), ("state-dir", state_dir),
                                  ("token-file", token_file)) if v is None
        ]  # fmt: skip
        if missing or listen is None or state_dir is None or token_file is None:
            raise InputError(f"{', '.join(missing)}: required (or give --config FILE)")
        host, port = parse_listen(listen)
        ssl_context = optional_server_context(tls_cert, tls_key)
        config = AgentConfig(
            host=host,
            port=port,
            state_dir=state_dir.absolute(),
            token=read_token(token_file, "--token-file"),
            node_id=node_id or host,
            image=image.absolute() if image is not None else None,
            workload_port=workload_port,
            firmware_delay=firmware_delay,
            kernel_delay=kernel_delay,
            commit_deadline=commit_deadline,
            workload_grace=workload_grace,
            trusted_keys=tuple(str(k.absolute()) for k in trusted_keys),
        )
        action = asyncio.run(serve(config, ssl_context))
    except InputError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except OSError as exc:  # e.g. the address is in use
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    if action is ExitAction.REEXEC:
        reexec()


def _disk_config(path: Path, node_id: str | None) -> tuple[AgentConfig, ssl.SSLContext | None]:
    from rollout.agent.disk import load_config

    disk = load_config(path)
    host, port = parse_listen(disk.listen)
    tls = (
        Path(disk.tls_cert) if disk.tls_cert else None,
        Path(disk.tls_key) if disk.tls_key else None,
    )
    config = AgentConfig(
        host=host,
        port=port,
        state_dir=Path(disk.state_dir),
        token=read_token(disk.token_file, "token_file"),
        node_id=node_id or disk.node_id,
        workload_port=disk.workload_port,
        commit_deadline=disk.commit_deadline,
        disk=disk,
        trusted_keys=tuple(disk.trusted_keys),
    )
    return config, optional_server_context(*tls)
