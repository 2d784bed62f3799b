"""`rollout demo`: v1 and v2 sample images, a local fleet on v1, and v2 rolled out to it
with policies/canary.yaml, in the foreground; `--bad` shows the canary catching a bad
image.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
from pathlib import Path

import click

from rollout import fleet
from rollout.commands.fleet import _short, _statuses
from rollout.commands.run import print_result, run_rollout
from rollout.console import make_console, node_table
from rollout.errors import InputError
from rollout.inventory import load_inventory
from rollout.policy import load_policy
from rollout.sample import build_sample_image


# -- demo -----------------------------------------------------------------------------------
def _default_policy() -> Path:
    for base in (Path.cwd(), Path(__file__).resolve().parent.parent):
        candidate = base / "policies" / "canary.yaml"
        if candidate.is_file():
            return candidate
    raise InputError("policies/canary.yaml not found; pass --policy FILE")


@click.command()
@click.option("--nodes", default=12, show_default=True, type=int)
@click.option("--bad", is_flag=True, help="Make v2 fail its health check (the canary catches it).")
@click.option("--workdir", type=click.Path(file_okay=False), help="Where the fleet lives.")
@click.option("--keep", is_flag=True, help="Leave the fleet running (needs --workdir).")
@click.option("--policy", "policy_path", type=click.Path(dir_okay=False))
@click.option("--base-address", default="127.0.0.2", show_default=True)
@click.option("--log-format", type=click.Choice(["auto", "console", "json"]), default="auto")
def demo(
    nodes: int,
    bad: bool,
    workdir: str | None,
    keep: bool,
    policy_path: str | None,
    base_address: str,
    log_format: str,
) -> None:
    """Build v1 and v2, start a local fleet on v1, roll v2 out with policies/canary.yaml."""
    if keep and not workdir:
        raise InputError("--keep: needs --workdir DIR so you can find the fleet afterwards")
    policy = Path(policy_path) if policy_path else _default_policy()
    load_policy(policy)  # bad input is reported before anything starts
    console = make_console()
    wd = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="rollout-demo-"))
    wd.mkdir(parents=True, exist_ok=True)
    v1 = build_sample_image(wd / "v1.img", "1.0.0")
    v2 = build_sample_image(wd / "v2.img", "2.0.0-bad" if bad else "2.0.0", bad=bad)
    console.print(
        f"images: v1 {v1.digest[:19]}  v2 {v2.digest[:19]}{' (bad)' if bad else ''}",
        soft_wrap=True,
    )
    inventory = fleet.up(wd, v1.path, fleet.FleetOptions(nodes=nodes, base_address=base_address))
    console.print(
        f"fleet: {nodes} agents up from {base_address}; inventory {inventory}", soft_wrap=True
    )
    try:
        result = run_rollout(
            str(inventory), str(policy), v2.path, state_path=str(wd / "state.db"),
            log_format=log_format,
        )  # fmt: skip
        print_result(result, console)
        rows = asyncio.run(_statuses(load_inventory(inventory).nodes, 8080))
        console.print(node_table([_short(r) for r in rows], "fleet after the rollout"))
    finally:
        if keep:
            console.print(
                f"fleet left running: rollout status --inventory {inventory}; "
                f"rollout fleet down --workdir {wd}",
                soft_wrap=True,
            )
        else:
            fleet.down(wd)
            if not workdir:
                shutil.rmtree(wd, ignore_errors=True)
    sys.exit(result.exit_code)
