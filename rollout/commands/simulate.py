"""`rollout simulate`: a policy's predicted timeline on simulated nodes (rollout.simulate).

Parse, call, print: the inputs are read as `rollout run` reads them (the same inventory
and policy loaders, the same one-line errors, exit 2), the fleet is the inventory's or N
made-up nodes, and the prediction is printed as text or, with `--output json`, as data.
The exit code is the one `rollout run` would give for the predicted outcome (0 succeeded,
1 not), so a CI job can check that a policy copes with a failure rate. No event is logged
unless `--log-format` asks for it (a 100,000-node simulation has ~700k events).
"""

from __future__ import annotations

import json
import sys
from datetime import datetime
from pathlib import Path

import click

from rollout.console import EventLog, configure_logging
from rollout.errors import InputError
from rollout.events import Observer
from rollout.inventory import load_inventory
from rollout.metrics import MetricsRecorder
from rollout.policy import load_policy
from rollout.runtime import settle_heap
from rollout.simulate import (
    SimSettings,
    parse_gate_script,
    parse_labels,
    render_text,
    report_json,
    simulate,
    synthetic_nodes,
)
from rollout.units import parse_duration


def _duration(option: str, value: str) -> float:
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise InputError(f"{option}: {exc}") from None


def _range(option: str, value: str) -> tuple[float, float | None]:
    """`90s` -> (90, None); `60s..2m` -> (60, 120), low first."""
    low, sep, high = value.partition("..")
    if not sep:
        return _duration(option, value), None
    lo, hi = _duration(option, low), _duration(option, high)
    if hi < lo:
        raise InputError(f"{option}: the range {value!r} ends before it starts; write LOW..HIGH")
    return lo, hi


def _start(value: str | None) -> datetime | None:
    """`--start 2026-12-12T01:00:00Z` (or +01:00): an aware time; None: now."""
    if value is None:
        return None
    try:
        at = datetime.fromisoformat(value.strip())
    except ValueError:
        raise InputError(f"--start: expected an ISO 8601 time like 2026-12-12T01:00:00Z, "
                         f"got {value!r}") from None  # fmt: skip
    if at.tzinfo is None or at.utcoffset() is None:
        raise InputError(f"--start: {value!r} has no time zone; add one, as in "
                         "2026-12-12T01:00:00Z or 2026-12-12T02:00:00+01:00")  # fmt: skip
    return at


def _fraction(option: str, value: str) -> float:
    """`2%`, `0.02` -> 0.02; from 0 to 1."""
    text = value.strip()
    try:
        rate = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise InputError(f'{option}: expected a percentage like "2%" or a fraction like 0.02, '
                         f"got {value!r}") from None  # fmt: skip
    if not 0 <= rate <= 1:
        raise InputError(f"{option}: must be between 0% and 100%, got {value!r}")
    return rate


@click.command("simulate")
@click.option("--policy", "policy_path", required=True, type=click.Path(dir_okay=False))
@click.option("--inventory", "inventory_path", type=click.Path(dir_okay=False),
              help="The fleet to simulate (nodes, labels); no agent is contacted.")  # fmt: skip
@click.option("--nodes", "node_count", type=int, help="Or N made-up nodes: node-1 ...")
@click.option("--labels", metavar="NAME=COUNT,...",
              help="With --nodes: labels dealt round-robin, e.g. rack=4.")  # fmt: skip
@click.option("--boot", default="90s", show_default=True,
              help="Activation until the node answers again; a range like 60s..2m gives "
              "each node its own, drawn from --seed.")  # fmt: skip
@click.option("--healthy-after", default="20s", show_default=True,
              help="After each boot, how long the workload takes to start; a range like "
              "10s..1m gives each node its own.")  # fmt: skip
@click.option("--stage", default="0s", show_default=True,
              help="How long writing the image into a node's inactive slot takes.")  # fmt: skip
@click.option("--fail-rate", default="0%", show_default=True,
              help="Share of nodes whose workload fails on the new image, e.g. 2%.")  # fmt: skip
@click.option("--fail-mode", type=click.Choice(["workload", "boot"]), default="workload",
              show_default=True,
              help="How the --fail-rate nodes fail: their workload on the new image, or the "
              "image does not boot and they fall back.")  # fmt: skip
@click.option("--seed", default=1, show_default=True, type=int,
              help="Which nodes fail: the same seed and fleet give the same ones.")  # fmt: skip
@click.option("--start", metavar="TIME",
              help="When the simulated rollout starts, for window gates: ISO 8601 with a "
              "time zone, e.g. 2026-12-12T01:00:00Z [default: now].")  # fmt: skip
@click.option("--gate", "gates", metavar="NAME=OUTCOME[@AFTER]", multiple=True,
              help="How a wait or approval gate goes, each time it waits: pass, fail or "
              "timeout, AFTER into the wait (e.g. approve=pass@2h, smoke=fail@5m); "
              "repeatable. Unscripted ones pass at once.")  # fmt: skip
@click.option("--state", "state_path", type=click.Path(dir_okay=False),
              help="Keep the simulated rollout's journal in this file [default: a temporary "
              "file]. A fresh file is best; no real rollout should be in it.")  # fmt: skip
@click.option("--output", type=click.Choice(["table", "json"]), default="table")
@click.option("--log-format", type=click.Choice(["none", "console", "json"]), default="none",
              show_default=True, help="Also log every event on stderr, as run does.")  # fmt: skip
def simulate_command(
    policy_path: str,
    inventory_path: str | None,
    node_count: int | None,
    labels: str | None,
    boot: str,
    healthy_after: str,
    stage: str,
    fail_rate: str,
    fail_mode: str,
    seed: int,
    start: str | None,
    gates: tuple[str, ...],
    state_path: str | None,
    output: str,
    log_format: str,
) -> None:
    """Predict how a rollout under POLICY goes: the real engine, planner, bake and window
    gates (and the wait and approval gates --gate scripts) and journal on simulated nodes
    and virtual time (hours pass in seconds)."""
    if (inventory_path is None) == (node_count is None):
        raise InputError("give the fleet as --inventory FILE or --nodes N (one of them)")
    if labels is not None and node_count is None:
        raise InputError("--labels: only with --nodes (an inventory has its own labels)")
    if state_path is not None and Path(state_path).is_dir():
        raise InputError(f"--state {state_path}: is a directory, expected a file")
    parsed = [parse_gate_script(g) for g in gates]
    names = [name for name, _ in parsed]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise InputError(f"--gate {twice[0]}: given more than once; script each gate once")
    scripts = dict(parsed)
    boot_low, boot_high = _range("--boot", boot)
    healthy_low, healthy_high = _range("--healthy-after", healthy_after)
    settings = SimSettings(
        boot=boot_low,
        boot_max=boot_high,
        healthy_after=healthy_low,
        healthy_after_max=healthy_high,
        fail_rate=_fraction("--fail-rate", fail_rate),
        fail_mode=fail_mode,
        seed=seed,
        stage=_duration("--stage", stage),
        start=_start(start),
        gates=tuple(scripts.items()),
    )
    policy = load_policy(policy_path)
    if inventory_path is not None:
        nodes = load_inventory(inventory_path).nodes
    else:
        assert node_count is not None
        nodes = synthetic_nodes(node_count, parse_labels(labels))
    observers: list[Observer] = [MetricsRecorder()]  # as `rollout run`: metrics are kept
    if log_format != "none":
        configure_logging(log_format)
        observers.append(EventLog())
    settle_heap()  # the inventory, policy and nodes live to the end: out of the GC's sight
    report = simulate(
        nodes,
        policy,
        settings,
        policy_name=Path(policy_path).stem,
        state_path=state_path,
        observers=observers,
    )
    if output == "json":
        click.echo(json.dumps(report_json(report), indent=2))
    else:
        click.echo("\n".join(render_text(report)))
    sys.exit(report.exit_code)
