"""What every image file shares, whatever its kind: the tar container and its manifest.

Both image kinds (the unpacked "tree" of rollout.image and the partition-sized "rootfs" of
rollout.rootfs) are uncompressed POSIX tars with `manifest.json` at the root, identified
by the sha256 of the whole file. This module holds the pieces both need, so neither kind's
module has to import the other: the digest, the tar member template (owner 0, mtime 0),
reading the raw manifest out of a file, and telling the kinds apart by its "kind" field
(absent in tree manifests, which predate it).
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from typing import Any

from rollout.errors import ImageError

MANIFEST = "manifest.json"
FORMAT = 1
CHUNK = 1 << 20
KIND_TREE = "tree"
KIND_ROOTFS = "rootfs"
KINDS = (KIND_TREE, KIND_ROOTFS)


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The identity of an image file: `sha256:<hex>` of its bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def tar_info(name: str, kind: bytes, mode: int, size: int) -> tarfile.TarInfo:
    """A tar member header that does not depend on who built it or when."""
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.size = size
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def manifest_bytes(path: str | os.PathLike[str]) -> bytes:
    """The raw `manifest.json` of an image file, read without unpacking anything else."""
    try:
        with tarfile.open(path, "r:") as tar:
            try:
                member = tar.getmember(MANIFEST)
            except KeyError:
                raise ImageError(f"{path}: not an image: no {MANIFEST} at the root") from None
            fh = tar.extractfile(member)
            if fh is None:
                raise ImageError(f"{path}: {MANIFEST} is not a regular file")
            return fh.read()
    except (tarfile.TarError, OSError) as exc:
        raise ImageError(f"{path}: not a readable image tar: {exc}") from exc


def manifest_object(raw: bytes, where: str) -> dict[str, Any]:
    """Parse manifest bytes into a JSON object, or say why not."""
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise ImageError(f"{where}: {MANIFEST} is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise ImageError(f"{where}: {MANIFEST} must be a JSON object")
    return body


def manifest_kind(raw: bytes, where: str) -> str:
    """The manifest's kind, "tree" or "rootfs"; "tree" when it names none."""
    kind = manifest_object(raw, where).get("kind", KIND_TREE)
    if kind not in KINDS:
        raise ImageError(
            f"{where}: {MANIFEST}: kind: expected one of {', '.join(KINDS)}, got {kind!r}"
        )
    return str(kind)
