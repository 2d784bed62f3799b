"""A node's disk, assembled from files: no loop devices, no grub-install.

Layout (MBR partition table, disk identifier `guest.DISK_ID`)::

    sector 0          GRUB boot.img (the first 440 bytes; the partition table kept)
    sectors 1..2047   GRUB core.img (biosdisk, part_msdos, ext2; prefix (hd0,msdos1)/)
    partition 1       boot: GRUB modules, grub.cfg, grubenv (ext4; /boot/grub in the guest)
    partition 2       slot A: a whole root filesystem (ext4)
    partition 3       slot B: same size as A
    partition 4       data: the agent's config, token and state (ext4; /var/lib/rollout)

`grub-install` cannot write to this host's loop devices and `losetup -P` makes no
partition nodes, so the disk is written as a plain file: `sfdisk` writes the partition
table into it, each filesystem is made with `mkfs.ext4 -d` in a file of its own and
copied to its partition's offset, and GRUB's boot.img/core.img go into the first sectors
(boot.img's default pointer to core.img at sector 1 needs no patching on an MBR disk).

The base disk (boot partition and slot A filled, B empty, data empty) is built once per
image and cached; each VM gets a qcow2 overlay of it, and its own data partition is
written into the overlay with `qemu-io` (the node id, token and agent config differ per
node).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from rollout.agent import grubenv
from rollout.errors import InputError
from rollout.rootfs import EXT4_FEATURES
from rollout.vm import guest

MIB = 1 << 20
SECTOR = 512
GRUB_DIR = Path("/usr/lib/grub/i386-pc")
GRUB_CFG = Path(__file__).resolve().parent.parent / "agent" / "grub.cfg"


@dataclass(frozen=True)
class Layout:
    """Partition sizes in MiB; offsets follow from them (1 MiB for GRUB first)."""

    boot: int = 32
    slot: int = 768
    data: int = 64

    def parts(self) -> list[tuple[str, int, int]]:
        """(name, offset bytes, size bytes) of partitions 1-4."""
        out, start = [], 1
        for name, size in (("boot", self.boot), ("A", self.slot), ("B", self.slot),
                           ("data", self.data)):  # fmt: skip
            out.append((name, start * MIB, size * MIB))
            start += size
        return out

    def offset(self, name: str) -> tuple[int, int]:
        for n, off, size in self.parts():
            if n == name:
                return off, size
        raise KeyError(name)

    @property
    def total(self) -> int:
        return (1 + self.boot + 2 * self.slot + self.data) * MIB


def _run(args: list[str], what: str, stdin: str | None = None) -> None:
    done = subprocess.run(args, input=stdin, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise InputError(f"{what}: {' '.join(args[:3])} failed: {done.stderr.strip()[-800:]}")


def mkfs(dest: Path, size: int, tree: Path | None, label: str) -> None:
    """An ext4 filesystem image file of `size` bytes holding `tree` (GRUB-readable features)."""
    dest.unlink(missing_ok=True)
    with open(dest, "wb") as fh:
        fh.truncate(size)
    args = ["mkfs.ext4", "-q", "-F", "-L", label, "-O", EXT4_FEATURES, "-E", "root_owner=0:0"]
    if tree is not None:
        args += ["-d", str(tree)]
    _run([*args, str(dest)], f"making the {label} filesystem")


def _copy_into(
    disk: Path, src: Path | tarfile.TarFile, offset: int, size: int, member: str = ""
) -> None:
    with open(disk, "r+b") as out:
        out.seek(offset)
        if isinstance(src, Path):
            fh = open(src, "rb")
        else:
            extracted = src.extractfile(member)
            if extracted is None:
                raise InputError(f"{member}: not a file in the image")
            fh = extracted  # type: ignore[assignment]
        with fh:
            left = size
            while left > 0 and (chunk := fh.read(min(left, 4 * MIB))):
                out.write(chunk)
                left -= len(chunk)


def boot_tree(dest: Path) -> Path:
    """The boot partition's files: GRUB modules, grub.cfg and grubenv (slot A good)."""
    mods = dest / "i386-pc"
    mods.mkdir(parents=True, exist_ok=True)
    for f in GRUB_DIR.iterdir():
        if f.suffix in (".mod", ".lst"):
            shutil.copy2(f, mods / f.name)
    shutil.copy2(GRUB_CFG, dest / "grub.cfg")
    env = grubenv.disable(grubenv.select_first({}, "A"), "B")
    (dest / "grubenv").write_bytes(grubenv.render(env))
    return dest


def build_base(image_path: Path, dest: Path, layout: Layout = Layout()) -> Path:
    """A raw disk with GRUB, the boot partition and slot A = `image_path`'s filesystem."""
    guest.need("sfdisk", package="fdisk")
    guest.need("grub-mkimage", package="grub-pc-bin")
    guest.need("mkfs.ext4", package="e2fsprogs")
    if not (GRUB_DIR / "boot.img").exists():
        raise InputError(
            f"{GRUB_DIR}/boot.img missing; install it (Debian: apt-get install grub-pc-bin)"
        )
    from rollout.rootfs import ROOTFS_MEMBER, read_image_manifest

    manifest = read_image_manifest(image_path)
    if manifest.rootfs.size > layout.slot * MIB:
        raise InputError(
            f"{image_path}: its filesystem is {manifest.rootfs.size} bytes, more than a "
            f"{layout.slot} MiB slot"
        )
    part = dest.with_name(dest.name + ".part")
    part.unlink(missing_ok=True)
    with open(part, "wb") as fh:
        fh.truncate(layout.total)
    table = ["label: dos", f"label-id: 0x{guest.DISK_ID}", "unit: sectors", ""]
    for i, (_, off, size) in enumerate(layout.parts(), start=1):
        boot = ", bootable" if i == 1 else ""
        table.append(f"start={off // SECTOR}, size={size // SECTOR}, type=83{boot}")
    _run(
        ["sfdisk", "--no-reread", "--no-tell-kernel", str(part)],
        "partitioning",
        "\n".join(table) + "\n",
    )
    with tempfile.TemporaryDirectory(prefix="rollout-disk-") as tmp:
        work = Path(tmp)
        core = work / "core.img"
        _run(
            ["grub-mkimage", "-O", "i386-pc", "-o", str(core), "-p", "(hd0,msdos1)/",
             "biosdisk", "part_msdos", "ext2"],
            "making GRUB's core.img",
        )  # fmt: skip
        if core.stat().st_size > MIB - SECTOR:
            raise InputError("GRUB's core.img does not fit before the first partition")
        with open(part, "r+b") as out:
            out.write((GRUB_DIR / "boot.img").read_bytes()[:440])
            out.seek(SECTOR)
            out.write(core.read_bytes())
        off, size = layout.offset("boot")
        boot_fs = work / "boot.ext4"
        mkfs(boot_fs, size, boot_tree(work / "boot"), "boot")
        _copy_into(part, boot_fs, off, size)
        off, size = layout.offset("data")
        data_fs = work / "data.ext4"
        mkfs(data_fs, size, None, "data")
        _copy_into(part, data_fs, off, size)
    off, _ = layout.offset("A")
    with tarfile.open(image_path, "r:") as tar:
        _copy_into(part, tar, off, manifest.rootfs.size, ROOTFS_MEMBER)
    part.replace(dest)
    return dest


def data_partition(dest: Path, files: dict[str, bytes | str], layout: Layout = Layout()) -> Path:
    """A data filesystem image holding `files` (relative path -> content; mode 0600)."""
    with tempfile.TemporaryDirectory(prefix="rollout-data-") as tmp:
        tree = Path(tmp) / "tree"
        tree.mkdir(mode=0o700)
        for rel, content in files.items():
            path = tree / rel
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            path.write_bytes(content.encode() if isinstance(content, str) else content)
            path.chmod(0o600)
        mkfs(dest, layout.data * MIB, tree, "data")
    return dest


def overlay(base: Path, dest: Path, data: Path | None, layout: Layout = Layout()) -> Path:
    """A qcow2 overlay of `base` for one VM, with its data partition written into it."""
    guest.need("qemu-img", "qemu-io", package="qemu-utils")
    dest.unlink(missing_ok=True)
    _run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(base), str(dest)],
         "making the VM disk")  # fmt: skip
    if data is not None:
        off, size = layout.offset("data")
        _run(["qemu-io", "-f", "qcow2", "-c", f"write -q -s {data} {off} {size}", str(dest)],
             "writing the data partition")  # fmt: skip
    return dest


def describe(layout: Layout = Layout()) -> str:
    return json.dumps({n: {"offset": o, "size": s} for n, o, s in layout.parts()})
