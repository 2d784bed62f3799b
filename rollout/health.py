"""Health checks of an updated node, and the healthy-for-long-enough watcher.

Probes (I/O): `http` GETs the workload and compares the status code, `tcp` connects to a
port, `agent` asks the node's agent that the booted digest is the target and the workload
runs. A probe's failure is information, never an exception, and is never retried: the
watcher simply looks again at the next interval.

At most `PROBES` http and tcp probes are open at once (the agent check goes through the
driver, which bounds its own requests), and a probe takes its slot before its timeout
starts. So a batch of thousands of nodes holds a bounded number of sockets, and nodes
that hang until their timeout delay the others' checks but never fail them. (aiohttp's
own connection limit, 100 by default, counts the wait for a free connection against the
request's timeout: behind 100 hanging workloads a healthy node's check timed out while it
waited, tests/test_probe_slots.py.)

Held rounds: when every check of the policy is `agent` and a round passed, the watcher
does not poll again every `interval`: it holds one status long poll (`Driver.watch`) for
the rest of `min_healthy_time` (at most `HOLD_MAX` seconds at a time), when that stands
for at least `HOLD_ROUNDS` rounds (a single round left costs the same request either
way, and stays a round). The agent answers it the moment the node's status changes, so
a workload that crashes during that time is seen at once rather than at the next round,
and a node costs one request where it cost a round per interval (13 of them for 5 s
rounds over 60 s). Unchanged at the end means it
passed throughout. A failed round goes back to rounds every `interval`, so
`failure_threshold` still counts rounds that far apart. A probe that cannot hold (an
agent without ETags, the driver's long polls all taken) falls back to rounds.

The first round of `agent` checks is the status the boot wait has just read (the node
back on its new boot, its workload past starting): a request then would ask the agent
the same question a moment later (`Probe.first_round`).

`HealthTracker` (pure) turns a sequence of (time, all-checks-ok) observations into a
verdict. A node is healthy only after passing continuously for `min_healthy_time`; any
failed round resets that clock. It fails early after `failure_threshold` consecutive
failed rounds (0 disables this), and fails when `deadline` passes first.

Worked example, min_healthy_time=3, deadline=10, failure_threshold=0, rounds every 1 s::

    t=0 ok   -> pending (healthy since 0)
    t=1 fail -> pending (streak reset)
    t=2 ok   -> pending (healthy since 2)
    t=5 ok   -> healthy (held 3 s)
"""

from __future__ import annotations

import asyncio
import enum
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import aiohttp

from rollout import clock
from rollout.drivers.base import Driver, DriverError
from rollout.model import Node, NodeStatus
from rollout.policy import AgentCheck, Check, Health, HttpCheck, TcpCheck

PROBES = 64  # http and tcp probes open at once, per rollout
HOLD_MAX = 30.0  # seconds one held round waits at most (the agent allows 60)
# Rounds a held poll must stand for. It rides the node's kept connection, as a round
# does, but takes one of the driver's long-poll slots and an agent's handler for its
# whole wait: worth it from two rounds on (benchmarks/bench_http.py).
HOLD_ROUNDS = 2

# Clocks add up floats: 24 rounds of 5 s may read 119.99999999999999 s. Durations are
# compared with this much slack so that a check due at the deadline counts as at it.
_EPSILON = 1e-6


class Verdict(enum.StrEnum):
    PENDING = "pending"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"  # failure_threshold consecutive failures
    DEADLINE = "deadline"  # never healthy long enough before the deadline


@dataclass
class HealthTracker:
    started: float
    min_healthy_time: float
    deadline: float
    failure_threshold: int = 0
    healthy_since: float | None = None
    consecutive_failures: int = 0

    def observe(self, now: float, ok: bool) -> Verdict:
        if ok:
            self.consecutive_failures = 0
            if self.healthy_since is None:
                self.healthy_since = now
            if now - self.healthy_since >= self.min_healthy_time - _EPSILON:
                return Verdict.HEALTHY
        else:
            self.healthy_since = None
            self.consecutive_failures += 1
            if self.failure_threshold and self.consecutive_failures >= self.failure_threshold:
                return Verdict.UNHEALTHY
        if now - self.started >= self.deadline - _EPSILON:
            return Verdict.DEADLINE
        return Verdict.PENDING

    def until_due(self, now: float) -> float:
        """Seconds from `now` until time alone could give a verdict: the node healthy for
        long enough (when it is passing), or the deadline.

        >>> t = HealthTracker(started=0.0, min_healthy_time=3.0, deadline=10.0)
        >>> t.until_due(1.0), t.observe(2.0, True), t.until_due(2.5), t.until_due(6.0)
        (9.0, <Verdict.PENDING: 'pending'>, 2.5, 0.0)
        """
        due = self.started + self.deadline
        if self.healthy_since is not None:
            due = min(due, self.healthy_since + self.min_healthy_time)
        return max(0.0, due - now)


@dataclass(frozen=True)
class CheckResult:
    kind: str
    ok: bool
    detail: str
    # The agent check's status, which a held round waits on (None for other checks).
    status: NodeStatus | None = field(default=None, compare=False)


class Probe(Protocol):
    """Runs a policy's checks against one node: `Prober` over the network, or a
    simulation (drivers/sim.py) in tests on virtual time."""

    async def check_all(
        self, checks: Sequence[Check], node: Node, target_digest: str
    ) -> list[CheckResult]: ...

    async def hold(
        self, checks: Sequence[Check], node: Node, target_digest: str, results: list[CheckResult],
        wait: float, interval: float,
    ) -> list[CheckResult] | None:  # fmt: skip
        """`results` just passed: wait up to `wait` seconds for the node to change, then
        the checks' results (at once on a change; `results` again after `wait` when
        nothing did). None when this cannot be waited for: the caller runs rounds. A
        prober that is not told of changes (the simulation) looks every `interval`."""
        ...

    def first_round(
        self, checks: Sequence[Check], target_digest: str, st: NodeStatus
    ) -> list[CheckResult] | None:
        """The first round's results read from `st`, the node's status just read (the
        boot wait's last), when the checks are judged on that alone; else None, and the
        first round is a round."""
        ...


def probe_session() -> aiohttp.ClientSession:
    """The session of a rollout's probes (and gates): no connection limit of its own, for
    `Prober`'s slots bound the probes outside their timeouts."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))


class Prober:
    """Runs a policy's checks against one node."""

    def __init__(self, driver: Driver, session: aiohttp.ClientSession, slots: int = PROBES) -> None:
        self.driver = driver
        self.session = session  # its connector unbounded (`probe_session`): slots bound it
        self.slots = asyncio.Semaphore(slots)

    async def check(self, check: Check, node: Node, target_digest: str) -> CheckResult:
        if isinstance(check, HttpCheck):
            async with self.slots:  # before the timeout starts: waiting is not the node's fault
                return await self._http(check, node)
        if isinstance(check, TcpCheck):
            async with self.slots:
                return await self._tcp(check, node)
        if isinstance(check, AgentCheck):
            return await self._agent(node, target_digest)
        raise TypeError(f"unknown check {check!r}")

    async def hold(
        self, checks: Sequence[Check], node: Node, target_digest: str, results: list[CheckResult],
        wait: float, interval: float,
    ) -> list[CheckResult] | None:  # fmt: skip
        """A status long poll for a policy of `agent` checks only (module docstring); the
        agent tells of a change, so `interval` plays no part."""
        seen = results[0].status if results else None
        if seen is None or not agent_only(checks):
            return None
        try:
            st = await self.driver.watch(node, seen, min(wait, HOLD_MAX))
        except DriverError as exc:
            return [CheckResult("agent", False, f"status: {exc}") for _ in checks]
        if st is None:
            return None
        if st is seen:  # unchanged (304)
            return results
        return [_agent_result(st, target_digest) for _ in checks]

    def first_round(
        self, checks: Sequence[Check], target_digest: str, st: NodeStatus
    ) -> list[CheckResult] | None:
        """`agent` checks only: what a status request now would answer (module docstring)."""
        if not agent_only(checks):
            return None
        return [_agent_result(st, target_digest) for _ in checks]

    async def check_all(
        self, checks: Sequence[Check], node: Node, target_digest: str
    ) -> list[CheckResult]:
        if len(checks) == 1:  # the usual policy: no task for gather to wrap it in
            return [await self.check(checks[0], node, target_digest)]
        return list(await asyncio.gather(*(self.check(c, node, target_digest) for c in checks)))

    async def _http(self, check: HttpCheck, node: Node) -> CheckResult:
        url = f"http://{node.host}:{check.port}{check.path}"
        try:
            async with self.session.get(
                url, timeout=aiohttp.ClientTimeout(total=check.timeout), allow_redirects=False
            ) as resp:
                await resp.read()
                ok = resp.status == check.expect_status
                return CheckResult("http", ok, f"GET {check.path} -> {resp.status}")
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return CheckResult("http", False, f"GET {check.path}: {type(exc).__name__}")

    async def _tcp(self, check: TcpCheck, node: Node) -> CheckResult:
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(node.host, check.port), check.timeout
            )
        except (TimeoutError, OSError) as exc:
            return CheckResult("tcp", False, f"connect :{check.port}: {type(exc).__name__}")
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass
        return CheckResult("tcp", True, f"connect :{check.port}")

    async def _agent(self, node: Node, target_digest: str) -> CheckResult:
        try:
            st = await self.driver.status(node)
        except DriverError as exc:
            return CheckResult("agent", False, f"status: {exc}")
        return _agent_result(st, target_digest)


def agent_only(checks: Sequence[Check]) -> bool:
    """Whether every check is the `agent` one: judged on the node's status alone, so it
    can be held and read from the boot wait's status."""
    return all(isinstance(c, AgentCheck) for c in checks)


def _agent_result(st: NodeStatus, target_digest: str) -> CheckResult:
    """The `agent` check's verdict on a status: on the target, its workload running."""
    if st.booted_digest != target_digest:
        return CheckResult("agent", False, f"booted {st.booted_version} is not the target")
    if st.workload != "running":
        return CheckResult("agent", False, f"workload {st.workload}")
    return CheckResult("agent", True, "on target, workload running", st)


async def watch(
    prober: Probe,
    health: Health,
    node: Node,
    target_digest: str,
    on_result: Callable[[CheckResult], None] | None = None,
    booted: NodeStatus | None = None,
) -> tuple[Verdict, str]:
    """Check `node` every interval, or hold it once it passes (held rounds, module
    docstring), until it is healthy long enough, or fails. `booted`, the status the boot
    wait just read, is the first round when the prober can judge it (`first_round`).

    Returns the verdict and the detail of the last failed check (empty when healthy).
    """
    tracker = HealthTracker(
        started=clock.now(),
        min_healthy_time=health.min_healthy_time,
        deadline=health.deadline,
        failure_threshold=health.failure_threshold,
    )
    last_failure = ""
    passed: list[CheckResult] | None = None  # the last round, when it passed
    first = None if booted is None else prober.first_round(health.checks, target_digest, booted)
    while True:
        results, first = first, None
        if passed is not None:
            wait = tracker.until_due(clock.now())
            if math.ceil(wait / health.interval - _EPSILON) >= HOLD_ROUNDS:
                results = await prober.hold(
                    health.checks, node, target_digest, passed, wait, health.interval
                )
            if results is None:  # not held: a round after the interval
                await clock.sleep(health.interval)
        if results is None:
            results = await prober.check_all(health.checks, node, target_digest)
        for r in results:
            if on_result is not None:
                on_result(r)
            if not r.ok:
                last_failure = f"{r.kind}: {r.detail}"
        ok = all(r.ok for r in results)
        verdict = tracker.observe(clock.now(), ok)
        if verdict is not Verdict.PENDING:
            return verdict, "" if verdict is Verdict.HEALTHY else last_failure
        passed = results if ok else None
        if passed is None:
            await clock.sleep(health.interval)
