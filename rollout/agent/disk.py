"""The disk backend: the agent on a real Linux node with A/B root partitions and GRUB.

The node's disk holds a boot partition (GRUB, grub.cfg, its 1024-byte environment block),
slot A and slot B (whole root filesystems) and a data partition that both slots mount (the
agent's state dir lives there, since a slot is overwritten whole). The agent's config
file (`rollout agent --config FILE`, see `DiskConfig`) names the slot devices
(`PARTUUID=...`, `PARTLABEL=...`, `LABEL=...`, `UUID=...` or a path), the GRUB
environment file and the node's `compatible` string.

Boot selection and counting live in GRUB's environment (grubenv.py; RAUC's scheme:
ORDER, A_OK/B_OK, A_TRY/B_TRY; GRUB boots the first slot in ORDER with OK=1 and TRY=0 and
sets its TRY=1). Invariants the agent keeps:

- staging: the slot is set OK=0 before its first byte is written, so GRUB never boots a
  half-written slot; the booted root device is never opened for writing (compared by
  device number with the device `/` is mounted from, not by name);
- `reboot`: the new slot first in ORDER with OK=1, TRY=0, then `systemctl reboot`; GRUB
  marks TRY=1 as it boots it, and only a commit sets TRY=0 again: an uncommitted boot
  falls back to the good slot at the next reboot, with no controller alive;
- `kexec`: the new slot's kernel and initrd are loaded from a read-only mount of the slot
  with `root=` naming it, then `systemctl kexec`; GRUB is skipped, so its environment
  keeps the good slot first until commit (a hang or power cycle comes back on it);
- `soft-reboot`: the new slot is mounted at /run/nextroot and `systemctl soft-reboot`
  starts its userspace on the same kernel; GRUB's environment is untouched until commit;
- after every boot the booted slot is found from the device of the root mount (after a
  soft-reboot /proc/cmdline still names the old slot), and a boot is told from an agent
  restart by the kernel's boot id plus systemd's soft-reboot count;
- commit writes GRUB's environment first (slot first, OK=1, TRY=0), then the state.

The workload is the image's own systemd units (the manifest's `workload.units`): they are
polled with `systemctl show`; all active is `running`, any failed is `failed` (before
commit that makes the agent fall back by itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import re
import shutil
import stat
import subprocess
from collections.abc import AsyncIterable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import structlog
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from rollout.agent import grubenv
from rollout.agent.backend import IsCommitted, OnWorkloadFailed, SwitchResult
from rollout.agent.channel import Channel, ChannelReader, finished, run_in_thread
from rollout.agent.state import AgentError, AgentState, Slot, SlotImage
from rollout.agent.store import Store
from rollout.errors import InputError
from rollout.model import ActivationMode

if TYPE_CHECKING:
    from rollout.agent.node import AgentConfig
    from rollout.rootfs import RootfsManifest

log = structlog.get_logger("rollout.agent.disk")

NEXTROOT = Path("/run/nextroot")
KEXEC_MOUNT = Path("/run/rollout/kexec")
_WIPE = 1 << 20
_POLL = 1.0
_SPEC = re.compile(r"^(PARTUUID|PARTLABEL|LABEL|UUID)=(\S+)$")
_BY = {"PARTUUID": "by-partuuid", "PARTLABEL": "by-partlabel", "LABEL": "by-label",
       "UUID": "by-uuid"}  # fmt: skip


class DiskConfig(BaseModel):
    """The agent's config file on a real node (YAML). Paths are absolute."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    listen: str = Field(description="HOST:PORT of the agent API, e.g. 0.0.0.0:7000.")
    node_id: str = Field(description="Node id reported in status.")
    token_file: str = Field(description="File holding the bearer token.")
    state_dir: str = Field(description="Agent state dir, on the data partition.")
    compatible: str = Field(description="Images whose `compatible` differs are refused.")
    slots: dict[Literal["A", "B"], str] = Field(
        description="Slot devices: PARTUUID=, PARTLABEL=, LABEL=, UUID= or a path."
    )
    grubenv: str = Field("/boot/grub/grubenv", description="GRUB's environment block file.")
    commit_deadline: float = Field(300.0, gt=0, description="Seconds before self-fallback.")
    workload_port: int = Field(8080, ge=1, le=65535, description="Port reported in status.")
    tls_cert: str | None = None
    tls_key: str | None = None
    trusted_keys: list[str] = Field(
        default_factory=list,
        description="ed25519 public keys (PEM files); when set, images must be signed.",
    )

    @field_validator("slots")
    @classmethod
    def _both(cls, v: dict[str, str]) -> dict[str, str]:
        if set(v) != {"A", "B"}:
            raise ValueError("expected both slots A and B")
        if v["A"] == v["B"]:
            raise ValueError("slots A and B name the same device")
        return v


def load_config(path: Path) -> DiskConfig:
    """Read the agent config file; InputError names the file and the field."""
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise InputError(f"--config {path}: cannot read: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise InputError(f"--config {path}: not valid YAML: {exc}") from exc
    try:
        return DiskConfig.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(top)"
        raise InputError(f"{path}: {where}: {err['msg']}") from exc


def resolve(spec: str) -> Path:
    """`PARTUUID=x` (and PARTLABEL, LABEL, UUID) -> /dev/disk/by-*/x; a path stays.

    >>> resolve("PARTUUID=524f4c4c-02")
    PosixPath('/dev/disk/by-partuuid/524f4c4c-02')
    """
    m = _SPEC.match(spec)
    if m:
        return Path("/dev/disk") / _BY[m.group(1)] / m.group(2)
    return Path(spec)


DevId = tuple[str, int, int]


def device_id(path: Path) -> DevId:
    """What identifies a slot: a block device's number, a file's (device, inode)."""
    st = os.stat(path)
    if stat.S_ISBLK(st.st_mode):
        return ("blk", os.major(st.st_rdev), os.minor(st.st_rdev))
    return ("file", st.st_dev, st.st_ino)


def root_device_id() -> DevId:
    st = os.stat("/")
    return ("blk", os.major(st.st_dev), os.minor(st.st_dev))


def root_source(mountinfo: str) -> str | None:
    """The source device of the `/` mount from /proc/self/mountinfo (the last one wins).

    >>> root_source("22 1 254:3 / / rw,relatime shared:1 - ext4 /dev/vda3 rw\\n")
    '/dev/vda3'
    """
    found = None
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if sep and len(fields) >= 5 and fields[4] == "/":
            parts = right.split()
            if len(parts) >= 2:
                found = parts[1]
    return found


def kexec_cmdline(current: str, root: str, slot: Slot) -> str:
    """The running kernel's command line with root= and rollout.slot= for `slot`.

    >>> kexec_cmdline("BOOT_IMAGE=/vmlinuz root=PARTUUID=x-02 rw quiet rollout.slot=A",
    ...               "PARTUUID=x-03", Slot.B)
    'rw quiet root=PARTUUID=x-03 rollout.slot=B'
    """
    drop = ("BOOT_IMAGE=", "root=", "rollout.slot=", "initrd=")
    kept = [w for w in current.split() if not w.startswith(drop)]
    return " ".join([*kept, f"root={root}", f"rollout.slot={slot}"])


def workload_state(units: dict[str, str]) -> str:
    """The workload's state from its units' ActiveState values.

    >>> workload_state({"a.service": "active", "b.service": "activating"})
    'starting'
    >>> workload_state({"a.service": "active", "b.service": "failed"})
    'failed'
    """
    values = set(units.values())
    if not values:
        return "stopped"
    if "failed" in values:
        return "failed"
    if values == {"active"}:
        return "running"
    return "starting"


class UnitWatcher:
    """Polls the image's systemd units; reports a failure before commit once."""

    def __init__(
        self,
        port: int,
        is_committed: IsCommitted,
        on_failed: OnWorkloadFailed,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.port = port
        self._is_committed = is_committed
        self._on_failed = on_failed
        self._on_change = on_change  # a poll saw new unit states: wake status long polls
        self.units: dict[str, str] = {}
        self.system = "unknown"
        self._task: asyncio.Task[None] | None = None

    def start(self, units: tuple[str, ...]) -> None:
        self.units = {u: "unknown" for u in units}
        self._task = asyncio.create_task(self._watch(units), name="units")

    async def _watch(self, units: tuple[str, ...]) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        reported = False
        while True:
            seen = (self.units, self.system)
            self.units = await _unit_states(units)
            self.system = await _system_state()
            if (self.units, self.system) != seen:
                self._on_change()
            state = workload_state(self.units)
            if state == "failed" and not reported and not self._is_committed():
                reported = True
                failed = [u for u, s in self.units.items() if s == "failed"]
                log.warning("units_failed_before_commit", units=failed)
                self._on_failed(1, loop.time() - started)
            await asyncio.sleep(_POLL)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def snapshot(self) -> dict[str, Any]:
        return {
            "state": workload_state(self.units),
            "pid": None,
            "port": self.port,
            "exit_code": None,
            "restarts": 0,
            "units": dict(self.units),
            "system": self.system,
        }


async def _capture(*args: str) -> str:
    try:
        proc = await asyncio.create_subprocess_exec(
            *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
    except OSError:
        return ""
    out, _ = await proc.communicate()
    return out.decode(errors="replace")


async def _unit_states(units: tuple[str, ...]) -> dict[str, str]:
    if not units:
        return {}
    out = await _capture("systemctl", "show", "--property=ActiveState", *units)
    # `show` answers one block per unit, in the order asked.
    blocks = [b for b in out.strip().split("\n\n") if b.strip()]
    states = {u: "unknown" for u in units}
    if len(blocks) == len(units):
        for unit, block in zip(units, blocks, strict=True):
            states[unit] = block.strip().partition("=")[2] or "unknown"
    return states


async def _system_state() -> str:
    return (await _capture("systemctl", "is-system-running")).strip() or "unknown"


def _run(args: list[str], what: str) -> None:
    done = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if done.returncode != 0:
        raise AgentError(
            "activation_failed",
            f"{what}: `{' '.join(args)}` failed ({done.returncode}): {done.stderr.strip()}",
        )


class DiskBackend:
    kind = "disk"

    def __init__(
        self,
        config: AgentConfig,
        disk: DiskConfig,
        store: Store,
        *,
        is_committed: IsCommitted,
        on_workload_failed: OnWorkloadFailed,
        on_change: Callable[[], None] = lambda: None,
        root_id: Callable[[], DevId] = root_device_id,
    ) -> None:
        self.config = config
        self.disk = disk
        self.store = store
        self.grubenv = Path(disk.grubenv)
        self._root_id = root_id
        self.units = UnitWatcher(disk.workload_port, is_committed, on_workload_failed, on_change)
        self._touched = False  # the slot being staged was written to (or its env changed)

    # --- slots and manifests -----------------------------------------------------------

    def device(self, slot: Slot) -> Path:
        return resolve(self.spec(slot))

    def spec(self, slot: Slot) -> str:
        """The slot's device as configured (also what `root=` names it by)."""
        return self.disk.slots["A" if slot is Slot.A else "B"]

    def manifest_path(self, slot: Slot) -> Path:
        return self.store.slot_dir(slot) / "manifest.json"

    def manifest(self, slot: Slot) -> RootfsManifest:
        from rollout.rootfs import read_rootfs_manifest

        path = self.manifest_path(slot)
        return read_rootfs_manifest(path.read_bytes(), str(path))

    def _env(self) -> dict[str, str]:
        try:
            return grubenv.read_file(self.grubenv)
        except FileNotFoundError:
            return {}
        except grubenv.GrubEnvError as exc:
            raise AgentError("bootloader", f"{self.grubenv}: {exc}") from exc

    def _write_env(self, new: dict[str, str]) -> None:
        old = self._env()
        if new != old:
            grubenv.write_file(self.grubenv, new)
            log.info("grubenv", **{k: new[k] for k in sorted(new)})

    # --- boot ----------------------------------------------------------------------------

    def factory_state(self) -> AgentState:
        raise InputError(
            f"{self.store.state_path}: no agent state on this node; provision it (write "
            "slot A and its state, as `rollout fleet up --vm` does; see docs/real-nodes.md)"
        )

    def recover(self, state: AgentState) -> None:
        """Nothing to clean: a half-written slot is already OK=0 and empty in the state,
        and the workload belongs to systemd, not to this process."""

    def boot_identity(self) -> str | None:
        try:
            boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        except OSError:
            return None
        done = subprocess.run(
            ["systemctl", "show", "--property=SoftRebootsCount", "--value"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        soft = done.stdout.strip() if done.returncode == 0 else ""
        return f"{boot_id}/{soft or 0}"

    def booted_slot(self) -> Slot | None:
        root = self._root_id()
        for slot in Slot:
            try:
                if device_id(self.device(slot)) == root:
                    return slot
            except OSError:
                continue
        raise InputError(
            f"the root filesystem ({self.root_device()}) is neither slot A "
            f"({self.disk.slots['A']}) nor slot B ({self.disk.slots['B']}); check `slots` "
            "in the agent config"
        )

    def root_device(self) -> str | None:
        try:
            return root_source(Path("/proc/self/mountinfo").read_text())
        except OSError:
            return None

    def boot_delay(self, mode: ActivationMode | None, soft: bool) -> float:
        return 0.0

    async def after_boot(self, state: AgentState) -> None:
        """A committed boot: GRUB's environment says so (and that a fallen-from slot is
        not bootable). An uncommitted one: GRUB already counted its try."""
        if not state.committed:
            return
        env = grubenv.commit(self._env(), str(state.booted))
        f = state.fell_back
        if f is not None and f.from_slot != state.booted and f.boot_count == state.boot_count:
            env = grubenv.disable(env, str(f.from_slot))
        await asyncio.to_thread(self._write_env, env)

    # --- workload ------------------------------------------------------------------------

    def start_workload(self, state: AgentState) -> None:
        try:
            units = self.manifest(state.booted).units
        except (OSError, InputError) as exc:
            log.error("no_manifest", slot=str(state.booted), error=str(exc))
            units = ()
        self.units.start(units)

    async def stop_workload(self) -> None:
        await self.units.stop()

    def workload_snapshot(self) -> dict[str, Any]:
        return self.units.snapshot()

    # --- staging -------------------------------------------------------------------------

    async def write_slot(
        self, state: AgentState, slot: Slot, digest: str, body: AsyncIterable[bytes]
    ) -> tuple[SlotImage, int]:
        from rollout.rootfs import RootfsStreamError

        device = self.device(slot)
        self._touched = False
        await asyncio.to_thread(self._guard, slot, device)
        channel = Channel()

        def work() -> tuple[RootfsManifest, str]:
            try:
                return self._copy(channel, device, str(slot))
            finally:
                channel.stop()  # a worker that failed takes no more: the loop stops sending

        worker = run_in_thread(work, name=f"stage-{slot}")
        size = 0
        try:
            async for chunk in body:
                size += len(chunk)
                if not await channel.send(chunk):
                    break  # the worker ended early: awaiting it raises why
            else:
                channel.close()
        except BaseException as exc:
            channel.fail(AgentError("upload_incomplete", str(exc)))
            await finished(worker)  # nothing may still write to the device being cleared
            raise
        try:
            manifest, actual = await worker
        except RootfsStreamError as exc:
            raise AgentError(exc.code, str(exc), written=self._touched) from None
        except AgentError as exc:
            exc.extra.setdefault("written", self._touched)
            raise
        if actual != digest:
            raise AgentError(
                "digest_mismatch",
                f"the image written has digest {actual}, the request said {digest}",
                expected=digest,
                actual=actual,
            )
        await asyncio.to_thread(self._save_manifest, slot, manifest)
        return SlotImage(digest=digest, name=manifest.name, version=manifest.version), size

    def _guard(self, slot: Slot, device: Path) -> None:
        try:
            ident = device_id(device)
        except OSError as exc:
            raise AgentError(
                "bad_slot", f"slot {slot}: {device}: {exc.strerror}", slot=str(slot)
            ) from exc
        if ident == self._root_id():
            raise AgentError(
                "booted_slot",
                f"slot {slot} ({device}) is the device the root filesystem is mounted from; "
                "it is never written",
                slot=str(slot),
            )

    def _copy(self, channel: Channel, device: Path, slot_name: str) -> tuple[RootfsManifest, str]:
        """Worker thread: parse the stream, write the filesystem to `device`, fsync."""
        import hashlib

        from rollout.rootfs import copy_rootfs

        whole = hashlib.sha256()
        source = ChannelReader(channel)

        class Hashing(io.RawIOBase):
            def readable(self) -> bool:
                return True

            def readinto(self, buffer: Any) -> int:
                n = source.readinto(buffer)
                whole.update(memoryview(buffer)[:n])
                return n

        fd = os.open(device, os.O_WRONLY | os.O_CLOEXEC)
        try:
            capacity = os.lseek(fd, 0, os.SEEK_END)
            os.lseek(fd, 0, os.SEEK_SET)

            def check(m: RootfsManifest) -> None:
                if m.compatible != self.disk.compatible:
                    raise AgentError(
                        "incompatible",
                        f"the image is for {m.compatible!r}; this node is {self.disk.compatible!r}",
                        image=m.compatible,
                        node=self.disk.compatible,
                    )
                if m.rootfs.size > capacity:
                    raise AgentError(
                        "too_large",
                        f"the filesystem is {m.rootfs.size} bytes; slot {device} holds {capacity}",
                    )
                # Accepted: from here on the slot is being overwritten; GRUB must not
                # boot it until it is activated.
                self._touched = True
                self._write_env(grubenv.disable(self._env(), slot_name))

            def sink(data: bytes) -> None:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]

            try:
                manifest = copy_rootfs(
                    io.BufferedReader(Hashing(), 1 << 20), check=check, sink=sink
                )
            finally:
                channel.stop()
            os.fsync(fd)
        finally:
            os.close(fd)
        return manifest, "sha256:" + whole.hexdigest()

    def _save_manifest(self, slot: Slot, manifest: RootfsManifest) -> None:
        path = self.manifest_path(slot)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(manifest.to_json())
        os.replace(tmp, path)

    def clear_slot(self, slot: Slot) -> None:
        """After a failed write: no manifest, and the start of the device zeroed, so
        nothing mounts or boots what was half written (GRUB already has it OK=0)."""
        if not self._touched:
            return
        self.manifest_path(slot).unlink(missing_ok=True)
        device = self.device(slot)
        try:
            if device_id(device) == self._root_id():
                return
            fd = os.open(device, os.O_WRONLY | os.O_CLOEXEC)
        except OSError:
            return
        try:
            os.write(fd, bytes(_WIPE))
            os.fsync(fd)
        finally:
            os.close(fd)

    # --- activation ----------------------------------------------------------------------

    async def switch(self, state: AgentState) -> SwitchResult:
        await asyncio.to_thread(self._switch, state)
        return SwitchResult.WAIT

    def _switch(self, state: AgentState) -> None:
        pending = state.pending
        if pending is None:
            raise ValueError("switch without a pending boot")
        slot = pending.slot
        if pending.rollback:
            # Known good: GRUB should boot it from now on, and never the slot we leave
            # while it is uncommitted.
            env = grubenv.select_first(self._env(), str(slot))
            if not state.committed and state.booted != slot:
                env = grubenv.disable(env, str(state.booted))
            self._write_env(env)
        if pending.mode is ActivationMode.REBOOT:
            if not pending.rollback:
                self._write_env(grubenv.select_first(self._env(), str(slot)))
            _run(["systemctl", "reboot", "--no-block"], "reboot")
        elif pending.mode is ActivationMode.KEXEC:
            self._load_kexec(slot)
            _run(["systemctl", "kexec", "--no-block"], "kexec")
        else:
            self._mount_nextroot(slot)
            _run(["systemctl", "soft-reboot", "--no-block"], "soft-reboot")

    def _load_kexec(self, slot: Slot) -> None:
        kexec = shutil.which("kexec")
        if kexec is None:
            raise AgentError("activation_failed", "kexec: the kexec command is not installed")
        boot = self.manifest(slot).boot
        KEXEC_MOUNT.mkdir(parents=True, exist_ok=True)
        _run(["mount", "-o", "ro", str(self.device(slot)), str(KEXEC_MOUNT)], "kexec mount")
        try:
            cmdline = kexec_cmdline(
                Path("/proc/cmdline").read_text(),
                self.spec(slot),
                slot,
            )
            _run(
                [kexec, "-l", str(KEXEC_MOUNT / boot.kernel),
                 f"--initrd={KEXEC_MOUNT / boot.initrd}", f"--append={cmdline}"],
                "kexec load",
            )  # fmt: skip
        finally:
            subprocess.run(["umount", str(KEXEC_MOUNT)], capture_output=True, check=False)

    def _mount_nextroot(self, slot: Slot) -> None:
        NEXTROOT.mkdir(parents=True, exist_ok=True)
        if os.path.ismount(NEXTROOT):
            _run(["umount", str(NEXTROOT)], "soft-reboot umount")
        _run(["mount", str(self.device(slot)), str(NEXTROOT)], "soft-reboot mount")

    async def commit(self, state: AgentState) -> None:
        env = grubenv.commit(self._env(), str(state.booted))
        await asyncio.to_thread(self._write_env, env)

    def describe(self) -> dict[str, Any]:
        try:
            env = self._env()
        except AgentError:
            env = {}
        try:
            boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        except OSError:
            boot_id = None
        return {
            "kind": self.kind,
            "root_device": self.root_device(),
            "kernel_boot_id": boot_id,
            "slots": dict(self.disk.slots),
            "compatible": self.disk.compatible,
            "grubenv": {k: env[k] for k in sorted(env) if k in ("ORDER", "A_OK", "A_TRY",
                                                                "B_OK", "B_TRY")},
        }  # fmt: skip


def provision(digest: str, manifest: RootfsManifest) -> dict[str, bytes]:
    """Files (relative to the state dir) of a node whose slot A was written with an image
    at install time: the factory state (A good, booted, committed) and A's manifest."""
    from rollout.agent import state as sm

    image = SlotImage(digest=digest, name=manifest.name, version=manifest.version)
    state = sm.factory_state(image)
    return {
        "state.json": json.dumps(sm.to_json(state), indent=2, sort_keys=True).encode() + b"\n",
        "slots/A/manifest.json": manifest.to_json(),
    }
