"""The journal store (real SQLite files) and its pure fold."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rollout.journal import LockConflict, SQLiteStore, fold, load_state, unfinished
from rollout.model import RolloutPhase


def created(store: SQLiteStore, rollout_id: str, nodes: list[str]) -> None:
    store.append(rollout_id, "created", {"inventory": [{"id": n} for n in nodes]})


def test_fold_rebuilds_state_from_entries(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    created(store, "r1", ["a", "b"])
    store.append("r1", "phase", {"phase": "running", "message": ""})
    store.append("r1", "batch_started", {"batch": 1})
    store.append("r1", "node", {"id": "a", "phase": "activating", "boot_count_start": 3})
    store.append("r1", "node", {"id": "a", "phase": "committed", "boot_count": 4})
    store.append("r1", "batch_finished", {"batch": 1, "failed": 0, "decision": "continue"})
    store.append("r1", "command", {"command": "pause", "by": "alice"})
    store.append("r1", "phase", {"phase": "paused", "message": "pause by alice"})
    state = load_state(store, "r1")
    assert state.phase is RolloutPhase.PAUSED and not state.finished
    assert state.nodes["a"] == {"id": "a", "phase": "committed", "boot_count": 4}
    assert state.nodes["b"] == {"id": "b", "phase": "pending"}
    assert state.decisions == {1: "continue"} and state.batch == 1
    assert [c["by"] for c in state.commands] == ["alice"]
    assert state.counts() == {"committed": 1, "pending": 1}
    assert [s.rollout_id for s in unfinished(store)] == ["r1"]
    store.append("r1", "phase", {"phase": "aborted", "message": ""})
    assert unfinished(store) == []
    with pytest.raises(ValueError, match="does not start with 'created'"):
        fold(store.entries("r1")[1:])
    store.close()


def test_appends_survive_a_killed_writer(tmp_path: Path) -> None:
    """WAL + synchronous=FULL: an entry appended before SIGKILL is there afterwards."""
    path = tmp_path / "s.db"
    code = textwrap.dedent(f"""
        import os, signal
        from rollout.journal import SQLiteStore
        s = SQLiteStore({str(path)!r})
        s.append("r1", "created", {{"inventory": []}})
        s.append("r1", "node", {{"id": "a", "phase": "activating"}})
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert proc.returncode == -9
    store = SQLiteStore(path)
    assert [e.kind for e in store.entries("r1")] == ["created", "node"]
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


def test_a_corrupt_state_file_is_bad_input(tmp_path: Path) -> None:
    from rollout.errors import InputError

    path = tmp_path / "s.db"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(InputError, match="not a usable state file"):
        SQLiteStore(path)
