"""Probes at batch scale, on real sockets: hanging workloads delay the other nodes' http
checks but never fail them, and no more than `PROBES` probes are open at once."""

from __future__ import annotations

import asyncio
from typing import cast

from rollout.drivers.base import Driver
from rollout.health import PROBES, Prober, probe_session
from rollout.model import Node
from rollout.policy import HttpCheck, TcpCheck

PORT = 18089
HANGING = 110  # more than aiohttp's default connection limit (100)


async def test_hanging_workloads_do_not_fail_a_healthy_nodes_check() -> None:
    open_now = peak = 0

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal open_now, peak
        open_now += 1
        peak = max(peak, open_now)
        try:
            await reader.read()  # never answers; returns when the prober gives up
        finally:
            open_now -= 1
            writer.close()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:  # the tcp check: connects, sends nothing
            writer.close()
            return
        await asyncio.sleep(0.1)  # a workload takes a moment to answer
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    hosts = [f"127.78.1.{i}" for i in range(1, HANGING + 1)]
    servers = [await asyncio.start_server(hang, h, PORT) for h in hosts]
    servers.append(await asyncio.start_server(answer, "127.78.2.1", PORT))
    nodes = [Node(f"n{i}", f"{h}:7000") for i, h in enumerate([*hosts, "127.78.2.1"])]
    check = HttpCheck(port=PORT, path="/healthz", timeout=0.5)
    try:
        async with probe_session() as session:
            prober = Prober(cast(Driver, object()), session)  # http checks need no driver
            results = await asyncio.gather(*(prober.check(check, n, "") for n in nodes))
            tcp = await prober.check(TcpCheck(port=PORT, timeout=0.5), nodes[-1], "")
    finally:
        for server in servers:
            server.close()
            await server.wait_closed()
    *hung, healthy = results
    # Queued behind 110 checks that hang for their 0.5 s: its own 0.5 s starts when it is
    # sent (with the wait counted, it would have 0.1 s left after 0.5 s, and fail).
    assert healthy.ok, healthy.detail
    assert not any(r.ok for r in hung)
    assert {r.detail for r in hung} == {"GET /healthz: TimeoutError"}
    assert 0 < peak <= PROBES  # bounded sockets, whatever the batch size
    assert tcp.ok
