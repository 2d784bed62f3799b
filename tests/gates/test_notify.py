"""Webhooks against a real aiohttp receiver on loopback (real time, short backoffs)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from rollout.policy import Notify
from rollout.webhooks import Notifier
from tests.helpers import free_port, wait_for_async


@dataclass
class Receiver:
    url: str
    bodies: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)  # answers to give, then 200
    hold: bool = False  # answer nothing until `released` (the fixture sets it at teardown)
    released: asyncio.Event = field(default_factory=asyncio.Event)
    requests: int = 0
    answered: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        if self.hold:
            await self.released.wait()
        self.answered += 1
        if self.statuses:
            return web.Response(status=self.statuses.pop(0))
        self.bodies.append(await request.json())
        self.headers.append(dict(request.headers))
        return web.Response(status=204)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    app = web.Application()
    port = free_port()
    rec = Receiver(f"http://127.0.0.1:{port}/hook")
    app.router.add_post("/hook", rec.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield rec
    rec.released.set()
    await runner.cleanup()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def until(what: str, check: Callable[[], bool], timeout: float = 5.0) -> None:
    await wait_for_async(check, timeout, 0.01, what=what)


async def test_retried_on_503_then_delivered_once(
    receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    receiver.statuses = [503, 503]
    failures: list[tuple[str, str, str]] = []
    spec = Notify(url=receiver.url, headers={"Authorization": "Bearer s3cret"})
    notifier = Notifier([spec], session, lambda *f: failures.append(f), backoff=0.05)
    notifier.notify("halted", {"rollout": "r1", "message": "batch 2"})
    # The caller is never blocked: notify returns before the first attempt is even made.
    assert receiver.requests == 0 and notifier.delivered == 0
    await until("the delivery", lambda: len(receiver.bodies) == 1)
    await notifier.aclose()
    assert receiver.requests == 3 and len(receiver.bodies) == 1
    body = receiver.bodies[0]
    assert body["event"] == "halted" and body["data"] == {"rollout": "r1", "message": "batch 2"}
    assert body["time"].endswith("+00:00")
    assert receiver.headers[0]["Authorization"] == "Bearer s3cret"
    assert failures == [] and (notifier.delivered, notifier.failed) == (1, 0)


async def test_dead_url_is_counted_and_never_blocks(session: aiohttp.ClientSession) -> None:
    failures: list[tuple[str, str, str]] = []
    dead = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens there
    notifier = Notifier(
        [Notify(url=dead)], session, lambda *f: failures.append(f), attempts=3, backoff=0.01
    )
    notifier.notify("started", {"rollout": "r1"})
    assert failures == [] and notifier.failed == 0  # returned before the first attempt
    await until("the failure to be counted", lambda: bool(failures))
    await notifier.aclose()
    ((url, event, error),) = failures
    assert (url, event) == (dead, "started") and "Connect" in error
    assert (notifier.delivered, notifier.failed) == (0, 1)


async def test_4xx_is_not_retried(receiver: Receiver, session: aiohttp.ClientSession) -> None:
    receiver.statuses = [401]
    failures: list[tuple[str, str, str]] = []
    notifier = Notifier([Notify(url=receiver.url)], session, lambda *f: failures.append(f))
    notifier.notify("succeeded", {})
    await until("the failure", lambda: bool(failures))
    await notifier.aclose()
    assert receiver.requests == 1 and failures[0][2] == "HTTP 401"


async def test_only_chosen_events_in_order(
    receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    spec = Notify(url=receiver.url, events=("batch_done", "succeeded"))
    notifier = Notifier([spec], session)
    for i, event in enumerate(["started", "batch_done", "gate_waiting", "batch_done", "succeeded"]):
        notifier.notify(event, {"n": i})
    await notifier.aclose()
    assert [(b["event"], b["data"]["n"]) for b in receiver.bodies] == [
        ("batch_done", 1),
        ("batch_done", 3),
        ("succeeded", 4),
    ]


async def test_aclose_gives_up_after_the_grace(
    receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    receiver.hold = True  # the first request is never answered while the test runs
    failures: list[tuple[str, str, str]] = []
    notifier = Notifier([Notify(url=receiver.url)], session, lambda *f: failures.append(f))
    notifier.notify("started", {})
    notifier.notify("halted", {})
    await until("the first request", lambda: receiver.requests == 1)
    # The grace bounds the wait: aclose returns though the receiver has not answered.
    await asyncio.wait_for(notifier.aclose(grace=0.2), 30)
    assert receiver.answered == 0
    assert [(e, err) for _, e, err in failures] == [
        ("started", "not delivered before shutdown"),
        ("halted", "not delivered before shutdown"),
    ]
    notifier.notify("succeeded", {})  # after close: ignored
    assert notifier.failed == 2
