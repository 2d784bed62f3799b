"""The image format: a plain tar with `manifest.json` at its root.

This is the "tree" kind, unpacked into a slot directory; rollout.rootfs holds the other
kind ("rootfs", a whole ext4 filesystem for partition slots), and rollout.imagefile what
both share. `load_image` describes a file of either kind.

A tree image is the whole installed tree of a node. The file is an uncompressed POSIX tar so
an agent can hash it while it streams to disk; its identity is the sha256 of the file
bytes (`sha256:<hex>`). Building is reproducible: members are sorted, owners are 0 and
mtimes are fixed, so the same tree and version give the same digest.

manifest.json::

    {"format": 1, "name": "web", "version": "2.0.0",
     "workload": {"command": ["python3", "app.py"], "env": {"MODE": "prod"}}}

Safety invariant: no member may escape the directory it is unpacked into. Absolute names,
`..` components, links whose target resolves outside, hard links to outside names, and
device or FIFO members are refused, both when building and when unpacking (where tarfile's
"data" filter also runs as a second line of defence).

Describing an image (`load_image`) hashes the whole file, so it is done once per file, not
once per rollout: the result is cached in memory (a controller service) and in a small file
(each `rollout run` is a new process), `$ROLLOUT_CACHE/image-digests.json` or
`$XDG_CACHE_HOME/rollout/image-digests.json` (~/.cache by default). The key is the file's
identity and what changes whenever its bytes do: path, device, inode, size, mtime and
ctime in nanoseconds. A file rewritten in place changes its mtime and ctime (restoring the
mtime with `touch -d` or `os.utime` changes the ctime), a file replaced by a rename is
another inode, so a stale digest is never served for changed bytes. Nor could a stale or
forged entry do harm: every agent hashes the bytes it receives and refuses them when they
do not match the digest it was sent. The cache file is best effort: unreadable, it is
ignored; unwritable, nothing is kept.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import posixpath
import tarfile
import threading
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path

from rollout.errors import ImageError
from rollout.imagefile import FORMAT as FORMAT
from rollout.imagefile import KIND_ROOTFS, manifest_bytes, manifest_kind, manifest_object
from rollout.imagefile import MANIFEST as MANIFEST
from rollout.imagefile import sha256_file as sha256_file
from rollout.imagefile import tar_info as _info
from rollout.model import Image
from rollout.rootfs import load_rootfs_image


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    command: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> bytes:
        body = {
            "format": FORMAT,
            "name": self.name,
            "version": self.version,
            "workload": {"command": list(self.command), "env": dict(self.env)},
        }
        return json.dumps(body, indent=2, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, raw: bytes, where: str) -> Manifest:
        body = manifest_object(raw, where)
        name, version, workload = body.get("name"), body.get("version"), body.get("workload")
        if not isinstance(name, str) or not name:
            raise ImageError(f"{where}: {MANIFEST}: name: expected a non-empty string")
        if not isinstance(version, str) or not version:
            raise ImageError(f"{where}: {MANIFEST}: version: expected a non-empty string")
        if not isinstance(workload, dict):
            raise ImageError(f"{where}: {MANIFEST}: workload: expected an object with command")
        command, env = workload.get("command"), workload.get("env", {})
        if (
            not isinstance(command, list)
            or not command
            or not all(isinstance(c, str) for c in command)
        ):
            raise ImageError(
                f"{where}: {MANIFEST}: workload.command: expected a non-empty list of strings"
            )
        if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env.items()
        ):
            raise ImageError(f"{where}: {MANIFEST}: workload.env: expected string to string map")
        return cls(name=name, version=version, command=tuple(command), env=dict(env))


def _inside(base: str, target: str) -> bool:
    """True when the normalised relative path `target` stays within `base` (both posix)."""
    joined = posixpath.normpath(posixpath.join(base, target))
    return joined != ".." and not joined.startswith("../") and not posixpath.isabs(joined)


def check_member(member: tarfile.TarInfo) -> None:
    """Refuse a member that could write outside the directory it is unpacked into."""
    name = member.name
    if name.startswith("/") or posixpath.isabs(name):
        raise ImageError(f"tar member {name!r}: absolute paths are not allowed")
    if ".." in name.split("/"):
        raise ImageError(f"tar member {name!r}: '..' components are not allowed")
    if member.issym():
        target = member.linkname
        if posixpath.isabs(target) or not _inside(posixpath.dirname(name), target):
            raise ImageError(f"tar member {name!r}: symlink to {target!r} points outside the image")
    elif member.islnk():
        target = member.linkname
        if posixpath.isabs(target) or not _inside("", target):
            raise ImageError(f"tar member {name!r}: hard link to {target!r} is outside the image")
    elif not (member.isfile() or member.isdir()):
        raise ImageError(f"tar member {name!r}: only files, directories and links are allowed")


def build_image(
    src: str | os.PathLike[str],
    output: str | os.PathLike[str],
    version: str,
    name: str | None = None,
    command: tuple[str, ...] | None = None,
) -> Image:
    """Pack directory `src` into an image file at `output`; return it with its digest.

    `src/manifest.json`, when present, supplies name and workload; arguments override it.
    """
    root = Path(src)
    if not root.is_dir():
        raise ImageError(f"{src}: not a directory; pass the directory holding the image tree")
    base: Manifest | None = None
    if (root / MANIFEST).is_file():
        raw = json.loads((root / MANIFEST).read_bytes() or b"{}")
        raw.setdefault("version", version)
        base = Manifest.from_json(json.dumps(raw).encode(), str(root / MANIFEST))
    final_name = name or (base.name if base else root.resolve().name)
    final_cmd = command or (base.command if base else None)
    if not final_cmd:
        raise ImageError(
            f"{src}: no workload command; pass --workload 'CMD ARGS' or put one in {MANIFEST}"
        )
    manifest = Manifest(final_name, version, tuple(final_cmd), dict(base.env) if base else {})

    entries: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for entry in sorted(dirnames + filenames):
            full = Path(dirpath) / entry
            rel = full.relative_to(root).as_posix()
            if rel == MANIFEST:
                continue
            entries.append((rel, full))
    entries.sort()

    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            data = manifest.to_json()
            info = _info(MANIFEST, tarfile.REGTYPE, 0o644, len(data))
            tar.addfile(info, io.BytesIO(data))
            for rel, full in entries:
                st = full.lstat()
                if full.is_symlink():
                    info = _info(rel, tarfile.SYMTYPE, 0o777, 0)
                    info.linkname = os.readlink(full)
                    check_member(info)
                    tar.addfile(info)
                elif full.is_dir():
                    tar.addfile(_info(rel, tarfile.DIRTYPE, st.st_mode & 0o755, 0))
                elif full.is_file():
                    info = _info(rel, tarfile.REGTYPE, st.st_mode & 0o755, st.st_size)
                    with open(full, "rb") as fh:
                        tar.addfile(info, fh)
                else:
                    raise ImageError(f"{full}: only files, directories and symlinks can be packed")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return Image(
        path=str(out),
        digest=sha256_file(out),
        name=manifest.name,
        version=manifest.version,
        size=out.stat().st_size,
    )


def tree_manifest(raw: bytes, where: str) -> Manifest:
    """Parse the raw manifest of a tree image; a rootfs manifest is refused (ImageError)."""
    if manifest_kind(raw, where) == KIND_ROOTFS:
        raise ImageError(
            f"{where}: a root-filesystem image (kind rootfs), not a tree image: it is written "
            "whole to a partition slot, not unpacked; use a tree image for this node"
        )
    return Manifest.from_json(raw, where)


def read_manifest(path: str | os.PathLike[str]) -> Manifest:
    """Read the manifest of a tree image file without unpacking it."""
    return tree_manifest(manifest_bytes(path), str(path))


_CACHE_SIZE = 256
_CACHE_FILE = "image-digests.json"
_cache: OrderedDict[str, Image] = OrderedDict()
_cache_lock = threading.Lock()  # load_image also runs in worker threads (asyncio.to_thread)


def load_image(path: str | os.PathLike[str]) -> Image:
    """Describe an image file of either kind: its digest and what its manifest says.

    A rootfs image is read through once, its layout and filesystem digest checked while
    the file is hashed (rollout.rootfs.load_rootfs_image); a tree image is hashed. Either
    is done once per file and cached (see the module docstring): describing the same
    unchanged file again, for the next rollout, reads nothing but its `stat`.
    """
    try:
        st = os.stat(path)
    except OSError:
        st = None
    if st is None or not os.path.isfile(path):
        raise ImageError(f"{path}: no such image file; build one with `rollout image build`")
    key = _cache_key(path, st)
    with _cache_lock:
        hit = _cache.get(key)
        if hit is None:
            hit = _load_cache_file().get(key)
            if hit is not None:
                _cache[key] = hit
        if hit is not None:
            _cache.move_to_end(key)
            return replace(hit, path=str(path))
    image = _describe(path)
    if _cache_key(path, os.stat(path)) == key:  # kept only if it did not change meanwhile
        with _cache_lock:
            _cache[key] = image
            while len(_cache) > _CACHE_SIZE:
                _cache.popitem(last=False)
            _save_cache_file(key, image)
    return image


def _cache_key(path: str | os.PathLike[str], st: os.stat_result) -> str:
    parts = (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns,
             st.st_ctime_ns)  # fmt: skip
    return "|".join(str(p) for p in parts)


def _cache_path() -> Path:
    env = os.environ.get("ROLLOUT_CACHE")
    if env:
        return Path(env) / _CACHE_FILE
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "rollout" / _CACHE_FILE


def _load_cache_file() -> dict[str, Image]:
    try:
        raw = json.loads(_cache_path().read_bytes())
        return {
            str(k): Image(path="", digest=str(v["digest"]), name=str(v["name"]),
                          version=str(v["version"]), size=int(v["size"]))
            for k, v in raw.items()
        }  # fmt: skip
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}


def _save_cache_file(key: str, image: Image) -> None:
    """Add one entry to the cache file (atomically replaced; the oldest entries go)."""
    entries = {k: v for k, v in _load_cache_file().items() if k != key}
    entries[key] = image
    body = {
        k: {"digest": v.digest, "name": v.name, "version": v.version, "size": v.size}
        for k, v in list(entries.items())[-_CACHE_SIZE:]
    }
    path = _cache_path()
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(body))  # in insertion order: the oldest first
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def _describe(path: str | os.PathLike[str]) -> Image:
    raw = manifest_bytes(path)
    if manifest_kind(raw, str(path)) == KIND_ROOTFS:
        return load_rootfs_image(path)[0]
    manifest = Manifest.from_json(raw, str(path))
    return Image(
        path=str(path),
        digest=sha256_file(path),
        name=manifest.name,
        version=manifest.version,
        size=os.path.getsize(path),
    )


def unpack(path: str | os.PathLike[str], dest: str | os.PathLike[str]) -> Manifest:
    """Unpack image `path` into directory `dest`, refusing any member that would escape."""
    manifest = read_manifest(path)
    os.makedirs(dest, exist_ok=True)
    try:
        with tarfile.open(path, "r:") as tar:
            members = tar.getmembers()
            for member in members:
                check_member(member)
            tar.extractall(dest, members=members, filter="data")
    except tarfile.TarError as exc:
        raise ImageError(f"{path}: refused while unpacking: {exc}") from exc
    return manifest
