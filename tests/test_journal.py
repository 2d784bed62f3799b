"""The journal store (real SQLite files) and its pure fold."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rollout.entries import (
    BatchFinishedEntry,
    BatchStartedEntry,
    Body,
    CommandEntry,
    GateEntry,
    Kind,
    NodeSnapshot,
    PhaseEntry,
    parse_body,
    to_data,
)
from rollout.journal import LAZY, LockConflict, SQLiteStore, fold, load_state, unfinished
from rollout.model import NodePhase, Reason, RolloutPhase
from tests.helpers import created_entry

ROOT = Path(__file__).resolve().parent.parent


def created(store: SQLiteStore, rollout_id: str, nodes: list[str]) -> None:
    store.append(rollout_id, created_entry(nodes))


def test_fold_rebuilds_state_from_entries(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    created(store, "r1", ["a", "b"])
    store.append("r1", PhaseEntry(phase=RolloutPhase.RUNNING))
    store.append("r1", BatchStartedEntry(batch=1))
    activating = NodeSnapshot(id="a", batch=1, phase=NodePhase.ACTIVATING, boot_count_start=3)
    store.append("r1", activating)
    store.append(
        "r1", activating.model_copy(update={"phase": NodePhase.COMMITTED, "boot_count": 4})
    )
    store.append("r1", BatchFinishedEntry(batch=1, failed=0, decision="continue"))
    store.append("r1", CommandEntry(command="pause", by="alice"))
    store.append("r1", PhaseEntry(phase=RolloutPhase.PAUSED, message="pause by alice"))
    state = load_state(store, "r1")
    assert state.phase is RolloutPhase.PAUSED and not state.finished
    a = state.nodes["a"]
    assert (a.phase, a.boot_count_start, a.boot_count) == (NodePhase.COMMITTED, 3, 4)
    assert state.nodes["b"] == NodeSnapshot(id="b", batch=2)  # pending in its planned batch
    assert state.decisions == {1: "continue"} and state.batch == 1
    assert [c.by for c in state.commands] == ["alice"]
    assert state.counts() == {"committed": 1, "pending": 1}
    assert [s.rollout_id for s in unfinished(store)] == ["r1"]
    with pytest.raises(TypeError):
        state.nodes["a"] = a  # type: ignore[index]  # the fold's state is frozen
    store.append("r1", PhaseEntry(phase=RolloutPhase.ABORTED))
    assert unfinished(store) == []
    with pytest.raises(ValueError, match="does not start with 'created'"):
        fold(store.entries("r1")[1:])
    store.close()


def test_every_kind_round_trips_and_bad_data_is_named() -> None:
    bodies: list[Body] = [
        created_entry(["a"]),
        PhaseEntry(phase=RolloutPhase.HALTED, message="m"),
        BatchStartedEntry(batch=2),
        BatchFinishedEntry(batch=2, failed=1, decision="halt"),
        NodeSnapshot(id="a", batch=1, phase=NodePhase.FAILED, reason=Reason.UNHEALTHY),
        CommandEntry.model_validate({"command": "retry", "by": "bob", "nodes": ["a"]}),
        GateEntry.model_validate(
            {"event": "finished", "gate": "g", "batch": 1, "result": "passed"}
        ),
    ]
    assert {b.kind for b in bodies} == set(Kind)
    for body in bodies:
        assert parse_body(str(body.kind), to_data(body)) == body
    assert bodies[5].get("nodes") == ["a"] and bodies[6].get("result") == "passed"
    with pytest.raises(ValueError, match="unknown journal entry kind 'nope'"):
        parse_body("nope", {})
    with pytest.raises(ValueError, match="bad node entry"):
        parse_body("node", {"id": "a", "phase": "sleeping"})


async def test_group_commit_one_transaction_per_loop_turn(tmp_path: Path) -> None:
    """Entries written in one turn reach the file together, on the next turn; `flushed`
    returns only once they are there; `append` keeps the written order."""
    path = tmp_path / "s.db"
    store = SQLiteStore(path)
    created(store, "r1", ["a", "b"])
    other = sqlite3.connect(path)  # what another process (or a restart) would read

    def on_disk() -> list[str]:
        return [r[0] for r in other.execute("SELECT kind FROM entries ORDER BY seq")]

    store.write("r1", NodeSnapshot(id="a", phase=NodePhase.STAGING))
    store.write("r1", NodeSnapshot(id="b", phase=NodePhase.STAGING))
    assert on_disk() == ["created"]  # buffered, not yet committed
    await store.flushed()
    assert on_disk() == ["created", "node", "node"]
    await store.flushed()  # nothing pending: returns at once
    store.write("r1", PhaseEntry(phase=RolloutPhase.RUNNING))
    store.append("r1", CommandEntry(command="pause", by="alice"))  # after what was written
    assert on_disk() == ["created", "node", "node", "phase", "command"]
    store.write("r1", NodeSnapshot(id="a", phase=NodePhase.STAGED))
    store.close()  # nothing written is lost by closing
    assert on_disk()[-1] == "node"
    other.close()


def test_appends_survive_a_killed_writer(tmp_path: Path) -> None:
    """WAL + synchronous=FULL: an entry committed before SIGKILL is there afterwards, and
    one `flushed` awaited is committed."""
    path = tmp_path / "s.db"
    code = textwrap.dedent(f"""
        import asyncio, os, signal
        from rollout.entries import NodeSnapshot, PhaseEntry
        from rollout.journal import SQLiteStore
        from tests.helpers import created_entry
        s = SQLiteStore({str(path)!r})
        s.append("r1", created_entry(["a"]))
        async def main():
            s.write("r1", NodeSnapshot(id="a", phase="activating", boot_count_start=1))
            await s.flushed()
            os.kill(os.getpid(), signal.SIGKILL)
        asyncio.run(main())
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, cwd=ROOT)
    assert proc.returncode == -9, proc.stderr
    store = SQLiteStore(path)
    assert [e.kind for e in store.entries("r1")] == ["created", "node"]
    assert load_state(store, "r1").nodes["a"].boot_count_start == 1
    store.close()


def test_locks_one_rollout_per_node(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    store.lock("r1", ["a", "b"], ttl=60)
    with pytest.raises(LockConflict) as err:
        store.lock("r2", ["b", "c"], ttl=60)
    assert err.value.holder == "r1" and err.value.nodes == ("b",)
    assert "r1" in str(err.value) and "b" in str(err.value)
    store.lock("r2", ["c"], ttl=60)  # disjoint: fine
    store.lock("r1", ["a", "b"], ttl=60)  # the holder takes its own back at once
    store.unlock("r1")
    store.lock("r2", ["a", "b"], ttl=60)  # released: free
    store.close()


def test_a_dead_controllers_lock_is_taken_over_only_after_it_expires(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    store.lock("dead", ["a"], ttl=3600)
    with pytest.raises(LockConflict):
        store.lock("new", ["a"], ttl=60)
    # The lease ran out (written as it would be after an hour without renewal).
    db = sqlite3.connect(tmp_path / "s.db")
    db.execute("UPDATE locks SET expires_at = expires_at - 7200")
    db.commit()
    db.close()
    store.lock("new", ["a"], ttl=60)
    with pytest.raises(LockConflict, match="new"):
        store.lock("dead", ["a"], ttl=60)
    store.close()


def test_renew_extends_held_locks_and_reports_one_taken_meanwhile(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    store.lock("r1", ["a", "b"], ttl=60)
    before = store.lock_expiry("r1")
    assert before is not None
    store.renew("r1", ["a", "b"], ttl=3600)
    after = store.lock_expiry("r1")
    assert after is not None and after > before + 3000  # extended
    # r1's lock on b lapses and r2 takes it: the next renewal must say so, not extend it.
    db = sqlite3.connect(tmp_path / "s.db")
    db.execute("UPDATE locks SET expires_at = 0 WHERE node_id = 'b'")
    db.commit()
    db.close()
    store.lock("r2", ["b"], ttl=60)
    with pytest.raises(LockConflict) as err:
        store.renew("r1", ["a", "b"], ttl=60)
    assert err.value.holder == "r2" and err.value.nodes == ("b",)
    # A lock that lapsed and was released (no row) is simply taken back.
    store.unlock("r2")
    store.renew("r1", ["a", "b"], ttl=60)
    with pytest.raises(LockConflict, match="r1"):
        store.lock("r3", ["b"], ttl=60)
    store.close()


def test_a_corrupt_state_file_is_bad_input(tmp_path: Path) -> None:
    from rollout.errors import InputError

    path = tmp_path / "s.db"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(InputError, match="not a usable state file"):
        SQLiteStore(path)


def test_a_store_outliving_its_event_loop_still_commits(tmp_path: Path) -> None:
    """Entries written in one asyncio.run whose commit never ran go out with the next."""
    store = SQLiteStore(tmp_path / "s.db")
    created(store, "r1", ["a"])

    async def write_only() -> None:
        store.write("r1", NodeSnapshot(id="a", phase=NodePhase.STAGING))

    async def write_and_wait() -> None:
        store.write("r1", NodeSnapshot(id="a", phase=NodePhase.STAGED))
        await store.flushed()

    asyncio.run(write_only())  # the loop ends before its group commit runs
    asyncio.run(write_and_wait())
    phases = [e.data["phase"] for e in store.entries("r1") if e.kind == "node"]
    assert phases == ["staging", "staged"]
    store.close()


@pytest.mark.looptime
async def test_a_lazy_entry_waits_at_most_lazy_seconds_unless_something_needs_it(
    tmp_path: Path,
) -> None:
    """A lazy entry (nothing waits for it) is committed LAZY seconds later, or at once
    with the next entry that is not lazy, or when someone awaits `flushed`; never after
    an entry written later (the file is a prefix of what was written)."""
    path = tmp_path / "s.db"
    store = SQLiteStore(path)
    created(store, "r1", ["a", "b"])
    other = sqlite3.connect(path)

    def on_disk() -> list[str]:
        rows = other.execute("SELECT data FROM entries WHERE kind = 'node' ORDER BY seq")
        return [json.loads(r[0])["phase"] for r in rows]

    loop = asyncio.get_running_loop()
    start = loop.time()
    store.write("r1", NodeSnapshot(id="a", phase=NodePhase.STAGED), lazy=True)
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert on_disk() == []  # a turn later: still buffered
    await asyncio.sleep(LAZY)
    assert on_disk() == ["staged"]  # LAZY seconds on: committed without anyone asking

    store.write("r1", NodeSnapshot(id="a", phase=NodePhase.BOOTING), lazy=True)
    store.write("r1", NodeSnapshot(id="b", phase=NodePhase.ACTIVATING))
    mark = loop.time()
    await store.flushed()
    assert on_disk() == ["staged", "booting", "activating"]  # together, in order
    assert loop.time() == mark  # at the next turn, not LAZY seconds later

    store.write("r1", NodeSnapshot(id="b", phase=NodePhase.BOOTING), lazy=True)
    mark = loop.time()
    await store.flushed()  # someone waits: brought forward
    assert on_disk()[-1] == "booting"
    assert loop.time() == mark

    store.write("r1", NodeSnapshot(id="b", phase=NodePhase.HEALTHY), lazy=True)
    store.close()  # nothing written is lost by closing
    assert on_disk()[-1] == "healthy"
    assert loop.time() - start == pytest.approx(LAZY)
    other.close()
