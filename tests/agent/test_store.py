"""One-pass staging in the agent's store: hashed, written and unpacked while it arrives.

These drive `Store.receive` directly with an async body, as the HTTP handler does, and
check what is on disk: the verdicts (digest first), members refused mid-stream, nothing
outside the slot, nothing half-installed, the old slot moved aside rather than deleted
inline, and the channel between the event loop and the worker thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import tarfile
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from rollout.agent import state as sm
from rollout.agent.channel import Channel
from rollout.agent.state import AgentError, Slot
from rollout.agent.store import Store
from rollout.image import Manifest, build_image, unpack
from rollout.sample import write_sample_tree
from tests.conftest import SampleImages

CHUNK = 65536


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def body(data: bytes, *, chunk: int = CHUNK) -> AsyncIterator[bytes]:
    for i in range(0, len(data), chunk):
        yield data[i : i + chunk]


def read(path: str | Path) -> bytes:
    return Path(path).read_bytes()


def found(root: Path, name: str) -> list[Path]:
    return list(root.rglob(name))


def files(path: Path) -> list[str]:
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*")) if path.exists() else []


def tar_bytes(members: list[tuple[tarfile.TarInfo, bytes]], manifest: bytes | None = None) -> bytes:
    """A tar with `manifest` (a valid one by default) first, then `members` as given."""
    out = io.BytesIO()
    raw = manifest if manifest is not None else Manifest("evil", "6.6.6", ("true",)).to_json()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("manifest.json")
        info.size = len(raw)
        tar.addfile(info, io.BytesIO(raw))
        for member, data in members:
            if member.isfile():
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
            else:
                tar.addfile(member)
    return out.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    return info


def workers_alive() -> list[str]:
    """Stage worker threads still running after a short grace (a finished worker may
    still be returning from its thread function when its result arrives)."""
    for t in threading.enumerate():
        if t.name.startswith("stage-"):
            t.join(5)
    return [t.name for t in threading.enumerate() if t.name.startswith("stage-")]


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "state")
    s.dir.mkdir()
    return s


async def test_one_pass_gives_the_file_and_the_tree_unpack_would(
    store: Store, images: SampleImages, tmp_path: Path
) -> None:
    src = write_sample_tree(tmp_path / "src")
    (src / "big.bin").write_bytes(bytes(range(256)) * 40000)  # ~10 MiB: many chunks
    (src / "app" / "link").symlink_to("server.py")
    image = build_image(src, tmp_path / "v2.img", version="2.0.0")
    data = read(image.path)
    got, size = await store.receive(Slot.B, image.digest, body(data, chunk=7777))
    assert (got.digest, got.name, got.version) == (image.digest, "sample-web", "2.0.0")
    assert size == len(data)
    assert store.image_path(Slot.B).read_bytes() == data
    expected = tmp_path / "expected"
    unpack(image.path, expected)
    assert files(store.root(Slot.B)) == files(expected)
    assert (store.root(Slot.B) / "big.bin").read_bytes() == (src / "big.bin").read_bytes()
    assert (store.root(Slot.B) / "app" / "link").readlink() == Path("server.py")
    assert not [n for n in files(store.slot_dir(Slot.B)) if ".part" in n]


async def test_a_wrong_digest_installs_nothing(store: Store, images: SampleImages) -> None:
    data = read(images.v2.path)
    with pytest.raises(AgentError) as err:
        await store.receive(Slot.B, "sha256:" + "0" * 64, body(data))
    assert err.value.code == "digest_mismatch" and err.value.extra["actual"] == images.v2.digest
    names = files(store.slot_dir(Slot.B))
    assert "image.tar" not in names and "root" not in names  # only .part files, never in place
    store.clear_slot(Slot.B)  # what the runtime does next
    assert not store.slot_dir(Slot.B).exists()


async def test_the_digest_is_judged_before_the_content(store: Store) -> None:
    """Corrupt and mismatched is a digest_mismatch, as when unpacking came after."""
    data = tar_bytes([(member("../evil"), b"x")])
    with pytest.raises(AgentError) as err:
        await store.receive(Slot.B, "sha256:" + "1" * 64, body(data))
    assert err.value.code == "digest_mismatch"
    with pytest.raises(AgentError) as err:
        await store.receive(Slot.B, digest_of(data), body(data))
    assert err.value.code == "unsafe_image"


async def test_an_escaping_member_ends_unpacking_mid_stream(store: Store, tmp_path: Path) -> None:
    before = [(member(f"early/{i}"), b"e" * 5000) for i in range(20)]
    after = [(member(f"late/{i}"), b"l" * 5000) for i in range(20)]
    data = tar_bytes([*before, (member("../escaped"), b"pwned"), *after])
    with pytest.raises(AgentError) as err:
        await store.receive(Slot.B, digest_of(data), body(data, chunk=4096))
    assert err.value.code == "unsafe_image" and "'..'" in err.value.message
    root_part = store.slot_dir(Slot.B) / "root.part"
    assert [n for n in files(root_part) if n.startswith("early/")]
    assert not [n for n in files(root_part) if n.startswith("late")]  # nothing after it
    assert not (store.slot_dir(Slot.B) / "escaped").exists()
    assert not found(tmp_path, "escaped")
    # The rest of the upload was hashed for the verdict but not copied.
    assert (store.slot_dir(Slot.B) / "image.tar.part").stat().st_size < len(data)


@pytest.mark.parametrize(
    "members",
    [
        # A link that is harmless when made, and one that later makes it point out of
        # the slot: only a check against what is on disk (the "data" filter) sees it.
        [(member("a", tarfile.SYMTYPE, "x/.."), b""), (member("x", tarfile.SYMTYPE, "."), b""),
         (member("a/escaped"), b"pwned")],
        [(member("d", tarfile.SYMTYPE, "/tmp"), b"")],
        [(member("h", tarfile.LNKTYPE, "../../etc/passwd"), b"")],
        [(member("dev", tarfile.CHRTYPE), b"")],
    ],
    ids=["symlink-chain", "absolute-symlink", "hardlink-out", "device"],
)  # fmt: skip
async def test_members_that_escape_are_refused(
    store: Store, tmp_path: Path, members: list[tuple[tarfile.TarInfo, bytes]]
) -> None:
    data = tar_bytes(members)
    with pytest.raises(AgentError) as err:
        await store.receive(Slot.B, digest_of(data), body(data))
    assert err.value.code == "unsafe_image"
    assert not found(tmp_path, "escaped")
    assert not (store.dir / "slots" / "escaped").exists()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"not a tar at all\n" * 100, "not a readable image tar"),
        (tar_bytes([(member("app/x"), b"x")], manifest=b"{not json"), "not valid JSON"),
        (
            tar_bytes([], manifest=json.dumps({"kind": "rootfs"}).encode()),
            "a root-filesystem image (kind rootfs), not a tree image: it is written whole",
        ),
        (b"", "not a readable image tar"),
    ],
    ids=["junk", "bad-manifest", "rootfs", "empty"],
)
async def test_what_is_not_a_tree_image_is_bad_image(
    store: Store, data: bytes, message: str
) -> None:
    with pytest.raises(AgentError) as err:
        await store.receive(Slot.B, digest_of(data), body(data))
    assert err.value.code == "bad_image" and message in err.value.message


async def test_a_manifest_that_is_a_link_is_not_followed(store: Store, tmp_path: Path) -> None:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        raw = Manifest("x", "1", ("true",)).to_json()
        info = member("real.json")
        info.size = len(raw)
        tar.addfile(info, io.BytesIO(raw))
        tar.addfile(member("manifest.json", tarfile.SYMTYPE, "real.json"))
    data = out.getvalue()
    with pytest.raises(AgentError) as err:
        await store.receive(Slot.B, digest_of(data), body(data))
    assert err.value.code == "bad_image" and "not a regular file" in err.value.message


async def test_an_upload_that_breaks_off_stops_the_worker(
    store: Store, images: SampleImages
) -> None:
    data = read(images.v2.path)

    async def broken() -> AsyncIterator[bytes]:
        yield data[: len(data) // 2]
        raise AgentError("upload_incomplete", "the image upload broke off: test")

    with pytest.raises(AgentError) as err:
        await store.receive(Slot.B, images.v2.digest, broken())
    assert err.value.code == "upload_incomplete"
    # The worker has ended (nothing is still writing), so clearing leaves nothing.
    assert not workers_alive()
    store.clear_slot(Slot.B)
    assert not store.slot_dir(Slot.B).exists()


async def test_a_cancelled_upload_waits_for_its_worker(store: Store, images: SampleImages) -> None:
    data = read(images.v2.path)
    held = asyncio.Event()

    async def stalled() -> AsyncIterator[bytes]:
        yield data[:1000]
        held.set()
        await asyncio.Event().wait()  # never ends: the fetch is cancelled (discard)
        yield b""

    task = asyncio.create_task(store.receive(Slot.B, images.v2.digest, stalled()))
    await asyncio.wait_for(held.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not workers_alive()


async def test_the_old_slot_is_moved_aside_not_deleted_inline(
    store: Store, images: SampleImages
) -> None:
    old = store.slot_dir(Slot.B)
    (old / "root" / "deep").mkdir(parents=True)
    (old / "root" / "deep" / "file").write_bytes(b"old image")
    (old / "image.tar").write_bytes(b"old tar")
    data = read(images.v2.path)
    got, _ = await store.receive(Slot.B, images.v2.digest, body(data))
    assert got.version == "2.0.0"
    assert not (store.root(Slot.B) / "deep").exists()
    assert store.image_path(Slot.B).read_bytes() == data
    assert await asyncio.to_thread(store.wait_purged, 10)
    assert list(store.trash_dir.iterdir()) == []


def test_after_a_crash_partial_slots_and_trash_go(store: Store, images: SampleImages) -> None:
    """A crash mid-stage: the state (saved first) calls B empty; its half-written files
    and an old slot that was still being deleted are removed at the next start."""
    image = store.install_file(Slot.A, Path(images.v1.path))
    state = sm.begin_stage(sm.factory_state(image), Slot.B)
    store.save(state)
    (store.slot_dir(Slot.B) / "root.part" / "app").mkdir(parents=True)
    (store.slot_dir(Slot.B) / "image.tar.part").write_bytes(b"half")
    (store.trash_dir / "B-leftover" / "root").mkdir(parents=True)
    loaded = store.load()
    assert loaded is not None and loaded.slot(Slot.B) is None
    removed = store.remove_partial(loaded)
    assert str(store.slot_dir(Slot.B)) in removed
    assert not store.slot_dir(Slot.B).exists()
    assert store.wait_purged(10)
    assert list(store.trash_dir.iterdir()) == []
    assert store.manifest(Slot.A).version == "1.0.0"  # the booted slot untouched


async def test_channel_applies_back_pressure_and_resumes() -> None:
    channel = Channel(limit=4 * CHUNK)
    for _ in range(4):
        assert await asyncio.wait_for(channel.send(b"x" * CHUNK), 5)
    blocked = asyncio.create_task(channel.send(b"y" * CHUNK))
    await asyncio.sleep(0)  # one loop turn: the send found the queue full and waits
    assert not blocked.done()
    taken = await asyncio.to_thread(lambda: [channel.take() for _ in range(2)])
    assert taken == [b"x" * CHUNK] * 2
    assert await asyncio.wait_for(blocked, 5)  # woken once half the queue was taken
    channel.close()
    rest = await asyncio.to_thread(lambda: [channel.take() for _ in range(4)])
    assert rest == [b"x" * CHUNK, b"x" * CHUNK, b"y" * CHUNK, None]


async def test_channel_stop_and_fail() -> None:
    channel = Channel(limit=CHUNK)
    assert await channel.send(b"a" * CHUNK)
    waiting = asyncio.create_task(channel.send(b"b"))
    await asyncio.sleep(0)
    await asyncio.to_thread(channel.stop)  # the worker gave up: the waiting send is told
    assert await asyncio.wait_for(waiting, 5) is False
    assert await channel.send(b"c") is False

    failing = Channel()
    assert await failing.send(b"queued")
    failing.fail(AgentError("upload_incomplete", "gone"))
    with pytest.raises(AgentError, match="gone"):
        await asyncio.to_thread(failing.take)
