"""The journal: every decision and observation, appended before the controller acts.

A rollout's state is a pure fold over its journal entries (`fold`), so a controller that
was killed at any instant rebuilds exactly what it knew, then reconciles that with what
the agents report (steps.py) and carries on.

Entries are typed (rollout.entries: one frozen model per kind). A rollout's state is
the frozen `RolloutState` the fold returns.

Invariant: a `node` entry with phase `activating` (carrying the boot count before the
activation) is durable before the activation request leaves; so after a crash the boot
count tells whether the activation happened, and no node is ever activated twice.

The `Store` protocol keeps the journal and the node locks. `SQLiteStore` is the default:
one file in WAL mode with synchronous=FULL, so a committed entry survives kill -9.

Group commit: the engine `write`s entries (buffered) and awaits `flushed()` before any
action that depends on them; every entry written in one event-loop turn goes to disk in
one transaction (one fsync) at the start of the next turn, so ten thousand nodes moving
at once cost one fsync, not ten thousand, and the activation entry is still on disk
before the activation request leaves. An entry written `lazy` is an observation nothing
waits for (a node staged, booting, healthy, committed): it goes with the next commit
anyway, or `LAZY` seconds later at the latest, so nodes answering one at a time do not
cost an fsync each. A crash may lose such a tail of the journal, never an entry before
one that was committed (the file is always a prefix of what was written) and never one
an action depended on: the resumed controller reads those nodes' state from their agents
as it does for every node it resumes. `append` commits at once, after whatever is
buffered, so the journal's order is the order things were written in.
Node locks make one rollout per node: a rollout locks its nodes while it is not finished;
an overlapping rollout is refused, naming the holder; a lock whose lease expired (its
controller died) may be taken over, and the same rollout takes its own locks back at once.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

from rollout import clock
from rollout.entries import (
    BatchFinishedEntry,
    BatchStartedEntry,
    Body,
    CommandEntry,
    CreatedEntry,
    GateEntry,
    NodeSnapshot,
    PhaseEntry,
    parse_body,
    to_data,
)
from rollout.errors import InputError
from rollout.model import FINISHED as FINISHED
from rollout.model import NodePhase, RolloutPhase


@dataclass(frozen=True)
class Entry:
    seq: int
    rollout_id: str
    ts: float  # wall clock, seconds since the epoch
    kind: str
    data: dict[str, Any]

    @property
    def body(self) -> Body:
        """The typed body (ValueError when the stored data is not one)."""
        return parse_body(self.kind, self.data)

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "rollout": self.rollout_id,
            "ts": self.ts,
            "kind": self.kind,
            "data": self.data,
        }


class LockConflict(InputError):
    """Nodes are locked by another rollout (in this state file, or by its agent lease).

    ``expires_at`` (wall clock) is when the holder's lock lapses unless its controller
    renews it, which a live controller does every third of its ttl.
    """

    def __init__(
        self, holder: str, nodes: Sequence[str], expires_in: float, now: float | None = None
    ) -> None:
        shown = ", ".join(nodes[:5]) + (" ..." if len(nodes) > 5 else "")
        self.expires_in = max(0.0, expires_in)
        self.expires_at = (time.time() if now is None else now) + self.expires_in
        until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.expires_at))
        super().__init__(
            f"node(s) {shown} belong to rollout {holder}, which is not finished (its lock "
            f"lease expires in {self.expires_in:.0f}s, at {until}, unless its controller "
            "renews it); finish, abort or roll it back first"
        )
        self.holder = holder
        self.nodes = tuple(nodes)
        self.until = until


class Store(Protocol):
    def append(self, rollout_id: str, body: Body) -> Entry:
        """Commit `body` now (after anything buffered); durable on return."""
        ...

    def write(self, rollout_id: str, body: Body, *, lazy: bool = False) -> None:
        """Buffer `body` for the next group commit (see `flushed`); with `lazy` (an
        observation no action or answer waits for) the commit may wait `LAZY` seconds."""
        ...

    async def flushed(self) -> None:
        """Return once every entry written so far is on disk."""
        ...

    def entries(self, rollout_id: str, after: int = 0) -> list[Entry]: ...

    def rollout_ids(self) -> list[str]: ...

    def lock(self, rollout_id: str, node_ids: Sequence[str], ttl: float) -> None: ...

    def renew(self, rollout_id: str, node_ids: Sequence[str], ttl: float) -> None:
        """`lock` again, for a rollout that holds these locks: cheap while it still does."""
        ...

    def unlock(self, rollout_id: str) -> None: ...

    def lock_expiry(self, rollout_id: str) -> float | None:
        """Wall time at which the rollout's node locks lapse (None: it holds none)."""
        ...

    def close(self) -> None: ...


# Seconds an entry written `lazy` (no action or answer waits for it) may stay uncommitted.
# Most of a node's entries are such observations (staged, booting, verifying, healthy,
# committed), and nodes answer one at a time: committing each loop turn's entries made 2,200
# fsyncs for 2,000 real agents, 280 of them for an entry something waited for.
LAZY = 0.25


class SQLiteStore:
    """Journal and locks in one SQLite file (WAL, synchronous=FULL)."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.executescript(
                """
                CREATE TABLE IF NOT EXISTS entries (
                    seq INTEGER PRIMARY KEY AUTOINCREMENT,
                    rollout_id TEXT NOT NULL,
                    ts REAL NOT NULL,
                    kind TEXT NOT NULL,
                    data TEXT NOT NULL
                );
                CREATE INDEX IF NOT EXISTS entries_rollout ON entries (rollout_id, seq);
                CREATE TABLE IF NOT EXISTS locks (
                    node_id TEXT PRIMARY KEY,
                    rollout_id TEXT NOT NULL,
                    expires_at REAL NOT NULL
                );
                """
            )
        except sqlite3.DatabaseError as exc:
            raise InputError(f"{self.path}: not a usable state file: {exc}") from exc
        self._mutex = threading.Lock()
        self._buffer: list[tuple[str, float, str, str]] = []  # written, not yet committed
        self._group: asyncio.Handle | None = None  # the next group commit, scheduled
        self._waiters: list[asyncio.Future[None]] = []  # who awaits it
        self._group_loop: asyncio.AbstractEventLoop | None = None
        self._soon = False  # the scheduled commit is at the next turn, not a lazy one

    def append(self, rollout_id: str, body: Body) -> Entry:
        row = (rollout_id, time.time(), str(body.kind), _dumps(body))
        with self._mutex:
            seq = self._commit_locked([row])
        return Entry(seq, rollout_id, row[1], row[2], json.loads(row[3]))

    def write(self, rollout_id: str, body: Body, *, lazy: bool = False) -> None:
        with self._mutex:
            self._buffer.append((rollout_id, time.time(), str(body.kind), _dumps(body)))
            loop = clock.running_loop()
            if self._group is not None and self._group_loop is not loop:
                # Scheduled on a loop that has ended (a store outliving asyncio.run):
                # that commit never runs, so this one takes its entries along.
                self._group = None
            if self._group is None and lazy:
                self._group, self._soon = loop.call_later(LAZY, self._commit_group), False
                self._group_loop = loop
            elif not lazy:
                self._commit_soon(loop)

    async def flushed(self) -> None:
        if self._group is None:
            return
        loop = clock.running_loop()
        with self._mutex:
            self._commit_soon(loop)  # someone waits: not lazily
        waiter = loop.create_future()  # one each: cancelling one
        self._waiters.append(waiter)  # waiter cancels no other
        await waiter

    def _commit_soon(self, loop: asyncio.AbstractEventLoop) -> None:
        """The group commit at the next turn (a lazy one scheduled is brought forward)."""
        if self._group is not None and self._group_loop is loop and self._soon:
            return
        if self._group is not None:
            self._group.cancel()
        self._group, self._group_loop, self._soon = loop.call_soon(self._commit_group), loop, True

    def _commit_group(self) -> None:
        with self._mutex:
            self._group = None
            waiters, self._waiters = self._waiters, []
            try:
                self._commit_locked([])
            except BaseException as exc:
                for w in waiters:
                    if not w.done():
                        w.set_exception(exc)
                raise
        for w in waiters:
            if not w.done():
                w.set_result(None)

    def _commit_locked(self, rows: list[tuple[str, float, str, str]]) -> int:
        """Insert what is buffered, then `rows`, in one transaction (the mutex is held);
        return the last row's seq."""
        rows, self._buffer = self._buffer + rows, []
        if not rows:
            return 0
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.executemany(
                "INSERT INTO entries (rollout_id, ts, kind, data) VALUES (?, ?, ?, ?)", rows
            )
            last = self._db.execute("SELECT last_insert_rowid()").fetchone()
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        return int(last[0])

    def entries(self, rollout_id: str, after: int = 0) -> list[Entry]:
        with self._mutex:
            rows = self._db.execute(
                "SELECT seq, rollout_id, ts, kind, data FROM entries "
                "WHERE rollout_id = ? AND seq > ? ORDER BY seq",
                (rollout_id, after),
            ).fetchall()
        return [Entry(r[0], r[1], r[2], r[3], json.loads(r[4])) for r in rows]

    def rollout_ids(self) -> list[str]:
        with self._mutex:
            rows = self._db.execute(
                "SELECT rollout_id FROM entries WHERE kind = 'created' ORDER BY seq"
            ).fetchall()
        return [r[0] for r in rows]

    def lock(self, rollout_id: str, node_ids: Sequence[str], ttl: float) -> None:
        now = time.time()
        with self._mutex:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                held: dict[str, list[str]] = {}
                expiry: dict[str, float] = {}
                # One query for the live locks of other rollouts (a SELECT per node was
                # 10,000 statements at 10,000 nodes); the table holds one row per node.
                others = {
                    node_id: (holder, until)
                    for node_id, holder, until in self._db.execute(
                        "SELECT node_id, rollout_id, expires_at FROM locks "
                        "WHERE rollout_id != ? AND expires_at > ?",
                        (rollout_id, now),
                    )
                }
                for node_id in node_ids if others else ():
                    if node_id in others:
                        holder, until = others[node_id]
                        held.setdefault(holder, []).append(node_id)
                        expiry[holder] = max(expiry.get(holder, 0.0), until)
                if held:
                    holder, nodes = next(iter(held.items()))
                    raise LockConflict(holder, nodes, expiry[holder] - now)
                self._db.executemany(
                    "INSERT INTO locks (node_id, rollout_id, expires_at) VALUES (?, ?, ?) "
                    "ON CONFLICT (node_id) DO UPDATE SET rollout_id = excluded.rollout_id, "
                    "expires_at = excluded.expires_at",
                    [(n, rollout_id, now + ttl) for n in node_ids],
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def renew(self, rollout_id: str, node_ids: Sequence[str], ttl: float) -> None:
        """Extend every lock the rollout holds in one UPDATE (the renewal every lock_ttl /
        3: at 100,000 nodes `lock`'s upsert of each row was 0.28 s on the event loop, this
        0.03 s). If a row is gone (expired and taken, or released) `lock` decides: it takes
        the free ones back or raises LockConflict."""
        with self._mutex:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                kept = self._db.execute(
                    "UPDATE locks SET expires_at = ? WHERE rollout_id = ?",
                    (time.time() + ttl, rollout_id),
                ).rowcount
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        if kept != len(set(node_ids)):
            self.lock(rollout_id, node_ids, ttl)

    def unlock(self, rollout_id: str) -> None:
        with self._mutex:
            self._db.execute("DELETE FROM locks WHERE rollout_id = ?", (rollout_id,))

    def lock_expiry(self, rollout_id: str) -> float | None:
        with self._mutex:
            row = self._db.execute(
                "SELECT MAX(expires_at) FROM locks WHERE rollout_id = ?", (rollout_id,)
            ).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def close(self) -> None:
        with self._mutex:
            self._commit_locked([])  # nothing written is lost by closing
            self._db.close()


def _dumps(body: Body) -> str:
    return body.model_dump_json()  # pydantic's own encoder: ~5x json.dumps(model_dump())


class RolloutJournal:
    """One rollout's view of a store, as the engine writes it (record.Journal)."""

    def __init__(self, store: Store, rollout_id: str) -> None:
        self.store = store
        self.rollout_id = rollout_id

    def write(self, body: Body, *, lazy: bool = False) -> None:
        self.store.write(self.rollout_id, body, lazy=lazy)

    async def flushed(self) -> None:
        await self.store.flushed()


# -- the fold -------------------------------------------------------------------------------
@dataclass(frozen=True)
class RolloutState:
    """What the journal says about one rollout (frozen: a new fold for news)."""

    rollout_id: str
    created: CreatedEntry
    phase: RolloutPhase = RolloutPhase.PENDING
    message: str = ""
    batch: int = 0
    decisions: Mapping[int, str] = field(default_factory=dict)
    nodes: Mapping[str, NodeSnapshot] = field(default_factory=dict)
    commands: tuple[CommandEntry, ...] = ()
    gates: tuple[GateEntry, ...] = ()
    command_times: tuple[float, ...] = ()  # wall time of each command, as journaled
    gate_times: tuple[float, ...] = ()
    started_at: float = 0.0
    updated_at: float = 0.0
    last_seq: int = 0

    @property
    def finished(self) -> bool:
        return self.phase in FINISHED

    @property
    def node_ids(self) -> list[str]:
        return [n.id for n in self.created.inventory]

    def to_json(
        self, detail: bool = True, signal_urls: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """The rollout as the API answers it (`GET /v1/rollouts/{id}`; `detail=False`: the
        summary of a listing), the same from the service and from a state file."""
        out = self.summary()
        if detail:
            out["nodes"] = [to_data(n) for n in self.nodes.values()]
            out["decisions"] = {str(k): v for k, v in self.decisions.items()}
            stamped = zip(self.commands, self.command_times, strict=True)
            out["commands"] = [to_data(c) | {"ts": t} for c, t in stamped]
            stamped_gates = zip(self.gates, self.gate_times, strict=True)
            out["gates"] = [to_data(g) | {"ts": t} for g, t in stamped_gates]
            out["plan"] = [b.model_dump(mode="json") for b in self.created.batches]
        if signal_urls is not None:
            out["signal_urls"] = signal_urls
        return out

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for node in self.nodes.values():
            out[str(node.phase)] = out.get(str(node.phase), 0) + 1
        return out

    def summary(self) -> dict[str, Any]:
        image = self.created.image
        return {
            "id": self.rollout_id,
            "phase": str(self.phase),
            "message": self.message,
            "batch": self.batch,
            "batches": len(self.created.batches),
            "image": {"name": image.name, "version": image.version, "digest": image.digest},
            "policy": self.created.policy_name,
            "nodes": len(self.nodes),
            "counts": self.counts(),
            "started_at": self.started_at,
            "updated_at": self.updated_at,
        }


def fold(entries: Iterable[Entry]) -> RolloutState:
    """Rebuild a rollout's state from its entries (pure). Nodes not journaled yet are
    pending in their planned batch.

    >>> created = {"policy": {}, "inventory": [{"id": "a", "address": "h:1"}],
    ...            "image": {"path": "v2.img", "digest": "sha256:0", "name": "w",
    ...                      "version": "2", "size": 1},
    ...            "batches": [{"index": 1, "nodes": ["a"]}]}
    >>> e = [Entry(1, "r1", 0.0, "created", created),
    ...      Entry(2, "r1", 1.0, "node", {"id": "a", "batch": 1, "phase": "committed"}),
    ...      Entry(3, "r1", 2.0, "phase", {"phase": "succeeded", "message": "done"})]
    >>> s = fold(e)
    >>> (s.phase, s.nodes["a"].phase, s.last_seq)
    (<RolloutPhase.SUCCEEDED: 'succeeded'>, <NodePhase.COMMITTED: 'committed'>, 3)
    """
    created: CreatedEntry | None = None
    rollout_id = ""
    phase, message, batch = RolloutPhase.PENDING, "", 0
    decisions: dict[int, str] = {}
    nodes: dict[str, NodeSnapshot] = {}
    commands: list[tuple[CommandEntry, float]] = []
    gates: list[tuple[GateEntry, float]] = []
    started_at = updated_at = 0.0
    last_seq = 0
    for entry in entries:
        body = entry.body
        if isinstance(body, CreatedEntry):
            created, rollout_id, started_at = body, entry.rollout_id, entry.ts
            planned = {n: b.index for b in body.batches for n in b.nodes}
            nodes = {
                n.id: NodeSnapshot(id=n.id, batch=planned.get(n.id, 0), phase=NodePhase.PENDING)
                for n in body.inventory
            }
        if created is None:
            raise ValueError(f"journal of {entry.rollout_id} does not start with 'created'")
        last_seq, updated_at = entry.seq, entry.ts
        if isinstance(body, PhaseEntry):
            phase, message = body.phase, body.message
        elif isinstance(body, BatchStartedEntry):
            batch = body.batch
        elif isinstance(body, BatchFinishedEntry):
            decisions[body.batch] = body.decision
        elif isinstance(body, NodeSnapshot):
            nodes[body.id] = body
        elif isinstance(body, CommandEntry):
            commands.append((body, entry.ts))
        elif isinstance(body, GateEntry):
            gates.append((body, entry.ts))
    if created is None:
        raise ValueError("empty journal")
    return RolloutState(
        rollout_id,
        created,
        phase,
        message,
        batch,
        MappingProxyType(decisions),
        MappingProxyType(nodes),
        tuple(c for c, _ in commands),
        tuple(g for g, _ in gates),
        tuple(t for _, t in commands),
        tuple(t for _, t in gates),
        started_at,
        updated_at,
        last_seq,
    )


def load_state(store: Store, rollout_id: str) -> RolloutState:
    entries = store.entries(rollout_id)
    if not entries:
        raise KeyError(rollout_id)
    return fold(entries)


def unfinished(store: Store) -> list[RolloutState]:
    """Rollouts in the store that are not finished (to resume)."""
    return [s for s in (load_state(store, r) for r in store.rollout_ids()) if not s.finished]
