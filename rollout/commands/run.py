"""`rollout plan` and `rollout run`: one rollout in the foreground, from files.

`run_rollout` loads the inventory, policy and image (a file, or a registry reference
resolved to its digest now), plans the batches, and lets a Controller resume the
unfinished rollout of these nodes and this image or create a new one, then runs it with
the live view (on a terminal) or an event log, metrics, and optionally the signal and
approval API beside it (`--listen`). The first Ctrl-C (or SIGTERM, SIGHUP) asks the
controller to abort: nothing new starts and in-flight nodes settle; a second abandons
them, and the result says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import ssl
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from rollout.cliopts import registry_options, trusted_key_option
from rollout.console import EventLog, LiveProgress, configure_logging, make_console, node_table
from rollout.control import Control
from rollout.controller import Controller, rebuild
from rollout.errors import InputError
from rollout.events import Fanout, Observer
from rollout.gates.schedule import unreachable
from rollout.inventory import Inventory, load_inventory, split_address
from rollout.journal import SQLiteStore
from rollout.junit import JUnitReport
from rollout.metrics import MetricsRecorder
from rollout.model import Batch, Image, NodePhase, RolloutPhase
from rollout.plan import describe, plan_batches
from rollout.policy import Policy, load_policy
from rollout.pull import PullAccess
from rollout.record import NodeRecord, RolloutResult
from rollout.runtime import settle_heap
from rollout.tls import optional_server_context
from rollout.tokens import read_token


@click.command()
@click.option("--inventory", "inventory_path", required=True, type=click.Path(dir_okay=False))
@click.option("--policy", "policy_path", required=True, type=click.Path(dir_okay=False))
@click.option("--output", type=click.Choice(["table", "json"]), default="table")
def plan(inventory_path: str, policy_path: str, output: str) -> None:
    """Print the batches a rollout would use; touches no node."""
    inv = load_inventory(inventory_path)
    pol = load_policy(policy_path)
    batches = plan_batches(inv.nodes, pol)
    rows = describe(batches, pol.batches.spread_by)
    warnings = unreachable(pol.gates, batches)
    if output == "json":
        click.echo(json.dumps({"batches": rows, "warnings": warnings}, indent=2))
        return
    for warning in warnings:
        click.echo(f"warning: {warning}", err=True)
    console = make_console()
    for row in rows:
        spread = row.get("spread") or {}
        per = ", ".join(f"{k}: {v}" for k, v in spread.items())
        kind = " (canary)" if row.get("canary") else ""
        console.print(
            f"batch {row['number']}{kind}: {row['size']} node(s) {' '.join(row['nodes'])}"
            + (f"  ({per})" if per else ""),
            markup=False,
        )


# -- run ------------------------------------------------------------------------------------
def _is_terminal(log_format: str) -> bool:
    return log_format == "auto" and sys.stderr.isatty()


@contextlib.contextmanager
def _observers(log_format: str, console: Console, metrics_port: int | None,
               metrics_host: str) -> Iterator[tuple[Fanout, MetricsRecorder]]:  # fmt: skip
    recorder = MetricsRecorder()
    if metrics_port is not None:
        recorder.serve(metrics_port, metrics_host)
    live = _is_terminal(log_format)
    configure_logging("json" if log_format == "json" else "console")
    observers: list[Observer] = [recorder]
    if live:  # on a terminal the live view and the summary say it all
        progress = LiveProgress(console)
        observers.append(progress)
        with progress:
            yield Fanout(observers), recorder
    else:
        observers.append(EventLog())
        yield Fanout(observers), recorder


DEFAULT_STATE = ".rollout/state.db"


def _pick_rollout(controller: Controller, inv: Inventory, pol: Policy, img: Image,
                  policy_name: str, console: Console,
                  pull: PullAccess | None = None) -> str:  # fmt: skip
    """Resume the unfinished rollout of these nodes and this image, or create a new one
    (`Controller.resume_or_create`), saying which."""
    rollout_id, chosen, again = controller.resume_or_create(
        inv.nodes, pol, img, policy_name=policy_name, by="run", pull=pull
    )
    if chosen.kind == "resume":
        console.print(
            f"resuming rollout {rollout_id} ({chosen.phase}) from the journal", soft_wrap=True
        )
        if chosen.tag_moved_from is not None:
            console.print(
                f"[yellow]{img.reference} now names {img.digest[:19]}; this rollout stays "
                f"on the digest it resolved when it started, {chosen.tag_moved_from}[/]",
                soft_wrap=True,
            )
    elif chosen.kind == "retry":
        console.print(
            f"retrying halted rollout {rollout_id}: {len(again)} failed node(s) again",
            soft_wrap=True,
        )
    return rollout_id


def run_rollout(
    inventory_path: str,
    policy_path: str,
    image_path: str,
    *,
    state_path: str = DEFAULT_STATE,
    log_format: str = "auto",
    metrics_port: int | None = None,
    metrics_host: str = "127.0.0.1",
    metrics_linger: float = 0.0,
    listen: str | None = None,
    token_file: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    stop_after: str | None = None,
    junit: str | None = None,
    console: Console | None = None,
    trusted_keys: tuple[str, ...] = (),
    signature: str | None = None,
    pull: PullAccess | None = None,
) -> RolloutResult:
    """Load inputs, run (or resume) the rollout in the foreground, return its result.

    `pull`: how to reach the registry when IMAGE is an oci:// reference (pull mode)."""
    inv = load_inventory(inventory_path)
    pol = load_policy(policy_path)
    pull = replace(pull or PullAccess(), mirrors=inv.mirrors)
    img = load_any_image(image_path, pull, trusted_keys, signature)
    batches = plan_batches(inv.nodes, pol)
    settle_heap()  # inputs and plan live to the end: out of the collector's sight
    stop_batch = _stop_batch(stop_after, batches)
    token = _listen_token(listen, token_file)
    ssl_context = listen_tls(tls_cert, tls_key, listen)
    console = console or make_console(stderr=True)
    store = SQLiteStore(state_path)
    try:
        reports: dict[str, JUnitReport] = {}
        with _observers(log_format, console, metrics_port, metrics_host) as (observer, rec):

            def observer_for(rid: str) -> Observer:
                return Fanout([observer, reports.setdefault(rid, JUnitReport(rid))])

            controller = Controller(store, observer_for=observer_for)
            rollout_id = _pick_rollout(
                controller, inv, pol, img, Path(policy_path).stem, console, pull
            )
            if stop_batch is not None:
                controller.stop_after[rollout_id] = stop_batch
            api = (listen, token, rec, ssl_context) if listen and token else None
            result = asyncio.run(_run_controller(controller, rollout_id, console, api))
            if metrics_port is not None and metrics_linger > 0:
                rec.wait_for_scrape(metrics_linger, count=2)  # Prometheus sees the final state
        if junit:
            reports.setdefault(rollout_id, JUnitReport(rollout_id)).write(junit, result)
        return result
    finally:
        store.close()


def load_any_image(
    image: str, pull: PullAccess, trusted_keys: Sequence[str], signature: str | None
) -> Image:
    """`--image`: a local file (push mode) or an image in a store (pull mode: an oci://
    reference, resolved to its digest now, or an https:// URL)."""
    from rollout.pull import is_remote, resolve_image
    from rollout.signing import load_signed_image

    if is_remote(image):
        return asyncio.run(resolve_image(image, pull, trusted_keys, signature))
    return load_signed_image(image, trusted_keys, signature)


def _stop_batch(stop_after: str | None, batches: Sequence[Batch]) -> int | None:
    if stop_after is None:
        return None
    if stop_after == "canary":
        if not batches or not batches[0].canary:
            raise InputError("--stop-after canary: the policy has no canary batch (canary: 0)")
        return 1
    if not stop_after.isdigit() or not 1 <= int(stop_after) <= len(batches):
        raise InputError(
            f"--stop-after: expected 'canary' or a batch number 1..{len(batches)}, "
            f"got {stop_after!r}"
        )
    return int(stop_after)


def listen_tls(
    tls_cert: str | None, tls_key: str | None, listen: str | None
) -> ssl.SSLContext | None:
    """The HTTPS context of `run --listen` for --tls-cert/--tls-key (both or neither)."""
    if listen is None and (tls_cert is not None or tls_key is not None):
        raise InputError("--tls-cert/--tls-key: only used with --listen HOST:PORT")
    return optional_server_context(tls_cert, tls_key)


def _listen_token(listen: str | None, token_file: str | None) -> str | None:
    if listen is None:
        return None
    if token_file is None:
        raise InputError("--listen: needs --token-file F; the API always authenticates")
    token = read_token(token_file, "--token-file")
    try:
        split_address(listen)  # bad input is reported before anything starts
    except ValueError as exc:
        raise InputError(f"--listen: {exc}") from exc
    return token


async def _run_controller(
    controller: Controller,
    rollout_id: str,
    console: Console,
    api: tuple[str, str, MetricsRecorder, ssl.SSLContext | None] | None = None,
) -> RolloutResult:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    controller.controls.setdefault(rollout_id, Control())  # commands and signals find it
    presses = 0

    def on_sigint() -> None:
        nonlocal presses
        presses += 1
        if presses == 1:
            console.print(
                "[yellow]stopping: no new batch or node will start; in-flight nodes settle "
                "per policy (Ctrl-C again to abandon them)[/]"
            )
            controller.request_abort(rollout_id, "signal")
        elif task is not None:
            task.cancel()

    with contextlib.suppress(NotImplementedError, RuntimeError):
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # a closed terminal too
            loop.add_signal_handler(sig, on_sigint)
    runner: Any = None  # an aiohttp AppRunner when the API is served
    if api is not None:  # the signal/approve API beside this one rollout
        from aiohttp import web  # only then: `run` without --listen starts faster

        from rollout.server import make_app

        listen, token, recorder, ssl_context = api
        host, port = split_address(listen)
        # No access log: request lines carry the wait gates' signal secrets.
        runner = web.AppRunner(
            make_app(controller, token, recorder, service=False), access_log=None
        )
        await runner.setup()
        await web.TCPSite(runner, host, port, ssl_context=ssl_context).start()
    try:
        return await controller.execute(rollout_id)
    except asyncio.CancelledError:
        engine_records = rebuild(controller.state(rollout_id)).records
        return RolloutResult(
            rollout_id,
            RolloutPhase.ABORTED,
            "abandoned by a second interrupt: nodes in flight may be uncommitted; run the "
            "same command again to resume, or their agents fall back at the commit deadline",
            engine_records,
        )
    finally:
        if runner is not None:
            await runner.cleanup()


# The summary lists every node up to this many; past it, it counts the nodes by phase and
# lists only those that need a look (rich lays a table out at about 0.3 ms a row: 3 s of
# CPU, and 10,000 lines nobody reads, at 10,000 nodes). `--output json` has them all.
SUMMARY_ROWS = 50
# Which of a large fleet's nodes the summary lists, most urgent first: not settled, then
# failed, then returned to their old image; done, pending and staged ones are only counted.
_URGENCY = {
    NodePhase.ROLLBACK_FAILED: 0,
    **{phase: 1 for phase in NodePhase if phase.in_flight},
    NodePhase.FAILED: 2,
    NodePhase.ROLLED_BACK: 3,
}


def summary_records(result: RolloutResult, limit: int = SUMMARY_ROWS) -> list[NodeRecord]:
    """The nodes the summary lists: all of them when there are at most `limit`; else the
    first `limit` of those that need a look (`_URGENCY`), most urgent first, each phase
    in plan order."""
    records = list(result.nodes.values())
    if len(records) <= limit:
        return records
    notable = [r for r in records if r.phase in _URGENCY]
    notable.sort(key=lambda r: _URGENCY[r.phase])  # stable: plan order within a phase
    return notable[:limit]


def phase_counts(result: RolloutResult) -> str:
    """The nodes counted by phase, the most first: "9,990 committed, 10 failed"."""
    counts = Counter(str(r.phase) for r in result.nodes.values())
    return ", ".join(f"{n:,} {phase}" for phase, n in counts.most_common())


def print_result(result: RolloutResult, console: Console) -> None:
    listed = summary_records(result)
    rows = []
    for rec in listed:
        rows.append({
            "node": rec.node.id,
            "batch": rec.batch,
            "phase": str(rec.phase),
            "version": rec.version,
            "reason": str(rec.reason) if rec.reason else "",
            "detail": rec.detail,
        })  # fmt: skip
    title = f"rollout {result.rollout_id}: {result.phase}"
    if len(listed) < len(result.nodes):
        console.print(f"{title}, {len(result.nodes):,} nodes: {phase_counts(result)}")
        if rows:
            notable = sum(1 for r in result.nodes.values() if r.phase in _URGENCY)
            more = f" (the first {len(rows)} of {notable:,})" if notable > len(rows) else ""
            console.print(node_table(rows, f"nodes that need a look{more}"))
        console.print(
            f"every node: --output json, or `rollout show {result.rollout_id} --state FILE`",
            markup=False,
        )
    else:
        console.print(node_table(rows, title))
    style = "green" if result.succeeded else "red"
    console.print(f"[{style}]{result.phase}[/]: {result.message}")
    unsettled = [r.node.id for r in result.nodes.values()
                 if r.phase.in_flight or r.phase is NodePhase.ROLLBACK_FAILED]  # fmt: skip
    if unsettled:
        console.print(
            f"[bold red]not settled: {', '.join(unsettled)}[/] (uncommitted; their agents fall "
            "back to the last good image at their commit deadline)"
        )


@click.command()
@click.option("--inventory", "inventory_path", required=True, type=click.Path(dir_okay=False))
@click.option("--policy", "policy_path", required=True, type=click.Path(dir_okay=False))
@click.option(
    "--image",
    "image_path",
    required=True,
    help="An image file (pushed to each node), oci://HOST[:PORT]/REPO:TAG|@sha256:... or an "
    "https:// URL (each node pulls it).",
)
@registry_options
@click.option("--metrics-port", type=int, help="Serve Prometheus metrics on this port.")
@click.option("--metrics-host", default="127.0.0.1", show_default=True)
@click.option(
    "--metrics-linger",
    type=float,
    default=0.0,
    show_default=True,
    metavar="SECONDS",
    help="After the rollout, keep /metrics up until it is scraped once more (at most "
    "SECONDS), so Prometheus sees the final state.",
)
@click.option(
    "--log-format",
    type=click.Choice(["auto", "console", "json"]),
    default="auto",
    show_default=True,
    help="auto: live progress on a terminal, log lines otherwise.",
)
@click.option("--output", type=click.Choice(["table", "json"]), default="table")
@click.option(
    "--listen",
    metavar="HOST:PORT",
    help="Serve the controller API (gate signals, approvals, commands) during the run.",
)
@click.option("--token-file", type=click.Path(dir_okay=False), help="Bearer token for --listen.")
@click.option(
    "--tls-cert",
    type=click.Path(dir_okay=False),
    help="PEM certificate: serve --listen over HTTPS (needs --tls-key).",
)
@click.option("--tls-key", type=click.Path(dir_okay=False), help="PEM private key of --tls-cert.")
@click.option(
    "--stop-after",
    metavar="canary|N",
    help="Stop once this batch and its gates passed (exit 0); run again to go on.",
)
@click.option("--junit", type=click.Path(dir_okay=False), help="Write a JUnit XML report.")
@click.option(
    "--state",
    "state_path",
    default=DEFAULT_STATE,
    show_default=True,
    type=click.Path(dir_okay=False),
    help="Journal file (SQLite); running again with it resumes an unfinished rollout.",
)
@trusted_key_option(
    "IMAGE must be signed by it (or by another --trusted-key) "
    "before any node is touched; exit 2 otherwise."
)
@click.option(
    "--signature",
    type=click.Path(dir_okay=False),
    help="Signature file of IMAGE [default: IMAGE.sig when it exists]; sent to the agents.",
)
def run(
    inventory_path: str,
    policy_path: str,
    image_path: str,
    state_path: str,
    metrics_port: int | None,
    metrics_host: str,
    metrics_linger: float,
    log_format: str,
    output: str,
    listen: str | None,
    token_file: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    stop_after: str | None,
    junit: str | None,
    trusted_keys: tuple[str, ...],
    signature: str | None,
    pull: PullAccess,
) -> None:
    """Roll IMAGE out to the inventory's nodes, batch by batch, as the policy says."""
    console = make_console()
    result = run_rollout(
        inventory_path,
        policy_path,
        image_path,
        state_path=state_path,
        log_format=log_format,
        metrics_port=metrics_port,
        metrics_host=metrics_host,
        metrics_linger=metrics_linger,
        listen=listen,
        token_file=token_file,
        tls_cert=tls_cert,
        tls_key=tls_key,
        stop_after=stop_after,
        junit=junit,
        trusted_keys=trusted_keys,
        signature=signature,
        pull=pull,
    )
    if output == "json":
        click.echo(json.dumps(_result_json(result), indent=2))
    else:
        print_result(result, console)
    sys.exit(result.exit_code)


def _result_json(result: RolloutResult) -> dict[str, Any]:
    return {
        "rollout": result.rollout_id,
        "phase": str(result.phase),
        "message": result.message,
        "nodes": [
            {
                "node": r.node.id,
                "batch": r.batch,
                "phase": str(r.phase),
                "failed": r.failed,
                "reason": str(r.reason) if r.reason else None,
                "detail": r.detail,
                "version": r.version,
                "boot_count": r.boot_count,
            }
            for r in result.nodes.values()
        ],
    }
