"""The agent driver: reaches a node's agent over its HTTP API v1 (docs/agent-api.md).

Each node's bearer token is read from its token file once and kept in memory; it never
appears in logs or errors.

Connections: two aiohttp sessions serve all nodes, so the cost stays per request, not per
node, at thousands of nodes (benchmarks/bench_http.py):

- a keep-alive pool for the calls a node makes in a row while it is being updated
  (status polls, stage, commit, discard, fetch): a new TCP connection per request costs
  about 3x the client CPU of a reused one. Idle connections are dropped after
  `KEEPALIVE` seconds, so the pool holds about one per node in flight, not one per node
  of the fleet: the open files stay bounded by the batch, not the fleet, under the usual
  1,024 soft limit. A connection the agent closed meanwhile (it rebooted) is not reused;
  aiohttp resends an idempotent request (GET, PUT, DELETE) once if the agent closed it
  just as it was sent, and `commit` is retried here.
- a fresh connection, closed after the answer, for the rest: `activate` and `rollback`,
  which are not idempotent, so they never ride a reused connection that could fail
  without telling whether the request arrived; and the leases, taken, renewed and
  released for every node of the fleet at once or in a sweep, which in the pool would
  leave one idle socket per node behind.

Each session has at most `CONNECTIONS` requests in flight; more wait for a free slot
before their timeout starts (`_Pool`).

URLs: a node's request URLs are parsed once and kept in a bounded LRU cache (`_agent_url`),
since parsing a URL string is about a tenth of a pooled request's client CPU and the nodes
in flight ask for the same few URLs again and again (boot polls, health rounds).

TLS: a node with a `ca_file` is reached at `https://host:port`, and the agent's certificate
must chain to that CA and name the address's host (an IP address in its IP
subjectAltNames); a node without one over plain HTTP. A certificate that does not verify
is a `TransportError` ("TLS certificate verification failed: ..."), so the engine treats
the node as unreachable, never as a crash; there is no way to skip verification.

A node that is down: once a status poll could not connect (the node is rebooting), the
next polls first try a bare TCP connect to its address, when that is an IP address, and
send the request only once that connects. A refused connect costs the client about a
third of a refused aiohttp request (37 µs against 128 here), and a reboot is 15-20 such
polls a node, thousands a second in a big batch. A host name goes the usual way (its
DNS answer is cached by aiohttp; the probe would resolve it each time).

Retries: only idempotent calls are retried on transport errors (status, stage, commit),
with tenacity's explicit stop and wait. `activate` and `rollback` are sent again only when
the connection could not even be made (`NotSent`: nothing left); once the request may have
reached the agent, the engine learns what happened from the agent's `boot_count` instead
of risking a second boot.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)
from yarl import URL

from rollout import clock
from rollout.agent.status import AgentStatus
from rollout.drivers.base import NotSent, Refused, TransportError
from rollout.errors import InputError
from rollout.model import ActivationMode, Image, Node, NodeStatus
from rollout.pull import PullAccess
from rollout.tls import certificate_problem, client_context
from rollout.tokens import read_token

_CHUNK = 1 << 20  # image bytes per read and per write to the socket
CONNECTIONS = 64  # requests in flight per session (pooled, fresh)
WATCHES = 256  # status long polls open at once (each holds a connection); more nodes poll
# Seconds an idle pooled connection is kept: longer than the longest gap between two boot
# polls (steps.BOOT_POLL_MAX, 2 s), so a node that answers keeps its connection.
KEEPALIVE = 3.0
URL_CACHE = 8192  # parsed URLs kept: a few per node in flight, bounded at any fleet size
_ANSWER = 10.0  # seconds an agent has to answer a request (beyond a long poll's wait)
_SHORT = aiohttp.ClientTimeout(total=_ANSWER, sock_connect=3)
_STREAM = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=60)
_PROBE_CONNECT = 3.0  # seconds for the bare connect to a node that is down (sock_connect)

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
        self._pooled: _Pool | None = None  # keep-alive
        self._once: _Pool | None = None  # a connection per request
        self._watching: _Pool | None = None  # status long polls
        self._tokens: dict[str, str] = {}
        self._contexts: dict[str, ssl.SSLContext] = {}
        self.attempts = attempts
        self.wait_max = wait_max
        self.on_retry = on_retry
        self.lease_holder = lease_holder  # sent on mutating calls (X-Rollout-Lease)
        self._down: set[str] = set()  # ids of nodes whose last status could not connect

    # -- plumbing -----------------------------------------------------------------------
    def _http(self, fresh: bool = False) -> _Pool:
        """The keep-alive pool, or with `fresh` the one of a connection per request."""
        if fresh:
            if self._once is None or self._once.session.closed:
                self._once = _Pool(force_close=True)
            return self._once
        if self._pooled is None or self._pooled.session.closed:
            self._pooled = _Pool(force_close=False)
        return self._pooled

    def _http_watch(self) -> _Pool:
        """The long polls' own pool: they hold their connection while they wait, so in the
        keep-alive pool they would starve the other requests of its CONNECTIONS."""
        if self._watching is None or self._watching.session.closed:
            self._watching = _Pool(force_close=False, limit=WATCHES)
        return self._watching

    def _token(self, node: Node) -> str:
        if node.token_file is None:
            raise InputError(f"node {node.id}: no token_file in the inventory")
        if node.token_file not in self._tokens:
            what = f"node {node.id}: token file"
            self._tokens[node.token_file] = read_token(node.token_file, what)
        return self._tokens[node.token_file]

    def _headers(self, node: Node) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self._token(node)}"}
        if self.lease_holder:
            headers["X-Rollout-Lease"] = self.lease_holder
        return headers

    def _url(self, node: Node, path: str) -> URL:
        return _agent_url(node.scheme, node.address, path)

    def _ssl(self, node: Node) -> ssl.SSLContext | bool:
        """The node's TLS client context (verifying against its CA), True for plain HTTP
        (aiohttp's default; unused with an http:// URL)."""
        if node.ca_file is None:
            return True
        if node.ca_file not in self._contexts:
            self._contexts[node.ca_file] = client_context(
                node.ca_file, option=f"node {node.id}: ca_file"
            )
        return self._contexts[node.ca_file]

    async def _call(
        self,
        node: Node,
        method: str,
        path: str,
        json: dict[str, Any] | None = None,
        *,
        fresh: bool = False,
    ) -> dict[str, Any]:
        return (await self._exchange(self._http(fresh), node, method, path, json))[1]

    async def _exchange(
        self,
        pool: _Pool,
        node: Node,
        method: str,
        path: str,
        json: dict[str, Any] | None = None,
        *,
        headers: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
        timeout: aiohttp.ClientTimeout = _SHORT,
    ) -> tuple[aiohttp.ClientResponse, dict[str, Any]]:
        """One request through `pool`: the response (its status and headers) and its JSON
        object body ({} for none); errors as `_answer` maps them."""
        try:
            async with (
                pool.slots,
                pool.session.request(
                    method,
                    self._url(node, path),
                    json=json,
                    params=params,
                    headers=self._headers(node) | headers if headers else self._headers(node),
                    timeout=timeout,
                    ssl=self._ssl(node),
                ) as resp,
            ):
                return resp, await _answer(node, resp)
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            # Connecting failed: nothing of the request was sent.
            raise NotSent(f"{node.id}: {method} {path}: {_describe(exc)}") from exc
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
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

    # -- Driver -------------------------------------------------------------------------
    async def status(self, node: Node) -> NodeStatus:
        """One status request, not retried: callers poll (a rebooting node is expected).
        A node found down is probed with a bare connect first (module docstring)."""
        pool = self._http()
        if node.id in self._down:
            await self._connectable(pool, node, "GET /v1/status")
        try:
            resp, body = await self._exchange(pool, node, "GET", "/v1/status")
        except NotSent:
            self._down.add(node.id)
            raise
        self._down.discard(node.id)
        return parse_status(body, resp.headers.get("ETag"))

    async def _connectable(self, pool: _Pool, node: Node, what: str) -> None:
        """Return once a TCP connection to `node` can be made (and closed at once); raise
        NotSent as the request would when it cannot. Host names are not probed."""
        target = _ip_target(node.address)
        if target is None:
            return
        family, host, port = target
        loop = asyncio.get_running_loop()
        async with pool.slots:
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
        pool = self._http_watch()
        if seen.tag is None or wait <= 0 or pool.slots.locked():
            return None
        resp, body = await self._exchange(
            pool, node, "GET", "/v1/status",
            headers={"If-None-Match": seen.tag},
            params={"wait": f"{wait:.3f}"},
            timeout=aiohttp.ClientTimeout(total=wait + _ANSWER, sock_connect=3),
        )  # fmt: skip
        if resp.status == 304:
            return seen
        return parse_status(body, resp.headers.get("ETag"))

    async def status_retrying(self, node: Node) -> NodeStatus:
        async for attempt in self._retrying(node, "status"):
            with attempt:
                return await self.status(node)
        raise AssertionError("unreachable")

    async def stage(
        self, node: Node, image: Image, on_bytes: Callable[[int], None] | None = None
    ) -> bool:
        if image.pulled:
            return await self._fetch(node, image, on_bytes)
        async for attempt in self._retrying(node, "stage"):
            with attempt:
                return await self._stage_once(node, image, on_bytes)
        raise AssertionError("unreachable")

    async def _stage_once(
        self, node: Node, image: Image, on_bytes: Callable[[int], None] | None
    ) -> bool:
        async def body() -> AsyncIterator[bytes]:
            with open(image.path, "rb") as fh:  # noqa: ASYNC230 - reads go to a thread
                while chunk := await asyncio.to_thread(fh.read, _CHUNK):
                    if on_bytes is not None:
                        on_bytes(len(chunk))
                    yield chunk

        headers = self._headers(node) | {
            "X-Image-Digest": image.digest,
            "Content-Type": "application/octet-stream",
            "Content-Length": str(image.size),
        }
        if image.signature is not None:
            headers["X-Image-Signature"] = image.signature
        pool = self._http()
        try:
            async with (
                pool.slots,
                pool.session.put(
                    self._url(node, "/v1/image"),
                    data=body(),
                    headers=headers,
                    timeout=_STREAM,
                    ssl=self._ssl(node),
                ) as resp,
            ):
                answer = await _answer(node, resp)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise TransportError(f"{node.id}: PUT /v1/image: {_describe(exc)}") from exc
        return bool(answer.get("written", True))

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
            async for attempt in self._retrying(node, "fetch"):
                with attempt:
                    answer = await self._call(node, "POST", "/v1/fetch", json=body)
            if answer.get("written") is False:
                return False  # already staged
            while True:
                await clock.sleep(self.fetch_poll)
                async for attempt in self._retrying(node, "status"):
                    with attempt:
                        raw = await self._call(node, "GET", "/v1/status")
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
        """Sent again only when it provably never left (NotSent): any other failure may
        have arrived, and the boot count tells the engine."""
        async for attempt in self._retrying(node, "activate", only=NotSent):
            with attempt:
                await self._call(node, "POST", "/v1/activate", json={"mode": str(mode)}, fresh=True)
                return
        raise AssertionError("unreachable")

    async def commit(self, node: Node) -> NodeStatus:
        async for attempt in self._retrying(node, "commit"):
            with attempt:
                return parse_status(await self._call(node, "POST", "/v1/commit"))
        raise AssertionError("unreachable")

    async def rollback(self, node: Node, mode: ActivationMode) -> None:
        async for attempt in self._retrying(node, "rollback", only=NotSent):
            with attempt:
                await self._call(node, "POST", "/v1/rollback", json={"mode": str(mode)}, fresh=True)
                return
        raise AssertionError("unreachable")

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
        for pool in (self._pooled, self._once, self._watching):
            if pool is not None:
                await pool.session.close()


class _Pool:
    """One aiohttp session and its request slots.

    The slots are taken before aiohttp sees a request, so a request's timeout runs from
    when it has a connection, not while it waits behind a thousand others (2,000 leases
    taken at once): the timeout measures the agent, not this process's queue. It also
    keeps the event loop's turns short, so that a connect is not timed out by a loop busy
    setting up a herd of requests."""

    def __init__(self, *, force_close: bool, limit: int = CONNECTIONS) -> None:
        keepalive = None if force_close else KEEPALIVE
        connector = aiohttp.TCPConnector(
            limit=limit, force_close=force_close, keepalive_timeout=keepalive
        )
        self.session = aiohttp.ClientSession(connector=connector)
        self.slots = asyncio.Semaphore(limit)


@functools.lru_cache(maxsize=URL_CACHE)
def _ip_target(address: str) -> tuple[socket.AddressFamily, str, int] | None:
    """(family, host, port) of an agent address whose host is an IP address, else None.

    >>> _ip_target("127.0.0.5:7000")
    (<AddressFamily.AF_INET: 2>, '127.0.0.5', 7000)
    >>> _ip_target("[::1]:7000"), _ip_target("node-1:7000"), _ip_target("10.0.0.1:x")
    ((<AddressFamily.AF_INET6: 10>, '::1', 7000), None, None)
    """
    host, _, port = address.rpartition(":")
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
        number = int(port)
    except ValueError:
        return None
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    return family, str(ip), number


@functools.lru_cache(maxsize=URL_CACHE)
def _agent_url(scheme: str, address: str, path: str) -> URL:
    """The parsed URL of `path` on the agent at `address` (host:port)."""
    return URL(f"{scheme}://{address}{path}")


async def _answer(node: Node, resp: aiohttp.ClientResponse) -> dict[str, Any]:
    try:
        body = await resp.json(content_type=None)
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
