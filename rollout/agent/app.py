"""The agent's HTTP API (aiohttp): thin handlers over node.Agent.

Every endpoint but `GET /healthz` needs `Authorization: Bearer <token>`; the token is
compared with `hmac.compare_digest` and never logged. Every error is JSON
`{"error": "<code>", "message": "<text>", ...}`; the codes and their HTTP statuses are
listed in `STATUS_OF` and documented in docs/agent-api.md.

Leases: `PUT /v1/lease` takes or renews, `DELETE /v1/lease` releases. The slot-changing
endpoints pass the `X-Rollout-Lease` header to the agent, which refuses them with
`leased` (409) while someone else's lease is live; the check runs before anything else
(before the body is read), so a refused request changes nothing.

`GET /v1/status` answers with an `ETag`; sent back in `If-None-Match` with `?wait=S`, it
makes the request a long poll: answered as soon as the status changes, else `304` after
S seconds. The controller waits for a booted node's workload this way, instead of polling.

Activate and rollback answer 202 first: the handler writes and finishes the response,
and only then starts the switch (which may end this process with a re-exec).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import structlog
from aiohttp import ClientPayloadError, web

from rollout.agent import state as sm
from rollout.agent.fetch import FetchRequest
from rollout.agent.node import DIGEST_RE, Agent
from rollout.agent.openapi import document as openapi_document
from rollout.agent.state import AgentError
from rollout.agent.status import WAIT_MAX, status_tag
from rollout.httpauth import bearer_ok
from rollout.model import ActivationMode

log = structlog.get_logger("rollout.agent.http")

AGENT_KEY = web.AppKey("agent", Agent)
TOKEN_KEY = web.AppKey("token", bytes)
LEASE_HEADER = "X-Rollout-Lease"
RECHECK = 1.0  # a long poll looks at the status at least this often

STATUS_OF: dict[str, int] = {
    "bad_request": 400,
    "upload_incomplete": 400,
    "unauthorized": 401,
    "not_found": 404,
    "method_not_allowed": 405,
    "too_large": 413,
    "busy": 409,
    "leased": 409,
    "nothing_staged": 409,
    "already_booted": 409,
    "not_committed": 409,
    "nothing_to_roll_back": 409,
    "digest_mismatch": 422,
    "bad_image": 422,
    "unsafe_image": 422,
    "incompatible": 422,
    "unsigned": 422,
    "bad_signature": 422,
    "booted_slot": 409,
    "bad_slot": 500,
    "bootloader": 500,
    "internal": 500,
}

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error(code: str, message: str, status: int | None = None, **extra: Any) -> web.Response:
    headers = {"WWW-Authenticate": "Bearer"} if code == "unauthorized" else None
    return web.json_response(
        {"error": code, "message": message, **extra},
        status=status or STATUS_OF.get(code, 400),
        headers=headers,
    )


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except AgentError as exc:
        return error(exc.code, exc.message, **exc.extra)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, "http_error")
        answer = error(code, exc.reason, status=exc.status)
        if isinstance(exc, web.HTTPMethodNotAllowed):  # RFC 9110: say what is allowed
            answer.headers["Allow"] = ", ".join(sorted(exc.allowed_methods))
        return answer
    except Exception as exc:
        log.exception("request_failed", path=request.path, method=request.method)
        return error("internal", f"internal error: {type(exc).__name__}", status=500)


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path in ("/healthz", "/v1/openapi.json"):
        return await handler(request)
    if not bearer_ok(request.headers.get("Authorization", ""), request.app[TOKEN_KEY]):
        log.info("unauthorized", path=request.path, method=request.method, remote=request.remote)
        return error("unauthorized", "missing or wrong bearer token (Authorization: Bearer ...)")
    return await handler(request)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document())


def _wait(request: web.Request) -> float:
    """`?wait=SECONDS` of a status long poll: a number from 0 to WAIT_MAX."""
    raw = request.query.get("wait")
    if raw is None:
        return 0.0
    try:
        wait = float(raw)
    except ValueError:
        wait = -1.0
    if not 0 <= wait <= WAIT_MAX:  # also NaN
        raise AgentError(
            "bad_request", f"wait: expected seconds from 0 to {WAIT_MAX:g}, got {raw!r}",
            field="wait",
        )  # fmt: skip
    return wait


async def status(request: web.Request) -> web.Response:
    """The status with its ETag. With `If-None-Match` naming the current tag, the answer
    waits up to `?wait` seconds for a change (a long poll: the agent wakes its waiters on
    every change, and looks again every RECHECK s for what nothing announces, such as a
    lease running out), then answers `304 Not Modified` if there was none."""
    agent = request.app[AGENT_KEY]
    wait = _wait(request)
    seen = request.headers.get("If-None-Match")
    body = agent.status()
    tag = status_tag(body)
    loop = asyncio.get_running_loop()
    until = loop.time() + wait
    while tag == seen and (left := until - loop.time()) > 0 and not agent.stopping.is_set():
        await agent.next_change(min(left, RECHECK))
        body = agent.status()
        tag = status_tag(body)
    if tag == seen:
        return web.Response(status=304, headers={"ETag": tag})
    return web.json_response(body, headers={"ETag": tag})


def _lease(request: web.Request) -> str | None:
    """The caller's lease holder from `X-Rollout-Lease`, or None without the header."""
    value = request.headers.get(LEASE_HEADER)
    return value.strip() if value is not None else None


async def _json_object(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    try:
        body = json.loads(raw)
    except ValueError:
        raise AgentError("bad_request", "body: not valid JSON", field="body") from None
    if not isinstance(body, dict):
        raise AgentError("bad_request", "body: expected a JSON object", field="body")
    return body


async def put_lease(request: web.Request) -> web.Response:
    body = await _json_object(request)
    holder = sm.lease_holder(body.get("holder"))
    ttl = sm.lease_ttl(body.get("ttl"))
    return web.json_response(request.app[AGENT_KEY].acquire_lease(holder, ttl))


async def delete_lease(request: web.Request) -> web.Response:
    body = await _json_object(request)
    holder = sm.lease_holder(body.get("holder"))
    return web.json_response(request.app[AGENT_KEY].release_lease(holder))


async def put_image(request: web.Request) -> web.Response:
    lease = _lease(request)
    request.app[AGENT_KEY].check_lease(lease, "stage")
    digest = request.headers.get("X-Image-Digest")
    if digest is None:
        raise AgentError(
            "bad_request",
            "X-Image-Digest: header is required: sha256:<64 hex>",
            field="X-Image-Digest",
        )

    async def body() -> AsyncIterator[bytes]:
        try:
            # Whatever has arrived, as the socket delivered it: no re-slicing, no copy.
            async for chunk in request.content.iter_any():
                yield chunk
        except (ConnectionError, ClientPayloadError) as exc:
            raise AgentError("upload_incomplete", f"the image upload broke off: {exc}") from None

    signature = request.headers.get("X-Image-Signature")
    try:
        result = await request.app[AGENT_KEY].stage(
            digest.strip(), body(), lease=lease, signature=signature
        )
    except AgentError:
        # Refused before the upload ended (a wrong `compatible` is seen in the first KiB):
        # read the rest and drop it, or closing on unread data resets the connection
        # and the client never reads why.
        await _drain(request)
        raise
    return web.json_response(result)


async def post_fetch(request: web.Request) -> web.Response:
    agent, lease = request.app[AGENT_KEY], _lease(request)
    agent.check_lease(lease, "stage")
    fetch = FetchRequest.parse(await _json_object(request))
    status, body = await agent.fetch(fetch, lease=lease)
    return web.json_response(body, status=status)


async def delete_image(request: web.Request) -> web.Response:
    agent, lease = request.app[AGENT_KEY], _lease(request)
    agent.check_lease(lease, "stage")
    body = await _json_object(request)
    digest = body.get("digest")
    if not isinstance(digest, str) or not DIGEST_RE.match(digest):
        raise AgentError(
            "bad_request", "digest: expected 'sha256:' and 64 lowercase hex digits", field="digest"
        )
    return web.json_response(await agent.discard(digest, lease=lease))


async def _drain(request: web.Request) -> None:
    with contextlib.suppress(ConnectionError, ClientPayloadError):
        while await request.content.readany():
            pass


async def _mode(request: web.Request, *, required: bool) -> ActivationMode:
    raw = await request.read()
    if not raw.strip():
        if required:
            raise AgentError("bad_request", 'body: expected JSON {"mode": ...}', field="mode")
        return ActivationMode.REBOOT
    try:
        body = json.loads(raw)
    except ValueError:
        raise AgentError("bad_request", "body: not valid JSON", field="body") from None
    if not isinstance(body, dict):
        raise AgentError("bad_request", "body: expected a JSON object", field="body")
    if "mode" not in body and not required:
        return ActivationMode.REBOOT
    mode = body.get("mode")
    choices = ", ".join(m.value for m in ActivationMode)
    if not isinstance(mode, str) or mode not in {m.value for m in ActivationMode}:
        raise AgentError(
            "bad_request", f"mode: expected one of {choices}, got {mode!r}", field="mode"
        )
    return ActivationMode(mode)


async def _switch_response(
    request: web.Request, prepared: tuple[dict[str, Any], Any]
) -> web.StreamResponse:
    agent = request.app[AGENT_KEY]
    body, new = prepared
    try:
        response = web.json_response(body, status=202)
        await response.prepare(request)
        await response.write_eof()
    except BaseException:
        agent.busy = None
        raise
    agent.begin_switch(new)
    return response


async def activate(request: web.Request) -> web.StreamResponse:
    agent, lease = request.app[AGENT_KEY], _lease(request)
    agent.check_lease(lease, "activate")  # before the body; checked again with the claim
    mode = await _mode(request, required=True)
    return await _switch_response(request, agent.prepare_activate(mode, lease=lease))


async def rollback(request: web.Request) -> web.StreamResponse:
    agent, lease = request.app[AGENT_KEY], _lease(request)
    agent.check_lease(lease, "rollback")
    mode = await _mode(request, required=False)
    return await _switch_response(request, agent.prepare_rollback(mode, lease=lease))


async def commit(request: web.Request) -> web.Response:
    return web.json_response(await request.app[AGENT_KEY].commit(lease=_lease(request)))


def make_app(agent: Agent) -> web.Application:
    app = web.Application(middlewares=[errors_middleware, auth_middleware])
    app[AGENT_KEY] = agent
    app[TOKEN_KEY] = agent.config.token.encode()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/v1/openapi.json", openapi)
    app.router.add_get("/v1/status", status)
    app.router.add_put("/v1/image", put_image)
    app.router.add_delete("/v1/image", delete_image)
    app.router.add_post("/v1/fetch", post_fetch)
    app.router.add_post("/v1/activate", activate)
    app.router.add_post("/v1/commit", commit)
    app.router.add_post("/v1/rollback", rollback)
    app.router.add_put("/v1/lease", put_lease)
    app.router.add_delete("/v1/lease", delete_lease)
    return app
