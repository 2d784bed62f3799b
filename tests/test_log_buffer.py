"""Log lines leave once per event-loop turn, in order, none lost (console._TurnBuffer)."""

from __future__ import annotations

import asyncio
import io
import threading

from rollout.console import _TurnBuffer


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, s: str) -> int:
        self.writes += 1
        return super().write(s)


def test_outside_a_loop_a_line_goes_out_at_once() -> None:
    out = CountingStream()
    buf = _TurnBuffer(out)
    buf.write("a\n")
    buf.flush()
    assert out.getvalue() == "a\n" and out.writes == 1


async def test_the_lines_of_one_turn_go_out_together_at_the_next() -> None:
    out = CountingStream()
    buf = _TurnBuffer(out)
    for i in range(100):
        buf.write(f"{i}\n")
        buf.flush()  # what structlog's WriteLogger does after every line
    assert out.getvalue() == ""  # still this turn
    await asyncio.sleep(0)
    assert out.getvalue() == "".join(f"{i}\n" for i in range(100)) and out.writes == 1


def test_a_loop_that_ended_before_its_flush_loses_nothing() -> None:
    out = CountingStream()
    buf = _TurnBuffer(out)

    async def one(line: str) -> None:
        buf.write(line)

    asyncio.run(one("first\n"))  # its scheduled flush may never run
    asyncio.run(one("second\n"))
    buf.drain()  # as at exit
    assert out.getvalue() == "first\nsecond\n"


async def test_threads_and_the_loop_together_lose_no_line() -> None:
    out = CountingStream()
    buf = _TurnBuffer(out)

    def worker(n: int) -> None:
        for i in range(500):
            buf.write(f"t{n}-{i}\n")

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for i in range(500):
        buf.write(f"loop-{i}\n")
    for t in threads:
        await asyncio.to_thread(t.join)
    await asyncio.sleep(0)
    buf.drain()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2500 and len(set(lines)) == 2500
    assert [x for x in lines if x.startswith("loop-")] == [f"loop-{i}" for i in range(500)]
