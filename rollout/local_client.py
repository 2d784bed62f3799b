"""The client's view of a state file without a server (`LocalClient`), for the journal
of `rollout run`: ls, show and history read the journal as the API would answer; abort
goes through the Controller's own command, and only when no live controller holds the
rollout (its node locks have expired), so it cannot fight one. Every other command is
refused with a message saying to use --server.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from rollout.client import ServerError

_OFFLINE = "offline (--state) only ls, show, history and abort work; use --server for the rest"


class LocalClient:
    """The client's view of a state file, without a server (for `rollout run` journals).

    Reads answer like the API; `abort` marks an unfinished rollout aborted, but only when
    no live controller holds it (its node locks have expired), so it cannot fight one.
    """

    def __init__(self, path: str) -> None:
        self.path = path

    @contextlib.contextmanager
    def _store(self) -> Iterator[Any]:
        from rollout.journal import SQLiteStore

        store = SQLiteStore(self.path)
        try:
            yield store
        finally:
            store.close()

    def _known(self, store: Any, rollout_id: str) -> None:
        if rollout_id not in store.rollout_ids():
            raise ServerError(404, {"message": f"no rollout {rollout_id!r} in {self.path}"})

    async def rollouts(self) -> dict[str, Any]:
        from rollout.journal import load_state

        with self._store() as store:
            states = [load_state(store, r) for r in store.rollout_ids()]
            return {"rollouts": [s.summary() for s in states]}

    async def rollout(self, rollout_id: str) -> dict[str, Any]:
        from rollout.journal import load_state

        with self._store() as store:
            self._known(store, rollout_id)
            return load_state(store, rollout_id).to_json(detail=True)

    async def events(self, rollout_id: str) -> dict[str, Any]:
        with self._store() as store:
            self._known(store, rollout_id)
            return {"events": [e.to_json() for e in store.entries(rollout_id)]}

    async def command(self, rollout_id: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        with self._store() as store:
            self._known(store, rollout_id)
            if name != "abort":
                raise ServerError(400, {"message": _OFFLINE})
            return self._abort(store, rollout_id, str(body.get("by", "cli")))

    async def create(self, body: dict[str, Any]) -> dict[str, Any]:
        raise ServerError(400, {"message": _OFFLINE})

    async def gate(
        self, rollout_id: str, gate: str, verb: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        raise ServerError(400, {"message": _OFFLINE})

    def _abort(self, store: Any, rollout_id: str, by: str) -> dict[str, Any]:
        import time

        from rollout.controller import Controller, IllegalCommand

        live = store.lock_expiry(rollout_id)  # a running controller keeps renewing it
        if live is not None and live > time.time():
            raise ServerError(
                409,
                {"message": f"a controller is running it (its lock expires in "
                 f"{live - time.time():.0f}s); stop it there (Ctrl-C, or the service API)"},
            )  # fmt: skip
        try:  # the controller's own abort: with no engine running it ends the rollout
            Controller(store).command(rollout_id, "abort", by=by)
        except IllegalCommand as exc:
            raise ServerError(409, {"message": str(exc)}) from None
        return {"id": rollout_id, "command": "abort", "message": "aborted (offline)"}
