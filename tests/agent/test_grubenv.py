"""GRUB's environment block: our bytes against the real grub-editenv, and the A/B scheme."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from rollout.agent import grubenv

needs_editenv = pytest.mark.skipif(
    shutil.which("grub-editenv") is None, reason="needs grub-editenv (Debian: grub-common)"
)


@needs_editenv
def test_grub_editenv_reads_what_we_write_and_we_read_what_it_writes(tmp_path: Path) -> None:
    ours = tmp_path / "ours"
    grubenv.write_file(ours, {"ORDER": "B A", "A_OK": "1", "A_TRY": "0", "B_OK": "1", "B_TRY": "1"})
    listed = subprocess.run(
        ["grub-editenv", str(ours), "list"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert sorted(listed) == sorted(["A_OK=1", "A_TRY=0", "B_OK=1", "B_TRY=1", "ORDER=B", "A"])
    theirs = tmp_path / "theirs"
    subprocess.run(["grub-editenv", str(theirs), "create"], check=True)
    subprocess.run(
        ["grub-editenv", str(theirs), "set", "ORDER=A B", "A_OK=1", "B_TRY=1"], check=True
    )
    assert theirs.stat().st_size == grubenv.SIZE
    assert grubenv.read_file(theirs) == {"ORDER": "A B", "A_OK": "1", "B_TRY": "1"}


@pytest.mark.parametrize(
    ("name", "env", "boots"),
    [
        ("fresh disk: A good", {"ORDER": "A B", "A_OK": "1", "A_TRY": "0", "B_OK": "0"}, "A"),
        ("B activated by reboot", grubenv.select_first({"A_OK": "1", "A_TRY": "0"}, "B"), "B"),
        (
            "B tried once, never confirmed",
            {"ORDER": "B A", "A_OK": "1", "A_TRY": "0", "B_OK": "1", "B_TRY": "1"},
            "A",
        ),
        ("B being written", grubenv.disable({"ORDER": "B A", "A_OK": "1", "B_OK": "1"}, "B"), "A"),
        ("nothing bootable", {"A_OK": "0", "B_OK": "0"}, None),
        ("ORDER missing a slot", {"ORDER": "B", "A_OK": "1", "B_OK": "0"}, "A"),
    ],
)
def test_would_boot(name: str, env: dict[str, str], boots: str | None) -> None:
    assert grubenv.would_boot(env) == boots, name


def test_commit_confirms_and_disable_moves_last() -> None:
    tried = {"ORDER": "B A", "A_OK": "1", "A_TRY": "0", "B_OK": "1", "B_TRY": "1"}
    assert grubenv.commit(tried, "B") == {**tried, "B_TRY": "0"}
    assert grubenv.disable(tried, "B") == {**tried, "ORDER": "A B", "B_OK": "0", "B_TRY": "0"}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"# GRUB Environment Block\n" + b"#" * 10, "1024"),
        (b"x" * 1024, "not a GRUB environment block"),
    ],
)
def test_malformed_blocks_are_refused(raw: bytes, message: str) -> None:
    with pytest.raises(grubenv.GrubEnvError, match=message):
        grubenv.parse(raw)


def test_values_that_grub_would_misread_are_refused() -> None:
    with pytest.raises(grubenv.GrubEnvError):
        grubenv.render({"ORDER": "A\nB"})
    with pytest.raises(grubenv.GrubEnvError, match="do not fit"):
        grubenv.render({f"V{i}": "x" * 40 for i in range(30)})


def test_shipped_grub_cfg_implements_the_scheme() -> None:
    cfg = (Path(grubenv.__file__).parent / "grub.cfg").read_text()
    assert "load_env --file $prefix/grubenv" in cfg
    assert "save_env --file $prefix/grubenv ORDER A_OK A_TRY B_OK B_TRY" in cfg
    # The chosen slot gets TRY=1 before it boots.
    assert "set found=1; set A_TRY=1; set default=slot-A" in cfg
    assert "set found=1; set B_TRY=1; set default=slot-B" in cfg
