"""The agent driver: reaches a node's agent over its HTTP API v1 (docs/agent-api.md).

Each node's bearer token is read from its token file once and kept in memory; it never
appears in logs or errors.

HTTP: the driver's own small client (`rollout.drivers.wire`, on asyncio transports and
httptools), not aiohttp's, whose request path was three quarters of a request's CPU: at
thousands of nodes the controller's cost is its requests (benchmarks/bench_http.py).

Connections:

- a node's calls in a row while it is being updated (status polls and long polls, stage,
  commit, discard, fetch) share one keep-alive connection, dropped after `KEEPALIVE`
  seconds idle, so the open connections stay bounded by the nodes in flight, not the
  fleet, under the usual 1,024 soft limit. A connection the agent closed meanwhile (it
  rebooted) is not reused; an idempotent request (GET, PUT, DELETE) is sent once more on
  a fresh connection if the agent closed the reused one just as it was written, and
  `commit` is retried here.
- `activate` goes on that connection too when the node has one (the stage's), with
  `Connection: close`: the node reboots after it. Not idempotent, it is not simply sent
  again if the reused connection fails before any answer; it is sent once more on a
  fresh connection, and the agent's answer tells whether the first had arrived (`busy`
  with the switch it started, or `nothing_staged` once that consumed the image: then it
  is not done twice).
- a fresh connection, closed after the answer (`Connection: close`: the agent closes it
  first, so the TIME_WAIT is on its side, not the controller's), for the rest:
  `rollback`, which is rare; and the leases, taken, renewed and released for every node
  of the fleet at once or in a sweep, which kept would leave one idle socket per node
  behind.

At most `CONNECTIONS` requests are in flight on kept connections and as many on fresh
ones, and `WATCHES` long polls (each holds its connection while it waits); more wait for a
slot before their timeout starts, so a timeout measures the agent, not this process's
queue (2,000 leases taken at once), and a loop busy setting up a herd of requests does
not time out its own connects.

TLS: a node with a `ca_file` is reached over TLS, and the agent's certificate must chain
to that CA and name the address's host (an IP address in its IP subjectAltNames); a node
without one over plain HTTP. A certificate that does not verify is a `TransportError`
("TLS certificate verification failed: ..."), so the engine treats the node as
unreachable, never as a crash; there is no way to skip verification.

A node that is down: once a status poll could not connect (the node is rebooting), the
next polls first try a bare TCP connect to its address, when that is an IP address, and
send the request only once that connects. A refused connect costs the client about a
third of a refused request, and a reboot is 15-20 such polls a node, thousands a second
in a big batch. A host name goes the usual way (the probe would resolve it once more).

Retries: only idempotent calls are retried on transport errors (status, stage, commit),
with tenacity's explicit stop and wait. `activate` and `rollback` are sent again only when
the connection could not even be made (`NotSent`: nothing left), and `activate` once when
its reused connection was closed under it (above); once the request may have reached the
agent, the engine learns what happened from the agent's `boot_count` instead of risking
a second boot.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import json as jsonlib
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from rollout import clock
from rollout.agent.status import AgentStatus
from rollout.drivers.base import NotSent, Refused, TransportError
from rollout.drivers.wire import (
    Body,
    Broken,
    ConnectFailed,
    Response,
    Target,
    Unanswered,
    Wire,
)
from rollout.errors import InputError
from rollout.model import ActivationMode, Image, Node, NodeStatus
from rollout.pull import PullAccess
from rollout.tls import certificate_problem, client_context
from rollout.tokens import read_token

T = TypeVar("T")

# What an agent answers an activate sent again after the first one arrived and its switch
# consumed the staged image (`busy`, while the switch runs, is a TransportError already).
_SWITCHED = frozenset({"nothing_staged"})


class _Unanswered(TransportError):
    """A request on a reused connection that was closed under it before any answer."""


_CHUNK = 1 << 20  # image bytes per read and per write to the socket
_INLINE = 64 << 10  # image bytes read on the event loop rather than in a thread
CONNECTIONS = 64  # requests in flight on kept connections, and as many on fresh ones
WATCHES = 256  # status long polls open at once (each holds a connection); more nodes poll
# Seconds an idle connection is kept: longer than the longest gap between two boot polls
# (steps.BOOT_POLL_MAX, 2 s), so a node that answers keeps its connection.
KEEPALIVE = 3.0
ADDRESS_CACHE = 8192  # parsed agent addresses kept: bounded at any fleet size
_ANSWER = 10.0  # seconds an agent has to answer a request (beyond a long poll's wait)
_CONNECT = 3.0  # seconds to make a connection
_STREAM_CONNECT = 5.0  # ... for an upload
_STREAM_READ = 60.0  # seconds an upload may stall, and then wait for its answer
_PROBE_CONNECT = 3.0  # seconds for the bare connect to a node that is down

RetryHook = Callable[[Node, str, int, BaseException], None]


def parse_status(body: dict[str, Any], tag: str | None = None) -> NodeStatus:
    """An agent's status answer (agent/status.py, the model both ends share), reduced to
    what the core decides on, with the answer's ETag; ValueError when it is not one."""
    return AgentStatus.model_validate(body).node_status(tag)


class AgentDriver:
    """Driver for nodes running `rollout agent`."""

    def __init__(
        self,
        attempts: int = 5,
        wait_max: float = 5.0,
        on_retry: RetryHook | None = None,
        lease_holder: str | None = None,
        pull: PullAccess | None = None,
        fetch_poll: float = 0.5,
    ) -> None:
        self.pull = pull or PullAccess()  # how nodes reach the image store (pull mode)
        self.fetch_poll = fetch_poll
        self._wire = Wire(KEEPALIVE)
        # Slots, made in the running loop when first used (`_slots`).
        self._kept: asyncio.Semaphore | None = None
        self._fresh: asyncio.Semaphore | None = None
        self._watching: asyncio.Semaphore | None = None
        self._auth: dict[str, str] = {}  # token file -> its request header lines
        self._contexts: dict[str, ssl.SSLContext] = {}
        self.attempts = attempts
        self.wait_max = wait_max
        self.on_retry = on_retry
        self.lease_holder = lease_holder  # sent on mutating calls (X-Rollout-Lease)
        self._down: set[str] = set()  # ids of nodes whose last status could not connect

    # -- plumbing -----------------------------------------------------------------------
    def _slots(self, fresh: bool = False) -> asyncio.Semaphore:
        """The slots of requests on kept connections, or with `fresh` on fresh ones."""
        if fresh:
            if self._fresh is None:
                self._fresh = asyncio.Semaphore(CONNECTIONS)
            return self._fresh
        if self._kept is None:
            self._kept = asyncio.Semaphore(CONNECTIONS)
        return self._kept

    def _watch_slots(self) -> asyncio.Semaphore:
        """The long polls' own slots: they hold their connection while they wait, so in
        the others' they would starve the other requests."""
        if self._watching is None:
            self._watching = asyncio.Semaphore(WATCHES)
        return self._watching

    def _headers(self, node: Node) -> str:
        """The node's authentication header lines (its token; the lease holder)."""
        if node.token_file is None:
            raise InputError(f"node {node.id}: no token_file in the inventory")
        lines = self._auth.get(node.token_file)
        if lines is None:
            token = read_token(node.token_file, f"node {node.id}: token file")
            lines = f"Authorization: Bearer {token}\r\n"
            if self.lease_holder:
                lines += f"X-Rollout-Lease: {self.lease_holder}\r\n"
            self._auth[node.token_file] = lines
        return lines

    def _target(self, node: Node) -> Target:
        host, port = _address(node.address)
        return Target(host, port, node.address, self._ssl(node))

    def _ssl(self, node: Node) -> ssl.SSLContext | None:
        """The node's TLS client context (verifying against its CA), None for plain HTTP."""
        if node.ca_file is None:
            return None
        if node.ca_file not in self._contexts:
            self._contexts[node.ca_file] = client_context(
                node.ca_file, option=f"node {node.id}: ca_file"
            )
        return self._contexts[node.ca_file]

    def _head(self, node: Node, method: str, path: str, extra: str, length: int | None) -> bytes:
        """A request's line and headers, ending in the empty line."""
        size = "" if length is None else f"Content-Length: {length}\r\n"
        return (
            f"{method} {path} HTTP/1.1\r\nHost: {node.address}\r\n"
            f"{self._headers(node)}{extra}{size}\r\n"
        ).encode("latin-1")

    async def _call(
        self,
        node: Node,
        method: str,
        path: str,
        json: dict[str, Any] | None = None,
        *,
        fresh: bool = False,
        reuse: bool = False,
    ) -> dict[str, Any]:
        """One request's JSON answer: on the node's kept connection, or with `fresh` on
        one of its own, closed after (with `reuse`, the kept one if the node has one)."""
        slots = self._slots(fresh)
        return (await self._exchange(slots, node, method, path, json, fresh=fresh, reuse=reuse))[1]

    async def _exchange(
        self,
        slots: asyncio.Semaphore,
        node: Node,
        method: str,
        path: str,
        json: dict[str, Any] | None = None,
        *,
        fresh: bool = False,
        reuse: bool = False,
        headers: str = "",
        timeout: float = _ANSWER,
    ) -> tuple[Response, dict[str, Any]]:
        """One request, holding one of `slots`: the answer (its status and headers) and its
        JSON object body ({} for none); errors as `_answer` maps them."""
        if fresh:  # the agent closes first: its socket, not ours, waits out TIME_WAIT
            headers += "Connection: close\r\n"
        if json is None:
            body = None
            head = self._head(node, method, path, headers, None)
        else:
            body = jsonlib.dumps(json).encode()
            extra = f"{headers}Content-Type: application/json\r\n"
            head = self._head(node, method, path, extra, len(body))
        resp = await self._send(
            slots, node, method, path, head, body, keep=not fresh, reuse=not fresh or reuse,
            timeout=timeout, connect_timeout=_CONNECT,
        )  # fmt: skip
        return resp, _answer(node, resp)

    async def _send(
        self, slots: asyncio.Semaphore, node: Node, method: str, path: str, head: bytes,
        body: Body, *, keep: bool, reuse: bool | None = None, timeout: float | None,
        connect_timeout: float, read_timeout: float | None = None,
    ) -> Response:  # fmt: skip
        """One request through the wire, holding one of `slots`; its failures as the
        driver's: NotSent when no connection could be made, _Unanswered when a reused one
        was closed under it before any answer, else TransportError."""
        try:
            async with slots:
                return await self._wire.request(
                    self._target(node), head, body, method=method, keep=keep, reuse=reuse,
                    timeout=timeout, connect_timeout=connect_timeout, read_timeout=read_timeout,
                )  # fmt: skip
        except ConnectFailed as exc:  # nothing of the request was sent
            raise NotSent(f"{node.id}: {method} {path}: {_describe(exc)}") from exc
        except Unanswered as exc:
            raise _Unanswered(f"{node.id}: {method} {path}: {_describe(exc)}") from exc
        except Broken as exc:
            raise TransportError(f"{node.id}: {method} {path}: {_describe(exc)}") from exc

    def _retrying(
        self, node: Node, operation: str, only: type[TransportError] = TransportError
    ) -> AsyncRetrying:
        def before_sleep(state: RetryCallState) -> None:
            if self.on_retry and state.outcome is not None:
                exc = state.outcome.exception()
                if exc is not None:
                    self.on_retry(node, operation, state.attempt_number, exc)

        return AsyncRetrying(
            retry=retry_if_exception_type(only),
            stop=stop_after_attempt(self.attempts),
            wait=wait_exponential(multiplier=0.2, max=self.wait_max),
            before_sleep=before_sleep,
            reraise=True,
        )

    async def _retried(
        self,
        node: Node,
        operation: str,
        call: Callable[[], Awaitable[T]],
        only: type[TransportError] = TransportError,
    ) -> T:
        """`call()`, retried on `only` as `_retrying` says. The first attempt is made
        before tenacity's machinery is set up (about 15 µs and a dozen objects in
        reference cycles a call, three calls a node), and a failure of it is handed to
        that machinery as its first attempt: the same attempts, waits and reports."""
        try:
            return await call()
        except only as exc:
            first: BaseException | None = exc
        async for attempt in self._retrying(node, operation, only):
            with attempt:
                if first is not None:
                    failed, first = first, None
                    raise failed
                return await call()
        raise AssertionError("unreachable")

    # -- Driver -------------------------------------------------------------------------
    async def status(self, node: Node) -> NodeStatus:
        """One status request, not retried: callers poll (a rebooting node is expected).
        A node found down is probed with a bare connect first (module docstring)."""
        slots = self._slots()
        if node.id in self._down:
            await self._connectable(slots, node, "GET /v1/status")
        try:
            resp, body = await self._exchange(slots, node, "GET", "/v1/status")
        except NotSent:
            self._down.add(node.id)
            raise
        self._down.discard(node.id)
        return parse_status(body, resp.headers.get("etag"))

    async def _connectable(self, slots: asyncio.Semaphore, node: Node, what: str) -> None:
        """Return once a TCP connection to `node` can be made (and closed at once); raise
        NotSent as the request would when it cannot. Host names are not probed."""
        target = _ip_target(node.address)
        if target is None:
            return
        family, host, port = target
        loop = asyncio.get_running_loop()
        async with slots:
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setblocking(False)
                await asyncio.wait_for(loop.sock_connect(sock, (host, port)), _PROBE_CONNECT)
            except (OSError, TimeoutError) as exc:
                why = str(exc) or type(exc).__name__
                raise NotSent(
                    f"{node.id}: {what}: cannot connect to {node.address}: {why}"
                ) from exc
            finally:
                sock.close()

    async def watch(self, node: Node, seen: NodeStatus, wait: float) -> NodeStatus | None:
        """A status long poll (docs/agent-api.md): the node's status as soon as it differs
        from `seen`, or `seen` again after `wait` seconds. None, at once, when it cannot
        be waited for: `seen` has no ETag (an agent from before long polls), or WATCHES
        polls are open already (each holds a connection); the caller polls instead."""
        slots = self._watch_slots()
        if seen.tag is None or wait <= 0 or slots.locked():
            return None
        resp, body = await self._exchange(
            slots, node, "GET", f"/v1/status?wait={wait:.3f}",
            headers=f"If-None-Match: {seen.tag}\r\n",
            timeout=wait + _ANSWER,
        )  # fmt: skip
        if resp.status == 304:
            return seen
        return parse_status(body, resp.headers.get("etag"))

    async def status_retrying(self, node: Node) -> NodeStatus:
        return await self._retried(node, "status", lambda: self.status(node))

    async def stage(
        self, node: Node, image: Image, on_bytes: Callable[[int], None] | None = None
    ) -> bool:
        if image.pulled:
            return await self._fetch(node, image, on_bytes)
        return await self._retried(node, "stage", lambda: self._stage_once(node, image, on_bytes))

    async def _stage_once(
        self, node: Node, image: Image, on_bytes: Callable[[int], None] | None
    ) -> bool:
        async def body() -> AsyncIterator[bytes]:
            left = image.size
            with open(image.path, "rb") as fh:  # noqa: ASYNC230 - big reads go to a thread
                while True:
                    # A thread hop costs more than reading a small rest in the loop.
                    if left <= _INLINE:
                        chunk = fh.read(_CHUNK)
                    else:
                        chunk = await asyncio.to_thread(fh.read, _CHUNK)
                    if not chunk:
                        return
                    left -= len(chunk)
                    if on_bytes is not None:
                        on_bytes(len(chunk))
                    yield chunk

        extra = f"X-Image-Digest: {image.digest}\r\nContent-Type: application/octet-stream\r\n"
        if image.signature is not None:
            extra += f"X-Image-Signature: {image.signature}\r\n"
        head = self._head(node, "PUT", "/v1/image", extra, image.size)
        resp = await self._send(
            self._slots(), node, "PUT", "/v1/image", head, body(), keep=True, timeout=None,
            connect_timeout=_STREAM_CONNECT, read_timeout=_STREAM_READ,
        )  # fmt: skip
        return bool(_answer(node, resp).get("written", True))

    async def _fetch(
        self, node: Node, image: Image, on_bytes: Callable[[int], None] | None
    ) -> bool:
        """Pull mode: tell the agent what to fetch, then follow its progress in /v1/status
        until the image is staged (True), or the fetch failed (Refused with its code).

        Posting again is safe (the agent joins a fetch of the same digest), so an agent
        that restarted mid-fetch and forgot it is simply asked again, a bounded number of
        times."""
        body = self.pull.fetch_request(node, image)  # holds credentials: never logged
        seen = 0
        asks = 0
        while True:
            asks += 1
            answer = await self._retried(
                node, "fetch", lambda: self._call(node, "POST", "/v1/fetch", json=body)
            )
            if answer.get("written") is False:
                return False  # already staged
            while True:
                await clock.sleep(self.fetch_poll)
                raw = await self._retried(
                    node, "status", lambda: self._call(node, "GET", "/v1/status")
                )
                fetch = raw.get("fetch") or {}
                mine = fetch.get("digest") == image.digest
                done = int(fetch.get("bytes") or 0) if mine else seen
                if on_bytes is not None and done > seen:
                    on_bytes(done - seen)
                seen = max(seen, done)
                staged = (raw.get("staged") or {}).get("digest") == image.digest
                if mine and fetch.get("state") == "failed":
                    error = fetch.get("error") or {}
                    raise Refused(
                        str(error.get("code", "fetch_failed")), str(error.get("message", ""))
                    )
                if staged and (not mine or fetch.get("state") == "staged"):
                    return True
                if not mine or (fetch.get("state") != "fetching" and raw.get("busy") is None):
                    break  # the agent forgot the fetch (it restarted): ask again
            if asks >= self.attempts:
                raise TransportError(f"{node.id}: the agent lost the fetch {asks} times")

    async def discard(self, node: Node, digest: str) -> bool:
        """Drop an image staged (or being fetched) for a rollout that will not activate
        it; True if the agent had it."""
        answer = await self._call(node, "DELETE", "/v1/image", json={"digest": digest})
        return bool(answer.get("discarded"))

    async def activate(self, node: Node, mode: ActivationMode) -> None:
        """On the node's kept connection (the stage's) when it has one, closed after.
        Sent again only when it provably never left (NotSent), or once, on a fresh
        connection, when the kept one was closed under it before any answer: the agent's
        answer to the second then tells whether the first arrived (`busy` while that switch
        runs, `nothing_staged` once it consumed the staged image: it did, and the boot
        count tells the engine the rest). Any other failure may have arrived: the boot
        count tells the engine."""
        body = {"mode": str(mode)}
        try:
            await self._retried(
                node, "activate",
                lambda: self._call(node, "POST", "/v1/activate", json=body, fresh=True, reuse=True),
                only=NotSent,
            )  # fmt: skip
            return
        except _Unanswered as exc:
            first: TransportError = exc
        if self.on_retry:
            self.on_retry(node, "activate", 1, first)
        try:
            await self._call(node, "POST", "/v1/activate", json=body, fresh=True)
        except NotSent as exc:  # the agent went down: after the first, or on its own
            raise TransportError(f"{first}; sent again: {exc}") from exc
        except Refused as exc:
            if exc.code in _SWITCHED:
                raise TransportError(f"{first}; sent again, the agent says {exc}") from exc
            raise

    async def commit(self, node: Node) -> NodeStatus:
        return parse_status(
            await self._retried(node, "commit", lambda: self._call(node, "POST", "/v1/commit"))
        )

    async def rollback(self, node: Node, mode: ActivationMode) -> None:
        await self._retried(
            node, "rollback",
            lambda: self._call(node, "POST", "/v1/rollback", json={"mode": str(mode)}, fresh=True),
            only=NotSent,
        )  # fmt: skip

    async def lease(self, node: Node, ttl: float) -> bool:
        """Take or renew this driver's lease on the node; Refused("leased") if another
        rollout holds it. True when newly taken."""
        if not self.lease_holder:
            raise ValueError("lease() needs a lease_holder")
        body = {"holder": self.lease_holder, "ttl": ttl}
        answer = await self._call(node, "PUT", "/v1/lease", json=body, fresh=True)
        return bool(answer.get("acquired"))

    async def release(self, node: Node) -> None:
        if self.lease_holder:
            await self._call(
                node, "DELETE", "/v1/lease", json={"holder": self.lease_holder}, fresh=True
            )

    async def close(self) -> None:
        await self._wire.close()


@functools.lru_cache(maxsize=ADDRESS_CACHE)
def _ip_target(address: str) -> tuple[socket.AddressFamily, str, int] | None:
    """(family, host, port) of an agent address whose host is an IP address, else None.

    >>> _ip_target("127.0.0.5:7000")
    (<AddressFamily.AF_INET: 2>, '127.0.0.5', 7000)
    >>> _ip_target("[::1]:7000"), _ip_target("node-1:7000"), _ip_target("10.0.0.1:x")
    ((<AddressFamily.AF_INET6: 10>, '::1', 7000), None, None)
    """
    try:
        host, port = _address(address)
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    return family, str(ip), port


@functools.lru_cache(maxsize=ADDRESS_CACHE)
def _address(address: str) -> tuple[str, int]:
    """(host, port) of an agent address host:port, an IPv6 host without its brackets;
    ValueError when it is not one.

    >>> _address("127.0.0.5:7000"), _address("[::1]:7443"), _address("node-7.example:80")
    (('127.0.0.5', 7000), ('::1', 7443), ('node-7.example', 80))
    """
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"agent address {address!r} is not host:port")
    return host.removeprefix("[").removesuffix("]"), int(port)


def _answer(node: Node, resp: Response) -> dict[str, Any]:
    try:
        body = resp.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        body = {}
    if resp.status >= 500:
        raise TransportError(f"{node.id}: agent answered {resp.status}: {body.get('message', '')}")
    if resp.status == 409 and body.get("error") == "busy":
        # Transient: the agent is finishing another request (e.g. cleaning up an upload
        # a crashed controller abandoned). Worth retrying, like a transport fault.
        raise TransportError(f"{node.id}: agent busy: {body.get('message', '')}")
    if resp.status == 401:
        raise Refused("unauthorized", f"{node.id}: the agent refused the token", resp.status)
    if resp.status >= 400:
        raise Refused(
            str(body.get("error", f"http_{resp.status}")),
            str(body.get("message", "")),
            resp.status,
            holder=body.get("holder"),
            expires_in=float(body.get("expires_in") or 0.0),
        )
    return body


def _describe(exc: BaseException) -> str:
    problem = certificate_problem(exc)
    if problem is not None:
        return f"TLS certificate verification failed: {problem}"[:300]
    return (str(exc) or type(exc).__name__).splitlines()[0][:200]
