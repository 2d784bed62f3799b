"""Images in an OCI registry: `oci://HOST[:PORT]/REPO:TAG` references, push and pull.

A small client for the subset of the registry HTTP API v2 (the OCI distribution spec)
that rollout needs, on aiohttp: no asyncio OCI library fits, and this subset is short.

The artifact (docs/images.md#publishing-to-an-oci-registry). An image file of either kind
is pushed as ONE blob, byte for byte, so the layer digest *is* rollout's image digest and
an agent can stream it straight into a slot while it hashes it. An OCI image manifest
(schemaVersion 2) points at it::

    {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
     "artifactType": ARTIFACT_TYPE,
     "config": {"mediaType": ARTIFACT_TYPE, "digest": ..., "size": ...},
     "layers": [{"mediaType": LAYER_TYPE[kind], "digest": <image digest>, "size": ...,
                 "annotations": {"org.opencontainers.image.title": "v2.img"}}],
     "annotations": {"org.opencontainers.image.version": ..., "vnd.rollout.image.name": ...}}

The config blob is rollout's own small JSON: name, version, kind, compatible, digest and
size of the image, and the signature (the `X-Image-Signature` value, rollout.signing), so
one manifest fetch and one config fetch say everything the controller must know before it
touches a node. The manifest digest pins a release: a tag may move, `REPO@sha256:...` not.

Authentication. A request goes out without credentials; on a 401 the challenge decides:
`Basic` gets the credentials, `Bearer realm=..,service=..,scope=..` gets a token from the
realm (the credentials as Basic, or anonymously without any), the standard docker token
flow. What worked is kept per origin and re-challenged when refused. Credentials are only
offered to the registries this client was handed as a Reference (`resolve`, `push`,
`blob_url`) and to the token realm they name; redirects are followed by hand, and each hop
carries only its own origin's authorization, so a blob redirected to object storage on
another host never receives the registry's credentials (aiohttp drops them on a
cross-origin redirect too; doing it here keeps it true for tokens and every aiohttp
version). No credential or token ever appears in a message, a log line or a repr.

Fetching (`fetch`) streams a blob, or any plain http(s) URL, from an offset and resumes a
broken transfer with `Range: bytes=N-`; a server that ignores the range and answers 200 has
its first N bytes discarded, so the stream stays byte-exact. It yields exactly the size it
was told and refuses more; it does not hash: the agent hashes what it writes.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import json
import os
import re
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)
from yarl import URL

from rollout.errors import InputError
from rollout.tls import certificate_problem, client_context

__all__ = [
    "ARTIFACT_TYPE",
    "LAYER_TYPE",
    "MANIFEST_TYPE",
    "OCI_SCHEME",
    "Artifact",
    "Credentials",
    "FetchError",
    "Reference",
    "RegistryClient",
    "is_reference",
    "load_credentials",
    "open_client",
    "parse_reference",
]

OCI_SCHEME = "oci://"
ARTIFACT_TYPE = "application/vnd.rollout.image.v1"  # manifest artifactType, config mediaType
LAYER_TYPE = {
    "tree": "application/vnd.rollout.image.tree.v1.tar",
    "rootfs": "application/vnd.rollout.image.rootfs.v1.tar",
}
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
TITLE = "org.opencontainers.image.title"
VERSION = "org.opencontainers.image.version"
NAME = "vnd.rollout.image.name"
# What a caller may fix by changing its input (the credentials, the reference): exit 2.
INPUT_CODES = frozenset({"unauthorized", "not_found"})

_KIND_OF = {media: kind for kind, media in LAYER_TYPE.items()}
_MAX_MANIFEST = 4 << 20
_MAX_CONFIG = 64 << 10
_CHUNK = 1 << 20
_MAX_HOPS = 10
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_SHORT = aiohttp.ClientTimeout(total=60, sock_connect=10)
_STREAM = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=60)
_UPLOAD = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=300)

# -- references ------------------------------------------------------------------------------
_HOST = r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*|\[[0-9A-Fa-f:.]+\])"  # noqa: E501
_REGISTRY_RE = re.compile(rf"{_HOST}(?::(?P<port>[0-9]{{1,5}}))?")
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
_FORMS = "write oci://HOST[:PORT]/REPO:TAG or oci://HOST[:PORT]/REPO@sha256:<64 hex>"


@dataclass(frozen=True)
class Reference:
    """Where an image is in a registry: `oci://host:port/repo:tag` or `...@sha256:...`."""

    registry: str  # "host[:port]"
    repository: str  # "fleet/web"
    tag: str | None = None
    digest: str | None = None  # manifest digest "sha256:<64hex>"

    def __str__(self) -> str:
        text = f"{OCI_SCHEME}{self.registry}/{self.repository}"
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text

    def pinned(self, digest: str) -> Reference:
        """The same repository, by manifest digest and without a tag (a tag may move)."""
        return Reference(self.registry, self.repository, None, digest)

    def on(self, registry: str) -> Reference:
        """The same repository, tag and digest on another registry (a mirror)."""
        return Reference(registry, self.repository, self.tag, self.digest)


def is_reference(text: str) -> bool:
    """True when `text` names an image in a registry rather than a file.

    >>> is_reference("oci://registry:5000/fleet/web:2"), is_reference("v2.img")
    (True, False)
    """
    return text.startswith(OCI_SCHEME)


def parse_reference(text: str) -> Reference:
    """Parse `oci://HOST[:PORT]/REPO[:TAG][@sha256:HEX]`; InputError saying what is wrong.

    >>> parse_reference("oci://127.0.0.1:5000/fleet/web:2.0.0")
    Reference(registry='127.0.0.1:5000', repository='fleet/web', tag='2.0.0', digest=None)
    >>> parse_reference("oci://registry.example/fleet/web")
    Traceback (most recent call last):
    rollout.errors.InputError: oci://registry.example/fleet/web: no tag or digest; write oci://HOST[:PORT]/REPO:TAG or oci://HOST[:PORT]/REPO@sha256:<64 hex>
    """  # noqa: E501
    if not is_reference(text):
        raise InputError(f"{text}: not an OCI reference (no {OCI_SCHEME}); {_FORMS}")
    rest = text[len(OCI_SCHEME) :]
    registry, slash, path = rest.partition("/")
    if not registry:
        raise InputError(f"{text}: no registry host; {_FORMS}")
    match = _REGISTRY_RE.fullmatch(registry)
    port = match.group("port") if match else None
    if match is None or (port is not None and not 0 < int(port) < 65536):
        raise InputError(
            f"{text}: registry {registry!r} is not HOST or HOST:PORT (port 1-65535); {_FORMS}"
        )
    if not slash or not path:
        raise InputError(f"{text}: no repository after the registry; {_FORMS}")
    digest = None
    if "@" in path:
        path, _, digest = path.partition("@")
        if not _DIGEST_RE.fullmatch(digest):
            raise InputError(
                f"{text}: digest {digest!r} is not sha256:<64 lowercase hex digits>; {_FORMS}"
            )
    tag = None
    last = path.rsplit("/", 1)[-1]
    if ":" in last:
        path, _, tag = path.rpartition(":")
        if not _TAG_RE.fullmatch(tag):
            raise InputError(
                f"{text}: tag {tag!r} must be 1-128 letters, digits, '_', '.' or '-', not "
                f"starting with '.' or '-'; {_FORMS}"
            )
    if not _REPOSITORY_RE.fullmatch(path) or len(path) > 255:
        raise InputError(
            f"{text}: repository {path!r} must be lowercase letters and digits, components "
            f"separated by '/' and joined by '.', '_' or '-' (at most 255 characters); {_FORMS}"
        )
    if tag is None and digest is None:
        raise InputError(f"{text}: no tag or digest; {_FORMS}")
    return Reference(registry, path, tag, digest)


# -- credentials ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Credentials:
    """A registry user and password; the password never shows in a repr or a message."""

    username: str
    password: str = field(repr=False)

    def header(self) -> str:
        """The Authorization value for HTTP Basic."""
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()


def _auth_files() -> list[tuple[Path, str]]:
    """The auth files tried when none is given, in containers/docker order."""
    files: list[tuple[Path, str]] = []
    if os.environ.get("REGISTRY_AUTH_FILE"):
        files.append((Path(os.environ["REGISTRY_AUTH_FILE"]), "$REGISTRY_AUTH_FILE"))
    if os.environ.get("XDG_RUNTIME_DIR"):
        path = Path(os.environ["XDG_RUNTIME_DIR"]) / "containers" / "auth.json"
        files.append((path, str(path)))
    home = os.path.expanduser("~")
    if home != "~":
        path = Path(home) / ".docker" / "config.json"
        files.append((path, str(path)))
    return files


def _registry_key(key: str) -> str:
    """An `auths` key reduced to host[:port]: docker writes "https://host/v1/" too."""
    for prefix in ("https://", "http://"):
        if key.startswith(prefix):
            key = key[len(prefix) :]
            host, _, path = key.partition("/")
            return host.lower() if path.strip("/") in ("", "v1", "v2") else key.lower()
    return key.rstrip("/").lower()


def _read_auth_file(path: Path, where: str, registry: str, explicit: bool) -> Credentials | None:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        if explicit:
            raise InputError(f"{where}: no such auth file") from None
        return None
    except OSError as exc:
        raise InputError(f"{where}: cannot read the auth file: {exc.strerror}") from None
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        # json's message names a position only, never the content (which holds secrets).
        raise InputError(
            f"{where}: not a JSON auth file ({type(exc).__name__} at {getattr(exc, 'pos', '?')})"
        ) from None
    if not isinstance(doc, dict):
        raise InputError(f'{where}: expected an object with "auths"')
    auths = doc.get("auths", {})
    if not isinstance(auths, dict):
        raise InputError(f'{where}: auths: expected an object of "host[:port]": {{"auth": ...}}')
    for key, entry in auths.items():
        if _registry_key(str(key)) != registry.lower():
            continue
        at = f"{where}: auths[{json.dumps(key)}]"
        if not isinstance(entry, dict):
            raise InputError(f"{at}: expected an object with auth or username/password")
        if entry.get("auth"):
            try:
                user, colon, password = (
                    base64.b64decode(str(entry["auth"]), validate=True).decode().partition(":")
                )
            except (binascii.Error, UnicodeDecodeError, ValueError):
                raise InputError(f"{at}.auth: not base64 of USER:PASSWORD") from None
            if not colon or not user:
                raise InputError(f"{at}.auth: not base64 of USER:PASSWORD (no ':')")
            return Credentials(user, password)
        if "username" in entry or "password" in entry:
            name, secret = entry.get("username"), entry.get("password")
            if not isinstance(name, str) or not name:
                raise InputError(f"{at}.username: expected a non-empty string")
            if not isinstance(secret, str):
                raise InputError(f"{at}.password: expected a string")
            return Credentials(name, secret)
        return None  # e.g. {} next to a credsStore: nothing here for us
    return None


def load_credentials(
    registry: str, authfile: str | os.PathLike[str] | None = None
) -> Credentials | None:
    """The credentials for `registry` ("host[:port]") from a containers/docker auth file.

    `{"auths": {"host:port": {"auth": base64("user:pass")}}}` (or "username"/"password").
    Without `authfile`: the first of $REGISTRY_AUTH_FILE, $XDG_RUNTIME_DIR/containers/
    auth.json and ~/.docker/config.json with an entry for the registry; None when none has
    one. A given `authfile` must exist. A malformed file is an InputError naming the file
    and the field, never the secret.
    """
    if authfile is not None:
        return _read_auth_file(Path(authfile), f"--authfile {os.fspath(authfile)}", registry, True)
    for path, where in _auth_files():
        found = _read_auth_file(path, where, registry, False)
        if found is not None:
            return found
    return None


# -- the client ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Artifact:
    """A rollout image in a registry, as its manifest and config describe it."""

    reference: Reference  # pinned: by manifest digest
    manifest_digest: str
    blob_digest: str  # sha256 of the image file bytes == rollout's image digest
    size: int
    kind: str  # "tree" | "rootfs"
    name: str
    version: str
    compatible: str | None
    signature: str | None  # X-Image-Signature value (base64 of IMAGE.sig)

    def as_dict(self) -> dict[str, Any]:
        """What `rollout image push/resolve --output json` print."""
        return {
            "reference": str(self.reference),
            "manifest_digest": self.manifest_digest,
            "digest": self.blob_digest,
            "size": self.size,
            "kind": self.kind,
            "name": self.name,
            "version": self.version,
            "compatible": self.compatible,
            "signature": self.signature,
        }


class FetchError(Exception):
    """A registry or URL did not give what was asked.

    `code`: `unauthorized` (401/403), `not_found` (404), `fetch_failed` (anything else:
    other statuses, unreachable after the retries, a body shorter or longer than expected,
    a digest that does not match).
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _Broken(Exception):
    """A transfer that may work when tried again (a cut connection, a 5xx)."""


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """The scheme (lowercase) and parameters of a WWW-Authenticate header.

    >>> parse_challenge('Bearer realm="https://a/token",service="r",scope="repository:x:pull,push"')
    ('bearer', {'realm': 'https://a/token', 'service': 'r', 'scope': 'repository:x:pull,push'})
    """
    scheme, _, rest = header.strip().partition(" ")
    params = {
        m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
        for m in re.finditer(r'([A-Za-z_][\w-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,"]+))', rest)
    }
    return scheme.lower(), params


def _describe(exc: BaseException) -> str:
    problem = certificate_problem(exc)
    if problem is not None:
        return f"TLS certificate verification failed: {problem}"[:300]
    return (str(exc) or type(exc).__name__).splitlines()[0][:200]


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _origin(url: URL) -> str:
    return str(url.origin())


_Body = Callable[[], Any]  # makes a fresh request body for each try (a 401 replays it)


def blob_url(ref: Reference, digest: str, *, plain_http: bool = False) -> str:
    """The registry API v2 URL of a blob in `ref`'s repository.

    >>> blob_url(Reference("r:5000", "fleet/web", "2.0"), "sha256:ab")
    'https://r:5000/v2/fleet/web/blobs/sha256:ab'
    """
    scheme = "http" if plain_http else "https"
    return f"{scheme}://{ref.registry}/v2/{ref.repository}/blobs/{digest}"


class RegistryClient:
    """Resolve, push and fetch rollout images over one aiohttp session."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        credentials: Credentials | None = None,
        ssl: ssl.SSLContext | bool = True,
        plain_http: bool = False,
    ) -> None:
        self._session = session
        self._credentials = credentials
        self._ssl = ssl
        self._scheme = "http" if plain_http else "https"
        self._registries: set[str] = set()  # origins the credentials may be offered to
        self._auth: dict[str, str] = {}  # origin -> Authorization that last worked

    def __repr__(self) -> str:
        user = self._credentials.username if self._credentials else None
        return f"RegistryClient(scheme={self._scheme!r}, user={user!r})"

    def allow(self, url: str) -> None:
        """Offer the credentials to `url`'s origin too: the store a caller was told to
        fetch from with them (the agent's `POST /v1/fetch`), not named by a Reference."""
        self._registries.add(_origin(URL(url, encoded=True)))

    # -- plumbing -------------------------------------------------------------------------
    def _base(self, ref: Reference) -> str:
        base = f"{self._scheme}://{ref.registry}"
        self._registries.add(_origin(URL(base)))
        return f"{base}/v2/{ref.repository}"

    def blob_url(self, ref: Reference, digest: str) -> str:
        """The URL of a blob of `ref`'s repository; `fetch` may send credentials there."""
        self._base(ref)  # registers the registry's origin
        return blob_url(ref, digest, plain_http=self._scheme == "http")

    @contextlib.asynccontextmanager
    async def _request(
        self,
        method: str,
        url: str | URL,
        *,
        headers: dict[str, str] | None = None,
        body: _Body | None = None,
        timeout: aiohttp.ClientTimeout = _SHORT,
        redirects: bool = True,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """One request, answered: authenticating on a challenge, following redirects by
        hand (each hop gets only its own origin's authorization). Yields the final
        response, whatever its status; transport errors propagate."""
        target = url if isinstance(url, URL) else URL(url, encoded=True)
        challenged: set[str] = set()
        for _ in range(_MAX_HOPS):
            origin = _origin(target)
            sent = dict(headers or {})
            auth = self._auth.get(origin)
            if auth is not None:
                sent["Authorization"] = auth
            resp = await self._session.request(
                method,
                target,
                headers=sent,
                data=body() if body is not None else None,
                allow_redirects=False,
                ssl=self._ssl,
                timeout=timeout,
            )
            if resp.status == 401 and origin not in challenged:
                challenged.add(origin)
                try:
                    fresh = await self._authenticate(
                        target, resp.headers.get("WWW-Authenticate", "")
                    )
                except BaseException:
                    resp.release()
                    raise
                if fresh is not None and fresh != auth:
                    resp.release()
                    self._auth[origin] = fresh
                    continue
            location = resp.headers.get("Location")
            if redirects and resp.status in _REDIRECTS and location:
                resp.release()
                target = target.join(URL(location, encoded=True))
                continue
            try:
                yield resp
            finally:
                resp.release()
            return
        raise FetchError("fetch_failed", f"{url}: more than {_MAX_HOPS} redirects")

    async def _authenticate(self, target: URL, challenge: str) -> str | None:
        """The Authorization value answering `challenge`, or None when there is none."""
        scheme, params = parse_challenge(challenge)
        creds = self._credentials if _origin(target) in self._registries else None
        if scheme == "basic":
            return creds.header() if creds is not None else None
        if scheme != "bearer" or not params.get("realm"):
            return None
        realm = URL(params["realm"])
        if realm.scheme not in ("http", "https"):
            raise FetchError("fetch_failed", f"{target.host}: token realm {realm} is not http(s)")
        if realm.scheme == "http" and target.scheme == "https":
            # Never trade credentials over plain HTTP for a registry reached over TLS.
            raise FetchError(
                "fetch_failed", f"{target.host}: token realm {realm} is plain http; refusing"
            )
        query = {k: params[k] for k in ("service", "scope") if params.get(k)}
        headers = {"Authorization": creds.header()} if creds is not None else {}
        try:
            async with self._session.get(
                realm.update_query(query),
                headers=headers,
                ssl=self._ssl,
                timeout=_SHORT,
                allow_redirects=False,
            ) as resp:
                if resp.status in (401, 403):
                    raise FetchError(
                        "unauthorized",
                        f"{realm.host}: the token service refused "
                        + (f"the credentials of {creds.username}" if creds else "anonymous access")
                        + f" ({resp.status})",
                    )
                if resp.status != 200:
                    raise FetchError(
                        "fetch_failed", f"{realm.host}: the token service answered {resp.status}"
                    )
                body = await resp.json(content_type=None)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            raise FetchError(
                "fetch_failed", f"{realm.host}: token request failed: {_describe(exc)}"
            ) from None
        token = body.get("token") or body.get("access_token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            raise FetchError("fetch_failed", f"{realm.host}: the token service sent no token")
        return f"Bearer {token}"

    async def _error(self, resp: aiohttp.ClientResponse, what: str) -> FetchError:
        """The FetchError for a response that is not what was asked."""
        detail = ""
        with contextlib.suppress(Exception):
            body = json.loads(await resp.content.read(4096))
            errors = body.get("errors") or []
            detail = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors)[:300]
        detail = f" ({detail})" if detail else ""
        host = resp.url.host
        if resp.status in (401, 403):
            if self._credentials is None:
                how = f"no credentials for {host}; add them to an auth file (--authfile)"
            else:
                how = f"check the credentials of {self._credentials.username} for {host}"
            return FetchError(
                "unauthorized", f"{what}: the registry refused access ({resp.status}); {how}"
            )
        if resp.status == 404:
            return FetchError("not_found", f"{what}: not found (404){detail}")
        return FetchError("fetch_failed", f"{what}: the registry answered {resp.status}{detail}")

    @staticmethod
    async def _read_limited(resp: aiohttp.ClientResponse, limit: int, what: str) -> bytes:
        data = await resp.content.read(limit + 1)
        if len(data) > limit:
            raise FetchError("fetch_failed", f"{what}: larger than {limit} bytes")
        return data

    def _retrying(self, attempts: int) -> AsyncRetrying:
        return AsyncRetrying(
            retry=retry_if_exception_type(_Broken),
            stop=stop_after_attempt(attempts),
            wait=wait_exponential(multiplier=0.2, max=5.0),
            reraise=True,
        )

    @staticmethod
    def _transport(exc: BaseException, what: str) -> Exception:
        """A transport fault: retryable, unless the peer's certificate is wrong."""
        if certificate_problem(exc) is not None:
            return FetchError("fetch_failed", f"{what}: {_describe(exc)}")
        return _Broken(f"{what}: {_describe(exc)}")

    # -- resolve --------------------------------------------------------------------------
    async def resolve(self, ref: Reference) -> Artifact:
        """What `ref` names: its manifest (checked to be a rollout image) and config.

        Transport faults are retried (3 tries); FetchError when the registry refuses or
        the bytes do not match their digests, InputError when `ref` is not a rollout image.
        """
        try:
            async for attempt in self._retrying(3):
                with attempt:
                    return await self._resolve_once(ref)
        except _Broken as exc:
            raise FetchError("fetch_failed", str(exc)) from None
        raise AssertionError("unreachable")

    async def _resolve_once(self, ref: Reference) -> Artifact:
        what = str(ref)
        url = f"{self._base(ref)}/manifests/{ref.digest or ref.tag}"
        try:
            async with self._request("GET", url, headers={"Accept": MANIFEST_TYPE}) as resp:
                if resp.status >= 500:
                    raise _Broken(f"{what}: the registry answered {resp.status}")
                if resp.status != 200:
                    raise await self._error(resp, what)
                raw = await self._read_limited(resp, _MAX_MANIFEST, what)
                said = resp.headers.get("Docker-Content-Digest")
                media = resp.content_type
            digest = _sha256(raw)
            if said is not None and said != digest:
                raise FetchError(
                    "fetch_failed",
                    f"{what}: the registry says the manifest is {said} but its bytes are {digest}",
                )
            if ref.digest is not None and ref.digest != digest:
                raise FetchError(
                    "fetch_failed", f"{what}: the registry sent a manifest whose digest is {digest}"
                )
            layer, config_desc = _check_manifest(raw, media, what)
            config_raw = await self._get_blob(ref, config_desc, what)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise self._transport(exc, what) from None
        config = _check_config(config_raw, layer, what)
        return Artifact(
            reference=ref.pinned(digest),
            manifest_digest=digest,
            blob_digest=layer["digest"],
            size=layer["size"],
            kind=_KIND_OF[layer["mediaType"]],
            name=config["name"],
            version=config["version"],
            compatible=config.get("compatible"),
            signature=config.get("signature"),
        )

    async def _get_blob(self, ref: Reference, desc: dict[str, Any], what: str) -> bytes:
        """A small blob (the config), checked against its descriptor."""
        if desc["size"] > _MAX_CONFIG:
            raise InputError(f"{what}: config is {desc['size']} bytes, more than {_MAX_CONFIG}")
        async with self._request("GET", self.blob_url(ref, desc["digest"])) as resp:
            if resp.status >= 500:
                raise _Broken(f"{what}: config: the registry answered {resp.status}")
            if resp.status != 200:
                raise await self._error(resp, f"{what}: config {desc['digest']}")
            raw = await self._read_limited(resp, _MAX_CONFIG, what)
        if len(raw) != desc["size"] or _sha256(raw) != desc["digest"]:
            raise FetchError("fetch_failed", f"{what}: config blob does not match {desc['digest']}")
        return raw

    # -- push -----------------------------------------------------------------------------
    async def push(
        self, ref: Reference, path: str | os.PathLike[str], *, signature: str | None = None
    ) -> Artifact:
        """Upload image file `path` as one blob, its config, and a manifest tagged ref.tag.

        `signature` is the X-Image-Signature value (base64 of IMAGE.sig); it must be for
        this image (same digest, kind, name, version, compatible), or InputError. Blobs
        the registry already has are not sent again, so a broken push is simply re-run.
        """
        from rollout.image import load_image
        from rollout.signing import decode, image_payload, parse_payload

        if ref.tag is None:
            raise InputError(f"{ref}: push needs a tag (oci://HOST[:PORT]/REPO:TAG)")
        image = await asyncio.to_thread(load_image, path)  # hashes the file
        payload = await asyncio.to_thread(image_payload, image)
        if signature is not None:
            signed = parse_payload(decode(signature))
            if signed != payload:
                raise InputError(
                    f"{path}: the signature is for {signed.kind} {signed.name} {signed.version} "
                    f"({signed.digest}), not this image ({payload.digest})"
                )
        config = json.dumps(
            {"name": image.name, "version": image.version, "kind": payload.kind,
             "compatible": payload.compatible, "signature": signature,
             "digest": image.digest, "size": image.size},
            sort_keys=True, separators=(",", ":"),
        ).encode()  # fmt: skip
        config_digest = _sha256(config)
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": MANIFEST_TYPE,
                "artifactType": ARTIFACT_TYPE,
                "config": {"mediaType": ARTIFACT_TYPE, "digest": config_digest,
                           "size": len(config)},
                "layers": [{"mediaType": LAYER_TYPE[payload.kind], "digest": image.digest,
                            "size": image.size, "annotations": {TITLE: Path(path).name}}],
                "annotations": {VERSION: image.version, NAME: image.name},
            },
            sort_keys=True, separators=(",", ":"),
        ).encode()  # fmt: skip
        digest = _sha256(manifest)
        what = str(ref)
        try:
            await self._upload(ref, image.digest, image.size, _file_body(path), what)
            await self._upload(ref, config_digest, len(config), lambda: config, what)
            url = f"{self._base(ref)}/manifests/{ref.tag}"
            headers = {"Content-Type": MANIFEST_TYPE}
            async with self._request("PUT", url, headers=headers, body=lambda: manifest) as resp:
                if resp.status != 201:
                    raise await self._error(resp, f"{what}: manifest")
                said = resp.headers.get("Docker-Content-Digest")
            if said is not None and said != digest:
                raise FetchError(
                    "fetch_failed", f"{what}: the registry stored the manifest as {said}, "
                    f"not {digest}"
                )  # fmt: skip
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise FetchError("fetch_failed", f"{what}: push failed: {_describe(exc)}") from None
        return Artifact(
            reference=ref.pinned(digest),
            manifest_digest=digest,
            blob_digest=image.digest,
            size=image.size,
            kind=payload.kind,
            name=image.name,
            version=image.version,
            compatible=payload.compatible,
            signature=signature,
        )

    async def _upload(self, ref: Reference, digest: str, size: int, body: _Body, what: str) -> None:
        """Put one blob unless the registry has it: POST an upload, then one streamed PUT."""
        async with self._request("HEAD", self.blob_url(ref, digest)) as resp:
            if resp.status == 200:
                return
            if resp.status != 404:
                raise await self._error(resp, f"{what}: blob {digest}")
        async with self._request(
            "POST", f"{self._base(ref)}/blobs/uploads/", headers={"Content-Length": "0"}
        ) as resp:
            if resp.status != 202 or not resp.headers.get("Location"):
                raise await self._error(resp, f"{what}: starting the upload of {digest}")
            upload = resp.url.join(URL(resp.headers["Location"], encoded=True))
        # The location carries the upload's state in its query: add to it, re-encode nothing.
        joiner = "&" if upload.raw_query_string else "?"
        put = URL(f"{upload}{joiner}digest={digest.replace(':', '%3A')}", encoded=True)
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        async with self._request(
            "PUT", put, headers=headers, body=body, timeout=_UPLOAD, redirects=False
        ) as resp:
            if resp.status != 201:
                raise await self._error(resp, f"{what}: uploading {digest}")

    # -- fetch ----------------------------------------------------------------------------
    async def fetch(
        self,
        url: str,
        *,
        digest: str,
        size: int,
        start: int = 0,
        attempts: int = 5,
        on_resume: Callable[[int, BaseException], None] | None = None,
    ) -> AsyncIterator[bytes]:
        """Stream bytes `start`..`size`-1 of the blob (or plain URL) at `url`.

        A broken transfer is resumed from the bytes already yielded (`Range: bytes=N-`),
        with at most `attempts` tries in a row that bring nothing, exponential waits
        between them and `on_resume(N, error)` before each. Exactly `size - start` bytes
        are yielded; a body that ends short or goes on past `size` is a FetchError. The
        bytes are not hashed here (`digest` is for messages).
        """
        if not 0 <= start <= size:
            raise ValueError(f"start {start} is not within 0..{size}")
        download = _Download(self, URL(url, encoded=True), digest, size, start)

        def before_sleep(state: RetryCallState) -> None:
            if on_resume is not None and state.outcome is not None:
                exc = state.outcome.exception()
                if exc is not None:
                    on_resume(download.pos, exc)

        try:
            while download.pos < size:
                chunk = b""
                try:
                    async for attempt in AsyncRetrying(
                        retry=retry_if_exception_type(_Broken),
                        stop=stop_after_attempt(attempts),
                        wait=wait_exponential(multiplier=0.2, max=5.0),
                        before_sleep=before_sleep,
                        reraise=True,
                    ):
                        with attempt:
                            chunk = await download.read()
                except _Broken as exc:
                    raise FetchError(
                        "fetch_failed",
                        f"{digest}: {exc} (at byte {download.pos} of {size}, {attempts} tries)",
                    ) from None
                yield chunk
            await download.finish()
        finally:
            await download.close()


class _Download:
    """One blob being read, across the connections a resumed transfer needs."""

    def __init__(
        self, client: RegistryClient, url: URL, digest: str, size: int, start: int
    ) -> None:
        self.client, self.url, self.digest, self.size = client, url, digest, size
        self.pos = start
        self.skip = 0  # bytes to drop: a 200 answer to a Range request starts at 0
        self.stack: contextlib.AsyncExitStack | None = None
        self.resp: aiohttp.ClientResponse | None = None

    def _where(self) -> str:
        return f"{self.url.with_query(None)}"

    async def _open(self) -> aiohttp.ClientResponse:
        headers = {"Accept": "*/*"}
        if self.pos > 0:
            headers["Range"] = f"bytes={self.pos}-"
        stack = contextlib.AsyncExitStack()
        try:
            resp = await stack.enter_async_context(
                self.client._request("GET", self.url, headers=headers, timeout=_STREAM)
            )
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            await stack.aclose()
            raise RegistryClient._transport(exc, self._where()) from exc
        self.stack, self.resp = stack, resp
        where = self._where()
        if resp.status in (408, 429) or resp.status >= 500:
            await self.close()
            raise _Broken(f"{where}: the server answered {resp.status}")
        if resp.status == 206:
            got = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", resp.headers.get("Content-Range", ""))
            if (
                got is None
                or int(got.group(1)) != self.pos
                or (got.group(3) != "*" and int(got.group(3)) != self.size)
            ):
                raise FetchError(
                    "fetch_failed",
                    f"{where}: asked for bytes {self.pos}- of {self.size}, got Content-Range "
                    f"{resp.headers.get('Content-Range')!r}",
                )
            self.skip = 0
        elif resp.status == 200:
            if resp.content_length is not None and resp.content_length != self.size:
                raise FetchError(
                    "fetch_failed",
                    f"{where}: the body is {resp.content_length} bytes, expected {self.size}",
                )
            self.skip = self.pos
        else:
            raise await self.client._error(resp, where)
        return resp

    async def read(self) -> bytes:
        """The next bytes past `pos` (never empty); _Broken when the connection failed."""
        while True:
            resp = self.resp if self.resp is not None else await self._open()
            try:
                data = await resp.content.readany()
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, OSError,
                    TimeoutError) as exc:  # fmt: skip
                await self.close()
                raise _Broken(f"{self._where()}: {_describe(exc)}") from exc
            if not data:
                await self.close()
                raise _Broken(f"{self._where()}: the body ended early")
            if self.skip:
                dropped = min(self.skip, len(data))
                self.skip -= dropped
                data = data[dropped:]
                if not data:
                    continue
            if self.pos + len(data) > self.size:
                raise FetchError(
                    "fetch_failed", f"{self._where()}: the server sends more than {self.size} bytes"
                )
            self.pos += len(data)
            return data

    async def finish(self) -> None:
        """At `size`: anything more is an error (a body without a length may go on)."""
        if self.resp is not None and not self.resp.content.at_eof():
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                if await self.resp.content.readany():
                    raise FetchError(
                        "fetch_failed",
                        f"{self._where()}: the server sends more than {self.size} bytes",
                    )

    async def close(self) -> None:
        if self.stack is not None:
            stack, self.stack, self.resp = self.stack, None, None
            await stack.aclose()


def _file_body(path: str | os.PathLike[str]) -> _Body:
    """A fresh streaming body over the file for each try: never all of it in memory."""

    def make() -> AsyncIterator[bytes]:
        async def chunks() -> AsyncIterator[bytes]:
            with open(path, "rb") as fh:  # noqa: ASYNC230 - reads go to a thread
                while chunk := await asyncio.to_thread(fh.read, _CHUNK):
                    yield chunk

        return chunks()

    return make


def _check_manifest(raw: bytes, media: str, what: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The layer and config descriptors of a rollout image manifest; InputError if not one."""
    hint = "push rollout images with `rollout image push`"
    if media != MANIFEST_TYPE:
        raise InputError(f"{what}: not an OCI image manifest (Content-Type {media}); {hint}")
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise FetchError("fetch_failed", f"{what}: the manifest is not JSON: {exc}") from None
    if not isinstance(body, dict) or body.get("schemaVersion") != 2:
        raise InputError(f"{what}: manifest: expected an object with schemaVersion 2")
    config = body.get("config")
    if (
        not isinstance(config, dict)
        or not _descriptor(config)
        or (config.get("mediaType") != ARTIFACT_TYPE)
    ):
        got = config.get("mediaType") if isinstance(config, dict) else None
        raise InputError(
            f"{what}: not a rollout image: config mediaType {got!r}, expected "
            f"{ARTIFACT_TYPE}; {hint}"
        )
    if body.get("artifactType", ARTIFACT_TYPE) != ARTIFACT_TYPE:
        raise InputError(
            f"{what}: not a rollout image: artifactType {body.get('artifactType')!r}; {hint}"
        )
    layers = body.get("layers")
    if (
        not isinstance(layers, list)
        or len(layers) != 1
        or not _descriptor(layers[0])
        or layers[0].get("mediaType") not in _KIND_OF
    ):
        raise InputError(
            f"{what}: not a rollout image: expected exactly one layer of type "
            f"{' or '.join(LAYER_TYPE.values())}; {hint}"
        )
    layer: dict[str, Any] = layers[0]
    return layer, config


def _descriptor(desc: Any) -> bool:
    return (
        isinstance(desc, dict)
        and isinstance(desc.get("digest"), str)
        and _DIGEST_RE.fullmatch(desc["digest"]) is not None
        and isinstance(desc.get("size"), int)
        and desc["size"] >= 0
    )


def _check_config(raw: bytes, layer: dict[str, Any], what: str) -> dict[str, Any]:
    """rollout's config blob, checked to describe `layer`."""
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise InputError(f"{what}: config: not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InputError(f"{what}: config: expected a JSON object")
    for key in ("name", "version"):
        if not isinstance(body.get(key), str) or not body[key]:
            raise InputError(f"{what}: config.{key}: expected a non-empty string")
    for key in ("compatible", "signature"):
        if body.get(key) is not None and not isinstance(body[key], str):
            raise InputError(f"{what}: config.{key}: expected a string or null")
    kind = _KIND_OF[layer["mediaType"]]
    if (body.get("digest"), body.get("size"), body.get("kind")) != (
        layer["digest"],
        layer["size"],
        kind,
    ):
        raise InputError(
            f"{what}: config describes {body.get('kind')} {body.get('digest')} "
            f"({body.get('size')} bytes), the layer is {kind} {layer['digest']} "
            f"({layer['size']} bytes)"
        )
    return body


@contextlib.asynccontextmanager
async def open_client(
    registry: str,
    *,
    authfile: str | os.PathLike[str] | None = None,
    ca_file: str | os.PathLike[str] | None = None,
    plain_http: bool = False,
) -> AsyncIterator[RegistryClient]:
    """A client for `registry` with its own session: credentials from the auth file,
    TLS verified against `ca_file` (--registry-ca) or the system store."""
    if plain_http and ca_file is not None:
        raise InputError("--registry-ca: not used with --plain-http (no TLS)")
    credentials = load_credentials(registry, authfile)
    context: ssl.SSLContext | bool = (
        True if plain_http else client_context(ca_file, option="--registry-ca")
    )
    async with aiohttp.ClientSession() as session:
        yield RegistryClient(session, credentials=credentials, ssl=context, plain_http=plain_http)
