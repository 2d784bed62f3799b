"""The controller service: `rollout serve`, an HTTP API over the Controller.

Thin by design: handlers validate, call the Controller, and shape JSON. Every endpoint
but `GET /healthz`, `GET /v1/openapi.json` and the wait gates' pre-signed signal URLs
needs `Authorization: Bearer <token>` (compared in constant time, never logged); the
ordinary signal path also takes the token as `X-Auth-Token: <token>`, as Heat-native
clients send it. Errors are JSON `{"error", "message"}` (plus `field` for 400, and
`holder`, `nodes`, `expires_at`, `expires_in` for lock conflicts): 400 malformed, 401 no
token, 404 unknown rollout (or a signal URL that is not one), 409 illegal transition or
overlapping rollout; none of them changes state.

Pre-signed signal URLs (rollout.gates.handles): `PUT` or `POST
/v1/rollouts/{id}/gates/{gate}/signal/{secret}` with no Authorization header, what
`cfn-signal URL` sends. A wrong secret, rollout or gate is one and the same 404. The
URLs are shown only in token-authenticated answers (`GET /v1/rollouts/{id}`, the 201 of
`POST /v1/rollouts`) as `signal_urls`; the access log is off, so no request line (and no
secret in it) is ever logged.

`GET /v1/rollouts/{id}/events` returns the journal; with `Accept: text/event-stream` it
is a Server-Sent Events stream that first replays the journal and then follows it live
(each event's `id:` is the journal seq, so `Last-Event-ID` resumes a dropped stream).

On start the service resumes every unfinished rollout in its state file.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from rollout import __version__
from rollout.console import EventLog
from rollout.controller import (
    Controller,
    IllegalCommand,
    UnknownGate,
    UnknownRollout,
    UnknownSignalURL,
)
from rollout.errors import InputError
from rollout.events import Fanout, Observer
from rollout.httpauth import bearer_ok
from rollout.inventory import load_inventory, parse_inventory
from rollout.journal import LockConflict, unfinished
from rollout.metrics import MetricsRecorder
from rollout.policy import load_policy, parse_policy
from rollout.pull import PullAccess, is_remote, resolve_image
from rollout.signing import load_signed_image

log = structlog.get_logger("rollout.server")

CONTROLLER = web.AppKey("controller", Controller)
TOKEN = web.AppKey("token", bytes)
RECORDER = web.AppKey("recorder", MetricsRecorder)
TRUSTED: web.AppKey[tuple[str, ...]] = web.AppKey("trusted_keys", tuple)
PULL = web.AppKey("pull", PullAccess)
COMMANDS = ("pause", "resume", "abort", "retry", "rollback")
SSE_POLL = 0.2  # seconds between journal reads while following a stream
SIGNAL_ROUTE = "gate-signal"  # the ordinary, token-authenticated signal path
PRESIGNED_ROUTE = "gate-signal-presigned"  # .../signal/{secret}: the secret authenticates


# A file path on the controller: not empty, no NUL byte (the OS refuses it), bounded.
FilePath = Annotated[str, StringConstraints(min_length=1, max_length=4096, pattern=r"^[^\x00]+$")]


class StartRequest(BaseModel):
    """Body of POST /v1/rollouts."""

    model_config = ConfigDict(extra="forbid")

    inventory: FilePath | dict[str, Any] = Field(
        description="Path of an inventory file on the controller, or an inventory object."
    )
    nodes: list[str] | None = Field(
        default=None, description="Only these node ids of the inventory (default: all)."
    )
    labels: dict[str, str] | None = Field(
        default=None, description="Only nodes whose labels include all of these."
    )
    policy: FilePath | dict[str, Any] = Field(
        description="Path of a policy file on the controller, or a policy object."
    )
    image: FilePath = Field(
        description="Path of an image file on the controller (pushed to the nodes), or "
        "oci://HOST[:PORT]/REPO:TAG|@sha256:... or an https:// URL (the nodes pull it)."
    )


class CommandAnswer(BaseModel):
    id: str
    command: str
    message: str


class ErrorAnswer(BaseModel):
    error: str
    message: str
    field: str | None = Field(default=None, description="400: the culprit field")
    holder: str | None = Field(default=None, description="409 conflict: the holding rollout")
    nodes: list[str] | None = Field(
        default=None, description="409 conflict: the nodes that rollout holds"
    )
    expires_at: str | None = Field(
        default=None,
        description="409 conflict: when the holder's lock lapses unless its controller "
        "renews it (UTC, ISO 8601)",
    )
    expires_in: float | None = Field(default=None, description="409 conflict: seconds to then")


def _error(status: int, code: str, message: str, **extra: Any) -> web.Response:
    body = {"error": code, "message": message} | {
        k: v for k, v in extra.items() if v is not None and v != ""
    }
    return web.json_response(body, status=status)


def x_auth_token_ok(value: str, token: bytes) -> bool:
    """True when an `X-Auth-Token` header value is exactly `token` (constant time).

    >>> x_auth_token_ok("s3cret", b"s3cret"), x_auth_token_ok(" s3cret ", b"s3cret")
    (True, True)
    >>> x_auth_token_ok("Bearer s3cret", b"s3cret"), x_auth_token_ok("", b"")
    (False, False)
    """
    given = value.strip().encode("utf-8", "replace")
    return bool(given) and hmac.compare_digest(given, token)


@web.middleware
async def _auth(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    if request.path in ("/healthz", "/v1/openapi.json"):
        return await handler(request)
    route = (request.match_info.route.name or "").rpartition("-")[0]  # name-METHOD
    if route == PRESIGNED_ROUTE:
        return await handler(request)  # the secret in the path is the credential
    token = request.app[TOKEN]
    if route == SIGNAL_ROUTE and x_auth_token_ok(request.headers.get("X-Auth-Token", ""), token):
        return await handler(request)
    if not bearer_ok(request.headers.get("Authorization", ""), token):
        resp = _error(401, "unauthorized", "missing or wrong bearer token")
        resp.headers["WWW-Authenticate"] = "Bearer"
        return resp
    return await handler(request)


@web.middleware
async def _errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except UnknownRollout as exc:
        return _error(404, "not_found", f"no rollout {exc.args[0]!r}")
    except UnknownGate as exc:
        return _error(404, "not_found", str(exc))
    except UnknownSignalURL as exc:
        return _error(404, "not_found", str(exc))
    except IllegalCommand as exc:
        return _error(409, "illegal", str(exc))
    except LockConflict as exc:
        return _error(
            409, "conflict", str(exc), holder=exc.holder, nodes=list(exc.nodes),
            expires_at=exc.until, expires_in=round(exc.expires_in, 1),
        )  # fmt: skip
    except InputError as exc:
        return _error(400, "bad_request", str(exc))
    except web.HTTPException as exc:
        if exc.status >= 400:
            answer = _error(exc.status, exc.reason.lower().replace(" ", "_"), exc.reason)
            if isinstance(exc, web.HTTPMethodNotAllowed):  # RFC 9110: say what is allowed
                answer.headers["Allow"] = ", ".join(sorted(exc.allowed_methods))
            return answer
        raise


def _signal_urls(request: web.Request, rollout_id: str) -> dict[str, str]:
    """Each wait gate's pre-signed URL, on the origin the caller reached this API by."""
    origin = str(request.url.origin())
    paths = request.app[CONTROLLER].signal_paths(rollout_id)
    return {gate: origin + path for gate, path in paths.items()}


async def _json_body(request: web.Request) -> Any:
    try:
        return await request.json()
    except ValueError:
        raise _Bad("body", "the body is not JSON") from None


class _Bad(Exception):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _from_input_error(exc: InputError, field: str) -> _Bad:
    # InputError messages read "<source>: <field path>: <problem>".
    parts = str(exc).split(": ", 2)
    path = parts[1] if len(parts) == 3 else ""
    return _Bad(f"{field}.{path}" if path and " " not in path else field, str(exc))


async def create_rollout(request: web.Request) -> web.Response:
    controller = request.app[CONTROLLER]
    try:
        body = await _json_body(request)
        try:
            req = StartRequest.model_validate(body)
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            # A field that is a path or an object: pydantic names the union member too.
            loc = [str(p) for p in first["loc"] if p not in ("constrained-str", "dict[str,any]")]
            field = ".".join(loc) or "body"
            raise _Bad(field, f"{field}: {first['msg']}") from None
        try:
            inv = (
                load_inventory(req.inventory)
                if isinstance(req.inventory, str)
                else parse_inventory(req.inventory, "inventory", Path.cwd())
            )
        except InputError as exc:
            raise _from_input_error(exc, "inventory") from None
        nodes = list(inv.nodes)
        if req.nodes is not None:
            unknown = sorted(set(req.nodes) - set(inv.ids))
            if unknown:
                raise _Bad("nodes", f"nodes: not in the inventory: {', '.join(unknown)}")
            nodes = [n for n in nodes if n.id in set(req.nodes)]
        if req.labels:
            nodes = [n for n in nodes if all(n.labels.get(k) == v for k, v in req.labels.items())]
        if not nodes:
            raise _Bad("nodes", "the selection matches no node")
        try:
            policy = (
                load_policy(req.policy)
                if isinstance(req.policy, str)
                else parse_policy(req.policy, "policy")
            )
        except InputError as exc:
            raise _from_input_error(exc, "policy") from None
        try:
            # IMAGE.sig travels with it; with trusted keys it must verify (400 otherwise).
            trusted: tuple[str, ...] = request.app[TRUSTED]
            pull = replace(request.app[PULL], mirrors=inv.mirrors)
            if is_remote(req.image):  # pull mode: a tag is resolved to its digest now
                image = await resolve_image(req.image, pull, trusted)
            else:
                image = load_signed_image(req.image, trusted)
        except InputError as exc:
            raise _Bad("image", str(exc)) from None
    except _Bad as bad:
        return _error(400, "bad_request", str(bad), field=bad.field)
    name = Path(req.policy).stem if isinstance(req.policy, str) else "inline"
    try:
        # Every node's agent lease first: a rollout of another controller (or of this one)
        # over these nodes is a 409 naming it, and nothing is journaled or locked.
        state = await controller.create_claimed(
            nodes, policy, image, policy_name=name, by="api", pull=pull
        )
    except LockConflict:
        raise
    except InputError as exc:  # a node's token or CA file, or its agent refused the token
        return _error(400, "bad_request", str(exc), field="inventory")
    controller.start(state.rollout_id)
    log.info("rollout_created", rollout=state.rollout_id, nodes=len(nodes), image=image.version)
    answer = state.to_json(detail=False, signal_urls=_signal_urls(request, state.rollout_id))
    return web.json_response(answer, status=201)


async def list_rollouts(request: web.Request) -> web.Response:
    states = request.app[CONTROLLER].states()
    return web.json_response({"rollouts": [s.summary() for s in states]})


async def get_rollout(request: web.Request) -> web.Response:
    state = request.app[CONTROLLER].state(request.match_info["id"])
    urls = _signal_urls(request, state.rollout_id)
    return web.json_response(state.to_json(detail=True, signal_urls=urls))


async def command(request: web.Request) -> web.Response:
    rollout_id, name = request.match_info["id"], request.match_info["command"]
    controller = request.app[CONTROLLER]
    controller.state(rollout_id)  # 404 before anything else
    if name not in COMMANDS:
        return _error(404, "not_found", f"no command {name!r}; one of {', '.join(COMMANDS)}")
    if request.can_read_body:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "bad_request", "the body is not JSON", field="body")
        if not isinstance(body, dict) or set(body) - {"by"}:
            return _error(400, "bad_request", 'the body may only hold {"by": "..."}', field="body")
        by = str(body.get("by") or "api")
    else:
        by = "api"
    message = controller.command(rollout_id, name, by=by)
    return web.json_response(
        CommandAnswer(id=rollout_id, command=name, message=message).model_dump(), status=202
    )


async def _signal_body(request: web.Request) -> Any:
    """The decoded body of a signal; None for an empty one (Heat: a bare POST is SUCCESS).
    Read whatever the Content-Type says: `cfn-signal` sends none."""
    raw = await request.read()
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except ValueError:
        raise _Bad("body", "the body is not JSON") from None


async def _take_signal(request: web.Request, secret: str | None) -> web.Response:
    controller = request.app[CONTROLLER]
    rollout_id, gate = request.match_info["id"], request.match_info["gate"]
    if secret is None:
        controller.state(rollout_id)
    else:  # before anything else, and one answer for whichever part is wrong
        controller.check_signal_secret(rollout_id, gate, secret)
    try:
        body = await _signal_body(request)
    except _Bad as bad:
        return _error(400, "bad_request", str(bad), field=bad.field)
    try:
        if secret is None:
            sig = controller.signal(rollout_id, gate, body)
        else:
            sig = controller.signal_by_secret(rollout_id, gate, secret, body)
    except ValueError as exc:
        field = str(exc).split(":", 1)[0] if ":" in str(exc) else "body"
        return _error(400, "bad_request", str(exc), field=field)
    return web.json_response({"id": rollout_id, "gate": gate, "signal": sig.to_json()})


async def gate_signal(request: web.Request) -> web.Response:
    """A Heat wait-condition signal: native or CloudFormation body (token-authenticated)."""
    return await _take_signal(request, None)


async def gate_signal_presigned(request: web.Request) -> web.Response:
    """The same through the gate's pre-signed URL: no Authorization, the secret is it."""
    return await _take_signal(request, request.match_info["secret"])


async def gate_decision(request: web.Request) -> web.Response:
    """Approve or reject an approval gate (or an inconclusive analysis)."""
    controller = request.app[CONTROLLER]
    rollout_id, gate = request.match_info["id"], request.match_info["gate"]
    verdict = request.match_info["verdict"]
    controller.state(rollout_id)
    body: Any = {}
    if request.can_read_body:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "bad_request", "the body is not JSON", field="body")
    if not isinstance(body, dict) or set(body) - {"by", "reason"}:
        return _error(400, "bad_request", 'the body may hold {"by", "reason"}', field="body")
    message = controller.decide(
        rollout_id, gate, verdict == "approve", str(body.get("by") or "api"),
        str(body.get("reason") or ""),
    )  # fmt: skip
    return web.json_response({"id": rollout_id, "gate": gate, "message": message})


async def events(request: web.Request) -> web.StreamResponse:
    controller = request.app[CONTROLLER]
    rollout_id = request.match_info["id"]
    controller.state(rollout_id)
    try:
        after = int(request.headers.get("Last-Event-ID") or request.query.get("after", "0"))
    except ValueError:
        return _error(400, "bad_request", "after: expected a journal seq", field="after")
    if "text/event-stream" not in request.headers.get("Accept", ""):
        entries = controller.store.entries(rollout_id, after)
        return web.json_response({"events": [e.to_json() for e in entries]})
    resp = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await resp.prepare(request)
    while True:
        for entry in controller.store.entries(rollout_id, after):
            data = json.dumps(entry.to_json())
            await resp.write(f"id: {entry.seq}\nevent: {entry.kind}\ndata: {data}\n\n".encode())
            after = entry.seq
        task = controller.tasks.get(rollout_id)
        if controller.state(rollout_id).finished and (task is None or task.done()):
            await resp.write(b"event: end\ndata: {}\n\n")
            break
        await asyncio.sleep(SSE_POLL)
    return resp


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[RECORDER].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"ok": True, "version": __version__})


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document())


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 description of this API (request schemas from the pydantic models)."""
    err = {"$ref": "#/components/schemas/ErrorAnswer"}

    def answers(
        ok: int,
        schema: dict[str, Any],
        *codes: int,
        auth: bool = True,
        reasons: dict[int, str] | None = None,
    ) -> dict[str, Any]:
        out: dict[str, Any] = {
            str(ok): {"description": "ok", "content": {"application/json": {"schema": schema}}}
        }
        for c in (401, *codes) if auth else codes:
            out[str(c)] = {
                "description": (reasons or {}).get(c, _REASONS[c]),
                "content": {"application/json": {"schema": err}},
            }
        return out

    rollout = {
        "type": "object",
        "description": "A rollout: id, phase, batch, counts, nodes; "
        "signal_urls: each wait gate's pre-signed signal URL (its secret included)",
    }
    id_param = [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}]
    paths: dict[str, Any] = {
        "/healthz": {"get": {"summary": "Liveness (no auth)", "security": [],
                             "responses": {"200": {"description": "ok"}}}},
        "/metrics": {"get": {"summary": "Prometheus metrics",
                             "responses": {"200": {"description": "text exposition"},
                                           "401": {"description": _REASONS[401], "content": {
                                               "application/json": {"schema": err}}}}}},
        "/v1/rollouts": {
            "post": {
                "summary": "Create and start a rollout",
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/StartRequest"}}}},
                "responses": answers(201, rollout, 400, 409),
            },
            "get": {"summary": "List rollouts", "responses": answers(200, {"type": "object"})},
        },
        "/v1/rollouts/{id}": {"get": {"summary": "One rollout with per-node states",
                                      "parameters": id_param,
                                      "responses": answers(200, rollout, 404)}},
        "/v1/rollouts/{id}/events": {"get": {
            "summary": "The journal; Server-Sent Events with Accept: text/event-stream",
            "parameters": [*id_param, {"name": "after", "in": "query",
                                       "schema": {"type": "integer"}}],
            "responses": answers(200, {"type": "object"}, 404)}},
    }  # fmt: skip
    gate_param = [*id_param, {"name": "gate", "in": "path", "required": True,
                              "schema": {"type": "string"}}]  # fmt: skip
    signal_body = {"required": False, "content": {"application/json": {"schema": {
        "type": "object",
        "description": 'Heat: {"status": "SUCCESS"|"FAILURE", "reason", "data", "id"} '
        '(every key optional; an empty body is a SUCCESS); CloudFormation: {"Status", '
        '"Reason", "UniqueId", "Data"}. Read whatever the Content-Type says.'}}}}  # fmt: skip
    signal_answer = {"type": "object", "properties": {
        "id": {"type": "string"}, "gate": {"type": "string"},
        "signal": {"type": "object"}}}  # fmt: skip
    token_signal = {
        "summary": "Signal a wait-condition gate (Heat or CloudFormation body); the token "
        "as Authorization: Bearer or X-Auth-Token",
        "parameters": gate_param,
        "security": [{"bearer": []}, {"xAuthToken": []}],
        "requestBody": signal_body,
        "responses": answers(200, signal_answer, 400, 404, 409),
    }
    paths["/v1/rollouts/{id}/gates/{gate}/signal"] = {
        "post": token_signal, "put": dict(token_signal)}  # fmt: skip
    secret_param = {"name": "secret", "in": "path", "required": True,
                    "schema": {"type": "string"},
                    "description": "The gate's own secret, from signal_urls"}  # fmt: skip
    presigned = {
        "summary": "Signal a wait-condition gate by its pre-signed URL (as cfn-signal does: "
        "PUT, CloudFormation body, no Authorization header)",
        "parameters": [*gate_param, secret_param],
        "security": [],
        "requestBody": signal_body,
        "responses": answers(
            200, signal_answer, 400, 404, 409, auth=False,
            reasons={404: "not a signal URL: wrong secret, rollout or gate (one answer for "
                     "all), with nothing changed",
                     409: "the rollout has finished; signals are no longer taken"},
        ),
    }  # fmt: skip
    paths["/v1/rollouts/{id}/gates/{gate}/signal/{secret}"] = {
        "put": presigned, "post": dict(presigned)}  # fmt: skip
    for verdict in ("approve", "reject"):
        paths[f"/v1/rollouts/{{id}}/gates/{{gate}}/{verdict}"] = {
            "post": {
                "summary": f"{verdict.capitalize()} an approval gate or inconclusive analysis",
                "parameters": gate_param,
                "requestBody": {"required": False, "content": {"application/json": {
                    "schema": {"type": "object", "properties": {
                        "by": {"type": "string"}, "reason": {"type": "string"}},
                        "additionalProperties": False}}}},
                "responses": answers(200, {"type": "object"}, 400, 404, 409),
            }
        }  # fmt: skip
    for name in COMMANDS:
        paths[f"/v1/rollouts/{{id}}/{name}"] = {
            "post": {
                "summary": f"{name.capitalize()} the rollout",
                "parameters": id_param,
                "requestBody": {"required": False, "content": {"application/json": {
                    "schema": {"type": "object", "properties": {"by": {"type": "string"}},
                               "additionalProperties": False}}}},
                "responses": answers(
                    202, {"$ref": "#/components/schemas/CommandAnswer"}, 400, 404, 409
                ),
            }
        }  # fmt: skip
    return {
        "openapi": "3.1.0",
        "info": {"title": "rollout controller API", "version": __version__},
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "xAuthToken": {"type": "apiKey", "in": "header", "name": "X-Auth-Token"},
            },
            "schemas": {
                "StartRequest": StartRequest.model_json_schema(),
                "CommandAnswer": CommandAnswer.model_json_schema(),
                "ErrorAnswer": ErrorAnswer.model_json_schema(),
            },
        },
    }


_REASONS = {
    400: "malformed request (field names the culprit)",
    401: "missing or wrong bearer token",
    404: "unknown rollout (or gate)",
    409: "illegal transition, or nodes held by another rollout (of this controller or "
    "another one): holder, nodes, expires_at",
}


def service_observers(recorder: MetricsRecorder) -> Callable[[str], Observer]:
    """What each rollout of the service reports to: its metrics and the event log. Give
    it to the Controller the service runs (`Controller(store, observer_for=...)`)."""
    log_events = EventLog()

    def observer_for(rollout_id: str) -> Observer:
        return Fanout([recorder.bound(rollout_id), log_events.bound(rollout_id)])

    return observer_for


def make_app(
    controller: Controller,
    token: str,
    recorder: MetricsRecorder,
    service: bool = True,
    trusted_keys: tuple[str, ...] = (),
    pull: PullAccess | None = None,
) -> web.Application:
    """The API app. `service=False` is `rollout run --listen`: the same API beside one
    foreground rollout, which keeps its own observers and is not resumed by the app."""
    app = web.Application(middlewares=[_errors, _auth])
    app[CONTROLLER] = controller
    app[TOKEN] = token.encode()
    app[RECORDER] = recorder
    app[TRUSTED] = trusted_keys
    app[PULL] = pull or PullAccess()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/openapi.json", openapi)
    app.router.add_post("/v1/rollouts", create_rollout)
    app.router.add_get("/v1/rollouts", list_rollouts)
    app.router.add_get("/v1/rollouts/{id}", get_rollout)
    app.router.add_get("/v1/rollouts/{id}/events", events)
    signal_path = "/v1/rollouts/{id}/gates/{gate}/signal"
    for method in ("POST", "PUT"):  # Heat clients POST, cfn-signal PUTs
        app.router.add_route(method, signal_path, gate_signal, name=f"{SIGNAL_ROUTE}-{method}")
        app.router.add_route(
            method, signal_path + "/{secret}", gate_signal_presigned,
            name=f"{PRESIGNED_ROUTE}-{method}",
        )  # fmt: skip
    app.router.add_post("/v1/rollouts/{id}/gates/{gate}/{verdict:approve|reject}", gate_decision)
    # Only the commands: a catch-all would also claim e.g. POST .../events (405 Allow).
    app.router.add_post(f"/v1/rollouts/{{id}}/{{command:{'|'.join(COMMANDS)}}}", command)

    async def resume_unfinished(app: web.Application) -> None:
        for state in unfinished(controller.store):
            log.info("resuming", rollout=state.rollout_id, phase=str(state.phase))
            controller.start(state.rollout_id)

    async def stop_tasks(app: web.Application) -> None:
        for task in controller.tasks.values():
            task.cancel()
        await asyncio.gather(*controller.tasks.values(), return_exceptions=True)

    if service:
        app.on_startup.append(resume_unfinished)
        app.on_cleanup.append(stop_tasks)
    return app
