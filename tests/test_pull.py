"""Pull mode end to end: `rollout image push` to a real registry, `rollout run --image
oci://...` over real local agents, each pulling the blob itself.

Everything is real: docker-registry processes with TLS and basic auth (tests/registry.py),
agent processes, the CLI as a subprocess, the journal. The controller's own traffic is
checked by its metrics (`rollout_image_bytes_transferred_total` stays 0 in pull mode),
and what the nodes fetched by the registry's access log and the agents' status.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import LocalFleet, SampleImages
from tests.registry import CuttingProxy, Registry, RegistryFactory

ROOT = Path(__file__).resolve().parent.parent
POLICY: dict[str, Any] = {
    "activation": "soft-reboot",
    "batches": {"canary": 1, "size": "50%", "max_unavailable": "50%"},
    "health": {
        "checks": [{"type": "http", "port": 8080, "path": "/healthz"}, {"type": "agent"}],
        "interval": "200ms", "min_healthy_time": "600ms", "deadline": "15s",
        "boot_timeout": "20s", "failure_threshold": 4,
    },
    "failure": {"max_failed": 0, "action": "rollback"},
    "prestage": {"mode": "all", "max_concurrent": 2},
}  # fmt: skip


def rollout(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rollout", *args],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT,
    )  # fmt: skip


def push(registry: Registry, image: str, ref: str) -> dict[str, Any]:
    proc = rollout("image", "push", image, ref, "--authfile", str(registry.authfile),
                   "--registry-ca", str(registry.ca_pem), "--output", "json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout))


def run_args(fl: LocalFleet, tmp: Path, image: str, registry: Registry, *more: str) -> list[str]:
    policy = tmp / "policy.yaml"
    if not policy.exists():
        policy.write_text(yaml.safe_dump(POLICY))
    return ["run", "--inventory", str(fl.inventory), "--policy", str(policy),
            "--image", image, "--state", str(tmp / "state.db"), "--authfile",
            str(registry.authfile), "--registry-ca", str(registry.ca_pem),
            "--output", "json", "--log-format", "json", *more]  # fmt: skip


def agent_status(fl: LocalFleet, node: str) -> dict[str, Any]:
    import urllib.request

    address = next(n.address for n in fl.nodes if n.id == node)
    token = (fl.workdir / "token").read_text().strip()
    req = urllib.request.Request(f"http://{address}/v1/status")
    req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=5) as r:
        return dict(json.loads(r.read()))


def blob_gets(registry: Registry, digest: str) -> list[str]:
    """The blob requests the registry answered with bytes (not the 401 challenges)."""
    return [
        line
        for line in registry.access_log()
        if f"GET /v2/fleet/web/blobs/{digest}" in line and ('" 200 ' in line or '" 206 ' in line)
    ]


def relabel(fl: LocalFleet, labels: dict[str, dict[str, str]], mirrors: list[Any]) -> None:
    """Give nodes labels and the inventory registry mirrors (rewritten in place)."""
    data = yaml.safe_load(fl.inventory.read_text())
    for node in data["nodes"]:
        node["labels"] = labels.get(node["id"], node.get("labels", {}))
    data["registry_mirrors"] = mirrors
    fl.inventory.write_text(yaml.safe_dump(data))


def journal_image(tmp: Path) -> dict[str, Any]:
    with sqlite3.connect(tmp / "state.db") as db:
        rows = db.execute("SELECT kind, data FROM entries ORDER BY seq").fetchall()
    created = next(json.loads(data) for kind, data in rows if kind == "created")
    return dict(created["image"])


def test_every_node_pulls_the_pushed_image_and_the_controller_sends_none_of_it(
    registry: Registry, make_fleet: Callable[..., LocalFleet], images: SampleImages, tmp_path: Path
) -> None:
    pushed = push(registry, images.v2.path, f"oci://{registry.address}/fleet/web:2.0")
    assert pushed["digest"] == images.v2.digest
    fl = make_fleet(3)
    proc = rollout(*run_args(fl, tmp_path, f"oci://{registry.address}/fleet/web:2.0", registry,
                             "--metrics-port", "0"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["phase"] == "succeeded"
    for node in fl.nodes:
        st = agent_status(fl, node.id)
        assert st["booted"]["digest"] == images.v2.digest and st["committed"]
        assert st["fetch"]["state"] == "staged" and st["fetch"]["bytes"] == images.v2.size
        assert st["fetch"]["url"].startswith(f"https://{registry.address}/v2/fleet/web/blobs/")
    assert len(blob_gets(registry, images.v2.digest)) == 3
    image = journal_image(tmp_path)
    assert image["source"] == f"oci://{registry.address}/fleet/web@{pushed['manifest_digest']}"
    assert image["reference"] == f"oci://{registry.address}/fleet/web:2.0"
    assert image["digest"] == images.v2.digest
    assert registry.password not in proc.stderr + proc.stdout
    assert registry.password not in (tmp_path / "state.db").read_bytes().decode(errors="replace")
    events = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    prestaged = [e for e in events if e.get("detail") == "pre-staged"]
    assert {e["node"] for e in prestaged} >= {fl.nodes[1].id, fl.nodes[2].id}


def test_a_tag_moved_mid_rollout_changes_nothing(
    registry: Registry, make_fleet: Callable[..., LocalFleet], images: SampleImages, tmp_path: Path
) -> None:
    ref = f"oci://{registry.address}/fleet/web:stable"
    push(registry, images.v2.path, ref)
    fl = make_fleet(3)
    first = rollout(*run_args(fl, tmp_path, ref, registry, "--stop-after", "canary"))
    assert first.returncode == 0, first.stderr[-3000:]
    assert agent_status(fl, fl.nodes[0].id)["booted"]["digest"] == images.v2.digest
    push(registry, images.bad.path, ref)  # the tag now names another image
    again = rollout(*run_args(fl, tmp_path, ref, registry))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "this rollout stays on the digest it resolved" in again.stderr
    for node in fl.nodes:
        assert agent_status(fl, node.id)["booted"]["digest"] == images.v2.digest
    assert blob_gets(registry, images.bad.digest) == []


def test_a_refusing_or_dead_store_fails_the_node_and_nothing_is_activated(
    registries: RegistryFactory,
    make_fleet: Callable[..., LocalFleet],
    images: SampleImages,
    tmp_path: Path,
) -> None:
    upstream = registries.start()
    stranger = registries.start()  # its credentials are not in the auth file: 401
    push(upstream, images.v2.path, f"oci://{upstream.address}/fleet/web:2.0")
    for mirror, code in ((stranger.address, "fetch_unauthorized"), ("127.0.0.1:9", "fetch_failed")):
        fl = make_fleet(2)
        relabel(fl, {n.id: {"site": "x"} for n in fl.nodes},
                [{"match": {"site": "x"}, "registry": mirror}])  # fmt: skip
        tmp = tmp_path / code
        tmp.mkdir()
        proc = rollout(*run_args(fl, tmp, f"oci://{upstream.address}/fleet/web:2.0", upstream))
        assert proc.returncode == 1, proc.stderr[-3000:]
        result = json.loads(proc.stdout)
        assert result["phase"] == "rolled_back", result
        canary = result["nodes"][0]
        assert canary["reason"] == "stage_failed" and code in canary["detail"], canary
        for node in fl.nodes:
            st = agent_status(fl, node.id)
            assert st["booted"]["digest"] == images.v1.digest and st["boot_count"] == 1
            assert st["staged"] is None
    assert upstream.password not in stranger.output()


def test_a_site_pulls_through_its_mirror_once_from_upstream(
    registries: RegistryFactory,
    make_fleet: Callable[..., LocalFleet],
    images: SampleImages,
    tmp_path: Path,
) -> None:
    # distribution's pull-through cache logs in to token-auth upstreams only
    upstream = registries.start(auth="token")
    mirror = registries.start(upstream=upstream)  # a pull-through cache
    push(upstream, images.v2.path, f"oci://{upstream.address}/fleet/web:2.0")
    fl = make_fleet(4)
    eu = {fl.nodes[1].id, fl.nodes[2].id, fl.nodes[3].id}
    relabel(fl, {n: {"site": "eu"} for n in eu},
            [{"match": {"site": "eu"}, "registry": mirror.address}])  # fmt: skip
    both = tmp_path / "auth.json"  # one auth file with both registries
    auths = json.loads(upstream.authfile.read_text())["auths"] | json.loads(
        mirror.authfile.read_text())["auths"]  # fmt: skip
    both.write_text(json.dumps({"auths": auths}))
    # One fetch at a time, so the cache's first fill is over before the next node asks.
    (tmp_path / "policy.yaml").write_text(
        yaml.safe_dump(POLICY | {"prestage": {"mode": "all", "max_concurrent": 1}})
    )
    args = run_args(fl, tmp_path, f"oci://{upstream.address}/fleet/web:2.0", upstream)
    args[args.index("--authfile") + 1] = str(both)
    proc = rollout(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for node in fl.nodes:
        st = agent_status(fl, node.id)
        assert st["booted"]["digest"] == images.v2.digest
        expect = mirror.address if node.id in eu else upstream.address
        assert st["fetch"]["url"].startswith(f"https://{expect}/"), st["fetch"]
    served = [line for line in blob_gets(mirror, images.v2.digest) if "aiohttp" in line]
    assert len(served) == 3  # the site's three nodes, from the mirror
    upstream_gets = blob_gets(upstream, images.v2.digest)
    to_nodes = [line for line in upstream_gets if "aiohttp" in line]
    fills = [line for line in upstream_gets if "Go-http-client" in line]
    assert len(to_nodes) == 1  # the one node outside the site
    # The first miss fills the cache (distribution 2.8 reads the upstream blob twice for
    # it: one stream to the client, one into its store); the later nodes are cache hits.
    assert 1 <= len(fills) <= 2, upstream_gets


async def test_a_fetch_cut_mid_blob_resumes_and_the_digest_holds(
    registries: RegistryFactory,
    make_fleet: Callable[..., LocalFleet],
    images: SampleImages,
    tmp_path: Path,
) -> None:
    from tests.conftest import next_host

    host = next_host()
    registry = registries.start(extra_hosts=(host,))
    push(registry, images.v2.path, f"oci://{registry.address}/fleet/web:2.0")
    fl = make_fleet(1)
    async with CuttingProxy(registry.address, cut_after=images.v2.size // 2, host=host) as proxy:
        relabel(fl, {fl.nodes[0].id: {"site": "cut"}},
                [{"match": {"site": "cut"}, "registry": proxy.address}])  # fmt: skip
        auths = json.loads(registry.authfile.read_text())["auths"]
        auth = tmp_path / "auth.json"
        auth.write_text(json.dumps({"auths": auths | {proxy.address: auths[registry.address]}}))
        args = run_args(fl, tmp_path, f"oci://{registry.address}/fleet/web:2.0", registry)
        args[args.index("--authfile") + 1] = str(auth)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "rollout", *args, cwd=ROOT,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await asyncio.wait_for(proc.communicate(), 180)
        assert proc.returncode == 0, err.decode()[-3000:]
        assert proxy.cuts == 1
    st = agent_status(fl, fl.nodes[0].id)
    assert st["booted"]["digest"] == images.v2.digest
    assert st["fetch"]["resumes"] >= 1 and st["fetch"]["bytes"] == images.v2.size
    ranged = [line for line in blob_gets(registry, images.v2.digest) if '" 206 ' in line]
    assert ranged, registry.access_log()


async def test_an_https_image_is_read_once_by_the_controller_and_pulled_by_every_node(
    make_fleet: Callable[..., LocalFleet], images: SampleImages, tmp_path: Path
) -> None:
    import ssl

    import trustme
    from aiohttp import web

    from tests.conftest import next_host

    ca = trustme.CA()
    host = next_host()
    ca_pem = tmp_path / "store-ca.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    served: list[str] = []

    async def serve(request: web.Request) -> web.StreamResponse:
        served.append(request.headers.get("User-Agent", ""))
        return web.FileResponse(images.v2.path)

    app = web.Application()
    app.router.add_get("/images/v2.img", serve)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(host).configure_cert(server_ctx)
    await web.TCPSite(runner, host, 8443, ssl_context=server_ctx).start()
    try:
        fl = make_fleet(2)
        policy = tmp_path / "policy.yaml"
        policy.write_text(yaml.safe_dump(POLICY))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "rollout", "run", "--inventory", str(fl.inventory),
            "--policy", str(policy), "--image", f"https://{host}:8443/images/v2.img",
            "--registry-ca", str(ca_pem), "--state", str(tmp_path / "state.db"),
            "--output", "json", cwd=ROOT,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 180)
        assert proc.returncode == 0, err.decode()[-3000:]
        assert json.loads(out)["phase"] == "succeeded"
    finally:
        await runner.cleanup()
    assert len(served) == 3  # the controller once (digest, manifest), then each node
    for node in fl.nodes:
        st = agent_status(fl, node.id)
        assert st["booted"]["digest"] == images.v2.digest and st["committed"]
        assert st["fetch"]["url"] == f"https://{host}:8443/images/v2.img"
    image = journal_image(tmp_path)
    assert image["source"] == image["reference"] == f"https://{host}:8443/images/v2.img"
    assert image["digest"] == images.v2.digest and image["version"] == "2.0.0"


def test_a_bad_reference_or_a_refusing_registry_exits_2_before_anything_is_journaled(
    registry: Registry, make_fleet: Callable[..., LocalFleet], images: SampleImages, tmp_path: Path
) -> None:
    push(registry, images.v2.path, f"oci://{registry.address}/fleet/web:2.0")
    fl = make_fleet(1)
    wrong = tmp_path / "wrong-auth.json"
    wrong.write_text(json.dumps({"auths": {registry.address: {"username": "rollout",
                                                              "password": "nope"}}}))  # fmt: skip
    cases = [
        ("no tag", f"oci://{registry.address}/fleet/web", registry.authfile, "no tag or digest"),
        ("unknown tag", f"oci://{registry.address}/fleet/web:9.9", registry.authfile,
         "not_found"),
        ("refused", f"oci://{registry.address}/fleet/web:2.0", wrong, "unauthorized"),
    ]  # fmt: skip
    for name, ref, authfile, message in cases:
        args = run_args(fl, tmp_path, ref, registry)
        args[args.index("--authfile") + 1] = str(authfile)
        proc = rollout(*args)
        assert proc.returncode == 2, (name, proc.stderr[-2000:])
        assert message in proc.stderr, (name, proc.stderr[-2000:])
        assert "nope" not in proc.stderr and registry.password not in proc.stderr
        assert not (tmp_path / "state.db").exists() or journal_rows(tmp_path) == [], name
    assert agent_status(fl, fl.nodes[0].id)["boot_count"] == 1


def journal_rows(tmp: Path) -> list[Any]:
    with sqlite3.connect(tmp / "state.db") as db:
        return db.execute("SELECT kind FROM entries").fetchall()


async def test_the_service_starts_a_pull_rollout_and_names_a_bad_reference(
    registry: Registry, make_fleet: Callable[..., LocalFleet], images: SampleImages, tmp_path: Path
) -> None:
    from tests.conftest import next_host
    from tests.helpers import TERMINAL, Service

    push(registry, images.v2.path, f"oci://{registry.address}/fleet/web:2.0")
    (tmp_path / "token").write_text("service-secret-token\n")
    svc = Service(tmp_path, next_host(), "service-secret-token",
                  args=("--authfile", str(registry.authfile),
                        "--registry-ca", str(registry.ca_pem)))  # fmt: skip
    svc.start()
    try:
        fl = make_fleet(2)
        policy = tmp_path / "policy.yaml"
        policy.write_text(yaml.safe_dump(POLICY))
        start = {"inventory": str(fl.inventory), "policy": str(policy)}
        status, answer = await svc.call(
            "POST", "/v1/rollouts", start | {"image": f"oci://{registry.address}/fleet/web:7"}
        )
        assert status == 400 and answer["field"] == "image" and "not_found" in answer["message"]
        status, created = await svc.call(
            "POST", "/v1/rollouts", start | {"image": f"oci://{registry.address}/fleet/web:2.0"}
        )
        assert status == 201, created
        done = await svc.wait_phase(created["id"], TERMINAL)
        assert done["phase"] == "succeeded", done
    finally:
        svc.kill()
    for node in fl.nodes:
        st = agent_status(fl, node.id)
        assert st["booted"]["digest"] == images.v2.digest and st["fetch"]["state"] == "staged"
    logs = "".join(log.read_text() for log in svc.logs)
    assert registry.password not in logs
