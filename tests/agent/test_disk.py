"""The disk backend on real files standing in for partitions: a real rootfs image, real
GRUB environment block, real bytes on the "device". Boots and activations are proven on
QEMU VMs (tests/vm); here: staging, refusals and what reaches the bootloader."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Literal

import pytest

from rollout.agent import grubenv
from rollout.agent import state as sm
from rollout.agent.disk import DiskBackend, DiskConfig, device_id, load_config
from rollout.agent.node import AgentConfig
from rollout.agent.state import AgentError, Slot
from rollout.agent.store import Store
from rollout.errors import InputError
from rollout.rootfs import build_rootfs_image
from tests.helpers import make_tree

pytestmark = pytest.mark.skipif(shutil.which("mkfs.ext4") is None, reason="needs e2fsprogs")
SLOT_SIZE = 16 << 20


def rootfs(tmp: Path, version: str, compatible: str = "test-board") -> Path:
    tree = make_tree(tmp / f"tree-{version}")
    img = build_rootfs_image(
        tree, tmp / f"{version}.img", version=version, name="os",
        compatible=compatible, units=["web.service"], size=8 << 20,
    )  # fmt: skip
    return Path(img.path)


def backend(tmp: Path) -> tuple[DiskBackend, Path, Path]:
    slots: dict[Literal["A", "B"], str] = {}
    names: tuple[Literal["A", "B"], ...] = ("A", "B")
    for name in names:
        path = tmp / f"slot-{name}"
        path.write_bytes(b"\xaa" * SLOT_SIZE)
        slots[name] = str(path)
    env = tmp / "grubenv"
    grubenv.write_file(env, grubenv.disable(grubenv.select_first({}, "A"), "B"))
    disk = DiskConfig(
        listen="127.0.0.1:7000",
        node_id="n1",
        token_file="/x",
        state_dir=str(tmp),
        compatible="test-board",
        slots=slots,
        grubenv=str(env),
        # Its defaults, spelled out: mypy does not see pydantic's positional Field(default).
        commit_deadline=300.0,
        workload_port=8080,
    )
    config = AgentConfig(host="127.0.0.1", port=7000, state_dir=tmp, token="t", node_id="n1",
                         disk=disk)  # fmt: skip
    booted = device_id(Path(slots["A"]))
    b = DiskBackend(config, disk, Store(tmp), is_committed=lambda: True,
                    on_workload_failed=lambda c, r: None, root_id=lambda: booted)  # fmt: skip
    return b, Path(slots["A"]), Path(slots["B"])


async def chunks(path: Path, flip: int | None = None) -> AsyncIterator[bytes]:
    data = bytearray(read(path))
    if flip is not None:
        data[flip] ^= 0xFF
    for i in range(0, len(data), 65536):
        yield bytes(data[i : i + 65536])


def sha(path: Path) -> str:
    return "sha256:" + hashlib.sha256(read(path)).hexdigest()


def read(path: Path) -> bytes:
    return path.read_bytes()


FACTORY = sm.factory_state(sm.SlotImage("sha256:" + "1" * 64, "os", "1"))


async def test_stage_writes_the_filesystem_into_the_inactive_slot(tmp_path: Path) -> None:
    b, slot_a, slot_b = backend(tmp_path)
    image = rootfs(tmp_path, "2")
    a_before = read(slot_a)
    got, size = await b.write_slot(FACTORY, Slot.B, sha(image), chunks(image))
    assert (got.version, got.digest, size) == ("2", sha(image), image.stat().st_size)
    import tarfile

    with tarfile.open(image) as tar:
        fs = tar.extractfile("rootfs.ext4")
        assert fs is not None
        fs_bytes = fs.read()
    assert read(slot_b)[: len(fs_bytes)] == fs_bytes
    assert read(slot_a) == a_before  # the booted slot untouched
    env = grubenv.read_file(Path(b.disk.grubenv))
    assert env["B_OK"] == "0" and grubenv.would_boot(env) == "A"  # not bootable until activated
    assert b.manifest(Slot.B).units == ("web.service",)


async def test_the_booted_device_is_refused_by_identity_not_by_name(tmp_path: Path) -> None:
    b, slot_a, _ = backend(tmp_path)
    alias = tmp_path / "another-name-for-A"
    os.link(slot_a, alias)  # same inode: the same "device" under another name
    disk = b.disk.model_copy(update={"slots": {"A": str(tmp_path / "slot-B"), "B": str(alias)}})
    b.disk = disk
    image = rootfs(tmp_path, "2")
    before = read(slot_a)
    with pytest.raises(AgentError) as err:
        await b.write_slot(FACTORY, Slot.B, sha(image), chunks(image))
    assert err.value.code == "booted_slot"
    assert read(slot_a) == before


async def test_incompatible_image_is_refused_before_a_byte_is_written(tmp_path: Path) -> None:
    b, _, slot_b = backend(tmp_path)
    env_before = read(Path(b.disk.grubenv))
    image = rootfs(tmp_path, "2", compatible="another-board")
    with pytest.raises(AgentError) as err:
        await b.write_slot(FACTORY, Slot.B, sha(image), chunks(image))
    assert err.value.code == "incompatible" and err.value.extra["written"] is False
    b.clear_slot(Slot.B)  # what the runtime does after a failure: nothing to clear
    assert read(slot_b) == b"\xaa" * SLOT_SIZE
    assert read(Path(b.disk.grubenv)) == env_before


async def test_corrupt_bytes_leave_the_slot_wiped_and_unbootable(tmp_path: Path) -> None:
    b, _, slot_b = backend(tmp_path)
    image = rootfs(tmp_path, "2")
    with pytest.raises(AgentError) as err:
        await b.write_slot(FACTORY, Slot.B, sha(image), chunks(image, flip=600_000))
    assert err.value.code in ("bad_image", "digest_mismatch") and err.value.extra["written"]
    b.clear_slot(Slot.B)
    assert read(slot_b)[: 1 << 20] == bytes(1 << 20)
    assert not b.manifest_path(Slot.B).exists()
    assert grubenv.read_file(Path(b.disk.grubenv))["B_OK"] == "0"


async def test_wrong_digest_header_is_a_mismatch(tmp_path: Path) -> None:
    b, _, _ = backend(tmp_path)
    image = rootfs(tmp_path, "2")
    with pytest.raises(AgentError) as err:
        await b.write_slot(FACTORY, Slot.B, "sha256:" + "0" * 64, chunks(image))
    assert err.value.code == "digest_mismatch" and err.value.extra["actual"] == sha(image)


async def test_a_tree_image_is_refused(tmp_path: Path, images: object) -> None:
    from tests.conftest import SampleImages

    assert isinstance(images, SampleImages)
    b, _, _ = backend(tmp_path)
    tree_image = Path(images.v1.path)
    with pytest.raises(AgentError) as err:
        await b.write_slot(FACTORY, Slot.B, images.v1.digest, chunks(tree_image))
    assert err.value.code == "bad_image"


async def test_commit_and_after_boot_write_what_grub_reads(tmp_path: Path) -> None:
    b, _, _ = backend(tmp_path)
    path = Path(b.disk.grubenv)
    grubenv.write_file(path, {"ORDER": "B A", "A_OK": "1", "A_TRY": "0", "B_OK": "1", "B_TRY": "1"})
    on_b = sm.commit(sm.replace(FACTORY, slot_b=FACTORY.slot_a, booted=Slot.B, committed=False))
    await b.commit(on_b)
    assert (
        grubenv.read_file(path)["B_TRY"] == "0"
        and grubenv.would_boot(grubenv.read_file(path)) == "B"
    )
    # An uncommitted boot leaves GRUB's count alone.
    grubenv.write_file(path, {"ORDER": "B A", "A_OK": "1", "A_TRY": "0", "B_OK": "1", "B_TRY": "1"})
    await b.after_boot(sm.replace(on_b, committed=False))
    assert grubenv.would_boot(grubenv.read_file(path)) == "A"


def test_config_errors_name_the_file_and_field(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text("listen: 0.0.0.0:7000\nnode_id: n\ntoken_file: /t\nstate_dir: /s\n"
                   "compatible: c\nslots: {A: /dev/vda2}\n")  # fmt: skip
    with pytest.raises(InputError, match=r"agent.yaml: slots: .*both slots A and B"):
        load_config(cfg)
    cfg.write_text("listen: [\n")
    with pytest.raises(InputError, match="not valid YAML"):
        load_config(cfg)
