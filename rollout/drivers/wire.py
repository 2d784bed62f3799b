"""The agent driver's HTTP/1.1 client: one keep-alive connection per agent, on asyncio's
transports, with httptools (llhttp, the parser of Node.js) reading the answers.

Why not aiohttp's client, which the rest of rollout uses: a controller in the middle of
a big batch makes thousands of small requests a second to agents it never shares a
connection between, and aiohttp's request path (sessions, connectors, cookie jars, header
multidicts, traces, URL objects, happy eyeballs) was three quarters of a request's CPU.
Measured side by side on the same 200 real agents (benchmarks/bench_request.py), a
pooled `GET /v1/status` cost the controller 150 to 200 µs through aiohttp and 70 to 100 µs
through this; aiosonic, the other asyncio client, 300 µs. What is left here is only what
the agent API needs: a request head written in one go, a JSON or streamed body, the
answer's status, headers and body.

Connections: at most one idle connection per agent (a node's requests come one after
another), dropped after `keepalive` seconds idle or as soon as the agent closes it (it
rebooted). A request that asks for a fresh connection (`keep=False`) gets its own and
closes it after the answer. An idempotent request (GET, PUT, DELETE) that fails on a
reused connection before any byte of an answer arrived is sent once more on a fresh one:
the agent may have closed that connection just as it was written, as aiohttp does. Any
other request failing so is `Unanswered`, for the caller to decide.

Errors: `ConnectFailed` when no connection could be made (so nothing was sent, which the
driver's `NotSent` promises), `Broken` for anything after (a timeout, a reset, an answer
that is not HTTP). Both keep the cause as `__cause__`; neither holds a header, so a token
never reaches an error or a log.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterable
from dataclasses import dataclass
from typing import Any

import httptools

_IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})


class WireError(Exception):
    """The exchange with the agent failed."""


class ConnectFailed(WireError):
    """No connection could be made: nothing of the request was sent."""


class Broken(WireError):
    """The connection was made, then the exchange failed (timeout, reset, not HTTP)."""


class Unanswered(Broken):
    """A reused connection was closed or reset under a request that is not sent again
    here (a POST), before any byte of an answer: most likely the agent had closed it just
    as the request was written, but it may have arrived; the caller decides."""


@dataclass(frozen=True, slots=True)
class Target:
    """Where an agent listens: `host` (a name or an IP address, without brackets), `port`,
    `authority` (the Host header: host:port as written), and the TLS context for https."""

    host: str
    port: int
    authority: str
    tls: ssl.SSLContext | None = None


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    headers: dict[str, str]  # names in lower case
    body: bytes

    def json(self) -> Any:
        """The body as JSON (None when empty); ValueError when it is not JSON."""
        return json.loads(self.body) if self.body else None


Body = bytes | AsyncIterable[bytes] | None


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection and the answer it is waiting for."""

    def __init__(self, loop: asyncio.AbstractEventLoop, live: set[_Connection]) -> None:
        self._loop = loop
        self._live = live  # the client's open connections: this one leaves it when lost
        # The parser holds this protocol's callbacks, a reference cycle: it is dropped when
        # the connection is lost, so that refcounting frees a closed connection at once
        # (thousands a second at fleet scale would otherwise wait for the cyclic collector,
        # and the heap would grow by everything they hold until it ran).
        self._parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.answered = False  # a byte of an answer to the current request arrived
        self.reusable = True
        self._waiter: asyncio.Future[Response] | None = None
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._paused = False
        self._drained: asyncio.Future[None] | None = None
        self.idle: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol -----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.answered = True
        if self._parser is None or self._waiter is None or self._waiter.done():
            self.close()  # nothing asked for this: the connection cannot be trusted
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(Broken(f"the answer is not HTTP: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._live.discard(self)
        self._parser = None
        if self.idle is not None:
            self.idle.cancel()
            self.idle = None
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc or _reset())
        self._waiter = None
        if self._drained is not None and not self._drained.done():
            self._drained.set_exception(_reset())
        self._drained = None

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    # -- httptools callbacks ----------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._headers = {}
        self._body = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        parser = self._parser
        assert parser is not None  # called back by it, from data_received
        if not parser.should_keep_alive():
            self.reusable = False
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            status = parser.get_status_code()
            waiter.set_result(Response(status, self._headers, b"".join(self._body)))

    # -- use ----------------------------------------------------------------------------------
    def _fail(self, exc: BaseException) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)

    def close(self) -> None:
        self.reusable = False
        if self.transport is not None and not self.closed:
            self.transport.close()

    async def exchange(self, head: bytes, body: Body, read_timeout: float | None) -> Response:
        """Send one request and return its answer. A body streamed in parts is written
        with the transport's flow control; an answer that arrives before it is all
        written (a refusal) ends the upload, and the connection is not reused."""
        assert self.transport is not None
        waiter: asyncio.Future[Response] = self._loop.create_future()
        self._waiter = waiter
        self.answered = False
        if body is None or isinstance(body, bytes):
            self.transport.write(head + body if body else head)
        else:
            pending: bytes | None = head  # sent with the first part: one system call
            whole = False
            try:
                async for chunk in body:
                    if waiter.done():
                        break  # answered already: a refusal
                    if pending is not None:
                        chunk, pending = pending + chunk, None
                    self.transport.write(chunk)
                    if self._paused and not self.closed:
                        self._drained = self._loop.create_future()
                        async with asyncio.timeout(read_timeout):
                            await self._drained
                else:
                    whole = True
                    if pending is not None:  # an empty body
                        self.transport.write(pending)
            except (OSError, TimeoutError):
                if not waiter.done() or waiter.exception() is not None:
                    raise  # the agent stopped reading without an answer
            if not whole:
                self.reusable = False  # the body was cut short: the stream is out of step
        if read_timeout is None:
            return await waiter
        async with asyncio.timeout(read_timeout):
            return await waiter


class Wire:
    """Requests to agents, keeping one idle connection per agent for `keepalive` s."""

    def __init__(self, keepalive: float) -> None:
        self.keepalive = keepalive
        self._idle: dict[Target, _Connection] = {}
        self._open: set[_Connection] = set()

    async def request(
        self,
        target: Target,
        head: bytes,
        body: Body = None,
        *,
        method: str,
        keep: bool = True,
        reuse: bool | None = None,
        timeout: float | None,
        connect_timeout: float,
        read_timeout: float | None = None,
    ) -> Response:
        """Send `head` (the request line and headers, ending in an empty line) and `body`
        to `target`, on its idle connection when `reuse` (default: `keep`) and there is
        one, keeping the connection afterwards when `keep`; within `timeout` seconds in
        all (None: no limit) once connected."""
        conn = self._take(target) if (keep if reuse is None else reuse) else None
        reused = conn is not None
        while True:
            if conn is None:
                conn = await self._connect(target, connect_timeout)
            try:
                async with asyncio.timeout(timeout):
                    answer = await conn.exchange(head, body, read_timeout)
            except (OSError, TimeoutError, Broken) as exc:
                conn.close()
                if reused and not conn.answered and method in _IDEMPOTENT and _resendable(body):
                    conn, reused = None, False  # it was closed under us: once more, fresh
                    continue
                if reused and not conn.answered and not isinstance(exc, TimeoutError):
                    raise Unanswered(_why(exc)) from exc
                if isinstance(exc, Broken):
                    raise
                raise Broken(_why(exc)) from exc
            except BaseException:
                conn.close()  # cancelled: the answer would arrive for nobody
                raise
            if keep and conn.reusable and not conn.closed:
                self._give(target, conn)
            else:
                conn.close()
            return answer

    async def _connect(self, target: Target, timeout: float) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(loop, self._open),
                    target.host,
                    target.port,
                    ssl=target.tls,
                    server_hostname=target.host if target.tls is not None else None,
                )
        except (OSError, TimeoutError) as exc:
            raise ConnectFailed(_why(exc)) from exc
        if not conn.closed:
            self._open.add(conn)
        return conn

    def _take(self, target: Target) -> _Connection | None:
        conn = self._idle.pop(target, None)
        if conn is None:
            return None
        if conn.idle is not None:
            conn.idle.cancel()
            conn.idle = None
        if conn.closed or conn.transport is None or conn.transport.is_closing():
            return None
        return conn

    def _give(self, target: Target, conn: _Connection) -> None:
        old = self._idle.get(target)
        if old is not None:  # two requests overlapped (a lease renewal): keep one
            self._drop(target, old)
        conn.idle = asyncio.get_running_loop().call_later(self.keepalive, self._drop, target, conn)
        self._idle[target] = conn

    def _drop(self, target: Target, conn: _Connection) -> None:
        if self._idle.get(target) is conn:
            del self._idle[target]
        if conn.idle is not None:
            conn.idle.cancel()
            conn.idle = None  # the timer's arguments hold the connection: no cycle left
        conn.close()

    def counts(self) -> tuple[int, int]:
        """(open, idle) connections."""
        return len(self._open), len(self._idle)

    async def close(self) -> None:
        """Close every connection this client made (idle or in use)."""
        for conn in list(self._open):
            conn.close()
        self._idle.clear()
        self._open.clear()


def _reset() -> ConnectionResetError:
    return ConnectionResetError("the agent closed the connection")


def _resendable(body: Body) -> bool:
    return body is None or isinstance(body, bytes)


def _why(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return (str(exc) or type(exc).__name__).splitlines()[0][:200]
