"""Pull-mode staging (`POST /v1/fetch`) against real agent processes and a real HTTPS store.

The store is an aiohttp file server on its own loopback address, with a trustme CA whose
PEM the request carries, Basic auth, HTTP Range (aiohttp's FileResponse), and a switch to
cut the first response short, so the resume path runs against a real broken connection.
Registry-backed pulls (docker-registry, skopeo) are in tests/test_pull.py.
"""

from __future__ import annotations

import base64
import hashlib
import shutil
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp import web

from rollout.agent.fetch import RateLimit
from tests.agent.conftest import StartAgent
from tests.agent.harness import AgentProc
from tests.conftest import SampleImages, next_host

USER, PASSWORD = "puller", "s3cret-pa55"


@dataclass
class Store:
    """An HTTPS file store: GET /images/<name> serves files from `root`."""

    root: Path
    url: str
    ca_pem: str
    requests: list[dict[str, Any]] = field(default_factory=list)
    cut_after: int | None = None  # cut the next full response after this many bytes

    def image_url(self, name: str) -> str:
        return f"{self.url}/images/{name}"


@pytest.fixture
async def store(tmp_path: Path, images: SampleImages) -> AsyncIterator[Store]:
    ca = trustme.CA()
    host = next_host()
    cert = ca.issue_cert(host)
    root = tmp_path / "store"
    root.mkdir()
    for name, img in (("v2.img", images.v2), ("bad.img", images.bad)):
        shutil.copy(img.path, root / name)
    st = Store(root, f"https://{host}:8443", ca.cert_pem.bytes().decode())
    expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()

    async def serve(request: web.Request) -> web.StreamResponse:
        st.requests.append({"range": request.headers.get("Range"), "path": request.path})
        if request.headers.get("Authorization") != expected:
            return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="s"'})
        path = root / request.match_info["name"]
        if not path.is_file():
            return web.Response(status=404)
        if st.cut_after is not None and "Range" not in request.headers:
            cut, st.cut_after = st.cut_after, None
            resp = web.StreamResponse(headers={"Content-Length": str(path.stat().st_size)})
            await resp.prepare(request)
            await resp.write(path.read_bytes()[:cut])
            assert request.transport is not None
            request.transport.close()  # the connection breaks mid-body
            return resp
        return web.FileResponse(path)

    app = web.Application()
    app.router.add_get("/images/{name}", serve)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    await web.TCPSite(runner, host, 8443, ssl_context=server_ctx).start()
    try:
        yield st
    finally:
        await runner.cleanup()


def fetch_body(store: Store, name: str, digest: str, size: int, **over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "url": store.image_url(name),
        "digest": digest,
        "size": size,
        "auth": {"username": USER, "password": PASSWORD},
        "ca": store.ca_pem,
    }
    body.update(over)
    return {k: v for k, v in body.items() if v is not None}


async def fetched(agent: AgentProc, digest: str) -> dict[str, Any]:
    """The status once the fetch of `digest` ended (staged or failed)."""
    return await agent.wait_status(
        lambda s: (
            (s.get("fetch") or {}).get("digest") == digest and s["fetch"]["state"] != "fetching"
        ),
        what=f"the fetch of {digest} to end",
    )


async def test_fetch_stages_the_image_in_one_pass(
    start_agent: StartAgent, store: Store, images: SampleImages
) -> None:
    agent = await start_agent()
    code, body, _ = await agent.request(
        "POST", "/v1/fetch", json_body=fetch_body(store, "v2.img", images.v2.digest, images.v2.size)
    )
    assert code == 202, body
    assert body["state"] == "fetching" and body["digest"] == images.v2.digest
    st = await fetched(agent, images.v2.digest)
    assert st["fetch"]["state"] == "staged", st["fetch"]
    assert st["fetch"]["bytes"] == images.v2.size
    assert st["staged"]["digest"] == images.v2.digest and st["staged"]["version"] == "2.0.0"
    image_tar = agent.state_dir / "slots" / st["staged"]["slot"] / "image.tar"
    assert "sha256:" + hashlib.sha256(image_tar.read_bytes()).hexdigest() == images.v2.digest
    # The same digest again is not fetched again.
    seen = len(store.requests)  # the first answered 401 (the challenge), then with auth
    code, body, _ = await agent.request(
        "POST", "/v1/fetch", json_body=fetch_body(store, "v2.img", images.v2.digest, images.v2.size)
    )
    assert code == 200 and body["written"] is False
    assert len(store.requests) == seen
    # Credentials never reach the agent's log.
    assert PASSWORD not in agent.log_path.read_text()
    # And the staged image activates like a pushed one; the last fetch is still reported
    # by the agent process that boots (a reboot re-executes it).
    code, body, _ = await agent.request("POST", "/v1/activate", json_body={"mode": "reboot"})
    assert code == 202, body
    st = await agent.wait_status(
        lambda s: s["booted"]["digest"] == images.v2.digest, what="the pulled image to boot"
    )
    assert st["boot_count"] == 2
    assert st["fetch"]["state"] == "staged" and st["fetch"]["bytes"] == images.v2.size
    assert st["fetch"]["digest"] == images.v2.digest


async def test_a_broken_connection_resumes_with_a_range_request(
    start_agent: StartAgent, store: Store, images: SampleImages
) -> None:
    agent = await start_agent()
    store.cut_after = images.v2.size // 3
    code, body, _ = await agent.request(
        "POST", "/v1/fetch", json_body=fetch_body(store, "v2.img", images.v2.digest, images.v2.size)
    )
    assert code == 202, body
    st = await fetched(agent, images.v2.digest)
    assert st["fetch"]["state"] == "staged", st["fetch"]
    assert st["fetch"]["resumes"] >= 1
    ranges = [r["range"] for r in store.requests if r["range"]]
    assert ranges and ranges[0] == f"bytes={images.v2.size // 3}-", store.requests
    assert st["staged"]["digest"] == images.v2.digest


@pytest.mark.parametrize(
    ("name", "over", "code"),
    [
        ("wrong digest", {"digest": "sha256:" + "0" * 64}, "digest_mismatch"),
        ("no such image", {"name": "nope.img"}, "fetch_not_found"),
        ("wrong password", {"auth": {"username": USER, "password": "nope"}}, "fetch_unauthorized"),
        ("no credentials", {"auth": None}, "fetch_unauthorized"),
    ],
)
async def test_a_failed_fetch_stages_nothing(
    start_agent: StartAgent,
    store: Store,
    images: SampleImages,
    name: str,
    over: dict[str, Any],
    code: str,
) -> None:
    agent = await start_agent()
    digest = over.pop("digest", images.v2.digest)
    body = fetch_body(store, over.pop("name", "v2.img"), digest, images.v2.size, **over)
    status, answer, _ = await agent.request("POST", "/v1/fetch", json_body=body)
    assert status == 202, answer
    st = await fetched(agent, digest)
    assert st["fetch"]["state"] == "failed", name
    assert st["fetch"]["error"]["code"] == code, st["fetch"]
    assert st["staged"] is None and st["busy"] is None
    assert st["booted"]["digest"] == images.v1.digest
    slots = agent.state_dir / "slots"
    inactive = "B" if st["booted"]["slot"] == "A" else "A"
    assert not (slots / inactive).exists()
    assert PASSWORD not in agent.log_path.read_text()


@pytest.mark.parametrize(
    ("over", "field_name"),
    [
        ({"url": "ftp://x/y"}, "url"),
        ({"digest": "sha256:abc"}, "digest"),
        ({"size": 0}, "size"),
        ({"ca": "not a certificate"}, "ca"),
        ({"ca": "caf\u00e9 \u00b7 not ASCII"}, "ca"),  # found by the fuzz test: was a 500
        ({"rate_limit": -1}, "rate_limit"),
        ({"extra": 1}, "extra"),
    ],
)
async def test_a_bad_fetch_request_is_a_400_naming_the_field(
    start_agent: StartAgent,
    store: Store,
    images: SampleImages,
    over: dict[str, Any],
    field_name: str,
) -> None:
    agent = await start_agent()
    body = fetch_body(store, "v2.img", images.v2.digest, images.v2.size) | over
    code, answer, _ = await agent.request("POST", "/v1/fetch", json_body=body)
    assert code == 400, answer
    assert answer["error"] == "bad_request" and answer["field"] == field_name, answer
    assert store.requests == []
    assert (await agent.status())["busy"] is None


async def test_discard_drops_a_staged_image(
    start_agent: StartAgent, store: Store, images: SampleImages
) -> None:
    agent = await start_agent()
    body = fetch_body(store, "v2.img", images.v2.digest, images.v2.size)
    await agent.request("POST", "/v1/fetch", json_body=body)
    st = await fetched(agent, images.v2.digest)
    slot = st["staged"]["slot"]
    code, answer, _ = await agent.request(
        "DELETE", "/v1/image", json_body={"digest": "sha256:" + "0" * 64}
    )
    assert code == 200 and answer["discarded"] is False
    code, answer, _ = await agent.request(
        "DELETE", "/v1/image", json_body={"digest": images.v2.digest}
    )
    assert code == 200 and answer["discarded"] is True
    st = await agent.status()
    assert st["staged"] is None
    assert not (agent.state_dir / "slots" / slot).exists()
    code, answer, _ = await agent.request("POST", "/v1/activate", json_body={"mode": "reboot"})
    assert code == 409 and answer["error"] == "nothing_staged"


async def test_an_unsigned_pull_is_refused_before_a_byte_is_fetched(
    start_agent: StartAgent, store: Store, images: SampleImages, tmp_path: Path
) -> None:
    from rollout.signing import keygen

    _, public = keygen(tmp_path / "key")
    agent = await start_agent("--trusted-key", str(public))
    body = fetch_body(store, "v2.img", images.v2.digest, images.v2.size)
    code, answer, _ = await agent.request("POST", "/v1/fetch", json_body=body)
    assert code == 422 and answer["error"] == "unsigned", answer
    assert store.requests == []


@pytest.mark.parametrize(
    ("name", "rate", "chunks", "expected"),
    [
        ("half a second's worth waits half a second", 100, [(0.0, 50)], 0.5),
        ("two seconds' worth at once waits two", 100, [(0.0, 100), (0.0, 100)], 2.0),
        ("time passed pays for bytes", 100, [(0.0, 100), (1.5, 100)], 0.5),
        ("slower than the rate: no wait", 100, [(0.0, 100), (3.0, 100)], 0.0),
    ],
)
def test_rate_limit_delays(
    name: str, rate: int, chunks: list[tuple[float, int]], expected: float
) -> None:
    now = [0.0]
    limit = RateLimit(rate, clock=lambda: now[0])
    delay = 0.0
    for at, n in chunks:
        now[0] = at
        delay = limit.delay(n)
    assert delay == pytest.approx(expected), name
