"""The CLI's command table (loaded lazily) names exactly the commands that exist."""

from __future__ import annotations

import subprocess
import sys

import click

from rollout.cli import COMMANDS, SERVICE_COMMANDS, main
from rollout.commands import service


def test_every_listed_command_loads_under_its_name() -> None:
    ctx = click.Context(main)
    for name in main.list_commands(ctx):
        command = main.get_command(ctx, name)
        assert command is not None and command.name == name, name
    assert main.get_command(ctx, "nope") is None


def test_the_service_commands_are_the_ones_register_adds() -> None:
    group = click.Group()
    service.register(group)
    assert set(group.commands) == SERVICE_COMMANDS
    assert not SERVICE_COMMANDS & set(COMMANDS)


def test_run_does_not_import_the_agent_service_or_simulator() -> None:
    code = (
        "import sys; from rollout.cli import main\n"
        "try: main(['run', '--help'])\n"
        "except SystemExit: pass\n"
        "print(sorted(m for m in ('rollout.agent.cli', 'rollout.server', 'rollout.simulate',"
        " 'rollout.fleet', 'rollout.commands.service') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
