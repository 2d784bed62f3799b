"""The agent's disk: state.json and the two slot directories.

Layout under the state dir::

    state.json              the AgentState (state.py), written atomically
    slots/A/image.tar       the raw image file, byte for byte what was sent
    slots/A/root/           the unpacked tree; the workload runs with this as its cwd
    slots/B/...
    workload.log            the workload's stdout and stderr, appended

Invariants:

- state.json is replaced atomically (write a temp file, fsync it, rename it over, fsync
  the directory), so a reader or a crash sees the old or the new state, never a mix.
- An image is written to `image.tar.part` while it is hashed, unpacked into `root.part`,
  and both are renamed into place only once the digest matched and unpacking succeeded.
  Any failure removes the whole slot directory. The state marks a slot empty before the
  write starts, so a crash mid-write never leaves a slot that claims an image.
- Everything here is blocking; the runtime calls it through `asyncio.to_thread`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
from pathlib import Path
from typing import Any, BinaryIO

from rollout.agent.state import AgentError, AgentState, Slot, SlotImage, from_json, to_json
from rollout.errors import ImageError, InputError
from rollout.image import MANIFEST, Manifest, check_member, read_manifest, unpack

_COPY_CHUNK = 1 << 20


class Store:
    """Paths and blocking disk operations of one agent's state dir."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir
        self.state_path = state_dir / "state.json"
        self.log_path = state_dir / "workload.log"

    def slot_dir(self, slot: Slot) -> Path:
        return self.dir / "slots" / str(slot)

    def image_path(self, slot: Slot) -> Path:
        return self.slot_dir(slot) / "image.tar"

    def root(self, slot: Slot) -> Path:
        return self.slot_dir(slot) / "root"

    # --- state -------------------------------------------------------------------------

    def load(self) -> AgentState | None:
        """The persisted state, or None on a fresh state dir."""
        try:
            raw = self.state_path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            return from_json(json.loads(raw))
        except ValueError as exc:
            raise InputError(f"{self.state_path}: unreadable agent state: {exc}") from exc

    def save(self, state: AgentState) -> None:
        """Atomically replace state.json (tmp + fsync + rename + fsync dir)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        data = json.dumps(to_json(state), indent=2, sort_keys=True).encode() + b"\n"
        _replace(self.state_path, data, durable=True)

    @property
    def fetch_path(self) -> Path:
        return self.dir / "fetch.json"

    def save_fetch(self, body: dict[str, Any]) -> None:
        """The last pull's outcome (GET /v1/status `fetch`), replaced atomically."""
        _replace(self.fetch_path, json.dumps(body, sort_keys=True).encode() + b"\n")

    def load_fetch(self) -> dict[str, Any] | None:
        try:
            raw = json.loads(self.fetch_path.read_text())
        except (OSError, ValueError):
            return None
        return raw if isinstance(raw, dict) else None

    # --- slots -------------------------------------------------------------------------

    @property
    def workload_pid_path(self) -> Path:
        return self.dir / "workload.pid"

    def remove_partial(self, state: AgentState) -> list[str]:
        """After a crash: drop half-written files, and slot dirs the state calls empty."""
        removed = []
        for slot in Slot:
            d = self.slot_dir(slot)
            if not d.exists():
                continue
            if state.slot(slot) is None:
                shutil.rmtree(d, ignore_errors=True)
                removed.append(str(d))
                continue
            for name in ("image.tar.part", "root.part"):
                part = d / name
                if part.is_dir():
                    shutil.rmtree(part, ignore_errors=True)
                    removed.append(str(part))
                elif part.exists():
                    part.unlink()
                    removed.append(str(part))
        tmp = self.state_path.with_name(self.state_path.name + ".tmp")
        if tmp.exists():
            tmp.unlink()
            removed.append(str(tmp))
        return removed

    def clear_slot(self, slot: Slot) -> None:
        shutil.rmtree(self.slot_dir(slot), ignore_errors=True)

    def open_writer(self, slot: Slot) -> ImageWriter:
        """Start writing an image into an emptied `slot`."""
        self.clear_slot(slot)
        self.slot_dir(slot).mkdir(parents=True)
        return ImageWriter(self.image_path(slot).with_name("image.tar.part"))

    def install(self, slot: Slot, digest: str) -> SlotImage:
        """Unpack the written `image.tar.part` of `slot` and move both into place.

        Raises AgentError bad_image (not a readable image) or unsafe_image (a member would
        escape the slot). The caller clears the slot on failure.
        """
        part = self.image_path(slot).with_name("image.tar.part")
        try:
            manifest = read_manifest(part)
        except ImageError as exc:
            raise AgentError("bad_image", _relative(str(exc), part)) from exc
        try:
            with tarfile.open(part, "r:") as tar:
                for member in tar:
                    check_member(member)
        except ImageError as exc:
            raise AgentError("unsafe_image", str(exc)) from exc
        except (tarfile.TarError, OSError) as exc:
            raise AgentError("bad_image", f"not a readable image tar: {exc}") from exc
        root_part = self.root(slot).with_name("root.part")
        try:
            unpack(part, root_part)
        except ImageError as exc:
            raise AgentError("unsafe_image", _relative(str(exc), part)) from exc
        os.replace(root_part, self.root(slot))
        os.replace(part, self.image_path(slot))
        _fsync_dir(self.slot_dir(slot))
        return SlotImage(digest=digest, name=manifest.name, version=manifest.version)

    def install_file(self, slot: Slot, path: Path) -> SlotImage:
        """Factory install: copy image file `path` into `slot` and unpack it."""
        try:
            with open(path, "rb") as src:
                writer = self.open_writer(slot)
                try:
                    while chunk := src.read(_COPY_CHUNK):
                        writer.write(chunk)
                    digest, _ = writer.finish()
                    return self.install(slot, digest)
                except BaseException:
                    writer.abort()
                    raise
        except AgentError as exc:
            self.clear_slot(slot)
            raise InputError(f"{path}: cannot install image: {exc.message}") from exc
        except OSError as exc:
            self.clear_slot(slot)
            raise InputError(f"{path}: cannot install image: {exc}") from exc

    def manifest(self, slot: Slot) -> Manifest:
        """The manifest of the unpacked image in `slot`."""
        path = self.root(slot) / MANIFEST
        return Manifest.from_json(path.read_bytes(), str(path))


class ImageWriter:
    """Writes an image file chunk by chunk while hashing it (sha256)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = 0
        self._hash = hashlib.sha256()
        self._fh: BinaryIO | None = open(path, "wb")  # closed in finish/abort

    def write(self, chunk: bytes) -> None:
        if self._fh is None:
            raise ValueError("writer is closed")
        self._fh.write(chunk)
        self._hash.update(chunk)
        self.size += len(chunk)

    def finish(self) -> tuple[str, int]:
        """Flush and fsync; return ("sha256:<hex>", bytes written)."""
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None
        return "sha256:" + self._hash.hexdigest(), self.size

    def abort(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        self.path.unlink(missing_ok=True)


def _relative(message: str, path: Path) -> str:
    """Drop the agent-local file path from an image error message."""
    return message.replace(f"{path}: ", "")


def _replace(path: Path, data: bytes, *, durable: bool = False) -> None:
    """Write `data` to a temp file beside `path` and rename it over: readers see the old
    or the new content. `durable`: fsync the file and the directory too."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        if durable:
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(tmp, path)
    if durable:
        _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
