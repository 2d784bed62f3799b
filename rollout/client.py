"""HTTP client of the controller service API (`Client`), as the CLI commands use it.

The server's URL comes from `--server` or ROLLOUT_SERVER; the token from `--token-file`,
ROLLOUT_TOKEN_FILE or ROLLOUT_TOKEN (`token_from`). An https:// server's certificate is
verified against `--ca-file` (or ROLLOUT_CA_FILE), else against the system trust store;
there is no way to skip verification, and `--ca-file` with an http:// URL is refused
rather than sending the token in the clear. A refusal is a `ServerError` carrying the
HTTP status and the server's JSON body (which names the field at fault).
"""

from __future__ import annotations

import json
import os
import ssl
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from rollout.errors import InputError
from rollout.model import FINISHED
from rollout.tls import client_context
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


def token_from(token_file: str | None) -> str:
    path = token_file or os.environ.get("ROLLOUT_TOKEN_FILE")
    if path:
        return read_token(path, "--token-file")
    token = os.environ.get("ROLLOUT_TOKEN", "").strip()
    if not token:
        raise InputError("no token: pass --token-file F, or set ROLLOUT_TOKEN_FILE / ROLLOUT_TOKEN")
    return token
