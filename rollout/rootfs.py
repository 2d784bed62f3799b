"""Root-filesystem images ("rootfs"): a whole ext4 filesystem for nodes whose slots are
partitions.

A tree image (rollout.image) is unpacked file by file into a slot directory. A real Linux
node boots from a partition, so its slot takes a filesystem image written byte for byte.
The file is an uncompressed POSIX tar holding exactly two regular files, in this order::

    manifest.json   {"format": 1, "kind": "rootfs", "name", "version", "compatible",
                     "rootfs": {"type": "ext4", "size", "digest"},
                     "boot": {"kernel", "initrd"}, "workload": {"units": [...]}}
    rootfs.ext4     the raw filesystem, `rootfs.size` bytes, sha256 `rootfs.digest`

Design and invariants:

- One pass. The manifest comes first, so an agent reading the image off a socket can
  refuse it (other hardware, a slot too small) before a single filesystem byte reaches
  the partition; `copy_rootfs` calls its `check` before its `sink`, and reads the stream
  to its end so the caller can hash the whole file while it streams.
- Two digests. The image's identity is the sha256 of the whole file, as for tree images.
  `rootfs.digest` covers the filesystem bytes alone, so what was written to a partition
  can be checked without the tar around it.
- Nothing but the two members. Any other name, order, count or member type is refused
  (`RootfsStreamError`, code "bad_image", or "unsafe_image" for links, devices and
  directories), as is a filesystem whose size or digest differs from the manifest's.
- No privileges to build. `mkfs.ext4 -d SRC` copies the tree into a fresh filesystem in
  a regular file: no loop mount, no root. Owners, modes, xattrs and mtimes come from the
  tree as mkfs sees them (build an OS tree as root, or run the build under the same
  fakeroot session that made it).
- Reproducible. The filesystem UUID and directory hash seed are derived from name and
  version, every time e2fsprogs stamps is 1970-01-01T00:00:01 (E2FSPROGS_FAKE_TIME; it
  treats 0 as unset), and after mkfs every inode's atime and ctime, which mkfs copies
  from the build host and which no one can set, are pinned to that second with debugfs.
  So the same tree content, modes, owners and mtimes, name and version give the same
  digest, even from a fresh copy of the tree (`cp -a`) or after the tree was read.
- Boot files are paths inside the filesystem (relative, no `..`). At build time they must
  resolve to regular files with the tree as `/`: symlinks are followed inside the tree,
  never on the build host.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import stat
import subprocess
import tarfile
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

from rollout.errors import ImageError
from rollout.imagefile import (
    CHUNK,
    FORMAT,
    KIND_ROOTFS,
    MANIFEST,
    manifest_bytes,
    manifest_kind,
    manifest_object,
    sha256_file,
    tar_info,
)
from rollout.model import Image

ROOTFS_MEMBER = "rootfs.ext4"
FS_TYPE = "ext4"
LABEL = "rootfs"
DEFAULT_KERNEL = "vmlinuz"
DEFAULT_INITRD = "initrd.img"
MAX_MANIFEST = 64 * 1024
MIB = 1 << 20
BLOCK = 4096
# Pinned, not the host's mke2fs.conf: GRUB 2.06 cannot read metadata_csum_seed/orphan_file
# filesystems, and a slot's kernel is loaded by GRUB.
EXT4_FEATURES = (
    "none,has_journal,extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize"
)
# Every timestamp the build sets: E2FSPROGS_FAKE_TIME ignores 0, so the first second.
EPOCH = 1
_UNIT = re.compile(r"^[A-Za-z0-9:_.@-]+\.(service|target|socket|timer)$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://rollout.invalid/rootfs")
_MAX_LINKS = 40

StreamCode = Literal["bad_image", "unsafe_image", "incompatible", "too_large"]
STREAM_CODES: tuple[StreamCode, ...] = ("bad_image", "unsafe_image", "incompatible", "too_large")


class RootfsStreamError(ImageError):
    """A rootfs image refused while streaming; `code` says why, for the agent's answer.

    "bad_image": malformed (members, sizes, manifest, digest); "unsafe_image": a member
    that is a link, device or directory, or an absolute or `..` name; "incompatible" and
    "too_large" are for `check` callbacks (another `compatible` string, a slot too small).
    """

    def __init__(self, code: StreamCode, message: str) -> None:
        if code not in STREAM_CODES:
            raise ValueError(f"unknown RootfsStreamError code {code!r}")
        super().__init__(message)
        self.code: StreamCode = code


# -- manifest -------------------------------------------------------------------------------
@dataclass(frozen=True)
class RootfsSpec:
    """The filesystem member: its type, byte size and `sha256:<hex>` of its bytes."""

    type: str
    size: int
    digest: str


@dataclass(frozen=True)
class BootSpec:
    """Kernel and initrd, as paths inside the filesystem (what kexec loads)."""

    kernel: str = DEFAULT_KERNEL
    initrd: str = DEFAULT_INITRD


@dataclass(frozen=True)
class RootfsManifest:
    """manifest.json of a rootfs image."""

    name: str
    version: str
    compatible: str
    rootfs: RootfsSpec
    units: tuple[str, ...]
    boot: BootSpec = field(default_factory=BootSpec)

    def to_json(self) -> bytes:
        body = {
            "format": FORMAT,
            "kind": KIND_ROOTFS,
            "name": self.name,
            "version": self.version,
            "compatible": self.compatible,
            "rootfs": {
                "type": self.rootfs.type,
                "size": self.rootfs.size,
                "digest": self.rootfs.digest,
            },
            "boot": {"kernel": self.boot.kernel, "initrd": self.boot.initrd},
            "workload": {"units": list(self.units)},
        }
        return json.dumps(body, indent=2, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, raw: bytes, where: str) -> RootfsManifest:
        return read_rootfs_manifest(raw, where)


def read_rootfs_manifest(raw: bytes, where: str) -> RootfsManifest:
    """Parse and check a rootfs manifest; errors name `where`, the file and the field."""
    body = manifest_object(raw, where)
    at = f"{where}: {MANIFEST}"
    if body.get("format") != FORMAT or isinstance(body.get("format"), bool):
        raise ImageError(f"{at}: format: expected {FORMAT}, got {body.get('format')!r}")
    if body.get("kind") != KIND_ROOTFS:
        raise ImageError(f"{at}: kind: expected {KIND_ROOTFS!r}, got {body.get('kind')!r}")
    name = _text(body, "name", at)
    version = _text(body, "version", at)
    compatible = _text(body, "compatible", at)

    fs = _object(body, "rootfs", at, "with type, size and digest")
    if fs.get("type") != FS_TYPE:
        raise ImageError(f"{at}: rootfs.type: expected {FS_TYPE!r}, got {fs.get('type')!r}")
    size = fs.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise ImageError(f"{at}: rootfs.size: expected a positive integer (bytes), got {size!r}")
    digest = fs.get("digest")
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise ImageError(f"{at}: rootfs.digest: expected sha256:<64 hex>, got {digest!r}")

    boot = body.get("boot", {})
    if not isinstance(boot, dict):
        raise ImageError(f"{at}: boot: expected an object with kernel and initrd")
    kernel = boot.get("kernel", DEFAULT_KERNEL)
    initrd = boot.get("initrd", DEFAULT_INITRD)
    for key, value in (("kernel", kernel), ("initrd", initrd)):
        problem = boot_path_problem(value)
        if problem:
            raise ImageError(f"{at}: boot.{key}: {problem}")

    workload = _object(body, "workload", at, "with units")
    units = workload.get("units")
    problem = units_problem(units)
    if problem:
        raise ImageError(f"{at}: workload.units: {problem}")
    assert isinstance(units, list)
    return RootfsManifest(
        name=name,
        version=version,
        compatible=compatible,
        rootfs=RootfsSpec(type=FS_TYPE, size=size, digest=digest),
        units=tuple(units),
        boot=BootSpec(kernel=kernel, initrd=initrd),
    )


def _text(body: dict[str, Any], key: str, at: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise ImageError(f"{at}: {key}: expected a non-empty string")
    return value


def _object(body: dict[str, Any], key: str, at: str, what: str) -> dict[str, Any]:
    value = body.get(key)
    if not isinstance(value, dict):
        raise ImageError(f"{at}: {key}: expected an object {what}")
    return value


def units_problem(units: object) -> str | None:
    """Why `units` is not a non-empty list of systemd unit names, or None if it is."""
    if not isinstance(units, list | tuple) or not units:
        return 'expected a non-empty list of systemd unit names, e.g. ["sample-web.service"]'
    for unit in units:
        if not isinstance(unit, str) or not _UNIT.match(unit):
            return (
                f"{unit!r} is not a systemd unit name: letters, digits and :_.@- ending in "
                ".service, .target, .socket or .timer"
            )
    return None


def boot_path_problem(path: object) -> str | None:
    """Why `path` is not a relative path without `..` inside the filesystem, or None."""
    if not isinstance(path, str) or not path or "\0" in path:
        return f"expected a non-empty path inside the filesystem, got {path!r}"
    if path.startswith("/"):
        return f"{path!r}: expected a path relative to the filesystem root, without a leading /"
    if ".." in path.split("/"):
        return f"{path!r}: '..' components are not allowed"
    return None


# -- building -------------------------------------------------------------------------------
def build_rootfs_image(
    src_dir: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    version: str,
    name: str,
    compatible: str,
    units: Sequence[str],
    size: int | None = None,
    kernel: str = DEFAULT_KERNEL,
    initrd: str = DEFAULT_INITRD,
) -> Image:
    """Make an ext4 filesystem of directory `src_dir` and pack it as a rootfs image.

    `size` (bytes, a multiple of 4096) defaults to the tree's apparent size * 1.2 + 64 MiB,
    rounded up to 4 MiB. Writes `output.part`, then renames it to `output`.
    """
    root = Path(src_dir)
    if not root.is_dir():
        raise ImageError(f"{src_dir}: not a directory; pass the directory holding the root tree")
    for key, value in (("version", version), ("name", name), ("compatible", compatible)):
        if not isinstance(value, str) or not value:
            raise ImageError(f"rootfs image: {key}: expected a non-empty string")
    problem = units_problem(units if isinstance(units, str) else list(units))
    if problem:
        raise ImageError(f"rootfs image: units: {problem}")
    for key, flag, path in (("kernel", "--kernel", kernel), ("initrd", "--initrd", initrd)):
        problem = boot_path_problem(path)
        if problem:
            raise ImageError(f"rootfs image: boot.{key}: {problem}")
        found, shown = resolve_in_tree(root, path)
        if found is None:
            raise ImageError(
                f"{root}: boot.{key} {path!r} is not a file in the tree ({shown}); kexec "
                f"loads it from the filesystem: install it in the tree (Debian's kernel "
                f"package makes the /vmlinuz and /initrd.img links) or pass {flag} PATH, "
                "relative to the tree's root"
            )
    if size is None:
        size = default_size(tree_size(root))
    elif isinstance(size, bool) or not isinstance(size, int) or size <= 0 or size % BLOCK:
        raise ImageError(
            f"rootfs image: size: expected a positive multiple of {BLOCK} bytes, got {size!r}"
        )

    out = Path(output)
    if out.resolve().is_relative_to(root.resolve()):
        raise ImageError(
            f"{output}: inside the tree {src_dir} that goes into the filesystem; "
            "write the image outside it"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    fs_uuid = str(uuid.uuid5(_NAMESPACE, f"{name}\n{version}"))
    try:
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as work:
            fs = Path(work) / ROOTFS_MEMBER
            _make_ext4(root, fs, size, fs_uuid)
            manifest = RootfsManifest(
                name=name,
                version=version,
                compatible=compatible,
                rootfs=RootfsSpec(type=FS_TYPE, size=fs.stat().st_size, digest=sha256_file(fs)),
                units=tuple(units),
                boot=BootSpec(kernel=kernel, initrd=initrd),
            )
            with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
                data = manifest.to_json()
                tar.addfile(tar_info(MANIFEST, tarfile.REGTYPE, 0o644, len(data)), io.BytesIO(data))
                info = tar_info(ROOTFS_MEMBER, tarfile.REGTYPE, 0o644, manifest.rootfs.size)
                with open(fs, "rb") as fh:
                    tar.addfile(info, fh)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return Image(
        path=str(out),
        digest=sha256_file(out),
        name=name,
        version=version,
        size=out.stat().st_size,
    )


def tree_size(root: str | os.PathLike[str]) -> int:
    """Apparent size of a tree: the sum of its entries' sizes, hard links counted once."""
    total, seen = 0, set[tuple[int, int]]()
    for dirpath, dirnames, filenames in os.walk(root):
        for entry in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, entry))
            if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total


def default_size(apparent: int) -> int:
    """Filesystem size for a tree of `apparent` bytes: * 1.2 + 64 MiB, up to 4 MiB."""
    want = -(-apparent * 6 // 5) + 64 * MIB
    return -(-want // (4 * MIB)) * 4 * MIB


def parse_size(text: str) -> int:
    """Bytes from "536870912", "512M", "2G" (K, M, G, T: powers of 1024); ValueError if not."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"{text!r}: expected bytes or a number with K, M, G or T, e.g. 512M")
    power = " KMGT".index(match.group(2).upper() or " ")
    return int(match.group(1)) << (10 * power)


def resolve_in_tree(root: Path, path: str) -> tuple[Path | None, str]:
    """Follow `path` with `root` as `/`; return (the regular file, or None) and what it
    resolved to, for messages. Symlinks, absolute or relative, never leave `root`: an
    absolute target restarts at `root`, and `..` stops there."""
    todo = [p for p in path.split("/") if p not in ("", ".")]
    done: list[str] = []
    links = 0
    while todo:
        part = todo.pop(0)
        if part == "..":
            if done:
                done.pop()
            continue
        here = root.joinpath(*done, part)
        if here.is_symlink():
            links += 1
            if links > _MAX_LINKS:
                return None, f"more than {_MAX_LINKS} symbolic links"
            target = os.readlink(here)
            if target.startswith("/"):
                done = []
            todo = [p for p in target.split("/") if p not in ("", ".")] + todo
            continue
        done.append(part)
        if not here.exists():
            return None, f"/{'/'.join(done)} does not exist in the tree"
    found = root.joinpath(*done)
    shown = "/" + "/".join(done)
    if not found.is_file():
        return None, f"{shown} is not a regular file"
    return found, shown


def _tool(name: str) -> str:
    """An e2fsprogs command: on PATH, else where Debian keeps it for root."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if not found:
        raise ImageError(
            f"{name} not found (looked on PATH, /usr/sbin and /sbin); rootfs images need "
            "e2fsprogs 1.43 or later: install it (apt-get install e2fsprogs)"
        )
    return found


def _e2fs_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(E2FSPROGS_FAKE_TIME=str(EPOCH), SOURCE_DATE_EPOCH=str(EPOCH), LC_ALL="C")
    return env


def _run(argv: list[str], what: str, hint: str = "") -> str:
    """Run an e2fsprogs command; its stdout, or ImageError with its stderr (and `hint`)."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, env=_e2fs_env(), check=False)
    except OSError as exc:
        raise ImageError(f"{what}: could not run {argv[0]}: {exc}") from exc
    if proc.returncode != 0:
        lines = [line.strip() for line in (proc.stderr or proc.stdout).splitlines()]
        detail = "; ".join(line for line in lines if line) or f"exit status {proc.returncode}"
        raise ImageError(f"{what}: {Path(argv[0]).name} failed: {detail}{hint}")
    return proc.stdout


def _make_ext4(src: Path, fs: Path, size: int, fs_uuid: str) -> None:
    """mkfs.ext4 -d `src` into a new `size`-byte file `fs`, then pin atimes and ctimes."""
    with open(fs, "wb") as fh:
        fh.truncate(size)
    mkfs = [
        _tool("mkfs.ext4"), "-q", "-F", "-b", str(BLOCK), "-I", "256", "-L", LABEL,
        "-O", EXT4_FEATURES,
        "-U", fs_uuid, "-E", f"hash_seed={fs_uuid},root_owner=0:0", "-d", str(src), str(fs),
    ]  # fmt: skip
    _run(
        mkfs,
        f"{src}: making a {size}-byte ext4 filesystem of it",
        "; if it ran out of space or inodes, pass a bigger size (--size)",
    )
    dump = _run([_tool("dumpe2fs"), str(fs)], f"{fs}: reading the new filesystem")
    script = fs.with_name("normalise.debugfs")
    with open(script, "w") as fh:
        for ino in used_inodes(dump):
            fh.write(
                f"sif <{ino}> atime @{EPOCH}\nsif <{ino}> atime_extra 0\n"
                f"sif <{ino}> ctime @{EPOCH}\nsif <{ino}> ctime_extra 0\n"
            )
    argv = [_tool("debugfs"), "-w", "-f", str(script), str(fs)]
    proc = subprocess.run(argv, capture_output=True, text=True, env=_e2fs_env(), check=False)
    # debugfs exits 0 whatever its commands did; it reports them on stderr after its banner.
    errors = [line for line in proc.stderr.splitlines() if line and not line.startswith("debugfs ")]
    if proc.returncode != 0 or errors:
        raise ImageError(f"{fs}: debugfs failed pinning timestamps: {'; '.join(errors[:5])}")


def used_inodes(dumpe2fs_output: str) -> Iterator[int]:
    """Inodes in use, from `dumpe2fs` output: the root and those from the first
    non-reserved inode on (the reserved ones mkfs stamped with the fake time itself)."""
    header: dict[str, int] = {}
    for key in ("Inode count", "Inodes per group", "First inode"):
        match = re.search(rf"^{key}:\s+(\d+)$", dumpe2fs_output, re.MULTILINE)
        if not match:
            raise ImageError(f"dumpe2fs output has no {key!r}; cannot pin timestamps")
        header[key] = int(match.group(1))
    per_group, first = header["Inodes per group"], header["First inode"]
    groups = re.findall(r"^[ \t]+Free inodes: ?(.*)$", dumpe2fs_output, re.MULTILINE)
    if len(groups) * per_group != header["Inode count"]:
        raise ImageError("dumpe2fs output: free inodes listed for the wrong number of groups")
    yield 2
    for index, ranges in enumerate(groups):
        start = index * per_group + 1
        free = sorted(_ranges(ranges))
        for lo, hi in _gaps(free, start, start + per_group - 1):
            yield from range(max(lo, first), hi + 1)


def _ranges(text: str) -> Iterable[tuple[int, int]]:
    for part in text.split(","):
        part = part.strip()
        if part:
            lo, _, hi = part.partition("-")
            yield int(lo), int(hi or lo)


def _gaps(free: list[tuple[int, int]], lo: int, hi: int) -> Iterator[tuple[int, int]]:
    """The ranges within [lo, hi] that the sorted `free` ranges do not cover."""
    at = lo
    for flo, fhi in free:
        if flo > at:
            yield at, flo - 1
        at = max(at, fhi + 1)
    if at <= hi:
        yield at, hi


# -- reading --------------------------------------------------------------------------------
def copy_rootfs(
    stream: BinaryIO,
    *,
    check: Callable[[RootfsManifest], None],
    sink: Callable[[bytes], None],
    chunk: int = 1 << 20,
) -> RootfsManifest:
    """Read a rootfs image from `stream` in one pass; give the filesystem bytes to `sink`.

    `check(manifest)` runs before any filesystem byte goes to `sink`; it refuses by
    raising, and its exception propagates unchanged (so does `sink`'s). Refusals of the
    image itself are RootfsStreamError with a code (see the class). On success the
    stream has been read to its end and the manifest is returned; on a refusal, reading
    stops where the problem was found.
    """
    try:
        tar = tarfile.open(fileobj=stream, mode="r|", bufsize=max(chunk, tarfile.RECORDSIZE))
    except tarfile.TarError as exc:
        raise RootfsStreamError("bad_image", f"not a tar archive: {exc}") from exc
    with tar:
        first = _next(tar, "manifest.json")
        _expect(first, MANIFEST, "first")
        assert first is not None
        if first.size > MAX_MANIFEST:
            raise RootfsStreamError(
                "bad_image", f"{MANIFEST} is {first.size} bytes; at most {MAX_MANIFEST} allowed"
            )
        raw = _read(tar, first)
        try:
            manifest = read_rootfs_manifest(raw, "rootfs image")
        except ImageError as exc:
            raise RootfsStreamError("bad_image", str(exc)) from exc

        check(manifest)

        second = _next(tar, "rootfs.ext4")
        _expect(second, ROOTFS_MEMBER, "second")
        assert second is not None
        if second.size != manifest.rootfs.size:
            raise RootfsStreamError(
                "bad_image",
                f"{ROOTFS_MEMBER} is {second.size} bytes but {MANIFEST} says rootfs.size "
                f"{manifest.rootfs.size}",
            )
        fh = tar.extractfile(second)
        assert fh is not None  # a regular file, checked above
        h = hashlib.sha256()
        left = second.size
        while left:
            try:
                data = fh.read(min(chunk, left))
            except (tarfile.TarError, EOFError) as exc:
                raise RootfsStreamError("bad_image", f"{ROOTFS_MEMBER}: truncated: {exc}") from exc
            if not data:
                raise RootfsStreamError(
                    "bad_image", f"{ROOTFS_MEMBER}: truncated, {left} bytes missing"
                )
            h.update(data)
            left -= len(data)
            sink(data)

        extra = _next(tar, "the end of the archive")
        if extra is not None:
            _refuse_type(extra)
            raise RootfsStreamError(
                "bad_image",
                f"unexpected member {extra.name!r} after {ROOTFS_MEMBER}: a rootfs image holds "
                f"exactly {MANIFEST} and {ROOTFS_MEMBER}",
            )
    while stream.read(chunk):
        pass  # the end-of-archive padding: read so the caller sees (and hashes) every byte
    actual = "sha256:" + h.hexdigest()
    if actual != manifest.rootfs.digest:
        raise RootfsStreamError(
            "bad_image",
            f"{ROOTFS_MEMBER}: digest mismatch: {MANIFEST} says {manifest.rootfs.digest}, "
            f"the bytes hash to {actual}",
        )
    return manifest


def _next(tar: tarfile.TarFile, wanted: str) -> tarfile.TarInfo | None:
    try:
        return tar.next()
    except (tarfile.TarError, EOFError) as exc:
        raise RootfsStreamError("bad_image", f"reading the tar before {wanted}: {exc}") from exc


def _read(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    fh = tar.extractfile(member)
    assert fh is not None
    try:
        data = fh.read()
    except (tarfile.TarError, EOFError) as exc:
        raise RootfsStreamError("bad_image", f"{member.name}: truncated: {exc}") from exc
    if len(data) != member.size:
        raise RootfsStreamError("bad_image", f"{member.name}: truncated")
    return data


def _refuse_type(member: tarfile.TarInfo) -> None:
    """Refuse anything but a plain regular file, with a name that stays put."""
    name = member.name
    if name.startswith("/") or ".." in name.split("/"):
        raise RootfsStreamError("unsafe_image", f"tar member {name!r}: absolute or '..' name")
    if member.issym() or member.islnk():
        raise RootfsStreamError(
            "unsafe_image", f"tar member {name!r}: a link (to {member.linkname!r}); "
            "a rootfs image holds only regular files"
        )  # fmt: skip
    if not member.isreg():
        raise RootfsStreamError(
            "unsafe_image", f"tar member {name!r}: not a regular file (a directory, device "
            "or FIFO); a rootfs image holds only regular files"
        )  # fmt: skip
    if member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
        raise RootfsStreamError(
            "bad_image", f"tar member {name!r}: a sparse or contiguous file; expected a plain one"
        )


def _expect(member: tarfile.TarInfo | None, name: str, position: str) -> None:
    layout = f"a rootfs image holds exactly {MANIFEST} then {ROOTFS_MEMBER}"
    if member is None:
        raise RootfsStreamError("bad_image", f"no {name} as the {position} member; {layout}")
    _refuse_type(member)
    if member.name != name:
        raise RootfsStreamError(
            "bad_image", f"{position} member is {member.name!r}, expected {name!r}; {layout}"
        )


# -- files ----------------------------------------------------------------------------------
class _Hashing(io.RawIOBase):
    """A readable file that hashes what is read through it."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self.hash = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._raw.read(len(buffer))
        self.hash.update(data)
        buffer[: len(data)] = data
        return len(data)


def load_rootfs_image(path: str | os.PathLike[str]) -> tuple[Image, RootfsManifest]:
    """Describe a rootfs image file, reading it once: layout, sizes and both digests."""
    if not os.path.isfile(path):
        raise ImageError(f"{path}: no such image file; build one with `rollout image build`")
    with open(path, "rb") as fh:
        hashing = _Hashing(fh)
        try:
            manifest = copy_rootfs(
                io.BufferedReader(hashing, CHUNK), check=lambda m: None, sink=lambda b: None
            )
        except RootfsStreamError as exc:
            raise RootfsStreamError(exc.code, f"{path}: {exc}") from exc
    image = Image(
        path=str(path),
        digest="sha256:" + hashing.hash.hexdigest(),
        name=manifest.name,
        version=manifest.version,
        size=os.path.getsize(path),
    )
    return image, manifest


def read_image_manifest(path: str | os.PathLike[str]) -> RootfsManifest:
    """The manifest of a rootfs image file, read without the filesystem: nothing is
    hashed and the layout is not checked (`load_rootfs_image` does both)."""
    if not os.path.isfile(path):
        raise ImageError(f"{path}: no such image file; build one with `rollout image build`")
    raw = manifest_bytes(path)
    if manifest_kind(raw, str(path)) != KIND_ROOTFS:
        raise ImageError(
            f"{path}: a tree image, not a root-filesystem image; build one with "
            "`rollout image build --rootfs`"
        )
    return read_rootfs_manifest(raw, str(path))


def image_kind(path: str | os.PathLike[str]) -> str:
    """The kind of an image file, from its manifest: "tree" (no kind given) or "rootfs"."""
    if not os.path.isfile(path):
        raise ImageError(f"{path}: no such image file; build one with `rollout image build`")
    return manifest_kind(manifest_bytes(path), str(path))
