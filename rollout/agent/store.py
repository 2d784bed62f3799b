"""The agent's disk: state.json and the two slot directories.

Layout under the state dir::

    state.json              the AgentState (state.py), written atomically
    slots/A/image.tar       the raw image file, byte for byte what was sent
    slots/A/root/           the unpacked tree; the workload runs with this as its cwd
    slots/B/...
    trash/                  a slot's old contents, being deleted in the background
    workload.log            the workload's stdout and stderr, appended

Staging is one pass (`receive`). The event loop hands every chunk it receives to one
worker thread through a bounded `Channel` (channel.py: no thread hop per chunk); the
worker hashes the chunk, appends it to `image.tar.part` and feeds it to a streaming tar
reader that unpacks into `root.part` as the members go by. Receiving, hashing, writing and
unpacking overlap, and no byte is read back from disk (unpacking after the upload was a
second full pass over the image).

Invariants:

- state.json is replaced atomically (write a temp file, fsync it, rename it over, fsync
  the directory), so a reader or a crash sees the old or the new state, never a mix.
- The runtime marks a slot empty in the state before the write starts, so a crash
  mid-write never leaves a slot that claims an image. The slot's old contents are then
  renamed into trash/ and deleted by a background thread, out of the upload's time; what a
  crash leaves in trash/ (or in a slot the state calls empty) goes at the next start.
- Nothing is moved into place before the whole image arrived, its digest matched and it
  unpacked: only then are `image.tar.part` and `root.part` renamed to `image.tar` and
  `root`. The digest is judged first, so an image both corrupt and mismatched is a
  digest_mismatch, as when unpacking came after the upload.
- No member escapes the slot: each is checked before it is extracted (`check_member`),
  then by tarfile's "data" filter, which resolves what is already on disk, so a link
  extracted earlier cannot carry a later member out. The first refused member ends the
  unpacking at once; the rest of the upload is hashed (for the verdict above), not written.
- After any failure the runtime calls `clear_slot`, which deletes the slot directory
  before the refusal is answered: nothing half-installed is left.
- `image.tar` is fsynced before it is moved into place; its writeback is started every
  `_WRITEBACK` bytes while it is written, so that fsync waits for little.
- Everything here but `receive` is blocking; the runtime calls it through
  `asyncio.to_thread`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import stat
import sys
import tarfile
import threading
import uuid
from collections.abc import AsyncIterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from rollout.agent.channel import Channel, finished, run_in_thread
from rollout.agent.state import AgentError, AgentState, Slot, SlotImage, from_json, to_json
from rollout.errors import ImageError, InputError
from rollout.image import MANIFEST, Manifest, check_member, tree_manifest

_COPY_CHUNK = 1 << 20
_WRITEBACK = 32 << 20
_MAX_MANIFEST = 1 << 20


@dataclass(frozen=True)
class Received:
    """What one pass over an upload found."""

    digest: str  # "sha256:<hex>" of every byte received
    size: int
    manifest: Manifest | None
    error: AgentError | None  # the image's own fault (bad_image, unsafe_image)


class Source(Protocol):
    def take(self) -> bytes | None:
        """The next chunk, None at the end (blocking)."""
        ...


class Store:
    """Paths and blocking disk operations of one agent's state dir."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir
        self.state_path = state_dir / "state.json"
        self.log_path = state_dir / "workload.log"
        self.trash_dir = state_dir / "trash"
        self._purges: list[threading.Thread] = []
        self._purges_lock = threading.Lock()

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
        """After a crash: drop half-written files, slot dirs the state calls empty, and
        what was left in trash/ (deleted in the background)."""
        removed = []
        if self.trash_dir.is_dir():
            for entry in self.trash_dir.iterdir():
                self._purge(entry)
                removed.append(str(entry))
        for slot in Slot:
            d = self.slot_dir(slot)
            if not d.exists():
                continue
            if state.slot(slot) is None:
                self.discard_later(d)
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
        """Delete the slot's files now (after a failure: the refusal is answered after)."""
        shutil.rmtree(self.slot_dir(slot), ignore_errors=True)

    def discard_later(self, path: Path) -> bool:
        """Rename `path` into trash/ (instant) and delete it in a background thread."""
        self.trash_dir.mkdir(parents=True, exist_ok=True)
        aside = self.trash_dir / f"{path.name}-{uuid.uuid4().hex[:12]}"
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return False
        self._purge(aside)
        return True

    def _purge(self, path: Path) -> None:
        thread = threading.Thread(
            target=shutil.rmtree, args=(path,), kwargs={"ignore_errors": True},
            name="purge", daemon=True,
        )  # fmt: skip
        with self._purges_lock:
            self._purges = [t for t in self._purges if t.is_alive()]
            self._purges.append(thread)
        thread.start()

    def wait_purged(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the background deletions; True when done."""
        with self._purges_lock:
            threads = list(self._purges)
        for thread in threads:
            thread.join(timeout)
        return not any(t.is_alive() for t in threads)

    def prepare_slot(self, slot: Slot) -> None:
        """An empty directory for `slot`; what it held goes to trash/ (no rmtree here)."""
        self.discard_later(self.slot_dir(slot))
        self.slot_dir(slot).mkdir(parents=True)

    async def receive(
        self, slot: Slot, digest: str, body: AsyncIterable[bytes]
    ) -> tuple[SlotImage, int]:
        """Stream `body` into `slot` in one pass; the verified image and bytes received.

        Raises AgentError digest_mismatch, bad_image (not a readable image), unsafe_image
        (a member would escape the slot) or upload_incomplete (what `body` raised); the
        caller clears the slot on failure.
        """
        await asyncio.to_thread(self.prepare_slot, slot)
        channel = Channel()

        def work() -> Received:
            try:
                return self.unpack_stream(slot, channel)
            finally:
                channel.stop()  # a worker that failed takes no more: the loop stops sending

        worker = run_in_thread(work, name=f"stage-{slot}")
        try:
            async for chunk in body:
                if not await channel.send(chunk):
                    break  # the worker ended early: awaiting it raises why
            else:
                channel.close()
        except BaseException as exc:
            reason = exc if isinstance(exc, AgentError) else None
            channel.fail(reason or AgentError("upload_incomplete", "the upload was cancelled"))
            await finished(worker)  # no thread may still write into what gets cleared
            raise
        received = await worker
        image = await asyncio.to_thread(self.install, slot, digest, received)
        return image, received.size

    def unpack_stream(self, slot: Slot, source: Source) -> Received:
        """Blocking, one pass: hash `source`, write it to `image.tar.part` of an emptied
        `slot` and unpack it into `root.part` while it is read. A refusal of the image is
        returned (`error`), after the whole source was read and hashed; a failure of the
        source (or of the disk) is raised."""
        part = self.image_path(slot).with_name("image.tar.part")
        root_part = self.root(slot).with_name("root.part")
        digest = hashlib.sha256()
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            reader = _Reader(source, fd, digest)
            root_part.mkdir()
            manifest: Manifest | None = None
            error: AgentError | None = None
            try:
                manifest = _unpack(reader, root_part)
            except AgentError as exc:
                if exc.code not in ("bad_image", "unsafe_image"):
                    raise
                error = exc
                reader.copy = False  # refused: the rest is only hashed, for the verdict
            reader.drain()
            if error is None:
                os.fsync(fd)
        finally:
            os.close(fd)
        return Received("sha256:" + digest.hexdigest(), reader.size, manifest, error)

    def install(self, slot: Slot, digest: str, received: Received) -> SlotImage:
        """Judge a received image (digest first), then move it into place in `slot`."""
        if received.digest != digest:
            raise AgentError(
                "digest_mismatch",
                f"the image written has digest {received.digest}, the request said {digest}",
                expected=digest,
                actual=received.digest,
            )
        if received.error is not None:
            raise received.error
        if received.manifest is None:
            raise RuntimeError("an image without error and without manifest")
        os.replace(self.root(slot).with_name("root.part"), self.root(slot))
        os.replace(self.image_path(slot).with_name("image.tar.part"), self.image_path(slot))
        _fsync_dir(self.slot_dir(slot))
        manifest = received.manifest
        return SlotImage(digest=digest, name=manifest.name, version=manifest.version)

    def install_file(self, slot: Slot, path: Path) -> SlotImage:
        """Factory install: copy image file `path` into `slot` and unpack it (one pass)."""
        try:
            self.prepare_slot(slot)
            with open(path, "rb") as src:
                received = self.unpack_stream(slot, _FileSource(src))
            return self.install(slot, received.digest, received)
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


class _FileSource:
    """A file as a `Source` (the factory install)."""

    def __init__(self, fh: BinaryIO) -> None:
        self._fh = fh

    def take(self) -> bytes | None:
        return self._fh.read(_COPY_CHUNK) or None


class _Reader:
    """The upload as tarfile reads it: a forward-only file over the source's chunks.

    Every byte taken from the source is hashed and, while `copy` is set, appended to the
    image file, exactly once, whether tarfile reads it, skips over it, or it trails the
    archive (`drain`). File data goes to the tree by `copy_to`, straight from the chunk.
    """

    def __init__(self, source: Source, fd: int, digest: Any) -> None:
        self._source = source
        self._fd = fd
        self._hash = digest
        self._chunk = b""
        self._off = 0
        self._eof = False
        self._flushed = 0  # image file bytes whose writeback was started
        self.pos = 0  # bytes handed to tarfile (or skipped)
        self.size = 0  # bytes taken from the source
        self.copy = True

    def _next(self) -> bool:
        if self._eof:
            return False
        chunk = self._source.take()
        if chunk is None:
            self._eof = True
            return False
        self._hash.update(chunk)
        self.size += len(chunk)
        if self.copy:
            _write_all(self._fd, chunk)
            if self.size - self._flushed >= _WRITEBACK:
                # Start writing these pages back now (DONTNEED kicks off writeback, and
                # they are never read again), so the final fsync has little left to wait.
                os.posix_fadvise(
                    self._fd, self._flushed, self.size - self._flushed, os.POSIX_FADV_DONTNEED
                )
                self._flushed = self.size
        self._chunk, self._off = chunk, 0
        return True

    def read(self, n: int = -1) -> bytes:
        want = n if n >= 0 else sys.maxsize
        parts = []
        while want > 0:
            avail = len(self._chunk) - self._off
            if not avail:
                if not self._next():
                    break
                continue
            k = min(avail, want)
            if self._off == 0 and k == len(self._chunk):
                parts.append(self._chunk)  # a whole chunk: no copy
            else:
                parts.append(self._chunk[self._off : self._off + k])
            self._off += k
            self.pos += k
            want -= k
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def copy_to(self, fd: int, n: int) -> None:
        """Write the next `n` bytes to file descriptor `fd`."""
        while n > 0:
            avail = len(self._chunk) - self._off
            if not avail:
                if not self._next():
                    raise tarfile.ReadError("unexpected end of data")
                continue
            k = min(avail, n)
            _write_all(fd, memoryview(self._chunk)[self._off : self._off + k])
            self._off += k
            self.pos += k
            n -= k

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        if whence != os.SEEK_SET or pos < self.pos:
            raise tarfile.ReadError("an upload is read forward only")
        while self.pos < pos:
            avail = len(self._chunk) - self._off
            if not avail:
                if not self._next():
                    break  # past the end: the next read finds nothing, as with a file
                continue
            k = min(avail, pos - self.pos)
            self._off += k
            self.pos += k
        return self.pos

    def drain(self) -> None:
        """Take the rest of the source (hashed, copied while `copy`)."""
        self.pos += len(self._chunk) - self._off
        while self._next():
            self.pos += len(self._chunk)
        self._off = len(self._chunk)


class _StreamTar(tarfile.TarFile):
    """A TarFile over a `_Reader`: file data is written from the received chunks as is."""

    def makefile(self, tarinfo: tarfile.TarInfo, targetpath: Any) -> None:
        reader = self.fileobj
        if tarinfo.sparse is not None or not isinstance(reader, _Reader):
            super().makefile(tarinfo, targetpath)
            return
        reader.seek(tarinfo.offset_data)
        fd = os.open(targetpath, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
        try:
            reader.copy_to(fd, tarinfo.size)
        finally:
            os.close(fd)


def _unpack(reader: _Reader, dest: Path) -> Manifest:
    """Unpack the tar `reader` streams into `dest`, checking each member before it is
    extracted; the image's manifest. AgentError bad_image or unsafe_image."""
    try:
        tar = _StreamTar(fileobj=reader, mode="r", errorlevel=2)  # type: ignore[arg-type]
    except tarfile.TarError as exc:
        raise AgentError("bad_image", f"not a readable image tar: {exc}") from None
    dirs: list[tarfile.TarInfo] = []
    with tar:
        try:
            for member in tar:
                try:
                    check_member(member)
                except ImageError as exc:
                    raise AgentError("unsafe_image", str(exc)) from None
                # Directories get their times at the end, as extractall does: the files
                # written into them would change them.
                tar.extract(member, dest, set_attrs=not member.isdir(), filter="data")
                if member.isdir():
                    dirs.append(member)
        except tarfile.FilterError as exc:
            raise AgentError("unsafe_image", f"refused while unpacking: {exc}") from None
        except tarfile.TarError as exc:
            raise AgentError("bad_image", f"not a readable image tar: {exc}") from None
    manifest = _unpacked_manifest(dest)
    for member in sorted(dirs, key=lambda m: m.name, reverse=True):
        try:
            os.utime(dest / member.name, (member.mtime, member.mtime), follow_symlinks=False)
        except OSError:
            pass  # a later member replaced it: nothing to date
    return manifest


def _unpacked_manifest(root: Path) -> Manifest:
    """The manifest of an unpacked tree: a regular file (never followed through a link)."""
    try:
        fd = os.open(root / MANIFEST, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise AgentError("bad_image", f"not an image: no {MANIFEST} at the root") from None
    except OSError:
        raise AgentError("bad_image", f"{MANIFEST} is not a regular file") from None
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise AgentError("bad_image", f"{MANIFEST} is not a regular file")
        raw = fh.read(_MAX_MANIFEST + 1)
    if len(raw) > _MAX_MANIFEST:
        raise AgentError("bad_image", f"{MANIFEST} is larger than {_MAX_MANIFEST} bytes")
    try:
        return tree_manifest(raw, "image")
    except ImageError as exc:
        raise AgentError("bad_image", str(exc).removeprefix("image: ")) from None


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


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
