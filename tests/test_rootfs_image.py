"""Root-filesystem images: real mkfs.ext4 builds, one-pass stream reading over a real pipe,
and every malformed layout refused with its code."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import pytest
from click.testing import CliRunner

from rollout.cli import main
from rollout.errors import ImageError
from rollout.image import build_image, load_image, read_manifest
from rollout.rootfs import (
    MAX_MANIFEST,
    BootSpec,
    RootfsManifest,
    RootfsSpec,
    RootfsStreamError,
    copy_rootfs,
    default_size,
    image_kind,
    load_rootfs_image,
    parse_size,
    read_image_manifest,
    read_rootfs_manifest,
    resolve_in_tree,
    tree_size,
    used_inodes,
)
from rollout.sample import write_sample_tree
from tests.helpers import INITRD, KERNEL, MIB, SIZE, build, make_tree

E2FS = "/usr/sbin:/sbin:" + os.environ.get("PATH", "")

pytestmark = pytest.mark.skipif(
    shutil.which("mkfs.ext4", path=E2FS) is None, reason="needs e2fsprogs (mkfs.ext4, debugfs)"
)


def ext4_bytes(image: Path) -> bytes:
    with tarfile.open(image, "r:") as tar:
        fh = tar.extractfile("rootfs.ext4")
        assert fh is not None
        return fh.read()


def e2fs(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, capture_output=True, text=True, env={**os.environ, "PATH": E2FS}, check=False
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("rootfs")
    tree = make_tree(base / "tree")
    _, image = build(tree, base / "v1.img", units=["sample-web.service", "multi-user.target"])
    return tree, image


# -- building -------------------------------------------------------------------------------
def test_build_puts_the_tree_in_an_ext4_filesystem(
    built: tuple[Path, Path], tmp_path: Path
) -> None:
    _, image = built
    with tarfile.open(image, "r:") as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == ["manifest.json", "rootfs.ext4"]
    assert all(m.isreg() and m.mtime == 0 and m.uid == 0 and m.gid == 0 for m in members)

    fs = ext4_bytes(image)
    manifest = read_image_manifest(image)
    assert manifest.rootfs == RootfsSpec("ext4", SIZE, "sha256:" + hashlib.sha256(fs).hexdigest())
    assert len(fs) == SIZE
    assert manifest.units == ("sample-web.service", "multi-user.target")
    assert manifest.boot == BootSpec("vmlinuz", "initrd.img")
    assert load_image(image).digest == "sha256:" + hashlib.sha256(image.read_bytes()).hexdigest()

    raw = tmp_path / "rootfs.ext4"
    raw.write_bytes(fs)
    cat = e2fs("debugfs", "-R", "cat /etc/hostname", str(raw))
    assert cat.stdout == "rootfs-test\n", cat.stderr
    assert e2fs("debugfs", "-R", f"cat /{KERNEL}", str(raw)).stdout == "not really a kernel\n"
    link = e2fs("debugfs", "-R", "stat /vmlinuz", str(raw)).stdout
    assert f'Fast link dest: "{KERNEL}"' in link
    assert e2fs("e2fsck", "-fn", str(raw)).returncode == 0
    header = e2fs("dumpe2fs", "-h", str(raw)).stdout
    assert "Filesystem volume name:   rootfs" in header
    assert str(uuid.uuid5(uuid.uuid5(uuid.NAMESPACE_URL, "https://rollout.invalid/rootfs"),
                          "sample-os\n1.0.0")) in header  # fmt: skip


def test_build_is_reproducible_from_a_fresh_copy_of_the_tree(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    first, _ = build(tree, tmp_path / "a.img")
    # What mkfs.ext4 -d copies from the build host but no tree should decide: atimes (a
    # read moves them) and ctimes (a copy, or any chmod, makes new ones).
    for path in (tree / "etc" / "hostname", tree / KERNEL):
        os.utime(path, (12345, path.stat().st_mtime))
    time.sleep(1.1)
    copy = tmp_path / "copy"
    shutil.copytree(tree, copy, symlinks=True)
    again, _ = build(tree, tmp_path / "b.img")
    from_copy, _ = build(copy, tmp_path / "c.img")
    assert first == again == from_copy
    other, _ = build(tree, tmp_path / "d.img", version="1.0.1")
    assert other != first
    (copy / "etc" / "hostname").write_text("changed\n")
    changed, _ = build(copy, tmp_path / "e.img")
    assert changed != first


def test_default_size_is_tree_size_plus_a_fifth_plus_64_mib(tmp_path: Path) -> None:
    assert default_size(0) == 64 * MIB
    assert default_size(1) == 68 * MIB
    assert default_size(10 * MIB) == 76 * MIB  # 12 + 64 = 76, a multiple of 4
    assert default_size(11 * MIB) == 80 * MIB  # 13.2 + 64 rounds up to 80
    tree = make_tree(tmp_path / "tree")
    (tree / "big").write_bytes(b"x" * (3 * MIB))
    os.link(tree / "big", tree / "big-again")  # a hard link is counted once
    assert 3 * MIB < tree_size(tree) < 3 * MIB + 64 * 1024
    _, image = build(tree, tmp_path / "x.img", size=None)
    assert read_image_manifest(image).rootfs.size == 68 * MIB == default_size(tree_size(tree))


def test_tree_without_the_kernel_is_refused(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    (tree / "vmlinuz").unlink()
    out = tmp_path / "x.img"
    with pytest.raises(ImageError, match=r"boot\.kernel 'vmlinuz' is not a file.*--kernel"):
        build(tree, out)
    assert not out.exists() and not (tmp_path / "x.img.part").exists()
    # A link to a path the host has but the tree lacks: resolved in the tree, so refused.
    assert Path("/etc/passwd").is_file()
    (tree / "vmlinuz").symlink_to("/etc/passwd")
    with pytest.raises(ImageError, match="/etc/passwd does not exist in the tree"):
        build(tree, out)
    with pytest.raises(ImageError, match=r"boot\.initrd: '\.\./initrd': '\.\.'"):
        build(tree, out, kernel=KERNEL, initrd="../initrd")
    _, image = build(tree, out, kernel=KERNEL)
    assert read_image_manifest(image).boot.kernel == KERNEL


def test_symlinks_resolve_with_the_tree_as_root(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    (tree / "up").symlink_to("../../../../../" + KERNEL)  # `..` stops at the tree's root
    (tree / "etc" / "k").symlink_to("../vmlinuz")
    (tree / "loop").symlink_to("loop")
    assert resolve_in_tree(tree, "up")[0] == tree / KERNEL
    assert resolve_in_tree(tree, "etc/k") == (tree / KERNEL, "/" + KERNEL)
    assert resolve_in_tree(tree, "initrd.img")[0] == tree / INITRD
    assert resolve_in_tree(tree, "loop")[0] is None
    assert resolve_in_tree(tree, "boot") == (None, "/boot is not a regular file")


def test_mkfs_failure_is_an_image_error_with_its_stderr(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    (tree / "big").write_bytes(os.urandom(MIB))
    out = tmp_path / "out" / "x.img"
    with pytest.raises(ImageError, match=r"mkfs\.ext4 failed: .+bigger size"):
        build(tree, out, size=1 * MIB)
    assert list(out.parent.iterdir()) == []  # no image, no .part, no temporary filesystem
    with pytest.raises(ImageError, match="multiple of 4096"):
        build(tree, out, size=SIZE + 1)
    with pytest.raises(ImageError, match="inside the tree"):
        build(tree, tree / "x.img")


def test_used_inodes_reads_dumpe2fs_free_ranges() -> None:
    dump = (
        "Inode count:              12\nInodes per group:         4\nFirst inode:              3\n"
        "Group 0: (Blocks 0-9)\n  Free inodes: 4\n"
        "Group 1: (Blocks 10-19)\n  Free inodes: \n"
        "Group 2: (Blocks 20-29)\n  Free inodes: 9, 11-12\n"
    )
    assert list(used_inodes(dump)) == [2, 3, 5, 6, 7, 8, 10]
    with pytest.raises(ImageError, match="wrong number of groups"):
        list(used_inodes(dump.replace("  Free inodes: \n", "")))


# -- the manifest ---------------------------------------------------------------------------
def manifest(**kw: object) -> RootfsManifest:
    fields: dict[str, object] = {
        "name": "sample-os",
        "version": "1",
        "compatible": "rollout-vm-x86_64",
        "rootfs": RootfsSpec("ext4", len(PAYLOAD), sha(PAYLOAD)),
        "units": ("sample-web.service",),
    }
    fields.update(kw)
    return RootfsManifest(**fields)  # type: ignore[arg-type]


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


PAYLOAD = b"pretend this is ext4 " * 3000


def edited(**changes: object) -> bytes:
    body = json.loads(manifest().to_json())
    for dotted, value in changes.items():
        *path, key = dotted.split("__")
        target = body
        for p in path:
            target = target[p]
        if value is None:
            del target[key]
        else:
            target[key] = value
    return json.dumps(body).encode()


def test_manifest_round_trips_and_defaults_boot() -> None:
    m = manifest(boot=BootSpec("boot/vmlinuz-6.1", "boot/initrd.img-6.1"))
    assert read_rootfs_manifest(m.to_json(), "x") == m
    assert json.loads(m.to_json())["kind"] == "rootfs"
    assert read_rootfs_manifest(edited(boot=None), "x").boot == BootSpec("vmlinuz", "initrd.img")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"rootfs__digest": "md5:abc"},
            "x: manifest.json: rootfs.digest: expected sha256:<64 hex>",
        ),
        ({"rootfs__digest": "sha256:" + "A" * 64}, "rootfs.digest: expected sha256:<64 hex>"),
        ({"rootfs__size": -1}, "rootfs.size: expected a positive integer"),
        ({"rootfs__size": True}, "rootfs.size: expected a positive integer"),
        ({"rootfs__type": "xfs"}, "rootfs.type: expected 'ext4'"),
        ({"rootfs": None}, "rootfs: expected an object"),
        ({"kind": None}, "kind: expected 'rootfs'"),
        ({"format": 2}, "format: expected 1"),
        ({"compatible": ""}, "compatible: expected a non-empty string"),
        ({"name": 3}, "name: expected a non-empty string"),
        ({"workload__units": []}, "workload.units: expected a non-empty list"),
        ({"workload__units": ["web"]}, "workload.units: 'web' is not a systemd unit name"),
        ({"workload__units": ["a b.service"]}, "'a b.service' is not a systemd unit name"),
        ({"workload": None}, "workload: expected an object with units"),
        (
            {"boot__kernel": "/boot/vmlinuz"},
            "boot.kernel: '/boot/vmlinuz': expected a path relative",
        ),
        ({"boot__initrd": "boot/../../x"}, "boot.initrd: 'boot/../../x': '..' components"),
    ],
)
def test_manifest_errors_name_the_field(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ImageError, match=r"^x: manifest\.json: ") as exc:
        read_rootfs_manifest(edited(**changes), "x")
    assert message in str(exc.value)


# -- streaming ------------------------------------------------------------------------------
def member(
    name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = ""
) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data


def tar_of(*members: tuple[tarfile.TarInfo, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


GOOD = (member("manifest.json", manifest().to_json()), member("rootfs.ext4", PAYLOAD))


class Recorder:
    def __init__(self) -> None:
        self.events: list[str] = []
        self.data = bytearray()

    def check(self, m: RootfsManifest) -> None:
        self.events.append("check")

    def sink(self, data: bytes) -> None:
        self.events.append("sink")
        self.data.extend(data)


@pytest.fixture
def pipe() -> Iterator[Callable[[bytes], BinaryIO]]:
    """Feed bytes through a real os.pipe from a writer thread: a non-seekable stream."""
    opened: list[tuple[BinaryIO, threading.Thread]] = []

    def feed(data: bytes) -> BinaryIO:
        r, w = os.pipe()

        def write() -> None:
            try:
                with os.fdopen(w, "wb") as fh:
                    for i in range(0, len(data), 65536):
                        fh.write(data[i : i + 65536])
            except BrokenPipeError:
                pass  # the reader stopped early, as a refusal does

        thread = threading.Thread(target=write, daemon=True)
        thread.start()
        stream = os.fdopen(r, "rb")
        opened.append((stream, thread))
        return stream

    yield feed
    for stream, thread in opened:
        stream.close()
        thread.join(timeout=10)
        assert not thread.is_alive()


def test_copy_over_a_pipe_writes_exactly_the_filesystem_bytes(
    built: tuple[Path, Path], pipe: Callable[[bytes], BinaryIO]
) -> None:
    _, image = built
    stream = pipe(image.read_bytes())
    assert not stream.seekable()
    rec = Recorder()
    got = copy_rootfs(stream, check=rec.check, sink=rec.sink, chunk=256 * 1024)
    assert got == read_image_manifest(image)
    assert bytes(rec.data) == ext4_bytes(image)
    assert rec.events[0] == "check" and rec.events.count("check") == 1
    assert rec.events.count("sink") == SIZE // (256 * 1024)
    assert stream.read() == b""  # read to its end: the caller can hash the whole file


def test_check_refusing_stops_before_any_byte_reaches_the_sink(
    built: tuple[Path, Path], pipe: Callable[[bytes], BinaryIO]
) -> None:
    _, image = built
    refusal = RootfsStreamError("incompatible", "this node is rollout-arm64")
    seen: list[RootfsManifest] = []

    def check(m: RootfsManifest) -> None:
        seen.append(m)
        raise refusal

    sunk: list[bytes] = []
    with pytest.raises(RootfsStreamError) as exc:
        copy_rootfs(pipe(image.read_bytes()), check=check, sink=sunk.append)
    assert exc.value is refusal and exc.value.code == "incompatible"
    assert [m.compatible for m in seen] == ["rollout-vm-x86_64"]
    assert sunk == []

    class TooSmall(Exception):
        pass

    def small(m: RootfsManifest) -> None:
        raise TooSmall(m.rootfs.size)

    with pytest.raises(TooSmall):
        copy_rootfs(pipe(image.read_bytes()), check=small, sink=sunk.append)
    assert sunk == []


def test_a_flipped_filesystem_byte_is_a_bad_image(built: tuple[Path, Path], tmp_path: Path) -> None:
    _, image = built
    data = bytearray(image.read_bytes())
    with tarfile.open(image, "r:") as tar:
        offset = tar.getmember("rootfs.ext4").offset_data
    data[offset + 1024] ^= 0x01  # in the superblock
    want = read_image_manifest(image).rootfs.digest
    got = sha(ext4_bytes_of(bytes(data)))
    rec = Recorder()
    with pytest.raises(RootfsStreamError) as exc:
        copy_rootfs(io.BytesIO(bytes(data)), check=rec.check, sink=rec.sink)
    assert exc.value.code == "bad_image"
    assert want in str(exc.value) and got in str(exc.value)
    flipped = tmp_path / "flipped.img"
    flipped.write_bytes(data)
    with pytest.raises(RootfsStreamError, match="digest mismatch"):
        load_image(flipped)


def ext4_bytes_of(image: bytes) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(image), mode="r:") as tar:
        fh = tar.extractfile("rootfs.ext4")
        assert fh is not None
        return fh.read()


def test_a_well_formed_handmade_image_is_accepted(pipe: Callable[[bytes], BinaryIO]) -> None:
    rec = Recorder()
    assert copy_rootfs(pipe(tar_of(*GOOD)), check=rec.check, sink=rec.sink) == manifest()
    assert bytes(rec.data) == PAYLOAD


def test_the_stream_is_read_to_its_end(pipe: Callable[[bytes], BinaryIO], tmp_path: Path) -> None:
    # GNU tar pads to its record size; more zeros than tarfile reads ahead must be read too.
    padded = tar_of(*GOOD) + bytes(3 * MIB)
    stream = pipe(padded)
    copy_rootfs(stream, check=lambda m: None, sink=lambda b: None, chunk=64 * 1024)
    assert stream.read() == b""
    path = tmp_path / "padded.img"
    path.write_bytes(padded)
    assert load_image(path).digest == sha(padded)


M, R = GOOD
SIZE_OFF = member("manifest.json", manifest(rootfs=RootfsSpec("ext4", 1, sha(PAYLOAD))).to_json())
DIGEST_OFF = member(
    "manifest.json", manifest(rootfs=RootfsSpec("ext4", len(PAYLOAD), sha(b""))).to_json()
)


@pytest.mark.parametrize(
    ("image", "code", "message"),
    [
        (tar_of(M, R, member("extra.txt", b"x")), "bad_image", "unexpected member 'extra.txt'"),
        (tar_of(R, M), "bad_image", "first member is 'rootfs.ext4', expected 'manifest.json'"),
        (tar_of(R), "bad_image", "first member is 'rootfs.ext4'"),
        (tar_of(M), "bad_image", "no rootfs.ext4 as the second member"),
        (tar_of(), "bad_image", "no manifest.json as the first member"),
        (b"", "bad_image", "not a tar archive"),
        (b"junk" * 1000, "bad_image", "not a tar archive"),
        (tar_of(M, member("rootfs.ext4", kind=tarfile.SYMTYPE, link="/dev/sda")), "unsafe_image",
         "'rootfs.ext4': a link (to '/dev/sda')"),
        (tar_of(M, R, member("x", kind=tarfile.SYMTYPE, link="/")), "unsafe_image", "a link"),
        (tar_of(M, member("rootfs.ext4", kind=tarfile.LNKTYPE, link="manifest.json")),
         "unsafe_image", "a link"),
        (tar_of(M, member("rootfs.ext4", kind=tarfile.BLKTYPE)), "unsafe_image", "not a regular"),
        (tar_of(member("manifest.json", kind=tarfile.DIRTYPE)), "unsafe_image", "not a regular"),
        (tar_of(member("/manifest.json", M[1]), R), "unsafe_image", "absolute or '..'"),
        (tar_of(SIZE_OFF, R), "bad_image",
         f"rootfs.ext4 is {len(PAYLOAD)} bytes but manifest.json says rootfs.size 1"),
        (tar_of(DIGEST_OFF, R), "bad_image", "digest mismatch"),
        (tar_of(member("manifest.json", b" " * (MAX_MANIFEST + 1)), R), "bad_image",
         f"at most {MAX_MANIFEST}"),
        (tar_of(member("manifest.json", b"{}"), R), "bad_image", "format: expected 1"),
        (tar_of(M, R)[: len(tar_of(M, R)) // 2], "bad_image", "truncated"),
    ],
    ids=["extra", "order", "no-manifest", "no-rootfs", "empty-tar", "empty", "junk", "symlink",
         "extra-symlink", "hardlink", "device", "directory", "absolute", "size", "digest",
         "big-manifest", "bad-manifest", "truncated"],
)  # fmt: skip
def test_malformed_images_are_refused_with_a_code(
    image: bytes, code: str, message: str, pipe: Callable[[bytes], BinaryIO]
) -> None:
    rec = Recorder()
    with pytest.raises(RootfsStreamError) as exc:
        copy_rootfs(pipe(image), check=rec.check, sink=rec.sink)
    assert exc.value.code == code
    assert message in str(exc.value)
    refused_after_data = ("unexpected member", "digest mismatch", "truncated", "'x': a link")
    if not any(m in str(exc.value) for m in refused_after_data):
        assert rec.data == b""


def test_stream_error_codes_are_bounded() -> None:
    assert isinstance(RootfsStreamError("too_large", "slot is 1 GiB"), ImageError)
    with pytest.raises(ValueError, match="unknown"):
        RootfsStreamError("oops", "x")  # type: ignore[arg-type]


# -- kinds ----------------------------------------------------------------------------------
def test_kind_tells_tree_and_rootfs_images_apart(built: tuple[Path, Path], tmp_path: Path) -> None:
    _, image = built
    tree_img = build_image(write_sample_tree(tmp_path / "src"), tmp_path / "tree.img", version="1")
    assert image_kind(image) == "rootfs"
    assert image_kind(tree_img.path) == "tree"
    rimg, m = load_rootfs_image(image)
    assert rimg == load_image(image)
    assert (rimg.name, rimg.version, rimg.size) == ("sample-os", "1.0.0", image.stat().st_size)
    assert m == read_image_manifest(image)
    with pytest.raises(ImageError, match=r"a root-filesystem image .* not unpacked"):
        read_manifest(image)
    with pytest.raises(ImageError, match="a tree image, not a root-filesystem image"):
        read_image_manifest(tree_img.path)
    odd = tmp_path / "odd.img"
    odd.write_bytes(tar_of(member("manifest.json", b'{"kind": "zfs"}')))
    with pytest.raises(ImageError, match="kind: expected one of tree, rootfs, got 'zfs'"):
        image_kind(odd)
    with pytest.raises(ImageError, match="no such image file"):
        image_kind(tmp_path / "missing.img")


# -- the command line -----------------------------------------------------------------------
def cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_cli_builds_and_inspects_a_rootfs_image(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    out = tmp_path / "v2.img"
    code, stdout, stderr = cli(
        "image", "build", str(tree), "--version", "2.0.0", "--output", str(out), "--rootfs",
        "--compatible", "rollout-vm-x86_64", "--unit", "sample-web.service",
        "--unit", "multi-user.target", "--size", "16M", "--name", "sample-os",
    )  # fmt: skip
    assert code == 0, stderr
    assert stdout.strip() == "sha256:" + hashlib.sha256(out.read_bytes()).hexdigest()
    code, stdout, stderr = cli("image", "inspect", str(out))
    assert code == 0, stderr
    shown = json.loads(stdout)
    fs = ext4_bytes(out)
    assert shown == {
        "name": "sample-os",
        "version": "2.0.0",
        "size": out.stat().st_size,
        "digest": sha(out.read_bytes()),
        "kind": "rootfs",
        "compatible": "rollout-vm-x86_64",
        "rootfs": {"type": "ext4", "size": SIZE, "digest": sha(fs)},
        "boot": {"kernel": "vmlinuz", "initrd": "initrd.img"},
        "units": ["sample-web.service", "multi-user.target"],
    }


def test_cli_inspect_of_a_tree_image_is_unchanged(tmp_path: Path) -> None:
    img = build_image(write_sample_tree(tmp_path / "src"), tmp_path / "t.img", version="1")
    code, stdout, _ = cli("image", "inspect", img.path)
    assert code == 0
    assert json.loads(stdout) == {"name": img.name, "version": "1", "size": img.size,
                                  "digest": img.digest}  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rootfs", "--unit", "a.service"], "--rootfs: needs --compatible"),
        (["--rootfs", "--compatible", "c"], "--rootfs: needs --unit NAME"),
        (["--compatible", "c", "--workload", "true"], "--compatible: only for root-filesystem"),
        (["--unit", "a.service", "--size", "1G", "--workload", "true"],
         "--unit, --size: only for root-filesystem images; add --rootfs"),
        (["--rootfs", "--compatible", "c", "--unit", "a.service", "--workload", "x"],
         "--workload: only for tree images"),
        (["--rootfs", "--compatible", "c", "--unit", "a.service", "--size", "12Q"],
         "--size: '12Q': expected bytes or a number with K, M, G or T"),
        (["--rootfs", "--compatible", "c", "--unit", "web"], "'web' is not a systemd unit name"),
        (["--rootfs", "--compatible", "c", "--unit", "a.service", "--kernel", "nope"],
         "boot.kernel 'nope' is not a file in the tree"),
    ],
)  # fmt: skip
def test_cli_bad_rootfs_options_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    tree = make_tree(tmp_path / "tree")
    out = tmp_path / "x.img"
    code, _, stderr = cli("image", "build", str(tree), "--version", "1", "--output", str(out),
                          *args)  # fmt: skip
    assert code == 2
    assert message in stderr
    assert not out.exists()


def test_parse_size() -> None:
    assert parse_size("4096") == 4096
    assert parse_size("512M") == 512 * MIB
    assert parse_size("2g") == 2 << 30
    assert parse_size("64MiB") == 64 * MIB
    for bad in ("", "M", "1.5G", "12Q", "-1"):
        with pytest.raises(ValueError):
            parse_size(bad)
