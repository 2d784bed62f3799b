"""GRUB's environment block and the A/B boot-selection scheme kept in it.

The file format (GRUB's `grubenv`, what `grub-editenv` and GRUB's `load_env`/`save_env`
read and write) is exactly 1024 bytes: the line `# GRUB Environment Block`, then one
`name=value` line per variable, padded to the end with `#`. GRUB's `save_env` rewrites the
blocks of the file in place, so the size never changes.

Boot selection follows the scheme RAUC documents for its GRUB backend:

    ORDER="A B"   slots in order of preference
    A_OK, B_OK    1 when the slot may be booted at all
    A_TRY, B_TRY  1 once GRUB has started booting the slot and nobody confirmed it since

At every boot GRUB picks the first slot in ORDER with OK=1 and TRY=0 and sets its TRY=1
(grub.cfg, shipped as `rollout/agent/grub.cfg`). Committing a slot sets TRY=0 again, so a
boot that is never confirmed falls back to the next slot on the following boot.

Everything here is pure (bytes in, bytes out) except `read_file`/`write_file`, which
replace the file atomically (write a temp file, fsync, rename, fsync the directory).

>>> env = select_first({}, "B")
>>> env["ORDER"], env["B_OK"], env["B_TRY"]
('B A', '1', '0')
>>> parse(render(env)) == env
True
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

SIZE = 1024
HEADER = b"# GRUB Environment Block\n"
SLOTS = ("A", "B")


class GrubEnvError(ValueError):
    """A malformed block, or a variable that cannot be written."""


def parse(raw: bytes) -> dict[str, str]:
    """Variables of a 1024-byte environment block (GRUB's escapes undone)."""
    if len(raw) != SIZE or not raw.startswith(HEADER):
        raise GrubEnvError(f"not a GRUB environment block ({len(raw)} bytes, expected {SIZE})")
    out: dict[str, str] = {}
    for line in raw[len(HEADER) :].decode("utf-8", "replace").split("\n"):
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        if sep:
            out[name] = value.replace("\\\\", "\\")
    return out


def render(env: Mapping[str, str]) -> bytes:
    """A 1024-byte block holding `env` (sorted, so the same variables give the same bytes).

    >>> len(render({"ORDER": "A B"}))
    1024
    """
    body = bytearray(HEADER)
    for name in sorted(env):
        value = env[name]
        if not name or "=" in name or "\n" in name or "\n" in value or "\\" in value:
            raise GrubEnvError(f"grubenv: cannot store {name!r}={value!r}")
        body += f"{name}={value}\n".encode()
    if len(body) > SIZE:
        raise GrubEnvError(f"grubenv: {len(body)} bytes of variables do not fit in {SIZE}")
    return bytes(body) + b"#" * (SIZE - len(body))


def order(env: Mapping[str, str]) -> list[str]:
    """ORDER as a list of known slots, each once, missing ones appended."""
    seen = [s for s in env.get("ORDER", "").split() if s in SLOTS]
    uniq = list(dict.fromkeys(seen))
    return uniq + [s for s in SLOTS if s not in uniq]


def select_first(env: Mapping[str, str], slot: str) -> dict[str, str]:
    """Boot `slot` next: first in ORDER, OK=1, TRY=0 (the `reboot` activation)."""
    new = dict(env)
    new["ORDER"] = " ".join([slot, *[s for s in order(env) if s != slot]])
    new[f"{slot}_OK"] = "1"
    new[f"{slot}_TRY"] = "0"
    return new


def commit(env: Mapping[str, str], slot: str) -> dict[str, str]:
    """`slot` is confirmed good: first in ORDER with OK=1 and TRY=0."""
    return select_first(env, slot)


def disable(env: Mapping[str, str], slot: str) -> dict[str, str]:
    """`slot` must not boot (being written, or failed): OK=0, last in ORDER."""
    new = dict(env)
    new["ORDER"] = " ".join([*[s for s in order(env) if s != slot], slot])
    new[f"{slot}_OK"] = "0"
    new[f"{slot}_TRY"] = "0"
    return new


def would_boot(env: Mapping[str, str]) -> str | None:
    """The slot GRUB's grub.cfg picks from `env` (None: no slot is bootable).

    >>> would_boot({"ORDER": "B A", "A_OK": "1", "A_TRY": "0", "B_OK": "1", "B_TRY": "1"})
    'A'
    """
    for slot in order(env):
        if env.get(f"{slot}_OK") == "1" and env.get(f"{slot}_TRY", "0") == "0":
            return slot
    return None


def read_file(path: Path) -> dict[str, str]:
    return parse(path.read_bytes())


def write_file(path: Path, env: Mapping[str, str]) -> None:
    """Replace the block atomically: a power cut leaves the old or the new one."""
    data = render(env)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
