"""Image building and unpacking: digests, reproducibility, and members that escape."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from rollout.errors import ImageError
from rollout.image import Manifest, build_image, load_image, read_manifest, unpack
from rollout.sample import write_sample_tree


def test_build_is_reproducible_and_digest_is_sha256_of_file(tmp_path: Path) -> None:
    import hashlib

    src = write_sample_tree(tmp_path / "src")
    a = build_image(src, tmp_path / "a.img", version="1")
    b = build_image(src, tmp_path / "b.img", version="1")
    c = build_image(src, tmp_path / "c.img", version="2")
    assert a.digest == b.digest != c.digest
    assert a.digest == "sha256:" + hashlib.sha256(Path(a.path).read_bytes()).hexdigest()
    assert read_manifest(a.path).command == ("python3", "app/server.py")
    assert load_image(c.path).version == "2"


def test_build_needs_a_workload(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    with pytest.raises(ImageError, match="no workload command"):
        build_image(tmp_path / "src", tmp_path / "x.img", version="1")


def test_build_refuses_link_out_but_keeps_link_in(tmp_path: Path) -> None:
    src = write_sample_tree(tmp_path / "src")
    (src / "app" / "inside").symlink_to("server.py")
    (src / "up").symlink_to("app/../etc/motd")
    img = build_image(src, tmp_path / "ok.img", version="1")
    dest = tmp_path / "root"
    unpack(img.path, dest)
    assert (dest / "app" / "inside").read_text() == (src / "app" / "server.py").read_text()
    (src / "app" / "out").symlink_to("../../outside")
    with pytest.raises(ImageError, match="points outside"):
        build_image(src, tmp_path / "bad.img", version="1")


def _evil_tar(path: Path, member: tarfile.TarInfo, data: bytes = b"x") -> None:
    manifest = Manifest("evil", "1", ("true",)).to_json()
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("manifest.json")
        info.size = len(manifest)
        tar.addfile(info, io.BytesIO(manifest))
        if member.isfile():
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
        else:
            tar.addfile(member)


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    return info


@pytest.mark.parametrize(
    ("member", "message"),
    [
        (_member("/etc/evil"), "absolute"),
        (_member("../evil"), "'..'"),
        (_member("a/../../evil"), "'..'"),
        (_member("link", tarfile.SYMTYPE, "/etc/passwd"), "points outside"),
        (_member("a/link", tarfile.SYMTYPE, "../../etc"), "points outside"),
        (_member("hard", tarfile.LNKTYPE, "../x"), "outside the image"),
        (_member("dev", tarfile.CHRTYPE), "only files"),
        (_member("fifo", tarfile.FIFOTYPE), "only files"),
    ],
)
def test_unpack_refuses_escaping_members(
    tmp_path: Path, member: tarfile.TarInfo, message: str
) -> None:
    evil = tmp_path / "evil.img"
    _evil_tar(evil, member)
    dest = tmp_path / "slot" / "root"
    with pytest.raises(ImageError, match=message):
        unpack(evil, dest)
    assert not (tmp_path / "evil").exists()
    assert not (tmp_path / "slot" / "evil").exists()
    assert not dest.exists() or list(dest.iterdir()) == []


def test_not_an_image(tmp_path: Path) -> None:
    junk = tmp_path / "junk.img"
    junk.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(ImageError, match="not a readable image"):
        load_image(junk)
    with pytest.raises(ImageError, match="no such image file"):
        load_image(tmp_path / "missing.img")


def test_load_image_hashes_a_file_once_until_it_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    import rollout.image as image_module

    src = write_sample_tree(tmp_path / "src")
    img = build_image(src, tmp_path / "a.img", version="1")
    hashed: list[str] = []
    real = image_module.sha256_file

    def counting(path: str | os.PathLike[str]) -> str:
        hashed.append(str(path))
        return real(path)

    monkeypatch.setattr(image_module, "sha256_file", counting)
    monkeypatch.setenv("ROLLOUT_CACHE", str(tmp_path / "cache"))
    first = load_image(img.path)
    again = load_image(img.path)
    assert first == again and first.digest == img.digest
    assert len(hashed) == 1  # the second rollout start read only the file's stat
    image_module._cache.clear()  # as a new process (the next `rollout run`) starts
    assert load_image(img.path) == first and len(hashed) == 1  # from the cache file

    # Changed in place, same size, mtime put back: the ctime still tells.
    st = os.stat(img.path)
    data = bytearray(Path(img.path).read_bytes())
    data[-1] ^= 0xFF  # in the tar's zero padding: still the same image, other bytes
    Path(img.path).write_bytes(bytes(data))
    os.utime(img.path, ns=(st.st_atime_ns, st.st_mtime_ns))
    changed = load_image(img.path)
    assert len(hashed) == 2 and changed.digest != first.digest

    # Replaced by a rename (another inode): hashed again.
    other = build_image(src, tmp_path / "b.img", version="1")
    hashed.clear()
    os.replace(other.path, img.path)
    assert load_image(img.path).digest == other.digest and hashed == [img.path]


def test_an_unreadable_digest_cache_is_ignored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import rollout.image as image_module

    src = write_sample_tree(tmp_path / "src")
    img = build_image(src, tmp_path / "a.img", version="1")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "image-digests.json").write_text("{not json")
    monkeypatch.setenv("ROLLOUT_CACHE", str(cache))
    image_module._cache.clear()
    assert load_image(img.path).digest == img.digest
    image_module._cache.clear()
    (cache / "image-digests.json").write_text('{"x": {"digest": 1}}')  # wrong shape
    assert load_image(img.path).digest == img.digest
    monkeypatch.setenv("ROLLOUT_CACHE", str(tmp_path / "a.img"))  # not a directory
    image_module._cache.clear()
    assert load_image(img.path).digest == img.digest
