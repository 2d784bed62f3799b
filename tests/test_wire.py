"""The agent driver's HTTP client (rollout.drivers.wire) against real servers: aiohttp's,
as the agent runs it, and raw asyncio servers that misbehave on purpose (close a kept
connection under a request, answer garbage, never answer)."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from rollout import clock
from rollout.drivers.wire import Broken, ConnectFailed, Response, Target, Unanswered, Wire
from tests.helpers import free_port, read_request

HOST = "127.0.0.93"


def head(method: str, path: str, length: int | None = None) -> bytes:
    size = "" if length is None else f"Content-Length: {length}\r\n"
    return f"{method} {path} HTTP/1.1\r\nHost: {HOST}\r\n{size}\r\n".encode()


async def until(cond: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = clock.now() + timeout
    while not cond():
        assert clock.now() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def serve(app: web.Application) -> tuple[Target, web.AppRunner]:
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port(HOST)
    await web.TCPSite(runner, HOST, port).start()
    return Target(HOST, port, f"{HOST}:{port}"), runner


async def get(wire: Wire, target: Target, path: str, *, keep: bool = True) -> Response:
    return await wire.request(
        target, head("GET", path), method="GET", keep=keep, timeout=5, connect_timeout=3
    )


def peers_app(peers: list[int]) -> web.Application:
    """Answers every GET with the client's port (which connection it came on)."""

    async def who(request: web.Request) -> web.Response:
        assert request.transport is not None
        peers.append(request.transport.get_extra_info("peername")[1])
        return web.json_response({"n": len(peers)})

    async def closing(request: web.Request) -> web.Response:
        return web.json_response({}, headers={"Connection": "close"})

    app = web.Application()
    app.router.add_get("/who", who)
    app.router.add_get("/closing", closing)
    return app


async def test_a_node_s_requests_share_one_connection_until_it_idles() -> None:
    peers: list[int] = []
    target, runner = await serve(peers_app(peers))
    wire = Wire(keepalive=0.3)
    try:
        for _ in range(3):
            answer = await get(wire, target, "/who")
            assert answer.status == 200
        assert answer.json() == {"n": 3}
        assert len(set(peers)) == 1  # one connection for the three
        assert wire.counts() == (1, 1)
        await until(lambda: wire.counts() == (0, 0), "the idle connection to be dropped")
        await get(wire, target, "/who")
        assert len(set(peers)) == 2  # a new one after the idle time
    finally:
        await wire.close()
        await runner.cleanup()


async def test_fresh_requests_and_closing_answers_leave_no_connection_behind() -> None:
    peers: list[int] = []
    target, runner = await serve(peers_app(peers))
    wire = Wire(keepalive=30)
    try:
        for _ in range(2):
            await get(wire, target, "/who", keep=False)
        assert len(set(peers)) == 2
        await get(wire, target, "/closing")
        await until(lambda: wire.counts() == (0, 0), "every connection to be closed")
    finally:
        await wire.close()
        await runner.cleanup()


async def test_a_chunked_answer_is_read_whole() -> None:
    async def chunks(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json", "ETag": '"7"'})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for part in (b'{"a": ', b"[1, 2", b"]}"):
            await resp.write(part)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/c", chunks)
    target, runner = await serve(app)
    wire = Wire(keepalive=30)
    try:
        answer = await get(wire, target, "/c")
        assert answer.json() == {"a": [1, 2]}
        assert answer.headers["etag"] == '"7"'
    finally:
        await wire.close()
        await runner.cleanup()


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def raw_server(handler: Handler) -> tuple[Target, asyncio.Server]:
    port = free_port(HOST)
    server = await asyncio.start_server(handler, HOST, port)
    return Target(HOST, port, f"{HOST}:{port}"), server


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: application/json\r\n\r\n{}"


@pytest.mark.parametrize(("method", "resent"), [("GET", True), ("PUT", True), ("POST", False)])
async def test_a_kept_connection_closed_under_a_request(method: str, resent: bool) -> None:
    """The agent closes the kept connection as the second request arrives, unanswered: an
    idempotent request is sent once more on a fresh connection, a POST is not."""
    seen: list[tuple[int, str]] = []
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        mine = connections
        try:
            while True:
                seen.append((mine, await read_request(reader)))
                if mine == 1 and len(seen) == 2:
                    writer.transport.abort()  # unanswered, connection reset
                    return
                writer.write(OK)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    target, server = await raw_server(handler)
    wire = Wire(keepalive=30)
    try:
        await wire.request(
            target, head(method, "/x", 0), method=method, timeout=5, connect_timeout=3
        )
        if resent:
            answer = await wire.request(
                target, head(method, "/x", 0), method=method, timeout=5, connect_timeout=3
            )
            assert answer.status == 200
            assert seen == [(1, f"{method} /x"), (1, f"{method} /x"), (2, f"{method} /x")]
        else:
            with pytest.raises(Unanswered):  # it may have arrived: the caller decides
                await wire.request(
                    target, head(method, "/x", 0), method=method, timeout=5, connect_timeout=3
                )
            assert seen == [(1, f"{method} /x"), (1, f"{method} /x")]  # sent once only
    finally:
        await wire.close()
        server.close()


async def test_nothing_listening_is_connect_failed() -> None:
    port = free_port(HOST)
    wire = Wire(keepalive=30)
    with pytest.raises(ConnectFailed, match=r"111|refused"):
        await wire.request(
            Target(HOST, port, f"{HOST}:{port}"), head("GET", "/"), method="GET",
            timeout=5, connect_timeout=3,
        )  # fmt: skip
    await wire.close()


@pytest.mark.parametrize(
    ("answer", "match"),
    [(b"SSH-2.0-OpenSSH_9.2\r\n\r\n", "not HTTP"), (None, "timed out")],
    ids=["not_http", "no_answer"],
)
async def test_an_answer_that_is_not_http_or_never_comes_is_broken(
    answer: bytes | None, match: str
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        if answer is not None:
            writer.write(answer)
            await writer.drain()
        await reader.read()  # until the client gives up and closes
        writer.close()

    target, server = await raw_server(handler)
    wire = Wire(keepalive=30)
    try:
        with pytest.raises(Broken, match=match):
            await wire.request(
                target, head("GET", "/"), method="GET", timeout=0.5, connect_timeout=3
            )
        await until(lambda: wire.counts() == (0, 0), "the broken connection to be closed")
    finally:
        await wire.close()
        server.close()


async def test_a_refusal_during_an_upload_ends_it_and_is_the_answer() -> None:
    """The agent refuses an upload before reading its body (a lease, a digest it will not
    take): the client stops sending and returns the refusal, not a reset."""

    async def refuse(request: web.Request) -> web.Response:
        return web.json_response({"error": "leased"}, status=409)

    app = web.Application()
    app.router.add_put("/v1/image", refuse)
    target, runner = await serve(app)
    sent = 0
    size = 256 << 20

    async def body() -> AsyncIterator[bytes]:
        nonlocal sent
        chunk = b"\0" * (1 << 20)
        while sent < size:
            sent += len(chunk)
            yield chunk

    wire = Wire(keepalive=30)
    try:
        answer = await wire.request(
            target, head("PUT", "/v1/image", size), body(), method="PUT",
            timeout=None, connect_timeout=3, read_timeout=10,
        )  # fmt: skip
        assert (answer.status, answer.json()) == (409, {"error": "leased"})
        assert sent < size  # it stopped sending
        await until(lambda: wire.counts() == (0, 0), "the cut-short connection to be closed")
    finally:
        await wire.close()
        await runner.cleanup()


@pytest.mark.parametrize("size", [64 << 20, 0], ids=["64MiB", "empty"])
async def test_a_streamed_upload_arrives_whole(size: int) -> None:
    got: list[int] = []

    async def take(request: web.Request) -> web.Response:
        n = 0
        async for part in request.content.iter_any():
            n += len(part)
        got.append(n)
        return web.json_response({"written": True})

    app = web.Application(client_max_size=1 << 30)
    app.router.add_put("/v1/image", take)
    target, runner = await serve(app)

    async def body() -> AsyncIterator[bytes]:
        for _ in range(size >> 20):
            yield b"\1" * (1 << 20)

    wire = Wire(keepalive=30)
    try:
        answer = await wire.request(
            target, head("PUT", "/v1/image", size), body(), method="PUT",
            timeout=None, connect_timeout=3, read_timeout=10,
        )  # fmt: skip
        assert answer.json() == {"written": True}
        assert got == [size]
        assert wire.counts() == (1, 1)  # kept for the node's next request
    finally:
        await wire.close()
        await runner.cleanup()


async def test_a_closed_connection_is_freed_without_the_cyclic_collector() -> None:
    """At thousands of connections a second, one left in a reference cycle (its parser
    holds its callbacks) would wait, with all it holds, for the cyclic collector."""
    peers: list[int] = []
    target, runner = await serve(peers_app(peers))
    wire = Wire(keepalive=30)
    made: list[weakref.ref[object]] = []
    connect = wire._connect

    async def watched(target: Target, timeout: float) -> Any:
        conn = await connect(target, timeout)
        made.append(weakref.ref(conn))
        return conn

    wire._connect = watched  # type: ignore[method-assign]
    gc.disable()
    try:
        await get(wire, target, "/who", keep=False)
        await get(wire, target, "/who")  # kept,
        await get(wire, target, "/closing")  # then closed by the agent
        await get(wire, target, "/who")  # kept, then closed by the client
        await wire.close()
        assert len(made) == 3
        await until(lambda: all(ref() is None for ref in made), "the connections to be freed")
    finally:
        gc.enable()
        await wire.close()
        await runner.cleanup()
