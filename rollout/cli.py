"""The command line: parse, call, print. No rollout logic lives here.

Exit codes (a contract, see docs/cli.md): 0 done, 1 the rollout did not succeed, 2 bad
input (the message names what, where, and how to fix it).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from rollout import __version__
from rollout.errors import InputError
from rollout.exitcodes import EXIT_INPUT


class RolloutGroup(click.Group):
    """Turns InputError anywhere into a one-line message and exit code 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except InputError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(EXIT_INPUT)


@click.group(cls=RolloutGroup)
@click.version_option(__version__, prog_name="rollout")
def main() -> None:
    """Batched, health-checked A/B image rollouts over a fleet of node agents."""


def _register() -> None:
    from rollout.agent.cli import agent
    from rollout.commands import demo, fleet, image, run, schema, service, simulate

    for command in (
        image.image,
        fleet.fleet_group,
        fleet.status,
        run.plan,
        run.run,
        simulate.simulate_command,
        demo.demo,
        schema.schema_command,
        agent,
    ):
        main.add_command(command)
    service.register(main)


_register()

if __name__ == "__main__":  # pragma: no cover
    main(prog_name=os.path.basename(sys.argv[0]))
