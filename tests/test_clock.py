"""clock.running_loop: asyncio.get_running_loop()'s answer, kept between calls only while
that loop runs in the calling thread."""

from __future__ import annotations

import asyncio
import threading

import pytest

from rollout import clock


async def here() -> asyncio.AbstractEventLoop:
    assert clock.running_loop() is asyncio.get_running_loop()
    return clock.running_loop()


def test_each_loop_in_turn_is_the_running_one() -> None:
    first = asyncio.run(here())
    second = asyncio.run(here())  # the one kept from before has stopped
    assert first is not second


def test_no_loop_running_is_an_error_even_after_one_ran() -> None:
    asyncio.run(here())
    with pytest.raises(RuntimeError):
        clock.running_loop()


def test_a_loop_in_another_thread_is_not_this_threads() -> None:
    started, done = threading.Event(), threading.Event()
    seen: list[asyncio.AbstractEventLoop] = []

    async def other() -> None:
        seen.append(clock.running_loop())  # kept, running, but in the other thread
        started.set()
        await asyncio.to_thread(done.wait)

    thread = threading.Thread(target=asyncio.run, args=(other(),))
    thread.start()
    try:
        assert started.wait(10)
        with pytest.raises(RuntimeError):
            clock.running_loop()
        mine = asyncio.run(here())
        assert mine is not seen[0]
    finally:
        done.set()
        thread.join(10)


async def test_sleep_waits_on_the_loop_clock_and_can_be_cancelled() -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    await clock.sleep(0.05)
    assert loop.time() - start >= 0.05
    task = asyncio.create_task(clock.sleep(3600))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
