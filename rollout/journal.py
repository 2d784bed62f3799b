"""The journal: every decision and observation, appended before the controller acts.

A rollout's state is a pure fold over its journal entries (`fold`), so a controller that
was killed at any instant rebuilds exactly what it knew, then reconciles that with what
the agents report (engine.py) and carries on.

Entries (kind -> data):

    created          rollout id, policy (as data), policy name, image, inventory, plan
    phase            rollout phase and message (running, paused, halted, ...)
    batch_started    batch index
    batch_finished   batch index, failed count, decision
    node             a full snapshot of one node's record (phase, reason, previous image,
                     boot count when it was activated, ...): the last snapshot wins
    command          an operator's command (pause, resume, abort, retry, rollback) and who
    gate             gate events (waiting, signal, finished), as data

Invariant: a `node` entry with phase `activating` (carrying the boot count before the
activation) is durable before the activation request leaves; so after a crash the boot
count tells whether the activation happened, and no node is ever activated twice.

The `Store` protocol keeps the journal and the node locks. `SQLiteStore` is the default:
one file in WAL mode with synchronous=FULL, so an appended entry survives kill -9.
Node locks make one rollout per node: a rollout locks its nodes while it is not finished;
an overlapping rollout is refused, naming the holder; a lock whose lease expired (its
controller died) may be taken over, and the same rollout takes its own locks back at once.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from rollout.errors import InputError
from rollout.model import FINISHED as FINISHED
from rollout.model import RolloutPhase


@dataclass(frozen=True)
class Entry:
    seq: int
    rollout_id: str
    ts: float  # wall clock, seconds since the epoch
    kind: str
    data: dict[str, Any]

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
    def append(self, rollout_id: str, kind: str, data: dict[str, Any]) -> Entry: ...

    def entries(self, rollout_id: str, after: int = 0) -> list[Entry]: ...

    def rollout_ids(self) -> list[str]: ...

    def lock(self, rollout_id: str, node_ids: Sequence[str], ttl: float) -> None: ...

    def unlock(self, rollout_id: str) -> None: ...

    def lock_expiry(self, rollout_id: str) -> float | None:
        """Wall time at which the rollout's node locks lapse (None: it holds none)."""
        ...

    def close(self) -> None: ...


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

    def append(self, rollout_id: str, kind: str, data: dict[str, Any]) -> Entry:
        ts = time.time()
        raw = json.dumps(data, sort_keys=True, default=str)
        with self._mutex:
            cur = self._db.execute(
                "INSERT INTO entries (rollout_id, ts, kind, data) VALUES (?, ?, ?, ?)",
                (rollout_id, ts, kind, raw),
            )
        return Entry(int(cur.lastrowid or 0), rollout_id, ts, kind, json.loads(raw))

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
                for node_id in node_ids:
                    row = self._db.execute(
                        "SELECT rollout_id, expires_at FROM locks WHERE node_id = ?", (node_id,)
                    ).fetchone()
                    if row and row[0] != rollout_id and row[1] > now:
                        held.setdefault(row[0], []).append(node_id)
                        expiry[row[0]] = max(expiry.get(row[0], 0.0), row[1])
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
            self._db.close()


# -- the fold -------------------------------------------------------------------------------
@dataclass
class RolloutState:
    """What the journal says about one rollout."""

    rollout_id: str
    created: dict[str, Any]
    phase: RolloutPhase = RolloutPhase.PENDING
    message: str = ""
    batch: int = 0
    decisions: dict[int, str] = field(default_factory=dict)
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    commands: list[dict[str, Any]] = field(default_factory=list)
    gates: list[dict[str, Any]] = field(default_factory=list)
    started_at: float = 0.0
    updated_at: float = 0.0
    last_seq: int = 0

    @property
    def finished(self) -> bool:
        return self.phase in FINISHED

    @property
    def node_ids(self) -> list[str]:
        return [n["id"] for n in self.created.get("inventory", [])]

    def to_json(
        self, detail: bool = True, signal_urls: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """The rollout as the API answers it (`GET /v1/rollouts/{id}`; `detail=False`: the
        summary of a listing), the same from the service and from a state file."""
        out = self.summary()
        if detail:
            out["nodes"] = list(self.nodes.values())
            out["decisions"] = {str(k): v for k, v in self.decisions.items()}
            out["commands"] = self.commands
            out["gates"] = self.gates
            out["plan"] = self.created.get("batches", [])
        if signal_urls is not None:
            out["signal_urls"] = signal_urls
        return out

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for node in self.nodes.values():
            out[node["phase"]] = out.get(node["phase"], 0) + 1
        return out

    def summary(self) -> dict[str, Any]:
        image = self.created.get("image", {})
        return {
            "id": self.rollout_id,
            "phase": str(self.phase),
            "message": self.message,
            "batch": self.batch,
            "batches": len(self.created.get("batches", [])),
            "image": {k: image.get(k) for k in ("name", "version", "digest")},
            "policy": self.created.get("policy_name", ""),
            "nodes": len(self.nodes),
            "counts": self.counts(),
            "started_at": self.started_at,
            "updated_at": self.updated_at,
        }


def fold(entries: Iterable[Entry]) -> RolloutState:
    """Rebuild a rollout's state from its entries (pure).

    >>> e = [Entry(1, "r1", 0.0, "created", {"inventory": [{"id": "a"}]}),
    ...      Entry(2, "r1", 1.0, "node", {"id": "a", "phase": "committed"}),
    ...      Entry(3, "r1", 2.0, "phase", {"phase": "succeeded", "message": "done"})]
    >>> s = fold(e)
    >>> (s.phase, s.nodes["a"]["phase"], s.last_seq)
    (<RolloutPhase.SUCCEEDED: 'succeeded'>, 'committed', 3)
    """
    state: RolloutState | None = None
    for entry in entries:
        if entry.kind == "created":
            state = RolloutState(entry.rollout_id, entry.data, started_at=entry.ts)
            for node in entry.data.get("inventory", []):
                state.nodes[node["id"]] = {"id": node["id"], "phase": "pending"}
        if state is None:
            raise ValueError(f"journal of {entry.rollout_id} does not start with 'created'")
        state.last_seq = entry.seq
        state.updated_at = entry.ts
        data = entry.data
        if entry.kind == "phase":
            state.phase = RolloutPhase(data["phase"])
            state.message = data.get("message", "")
        elif entry.kind == "batch_started":
            state.batch = int(data["batch"])
        elif entry.kind == "batch_finished":
            state.decisions[int(data["batch"])] = str(data["decision"])
        elif entry.kind == "node":
            state.nodes[data["id"]] = dict(data)
        elif entry.kind == "command":
            state.commands.append(dict(data, ts=entry.ts))
        elif entry.kind == "gate":
            state.gates.append(dict(data, ts=entry.ts))
    if state is None:
        raise ValueError("empty journal")
    return state


def load_state(store: Store, rollout_id: str) -> RolloutState:
    entries = store.entries(rollout_id)
    if not entries:
        raise KeyError(rollout_id)
    return fold(entries)


def unfinished(store: Store) -> list[RolloutState]:
    """Rollouts in the store that are not finished (to resume)."""
    return [s for s in (load_state(store, r) for r in store.rollout_ids()) if not s.finished]
