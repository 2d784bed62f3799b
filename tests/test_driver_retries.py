"""Which agent calls the driver sends again (an activation only when it provably never
left: no connection could be made; never once it may have arrived), and on which
connection each goes (one-shot calls on their own, asking the agent to close it)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from pathlib import Path

import pytest
from aiohttp import web

from rollout.drivers.agent import ADDRESS_CACHE, AgentDriver, _address
from rollout.drivers.base import NotSent, TransportError
from rollout.model import ActivationMode, Node
from tests.helpers import free_port, read_request


def node(tmp_path: Path, address: str) -> Node:
    token = tmp_path / "token"
    token.write_text("t0ken\n")
    return Node("n1", address, {}, str(token))


@pytest.mark.parametrize("call", ["activate", "rollback"])
async def test_a_switch_nobody_received_is_sent_again(tmp_path: Path, call: str) -> None:
    host = "127.0.0.91"
    n = node(tmp_path, f"{host}:{free_port(host)}")  # nothing listens there
    tries: list[str] = []
    driver = AgentDriver(attempts=3, wait_max=0.01, on_retry=lambda _n, op, i, e: tries.append(op))
    try:
        with pytest.raises(NotSent):
            await getattr(driver, call)(n, ActivationMode.REBOOT)
    finally:
        await driver.close()
    assert tries == [call, call]  # three attempts in all


@pytest.mark.parametrize("call", ["activate", "rollback"])
async def test_a_switch_that_may_have_arrived_is_not_sent_again(tmp_path: Path, call: str) -> None:
    host = "127.0.0.92"
    hits: list[str] = []

    async def broken(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.json_response({"error": "internal", "message": "boom"}, status=500)

    app = web.Application()
    app.router.add_post(f"/v1/{call}", broken)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port(host)
    await web.TCPSite(runner, host, port).start()
    driver = AgentDriver(attempts=3, wait_max=0.01)
    try:
        with pytest.raises(TransportError) as err:
            await getattr(driver, call)(node(tmp_path, f"{host}:{port}"), ActivationMode.REBOOT)
        assert not isinstance(err.value, NotSent)
    finally:
        await driver.close()
        await runner.cleanup()
    assert hits == [f"/v1/{call}"]  # once: the agent got it, whatever it then did


@pytest.mark.parametrize(
    ("address", "host", "port"),
    [
        ("127.0.0.5:7000", "127.0.0.5", 7000),
        ("[::1]:7443", "::1", 7443),
        ("node-7.example:80", "node-7.example", 80),
    ],
    ids=["ipv4", "ipv6", "dns_name"],
)
def test_agent_addresses_are_parsed_once_and_the_cache_stays_bounded(
    address: str, host: str, port: int
) -> None:
    assert _address(address) == (host, port)
    hits = _address.cache_info().hits
    assert _address(address) == (host, port)
    assert _address.cache_info().hits == hits + 1  # cached, not parsed again
    for i in range(ADDRESS_CACHE + 10):
        _address(f"127.1.{i // 250}.{i % 250}:7000")
    assert _address.cache_info().currsize == ADDRESS_CACHE


@pytest.mark.parametrize("address", ["node-7", "node-7:", ":7000", "node-7:http"])
def test_an_address_without_a_port_is_refused(address: str) -> None:
    with pytest.raises(ValueError, match="not host:port"):
        _address(address)


async def test_one_shot_requests_ask_the_agent_to_close_pooled_ones_do_not(
    tmp_path: Path,
) -> None:
    """The leases (and rollback) go on a connection of their own with `Connection: close`
    (the agent closes first, so the TIME_WAIT is its socket's); activate rides the node's
    kept connection, also saying close (the node reboots); a node's other requests (here
    discards) share one kept connection."""
    host = "127.0.0.94"
    seen: list[tuple[str, str | None, int]] = []

    async def record(request: web.Request) -> web.Response:
        assert request.transport is not None
        port = request.transport.get_extra_info("peername")[1]
        seen.append((request.path, request.headers.get("Connection"), port))
        if request.path == "/v1/image":
            return web.json_response({"discarded": False})
        if request.path == "/v1/lease":
            return web.json_response({"holder": "r1", "acquired": True, "expires_in": 60})
        return web.json_response({"booting": "b", "mode": "reboot", "boot_count": 1}, status=202)

    app = web.Application()
    app.router.add_delete("/v1/image", record)
    app.router.add_put("/v1/lease", record)
    app.router.add_post("/v1/activate", record)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port(host)
    await web.TCPSite(runner, host, port).start()
    driver = AgentDriver(lease_holder="r1")
    n = node(tmp_path, f"{host}:{port}")
    try:
        await driver.discard(n, "sha256:" + "0" * 64)
        await driver.lease(n, 60)
        await driver.activate(n, ActivationMode.REBOOT)  # on the discard's, then closed
        await driver.discard(n, "sha256:" + "0" * 64)
        assert driver._wire.counts() == (1, 1)  # the new kept connection, idle
    finally:
        await driver.close()
        await runner.cleanup()
    assert [(path, conn) for path, conn, _ in seen] == [
        ("/v1/image", None),
        ("/v1/lease", "close"),
        ("/v1/activate", "close"),
        ("/v1/image", None),
    ]
    ports = [p for _, _, p in seen]
    assert ports[2] == ports[0] and len(set(ports)) == 3


def answer(status: str, body: Mapping[str, object]) -> bytes:
    data = json.dumps(body).encode()
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    ).encode() + data


SWITCHING = {"booting": "B", "mode": "reboot", "boot_count": 1}


@pytest.mark.parametrize(
    ("arrived", "again", "outcome"),
    [
        (False, "switch", None),
        (True, "busy", TransportError),
        (True, "nothing_staged", TransportError),
        (True, "down", TransportError),
    ],
    ids=[
        "first-lost-second-switches",
        "first-arrived-second-busy",
        "first-arrived-image-consumed",
        "first-arrived-agent-down",
    ],
)
async def test_an_activate_whose_kept_connection_is_closed_under_it(
    tmp_path: Path, arrived: bool, again: str, outcome: type[Exception] | None
) -> None:
    """The agent closes the kept connection as the activate arrives, unanswered. It is
    sent once more on a fresh connection: switching then is success; `busy` (the first
    arrived and its switch runs), `nothing_staged` (its switch consumed the image) or no
    agent any more (it went down to boot) is a TransportError that is not NotSent (the
    engine reads the boot count): never a second activation, and never a Refused that
    would fail the node."""
    host = "127.0.0.95"
    seen: list[tuple[int, str]] = []
    switches = 0
    conns = 0
    server: asyncio.Server | None = None

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal conns, switches
        conns += 1
        mine = conns
        try:
            while True:
                what = await read_request(reader)
                seen.append((mine, what))
                if what.startswith("DELETE"):
                    writer.write(answer("200 OK", {"discarded": False}))
                elif mine == 1:  # the activate, on the kept connection
                    if arrived:
                        switches += 1
                        if again == "down" and server is not None:
                            server.close()  # it stops listening, to boot
                    writer.transport.abort()
                    return
                elif again == "switch":
                    switches += 1
                    writer.write(answer("202 Accepted", SWITCHING))
                else:
                    refusal = {"error": again, "message": "refused", "busy": "activating"}
                    writer.write(answer("409 Conflict", refusal))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    port = free_port(host)
    server = await asyncio.start_server(handler, host, port)
    tries: list[str] = []
    driver = AgentDriver(attempts=3, wait_max=0.01, on_retry=lambda _n, op, i, e: tries.append(op))
    n = node(tmp_path, f"{host}:{port}")
    try:
        await driver.discard(n, "sha256:" + "0" * 64)  # the kept connection
        if outcome is None:
            await driver.activate(n, ActivationMode.REBOOT)
        else:
            with pytest.raises(outcome) as err:
                await driver.activate(n, ActivationMode.REBOOT)
            assert not isinstance(err.value, NotSent)
    finally:
        await driver.close()
        server.close()
    assert switches == 1  # exactly one activation, whichever arrived
    sent = [what for _, what in seen if what.startswith("POST")]
    assert sent == ["POST /v1/activate"] * (1 if again == "down" else 2)
    assert seen[1][0] == 1  # the first went on the discard's connection
    assert tries == ["activate"]
