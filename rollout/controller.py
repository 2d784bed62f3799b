"""The controller: rollouts as journaled objects, created, run, resumed and commanded.

Both front ends use it: `rollout run` (one rollout in the foreground) and `rollout serve`
(any number over disjoint nodes, driven over HTTP). It owns:

- creation: plan, lock the nodes in the store (one rollout per node), journal `created`;
- execution: rebuild policy, image, plan and node records from the journal, take the
  agents' leases, run the engine, keep locks and leases renewed while it runs, release
  them when the rollout finishes;
- commands: pause, resume, abort, retry, rollback, each checked against the rollout's
  phase (an illegal one raises `IllegalCommand` and changes nothing) and journaled;
- wait-gate signals, by the token-authenticated path or by each gate's pre-signed URL
  (`signal_paths`, `signal_by_secret`; the secret is derived from the signal key beside
  the state file, never journaled: rollout.gates.handles).

The service creates with `create_claimed`: every node's agent lease is taken for the new
rollout before anything is journaled, so a rollout of another controller (another state
file) over those nodes is refused at once (LockConflict naming it), not left pending.

A crashed controller resumes by calling `execute` again on the unfinished rollout: the
engine reconciles each node's journaled phase with its agent's status.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Literal, Protocol

import aiohttp

from rollout.control import Control
from rollout.decide import refusal
from rollout.drivers.agent import AgentDriver
from rollout.drivers.base import Driver, Refused, TransportError
from rollout.engine import Engine
from rollout.entries import (
    CommandEntry,
    CreatedEntry,
    GateEntry,
    ImageData,
    InventoryNode,
    PhaseEntry,
    PlannedBatch,
)
from rollout.errors import InputError
from rollout.events import Fanout, Observer, Retried, RolloutPhaseChanged, WebhookFailed
from rollout.gates.handles import SignalKey, signal_path
from rollout.gates.runner import utc_now
from rollout.gates.signals import GateBoxes, Signal, parse_signal
from rollout.journal import (
    FINISHED,
    LockConflict,
    RolloutJournal,
    RolloutState,
    Store,
    load_state,
)
from rollout.model import Batch, Image, Node, NodePhase, RolloutPhase
from rollout.plan import plan_batches
from rollout.policy import Gate, Policy, parse_policy
from rollout.pull import PullAccess
from rollout.record import NodeRecord, RolloutResult
from rollout.steps import REACH_TIMEOUT
from rollout.tls import client_context
from rollout.tokens import read_token
from rollout.webhooks import Notifier, WebhookObserver

LOCK_TTL = 30.0  # seconds a rollout's node locks (in the state file) live without renewal
# Seconds an agent lease lives without renewal. Longer than the lock: it must outlast a
# node's reboot (the node cannot be renewed while it is down, and a server's firmware
# alone may take minutes), and each renewal sweep is a request to every node of the
# fleet, so its cost per second is nodes / (ttl / 3). The price: nodes of a controller
# that died and never comes back wait up to this long before another rollout may take
# them (the same rollout, resumed, takes its own leases back at once).
LEASE_TTL = 300.0
LEASE_MAX_TTL = 3600.0  # the most an agent grants (docs/agent-api.md, PUT /v1/lease)
# Lease renewals a sweep may cost per second, on average: at 100,000 nodes a 300 s lease
# renewed every 100 s would be 1,000 requests a second (on fresh connections, ~0.7 ms of
# CPU each: most of a core), so a large fleet's leases live longer instead.
LEASE_RENEW_RATE = 100.0


def lease_ttl_for(fleet: int, ttl: float = LEASE_TTL) -> float:
    """The agent-lease ttl for a rollout of `fleet` nodes: `ttl`, raised for a large fleet
    so that renewing every lease each ttl / 3 costs at most LEASE_RENEW_RATE requests a
    second, up to the agent's cap (past 120,000 nodes the rate grows instead).

    >>> [lease_ttl_for(n) for n in (30, 2_000, 10_000, 20_000, 100_000, 1_000_000)]
    [300.0, 300.0, 300.0, 600.0, 3000.0, 3600.0]
    """
    return max(ttl, min(LEASE_MAX_TTL, 3 * fleet / LEASE_RENEW_RATE))


class LeasingDriver(Driver, Protocol):
    """A driver that also takes and releases agent leases (one rollout per node)."""

    async def lease(self, node: Node, ttl: float) -> bool: ...

    async def release(self, node: Node) -> None: ...


RetryHook = Callable[[Node, str, int, BaseException], None]
# (rollout id = lease holder, how nodes reach the image store, retry hook) -> driver
DriverFactory = Callable[[str, PullAccess, RetryHook | None], LeasingDriver]


def agent_driver(holder: str, pull: PullAccess, on_retry: RetryHook | None) -> LeasingDriver:
    """The default driver: the nodes' agents over their HTTP API."""
    return AgentDriver(lease_holder=holder, on_retry=on_retry, pull=pull)


@dataclass(frozen=True)
class Pick:
    """What `rollout run` does with a journal: resume an unfinished rollout of the same
    nodes and image, retry a halted one, or create a new one."""

    kind: Literal["resume", "retry", "new"]
    rollout_id: str | None = None
    phase: RolloutPhase | None = None
    tag_moved_from: str | None = None  # resume: the pinned source, when the tag moved since


def pick(states: Sequence[RolloutState], wanted: frozenset[str], image: Image) -> Pick:
    """Decide, from the journal's rollouts (oldest first), what a run of `image` over the
    nodes `wanted` does. An unfinished rollout over some of those nodes with another
    image or node set is an InputError: one rollout per node."""
    for state in (s for s in states if not s.finished):
        overlap = wanted & set(state.node_ids)
        if not overlap:
            continue
        journaled = state.created.image
        same_tag = image.reference is not None and journaled.reference == image.reference
        if (journaled.digest == image.digest or same_tag) and set(state.node_ids) == wanted:
            moved = journaled.source if journaled.digest != image.digest else None
            return Pick("resume", state.rollout_id, state.phase, moved)
        raise InputError(
            f"rollout {state.rollout_id} (image {journaled.version}) over "
            f"{', '.join(sorted(overlap)[:5])} is not finished in this state file; resume it "
            "by running it again with its inventory and image, or use another --state"
        )
    halted = [
        s for s in states
        if s.phase is RolloutPhase.HALTED and set(s.node_ids) == wanted
        and s.created.image.digest == image.digest
    ]  # fmt: skip
    if halted:  # the same command again after a halt: retry its failed nodes
        return Pick("retry", halted[-1].rollout_id, halted[-1].phase)
    return Pick("new")


class IllegalCommand(Exception):
    """A command that does not apply to the rollout's phase (HTTP 409)."""


class UnknownRollout(KeyError):
    """No such rollout id (HTTP 404)."""


class UnknownGate(LookupError):
    """The rollout's policy has no such gate (HTTP 404)."""


class UnknownSignalURL(LookupError):
    """A pre-signed signal URL that is not one: wrong secret, rollout or gate (HTTP 404,
    the same answer whichever part was wrong)."""


def _node_json(node: Node) -> dict[str, Any]:
    return {
        "id": node.id,
        "address": node.address,
        "labels": dict(node.labels),
        "token_file": node.token_file,
        "ca_file": node.ca_file,
    }


def _node_from(data: InventoryNode) -> Node:
    return Node(data.id, data.address, dict(data.labels), data.token_file, data.ca_file)


@dataclass
class Loaded:
    """A rollout rebuilt from its journal, ready to execute."""

    state: RolloutState
    policy: Policy
    image: Image
    nodes: dict[str, Node]
    batches: tuple[Batch, ...]
    records: dict[str, NodeRecord] = field(default_factory=dict)


def rebuild(state: RolloutState) -> Loaded:
    created = state.created
    policy = parse_policy(created.policy, f"journal of {state.rollout_id}")
    image = Image(**created.image.model_dump())
    nodes = {n.id: _node_from(n) for n in created.inventory}
    batches = tuple(
        Batch(b.index, tuple(nodes[i] for i in b.nodes), b.canary) for b in created.batches
    )
    records = {
        node_id: NodeRecord.from_snapshot(nodes[node_id], snap)
        for node_id, snap in state.nodes.items()
        if node_id in nodes
    }
    return Loaded(state, policy, image, nodes, batches, records)


def check_tokens(nodes: Sequence[Node]) -> None:
    """Every node's token file must be readable and non-empty, and its CA file (if any) a
    readable PEM CA certificate (InputError naming it). Each file is read once: a fleet
    usually shares one of each (the inventory's top level)."""
    tokens: set[str] = set()
    cas: set[str] = set()
    for node in nodes:
        if node.token_file is None:
            raise InputError(
                f"node {node.id}: no token_file; set token_file in the inventory (top level "
                "or on the node)"
            )
        if node.token_file not in tokens:
            read_token(node.token_file, f"node {node.id}: token file")
            tokens.add(node.token_file)
        if node.ca_file is not None and node.ca_file not in cas:
            client_context(node.ca_file, option=f"node {node.id}: ca_file")
            cas.add(node.ca_file)


def new_rollout_id() -> str:
    return uuid.uuid4().hex[:12]


class Controller:
    def __init__(
        self,
        store: Store,
        observer_for: Callable[[str], Observer] = lambda rollout_id: lambda event: None,
        lock_ttl: float = LOCK_TTL,
        lease_ttl: float = LEASE_TTL,
        reach_timeout: float = REACH_TIMEOUT,
        signal_key: SignalKey | None = None,
        driver_for: DriverFactory | None = None,
        wall_clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.store = store
        # Each rollout's driver, made for it (lease holder, registry access, retry hook):
        # the agents' HTTP API by default; tests inject the simulated fleet.
        self.driver_for: DriverFactory = driver_for or agent_driver
        # The key of the wait gates' signal URLs: beside the state file by default.
        path = getattr(store, "path", ":memory:")
        self.signal_key = signal_key or SignalKey.beside(str(path))
        self.observer_for = observer_for  # each rollout's engine reports to its own observer
        self.lock_ttl = lock_ttl
        self.lease_ttl = lease_ttl
        self.reach_timeout = reach_timeout
        self.wall_clock = wall_clock  # window gates' clock: virtual in `rollout simulate`
        self.controls: dict[str, Control] = {}
        self.boxes: dict[str, GateBoxes] = {}
        self.stop_after: dict[str, int] = {}  # rollout id -> stop after this batch (CI)
        self.engines: dict[str, Engine] = {}
        self.tasks: dict[str, asyncio.Task[RolloutResult]] = {}

    # -- creation -------------------------------------------------------------------------
    def create(
        self,
        nodes: Sequence[Node],
        policy: Policy,
        image: Image,
        policy_name: str = "",
        by: str = "cli",
        rollout_id: str | None = None,
        pull: PullAccess | None = None,
    ) -> RolloutState:
        """Plan and journal a new rollout, locking its nodes; LockConflict if overlapping.

        `pull`: how nodes reach the image store when `image` is pulled (journaled as
        paths: the credentials stay in the auth file)."""
        if not nodes:
            raise InputError("the rollout selects no nodes")
        check_tokens(nodes)  # refuse before anything is journaled or locked
        rollout_id = rollout_id or new_rollout_id()
        batches = plan_batches(nodes, policy)
        if any(g.kind == "wait" for g in policy.gates):
            self.signal_key.key()  # an unusable key file is refused before anything
        self.store.lock(rollout_id, [n.id for n in nodes], self.lock_ttl)
        self.store.append(
            rollout_id,
            CreatedEntry(
                by=by,
                policy_name=policy_name,
                policy=policy.model_dump(mode="json"),
                # The signature is public: it travels to every agent. Pull mode: `source`
                # is pinned, so a moved tag changes nothing.
                image=ImageData(**dataclasses.asdict(image)),
                pull=(pull or PullAccess()).to_json(),
                inventory=tuple(InventoryNode(**_node_json(n)) for n in nodes),
                batches=tuple(
                    PlannedBatch(index=b.index, canary=b.canary, nodes=b.node_ids) for b in batches
                ),
            ),
        )
        return load_state(self.store, rollout_id)

    async def create_claimed(
        self,
        nodes: Sequence[Node],
        policy: Policy,
        image: Image,
        policy_name: str = "",
        by: str = "api",
        pull: PullAccess | None = None,
    ) -> RolloutState:
        """`create`, after taking every node's agent lease for the new rollout.

        Another rollout's lease in force on any node (that of another controller, sharing
        nothing but the nodes, or of this one) raises LockConflict naming it and until
        when; then the leases just taken are released, and nothing is journaled or locked.
        An unreachable node is not a refusal (the engine deals with it, as on a resume).
        """
        if not nodes:
            raise InputError("the rollout selects no nodes")
        check_tokens(nodes)  # the lease requests need the tokens
        plan_batches(nodes, policy)
        rollout_id = new_rollout_id()
        driver = self.driver_for(rollout_id, PullAccess(), None)
        try:
            try:
                await self._lease_all(driver, list(nodes), rollout_id)
                return self.create(nodes, policy, image, policy_name, by, rollout_id, pull)
            except BaseException:
                await self._release_all(driver, list(nodes), rollout_id)
                raise
        except Refused as exc:  # e.g. the inventory's token for a node is not the agent's
            raise InputError(f"an agent refused the new rollout's lease: {exc}") from None
        finally:
            await driver.close()

    def resume_or_create(
        self,
        nodes: Sequence[Node],
        policy: Policy,
        image: Image,
        policy_name: str = "",
        by: str = "run",
        pull: PullAccess | None = None,
    ) -> tuple[str, Pick, list[str]]:
        """Carry out `pick`: journal the resume (a paused rollout runs again) or the retry,
        or create the rollout. Returns its id, the pick and the nodes tried again."""
        states = [load_state(self.store, r) for r in self.store.rollout_ids()]
        chosen = pick(states, frozenset(n.id for n in nodes), image)
        if chosen.kind == "new":
            state = self.create(nodes, policy, image, policy_name=policy_name, by=by, pull=pull)
            return state.rollout_id, chosen, []
        assert chosen.rollout_id is not None
        if chosen.kind == "retry":
            return chosen.rollout_id, chosen, self.journal_retry(self.state(chosen.rollout_id), by)
        if chosen.phase is RolloutPhase.PAUSED:  # e.g. stopped after the canary
            self.journal_command(chosen.rollout_id, "resume", by, RolloutPhase.RUNNING)
        return chosen.rollout_id, chosen, []

    def request_abort(self, rollout_id: str, by: str) -> None:
        """Start nothing new in a rollout this process runs (a signal): journaled first."""
        self.store.append(rollout_id, CommandEntry(command="abort", by=by))
        self.controls.setdefault(rollout_id, Control()).abort()

    def state(self, rollout_id: str) -> RolloutState:
        try:
            return load_state(self.store, rollout_id)
        except KeyError:
            raise UnknownRollout(rollout_id) from None

    def states(self) -> list[RolloutState]:
        return [load_state(self.store, r) for r in self.store.rollout_ids()]

    # -- execution ------------------------------------------------------------------------
    def start(
        self, rollout_id: str, action: Callable[[Engine], Any] | None = None
    ) -> asyncio.Task[RolloutResult]:
        """Run (or resume) a rollout in the background; its task is kept in `tasks`.

        A previous task of the rollout that is still winding down (its phase is final,
        it is releasing leases) is awaited first, so the two never overlap."""
        previous = self.tasks.get(rollout_id)

        async def run() -> RolloutResult:
            if previous is not None and not previous.done():
                await asyncio.wait({previous})
            try:
                return await self.execute(rollout_id, action=action)
            except LockConflict as exc:  # e.g. a resume finds a node leased to another
                return self._halt_on_conflict(rollout_id, exc)

        task = asyncio.create_task(run(), name=rollout_id)
        self.tasks[rollout_id] = task
        return task

    async def execute(
        self,
        rollout_id: str,
        action: Callable[[Engine], Any] | None = None,
    ) -> RolloutResult:
        """Run the rollout to its end (or the end of `action`, e.g. a rollback)."""
        observer = self.observer_for(rollout_id)
        loaded = rebuild(self.state(rollout_id))
        state = loaded.state
        control = self.controls.setdefault(rollout_id, Control())
        if state.phase is RolloutPhase.PAUSED:
            control.pause()
        boxes = self.boxes_of(rollout_id)
        passed = {
            (g.gate, g.batch)
            for g in state.gates
            if g.event == "finished" and g.get("result") == "passed" and g.batch is not None
        }
        async with contextlib.AsyncExitStack() as stack:
            if loaded.policy.notify:
                session = await stack.enter_async_context(aiohttp.ClientSession())
                notifier = Notifier(
                    loaded.policy.notify,
                    session,
                    on_failure=lambda url, ev, err: observer(WebhookFailed(url, ev, err)),
                )
                stack.push_async_callback(notifier.aclose)
                observer = Fanout([observer, WebhookObserver(notifier, rollout_id)])
            return await self._execute(rollout_id, loaded, observer, control, boxes, passed, action)

    async def _execute(
        self,
        rollout_id: str,
        loaded: Loaded,
        observer: Observer,
        control: Control,
        boxes: GateBoxes,
        passed: set[tuple[str, int]],
        action: Callable[[Engine], Any] | None,
    ) -> RolloutResult:
        state = loaded.state
        pull = replace(
            PullAccess.from_json(state.created.pull),
            rate_limit=loaded.policy.prestage.bandwidth,
        )
        driver = self.driver_for(rollout_id, pull, self._retry_hook(observer))
        engine = Engine(
            driver,
            loaded.policy,
            loaded.image,
            observer,
            policy_name=state.created.policy_name,
            rollout_id=rollout_id,
            journal=RolloutJournal(self.store, rollout_id),
            records=loaded.records,
            control=control,
            reach_timeout=self.reach_timeout,
            boxes=boxes,
            passed_gates=passed,
            wall_clock=self.wall_clock,
        )
        self.engines[rollout_id] = engine
        nodes = list(loaded.nodes.values())
        try:
            self.store.lock(rollout_id, [n.id for n in nodes], self.lock_ttl)
            try:
                await self._lease_all(driver, nodes, rollout_id)
            except LockConflict:
                await self._release_all(driver, nodes, rollout_id)  # those it did take
                raise
            async with self._renewing(driver, nodes, rollout_id):
                if action is not None:
                    result: RolloutResult = await action(engine)
                else:
                    result = await engine.run(loaded.batches, self.stop_after.get(rollout_id))
            if result.phase in FINISHED:
                self.store.unlock(rollout_id)
                await self._release_all(driver, nodes, rollout_id)
            return result
        finally:
            await driver.close()
            self.engines.pop(rollout_id, None)

    def _halt_on_conflict(self, rollout_id: str, exc: LockConflict) -> RolloutResult:
        """A background rollout that cannot take its nodes does not sit silent: it halts,
        naming the holder and until when (retry it once that rollout is done)."""
        state = self.state(rollout_id)
        message = f"cannot take its nodes: {exc}; then retry"
        if not state.finished:
            self.store.append(rollout_id, PhaseEntry(phase=RolloutPhase.HALTED, message=message))
            self.store.unlock(rollout_id)
            self.observer_for(rollout_id)(
                RolloutPhaseChanged(rollout_id, RolloutPhase.HALTED, message)
            )
        return RolloutResult(rollout_id, RolloutPhase.HALTED, message, rebuild(state).records)

    def boxes_of(self, rollout_id: str) -> GateBoxes:
        """The rollout's gate boxes; on first use, refilled with the signals and approvals
        the journal holds that no finished gate consumed (so a resume loses none)."""
        if rollout_id in self.boxes:
            return self.boxes[rollout_id]
        boxes = self.boxes[rollout_id] = GateBoxes()
        entries = self.state(rollout_id).gates
        last_done: dict[str, int] = {}
        for i, g in enumerate(entries):
            if g.get("event") == "finished":
                last_done[g.gate] = i
        for i, g in enumerate(entries):
            gate = str(g.get("gate"))
            if i < last_done.get(gate, -1):
                continue
            if g.get("event") == "received_signal":
                boxes.signals(gate).add(parse_signal(g.get("signal")))
            elif g.get("event") == "received_decision":
                box = boxes.approvals(gate)
                decide = box.approve if g.get("approved") else box.reject
                decide(str(g.get("by", "")), str(g.get("reason", "")))
        return boxes

    def _gate(self, rollout_id: str, gate: str, kinds: tuple[str, ...]) -> Gate:
        policy = rebuild(self.state(rollout_id)).policy
        for g in policy.gates:
            if g.name == gate:
                if g.kind not in kinds:
                    raise IllegalCommand(
                        f"gate {gate} is a {g.kind} gate; this applies to {' or '.join(kinds)}"
                    )
                return g
        names = ", ".join(g.name for g in policy.gates) or "none"
        raise UnknownGate(f"rollout {rollout_id} has no gate {gate!r} (gates: {names})")

    def signal(self, rollout_id: str, gate: str, body: object) -> Signal:
        """A wait-condition signal (Heat or CloudFormation body): journaled, then counted.
        ValueError (bad body) and UnknownGate change nothing."""
        state = self.state(rollout_id)
        self._gate(rollout_id, gate, ("wait",))
        if state.finished:
            raise IllegalCommand(f"the rollout is {state.phase}; signals are no longer taken")
        sig = parse_signal(body)
        boxes = self.boxes_of(rollout_id)
        self.store.append(
            rollout_id,
            GateEntry.model_validate(
                {"event": "received_signal", "gate": gate, "signal": sig.to_json()}
            ),
        )
        return boxes.signals(gate).add(sig)

    def signal_paths(self, rollout_id: str) -> dict[str, str]:
        """The pre-signed signal path of each wait gate of the rollout (reveal these only
        to a token holder: the path is the credential)."""
        policy = rebuild(self.state(rollout_id)).policy
        return {
            g.name: signal_path(rollout_id, g.name, self.signal_key.secret(rollout_id, g.name))
            for g in policy.gates
            if g.kind == "wait"
        }

    def check_signal_secret(self, rollout_id: str, gate: str, secret: str) -> None:
        """UnknownSignalURL unless `secret` is the secret of this wait gate of this rollout.

        The secret is compared (in constant time) before the rollout is looked up, and every
        wrong part raises the same error."""
        if not self.signal_key.matches(rollout_id, gate, secret):
            raise UnknownSignalURL("no such signal URL")
        try:
            self._gate(rollout_id, gate, ("wait",))
        except (UnknownRollout, UnknownGate, IllegalCommand):
            raise UnknownSignalURL("no such signal URL") from None

    def signal_by_secret(self, rollout_id: str, gate: str, secret: str, body: object) -> Signal:
        """A signal through the gate's pre-signed URL: `check_signal_secret`, then `signal`."""
        self.check_signal_secret(rollout_id, gate, secret)
        return self.signal(rollout_id, gate, body)

    def decide(self, rollout_id: str, gate: str, approved: bool, by: str, reason: str = "") -> str:
        """Approve or reject an approval gate (or an inconclusive analysis)."""
        state = self.state(rollout_id)
        self._gate(rollout_id, gate, ("approval", "analysis"))
        if state.finished:
            raise IllegalCommand(f"the rollout is {state.phase}; nothing to approve")
        boxes = self.boxes_of(rollout_id)
        self.store.append(
            rollout_id,
            GateEntry.model_validate(
                {
                    "event": "received_decision",
                    "gate": gate,
                    "approved": approved,
                    "by": by,
                    "reason": reason,
                }
            ),
        )
        box = boxes.approvals(gate)
        (box.approve if approved else box.reject)(by, reason)
        return f"gate {gate} {'approved' if approved else 'rejected'} by {by}"

    def _retry_hook(self, observer: Observer) -> RetryHook:
        def hook(node: Node, op: str, attempt: int, exc: BaseException) -> None:
            observer(Retried(node.id, op, attempt, str(exc)))

        return hook

    async def _lease_all(self, driver: LeasingDriver, nodes: list[Node], holder: str) -> None:
        """Take every node's agent lease; refuse the whole rollout if one is held."""
        ttl = lease_ttl_for(len(nodes), self.lease_ttl)

        async def one(node: Node) -> None:
            try:
                await driver.lease(node, ttl)
            except Refused as exc:
                if exc.code == "leased":
                    raise LockConflict(exc.holder or "?", [node.id], exc.expires_in) from exc
                raise
            except TransportError:
                pass  # unreachable now (perhaps rebooting); the engine deals with it

        outcomes = await asyncio.gather(*(one(n) for n in nodes), return_exceptions=True)
        conflicts = [o for o in outcomes if isinstance(o, LockConflict)]
        if conflicts:  # one answer naming a holder and all of its nodes
            first = conflicts[0]
            mine = [c for c in conflicts if c.holder == first.holder]
            raise LockConflict(
                first.holder,
                [n for c in mine for n in c.nodes],
                max(c.expires_in for c in mine),
            ) from first
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome

    async def _release_all(self, driver: LeasingDriver, nodes: list[Node], holder: str) -> None:
        async def one(node: Node) -> None:
            with contextlib.suppress(Refused, TransportError):
                await driver.release(node)

        await asyncio.gather(*(one(n) for n in nodes))

    @contextlib.asynccontextmanager
    async def _renewing(self, driver: LeasingDriver, nodes: list[Node], holder: str) -> Any:
        """Renew the store's node locks every lock_ttl / 3 and the agents' leases every
        third of their ttl (`lease_ttl_for` the fleet), each in a task of its own (a slow
        sweep never delays the locks)."""
        ttl = lease_ttl_for(len(nodes), self.lease_ttl)

        async def locks() -> None:
            while True:
                await asyncio.sleep(self.lock_ttl / 3)
                with contextlib.suppress(LockConflict):
                    self.store.renew(holder, [n.id for n in nodes], self.lock_ttl)

        async def leases() -> None:
            while True:
                await asyncio.sleep(ttl / 3)
                # All at once (the driver bounds requests in flight): one after another,
                # a sweep over thousands of nodes outlasts the lease it renews.
                await asyncio.gather(*(renew_one(n) for n in nodes))

        async def renew_one(node: Node) -> None:
            with contextlib.suppress(Refused, TransportError):
                await driver.lease(node, ttl)

        tasks = [asyncio.create_task(locks()), asyncio.create_task(leases())]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    # -- commands -------------------------------------------------------------------------
    def command(self, rollout_id: str, command: str, by: str = "api") -> str:
        """Apply an operator command; return a message. IllegalCommand (what
        `decide.refusal` says) changes nothing."""
        state = self.state(rollout_id)
        observer = self.observer_for(rollout_id)
        phase = state.phase
        running = rollout_id in self.tasks and not self.tasks[rollout_id].done()
        busy = running and not state.finished  # its engine still works (not winding down)
        control = self.controls.setdefault(rollout_id, Control())
        committed = any(n.phase is NodePhase.COMMITTED for n in state.nodes.values())
        why = refusal(command, phase, busy=busy, any_committed=committed)
        if why is not None:
            raise IllegalCommand(why)
        if command == "pause":
            self.journal_command(rollout_id, command, by, RolloutPhase.PAUSED, observer)
            control.pause()
            return "paused: no new batch, stage or activation starts until resumed"
        if command == "resume":
            self.journal_command(rollout_id, command, by, RolloutPhase.RUNNING, observer)
            control.resume()
            if not busy:
                self.start(rollout_id)
            return "resumed"
        if command == "abort":
            self.journal_command(rollout_id, command, by, None)
            control.abort()
            if not running:
                self.store.append(
                    rollout_id, PhaseEntry(phase=RolloutPhase.ABORTED, message=f"aborted by {by}")
                )
                self.store.unlock(rollout_id)
            return "aborting: nothing new starts; nodes in flight settle"
        if command == "retry":
            again = self.journal_retry(state, by)
            self.controls[rollout_id] = Control()
            self.start(rollout_id)
            return f"retrying; {len(again)} failed or rolled back node(s) will be tried again"
        if command == "rollback":
            self._lock_again(state)
            self.journal_command(rollout_id, command, by, None)
            self.controls[rollout_id] = Control()
            self.start(rollout_id, action=lambda e: e.rollback_all())
            return "rolling back every node this rollout updated"
        raise IllegalCommand(f"unknown command {command!r}")

    def journal_retry(self, state: RolloutState, by: str) -> list[str]:
        """Journal a retry: failed nodes pending again, the rollout running; return them.
        The caller (the retry command, or `rollout run` on a halted rollout) starts it."""
        self._lock_again(state)
        loaded = rebuild(state)
        again = Engine.retry_failed(loaded.records)
        for node_id in again:
            self.store.append(state.rollout_id, loaded.records[node_id].snapshot())
        self.journal_command(state.rollout_id, "retry", by, RolloutPhase.RUNNING, nodes=again)
        return again

    def _lock_again(self, state: RolloutState) -> None:
        self.store.lock(state.rollout_id, state.node_ids, self.lock_ttl)

    def journal_command(
        self,
        rollout_id: str,
        command: str,
        by: str,
        phase: RolloutPhase | None,
        observer: Observer | None = None,
        **extra: Any,
    ) -> None:
        self.store.append(rollout_id, CommandEntry(command=command, by=by, **extra))
        if phase is not None:
            message = f"{command} by {by}"
            self.store.append(rollout_id, PhaseEntry(phase=phase, message=message))
            if observer is not None:
                observer(RolloutPhaseChanged(rollout_id, phase, message))
