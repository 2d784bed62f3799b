"""The command line: parse, call, print. No rollout logic lives here.

Exit codes (a contract, see docs/cli.md): 0 done, 1 the rollout did not succeed, 2 bad
input (the message names what, where, and how to fix it).
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import click

from rollout import __version__
from rollout.errors import InputError
from rollout.exitcodes import EXIT_INPUT

# Each command's module is imported when that command runs (or --help lists them), so
# `rollout run` does not pay for the agent, the service, the VM fleet or the simulator.
COMMANDS: dict[str, tuple[str, str]] = {
    "image": ("rollout.commands.image", "image"),
    "fleet": ("rollout.commands.fleet", "fleet_group"),
    "status": ("rollout.commands.fleet", "status"),
    "plan": ("rollout.commands.run", "plan"),
    "run": ("rollout.commands.run", "run"),
    "simulate": ("rollout.commands.simulate", "simulate_command"),
    "demo": ("rollout.commands.demo", "demo"),
    "schema": ("rollout.commands.schema", "schema_command"),
    "agent": ("rollout.agent.cli", "agent"),
}
# Added together by rollout.commands.service.register.
SERVICE_COMMANDS = frozenset(
    {"serve", "start", "ls", "show", "watch", "history", "signal", "approve", "reject",
     "pause", "resume", "abort", "retry", "rollback"}
)  # fmt: skip


class RolloutGroup(click.Group):
    """Turns InputError anywhere into a one-line message and exit code 2; loads each
    command's module on first use."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except InputError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(EXIT_INPUT)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(COMMANDS) | SERVICE_COMMANDS | set(self.commands))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands:
            if cmd_name in COMMANDS:
                module, attr = COMMANDS[cmd_name]
                self.add_command(getattr(importlib.import_module(module), attr), cmd_name)
            elif cmd_name in SERVICE_COMMANDS:
                from rollout.commands import service

                service.register(self)
        return self.commands.get(cmd_name)


@click.group(cls=RolloutGroup)
@click.version_option(__version__, prog_name="rollout")
def main() -> None:
    """Batched, health-checked A/B image rollouts over a fleet of node agents."""


if __name__ == "__main__":  # pragma: no cover
    main(prog_name=os.path.basename(sys.argv[0]))
