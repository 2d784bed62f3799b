"""Bytes from the event loop to one worker thread, and that thread's result back.

Staging writes an image while it arrives: the event loop receives the upload and one
worker thread hashes, writes and unpacks it (store.py, disk.py). `Channel` joins the two:

- the loop `send`s each chunk as it comes off the socket; that is a lock and a deque
  append, never a thread hop. It waits only when `limit` bytes are queued (the worker is
  behind: back-pressure reaches the sender through TCP), and resumes once the worker has
  taken half of them, so it is woken once per half-queue, not once per chunk;
- the worker `take`s chunks (blocking) until the end, or raises what the loop `fail`ed
  the channel with (the upload broke off);
- a worker that gives up calls `stop`: queued bytes are dropped and `send` answers False,
  so the loop stops feeding it.

`run_in_thread` runs the worker in a thread of its own rather than the loop's default
executor: a worker lives as long as its upload, and several uploads at once must not
starve the short blocking calls (state saves) that share the executor.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

LIMIT = 16 << 20  # bytes queued before the loop waits for the worker


class Channel:
    """A bounded byte queue: `send`/`close`/`fail` on the loop, `take`/`stop` in a thread."""

    def __init__(self, limit: int = LIMIT) -> None:
        self._loop = asyncio.get_running_loop()
        self._limit = limit
        self._cond = threading.Condition()
        self._chunks: deque[bytes] = deque()
        self._queued = 0
        self._end = False
        self._error: BaseException | None = None
        self._stopped = False
        self._room: asyncio.Event | None = None  # set (from the worker) when room is made

    # --- event loop side -----------------------------------------------------------------

    async def send(self, chunk: bytes) -> bool:
        """Queue `chunk`; False (and nothing queued) once the worker has stopped."""
        while True:
            with self._cond:
                if self._stopped:
                    return False
                if self._queued < self._limit:
                    self._chunks.append(chunk)
                    self._queued += len(chunk)
                    self._cond.notify()
                    return True
                room = self._room = asyncio.Event()
            await room.wait()

    def close(self) -> None:
        """No more chunks: `take` answers None once the queue is empty."""
        with self._cond:
            self._end = True
            self._cond.notify()

    def fail(self, error: BaseException) -> None:
        """The input broke off: `take` raises `error` (queued chunks are not worth writing)."""
        with self._cond:
            self._error = error
            self._cond.notify()

    # --- worker side ---------------------------------------------------------------------

    def take(self) -> bytes | None:
        """The next chunk, None at the end; blocks until one is there."""
        with self._cond:
            while True:
                if self._error is not None:
                    raise self._error
                if self._chunks:
                    break
                if self._end:
                    return None
                self._cond.wait()
            chunk = self._chunks.popleft()
            self._queued -= len(chunk)
            if self._room is not None and self._queued <= self._limit // 2:
                self._wake()
            return chunk

    def stop(self) -> None:
        """The worker reads no more: drop what is queued, and let `send` say so."""
        with self._cond:
            self._stopped = True
            self._chunks.clear()
            self._queued = 0
            if self._room is not None:
                self._wake()

    def _wake(self) -> None:
        room, self._room = self._room, None
        if room is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                self._loop.call_soon_threadsafe(room.set)


class ChannelReader(io.RawIOBase):
    """A channel as a blocking binary file, for parsers that read (rootfs.copy_rootfs)."""

    def __init__(self, channel: Channel) -> None:
        self._channel = channel
        self._chunk = b""
        self._off = 0
        self._eof = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while self._off >= len(self._chunk):
            if self._eof:
                return 0
            chunk = self._channel.take()
            if chunk is None:
                self._eof = True
                return 0
            self._chunk, self._off = chunk, 0
        n = min(len(buffer), len(self._chunk) - self._off)
        buffer[:n] = memoryview(self._chunk)[self._off : self._off + n]
        self._off += n
        return n


def run_in_thread(fn: Callable[[], T], name: str) -> asyncio.Future[T]:
    """Start `fn` in a new daemon thread; its result (or exception) in a loop future."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def done(result: T) -> None:
        if not future.cancelled():
            future.set_result(result)

    def failed(error: BaseException) -> None:
        if not future.cancelled():
            future.set_exception(error)

    def run() -> None:
        try:
            result = fn()
        except BaseException as exc:  # delivered to the awaiting task, not lost
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(failed, exc)
        else:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(done, result)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


async def finished(future: asyncio.Future[T]) -> None:
    """Wait for a worker to end, ignoring how it ended (cleanup after a failure): the
    caller must not remove files a worker thread is still writing."""
    with contextlib.suppress(BaseException):
        await asyncio.shield(future)
