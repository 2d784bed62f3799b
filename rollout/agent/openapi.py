"""The agent API's OpenAPI 3.1 document (served at `GET /v1/openapi.json`, no auth).

It declares every status each endpoint answers with (the codes of `app.STATUS_OF`), so a
schema-driven fuzzer (schemathesis, in the test suite) can hold the agent to it: no
server errors, no undeclared status, answers of the declared shapes.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from rollout import __version__
from rollout.agent.fetch import FetchRequest
from rollout.agent.state import LEASE_HOLDER_RE, LEASE_TTL_MAX, LEASE_TTL_MIN
from rollout.agent.status import WAIT_MAX, AgentStatus
from rollout.model import ActivationMode

_ERR = {"$ref": "#/components/schemas/Error"}
_HOLDER = {"type": "string", "pattern": LEASE_HOLDER_RE.pattern}
_REASONS = {
    400: "malformed request; `field` names the culprit",
    401: "missing or wrong bearer token",
    409: "refused in this state: busy, leased, nothing_staged, already_booted, "
    "not_committed, nothing_to_roll_back, booted_slot",
    413: "a JSON body over 1 MiB, or (disk) a filesystem larger than the slot",
    422: "the image is refused: digest_mismatch, bad_image, unsafe_image, incompatible, "
    "unsigned, bad_signature",
}


def _answers(
    ok: int, *codes: int, auth: bool = True, schema: dict[str, Any] | None = None
) -> dict[str, Any]:
    out: dict[str, Any] = {
        str(ok): {
            "description": "ok",
            "content": {"application/json": {"schema": schema or {"type": "object"}}},
        }
    }
    for code in (401, *codes) if auth else codes:
        out[str(code)] = {
            "description": _REASONS[code],
            "content": {"application/json": {"schema": _ERR}},
        }
    return out


def _json_body(schema: dict[str, Any], required: bool) -> dict[str, Any]:
    return {"required": required, "content": {"application/json": {"schema": schema}}}


def _schema(model: type[BaseModel]) -> dict[str, Any]:
    """A pydantic model's JSON Schema with its definitions inlined (one source: the model
    that validates `POST /v1/fetch`'s body, the model both ends read `/v1/status` with)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {k: inline(v) for k, v in node.items() if k != "title"}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return dict(inline(schema))


def document() -> dict[str, Any]:
    mode = {"type": "string", "enum": [m.value for m in ActivationMode]}
    lease_header = {
        "name": "X-Rollout-Lease", "in": "header", "required": False,
        "schema": {"type": "string"},
        "description": "The caller's lease holder (rollout id)",
    }  # fmt: skip
    paths: dict[str, Any] = {
        "/healthz": {"get": {"summary": "Liveness", "security": [],
                             "responses": _answers(200, auth=False)}},
        "/v1/openapi.json": {"get": {"summary": "This document", "security": [],
                                     "responses": _answers(200, auth=False)}},
        "/v1/status": {"get": {
            "summary": "Slots, boot count, workload, lease, backend; a long poll with "
                       "If-None-Match and wait",
            "parameters": [
                {"name": "wait", "in": "query", "required": False,
                 "schema": {"type": "number", "minimum": 0, "maximum": WAIT_MAX},
                 "description": "seconds to wait for the status to differ from "
                                "If-None-Match's tag"},
                {"name": "If-None-Match", "in": "header", "required": False,
                 "schema": {"type": "string"},
                 "description": "the ETag of the status the caller has"},
            ],
            "responses": _answers(200, 400, schema=_schema(AgentStatus))
            | {"304": {"description": "unchanged (the ETag still matches) after wait"}},
        }},
        "/v1/image": {"put": {
            "summary": "Stream an image into the inactive slot (hashed while written)",
            "parameters": [
                {"name": "X-Image-Digest", "in": "header", "required": True,
                 "schema": {"type": "string", "pattern": "^sha256:[0-9a-f]{64}$"}},
                {"name": "X-Image-Signature", "in": "header", "required": False,
                 "schema": {"type": "string"},
                 "description": "base64 of the image's signature file"},
                lease_header,
            ],
            "requestBody": {"required": True, "content": {"application/octet-stream": {
                "schema": {"type": "string", "format": "binary"}}}},
            "responses": _answers(200, 400, 409, 413, 422),
        },
            "delete": {
            "summary": "Drop the staged (or still fetching) image with this digest",
            "parameters": [lease_header],
            "requestBody": _json_body({"type": "object", "required": ["digest"], "properties": {
                "digest": {"type": "string", "pattern": "^sha256:[0-9a-f]{64}$"}}}, True),
            "responses": _answers(200, 400, 409, 413),
        }},
        "/v1/fetch": {"post": {
            "summary": "Pull an image into the inactive slot in the background (202); "
                       "progress in /v1/status under fetch",
            "parameters": [lease_header],
            "requestBody": _json_body(_schema(FetchRequest), True),
            "responses": _answers(200, 400, 409, 413, 422) | _answers(202),
        }},
        "/v1/activate": {"post": {
            "summary": "Boot the staged slot (answers before the switch starts)",
            "parameters": [lease_header],
            "requestBody": _json_body({"type": "object", "required": ["mode"],
                                       "properties": {"mode": mode}}, True),
            "responses": _answers(202, 400, 409, 413),
        }},
        "/v1/commit": {"post": {
            "summary": "Confirm the booted slot",
            "parameters": [lease_header],
            "responses": _answers(200, 409),
        }},
        "/v1/rollback": {"post": {
            "summary": "Boot the last good slot",
            "parameters": [lease_header],
            "requestBody": _json_body({"type": "object", "properties": {"mode": mode}}, False),
            "responses": _answers(202, 400, 409, 413),
        }},
        "/v1/lease": {
            "put": {
                "summary": "Take or renew the node's lease",
                "requestBody": _json_body({"type": "object", "required": ["holder", "ttl"],
                                           "properties": {"holder": _HOLDER, "ttl": {
                                               "type": "number", "minimum": LEASE_TTL_MIN,
                                               "maximum": LEASE_TTL_MAX}}}, True),
                "responses": _answers(200, 400, 409, 413),
            },
            "delete": {
                "summary": "Release the lease",
                "requestBody": _json_body({"type": "object", "required": ["holder"],
                                           "properties": {"holder": _HOLDER}}, True),
                "responses": _answers(200, 400, 409, 413),
            },
        },
    }  # fmt: skip
    return {
        "openapi": "3.1.0",
        "info": {"title": "rollout node agent API", "version": __version__},
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error", "message"],
                    "properties": {"error": {"type": "string"}, "message": {"type": "string"}},
                }
            },
        },
    }
