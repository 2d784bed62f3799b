"""Real Heat and CloudFormation clients pass and fail wait gates.

The real `cfn-signal` of Debian's heat-cfntools (`curl -X PUT`, the CloudFormation body,
no Authorization header) signals a gate through its pre-signed URL; a Heat-native
`curl -X POST -H 'X-Auth-Token: ...'` signals the ordinary path. Both against a real
`rollout serve` (across a restart) and a real `rollout run --listen`, with real agents.
A wrong URL gets one 404 whatever part is wrong, and changes nothing; no secret reaches a
log or the journal.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from rollout.gates.handles import KEY_SUFFIX
from tests.conftest import LocalFleet, SampleImages, next_host
from tests.helpers import (
    ROOT,
    TERMINAL,
    Service,
    body,
    fold_id,
    gated,
    journal_gates,
    policy_file,
    run_cmd,
    status_json,
    wait_for,
    wait_for_async,
)

CFN_BODY = "Application has completed configuration."  # cfn-signal's default -d


def cfn_signal(*args: str) -> subprocess.CompletedProcess[str]:
    """The real /usr/bin/cfn-signal (Debian heat-cfntools), which runs curl."""
    binary = shutil.which("cfn-signal")
    missing = [p for p, b in (("heat-cfntools", binary), ("curl", shutil.which("curl"))) if not b]
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"not installed: {', '.join(missing)} (.ci/run installs its PACKAGES)")
        pytest.skip(f"not installed: {', '.join(missing)} (apt-get install {' '.join(missing)})")
    assert binary is not None
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=60)


def curl(*args: str) -> tuple[int, str]:
    """Real curl; the HTTP status and the body."""
    proc = subprocess.run(
        ["curl", "-sS", "-o", "-", "-w", "\n%{http_code}", *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    text, _, code = proc.stdout.rpartition("\n")
    return int(code), text


def received(gates: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [g["signal"] for g in gates if g.get("event") == "received_signal"]


def no_secret_in(secret: str, *files: Path) -> None:
    for path in files:
        if path.exists():
            assert secret.encode() not in path.read_bytes(), f"the secret is in {path}"


def state_files(state: Path) -> list[Path]:
    return [state, Path(f"{state}-wal"), Path(f"{state}-shm")]


async def test_cfn_signal_and_heat_curl_pass_a_gate_of_rollout_serve_across_a_restart(
    service: Service,
    make_fleet: Callable[..., LocalFleet],
    images: SampleImages,
    tmp_path: Path,
) -> None:
    fl = make_fleet(2)
    gate = {"name": "tests", "kind": "wait", "after": "canary", "count": 3, "timeout": "120s"}
    policy = policy_file(
        tmp_path, gates=[gate], batches={"canary": 1, "size": 1, "max_unavailable": 1}
    )
    status, created = await service.call("POST", "/v1/rollouts", body(fl, policy, images.v2.path))
    assert status == 201, created
    rid = created["id"]
    url = created["signal_urls"]["tests"]
    secret = url.rsplit("/", 1)[1]
    assert url == f"{service.url}/v1/rollouts/{rid}/gates/tests/signal/{secret}"
    assert len(secret) == 43

    # Only a token holder sees the URL.
    status, anon = await service.call("GET", f"/v1/rollouts/{rid}", token=None)
    assert status == 401 and secret not in json.dumps(anon)
    _, listed = await service.call("GET", "/v1/rollouts")
    assert secret not in json.dumps(listed)
    _, shown = await service.call("GET", f"/v1/rollouts/{rid}")
    assert shown["signal_urls"] == {"tests": url}
    _, doc = await service.call("GET", "/v1/openapi.json", token=None)
    presigned = doc["paths"]["/v1/rollouts/{id}/gates/{gate}/signal/{secret}"]
    assert set(presigned) == {"put", "post"} and presigned["put"]["security"] == []
    assert "401" not in presigned["put"]["responses"]
    assert set(doc["paths"]["/v1/rollouts/{id}/gates/{gate}/signal"]) == {"put", "post"}

    async def waiting() -> bool:
        _, state = await service.call("GET", f"/v1/rollouts/{rid}")
        return bool(state["phase"] == "waiting")

    await wait_for_async(waiting, 60, what="the gate to wait")

    # Wrong URLs: one and the same 404 whichever part is wrong, and nothing changes.
    before = await service.events(rid)
    cfn = json.dumps({"Status": "SUCCESS", "Reason": "x", "UniqueId": "evil", "Data": ""})
    flipped = secret[:-1] + ("A" if secret[-1] != "A" else "B")
    wrong = [
        url.replace(secret, flipped),
        url.replace(secret, secret[:-1]),
        url + "A",
        url.replace(f"/rollouts/{rid}/", "/rollouts/000000000000/"),
        url.replace("/gates/tests/", "/gates/nope/"),
    ]
    answers = set()
    for bad in wrong:
        for method in ("PUT", "POST"):
            code, text = curl("-X", method, "-H", "Content-Type:", "--data-binary", cfn, bad)
            assert code == 404, (bad, text)
            answers.add(text)
    assert len(answers) == 1 and "tests" not in next(iter(answers))
    # cfn-signal to a wrong URL: curl without -f exits 0, so cfn-signal does too, but the
    # gate has not counted it.
    assert cfn_signal("-e", "0", "-i", "evil", url.replace(secret, flipped)).returncode == 0
    ordinary = f"{service.url}/v1/rollouts/{rid}/gates/tests/signal"
    for headers in ([], ["-H", "X-Auth-Token: wrong"], ["-H", "Authorization: Bearer wrong"]):
        code, _ = curl("-X", "PUT", *headers, "--data-binary", cfn, ordinary)
        assert code == 401
    # The right URL with a bad body: 400 naming the field, nothing counted.
    code, text = curl("-X", "PUT", "--data-binary", '{"Status": "MAYBE", "UniqueId": "x"}', url)
    assert code == 400 and json.loads(text)["field"] == "Status"
    assert await service.events(rid) == before

    # The controller restarts while the gate waits: the same URL still works.
    service.kill()
    service.start()
    _, shown = await service.call("GET", f"/v1/rollouts/{rid}")
    assert shown["signal_urls"] == {"tests": url}
    await wait_for_async(waiting, 60, what="the resumed gate to wait")

    # The real cfn-signal: PUT, CloudFormation body, no Authorization header.
    sent = cfn_signal("-e", "0", "-r", "tests passed", "-i", "ci-1", url)
    assert sent.returncode == 0, sent.stderr

    async def counted() -> list[dict[str, Any]]:
        _, state = await service.call("GET", f"/v1/rollouts/{rid}")
        return received(state["gates"])

    assert await wait_for_async(counted, 60, what="the cfn-signal to be counted") == [
        {"status": "SUCCESS", "reason": "tests passed", "data": CFN_BODY, "id": "ci-1"}
    ]
    assert (await service.call("GET", f"/v1/rollouts/{rid}"))[1]["phase"] == "waiting"

    # Heat native: POST with X-Auth-Token on the ordinary path.
    native = json.dumps({"status": "SUCCESS", "reason": "e2e ok", "data": "9 passed", "id": "ci-2"})
    code, text = curl("-X", "POST", "-H", f"X-Auth-Token: {service.token}",
                      "-H", "Content-Type: application/json", "--data-binary", native,
                      ordinary)  # fmt: skip
    assert code == 200, text
    assert json.loads(text)["signal"]["id"] == "ci-2"
    assert (await service.call("GET", f"/v1/rollouts/{rid}"))[1]["phase"] == "waiting"
    # And a CloudFormation body PUT to the ordinary path with the bearer token.
    code, text = curl("-X", "PUT", "-H", f"Authorization: Bearer {service.token}",
                      "--data-binary", cfn.replace("evil", "ci-3"), ordinary)  # fmt: skip
    assert code == 200, text
    final = await service.wait_phase(rid, TERMINAL)
    assert final["phase"] == "succeeded", final
    finished = [g for g in final["gates"] if g["event"] == "finished"]
    assert [(g["gate"], g["result"]) for g in finished] == [("tests", "passed")]
    assert [s["id"] for s in received(final["gates"])] == ["ci-1", "ci-2", "ci-3"]
    assert all(r["digest"] == images.v2.digest for r in status_json(fl.inventory).values())

    # Finished: the URL is spent (409, nothing journaled).
    after = await service.events(rid)
    code, _ = curl("-X", "PUT", "--data-binary", cfn.replace("evil", "late"), url)
    assert code == 409
    assert await service.events(rid) == after

    # No secret in any log, nor in the journal; the key file is the owner's alone.
    state = service.workdir / "state.db"
    no_secret_in(secret, *service.logs, *state_files(state))
    for log in service.logs:
        assert service.token not in log.read_text()
    assert stat.S_IMODE(os.stat(f"{state}{KEY_SUFFIX}").st_mode) == 0o600


def test_cfn_signal_failure_fails_the_gate_of_rollout_run_listen(
    make_fleet: Callable[..., LocalFleet], images: SampleImages, tmp_path: Path
) -> None:
    fl = make_fleet(2)
    policy = tmp_path / "p.yaml"
    gate = {"name": "tests", "kind": "wait", "after": "canary", "timeout": "120s"}
    policy.write_text(yaml.safe_dump(gated(gate)))  # failure action: rollback
    token = tmp_path / "token"
    token.write_text("run-token\n")
    host = next_host()
    log = tmp_path / "run.log"
    state = tmp_path / "state.db"
    with open(log, "w") as err:
        proc = subprocess.Popen(
            run_cmd(fl, policy, images.v2.path, tmp_path, "--listen", f"{host}:7401",
                    "--token-file", str(token)),
            cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True,
        )  # fmt: skip
    try:

        def gate_waits() -> bool:
            assert proc.poll() is None, log.read_text()
            return any(g.get("event") == "waiting" for g in journal_gates(state))

        wait_for(gate_waits, 60, what="the gate to wait")
        rid = fold_id(state)
        server = f"http://{host}:7401"
        env = {k: v for k, v in os.environ.items() if not k.startswith("ROLLOUT_")}

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "rollout", *args, "--server", server],
                                  capture_output=True, text=True, cwd=ROOT, env=env,
                                  timeout=60)  # fmt: skip

        shown = cli("show", rid, "--token-file", str(token), "--output", "json")
        assert shown.returncode == 0, shown.stderr
        url = json.loads(shown.stdout)["signal_urls"]["tests"]
        secret = url.rsplit("/", 1)[1]
        assert url == f"{server}/v1/rollouts/{rid}/gates/tests/signal/{secret}"
        table = cli("show", rid, "--token-file", str(token))
        assert "gate tests signal URL" in table.stdout and url in table.stdout
        anon = cli("show", rid)
        assert anon.returncode == 2 and secret not in anon.stdout + anon.stderr
        code, text = curl(f"{server}/v1/rollouts/{rid}")
        assert code == 401 and secret not in text

        sent = cfn_signal("-e", "1", "-r", "tests failed", "-i", "ci-1", url)
        assert sent.returncode == 0, sent.stderr
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, out
    result = json.loads(out)
    assert result["phase"] == "rolled_back", result
    assert "tests failed" in result["message"]
    gates = journal_gates(state)
    assert received(gates) == [
        {"status": "FAILURE", "reason": "tests failed", "data": CFN_BODY, "id": "ci-1"}
    ]
    assert [g["result"] for g in gates if g["event"] == "finished"] == ["failed"]
    rows = status_json(fl.inventory)
    assert all(r["digest"] == images.v1.digest for r in rows.values())
    no_secret_in(secret, log, *state_files(state))
    assert secret not in out and "run-token" not in log.read_text()
