"""Images in an OCI registry: real `docker-registry` processes (TLS, basic and token auth,
a pull-through mirror), a client we did not write (skopeo) reading what we push, transfers
cut mid-body and resumed, and the real `rollout image push` CLI.

docker-registry and skopeo are required: without them these tests fail, naming the Debian
package (tests/registry.py)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from rollout import oci
from rollout.errors import InputError
from rollout.image import build_image, load_image
from rollout.model import Image
from rollout.oci import Credentials, FetchError, Reference, RegistryClient
from tests.conftest import SampleImages, next_host
from tests.registry import CuttingProxy, Registry, RegistryFactory, require

ROLLOUT = str(Path(sys.executable).parent / "rollout")
E2FS = "/usr/sbin:/sbin:" + os.environ.get("PATH", "")
MIB = 1 << 20
DIGEST = "sha256:" + "ab" * 32


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def fetch_all(client: RegistryClient, url: str, size: int, **kw: object) -> bytes:
    chunks = [c async for c in client.fetch(url, digest=DIGEST, size=size, **kw)]  # type: ignore[arg-type]
    return b"".join(chunks)


@pytest.fixture(scope="module")
def big_image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    """A 3 MiB tree image (random bytes): large enough to cut a transfer in the middle."""
    src = tmp_path_factory.mktemp("big-src")
    (src / "manifest.json").write_text(
        json.dumps({"name": "big", "workload": {"command": ["true"]}})
    )
    (src / "payload.bin").write_bytes(os.urandom(3 * MIB))
    return build_image(src, tmp_path_factory.mktemp("big") / "big.img", version="1.0.0")


# -- references and credentials (no processes) -------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("oci://127.0.0.1:5000/fleet/web:2.0.0", Reference("127.0.0.1:5000", "fleet/web", "2.0.0")),
        ("oci://registry.example/web:latest", Reference("registry.example", "web", "latest")),
        (f"oci://r.example:443/a/b/c@{DIGEST}", Reference("r.example:443", "a/b/c", None, DIGEST)),
        (f"oci://r/a_b.c-d:v1@{DIGEST}", Reference("r", "a_b.c-d", "v1", DIGEST)),
        ("oci://[::1]:5000/web:1", Reference("[::1]:5000", "web", "1")),
        ("oci://localhost/web:V_1.x-rc", Reference("localhost", "web", "V_1.x-rc")),
    ],
)
def test_parse_reference_accepts(text: str, expected: Reference) -> None:
    assert oci.parse_reference(text) == expected
    assert str(expected) == text
    assert oci.is_reference(text)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("oci://host/repo", "oci://host/repo: no tag or digest; write oci://HOST[:PORT]/REPO:TAG"),
        ("registry/web:1", "not an OCI reference (no oci://)"),
        ("oci:///web:1", "no registry host"),
        ("oci://host:5000", "no repository after the registry"),
        ("oci://host:5000/", "no repository after the registry"),
        ("oci://host:99999/web:1", "registry 'host:99999' is not HOST or HOST:PORT"),
        ("oci://ho_st/web:1", "registry 'ho_st' is not HOST or HOST:PORT"),
        ("oci://host/Fleet/Web:1", "repository 'Fleet/Web' must be lowercase"),
        ("oci://host/web/:1", "repository 'web/' must be lowercase"),
        ("oci://host/web:-x", "tag '-x' must be 1-128 letters"),
        ("oci://host/web:" + "x" * 129, "must be 1-128 letters"),
        ("oci://host/web@sha256:abc", "digest 'sha256:abc' is not sha256:<64 lowercase hex"),
        ("oci://host/web@md5:" + "a" * 32, "is not sha256:"),
    ],
)
def test_parse_reference_refuses_with_what_and_how(text: str, message: str) -> None:
    with pytest.raises(InputError) as info:
        oci.parse_reference(text)
    assert message in str(info.value)
    assert "oci://HOST[:PORT]/REPO:TAG" in str(info.value)  # how to write one


def test_reference_pinned_and_on_a_mirror() -> None:
    ref = oci.parse_reference("oci://a.example:5000/fleet/web:2")
    pinned = ref.pinned(DIGEST)
    assert str(pinned) == f"oci://a.example:5000/fleet/web@{DIGEST}"
    assert str(pinned.on("mirror:443")) == f"oci://mirror:443/fleet/web@{DIGEST}"
    assert str(ref.on("m")) == "oci://m/fleet/web:2"
    assert not oci.is_reference("v2.img")


def test_credentials_from_auth_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def auth(user: str, password: str) -> str:
        return base64.b64encode(f"{user}:{password}".encode()).decode()

    for name in ("REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert oci.load_credentials("r:5000") is None  # no file anywhere: anonymous

    docker = tmp_path / "home" / ".docker" / "config.json"
    docker.parent.mkdir(parents=True)
    docker.write_text(json.dumps({"auths": {"https://r:5000/v1/": {"auth": auth("d", "dp")}}}))
    assert oci.load_credentials("r:5000") == Credentials("d", "dp")
    xdg = tmp_path / "run" / "containers" / "auth.json"
    xdg.parent.mkdir(parents=True)
    xdg.write_text(json.dumps({"auths": {"r:5000": {"username": "x", "password": "xp"}}}))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    assert oci.load_credentials("r:5000") == Credentials("x", "xp")  # before ~/.docker
    assert oci.load_credentials("other:5000") is None
    env = tmp_path / "env.json"
    env.write_text(json.dumps({"auths": {"R:5000": {"auth": auth("e", "p:with:colons")}}}))
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(env))
    assert oci.load_credentials("r:5000") == Credentials("e", "p:with:colons")
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(tmp_path / "missing.json"))
    assert oci.load_credentials("r:5000") == Credentials("x", "xp")  # a missing file: next

    given = tmp_path / "given.json"
    given.write_text(json.dumps({"auths": {"r:5000": {"auth": auth("g", "gp")}}}))
    assert oci.load_credentials("r:5000", given) == Credentials("g", "gp")
    creds = oci.load_credentials("r:5000", given)
    assert creds is not None and "gp" not in repr(creds)
    assert creds.header() == "Basic " + auth("g", "gp")

    with pytest.raises(InputError, match=r"--authfile .*missing.json: no such auth file"):
        oci.load_credentials("r:5000", tmp_path / "missing.json")
    bad = {
        "{not json": "not a JSON auth file",
        json.dumps({"auths": []}): "auths: expected an object",
        json.dumps({"auths": {"r:5000": "s3cret"}}): 'auths["r:5000"]: expected an object',
        json.dumps({"auths": {"r:5000": {"auth": "s3cret!!"}}}): 'auths["r:5000"].auth: not base64',
        json.dumps({"auths": {"r:5000": {"auth": auth("", "s3cret")}}}): "not base64 of USER",
        json.dumps({"auths": {"r:5000": {"username": "u"}}}): '"r:5000"].password: expected',
    }
    for text, message in bad.items():
        given.write_text(text)
        with pytest.raises(InputError) as info:
            oci.load_credentials("r:5000", given)
        assert message in str(info.value) and str(given) in str(info.value)
        assert "s3cret" not in str(info.value)


# -- push and resolve ----------------------------------------------------------------------------
async def test_push_then_resolve_a_tree_image(registry: Registry, images: SampleImages) -> None:
    image = load_image(images.v1.path)
    async with aiohttp.ClientSession() as session:
        client = registry.client(session)
        pushed = await client.push(registry.ref("fleet/web", "1.0.0"), image.path)
        assert "password" not in repr(client) and registry.password not in repr(client)
        got = await client.resolve(registry.ref("fleet/web", "1.0.0"))
        assert got == pushed
        assert got.blob_digest == image.digest and got.size == image.size
        assert (got.kind, got.name, got.version, got.compatible, got.signature) == (
            "tree", "sample-web", "1.0.0", None, None
        )  # fmt: skip
        assert got.reference == registry.ref("fleet/web", digest=got.manifest_digest)
        assert await client.resolve(got.reference) == got  # by digest, no tag
        url = client.blob_url(got.reference, got.blob_digest)
        assert sha256(await fetch_all(client, url, got.size)) == image.digest
        # Fetch from an offset: the registry serves the rest (206).
        tail = await fetch_all(client, url, got.size, start=1000)
        with open(image.path, "rb") as fh:
            assert tail == fh.read()[1000:]

        # Pushed again: the registry has the blob, so it is not sent again.
        before = len(registry.access_log())
        again = await client.push(registry.ref("fleet/web", "again"), image.path)
        assert again.manifest_digest == got.manifest_digest
        registry.wait_log(r'"PUT /v2/fleet/web/manifests/again')
        later = registry.access_log()[before:]
        assert not [line for line in later if "PUT /v2/fleet/web/blobs/uploads" in line], later

        manifest = json.loads(await raw_manifest(registry, "fleet/web", "1.0.0"))
        assert manifest["artifactType"] == oci.ARTIFACT_TYPE
        assert manifest["config"]["mediaType"] == oci.ARTIFACT_TYPE
        assert manifest["layers"] == [
            {"mediaType": oci.LAYER_TYPE["tree"], "digest": image.digest, "size": image.size,
             "annotations": {"org.opencontainers.image.title": "v1.img"}}
        ]  # fmt: skip
        assert manifest["annotations"]["org.opencontainers.image.version"] == "1.0.0"
        with pytest.raises(FetchError) as info:
            await client.resolve(registry.ref("fleet/web", "nope"))
        assert info.value.code == "not_found"


async def raw_manifest(registry: Registry, repository: str, tag: str) -> bytes:
    """The manifest bytes as skopeo, a client we did not write, reads them."""
    proc = await asyncio.create_subprocess_exec(
        require("skopeo"), "inspect", "--raw", "--cert-dir", str(registry.cert_dir),
        "--creds", registry.creds_arg, f"docker://{registry.address}/{repository}:{tag}",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return out


@pytest.mark.skipif(shutil.which("mkfs.ext4", path=E2FS) is None, reason="needs mkfs.ext4")
async def test_push_then_resolve_a_rootfs_image(registry: Registry, tmp_path: Path) -> None:
    from rollout.rootfs import build_rootfs_image

    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "boot").mkdir()
    (tree / "etc" / "hostname").write_text("oci-test\n")
    (tree / "boot" / "vmlinuz-6.1").write_bytes(b"not a kernel\n")
    (tree / "boot" / "initrd.img-6.1").write_bytes(b"not an initrd\n")
    (tree / "vmlinuz").symlink_to("boot/vmlinuz-6.1")
    (tree / "initrd.img").symlink_to("boot/initrd.img-6.1")
    built = build_rootfs_image(
        tree, tmp_path / "os.img", version="3.0.0", name="sample-os",
        compatible="rollout-vm-x86_64", units=["sample-web.service"], size=16 * MIB,
    )  # fmt: skip
    async with aiohttp.ClientSession() as session:
        client = registry.client(session)
        pushed = await client.push(registry.ref("fleet/os", "3.0.0"), built.path)
        got = await client.resolve(registry.ref("fleet/os", "3.0.0"))
    assert got == pushed
    assert got.blob_digest == load_image(built.path).digest and got.size > 16 * MIB
    assert (got.kind, got.name, got.version, got.compatible) == (
        "rootfs", "sample-os", "3.0.0", "rollout-vm-x86_64"
    )  # fmt: skip
    layer = json.loads(await raw_manifest(registry, "fleet/os", "3.0.0"))["layers"][0]
    assert layer["mediaType"] == oci.LAYER_TYPE["rootfs"]


def test_skopeo_copies_what_we_push(
    registry: Registry, images: SampleImages, tmp_path: Path
) -> None:
    async def push() -> oci.Artifact:
        async with aiohttp.ClientSession() as session:
            return await registry.client(session).push(
                registry.ref("fleet/web", "2.0.0"), images.v2.path
            )

    pushed = asyncio.run(push())
    hexdigest = images.v2.digest.removeprefix("sha256:")
    for dest, blob in (
        (f"oci:{tmp_path / 'layout'}:2.0.0", tmp_path / "layout" / "blobs" / "sha256" / hexdigest),
        (f"dir:{tmp_path / 'dir'}", tmp_path / "dir" / hexdigest),
    ):
        proc = subprocess.run(
            [require("skopeo"), "--insecure-policy", "copy",
             "--src-cert-dir", str(registry.cert_dir), "--src-creds", registry.creds_arg,
             f"docker://{registry.address}/fleet/web:2.0.0", dest],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert sha256(blob.read_bytes()) == images.v2.digest == pushed.blob_digest
    copied = json.loads((tmp_path / "dir" / "manifest.json").read_bytes())
    assert sha256((tmp_path / "dir" / "manifest.json").read_bytes()) == pushed.manifest_digest
    assert copied["config"]["mediaType"] == oci.ARTIFACT_TYPE
    index = json.loads((tmp_path / "layout" / "index.json").read_text())
    assert index["manifests"][0]["digest"] == pushed.manifest_digest


async def test_a_moved_tag_resolves_to_the_new_image_and_a_pinned_ref_to_the_old(
    registry: Registry, images: SampleImages
) -> None:
    stable = registry.ref("fleet/web", "stable")
    async with aiohttp.ClientSession() as session:
        client = registry.client(session)
        v2 = await client.push(stable, images.v2.path)
        assert (await client.resolve(stable)).version == "2.0.0"
        v1 = await client.push(stable, images.v1.path)  # the tag moves back: a rollback
        now = await client.resolve(stable)
        assert now.version == "1.0.0" and now.manifest_digest == v1.manifest_digest
        old = await client.resolve(v2.reference)
        assert old.version == "2.0.0" and old.blob_digest == images.v2.digest


async def test_push_with_a_signature_and_refuses_one_for_another_image(
    registry: Registry, images: SampleImages
) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from rollout import signing

    key = Ed25519PrivateKey.generate()
    doc = signing.sign(signing.image_payload(load_image(images.v2.path)), key)
    async with aiohttp.ClientSession() as session:
        client = registry.client(session)
        got = await client.push(
            registry.ref("fleet/web", "signed"), images.v2.path, signature=signing.encode(doc)
        )
        assert (await client.resolve(got.reference)).signature == signing.encode(doc)
        trusted = [signing.TrustedKey(signing.key_id(key.public_key()), key.public_key(), "k")]
        assert signing.verify(signing.decode(got.signature or ""), trusted, digest=got.blob_digest)
        with pytest.raises(InputError, match=r"the signature is for tree sample-web 2\.0\.0"):
            await client.push(
                registry.ref("fleet/web", "x"), images.v1.path, signature=signing.encode(doc)
            )


async def test_a_manifest_that_is_not_a_rollout_image_is_refused(
    registry: Registry, images: SampleImages
) -> None:
    async with aiohttp.ClientSession() as session:
        client = registry.client(session)
        got = await client.push(registry.ref("fleet/web", "1"), images.v1.path)
        manifest = json.loads(await raw_manifest(registry, "fleet/web", "1"))
        manifest["config"]["mediaType"] = "application/vnd.oci.image.config.v1+json"
        del manifest["artifactType"]
        assert registry.credentials is not None
        async with session.put(
            f"{registry.url}/v2/fleet/web/manifests/container",
            data=json.dumps(manifest),
            headers={
                "Content-Type": oci.MANIFEST_TYPE,
                "Authorization": registry.credentials.header(),
            },
            ssl=registry.ssl_context(),
        ) as resp:
            assert resp.status == 201, await resp.text()
        with pytest.raises(InputError, match="not a rollout image: config mediaType"):
            await client.resolve(registry.ref("fleet/web", "container"))
        assert (await client.resolve(got.reference)).name == "sample-web"


# -- auth ------------------------------------------------------------------------------------
async def test_wrong_or_missing_credentials_are_unauthorized(
    registry: Registry, images: SampleImages
) -> None:
    ref = registry.ref("fleet/web", "1")
    async with aiohttp.ClientSession() as session:
        pushed = await registry.client(session).push(ref, images.v1.path)
        wrong = registry.client(session, Credentials(registry.username, "not-the-password"))
        for client, hint in ((wrong, "check the credentials of rollout"),
                             (registry.client(session, None), "no credentials for")):  # fmt: skip
            with pytest.raises(FetchError) as info:
                await client.resolve(ref)
            assert info.value.code == "unauthorized" and hint in info.value.message
            with pytest.raises(FetchError) as info:
                await fetch_all(client, client.blob_url(ref, pushed.blob_digest), pushed.size)
            assert info.value.code == "unauthorized"
            with pytest.raises(FetchError) as info:
                await client.push(registry.ref("fleet/web", "2"), images.v2.path)
            assert info.value.code == "unauthorized"
            assert "not-the-password" not in info.value.message
            assert registry.password not in info.value.message


async def test_token_auth_gets_a_bearer_token_from_the_realm(
    registries: RegistryFactory, images: SampleImages
) -> None:
    registry = registries.start(auth="token")
    ref = registry.ref("fleet/web", "1.0.0")
    async with aiohttp.ClientSession() as session:
        client = registry.client(session)
        pushed = await client.push(ref, images.v1.path)
        got = await client.resolve(ref)
        assert got == pushed
        data = await fetch_all(client, client.blob_url(ref, got.blob_digest), got.size)
        assert sha256(data) == images.v1.digest
        token = registry._token
        assert token is not None
        # The registry's challenge names the actions in no fixed order (push,pull or
        # pull,push from one run to the next): compare them as a set.
        scopes = {q.get("scope") for q in token.requests}
        asked = {(s.rpartition(":")[0], frozenset(s.rpartition(":")[2].split(","))) for s in scopes
                 if s}  # fmt: skip
        assert ("repository:fleet/web", frozenset({"pull", "push"})) in asked, scopes
        assert {q.get("service") for q in token.requests} == {token.SERVICE}

        wrong = registry.client(session, Credentials(registry.username, "not-the-password"))
        with pytest.raises(FetchError) as info:
            await wrong.resolve(ref)
        assert info.value.code == "unauthorized" and "token service refused" in info.value.message
        assert "not-the-password" not in info.value.message


# -- fetch: resume, faults, redirects ------------------------------------------------------------
async def test_fetch_resumes_a_cut_transfer_with_a_range_request(
    registries: RegistryFactory, big_image: Image
) -> None:
    proxy_host = next_host()
    registry = registries.start(extra_hosts=(proxy_host,))
    async with aiohttp.ClientSession() as session:
        client = registry.client(session)
        pushed = await client.push(registry.ref("fleet/big", "1"), big_image.path)
        resumes: list[tuple[int, BaseException]] = []
        async with CuttingProxy(registry.address, cut_after=MIB, host=proxy_host) as proxy:
            url = client.blob_url(registry.ref("fleet/big").on(proxy.address), pushed.blob_digest)
            data = await fetch_all(
                client, url, pushed.size, on_resume=lambda n, e: resumes.append((n, e))
            )
        assert proxy.cuts == 1
    assert sha256(data) == big_image.digest and len(data) == big_image.size
    assert len(resumes) == 1 and 0 < resumes[0][0] < MIB
    assert isinstance(resumes[0][1], Exception)
    # The registry saw the resumed request and served it partially.
    line = registry.wait_log(rf'"GET /v2/fleet/big/blobs/{pushed.blob_digest} HTTP/1.1" 206')
    assert str(pushed.size - resumes[0][0]) in line.split('" 206 ')[1].split()[0]


Script = Callable[[int, dict[str, str]], bytes]


class RawHTTP:
    """An HTTP/1.1 server answering each connection with exactly the bytes a script gives
    (status, headers, body, then close): servers that cut, ignore Range, or say too much."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.requests: list[dict[str, str]] = []
        self.host = next_host()
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://{self.host}:{self._server.sockets[0].getsockname()[1]}/image"

    async def __aenter__(self) -> RawHTTP:
        self._server = await asyncio.start_server(self._handle, self.host, 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        headers = {
            k.strip().lower(): v.strip()
            for k, _, v in (line.partition(":") for line in head.split("\r\n")[1:] if line)
        }
        self.requests.append(headers)
        writer.write(self.script(len(self.requests), headers))
        await writer.drain()
        writer.transport.abort()


def http_response(status: str, body: bytes, length: int | None = None) -> bytes:
    size = "" if length is None else f"Content-Length: {length}\r\n"
    return f"HTTP/1.1 {status}\r\n{size}Connection: close\r\n\r\n".encode() + body


async def test_fetch_discards_what_a_server_ignoring_range_sends_again() -> None:
    data = os.urandom(300_000)
    half = 120_000

    def script(n: int, headers: dict[str, str]) -> bytes:
        if n == 1:  # says the whole length, sends part of it, then the connection drops
            return http_response("200 OK", data[:half], len(data))
        assert headers.get("range") == f"bytes={half}-"
        return http_response("200 OK", data, len(data))  # ignores the range

    resumes: list[int] = []
    async with RawHTTP(script) as server, aiohttp.ClientSession() as session:
        client = RegistryClient(session)
        got = await fetch_all(
            client, server.url, len(data), on_resume=lambda n, e: resumes.append(n)
        )
        assert got == data and resumes == [half]
        # From an offset, against the same kind of server: still exactly the tail.
        server.script = lambda n, h: http_response("200 OK", data, len(data))
        assert await fetch_all(client, server.url, len(data), start=250_000) == data[250_000:]


async def test_fetch_refuses_too_much_and_too_little() -> None:
    data = os.urandom(50_000)
    async with aiohttp.ClientSession() as session:
        client = RegistryClient(session)
        cases: list[tuple[Script, str]] = [
            (lambda n, h: http_response("200 OK", data + b"x", len(data) + 1), "is 50001 bytes"),
            (lambda n, h: http_response("200 OK", data + b"more"), "more than 50000 bytes"),
            (lambda n, h: http_response("200 OK", data[:100], len(data)), "2 tries"),
            (lambda n, h: http_response("503 Unavailable", b"", 0), "answered 503"),
            (lambda n, h: http_response("404 Not Found", b"", 0), "not found"),
            (lambda n, h: http_response("403 Forbidden", b"", 0), "refused access (403)"),
        ]
        for script, message in cases:
            async with RawHTTP(script) as server:
                with pytest.raises(FetchError) as info:
                    await fetch_all(client, server.url, len(data), attempts=2)
                assert message in info.value.message
                code = {"not found": "not_found", "refused access (403)": "unauthorized"}
                assert info.value.code == code.get(message, "fetch_failed")


async def test_registry_down_is_fetch_failed(registry: Registry, images: SampleImages) -> None:
    async with aiohttp.ClientSession() as session:
        client = registry.client(session)
        ref = registry.ref("fleet/web", "1")
        pushed = await client.push(ref, images.v1.path)
        registry.stop()
        tries: list[int] = []
        with pytest.raises(FetchError) as info:
            await fetch_all(
                client, client.blob_url(ref, pushed.blob_digest), pushed.size, attempts=2,
                on_resume=lambda n, e: tries.append(n),
            )  # fmt: skip
        assert info.value.code == "fetch_failed" and "2 tries" in info.value.message
        assert tries == [0]
        with pytest.raises(FetchError) as info:
            await client.resolve(ref)
        assert info.value.code == "fetch_failed"
        with pytest.raises(FetchError) as info:
            await client.push(ref, images.v1.path)
        assert info.value.code == "fetch_failed"


async def serve(app: web.Application, host: str) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, host, 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"{host}:{port}"


async def test_credentials_never_follow_a_redirect_to_another_host() -> None:
    """Blob storage (S3 and the like) answers registry blob GETs with a redirect: the
    registry's credentials must stay with the registry."""
    data = os.urandom(70_000)
    seen: dict[str, list[str | None]] = {"registry": [], "storage": []}

    async def storage(request: web.Request) -> web.Response:
        seen["storage"].append(request.headers.get("Authorization"))
        return web.Response(body=data)

    storage_app = web.Application()
    storage_app.router.add_get("/bucket/blob", storage)
    storage_runner, storage_address = await serve(storage_app, next_host())

    async def blob(request: web.Request) -> web.StreamResponse:
        auth = request.headers.get("Authorization")
        seen["registry"].append(auth)
        if auth != Credentials("u", "p").header():
            raise web.HTTPUnauthorized(headers={"WWW-Authenticate": 'Basic realm="test"'})
        raise web.HTTPTemporaryRedirect(f"http://{storage_address}/bucket/blob?X-Sig=abc")

    registry_app = web.Application()
    registry_app.router.add_get("/v2/fleet/web/blobs/{digest}", blob)
    registry_runner, registry_address = await serve(registry_app, next_host())
    try:
        async with aiohttp.ClientSession() as session:
            client = RegistryClient(session, credentials=Credentials("u", "p"), plain_http=True)
            url = client.blob_url(Reference(registry_address, "fleet/web"), DIGEST)
            assert await fetch_all(client, url, len(data)) == data
            assert seen == {"registry": [None, Credentials("u", "p").header()], "storage": [None]}
            # A URL on a host no Reference named gets no credentials, even when challenged.
            stranger = RegistryClient(session, credentials=Credentials("u", "p"), plain_http=True)
            with pytest.raises(FetchError) as info:
                await fetch_all(stranger, f"http://{registry_address}/v2/fleet/web/blobs/x", 1)
            assert info.value.code == "unauthorized" and seen["registry"][-1] is None
    finally:
        await registry_runner.cleanup()
        await storage_runner.cleanup()


async def test_a_pull_through_mirror_serves_the_same_image(
    registries: RegistryFactory, images: SampleImages
) -> None:
    upstream = registries.start(auth="token")  # distribution's proxy logs in to token realms
    mirror = registries.start(auth="none", upstream=upstream)
    ref = upstream.ref("fleet/web", "2.0.0")
    async with aiohttp.ClientSession() as session:
        pushed = await upstream.client(session).push(ref, images.v2.path)
        client = mirror.client(session)
        got = await client.resolve(ref.on(mirror.address))
        assert got.manifest_digest == pushed.manifest_digest
        assert got.reference == pushed.reference.on(mirror.address)
        url = client.blob_url(got.reference, got.blob_digest)
        assert sha256(await fetch_all(client, url, got.size)) == images.v2.digest
    mirror.wait_log(rf'"GET /v2/fleet/web/blobs/{got.blob_digest} HTTP/1.1" 200')
    upstream.wait_log(rf'"GET /v2/fleet/web/blobs/{got.blob_digest} HTTP/2.0" 200 .*Go-http')


# -- the CLI -----------------------------------------------------------------------------------
def rollout(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([ROLLOUT, *args], capture_output=True, text=True, timeout=120)


def test_cli_image_push_and_resolve(
    registry: Registry, images: SampleImages, tmp_path: Path
) -> None:
    image = tmp_path / "web.img"
    shutil.copy(images.v2.path, image)
    assert rollout("image", "keygen", str(tmp_path / "release")).returncode == 0
    signed = rollout("image", "sign", str(image), "--key", str(tmp_path / "release.key"))
    assert signed.returncode == 0, signed.stderr
    tls = ["--authfile", str(registry.authfile), "--registry-ca", str(registry.ca_pem)]
    ref = f"oci://{registry.address}/fleet/web:2.0.0"
    push = rollout("image", "push", str(image), ref, *tls)
    assert push.returncode == 0, push.stderr
    pinned, details = push.stdout.splitlines()
    assert pinned.startswith(f"oci://{registry.address}/fleet/web@sha256:")
    assert details == f"digest {images.v2.digest} size {images.v2.size} signed"

    resolved = rollout("image", "resolve", ref, *tls)
    assert resolved.returncode == 0, resolved.stderr
    body = json.loads(resolved.stdout)
    assert body["reference"] == pinned and body["digest"] == images.v2.digest
    assert body["version"] == "2.0.0" and body["signature"]
    assert json.loads(base64.b64decode(body["signature"]))["payload"]["digest"] == images.v2.digest

    again = rollout("image", "push", str(image), ref, *tls, "--output", "json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) == body  # the same push: the same artifact

    bad = rollout("image", "push", str(image), f"oci://{registry.address}/fleet/web", *tls)
    assert bad.returncode == 2
    assert "no tag or digest; write oci://HOST[:PORT]/REPO:TAG" in bad.stderr
    assert rollout("image", "push", str(image), ref, "--signature", "no.sig").returncode == 2
    unknown = rollout("image", "resolve", ref, "--registry-ca", str(registry.ca_pem))
    assert unknown.returncode == 2 and "no credentials for" in unknown.stderr  # no auth file
    untrusted = rollout("image", "resolve", ref, "--authfile", str(registry.authfile))
    assert untrusted.returncode == 1 and "TLS certificate verification failed" in untrusted.stderr
    down = rollout("image", "resolve", f"oci://{next_host()}:1/fleet/web:1", "--plain-http")
    assert down.returncode == 1 and "error: oci://" in down.stderr and "connect" in down.stderr
