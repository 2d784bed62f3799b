"""CLI client of the controller service: start, ls, show, watch, pause, resume, abort,
retry, rollback, history; and `serve` itself.

The server's URL comes from `--server` or ROLLOUT_SERVER; the token from `--token-file`,
ROLLOUT_TOKEN_FILE or ROLLOUT_TOKEN. An https:// server's certificate is verified against
`--ca-file` (or ROLLOUT_CA_FILE), else against the system trust store; there is no way to
skip verification, and `--ca-file` with an http:// URL is refused rather than sending the
token in the clear. Exit codes follow the CLI contract: 0 done; 1 the rollout did not
succeed (or the server could not be reached); 2 bad input, which includes what the server
refused (400, 401, 404, 409) and a server certificate that does not verify.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import ssl
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import click

from rollout.cliopts import registry_options
from rollout.console import make_console, node_table
from rollout.errors import InputError
from rollout.model import FINISHED
from rollout.pull import PullAccess, is_remote
from rollout.tls import certificate_problem, client_context, optional_server_context
from rollout.tokens import read_token

DEFAULT_SERVER = "http://127.0.0.1:7400"
FINAL = frozenset(str(p) for p in FINISHED)


class ServerError(Exception):
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(body.get("message", f"HTTP {status}"))
        self.status = status
        self.body = body


class Client:
    def __init__(self, server: str, token: str, ca_file: str | None = None) -> None:
        self.server = server.rstrip("/")
        self.token = token
        scheme = self.server.partition("://")[0].lower()
        if scheme not in ("http", "https"):
            raise InputError(f"--server: expected an http:// or https:// URL, got {server!r}")
        if ca_file is not None and scheme != "https":
            raise InputError(
                f"--ca-file: the server URL {server} is not https://; the token would go in "
                "the clear (use https://, or drop --ca-file / ROLLOUT_CA_FILE)"
            )
        # https: verified against ca_file, or the system store; http: unused.
        self.ssl: ssl.SSLContext | bool = client_context(ca_file) if scheme == "https" else True

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} | (extra or {})

    async def call(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        timeout = aiohttp.ClientTimeout(total=30)
        async with (
            aiohttp.ClientSession(timeout=timeout) as http,
            http.request(
                method, self.server + path, json=body, headers=self._headers(), ssl=self.ssl
            ) as r,
        ):
            try:
                data = await r.json(content_type=None)
            except ValueError:
                data = {"message": (await r.text())[:200]}
            if r.status >= 400:
                raise ServerError(r.status, data if isinstance(data, dict) else {})
            return data if isinstance(data, dict) else {}

    # What the commands ask (LocalClient answers the same from a state file).
    async def rollouts(self) -> dict[str, Any]:
        return await self.call("GET", "/v1/rollouts")

    async def rollout(self, rollout_id: str) -> dict[str, Any]:
        return await self.call("GET", f"/v1/rollouts/{rollout_id}")

    async def events(self, rollout_id: str) -> dict[str, Any]:
        return await self.call("GET", f"/v1/rollouts/{rollout_id}/events")

    async def create(self, body: dict[str, Any]) -> dict[str, Any]:
        return await self.call("POST", "/v1/rollouts", body)

    async def command(self, rollout_id: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self.call("POST", f"/v1/rollouts/{rollout_id}/{name}", body)

    async def gate(
        self, rollout_id: str, gate: str, verb: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        """A gate's signal, approve or reject."""
        return await self.call("POST", f"/v1/rollouts/{rollout_id}/gates/{gate}/{verb}", body)

    async def stream(self, rollout_id: str) -> AsyncIterator[dict[str, Any]]:
        """Follow the rollout's journal as Server-Sent Events."""
        timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
        headers = self._headers({"Accept": "text/event-stream"})
        url = f"{self.server}/v1/rollouts/{rollout_id}/events"
        async with (
            aiohttp.ClientSession(timeout=timeout) as http,
            http.get(url, headers=headers, ssl=self.ssl) as r,
        ):
            if r.status >= 400:
                raise ServerError(r.status, await r.json(content_type=None))
            event, data = "", ""
            async for raw in r.content:
                line = raw.decode().rstrip("\n")
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    data = line[6:]
                elif not line and event:
                    if event == "end":
                        return
                    yield json.loads(data)
                    event, data = "", ""


def _token(token_file: str | None) -> str:
    path = token_file or os.environ.get("ROLLOUT_TOKEN_FILE")
    if path:
        return read_token(path, "--token-file")
    token = os.environ.get("ROLLOUT_TOKEN", "").strip()
    if not token:
        raise InputError("no token: pass --token-file F, or set ROLLOUT_TOKEN_FILE / ROLLOUT_TOKEN")
    return token


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


_OFFLINE = "offline (--state) only ls, show, history and abort work; use --server for the rest"


class LocalClient:
    """The client's view of a state file, without a server (for `rollout run` journals).

    Reads answer like the API; `abort` marks an unfinished rollout aborted, but only when
    no live controller holds it (its node locks have expired), so it cannot fight one.
    """

    def __init__(self, path: str) -> None:
        self.path = path

    @contextlib.contextmanager
    def _store(self) -> Iterator[Any]:
        from rollout.journal import SQLiteStore

        store = SQLiteStore(self.path)
        try:
            yield store
        finally:
            store.close()

    def _known(self, store: Any, rollout_id: str) -> None:
        if rollout_id not in store.rollout_ids():
            raise ServerError(404, {"message": f"no rollout {rollout_id!r} in {self.path}"})

    async def rollouts(self) -> dict[str, Any]:
        from rollout.journal import load_state

        with self._store() as store:
            states = [load_state(store, r) for r in store.rollout_ids()]
            return {"rollouts": [s.summary() for s in states]}

    async def rollout(self, rollout_id: str) -> dict[str, Any]:
        from rollout.journal import load_state

        with self._store() as store:
            self._known(store, rollout_id)
            return load_state(store, rollout_id).to_json(detail=True)

    async def events(self, rollout_id: str) -> dict[str, Any]:
        with self._store() as store:
            self._known(store, rollout_id)
            return {"events": [e.to_json() for e in store.entries(rollout_id)]}

    async def command(self, rollout_id: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        with self._store() as store:
            self._known(store, rollout_id)
            if name != "abort":
                raise ServerError(400, {"message": _OFFLINE})
            return self._abort(store, rollout_id, str(body.get("by", "cli")))

    async def create(self, body: dict[str, Any]) -> dict[str, Any]:
        raise ServerError(400, {"message": _OFFLINE})

    async def gate(
        self, rollout_id: str, gate: str, verb: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        raise ServerError(400, {"message": _OFFLINE})

    def _abort(self, store: Any, rollout_id: str, by: str) -> dict[str, Any]:
        import time

        from rollout.controller import Controller, IllegalCommand

        live = store.lock_expiry(rollout_id)  # a running controller keeps renewing it
        if live is not None and live > time.time():
            raise ServerError(
                409,
                {"message": f"a controller is running it (its lock expires in "
                 f"{live - time.time():.0f}s); stop it there (Ctrl-C, or the service API)"},
            )  # fmt: skip
        try:  # the controller's own abort: with no engine running it ends the rollout
            Controller(store).command(rollout_id, "abort", by=by)
        except IllegalCommand as exc:
            raise ServerError(409, {"message": str(exc)}) from None
        return {"id": rollout_id, "command": "abort", "message": "aborted (offline)"}


def _client(
    server: str, token_file: str | None, ca_file: str | None, state_file: str | None
) -> Client | LocalClient:
    if state_file:
        return LocalClient(state_file)
    return Client(server, _token(token_file), ca_file)


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
    @click.option(
        "--trusted-key",
        "trusted_keys",
        multiple=True,
        type=click.Path(dir_okay=False),
        help="ed25519 public key (PEM): every rollout's image must be signed by one "
        "(400 otherwise); repeat for several.",
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
        token = _token(token_file)
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
        client = Client(server, _token(token_file), ca_file)
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
