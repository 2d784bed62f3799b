"""Signed images: ed25519 signatures bound to an image's digest and manifest.

Trust model (docs/images.md#signatures): whoever holds a private key may release images;
every node (and the controller) is given the public keys it trusts. A signature file sits
next to its image (`IMAGE.sig`) and travels with it to the agent in the
`X-Image-Signature` header (base64 of the file). Its content::

    {"format": 1,
     "payload": {"digest": "sha256:...", "kind": "tree" | "rootfs", "name": "...",
                 "version": "...", "compatible": "..." | null},
     "signatures": [{"key_id": "<16 hex>", "signature": "<base64>"}]}

Each signature is ed25519 over the canonical payload (sorted keys, no spaces). The
payload binds the bytes (the digest of the whole image file) and what the image says it
is (kind, name, version, compatible), so a valid signature cannot be moved to another
image or another release. More than one signature may be present and more than one key
trusted: keys rotate by signing with both the old and new key until every node trusts
the new one. `key_id` is the first 16 hex digits of the sha256 of the raw public key.

Keys are PEM files: the private key PKCS#8 (written 0600), the public key
SubjectPublicKeyInfo. The `cryptography` package does all the cryptography; the functions
that use it import it, so a controller or agent with no keys does not load it (about
12 ms of every start-up, and an agent starts on every boot).

Verification is pure given the keys: `verify(doc, keys, digest=...)` returns the payload
or raises SignatureError with a stable code (`unsigned`, `bad_signature`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rollout.errors import InputError
from rollout.model import Image

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

FORMAT = 1
SUFFIX = ".sig"
HEADER = "X-Image-Signature"
MAX_DOC = 16 * 1024


class SignatureError(InputError):
    """An image refused for its signature; `code` is `unsigned` or `bad_signature`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Payload:
    digest: str
    kind: str
    name: str
    version: str
    compatible: str | None

    def canonical(self) -> bytes:
        body = {"digest": self.digest, "kind": self.kind, "name": self.name,
                "version": self.version, "compatible": self.compatible}  # fmt: skip
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class TrustedKey:
    key_id: str
    key: Ed25519PublicKey
    source: str


def key_id(public: Ed25519PublicKey) -> str:
    from cryptography.hazmat.primitives import serialization

    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def keygen(prefix: Path) -> tuple[Path, Path]:
    """PREFIX.key (private, 0600) and PREFIX.pub (public); refuses to overwrite."""
    private_path, public_path = (
        prefix.with_name(prefix.name + ".key"),
        prefix.with_name(prefix.name + ".pub"),
    )
    for path in (private_path, public_path):
        if path.exists():
            raise InputError(f"{path}: exists; remove it or choose another prefix")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    public_path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private_path, public_path


def load_private(path: Path) -> Ed25519PrivateKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise InputError(f"--key {path}: cannot read: {exc.strerror}") from exc
    except (ValueError, TypeError) as exc:
        raise InputError(f"--key {path}: not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise InputError(f"--key {path}: not an ed25519 key; make one with `rollout image keygen`")
    return key


def load_public(path: Path, option: str = "--trusted-key") -> TrustedKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except OSError as exc:
        raise InputError(f"{option} {path}: cannot read: {exc.strerror}") from exc
    except ValueError as exc:
        raise InputError(f"{option} {path}: not a PEM public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise InputError(f"{option} {path}: not an ed25519 public key")
    return TrustedKey(key_id(key), key, str(path))


def load_keys(
    paths: Sequence[str | os.PathLike[str]], option: str = "--trusted-key"
) -> list[TrustedKey]:
    return [load_public(Path(p), option) for p in paths]


def sign(
    payload: Payload, key: Ed25519PrivateKey, existing: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A signature document for `payload`, adding this key's signature to `existing`."""
    sigs: list[dict[str, str]] = []
    if existing is not None:
        if parse_payload(existing) != payload:
            raise InputError(
                "the existing signature file is for another image or release; remove it "
                "to sign this one"
            )
        sigs = [s for s in existing["signatures"] if s.get("key_id") != key_id(key.public_key())]
    sigs.append({
        "key_id": key_id(key.public_key()),
        "signature": base64.b64encode(key.sign(payload.canonical())).decode(),
    })  # fmt: skip
    return {"format": FORMAT, "payload": json.loads(payload.canonical()), "signatures": sigs}


def parse_payload(doc: Any) -> Payload:
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise SignatureError("bad_signature", f"signature: expected an object with format {FORMAT}")
    p = doc.get("payload")
    if not isinstance(p, dict):
        raise SignatureError("bad_signature", "signature: payload: expected an object")
    for field in ("digest", "kind", "name", "version"):
        if not isinstance(p.get(field), str) or not p[field]:
            raise SignatureError("bad_signature", f"signature: payload.{field}: expected a string")
    compatible = p.get("compatible")
    if compatible is not None and not isinstance(compatible, str):
        raise SignatureError("bad_signature", "signature: payload.compatible: expected a string")
    if not isinstance(doc.get("signatures"), list):
        raise SignatureError("bad_signature", "signature: signatures: expected a list")
    return Payload(p["digest"], p["kind"], p["name"], p["version"], compatible)


def verify(doc: Any, keys: Sequence[TrustedKey], *, digest: str) -> Payload:
    """The payload, once one signature by a trusted key verifies and it is for `digest`.

    >>> from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    >>> k = Ed25519PrivateKey.generate()
    >>> p = Payload("sha256:ab", "tree", "web", "2", None)
    >>> trusted = [TrustedKey(key_id(k.public_key()), k.public_key(), "k.pub")]
    >>> verify(sign(p, k), trusted, digest="sha256:ab") == p
    True
    """
    from cryptography.exceptions import InvalidSignature

    payload = parse_payload(doc)
    if payload.digest != digest:
        raise SignatureError(
            "bad_signature", f"the signature is for {payload.digest}, not this image ({digest})"
        )
    by_id = {k.key_id: k for k in keys}
    tried = []
    for entry in doc["signatures"]:
        if not isinstance(entry, dict):
            continue
        trusted = by_id.get(str(entry.get("key_id")))
        if trusted is None:
            tried.append(str(entry.get("key_id")))
            continue
        try:
            raw = base64.b64decode(str(entry.get("signature", "")), validate=True)
            trusted.key.verify(raw, payload.canonical())
            return payload
        except (InvalidSignature, binascii.Error, ValueError):
            tried.append(f"{trusted.key_id} (does not verify)")
    known = ", ".join(k.key_id for k in keys) or "none"
    raise SignatureError(
        "bad_signature",
        f"no valid signature by a trusted key (signed by: {', '.join(tried) or 'nobody'}; "
        f"trusted: {known})",
    )


def encode(doc: dict[str, Any]) -> str:
    """The header value: base64 of the signature file's bytes."""
    return base64.b64encode(json.dumps(doc, sort_keys=True).encode()).decode()


def decode(header: str) -> Any:
    """Parse an `X-Image-Signature` header; SignatureError on anything malformed."""
    if len(header) > MAX_DOC * 2:
        raise SignatureError("bad_signature", f"{HEADER}: longer than {MAX_DOC * 2} characters")
    try:
        return json.loads(base64.b64decode(header.strip(), validate=True))
    except (binascii.Error, ValueError) as exc:
        raise SignatureError(
            "bad_signature", f"{HEADER}: not base64 of a JSON document: {exc}"
        ) from None


def signature_path(image: str | os.PathLike[str]) -> Path:
    return Path(str(image) + SUFFIX)


def read_signature(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read the signature: {exc.strerror}") from exc
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise InputError(f"{path}: not a signature file (JSON): {exc}") from exc
    parse_payload(doc)
    return dict(doc)


def image_payload(image: Image) -> Payload:
    """What a signature for `image` (described by load_image) must say."""
    from rollout.imagefile import KIND_ROOTFS
    from rollout.rootfs import image_kind, read_image_manifest

    if image_kind(image.path) == KIND_ROOTFS:
        manifest = read_image_manifest(image.path)
        return Payload(image.digest, KIND_ROOTFS, image.name, image.version, manifest.compatible)
    return Payload(image.digest, "tree", image.name, image.version, None)


def load_signed_image(
    path: str | os.PathLike[str],
    trusted: Sequence[str | os.PathLike[str]] = (),
    signature: str | os.PathLike[str] | None = None,
) -> Image:
    """load_image, plus the signature file (`signature`, else PATH.sig if present).

    With `trusted` keys the signature must exist and verify against one of them and say
    what the image says (kind, name, version, compatible): InputError (exit 2) otherwise,
    before anything is journaled or any node touched.
    """
    from rollout.image import load_image

    image = load_image(path)
    sig_path = Path(signature) if signature is not None else signature_path(path)
    if not sig_path.exists():
        if signature is not None:
            raise InputError(f"--signature {sig_path}: no such file")
        if trusted:
            raise SignatureError(
                "unsigned",
                f"{path}: not signed (no {sig_path}); sign it with `rollout image sign` or "
                "drop --trusted-key",
            )
        return image
    doc = read_signature(sig_path)
    if trusted:
        try:
            payload = verify(doc, load_keys(trusted), digest=image.digest)
        except SignatureError as exc:
            raise SignatureError(exc.code, f"{sig_path}: {exc}") from None
        expected = image_payload(image)
        if payload != expected:
            raise SignatureError(
                "bad_signature",
                f"{sig_path}: signed for {payload.kind} {payload.name} {payload.version} "
                f"({payload.compatible}); the image is {expected.kind} {expected.name} "
                f"{expected.version} ({expected.compatible})",
            )
    return replace(image, signature=encode(doc))
