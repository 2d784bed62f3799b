"""`rollout serve` against its own OpenAPI document, fuzzed by schemathesis (seeded,
bounded): no server error (a NUL byte in a path was one), every status declared (401 of
/metrics was not), 405 with an exact Allow; and the fields it found blank or with a NUL
byte are refused with 400 naming them, nothing journaled."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from tests.agent.test_fuzz import SCHEMATHESIS, fuzz
from tests.helpers import Service

pytestmark = pytest.mark.skipif(not SCHEMATHESIS.exists(), reason="needs schemathesis")


async def test_schemathesis_finds_nothing_against_the_service(
    service: Service, tmp_path: Path
) -> None:
    url = service.url + "/v1/openapi.json"
    every = await fuzz(url, service.token, "--exclude-path", "/v1/rollouts", cwd=tmp_path)
    assert every.returncode == 0, every.stdout[-4000:]
    # A well-formed start names files that need not exist: refused (400), never a 500.
    start = await fuzz(url, service.token, "--include-path", "/v1/rollouts",
                       "--exclude-checks", "positive_data_acceptance", cwd=tmp_path)  # fmt: skip
    assert start.returncode == 0, start.stdout[-4000:]


@pytest.mark.parametrize(
    ("name", "body", "field"),
    [
        ("NUL byte in the inventory path", {"inventory": "inv\u0000.yaml", "policy": "p",
                                            "image": "i"}, "inventory"),
        ("empty image path", {"inventory": "inv.yaml", "policy": "p", "image": ""}, "image"),
        ("over-long policy path", {"inventory": "i", "policy": "p" * 5000, "image": "i"},
         "policy"),
    ],
)  # fmt: skip
async def test_bad_paths_get_400_naming_the_field_and_journal_nothing(
    service: Service, name: str, body: dict[str, str], field: str
) -> None:
    status, answer = await service.call("POST", "/v1/rollouts", body)
    assert (status, answer["error"], answer.get("field")) == (400, "bad_request", field), name
    db = service.workdir / "state.db"

    def count() -> int:
        with sqlite3.connect(db) as conn:
            try:
                return int(conn.execute("select count(*) from entries").fetchone()[0])
            except sqlite3.OperationalError:
                return 0

    assert await asyncio.to_thread(count) == 0
