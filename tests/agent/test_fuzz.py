"""The agent's API against its own OpenAPI document, fuzzed by schemathesis (a client we
did not write): no server error, no status the document does not declare, answers of
the declared shapes, 405 with Allow. Bounded in examples and seeded, so it is the same
run every time."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from tests.agent.conftest import StartAgent

SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
pytestmark = pytest.mark.skipif(not SCHEMATHESIS.exists(), reason="needs schemathesis")


async def fuzz(
    url: str, token: str, *args: str, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the schemathesis CLI (it keeps a .schemathesis/ cache in `cwd`)."""
    auth = f"Authorization: Bearer {token}"
    argv = [str(SCHEMATHESIS), "run", url, "--checks", "all", "-H", auth,
            "--max-examples", "25", "--seed", "20261201", "-w", "1", *args]  # fmt: skip
    return await asyncio.to_thread(
        subprocess.run, argv, capture_output=True, text=True, timeout=240, check=False, cwd=cwd
    )


async def test_schemathesis_finds_nothing_against_the_agent(
    start_agent: StartAgent, tmp_path: Path
) -> None:
    agent = await start_agent()
    url = agent.url("/v1/openapi.json")
    every = await fuzz(url, agent.token, "--exclude-path", "/v1/image",
                       "--exclude-path", "/v1/fetch", cwd=tmp_path)  # fmt: skip
    assert every.returncode == 0, every.stdout[-4000:]
    # A well-formed upload can still be refused (its bytes do not hash to its digest), and
    # a well-formed fetch too (its `ca` is not a certificate): everything but
    # "schema-valid data is accepted" holds for them.
    for path in ("/v1/image", "/v1/fetch"):
        one = await fuzz(url, agent.token, "--include-path", path,
                         "--exclude-checks", "positive_data_acceptance", cwd=tmp_path)  # fmt: skip
        assert one.returncode == 0, one.stdout[-4000:]
    assert (await agent.status())["staged"] is None  # nothing random was ever staged


@pytest.mark.parametrize(
    ("name", "method", "path", "body", "headers", "field"),
    [
        ("empty holder", "PUT", "/v1/lease", {"holder": "", "ttl": 30}, {}, "holder"),
        ("over-long holder", "PUT", "/v1/lease", {"holder": "x" * 129, "ttl": 30}, {}, "holder"),
        ("holder with a NUL", "DELETE", "/v1/lease", {"holder": "a\u0000b"}, {}, "holder"),
        ("ttl not a number", "PUT", "/v1/lease", {"holder": "r1", "ttl": "30"}, {}, "ttl"),
        ("empty mode", "POST", "/v1/activate", {"mode": ""}, {}, "mode"),
        ("digest not hex", "PUT", "/v1/image", None, {"X-Image-Digest": "sha256:zz"},
         "X-Image-Digest"),
    ],
)  # fmt: skip
async def test_bad_fields_get_400_naming_them_and_touch_nothing(
    start_agent: StartAgent,
    name: str,
    method: str,
    path: str,
    body: object,
    headers: dict[str, str],
    field: str,
) -> None:
    agent = await start_agent()
    before = await agent.status()
    code, answer, _ = await agent.request(method, path, json_body=body, headers=headers)
    assert (code, answer["error"], answer.get("field")) == (400, "bad_request", field), name
    after = await agent.status()
    assert (after["staged"], after["lease"], after["boot_count"]) == (
        before["staged"], before["lease"], before["boot_count"])  # fmt: skip
