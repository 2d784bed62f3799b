"""The agent's HTTP contract against real agent processes: auth, status, staging, errors."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import signal
import sys
import tarfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest

from tests.agent.conftest import StartAgent
from tests.agent.harness import TOKEN, AgentProc, processes_under
from tests.conftest import SampleImages

STATUS_KEYS = {
    "node_id",
    "backend",
    "booted",
    "staged",
    "committed",
    "last_good_slot",
    "last_good",
    "boot_tries_left",
    "boot_count",
    "workload",
    "fell_back",
    "busy",
    "lease",
    "fetch",
}


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under `root` with the sha256 of its content (symlinks by target)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "-> " + str(p.readlink())
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


def slot_files(agent: AgentProc, slot: str) -> list[Path]:
    d = agent.state_dir / "slots" / slot
    return sorted(d.rglob("*")) if d.exists() else []


async def test_auth(start_agent: StartAgent) -> None:
    agent = await start_agent()

    code, body, headers = await agent.request("GET", "/v1/status", token=None)
    assert code == 401
    assert body["error"] == "unauthorized" and body["message"]
    assert headers["WWW-Authenticate"] == "Bearer"

    code, body, _ = await agent.request("GET", "/v1/status", token="wrong")
    assert (code, body["error"]) == (401, "unauthorized")
    async with agent.session.get(
        agent.url("/v1/status"), headers={"Authorization": f"Basic {TOKEN}"}
    ) as r:
        assert r.status == 401
    for method, path in [("PUT", "/v1/image"), ("POST", "/v1/activate"), ("POST", "/v1/commit")]:
        code, body, _ = await agent.request(method, path, token="wrong")
        assert code == 401, (method, path)

    code, body, _ = await agent.request("GET", "/healthz", token=None)
    assert (code, body) == (200, {"ok": True})

    assert TOKEN not in agent.log_path.read_text()


async def test_status_shape(start_agent: StartAgent, images: SampleImages) -> None:
    agent = await start_agent()
    status = await agent.wait_status(lambda s: s["workload"]["state"] == "running", "running")
    assert set(status) == STATUS_KEYS
    assert status["backend"] == {"kind": "emulated"}
    assert status["node_id"] == agent.host
    assert status["booted"] == {
        "slot": "A",
        "name": "sample-web",
        "version": "1.0.0",
        "digest": images.v1.digest,
    }
    assert status["staged"] is None
    assert status["committed"] is True
    assert status["last_good_slot"] == "A"
    assert status["boot_tries_left"] == 0
    assert status["boot_count"] == 1
    assert status["fell_back"] is None
    assert status["busy"] is None
    assert status["lease"] is None
    workload = status["workload"]
    assert set(workload) == {"state", "pid", "port", "exit_code", "restarts"}
    assert workload["port"] == agent.workload_port and isinstance(workload["pid"], int)
    assert await agent.workload_get() == (200, {"version": "1.0.0", "healthy": True})

    code, body, _ = await agent.request("GET", "/v1/nope")
    assert (code, body["error"]) == (404, "not_found")


async def test_wrong_digest_leaves_everything_untouched(
    start_agent: StartAgent, images: SampleImages
) -> None:
    agent = await start_agent()
    before = await agent.status()
    root_a = agent.state_dir / "slots" / "A"
    tree_before = tree_digest(root_a)

    wrong = "sha256:" + "0" * 64
    code, body = await agent.stage(images.v2.path, wrong)
    assert code == 422
    assert body["error"] == "digest_mismatch"
    assert body["expected"] == wrong and body["actual"] == images.v2.digest

    after = await agent.status()
    assert after["booted"] == before["booted"]
    assert after["staged"] is None
    assert tree_digest(root_a) == tree_before
    assert slot_files(agent, "B") == []


@pytest.mark.parametrize(
    "digest", [None, "", "sha256:xyz", "md5:" + "0" * 64, "sha256:" + "A" * 64]
)
async def test_missing_or_malformed_digest(
    start_agent: StartAgent, images: SampleImages, digest: str | None
) -> None:
    agent = await start_agent()
    headers = {} if digest is None else {"X-Image-Digest": digest}
    data = await asyncio.to_thread(Path(images.v2.path).read_bytes)
    code, body, _ = await agent.request("PUT", "/v1/image", data=data, headers=headers)
    assert code == 400
    assert body["error"] == "bad_request" and "X-Image-Digest" in body["message"]
    assert (await agent.status())["staged"] is None


async def test_stage_then_again_is_not_written(
    start_agent: StartAgent, images: SampleImages
) -> None:
    agent = await start_agent()
    code, body = await agent.stage(images.v2.path, images.v2.digest)
    assert code == 200, body
    assert body == {
        "slot": "B",
        "digest": images.v2.digest,
        "version": "2.0.0",
        "name": "sample-web",
        "bytes": images.v2.size,
        "written": True,
    }
    status = await agent.status()
    assert status["staged"] == {
        "slot": "B",
        "name": "sample-web",
        "version": "2.0.0",
        "digest": images.v2.digest,
    }
    assert status["booted"]["digest"] == images.v1.digest
    image_file = agent.state_dir / "slots" / "B" / "image.tar"
    mtime = image_file.stat().st_mtime_ns

    code, body = await agent.stage(images.v2.path, images.v2.digest)
    assert code == 200
    assert body["written"] is False and body["slot"] == "B"
    assert image_file.stat().st_mtime_ns == mtime

    code, body = await agent.stage(images.v1.path, images.v1.digest)
    assert (code, body["error"]) == (409, "already_booted")


def _evil_tar(tmp_path: Path, kind: str) -> tuple[Path, str]:
    """An image tar with a valid manifest plus one member that escapes."""
    path = tmp_path / f"evil-{kind}.img"
    manifest = json.dumps(
        {"format": 1, "name": "evil", "version": "6.6.6", "workload": {"command": ["true"]}}
    ).encode()
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("manifest.json")
        info.size = len(manifest)
        tar.addfile(info, io.BytesIO(manifest))
        payload = b"pwned\n"
        if kind == "dotdot":
            info = tarfile.TarInfo("../evil")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        elif kind == "absolute":
            info = tarfile.TarInfo(str(tmp_path / "evil-absolute"))
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        elif kind == "symlink":
            info = tarfile.TarInfo("etc-link")
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc"
            tar.addfile(info)
    with tarfile.open(path) as tar:  # the member really is in the file as crafted
        names = tar.getnames()
        assert len(names) == 2 and (kind != "absolute" or names[1].startswith("/"))
    return path, "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
async def test_escaping_tar_is_refused(start_agent: StartAgent, tmp_path: Path, kind: str) -> None:
    agent = await start_agent()
    path, digest = _evil_tar(tmp_path, kind)
    code, body = await agent.stage(str(path), digest)
    assert code == 422, body
    assert body["error"] == "unsafe_image" and body["message"]
    assert (await agent.status())["staged"] is None
    assert slot_files(agent, "B") == []
    assert not (tmp_path / "evil-absolute").exists()
    assert not list(agent.state_dir.rglob("evil"))
    assert not (agent.state_dir / "slots" / "evil").exists()


async def test_not_an_image_is_refused(start_agent: StartAgent, tmp_path: Path) -> None:
    agent = await start_agent()
    junk = tmp_path / "junk.img"
    junk.write_bytes(b"this is not a tar file\n" * 100)
    digest = "sha256:" + hashlib.sha256(junk.read_bytes()).hexdigest()
    code, body = await agent.stage(str(junk), digest)
    assert (code, body["error"]) == (422, "bad_image")
    assert (await agent.status())["staged"] is None
    assert slot_files(agent, "B") == []


async def test_second_operation_while_staging_is_busy(
    start_agent: StartAgent, images: SampleImages
) -> None:
    agent = await start_agent()
    data = await asyncio.to_thread(Path(images.v2.path).read_bytes)
    release = asyncio.Event()

    async def slow_body() -> AsyncIterator[bytes]:
        yield data[:1024]
        await release.wait()
        yield data[1024:]

    async def first_put() -> tuple[int, dict[str, object]]:
        code, body, _ = await agent.request(
            "PUT", "/v1/image", data=slow_body(), headers={"X-Image-Digest": images.v2.digest}
        )
        return code, body

    first = asyncio.create_task(first_put())
    try:
        await agent.wait_status(lambda s: s["busy"] == "staging", "busy staging")
        code, body = await agent.stage(images.v2.path, images.v2.digest)
        assert (code, body["error"]) == (409, "busy")
        code, body, _ = await agent.request("POST", "/v1/activate", json_body={"mode": "reboot"})
        assert (code, body["error"]) == (409, "busy")
        code, body, _ = await agent.request("POST", "/v1/rollback")
        assert (code, body["error"]) == (409, "busy")
    finally:
        release.set()
    code, body = await first
    assert code == 200 and body["written"] is True
    status = await agent.status()
    assert status["busy"] is None and status["staged"]["digest"] == images.v2.digest


async def test_activate_needs_a_staged_image_and_a_mode(start_agent: StartAgent) -> None:
    agent = await start_agent()
    code, body, _ = await agent.request("POST", "/v1/activate", json_body={"mode": "reboot"})
    assert (code, body["error"]) == (409, "nothing_staged")
    for bad in [{"mode": "warp"}, {}, {"mode": 3}]:
        code, body, _ = await agent.request("POST", "/v1/activate", json_body=bad)
        assert code == 400, bad
        assert body["error"] == "bad_request" and body["field"] == "mode"
        assert "mode" in body["message"]
    code, body, _ = await agent.request("POST", "/v1/activate", data=b"{not json")
    assert (code, body["error"]) == (400, "bad_request")


async def test_sigterm_stops_the_workload(start_agent: StartAgent) -> None:
    agent = await start_agent()
    status = await agent.wait_status(lambda s: s["workload"]["state"] == "running", "running")
    assert processes_under(agent.state_dir) == [status["workload"]["pid"]]
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGTERM)
    assert await agent.wait_exit() == 0
    assert processes_under(agent.state_dir) == []
    with pytest.raises(aiohttp.ClientError):
        await agent.workload_get()


async def test_upload_cut_off_midway_leaves_nothing(
    start_agent: StartAgent, images: SampleImages
) -> None:
    agent = await start_agent()
    _reader, writer = await asyncio.open_connection(agent.host, agent.port)
    head = (
        "PUT /v1/image HTTP/1.1\r\n"
        f"Host: {agent.host}\r\n"
        f"Authorization: Bearer {TOKEN}\r\n"
        f"X-Image-Digest: {images.v2.digest}\r\n"
        "Content-Length: 1000000\r\n\r\n"
    )
    writer.write(head.encode() + b"x" * 5000)
    await writer.drain()
    await agent.wait_status(lambda s: s["busy"] == "staging", "busy staging")
    writer.close()
    await writer.wait_closed()
    status = await agent.wait_status(lambda s: s["busy"] is None, "not busy")
    assert status["staged"] is None
    assert slot_files(agent, "B") == []
    code, body = await agent.stage(images.v2.path, images.v2.digest)
    assert code == 200 and body["written"] is True


async def test_committed_workload_is_restarted(start_agent: StartAgent) -> None:
    agent = await start_agent()
    first = await agent.wait_status(lambda s: s["workload"]["state"] == "running", "running")
    os.kill(first["workload"]["pid"], signal.SIGKILL)
    status = await agent.wait_status(
        lambda s: s["workload"]["restarts"] == 1 and s["workload"]["state"] == "running",
        "workload restarted",
    )
    assert status["workload"]["pid"] != first["workload"]["pid"]
    assert status["workload"]["exit_code"] == -signal.SIGKILL
    assert status["booted"] == first["booted"] and status["fell_back"] is None
    assert (await agent.workload_get())[0] == 200


async def _run_agent_expecting_failure(argv: list[str]) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode is not None
    return proc.returncode, err.decode()


async def test_bad_start_exits_2(tmp_path: Path, loopback: Callable[[], str]) -> None:
    token = tmp_path / "token"
    token.write_text("tok\n")
    base = [sys.executable, "-m", "rollout.agent", "--listen", f"{loopback()}:7000"]
    code, err = await _run_agent_expecting_failure(
        [*base, "--state-dir", str(tmp_path / "s"), "--token-file", str(token)]
    )
    assert code == 2 and "--image" in err
    empty = tmp_path / "empty"
    empty.write_text("\n")
    code, err = await _run_agent_expecting_failure(
        [*base, "--state-dir", str(tmp_path / "s"), "--token-file", str(empty)]
    )
    assert code == 2 and "empty" in err
    code, err = await _run_agent_expecting_failure(
        [*base, "--state-dir", str(tmp_path / "s"), "--token-file", str(token), "--image",
         str(tmp_path / "missing.img")]
    )  # fmt: skip
    assert code == 2 and "missing.img" in err
