"""`rollout serve` and the commands that talk to it: start, ls, show, watch, pause,
resume, abort, retry, rollback, history, signal, approve and reject.

Each command reaches a controller service through `client.Client`, or reads a state file
directly through `local_client.LocalClient` (`--state`). Exit codes follow the CLI
contract: 0 done; 1 the rollout did not succeed (or the server could not be reached); 2
bad input, which includes what the server refused (400, 401, 404, 409) and a server
certificate that does not verify.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import sys
from pathlib import Path
from typing import Any

import aiohttp
import click

from rollout.client import DEFAULT_SERVER, Client, ServerError, token_from
from rollout.cliopts import registry_options, trusted_key_option
from rollout.console import make_console, node_table
from rollout.errors import InputError
from rollout.local_client import LocalClient
from rollout.pull import PullAccess, is_remote
from rollout.tls import certificate_problem, optional_server_context


def _run(coro: Any) -> Any:
    try:
        return asyncio.run(coro)
    except ServerError as exc:
        extra = f" (field {exc.body['field']})" if exc.body.get("field") else ""
        click.echo(f"error: server said {exc.status}: {exc}{extra}", err=True)
        sys.exit(2)
    except aiohttp.ClientError as exc:
        detail = certificate_problem(exc)
        if detail is not None:
            click.echo(
                f"error: the controller's TLS certificate did not verify ({detail}); pass "
                "--ca-file F (or set ROLLOUT_CA_FILE) with the CA that signed it",
                err=True,
            )
            sys.exit(2)
        click.echo(f"error: cannot reach the controller: {exc}", err=True)
        sys.exit(1)


_server_opts = [
    click.option("--server", envvar="ROLLOUT_SERVER", default=DEFAULT_SERVER, show_default=True),
    click.option("--token-file", type=click.Path(dir_okay=False), help="Bearer token file."),
    click.option(
        "--ca-file",
        envvar="ROLLOUT_CA_FILE",
        type=click.Path(dir_okay=False),
        help="PEM CA certificate to verify an https:// --server with [default: the system "
        "trust store].",
    ),
    click.option(
        "--state",
        "state_file",
        type=click.Path(dir_okay=False, exists=True),
        help="Read a state file directly instead of asking a server (e.g. the journal of "
        "`rollout run`); offline, only ls, show, history and abort work.",
    ),
]


def _client(
    server: str, token_file: str | None, ca_file: str | None, state_file: str | None
) -> Client | LocalClient:
    if state_file:
        return LocalClient(state_file)
    return Client(server, token_from(token_file), ca_file)


def server_options(f: Any) -> Any:
    for opt in reversed(_server_opts):
        f = opt(f)
    return f


def _ts(value: float) -> str:
    return dt.datetime.fromtimestamp(value, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _describe(entry: dict[str, Any]) -> str:
    kind, data = entry["kind"], entry["data"]
    if kind == "node":
        why = f" ({data['reason']}: {data['detail']})" if data.get("reason") else ""
        return f"node {data['id']} {data['phase']}{why}"
    if kind == "phase":
        return f"rollout {data['phase']}" + (f": {data['message']}" if data.get("message") else "")
    if kind == "command":
        return f"{data['command']} by {data.get('by', '?')}"
    if kind == "created":
        image = data.get("image", {})
        return (
            f"created by {data.get('by', '?')}: {image.get('name')} {image.get('version')} "
            f"to {len(data.get('inventory', []))} node(s), policy {data.get('policy_name')}"
        )
    if kind == "batch_started":
        return f"batch {data['batch']} started"
    if kind == "gate":
        return _gate_line(data)
    if kind == "batch_finished":
        return f"batch {data['batch']} finished: {data['failed']} failed, {data['decision']}"
    return f"{kind} {json.dumps(data, sort_keys=True)}"


def _gate_line(g: dict[str, Any]) -> str:
    """One journaled gate event, as `rollout show` and `history` print it."""
    event, gate = g.get("event"), g.get("gate")
    if event == "waiting":
        until = f" until {g['until']}" if g.get("until") else ""
        since = g.get("since")
        return f"gate {gate} ({g.get('kind')}) waiting since {since}{until}: {g.get('reason')}"
    if event in ("received_signal", "signal"):
        s = g.get("signal", {})
        verb = "received" if event == "received_signal" else "counted"
        return (
            f"gate {gate}: signal {s.get('id')} {s.get('status')} {verb}"
            f" reason={s.get('reason')!r} data={s.get('data')!r}"
        )
    if event in ("received_decision", "approval"):
        verdict = "approved" if g.get("approved") else "rejected"
        return f"gate {gate}: {verdict} by {g.get('by')} {g.get('reason') or ''}".rstrip()
    if event == "measured":
        m = g.get("measurement", {})
        return f"gate {gate}: measured {m.get('values')} -> {m.get('phase')}"
    if event == "finished":
        return f"gate {gate} ({g.get('kind')}) {g.get('result')}: {g.get('message')}"
    return f"gate {gate}: {json.dumps(g, sort_keys=True)}"


def register(main: click.Group) -> None:
    """Add the service and client commands to the CLI group."""

    @main.command()
    @click.option("--state", "state_path", required=True, type=click.Path(dir_okay=False))
    @click.option("--listen", default="127.0.0.1:7400", show_default=True)
    @click.option("--token-file", required=True, type=click.Path(dir_okay=False))
    @click.option("--log-format", type=click.Choice(["console", "json"]), default="console")
    @click.option(
        "--tls-cert",
        type=click.Path(dir_okay=False),
        help="PEM certificate: serve HTTPS only (needs --tls-key).",
    )
    @click.option("--tls-key", type=click.Path(dir_okay=False), help="PEM private key.")
    @trusted_key_option(
        "every rollout's image must be signed by one (400 otherwise); repeat for several."
    )
    @registry_options
    def serve(
        state_path: str,
        listen: str,
        token_file: str,
        log_format: str,
        tls_cert: str | None,
        tls_key: str | None,
        trusted_keys: tuple[str, ...],
        pull: PullAccess,
    ) -> None:
        """Run the controller service: rollouts over HTTP(S), resumed after restarts.

        Rollouts whose image is an oci:// reference reach the registry as the registry
        options say."""
        from aiohttp import web

        from rollout.console import configure_logging
        from rollout.controller import Controller
        from rollout.inventory import split_address
        from rollout.journal import SQLiteStore
        from rollout.metrics import MetricsRecorder
        from rollout.server import make_app, service_observers

        try:
            host, port = split_address(listen)
        except ValueError as exc:
            raise InputError(f"--listen: {exc}") from exc
        token = token_from(token_file)
        ssl_context = optional_server_context(tls_cert, tls_key)
        from rollout.signing import load_keys

        load_keys(trusted_keys)  # unreadable or not ed25519: exit 2 now
        configure_logging(log_format)
        store = SQLiteStore(state_path)
        recorder = MetricsRecorder()
        controller = Controller(store, observer_for=service_observers(recorder))
        try:
            controller.signal_key.key()  # <state>.signal-key: unusable -> exit 2 now
            web.run_app(
                make_app(controller, token, recorder, trusted_keys=trusted_keys, pull=pull),
                host=host,
                port=port,
                ssl_context=ssl_context,
                print=None,
                handle_signals=True,
                access_log=None,  # request lines carry signal secrets: never logged
            )
        finally:
            store.close()

    @main.command()
    @server_options
    @click.option("--inventory", required=True, type=click.Path(dir_okay=False))
    @click.option("--policy", required=True, type=click.Path(dir_okay=False))
    @click.option(
        "--image",
        required=True,
        help="An image file on the controller, or oci://REGISTRY/REPO:TAG|@sha256:... or "
        "an https:// URL the nodes pull.",
    )
    @click.option("--node", "nodes", multiple=True, help="Only this node id (repeatable).")
    @click.option("--label", "labels", multiple=True, help="Only nodes with KEY=VALUE.")
    def start(
        server: str,
        token_file: str | None,
        ca_file: str | None,
        state_file: str | None,
        inventory: str,
        policy: str,
        image: str,
        nodes: tuple[str, ...],
        labels: tuple[str, ...],
    ) -> None:
        """Start a rollout on the service; print its id. Paths are read by the service."""
        selected: dict[str, str] = {}
        for item in labels:
            key, sep, value = item.partition("=")
            if not sep:
                raise InputError(f"--label: expected KEY=VALUE, got {item!r}")
            selected[key] = value
        body: dict[str, Any] = {
            "inventory": str(Path(inventory).resolve()),
            "policy": str(Path(policy).resolve()),
            "image": image if is_remote(image) else str(Path(image).resolve()),
        }
        if nodes:
            body["nodes"] = list(nodes)
        if selected:
            body["labels"] = selected
        answer = _run(_client(server, token_file, ca_file, state_file).create(body))
        click.echo(answer["id"])

    @main.command("ls")
    @server_options
    @click.option("--output", type=click.Choice(["table", "json"]), default="table")
    def ls(
        server: str,
        token_file: str | None,
        ca_file: str | None,
        state_file: str | None,
        output: str,
    ) -> None:
        """List the service's rollouts."""
        answer = _run(_client(server, token_file, ca_file, state_file).rollouts())
        if output == "json":
            click.echo(json.dumps(answer, indent=2))
            return
        rows = [
            {
                "id": r["id"],
                "phase": r["phase"],
                "image": r["image"].get("version"),
                "batch": f"{r['batch']}/{r['batches']}",
                "nodes": r["nodes"],
                "committed": r["counts"].get("committed", 0),
                "started": _ts(r["started_at"]),
            }
            for r in answer["rollouts"]
        ]
        if not rows:
            click.echo("no rollouts")
            return
        make_console().print(node_table(rows, "rollouts"))

    @main.command()
    @server_options
    @click.argument("rollout_id")
    @click.option("--output", type=click.Choice(["table", "json"]), default="table")
    def show(
        server: str,
        token_file: str | None,
        ca_file: str | None,
        state_file: str | None,
        rollout_id: str,
        output: str,
    ) -> None:
        """Show one rollout: phase, batch, every node, commands, gates and each wait gate's
        signal URL."""
        answer = _run(_client(server, token_file, ca_file, state_file).rollout(rollout_id))
        if output == "json":
            click.echo(json.dumps(answer, indent=2))
            return
        console = make_console()
        console.print(
            f"rollout {answer['id']}: [bold]{answer['phase']}[/] batch {answer['batch']}/"
            f"{answer['batches']}  {answer['image'].get('name')} {answer['image'].get('version')}"
            + (f"\n{answer['message']}" if answer.get("message") else ""),
            soft_wrap=True,
        )
        rows = [
            {
                "node": n["id"],
                "batch": n.get("batch", ""),
                "phase": n["phase"],
                "version": n.get("version"),
                "reason": n.get("reason") or "",
                "detail": n.get("detail", ""),
            }
            for n in answer["nodes"]
        ]
        console.print(node_table(rows, "nodes"))
        for gate in answer.get("gates", []):
            console.print(f"{_ts(gate['ts'])}  {_gate_line(gate)}", soft_wrap=True)
        for gate, url in answer.get("signal_urls", {}).items():  # token holders only
            console.print(
                f"gate {gate} signal URL (cfn-signal URL, or PUT/POST it; the URL is the "
                f"credential): {url}",
                soft_wrap=True, markup=False, highlight=False,
            )  # fmt: skip

    @main.command()
    @server_options
    @click.argument("rollout_id")
    def watch(
        server: str,
        token_file: str | None,
        ca_file: str | None,
        state_file: str | None,
        rollout_id: str,
    ) -> None:
        """Follow a rollout live until it finishes; exit 0 if it succeeded."""
        if state_file:
            raise InputError("--state: watch follows a live rollout; use --server")
        client = Client(server, token_from(token_file), ca_file)
        console = make_console()

        async def follow() -> str:
            phase = ""
            async for entry in client.stream(rollout_id):
                console.print(f"{_ts(entry['ts'])}  {_describe(entry)}", soft_wrap=True)
                if entry["kind"] == "phase":
                    phase = entry["data"]["phase"]
            return phase

        phase = _run(follow())
        sys.exit(0 if phase == "succeeded" else 1)

    @main.command()
    @server_options
    @click.argument("rollout_id")
    @click.option("--output", type=click.Choice(["table", "json"]), default="table")
    def history(
        server: str,
        token_file: str | None,
        ca_file: str | None,
        state_file: str | None,
        rollout_id: str,
        output: str,
    ) -> None:
        """Print the rollout's journal with timestamps: who did what, when."""
        answer = _run(_client(server, token_file, ca_file, state_file).events(rollout_id))
        if output == "json":
            click.echo(json.dumps(answer, indent=2))
            return
        for entry in answer["events"]:
            click.echo(f"{_ts(entry['ts'])}  #{entry['seq']:<5} {_describe(entry)}")

    @main.command()
    @server_options
    @click.argument("rollout_id")
    @click.argument("gate")
    @click.option("--status", type=click.Choice(["SUCCESS", "FAILURE"]), default="SUCCESS",
                  show_default=True)  # fmt: skip
    @click.option("--reason", default="", help="Why (shown in rollout show).")
    @click.option("--data", default="", help="Data for the gate (journaled).")
    @click.option("--id", "signal_id", help="Unique id; `count` needs that many distinct ids.")
    def signal(
        server: str,
        token_file: str | None,
        ca_file: str | None,
        state_file: str | None,
        rollout_id: str,
        gate: str,
        status: str,
        reason: str,
        data: str,
        signal_id: str | None,
    ) -> None:
        """Send a wait-condition signal to GATE (as Heat's wait condition handle would)."""
        body = {"status": status, "reason": reason, "data": data}
        if signal_id:
            body["id"] = signal_id
        client = _client(server, token_file, ca_file, state_file)
        answer = _run(client.gate(rollout_id, gate, "signal", body))
        click.echo(f"signal {answer['signal']['id']} {answer['signal']['status']} on {gate}")

    def make_decision(verdict: str, doc: str) -> None:
        @main.command(verdict, help=doc)
        @server_options
        @click.argument("rollout_id")
        @click.argument("gate")
        @click.option("--by", default=lambda: os.environ.get("USER", "cli"), show_default="$USER")
        @click.option("--reason", default="")
        def cmd(
            server: str,
            token_file: str | None,
            ca_file: str | None,
            state_file: str | None,
            rollout_id: str,
            gate: str,
            by: str,
            reason: str,
        ) -> None:
            client = _client(server, token_file, ca_file, state_file)
            answer = _run(client.gate(rollout_id, gate, verdict, {"by": by, "reason": reason}))
            click.echo(answer["message"])

    make_decision("approve", "Approve GATE (an approval gate or an inconclusive analysis).")
    make_decision("reject", "Reject GATE: the gate fails and the policy's failure action follows.")

    def make_command(name: str, doc: str) -> None:
        @main.command(name, help=doc)
        @server_options
        @click.argument("rollout_id")
        @click.option("--by", default=lambda: os.environ.get("USER", "cli"), show_default="$USER")
        def cmd(
            server: str,
            token_file: str | None,
            ca_file: str | None,
            state_file: str | None,
            rollout_id: str,
            by: str,
        ) -> None:
            client = _client(server, token_file, ca_file, state_file)
            answer = _run(client.command(rollout_id, name, {"by": by}))
            click.echo(answer["message"])

    for name, doc in (
        ("pause", "Pause: no new batch, stage or activation starts until resumed."),
        ("resume", "Resume a paused rollout."),
        ("abort", "Abort: start nothing new; nodes in flight settle."),
        ("retry", "Continue a halted, aborted or failed rollout, retrying failed nodes."),
        ("rollback", "Return every node this rollout updated to its previous image."),
    ):
        make_command(name, doc)
