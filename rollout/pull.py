"""Pull mode on the controller: naming an image in a store, and telling nodes to fetch it.

`--image` (and the API's `image`) takes three forms:

- a local file: push mode, as before (the controller streams the bytes to every node);
- `oci://HOST[:PORT]/REPO:TAG` or `...@sha256:<manifest digest>`: an artifact that
  `rollout image push` published. The tag is resolved to a manifest digest **once**,
  before any node is touched, and the pinned reference (`...@sha256:`) is what the
  journal keeps and what every node gets: a tag moved mid-rollout changes nothing;
- `https://...` (a plain store, as Mender's and RAUC's): the controller reads it once to
  learn its digest, size and manifest; every node then fetches it itself and checks that
  digest.

The `Image` of a pulled rollout carries `source` (the pinned reference or URL); the agent
driver then posts `POST /v1/fetch` instead of streaming. `PullAccess` holds what the
driver needs to tell a node how to fetch: the auth file (credentials are read from it when
a request is built, never journaled, never logged), the store's CA, the inventory's
per-site mirrors and the policy's per-node bandwidth cap. Only the paths are journaled.

Signatures travel in the artifact's config (see rollout.oci): with `--trusted-key` the
controller verifies one before the rollout is created, exactly as for a local file, and
the agents verify it again before they fetch a byte.
"""

from __future__ import annotations

import hashlib
import os
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp

from rollout.errors import InputError
from rollout.imagefile import KIND_ROOTFS, MANIFEST, manifest_kind, manifest_object
from rollout.model import Image, Mirror, Node
from rollout.oci import (
    Credentials,
    FetchError,
    RegistryClient,
    blob_url,
    is_reference,
    load_credentials,
    parse_reference,
)
from rollout.signing import Payload, SignatureError, decode, load_keys, verify

URL_SCHEMES = ("https://", "http://")


def is_remote(text: str) -> bool:
    """True when `--image` names an image in a store rather than a local file."""
    return is_reference(text) or text.startswith(URL_SCHEMES)


@dataclass(frozen=True)
class PullAccess:
    """How nodes reach the image store (journaled without secrets: paths only)."""

    authfile: str | None = None
    ca_file: str | None = None
    plain_http: bool = False
    mirrors: tuple[Mirror, ...] = ()
    rate_limit: int | None = None  # bytes per second per node
    _ca_pem: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def registry_for(self, node: Node, registry: str) -> str:
        """The registry `node` pulls from: the first mirror matching its labels, or
        `registry` itself."""
        for mirror in self.mirrors:
            if mirror.applies(node):
                return mirror.registry
        return registry

    def credentials(self, registry: str) -> Credentials | None:
        return load_credentials(registry, self.authfile)

    def ca_pem(self) -> str | None:
        if self.ca_file is None:
            return None
        if self.ca_file not in self._ca_pem:
            try:
                self._ca_pem[self.ca_file] = Path(self.ca_file).read_text()
            except OSError as exc:
                raise InputError(
                    f"--registry-ca: cannot read {self.ca_file}: {exc.strerror}"
                ) from exc
        return self._ca_pem[self.ca_file]

    def ssl(self) -> ssl.SSLContext | bool:
        pem = self.ca_pem()
        return ssl.create_default_context(cadata=pem) if pem is not None else True

    def fetch_request(self, node: Node, image: Image) -> dict[str, Any]:
        """The body of `POST /v1/fetch` telling `node` how to pull `image` (holds secrets:
        send it, never log or journal it)."""
        if image.source is None:
            raise ValueError("fetch_request for a pushed image")
        credentials: Credentials | None = None
        if is_reference(image.source):
            ref = parse_reference(image.source)
            mirror = ref.on(self.registry_for(node, ref.registry))
            url = blob_url(mirror, image.digest, plain_http=self.plain_http)
            credentials = self.credentials(mirror.registry)
        else:
            url = image.source
        body: dict[str, Any] = {"url": url, "digest": image.digest, "size": image.size}
        if image.signature is not None:
            body["signature"] = image.signature
        if credentials is not None:
            body["auth"] = {"username": credentials.username, "password": credentials.password}
        if (pem := self.ca_pem()) is not None:
            body["ca"] = pem
        if self.rate_limit is not None:
            body["rate_limit"] = self.rate_limit
        return body

    def to_json(self) -> dict[str, Any]:
        return {
            "authfile": self.authfile,
            "ca_file": self.ca_file,
            "plain_http": self.plain_http,
            "mirrors": [m.to_json() for m in self.mirrors],
            "rate_limit": self.rate_limit,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> PullAccess:
        if not data:
            return cls()
        return cls(
            authfile=data.get("authfile"),
            ca_file=data.get("ca_file"),
            plain_http=bool(data.get("plain_http")),
            mirrors=tuple(Mirror.from_json(m) for m in data.get("mirrors") or ()),
            rate_limit=data.get("rate_limit"),
        )


async def resolve_image(
    text: str,
    access: PullAccess,
    trusted: Sequence[str | os.PathLike[str]] = (),
    signature: str | None = None,
) -> Image:
    """Describe the image a remote `--image` names, pinned; InputError (exit 2) when the
    store cannot be reached, refuses us, or holds no rollout image there. `signature`:
    the signature file of an https image (a registry artifact carries its own)."""
    async with aiohttp.ClientSession() as session:
        if is_reference(text):
            ref = parse_reference(text)
            client = RegistryClient(
                session,
                credentials=access.credentials(ref.registry),
                ssl=access.ssl(),
                plain_http=access.plain_http,
            )
            try:
                art = await client.resolve(ref)
            except FetchError as exc:
                raise InputError(f"--image {text}: {exc.code}: {exc.message}") from None
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                raise InputError(f"--image {text}: cannot reach the registry: {exc}") from None
            image = Image(
                path="",
                digest=art.blob_digest,
                name=art.name,
                version=art.version,
                size=art.size,
                signature=art.signature,
                source=str(art.reference),
                reference=text,
            )
            payload = Payload(art.blob_digest, art.kind, art.name, art.version, art.compatible)
        else:
            image, payload = await _describe_url(session, text, access)
            image = with_signature_file(image, signature)
    if trusted:
        _check_signature(text, image, payload, trusted)
    return image


def _check_signature(
    text: str, image: Image, payload: Payload, trusted: Sequence[str | os.PathLike[str]]
) -> None:
    if image.signature is None:
        raise SignatureError(
            "unsigned",
            f"--image {text}: not signed; push it with its signature "
            "(`rollout image push FILE REF`, FILE.sig beside it) or drop --trusted-key",
        )
    try:
        signed = verify(decode(image.signature), load_keys(trusted), digest=image.digest)
    except SignatureError as exc:
        raise SignatureError(exc.code, f"--image {text}: {exc}") from None
    if signed != payload:
        raise SignatureError(
            "bad_signature",
            f"--image {text}: signed for {signed.kind} {signed.name} {signed.version}; the "
            f"image is {payload.kind} {payload.name} {payload.version}",
        )


async def _describe_url(
    session: aiohttp.ClientSession, url: str, access: PullAccess
) -> tuple[Image, Payload]:
    """Read an image at an https URL once: its digest, size and manifest."""
    import io
    import tarfile

    digest = hashlib.sha256()
    size = 0
    head = bytearray()  # the tar's first members: the manifest comes first
    try:
        async with session.get(url, ssl=access.ssl(), timeout=aiohttp.ClientTimeout(
            total=None, sock_connect=10, sock_read=60)) as resp:  # fmt: skip
            if resp.status != 200:
                raise InputError(f"--image {url}: the server answered {resp.status}")
            async for chunk in resp.content.iter_chunked(1 << 20):
                digest.update(chunk)
                size += len(chunk)
                if len(head) < (1 << 20):
                    head += chunk[: (1 << 20) - len(head)]
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise InputError(f"--image {url}: cannot fetch it: {exc}") from None
    where = f"--image {url}"
    try:
        with tarfile.open(fileobj=io.BytesIO(bytes(head)), mode="r:") as tar:
            member = tar.next()
            fh = tar.extractfile(member) if member is not None else None
            if member is None or member.name != MANIFEST or fh is None:
                raise InputError(f"{where}: not a rollout image ({MANIFEST} is not first)")
            raw = fh.read()
    except tarfile.TarError as exc:
        raise InputError(f"{where}: not a rollout image: {exc}") from None
    manifest, kind = manifest_object(raw, where), manifest_kind(raw, where)
    name, version = str(manifest.get("name", "")), str(manifest.get("version", ""))
    if not name or not version:
        raise InputError(f"--image {url}: {MANIFEST}: name and version are required")
    hexdigest = "sha256:" + digest.hexdigest()
    compatible = manifest.get("compatible") if kind == KIND_ROOTFS else None
    image = Image(path="", digest=hexdigest, name=name, version=version, size=size,
                  source=url, reference=url)  # fmt: skip
    return image, Payload(hexdigest, kind, name, version, compatible)


def with_signature_file(image: Image, signature: str | None) -> Image:
    """An https image's signature comes from `--signature FILE` (a registry artifact
    carries its own)."""
    if signature is None:
        return image
    from rollout.signing import encode, read_signature

    return replace(image, signature=encode(read_signature(Path(signature))))
